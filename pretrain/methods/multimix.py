"""MultiMix and Dense MultiMix (Venkataramanan et al., "Embedding Space Interpolation Beyond
Mini-Batch, Beyond Pairs and Beyond Examples", NeurIPS 2023): n interpolations of the whole
mini-batch with Dirichlet weights, at the embedding (eqs. (6)-(7)) or per position of the layer4
map with attention (eqs. (9)-(14)).

The multiple-interpolations method of Shen et al. is another paper:
`pretrain.methods.multi_interp`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixup_transfer.core import runtime as rt
from mixup_transfer.core.runtime import autocast_off
from pretrain.adapters import EMBEDDING
from pretrain.methods.base import Method, dense_features, dirichlet_weights, mixup

ATTENTIONS = ("gap_l1relu", "gap_softmax", "cam_l1relu", "cam_softmax", "uniform")


class MultiMix(Method):
    """MultiMix: n interpolations of the whole mini-batch with Dirichlet weights, at the embedding.

    With probability `prob` per batch MultiMix, else input mixup (alpha `input_alpha`). Lambda [b,
    n] has columns ~ Dir(alpha_k) with alpha_k ~ U[alpha_low, alpha_high] (equal bounds: fixed
    alpha); `m` < b restricts each column to a random m-subset. At the embedding (layer 5) the
    logits are mixed (g(Z Lambda) = g(Z) Lambda); at layer < 5 the n mixed feature maps run through
    the rest of the network (the paper's layer ablation; costly). dense_loss mixes dense logits
    with the same Lambda at every position (Table 10's "dense loss only").

    global_batch (this toolkit's extension, not in the paper, whose b, m and n are per GPU): under
    DDP the logits g(Z) of every rank are gathered (gradients return to their rank through the
    gather), so each process mixes the global batch of world x b examples (m up to world x b) with
    its own n Dirichlet draws; DDP's gradient average then equals one process holding the whole
    batch with world x n interpolations. The MultiMix / input-mixup coin comes from the
    rank-independent host stream (the same on every rank, no broadcast). Embedding only (layer 5).
    In one process it changes nothing (the local batch is the global batch).
    """

    def __init__(self, model, num_classes, n: int = 1000, m: int | None = None,
                 alpha_low: float = 0.5, alpha_high: float = 2.0, prob: float = 0.5,
                 input_alpha: float = 1.0, layer: int = EMBEDDING, dense_loss: bool = False,
                 global_batch: bool = False):
        super().__init__(model, num_classes, dense_loss)
        self.n, self.m, self.alpha_low, self.alpha_high = n, m, alpha_low, alpha_high
        self.prob, self.input_alpha, self.layer = prob, input_alpha, int(layer)
        self.global_batch = bool(global_batch)
        if self.global_batch and self.layer < EMBEDDING:
            raise ValueError("multimix global_batch mixes at the embedding (layer 5) only, got "
                             f"layer {layer}: gathering every rank's feature maps would not fit "
                             "in memory")

    def _branch_draw(self) -> float:
        """The uniform draw that picks MultiMix or input mixup; under global_batch from the
        rank-independent host stream (every rank must take the same branch: only MultiMix gathers),
        so no broadcast (no sync) is needed."""
        return float((self.shared_rng if self.global_batch else self.host_rng).random())

    def _global_multimix(self, images, labels):
        """global_batch: mix the logits [world*b, c(, r)] of every rank with this rank's Lambda
        [world*b, n]."""
        logits = rt.gather_with_grad(self.logits_of(self.model.features(images)))
        labels = rt.all_gather(labels)
        lam = self._lambda(labels.shape[0])
        if not self.dense_loss:
            return {"loss": multimix_loss_from_logits(logits, labels, lam)}
        with rt.autocast_off(logits.device):  # fp32 (see pretrain.methods.base's conventions)
            mixed = torch.einsum("bc...,bn->nc...", logits.float(), lam)
            return {"loss": self.loss_of(mixed, lam.t() @ self.targets(labels))}

    def _input_mixup(self, images, y):
        lam, perm = self._beta(self.input_alpha), self._perm(images.shape[0])
        logits = self.logits_of(self.model.features(mixup(images, perm, lam)))
        return {"loss": self.loss_of(logits, mixup(y, perm, lam))}

    def _lambda(self, b):
        return dirichlet_weights(b, self.n, self.alpha_low, self.alpha_high, self.generator,
                                    m=min(self.m, b) if self.m else None, device=self._device())

    def forward(self, images, labels):
        y = self.targets(labels)
        if self._branch_draw() >= self.prob:
            return self._input_mixup(images, y)
        if self.global_batch:
            return self._global_multimix(images, labels)
        b = images.shape[0]
        lam = self._lambda(b)  # [b, n]
        if self.layer >= EMBEDDING and not self.dense_loss:  # the fast path: mix b logit vectors
            logits = self.model.fc(self.model.pool(self.model.features(images)))
            return {"loss": multimix_loss_from_logits(logits, labels, lam)}
        with rt.autocast_off(y.device):  # the targets in fp32
            y_mix = lam.t() @ y
        if self.layer >= EMBEDDING:
            logits = self.logits_of(self.model.features(images))  # [b, c] or [b, c, r]
            with rt.autocast_off(logits.device):  # the mixed logits in fp32, as the fast path's
                mixed = torch.einsum("bc...,bn->nc...", logits.float(), lam)
        else:
            h = self.model.forward_to(images, self.layer)
            h_mix = torch.einsum("b...,bn->n...", h, lam.to(h.dtype))
            mixed = self.logits_of(self.model.forward_from(h_mix, self.layer))
        return {"loss": self.loss_of(mixed, y_mix)}


class DenseMultiMix(MultiMix):
    """Dense MultiMix (eqs. (9)-(14)): per-position Dirichlet interpolation of the layer4 map,
    weighted by attention, with the weighted dense loss. Fast path: the dense logit maps are mixed.

    attention: gap_l1relu (default) | gap_softmax | cam_l1relu | cam_softmax | uniform (detached:
    it weights the interpolation, it is not trained through). resolution: average-pool the layer4
    map to resolution x resolution first (None keeps it; 7x7 for 224 px inputs).

    global_batch: as MultiMix's (this toolkit's extension): the dense logits [world*b, c, r],
    attention and labels of every rank are gathered, and the weighted loss of eq. (14) is
    normalised by the sum of the weights s over every rank's n columns (times world), so that DDP's
    average equals one process with world x n interpolations. Memory: world*b*c*r floats per
    process (8 x 128 x 1000 x 49: 200 MB).
    """

    def __init__(self, model, num_classes, n: int = 1000, m: int | None = None,
                 alpha_low: float = 0.5, alpha_high: float = 2.0, prob: float = 0.5,
                 input_alpha: float = 1.0, attention: str = "gap_l1relu",
                 resolution: int | None = None, global_batch: bool = False):
        super().__init__(model, num_classes, n, m, alpha_low, alpha_high, prob, input_alpha,
                         global_batch=global_batch)
        if attention not in ATTENTIONS:
            raise ValueError(f"dense_multimix attention must be one of {ATTENTIONS}, got "
                             f"{attention!r}")
        self.attention, self.resolution = attention, resolution

    def forward(self, images, labels):
        y = self.targets(labels)
        if self._branch_draw() >= self.prob:
            return self._input_mixup(images, y)
        # a ViT's patch tokens on their grid
        fmap = dense_features(self.model, self.model.features(images))
        if self.resolution:
            fmap = F.adaptive_avg_pool2d(fmap, self.resolution)
        z = fmap.flatten(2)  # [b, d, r]
        b, _, r = z.shape
        with torch.no_grad():
            attn = dense_attention(z.detach().float(), self.attention,
                                   self.model.fc.weight.float(), y)
        logits = self.model.dense_logits(fmap)
        if self.global_batch:  # every rank's examples (see the class docstring)
            logits, attn, labels = (
                rt.gather_with_grad(logits),
                rt.all_gather(attn),
                rt.all_gather(labels),
            )
            b = labels.shape[0]
        lam = dirichlet_weights(b, self.n, self.alpha_low, self.alpha_high, self.generator,
                                   m=min(self.m, b) if self.m else None, sets=r,
                                   device=self._device())
        mhat, s = dense_mix_weights(attn, lam)
        if not self.global_batch:
            return {"loss": dense_multimix_loss_from_logits(logits, labels, mhat, s)}
        total = rt.all_reduce_sum(s.float().sum(1))  # [r]: sum of s over every rank's n columns
        loss = dense_multimix_loss_from_logits(logits, labels, mhat, s, weight_total=total)
        return {"loss": loss * rt.world_size()}


def multimix_loss_from_logits(logits: torch.Tensor, labels: torch.Tensor,
                              lam: torch.Tensor) -> torch.Tensor:
    """The fast path of MultiMix with hard labels: H(Y Lambda, softmax(g(Z) Lambda)).

    logits [b, c] = g(Z) (bias included: columns of Lambda sum to 1, so g(Z Lambda) = g(Z) Lambda),
    labels [b] int, lam [b, n]. Never forms the n x c mixed targets: for one-hot y,
    sum_c (Y lam_k)_c log p_kc = sum_i lam_ik log p_k[label_i].
    """
    with autocast_off(logits.device):
        logp = F.log_softmax(lam.t().float() @ logits.float(), dim=-1)  # [n, c]
        return -(logp[:, labels] * lam.t().float()).sum(1).mean()


def dense_attention(z: torch.Tensor, kind: str = "gap_l1relu",
                    fc_weight: torch.Tensor | None = None,
                    y: torch.Tensor | None = None) -> torch.Tensor:
    """Attention a = h(z^T u) of eq. (9). z [b, d, r] -> a [b, r] (each row sums to 1).

    kind: "<u>_<h>" with u in {gap, cam} and h in {l1relu, softmax}, or "uniform".
    gap: u = mean over positions of z; cam: u = W^T y (fc_weight W [c, d], y [b, c]).
    l1relu: ReLU then l1-normalise (all-zero rows fall back to uniform); softmax over positions.
    """
    b, _, r = z.shape
    if kind == "uniform":
        return z.new_full((b, r), 1.0 / r)
    try:
        u_kind, h_kind = kind.split("_")
        assert u_kind in ("gap", "cam") and h_kind in ("l1relu", "softmax")
    except (ValueError, AssertionError):
        raise ValueError(f"unknown attention {kind!r}; valid: gap_l1relu, gap_softmax, "
                         "cam_l1relu, cam_softmax, uniform") from None
    if u_kind == "cam" and (fc_weight is None or y is None):
        raise ValueError("cam attention needs fc_weight and y")
    # in z's dtype (fp32 as the methods call it), whatever autocast says
    with autocast_off(z.device):
        u = z.mean(-1) if u_kind == "gap" else y.to(fc_weight.dtype) @ fc_weight
        s = torch.einsum("bdr,bd->br", z, u.to(z.dtype))
    if h_kind == "softmax":
        return torch.softmax(s.float(), dim=-1).to(z.dtype)
    s = torch.relu(s)
    tot = s.sum(-1, keepdim=True)
    return torch.where(tot > 0, s / tot.clamp_min(1e-12), torch.full_like(s, 1.0 / r))


def dense_mix_weights(attn: torch.Tensor, lam: torch.Tensor):
    """Eqs. (10)-(11): M^j = diag(a^j) Lambda^j, s^j = 1^T M^j, Mhat^j = M^j diag(s^j)^-1.

    attn [b, r], lam [r, b, n] -> (Mhat [r, b, n], s [r, n]).
    """
    m = attn.t().unsqueeze(-1).to(lam.dtype) * lam
    s = m.sum(1)
    return m / s.unsqueeze(1).clamp_min(1e-12), s


def dense_multimix_loss_from_logits(logits: torch.Tensor, y: torch.Tensor, mhat: torch.Tensor,
                                    s: torch.Tensor,
                                    weight_total: torch.Tensor | None = None) -> torch.Tensor:
    """The fast path of Dense MultiMix: mix the b dense logit maps instead of the embeddings.

    logits [b, c, r] (fc applied as a 1x1 conv, bias included: columns of Mhat sum to 1, so
    g(Z Mhat) = g(Z) Mhat), y [b, c], mhat [r, b, n], s [r, n]. Equals
    weighted_dense_cross_entropy(fc(z_mix), y_mix, weight) without ever forming z_mix or y_mix:
    sum_c y_mix log p = sum_i Mhat_ik (y_i . log p_k). `y` may also be hard labels [b] (int), then
    y_i . log p_k is a gather instead of a product with the b x c targets. weight_total [r]: the
    per-position denominator sum_k s_k (default: over these n columns; MultiMix global_batch passes
    the sum over every rank's columns).
    """
    with autocast_off(logits.device):
        mixed = torch.einsum("bcr,rbn->ncr", logits.float(), mhat.float())
        logp = F.log_softmax(mixed, dim=1)
        if y.ndim == 1:
            ylogp = logp[:, y, :].permute(2, 0, 1)  # [r, n, b]
        else:
            ylogp = torch.einsum("ncr,bc->rnb", logp, y.float())  # y_i . log p_k at each position
        per = -(ylogp * mhat.float().transpose(1, 2)).sum(-1)  # [r, n]
    w = s.float()
    total = w.sum(1) if weight_total is None else weight_total.float()
    return ((per * w).sum(1) / total.clamp_min(1e-12)).mean()
