"""The training step never waits for the device: over 20 steps of every pretraining method and of
the detection loop, the calls that read a tensor's value back to the host (`item`, `__float__`,
`__bool__`, `__int__`, `__index__`, `tolist`, `cpu`, `numpy`, `torch.cuda.synchronize`) are counted
while the engine runs, and only the engine's one read per logging interval is allowed (log_every =
10: the reads after steps 10 and 20). Epoch-end work (the parameter check before the checkpoint,
evaluation) is counted apart; the data pipeline, which works on host tensors before the copy to the
device, is not counted.

On the CPU every tensor is a host tensor, so the test counts the calls themselves: a call that
would make a CUDA run wait is a call here. Explicit exemptions, each with its reason and its bound:
- PuzzleMix's graph cut runs on the host by the authors' algorithm:
  `pretrain.methods.puzzlemix.read_to_host` copies the terms of the energy to the host once per
  step (all K masks of multi-mix at once).
- SaliencyMix's saliency map runs on the host as the authors' code computes it (OpenCV's detector):
  `pretrain.methods.saliencymix.read_image` copies the one image it needs to the host once per
  mixed step.
- torchvision's detectors check every target for degenerate boxes (`degenerate_boxes.any()`, one
  read per image, inside `SSD.forward` / `GeneralizedRCNN.forward`) and draw the training size with
  `torch_choice` from a CPU tensor (no device involved); neither is this toolkit's code.

Copies from the host to the device wait too, unless they are non_blocking from pinned memory. The
same loop runs on a fake CUDA device (FakeTensorMode) for every pretraining method and for the
GPU-decode data path, with `Tensor.to`, `Tensor.cuda`, `Tensor.copy_` and `torch.tensor` /
`torch.as_tensor` counted (`HostCopyCounter`): no copy in the step may make the host wait.
"""

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from mixup_transfer.core import runtime as rt
from mixup_transfer.core.engine import Engine, LoopSettings, Task, build_optimizer
from pretrain.methods import METHODS, build_method, network_stages

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

READS = ("item", "__float__", "__bool__", "__int__", "__index__", "tolist", "cpu", "numpy")
TORCH_DIR = str(Path(torch.__file__).parent) + "/"  # torch itself (not torchvision)
STEPS, LOG_EVERY = 20, 10


class SyncCounter:
    """Records (phase, step, method, file, function) for every reading call made while it is
    installed; the file and function are those of the innermost caller outside torch. `phase` is
    "step" unless the engine is in `_end_epoch` ("epoch_end") or the task's data iterator is
    producing a batch ("data": not recorded)."""

    def __init__(self):
        self.calls, self.phase, self.step, self._saved = [], "step", 0, []

    def _record(self, name: str) -> None:
        if self.phase == "data":
            return
        f = sys._getframe(2)
        while f is not None and f.f_code.co_filename.startswith(TORCH_DIR):
            f = f.f_back
        where = (Path(f.f_code.co_filename).name,
                 f.f_code.co_name) if f is not None else ("?", "?")
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
    """engine.fit() with a SyncCounter; the engine's step number and epoch-end phase are
    tracked."""
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
    """-> (the engine's reads in the step phase, exempt calls by reason, other step-phase calls,
    epoch-end calls)."""
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


# ----------------------------------------------------------------------------------------------
# pretraining

