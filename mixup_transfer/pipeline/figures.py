"""The report's own figures: summary bars (mean, ± std, one dot per run), pretraining curves and
the WSOL fine-tuning curve (one line per run, one colour per method)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mixup_transfer.core.basics import save_figure  # noqa: E402
from mixup_transfer.pipeline.tables import mean_std  # noqa: E402


def _epoch_curve(logf: Path) -> tuple[list, list, list]:
    """(epochs, training losses, val top-1) of a pretraining log.jsonl."""
    ep, loss, acc = [], [], []
    for line in logf.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r.get("event", "epoch") == "epoch" and "epoch" in r and ("val_top1" in r
                                                                    or "top1" in r):
            ep.append(r["epoch"])
            loss.append(r.get("train_loss", r.get("loss")))
            acc.append(r.get("val_top1", r.get("top1")))
    return ep, loss, acc


def pretrain_curves(run_dir: Path, folders: dict[str, list[str]], out: Path) -> Path | None:
    """folders: per method, its pretraining run folders (relative to run_dir); one line per run."""
    curves = {}
    for m, dirs in folders.items():
        for f in dirs:
            logf = run_dir / f / "log.jsonl"
            ep, loss, acc = _epoch_curve(logf) if logf.exists() else ([], [], [])
            if ep:
                curves.setdefault(m, []).append((ep, loss, acc))
    if not curves:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (m, runs) in enumerate(curves.items()):
        style = {"marker": "o", "ms": 3, "color": f"C{i}", "lw": 1.5 if len(runs) == 1 else 1.0}
        for r, (ep, loss, acc) in enumerate(runs):
            label = m if r == 0 else None
            if any(v is not None for v in loss):
                axes[0].plot(ep, loss, label=label, **style)
            axes[1].plot(ep, acc, label=label, **style)
    axes[0].set(xlabel="epoch", ylabel="training loss", title="Pretraining loss")
    axes[1].set(xlabel="epoch", ylabel="val top-1 (%)", title="Pretraining accuracy")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out, dpi=110)
    plt.close(fig)
    return out


def wsol_curves(series: list[tuple[str, list[dict]]], out: Path) -> Path | None:
    """series: (label, the WSOL metrics of each of its runs); one line per run, the label's
    colour."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    drawn = False
    for i, (m, runs) in enumerate(series):
        for r, w in enumerate(runs):
            curve = w.get("curve") or []
            pts = [(c.get("epoch"), c.get("maxboxacc_v2", c.get("top1_loc"))) for c in curve
                   if isinstance(c, dict)]
            pts = [(e, v) for e, v in pts if e is not None and v is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=m if r == 0 else None, color=f"C{i}",
                        ls="--" if m == "random init" else "-")
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(xlabel="fine-tuning epoch", ylabel="MaxBoxAccV2 (%)",
           title="CUB localization vs fine-tuning")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out, dpi=110)
    plt.close(fig)
    return out


def summary_bars(panels: list[tuple[str, dict[str, list[float]]]], out: Path) -> Path | None:
    """panels: (title, per method the values of its runs). Bar: the mean; error bar: the sample std
    (two or more runs); dots: the runs."""
    panels = [(t, {k: v for k, v in vals.items() if v}) for t, vals in panels]
    panels = [(t, v) for t, v in panels if v]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, vals) in zip(axes[0], panels):
        names = list(vals)
        stats = [mean_std(vals[n]) for n in names]
        ax.bar(range(len(names)), [m for m, _ in stats],
               color=[f"C{i}" for i in range(len(names))])
        runs = max(len(v) for v in vals.values())
        if runs > 1:
            ax.errorbar(range(len(names)), [m for m, _ in stats],
                        yerr=[s or 0.0 for _, s in stats], fmt="none", ecolor="black", capsize=3,
                        lw=1)
            for i, n in enumerate(names):  # the runs, beside the error bar
                ax.plot([i + 0.22] * len(vals[n]), vals[n], "o", ms=3, color="black", alpha=0.6)
            title = (f"{title} (n{'=' if len({len(v) for v in vals.values()}) == 1 else '≤'}"
                     f"{runs}, ± std)")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, out, dpi=110)
    plt.close(fig)
    return out


def first_png(folder: Path, patterns: tuple[str, ...]) -> Path | None:
    for pat in patterns:
        hits = sorted(folder.glob(pat)) if folder.exists() else []
        if hits:
            return hits[0]
    return None




def _ablation_x(values: list, scale: str) -> tuple[list, list[str] | None]:
    """x positions of the knob values and, for a categorical axis, their tick labels."""
    if scale == "categorical":
        return list(range(len(values))), [json.dumps(v) for v in values]
    return [float(v) for v in values], None


def ablation_curve(points: list[tuple[object, list[float]]], baseline: list[float] | None,
                   out: Path, xlabel: str, scale: str = "linear", baseline_label: str = "ERM",
                   title: str = "") -> Path:
    """points: (knob value, the top-1 of each of its seeds) in order; scale: log | linear |
    categorical.
    Line: the mean; error bars: the sample std (two or more seeds); dots: the seeds; dashed line
    and band: the baseline's mean ± std."""
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    xs, ticks = _ablation_x([v for v, _ in points], scale)
    stats = [mean_std(vals) if vals else (float("nan"), None) for _, vals in points]
    means = [m for m, _ in stats]
    ax.errorbar(xs, means, yerr=[s or 0.0 for _, s in stats], fmt="-o", ms=4, capsize=3,
                color="C0", lw=1.5, label="mean ± std" if any(s for _, s in stats) else "top-1")
    step = (max(xs) - min(xs)) / max(len(xs) - 1, 1) if len(xs) > 1 else 1.0
    for x, (_, vals) in zip(xs, points):  # the seeds, just right of the error bar
        if len(vals) > 1:
            xd = x * 1.08 if scale == "log" else x + 0.12 * step
            ax.plot([xd] * len(vals), vals, "o", ms=3, color="black", alpha=0.5)
    if baseline:
        bm, bs = mean_std(baseline)
        ax.axhline(bm, ls="--", color="C3", lw=1.2, label=f"{baseline_label} (n={len(baseline)})")
        if bs:
            ax.axhspan(bm - bs, bm + bs, color="C3", alpha=0.12, lw=0)
    if scale == "log":
        ax.set_xscale("log")
        ax.set_xticks(xs, [f"{v:g}" for v in xs])
        ax.minorticks_off()
    elif ticks is not None:
        ax.set_xticks(xs, ticks)
    else:
        ax.set_xticks(xs, [f"{v:g}" for v in xs])
    n = max((len(v) for _, v in points), default=0)
    ax.set(xlabel=xlabel, ylabel="val top-1 (%)",
           title=f"{title} (n={n} seed{'s' if n != 1 else ''})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, out, dpi=110)
    plt.close(fig)
    return out
