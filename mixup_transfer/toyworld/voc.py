"""The VOC-devkit toy world: ``VOCdevkit/VOC2007`` (trainval/test) and ``VOC2012`` (trainval), VOC
XML with the 20 VOC class names, 1-4 objects per image, ``truncated`` for objects cut by the
border, ``difficult`` for some small ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mixup_transfer.core.constants import VOC_CLASSES
from mixup_transfer.toyworld.render import (
    map_tasks,
    multi_object_scene,
    write_lines,
    write_xml,
    xml_tree,
)
from mixup_transfer.toyworld.vocab import PRESETS, VOC_OBJECT_CLASSES, WORLDS


def voc_scene(seed: int, year: str, index: int, preset: str = "demo"):
    """Image ``index`` (0-based, in id order) of VOC``year``; objects below a box area of (0.16 *
    min size)^2 pixels are difficult with probability 1/2."""
    cfg = PRESETS[preset]
    world = {"2007": WORLDS["voc2007"], "2012": WORLDS["voc2012"]}[str(year)]
    return multi_object_scene(
        seed,
        world,
        index,
        VOC_OBJECT_CLASSES,
        cfg["voc_size"],
        difficult_area=(0.16 * cfg["voc_size"][0]) ** 2,
    )

def voc_ids(year: str, n: int) -> list[str]:
    """Sorted VOC image ids; image index i of ``voc_scene`` is ``voc_ids(year, n)[i]``.

    2007: ``000001`` ...; 2012: ``2008_000001`` ... spread over the years 2008-2011 like the real
    set."""
    if str(year) == "2007":
        return [f"{i + 1:06d}" for i in range(n)]
    per_year = -(-n // 4)
    return [f"{2008 + i // per_year}_{i % per_year + 1:06d}" for i in range(n)]

def write_voc(out: Path, seed: int, preset: str, workers: int, progress: bool) -> dict:
    cfg = PRESETS[preset]
    devkit = out / "VOCdevkit"
    summary: dict[str, Any] = {
        "path": "VOCdevkit",
        "classes": list(VOC_CLASSES),
        "num_classes": len(VOC_CLASSES),
    }
    for year, world, n_total in (
        ("2007", WORLDS["voc2007"], cfg["voc07_trainval"] + cfg["voc07_test"]),
        ("2012", WORLDS["voc2012"], cfg["voc12_trainval"]),
    ):
        root = devkit / f"VOC{year}"
        ids = voc_ids(year, n_total)
        tasks = [
            (voc_scene, str(root / "JPEGImages" / f"{iid}.jpg"), (seed, year, i, preset),
             VOC_OBJECT_CLASSES, True)
            for i, iid in enumerate(ids)
        ]
        recs = map_tasks(tasks, workers, f"VOC{year}", progress)
        n_obj = n_diff = n_trunc = 0
        for iid, rec in zip(ids, recs):
            objs = [(VOC_CLASSES[lab], o) for lab, o in zip(rec["labels"], rec["objects"])]
            n_obj += len(objs)
            n_diff += sum(o["difficult"] for _, o in objs)
            n_trunc += sum(o["truncated"] for _, o in objs)
            write_xml(
                root / "Annotations" / f"{iid}.xml",
                xml_tree(
                    f"VOC{year}", f"{iid}.jpg", (rec["height"], rec["width"]), objs,
                    f"The VOC{year} Database"
                ),
            )
        rng = np.random.default_rng([seed, WORLDS["splits"], world])
        perm = rng.permutation(n_total)
        splits: dict[str, list[str]] = {}
        if year == "2007":
            test = set(perm[: cfg["voc07_test"]].tolist())
            splits["test"] = [ids[i] for i in range(n_total) if i in test]
            trainval_idx = [i for i in range(n_total) if i not in test]
        else:
            trainval_idx = list(range(n_total))
        val = set(rng.permutation(trainval_idx)[: len(trainval_idx) // 2].tolist())
        splits["trainval"] = [ids[i] for i in trainval_idx]
        splits["train"] = [ids[i] for i in trainval_idx if i not in val]
        splits["val"] = [ids[i] for i in trainval_idx if i in val]
        for name, lst in splits.items():
            write_lines(root / "ImageSets" / "Main" / f"{name}.txt", lst)
        summary[f"VOC{year}"] = {
            "path": f"VOCdevkit/VOC{year}",
            "num_images": n_total,
            "num_objects": n_obj,
            "num_difficult": n_diff,
            "num_truncated": n_trunc,
            "splits": {k: len(v) for k, v in splits.items()},
        }
    return summary
