"""Pascal VOC detection scoring with the devkit's rules (VOCevaldet.m), vectorised with numpy.

Rules, all as in the VOC devkit:
- boxes are compared in the XML's 1-based inclusive pixel coordinates: width = xmax - xmin + 1, and
  IoU = inter / union with the +1 on every side length;
- detections of one class are ranked by score, descending (a stable sort: equal scores keep the
  order of the result file, like MATLAB's `sort`);
- each detection is compared with every ground-truth box of its image and class (difficult ones
  included) and takes the one of largest IoU (the first on ties). If that IoU >= `iou` (the
  devkit's `ovmax >= minoverlap`; the python port voc_eval.py uses `>`, which differs only at
  exactly 0.5): a difficult box makes the detection "don't care" (neither TP nor FP), an undetected
  box makes it a TP, an already detected box makes it a FP (duplicate). Below the threshold it is a
  FP;
- recall = TP / (number of non-difficult boxes), precision = TP / (TP + FP);
- metric "11point" (VOC2007): mean over t in {0, 0.1, ..., 1} of max(precision[recall >= t]) (0 if
  empty); the thresholds are `np.arange(0, 1.1, 0.1)` like the python port (so t=0.3 is
  0.30000000000000004 and a recall of exactly 0.3 does not reach it);
  metric "area" (VOC2010+): area under the monotone (right-to-left running max) precision envelope.
- boxes with xmax < xmin or ymax < ymin (sub-pixel detections in the inclusive convention;
  detectron2's result files hold them) are scored with the same formula, as the devkit scores them,
  and counted in a warning (`reversed_boxes`);
- A class with no non-difficult ground truth in the split has no defined AP: it is reported as None
  and left out of the mean (the devkit would print 0 for it; on the real VOC test sets every class
  has ground truth, so the two agree there).

Result files follow the devkit: `<results>/comp4_det_<split>_<class>.txt`, one detection a line,
`image_id score xmin ymin xmax ymax` in the XML's coordinates (the toolkit's internal x0 = xmin -
1, x1 = xmax: see `boxes_to_voc_xml`). All numbers returned are percentages.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from mixup_transfer.core.basics import atomic_path
from mixup_transfer.core.constants import VOC_CLASSES
from mixup_transfer.core.data import DataError, pascal_to_box, read_text, safe_relative

# not via transfer.datasets: that imports torch
from mixup_transfer.core.data import parse_pascal_xml as parse_voc_xml

log = logging.getLogger(__name__)

METRICS = ("11point", "area")
RESULT_TEMPLATE = "comp4_det_{split}_{cls}.txt"


class VOCEvalError(DataError):
    """Malformed result files or annotations (the message names the file and line)."""


# -------------------------------------------------------------------------------------------------
# AP from a precision / recall curve


def voc_ap(recall: np.ndarray, precision: np.ndarray, metric: str = "11point") -> float:
    """AP (a fraction in [0, 1]) of one class from its cumulative recall/precision curve.

    recall, precision: [D] in detection rank order.
    """
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if metric == "11point":
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            reached = precision[recall >= t]
            ap += (reached.max() if reached.size else 0.0) / 11.0
        return float(ap)
    if metric == "area":
        mrec = np.concatenate(([0.0], recall, [1.0]))
        mpre = np.concatenate(([0.0], precision, [0.0]))
        # precision envelope, non-increasing in recall
        mpre = np.maximum.accumulate(mpre[::-1])[::-1]
        step = np.flatnonzero(mrec[1:] != mrec[:-1])
        return float(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))
    raise ValueError(f"unknown VOC metric {metric!r}; valid: {list(METRICS)}")


# -------------------------------------------------------------------------------------------------
# Ground truth


def _gt_by_class(annotations: Mapping[str, Mapping], classes: Sequence[str]) -> dict[str, dict]:
    """Per class: boxes [G, 4] float64 (XML coords), difficult [G] bool, image index [G] int,
    sorted by image so that each image's boxes are contiguous; plus per-image start / count [I]."""
    image_ids = list(annotations)
    class_set = set(classes)
    per = {c: ([], [], []) for c in classes}
    for i, image_id in enumerate(image_ids):
        for j, obj in enumerate(annotations[image_id]["objects"]):
            name = obj["name"]
            if name not in class_set:
                raise VOCEvalError(f"annotation of image {image_id!r}, object {j}: class "
                                   f"{name!r} is not one of the evaluated classes {list(classes)}")
            boxes, difficult, index = per[name]
            boxes.append(obj["bbox"])
            difficult.append(bool(obj.get("difficult", False)))
            index.append(i)
    out = {}
    n_images = len(image_ids)
    for c, (boxes, difficult, index) in per.items():
        index = np.asarray(index, dtype=np.int64)
        count = np.bincount(index, minlength=n_images)
        out[c] = {"boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
                  "difficult": np.asarray(difficult, dtype=bool),
                  "start": np.concatenate(([0], np.cumsum(count)[:-1])).astype(np.int64),
                  "count": count}
    return out


