"""Bad-input battery over the command-line tools.

Every case runs a tool the way a user does (its `main(argv)`, wrapped by
`mixup_transfer/core/cli.py`, in-process so the whole file stays fast; a few run as subprocesses
where the process itself matters: disk full, --debug) and asserts the exit code (2 bad input, 1
failure) and that the one `error: ...` line names the culprit (file, line, key or id). Inputs are
tiny copies of the toy world's files, edited to be wrong.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert lines, f"no 'error:' line in stderr:\n{err}"
    assert "Traceback" not in err, err
    return lines[0]


def expect(result, code: int, *names):
    got, err = result
    assert got == code, f"exit {got}, expected {code}; stderr:\n{err}"
    line = _error_line(err) if code != 0 else ""
    for n in names:
        assert str(n) in err, f"{n!r} not named in:\n{err}"
    return line


# ------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def resnet18_ckpt(tmp_path_factory, toy_world):
    """A contract backbone checkpoint (resnet18, fc for the toy world's 10 ImageNet classes)."""
    from mixup_transfer.core.checkpoint import build_resnet, save_backbone

    path = tmp_path_factory.mktemp("ckpt") / "backbone.pth"
    torch.manual_seed(0)
    save_backbone(path, build_resnet("resnet18", num_classes=10),
                  {"arch": "resnet18", "method": "erm"})
    return path


@pytest.fixture()
def voc(toy_world, tmp_path):
    """A copy of the toy VOC2007 annotations + split files (no images: the evaluator reads none)
    and a results folder with one correct detection per ground-truth box of the first test
    image."""
    from transfer.voc_eval import load_voc_annotations, write_voc_results

    src = toy_world / "VOCdevkit" / "VOC2007"
    dst = tmp_path / "VOCdevkit" / "VOC2007"
    shutil.copytree(src / "Annotations", dst / "Annotations")
    shutil.copytree(src / "ImageSets", dst / "ImageSets")
    ann = load_voc_annotations(tmp_path / "VOCdevkit", "2007", "test")
    dets: dict = {}
    for image_id, a in ann.items():
        for o in a["objects"]:
            dets.setdefault(o["name"], []).append((image_id, 0.9, o["bbox"]))
    results = tmp_path / "results"
    write_voc_results(results, "test", dets)
    test_ids = list(ann)
    return {"devkit": tmp_path / "VOCdevkit", "root": dst, "results": results, "ids": test_ids,
            "split": dst / "ImageSets" / "Main" / "test.txt"}


def eval_voc(run, v, *extra):
    return run("eval_voc", "--devkit", v["devkit"], "--results", v["results"], *extra)


@pytest.fixture()
def coco(toy_world, tmp_path):
    gt = json.loads((toy_world / "coco" / "annotations" / "instances_val2017.json").read_text())
    res = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
            "score": 0.9}
           for a in gt["annotations"]]
    return {"gt": gt, "res": res, "dir": tmp_path}


def eval_coco(run, c, gt=None, res=None):
    gt_path, res_path = c["dir"] / "gt.json", c["dir"] / "res.json"
    gt_path.write_text(gt if isinstance(gt, str) else json.dumps(c["gt"] if gt is None else gt))
    res_path.write_text(res if isinstance(res, str)
                        else json.dumps(c["res"] if res is None else res))
    return run("eval_coco", "--annotations", gt_path, "--results", res_path, "--backend",
               "pycocotools")


@pytest.fixture()
def wsol_split(toy_world, tmp_path):
    """A one-image wsolevaluation split (copied from the toy test split) and a valid score map for
    it."""
    src = toy_world / "wsol_metadata" / "CUB" / "test"
    first = (src / "image_ids.txt").read_text().splitlines()[0]
    meta = tmp_path / "meta"
    meta.mkdir()
    for name in ("image_ids.txt", "class_labels.txt", "image_sizes.txt", "localization.txt"):
        lines = [ln for ln in (src / name).read_text().splitlines() if ln.split(",")[0] == first]
        (meta / name).write_text("\n".join(lines) + "\n")
    maps = tmp_path / "maps"
    (maps / first).parent.mkdir(parents=True)
    np.save(maps / f"{first}.npy", np.full((8, 8), 0.5, np.float32))
    return {"meta": meta, "maps": maps, "id": first, "map": maps / f"{first}.npy"}


def eval_wsol(run, w):
    return run("eval_wsol", "--metadata", w["meta"], "--scoremaps", w["maps"],
               "--cam-curve-interval", "0.1")


