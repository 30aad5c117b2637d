"""Detection augmentation through albumentations, boxes kept consistent by its bbox machinery.

Boxes follow the toolkit's convention (float ``x0, y0, x1, y1`` continuous pixels), which is
albumentations' ``pascal_voc`` format. Two recipes:

- SSD (Liu et al. 2016): photometric distortion, zoom-out (``ZoomOut``: image pasted on a canvas up
  to ``max_ratio`` times larger, filled with the mean colour), IoU-constrained random crop
  (``MinIoURandomCrop``), horizontal flip, resize to ``size x size``.
- Faster R-CNN: multi-scale resize of the shorter side (``ResizeShortSide``, capped by the longer
  side), horizontal flip.

Test-time: a plain resize; ``target["scale"] = (sx, sy)`` maps predictions back to the original
image (``x_orig = x / sx``). The random draws of the custom transforms are pure functions
(:func:`sample_zoom_out`, :func:`sample_iou_crop`) of a ``numpy.random.Generator``, which the
transforms take from albumentations (seeded by ``Compose(seed=...)``).
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.core.bbox_utils import denormalize_bboxes, normalize_bboxes

from mixup_transfer.core.data import to_rgb

MEAN_RGB_255 = (123.675, 116.28, 103.53)
SSD_MIN_IOUS = (None, 0.1, 0.3, 0.5, 0.7, 0.9)  # None: keep the whole image


def box_iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes ``a [N, 4]`` and ``b [M, 4]`` (continuous coordinates, no +1) -> ``[N, M]``."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def rcnn_resize_shape(height: int, width: int, short: int, max_size: int) -> tuple[int, int]:
    """(new_h, new_w): shorter side to ``short`` unless the longer side would exceed ``max_size``
    (torchvision/detectron2 rule)."""
    scale = min(short / min(height, width), max_size / max(height, width))
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def sample_zoom_out(height: int, width: int, max_ratio: float, rng: np.random.Generator) -> dict:
    """Canvas ``ratio`` in [1, max_ratio] and the image's top-left offset on it (integers)."""
    ratio = float(rng.uniform(1.0, max_ratio))
    canvas_h, canvas_w = int(height * ratio), int(width * ratio)
    return {"canvas_h": canvas_h, "canvas_w": canvas_w,
            "left": int(rng.integers(0, canvas_w - width + 1)),
            "top": int(rng.integers(0, canvas_h - height + 1))}


def sample_iou_crop(boxes: np.ndarray, height: int, width: int, rng: np.random.Generator,
                    min_ious=SSD_MIN_IOUS, min_scale: float = 0.3, max_trials: int = 50):
    """SSD's crop sampler: pick a mode from ``min_ious``; None keeps the image, otherwise up to
    ``max_trials`` crops with sides in [min_scale, 1] of the image's and aspect ratio in [1/2, 2]
    are drawn until one contains a box centre and has IoU >= the mode's threshold with one of the
    boxes whose centre it contains (the Caffe SSD / torchvision-references rule).

    Returns ``(x0, y0, x1, y1)`` integer crop or None (no crop). ``boxes``: [N, 4] pixels.
    """
    mode = min_ious[int(rng.integers(0, len(min_ious)))]
    if mode is None or len(boxes) == 0:
        return None
    for _ in range(max_trials):
        w = rng.uniform(min_scale * width, width)
        h = rng.uniform(min_scale * height, height)
        if not 0.5 <= h / w <= 2.0:
            continue
        left = rng.uniform(0, width - w)
        top = rng.uniform(0, height - h)
        crop = np.array([int(left), int(top), int(left + w), int(top + h)], dtype=np.float64)
        if crop[2] <= crop[0] or crop[3] <= crop[1]:
            continue
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        inside = (centres > crop[:2]).all(1) & (centres < crop[2:]).all(1)
        if inside.any() and box_iou_np(boxes[inside], crop[None]).max() >= mode:
            return tuple(int(v) for v in crop)
    return None


class ZoomOut(A.DualTransform):
    """Paste the image at a random place on a canvas up to ``max_ratio`` times larger (mean
    colour)."""

    def __init__(self, max_ratio: float = 4.0, fill=MEAN_RGB_255, p: float = 0.5):
        super().__init__(p=p)
        self.max_ratio, self.fill = float(max_ratio), tuple(fill)

    def get_params_dependent_on_data(self, params, data):
        h, w = params["shape"][:2]
        return sample_zoom_out(h, w, self.max_ratio, self.random_generator)

    def apply(self, img, canvas_h, canvas_w, left, top, **params):
        canvas = np.empty((canvas_h, canvas_w, img.shape[2]), dtype=img.dtype)
        canvas[...] = np.round(np.asarray(self.fill, dtype=np.float64)).astype(img.dtype)
        canvas[top:top + img.shape[0], left:left + img.shape[1]] = img
        return canvas

    def apply_to_bboxes(self, bboxes, canvas_h, canvas_w, left, top, **params):
        px = denormalize_bboxes(bboxes, params["shape"][:2])
        px[:, [0, 2]] += left
        px[:, [1, 3]] += top
        return normalize_bboxes(px, (canvas_h, canvas_w))

    def get_transform_init_args_names(self):
        return ("max_ratio", "fill")