C = 10
CASES = [
    ("erm", {}), ("input_mixup", {}), ("manifold_mixup", {}), ("cutmix", {}),
    ("puzzlemix", {"solver": "swap"}), ("multimix", {"n": 50}),
    ("multimix", {"n": 50, "m": 3, "dense_loss": True}), ("multimix", {"n": 8, "layer": 2}),
    ("dense_multimix", {"n": 50}), ("multi_interp", {"k": 2, "puzzle": {"solver": "swap"}}),
    ("multi_interp", {"base": "input", "k": 3}), ("multi_interp", {"base": "manifold", "k": 3}),
    ("multi_interp", {"base": "cutmix", "k": 3}),
    ("multi_interp", {"base": "manifold", "k": 2, "large_batch": True}),
    ("alignmix_stage2", {"resolution": 1}), ("alignmix", {}),
    ("alignmix_ae", {"resolution": 1, "decoder_size": 16}), ("zeta_mixup", {}),
    ("tokenmix", {"labels": "area", "patch_size": 4, "minimum_tokens": 1}),
    ("comixup", {"solver": "swap"}), ("transmix", {}), ("transmix", {"switch_prob": 1.0}),
    ("saliencymix", {"prob": 1.0}), ("supermix", {"max_iter": 2, "mask_w": 4}),
]
# methods that need a ViT (the class token's attention); the others a ResNet-18
ARCH = {"transmix": "vit_tiny_toy"}
# the graph cut's one host copy per step (PuzzleMix; Co-Mixup reads its saliency through the same
# function)
PUZZLE = {("puzzlemix.py", "read_to_host", "numpy"),
          ("saliencymix.py", "read_image", "numpy")}  # the saliency map's one image per mixed step
# the methods with a host step (prob 1 here: one copy every step)
HOST_STEP = ("puzzlemix", "comixup", "saliencymix")


class TinyPretrain(Task):
    """20 fixed batches of 4 random 16 px images; the method seeded before every micro-batch as
    pretrain.task does."""

    steps_per_epoch = STEPS

    def __init__(self, name, knobs):
        torch.manual_seed(0)
        self.model = build_method(name, network_stages(ARCH.get(name, "resnet18"), C), C, **knobs)
        self.model.generator = torch.Generator()
        if self.model.needs_teacher:
            self.model.teacher = network_stages("resnet18", C)
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


@pytest.mark.parametrize("name,knobs", CASES,
                         ids=[f"{n}-{'-'.join(map(str, k.values()))}" for n, k in CASES])
def test_a_pretraining_step_reads_nothing_back(tmp_path, monkeypatch, name, knobs):
    task = TinyPretrain(name, knobs)
    opt = build_optimizer("sgd", task.param_groups(), 0.01, momentum=0.9)
    settings = LoopSettings(total_steps=STEPS, device=torch.device("cpu"), log_every=LOG_EVERY,
                            grad_norm=True,
                            # grad_norm: pretraining's default; clipping: its path too
                            clip_grad_norm=10.0)
    engine = Engine(task, tmp_path / "run", settings, opt, lambda step: 1.0)
    counter = run_counted(engine, monkeypatch)
    # Co-Mixup's optimisation works on the host copies that read_to_host made (on CPU the counter
    # cannot tell them from the device tensors): its solver module is host work by construction
    calls = [c for c in counter.calls if c[3] != "comixup_graphcut.py"]
    reads, exempted, other, epoch_end = split(calls, PUZZLE)
    # nothing but the engine's periodic read (and PuzzleMix's graph cut) in the loop
    assert other == [], other
    assert reads == [10, 20], reads  # one read per logging interval
    host_step = name in HOST_STEP or (name == "multi_interp"
                                      and knobs.get("base", "puzzlemix") == "puzzlemix")
    if host_step:
        # one copy per step
        assert sorted(step for *_, step in exempted) == list(range(1, STEPS + 1))
        assert set(exempted.values()) == {1}
    else:
        assert not exempted, exempted
    # epoch end: the parameter check before the epoch record and before the checkpoint, one read
    # each
    assert epoch_end == [("tolist", "engine.py", "check_parameters")] * 2, epoch_end


# ----------------------------------------------------------------------------------------------
# detection

TORCHVISION = {("ssd.py", "forward", "__bool__"),  # degenerate-box check, one per image
               # training size from a CPU tensor, one per image
               ("transform.py", "torch_choice", "item")}


