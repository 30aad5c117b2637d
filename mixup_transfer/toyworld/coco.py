"""The COCO-layout toy world: ``annotations/instances_{train,val}2017.json`` with non-contiguous
category ids (real COCO ids and names), polygon segmentations, images
``{train,val}2017/000000XXXXXX.jpg``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mixup_transfer.toyworld.render import map_tasks, multi_object_scene
from mixup_transfer.toyworld.vocab import COCO_CATEGORIES, COCO_OBJECT_CLASSES, PRESETS, WORLDS


def coco_scene(seed: int, split: str, index: int, preset: str = "demo"):
    """Image ``index`` (0-based, in id order) of COCO ``split`` ("train2017" or "val2017")."""
    world = {"train2017": WORLDS["coco_train2017"], "val2017": WORLDS["coco_val2017"]}[split]
    return multi_object_scene(seed, world, index, COCO_OBJECT_CLASSES,
                              PRESETS[preset]["coco_size"])

def write_coco(out: Path, seed: int, preset: str, workers: int, progress: bool) -> dict:
    cfg = PRESETS[preset]
    root = out / "coco"
    cats = [{"id": cid, "name": name, "supercategory": sup} for cid, name, sup in COCO_CATEGORIES]
    summary: dict[str, Any] = {
        "path": "coco",
        "categories": [[c["id"], c["name"]] for c in cats],
        "num_classes": len(cats),
    }
    ann_id = 1
    for split, _world, n, first_id, step in (
        ("train2017", WORLDS["coco_train2017"], cfg["coco_train"], 9, 13),
        ("val2017", WORLDS["coco_val2017"], cfg["coco_val"], 139, 7),
    ):
        img_ids = [first_id + step * i for i in range(n)]
        tasks = [
            (coco_scene, str(root / split / f"{iid:012d}.jpg"), (seed, split, i, preset),
             COCO_OBJECT_CLASSES, True)
            for i, iid in enumerate(img_ids)
        ]
        recs = map_tasks(tasks, workers, f"coco/{split}", progress)
        images, anns, ann_id = _coco_records(img_ids, recs, ann_id)
        path = root / "annotations" / f"instances_{split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_coco_file(images, anns, cats)))
        summary[split] = {
            "path": f"coco/{split}",
            "annotations": f"coco/annotations/instances_{split}.json",
            "num_images": len(images),
            "num_objects": len(anns),
        }
    return summary


def _coco_records(img_ids: list[int], recs: list[dict], ann_id: int) -> tuple[list, list, int]:
    """COCO ``images`` and ``annotations`` entries of one split (annotation ids continue from
    ``ann_id``)."""
    images, anns = [], []
    for iid, rec in zip(img_ids, recs):
        images.append(
            {"id": iid, "file_name": f"{iid:012d}.jpg", "width": rec["width"],
             "height": rec["height"], "license": 1}
        )
        for lab, o in zip(rec["labels"], rec["objects"]):
            x0, y0, x1, y1 = o["box"]
            anns.append(
                {
                    "id": ann_id,
                    "image_id": iid,
                    "category_id": COCO_CATEGORIES[lab][0],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": o["area"],
                    "iscrowd": 0,
                    "segmentation": o["segmentation"],
                }
            )
            ann_id += 1
    return images, anns, ann_id


def _coco_file(images: list, anns: list, cats: list) -> dict:
    return {
        "info": {
            "description": "mixup-transfer toy world (COCO layout)",
            "version": "1.0",
            "year": 2017,
            "contributor": "toyworld",
            "date_created": "2017/09/01",
        },
        "licenses": [{"id": 1, "name": "CC0",
                      "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
        "images": images,
        "annotations": anns,
        "categories": cats,
    }
