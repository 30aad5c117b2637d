"""The math of every mixing method, as pure functions over tensors.

Conventions
- A mini-batch has b examples; `perm` is a LongTensor [b] (the partner of example i is `perm[i]`).
- Targets are soft label matrices y [b, c] whose rows sum to 1 (`one_hot`).
- `lam` is the weight of the *first* input: mix(x, x', lam) = lam * x + (1 - lam) * x'.
- Randomness is passed in: every sampler takes a `torch.Generator` (on the device where the draws
  are wanted), nothing here touches a global RNG, so a test can pin every draw.
- Images are [b, 3, h, w] in [0, 1]; masks are [b, 1, h, w] with 1 = keep the first image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------
# Sampling (Gamma / Beta / Dirichlet with an explicit generator)
# --------------------------------------------------------------------------------------------------


def sample_log_gamma(alpha: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """log of Gamma(alpha, 1) draws, elementwise; alpha > 0, any shape, drawn with `generator`.

    Marsaglia & Tsang's rejection sampler (vectorised; rejected entries are redrawn), with the
    boost Gamma(a) = Gamma(a + 1) * U^(1/a) for a < 1. Returned in the log domain so that small
    alphas never underflow to 0 (Dirichlet weights are a softmax of these).
    """
    alpha = alpha.to(torch.float32) if not alpha.is_floating_point() else alpha
    if (alpha <= 0).any():
        raise ValueError("Gamma shape parameters must be > 0")
    boost = alpha < 1
    a = torch.where(boost, alpha + 1, alpha).flatten()
    d = a - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    out = torch.empty_like(a)
    todo = torch.arange(a.numel(), device=a.device)
    while todo.numel():
        dd, cc = d[todo], c[todo]
        x = torch.randn(dd.shape, generator=generator, device=a.device, dtype=a.dtype)
        u = torch.rand(dd.shape, generator=generator, device=a.device, dtype=a.dtype)
        v = (1 + cc * x) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * x * x + dd - dd * v + dd * torch.log(v.clamp_min(1e-30)))
        out[todo[ok]] = torch.log(dd[ok]) + torch.log(v[ok])
        todo = todo[~ok]
    out = out.view_as(alpha)
    u = torch.rand(alpha.shape, generator=generator, device=a.device, dtype=a.dtype).clamp_min(1e-30)
    return torch.where(boost, out + torch.log(u) / alpha, out)


def sample_beta(alpha: float, beta: float, size, generator: torch.Generator | None = None,
                device=None) -> torch.Tensor:
    """Beta(alpha, beta) draws of shape `size` (float32), via two Gamma draws."""
    size = (size,) if isinstance(size, int) else tuple(size)
    ga = sample_log_gamma(torch.full(size, float(alpha), device=device), generator)
    gb = sample_log_gamma(torch.full(size, float(beta), device=device), generator)
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
    """labels [b] int -> y [b, c]."""
    return F.one_hot(labels.long(), num_classes).to(dtype)


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
    if isinstance(lam, torch.Tensor) and lam.ndim == 1:
        return lam.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return lam


def mixup(x: torch.Tensor, perm: torch.Tensor, lam) -> torch.Tensor:
    """lam * x + (1 - lam) * x[perm]. x [b, ...]; lam a float, 0-d tensor or [b] tensor.

    Also mixes targets: mixup(y, perm, lam) gives the mixed soft labels.
    """
    lam = _lam_view(lam, x)
    return lam * x + (1 - lam) * x[perm]


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
    `centre` = (cy, cx) gives the draw explicitly.
    """
    cy, cx = centre if centre is not None else _centre(h, w, generator)
    boxes, kept = [], []
    for lam in lams.tolist():
        bh, bw = int(h * math.sqrt(lam)), int(w * math.sqrt(lam))
        y0, y1 = max(cy - bh // 2, 0), min(cy + bh // 2, h)
        x0, x1 = max(cx - bw // 2, 0), min(cx + bw // 2, w)
        boxes.append((y0, y1, x0, x1))
        kept.append(1.0 - (y1 - y0) * (x1 - x0) / (h * w))
    return torch.tensor(boxes, dtype=torch.long), torch.tensor(kept)


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
    lam = lam.to(z.dtype)
    return lam.t() @ z, lam.t().to(y.dtype) @ y


def multimix_loss_from_logits(logits: torch.Tensor, labels: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """The fast path of MultiMix with hard labels: H(Y Lambda, softmax(g(Z) Lambda)).

    logits [b, c] = g(Z) (bias included: columns of Lambda sum to 1, so g(Z Lambda) = g(Z) Lambda),
    labels [b] int, lam [b, n]. Never forms the n x c mixed targets: for one-hot y,
    sum_c (Y lam_k)_c log p_kc = sum_i lam_ik log p_k[label_i].
    """
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
    if u_kind == "gap":
        u = z.mean(-1)
    else:
        if fc_weight is None or y is None:
            raise ValueError("cam attention needs fc_weight and y")
        u = y.to(fc_weight.dtype) @ fc_weight
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
    y_mix = torch.einsum("bc,rbn->ncr", y.to(mhat.dtype), mhat)
    return z_mix, y_mix, s.t()


def dense_multimix_loss_from_logits(logits: torch.Tensor, y: torch.Tensor, mhat: torch.Tensor,
                                    s: torch.Tensor) -> torch.Tensor:
    """The fast path of Dense MultiMix: mix the b dense logit maps instead of the embeddings.

    logits [b, c, r] (fc applied as a 1x1 conv, bias included: columns of Mhat sum to 1, so
    g(Z Mhat) = g(Z) Mhat), y [b, c], mhat [r, b, n], s [r, n]. Equals
    weighted_dense_cross_entropy(fc(z_mix), y_mix, weight) without ever forming z_mix or y_mix:
    sum_c y_mix log p = sum_i Mhat_ik (y_i . log p_k). `y` may also be hard labels [b] (int), then
    y_i . log p_k is a gather instead of a product with the b x c targets.
    """
    mixed = torch.einsum("bcr,rbn->ncr", logits.float(), mhat.float())
    logp = F.log_softmax(mixed, dim=1)
    if y.ndim == 1:
        ylogp = logp[:, y, :].permute(2, 0, 1)  # [r, n, b]
    else:
        ylogp = torch.einsum("ncr,bc->rnb", logp, y.float())  # y_i . log p_k at each position
    per = -(ylogp * mhat.float().transpose(1, 2)).sum(-1)  # [r, n]
    w = s.float()
    return ((per * w).sum(1) / w.sum(1).clamp_min(1e-12)).mean()


# --------------------------------------------------------------------------------------------------
# AlignMix: entropic optimal transport between feature tensors
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def sinkhorn(cost: torch.Tensor, eps: float = 0.1, n_iters: int = 100) -> torch.Tensor:
    """Entropic OT plan with uniform marginals, in the log domain.

    cost [B, r, r] -> P [B, r, r] = argmin <P, M> - eps H(P) s.t. P 1 = P^T 1 = 1/r, computed with
    exactly `n_iters` Sinkhorn-Knopp iterations (each a row then a column normalisation) on
    log K = -M / eps, so raw squared distances with a small eps never underflow. No gradient.
    """
    cost = cost.float()
    B, r, c = cost.shape
    logk = -cost / eps
    log_a = torch.full((B, r), -math.log(r), device=cost.device)
    log_b = torch.full((B, c), -math.log(c), device=cost.device)
    u = torch.zeros_like(log_a)
    v = torch.zeros_like(log_b)
    for _ in range(n_iters):
        u = log_a - torch.logsumexp(logk + v.unsqueeze(1), dim=2)
        v = log_b - torch.logsumexp(logk + u.unsqueeze(2), dim=1)
    return torch.exp(u.unsqueeze(2) + logk + v.unsqueeze(1))


def align(a: torch.Tensor, a2: torch.Tensor, eps: float = 0.1, n_iters: int = 100) -> torch.Tensor:
    """AlignMix eq. (10): A2 aligned to A. a, a2 [b, c, r] -> A2 R^T [b, c, r] with R = r P*,
    P* the Sinkhorn plan for m_ij = ||a_i - a2_j||^2 (detached: no gradient through the plan).
    Column i of the result is a convex combination of A2's columns matched to column i of A.
    """
    r = a.shape[-1]
    with torch.no_grad():
        cost = torch.cdist(a.detach().float().transpose(1, 2), a2.detach().float().transpose(1, 2)) ** 2
        plan = sinkhorn(cost, eps, n_iters) * r
    return torch.bmm(a2, plan.transpose(1, 2).to(a2.dtype))


# --------------------------------------------------------------------------------------------------
# PuzzleMix pieces: saliency, 3-label mask on a block grid, greedy transport
# --------------------------------------------------------------------------------------------------


def saliency_grid(grad: torch.Tensor, grid: int) -> torch.Tensor:
    """PuzzleMix saliency: sqrt(mean over channels of grad^2), average-pooled to grid x grid blocks
    and normalised to sum 1 per image. grad [b, C, h, w] -> [b, grid, grid]."""
    sal = torch.sqrt((grad.float() ** 2).mean(1, keepdim=True))
    sal = F.adaptive_avg_pool2d(sal, grid).squeeze(1)
    return sal / sal.flatten(1).sum(-1).clamp_min(1e-12).view(-1, 1, 1)


def block_smoothness(x: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Local-statistics pairwise term: mean absolute difference of the pixels on either side of each
    block boundary. x [b, C, h, w] -> (vertical-neighbour weights [b, grid-1, grid],
    horizontal-neighbour weights [b, grid, grid-1]), in pixel units (0..1)."""
    b, _, h, w = x.shape
    bh, bw = h // grid, w // grid
    x = x[..., : bh * grid, : bw * grid].float().mean(1)  # [b, H, W]
    rows_top = x[:, bh - 1: bh * grid - 1: bh, :]  # last row of blocks 0..g-2
    rows_bot = x[:, bh: bh * grid: bh, :]
    dv = (rows_top - rows_bot).abs().view(b, grid - 1, grid, bw).mean(-1)
    cols_l = x[:, :, bw - 1: bw * grid - 1: bw]
    cols_r = x[:, :, bw: bw * grid: bw]
    dh = (cols_l - cols_r).abs().view(b, grid, bh, grid - 1).mean(2)
    return dv, dh


def puzzle_unary(sal1: torch.Tensor, sal2: torch.Tensor, lam: torch.Tensor, eta: float,
                 n_labels: int = 3) -> torch.Tensor:
    """Unary costs [b, g, g, L] for mask labels m in linspace(0, 1, L) (m = weight of image 1):
    -(m s1 + (1 - m) s2) + eta * -log p(m | lam), p = Binomial(L - 1, lam) (the mixing prior).
    sal1, sal2 [b, g, g] (normalised saliency); lam [b]."""
    labels = torch.linspace(0, 1, n_labels, device=sal1.device)
    k = torch.arange(n_labels, device=sal1.device, dtype=torch.float32)
    nl = n_labels - 1
    logc = torch.lgamma(torch.tensor(nl + 1.0)) - torch.lgamma(k + 1) - torch.lgamma(nl - k + 1)
    lam = lam.float().clamp(1e-6, 1 - 1e-6).view(-1, 1)
    logp = logc.to(lam.device) + k * torch.log(lam) + (nl - k) * torch.log1p(-lam)  # [b, L]
    sal = -(labels * sal1.unsqueeze(-1) + (1 - labels) * sal2.unsqueeze(-1))
    return sal - eta * logp.view(-1, 1, 1, n_labels)


def grid_labels_icm(unary: torch.Tensor, w_v: torch.Tensor, w_h: torch.Tensor, values: torch.Tensor,
                    n_sweeps: int = 8) -> torch.Tensor:
    """Minimise sum_i U_i(l_i) + sum_{ij adjacent} w_ij (v_{l_i} - v_{l_j})^2 on a grid, batched, by
    iterated conditional modes over the two checkerboard colours (a local minimiser; the fallback
    when `gco-wrapper`'s alpha-beta swap is not installed).

    unary [b, g, g, L], w_v [b, g-1, g], w_h [b, g, g-1], values [L] -> labels [b, g, g] long.
    """
    b, g, _, L = unary.shape
    lab = unary.argmin(-1)
    ii, jj = torch.meshgrid(torch.arange(g, device=unary.device), torch.arange(g, device=unary.device),
                            indexing="ij")
    colours = [(ii + jj) % 2 == 0, (ii + jj) % 2 == 1]
    vals = values.to(unary.dtype)
    for _ in range(n_sweeps):
        for colour in colours:
            v = vals[lab]  # [b, g, g] current values
            cost = unary.clone()
            diff = vals.view(1, 1, 1, L)  # candidate values
            # neighbour above / below / left / right
            cost[:, 1:] += w_v.unsqueeze(-1) * (diff - v[:, :-1].unsqueeze(-1)) ** 2
            cost[:, :-1] += w_v.unsqueeze(-1) * (diff - v[:, 1:].unsqueeze(-1)) ** 2
            cost[:, :, 1:] += w_h.unsqueeze(-1) * (diff - v[:, :, :-1].unsqueeze(-1)) ** 2
            cost[:, :, :-1] += w_h.unsqueeze(-1) * (diff - v[:, :, 1:].unsqueeze(-1)) ** 2
            lab = torch.where(colour, cost.argmin(-1), lab)
    return lab


def grid_labels_gco(unary: torch.Tensor, w_v: torch.Tensor, w_h: torch.Tensor, values: torch.Tensor):
    """The same energy as `grid_labels_icm`, solved by gco-wrapper's alpha-beta swap graph cut
    (`pip install gco-wrapper`). Raises ImportError when it is not installed."""
    import gco  # noqa: PLC0415  (optional extra)
    import numpy as np

    scale = 1000.0 * unary.shape[1] ** 2  # gco works on integers
    vals = values.detach().cpu().double()
    pair = ((vals.view(-1, 1) - vals.view(1, -1)) ** 2).numpy()
    out = []
    cpu = [t.detach().cpu().double() for t in (unary, w_v, w_h)]
    for u, v, h in zip(*cpu):
        lab = gco.cut_grid_graph((scale * u).numpy().astype(np.int32), (scale * pair).astype(np.int32) // 1,
                                 (scale * v).numpy().astype(np.int32), (scale * h).numpy().astype(np.int32),
                                 algorithm="swap")
        out.append(torch.as_tensor(np.asarray(lab).reshape(u.shape[:2])))
    return torch.stack(out).to(unary.device).long()


def have_gco() -> bool:
    try:
        import gco  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def greedy_transport(sal: torch.Tensor, mask: torch.Tensor, t_eps: float = 0.8) -> torch.Tensor:
    """PuzzleMix transport, greedy: move salient blocks of an image to where its mask reveals it.

    Cost of moving block i to place j: t_eps * |pos_i - pos_j|_1 / g - sal_i * mask_j (mask = weight
    of this image at j). Rows pick their cheapest free column, conflicts go to the cheapest row, until
    every block is placed. sal, mask [b, g, g] -> perm [b, g*g]: place j receives block perm[:, j].
    """
    b, g, _ = sal.shape
    n = g * g
    pos = torch.stack(torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij"), -1).view(n, 2)
    dist = (pos.unsqueeze(1) - pos.unsqueeze(0)).abs().sum(-1).to(sal.device, torch.float32) / g
    cost = t_eps * dist - sal.float().view(b, n, 1) * mask.float().view(b, 1, n)
    big = float("inf")
    src_of = torch.full((b, n), -1, dtype=torch.long, device=sal.device)
    row_free = torch.ones(b, n, dtype=torch.bool, device=sal.device)
    col_free = torch.ones(b, n, dtype=torch.bool, device=sal.device)
    for _ in range(n):
        if not row_free.any():
            break
        c = cost.masked_fill(~col_free.unsqueeze(1), big).masked_fill(~row_free.unsqueeze(2), big)
        best_col = c.argmin(2)  # [b, n] each row's choice
        best_val = c.gather(2, best_col.unsqueeze(2)).squeeze(2)
        # for each column, the cheapest row that chose it wins
        claim = torch.full((b, n, n), big, device=sal.device)
        claim.scatter_(2, best_col.unsqueeze(2), best_val.unsqueeze(2))
        claim = claim.masked_fill(~row_free.unsqueeze(2), big)
        win_val, win_row = claim.min(1)  # per column
        won = torch.isfinite(win_val)
        if not won.any():
            break
        bi, cj = won.nonzero(as_tuple=True)
        ri = win_row[bi, cj]
        src_of[bi, cj] = ri
        row_free[bi, ri] = False
        col_free[bi, cj] = False
    # anything left (cannot happen with finite costs) keeps the identity on free slots
    if (src_of < 0).any():
        for i in range(b):
            rows = row_free[i].nonzero().flatten()
            cols = col_free[i].nonzero().flatten()
            src_of[i, cols] = rows
    return src_of


def permute_blocks(x: torch.Tensor, perm: torch.Tensor, grid: int) -> torch.Tensor:
    """Rearrange grid x grid blocks of images: block j of the output is block perm[:, j] of x.
    x [b, C, h, w] (h, w divisible by grid), perm [b, grid*grid]."""
    b, C, h, w = x.shape
    bh, bw = h // grid, w // grid
    blocks = x.view(b, C, grid, bh, grid, bw).permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, C, bh, bw)
    idx = perm.view(b, -1, 1, 1, 1).expand(-1, -1, C, bh, bw)
    out = blocks.gather(1, idx)
    return out.view(b, grid, grid, C, bh, bw).permute(0, 3, 1, 4, 2, 5).reshape(b, C, h, w)


def puzzle_mask(sal1: torch.Tensor, sal2: torch.Tensor, lam: torch.Tensor, w_v: torch.Tensor,
                w_h: torch.Tensor, eta: float = 0.2, n_labels: int = 3, solver: str = "auto") -> torch.Tensor:
    """PuzzleMix mask [b, g, g] with values in linspace(0, 1, n_labels) (weight of image 1),
    minimising saliency + prior unaries and smoothness pairwise terms (w_v, w_h already include
    beta and gamma). solver: "gco" (graph cut, needs gco-wrapper), "icm", or "auto" (gco if installed)."""
    values = torch.linspace(0, 1, n_labels, device=sal1.device)
    unary = puzzle_unary(sal1, sal2, lam, eta, n_labels)
    if solver == "auto":
        solver = "gco" if have_gco() else "icm"
    if solver == "gco":
        lab = grid_labels_gco(unary, w_v, w_h, values)
    elif solver == "icm":
        lab = grid_labels_icm(unary, w_v, w_h, values)
    else:
        raise ValueError(f"unknown PuzzleMix solver {solver!r}; valid: auto, gco, icm")
    return values[lab]
