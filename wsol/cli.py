"""The WSOL stage's own command line (its declaration's `cli`, mixup_transfer/core/stage.py):
`tools/run_wsol.py finetune` takes the declared arguments; `metadata`, `evaluate` and `baseline`
are added here."""

from __future__ import annotations

import argparse
import json
import logging

from mixup_transfer.core import cli

log = logging.getLogger("wsol")


def add_arguments(p, stage, sub) -> None:
    # --debug, exit codes
    common = dict(epilog=cli.EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.metavar = "{metadata,finetune,evaluate,baseline}"
    m = sub.add_parser("metadata", help="CUB_200_2011 raw files -> wsolevaluation metadata "
                                        "(train/, test/)", **common)
    m.add_argument("--cub", required=True, help="the CUB_200_2011 folder (images.txt, "
                                                "bounding_boxes.txt, ...)")
    m.add_argument("--out", required=True, help="output folder: OUT/train and OUT/test metadata")
    e = sub.add_parser("evaluate", help="evaluate a fine-tuned CAM model, saving "
                                        "<scoremaps>/<image_id>.npy", **common)
    e.add_argument("--config", required=True, help="the WSOL YAML the model was fine-tuned with")
    e.add_argument("--model", required=True, help="run_dir/cam_model.pth")
    e.add_argument("--scoremaps", default=None, help="also save the score maps in this folder")
    e.add_argument("--out", default=None, help="write the metrics JSON here too")
    e.add_argument("--allow-pickle", action="store_true",
                   help="unpickle --model if it holds Python objects (it can run code: only "
                        "files you trust)")
    e.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides with dotted keys, anywhere on the command line; an "
                        "unknown key is an error")
    b = sub.add_parser("baseline", help="the centred-box baseline on a metadata split", **common)
    b.add_argument("--metadata", required=True,
                   help="metadata folder of one split (e.g. .../CUB/test)")
    b.add_argument("--size", type=int, default=224,
                   help="image side the boxes are scored at (default 224)")
    b.add_argument("--fraction", type=float, default=0.5,
                   help="box side fraction; <= 0 picks the best")


def command(stage, args, p) -> int:
    if args.cmd == "finetune":
        return cli.run_stage_command(stage, args)
    if args.cmd == "metadata":
        from wsol.data import cub_to_wsol_metadata

        out = cub_to_wsol_metadata(args.cub, args.out)
        print(json.dumps({k: str(v) for k, v in out.items()}))
        return 0
    if args.cmd == "baseline":
        from wsol.evaluate import centred_box_baseline

        frac = args.fraction if args.fraction > 0 else None
        print(json.dumps(centred_box_baseline(args.metadata, (args.size, args.size), frac),
                         indent=2))
        return 0
    return _evaluate(stage, args)


def _evaluate(stage, args) -> int:
    from mixup_transfer.core.checkpoint import trust_pickled
    from mixup_transfer.core.distributed import torchrun_session
    from mixup_transfer.core.lock import run_lock
    from wsol.finetune import evaluate_run

    if args.allow_pickle:
        trust_pickled(args.model)
    cfg = stage.load_config(args.config, args.overrides)
    # under torchrun: sharded evaluation, rank 0 writes (and holds the score-map folder's lock)
    with torchrun_session() as (rank, _), run_lock(args.scoremaps, "score map"):
        log.info("evaluating %s with config %s", args.model, args.config)
        metrics = evaluate_run(cfg, args.model, args.scoremaps, args.out)
    if rank == 0:
        print(json.dumps(metrics, indent=2))
    return 0