# -------------------------------------------------------------------------------------------------
# One class


_CHUNK = 1 << 20  # detection x ground-truth pairs per vectorised IoU block


def _best_overlap(box: np.ndarray, start: np.ndarray, count: np.ndarray, gt_boxes: np.ndarray,
                  k: int) -> tuple[np.ndarray, np.ndarray]:
    """For each detection, the first ground-truth box of largest inclusive-pixel IoU among the
    `count` boxes from `start` (-inf IoU when none overlaps). box: [D, 4]; returns (jmax [D], ovmax
    [D])."""
    slot = start[:, None] + np.arange(k)[None, :]                 # [D, K] global GT index
    valid = np.arange(k)[None, :] < count[:, None]                # [D, K]
    g = gt_boxes[np.where(valid, slot, 0)]                        # [D, K, 4]
    b = box[:, None, :]
    iw = np.minimum(b[..., 2], g[..., 2]) - np.maximum(b[..., 0], g[..., 0]) + 1.0
    ih = np.minimum(b[..., 3], g[..., 3]) - np.maximum(b[..., 1], g[..., 1]) + 1.0
    inter = iw * ih
    union = ((b[..., 2] - b[..., 0] + 1.0) * (b[..., 3] - b[..., 1] + 1.0)
             + (g[..., 2] - g[..., 0] + 1.0) * (g[..., 3] - g[..., 1] + 1.0) - inter)
    overlaps = valid & (iw > 0) & (ih > 0)
    ov = np.where(overlaps, inter / np.where(overlaps, union, 1.0), -np.inf)
    jmax = np.argmax(ov, axis=1)                                  # first maximum, like the devkit
    return jmax, ov[np.arange(len(box)), jmax]


