#!/usr/bin/env python
"""An ablation: one knob of a pretraining recipe swept over values x seeds -> table, ablation.json,
curve (mixup_transfer/pipeline/ablation.py).

    python tools/ablate.py --config configs/ablation/toy_multimix_n.yaml \\
        [--force RUN ...] [--plan] [KEY=VALUE ...]

Finished runs are reused (their content key is the hash of their resolved config), so running the
same command again resumes an interrupted sweep, and adding a value or a seed runs only the new
runs. --force redoes runs: `all`, a value's folder (e.g. n=100) or `baseline`. --plan lists the
runs and whether each is done.
"""

import argparse
import sys
import time

from mixup_transfer.core import cli
from mixup_transfer.pipeline.ablation import plan_lines, run_ablation
from mixup_transfer.pipeline.run import StopPipeline


@cli.entry
def main(argv=None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--config", required=True, help="ablation YAML (configs/ablation/*.yaml)")
    p.add_argument("--force", action="append", default=[],
                   help="redo runs even if finished: all, a value's folder (e.g. n=100) or "
                        "baseline (repeatable)")
    p.add_argument("--plan", action="store_true",
                   help="list the planned runs and whether each is done; run nothing")
    # tests: simulate a kill
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="KEY=VALUE overrides of the ablation config "
                                                "(knob.values=[1,10])")
    args = p.parse_intermixed_args(argv)
    if args.plan:
        print("\n".join(plan_lines(args.config, args.overrides)))
        return 0
    t0 = time.time()
    try:
        out = run_ablation(args.config, args.overrides, args.force, args.stop_after)
    except StopPipeline as e:
        print(e)
        return 3
    print(out["markdown"].read_text())
    print(f"Wrote {out['json']}, {out['markdown']}, {out['figure']}\n"
          f"Total time: {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
