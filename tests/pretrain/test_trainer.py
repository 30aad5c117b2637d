"""Pretraining (pretrain.task on mixup_transfer.core.engine): schedules, the resumable sampler, the
batch plan, an end-to-end toy run, exact resumption, non-finite loss handling and a 2-process gloo
DDP run."""

import json
import os
import socket

import pytest
import torch
import yaml

from mixup_transfer.core.checkpoint import load_backbone
from mixup_transfer.core.runtime import NonFiniteLossError
from mixup_transfer.core.schedule import lr_factor as schedule_factor
from pretrain.data import EpochSampler
from pretrain.task import DEFAULTS, batch_plan, build, finish, train


def lr_factor(epoch, o):
    return schedule_factor(epoch, o["schedule"], total=o["epochs"], milestones=o["milestones"],
                           gamma=o["gamma"], points=o["points"], min_factor=o["min_factor"],
                           warmup=o["warmup_epochs"], warmup_start=o["warmup_start"])


def tiny_cfg(root, **method):
    return {
        "name": "t", "seed": 3,
        "data": {"root": str(root), "crop_size": 32, "val_resize": 36, "num_workers": 0,
                 "max_train": 48, "max_val": 20},
        "model": {"arch": "resnet18"},
        "method": {"name": "input_mixup", **method},
        "optim": {"batch_size": 8, "epochs": 2, "lr": 0.05, "schedule": "cosine",
                  "warmup_epochs": 0.5},
        "runtime": {"precision": "fp32", "log_every_steps": 2, "flops": False, "figures": False},
    }


def test_lr_schedules_by_hand():
    o = dict(DEFAULTS["optim"])
    assert lr_factor(74.9, o) == 1.0 and lr_factor(75, o) == pytest.approx(0.1)
    assert lr_factor(230, o) == pytest.approx(1e-3)
    o.update(schedule="cosine", epochs=10, min_factor=0.0)
    assert lr_factor(5, o) == pytest.approx(0.5) and lr_factor(10, o) == pytest.approx(0.0)
    o.update(warmup_epochs=2, warmup_start=0.0)
    assert lr_factor(1, o) == pytest.approx(
        0.5 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi / 10)).item())
    )
    pts = [[0, 0.5], [8, 1.0], [15, 0.125], [15, 0.2], [40, 0.02]]
    o = dict(DEFAULTS["optim"], schedule="piecewise", points=pts)
    assert lr_factor(4, o) == pytest.approx(0.75) and lr_factor(15, o) == pytest.approx(0.2)
    assert lr_factor(27.5, o) == pytest.approx(0.11) and lr_factor(50, o) == pytest.approx(0.02)


def test_sampler_shards_and_resumes():
    s0, s1 = EpochSampler(50, 8, 0, 2, seed=1), EpochSampler(50, 8, 1, 2, seed=1)
    a, b = [i for i, _ in s0], [i for i, _ in s1]
    assert s0.steps == 6 and len(a) == len(b) == 24 and not set(a) & set(b)
    s0.set_epoch(0, start_step=2)
    assert [i for i, _ in s0] == a[8:]
    s0.set_epoch(1)
    assert [i for i, _ in s0] != a  # a new order each epoch
    with pytest.raises(ValueError, match="larger than"):
        EpochSampler(5, 8, 0, 2)


def test_sampler_position_is_kept_in_samples_across_world_sizes():
    """After 2 steps of global batch 8, one process or four visit exactly the same remaining
    samples."""
    one = EpochSampler(50, 8, 0, 1, seed=4)
    one.set_epoch(0, start_step=2)
    rest = [i for i, _ in one]
    four = []
    for r in range(4):
        s = EpochSampler(50, 8, r, 4, seed=4)
        s.set_epoch(0, start_step=2)
        four.append([i for i, _ in s])
    assert len(rest) == 32 and sorted(rest) == sorted(sum(four, []))
    assert [rest[k] for k in range(1, 32, 4)] == four[1]  # rank r takes every 4th, from r


