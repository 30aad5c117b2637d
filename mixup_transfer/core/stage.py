"""The stage as a declared object: what every stage of the toolkit (pretrain, detection, wsol, robustness) is.

A stage has one name, used everywhere: its package, `configs/<name>/`, `tools/run_<name>.py`, the launcher's stage
argument (`tools/submit.py <name>`) and its default run folder. Its declaration says where its config schema
(DEFAULTS with comments, types and ranges) and its entry point live, which inputs it reads beside its config, what
it writes, how many GPUs per node its jobs take by default and how it resumes. The pipeline, the launcher and the
tools read these declarations instead of naming stages one by one; each stage package declares its stage (its
`STAGE`) and `mixup_transfer/pipeline/stages.py` lists them, one line each.

Entry points and schemas are named as "module:attribute" and imported on first use, so reading the declarations
(a `--help`, the queue-side checks of a SLURM job) imports no stage and no torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mixup_transfer.core.config import ConfigError, apply_overrides, load_config, validate


def _resolve(ref: str):
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Stage:
    """One stage of the toolkit.

    name:      the stage's one name (package, configs/<name>/, tools/run_<name>.py, launcher, run folder)
    entry:     "module:function", the one entry point `run(cfg, inputs, run_dir, **options) -> metrics`
    schema:    "module:DEFAULTS", the config schema with defaults and comments (None: the entry point resolves and
               checks its own keys)
    inputs:    the files it needs beside its config, as keys of `inputs` (a backbone, an evaluation set)
    optional_inputs: the files it may read (a backbone checkpoint; None: random init)
    outputs:   what it writes in its run folder
    gpus_per_node: its SLURM jobs' default (8 for the stages that train under DDP on ImageNet or COCO; 1 for
               WSOL fine-tuning and the evaluation-only robustness stage: rank-aware, they run on N GPUs too)
    options:   the keyword options its entry point takes (resume, force)
    config_required: False where the schema's defaults alone make a valid config
    run_dir:   the default run folder of its command line: f(cfg, config path, cwd)
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
    description: str = field(default="", compare=False)

    def defaults(self) -> dict | None:
        return None if self.schema is None else _resolve(self.schema)

    def load_config(self, config: str | None, overrides: Sequence[str] = ()) -> dict:
        """The stage's config as its command line reads it: the file with the overrides, unknown keys refused."""
        if config is None:
            if self.config_required:
                raise ConfigError(f"stage {self.name} needs --config")
            defaults = self.defaults()
            return validate(apply_overrides(defaults, overrides), defaults)
        return load_config(config, overrides, defaults=self.defaults())

    def run(self, cfg: dict, inputs: dict | None, run_dir, **options) -> dict:
        """Call the entry point with the options it declares (others are dropped: e.g. detection has no force)."""
        unknown = sorted(set(options) - set(self.options) - {"resume", "force"})
        if unknown:
            raise TypeError(f"stage {self.name}: unknown options {unknown}")
        kwargs = {k: v for k, v in options.items() if k in self.options}
        return _resolve(self.entry)(cfg, inputs, run_dir, **kwargs)


def by_name(stages: Sequence[Stage], name: str) -> Stage:
    """The stage called `name`; a ConfigError listing the valid names otherwise."""
    for stage in stages:
        if stage.name == name:
            return stage
    raise ConfigError(f"unknown stage {name!r}; valid stages: {[s.name for s in stages]}")
