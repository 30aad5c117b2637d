#!/usr/bin/env python
"""What to run first on a new GPU node or cluster: every CUDA path of the toolkit for a few steps
on the toy world (a few minutes on one GPU), with a pass/fail table
(mixup_transfer/pipeline/gpu_check.py says what each check does).

    # all checks -> runs/gpu_check/gpu_check.{md,json}
    python tools/gpu_check.py --out runs/gpu_check
    # a subset
    python tools/gpu_check.py --only methods,decode

Exit status: 0 when every check passed, 1 when one failed, 2 when no CUDA device is visible
(nothing is checked).
"""

import argparse
import sys
from pathlib import Path

from mixup_transfer.core import cli


@cli.entry
def main(argv=None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--out", default="runs/gpu_check",
                   help="output folder (gpu_check.md, gpu_check.json, runs)")
    p.add_argument("--only", default=None, help="comma-separated checks (default: all)")
    p.add_argument("--toy", default=None, help="an existing toy world (default: a fresh tiny one)")
    # run by the nccl check
    p.add_argument("--nccl-probe", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch

    from mixup_transfer.pipeline import gpu_check

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device is visible here (torch.cuda.is_available() is False, "
              f"torch {torch.__version__}, built for CUDA {torch.version.cuda}); nothing was "
              "checked", file=sys.stderr)
        return 2
    if args.nccl_probe:
        gpu_check.nccl_probe()
        return 0
    only = tuple(args.only.split(",")) if args.only else gpu_check.CHECKS
    unknown = sorted(set(only) - set(gpu_check.CHECKS))
    if unknown:
        p.error(f"unknown check(s) {unknown}; valid: {list(gpu_check.CHECKS)}")
    report = gpu_check.run_checks(args.out, "cuda", only=only, toy=args.toy)
    print(gpu_check.to_markdown(report))
    print(f"written: {Path(args.out) / 'gpu_check.md'}", file=sys.stderr)
    return 0 if all(r["ok"] for r in report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
