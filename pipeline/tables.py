"""Tables laid out like the papers': one function per table, each returning Markdown.

Every number links to the run folder that produced it; the best method value of each column is in bold; baseline
rows (chance, a centred box, a randomly initialised backbone) sit under the methods, in italics.
"""

from __future__ import annotations

import math
from typing import Callable


def get(d, *path):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d if isinstance(d, (int, float)) and not isinstance(d, bool) else None


class Column:
    def __init__(self, header: str, stage: str, getter: Callable[[dict], float | None], better: str | None = "high",
                 fmt: str = "{:.2f}", spread: Callable[[dict], float | None] | None = None):
        self.header, self.stage, self.getter, self.better, self.fmt, self.spread = (
            header, stage, getter, better, fmt, spread)


def table(title: str, note: str, columns: list[Column], rows: list[tuple[str, str, dict, bool]]) -> str:
    """rows: (label, folder relative to the run, results of that row by stage, is_baseline)."""
    values = [[c.getter(res.get(c.stage) or {}) if res.get(c.stage) is not None else None for c in columns]
              for _, _, res, _ in rows]
    best = []
    for j, c in enumerate(columns):
        vals = [v[j] for v, r in zip(values, rows) if not r[3] and v[j] is not None and math.isfinite(v[j])]
        best.append(None if not vals or c.better is None else (max(vals) if c.better == "high" else min(vals)))
    arrow = {"high": " ↑", "low": " ↓", None: ""}
    lines = [f"### {title}", "", note, "",
             "| method | " + " | ".join(c.header + arrow[c.better] for c in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for (label, folder, res, is_base), vals in zip(rows, values):
        cells = []
        for c, v, b in zip(columns, vals, best):
            if v is None:
                cells.append("—")
                continue
            text = c.fmt.format(v)
            if c.spread is not None:
                s = c.spread(res.get(c.stage) or {})
                if s is not None:
                    text += f" ± {s:.2f}"
            text = f"[{text}]({folder}/{c.stage}/)" if folder else text
            cells.append(f"**{text}**" if (b is not None and not is_base and v == b) else text)
        lines.append(f"| {'*' + label + '*' if is_base else label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def method_rows(results: dict, stages_with_baselines: set[str]) -> list:
    rows = [(m, m, res, False) for m, res in results["methods"].items()]
    base = results.get("baselines") or {}
    if any(k in base for k in stages_with_baselines):
        rows.append(("random init", "baselines", base, True))
    return rows


def det_get(key):
    """A getter of a detection metric: the mean over seeds where there is one."""
    def getter(m):
        return get(m, key + "_mean") if get(m, key + "_mean") is not None else get(m, key)
    return getter


def det_spread(key):
    return lambda m: get(m, key + "_std") if len(m.get("seeds") or []) > 1 else None




def classification_table(results: dict) -> str:
    num_classes = next((r["pretrain"].get("num_classes") for r in results["methods"].values()
                        if isinstance(r.get("pretrain"), dict) and r["pretrain"].get("num_classes")), None)
    rows = [(m, m, r, False) for m, r in results["methods"].items()]
    if num_classes:
        chance = {"pretrain": {"top1": 100.0 / num_classes, "top5": min(100.0, 500.0 / num_classes)}}
        rows.append((f"chance ({num_classes} classes)", "", chance, True))
    return table(
        "Classification (ImageNet layout, validation)", "Pretraining on the ImageNet-layout training set.",
        [Column("top-1 acc (%)", "pretrain", lambda m: get(m, "top1")),
         Column("top-5 acc (%)", "pretrain", lambda m: get(m, "top5")),
         Column("train time (s)", "pretrain", lambda m: get(m, "train_time_s"), better=None, fmt="{:.0f}")],
        rows)


def detection_table(results: dict, dets: list[str]) -> str:
    cols = []
    for name in dets:
        coco = "coco" in name
        key = "AP" if coco else "mAP"
        cols.append(Column(f"{name} {'AP' if coco else 'mAP'} (%)", name, det_get(key), spread=det_spread(key)))
        if coco:
            cols.append(Column(f"{name} AP50 (%)", name, det_get("AP50"), spread=det_spread("AP50")))
        cols.append(Column(f"{name} train img/s", name, lambda m: get(m, "train_img_per_s"), better="high",
                           fmt="{:.1f}"))
        cols.append(Column(f"{name} test img/s", name, lambda m: get(m, "test_img_per_s"), better="high",
                           fmt="{:.1f}"))
    seeds = {len((r.get(n) or {}).get("seeds") or [0]) for r in results["methods"].values() for n in dets}
    return table(
        "Detection transfer (MultiMix Table 5 layout)",
        "SSD fine-tuned on VOC07+12 trainval, scored on VOC07 test (11-point mAP at IoU 0.5); Faster R-CNN "
        f"fine-tuned on COCO train, scored on val (COCO AP). Seeds per entry: {sorted(seeds)}; ± is the std "
        "over seeds. The *random init* row trains the same detector from a randomly initialised backbone "
        "with trainable BatchNorm.", cols, method_rows(results, set(dets)))


def wsol_table(results: dict) -> str:
    rows = method_rows(results, {"wsol"})
    centred = next((r["wsol"].get("centred_box") for r in results["methods"].values()
                    if isinstance(r.get("wsol"), dict) and isinstance(r["wsol"].get("centred_box"), dict)), None)
    if centred:  # the same box for every image: BoxAcc at IoU 50 and the mean over 30/50/70
        rows.append(("centred box", "", {"wsol": {"maxboxacc": get(centred, "boxacc", "50"),
                                                  "maxboxacc_v2": get(centred, "boxacc_mean")}}, True))
    return table(
        "Weakly-supervised localization (CUB layout, AlignMix Table 4 / multi-mix Table VI)",
        "CAM of a ResNet with layer4 at stride 1, fine-tuned on CUB train without boxes; MaxBoxAccV2 is the "
        "mean over IoU 30/50/70 of the best-threshold BoxAcc (all contours); Top-1 Loc at the fixed CAM "
        "threshold. The *centred box* row predicts one centred box for every image.",
        [Column("top-1 cls (%)", "wsol", lambda m: get(m, "top1_cls")),
         Column("MaxBoxAcc (%)", "wsol", lambda m: get(m, "maxboxacc")),
         Column("MaxBoxAccV2 (%)", "wsol", lambda m: get(m, "maxboxacc_v2")),
         Column("Top-1 Loc (%)", "wsol", lambda m: get(m, "top1_loc")),
         Column("GT-known Loc (%)", "wsol", lambda m: get(m, "gt_known_loc"))], rows)


def background_table(results: dict) -> str:
    rows = [(m, m, r, False) for m, r in results["methods"].items()]
    return table(
        "Background corruption (multi-mix Table V protocol)",
        "Top-1 / top-5 error on the ImageNet-layout validation set, clean and with everything outside the GT "
        "boxes replaced by another image or with N(0, 0.1²) noise added; Loc: top-1 localization (CAM at 0.25 "
        "of max, IoU ≥ 0.5).",
        [Column("clean top-1 err", "robustness", lambda m: get(m, "clean", "top1_err"), better="low"),
         Column("clean top-5 err", "robustness", lambda m: get(m, "clean", "top5_err"), better="low"),
         Column("replace top-1 err", "robustness", lambda m: get(m, "background", "replace", "top1_err"),
                better="low"),
         Column("noise top-1 err", "robustness", lambda m: get(m, "background", "noise", "top1_err"),
                better="low"),
         Column("clean Loc", "robustness", lambda m: get(m, "background", "clean_loc")),
         Column("replace Loc", "robustness", lambda m: get(m, "background", "replace", "top1_loc")),
         Column("noise Loc", "robustness", lambda m: get(m, "background", "noise", "top1_loc"))], rows)


def calibration_adversarial_table(results: dict) -> str:
    rows = [(m, m, r, False) for m, r in results["methods"].items()]
    return table(
        "Calibration and adversarial robustness (AlignMix / MultiMix tables)",
        "ECE and overconfidence error with 10 bins; top-1 error under FGSM (ε = 8/255) and PGD "
        "(ε = 4/255, step 2/255, 10 iterations, random start), pixel space.",
        [Column("ECE (%)", "robustness", lambda m: get(m, "calibration", "ece"), better="low"),
         Column("OE (%)", "robustness", lambda m: get(m, "calibration", "oe"), better="low"),
         Column("FGSM top-1 err", "robustness", lambda m: get(m, "fgsm", "top1_err"), better="low"),
         Column("PGD top-1 err", "robustness", lambda m: get(m, "pgd", "top1_err"), better="low")], rows)


def ood_table(results: dict) -> str | None:
    ood_sets = []
    for r in results["methods"].values():
        for s in ((r.get("robustness") or {}).get("ood") or {}):
            if isinstance((r["robustness"]["ood"]).get(s), dict) and s not in ood_sets:
                ood_sets.append(s)
    if not ood_sets:
        return None
    cols = [Column(f"{s} {head}", "robustness", lambda m, s=s, key=key: get(m, "ood", s, key))
            for s in ood_sets for key, head in (("det_acc", "det acc"), ("auroc", "AUROC"),
                                                ("aupr_in", "AUPR-in"), ("aupr_out", "AUPR-out"))]
    rows = [(m, m, r, False) for m, r in results["methods"].items()]
    return table(
        "Out-of-distribution detection (maximum softmax probability)",
        "In-distribution: the ImageNet-layout validation set; OOD: the listed folders and synthetic noise. "
        "Chance is 50 for detection accuracy and AUROC.", cols, rows)
