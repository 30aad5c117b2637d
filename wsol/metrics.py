"""Localization metrics that agree exactly with the wsolevaluation reference.

Conventions (all as in wsolevaluation, see ``shared/reference/wsol.md``):

* Score maps are float arrays ``[H, W]`` in ``[0, 1]`` (224 x 224 at evaluation).
* Boxes are integer ``[x0, y0, x1, y1]`` with *inclusive* pixel IoU:
  ``area = (x1 - x0 + 1) * (y1 - y0 + 1)``.
* A map is quantised ``u8 = uint8(map * 255)`` (truncation); at threshold ``tau``
  the mask is ``u8 > int(tau * u8.max())`` (strict); its boxes are the
  ``cv2.boundingRect`` of every contour from ``findContours(RETR_TREE,
  CHAIN_APPROX_SIMPLE)`` (hole contours included) mapped to
  ``[x, y, min(x + w, W - 1), min(y + h, H - 1)]``; no contour -> ``[0, 0, 0, 0]``.
* Largest-contour mode keeps only ``max(contours, key=cv2.contourArea)``.
* BoxAcc(tau, delta) = % of images whose best IoU (over predicted x GT boxes)
  is ``>= delta / 100``; MaxBoxAcc(delta) = max over tau, tau chosen over the
  whole split. MaxBoxAccV2 = mean over delta in {30, 50, 70}, all contours.

Two implementations of the per-image sweep:

* :func:`reference_best_ious` — the straightforward loop: one OpenCV
  threshold + findContours per threshold of the grid.
* :func:`fast_best_ious` — identical numbers, much faster. A map has at most
  256 distinct cuts ``int(tau * max)``; for all contours (multi-contour mode)
  every cut is handled in one pass: 8-connected foreground components grow
  by union-find as the cut decreases (their contours' bounding rectangles are
  the components' bounding boxes) and 4-connected enclosed background
  components (holes; a hole's contour runs over the foreground pixels
  4-adjacent to it, so its rectangle is the hole's box grown by one pixel)
  grow as the cut increases. That pass is compiled with numba when numba is
  installed; otherwise (and for largest-contour mode, which needs polygon
  areas) OpenCV runs once per distinct mask instead of once per threshold.
"""
from __future__ import annotations

import operator
import threading
from collections.abc import Sequence

import cv2
import numpy as np

try:  # optional accelerator; results are identical without it
    import numba
except ImportError:  # pragma: no cover - exercised when numba is absent
    numba = None

__all__ = [
    "ScoreMapError", "iou_matrix", "rescale_box", "check_scoremap", "quantise",
    "boxes_at_threshold", "reference_boxes", "reference_best_ious", "fast_best_ious",
    "threshold_grid", "MaxBoxAccEvaluator", "loc_at_threshold", "LocAccuracy",
    "centred_box", "HAVE_NUMBA", "COMPARE_OPS",
]

HAVE_NUMBA = numba is not None
COMPARE_OPS = {">=": operator.ge, ">": operator.gt}


class ScoreMapError(ValueError):
    """A score map that is not 2-D, has NaNs, or lies outside [0, 1]."""


