"""CUB-200-2011 raw files and the wsolevaluation metadata layout.

CUB raw (``CUB_200_2011/``): ``images.txt`` (``<id> <relpath>``), ``image_class_labels.txt``
(``<id> <class 1..200>``), ``train_test_split.txt`` (``<id> <1 train | 0 test>``),
``classes.txt`` (``<class> <name>``), ``bounding_boxes.txt`` (``<id> <x> <y> <w> <h>``, floats),
images under ``images/<relpath>``.

wsolevaluation metadata (one folder per split): ``image_ids.txt`` (one relative path a line),
``class_labels.txt`` (``path,label`` 0-based), ``image_sizes.txt`` (``path,w,h``),
``localization.txt`` (``path,x0,y0,x1,y1``, one line per box, ``x1 = x + w``).

Boxes read here follow the toolkit convention (float x0, y0, x1, y1 in pixels of the stored
image); the evaluator rescales them to 224 x 224 with integer truncation like the reference.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mixup_transfer.core.basics import atomic_path
from mixup_transfer.core.data import InputError, read_text, safe_relative, to_rgb

__all__ = [
    "MetadataError", "CubRecord", "read_cub", "cub_to_wsol_metadata", "WSOLMetadata",
    "read_wsol_metadata", "write_wsol_metadata", "WSOLDataset", "METADATA_FILES",
]

METADATA_FILES = ("image_ids.txt", "class_labels.txt", "image_sizes.txt", "localization.txt")


class MetadataError(InputError):
    """Malformed or inconsistent dataset annotation files (names the file and line)."""


def _lines(path: Path):
    """Yield (line number, stripped text) of non-empty lines; clear error if the file is
    missing."""
    path = Path(path)
    if not path.is_file():
        raise MetadataError(f"{path}: file not found")
    for i, line in enumerate(read_text(path, MetadataError).splitlines(), 1):
        text = line.strip()
        if text:
            yield i, text


def _fields(path, lineno, text, n, sep=None):
    parts = text.split(sep) if sep is None else text.split(sep)
    if sep is None and n == 2:  # "<id> <relpath>": paths may contain spaces
        parts = text.split(None, 1)
    if len(parts) != n:
        raise MetadataError(f"{path}:{lineno}: expected {n} fields, got {len(parts)}: {text!r}")
    return [p.strip() for p in parts]


def _num(path, lineno, s, kind=float):
    try:
        return kind(s)
    except ValueError:
        raise MetadataError(f"{path}:{lineno}: cannot parse {s!r} as {kind.__name__}") from None


def _check_box(where, box, size):
    x0, y0, x1, y1 = box
    w, h = size
    if not all(np.isfinite(box)):
        raise MetadataError(f"{where}: box {list(box)} has a non-finite coordinate")
    if not (x1 >= x0 and y1 >= y0):
        raise MetadataError(f"{where}: box {list(box)} has x1 < x0 or y1 < y0")
    if x1 == x0 or y1 == y0:
        raise MetadataError(f"{where}: box {list(box)} has no area (x1 == x0 or y1 == y0)")
    if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
        raise MetadataError(f"{where}: box {list(box)} lies outside the image of size {w}x{h}")


def _image_size(path: Path, where: str) -> tuple[int, int]:
    """(w, h) from the image header; MetadataError naming `where` and the file if it is missing or
    unreadable."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise MetadataError(f"{where}: file {path} not found") from None
    except OSError as e:
        raise MetadataError(f"{where}: cannot read {path}: {e}") from None


# ----------------------------------------------------------------------------- CUB raw files
@dataclass
class CubRecord:
    image_id: int          # 1-based CUB id
    path: str              # relative to images/
    label: int             # 0-based class index
    is_train: bool
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 (x1 = x + w)


def _read_id_map(path, n_fields, parse):
    out = OrderedDict()
    for lineno, text in _lines(path):
        parts = _fields(path, lineno, text, n_fields)
        key = _num(path, lineno, parts[0], int)
        if key in out:
            raise MetadataError(f"{path}:{lineno}: duplicate id {key}")
        out[key] = parse(path, lineno, parts[1:])
    return out


