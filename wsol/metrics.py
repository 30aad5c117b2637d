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
  grow as the cut increases. The foreground pass also tracks the Euler number
  (components - holes), so the hole pass stops at the highest cut that has a
  hole. That pass is compiled with numba when numba is installed (validation
  and quantisation too); otherwise (and for largest-contour mode, which needs
  polygon areas) OpenCV runs once per distinct mask instead of once per
  threshold.
"""
from __future__ import annotations

import operator
import threading
from collections.abc import Sequence

import cv2
import numpy as np

from mixup_transfer.core.data import InputError
from mixup_transfer.core.units import with_units

# a dependency (pyproject.toml); the OpenCV fallback, identical numbers, covers platforms without
# its wheels
try:
    import numba
except ImportError:  # pragma: no cover - exercised when numba is absent
    numba = None

__all__ = [
    "ScoreMapError", "iou_matrix", "rescale_box", "check_scoremap", "quantise",
    "boxes_at_threshold", "reference_boxes", "reference_best_ious", "fast_best_ious",
    "threshold_grid", "MaxBoxAccEvaluator", "loc_at_threshold", "LocAccuracy",
    "centred_box", "HAVE_NUMBA", "COMPARE_OPS", "sweep_name",
]

HAVE_NUMBA = numba is not None
COMPARE_OPS = {">=": operator.ge, ">": operator.gt}


class ScoreMapError(InputError):
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
    """Validate a score map: a non-empty 2-D array of real numbers, without NaN, in [0, 1].
    Returns it as a float array; `ScoreMapError` naming the image otherwise."""
    name = f" for image {image_id!r}" if image_id is not None else ""
    arr = np.asarray(scoremap)
    if arr.ndim != 2:
        raise ScoreMapError(f"score map{name} must be 2-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ScoreMapError(f"score map{name} is empty (shape {arr.shape})")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
            or arr.dtype == np.bool_):
        raise ScoreMapError(f"score map{name} must hold real numbers, got dtype {arr.dtype}")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
    if np.isnan(arr).any():
        raise ScoreMapError(f"score map{name} contains NaN")
    if arr.size and (arr.min() < 0 or arr.max() > 1):
        raise ScoreMapError(f"score map{name} lies outside [0, 1] (min {arr.min()}, max "
                            f"{arr.max()})")
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
    return [_boxes_of_contours(_contours(u8, int(t * np.max(u8))), w, h, multi_contour)
            for t in thresholds]


def reference_best_ious(scoremap, gt_boxes, thresholds, multi_contour: bool = True) -> np.ndarray:
    """Best IoU (over predicted x GT boxes) at each threshold -> [T] float64 (per-threshold
    loop)."""
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


def _ring_tables(connectivity: int):
    """Neighbour tables over the ring E, NE, N, NW, W, SW, S, SE (bits 0..7 of a mask of the
    neighbours already in the set): reps[mask, :nreps[mask]] holds one ring position per group of
    those neighbours that are already connected among themselves, so a pixel needs one find per
    group. 8-connectivity: a group is a run of ring-adjacent neighbours. 4-connectivity: only the
    4-neighbours (even positions) count, and two consecutive ones are connected through the
    diagonal between them when it is in the set."""
    reps = np.zeros((256, 8), np.uint64)  # unsigned: indexes without wraparound code in numba
    nreps = np.zeros(256, np.int64)
    for mask in range(256):
        bits = [(mask >> d) & 1 for d in range(8)]
        if connectivity == 8:
            chosen = [0] if all(bits) else [d for d in range(8) if bits[d] and not bits[d - 1]]
        else:
            groups = []
            for d in (0, 2, 4, 6):
                if bits[d]:
                    if groups and groups[-1][-1] == d - 2 and bits[d - 1]:
                        groups[-1].append(d)
                    else:
                        groups.append([d])
            if len(groups) > 1 and groups[0][0] == 0 and groups[-1][-1] == 6 and bits[7]:
                groups[0] = groups.pop() + groups[0]
            chosen = [g[0] for g in groups]
        nreps[mask] = len(chosen)
        reps[mask, :len(chosen)] = chosen
    return reps, nreps


def _euler_table():
    """4 x the change of the Euler number (8-connected foreground: components - holes) when a pixel
    joins the foreground, by its ring mask: Gray's bit quads, 4 chi = #(2 x 2 quads holding 1
    pixel) - #(holding 3) - 2 #(holding a diagonal pair), over the four quads around the pixel."""
    def quad(a, b, c, d):  # the quad's pixels in cyclic order
        k = a + b + c + d
        return 1 if k == 1 else -1 if k == 3 else -2 if (k == 2 and a == c) else 0

    out = np.zeros(256, np.int64)
    for mask in range(256):
        bits = [(mask >> d) & 1 for d in range(8)]
        # the quads around the pixel: (pixel, E, NE, N), (pixel, N, NW, W), (pixel, W, SW, S),
        # (pixel, S, SE, E)
        quads = [(bits[e], bits[e + 1], bits[(e + 2) % 8]) for e in (0, 2, 4, 6)]
        out[mask] = sum(quad(1, *q) - quad(0, *q) for q in quads)
    return out


