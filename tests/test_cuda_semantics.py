"""CUDA semantics checked without a GPU (pytest marker `cuda_semantics`, part of `make test`).

No GPU exists where these run, so each test rebuilds one CUDA behaviour on the CPU and says in its
docstring what that shows and what it cannot: fake CUDA tensors
(`torch._subclasses.fake_tensor.FakeTensorMode`: shapes, dtypes, devices and memory formats as CUDA
would give them, no values, no kernels), CPU autocast (the same lower-precision casts as CUDA
autocast, so fp16 underflow and bf16 rounding show), two gloo processes through the real `Engine`
(DDP's bucketing and unused-parameter rules are the same on NCCL), the meta device (placement and
the optimizer's parameter list, no values), and a stand-in for `torch.cuda` where the question is
only how many devices a process sees. What none of them can show: kernel speed, cuDNN's algorithm
choice, NCCL itself, and real stream ordering; `make gpu-check` (tools/gpu_check.py) runs those on
a GPU node.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import mixing_reference as refmath
import numpy as np
import pytest
import torch

from mixup_transfer.core import runtime as rt
from mixup_transfer.core.engine import Engine, LoopSettings, Task, build_optimizer
from pretrain.methods import ResNetStages, build_method
from pretrain.methods import base as shared
from pretrain.methods import multimix as mm
from pretrain.methods import puzzlemix as pz
from pretrain.methods import puzzlemix_graphcut as graphcut

# one_thread: conftest.py
pytestmark = [pytest.mark.cuda_semantics, pytest.mark.usefixtures("one_thread")]


# ------------------------------------------------------------------------------------- helpers

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MT_NO_PROGRESS="1")
    torch.set_num_threads(1)
    rt.init_distributed("gloo")


def _spawn(worker, *args) -> None:
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(2, _free_port(), *args), nprocs=2)


class FakeCuda:
    """A stand-in for the parts of `torch.cuda` that depend on how many GPUs a process sees:
    `visible` devices, `current` the current one, one RNG state per device (a uint8 tensor holding
    the device index and a counter), and torch's own rule that a device index past the visible ones
    is an error."""

    def __init__(self, visible: int, current: int = 0):
        self.visible, self.current = visible, current
        self.states = {i: torch.tensor([i, 0], dtype=torch.uint8) for i in range(visible)}

    def _check(self, index: int) -> int:
        if not 0 <= index < self.visible:
            raise RuntimeError(f"invalid device ordinal {index} ({self.visible} visible)")
        return index

    def install(self, monkeypatch) -> FakeCuda:
        c = torch.cuda
        monkeypatch.setattr(c, "is_available", lambda: True)
        monkeypatch.setattr(c, "device_count", lambda: self.visible)
        monkeypatch.setattr(c, "current_device", lambda: self.current)
        monkeypatch.setattr(c, "set_device",
                            lambda i: setattr(self, "current", self._check(int(i))))
        monkeypatch.setattr(c, "get_rng_state",
                            lambda device="cuda": self.states[self._index(device)].clone())
        monkeypatch.setattr(c, "set_rng_state", self._set)
        monkeypatch.setattr(c, "get_rng_state_all",
                            lambda: [self.states[i].clone() for i in range(self.visible)])
        monkeypatch.setattr(c, "set_rng_state_all",
                            lambda states: [self._set(s, i) for i, s in enumerate(states)])
        return self

    def _index(self, device) -> int:
        if isinstance(device, int):
            return self._check(device)
        d = torch.device(device)
        return self._check(self.current if d.index is None else d.index)

    def _set(self, state, device="cuda"):
        self.states[self._index(device)] = state.clone()


# ------------------------------------------------------------------------ 1. detection's
# channels_last

def test_detection_batches_keep_per_image_tensors_with_channels_last(toy_world):
    """`DetectionTask.to_device` and `predict` with channels_last on (what every detection config
    asks on CUDA).
    Shows: per-image [3, h, w] tensors are never given a 4-D memory format (which raises "required
    rank 4 tensor", on the CPU exactly as on CUDA), and the detector still predicts. Cannot show:
    cuDNN choosing its channels_last kernels for the converted model (a GPU run does)."""
    from transfer.detection import torchvision_backend as tvb

    cfg = _det_cfg(toy_world)
    task = tvb.DetectionTask(cfg, None, 0, torch.device("cpu"))
    images = [torch.rand(3, 40, 56), torch.rand(3, 64, 48)]
    targets = [{"boxes": torch.tensor([[1.0, 2.0, 20.0, 30.0]]), "labels": torch.tensor([3])}] * 2
    moved, moved_targets = task.to_device((images, targets), torch.device("cpu"), True)
    assert [m.shape for m in moved] == [im.shape for im in images]
    assert all(torch.equal(a, b) for a, b in zip(moved, images))
    assert moved_targets[0]["labels"].tolist() == [3]
    preds, _, _, n = tvb.predict_sharded(task.model, torch.utils.data.Subset(task.test_set,
                                                                             [0, 1]), 2, 0,
                                         torch.device("cpu"), channels_last=True)
    assert n == 2 and len(preds) == 2


def _det_cfg(toy_world, workers: int = 0):
    from transfer.detection import config as det_config

    return det_config.resolve_config({
        "model": {"type": "ssd", "arch": "resnet18", "size": 64, "max_size": 64,
                  "kwargs": {"detections_per_img": 10}},
        "data": {"format": "voc", "root": str(toy_world / "VOCdevkit"),
                 "voc_train": ["2007/trainval"], "max_train": 8, "max_val": 4,
                 "num_workers": workers},
        "optim": {"epochs": 1, "batch_per_process": 1}, "seeds": [0]})


# ----------------------------------------------------------- 2. a method whose modes skip
# parameters, under DDP

class _AETask(Task):
    """AlignMix/AE on 4 fixed batches of 16 px images: "clean" steps never use fc, "input" steps
    never use the decoder (each step's mode is recorded: these seeds draw both)."""

    steps_per_epoch = 4

    def __init__(self, rank: int):
        torch.manual_seed(0)
        self.model = build_method("alignmix_ae", ResNetStages("resnet18", 5), 5, resolution=1,
                                  decoder_size=16, modes=("clean", "input"))
        self.model.generator = torch.Generator()
        g = torch.Generator().manual_seed(10 + rank)
        self.data = [(torch.rand(2, 3, 16, 16, generator=g), torch.randint(5, (2,), generator=g))
                     for _ in range(4)]
        self.modes = []

    @property
    def find_unused_parameters(self):  # as PretrainTask: what the method declares
        return getattr(self.model, "find_unused_parameters", False)

    def batches(self, epoch, start_step):
        return iter(self.data[start_step:])

    def before_step(self, micro_step):
        self.model.seed(micro_step)
        # the draw forward will make (same seed)
        self.modes.append(self.model._choice(self.model.modes))
        self.model.seed(micro_step)

    def param_groups(self):
        return [{"params": list(self.model.parameters()), "lr": 0.01}]


def _ae_worker(rank, world, port, out):
    _join(rank, world, port)
    task = _AETask(rank)
    opt = build_optimizer("sgd", task.param_groups(), 0.01, momentum=0.9)
    settings = LoopSettings(total_steps=4, device=torch.device("cpu"), log_every=2)
    engine = Engine(task, Path(out) / "run", settings, opt, lambda step: 1.0)
    engine.fit()
    torch.save({"params": [p.detach().clone() for p in task.model.parameters()],
                "modes": task.modes, "bucket_view": engine.ddp.gradient_as_bucket_view},
                Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_alignmix_ae_trains_under_ddp_with_two_gloo_processes(tmp_path):
    """AlignMix/AE through the real `Engine` in 2 gloo processes (DDP's reducer is the same on
    NCCL; the engine skips DDP in one process, so a one-GPU run never shows this). Shows: a method
    whose steps leave parameters without a gradient declares it and DDP is built accordingly
    (without it, step 2 stops with "Expected to have finished reduction"), the ranks end with
    identical parameters, and gradients are bucket views. Cannot show: NCCL's speed with
    find_unused_parameters on."""
    _spawn(_ae_worker, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert set(r0["modes"]) == {"clean", "input"}  # both heads went unused in some step
    assert r0["bucket_view"] is True
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))


# ------------------------------------------------------------------------------- 3. the GPU
# bench's AlignMix row

def test_gpu_bench_moves_and_trains_every_methods_own_layers(monkeypatch):
    """`run_gpu_bench` with AlignMix's stage-2 variant (its encoder `encoder2` lives in the method,
    not in the shared ResNet). Shows, on the meta device (placement without values): every method
    runs with all of its layers on the bench's device; and on the CPU: the SGD step updates
    encoder2 (it is in the optimizer). Cannot show: the timings themselves."""
    from pretrain import bench

    built, initial = [], {}
    real = bench.build_method

    def capture(*args, **kwargs):
        built.append(real(*args, **kwargs))
        initial.update({len(built) - 1: [p.detach().clone() for p in built[-1].parameters()]})
        return built[-1]

    monkeypatch.setattr(bench, "build_method", capture)
    out = bench.run_gpu_bench(device="meta", arch="resnet18", size=64, batch=2, warmup=0, steps=1,
                              num_classes=10, n=4, methods=["alignmix_stage2"])
    assert [r["method"] for r in out["rows"]] == ["erm", "alignmix_stage2"]
    assert {p.device.type for m in built for p in m.parameters()} == {"meta"}
    built.clear()
    bench.run_gpu_bench(device="cpu", arch="resnet18", size=32, batch=2, warmup=0, steps=1,
                        num_classes=10, n=4, methods=["alignmix_stage2"])
    align = built[1]
    assert align.encoder2 is not None
    # weight, bias: the last two
    assert not torch.equal(align.encoder2.linear.weight.detach(), initial[1][-2])


# ----------------------------------------------------------------- 4. and 5. how many GPUs a
# process sees

def test_cuda_rng_state_resumes_on_fewer_visible_gpus(monkeypatch):
    """A checkpoint written by a process that sees 8 GPUs is resumed by one that sees 1 (SLURM, one
    GPU per task) or 4 (8 -> 4 GPUs). Shows, with a stand-in for `torch.cuda` that enforces torch's
    rule that a device index past the visible ones is an error: the state saved is the current
    device's alone and it is restored onto the current device. Cannot show: the real Philox
    generator state (its layout is torch's)."""
    FakeCuda(visible=8, current=3).install(monkeypatch)
    state = rt.rng_state()
    # device 3's state only
    assert torch.equal(state["cuda"], torch.tensor([3, 0], dtype=torch.uint8))
    for visible, current in ((1, 0), (4, 2)):
        fake = FakeCuda(visible, current).install(monkeypatch)
        rt.set_rng_state(state)
        assert torch.equal(fake.states[current], torch.tensor([3, 0], dtype=torch.uint8))
    # an older checkpoint: one state per device
    fake = FakeCuda(visible=2, current=1).install(monkeypatch)
    rt.set_rng_state({**state, "cuda": [torch.tensor([k, 7], dtype=torch.uint8)
                                        for k in range(8)]})
    assert fake.states[1].tolist() == [1, 7]


@pytest.mark.parametrize("visible,local_rank,expected",
                         [(8, 3, 3), (1, 3, 0), (1, 0, 0), (4, 0, 0)])
def test_auto_device_is_one_the_process_can_see(monkeypatch, visible, local_rank, expected):
    """`get_device("auto")` under torchrun (8 GPUs visible to every rank) and under SLURM with one
    GPU per task (each rank sees one GPU, its cuda:0). Shows: the device index is valid for what
    the process sees, and it becomes the current device. Cannot show: CUDA_VISIBLE_DEVICES itself
    (the stand-in sets the count)."""
    fake = FakeCuda(visible).install(monkeypatch)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    assert rt.get_device("auto") == torch.device("cuda", expected)
    assert fake.current == expected


def test_more_local_ranks_than_visible_gpus_is_an_error_naming_both(monkeypatch):
    FakeCuda(visible=2).install(monkeypatch)
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(RuntimeError, match="LOCAL_RANK=3 but this process sees 2 GPU"):
        rt.get_device("auto")


# ------------------------------------------------------------------------- 7. PuzzleMix saliency
# in fp16

def _confident_puzzlemix():
    """PuzzleMix on a ResNet-18 whose classifier is scaled until most of 8 images are classified
    with probability ~1, so that the input gradient of the loss is tiny (1e-20 to 1e-5)."""
    from pretrain.methods.puzzlemix import _puzzle_saliency

    torch.manual_seed(0)
    net = ResNetStages("resnet18", 10)
    method = build_method("puzzlemix", net, 10, solver="swap")
    images = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        labels = net.eval()(images).argmax(1)
        net.fc.weight.mul_(200)
        net.fc.bias.zero_()
    net.train()
    return method, images, labels, _puzzle_saliency


def test_puzzlemix_saliency_survives_fp16_autocast():
    """PuzzleMix's saliency pass under fp16 autocast (CPU autocast casts the convolutions to fp16
    as CUDA's does, so the underflow is the same). Shows: no saliency map of a confidently
    classified image is all zero (under fp16 3 of these 8 were before: their grid saliency was 0 /
    0 = NaN, cast to int32 graph-cut unaries), and the maps equal the fp32 ones. Cannot show:
    cuDNN's fp16 kernels' own rounding."""
    method, images, labels, saliency = _confident_puzzlemix()
    ref = saliency(method, images, labels)
    with torch.autocast("cpu", dtype=torch.float16):
        sal = saliency(method, images, labels)
    assert (ref.flatten(1).amax(1) > 0).all()
    assert (sal.flatten(1).amax(1) > 0).all()
    torch.testing.assert_close(sal, ref, rtol=1e-5, atol=0)
    grid = pz.saliency_grid(sal, 4)
    assert torch.isfinite(grid).all() and torch.allclose(grid.sum((1, 2)), torch.ones(8))


def test_an_all_zero_saliency_map_is_uniform_on_the_grid():
    """The guard for a saliency gradient that underflowed anyway: 0 / 0 would be NaN, cast to int32
    unaries (garbage masks, no error); a zero map is uniform over the grid blocks instead."""
    sal = torch.zeros(2, 8, 8)
    sal[1, :4, :4] = 2.0  # all of image 1's saliency in its top-left quarter
    grid = pz.saliency_grid(sal, 2)
    assert grid[0].tolist() == [[0.25, 0.25], [0.25, 0.25]]
    assert grid[1].tolist() == [[1.0, 0.0], [0.0, 0.0]]


# --------------------------------------------------------------------- 12. the fp32 blocks stay
# fp32 under autocast

def _in_bf16_autocast(fn, *args):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return fn(*args)


def _mixing_inputs():
    g = torch.Generator().manual_seed(0)
    b, c, n, r, d = 6, 7, 40, 5, 9
    logits = torch.randn(b, c, generator=g) * 4
    dense = torch.randn(b, c, r, generator=g) * 4
    labels = torch.randint(c, (b,), generator=g)
    y = shared.one_hot(labels, c)
    lam = shared.dirichlet_weights(b, n, generator=g)
    mhat, s = mm.dense_mix_weights(torch.rand(b, r, generator=g),
                                   shared.dirichlet_weights(b, n, generator=g, sets=r))
    z = torch.randn(b, d, r, generator=g)
    return logits, dense, labels, y, lam, mhat, s, z, torch.randn(c, d, generator=g)


@pytest.mark.parametrize("what", ["multimix_loss", "dense_loss_hard", "dense_loss_soft",
                                  "multimix_targets", "dense_targets", "gap_attention",
                                  "cam_attention"])
def test_mixing_math_is_fp32_inside_bf16_autocast(what):
    """The mixing functions whose math must be fp32, called inside bf16 autocast (CPU autocast
    casts matmul and einsum to bf16 exactly as CUDA autocast does). Shows: each gives its fp32
    value to fp32 rounding (before, a `.float()` operand was cast back to bf16: errors of 1e-3
    relative). Cannot show: TF32 (an Ampere/Hopper matmul mode, off by default for matmul in
    torch)."""
    logits, dense, labels, y, lam, mhat, s, z, w = _mixing_inputs()
    fn = {"multimix_loss": lambda: mm.multimix_loss_from_logits(logits, labels, lam),
          "dense_loss_hard": lambda: mm.dense_multimix_loss_from_logits(dense, labels, mhat, s),
          "dense_loss_soft": lambda: mm.dense_multimix_loss_from_logits(dense, y, mhat, s),
          "multimix_targets": lambda: refmath.multimix(z.flatten(1), y, lam)[1],
          "dense_targets": lambda: refmath.dense_multimix(z, y, torch.ones(6, 5) / 5,
                                                          shared.dirichlet_weights(
              6, 4, generator=torch.Generator().manual_seed(1), sets=5))[1],
          "gap_attention": lambda: mm.dense_attention(z, "gap_l1relu"),
          "cam_attention": lambda: mm.dense_attention(z, "cam_softmax", w, y)}[what]
    ref = fn()
    out = _in_bf16_autocast(fn)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_multimix_dense_loss_is_fp32_inside_bf16_autocast():
    """MultiMix's embedding path that forms the soft targets Lambda^T y and mixes the dense logits
    in the method itself (dense_loss), with the network's logits held fixed so that only the mixing
    runs under bf16 autocast.
    Shows: the loss equals the fp32 one to fp32 rounding. Cannot show: the network's own bf16
    error."""
    torch.manual_seed(0)
    method = build_method("multimix", ResNetStages("resnet18", 7), 7, n=40, prob=1.0,
                          dense_loss=True)
    method.generator = torch.Generator()
    g = torch.Generator().manual_seed(2)
    fixed = torch.randn(6, 7, 4, generator=g) * 4
    method.logits_of = lambda fmap: fixed
    method.model.features = lambda x: x
    images, labels = torch.rand(6, 3, 8, 8, generator=g), torch.randint(7, (6,), generator=g)
    losses = []
    for ctx in (torch.autocast("cpu", enabled=False), torch.autocast("cpu", dtype=torch.bfloat16)):
        method.seed(5)
        with ctx:
            losses.append(method(images, labels)["loss"])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)


# ------------------------------------------------------------ 8. detection augmentation per worker
# and per rank

class _Draws(torch.utils.data.Dataset):
    """Stands in for the detection train set: item i is the next draw of the (worker's copy of the)
    transform's albumentations generator, the one its random crops and flips draw from."""

    def __init__(self, transform, n: int):
        self.transform, self.n = transform, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return int(self.transform.augment.random_generator.integers(2**31)), i


def _draws_by_worker(task, epoch: int) -> list[list[int]]:
    draws = [b[0][0] for b in task.batches(epoch, 0)]  # batch k comes from worker k % 2
    return [draws[0::2], draws[1::2]]


def test_detection_augmentation_differs_between_workers_and_ranks(toy_world):
    """`DetectionTask`'s train loader with 2 DataLoader workers, as rank 0 and as rank 1 (the rank
    is set on the
    task: no process group is needed to build a loader). Shows: the two workers, the two ranks and
    two epochs draw different augmentation streams, and the same (epoch, rank) draws the same again
    (resumable). Before, the albumentations generator was seeded once in the parent: every worker
    and every rank repeated the same crops and flips. Cannot show: a DistributedSampler's shard
    (the draws here are the transform's only)."""
    from transfer.detection import torchvision_backend as tvb

    task = tvb.DetectionTask(_det_cfg(toy_world, workers=2), None, 0, torch.device("cpu"))
    task.train_set = _Draws(task.train_tf, 8)
    w0, w1 = _draws_by_worker(task, 0)
    assert w0 != w1
    assert _draws_by_worker(task, 0) == [w0, w1]
    assert _draws_by_worker(task, 1)[0] != w0
    task.rank = 1
    r1 = _draws_by_worker(task, 0)
    assert r1[0] != w0 and r1[1] != w1 and r1[0] != r1[1]


# -------------------------------------------------------------------------- 9. WSOL fine-tuning's
# shards

def _wsol_cfg(toy_world):
    from mixup_transfer.core.config import load_config
    from wsol.finetune import resolve_config

    meta = toy_world / "wsol_metadata" / "CUB"
    overrides = [f"data.image_root={toy_world / 'CUB_200_2011' / 'images'}",
                 f"data.metadata_root={meta}", "data.num_workers=0", "data.max_train=8",
                 "data.max_val=2", "input.resize=40", "input.crop=32", "input.test_size=32",
                 "optim.batch_per_process=2", "runtime.device=cpu", "model.arch=resnet18"]
    return resolve_config(load_config(str(Path(__file__).resolve().parents[1]
                                          / "configs/wsol/toy_multimix.yaml"),
                                      overrides))


def _indices(task, epoch: int) -> list[int]:
    return [i for indices, _ in task._loader(epoch) for i in indices.tolist()]


def test_wsol_ranks_train_on_disjoint_shards(toy_world, monkeypatch):
    """`WSOLTask`'s train loader as rank 0 and rank 1 of 2 (the process group's rank and size are
    stood in for: building a loader needs no communication). Shows: the two ranks read disjoint
    halves of the 8 images, a new epoch reorders them, and the same epoch gives the same shards
    (resumable). Before, every rank shuffled the whole set with the same generator: N copies of the
    same batches. Cannot show: DDP's gradient average."""
    from wsol import finetune

    cfg = _wsol_cfg(toy_world)
    shards = {}
    for rank in (0, 1):
        monkeypatch.setattr(finetune.ddist, "rank_world", lambda rank=rank: (rank, 2))
        task = finetune.WSOLTask(cfg, None, torch.device("cpu"))
        assert task.steps_per_epoch == 2  # 4 images per rank in batches of 2
        task.train_set = [(i, 0) for i in range(8)]  # item i: its index
        shards[rank] = [_indices(task, e) for e in (0, 1, 0)]
    assert len(shards[0][0]) == len(shards[1][0]) == 4
    assert not set(shards[0][0]) & set(shards[1][0])
    assert shards[0][0] == shards[0][2] and shards[0][0] != shards[0][1]


# ------------------------------------------------------------ 10. pretraining evaluation with rank
# 0's statistics

def _pretrain_cfg(root):
    from pretrain.task import resolve_config

    return resolve_config({
        "name": "t", "seed": 3,
        "data": {"root": str(root), "crop_size": 32, "val_resize": 36, "num_workers": 0,
                                         "max_train": 16, "max_val": 6},
        "model": {"arch": "resnet18"}, "method": {"name": "erm"},
        "optim": {"batch_size": 4, "epochs": 1}, "runtime": {"precision": "fp32", "flops": False}})


def _pretrain_task(root, rank: int, world: int):
    from pretrain.task import PretrainTask

    torch.manual_seed(0)
    task = PretrainTask(_pretrain_cfg(root), rank, world, torch.device("cpu"))
    bns = [m for m in task.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:  # each rank's own statistics, as after DDP training: those of its own last batch
        m.momentum = 1.0
    with torch.no_grad():
        task.net.train()(torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(rank))
                         * (1 + rank))
    for m in bns:
        m.momentum = 0.1
    return task


def _eval_worker(rank, world, port, root, out):
    _join(rank, world, port)
    metrics = _pretrain_task(root, rank, world).evaluate("fp32")
    torch.save(metrics, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_pretraining_evaluation_uses_rank_zeros_statistics(toy_world, tmp_path):
    """`PretrainTask.evaluate` in 2 gloo processes whose BatchNorm statistics differ (as after DDP
    training: DDP broadcasts rank 0's buffers only at the next forward). Shows: both ranks report
    the numbers of one process evaluating the whole val set with rank 0's model. Before, each rank
    scored its shard with its own statistics. Cannot show: SyncBatchNorm (not used in
    pretraining)."""
    _spawn(_eval_worker, str(toy_world / "imagenet"), str(tmp_path))
    one = _pretrain_task(toy_world / "imagenet", 0, 1).evaluate("fp32")
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["val_top1"] == one["val_top1"] and got["val_top5"] == one["val_top5"]
        assert got["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)


# ------------------------------------------------------------------------ 6. the GPU JPEG decode
# path

def _jpeg(seed: int, mode: str = "RGB") -> torch.Tensor:
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    im = Image.fromarray((rng.random((24, 20, 3)) * 255).astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def test_gpu_decode_falls_back_to_the_cpu_for_jpegs_nvjpeg_refuses(monkeypatch):
    """`decode_batch` with a CMYK JPEG among RGB ones, the batched device decoder replaced by a
    stand-in that refuses CMYK as nvJPEG does (the whole batch call fails) and decodes the rest
    with libjpeg-turbo. Shows: every image comes out, with the pixels of the CPU decoder. Before,
    one CMYK image in a batch stopped the run. Cannot show: nvJPEG's own pixels (make gpu-check
    compares them with the CPU decoder's)."""
    from torchvision import io as tio

    from pretrain import data as pdata

    datas = [_jpeg(0), _jpeg(1, "CMYK"), _jpeg(2)]
    cmyk = {datas[1].data_ptr()}
    real = tio.decode_jpeg

    def nvjpeg_like(items, mode, device=None):
        if device is None:  # the CPU decoder (mixup_transfer.core.data.decode_uint8)
            return real(items, mode=mode)
        if any(d.data_ptr() in cmyk for d in items):
            raise RuntimeError("nvjpegDecodeBatched failed: unsupported JPEG colour space")
        return real(items, mode=mode, device=device)

    monkeypatch.setattr(tio, "decode_jpeg", nvjpeg_like)
    params = torch.tensor([[0, 0, 24, 20, 0, 8]] * 3)
    out = pdata.decode_batch(datas, params, torch.device("cpu"))
    monkeypatch.setattr(tio, "decode_jpeg", real)
    ref = pdata.decode_batch(datas, params, torch.device("cpu"))
    assert out.shape == (3, 3, 8, 8) and torch.equal(out, ref)


class _Stream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits for {other.name}")


def test_gpu_decode_is_ordered_after_the_callers_queued_kernels(monkeypatch):
    """`decode_batch` on a CUDA device with stand-ins for torch.cuda's stream calls (recording what
    is called, in order) and for the decoder. Shows the contract: a side stream first waits for the
    caller's stream (so the decoder never writes memory that queued kernels still read), the decode
    runs with the side stream current (its outputs come from that stream's memory pool), the
    caller's stream then waits for the side stream, and every output is recorded on the caller's
    stream (not reused while the caller's kernels read it). Cannot show: nvJPEG's real stream
    behaviour (make gpu-check runs it)."""
    import contextlib

    from torchvision import io as tio

    from pretrain import data as pdata

    log: list[str] = []
    current, side = _Stream("current", log), _Stream("side", log)
    active = [current]

    @contextlib.contextmanager
    def stream(s):
        active.append(s)
        log.append(f"enter {s.name}")
        yield
        active.pop()
        log.append(f"exit {s.name}")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "Stream", lambda *args, **kwargs: side)
    monkeypatch.setattr(pdata, "_SIDE_STREAMS", {}, raising=False)
    monkeypatch.setattr(tio, "decode_jpeg", lambda items, mode, device: (
        log.append(f"decode on {active[-1].name}") or [torch.zeros(3, 2, 2) for _ in items]))
    monkeypatch.setattr(torch.Tensor,
                        "record_stream", lambda self, s: log.append(f"record on {s.name}"),
                        raising=False)
    out = pdata.decode_batch([_jpeg(0), _jpeg(1)], torch.tensor([[0, 0, 2, 2, 0, 2]] * 2),
                             torch.device("cuda", 0))
    assert out.shape == (2, 3, 2, 2)
    assert log == ["side waits for current", "enter side", "decode on side", "exit side",
                   "current waits for side", "record on current", "record on current"]


# ------------------------------------------------------------------ 13. host-to-device copies that
# would wait

class CopyCounter:
    """Records every `Tensor.to` / `Tensor.copy_` that moves a host tensor to a CUDA device, with
    whether it may run asynchronously (non_blocking=True; the loaders pin their batches, so such a
    copy does not wait)."""

    def __init__(self, monkeypatch):
        self.blocking: list[str] = []
        to, copy = torch.Tensor.to, torch.Tensor.copy_

        def counted_to(t, *args, **kwargs):
            target = [a for a in list(args) + [kwargs.get("device")]
                      if isinstance(a, (str, torch.device))]
            cuda = any(torch.device(a).type == "cuda" for a in target)
            non_blocking = kwargs.get("non_blocking", any(a is True for a in args))
            if cuda and t.device.type == "cpu" and not non_blocking:
                self.blocking.append(f"to{tuple(t.shape)}")
            return to(t, *args, **kwargs)

        def counted_copy(t, src, non_blocking=False):
            if t.device.type == "cuda" and src.device.type == "cpu" and not non_blocking:
                self.blocking.append(f"copy_{tuple(src.shape)}")
            return copy(t, src, non_blocking)

        monkeypatch.setattr(torch.Tensor, "to", counted_to)
        monkeypatch.setattr(torch.Tensor, "copy_", counted_copy)


def test_a_batch_reaches_a_cuda_device_without_a_blocking_copy(monkeypatch):
    """`batch_to_device` of a uint8 batch with the ImageNet recipe's colour jitter and lighting
    parameters, onto a fake CUDA device (FakeTensorMode: the copies are dispatched as on CUDA, no
    data moves). Shows: every host-to-device copy is non-blocking (before, the colour parameters
    were copied with a blocking `.to` every step), and the images arrive as float channels_last.
    Cannot show: that the source memory is pinned (the DataLoader's pin_memory does that on CUDA)
    or the copy's real overlap with compute."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pretrain.data import batch_to_device

    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    labels, color = torch.tensor([0, 1, 2, 3]), torch.rand(4, 10)
    counter = CopyCounter(monkeypatch)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x, y = batch_to_device((images, labels, color), torch.device("cuda", 0), True)
        assert x.device.type == "cuda" and x.dtype == torch.float32 and y.device.type == "cuda"
        assert x.is_contiguous(memory_format=torch.channels_last)
    assert counter.blocking == []


# ------------------------------------------------------------------ 11. DALI's pipeline: seeds,
# builds, resets

class StubDali:
    """A stand-in for DALI (not installed here) behind `pretrain.dali`'s two seams: `_pipeline`
    records each build (its seed) and returns the external source; `_iterator` follows
    DALIGenericIterator's contract over it: batch k of the pipeline's epoch e is
    `source(BatchInfo(k, e))` until the source raises StopIteration, then the iteration ends and
    `reset()` starts epoch e + 1. Images are the first byte of each file."""

    def __init__(self, monkeypatch):
        from pretrain import dali

        self.seeds: list[int] = []
        monkeypatch.setattr(dali, "_pipeline", lambda source, *args: self.seeds.append(args[-1])
                            or source)
        monkeypatch.setattr(dali, "_iterator", StubDali.Iterator)

    class Iterator:
        def __init__(self, source):
            self.source, self.epoch_idx, self.iteration, self.ended = source, 0, 0, False

        def __iter__(self):
            return self

        def __next__(self):
            from types import SimpleNamespace

            try:
                files, labels = self.source(SimpleNamespace(iteration=self.iteration,
                                                            epoch_idx=self.epoch_idx))
            except StopIteration:
                self.ended = True
                raise
            self.iteration += 1
            return [{"images": torch.tensor([int(f[0]) for f in files]),
                     "labels": torch.tensor(np.concatenate(labels)).view(-1, 1)}]

        def reset(self):
            assert self.ended, "DALI resets an iterator only at the end of its epoch"
            self.epoch_idx, self.iteration, self.ended = self.epoch_idx + 1, 0, False


def _dali_loader(tmp_path, rank: int = 0):
    """16 one-byte files (file i holds byte i, label i % 3), this rank's half of batches of 4:
    micro-batches of 2."""
    from pretrain import dali
    from pretrain.data import EpochSampler

    samples = []
    for i in range(16):
        (tmp_path / f"{i}.jpg").write_bytes(bytes([i]))
        samples.append((str(tmp_path / f"{i}.jpg"), i % 3))
    sampler = EpochSampler(16, 4, rank, 2, seed=0)
    return dali.DaliTrainLoader(samples, sampler, 8, 0.08, True, 2, torch.device("cuda", 0),
                                seed=0), sampler


def _dali_epoch(loader, sampler, epoch: int, start: int = 0, stop_after: int | None = None):
    """(images, labels) of one epoch read through the loader, and the sampler's own order for
    it."""
    sampler.set_epoch(epoch, start)
    expected = [index for index, _ in sampler]
    images, labels = [], []
    for k, (x, y) in enumerate(loader):
        if k == stop_after:
            break
        images += x.tolist()
        labels += y.tolist()
    return (images, labels), (expected, [i % 3 for i in expected])


def test_dali_pipeline_is_built_once_and_reset_each_epoch(tmp_path, monkeypatch):
    """`DaliTrainLoader` over 3 epochs with the stand-in pipeline. Shows: one build, two resets,
    and each epoch reads exactly this rank's files and labels in `EpochSampler`'s order of that
    epoch (whole micro-batches), different orders in different epochs. Cannot show: DALI's decoding
    and its random streams."""
    stub = StubDali(monkeypatch)
    loader, sampler = _dali_loader(tmp_path)
    epochs = [_dali_epoch(loader, sampler, e) for e in range(3)]
    for got, expected in epochs:
        assert got == expected and len(got[0]) == 8
    assert epochs[0][0] != epochs[1][0] != epochs[2][0]
    assert len(stub.seeds) == 1 and loader.builds == 1


def test_dali_pipeline_is_built_again_after_a_resume_or_an_unfinished_epoch(tmp_path, monkeypatch):
    """A resume at epoch 1, step 1, then epoch 2 read whole, epoch 3 left after one micro-batch,
    then epoch 4.
    Shows: the build at the resume is seeded by (seed, rank, 1, 1) and reads the epoch's remaining
    files, epoch 2 reuses the pipeline, epoch 4 needs a new one (an unfinished epoch cannot be
    reset), seeded by epoch 4, and every epoch reads the sampler's order. Cannot show: DALI's own
    reset rules beyond this contract."""
    from pretrain.dali import dali_seed

    stub = StubDali(monkeypatch)
    loader, sampler = _dali_loader(tmp_path)
    got, expected = _dali_epoch(loader, sampler, 1, start=1)
    assert got == expected and len(got[0]) == 6
    got, expected = _dali_epoch(loader, sampler, 2)
    assert got == expected and loader.builds == 1
    got, expected = _dali_epoch(loader, sampler, 3, stop_after=1)
    assert got[0] == expected[0][:2]
    got, expected = _dali_epoch(loader, sampler, 4)
    assert got == expected
    assert stub.seeds == [dali_seed(0, 0, 1, 1), dali_seed(0, 0, 4, 0)]


def test_dali_draws_differ_between_ranks_and_epochs(tmp_path, monkeypatch):
    """The seed `DaliTrainLoader` gives the pipeline it builds, read by the stand-in. Shows: rank 0
    and rank 1 get different seeds (every rank draws its own crops and flips), a pipeline built at
    another epoch gets another seed, and a repeat is equal. Cannot show: DALI's own random
    streams."""
    stub = StubDali(monkeypatch)

    def seed_of(rank, epoch):
        loader, sampler = _dali_loader(tmp_path, rank)
        _dali_epoch(loader, sampler, epoch)
        return stub.seeds[-1]

    s00, s10, s01 = seed_of(0, 0), seed_of(1, 0), seed_of(0, 1)
    assert s00 != s10 and s00 != s01 and seed_of(1, 0) == s10


def test_pretraining_keeps_one_dali_loader_across_epochs(toy_world, tmp_path, monkeypatch):
    """`PretrainTask.batches` for 3 epochs with `data.loader: dali` (the task built on the CPU,
    then switched to DALI; the stand-in pipeline). Shows: the task keeps one loader, its pipeline
    is built once, and the labels of each epoch are those of the sampler's order. Cannot show: DALI
    on a GPU (`make gpu-check`)."""
    stub = StubDali(monkeypatch)
    task = _pretrain_task(toy_world / "imagenet", 0, 1)
    task.loader, task.device = "dali", torch.device("cuda", 0)
    loaders = []
    for epoch in range(3):
        loaders.append(task.batches(epoch, 0))
        labels = [y for _, ys in loaders[-1] for y in ys.tolist()]
        assert labels == [task.train_set.samples[i][1] for i, _ in task.sampler]
    assert loaders[0] is loaders[1] is loaders[2]
    assert len(stub.seeds) == 1


# ------------------------------------------------------------------------------------- throughput
# settings

def test_workers_and_graph_cut_threads_follow_the_cpus_the_process_may_use(monkeypatch):
    """DataLoader workers and PuzzleMix's graph-cut threads with 8 usable CPUs (the affinity mask
    SLURM or taskset gives, whatever the machine has) shared by 2 processes on the node. Shows: 3
    workers each (4 CPUs, one left to the main process) and 4 graph-cut threads. Before, the thread
    pool took the machine's CPU count. Cannot show: the throughput itself."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert rt.usable_cpus() == 8 and rt.default_workers() == 3 and rt.default_workers(cap=2) == 2
    pools = []
    monkeypatch.setattr(graphcut, "_pool", lambda threads: pools.append(threads) or __import__(
        "concurrent.futures").futures.ThreadPoolExecutor(threads))
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    unary, dist, w_v, w_h = pz.puzzle_energy(*_puzzle_terms(6), lam=0.5)
    graphcut.grid_labels(unary, dist, w_v, w_h, solver="swap")
    assert pools == [4]


def _puzzle_terms(b: int):
    g = torch.Generator().manual_seed(0)
    sal = pz.saliency_grid(torch.rand(b, 8, 8, generator=g), 2)
    dv, dh = pz.boundary_differences(torch.rand(b, 3, 8, 8, generator=g),
                                     torch.rand(b, 3, 8, 8, generator=g), 2)
    return sal, sal.flip(0), dv, dh


def test_cuda_settings_autotune_and_keep_torchs_tf32_policy(monkeypatch):
    """`configure_cuda` (pretraining calls it on CUDA): cuDNN autotuning on for fixed-size
    training, and the TF32 policy stated in its docstring is torch's default (matmul fp32, cuDNN
    convolutions TF32). Shows the flags; cannot show their speed."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    rt.configure_cuda(benchmark=True)
    assert torch.backends.cudnn.benchmark is True
    assert (
        torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is True
    )


# -------------------------------------------------------- every method's forward on fake CUDA,
# bf16 and fp16

FORWARD_CASES = [
    ("erm", {}), ("input_mixup", {}), ("manifold_mixup", {}), ("cutmix", {}),
    ("multimix", {"n": 50}), ("multimix", {"n": 8, "layer": 2}), ("dense_multimix", {"n": 50}),
    ("multi_interp", {"base": "input", "k": 3}), ("multi_interp", {"base": "cutmix", "k": 3}),
    ("alignmix", {}), ("alignmix_stage2", {"resolution": 1}),
    ("alignmix_ae", {"resolution": 1, "decoder_size": 16}),
]


def _cuda_autocast(dtype):
    """torch.autocast("cuda") built where torch sees no GPU (its constructor asks torch.cuda
    whether one exists and whether it has bf16; once built it only sets the dispatcher's flags,
    which fake CUDA tensors obey)."""
    from unittest import mock

    with mock.patch.object(torch.cuda, "is_available", lambda: True), \
            mock.patch.object(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True):
        return torch.autocast("cuda", dtype=dtype)


@pytest.mark.parametrize("name,knobs", FORWARD_CASES, ids=[f"{n}-{'-'.join(map(str, k.values()))}"
                                                           for n, k in FORWARD_CASES])
def test_every_method_forward_on_fake_cuda_in_bf16_and_fp16(monkeypatch, name, knobs):
    """Each method's training forward on fake CUDA tensors (FakeTensorMode: CUDA's devices, dtypes
    and memory formats, no values), channels_last, under CUDA autocast in bf16 and in fp16. Shows:
    it runs on the device (no CPU tensor meets a CUDA one, no value is read back), the network
    computes in the autocast dtype in channels_last while the loss is fp32, and no host-to-device
    copy is blocking. Cannot show: numbers, the backward pass (autograd's CUDA threads need a
    driver), PuzzleMix (its graph cut reads the saliency back to the host, which fake tensors
    cannot; CPU autocast covers its fp16 saliency above) and the speed."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    # needs a driver
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *args, **kwargs: self)
    for dtype in (torch.bfloat16, torch.float16):
        torch.manual_seed(0)
        # real: fake ones cannot move
        method = build_method(name, ResNetStages("resnet18", 10), 10, **knobs)
        with FakeTensorMode(allow_non_fake_inputs=True):
            method.to("cuda", memory_format=torch.channels_last)
            method.generator = None  # a CUDA generator needs a driver; draws use the default one
            method.seed(0)
            x = (
                torch.rand(4, 3, 32, 32)
                .to("cuda", non_blocking=True)
                .contiguous(memory_format=torch.channels_last)
            )
            y = torch.randint(10, (4,)).to("cuda", non_blocking=True)
            counter = CopyCounter(monkeypatch)
            with _cuda_autocast(dtype):
                out = method(x, y)
                fmap = method.model.features(x)
            monkeypatch.undo()  # the counter and the pin_memory stand-in
            monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *args, **kwargs: self)
        assert out["loss"].device.type == "cuda" and out["loss"].dtype == torch.float32
        assert fmap.dtype == dtype and fmap.is_contiguous(memory_format=torch.channels_last)
        assert counter.blocking == [], counter.blocking


