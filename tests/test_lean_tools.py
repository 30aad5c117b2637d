"""The stand-alone evaluators (tools/eval_wsol.py, eval_voc.py, eval_coco.py) import neither torch
nor model code.

Importing torch takes seconds, more than scoring thousands of saved score maps, so each tool is run
end to end in its own process under `python -X importtime` (which lists every module the process
imported) on small hand-made inputs whose scores are computed by hand below.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wsol.data import WSOLMetadata, write_wsol_metadata
from wsol.metrics import HAVE_NUMBA, ScoreMapError
from wsol.scoremaps import score_scoremap_dir

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "pretrain", "wsol.model", "wsol.finetune", "transfer.datasets",
         "mixup_transfer.core.runtime")


def run_tool(tool: str, *args) -> tuple[dict, list[str]]:
    """(the tool's JSON output, the modules its process imported)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "tools" / f"{tool}.py"),
                           *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, MT_NO_PROGRESS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    modules = [ln.rsplit("|", 1)[1].strip() for ln in proc.stderr.splitlines()
               if ln.startswith("import time:")]
    assert "numpy" in modules  # the listing works
    return json.loads(proc.stdout), modules


def heavy(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)]


@pytest.fixture()
def wsol_split(tmp_path):
    """Three 8 x 8 images; each map is binary, so every threshold below 1 gives the same boxes.
    a: map 1 on rows 1-4, cols 0-4 -> contour box [0, 1, min(0+5, 7), min(1+4, 7)] = [0, 1, 5, 5]
       (inclusive 6 x 5 = 30 px) vs GT [0, 1, 4, 4] (5 x 4 = 20 px, inside it): IoU 20 / 30 = 2/3;
    b: an all-zero map -> no contour -> [0, 0, 0, 0] vs GT [2, 2, 6, 6]: IoU 0;
    c: the map of a vs GT [0, 1, 5, 5]: IoU 1. BoxAcc at IoU 30 and 50: a, c -> 200/3 %; at 70: c
    -> 100/3 %; MaxBoxAccV2 = their mean = 500/9."""
    m = np.zeros((8, 8), np.float32)
    m[1:5, 0:5] = 1.0
    maps = {"a.jpg": m, "b.jpg": np.zeros((8, 8), np.float32), "c.jpg": m}
    gts = {"a.jpg": [0, 1, 4, 4], "b.jpg": [2, 2, 6, 6], "c.jpg": [0, 1, 5, 5]}
    ids = list(maps)
    meta = write_wsol_metadata(WSOLMetadata(ids, {i: 0 for i in ids}, {i: (8, 8) for i in ids},
                                            {i: np.array([gts[i]], np.float64) for i in ids}),
                                            tmp_path / "meta")
    (tmp_path / "maps").mkdir()
    for i, v in maps.items():
        np.save(tmp_path / "maps" / f"{i}.npy", v)
    return meta, tmp_path / "maps"


EXPECTED_WSOL = {"30": pytest.approx(200 / 3), "50": pytest.approx(200 / 3),
                 "70": pytest.approx(100 / 3)}


@pytest.mark.parametrize("extra,sweep", [
    ([], "numba" if HAVE_NUMBA else "opencv"),
    (["--workers", "1", "--reference"], "reference"),
])
def test_eval_wsol_imports_no_torch_and_says_which_sweep_ran(wsol_split, extra, sweep):
    meta, maps = wsol_split
    out, modules = run_tool("eval_wsol", "--metadata", meta, "--scoremaps", maps,
                            "--cam-curve-interval", "0.01", *extra)
    assert not heavy(modules), heavy(modules)
    assert out["maxboxacc_per_iou"] == EXPECTED_WSOL and out["maxboxacc_v2"] == pytest.approx(
        500 / 9
    )
    assert (
        out["contours"] == "all"
        and "maxboxacc_v1" not in out
        and out["units"]["maxboxacc_v2"] == "%"
    )
    assert out["sweep"] == sweep and out["num_images"] == 3
    if sweep == "numba":
        assert "numba" in modules