def test_a_detection_step_reads_nothing_back(toy_world, tmp_path, monkeypatch):
    """DetectionTask (SSD, the tiny toy VOC setup of tests/transfer/test_finetune_det.py) for 20
    steps of 2 images."""
    from transfer.detection import config as det_config
    from transfer.detection import torchvision_backend as tvb

    cfg = det_config.resolve_config({
        "model": {"type": "ssd", "arch": "resnet18", "size": 64, "max_size": 64,
                  "train_sizes": [64], "kwargs": {"detections_per_img": 10}},
        "data": {"format": "voc", "root": str(toy_world / "VOCdevkit"),
                 "voc_train": ["2007/trainval", "2012/trainval"], "max_train": 2 * STEPS,
                 "max_val": 6, "num_workers": 0, "zoom_out_ratio": 2.0},
        "optim": {"epochs": 1, "batch_per_process": 2, "lr": 0.01, "warmup_iters": 2,
                  "steps": [0.75], "clip_grad_norm": 10.0},
        "seeds": [0], "runtime": {"log_every_steps": LOG_EVERY}})
    torch.manual_seed(0)
    device = torch.device("cpu")
    task = tvb.DetectionTask(cfg, None, 0, device)
    s = cfg["optim"]
    opt = build_optimizer("sgd", task.param_groups(), task.lr(), s["momentum"], s["weight_decay"])
    settings = LoopSettings(total_steps=task.total, device=device,
                            clip_grad_norm=s["clip_grad_norm"], log_every=LOG_EVERY)
    engine = Engine(task, tmp_path / "det", settings, opt, task.lr_lambda)
    assert task.total == STEPS
    counter = run_counted(engine, monkeypatch)
    reads, exempted, other, epoch_end = split(counter.calls, TORCHVISION)
    assert other == [], other
    assert reads == [10, 20], reads
    per_step = Counter()
    for (file, func, name, _step), n in exempted.items():
        per_step[(file, func, name)] = max(per_step[(file, func, name)], n)
    # two images per step: at most one each per image
    assert all(n <= 2 for n in per_step.values()), per_step
    assert epoch_end == [("tolist", "engine.py", "check_parameters")] * 2, epoch_end


# ---------------------------------------------------------------------------- host-to-device
# copies that wait

class HostCopyCounter:
    """Records every copy of host memory to a CUDA device made while it is installed, by
    `Tensor.to`, `Tensor.cuda`, `Tensor.copy_` and `torch.tensor` / `torch.as_tensor` with a CUDA
    `device`, as (what, file, function) of the innermost caller outside torch, when the copy would
    make the host wait: a copy that is not non_blocking, or whose source is not pinned (CUDA stages
    a pageable source through a pinned buffer, on the host). `Tensor.pin_memory` (which needs a
    driver) returns the tensor itself, marked as pinned."""

    def __init__(self, monkeypatch):
        self.waits: list[tuple[str, str, str]] = []
        # id -> the tensor (held, so that no other one takes its id)
        self.pinned: dict[int, torch.Tensor] = {}
        to, cuda, copy, tensor, as_tensor = (torch.Tensor.to, torch.Tensor.cuda,
                                             torch.Tensor.copy_, torch.tensor, torch.as_tensor)

        def counted_to(t, *args, **kwargs):
            target = [a for a in list(args) + [kwargs.get("device")]
                      if isinstance(a, (str, torch.device))]
            target += [a.device for a in args if isinstance(a, torch.Tensor)]
            if any(torch.device(a).type == "cuda" for a in target):
                self._check("to", t, kwargs.get("non_blocking", any(a is True for a in args)))
            return to(t, *args, **kwargs)

        def counted_cuda(t, device=None, non_blocking=False, **kwargs):
            self._check("cuda", t, non_blocking)
            return cuda(t, device, non_blocking, **kwargs)

        def counted_copy(t, src, non_blocking=False):
            if t.device.type == "cuda":
                self._check("copy_", src, non_blocking)
            return copy(t, src, non_blocking)

        def made(factory, name):
            def counted(data, *args, **kwargs):
                device = kwargs.get("device")
                if device is not None and torch.device(device).type == "cuda" and not (
                        isinstance(data, torch.Tensor) and data.device.type == "cuda"):
                    self._record(name)  # host data: a pageable copy
                return factory(data, *args, **kwargs)
            return counted

        def pin(t, *args, **kwargs):
            self.pinned[id(t)] = t
            return t

        monkeypatch.setattr(torch.Tensor, "to", counted_to)
        monkeypatch.setattr(torch.Tensor, "cuda", counted_cuda)
        monkeypatch.setattr(torch.Tensor, "copy_", counted_copy)
        monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
        monkeypatch.setattr(torch, "tensor", made(tensor, "tensor"))
        monkeypatch.setattr(torch, "as_tensor", made(as_tensor, "as_tensor"))

    def _check(self, name: str, src: torch.Tensor, non_blocking: bool) -> None:
        pinned = id(src) in self.pinned
        if src.device.type == "cpu" and not (non_blocking and pinned):
            self._record(
                f"{name}{'' if non_blocking else ' blocking'}{'' if pinned else ' pageable'}"
            )

    def _record(self, what: str) -> None:
        f = sys._getframe(1)
        while f is not None and (f.f_code.co_filename.startswith(TORCH_DIR)
                                 or f.f_code.co_filename == __file__):
            f = f.f_back
        where = (Path(f.f_code.co_filename).name,
                 f.f_code.co_name) if f is not None else ("?", "?")
        self.waits.append((what,) + where)