def _replace_line(path: Path, lineno: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[lineno - 1] = text
    path.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------------
# eval_voc


def test_voc_good_input_scores(run, voc, capsys):
    code, _ = eval_voc(run, voc)
    assert code == 0


@pytest.mark.parametrize("what", ["devkit", "results"])
def test_voc_missing_folder(run, voc, what, tmp_path):
    voc[what] = tmp_path / "nowhere"
    expect(eval_voc(run, voc), 2, tmp_path / "nowhere")


def test_voc_empty_results_folder(run, voc, tmp_path):
    (tmp_path / "empty").mkdir()
    voc["results"] = tmp_path / "empty"
    expect(eval_voc(run, voc), 2, "empty", "no result files")


@pytest.mark.parametrize("line,what", [
    ("{id} 0.9 1 2 3", "expected 'image_id score xmin ymin xmax ymax'"),
    ("{id} high 1 2 3 4", "malformed number"),
    ("{id} nan 1 2 3 4", "non-finite"),
    ("nosuchimage 0.9 1 2 3 4", "unknown image id 'nosuchimage'"),
])
def test_voc_bad_result_line(run, voc, line, what):
    f = next(voc["results"].glob("comp4_det_test_*.txt"))
    _replace_line(f, 2, line.format(id=voc["ids"][0]))
    expect(eval_voc(run, voc), 2, f"{f}:2", what)


def test_voc_result_file_for_unknown_class(run, voc):
    f = voc["results"] / "comp4_det_test_unicorn.txt"
    f.write_text(f"{voc['ids'][0]} 0.9 1 1 5 5\n")
    expect(eval_voc(run, voc), 2, f, "unknown class 'unicorn'")


def test_voc_duplicate_id_in_split(run, voc):
    ids = voc["split"].read_text().split()
    voc["split"].write_text("\n".join(ids + [ids[0]]) + "\n")
    expect(eval_voc(run, voc), 2, f"{voc['split']}:{len(ids) + 1}", "duplicate image id")


def test_voc_empty_split(run, voc):
    voc["split"].write_text("\n")
    expect(eval_voc(run, voc), 2, voc["split"], "empty split")


def test_voc_no_ground_truth_is_an_error_not_nan(run, voc):
    """A split whose images hold no box of the evaluated classes: mAP would be NaN with exit 0."""
    first = voc["ids"][0]
    voc["split"].write_text(first + "\n")
    xml = voc["root"] / "Annotations" / f"{first}.xml"
    text = xml.read_text()
    xml.write_text(text[:text.index("<object>")] + "</annotation>\n")
    for f in voc["results"].glob("*.txt"):
        f.write_text("")
    expect(eval_voc(run, voc), 2, "no ground-truth box")


@pytest.mark.parametrize("edit,what", [
    (lambda t: t.replace("<xmax>", "<xmax>9999", 1), "outside"),
    (lambda t: re.sub(r"<width>\d+</width>", "<width>0</width>", t, count=1),
     "non-positive <size>"),
    (lambda t: t.replace("<difficult>0</difficult>", "<difficult>2</difficult>", 1),
     "<difficult> must be 0 or 1"),
    (lambda t: t.replace("</annotation>", "</annot"), "malformed XML"),
    (lambda t: t.replace("<ymin>", "<ymin>x", 1), "malformed number"),
])
def test_voc_bad_ground_truth_xml(run, voc, edit, what):
    xml = voc["root"] / "Annotations" / f"{voc['ids'][0]}.xml"
    text = xml.read_text()
    assert "<difficult>0</difficult>" in text
    xml.write_text(edit(text))
    expect(eval_voc(run, voc), 2, xml, what)


def test_voc_bad_iou_argument(run, voc):
    expect(eval_voc(run, voc, "--iou", "2"), 2, "--iou")


# -----------------------------------------------------------------------------------------------
# eval_coco


def test_coco_good_input_scores(run, coco):
    assert eval_coco(run, coco)[0] == 0


def _ann(c, k=0):
    return c["gt"]["annotations"][k]


@pytest.mark.parametrize("key,value,what", [
    ("area", -5.0, "area must be a number >= 0"),
    ("area", "12", "area must be a number >= 0"),
    ("iscrowd", 2, "iscrowd must be 0 or 1"),
    ("iscrowd", True, "iscrowd must be 0 or 1"),
    ("bbox", [1, 1, 0, 5], "non-positive width or height"),
    ("bbox", [1, 1, "w", 5], "bbox must be 4 finite numbers"),
    ("image_id", 987654, "unknown image id 987654"),
    ("category_id", 999, "unknown category id 999"),
])
def test_coco_bad_annotation(run, coco, key, value, what):
    _ann(coco)[key] = value
    line = expect(eval_coco(run, coco), 2, "gt.json", what)
    assert f"annotation id {_ann(coco)['id']}" in line


def test_coco_duplicate_image_id_is_an_error_not_merged(run, coco):
    imgs = coco["gt"]["images"]
    imgs.append(dict(imgs[0]))
    expect(eval_coco(run, coco), 2, f"images[{len(imgs) - 1}]",
           f"duplicate image id {imgs[0]['id']}")


def test_coco_duplicate_annotation_id(run, coco):
    anns = coco["gt"]["annotations"]
    anns[1]["id"] = anns[0]["id"]
    expect(eval_coco(run, coco), 2, "annotations[1]", "duplicate annotation id")


@pytest.mark.parametrize("value", [0, -3, 12.5, "640", None])
def test_coco_bad_image_size(run, coco, value):
    coco["gt"]["images"][0]["width"] = value
    expect(eval_coco(run, coco), 2, "gt.json", "images[0]", "width must be a positive integer")


def test_coco_empty_split(run, coco):
    coco["gt"].update(images=[], annotations=[])
    expect(eval_coco(run, coco, res=[]), 2, "gt.json", "no images")


def test_coco_no_annotations(run, coco):
    coco["gt"]["annotations"] = []
    expect(eval_coco(run, coco, res=[]), 2, "gt.json", "no annotations")


def test_coco_malformed_json_and_missing_file(run, coco, tmp_path):
    expect(eval_coco(run, coco, gt="{not json"), 2, "gt.json", "malformed JSON")
    expect(run("eval_coco", "--annotations", tmp_path / "none.json", "--results",
               tmp_path / "r.json"), 2,
           "none.json", "not found")


@pytest.mark.parametrize("res,what", [
    ({"a": 1}, "expected a JSON list"),
    ([{"image_id": 1, "category_id": 1, "bbox": [0, 0, -1, 4], "score": 1}], "results[0]"),
    ([{"image_id": -7, "category_id": 1, "bbox": [0, 0, 1, 4], "score": 1}],
     "unknown image_id -7"),
])
def test_coco_bad_results(run, coco, res, what):
    if isinstance(res, list) and res[0]["image_id"] == 1:
        res[0]["image_id"] = coco["gt"]["images"][0]["id"]
    expect(eval_coco(run, coco, res=res), 2, "res.json", what)


# -----------------------------------------------------------------------------------------------
# eval_wsol


def test_wsol_good_input_scores(run, wsol_split):
    assert eval_wsol(run, wsol_split)[0] == 0


@pytest.mark.parametrize("write,what", [
    (lambda p: p.write_bytes(p.read_bytes()[:60]), "not a readable .npy"),
    (lambda p: p.write_bytes(b"\x13" + os.urandom(300)), "not a readable .npy"),
    (lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True),
     "not a readable .npy"),
    (lambda p: np.save(p, np.zeros((2, 8, 8), np.float32)), "must be 2-D"),
    (lambda p: np.save(p, np.full((8, 8), np.nan, np.float32)), "NaN"),
    (lambda p: np.save(p, np.zeros((0, 0), np.float32)), "empty"),
    (lambda p: np.save(p, np.full((8, 8), 3.0)), "outside [0, 1]"),
    (lambda p: np.save(p, np.array([["a"] * 8] * 8)), "real numbers"),
    (lambda p: p.unlink(), "missing"),
])
def test_wsol_bad_score_map(run, wsol_split, write, what):
    write(wsol_split["map"])
    expect(eval_wsol(run, wsol_split), 2, wsol_split["map"], what)


