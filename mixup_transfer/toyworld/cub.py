"""The CUB-200-2011 toy world: fine-grained "birds" (one shape; classes differ only in markings and
colours) with the raw CUB files (images.txt, image_class_labels.txt, train_test_split.txt,
classes.txt, bounding_boxes.txt)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mixup_transfer.toyworld.render import image_size, map_tasks, render_scene, write_lines
from mixup_transfer.toyworld.vocab import CUB_CLASSES, PRESETS, WORLDS, image_rng


def cub_scene(seed: int, index: int, label: int, preset: str = "demo"):
    """One bird (box 35-70% of the width) on a cluttered background."""
    cfg = PRESETS[preset]
    rng = image_rng(seed, WORLDS["cub"], index)
    h, w = image_size(rng, cfg["cub_size"])
    s = float(rng.uniform(0.35, 0.7)) * w / 3.3
    cx = float(rng.uniform(1.7 * s, w - 1.7 * s))
    cy = float(rng.uniform(1.1 * s, h - 1.0 * s))
    return render_scene(rng, (h, w), [dict(cls=CUB_CLASSES[label], center=(cx, cy), radius=s)])

def write_cub(out: Path, seed: int, preset: str, workers: int, progress: bool) -> dict:
    cfg = PRESETS[preset]
    root = out / "CUB_200_2011"
    ntr, nte = cfg["cub_train"], cfg["cub_test"]
    folders = [f"{k + 1:03d}.{c.name}" for k, c in enumerate(CUB_CLASSES)]
    tasks, rel, labels, is_train = [], [], [], []
    rng = np.random.default_rng([seed, WORLDS["splits"], WORLDS["cub"]])
    for k, c in enumerate(CUB_CLASSES):
        train_mask = np.zeros(ntr + nte, bool)
        train_mask[rng.permutation(ntr + nte)[:ntr]] = True
        for j in range(ntr + nte):
            idx = len(rel)
            rp = f"{folders[k]}/{c.name}_{j + 1:04d}_{1000 + 37 * idx}.jpg"
            rel.append(rp)
            labels.append(k)
            is_train.append(bool(train_mask[j]))
            tasks.append((cub_scene, str(root / "images" / rp), (seed, idx, k, preset),
                          CUB_CLASSES, False))
    recs = map_tasks(tasks, workers, "CUB", progress)
    write_lines(root / "images.txt", [f"{i + 1} {p}" for i, p in enumerate(rel)])
    write_lines(root / "image_class_labels.txt",
                [f"{i + 1} {lab + 1}" for i, lab in enumerate(labels)])
    write_lines(root / "train_test_split.txt",
                [f"{i + 1} {int(t)}" for i, t in enumerate(is_train)])
    write_lines(root / "classes.txt", [f"{k + 1} {f}" for k, f in enumerate(folders)])
    boxes = []
    for i, rec in enumerate(recs):
        x0, y0, x1, y1 = rec["objects"][0]["box"]
        boxes.append(f"{i + 1} {x0:.1f} {y0:.1f} {x1 - x0:.1f} {y1 - y0:.1f}")
    write_lines(root / "bounding_boxes.txt", boxes)
    return {
        "path": "CUB_200_2011",
        "classes": folders,
        "class_descriptions": [c.description for c in CUB_CLASSES],
        "num_classes": len(folders),
        "num_train": int(sum(is_train)),
        "num_test": len(rel) - int(sum(is_train)),
    }
