"""Score saved score maps (the wsolevaluation layout, ``<image_id>.npy``) against a metadata split.

Imports neither torch nor model code: ``tools/eval_wsol.py`` scores thousands of maps in about the
time torch takes to import. All box metrics are computed at the score map's size (224 x 224 by
default) with GT boxes rescaled by integer truncation, as wsolevaluation does.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mixup_transfer.core.data import InputError
from wsol.data import MetadataError, WSOLMetadata, read_wsol_metadata
from wsol.metrics import MaxBoxAccEvaluator, ScoreMapError, check_scoremap, rescale_box

__all__ = ["gt_boxes_resized", "load_scoremap", "score_scoremap_dir"]


def gt_boxes_resized(meta: WSOLMetadata, image_id: str, size=(224, 224)) -> np.ndarray:
    """GT boxes of one image in the score map's frame: int [K, 4], ``int(x * new / old)``."""
    if image_id not in meta.boxes:
        raise MetadataError(f"no GT box for image id {image_id!r}")
    return np.asarray([rescale_box(b, meta.sizes[image_id], size) for b in meta.boxes[image_id]],
                      np.int64)


def load_scoremap(path, image_id=None) -> np.ndarray:
    """A `.npy` score map read without unpickling (`allow_pickle=False`) and validated by
    `check_scoremap`; `ScoreMapError` naming the file when it is missing, truncated, not a `.npy`
    file, an object array, or not a valid map."""
    path = Path(path)
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ScoreMapError(f"{path}: score map not found") from None
    except (ValueError, OSError, EOFError) as e:  # truncated, random bytes, pickled objects
        raise ScoreMapError(f"{path}: not a readable .npy score map "
                            f"({type(e).__name__}: {e})") from None
    if not isinstance(arr, np.ndarray):  # np.load of an .npz gives an archive
        raise ScoreMapError(f"{path}: expected one .npy array, found {type(arr).__name__}")
    try:
        return check_scoremap(arr, image_id)
    except ScoreMapError as e:
        raise ScoreMapError(f"{path}: {e}") from None


def _best_ious_of_file(ev: MaxBoxAccEvaluator, meta: WSOLMetadata, root: Path,
                       iid: str) -> np.ndarray:
    path = root / f"{iid}.npy"
    if not path.is_file():
        raise ScoreMapError(f"{path}: score map for image {iid!r} missing")
    smap = load_scoremap(path, iid)
    h, w = smap.shape
    return ev.best_ious(smap, gt_boxes_resized(meta, iid, (w, h)), iid)


def _in_order(fn, items, workers: int):
    """fn(item) for each item, yielded in order; with workers > 1 computed by a thread pool (the
    compiled sweep and OpenCV release the GIL) holding at most 4 x workers maps in flight. The
    first failure in item order is raised (the maps after it may have been scored, their results
    are dropped)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    window = 4 * workers
    with ThreadPoolExecutor(workers) as pool:
        pending = [pool.submit(fn, it) for it in items[:window]]
        nxt = len(pending)
        try:
            for k in range(len(items)):
                result = pending[k].result()
                pending[k] = None  # drop the reference: memory stays bounded
                if nxt < len(items):
                    pending.append(pool.submit(fn, items[nxt]))
                    nxt += 1
                yield result
        finally:
            for f in pending:
                if f is not None:
                    f.cancel()


def score_scoremap_dir(metadata_dir, scoremap_dir, cam_curve_interval: float = 0.001,
                       iou_thresholds=(30, 50, 70), multi_contour: bool = True,
                       method: str = "fast", progress=None, workers: int = 1) -> dict:
    """Score ``<scoremap_dir>/<image_id>.npy`` maps (float, [0, 1]) against a metadata split.

    Returns {"maxboxacc_per_iou": {delta: %}, "contours": all | largest, "maxboxacc_v2": % (all
    contours) or "maxboxacc_v1": % (largest contour, IoU 50), "best_threshold": {delta: tau},
    "units", ..., "sweep": the implementation that ran (`wsol.metrics.sweep_name`)}. ``workers`` >
    1 scores maps in that many threads; the numbers do not depend on it.
    """
    if not isinstance(workers, int) or workers < 1:
        raise InputError(f"workers (--workers) must be a positive integer, got {workers!r}")
    meta = read_wsol_metadata(metadata_dir, require_boxes=True)
    ev = MaxBoxAccEvaluator(cam_curve_interval, iou_thresholds, multi_contour, method)
    root = Path(scoremap_dir)
    results = _in_order(lambda iid: _best_ious_of_file(ev, meta, root, iid), meta.image_ids,
                        workers)
    if progress is not None:
        results = progress(results, total=len(meta.image_ids), desc="score maps")
    for ious in results:
        ev.add(ious)
    return {**ev.compute(), "sweep": ev.sweep}
