"""Detector builders and the albumentations box pipeline (CPU, tiny sizes)."""

import albumentations as A
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops.misc import FrozenBatchNorm2d

from mixup_transfer.core.checkpoint import CheckpointError, build_resnet, save_backbone
from transfer.detection import transforms as dt
from transfer.detection.models import build_detector, count_priors, ssd_plan, ssd_resnet

TINY_RCNN = dict(min_size=64, max_size=64, anchor_sizes=(16, 32, 64, 128, 256),
                 rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50,
                 rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20,
                 rpn_batch_size_per_image=32, box_batch_size_per_image=16,
                 box_detections_per_img=10, resize_inside=False)
TINY = {"faster_rcnn_fpn": TINY_RCNN,
        "faster_rcnn_c4": {**TINY_RCNN, "anchor_sizes": (16, 32, 64)},
        "ssd": dict(size=64, detections_per_img=10)}

TRUNK_KEYS = {
    "faster_rcnn_fpn": {"backbone.body.conv1.weight": "conv1.weight",
                        "backbone.body.layer1.0.bn1.running_mean": "layer1.0.bn1.running_mean",
                        "backbone.body.layer4.1.conv2.weight": "layer4.1.conv2.weight"},
    "faster_rcnn_c4": {"backbone.conv1.weight": "conv1.weight",
                       "backbone.layer3.0.bn1.running_var": "layer3.0.bn1.running_var",
                       "roi_heads.box_head.layer4.1.conv2.weight": "layer4.1.conv2.weight"},
    "ssd": {"backbone.trunk.0.weight": "conv1.weight",
            "backbone.trunk.4.0.bn1.running_mean": "layer1.0.bn1.running_mean",
            "backbone.trunk.6.0.conv1.weight": "layer3.0.conv1.weight"}}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    torch.manual_seed(0)
    model = build_resnet("resnet18", num_classes=10)
    with torch.no_grad():  # non-trivial BN statistics, so "unchanged" below means something
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("bb") / "r18.pth"
    save_backbone(path, model,
                  {"arch": "resnet18", "num_classes": 10, "method": "erm", "epochs": 0,
                                "config": "", "metrics": {}})
    return path, {k: v.clone() for k, v in model.state_dict().items()}


def _voc_batch(toy_world, n=2, kind="rcnn", size=64):
    from transfer.datasets import VOCDetection

    tf = dt.build_transforms(kind, True, size=size, train_sizes=[size], max_size=size, seed=0)
    ds = VOCDetection(toy_world / "VOCdevkit", "2007", "trainval", transform=tf)
    items = [ds[i] for i in range(n)]
    return [x for x, _ in items], [{"boxes": t["boxes"], "labels": t["labels"]} for _, t in items]


def _trunk(model):
    return model.backbone.body if hasattr(model.backbone, "body") else model.backbone.trunk \
        if hasattr(model.backbone, "trunk") else model.backbone


@pytest.mark.parametrize("kind", ["faster_rcnn_fpn", "faster_rcnn_c4", "ssd"])
def test_train_step_and_eval_with_loaded_backbone(kind, backbone, toy_world):
    path, ref = backbone
    torch.manual_seed(0)
    model = build_detector(kind, 21, str(path), arch="resnet18", **TINY[kind])
    # the checkpoint's weights really are in the trunk
    sd = model.state_dict()
    for key, name in TRUNK_KEYS[kind].items():
        assert torch.equal(sd[key], ref[name]), key
    images, targets = _voc_batch(toy_world)
    model.train()
    losses = model(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for o, im in zip(out, images):
        b = o["boxes"]
        assert b.shape[1] == 4 and len(b) <= 10
        assert (
            (b[:, 0] >= 0).all()
            and (b[:, 2] <= im.shape[2]).all()
            and (b[:, 3] <= im.shape[1]).all()
        )
        assert ((o["labels"] >= 1) & (o["labels"] <= 20)).all()


def test_frozen_bn_default_is_frozen(backbone, toy_world):
    path, ref = backbone
    torch.manual_seed(0)
    model = build_detector("faster_rcnn_fpn", 21, str(path), arch="resnet18", **TINY_RCNN)
    body = model.backbone.body
    norms = [m for m in body.modules() if isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d))]
    assert norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms)
    assert not any(p.requires_grad for n, p in body.named_parameters() if "bn" in n
                   or "downsample.1" in n)
    # trainable_layers=3: layer2..4 train, conv1 and layer1 are frozen
    assert not body.conv1.weight.requires_grad and not body.layer1[0].conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad and body.layer4[0].conv1.weight.requires_grad
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    images, targets = _voc_batch(toy_world)
    model.train()
    sum(model(images, targets).values()).backward()
    opt.step()
    after = model.state_dict()
    for k in before:
        if "running_" in k or (k.startswith("backbone.body.")
                               and ("bn" in k or "downsample.1" in k)):
            assert torch.equal(before[k], after[k]), k
    frozen, trained = "backbone.body.layer1.0.conv1.weight", "backbone.body.layer4.0.conv1.weight"
    assert torch.equal(before[frozen], after[frozen]) and not torch.equal(before[trained],
                                                                          after[trained])


