"""Readers of the small-image classification layouts (CIFAR-10, CIFAR-100, TinyImageNet-200) and
the one function that opens any classification layout the toolkit reads (`open_classification`).

Layouts, as distributed:
  - CIFAR-10 (python version) `cifar-10-batches-py/`: `data_batch_1..5` (train), `test_batch`,
    `batches.meta`.
  - CIFAR-100 (python version) `cifar-100-python/`: `train`, `test`, `meta`.
    Each batch is a pickled dict with bytes keys: b"data" a uint8 array [N, 3072] (per row the
    1024 red, then green, then blue values of a 32 x 32 image, row-major), b"labels" (CIFAR-10)
    or b"fine_labels" and b"coarse_labels" (CIFAR-100), b"filenames"; meta b"label_names" /
    b"fine_label_names".
  - TinyImageNet-200 `tiny-imagenet-200/`: `wnids.txt` (200 wnids), `words.txt`
    (`wnid<TAB>names`), `train/<wnid>/images/*.JPEG` with `train/<wnid>/<wnid>_boxes.txt`
    (`file x0 y0 x1 y1`), `val/images/*.JPEG` with `val/val_annotations.txt`
    (`file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1`). Its test split has no labels.

Safety: the CIFAR batches are pickles, and unpickling can run code. The real files hold only a dict
of bytes, lists of ints / bytes and numpy arrays (the b"data" array is a pickled numpy.ndarray, so
the loader cannot be "plain Python objects only"); `_BatchUnpickler` allows exactly numpy's array
reconstruction (`numpy.core.multiarray._reconstruct`, `numpy.ndarray`, `numpy.dtype`) and
`_codecs.encode` (how Python 3 writes bytes at protocol 2); any other global is refused with a
`DataError` naming the file.

Labels: CIFAR's label indices as stored (names from the meta file); TinyImageNet's are indices into
the sorted wnids (the order torchvision's ImageFolder gives a re-foldered val split, as the
reference codes use). TinyImageNet boxes are 0-based inclusive pixel corners, converted to the
toolkit's x0, y0, x1 + 1, y1 + 1. Items are `(transform(PIL RGB image) or the PIL image, label)`,
as `mixup_transfer.core.data.ImageNetFolder`'s; `image(i)` is the untransformed PIL image,
`samples[i]` a (name, label) pair naming the file (and row) it came from.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from mixup_transfer.core.data import (
    DataError,
    ImageNetFolder,
    check_box,
    list_images,
    read_image,
    read_text,
)

DATASETS = ("auto", "imagenet", "cifar10", "cifar100", "tinyimagenet")
CIFAR_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
TINY_DIR = "tiny-imagenet-200"
_CIFAR_FILES = {  # split -> batch files; the label key; the meta file and its names key
    "cifar10": ({"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                b"labels", "batches.meta", b"label_names"),
    "cifar100": ({"train": ["train"], "test": ["test"]}, b"fine_labels", "meta",
                 b"fine_label_names"),
}
_ALLOWED_GLOBALS = {("numpy.core.multiarray", "_reconstruct"),
                    ("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
                    ("numpy", "dtype"), ("_codecs", "encode")}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes, numbers and numpy arrays; every other global is refused."""

    def __init__(self, file, path):
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise DataError(f"{self.path}: refused to unpickle {module}.{name} (a CIFAR batch "
                            "holds only a dict of bytes, lists and numpy arrays; a file with "
                            "other objects could run code)")
        if name == "_reconstruct":
            # numpy's own reconstructor, whatever its module is called
            return np.ndarray((0,)).__reduce__()[0]
        if name == "encode":
            import codecs

            return codecs.encode
        return getattr(np, name)


