"""One error shape for every command-line tool in `tools/`.

A tool's `main(argv)` is wrapped once (`@cli.entry`); the library raises exceptions, the wrapper
turns them into one line on stderr and an exit code:

    error: <file>[:line]: <what is wrong>

- exit 2, bad input: `InputError` (DataError, VOCEvalError, COCOEvalError, MetadataError,
  ScoreMapError, CheckpointError, ConversionError, ...), `ConfigError`, and a missing input file
  (FileNotFoundError);
- exit 1, a failure: anything else, e.g. an OSError while writing (disk full, unwritable folder) or
  a NonFiniteLossError;
- exit 130 on Ctrl-C; argparse's own usage errors keep their exit code 2.

Every tool's console is set up here too (`setup_logging`, called by `main`): `logging` lines on
stderr, INFO on rank 0 and warnings only on the other ranks (torchrun's RANK, SLURM's
SLURM_PROCID); stdout keeps the tool's result (JSON or a table). Progress bars
(mixup_transfer.core.basics.progress) appear only when stderr is a terminal; otherwise (a file, CI,
a SLURM log) the training loop prints plain periodic lines instead.

The traceback is printed only with `--debug` (anywhere on the command line; it is removed before
the tool parses its arguments) or `MT_DEBUG=1`. Partial outputs are not left behind: every writer
goes through `mixup_transfer.core.runtime.atomic_path`, which removes its `.tmp` file when the
write fails.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

_MISSING_INPUT = (FileNotFoundError,)

# the common end of every tool's --help
EPILOG = ("common options:\n"
          "  --debug               print the traceback of a failure (anywhere on the command line;"
          " or MT_DEBUG=1)\n"
          "\n"
          "exit codes: 0 done, 1 a failure while running, 2 bad input or config"
          " (one `error:` line), 130 interrupted")


def _bad_input_types() -> tuple[type, ...]:
    from mixup_transfer.core.config import ConfigError
    from mixup_transfer.core.data import InputError

    return (InputError, ConfigError, *_MISSING_INPUT)


def exit_code(exc: BaseException) -> int:
    """2 for bad input, 130 for an interrupt, 1 for every other failure."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_BAD_INPUT if isinstance(exc, _bad_input_types()) else EXIT_FAILURE


_WORKER = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")
_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*: ")


def worker_message(msg: str) -> str | None:
    """The original message of an exception re-raised from a DataLoader worker (torch puts the
    worker's whole traceback into the message; its last unindented `module.Type: message` line is
    the original), else None."""
    if not _WORKER.match(msg):
        return None
    lines = msg.rstrip().splitlines()
    for k in range(len(lines) - 1, 1, -1):
        if _EXC_LINE.match(lines[k]):
            return "\n".join([lines[k].split(": ", 1)[1], *lines[k + 1:]])
    return None


def format_error(exc: BaseException) -> str:
    """The `error: ...` line(s) for `exc`: the culprit first, then what is wrong. An error raised
    inside a DataLoader worker reads as it would in the main process (the worker's traceback only
    with --debug)."""
    if isinstance(exc, KeyboardInterrupt):
        return "error: interrupted"
    original = worker_message(str(exc))
    if original is not None:
        if isinstance(exc, _bad_input_types()):
            return f"error: {original}"
        return f"error: {type(exc).__name__}: {original}"
    if isinstance(exc, OSError) and exc.filename is not None:
        names = f"{exc.filename} -> {exc.filename2}" if exc.filename2 else f"{exc.filename}"
        what = exc.strerror or str(exc)
        if isinstance(exc, _MISSING_INPUT):
            what = f"{what} (missing input)" if what else "missing input"
        return f"error: {names}: {what}"
    msg = str(exc).strip()
    if isinstance(exc, _bad_input_types()) and msg:
        return f"error: {msg}"
    name = type(exc).__name__
    return f"error: {name}: {msg}" if msg else f"error: {name}"


def split_debug(argv: Sequence[str] | None) -> tuple[list[str], bool]:
    """(argv without `--debug`, whether a traceback was asked for)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("MT_DEBUG") == "1"
    if "--" in args:  # keep a literal --debug after the end-of-options marker
        cut = args.index("--")
        return [a for a in args[:cut] if a != "--debug"] + args[cut:], debug
    return [a for a in args if a != "--debug"], debug


def parser(description: str | None, **kwargs) -> argparse.ArgumentParser:
    """A tool's argument parser: its module docstring as the description, the common end
    (`--debug`, exit codes) as the epilog."""
    return argparse.ArgumentParser(description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=EPILOG, **kwargs)


def parse_with_overrides(p: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """`p.parse_args(argv)` that also takes KEY=VALUE overrides anywhere on the command line, for
    parsers with sub-commands (where `parse_intermixed_args` is not available): every left-over
    KEY=VALUE token is added, in order, to `args.overrides`; any other left-over token is a usage
    error."""
    args, extra = p.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a
             or not hasattr(args, "overrides")]
    if stray:
        p.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides or []) + extra
    return args


def launch_rank() -> int:
    """This process's rank as its launcher set it (torchrun's RANK, else SLURM's SLURM_PROCID, else
    0); valid before the process group is joined and after it is left."""
    for var in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


class _ConsoleHandler(logging.StreamHandler):
    """A handler on the current sys.stderr (followed when it is swapped, e.g. by a test's capture)
    that prints above the progress bars (tqdm.write) when it is a terminal."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        try:
            tty = self.stream.isatty()
        except (AttributeError, ValueError):  # no isatty, or a closed stream
            tty = False
        if not tty:
            return super().emit(record)
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging never raises
            self.handleError(record)


def setup_logging(level: int = logging.INFO) -> None:
    """Console logging for a tool, once per call of `main`: `[mm/dd HH:MM:SS] name: message` on the
    current stderr; `level` on rank 0, warnings only on the other ranks. Replaces the handler an
    earlier call set."""
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, _ConsoleHandler)]:
        root.removeHandler(h)
    handler = _ConsoleHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(name)s: %(message)s",
                                           "%m/%d %H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level if launch_rank() == 0 else logging.WARNING)


