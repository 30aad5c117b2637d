"""Toy out-of-distribution folders shaped like the 32 x 32 OOD sets of the CIFAR track (ODIN's
``LSUN``, ``LSUN_resize``, ``iSUN``, ``Imagenet`` (TinyImageNet crop), ``Imagenet_resize``;
AlignMix §4.3 / App. C).

The idea is the toy pipeline's existing OOD set (CUB birds against the ImageNet world's shape
classes): images outside the shape vocabulary. "Scene" sets (LSUN, iSUN) are cluttered backgrounds
with no object; "object" sets (TinyImageNet) are birds, never a shape class. ``crop`` sets take the
centre 32 x 32 of a larger render, ``resize`` sets squeeze the whole render to 32 x 32. Layouts:
``<name>/<name>/*.jpg`` (nested) except iSUN, written flat (``iSUN/*.jpg``), so that both layouts
the reader accepts are exercised.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np

from mixup_transfer.toyworld.render import _write_jpeg, render_scene
from mixup_transfer.toyworld.vocab import CUB_CLASSES, image_rng

# name -> (content, how 32 x 32 is reached, nested folder)
OOD_SETS = {
    "LSUN": ("scene", "crop", True),
    "LSUN_resize": ("scene", "resize", True),
    "iSUN": ("scene", "resize", False),
    "Imagenet": ("object", "crop", True),
    "Imagenet_resize": ("object", "resize", True),
}
_WORLD = 100  # image_rng world ids 100.. (the dataset worlds use 1-8)
_MARKER = ".toy_ood"  # in each set folder this module wrote: a rerun replaces only those


def ood_image(seed: int, set_index: int, index: int, content: str, how: str,
              size: int = 32) -> np.ndarray:
    """One RGB uint8 ``[size, size, 3]`` OOD image; depends on (seed, set, index) only."""
    rng = image_rng(seed, _WORLD + set_index, index)
    side = int(rng.integers(2 * size, 3 * size + 1))
    h, w = side, int(rng.integers(side, int(side * 1.4) + 1))
    spec = []
    if content == "object":
        r = float(rng.uniform(0.3, 0.45)) * min(h, w) / 1.6
        spec = [dict(cls=CUB_CLASSES[int(rng.integers(len(CUB_CLASSES)))], center=(w / 2, h / 2),
                     radius=r, flip=bool(rng.random() < 0.5))]
    img, _ = render_scene(rng, (h, w), spec)
    if how == "crop":
        # a centre crop of half the render's short side, brought to size: the crop keeps the
        # render's scale
        c = min(h, w) // 2
        top, left = (h - c) // 2, (w - c) // 2
        img = img[top:top + c, left:left + c]
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


def write_ood_folders(out, seed: int = 0, n: int = 20, size: int = 32, sets=None) -> dict:
    """Write ``n`` images per OOD set under ``out`` (see ``OOD_SETS``); returns {name: folder} (the
    folder to pass as ``ood: [NAME=FOLDER]``: ``out/<name>``). A set folder from an earlier call is
    replaced; any other existing folder of that name is an error."""
    out = Path(out)
    names = list(OOD_SETS) if sets is None else list(sets)
    unknown = sorted(set(names) - set(OOD_SETS))
    if unknown:
        raise ValueError(f"unknown toy OOD sets {unknown}; valid: {list(OOD_SETS)}")
    folders = {}
    for name in names:
        content, how, nested = OOD_SETS[name]
        k = list(OOD_SETS).index(name)
        if (out / name).exists():
            if not (out / name / _MARKER).is_file():
                raise FileExistsError(f"{out / name} exists and was not written by "
                                      "mixup_transfer.toyworld.ood: not overwriting")
            shutil.rmtree(out / name)
        folder = out / name / name if nested else out / name
        folder.mkdir(parents=True)
        (out / name / _MARKER).write_text("written by "
                                          "mixup_transfer.toyworld.ood.write_ood_folders\n")
        for i in range(n):
            _write_jpeg(folder / f"{name}_{i:05d}.jpg", ood_image(seed, k, i, content, how, size))
        folders[name] = str(out / name)
    return folders
