#!/usr/bin/env python
"""Pretrain a ResNet or a ViT with one mixing method.

    python tools/run_pretrain.py --config configs/pretrain/toy_multimix.yaml \\
        [KEY=VALUE ...] [--force]
    torchrun --nproc_per_node 8 tools/run_pretrain.py \\
        --config configs/pretrain/imagenet_multimix.yaml

Writes runs/<name>/ (or --run-dir): config.yaml, log.jsonl, checkpoints/last.pth, backbone.pth,
metrics.json, figures/. Running the same command again continues runs/<name>/checkpoints/last.pth
exactly (a changed config is refused); --force starts over. The arguments come from the stage's
declaration (pretrain/stage.py).
"""

import sys

from mixup_transfer.core.cli import stage_main
from mixup_transfer.pipeline.stages import stage


def main(argv=None) -> int:
    return stage_main(stage("pretrain"), argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
