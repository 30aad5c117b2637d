"""Every robustness suite end to end on the tiny toy world (a randomly initialised ResNet-18)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from mixup_transfer.core.checkpoint import CheckpointError, build_resnet, save_backbone
from mixup_transfer.core.data import DataError
from transfer.robustness import evaluate_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(limit=6, image_size=32, resize=36, batch_size=4, pgd_iters=2)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _checkpoint(path, num_classes, method="erm", seed=0):
    torch.manual_seed(seed)
    save_backbone(path, build_resnet("resnet18", num_classes=num_classes),
                  {"arch": "resnet18", "num_classes": num_classes, "method": method, "epochs": 0,
                   "config": "", "metrics": {}})
    return path


@pytest.mark.slow
def test_all_suites_end_to_end(toy_world, tmp_path):
    imagenet = toy_world / "imagenet"
    n_classes = len([d for d in (imagenet / "val").iterdir() if d.is_dir()])
    ckpt = _checkpoint(tmp_path / "erm" / "backbone.pth", n_classes)
    ood_dir = toy_world / "VOCdevkit" / "VOC2007" / "JPEGImages"
    m = evaluate_checkpoint(ckpt, imagenet, "all", tmp_path / "out", ood_dirs=[ood_dir],
                            export_dir=tmp_path / "export", **SMALL)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == m
    assert m["n_images"] == 6 and m["method"] == "erm"
    pct = [m["clean"]["top1_err"], m["clean"]["top5_err"], m["background"]["clean_loc"],
           m["calibration"]["ece"], m["calibration"]["oe"], m["fgsm"]["top1_err"],
           m["pgd"]["top1_err"], m["pgd"]["fgsm_same_eps_top1_err"]]
    for c in ("replace", "noise"):
        pct += [m["background"][c][k] for k in ("top1_err", "top5_err", "top1_loc")]
    assert set(m["ood"]) == {"JPEGImages", "uniform", "gaussian"}
    for s in m["ood"].values():
        pct += [s[k] for k in ("det_acc", "auroc", "aupr_in", "aupr_out")]
        assert s["n_id"] == 6 and s["n_ood"] == 6
    assert all(0.0 <= v <= 100.0 for v in pct)
    assert m["clean"]["top5_err"] <= m["clean"]["top1_err"]
    for f in m["figures"].values():
        assert (tmp_path / "out" / f).stat().st_size > 1000
    assert len(list((tmp_path / "export" / "noise").rglob("*.png"))) == 6
    index = json.loads((tmp_path / "export" / "replace" / "index.json").read_text())
    assert len(index["images"]) == 6 and index["corruption"] == "replace"


@pytest.mark.slow
def test_cli_comparison_and_bad_checkpoint(toy_world, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("evaluate_cli",
                                                  ROOT / "tools" / "run_robustness.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)

    imagenet = toy_world / "imagenet"
    n_classes = len([d for d in (imagenet / "val").iterdir() if d.is_dir()])
    a = _checkpoint(tmp_path / "a.pth", n_classes, "erm", 0)
    b = _checkpoint(tmp_path / "b.pth", n_classes, "mixup", 1)
    out = tmp_path / "cmp"
    cli.main(["--checkpoint", f"erm={a}", f"mixup={b}", "--imagenet", str(imagenet),
              "--suites", "clean,calibration", "--out", str(out), "data.max_val=4",
              "--image-size", "32", "--resize", "36"])
    table = json.loads((out / "comparison.json").read_text())
    assert list(table["clean"]["rows"]) == ["erm", "mixup"]
    for name in ("erm", "mixup"):
        m = json.loads((out / name / "metrics.json").read_text())
        assert table["calibration"]["rows"][name]["ECE"] == m["calibration"]["ece"]
    assert (
        "| mixup |" in (out / "comparison.md").read_text() and "| erm |" in capsys.readouterr().out
    )

    wrong = _checkpoint(tmp_path / "wrong.pth", n_classes + 3)
    with pytest.raises(CheckpointError, match=r"fc\.weight"):
        evaluate_checkpoint(wrong, imagenet, "clean", None, **SMALL)
    (tmp_path / "no_images").mkdir()
    with pytest.raises(DataError, match="no_images"):
        evaluate_checkpoint(a, imagenet, "ood", None, ood_dirs=[tmp_path / "no_images"], **SMALL)
