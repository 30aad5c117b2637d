"""Run infrastructure shared by every stage: atomic saves, seeding and RNG state, devices, AMP,
torchrun/DDP set-up, JSON-lines logging and rank-aware progress bars.

This module holds no training logic; `transfer/` and `wsol/` may use it (ARCHITECTURE.md). Its
torch-free part (atomic writes, JSON, progress bars) lives in `mixup_transfer/core/basics.py` and
is re-exported here.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mixup_transfer.core.basics import (  # noqa: F401 (re-exported)
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    progress,
    save_figure,
    write_json,
)


class NonFiniteLossError(RuntimeError):
    """Raised when a loss becomes NaN or infinite; the caller keeps its last good checkpoint."""


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save `obj` to `path` so that a reader never sees a half-written file.

    Writes `path.tmp` in the same directory, flushes it to disk, then renames it over `path`; a
    failed write removes `path.tmp` and leaves `path` as it was.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        try:
            torch.save(obj, f)
        # torch's zip writer reports a failed write (disk full...) this way
        except RuntimeError as e:
            if "inline_container" not in str(e) and "PytorchStreamWriter" not in str(e):
                raise
            raise OSError(errno.EIO, "write failed (disk full or file too large?): "
                                     f"{str(e).splitlines()[0]}",
                          str(path)) from e
        f.flush()
        os.fsync(f.fileno())


class NonFiniteOutputError(NonFiniteLossError):
    """The outputs an evaluation scores (logits, CAMs, boxes, scores) hold NaN or infinite values:
    the network is broken (diverged, or NaN weights), so no number is reported and nothing is saved
    (exit 1)."""


def count_nonfinite(x: Any) -> torch.Tensor:
    """The number of NaN / inf values in a tensor, or in every floating tensor of a (nested) dict,
    list or tuple, as a 0-d int64 tensor on the tensors' device (nothing is read back: callers add
    it up)."""
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            return torch.zeros((), dtype=torch.int64, device=x.device)
        return (~torch.isfinite(x.detach())).sum()
    items = x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple)) else ()
    counts = [count_nonfinite(v) for v in items]
    return torch.stack(counts).sum() if counts else torch.zeros((), dtype=torch.int64)


def check_outputs_finite(stage: str, split: str, counts: dict) -> None:
    """Raise NonFiniteOutputError naming the stage, the split and how many values of each output
    were not finite (`counts`: output name -> count, summed over the split, and over the ranks by
    the caller)."""
    bad = {k: int(v) for k, v in counts.items() if int(v)}
    if bad:
        what = ", ".join(f"{v} non-finite {k} value{'s' if v != 1 else ''}"
                         for k, v in bad.items())
        raise NonFiniteOutputError(f"{stage}: split {split}: the model's outputs are not finite "
                                   f"({what}); the network is broken (diverged or NaN weights), "
                                   "so nothing is scored or saved")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - the global RNG is what third-party code draws from
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every global RNG state, as plain tensors/primitives (loadable with weights_only=True)."""
    py = random.getstate()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": _numpy_state_to_plain(np.random.get_state()),  # noqa: NPY002 - global RNG on purpose
        "torch": torch.get_rng_state(),
    }
    # this process's device only: a resume may see fewer GPUs (or only its own)
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(_plain_to_numpy_state(state["numpy"]))  # noqa: NPY002 - global RNG on purpose
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        # one state per visible device, as older checkpoints hold them
        if isinstance(cuda, (list, tuple)):
            cuda = cuda[min(torch.cuda.current_device(), len(cuda) - 1)]
        torch.cuda.set_rng_state(cuda, torch.cuda.current_device())


def _numpy_state_to_plain(st) -> dict:
    name, keys, pos, has_gauss, cached = st
    return {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}


def _plain_to_numpy_state(d: dict):
    keys = d["keys"].numpy().astype(np.uint32)
    return (d["name"], keys, d["pos"], d["has_gauss"], d["cached"])


def get_device(name: str = "auto") -> torch.device:
    """'auto' picks this process's CUDA device when there is one (`local_cuda_index`), else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            index = local_cuda_index()
            # the current device: default streams, RNG state, NCCL all use it
            torch.cuda.set_device(index)
            return torch.device("cuda", index)
        return torch.device("cpu")
    return torch.device(name)


def local_cuda_index() -> int:
    """This process's GPU among the visible ones: LOCAL_RANK when the process sees one GPU per
    local rank (torchrun on a node), 0 when it sees a single GPU (SLURM with one GPU per task:
    every rank's GPU is its cuda:0)."""
    local, visible = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    if visible == 1:
        return 0
    if local >= visible:
        raise RuntimeError(
            f"LOCAL_RANK={local} but this process sees {visible} GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): "
            f"start at most {visible} processes per node, or give each process "
            "one GPU"
        )
    return local


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which SLURM, taskset and containers
    set), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS)
        return os.cpu_count() or 1


def local_world_size() -> int:
    """The processes of this run on this node (torchrun's LOCAL_WORLD_SIZE; 1 outside torchrun)."""
    return max(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), 1)


