"""Reference forms of the mixing math that only the tests use: the equations as the papers write
them (the methods compute the same numbers by cheaper routes, e.g. mixing logits instead of
embeddings) and one-call wrappers of the methods' batched functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixup_transfer.core.runtime import autocast_off
from pretrain.methods.alignmix import feature_cost, sinkhorn
from pretrain.methods.cutmix import _centre, nested_box_list
from pretrain.methods.multimix import dense_mix_weights
from pretrain.methods.puzzlemix import puzzle_masks, puzzle_mix_many


def weighted_dense_cross_entropy(logits: torch.Tensor, y_mix: torch.Tensor,
                                 weight: torch.Tensor) -> torch.Tensor:
    """Eq. (14) of the MultiMix paper at every position j, averaged over positions.

    logits, y_mix: [n, c, r]; weight s: [n, r]. Per position: -sum_k s_k sum_c y log p / sum_k s_k.
    """
    logp = F.log_softmax(logits.float(), dim=1)
    per = -(y_mix * logp).sum(1)  # [n, r]
    return ((per * weight).sum(0) / weight.sum(0).clamp_min(1e-12)).mean()


def nested_boxes(h: int, w: int, lams: torch.Tensor, generator: torch.Generator | None = None,
                 centre=None):
    """multi-mix CutMix: K boxes sharing one uniform centre, box k of size (h sqrt(lam_k), w
    sqrt(lam_k)), clipped. Box k is the region of x replaced by x'. With sorted lams the boxes are
    nested.

    Returns (boxes LongTensor [K, 4] as (y0, y1, x0, x1), lam_kept [K] = 1 - area_k / (h w)).
    `centre` = (cy, cx) gives the draw explicitly. `nested_box_list` is the same on host numbers.
    """
    cy, cx = centre if centre is not None else _centre(h, w, generator)
    boxes, kept = nested_box_list(h, w, lams.tolist(), (cy, cx))
    return torch.tensor(boxes, dtype=torch.long), torch.tensor(kept)


def mask_mix(x: torch.Tensor, x2: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mask * x + (1 - mask) * x2; mask [b or 1, 1, h, w] (resized to x's size with nearest if
    needed)."""
    if mask.shape[-2:] != x.shape[-2:]:
        mask = F.interpolate(mask, size=x.shape[-2:], mode="nearest")
    mask = mask.to(x.dtype)
    return mask * x + (1 - mask) * x2


def multimix(z: torch.Tensor, y: torch.Tensor, lam: torch.Tensor):
    """z [b, d], y [b, c], lam [b, n] (columns on the simplex) -> (lam^T z [n, d], lam^T y [n,
    c])."""
    with autocast_off(y.device):  # the targets in fp32
        y_mix = lam.t().to(y.dtype) @ y
    return lam.to(z.dtype).t() @ z, y_mix


def dense_multimix(z: torch.Tensor, y: torch.Tensor, attn: torch.Tensor, lam: torch.Tensor):
    """Dense MultiMix interpolation, eqs. (10)-(13).

    z [b, d, r], y [b, c], attn [b, r] >= 0, lam [r, b, n] ->
    (z_mix [n, d, r], y_mix [n, c, r], weight [n, r]) with weight = column sums s^j of M^j.
    """
    mhat, s = dense_mix_weights(attn, lam)
    z_mix = torch.einsum("bdr,rbn->ndr", z, mhat.to(z.dtype))
    with autocast_off(y.device):  # the targets in fp32
        y_mix = torch.einsum("bc,rbn->ncr", y.to(mhat.dtype), mhat)
    return z_mix, y_mix, s.t()


def align(a: torch.Tensor, a2: torch.Tensor, eps: float = 0.1, n_iters: int = 100,
          tol: float | None = None) -> torch.Tensor:
    """AlignMix eq. (12): A2 aligned to A. a, a2 [b, c, r] -> A2 R^T [b, c, r] with R = r P*,
    P* the Sinkhorn plan for m_ij = ||a_i - a2_j||^2 (detached: no gradient through the plan).
    Column i of the result is a convex combination of A2's columns matched to column i of A.
    """
    r = a.shape[-1]
    with torch.no_grad():
        plan = sinkhorn(feature_cost(a.detach(), a2.detach()), eps, n_iters, tol) * r
    return torch.bmm(a2, plan.transpose(1, 2).to(a2.dtype))


def puzzle_mask(sal: torch.Tensor, sal2: torch.Tensor, dv: torch.Tensor, dh: torch.Tensor,
                lam: float, beta: float = 1.2, gamma: float = 0.5, eta: float = 0.2,
                n_labels: int = 3, solver: str = "auto",
                threads: int | None = None) -> torch.Tensor:
    """The PuzzleMix mask [b, g, g] (values in {0, 1/(L-1), ..., 1}, 1 = the first image): the
    official `graphcut_multi` on the energy of `puzzle_energy`."""
    return puzzle_masks(sal, sal2, dv, dh, [lam], beta, gamma, eta, n_labels, solver, threads)[0]


def puzzle_mix(x: torch.Tensor, sal_map: torch.Tensor, perm: torch.Tensor, grid: int, lam: float,
               beta: float = 1.2, gamma: float = 0.5, eta: float = 0.2, neigh_size: int = 2,
               n_labels: int = 3, transport: bool = True, t_eps: float = 0.8, solver: str = "auto",
               pixels: torch.Tensor | None = None, fill: torch.Tensor | float = 0.0,
               threads: int | None = None, t_size: int = -1):
    """One PuzzleMix batch, as the official `mixup_graph` (no adversarial noise).

    x [b, C, h, w] the images that are mixed; sal_map [b, h, w] (`saliency_map`); perm [b]; grid g
    dividing h = w; lam the mixing weight of the prior. pixels: x in pixel units (0..1) for the
    smoothness term (default x); fill: the value of an empty transport place (see
    `apply_transport`);
    t_size: the transport resolution in pixels (`transport_grid`; -1 = the mask's blocks).
    -> (mixed [b, C, h, w], ratio [b] = mask mean = label weight of x, mask [b, g, g]).
    """
    mixed, ratio, masks = puzzle_mix_many(x, sal_map, perm, grid, [lam], beta, gamma, eta,
                                          neigh_size, n_labels, transport, t_eps, solver, pixels,
                                          fill, threads, t_size)
    return mixed, ratio, masks[0]
