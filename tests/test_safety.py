"""Safety battery over the command-line tools and the pipeline: nothing non-finite is reported or saved, stale
results are never reused, one writer per run folder, paths stay inside their roots, clear errors on the common
paths and unpickling only on an explicit command-line flag.

Each case runs a tool the way a user does (its `main(argv)`, in-process) and asserts the exit code (2 bad input,
1 failure) and that the one `error: ...` line names the culprit.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("pretrain", "finetune_det", "wsol", "evaluate", "run_pipeline", "convert")


@pytest.fixture(scope="module")
def tools():
    mods = {}
    for name in TOOLS:
        spec = importlib.util.spec_from_file_location(f"{name}_safety_cli", ROOT / "tools" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mods[name] = mod
    return mods


@pytest.fixture()
def run(tools, capsys):
    """run(tool, *args) -> (exit code, stderr)."""
    def _run(tool, *args):
        capsys.readouterr()
        try:
            code = tools[tool].main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
        return code, capsys.readouterr().err
    return _run


def expect(result, code: int, *names) -> str:
    got, err = result
    assert got == code, f"exit {got}, expected {code}; stderr:\n{err}"
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    if code:
        assert lines, f"no 'error:' line in stderr:\n{err}"
        assert "Traceback" not in err, err
    for n in names:
        assert str(n) in err, f"{n!r} not named in:\n{err}"
    return lines[0] if lines else ""


def _save_backbone(path: Path, fill: float | None = None, seed: int = 0, num_classes: int = 10) -> Path:
    from core.checkpoint import build_resnet, save_backbone

    torch.manual_seed(seed)
    net = build_resnet("resnet18", num_classes=num_classes)
    if fill is not None:
        with torch.no_grad():
            for p in net.parameters():
                p.fill_(fill)
    save_backbone(path, net, {"arch": "resnet18", "method": "erm"})
    return path


@pytest.fixture(scope="module")
def nan_ckpt(tmp_path_factory):
    return _save_backbone(tmp_path_factory.mktemp("nan") / "backbone.pth", fill=float("nan"))


# ------------------------------------------------------------------------------------------- finite or nothing


@pytest.mark.parametrize("suite", ["clean", "calibration", "background", "fgsm", "ood"])
def test_evaluate_refuses_nan_network(run, toy_world, nan_ckpt, tmp_path, suite, one_thread):
    out = tmp_path / "out"
    line = expect(run("evaluate", "--checkpoint", nan_ckpt, "--imagenet", toy_world / "imagenet", "--suites", suite,
                      "--limit", "2", "--image-size", "32", "--resize", "36", "--out", out, "--ood-noise", "uniform",
                      "--workers", "0"), 1, "robustness", "non-finite")
    assert "split" in line
    assert not (out / "metrics.json").exists()


def _wsol_over(toy_world) -> list[str]:
    return [f"data.image_root={toy_world}/CUB_200_2011/images", f"data.metadata_root={toy_world}/wsol_metadata/CUB",
            "data.num_workers=0", "data.limit_test=4", "data.limit_train=8", "input.resize=40", "input.crop=32",
            "input.test_size=32", "eval.cam_curve_interval=0.1"]


WSOL_CFG = ROOT / "configs/wsol/toy_multimix.yaml"


def _cam_model(path: Path, toy_world, fill: float | None) -> Path:
    from core.runtime import atomic_save
    from wsol.model import CAMModel

    n = len({ln.rsplit(",", 1)[1] for ln in (toy_world / "wsol_metadata/CUB/train/class_labels.txt")
             .read_text().split()})
    torch.manual_seed(0)
    model = CAMModel("resnet18", n)
    if fill is not None:
        with torch.no_grad():
            model.fc.weight.fill_(fill)
    atomic_save({"model": model.state_dict(), "arch": "resnet18", "num_classes": n}, path)
    return path


def test_wsol_evaluate_refuses_nan_cams_and_saves_no_map(run, toy_world, tmp_path, one_thread):
    model = _cam_model(tmp_path / "cam_model.pth", toy_world, float("nan"))
    maps = tmp_path / "maps"
    expect(run("wsol", "evaluate", "--config", WSOL_CFG, "--model", model, "--scoremaps", maps, "--out",
               tmp_path / "m.json", *_wsol_over(toy_world)), 1, "wsol", "split test", "non-finite")
    assert not list(maps.rglob("*.npy")) and not (tmp_path / "m.json").exists()


def test_wsol_finetune_diverging_writes_no_model(run, toy_world, tmp_path, one_thread):
    rd = tmp_path / "r"
    code, err = run("wsol", "finetune", "--config", WSOL_CFG, "--run-dir", rd, *_wsol_over(toy_world), "epochs=1",
                    "optim.lr_classifier=1e30", "optim.lr=1e30", "eval.every=0")
    assert code == 1, err
    assert "non-finite" in err
    assert not (rd / "cam_model.pth").exists() and not (rd / "metrics.json").exists()


def _det_cfg(toy_world, kind="ssd"):
    from transfer import det_train

    return det_train.resolve_config({
        "model": {"type": kind, "arch": "resnet18", "size": 64, "max_size": 64, "train_sizes": [64],
                  "kwargs": {"detections_per_img": 10} if kind == "ssd" else {"rpn_pre_nms_top_n_test": 50,
                                                                           "rpn_post_nms_top_n_test": 20}},
        "data": {"format": "voc", "root": str(toy_world / "VOCdevkit"), "voc_train": ["2007/trainval"],
                 "max_train_images": 4, "max_test_images": 3, "workers": 0},
        "solver": {"epochs": 1, "batch_size": 2, "lr": 0.01, "warmup_iters": 1},
        "eval": {"batch_size": 3, "figure_examples": 0}, "seeds": [0], "runtime": {"log_period": 1}})


@pytest.mark.parametrize("kind", ["ssd", "faster_rcnn_fpn"])
def test_detection_prediction_refuses_nan_outputs(toy_world, kind, one_thread):
    """NaN scores fail every score threshold: without the check a broken detector scores mAP 0 with exit 0."""
    from core.runtime import NonFiniteOutputError
    from transfer import det_train

    cfg = _det_cfg(toy_world, kind)
    _, test, ctx, _ = det_train.build_datasets(cfg)
    model = det_train.build_model(cfg, ctx["num_classes"], None)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    with pytest.raises(NonFiniteOutputError, match=r"detection: split 2007/test: .* non-finite"):
        det_train.predict_sharded(model, test, 3, 0, torch.device("cpu"), split="2007/test")