def _cub_record(root: Path, image_id: int, rel: str, label: int, split: int, box: tuple,
               classes: dict, check_images: bool) -> CubRecord:
    """One image's record, its class, split and box checked (MetadataError naming the file)."""
    if label not in classes:
        raise MetadataError(f"{root / 'image_class_labels.txt'}: image {image_id} has "
                            f"unknown class {label} (not in classes.txt)")
    if split not in (0, 1):
        raise MetadataError(f"{root / 'train_test_split.txt'}: image {image_id} has split "
                            f"{split} (expected 1 train / 0 test)")
    x, y, w, h = box
    if not all(np.isfinite([x, y, w, h])):
        raise MetadataError(f"{root / 'bounding_boxes.txt'}: image {image_id} has a "
                            f"non-finite box {[x, y, w, h]}")
    if w < 0 or h < 0:
        raise MetadataError(f"{root / 'bounding_boxes.txt'}: image {image_id} has negative "
                            f"box size w={w} h={h} (x1 < x0)")
    if w == 0 or h == 0:
        raise MetadataError(f"{root / 'bounding_boxes.txt'}: image {image_id} has a box of "
                            f"zero size w={w} h={h}")
    xyxy = (x, y, x + w, y + h)
    if check_images:
        size = _image_size(root / "images" / rel, f"{root / 'images.txt'}: image {image_id}")
        _check_box(f"{root / 'bounding_boxes.txt'}: image {image_id}", xyxy, size)
    return CubRecord(image_id, rel, label - 1, split == 1, xyxy)


def read_cub(cub_root, check_images: bool = False) -> tuple[list[CubRecord], list[str]]:
    """Read the CUB_200_2011 raw files. Returns (records sorted by id, class names).

    Raises MetadataError naming file and line (or image id) for malformed lines, duplicate or
    unknown ids, classes or paths, and boxes without a positive size (w or h <= 0). With
    ``check_images`` each image is opened to check that the box lies inside it. Nothing is skipped.
    """
    root = Path(cub_root)
    classes = _read_id_map(root / "classes.txt", 2, lambda p, i, f: f[0])
    images = _read_id_map(root / "images.txt", 2, lambda p, i, f: f[0])
    seen: dict[str, int] = {}
    for image_id, rel in images.items():
        safe_relative(rel, f"{root / 'images.txt'}: image {image_id}", MetadataError)
        if rel in seen:
            raise MetadataError(f"{root / 'images.txt'}: image ids {seen[rel]} and {image_id} "
                                f"share the path {rel!r}")
        seen[rel] = image_id
    if not images:
        raise MetadataError(f"{root / 'images.txt'}: no images")
    labels = _read_id_map(root / "image_class_labels.txt", 2,
                          lambda p, i, f: _num(p, i, f[0], int))
    split = _read_id_map(root / "train_test_split.txt", 2, lambda p, i, f: _num(p, i, f[0], int))
    boxes = _read_id_map(root / "bounding_boxes.txt", 5,
                         lambda p, i, f: tuple(_num(p, i, v, float) for v in f))
    class_ids = sorted(classes)
    if class_ids != list(range(1, len(class_ids) + 1)):
        raise MetadataError(f"{root / 'classes.txt'}: class ids must be 1..{len(class_ids)}")
    for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", split),
                        ("bounding_boxes.txt", boxes)):
        unknown = sorted(set(table) - set(images))
        if unknown:
            raise MetadataError(f"{root / name}: unknown image id(s) {unknown[:5]} (not in "
                                "images.txt)")
        missing = sorted(set(images) - set(table))
        if missing:
            raise MetadataError(f"{root / name}: no entry for image id(s) {missing[:5]}")
    records = [_cub_record(root, image_id, rel, labels[image_id], split[image_id],
                           boxes[image_id], classes, check_images)
               for image_id, rel in images.items()]
    records.sort(key=lambda r: r.image_id)
    return records, [classes[k] for k in class_ids]


# ----------------------------------------------------------------------------- wsolevaluation
# layout
@dataclass
class WSOLMetadata:
    """One split of the wsolevaluation layout. ``boxes[image_id]`` is float [K, 4] (x0, y0, x1,
    y1)."""
    image_ids: list[str]
    labels: dict[str, int]
    sizes: dict[str, tuple[int, int]]  # (w, h)
    boxes: dict[str, np.ndarray] = field(default_factory=dict)