def test_batch_plan_by_hand():
    o = dict(DEFAULTS["optim"])
    assert batch_plan(o, 8) == {"world_size": 8, "global_batch": 256, "per_process_batch": 32,
                                "accumulate": 1, "micro_batch": 32}
    o.update(max_batch_per_process=12)  # 32 per process, at most 12 at once: 4 micro-batches of 8
    assert batch_plan(o, 8)["accumulate"] == 4 and batch_plan(o, 8)["micro_batch"] == 8
    o = dict(DEFAULTS["optim"], batch_size=None, batch_per_process=128)  # MultiMix's b per GPU
    assert batch_plan(o, 4)["global_batch"] == 512
    with pytest.raises(ValueError, match="divisible"):
        batch_plan(dict(DEFAULTS["optim"]), 3)
    with pytest.raises(ValueError, match="exactly one"):
        batch_plan(dict(DEFAULTS["optim"], batch_per_process=64), 1)
    with pytest.raises(ValueError, match="does not divide"):
        batch_plan(dict(DEFAULTS["optim"], accumulate=3), 1)


@pytest.mark.slow
def test_toy_run_writes_the_run_folder(toy_world, tmp_path, capsys):
    """Through the CLI: YAML with _BASE_, KEY=VALUE overrides, the run folder in the contract
    layout."""
    import importlib.util
    from pathlib import Path

    cfg = tiny_cfg(toy_world / "imagenet")
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "cfg.yaml").write_text("_BASE_: base.yaml\nname: cli\n")
    tool = Path(__file__).resolve().parents[2] / "tools" / "run_pretrain.py"
    spec = importlib.util.spec_from_file_location("pretrain_cli", tool)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    run = tmp_path / "run"
    assert cli.main(["--config", str(tmp_path / "cfg.yaml"), "runtime.flops=true",
                     "runtime.figures=true", "--run-dir", str(run)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    for f in ("config.yaml", "log.jsonl", "checkpoints/last.pth", "backbone.pth", "metrics.json",
              "figures/curves.png"):
        assert (run / f).is_file(), f
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    head = lines[0]
    assert (
        head["event"] == "header" and head["params"] == 11181642 and head["flops_per_image"] > 1e7
    )
    assert [x["epoch"] for x in lines if x["event"] == "epoch"] == [1, 2]
    assert yaml.safe_load((run / "config.yaml").read_text())["method"]["name"] == "input_mixup"
    state = load_backbone(run / "backbone.pth", arch="resnet18")
    assert "fc.weight" not in state and "layer4.1.bn2.running_var" in state
    assert json.loads((run / "metrics.json").read_text())["val_top1"] == metrics["val_top1"]
    assert 0 <= metrics["val_top1"] <= 100 and metrics["steps"] == 12


@pytest.mark.slow
def test_resume_is_exact(toy_world, tmp_path):
    cfg = tiny_cfg(toy_world / "imagenet", alpha=1.0)
    cfg["method"] = {"name": "multimix", "n": 50, "prob": 0.5}
    cfg["runtime"]["checkpoint_every_steps"] = 2
    train(cfg, tmp_path / "a")
    stopped = dict(cfg, runtime=dict(cfg["runtime"], stop_after_steps=3))
    # killed after step 3; checkpoint at 2
    assert train(stopped, tmp_path / "b") == {"stopped_at_step": 3}
    state = torch.load(tmp_path / "b/checkpoints/last.pth", weights_only=True)
    # the method's host stream
    assert state["step"] == 2 and state["task"]["host_rng"]["bit_generator"] == "PCG64"
    train(cfg, tmp_path / "b", resume=True)
    a = torch.load(tmp_path / "a/backbone.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "b/backbone.pth", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = (tmp_path / "b/log.jsonl").read_text()
    assert '"event": "resume"' in logs


def test_non_finite_loss_stops_naming_the_step(toy_world, tmp_path):
    cfg = tiny_cfg(toy_world / "imagenet")
    cfg["optim"].update(epochs=1, lr=1e30, warmup_epochs=0)
    cfg["method"] = {"name": "erm"}
    cfg["data"]["max_train"] = 32
    with pytest.raises(NonFiniteLossError, match=r"at step \d+"):
        train(cfg, tmp_path / "nan")
    assert not (tmp_path / "nan/backbone.pth").exists()
    assert '"event": "error"' in (tmp_path / "nan/log.jsonl").read_text()


def test_config_errors(toy_world, tmp_path):
    from mixup_transfer.core.config import ConfigError

    cfg = tiny_cfg(toy_world / "imagenet")
    cfg["optim"]["lrr"] = 1
    with pytest.raises(ConfigError, match="lrr"):
        build(cfg, tmp_path)
    cfg = tiny_cfg(toy_world / "imagenet", beta=3)
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \[.method.beta.\] for method "
                       r".input_mixup."):
        build(cfg, tmp_path)


def test_classifier_learning_rate_group(toy_world, tmp_path):
    cfg = tiny_cfg(toy_world / "imagenet")
    cfg["optim"].update(lr=0.01, lr_classifier=0.1)
    task, engine = build(cfg, tmp_path)
    groups = {g["name"]: g for g in engine.optimizer.param_groups}
    assert groups["classifier"]["initial_lr"] == 0.1 and groups["backbone"]["initial_lr"] == 0.01
    assert {id(p) for p in groups["classifier"]["params"]} == {
        id(p) for p in task.net.fc.parameters()
    }


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, cfg, run_dir, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MT_NO_PROGRESS="1")
    torch.set_num_threads(1)
    task, engine = build(cfg, run_dir)
    engine.fit(header=task.header(engine))
    finish(task, engine)
    torch.save(task.net.net.state_dict(), os.path.join(out_dir, f"rank{rank}.pth"))
    import torch.distributed as dist

    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_gloo(toy_world, tmp_path):
    import torch.multiprocessing as mp

    cfg = tiny_cfg(toy_world / "imagenet")
    cfg["method"] = {"name": "multimix", "n": 30, "prob": 1.0}
    cfg["optim"]["epochs"] = 1
    cfg["optim"]["batch_size"] = 16  # global: 8 per process
    cfg["data"]["max_train"] = 32  # 32 / 16 = 2 steps
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg, str(tmp_path / "run"), str(tmp_path)),
             nprocs=2)
    a, b = torch.load(tmp_path / "rank0.pth"), torch.load(tmp_path / "rank1.pth")
    # parameters stay identical through DDP's gradient all-reduce (BN running stats are per process
    # after the last step; DDP re-broadcasts rank 0's at the next forward)
    params = [k for k in a if "running" not in k and "num_batches" not in k]
    assert len(params) == 62 and all(torch.equal(a[k], b[k]) for k in params)
    assert (tmp_path / "run/backbone.pth").is_file()
    head = json.loads((tmp_path / "run/log.jsonl").read_text().splitlines()[0])
    assert head["world_size"] == 2 and head["steps_per_epoch"] == 2


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_method_heads_stats_and_solver_reach_the_run(toy_world, tmp_path):
    """AlignMix/AE with the paper's fc head: evaluation uses the method's head, the Sinkhorn
    marginal errors reach log.jsonl, the exported backbone keeps torchvision's keys (no encoder2 /
    decoder); the header names the PuzzleMix solver."""
    import torchvision

    from pretrain.methods import have_gco

    cfg = tiny_cfg(toy_world / "imagenet", name="alignmix_ae", resolution=1, decoder_size=32,
                   modes=["feat", "clean"])
    cfg["optim"]["epochs"] = 1
    run = tmp_path / "ae"
    train(cfg, run)
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    head = next(r for r in lines if r["event"] == "header")
    assert head["puzzlemix_solver"] == ("gco" if have_gco() else
                                        "swap (built-in alpha-beta swap; gco-wrapper not "
                                        "installed)")
    steps = [r for r in lines if r["event"] == "step"]
    assert any("stat_sinkhorn_row_err" in r for r in steps) or any("stat_recon_mse" in r
                                                                   for r in steps)
    epoch = next(r for r in lines if r["event"] == "epoch")
    assert 0 <= epoch["val_top1"] <= 100
    raw = torch.load(run / "backbone.pth", weights_only=True)
    keys = list(raw.get("state_dict", raw))
    assert not any("encoder2" in k or "decoder" in k for k in keys)
    # the checkpoint and the metrics name the published form the run reproduced (AlignMix has
    # several)
    assert raw["meta"]["method_variant"].startswith("paper section 4 / Algorithm 1")
    assert (
        json.loads((run / "metrics.json").read_text())["method_variant"]
        == raw["meta"]["method_variant"]
    )
    sd = load_backbone(run / "backbone.pth", arch="resnet18")
    ref = [k for k in torchvision.models.resnet18(num_classes=10).state_dict()
           if not k.startswith("fc.")]
    assert list(sd) == ref