class FakeCudaPretrain(TinyPretrain):
    """TinyPretrain's method on a fake CUDA device; its batches are those of the uint8 loader with
    the ImageNet recipe's colour augmentation (uint8 images, labels, colour parameters), pinned as
    the DataLoader pins them, moved by pretraining's own `batch_to_device`."""

    def __init__(self, name, knobs):
        super().__init__(name, knobs)
        g = torch.Generator().manual_seed(2)
        self.data = [(torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=g),
                      torch.randint(C, (4,), generator=g), torch.rand(4, 10, generator=g))
                      for _ in range(STEPS)]

    def batches(self, epoch, start_step):
        return (tuple(t.pin_memory() for t in batch) for batch in self.data[start_step:])

    def to_device(self, batch, device, channels_last):
        from pretrain.data import batch_to_device

        return batch_to_device(batch, device, channels_last)

    def before_step(self, micro_step):
        self.model.seed(1000 + micro_step)


def _cuda_autocast(device, precision):
    """`runtime.autocast` built as on a CUDA machine (torch.autocast checks that a driver exists
    and whether it has bf16; once built it only sets the dispatcher's flags, which fake CUDA
    tensors obey)."""
    from unittest import mock

    with mock.patch.object(torch.cuda, "is_available", lambda: True), \
            mock.patch.object(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True):
        return torch.autocast("cuda", dtype={"bf16": torch.bfloat16,
                                             "fp16": torch.float16}[precision])


# SuperMix's forward differentiates the teacher (torch.autograd.grad): autograd's CUDA threads need
# a driver
FAKE_CUDA_CASES = [(n, k) for n, k in CASES if n not in HOST_STEP + ("supermix",)
                   and k.get("base", "puzzlemix" if n == "multi_interp" else "") != "puzzlemix"]


