"""Adapters from the pipeline to each stage's public entry point: read the stage's YAML config with
the pipeline's overrides, call the package function, return its metrics (a JSON-able dict)."""

from __future__ import annotations

from pathlib import Path

from pretrain.config import load_config


def pretrain(config: str, overrides: list[str], run_dir: Path) -> dict:
    from pretrain.checkpoint import read_checkpoint
    from pretrain.trainer import train

    # resume=True: a pretraining run killed mid-way continues from its last checkpoint
    metrics = train(load_config(config, overrides), run_dir, resume=True)
    meta = read_checkpoint(Path(run_dir) / "backbone.pth")["meta"]
    return {**metrics, "num_classes": meta["num_classes"]}


def detection(config: str, overrides: list[str], weights: Path | None, run_dir: Path) -> dict:
    from transfer.det_train import finetune_detector

    return finetune_detector(load_config(config, overrides), str(weights) if weights else None, run_dir)


def wsol(config: str, overrides: list[str], weights: Path | None, run_dir: Path) -> dict:
    from wsol.finetune import finetune

    return finetune(load_config(config, overrides), str(weights) if weights else None, run_dir)


def robustness(backbone: Path, imagenet_root: Path, spec: dict, run_dir: Path) -> dict:
    from transfer.robustness.evaluate import evaluate_checkpoint

    return evaluate_checkpoint(backbone, imagenet_root, suites=spec.get("suites", "all"), out_dir=run_dir,
                               ood_dirs=spec.get("ood") or (), **(spec.get("options") or {}))
