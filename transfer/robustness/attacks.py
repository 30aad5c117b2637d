"""White-box l_inf attacks in [0, 1] pixel space: FGSM and PGD (Madry et al.).

The model takes images in [0, 1] and normalises them itself, so ``eps`` and ``step`` are pixel
units (8/255 means eight grey levels). Both attacks maximise the cross-entropy of the true label,
work on a whole batch at once and return detached images clipped to [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _loss_grad(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d CE(model(x), y) / dx, summed over the batch (each image's gradient is its own term)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x).float(), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def fgsm(model, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Fast gradient sign method: ``clip(x + eps * sign(grad_x CE), 0, 1)``.

    x: ``[B, C, H, W]`` in [0, 1]; y: ``[B]`` int64 labels.
    """
    grad = _loss_grad(model, x, y)
    return (x.detach() + eps * grad.sign()).clamp(0.0, 1.0)


def pgd(model, x: torch.Tensor, y: torch.Tensor, eps: float, step: float, iters: int = 10,
        random_start: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected gradient descent on the l_inf ball of radius ``eps`` around ``x``, inside [0, 1].

    Start: ``x`` (or ``x + U(-eps, eps)`` with ``random_start``, drawn on CPU from ``generator`` so
    the run is repeatable on any device). Each of ``iters`` steps: ``x += step * sign(grad)``, then
    project onto ``[x0 - eps, x0 + eps]`` and ``[0, 1]``.
    """
    x0 = x.detach()
    lo, hi = (x0 - eps).clamp(min=0.0), (x0 + eps).clamp(max=1.0)
    adv = x0.clone()
    if random_start:
        delta = torch.rand(x0.shape, generator=generator, dtype=torch.float32) * (2 * eps) - eps
        adv = (adv + delta.to(x0.device, x0.dtype)).clamp(0.0, 1.0)
    for _ in range(iters):
        grad = _loss_grad(model, adv, y)
        adv = torch.maximum(torch.minimum(adv + step * grad.sign(), hi), lo)
    return adv.detach()
