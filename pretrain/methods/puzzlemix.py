"""PuzzleMix (Kim et al., ICML 2020): the method, its saliency, the energy of the graph cut, and
the transport.

The math equals the official code (snu-mllab/PuzzleMix, mixup.py at e2dbf3a: mixup_graph,
graphcut_multi, mask_transport, transport_image); tests/pretrain/test_mixing.py compares every
piece with tests/fixtures/puzzlemix_official.npz, produced by running that code. The graph cut
itself (gco-wrapper's alpha-beta swap, or the built-in re-implementation) is in
`pretrain.methods.puzzlemix_graphcut`.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from mixup_transfer.core import runtime as rt
from pretrain.methods.base import Method, host_to_device, mixup
from pretrain.methods.puzzlemix_graphcut import grid_labels, have_gco


def _saliency_forward(method: Method, images, labels, train_mode: bool, weight: float = 1.0):
    """The saliency forward of the official PuzzleMix scripts: the mean cross-entropy of the clean
    batch (times `weight`) differentiated w.r.t. the *normalised* input, sqrt(mean over channels of
    grad^2), with the model in eval or train mode (the mode is restored after). -> (sal [b, h, w],
    the weighted loss with its graph when train_mode, else None). Under fp16 autocast this pass
    runs in fp32: the input gradient of a confidently classified image underflows fp16 to an
    all-zero map (bf16 has fp32's range and keeps autocast)."""
    model = method.model
    mean, std = model.mean.to(images.dtype), model.std.to(images.dtype)
    was_training = model.training
    fp16 = rt.autocast_dtype(images.device.type) == torch.float16
    model.train(train_mode)
    try:
        xn = ((images.detach() - mean) / std).requires_grad_(True)
        with torch.enable_grad(), (rt.autocast_off(images.device) if fp16
                                   else contextlib.nullcontext()):
            loss = weight * F.cross_entropy(model(xn * std + mean).float(), labels)
            (grad,) = torch.autograd.grad(loss, xn, retain_graph=train_mode)
    finally:
        model.train(was_training)
    return saliency_map(grad), (loss if train_mode else None)


def _puzzle_saliency(method: Method, images, labels) -> torch.Tensor:
    """PuzzleMix saliency as snu-mllab/PuzzleMix main.py and imagenet/train.py compute it with
    clean_lam 0: the model in eval mode (BatchNorm running statistics, nothing updated), no
    parameter gradients. -> [b, h, w]."""
    return _saliency_forward(method, images, labels, False)[0]


def _puzzle_saliency_train(method: Method, images, labels, weight: float):
    """The same scripts with clean_lam > 0: the model in train mode (batch statistics; this forward
    updates the running statistics, as there), the gradient of weight * CE, and that weighted clean
    loss returned with its
    graph: the scripts backpropagate it into the parameters together with the mixed loss.
    -> (sal [b, h, w], loss 0-d)."""
    return _saliency_forward(method, images, labels, True, weight)


class PuzzleMix(Method):
    """PuzzleMix as the official code runs it (snu-mllab/PuzzleMix `mixup.py:mixup_graph`, the
    CIFAR / TinyImageNet `main.py` and the ImageNet `imagenet/train.py`): lam ~ Beta(alpha, alpha),
    a block grid drawn uniformly from `grids`, a 3-label mask from the graph cut of -(revealed
    saliency) + eta * prior + smoothness (beta + gamma * boundary differences of the
    `neigh_size`-pooled images), the greedy transport of each image's salient blocks onto its
    visible places (t_eps) at resolution `t_size` (pixels; -1 = the mask's blocks, see
    `transport_grid`), label weight = mask mean. Saliency: see `_puzzle_saliency`; `saliency_mode`
    eval | train. `clean_lam` > 0 adds the official clean-loss term, computed by the train-mode
    saliency forward: clean_lam * CE(clean) with loss ce (imagenet/train.py), 2 * clean_lam /
    num_classes * CE(clean) with loss bce (main.py). loss: ce = soft cross-entropy of the mixed
    targets (imagenet/train.py's lam-weighted CE); bce = main.py's BCELoss(softmax(logits), mixed
    targets), the mean over examples and classes. Solver: gco-wrapper's alpha-beta swap when
    installed, else the built-in re-implementation of the same algorithm (`solver` knob: auto | gco
    | swap); `threads` solves the per-image graph cuts in a thread pool (None: one per image up to
    the CPU count).
    """

    def __init__(self, model, num_classes, alpha: float = 1.0, grids=(2, 4, 8, 16),
                 beta: float = 1.2, gamma: float = 0.5, eta: float = 0.2, neigh_size: int = 2,
                 n_labels: int = 3, transport: bool = True, t_eps: float = 0.8, t_size: int = -1,
                 clean_lam: float = 0.0, saliency_mode: str = "eval", loss: str = "ce",
                 solver: str = "auto", threads: int | None = None, dense_loss: bool = False):
        super().__init__(model, num_classes, dense_loss)
        self.alpha, self.grids, self.beta, self.gamma = alpha, tuple(grids), beta, gamma
        self.eta = eta
        self.neigh_size, self.n_labels, self.transport = neigh_size, n_labels, transport
        self.t_eps = t_eps
        self.t_size, self.clean_lam = int(t_size), float(clean_lam)
        self.saliency_mode, self.loss = saliency_mode, loss
        self.solver, self.threads = solver, threads
        _check_puzzle_knobs(self)
        if solver == "gco" and not have_gco():
            raise ImportError("puzzlemix solver='gco' needs gco-wrapper (pip install "
                              "gco-wrapper; a regular dependency on CPython <= 3.11 x86 / "
                              "x86-64); use solver=swap or auto for the built-in "
                              "re-implementation")

    def _grid(self, h: int, w: int) -> int:
        if h != w:
            raise ValueError("PuzzleMix needs square inputs (the official code does too), got "
                             f"{h}x{w}")
        # the block side must divide the input and be a multiple of neigh_size (or smaller than it)
        ok = [g for g in self.grids if h % g == 0 and (h // g) % min(self.neigh_size, h // g) == 0]
        if not ok:
            raise ValueError(f"no PuzzleMix grid in {self.grids} fits the input size {h}x{w} "
                             f"with neigh_size {self.neigh_size} (block side = size / grid, a "
                             "multiple of neigh_size)")
        if self.transport:
            # a t_size that does not divide every drawable block fails at the first step, not later
            for g in ok:
                transport_grid(h, g, self.t_size)
        return self._choice(ok)

    def saliency(self, images, labels):
        """-> (saliency map [b, h, w], the weighted clean loss (0-d, with its graph) or None); see
        the class."""
        if self.saliency_mode == "eval":
            return _puzzle_saliency(self, images, labels), None
        weight = self.clean_lam * (2.0 / self.num_classes if self.loss == "bce" else 1.0)
        return _puzzle_saliency_train(self, images, labels, weight if weight > 0 else 1.0)

    def puzzle(self, images, labels, perm, lams, grid, sal_map=None):
        """K PuzzleMix images per pair for weights lams (K host floats): -> (x [K*b, 3, h, w],
        lam_kept [K*b]). The graph cuts of all K run on the host after one device-to-host transfer
        (`puzzle_masks`).
        sal_map: the saliency (default: computed here; a clean-loss term needs `forward`, which
        adds it)."""
        if sal_map is None:
            if self.clean_lam > 0:
                raise ValueError("puzzlemix clean_lam > 0 adds a loss term that only "
                                 "PuzzleMix.forward returns; set clean_lam 0 where PuzzleMix is "
                                 "used as a mixing step (multi_interp puzzle)")
            sal_map = self.saliency(images, labels)[0]
        # an empty transport place: 0 in the normalised input
        fill = self.model.mean.to(images.dtype)
        with torch.no_grad():
            x, kept, _ = puzzle_mix_many(images, sal_map.detach(), perm, grid, list(lams),
                                         self.beta, self.gamma,
                                            self.eta, self.neigh_size, self.n_labels,
                                            self.transport, self.t_eps, self.solver, fill=fill,
                                            threads=self.threads, t_size=self.t_size)
        return x.detach(), kept

    def mixed_loss(self, logits, y_mix):
        """ce: soft cross-entropy (dense if dense_loss); bce: BCELoss(softmax(logits), y_mix) as
        main.py."""
        if self.loss == "bce":
            return F.binary_cross_entropy(torch.softmax(logits.float(), dim=-1), y_mix.float())
        return self.loss_of(logits, y_mix)

    def forward(self, images, labels):
        y = self.targets(labels)
        b, _, h, w = images.shape
        perm, grid = self._perm(b), self._grid(h, w)
        sal_map, clean = self.saliency(images, labels)
        x, kept = self.puzzle(images, labels, perm, [self._beta(self.alpha)], grid, sal_map)
        logits = self.logits_of(self.model.features(x))
        out = {"loss": self.mixed_loss(logits, mixup(y, perm, kept))}
        if self.clean_lam > 0:
            out["loss_clean"] = clean
        return out


def _check_puzzle_knobs(m: PuzzleMix) -> None:
    """One-line errors for PuzzleMix knob values the official scripts do not define."""
    if m.solver not in ("auto", "gco", "swap"):
        raise ValueError(f"puzzlemix solver must be auto, gco or swap, got {m.solver!r}")
    if m.saliency_mode not in ("eval", "train"):
        raise ValueError(f"puzzlemix saliency_mode must be eval or train, got {m.saliency_mode!r}")
    if m.loss not in ("ce", "bce"):
        raise ValueError(f"puzzlemix loss must be ce or bce, got {m.loss!r}")
    if m.loss == "bce" and m.dense_loss:
        raise ValueError("puzzlemix loss bce (main.py's BCE of the softmax) has no dense form; "
                         "use loss ce")
    if m.clean_lam < 0:
        raise ValueError(f"puzzlemix clean_lam must be >= 0, got {m.clean_lam}")
    if m.clean_lam > 0 and m.saliency_mode != "train":
        raise ValueError("puzzlemix clean_lam > 0 needs saliency_mode train: the official "
                         "scripts compute the clean loss and the saliency in one train-mode "
                         "forward")
    if m.t_size != -1 and m.t_size < 1:
        raise ValueError("puzzlemix t_size must be -1 (the mask's blocks) or a size in pixels, "
                         f"got {m.t_size}")


def saliency_map(grad: torch.Tensor) -> torch.Tensor:
    """PuzzleMix saliency: sqrt(mean over channels of grad^2). grad [b, C, h, w] -> [b, h, w].
    The official training script differentiates the clean loss (model in eval mode) w.r.t. the
    *normalised* input, so `grad` is that gradient."""
    return torch.sqrt(torch.mean(grad**2, dim=1))


def saliency_grid(sal: torch.Tensor, grid: int) -> torch.Tensor:
    """Saliency map [b, h, w] average-pooled to grid x grid blocks (h, w divisible by grid) and
    normalised to sum 1 per image -> [b, grid, grid]. An all-zero map (a gradient that underflowed)
    becomes uniform, 1 / grid^2 per block, instead of 0 / 0."""
    b = sal.shape[0]
    pooled = F.avg_pool2d(sal, sal.shape[-1] // grid)
    total = pooled.reshape(b, -1).sum(1).reshape(b, 1, 1)
    return torch.where(total > 0, pooled / total.clamp_min(torch.finfo(pooled.dtype).tiny),
                       1.0 / grid**2)


def boundary_differences(pix: torch.Tensor, pix2: torch.Tensor, grid: int, neigh_size: int = 2):
    """Local-statistics term: for every pair of neighbouring blocks (p above/left of q) and every
    choice of the image each shows, the mean absolute difference across their common boundary of
    the images average-pooled by `neigh_size` (clipped to the block size).

    pix, pix2 [b, 3, h, w] in pixel units (0..1; the first image and its partner) -> (dv [b, 2, 2,
    g-1, g], dh [b, 2, 2, g, g-1]); index [s_p, s_q] with 1 = first image, 0 = partner.
    """
    block = pix.shape[-1] // grid
    neigh = min(neigh_size, block)
    if block % neigh:
        raise ValueError(f"PuzzleMix: the block side {block} (input {pix.shape[-1]} / grid "
                         f"{grid}) must be a multiple of neigh_size {neigh} (as in the official "
                         "code)")
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


def puzzle_energy(sal: torch.Tensor, sal2: torch.Tensor, dv: torch.Tensor, dh: torch.Tensor,
                  lam: float, beta: float = 1.2, gamma: float = 0.5, eta: float = 0.2,
                  n_labels: int = 3):
    """The integer graph-cut problem of one batch, built like the official `mixup_graph` +
    `graphcut_multi`: the four-entry pairwise tables (beta * gamma * boundary differences) are
    split into unary halves plus one edge weight, beta is normalised by 1 / (16 g), the prior by
    eta / g^2, and everything is multiplied by 1000 g^2 and truncated to int32.

    sal, sal2 [b, g, g] (normalised saliency of the image and of its partner), dv, dh from
    `boundary_differences`, lam the prior's weight of the first image -> (unary int32 [b, g, g, L],
    label distance float32 [L, L], w_v int32 [b, g-1, g], w_h int32 [b, g, g-1]). Graph label i
    means mask value 1 - i / (L-1) (1 = the first image).
    """
    host = read_to_host(puzzle_terms(sal, sal2, dv, dh, beta, gamma))
    return energy_from_terms(host, lam, beta, eta, n_labels)


def puzzle_terms(sal: torch.Tensor, sal2: torch.Tensor, dv: torch.Tensor, dh: torch.Tensor,
                 beta: float = 1.2, gamma: float = 0.5) -> tuple[torch.Tensor, ...]:
    """The part of `puzzle_energy` that does not depend on lam, on the device: the cost of each
    block showing the first image / the partner (show1, show2 [b, g, g], saliency plus the unary
    halves of the smoothness tables) and the edge weights (w_v [b, g-1, g], w_h [b, g, g-1], before
    adding the normalised beta)."""
    g = sal.shape[-1]
    beta = beta / g / 16
    dv = beta * gamma * dv
    dh = beta * gamma * dh
    # cost of a block showing the first image / the partner
    show1, show2 = sal2.clone(), sal.clone()
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
    """float32 numpy copies of `tensors` in one device-to-host transfer (the one read of a
    PuzzleMix batch)."""
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors]).numpy(force=True)
    out, i = [], 0
    for t in tensors:
        out.append(flat[i:i + t.numel()].reshape(tuple(t.shape)))
        i += t.numel()
    return out


def energy_from_terms(host: list[np.ndarray], lam: float, beta: float = 1.2, eta: float = 0.2,
                      n_labels: int = 3):
    """`puzzle_energy` from the host copies of `puzzle_terms` (same arguments, same integers)."""
    show1, show2, w_v, w_h = host
    g = show1.shape[-1]
    beta = beta / g / 16
    large = 1000 * g**2
    prior = eta * mixing_prior(lam, n_labels) / g**2
    s1, s2 = show1.astype(np.float64), show2.astype(np.float64)
    steps = np.linspace(0, 1, n_labels)
    unary = (large * np.stack([(1 - t) * s1 + t * s2 + prior[i] for i, t in enumerate(steps)],
                              -1)).astype(np.int32)
    idx = np.arange(n_labels)
    dist = ((idx[:, None] - idx[None, :]) ** 2 / (n_labels - 1) ** 2).astype(np.float32)
    w_v = (large * (w_v + beta)).astype(np.int32)
    w_h = (large * (w_h + beta)).astype(np.int32)
    return unary, dist, w_v, w_h


def puzzle_masks(sal: torch.Tensor, sal2: torch.Tensor, dv: torch.Tensor, dh: torch.Tensor, lams,
                 beta: float = 1.2, gamma: float = 0.5, eta: float = 0.2, n_labels: int = 3,
                 solver: str = "auto", threads: int | None = None) -> torch.Tensor:
    """`puzzle_mask` for K prior weights lams (host floats) -> [K, b, g, g]. The graph cut runs on
    the host (the authors' algorithm): the lam-independent terms are read once (one device-to-host
    transfer for all K) and the masks go back with a non-blocking copy."""
    host = read_to_host(puzzle_terms(sal, sal2, dv, dh, beta, gamma))
    labs = [grid_labels(*energy_from_terms(host, float(lam), beta, eta, n_labels), solver, threads)
            for lam in lams]
    return 1.0 - host_to_device(np.stack(labs), sal.device) / (n_labels - 1)


def transport_cost(g: int, device=None) -> torch.Tensor:
    """Squared grid distance between block positions / (g - 1)^2. -> [g*g, g*g] float32."""
    # built on the device: a host-built tensor would be a blocking copy
    r = torch.arange(g, device=device)
    pos = torch.stack(torch.meshgrid(r, r, indexing="ij"), -1).view(-1, 2)
    d2 = ((pos.unsqueeze(1) - pos.unsqueeze(0)) ** 2).sum(-1)
    return d2.float() / (g - 1) ** 2


def transport_plan(sal: torch.Tensor, mask: torch.Tensor, t_eps: float = 0.8) -> torch.Tensor:
    """PuzzleMix transport (official `mask_transport`): cost of moving block i to place j is
    t_eps * |pos_i - pos_j|^2 / (g-1)^2 - sal_i * 1[mask_j > 0]; g rounds of: every block picks its
    cheapest place, each place keeps the row of the lowest entry of its column of (claims * cost),
    losers pay +1 on that place. The last round's winners are the plan. As in the official code a
    place whose claims all cost >= 0 ties with the zeros of the non-claims and goes to row 0 (to
    nobody unless block 0 claimed it); such places are invisible to this image (mask 0) in
    practice.

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


def apply_transport(x: torch.Tensor, plan: torch.Tensor, grid: int,
                    fill: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Move blocks of x [b, C, h, w] by plan [b, g*g, g*g] (block i to place j where plan[i, j] =
    1); places that receive nothing take `fill` (the official code leaves them 0 in the normalised
    input, i.e. the dataset mean: pass the mean [1, C, 1, 1] when x is in pixel units)."""
    b, C, h, w = x.shape
    bh, bw = h // grid, w // grid
    blocks = x.reshape(b, C, grid, bh, grid, bw).permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid,
                                                                                   C, bh, bw)
    has, src = plan.max(1)  # per place: is it filled, and by which block
    out = blocks.gather(1, src.view(b, -1, 1, 1, 1).expand(-1, -1, C, bh, bw))
    out = out.view(b, grid, grid, C, bh, bw).permute(0, 3, 1, 4, 2, 5).reshape(b, C, h, w)
    filled = has.view(b, 1, grid, 1, grid, 1).expand(b, 1, grid, bh, grid,
                                                     bw).reshape(b, 1, h, w) > 0
    # a number stays a kernel argument (no host-to-device copy)
    if not isinstance(fill, torch.Tensor):
        return torch.where(filled, out, float(fill))
    fill = fill.to(x.dtype)
    return torch.where(filled, out, fill.expand_as(out) if fill.ndim else fill)


def transport_grid(width: int, grid: int, t_size: int = -1) -> int:
    """The grid the PuzzleMix transport runs on (official `mixup_graph`): t_size = -1 (the official
    default) or min(t_size, block) equal to the block side -> the mask grid; a smaller t_size ->
    width // t_size, the mask upsampled to it and the saliency re-pooled at t_size x t_size (the
    official CIFAR command: t_size 4)."""
    block = width // grid
    if t_size == -1 or min(t_size, block) >= block:
        return grid
    if t_size < 1 or block % t_size:
        raise ValueError(f"PuzzleMix t_size {t_size} must be -1 or a positive divisor of the "
                         f"block side {block} (input {width} / grid {grid}), as in the official "
                         "code")
    return width // t_size


def puzzle_mix_many(x: torch.Tensor, sal_map: torch.Tensor, perm: torch.Tensor, grid: int, lams,
                    beta: float = 1.2, gamma: float = 0.5, eta: float = 0.2, neigh_size: int = 2,
                    n_labels: int = 3, transport: bool = True, t_eps: float = 0.8,
                    solver: str = "auto", pixels: torch.Tensor | None = None,
                    fill: torch.Tensor | float = 0.0, threads: int | None = None,
                    t_size: int = -1):
    """`puzzle_mix` for K prior weights lams (host floats) sharing the saliency, the partner and
    one host transfer -> (mixed [K*b, C, h, w], ratio [K*b], masks [K, b, g, g]); block k of the
    outputs uses lams[k]."""
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
        # nearest
        tmask = mask if tg == grid else F.interpolate(mask.unsqueeze(1), size=tg).squeeze(1)
        tsal = sal if tg == grid else saliency_grid(sal_map, tg)
        a = apply_transport(a, transport_plan(rep(tsal), tmask, t_eps), tg, fill)
        a2 = apply_transport(a2, transport_plan(rep(tsal[perm]), 1 - tmask, t_eps), tg, fill)
    up = F.interpolate(mask.unsqueeze(1), size=x.shape[-1])
    ratio = up.reshape(up.shape[0], -1).mean(-1)
    return up * a + (1 - up) * a2, ratio, masks
