"""The detection stage's own command-line flags and command (its declaration's `cli`,
mixup_transfer/core/stage.py): `tools/run_detection.py` is the declared arguments plus --backend,
--num-gpus (detectron2's launch) and --eval-only.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from mixup_transfer.core import cli

log = logging.getLogger("detection")


def add_arguments(p, stage, sub) -> None:
    p.add_argument("--backend", choices=["torchvision", "detectron2"], default=None,
                   help="the detector implementation (default: the config's `backend`)")
    p.add_argument("--num-gpus", type=int, default=1,
                   help="detectron2 backend without torchrun: start this many processes with "
                        "detectron2's launch (like detectron2's train_net.py --num-gpus; gloo "
                        "on CPU)")
    p.add_argument("--eval-only", action="store_true",
                   help="evaluate the trained detector of --checkpoint on the config's test "
                        "set; no training")
    p.add_argument("--checkpoint", default=None,
                   help="--eval-only: a detection run's seed_<s>/checkpoints/last.pth (or a "
                        "detector state dict)")


def command(stage, args, p) -> int:
    from transfer.detection.config import load_det_config

    overrides = list(args.overrides) + ([f"backend={args.backend}"] if args.backend else [])
    cfg = load_det_config(args.config, overrides)
    if args.eval_only or args.checkpoint:
        if not (args.eval_only
                and args.checkpoint) or args.weights or args.force or args.num_gpus > 1:
            p.error("--eval-only takes --checkpoint (a trained detector), and neither "
                    "--weights, --force nor --num-gpus")
        if cfg["backend"] != "torchvision":
            p.error("--eval-only evaluates torchvision-backend runs; a detectron2 run: its "
                    "train_net.py --eval-only with the run's detectron2_*.yaml")
        return _eval_only(cfg, args)
    run_dir = Path(args.run_dir or stage.run_dir(cfg, args.config, Path.cwd()))
    weights = cli.stage_inputs(stage, args)["weights"]
    log.info("detection fine-tuning with config %s into %s (backbone: %s)", args.config, run_dir,
             weights or "random init")
    from mixup_transfer.core.lock import run_lock

    with run_lock(run_dir, "detection run"):  # one writer per run folder
        return _finetune(p, args, cfg, weights, run_dir)


def _finetune(p, args, cfg: dict, weights: str | None, run_dir: Path) -> int:
    from mixup_transfer.core.runtime import cleanup_distributed, init_distributed
    from transfer.detection.d2_backend import Detectron2BackendError, launch_finetune
    from transfer.detection.stage import _start_over_if_forced, run

    try:
        if args.num_gpus > 1:
            if cfg["backend"] != "detectron2" or "RANK" in os.environ:
                p.error("--num-gpus is for the detectron2 backend outside torchrun (torchrun "
                        "starts its own)")
            _start_over_if_forced(run_dir, True, args.force)
            # each spawned process trusts it
            trusted = [weights] if args.allow_pickle and weights else []
            metrics = launch_finetune(cfg, weights, run_dir, args.num_gpus, trusted=trusted)
        else:
            # asked before the group is left (then every rank is "main")
            main_rank = init_distributed()[0] == 0
            try:
                metrics = run(cfg, {"weights": weights}, run_dir, resume=not args.force,
                              force=args.force)
            finally:
                cleanup_distributed()
            if not main_rank:
                return 0
    except Detectron2BackendError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cli.launch_rank() == 0:
        _print_summary(run_dir, metrics)
    return 0


def _print_summary(run_dir: Path, metrics: dict) -> None:
    from mixup_transfer.core.units import units

    cli.log_outputs(run_dir)
    key = metrics.get("primary", "mAP")  # VOC mAP or COCO AP
    keys = (key, f"{key}_mean", f"{key}_std", "AP50", "train_img_per_s", "test_img_per_s", "seeds",
            "iterations", "detectron2")
    shown = {k: metrics[k] for k in keys if k in metrics}
    print(json.dumps({**shown, "units": units(shown)}, indent=1))


def _eval_only(cfg: dict, args) -> int:
    from mixup_transfer.core.runtime import cleanup_distributed, init_distributed
    from transfer.detection.evaluate import evaluate_detector

    run_dir = Path(args.run_dir or Path("runs") / "detection" / f"{Path(args.config).stem}_eval")
    log.info("evaluating %s with config %s into %s", args.checkpoint, args.config, run_dir)
    init_distributed()
    try:
        metrics = evaluate_detector(cfg, args.checkpoint, run_dir)
    finally:
        cleanup_distributed()
    if cli.launch_rank() == 0:
        cli.log_outputs(run_dir)
        print(json.dumps(metrics, indent=1))
    return 0
