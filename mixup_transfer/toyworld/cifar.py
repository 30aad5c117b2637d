"""The CIFAR-layout toy worlds (32 x 32 images), written as the python-version batches of the real
datasets:

- ``cifar-10-batches-py/``: ``data_batch_1`` .. ``data_batch_5``, ``test_batch``, ``batches.meta``;
- ``cifar-100-python/``: ``train``, ``test``, ``meta``.

Each batch is a pickled dict with bytes keys, as in the real files (b"data" uint8 [N, 3072]: per
row the red, green and blue 32 x 32 planes, row-major; b"labels" or b"fine_labels" /
b"coarse_labels"; b"filenames"; b"batch_label"). The pixels are stored raw, so a reader gets back
exactly what the renderer drew. CIFAR-10's classes are the ImageNet world's, CIFAR-100's the first
100 of ``vocab.small_image_classes`` (coarse label = fine label // 5, 20 superclasses as in
CIFAR-100). One object per image, filling a good part of the frame as CIFAR's objects do.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from mixup_transfer.toyworld.render import place_objects, render_scene
from mixup_transfer.toyworld.vocab import PRESETS, WORLDS, image_rng, small_image_classes

CIFAR_SIDE = 32


def small_scene(seed: int, world: int, index: int, label: int, n_classes: int, side: int):
    """One small-image scene (side x side): the class's object with radius 22-40% of the side,
    lighter clutter than the larger worlds (at 32 px the ImageNet world's distractors would cover
    the object). -> (uint8 [side, side, 3], [SceneObject])."""
    rng = image_rng(seed, world, index)
    placed = place_objects(rng, (side, side), [(0.22, 0.4)], inside=0.8)
    cls = small_image_classes(n_classes)[label]
    return render_scene(rng, (side, side), [dict(cls=cls, center=c, radius=r) for c, r in placed],
                        clutter=0.5, noise=3.0)


def cifar_split(seed: int, n_classes: int, per_class: int,
                test: bool) -> tuple[np.ndarray, list[int]]:
    """The images [N, 32, 32, 3] uint8 and labels of one toy CIFAR split, in a shuffled class order
    (as the real batches are); image i is a pure function of (seed, split, i)."""
    n = n_classes * per_class
    order = np.random.default_rng([seed, WORLDS["splits"], 2 + int(test),
                                   n_classes]).permutation(n)
    labels = [int(k) % n_classes for k in order]
    world = WORLDS["cifar_test" if test else "cifar_train"] * 1000 + n_classes
    images = np.stack([small_scene(seed, world, i, y, n_classes, CIFAR_SIDE)[0]
                       for i, y in enumerate(labels)])
    return images, labels


def _rows(images: np.ndarray) -> np.ndarray:
    """[N, 32, 32, 3] -> [N, 3072]: the R, G, B planes of each image, row-major (CIFAR's
    b"data")."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1))


def _dump(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)


def _names(labels, prefix: str) -> list[bytes]:
    return [f"{prefix}_{i:05d}.png".encode() for i in range(len(labels))]


def write_cifar10(out: Path, seed: int, preset: str) -> dict:
    cfg, classes = PRESETS[preset], small_image_classes(10)
    root = out / "cifar-10-batches-py"
    train, ytr = cifar_split(seed, 10, cfg["cifar_train"], test=False)
    test, yte = cifar_split(seed, 10, cfg["cifar_test"], test=True)
    cuts = np.linspace(0, len(ytr), 6).astype(int)
    for b in range(5):
        sl = slice(cuts[b], cuts[b + 1])
        _dump(root / f"data_batch_{b + 1}",
              {b"batch_label": f"training batch {b + 1} of 5".encode(),
                                              b"labels": ytr[sl], b"data": _rows(train[sl]),
                                              b"filenames": _names(ytr[sl], f"train{b + 1}")})
    _dump(root / "test_batch",
          {b"batch_label": b"testing batch 1 of 1", b"labels": yte, b"data": _rows(test),
                                b"filenames": _names(yte, "test")})
    _dump(root / "batches.meta", {b"num_cases_per_batch": int(cuts[1]), b"num_vis": 3072,
                                  b"label_names": [c.name.encode() for c in classes]})
    return {"path": root.name, "num_classes": 10, "num_train": len(ytr), "num_test": len(yte),
            "classes": [c.name for c in classes]}


def write_cifar100(out: Path, seed: int, preset: str) -> dict:
    cfg, classes = PRESETS[preset], small_image_classes(100)
    root = out / "cifar-100-python"
    counts = {"train": max(2, cfg["cifar_train"] // 5), "test": max(1, cfg["cifar_test"] // 5)}
    sizes = {}
    for split, per_class in counts.items():
        images, fine = cifar_split(seed, 100, per_class, test=split == "test")
        _dump(root / split,
              {b"filenames": _names(fine, split),
               b"batch_label": f"{split}ing batch 1 of 1".encode(),
                             b"fine_labels": fine, b"coarse_labels": [y // 5 for y in fine],
                             b"data": _rows(images)})
        sizes[split] = len(fine)
    _dump(root / "meta", {b"fine_label_names": [c.name.encode() for c in classes],
                          b"coarse_label_names": [f"superclass {k}".encode() for k in range(20)]})
    return {"path": root.name, "num_classes": 100, "num_train": sizes["train"],
            "num_test": sizes["test"]}
