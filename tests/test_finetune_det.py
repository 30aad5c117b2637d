"""Fine-tuning driver: scoring conventions, outputs, resume (tiny toy world, CPU)."""

import json

import pytest
import torch

from core import runtime
from core.checkpoint import build_resnet, save_backbone
from core.constants import VOC_CLASSES
from transfer import det_train
from transfer.datasets import COCODetection, VOCDetection

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bb") / "r18.pth"
    save_backbone(path, build_resnet("resnet18", num_classes=10),
                  {"arch": "resnet18", "num_classes": 10, "method": "erm", "epochs": 0, "config": "",
                   "metrics": {}})
    return path


def _cfg(toy_world, kind="ssd", fmt="voc", **solver):
    cfg = {
        "model": {"type": kind, "arch": "resnet18", "size": 64, "max_size": 64, "train_sizes": [64],
                  "kwargs": {"detections_per_img": 10} if kind == "ssd" else
                  {"anchor_sizes": [16, 32, 64, 128, 256], "rpn_pre_nms_top_n_train": 100,
                   "rpn_post_nms_top_n_train": 50, "rpn_pre_nms_top_n_test": 50,
                   "rpn_post_nms_top_n_test": 20, "rpn_batch_size_per_image": 32,
                   "box_batch_size_per_image": 16, "box_detections_per_img": 10}},
        "data": {"format": fmt, "root": str(toy_world / ("VOCdevkit" if fmt == "voc" else "coco")),
                 "voc_train": ["2007/trainval"], "max_train_images": 8, "max_test_images": 6, "workers": 0,
                 "zoom_out_ratio": 2.0},
        "solver": {"epochs": 2, "batch_size": 4, "lr": 0.01, "warmup_iters": 2, "steps": [0.75], **solver},
        "eval": {"batch_size": 6, "figure_examples": 2},
        "seeds": [0],
        "runtime": {"log_period": 1},
    }
    return det_train.resolve_config(cfg)


def test_lr_schedule_hand_values():
    from core.schedule import lr_factor

    f = lambda it: lr_factor(it, "step", milestones=[50, 80], gamma=0.1, warmup=10, warmup_start=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(5) == pytest.approx(0.55) and f(10) == 1.0
    assert f(49) == 1.0 and f(50) == pytest.approx(0.1) and f(80) == pytest.approx(0.01)


def test_unknown_config_key_is_rejected(toy_world):
    from core.config import ConfigError

    with pytest.raises(ConfigError, match="solver.lrr"):
        det_train.resolve_config({"solver": {"lrr": 0.1}})


def test_voc_scoring_of_ground_truth_is_perfect_and_uses_xml_coordinates(toy_world, tmp_path):
    ds = VOCDetection(toy_world / "VOCdevkit", "2007", "test")
    preds = []
    for i in range(len(ds)):
        _, t = ds[i]
        keep = ~t["difficult"]
        preds.append((t["image_id"], t["boxes"][keep], torch.ones(int(keep.sum())), t["labels"][keep]))
    ctx = {"format": "voc", "classes": VOC_CLASSES, "split": "test", "dataset": ds}
    m = det_train.score_predictions(preds, ctx, tmp_path, "11point")
    assert m["mAP"] == pytest.approx(100.0)
    # comp4 line of the first detection: toolkit x0 = xmin - 1 -> written back as the XML's xmin
    image_id, boxes, _, labels = preds[0]
    obj = [o for o in ds.annotations[image_id]["objects"] if not o["difficult"]][0]
    cls = VOC_CLASSES[int(labels[0]) - 1]
    lines = (tmp_path / "voc_results" / f"comp4_det_test_{cls}.txt").read_text().splitlines()
    row = [ln.split() for ln in lines if ln.split()[0] == image_id][0]
    assert [float(v) for v in row[2:]] == [float(v) for v in obj["bbox"]]


def test_coco_scoring_maps_labels_back_to_category_ids(toy_world, tmp_path):
    root = toy_world / "coco"
    ds = COCODetection(root / "val2017", root / "annotations" / "instances_val2017.json")
    assert ds.cat_ids != list(range(1, len(ds.cat_ids) + 1))  # the toy ids are not contiguous
    preds = []
    for i in range(len(ds)):
        _, t = ds[i]
        preds.append((t["image_id"], t["boxes"], torch.ones(len(t["boxes"])), t["labels"]))
    ctx = {"format": "coco", "classes": ds.classes, "dataset": ds}
    m = det_train.score_predictions(preds, ctx, tmp_path)
    assert m["mAP"] == pytest.approx(100.0) and m["AP50"] == pytest.approx(100.0)
    results = json.loads((tmp_path / "coco_results.json").read_text())
    ann = ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=[results[0]["image_id"]]))
    assert {r["category_id"] for r in results} <= set(ds.cat_ids)
    first = [r for r in results if r["image_id"] == results[0]["image_id"]]
    got = torch.tensor(sorted(r["bbox"] for r in first))
    assert torch.allclose(got, torch.tensor(sorted(a["bbox"] for a in ann), dtype=got.dtype), atol=1e-4)


