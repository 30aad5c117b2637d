"""`tools/run_detection.py --eval-only`: a trained detector's checkpoint scored without training
gives the numbers its run reported."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

from mixup_transfer.core.checkpoint import build_resnet, save_backbone

ROOT = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("finetune_det_eval_only",
                                                  ROOT / "tools" / "run_detection.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_eval_only_reproduces_the_runs_score(toy_world, tmp_path, capsys):
    torch.manual_seed(0)
    backbone = tmp_path / "backbone.pth"
    save_backbone(backbone, build_resnet("resnet18", num_classes=10),
                  {"arch": "resnet18", "method": "erm"})
    cfg = {"model": {"type": "ssd", "arch": "resnet18", "size": 64, "max_size": 64,
                     "kwargs": {"detections_per_img": 10}},
           "data": {"format": "voc", "root": str(toy_world / "VOCdevkit"),
                    "voc_train": ["2007/trainval"], "max_train": 8, "max_val": 6, "num_workers": 0,
                    "zoom_out_ratio": 2.0},
           "optim": {"epochs": 1, "batch_per_process": 4, "lr": 0.01, "warmup_iters": 1,
                     "steps": [0.75]},
           "eval": {"batch_size": 6, "figure_examples": 0}, "seeds": [0],
           "runtime": {"log_every_steps": 1}}
    path = tmp_path / "det.yaml"
    path.write_text(yaml.safe_dump(cfg))
    tool = _tool()
    assert tool.main(["--config", str(path), "--weights", str(backbone), "--run-dir",
                      str(tmp_path / "run")]) == 0
    trained = json.loads((tmp_path / "run" / "metrics.json").read_text())
    capsys.readouterr()
    ckpt = tmp_path / "run" / "seed_0" / "checkpoints" / "last.pth"
    assert tool.main(["--eval-only", "--config", str(path), "--checkpoint", str(ckpt), "--run-dir",
                      str(tmp_path / "ev")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["mAP"] == pytest.approx(trained["mAP"],
                                           abs=1e-9) and printed["test_images"] == 6
    assert printed["units"]["mAP"] == "%" and json.loads((tmp_path / "ev"
                                                          / "metrics.json").read_text()) == printed
    # a checkpoint of another model, or --eval-only without --checkpoint: exit 2
    assert tool.main(["--eval-only", "--config", str(path), "--checkpoint", str(backbone)]) == 2
    assert "does not fit" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        tool.main(["--eval-only", "--config", str(path)])
    assert e.value.code == 2