def log_outputs(run_dir, what: str = "run folder") -> None:
    """One closing line: the run folder, its top-level files and each of its folders with its file
    count."""
    from pathlib import Path

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    files = sorted(str(p.relative_to(run_dir)) for p in run_dir.glob("*") if p.is_file())
    files += sorted(f"{d.name}/ ({sum(1 for f in d.rglob('*') if f.is_file())} files)"
                    for d in run_dir.glob("*") if d.is_dir())
    logging.getLogger("output").info("%s: %s\n  %s", what, run_dir,
                                     "\n  ".join(files) or "(empty)")


def main(fn: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run the tool function `fn(argv)` and return its exit code, printing failures as one error
    line."""
    args, debug = split_debug(argv)
    setup_logging()
    try:
        code = fn(args)
    except SystemExit:
        raise  # argparse usage errors and --help
    except BaseException as exc:  # noqa: BLE001 - the one place where every failure becomes an exit code
        if debug:
            traceback.print_exc(file=sys.stderr)
        print(format_error(exc), file=sys.stderr)
        code = exit_code(exc)
        if not debug and code == EXIT_FAILURE:
            print("(run again with --debug for the traceback)", file=sys.stderr)
        sys.stderr.flush()
        return code
    return EXIT_OK if code is None else int(code)


def entry(fn: Callable[[list[str]], int | None]) -> Callable[..., int]:
    """Decorator for a tool's `main(argv)`: `main(argv=None)` then returns the exit code (see
    `main`)."""

    @functools.wraps(fn)
    def wrapper(argv: Sequence[str] | None = None) -> int:
        return main(fn, argv)

    return wrapper


# -- a stage's tool, from its declaration (mixup_transfer/core/stage.py)
# ---------------------------------------------
def stage_parser(stage, description: str | None) -> argparse.ArgumentParser:
    """The parser of `tools/run_<stage>.py`: the declared arguments (`Stage.add_arguments`), under
    the stage's sub-command where it declares one, and whatever its `cli` module adds."""
    p = parser(description)
    target, sub = p, None
    if stage.subcommand:
        sub = p.add_subparsers(dest="cmd", required=True)
        target = sub.add_parser(stage.subcommand, help=stage.description, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    stage.add_arguments(target)
    module = stage.cli_module()
    if module is not None and hasattr(module, "add_arguments"):
        module.add_arguments(p, stage, sub)
    return p


def parse_stage_args(stage, p: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    args = parse_with_overrides(p, argv) if stage.subcommand else p.parse_intermixed_args(argv)
    if getattr(args, "retired_resume", None):
        p.error("--resume and --no-resume are not options: a run folder's run is continued by "
                "default; --force starts over")
    return args


def stage_main(stage, argv: Sequence[str] | None = None, description: str | None = None) -> int:
    """The `main` of `tools/run_<name>.py`: the command line its declaration (`stage`, a
    `mixup_transfer.core.stage.Stage`) derives, then the stage's run (or its `cli` module's
    `command`). Returns the exit code (`main`)."""
    def tool(args: list[str]) -> int | None:
        p = stage_parser(stage, description)
        parsed = parse_stage_args(stage, p, args)
        module = stage.cli_module()
        if module is not None and hasattr(module, "command"):
            return module.command(stage, parsed, p)
        return run_stage_command(stage, parsed)

    return main(tool, argv)


def stage_inputs(stage, args: argparse.Namespace) -> dict:
    """{input: path or None} from the command line ('none' means none); the checkpoints trusted
    with --allow-pickle."""
    from mixup_transfer.core.stage import INPUT_FLAGS

    inputs = {}
    for key in stage.inputs + stage.optional_inputs:
        value = getattr(args, key, None)
        inputs[key] = None if value in (None, "none", "None") else value
    if getattr(args, "allow_pickle", False):
        from mixup_transfer.core.checkpoint import trust_pickled

        for key, value in inputs.items():
            for path in ([value] if isinstance(value, str) else value or []):
                if INPUT_FLAGS[key][1]:
                    trust_pickled(path)
    return inputs


def run_stage_command(stage, args: argparse.Namespace) -> int:
    """The generic run of a stage's tool: its config (overrides, unknown and renamed keys refused),
    its run folder (locked: one writer), its inputs, then `Stage.run` under torchrun's process
    group when there is one; rank 0 prints the metrics as JSON."""
    import json
    from pathlib import Path

    from mixup_transfer.core.distributed import torchrun_session
    from mixup_transfer.core.lock import run_lock

    cfg = stage.load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir) if getattr(args, "run_dir",
                                            None) else stage.run_dir(cfg, args.config, Path.cwd())
    inputs = stage_inputs(stage, args)
    force = bool(getattr(args, "force", False))
    logging.getLogger(stage.name).info("%s with config %s into %s%s",
                                       stage.description or stage.name, args.config, run_dir,
                                       "".join(f" ({k}: {v or 'none'})"
                                               for k, v in inputs.items()))
    with torchrun_session(), run_lock(run_dir, f"{stage.name} run"):
        metrics = stage.run(cfg, inputs or None, run_dir, resume=not force, force=force)
    # the group is left: ask the launcher's environment, not torch.distributed
    if launch_rank() == 0:
        log_outputs(run_dir)
        print(json.dumps(metrics, indent=2, default=str))
    return EXIT_OK