def read_cifar_pickle(path: str | os.PathLike) -> dict:
    """The dict of one CIFAR batch or meta file (bytes keys); DataError naming the file
    otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: CIFAR batch file not found")
    try:
        with open(path, "rb") as f:
            obj = _BatchUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated, not a pickle, ...: the file named
        raise DataError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: "
                        f"{str(e)[:120]})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _field(d: dict, key: bytes, path) -> object:
    if key not in d:
        raise DataError(f"{path}: missing key {key!r} (keys: {sorted(d)[:10]})")
    return d[key]


def _decode_names(names, path) -> list[str]:
    if not isinstance(names, (list, tuple)) or not names:
        raise DataError(f"{path}: the class names must be a non-empty list")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def _cifar_batch(path: Path, label_key: bytes, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 32, 32, 3] uint8, labels [N] int64) of one batch file, checked."""
    d = read_cifar_pickle(path)
    data, labels = _field(d, b"data", path), _field(d, label_key, path)
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3072
    ):
        what = (
            f"{data.dtype} array {data.shape}"
            if isinstance(data, np.ndarray)
            else type(data).__name__
        )
        raise DataError(f"{path}: b'data' must be a uint8 array N x 3072 (32 x 32 RGB planes), "
                        f"got {what}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: {label_key!r} must be {len(data)} integers (one per image), "
                        f"got {labels.dtype} {labels.shape}")
    bad = np.nonzero((labels < 0) | (labels >= n_classes))[0]
    if len(bad):
        raise DataError(f"{path}: image {int(bad[0])} has label {int(labels[bad[0]])}, outside "
                        f"0..{n_classes - 1}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels.astype(np.int64)


class CIFARBatches(Dataset):
    """CIFAR-10 / CIFAR-100 python batches. `folder` is the `cifar-10-batches-py` /
    `cifar-100-python` folder;
    split: train | test (val = test: CIFAR has no separate validation split). Labels: CIFAR-10's,
    CIFAR-100's fine labels. `data` is [N, 32, 32, 3] uint8 RGB, `targets` the labels, `classes`
    the meta's names."""

    def __init__(self, folder: str | os.PathLike, kind: str, split: str = "train",
                 transform: Callable | None = None):
        if kind not in _CIFAR_FILES:
            raise ValueError(f"unknown CIFAR kind {kind!r}; valid: {sorted(_CIFAR_FILES)}")
        split = "test" if split == "val" else split
        files, label_key, meta_file, names_key = _CIFAR_FILES[kind]
        if split not in files:
            raise ValueError(f"unknown {kind} split {split!r}; valid: train, test (or val)")
        self.root, self.split, self.transform = Path(folder), split, transform
        meta_path = self.root / meta_file
        self.classes = _decode_names(_field(read_cifar_pickle(meta_path), names_key, meta_path),
                                     meta_path)
        parts = [(name, *_cifar_batch(self.root / name, label_key, len(self.classes)))
                 for name in files[split]]
        self.data = np.concatenate([p[1] for p in parts])
        self.targets = np.concatenate([p[2] for p in parts]).tolist()
        self.samples = [(f"{self.root / name}#{i}", int(y)) for name, _, ys in parts
                        for i, y in enumerate(ys)]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        if not self.samples:
            raise DataError(f"{self.root}: no images in the {split} batches")

    has_boxes = False

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, index: int) -> Image.Image:
        return Image.fromarray(self.data[index], mode="RGB")

    def __getitem__(self, index: int):
        img = self.image(index)
        return (self.transform(img) if self.transform else img), self.targets[index]

    def boxes(self, index: int) -> np.ndarray:
        raise DataError(f"{self.root}: CIFAR has no box annotations (background corruption and "
                        "localization need boxes)")


def _read_wnids(root: Path) -> list[str]:
    path = root / "wnids.txt"
    if not path.is_file():
        raise DataError(f"{path}: TinyImageNet wnids.txt not found")
    wnids, seen = [], {}
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        w = line.strip()
        if not w:
            continue
        if len(w.split()) != 1:
            raise DataError(f"{path}:{lineno}: expected one wnid per line, got {line!r}")
        if w in seen:
            raise DataError(f"{path}:{lineno}: duplicate wnid {w!r} (first on line {seen[w]})")
        seen[w] = lineno
        wnids.append(w)
    if not wnids:
        raise DataError(f"{path}: no wnids")
    return sorted(wnids)


