#!/usr/bin/env python
"""WSOL on CUB: metadata conversion, CAM fine-tuning and evaluation.

    python tools/run_wsol.py metadata --cub data/CUB_200_2011 --out data/wsol_metadata/CUB
    python tools/run_wsol.py finetune --config configs/wsol/cub_alignmix.yaml --weights CKPT [--run-dir DIR]
        [KEY=VALUE ...]
    python tools/run_wsol.py evaluate --config CFG --model RUN/cam_model.pth --scoremaps DIR [KEY=VALUE ...]
    python tools/run_wsol.py baseline --metadata data/wsol_metadata/CUB/test [--size 224] [--fraction 0.5]
"""

import argparse
import json
import logging
import sys
from pathlib import Path

from mixup_transfer.core import cli

log = logging.getLogger("wsol")


def _parser():
    p = cli.parser(__doc__)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{metadata,finetune,evaluate,baseline}")
    common = dict(epilog=cli.EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)  # --debug, exit codes
    m = sub.add_parser("metadata", help="CUB_200_2011 raw files -> wsolevaluation metadata (train/, test/)", **common)
    m.add_argument("--cub", required=True, help="the CUB_200_2011 folder (images.txt, bounding_boxes.txt, ...)")
    m.add_argument("--out", required=True, help="output folder: OUT/train and OUT/test metadata")
    f = sub.add_parser("finetune", help="fine-tune a CAM model and evaluate it", **common)
    f.add_argument("--config", required=True, help="WSOL YAML (configs/wsol/*.yaml)")
    f.add_argument("--weights", default=None, help="backbone checkpoint (omit: random init)")
    f.add_argument("--run-dir", default=None, help="output folder (default runs/<name>)")
    f.add_argument("--no-resume", action="store_true", help="do not continue an existing checkpoint")
    f.add_argument("--force", action="store_true", help="start over in a run folder that holds a checkpoint")
    e = sub.add_parser("evaluate", help="evaluate a fine-tuned CAM model, saving <scoremaps>/<image_id>.npy", **common)
    e.add_argument("--config", required=True, help="the WSOL YAML the model was fine-tuned with")
    e.add_argument("--model", required=True, help="run_dir/cam_model.pth")
    e.add_argument("--scoremaps", default=None, help="also save the score maps in this folder")
    e.add_argument("--out", default=None, help="write the metrics JSON here too")
    f.add_argument("--allow-pickle", action="store_true",
                   help="unpickle --weights if it holds Python objects (it can run code: only files you trust)")
    e.add_argument("--allow-pickle", action="store_true",
                   help="unpickle --model if it holds Python objects (it can run code: only files you trust)")
    for s in (f, e):
        s.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="config overrides with dotted keys, anywhere on the command line; an unknown key is "
                            "an error")
    b = sub.add_parser("baseline", help="the centred-box baseline on a metadata split", **common)
    b.add_argument("--metadata", required=True, help="metadata folder of one split (e.g. .../CUB/test)")
    b.add_argument("--size", type=int, default=224, help="image side the boxes are scored at (default 224)")
    b.add_argument("--fraction", type=float, default=0.5, help="box side fraction; <= 0 picks the best")
    return p


@cli.entry
def main(argv=None) -> int:
    args = cli.parse_with_overrides(_parser(), argv)

    if args.cmd == "metadata":
        from wsol.data import cub_to_wsol_metadata
        out = cub_to_wsol_metadata(args.cub, args.out)
        print(json.dumps({k: str(v) for k, v in out.items()}))
        return 0
    if args.cmd == "baseline":
        from wsol.evaluate import centred_box_baseline
        frac = args.fraction if args.fraction > 0 else None
        print(json.dumps(centred_box_baseline(args.metadata, (args.size, args.size), frac), indent=2))
        return 0
    from mixup_transfer.core.checkpoint import trust_pickled
    from mixup_transfer.core.config import load_config
    from mixup_transfer.core.distributed import torchrun_session
    from mixup_transfer.core.lock import run_lock
    trusted = getattr(args, "weights", None) if args.cmd == "finetune" else args.model
    if args.allow_pickle and trusted:
        trust_pickled(trusted)
    cfg = load_config(args.config, args.overrides)
    run_dir = args.run_dir or str(Path("runs") / cfg.get("name", "wsol")) if args.cmd == "finetune" else None
    # one writer per run folder (finetune) or score-map folder (evaluate)
    lock = run_lock(run_dir, "WSOL run") if run_dir else run_lock(args.scoremaps, "score map")
    with torchrun_session() as (rank, _), lock:  # under torchrun: DDP fine-tuning, sharded evaluation, rank 0 writes
        if args.cmd == "finetune":
            from wsol.finetune import finetune
            log.info("WSOL fine-tuning with config %s into %s (backbone: %s)", args.config, run_dir,
                     args.weights or "random init")
            metrics = finetune(cfg, args.weights, run_dir, resume=not args.no_resume, force=args.force)
        else:
            from wsol.finetune import evaluate_run
            log.info("evaluating %s with config %s", args.model, args.config)
            metrics = evaluate_run(cfg, args.model, args.scoremaps, args.out)
    if rank == 0:
        if args.cmd == "finetune":
            cli.log_outputs(run_dir)
        print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
