"""Safety battery over the command-line tools and the pipeline: nothing non-finite is reported or
saved, stale results are never reused, one writer per run folder, paths stay inside their roots,
clear errors on the common paths and unpickling only on an explicit command-line flag.

Each case runs a tool the way a user does (its `main(argv)`, in-process) and asserts the exit code
(2 bad input, 1 failure) and that the one `error: ...` line names the culprit.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


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


def _save_backbone(path: Path, fill: float | None = None, seed: int = 0,
                   num_classes: int = 10) -> Path:
    from mixup_transfer.core.checkpoint import build_resnet, save_backbone

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


# -------------------------------------------------------------------------------------------
# finite or nothing


@pytest.mark.parametrize("suite", ["clean", "calibration", "background", "fgsm", "ood"])
def test_evaluate_refuses_nan_network(run, toy_world, nan_ckpt, tmp_path, suite, one_thread):
    out = tmp_path / "out"
    line = expect(run("run_robustness", "--checkpoint", nan_ckpt, "--imagenet",
                      toy_world / "imagenet", "--suites",
    suite,
                      "data.max_val=2", "--image-size", "32", "--resize", "36", "--out", out,
                      "--ood-noise", "uniform", "data.num_workers=0"), 1, "robustness",
                      "non-finite")
    assert "split" in line
    assert not (out / "metrics.json").exists()


def _wsol_over(toy_world) -> list[str]:
    return [f"data.image_root={toy_world}/CUB_200_2011/images",
            f"data.metadata_root={toy_world}/wsol_metadata/CUB", "data.num_workers=0",
            "data.max_val=4", "data.max_train=8", "input.resize=40", "input.crop=32",
            "input.test_size=32", "eval.cam_curve_interval=0.1"]


WSOL_CFG = ROOT / "configs/wsol/toy_multimix.yaml"


def _cam_model(path: Path, toy_world, fill: float | None) -> Path:
    from mixup_transfer.core.runtime import atomic_save
    from wsol.model import CAMModel

    n = len({ln.rsplit(",", 1)[1]
             for ln in (toy_world / "wsol_metadata/CUB/train/class_labels.txt")
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
    expect(run("run_wsol", "evaluate", "--config", WSOL_CFG, "--model", model, "--scoremaps", maps,
               "--out", tmp_path / "m.json", *_wsol_over(toy_world)), 1, "wsol", "split test",
               "non-finite")
    assert not list(maps.rglob("*.npy")) and not (tmp_path / "m.json").exists()


def test_wsol_finetune_diverging_writes_no_model(run, toy_world, tmp_path, one_thread):
    rd = tmp_path / "r"
    code, err = run("run_wsol", "finetune", "--config", WSOL_CFG, "--run-dir", rd,
                    *_wsol_over(toy_world), "optim.epochs=1", "optim.lr_classifier=1e30",
                    "optim.lr=1e30", "eval.every_epochs=0")
    assert code == 1, err
    assert "non-finite" in err
    assert not (rd / "cam_model.pth").exists() and not (rd / "metrics.json").exists()


def _det_cfg(toy_world, kind="ssd"):
    from transfer.detection import config as det_config

    return det_config.resolve_config(
        {
            "model": {
                "type": kind,
                "arch": "resnet18",
                "size": 64,
                "max_size": 64,
                "train_sizes": [64],
                "kwargs": {"detections_per_img": 10}
                if kind == "ssd"
                else {"rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 20},
            },
            "data": {
                "format": "voc",
                "root": str(toy_world / "VOCdevkit"),
                "voc_train": ["2007/trainval"],
                "max_train": 4,
                "max_val": 3,
                "num_workers": 0,
            },
            "optim": {"epochs": 1, "batch_per_process": 2, "lr": 0.01, "warmup_iters": 1},
            "eval": {"batch_size": 3, "figure_examples": 0},
            "seeds": [0],
            "runtime": {"log_every_steps": 1},
        }
    )


@pytest.mark.parametrize("kind", ["ssd", "faster_rcnn_fpn"])
def test_detection_prediction_refuses_nan_outputs(toy_world, kind, one_thread):
    """NaN scores fail every score threshold: without the check a broken detector scores mAP 0 with
    exit 0."""
    from mixup_transfer.core.runtime import NonFiniteOutputError
    from transfer.detection import torchvision_backend as tvb

    cfg = _det_cfg(toy_world, kind)
    _, test, ctx, _ = tvb.build_datasets(cfg)
    model = tvb.build_model(cfg, ctx["num_classes"], None)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    with pytest.raises(NonFiniteOutputError, match=r"detection: split 2007/test: .* non-finite"):
        tvb.predict_sharded(model, test, 3, 0, torch.device("cpu"), split="2007/test")


# ------------------------------------------------------------------------------- content keys
# cover inputs


def _pipeline_cfg(tmp_path: Path, data: Path) -> dict:
    import yaml

    cfg = yaml.safe_load((ROOT / "configs/pipeline/toy.yaml").read_text())
    cfg.update(name="keys", out_root=str(tmp_path / "runs"), methods=["erm"])
    cfg["data"] = {"root": str(data), "generate": None}
    cfg["pretrain"]["config"] = str(ROOT / "configs/pretrain/toy_{method}.yaml")
    for det in cfg["detection"]:
        det["config"] = str(ROOT / det["config"])
    cfg["wsol"]["config"] = str(ROOT / cfg["wsol"]["config"])
    return cfg


def _keys(cfg: dict) -> dict:
    from mixup_transfer.pipeline.run import Pipeline

    return {st.label: st.key for st in Pipeline(cfg).plan()}


@pytest.fixture()
def data_copy(toy_world, tmp_path):
    """A copy of the toy world's index files (images by hard link: the keys list their names)."""
    dst = tmp_path / "data"
    import shutil

    shutil.copytree(toy_world, dst, copy_function=os.link)
    for p in dst.rglob("*"):  # index files are edited by the tests: private copies
        if p.is_file() and p.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            p.unlink()
            shutil.copy(toy_world / p.relative_to(dst), p)
    return dst


