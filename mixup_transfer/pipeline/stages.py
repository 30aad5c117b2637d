"""The toolkit's stages, one line each, and the pipeline's adapters to their entry points.

`DECLARED` names where each stage package declares its stage (`mixup_transfer.core.stage.Stage`);
`stage(name)` imports a declaration on first use, so listing the names imports nothing. Adding a
stage: its package, its declaration (a `STAGE`), and one line here; the launcher
(`tools/submit.py`), the tools and the pipeline read it.

The adapters below call each stage's one entry point, `run(cfg, inputs, run_dir) -> metrics`: they
read the stage's YAML config with the pipeline's overrides, name its inputs and return its metrics
(a JSON-able dict)."""

from __future__ import annotations

import importlib
from pathlib import Path

from mixup_transfer.core.config import ConfigError, load_config
from mixup_transfer.core.stage import Stage

DECLARED = {
    "pretrain": "pretrain.stage",
    "detection": "transfer.detection.stage",
    "wsol": "wsol.stage",
    "robustness": "transfer.robustness.stage",
}
NAMES = tuple(DECLARED)


def stage(name: str) -> Stage:
    """The declared stage called `name`."""
    if name not in DECLARED:
        raise ConfigError(f"unknown stage {name!r}; valid stages: {list(NAMES)}")
    declared = importlib.import_module(DECLARED[name]).STAGE
    assert declared.name == name, (DECLARED[name], declared.name)
    return declared


def pretrain(config: str, overrides: list[str], run_dir: Path) -> dict:
    from mixup_transfer.core.checkpoint import read_checkpoint
    from mixup_transfer.core.smalldata import detect_layout
    from pretrain.task import run

    cfg = load_config(config, overrides)
    # resume=True: a pretraining run killed mid-way continues from its last checkpoint
    metrics = run(cfg, None, run_dir, resume=True)
    meta = read_checkpoint(Path(run_dir) / "backbone.pth")["meta"]
    data = cfg.get("data") or {}
    dataset = detect_layout(data["root"], data.get("dataset")
                            or "auto")[0] if data.get("root") else None
    return {**metrics, "num_classes": meta["num_classes"], "dataset": dataset}


def detection(config: str, overrides: list[str], weights: Path | None, run_dir: Path) -> dict:
    from transfer.detection.stage import run

    return run(load_config(config, overrides), {"weights": str(weights) if weights else None},
               run_dir)


def wsol(config: str, overrides: list[str], weights: Path | None, run_dir: Path) -> dict:
    from wsol.finetune import run

    return run(load_config(config, overrides), {"weights": str(weights) if weights else None},
               run_dir)


def robustness(backbone: Path, imagenet_root: Path, spec: dict, run_dir: Path) -> dict:
    from transfer.robustness.stage import run

    cfg = {"suites": spec.get("suites", "all"), "ood": spec.get("ood") or [],
           **(spec.get("options") or {})}
    return run(cfg, {"checkpoint": backbone, "imagenet": imagenet_root}, run_dir)
