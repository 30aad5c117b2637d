"""Image reading, box checks and the ImageNet-layout reader.

Box convention of the whole toolkit (ARCHITECTURE.md "Boxes"): float `x0, y0, x1, y1` in continuous
pixel coordinates of the image as stored on disk; pixel column i spans [i, i + 1). Readers convert
on the way in:
  - PASCAL-style XML (VOC, ImageNet val) `xmin..xmax`, 1-based inclusive  ->  x0 = xmin - 1, x1 =
    xmax
  - COCO `[x, y, w, h]` and CUB `x y w h`                                  ->  x0 = x,        x1 =
    x + w
Evaluators convert back to the convention of the reference they must agree with.

Images are returned as PIL RGB images (torchvision transforms then make float tensors in [0, 1]),
or, by `read_image_uint8`, as uint8 [3, h, w] tensors decoded by torchvision.io (libjpeg-turbo; the
fast path).
"""

from __future__ import annotations

import csv
import io
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
# Annotation tools round box corners; a box may overhang the image by this much before it is an
# error.
BOX_TOLERANCE = 1.0


class InputError(ValueError):
    """Base of every bad-input error (data, annotations, score maps, checkpoints, configs).

    The message starts with the culprit: `<file>[:line]: <what is wrong>` (or names the id / key).
    The CLIs (mixup_transfer/core/cli.py) print it as `error: <message>` and exit with code 2.
    """


class DataError(InputError):
    """Malformed or missing data; the message names the file (and line or image id)."""


def safe_relative(name: str, where: str, error: type | None = None) -> str:
    """`name`, an id or file name read from an annotation or metadata file, checked to be a
    relative path that stays inside the folder it is joined to (no absolute path, drive or `..`
    component, no NUL byte); else `error` (DataError by default) naming `where` and the name."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if (not name or "\x00" in name or name.startswith(("/", "\\")) or ".." in parts
            or (len(name) > 1 and name[1] == ":")):
        raise (error or DataError)(f"{where}: {name!r} is not a relative path inside its folder "
                                   "(an absolute path or a '..' component is refused)")
    return name


def inside(root: str | os.PathLike, name: str, what: str, error: type = None) -> Path:
    """``root / name``, refused (`error`, DataError by default, naming `what` and the root) when it
    resolves outside `root`: an id or file name read from an annotation or metadata file
    (``../../x.jpg``, an absolute path, a symlinked escape) must never read or write outside the
    folder it belongs to."""
    root = Path(root)
    path = root / name
    base = os.path.realpath(root)
    if os.path.isabs(name) or os.path.commonpath([base, os.path.realpath(path)]) != base:
        raise (error or DataError)(f"{what}: resolves outside {root} (a path that leaves its "
                                   "folder is refused)")
    return path


def read_text(path: str | os.PathLike, error: type = DataError) -> str:
    """The UTF-8 text of an annotation or list file; `error` naming the file if it is binary or not
    UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None


_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def to_rgb(im: Image.Image, where: str) -> Image.Image:
    """A decoded PIL image of any mode as 8-bit RGB. 16-bit grayscale (modes I;16*, and I holding
    16-bit values) is scaled to 8 bits (round(v / 257)) as 16-bit RGB is; PIL's own
    `convert("RGB")` would clip it (every value above 255 white). Float pixels (mode F) and 32-bit
    values are refused (DataError naming `where` and the mode): their range is unknown."""
    if im.mode in _SIXTEEN_BIT:
        arr = np.asarray(im).astype(np.float64)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise DataError(f"{where}: unsupported image mode {im.mode!r} with values outside "
                            "0..65535; convert it to 8-bit RGB")
        return Image.fromarray(np.round(arr / 257).astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":
        raise DataError(f"{where}: unsupported image mode 'F' (32-bit float pixels); convert it "
                        "to 8-bit RGB")
    try:
        return im.convert("RGB")
    except ValueError as e:
        raise DataError(f"{where}: unsupported image mode {im.mode!r} ({e}); convert it to 8-bit "
                        "RGB") from None


def read_image(path: str | os.PathLike) -> Image.Image:
    """The image at `path` as a fully decoded PIL RGB image (`to_rgb`); DataError names the file
    otherwise."""
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im, str(path))
    except FileNotFoundError:
        raise DataError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"{path}: corrupt or unreadable image: {e}") from e


