"""The detection stage: ``run(cfg, inputs, run_dir)`` and ``finetune_detector(cfg, weights,
run_dir)``, which validate the config once and hand it to the backend that ``cfg["backend"]`` names
(``torchvision_backend`` or ``d2_backend``). Only the pipeline and the tools import this module;
the backends never do.
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path

from mixup_transfer.core.config import ConfigError
from mixup_transfer.core.stage import Stage
from transfer.detection import d2_backend, torchvision_backend
from transfer.detection.config import resolve_config

log = logging.getLogger("detection")


def run(cfg: dict, inputs: dict | None, run_dir, resume: bool = True, force: bool = False) -> dict:
    """The detection stage: fine-tune from ``inputs["weights"]`` (None or absent: a random
    backbone).

    resume: continue the run folder (finished seeds are kept, the others resume; a run made from
    another config or backbone is refused). Without it a run folder that holds a run is an error
    unless ``force``, which removes what the folder holds (its lock aside) and starts over."""
    inputs = dict(inputs or {})
    weights = inputs.pop("weights", None)
    if inputs:
        raise ValueError(f"detection takes only a 'weights' input, got {sorted(inputs)}")
    _start_over_if_forced(Path(run_dir), resume, force)
    return finetune_detector(cfg, weights, run_dir)


def _start_over_if_forced(run_dir: Path, resume: bool, force: bool) -> None:
    from mixup_transfer.core.lock import LOCK_NAME
    from mixup_transfer.core.runtime import barrier, is_main_process

    held = [f for f in run_dir.iterdir() if f.name != LOCK_NAME] if run_dir.is_dir() else []
    if not held:
        return
    if force:
        if is_main_process():
            log.warning("--force: removing the run in %s (%d entries) to start over", run_dir,
                        len(held))
            for f in held:
                shutil.rmtree(f) if f.is_dir() else f.unlink()
        barrier()
    elif not resume:
        raise ConfigError(f"{run_dir} holds a run; continue it (resume) or pass --force to start "
                          "over")


def finetune_detector(cfg: dict, weights: str | None, run_dir) -> dict:
    """Fine-tune (every seed) and evaluate; returns and writes ``run_dir/metrics.json``.

    ``weights``: a backbone checkpoint (loaded strictly by
    ``mixup_transfer.core.checkpoint.load_backbone``) or None for a randomly initialised backbone
    (trainable BN unless ``model.norm`` says otherwise)."""
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
    options=("resume", "force"),  # resume keeps finished seeds; force clears the run folder
    run_dir=lambda cfg, config, cwd: Path(cwd) / "runs" / "detection" / Path(config).stem,
    cli="transfer.detection.cli",  # --backend, --num-gpus (detectron2's launch), --eval-only
    description="fine-tune SSD or Faster R-CNN from a backbone and score it (VOC devkit, "
                "pycocotools)",
)
