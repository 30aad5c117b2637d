#!/usr/bin/env python
"""Pretrain a ResNet or a ViT with one mixing method.

    python tools/run_pretrain.py --config configs/pretrain/toy_multimix.yaml [KEY=VALUE ...] [--resume]
    torchrun --nproc_per_node 8 tools/run_pretrain.py --config configs/pretrain/imagenet_multimix.yaml

Writes runs/<name>/ (or --run-dir): config.yaml, log.jsonl, checkpoints/last.pth, backbone.pth,
metrics.json, figures/. `--resume` continues runs/<name>/checkpoints/last.pth exactly.
"""

import json
import logging
import sys
from pathlib import Path

from mixup_transfer.core import cli
from mixup_transfer.core.config import load_config
from mixup_transfer.core.lock import run_lock
from mixup_transfer.core.runtime import cleanup_distributed
from pretrain.task import DEFAULTS, run

log = logging.getLogger("pretrain")


@cli.entry
def main(argv=None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--config", required=True, help="pretraining YAML (configs/pretrain/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides with dotted keys, anywhere on the command line (e.g. optim.lr=0.05); "
                        "an unknown key is an error")
    p.add_argument("--resume", action="store_true",
                   help="continue the run's last checkpoint (refused if the config differs)")
    p.add_argument("--force", action="store_true", help="start over in a run folder that holds a checkpoint")
    p.add_argument("--run-dir", default=None, help="output folder (default runs/<name>)")
    args = p.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, defaults=DEFAULTS)
        run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / cfg["name"]
        log.info("pretraining %s with config %s into %s", cfg["method"]["name"], args.config, run_dir)
        with run_lock(run_dir, "pretraining run"):  # one writer per run folder
            metrics = run(cfg, None, run_dir, resume=args.resume, force=args.force)
    finally:
        cleanup_distributed()
    if cli.launch_rank() == 0:  # the group is left: ask the launcher's environment, not torch.distributed
        cli.log_outputs(run_dir)
        print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
