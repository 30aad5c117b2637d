"""Readers on small hand-written trees that start with the real files' first lines."""

import json
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from mixup_transfer.core.config import ConfigError, load_config
from mixup_transfer.core.constants import VOC_CLASSES
from mixup_transfer.core.data import DataError, ImageNetFolder, read_image
from transfer.datasets import COCODetection, VOCDetection, voc0712_trainval

# First object of VOC2007 000005.xml, as distributed in the devkit.
VOC_XML = textwrap.dedent("""\
    <annotation>
    \t<folder>VOC2007</folder>
    \t<filename>000005.jpg</filename>
    \t<source>
    \t\t<database>The VOC2007 Database</database>
    \t\t<annotation>PASCAL VOC2007</annotation>
    \t\t<image>flickr</image>
    \t\t<flickrid>325991873</flickrid>
    \t</source>
    \t<size>
    \t\t<width>500</width>
    \t\t<height>375</height>
    \t\t<depth>3</depth>
    \t</size>
    \t<segmented>0</segmented>
    \t<object>
    \t\t<name>chair</name>
    \t\t<pose>Rear</pose>
    \t\t<truncated>0</truncated>
    \t\t<difficult>0</difficult>
    \t\t<bndbox>
    \t\t\t<xmin>263</xmin>
    \t\t\t<ymin>211</ymin>
    \t\t\t<xmax>324</xmax>
    \t\t\t<ymax>339</ymax>
    \t\t</bndbox>
    \t</object>
    \t<object>
    \t\t<name>chair</name>
    \t\t<pose>Unspecified</pose>
    \t\t<truncated>1</truncated>
    \t\t<difficult>1</difficult>
    \t\t<bndbox>
    \t\t\t<xmin>1</xmin>
    \t\t\t<ymin>1</ymin>
    \t\t\t<xmax>500</xmax>
    \t\t\t<ymax>375</ymax>
    \t\t</bndbox>
    \t</object>
    </annotation>
    """)

IMAGENET_XML = textwrap.dedent("""\
    <annotation>
    \t<folder>val</folder>
    \t<filename>ILSVRC2012_val_00000001</filename>
    \t<source>
    \t\t<database>ILSVRC_2012</database>
    \t</source>
    \t<size>
    \t\t<width>500</width>
    \t\t<height>375</height>
    \t\t<depth>3</depth>
    \t</size>
    \t<segmented>0</segmented>
    \t<object>
    \t\t<name>n01751748</name>
    \t\t<pose>Unspecified</pose>
    \t\t<truncated>0</truncated>
    \t\t<difficult>0</difficult>
    \t\t<bndbox>
    \t\t\t<xmin>111</xmin>
    \t\t\t<ymin>108</ymin>
    \t\t\t<xmax>441</xmax>
    \t\t\t<ymax>375</ymax>
    \t\t</bndbox>
    \t</object>
    </annotation>
    """)


def _jpeg(path, w, h, colour=(120, 30, 200)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), colour).save(path, quality=95)


@pytest.fixture()
def voc(tmp_path):
    for year, ids in (("2007", ["000005"]), ("2012", ["2008_000008"])):
        root = tmp_path / "VOCdevkit" / f"VOC{year}"
        (root / "ImageSets" / "Main").mkdir(parents=True)
        (root / "Annotations").mkdir()
        (root / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(ids) + "\n")
        for i in ids:
            (root / "Annotations"
             / f"{i}.xml").write_text(VOC_XML.replace("000005.jpg", f"{i}.jpg"))
            _jpeg(root / "JPEGImages" / f"{i}.jpg", 500, 375)
    return tmp_path / "VOCdevkit"


def test_voc_reader(voc):
    ds = VOCDetection(voc, "2007", "trainval")
    image, target = ds[0]
    assert image.size == (500, 375) and image.mode == "RGB"
    # xmin 263 (1-based inclusive) -> x0 = 262; xmax 324 -> x1 = 324 (continuous coordinates)
    assert target["boxes"].tolist() == [[262.0, 210.0, 324.0, 339.0], [0.0, 0.0, 500.0, 375.0]]
    assert target["labels"].tolist() == [VOC_CLASSES.index("chair") + 1] * 2
    assert target["difficult"].tolist() == [False, True]
    assert target["image_id"] == "000005" and target["size"] == (375, 500)
    assert len(VOCDetection(voc, "2007", "trainval", keep_difficult=False)[0][1]["boxes"]) == 1
    both = voc0712_trainval(voc)
    assert len(both) == 2 and both[1][1]["image_id"] == "2008_000008"


