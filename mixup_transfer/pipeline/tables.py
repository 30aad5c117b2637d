"""Tables laid out like the papers': one function per table, each returning a `Table`
(`.markdown()`, `.summary()`).

An entry is the mean ± sample std (ddof = 1) over the runs behind it (pretraining seeds × transfer
seeds × a detection config's own seeds), or the value alone for one run; it links to the run folder
that produced it (their common parent for several runs). The best method entry of a column is in
bold (`best_rows`); baseline rows (chance, a centred box, a randomly initialised backbone) sit
under the methods, in italics.

Results by stage are lists of runs, `{"metrics": {...}, "folder": "erm/seed0/pretrain", "seeds":
{...}}` (mixup_transfer/pipeline/run.py `Pipeline.run`).
"""

from __future__ import annotations

import math
import posixpath
from collections.abc import Callable
from dataclasses import dataclass

RULE_ONE = "**Bold**: the best value of each column (ties: all bold)."
RULE_SPREAD = ("**Bold**: the best mean of a column, only where its gap to the next-best mean "
               "is larger than both their stds (a column of single runs: the best value, ties "
               "all bold).")


def get(d, *path):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d if isinstance(d, (int, float)) and not isinstance(d, bool) else None


class Column:
    """per_seed: expand a stage's own seeds (detection's `per_seed` list) into separate runs."""
    def __init__(self, header: str, stage: str, getter: Callable[[dict], float | None],
                 better: str | None = "high", fmt: str = "{:.2f}", per_seed: bool = False):
        self.header, self.stage, self.getter, self.better, self.fmt, self.per_seed = (
            header, stage, getter, better, fmt, per_seed)


def const(stage: str, metrics: dict) -> dict:
    """The results of a baseline row computed, not run (chance, a centred box): one run without a
    folder."""
    return {stage: [{"metrics": metrics, "folder": "", "seeds": {}}]}


def expand(run: dict) -> list[dict]:
    """A run whose stage trained several seeds itself (detection's `per_seed`) as one run per
    seed."""
    per_seed = run["metrics"].get("per_seed") if isinstance(run.get("metrics"), dict) else None
    if not isinstance(per_seed, list) or len(per_seed) < 2:
        return [run]
    return [{"metrics": m, "folder": f"{run['folder']}/seed_{m.get('seed')}",
             "seeds": {**run.get("seeds", {}), "stage": m.get("seed")}} for m in per_seed]


def values(res: dict, stage: str, getter: Callable[[dict], float | None],
           per_seed: bool = False) -> list[tuple]:
    """(value, run) of every run of `stage` in a row's results where `getter` finds a number."""
    runs = [r for run in res.get(stage) or [] for r in (expand(run) if per_seed else [run])]
    return [(v, r) for r in runs for v in [getter(r.get("metrics") or {})] if v is not None]


def mean_std(vals: list[float]) -> tuple[float, float | None]:
    """The mean and the sample std (ddof = 1; None for one value) of a non-empty list."""
    n = len(vals)
    mean = math.fsum(vals) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1))


@dataclass
class Cell:
    values: list[float]
    runs: list[dict]
    # runs of the entry's stage that failed or did not run (mixup_transfer/pipeline/run.py)
    failed: int = 0

    @property
    def n(self) -> int:
        return len(self.values)

    def stats(self) -> tuple[float, float | None] | None:
        return mean_std(self.values) if self.values else None

    def text(self, fmt: str) -> str:
        if not self.values:
            return "*failed*" if self.failed else "—"
        mean, std = self.stats()
        return fmt.format(mean) if std is None else f"{fmt.format(mean)} ± {fmt.format(std)}"

    def link(self) -> str:
        folders = [r["folder"] for r in self.runs if r.get("folder")]
        if not folders:
            return ""
        return (folders[0] if len(set(folders)) == 1 else posixpath.commonpath(folders)) + "/"