def test_largest_contour_mode_runs_the_opencv_sweep(wsol_split):
    meta, maps = wsol_split  # one contour per map: the largest-contour numbers are the same
    res = score_scoremap_dir(meta, maps, 0.01, multi_contour=False)
    assert (
        res["sweep"] == "opencv"
        and res["maxboxacc_per_iou"] == EXPECTED_WSOL
        and res["contours"] == "largest"
    )
    # the other flavour's name
    assert res["maxboxacc_v1"] == EXPECTED_WSOL["50"] and "maxboxacc_v2" not in res


def test_threads_give_the_same_numbers_and_the_first_error_in_id_order(wsol_split):
    meta, maps = wsol_split
    one = score_scoremap_dir(meta, maps, 0.01, workers=1)
    assert score_scoremap_dir(meta, maps, 0.01, workers=3) == one
    # the 2nd map missing and the 3rd out of range: the 2nd is reported
    (maps / "b.jpg.npy").unlink()
    np.save(maps / "c.jpg.npy", np.full((8, 8), 2.0, np.float32))
    with pytest.raises(ScoreMapError, match=r"b\.jpg\.npy: score map for image 'b\.jpg' missing"):
        score_scoremap_dir(meta, maps, 0.01, workers=2)
    np.save(maps / "b.jpg.npy", np.zeros((8, 8), np.float32))
    with pytest.raises(ScoreMapError, match=r"c\.jpg\.npy: score map for image 'c\.jpg' lies "
                       r"outside \[0, 1\]"):
        score_scoremap_dir(meta, maps, 0.01, workers=2)


def test_eval_voc_imports_no_torch(tmp_path):
    # one image, one cat (1-based inclusive 11..40 x 21..50); detections: a far-away box at score
    # 0.9 (FP), the GT box itself at 0.8 (TP). Ranked FP, TP: precision 0, 1/2 at recall 0, 1, so
    # the 11-point max-precision is 1/2 at every recall level: AP 50.
    root = tmp_path / "VOCdevkit" / "VOC2007"
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "Annotations" / "im1.xml").write_text(
        "<annotation><filename>im1.jpg</filename><size><width>100</width><height>80</height><depth>3</depth></size><object><name>cat</name><difficult>0</difficult><bndbox><xmin>11</xmin><ymin>21</ymin><xmax>40</xmax><ymax>50</ymax></bndbox></object></annotation>"
    )
    (root / "ImageSets" / "Main" / "test.txt").write_text("im1\n")
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "comp4_det_test_cat.txt").write_text("im1 0.9 60 5 90 30\n"
                                                             "im1 0.8 11 21 40 50\n")
    out, modules = run_tool("eval_voc", "--devkit", tmp_path / "VOCdevkit", "--results",
                            tmp_path / "res", "--classes", "cat")
    assert not heavy(modules), heavy(modules)
    assert out["metric"] == "11point" and out["AP"]["cat"] == pytest.approx(50.0)


@pytest.mark.parametrize("backend", ["pycocotools", "auto"])
def test_eval_coco_imports_no_torch(tmp_path, backend):
    # one cat and one dog, both detected exactly: AP 100; the cat's box is 10 x 10 (small), the
    # dog's 40 x 40 (medium), no large object: APl null (no value)
    gt = {"images": [{"id": 1, "width": 100, "height": 100, "file_name": "1.jpg"}],
          "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10],
                           "area": 100, "iscrowd": 0},
                          {"id": 2, "image_id": 1, "category_id": 2, "bbox": [40, 40, 40, 40],
                           "area": 1600, "iscrowd": 0}]}
    res = [{"image_id": 1, "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
           for a in gt["annotations"]]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(res))
    out, modules = run_tool("eval_coco", "--annotations", tmp_path / "gt.json", "--results",
                            tmp_path / "res.json", "--backend", backend)
    assert not heavy(modules), heavy(modules)
    assert out["AP"] == pytest.approx(100.0) and out["APs"] == pytest.approx(100.0)
    assert out["APm"] == pytest.approx(100.0) and out["APl"] is None and out["units"]["APm"] == "%"
