"""Scoring, figures and summaries of detection predictions, shared by both backends (imports
neither).

A prediction is ``(image_id, boxes [K, 4] in original pixels (x0, y0, x1, y1), scores [K], labels
[K])`` with 1-based labels (0 is the background). :func:`score_predictions` scores them like the
devkits (VOC comp4 files and 11-point or area AP; COCO results json and pycocotools stats),
:func:`detection_figure` draws them, :func:`summarize` and :func:`write_summary` make a run's
``metrics.json`` over its seeds.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from mixup_transfer.core import runtime
from mixup_transfer.core.units import units


def split_name(cfg: dict) -> str:
    """The test split as messages name it: ``data.voc_test`` (VOC) or ``data.coco_val`` (COCO)."""
    return str(cfg["data"]["voc_test" if cfg["data"]["format"] == "voc" else "coco_val"])


def count_nonfinite(preds) -> int:
    """The NaN / inf values among the boxes and scores of host predictions ``(image_id, boxes,
    scores, labels)``."""
    return sum(int((~torch.isfinite(boxes)).sum()) + int((~torch.isfinite(scores)).sum())
               for _, boxes, scores, _ in preds)


def check_finite(split: str, count: int) -> None:
    """Stop (NonFiniteOutputError, exit 1) naming the detection stage, ``split`` and ``count``, the
    NaN / inf values of the boxes, scores or raw head outputs of the split (summed over the ranks
    by the caller): a NaN score fails every score threshold, so a broken detector would score mAP
    0. Both backends check their predictions with it before scoring them."""
    runtime.check_outputs_finite("detection", split, {"box, score or raw head output": count})


def _base_dataset(ds):
    while isinstance(ds, Subset):
        ds = ds.dataset
    return ds


def score_predictions(preds, ctx: dict, out_dir: Path, metric: str = "11point") -> dict:
    """VOC: comp4 files + ``voc_evaluate``; COCO: results json + ``coco_evaluate``. Returns metrics
    in percent with the dataset's headline metric (`primary_key`): VOC ``mAP`` (AP@0.5 with
    ``metric``, averaged over the classes) or COCO ``AP`` (AP@[.5:.95]), never both under one
    name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = _base_dataset(ctx["dataset"])
    if ctx["format"] == "voc":
        from transfer.voc_eval import boxes_to_voc_xml, voc_evaluate, write_voc_results

        classes = ctx["classes"]
        detections = {c: [] for c in classes}
        for image_id, boxes, scores, labels in preds:
            # toolkit x0 = xmin - 1, x1 = xmax  ->  XML 1-based inclusive coordinates
            for b, s, lab in zip(boxes_to_voc_xml(boxes).tolist(), scores.tolist(),
                                 labels.tolist()):
                detections[classes[lab - 1]].append((image_id, float(s), tuple(b)))
        write_voc_results(out_dir / "voc_results", ctx["split"], detections)
        ids = {p[0] for p in preds}
        annotations = {i: a for i, a in ds.annotations.items() if i in ids}
        res = voc_evaluate(detections, annotations, classes, metric=metric)
        return {"mAP": float(res["mAP"]), "AP": res["AP"], "metric": res["metric"]}
    from transfer.coco_eval import coco_evaluate

    results = []
    for image_id, boxes, scores, labels in preds:
        for b, s, lab in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            results.append({"image_id": int(image_id),
                            "category_id": int(ds.label_to_cat[int(lab)]),
                            "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": float(s)})
    runtime.write_json(results, out_dir / "coco_results.json")
    if not results:  # pycocotools cannot load an empty result list
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    gt = ds.coco.dataset
    if len(preds) < len(ds.ids):  # a subset: score only the images that were predicted
        gt = _coco_subset(gt, [p[0] for p in preds])
    stats = coco_evaluate(gt, results)
    return dict(stats)  # percent; None for an area range without ground truth


