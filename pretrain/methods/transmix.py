"""TransMix (Chen et al., "TransMix: Attend to Mix for Vision Transformers", CVPR 2022,
arXiv:2111.09833): Mixup or CutMix of the batch with its reverse, as timm's `Mixup` switches
between them, and for CutMix the label weight re-computed from the class token's attention in the
last block over the patches inside the pasted box.

The official code (Beckschen/TransMix, `transmix.py:Mixup_transmix` over timm 0.5.4's `Mixup`, and
its `train.py`): per batch, mixing with probability `prob`; CutMix with probability `switch_prob`,
lam ~ Beta(cutmix_alpha) and a box of side sqrt(1 - lam) (timm's `rand_bbox`: centre row then
column, clipped), else Mixup with lam ~ Beta(mixup_alpha); the partner of example i is example b -
1 - i (`x.flip(0)`). Mixup targets are lam y_i + (1 - lam) y_partner; CutMix targets (1 - lam') y_i
+ lam' y_partner with lam' = (area + attention) / 2: `area` the box's share of the image and
`attention` the share of the class token's attention (the last block's softmax, averaged over the
heads, patches only) that falls on the patches whose nearest-neighbour downsampled box mask is 1.
Targets are label-smoothed (timm's convention). `tests/fixtures/transmix_official.npz` pins the
draws' consequences (box, lam, images, targets) against the official functions.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pretrain import mixers
from pretrain.methods.base import Method, mixup, soft_cross_entropy


def transmix_box(h: int, w: int, lam: float,
                 centre: tuple[int, int]) -> tuple[tuple[int, int, int, int], float]:
    """timm's `rand_bbox` for one box: side ratio sqrt(1 - lam), centre (cy, cx), clipped to the
    image.

    Returns ((y0, y1, x0, x1), area) with area = the box's share of the h x w image (the pasted
    fraction)."""
    cut = math.sqrt(1.0 - float(lam))
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = centre
    y0, y1 = min(max(cy - ch // 2, 0), h), min(max(cy + ch // 2, 0), h)
    x0, x1 = min(max(cx - cw // 2, 0), w), min(max(cx + cw // 2, 0), w)
    return (y0, y1, x0, x1), (y1 - y0) * (x1 - x0) / (h * w)


def patch_box_mask(h: int, w: int, box, side: int) -> np.ndarray:
    """The box's mask on the side x side patch grid, flattened [side * side] (float32): patch (i,
    j) is in the box when pixel (floor(i h / side), floor(j w / side)) is (nearest-neighbour
       downsampling, as the official
    `nn.Upsample(size=side)` of the pixel mask)."""
    y0, y1, x0, x1 = box
    rows = np.floor(np.arange(side) * (h / side)).astype(np.int64)
    cols = np.floor(np.arange(side) * (w / side)).astype(np.int64)
    inside = ((rows >= y0) & (rows < y1))[:, None] & ((cols >= x0) & (cols < x1))[None, :]
    return inside.reshape(-1).astype(np.float32)


def transmix_lam(attn: torch.Tensor, mask: torch.Tensor, area: float) -> torch.Tensor:
    """lam' [b] = (area + sum(mask * attn) / sum(attn)) / 2: the weight of the pasted (partner)
    label.

    attn [b, r] the class token's attention over the r patches, mask [r] (1 = in the pasted
    box)."""
    attn = attn.float()
    inside = (attn * mask.to(attn.dtype)).sum(1)
    return (area + inside / attn.sum(1)) / 2


def transmix_targets(y: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """(1 - lam) y + lam y.flip(0): y [b, c] (smoothed one-hot), lam [b] the partner's weight."""
    lam = lam.to(y.dtype).unsqueeze(1)
    return y * (1 - lam) + y.flip(0) * lam


class TransMix(Method):
    """TransMix on a ViT (the model must give `features_and_attention`, as
    `pretrain.adapters.ViTBackbone` does).

    Knobs (the official defaults: DeiT-S config `deit_s_transmix.yaml` and train.py's arguments):
    mixup_alpha 0.8, cutmix_alpha 1.0, switch_prob 0.5 (P(CutMix) when both are active), prob 1.0
    (P(mixing) per batch), smoothing 0.1 (label smoothing of the targets)."""

    def __init__(self, model, num_classes, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 switch_prob: float = 0.5, prob: float = 1.0, smoothing: float = 0.1):
        super().__init__(model, num_classes)
        if not hasattr(self.model, "features_and_attention"):
            raise ValueError("transmix reads the class-token attention of a Vision Transformer; "
                             f"{type(self.model).__name__} has none (use a ViT arch: "
                             "vit_tiny_toy, vit_small_patch16_224)")
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.switch_prob, self.prob, self.smoothing = switch_prob, prob, smoothing

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        return mixers.smooth_one_hot(labels, self.num_classes, self.smoothing)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.fc(self.model.pool(self.model.features(x)))

    def forward(self, images, labels):
        y = self.targets(labels)
        b, _, h, w = images.shape
        # the official draw order (timm's Mixup._params_per_batch, then rand_bbox): mix?, CutMix?,
        # lam, centre
        if self._rand() >= self.prob:
            return {"loss": soft_cross_entropy(self._logits(images), y)}
        cut = self._rand() < self.switch_prob
        lam = self._beta(self.cutmix_alpha if cut else self.mixup_alpha)
        flip = torch.arange(b - 1, -1, -1, device=images.device)
        if not cut:
            return {"loss": soft_cross_entropy(self._logits(mixup(images, flip, lam)),
                                               mixup(y, flip, lam))}
        box, area = transmix_box(h, w, lam, self._centre(h, w))
        y0, y1, x0, x1 = box
        x = images.clone()
        x[:, :, y0:y1, x0:x1] = images.flip(0)[:, :, y0:y1, x0:x1]
        tokens, attn = self.model.features_and_attention(x)
        side = math.isqrt(attn.shape[1])
        mask = self._on_device(patch_box_mask(h, w, box, side))
        lam_attn = transmix_lam(attn, mask, area)
        return {"loss": soft_cross_entropy(self.model.fc(self.model.pool(tokens)),
                                           transmix_targets(y, lam_attn)),
                "stat_transmix_lam": lam_attn.detach().mean()}
