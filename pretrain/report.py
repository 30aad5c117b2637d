"""The pipeline's report: tables laid out like the papers', with figures, as Markdown and HTML.

Every number links to the run folder that produced it; the best method value of each column is in
bold; baseline rows (chance, a centred box, a randomly initialised backbone) sit under the methods.
"""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pretrain.runtime import atomic_write_text  # noqa: E402


def _get(d, *path):
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


def _table(title: str, note: str, columns: list[Column], rows: list[tuple[str, str, dict, bool]]) -> str:
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


def _rows(results: dict, stages_with_baselines: set[str]) -> list:
    rows = [(m, m, res, False) for m, res in results["methods"].items()]
    base = results.get("baselines") or {}
    if any(k in base for k in stages_with_baselines):
        rows.append(("random init", "baselines", base, True))
    return rows


def _pretrain_curves(run_dir: Path, methods: list[str], out: Path) -> Path | None:
    curves = {}
    for m in methods:
        logf = run_dir / m / "pretrain" / "log.jsonl"
        if not logf.exists():
            continue
        ep, loss, acc = [], [], []
        for line in logf.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("event", "epoch") == "epoch" and "epoch" in r and ("val_top1" in r or "top1" in r):
                ep.append(r["epoch"])
                loss.append(r.get("train_loss", r.get("loss")))
                acc.append(r.get("val_top1", r.get("top1")))
        if ep:
            curves[m] = (ep, loss, acc)
    if not curves:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for m, (ep, loss, acc) in curves.items():
        if any(v is not None for v in loss):
            axes[0].plot(ep, loss, marker="o", ms=3, label=m)
        axes[1].plot(ep, acc, marker="o", ms=3, label=m)
    axes[0].set(xlabel="epoch", ylabel="training loss", title="Pretraining loss")
    axes[1].set(xlabel="epoch", ylabel="val top-1 (%)", title="Pretraining accuracy")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _wsol_curves(results: dict, out: Path) -> Path | None:
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    drawn = False
    series = [(m, r.get("wsol") or {}) for m, r in results["methods"].items()]
    series.append(("random init", (results.get("baselines") or {}).get("wsol") or {}))
    for m, w in series:
        curve = w.get("curve") or []
        pts = [(c.get("epoch"), c.get("maxboxacc_v2", c.get("top1_loc"))) for c in curve if isinstance(c, dict)]
        pts = [(e, v) for e, v in pts if e is not None and v is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=m, ls="--" if m == "random init" else "-")
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(xlabel="fine-tuning epoch", ylabel="MaxBoxAccV2 (%)", title="CUB localization vs fine-tuning")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _summary_bars(panels: list[tuple[str, dict[str, float]]], out: Path) -> Path | None:
    panels = [(t, v) for t, v in panels if v]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, vals) in zip(axes[0], panels):
        names = list(vals)
        ax.bar(range(len(names)), [vals[n] for n in names], color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _first_png(folder: Path, patterns: tuple[str, ...]) -> Path | None:
    for pat in patterns:
        hits = sorted(folder.glob(pat)) if folder.exists() else []
        if hits:
            return hits[0]
    return None


def _det_get(key):
    def get(m):
        return _get(m, key + "_mean") if _get(m, key + "_mean") is not None else _get(m, key)
    return get


def _det_spread(key):
    return lambda m: _get(m, key + "_std") if len(m.get("seeds") or []) > 1 else None


def write_report(run_dir: Path, results: dict, cfg: dict) -> Path:
    run_dir = Path(run_dir)
    fig_dir = run_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    methods = list(results["methods"])
    sections = [f"# Mixup-family pretraining and transfer: report `{cfg.get('name')}`", "",
                f"Methods: {', '.join(methods)}. Data: `{cfg['data']['root']}`. Every number links to the run "
                "folder that produced it; **bold** is the best method in each column; rows in *italics* are "
                "baselines. ↑: higher is better, ↓: lower is better. One pretraining seed per method unless a "
                "table says otherwise.", ""]

    # Classification
    num_classes = next((r["pretrain"].get("num_classes") for r in results["methods"].values()
                        if isinstance(r.get("pretrain"), dict) and r["pretrain"].get("num_classes")), None)
    rows = [(m, m, r, False) for m, r in results["methods"].items()]
    if num_classes:
        chance = {"pretrain": {"top1": 100.0 / num_classes, "top5": min(100.0, 500.0 / num_classes)}}
        rows.append((f"chance ({num_classes} classes)", "", chance, True))
    sections.append(_table(
        "Classification (ImageNet layout, validation)", "Pretraining on the ImageNet-layout training set.",
        [Column("top-1 acc (%)", "pretrain", lambda m: _get(m, "top1")),
         Column("top-5 acc (%)", "pretrain", lambda m: _get(m, "top5")),
         Column("train time (s)", "pretrain", lambda m: _get(m, "train_time_s"), better=None, fmt="{:.0f}")],
        rows))

    # Detection, Table 5 style
    dets = [d["name"] for d in cfg.get("detection") or []]
    if dets:
        cols = []
        for name in dets:
            coco = "coco" in name
            key = "AP" if coco else "mAP"
            cols.append(Column(f"{name} {'AP' if coco else 'mAP'} (%)", name, _det_get(key),
                               spread=_det_spread(key)))
            if coco:
                cols.append(Column(f"{name} AP50 (%)", name, _det_get("AP50"), spread=_det_spread("AP50")))
            cols.append(Column(f"{name} train img/s", name, lambda m: _get(m, "train_img_per_s"), better="high",
                               fmt="{:.1f}"))
            cols.append(Column(f"{name} test img/s", name, lambda m: _get(m, "test_img_per_s"), better="high",
                               fmt="{:.1f}"))
        seeds = {len((r.get(n) or {}).get("seeds") or [0]) for r in results["methods"].values() for n in dets}
        sections.append(_table(
            "Detection transfer (MultiMix Table 5 layout)",
            "SSD fine-tuned on VOC07+12 trainval, scored on VOC07 test (11-point mAP at IoU 0.5); Faster R-CNN "
            f"fine-tuned on COCO train, scored on val (COCO AP). Seeds per entry: {sorted(seeds)}; ± is the std "
            "over seeds. The *random init* row trains the same detector from a randomly initialised backbone "
            "with trainable BatchNorm.", cols, _rows(results, set(dets))))

    # WSOL
    if cfg.get("wsol"):
        rows = _rows(results, {"wsol"})
        centred = next((r["wsol"].get("centred_box") for r in results["methods"].values()
                        if isinstance(r.get("wsol"), dict) and isinstance(r["wsol"].get("centred_box"), dict)), None)
        if centred:  # the same box for every image: BoxAcc at IoU 50 and the mean over 30/50/70
            rows.append(("centred box", "", {"wsol": {"maxboxacc": _get(centred, "boxacc", "50"),
                                                      "maxboxacc_v2": _get(centred, "boxacc_mean")}}, True))
        sections.append(_table(
            "Weakly-supervised localization (CUB layout, AlignMix Table 4 / multi-mix Table VI)",
            "CAM of a ResNet with layer4 at stride 1, fine-tuned on CUB train without boxes; MaxBoxAccV2 is the "
            "mean over IoU 30/50/70 of the best-threshold BoxAcc (all contours); Top-1 Loc at the fixed CAM "
            "threshold. The *centred box* row predicts one centred box for every image.",
            [Column("top-1 cls (%)", "wsol", lambda m: _get(m, "top1_cls")),
             Column("MaxBoxAcc (%)", "wsol", lambda m: _get(m, "maxboxacc")),
             Column("MaxBoxAccV2 (%)", "wsol", lambda m: _get(m, "maxboxacc_v2")),
             Column("Top-1 Loc (%)", "wsol", lambda m: _get(m, "top1_loc")),
             Column("GT-known Loc (%)", "wsol", lambda m: _get(m, "gt_known_loc"))], rows))
        curve = _wsol_curves(results, fig_dir / "wsol_curve.png")
        if curve:
            sections.append(f"![WSOL localization vs fine-tuning epoch](figures/{curve.name})\n")

    # Robustness
    if cfg.get("robustness"):
        rows = [(m, m, r, False) for m, r in results["methods"].items()]
        sections.append(_table(
            "Background corruption (multi-mix Table V protocol)",
            "Top-1 / top-5 error on the ImageNet-layout validation set, clean and with everything outside the GT "
            "boxes replaced by another image or with N(0, 0.1²) noise added; Loc: top-1 localization (CAM at 0.25 "
            "of max, IoU ≥ 0.5).",
            [Column("clean top-1 err", "robustness", lambda m: _get(m, "clean", "top1_err"), better="low"),
             Column("clean top-5 err", "robustness", lambda m: _get(m, "clean", "top5_err"), better="low"),
             Column("replace top-1 err", "robustness", lambda m: _get(m, "background", "replace", "top1_err"),
                    better="low"),
             Column("noise top-1 err", "robustness", lambda m: _get(m, "background", "noise", "top1_err"),
                    better="low"),
             Column("clean Loc", "robustness", lambda m: _get(m, "background", "clean_loc")),
             Column("replace Loc", "robustness", lambda m: _get(m, "background", "replace", "top1_loc")),
             Column("noise Loc", "robustness", lambda m: _get(m, "background", "noise", "top1_loc"))], rows))
        sections.append(_table(
            "Calibration and adversarial robustness (AlignMix / MultiMix tables)",
            "ECE and overconfidence error with 10 bins; top-1 error under FGSM (ε = 8/255) and PGD "
            "(ε = 4/255, step 2/255, 10 iterations, random start), pixel space.",
            [Column("ECE (%)", "robustness", lambda m: _get(m, "calibration", "ece"), better="low"),
             Column("OE (%)", "robustness", lambda m: _get(m, "calibration", "oe"), better="low"),
             Column("FGSM top-1 err", "robustness", lambda m: _get(m, "fgsm", "top1_err"), better="low"),
             Column("PGD top-1 err", "robustness", lambda m: _get(m, "pgd", "top1_err"), better="low")], rows))
        ood_sets = []
        for r in results["methods"].values():
            for s in ((r.get("robustness") or {}).get("ood") or {}):
                if isinstance((r["robustness"]["ood"]).get(s), dict) and s not in ood_sets:
                    ood_sets.append(s)
        if ood_sets:
            cols = []
            for s in ood_sets:
                for key, head in (("det_acc", "det acc"), ("auroc", "AUROC"), ("aupr_in", "AUPR-in"),
                                  ("aupr_out", "AUPR-out")):
                    cols.append(Column(f"{s} {head}", "robustness",
                                       lambda m, s=s, key=key: _get(m, "ood", s, key)))
            sections.append(_table(
                "Out-of-distribution detection (maximum softmax probability)",
                "In-distribution: the ImageNet-layout validation set; OOD: the listed folders and synthetic noise. "
                "Chance is 50 for detection accuracy and AUROC.", cols, rows))

    # Figures
    sections.append("## Figures\n")
    panels = [
        ("val top-1 acc (%)", {m: _get(r.get("pretrain") or {}, "top1") for m, r in results["methods"].items()}),
        *[(f"{d} {'AP' if 'coco' in d else 'mAP'}",
           {m: _det_get("AP" if "coco" in d else "mAP")(r.get(d) or {}) for m, r in results["methods"].items()})
          for d in dets],
        ("MaxBoxAccV2 (%)", {m: _get(r.get("wsol") or {}, "maxboxacc_v2") for m, r in results["methods"].items()}),
        ("bg-replace top-1 err", {m: _get(r.get("robustness") or {}, "background", "replace", "top1_err")
                                  for m, r in results["methods"].items()}),
    ]
    panels = [(t, {k: v for k, v in vals.items() if v is not None}) for t, vals in panels]
    bars = _summary_bars(panels, fig_dir / "summary.png")
    if bars:
        sections.append(f"![Summary of the main numbers per method](figures/{bars.name})\n")
    curves = _pretrain_curves(run_dir, methods, fig_dir / "pretrain_curves.png")
    if curves:
        sections.append(f"![Pretraining curves](figures/{curves.name})\n")
    for m in methods:
        pics = []
        for stage, pats in (("wsol", ("figures/*cam*.png", "figures/*grid*.png")),
                            *[(d, ("figures/*example*.png", "figures/*.png")) for d in dets],
                            ("robustness", ("figures/*reliab*.png",))):
            p = _first_png(run_dir / m / stage, pats)
            if p:
                pics.append(f"![{m} {stage}]({p.relative_to(run_dir).as_posix()})")
        if pics:
            sections.append(f"### {m}\n\n" + "\n".join(pics) + "\n")
    timings = [(m, s) for m in methods for s in ("pretrain", *dets, "wsol", "robustness")]
    t_lines = []
    for m, s in timings:
        marker = run_dir / m / s / "stage.json"
        if marker.exists():
            seconds = json.loads(marker.read_text()).get("seconds", 0)
            t_lines.append(f"| {m} | {s} | {seconds:.0f} |")
    if t_lines:
        header = "## Stage timings\n\n| method | stage | seconds |\n|---|---|---:|\n"
        sections.append(header + "\n".join(t_lines) + "\n")

    md = "\n".join(sections)
    atomic_write_text(md, run_dir / "report.md")
    atomic_write_text(_to_html(md, cfg.get("name", "")), run_dir / "report.html")
    return run_dir / "report.md"


def _to_html(md: str, title: str) -> str:
    """A small Markdown subset (headings, tables, images, links, bold, italics) to standalone HTML."""
    def inline(text: str) -> str:
        text = html.escape(text, quote=False)
        text = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", r'<img alt="\1" src="\2" style="max-width:100%">', text)
        text = re.sub(r"\[([^\]]+)\]\(([^)]*)\)", r'<a href="\2">\1</a>', text)
        text = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)
        text = re.sub(r"\*([^*]+)\*", r"<i>\1</i>", text)
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)

    out, table = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            table.append(line)
            continue
        if table:
            out.append("<table>")
            for i, row in enumerate(table):
                if i == 1:
                    continue
                cells = [c.strip() for c in row.strip("|").split("|")]
                tag = "th" if i == 0 else "td"
                out.append("<tr>" + "".join(f"<{tag}>{inline(c)}</{tag}>" for c in cells) + "</tr>")
            out.append("</table>")
            table = []
        m = re.match(r"(#+) (.*)", line)
        if m:
            n = len(m.group(1))
            out.append(f"<h{n}>{inline(m.group(2))}</h{n}>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;margin:8px 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")
