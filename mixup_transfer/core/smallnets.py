"""The small-image (CIFAR / TinyImageNet) networks of the papers, in the torchvision ResNet module
layout.

MultiMix §4.1 and AlignMix §4.1 train PreActResnet-18 (He et al., 2016, "R-18") and WRN16-8
(Zagoruyko & Komodakis, 2016) on CIFAR-10/100 and R-18 on TinyImageNet; multi-mix §IV-B the same
two on CIFAR-100 and PreActResNet18 on TinyImageNet. `resnet18_cifar` is torchvision's ResNet-18
with the usual CIFAR stem (3x3 stride-1 convolution, no max-pool), for runs that want BN-after-conv
blocks.

Every network here exposes torchvision ResNet's attributes so that the stage interface
(`pretrain.methods.ResNetStages`) and the evaluators (`transfer.robustness.model`) run it
unchanged:
    stem = maxpool(relu(bn1(conv1(x))));  layer1 .. layer4;  avgpool;  fc
The pre-activation networks have no BN-ReLU after the stem convolution (each block starts with
one), so their `bn1`, `relu` and `maxpool` are identities; `preactresnet18_alignmixup` is the
PreAct-ResNet-18 of the AlignMixup code (shashankvkt/AlignMixup_CVPR22 at ec01a68,
cifar10_100/models/resnet.py and tiny_imgnet/models/resnet.py: `ResNet.forward` applies conv1, bn1,
relu before layer1, and `PreActBlock` adds its identity shortcut to the pre-activated input), whose
`bn1` and `relu` are a BatchNorm and a ReLU. WRN16-8 has three groups of blocks: they are
`layer1..layer3`, and its final BN-ReLU (Zagoruyko's `bn` + `relu` before pooling) is `layer4`, so
that layer 4 of the stage interface is the activated last feature map, as for the ResNets. At 32 px
the last map is 4 x 4 (PreAct, resnet18_cifar: strides 1, 2, 2, 2) or 8 x 8 (WRN: strides 1, 2, 2);
at 64 px twice that.

State-dict keys follow torchvision's names where the part exists there (`conv1`, `layerN.M.conv1`,
`bn1`, `downsample.0` for a block's 1x1 projection shortcut, `fc`). Convolutions have no bias (as
in both reference codes' R-18 and in Zagoruyko's WRN); WRN dropout is 0 (not used by the papers'
settings).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

SMALL_ARCHS = ("preactresnet18", "wrn16_8", "resnet18_cifar", "preactresnet18_w16",
               "preactresnet18_alignmixup")
# width of the pooled features that fc reads, per small arch
SMALL_FEATURE_DIMS = {"preactresnet18": 512, "wrn16_8": 512, "resnet18_cifar": 512,
                      "preactresnet18_w16": 128, "preactresnet18_alignmixup": 512}


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3 plus the shortcut: identity, or a 1x1 stride
    convolution of the pre-activated input when the shape changes (He et al., 2016, "Identity
    mappings"; also WRN's block).
    preact_shortcut: the identity shortcut carries the pre-activated input relu(bn1(x)) instead of
    x, as the AlignMixup code's block does (its `self.shortcut` is an empty nn.Sequential applied
    to `out`)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, preact_shortcut: bool = False):
        super().__init__()
        self.preact_shortcut = preact_shortcut
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), _conv3x3(cout, cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = (
            self.downsample(out)
            if self.downsample is not None
            else (out if self.preact_shortcut else x)
        )
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


def _group(cin: int, cout: int, n: int, stride: int,
           preact_shortcut: bool = False) -> nn.Sequential:
    return nn.Sequential(*[PreActBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1,
                                       preact_shortcut)
                           for i in range(n)])


class PostActivation(nn.Module):
    """WRN's final BN-ReLU (its `layer4` here): [b, c, h, w] -> [b, c, h, w]."""

    def __init__(self, channels: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(x))


