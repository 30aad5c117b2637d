"""Every tool's exit codes: 2 for bad input or config (an unknown override key, an unknown method
knob, a key that would be ignored), 1 for a failure while running, each with one `error:` line
naming the culprit; and KEY=VALUE overrides anywhere on the command line."""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_exit_tool",
                                                  ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture()
def call(capsys):
    """call(tool module, *args) -> (exit code, the `error:` line or '')."""
    def _call(mod, *args):
        capsys.readouterr()
        try:
            code = mod.main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
        assert "Traceback" not in err, err
        return code, lines[0] if lines else err
    return _call


PRETRAIN = ROOT / "configs/pretrain/toy_multimix.yaml"
DET = ROOT / "configs/detection/toy_ssd_voc.yaml"
WSOL = ROOT / "configs/wsol/toy_multimix.yaml"
PIPELINE = ROOT / "configs/pipeline/toy.yaml"


@pytest.mark.parametrize("tool,args,names", [
    ("run_pretrain", ["--config", PRETRAIN, "method.foo=1", "--run-dir", "{tmp}/r"],
     ["method.foo", "valid: ["]),
    ("run_pretrain", ["--config", PRETRAIN, "--run-dir", "{tmp}/r", "optim.lrr=1"], ["optim.lrr"]),
    ("run_pretrain", ["--config", PRETRAIN, "method.name=nomix", "--run-dir", "{tmp}/r"],
     ["method.name", "nomix"]),
    ("run_detection", ["--config", DET, "--run-dir", "{tmp}/r", "optim.lrr=1"], ["optim.lrr"]),
    ("run_wsol", ["finetune", "--config", WSOL, "--run-dir", "{tmp}/r", "method.name=multimix",
                  "method.foo=1"],
     ["method.foo"]),
    ("run_wsol", ["finetune", "--config", WSOL, "--run-dir", "{tmp}/r", "method.n=100"],
     ["method.n", "would be ignored"]),
    ("run_wsol", ["finetune", "--config", WSOL, "--run-dir", "{tmp}/r", "mixing.name=multimix"],
     ["mixing was renamed: use method"]),
    ("run_detection", ["--config", DET, "--run-dir", "{tmp}/r", "solver.lr=0.1"],
     ["solver.lr was renamed: use optim.lr"]),
    ("run_robustness", ["--checkpoint", "{tmp}/c.pth", "--imagenet", "{tmp}", "--limit", "4"],
     ["--limit was renamed: use data.max_val=VALUE"]),
    ("run_wsol", ["finetune", "--config", WSOL, "optim.lrr=1", "--run-dir", "{tmp}/r"],
     ["optim.lrr"]),
    ("run_wsol", ["evaluate", "--config", WSOL, "--model", "{tmp}/m.pth", "evall.every=1"],
     ["evall"]),
    ("run_pipeline", ["--config", PIPELINE, "pretrainn.config=x", "--methods", "erm"],
     ["pretrainn"]),
    ("ablate", ["--config", ROOT / "configs/ablation/multimix_n.yaml", "data.root={tmp}/d"],
     ["data.root", "{data}"]),
    ("ablate", ["--config", ROOT / "configs/ablation/toy_multimix_n.yaml", "knobb.key=method.n",
                "--plan"],
     ["knobb"]),
    ("run_robustness",
     ["--checkpoint", "{tmp}/c.pth", "--imagenet", "{tmp}", "--suites", "clean,bogus"], ["bogus"]),
    ("eval_coco", ["--annotations", "{tmp}/none.json", "--results", "{tmp}/r.json"],
     ["none.json"]),
    ("eval_voc", ["--devkit", "{tmp}/novoc", "--results", "{tmp}"], ["novoc"]),
    ("eval_wsol", ["--metadata", "{tmp}/nometa", "--scoremaps", "{tmp}"], ["nometa"]),
    ("convert", ["--to", "torchvision", "{tmp}/none.pth", "{tmp}/out.pth"], ["none.pth"]),
    ("submit", ["pretrain", "--config", PRETRAIN, "--local", "optim.lrr=1", "--job-dir",
                "{tmp}/jobs"], ["optim.lrr"]),
    ("make_toy_data", ["--out", "{tmp}/toy", "--preset", "huge"], ["--preset", "huge"]),
    ("bench", ["everything"], ["everything"]),
])
def test_bad_config_or_input_exits_2(call, tmp_path, tool, args, names):
    code, line = call(_tool(tool), *[str(a).replace("{tmp}", str(tmp_path)) for a in args])
    assert code == 2, line
    for n in names:
        assert n.replace("{tmp}", str(tmp_path)) in line, line


