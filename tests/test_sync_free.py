"""The training step never waits for the device: over 20 steps of every pretraining method and of the detection
loop, the calls that read a tensor's value back to the host (`item`, `__float__`, `__bool__`, `__int__`,
`__index__`, `tolist`, `cpu`, `numpy`, `torch.cuda.synchronize`) are counted while the engine runs, and only the
engine's one read per logging interval is allowed (log_every = 10: the reads after steps 10 and 20). Epoch-end work
(the parameter check before the checkpoint, evaluation) is counted apart; the data pipeline, which works on host
tensors before the copy to the device, is not counted.

On the CPU every tensor is a host tensor, so the test counts the calls themselves: a call that would make a
CUDA run wait is a call here. Explicit exemptions, each with its reason and its bound:
- PuzzleMix's graph cut runs on the host by the authors' algorithm: `pretrain.methods.puzzlemix.read_to_host` copies
  the terms of the energy to the host once per step (all K masks of multi-mix at once).
- torchvision's detectors check every target for degenerate boxes (`degenerate_boxes.any()`, one read per image,
  inside `SSD.forward` / `GeneralizedRCNN.forward`) and draw the training size with `torch_choice` from a CPU
  tensor (no device involved); neither is this toolkit's code.
"""

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from mixup_transfer.core.engine import Engine, LoopSettings, Task, build_optimizer
from pretrain.methods import METHODS, ResNetStages, build_method

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

READS = ("item", "__float__", "__bool__", "__int__", "__index__", "tolist", "cpu", "numpy")
TORCH_DIR = str(Path(torch.__file__).parent) + "/"  # torch itself (not torchvision)
STEPS, LOG_EVERY = 20, 10


class SyncCounter:
    """Records (phase, step, method, file, function) for every reading call made while it is installed; the
    file and function are those of the innermost caller outside torch. `phase` is "step" unless the engine is in
    `_end_epoch` ("epoch_end") or the task's data iterator is producing a batch ("data": not recorded)."""

    def __init__(self):
        self.calls, self.phase, self.step, self._saved = [], "step", 0, []

    def _record(self, name: str) -> None:
        if self.phase == "data":
            return
        f = sys._getframe(2)
        while f is not None and f.f_code.co_filename.startswith(TORCH_DIR):
            f = f.f_back
        where = (Path(f.f_code.co_filename).name, f.f_code.co_name) if f is not None else ("?", "?")
        self.calls.append((self.phase, self.step, name) + where)

    def _wrap(self, name, orig):
        def counted(*args, **kwargs):
            self._record(name)
            return orig(*args, **kwargs)

        return counted

    def __enter__(self):
        for name in READS:
            self._saved.append((torch.Tensor, name, torch.Tensor.__dict__.get(name)))
            setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))
        self._saved.append((torch.cuda, "synchronize", torch.cuda.__dict__["synchronize"]))
        torch.cuda.synchronize = self._wrap("synchronize", torch.cuda.synchronize)
        return self

    def __exit__(self, *exc):
        for owner, name, orig in reversed(self._saved):
            if orig is None:
                delattr(owner, name)
            else:
                setattr(owner, name, orig)


def run_counted(engine: Engine, monkeypatch) -> SyncCounter:
    """engine.fit() with a SyncCounter; the engine's step number and epoch-end phase are tracked."""
    counter = SyncCounter()
    train_step, end_epoch, batches = Engine.train_step, Engine._end_epoch, engine.task.batches

    def step(self, micro):
        counter.step = self.step + 1
        return train_step(self, micro)

    def epoch_end(self, *args):
        counter.phase = "epoch_end"
        try:
            return end_epoch(self, *args)
        finally:
            counter.phase = "step"

    def data(epoch, start):
        counter.phase = "data"
        it = iter(batches(epoch, start))
        counter.phase = "step"
        while True:
            counter.phase = "data"
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                counter.phase = "step"
            yield batch

    monkeypatch.setattr(Engine, "train_step", step)
    monkeypatch.setattr(Engine, "_end_epoch", epoch_end)
    monkeypatch.setattr(engine.task, "batches", data)
    with counter:
        engine.fit()
    return counter


def split(calls, exempt):
    """-> (the engine's reads in the step phase, exempt calls by reason, other step-phase calls, epoch-end calls)."""
    engine_reads, exempted, other, epoch_end = [], Counter(), [], []
    for phase, step, name, file, func in calls:
        if phase == "epoch_end":
            epoch_end.append((name, file, func))
        elif (file, func) == ("engine.py", "read_metrics") and name == "tolist":
            engine_reads.append(step)
        elif (file, func, name) in exempt:
            exempted[(file, func, name, step)] += 1
        else:
            other.append((step, name, file, func))
    return engine_reads, exempted, other, epoch_end


# ---------------------------------------------------------------------------------------------- pretraining