_REPS8, _NREPS8 = _ring_tables(8)
_REPS4, _NREPS4 = _ring_tables(4)
_EULER8 = _euler_table()

if numba is not None:
    _njit = numba.njit(cache=True, nogil=True, error_model="numpy")

    @_njit
    def _quantise_checked(scoremap, scale, out):
        """out = uint8(scoremap * scale) (truncation; scale = 255 in the map's dtype, as numpy
        computes it). Returns False when the map has a NaN or a value outside [0, 1] (out is then
        meaningless). No branch in the loop, so that it vectorises."""
        h, w = scoremap.shape
        # 0 and 1 in the map's dtype: no float32 -> float64 promotion
        lo, hi = scale - scale, scale / scale
        ok = True
        for y in range(h):
            for x in range(w):
                v = scoremap[y, x]
                ok &= (v >= lo) & (v <= hi)
                # the clamp only matters for bad maps
                out[y, x] = np.uint8(min(max(v, lo), hi) * scale)
        return ok

    @_njit
    def _counting_sort(u8, order, counts, hist):
        """Pixels by value, raster order within a value: order[k] = y << 16 | x, and value v's
        pixels are order[counts[v]:counts[v + 1]]. The raster is cut into 4 stretches walked in
        step, so that the counter updates (maps have long runs of one value) form 4 independent
        chains instead of one. hist: [4, 256] uint64 scratch."""
        h, w = u8.shape
        flat = u8.ravel()
        n = h * w
        q = n // 4
        one = np.uint64(1)
        hist[:] = 0
        for i in range(q):
            hist[0, flat[i]] += one
            hist[1, flat[i + q]] += one
            hist[2, flat[i + 2 * q]] += one
            hist[3, flat[i + 3 * q]] += one
        for i in range(4 * q, n):
            hist[3, flat[i]] += one
        counts[0] = 0
        for v in range(256):
            c = np.uint64(counts[v])
            for b in range(4):
                nb = hist[b, v]
                hist[b, v] = c  # from here on: the next slot of stretch b's pixels of value v
                c += nb
            counts[v + 1] = c
        y0, x0 = 0, 0
        y1, x1 = divmod(q, w)
        y2, x2 = divmod(2 * q, w)
        y3, x3 = divmod(3 * q, w)
        for i in range(q):
            k = hist[0, flat[i]]
            hist[0, flat[i]] = k + one
            order[k] = (y0 << 16) | x0
            k = hist[1, flat[i + q]]
            hist[1, flat[i + q]] = k + one
            order[k] = (y1 << 16) | x1
            k = hist[2, flat[i + 2 * q]]
            hist[2, flat[i + 2 * q]] = k + one
            order[k] = (y2 << 16) | x2
            k = hist[3, flat[i + 3 * q]]
            hist[3, flat[i + 3 * q]] = k + one
            order[k] = (y3 << 16) | x3
            x0 += 1
            x1 += 1
            x2 += 1
            x3 += 1
            if x0 == w:
                x0, y0 = 0, y0 + 1
            if x1 == w:
                x1, y1 = 0, y1 + 1
            if x2 == w:
                x2, y2 = 0, y2 + 1
            if x3 == w:
                x3, y3 = 0, y3 + 1
        for i in range(4 * q, n):
            k = hist[3, flat[i]]
            hist[3, flat[i]] = k + one
            order[k] = (y3 << 16) | x3
            x3 += 1
            if x3 == w:
                x3, y3 = 0, y3 + 1

    @_njit
    def _find(par, c):
        """Root of component c (par: the union-find parents; path halving)."""
        while par[c] != c:
            g = par[par[c]]
            par[c] = g
            c = g
        return c

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
            if inter == 0:  # IoU 0 (or a denominator <= 0, which also gives 0)
                continue
            denom = area_a + (gt[g, 2] - gt[g, 0] + 1) * (gt[g, 3] - gt[g, 1] + 1) - inter
            v = inter / denom if denom > 0 else 0.0
            if v > best:
                best = v
        return best

    @_njit
    def _tree_set(tree, size, i, v):
        """Max segment tree: leaf i := v, refresh the ancestors (stop when one is unchanged)."""
        i += size
        if tree[i] == v:
            return
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
    def _merge_box(comp, r, q):
        """Root r's box := its union with q's; whether it grew."""
        grew = False
        for c in range(2):
            if comp[q, c] < comp[r, c]:
                comp[r, c] = comp[q, c]
                grew = True
        for c in range(2, 4):
            if comp[q, c] > comp[r, c]:
                comp[r, c] = comp[q, c]
                grew = True
        return grew

    @_njit
    def _sweep(foreground, h, w, gt, order, counts, active, cid, comp, par,  # noqa: C901
               dirty, tree, size, state, best):
        """Best IoU per cut level (0..254) over one kind of contour, in one union-find pass.

        foreground=True: the 8-connected components of {u8 > c}, c from 254 down (level c gets
        the pixels of value c + 1); a component's contour box is [x0, y0, min(x1+1, W-1),
        min(y1+1, H-1)]. Also finds the highest level with a hole (Euler number: components -
        holes, updated per pixel from its ring mask) -> state[1].
        foreground=False: the holes, 4-connected components of {u8 <= c} that do not touch the
        frame, c from 0 up to state[1]; a hole's contour runs over the foreground pixels
        4-adjacent to it, so its box is [x0-1, y0-1, min(x1+2, W-1), min(y1+2, H-1)].
        Writes best[256] (-1 where a level has no such contour).

        Grid indices are padded by one pixel, so neighbours need no bounds test: the padding is
        never in the foreground, and in the background it is component 0, "outside", which every
        pixel 4-adjacent to the frame joins, and which is no hole. The union-find runs over
        components numbered in order of birth (cid[p]: the component pixel p joined, or its root;
        par[c]: its parent; comp[c] = x0, y0, x1, y1, last level refreshed + 1); the older
        survives a union.
        A max segment tree over the components holds each one's IoU once positive (leaves
        0..state[0]-1 in use; boxes only grow, so a positive IoU stays positive).
        A joining pixel tests once whether it grows its component's box and writes the box only
        then (rarely). Measured per map: ~10% faster than writing min / max every time, ~25% faster
        than keeping the box in locals behind per-component branches, which mispredict.
        Hot indices are unsigned (numba then emits no negative-index wraparound).
        """
        pw = w + 2
        n = (h + 2) * pw
        upw = np.uint64(pw)
        # ring E, NE, N, NW, W, SW, S, SE as offsets from the pixel's NW neighbour; the pixel: upw
        # + 1
        ring = np.array([upw + 2, 2, 1, 0, upw, 2 * upw, 2 * upw + 1, 2 * upw + 2], np.uint64)
        o_e, o_ne, o_n, o_nw = ring[0], ring[1], ring[2], ring[3]
        o_w, o_sw, o_s, o_se = ring[4], ring[5], ring[6], ring[7]
        o_p = upw + np.uint64(1)
        # reset the tree nodes the previous sweep touched (its leaves and their ancestors)
        lo, hi = size, size + state[0]
        while lo >= 1 and hi > lo:
            tree[lo:hi] = -1.0
            lo //= 2
            hi = (hi - 1) // 2 + 1
        tree[1] = -1.0
        best[:] = -1.0
        active[:] = 0
        if foreground:
            reps, nreps = _REPS8, _NREPS8
            nc = 0
            first, last, step, shift, grow = 254, -1, -1, 1, 0
        else:
            reps, nreps = _REPS4, _NREPS4
            for i in range(pw):
                active[i] = active[n - pw + i] = 1
                cid[i] = cid[n - pw + i] = 0
            for i in range(0, n, pw):
                active[i] = active[i + pw - 1] = 1
                cid[i] = cid[i + pw - 1] = 0
            par[0] = 0
            nc = 1
            first, last, step, shift, grow = 0, state[1] + 1, 1, 0, 1
        outside = 0 if not foreground else -2
        # the first group's neighbour as an offset from b: one load less
        rep0 = np.empty(256, np.uint64)
        for m in range(256):
            rep0[m] = ring[reps[m, 0]]
        alive = 0  # components (holes for the background)
        euler4 = 0  # 4 x (foreground components - holes)
        top_hole = -1
        for level in range(first, last, step):
            nd = 0
            for k in range(np.uint64(counts[level + shift]), np.uint64(counts[level + shift + 1])):
                yx = np.uint64(order[k])
                x = yx & np.uint64(0xFFFF)
                y = yx >> np.uint64(16)
                b = y * upw + x  # the NW neighbour
                mask = np.uint64(active[b + o_e] | (active[b + o_ne] << 1) | (active[b + o_n] << 2)
                                 | (active[b + o_nw] << 3) | (active[b + o_w] << 4)
                                 | (active[b + o_sw] << 5)
                                 | (active[b + o_s] << 6) | (active[b + o_se] << 7))
                active[b + o_p] = 1
                if foreground:
                    euler4 += _EULER8[mask]
                rp = -1  # p's component; -1 while p is alone
                nr = nreps[mask]
                if nr > 0:
                    q = b + rep0[mask]
                    c = cid[q]
                    r = _find(par, c)
                    if r != c:  # point the neighbour at its root: it has more pixels to serve
                        cid[q] = r
                    rp = np.int64(r)
                    for t in range(1, nr):
                        q = b + ring[reps[mask, t]]
                        c = cid[q]
                        r = _find(par, c)
                        if r != c:
                            cid[q] = r
                        rq = np.int64(r)
                        if rq == rp:
                            continue
                        if rq < rp:  # the older survives (the outside always)
                            rp, rq = rq, rp
                        par[rq] = rp
                        alive -= 1
                        if rp != outside and _merge_box(comp, rp, rq):
                            dirty[nd] = rp
                            nd += 1
                        _tree_set(tree, size, rq, -1.0)  # that component is gone
                if rp < 0:  # a new component of one pixel
                    rp = nc
                    nc += 1
                    alive += 1
                    comp[rp, 0], comp[rp, 1], comp[rp, 2], comp[rp, 3] = x, y, x, y
                    par[rp] = rp
                    comp[rp, 4] = 0
                    dirty[nd] = rp
                    nd += 1
                # grow p's component's box (rarely: one test, stores only then)
                elif rp != outside:
                    px, py = np.uint32(x), np.uint32(y)
                    bx0, by0, bx1, by1 = comp[rp, 0], comp[rp, 1], comp[rp, 2], comp[rp, 3]
                    if (px < bx0) | (py < by0) | (px > bx1) | (py > by1):
                        comp[rp, 0] = min(bx0, px)
                        comp[rp, 1] = min(by0, py)
                        comp[rp, 2] = max(bx1, px)
                        comp[rp, 3] = max(by1, py)
                        dirty[nd] = rp
                        nd += 1
                cid[b + o_p] = rp
            for k in range(nd):
                r = dirty[k]
                if par[r] != r or comp[r, 4] == level + 1:
                    continue
                comp[r, 4] = level + 1
                v = _box_iou_max(np.int64(comp[r, 0]) - grow, np.int64(comp[r, 1]) - grow,
                                 min(np.int64(comp[r, 2]) + 1 + grow, w - 1),
                                 min(np.int64(comp[r, 3]) + 1 + grow, h - 1), gt)
                if v > 0:
                    _tree_set(tree, size, r, v)
            best[level] = tree[1] if tree[1] > 0 else (0.0 if alive > 0 else -1.0)
            if foreground and top_hole < 0 and euler4 != 4 * alive:
                top_hole = level
        state[0] = nc
        if foreground:
            state[1] = top_hole

    @_njit
    def _all_contour_best(u8, gt, order, counts, hist, active, cid, comp, par, dirty, tree, size,
                          state, best_fg, best_bg):
        """Both sweeps; returns the best IoU per cut level [256] (components and holes)."""
        h, w = u8.shape
        _counting_sort(u8, order, counts, hist)
        _sweep(True, h, w, gt, order, counts, active, cid, comp, par, dirty, tree, size, state,
               best_fg)
        _sweep(False, h, w, gt, order, counts, active, cid, comp, par, dirty, tree, size, state,
               best_bg)
        return np.maximum(best_fg, best_bg)


