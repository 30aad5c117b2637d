"""torchvision detectors on a ResNet trunk loaded from the backbone checkpoint.

Three families, all taking a list of RGB images in [0, 1] (``[3, H, W]`` float tensors) and
normalising internally with the ImageNet mean/std:

- ``faster_rcnn_fpn``: Faster R-CNN with a ResNet-FPN trunk (``layer1..layer4`` -> P2..P6).
- ``faster_rcnn_c4``: Faster R-CNN R-C4 (trunk ``conv1..layer3``, one anchor level, RoIAlign 14x14,
  box head = ``layer4`` + global average pooling), which torchvision has no builder for.
- ``ssd``: SSD300/SSD512 (or any square size) on ``conv1..layer3`` with layer3's first block at
  stride 1 and extra blocks (1x1 conv, BN, ReLU, 3x3 conv, BN, ReLU), NVIDIA-style.

Backbone weights come only from :func:`mixup_transfer.core.checkpoint.load_backbone` (strict: a
checkpoint that does not fit raises its ``CheckpointError``). ``weights=None`` means a randomly
initialised trunk (the from-scratch baseline); then ``norm="auto"`` picks trainable BatchNorm and
trains every stage, because a random trunk with frozen statistics does not train.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from mixup_transfer.core.constants import IMAGENET_MEAN, IMAGENET_STD
from mixup_transfer.core.data import InputError

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
NORMS = ("auto", "frozen_bn", "bn", "syncbn")
# Stages in the order torchvision's ``trainable_layers`` unfreezes them.
_STAGES = ("layer4", "layer3", "layer2", "layer1", "conv1")


class DetectorConfigError(InputError):
    """Bad detector settings (unknown type, arch, norm, sizes)."""


def _stage_channels(arch: str) -> list[int]:
    """Output channels of layer1..layer4."""
    if arch in ("resnet18", "resnet34"):
        return [64, 128, 256, 512]
    return [256, 512, 1024, 2048]


def resolve_norm(norm: str, weights: str | None) -> str:
    """``auto`` -> ``frozen_bn`` for a pretrained trunk, ``bn`` for a random one."""
    if norm not in NORMS:
        raise DetectorConfigError(f"norm={norm!r} is not one of {NORMS}")
    if norm == "auto":
        return "frozen_bn" if weights is not None else "bn"
    return norm


def resolve_trainable_layers(trainable_layers: int | None, weights: str | None,
                             default: int = 3) -> int:
    """``None`` -> ``default`` stages for a pretrained trunk, all 5 for a random one."""
    if trainable_layers is None:
        return default if weights is not None else 5
    if not 0 <= int(trainable_layers) <= 5:
        raise DetectorConfigError(f"trainable_layers={trainable_layers} must be in 0..5")
    return int(trainable_layers)


def _norm_layer(norm: str):
    return {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d, "syncbn": nn.SyncBatchNorm}[norm]


def build_trunk(arch: str, weights: str | None, norm: str = "auto",
                trainable_layers: int | None = None, replace_stride_with_dilation=None,
                allow_pickle: bool = False, default_trainable: int = 3):
    """A torchvision ResNet (fc kept but unused) with the checkpoint's weights loaded strictly.

    Returns ``(resnet, norm, trainable_layers)`` after resolving ``auto``/``None``. Stages not
    among the last ``trainable_layers`` of ``(conv1, layer1, layer2, layer3, layer4)`` get
    ``requires_grad=False``.
    """
    if arch not in ARCHS:
        raise DetectorConfigError(f"arch={arch!r} is not one of {ARCHS}")
    norm = resolve_norm(norm, weights)
    trainable_layers = resolve_trainable_layers(trainable_layers, weights, default_trainable)
    # SyncBN cannot be constructed inside the ResNet blocks directly on CPU-only builds without a
    # process group at forward time, so build with BN and convert (the standard recipe).
    build_norm = nn.BatchNorm2d if norm == "syncbn" else _norm_layer(norm)
    resnet = getattr(torchvision.models, arch)(
        weights=None,
        norm_layer=build_norm,
        replace_stride_with_dilation=replace_stride_with_dilation,
    )
    if weights is not None:
        from mixup_transfer.core.checkpoint import load_backbone

        # raises CheckpointError
        state = load_backbone(weights, arch=arch, allow_pickle=allow_pickle)
        result = resnet.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("fc.")]
        # load_backbone validated the key set; this is a guard
        if missing or result.unexpected_keys:
            raise RuntimeError(f"backbone {weights} did not fit {arch}: missing {missing}, "
                               f"unexpected {result.unexpected_keys}")
    if norm == "syncbn":
        resnet = nn.SyncBatchNorm.convert_sync_batchnorm(resnet)
    trainable = set(_STAGES[:trainable_layers])
    for name, module in resnet.named_children():
        stage = "conv1" if name in ("conv1", "bn1") else name
        if stage in _STAGES and stage not in trainable:
            module.requires_grad_(False)
    return resnet, norm, trainable_layers


class _NoResizeTransform(GeneralizedRCNNTransform):
    """Normalise and batch only: resizing (single- or multi-scale) is done by the albumentations
    pipeline, so the boxes the model sees and returns are in the coordinates of the tensor it was
    given."""

    def resize(self, image, target=None):
        return image, target


def _rcnn_kwargs(min_size, max_size, rpn_pre_nms_top_n_train, rpn_pre_nms_top_n_test,
                 rpn_post_nms_top_n_train, rpn_post_nms_top_n_test, rpn_batch_size_per_image,
                 box_batch_size_per_image, box_detections_per_img, box_score_thresh):
    return dict(min_size=min_size, max_size=max_size, image_mean=IMAGENET_MEAN,
                image_std=IMAGENET_STD, rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
                rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
                rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
                rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
                rpn_batch_size_per_image=rpn_batch_size_per_image,
                box_batch_size_per_image=box_batch_size_per_image,
                box_detections_per_img=box_detections_per_img, box_score_thresh=box_score_thresh)


def _finish_rcnn(model: FasterRCNN, resize_inside: bool, min_size: int,
                 max_size: int) -> FasterRCNN:
    if not resize_inside:
        model.transform = _NoResizeTransform(min_size, max_size, IMAGENET_MEAN, IMAGENET_STD)
    return model


def faster_rcnn_fpn(num_classes: int, weights: str | None, arch: str = "resnet50",
                    norm: str = "auto", trainable_layers: int | None = None,
                    anchor_sizes=(32, 64, 128, 256, 512), aspect_ratios=(0.5, 1.0, 2.0),
                    min_size: int = 800, max_size: int = 1333, rpn_pre_nms_top_n_train: int = 2000,
                    rpn_pre_nms_top_n_test: int = 1000, rpn_post_nms_top_n_train: int = 2000,
                    rpn_post_nms_top_n_test: int = 1000, rpn_batch_size_per_image: int = 256,
                    box_batch_size_per_image: int = 512, box_detections_per_img: int = 100,
                    box_score_thresh: float = 0.05, fpn_channels: int = 256,
                    box_head_dim: int = 1024, resize_inside: bool = True,
                    allow_pickle: bool = False) -> FasterRCNN:
    """Faster R-CNN R-FPN. ``num_classes`` counts background (21 for VOC). ``anchor_sizes``: one
    size per pyramid level P2..P6. ``fpn_channels`` / ``box_head_dim`` (256 / 1024 in the
    reference) can shrink for toy runs. ``resize_inside=False`` leaves resizing to the data
    pipeline."""
    resnet, _, tl = build_trunk(arch, weights, norm, trainable_layers, allow_pickle=allow_pickle)
    return_layers = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}
    backbone = BackboneWithFPN(resnet, return_layers=return_layers,
                               in_channels_list=_stage_channels(arch),
                               out_channels=int(fpn_channels), extra_blocks=LastLevelMaxPool())
    if len(anchor_sizes) != 5:
        raise DetectorConfigError("anchor_sizes needs one size per FPN level (5), got "
                                  f"{anchor_sizes}")
    anchors = AnchorGenerator(tuple((int(s),) for s in anchor_sizes), (tuple(aspect_ratios),) * 5)
    box_head = TwoMLPHead(int(fpn_channels) * 7 * 7, int(box_head_dim))
    model = FasterRCNN(backbone, rpn_anchor_generator=anchors, box_head=box_head,
                       box_predictor=FastRCNNPredictor(int(box_head_dim), num_classes),
                       **_rcnn_kwargs(min_size, max_size, rpn_pre_nms_top_n_train,
                                      rpn_pre_nms_top_n_test, rpn_post_nms_top_n_train,
                                      rpn_post_nms_top_n_test, rpn_batch_size_per_image,
                                      box_batch_size_per_image, box_detections_per_img,
                                      box_score_thresh))
    model.trainable_layers = tl
    return _finish_rcnn(model, resize_inside, min_size, max_size)


class _C4Trunk(nn.Sequential):
    """conv1..layer3 of a ResNet (stride 16); ``out_channels`` as FasterRCNN expects."""

    def __init__(self, resnet, out_channels: int):
        super().__init__(OrderedDict((n, getattr(resnet, n)) for n in
                                     ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2",
                                      "layer3")))
        self.out_channels = out_channels


class _C4BoxHead(nn.Module):
    """RoI features [R, C3, 14, 14] -> layer4 -> global average pool -> [R, C4]."""

    def __init__(self, layer4: nn.Module):
        super().__init__()
        self.layer4 = layer4

    def forward(self, x):
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.layer4(x), 1), 1)


def faster_rcnn_c4(num_classes: int, weights: str | None, arch: str = "resnet50",
                   norm: str = "auto", trainable_layers: int | None = None,
                   anchor_sizes=(32, 64, 128, 256, 512), aspect_ratios=(0.5, 1.0, 2.0),
                   min_size: int = 800, max_size: int = 1333, rpn_pre_nms_top_n_train: int = 12000,
                   rpn_pre_nms_top_n_test: int = 6000, rpn_post_nms_top_n_train: int = 2000,
                   rpn_post_nms_top_n_test: int = 1000, rpn_batch_size_per_image: int = 256,
                   box_batch_size_per_image: int = 512, box_detections_per_img: int = 100,
                   box_score_thresh: float = 0.05, resize_inside: bool = True,
                   allow_pickle: bool = False) -> FasterRCNN:
    """Faster R-CNN R-C4: one anchor level on layer3 (all ``anchor_sizes`` x ``aspect_ratios`` at
    each position), RoIAlign 14x14 on it, layer4 + pooling as the box head, predictor from layer4's
    channels."""
    resnet, _, tl = build_trunk(arch, weights, norm, trainable_layers, allow_pickle=allow_pickle)
    c3, c4 = _stage_channels(arch)[2:]
    backbone = _C4Trunk(resnet, c3)
    anchors = AnchorGenerator((tuple(int(s) for s in anchor_sizes),), (tuple(aspect_ratios),))
    roi_pool = MultiScaleRoIAlign(featmap_names=["0"], output_size=14, sampling_ratio=0)
    model = FasterRCNN(backbone, rpn_anchor_generator=anchors, box_roi_pool=roi_pool,
                       box_head=_C4BoxHead(resnet.layer4),
                       box_predictor=FastRCNNPredictor(c4, num_classes),
                       **_rcnn_kwargs(min_size, max_size, rpn_pre_nms_top_n_train,
                                      rpn_pre_nms_top_n_test, rpn_post_nms_top_n_train,
                                      rpn_post_nms_top_n_test, rpn_batch_size_per_image,
                                      box_batch_size_per_image, box_detections_per_img,
                                      box_score_thresh))
    model.trainable_layers = tl
    return _finish_rcnn(model, resize_inside, min_size, max_size)


# ----------------------------------------------------------------------------------------------
# SSD

# Default-box scales (fractions of the input side) of the SSD reference configs: level k has boxes
# of side min_k = s_k * size (ratio 1), sqrt(min_k * max_k) with max_k = s_{k+1} * size, and min_k
# * sqrt(a), min_k / sqrt(a) for its aspect ratios a. VOC: the SSD paper's Caffe configs
#   (ssd_pascal.py: 300 px
# min_ratio 20 / max_ratio 90 -> min sizes 30, 60, 111, 162, 213, 264, max 60 ... 315;
# ssd_pascal_512.py: min_ratio 15 / max_ratio 90 -> 35.84, 76.8, 153.6, 230.4, 307.2, 384, 460.8,
# max 76.8 ... 537.6), as in amdegroot/ssd.pytorch data/config.py (voc, 300 px). COCO: the smaller
# first scales of the COCO configs (torchvision's SSD300 and the Caffe SSD512 COCO scales).
SSD_SCALES = {
    (300, "voc"): [0.1, 0.2, 0.37, 0.54, 0.71, 0.88, 1.05],
    (300, "coco"): [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
    (512, "voc"): [0.07, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.05],
    (512, "coco"): [0.04, 0.1, 0.26, 0.42, 0.58, 0.74, 0.9, 1.06],
}


def ssd_plan(size: int, priors: str = "voc") -> dict:
    """Feature-map plan for a square SSD input of ``size`` px on a stride-8 ResNet trunk.

    Returns ``{"extras": [(stride, padding), ...], "aspect_ratios": [...], "scales": [...] | None,
    "steps": [...] | None, "fmap_sizes": [...]}``. 300 px is the SSD300 layout (38, 19, 10, 5, 3, 1
    -> 8732 default boxes, steps 8, 16, 32, 64, 100, 300); 512 px is SSD512 (64, 32, ..., 1, 7
    maps, steps 8 ... 512); ``priors`` picks the reference default-box scales of the dataset,
    ``voc`` or ``coco`` (``SSD_SCALES``). Any other size halves with stride-2 3x3 convs until 1x1
    and uses the generator's linear scales.
    """
    if priors not in ("voc", "coco"):
        raise DetectorConfigError(f"SSD priors must be 'voc' or 'coco', got {priors!r}")
    if size == 300:
        extras = [(2, 1), (2, 1), (2, 1), (1, 0), (1, 0)]
        scales = SSD_SCALES[(300, priors)]
        steps = [8, 16, 32, 64, 100, 300]
    elif size == 512:
        extras = [(2, 1)] * 6  # 64 -> 32, 16, 8, 4, 2, 1
        scales = SSD_SCALES[(512, priors)]
        steps = [8, 16, 32, 64, 128, 256, 512]
    else:
        extras, scales, steps = [], None, None
        f = -(-size // 8)
        while f > 1:
            extras.append((2, 1))
            f = (f - 1) // 2 + 1
        if not extras:
            raise DetectorConfigError(f"SSD size {size} is too small (needs at least 16 px)")
    fmap = [-(-size // 8)]
    for stride, pad in extras:
        fmap.append((fmap[-1] + 2 * pad - 3) // stride + 1)
    n = len(fmap)
    aspect = [[2]] + [[2, 3]] * max(n - 3, 0) + [[2]] * min(2, n - 1)
    return {"extras": extras, "aspect_ratios": aspect, "scales": scales, "steps": steps,
            "fmap_sizes": fmap}


class SSDResNetBackbone(nn.Module):
    """conv1..layer3 (layer3's first block at stride 1) + extra blocks; returns an OrderedDict of
    maps."""

    def __init__(self, resnet, c3: int, extras, extra_channels=(512, 512, 256, 256, 256, 256),
                 mid_channels=(256, 256, 128, 128, 128, 128)):
        super().__init__()
        block = resnet.layer3[0]
        # The stride sits on conv1 in a basic block and on conv2 (the 3x3) in torchvision's
        # bottleneck.
        (block.conv2 if hasattr(block, "conv3") else block.conv1).stride = (1, 1)
        block.downsample[0].stride = (1, 1)
        self.trunk = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool,
                                   resnet.layer1, resnet.layer2, resnet.layer3)
        layers, cin = [], c3
        for i, (stride, pad) in enumerate(extras):
            cout = extra_channels[min(i, len(extra_channels) - 1)]
            mid = mid_channels[min(i, len(mid_channels) - 1)]
            layers.append(nn.Sequential(
                nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                nn.Conv2d(mid, cout, 3, stride=stride, padding=pad, bias=False),
                nn.BatchNorm2d(cout), nn.ReLU(inplace=True)))
            cin = cout
        self.extras = nn.ModuleList(layers)
        for m in self.extras.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.trunk(x)
        out = OrderedDict([("0", x)])
        for i, block in enumerate(self.extras):
            x = block(x)
            out[str(i + 1)] = x
        return out


def ssd_resnet(num_classes: int, weights: str | None, arch: str = "resnet50", size: int = 300,
               norm: str = "auto", trainable_layers: int | None = None, min_ratio: float = 0.15,
               max_ratio: float = 0.9, score_thresh: float = 0.01, nms_thresh: float = 0.45,
               detections_per_img: int = 200, topk_candidates: int = 400,
               allow_pickle: bool = False, priors: str = "voc") -> SSD:
    """SSD on a ResNet trunk (see :func:`ssd_plan`). ``priors`` (voc | coco) picks the reference
    default-box scales at 300/512 px; ``min_ratio``/``max_ratio`` set them for other sizes. Inputs
    are resized to ``size x size`` inside (a no-op when the data pipeline already did it)."""
    resnet, _, tl = build_trunk(arch, weights, norm, trainable_layers, allow_pickle=allow_pickle,
                                default_trainable=4)
    plan = ssd_plan(int(size), priors)
    backbone = SSDResNetBackbone(resnet, _stage_channels(arch)[2], plan["extras"])
    if plan["scales"] is not None:
        anchors = DefaultBoxGenerator(plan["aspect_ratios"], scales=plan["scales"],
                                      steps=plan["steps"])
    else:
        anchors = DefaultBoxGenerator(plan["aspect_ratios"], min_ratio=min_ratio,
                                      max_ratio=max_ratio)
    model = SSD(backbone, anchors, (int(size), int(size)), num_classes, image_mean=IMAGENET_MEAN,
                image_std=IMAGENET_STD, score_thresh=score_thresh, nms_thresh=nms_thresh,
                detections_per_img=detections_per_img, topk_candidates=topk_candidates)
    model.trainable_layers = tl
    return model


BUILDERS = {"faster_rcnn_fpn": faster_rcnn_fpn, "faster_rcnn_c4": faster_rcnn_c4,
            "ssd": ssd_resnet}


def build_detector(type: str, num_classes: int, weights: str | None, **kwargs) -> nn.Module:
    """``BUILDERS[type](num_classes, weights, **kwargs)`` with an error listing the valid types."""
    if type not in BUILDERS:
        raise DetectorConfigError(f"detector type {type!r} is not one of {sorted(BUILDERS)}")
    return BUILDERS[type](num_classes, weights, **kwargs)


def count_priors(model: SSD) -> int:
    """Number of SSD default boxes for the model's input size (runs the backbone once on zeros)."""
    h, w = model.transform.fixed_size
    was_training = model.training
    model.eval()
    with torch.no_grad():
        images = torch.zeros(1, 3, h, w)
        feats = list(model.backbone(images).values())
        from torchvision.models.detection.image_list import ImageList

        anchors = model.anchor_generator(ImageList(images, [(h, w)]), feats)
    model.train(was_training)
    return int(anchors[0].shape[0])
