"""The TinyImageNet-200-layout toy world (64 x 64 JPEGs), ``tiny-imagenet-200/``:

- ``wnids.txt`` (the 200 wnids), ``words.txt`` (``wnid<TAB>names``);
- ``train/<wnid>/images/<wnid>_<k>.JPEG`` with ``train/<wnid>/<wnid>_boxes.txt``
  (``file<TAB>x0<TAB>y0<TAB>x1<TAB>y1``);
- ``val/images/val_<i>.JPEG`` with ``val/val_annotations.txt``
  (``file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1``);
- ``test/images/test_<i>.JPEG`` (unlabelled, as in the real release).

Box corners are 0-based inclusive pixel indices (the real files' 0..63 range): the tight box x0,
y0, x1, y1 of the toolkit is written as x0, y0, x1 - 1, y1 - 1. The classes are the first 200 of
``vocab.small_image_classes`` (the ImageNet world's ten first, with the ImageNet world's wnids).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mixup_transfer.toyworld.cifar import small_scene
from mixup_transfer.toyworld.render import _write_jpeg, write_lines
from mixup_transfer.toyworld.vocab import PRESETS, WORLDS, imagenet_wnids, small_image_classes

TINY_SIDE, TINY_CLASSES = 64, 200


def tiny_box(box) -> tuple[int, int, int, int]:
    """Toolkit box -> TinyImageNet's 0-based inclusive corners."""
    x0, y0, x1, y1 = box
    return int(round(x0)), int(round(y0)), int(round(x1)) - 1, int(round(y1)) - 1


def _scene(seed: int, world: str, index: int, label: int):
    return small_scene(seed, WORLDS[world], index, label, TINY_CLASSES, TINY_SIDE)


def _box_line(name: str, obj, wnid: str | None = None) -> str:
    return "\t".join([name] + ([wnid] if wnid else []) + [str(v) for v in tiny_box(obj.box)])


def write_tinyimagenet(out: Path, seed: int, preset: str) -> dict:
    cfg, classes = PRESETS[preset], small_image_classes(TINY_CLASSES)
    root, wnids = out / "tiny-imagenet-200", imagenet_wnids(TINY_CLASSES)
    write_lines(root / "wnids.txt", wnids)
    write_lines(root / "words.txt", [f"{w}\t{c.name}" for w, c in zip(wnids, classes)])
    ntr = cfg["tiny_train"]
    for k, wnid in enumerate(wnids):
        lines = []
        for j in range(ntr):
            name = f"{wnid}_{j}.JPEG"
            img, objs = _scene(seed, "tiny_train", k * ntr + j, k)
            _write_jpeg(root / "train" / wnid / "images" / name, img)
            lines.append(_box_line(name, objs[0]))
        write_lines(root / "train" / wnid / f"{wnid}_boxes.txt", lines)
    n_val = TINY_CLASSES * cfg["tiny_val"]
    order = np.random.default_rng([seed, WORLDS["splits"], 4]).permutation(n_val)
    ann = []
    for i in range(n_val):
        label = int(order[i]) % TINY_CLASSES
        img, objs = _scene(seed, "tiny_val", i, label)
        _write_jpeg(root / "val" / "images" / f"val_{i}.JPEG", img)
        ann.append(_box_line(f"val_{i}.JPEG", objs[0], wnids[label]))
    write_lines(root / "val" / "val_annotations.txt", ann)
    for i in range(TINY_CLASSES // 20):  # a few unlabelled test images, as the real release has
        label = int(np.random.default_rng([seed, WORLDS["splits"], 5, i]).integers(TINY_CLASSES))
        _write_jpeg(root / "test" / "images" / f"test_{i}.JPEG",
                    _scene(seed, "tiny_val", n_val + i, label)[0])
    return {"path": root.name, "num_classes": TINY_CLASSES, "num_train": TINY_CLASSES * ntr,
            "num_val": n_val, "classes": wnids[:10] + ["..."]}
