"""mixup_transfer.core.prefetch: on CUDA the engine queues step t + 1's host-to-device work on a
side stream before step t runs, so that it overlaps the step (and a method's host-side solver); the
step reads its batch only after the compute stream waited for the side stream, and every tensor is
marked as used by the compute stream. CUDA's stream API is replaced by a recorder (no driver here):
these tests show the order of the calls, not the GPU's timing."""

import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mixup_transfer.core.engine import Engine, LoopSettings, Task
from mixup_transfer.core.prefetch import DevicePrefetcher, side_stream

pytestmark = pytest.mark.cuda_semantics


class _Streams:
    """torch.cuda's stream calls, recorded in `log`."""

    def __init__(self, monkeypatch):
        self.log, self.side = [], None
        recorder = self

        class Stream:
            def __init__(self, device=None, name="side"):
                self.device, self.name = device, name

            def wait_stream(self, other):
                recorder.log.append(("wait", self.name, other.name))

        self.compute = Stream(name="compute")
        self.events = 0

        class Event:
            def __init__(self):
                self.number, recorder.events = recorder.events, recorder.events + 1

            def record(self, stream):
                recorder.log.append(("event", self.number, stream.name))

        def wait_event(event):
            self.log.append(("wait", "compute", f"event {event.number}"))

        self.compute.wait_event = wait_event

        @contextlib.contextmanager
        def stream(s):
            self.side = s
            yield
            self.side = None

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "stream", stream)
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self.compute)
        monkeypatch.setattr(torch.Tensor, "record_stream",
                            lambda t, s: self.log.append(("record", int(t.shape[0]), s.name)))


class _Task(Task):
    """Batches k = 0, 1, ... whose `to_device` logs where it runs and returns a fake CUDA tensor
    with k + 1 rows."""

    def __init__(self, streams, n):
        self.model, self.steps_per_epoch = torch.nn.Linear(1, 1), n
        self.streams, self.n = streams, n

    def batches(self, epoch, start_step):
        for k in range(start_step, self.n):
            self.streams.log.append(("read", k))
            yield k

    def to_device(self, batch, device, channels_last):
        side = self.streams.side.name if self.streams.side is not None else "compute"
        self.streams.log.append(("move", batch, side))
        return torch.empty(batch + 1, device=device)

    def param_groups(self):
        return [{"params": list(self.model.parameters()), "lr": 0.1, "name": "all"}]


def _engine(tmp_path, task, accumulate=1):
    settings = LoopSettings(total_steps=task.n, device=torch.device("cuda", 0),
                            accumulate=accumulate)
    opt = torch.optim.SGD(task.model.parameters(), lr=0.1)
    return Engine(task, tmp_path / "run", settings, opt, lambda step: 1.0)


def test_the_next_step_is_moved_on_the_side_stream_before_the_step_runs(tmp_path, monkeypatch):
    streams = _Streams(monkeypatch)
    task = _Task(streams, 3)
    engine = _engine(tmp_path, task)
    with FakeTensorMode(allow_non_fake_inputs=True):
        for micro in engine._grouped(task.batches(0, 0)):
            streams.log.append(("step", int(micro[0].shape[0]) - 1))
    assert streams.log == [
        ("read", 0), ("move", 0, "side"), ("event", 0, "side"),
        ("read", 1), ("move", 1, "side"), ("event", 1, "side"),  # step 1's copies are queued ...
        ("wait", "compute", "event 0"), ("record", 1, "compute"),  # (step 0 waits for its own)
        ("step", 0),                                             # ... before step 0 runs
        ("read", 2), ("move", 2, "side"), ("event", 2, "side"),
        ("wait", "compute", "event 1"), ("record", 2, "compute"),
        ("step", 1),
        ("wait", "compute", "event 2"), ("record", 3, "compute"),
        ("step", 2)]


def test_accumulation_moves_a_whole_step_ahead_and_drops_an_incomplete_group(tmp_path,
                                                                             monkeypatch):
    streams = _Streams(monkeypatch)
    task = _Task(streams, 5)
    engine = _engine(tmp_path, task, accumulate=2)
    steps = []
    with FakeTensorMode(allow_non_fake_inputs=True):
        for micro in engine._grouped(task.batches(0, 0)):
            steps.append([int(t.shape[0]) - 1 for t in micro])
            streams.log.append(("step", steps[-1][0]))
    assert steps == [[0, 1], [2, 3]]  # batch 4 alone is not a step
    moves = [e for e in streams.log if e[0] in ("move", "step")]
    assert moves == [("move", 0, "side"), ("move", 1, "side"), ("move", 2, "side"),
                     ("move", 3, "side"), ("step", 0), ("step", 2)]


def test_without_cuda_each_group_is_moved_when_reached(tmp_path):
    """On the CPU (and wherever CUDA is not available) nothing runs early: the CPU results of the
    toolkit are those of a loop without a prefetcher."""
    log = []

    def move(b):
        log.append(("move", b))
        return b

    assert side_stream(torch.device("cpu")) is None
    prefetch = DevicePrefetcher(move, side_stream(torch.device("cpu")))
    for group in prefetch(iter([[0], [1]])):
        log.append(("step", group[0]))
    assert log == [("move", 0), ("step", 0), ("move", 1), ("step", 1)]


class _Tiny(Task):
    """Two steps of a linear model on zeros."""

    def __init__(self):
        self.model, self.steps_per_epoch = torch.nn.Linear(2, 1), 2

    def batches(self, epoch, start_step):
        return iter([(torch.zeros(4, 2), torch.zeros(4))] * (2 - start_step))

    def inputs(self, batch):
        return (batch[0],)

    def param_groups(self):
        return [{"params": list(self.model.parameters()), "lr": 0.1, "name": "all"}]


class _LossModel(torch.nn.Linear):
    def forward(self, x):
        return {"loss": super().forward(x).square().mean()}


def test_a_finished_engine_is_freed_at_once(tmp_path):
    """No reference cycle through the engine: when a stage's engine goes, its task, the task's
    loaders and their worker processes go with it, before the next stage forks its own workers
    (in a cycle they wait for the garbage collector, which may then run in those forked
    workers)."""
    import gc
    import weakref

    task = _Tiny()
    task.model = _LossModel(2, 1)
    settings = LoopSettings(total_steps=2, device=torch.device("cpu"), log_every=1)
    engine = Engine(task, tmp_path / "run", settings,
                    torch.optim.SGD(task.model.parameters(), lr=0.1), lambda step: 1.0)
    engine.fit()
    alive = weakref.ref(engine)
    enabled = gc.isenabled()
    gc.disable()
    try:
        del engine
        assert alive() is None
    finally:
        if enabled:
            gc.enable()
