"""Detection-evaluation speed, as ratios measured in one run (called by tools/bench.py eval).

- COCO: `coco_evaluate` with pycocotools vs faster-coco-eval on the same synthetic ground truth and
  results (also checks that the 12 stats agree).
- VOC: our vectorised `voc_evaluate` vs a naive per-detection loop (the devkit's algorithm written
  one detection and one box at a time, as in VOCevaldet.m / voc_eval.py), same data, same APs.
"""

from __future__ import annotations

import math
import time

import numpy as np

from transfer.coco_eval import (
    STAT_NAMES,
    build_coco,
    check_results,
    coco_evaluate,
    faster_available,
    run_cocoeval,
)
from transfer.voc_eval import voc_ap, voc_evaluate


def _best_time(fn, repeats: int):
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


# -------------------------------------------------------------------------------------------------
# Synthetic data (boxes around ground truth with jitter, duplicates and random false positives)


def synthetic_coco(n_images: int, n_cats: int = 10, gt_per_image: int = 7,
                   seed: int = 0) -> tuple[dict, list]:
    rng = np.random.default_rng(seed)
    images = [{"id": i, "width": 640, "height": 480} for i in range(1, n_images + 1)]
    cats = [{"id": 2 * c + 1, "name": f"cat{c}"} for c in range(n_cats)]
    anns, results = [], []
    for img in images:
        for _ in range(rng.poisson(gt_per_image)):
            w, h = np.exp(rng.uniform(np.log(8), np.log(300), 2))
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            cat = cats[rng.integers(n_cats)]["id"]
            anns.append({"id": len(anns) + 1, "image_id": img["id"], "category_id": cat,
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
            for _ in range(rng.integers(1, 4)):
                j = rng.normal(0, 0.08, 4) * [w, h, w, h]
                results.append({"image_id": img["id"], "category_id": cat,
                                "score": float(rng.random()),
                                "bbox": [x + j[0], y + j[1], abs(w + j[2]), abs(h + j[3])]})
        for _ in range(rng.poisson(2 * gt_per_image)):
            w, h = np.exp(rng.uniform(np.log(8), np.log(300), 2))
            results.append({"image_id": img["id"], "category_id": cats[rng.integers(n_cats)]["id"],
                            "score": float(rng.random() * 0.7),
                            "bbox": [rng.uniform(0, 640 - w), rng.uniform(0, 480 - h), w, h]})
    for r in results:  # plain floats, as read from a results JSON
        r["bbox"] = [float(v) for v in r["bbox"]]
    return {"images": images, "categories": cats, "annotations": anns}, results


def synthetic_voc(n_images: int, classes: tuple[str, ...], gt_per_image: int = 3,
                  fp_per_image: int = 25, seed: int = 0):
    """(annotations {image_id: {"objects": [...]}}, detections {class: [(image_id, score,
    box)]})."""
    rng = np.random.default_rng(seed)
    annotations, detections = {}, {c: [] for c in classes}
    for i in range(n_images):
        image_id = f"{i:06d}"
        objects = []
        for _ in range(max(1, rng.poisson(gt_per_image))):
            w, h = rng.integers(10, 250, 2)
            x0, y0 = rng.integers(1, 500 - w), rng.integers(1, 375 - h)
            name = classes[rng.integers(len(classes))]
            objects.append({"name": name, "bbox": (int(x0), int(y0), int(x0 + w), int(y0 + h)),
                            "difficult": bool(rng.random() < 0.1), "truncated": False})
            for _ in range(rng.integers(1, 4)):
                j = np.round(rng.normal(0, 0.08, 4) * [w, h, w, h])
                box = (x0 + j[0], y0 + j[1], max(x0 + j[0], x0 + w + j[2]),
                       max(y0 + j[1], y0 + h + j[3]))
                detections[name].append((image_id, float(rng.random()), box))
        for _ in range(rng.poisson(fp_per_image)):
            w, h = rng.integers(10, 250, 2)
            x0, y0 = rng.integers(1, 500 - w), rng.integers(1, 375 - h)
            detections[classes[rng.integers(len(classes))]].append(
                (image_id, float(rng.random() * 0.7), (x0, y0, x0 + w, y0 + h)))
        annotations[image_id] = {"objects": objects}
    # plain Python numbers, as a detector's `.tolist()` or a result file gives them
    detections = {c: [(i, float(s), tuple(float(v) for v in b)) for i, s, b in v]
                  for c, v in detections.items()}
    return annotations, detections


# -------------------------------------------------------------------------------------------------
# The naive reference: one detection, one ground-truth box at a time


def naive_voc_evaluate(detections, annotations, classes, metric: str = "11point",
                       iou: float = 0.5) -> dict:
    ap = {}
    for cls in classes:
        gt, npos = {}, 0
        for image_id, ann in annotations.items():
            objs = [o for o in ann["objects"] if o["name"] == cls]
            gt[image_id] = ([o["bbox"] for o in objs], [o["difficult"] for o in objs],
                            [False] * len(objs))
            npos += sum(not o["difficult"] for o in objs)
        dets = sorted(detections.get(cls, []), key=lambda d: -d[1])
        tp, fp = [], []
        for image_id, _, bb in dets:
            boxes, diff, seen = gt[image_id]
            ovmax, jmax = -math.inf, -1
            for j, g in enumerate(boxes):
                iw = min(bb[2], g[2]) - max(bb[0], g[0]) + 1
                ih = min(bb[3], g[3]) - max(bb[1], g[1]) + 1
                if iw > 0 and ih > 0:
                    ua = ((bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1)
                          + (g[2] - g[0] + 1) * (g[3] - g[1] + 1) - iw * ih)
                    if iw * ih / ua > ovmax:
                        ovmax, jmax = iw * ih / ua, j
            if ovmax >= iou:
                if not diff[jmax]:
                    tp.append(0 if seen[jmax] else 1)
                    fp.append(1 if seen[jmax] else 0)
                    seen[jmax] = True
                else:
                    tp.append(0)
                    fp.append(0)
            else:
                tp.append(0)
                fp.append(1)
        if npos == 0:
            ap[cls] = None
            continue
        tp_c, fp_c = np.cumsum(tp), np.cumsum(fp)
        prec = tp_c / np.maximum(tp_c + fp_c, np.finfo(np.float64).eps)
        ap[cls] = 100.0 * voc_ap(tp_c / npos, prec, metric)
    defined = [v for v in ap.values() if v is not None]
    return {"metric": metric, "mAP": float(np.mean(defined)) if defined else math.nan, "AP": ap}


# -------------------------------------------------------------------------------------------------


def run_eval_bench(quick: bool = False, repeats: int | None = None) -> dict:
    """COCO (pycocotools vs faster-coco-eval) and VOC (vectorised vs naive loop) evaluation
    timings."""
    repeats = repeats or (1 if quick else 3)
    out = {}

    gt, results = synthetic_coco(100 if quick else 1000)
    coco = {"n_images": len(gt["images"]), "n_gt": len(gt["annotations"]),
            "n_detections": len(results), "repeats": repeats}
    backends = ["pycocotools"] + (["faster"] if faster_available() else [])
    stats, full, core = {}, {}, {}
    for b in backends:
        full[b], stats[b] = _best_time(lambda b=b: coco_evaluate(gt, results, backend=b), repeats)
        clean = check_results(results, [i["id"] for i in gt["images"]],
                              [c["id"] for c in gt["categories"]])

        # the library's own work (index, loadRes, evaluate, accumulate, summarize)
        def core_only(b=b, clean=clean):
            return run_cocoeval(*build_coco(b, gt, clean), b)

        core[b], _ = _best_time(core_only, repeats)
    coco["pycocotools_s"] = round(full["pycocotools"], 4)
    coco["pycocotools_core_s"] = round(core["pycocotools"], 4)
    coco["AP"] = round(stats["pycocotools"]["AP"], 3)
    if "faster" in full:
        coco["faster_coco_eval_s"] = round(full["faster"], 4)
        coco["faster_coco_eval_core_s"] = round(core["faster"], 4)
        coco["speedup_faster_vs_pycocotools"] = round(full["pycocotools"] / full["faster"], 2)
        coco["speedup_core_faster_vs_pycocotools"] = round(core["pycocotools"] / core["faster"], 2)
        coco["max_abs_stat_diff"] = max(abs(stats["pycocotools"][k] - stats["faster"][k])
                                        for k in STAT_NAMES)
    else:
        coco["faster_coco_eval_s"] = None
        coco["note"] = "faster-coco-eval not installed (pip install -e .[fast])"
    out["coco"] = coco

    classes = tuple(f"class{c}" for c in range(20))
    annotations, detections = synthetic_voc(200 if quick else 2000, classes)
    n_dets = sum(len(v) for v in detections.values())
    voc = {"n_images": len(annotations), "n_detections": n_dets, "repeats": repeats}
    # what a detector's evaluation loop holds: numpy arrays per class (tensor.numpy())
    arrays = {c: {"image_ids": [d[0] for d in v], "scores": np.array([d[1] for d in v]),
                  "boxes": np.array([d[2] for d in v], dtype=np.float64).reshape(-1, 4)}
              for c, v in detections.items()}
    t_ours, ours = _best_time(lambda: voc_evaluate(detections, annotations, classes), repeats)
    t_arr, ours_arr = _best_time(lambda: voc_evaluate(arrays, annotations, classes), repeats)
    t_naive, naive = _best_time(lambda: naive_voc_evaluate(detections, annotations, classes),
                                repeats)
    diffs = [abs(r["AP"][c] - naive["AP"][c])
             for r in (ours, ours_arr) for c in classes if r["AP"][c] is not None]
    voc.update(ours_s=round(t_ours, 4), ours_array_input_s=round(t_arr, 4),
               naive_s=round(t_naive, 4), speedup_ours_vs_naive=round(t_naive / t_ours, 2),
               speedup_ours_array_input_vs_naive=round(t_naive / t_arr, 2),
               mAP=round(ours["mAP"], 3), max_abs_ap_diff=max(diffs))
    out["voc"] = voc
    return out