class _Workspace:
    """Buffers for the union-find sweeps, reused across maps of one shape (one set per thread)."""

    def __init__(self, h, w):
        n = (h + 2) * (w + 2)
        self.size = 1 << n.bit_length()  # > n >= number of components
        self.order = np.empty(h * w, np.uint32)
        self.counts = np.zeros(257, np.int64)
        self.hist = np.zeros((4, 256), np.uint64)
        self.active = np.empty(n, np.uint8)
        self.cid = np.empty(n, np.uint32)
        self.par = np.empty(n, np.uint32)
        # 5 fields used; 8 keep a component in one cache line
        self.comp = np.empty((n, 8), np.uint32)
        self.dirty = np.empty(4 * n + 8, np.int64)  # <= 4 entries per pixel, 1 per level
        self.tree = np.full(2 * self.size, -1.0)
        # components used by the last sweep, highest level with a hole
        self.state = np.zeros(2, np.int64)
        self.best_fg = np.empty(256)
        self.best_bg = np.empty(256)

    def run(self, u8, gt):
        return _all_contour_best(u8, gt, self.order, self.counts, self.hist, self.active, self.cid,
                                 self.comp, self.par, self.dirty, self.tree, self.size, self.state,
                                 self.best_fg, self.best_bg)


_workspaces = threading.local()


