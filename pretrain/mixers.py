"""Input-space mixing for any training loop: `mixer(x, y) -> (x_mixed, targets)`.

    gen = torch.Generator().manual_seed(0)
    mixer = CutMix(alpha=1.0, num_classes=10, per_sample=True, generator=gen)
    x_mixed, targets = mixer(images, labels)       # images [b, C, h, w], labels [b] int
    loss = mixed_loss(model(x_mixed), targets)     # soft-target cross-entropy, or your criterion

Mixers: `MixUp`, `CutMix`, `PuzzleMix` (saliency passed in or computed by a callback), `MultiMixK`
(multi-mix: K sorted interpolations of every pair over one of those), `ZetaMixup` (every example a
p-series combination of the whole batch) and `RandomChoice` (switch between mixers per batch, or
per example for per-sample MixUp / CutMix, as timm's `switch_prob`).

- `targets="soft"`: [n, c] rows on the simplex (label smoothing applied before mixing);
  `targets="pair"`: `PairTargets(y_a, y_b, lam)` for loss interpolation lam * L(y_a) + (1 - lam) *
  L(y_b), so any criterion works.
- Any batch size (odd, 1: the partner of an example may be itself). `per_sample=True` draws one lam
  (and one box)
  per example, vectorised: no Python loop over examples.
- Every draw comes from a `torch.Generator` (`generator=`, or one seeded with `seed=` on the
  input's device at the
  first call): no global RNG. A call is `apply(x, y, draw(x))`: the toolkit's trainer
  (`pretrain.methods`) builds the `Draw` from its own seeded streams and calls the same `apply`, so
  both paths run one implementation.
- With a generator on the input's device nothing is read back to the host (except PuzzleMix, whose
  graph cut runs on the host); a CPU generator with CUDA inputs sends its draws with a non-blocking
  copy.
The math is `pretrain.methods`' (`base`, `cutmix`, `puzzlemix`); this module holds the draws and
the vectorised boxes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.methods import base as shared
from pretrain.methods import cutmix, puzzlemix


class PairTargets(NamedTuple):
    """Targets for loss interpolation: lam * L(logits, y_a) + (1 - lam) * L(logits, y_b). y_a, y_b
    [n] int, lam [n] float (the weight of y_a); label_smoothing is passed to the default
    criterion."""

    y_a: torch.Tensor
    y_b: torch.Tensor
    lam: torch.Tensor
    label_smoothing: float = 0.0


def mixed_loss(logits: torch.Tensor, targets, criterion: Callable | None = None) -> torch.Tensor:
    """The mean loss of `logits` [n, c] against a mixer's targets: soft [n, c] or `PairTargets`.

    criterion(logits, target, reduction="none") -> [n]; default: cross-entropy (with the pair
    targets' label smoothing). With soft targets the default is H(targets, softmax(logits))
    (`pretrain.methods.base.soft_cross_entropy`)."""
    if isinstance(targets, PairTargets):
        if criterion is None:
            def criterion(z, t, reduction):
                return F.cross_entropy(z.float(), t, reduction=reduction,
                                       label_smoothing=targets.label_smoothing)
        lam = targets.lam.to(logits.device, torch.float32)
        per = lam * criterion(logits, targets.y_a, reduction="none")
        return (per + (1 - lam) * criterion(logits, targets.y_b, reduction="none")).mean()
    if criterion is None:
        return shared.soft_cross_entropy(logits, targets)
    return criterion(logits, targets, reduction="none").mean()


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """[b] int -> [b, c]: 1 - smoothing + smoothing / c on the label, smoothing / c elsewhere
    (timm's convention)."""
    y = shared.one_hot(labels, num_classes)
    return y if smoothing == 0 else y * (1 - smoothing) + smoothing / num_classes


@dataclass
class Draw:
    """One call's randomness. perm [b] (the partner of example i is perm[i]); lam the weight of the
    first input as drawn, n values (n = 1 per batch, b per example, K for multi-mix); centre (row,
    column) of the CutMix box(es), [n or 1, 2]; grid: PuzzleMix's block grid; choice:
    RandomChoice's pick ([] per batch, [b] per example) with the chosen mixers' draws in `parts`;
    order: ζ-Mixup's [b, b] uniform draws (row i ranks the batch for example i).

    lam and centre are tensors (a mixer's own draws, on its generator's device) or host numbers (a
    list of floats, a (row, column) tuple), as the toolkit's trainer draws them from its host
    stream: host numbers are used as kernel arguments and never read back from a tensor."""

    perm: torch.Tensor
    lam: torch.Tensor | list
    centre: torch.Tensor | tuple | None = None
    grid: int | None = None
    choice: torch.Tensor | None = None
    parts: tuple = ()
    order: torch.Tensor | None = None


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t on `device`; host tensors go to CUDA with a non-blocking copy from pinned memory (no
    synchronisation)."""
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _weight(lam, x: torch.Tensor):
    """A mixing weight for x: a Python float when it is one host number (a kernel argument, no
    copy), else a float32 tensor [n] on x's device."""
    if isinstance(lam, (list, tuple)):
        return float(lam[0]) if len(lam) == 1 else shared.host_to_device(lam, x.device)
    return _to(lam, x.device).to(torch.float32)


def _host(draw: Draw) -> Draw:
    """A per-batch draw made on the CPU as host numbers (reading a CPU tensor does not wait for a
    device), so that one box is a slice copy and one lam a kernel argument."""
    one_box = isinstance(draw.centre, torch.Tensor) and draw.centre.shape[0] == 1
    if (
        isinstance(draw.lam, torch.Tensor)
        and draw.lam.device.type == "cpu"
        and (draw.lam.numel() == 1 or one_box)
    ):
        centre = draw.centre
        if isinstance(centre, torch.Tensor) and centre.shape[0] == 1:
            centre = tuple(centre[0].tolist())
        return Draw(draw.perm, draw.lam.tolist(), centre, draw.grid, draw.choice, draw.parts)
    return draw


class Mixer:
    """Shared by the mixers: the generator, the targets and the knobs every method has.

    alpha: lam ~ Beta(alpha, alpha). num_classes: needed for soft targets. per_sample: one lam (and
    box) per example. prob: the probability that an example (per_sample) or the batch is mixed at
    all (else lam = 1).
    label_smoothing: applied to the targets before mixing. targets: "soft" or "pair" (see the
    module docstring).
    """

    def __init__(self, alpha: float = 1.0, num_classes: int | None = None,
                 per_sample: bool = False, prob: float = 1.0, label_smoothing: float = 0.0,
                 targets: str = "soft", generator: torch.Generator | None = None, seed: int = 0):
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0 (lam ~ Beta(alpha, alpha)), got {alpha}")
        if targets not in ("soft", "pair"):
            raise ValueError(f"targets must be 'soft' or 'pair', got {targets!r}")
        if targets == "soft" and not num_classes:
            raise ValueError("soft targets need num_classes (or use targets='pair')")
        if not 0 <= prob <= 1 or not 0 <= label_smoothing < 1:
            raise ValueError(f"prob must be in [0, 1] and label_smoothing in [0, 1), got {prob}, "
                             f"{label_smoothing}")
        self.alpha, self.num_classes, self.per_sample = alpha, num_classes, per_sample
        self.prob, self.label_smoothing, self.target_kind = prob, label_smoothing, targets
        self.generator, self.seed = generator, seed

    def __call__(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None):
        return self.apply(x, y, self.draw(x, generator))

    def _generator(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Generator:
        if generator is not None:
            return generator
        if self.generator is None:
            self.generator = torch.Generator(device=x.device).manual_seed(self.seed)
        return self.generator

    def _lam(self, n: int, g: torch.Generator) -> torch.Tensor:
        """[n] Beta(alpha, alpha) draws, replaced by 1 (no mixing) with probability 1 - prob."""
        lam = shared.sample_beta(self.alpha, self.alpha, n, g, g.device)
        if self.prob < 1:
            lam = torch.where(torch.rand(n, generator=g, device=g.device) < self.prob, lam,
                              torch.ones_like(lam))
        return lam

    def _perm(self, b: int, g: torch.Generator) -> torch.Tensor:
        return torch.randperm(b, generator=g, device=g.device)

    def targets(self, y: torch.Tensor, perm: torch.Tensor, kept):
        """Targets of mixed examples whose first input keeps weight `kept` (a float or [b])."""
        # a host float is filled in on the device (a copy would synchronise)
        if self.target_kind == "pair":
            lam = kept.expand(y.shape[0]) if isinstance(kept, torch.Tensor) else torch.full(
                (y.shape[0],), float(kept), device=y.device)
            return PairTargets(y, y[perm], lam, self.label_smoothing)
        return shared.mixup(smooth_one_hot(y, self.num_classes, self.label_smoothing), perm, kept)

    def draw(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Draw:
        raise NotImplementedError

    def apply(self, x: torch.Tensor, y: torch.Tensor, draw: Draw):
        raise NotImplementedError


class MixUp(Mixer):
    """Input mixup (Zhang et al., "mixup: Beyond Empirical Risk Minimization"): lam x + (1 - lam)
    x[perm]."""

    def draw(self, x, generator=None) -> Draw:
        g = self._generator(x, generator)
        return Draw(self._perm(x.shape[0], g), self._lam(x.shape[0] if self.per_sample else 1, g))

    def apply(self, x, y, draw: Draw):
        perm, lam = _to(draw.perm, x.device), _weight(_host(draw).lam, x)
        return shared.mixup(x, perm, lam), self.targets(y, perm, lam)


# -------------------------------------------------------------------------------------------------
# CutMix boxes, vectorised
# -------------------------------------------------------------------------------------------------


def cutmix_boxes(h: int, w: int, side: torch.Tensor, centre: torch.Tensor):
    """`cutmix.cutmix_box` for n boxes at once, on the tensors' device: side [n] the box side as a
    fraction of the image (sqrt(1 - lam) for CutMix), centre [n, 2] int (row, column) -> (boxes [n,
    4] long (y0, y1, x0, x1), kept [n] float64 = 1 - box area / (h w)). Side in float64, so the
    integer sizes equal the host function's."""
    side = side.to(torch.float64)
    ch, cw = torch.floor(h * side).long(), torch.floor(w * side).long()
    cy, cx = centre[:, 0].long(), centre[:, 1].long()
    y0, y1 = (cy - ch // 2).clamp_min(0), (cy + ch // 2).clamp_max(h)
    x0, x1 = (cx - cw // 2).clamp_min(0), (cx + cw // 2).clamp_max(w)
    kept = 1.0 - ((y1 - y0) * (x1 - x0)).double() / (h * w)
    return torch.stack([y0, y1, x0, x1], 1), kept


def keep_masks(h: int, w: int, boxes: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """boxes [n, 4] (y0, y1, x0, x1) -> [n, 1, h, w] of `dtype`: 0 inside the box (the partner's
    pixels), 1 outside (the first image's), as `cutmix.box_mask` for n boxes."""
    rows = torch.arange(h, device=boxes.device)
    cols = torch.arange(w, device=boxes.device)
    # [n, h]: row outside the box
    out_r = ((rows < boxes[:, :1]) | (rows >= boxes[:, 1:2])).to(dtype)
    out_c = ((cols < boxes[:, 2:3]) | (cols >= boxes[:, 3:4])).to(dtype)  # [n, w]
    # outside if the row or column is
    return torch.maximum(out_r[:, :, None], out_c[:, None, :]).unsqueeze(1)


def paste_boxes(x: torch.Tensor, perm: torch.Tensor, boxes) -> torch.Tensor:
    """x with box i taken from the partner x[perm[i]]. x [b, C, h, w]; boxes: one host box (y0, y1,
    x0, x1) of ints for the whole batch (a slice copy of the partners' box region), or a tensor [1
    or b, 4] (on the device: the partners gathered, then the kept pixels written back by one
    in-place lerp with the 0/1 keep mask, which returns either input exactly)."""
    if not isinstance(boxes, torch.Tensor):
        y0, y1, x0, x1 = boxes
        out = x.clone()
        out[..., y0:y1, x0:x1] = x[..., y0:y1, x0:x1].index_select(0, perm)
        return out
    keep = keep_masks(x.shape[-2], x.shape[-1], _to(boxes, x.device), x.dtype)
    return x.index_select(0, perm).lerp_(x, keep)


class CutMix(Mixer):
    """CutMix (Yun et al., "CutMix: Regularization Strategy to Train Strong Classifiers with
    Localizable Features"): a box of side sqrt(1 - lam) with a uniform centre, pasted from the
    partner; the label weight is the kept area (`cutmix.cutmix_box`, per example when
    per_sample)."""

    def draw(self, x, generator=None) -> Draw:
        g = self._generator(x, generator)
        b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
        n = b if self.per_sample else 1
        perm, lam = self._perm(b, g), self._lam(n, g)
        centre = torch.stack([torch.randint(h, (n,), generator=g, device=g.device),
                              torch.randint(w, (n,), generator=g, device=g.device)], 1)
        return Draw(perm, lam, centre)

    def apply(self, x, y, draw: Draw):
        h, w = x.shape[-2:]
        perm, draw = _to(draw.perm, x.device), _host(draw)
        if isinstance(draw.centre, tuple):  # one host box: the host function
            box, kept = cutmix.cutmix_box(h, w, draw.lam[0], centre=draw.centre)
            return paste_boxes(x, perm, box), self.targets(y, perm, kept)
        lam, centre = torch.as_tensor(draw.lam), torch.as_tensor(draw.centre)
        boxes, kept = cutmix_boxes(h, w, torch.sqrt(1 - lam.double()), centre)
        return paste_boxes(x, perm, boxes), self.targets(y, perm, _weight(kept, x))




# -------------------------------------------------------------------------------------------------
# PuzzleMix, multi-mix, switching
# -------------------------------------------------------------------------------------------------


def puzzle_grid_options(h: int, w: int, grids: Sequence[int], neigh_size: int = 2) -> list[int]:
    """The PuzzleMix grids that fit an h x w input: square, the block side (h / grid) divides h and
    is a multiple of neigh_size (or smaller than it), as the official code requires."""
    if h != w:
        raise ValueError("PuzzleMix needs square inputs (the official code does too), got "
                         f"{h}x{w}")
    ok = [g for g in grids if h % g == 0 and (h // g) % min(neigh_size, h // g) == 0]
    if not ok:
        raise ValueError(f"no PuzzleMix grid in {tuple(grids)} fits the input size {h}x{w} with "
                         f"neigh_size {neigh_size} (block side = size / grid, a multiple of "
                         "neigh_size)")
    return ok


def gradient_saliency(model: nn.Module) -> Callable:
    """A PuzzleMix saliency callback (x, y) -> [b, h, w]: sqrt(mean over channels of the squared
    gradient of the clean cross-entropy w.r.t. the input as `model` receives it), the model in eval
    mode, no parameter gradients (the official training script's saliency, whose input is the
    normalised image)."""

    def saliency(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            xg = x.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(F.cross_entropy(model(xg).float(), y), xg)
        finally:
            model.train(was_training)
        return puzzlemix.saliency_map(grad)

    return saliency


class PuzzleMix(Mixer):
    """PuzzleMix (Kim et al., "Puzzle Mix: Exploiting Saliency and Local Statistics for Optimal
    Mixup"),
    `puzzlemix.puzzle_mix_many`: a block grid drawn from `grids`, a graph-cut mask of the two
    saliency maps and the transport of salient blocks; the label weight is the mask mean. The
    saliency [b, h, w] is passed to the call (`mixer(x, y, saliency=s)`) or computed by
    `saliency(x, y)` given at construction (`gradient_saliency(model)` is the official one). Per
    batch only (one lam); the graph cut runs on the host. pixels: a callable x -> x in pixel units
    for the smoothness term (default: x itself); fill: the value of an empty transport place."""

    def __init__(self, saliency: Callable | None = None, alpha: float = 1.0,
                 num_classes: int | None = None, grids=(2, 4, 8, 16), beta: float = 1.2,
                 gamma: float = 0.5, eta: float = 0.2, neigh_size: int = 2, n_labels: int = 3,
                 transport: bool = True, t_eps: float = 0.8, solver: str = "auto",
                 threads: int | None = None, pixels: Callable | None = None,
                 fill: torch.Tensor | float = 0.0, label_smoothing: float = 0.0,
                 targets: str = "soft", generator: torch.Generator | None = None, seed: int = 0):
        super().__init__(alpha, num_classes, False, 1.0, label_smoothing, targets, generator, seed)
        self.saliency, self.grids, self.pixels, self.fill = saliency, tuple(grids), pixels, fill
        self.knobs = dict(beta=beta, gamma=gamma, eta=eta, neigh_size=neigh_size,
                          n_labels=n_labels, transport=transport, t_eps=t_eps, solver=solver,
                          threads=threads)

    def __call__(self, x, y, generator=None, saliency: torch.Tensor | None = None):
        return self.apply(x, y, self.draw(x, generator), saliency)

    def draw(self, x, generator=None) -> Draw:
        g = self._generator(x, generator)
        options = puzzle_grid_options(x.shape[-2], x.shape[-1], self.grids,
                                      self.knobs["neigh_size"])
        # a host number
        pick = int(torch.randint(len(options), (1,), generator=g, device=g.device))
        return Draw(self._perm(x.shape[0], g), self._lam(1, g), grid=options[pick])

    def mix(self, x, y, perm, lams, grid, saliency=None):
        """K PuzzleMix images per pair for host weights lams -> (x [K*b, C, h, w], kept [K*b])."""
        sal = saliency if saliency is not None else self._saliency(x, y)
        pixels = None if self.pixels is None else self.pixels(x)
        with torch.no_grad():
            mixed, kept, _ = puzzlemix.puzzle_mix_many(x, sal, perm, grid, list(lams),
                                                       pixels=pixels, fill=self.fill,
                                                **self.knobs)
        return mixed.detach(), kept

    def _saliency(self, x, y):
        if self.saliency is None:
            raise ValueError("PuzzleMix needs a saliency map: pass saliency=[b, h, w] to the "
                             "call or a callback saliency(x, y) (e.g. "
                             "pretrain.mixers.gradient_saliency(model)) to the constructor")
        return self.saliency(x, y)

    def apply(self, x, y, draw: Draw, saliency: torch.Tensor | None = None):
        perm = _to(draw.perm, x.device)
        mixed, kept = self.mix(x, y, perm, _host_list(draw.lam), draw.grid, saliency)
        return mixed, self.targets(y, perm, kept)


class MultiMixK:
    """multi-mix (Shen, Yu, Yang and Kwok; the toolkit's `multi_interp` method): K sorted weights
    lam_1 <= ... <= lam_K ~ Beta(alpha, alpha) (the base mixer's alpha) and one partner per
    example; every pair is mixed K times by the base mixer: MixUp (K interpolations), CutMix (K
    nested boxes of side sqrt(lam_k) sharing one centre, `cutmix.nested_box_list`) or PuzzleMix (K
    masks sharing the saliency). Output [K*b, ...], block k with lam_k; targets in the base mixer's
    kind."""

    def __init__(self, base: Mixer, k: int = 5):
        if not isinstance(base, (MixUp, CutMix, PuzzleMix)) or base.per_sample:
            raise ValueError("multi-mix's base is a per-batch MixUp, CutMix or PuzzleMix")
        if k < 1:
            raise ValueError(f"multi-mix needs k >= 1, got {k}")
        self.base, self.k = base, int(k)

    def __call__(self, x, y, generator=None, saliency: torch.Tensor | None = None):
        return self.apply(x, y, self.draw(x, generator), saliency)

    def draw(self, x, generator=None) -> Draw:
        g = self.base._generator(x, generator)
        d = self.base.draw(x, g)  # the partner, and CutMix's centre / PuzzleMix's grid
        d.lam = shared.sorted_betas(self.k, self.base.alpha, g, g.device)
        if d.centre is not None:
            d.centre = d.centre[:1]
        return d

    def apply(self, x, y, draw: Draw, saliency: torch.Tensor | None = None):
        b = x.shape[0]
        perm, draw = _to(draw.perm, x.device), _host(draw)
        if isinstance(self.base, MixUp):
            kept = (
                shared.host_to_device(draw.lam, x.device)
                if isinstance(draw.lam, list)
                else _to(draw.lam, x.device)
            )
            x_mixed, kept = (
                shared.multi_mixup(x, perm, kept.float()),
                kept.float().repeat_interleave(b),
            )
        elif isinstance(self.base, CutMix):
            x_mixed, kept = self._nested(x, perm, draw)
            kept = kept.repeat_interleave(b)
        else:
            x_mixed, kept = self.base.mix(x, y, perm, _host_list(draw.lam), draw.grid, saliency)
        perm_k = torch.cat([perm + i * b for i in range(self.k)])
        return x_mixed, self.base.targets(y.repeat(self.k), perm_k, kept)

    def _nested(self, x, perm, draw: Draw):
        """K nested boxes pasted from the partners -> (x [K*b, C, h, w], kept [K] on x's
        device)."""
        h, w = x.shape[-2:]
        if isinstance(draw.centre, tuple):  # host draws: the host function
            boxes, kept = cutmix.nested_box_list(h, w, draw.lam, draw.centre)
            kept = shared.host_to_device(kept, x.device)
        else:
            boxes, kept = cutmix_boxes(h, w, torch.sqrt(draw.lam.double()),
                                       draw.centre.expand(self.k, 2))
            boxes, kept = boxes.unsqueeze(1), _to(kept.float(), x.device)
        # a loop over the K boxes
        return torch.cat([paste_boxes(x, perm, box) for box in boxes]), kept


def _host_list(lam) -> list:
    return list(lam) if isinstance(lam, (list, tuple)) else lam.tolist()


class RandomChoice:
    """One of `mixers` per batch (probabilities p; default uniform), as timm's `switch_prob`
    between mixup and CutMix. per_sample=True: one choice per example among mixers that keep the
    batch size (MixUp, CutMix): every mixer runs and each example takes its chosen one's output
    (vectorised; the cost is the sum of the mixers'). The per-batch choice is drawn from a host
    generator (`host_generator`, or seeded with `seed`): a host number steers which mixer runs,
    without reading the device."""

    def __init__(self, mixers: Sequence[Mixer], p: Sequence[float] | None = None,
                 per_sample: bool = False, host_generator: torch.Generator | None = None,
                 seed: int = 0):
        if not mixers:
            raise ValueError("RandomChoice needs at least one mixer")
        p = torch.full((len(mixers),), 1.0
                       / len(mixers)) if p is None else torch.as_tensor(p, dtype=torch.float64)
        if p.shape != (len(mixers),) or (p < 0).any() or abs(float(p.sum()) - 1) > 1e-6:
            raise ValueError(f"p must be {len(mixers)} probabilities summing to 1, got "
                             f"{p.tolist()}")
        if per_sample and not all(isinstance(m, (MixUp, CutMix)) for m in mixers):
            raise ValueError("a per-example choice needs mixers that keep the batch size "
                             "(MixUp, CutMix)")
        if len({m.target_kind for m in mixers}) > 1:
            raise ValueError("the mixers of a RandomChoice must give the same kind of targets")
        self.mixers, self.p, self.per_sample = list(mixers), p.float(), per_sample
        self.host_generator = host_generator or torch.Generator().manual_seed(seed)

    def __call__(self, x, y, generator=None):
        return self.apply(x, y, self.draw(x, generator))

    def draw(self, x, generator=None) -> Draw:
        if not self.per_sample:
            i = int(torch.multinomial(self.p, 1, generator=self.host_generator))
            d = self.mixers[i].draw(x, generator)
            return Draw(d.perm, d.lam, choice=torch.tensor(i), parts=(d,))
        parts = tuple(m.draw(x, generator) for m in self.mixers)
        g = self.mixers[0]._generator(x, generator)
        choice = torch.multinomial(self.p.to(g.device), x.shape[0], replacement=True, generator=g)
        return Draw(parts[0].perm, parts[0].lam, choice=choice, parts=parts)

    def apply(self, x, y, draw: Draw):
        if draw.choice.ndim == 0:
            return self.mixers[int(draw.choice)].apply(x, y, draw.parts[0])
        outs = [m.apply(x, y, d) for m, d in zip(self.mixers, draw.parts)]
        choice = _to(draw.choice, x.device)
        x_mixed, t = outs[0]
        for i, (xi, ti) in enumerate(outs[1:], 1):  # a loop over the mixers, not the examples
            pick = choice == i
            x_mixed = torch.where(pick.view(-1, *([1] * (x.ndim - 1))), xi, x_mixed)
            if isinstance(t, PairTargets):
                t = PairTargets(t.y_a, torch.where(pick, ti.y_b, t.y_b),
                                torch.where(pick, ti.lam, t.lam), t.label_smoothing)
            else:
                t = torch.where(pick.view(-1, 1), ti, t)
        return x_mixed, t


# -------------------------------------------------------------------------------------------------
# zeta-mixup: every example a p-series combination of the whole batch
# -------------------------------------------------------------------------------------------------


def zeta_weights(order: torch.Tensor, gamma: float = 2.8) -> torch.Tensor:
    """zeta-mixup's mixing matrix (Abhishek, Brown, Hamarneh, "Multi-sample zeta-mixup: richer,
    more realistic synthetic samples from a p-series interpolant", arXiv:2204.03323;
    kakumarabhishek/zeta-mixup `utils.py` `zeta_mixup_weights`). order [b, b]: independent uniform
    draws; row i sorted gives a random ranking 1..b of the batch, which is rotated so that example
    i itself has rank 1 (the official code's circular shift). W[i, j] = rank_ij^-gamma / sum_n
    n^-gamma: each row a convex combination dominated by example i. float32, as the official code
    computes it."""
    b = order.shape[0]
    # row i: a random permutation of 1..b (np.argsort(rand) + 1)
    ranks = torch.argsort(order, dim=1) + 1
    cols = torch.arange(b, device=order.device)
    # left shift that puts rank 1 on the diagonal
    shift = torch.argmax((ranks == 1).to(torch.int8), dim=1) - cols
    rotated = torch.gather(ranks, 1, (cols[None, :] + shift[:, None]) % b).to(torch.float32)
    w = torch.reciprocal(torch.pow(rotated, gamma))
    return w / w.sum(dim=1, keepdim=True)


class ZetaMixup(Mixer):
    """zeta-mixup (arXiv:2204.03323): x'_p = sum_i W[p, i] x_i and y'_p = sum_i W[p, i] onehot(y_i)
    with W = `zeta_weights(order, gamma)` (gamma = 2.8, the official default). Soft targets only (a
    combination of the whole batch has no pair to interpolate a loss between)."""

    def __init__(self, gamma: float = 2.8, num_classes: int | None = None,
                 label_smoothing: float = 0.0, generator: torch.Generator | None = None,
                 seed: int = 0):
        super().__init__(1.0, num_classes, label_smoothing=label_smoothing, targets="soft",
                         generator=generator, seed=seed)
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0 (the p-series exponent), got {gamma}")
        self.gamma = float(gamma)

    def draw(self, x, generator=None) -> Draw:
        g = self._generator(x, generator)
        b = x.shape[0]
        order = torch.rand(b, b, generator=g, device=g.device, dtype=torch.float64)
        return Draw(torch.arange(b, device=g.device), [1.0], order=order)

    def apply(self, x, y, draw: Draw):
        w = zeta_weights(_to(draw.order, x.device), self.gamma)
        mixed = torch.einsum("i...,pi->p...", x.to(torch.float32), w).to(x.dtype)
        soft = smooth_one_hot(y, self.num_classes, self.label_smoothing)
        return mixed, torch.einsum("pq,qj->pj", w, soft)
