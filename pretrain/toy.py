"""The toy world: small procedurally generated datasets written in the real on-disk layouts.

One visual vocabulary (shapes x colours x textures, cluttered backgrounds, distractor strokes) is shared
by four worlds, so that pretraining on the ImageNet-layout world helps on the others:

- ``out/imagenet``: ``train/<wnid>/<wnid>_<k>.JPEG``, ``val/<wnid>/ILSVRC2012_val_XXXXXXXX.JPEG``, val boxes
  as PASCAL-style XML (``val_boxes/ILSVRC2012_val_XXXXXXXX.xml``) and as Kaggle's ``LOC_val_solution.csv``,
  ``LOC_synset_mapping.txt``. One main object (25-60% of the image side), sometimes a second instance.
- ``out/VOCdevkit/VOC2007`` (trainval/test) and ``VOC2012`` (trainval): VOC XML with the 20 VOC class names,
  1-4 objects per image, ``truncated`` for objects cut by the border, ``difficult`` for some small ones.
- ``out/coco``: ``annotations/instances_{train,val}2017.json`` with non-contiguous category ids (real COCO ids
  and names), polygon segmentations, images ``{train,val}2017/000000XXXXXX.jpg``.
- ``out/CUB_200_2011``: fine-grained "birds" (one shape, classes differ only in markings / colours) with the
  raw CUB files; then ``wsol.data.cub_to_wsol_metadata`` writes ``out/wsol_metadata/CUB/{train,test}``.

Box conventions on disk are those of each format (VOC/ImageNet XML 1-based inclusive, COCO ``[x, y, w, h]``,
CUB ``x y w h``); in memory (``SceneObject.box``) the toolkit convention: float ``x0, y0, x1, y1`` in
continuous pixel coordinates, where pixel column ``i`` spans ``[i, i + 1)``, i.e. the tight box of a mask is
``(min col, min row, max col + 1, max row + 1)``.

Everything is deterministic for a seed: each image draws from its own ``numpy.random.Generator`` seeded with
``[seed, world code, image index]``, so the files are byte-identical whatever the number of worker processes.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import shutil
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

# ----------------------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------------------

SHAPES = (
    "circle",
    "ellipse",
    "ring",
    "square",
    "diamond",
    "triangle",
    "star",
    "cross",
    "hexagon",
    "crescent",
)
# Hue on OpenCV's 0..179 scale; saturated colours, jittered per object.
COLOURS = {
    "red": 0,
    "orange": 14,
    "yellow": 28,
    "green": 60,
    "cyan": 90,
    "blue": 115,
    "purple": 135,
    "magenta": 160,
}
TEXTURES = ("solid", "stripes", "dots", "checker", "gradient")
TEXTURE_ADJECTIVES = {
    "solid": "solid",
    "stripes": "striped",
    "dots": "dotted",
    "checker": "checkered",
    "gradient": "shaded",
}

VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
# (category id, name, supercategory): real COCO ids, deliberately non-contiguous (12 and 21 are absent).
COCO_CATEGORIES = (
    (1, "person", "person"),
    (2, "bicycle", "vehicle"),
    (3, "car", "vehicle"),
    (4, "motorcycle", "vehicle"),
    (5, "airplane", "vehicle"),
    (6, "bus", "vehicle"),
    (7, "train", "vehicle"),
    (8, "truck", "vehicle"),
    (9, "boat", "vehicle"),
    (10, "traffic light", "outdoor"),
    (11, "fire hydrant", "outdoor"),
    (13, "stop sign", "outdoor"),
    (14, "parking meter", "outdoor"),
    (15, "bench", "outdoor"),
    (16, "bird", "animal"),
    (17, "cat", "animal"),
    (18, "dog", "animal"),
    (19, "horse", "animal"),
    (20, "sheep", "animal"),
    (22, "elephant", "animal"),
)


@dataclass(frozen=True)
class ObjectClass:
    """An object class of the toy vocabulary: a (shape, colour, texture) combination."""

    name: str
    shape: str
    colour: str
    texture: str

    @property
    def description(self) -> str:
        return f"{self.colour} {TEXTURE_ADJECTIVES[self.texture]} {self.shape}"


@dataclass(frozen=True)
class BirdClass:
    """A fine-grained "bird": same silhouette for every class; colours and markings differ.

    Colours are names of ``BIRD_COLOURS``; a marking colour of ``None`` means no such marking.
    """

    name: str
    body: str
    head: str
    wing: str
    wing_stripe: str | None = None
    breast_band: str | None = None
    head_spot: str | None = None

    @property
    def description(self) -> str:
        parts = [f"{self.body} body", f"{self.head} head", f"{self.wing} wing"]
        for what, c in (
            ("wing stripe", self.wing_stripe),
            ("breast band", self.breast_band),
            ("head spot", self.head_spot),
        ):
            if c is not None:
                parts.append(f"{c} {what}")
        return ", ".join(parts)


# RGB; jittered a little per image.
BIRD_COLOURS = {
    "grey": (128, 128, 132),
    "yellow": (225, 200, 40),
    "olive": (120, 110, 45),
    "red": (200, 35, 30),
    "blue": (45, 80, 200),
    "white": (240, 240, 235),
    "black": (25, 25, 25),
    "brown": (110, 70, 35),
}

# The ImageNet world: pairs share a colour (so mean colour cannot separate them) and classes 4/5 share
# shape and colour and differ only in texture; shapes recur across colours (star, hexagon).
IMAGENET_CLASSES = tuple(
    ObjectClass(f"{c} {TEXTURE_ADJECTIVES[t]} {s}", s, c, t)
    for s, c, t in (
        ("circle", "red", "solid"),
        ("star", "red", "stripes"),
        ("square", "blue", "solid"),
        ("triangle", "blue", "checker"),
        ("hexagon", "green", "dots"),
        ("hexagon", "green", "stripes"),
        ("diamond", "yellow", "solid"),
        ("cross", "yellow", "gradient"),
        ("ring", "purple", "solid"),
        ("star", "purple", "dots"),
    )
)
_COLOUR_NAMES = tuple(COLOURS)
VOC_OBJECT_CLASSES = tuple(
    ObjectClass(name, SHAPES[i % 10], _COLOUR_NAMES[(3 * i + i // 10) % 8], TEXTURES[(i + 2 * (i // 10)) % 5])
    for i, name in enumerate(VOC_CLASSES)
)
# COCO categories: like the VOC world, every colour, shape and texture is shared by several categories, so
# that only their combination names a category. A detector has to learn the shape and texture features that
# pretraining on the ImageNet world provides; with 8 colour-coded categories a randomly initialised Faster
# R-CNN learned the task as fast as a pretrained one (COCO AP 13.7 vs 12.5 after one toy epoch).
COCO_OBJECT_CLASSES = tuple(
    ObjectClass(name, SHAPES[(i + 3) % 10], _COLOUR_NAMES[(3 * i + i // 10 + 1) % 8],
                TEXTURES[(i + 2 * (i // 10) + 1) % 5])
    for i, (_, name, _) in enumerate(COCO_CATEGORIES)
)
CUB_CLASSES = (
    BirdClass("Red_Capped_Warbler", body="grey", head="red", wing="grey"),
    BirdClass("Blue_Capped_Warbler", body="grey", head="blue", wing="grey"),
    BirdClass("Striped_Wing_Warbler", body="grey", head="grey", wing="grey", wing_stripe="white"),
    BirdClass("Banded_Warbler", body="grey", head="grey", wing="grey", breast_band="black"),
    BirdClass("Yellow_Finch", body="yellow", head="yellow", wing="yellow"),
    BirdClass("Banded_Yellow_Finch", body="yellow", head="yellow", wing="yellow", breast_band="black"),
    BirdClass("Black_Winged_Finch", body="yellow", head="yellow", wing="black"),
    BirdClass("Olive_Sparrow", body="olive", head="olive", wing="brown"),
    BirdClass("Striped_Olive_Sparrow", body="olive", head="olive", wing="brown", wing_stripe="white"),
    BirdClass("Spotted_Olive_Sparrow", body="olive", head="olive", wing="brown", head_spot="white"),
)

for _group in (IMAGENET_CLASSES, VOC_OBJECT_CLASSES, COCO_OBJECT_CLASSES):
    assert len({(c.shape, c.colour, c.texture) for c in _group}) == len(_group), "duplicate class combo"


def imagenet_wnids(n: int) -> list[str]:
    """Made-up, real-looking, sorted synset ids: ``n01000000``, ``n01104729``, ..."""
    return [f"n{1000000 + 104729 * k:08d}" for k in range(n)]


# ----------------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
    "demo": dict(
        imagenet_train=100,
        imagenet_val=20,
        imagenet_size=(96, 128),
        voc07_trainval=300,
        voc07_test=200,
        voc12_trainval=300,
        voc_size=(112, 144),
        coco_train=400,
        coco_val=150,
        coco_size=(112, 144),
        cub_train=30,
        cub_test=20,
        cub_size=(112, 144),
    ),
    "tiny": dict(
        imagenet_train=10,
        imagenet_val=3,
        imagenet_size=(96, 128),
        voc07_trainval=30,
        voc07_test=20,
        voc12_trainval=30,
        voc_size=(112, 144),
        coco_train=40,
        coco_val=16,
        coco_size=(112, 144),
        cub_train=3,
        cub_test=2,
        cub_size=(112, 144),
    ),
}

# World codes used in the per-image seeds (``image_rng(seed, WORLDS[name], index)``).
WORLDS = {
    "imagenet_train": 1,
    "imagenet_val": 2,
    "voc2007": 3,
    "voc2012": 4,
    "coco_train2017": 5,
    "coco_val2017": 6,
    "cub": 7,
    "splits": 8,
}
_W_IMNET_TRAIN, _W_IMNET_VAL, _W_VOC07, _W_VOC12, _W_COCO_TRAIN, _W_COCO_VAL, _W_CUB, _W_SPLITS = (
    WORLDS.values()
)
JPEG_QUALITY = 90
_NO_WSOL = "not written (wsol.data.cub_to_wsol_metadata missing)"


def image_rng(seed: int, world: int, index: int) -> np.random.Generator:
    """The generator of one image: independent of every other image and of the number of workers."""
    return np.random.default_rng([int(seed), int(world), int(index)])


# ----------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------


@dataclass
class SceneObject:
    """One rendered object.

    box: (x0, y0, x1, y1) floats, toolkit convention (tight box of ``mask``, ``x1 = max col + 1``).
    mask: bool [H, W], the object's full silhouette clipped to the image (later objects may occlude it).
    truncated: the silhouette extends beyond the image border. difficult: set by the VOC world only.
    """

    cls: Any
    box: tuple[float, float, float, float]
    mask: np.ndarray
    truncated: bool
    difficult: bool = False
    extra: dict = field(default_factory=dict)


def _rot(points: np.ndarray, angle_deg: float) -> np.ndarray:
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    return points @ np.array([[c, s], [-s, c]])


def _circle_pts(
    n: int = 48, ax: float = 1.0, ay: float = 1.0, cx: float = 0.0, cy: float = 0.0
) -> np.ndarray:
    t = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    return np.stack([cx + ax * np.cos(t), cy + ay * np.sin(t)], 1)


def _regular(n: int, radius: float = 1.0, phase_deg: float = -90.0) -> np.ndarray:
    t = np.radians(phase_deg) + np.arange(n) * 2 * math.pi / n
    return np.stack([radius * np.cos(t), radius * np.sin(t)], 1)


def _shape_polys(shape: str) -> tuple[list[np.ndarray], list[np.ndarray], float]:
    """Unit-radius outlines: (filled polygons, holes, max rotation in degrees)."""
    if shape == "circle":
        return [_circle_pts()], [], 0.0
    if shape == "ellipse":
        return [_circle_pts(ay=0.55)], [], 180.0
    if shape == "ring":
        return [_circle_pts()], [_circle_pts(ax=0.55, ay=0.55)], 0.0
    if shape == "square":
        return [np.array([[-0.85, -0.85], [0.85, -0.85], [0.85, 0.85], [-0.85, 0.85]])], [], 15.0
    if shape == "diamond":
        return [np.array([[0.0, -1.0], [0.6, 0.0], [0.0, 1.0], [-0.6, 0.0]])], [], 15.0
    if shape == "triangle":
        return [_regular(3) + np.array([0.0, 0.25])], [], 20.0
    if shape == "star":
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        t = np.radians(-90.0) + np.arange(10) * math.pi / 5
        return [np.stack([radii * np.cos(t), radii * np.sin(t)], 1)], [], 180.0
    if shape == "cross":
        a, b = 0.3, 1.0
        pts = [
            (-a, -b),
            (a, -b),
            (a, -a),
            (b, -a),
            (b, a),
            (a, a),
            (a, b),
            (-a, b),
            (-a, a),
            (-b, a),
            (-b, -a),
            (-a, -a),
        ]
        return [np.array(pts, dtype=float)], [], 20.0
    if shape == "hexagon":
        return [_regular(6, phase_deg=0.0)], [], 180.0
    if shape == "crescent":
        return [_circle_pts()], [_circle_pts(ax=0.8, ay=0.8, cx=0.45)], 180.0
    raise ValueError(f"unknown shape {shape!r}; valid: {SHAPES}")


_SHIFT = 4  # sub-pixel bits for cv2.fillPoly


def _fill(canvas: np.ndarray, polys: Sequence[np.ndarray], value: int) -> None:
    pts = [np.round(p * (1 << _SHIFT)).astype(np.int32) for p in polys]
    cv2.fillPoly(canvas, pts, value, lineType=cv2.LINE_8, shift=_SHIFT)


def _rasterize(
    h: int, w: int, filled: Sequence[np.ndarray], holes: Sequence[np.ndarray]
) -> tuple[np.ndarray, bool]:
    """Rasterize image-coordinate polygons into a bool [h, w] mask; also whether it was cut by the border.

    Pixel centres sit at integer coordinates here (OpenCV's convention) -- consistent for every shape.
    """
    allpts = np.concatenate(list(filled))
    pad = (
        int(
            max(
                0.0,
                -allpts[:, 0].min(),
                -allpts[:, 1].min(),
                allpts[:, 0].max() - w + 1,
                allpts[:, 1].max() - h + 1,
            )
        )
        + 2
    )
    canvas = np.zeros((h + 2 * pad, w + 2 * pad), np.uint8)
    off = np.array([pad, pad], dtype=float)
    _fill(canvas, [p + off for p in filled], 1)
    if holes:
        _fill(canvas, [p + off for p in holes], 0)
    inside = canvas[pad : pad + h, pad : pad + w]
    truncated = bool(canvas.sum() != inside.sum())
    return inside.astype(bool), truncated


def tight_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Toolkit-convention tight box of a non-empty bool mask [H, W]."""
    rows = np.flatnonzero(mask.any(1))
    cols = np.flatnonzero(mask.any(0))
    if rows.size == 0:
        raise ValueError("empty mask has no box")
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    px = np.array([[[np.clip(h, 0, 179), np.clip(s, 0, 255), np.clip(v, 0, 255)]]], np.uint8)
    return cv2.cvtColor(px, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _object_colour(rng: np.random.Generator, colour: str) -> np.ndarray:
    hue = (COLOURS[colour] + rng.uniform(-5, 5)) % 180
    return _hsv_to_rgb(hue, rng.uniform(170, 255), rng.uniform(150, 255))


def _background(rng: np.random.Generator, h: int, w: int, clutter: float) -> np.ndarray:
    """Smooth random colour field (mostly muted colours) + distractor strokes; float32 [h, w, 3] RGB."""
    gh, gw = int(rng.integers(2, 6)), int(rng.integers(2, 6))
    hsv = np.stack(
        [rng.uniform(0, 180, (gh, gw)), rng.uniform(0, 120, (gh, gw)), rng.uniform(60, 230, (gh, gw))], -1
    ).astype(np.uint8)
    grid = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).astype(np.float32)
    img = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    n = int(round(rng.integers(3, 10) * clutter))
    side = min(h, w)
    for _ in range(n):
        if rng.random() < 0.5:
            col = _object_colour(rng, _COLOUR_NAMES[int(rng.integers(len(_COLOUR_NAMES)))])
        else:
            col = rng.uniform(0, 255, 3).astype(np.float32)
        col = tuple(float(c) for c in col)
        kind = rng.integers(3)
        if kind == 0:  # thin line across part of the image
            p0 = rng.uniform(0, [w, h])
            p1 = rng.uniform(0, [w, h])
            cv2.line(
                img,
                tuple(int(v) for v in p0),
                tuple(int(v) for v in p1),
                col,
                int(rng.integers(1, 3)),
                cv2.LINE_AA,
            )
        elif kind == 1:  # small blob
            c = tuple(int(v) for v in rng.uniform(0, [w, h]))
            axes = tuple(int(max(1, v)) for v in rng.uniform(0.02, 0.06, 2) * side)
            cv2.ellipse(img, c, axes, float(rng.uniform(0, 180)), 0, 360, col, -1, cv2.LINE_AA)
        else:  # scribble: short random walk
            k = int(rng.integers(4, 9))
            steps = rng.normal(0, 0.08 * side, (k, 2))
            pts = np.cumsum(steps, 0) + rng.uniform(0, [w, h])
            cv2.polylines(
                img, [np.round(pts).astype(np.int32)], False, col, int(rng.integers(1, 3)), cv2.LINE_AA
            )
    return img


def _texture(rng: np.random.Generator, texture: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Mixing weight t in [0, 1] towards the secondary (dark) colour; u, v: object-frame coordinates."""
    period = max(4.0, r * rng.uniform(0.4, 0.55))
    if texture == "solid":
        return np.zeros_like(u)
    if texture == "stripes":
        return (np.floor(u / (period / 2)) % 2).astype(np.float32)
    if texture == "dots":
        du = (u / period) % 1.0 - 0.5
        dv = (v / period) % 1.0 - 0.5
        return (du * du + dv * dv < 0.32**2).astype(np.float32)
    if texture == "checker":
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    if texture == "gradient":
        return np.clip((u + r) / (2 * r), 0, 1).astype(np.float32)
    raise ValueError(f"unknown texture {texture!r}; valid: {TEXTURES}")


def _paint_object(rng: np.random.Generator, img: np.ndarray, spec: dict) -> SceneObject:
    cls: ObjectClass = spec["cls"]
    h, w = img.shape[:2]
    cx, cy = spec["center"]
    r = float(spec["radius"])
    filled, holes, max_rot = _shape_polys(cls.shape)
    angle = spec.get("angle")
    if angle is None:
        angle = float(rng.uniform(-max_rot, max_rot))
    aspect = float(spec.get("aspect", rng.uniform(0.85, 1.15)))
    scale = np.array([r * aspect, r / aspect])
    to_img = lambda p: _rot(p * scale, angle) + np.array([cx, cy])  # noqa: E731
    mask, truncated = _rasterize(h, w, [to_img(p) for p in filled], [to_img(p) for p in holes])
    if not mask.any():
        raise ValueError(
            f"object {cls.name!r} at {spec['center']} radius {r} falls outside the {w}x{h} image"
        )
    x0, y0, x1, y1 = (int(b) for b in tight_box(mask))
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    a = math.radians(angle + float(rng.uniform(-10, 10)))
    u = (xs - cx) * math.cos(a) + (ys - cy) * math.sin(a)
    v = -(xs - cx) * math.sin(a) + (ys - cy) * math.cos(a)
    t = _texture(rng, cls.texture, u, v, r)[..., None]
    c1 = _object_colour(rng, cls.colour)
    c2 = c1 * rng.uniform(0.2, 0.4)
    shade = (1.0 - 0.15 * np.clip(v / r, -1, 1))[..., None]  # light from the top
    colour = (c1 * (1 - t) + c2 * t) * shade
    m = mask[y0:y1, x0:x1]
    img[y0:y1, x0:x1][m] = colour[m]
    return SceneObject(cls, (float(x0), float(y0), float(x1), float(y1)), mask, truncated)


def _bird_parts(flip: bool) -> dict[str, list[np.ndarray]]:
    """Unit bird facing right (head at +x); flip mirrors it. Parts in body units."""
    parts = {
        "body": [_circle_pts(ay=0.6)],
        "head": [_circle_pts(ax=0.38, ay=0.38, cx=0.95, cy=-0.45)],
        "beak": [np.array([[1.28, -0.55], [1.62, -0.42], [1.28, -0.32]])],
        "tail": [np.array([[-0.8, -0.15], [-1.6, -0.5], [-1.65, 0.05], [-0.8, 0.25]])],
        "wing": [_rot(_circle_pts(ax=0.62, ay=0.3), -12.0) + np.array([-0.15, -0.05])],
        "wing_stripe": [np.array([[-0.35, -0.35], [-0.15, -0.35], [0.05, 0.25], [-0.15, 0.25]])],
        "breast_band": [np.array([[0.42, -0.7], [0.68, -0.7], [0.68, 0.7], [0.42, 0.7]])],
        "head_spot": [_circle_pts(ax=0.19, ay=0.19, cx=0.9, cy=-0.62)],
        "eye": [_circle_pts(ax=0.07, ay=0.07, cx=1.08, cy=-0.5)],
    }
    if flip:
        parts = {k: [p * np.array([-1.0, 1.0]) for p in v] for k, v in parts.items()}
    return parts


def _jitter_rgb(rng: np.random.Generator, rgb: Sequence[float], amount: float = 14.0) -> np.ndarray:
    return np.clip(
        np.asarray(rgb, np.float32) * rng.uniform(0.85, 1.1) + rng.normal(0, amount / 2, 3), 0, 255
    )


def _paint_bird(rng: np.random.Generator, img: np.ndarray, spec: dict) -> SceneObject:
    cls: BirdClass = spec["cls"]
    h, w = img.shape[:2]
    cx, cy = spec["center"]
    s = float(spec["radius"])  # body half-length in pixels
    angle = float(spec.get("angle", rng.uniform(-15, 15)))
    parts = _bird_parts(bool(spec.get("flip", rng.random() < 0.5)))
    to_img = lambda p: _rot(p * s, angle) + np.array([cx, cy])  # noqa: E731
    mask, truncated = _rasterize(
        h, w, [to_img(p) for k in ("body", "head", "beak", "tail") for p in parts[k]], []
    )
    if not mask.any():
        raise ValueError(f"bird {cls.name!r} at {spec['center']} falls outside the {w}x{h} image")
    gain = rng.uniform(0.85, 1.1)

    def paint(part: str, colour: str | tuple, clip_to_bird: bool = True) -> None:
        m, _ = _rasterize(h, w, [to_img(p) for p in parts[part]], [])
        if clip_to_bird:
            m &= mask
        rgb = BIRD_COLOURS[colour] if isinstance(colour, str) else colour
        img[m] = _jitter_rgb(rng, np.asarray(rgb, np.float32) * gain, 10.0)

    paint("tail", cls.wing)
    paint("body", cls.body)
    paint("head", cls.head)
    paint("beak", (60, 50, 40))
    paint("wing", cls.wing)
    if cls.wing_stripe:
        wing, _ = _rasterize(h, w, [to_img(p) for p in parts["wing"]], [])
        stripe, _ = _rasterize(h, w, [to_img(p) for p in parts["wing_stripe"]], [])
        img[stripe & wing & mask] = _jitter_rgb(rng, BIRD_COLOURS[cls.wing_stripe], 10.0)
    if cls.breast_band:
        band, _ = _rasterize(h, w, [to_img(p) for p in parts["breast_band"]], [])
        body, _ = _rasterize(h, w, [to_img(p) for p in parts["body"]], [])
        img[band & body & mask] = _jitter_rgb(rng, BIRD_COLOURS[cls.breast_band], 10.0)
    if cls.head_spot:
        paint("head_spot", cls.head_spot)
    paint("eye", "black")
    return SceneObject(cls, tight_box(mask), mask, truncated)


def render_scene(
    rng: np.random.Generator,
    size: tuple[int, int],
    objects_spec: Sequence[dict],
    clutter: float = 1.0,
    noise: float = 4.0,
) -> tuple[np.ndarray, list[SceneObject]]:
    """Render one scene.

    rng: the only source of randomness. size: (height, width).
    objects_spec: painted in order (later ones occlude earlier ones); each a dict with ``cls`` (ObjectClass or
    BirdClass), ``center`` (cx, cy) in pixels, ``radius`` (half-extent in pixels), optional ``angle``
    (degrees), ``aspect`` (ObjectClass) or ``flip`` (BirdClass).
    Returns the RGB image uint8 [H, W, 3] and one SceneObject per spec (full silhouette, tight box).
    """
    h, w = int(size[0]), int(size[1])
    img = _background(rng, h, w, clutter)
    out = []
    for spec in objects_spec:
        painter = _paint_bird if isinstance(spec["cls"], BirdClass) else _paint_object
        out.append(painter(rng, img, spec))
    if noise > 0:
        img += rng.normal(0.0, noise, img.shape).astype(np.float32)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), out


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def place_objects(
    rng: np.random.Generator,
    size: tuple[int, int],
    radius_fracs: Sequence[tuple[float, float]],
    inside: float = 1.0,
    max_iou: float = 0.3,
    tries: int = 30,
) -> list[tuple[tuple[float, float], float]]:
    """Random (center, radius) for each radius range (fractions of the shorter side), rejecting overlaps.

    inside: how much of the radius must lie inside the image (1 = fully inside, < 1 allows truncation).
    Objects that find no place after ``tries`` draws are dropped (the first one always fits).
    """
    h, w = size
    side = min(h, w)
    placed: list[tuple[tuple[float, float], float]] = []
    for lo, hi in radius_fracs:
        for _ in range(tries):
            r = float(rng.uniform(lo, hi)) * side
            m = r * inside
            cx = float(rng.uniform(min(m, w / 2), max(w - m, w / 2)))
            cy = float(rng.uniform(min(m, h / 2), max(h - m, h / 2)))
            box = (cx - r, cy - r, cx + r, cy + r)
            if all(_iou(box, (c[0] - rr, c[1] - rr, c[0] + rr, c[1] + rr)) <= max_iou for c, rr in placed):
                placed.append(((cx, cy), r))
                break
    return placed


# ----------------------------------------------------------------------------------------------------------
# The scenes of each world (pure functions of (seed, world, index))
# ----------------------------------------------------------------------------------------------------------


def _image_size(rng: np.random.Generator, lo_hi: tuple[int, int]) -> tuple[int, int]:
    lo, hi = lo_hi
    return int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))


def imagenet_scene(seed: int, val: bool, index: int, label: int, preset: str = "demo"):
    """One ImageNet-world image: the class's object (radius 12.5-30% of the side = 25-60% box side),
    sometimes (15%) a smaller second instance of the same class."""
    cfg = PRESETS[preset]
    rng = image_rng(seed, _W_IMNET_VAL if val else _W_IMNET_TRAIN, index)
    size = _image_size(rng, cfg["imagenet_size"])
    fracs = [(0.125, 0.3)] + ([(0.09, 0.15)] if rng.random() < 0.15 else [])
    placed = place_objects(rng, size, fracs, inside=1.0, max_iou=0.05)
    cls = IMAGENET_CLASSES[label]
    return render_scene(rng, size, [dict(cls=cls, center=c, radius=r) for c, r in placed])


def multi_object_scene(
    seed: int,
    world: int,
    index: int,
    classes: Sequence[ObjectClass],
    size_range: tuple[int, int],
    difficult_area: float | None = None,
):
    """VOC/COCO image: 1-4 objects; the first one's class cycles through ``classes`` (every class appears in
    every split), the others are random. Some objects cross the border (truncated). With ``difficult_area``
    (pixels), objects whose box is smaller are marked difficult with probability 1/2."""
    rng = image_rng(seed, world, index)
    size = _image_size(rng, size_range)
    n = int(rng.choice([1, 2, 3, 4], p=[0.3, 0.35, 0.2, 0.15]))
    fracs = [(0.12, 0.3)] + [(0.06, 0.25)] * (n - 1)
    placed = place_objects(rng, size, fracs, inside=0.65, max_iou=0.25)
    labels = [index % len(classes)] + [int(rng.integers(len(classes))) for _ in placed[1:]]
    img, objs = render_scene(
        rng, size, [dict(cls=classes[k], center=c, radius=r) for k, (c, r) in zip(labels, placed)]
    )
    if difficult_area is not None:
        for o in objs:
            x0, y0, x1, y1 = o.box
            if (x1 - x0) * (y1 - y0) < difficult_area and rng.random() < 0.5:
                o.difficult = True
    return img, objs


def voc_scene(seed: int, year: str, index: int, preset: str = "demo"):
    """Image ``index`` (0-based, in id order) of VOC``year``; objects below a box area of (0.16 * min size)^2
    pixels are difficult with probability 1/2."""
    cfg = PRESETS[preset]
    world = {"2007": _W_VOC07, "2012": _W_VOC12}[str(year)]
    return multi_object_scene(
        seed,
        world,
        index,
        VOC_OBJECT_CLASSES,
        cfg["voc_size"],
        difficult_area=(0.16 * cfg["voc_size"][0]) ** 2,
    )


def coco_scene(seed: int, split: str, index: int, preset: str = "demo"):
    """Image ``index`` (0-based, in id order) of COCO ``split`` ("train2017" or "val2017")."""
    world = {"train2017": _W_COCO_TRAIN, "val2017": _W_COCO_VAL}[split]
    return multi_object_scene(seed, world, index, COCO_OBJECT_CLASSES, PRESETS[preset]["coco_size"])


def cub_scene(seed: int, index: int, label: int, preset: str = "demo"):
    """One bird (box 35-70% of the width) on a cluttered background."""
    cfg = PRESETS[preset]
    rng = image_rng(seed, _W_CUB, index)
    h, w = _image_size(rng, cfg["cub_size"])
    s = float(rng.uniform(0.35, 0.7)) * w / 3.3
    cx = float(rng.uniform(1.7 * s, w - 1.7 * s))
    cy = float(rng.uniform(1.1 * s, h - 1.0 * s))
    return render_scene(rng, (h, w), [dict(cls=CUB_CLASSES[label], center=(cx, cy), radius=s)])


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------


def _write_jpeg(path: Path, img: np.ndarray) -> None:
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    )
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.tobytes())


def _xml_box(box: Sequence[float]) -> tuple[int, int, int, int]:
    """Toolkit box -> VOC/ImageNet 1-based inclusive (xmin, ymin, xmax, ymax)."""
    x0, y0, x1, y1 = box
    return int(round(x0)) + 1, int(round(y0)) + 1, int(round(x1)), int(round(y1))


def _polygons(mask: np.ndarray) -> list[list[float]]:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polys = []
    for c in contours:
        c = c.reshape(-1, 2)
        if len(c) < 3:  # degenerate sliver: fall back to its pixel square outline
            x0, y0 = c.min(0)
            x1, y1 = c.max(0) + 1
            c = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
        polys.append([float(v) for v in c.reshape(-1)])
    return polys


def _record(objs: list[SceneObject], size: tuple[int, int], with_polygons: bool) -> dict:
    rec = {"height": size[0], "width": size[1], "objects": []}
    for o in objs:
        d = {
            "box": list(o.box),
            "truncated": o.truncated,
            "difficult": o.difficult,
            "area": float(o.mask.sum()),
        }
        if with_polygons:
            d["segmentation"] = _polygons(o.mask)
        rec["objects"].append(d)
    return rec


def _run_task(task: tuple) -> dict:
    """Render one image, write its JPEG, return its annotation record (labels as given in the task)."""
    kind, path, args, labels_from = task
    scene = {"imagenet": imagenet_scene, "voc": voc_scene, "coco": coco_scene, "cub": cub_scene}[kind]
    img, objs = scene(*args)
    _write_jpeg(Path(path), img)
    rec = _record(objs, img.shape[:2], with_polygons=(kind in ("voc", "coco")))
    rec["labels"] = [labels_from.index(o.cls) for o in objs]
    return rec


def _map(tasks: list[tuple], workers: int, desc: str, progress: bool) -> list[dict]:
    from tqdm import tqdm

    bar = dict(total=len(tasks), desc=desc, disable=None if progress else True, leave=False)
    if workers <= 1 or len(tasks) < 64:
        return [_run_task(t) for t in tqdm(tasks, **bar)]
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(workers) as pool:
        return list(tqdm(pool.imap(_run_task, tasks, chunksize=8), **bar))


def _xml_tree(
    folder: str, filename: str, size: tuple[int, int], objects: list[tuple[str, dict]], database: str
) -> ET.ElementTree:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = folder
    ET.SubElement(root, "filename").text = filename
    src = ET.SubElement(root, "source")
    ET.SubElement(src, "database").text = database
    sz = ET.SubElement(root, "size")
    ET.SubElement(sz, "width").text = str(size[1])
    ET.SubElement(sz, "height").text = str(size[0])
    ET.SubElement(sz, "depth").text = "3"
    ET.SubElement(root, "segmented").text = "0"
    for name, o in objects:
        ob = ET.SubElement(root, "object")
        ET.SubElement(ob, "name").text = name
        ET.SubElement(ob, "pose").text = "Unspecified"
        ET.SubElement(ob, "truncated").text = str(int(o["truncated"]))
        ET.SubElement(ob, "difficult").text = str(int(o["difficult"]))
        bb = ET.SubElement(ob, "bndbox")
        for k, v in zip(("xmin", "ymin", "xmax", "ymax"), _xml_box(o["box"])):
            ET.SubElement(bb, k).text = str(v)
    tree = ET.ElementTree(root)
    ET.indent(tree, "\t")
    return tree


def _write_xml(path: Path, tree: ET.ElementTree) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tree.write(path, encoding="utf-8", xml_declaration=False)


def _write_lines(path: Path, lines: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{ln}\n" for ln in lines))


def _make_imagenet(out: Path, seed: int, preset: str, workers: int, progress: bool) -> dict:
    cfg = PRESETS[preset]
    root = out / "imagenet"
    wnids = imagenet_wnids(len(IMAGENET_CLASSES))
    C, ntr, nva = len(wnids), cfg["imagenet_train"], cfg["imagenet_val"]
    tasks = []
    for k, wnid in enumerate(wnids):
        for j in range(ntr):
            path = root / "train" / wnid / f"{wnid}_{j + 1}.JPEG"
            tasks.append(("imagenet", str(path), (seed, False, k * ntr + j, k, preset), IMAGENET_CLASSES))
    _map(tasks, workers, "imagenet/train", progress)
    # val: numbered in a shuffled class order, as in ILSVRC2012, then filed into class folders
    order = np.random.default_rng([seed, _W_SPLITS, 1]).permutation(C * nva)
    val_tasks, stems = [], []
    for i in range(C * nva):
        label = int(order[i]) % C
        stem = f"ILSVRC2012_val_{i + 1:08d}"
        stems.append((stem, label))
        path = root / "val" / wnids[label] / f"{stem}.JPEG"
        val_tasks.append(("imagenet", str(path), (seed, True, i, label, preset), IMAGENET_CLASSES))
    recs = _map(val_tasks, workers, "imagenet/val", progress)
    csv = ["ImageId,PredictionString"]
    n_boxes = 0
    for (stem, label), rec in zip(stems, recs):
        objs = [(wnids[lab], o) for lab, o in zip(rec["labels"], rec["objects"])]
        n_boxes += len(objs)
        _write_xml(
            root / "val_boxes" / f"{stem}.xml",
            _xml_tree("val", stem, (rec["height"], rec["width"]), objs, "ILSVRC_2012"),
        )
        csv.append(
            f"{stem},"
            + " ".join(f"{name} " + " ".join(str(v) for v in _xml_box(o["box"])) for name, o in objs)
        )
    _write_lines(root / "LOC_val_solution.csv", csv)
    _write_lines(
        root / "LOC_synset_mapping.txt", [f"{w} {c.description}" for w, c in zip(wnids, IMAGENET_CLASSES)]
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


def voc_ids(year: str, n: int) -> list[str]:
    """Sorted VOC image ids; image index i of ``voc_scene`` is ``voc_ids(year, n)[i]``.

    2007: ``000001`` ...; 2012: ``2008_000001`` ... spread over the years 2008-2011 like the real set."""
    if str(year) == "2007":
        return [f"{i + 1:06d}" for i in range(n)]
    per_year = -(-n // 4)
    return [f"{2008 + i // per_year}_{i % per_year + 1:06d}" for i in range(n)]


def _make_voc(out: Path, seed: int, preset: str, workers: int, progress: bool) -> dict:
    cfg = PRESETS[preset]
    devkit = out / "VOCdevkit"
    summary: dict[str, Any] = {
        "path": "VOCdevkit",
        "classes": list(VOC_CLASSES),
        "num_classes": len(VOC_CLASSES),
    }
    for year, world, n_total in (
        ("2007", _W_VOC07, cfg["voc07_trainval"] + cfg["voc07_test"]),
        ("2012", _W_VOC12, cfg["voc12_trainval"]),
    ):
        root = devkit / f"VOC{year}"
        ids = voc_ids(year, n_total)
        tasks = [
            ("voc", str(root / "JPEGImages" / f"{iid}.jpg"), (seed, year, i, preset), VOC_OBJECT_CLASSES)
            for i, iid in enumerate(ids)
        ]
        recs = _map(tasks, workers, f"VOC{year}", progress)
        n_obj = n_diff = n_trunc = 0
        for iid, rec in zip(ids, recs):
            objs = [(VOC_CLASSES[lab], o) for lab, o in zip(rec["labels"], rec["objects"])]
            n_obj += len(objs)
            n_diff += sum(o["difficult"] for _, o in objs)
            n_trunc += sum(o["truncated"] for _, o in objs)
            _write_xml(
                root / "Annotations" / f"{iid}.xml",
                _xml_tree(
                    f"VOC{year}", f"{iid}.jpg", (rec["height"], rec["width"]), objs, f"The VOC{year} Database"
                ),
            )
        rng = np.random.default_rng([seed, _W_SPLITS, world])
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
            _write_lines(root / "ImageSets" / "Main" / f"{name}.txt", lst)
        summary[f"VOC{year}"] = {
            "path": f"VOCdevkit/VOC{year}",
            "num_images": n_total,
            "num_objects": n_obj,
            "num_difficult": n_diff,
            "num_truncated": n_trunc,
            "splits": {k: len(v) for k, v in splits.items()},
        }
    return summary


def _make_coco(out: Path, seed: int, preset: str, workers: int, progress: bool) -> dict:
    cfg = PRESETS[preset]
    root = out / "coco"
    cats = [{"id": cid, "name": name, "supercategory": sup} for cid, name, sup in COCO_CATEGORIES]
    summary: dict[str, Any] = {
        "path": "coco",
        "categories": [[c["id"], c["name"]] for c in cats],
        "num_classes": len(cats),
    }
    ann_id = 1
    for split, world, n, first_id, step in (
        ("train2017", _W_COCO_TRAIN, cfg["coco_train"], 9, 13),
        ("val2017", _W_COCO_VAL, cfg["coco_val"], 139, 7),
    ):
        img_ids = [first_id + step * i for i in range(n)]
        tasks = [
            ("coco", str(root / split / f"{iid:012d}.jpg"), (seed, split, i, preset), COCO_OBJECT_CLASSES)
            for i, iid in enumerate(img_ids)
        ]
        recs = _map(tasks, workers, f"coco/{split}", progress)
        images, anns = [], []
        for iid, rec in zip(img_ids, recs):
            images.append(
                {
                    "id": iid,
                    "file_name": f"{iid:012d}.jpg",
                    "width": rec["width"],
                    "height": rec["height"],
                    "license": 1,
                }
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
        data = {
            "info": {
                "description": "mixup-transfer toy world (COCO layout)",
                "version": "1.0",
                "year": 2017,
                "contributor": "pretrain.toy",
                "date_created": "2017/09/01",
            },
            "licenses": [
                {"id": 1, "name": "CC0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}
            ],
            "images": images,
            "annotations": anns,
            "categories": cats,
        }
        path = root / "annotations" / f"instances_{split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
        summary[split] = {
            "path": f"coco/{split}",
            "annotations": f"coco/annotations/instances_{split}.json",
            "num_images": len(images),
            "num_objects": len(anns),
        }
    return summary


def _make_cub(out: Path, seed: int, preset: str, workers: int, progress: bool) -> dict:
    cfg = PRESETS[preset]
    root = out / "CUB_200_2011"
    ntr, nte = cfg["cub_train"], cfg["cub_test"]
    folders = [f"{k + 1:03d}.{c.name}" for k, c in enumerate(CUB_CLASSES)]
    tasks, rel, labels, is_train = [], [], [], []
    rng = np.random.default_rng([seed, _W_SPLITS, _W_CUB])
    for k, c in enumerate(CUB_CLASSES):
        train_mask = np.zeros(ntr + nte, bool)
        train_mask[rng.permutation(ntr + nte)[:ntr]] = True
        for j in range(ntr + nte):
            idx = len(rel)
            rp = f"{folders[k]}/{c.name}_{j + 1:04d}_{1000 + 37 * idx}.jpg"
            rel.append(rp)
            labels.append(k)
            is_train.append(bool(train_mask[j]))
            tasks.append(("cub", str(root / "images" / rp), (seed, idx, k, preset), CUB_CLASSES))
    recs = _map(tasks, workers, "CUB", progress)
    _write_lines(root / "images.txt", [f"{i + 1} {p}" for i, p in enumerate(rel)])
    _write_lines(root / "image_class_labels.txt", [f"{i + 1} {lab + 1}" for i, lab in enumerate(labels)])
    _write_lines(root / "train_test_split.txt", [f"{i + 1} {int(t)}" for i, t in enumerate(is_train)])
    _write_lines(root / "classes.txt", [f"{k + 1} {f}" for k, f in enumerate(folders)])
    boxes = []
    for i, rec in enumerate(recs):
        x0, y0, x1, y1 = rec["objects"][0]["box"]
        boxes.append(f"{i + 1} {x0:.1f} {y0:.1f} {x1 - x0:.1f} {y1 - y0:.1f}")
    _write_lines(root / "bounding_boxes.txt", boxes)
    return {
        "path": "CUB_200_2011",
        "classes": folders,
        "class_descriptions": [c.description for c in CUB_CLASSES],
        "num_classes": len(folders),
        "num_train": int(sum(is_train)),
        "num_test": len(rel) - int(sum(is_train)),
    }


def _readme(summary: dict) -> str:
    im, voc, coco, cub = summary["imagenet"], summary["voc"], summary["coco"], summary["cub"]
    lines = [
        f"mixup-transfer toy world (preset {summary['preset']!r}, seed {summary['seed']})",
        "Generated by pretrain.toy.make_toy_world (tools/make_toy_data.py). Same seed -> identical files.",
        "",
        "Vocabulary shared by every world: shapes "
        + ", ".join(SHAPES)
        + "; colours "
        + ", ".join(COLOURS)
        + "; textures "
        + ", ".join(TEXTURES)
        + ". An object class is a (colour, texture, shape) combination.",
        "Backgrounds: smooth random colour fields + pixel noise + distractor lines, blobs, scribbles",
        "(the distractors are not objects).",
        "Boxes are the exact tight boxes of each object's silhouette (clipped to the image).",
        "",
        f"imagenet/  {im['num_classes']} classes, {im['num_train']} train, {im['num_val']} val images, "
        f"{im['num_val_boxes']} val boxes (val_boxes/*.xml and LOC_val_solution.csv, 1-based inclusive).",
    ]
    lines += [f"    {w}  {n}" for w, n in zip(im["classes"], im["class_names"])]
    lines += ["", "VOCdevkit/  the 20 VOC class names, each a fixed vocabulary combination:"]
    lines += [f"    {c.name:12s} {c.description}" for c in VOC_OBJECT_CLASSES]
    for y in ("VOC2007", "VOC2012"):
        v = voc[y]
        lines.append(
            f"  {y}: {v['num_images']} images, {v['num_objects']} objects ({v['num_difficult']} difficult, "
            f"{v['num_truncated']} truncated), splits {v['splits']}"
        )
    lines += ["", "coco/  categories (non-contiguous ids as in COCO):"]
    lines += [
        f"    {cid:3d} {c.name:10s} {c.description}"
        for (cid, _, _), c in zip(COCO_CATEGORIES, COCO_OBJECT_CLASSES)
    ]
    for s in ("train2017", "val2017"):
        lines.append(f"  {s}: {coco[s]['num_images']} images, {coco[s]['num_objects']} objects")
    lines += [
        "",
        f"CUB_200_2011/  {cub['num_classes']} fine-grained bird classes (same silhouette; colours and "
        f"markings differ), {cub['num_train']} train / {cub['num_test']} test images:",
    ]
    lines += [f"    {f:28s} {d}" for f, d in zip(cub["classes"], cub["class_descriptions"])]
    lines += [
        "",
        f"wsol_metadata/CUB: {summary['wsol_metadata'] or _NO_WSOL}",
    ]
    return "\n".join(lines) + "\n"


_MARKER = ".toy_world_incomplete"  # exists while a world is being written
_OUTPUTS = ("imagenet", "VOCdevkit", "coco", "CUB_200_2011", "wsol_metadata", "README.txt", "toy_world.json")


def _clear_previous(out: Path) -> None:
    """Remove the outputs of an earlier (or interrupted) toy world, so that no stale files stay behind; refuse
    to touch dataset folders that this module did not write."""
    present = [name for name in _OUTPUTS if (out / name).exists()]
    if not present:
        return
    if not ((out / "toy_world.json").is_file() or (out / _MARKER).is_file()):
        raise FileExistsError(
            f"{out} already holds {present} but no toy_world.json: not overwriting data that the toy "
            "generator did not write; choose an empty --out directory"
        )
    for name in present:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def make_toy_world(
    out_dir: str | os.PathLike,
    preset: str = "tiny",
    seed: int = 0,
    workers: int | None = None,
    progress: bool = False,
) -> dict:
    """Write the four toy datasets (+ wsol metadata, README.txt, toy_world.json) under ``out_dir``.

    Returns the summary dict (also written to ``out_dir/toy_world.json`` with paths relative to ``out_dir``;
    the returned dict adds ``root``, the absolute output directory). ``workers`` (default: up to 2 processes)
    does not change the output. ``toy_world.json`` is written last: its presence marks a complete world.
    A previous toy world in ``out_dir`` is replaced; other existing dataset folders there are an error.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown toy preset {preset!r}; valid: {sorted(PRESETS)}")
    out = Path(out_dir)
    _clear_previous(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / _MARKER).write_text("written by pretrain.toy.make_toy_world; removed when complete\n")
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    args = (out, int(seed), preset, workers, progress)
    summary: dict[str, Any] = {"preset": preset, "seed": int(seed)}
    summary["imagenet"] = _make_imagenet(*args)
    summary["voc"] = _make_voc(*args)
    summary["coco"] = _make_coco(*args)
    summary["cub"] = _make_cub(*args)
    summary["wsol_metadata"] = None
    try:
        from wsol.data import cub_to_wsol_metadata
    except ImportError:
        warnings.warn(
            "wsol.data.cub_to_wsol_metadata is not available; wsol_metadata/CUB not written", stacklevel=2
        )
    else:
        cub_to_wsol_metadata(out / "CUB_200_2011", out / "wsol_metadata" / "CUB")
        summary["wsol_metadata"] = "wsol_metadata/CUB"
    (out / "README.txt").write_text(_readme(summary))
    (out / "toy_world.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / _MARKER).unlink()
    summary["root"] = str(out.resolve())
    return summary


def format_summary(summary: dict) -> str:
    """A readable multi-line summary of ``make_toy_world``'s result."""
    root = Path(summary.get("root", "."))
    im, voc, coco, cub = summary["imagenet"], summary["voc"], summary["coco"], summary["cub"]
    rows = [
        f"toy world: preset={summary['preset']} seed={summary['seed']} -> {root}",
        f"  imagenet : {im['num_classes']} classes, train {im['num_train']} images, "
        f"val {im['num_val']} images / {im['num_val_boxes']} boxes   {root / im['path']}",
    ]
    for y in ("VOC2007", "VOC2012"):
        v = voc[y]
        split = " ".join(f"{k} {n}" for k, n in v["splits"].items())
        rows.append(
            f"  {y}  : {voc['num_classes']} classes, {v['num_images']} images / {v['num_objects']} objects "
            f"({v['num_difficult']} difficult, {v['num_truncated']} truncated), {split}   {root / v['path']}"
        )
    for s in ("train2017", "val2017"):
        c = coco[s]
        ids = [cat[0] for cat in coco["categories"]]
        rows.append(
            f"  coco {s[:-4]:5s}: {coco['num_classes']} categories (ids {ids}), "
            f"{c['num_images']} images / {c['num_objects']} objects   {root / c['annotations']}"
        )
    rows.append(
        f"  CUB      : {cub['num_classes']} classes, train {cub['num_train']} / test {cub['num_test']} "
        f"images   {root / cub['path']}"
    )
    wm = summary.get("wsol_metadata")
    rows.append(f"  wsol metadata: {root / wm if wm else _NO_WSOL}")
    return "\n".join(rows)
