"""One sharded inference pass over a dataset, in the spirit of detectron2's
``inference_on_dataset``: every evaluation of the toolkit (detection, WSOL, robustness) runs its
model through :func:`inference_on_dataset`.

Each rank takes its shard of whole batches (``distributed.shard_indices``; every batch is a batch
of the single-process run), rank 0's buffers are broadcast once (after DDP training each rank holds
its own BatchNorm statistics), the model runs in eval mode under ``no_grad`` and the precision's
autocast, and a per-batch callable turns the outputs into host records, one per image. The records
are gathered in dataset order, so a metric computed from them is the one a single process computes,
bit for bit.

    # batch: the loader's (host) batch; indices: dataset indices
    def to_records(batch, outputs, indices):
        # one device -> host copy per batch
        pred, conf = to_host([outputs.argmax(1), outputs.amax(1)])
        return [(int(p), float(c)) for p, c in zip(pred, conf)]

    res = inference_on_dataset(model, dataset, lambda m, b: m(b[0]), to_records,
                               batch_size=64, device=device)
    res.records      # [record of index 0, 1, ..., n - 1], on every rank
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from mixup_transfer.core import distributed as ddist
from mixup_transfer.core.runtime import autocast, progress


@dataclass
class Inference:
    """The gathered result: ``records`` in dataset order (None on the ranks that were not sent
    them), ``seconds`` in the model (the slowest rank's; measured only when ``timed``), ``count``
    images over all ranks."""

    records: list | None
    seconds: float
    count: int


def to_device(obj: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Every tensor of a (nested) list, tuple or dict on ``device`` (non-blocking); with
    ``channels_last`` the rank-4 ones (image batches) in that memory format. Per-image [3, h, w]
    tensors keep theirs (it needs rank 4)."""
    if isinstance(obj, torch.Tensor):
        obj = obj.to(device, non_blocking=True)
        return (
            obj.contiguous(memory_format=torch.channels_last)
            if channels_last and obj.dim() == 4
            else obj
        )
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(o, device, channels_last) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device, channels_last) for k, v in obj.items()}
    return obj


def to_host(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` (any shapes; bool, integer or floating) copied to the CPU in ONE transfer, each
    with its shape and dtype. They travel as float64, which holds every float32 / bf16 / fp16 value
    and every integer up to 2**53 exactly: the copies equal ``t.cpu()`` bit for bit."""
    if not tensors:
        return []
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors]).cpu()
    out, start = [], 0
    for t in tensors:
        out.append(flat[start:start + t.numel()].to(t.dtype).reshape(t.shape))
        start += t.numel()
    return out


def _forward(model, inputs, forward, device, precision: str, channels_last: bool, timed: bool):
    """(outputs, seconds in the model: 0 unless ``timed``, which waits for CUDA before and
    after)."""
    inputs = to_device(inputs, device, channels_last)
    if timed and device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with autocast(device, precision):
        outputs = forward(model, inputs)
    if timed and device.type == "cuda":
        torch.cuda.synchronize(device)
    return outputs, (time.perf_counter() - t0) if timed else 0.0


def _gather(records: list, mine: list[int], n: int, dst: int | None) -> list | None:
    """This rank's records (``mine``'s order) -> every rank's, in dataset order, on every rank
    (``dst`` None) or on rank ``dst`` only (None elsewhere)."""
    rank, world = ddist.rank_world()
    if world == 1:
        return ddist.order_by_index([(mine, records)], n)
    if dst is None:
        return ddist.gather_ordered(records, mine, n)
    parts = [None] * world if rank == dst else None
    torch.distributed.gather_object((mine, records), parts, dst=dst)
    return ddist.order_by_index(parts, n) if rank == dst else None


@torch.no_grad()
def inference_on_dataset(model, dataset, forward: Callable, to_records: Callable, *,
                         batch_size: int, device: torch.device, workers: int = 0, collate_fn=None,
                         precision: str = "fp32", channels_last: bool = False,
                         pin_memory: bool = False, timed: bool = False, dst: int | None = None,
                         select: Callable | None = None, desc: str = "inference") -> Inference:
    """Run ``model`` over this rank's shard of ``dataset`` and gather the records in dataset order.

    forward(model, inputs) -> outputs: ``inputs`` is ``select(batch)`` (default: the whole batch;
    the part the model reads) moved to ``device`` (`to_device`, rank-4 tensors channels_last when
    asked), called under autocast(``precision``); ``model`` is put in eval mode. to_records(batch,
    outputs, indices) -> list: one host record per image of the host ``batch`` (``indices``: their
    dataset indices), read back in one transfer (`to_host`). ``dst`` None gathers to every rank, an
    int to that rank only. Collective: every rank calls it (an empty shard included)."""
    n = len(dataset)
    mine = ddist.shard_indices(n, block=batch_size)
    loader = DataLoader(Subset(dataset, mine), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=collate_fn, pin_memory=pin_memory)
    # rank 0's BatchNorm statistics: every shard is scored with one model
    ddist.broadcast_buffers(model)
    model.eval()
    records, seconds, start = [], 0.0, 0
    for batch in progress(loader, desc=desc):
        inputs = batch if select is None else select(batch)
        outputs, dt = _forward(model, inputs, forward, device, precision, channels_last, timed)
        seconds += dt
        size = len(batch[0])
        got = to_records(batch, outputs, mine[start:start + size])
        if len(got) != size:
            raise ValueError(f"to_records gave {len(got)} records for a batch of {size}")
        records += got
        start += size
    timing = ddist.all_gather_objects((seconds, len(records)))
    return Inference(_gather(records, mine, n, dst), max(t[0] for t in timing),
                     sum(t[1] for t in timing))