def best_rows(stats: list[tuple[float, float | None, int] | None], better: str | None) -> set[int]:
    """The indices of the entries to bold among `stats` ((mean, std or None, n) per row, None: no
    entry).

    All single runs: every entry equal to the best value (today's rule). Otherwise the best mean
    only, and only where its gap to the next-best mean is larger than both their stds (a missing
    std counts as 0); a lone entry is the best. better: "high", "low" or None (nothing is bold)."""
    if better not in ("high", "low"):
        return set()
    sign = 1.0 if better == "high" else -1.0
    cand = sorted(((i, s) for i, s in enumerate(stats) if s is not None and math.isfinite(s[0])),
                  key=lambda x: -sign * x[1][0])
    if not cand:
        return set()
    top = cand[0][1]
    if all(s[2] < 2 for _, s in cand):
        return {i for i, s in cand if s[0] == top[0]}
    if len(cand) == 1:
        return {cand[0][0]}
    nxt = cand[1][1]
    gap = sign * (top[0] - nxt[0])
    return {cand[0][0]} if gap > (top[1] or 0.0) and gap > (nxt[1] or 0.0) else set()


@dataclass
class Table:
    """title, note (the caption), columns, rows: (label, results of that row by stage,
    is_baseline); row_header: the first column's header."""
    title: str
    note: str
    columns: list[Column]
    rows: list[tuple[str, dict, bool]]
    row_header: str = "method"

    def cells(self) -> list[list[Cell]]:
        out = []
        for _, res, _ in self.rows:
            found = [values(res, c.stage, c.getter, c.per_seed) for c in self.columns]
            failed = [sum(1 for r in res.get(c.stage) or [] if r.get("failed"))
                      for c in self.columns]
            out.append([Cell([v for v, _ in f], [r for _, r in f], n)
                        for f, n in zip(found, failed)])
        return out

    def bold(self, cells: list[list[Cell]]) -> list[set[int]]:
        """Per column, the rows to bold (baselines never are)."""
        out = []
        for j, c in enumerate(self.columns):
            stats = [None if is_base or not row[j].values else (*row[j].stats(), row[j].n)
                     for (_, _, is_base), row in zip(self.rows, cells)]
            out.append(best_rows(stats, c.better))
        return out

    def counts(self, cells: list[list[Cell]]) -> str:
        """'n=3' when every run-backed row has the same number of runs, else 'n=3 (erm, ...), n=1
        (random init)'."""
        by_n: dict[int, list[str]] = {}
        for (label, _res, _), row in zip(self.rows, cells):
            # computed rows (chance) are no runs
            if any(r.get("folder") for cell in row for r in cell.runs):
                by_n.setdefault(max(cell.n for cell in row), []).append(label)
        if len(by_n) <= 1:
            return "".join(f"n={n}" for n in by_n)
        return ", ".join(f"n={n} ({', '.join(labels)})"
                         for n, labels in sorted(by_n.items(), reverse=True))

    def markdown(self) -> str:
        cells = self.cells()
        bold = self.bold(cells)
        arrow = {"high": " ↑", "low": " ↓", None: ""}
        spread = any(cell.n > 1 for row in cells for cell in row)
        n = self.counts(cells)
        caption = self.note + (f" Entries: mean ± sample std (ddof = 1) over the runs, {n}."
                               if spread else
                               (f" One run per entry ({n})." if n else ""))
        lines = [f"### {self.title}", "", caption, "",
                 f"| {self.row_header} | "
                 + " | ".join(c.header + arrow[c.better] for c in self.columns) + " |",
                 "|---|" + "---:|" * len(self.columns)]
        for i, ((label, _, is_base), row) in enumerate(zip(self.rows, cells)):
            texts = []
            for j, (c, cell) in enumerate(zip(self.columns, row)):
                text = cell.text(c.fmt)
                if cell.values and cell.link():
                    text = f"[{text}]({cell.link()})"
                texts.append(f"**{text}**" if i in bold[j] else text)
            lines.append(f"| {'*' + label + '*' if is_base else label} | " + " | ".join(texts)
                         + " |")
        return "\n".join(lines + ["", RULE_SPREAD if spread else RULE_ONE]) + "\n"

    def summary(self) -> dict:
        """The table as data: per row and column the per-run values (with their folders and seeds),
        mean, std, n and whether the entry is bold."""
        cells = self.cells()
        bold = self.bold(cells)
        rows = {}
        for i, ((label, _, is_base), row) in enumerate(zip(self.rows, cells)):
            entry: dict = {"baseline": is_base}
            for j, (c, cell) in enumerate(zip(self.columns, row)):
                mean, std = cell.stats() or (None, None)
                entry[c.header] = {"values": [_finite(v) for v in cell.values],
                                   "mean": _finite(mean), "std": _finite(std), "n": cell.n,
                                   "bold": i in bold[j],
                                   "runs": [{"folder": r.get("folder"), "seeds": r.get("seeds")}
                                            for r in cell.runs]}
            rows[label] = entry
        return {"columns": {c.header: {"better": c.better} for c in self.columns}, "rows": rows}