# ----------------------------------------------------------------------------- boxes and IoU
def iou_matrix(boxes_a, boxes_b) -> np.ndarray:
    """Inclusive-pixel IoU. boxes_a: [A, 4], boxes_b: [B, 4] (x0, y0, x1, y1) -> [A, B] float64.

    Intersection ``max(0, min(x1) - max(x0) + 1) * (same for y)``; area
    ``(x1 - x0 + 1) * (y1 - y0 + 1)``; a denominator <= 0 gives 0.
    """
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)[:, None, :]
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)[None, :, :]
    iw = np.maximum(0.0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1)
    ih = np.maximum(0.0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    denom = area_a + area_b - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(denom > 0, inter / np.where(denom > 0, denom, 1.0), 0.0)
    return out


def rescale_box(box, image_size, resize_size=(224, 224)) -> tuple[int, int, int, int]:
    """Rescale a box from an image of ``image_size = (w, h)`` to ``resize_size = (w, h)``.

    Each coordinate is ``int(x * new / old)`` (truncation), as wsolevaluation does.
    """
    x0, y0, x1, y1 = box
    w, h = image_size
    nw, nh = resize_size
    return int(x0 * nw / w), int(y0 * nh / h), int(x1 * nw / w), int(y1 * nh / h)


def centred_box(size=(224, 224), fraction: float = 0.5) -> np.ndarray:
    """The centred-box baseline: one box of ``fraction`` of each side, centred. size = (w, h).

    Returns int [1, 4] in the evaluation convention (inclusive pixels).
    """
    w, h = size
    bw, bh = int(round(w * fraction)), int(round(h * fraction))
    x0, y0 = (w - bw) // 2, (h - bh) // 2
    return np.array([[x0, y0, x0 + bw - 1, y0 + bh - 1]], dtype=np.int64)


# ----------------------------------------------------------------------------- score maps
def check_scoremap(scoremap, image_id=None) -> np.ndarray:
    """Validate a score map: 2-D, finite, in [0, 1]. Returns it as a float array."""
    name = f" for image {image_id!r}" if image_id is not None else ""
    arr = np.asarray(scoremap)
    if arr.ndim != 2:
        raise ScoreMapError(f"score map{name} must be 2-D, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
    if np.isnan(arr).any():
        raise ScoreMapError(f"score map{name} contains NaN")
    if arr.size and (arr.min() < 0 or arr.max() > 1):
        raise ScoreMapError(f"score map{name} lies outside [0, 1] (min {arr.min()}, max {arr.max()})")
    return arr


def quantise(scoremap) -> np.ndarray:
    """``uint8(map * 255)`` with truncation, as the reference does."""
    return (np.asarray(scoremap) * 255).astype(np.uint8)


def threshold_grid(interval: float = 0.001) -> np.ndarray:
    """The CAM threshold grid ``np.arange(0, 1, interval)``."""
    return np.arange(0, 1, interval)


def _cuts(thresholds, u8_max) -> np.ndarray:
    # int(threshold * np.max(u8)) in float64, truncated, exactly as the reference
    return (np.asarray(thresholds, dtype=np.float64) * np.float64(u8_max)).astype(np.int64)


def _contours(u8: np.ndarray, cut: int):
    mask = (u8 > cut).astype(np.uint8)
    return cv2.findContours(mask, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]


def _boxes_of_contours(contours, width, height, multi_contour) -> np.ndarray:
    if len(contours) == 0:
        return np.zeros((1, 4), dtype=np.int64)
    if not multi_contour:
        contours = [max(contours, key=cv2.contourArea)]
    boxes = []
    for c in contours:
        x, y, w, h = cv2.boundingRect(c)
        boxes.append([x, y, min(x + w, width - 1), min(y + h, height - 1)])
    return np.asarray(boxes, dtype=np.int64)


def boxes_at_threshold(scoremap, threshold: float, multi_contour: bool = True) -> np.ndarray:
    """Predicted boxes [K, 4] (int) of one score map at one threshold (reference algorithm)."""
    u8 = quantise(scoremap)
    cut = int(threshold * np.max(u8))
    h, w = u8.shape
    return _boxes_of_contours(_contours(u8, cut), w, h, multi_contour)


def reference_boxes(scoremap, thresholds, multi_contour: bool = True) -> list[np.ndarray]:
    """The straightforward loop: boxes at every threshold, one findContours each."""
    return [boxes_at_threshold(scoremap, t, multi_contour) for t in thresholds]


def reference_best_ious(scoremap, gt_boxes, thresholds, multi_contour: bool = True) -> np.ndarray:
    """Best IoU (over predicted x GT boxes) at each threshold -> [T] float64 (per-threshold loop)."""
    gt = np.asarray(gt_boxes, dtype=np.int64).reshape(-1, 4)
    per_thr = reference_boxes(scoremap, thresholds, multi_contour)
    counts = [len(b) for b in per_thr]
    ious = iou_matrix(np.concatenate(per_thr, 0), gt).max(1)
    out, i = np.empty(len(per_thr)), 0
    for k, n in enumerate(counts):
        out[k] = ious[i:i + n].max()
        i += n
    return out


# ----------------------------------------------------------------------------- fast sweep
def _distinct_mask_best_ious(u8, gt, cuts, multi_contour) -> np.ndarray:
    """OpenCV once per distinct mask (cuts giving the same pixel set share one result)."""
    h, w = u8.shape
    sorted_vals = np.sort(u8.ravel())
    # number of pixels > cut identifies the mask {u8 > cut}
    n_above = sorted_vals.size - np.searchsorted(sorted_vals, cuts, side="right")
    out = np.empty(len(cuts))
    cache: dict[int, float] = {}
    for k, (cut, key) in enumerate(zip(cuts.tolist(), n_above.tolist(), strict=True)):
        if key not in cache:
            boxes = _boxes_of_contours(_contours(u8, cut), w, h, multi_contour)
            cache[key] = float(iou_matrix(boxes, gt).max())
        out[k] = cache[key]
    return out


if numba is not None:
    _njit = numba.njit(cache=True, nogil=True)

    @_njit
    def _find(parent, i):
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:  # path compression
            nxt = parent[i]
            parent[i] = root
            i = nxt
        return root

    @_njit
    def _box_iou_max(x0, y0, x1, y1, gt):
        best = 0.0
        area_a = (x1 - x0 + 1) * (y1 - y0 + 1)
        for g in range(gt.shape[0]):
            iw = min(x1, gt[g, 2]) - max(x0, gt[g, 0]) + 1
            ih = min(y1, gt[g, 3]) - max(y0, gt[g, 1]) + 1
            if iw < 0:
                iw = 0
            if ih < 0:
                ih = 0
            inter = iw * ih
            denom = area_a + (gt[g, 2] - gt[g, 0] + 1) * (gt[g, 3] - gt[g, 1] + 1) - inter
            v = inter / denom if denom > 0 else 0.0
            if v > best:
                best = v
        return best

    @_njit
    def _tree_set(tree, size, i, v):
        i += size
        tree[i] = v
        i //= 2
        while i >= 1:
            a = tree[2 * i]
            b = tree[2 * i + 1]
            m = a if a > b else b
            if tree[i] == m:
                break
            tree[i] = m
            i //= 2

    @_njit
    def _sweep(u8, gt, foreground, order, counts, ws_i32, active, frame, tree, size, best):
        """Best IoU per cut level for all-contour boxes, in one union-find pass.

        foreground=True: 8-connected components of {u8 > c}, c from 254 down to 0;
        box [x0, y0, min(x1+1, W-1), min(y1+1, H-1)].
        foreground=False: 4-connected components of {u8 <= c} not touching the frame
        (holes), c from 0 up to 254; box of the hole contour
        [x0-1, y0-1, min(x1+2, W-1), min(y1+2, H-1)].
        Pixels are indices into the grid padded by one never-active pixel (no bounds tests).
        Writes best[256] (-1 where a level has no such box).
        """
        h, w = u8.shape
        pw = w + 2
        n = (h + 2) * pw
        parent = ws_i32[0]
        weight = ws_i32[1]
        bx0 = ws_i32[2]
        by0 = ws_i32[3]
        bx1 = ws_i32[4]
        by1 = ws_i32[5]
        stamp = ws_i32[6]
        dirty = ws_i32[7]
        for i in range(n):
            parent[i] = i
            weight[i] = 1
            stamp[i] = -1
            active[i] = False
        for i in range(2 * size):
            tree[i] = -1.0
        for i in range(256):
            best[i] = -1.0
        if foreground:
            offs = np.array([-pw - 1, -pw, -pw + 1, -1, 1, pw - 1, pw, pw + 1])
        else:
            offs = np.array([-pw, -1, 1, pw])
        for step in range(256):
            # foreground: level c = 255 - step gets the pixels of value c + 1 (none for c = 255)
            # background: level c = step gets the pixels of value c
            level = 255 - step if foreground else step
            value = level + 1 if foreground else level
            if value > 255:
                continue
            lo, hi = counts[value], counts[value + 1]
            if lo == hi:
                best[level] = tree[1]
                continue
            nd = 0  # roots whose box (or frame contact) changed at this level
            for k in range(lo, hi):
                p = order[k]
                y = p // pw - 1
                x = p - (y + 1) * pw - 1
                active[p] = True
                bx0[p] = x
                bx1[p] = x
                by0[p] = y
                by1[p] = y
                frame[p] = (x == 0) or (y == 0) or (x == w - 1) or (y == h - 1)
                rp = p
                changed = False
                for d in range(offs.shape[0]):
                    q = p + offs[d]
                    if not active[q] or parent[q] == rp:  # inactive, or already ours (cheap test first)
                        continue
                    rq = _find(parent, q)
                    if rp == rq:
                        continue
                    if weight[rp] < weight[rq]:  # union by size: the larger root survives
                        rp, rq = rq, rp
                    parent[rq] = rp
                    weight[rp] += weight[rq]
                    if bx0[rq] < bx0[rp]:
                        bx0[rp] = bx0[rq]
                        changed = True
                    if by0[rq] < by0[rp]:
                        by0[rp] = by0[rq]
                        changed = True
                    if bx1[rq] > bx1[rp]:
                        bx1[rp] = bx1[rq]
                        changed = True
                    if by1[rq] > by1[rp]:
                        by1[rp] = by1[rq]
                        changed = True
                    if frame[rq] and not frame[rp]:
                        frame[rp] = True
                        changed = True
                    if rq != p:  # an older component disappears into rp
                        _tree_set(tree, size, rq, -1.0)
                if changed or rp == p:
                    dirty[nd] = rp
                    nd += 1
            for k in range(nd):
                r = dirty[k]
                if parent[r] != r or stamp[r] == step:
                    continue
                stamp[r] = step
                if foreground:
                    v = _box_iou_max(bx0[r], by0[r], min(bx1[r] + 1, w - 1), min(by1[r] + 1, h - 1), gt)
                elif frame[r]:
                    v = -1.0
                else:
                    v = _box_iou_max(bx0[r] - 1, by0[r] - 1, min(bx1[r] + 2, w - 1),
                                     min(by1[r] + 2, h - 1), gt)
                _tree_set(tree, size, r, v)
            best[level] = tree[1]

    @_njit
    def _all_contour_best(u8, gt, order, counts, ws_i32, active, frame, tree, size, best_fg, best_bg):
        """Both sweeps; returns best IoU per cut level [256] (max of components and holes)."""
        h, w = u8.shape
        pw = w + 2
        for i in range(257):
            counts[i] = 0
        for y in range(h):
            for x in range(w):
                counts[u8[y, x] + 1] += 1
        for v in range(256):
            counts[v + 1] += counts[v]
        fill = counts[:256].copy()
        for y in range(h):
            for x in range(w):
                v = u8[y, x]
                order[fill[v]] = (y + 1) * pw + x + 1
                fill[v] += 1
        _sweep(u8, gt, True, order, counts, ws_i32, active, frame, tree, size, best_fg)
        _sweep(u8, gt, False, order, counts, ws_i32, active, frame, tree, size, best_bg)
        return np.maximum(best_fg, best_bg)


class _Workspace:
    """Buffers for the union-find sweep, reused across maps of one shape (one per thread)."""

    def __init__(self, h, w):
        n = (h + 2) * (w + 2)
        self.size = 1 << max(0, (n - 1).bit_length())
        self.order = np.empty(h * w, np.int32)
        self.counts = np.zeros(257, np.int64)
        self.ws_i32 = np.empty((8, n), np.int32)
        self.active = np.zeros(n, np.bool_)
        self.frame = np.zeros(n, np.bool_)
        self.tree = np.empty(2 * self.size)
        self.best_fg = np.empty(256)
        self.best_bg = np.empty(256)


_workspaces = threading.local()


def _numba_best_ious(u8, gt, cuts) -> np.ndarray:
    cache = getattr(_workspaces, "by_shape", None)
    if cache is None:
        cache = _workspaces.by_shape = {}
    ws = cache.get(u8.shape)
    if ws is None:
        ws = cache[u8.shape] = _Workspace(*u8.shape)
    per_cut = _all_contour_best(np.ascontiguousarray(u8), gt, ws.order, ws.counts, ws.ws_i32, ws.active,
                                ws.frame, ws.tree, ws.size, ws.best_fg, ws.best_bg)
    return per_cut[cuts]


def fast_best_ious(scoremap, gt_boxes, thresholds, multi_contour: bool = True,
                   use_numba: bool | None = None) -> np.ndarray:
    """Same result as :func:`reference_best_ious`, computed per distinct cut / in one pass."""
    gt = np.ascontiguousarray(np.asarray(gt_boxes, dtype=np.int64).reshape(-1, 4))
    u8 = quantise(scoremap)
    m = int(u8.max()) if u8.size else 0
    cuts = _cuts(thresholds, m)
    if m == 0:  # empty mask at every threshold: the reference's [0, 0, 0, 0]
        return np.full(len(cuts), float(iou_matrix(np.zeros((1, 4)), gt).max()))
    if use_numba is None:
        use_numba = HAVE_NUMBA
    if multi_contour and use_numba:
        if not HAVE_NUMBA:
            raise RuntimeError("use_numba=True but numba is not installed")
        return _numba_best_ious(u8, gt, cuts)
    return _distinct_mask_best_ious(u8, gt, cuts, multi_contour)


# ----------------------------------------------------------------------------- evaluators
class MaxBoxAccEvaluator:
    """Accumulates BoxAcc over a split; MaxBoxAcc picks the threshold over the whole split.

    Args:
        cam_curve_interval: threshold grid step (grid ``np.arange(0, 1, interval)``).
        iou_thresholds: IoU thresholds delta in percent.
        multi_contour: all contours (MaxBoxAccV2) or the largest one (MaxBoxAcc).
        method: "fast" or "reference" (identical numbers).
    """

    def __init__(self, cam_curve_interval: float = 0.001, iou_thresholds: Sequence[int] = (30, 50, 70),
                 multi_contour: bool = True, method: str = "fast"):
        if method not in ("fast", "reference"):
            raise ValueError(f"method must be 'fast' or 'reference', got {method!r}")
        self.thresholds = threshold_grid(cam_curve_interval)
        self.iou_thresholds = [int(d) for d in iou_thresholds]
        self.multi_contour = multi_contour
        self.method = method
        self.num_correct = {d: np.zeros(len(self.thresholds), np.int64) for d in self.iou_thresholds}
        self.count = 0

    def best_ious(self, scoremap, gt_boxes, image_id=None) -> np.ndarray:
        scoremap = check_scoremap(scoremap, image_id)
        fn = fast_best_ious if self.method == "fast" else reference_best_ious
        return fn(scoremap, gt_boxes, self.thresholds, self.multi_contour)

    def accumulate(self, scoremap, gt_boxes, image_id=None) -> np.ndarray:
        """Add one image. gt_boxes: [G, 4] int, already in the score map's frame (224 x 224)."""
        ious = self.best_ious(scoremap, gt_boxes, image_id)
        for d in self.iou_thresholds:
            self.num_correct[d] += ious >= (d / 100)
        self.count += 1
        return ious

    def box_acc(self) -> dict[int, np.ndarray]:
        """BoxAcc (percent) per threshold for each delta."""
        if self.count == 0:
            raise ValueError("no image was accumulated")
        return {d: self.num_correct[d] * 100.0 / float(self.count) for d in self.iou_thresholds}

    def compute(self) -> dict:
        acc = self.box_acc()
        maxacc = {str(d): float(a.max()) for d, a in acc.items()}
        best_thr = {str(d): float(self.thresholds[int(a.argmax())]) for d, a in acc.items()}
        return {
            "maxboxacc": maxacc,
            # MaxBoxAccV2 when multi-contour with IoU 30/50/70; the mean over the given IoUs otherwise
            "maxboxacc_v2": float(np.mean(list(maxacc.values()))),
            "best_threshold": best_thr,
            "multi_contour": self.multi_contour,
            "num_images": self.count,
        }


def loc_at_threshold(scoremap, gt_boxes, threshold: float = 0.15, iou: float = 0.5, op: str = ">=",
                     multi_contour: bool = False) -> bool:
    """Whether the box(es) at one fixed threshold localise the object: best IoU ``op`` iou."""
    if op not in COMPARE_OPS:
        raise ValueError(f"op must be one of {sorted(COMPARE_OPS)}, got {op!r}")
    boxes = boxes_at_threshold(scoremap, threshold, multi_contour)
    best = float(iou_matrix(boxes, np.asarray(gt_boxes).reshape(-1, 4)).max())
    return bool(COMPARE_OPS[op](best, iou))


class LocAccuracy:
    """GT-known Loc, Top-1 Loc and Top-5 Loc at a fixed threshold and IoU (percent).

    The box comes from the CAM of the true class; Top-k Loc also needs the true
    class among the top-k predictions.
    """

    def __init__(self, threshold: float = 0.15, iou: float = 0.5, op: str = ">=", multi_contour: bool = False):
        if op not in COMPARE_OPS:
            raise ValueError(f"op must be one of {sorted(COMPARE_OPS)}, got {op!r}")
        self.threshold, self.iou, self.op, self.multi_contour = threshold, iou, op, multi_contour
        self.n = self.gt_known = self.top1 = self.top5 = self.top1_cls = 0

    def accumulate(self, scoremap, gt_boxes, label: int, topk_pred: Sequence[int]) -> bool:
        topk = [int(p) for p in topk_pred]
        ok = loc_at_threshold(scoremap, gt_boxes, self.threshold, self.iou, self.op, self.multi_contour)
        self.n += 1
        self.gt_known += ok
        self.top1_cls += bool(topk) and topk[0] == label
        self.top1 += ok and bool(topk) and topk[0] == label
        self.top5 += ok and label in topk[:5]
        return ok

    def compute(self) -> dict:
        if self.n == 0:
            raise ValueError("no image was accumulated")
        pct = 100.0 / self.n
        return {"gt_known_loc": self.gt_known * pct, "top1_loc": self.top1 * pct,
                "top5_loc": self.top5 * pct, "top1_cls": self.top1_cls * pct}
