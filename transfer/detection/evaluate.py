"""Evaluate a trained detector without training it (detectron2's `--eval-only`).

    tools/run_detection.py --eval-only --config CFG \\
        --checkpoint RUN/seed_0/checkpoints/last.pth [--run-dir OUT]

The detector is built from the config (the one it was trained with: same model type, arch, sizes
and data format), its weights are read from an engine checkpoint (`checkpoints/last.pth`, its
"model" entry) or a plain state dict, and the test set of the config is predicted (sharded under
torchrun) and scored with the stage's own scorer: VOC mAP (`eval.metric`) or COCO AP, in percent,
with a `units` field.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mixup_transfer.core import runtime
from mixup_transfer.core.checkpoint import CheckpointError, read_checkpoint
from mixup_transfer.core.units import units
from transfer.detection.config import resolve_config
from transfer.detection.scoring import score_predictions
from transfer.detection.torchvision_backend import build_datasets, build_model, predict_sharded

log = logging.getLogger(__name__)


def load_detector_state(path) -> dict:
    """The detector state dict of `path`: an engine checkpoint's "model" entry, or the file's dict
    itself."""
    state = read_checkpoint(path)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path}: not a detector checkpoint (expected checkpoints/last.pth "
                              "of a detection run, or a state dict)")
    return state


def evaluate_detector(cfg: dict, checkpoint, out_dir) -> dict:
    """Score the detector of `checkpoint` on the test set of `cfg`; writes out_dir/metrics.json
    (rank 0) and returns the metrics ({} on the other ranks)."""
    cfg = resolve_config(cfg)
    out_dir = Path(out_dir)
    device = runtime.get_device(cfg["runtime"]["device"])
    _, test, ctx, _ = build_datasets(cfg)
    model = build_model(cfg, ctx["num_classes"], None)
    missing, unexpected = model.load_state_dict(load_detector_state(checkpoint), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{checkpoint}: does not fit the config's {cfg['model']['type']} "
                              f"{cfg['model']['arch']} with {ctx['num_classes'] - 1} classes "
                              f"(missing {sorted(missing)[:3]}, unexpected "
                              f"{sorted(unexpected)[:3]})")
    model.to(device)
    preds, _, seconds, n = predict_sharded(model, test, cfg["eval"]["batch_size"],
                                           cfg["data"]["num_workers"], device,
                                           cfg["runtime"]["precision"])
    if not runtime.is_main_process():
        return {}
    metrics = score_predictions(preds, ctx, out_dir / "eval", cfg["eval"]["metric"])
    metrics.update(checkpoint=str(checkpoint), test_images=n,
                   test_img_per_s=n / max(seconds, 1e-9))
    metrics["units"] = units(metrics)
    runtime.write_json(metrics, out_dir / "metrics.json")
    return metrics