def _fmt(v: float) -> str:
    v = float(v)
    return str(int(v)) if v.is_integer() else repr(v)


def _atomic_write(path: Path, lines):
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)


def write_wsol_metadata(meta: WSOLMetadata, out_dir) -> Path:
    """Write the four metadata files of one split into ``out_dir`` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = meta.image_ids
    _atomic_write(out / "image_ids.txt", ids)
    _atomic_write(out / "class_labels.txt", [f"{i},{meta.labels[i]}" for i in ids])
    _atomic_write(out / "image_sizes.txt",
                  [f"{i},{meta.sizes[i][0]},{meta.sizes[i][1]}" for i in ids])
    _atomic_write(out / "localization.txt",
                  [f"{i}," + ",".join(_fmt(v) for v in b) for i in ids
                   for b in meta.boxes.get(i, [])])
    return out


def read_wsol_metadata(metadata_dir, require_boxes: bool = True) -> WSOLMetadata:
    """Read one split of the wsolevaluation layout, validating every line.

    Errors name the file and line: malformed lines, an empty split, ids not in image_ids.txt,
    duplicate ids/labels/sizes, non-positive sizes, boxes without a positive size or outside the
    image, images without a label, size or box. Nothing is skipped (wsolevaluation would assert or
    mis-score).
    """
    d = Path(metadata_dir)
    if not d.is_dir():
        raise MetadataError(f"{d}: metadata folder not found")
    image_ids = _read_image_ids(d / "image_ids.txt")
    seen = set(image_ids)
    labels, sizes = _read_labels(d, seen), _read_sizes(d, seen)
    for name, table in (("class_labels.txt", labels), ("image_sizes.txt", sizes)):
        missing = [i for i in image_ids if i not in table]
        if missing:
            raise MetadataError(f"{d / name}: no entry for image id(s) {missing[:5]}")
    boxes: dict[str, list] = {}
    loc = d / "localization.txt"
    if loc.is_file() or require_boxes:
        for path, lineno, parts in _per_id(d, seen, "localization.txt", 5):
            iid = parts[0]
            box = tuple(_num(path, lineno, v, float) for v in parts[1:])
            _check_box(f"{path}:{lineno}", box, sizes[iid])
            boxes.setdefault(iid, []).append(box)
        if require_boxes:
            missing = [i for i in image_ids if i not in boxes]
            if missing:
                raise MetadataError(f"{loc}: no box for image id(s) {missing[:5]}")
    return WSOLMetadata(image_ids, labels, sizes,
                        {k: np.asarray(v, dtype=np.float64).reshape(-1, 4)
                         for k, v in boxes.items()})


def _read_image_ids(ids_path: Path) -> list[str]:
    image_ids, seen = [], set()
    for lineno, text in _lines(ids_path):
        safe_relative(text, f"{ids_path}:{lineno}: image id", MetadataError)
        if text in seen:
            raise MetadataError(f"{ids_path}:{lineno}: duplicate image id {text!r}")
        seen.add(text)
        image_ids.append(text)
    if not image_ids:
        raise MetadataError(f"{ids_path}: empty split (no image ids)")
    return image_ids


def _per_id(d: Path, seen: set, name: str, n: int):
    """(path, line number, fields) of each line of `name`, checked for `n` fields and a known image
    id."""
    path = d / name
    for lineno, text in _lines(path):
        parts = text.split(",")
        if len(parts) != n:
            raise MetadataError(f"{path}:{lineno}: expected {n} comma-separated fields, got "
                                f"{len(parts)}: {text!r}")
        if parts[0] not in seen:
            raise MetadataError(f"{path}:{lineno}: unknown image id {parts[0]!r} (not in "
                                "image_ids.txt)")
        yield path, lineno, parts


def _read_labels(d: Path, seen: set) -> dict[str, int]:
    labels = {}
    for path, lineno, (iid, lab) in _per_id(d, seen, "class_labels.txt", 2):
        if iid in labels:
            raise MetadataError(f"{path}:{lineno}: duplicate label for {iid!r}")
        labels[iid] = _num(path, lineno, lab, int)
        if labels[iid] < 0:
            raise MetadataError(f"{path}:{lineno}: negative class label {labels[iid]}")
    return labels


def _read_sizes(d: Path, seen: set) -> dict[str, tuple[int, int]]:
    sizes = {}
    for path, lineno, (iid, w, h) in _per_id(d, seen, "image_sizes.txt", 3):
        if iid in sizes:
            raise MetadataError(f"{path}:{lineno}: duplicate size for {iid!r}")
        w, h = _num(path, lineno, w, int), _num(path, lineno, h, int)
        if w <= 0 or h <= 0:
            raise MetadataError(f"{path}:{lineno}: non-positive image size {w}x{h}")
        sizes[iid] = (w, h)
    return sizes


def cub_to_wsol_metadata(cub_root, out_root, check_images: bool = True) -> dict[str, Path]:
    """Convert CUB_200_2011 raw files to wsolevaluation metadata: ``out_root/{train,test}/``.

    Image ids are the paths relative to ``cub_root/images`` (as in wsolevaluation); labels
    0-based; sizes read from the images; boxes ``x0 = x, x1 = x + w``.
    Returns {"train": path, "test": path}.
    """
    cub_root = Path(cub_root)
    records, _ = read_cub(cub_root)
    out = {}
    for split, is_train in (("train", True), ("test", False)):
        recs = [r for r in records if r.is_train == is_train]
        if not recs:
            raise MetadataError(f"{cub_root / 'train_test_split.txt'}: the {split} split is empty")
        sizes = {}
        for r in recs:
            p = cub_root / "images" / r.path
            sizes[r.path] = _image_size(p, f"{cub_root / 'images.txt'}: image {r.image_id}")
            if check_images:
                _check_box(f"{cub_root / 'bounding_boxes.txt'}: image {r.image_id}", r.box,
                           sizes[r.path])
        meta = WSOLMetadata([r.path for r in recs], {r.path: r.label for r in recs}, sizes,
                            {r.path: np.asarray([r.box]) for r in recs})
        out[split] = write_wsol_metadata(meta, Path(out_root) / split)
    return out


# ----------------------------------------------------------------------------- dataset
class WSOLDataset:
    """Images listed in a wsolevaluation metadata folder (a map-style dataset, not a subclass of
    torch's `Dataset`, so that the metadata readers here import without torch).

    Item: ``(image, label, index)`` where image is ``transform(PIL RGB)`` (or the PIL image),
    label the 0-based class. ``.boxes(index)`` gives float [K, 4] boxes in the stored image's
    pixels; ``.image_ids``, ``.sizes`` and ``.metadata`` expose the rest.
    """

    def __init__(self, image_root, metadata_dir, transform=None, require_boxes: bool = False):
        self.image_root = Path(image_root)
        self.metadata = read_wsol_metadata(metadata_dir, require_boxes=require_boxes)
        self.image_ids = self.metadata.image_ids
        self.transform = transform
        self.num_classes = max(self.metadata.labels.values()) + 1 if self.image_ids else 0

    def __len__(self):
        return len(self.image_ids)

    def label(self, index) -> int:
        return self.metadata.labels[self.image_ids[index]]

    def boxes(self, index) -> np.ndarray:
        iid = self.image_ids[index]
        if iid not in self.metadata.boxes:
            raise MetadataError(f"no box for image id {iid!r}")
        return self.metadata.boxes[iid]

    def __getitem__(self, index):
        iid = self.image_ids[index]
        path = self.image_root / iid
        try:
            with Image.open(path) as im:
                img = to_rgb(im, str(path))
        except FileNotFoundError:
            raise MetadataError(f"{path}: image file not found (image id {iid!r})") from None
        except OSError as e:
            raise MetadataError(f"image {iid!r}: cannot read {path}: {e}") from None
        # the boxes are in the annotated size's pixels
        if img.size != tuple(self.metadata.sizes[iid]):
            w, h = self.metadata.sizes[iid]
            raise MetadataError(f"{path}: image is {img.size[0]}x{img.size[1]} but "
                                f"image_sizes.txt says {w}x{h} for {iid!r}")
        if self.transform is not None:
            img = self.transform(img)
        return img, self.metadata.labels[iid], index
