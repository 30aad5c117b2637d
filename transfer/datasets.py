"""Detection datasets in their real on-disk layouts: Pascal VOC devkit and COCO.

Items are `(image, target)`: a PIL RGB image and
    target = {"boxes": float32 [N, 4] x0, y0, x1, y1
                        (mixup_transfer.core.data's convention: VOC xmin-1, xmax),
              "labels": int64 [N] in 1..C (0 is background, torchvision's convention),
              "difficult": bool [N] (VOC difficult flag; COCO iscrowd),
              "image_id": str (VOC) or int (COCO), "size": (height, width)}
and `transform(image, target) -> (image, target)` is applied when given.
With `skip_bad=True`, samples whose annotation is malformed are left out, counted in `.skipped`
(a list of (image id, reason)) and reported once; otherwise they raise `DataError`.

Validated on the way in (a `DataError` naming the file and line, object index or id): split files
without duplicate ids and not empty; XML with a positive `<size>`, 0/1 flags, known class names and
boxes of positive size inside the image; COCO json with unique integer image / annotation /
category ids, positive integer image sizes, known image and category ids, boxes of positive size
inside the image, `area` a number >= 0 and `iscrowd` 0 or 1. File-level problems (ids, the json's
structure) are never skipped, even with `skip_bad`. When an item is read, the image's real size
must equal the annotation's.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from mixup_transfer.core.constants import VOC_CLASSES
from mixup_transfer.core.data import (
    DataError,
    check_box,
    parse_pascal_xml,
    pascal_to_box,
    read_image,
    read_text,
    safe_relative,
)
from transfer.coco_eval import check_coco_annotation, check_coco_gt

log = logging.getLogger(__name__)


parse_voc_xml = parse_pascal_xml  # VOC XML: {"filename", "width", "height", "objects": [...]}


def _target(boxes, labels, difficult, image_id, height, width) -> dict:
    return {"boxes": torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4)),
            "labels": torch.as_tensor(np.asarray(labels, dtype=np.int64)),
            "difficult": torch.as_tensor(np.asarray(difficult, dtype=bool)),
            "image_id": image_id, "size": (int(height), int(width))}


def _report_skipped(name: str, skipped: list) -> None:
    if skipped:
        log.warning("%s: skipped %d bad sample(s), e.g. %s", name, len(skipped), skipped[:3])


class VOCDetection(Dataset):
    """`devkit_root/VOC<year>/{JPEGImages,Annotations,ImageSets/Main/<split>.txt}`."""

    def __init__(self, devkit_root: str | os.PathLike, year: str = "2007", split: str = "trainval",
                 transform: Callable | None = None, keep_difficult: bool = True,
                 classes: tuple[str, ...] = VOC_CLASSES, skip_bad: bool = False):
        self.root = Path(devkit_root) / f"VOC{year}"
        self.year, self.split, self.transform = str(year), split, transform
        self.classes = tuple(classes)
        self.class_to_label = {c: i + 1 for i, c in enumerate(self.classes)}
        list_file = self.root / "ImageSets" / "Main" / f"{split}.txt"
        if not list_file.is_file():
            raise DataError(f"{list_file}: VOC split file not found")
        ids, seen = [], set()
        for lineno, line in enumerate(read_text(list_file).splitlines(), start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 1:
                raise DataError(f"{list_file}:{lineno}: expected one image id, got {line!r}")
            safe_relative(parts[0], f"{list_file}:{lineno}: image id")
            if parts[0] in seen:
                raise DataError(f"{list_file}:{lineno}: duplicate image id {parts[0]!r}")
            seen.add(parts[0])
            ids.append(parts[0])
        if not ids:
            raise DataError(f"{list_file}: empty split (no image ids)")
        self.ids, self.annotations, self.skipped = [], {}, []
        for image_id in ids:
            try:
                self.annotations[image_id] = self._load(image_id, keep_difficult)
                self.ids.append(image_id)
            except DataError as e:
                if not skip_bad:
                    raise
                self.skipped.append((image_id, str(e)))
        _report_skipped(str(list_file), self.skipped)
        if not self.ids:  # the caller decides (a training set needs images: torchvision_backend)
            log.warning("%s: no usable image left (%d skipped as bad)", list_file,
                        len(self.skipped))

    def _load(self, image_id: str, keep_difficult: bool) -> dict:
        xml = self.root / "Annotations" / f"{image_id}.xml"
        ann = parse_voc_xml(xml)
        # the annotation of another image
        if ann["filename"] and Path(ann["filename"]).stem != image_id:
            raise DataError(f"{xml}: <filename> {ann['filename']!r} is not the image {image_id!r}")
        boxes, labels, difficult = [], [], []
        for i, obj in enumerate(ann["objects"]):
            where = f"{xml}: object {i}"
            if obj["name"] not in self.class_to_label:
                raise DataError(f"{where}: unknown class name {obj['name']!r}")
            if obj["difficult"] and not keep_difficult:
                continue
            boxes.append(pascal_to_box(obj["bbox"], ann["width"], ann["height"], where))
            labels.append(self.class_to_label[obj["name"]])
            difficult.append(obj["difficult"])
        ann["target"] = _target(boxes, labels, difficult, image_id, ann["height"], ann["width"])
        return ann

    def image_path(self, image_id: str) -> Path:
        return self.root / "JPEGImages" / f"{image_id}.jpg"

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        image = read_image(self.image_path(image_id))
        ann = self.annotations[image_id]
        if image.size != (ann["width"], ann["height"]):
            raise DataError(f"{self.image_path(image_id)}: image is "
                            f"{image.size[0]}x{image.size[1]} but its annotation says "
                            f"{ann['width']}x{ann['height']}")
        target = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in ann["target"].items()}
        return self.transform(image, target) if self.transform else (image, target)


def voc0712_trainval(devkit_root: str | os.PathLike, transform: Callable | None = None,
                     **kwargs) -> ConcatDataset:
    """voc_2007_trainval + voc_2012_trainval, the usual VOC07+12 training set."""
    return ConcatDataset([VOCDetection(devkit_root, "2007", "trainval", transform, **kwargs),
                          VOCDetection(devkit_root, "2012", "trainval", transform, **kwargs)])


class COCODetection(Dataset):
    """`image_dir/<file_name>` + `annotations/instances_<split>.json`, read through pycocotools.

    Category ids are not contiguous in COCO: labels are 1..C in sorted category-id order, with
    `.label_to_cat` / `.cat_to_label` to map back and forth.
    """

    def __init__(self, image_dir: str | os.PathLike, ann_file: str | os.PathLike,
                 transform: Callable | None = None, remove_empty: bool = False,
                 skip_bad: bool = False):
        from pycocotools.coco import COCO

        self.image_dir, self.ann_file, self.transform = Path(image_dir), Path(ann_file), transform
        if not self.ann_file.is_file():
            raise DataError(f"{self.ann_file}: COCO annotation file not found")
        try:
            data = json.loads(read_text(self.ann_file))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{self.ann_file}: malformed JSON: {e}") from e
        check_coco_gt(data, str(self.ann_file), error=DataError, annotations=False)
        bad = next((i for i, im in enumerate(data["images"])
                    if not isinstance(im.get("file_name"), str)), None)
        if bad is not None:
            raise DataError(f"{self.ann_file}: images[{bad}] (id {data['images'][bad]['id']}): "
                            "missing or bad file_name")
        for i, im in enumerate(data["images"]):
            safe_relative(im["file_name"], f"{self.ann_file}: images[{i}] (id {im['id']}): "
                                           "file_name")
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO()
            self.coco.dataset = data
            self.coco.createIndex()
        self.cat_ids = sorted(self.coco.getCatIds())
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.label_to_cat = {i: c for c, i in self.cat_to_label.items()}
        self.classes = tuple(self.coco.cats[c]["name"] for c in self.cat_ids)
        self.ids, self.targets, self.skipped = [], {}, []
        for image_id in sorted(self.coco.getImgIds()):
            try:
                target = self._load(image_id)
            except DataError as e:
                if not skip_bad:
                    raise
                self.skipped.append((image_id, str(e)))
                continue
            if remove_empty and not (~target["difficult"]).any():
                continue
            self.ids.append(image_id)
            self.targets[image_id] = target
        _report_skipped(str(self.ann_file), self.skipped)
        if not self.ids:
            log.warning("%s: no usable image left (%d skipped as bad%s)", self.ann_file,
                        len(self.skipped), ", images without boxes removed" if remove_empty
                        else "")

    def _load(self, image_id: int) -> dict:
        info = self.coco.imgs[image_id]
        # positive integers (check_coco_gt)
        width, height = int(info["width"]), int(info["height"])
        boxes, labels, crowd = [], [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            where = f"{self.ann_file}: annotation id {ann.get('id')} (image id {image_id})"
            if ann.get("category_id") not in self.cat_to_label:
                raise DataError(f"{where}: unknown category id {ann.get('category_id')}")
            check_coco_annotation(ann, info, where, DataError)
            x, y, w, h = (float(v) for v in ann["bbox"])
            boxes.append(check_box((x, y, x + w, y + h), width, height, where))
            labels.append(self.cat_to_label[ann["category_id"]])
            crowd.append(bool(ann.get("iscrowd", 0)))
        return _target(boxes, labels, crowd, image_id, height, width)

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / self.coco.imgs[image_id]["file_name"]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        image = read_image(self.image_path(image_id))
        target = {k: (v.clone() if torch.is_tensor(v) else v)
                  for k, v in self.targets[image_id].items()}
        h, w = target["size"]
        if image.size != (w, h):
            raise DataError(f"{self.image_path(image_id)}: image is "
                            f"{image.size[0]}x{image.size[1]} but {self.ann_file} says {w}x{h}")
        return self.transform(image, target) if self.transform else (image, target)
