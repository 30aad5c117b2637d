"""The config vocabulary every stage shares: each shared key declared once, with its meaning and
its default.

A stage's schema (its DEFAULTS) composes the fragments it uses with `fragment(TABLE, key, ...,
key=stage_default)`: the key is spelled and means the same in every stage, and a stage may only
change its default (the learning rate of a detection recipe is not a pretraining one's). The stage
adds its own keys beside them (`optim.max_iter` of detection, `optim.freeze` of WSOL).

Fragments:

- `optim`: the optimizer and its schedule. Batch sizes are counted in images per optimizer step:
  `batch_size` over all processes (GLOBAL), `batch_per_process` in each one (the global batch is
  then that times the world size). A stage declares the one(s) it takes; pretraining takes either.
- `data`: where the images come from and how they are loaded. `max_train` / `max_val` cap the
  images (null: all).
- `runtime`: how a run executes (device, precision, threads, logging); never what it computes.
- `eval`: evaluation during or after training.
- `method`: the mixing method, `{name: <pretrain.methods.METHODS key>, <its knobs>...}`, in
  pretraining and in WSOL fine-tuning alike.

Other spellings of a shared key (`solver.lr`, `data.workers`, ...: `RENAMED`) are refused by
`mixup_transfer.core.config` with the key to use, never silently accepted.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Key:
    default: object
    meaning: str


OPTIM = {
    "epochs": Key(300, "training epochs"),
    "batch_size": Key(256, "GLOBAL batch: images per optimizer step over all processes"),
    "batch_per_process": Key(None, "images per optimizer step in each process (global batch = "
                                   "this x world size)"),
    "lr": Key(0.1, "peak learning rate (multiplied by the schedule's factor)"),
    "lr_classifier": Key(None, "learning rate of the classifier layers (fc); null = lr"),
    "momentum": Key(0.9, "SGD momentum"),
    "nesterov": Key(True, "Nesterov momentum (SGD)"),
    "weight_decay": Key(1.0e-4, "L2 weight decay"),
    "schedule": Key("step", "learning-rate schedule: step | cosine | piecewise | constant "
                            "(those the stage has)"),
    "gamma": Key(0.1, "step schedule: lr *= gamma at each drop"),
}

DATA = {
    "root": Key(None, "the dataset folder (its layout is the stage's)"),
    "num_workers": Key(None, "DataLoader worker processes per process"),
    "max_train": Key(None, "use at most this many train images (null: all; quick runs). "
                           "Pretraining takes an evenly spaced subset, detection and WSOL the "
                           "first N"),
    "max_val": Key(None, "use at most this many evaluation images (null: all). Pretraining and "
                         "robustness take an evenly spaced subset (robustness: also at most N "
                         "per OOD folder), detection and WSOL the first N"),
}

RUNTIME = {
    "device": Key("auto", "auto | cpu | cuda | cuda:N"),
    "precision": Key("fp32", "fp32 | bf16 | fp16 (CUDA autocast; CPU runs fp32)"),
    "channels_last": Key(True, "channels-last memory format (CUDA only)"),
    "num_threads": Key(None, "torch.set_num_threads for this process (null: torch's default)"),
    "log_every_steps": Key(20, "optimizer steps between log lines"),
    "tensorboard": Key("auto", "auto | true | false: also write RUN/tensorboard (auto: when the "
                               "tensorboard package is installed)"),
}

EVAL = {
    "batch_size": Key(32, "images per evaluation forward pass, in each process"),
    "every_epochs": Key(0, "evaluate every N epochs (0: only at the end)"),
}

METHOD = {
    "name": Key("none", "the mixing method (pretrain.methods.METHODS; none: plain cross-entropy "
                        "where a stage allows it); the method's knobs sit beside name"),
}

FRAGMENTS = {"optim": OPTIM, "data": DATA, "runtime": RUNTIME, "eval": EVAL, "method": METHOD}


def fragment(table: dict[str, Key], *keys: str, **defaults) -> dict:
    """{key: default} for `keys` of a vocabulary table, in that order; `defaults` are the stage's
    own defaults (only for keys it takes). An unknown key is a programming error (KeyError naming
    it)."""
    stray = sorted(set(defaults) - set(keys))
    if stray:
        raise KeyError(f"defaults for keys not taken: {stray}")
    return {k: defaults[k] if k in defaults else table[k].default for k in keys}


def meaning(dotted: str) -> str | None:
    """The vocabulary's meaning of `fragment.key` (e.g. `optim.lr`); None for a stage's own key."""
    frag, _, key = dotted.partition(".")
    entry = FRAGMENTS.get(frag, {}).get(key)
    return entry.meaning if entry else None


# other spellings of the shared keys -> the key(s) to use (dotted, from the config's top level);
# where one spelling has two successors, the stage's schema picks the one it declares
RENAMED = {
    # detection
    "solver": ("optim",),
    "solver.lr": ("optim.lr",), "solver.epochs": ("optim.epochs",),
    "solver.batch_size": ("optim.batch_per_process",), "solver.momentum": ("optim.momentum",),
    "solver.weight_decay": ("optim.weight_decay",), "solver.gamma": ("optim.gamma",),
    "solver.max_iter": ("optim.max_iter",), "solver.warmup_iters": ("optim.warmup_iters",),
    "solver.warmup_factor": ("optim.warmup_factor",), "solver.steps": ("optim.steps",),
    "solver.clip_grad_norm": ("optim.clip_grad_norm",),
    "solver.reference_batch": ("optim.reference_batch",),
    "data.max_train_images": ("data.max_train",), "data.max_test_images": ("data.max_val",),
    "data.workers": ("data.num_workers",), "runtime.log_period": ("runtime.log_every_steps",),
    "eval.period": ("eval.every_epochs",),
    # WSOL
    "epochs": ("optim.epochs",), "batch_size": ("optim.batch_per_process", "eval.batch_size"),
    "log_every": ("runtime.log_every_steps",), "arch": ("model.arch",), "mixing": ("method",),
    "data.limit_train": ("data.max_train",), "data.limit_test": ("data.max_val",),
    "eval.every": ("eval.every_epochs",),
    # robustness
    "limit": ("data.max_val",), "workers": ("data.num_workers",), "device": ("runtime.device",),
    "precision": ("runtime.precision",), "tensorboard": ("runtime.tensorboard",),
}


def _declared(schema: dict, dotted: str) -> bool:
    node = schema
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def rename_of(dotted: str, schema: dict) -> str | None:
    """The key to use instead of `dotted` (a key `schema` does not declare), or None when it was
    never renamed."""
    if dotted not in RENAMED or _declared(schema, dotted):
        return None
    options = RENAMED[dotted]
    return next((new for new in options if _declared(schema, new)), options[0])


def renamed_keys(cfg: dict, schema: dict) -> list[tuple[str, str]]:
    """[(renamed dotted key, the key to use)] for every key of `cfg` that `schema` does not declare
    and RENAMED lists (a mapping the schema leaves free-form, like pretraining's `method`, is not
    searched)."""
    found = []

    def walk(node: dict, prefix: str, declared) -> None:
        for k, v in node.items():
            dotted = f"{prefix}{k}"
            new = rename_of(dotted, schema)
            # a renamed mapping (solver): name its renamed keys (solver.lr), else itself
            if new is not None:
                inner = [(f"{dotted}.{c}", RENAMED[f"{dotted}.{c}"][0])
                         for c in (v if isinstance(v, dict) else ())
                         if f"{dotted}.{c}" in RENAMED]
                found.extend(inner or [(dotted, new)])
            elif isinstance(v, dict) and isinstance(declared, dict) and declared.get(k):
                walk(v, f"{dotted}.", declared[k])

    walk(cfg, "", schema)
    return found


def renamed_message(found: list[tuple[str, str]], where: str = "") -> str:
    """`solver.lr was renamed: use optim.lr` (one clause per key), prefixed with `where` (a
    file)."""
    text = "; ".join(f"{old} was renamed: use {new}" for old, new in found)
    return f"{where}: {text}" if where else text
