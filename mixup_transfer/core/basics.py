"""The torch-free part of the run infrastructure: atomic file writes, JSON files and rank-0
progress bars.

`mixup_transfer/core/runtime.py` re-exports all of it. Modules that must import without torch (the
stand-alone evaluators behind `tools/eval_wsol.py`, `tools/eval_voc.py`, `tools/eval_coco.py`:
importing torch costs seconds, more than scoring thousands of score maps) import it from here.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tqdm import tqdm


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield `path.<pid>.tmp` (same directory, one per process: never shared under torchrun) to
    write; on success it is renamed over `path`, on any failure (disk full, unwritable folder, an
    exception while writing) it is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:
            # a failed write() names no file: say which one (disk full, file too large, ...)
            raise type(e)(e.errno, e.strerror, str(path)) from e
        raise


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write a text file atomically (metrics.json, reports); a failed write leaves no `.tmp`
    behind."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Write a binary file atomically (a copied figure, a PNG's encoded bytes)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def save_figure(fig, path: str | os.PathLike, **kwargs) -> None:
    """`fig.savefig(path, **kwargs)` atomically: a full disk or a kill never truncates the previous
    figure (the format comes from `path`'s suffix, as savefig would take it; the `.tmp` name would
    hide it)."""
    fmt = kwargs.pop("format", None) or (Path(path).suffix[1:].lower() or "png")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, format=fmt, **kwargs)


def write_json(obj: Any, path: str | os.PathLike) -> None:
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", path)


def rank() -> int:
    """This process's rank in the initialised torch.distributed group, else 0. Never imports torch:
    a process group can only exist once something else has imported torch.distributed."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def metric_line(metrics: dict, prefix: str = "") -> str:
    """`top1_err 23.5 %  ood.auroc 91 %  epoch_time_s 12 s` from a nested dict's numeric leaves (4
    significant digits, the unit of mixup_transfer.core.units; None as null), for log lines."""
    from mixup_transfer.core.units import unit_of

    parts = []
    for k, v in metrics.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            inner = metric_line(v, f"{name}.")
            parts += [inner] if inner else []
        elif v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)):
            unit = unit_of(k) if v is not None else None
            text = "null" if v is None else format(v, ".4g")
            parts.append(f"{name} {text}{' ' + unit if unit and len(unit) < 9 else ''}")
    return "  ".join(parts)


def bars_enabled() -> bool:
    """Progress bars are drawn on rank 0 when stderr is a terminal and MT_NO_PROGRESS is not 1;
    elsewhere (a log file, CI, a SLURM log) the training loop logs plain periodic lines instead of
    carriage-return bars."""
    isatty = getattr(sys.stderr, "isatty", None)
    return rank() == 0 and os.environ.get("MT_NO_PROGRESS") != "1" and bool(isatty and isatty())


def progress(iterable: Iterable | None = None, **kwargs) -> tqdm:
    """tqdm where `bars_enabled()`, else a silent pass-through."""
    disable = not bars_enabled()
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, disable=disable, **kwargs)
