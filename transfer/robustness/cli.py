"""The robustness stage's own command line (its declaration's `cli`, mixup_transfer/core/stage.py):
a flag for each top-level option of the stage's DEFAULTS (documented once, there), --threads, and
the comparison mode of several checkpoints. The shared keys (data.max_val, eval.batch_size,
runtime.precision, ...) are KEY=VALUE overrides, as in every stage."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import re
from pathlib import Path

import yaml

from mixup_transfer.core import cli
from mixup_transfer.core.vocabulary import RENAMED

log = logging.getLogger("robustness")


def _name(spec: str) -> tuple[str, str]:
    if "=" in spec and not Path(spec).exists():
        name, path = spec.split("=", 1)
        return name, path
    p = Path(spec)
    return (p.parent.name if p.stem == "backbone" and p.parent.name else p.stem), spec


def _comments(module) -> dict[str, str]:
    """Each top-level key's comment in `module`'s DEFAULTS table: the comment lines right above the
    key and its trailing comment, joined."""
    src = inspect.getsource(module)
    body = src[src.index("DEFAULTS = {"):]
    comments, above = {}, []
    for line in body[:body.index("\n}\n")].splitlines()[1:]:
        if line.strip().startswith("#"):
            above.append(line.strip().lstrip("#").strip())
            continue
        m = re.match(r'\s*"(\w+)":[^#]*(?:#\s?(.*))?$', line)
        if m:
            comments[m.group(1)] = " ".join([*above, (m.group(2) or "").strip()]).strip()
        above = []
    return comments


def option_help() -> dict[str, str]:
    """Each top-level stage option's meaning: its comment in transfer/robustness/stage.py DEFAULTS,
    with its default and, where the option has a fixed set, its choices."""
    from transfer.robustness import stage

    comments = _comments(stage)
    out = {}
    for key, default in stage.DEFAULTS.items():
        if isinstance(default, dict):
            continue
        rule = stage.RANGES.get(key, ())
        choices = f"; choices: {', '.join(str(c) for c in rule[1])}" if rule[:1] == ("in",) else ""
        shown = "null" if default is None else default if default != "" else "''"
        text = f"{comments.get(key) or key.replace('_', ' ')} (default: {shown}{choices})"
        out[key] = text.replace("%", "%%")
    return out


def _value(text: str):
    """A flag's value read as YAML, like a config file's ('100' -> 100, '8/255' stays a string)."""
    return yaml.safe_load(text) if text != "" else ""


def add_arguments(p, stage, sub) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    for key, text in option_help().items():  # every top-level option of the stage
        flag = "--" + key.replace("_", "-")
        if key == "ood":
            p.add_argument(flag, nargs="*", default=None, metavar="PATH|NAME=PATH", help=text)
        elif isinstance(stage.defaults()[key], bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            p.add_argument(flag, type=_value, default=None, metavar=key.upper(), help=text)
    for old in ("limit", "workers", "batch_size", "device", "precision", "tensorboard"):
        p.add_argument("--" + old.replace("_", "-"), dest=f"renamed_{old}", default=None,
                       nargs="?", const=True, help=argparse.SUPPRESS)


def _options(stage, args, p) -> dict:
    """The config file, then the flags, then the KEY=VALUE overrides (a renamed flag is
    refused)."""
    from mixup_transfer.core.config import apply_overrides, validate

    for old in ("limit", "workers", "batch_size", "device", "precision", "tensorboard"):
        if getattr(args, f"renamed_{old}") is not None:
            p.error(f"--{old.replace('_', '-')} was renamed: use {RENAMED[old][-1]}=VALUE")
    defaults = stage.defaults()
    opts = stage.load_config(args.config) if args.config else dict(defaults)
    opts.update({k: getattr(args, k) for k in option_help() if getattr(args, k) is not None})
    return validate(apply_overrides(opts, args.overrides), defaults)


def _split_checkpoints(args) -> None:
    """`--checkpoint a.pth data.max_val=2`: the override after the checkpoints belongs to the
    overrides."""
    keep = []
    for spec in args.checkpoint:
        head = spec.split("=", 1)[0]
        (args.overrides.append if "=" in spec and "." in head and not Path(spec).exists()
         else keep.append)(spec)
    args.checkpoint = keep


def command(stage, args, p) -> int:
    from mixup_transfer.core.data import InputError

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    _split_checkpoints(args)
    opts = _options(stage, args, p)
    named = [_name(s) for s in args.checkpoint]  # NAME=PATH or PATH
    if args.allow_pickle:
        from mixup_transfer.core.checkpoint import trust_pickled

        for _, path in named:
            trust_pickled(path)
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise InputError(f"--checkpoint: duplicate method names {names}; name them with NAME=PATH")
    return _evaluate(stage, opts, named, args)


def _evaluate(stage, opts: dict, named: list, args) -> int:
    from mixup_transfer.core.distributed import torchrun_session
    from mixup_transfer.core.lock import run_lock
    from mixup_transfer.core.runtime import atomic_write_text, write_json
    from transfer.robustness import SUITES, compare

    out, results = Path(opts["out"]), {}
    # under torchrun each rank evaluates a shard; rank 0 writes (and holds the output folder's
    # lock)
    with torchrun_session() as (rank, world), run_lock(out, "evaluation output"):
        log.info("robustness suites %s of %s on %s into %s (config %s): world size %d, batch %s "
                 "per process, "
                 "precision %s, device %s", opts["suites"], ", ".join(n for n, _ in named),
                 args.imagenet, out, args.config or "none", world, opts["eval"]["batch_size"],
                 opts["runtime"]["precision"], opts["runtime"]["device"])
        for name, path in named:
            run_out = out if len(named) == 1 else out / name
            # the corrupted sets do not depend on the model: export them once
            one = {**opts, "export_corrupted": None if results else opts["export_corrupted"]}
            results[name] = stage.run(one, {"checkpoint": path, "imagenet": args.imagenet},
                                      run_out)
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
        print(json.dumps({k: v for k, v in results[named[0][0]].items() if k in SUITES}, indent=1))
    return 0