@pytest.mark.parametrize("tool,target,args", [
    ("run_pretrain", "pretrain.task:run", ["--config", PRETRAIN, "--run-dir", "{tmp}/r"]),
    ("run_detection", "transfer.detection.stage:finetune_detector",
     ["--config", DET, "--run-dir", "{tmp}/r"]),
    ("ablate", "run_ablation", ["--config", ROOT / "configs/ablation/toy_multimix_n.yaml"]),
    ("run_pipeline", "run_pipeline", ["--config", PIPELINE]),
    ("run_robustness", "transfer.robustness.stage:run",
     ["--checkpoint", "{tmp}/c.pth", "--imagenet", "{tmp}"]),
    ("eval_coco", "coco_evaluate", ["--annotations", "{tmp}/a.json", "--results", "{tmp}/r.json"]),
    ("eval_voc", "evaluate_voc_results", ["--devkit", "{tmp}", "--results", "{tmp}"]),
    ("convert", "convert_to_torchvision", ["--to", "torchvision", "{tmp}/a.pth", "{tmp}/b.pth"]),
    ("make_toy_data", "make_toy_world", ["--out", "{tmp}/toy"]),
    ("submit", "submit", ["pretrain", "--config", PRETRAIN, "--local", "--job-dir", "{tmp}/jobs"]),
    ("bench", "bench_gpu", ["gpu"]),
])
def test_a_failure_while_running_exits_1(call, tmp_path, monkeypatch, tool, target, args):
    mod = _tool(tool)

    def boom(*a, **k):
        raise RuntimeError("the device went away")

    # a stage tool's work is its stage's (mixup_transfer/core/cli.py)
    owner, _, name = target.rpartition(":")
    monkeypatch.setattr(importlib.import_module(owner) if owner else mod, name, boom)
    code, line = call(mod, *[str(a).replace("{tmp}", str(tmp_path)) for a in args])
    assert (code, line) == (1, "error: RuntimeError: the device went away")


def test_eval_wsol_failure_while_running_exits_1(call, tmp_path, monkeypatch):
    import wsol.scoremaps

    monkeypatch.setattr(wsol.scoremaps, "score_scoremap_dir", lambda *a, **k: 1 / 0)
    code, line = call(_tool("eval_wsol"), "--metadata", tmp_path, "--scoremaps", tmp_path)
    assert (code, line) == (1, "error: ZeroDivisionError: division by zero")


@pytest.mark.parametrize("cmd,target", [("finetune", "run"), ("evaluate", "evaluate_run")])
def test_wsol_failure_while_running_exits_1(call, tmp_path, monkeypatch, cmd, target):
    import wsol.finetune

    monkeypatch.setattr(wsol.finetune, target, lambda *a,
                        **k: (_ for _ in ()).throw(OSError("disk full")))
    extra = ["--model", tmp_path / "m.pth"] if cmd == "evaluate" else ["--run-dir", tmp_path / "r"]
    code, line = call(_tool("run_wsol"), cmd, "--config", WSOL, *extra)
    assert (code, line) == (1, "error: OSError: disk full")


def test_overrides_anywhere_reach_the_config(call, tmp_path, monkeypatch):
    """`--config C a=1 --run-dir X b=2`: both overrides are applied, in order (the later one
    wins)."""
    seen = {}
    mod = _tool("run_pretrain")
    import pretrain.task

    monkeypatch.setattr(pretrain.task, "run",
                        lambda cfg, inputs, run_dir, **k:
                        seen.update(cfg=cfg, run_dir=run_dir) or {})
    code, _ = call(mod, "--config", PRETRAIN, "optim.lr=0.1", "--run-dir", tmp_path / "x",
                   "optim.epochs=2", "--force", "optim.lr=0.2")
    assert code == 0 and seen["run_dir"] == tmp_path / "x"
    assert (seen["cfg"]["optim"]["lr"], seen["cfg"]["optim"]["epochs"]) == (0.2, 2)
    mod = _tool("run_wsol")
    import wsol.finetune

    monkeypatch.setattr(wsol.finetune, "run", lambda cfg, *a, **k: seen.update(wcfg=cfg) or {})
    code, _ = call(mod, "finetune", "--config", WSOL, "optim.epochs=3", "--run-dir",
                   tmp_path / "w", "optim.lr=0.5")
    assert code == 0 and (seen["wcfg"]["optim"]["epochs"], seen["wcfg"]["optim"]["lr"]) == (3, 0.5)