def test_pretraining_evaluation_copies_nothing_from_the_host_per_batch(toy_world, monkeypatch):
    """`PretrainTask.evaluate` over 6 toy val images (batches of 4 and 2), with `torch.tensor`
    watched for host values sent to a device (on CUDA a `torch.tensor(x, device=...)` is a blocking
    copy: one per batch before). Shows: none in the loop, and the metrics come from one read at the
    end. Cannot show: the CUDA copy itself."""
    task = _pretrain_task(toy_world / "imagenet", 0, 1)
    real, made = torch.tensor, []

    def watched(*args, **kwargs):
        if kwargs.get("device") is not None:
            made.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", watched)
    metrics = task.evaluate("fp32")
    monkeypatch.undo()
    assert made == []
    assert 0 <= metrics["val_top1"] <= metrics["val_top5"] <= 100


def test_fp32_robustness_evaluation_turns_tf32_off_on_cuda():
    """Can show: an fp32 robustness evaluation on a CUDA device runs with cuDNN's and matmul's TF32
    off (torch's default rounds cuDNN convolutions to TF32 on Ampere and newer) and restores the
    settings; bf16 and CPU runs are left alone. Cannot show: the kernels cuDNN then picks."""
    from transfer.robustness.evaluate import exact_fp32

    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, True
        with exact_fp32(torch.device("cuda"), "fp32"):
            assert (torch.backends.cudnn.allow_tf32,
                    torch.backends.cuda.matmul.allow_tf32) == (False, False)
        assert (torch.backends.cudnn.allow_tf32,
                torch.backends.cuda.matmul.allow_tf32) == (True, True)
        for device, precision in ((torch.device("cuda"), "bf16"), (torch.device("cpu"), "fp32")):
            with exact_fp32(device, precision):
                assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


