#!/usr/bin/env python
"""Fine-tune and evaluate a detector from a backbone checkpoint (thin wrapper over transfer.detection.stage).

  tools/run_detection.py --config configs/detection/toy_ssd_voc.yaml --weights runs/erm/backbone.pth
  tools/run_detection.py --config configs/detection/ssd300_r50_voc0712.yaml --weights BACKBONE \\
      data.root=/data/VOCdevkit seeds=[0,1,2]
  torchrun --nproc_per_node 8 tools/run_detection.py --config configs/detection/frcnn_r50_fpn_1x_coco.yaml ...
  tools/run_detection.py --backend detectron2 --num-gpus 8 --config ... --weights BACKBONE   # detectron2's launch
  tools/run_detection.py --eval-only --config CFG --checkpoint RUN/seed_0/checkpoints/last.pth [--run-dir OUT]

--eval-only (detectron2's flag of the same name) evaluates a trained detector without training: the model of the
config (the one it was trained with) with the checkpoint's weights, on the config's test set; torchvision backend.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from mixup_transfer.core import cli
from mixup_transfer.core.checkpoint import trust_pickled
from mixup_transfer.core.lock import LOCK_NAME, run_lock
from mixup_transfer.core.runtime import cleanup_distributed, init_distributed
from mixup_transfer.core.units import units
from transfer.detection.config import load_det_config
from transfer.detection.d2_backend import Detectron2BackendError, launch_finetune
from transfer.detection.stage import finetune_detector

log = logging.getLogger("detection")


@cli.entry
def main(argv=None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--config", required=True, help="YAML config (configs/detection/*.yaml)")
    p.add_argument("--weights", default=None,
                   help="backbone checkpoint; omit (or 'none') for a randomly initialised backbone")
    p.add_argument("--run-dir", default=None, help="output directory (default runs/detection/<config name>)")
    p.add_argument("--backend", choices=["torchvision", "detectron2"], default=None,
                   help="the detector implementation (default: the config's `backend`)")
    p.add_argument("--num-gpus", type=int, default=1,
                   help="detectron2 backend without torchrun: start this many processes with detectron2's "
                        "launch (like detectron2's train_net.py --num-gpus; gloo on CPU)")
    p.add_argument("--resume", action="store_true",
                   help="continue in an existing run dir (finished seeds are skipped, others resume)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="unpickle --weights if it holds Python objects (it can run code: only files you trust)")
    p.add_argument("--eval-only", action="store_true",
                   help="evaluate the trained detector of --checkpoint on the config's test set; no training")
    p.add_argument("--checkpoint", default=None,
                   help="--eval-only: a detection run's seed_<s>/checkpoints/last.pth (or a detector state dict)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides with dotted keys, anywhere on the command line; an unknown key is an error")
    args = p.parse_intermixed_args(argv)
    overrides = list(args.overrides) + ([f"backend={args.backend}"] if args.backend else [])
    cfg = load_det_config(args.config, overrides)
    if args.eval_only or args.checkpoint:
        if not (args.eval_only and args.checkpoint) or args.weights or args.resume or args.num_gpus > 1:
            p.error("--eval-only takes --checkpoint (a trained detector), and neither --weights, --resume nor "
                    "--num-gpus")
        if cfg["backend"] != "torchvision":
            p.error("--eval-only evaluates torchvision-backend runs; a detectron2 run: its train_net.py --eval-only "
                    "with the run's detectron2_*.yaml")
        return _eval_only(cfg, args)
    run_dir = Path(args.run_dir or Path("runs") / "detection" / Path(args.config).stem)
    log.info("detection fine-tuning with config %s into %s (backbone: %s)", args.config, run_dir,
             args.weights or "random init")
    if run_dir.exists() and any(f.name != LOCK_NAME for f in run_dir.iterdir()) and not args.resume:
        p.error(f"{run_dir} exists and is not empty; pass --resume to continue it or choose --run-dir")
    weights = None if args.weights in (None, "none", "None") else args.weights
    if args.allow_pickle and weights:
        trust_pickled(weights)
    with run_lock(run_dir, "detection run"):  # one writer per run folder
        return _finetune(p, args, cfg, weights, run_dir)


def _finetune(p, args, cfg: dict, weights: str | None, run_dir: Path) -> int:
    try:
        if args.num_gpus > 1:
            if cfg["backend"] != "detectron2" or "RANK" in os.environ:
                p.error("--num-gpus is for the detectron2 backend outside torchrun (torchrun starts its own)")
            trusted = [weights] if args.allow_pickle and weights else []  # each spawned process trusts it
            metrics = launch_finetune(cfg, weights, run_dir, args.num_gpus, trusted=trusted)
        else:
            main_rank = init_distributed()[0] == 0  # asked before the group is left (then every rank is "main")
            try:
                metrics = finetune_detector(cfg, weights, run_dir)
            finally:
                cleanup_distributed()
            if not main_rank:
                return 0
    except Detectron2BackendError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cli.launch_rank() == 0:
        cli.log_outputs(run_dir)
        key = metrics.get("primary", "mAP")  # VOC mAP or COCO AP
        keys = (key, f"{key}_mean", f"{key}_std", "AP50", "train_img_per_s", "test_img_per_s", "seeds", "iterations",
                "detectron2")
        shown = {k: metrics[k] for k in keys if k in metrics}
        print(json.dumps({**shown, "units": units(shown)}, indent=1))
    return 0


def _eval_only(cfg: dict, args) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