def _finite(v):
    return v if v is None or math.isfinite(v) else None


def method_rows(results: dict, stages_with_baselines: set[str]) -> list:
    rows = [(m, res, False) for m, res in results["methods"].items()]
    base = results.get("baselines") or {}
    if any(k in base for k in stages_with_baselines):
        rows.append(("random init", base, True))
    return rows


def first(results: dict, stage: str, key: str):
    """`key` of the first run of `stage` (over the methods) whose metrics hold it."""
    for res in results["methods"].values():
        for run in res.get(stage) or []:
            m = run.get("metrics")
            if isinstance(m, dict) and m.get(key) is not None:
                return m[key]
    return None


# the pretraining dataset kind (mixup_transfer/pipeline/stages.py `pretrain`) -> (layout name, its
# evaluation split)
LAYOUTS = {"imagenet": ("ImageNet", "validation"), "cifar10": ("CIFAR-10", "test"),
           "cifar100": ("CIFAR-100", "test"), "tinyimagenet": ("TinyImageNet", "validation")}


def layout(results: dict) -> tuple[str, str]:
    """(layout name, evaluation split) of the methods' pretraining data; ImageNet when the runs do
    not say."""
    return LAYOUTS.get(first(results, "pretrain", "dataset"), LAYOUTS["imagenet"])


def classification_table(results: dict) -> Table:
    name, split = layout(results)
    num_classes = first(results, "pretrain", "num_classes")
    rows = [(m, r, False) for m, r in results["methods"].items()]
    if num_classes:
        chance = const("pretrain", {"top1": 100.0 / num_classes,
                                    "top5": min(100.0, 500.0 / num_classes)})
        rows.append((f"chance ({num_classes} classes)", chance, True))
    return Table(
        f"Classification ({name} layout, {split})",
        f"Pretraining on the {name}-layout training set.",
        [Column("top-1 acc (%)", "pretrain", lambda m: get(m, "top1")),
         Column("top-5 acc (%)", "pretrain", lambda m: get(m, "top5")),
         Column("train time (s)", "pretrain", lambda m: get(m, "train_time_s"), better=None,
                fmt="{:.0f}")],
        rows)


def detection_key(name: str) -> str:
    return "AP" if "coco" in name else "mAP"


def detection_table(results: dict, dets: list[str]) -> Table:
    cols = []
    for name in dets:
        key = detection_key(name)
        cols.append(Column(f"{name} {key} (%)", name, lambda m, key=key: get(m, key),
                           per_seed=True))
        if key == "AP":
            cols.append(Column(f"{name} AP50 (%)", name, lambda m: get(m, "AP50"), per_seed=True))
        cols.append(Column(f"{name} train (images/s)", name, lambda m: get(m, "train_img_per_s"),
                           better="high", fmt="{:.1f}", per_seed=True))
        cols.append(Column(f"{name} test (images/s)", name, lambda m: get(m, "test_img_per_s"),
                           better="high", fmt="{:.1f}", per_seed=True))
    return Table(
        "Detection transfer (MultiMix Table 5 layout)",
        "SSD fine-tuned on VOC07+12 trainval, scored on VOC07 test (11-point mAP at IoU 0.5); "
        "Faster R-CNN fine-tuned on COCO train, scored on val (COCO AP). The runs of an entry: "
        "pretraining seeds × transfer seeds × the detection config's own seeds. The *random "
        "init* row trains the same detector from a randomly initialised backbone with trainable "
        "BatchNorm.", cols, method_rows(results, set(dets)))