def test_stage_keys_follow_the_backbone_and_the_datasets(data_copy, tmp_path):
    cfg = _pipeline_cfg(tmp_path, data_copy)
    before = _keys(cfg)
    # nothing changed: the same keys (an interrupted pipeline is reused)
    assert before == _keys(cfg)
    # a retrained backbone (same pretraining config): every downstream stage of that method reruns
    bb = tmp_path / "runs" / "keys" / "erm" / "pretrain" / "backbone.pth"
    bb.parent.mkdir(parents=True)
    bb.write_bytes(b"weights A")
    with_a = _keys(cfg)
    bb.write_bytes(b"weights B")
    with_b = _keys(cfg)
    changed = {k for k in with_a if with_a[k] != with_b[k]}
    assert changed == {"erm/ssd_voc", "erm/frcnn_coco", "erm/wsol", "erm/robustness"}
    # an edited VOC split file reruns the VOC detector only (the baseline's too)
    split = data_copy / "VOCdevkit/VOC2007/ImageSets/Main/test.txt"
    split.write_text("\n".join(split.read_text().split()[:-1]) + "\n")
    after = _keys(cfg)
    assert {k for k in after if after[k] != with_b[k]} == {"erm/ssd_voc", "baselines/ssd_voc"}
    # edited WSOL metadata, a COCO json, an ImageNet image added: each reruns its readers
    (data_copy / "wsol_metadata/CUB/test/image_sizes.txt").write_text("x")
    again = _keys(cfg)
    assert {k for k in again if again[k] != after[k]} == {"erm/wsol", "baselines/wsol"}
    coco = next((data_copy / "coco/annotations").glob("instances_val*.json"))
    coco.write_text(coco.read_text() + " ")
    third = _keys(cfg)
    assert {k for k in third if third[k] != again[k]} == {"erm/frcnn_coco", "baselines/frcnn_coco"}
    wnid = next(p for p in (data_copy / "imagenet/val").iterdir() if p.is_dir())
    (wnid / "new.JPEG").write_bytes(next(wnid.iterdir()).read_bytes())
    fourth = _keys(cfg)
    assert {k for k in fourth if fourth[k] != third[k]} >= {"erm/pretrain", "erm/robustness",
                                                            "erm/ssd_voc"}


@pytest.mark.parametrize("where,entry,what", [
    ("detection", {"name": "ssd_voc", "config": "c.yaml", "overides": []},
     "detection[0]: unknown key(s) ['overides']"),
    ("wsol", {"config": "c.yaml", "overide": []}, "wsol: unknown key(s) ['overide']"),
    ("wsol", {"config": "c.yaml", "overrides": "a=1"}, "wsol.overrides: expected a list"),
    ("detection", {"config": "c.yaml"}, "detection[0]: 'name' must be a non-empty string"),
])
def test_unknown_keys_in_pipeline_entries_are_errors(data_copy, tmp_path, where, entry, what):
    from mixup_transfer.core.config import ConfigError
    from mixup_transfer.pipeline.run import Pipeline

    cfg = _pipeline_cfg(tmp_path, data_copy)
    cfg[where] = [entry] if where == "detection" else entry
    with pytest.raises(ConfigError) as e:
        Pipeline(cfg)
    assert what in str(e.value)