def test_to_original_undoes_the_test_resize():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 200.0]])
    out = det_train._to_original(boxes, {"scale": (2.0, 0.5), "size": (300, 100)})
    assert out.tolist() == [[5.0, 40.0, 15.0, 300.0]]  # y1 = 400 clipped to the height 300


def test_ssd_finetune_writes_metrics_figure_and_result_files(toy_world, backbone, tmp_path):
    metrics = det_train.finetune_detector(_cfg(toy_world, "ssd"), str(backbone), tmp_path / "run")
    for k in ("mAP", "mAP_mean", "mAP_std", "train_img_per_s", "test_img_per_s", "seeds"):
        assert k in metrics
    assert 0.0 <= metrics["mAP"] <= 100.0 and metrics["seeds"] == [0] and metrics["train_img_per_s"] > 0
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert on_disk["mAP"] == metrics["mAP"]
    assert (tmp_path / "run" / "figures" / "detections.png").stat().st_size > 1000
    results = tmp_path / "run" / "seed_0" / "eval" / "voc_results"
    assert len(list(results.glob("comp4_det_test_*.txt"))) == 20
    log = [json.loads(ln) for ln in (tmp_path / "run" / "seed_0" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if r.get("event") == "step"]
    assert log[0]["event"] == "header" and steps[0]["step"] == 1 and log[-1]["final"]


@pytest.mark.slow
def test_interrupted_finetune_resumes_to_the_same_result(toy_world, backbone, tmp_path, monkeypatch):
    cfg = _cfg(toy_world, "ssd", "coco")
    full = det_train.finetune_detector(cfg, str(backbone), tmp_path / "full")

    real_save = runtime.atomic_save

    def save_then_die(obj, path):
        real_save(obj, path)
        raise KeyboardInterrupt("simulated interruption after the first epoch's checkpoint")

    monkeypatch.setattr(runtime, "atomic_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        det_train.finetune_detector(cfg, str(backbone), tmp_path / "cut")
    monkeypatch.setattr(runtime, "atomic_save", real_save)
    state = torch.load(tmp_path / "cut" / "seed_0" / "checkpoints" / "last.pth", weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 2
    resumed = det_train.finetune_detector(cfg, str(backbone), tmp_path / "cut")
    a = torch.load(tmp_path / "full" / "seed_0" / "checkpoints" / "last.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "seed_0" / "checkpoints" / "last.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["mAP"] == full["mAP"] and "AP50" in resumed
    # a finished seed is not trained again
    again = det_train.finetune_detector(cfg, str(backbone), tmp_path / "cut")
    assert again["per_seed"][0]["train_seconds"] == resumed["per_seed"][0]["train_seconds"]


def test_detectron2_backend_without_detectron2_says_how_to_install(toy_world, backbone, tmp_path):
    pytest.importorskip("torch")
    try:
        import detectron2  # noqa: F401
        pytest.skip("detectron2 is installed")
    except ImportError:
        pass
    cfg = _cfg(toy_world)
    cfg["backend"] = "detectron2"
    with pytest.raises(SystemExit, match="from source"):
        det_train.finetune_detector(cfg, str(backbone), tmp_path / "d2")


def test_scaled_lr_is_the_linear_scaling_rule():
    # torchvision's reference: lr 0.02 for 8 GPUs x 2 images; 0.02 / 8 * NGPU otherwise
    assert det_train.scaled_lr(0.02, 2, 8, 16) == pytest.approx(0.02)
    assert det_train.scaled_lr(0.02, 2, 1, 16) == pytest.approx(0.0025)
    assert det_train.scaled_lr(0.001, 4, 2, 32) == pytest.approx(0.00025)
    assert det_train.scaled_lr(0.001, 32, 1, 32) == pytest.approx(0.001)
    assert det_train.scaled_lr(0.02, 2, 1, None) == 0.02  # no reference batch: lr as given
    with pytest.raises(ValueError, match="positive"):
        det_train.scaled_lr(0.02, 0, 1, 16)
