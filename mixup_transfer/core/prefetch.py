"""The next optimizer step's batches moved to the device while the current step runs.

On CUDA, `DevicePrefetcher` queues the host-to-device copies of step t + 1 (and what a task's
`to_device` does there: uint8 -> float, nvJPEG decoding, colour augmentation) on a side stream
before it hands step t to the loop. That work then overlaps step t's kernels and any host work the
step waits on: PuzzleMix's graph cut, Co-Mixup's labeling, a method's host-side solver. The loop
reads a group only after the compute stream has waited for that group's copies (an event recorded
after them on the side stream: not for the next group's, queued behind them), and every tensor of
the group is marked as used by the compute stream (`Tensor.record_stream`), so the caching
allocator never hands its memory to another tensor while the step still reads it.

Elsewhere (a CPU device, or CUDA not available) each group is moved when the loop reaches it,
exactly as without a prefetcher. `to_device` must draw no random numbers (it runs one group early
on CUDA); the toolkit's tasks draw their augmentation in the loader's workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch


def _tensors(obj) -> Iterator[torch.Tensor]:
    """Every tensor in a (nested) batch of tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def side_stream(device: torch.device):
    """A side stream for the copies on a usable CUDA device; None elsewhere (no prefetching)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.Stream(device)
    return None


class DevicePrefetcher:
    """Turns groups of host batches into groups of device batches, one group ahead on CUDA.

    move: one host batch -> the batch on the device (a task's `to_device`, bound to its device).
    stream: the side stream for the copies (`side_stream`; None: move each group when it is
    reached). Made per epoch by the engine, so that nothing of the loop's iterator outlives it."""

    def __init__(self, move: Callable, stream=None):
        self.move, self.stream = move, stream

    def __call__(self, groups: Iterable[list]) -> Iterator[list]:
        if self.stream is None:
            for group in groups:
                yield [self.move(b) for b in group]
            return
        pending = None
        for group in groups:
            issued = self._issue(group)  # step t + 1's copies are queued before step t runs
            if pending is not None:
                yield self._ready(pending)
            pending = issued
        if pending is not None:
            yield self._ready(pending)

    def _issue(self, group: list) -> tuple[list, object]:
        """The group's copies queued on the side stream, and the event that marks their end."""
        with torch.cuda.stream(self.stream):
            moved = [self.move(b) for b in group]
        done = torch.cuda.Event()
        done.record(self.stream)
        return moved, done

    def _ready(self, issued: tuple[list, object]) -> list:
        """The compute stream waits for this group's copies only (not for the next group's, queued
        after them), and the allocator learns that the compute stream reads the tensors."""
        moved, done = issued
        current = torch.cuda.current_stream(self.stream.device)
        current.wait_event(done)
        for t in _tensors(moved):
            if t.device.type == "cuda":
                t.record_stream(current)
        return moved