JPEG_MAGIC = b"\xff\xd8\xff"


def is_jpeg(data) -> bool:
    """Whether encoded bytes (bytes or a uint8 tensor) start with the JPEG SOI marker (the content
    decides, not the file name: ImageNet has a PNG and CMYK JPEGs under .JPEG names)."""
    head = bytes(data[:3].tolist()) if hasattr(data, "tolist") else bytes(data[:3])
    return head == JPEG_MAGIC


def read_bytes(path: str | os.PathLike):
    """The encoded file as a uint8 1-D tensor; DataError names the file if it is missing or
    empty."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: image not found") from None
    except OSError as e:
        raise DataError(f"{path}: unreadable image: {e}") from e
    if not data:
        raise DataError(f"{path}: empty image file")
    # here, not at the top: the stand-alone evaluators import this module without torch
    import torch

    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_uint8(data, where: str):
    """Encoded bytes (uint8 1-D tensor) -> RGB uint8 [3, h, w]: JPEG by torchvision's libjpeg-turbo
    `decode_jpeg`, other formats by `decode_image`; what torchvision cannot decode (CMYK JPEGs on
    some builds, BMP) goes through PIL, and an image nobody can decode is a DataError naming
    `where`. The result may be a channels-last view (strides 1, 3w, 3) of the decoder's HWC
    buffer."""
    import torch
    from torchvision import io as tio

    try:
        if is_jpeg(data):
            return tio.decode_jpeg(data, mode=tio.ImageReadMode.RGB)
        img = tio.decode_image(data, mode=tio.ImageReadMode.RGB)
        # 16-bit PNGs decode to uint16: to 8 bits as `to_rgb` does (the resize kernels take uint8
        # only)
        return img if img.dtype == torch.uint8 else (img.to(torch.float32)
                                                     / 257).round().to(torch.uint8)
    except RuntimeError:
        pass
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
            rgb = np.asarray(to_rgb(im, where))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"{where}: corrupt or unreadable image: {e}") from e
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def read_image_uint8(path: str | os.PathLike):
    """The image at `path` as RGB uint8 [3, h, w] (`decode_uint8`); equal to `read_image`'s pixels
    where both use libjpeg-turbo with default settings (tests/core/test_uint8_data.py measures
    it)."""
    return decode_uint8(read_bytes(path), str(path))


def encoded_size(data) -> tuple[int, int]:
    """(width, height) of encoded bytes from the header alone (no pixel decode)."""
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"corrupt or unreadable image: {e}") from e


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise DataError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: corrupt or unreadable image: {e}") from e


def check_box(box, width: float, height: float, where: str) -> np.ndarray:
    """Validate one x0, y0, x1, y1 box against the image size; clip overhangs within BOX_TOLERANCE.

    A box must have a positive width and height (x1 > x0, y1 > y0) and lie inside the image up to
    BOX_TOLERANCE pixels; `DataError` naming `where` otherwise.
    """
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise DataError(f"{where}: box must be 4 numbers x0, y0, x1, y1, got {box!r}") from None
    if not np.all(np.isfinite([x0, y0, x1, y1])):
        raise DataError(f"{where}: non-finite box {box}")
    if x1 <= x0 or y1 <= y0:
        raise DataError(f"{where}: box {box} has no area (x1 <= x0 or y1 <= y0)")
    t = BOX_TOLERANCE
    if x0 < -t or y0 < -t or x1 > width + t or y1 > height + t:
        raise DataError(f"{where}: box {box} lies outside the {width}x{height} image")
    return np.array([max(x0, 0.0), max(y0, 0.0), min(x1, width), min(y1, height)],
                    dtype=np.float32)


def _xml_text(node: ET.Element, tag: str, where: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None:
        raise DataError(f"{where}: missing <{tag}>")
    return child.text.strip()


def _xml_number(node: ET.Element, tag: str, where: str) -> float:
    """The number in `<tag>`; DataError naming the tag for text, NaN or infinity (int() of those
    would raise a bare ValueError or OverflowError)."""
    text = _xml_text(node, tag, where)
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{where}: malformed number in <{tag}>: {text!r}") from None
    if not np.isfinite(value):
        raise DataError(f"{where}: <{tag}> is not a finite number: {text!r}")
    return value


def parse_pascal_xml(path: str | os.PathLike) -> dict:
    """A PASCAL-style annotation (VOC, ImageNet val boxes) as plain values, coordinates as in the
    file.

    Returns {"filename", "width", "height", "objects": [{"name", "bbox": (xmin, ymin, xmax, ymax),
    "difficult": bool, "truncated": bool}]}.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise DataError(f"{path}: malformed XML: {e}") from e
    size = root.find("size")
    if size is None:
        raise DataError(f"{path}: missing <size>")
    try:
        width = int(_xml_number(size, "width", str(path)))
        height = int(_xml_number(size, "height", str(path)))
        if width <= 0 or height <= 0:
            raise DataError(f"{path}: non-positive <size> {width}x{height}")
        objects = []
        for i, obj in enumerate(root.findall("object")):
            where = f"{path}: object {i}"
            bb = obj.find("bndbox")
            if bb is None:
                raise DataError(f"{where}: missing <bndbox>")
            coords = tuple(int(round(_xml_number(bb, t, where)))
                           for t in ("xmin", "ymin", "xmax", "ymax"))
            flags = {}
            for flag in ("difficult", "truncated"):
                node = obj.find(flag)
                value = (
                    int(node.text) if node is not None and node.text and node.text.strip() else 0
                )
                if value not in (0, 1):
                    raise DataError(f"{where}: <{flag}> must be 0 or 1, got {node.text.strip()!r}")
                flags[flag] = bool(value)
            objects.append({"name": _xml_text(obj, "name", where), "bbox": coords, **flags})
    except ValueError as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: malformed number: {e}") from e
    filename = root.findtext("filename", default="").strip()
    return {"filename": filename, "width": width, "height": height, "objects": objects}