def test_random_init_uses_trainable_bn_everywhere():
    model = build_detector("faster_rcnn_fpn", 21, None, arch="resnet18", **TINY_RCNN)
    body = model.backbone.body
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    assert all(p.requires_grad for p in body.parameters())
    assert model.trainable_layers == 5
    # ... and an explicit norm wins over "auto"
    frozen = build_detector("ssd", 21, None, arch="resnet18", size=64, norm="frozen_bn")
    assert any(isinstance(m, FrozenBatchNorm2d) for m in frozen.backbone.trunk.modules())


def test_mismatched_checkpoint_raises_loader_error(backbone, tmp_path):
    path, _ = backbone
    with pytest.raises(CheckpointError):
        build_detector("faster_rcnn_fpn", 21, str(path), arch="resnet34", **TINY_RCNN)
    bad = tmp_path / "bad.pth"
    torch.save({"model": {"conv1.weight": torch.zeros(64, 3, 7, 7)}}, bad)
    with pytest.raises(CheckpointError):
        build_detector("ssd", 21, str(bad), arch="resnet18", size=64)


def test_ssd_default_box_counts():
    # SSD300: 38^2*4 + 19^2*6 + 10^2*6 + 5^2*6 + 3^2*4 + 1*4 = 8732 (the paper's number)
    assert ssd_plan(300)["fmap_sizes"] == [38, 19, 10, 5, 3, 1]
    model = ssd_resnet(21, None, arch="resnet50", size=300)
    assert count_priors(model) == 8732
    with torch.no_grad():
        feats = model.eval().backbone(torch.zeros(1, 3, 300, 300))
    assert [tuple(f.shape[1:]) for f in feats.values()] == [
        (1024, 38, 38), (512, 19, 19), (512, 10, 10), (256, 5, 5), (256, 3, 3), (256, 1, 1)]
    # SSD512: 64^2*4 + 32^2*6 + 16^2*6 + 8^2*6 + 4^2*6 + 2^2*4 + 1*4 = 24564; toy 128 px: 16, 8, 4,
    # 2, 1
    assert ssd_plan(512)["fmap_sizes"] == [64, 32, 16, 8, 4, 2, 1]
    plan = ssd_plan(128)
    assert plan["fmap_sizes"] == [16, 8, 4, 2, 1]
    expected = 16 * 16 * 4 + 8 * 8 * 6 + 4 * 4 * 6 + 2 * 2 * 4 + 1 * 4
    assert count_priors(ssd_resnet(21, None, arch="resnet18", size=128)) == expected


def _flip_pipeline():
    return dt.DetectionTransform(A.Compose([A.HorizontalFlip(p=1.0)],
                                           bbox_params=dt._bbox_params()))


def test_flip_gives_hand_computed_box():
    img = Image.new("RGB", (100, 60))
    target = {"boxes": torch.tensor([[10.0, 20.0, 30.0, 50.0], [50.0, 5.0, 99.0, 59.0]]),
              "labels": torch.tensor([1, 2]), "difficult": torch.tensor([False, True]),
              "image_id": "a", "size": (60, 100)}
    x, t = _flip_pipeline()(img, target)
    # x0' = W - x1, x1' = W - x0 in continuous pixel coordinates
    # (albumentations works in normalised float32 coordinates: exact up to rounding)
    expected = torch.tensor([[70.0, 20.0, 90.0, 50.0], [1.0, 5.0, 50.0, 59.0]])
    assert torch.allclose(t["boxes"], expected, atol=1e-4)
    assert t["labels"].tolist() == [1, 2] and t["difficult"].tolist() == [False, True]
    assert x.shape == (3, 60, 100) and t["scale"] == (1.0, 1.0)