class SmallNet(nn.Module):
    """conv1 -> (identity stem) -> layer1..layer4 -> global average pool -> fc (torchvision's
    forward)."""

    def __init__(self, conv1: nn.Module, layers: list[nn.Module], width: int, num_classes: int):
        super().__init__()
        self.conv1 = conv1
        self.bn1, self.relu, self.maxpool = nn.Identity(), nn.Identity(), nn.Identity()
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        # PyTorch's default initialisation, as the reference codes' PreActResNet (manifold mixup,
        # PuzzleMix, AlignMixup) keep it: with torchvision's kaiming fan_out the un-normalised
        # residual sum that leaves the pre-activation stages is ~2.5x larger and plain SGD at lr
        # 0.1 diverged on the toy CIFAR world

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def preactresnet18(num_classes: int = 10, width: int = 64, alignmixup: bool = False) -> SmallNet:
    """PreAct-ResNet-18: 3x3 stem to `width` (64) channels, four stages of two pre-activation
    blocks (64, 128, 256, 512; strides 1, 2, 2, 2), no final BN-ReLU (11,171,146 parameters for 10
    classes; tests/core/test_smallimage.py). width=16 is `preactresnet18_w16` (16, 32, 64, 128:
    1/16 of the FLOPs), the toy CIFAR pipeline's CPU network (configs/pipeline/toy_cifar.yaml), no
    paper's. alignmixup: the AlignMixup code's network (`preactresnet18_alignmixup`): BN + ReLU
    after the stem convolution (2 x 64 more parameters) and identity shortcuts that carry the
    pre-activated input (`PreActBlock` preact_shortcut)."""
    widths, layers, cin = (width, 2 * width, 4 * width, 8 * width), [], width
    for i, w in enumerate(widths):
        layers.append(_group(cin, w, 2, 1 if i == 0 else 2, preact_shortcut=alignmixup))
        cin = w
    net = SmallNet(_conv3x3(3, width), layers, 8 * width, num_classes)
    if alignmixup:
        net.bn1, net.relu = nn.BatchNorm2d(width), nn.ReLU()
    return net


def wrn(depth: int = 16, widen: int = 8, num_classes: int = 10) -> SmallNet:
    """WRN-depth-widen: 3x3 stem to 16 channels, three groups of (depth - 4) / 6 blocks with 16k,
    32k, 64k channels (strides 1, 2, 2), then BN-ReLU (`layer4`), pool and fc."""
    if (depth - 4) % 6:
        raise ValueError(f"WRN depth must be 6n + 4, got {depth}")
    n, widths, layers, cin = (depth - 4) // 6, (16 * widen, 32 * widen, 64 * widen), [], 16
    for i, w in enumerate(widths):
        layers.append(_group(cin, w, n, 1 if i == 0 else 2))
        cin = w
    return SmallNet(_conv3x3(3, 16), layers + [PostActivation(cin)], cin, num_classes)


def resnet18_cifar(num_classes: int = 10,
                   zero_init_residual: bool = False) -> torchvision.models.ResNet:
    """torchvision ResNet-18 with the CIFAR stem: conv1 3x3 stride 1 (64 channels), no max-pool."""
    net = torchvision.models.resnet18(weights=None, num_classes=num_classes,
                                      zero_init_residual=zero_init_residual)
    net.conv1 = _conv3x3(3, 64)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.maxpool = nn.Identity()
    return net


def build_small(arch: str, num_classes: int = 10, zero_init_residual: bool = False) -> nn.Module:
    """One of SMALL_ARCHS, randomly initialised. zero_init_residual applies to resnet18_cifar
    (torchvision's option); the pre-activation blocks end in a convolution, not a BN, so it is an
    error for them."""
    if arch == "resnet18_cifar":
        return resnet18_cifar(num_classes, zero_init_residual)
    if zero_init_residual:
        raise ValueError(f"zero_init_residual is for BN-ended residual blocks; {arch} has "
                         "pre-activation blocks")
    if arch == "preactresnet18":
        return preactresnet18(num_classes)
    if arch == "preactresnet18_w16":
        return preactresnet18(num_classes, width=16)
    if arch == "preactresnet18_alignmixup":
        return preactresnet18(num_classes, alignmixup=True)
    if arch == "wrn16_8":
        return wrn(16, 8, num_classes)
    raise ValueError(f"unknown small-image arch {arch!r}; supported: {list(SMALL_ARCHS)}")
