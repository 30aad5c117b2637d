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
    _, mask = cv2.threshold(u8, cut, 255, cv2.THRESH_BINARY)  # u8 > cut (strict)
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
    return reference_boxes(scoremap, [threshold], multi_contour)[0]


def reference_boxes(scoremap, thresholds, multi_contour: bool = True) -> list[np.ndarray]:
    """The straightforward loop: quantise once, then one threshold + findContours per threshold."""
    u8 = np.ascontiguousarray(quantise(scoremap))
    h, w = u8.shape
    return [_boxes_of_contours(_contours(u8, int(t * np.max(u8))), w, h, multi_contour) for t in thresholds]


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


def _run_tables(n_bits: int, ring: bool):
    """For every mask of active neighbours: one neighbour index per run of ring-adjacent active
    neighbours (ring=True, 8-connectivity) or every active neighbour (ring=False)."""
    reps = np.zeros((1 << n_bits, n_bits), np.int64)
    nreps = np.zeros(1 << n_bits, np.int64)
    for mask in range(1 << n_bits):
        bits = [(mask >> d) & 1 for d in range(n_bits)]
        if ring and all(bits):
            chosen = [0]
        elif ring:
            chosen = [d for d in range(n_bits) if bits[d] and not bits[d - 1]]
        else:
            chosen = [d for d in range(n_bits) if bits[d]]
        nreps[mask] = len(chosen)
        reps[mask, :len(chosen)] = chosen
    return reps, nreps


_REPS8, _NREPS8 = _run_tables(8, ring=True)
_REPS4, _NREPS4 = _run_tables(4, ring=False)

