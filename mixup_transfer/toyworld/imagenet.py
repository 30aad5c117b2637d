"""The ImageNet-layout toy world: ``train/<wnid>/<wnid>_<k>.JPEG``,
``val/<wnid>/ILSVRC2012_val_XXXXXXXX.JPEG``, val boxes as PASCAL-style XML (``val_boxes/*.xml``)
and as Kaggle's ``LOC_val_solution.csv``, ``LOC_synset_mapping.txt``. One main object (25-60% of
the image side), sometimes a second instance."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mixup_transfer.toyworld.render import (
    image_size,
    map_tasks,
    place_objects,
    render_scene,
    write_lines,
    write_xml,
    xml_box,
    xml_tree,
)
from mixup_transfer.toyworld.vocab import (
    IMAGENET_CLASSES,
    PRESETS,
    WORLDS,
    image_rng,
    imagenet_wnids,
)


def imagenet_scene(seed: int, val: bool, index: int, label: int, preset: str = "demo"):
    """One ImageNet-world image: the class's object (radius 12.5-30% of the side = 25-60% box
    side), sometimes (15%) a smaller second instance of the same class."""
    cfg = PRESETS[preset]
    rng = image_rng(seed, WORLDS["imagenet_val"] if val else WORLDS["imagenet_train"], index)
    size = image_size(rng, cfg["imagenet_size"])
    fracs = [(0.125, 0.3)] + ([(0.09, 0.15)] if rng.random() < 0.15 else [])
    placed = place_objects(rng, size, fracs, inside=1.0, max_iou=0.05)
    cls = IMAGENET_CLASSES[label]
    return render_scene(rng, size, [dict(cls=cls, center=c, radius=r) for c, r in placed])

def write_imagenet(out: Path, seed: int, preset: str, workers: int, progress: bool) -> dict:
    cfg = PRESETS[preset]
    root = out / "imagenet"
    wnids = imagenet_wnids(len(IMAGENET_CLASSES))
    C, ntr, nva = len(wnids), cfg["imagenet_train"], cfg["imagenet_val"]
    tasks = []
    for k, wnid in enumerate(wnids):
        for j in range(ntr):
            path = root / "train" / wnid / f"{wnid}_{j + 1}.JPEG"
            tasks.append((imagenet_scene, str(path), (seed, False, k * ntr + j, k, preset),
                          IMAGENET_CLASSES, False))
    map_tasks(tasks, workers, "imagenet/train", progress)
    # val: numbered in a shuffled class order, as in ILSVRC2012, then filed into class folders
    order = np.random.default_rng([seed, WORLDS["splits"], 1]).permutation(C * nva)
    val_tasks, stems = [], []
    for i in range(C * nva):
        label = int(order[i]) % C
        stem = f"ILSVRC2012_val_{i + 1:08d}"
        stems.append((stem, label))
        path = root / "val" / wnids[label] / f"{stem}.JPEG"
        val_tasks.append((imagenet_scene, str(path), (seed, True, i, label, preset),
                          IMAGENET_CLASSES, False))
    recs = map_tasks(val_tasks, workers, "imagenet/val", progress)
    csv = ["ImageId,PredictionString"]
    n_boxes = 0
    for (stem, _label), rec in zip(stems, recs):
        objs = [(wnids[lab], o) for lab, o in zip(rec["labels"], rec["objects"])]
        n_boxes += len(objs)
        write_xml(
            root / "val_boxes" / f"{stem}.xml",
            xml_tree("val", stem, (rec["height"], rec["width"]), objs, "ILSVRC_2012"),
        )
        csv.append(
            f"{stem},"
            + " ".join(f"{name} " + " ".join(str(v) for v in xml_box(o["box"]))
                       for name, o in objs)
        )
    write_lines(root / "LOC_val_solution.csv", csv)
    write_lines(
        root / "LOC_synset_mapping.txt",
        [f"{w} {c.description}" for w, c in zip(wnids, IMAGENET_CLASSES)]
    )
    return {
        "path": "imagenet",
        "classes": wnids,
        "class_names": [c.description for c in IMAGENET_CLASSES],
        "num_classes": C,
        "num_train": C * ntr,
        "num_val": C * nva,
        "num_val_boxes": n_boxes,
    }