@pytest.mark.parametrize("name,line,what", [
    ("localization.txt", "{id},5,5,5,9", "has no area"),
    ("localization.txt", "{id},5,5,2,9", "x1 < x0"),
    ("localization.txt", "{id},0,0,9999,9", "outside the image"),
    ("image_sizes.txt", "{id},0,10", "non-positive image size"),
    ("class_labels.txt", "{id},-1", "negative class label"),
    ("image_ids.txt", "", "empty split"),
])
def test_wsol_bad_metadata(run, wsol_split, name, line, what):
    path = wsol_split["meta"] / name
    _replace_line(path, 1, line.format(id=wsol_split["id"]))
    expect(eval_wsol(run, wsol_split), 2, path, what)


def test_wsol_missing_metadata_folder(run, wsol_split, tmp_path):
    wsol_split["meta"] = tmp_path / "nometa"
    expect(eval_wsol(run, wsol_split), 2, tmp_path / "nometa")


# ------------------------------------------------------------------------------------------
# convert / loading


def _planted(path: Path, marker: Path) -> Path:
    """A pickle that would create `marker` when unpickled (the attack --allow-pickle must be asked
    for)."""
    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    with open(path, "wb") as f:
        pickle.dump({"model": Boom()}, f)
    return path


def _bad_checkpoint(kind: str, path: Path, good: Path) -> Path:
    if kind == "missing":
        return path
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(b"\x13" + os.urandom(4096))
    elif kind == "text":
        path.write_text("model: resnet18\n")
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[:100_000])
    elif kind == "pickled_list":  # what the stray /bad.pkl was
        path.write_bytes(b"\x80\x04]\x94.")
    elif kind == "pickled_junk":  # a pickle header, then garbage
        path.write_bytes(b"\x80\x04\xff" + bytes(range(40)))
    elif kind == "torch_list":
        torch.save([1, 2, 3], path)
    elif kind == "namespace":
        import argparse
        torch.save({"args": argparse.Namespace(lr=0.1), "state_dict": {"w": torch.zeros(1)}}, path)
    return path


@pytest.mark.parametrize("kind,what", [
    ("missing", "checkpoint not found"),
    ("empty", "empty file, not a checkpoint"),
    ("random", "not a PyTorch checkpoint"),
    ("text", "not a PyTorch checkpoint"),
    ("truncated", "truncated or corrupt checkpoint"),
    ("pickled_list", "not a checkpoint: it holds a list"),
    ("pickled_junk", "not a checkpoint (neither a torch.save archive nor a readable pickle"),
    ("torch_list", "not a checkpoint: it holds a list"),
    ("namespace", "--allow-pickle"),
])
def test_convert_not_a_checkpoint(run, resnet18_ckpt, tmp_path, kind, what):
    src = _bad_checkpoint(kind, tmp_path / f"{kind}.pth", resnet18_ckpt)
    line = expect(run("convert", "--to", "torchvision", src, tmp_path / "out.pth"), 2, what)
    assert line.startswith(f"error: {src}: "), line
    assert not (tmp_path / "out.pth").exists() and not list(tmp_path.glob("*.tmp"))
    if kind != "namespace":  # not a checkpoint at all: no advice to unpickle it
        assert "allow-pickle" not in line