def primary_key(metrics: dict) -> str:
    """The headline metric of detection metrics: VOC's ``mAP`` or COCO's ``AP``."""
    return "mAP" if "mAP" in metrics else "AP"


def _coco_subset(data: dict, image_ids) -> dict:
    """The COCO ground-truth dict restricted to ``image_ids``."""
    keep = set(int(i) for i in image_ids)
    return {"images": [im for im in data["images"] if im["id"] in keep],
            "annotations": [a for a in data["annotations"] if a["image_id"] in keep],
            "categories": data["categories"]}


def detection_figure(examples, classes, path: Path, score_thresh: float = 0.3) -> None:
    """Grid of test images: ground truth in green, predictions (score >= thresh) in red with
    class/score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not examples:
        return
    n = len(examples)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, ex in zip(axes.flat, examples):
        ax.imshow(ex["image"].permute(1, 2, 0).clamp(0, 1).numpy())
        for b, _lab in zip(ex["gt_boxes"].tolist(), ex["gt_labels"].tolist()):
            ax.add_patch(plt.Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False,
                                       color="lime", lw=1.5))
        for b, s, lab in zip(ex["pred_boxes"].tolist(), ex["scores"].tolist(),
                             ex["labels"].tolist()):
            if s < score_thresh:
                continue
            ax.add_patch(plt.Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False,
                                       color="red", lw=1.2, ls="--"))
            ax.text(b[0], b[1], f"{classes[lab - 1]} {s:.2f}", color="white", fontsize=6,
                    bbox=dict(facecolor="red", alpha=0.6, pad=0.5, lw=0))
    fig.suptitle("green: ground truth, red: predictions", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    runtime.save_figure(fig, path, dpi=110)
    plt.close(fig)


def summarize(per_seed: list[dict]) -> dict:
    """mean +- std over seeds of the headline metric (`primary_key`: VOC mAP, COCO AP) as <key>,
    <key>_mean and <key>_std (ddof=1; null for a single seed), the other AP numbers' means, and a
    `units` field."""
    key = primary_key(per_seed[0])
    maps = np.array([m[key] for m in per_seed], dtype=np.float64)
    out = {"primary": key, key: float(maps.mean()), f"{key}_mean": float(maps.mean()),
           f"{key}_std": float(maps.std(ddof=1)) if len(maps) > 1 else None,
           "seeds": [m["seed"] for m in per_seed], "per_seed": per_seed,
           "train_img_per_s": float(np.mean([m["train_img_per_s"] for m in per_seed])),
           "test_img_per_s": float(np.mean([m["test_img_per_s"] for m in per_seed]))}
    for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        vals = [m.get(k) for m in per_seed]
        if all(isinstance(v, (int, float)) for v in vals):
            out[k] = float(np.mean(vals))
        elif any(v is None for v in vals) and not any(isinstance(v, dict) for v in vals):
            out[k] = None  # an area range without ground truth
    if isinstance(per_seed[0].get("AP"), dict):  # VOC per-class AP, averaged over seeds
        out["AP_per_class"] = {c: (None if per_seed[0]["AP"][c] is None else
                                   float(np.mean([m["AP"][c] for m in per_seed])))
                                   for c in per_seed[0]["AP"]}
    return out


def write_summary(run_dir: Path, cfg: dict, per_seed: list[dict], **extra) -> dict:
    """The run's metrics over its seeds (`summarize`, plus `extra`), the first seed's detection
    figure and ``run_dir/metrics.json``; both backends end with it."""
    metrics = summarize(per_seed)
    metrics.update(model=cfg["model"]["type"], arch=cfg["model"]["arch"],
                   dataset=cfg["data"]["format"], **extra)
    metrics["units"] = units(metrics)
    first = Path(run_dir) / f"seed_{cfg['seeds'][0]}" / "figures" / "detections.png"
    if first.is_file():
        runtime.atomic_write_bytes(first.read_bytes(),
                                   Path(run_dir) / "figures" / "detections.png")
    runtime.write_json(metrics, Path(run_dir) / "metrics.json")
    return metrics
