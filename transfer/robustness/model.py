"""The evaluated classifier: a torchvision ResNet (backbone + its fc) or a timm ViT (+ its head)
behind ImageNet normalisation.

Inputs are RGB images in [0, 1]; the wrapper normalises them, so attack budgets and noise are pixel
units. ``features_logits`` also returns the last conv features for CAMs. A checkpoint whose
classifier has a stage-2 head (AlignMix's encoder on the pooled feature tensor,
``mixup_transfer.core.checkpoint.check_head``) is evaluated through that head, and its CAMs use the
head's per-position class weights. A ViT's CAM features are its patch tokens after the final norm
on their grid, weighted by the head (the class token is what it classifies).
"""

from __future__ import annotations

import torch
from torch import nn

from mixup_transfer.core.constants import IMAGENET_MEAN, IMAGENET_STD


class NormalizedClassifier(nn.Module):
    """``model((x - mean) / std)`` for x ``[B, 3, H, W]`` in [0, 1]; ``model`` a torchvision ResNet
    or a timm ViT."""

    def __init__(self, model: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 head: dict | None = None):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.head = None
        if head is not None:
            self.resolution = int(head["resolution"])
            self.head = nn.Linear(head["weight"].shape[1], head["weight"].shape[0])
            self.head.load_state_dict({"weight": head["weight"], "bias": head["bias"]})

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            return self.model(self.normalize(x))
        return self.features_logits(x)[1]

    def features_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(CAM features ``[B, K, h, w]``, logits ``[B, C]``) in one pass (torchvision ResNet
        layout). The CAM features are the layer4 map, or with a stage-2 head the map pooled to the
        head's resolution."""
        m = self.model
        if self.is_vit:
            return self._vit_features_logits(x)
        f = m.maxpool(m.relu(m.bn1(m.conv1(self.normalize(x)))))
        f = m.layer4(m.layer3(m.layer2(m.layer1(f))))
        if self.head is None:
            return f, m.fc(torch.flatten(m.avgpool(f), 1))
        a = nn.functional.adaptive_avg_pool2d(f, self.resolution)
        return a, m.fc(self.head(a.flatten(1)))

    @property
    def is_vit(self) -> bool:
        return hasattr(self.model, "blocks") and hasattr(self.model, "forward_head")

    def _vit_features_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the patch tokens after the final norm on their grid ``[B, d, s, s]``, logits) of a timm
        ViT."""
        from mixup_transfer.core.vits import vit_grid

        tokens = self.model.forward_features(self.normalize(x))  # [B, T, d]
        prefix = int(self.model.num_prefix_tokens)
        side = vit_grid(tokens.shape[1], prefix)
        patches = tokens[:, prefix:].transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2],
                                                             side, side)
        return patches, self.model.forward_head(tokens)

    @property
    def fc_weight(self) -> torch.Tensor:
        """Class weights of the CAM features: ``[C, K]`` (fc after pooling) or ``[C, K, r, r]``
        (stage-2 head: the score of class c is the sum over positions of fc_c . W2[:, position]
        times the features, + const)."""
        if self.head is None:
            return self.model.head.weight if self.is_vit else self.model.fc.weight
        r = self.resolution
        w = self.model.fc.weight @ self.head.weight  # [C, K * r * r], flatten order (K, r, r)
        return w.view(w.shape[0], -1, r, r)


def load_classifier_model(checkpoint, num_classes: int, arch: str | None = None,
                          classes=None) -> tuple[nn.Module, dict]:
    """A ``NormalizedClassifier`` (eval mode, frozen) from a backbone checkpoint with its
    classifier (a ResNet's fc or a ViT's head: ``classifier_from_checkpoint`` dispatches on the
    checkpoint's architecture).

    Raises ``mixup_transfer.core.checkpoint.CheckpointError`` naming the key and shapes when the
    checkpoint has no classifier head for ``num_classes`` classes, or, when the checkpoint lists
    the classes it was trained on (``meta["classes"]``), when they are not ``classes`` (the
    evaluation set's, in label order): the same count of other classes would score every prediction
    against the wrong label.
    """
    from mixup_transfer.core.checkpoint import (
        CheckpointError,
        classifier_from_checkpoint,
        classifier_head,
    )

    net, meta = classifier_from_checkpoint(checkpoint, arch=arch, num_classes=num_classes)
    trained = meta.get("classes")
    if classes is not None and isinstance(trained, list) and list(map(str, classes)) != trained:
        k = next(
            (i for i, (a, b) in enumerate(zip(trained, map(str, classes))) if a != b),
            min(len(trained), len(classes)),
        )
        raise CheckpointError(f"{checkpoint}: trained on other classes than the evaluation "
                              f"set's: label {k} is "
                              f"{trained[k] if k < len(trained) else '<none>'!r} in the "
                              "checkpoint, "
                              f"{str(list(classes)[k]) if k < len(classes) else '<none>'!r} in "
                              "the data")
    model = NormalizedClassifier(net, head=classifier_head(checkpoint)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, meta
