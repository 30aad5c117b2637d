"""User-defined class lists for VOC-layout detection data (`data.classes`; default the 20 VOC
classes)."""

import importlib.util
from pathlib import Path

import pytest

from mixup_transfer.core.constants import VOC_CLASSES
from transfer.detection import config as det_config
from transfer.detection import torchvision_backend as tvb

ROOT = Path(__file__).resolve().parents[2]


def _cfg(toy_world, classes):
    return det_config.resolve_config({
        "model": {"type": "ssd", "arch": "resnet18", "size": 64, "max_size": 64},
        "data": {"format": "voc", "root": str(toy_world / "VOCdevkit"),
                 "voc_train": ["2007/trainval"], "num_workers": 0, "classes": classes}})


def test_labels_follow_the_configured_class_order(toy_world):
    classes = list(reversed(VOC_CLASSES))
    _, test, ctx, _ = tvb.build_datasets(_cfg(toy_world, classes))
    assert ctx["classes"] == tuple(classes) and ctx["num_classes"] == 21
    _, target = test[0]
    names = [o["name"] for o in test.annotations[test.ids[0]]["objects"]]
    # label k = classes[k - 1]
    assert target["labels"].tolist() == [classes.index(n) + 1 for n in names]
    default = tvb.build_datasets(_cfg(toy_world, None))[2]
    assert default["classes"] == VOC_CLASSES


@pytest.mark.parametrize("classes,code,names", [
    ("[cat]", 2, ["unknown class name"]),              # the data holds classes the list lacks
    ("[]", 2, ["data.classes"]), ("[cat,cat]", 2, ["data.classes"]),
])
def test_bad_class_lists_exit_2(toy_world, tmp_path, capsys, classes, code, names):
    spec = importlib.util.spec_from_file_location("finetune_det_classes",
                                                  ROOT / "tools" / "run_detection.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    got = tool.main(["--config", str(ROOT / "configs/detection/toy_ssd_voc.yaml"), "--run-dir",
                     str(tmp_path / "r"), f"data.root={toy_world}/VOCdevkit",
                     f"data.classes={classes}"])
    err = capsys.readouterr().err
    assert got == code, err
    for n in names:
        assert n in err, err
