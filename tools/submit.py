#!/usr/bin/env python
"""Submit a stage (or the whole pipeline) to SLURM with submitit: N nodes x G GPUs, one DDP process
per GPU, requeued on preemption / time-out and resumed from the run's last checkpoint
(mixup_transfer/pipeline/launch.py).

    tools/submit.py pretrain --config configs/pretrain/imagenet_multimix.yaml \\
        --nodes 4 --gpus-per-node 8 --partition gpu --timeout 4320 \\
        [--account A] [--qos Q] [--mem 480] [KEY=VALUE ...]
    tools/submit.py detection --config configs/detection/frcnn_r50_fpn_1x_coco.yaml \\
        --weights BACKBONE ...
    tools/submit.py wsol --config configs/wsol/cub_multimix.yaml --weights BACKBONE \\
        --gpus-per-node 1
    tools/submit.py robustness --config configs/robustness/imagenet.yaml \\
        --checkpoint CKPT --imagenet DIR --gpus-per-node 1
    tools/submit.py pipeline --config configs/pipeline/paper.yaml --gpus-per-node 1
    # try it here first
    tools/submit.py pretrain --local --gpus-per-node 0 --tasks-per-node 2 --wait --config ...

A job continues its run folder's run, as the stage's own tool does (and on every requeue); --force
starts over. Prints the job id and its log folder (--job-dir, default runs/submitit/<job id>);
--wait blocks and prints the stage's metrics (rank 0's). Every stage runs on N nodes x G tasks, one
process per task, rank-aware as under torchrun: pretrain, detection and wsol fine-tuning train
under DDP, evaluation is sharded over the processes and rank 0 writes, and pipeline runs each of
its stages that way. pretrain and detection default to 8 GPUs per node, wsol, robustness and
pipeline to 1.
"""

import argparse
import json
import sys

from mixup_transfer.core import cli
from mixup_transfer.core.stage import add_stage_arguments
from mixup_transfer.pipeline.launch import (
    STAGES,
    Resources,
    default_gpus_per_node,
    make_spec,
    submit,
)
from mixup_transfer.pipeline.stages import NAMES, stage


def _parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("stage", choices=STAGES, help="what the job runs: a stage's tool, or the "
                                                 "whole pipeline")
    # the stages' own arguments, from their declarations (the same flags as tools/run_<stage>.py)
    add_stage_arguments(p, [stage(name) for name in NAMES])
    r = p.add_argument_group("resources")
    r.add_argument("--nodes", type=int, default=1, help="SLURM nodes (default 1)")
    r.add_argument("--gpus-per-node", type=int, default=None,
                   help="default: 8 for pretrain and detection, 1 for the one-process stages")
    r.add_argument("--tasks-per-node", type=int, default=None, help="default: one per GPU")
    r.add_argument("--cpus-per-task", type=int, default=10, help="data-loading workers need them")
    r.add_argument("--mem", type=int, default=None, help="GB per node (default: the partition's)")
    r.add_argument("--timeout", type=int, default=1440,
                   help="time limit in minutes; requeued before it")
    r.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's)")
    r.add_argument("--account", default=None, help="SLURM account to charge (default: yours)")
    r.add_argument("--qos", default=None, help="SLURM quality of service (default: the "
                                               "partition's)")
    r.add_argument("--name", default=None, help="job name (default: mt-<stage>)")
    r.add_argument("--signal-delay", type=int, default=120,
                   help="seconds before the limit the job is signalled")
    r.add_argument("--max-requeues", type=int, default=3,
                   help="time-outs before the job stops requeueing")
    r.add_argument("--job-dir", default="runs/submitit/%j",
                   help="submitit scripts and logs (%%j: job id)")
    r.add_argument("--local", action="store_true",
                   help="submitit's local executor: run the job on the local machine")
    r.add_argument("--wait", action="store_true", help="wait for the job and print its metrics")
    return p


@cli.entry
def main(argv=None) -> int:
    p = _parser()
    args = p.parse_intermixed_args(argv)  # the stage, options and KEY=VALUE overrides in any order
    if args.retired_resume:
        p.error("--resume and --no-resume are not options: a job continues its run folder's run "
                "by default (and on every requeue); --force starts over")
    spec = make_spec(args.stage, args.config, args.overrides, args.run_dir, args.weights,
                     args.checkpoint, args.imagenet, force=args.force,
                     allow_pickle=args.allow_pickle, teacher=getattr(args, "teacher", None))
    gpus = (
        args.gpus_per_node if args.gpus_per_node is not None else default_gpus_per_node(args.stage)
    )
    res = Resources(nodes=args.nodes, gpus_per_node=gpus, tasks_per_node=args.tasks_per_node,
                    cpus_per_task=args.cpus_per_task, mem_gb=args.mem, timeout_min=args.timeout,
                    partition=args.partition, account=args.account, qos=args.qos,
                    name=args.name or f"mt-{args.stage}", signal_delay_s=args.signal_delay,
                    max_requeues=args.max_requeues)
    job = submit(spec, res, args.job_dir, "local" if args.local else "slurm")
    print(json.dumps({"job_id": job.job_id, "stage": spec.stage, "run_dir": spec.run_dir,
                      "logs": str(job.paths.folder)}))
    if args.wait:
        print(json.dumps(job.results()[0], indent=2, default=str))  # rank 0's metrics
    return 0


if __name__ == "__main__":
    sys.exit(main())
