"""The toy world: determinism, exact boxes, and the real on-disk formats (tiny preset, generated
once)."""

import csv
import hashlib
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest

import mixup_transfer.toyworld as toy

# pycocotools 2.0.x + NumPy 2 warns on every annToMask
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REPO = Path(__file__).resolve().parents[2]
SEED = 0


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _make(out: Path, seed: int) -> dict:
    from wsol.data import cub_to_wsol_metadata

    return toy.make_toy_world(out, preset="tiny", seed=seed, workers=1,
                              wsol_metadata=cub_to_wsol_metadata)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_a")
    return out, _make(out, SEED)


def _xml_objects(path: Path):
    root = ET.parse(path).getroot()
    size = root.find("size")
    w, h = int(size.findtext("width")), int(size.findtext("height"))
    objs = []
    for o in root.findall("object"):
        bb = o.find("bndbox")
        objs.append(
            dict(
                name=o.findtext("name"),
                box=tuple(int(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")),
                truncated=int(o.findtext("truncated")),
                difficult=int(o.findtext("difficult")),
            )
        )
    return root, (h, w), objs


def _jpeg_hw(path: Path):
    img = cv2.imread(str(path))
    assert img is not None, path
    return img.shape[:2]


# ----------------------------------------------------------------------------------------------
# rendering


def test_square_box_hand_computed():
    # square half-side 0.85 * 20 = 17 around (50, 40): pixel columns 33..67, rows 23..57 -> 35 x 35
    # pixels
    rng = np.random.default_rng(0)
    spec = dict(cls=toy.IMAGENET_CLASSES[2], center=(50, 40), radius=20, angle=0.0, aspect=1.0)
    img, (obj,) = toy.render_scene(rng, (80, 100), [spec])
    assert img.shape == (80, 100, 3) and img.dtype == np.uint8
    assert obj.box == (33.0, 23.0, 68.0, 58.0)
    assert obj.mask.sum() == 35 * 35 and not obj.truncated
    # the object is painted blue-ish where its mask is (solid texture)
    mean = img[obj.mask].mean(0)
    assert mean[2] > mean[0] + 60 and mean[2] > mean[1] + 60


def test_render_scene_boxes_are_tight_and_inside():
    rng = np.random.default_rng(1)
    classes = toy.IMAGENET_CLASSES + toy.VOC_OBJECT_CLASSES + toy.CUB_CLASSES
    n_trunc = 0
    for i in range(40):
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        specs = [
            dict(
                cls=classes[(3 * i + k) % len(classes)],
                center=tuple(rng.uniform(0, [w, h])),
                radius=float(rng.uniform(6, 25)),
            )
            for k in range(3)
        ]
        img, objs = toy.render_scene(rng, (h, w), specs)
        assert img.shape == (h, w, 3)
        for o in objs:
            ys, xs = np.nonzero(o.mask)
            assert o.box == (xs.min(), ys.min(), xs.max() + 1.0, ys.max() + 1.0)
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            n_trunc += o.truncated
    assert n_trunc > 0


def test_truncation_flag():
    rng = np.random.default_rng(2)
    cls = toy.IMAGENET_CLASSES[0]
    _, objs = toy.render_scene(
        rng, (64, 64),
        [dict(cls=cls, center=(32, 32), radius=10), dict(cls=cls, center=(2, 30), radius=10)]
    )
    assert [o.truncated for o in objs] == [False, True]
    assert objs[1].box[0] == 0.0


def test_same_rng_same_image():
    spec = [dict(cls=toy.CUB_CLASSES[3], center=(60, 50), radius=18)]
    a, _ = toy.render_scene(np.random.default_rng(5), (100, 120), spec)
    b, _ = toy.render_scene(np.random.default_rng(5), (100, 120), spec)
    c, _ = toy.render_scene(np.random.default_rng(6), (100, 120), spec)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_vocabulary_not_separable_by_colour_alone():
    # every colour of the ImageNet world is shared by two classes; one pair shares shape and colour
    # too
    colours = [c.colour for c in toy.IMAGENET_CLASSES]
    assert all(colours.count(c) >= 2 for c in colours)
    combos = [(c.shape, c.colour) for c in toy.IMAGENET_CLASSES]
    assert len(set(combos)) < len(combos)
    assert len({(c.shape, c.colour, c.texture)
                for c in toy.IMAGENET_CLASSES}) == len(toy.IMAGENET_CLASSES)
    # CUB classes share one silhouette: they differ only in colours / markings
    assert (
        len({(b.body, b.head, b.wing, b.wing_stripe, b.breast_band, b.head_spot)
             for b in toy.CUB_CLASSES})
        == 10
    )


# ----------------------------------------------------------------------------------------------
# determinism


def test_deterministic_for_a_seed(world, tmp_path):
    out, _ = world
    # second run through the CLI, with the default number of workers (2 processes): byte-identical
    # files
    again = tmp_path / "toy_b"
    res = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "make_toy_data.py"),
            "--out",
            str(again),
            "--preset",
            "tiny",
            "--seed",
            str(SEED),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    assert "imagenet" in res.stdout and "VOC2007" in res.stdout and "CUB" in res.stdout
    ha, hb = _hashes(out), _hashes(again)
    assert len(ha) > 400
    assert ha == hb
    other = tmp_path / "toy_c"
    _make(other, SEED + 1)
    hc = _hashes(other)
    jpgs = [k for k in ha if k.lower().endswith((".jpg", ".jpeg"))]
    assert sum(ha[k] != hc.get(k) for k in jpgs) == len(jpgs)
    # regenerating over an earlier toy world replaces it completely (no stale files)
    (other / "imagenet" / "train" / "stale.JPEG").write_bytes(b"x")
    _make(other, SEED)
    assert _hashes(other) == ha


def test_refuses_to_overwrite_foreign_data(tmp_path):
    (tmp_path / "imagenet").mkdir()
    with pytest.raises(FileExistsError, match="toy_world.json"):
        toy.make_toy_world(tmp_path, preset="tiny")
    assert (tmp_path / "imagenet").is_dir()


# ----------------------------------------------------------------------------------------------
# layouts


def test_imagenet_layout(world):
    out, summary = world
    im = summary["imagenet"]
    root = out / "imagenet"
    wnids = sorted(p.name for p in (root / "train").iterdir())
    assert wnids == im["classes"] and len(wnids) == 10
    assert all(len(w) == 9 and w[0] == "n" and w[1:].isdigit() for w in wnids)
    assert sum(1 for _ in (root / "train").rglob("*.JPEG")) == im["num_train"]
    assert (root / "train" / wnids[3] / f"{wnids[3]}_1.JPEG").is_file()
    val = sorted((root / "val").rglob("*.JPEG"))
    assert len(val) == im["num_val"]
    mapping = dict(line.split(" ", 1)
                   for line in (root / "LOC_synset_mapping.txt").read_text().splitlines())
    assert list(mapping) == wnids
    with open(root / "LOC_val_solution.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["ImageId", "PredictionString"]
    solution = {r[0]: r[1].split() for r in rows[1:]}
    assert len(solution) == len(val)
    n_boxes = 0
    for p in val:
        stem, wnid = p.stem, p.parent.name
        assert stem.startswith("ILSVRC2012_val_") and len(stem) == len("ILSVRC2012_val_00000001")
        xml_root, (h, w), objs = _xml_objects(root / "val_boxes" / f"{stem}.xml")
        assert xml_root.findtext("filename") == stem
        assert (h, w) == _jpeg_hw(p)
        assert 1 <= len(objs) <= 2 and all(o["name"] == wnid for o in objs)
        flat = []
        for o in objs:
            xmin, ymin, xmax, ymax = o["box"]
            assert 1 <= xmin <= xmax <= w and 1 <= ymin <= ymax <= h
            flat += [o["name"]] + [str(v) for v in o["box"]]
        assert solution[stem] == flat  # CSV holds the same numbers as the XML
        n_boxes += len(objs)
    assert n_boxes == im["num_val_boxes"]
    # the main object is 25-60% of the image side
    _, (h, w), objs = _xml_objects(root / "val_boxes" / f"{val[0].stem}.xml")
    side = max(objs[0]["box"][2] - objs[0]["box"][0] + 1,
               objs[0]["box"][3] - objs[0]["box"][1] + 1)
    assert 0.15 * min(h, w) <= side <= 0.75 * max(h, w)


def test_imagenet_boxes_equal_regenerated_masks(world):
    out, summary = world
    root = out / "imagenet"
    nva = toy.PRESETS["tiny"]["imagenet_val"]
    for i in (0, 7, 29):
        stem = f"ILSVRC2012_val_{i + 1:08d}"
        (path,) = (root / "val").rglob(f"{stem}.JPEG")
        label = summary["imagenet"]["classes"].index(path.parent.name)
        img, objs = toy.imagenet_scene(SEED, True, i, label, preset="tiny")
        assert i < 10 * nva
        _, (h, w), xml_objs = _xml_objects(root / "val_boxes" / f"{stem}.xml")
        assert (h, w) == img.shape[:2]
        for o, x in zip(objs, xml_objs, strict=True):
            ys, xs = np.nonzero(o.mask)
            # 1-based inclusive
            assert x["box"] == (xs.min() + 1, ys.min() + 1, xs.max() + 1, ys.max() + 1)
        # the JPEG on disk is the rendered image (up to compression)
        disk = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB).astype(float)
        assert np.abs(disk - img).mean() < 6


def test_voc_layout_and_boxes(world):
    out, summary = world
    devkit = out / "VOCdevkit"
    voc = summary["voc"]
    assert voc["classes"] == list(toy.VOC_CLASSES)
    assert toy.VOC_CLASSES == (
        "aeroplane",
        "bicycle",
        "bird",
        "boat",
        "bottle",
        "bus",
        "car",
        "cat",
        "chair",
        "cow",
        "diningtable",
        "dog",
        "horse",
        "motorbike",
        "person",
        "pottedplant",
        "sheep",
        "sofa",
        "train",
        "tvmonitor",
    )
    seen = set()
    n_diff = n_trunc = 0
    for year, splits in (
        ("2007", ("train", "val", "trainval", "test")),
        ("2012", ("train", "val", "trainval")),
    ):
        root = devkit / f"VOC{year}"
        ids = {s: (root / "ImageSets" / "Main" / f"{s}.txt").read_text().split() for s in splits}
        assert sorted(ids["train"] + ids["val"]) == ids["trainval"] == sorted(ids["trainval"])
        assert not set(ids["train"]) & set(ids["val"])
        all_ids = ids["trainval"] + ids.get("test", [])
        assert not set(ids["trainval"]) & set(ids.get("test", []))
        assert len(all_ids) == voc[f"VOC{year}"]["num_images"]
        assert (
            all(len(i) == 6 and i.isdigit() for i in all_ids)
            if year == "2007"
            else all(len(i) == 11 and i[4] == "_" for i in all_ids)
        )
        n_obj = 0
        for iid in all_ids:
            xml_root, (h, w), objs = _xml_objects(root / "Annotations" / f"{iid}.xml")
            assert (
                xml_root.findtext("filename") == f"{iid}.jpg"
                and xml_root.findtext("folder") == f"VOC{year}"
            )
            assert xml_root.findtext("size/depth") == "3" and xml_root.findtext("segmented") == "0"
            assert _jpeg_hw(root / "JPEGImages" / f"{iid}.jpg") == (h, w)
            assert 1 <= len(objs) <= 4
            for o in objs:
                assert o["name"] in toy.VOC_CLASSES
                seen.add(o["name"])
                xmin, ymin, xmax, ymax = o["box"]
                assert 1 <= xmin <= xmax <= w and 1 <= ymin <= ymax <= h
                if o["truncated"] == 0:
                    assert xmin > 1 or ymin > 1 or xmax < w or ymax < h
                n_diff += o["difficult"]
                n_trunc += o["truncated"]
            n_obj += len(objs)
        assert n_obj == voc[f"VOC{year}"]["num_objects"]
        # the test split holds every class (the first object of image i is class i mod 20)
        if year == "2007":
            test_names = {
                o["name"] for i in ids["test"]
                for o in _xml_objects(root / "Annotations" / f"{i}.xml")[2]
            }
            assert len(test_names) >= 15
    assert seen == set(toy.VOC_CLASSES)
    assert n_trunc > 0 and n_diff > 0


def test_voc_boxes_equal_regenerated_masks(world):
    out, _ = world
    root = out / "VOCdevkit" / "VOC2007"
    ids = sorted(p.stem for p in (root / "Annotations").glob("*.xml"))
    for i in (0, 5, 17, 33):
        img, objs = toy.voc_scene(SEED, "2007", i, preset="tiny")
        _, (h, w), xml_objs = _xml_objects(root / "Annotations" / f"{ids[i]}.xml")
        assert (h, w) == img.shape[:2]
        for o, x in zip(objs, xml_objs, strict=True):
            ys, xs = np.nonzero(o.mask)
            assert x["box"] == (xs.min() + 1, ys.min() + 1, xs.max() + 1, ys.max() + 1)
            assert x["name"] == o.cls.name
            assert x["truncated"] == int(o.truncated) and x["difficult"] == int(o.difficult)
            # truncated <=> the silhouette was cut: its box touches the border
            touches = xs.min() == 0 or ys.min() == 0 or xs.max() == w - 1 or ys.max() == h - 1
            assert touches or not o.truncated


def test_coco_layout(world):
    pytest.importorskip("pycocotools")
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    out, summary = world
    root = out / "coco"
    ann_id_sets = []
    for split in ("train2017", "val2017"):
        path = root / "annotations" / f"instances_{split}.json"
        data = json.loads(path.read_text())
        assert set(data) == {"info", "licenses", "images", "annotations", "categories"}
        cat_ids = [c["id"] for c in data["categories"]]
        assert cat_ids == [*range(1, 12), *range(13, 21), 22]
        assert cat_ids != list(range(1, len(cat_ids) + 1))  # non-contiguous, like COCO
        assert all(set(c) == {"id", "name", "supercategory"} for c in data["categories"])
        assert len(data["images"]) == summary["coco"][split]["num_images"]
        assert len(data["annotations"]) == summary["coco"][split]["num_objects"]
        assert {a["category_id"] for a in data["annotations"]} <= set(cat_ids)
        ann_id_sets.append({a["id"] for a in data["annotations"]})
        coco = COCO(str(path))
        sizes = {}
        for im in data["images"]:
            assert im["file_name"] == f"{im['id']:012d}.jpg"
            assert _jpeg_hw(root / split / im["file_name"]) == (im["height"], im["width"])
            sizes[im["id"]] = (im["height"], im["width"])
        for a in data["annotations"]:
            x, y, bw, bh = a["bbox"]
            h, w = sizes[a["image_id"]]
            assert all(isinstance(v, float) for v in a["bbox"])
            assert x >= 0 and y >= 0 and bw > 0 and bh > 0 and x + bw <= w and y + bh <= h
            assert a["iscrowd"] == 0 and 0 < a["area"] <= bw * bh
            m = coco.annToMask(a)
            assert m.shape == (h, w) and m.any()
            ys, xs = np.nonzero(m)  # the polygon lies inside the box
            assert x <= xs.min() and xs.max() < x + bw and y <= ys.min() and ys.max() < y + bh
            assert mask_utils.area(coco.annToRLE(a)) >= 0.5 * a["area"]
    assert not ann_id_sets[0] & ann_id_sets[1]  # annotation ids unique across files


def test_coco_boxes_equal_regenerated_masks(world):
    out, _ = world
    data = json.loads((out / "coco" / "annotations" / "instances_val2017.json").read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    for i in (0, 3, 15):
        img_id = data["images"][i]["id"]
        anns = [a for a in data["annotations"] if a["image_id"] == img_id]
        _, objs = toy.coco_scene(SEED, "val2017", i, preset="tiny")
        assert len(anns) == len(objs)
        for a, o in zip(anns, objs):
            ys, xs = np.nonzero(o.mask)
            assert a["bbox"] == [
                float(xs.min()),
                float(ys.min()),
                float(xs.max() - xs.min() + 1),
                float(ys.max() - ys.min() + 1),
            ]
            assert a["area"] == float(o.mask.sum())
            assert names[a["category_id"]] == o.cls.name


def test_cub_layout(world):
    out, summary = world
    root = out / "CUB_200_2011"

    def table(name):
        return [line.split(" ", 1) for line in (root / name).read_text().splitlines()]

    images = table("images.txt")
    labels = table("image_class_labels.txt")
    split = table("train_test_split.txt")
    classes = table("classes.txt")
    boxes = table("bounding_boxes.txt")
    n = len(images)
    assert n == summary["cub"]["num_train"] + summary["cub"]["num_test"] == 50
    assert [int(r[0]) for r in images] == list(range(1, n + 1))
    assert (
        [r[0] for r in labels]
        == [r[0] for r in split]
        == [r[0] for r in boxes]
        == [r[0] for r in images]
    )
    assert [r[1] for r in classes] == summary["cub"]["classes"]
    assert classes[0] == ["1", "001.Red_Capped_Warbler"]
    assert sum(r[1] == "1" for r in split) == summary["cub"]["num_train"]
    folders = dict(classes)
    for (_iid, rel), (_, lab), (_, box) in zip(images, labels, boxes):
        folder, fname = rel.split("/")
        assert folder == folders[lab]
        assert fname.startswith(folder.split(".", 1)[1] + "_") and fname.endswith(".jpg")
        h, w = _jpeg_hw(root / "images" / rel)
        x, y, bw, bh = (float(v) for v in box.split())
        assert x >= 0 and y >= 0 and bw > 0 and bh > 0 and x + bw <= w and y + bh <= h
        assert bw >= 0.3 * w  # one big bird
    # boxes equal the regenerated bird's mask
    for idx in (0, 21, 49):
        _, objs = toy.cub_scene(SEED, idx, int(labels[idx][1]) - 1, preset="tiny")
        ys, xs = np.nonzero(objs[0].mask)
        assert (
            boxes[idx][1] == f"{xs.min():.1f} {ys.min():.1f} {xs.max() - xs.min() + 1:.1f} "
                             f"{ys.max() - ys.min() + 1:.1f}"
        )
    if summary["wsol_metadata"]:
        meta = out / summary["wsol_metadata"]
        assert (meta / "train").is_dir() and (meta / "test").is_dir()


def test_summary_files(world):
    out, summary = world
    on_disk = json.loads((out / "toy_world.json").read_text())
    assert on_disk["preset"] == "tiny" and on_disk["seed"] == SEED
    assert {k: v for k, v in summary.items() if k != "root"} == on_disk
    text = (out / "README.txt").read_text()
    assert "VOCdevkit" in text and "CUB_200_2011" in text and "n01000000" in text
    assert "toy world: preset=tiny" in toy.format_summary(summary)
    with pytest.raises(ValueError, match="valid"):
        toy.make_toy_world(out / "bad", preset="huge")


def test_readers_if_present(world):
    """The lead's readers (when they exist) read the toy world without error."""
    out, _ = world
    try:
        from mixup_transfer.core.data import ImageNetFolder
    except ImportError:
        ImageNetFolder = None
    if ImageNetFolder is not None:
        ds = ImageNetFolder(out / "imagenet", split="val")
        assert len(ds) == 30 and ds.boxes(0).shape[1] == 4
    try:
        from transfer.datasets import COCODetection, VOCDetection
    except ImportError:
        VOCDetection = None
    if VOCDetection is not None:
        voc = VOCDetection(out / "VOCdevkit", year="2007", split="test")
        _, target = voc[0]
        assert target["boxes"].shape[1] == 4
        coco = COCODetection(
            out / "coco" / "val2017", out / "coco" / "annotations" / "instances_val2017.json"
        )
        assert len(coco.cat_ids) == len(toy.COCO_CATEGORIES) == 20
    if ImageNetFolder is None and VOCDetection is None:
        pytest.skip("readers not written yet")
