"""Figures of the robustness suites (matplotlib, Agg backend): reliability diagram, corrupted-image
examples with their boxes, OOD score histograms."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mixup_transfer.core.basics import save_figure  # noqa: E402


def reliability_diagram(bins: dict, path, title: str = "", ece: float | None = None) -> Path:
    """Accuracy vs confidence per bin (``calibration.calibration_bins``), gap shaded, counts
    below."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lower, upper = bins["lower"], bins["upper"]
    width = upper - lower
    centers = (lower + upper) / 2
    nz = bins["count"] > 0
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(4.2, 5.2), gridspec_kw={"height_ratios": [3, 1]},
                                  sharex=True)
    ax.bar(lower[nz], bins["accuracy"][nz], width=width[nz], align="edge", color="#4c72b0",
           edgecolor="black", label="accuracy")
    gap_lo = np.minimum(bins["accuracy"], bins["confidence"])
    gap = np.abs(bins["confidence"] - bins["accuracy"])
    ax.bar(lower[nz], gap[nz], bottom=gap_lo[nz], width=width[nz], align="edge", facecolor="none",
           edgecolor="#c44e52", hatch="//", label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    label = title + (f"  ECE {100 * ece:.2f}%" if ece is not None else "")
    ax.set_title(label.strip(), fontsize=9)
    ax.legend(loc="upper left", fontsize=7)
    axc.bar(centers, bins["count"], width=width * 0.9, color="gray")
    axc.set_xlim(0, 1)
    axc.set_xlabel("confidence")
    axc.set_ylabel("count")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def image_grid(rows: dict, path, boxes=None, pred_boxes=None) -> Path:
    """One row per named set of images (``name -> [N, 3, H, W]`` tensor in [0, 1]); GT boxes in
    green, predicted CAM boxes (``name -> list of [4]``) in red."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(rows)
    n = max(int(rows[k].shape[0]) for k in names)
    fig, axes = plt.subplots(len(names), n, figsize=(1.6 * n, 1.7 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        for c in range(n):
            ax = axes[r][c]
            ax.axis("off")
            if c >= rows[name].shape[0]:
                continue
            ax.imshow(rows[name][c].permute(1, 2, 0).clamp(0, 1).cpu().numpy())
            for b in (boxes[c] if boxes is not None else []):
                ax.add_patch(plt.Rectangle((b[0] - 0.5, b[1] - 0.5), b[2] - b[0], b[3] - b[1],
                                           fill=False, color="lime", lw=1))
            if pred_boxes is not None and name in pred_boxes and c < len(pred_boxes[name]):
                b = pred_boxes[name][c]
                ax.add_patch(plt.Rectangle((b[0] - 0.5, b[1] - 0.5), b[2] - b[0], b[3] - b[1],
                                           fill=False, color="red", lw=1))
            if c == 0:
                ax.set_title(name, fontsize=8, loc="left")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def score_histograms(id_scores, ood_scores: dict, path) -> Path:
    """Histograms of the max-softmax score, ID vs each OOD set."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    bins = np.linspace(0, 1, 41)
    ax.hist(np.asarray(id_scores), bins=bins, alpha=0.6, density=True, label="in-distribution")
    for name, s in ood_scores.items():
        ax.hist(np.asarray(s), bins=bins, alpha=0.45, density=True, histtype="stepfilled",
                label=name)
    ax.set_xlabel("max softmax probability")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path