def wsol_table(results: dict) -> Table:
    rows = method_rows(results, {"wsol"})
    centred = first(results, "wsol", "centred_box")
    # the same box for every image: BoxAcc at IoU 50 and the mean over 30/50/70
    if isinstance(centred, dict):
        rows.append(("centred box", const("wsol", {"maxboxacc_v1": get(centred, "boxacc", "50"),
                                                   "maxboxacc_v2": get(centred, "boxacc_mean")}),
                                                   True))
    return Table(
        "Weakly-supervised localization (CUB layout, AlignMix Table 4 / multi-mix Table VI)",
        "CAM of a ResNet with layer4 at stride 1, fine-tuned on CUB train without boxes; "
        "MaxBoxAcc is the best-threshold BoxAcc of the largest contour at IoU 50, MaxBoxAccV2 "
        "mean over IoU 30/50/70 of the best-threshold BoxAcc (all contours); Top-1 Loc at the "
        "fixed CAM threshold. The *centred box* row predicts one centred box for every image.",
        [Column("top-1 cls (%)", "wsol", lambda m: get(m, "top1_cls")),
         Column("MaxBoxAcc (%)", "wsol", lambda m: get(m, "maxboxacc_v1")),
         Column("MaxBoxAccV2 (%)", "wsol", lambda m: get(m, "maxboxacc_v2")),
         Column("Top-1 Loc (%)", "wsol", lambda m: get(m, "top1_loc")),
         Column("GT-known Loc (%)", "wsol", lambda m: get(m, "gt_known_loc"))], rows)


def background_table(results: dict) -> Table | None:
    """None when no run has the background suite (CIFAR has no boxes)."""
    if not any(get(run.get("metrics") or {}, "background", "replace", "top1_err") is not None
               for r in results["methods"].values() for run in r.get("robustness") or []):
        return None
    rows = [(m, r, False) for m, r in results["methods"].items()]
    return Table(
        "Background corruption (multi-mix Table V protocol)",
        "Top-1 / top-5 error on the ImageNet-layout validation set, clean and with everything "
        "outside the GT boxes replaced by another image or with N(0, 0.1²) noise added; Loc: "
        "top-1 localization (CAM at 0.25 of max, IoU ≥ 0.5).",
        [Column("clean top-1 err (%)", "robustness", lambda m: get(m, "clean", "top1_err"),
                better="low"),
         Column("clean top-5 err (%)", "robustness", lambda m: get(m, "clean", "top5_err"),
                better="low"),
         Column("replace top-1 err (%)", "robustness",
                lambda m: get(m, "background", "replace", "top1_err"), better="low"),
         Column("noise top-1 err (%)", "robustness",
                lambda m: get(m, "background", "noise", "top1_err"), better="low"),
         Column("clean Loc (%)", "robustness", lambda m: get(m, "background", "clean_loc")),
         Column("replace Loc (%)", "robustness",
                lambda m: get(m, "background", "replace", "top1_loc")),
         Column("noise Loc (%)", "robustness",
                lambda m: get(m, "background", "noise", "top1_loc"))], rows)


