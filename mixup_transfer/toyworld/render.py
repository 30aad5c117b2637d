"""Rendering toy scenes (objects on cluttered backgrounds) and writing them in the real on-disk
formats.

Box convention in memory (``SceneObject.box``): float ``x0, y0, x1, y1`` in continuous pixel
coordinates, where pixel column ``i`` spans ``[i, i + 1)``, i.e. the tight box of a mask is ``(min
col, min row, max col + 1, max row + 1)``. On disk each format keeps its own (VOC/ImageNet XML
1-based inclusive, COCO ``[x, y, w, h]``, CUB ``x y w h``).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from mixup_transfer.toyworld.vocab import (
    BIRD_COLOURS,
    COLOUR_NAMES,
    COLOURS,
    JPEG_QUALITY,
    SHAPES,
    TEXTURES,
    BirdClass,
    ObjectClass,
    image_rng,
)

# -------------------------------------------------------------------------------------------------
# Rendering
# -------------------------------------------------------------------------------------------------


@dataclass
class SceneObject:
    """One rendered object.

    box: (x0, y0, x1, y1) floats, toolkit convention (tight box of ``mask``, ``x1 = max col + 1``).
    mask: bool [H, W], the object's full silhouette clipped to the image (later objects may occlude
    it).
    truncated: the silhouette extends beyond the image border. difficult: set by the VOC world
    only.
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
    """Rasterize image-coordinate polygons into a bool [h, w] mask; also whether it was cut by the
    border.

    Pixel centres sit at integer coordinates here (OpenCV's convention) -- consistent for every
    shape.
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
    """Smooth random colour field (mostly muted colours) + distractor strokes; float32 [h, w, 3]
    RGB."""
    gh, gw = int(rng.integers(2, 6)), int(rng.integers(2, 6))
    hsv = np.stack(
        [rng.uniform(0, 180, (gh, gw)), rng.uniform(0, 120, (gh, gw)),
         rng.uniform(60, 230, (gh, gw))], -1
    ).astype(np.uint8)
    grid = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).astype(np.float32)
    img = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    n = int(round(rng.integers(3, 10) * clutter))
    side = min(h, w)
    for _ in range(n):
        if rng.random() < 0.5:
            col = _object_colour(rng, COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))])
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
                img, [np.round(pts).astype(np.int32)], False, col, int(rng.integers(1, 3)),
                cv2.LINE_AA
            )
    return img


def _texture(rng: np.random.Generator, texture: str, u: np.ndarray, v: np.ndarray,
             r: float) -> np.ndarray:
    """Mixing weight t in [0, 1] towards the secondary (dark) colour; u, v: object-frame
    coordinates."""
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


def _jitter_rgb(rng: np.random.Generator, rgb: Sequence[float],
                amount: float = 14.0) -> np.ndarray:
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
    objects_spec: painted in order (later ones occlude earlier ones); each a dict with ``cls``
    (ObjectClass or BirdClass), ``center`` (cx, cy) in pixels, ``radius`` (half-extent in pixels),
    optional ``angle`` (degrees), ``aspect`` (ObjectClass) or ``flip`` (BirdClass). Returns the RGB
    image uint8 [H, W, 3] and one SceneObject per spec (full silhouette, tight box).
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
    """Random (center, radius) for each radius range (fractions of the shorter side), rejecting
    overlaps.

    inside: how much of the radius must lie inside the image (1 = fully inside, < 1 allows
    truncation). Objects that find no place after ``tries`` draws are dropped (the first one always
    fits).
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
            if all(_iou(box, (c[0] - rr, c[1] - rr, c[0] + rr, c[1] + rr)) <= max_iou
                   for c, rr in placed):
                placed.append(((cx, cy), r))
                break
    return placed


# -------------------------------------------------------------------------------------------------
# The scenes of each world (pure functions of (seed, world, index))
# -------------------------------------------------------------------------------------------------


def image_size(rng: np.random.Generator, lo_hi: tuple[int, int]) -> tuple[int, int]:
    lo, hi = lo_hi
    return int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))


def multi_object_scene(
    seed: int,
    world: int,
    index: int,
    classes: Sequence[ObjectClass],
    size_range: tuple[int, int],
    difficult_area: float | None = None,
):
    """VOC/COCO image: 1-4 objects; the first one's class cycles through ``classes`` (every class
    appears in every split), the others are random. Some objects cross the border (truncated). With
    ``difficult_area`` (pixels), objects whose box is smaller are marked difficult with probability
    1/2."""
    rng = image_rng(seed, world, index)
    size = image_size(rng, size_range)
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



# -------------------------------------------------------------------------------------------------
# Writing
# -------------------------------------------------------------------------------------------------


def _write_jpeg(path: Path, img: np.ndarray) -> None:
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    )
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.tobytes())


def xml_box(box: Sequence[float]) -> tuple[int, int, int, int]:
    """Toolkit box -> VOC/ImageNet 1-based inclusive (xmin, ymin, xmax, ymax)."""
    x0, y0, x1, y1 = box
    return int(round(x0)) + 1, int(round(y0)) + 1, int(round(x1)), int(round(y1))


def _polygons(mask: np.ndarray) -> list[list[float]]:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
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
    """Render one image with ``scene(*args)``, write its JPEG, return its annotation record (labels
    as indices into ``labels_from``)."""
    scene, path, args, labels_from, with_polygons = task
    img, objs = scene(*args)
    _write_jpeg(Path(path), img)
    rec = _record(objs, img.shape[:2], with_polygons=with_polygons)
    rec["labels"] = [labels_from.index(o.cls) for o in objs]
    return rec


def map_tasks(tasks: list[tuple], workers: int, desc: str, progress: bool) -> list[dict]:
    from tqdm import tqdm

    bar = dict(total=len(tasks), desc=desc, disable=None if progress else True, leave=False)
    if workers <= 1 or len(tasks) < 64:
        return [_run_task(t) for t in tqdm(tasks, **bar)]
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(workers) as pool:
        return list(tqdm(pool.imap(_run_task, tasks, chunksize=8), **bar))


def xml_tree(
    folder: str, filename: str, size: tuple[int, int], objects: list[tuple[str, dict]],
    database: str
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
        for k, v in zip(("xmin", "ymin", "xmax", "ymax"), xml_box(o["box"])):
            ET.SubElement(bb, k).text = str(v)
    tree = ET.ElementTree(root)
    ET.indent(tree, "\t")
    return tree


def write_xml(path: Path, tree: ET.ElementTree) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tree.write(path, encoding="utf-8", xml_declaration=False)


def write_lines(path: Path, lines: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{ln}\n" for ln in lines))