def _painted(h=80, w=120, box=(30, 20, 70, 60)):
    img = np.zeros((h, w, 3), np.uint8)
    img[box[1]:box[3], box[0]:box[2]] = (255, 0, 255)
    return Image.fromarray(img), {"boxes": torch.tensor([list(map(float, box))]),
                                  "labels": torch.tensor([3]), "difficult": torch.tensor([False]),
                                  "image_id": "p", "size": (h, w)}


@pytest.mark.parametrize("kind", ["ssd", "rcnn"])
def test_random_pipelines_keep_boxes_on_the_object(kind):
    """Zoom-out, IoU crop, flip, (multi-scale) resize: the box stays the painted object's box."""
    img, target = _painted()
    tf = dt.build_transforms(kind, True, size=96, train_sizes=[64, 96, 128], max_size=200,
                             zoom_out_ratio=3.0, photometric=False, seed=1)
    for _ in range(25):
        x, t = tf(img, target)
        mask = (x[0] > 0.5) & (x[1] < 0.3) & (x[2] > 0.5)  # magenta pixels
        if len(t["boxes"]) == 0:
            continue
        ys, xs = torch.nonzero(mask, as_tuple=True)
        obs = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        assert torch.allclose(t["boxes"][0], obs, atol=2.0), (t["boxes"][0], obs)


def test_zoom_out_and_crop_params_are_exact():
    img, target = _painted(box=(30, 20, 70, 60))
    zoom = dt.ZoomOut(max_ratio=2.0, p=1.0)
    params = {"canvas_h": 160, "canvas_w": 240, "left": 7, "top": 11}
    out = zoom.apply(np.asarray(img), **params)
    norm = np.array([[30 / 120, 20 / 80, 70 / 120, 60 / 80]])
    box = zoom.apply_to_bboxes(norm, shape=(80, 120), **params) * [240, 160, 240, 160]
    assert out.shape == (160, 240, 3) and np.allclose(box, [[37, 31, 77, 71]])
    assert (out[31:71, 37:77] == (255, 0, 255)).all() and tuple(out[0, 0]) == (124, 116, 104)
    crop = dt.MinIoURandomCrop()
    two = np.array([[30 / 120, 20 / 80, 70 / 120, 60 / 80], [0.0, 0.0, 10 / 120, 10 / 80]])
    kept = crop.apply_to_bboxes(two, crop=(20, 10, 60, 70), shape=(80, 120)) * [40, 60, 40, 60]
    # the second box's centre (5, 5) is outside the crop: dropped; the first is clipped to [20, 60)
    assert np.allclose(kept, [[10, 10, 40, 50]])


def test_iou_crop_sampler_meets_its_constraint():
    boxes = np.array([[30.0, 20.0, 70.0, 60.0], [80.0, 10.0, 110.0, 40.0]])
    rng = np.random.default_rng(0)
    got = 0
    for _ in range(50):
        crop = dt.sample_iou_crop(boxes, 80, 120, rng, min_ious=(0.3,))
        if crop is None:
            continue
        got += 1
        c = np.array(crop, dtype=float)
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        inside = (centres > c[:2]).all(1) & (centres < c[2:]).all(1)
        assert inside.any() and dt.box_iou_np(boxes[inside], c[None]).max() >= 0.3
        w, h = c[2] - c[0], c[3] - c[1]
        assert 0.3 * 120 - 1 <= w <= 120 and 0.3 * 80 - 1 <= h <= 80 and c[0] >= 0 and c[2] <= 120
    assert got > 10
    assert dt.sample_iou_crop(boxes, 80, 120, rng, min_ious=(None,)) is None


def test_box_iou_hand_value():
    # continuous coordinates: [1,2,5,6] vs [3,1,4,5]: inter 1*3 = 3, union 16 + 4 - 3 = 17
    assert np.isclose(dt.box_iou_np(np.array([[1.0, 2, 5, 6]]), np.array([[3.0, 1, 4, 5]]))[0, 0],
                      3 / 17)