def test_planted_pickle_never_runs_without_allow_pickle(run, tmp_path):
    marker = tmp_path / "pwned"
    src = _planted(tmp_path / "last.pth", marker)
    expect(run("convert", "--to", "torchvision", src, tmp_path / "out.pth"), 2, src,
           "--allow-pickle")
    expect(run("convert", "--to", "detectron2", src, tmp_path / "out.pkl"), 2, src)
    assert not marker.exists()


def test_allow_pickle_warns(run, resnet18_ckpt, tmp_path):
    import argparse
    src = tmp_path / "foreign.pth"
    torch.save({"args": argparse.Namespace(lr=0.1),
                "state_dict": torch.load(resnet18_ckpt)["model"]}, src)
    with pytest.warns(UserWarning, match="allow-pickle"):
        code, err = run("convert", "--to", "torchvision", src, tmp_path / "out.pth",
                        "--allow-pickle")
    assert code == 0, err


def test_convert_wrong_architecture(run, resnet18_ckpt, tmp_path):
    expect(run("convert", "--to", "torchvision", resnet18_ckpt, tmp_path / "o.pth", "--arch",
               "resnet50"), 2,
           resnet18_ckpt, "missing keys")


def test_convert_output_under_a_file_is_a_failure(run, resnet18_ckpt, tmp_path):
    (tmp_path / "afile").write_text("x")
    line = expect(run("convert", "--to", "torchvision", resnet18_ckpt,
                      tmp_path / "afile" / "o.pth"), 1,
                  "afile")
    assert "FileExistsError" in line or "File exists" in line or "Not a directory" in line


def test_detectron2_weights_reader_refuses_code(tmp_path):
    from transfer.convert import ConversionError, check_detectron2_weights
    marker = tmp_path / "pwned"
    with pytest.raises(ConversionError, match="not a detectron2 weights file"):
        check_detectron2_weights(_planted(tmp_path / "w.pkl", marker))
    assert not marker.exists()


def _fsize_limit(limit: int):
    def fn():
        # a write past the limit then fails with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return fn


def test_disk_full_leaves_no_tmp_and_exits_1(resnet18_ckpt, tmp_path):
    out = tmp_path / "out" / "backbone.pth"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "convert.py"), "--to",
                           "torchvision", str(resnet18_ckpt), str(out)], capture_output=True,
                           text=True,
                          preexec_fn=_fsize_limit(1 << 20),
                          env={**os.environ, "MT_NO_PROGRESS": "1"}, timeout=300)
    assert proc.returncode == 1, proc.stderr
    line = _error_line(proc.stderr)
    assert str(out) in line, line
    assert not out.exists() and not list(out.parent.glob("*.tmp"))


def test_debug_prints_the_traceback(run, tmp_path):
    code, err = run("convert", "--to", "torchvision", tmp_path / "none.pth", tmp_path / "o.pth",
                    "--debug")
    assert code == 2 and "Traceback" in err and "error: " in err
    code, err = run("convert", "--to", "torchvision", tmp_path / "none.pth", tmp_path / "o.pth")
    assert code == 2 and "Traceback" not in err


