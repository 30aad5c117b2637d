"""Evaluation datasets: ImageNet-layout val (clean or background-corrupted), OOD image folders and
synthetic noise images.

Every item is an RGB float tensor ``[3, S, S]`` in [0, 1] after "resize the short side to
``resize``, centre-crop ``S``" (torchvision's evaluation transform, done on tensors with
antialiasing so that the boxes can follow exactly). Boxes: float ``[K, 4]`` ``x0, y0, x1, y1`` in
continuous pixel coordinates, transformed along with the image.

Validated on the way in (a `DataError` naming the image or file): the val boxes through
`mixup_transfer.core.data.ImageNetFolder.boxes` (XML `<size>` equal to the image's, boxes of
positive size inside it), then again against the decoded image (`check_boxes`); images that cannot
be decoded; OOD folders that are missing or hold no image. Nothing is skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from torch.utils.data import Dataset

from mixup_transfer.core.data import DataError, read_image
from mixup_transfer.core.smalldata import open_classification

from .corruption import (
    foreground_mask,
    gaussian_noise,
    noise_background,
    partner_index,
    replace_background,
    sample_generator,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
                    ".gif")


def read_rgb(path) -> torch.Tensor:
    """``[3, H, W]`` float in [0, 1] via ``mixup_transfer.core.data.read_image`` (clear error
    naming the file)."""
    return TF.pil_to_tensor(read_image(path)).float().div_(255.0)


def open_val_set(root):
    """The labelled evaluation split of ``root`` in any classification layout
    (``mixup_transfer.core.smalldata``): ImageNet's val (boxes from val_boxes/ or
    LOC_val_solution.csv when present), TinyImageNet's val (with its boxes), CIFAR-10/100's test
    batch (no boxes: clean, calibration, FGSM, PGD and OOD only)."""
    return open_classification(root, "val", boxes="auto")


def base_image(base, i: int) -> torch.Tensor:
    """Image ``i`` of a reader as ``[3, H, W]`` float in [0, 1]: from its ``image(i)`` (in-memory
    CIFAR arrays, TinyImageNet) or its file ``samples[i][0]`` (ImageNet folders)."""
    if hasattr(base, "image"):
        return TF.pil_to_tensor(base.image(i)).float().div_(255.0)
    return read_rgb(base.samples[i][0])


def resized_size(height: int, width: int, resize: int) -> tuple[int, int]:
    """(h, w) after resizing the short side to ``resize`` (torchvision: long = int(resize * long /
    short))."""
    if height <= width:
        return resize, int(resize * width / height)
    return int(resize * height / width), resize


def resize_crop(image: torch.Tensor, boxes: np.ndarray | None, resize: int, crop: int):
    """Resize short side to ``resize`` then centre-crop ``crop`` x ``crop``; boxes follow.

    image: ``[3, H, W]`` float; boxes: ``[K, 4]`` or None. Returns (image ``[3, crop, crop]``,
    boxes ``[K', 4]`` float32 clipped to the crop, boxes left with no area dropped; or None).
    """
    if resize < crop:
        raise ValueError(f"resize ({resize}) must be >= the crop size ({crop})")
    _, h, w = image.shape
    nh, nw = resized_size(h, w, resize)
    out = TF.resize(image, [nh, nw], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    top, left = int(round((nh - crop) / 2.0)), int(round((nw - crop) / 2.0))
    out = out[:, top:top + crop, left:left + crop].clamp_(0.0, 1.0)
    if boxes is None:
        return out, None
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * np.array([nw / w, nh / h, nw / w,
                                                                       nh / h])
    b = b - np.array([left, top, left, top])
    b = np.clip(b, 0.0, float(crop))
    keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    return out, b[keep].astype(np.float32)


def check_boxes(boxes: np.ndarray, height: int, width: int, image_path,
                tol: float = 1.0) -> np.ndarray:
    """Boxes ``[K, 4]`` clipped to the image; DataError naming the image if there are none, or one
    lies outside the ``height`` x ``width`` image by more than ``tol`` pixels or has no area."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if b.shape[0] == 0:
        raise DataError(f"{image_path}: no ground-truth boxes (background corruption and "
                        "localization need the val boxes)")
    bad = ((b[:, 0] < -tol) | (b[:, 1] < -tol) | (b[:, 2] > width + tol) | (b[:, 3] > height + tol)
           | (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1]))
    if bad.any():
        k = int(np.nonzero(bad)[0][0])
        raise DataError(
            f"{image_path}: box {k} {b[k].tolist()} (x0, y0, x1, y1) lies outside the "
            f"{width}x{height} image or has no area")
    return np.clip(b, 0.0, [width, height, width, height]).astype(np.float32)


class ValSet(Dataset):
    """ImageNet-layout validation images, clean or with a corrupted background.

    base: a reader of ``open_val_set`` (``.samples``, ``.boxes(i)``, optionally ``.image(i)``),
    e.g. ``mixup_transfer.core.data.ImageNetFolder(root, split="val")``.
    indices: which val images (positions in ``base``) to serve.
    corruption: None, "replace" or "noise"; at: "eval" corrupts after resize + crop (default),
    "original" corrupts at the stored resolution and then resizes. sigma: noise std in [0, 1] pixel
    units.
    Item: (image ``[3, S, S]``, label, boxes ``[K, 4]`` float32 tensor, base index).
    Per-image draws depend on (seed, base index) only.
    """

    def __init__(self, base, indices, image_size: int, resize: int, corruption: str | None = None,
                 at: str = "eval", sigma: float = 0.1, seed: int = 0, need_boxes: bool = True):
        if corruption not in (None, "replace", "noise"):
            raise ValueError(f"unknown corruption {corruption!r}; valid: None, 'replace', 'noise'")
        if at not in ("eval", "original"):
            raise ValueError(f"corruption resolution must be 'eval' or 'original', got {at!r}")
        if resize < image_size:
            raise ValueError(f"resize ({resize}) must be >= image_size ({image_size})")
        self.base, self.indices = base, [int(i) for i in indices]
        self.image_size, self.resize = image_size, resize
        self.corruption, self.at, self.sigma, self.seed = corruption, at, sigma, seed
        self.need_boxes = need_boxes or corruption is not None

    def __len__(self) -> int:
        return len(self.indices)

    def _boxes(self, i: int) -> np.ndarray:
        return np.asarray(self.base.boxes(i), dtype=np.float32).reshape(-1, 4)

    def _load(self, k: int):
        i = self.indices[k]
        path, label = self.base.samples[i]
        img = base_image(self.base, i)
        _, h, w = img.shape
        boxes = check_boxes(self._boxes(i), h, w,
                            path) if self.need_boxes else np.zeros((0, 4), np.float32)
        return img, boxes, int(label), i

    def __getitem__(self, k: int):
        img, boxes, label, i = self._load(k)
        if self.corruption is not None and self.at == "original":
            img = self._corrupt(img, boxes, i)
        img, boxes = resize_crop(img, boxes, self.resize, self.image_size)
        if self.corruption is not None and self.at == "eval":
            img = self._corrupt(img, boxes, i)
        return img, label, torch.from_numpy(boxes), i

    def corrupted_image(self, k: int):
        """(image, boxes ``[K, 4]`` numpy, label, base index) at the resolution the corruption is
        applied: the stored size for ``at="original"``, the evaluation crop for ``at="eval"`` (for
        PNG export)."""
        if self.at == "eval":
            img, label, boxes, i = self[k]
            return img, boxes.numpy(), label, i
        img, boxes, label, i = self._load(k)
        if self.corruption is not None:
            img = self._corrupt(img, boxes, i)
        return img, boxes, label, i

    def _corrupt(self, img: torch.Tensor, boxes: np.ndarray, i: int) -> torch.Tensor:
        _, h, w = img.shape
        fg = foreground_mask(h, w, boxes)
        if self.corruption == "noise":
            return noise_background(img, fg, gaussian_noise(img.shape, self.sigma, self.seed, i))
        j = partner_index(i, len(self.base.samples), self.seed)
        other = base_image(self.base, j)
        if self.at == "eval":
            other, _ = resize_crop(other, None, self.resize, self.image_size)
        else:
            other = TF.resize(other, [h, w], interpolation=TF.InterpolationMode.BILINEAR,
                              antialias=True).clamp_(0.0, 1.0)
        return replace_background(img, other, fg)


def collate(batch):
    """Stack images and labels; keep the variable-length boxes as a list."""
    images, labels, boxes, idx = zip(*batch)
    return (
        torch.stack(images),
        torch.tensor(labels, dtype=torch.int64),
        list(boxes),
        torch.tensor(idx),
    )


def list_images(root) -> list[Path]:
    """Every image file under ``root`` (recursive, sorted); an error naming the folder if there is
    none."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"OOD folder {root} does not exist or is not a directory")
    files = sorted(Path(d) / f for d, _, fs in os.walk(root) for f in fs
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise DataError(f"OOD folder {root} contains no images (looked recursively for "
                        f"{', '.join(IMAGE_EXTENSIONS)})")
    return files


OOD_TRANSFORMS = ("eval", "crop", "resize")


def ood_transform(image: torch.Tensor, mode: str, image_size: int, resize: int,
                  path="") -> torch.Tensor:
    """One OOD image ``[3, H, W]`` -> ``[3, S, S]``.

    mode: ``eval`` the val transform (short side to ``resize``, centre crop S); ``crop`` a centre S
    x S crop at the stored resolution (AlignMix §4.3 "center-cropped to 32 x 32"; a DataError
    naming ``path`` if the image is smaller than S); ``resize`` the whole image squeezed to S x S
    (AlignMix App. C "resizing OOD examples to 32 x 32"). All three are the identity on an S x S
    image.
    """
    if mode == "eval":
        return resize_crop(image, None, resize, image_size)[0]
    _, h, w = image.shape
    if mode == "crop":
        if h < image_size or w < image_size:
            raise DataError(f"{path}: {w}x{h} image is smaller than the "
                            f"{image_size}x{image_size} OOD crop")
        top, left = int(round((h - image_size) / 2.0)), int(round((w - image_size) / 2.0))
        return image[:, top:top + image_size, left:left + image_size].contiguous()
    if mode == "resize":
        if (h, w) == (image_size, image_size):
            return image
        return TF.resize(image, [image_size, image_size],
                         interpolation=TF.InterpolationMode.BILINEAR,
                         antialias=True).clamp_(0.0, 1.0)
    raise ValueError(f"unknown OOD transform {mode!r}; valid: {', '.join(OOD_TRANSFORMS)}")


class ImageFiles(Dataset):
    """Image files as ``[3, S, S]`` through ``ood_transform`` (default: the val resize + crop).
    Item: (image, -1, no boxes, k)."""

    def __init__(self, files, image_size: int, resize: int, mode: str = "eval"):
        if mode not in OOD_TRANSFORMS:
            raise ValueError(f"unknown OOD transform {mode!r}; valid: {', '.join(OOD_TRANSFORMS)}")
        self.files, self.image_size, self.resize, self.mode = list(files), image_size, resize, mode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, k: int):
        img = ood_transform(read_rgb(self.files[k]), self.mode, self.image_size, self.resize,
                            self.files[k])
        return img, -1, torch.zeros(0, 4), k


def ood_folder(root, image_size: int = 32, resize: int | None = None, mode: str = "crop",
               limit: int | None = None) -> ImageFiles:
    """An OOD image folder as the papers' OOD sets are distributed (ODIN, Liang et al. 2018:
    ``LSUN``, ``LSUN_resize``, ``iSUN``, ``Imagenet`` (TinyImageNet crop), ``Imagenet_resize``, 32
    x 32 JPEGs): the images directly in ``root`` or in any sub-folder (``<name>/<name>/*.jpg``,
    ``<name>/test/*.jpg``), found recursively and sorted. ``limit`` keeps that many evenly spaced
    files. A DataError (an InputError) names the folder when it is missing or holds no image."""
    files = list_images(root)
    if limit is not None and limit < len(files):
        keep = sorted(set(np.linspace(0, len(files) - 1, limit).round().astype(int).tolist()))
        files = [files[i] for i in keep]
    return ImageFiles(files, image_size, resize if resize is not None else image_size, mode)


class NoiseImages(Dataset):
    """Synthetic OOD images ``[3, S, S]``: "uniform" U(0, 1) or "gaussian" N(mean, std^2) clipped
    to [0, 1] (defaults mean = std = 0.5, AlignMix App. C).

    Image k is drawn from its own generator (seed, k), so the set does not depend on batching.
    """

    def __init__(self, kind: str, n: int, image_size: int, seed: int = 0, mean: float = 0.5,
                 std: float = 0.5):
        if kind not in ("uniform", "gaussian"):
            raise ValueError(f"unknown noise kind {kind!r}; valid: 'uniform', 'gaussian'")
        self.kind, self.n, self.image_size, self.seed = kind, n, image_size, seed
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int):
        g = sample_generator(self.seed, k, stream=3 if self.kind == "uniform" else 4)
        shape = (3, self.image_size, self.image_size)
        if self.kind == "uniform":
            img = torch.rand(shape, generator=g)
        else:
            img = (torch.randn(shape, generator=g) * self.std + self.mean).clamp_(0.0, 1.0)
        return img, -1, torch.zeros(0, 4), k