def _steps_on_fake_cuda(task, tmp_path, monkeypatch, steps: int = 3):
    """`steps` optimizer steps of the engine's loop (`Engine._grouped`, which calls the task's
    `to_device`, and `Engine.train_step`) on a fake CUDA device in bf16 and channels_last, counted
    by a HostCopyCounter. The backward pass fills zero gradients instead (autograd's CUDA threads
    need a driver). -> (last record, counter)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(rt, "autocast", _cuda_autocast)
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *args, **kwargs: [
        setattr(p, "grad", torch.zeros_like(p)) for p in task.model.parameters()
        if p.requires_grad])
    device = torch.device("cuda", 0)
    with FakeTensorMode(allow_non_fake_inputs=True):
        task.model.to(device, memory_format=torch.channels_last)
        if task.model.teacher is not None:
            task.model.teacher.to(device, memory_format=torch.channels_last)
        task.model.generator = None  # a CUDA generator needs a driver; draws use the default one
        opt = build_optimizer("sgd", task.param_groups(), 0.01, momentum=0.9)
        settings = LoopSettings(total_steps=STEPS, device=device, precision="bf16",
                                channels_last=True, log_every=LOG_EVERY, grad_norm=True,
                                clip_grad_norm=10.0)
        engine = Engine(task, tmp_path / "run", settings, opt, lambda step: 1.0)
        counter = HostCopyCounter(monkeypatch)
        for k, micro in enumerate(engine._grouped(task.batches(0, 0))):
            record = engine.train_step(micro)
            if k + 1 == steps:
                break
    return record, counter


@pytest.mark.parametrize("name,knobs", FAKE_CUDA_CASES,
                         ids=[f"{n}-{'-'.join(map(str, k.values()))}" for n, k in FAKE_CUDA_CASES])
def test_a_pretraining_step_copies_nothing_that_waits(tmp_path, monkeypatch, name, knobs):
    """The engine's step loop (the task's `to_device`; the method's forward under bf16 autocast,
    the loss sums, the gradient norm and clipping, the optimizer and scheduler steps) for 3 steps
    of every method on a fake CUDA device (FakeTensorMode: the copies are dispatched as on CUDA, no
    data moves), the batches those of the uint8 loader with colour augmentation. Shows: no
    host-to-device copy in it makes the host wait (each is non_blocking from pinned memory), and
    the step's metrics stay on the device. Cannot show: the backward pass (autograd's CUDA threads
    need a driver; zero gradients stand in), SuperMix (its forward differentiates the teacher),
    PuzzleMix and SaliencyMix (their host steps read the saliency or an image back, which fake
    tensors cannot) and the real overlap of copies with compute."""
    record, counter = _steps_on_fake_cuda(FakeCudaPretrain(name, knobs), tmp_path, monkeypatch)
    assert record["loss"].device.type == "cuda" and record["grad_norm2"].device.type == "cuda"
    assert counter.waits == [], counter.waits


class FakeCudaEncoded(FakeCudaPretrain):
    """Batches of `data.decode_device: cuda` (encoded bytes, crops [b, 6], labels): two JPEGs and
    two PNGs (ImageNet has a PNG under a .JPEG name), the JPEGs decoded by a stand-in for nvJPEG (a
    driver is needed), the PNGs by the CPU decoder's stand-in (fake tensors have no pixels to
    decode). The crops are read on the host (`tolist`) as real tensors (FakeTensorMode would make
    them fake, without values)."""

    def __init__(self, name, knobs, monkeypatch):
        from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
        from torchvision import io as tio

        from pretrain import data as pdata

        super().__init__(name, knobs)
        image = torch.zeros(3, 16, 16, dtype=torch.uint8)
        datas = [bytes(tio.encode_jpeg(image).tolist()), bytes(tio.encode_png(image).tolist())] * 2
        tolist = torch.Tensor.tolist

        def host_tolist(t):
            if isinstance(t, FakeTensor):
                return tolist(t)
            with unset_fake_temporarily():
                return tolist(t)

        monkeypatch.setattr(torch.Tensor, "tolist", host_tolist)
        crops = torch.tensor([[0, 0, 16, 16, 0, 16]] * 4)
        self.data = [(datas, crops, torch.arange(4) % C) for _ in range(STEPS)]
        monkeypatch.setattr(pdata, "decode_jpegs", lambda items, device: [
            torch.zeros(3, 16, 16, dtype=torch.uint8, device=device) for _ in items])
        monkeypatch.setattr(pdata, "decode_uint8",
                            lambda data, where: torch.zeros(3, 16, 16, dtype=torch.uint8))

    def batches(self, epoch, start_step):
        return ((datas, crops.pin_memory(), labels.pin_memory()) for datas, crops,
                labels in self.data[start_step:])


def test_a_gpu_decoded_pretraining_step_copies_nothing_that_waits(tmp_path, monkeypatch):
    """The same loop for ERM on batches decoded on the device (`decode_batch`), where images that
    are not JPEGs are decoded on the CPU and moved. Shows: those moves do not make the host wait
    either (pinned, non_blocking). Cannot show: nvJPEG itself (`make gpu-check`)."""
    record, counter = _steps_on_fake_cuda(FakeCudaEncoded("erm", {}, monkeypatch), tmp_path,
                                          monkeypatch)
    assert record["loss"].device.type == "cuda"
    assert counter.waits == [], counter.waits