def read_words(path: str | os.PathLike) -> dict[str, str]:
    """`words.txt`: {wnid: names}; DataError naming the file and line for a line without a tab."""
    out = {}
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise DataError(f"{path}:{lineno}: expected 'wnid<TAB>names', got {line!r}")
        wnid, names = line.split("\t", 1)
        out[wnid.strip()] = names.strip()
    return out


def _box_fields(fields: list[str], where: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in fields)
    except ValueError:
        raise DataError(f"{where}: malformed box numbers {fields}") from None


def _read_annotations(path: Path, n_fields: int, known: dict | None) -> dict[str, tuple]:
    """{file name: (wnid or None, (x0, y0, x1, y1))} of a TinyImageNet box file
    (`val_annotations.txt`: file, wnid, 4 numbers; `<wnid>_boxes.txt`: file, 4 numbers); every
    malformed line is a DataError (file:line)."""
    out = {}
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        fields = line.split("\t") if "\t" in line else line.split()
        if len(fields) != n_fields:
            raise DataError(f"{where}: expected {n_fields} tab-separated fields, got "
                            f"{len(fields)}: {line!r}")
        name, wnid = fields[0].strip(), (fields[1].strip() if n_fields == 6 else None)
        if known is not None and wnid not in known:
            raise DataError(f"{where}: unknown wnid {wnid!r} (not in wnids.txt)")
        if name in out:
            raise DataError(f"{where}: duplicate image {name!r}")
        out[name] = (wnid, _box_fields(fields[-4:], where))
    return out


class TinyImageNetFolder(Dataset):
    """TinyImageNet-200: `root` is the `tiny-imagenet-200` folder; split train | val. Labels index
    the sorted wnids of `wnids.txt`; `names` maps a wnid to its words.txt names (when the file is
    there). `boxes(i)` gives the image's box as float32 [1, 4] x0, y0, x1, y1 (val:
    val_annotations.txt; train: <wnid>_boxes.txt)."""

    def __init__(self, root: str | os.PathLike, split: str = "train",
                 transform: Callable | None = None):
        self.root, self.split, self.transform = Path(root), split, transform
        if split not in ("train", "val"):
            raise ValueError(f"unknown TinyImageNet split {split!r}; valid: train, val (test has "
                             "no labels)")
        self.classes = _read_wnids(self.root)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        words = self.root / "words.txt"
        self.names = read_words(words) if words.is_file() else {}
        self._boxes: dict[str, tuple] = {}
        self.samples = self._train_samples() if split == "train" else self._val_samples()
        if not self.samples:
            raise DataError(f"{self.root / split}: no images")
        self.targets = [s[1] for s in self.samples]

    has_boxes = True

    def _train_samples(self) -> list[tuple[str, int]]:
        train = self.root / "train"
        if not train.is_dir():
            raise DataError(f"{train}: TinyImageNet train folder not found")
        extra = sorted(d.name for d in train.iterdir() if d.is_dir()
                       and d.name not in self.class_to_idx)
        if extra:
            raise DataError(f"{train}: class folders not in wnids.txt: {extra[:10]}")
        samples = []
        for wnid in self.classes:
            for p in list_images(train / wnid / "images", recursive=False):
                samples.append((str(p), self.class_to_idx[wnid]))
        return samples

    def _val_samples(self) -> list[tuple[str, int]]:
        ann_path = self.root / "val" / "val_annotations.txt"
        if not ann_path.is_file():
            raise DataError(f"{ann_path}: TinyImageNet val annotations not found")
        ann = _read_annotations(ann_path, 6, self.class_to_idx)
        images = {p.name: p for p in list_images(self.root / "val" / "images", recursive=False)}
        missing = sorted(set(ann) - set(images))
        if missing:
            raise DataError(f"{ann_path}: annotated images missing from "
                            f"{self.root / 'val' / 'images'}: {missing[:5]}")
        unannotated = sorted(set(images) - set(ann))
        if unannotated:
            raise DataError(f"{ann_path}: no line for the images {unannotated[:5]}")
        self._boxes = {str(ann_path): ann}
        return [(str(images[name]), self.class_to_idx[ann[name][0]]) for name in sorted(ann)]

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, index: int) -> Image.Image:
        return read_image(self.samples[index][0])

    def __getitem__(self, index: int):
        img = self.image(index)
        return (self.transform(img) if self.transform else img), self.targets[index]

    def boxes(self, index: int) -> np.ndarray:
        """float32 [1, 4] in the toolkit's convention (0-based inclusive corners + 1 on the far
        side)."""
        path, label = Path(self.samples[index][0]), self.samples[index][1]
        if self.split == "val":
            box_file = self.root / "val" / "val_annotations.txt"
        else:
            wnid = self.classes[label]
            box_file = self.root / "train" / wnid / f"{wnid}_boxes.txt"
            if not box_file.is_file():
                raise DataError(f"{box_file}: TinyImageNet box file not found")
        if str(box_file) not in self._boxes:
            self._boxes[str(box_file)] = _read_annotations(box_file, 5, None)
        ann = self._boxes[str(box_file)]
        if path.name not in ann:
            raise DataError(f"{box_file}: no box for the image {path.name}")
        x0, y0, x1, y1 = ann[path.name][1]
        w, h = read_image(path).size
        return check_box((x0, y0, x1 + 1, y1 + 1), w, h, f"{box_file} ({path.name})")[None]