def calibration_adversarial_table(results: dict, with_clean: bool = False) -> Table:
    """with_clean: also the clean top-1 error (when no background table shows it)."""
    rows = [(m, r, False) for m, r in results["methods"].items()]
    clean = [Column("clean top-1 err (%)", "robustness", lambda m: get(m, "clean", "top1_err"),
                    better="low")]
    iters = next((get(run.get("metrics") or {}, "pgd", "iters")
                  for r in results["methods"].values()
                  for run in r.get("robustness") or []
                  if get(run.get("metrics") or {}, "pgd", "iters")), 10)
    return Table(
        "Calibration and adversarial robustness (AlignMix / MultiMix tables)",
        "ECE and overconfidence error with 10 bins; top-1 error under FGSM (ε = 8/255) and PGD "
        f"(ε = 4/255, step 2/255, {iters:g} iterations, random start), pixel space.",
        clean * with_clean
        + [Column("ECE (%)", "robustness", lambda m: get(m, "calibration", "ece"), better="low"),
         Column("OE (%)", "robustness", lambda m: get(m, "calibration", "oe"), better="low"),
         Column("FGSM top-1 err (%)", "robustness", lambda m: get(m, "fgsm", "top1_err"),
                better="low"),
         Column("PGD top-1 err (%)", "robustness", lambda m: get(m, "pgd", "top1_err"),
                better="low")], rows)


def ood_sets(results: dict) -> list[str]:
    """The OOD set names of the methods' robustness runs, in first-seen order."""
    sets = []
    for r in results["methods"].values():
        for run in r.get("robustness") or []:
            ood = (run.get("metrics") or {}).get("ood") or {}
            sets += [s for s in ood if isinstance(ood.get(s), dict) and s not in sets]
    return sets


def ood_table(results: dict, only: list[str] | None = None) -> Table | None:
    """All OOD sets in one table, or (`only`) those sets: the report gives each set its own table
    when there are more than three."""
    sets = [s for s in ood_sets(results) if only is None or s in only]
    if not sets:
        return None
    cols = [Column(f"{s} {head}", "robustness", lambda m, s=s, key=key: get(m, "ood", s, key))
            for s in sets
            for key, head in (("det_acc", "det acc (%)"), ("det_acc_at_thr", "det acc @thr (%)"),
                                            ("auroc", "AUROC (%)"), ("aupr_in", "AUPR-in (%)"),
                                            ("aupr_out", "AUPR-out (%)"))]
    rows = [(m, r, False) for m, r in results["methods"].items()]
    return Table(
        "Out-of-distribution detection (maximum softmax "
        "probability)" + (f": {', '.join(sets)}" if only else ""),
        f"In-distribution: the {' '.join(layout(results))} set; OOD: the listed folders and "
        "synthetic noise. det acc: the best threshold; det acc @thr: at the stated max-softmax "
        "threshold (0.5: AlignMix §4.3 \"Det Acc using a threshold of 0.5\", the papers' "
        "column). Chance is 50 for detection accuracy and AUROC (%).", cols, rows)


def embedding_table(results: dict) -> Table | None:
    """Alignment / uniformity per method (MultiMix §4.4), or None when no method ran the embedding
    suite."""
    def emb(run):
        return (run.get("metrics") or {}).get("embedding") or {}
    rows = [(m, r, False) for m, r in results["methods"].items()
            if any(get(emb(run), "uniformity") is not None for run in r.get("robustness") or [])]
    if not rows:
        return None
    e = next(emb(run) for run in rows[0][1]["robustness"] if emb(run))
    norm = "L2-normalised" if e.get("normalized", True) else "unnormalised"
    return Table(
        "Embedding space: alignment and uniformity (MultiMix §4.4)",
        f"Wang & Isola (2020) on the {norm} validation-set embeddings (the classifier's input): "
        f"alignment = mean ||f(x) - f(y)||^{e.get('alpha', 2):g} over pairs of the same class, "
        f"uniformity = log mean exp(-{e.get('t', 2):g} ||f(x) - f(y)||^2) over all pairs. Lower "
        "is better for both.",
        [Column("alignment", "robustness", lambda m: get(m, "embedding", "alignment"),
                better="low", fmt="{:.3f}"),
         Column("uniformity", "robustness", lambda m: get(m, "embedding", "uniformity"),
                better="low", fmt="{:.3f}"),
         Column("images", "robustness", lambda m: get(m, "embedding", "n"), better=None,
                fmt="{:.0f}"),
         Column("dim", "robustness", lambda m: get(m, "embedding", "dim"), better=None,
                fmt="{:.0f}")], rows)