def _numba_best_ious(u8, gt, cuts) -> np.ndarray:
    cache = getattr(_workspaces, "by_shape", None)
    if cache is None:
        cache = _workspaces.by_shape = {}
    ws = cache.get(u8.shape)
    if ws is None:
        ws = cache[u8.shape] = _Workspace(*u8.shape)
    return ws.run(np.ascontiguousarray(u8), gt)[cuts]


def _checked_u8(scoremap, image_id, use_numba) -> np.ndarray:
    """check_scoremap + quantise; one compiled pass for float32 / float64 maps."""
    arr = np.asarray(scoremap)
    if use_numba and arr.ndim == 2 and arr.dtype in (np.float32, np.float64):
        u8 = np.empty(arr.shape, np.uint8)
        if _quantise_checked(arr, arr.dtype.type(255), u8):
            return u8
    return quantise(check_scoremap(arr, image_id))  # raises ScoreMapError for a bad map


def fast_best_ious(scoremap, gt_boxes, thresholds, multi_contour: bool = True,
                   use_numba: bool | None = None, image_id=None) -> np.ndarray:
    """Same result as :func:`reference_best_ious`, computed per distinct cut / in one pass.

    Also validates the map (:func:`check_scoremap`; ``image_id`` names it in the error).
    """
    if use_numba is None:
        use_numba = HAVE_NUMBA
    if use_numba and not HAVE_NUMBA:
        raise RuntimeError("use_numba=True but numba is not installed")
    gt = np.ascontiguousarray(np.asarray(gt_boxes, dtype=np.int64).reshape(-1, 4))
    u8 = _checked_u8(scoremap, image_id, use_numba)
    m = int(u8.max()) if u8.size else 0
    cuts = _cuts(thresholds, m)
    if m == 0:  # empty mask at every threshold: the reference's [0, 0, 0, 0]
        return np.full(len(cuts), float(iou_matrix(np.zeros((1, 4)), gt).max()))
    if multi_contour and use_numba and max(u8.shape) < 1 << 15:
        return _numba_best_ious(u8, gt, cuts)
    return _distinct_mask_best_ious(u8, gt, cuts, multi_contour)


