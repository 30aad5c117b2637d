"""COCO box AP: pycocotools' COCOeval (the reference) or faster-coco-eval (same numbers, faster).

`coco_evaluate` returns the 12 numbers COCOeval.summarize() prints, as percentages under names:
AP (IoU .50:.95), AP50, AP75, APs, APm, APl (area small < 32^2 <= medium < 96^2 <= large, from the
annotations' `area`), AR1, AR10, AR100 (max detections per image), ARs, ARm, ARl. An area range
without ground truth gives None (pycocotools' -1: no value, not a score).

Results are the standard COCO results list: [{"image_id", "category_id", "bbox": [x, y, w, h],
"score"}], boxes in the image's pixel coordinates (the toolkit's x0, y0, x1, y1 -> [x0, y0, x1 -
x0, y1 - y0]: see `boxes_to_coco_xywh`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mixup_transfer.core.data import BOX_TOLERANCE, InputError, read_text

log = logging.getLogger(__name__)

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
              "ARl")
BACKENDS = ("auto", "pycocotools", "faster")


class COCOEvalError(InputError):
    """Malformed ground truth or results (the message names the file and the entry)."""


def faster_available() -> bool:
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str = "auto") -> str:
    """"auto" -> "faster" when faster-coco-eval is importable, else "pycocotools"."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown COCO eval backend {backend!r}; valid: {list(BACKENDS)}")
    if backend == "auto":
        return "faster" if faster_available() else "pycocotools"
    if backend == "faster" and not faster_available():
        raise ImportError("backend='faster' needs faster-coco-eval: pip install faster-coco-eval "
                          "(or the toolkit's `fast` extra: pip install -e .[fast])")
    return backend


