"""The math of every mixing method, as pure functions over tensors.

Conventions
- A mini-batch has b examples; `perm` is a LongTensor [b] (the partner of example i is `perm[i]`).
- Targets are soft label matrices y [b, c] whose rows sum to 1 (`one_hot`).
- `lam` is the weight of the *first* input: mix(x, x', lam) = lam * x + (1 - lam) * x'.
- Randomness is passed in: every sampler takes a `torch.Generator` (on the device where the draws
  are wanted) or the draw itself (a box centre, a lam), nothing here touches a global RNG, so a test can
  pin every draw.
- Nothing here reads a value back from the device except PuzzleMix's graph cut, which runs on the host by
  the authors' algorithm (one transfer per batch: `puzzle_masks`): no `.item()`, no loop on a device value,
  no shape that depends on the data.
- Images are [b, 3, h, w] in [0, 1]; masks are [b, 1, h, w] with 1 = keep the first image.
- Under autocast (bf16 / fp16 training) the feature mixes run in the features' dtype, while the math that must
  stay fp32 runs with autocast off (`mixup_transfer.core.runtime.autocast_off`; a `.float()` operand of a matmul or
  einsum would otherwise be cast back): the soft targets (rows sum to 1), the mixed-logit losses of MultiMix and Dense
  MultiMix (their log-softmax of Lambda-weighted logits) and Dense MultiMix's attention.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from mixup_transfer.core.runtime import autocast_off, local_world_size, usable_cpus

# --------------------------------------------------------------------------------------------------
# Sampling (Gamma / Beta / Dirichlet with an explicit generator)
# --------------------------------------------------------------------------------------------------


def sample_log_gamma(alpha: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """log of Gamma(alpha, 1) draws, elementwise; alpha > 0, any shape, drawn with `generator`.

    torch's Gamma sampler (Marsaglia & Tsang's rejection loop runs inside the kernel, per entry, so no
    shape depends on the data and nothing is read back from the device) on a = alpha + 1 where alpha < 1,
    with the boost Gamma(alpha) = Gamma(alpha + 1) * U^(1/alpha); returned in the log domain so that small
    alphas never underflow to 0 (Dirichlet weights are a softmax of these). alpha is not checked here
    (that would read the device): the samplers below check their float parameters.
    """
    alpha = alpha.to(torch.float32) if not alpha.is_floating_point() else alpha
    boost = alpha < 1
    a = torch.where(boost, alpha + 1, alpha)
    out = torch.log(torch._standard_gamma(a, generator=generator))  # a >= 1: never 0
    u = torch.rand(alpha.shape, generator=generator, device=a.device, dtype=a.dtype).clamp_min(1e-30)
    return torch.where(boost, out + torch.log(u) / alpha, out)


def _check_shape(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0 (a Gamma / Beta / Dirichlet shape parameter), got {value}")


def sample_beta(alpha: float, beta: float, size, generator: torch.Generator | None = None,
                device=None) -> torch.Tensor:
    """Beta(alpha, beta) draws of shape `size` (float32), via two Gamma draws (made in one call)."""
    _check_shape("alpha", alpha)
    _check_shape("beta", beta)
    size = (size,) if isinstance(size, int) else tuple(size)
    shape = torch.full((2, *size), float(alpha), device=device)
    shape[1] = float(beta)
    ga, gb = sample_log_gamma(shape, generator)
    return torch.sigmoid(ga - gb)


def sorted_betas(k: int, alpha: float, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """multi-mix: K draws from Beta(alpha, alpha) sorted ascending, lam_1 <= ... <= lam_K. [K]"""
    return torch.sort(sample_beta(alpha, alpha, k, generator, device)).values


def dirichlet_weights(b: int, n: int, alpha_low: float = 0.5, alpha_high: float = 2.0,
                      generator: torch.Generator | None = None, m: int | None = None,
                      sets: int | None = None, device=None) -> torch.Tensor:
    """MultiMix interpolation matrix Lambda [b, n] (or [sets, b, n]); every column on the simplex.

    Column k ~ Dir(alpha_k * 1_m) with alpha_k ~ U[alpha_low, alpha_high] drawn per column
    (alpha_low == alpha_high gives a fixed alpha). With m < b each column is supported on its own
    uniformly random m-subset of the b examples (zeros elsewhere), as in the paper's m ablation.
    `sets` adds a leading dimension of independent matrices (one per spatial position, Dense MultiMix).
    """
    if not 1 <= (m or b) <= b:
        raise ValueError(f"m must be in [1, b={b}], got {m}")
    _check_shape("alpha_low", alpha_low)
    if alpha_high < alpha_low:
        raise ValueError(f"alpha_high ({alpha_high}) must be >= alpha_low ({alpha_low})")
    lead = () if sets is None else (sets,)
    u = torch.rand(lead + (1, n), generator=generator, device=device)
    alpha = alpha_low + (alpha_high - alpha_low) * u
    logg = sample_log_gamma(alpha.expand(lead + (b, n)).contiguous(), generator)
    if m is not None and m < b:
        scores = torch.rand(lead + (b, n), generator=generator, device=device)
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep.scatter_(-2, scores.topk(m, dim=-2).indices, True)
        logg = logg.masked_fill(~keep, float("-inf"))
    return torch.softmax(logg, dim=-2)


# --------------------------------------------------------------------------------------------------
# Targets and losses
# --------------------------------------------------------------------------------------------------


def one_hot(labels: torch.Tensor, num_classes: int, dtype=torch.float32) -> torch.Tensor:
    """labels [b] int -> y [b, c]. A scatter into zeros: no int64 intermediate, and on CUDA no range check read
    back to the host (an out-of-range label fails the scatter's own bounds check instead)."""
    y = torch.zeros(*labels.shape, num_classes, dtype=dtype, device=labels.device)
    return y.scatter_(-1, labels.long().unsqueeze(-1), 1)


def soft_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """H(Y, softmax(logits)) averaged over rows. logits, y: [n, c]."""
    return -(y * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def dense_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy at every position with the example's (mixed) target, averaged over examples
    and positions ("dense loss", MultiMix paper Table 10). logits [n, c, r], y [n, c]."""
    logp = F.log_softmax(logits.float(), dim=1)
    return -(y.unsqueeze(-1) * logp).sum(1).mean()


def weighted_dense_cross_entropy(logits: torch.Tensor, y_mix: torch.Tensor,
                                 weight: torch.Tensor) -> torch.Tensor:
    """Eq. (14) of the MultiMix paper at every position j, averaged over positions.

    logits, y_mix: [n, c, r]; weight s: [n, r]. Per position: -sum_k s_k sum_c y log p / sum_k s_k.
    """
    logp = F.log_softmax(logits.float(), dim=1)
    per = -(y_mix * logp).sum(1)  # [n, r]
    return ((per * weight).sum(0) / weight.sum(0).clamp_min(1e-12)).mean()


# --------------------------------------------------------------------------------------------------
# Pairwise mixing: input / manifold mixup, CutMix, multi-mix nested boxes
# --------------------------------------------------------------------------------------------------


def _lam_view(lam, x: torch.Tensor):
    if isinstance(lam, torch.Tensor):
        return (lam.view(-1, *([1] * (x.ndim - 1))) if lam.ndim == 1 else lam).to(x.dtype)
    return lam


def mixup(x: torch.Tensor, perm: torch.Tensor, lam) -> torch.Tensor:
    """lam * x + (1 - lam) * x[perm]. x [b, ...] floating; lam a float, 0-d tensor or [b] tensor.

    Also mixes targets: mixup(y, perm, lam) gives the mixed soft labels. Computed as one `torch.lerp` from the
    partner (x[perm] + lam (x - x[perm])), in place on the gathered copy: one new tensor instead of four.
    """
    return x.index_select(0, perm).lerp_(x, _lam_view(lam, x))


def multi_mixup(x: torch.Tensor, perm: torch.Tensor, lams: torch.Tensor) -> torch.Tensor:
    """multi-mix: K mixes of every pair at once. x [b, ...], lams [K] -> [K * b, ...] (block k uses lam_k)."""
    lam = lams.to(x.dtype).view(-1, 1, *([1] * (x.ndim - 1)))
    return (lam * x.unsqueeze(0) + (1 - lam) * x[perm].unsqueeze(0)).flatten(0, 1)


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


def nested_boxes(h: int, w: int, lams: torch.Tensor, generator: torch.Generator | None = None, centre=None):
    """multi-mix CutMix: K boxes sharing one uniform centre, box k of size (h sqrt(lam_k), w sqrt(lam_k)),
    clipped. Box k is the region of x replaced by x'. With sorted lams the boxes are nested.

    Returns (boxes LongTensor [K, 4] as (y0, y1, x0, x1), lam_kept [K] = 1 - area_k / (h w)).
    `centre` = (cy, cx) gives the draw explicitly. `nested_box_list` is the same on host numbers.
    """
    cy, cx = centre if centre is not None else _centre(h, w, generator)
    boxes, kept = nested_box_list(h, w, lams.tolist(), (cy, cx))
    return torch.tensor(boxes, dtype=torch.long), torch.tensor(kept)


def nested_box_list(h: int, w: int, lams, centre) -> tuple[list[tuple[int, int, int, int]], list[float]]:
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


def host_to_device(values, device=None, dtype=torch.float32) -> torch.Tensor:
    """Host numbers (a sequence or numpy array) as a tensor on `device`, copied without waiting for the device
    (a pinned buffer and a non-blocking copy on CUDA; a plain pageable copy would synchronise)."""
    t = torch.as_tensor(np.asarray(values), dtype=dtype)
    device = torch.device(device) if device is not None else t.device
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def box_mask(h: int, w: int, box, device=None, dtype=torch.float32) -> torch.Tensor:
    """[1, 1, h, w] mask: 1 outside the box (first image kept), 0 inside. box = (y0, y1, x0, x1)."""
    y0, y1, x0, x1 = (int(v) for v in box)
    m = torch.ones(1, 1, h, w, device=device, dtype=dtype)
    m[..., y0:y1, x0:x1] = 0
    return m


def mask_mix(x: torch.Tensor, x2: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mask * x + (1 - mask) * x2; mask [b or 1, 1, h, w] (resized to x's size with nearest if needed)."""
    if mask.shape[-2:] != x.shape[-2:]:
        mask = F.interpolate(mask, size=x.shape[-2:], mode="nearest")
    mask = mask.to(x.dtype)
    return mask * x + (1 - mask) * x2


# --------------------------------------------------------------------------------------------------
# MultiMix and Dense MultiMix (eqs. (6)-(7), (9)-(14) of the MultiMix paper)
# --------------------------------------------------------------------------------------------------


def multimix(z: torch.Tensor, y: torch.Tensor, lam: torch.Tensor):
    """z [b, d], y [b, c], lam [b, n] (columns on the simplex) -> (lam^T z [n, d], lam^T y [n, c])."""
    with autocast_off(y.device):  # the targets in fp32
        y_mix = lam.t().to(y.dtype) @ y
    return lam.to(z.dtype).t() @ z, y_mix


def multimix_loss_from_logits(logits: torch.Tensor, labels: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """The fast path of MultiMix with hard labels: H(Y Lambda, softmax(g(Z) Lambda)).

    logits [b, c] = g(Z) (bias included: columns of Lambda sum to 1, so g(Z Lambda) = g(Z) Lambda),
    labels [b] int, lam [b, n]. Never forms the n x c mixed targets: for one-hot y,
    sum_c (Y lam_k)_c log p_kc = sum_i lam_ik log p_k[label_i].
    """
    with autocast_off(logits.device):
        logp = F.log_softmax(lam.t().float() @ logits.float(), dim=-1)  # [n, c]
        return -(logp[:, labels] * lam.t().float()).sum(1).mean()


def dense_attention(z: torch.Tensor, kind: str = "gap_l1relu", fc_weight: torch.Tensor | None = None,
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
        raise ValueError(f"unknown attention {kind!r}; valid: gap_l1relu, gap_softmax, cam_l1relu, "
                         "cam_softmax, uniform") from None
    if u_kind == "cam" and (fc_weight is None or y is None):
        raise ValueError("cam attention needs fc_weight and y")
    with autocast_off(z.device):  # in z's dtype (fp32 as the methods call it), whatever autocast says
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


def dense_multimix_loss_from_logits(logits: torch.Tensor, y: torch.Tensor, mhat: torch.Tensor,
                                    s: torch.Tensor, weight_total: torch.Tensor | None = None) -> torch.Tensor:
    """The fast path of Dense MultiMix: mix the b dense logit maps instead of the embeddings.

    logits [b, c, r] (fc applied as a 1x1 conv, bias included: columns of Mhat sum to 1, so
    g(Z Mhat) = g(Z) Mhat), y [b, c], mhat [r, b, n], s [r, n]. Equals
    weighted_dense_cross_entropy(fc(z_mix), y_mix, weight) without ever forming z_mix or y_mix:
    sum_c y_mix log p = sum_i Mhat_ik (y_i . log p_k). `y` may also be hard labels [b] (int), then
    y_i . log p_k is a gather instead of a product with the b x c targets. weight_total [r]: the
    per-position denominator sum_k s_k (default: over these n columns; MultiMix global_batch passes the
    sum over every rank's columns).
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


# --------------------------------------------------------------------------------------------------
# AlignMix: entropic optimal transport between feature tensors
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def sinkhorn(cost: torch.Tensor, eps: float = 0.1, n_iters: int = 100, tol: float | None = None,
             return_info: bool = False):
    """Entropic OT plan with uniform marginals, in the log domain.

    cost [B, r, r] -> P [B, r, r] = argmin <P, M> - eps H(P) s.t. P 1 = P^T 1 = 1/r, by Sinkhorn-Knopp
    (each iteration a row then a column normalisation, so the columns are exact and the rows carry
    the remaining error) on log K = -M / eps, so raw squared distances with a small eps never
    underflow. No gradient.

    n_iters: the most iterations. tol: stop early, as the official AlignMix code does (its threshold
    is 0.1), once eps * mean over the batch of sum_i |change of the row potential| < tol (None: run
    all n_iters). The stop is decided on the device: the potentials freeze at the iteration that meets
    tol and the remaining iterations change nothing (the same plan as breaking there, without reading the
    criterion back every iteration; it costs the full n_iters of arithmetic). return_info: also return
    {"iters", "row_err", "col_err"} as 0-d tensors (read them when logging): the iterations that changed
    the plan and the marginal errors max |r P 1 - 1| and max |r P^T 1 - 1| over the batch, so a user can
    see whether the plan converged.
    """
    cost = cost.float()
    B, r, c = cost.shape
    logk = -cost / eps
    log_a = torch.full((B, r), -math.log(r), device=cost.device)
    log_b = torch.full((B, c), -math.log(c), device=cost.device)
    u = torch.zeros_like(log_a)
    v = torch.zeros_like(log_b)
    iters = torch.full((), n_iters if tol is None else 0, dtype=torch.long, device=cost.device)
    done = torch.zeros((), dtype=torch.bool, device=cost.device)
    for _ in range(n_iters):
        u_new = log_a - torch.logsumexp(logk + v.unsqueeze(1), dim=2)
        v_new = log_b - torch.logsumexp(logk + u_new.unsqueeze(2), dim=1)
        if tol is None:
            u, v = u_new, v_new
            continue
        iters = iters + (~done).long()
        converged = eps * (u_new - u).abs().sum(-1).mean() < tol
        u, v = torch.where(done, u, u_new), torch.where(done, v, v_new)
        done = done | converged
    plan = torch.exp(u.unsqueeze(2) + logk + v.unsqueeze(1))
    if not return_info:
        return plan
    info = {"iters": iters, "row_err": (plan.sum(2) * r - 1).abs().max(),
            "col_err": (plan.sum(1) * c - 1).abs().max()}
    return plan, info


def feature_cost(a: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """m_ij = ||a_i - a2_j||^2 between the columns of a, a2 [b, c, r] -> [b, r, r] (eq. 7), computed
    from differences (not the |a|^2 + |b|^2 - 2ab expansion, which loses digits that exp(-m / 0.1)
    amplifies)."""
    d = torch.cdist(a.float().transpose(1, 2), a2.float().transpose(1, 2), compute_mode="donot_use_mm_for_euclid_dist")
    return d**2


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


def aligned_mix(a: torch.Tensor, perm: torch.Tensor, lam: float, branch: int, eps: float = 0.1,
                n_iters: int = 100, tol: float | None = None):
    """AlignMix feature-tensor mixing, as the official `mixup_aligned` (AlignMixup_CVPR22,
    imagenet/models/resnet50_classifier.py): one plan P for the cost between A (columns of a) and
    A' = a[perm], R = r P (detached), then
      branch 0 (eq. 12): lam * A + (1 - lam) * A' R^T   (A' aligned to A),
      branch 1 (eq. 13): lam * A R + (1 - lam) * A'     (A aligned to A').
    Either way the target is lam * y + (1 - lam) * y[perm].

    a [b, c, r] -> (mixed [b, c, r], sinkhorn info dict: iters, row_err, col_err).
    """
    if branch not in (0, 1):
        raise ValueError(f"aligned_mix branch must be 0 or 1, got {branch}")
    a2 = a[perm]
    r = a.shape[-1]
    with torch.no_grad():
        plan, info = sinkhorn(feature_cost(a.detach(), a2.detach()), eps, n_iters, tol, return_info=True)
        plan = (plan * r).to(a.dtype)
    if branch == 0:
        return lam * a + (1 - lam) * torch.matmul(a2, plan.transpose(1, 2)), info
    return lam * torch.matmul(a, plan) + (1 - lam) * a2, info


# --------------------------------------------------------------------------------------------------
# PuzzleMix (Kim et al., ICML 2020), equal to the official code (snu-mllab/PuzzleMix, mixup.py at
# e2dbf3a: mixup_graph, graphcut_multi, mask_transport, transport_image); tests/test_mixing.py compares
# every piece with tests/fixtures/puzzlemix_official.npz, produced by running that code.
# --------------------------------------------------------------------------------------------------


def saliency_map(grad: torch.Tensor) -> torch.Tensor:
    """PuzzleMix saliency: sqrt(mean over channels of grad^2). grad [b, C, h, w] -> [b, h, w].
    The official training script differentiates the clean loss (model in eval mode) w.r.t. the
    *normalised* input, so `grad` is that gradient."""
    return torch.sqrt(torch.mean(grad**2, dim=1))


def saliency_grid(sal: torch.Tensor, grid: int) -> torch.Tensor:
    """Saliency map [b, h, w] average-pooled to grid x grid blocks (h, w divisible by grid) and
    normalised to sum 1 per image -> [b, grid, grid]. An all-zero map (a gradient that underflowed) becomes
    uniform, 1 / grid^2 per block, instead of 0 / 0."""
    b = sal.shape[0]
    pooled = F.avg_pool2d(sal, sal.shape[-1] // grid)
    total = pooled.reshape(b, -1).sum(1).reshape(b, 1, 1)
    return torch.where(total > 0, pooled / total.clamp_min(torch.finfo(pooled.dtype).tiny), 1.0 / grid**2)


def boundary_differences(pix: torch.Tensor, pix2: torch.Tensor, grid: int, neigh_size: int = 2):
    """Local-statistics term: for every pair of neighbouring blocks (p above/left of q) and every
    choice of the image each shows, the mean absolute difference across their common boundary of the
    images average-pooled by `neigh_size` (clipped to the block size).

    pix, pix2 [b, 3, h, w] in pixel units (0..1; the first image and its partner) ->
    (dv [b, 2, 2, g-1, g], dh [b, 2, 2, g, g-1]); index [s_p, s_q] with 1 = first image, 0 = partner.
    """
    block = pix.shape[-1] // grid
    neigh = min(neigh_size, block)
    if block % neigh:
        raise ValueError(f"PuzzleMix: the block side {block} (input {pix.shape[-1]} / grid {grid}) must be a "
                         f"multiple of neigh_size {neigh} (as in the official code)")
    k = block // neigh
    pooled = {1: F.avg_pool2d(pix, neigh), 0: F.avg_pool2d(pix2, neigh)}
    b = pix.shape[0]
    dv = pix.new_zeros(b, 2, 2, grid - 1, grid)
    dh = pix.new_zeros(b, 2, 2, grid, grid - 1)
    for sp in (0, 1):
        for sq in (0, 1):
            top, bot = pooled[sp], pooled[sq]
            across_v = (top[:, :, :-1, :] - bot[:, :, 1:, :])[:, :, k - 1::k, :]
            across_h = (top[:, :, :, :-1] - bot[:, :, :, 1:])[:, :, :, k - 1::k]
            dv[:, sp, sq] = F.avg_pool2d(across_v.abs().mean(1), kernel_size=(1, k))
            dh[:, sp, sq] = F.avg_pool2d(across_h.abs().mean(1), kernel_size=(k, 1))
    return dv, dh


def mixing_prior(lam: float, n_labels: int = 3, eps: float = 1e-8) -> np.ndarray:
    """-log p(label) for graph label i (mask value 1 - i / (L-1)): p = Binomial(L-1, lam) of the
    number of partner halves, C(L-1, i) lam^(L-1-i) (1-lam)^i. float64 [L]."""
    nl = n_labels - 1
    p = [math.comb(nl, i) * lam ** (nl - i) * (1 - lam) ** i for i in range(n_labels)]
    return -np.log(np.array(p) + eps)


def puzzle_energy(sal: torch.Tensor, sal2: torch.Tensor, dv: torch.Tensor, dh: torch.Tensor, lam: float,
                  beta: float = 1.2, gamma: float = 0.5, eta: float = 0.2, n_labels: int = 3):
    """The integer graph-cut problem of one batch, built like the official `mixup_graph` +
    `graphcut_multi`: the four-entry pairwise tables (beta * gamma * boundary differences) are split
    into unary halves plus one edge weight, beta is normalised by 1 / (16 g), the prior by eta / g^2,
    and everything is multiplied by 1000 g^2 and truncated to int32.

    sal, sal2 [b, g, g] (normalised saliency of the image and of its partner), dv, dh from
    `boundary_differences`, lam the prior's weight of the first image ->
    (unary int32 [b, g, g, L], label distance float32 [L, L], w_v int32 [b, g-1, g], w_h int32 [b, g, g-1]).
    Graph label i means mask value 1 - i / (L-1) (1 = the first image).
    """
    host = read_to_host(puzzle_terms(sal, sal2, dv, dh, beta, gamma))
    return energy_from_terms(host, lam, beta, eta, n_labels)


def puzzle_terms(sal: torch.Tensor, sal2: torch.Tensor, dv: torch.Tensor, dh: torch.Tensor, beta: float = 1.2,
                 gamma: float = 0.5) -> tuple[torch.Tensor, ...]:
    """The part of `puzzle_energy` that does not depend on lam, on the device: the cost of each block showing
    the first image / the partner (show1, show2 [b, g, g], saliency plus the unary halves of the smoothness
    tables) and the edge weights (w_v [b, g-1, g], w_h [b, g, g-1], before adding the normalised beta)."""
    g = sal.shape[-1]
    beta = beta / g / 16
    dv = beta * gamma * dv
    dh = beta * gamma * dh
    show1, show2 = sal2.clone(), sal.clone()  # cost of a block showing the first image / the partner
    for tab, first, second in ((dv, (slice(None), slice(None, -1)), (slice(None), slice(1, None))),
                               (dh, (slice(None), slice(None), slice(None, -1)),
                                (slice(None), slice(None), slice(1, None)))):
        # p (above / left) showing image s_p pays the mean over q's choice; q likewise over p's
        show1[first] += (tab[:, 1, 0] + tab[:, 1, 1]) / 2.0
        show2[first] += (tab[:, 0, 1] + tab[:, 0, 0]) / 2.0
        show1[second] += (tab[:, 0, 1] + tab[:, 1, 1]) / 2.0
        show2[second] += (tab[:, 1, 0] + tab[:, 0, 0]) / 2.0
    w_v = (dv[:, 1, 0] + dv[:, 0, 1] - dv[:, 1, 1] - dv[:, 0, 0]) / 2
    w_h = (dh[:, 1, 0] + dh[:, 0, 1] - dh[:, 1, 1] - dh[:, 0, 0]) / 2
    return show1, show2, w_v, w_h


def read_to_host(tensors) -> list[np.ndarray]:
    """float32 numpy copies of `tensors` in one device-to-host transfer (the one read of a PuzzleMix batch)."""
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors]).numpy(force=True)
    out, i = [], 0
    for t in tensors:
        out.append(flat[i:i + t.numel()].reshape(tuple(t.shape)))
        i += t.numel()
    return out


def energy_from_terms(host: list[np.ndarray], lam: float, beta: float = 1.2, eta: float = 0.2, n_labels: int = 3):
    """`puzzle_energy` from the host copies of `puzzle_terms` (same arguments, same integers)."""
    show1, show2, w_v, w_h = host
    g = show1.shape[-1]
    beta = beta / g / 16
    large = 1000 * g**2
    prior = eta * mixing_prior(lam, n_labels) / g**2
    s1, s2 = show1.astype(np.float64), show2.astype(np.float64)
    steps = np.linspace(0, 1, n_labels)
    unary = (large * np.stack([(1 - t) * s1 + t * s2 + prior[i] for i, t in enumerate(steps)], -1)).astype(np.int32)
    idx = np.arange(n_labels)
    dist = ((idx[:, None] - idx[None, :]) ** 2 / (n_labels - 1) ** 2).astype(np.float32)
    w_v = (large * (w_v + beta)).astype(np.int32)
    w_h = (large * (w_h + beta)).astype(np.int32)
    return unary, dist, w_v, w_h


def have_gco() -> bool:
    try:
        import gco  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


GCO_MAX_ENERGYTERM = 10_000_000  # GCoptimization.h: a larger scaled edge weight makes GCO abort the process


def _cut_gco(unary, dist, w_v, w_h) -> np.ndarray:
    if max(int(w_v.max(initial=0)), int(w_h.max(initial=0))) * 1000 > GCO_MAX_ENERGYTERM:
        raise ValueError("PuzzleMix: an edge weight exceeds what gco-wrapper accepts (it would abort the process); "
                         "lower beta / gamma (the official 1.2 / 0.5 stay 5x below it) or use solver swap")
    import gco  # noqa: PLC0415  (a dependency where its wheels exist: pip install gco-wrapper)

    return np.asarray(gco.cut_grid_graph(unary, dist, w_v, w_h, algorithm="swap")).reshape(unary.shape[:2])


def _gco_integer_terms(unary, dist, w_v, w_h):
    """The integers gco-wrapper hands to GCO for these arrays: a float label-distance matrix makes it
    treat the problem as real-valued and scale unaries by 1e5, edge weights by 1e3 and the distance
    by 1e2 (int32 arithmetic, as numpy does it)."""
    g, _, L = unary.shape
    u = (unary.reshape(g * g, L) * 100000).astype(np.intc).astype(np.int64)
    w = (np.r_[w_v.flatten(), w_h.flatten()] * 1000).astype(np.intc).astype(np.int64)
    v = (dist * 100).astype(np.intc).astype(np.int64)
    ids = np.arange(g * g).reshape(g, g)
    src = np.r_[ids[:-1, :].flatten(), ids[:, :-1].flatten()]
    dst = np.r_[ids[1:, :].flatten(), ids[:, 1:].flatten()]
    return u, v, w, src, dst


def _wrap_int32(v: np.ndarray) -> np.ndarray:
    """int64 values reduced to int32 the way C++ int arithmetic wraps (two's complement), kept as int64.

    GCO adds every term of a node's terminal capacity into one int32 (`Graph::add_tweights`), so where the
    unaries are large (gco-wrapper's unary * 1e5 already wrapped when one block carries more than about
    21.5 / g^2 of the saliency) the capacity is the exact sum modulo 2^32. INT32_MIN, whose negation GCO cannot
    represent, becomes -(2^31 - 1)."""
    w = (v + 2**31) % 2**32 - 2**31
    return np.maximum(w, -(2**31 - 1))


_ALL_BITS: dict = {}


def _sink_side_small(m: int, diff, pi, qi, cw) -> np.ndarray:
    """`_binary_cut` by Edmonds-Karp on Python integers (shortest augmenting paths), then the nodes
    that can reach the sink in the residual graph."""
    s, t = m, m + 1
    res: list[dict] = [{} for _ in range(m + 2)]

    def add(a, b, c):
        res[a][b] = res[a].get(b, 0) + c
        res[b].setdefault(a, 0)

    for p, d in enumerate(diff.tolist()):
        if d > 0:
            add(s, p, d)
        elif d < 0:
            add(p, t, -d)
    for a, b, c in zip(pi.tolist(), qi.tolist(), cw.tolist()):
        if c > 0:
            add(a, b, c)
            add(b, a, c)
    while True:
        parent, queue = {s: s}, [s]
        for x in queue:
            for y, c in res[x].items():
                if c > 0 and y not in parent:
                    parent[y] = x
                    queue.append(y)
            if t in parent:
                break
        if t not in parent:
            break
        f, y = None, t
        while y != s:
            x = parent[y]
            f = res[x][y] if f is None else min(f, res[x][y])
            y = x
        y = t
        while y != s:
            x = parent[y]
            res[x][y] -= f
            res[y][x] += f
            y = x
    reach, queue = {t}, [t]
    for y in queue:
        for x in res[y]:  # neighbours (every edge has its reverse entry)
            if x not in reach and res[x][y] > 0:
                reach.add(x)
                queue.append(x)
    return np.array([p in reach for p in range(m)], dtype=bool)


def _binary_cut(diff: np.ndarray, pi: np.ndarray, qi: np.ndarray, cw: np.ndarray) -> np.ndarray:
    """argmin over x in {0, 1}^m of sum_p diff_p x_p + sum_e cw_e [x_pi != x_qi] (cw >= 0; a negative, non-submodular
    cw is exact in the exhaustive case and left out by the max-flows), and among
    the minimisers the one with the fewest ones: the labels that can reach the sink in the residual
    graph of a max flow (what Boykov-Kolmogorov's maxflow labels SINK; the same set for every max flow).
    Exhaustive for m <= 12, a small Edmonds-Karp for m <= 64 (cheaper than scipy's call overhead
    there), else scipy's max-flow. -> bool [m] (True = 1)."""
    m = diff.shape[0]
    if m <= 12:
        if m not in _ALL_BITS:
            _ALL_BITS[m] = ((np.arange(2**m)[:, None] >> np.arange(m)[None, :]) & 1).astype(np.int64)
        bits = _ALL_BITS[m]
        e = bits @ diff + (bits[:, pi] != bits[:, qi]).astype(np.int64) @ cw
        best = bits[e == e.min()]
        return best.min(0).astype(bool)  # the intersection of the minimisers is one too (lattice)
    if m <= 64:
        return _sink_side_small(m, diff, pi, qi, cw)
    import scipy.sparse as sp  # noqa: PLC0415
    from scipy.sparse.csgraph import maximum_flow  # noqa: PLC0415

    s, t = m, m + 1
    cap = np.zeros((m + 2, m + 2), np.int64)
    cap[s, :m] = np.maximum(diff, 0)  # cut when p takes 1 (sink side)
    cap[:m, t] = np.maximum(-diff, 0)  # cut when p takes 0 (source side)
    np.add.at(cap, (pi, qi), np.maximum(cw, 0))  # a negative edge is left out, as in `_sink_side_small`
    np.add.at(cap, (qi, pi), np.maximum(cw, 0))
    # terminal capacities are int32 already (`_wrap_int32`); an edge can exceed it only with weights GCO refuses
    cap = np.minimum(cap, 2**31 - 1)
    flow = maximum_flow(sp.csr_matrix(cap.astype(np.int32)), s, t).flow.toarray()
    residual = (cap - flow) > 0  # flow is antisymmetric: reverse edges gain the flow
    reach = np.zeros(m + 2, bool)
    reach[t] = True
    while True:
        grown = reach | residual[:, reach].any(1)
        if (grown == reach).all():
            break
        reach = grown
    return reach[:m]


_WARNED: set = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _cut_swap(unary, dist, w_v, w_h) -> np.ndarray:
    """The built-in fallback: GCO's alpha-beta swap (initial labels 0; per cycle the pairs (a, b) in
    GCO's order; each move an exact min cut; the labels that can still reach the sink in the residual
    graph take b, as in Boykov-Kolmogorov's maxflow; cycles until the energy stops decreasing) on the
    same integers, in GCO's int32 arithmetic: gco-wrapper's scaled unaries and every node's terminal capacity
    wrap as there (`_wrap_int32`), so the masks equal gco's also where one block holds a large share of the
    saliency. A negative edge weight (gamma > 1 can make one) is a non-submodular move GCO's max-flow does not
    define: the solver then warns once that the masks may differ from gco's."""
    u, v, w, src, dst = _gco_integer_terms(unary, dist, w_v, w_h)
    if (w < 0).any():
        _warn_once("negative", "PuzzleMix swap solver: a negative edge weight (gamma > 1 makes the energy "
                               "non-submodular); the masks may differ from gco-wrapper's there")
    n, L = u.shape
    lab = np.zeros(n, np.int64)
    rows = np.arange(n)

    def energy(lab):
        return int(u[rows, lab].sum() + (w * v[lab[src], lab[dst]]).sum())

    def move(a, b):
        act = (lab == a) | (lab == b)
        m = int(act.sum())
        if m == 0:
            return
        ids = np.flatnonzero(act)
        loc = np.full(n, -1)
        loc[ids] = np.arange(m)
        e0, e1 = u[ids, a].copy(), u[ids, b].copy()
        inner = act[src] & act[dst]
        for x, y in ((src, dst), (dst, src)):  # edges to fixed neighbours become unary terms
            half = act[x] & ~act[y]
            np.add.at(e0, loc[x[half]], w[half] * v[a, lab[y[half]]])
            np.add.at(e1, loc[x[half]], w[half] * v[b, lab[y[half]]])
        diff = _wrap_int32(e1 - e0)  # extra cost of taking b, as GCO's int32 terminal capacity holds it
        pi, qi, cw = loc[src[inner]], loc[dst[inner]], w[inner] * v[a, b]
        lab[ids] = np.where(_binary_cut(diff, pi, qi, cw), b, a)

    pairs = [(i, j) for i in range(L) for j in range(L - 1, -1, -1) if i < j]
    e_new, e_old = energy(lab), None
    while e_old is None or e_old > e_new:
        e_old = e_new
        for a, b in pairs:
            move(a, b)
        e_new = energy(lab)
    return lab.reshape(unary.shape[:2])


_POOL: dict = {}


def _pool(threads: int):
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    if threads not in _POOL:
        _POOL[threads] = ThreadPoolExecutor(threads)
    return _POOL[threads]


def grid_labels(unary, dist, w_v, w_h, solver: str = "auto", threads: int | None = None) -> np.ndarray:
    """Solve the b graph cuts of `puzzle_energy`'s output -> labels int [b, g, g].
    solver: "gco" (gco-wrapper's alpha-beta swap, what the authors call), "swap" (the built-in
    re-implementation of the same algorithm on the same integers) or "auto" (gco if installed).
    threads: solve the b problems in a thread pool (gco releases the GIL); None = min(b, the CPUs this process may
    use shared by the node's processes)."""
    if solver == "auto":
        solver = "gco" if have_gco() else "swap"
    if solver not in ("gco", "swap"):
        raise ValueError(f"unknown PuzzleMix solver {solver!r}; valid: auto, gco, swap")
    fn = _cut_gco if solver == "gco" else _cut_swap
    b = unary.shape[0]
    if threads is None:
        threads = min(b, max(1, usable_cpus() // local_world_size()))
    if threads <= 1 or b == 1:
        return np.stack([fn(unary[i], dist, w_v[i], w_h[i]) for i in range(b)])
    return np.stack(list(_pool(threads).map(fn, unary, [dist] * b, w_v, w_h)))


def puzzle_mask(sal: torch.Tensor, sal2: torch.Tensor, dv: torch.Tensor, dh: torch.Tensor, lam: float,
                beta: float = 1.2, gamma: float = 0.5, eta: float = 0.2, n_labels: int = 3,
                solver: str = "auto", threads: int | None = None) -> torch.Tensor:
    """The PuzzleMix mask [b, g, g] (values in {0, 1/(L-1), ..., 1}, 1 = the first image): the
    official `graphcut_multi` on the energy of `puzzle_energy`."""
    return puzzle_masks(sal, sal2, dv, dh, [lam], beta, gamma, eta, n_labels, solver, threads)[0]


def puzzle_masks(sal: torch.Tensor, sal2: torch.Tensor, dv: torch.Tensor, dh: torch.Tensor, lams,
                 beta: float = 1.2, gamma: float = 0.5, eta: float = 0.2, n_labels: int = 3,
                 solver: str = "auto", threads: int | None = None) -> torch.Tensor:
    """`puzzle_mask` for K prior weights lams (host floats) -> [K, b, g, g]. The graph cut runs on the host (the
    authors' algorithm): the lam-independent terms are read once (one device-to-host transfer for all K) and the
    masks go back with a non-blocking copy."""
    host = read_to_host(puzzle_terms(sal, sal2, dv, dh, beta, gamma))
    labs = [grid_labels(*energy_from_terms(host, float(lam), beta, eta, n_labels), solver, threads) for lam in lams]
    return 1.0 - host_to_device(np.stack(labs), sal.device) / (n_labels - 1)


def transport_cost(g: int, device=None) -> torch.Tensor:
    """Squared grid distance between block positions / (g - 1)^2. -> [g*g, g*g] float32."""
    r = torch.arange(g, device=device)  # built on the device: a host-built tensor would be a blocking copy
    pos = torch.stack(torch.meshgrid(r, r, indexing="ij"), -1).view(-1, 2)
    d2 = ((pos.unsqueeze(1) - pos.unsqueeze(0)) ** 2).sum(-1)
    return d2.float() / (g - 1) ** 2


def transport_plan(sal: torch.Tensor, mask: torch.Tensor, t_eps: float = 0.8) -> torch.Tensor:
    """PuzzleMix transport (official `mask_transport`): cost of moving block i to place j is
    t_eps * |pos_i - pos_j|^2 / (g-1)^2 - sal_i * 1[mask_j > 0]; g rounds of: every block picks its
    cheapest place, each place keeps the row of the lowest entry of its column of (claims * cost), losers
    pay +1 on that place. The last round's winners are the plan. As in the official code a place
    whose claims all cost >= 0 ties with the zeros of the non-claims and goes to row 0 (to nobody
    unless block 0 claimed it); such places are invisible to this image (mask 0) in practice.

    sal, mask [b, g, g] -> plan [b, g*g, g*g] in {0, 1}: plan[i, j] = 1 moves block i to place j;
    a row may be empty (block dropped) and a column too (place left empty).
    """
    b, g, _ = sal.shape
    n = g * g
    visible = (mask > 0).float().reshape(-1, 1, n)
    cost = t_eps * transport_cost(g, sal.device).unsqueeze(0) - sal.reshape(-1, n, 1) * visible
    win = torch.zeros_like(cost)
    for _ in range(g):
        pick = torch.zeros_like(cost).scatter_(-1, cost.min(-1)[1].unsqueeze(-1), 1)
        claimed = pick * cost
        win = torch.zeros_like(cost).scatter_(-2, claimed.min(-2)[1].unsqueeze(-2), 1) * pick
        cost += (1 - win) * pick
    return win


def apply_transport(x: torch.Tensor, plan: torch.Tensor, grid: int, fill: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Move blocks of x [b, C, h, w] by plan [b, g*g, g*g] (block i to place j where plan[i, j] = 1);
    places that receive nothing take `fill` (the official code leaves them 0 in the normalised input,
    i.e. the dataset mean: pass the mean [1, C, 1, 1] when x is in pixel units)."""
    b, C, h, w = x.shape
    bh, bw = h // grid, w // grid
    blocks = x.reshape(b, C, grid, bh, grid, bw).permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, C, bh, bw)
    has, src = plan.max(1)  # per place: is it filled, and by which block
    out = blocks.gather(1, src.view(b, -1, 1, 1, 1).expand(-1, -1, C, bh, bw))
    out = out.view(b, grid, grid, C, bh, bw).permute(0, 3, 1, 4, 2, 5).reshape(b, C, h, w)
    filled = has.view(b, 1, grid, 1, grid, 1).expand(b, 1, grid, bh, grid, bw).reshape(b, 1, h, w) > 0
    if not isinstance(fill, torch.Tensor):  # a number stays a kernel argument (no host-to-device copy)
        return torch.where(filled, out, float(fill))
    fill = fill.to(x.dtype)
    return torch.where(filled, out, fill.expand_as(out) if fill.ndim else fill)


def transport_grid(width: int, grid: int, t_size: int = -1) -> int:
    """The grid the PuzzleMix transport runs on (official `mixup_graph`): t_size = -1 (the official default) or
    min(t_size, block) equal to the block side -> the mask grid; a smaller t_size -> width // t_size, the mask
    upsampled to it and the saliency re-pooled at t_size x t_size (the official CIFAR command: t_size 4)."""
    block = width // grid
    if t_size == -1 or min(t_size, block) >= block:
        return grid
    if t_size < 1 or block % t_size:
        raise ValueError(f"PuzzleMix t_size {t_size} must be -1 or a positive divisor of the block side {block} "
                         f"(input {width} / grid {grid}), as in the official code")
    return width // t_size


def puzzle_mix(x: torch.Tensor, sal_map: torch.Tensor, perm: torch.Tensor, grid: int, lam: float,
               beta: float = 1.2, gamma: float = 0.5, eta: float = 0.2, neigh_size: int = 2, n_labels: int = 3,
               transport: bool = True, t_eps: float = 0.8, solver: str = "auto", pixels: torch.Tensor | None = None,
               fill: torch.Tensor | float = 0.0, threads: int | None = None, t_size: int = -1):
    """One PuzzleMix batch, as the official `mixup_graph` (no adversarial noise).

    x [b, C, h, w] the images that are mixed; sal_map [b, h, w] (`saliency_map`); perm [b]; grid g
    dividing h = w; lam the mixing weight of the prior. pixels: x in pixel units (0..1) for the
    smoothness term (default x); fill: the value of an empty transport place (see `apply_transport`);
    t_size: the transport resolution in pixels (`transport_grid`; -1 = the mask's blocks).
    -> (mixed [b, C, h, w], ratio [b] = mask mean = label weight of x, mask [b, g, g]).
    """
    mixed, ratio, masks = puzzle_mix_many(x, sal_map, perm, grid, [lam], beta, gamma, eta, neigh_size, n_labels,
                                          transport, t_eps, solver, pixels, fill, threads, t_size)
    return mixed, ratio, masks[0]


def puzzle_mix_many(x: torch.Tensor, sal_map: torch.Tensor, perm: torch.Tensor, grid: int, lams,
                    beta: float = 1.2, gamma: float = 0.5, eta: float = 0.2, neigh_size: int = 2,
                    n_labels: int = 3, transport: bool = True, t_eps: float = 0.8, solver: str = "auto",
                    pixels: torch.Tensor | None = None, fill: torch.Tensor | float = 0.0,
                    threads: int | None = None, t_size: int = -1):
    """`puzzle_mix` for K prior weights lams (host floats) sharing the saliency, the partner and one host
    transfer -> (mixed [K*b, C, h, w], ratio [K*b], masks [K, b, g, g]); block k of the outputs uses lams[k]."""
    pixels = x if pixels is None else pixels
    sal = saliency_grid(sal_map, grid)
    sal2 = sal[perm]
    dv, dh = boundary_differences(pixels, pixels[perm], grid, neigh_size)
    masks = puzzle_masks(sal, sal2, dv, dh, lams, beta, gamma, eta, n_labels, solver, threads)
    k = len(lams)

    def rep(t):  # [b, ...] -> [K*b, ...], block k a copy
        return t if k == 1 else t.repeat(k, *([1] * (t.ndim - 1)))

    mask = masks.flatten(0, 1)
    a, a2 = rep(x), rep(x[perm])
    if transport:
        tg = transport_grid(x.shape[-1], grid, t_size)
        tmask = mask if tg == grid else F.interpolate(mask.unsqueeze(1), size=tg).squeeze(1)  # nearest
        tsal = sal if tg == grid else saliency_grid(sal_map, tg)
        a = apply_transport(a, transport_plan(rep(tsal), tmask, t_eps), tg, fill)
        a2 = apply_transport(a2, transport_plan(rep(tsal[perm]), 1 - tmask, t_eps), tg, fill)
    up = F.interpolate(mask.unsqueeze(1), size=x.shape[-1])
    ratio = up.reshape(up.shape[0], -1).mean(-1)
    return up * a + (1 - up) * a2, ratio, masks
