"""Figures of a pretraining run."""

from __future__ import annotations

from pathlib import Path

from mixup_transfer.core.basics import save_figure


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    for key in ("train_loss", "val_loss"):
        if all(key in h for h in history):
            a.plot(ep, [h[key] for h in history], marker="o", label=key)
    # the first epoch's val loss can be huge (BN running stats not settled yet)
    a.set_yscale("log")
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.legend()
    for key in ("val_top1", "val_top5", "train_top1"):
        if all(key in h for h in history):
            b.plot(ep, [h[key] for h in history], marker="o", label=key)
    b.set_xlabel("epoch"), b.set_ylabel("accuracy (%)"), b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=110)
    plt.close(fig)