# ----------------------------------------------------------------------------- torch.compile's
# graphs per stage

def _three_stage_backbone():
    from pretrain.adapters import from_sequential

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4),
                              torch.nn.ReLU(), torch.nn.Conv2d(4, 8, 3, stride=2, padding=1),
                              torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(8, 5))
    return from_sequential(net, [2, 4, 5], mean=[0.5] * 3, std=[0.25] * 3)


def _run_compiled(backbone, batches=(4, 6)):
    """Every stage at each batch size, with gradients and without; -> the logits, in order."""
    g, out = torch.Generator().manual_seed(1), []
    for b in batches:
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                out.append(backbone(torch.rand(b, 3, 8, 8, generator=g)).detach())
    return out


def test_compiled_stages_stay_within_the_recompile_limit(caplog):
    """`Backbone.enable_compile` with dynamo's "eager" backend (dynamo's tracing and guards as on
    CUDA, no code generation) on a 3-stage network, run at batch sizes 4 and 6, with and without
    gradients, with `recompile_limit` 2. Shows: each stage is a region with its own graphs (2 each:
    one per grad mode, the batch size dynamic), so 6 graphs in all, nothing falls back to eager,
    nothing is warned, and the logits equal the uncompiled network's. Cannot show: inductor's
    kernels or CUDA graphs."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from pretrain.adapters import recompile_limit_hits

    eager = _run_compiled(_three_stage_backbone())
    backbone = _three_stage_backbone()
    torch._dynamo.reset()
    graphs, hits = counters["stats"]["unique_graphs"], recompile_limit_hits()
    backbone.enable_compile(backend="eager")
    with (
        torch._dynamo.config.patch(recompile_limit=2),
        caplog.at_level("WARNING", logger="pretrain.adapters"),
    ):
        compiled = _run_compiled(backbone)
    assert counters["stats"]["unique_graphs"] - graphs == 6
    assert recompile_limit_hits() == hits and backbone.compile_fallbacks == 0
    assert caplog.records == []
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_compiled_stage_that_falls_back_to_eager_is_reported(caplog):
    """The same network with `recompile_limit` 1: each stage's first graph is the training one, and
    the evaluation call (no gradients) would need a second. Shows: dynamo gives up on each of the 3
    stages, each is logged as a warning naming it, `compile_fallbacks` counts 3, and the logits are
    still the network's. Cannot show: the speed lost."""
    import torch._dynamo

    eager = _run_compiled(_three_stage_backbone(), batches=(4,))
    backbone = _three_stage_backbone()
    torch._dynamo.reset()
    backbone.enable_compile(backend="eager")
    with (
        torch._dynamo.config.patch(recompile_limit=1),
        caplog.at_level("WARNING", logger="pretrain.adapters"),
    ):
        compiled = _run_compiled(backbone, batches=(4,))
    assert backbone.compile_fallbacks == 3
    messages = [r.getMessage() for r in caplog.records if r.name == "pretrain.adapters"]
    assert [m.split(" of ")[0] for m in messages] == [f"torch.compile: stage {i}"
                                                      for i in (1, 2, 3)]
    assert all("recompile_limit (1 graphs)" in m for m in messages)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_copy_of_a_compiled_backbone_runs_its_own_stages():
    """A deep copy of a compiled backbone (as the FLOP count in the pretraining log header makes),
    whose first convolution is then zeroed. Shows: the copy is uncompiled and computes with its own
    weights (the bias of the zeroed convolution alone reaches the head), the original is unchanged
    and still compiled. Cannot show: inductor's code."""
    import copy

    backbone = _three_stage_backbone()
    backbone.enable_compile(backend="eager")
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = backbone(x)
        twin = copy.deepcopy(backbone)
        twin.net[0].weight.zero_()
        expected = _three_stage_backbone()
        expected.net[0].weight.zero_()
        torch.testing.assert_close(twin(x), expected(x))
        assert not torch.allclose(twin(x), before)
        torch.testing.assert_close(backbone(x), before)
    assert twin._compiled is None and backbone._compiled is not None
