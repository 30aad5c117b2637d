"""PNG figures of a WSOL run: CAM overlays with boxes, BoxAcc vs threshold, loc vs epoch."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from mixup_transfer.core.basics import save_figure  # noqa: E402

__all__ = ["cam_grid", "boxacc_curves", "loc_curve"]


def _box_patch(box, color):
    x0, y0, x1, y1 = (float(v) for v in box)
    return Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=1.5)


def cam_grid(examples, path, cols: int = 4, class_names=None) -> Path:
    """examples: dicts with image [H, W, 3] in [0, 1], cam [H, W] in [0, 1], gt [K, 4], pred_boxes
    [M, 4] (all in the CAM's frame). GT boxes green, predicted red."""
    n = max(1, len(examples))
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, ex in zip(axes.ravel(), examples, strict=False):
        img = np.clip(ex["image"], 0, 1)
        cam = ex["cam"]
        if img.shape[:2] != cam.shape:
            import cv2
            img = cv2.resize(img, (cam.shape[1], cam.shape[0]), interpolation=cv2.INTER_LINEAR)
        ax.imshow(img)
        ax.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        for b in ex.get("gt", []):
            ax.add_patch(_box_patch(b, "lime"))
        for b in ex.get("pred_boxes", []):
            ax.add_patch(_box_patch(b, "red"))
        name = (class_names[ex["label"]] if class_names else str(ex["label"]))
        mark = "ok" if ex.get("pred") == ex["label"] else f"pred {ex.get('pred')}"
        ax.set_title(f"{name[:18]} ({mark})", fontsize=8)
    fig.suptitle("CAM (jet), GT boxes (green), boxes at the best IoU-50 threshold (red)",
                 fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=80)
    plt.close(fig)
    return path


def boxacc_curves(thresholds, box_acc: dict, path, title: str = "BoxAcc vs CAM threshold") -> Path:
    """box_acc: {label: [T] percent}."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, acc in box_acc.items():
        acc = np.asarray(acc)
        ax.plot(thresholds, acc, label=f"{label} (max {acc.max():.1f})")
    ax.set_xlabel("CAM threshold")
    ax.set_ylabel("BoxAcc (%)")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=90)
    plt.close(fig)
    return path


def loc_curve(curve: list[dict], path,
              keys=("maxboxacc_v2", "top1_loc", "gt_known_loc", "top1_cls")) -> Path:
    """curve: one dict per evaluated epoch with "epoch" and metric keys (percent)."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    epochs = [c["epoch"] for c in curve]
    for k in keys:
        if curve and k in curve[0]:
            ax.plot(epochs, [c[k] for c in curve], marker="o", label=k)
    ax.set_xlabel("fine-tuning epoch")
    ax.set_ylabel("%")
    ax.set_title("Localization vs fine-tuning epoch", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=90)
    plt.close(fig)
    return path
