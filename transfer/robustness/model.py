"""The evaluated classifier: a torchvision ResNet (backbone + its fc) behind ImageNet normalisation.

Inputs are RGB images in [0, 1]; the wrapper normalises them, so attack budgets and noise are pixel
units. ``features_logits`` also returns the last conv features for CAMs.
"""

from __future__ import annotations

import torch
from torch import nn

from core.constants import IMAGENET_MEAN, IMAGENET_STD


class NormalizedClassifier(nn.Module):
    """``model((x - mean) / std)`` for x ``[B, 3, H, W]`` in [0, 1]; ``model`` a torchvision ResNet."""

    def __init__(self, model: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))

    def features_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(layer4 features ``[B, K, h, w]``, logits ``[B, C]``) in one pass (torchvision ResNet layout)."""
        m = self.model
        f = m.maxpool(m.relu(m.bn1(m.conv1(self.normalize(x)))))
        f = m.layer4(m.layer3(m.layer2(m.layer1(f))))
        logits = m.fc(torch.flatten(m.avgpool(f), 1))
        return f, logits

    @property
    def fc_weight(self) -> torch.Tensor:
        return self.model.fc.weight


def load_classifier_model(checkpoint, num_classes: int, arch: str | None = None) -> tuple[nn.Module, dict]:
    """A ``NormalizedClassifier`` (eval mode, frozen) from a backbone checkpoint with its fc.

    Raises ``core.checkpoint.CheckpointError`` naming the key and shapes when the checkpoint has no
    classifier head for ``num_classes`` classes.
    """
    from core.checkpoint import resnet_from_checkpoint

    net, meta = resnet_from_checkpoint(checkpoint, arch=arch, num_classes=num_classes)
    model = NormalizedClassifier(net).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, meta
