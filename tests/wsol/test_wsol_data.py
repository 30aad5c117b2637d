"""CUB raw reader, wsolevaluation metadata writer/reader, WSOLDataset, and the score-map CLI
path."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsol.data import (
    MetadataError,
    WSOLDataset,
    cub_to_wsol_metadata,
    read_cub,
    read_wsol_metadata,
)
from wsol.evaluate import centred_box_baseline, score_scoremap_dir
from wsol.metrics import ScoreMapError

ROOT = Path(__file__).resolve().parents[2]

# First lines of the real CUB files (ids 1 and 2 train/test as in the real split), plus one more
# image.
CUB = {
    "classes.txt": "1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n",
    "images.txt": "1 001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg\n"
                  "2 001.Black_footed_Albatross/Black_Footed_Albatross_0009_34.jpg\n"
                  "3 002.Laysan_Albatross/Laysan_Albatross_0002_1027.jpg\n",
    "image_class_labels.txt": "1 1\n2 1\n3 2\n",
    "train_test_split.txt": "1 0\n2 1\n3 1\n",
    "bounding_boxes.txt": "1 60.0 27.0 325.0 304.0\n"
                          "2 139.0 30.0 153.0 264.0\n"
                          "3 10.5 20.0 100.0 80.0\n",
}
SIZES = {1: (500, 400), 2: (500, 350), 3: (200, 120)}


def _make_cub(root: Path, files=None):
    files = dict(CUB, **(files or {}))
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).write_text(text)
    for line in CUB["images.txt"].splitlines():
        i, rel = line.split()
        p = root / "images" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", SIZES[int(i)], (int(i) * 40, 10, 10)).save(p)
    return root


def test_read_cub_and_convert(tmp_path):
    cub = _make_cub(tmp_path / "CUB_200_2011")
    records, classes = read_cub(cub)
    assert classes == ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    assert [(r.image_id, r.label, r.is_train) for r in records] == [(1, 0, False), (2, 0, True),
                                                                    (3, 1, True)]
    assert records[0].box == (60.0, 27.0, 385.0, 331.0)  # x1 = x + w, y1 = y + h
    out = cub_to_wsol_metadata(cub, tmp_path / "meta")
    assert set(out) == {"train", "test"}
    test_dir = tmp_path / "meta" / "test"
    assert (test_dir / "image_ids.txt").read_text() == \
        "001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg\n"
    assert (test_dir / "class_labels.txt").read_text() == \
        "001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg,0\n"
    assert (test_dir / "image_sizes.txt").read_text() == \
        "001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg,500,400\n"
    assert (test_dir / "localization.txt").read_text() == \
        "001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg,60,27,385,331\n"
    train = read_wsol_metadata(tmp_path / "meta" / "train")
    assert train.image_ids[1] == "002.Laysan_Albatross/Laysan_Albatross_0002_1027.jpg"
    assert train.labels[train.image_ids[1]] == 1 and train.sizes[train.image_ids[1]] == (200, 120)
    np.testing.assert_array_equal(train.boxes[train.image_ids[1]], [[10.5, 20.0, 110.5, 100.0]])
    ds = WSOLDataset(cub / "images", tmp_path / "meta" / "train")
    img, label, idx = ds[1]
    assert img.size == (200, 120) and label == 1 and idx == 1 and len(ds) == 2


@pytest.mark.parametrize("name,text,match", [
    ("bounding_boxes.txt", "1 60.0 27.0 325.0 304.0\n2 139.0 30.0 abc 264.0\n3 1 1 1 1\n",
     r"bounding_boxes.txt:2: cannot parse 'abc'"),
    ("bounding_boxes.txt", "1 60.0 27.0 325.0\n", r"bounding_boxes.txt:1: expected 5 fields"),
    ("bounding_boxes.txt", "1 60.0 27.0 -5.0 304.0\n2 1 1 1 1\n3 1 1 1 1\n",
     r"image 1 has negative box size"),
    ("image_class_labels.txt", "1 1\n2 1\n3 7\n", r"image 3 has unknown class 7"),
    ("train_test_split.txt", "1 0\n2 1\n9 1\n",
     r"train_test_split.txt: unknown image id\(s\) \[9\]"),
    ("train_test_split.txt", "1 0\n2 1\n", r"train_test_split.txt: no entry for image "
     r"id\(s\) \[3\]"),
    ("images.txt", "1 a.jpg\n1 b.jpg\n", r"images.txt:2: duplicate id 1"),
])
def test_cub_errors_name_file_and_line(tmp_path, name, text, match):
    cub = _make_cub(tmp_path / "CUB_200_2011")
    (cub / name).write_text(text)
    with pytest.raises(MetadataError, match=match):
        read_cub(cub)


def test_cub_missing_file_and_box_outside_image(tmp_path):
    cub = _make_cub(tmp_path / "CUB_200_2011")
    (cub / "classes.txt").unlink()
    with pytest.raises(MetadataError, match=r"classes.txt: file not found"):
        read_cub(cub)
    cub = _make_cub(tmp_path / "CUB2", {"bounding_boxes.txt": CUB["bounding_boxes.txt"].replace(
        "3 10.5 20.0 100.0 80.0", "3 150.0 20.0 100.0 80.0")})
    with pytest.raises(MetadataError, match=r"image 3: box .* outside the image of size 200x120"):
        cub_to_wsol_metadata(cub, tmp_path / "meta")


def _write_meta(d: Path, loc="a.jpg,1,2,5,6\nb.jpg,0,0,9,9\n", ids="a.jpg\nb.jpg\n",
                labels="a.jpg,0\nb.jpg,1\n", sizes="a.jpg,10,10\nb.jpg,10,20\n"):
    d.mkdir(parents=True, exist_ok=True)
    (d / "image_ids.txt").write_text(ids)
    (d / "class_labels.txt").write_text(labels)
    (d / "image_sizes.txt").write_text(sizes)
    (d / "localization.txt").write_text(loc)
    return d


@pytest.mark.parametrize("kw,match", [
    ({"loc": "a.jpg,1,2,5\n"}, r"localization.txt:1: expected 5 comma-separated fields"),
    ({"loc": "a.jpg,1,2,5,6\nb.jpg,5,0,4,9\n"}, r"localization.txt:2: box .* x1 < x0"),
    ({"loc": "a.jpg,1,2,5,6\nb.jpg,0,0,11,21\n"},
     r"localization.txt:2: box .* outside the image of size 10x20"),
    ({"loc": "a.jpg,1,2,5,6\nc.jpg,0,0,1,1\n"}, r"localization.txt:2: unknown image id 'c.jpg'"),
    ({"loc": "a.jpg,1,2,5,6\n"}, r"no box for image id\(s\) \['b.jpg'\]"),
    ({"labels": "a.jpg,0\nb.jpg,x\n"}, r"class_labels.txt:2: cannot parse 'x'"),
    ({"sizes": "a.jpg,10,10\n"}, r"image_sizes.txt: no entry for image id\(s\) \['b.jpg'\]"),
    ({"ids": "a.jpg\na.jpg\n"}, r"image_ids.txt:2: duplicate image id 'a.jpg'"),
])
def test_metadata_errors(tmp_path, kw, match):
    d = _write_meta(tmp_path / "m", **kw)
    with pytest.raises(MetadataError, match=match):
        read_wsol_metadata(d)


def test_metadata_missing_file(tmp_path):
    d = _write_meta(tmp_path / "m")
    (d / "image_sizes.txt").unlink()
    with pytest.raises(MetadataError, match=r"image_sizes.txt: file not found"):
        read_wsol_metadata(d)


def test_score_saved_maps_and_cli(tmp_path):
    # a.jpg 10x10 -> GT rescaled to 8x8: int(1*0.8)=0, int(2*0.8)=1, int(5*0.8)=4, int(6*0.8)=4
    d = _write_meta(tmp_path / "m", loc="a.jpg,1,2,5,6\n", ids="a.jpg\n", labels="a.jpg,0\n",
                    sizes="a.jpg,10,10\n")
    maps = tmp_path / "maps"
    maps.mkdir()
    m = np.zeros((8, 8), np.float32)
    m[1:5, 0:5] = 1.0  # box [0, 1, 5, 5] vs GT [0, 1, 4, 4]: 16 / 25 = 0.64 at every threshold
    np.save(maps / "a.jpg.npy", m)
    res = score_scoremap_dir(d, maps, 0.01, (30, 50, 70))
    assert res["maxboxacc_per_iou"] == {"30": 100.0, "50": 100.0, "70": 0.0}
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "eval_wsol.py"), "--metadata",
                          str(d), "--scoremaps", str(maps), "--cam-curve-interval", "0.01"],
                         capture_output=True, text=True, check=True,
                         env={"MT_NO_PROGRESS": "1", "PATH": ""})
    cli = json.loads(out.stdout)
    assert cli["maxboxacc_per_iou"] == res["maxboxacc_per_iou"] and cli[
        "maxboxacc_v2"
    ] == pytest.approx(200 / 3)
    (maps / "a.jpg.npy").unlink()
    with pytest.raises(ScoreMapError, match=r"'a.jpg' missing"):
        score_scoremap_dir(d, maps)
    np.save(maps / "a.jpg.npy", m * 2)
    with pytest.raises(ScoreMapError, match=r"'a.jpg' lies outside \[0, 1\]"):
        score_scoremap_dir(d, maps)


def test_centred_box_baseline(tmp_path):
    # 8x8 frame: centred half box [2, 2, 5, 5]; GT a.jpg -> [0, 1, 4, 4]: inter 3x3=9, union
    # 16+20-9=27
    d = _write_meta(tmp_path / "m", loc="a.jpg,1,2,5,6\n", ids="a.jpg\n", labels="a.jpg,0\n",
                    sizes="a.jpg,10,10\n")
    res = centred_box_baseline(d, (8, 8), 0.5, (30, 50))
    assert res["boxacc"] == {"30": 100.0, "50": 0.0}
