"""zeta-mixup (Abhishek, Brown, Hamarneh, "Multi-sample zeta-mixup: richer, more realistic
synthetic samples from a p-series interpolant", arXiv:2204.03323): every example of the batch
replaced by a convex combination of the whole batch, with p-series weights over a random order of
the others (the example itself first)."""

from __future__ import annotations

import torch

from pretrain import mixers
from pretrain.methods.base import Method


class ZetaMixup(Method):
    """The batch mixed by `pretrain.mixers.ZetaMixup` (the official `zeta_mixup`, pinned by its
    fixtures), then soft-target cross-entropy. gamma: the p-series exponent (2.8, the official
    default). The [b, b] uniform draws that order the batch come from the method's device
    generator."""

    def __init__(self, model, num_classes, gamma: float = 2.8, dense_loss: bool = False):
        super().__init__(model, num_classes, dense_loss)
        self.gamma = float(gamma)
        self.mixer = mixers.ZetaMixup(self.gamma, num_classes)

    def forward(self, images, labels):
        b = images.shape[0]
        order = torch.rand(b, b, generator=self.generator, device=self._device(),
                           dtype=torch.float64)
        x, y_mix = self.mixer.apply(images, labels,
                                    mixers.Draw(torch.arange(b, device=images.device), [1.0],
                                                                 order=order))
        return {"loss": self.loss_of(self.logits_of(self.model.features(x)), y_mix)}
