"""multi_interp: K sorted interpolations of every pair (Shen, Yu, Yang, Kwok, "Mixup Augmentation
with Multiple Interpolations", arXiv 2406.01417, called multi-mix there) over input mixup, manifold
mixup, CutMix or PuzzleMix.

MultiMix (Venkataramanan et al., Dirichlet interpolations of the whole mini-batch) is another
paper: `pretrain.methods.multimix`.
"""

from __future__ import annotations

import torch

from pretrain import mixers
from pretrain.methods.base import Method, mix_at, mixup, multi_mixup
from pretrain.methods.puzzlemix import PuzzleMix


class MultiInterp(Method):
    """multi-mix (Shen et al.): K sorted interpolations lam_1 <= ... <= lam_K ~ Beta(alpha, alpha)
    of every pair; the loss is the mean over the K mixed samples.

    base: input | manifold (layer drawn from `layers`; 5 = embedding, logit trick) | cutmix (K
    nested boxes sharing a uniform centre, box k of size H sqrt(lam_k) x W sqrt(lam_k) replaced by
    the partner) | puzzlemix (K masks, one per lam_k, sharing the saliency). alpha None = the base
    method's default (input 1.0, manifold 2.0, cutmix 1.0, puzzlemix 1.0). large_batch: the paper's
    "large-batch mixup" baseline instead (K random pairings per example, one lam), base
    input/manifold.
    """

    BASES = {"input": 1.0, "manifold": 2.0, "cutmix": 1.0, "puzzlemix": 1.0}

    def __init__(self, model, num_classes, base: str = "puzzlemix", k: int = 5,
                 alpha: float | None = None, layers=(0, 1, 2), puzzle: dict | None = None,
                 large_batch: bool = False, dense_loss: bool = False):
        super().__init__(model, num_classes, dense_loss)
        if base not in self.BASES:
            raise ValueError(f"multi_interp base must be one of {sorted(self.BASES)}, got "
                             f"{base!r}")
        if large_batch and base not in ("input", "manifold"):
            raise ValueError("multi_interp large_batch (the paper's 'large-batch mixup' "
                             "baseline) needs base input or manifold")
        self.large_batch = large_batch
        self.base, self.k = base, int(k)
        self.alpha = self.BASES[base] if alpha is None else alpha
        self.layers = tuple(int(v) for v in layers)
        # the PuzzleMix helper shares the model; kept out of the module tree so it is not
        # registered twice
        object.__setattr__(self, "puzzler",
                           PuzzleMix(model, num_classes, **(puzzle or {})) if base == "puzzlemix"
                           else None)

    def forward(self, images, labels):
        y = self.targets(labels)
        b, _, h, w = images.shape
        perm = self._perm(b)
        lams = self._sorted_betas(self.k, self.alpha)  # host floats
        if self.large_batch:
            # baseline: K random pairings per example, all with one unsorted lam (same cost as
            # multi-mix)
            layer = 0 if self.base == "input" else self._choice(self.layers)
            lam = self._beta(self.alpha)
            perms = [perm] + [self._perm(b) for _ in range(self.k - 1)]
            one = self._on_device([lam])
            logits = torch.cat([mix_at(self, images, p, one, layer) for p in perms])
            return {"loss": self.loss_of(logits, torch.cat([mixup(y, p, lam) for p in perms]))}
        if self.base in ("input", "manifold"):
            layer = 0 if self.base == "input" else self._choice(self.layers)
            lams = self._on_device(lams)
            logits = mix_at(self, images, perm, lams, layer)
            return {"loss": self.loss_of(logits, multi_mixup(y, perm, lams))}
        if self.base == "cutmix":  # the library's multi-mix CutMix on these draws
            draw = mixers.Draw(perm, lams, self._centre(h, w))
            x, y_k = mixers.MultiMixK(mixers.CutMix(self.alpha, self.num_classes),
                                      self.k).apply(images, labels, draw)
            return {"loss": self.loss_of(self.logits_of(self.model.features(x)), y_k)}
        else:
            self.puzzler.generator, self.puzzler.host_rng = self.generator, self.host_rng
            x, kept = self.puzzler.puzzle(images, labels, perm, lams, self.puzzler._grid(h, w))
        logits = self.logits_of(self.model.features(x))
        kept = kept.view(-1, 1)  # [K*b, 1], block k holds pair weights lam_kept_k
        y_k = kept * y.repeat(self.k, 1) + (1 - kept) * y[perm].repeat(self.k, 1)
        return {"loss": self.loss_of(logits, y_k)}