C = 10
CASES = [
    ("erm", {}), ("input_mixup", {}), ("manifold_mixup", {}), ("cutmix", {}), ("puzzlemix", {"solver": "swap"}),
    ("multimix", {"n": 50}), ("multimix", {"n": 50, "m": 3, "dense_loss": True}), ("multimix", {"n": 8, "layer": 2}),
    ("dense_multimix", {"n": 50}), ("multi_interp", {"k": 2, "puzzle": {"solver": "swap"}}),
    ("multi_interp", {"base": "input", "k": 3}), ("multi_interp", {"base": "manifold", "k": 3}),
    ("multi_interp", {"base": "cutmix", "k": 3}), ("multi_interp", {"base": "manifold", "k": 2, "large_batch": True}),
    ("alignmix_stage2", {"resolution": 1}), ("alignmix", {}),
    ("alignmix_ae", {"resolution": 1, "decoder_size": 16}),
]
PUZZLE = {("puzzlemix.py", "read_to_host", "numpy")}  # the graph cut's one host copy per step


class TinyPretrain(Task):
    """20 fixed batches of 4 random 16 px images; the method seeded before every micro-batch as pretrain.task does."""

    steps_per_epoch = STEPS

    def __init__(self, name, knobs):
        torch.manual_seed(0)
        self.model = build_method(name, ResNetStages("resnet18", C), C, **knobs)
        self.model.generator = torch.Generator()
        g = torch.Generator().manual_seed(1)
        self.data = [(torch.rand(4, 3, 16, 16, generator=g), torch.randint(C, (4,), generator=g))
                     for _ in range(STEPS)]

    def batches(self, epoch, start_step):
        return iter(self.data[start_step:])

    def before_step(self, micro_step):
        self.model.seed(1000 + micro_step)

    def param_groups(self):
        return [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr": 0.01}]


def test_the_cases_cover_every_registered_method():
    assert {name for name, _ in CASES} == set(METHODS)


@pytest.mark.parametrize("name,knobs", CASES, ids=[f"{n}-{'-'.join(map(str, k.values()))}" for n, k in CASES])
def test_a_pretraining_step_reads_nothing_back(tmp_path, monkeypatch, name, knobs):
    task = TinyPretrain(name, knobs)
    opt = build_optimizer("sgd", task.param_groups(), 0.01, momentum=0.9)
    settings = LoopSettings(total_steps=STEPS, device=torch.device("cpu"), log_every=LOG_EVERY, grad_norm=True,
                            clip_grad_norm=10.0)  # grad_norm: pretraining's default; clipping: its path too
    engine = Engine(task, tmp_path / "run", settings, opt, lambda step: 1.0)
    counter = run_counted(engine, monkeypatch)
    reads, exempted, other, epoch_end = split(counter.calls, PUZZLE)
    assert other == [], other  # nothing but the engine's periodic read (and PuzzleMix's graph cut) in the loop
    assert reads == [10, 20], reads  # one read per logging interval
    if name == "puzzlemix" or (name == "multi_interp" and knobs.get("base", "puzzlemix") == "puzzlemix"):
        assert sorted(step for *_, step in exempted) == list(range(1, STEPS + 1))  # one copy per step
        assert set(exempted.values()) == {1}
    else:
        assert not exempted, exempted
    # epoch end: the parameter check before the epoch record and before the checkpoint, one read each
    assert epoch_end == [("tolist", "engine.py", "check_parameters")] * 2, epoch_end


# ---------------------------------------------------------------------------------------------- detection

TORCHVISION = {("ssd.py", "forward", "__bool__"),  # degenerate-box check, one per image
               ("transform.py", "torch_choice", "item")}  # training size from a CPU tensor, one per image


def test_a_detection_step_reads_nothing_back(toy_world, tmp_path, monkeypatch):
    """DetectionTask (SSD, the tiny toy VOC setup of tests/test_finetune_det.py) for 20 steps of 2 images."""
    from transfer import det_train

    cfg = det_train.resolve_config({
        "model": {"type": "ssd", "arch": "resnet18", "size": 64, "max_size": 64, "train_sizes": [64],
                  "kwargs": {"detections_per_img": 10}},
        "data": {"format": "voc", "root": str(toy_world / "VOCdevkit"), "voc_train": ["2007/trainval", "2012/trainval"],
                 "max_train_images": 2 * STEPS, "max_test_images": 6, "workers": 0, "zoom_out_ratio": 2.0},
        "solver": {"epochs": 1, "batch_size": 2, "lr": 0.01, "warmup_iters": 2, "steps": [0.75],
                   "clip_grad_norm": 10.0},
        "seeds": [0], "runtime": {"log_period": LOG_EVERY}})
    torch.manual_seed(0)
    device = torch.device("cpu")
    task = det_train.DetectionTask(cfg, None, 0, device)
    s = cfg["solver"]
    opt = build_optimizer("sgd", task.param_groups(), task.lr(), s["momentum"], s["weight_decay"])
    settings = LoopSettings(total_steps=task.total, device=device, clip_grad_norm=s["clip_grad_norm"],
                            log_every=LOG_EVERY)
    engine = Engine(task, tmp_path / "det", settings, opt, task.lr_lambda)
    assert task.total == STEPS
    counter = run_counted(engine, monkeypatch)
    reads, exempted, other, epoch_end = split(counter.calls, TORCHVISION)
    assert other == [], other
    assert reads == [10, 20], reads
    per_step = Counter()
    for (file, func, name, step), n in exempted.items():
        per_step[(file, func, name)] = max(per_step[(file, func, name)], n)
    assert all(n <= 2 for n in per_step.values()), per_step  # two images per step: at most one each per image
    assert epoch_end == [("tolist", "engine.py", "check_parameters")] * 2, epoch_end
