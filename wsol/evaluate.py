"""Evaluate a CAM model on a wsolevaluation split; the centred-box baseline.

Saved score maps are scored by `wsol/scoremaps.py` (torch-free; its functions are re-exported
here).

All box metrics are computed at the score map's size (224 x 224 by default) with GT boxes
rescaled by integer truncation, as wsolevaluation does.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mixup_transfer.core import distributed as ddist
from mixup_transfer.core.data import InputError, inside
from mixup_transfer.core.inference import inference_on_dataset, to_host
from mixup_transfer.core.runtime import atomic_path, check_outputs_finite
from wsol.data import MetadataError, WSOLMetadata, read_wsol_metadata
from wsol.metrics import LocAccuracy, MaxBoxAccEvaluator, boxes_at_threshold, centred_box
from wsol.model import normalise_cams
from wsol.scoremaps import gt_boxes_resized, load_scoremap, score_scoremap_dir  # noqa: F401 (public here too)

__all__ = ["gt_boxes_resized", "load_scoremap", "score_scoremap_dir", "evaluate_model",
           "centred_box_baseline"]


def centred_box_baseline(metadata_dir, size=(224, 224), fraction: float = 0.5,
                         iou_thresholds=(30, 50, 70)) -> dict:
    """Accuracy of predicting one centred box (``fraction`` of each side) for every image.

    Returns {"boxacc": {delta: %}, "boxacc_mean": % (comparable to MaxBoxAccV2), "fraction"}.
    With ``fraction=None`` the best fraction on a 0.05 grid is picked (an optimistic baseline).
    """
    if fraction is not None and not 0 < fraction <= 1:
        raise InputError(f"fraction (--fraction) must be in (0, 1], got {fraction}")
    if min(size) <= 0:
        raise InputError(f"size (--size) must be positive, got {size}")
    meta = read_wsol_metadata(metadata_dir, require_boxes=True) if not isinstance(metadata_dir,
                                                                                  WSOLMetadata) \
        else metadata_dir
    gts = [gt_boxes_resized(meta, iid, size) for iid in meta.image_ids]
    from wsol.metrics import iou_matrix

    def score(frac):
        box = centred_box(size, frac)
        best = np.array([iou_matrix(box, g).max() for g in gts])
        acc = {str(d): float((best >= d / 100).mean() * 100) for d in iou_thresholds}
        return {"boxacc": acc, "boxacc_mean": float(np.mean(list(acc.values()))), "fraction": frac}

    if fraction is not None:
        return score(fraction)
    return max((score(round(f, 2)) for f in np.arange(0.05, 1.0001, 0.05)),
               key=lambda r: r["boxacc_mean"])


def _sum_over_ranks(v2: MaxBoxAccEvaluator, v1: MaxBoxAccEvaluator, loc: LocAccuracy) -> None:
    """Under torchrun each rank accumulated its shard: add every rank's counts into its evaluators
    (integer counts per threshold: the sums are exactly the single-process counts)."""
    if ddist.rank_world()[1] > 1:
        loc_keys = ("n", "gt_known", "top1", "top5", "top1_cls")
        parts = ddist.all_gather_objects([(ev.num_correct, ev.count) for ev in (v2, v1)]
                                         + [[getattr(loc, k) for k in loc_keys]])
        for j, ev in enumerate((v2, v1)):
            ev.num_correct = {d: sum(p[j][0][d] for p in parts) for d in ev.iou_thresholds}
            ev.count = sum(p[j][1] for p in parts)
        for j, k in enumerate(loc_keys):
            setattr(loc, k, sum(p[2][j] for p in parts))


def _batch_records(meta: WSOLMetadata, size, evaluators, scoremap_dir, keep_examples: int):
    """The per-batch callable of `evaluate_model`: accumulates this rank's images into
    ``evaluators`` (v2, v1, loc), writes their score maps, and returns one record per image:
    (non-finite logit and CAM values, its example for figures or None), after one device -> host
    transfer."""
    v2, v1, loc = evaluators

    def to_records(batch, outputs, indices):
        images, labels, _ = batch
        logits, cams = outputs
        # NaN logits or CAMs would score as a constant map and a wrong class: counted, never saved
        bad = ((~torch.isfinite(logits.float())).flatten(1).sum(1)
               + (~torch.isfinite(cams.float())).flatten(1).sum(1))
        maps = normalise_cams(cams.float(), size)[:, 0]
        top5 = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
        bad, maps, top5 = to_host([bad, maps, top5])
        maps, top5 = maps.numpy(), top5.tolist()
        records = []
        for j, (idx, label) in enumerate(zip(indices, labels.tolist())):
            iid = meta.image_ids[idx]
            gt = gt_boxes_resized(meta, iid, (size[1], size[0]))
            smap = maps[j]
            v2.accumulate(smap, gt, iid)
            v1.accumulate(smap, gt, iid)
            loc.accumulate(smap, gt, label, top5[j])
            if scoremap_dir is not None and not bad[j]:
                save_scoremap(scoremap_dir, iid, smap)
            example = None
            if idx < keep_examples:
                example = {"image": images[j].float().permute(1, 2, 0).numpy(), "cam": smap,
                           "gt": gt, "image_id": iid, "label": label, "pred": top5[j][0]}
            records.append((int(bad[j]), example))
        return records
    return to_records


def evaluate_model(model, dataset, meta: WSOLMetadata, device, batch_size: int, workers: int = 0,
                   size=(224, 224), cam_curve_interval=0.001, iou_thresholds=(30, 50, 70),
                   loc_threshold=0.15, loc_iou=0.5, loc_op=">=", scoremap_dir=None,
                   keep_examples: int = 0, precision: str = "fp32", split: str = "test") -> dict:
    """Classification + localization of a CAM model over one split (CAMs of the true class).

    ``dataset`` yields (image [3, H, W] in [0, 1], label, index into ``meta.image_ids``); each rank
    predicts its shard (``mixup_transfer.core.inference``), counts summed by `_sum_over_ranks`.
    Returns percentages: top1_cls, top5_cls, maxboxacc_v1 (largest contour, IoU 50), maxboxacc_v2
    (all contours, mean over the IoUs), maxboxacc_v2_per_iou, best thresholds, gt_known / top1 /
    top5_loc at ``loc_threshold`` and ``loc_iou``, the BoxAcc curves, and the (image, cam, gt, pred
    boxes) of the first ``keep_examples`` images for figures. A NaN or infinite logit or CAM value
    stops it (`NonFiniteOutputError` naming ``split`` and the count, on every rank) and the score
    map of such an image is never written."""
    v2 = MaxBoxAccEvaluator(cam_curve_interval, iou_thresholds, multi_contour=True)
    v1 = MaxBoxAccEvaluator(cam_curve_interval, (50,), multi_contour=False)
    loc = LocAccuracy(loc_threshold, loc_iou, loc_op, multi_contour=False)
    to_records = _batch_records(meta, size, (v2, v1, loc),
                                None if scoremap_dir is None else Path(scoremap_dir),
                                keep_examples)
    res = inference_on_dataset(model, dataset,
                               lambda m, inputs: m.logits_and_cams(inputs[0], inputs[1]),
                               to_records,
                               batch_size=batch_size, device=device, workers=workers,
                               precision=precision, select=lambda batch: batch[:2],
                               desc="evaluate")
    check_outputs_finite("wsol", split, {"logit or CAM": sum(r[0] for r in res.records)})
    _sum_over_ranks(v2, v1, loc)
    return _report(v2, v1, loc, [r[1] for r in res.records if r[1] is not None][:keep_examples])


def save_scoremap(scoremap_dir: Path, image_id: str, smap: np.ndarray) -> None:
    """Write ``<scoremap_dir>/<image_id>.npy`` atomically; an id that would leave the folder
    (``../x``, an absolute path) is refused (`MetadataError` naming it): a metadata file never
    writes outside the folder."""
    path = inside(scoremap_dir, f"{image_id}.npy", f"image id {image_id!r}", MetadataError)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, smap.astype(np.float32))


def _report(v2: MaxBoxAccEvaluator, v1: MaxBoxAccEvaluator, loc: LocAccuracy,
            examples: list) -> dict:
    r2, r1, rl = v2.compute(), v1.compute(), loc.compute()
    for ex in examples:  # boxes at the split's best IoU-50 threshold, all contours
        ex["pred_boxes"] = boxes_at_threshold(ex["cam"], r2["best_threshold"].get("50", 0.5), True)
    return {
        "top1_cls": rl["top1_cls"],
        "maxboxacc_v1": r1["maxboxacc_v1"],
        "maxboxacc_v2": r2["maxboxacc_v2"],
        "maxboxacc_v2_per_iou": r2["maxboxacc_per_iou"],
        "best_threshold": r2["best_threshold"],
        "best_threshold_v1": r1["best_threshold"]["50"],
        "gt_known_loc": rl["gt_known_loc"],
        "top1_loc": rl["top1_loc"],
        "top5_loc": rl["top5_loc"],
        "num_images": r2["num_images"],
        "_box_acc": {str(d): a.tolist() for d, a in v2.box_acc().items()},
        "_box_acc_v1": v1.box_acc()[50].tolist(),
        "_thresholds": v2.thresholds.tolist(),
        "_examples": examples,
    }