def _class_tp_fp(det_img: np.ndarray, det_score: np.ndarray, det_box: np.ndarray, gt: dict,
                 iou: float) -> tuple[np.ndarray, np.ndarray]:
    """tp, fp: [D] 0/1 float in rank order, for one class.

    det_img: [D] int image index, det_score: [D], det_box: [D, 4] XML coordinates.
    """
    order = np.argsort(-det_score, kind="stable")
    det_img, det_box = det_img[order], det_box[order]
    n = len(order)
    tp = np.zeros(n)
    fp = np.zeros(n)
    if n == 0:
        return tp, fp
    # [D] boxes of this class in the image
    count = gt["count"][det_img]
    k = int(count.max()) if count.size else 0
    if k == 0:
        fp[:] = 1.0
        return tp, fp
    jmax = np.empty(n, dtype=np.int64)
    ovmax = np.empty(n)
    step = max(1, _CHUNK // k)  # bounds the [chunk, K] temporaries for crowded classes
    for lo in range(0, n, step):
        sl = slice(lo, lo + step)
        jmax[sl], ovmax[sl] = _best_overlap(det_box[sl], gt["start"][det_img[sl]], count[sl],
                                            gt["boxes"], k)
    # [D] global index of the chosen box (0 where the image has none: never a hit then)
    best = np.where(count > 0, gt["start"][det_img] + jmax, 0)
    hit = ovmax >= iou
    difficult = gt["difficult"][best]
    # A non-difficult box is claimed by the first (highest-ranked) detection whose best match it
    # is; later ones are duplicates. Which box a detection picks never depends on earlier matches.
    claim = np.flatnonzero(hit & ~difficult)
    _, first = np.unique(best[claim], return_index=True)
    tp[claim[first]] = 1.0
    fp[claim] = 1.0
    fp[claim[first]] = 0.0
    fp[~hit] = 1.0
    return tp, fp


def _class_ap(tp: np.ndarray, fp: np.ndarray, npos: int, metric: str) -> float:
    tp_c = np.cumsum(tp)
    fp_c = np.cumsum(fp)
    recall = tp_c / npos
    precision = tp_c / np.maximum(tp_c + fp_c, np.finfo(np.float64).eps)
    return voc_ap(recall, precision, metric)


# -------------------------------------------------------------------------------------------------
# Public API


def _check_args(metric: str, iou: float) -> None:
    if metric not in METRICS:
        raise VOCEvalError(f"--metric: unknown VOC metric {metric!r}; valid: {list(METRICS)}")
    if not 0.0 < iou <= 1.0:
        raise VOCEvalError(f"--iou: threshold must be in (0, 1], got {iou}")


def _as_arrays(dets, image_index: Mapping[str, int], cls: str, source=None):
    """(image index [D], score [D], box [D, 4]) from a list of (image_id, score, box) tuples or a
    dict {"image_ids": [D], "scores": [D], "boxes": [D, 4]} (the fast path for large result
    sets)."""
    def where(i):
        return source[i] if source is not None else f"class {cls!r}, detection {i}"

    if isinstance(dets, Mapping):
        try:
            ids = [str(v) for v in dets["image_ids"]]
            score = np.asarray(dets["scores"], dtype=np.float64).reshape(-1)
            box = np.asarray(dets["boxes"], dtype=np.float64).reshape(-1, 4)
        except (KeyError, TypeError, ValueError) as err:
            raise VOCEvalError(f"class {cls!r}: expected {{'image_ids': [D], 'scores': [D], "
                               f"'boxes': [D, 4]}} ({type(err).__name__}: {err})") from None
        if not len(ids) == len(score) == len(box):
            raise VOCEvalError(f"class {cls!r}: image_ids, scores and boxes differ in length "
                               f"({len(ids)}, {len(score)}, {len(box)})")
    else:
        try:  # one pass per field; the per-item loop below only runs to locate an error
            if any(len(d) != 3 for d in dets):
                raise ValueError("not (image_id, score, box)")
            ids, score, box = zip(*dets) if len(dets) else ((), (), ())
            score = np.array(score, dtype=np.float64).reshape(-1)
            box = np.array(box, dtype=np.float64).reshape(len(ids), 4)
        except (TypeError, ValueError, IndexError, KeyError) as err:
            for i, d in enumerate(dets):
                try:
                    _, s, b = d
                    float(s)
                    np.asarray(b, dtype=np.float64).reshape(4)
                except (TypeError, ValueError, IndexError):
                    raise VOCEvalError(f"{where(i)}: expected (image_id, score, (xmin, ymin, "
                                       f"xmax, ymax)), got {d!r}") from None
            raise VOCEvalError(f"class {cls!r}: malformed detections ({err})") from err
    get = image_index.get
    img = np.fromiter((get(i if type(i) is str else str(i), -1) for i in ids), dtype=np.int64,
                      count=len(ids))
    if (img < 0).any():
        i = int(np.flatnonzero(img < 0)[0])
        raise VOCEvalError(f"{where(i)}: unknown image id {ids[i]!r} (not in the evaluated split)")
    bad = ~(np.isfinite(score) & np.isfinite(box).all(axis=1))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise VOCEvalError(f"{where(i)}: a non-finite number: score {score[i]}, box "
                           f"{box[i].tolist()}")
    return img, score, box


def reversed_boxes(box: np.ndarray) -> np.ndarray:
    """[D] bool: boxes with xmax < xmin or ymax < ymin (box: [D, 4] XML coordinates).

    In the XML's inclusive convention a box narrower than one pixel has xmax < xmin (detectron2
    writes x0 + 1 and x1 for a predicted x0..x1, so 0.3 px wide gives xmax = xmin - 0.7). The
    devkit accepts them and scores them with its formula: width xmax - xmin + 1 (here 0.3), and an
    overlap only where iw = min(xmax) - max(xmin) + 1 > 0 and ih > 0, so a box reversed by a pixel
    or more never matches (a false positive). `voc_evaluate` does the same and counts them in a
    warning."""
    box = np.asarray(box, dtype=np.float64).reshape(-1, 4)
    return (box[:, 2] < box[:, 0]) | (box[:, 3] < box[:, 1])


def voc_evaluate(detections: Mapping[str, Sequence], annotations: Mapping[str, Mapping],
                 classes: Sequence[str] = VOC_CLASSES, metric: str = "11point", iou: float = 0.5,
                 _sources: Mapping[str, list] | None = None) -> dict:
    """Score detections against VOC ground truth with the devkit's rules (see the module
    docstring).

    detections: {class: [(image_id, score, (xmin, ymin, xmax, ymax)), ...]} in XML coordinates (or
        {class: {"image_ids": [D], "scores": [D], "boxes": [D, 4]}}); a class missing from the dict
        has no detections.
    annotations: {image_id: parse_voc_xml(...)} for every image of the evaluated split (images
    without
        objects included: their detections are false positives).
    Returns {"metric": metric, "mAP": percent, "AP": {class: percent or None (no ground truth)},
    "iou": iou}; mAP averages the classes that have ground truth.
    """
    _check_args(metric, iou)
    unknown = sorted(set(detections) - set(classes))
    if unknown:
        raise VOCEvalError(f"detections for unknown classes {unknown}; valid: {list(classes)}")
    image_index = {str(k): i for i, k in enumerate(annotations)}
    gt = _gt_by_class(annotations, classes)
    ap = {}
    n_reversed, n_total, first_reversed = 0, 0, None
    for cls in classes:
        npos = int((~gt[cls]["difficult"]).sum())
        source = _sources.get(cls) if _sources else None
        img, score, box = _as_arrays(detections.get(cls, ()), image_index, cls, source)
        rev = reversed_boxes(box)
        n_reversed += int(rev.sum())
        n_total += len(box)
        if first_reversed is None and rev.any():
            i = int(np.flatnonzero(rev)[0])
            first_reversed = (f"{source[i]}" if source is not None
                              else f"class {cls!r}, detection {i}") + \
                f": {box[i].tolist()}"
        if npos == 0:
            ap[cls] = None
            if len(score):
                log.warning("VOC eval: class %r has %d detections but no ground truth; AP "
                            "undefined, left out of the mAP", cls, len(score))
            continue
        tp, fp = _class_tp_fp(img, score, box, gt[cls], iou)
        ap[cls] = 100.0 * _class_ap(tp, fp, npos, metric)
    if n_reversed:
        log.warning("VOC eval: %d of %d detections have xmax < xmin or ymax < ymin (sub-pixel "
                    "boxes, as detectron2 writes them; first: %s); scored as the devkit scores "
                    "them (width xmax - xmin + 1)", n_reversed, n_total, first_reversed)
    defined = [v for v in ap.values() if v is not None]
    if not defined:  # an mAP of NaN is no result: say why instead
        raise VOCEvalError(f"no ground-truth box of the evaluated classes {list(classes)} in the "
                           f"{len(annotations)} annotated image(s) (only difficult ones, or "
                           "none): mAP undefined")
    mean = float(np.mean(defined))
    return {"metric": metric, "iou": iou, "mAP": mean, "AP": ap, "reversed_boxes": n_reversed}


def boxes_to_voc_xml(boxes) -> np.ndarray:
    """The toolkit's x0, y0, x1, y1 (continuous pixels) -> VOC XML xmin, ymin, xmax, ymax (1-based
    inclusive): xmin = x0 + 1, xmax = x1. boxes: [N, 4].

    A predicted box less than one pixel wide (or high) would come out with xmax < xmin; the
    inclusive convention cannot express it, so it becomes a one-pixel box (xmax = xmin).
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    b[:, :2] += 1.0
    b[:, 2:] = np.maximum(b[:, 2:], b[:, :2])
    return b


# -------------------------------------------------------------------------------------------------
# Files


def _voc_root(devkit: str | os.PathLike, year: str) -> Path:
    """`devkit` may be the VOCdevkit folder (holding VOC<year>) or VOC<year> itself."""
    devkit = Path(devkit)
    for root in (devkit / f"VOC{year}", devkit):
        if (root / "ImageSets" / "Main").is_dir() and (root / "Annotations").is_dir():
            return root
    raise VOCEvalError(f"{devkit}: not a VOC devkit (expected {devkit}/VOC{year}/ImageSets/Main "
                       "and Annotations)")


def check_voc_annotation(ann: Mapping, xml: str | os.PathLike) -> None:
    """Validate one parsed VOC annotation as the evaluator uses it: a positive `<size>`, and every
    box with xmin <= xmax, ymin <= ymax (1-based inclusive: at least one pixel) inside the image
    (within `mixup_transfer.core.data.BOX_TOLERANCE`). `VOCEvalError` naming the file and object
    otherwise; nothing is skipped (the devkit would silently score a box outside the image)."""
    if ann["width"] <= 0 or ann["height"] <= 0:
        raise VOCEvalError(f"{xml}: non-positive <size> {ann['width']}x{ann['height']}")
    for j, obj in enumerate(ann["objects"]):
        try:
            pascal_to_box(obj["bbox"], ann["width"], ann["height"],
                          f"{xml}: object {j} ({obj['name']})")
        except DataError as e:
            raise VOCEvalError(str(e)) from None


def load_voc_annotations(devkit: str | os.PathLike, year: str = "2007",
                         split: str = "test") -> dict:
    """{image_id: parse_voc_xml(...)} for the images of `ImageSets/Main/<split>.txt`, in file
    order.

    Every annotation is validated (`check_voc_annotation`); a duplicate image id in the split file
    or an empty split is a `VOCEvalError` naming the file and line.
    """
    root = _voc_root(devkit, str(year))
    list_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not list_file.is_file():
        raise VOCEvalError(f"{list_file}: VOC split file not found")
    annotations = {}
    for lineno, line in enumerate(read_text(list_file, VOCEvalError).splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 1:
            raise VOCEvalError(f"{list_file}:{lineno}: expected one image id, got {line!r}")
        safe_relative(parts[0], f"{list_file}:{lineno}: image id", VOCEvalError)
        if parts[0] in annotations:
            raise VOCEvalError(f"{list_file}:{lineno}: duplicate image id {parts[0]!r}")
        xml = root / "Annotations" / f"{parts[0]}.xml"
        annotations[parts[0]] = parse_voc_xml(xml)
        check_voc_annotation(annotations[parts[0]], xml)
    if not annotations:
        raise VOCEvalError(f"{list_file}: empty split (no image ids)")
    return annotations


def read_voc_results(results_dir: str | os.PathLike, split: str,
                     classes: Sequence[str] = VOC_CLASSES,
                     image_ids: Iterable[str] | None = None) -> tuple[dict, dict]:
    """Parse `comp4_det_<split>_<class>.txt` files.

    Returns (detections {class: [(image_id, score, box)]}, sources {class: ["file:line", ...]}). A
    missing file means no detections for that class (logged); no file at all, a file for an unknown
    class, a malformed line or an unknown image id raise `VOCEvalError` naming file:line. Boxes
    with xmax < xmin are kept, as the devkit keeps them (see `reversed_boxes`).
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise VOCEvalError(f"{results_dir}: results folder not found")
    prefix = f"comp4_det_{split}_"
    found = {p.name[len(prefix):-len(".txt")]: p for p in results_dir.iterdir()
             if p.name.startswith(prefix) and p.name.endswith(".txt")}
    if not found:
        pattern = RESULT_TEMPLATE.format(split=split, cls="<class>")
        raise VOCEvalError(f"{results_dir}: no result files {pattern}")
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise VOCEvalError(f"{found[unknown[0]]}: unknown class {unknown[0]!r}; valid: "
                           f"{list(classes)}")
    missing = [c for c in classes if c not in found]
    if missing:
        log.warning("VOC results in %s: no file for %d class(es) %s: counted as no detections",
                    results_dir, len(missing), missing)
    known = set(map(str, image_ids)) if image_ids is not None else None
    detections, sources = {}, {}
    for cls, path in found.items():
        dets, where = [], []
        read_text(path, VOCEvalError)  # a binary or non-UTF-8 file: an error naming it
        with open(path) as f:
            for lineno, line in enumerate(f, start=1):
                parts = line.split()
                if not parts:
                    continue
                loc = f"{path}:{lineno}"
                if len(parts) != 6:
                    raise VOCEvalError(
                        f"{loc}: expected 'image_id score xmin ymin xmax ymax', got "
                        f"{line.strip()!r}")
                try:
                    score, *box = (float(v) for v in parts[1:])
                except ValueError:
                    raise VOCEvalError(f"{loc}: malformed number in {line.strip()!r}") from None
                if not all(map(math.isfinite, [score, *box])):
                    raise VOCEvalError(f"{loc}: non-finite number in {line.strip()!r}")
                if known is not None and parts[0] not in known:
                    raise VOCEvalError(f"{loc}: unknown image id {parts[0]!r} (not in the "
                                       f"{split!r} split file)")
                dets.append((parts[0], score, box))
                where.append(loc)
        detections[cls], sources[cls] = dets, where
    return detections, sources


def write_voc_results(out_dir: str | os.PathLike, split: str,
                      detections: Mapping[str, Sequence]) -> list[Path]:
    """Write one `comp4_det_<split>_<class>.txt` per class of `detections` (boxes in XML
    coordinates).

    Numbers are written with Python's shortest round-trip repr, so reading the files back gives
    exactly the in-memory evaluation. Each file is written to a temporary name then renamed.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for cls, dets in detections.items():
        path = out_dir / RESULT_TEMPLATE.format(split=split, cls=cls)
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            for image_id, score, box in dets:
                nums = " ".join(repr(float(v)) for v in (score, *box))
                f.write(f"{image_id} {nums}\n")
        paths.append(path)
    return paths


def evaluate_voc_results(devkit: str | os.PathLike, results_dir: str | os.PathLike,
                         year: str = "2007", split: str = "test", metric: str | None = None,
                         iou: float = 0.5, classes: Sequence[str] = VOC_CLASSES) -> dict:
    """Score result files against the devkit's annotations (what tools/eval_voc.py prints).

    metric None -> "11point" for 2007, "area" for later years (the devkit's choice).
    """
    if metric is None:
        metric = "11point" if str(year) == "2007" else "area"
    _check_args(metric, iou)
    annotations = load_voc_annotations(devkit, year, split)
    detections, sources = read_voc_results(results_dir, split, classes, annotations.keys())
    return voc_evaluate(detections, annotations, classes, metric, iou, _sources=sources)
