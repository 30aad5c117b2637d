#!/usr/bin/env python
"""Robustness suites of pretrained classifiers on ImageNet-layout val.

    tools/run_robustness.py --checkpoint CKPT --imagenet DIR --suites clean,background,calibration,fgsm,pgd,ood
        [--ood DIR ...] [--out DIR] [--limit N]
    tools/run_robustness.py --checkpoint CKPT --imagenet DIR --suites clean,embedding   # + alignment / uniformity, UMAP

Suites: clean (top-1 / top-5 error), background (the val set with its background replaced or noised, and the
CAM localization of the clean images; needs box annotations, skipped with a note on data without them),
calibration (ECE), fgsm, pgd (adversarial error), ood (out-of-distribution detection against --ood folders and
synthetic noise), embedding (alignment and uniformity of the embedding, UMAP figure; only when listed).

One checkpoint writes OUT/metrics.json and OUT/figures/. Several checkpoints (comparison mode; name them
with NAME=PATH, otherwise the run folder of `.../<run>/backbone.pth` or the file stem) write
OUT/<name>/metrics.json and OUT/comparison.md + OUT/comparison.json: one table per suite, methods as rows.
`--config configs/robustness/X.yaml` supplies defaults for the options; command-line flags override it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import yaml

from mixup_transfer.core import cli
from mixup_transfer.core.checkpoint import trust_pickled
from mixup_transfer.core.config import load_config
from mixup_transfer.core.data import InputError
from mixup_transfer.core.distributed import torchrun_session
from mixup_transfer.core.lock import run_lock
from mixup_transfer.core.runtime import atomic_write_text, write_json
from transfer.robustness import SUITES, compare
from transfer.robustness.stage import DEFAULTS, run

log = logging.getLogger("robustness")


def _name(spec: str) -> tuple[str, str]:
    if "=" in spec and not Path(spec).exists():
        name, path = spec.split("=", 1)
        return name, path
    p = Path(spec)
    return (p.parent.name if p.stem == "backbone" and p.parent.name else p.stem), spec


def option_help() -> dict[str, str]:
    """Each stage option's meaning: its comment in transfer/robustness/stage.py DEFAULTS (documented once, there),
    with its default and, where the option has a fixed set, its choices."""
    import inspect
    import re

    from transfer.robustness import stage

    src = inspect.getsource(stage)
    body = src[src.index("DEFAULTS = {"):]
    comments, key = {}, None
    for line in body[:body.index("\n}\n")].splitlines()[1:]:
        m = re.match(r'\s*"(\w+)":[^#]*(?:#\s?(.*))?$', line)
        if m:
            key = m.group(1) if m.group(2) else None
            comments[m.group(1)] = (m.group(2) or "").strip()
        elif key and line.strip().startswith("#"):
            comments[key] += " " + line.strip().lstrip("#").strip()
    out = {}
    for key, default in DEFAULTS.items():
        rule = stage.RANGES.get(key, ())
        choices = f"; choices: {', '.join(str(c) for c in rule[1])}" if rule[:1] == ("in",) else ""
        shown = "null" if default is None else default if default != "" else "''"
        out[key] = f"{comments.get(key) or key.replace('_', ' ')} (default: {shown}{choices})".replace("%", "%%")
    return out


def _value(text: str):
    """A flag's value read as YAML, like a config file's ('100' -> 100, '8/255' stays a string)."""
    return yaml.safe_load(text) if text != "" else ""


@cli.entry
def main(argv=None) -> int:
    ap = cli.parser(__doc__)
    ap.add_argument("--checkpoint", nargs="+", required=True, metavar="CKPT|NAME=CKPT",
                    help="classifier checkpoint(s) to evaluate (backbone.pth of a pretraining run, or any layout "
                         "mixup_transfer.core.checkpoint reads); several: comparison mode")
    ap.add_argument("--imagenet", required=True, help="ImageNet-layout root (val/ and val_boxes/)")
    ap.add_argument("--config", help="YAML setting any of the options below (configs/robustness/)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--allow-pickle", action="store_true",
                    help="unpickle the checkpoints if they hold Python objects (it can run code: only files you "
                         "trust)")
    helps = option_help()
    for key, default in DEFAULTS.items():  # every option of the stage (transfer/robustness/stage.py)
        flag = "--" + key.replace("_", "-")
        if key == "ood":
            ap.add_argument(flag, nargs="*", default=None, metavar="PATH|NAME=PATH", help=helps[key])
        elif isinstance(default, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=helps[key])
        else:
            ap.add_argument(flag, type=_value, default=None, metavar=key.upper(), help=helps[key])
    args = ap.parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    opts = load_config(args.config, defaults=DEFAULTS) if args.config else dict(DEFAULTS)
    opts.update({k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None})
    named = [_name(s) for s in args.checkpoint]
    for _, path in named if args.allow_pickle else ():
        trust_pickled(path)
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise InputError(f"--checkpoint: duplicate method names {names}; name them with NAME=PATH")
    out = Path(opts["out"])
    results = {}
    # under torchrun each rank evaluates a shard; rank 0 writes (and holds the output folder's lock)
    with torchrun_session() as (rank, world), run_lock(out, "evaluation output"):
        log.info("robustness suites %s of %s on %s into %s (config %s): world size %d, batch %s per process, "
                 "precision %s, device %s", opts["suites"], ", ".join(names), args.imagenet, out,
                 args.config or "none", world, opts["batch_size"], opts["precision"], opts["device"])
        for name, path in named:
            run_out = out if len(named) == 1 else out / name
            # the corrupted sets do not depend on the model: export them once
            one = {**opts, "export_corrupted": None if results else opts["export_corrupted"]}
            results[name] = run(one, {"checkpoint": path, "imagenet": args.imagenet}, run_out)
            log.info("%s: %s", name, run_out / "metrics.json")
    if rank:
        return 0
    md, table = compare(results)
    if len(named) > 1:
        atomic_write_text(md, out / "comparison.md")
        write_json(table, out / "comparison.json")
        log.info("comparison: %s", out / "comparison.md")
    cli.log_outputs(out, "output folder")
    print(md)
    if len(named) == 1:
        print(json.dumps({k: v for k, v in results[names[0]].items() if k in SUITES}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