if numba is not None:
    _njit = numba.njit(cache=True, nogil=True, error_model="numpy")

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
        """max over GT boxes of the inclusive-pixel IoU (same float64 arithmetic as iou_matrix)."""
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
        """Max segment tree: leaf i := v, refresh the ancestors (stop when one is unchanged)."""
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
    def _sweep(h, w, gt, foreground, order, xs, ys, counts, parent, weight, box, dirty, stamp, tree, size, best,
               reps, nreps):
        """Best IoU per cut level for all-contour boxes, in one union-find pass over the pixels.

        foreground=True: 8-connected components of {u8 > c}, c from 254 down to 0 (level c gets
        the pixels of value c + 1); box [x0, y0, min(x1+1, W-1), min(y1+1, H-1)].
        foreground=False: 4-connected components of {u8 <= c} that do not touch the frame (the
        holes), c from 0 up to 254 (level c gets the pixels of value c); box of the hole's
        contour [x0-1, y0-1, min(x1+2, W-1), min(y1+2, H-1)].
        Pixels (sorted by value in order / xs / ys) index a grid padded by one pixel that never
        becomes active (parent -1), so neighbours need no bounds test. box[:, 4] marks frame
        contact. A max segment tree over the roots holds each component's IoU.
        Active neighbours are read into a bit mask without branches; ``reps[mask]`` lists one
        neighbour per run of adjacent active neighbours (those are already one component), so
        usually a single find per pixel.
        Writes best[256] (-1 where a level has no such box).
        """
        pw = w + 2
        n = (h + 2) * pw
        for i in range(n):
            parent[i] = -1
        for i in range(2 * size):
            tree[i] = -1.0
        for i in range(256):
            best[i] = -1.0
        if foreground:  # around the ring E, NE, N, NW, W, SW, S, SE: neighbours in turn are 4-adjacent
            offs = np.array([1, -pw + 1, -pw, -pw - 1, -1, pw - 1, pw, pw + 1])
        else:  # N, E, S, W: no two are 4-adjacent
            offs = np.array([-pw, 1, pw, -1])
        nb = offs.shape[0]
        for step in range(256):
            level = 255 - step if foreground else step
            value = level + 1 if foreground else level
            if value > 255:
                continue
            lo, hi = counts[value], counts[value + 1]
            if lo == hi:
                best[level] = tree[1]
                continue
            nd = 0
            for k in range(lo, hi):
                p = order[k]
                x = xs[k]
                y = ys[k]
                on_frame = 1 if (x == 0 or y == 0 or x == w - 1 or y == h - 1) else 0
                rp = -1  # p's root; -1 while p is alone
                changed = False
                mask = 0
                for d in range(nb):
                    mask |= (parent[p + offs[d]] >= 0) << d
                for t in range(nreps[mask]):
                    q = p + offs[reps[mask, t]]
                    if parent[q] == rp:
                        continue
                    rq = _find(parent, q)
                    if rq == rp:
                        continue
                    if rp < 0:  # first neighbour: p joins rq's component
                        parent[p] = rq
                        weight[rq] += 1
                        if x < box[rq, 0]:
                            box[rq, 0] = x
                            changed = True
                        elif x > box[rq, 2]:
                            box[rq, 2] = x
                            changed = True
                        if y < box[rq, 1]:
                            box[rq, 1] = y
                            changed = True
                        elif y > box[rq, 3]:
                            box[rq, 3] = y
                            changed = True
                        if on_frame > box[rq, 4]:
                            box[rq, 4] = 1
                            changed = True
                        rp = rq
                        continue
                    if weight[rp] < weight[rq]:  # union by size: the larger root survives
                        rp, rq = rq, rp
                    parent[rq] = rp
                    weight[rp] += weight[rq]
                    for c in range(2):
                        if box[rq, c] < box[rp, c]:
                            box[rp, c] = box[rq, c]
                            changed = True
                    for c in range(2, 5):
                        if box[rq, c] > box[rp, c]:
                            box[rp, c] = box[rq, c]
                            changed = True
                    _tree_set(tree, size, rq, -1.0)  # that component is gone
                if rp < 0:  # a new component of one pixel
                    parent[p] = p
                    weight[p] = 1
                    box[p, 0] = x
                    box[p, 1] = y
                    box[p, 2] = x
                    box[p, 3] = y
                    box[p, 4] = on_frame
                    stamp[p] = -1
                    dirty[nd] = p
                    nd += 1
                elif changed:
                    dirty[nd] = rp
                    nd += 1
            for k in range(nd):
                r = dirty[k]
                if parent[r] != r or stamp[r] == step:
                    continue
                stamp[r] = step
                if foreground:
                    v = _box_iou_max(box[r, 0], box[r, 1], min(box[r, 2] + 1, w - 1), min(box[r, 3] + 1, h - 1),
                                     gt)
                elif box[r, 4]:
                    v = -1.0
                else:
                    v = _box_iou_max(box[r, 0] - 1, box[r, 1] - 1, min(box[r, 2] + 2, w - 1),
                                     min(box[r, 3] + 2, h - 1), gt)
                _tree_set(tree, size, r, v)
            best[level] = tree[1]

    @_njit
    def _all_contour_best(u8, gt, order, xs, ys, counts, parent, weight, box, dirty, stamp, tree, size,
                          best_fg, best_bg):
        """Both sweeps; returns the best IoU per cut level [256] (components and holes)."""
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
                k = fill[v]
                order[k] = (y + 1) * pw + x + 1
                xs[k] = x
                ys[k] = y
                fill[v] = k + 1
        _sweep(h, w, gt, True, order, xs, ys, counts, parent, weight, box, dirty, stamp, tree, size, best_fg,
               _REPS8, _NREPS8)
        _sweep(h, w, gt, False, order, xs, ys, counts, parent, weight, box, dirty, stamp, tree, size, best_bg,
               _REPS4, _NREPS4)
        return np.maximum(best_fg, best_bg)


class _Workspace:
    """Buffers for the union-find sweep, reused across maps of one shape (one set per thread)."""

    def __init__(self, h, w):
        n = (h + 2) * (w + 2)
        self.size = 1 << max(0, (n - 1).bit_length())
        self.order = np.empty(h * w, np.int32)
        self.xs = np.empty(h * w, np.int32)
        self.ys = np.empty(h * w, np.int32)
        self.counts = np.zeros(257, np.int64)
        self.parent = np.empty(n, np.int32)
        self.weight = np.empty(n, np.int32)
        self.box = np.empty((n, 5), np.int32)
        self.dirty = np.empty(n, np.int32)
        self.stamp = np.empty(n, np.int32)
        self.tree = np.empty(2 * self.size)
        self.best_fg = np.empty(256)
        self.best_bg = np.empty(256)

    def run(self, u8, gt):
        return _all_contour_best(u8, gt, self.order, self.xs, self.ys, self.counts, self.parent, self.weight,
                                 self.box, self.dirty, self.stamp, self.tree, self.size, self.best_fg,
                                 self.best_bg)


_workspaces = threading.local()


def _numba_best_ious(u8, gt, cuts) -> np.ndarray:
    cache = getattr(_workspaces, "by_shape", None)
    if cache is None:
        cache = _workspaces.by_shape = {}
    ws = cache.get(u8.shape)
    if ws is None:
        ws = cache[u8.shape] = _Workspace(*u8.shape)
    return ws.run(np.ascontiguousarray(u8), gt)[cuts]


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
