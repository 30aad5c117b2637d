"""Sharded evaluation: each rank evaluates a disjoint, deterministic part of a dataset and the
results are gathered back in dataset order, so that a metric computed from them is the one a single
process computes.

Shards are made of whole blocks of ``block`` consecutive indices (the evaluation batch size), dealt
round-robin: block ``b`` (indices ``b*block .. b*block+block-1``) goes to rank ``b % world``. Every
batch a rank forms is then exactly a batch of the single-process run (same images, same batch
index), so batch-dependent numerics (padding of R-CNN batches, BLAS blocking) and per-batch random
draws (PGD starts seeded by batch index) are unchanged. No index is padded or repeated: 7 items
over 2 ranks with block 1 are [0, 2, 4, 6] and [1, 3, 5].

    rank, world = rank_world()
    # this rank's dataset indices
    mine = shard_indices(len(ds), block=batch_size)
    outputs = [...one result per index in `mine`...]
    # on every rank: the results of 0 .. n-1, in order
    everything = gather_ordered(outputs, mine, len(ds))
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch.distributed as dist


@contextlib.contextmanager
def torchrun_session(backend: str | None = None):
    """Join torchrun's process group for the block (a no-op outside torchrun) and leave it
    afterwards; yields (rank, world size). What the command-line entry points wrap their one call
    in."""
    from mixup_transfer.core.runtime import cleanup_distributed, init_distributed

    rank, world, _ = init_distributed(backend)
    try:
        yield rank, world
    finally:
        cleanup_distributed()


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _rank_world(rank: int | None, world: int | None) -> tuple[int, int]:
    r, w = rank_world()
    rank, world = (r if rank is None else rank), (w if world is None else world)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world} process(es)")
    return rank, world


def shard_blocks(n: int, block: int = 1, rank: int | None = None,
                 world: int | None = None) -> list[int]:
    """The block numbers (batch indices of the single-process run) of ``range(n)`` that ``rank``
    evaluates."""
    if n < 0 or block < 1:
        raise ValueError(f"shard_blocks needs n >= 0 and block >= 1, got n={n}, block={block}")
    rank, world = _rank_world(rank, world)
    return list(range(rank, -(-n // block), world))


def shard_indices(n: int, block: int = 1, rank: int | None = None,
                  world: int | None = None) -> list[int]:
    """The dataset indices of ``range(n)`` that ``rank`` (default: this process) evaluates, in
    increasing order: whole blocks of ``block`` consecutive indices dealt round-robin. The shards
    of all ranks are disjoint and together cover ``range(n)`` exactly (uneven sizes differ by at
    most one block)."""
    return [i for b in shard_blocks(n, block, rank, world)
            for i in range(b * block, min(n, (b + 1) * block))]


def all_gather_objects(obj: Any) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without a process
    group)."""
    _, world = rank_world()
    if world == 1:
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


def order_by_index(parts: Sequence[tuple[Sequence[int], Sequence[Any]]], n: int) -> list:
    """Merge ``(indices, items)`` pairs into one list ordered by index; every index of ``range(n)``
    must occur exactly once (a missing or repeated index is an error, never a silently wrong
    metric)."""
    out: list = [None] * n
    seen = np.zeros(n, dtype=bool)
    for indices, items in parts:
        if len(indices) != len(items):
            raise ValueError(f"{len(indices)} indices for {len(items)} results")
        for i, item in zip(indices, items):
            if not 0 <= int(i) < n or seen[int(i)]:
                raise ValueError(f"index {i} is out of range(0, {n}) or gathered twice")
            seen[int(i)] = True
            out[int(i)] = item
    if not seen.all():
        raise ValueError(f"{int((~seen).sum())} of {n} indices were not gathered (first: "
                         f"{int(np.argmin(seen))})")
    return out


def gather_ordered(items: Sequence[Any], indices: Sequence[int], n: int) -> list:
    """Every rank's ``items`` (``items[k]`` the result of dataset index ``indices[k]``) gathered to
    every rank and ordered by index: the list of results of ``0 .. n-1``, the same on every
    rank."""
    return order_by_index(all_gather_objects((list(indices), list(items))), n)


def gather_arrays(arrays: dict[str, np.ndarray], indices: Sequence[int],
                  n: int) -> dict[str, np.ndarray]:
    """Per-item numpy arrays (first axis = this rank's ``indices``) gathered to every rank and
    ordered by index: each ``[n, ...]``, with its dtype kept."""
    indices = np.asarray(list(indices), dtype=np.int64)
    for k, a in arrays.items():
        if len(a) != len(indices):
            raise ValueError(f"array {k!r} has {len(a)} rows for {len(indices)} indices")
    parts = all_gather_objects((indices, {k: np.asarray(a) for k, a in arrays.items()}))
    every = np.concatenate([p[0] for p in parts])
    order_by_index([(every, every)], n)  # every index exactly once
    out = {}
    for k in arrays:
        merged = np.concatenate([p[1][k] for p in parts])
        out[k] = np.empty_like(merged)
        out[k][every] = merged
    return out


def broadcast_buffers(module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) copied into ``module`` on every rank, in
    place. After DDP training each rank keeps the statistics of its own last batches (DDP
    re-broadcasts rank 0's only at the next forward): evaluating shards with them would score each
    shard with a different model."""
    if rank_world()[1] == 1:
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, 0)


def sum_counts(values: Sequence[float | int]) -> list:
    """Element-wise sum over ranks of a list of numbers (integer counts stay exact: summed as
    Python ints)."""
    parts = all_gather_objects(list(values))
    return [sum(col) for col in zip(*parts)]
