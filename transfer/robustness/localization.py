"""Top-1 localization with class activation maps (CAM, Zhou et al. 2016).

CAM of class c: ``sum_k w_ck f_k(x, y)`` over the last conv features ``f`` ``[K, h, w]``, upsampled
(bilinear) to the input size, then min-max normalised to [0, 1]. The predicted box is the bounding
           box of
the largest connected region (OpenCV external contour of largest area) of ``cam >= 0.25`` ("0.25 of
max" after the min shift). A sample is localized when the top-1 class is right and the box has IoU
>= 0.5 (the default; ``iou_threshold`` and the comparison ``op`` are options: multi-mix §IV-D
counts IoU > 0.25) with any ground-truth box.

Boxes: float ``x0, y0, x1, y1`` in continuous pixel coordinates of the (evaluation-size) image.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F


def class_activation_maps(features: torch.Tensor, fc_weight: torch.Tensor, classes: torch.Tensor,
                          size: tuple[int, int]) -> torch.Tensor:
    """CAMs ``[B, H, W]`` in [0, 1].

    features: ``[B, K, h, w]`` last conv block output; fc_weight: ``[C, K]`` (one weight per
    channel) or ``[C, K, h, w]`` (per position: a stage-2 head); classes: ``[B]`` int64; size: (H,
    W) of the input image.
    """
    w = fc_weight[classes].to(features.dtype)  # [B, K] or [B, K, h, w]
    if w.ndim == 2:
        cams = torch.einsum("bk,bkhw->bhw", w, features).float()
    else:
        cams = (w * features).sum(1).float()
    cams = F.interpolate(cams[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    flat = cams.flatten(1)
    lo = flat.min(1).values[:, None, None]
    hi = flat.max(1).values[:, None, None]
    return (cams - lo) / (hi - lo).clamp(min=1e-12)


def cam_to_box(cam: np.ndarray, threshold: float = 0.25) -> np.ndarray:
    """Box ``[4]`` (x0, y0, x1, y1) around the largest contour of ``cam >= threshold * cam.max()``.

    cam: ``[H, W]`` float, non-negative. A map with nothing above the threshold (all zero) gives
    the whole image.
    """
    cam = np.asarray(cam, dtype=np.float32)
    h, w = cam.shape
    mask = (cam >= threshold * cam.max()).astype(np.uint8)
    if cam.max() <= 0:
        return np.array([0.0, 0.0, w, h], dtype=np.float32)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return np.array([0.0, 0.0, w, h], dtype=np.float32)
    largest = max(contours, key=cv2.contourArea)
    x, y, bw, bh = cv2.boundingRect(largest)
    # boundingRect counts pixels: columns x .. x + bw - 1 span [x, x + bw) in continuous
    # coordinates
    return np.array([x, y, x + bw, y + bh], dtype=np.float32)


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box ``[4]`` with boxes ``[K, 4]`` (continuous coordinates, area = width *
    height)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    box = np.asarray(box, dtype=np.float64)
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-12)


IOU_OPS = (">=", ">")


def check_iou_op(op: str) -> str:
    """``op`` if it is a valid IoU comparison (``>=`` or ``>``), else ValueError naming the valid
    ones."""
    if op not in IOU_OPS:
        raise ValueError(f"IoU comparison must be one of {list(IOU_OPS)}, got {op!r}")
    return op


def localized(pred_box: np.ndarray, gt_boxes: np.ndarray, iou_threshold: float = 0.5,
              op: str = ">=") -> bool:
    """Best IoU with the ground-truth boxes ``op`` threshold: ``>=`` (default) or ``>`` (strict,
    multi-mix §IV-D "higher than 0.25"). No boxes -> False."""
    check_iou_op(op)
    gt = np.asarray(gt_boxes).reshape(-1, 4)
    if not gt.shape[0]:
        return False
    best = box_iou(pred_box, gt).max()
    return bool(best > iou_threshold if op == ">" else best >= iou_threshold)
