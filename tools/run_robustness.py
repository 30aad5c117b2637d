#!/usr/bin/env python
"""Robustness suites of pretrained classifiers on ImageNet-layout val.

    tools/run_robustness.py --checkpoint CKPT --imagenet DIR \
        --suites clean,background,calibration,fgsm,pgd,ood
        [--ood DIR ...] [--out DIR] [data.max_val=N] [KEY=VALUE ...]
    # + alignment / uniformity, UMAP
    tools/run_robustness.py --checkpoint CKPT --imagenet DIR --suites clean,embedding

Suites: clean (top-1 / top-5 error), background (the val set with its background replaced or
noised, and the CAM localization of the clean images; needs box annotations, skipped with a note on
data without them), calibration (ECE), fgsm, pgd (adversarial error), ood (out-of-distribution
detection against --ood folders and synthetic noise), embedding (alignment and uniformity of the
embedding, UMAP figure; only when listed).

One checkpoint writes OUT/metrics.json and OUT/figures/. Several checkpoints (comparison mode; name
them with NAME=PATH, otherwise the run folder of `.../<run>/backbone.pth` or the file stem) write
OUT/<name>/metrics.json and OUT/comparison.md + OUT/comparison.json: one table per suite, methods
as rows. `--config configs/robustness/X.yaml` supplies defaults for the options; command-line flags
(one per top-level option) and KEY=VALUE overrides (any key: data.max_val=N, eval.batch_size=B,
runtime.precision=bf16) override it. The arguments come from the stage's declaration
(transfer/robustness/stage.py) and transfer/robustness/cli.py.
"""

import sys

from mixup_transfer.core.cli import stage_main
from mixup_transfer.pipeline.stages import stage


def main(argv=None) -> int:
    return stage_main(stage("robustness"), argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