def test_every_help_says_what_each_option_does(capsys, monkeypatch):
    """--help of every tool: --debug and the exit codes, and a help text for every option and
    argument."""
    import argparse

    silent = []
    add = argparse._ActionsContainer.add_argument

    def recording(self, *args, **kwargs):
        if not kwargs.get("help"):
            silent.append(args)
        return add(self, *args, **kwargs)

    monkeypatch.setattr(argparse._ActionsContainer, "add_argument", recording)
    for path in sorted((ROOT / "tools").glob("*.py")):
        mod = _tool(path.stem)
        with pytest.raises(SystemExit) as e:
            mod.main(["--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "--debug" in out and "2 bad input or config" in out, path.name
        assert not silent, (path.name, silent)
    out = _evaluate_help(capsys)
    assert "embedding" in out and "default: " in out
    for flag in ("--iou-op", "--corrupt-at", "--protocol"):
        assert re.search(r"choices:\s", out.split(flag, 2)[-1].split("\n  --", 1)[0]), flag


def _evaluate_help(capsys) -> str:
    with pytest.raises(SystemExit):
        _tool("run_robustness").main(["--help"])
    return capsys.readouterr().out


def test_evaluate_help_covers_every_stage_option():
    """A flag for every top-level option (the shared keys, data.max_val or runtime.precision, are
    KEY=VALUE overrides as in every stage, and their flags of the same old name are refused)."""
    from transfer.robustness.cli import option_help
    from transfer.robustness.stage import DEFAULTS

    helps = option_help()
    assert set(helps) == {k for k, v in DEFAULTS.items() if not isinstance(v, dict)}
    undocumented = [k for k, h in helps.items() if h.startswith(k.replace("_", " ") + " (")]
    assert not undocumented, undocumented
    assert (
        helps["iou_op"]
        == "localization: IoU comparison, >= or > (multi-mix: >) (default: >=; choices: >=, >)"
    )


def test_yaml_of_the_ablation_configs_use_their_data_root():
    """Every shipped ablation config that sets data.root also uses it (the check above would refuse
    it)."""
    for path in (ROOT / "configs/ablation").glob("*.yaml"):
        cfg = yaml.safe_load(path.read_text())
        if (cfg.get("data") or {}).get("root"):
            assert any("{data}" in o for o in cfg.get("overrides", [])
                       + cfg.get("base_overrides", [])), path


def test_box_suites_on_data_without_boxes(call, toy_world, tmp_path, capsys):
    """No box annotations: background (which needs them) is skipped with a note; asked for alone,
    exit 2 with the suites that would run."""
    import json
    import shutil

    import torch

    from mixup_transfer.core.checkpoint import build_resnet, save_backbone

    root = tmp_path / "imagenet"
    # no val_boxes/, no LOC_val_solution.csv
    shutil.copytree(toy_world / "imagenet" / "val", root / "val")
    ckpt = tmp_path / "backbone.pth"
    torch.manual_seed(0)
    save_backbone(ckpt, build_resnet("resnet18", num_classes=10),
                  {"arch": "resnet18", "method": "erm"})
    evaluate = _tool("run_robustness")
    common = ["--checkpoint", ckpt, "data.max_val=2", "--imagenet", root, "--image-size", "32",
              "--resize", "36", "--out", tmp_path / "out"]
    code, line = call(evaluate, *common, "--suites", "background")
    assert code == 2 and "no box annotations" in line and "--suites" in line, line
    capsys.readouterr()
    assert evaluate.main([str(a) for a in common + ["--suites", "clean,background"]]) == 0
    err = capsys.readouterr().err
    assert "background: skipped:" in err and "--suites clean" in err, err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert "clean" in metrics and "background" not in metrics
