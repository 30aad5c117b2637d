"""Fine-tuning driver: scoring conventions, outputs, resume (tiny toy world, CPU)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mixup_transfer.core import runtime
from mixup_transfer.core.checkpoint import build_resnet, save_backbone
from mixup_transfer.core.constants import VOC_CLASSES
from mixup_transfer.core.fingerprint import write as fp_write
from transfer.datasets import COCODetection, VOCDetection
from transfer.detection import config as det_config
from transfer.detection import d2_backend, scoring, stage
from transfer.detection import torchvision_backend as tvb

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bb") / "r18.pth"
    save_backbone(path, build_resnet("resnet18", num_classes=10),
                  {"arch": "resnet18", "num_classes": 10, "method": "erm", "epochs": 0,
                   "config": "", "metrics": {}})
    return path


def _cfg(toy_world, kind="ssd", fmt="voc", **solver):
    cfg = {
        "model": {"type": kind, "arch": "resnet18", "size": 64, "max_size": 64,
                  "train_sizes": [64], "kwargs": {"detections_per_img": 10} if kind == "ssd" else
                  {"anchor_sizes": [16, 32, 64, 128, 256], "rpn_pre_nms_top_n_train": 100,
                   "rpn_post_nms_top_n_train": 50, "rpn_pre_nms_top_n_test": 50,
                   "rpn_post_nms_top_n_test": 20, "rpn_batch_size_per_image": 32,
                   "box_batch_size_per_image": 16, "box_detections_per_img": 10}},
        "data": {"format": fmt, "root": str(toy_world / ("VOCdevkit" if fmt == "voc" else "coco")),
                 "voc_train": ["2007/trainval"], "max_train": 8, "max_val": 6, "num_workers": 0,
                 "zoom_out_ratio": 2.0},
        "optim": {"epochs": 2, "batch_per_process": 4, "lr": 0.01, "warmup_iters": 2,
                  "steps": [0.75], **solver},
        "eval": {"batch_size": 6, "figure_examples": 2},
        "seeds": [0],
        "runtime": {"log_every_steps": 1},
    }
    return det_config.resolve_config(cfg)


def test_lr_schedule_hand_values():
    from mixup_transfer.core.schedule import lr_factor

    def f(it):
        return lr_factor(it, "step", milestones=[50, 80], gamma=0.1, warmup=10, warmup_start=0.1)
    assert f(0) == pytest.approx(0.1) and f(5) == pytest.approx(0.55) and f(10) == 1.0
    assert f(49) == 1.0 and f(50) == pytest.approx(0.1) and f(80) == pytest.approx(0.01)


def test_unknown_config_key_is_rejected(toy_world):
    from mixup_transfer.core.config import ConfigError

    with pytest.raises(ConfigError, match="optim.lrr"):
        det_config.resolve_config({"optim": {"lrr": 0.1}})


def test_voc_scoring_of_ground_truth_is_perfect_and_uses_xml_coordinates(toy_world, tmp_path):
    ds = VOCDetection(toy_world / "VOCdevkit", "2007", "test")
    preds = []
    for i in range(len(ds)):
        _, t = ds[i]
        keep = ~t["difficult"]
        preds.append((t["image_id"], t["boxes"][keep], torch.ones(int(keep.sum())),
                      t["labels"][keep]))
    ctx = {"format": "voc", "classes": VOC_CLASSES, "split": "test", "dataset": ds}
    m = scoring.score_predictions(preds, ctx, tmp_path, "11point")
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
    m = scoring.score_predictions(preds, ctx, tmp_path)
    assert m["AP"] == pytest.approx(100.0) and m["AP50"] == pytest.approx(100.0)
    assert "mAP" not in m and scoring.primary_key(m) == "AP"  # COCO AP is not called mAP
    results = json.loads((tmp_path / "coco_results.json").read_text())
    ann = ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=[results[0]["image_id"]]))
    assert {r["category_id"] for r in results} <= set(ds.cat_ids)
    first = [r for r in results if r["image_id"] == results[0]["image_id"]]
    got = torch.tensor(sorted(r["bbox"] for r in first))
    assert torch.allclose(got, torch.tensor(sorted(a["bbox"] for a in ann), dtype=got.dtype),
                          atol=1e-4)


def test_to_original_undoes_the_test_resize():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 200.0]])
    out = tvb._to_original(boxes, {"scale": (2.0, 0.5), "size": (300, 100)})
    assert out.tolist() == [[5.0, 40.0, 15.0, 300.0]]  # y1 = 400 clipped to the height 300


def test_ssd_finetune_writes_metrics_figure_and_result_files(toy_world, backbone, tmp_path):
    metrics = stage.finetune_detector(_cfg(toy_world, "ssd"), str(backbone), tmp_path / "run")
    for k in ("mAP", "mAP_mean", "mAP_std", "train_img_per_s", "test_img_per_s", "seeds"):
        assert k in metrics
    assert (
        0.0 <= metrics["mAP"] <= 100.0
        and metrics["seeds"] == [0]
        and metrics["train_img_per_s"] > 0
    )
    assert metrics["mAP_std"] is None and metrics["primary"] == "mAP"  # one seed: no spread
    assert metrics["units"]["mAP"] == "%" and metrics["units"]["train_img_per_s"] == "images/s"
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert on_disk["mAP"] == metrics["mAP"]
    assert (tmp_path / "run" / "figures" / "detections.png").stat().st_size > 1000
    results = tmp_path / "run" / "seed_0" / "eval" / "voc_results"
    assert len(list(results.glob("comp4_det_test_*.txt"))) == 20
    log = [json.loads(ln)
           for ln in (tmp_path / "run" / "seed_0" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if r.get("event") == "step"]
    assert log[0]["event"] == "header" and steps[0]["step"] == 1 and log[-1]["final"]


@pytest.mark.slow
def test_interrupted_finetune_resumes_to_the_same_result(toy_world, backbone, tmp_path,
                                                         monkeypatch):
    cfg = _cfg(toy_world, "ssd", "coco")
    full = stage.finetune_detector(cfg, str(backbone), tmp_path / "full")

    real_save = runtime.atomic_save

    def save_then_die(obj, path):
        real_save(obj, path)
        raise KeyboardInterrupt("simulated interruption after the first epoch's checkpoint")

    monkeypatch.setattr(runtime, "atomic_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        stage.finetune_detector(cfg, str(backbone), tmp_path / "cut")
    monkeypatch.setattr(runtime, "atomic_save", real_save)
    state = torch.load(tmp_path / "cut" / "seed_0" / "checkpoints" / "last.pth", weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 2
    resumed = stage.finetune_detector(cfg, str(backbone), tmp_path / "cut")
    a = torch.load(tmp_path / "full" / "seed_0" / "checkpoints" / "last.pth",
                   weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "seed_0" / "checkpoints" / "last.pth",
                   weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["AP"] == full["AP"] and "AP50" in resumed and "mAP" not in resumed
    # a finished seed is not trained again
    again = stage.finetune_detector(cfg, str(backbone), tmp_path / "cut")
    assert again["per_seed"][0]["train_seconds"] == resumed["per_seed"][0]["train_seconds"]


def test_detectron2_backend_without_detectron2_says_how_to_install(toy_world, backbone, tmp_path):
    if importlib.util.find_spec("detectron2") is not None:
        pytest.skip("detectron2 is installed")
    cfg = _cfg(toy_world)
    cfg["backend"] = "detectron2"
    # an exception, not SystemExit
    with pytest.raises(d2_backend.Detectron2BackendError, match="from source"):
        stage.finetune_detector(cfg, str(backbone), tmp_path / "d2")


def test_scaled_lr_is_the_linear_scaling_rule():
    # torchvision's reference: lr 0.02 for 8 GPUs x 2 images; 0.02 / 8 * NGPU otherwise
    assert det_config.scaled_lr(0.02, 2, 8, 16) == pytest.approx(0.02)
    assert det_config.scaled_lr(0.02, 2, 1, 16) == pytest.approx(0.0025)
    assert det_config.scaled_lr(0.001, 4, 2, 32) == pytest.approx(0.00025)
    assert det_config.scaled_lr(0.001, 32, 1, 32) == pytest.approx(0.001)
    assert det_config.scaled_lr(0.02, 2, 1, None) == 0.02  # no reference batch: lr as given
    with pytest.raises(ValueError, match="positive"):
        det_config.scaled_lr(0.02, 0, 1, 16)


# ------------------------------------------------------------------------------------------------
# The detectron2 backend's configuration (pure: no detectron2 needed)


def _d2_cfg(toy_world, fmt="voc", **over):
    cfg = _cfg(toy_world, "faster_rcnn_fpn", fmt)
    cfg["backend"] = "detectron2"
    cfg["data"]["zoom_out_ratio"] = 4.0  # back to the default: an SSD-only key
    for dotted, value in over.items():
        node = cfg
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    return det_config.resolve_config(cfg)


def test_d2_datasets_use_the_toolkits_own_names_and_real_classes(toy_world):
    specs = d2_backend.dataset_specs(_d2_cfg(toy_world, "voc",
                                             data__voc_train=["2007/trainval", "2012/trainval"],
                                             data__max_train=40))
    # the prefix of the concatenation, like the torchvision backend's Subset of the ConcatDataset:
    # 30 + 10
    assert [(s["name"], len(s["ids"])) for s in specs["train"]] == [
        ("mt_voc_2007_trainval_first30", 30),
        ("mt_voc_2012_trainval_first10", 10),
    ]
    assert specs["test"]["name"] == "mt_voc_2007_test_first6" and specs["test"]["year"] == 2007
    assert specs["classes"] == list(VOC_CLASSES)
    coco = d2_backend.dataset_specs(_d2_cfg(toy_world, "coco", data__max_train=None,
                                            data__max_val=None))
    ds = COCODetection(toy_world / "coco" / "val2017",
                       toy_world / "coco" / "annotations" / "instances_val2017.json")
    # the json's, not COCO's 80
    assert coco["classes"] == list(ds.classes) and len(coco["classes"]) == 20
    assert (
        coco["train"][0]["name"] == "mt_coco_train2017"
        and coco["test"]["name"] == "mt_coco_val2017"
    )
    assert coco["test"]["id_map"] == {c: i for i, c in enumerate(ds.cat_ids)}


def test_d2_config_maps_every_toolkit_override(toy_world):
    cfg = _d2_cfg(toy_world, optim__epochs=3, optim__batch_per_process=4, optim__lr=0.005,
                  optim__steps=[0.5, 0.75], optim__warmup_iters=7, optim__gamma=0.2,
                  optim__weight_decay=5e-4, model__trainable_layers=5, model__norm="bn",
                  data__num_workers=1)
    specs = d2_backend.dataset_specs(cfg)
    kind, d2, mapped = d2_backend.build_detectron2_config(cfg, "/x/w.pkl", specs, world=2,
                                                          n_train=60, device="cpu")
    assert kind == "FPN"
    # 60 images / (4 per process x 2 processes) = 7 iterations an epoch (drop_last), x 3 epochs
    assert d2["SOLVER"]["IMS_PER_BATCH"] == 8 and d2["SOLVER"]["MAX_ITER"] == 21
    assert d2["SOLVER"]["STEPS"] == [10, 16]  # round(0.5 x 21), round(0.75 x 21)
    assert d2["SOLVER"]["BASE_LR"] == 0.005 and d2["SOLVER"]["WARMUP_ITERS"] == 7
    assert d2["SOLVER"]["GAMMA"] == 0.2 and d2["SOLVER"]["WEIGHT_DECAY"] == 5e-4
    assert d2["MODEL"]["DEVICE"] == "cpu" and d2["DATALOADER"]["NUM_WORKERS"] == 1
    assert d2["MODEL"]["BACKBONE"]["FREEZE_AT"] == 0 and d2["MODEL"]["RESNETS"]["NORM"] == "BN"
    assert (
        d2["MODEL"]["RESNETS"]["DEPTH"] == 18 and d2["MODEL"]["RESNETS"]["RES2_OUT_CHANNELS"] == 64
    )
    assert d2["MODEL"]["ROI_HEADS"]["NUM_CLASSES"] == 20 and d2["TEST"]["EVAL_PERIOD"] == 0
    assert d2["DATASETS"] == {"TRAIN": ["mt_voc_2007_trainval_first8"],
                              "TEST": ["mt_voc_2007_test_first6"]}
    assert d2["INPUT"]["MIN_SIZE_TRAIN"] == [64] and d2["INPUT"]["MIN_SIZE_TEST"] == 64
    assert d2["MODEL"]["ANCHOR_GENERATOR"]["SIZES"] == [[16], [32], [64], [128], [256]]
    assert (
        d2["MODEL"]["RPN"]["POST_NMS_TOPK_TEST"] == 20 and d2["TEST"]["DETECTIONS_PER_IMAGE"] == 10
    )
    assert mapped["optim.epochs"] == "SOLVER.MAX_ITER=21"
    from transfer.convert import detectron2_config_problems
    assert detectron2_config_problems(d2, "resnet18") == []
    # max_iter wins over epochs; defaults are mapped too, resolved like transfer.detection.models
    # resolves them
    cfg = _d2_cfg(toy_world, optim__max_iter=40)
    _, d2, _ = d2_backend.build_detectron2_config(cfg, "/x/w.pkl", d2_backend.dataset_specs(cfg),
                                                  n_train=60, device="cuda")
    assert d2["SOLVER"]["MAX_ITER"] == 40 and d2["SOLVER"]["STEPS"] == [30]  # steps [0.75] of _cfg
    assert d2["SOLVER"]["IMS_PER_BATCH"] == 4 and d2["SOLVER"]["WARMUP_ITERS"] == 2  # one process
    assert d2["SOLVER"]["MOMENTUM"] == 0.9 and d2["SOLVER"]["WARMUP_FACTOR"] == 0.001  # DEFAULTS
    assert d2["MODEL"]["DEVICE"] == "cuda"
    # norm auto + trainable_layers null with a pretrained trunk: FrozenBN, 3 trainable stages
    assert (
        d2["MODEL"]["RESNETS"]["NORM"] == "FrozenBN" and d2["MODEL"]["BACKBONE"]["FREEZE_AT"] == 2
    )
    # the toolkit's R50-C4 recipe file gives detectron2 MoCo's schedule: 24k at 16 on 8 processes,
    # SyncBN
    from mixup_transfer.core.config import load_config
    cfg = load_config(ROOT / "configs" / "detection" / "frcnn_r50_c4_voc0712.yaml",
                      ["backend=detectron2", f"data.root={toy_world / 'VOCdevkit'}",
                       "runtime.precision=fp16"],
                      defaults=det_config.DEFAULTS)
    kind, d2, _ = d2_backend.build_detectron2_config(cfg, "/x/w.pkl",
                                                     d2_backend.dataset_specs(cfg), world=8,
                                                     n_train=16551, device="cuda")
    assert kind == "C4" and d2["MODEL"]["ROI_HEADS"]["NAME"] == "Res5ROIHeadsExtraNorm"
    assert d2["SOLVER"]["IMS_PER_BATCH"] == 16 and d2["SOLVER"]["MAX_ITER"] == 24000
    # MoCo: 18k, 22k of 24k
    assert d2["SOLVER"]["STEPS"] == [18000, 22000] and d2["SOLVER"]["BASE_LR"] == 0.02
    assert d2["MODEL"]["RESNETS"]["NORM"] == "SyncBN" and d2["MODEL"]["BACKBONE"]["FREEZE_AT"] == 0
    assert d2["INPUT"]["MIN_SIZE_TEST"] == 800 and d2["SOLVER"]["AMP"]["ENABLED"] is True


@pytest.mark.parametrize("over,match", [
    (dict(model__type="ssd"), "detectron2 has no SSD"),
    (dict(model__type="faster_rcnn_c4"), "basic-block ResNet"),
    (dict(eval__every_epochs=1), "eval.every_epochs=1"),
    (dict(runtime__precision="bf16"), "bf16"),
    (dict(runtime__precision="fp16"), "fp16 on CPU"),
    (dict(data__photometric=False), "data.photometric"),
    (dict(model__kwargs={"anchor_sizes": [16, 32]}), "one size per FPN level"),
    (dict(model__kwargs={"box_nms_thresh": 0.4}), "model.kwargs.box_nms_thresh"),
    (dict(optim__batch_per_process=2, optim__epochs=12, optim__max_iter=0, optim__momentum=0.8,
          eval__every_epochs=2),
     "eval.every_epochs=2"),
])
def test_d2_config_refuses_what_it_cannot_honour(toy_world, over, match):
    cfg = _d2_cfg(toy_world, **over)
    with pytest.raises(d2_backend.Detectron2BackendError, match=match):
        d2_backend.build_detectron2_config(cfg, "/x/w.pkl", d2_backend.dataset_specs(cfg),
                                           n_train=60, device="cpu")


def test_nonfinite_boxes_and_scores_are_counted_and_stop_by_hand():
    """The one check both backends run on their predictions: 1 NaN + 1 inf box value, 1 NaN
    score."""
    from mixup_transfer.core.runtime import NonFiniteOutputError

    nan, inf = float("nan"), float("inf")
    preds = [(1, torch.tensor([[0.0, 0.0, 1.0, 1.0], [nan, 0.0, inf, 1.0]]),
              torch.tensor([0.5, nan]), torch.tensor([1, 2])),
             (2, torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))]
    assert scoring.count_nonfinite(preds) == 3 and scoring.count_nonfinite(preds[1:]) == 0
    with pytest.raises(NonFiniteOutputError, match=r"detection: split 2007/test: .*\(3 non-finite "
                       r"box, score or raw "
                                                   r"head output values\)"):
        scoring.check_finite("2007/test", 3)
    scoring.check_finite("2007/test", 0)  # nothing to stop
    assert scoring.split_name({"data": {"format": "voc", "voc_test": "2007/test"}}) == "2007/test"
    coco = {"data": {"format": "coco", "coco_val": ["val2017", "a.json"]}}
    assert scoring.split_name(coco) == "['val2017', 'a.json']"


def test_a_refused_detectron2_resume_changes_nothing_on_disk(toy_world, tmp_path):
    """Another config (or backbone) in a detectron2 run folder is refused before anything is
    written; the keys a resume may change, and more seeds, are accepted. Runs without detectron2:
    the check comes first."""
    from mixup_transfer.core.fingerprint import FingerprintMismatch

    weights = tmp_path / "backbone.pth"
    weights.write_bytes(b"the backbone")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fp_write(run_dir, d2_backend.run_fingerprint(_d2_cfg(toy_world), str(weights)))
    (run_dir / "config.yaml").write_text("the first run's config\n")
    before = {p: p.read_bytes() for p in sorted(run_dir.rglob("*"))}
    with pytest.raises(FingerprintMismatch, match=r"config.optim.lr: 0.01 -> 0.5"):
        d2_backend._prepare(_d2_cfg(toy_world, optim__lr=0.5), str(weights), run_dir)
    weights.write_bytes(b"another backbone")
    with pytest.raises(FingerprintMismatch, match="input weights"):
        d2_backend._prepare(_d2_cfg(toy_world), str(weights), run_dir)
    assert {p: p.read_bytes() for p in sorted(run_dir.rglob("*"))} == before
    weights.write_bytes(b"the backbone")
    d2_backend.check_resume(_d2_cfg(toy_world, runtime__log_every_steps=7, seeds=[0, 1]),
                            str(weights), run_dir)


def test_allow_pickle_reaches_the_processes_that_num_gpus_spawns(tmp_path, monkeypatch, run):
    """detectron2's launch (faked: each "process" starts with nothing trusted, as a spawned one
    does) gets the checkpoint named with --allow-pickle trusted again in every process; without the
    flag in none."""
    import os
    import sys
    import types

    from mixup_transfer.core import checkpoint

    seen = []

    def fake_launch(fn, num_gpus, num_machines, machine_rank, dist_url, args):
        for _ in range(num_gpus):
            monkeypatch.setattr(checkpoint, "_TRUSTED", set())  # a fresh process
            fn(*args)

    def fake_finetune(cfg, weights, run_dir):
        seen.append(os.path.realpath(weights) in checkpoint._TRUSTED)
        runtime.write_json({"primary": "mAP", "mAP": 1.0}, Path(run_dir) / "metrics.json")

    engine = types.ModuleType("detectron2.engine")
    engine.launch = fake_launch
    monkeypatch.setitem(sys.modules, "detectron2", types.ModuleType("detectron2"))
    monkeypatch.setitem(sys.modules, "detectron2.engine", engine)
    monkeypatch.setattr(d2_backend, "require_detectron2", lambda: None)
    monkeypatch.setattr(d2_backend, "finetune", fake_finetune)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(checkpoint, "_TRUSTED", set())
    weights = tmp_path / "pickled.pth"
    weights.write_bytes(b"a pickled checkpoint")
    config = ROOT / "configs/detection/toy_frcnn_voc.yaml"
    for flag, run_dir in ((["--allow-pickle"], "trusted"), ([], "untrusted")):
        code, err = run("run_detection", "--config", config, "--backend", "detectron2",
                        "--num-gpus", 2, "--weights", weights, "--run-dir", tmp_path / run_dir,
                        *flag)
        assert code == 0, err
    assert seen == [True, True, False, False]



# ------------------------------------------------------------------------------------------------
# Through detectron2 (the `d2` group: `make d2` builds it; skipped where it is not importable)

def _tiny_d2(toy_world, fmt, **over):
    base = dict(optim__max_iter=2, optim__batch_per_process=2, optim__warmup_iters=1,
                data__max_train=4, data__max_val=4, eval__batch_size=4, eval__figure_examples=1,
                runtime__log_every_steps=1)
    base.update(over)
    return _d2_cfg(toy_world, fmt, **base)


@pytest.mark.d2
def test_d2_toy_voc_end_to_end_two_seeds_one_evaluation_and_resume(toy_world, backbone, tmp_path,
                                                                   monkeypatch):
    pytest.importorskip("detectron2")
    import detectron2.engine.defaults as d2defaults
    import detectron2.evaluation as d2eval
    from detectron2.data import DatasetCatalog, MetadataCatalog

    calls = []
    real = d2eval.inference_on_dataset
    counted = lambda *a, **k: calls.append(1) or real(*a, **k)  # noqa: E731
    monkeypatch.setattr(d2eval, "inference_on_dataset", counted)
    # DefaultTrainer.test (the EvalHook's)
    monkeypatch.setattr(d2defaults, "inference_on_dataset", counted)
    cfg = _tiny_d2(toy_world, "voc", seeds=[0, 1])
    m = stage.finetune_detector(cfg, str(backbone), tmp_path / "run")
    assert len(calls) == 2  # one evaluation per seed: no EvalHook + test
    assert m["seeds"] == [0, 1] and m["backend"] == "detectron2" and m["iterations"] == 2
    maps = [s["mAP"] for s in m["per_seed"]]
    assert m["mAP_mean"] == pytest.approx(np.mean(maps)) and m["mAP_std"] == pytest.approx(
        np.std(maps, ddof=1)
    )
    assert m["train_img_per_s"] > 0 and m["test_img_per_s"] > 0
    assert set(m["detectron2"]) == {"AP", "AP50", "AP75"}
    assert "mt_voc_2007_test_first4" in DatasetCatalog.list()
    assert len(DatasetCatalog.get("mt_voc_2007_test_first4")) == 4
    assert MetadataCatalog.get("mt_voc_2007_test_first4").thing_classes == list(VOC_CLASSES)
    d2yaml = yaml.safe_load((tmp_path / "run" / "detectron2_voc_resnet18_FPN.yaml").read_text())
    assert d2yaml["MODEL"]["DEVICE"] == "cpu" and d2yaml["SOLVER"]["MAX_ITER"] == 2
    assert d2yaml["DATASETS"]["TRAIN"] == ["mt_voc_2007_trainval_first4"]
    assert len(list((tmp_path / "run" / "seed_1" / "eval"
                     / "voc_results").glob("comp4_det_test_*.txt"))) == 20
    assert (tmp_path / "run" / "figures" / "detections.png").is_file()
    # a rerun skips finished seeds; a seed without metrics.json resumes from detectron2's last
    # checkpoint
    (tmp_path / "run" / "seed_1" / "metrics.json").unlink()
    again = stage.finetune_detector(cfg, str(backbone), tmp_path / "run")
    assert len(calls) == 3 and again["per_seed"][0] == m["per_seed"][0]
    assert again["per_seed"][1]["mAP"] == pytest.approx(m["per_seed"][1]["mAP"])
    assert again["per_seed"][1]["resumed_at"] == 2


@pytest.mark.d2
def test_d2_toy_coco_end_to_end_and_cli(toy_world, backbone, tmp_path, capsys):
    pytest.importorskip("detectron2")
    from detectron2.data import MetadataCatalog

    spec = importlib.util.spec_from_file_location("finetune_cli",
                                                  ROOT / "tools" / "run_detection.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    cfg_path = tmp_path / "toy.yaml"
    cfg = _tiny_d2(toy_world, "coco")
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["--config", str(cfg_path), "--weights", str(backbone), "--run-dir",
                     str(tmp_path / "run")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["seeds"] == [0] and printed["iterations"] == 2 and "AP_mean" in printed
    assert set(printed["detectron2"]) >= {"AP", "AP50", "AP75"}  # real metrics, not {}
    meta = MetadataCatalog.get("mt_coco_val2017_first4")
    assert len(meta.thing_classes) == 20 and meta.thing_classes[0] == "person"
    d2yaml = yaml.safe_load((tmp_path / "run" / "detectron2_coco_resnet18_FPN.yaml").read_text())
    assert d2yaml["MODEL"]["ROI_HEADS"]["NUM_CLASSES"] == 20
    assert (tmp_path / "run" / "seed_0" / "eval" / "coco_results.json").is_file()
    # a setting it cannot honour: an error message and exit status 2, no traceback
    assert cli.main(["--config", str(cfg_path), "--weights", str(backbone), "--run-dir",
                     str(tmp_path / "bad"), "runtime.precision=bf16"]) == 2
    assert "bf16" in capsys.readouterr().err
    # refused before anything is written: nothing blocks a rerun
    assert not (tmp_path / "bad").exists()
