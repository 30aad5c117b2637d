"""What a tool prints on the console: a header, periodic lines, one line per evaluation, the run
folder and its files at the end; plain lines (no carriage-return bars) when stderr is not a
terminal; rank 0 only."""

import importlib.util
import io
import json
import logging
import re
from pathlib import Path

import pytest
import yaml

from mixup_transfer.core import cli
from mixup_transfer.core.basics import bars_enabled
from mixup_transfer.core.engine import _hms

ROOT = Path(__file__).resolve().parents[2]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_eta_format_and_no_bars_off_a_terminal(monkeypatch):
    assert _hms(252) == "0:04:12" and _hms(3 * 3600 + 61.4) == "3:01:01" and _hms(0) == "0:00:00"
    monkeypatch.setattr("sys.stderr", io.StringIO())
    monkeypatch.delenv("MT_NO_PROGRESS", raising=False)
    assert not bars_enabled()  # a file, a pipe, CI, a SLURM log: plain lines


def test_logging_is_rank_aware(monkeypatch):
    for env, level in (({}, logging.INFO), ({"RANK": "3"}, logging.WARNING),
                       ({"SLURM_PROCID": "1"}, logging.WARNING),
                       ({"RANK": "0", "SLURM_PROCID": "5"}, logging.INFO)):
        for var in ("RANK", "SLURM_PROCID"):
            monkeypatch.delenv(var, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        cli.setup_logging()
        assert logging.getLogger().level == level, env
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, cli._ConsoleHandler)]
    assert len(handlers) == 1  # each call replaces the previous handler


@pytest.mark.slow
def test_pretrain_console_header_periodic_epoch_and_outputs(toy_world, tmp_path, capsys,
                                                            monkeypatch):
    cfg = {"name": "t", "seed": 3,
           "data": {"root": str(toy_world / "imagenet"), "crop_size": 32, "val_resize": 36,
                    "num_workers": 0, "max_train": 48, "max_val": 20},
           "model": {"arch": "resnet18"}, "method": {"name": "input_mixup"},
           "optim": {"batch_size": 8, "epochs": 2, "lr": 0.05, "schedule": "constant"},
           "runtime": {"precision": "fp32", "log_every_steps": 2, "flops": False,
                       "figures": False}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    pretrain = _tool("run_pretrain")
    # overrides before and after options
    assert pretrain.main(["--config", str(tmp_path / "cfg.yaml"), "optim.epochs=1", "--run-dir",
                          str(run), "optim.lr=0.1"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["epochs"] == 1 and "\r" not in err
    assert f"config {tmp_path / 'cfg.yaml'} into {run}" in err
    # 48 images / batch 8 = 6 steps; one process, no accumulation
    assert re.search(r"world size 1, per-process batch 8 \(1 micro-batch\(es\)\), global batch 8, "
                     r"precision fp32, "
                     r"device cpu, 6 steps \(6 per epoch\)", err), err
    periodic = re.findall(r"epoch 1/1  step (\d+)/6  loss \S+  lr (\S+)  \S+ images/s  eta "
                          r"\d+:\d\d:\d\d", err)
    assert [s for s, _ in periodic] == ["1", "2", "4",
                                        "6"] and {lr for _, lr in periodic} == {"0.1"}, err
    assert re.search(r"epoch 1/1 done \(step 6\): .*train_loss \S+.*val_top1 \S+", err), err
    assert re.search(r"run folder: .*run\n(  .*\n)*  metrics\.json", err), err
    # another rank: neither the INFO lines nor the JSON
    monkeypatch.setenv("RANK", "1")
    assert pretrain.main(["--config", str(tmp_path / "cfg.yaml"), "--run-dir", str(run),
                          "optim.epochs=1", "--force"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "epoch 1/1" not in err


def test_engine_console_lines_are_the_logged_numbers(tmp_path, caplog, monkeypatch):
    """The periodic and epoch lines print the values log.jsonl holds (tiny regression task, 2 steps
    per epoch)."""
    from test_engine import make

    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal: plain lines
    task, engine = make(tmp_path, epochs=2)
    with caplog.at_level(logging.INFO, logger="train"):
        engine.fit(header={"per_process_batch": 8})
    lines = [r.getMessage() for r in caplog.records if r.name == "train"]
    assert lines[0] == (f"run folder {tmp_path / 'run'}: world size 1, per-process batch 8 (1 "
                        "micro-batch(es)), global batch 8, precision fp32, device cpu, 4 steps "
                        "(2 per epoch)")
    records = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for rec, line in zip(steps, lines[1:3] + lines[4:6]):
        epoch = 1 + (rec["step"] - 1) // 2
        assert line.startswith(f"epoch {epoch}/2  step {rec['step']}/4  loss {rec['loss']:.4g}  "
                               f"loss_zero 0  lr {rec['lr']:.4g}  "), line
    epochs = [r for r in records if r["event"] == "epoch"]
    for rec, line in zip(epochs, (lines[3], lines[6])):
        assert line.startswith(f"epoch {rec['epoch']}/2 done (step {rec['step']}): lr "
                               f"{rec['lr']:.4g}  ")
        assert f"train_loss {rec['train_loss']:.4g}" in line and line.endswith(
            f"seen {rec['seen']}"
        )


def test_tensorboard_setting(tmp_path, monkeypatch):
    from mixup_transfer.core.config import ConfigError
    from mixup_transfer.core.engine import tensorboard_dir

    assert (
        tensorboard_dir(tmp_path, True) == tmp_path / "tensorboard"
        and tensorboard_dir(tmp_path, False) is None
    )
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert tensorboard_dir(tmp_path, "auto") is None  # not installed: no event files, no error
    with pytest.raises(ConfigError, match="tensorboard must be true, false or auto, got 'yes'"):
        tensorboard_dir(tmp_path, "yes")


def test_tensorboard_scalars_are_the_logged_numbers(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_engine import make

    _, engine = make(tmp_path, epochs=2, tensorboard=True)
    engine.fit()
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    records = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["event"] == "epoch"]
    got = [(e.step, e.value) for e in acc.Scalars("epoch/train_loss")]
    assert got == [(r["epoch"], pytest.approx(r["train_loss"], rel=1e-6)) for r in epochs]
    assert [e.step for e in acc.Scalars("step/loss")] == [1, 2, 3, 4]


def test_robustness_metrics_as_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from transfer.robustness.stage import write_tensorboard

    metrics = {"clean": {"top1_err": 25.0}, "ood": {"lsun": {"auroc": 91.5}},
               "settings": {"limit": 8}, "units": {"top1_err": "%"}, "arch": "resnet18"}
    write_tensorboard(metrics, tmp_path, True)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["clean/top1_err", "ood/lsun/auroc"]
    assert [(e.step, e.value) for e in acc.Scalars("ood/lsun/auroc")] == [(0, 91.5)]
    write_tensorboard(metrics, tmp_path / "off", False)
    assert not (tmp_path / "off").exists()