def detect_layout(root: str | os.PathLike, dataset: str = "auto") -> tuple[str, Path]:
    """(dataset kind, the folder its reader takes) for `root`: the layout folder itself or a folder
    holding it (`cifar-10-batches-py/`, `cifar-100-python/`, `tiny-imagenet-200/`); `auto`
    recognises them by their files, anything else is an ImageNet-layout folder."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid: {list(DATASETS)}")
    root = Path(root)
    marks = {"cifar10": ("batches.meta", CIFAR_DIRS["cifar10"]),
             "cifar100": ("meta", CIFAR_DIRS["cifar100"]), "tinyimagenet": ("wnids.txt", TINY_DIR)}
    found = []
    for kind, (mark, sub) in marks.items():
        if dataset not in ("auto", kind):
            continue
        if (root / sub / mark).is_file():
            found.append((kind, root / sub))
        elif (root / mark).is_file() and (kind != "cifar100" or (root / "train").is_file()):
            found.append((kind, root))
        elif dataset == kind:
            raise DataError(f"{root}: no {kind} layout here (looked for {root / mark} and "
                            f"{root / sub / mark})")
    if len(found) > 1:
        raise DataError(f"{root}: holds several layouts ({', '.join(k for k, _ in found)}); set "
                        "the dataset (data.dataset) or point at one of their folders")
    return found[0] if found else ("imagenet", root)


def open_classification(root: str | os.PathLike, split: str, dataset: str = "auto",
                        transform: Callable | None = None, classes: list[str] | None = None,
                        boxes: str | None = None, reader: Callable | None = None):
    """The classification set of `split` in any layout the toolkit reads (`detect_layout`).
    ImageNet takes `classes`, `boxes` and `reader` (see `mixup_transfer.core.data.ImageNetFolder`);
    the small-image sets carry their own class lists (`classes`, when given, must equal them) and
    always give PIL images (`reader` is ignored)."""
    kind, folder = detect_layout(root, dataset)
    if kind == "imagenet":
        extra = {"reader": reader} if reader is not None else {}
        return ImageNetFolder(folder, split, transform=transform, boxes=boxes, classes=classes,
                              **extra)
    ds = CIFARBatches(folder, kind, split, transform) if kind in CIFAR_DIRS else \
        TinyImageNetFolder(folder, split, transform)
    if classes is not None and list(classes) != ds.classes:
        raise DataError(f"{folder}: the {split} split's classes differ from the given class list")
    return ds