def _ddp_stop_worker(rank, world, port, cfg, run_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MT_NO_PROGRESS="1")
    torch.set_num_threads(1)
    task, engine = build(cfg, run_dir)
    engine.fit()
    import torch.distributed as dist

    dist.destroy_process_group()


@pytest.mark.slow
def test_resume_with_another_world_size(toy_world, tmp_path):
    """Two processes stop after step 1 of 4 (global batch 16); one process resumes at step 1 and
    finishes the run (the epoch position is kept in samples:
    test_sampler_position_is_kept_in_samples_across_world_sizes)."""
    import torch.multiprocessing as mp

    cfg = tiny_cfg(toy_world / "imagenet")
    cfg["method"] = {"name": "erm"}
    cfg["optim"].update(epochs=1, batch_size=16)
    cfg["data"]["max_train"] = 64  # 64 / 16 = 4 steps
    cfg["runtime"].update(checkpoint_every_steps=1)
    # checkpoint at step 1, then stop
    stopped = dict(cfg, runtime=dict(cfg["runtime"], stop_after_steps=1))
    mp.spawn(_ddp_stop_worker, args=(2, _free_port(), stopped, str(tmp_path / "run")), nprocs=2)
    state = torch.load(tmp_path / "run/checkpoints/last.pth", weights_only=True)
    assert state["step"] == 1 and state["world_size"] == 2
    metrics = train(cfg, tmp_path / "run", resume=True)
    assert metrics["steps"] == 4
    log = [json.loads(x) for x in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert any(r["event"] == "resume" and r["step"] == 1 for r in log)


def test_precise_bn_gives_the_clean_batches_population_statistics(toy_world, tmp_path):
    """`recompute_bn_statistics`: bn1's running mean / variance become the mean and (biased)
    variance of conv1's output over the first n clean train batches of the epoch, pooled over
    images and positions (computed here from the same batches); n = 0 keeps the running statistics;
    n is capped at the batches of an epoch."""
    from mixup_transfer.core.constants import IMAGENET_MEAN, IMAGENET_STD

    cfg = tiny_cfg(toy_world / "imagenet")
    cfg["precise_bn_batches"] = 2
    task, _ = build(cfg, tmp_path)
    net = task.net.net
    bn = net.bn1
    bn.running_mean.fill_(5.0)
    assert task.recompute_bn_statistics(1, "fp32") == 2
    batches = [task.to_device(b, task.device, False)[0]
               for _, b in zip(range(2), task.batches(0, 0))]
    x = torch.cat(batches)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        h = net.conv1((x - mean) / std)
    assert torch.allclose(bn.running_mean, h.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, h.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-6)
    assert bn.momentum == 0.1 and net.training
    task.cfg["precise_bn_batches"] = 0
    bn.running_mean.fill_(5.0)
    assert task.recompute_bn_statistics(1, "fp32") == 0 and torch.all(bn.running_mean == 5.0)
    task.cfg["precise_bn_batches"] = 1000
    assert task.recompute_bn_statistics(1, "fp32") == task.steps_per_epoch == 6
