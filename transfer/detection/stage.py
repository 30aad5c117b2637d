"""The detection stage: ``run(cfg, inputs, run_dir)`` and ``finetune_detector(cfg, weights, run_dir)``, which
validate the config once and hand it to the backend that ``cfg["backend"]`` names (``torchvision_backend`` or
``d2_backend``). Only the pipeline and the tools import this module; the backends never do.
"""

from __future__ import annotations

import copy
from pathlib import Path

from mixup_transfer.core.stage import Stage
from transfer.detection import d2_backend, torchvision_backend
from transfer.detection.config import resolve_config


def run(cfg: dict, inputs: dict | None, run_dir) -> dict:
    """The detection stage: fine-tune from ``inputs["weights"]`` (None or absent: a random backbone)."""
    inputs = dict(inputs or {})
    weights = inputs.pop("weights", None)
    if inputs:
        raise ValueError(f"detection takes only a 'weights' input, got {sorted(inputs)}")
    return finetune_detector(cfg, weights, run_dir)


def finetune_detector(cfg: dict, weights: str | None, run_dir) -> dict:
    """Fine-tune (every seed) and evaluate; returns and writes ``run_dir/metrics.json``.

    ``weights``: a backbone checkpoint (loaded strictly by ``mixup_transfer.core.checkpoint.load_backbone``) or None
    for a randomly initialised backbone (trainable BN unless ``model.norm`` says otherwise)."""
    cfg = resolve_config(copy.deepcopy(cfg))
    run_dir = Path(run_dir)
    if cfg["backend"] == "detectron2":
        return d2_backend.finetune(cfg, weights, run_dir)
    if cfg["backend"] != "torchvision":
        raise ValueError(f"backend={cfg['backend']!r} is not one of ['torchvision', 'detectron2']")
    return torchvision_backend.finetune(cfg, weights, run_dir)


STAGE = Stage(
    name="detection",
    entry="transfer.detection.stage:run",
    schema="transfer.detection.config:DEFAULTS",
    inputs=(),
    optional_inputs=("weights",),  # the backbone checkpoint; None: random init
    outputs=("summary.json", "seed_<k>/metrics.json", "seed_<k>/model_final.pth"),
    gpus_per_node=8,
    options=(),  # finished seeds are always kept (no --force); --resume only allows a non-empty run folder
    run_dir=lambda cfg, config, cwd: Path(cwd) / "runs" / "detection" / Path(config).stem,
    description="fine-tune SSD or Faster R-CNN from a backbone and score it (VOC devkit, pycocotools)",
)
