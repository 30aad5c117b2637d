"""The CAM model: a torchvision ResNet with layer4 at stride 1 and a new classifier.

Inputs are RGB images in [0, 1]; ImageNet normalisation happens inside the model.
The feature map is input/16 per side (14 x 14 at 224). CAM for class y is
``mean_c(W_fc[y, c] * F[c])`` (no bias, no ReLU) — so the spatial mean of the CAM
times the number of channels plus the bias is the logit of y.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import nn

from mixup_transfer.core.checkpoint import ARCHS, build_resnet, load_backbone
from mixup_transfer.core.constants import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["CAMModel", "build_cam_model", "normalise_cams", "IMAGENET_MEAN", "IMAGENET_STD"]



def _layer4_stride_one(resnet) -> None:
    """Stride 1 in layer4's first block: the strided conv (conv2 in Bottleneck, conv1 in
    BasicBlock) and the downsample 1x1 conv. Shapes of the weights are unchanged."""
    block = resnet.layer4[0]
    strided = block.conv2 if block.conv2.stride == (2, 2) else block.conv1
    if strided.stride != (2, 2):
        raise ValueError("layer4's first block has no stride-2 convolution to change")
    strided.stride = (1, 1)
    if block.downsample is not None:
        block.downsample[0].stride = (1, 1)


class CAMModel(nn.Module):
    """ResNet trunk (layer4 stride 1) + global average pooling + linear classifier.

    forward(x: [B, 3, H, W] in [0, 1]) -> logits [B, K].
    """

    def __init__(self, arch: str = "resnet50", num_classes: int = 200):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; supported: {list(ARCHS)}")
        net = build_resnet(arch, num_classes=1000)
        _layer4_stride_one(net)
        self.arch = arch
        self.trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool,
                                   net.layer1, net.layer2, net.layer3, net.layer4)
        self.fc = nn.Linear(net.fc.in_features, num_classes)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    # torchvision names, so that backbone checkpoints load with their own keys
    _TRUNK_NAMES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")

    def named_trunk(self) -> dict[str, nn.Module]:
        return dict(zip(self._TRUNK_NAMES, self.trunk, strict=True))

    def load_backbone_state(self, state) -> None:
        """Load a torchvision-keyed backbone state dict (fc excluded) strictly."""
        mapped = {}
        index = {n: i for i, n in enumerate(self._TRUNK_NAMES)}
        for k, v in state.items():
            head, _, rest = k.partition(".")
            if head not in index:
                raise KeyError(f"unexpected backbone key {k!r}")
            mapped[f"trunk.{index[head]}.{rest}"] = v
        missing, unexpected = self.load_state_dict(mapped, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise KeyError(f"backbone does not fit: missing {missing[:8]}, unexpected "
                           f"{unexpected[:8]}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, H, W] in [0, 1] -> feature map [B, C, H/16, W/16] (asserted)."""
        fmap = self.trunk((x - self.mean) / self.std)
        want = (-(-x.shape[-2] // 16), -(-x.shape[-1] // 16))
        if tuple(fmap.shape[-2:]) != want:
            raise RuntimeError(f"feature map is {tuple(fmap.shape[-2:])} for input "
                               f"{tuple(x.shape[-2:])}, expected {want} (layer4 must have stride "
                               "1)")
        return fmap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))

    # The stage interface of pretrain.methods.ResNetStages, so that any mixing method of the method
    # registry can wrap a CAM model. Layer 0 = input pixels in [0, 1], 1..4 = after layer1..layer4.
    _STAGE_END = (0, 5, 6, 7, 8)  # trunk index after which stage i ends

    def forward_to(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Features after `layer` (0..4) of images x [b, 3, H, W] in [0, 1]."""
        if layer == 0:
            return x
        return self.trunk[: self._STAGE_END[min(layer, 4)]]((x - self.mean) / self.std)

    def forward_from(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """The layer4 map [b, d, h, w] from features after `layer` (0..4)."""
        if layer == 0:
            return self.features(h)
        return self.trunk[self._STAGE_END[layer]:](h)

    @staticmethod
    def pool(fmap: torch.Tensor) -> torch.Tensor:
        return fmap.mean((2, 3))

    def dense_logits(self, fmap: torch.Tensor) -> torch.Tensor:
        """fc applied as a 1x1 convolution: fmap [b, d, h, w] -> [b, c, h*w]."""
        logits = torch.einsum("bdr,cd->bcr", fmap.flatten(2), self.fc.weight.to(fmap.dtype))
        return logits + self.fc.bias.to(fmap.dtype).view(1, -1, 1)

    def logits_and_cams(self, x: torch.Tensor, classes: torch.Tensor | None = None):
        """x: [B, 3, H, W]; classes: [B] or [B, k] class indices (None: every class).

        Returns (logits [B, K], cams [B, k or K, h, w] at feature resolution, unnormalised):
        cam[b, j] = mean_c(W_fc[classes[b, j], c] * F[b, c]).
        """
        fmap = self.features(x)
        logits = self.fc(fmap.mean((2, 3)))
        w = self.fc.weight
        if classes is None:
            weights = w.unsqueeze(0).expand(x.shape[0], -1, -1)
        else:
            cls = classes.view(x.shape[0], -1)
            weights = w[cls]  # [B, k, C]
        cams = torch.einsum("bkc,bchw->bkhw", weights, fmap) / fmap.shape[1]
        return logits, cams


def normalise_cams(cams: torch.Tensor, size=(224, 224)) -> torch.Tensor:
    """cams [B, k, h, w] -> [B, k, size[0], size[1]] float32 score maps in [0, 1], on the CPU.

    As wsolevaluation (``inference.py``) does per CAM, in float32 numpy:
    ``cv2.resize(cam, (W, H), interpolation=cv2.INTER_CUBIC)``, then ``cam -= cam.min();
    cam /= cam.max()`` (no epsilon); a constant or non-finite map becomes all zeros.
    size = (H, W).
    """
    height, width = (int(s) for s in size)
    src = cams.detach().float().cpu().numpy()
    out = np.zeros((*src.shape[:2], height, width), np.float32)
    for b in range(src.shape[0]):
        for j in range(src.shape[1]):
            up = cv2.resize(src[b, j], (width, height), interpolation=cv2.INTER_CUBIC)
            if not np.isfinite(up).all() or up.min() == up.max():
                continue
            up -= up.min()
            up /= up.max()
            out[b, j] = up
    return torch.from_numpy(out)


def build_cam_model(arch: str, num_classes: int, weights: str | None = None,
                    allow_pickle: bool = False) -> CAMModel:
    """A CAM model; backbone from a checkpoint (any layout ``load_backbone`` reads) or random."""
    model = CAMModel(arch, num_classes)
    if weights:
        model.load_backbone_state(load_backbone(weights, arch=arch, allow_pickle=allow_pickle))
    return model
