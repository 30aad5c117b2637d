#!/usr/bin/env python
"""Fine-tune and evaluate a detector from a backbone checkpoint (its arguments come from the
stage's declaration, transfer/detection/stage.py, and transfer/detection/cli.py).

  tools/run_detection.py --config configs/detection/toy_ssd_voc.yaml --weights
  runs/erm/backbone.pth tools/run_detection.py --config configs/detection/ssd300_r50_voc0712.yaml
  --weights BACKBONE \\
      data.root=/data/VOCdevkit seeds=[0,1,2]
  torchrun --nproc_per_node 8 tools/run_detection.py --config
  configs/detection/frcnn_r50_fpn_1x_coco.yaml ... tools/run_detection.py --backend detectron2
  --num-gpus 8 --config ... --weights BACKBONE   # detectron2's launch tools/run_detection.py
  --eval-only --config CFG --checkpoint RUN/seed_0/checkpoints/last.pth [--run-dir OUT]

--eval-only (detectron2's flag of the same name) evaluates a trained detector without training: the
model of the config (the one it was trained with) with the checkpoint's weights, on the config's
test set; torchvision backend. Running the same command again continues the run folder (finished
seeds are kept); --force starts over.
"""

import sys

from mixup_transfer.core.cli import stage_main
from mixup_transfer.pipeline.stages import stage


def main(argv=None) -> int:
    return stage_main(stage("detection"), argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