class MinIoURandomCrop(A.DualTransform):
    """SSD's IoU-constrained crop (:func:`sample_iou_crop`); boxes whose centre falls outside the
    crop are dropped, the others clipped to it."""

    def __init__(self, min_ious=SSD_MIN_IOUS, min_scale: float = 0.3, max_trials: int = 50,
                 p: float = 1.0):
        super().__init__(p=p)
        self.min_ious, self.min_scale = tuple(min_ious), float(min_scale)
        self.max_trials = int(max_trials)

    def get_params_dependent_on_data(self, params, data):
        h, w = params["shape"][:2]
        bboxes = np.asarray(data.get("bboxes", np.zeros((0, 4))), dtype=np.float64)
        px = denormalize_bboxes(bboxes[:, :4].copy(), (h, w)) if len(bboxes) else np.zeros((0, 4))
        return {"crop": sample_iou_crop(px, h, w, self.random_generator, self.min_ious,
                                        self.min_scale, self.max_trials)}

    def apply(self, img, crop, **params):
        if crop is None:
            return img
        x0, y0, x1, y1 = crop
        return np.ascontiguousarray(img[y0:y1, x0:x1])

    def apply_to_bboxes(self, bboxes, crop, **params):
        if crop is None or len(bboxes) == 0:
            return bboxes
        px = denormalize_bboxes(bboxes.copy(), params["shape"][:2])
        x0, y0, x1, y1 = crop
        centres = (px[:, :2] + px[:, 2:4]) / 2
        keep = (
            (centres[:, 0] > x0)
            & (centres[:, 0] < x1)
            & (centres[:, 1] > y0)
            & (centres[:, 1] < y1)
        )
        px = px[keep]
        px[:, [0, 2]] = np.clip(px[:, [0, 2]], x0, x1) - x0
        px[:, [1, 3]] = np.clip(px[:, [1, 3]], y0, y1) - y0
        return normalize_bboxes(px, (y1 - y0, x1 - x0))

    def get_transform_init_args_names(self):
        return ("min_ious", "min_scale", "max_trials")


class ResizeShortSide(A.DualTransform):
    """Resize so the shorter side is one of ``sizes`` (drawn uniformly) and the longer side <=
    ``max_size``. Normalised boxes are unchanged by a resize, so only the image is touched."""

    def __init__(self, sizes, max_size: int, p: float = 1.0):
        super().__init__(p=p)
        self.sizes = tuple(int(s) for s in (sizes if isinstance(sizes, (list, tuple))
                                            else [sizes]))
        self.max_size = int(max_size)

    def get_params_dependent_on_data(self, params, data):
        h, w = params["shape"][:2]
        short = self.sizes[int(self.random_generator.integers(0, len(self.sizes)))]
        return {"new_shape": rcnn_resize_shape(h, w, short, self.max_size)}

    def apply(self, img, new_shape, **params):
        return cv2.resize(img, (new_shape[1], new_shape[0]), interpolation=cv2.INTER_LINEAR)

    def apply_to_bboxes(self, bboxes, new_shape, **params):
        return bboxes

    def get_transform_init_args_names(self):
        return ("sizes", "max_size")


def _bbox_params(min_visibility: float = 0.0) -> A.BboxParams:
    # min_width/height 1 px drops boxes that a crop or clip reduced to slivers.
    return A.BboxParams(format="pascal_voc", label_fields=["labels", "difficult"], clip=True,
                        min_visibility=min_visibility, min_width=1.0, min_height=1.0)


def ssd_train_augment(size: int, zoom_out_ratio: float = 4.0, zoom_out_p: float = 0.5,
                      flip_p: float = 0.5, photometric: bool = True,
                      seed: int | None = None) -> A.Compose:
    ops = []
    if photometric:
        ops += [A.RandomBrightnessContrast(brightness_limit=32 / 255, contrast_limit=0.5, p=0.5),
                A.HueSaturationValue(hue_shift_limit=18, sat_shift_limit=30, val_shift_limit=0,
                                     p=0.5)]
    if zoom_out_ratio > 1:
        ops.append(ZoomOut(zoom_out_ratio, p=zoom_out_p))
    ops += [MinIoURandomCrop(), A.HorizontalFlip(p=flip_p), A.Resize(size, size)]
    return A.Compose(ops, bbox_params=_bbox_params(), seed=seed)