def test_atomic_writers_remove_their_tmp_on_failure(tmp_path):
    from mixup_transfer.core.runtime import atomic_save, atomic_write_text

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")
    with pytest.raises(RuntimeError):
        atomic_save({"x": Unpicklable()}, tmp_path / "a.pth")
    with pytest.raises(TypeError):
        atomic_write_text(None, tmp_path / "b.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- config-driven tools
# (fail early)


def test_make_toy_data_bad_preset(run, tmp_path):
    code, err = run("make_toy_data", "--out", tmp_path / "t", "--preset", "huge")
    assert code == 2 and "--preset" in err and "huge" in err


def test_make_toy_data_out_is_a_file(run, tmp_path):
    (tmp_path / "f").write_text("x")
    expect(run("make_toy_data", "--out", tmp_path / "f", "--preset", "tiny", "--no-progress"), 1,
           tmp_path / "f")


@pytest.mark.parametrize("tool,args", [
    ("run_pretrain", []), ("run_detection", []), ("run_pipeline", []), ("run_wsol", ["finetune"]),
    ("run_wsol", ["evaluate", "--model", "m.pth"]),
])
def test_missing_config_file(run, tool, args, tmp_path):
    cfg = tmp_path / "nope.yaml"
    expect(run(tool, *args, "--config", cfg), 2, cfg, "not found")


@pytest.mark.parametrize("tool", ["run_pretrain", "run_detection", "run_pipeline"])
def test_invalid_yaml(run, tool, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("name: [unclosed\n")
    expect(run(tool, "--config", cfg), 2, cfg, "invalid YAML")


def test_pretrain_unknown_key(run, tmp_path):
    expect(run("run_pretrain", "--config", ROOT / "configs/pretrain/toy_erm.yaml", "optim.lrr=0.1",
               "--run-dir", tmp_path / "r"), 2, "optim.lrr")


def test_pretrain_missing_data_root(run, tmp_path):
    expect(run("run_pretrain", "--config", ROOT / "configs/pretrain/toy_erm.yaml",
               f"data.root={tmp_path}/nodata", "--run-dir", tmp_path / "r"), 2,
               f"{tmp_path}/nodata")


def test_finetune_det_bad_weights(run, toy_world, tmp_path):
    w = tmp_path / "w.pth"
    w.write_bytes(b"\x13" + os.urandom(2048))
    expect(run("run_detection", "--config", ROOT / "configs/detection/toy_ssd_voc.yaml",
               "--weights", w, "--run-dir", tmp_path / "r", f"data.root={toy_world}/VOCdevkit"), 2,
               w, "not a PyTorch checkpoint")


def test_finetune_det_missing_data_root(run, tmp_path):
    expect(run("run_detection", "--config", ROOT / "configs/detection/toy_ssd_voc.yaml",
               "--run-dir", tmp_path / "r", f"data.root={tmp_path}/novoc"), 2, f"{tmp_path}/novoc")


def _wsol_cfg(toy_world, tmp_path) -> list[str]:
    return ["--config", str(ROOT / "configs/wsol/toy_multimix.yaml"),
            f"data.image_root={toy_world}/CUB_200_2011/images",
            f"data.metadata_root={toy_world}/wsol_metadata/CUB"]


@pytest.mark.parametrize("kind,what",
                         [("random", "not a PyTorch checkpoint"), ("backbone", "not a CAM model"),
                                       ("missing", "not found")])
def test_wsol_evaluate_bad_model_file(run, toy_world, resnet18_ckpt, tmp_path, kind, what):
    model = {"random": tmp_path / "m.pth", "backbone": resnet18_ckpt,
             "missing": tmp_path / "none.pth"}[kind]
    if kind == "random":
        model.write_bytes(b"\x13" + os.urandom(1000))
    cfg, *over = _wsol_cfg(toy_world, tmp_path)[1:]
    expect(run("run_wsol", "evaluate", "--config", cfg, "--model", model, *over), 2, model, what)


def test_wsol_finetune_bad_weights(run, toy_world, tmp_path):
    w = tmp_path / "w.pth"
    w.write_bytes(b"PK\x03\x04" + os.urandom(500))  # a zip header, then garbage
    cfg, *over = _wsol_cfg(toy_world, tmp_path)[1:]
    expect(run("run_wsol", "finetune", "--config", cfg, "--weights", w, "--run-dir",
               tmp_path / "r", *over), 2, w,
           "truncated or corrupt")


def test_wsol_metadata_from_bad_cub(run, toy_world, tmp_path):
    cub = tmp_path / "CUB_200_2011"
    cub.mkdir()
    for name in ("classes.txt", "images.txt", "image_class_labels.txt", "train_test_split.txt",
                 "bounding_boxes.txt"):
        shutil.copy(toy_world / "CUB_200_2011" / name, cub / name)
    boxes = cub / "bounding_boxes.txt"
    first = boxes.read_text().splitlines()[0].split()
    _replace_line(boxes, 1, f"{first[0]} {first[1]} {first[2]} 0 {first[4]}")
    expect(run("run_wsol", "metadata", "--cub", cub, "--out", tmp_path / "meta"), 2, boxes,
           "zero size")
    expect(run("run_wsol", "metadata", "--cub", tmp_path / "nocub", "--out", tmp_path / "meta"), 2,
           "nocub")


def test_wsol_baseline_empty_split(run, wsol_split):
    (wsol_split["meta"] / "image_ids.txt").write_text("\n")
    expect(run("run_wsol", "baseline", "--metadata", wsol_split["meta"]), 2, "image_ids.txt",
           "empty split")


# -----------------------------------------------------------------------------------------
# tools/run_robustness.py


def _evaluate(run, ckpt, imagenet, tmp_path, *extra):
    return run("run_robustness", "--checkpoint", *([ckpt] if not isinstance(ckpt, list) else ckpt),
               "--imagenet", imagenet, "--suites", "background", "data.max_val=2", "--image-size",
               "32", "--resize", "36", "--out", tmp_path / "out", *extra)


def test_evaluate_bad_checkpoint(run, toy_world, tmp_path):
    ck = tmp_path / "x.pth"
    ck.write_bytes(b"\x13" + os.urandom(3000))
    expect(_evaluate(run, ck, toy_world / "imagenet", tmp_path), 2, ck)


def test_evaluate_duplicate_names(run, toy_world, resnet18_ckpt, tmp_path):
    expect(_evaluate(run, [f"a={resnet18_ckpt}", f"a={resnet18_ckpt}"], toy_world / "imagenet",
                     tmp_path), 2,
           "--checkpoint", "duplicate method names")


def test_evaluate_missing_imagenet(run, resnet18_ckpt, tmp_path):
    expect(_evaluate(run, resnet18_ckpt, tmp_path / "noimagenet", tmp_path), 2,
           tmp_path / "noimagenet")


def _imagenet_copy(toy_world, tmp_path) -> Path:
    dst = tmp_path / "imagenet"
    shutil.copytree(toy_world / "imagenet" / "val", dst / "val")
    shutil.copytree(toy_world / "imagenet" / "val_boxes", dst / "val_boxes")
    return dst


def test_evaluate_xml_size_differs_from_image(run, toy_world, resnet18_ckpt, tmp_path):
    root = _imagenet_copy(toy_world, tmp_path)
    for xml in (root / "val_boxes").glob("*.xml"):
        t = xml.read_text()
        w = t[t.index("<width>") + 7:t.index("</width>")]
        xml.write_text(t.replace(f"<width>{w}</width>", f"<width>{int(w) + 7}</width>", 1))
    expect(_evaluate(run, resnet18_ckpt, root, tmp_path), 2, "val_boxes", "<size> says")


def test_evaluate_val_box_outside_image(run, toy_world, resnet18_ckpt, tmp_path):
    root = _imagenet_copy(toy_world, tmp_path)
    for xml in (root / "val_boxes").glob("*.xml"):
        t = xml.read_text()
        xml.write_text(t.replace("<xmax>", "<xmax>999", 1))
    expect(_evaluate(run, resnet18_ckpt, root, tmp_path), 2, "val_boxes", "outside")


# ------------------------------------------------------------------------------------------------
# readers


def test_imagenet_csv_duplicate_image_id(toy_world, tmp_path):
    from mixup_transfer.core.data import DataError, ImageNetFolder
    root = tmp_path / "imagenet"
    shutil.copytree(toy_world / "imagenet" / "val", root / "val")
    csv = toy_world / "imagenet" / "LOC_val_solution.csv"
    lines = csv.read_text().splitlines()
    (root / "LOC_val_solution.csv").write_text("\n".join(lines + [lines[1]]) + "\n")
    ds = ImageNetFolder(root, "val", boxes="csv")
    with pytest.raises(DataError, match=rf"LOC_val_solution.csv:{len(lines) + 1}: "
                       r"duplicate ImageId"):
        ds.boxes(0)


def test_coco_reader_refuses_duplicate_image_ids(toy_world, tmp_path):
    from mixup_transfer.core.data import DataError
    from transfer.datasets import COCODetection
    gt = json.loads((toy_world / "coco" / "annotations" / "instances_val2017.json").read_text())
    gt["images"].append(dict(gt["images"][0]))
    (tmp_path / "a.json").write_text(json.dumps(gt))
    with pytest.raises(DataError, match="duplicate image id"):
        COCODetection(toy_world / "coco" / "val2017", tmp_path / "a.json", skip_bad=True)


def test_voc_reader_refuses_duplicate_and_empty_split(toy_world, tmp_path):
    from mixup_transfer.core.data import DataError
    from transfer.datasets import VOCDetection
    voc = tmp_path / "VOCdevkit" / "VOC2007"
    shutil.copytree(toy_world / "VOCdevkit" / "VOC2007" / "Annotations", voc / "Annotations")
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    split = voc / "ImageSets" / "Main" / "test.txt"
    first = (toy_world / "VOCdevkit/VOC2007/ImageSets/Main/test.txt").read_text().split()[0]
    split.write_text(f"{first}\n{first}\n")
    with pytest.raises(DataError, match=r"test.txt:2: duplicate image id"):
        VOCDetection(tmp_path / "VOCdevkit", "2007", "test")
    split.write_text("")
    with pytest.raises(DataError, match="empty split"):
        VOCDetection(tmp_path / "VOCdevkit", "2007", "test")


def test_wsol_dataset_image_size_mismatch(toy_world, wsol_split):
    from wsol.data import MetadataError, WSOLDataset
    _replace_line(wsol_split["meta"] / "image_sizes.txt", 1, f"{wsol_split['id']},9999,9999")
    _replace_line(wsol_split["meta"] / "localization.txt", 1, f"{wsol_split['id']},1,1,5,5")
    ds = WSOLDataset(toy_world / "CUB_200_2011" / "images", wsol_split["meta"])
    with pytest.raises(MetadataError, match="image_sizes.txt says 9999x9999"):
        ds[0]


def test_every_input_error_shares_one_base():
    from mixup_transfer.core.checkpoint import CheckpointError
    from mixup_transfer.core.data import DataError, InputError
    from transfer.coco_eval import COCOEvalError
    from transfer.voc_eval import VOCEvalError
    from wsol.data import MetadataError
    from wsol.metrics import ScoreMapError
    for cls in (DataError, VOCEvalError, COCOEvalError, MetadataError, ScoreMapError,
                CheckpointError):
        assert issubclass(cls, InputError) and issubclass(cls, ValueError)


# --------------------------------------------------------------------------------- safe loading,
# by the source

# The one full unpickling of the library: mixup_transfer.core.checkpoint._load_pickled (called by
# read_checkpoint), behind allow_pickle.
GUARDED = {("mixup_transfer/core/checkpoint.py", "_load_pickled")}


class _Loads(ast.NodeVisitor):
    """(file, enclosing function, line) of every torch.load without weights_only=True, every
    pickle.load(s) and every np.load(..., allow_pickle=True)."""

    def __init__(self, path: str):
        self.path, self.stack, self.found = path, ["<module>"], []

    def visit_FunctionDef(self, node):
        self.stack.append(node.name)
        self.generic_visit(node)
        self.stack.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Call(self, node):
        f = node.func
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
            kw = {k.arg: k.value for k in node.keywords}

            def const(key):
                return kw[key].value if isinstance(kw.get(key), ast.Constant) else None
            mod, attr = f.value.id, f.attr
            if ((mod == "torch" and attr == "load" and const("weights_only") is not True)
                    or (mod == "pickle" and attr in ("load", "loads"))
                    or (mod == "np" and attr == "load"
                        and const("allow_pickle") not in (None, False))):
                self.found.append((self.path, self.stack[-1], node.lineno))
        self.generic_visit(node)


def _torch_loads_without_weights_only():
    found = []
    for pkg in ("mixup_transfer", "pretrain", "transfer", "wsol", "tools"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            v = _Loads(str(path.relative_to(ROOT)))
            v.visit(ast.parse(path.read_text(), str(path)))
            found += v.found
    return sorted(found)


def test_every_torch_load_is_weights_only():
    found = _torch_loads_without_weights_only()
    bad = [(f, fn, line) for f, fn, line in found if (f, fn) not in GUARDED]
    assert not bad, f"torch.load / pickle.load without weights_only=True: {bad}"
    guarded = {(f, fn) for f, fn, _ in found} & GUARDED
    assert guarded == GUARDED  # the guarded call is where the allowlist says


def test_no_system_exit_in_the_library():
    hits = []
    for pkg in ("mixup_transfer", "pretrain", "transfer", "wsol"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Raise) and node.exc is not None:
                    target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                    if isinstance(target, ast.Name) and target.id == "SystemExit":
                        hits.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert hits == []


def test_every_tool_uses_the_cli_wrapper():
    """Each tool's main goes through mixup_transfer.core.cli.main: `@cli.entry`, or a stage's
    `stage_main`."""
    for path in sorted((ROOT / "tools").glob("*.py")):
        text = path.read_text()
        wrapped = "from mixup_transfer.core import cli" in text and "@cli.entry" in text
        assert wrapped or "from mixup_transfer.core.cli import stage_main" in text, path.name


# ------------------------------------------------------------------------------- binary where text
# is expected

BINARY = b"\xff\xfe\x00\x81binary"


def test_voc_binary_split_and_result_files(run, voc):
    f = next(voc["results"].glob("comp4_det_test_*.txt"))
    f.write_bytes(BINARY)
    expect(eval_voc(run, voc), 2, f, "not a UTF-8 text file")
    voc["split"].write_bytes(BINARY)
    expect(eval_voc(run, voc), 2, voc["split"], "not a UTF-8 text file")


def test_coco_binary_annotations(run, coco):
    (coco["dir"] / "gt.json").write_bytes(BINARY)
    expect(run("eval_coco", "--annotations", coco["dir"] / "gt.json", "--results",
               coco["dir"] / "gt.json"), 2,
           "gt.json", "not a UTF-8 text file")


def test_wsol_binary_metadata(run, wsol_split):
    path = wsol_split["meta"] / "class_labels.txt"
    path.write_bytes(BINARY)
    expect(eval_wsol(run, wsol_split), 2, path, "not a UTF-8 text file")


@pytest.mark.parametrize("args,what", [
    (["--cam-curve-interval", "0"], "--cam-curve-interval"),
    (["--cam-curve-interval", "1.5"], "--cam-curve-interval"),
    (["--iou-thresholds", "0", "50"], "--iou-thresholds"),
    (["--iou-thresholds", "150"], "--iou-thresholds"),
])
def test_wsol_bad_evaluator_arguments(run, wsol_split, args, what):
    expect(run("eval_wsol", "--metadata", wsol_split["meta"], "--scoremaps", wsol_split["maps"],
               *args), 2, what)


@pytest.mark.parametrize("args,what",
                         [(["--fraction", "1.5"], "--fraction"), (["--size", "0"], "--size")])
def test_wsol_baseline_bad_arguments(run, wsol_split, args, what):
    expect(run("run_wsol", "baseline", "--metadata", wsol_split["meta"], *args), 2, what)


def test_evaluate_xml_filename_of_another_image(run, toy_world, resnet18_ckpt, tmp_path):
    root = _imagenet_copy(toy_world, tmp_path)
    for xml in (root / "val_boxes").glob("*.xml"):
        t = xml.read_text()
        xml.write_text(re.sub(r"<filename>[^<]*</filename>",
                              "<filename>ILSVRC2012_val_99999999</filename>", t))
    expect(_evaluate(run, resnet18_ckpt, root, tmp_path), 2, "val_boxes", "<filename>")


@pytest.mark.parametrize("where,key",
                         [("gt", "image_id"), ("gt", "category_id"), ("res", "image_id"),
                                       ("res", "category_id")])
def test_coco_unhashable_ids(run, coco, where, key):
    entry = _ann(coco) if where == "gt" else coco["res"][0]
    entry[key] = [entry[key]]
    expect(eval_coco(run, coco), 2, "gt.json" if where == "gt" else "res.json",
           key.replace("_", " ")
           if where == "gt" else key)


# ------------------------------------------------------------------------- small-image layouts
# (CIFAR, TinyImageNet)

def _cifar_edit(name, change):
    """Rewrite one batch of a CIFAR-10 copy: change(dict) edits it in place."""
    def edit(root):
        path = root / name
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")  # the test's own file, written by the toy world
        change(d)
        with open(path, "wb") as f:
            pickle.dump(d, f, protocol=4)
    return edit


class _Opens:
    def __reduce__(self):
        return (open, ("/nonexistent/never", "w"))


def _set(d, key, value):
    d[key] = value


SMALL_CASES = [  # (layout folder, edit of the copy, names the error must contain)
    ("cifar-10-batches-py", lambda r: (r / "data_batch_3").unlink(),
     ["data_batch_3", "not found"]),
    ("cifar-10-batches-py",
     _cifar_edit("data_batch_2", lambda d: _set(d, b"data", d[b"data"][:, :3000].copy())),
     ["data_batch_2", "3072"]),
    ("cifar-10-batches-py", _cifar_edit("test_batch", lambda d: d[b"labels"].__setitem__(1, 10)),
     ["test_batch", "image 1 has label 10", "0..9"]),
    ("cifar-10-batches-py",
     _cifar_edit("data_batch_1", lambda d: _set(d, b"labels", d[b"labels"][:-1])),
     ["data_batch_1", "one per image"]),
    ("cifar-10-batches-py", _cifar_edit("data_batch_4", lambda d: d.pop(b"labels")),
     ["data_batch_4", "b'labels'"]),
    ("cifar-10-batches-py", lambda r: (r / "batches.meta").write_text("label_names: [a, b]\n"),
     ["batches.meta", "not a readable CIFAR pickle"]),
    ("cifar-10-batches-py", _cifar_edit("data_batch_5", lambda d: _set(d, b"filenames", _Opens())),
     ["data_batch_5", "refused to unpickle", "open"]),
    ("cifar-100-python", _cifar_edit("train", lambda d: d[b"fine_labels"].__setitem__(0, 100)),
     ["train", "label 100", "0..99"]),
    ("cifar-100-python", lambda r: (r / "test").unlink(), ["test", "not found"]),
    ("tiny-imagenet-200", lambda r: _replace_line(r / "val" / "val_annotations.txt", 2,
                                                  "val_1.JPEG\tn99999999\t0\t0\t10\t10"),
     ["val_annotations.txt:2", "unknown wnid 'n99999999'"]),
    ("tiny-imagenet-200",
     lambda r: _replace_line(r / "val" / "val_annotations.txt", 3, "val_2.JPEG\tn01000000\t0\t0"),
     ["val_annotations.txt:3", "expected 6"]),
    ("tiny-imagenet-200", lambda r: _replace_line(r / "val" / "val_annotations.txt", 1,
                                                  "val_0.JPEG\tn01000000\t0\tzero\t10\t10"),
     ["val_annotations.txt:1", "malformed box numbers"]),
    ("tiny-imagenet-200", lambda r: _replace_line(r / "wnids.txt", 5, "n01000000"),
     ["wnids.txt:5", "duplicate wnid"]),
    ("tiny-imagenet-200",
     lambda r: _replace_line(r / "words.txt", 1, "n01000000 red solid circle"),
     ["words.txt:1", "wnid<TAB>names"]),
    ("tiny-imagenet-200", lambda r: (r / "val" / "images" / "val_4.JPEG").unlink(),
     ["val_annotations.txt", "missing", "val_4.JPEG"]),
]


@pytest.mark.parametrize("layout,edit,names", SMALL_CASES,
                         ids=[f"{lay.split('-')[0]}-{i}"
                              for i, (lay, _, _) in enumerate(SMALL_CASES)])
def test_pretrain_bad_small_image_layout(run, small_toy_world, tmp_path, layout, edit, names):
    root = tmp_path / layout
    shutil.copytree(small_toy_world / layout, root)
    edit(root)
    size = 64 if layout.startswith("tiny") else 32
    result = run("run_pretrain", "--config", ROOT / "configs/pretrain/toy_erm.yaml",
                 f"data.root={root}", "model.arch=preactresnet18", f"data.crop_size={size}",
                 "data.num_workers=0", "optim.batch_size=4", "optim.epochs=1", "--run-dir",
                 tmp_path / "r")
    # the readers check everything when the task opens them, before any step
    expect(result, 2, *names)


def test_evaluate_cifar_without_boxes_says_so(run, small_toy_world, tmp_path):
    from mixup_transfer.core.checkpoint import build_resnet, save_backbone

    ck = tmp_path / "b.pth"
    save_backbone(ck, build_resnet("preactresnet18", num_classes=10),
                  {"arch": "preactresnet18", "method": "erm"})
    expect(run("run_robustness", "--checkpoint", ck, "--imagenet",
               small_toy_world / "cifar-10-batches-py", "--suites", "background", "data.max_val=2",
               "--image-size", "32", "--resize", "32", "--out", tmp_path / "out"),
           2, "cifar-10-batches-py", "no box annotations")
