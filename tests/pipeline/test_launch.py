"""mixup_transfer/pipeline/launch.py and tools/submit.py: the torchrun variables of a task, the
sbatch file, the checks made before a job waits in the queue, a 2-process pretraining job through
submitit's local executor, and a preempted job that requeues and ends with the weights of an
uninterrupted run."""

import json
import pickle
from pathlib import Path

import pytest
import torch
import yaml

submitit = pytest.importorskip("submitit")

from mixup_transfer.core.config import ConfigError  # noqa: E402
from mixup_transfer.core.engine import Engine  # noqa: E402
from mixup_transfer.pipeline.launch import (  # noqa: E402
    Resources,
    StageJob,
    distributed_env,
    executor_parameters,
    make_spec,
    master_port,
    run_stage,
    submit,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny_config(tmp_path, root, **optim):
    cfg = {"name": "tiny", "seed": 3,
           "data": {"root": str(root), "crop_size": 32, "val_resize": 36, "num_workers": 0,
                    "max_train": 32, "max_val": 16},
           "model": {"arch": "resnet18"},
           "method": {"name": "multimix", "n": 20, "prob": 1.0},
           "optim": {"batch_size": 8, "epochs": 2, "lr": 0.05, "schedule": "cosine", **optim},
           "runtime": {"precision": "fp32", "flops": False, "figures": False, "num_threads": 1}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_distributed_env_of_a_task_by_hand():
    # task 5 of 2 nodes x 4 GPUs: second node, local rank 1; the first node hosts the rendezvous
    env = distributed_env("4242", ["gpu-a", "gpu-b"], num_nodes=2, num_tasks=8, global_rank=5,
                          local_rank=1)
    assert env == {"MASTER_ADDR": "gpu-a", "MASTER_PORT": str(master_port("4242")), "RANK": "5",
                   "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    assert 20000 <= master_port("4242") < 40000 and master_port("4242") == master_port("4242")
    one_node = distributed_env("7", ["me"], num_nodes=1, num_tasks=2, global_rank=0, local_rank=0,
                               port=29500)
    assert one_node["MASTER_ADDR"] == "127.0.0.1" and one_node["MASTER_PORT"] == "29500"
    # one task: no process group, as a plain python run
    assert distributed_env("7", ["me"], 1, 1, 0, 0) == {}
    with pytest.raises(ConfigError, match="evenly"):
        distributed_env("7", ["a", "b"], 2, 3, 0, 0)


def test_slurm_parameters_make_the_sbatch_file(tmp_path):
    from submitit.slurm.slurm import _make_sbatch_string

    res = Resources(nodes=4, gpus_per_node=8, cpus_per_task=10, mem_gb=480, timeout_min=4320,
                    partition="gpu", account="proj", qos="high", name="mt-pretrain",
                    signal_delay_s=120)
    text = _make_sbatch_string("python -u -m submitit.core._submit X", tmp_path,
                               **executor_parameters(res, "slurm"))
    for line in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10",
                 "--mem=480GB", "--time=4320", "--partition=gpu", "--account=proj", "--qos=high",
                 "--job-name=mt-pretrain", "--signal=USR2@120"):
        assert f"#SBATCH {line}\n" in text, line
    cpu = executor_parameters(Resources(gpus_per_node=0, tasks_per_node=2), "slurm")
    assert cpu["ntasks_per_node"] == 2 and "gpus_per_node" not in cpu and "mem" not in cpu
    assert executor_parameters(Resources(gpus_per_node=0, tasks_per_node=2),
                               "local")["tasks_per_node"] == 2
    with pytest.raises(ConfigError, match="one node"):
        executor_parameters(Resources(nodes=2), "local")


def test_checks_before_queueing(toy_world, tmp_path):
    cfg = tiny_config(tmp_path, toy_world / "imagenet")
    spec = make_spec("pretrain", cfg, ["optim.lr=0.1"], cwd=tmp_path)
    assert spec.run_dir == str(tmp_path / "runs" / "tiny") and spec.overrides == ("optim.lr=0.1",)
    with pytest.raises(ConfigError, match="unknown stage"):
        make_spec("train", cfg)
    # the stage's own key check, before the queue
    with pytest.raises(ConfigError, match="optim.lrr"):
        make_spec("pretrain", cfg, ["optim.lrr=0.1"], cwd=tmp_path)
    with pytest.raises(ConfigError, match="--checkpoint and --imagenet"):
        make_spec("robustness", None, cwd=tmp_path)
    wsol = str(Path(__file__).resolve().parents[2] / "configs/wsol/toy_multimix.yaml")
    with pytest.raises(FileNotFoundError):
        make_spec("wsol", wsol, weights="missing.pth", cwd=tmp_path)
    # random init, as tools/run_wsol.py
    assert make_spec("wsol", wsol, weights="none", cwd=tmp_path).weights is None
    # a job continues its run folder, as the stage's tool does; --force starts over (not for
    # evaluation-only stages)
    assert make_spec("pretrain", cfg, cwd=tmp_path).resume
    forced = make_spec("pretrain", cfg, force=True, cwd=tmp_path)
    assert forced.force and not forced.resume
    with pytest.raises(ConfigError, match="robustness only evaluates"):
        make_spec("robustness", None, force=True, cwd=tmp_path, checkpoint=cfg,
                  imagenet=str(tmp_path))


@pytest.mark.slow
def test_local_executor_runs_a_two_process_pretraining_job(toy_world, tmp_path, monkeypatch):
    """Two tasks of submitit's local executor join one gloo process group from the variables the
    job sets."""
    # the in-process job below changes to the folder it was submitted from
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tmp_path, toy_world / "imagenet", epochs=1, batch_size=16)
    spec = make_spec("pretrain", cfg, cwd=tmp_path)
    job = submit(spec, Resources(gpus_per_node=0, tasks_per_node=2, timeout_min=10),
                 tmp_path / "jobs/%j", "local")
    metrics = job.results()[0]  # rank 0's (every task returns the metrics)
    # 32 images / 16 per step, over 2 processes
    assert metrics["steps"] == 2 and metrics["global_batch"] == 16
    run = tmp_path / "runs/tiny"
    assert (run / "checkpoints/last.pth").is_file() and (run / "backbone.pth").is_file()
    head = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    assert head["world_size"] == 2 and head["per_process_batch"] == 8
    assert torch.load(run / "checkpoints/last.pth", weights_only=True)["world_size"] == 2

    # every stage is rank-aware: a 2-task robustness job shards the suites and gives one process's
    # numbers
    ev = tmp_path / "eval.yaml"
    ev.write_text(yaml.safe_dump({"suites": "clean,calibration,fgsm", "image_size": 32,
                                  "resize": 36, "eval": {"batch_size": 8},
                                  "data": {"max_val": 24}}))
    inputs = {"checkpoint": str(run / "backbone.pth"), "imagenet": str(toy_world / "imagenet")}
    one = StageJob(make_spec("robustness", str(ev), run_dir=str(tmp_path / "ev1"), cwd=tmp_path,
                             **inputs))()
    two = submit(make_spec("robustness", str(ev), run_dir=str(tmp_path / "ev2"), cwd=tmp_path,
                           **inputs),
                 Resources(gpus_per_node=0, tasks_per_node=2, timeout_min=10),
                 tmp_path / "jobs/%j", "local")
    # timings differ
    ranks = [{k: v for k, v in r.items() if k != "seconds"} for r in two.results()]
    assert ranks[0] == ranks[1]  # every rank gets the gathered metrics
    # the same numbers as one process
    assert ranks[0] == {k: v for k, v in one.items() if k != "seconds"}
    assert ranks[0]["clean"]["top1_err"] == one["clean"]["top1_err"]


class Preempted(Exception):
    pass


@pytest.mark.slow
def test_a_preempted_job_requeues_and_ends_with_the_uninterrupted_weights(toy_world, tmp_path,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)  # the job changes to the folder it was submitted from
    cfg = tiny_config(tmp_path, toy_world / "imagenet")  # 2 epochs of 4 steps
    plain = StageJob(make_spec("pretrain", cfg, run_dir="plain", cwd=tmp_path))()
    assert plain["steps"] == 8

    job = StageJob(make_spec("pretrain", cfg, run_dir="preempted", cwd=tmp_path))
    save = Engine.save_checkpoint

    # the job is killed right after its first checkpoint (end of epoch 1)
    def save_then_die(engine):
        save(engine)
        raise Preempted

    monkeypatch.setattr(Engine, "save_checkpoint", save_then_die)
    with pytest.raises(Preempted):
        job()
    monkeypatch.setattr(Engine, "save_checkpoint", save)
    assert torch.load(tmp_path / "preempted/checkpoints/last.pth", weights_only=True)["step"] == 4

    delayed = job.checkpoint()  # what submitit calls on the USR2 signal, then pickles and requeues
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert delayed.function.spec.resume and not delayed.function.spec.force
    delayed.dump(tmp_path / "submitted.pkl")
    again = pickle.loads((tmp_path / "submitted.pkl").read_bytes())
    metrics = again.result()
    assert metrics["steps"] == 8
    log = [json.loads(x) for x in (tmp_path / "preempted/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["event"] == "resume"] == [4]
    a = torch.load(tmp_path / "plain/backbone.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "preempted/backbone.pth", weights_only=True)["model"]
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (
        metrics["val_top1"] == plain["val_top1"] and metrics["train_loss"] == plain["train_loss"]
    )


def test_submit_cli_refuses_a_bad_config_before_queueing(toy_world, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    tool = Path(__file__).resolve().parents[2] / "tools" / "submit.py"
    spec = importlib.util.spec_from_file_location("submit_cli", tool)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    cfg = tiny_config(tmp_path, toy_world / "imagenet")
    code = cli.main(["pretrain", "--config", cfg, "--local", "optim.lrr=1", "--job-dir",
                     str(tmp_path / "jobs")])
    assert code == 2 and "optim.lrr" in capsys.readouterr().err
    assert not (tmp_path / "jobs").exists()  # nothing was queued


def test_a_job_holds_its_run_folders_lock(toy_world, tmp_path):
    from mixup_transfer.core.lock import RunLockedError, run_lock

    cfg = tiny_config(tmp_path, toy_world / "imagenet")
    spec = make_spec("pretrain", cfg, cwd=tmp_path)
    folder = tmp_path / "runs" / "tiny"
    folder.mkdir(parents=True)
    with run_lock(folder, "a command run by hand"), \
            pytest.raises(RunLockedError, match="another process is writing this pretrain job "
                                                "folder"):
        run_stage(spec)  # a live writer: this process
    assert sorted(p.name for p in folder.iterdir()) == []  # nothing written by the refused job