def sweep_name(method: str = "fast", multi_contour: bool = True) -> str:
    """Which implementation a `MaxBoxAccEvaluator(method=..., multi_contour=...)` runs on maps
    below 32768 pixels a side: "numba" (the compiled one-pass sweep), "opencv" (OpenCV once per
    distinct mask: numba is not installed, or largest-contour mode, which needs contour areas) or
    "reference" (OpenCV once per threshold). All three give identical numbers."""
    if method == "reference":
        return "reference"
    return "numba" if multi_contour and HAVE_NUMBA else "opencv"


# ----------------------------------------------------------------------------- evaluators
class MaxBoxAccEvaluator:
    """Accumulates BoxAcc over a split; MaxBoxAcc picks the threshold over the whole split.

    Args:
        cam_curve_interval: threshold grid step (grid ``np.arange(0, 1, interval)``).
        iou_thresholds: IoU thresholds delta in percent.
        multi_contour: all contours (MaxBoxAccV2) or the largest one (MaxBoxAcc).
        method: "fast" or "reference" (identical numbers).
    """

    def __init__(self, cam_curve_interval: float = 0.001,
                 iou_thresholds: Sequence[int] = (30, 50, 70), multi_contour: bool = True,
                 method: str = "fast"):
        if method not in ("fast", "reference"):
            raise ValueError(f"method must be 'fast' or 'reference', got {method!r}")
        if not (isinstance(cam_curve_interval, (int, float)) and 0 < cam_curve_interval < 1):
            raise InputError("cam_curve_interval (--cam-curve-interval) must be in (0, 1), got "
                             f"{cam_curve_interval!r}")
        bad = [d for d in iou_thresholds if not 0 < d <= 100]
        if not iou_thresholds or bad:
            raise InputError("iou_thresholds (--iou-thresholds) must be percentages in (0, "
                             f"100], got {list(iou_thresholds)}")
        self.thresholds = threshold_grid(cam_curve_interval)
        self.iou_thresholds = [int(d) for d in iou_thresholds]
        self.multi_contour = multi_contour
        self.method = method
        self.num_correct = {d: np.zeros(len(self.thresholds), np.int64)
                            for d in self.iou_thresholds}
        self.count = 0

    def best_ious(self, scoremap, gt_boxes, image_id=None) -> np.ndarray:
        if self.method == "fast":  # validates the map too
            return fast_best_ious(scoremap, gt_boxes, self.thresholds, self.multi_contour,
                                  image_id=image_id)
        return reference_best_ious(check_scoremap(scoremap, image_id), gt_boxes, self.thresholds,
                                   self.multi_contour)

    @property
    def sweep(self) -> str:
        """The implementation that scores the maps (`sweep_name`)."""
        return sweep_name(self.method, self.multi_contour)

    def accumulate(self, scoremap, gt_boxes, image_id=None) -> np.ndarray:
        """Add one image. gt_boxes: [G, 4] int, already in the score map's frame (224 x 224)."""
        return self.add(self.best_ious(scoremap, gt_boxes, image_id))

    def add(self, ious) -> np.ndarray:
        """Add one image given its `best_ious` ([T] float64), e.g. computed in another thread."""
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
        # two flavours, two names: all contours -> MaxBoxAccV2 (the mean over the IoUs;
        # wsolevaluation's at 30/50/70); the largest contour -> MaxBoxAcc (wsolevaluation's "V1",
        # at IoU 50)
        out = {"maxboxacc_per_iou": maxacc, "contours": "all" if self.multi_contour else "largest",
               "best_threshold": best_thr, "num_images": self.count}
        if self.multi_contour:
            out["maxboxacc_v2"] = float(np.mean(list(maxacc.values())))
        elif "50" in maxacc:
            out["maxboxacc_v1"] = maxacc["50"]
        return with_units(out)


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

    def __init__(self, threshold: float = 0.15, iou: float = 0.5, op: str = ">=",
                 multi_contour: bool = False):
        if op not in COMPARE_OPS:
            raise ValueError(f"op must be one of {sorted(COMPARE_OPS)}, got {op!r}")
        self.threshold, self.iou, self.op, self.multi_contour = threshold, iou, op, multi_contour
        self.n = self.gt_known = self.top1 = self.top5 = self.top1_cls = 0

    def accumulate(self, scoremap, gt_boxes, label: int, topk_pred: Sequence[int]) -> bool:
        topk = [int(p) for p in topk_pred]
        ok = loc_at_threshold(scoremap, gt_boxes, self.threshold, self.iou, self.op,
                              self.multi_contour)
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