@pytest.mark.parametrize("bad,match", [
    ("<xmin>263</xmin>", None),
    ("<xmax>324</xmax>", "xmax < xmin"),
    ("<name>chair</name>", "unknown class name 'sofa_bed'"),
    ("<ymax>339</ymax>", "outside the 500x375 image"),
    ("</annotation>", "malformed XML"),
])
def test_voc_bad_annotations(voc, bad, match):
    xml = voc / "VOC2007" / "Annotations" / "000005.xml"
    replacement = {"<xmin>263</xmin>": "<xmin>2x3</xmin>", "<xmax>324</xmax>": "<xmax>200</xmax>",
                   "<name>chair</name>": "<name>sofa_bed</name>",
                   "<ymax>339</ymax>": "<ymax>400</ymax>", "</annotation>": "</annotat"}[bad]
    xml.write_text(VOC_XML.replace(bad, replacement, 1))
    with pytest.raises(DataError, match=match or "malformed number") as e:
        VOCDetection(voc, "2007", "trainval")
    assert "000005.xml" in str(e.value)
    ds = VOCDetection(voc, "2007", "trainval", skip_bad=True)
    assert len(ds) == 0 and len(ds.skipped) == 1 and ds.skipped[0][0] == "000005"


def test_corrupt_jpeg_and_missing_split(voc, tmp_path):
    path = voc / "VOC2007" / "JPEGImages" / "000005.jpg"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="000005.jpg"):
        VOCDetection(voc, "2007", "trainval")[0]
    with pytest.raises(DataError, match="test.txt"):
        VOCDetection(voc, "2007", "test")
    with pytest.raises(DataError, match="not found"):
        read_image(tmp_path / "none.jpg")


@pytest.fixture()
def imagenet(tmp_path):
    root = tmp_path / "imagenet"
    for split in ("train", "val"):
        for k, wnid in enumerate(["n01751748", "n02119789"]):
            for j in range(2):
                name = (
                    f"{wnid}_{j}.JPEG"
                    if split == "train"
                    else f"ILSVRC2012_val_0000000{2 * k + j + 1}.JPEG"
                )
                _jpeg(root / split / wnid / name, 500, 375)
    (root / "val_boxes").mkdir()
    for i in range(1, 5):
        xml = IMAGENET_XML.replace("00000001", f"0000000{i}")
        if i > 2:
            xml = xml.replace("n01751748", "n02119789")
        (root / "val_boxes" / f"ILSVRC2012_val_0000000{i}.xml").write_text(xml)
    return root


def test_imagenet_reader_xml_and_csv(imagenet):
    train = ImageNetFolder(imagenet, "train")
    assert train.classes == ["n01751748", "n02119789"] and len(train) == 4
    assert [label for _, label in train.samples] == [0, 0, 1, 1]
    val = ImageNetFolder(imagenet, "val")
    np.testing.assert_array_equal(val.boxes(0), [[110, 107, 441, 375]])
    (imagenet / "val_boxes" / "ILSVRC2012_val_00000001.xml").unlink()
    with pytest.raises(DataError, match="ILSVRC2012_val_00000001.JPEG: no box file"):
        val.boxes(0)
    # Kaggle's LOC_val_solution.csv: the same numbers in one file
    import shutil

    shutil.rmtree(imagenet / "val_boxes")
    (imagenet / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n"
        "ILSVRC2012_val_00000001,n01751748 111 108 441 375 n01751748 1 1 20 30 \n"
        "ILSVRC2012_val_00000002,n01751748 5 6 7 8\n")
    val = ImageNetFolder(imagenet, "val")
    np.testing.assert_array_equal(val.boxes(0), [[110, 107, 441, 375], [0, 0, 20, 30]])
    with pytest.raises(DataError, match="ILSVRC2012_val_00000003.JPEG: no row in"):
        val.boxes(2)
    with open(imagenet / "LOC_val_solution.csv", "a") as f:
        f.write("ILSVRC2012_val_00000003,n02119789 5 6 7\n")
    with pytest.raises(DataError, match=r"LOC_val_solution.csv:4: PredictionString"):
        ImageNetFolder(imagenet, "val").boxes(0)
    image, label = val[3]
    assert label == 1 and image.size == (500, 375)


