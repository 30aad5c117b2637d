"""CutMix (Yun et al., ICCV 2019): the method and its boxes (one box, K nested boxes for
multi-interpolation)."""

from __future__ import annotations

import math

import torch

from pretrain import mixers
from pretrain.methods.base import Method


class CutMix(Method):
    """CutMix: lam ~ Beta(alpha, alpha), a box of side sqrt(1 - lam) pasted from the partner, label
    weight recomputed from the clipped box; applied with probability `prob` (else plain ERM)."""

    def __init__(self, model, num_classes, alpha: float = 1.0, prob: float = 1.0,
                 dense_loss: bool = False):
        super().__init__(model, num_classes, dense_loss)
        self.alpha, self.prob = alpha, prob
        self.mixer = mixers.CutMix(alpha, num_classes)

    def forward(self, images, labels):
        y = self.targets(labels)
        b, _, h, w = images.shape
        if self._rand() >= self.prob:
            return {"loss": self.loss_of(self.logits_of(self.model.features(images)), y)}
        perm, lam = self._perm(b), self._beta(self.alpha)
        x, y_mix = self.mixer.apply(images, labels, mixers.Draw(perm, [lam], self._centre(h, w)))
        return {"loss": self.loss_of(self.logits_of(self.model.features(x)), y_mix)}


def cutmix_box(h: int, w: int, lam: float, generator: torch.Generator | None = None, centre=None):
    """A CutMix box of side ratio sqrt(1 - lam) with a uniform centre, clipped to the image.

    Returns ((y0, y1, x0, x1) ints, lam_kept) where lam_kept = 1 - box area / (h * w) is the exact
    fraction of the first image that stays (the box is pasted from the partner). Heights go with h
    and widths with w (the reference code swaps them, which only matters for non-square inputs).
    `centre` = (cy, cx) gives the draw explicitly.
    """
    cut = math.sqrt(1.0 - float(lam))
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = centre if centre is not None else _centre(h, w, generator)
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    return (y0, y1, x0, x1), 1.0 - (y1 - y0) * (x1 - x0) / (h * w)


def _centre(h: int, w: int, generator) -> tuple[int, int]:
    cy = int(torch.randint(h, (1,), generator=generator).item())
    cx = int(torch.randint(w, (1,), generator=generator).item())
    return cy, cx


def nested_box_list(h: int, w: int, lams,
                    centre) -> tuple[list[tuple[int, int, int, int]], list[float]]:
    """`nested_boxes` for host numbers: lams a sequence of K floats, centre (cy, cx) ->
    (K boxes (y0, y1, x0, x1), K kept fractions)."""
    cy, cx = centre
    boxes, kept = [], []
    for lam in lams:
        bh, bw = int(h * math.sqrt(lam)), int(w * math.sqrt(lam))
        y0, y1 = max(cy - bh // 2, 0), min(cy + bh // 2, h)
        x0, x1 = max(cx - bw // 2, 0), min(cx + bw // 2, w)
        boxes.append((y0, y1, x0, x1))
        kept.append(1.0 - (y1 - y0) * (x1 - x0) / (h * w))
    return boxes, kept


def box_mask(h: int, w: int, box, device=None, dtype=torch.float32) -> torch.Tensor:
    """[1, 1, h, w] mask: 1 outside the box (first image kept), 0 inside. box = (y0, y1, x0,
    x1)."""
    y0, y1, x0, x1 = (int(v) for v in box)
    m = torch.ones(1, 1, h, w, device=device, dtype=dtype)
    m[..., y0:y1, x0:x1] = 0
    return m
