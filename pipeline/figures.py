"""The report's own figures: summary bars, pretraining curves, the WSOL fine-tuning curve."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def pretrain_curves(run_dir: Path, methods: list[str], out: Path) -> Path | None:
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


def wsol_curves(results: dict, out: Path) -> Path | None:
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


def summary_bars(panels: list[tuple[str, dict[str, float]]], out: Path) -> Path | None:
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


def first_png(folder: Path, patterns: tuple[str, ...]) -> Path | None:
    for pat in patterns:
        hits = sorted(folder.glob(pat)) if folder.exists() else []
        if hits:
            return hits[0]
    return None