def test_imagenet_without_boxes(imagenet):
    import shutil

    shutil.rmtree(imagenet / "val_boxes")
    val = ImageNetFolder(imagenet, "val")
    assert not val.has_boxes
    with pytest.raises(DataError, match="no box annotations"):
        val.boxes(0)


def _coco_json():
    return {
        "info": {"description": "COCO 2017 Dataset", "version": "1.0", "year": 2017},
        "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1,
                      "name": "Attribution-NonCommercial-ShareAlike License"}],
        "images": [{"license": 4, "file_name": "000000397133.jpg", "height": 427, "width": 640,
                    "id": 397133},
                   {"license": 1, "file_name": "000000037777.jpg", "height": 230, "width": 352,
                    "id": 37777}],
        "annotations": [
            {"segmentation": [[10, 10, 20, 10, 20, 20]], "area": 702.1, "iscrowd": 0,
             "image_id": 397133, "bbox": [102.49, 118.47, 7.9, 17.31], "category_id": 44,
             "id": 82445},
            {"segmentation": [[0, 0, 1, 1, 2, 0]], "area": 100.0, "iscrowd": 1, "image_id": 397133,
             "bbox": [0.0, 0.0, 640.0, 427.0], "category_id": 1, "id": 82446},
        ],
        "categories": [{"supercategory": "person", "id": 1, "name": "person"},
                       {"supercategory": "kitchen", "id": 44, "name": "bottle"},
                       {"supercategory": "vehicle", "id": 3, "name": "car"}],
    }


def test_coco_reader(tmp_path):
    ann = tmp_path / "annotations" / "instances_val2017.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps(_coco_json()))
    _jpeg(tmp_path / "val2017" / "000000397133.jpg", 640, 427)
    _jpeg(tmp_path / "val2017" / "000000037777.jpg", 352, 230)
    ds = COCODetection(tmp_path / "val2017", ann)
    assert ds.cat_ids == [1, 3, 44] and ds.label_to_cat == {1: 1, 2: 3, 3: 44}
    assert ds.classes == ("person", "car", "bottle")
    assert ds.ids == [37777, 397133]
    image, target = ds[1]
    assert image.size == (640, 427)
    np.testing.assert_allclose(target["boxes"].numpy(),
                               [[102.49, 118.47, 110.39, 135.78], [0, 0, 640, 427]], rtol=1e-6)
    assert target["labels"].tolist() == [3, 1] and target["difficult"].tolist() == [False, True]
    assert len(ds[0][1]["boxes"]) == 0 and ds[0][1]["boxes"].shape == (0, 4)
    assert len(COCODetection(tmp_path / "val2017", ann, remove_empty=True)) == 1
    bad = _coco_json()
    bad["annotations"][0]["category_id"] = 2
    ann.write_text(json.dumps(bad))
    with pytest.raises(DataError, match="annotation id 82445 .*unknown category id 2"):
        COCODetection(tmp_path / "val2017", ann)
    bad["annotations"][0].update(category_id=44, bbox=[600, 10, 100, 10])
    ann.write_text(json.dumps(bad))
    with pytest.raises(DataError, match="outside the 640x427 image"):
        COCODetection(tmp_path / "val2017", ann)
    assert len(COCODetection(tmp_path / "val2017", ann, skip_bad=True).skipped) == 1


def test_config_bases_overrides_and_unknown_keys(tmp_path):
    (tmp_path / "base.yaml").write_text("model:\n"
                                        "  arch: resnet50\n"
                                        "  width: 1\n"
                                        "optim:\n"
                                        "  lr: 0.1\n")
    (tmp_path / "child.yaml").write_text("_BASE_: base.yaml\nmodel:\n  arch: resnet18\n")
    defaults = {"model": {"arch": "resnet50", "width": 1}, "optim": {"lr": 0.1, "wd": 1e-4},
                "seed": 0}
    cfg = load_config(tmp_path / "child.yaml", ["optim.lr=0.05", "seed=3"], defaults)
    assert cfg == {"model": {"arch": "resnet18", "width": 1}, "optim": {"lr": 0.05, "wd": 1e-4},
                   "seed": 3}
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['optim.momentum'\]; valid "
                       r"keys under optim"):
        load_config(tmp_path / "child.yaml", ["optim.momentum=0.9"], defaults)
    (tmp_path / "loop.yaml").write_text("_BASE_: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "loop.yaml")
    # the suite imports torch once; keeps this module's import cost honest
    assert torch.__version__