# ------------------------------------------------------------------------------------ one writer
# per run folder


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_writer_is_refused_and_a_stale_lock_replaced(tmp_path):
    import json
    import socket

    from mixup_transfer.core.lock import LOCK_NAME, RunLockedError, run_lock

    folder = tmp_path / "run"
    with run_lock(folder, "pretraining run"):
        holder = json.loads((folder / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with (
            pytest.raises(
                RunLockedError,
                match=r"another process is writing this pretraining "
                r"run folder \(pid "
                rf"{os.getpid()} ",
            ),
            run_lock(folder, "pretraining run"),
        ):
            pass
    assert not (folder / LOCK_NAME).exists()  # released on exit
    # a lock left by a killed process (same host, no such pid) is stale: taken over
    (folder / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    with run_lock(folder):
        assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    # a lock of another host cannot be checked: refused, naming the file to delete
    (folder / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(RunLockedError, match="delete .*\\.lock"), run_lock(folder):
        pass


def test_pretrain_refuses_a_folder_another_process_writes(run, tmp_path):
    from mixup_transfer.core.lock import run_lock

    rd = tmp_path / "run"
    with run_lock(rd):  # this process plays the first writer
        line = expect(run("run_pretrain", "--config", ROOT / "configs/pretrain/toy_erm.yaml",
                          "--run-dir", rd, f"data.root={tmp_path}/none"), 1, rd,
                          "another process is writing")
    assert "pid" in line


def test_tmp_leftovers_of_a_killed_run_are_removed_on_the_next_start(run, toy_world, nan_ckpt,
                                                                     tmp_path):
    out = tmp_path / "out"
    (out / "figures").mkdir(parents=True)
    dead = _dead_pid()
    left = [out / f"metrics.json.{dead}.tmp", out / "figures" / f"reliability.png.{dead}.tmp"]
    for p in left:
        p.write_bytes(b"x" * 100)
    live = out / f"other.json.{os.getpid()}.tmp"  # a live process's file is kept
    live.write_bytes(b"y")
    expect(run("run_robustness", "--checkpoint", nan_ckpt, "--imagenet", toy_world / "imagenet",
               "--suites", "clean", "data.max_val=2", "--image-size", "32", "--resize", "36",
               "--out", out), 1, "non-finite")
    assert not any(p.exists() for p in left) and live.exists()
    assert not (out / ".lock").exists()


def test_refused_detection_resume_changes_nothing_and_names_real_flags(run, toy_world, tmp_path):
    from mixup_transfer.core import fingerprint as fp
    from transfer.detection.config import load_det_config
    from transfer.detection.torchvision_backend import seed_fingerprint

    config = ROOT / "configs/detection/toy_ssd_voc.yaml"
    over = [f"data.root={toy_world}/VOCdevkit"]
    rd = tmp_path / "det"
    old = load_det_config(config, over)
    fp.write(rd / "seed_0", seed_fingerprint(old, None, 0))
    (rd / "config.yaml").write_text("the old run's config\n")
    line = expect(run("run_detection", "--config", config, "--run-dir", rd, *over, "optim.lr=0.5"),
                  2, "seed_0", "optim.lr")
    assert "--force" in line and "--run-dir" in line
    assert (rd / "config.yaml").read_text() == "the old run's config\n"
    assert sorted(p.name for p in rd.iterdir()) == ["config.yaml", "seed_0"]


def test_figures_are_written_atomically(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mixup_transfer.core.basics import save_figure

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = tmp_path / "f.png"
    save_figure(fig, path, dpi=50)
    good = path.read_bytes()
    assert good[:8] == b"\x89PNG\r\n\x1a\n"

    class Broken:
        def savefig(self, f, **kw):
            f.write(b"half a figure")
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError) as e:
        save_figure(Broken(), path)
    assert str(path) in str(e.value)  # the error names the file
    assert path.read_bytes() == good and list(tmp_path.iterdir()) == [path]
    plt.close(fig)


# ------------------------------------------------------------------------------------ paths stay
# inside roots

ESCAPES = ["../../victim/bird.jpg", "/etc/passwd", "a/../../b.jpg"]


def _wsol_meta_with_id(toy_world, tmp_path, new_id: str) -> Path:
    src = toy_world / "wsol_metadata" / "CUB" / "test"
    first = (src / "image_ids.txt").read_text().splitlines()[0]
    meta = tmp_path / "meta" / "test"
    meta.mkdir(parents=True)
    for name in ("image_ids.txt", "class_labels.txt", "image_sizes.txt", "localization.txt"):
        lines = [ln.replace(first, new_id, 1) for ln in (src / name).read_text().splitlines()
                 if ln.split(",")[0] == first]
        (meta / name).write_text("\n".join(lines) + "\n")
    import shutil

    shutil.copytree(src.parent / "train", meta.parent / "train")
    return meta.parent


@pytest.mark.parametrize("bad", ESCAPES)
def test_wsol_ids_never_leave_their_folders(run, toy_world, tmp_path, bad, one_thread):
    victim = tmp_path / "victim" / "bird.jpg.npy"
    victim.parent.mkdir()
    victim.write_bytes(b"precious")
    meta = _wsol_meta_with_id(toy_world, tmp_path, bad)
    model = _cam_model(tmp_path / "cam_model.pth", toy_world, None)
    maps = tmp_path / "maps" / "deep"
    over = _wsol_over(toy_world) + [f"data.metadata_root={meta}"]
    expect(run("run_wsol", "evaluate", "--config", WSOL_CFG, "--model", model, "--scoremaps", maps,
               *over), 2,
           "image_ids.txt:1", repr(bad), "not a relative path inside its folder")
    assert victim.read_bytes() == b"precious"


def test_scoremap_writer_refuses_an_escaping_id(tmp_path):
    from wsol.data import MetadataError
    from wsol.evaluate import save_scoremap

    save_scoremap(tmp_path / "maps", "001.A/x.jpg", np.zeros((2, 2), np.float32))
    assert (tmp_path / "maps/001.A/x.jpg.npy").is_file()
    with pytest.raises(MetadataError, match="resolves outside"):
        save_scoremap(tmp_path / "maps", "../x.jpg", np.zeros((2, 2), np.float32))
    assert not (tmp_path / "x.jpg.npy").exists()


@pytest.mark.parametrize("bad", ESCAPES)
def test_voc_and_coco_ids_never_leave_their_folders(toy_world, tmp_path, bad):
    import json
    import shutil

    from mixup_transfer.core.data import DataError
    from transfer.datasets import COCODetection, VOCDetection
    from transfer.voc_eval import VOCEvalError, load_voc_annotations

    dst = tmp_path / "VOCdevkit" / "VOC2007"
    shutil.copytree(toy_world / "VOCdevkit/VOC2007/ImageSets", dst / "ImageSets")
    shutil.copytree(toy_world / "VOCdevkit/VOC2007/Annotations", dst / "Annotations")
    split = dst / "ImageSets/Main/test.txt"
    split.write_text(split.read_text().replace(split.read_text().split()[1], bad, 1))
    for call, err in ((lambda: VOCDetection(tmp_path / "VOCdevkit", "2007", "test"), DataError),
                      (lambda: load_voc_annotations(tmp_path / "VOCdevkit", "2007", "test"),
                       VOCEvalError)):
        with pytest.raises(err, match=rf"test.txt:2: image id: {re.escape(repr(bad))} is not a "
                           r"relative path"):
            call()
    ann = json.loads(
        next((toy_world / "coco/annotations").glob("instances_val*.json")).read_text()
    )
    ann["images"][1]["file_name"] = bad
    (tmp_path / "gt.json").write_text(json.dumps(ann))
    with pytest.raises(DataError, match=r"gt.json: images\[1\] .*file_name: .* is not a "
                       r"relative path"):
        COCODetection(toy_world / "coco/val2017", tmp_path / "gt.json")


def test_cub_image_paths_never_leave_their_folder(toy_world, tmp_path):
    import shutil

    from wsol.data import MetadataError, read_cub

    cub = tmp_path / "CUB_200_2011"
    cub.mkdir()
    for name in ("classes.txt", "images.txt", "image_class_labels.txt", "train_test_split.txt",
                 "bounding_boxes.txt"):
        shutil.copy(toy_world / "CUB_200_2011" / name, cub / name)
    lines = (cub / "images.txt").read_text().splitlines()
    lines[0] = lines[0].split()[0] + " ../../outside.jpg"
    (cub / "images.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(MetadataError, match="images.txt: image 1: '../../outside.jpg' is not a "
                                            "relative path"):
        read_cub(cub)


# -------------------------------------------------------------------------------- clear errors on
# common paths


class _BadImages(torch.utils.data.Dataset):
    def __init__(self, path):
        self.path = path

    def __len__(self):
        return 2

    def __getitem__(self, i):
        from mixup_transfer.core.data import read_image

        return torch.zeros(1) if i == 0 else read_image(self.path)


def test_a_bad_file_in_a_dataloader_worker_reads_as_in_the_main_process(tmp_path):
    from mixup_transfer.core import cli

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff" + b"\x00" * 50)
    main_line = None
    for workers in (0, 1):
        with pytest.raises(Exception) as e:
            list(torch.utils.data.DataLoader(_BadImages(bad), batch_size=1, num_workers=workers))
        line = cli.format_error(e.value)
        assert cli.exit_code(e.value) == 2
        assert line.startswith(f"error: {bad}: corrupt or unreadable image") and "\n" not in line
        assert "Traceback" not in line and "worker" not in line
        main_line = main_line or line
        assert line == main_line


def test_worker_message_keeps_a_multiline_original():
    from mixup_transfer.core.cli import worker_message

    msg = ("Caught DataError in DataLoader worker process 3.\nOriginal Traceback (most recent "
           "call last):\n"
           '  File "x.py", line 1, in f\n    raise DataError("a: b")\ncore.data.DataError: a: '
           'b\nsecond line')
    assert worker_message(msg) == "a: b\nsecond line"
    assert worker_message("a plain message: x") is None


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    from PIL import Image

    from mixup_transfer.core.data import DataError, read_image, read_image_uint8

    g16 = np.array([[0, 257, 5000, 65535]], dtype=np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")  # mode I;16
    want = np.round(g16 / 257).astype(np.uint8)[0]   # 0, 1, 19, 255
    assert want.tolist() == [0, 1, 19, 255]
    pil = np.asarray(read_image(tmp_path / "g16.png"))
    # gray, not white
    assert pil[0, :, 0].tolist() == want.tolist() and (pil[..., 0] == pil[..., 2]).all()
    t = read_image_uint8(tmp_path / "g16.png")  # torchvision decodes 16-bit PNGs to uint16
    assert t.dtype == torch.uint8 and t[0, 0].tolist() == want.tolist()
    import cv2

    rgb16 = np.stack([g16, g16 // 2, g16 // 4], -1)[..., ::-1]  # cv2 writes BGR
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb16)
    t = read_image_uint8(tmp_path / "rgb16.png")
    # round(65535, 32767, 16383 / 257)
    assert t.dtype == torch.uint8 and t[:, 0, 3].tolist() == [255, 127, 64]
    Image.fromarray(np.ones((2, 2), np.float32)).save(tmp_path / "f.tiff")
    with pytest.raises(DataError, match=r"f.tiff: unsupported image mode 'F'"):
        read_image(tmp_path / "f.tiff")


def test_sixteen_bit_png_trains_through_the_uint8_path(tmp_path):
    """The uint8 crop + resize kernels take uint8 only: a 16-bit PNG reached them as uint16 and
    failed."""
    from PIL import Image

    from mixup_transfer.core.data import read_image_uint8

    Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64)
                    * 20).save(tmp_path / "a.png")
    x = read_image_uint8(tmp_path / "a.png")
    from torchvision.transforms.v2 import functional as F

    assert F.resize(x, [24, 32], antialias=True).dtype == torch.uint8


@pytest.mark.parametrize("value,what", [("inf", "<xmax> is not a finite number: 'inf'"),
                                        ("nan", "<xmax> is not a finite number: 'nan'"),
                                        ("1e999", "<xmax> is not a finite number"),
                                        ("ten", "malformed number in <xmax>: 'ten'")])
def test_voc_xml_with_a_non_finite_coordinate_is_a_named_error(tmp_path, value, what):
    from mixup_transfer.core.data import DataError, parse_pascal_xml

    xml = tmp_path / "a.xml"
    xml.write_text(
        f"<annotation><size><width>10</width><height>10</height></size><object><name>dog</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>{value}</xmax><ymax>5</ymax></bndbox></object></annotation>"
    )
    with pytest.raises(DataError) as e:
        parse_pascal_xml(xml)
    assert str(e.value).startswith(f"{xml}: object 0: ") and what in str(e.value)


@pytest.mark.parametrize("stage,cfg,what", [
    ("pretrain", {"data": {"root": "r", "max_train": "50"}},
     "config key data.max_train: expected an integer"),
    ("pretrain", {"data": {"root": "r"}, "optim": {"milestones": [75, "150"]}},
     "config key optim.milestones: every item must be an integer"),
    ("pretrain", {"data": {"root": "r"}, "optim": {"lr_classifier": "0.1"}},
     "optim.lr_classifier: expected a number"),
    ("pretrain", {"data": {"root": 5}}, "config key data.root: expected a string"),
    ("detection", {"model": {"train_sizes": [64, "96"]}},
     "model.train_sizes: expected a list of integers"),
    ("detection", {"optim": {"steps": ["a"]}}, "optim.steps: every item must be a number"),
    ("detection", {"seeds": [0, 1.5]}, "config key seeds: every item must be an integer"),
    ("wsol", {"eval": {"iou_thresholds": [50, "70"]}},
     "eval.iou_thresholds: every item must be an integer"),
    ("robustness", {"data": {"max_val": "10"}}, "config key data.max_val: expected an integer"),
    ("detection", {"data": {"max_train": "8"}}, "config key data.max_train: expected an integer"),
    ("robustness", {"pgd_eps": [1]}, "config key pgd_eps: expected a number or a string"),
])
def test_every_config_value_is_type_checked(stage, cfg, what):
    from mixup_transfer.core.config import ConfigError
    from pretrain.task import resolve_config as pretrain
    from transfer.detection.config import resolve_config as detection
    from transfer.robustness.stage import resolve_config as robustness
    from wsol.finetune import resolve_config as wsol

    fn = {"pretrain": pretrain, "detection": detection, "wsol": wsol,
          "robustness": robustness}[stage]
    with pytest.raises(ConfigError) as e:
        fn(cfg)
    assert what in str(e.value)


def test_a_string_for_a_null_default_key_fails_at_the_edge_with_exit_2(run, tmp_path):
    expect(run("run_pretrain", "--config", ROOT / "configs/pretrain/toy_erm.yaml", "--run-dir",
               tmp_path / "r", f"data.root={tmp_path}", 'data.max_train="50"'), 2,
               "data.max_train", "expected an integer")


# ------------------------------------------------------------------------- unpickling only from
# the command line


def _planted(path: Path, marker: Path) -> Path:
    """A checkpoint that creates `marker` when fully unpickled."""
    import pickle

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(path, "wb") as f:
        pickle.dump({"model": Boom()}, f)
    return path


@pytest.mark.parametrize("where", ["override", "config"])
def test_allow_pickle_cannot_come_from_a_config_or_override(run, toy_world, tmp_path, where):
    marker = tmp_path / "pwned"
    w = _planted(tmp_path / "w.pth", marker)
    cfg = WSOL_CFG
    over = _wsol_over(toy_world)
    if where == "override":
        over.append("allow_pickle=true")
    else:
        cfg = tmp_path / "shared_recipe.yaml"
        cfg.write_text(f"_BASE_: {WSOL_CFG}\nallow_pickle: true\n")
    expect(run("run_wsol", "finetune", "--config", cfg, "--weights", w, "--run-dir",
               tmp_path / "r", *over), 2,
           "config key allow_pickle", "--allow-pickle")
    assert not marker.exists()


def test_every_checkpoint_reading_tool_has_the_flag_and_the_message_is_accurate(run, toy_world,
                                                                                tmp_path):
    import argparse

    marker = tmp_path / "pwned"
    planted = _planted(tmp_path / "p.pth", marker)
    det_cfg = ROOT / "configs/detection/toy_ssd_voc.yaml"
    for tool, args in (("run_robustness",
                        ["--checkpoint", planted, "--imagenet", toy_world / "imagenet",
                                           "--out", tmp_path / "o"]),
                       ("run_detection",
                        ["--config", det_cfg, "--weights", planted, "--run-dir", tmp_path / "d",
                                          f"data.root={toy_world}/VOCdevkit"]),
                       ("run_wsol", ["finetune", "--config", WSOL_CFG, "--weights", planted,
                                     "--run-dir", tmp_path / "w", *_wsol_over(toy_world)]),
                       ("convert", ["--to", "torchvision", planted, tmp_path / "c.pth"])):
        line = expect(run(tool, *args), 2, planted, "pickled Python objects", "tools/convert.py")
        assert "--allow-pickle" in line
    assert not marker.exists()
    # --allow-pickle trusts the named file only, and the warning says who asked
    foreign = tmp_path / "foreign.pth"
    ckpt = _save_backbone(tmp_path / "good.pth")
    torch.save({"args": argparse.Namespace(lr=0.1), **torch.load(ckpt)}, foreign)
    with pytest.warns(UserWarning, match="requested by --allow-pickle on the command line"):
        code, err = run("run_robustness", "--checkpoint", foreign, "--imagenet",
                        toy_world / "imagenet", "--suites", "clean", "data.max_val=2",
                        "--image-size", "32", "--resize", "36", "--out", tmp_path / "e",
                        "--allow-pickle")
    assert code == 0, err
    from mixup_transfer.core.checkpoint import CheckpointError, read_checkpoint

    other = tmp_path / "other.pth"
    other.write_bytes(foreign.read_bytes())
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        read_checkpoint(other)


def test_flag_present_on_every_tool_that_reads_a_checkpoint(capsys):
    import importlib.util

    for tool, args in (("run_robustness", []), ("run_detection", []), ("convert", []),
                       ("run_wsol", ["finetune"]), ("run_wsol", ["evaluate"]), ("submit", [])):
        spec = importlib.util.spec_from_file_location(f"{tool}_pickle_flag",
                                                      ROOT / "tools" / f"{tool}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        with pytest.raises(SystemExit):
            mod.main([*args, "--help"])
        assert "--allow-pickle" in capsys.readouterr().out, (tool, args)


# ------------------------------------------------------------------- battery: every input
# truncated, cross-checks


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def _voc_results(devkit: Path, out: Path) -> None:
    from transfer.voc_eval import load_voc_annotations, write_voc_results

    dets: dict = {}
    for image_id, a in load_voc_annotations(devkit, "2007", "test").items():
        for o in a["objects"]:
            dets.setdefault(o["name"], []).append((image_id, 0.9, o["bbox"]))
    write_voc_results(out, "test", dets)


@pytest.mark.parametrize("which,names", [
    # the results name ids the split lost
    ("split", ["comp4_det_test_", "not in the 'test' split file"]),
    ("xml", ["Annotations/", "malformed XML"]),
    ("results", ["comp4_det_test_", "expected 'image_id score"]),
])
def test_truncated_voc_inputs(run, toy_world, tmp_path, which, names):
    import shutil

    devkit = tmp_path / "VOCdevkit"
    shutil.copytree(toy_world / "VOCdevkit/VOC2007/Annotations", devkit / "VOC2007/Annotations")
    shutil.copytree(toy_world / "VOCdevkit/VOC2007/ImageSets", devkit / "VOC2007/ImageSets")
    _voc_results(devkit, tmp_path / "res")
    split = devkit / "VOC2007/ImageSets/Main/test.txt"
    target = {"split": split, "xml": devkit / "VOC2007/Annotations"
              / f"{split.read_text().split()[0]}.xml",
              "results": sorted((tmp_path / "res").glob("*.txt"))[0]}[which]
    _truncate(target)
    expect(run("eval_voc", "--devkit", devkit, "--results", tmp_path / "res"), 2, *names)


@pytest.mark.parametrize("which", ["gt", "res"])
def test_truncated_coco_inputs(run, toy_world, tmp_path, which):
    import json

    gt = json.loads(next((toy_world / "coco/annotations").glob("instances_val*.json")).read_text())
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps([{"image_id": a["image_id"],
                                                    "category_id": a["category_id"],
                                                    "bbox": a["bbox"], "score": 0.9}
                                                    for a in gt["annotations"]]))
    f = _truncate(tmp_path / f"{which}.json")
    expect(run("eval_coco", "--annotations", tmp_path / "gt.json", "--results",
               tmp_path / "res.json"), 2, f,
           "malformed JSON")


@pytest.mark.parametrize("which,what", [("image_ids.txt", "(not in image_ids.txt)"),
                                        ("class_labels.txt", "expected 2 comma-separated fields"),
                                        ("image_sizes.txt", "expected 3 comma-separated fields"),
                                        ("localization.txt", "expected 5 comma-separated fields"),
                                        ("map", "not a readable .npy score map")])
def test_truncated_wsol_inputs(run, toy_world, tmp_path, which, what):
    import shutil

    meta = tmp_path / "meta"
    shutil.copytree(toy_world / "wsol_metadata/CUB/test", meta)
    ids = (meta / "image_ids.txt").read_text().split()
    for i in ids:
        (tmp_path / "maps" / i).parent.mkdir(parents=True, exist_ok=True)
        np.save(tmp_path / "maps" / f"{i}.npy", np.full((8, 8), 0.5, np.float32))
    _truncate(meta / which if which != "map" else tmp_path / "maps" / f"{ids[0]}.npy")
    expect(run("eval_wsol", "--metadata", meta, "--scoremaps", tmp_path / "maps",
               "--cam-curve-interval", "0.1"),
           2, what, tmp_path)


@pytest.mark.parametrize("which,what", [("classes.txt", "(not in classes.txt)"),
                                        ("images.txt", "(not in images.txt)"),
                                        ("image_class_labels.txt", "image_class_labels.txt:"),
                                        ("train_test_split.txt",
                                         "train_test_split.txt: no entry for image id"),
                                        ("bounding_boxes.txt", "bounding_boxes.txt:")])
def test_truncated_cub_files(run, toy_world, tmp_path, which, what):
    import shutil

    cub = tmp_path / "CUB_200_2011"
    cub.mkdir()
    for name in ("classes.txt", "images.txt", "image_class_labels.txt", "train_test_split.txt",
                 "bounding_boxes.txt"):
        shutil.copy(toy_world / "CUB_200_2011" / name, cub / name)
    (cub / "images").symlink_to(toy_world / "CUB_200_2011/images")
    _truncate(cub / which)
    expect(run("run_wsol", "metadata", "--cub", cub, "--out", tmp_path / "m"), 2, what)


@pytest.mark.parametrize("which,what",
                         [("image", "corrupt or unreadable image"), ("xml", "malformed XML"),
                                        ("checkpoint", "truncated or corrupt checkpoint")])
def test_truncated_robustness_inputs(run, toy_world, tmp_path, which, what, one_thread):
    import shutil

    root = tmp_path / "imagenet"
    shutil.copytree(toy_world / "imagenet/val", root / "val")
    shutil.copytree(toy_world / "imagenet/val_boxes", root / "val_boxes")
    ckpt = _save_backbone(tmp_path / "b.pth")
    f = _truncate({"image": sorted(p for p in (root / "val").rglob("*") if p.is_file())[0],
                   "xml": sorted((root / "val_boxes").glob("*.xml"))[0],
                   "checkpoint": ckpt}[which])
    expect(run("run_robustness", "--checkpoint", ckpt, "--imagenet", root, "--suites",
               "background", "--image-size",
                    "32", "--resize", "36", "--out", tmp_path / "out"), 2, f, what)


def test_truncated_config_and_convert_input(run, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\noptim: {lr: 0.1, epochs: [1, 2\n")  # a flow sequence cut off
    expect(run("run_pretrain", "--config", cfg), 2, cfg, "invalid YAML")
    ck = _truncate(_save_backbone(tmp_path / "b.pth"))
    expect(run("convert", "--to", "torchvision", ck, tmp_path / "o.pth"), 2, ck,
           "truncated or corrupt")


def test_cross_check_checkpoint_classes_against_the_data(run, toy_world, tmp_path, one_thread):
    """Same number of classes, other classes: every prediction would be scored against the wrong
    label."""
    from mixup_transfer.core.checkpoint import build_resnet, save_backbone

    classes = sorted(p.name for p in (toy_world / "imagenet/val").iterdir() if p.is_dir())
    for order, code in ((classes, 0), (classes[::-1], 2)):
        path = tmp_path / f"b{code}.pth"
        torch.manual_seed(0)
        save_backbone(path, build_resnet("resnet18", num_classes=len(classes)),
                      {"arch": "resnet18", "method": "erm", "classes": order})
        got = run("run_robustness", "--checkpoint", path, "--imagenet", toy_world / "imagenet",
                  "--suites", "clean",
                       "data.max_val=2", "--image-size", "32", "--resize", "36", "--out",
                       tmp_path / f"o{code}")
        expect(got, code, *([path, "trained on other classes",
                             f"label 0 is {classes[-1]!r} in the checkpoint"]
                            if code else []))


def test_cross_check_voc_xml_filename_against_its_id(run, toy_world, tmp_path):
    import shutil

    from mixup_transfer.core.data import DataError
    from transfer.datasets import VOCDetection

    dst = tmp_path / "VOCdevkit" / "VOC2007"
    shutil.copytree(toy_world / "VOCdevkit/VOC2007/Annotations", dst / "Annotations")
    shutil.copytree(toy_world / "VOCdevkit/VOC2007/ImageSets", dst / "ImageSets")
    first = (dst / "ImageSets/Main/test.txt").read_text().split()[0]
    xml = dst / "Annotations" / f"{first}.xml"
    xml.write_text(xml.read_text().replace(f"<filename>{first}.jpg</filename>",
                                           "<filename>999999.jpg</filename>"))
    with pytest.raises(DataError, match=rf"{first}.xml: <filename> '999999.jpg' is not the image "
                       rf"'{first}'"):
        VOCDetection(tmp_path / "VOCdevkit", "2007", "test")



def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in folder.rglob("*")
            if p.is_file()}


@pytest.mark.parametrize("tool", ["pretrain", "wsol"])
def test_refused_resumes_change_nothing_on_disk(run, toy_world, tmp_path, tool, one_thread):
    from mixup_transfer.core import fingerprint as fp

    rd = tmp_path / "r"
    (rd / "checkpoints").mkdir(parents=True)
    (rd / "checkpoints" / "last.pth").write_bytes(b"a checkpoint")
    (rd / "config.yaml").write_text("the old run\n")
    fp.write(rd, {"config": {"optim": {"lr": 123.0}}, "inputs": {}, "code": "x"})
    before = _snapshot(rd)
    if tool == "pretrain":
        args = ["run_pretrain", "--config", ROOT / "configs/pretrain/toy_erm.yaml", "--run-dir",
                rd, f"data.root={toy_world}/imagenet", "data.num_workers=0"]
    else:
        args = ["run_wsol", "finetune", "--config", WSOL_CFG, "--run-dir", rd,
                *_wsol_over(toy_world)]
    line = expect(run(*args), 2, rd, "was made from another config")
    assert "--force" in line  # both tools have it
    assert _snapshot(rd) == before


def test_lock_without_hard_links_and_a_corrupt_lock(tmp_path, monkeypatch):
    import json

    from mixup_transfer.core.lock import LOCK_NAME, acquire, release

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_NAME).write_text("")  # an old unreadable lock (a crash while writing it): stale
    os.utime(folder / LOCK_NAME, (0, 0))
    path = acquire(folder)
    assert json.loads(path.read_text())["pid"] == os.getpid()
    release(path)

    def no_link(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    path = acquire(folder)
    assert json.loads(path.read_text())["pid"] == os.getpid() and not list(folder.glob("*.new"))
    release(path)
    assert not path.exists()


@pytest.mark.parametrize("key,value,what",
                         [("wsol", "configs/wsol/x.yaml", "config key wsol: expected a mapping"),
                                            ("robustness", ["clean"],
                                             "config key robustness: expected a mapping")])
def test_pipeline_null_default_keys_are_type_checked(data_copy, tmp_path, key, value, what):
    from mixup_transfer.core.config import ConfigError
    from mixup_transfer.pipeline.run import Pipeline

    cfg = _pipeline_cfg(tmp_path, data_copy)
    cfg[key] = value
    with pytest.raises(ConfigError, match=re.escape(what)):
        Pipeline(cfg)