def test_rcnn_resize_shape():
    assert dt.rcnn_resize_shape(480, 640, 800, 1333) == (800, 1067)
    assert dt.rcnn_resize_shape(400, 1600, 800, 1333) == (333, 1333)


def _first_location_sizes(size, aspect_ratios, fmap_sizes, scales, steps):
    """(w, h) in pixels of the default boxes at the first location of every level, from
    torchvision's DefaultBoxGenerator run on zero feature maps of the plan's sizes (level k's boxes
    start after the boxes of levels < k, row-major over locations)."""
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
    from torchvision.models.detection.image_list import ImageList

    gen = DefaultBoxGenerator(aspect_ratios, scales=scales, steps=steps)
    images = torch.zeros(1, 3, size, size)
    feats = [torch.zeros(1, 1, f, f) for f in fmap_sizes]
    boxes = gen(ImageList(images, [(size, size)]), feats)[0]
    out, start = [], 0
    for f, ar in zip(fmap_sizes, aspect_ratios):
        n = 2 + 2 * len(ar)
        b = boxes[start:start + n]
        out.append(sorted(zip((b[:, 2] - b[:, 0]).tolist(), (b[:, 3] - b[:, 1]).tolist())))
        start += f * f * n
    assert start == boxes.shape[0]
    return out


# The SSD reference VOC configs: (min sizes, max sizes, aspect ratios) per level, in pixels. 300:
# amdegroot/ssd.pytorch data/config.py `voc` (= Caffe ssd_pascal.py); 512: Caffe ssd_pascal_512.py.
SSD_VOC_REFERENCE = {
    300: ([30, 60, 111, 162, 213, 264], [60, 111, 162, 213, 264, 315],
          [[2], [2, 3], [2, 3], [2, 3], [2], [2]]),
    512: ([35.84, 76.8, 153.6, 230.4, 307.2, 384.0, 460.8],
          [76.8, 153.6, 230.4, 307.2, 384.0, 460.8, 537.6],
          [[2], [2, 3], [2, 3], [2, 3], [2, 3], [2], [2]]),
}


@pytest.mark.parametrize("size", [300, 512])
def test_ssd_voc_default_box_sizes_equal_the_reference_configs(size):
    mins, maxs, ars = SSD_VOC_REFERENCE[size]
    plan = ssd_plan(size, "voc")
    assert plan["aspect_ratios"] == ars
    got = _first_location_sizes(size, plan["aspect_ratios"], plan["fmap_sizes"], plan["scales"],
                                plan["steps"])
    for k, (lo, hi, ar) in enumerate(zip(mins, maxs, ars)):
        # boxes of side min and sqrt(min * max), and min * sqrt(a) x min / sqrt(a) both ways,
        # clipped to the image
        want = [(lo, lo), (np.sqrt(lo * hi), np.sqrt(lo * hi))]
        for a in ar:
            want += [(lo * np.sqrt(a), lo / np.sqrt(a)), (lo / np.sqrt(a), lo * np.sqrt(a))]
        want = sorted((min(w, size), min(h, size)) for w, h in want)
        np.testing.assert_allclose(np.array(got[k]), np.array(want), rtol=1e-5,
                                   err_msg=f"level {k}")
    # level 0 widths by hand: SSD300 30 / sqrt 2 = 21.21, 30, 30 sqrt 2 = sqrt(30 * 60) = 42.43;
    # SSD512 35.84 / sqrt 2 = 25.34, 35.84, 35.84 sqrt 2 = 50.69, sqrt(35.84 * 76.8) = 52.46
    by_hand = {300: [21.21, 30.0, 42.43], 512: [25.34, 35.84, 50.69, 52.46]}[size]
    np.testing.assert_allclose(sorted(set(round(w, 2) for w, _ in got[0])), by_hand)
    # the model uses these priors (voc by default); coco keeps the smaller COCO first scale
    assert list(ssd_resnet(21, None, arch="resnet18",
                           size=size).anchor_generator.scales) == plan["scales"]
    assert ssd_plan(size, "coco")["scales"][0] < plan["scales"][0]
    with pytest.raises(Exception, match="priors"):
        ssd_plan(size, "kitti")
