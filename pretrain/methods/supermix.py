"""SuperMix (Dabouei et al., "SuperMix: Supervising the Mixing Data Augmentation",
arXiv:2003.05034): K images mixed by per-pixel masks that a frozen teacher optimises, so that the
teacher predicts the mixed image as the Dirichlet-weighted mix of the teacher's labels of its
inputs.

The mask optimisation equals the official code (alldbi/SuperMix, `supermix.py:mix_batch` with its
`Smoothing`, `mask_process` and `kldiv2`) on tests/fixtures/supermix_official.npz. The official
code writes the mixed images to disk first and trains the student on them afterwards
(`train_student.py`, Eq. 9: cross-entropy on clean images with their labels plus cross-entropy on
mixed images with the teacher's label); here the masks are optimised on every training batch. The
official loop stops when at most `tol` of the batch is still unmixed, a decision read back from the
device: here the loop always runs `max_iter` iterations, and the same decision, kept on the device,
freezes every mask from the iteration where the official loop would stop, so the masks are the
official ones without a read-back. Unmixed examples (the official code drops them) get weight 0.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from pretrain.methods.base import Method, host_to_device, one_hot


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """The official smoothing kernel [k], k = int(5 sigma): a Gaussian of standard deviation sigma
    (in mask pixels) sampled at the k centred offsets, normalised to sum 1."""
    k = int(sigma * 5.0)
    offsets = (torch.arange(k, dtype=torch.float32) - (k - 1.0) / 2.0) * 5.0
    kernel = 1.0 / (k * math.sqrt(2.0 * math.pi)) * torch.exp(-((offsets / k) ** 2) * 0.5)
    return kernel / kernel.sum()


def smooth(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """[n, 1, w, w] -> [n, 1, w, w]: the separable Gaussian of `gaussian_kernel`, zero padding (one
    less before than after for an even kernel), rows then columns; sigma <= 0 returns x."""
    if sigma <= 0:
        return x
    kernel = gaussian_kernel(sigma).to(x.device, x.dtype)
    k = kernel.numel()
    before, after = k // 2 - (1 - k % 2), k // 2
    x = F.pad(x, (before, after, before, after))
    x = F.conv2d(x, kernel.view(1, 1, k, 1))
    return F.conv2d(x, kernel.view(1, 1, 1, k))


def mask_weights(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """mask logits [b, K, 1, w, w] -> per-pixel mixing weights [b, K, 1, h, w'] (bilinear
    upsampling, sigmoid, normalised to sum 1 over the K images)."""
    b, k = mask.shape[:2]
    m = F.interpolate(mask.reshape(b * k, 1, *mask.shape[-2:]), size=size, mode="bilinear",
                      align_corners=False)
    m = torch.sigmoid(m).view(b, k, 1, *size)
    return m / m.sum(1, keepdim=True)


def cyclic_sets(b: int, k: int, device=None) -> torch.Tensor:
    """[b, K]: set j mixes examples j, j + 1, ..., j + K - 1 (mod b), as the official code's
    shifted indexes."""
    return (torch.arange(b, device=device).view(b, 1)
            + torch.arange(k, device=device).view(1, k)) % b


def set_targets(labels: torch.Tensor, sets: torch.Tensor, lams: torch.Tensor,
                num_classes: int) -> torch.Tensor:
    """The official soft targets (paper Eq. 2): sum_k lams[j, k] one_hot(labels[sets[j, k]]).
    labels [b] (the teacher's predictions), sets [b, K], lams [b, K] -> [b, c]."""
    return (one_hot(labels[sets], num_classes) * lams.unsqueeze(-1)).sum(1)


def _top_k_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(scores, k, 1).indices.sort(1).values


def mask_step(teacher, inputs, mask, targets, active, lambda_s: float, sigma: float):
    """One official iteration on the mask logits [b, K, 1, w, w] (inputs [b, K, 3, h, w], targets
    [b, c], active [b] = 1 where the example still moves): the gradient of KL(targets ||
    teacher(mix)) + lambda_s * the mean of |m (m - 1)|, smoothed, scaled by
    |loss| / <grad, smoothed grad> (clamped to [1e-4, 2000]), a step against it. -> the new mask
    logits."""
    b, k = mask.shape[:2]
    m = mask.detach().requires_grad_(True)
    with torch.enable_grad():
        weights = mask_weights(m, inputs.shape[-2:])
        logp = F.log_softmax(teacher((weights * inputs).sum(1)).float(), 1)
        kl = F.kl_div(logp, targets, reduction="none").sum(1)
        # the official order
        sparsity = (weights * (weights - 1)).abs().mean(1).mean(1).mean(1).mean(1)
        loss = (kl + sparsity * lambda_s) * active
        (grad,) = torch.autograd.grad(loss.sum(), m)
    smoothed = smooth(grad.reshape(b * k, 1, *grad.shape[-2:]), sigma).view_as(grad)
    dot = torch.diag(grad.reshape(b, -1) @ smoothed.reshape(b, -1).t())  # the official sum order
    step = (loss.detach().abs() / (dot + 1e-10)).clamp(1e-4, 2000)
    return mask - step.view(b, 1, 1, 1, 1) * smoothed * active.view(b, 1, 1, 1, 1)


def optimise_masks(teacher, inputs, targets, mask_w: int = 8, sigma: float = 1.0,
                   lambda_s: float = 25.0, max_iter: int = 50, tol: int = 0):
    """The official `mix_batch` loop, without its read-back. inputs [b, K, 3, h, w] (set j of the
    batch), targets [b, c] (`set_targets`), teacher: images -> logits (frozen, eval). Every
    iteration moves the examples whose teacher top-K labels (as a set) still differ from the
    targets'; the official loop stops once at most `tol` of them remain, which here freezes the
    masks. -> (mixed [b, 3, h, w], weights [b, K, 1, h, w], teacher logits on the mixed images [b,
    c], mixed_ok [b] bool: the top-K labels agree)."""
    b, k = inputs.shape[:2]
    ref = _top_k_sorted(targets, k)
    mask = torch.zeros(b, k, 1, mask_w, mask_w, device=inputs.device)
    active = torch.ones(b, device=inputs.device)
    for _ in range(max_iter):
        running = (active.sum() > tol).float()  # the official loop's condition, on the device
        mask = mask_step(teacher, inputs, mask, targets, active * running, lambda_s, sigma)
        weights = mask_weights(mask, inputs.shape[-2:])
        mixed = (weights * inputs).sum(1)
        with torch.no_grad():
            logits = teacher(mixed).float()
        unmixed = (_top_k_sorted(logits, k) != ref).any(1).float()
        # kept once the official loop has stopped
        active = unmixed * running + active * (1 - running)
    return mixed.detach(), weights.detach(), logits, unmixed == 0


def per_example_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every example: logits [n, c] or [n, c, r] (dense loss: averaged over the r
    positions), labels [n] -> [n]."""
    logp = F.log_softmax(logits.float(), dim=1)
    picked = logp.gather(
        1, labels.view(-1, *([1] * (logits.ndim - 1))).expand(-1, 1, *logits.shape[2:])
    )
    return -picked.flatten(1).mean(1)


class SuperMix(Method):
    """SuperMix as the official code trains with it (supermix.py defaults; train_student.py's loss,
    paper Eq. 9): every training batch forms b sets of K examples (cyclic shifts), draws
    Dirichlet(alpha) weights per set, and optimises mask logits of side `mask_w` (`optimise_masks`:
    sigma, lambda_s, max_iter, tol the percentage of the batch allowed to stay unmixed) so that the
    frozen teacher predicts the weighted mix of its own labels. The loss is cls_weight * (CE(clean
    images, labels) + CE(mixed images, the teacher's label of each)), the second averaged over the
    examples whose masks succeeded. The teacher is set by the pretraining task from the config's
    `teacher` checkpoint."""

    needs_teacher = True

    def __init__(self, model, num_classes, k: int = 2, alpha: float = 3.0, mask_w: int = 8,
                 sigma: float = 1.0, lambda_s: float = 25.0, max_iter: int = 50, tol: float = 70.0,
                 cls_weight: float = 2.0, dense_loss: bool = False):
        super().__init__(model, num_classes, dense_loss)
        if (
            int(k) < 2
            or not alpha > 0
            or int(mask_w) < 1
            or int(max_iter) < 1
            or not 0 <= tol <= 100
        ):
            raise ValueError("supermix needs k >= 2, alpha > 0, mask_w >= 1, max_iter >= 1 and "
                             f"tol in [0, 100]; got k={k}, alpha={alpha}, mask_w={mask_w}, "
                             f"max_iter={max_iter}, tol={tol}")
        self.k, self.alpha, self.mask_w = int(k), float(alpha), int(mask_w)
        self.sigma = float(sigma)
        self.lambda_s, self.max_iter, self.tol = float(lambda_s), int(max_iter), tol
        self.cls_weight = cls_weight

    def mix(self, images):
        """-> (mixed images [b, 3, h, w], the teacher's labels of them [b], mixed_ok [b] bool)."""
        if self.teacher is None:
            raise RuntimeError("supermix needs a teacher network: set the pretraining config's "
                               "`teacher` key to a backbone checkpoint (or method.teacher in "
                               "the library)")
        b = images.shape[0]
        sets = cyclic_sets(b, self.k, images.device)
        lams = host_to_device(self.host_rng.dirichlet(np.full(self.k, self.alpha), size=b),
                              images.device)
        with torch.no_grad():
            labels = self.teacher(images).argmax(1)
        targets = set_targets(labels, sets, lams, self.num_classes)
        mixed, _, logits, ok = optimise_masks(self.teacher, images.detach()[sets], targets,
                                              self.mask_w, self.sigma, self.lambda_s,
                                              self.max_iter, int(b * self.tol / 100))
        return mixed, logits.argmax(1), ok

    def forward(self, images, labels):
        mixed, teacher_labels, ok = self.mix(images)
        clean = self.loss_of(self.logits_of(self.model.features(images)), self.targets(labels))
        per = per_example_ce(self.logits_of(self.model.features(mixed)), teacher_labels)
        weight = ok.to(per.dtype)
        return {"loss": self.cls_weight * clean,
                "loss_mixed": self.cls_weight * (per * weight).sum() / weight.sum().clamp_min(1.0)}