def default_workers(cap: int = 8) -> int:
    """DataLoader workers for one process: the usable CPUs shared by this node's processes, one
    left to the main process, at most `cap`."""
    return max(0, min(cap, usable_cpus() // local_world_size() - 1))


def configure_cuda(benchmark: bool) -> None:
    """cuDNN autotuning (`benchmark`: for inputs of a fixed size, as pretraining's crops; it
    re-tunes at each new shape, so variable-size detection leaves it off) and the TF32 policy,
    which is torch's default, kept on
    purpose: matmuls in full fp32 (torch.backends.cuda.matmul.allow_tf32 False), cuDNN convolutions
    in TF32 on Ampere and newer GPUs (torch.backends.cudnn.allow_tf32 True). So an "fp32" run's
    convolutions round their inputs to 10-bit mantissas there; set torch.backends.cudnn.allow_tf32
    = False where exact fp32 matters."""
    torch.backends.cudnn.benchmark = bool(benchmark)


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str = "fp32"):
    """Mixed precision on CUDA ("bf16" or "fp16"); fp32 everywhere else (CPU runs stay exact)."""
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=_DTYPES[precision])


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts to on `device_type` ("cuda", "cpu") right now, or None where it is
    off."""
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_off(device: torch.device | str):
    """A block that runs in its tensors' own dtypes even inside `autocast` (the fp32 math of a
    mixing method: under autocast a `.float()` operand of a matmul or einsum is cast back to bf16 /
    fp16)."""
    device_type = torch.device(device).type
    if device_type not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def make_grad_scaler(device: torch.device, precision: str = "fp32") -> torch.amp.GradScaler:
    """A GradScaler that is active only for CUDA fp16 (bf16 and fp32 need none). Its `step` reads
    the inf flag back to the host every step (torch's implementation): fp16 costs one device
    synchronisation per step, which is why bf16 is the default precision."""
    return torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and precision == "fp16")


def init_distributed(backend: str | None = None) -> tuple[int, int, int]:
    """Join the process group described by torchrun's environment, if any.

    Returns (rank, world_size, local_rank); (0, 1, 0) when not launched by torchrun.
    NCCL on CUDA, gloo on CPU unless `backend` says otherwise.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_cuda_index())
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return rank, world, local_rank


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


class JsonlLogger:
    """Appends one JSON object per line to `path` (rank 0 only) and flushes each line; with
    `tensorboard` (a folder) also writes every numeric field of "step" and "epoch" records as a
    scalar (needs tensorboard)."""

    def __init__(self, path: str | os.PathLike, tensorboard: str | os.PathLike | None = None):
        self.path = Path(path)
        self.enabled = is_main_process()
        self.tb, self._tb_dir, self._tb_writer = None, None, None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard is not None:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as e:
                    raise ImportError("tensorboard logging needs the tensorboard package "
                                      "(pip install tensorboard)") from e
                # the event file is opened at the first record, so a run refused before it writes
                # nothing
                self._tb_dir, self._tb_writer, self.tb = str(tensorboard), SummaryWriter, True

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, default=_json_default) + "\n")
        except OSError as e:  # disk full: name the file (a failed write() names none)
            if e.filename is not None or e.errno is None:
                raise
            raise type(e)(e.errno, e.strerror, str(self.path)) from e
        kind = record.get("event")
        if self.tb is not None and kind in ("step", "epoch"):
            if self.tb is True:
                self.tb = self._tb_writer(self._tb_dir)
            x = record["step"] if kind == "step" else record["epoch"]
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(f"{kind}/{k}", v, x)
            self.tb.flush()


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.item() if o.numel() == 1 else o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def check_finite(loss: torch.Tensor | float, step: int) -> None:
    """Stop the run on a NaN/inf loss, naming the step."""
    value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"non-finite loss ({value}) at step {step}; stopping. The last good checkpoint is "
            "kept.")


# -- collectives for losses that mix the whole global batch (pretrain.methods MultiMix
# global_batch) -------------
def _group_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns to each rank the sum over ranks of the gradients of its
    rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # every rank's loss reads every rank's rows: this rank's rows get the sum of all ranks'
        # gradients
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's x [b, ...] concatenated in rank order -> [world * b, ...] (the same b on every
    rank), with the gradient flowing back to the rank that owns the rows: x receives sum_r d loss_r
    / dx over the ranks' losses, so DDP's average of parameter gradients is the gradient of the
    mean of the ranks' losses. Without a process group (one process) it returns x itself."""
    return x if _group_size() == 1 else _GatherWithGrad.apply(x)


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's x [b, ...] concatenated in rank order, without gradient; x itself in one
    process."""
    if _group_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_group_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of x over the ranks (a new tensor, no gradient); x itself in one process."""
    if _group_size() == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x


def broadcast_from_main(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's value of x on every rank (a new tensor); x itself in one process."""
    if _group_size() == 1:
        return x
    x = x.detach().clone()
    dist.broadcast(x, 0)
    return x
