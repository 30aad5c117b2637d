"""VOC devkit and COCO scoring: hand-computed cases, a devkit transcription, both COCO backends."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from transfer.coco_eval import (
    STAT_NAMES,
    COCOEvalError,
    boxes_to_coco_xywh,
    coco_evaluate,
    faster_available,
)
from transfer.voc_eval import (
    VOCEvalError,
    boxes_to_voc_xml,
    evaluate_voc_results,
    read_voc_results,
    voc_ap,
    voc_evaluate,
    write_voc_results,
)

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------
# VOC: a devkit transcription (VOCevaldet.m, one detection at a time) as the independent reference


def devkit_ap(dets, annotations, cls, metric, iou=0.5):
    gt = {}
    npos = 0
    for image_id, ann in annotations.items():
        objs = [o for o in ann["objects"] if o["name"] == cls]
        gt[image_id] = {"BB": [o["bbox"] for o in objs], "diff": [o["difficult"] for o in objs],
                        "det": [False] * len(objs)}
        npos += sum(not o["difficult"] for o in objs)
    order = sorted(range(len(dets)), key=lambda i: -dets[i][1])  # stable, like MATLAB sort
    tp, fp = [], []
    for d in order:
        image_id, _, bb = dets[d]
        g = gt[image_id]
        ovmax, jmax = -math.inf, None
        for j, bbgt in enumerate(g["BB"]):
            bi = [max(bb[0], bbgt[0]), max(bb[1], bbgt[1]), min(bb[2], bbgt[2]),
                  min(bb[3], bbgt[3])]
            iw = bi[2] - bi[0] + 1
            ih = bi[3] - bi[1] + 1
            if iw > 0 and ih > 0:
                ua = ((bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1)
                      + (bbgt[2] - bbgt[0] + 1) * (bbgt[3] - bbgt[1] + 1) - iw * ih)
                ov = iw * ih / ua
                if ov > ovmax:
                    ovmax, jmax = ov, j
        t = f = 0
        if ovmax >= iou:
            if not g["diff"][jmax]:
                if not g["det"][jmax]:
                    t = 1
                    g["det"][jmax] = True
                else:
                    f = 1
        else:
            f = 1
        tp.append(t)
        fp.append(f)
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec = tp / npos
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    if metric == "11point":
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = [pp for rr, pp in zip(rec, prec) if rr >= t]
            ap += (max(p) if p else 0.0) / 11
        return 100 * ap
    mrec = [0.0, *rec, 1.0]
    mpre = [0.0, *prec, 0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    return 100 * sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]
                     for i in range(len(mrec) - 1) if mrec[i + 1] != mrec[i])


def obj(name, bbox, difficult=False):
    return {"name": name, "bbox": tuple(bbox), "difficult": difficult, "truncated": False}


# Hand-built case: class "cat" has 4 non-difficult boxes + 1 difficult; "dog" has no ground truth.
ANN = {
    "im1": {"objects": [obj("cat", (1, 1, 10, 10)), obj("cat", (21, 21, 40, 40))]},
    "im2": {"objects": [obj("cat", (5, 5, 30, 30))]},
    "im3": {"objects": [obj("cat", (10, 10, 20, 20)),
                        obj("cat", (50, 50, 70, 70), difficult=True)]},
    "im4": {"objects": []},
}
CLASSES = ("cat", "dog")
# Ranked: TP, (difficult: ignored), (difficult duplicate: ignored), FP (duplicate), TP, FP (no
# overlap), TP. Only non-ignored: TP FP TP FP TP with npos 4 -> recall .25 .25 .5 .5 .75, precision
# 1 .5 2/3 .5 .6
DETS = {
    "cat": [("im1", 0.9, (1, 1, 10, 10)), ("im3", 0.86, (50, 50, 70, 70)),
            ("im3", 0.85, (51, 51, 70, 70)), ("im1", 0.8, (1, 1, 10, 10)),
            ("im2", 0.7, (5, 5, 30, 30)), ("im4", 0.6, (1, 1, 50, 50)),
            ("im3", 0.5, (10, 10, 20, 20))],
    "dog": [("im1", 0.9, (1, 1, 10, 10))],
}
# t=0..0.2 -> 1, 0.3..0.5 -> 2/3, 0.6..0.7 -> .6
AP_11 = 100 * (3 * 1 + 3 * 2 / 3 + 2 * 0.6) / 11
AP_AREA = 100 * (0.25 * 1 + 0.25 * 2 / 3 + 0.25 * 0.6)  # envelope over recall steps of .25


def test_voc_ap_curve_by_hand():
    rec = np.array([0.25, 0.25, 0.5, 0.5, 0.75])
    prec = np.array([1, 0.5, 2 / 3, 0.5, 0.6])
    assert voc_ap(rec, prec, "11point") == pytest.approx(6.2 / 11, abs=1e-12)
    assert voc_ap(rec, prec, "area") == pytest.approx(0.25 + 0.25 * 2 / 3 + 0.15, abs=1e-12)
    # perfect detector; empty curve
    assert voc_ap(np.array([0.5, 1.0]), np.array([1.0, 1.0]), "11point") == pytest.approx(1.0)
    assert voc_ap(np.array([0.5, 1.0]), np.array([1.0, 1.0]), "area") == pytest.approx(1.0)
    assert voc_ap(np.array([]), np.array([]), "11point") == 0.0
    # recall exactly 0.3 does not reach the threshold np.arange gives (0.30000000000000004)
    assert voc_ap(np.array([0.3]), np.array([1.0]), "11point") == pytest.approx(3 / 11)
    with pytest.raises(ValueError, match="11point"):
        voc_ap(np.array([1.0]), np.array([1.0]), "bogus")


@pytest.mark.parametrize("metric,expected", [("11point", AP_11), ("area", AP_AREA)])
def test_voc_hand_case_difficult_duplicates_no_gt(metric, expected):
    out = voc_evaluate(DETS, ANN, CLASSES, metric=metric)
    assert out["AP"]["cat"] == pytest.approx(expected, abs=1e-10)
    assert out["AP"]["dog"] is None          # no ground truth: undefined, left out of the mean
    assert out["mAP"] == pytest.approx(expected, abs=1e-10)
    assert out["metric"] == metric
    assert out["AP"]["cat"] == pytest.approx(devkit_ap(DETS["cat"], ANN, "cat", metric), abs=1e-10)


def test_voc_difficult_counted_wrongly_would_change_ap():
    # If the two detections on the difficult box were false positives the curve would be
    # TP FP FP FP TP FP TP: precision at recall .5 = 2/5 -> 11-point AP (3*1 + 3*.4 + 2*3/7)/11.
    ann = {k: {"objects": [dict(o, difficult=False) if o["bbox"] == (50, 50, 70, 70) else o
                           for o in v["objects"]]}
           for k, v in ANN.items()}
    # now the box counts: 5 positives, the 0.86 detection is a TP
    out = voc_evaluate(DETS, ann, CLASSES)
    assert out["AP"]["cat"] != pytest.approx(AP_11)
    assert out["AP"]["cat"] == pytest.approx(devkit_ap(DETS["cat"], ann, "cat", "11point"),
                                             abs=1e-10)


def test_voc_iou_uses_inclusive_pixels_and_ge_threshold():
    ann = {"a": {"objects": [obj("cat", (1, 1, 10, 10))]}}
    # +1 areas: GT 10x10=100, det 10x5=50, inter 50, union 100 -> IoU exactly 0.5 -> TP (devkit:
    # >=). Without the +1 it would be 9*4/81 = 0.44 -> FP.
    half = voc_evaluate({"cat": [("a", 1.0, (1, 1, 10, 5))]}, ann, ("cat",))
    assert half["AP"]["cat"] == pytest.approx(100.0)
    below = voc_evaluate({"cat": [("a", 1.0, (1, 1, 10, 4))]}, ann, ("cat",))  # IoU 0.4
    assert below["AP"]["cat"] == 0.0
    at_04 = voc_evaluate({"cat": [("a", 1.0, (1, 1, 10, 4))]}, ann, ("cat",), iou=0.4)
    assert at_04["AP"]["cat"] == pytest.approx(100.0)
    # The internal convention x0 = xmin - 1, x1 = xmax converts back exactly
    np.testing.assert_array_equal(boxes_to_voc_xml([[0, 0, 10, 10]]), [[1, 1, 10, 10]])


def test_voc_vectorised_matches_devkit_transcription_on_random_data(monkeypatch):
    rng = np.random.default_rng(0)
    classes = ("a", "b", "c")
    ann = {}
    for i in range(40):
        objs = []
        for _ in range(rng.integers(0, 5)):
            x0, y0 = rng.integers(1, 60, size=2)
            w, h = rng.integers(5, 40, size=2)
            objs.append(obj(classes[rng.integers(0, 3)], (x0, y0, x0 + w, y0 + h),
                            bool(rng.random() < 0.2)))
        ann[f"img{i:03d}"] = {"objects": objs}
    ids = list(ann)
    dets = {c: [] for c in classes}
    for image_id in ids:
        for o in ann[image_id]["objects"]:  # jittered copies (duplicates included) + random boxes
            for _ in range(rng.integers(0, 3)):
                b = np.array(o["bbox"], float) + rng.normal(0, 3, 4)
                b[2:] = np.maximum(b[2:], b[:2])
                dets[o["name"]].append((image_id, float(rng.random()), tuple(np.round(b, 1))))
        for _ in range(rng.integers(0, 3)):
            x0, y0 = rng.uniform(1, 60, 2)
            dets[classes[rng.integers(0, 3)]].append(
                (image_id, float(rng.choice([0.5, rng.random()])), (x0, y0, x0 + 20, y0 + 15)))
    for metric in ("11point", "area"):
        for iou in (0.5, 0.7):
            out = voc_evaluate(dets, ann, classes, metric=metric, iou=iou)
            for c in classes:
                assert out["AP"][c] == pytest.approx(devkit_ap(dets[c], ann, c, metric, iou),
                                                     abs=1e-9)
    # the array fast path gives the same
    arrays = {c: {"image_ids": [d[0] for d in v], "scores": [d[1] for d in v],
                  "boxes": [d[2] for d in v]}
              for c, v in dets.items()}
    assert voc_evaluate(arrays, ann, classes) == voc_evaluate(dets, ann, classes)
    # the IoU blocks are chunked for crowded classes: tiny chunks give the same numbers
    import transfer.voc_eval as ve
    whole = voc_evaluate(dets, ann, classes, metric="area")
    monkeypatch.setattr(ve, "_CHUNK", 3)
    assert voc_evaluate(dets, ann, classes, metric="area") == whole


VOC_XML = """<annotation><folder>VOC2007</folder><filename>{id}.jpg</filename>
<size><width>100</width><height>80</height><depth>3</depth></size>{objects}</annotation>"""
VOC_OBJ = """<object><name>{name}</name><pose>Left</pose>\
<truncated>0</truncated><difficult>{d}</difficult>
<bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"""


@pytest.fixture()
def voc_tree(tmp_path):
    """VOCdevkit/VOC2007 with the hand case above as XML files, and its result files."""
    root = tmp_path / "VOCdevkit" / "VOC2007"
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for image_id, ann in ANN.items():
        objects = "".join(VOC_OBJ.format(name=o["name"], d=int(o["difficult"]), b=o["bbox"])
                          for o in ann["objects"])
        (root / "Annotations"
         / f"{image_id}.xml").write_text(VOC_XML.format(id=image_id, objects=objects))
    (root / "ImageSets" / "Main" / "test.txt").write_text("\n".join(ANN) + "\n")
    results = tmp_path / "results"
    write_voc_results(results, "test", DETS)
    return tmp_path / "VOCdevkit", results


def test_voc_files_and_cli(voc_tree):
    devkit, results = voc_tree
    out = evaluate_voc_results(devkit, results, "2007", "test", classes=CLASSES)
    assert out["metric"] == "11point" and out["AP"]["cat"] == pytest.approx(AP_11, abs=1e-10)
    # devkit may also point at VOC2007 itself
    assert evaluate_voc_results(devkit / "VOC2007", results, "2007", "test", "area",
                                classes=CLASSES)["mAP"] == pytest.approx(AP_AREA, abs=1e-10)
    # the written files round-trip exactly
    dets, _ = read_voc_results(results, "test", CLASSES)
    assert ([(i, s, tuple(b)) for i, s, b in dets["cat"]]
            == [(i, s, tuple(map(float, b))) for i, s, b in DETS["cat"]])
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "eval_voc.py"), "--devkit",
                           str(devkit), "--year", "2007", "--split", "test", "--results",
                           str(results), "--metric", "area", "--classes", "cat,dog"],
                           capture_output=True, text=True, check=True)
    printed = json.loads(proc.stdout)
    assert printed["metric"] == "area" and printed["mAP"] == pytest.approx(AP_AREA, abs=1e-6)
    assert printed["AP"] == {"cat": pytest.approx(AP_AREA, abs=1e-6), "dog": None}


@pytest.mark.parametrize("line,match", [
    ("im1 0.5 1 1 10", "expected 'image_id score"),
    ("im1 high 1 1 10 10", "malformed number"),
    ("im9 0.5 1 1 10 10", "unknown image id 'im9'"),
    ("im1 nan 1 1 10 10", "non-finite"),
])
def test_voc_bad_result_lines_name_file_and_line(voc_tree, line, match):
    devkit, results = voc_tree
    path = results / "comp4_det_test_cat.txt"
    path.write_text("im1 0.9 1 1 10 10\n" + line + "\n")
    with pytest.raises(VOCEvalError, match=match) as e:
        evaluate_voc_results(devkit, results, classes=CLASSES)
    assert f"{path}:2" in str(e.value)


def test_voc_sub_pixel_reversed_boxes_are_scored_like_the_devkit(tmp_path, caplog):
    # detectron2 writes x0 + 1 .. x1: a box under one pixel wide has xmax < xmin; the devkit scores
    # it with width xmax - xmin + 1 and an overlap only where iw, ih > 0
    ann = {"a": {"objects": [obj("cat", (3, 3, 3, 3)), obj("cat", (20, 20, 29, 29))]}}
    # 0.8 x 1 in a 1-pixel box: IoU 0.8 / 1, a TP reversed by 1.5: iw = -0.5, no overlap: FP
    dets = {"cat": [("a", 0.9, (3.2, 3.0, 3.0, 3.0)),
                    ("a", 0.8, (25.0, 20.0, 23.5, 29.0)),
                    ("a", 0.7, (20.0, 20.0, 29.0, 29.0))]}  # TP
    # recall .5 .5 1, precision 1 .5 2/3: 11-point t=0..0.5 -> 1, t=0.6..1 -> 2/3
    want = 100 * (6 * 1 + 5 * 2 / 3) / 11
    assert devkit_ap(dets["cat"], ann, "cat", "11point") == pytest.approx(want)
    with caplog.at_level("WARNING", logger="transfer.voc_eval"):
        out = voc_evaluate(dets, ann, CLASSES, "11point")
    assert out["AP"]["cat"] == pytest.approx(want, abs=1e-10) and out["reversed_boxes"] == 2
    assert "2 of 3 detections have xmax < xmin" in caplog.text
    write_voc_results(tmp_path, "test", dets)  # the result files are read, not rejected
    read, sources = read_voc_results(tmp_path, "test", CLASSES, ann)
    assert voc_evaluate(read, ann, CLASSES, "11point",
                        _sources=sources)["AP"]["cat"] == pytest.approx(want)


def test_voc_unknown_class_file_and_empty_dir(voc_tree, tmp_path):
    devkit, results = voc_tree
    (results / "comp4_det_test_unicorn.txt").write_text("im1 0.9 1 1 10 10\n")
    with pytest.raises(VOCEvalError, match="comp4_det_test_unicorn.txt: unknown class 'unicorn'"):
        evaluate_voc_results(devkit, results, classes=CLASSES)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VOCEvalError, match="no result files"):
        evaluate_voc_results(devkit, tmp_path / "empty", classes=CLASSES)
    with pytest.raises(VOCEvalError, match="unknown image id"):
        voc_evaluate({"cat": [("nope", 0.5, (1, 1, 2, 2))]}, ANN, CLASSES)
    with pytest.raises(VOCEvalError, match="unknown classes"):
        voc_evaluate({"cow": []}, ANN, CLASSES)


# ------------------------------------------------------------------------------------------------
# COCO: a 3-image ground truth built in memory


def coco_gt():
    def ann(i, image_id, cat, box):
        return {"id": i, "image_id": image_id, "category_id": cat, "bbox": box,
                "area": box[2] * box[3], "iscrowd": 0}
    return {
        "images": [{"id": i, "width": 200, "height": 200, "file_name": f"{i}.jpg"}
                   for i in (1, 2, 3)],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
        "annotations": [
            ann(1, 1, 3, [10, 10, 20, 20]),    # small (area 400 < 32^2)
            ann(2, 2, 3, [50, 50, 50, 50]),    # medium (2500)
            ann(3, 3, 7, [20, 30, 40, 60]),    # medium (2400)
        ],
    }


def det(image_id, cat, box, score):
    return {"image_id": image_id, "category_id": cat, "bbox": box, "score": score}


BACKEND_PARAMS = ["pycocotools", pytest.param("faster", marks=pytest.mark.skipif(
    not faster_available(), reason="faster-coco-eval not installed"))]


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_coco_perfect_detections(backend):
    gt = coco_gt()
    res = [det(a["image_id"], a["category_id"], a["bbox"], 0.9) for a in gt["annotations"]]
    stats = coco_evaluate(gt, res, backend=backend)
    assert list(stats) == list(STAT_NAMES)
    for k in ("AP", "AP50", "AP75", "APs", "APm", "AR1", "AR10", "AR100", "ARs", "ARm"):
        assert stats[k] == pytest.approx(100.0), k
    # no large ground truth: no value (pycocotools' -1)
    assert stats["APl"] is None and stats["ARl"] is None


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_coco_hand_computed_precision_recall(backend):
    gt = coco_gt()
    res = [det(1, 3, [10, 10, 20, 20], 0.9),       # TP
           det(2, 3, [150, 150, 30, 30], 0.8),     # FP (no overlap)
           det(2, 3, [50, 50, 50, 50], 0.7),       # TP
           det(3, 7, [20, 30, 40, 60], 0.6)]       # TP, the only "dog"
    stats = coco_evaluate(gt, res, backend=backend, per_category=True)
    # cat, at every IoU: recall .5 (p 1), .5 (p .5), 1 (p 2/3); envelope 1 on recall 0..0.5 (51 of
    # the 101 recall points) and 2/3 on 0.51..1 (50 points) -> (51 + 50 * 2/3) / 101 = 253/303; dog
    # 1.
    cat_ap = 253 / 303
    assert stats["per_category"] == {"cat": pytest.approx(100 * cat_ap),
                                     "dog": pytest.approx(100.0)}
    assert stats["AP"] == pytest.approx(100 * (cat_ap + 1) / 2)
    assert stats["AP50"] == stats["AP75"] == pytest.approx(stats["AP"])
    assert stats["APs"] == pytest.approx(100.0)          # cat small: one GT, one TP at 0.9 first
    # medium: cat's medium GT (img 2) is preceded by the medium-size FP? The FP is 30x30 = 900 ->
    # small and unmatched, so it is ignored in the medium range: cat medium AP = dog medium AP = 1.
    assert stats["APm"] == pytest.approx(100.0)
    # AR1: image 2's top detection is the FP -> cat recall 1/2 with one detection per image; dog 1.
    assert stats["AR1"] == pytest.approx(100 * (0.5 + 1) / 2)
    assert stats["AR10"] == stats["AR100"] == pytest.approx(100.0)


def test_coco_empty_results_and_bad_input(tmp_path):
    gt = coco_gt()
    stats = coco_evaluate(gt, [], backend="pycocotools")
    assert stats["AP"] == 0.0 and stats["AR100"] == 0.0 and stats["APl"] is None
    with pytest.raises(COCOEvalError, match=r"results\[1\]: unknown image_id 42"):
        coco_evaluate(gt, [det(1, 3, [0, 0, 1, 1], 0.5), det(42, 3, [0, 0, 1, 1], 0.5)])
    with pytest.raises(COCOEvalError, match=r"results\[0\]: unknown category_id 5; valid: "
                       r"\[3, 7\]"):
        coco_evaluate(gt, [det(1, 5, [0, 0, 1, 1], 0.5)])
    with pytest.raises(COCOEvalError, match="negative width"):
        coco_evaluate(gt, [det(1, 3, [5, 5, -1, 1], 0.5)])
    path = tmp_path / "res.json"
    path.write_text(json.dumps([det(1, 3, [0, 0, 1], 0.5)]))
    with pytest.raises(COCOEvalError, match=f"{path}: results\\[0\\]: bbox must be 4"):
        coco_evaluate(gt, path)
    np.testing.assert_array_equal(boxes_to_coco_xywh([[10, 20, 15, 40]]), [[10, 20, 5, 20]])


@pytest.mark.skipif(not faster_available(), reason="faster-coco-eval not installed")
def test_coco_backends_agree_on_random_data():
    rng = np.random.default_rng(1)
    images = [{"id": i, "width": 300, "height": 300} for i in range(1, 13)]
    cats = [{"id": c, "name": f"c{c}"} for c in (1, 4, 9)]
    anns, res = [], []
    for img in images:
        for _ in range(rng.integers(0, 6)):
            x, y = rng.uniform(0, 200, 2)
            w, h = rng.uniform(4, 120, 2)
            c = int(rng.choice([1, 4, 9]))
            anns.append({"id": len(anns) + 1, "image_id": img["id"], "category_id": c,
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(rng.random() < 0.05)})
            for _ in range(rng.integers(0, 3)):
                jit = rng.normal(0, 0.1 * min(w, h), 4)
                res.append(det(img["id"], c,
                               [x + jit[0], y + jit[1], abs(w + jit[2]), abs(h + jit[3])],
                               float(rng.random())))
        for _ in range(rng.integers(0, 4)):
            res.append(det(img["id"], int(rng.choice([1, 4, 9])), list(rng.uniform(0, 150, 4)),
                           float(rng.random())))
    gt = {"images": images, "categories": cats, "annotations": anns}
    a = coco_evaluate(gt, res, backend="pycocotools", per_category=True)
    b = coco_evaluate(gt, res, backend="faster", per_category=True)
    assert 5 < a["AP"] < 95
    for k in STAT_NAMES:
        assert a[k] == pytest.approx(b[k], abs=1e-9), k
    assert a["per_category"] == pytest.approx(b["per_category"], abs=1e-9)


def test_coco_cli(tmp_path):
    gt_path, res_path = tmp_path / "gt.json", tmp_path / "res.json"
    gt = coco_gt()
    gt_path.write_text(json.dumps(gt))
    res_path.write_text(json.dumps([det(a["image_id"], a["category_id"], a["bbox"], 0.9)
                                    for a in gt["annotations"]]))
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "eval_coco.py"), "--annotations",
                           str(gt_path), "--results", str(res_path), "--backend", "pycocotools"],
                          capture_output=True, text=True, check=True)
    printed = json.loads(proc.stdout)
    assert printed["AP"] == pytest.approx(100.0) and printed["APl"] is None
    # percent, not pycocotools' fraction
    assert printed["units"]["AP"] == "%" and printed["units"]["AR100"] == "%"


def test_bench_reference_loop_agrees_on_synthetic_voc():
    from transfer.bench import naive_voc_evaluate, synthetic_voc

    classes = tuple(f"c{i}" for i in range(5))
    ann, dets = synthetic_voc(40, classes, fp_per_image=5, seed=3)
    for metric in ("11point", "area"):
        ours, naive = voc_evaluate(dets, ann, classes,
                                   metric), naive_voc_evaluate(dets, ann, classes, metric)
        assert ours["AP"] == pytest.approx(naive["AP"], abs=1e-9) and 10 < ours["mAP"] < 95


def test_toy_world_ground_truth_as_detections_scores_100(toy_world, tmp_path):
    """The readers agree with the toy world's real layouts: its own boxes score 100 (VOC and
    COCO)."""
    from mixup_transfer.core.constants import VOC_CLASSES
    from transfer.voc_eval import load_voc_annotations

    devkit = toy_world / "VOCdevkit"
    ann = load_voc_annotations(devkit, "2007", "test")
    dets = {c: [] for c in VOC_CLASSES}
    for image_id, a in ann.items():
        for o in a["objects"]:
            dets[o["name"]].append((image_id, 1.0, o["bbox"]))
    write_voc_results(tmp_path / "voc", "test", dets)
    out = evaluate_voc_results(devkit, tmp_path / "voc", "2007", "test")
    present = {o["name"] for a in ann.values() for o in a["objects"] if not o["difficult"]}
    assert present and out["mAP"] == pytest.approx(100.0)
    assert {c for c, v in out["AP"].items() if v is not None} == present

    gt_file = toy_world / "coco" / "annotations" / "instances_val2017.json"
    gt = json.loads(gt_file.read_text())
    res = [det(a["image_id"], a["category_id"], a["bbox"], 1.0) for a in gt["annotations"]]
    stats = coco_evaluate(gt_file, res, backend="pycocotools")
    assert stats["AP"] == pytest.approx(100.0) and stats["AR100"] == pytest.approx(100.0)
    if faster_available():
        assert coco_evaluate(gt_file, res, backend="faster") == pytest.approx(stats)


# ------------------------------------------------------------------------------------------------
# detectron2's own evaluators on the same detections (the `d2` group; skipped without detectron2)


def _toy_detections(dicts, n_classes, seed=0):
    """Per image: each ground-truth box jittered, one sub-pixel box (xmax < xmin once written in
    VOC's inclusive coordinates) and two random boxes; distinct scores at 3 decimals (detectron2's
    VOC files round to them and its sort is not stable)."""
    import torch
    from detectron2.structures import Boxes, BoxMode, Instances

    rng = np.random.default_rng(seed)
    scores = rng.permutation(np.arange(1, 1000)) / 1000.0
    out, k = [], 0
    for r in dicts:
        w, h = r["width"], r["height"]
        boxes, classes = [], []
        for a in r["annotations"]:
            b = np.asarray(BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS),
                           dtype=np.float64)
            boxes.append(b + rng.normal(0, 2.0, 4))
            classes.append(a["category_id"])
        x0, y0 = rng.uniform(0, w - 2), rng.uniform(0, h - 2)
        boxes.append([x0, y0, x0 + 0.3, y0 + 0.6])
        classes.append(int(rng.integers(n_classes)))
        for _ in range(2):
            x0, y0 = rng.uniform(0, w / 2), rng.uniform(0, h / 2)
            boxes.append([x0, y0, x0 + rng.uniform(5, w / 2), y0 + rng.uniform(5, h / 2)])
            classes.append(int(rng.integers(n_classes)))
        inst = Instances((h, w))
        inst.pred_boxes = Boxes(torch.tensor(np.asarray(boxes), dtype=torch.float32))
        inst.scores = torch.tensor(scores[k:k + len(boxes)], dtype=torch.float32)
        inst.pred_classes = torch.tensor(classes, dtype=torch.int64)
        k += len(boxes)
        out.append(({"image_id": r["image_id"], "height": h, "width": w}, {"instances": inst}))
    return out


@pytest.mark.d2
def test_detectron2_evaluators_give_our_numbers_on_the_same_detections(toy_world, tmp_path,
                                                                       caplog):
    pytest.importorskip("detectron2")
    from detectron2.data import DatasetCatalog
    from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator

    from transfer.datasets import VOC_CLASSES
    from transfer.detection import d2_backend
    from transfer.detection.config import resolve_config
    from transfer.voc_eval import load_voc_annotations

    # VOC07 test, 11-point: detectron2's AP50 / AP75 / AP (mean over IoU .50:.95) vs voc_evaluate
    specs = d2_backend.register_toolkit_datasets("voc", toy_world / "VOCdevkit")
    name = specs["test"]["name"]
    ev = PascalVOCDetectionEvaluator(name)
    ev.reset()
    for inp, out in _toy_detections(DatasetCatalog.get(name), len(VOC_CLASSES)):
        ev.process([inp], [out])
    # the lines of its result files
    lines = {VOC_CLASSES[c]: ls for c, ls in ev._predictions.items()}
    theirs = ev.evaluate()["bbox"]
    dets = {c: [(p[0], float(p[1]), tuple(map(float, p[2:]))) for p in (ln.split() for ln in ls)]
            for c, ls in lines.items()}
    # sub-pixel boxes are in there
    assert sum(x[2][2] < x[2][0] for d in dets.values() for x in d) > 0
    ann = load_voc_annotations(toy_world / "VOCdevkit", "2007", "test")
    with caplog.at_level("WARNING", logger="transfer.voc_eval"):
        ours = {t: voc_evaluate(dets, ann, VOC_CLASSES, "11point", iou=t / 100)
                for t in range(50, 100, 5)}
    assert "have xmax < xmin" in caplog.text
    # a class absent from the split: AP None for us (left out of our mAP), 0 in detectron2's mean
    assert any(v is None for v in ours[50]["AP"].values())

    def as_devkit(res):
        return sum(v or 0.0 for v in res["AP"].values()) / len(VOC_CLASSES)

    assert as_devkit(ours[50]) == pytest.approx(theirs["AP50"],
                                                abs=1e-9) and 5 < theirs["AP50"] < 95
    assert as_devkit(ours[75]) == pytest.approx(theirs["AP75"], abs=1e-9)
    assert np.mean([as_devkit(o) for o in ours.values()]) == pytest.approx(theirs["AP"], abs=1e-9)

    # COCO val: detectron2's COCOEvaluator vs coco_evaluate (pycocotools) on the same json results
    cfg = resolve_config({"data": {"format": "coco", "root": str(toy_world / "coco")}})
    specs = d2_backend.register_toolkit_datasets(d2_backend.dataset_specs(cfg))
    name, id_map = specs["test"]["name"], specs["test"]["id_map"]
    ev = COCOEvaluator(name, tasks=("bbox",), distributed=False, output_dir=str(tmp_path / "coco"))
    ev.reset()
    for inp, out in _toy_detections(DatasetCatalog.get(name), len(id_map), seed=1):
        ev.process([inp], [out])
    to_cat = {i: c for c, i in id_map.items()}
    results = [dict(r, category_id=to_cat[r["category_id"]]) for p in ev._predictions
               for r in p["instances"]]
    theirs = ev.evaluate()["bbox"]
    ours = coco_evaluate(specs["test"]["json_file"], results, backend="pycocotools")
    for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        if ours[k] is None:  # an area range without ground truth: detectron2 reports nan
            assert math.isnan(theirs[k]), k
        else:
            assert ours[k] == pytest.approx(theirs[k], abs=1e-9), k
    assert 5 < theirs["AP50"] < 95