def rcnn_train_augment(sizes, max_size: int, flip_p: float = 0.5,
                       seed: int | None = None) -> A.Compose:
    return A.Compose([ResizeShortSide(sizes, max_size), A.HorizontalFlip(p=flip_p)],
                     bbox_params=_bbox_params(), seed=seed)


def ssd_test_augment(size: int) -> A.Compose:
    return A.Compose([A.Resize(size, size)], bbox_params=_bbox_params())


def rcnn_test_augment(size: int, max_size: int) -> A.Compose:
    return A.Compose([ResizeShortSide([size], max_size)], bbox_params=_bbox_params())


def augment_seed(seed: int, epoch: int, rank: int = 0, worker: int = 0) -> int:
    """The albumentations seed of one augmentation stream: the run seed, the epoch, the DDP rank
    and the DataLoader worker (0: the main process, k: worker k - 1). Rank 0's main process keeps
    the plain per-epoch seed ``seed * 100003 + epoch``; every other stream is a SeedSequence of the
    four, so no two ranks or workers draw the same crops and flips."""
    if rank == 0 and worker == 0:
        return seed * 100003 + epoch
    return int(np.random.SeedSequence([seed, epoch, rank, worker]).generate_state(1)[0])


class SeedWorker:
    """A DataLoader ``worker_init_fn``: reseeds ``transform``'s albumentations pipeline (the
    worker's own copy) with ``augment_seed(seed, epoch, rank, worker_id + 1)``. Without it every
    worker starts from the copy of the parent's generator and repeats the same draws."""

    def __init__(self, transform: DetectionTransform, seed: int, epoch: int, rank: int):
        self.transform, self.seed, self.epoch, self.rank = transform, seed, epoch, rank

    def __call__(self, worker_id: int) -> None:
        self.transform.augment.set_random_seed(augment_seed(self.seed, self.epoch, self.rank,
                                                            worker_id + 1))


class DetectionTransform:
    """``(PIL image, target) -> (float tensor [3, H, W] in [0, 1], target)`` through an
    albumentations pipeline. The target keeps ``image_id`` and ``size`` (original ``(h, w)``) and
    gains ``scale`` ``(sx, sy)`` = new / original size (exact for the resize-only test pipelines).
    ``drop_difficult`` removes difficult / crowd objects (training)."""

    def __init__(self, augment: A.Compose, drop_difficult: bool = False):
        self.augment, self.drop_difficult = augment, drop_difficult

    def __call__(self, image, target):
        img = np.asarray(image if image.mode == "RGB"
                         else to_rgb(image, str(target.get("image_id", "image"))))
        h, w = img.shape[:2]
        boxes = target["boxes"].numpy().astype(np.float64).reshape(-1, 4)
        labels = target["labels"].numpy().tolist()
        difficult = target["difficult"].numpy().astype(bool).tolist()
        if self.drop_difficult:
            keep = [not d for d in difficult]
            boxes = boxes[np.asarray(keep, dtype=bool)] if len(keep) else boxes
            labels = [lab for lab, k in zip(labels, keep) if k]
            difficult = [d for d, k in zip(difficult, keep) if k]
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
        out = self.augment(image=img, bboxes=boxes, labels=labels, difficult=difficult)
        new = out["image"]
        nh, nw = new.shape[:2]
        tensor = torch.from_numpy(np.ascontiguousarray(new)).permute(2, 0, 1).float().div_(255.0)
        new_target = {
            "boxes": torch.as_tensor(np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)),
            "labels": torch.as_tensor(np.asarray(out["labels"], dtype=np.int64).reshape(-1)),
            "difficult": torch.as_tensor(np.asarray(out["difficult"], dtype=bool).reshape(-1)),
            "image_id": target["image_id"], "size": (h, w), "scale": (nw / w, nh / h)}
        return tensor, new_target


def build_transforms(kind: str, train: bool, size: int, train_sizes=None,
                     max_size: int | None = None, zoom_out_ratio: float = 4.0,
                     photometric: bool = True, flip_p: float = 0.5, seed: int | None = None,
                     drop_difficult: bool = True) -> DetectionTransform:
    """``kind`` = "ssd" | "rcnn". SSD resizes to ``size x size``; R-CNN resizes the shorter side to
    one of ``train_sizes`` (train) or ``size`` (test), the longer side capped at ``max_size``."""
    if kind == "ssd":
        aug = (ssd_train_augment(size, zoom_out_ratio, flip_p=flip_p, photometric=photometric,
                                 seed=seed)
               if train else ssd_test_augment(size))
    elif kind == "rcnn":
        max_size = int(max_size or round(size * 1333 / 800))
        aug = (rcnn_train_augment(train_sizes or [size], max_size, flip_p=flip_p, seed=seed)
               if train
               else rcnn_test_augment(size, max_size))
    else:
        raise ValueError(f"transform kind {kind!r} is not one of ['ssd', 'rcnn']")
    return DetectionTransform(aug, drop_difficult=drop_difficult and train)
