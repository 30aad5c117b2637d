"""The stage as a declared object: what every stage of the toolkit (pretrain, detection, wsol,
robustness) is.

A stage has one name, used everywhere: its package, `configs/<name>/`, `tools/run_<name>.py`, the
launcher's stage argument (`tools/submit.py <name>`) and its default run folder. Its declaration
says where its config schema (DEFAULTS with comments, types and ranges) and its entry point live,
which inputs it reads beside its config, what it writes, how many GPUs per node its jobs take by
default and how it resumes. The pipeline, the launcher and the tools read these declarations
instead of naming stages one by one; each stage package declares its stage (its `STAGE`) and
`mixup_transfer/pipeline/stages.py` lists them, one line each.

Entry points and schemas are named as "module:attribute" and imported on first use, so reading the
declarations (a `--help`, the queue-side checks of a SLURM job) imports no stage and no torch.

Its command line is derived from the declaration (`Stage.add_arguments`,
`mixup_transfer.core.cli.stage_main`): the same flags in `tools/run_<name>.py` and in the launcher
(`tools/submit.py <name>`):

    --config FILE         the stage's YAML (optional where config_required is False)
    --<input> PATH        each input (required) and optional input (`INPUT_FLAGS`)
    --run-dir DIR         the run folder (default: `run_dir`); robustness names it with its
                          `out` key
    --force               start over in a run folder that holds a run (a rerun of the same
                          command otherwise continues it: resume is the default; a changed
                          config is refused, not mixed in)
    --allow-pickle        unpickle the checkpoints given as inputs (only files you trust)
    KEY=VALUE ...         config overrides with dotted keys, anywhere on the command line

A stage with more to say on its command line names a `cli` module: its `add_arguments(parser,
stage, subparsers)` adds flags (and sub-commands), its `command(stage, args)` replaces the generic
run.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mixup_transfer.core.config import ConfigError, apply_overrides, load_config, validate

# the inputs a stage may read beside its config: its command line's --<name> flag and that flag's
# help; the ones marked True are checkpoints (--allow-pickle applies to them)
INPUT_FLAGS = {
    "weights": ("backbone checkpoint (omit, or 'none': a randomly initialised backbone)", True),
    "checkpoint": ("the classifier checkpoint to evaluate (a pretraining run's backbone.pth)",
                   True),
    "imagenet": ("ImageNet-layout root (val/, and val_boxes/ for the background suite)", False),
    "teacher": ("the frozen teacher classifier of a method that reads one (supermix; tokenmix "
                "with activation labels), or the config's teacher key", True),
}

FORCE_HELP = ("start over in a run folder that holds a run (without it, running the same "
              "command again continues the run; a changed config is refused)")


def _resolve(ref: str):
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Stage:
    """One stage of the toolkit.

    name:      the stage's one name (package, configs/<name>/, tools/run_<name>.py, launcher,
               run folder)
    entry:     "module:function", the one entry point
               `run(cfg, inputs, run_dir, **options) -> metrics`
    schema:    "module:DEFAULTS", the config schema with defaults and comments (None: the entry
               point resolves and checks its own keys)
    inputs:    the files it needs beside its config, as keys of `inputs` (a backbone, an
               evaluation set)
    optional_inputs: the files it may read (a backbone checkpoint; None: random init)
    outputs:   what it writes in its run folder
    gpus_per_node: its SLURM jobs' default (8 for the stages that train under DDP on ImageNet or
               COCO; 1 for WSOL fine-tuning and the evaluation-only robustness stage:
               rank-aware, they run on N GPUs too)
    options:   the keyword options its entry point takes (resume, force); a stage without them
               only evaluates
    config_required: False where the schema's defaults alone make a valid config
    run_dir:   the default run folder of its command line: f(cfg, config path, cwd)
    run_dir_flag: False where a config key names the run folder (robustness: `out`), so there is
               no --run-dir
    multi_inputs: the inputs that take several paths on its command line (robustness: several
               checkpoints)
    cli:       a module with the stage's own command-line flags and command (see the module
               docstring)
    subcommand: the sub-command of its tool that the declared arguments belong to (wsol:
               finetune)
    """

    name: str
    entry: str
    schema: str | None
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    gpus_per_node: int
    run_dir: Callable[[dict, str | None, Path], Path]
    optional_inputs: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    config_required: bool = True
    run_dir_flag: bool = True
    multi_inputs: tuple[str, ...] = ()
    cli: str | None = None
    subcommand: str | None = None
    description: str = field(default="", compare=False)

    def defaults(self) -> dict | None:
        return None if self.schema is None else _resolve(self.schema)

    def load_config(self, config: str | None, overrides: Sequence[str] = ()) -> dict:
        """The stage's config as its command line reads it: the file with the overrides, unknown
        keys refused."""
        if config is None:
            if self.config_required:
                raise ConfigError(f"stage {self.name} needs --config")
            defaults = self.defaults()
            return validate(apply_overrides(defaults, overrides), defaults)
        return load_config(config, overrides, defaults=self.defaults())

    def cli_module(self):
        return None if self.cli is None else importlib.import_module(self.cli)

    def add_arguments(self, p) -> None:
        """The declaration's command-line arguments (see the module docstring) on the argparse
        parser `p`."""
        add_stage_arguments(p, [self])

    def run(self, cfg: dict, inputs: dict | None, run_dir, **options) -> dict:
        """Call the entry point with the options it declares (others are dropped: e.g. detection
        has no force)."""
        unknown = sorted(set(options) - set(self.options) - {"resume", "force"})
        if unknown:
            raise TypeError(f"stage {self.name}: unknown options {unknown}")
        kwargs = {k: v for k, v in options.items() if k in self.options}
        return _resolve(self.entry)(cfg, inputs, run_dir, **kwargs)


def add_stage_arguments(p, stages: Sequence[Stage]) -> None:
    """The declared arguments of `stages` on the argparse parser `p`: one stage's tool, or the
    launcher (every
    stage: each input flag once, required by none; the launcher checks them per stage)."""
    one = stages[0] if len(stages) == 1 else None
    p.add_argument("--config", default=None, required=bool(one and one.config_required),
                   help="the stage's YAML (configs/<stage>/*.yaml)"
                   + ("" if one and one.config_required else
                                                                       "; optional where its "
                                                                       "defaults suffice"))
    for name, (text, _) in INPUT_FLAGS.items():
        users = [s.name for s in stages if name in s.inputs + s.optional_inputs]
        if not users:
            continue
        multi = bool(one and name in one.multi_inputs)
        p.add_argument(f"--{name}", default=None, required=bool(one and name in one.inputs),
                       nargs="+" if multi else None, metavar="PATH",
                       help=text + ("" if one else f" ({' and '.join(users)})")
                       + ("; several: one run each" if
                                                                                    multi else ""))
    if any(s.run_dir_flag for s in stages):
        p.add_argument("--run-dir", default=None,
                       help="output folder (default: runs/..., as each stage declares)")
    if any("force" in s.options for s in stages):
        p.add_argument("--force", action="store_true", help=FORCE_HELP)
        # refused with the rule (mixup_transfer.core.cli.parse_stage_args): continuing is the
        # default
        p.add_argument("--resume", "--no-resume", dest="retired_resume", action="store_const",
                       const=True, default=None, help=argparse.SUPPRESS)
    if any(INPUT_FLAGS[i][1] for s in stages for i in s.inputs + s.optional_inputs):
        p.add_argument("--allow-pickle", action="store_true",
                       help="unpickle the checkpoints given as inputs if they hold Python "
                            "objects (it can run code: only files you trust)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides with dotted keys, anywhere on the command line (e.g. "
                        "optim.lr=0.05); an unknown or renamed key is an error")


def by_name(stages: Sequence[Stage], name: str) -> Stage:
    """The stage called `name`; a ConfigError listing the valid names otherwise."""
    for stage in stages:
        if stage.name == name:
            return stage
    raise ConfigError(f"unknown stage {name!r}; valid stages: {[s.name for s in stages]}")
