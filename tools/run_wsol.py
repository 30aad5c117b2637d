#!/usr/bin/env python
"""WSOL on CUB: metadata conversion, CAM fine-tuning and evaluation.

    python tools/run_wsol.py metadata --cub data/CUB_200_2011 --out data/wsol_metadata/CUB
    python tools/run_wsol.py finetune --config configs/wsol/cub_alignmix.yaml --weights CKPT
        [--run-dir DIR] [--force] [KEY=VALUE ...]
    python tools/run_wsol.py evaluate --config CFG --model RUN/cam_model.pth --scoremaps DIR
        [KEY=VALUE ...]
    python tools/run_wsol.py baseline --metadata data/wsol_metadata/CUB/test
        [--size 224] [--fraction 0.5]

`finetune` takes the arguments of the stage's declaration (wsol/stage.py); running it again
continues the run (a changed config is refused), --force starts over. The other commands are
wsol/cli.py's.
"""

import sys

from mixup_transfer.core.cli import stage_main
from mixup_transfer.pipeline.stages import stage


def main(argv=None) -> int:
    return stage_main(stage("wsol"), argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
