#!/usr/bin/env python
"""The main job: pretraining -> detection / WSOL / robustness -> one report
(mixup_transfer/pipeline/run.py).

    python tools/run_pipeline.py --config configs/pipeline/toy.yaml [--methods erm,multimix]
                                 [--force STAGE ...] [KEY=VALUE ...]

Finished stages are skipped, so running the same command again resumes an interrupted pipeline.
Under `torchrun --nproc_per_node=N tools/run_pipeline.py ...` every rank runs every stage (DDP
training, sharded evaluation) and rank 0 writes the files.
"""

import argparse
import sys
import time
from pathlib import Path

from mixup_transfer.core import cli
from mixup_transfer.core.distributed import torchrun_session
from mixup_transfer.pipeline.publish import publish
from mixup_transfer.pipeline.run import STAGES, StagesFailed, StopPipeline, run_pipeline


@cli.entry
def main(argv=None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--config", required=True, help="pipeline YAML (configs/pipeline/*.yaml)")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods, replacing the config's list")
    p.add_argument("--force", action="append", default=[],
                   help=f"redo a stage even if finished: one of {', '.join(STAGES)} or a "
                        "detection name (repeatable); forcing pretrain redoes everything "
                        "downstream")
    p.add_argument("--publish", default=None, metavar="FILE.md",
                   help="after the run (finished stages are reused), write its report with "
                        "provenance to FILE.md and its figures beside it, e.g. docs/results.md")
    # tests: simulate a kill
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="KEY=VALUE overrides of the pipeline config")
    args = p.parse_intermixed_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    t0 = time.time()
    # under torchrun: every rank runs every stage, rank 0 writes
    with torchrun_session() as (rank, _):
        failed = None
        try:
            report = run_pipeline(args.config, args.overrides, methods, args.force,
                                  args.stop_after,
                                  command=" ".join(["python tools/run_pipeline.py",
                                                    *(argv or sys.argv[1:])]))
        except StopPipeline as e:
            print(e)
            return 3
        except StagesFailed as e:
            report, failed = e.report, e
    if rank:
        return 1 if failed else 0
    print("\n"
          f"Report: {report}  ({report.with_suffix('.html')})\n"
          f"Total time: {time.time() - t0:.0f} s")
    print(report.read_text())
    if failed:
        print(f"error: {failed}", file=sys.stderr)
        return 1
    if args.publish:
        print(f"published: {publish(report.parent, Path(args.publish))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