def boxes_to_coco_xywh(boxes) -> np.ndarray:
    """The toolkit's x0, y0, x1, y1 -> COCO [x, y, w, h]. boxes: [N, 4]."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    b[:, 2:] -= b[:, :2]
    return b


# -------------------------------------------------------------------------------------------------
# Input reading and validation


def _read_json(path: str | os.PathLike, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise COCOEvalError(f"{path}: {what} file not found")
    try:
        return json.loads(read_text(path, COCOEvalError))
    except json.JSONDecodeError as e:
        raise COCOEvalError(f"{path}: malformed JSON: {e}") from e


def load_gt_dataset(gt) -> tuple[dict, str]:
    """(COCO ground-truth dict, name for messages) from a path, a dict or a COCO object
    (pycocotools or faster-coco-eval: anything with a `.dataset` dict)."""
    if isinstance(gt, (str, os.PathLike)):
        name, data = str(gt), _read_json(gt, "COCO annotation")
    elif isinstance(gt, Mapping):
        name, data = "<ground-truth dict>", gt
    elif isinstance(getattr(gt, "dataset", None), Mapping):
        name, data = "<COCO object>", gt.dataset
    else:
        raise TypeError("ground truth must be a path, a dict or a COCO object, got "
                        f"{type(gt).__name__}")
    check_coco_gt(data, name)
    if not data["annotations"]:
        raise COCOEvalError(f"{name}: no annotations: nothing to evaluate (every AP would be -1)")
    return data, name


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_coco_annotation(ann: Mapping, image: Mapping, where: str, error: type = None,
                          outside: str = "error") -> bool:
    """Validate one COCO box annotation against its image entry (raises `error`, COCOEvalError by
    default).

    bbox: 4 finite numbers [x, y, w, h] with w > 0, h > 0, inside the image up to BOX_TOLERANCE
    pixels;
    area: a number >= 0 (COCOeval's area ranges use it: a negative area would silently drop the box
    from every range); iscrowd: the integer 0 or 1. outside="error" raises for a box beyond the
    image; outside="count" returns False for it instead (True otherwise), for the caller to count
    and log.
    """
    error = error or COCOEvalError
    bbox = ann.get("bbox")
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4
            and all(_is_number(v) for v in bbox)):
        raise error(f"{where}: bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        raise error(f"{where}: bbox {list(bbox)} has a non-positive width or height")
    t, iw, ih = BOX_TOLERANCE, image["width"], image["height"]
    inside = not (x < -t or y < -t or x + w > iw + t or y + h > ih + t)
    if not inside and outside == "error":
        raise error(f"{where}: bbox {list(bbox)} lies outside the {iw}x{ih} image")
    area = ann.get("area")
    if not _is_number(area) or area < 0:
        raise error(f"{where}: area must be a number >= 0, got {area!r}")
    crowd = ann.get("iscrowd")
    if not _is_int(crowd) or crowd not in (0, 1):
        raise error(f"{where}: iscrowd must be 0 or 1, got {crowd!r}")
    return inside


def check_coco_gt(data: Mapping, name: str, error: type = None, annotations: bool = True) -> None:
    """Validate a COCO ground-truth dict (raises `error`, COCOEvalError by default, naming `name`
    and the
    entry: its list index and id).

    images: integer ids, unique (pycocotools would silently merge duplicates), positive integer
    width and height; categories: integer ids, unique; annotations: unique ids, `image_id` and
    `category_id` that exist (COCOeval would silently ignore the rest), and with `annotations=True`
    each box checked by `check_coco_annotation`. No images is an error (an empty split).

    The one tolerance: COCOeval never looks at image sizes, so a ground-truth box reaching beyond
    its image (by more than BOX_TOLERANCE) is scored as given, like the reference does; such boxes
    are counted and logged as a warning. Nothing is skipped.
    """
    error = error or COCOEvalError
    if not isinstance(data, Mapping):
        raise error(f"{name}: expected a JSON object, found {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise error(f"{name}: missing or malformed {key!r} list")
        bad = next((i for i, e in enumerate(data[key]) if not isinstance(e, Mapping)), None)
        if bad is not None:
            raise error(f"{name}: {key}[{bad}] must be an object, got {data[key][bad]!r}")
    if not data["images"]:
        raise error(f"{name}: no images (an empty split)")
    images, cats = _coco_images(data, name, error), _coco_categories(data, name, error)
    ann_ids, outside = set(), []
    for i, ann in enumerate(data["annotations"]):
        where = (f"{name}: annotation id {ann.get('id')!r} (annotations[{i}], "
                 f"image id {ann.get('image_id')!r})")
        missing = [k for k in ("id", "image_id", "category_id", "bbox", "area", "iscrowd")
                   if k not in ann]
        if missing:
            raise error(f"{where}: lacks {missing} (COCOeval needs them)")
        if not _is_int(ann["id"]):
            raise error(f"{where}: id must be an integer, got {ann['id']!r}")
        if ann["id"] in ann_ids:
            raise error(f"{where}: duplicate annotation id {ann['id']!r}")
        ann_ids.add(ann["id"])
        if not _is_int(ann["image_id"]) or ann["image_id"] not in images:
            raise error(f"{where}: unknown image id {ann['image_id']!r} (not in 'images')")
        if not _is_int(ann["category_id"]) or ann["category_id"] not in cats:
            raise error(f"{where}: unknown category id {ann['category_id']!r}; valid: "
                        f"{sorted(cats)[:20]}")
        if annotations and not check_coco_annotation(ann, images[ann["image_id"]], where, error,
                                                     "count"):
            outside.append(where)
    if outside:
        log.warning("%s: %d ground-truth box(es) reach beyond their image (scored as given, as "
                    "COCOeval does), e.g. %s", name, len(outside), outside[:3])


def _coco_images(data: Mapping, name: str, error: type) -> dict:
    """{id: image entry}, ids unique integers, widths and heights positive integers."""
    images: dict = {}
    for i, img in enumerate(data["images"]):
        iid = img.get("id")
        if not _is_int(iid):
            raise error(f"{name}: images[{i}]: id must be an integer, got {iid!r}")
        if iid in images:
            raise error(f"{name}: images[{i}]: duplicate image id {iid}")
        for k in ("width", "height"):
            v = img.get(k)
            if not (_is_number(v) and float(v).is_integer() and v > 0):
                raise error(f"{name}: images[{i}] (id {iid}): {k} must be a positive integer, "
                            f"got {v!r}")
        images[iid] = img
    return images


def _coco_categories(data: Mapping, name: str, error: type) -> set:
    cats = set()
    for i, cat in enumerate(data["categories"]):
        cid = cat.get("id")
        if not _is_int(cid):
            raise error(f"{name}: categories[{i}]: id must be an integer, got {cid!r}")
        if cid in cats:
            raise error(f"{name}: categories[{i}]: duplicate category id {cid}")
        cats.add(cid)
    return cats


def check_results(results, image_ids, cat_ids, name: str = "<results>") -> list[dict]:
    """Validate a COCO box results list; returns clean copies with plain Python numbers (the COCO
    API writes into its input, and numpy scalars would upset the C++ backend)."""
    if not isinstance(results, list):
        raise COCOEvalError(f"{name}: expected a JSON list of detections, found "
                            f"{type(results).__name__}")
    image_ids, cat_ids = set(image_ids), set(cat_ids)
    try:  # vectorised checks; the per-entry loop below only runs to name the bad entry
        clean = [{"image_id": _plain(r["image_id"]), "category_id": _plain(r["category_id"]),
                  "bbox": list(map(float, r["bbox"])), "score": float(r["score"])}
                  for r in results]
        boxes = np.array([c["bbox"] for c in clean], dtype=np.float64).reshape(len(clean), 4)
        scores = np.array([c["score"] for c in clean], dtype=np.float64)
        if (np.isfinite(boxes).all() and np.isfinite(scores).all() and (boxes[:, 2:] >= 0).all()
                and image_ids.issuperset(c["image_id"] for c in clean)
                and cat_ids.issuperset(c["category_id"] for c in clean)):
            return clean
    except (TypeError, ValueError, KeyError, IndexError):
        pass
    for i, r in enumerate(results):
        where = f"{name}: results[{i}]"
        if not isinstance(r, Mapping):
            raise COCOEvalError(f"{where}: expected an object, found {r!r}")
        missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in r]
        if missing:
            raise COCOEvalError(f"{where}: missing {missing}")
        for key in ("image_id", "category_id"):
            v = _plain(r[key])
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise COCOEvalError(f"{where}: {key} must be an integer, got {r[key]!r}")
        if _plain(r["image_id"]) not in image_ids:
            raise COCOEvalError(f"{where}: unknown image_id {r['image_id']!r} (not in the ground "
                                "truth)")
        if _plain(r["category_id"]) not in cat_ids:
            raise COCOEvalError(
                f"{where}: unknown category_id {r['category_id']!r}; valid: {sorted(cat_ids)}")
        bbox = r["bbox"]
        try:
            ok = (len(bbox) == 4 and all(math.isfinite(float(v)) for v in bbox)
                  and math.isfinite(float(r["score"])))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise COCOEvalError(f"{where}: bbox must be 4 finite numbers [x, y, w, h] and score "
                                f"finite, got bbox={bbox!r} score={r['score']!r}")
        if bbox[2] < 0 or bbox[3] < 0:
            raise COCOEvalError(
                f"{where}: negative width/height in bbox {list(bbox)} (COCO boxes are [x, y, w, "
                "h])")
    # unreachable unless an unforeseen type slips by
    raise COCOEvalError(f"{name}: malformed results")


def _plain(v):
    return v.item() if hasattr(v, "item") else v


# -------------------------------------------------------------------------------------------------
# Evaluation


def build_coco(backend: str, gt_data: dict, results: list):
    """(cocoGt, cocoDt, COCOeval class) for the backend."""
    if backend == "faster":
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as COCOeval
    else:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        # COCOeval writes an "ignore" flag into the ground-truth annotations: give it copies
        gt.dataset = {**gt_data, "annotations": [dict(a) for a in gt_data["annotations"]]}
        gt.createIndex()
        if results:
            dt = gt.loadRes(results)
        else:  # loadRes refuses an empty list; no detections is a legitimate (all-zero) result
            dt = COCO()
            dt.dataset = {"images": list(gt_data["images"]), "annotations": [],
                          "categories": copy.deepcopy(gt_data["categories"])}
            dt.createIndex()
    return gt, dt, COCOeval


def run_cocoeval(cocogt, cocodt, COCOeval, backend: str):
    """evaluate + accumulate + summarize (bbox); returns (the COCOeval object, its printed
    summary)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if backend == "faster":
            ev = COCOeval(cocogt, cocodt, iouType="bbox", print_function=print)
        else:
            ev = COCOeval(cocogt, cocodt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev, out.getvalue()


def coco_evaluate(gt, results, backend: str = "auto", per_category: bool = False) -> dict:
    """The 12 COCO box stats in percent (names in STAT_NAMES; None where an area range has no GT).

    gt: annotation file path, COCO dict or COCO object. results: results list or JSON file path.
    backend: "auto" (faster-coco-eval when installed), "pycocotools" or "faster".
    per_category: also return {"per_category": {category name: AP percent, or None without ground
    truth}}. Images of the ground truth without any detection count as misses.
    """
    backend = resolve_backend(backend)
    gt_data, gt_name = load_gt_dataset(gt)
    if isinstance(results, (str, os.PathLike)):
        res_name, results = str(results), _read_json(results, "COCO results")
    else:
        res_name = "<results list>"
    image_ids = [img["id"] for img in gt_data["images"]]
    cat_ids = [c["id"] for c in gt_data["categories"]]
    results = check_results(results, image_ids, cat_ids, res_name)
    cocogt, cocodt, COCOeval = build_coco(backend, gt_data, results)
    ev, text = run_cocoeval(cocogt, cocodt, COCOeval, backend)
    log.debug("COCO eval (%s) of %s vs %s:\n%s", backend, res_name, gt_name, text)
    stats = np.asarray(ev.stats, dtype=np.float64)[: len(STAT_NAMES)]
    result = {k: (float(v) * 100.0 if v != -1 else None) for k, v in zip(STAT_NAMES, stats)}
    if per_category:
        # [T iou, R recall, K category, A area, M maxDets]
        precision = np.asarray(ev.eval["precision"])
        names = {c["id"]: c.get("name", str(c["id"])) for c in gt_data["categories"]}
        per = {}
        for k, cat_id in enumerate(ev.params.catIds):
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            per[names[cat_id]] = float(p.mean()) * 100.0 if p.size else None
        result["per_category"] = per
    return result