def pascal_to_box(bbox, width: int, height: int, where: str) -> np.ndarray:
    """1-based inclusive (xmin, ymin, xmax, ymax) -> the toolkit's x0, y0, x1, y1."""
    xmin, ymin, xmax, ymax = bbox
    if xmax < xmin or ymax < ymin:
        raise DataError(f"{where}: box {tuple(bbox)} has xmax < xmin or ymax < ymin")
    return check_box((xmin - 1, ymin - 1, xmax, ymax), width, height, where)


def list_images(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found")
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


class ImageNetFolder:
    """ImageNet layout: `root/<split>/<wnid>/*.JPEG`; labels are indices into sorted wnids.

    A map-style dataset (`__len__`, `__getitem__`: all a DataLoader needs); it does not subclass
    torch's `Dataset`, so that this module, which the stand-alone evaluators use, imports without
    torch.

    Validation boxes (for localization and background corruption) come from one PASCAL-style XML
    per image in `root/val_boxes/<image stem>.xml` (the ILSVRC bbox_val files) or from
    `root/LOC_val_solution.csv` (Kaggle: `ImageId,PredictionString` with `wnid xmin ymin xmax ymax
    ...`); both use 1-based inclusive corners, converted to the toolkit's convention by
    `boxes(index)`. `boxes(index)` validates them (a `DataError` naming the file and line or
    object): the XML's `<filename>` and `<size>` must match the image (its header is read), every
    box must have a positive size inside it, its class must be known; a CSV row must be well formed
    and its ImageId unique. Nothing is skipped.

    Items are `(transform(image) or image, label)`; `reader(path)` makes the image: `read_image`
    (PIL, the default), `read_image_uint8` (uint8 [3, h, w] tensors) or `read_bytes` (the encoded
    file, for GPU decoding).
    """

    def __init__(self, root: str | os.PathLike, split: str = "train",
                 transform: Callable | None = None, boxes: str | None = "auto",
                 box_dir: str | os.PathLike | None = None, classes: list[str] | None = None,
                 reader: Callable = read_image):
        self.root = Path(root)
        self.split = split
        self.transform = transform
        self.reader = reader
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise DataError(f"{split_dir}: ImageNet split folder not found")
        found = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
        if not found:
            raise DataError(f"{split_dir}: no class folders (<wnid>/)")
        self.classes = list(classes) if classes is not None else found
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        extra = sorted(set(found) - set(self.class_to_idx))
        if extra:
            raise DataError(f"{split_dir}: class folders not in the class list: {extra[:10]}")
        self.samples: list[tuple[str, int]] = []
        for c in found:
            for p in list_images(split_dir / c, recursive=False):
                self.samples.append((str(p), self.class_to_idx[c]))
        if not self.samples:
            raise DataError(f"{split_dir}: no images")
        self.targets = [s[1] for s in self.samples]
        self._box_source = self._find_boxes(boxes, box_dir)
        self._csv_boxes: dict[str, list] | None = None

    def _find_boxes(self, boxes, box_dir):
        if boxes is None:
            return None
        xml_dir = Path(box_dir) if box_dir is not None else self.root / "val_boxes"
        csv_path = self.root / "LOC_val_solution.csv"
        if boxes in ("auto", "xml") and xml_dir.is_dir():
            return ("xml", xml_dir)
        if boxes in ("auto", "csv") and csv_path.is_file():
            return ("csv", csv_path)
        if boxes == "auto":
            return None
        raise DataError(f"no {boxes} box annotations found for {self.root} "
                        f"(looked for {xml_dir}/ and {csv_path})")

    @property
    def has_boxes(self) -> bool:
        return self._box_source is not None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = self.reader(path)
        return (self.transform(image) if self.transform else image), label

    def _load_csv(self, csv_path: Path) -> dict[str, list]:
        """{ImageId: [(wnid, (xmin, ymin, xmax, ymax))]}; a malformed row, a duplicate ImageId or
        an empty PredictionString is a `DataError` naming the file and line (nothing is
        skipped)."""
        out = {}
        with io.StringIO(read_text(csv_path), newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or [h.strip() for h in header[:2]] != [
                "ImageId",
                "PredictionString",
            ]:
                raise DataError(f"{csv_path}:1: expected header 'ImageId,PredictionString', got "
                                f"{header}")
            for lineno, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) != 2:
                    raise DataError(f"{csv_path}:{lineno}: expected 2 fields, got {len(row)}")
                parts = row[1].split()
                if len(parts) % 5:
                    raise DataError(f"{csv_path}:{lineno}: PredictionString must be groups of "
                                    f"'wnid xmin ymin xmax ymax', got {len(parts)} tokens")
                image_id = row[0].strip()
                if image_id in out:
                    raise DataError(f"{csv_path}:{lineno}: duplicate ImageId {image_id!r}")
                if not parts:
                    raise DataError(f"{csv_path}:{lineno}: image {image_id!r} has an empty "
                                    "PredictionString")
                try:
                    out[image_id] = [(parts[i], tuple(int(float(v)) for v in parts[i + 1:i + 5]))
                                     for i in range(0, len(parts), 5)]
                except ValueError as e:
                    raise DataError(f"{csv_path}:{lineno}: malformed number: {e}") from e
        return out

    def boxes(self, index: int) -> np.ndarray:
        """GT boxes of sample `index` as float32 [K, 4] (x0, y0, x1, y1); DataError if it has
        none."""
        if self._box_source is None:
            raise DataError(f"no box annotations for {self.root / self.split} (expected "
                            f"{self.root / 'val_boxes'}/*.xml or "
                            f"{self.root / 'LOC_val_solution.csv'})")
        path = Path(self.samples[index][0])
        kind, src = self._box_source
        if kind == "xml":
            xml = src / (path.stem + ".xml")
            if not xml.is_file():
                raise DataError(f"image {path.name}: no box file {xml}")
            ann = parse_pascal_xml(xml)
            width, height = ann["width"], ann["height"]
            if ann["filename"] and Path(ann["filename"]).stem != path.stem:
                raise DataError(f"{xml}: <filename> {ann['filename']!r} is not the image "
                                f"{path.name}")
            if (width, height) != image_size(path):  # the header only: cheap
                real = image_size(path)
                raise DataError(f"{xml}: <size> says {width}x{height} but the image {path} is "
                                f"{real[0]}x{real[1]}")
            objs = [(o["name"], o["bbox"]) for o in ann["objects"]]
            where = str(xml)
        else:
            if self._csv_boxes is None:
                self._csv_boxes = self._load_csv(src)
            if path.stem not in self._csv_boxes:
                raise DataError(f"image {path.name}: no row in {src}")
            objs = self._csv_boxes[path.stem]
            width, height = image_size(path)
            where = f"{src} ({path.stem})"
        if not objs:
            raise DataError(f"{where}: no boxes")
        for name, _ in objs:
            if name not in self.class_to_idx:
                raise DataError(f"{where}: unknown class name {name!r}")
        return np.stack([pascal_to_box(b, width, height, where) for _, b in objs])
