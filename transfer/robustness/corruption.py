"""Background corruption of validation images (multi-mix Table V; Co-Mixup protocol).

The foreground is the union of the ground-truth boxes; everything else is the background.
Two corruptions of the background:

- ``replace``: copy the same region of another (resized) validation image;
- ``noise``: add N(0, sigma^2) noise in [0, 1] pixel units, then clip to [0, 1].

Conventions: images are float tensors ``[3, H, W]`` (or ``[B, 3, H, W]``) in [0, 1]; boxes are
float ``[K, 4]`` ``x0, y0, x1, y1`` in continuous pixel coordinates (pixel column i spans [i, i +
1)). A pixel belongs to the foreground if a box covers any part of it, so no pixel touched by an
object is ever altered. Randomness (the noise, the choice of the other image) is passed in by the
caller.
"""

from __future__ import annotations

import math

import numpy as np
import torch

CORRUPTIONS = ("replace", "noise")


def foreground_mask(height: int, width: int, boxes) -> torch.Tensor:
    """Union of the boxes as a bool mask ``[H, W]`` (True = foreground, kept intact).

    boxes: ``[K, 4]`` float ``x0, y0, x1, y1`` (continuous pixel coordinates); they are clipped to
    the image. A pixel (row r, column c) spans [c, c+1) x [r, r+1) and is foreground when that
    square overlaps a box with positive area. K = 0 gives an all-False mask (the whole image is
    background).
    """
    mask = torch.zeros(height, width, dtype=torch.bool)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    for x0, y0, x1, y1 in boxes:
        x0, x1 = max(x0, 0.0), min(x1, float(width))
        y0, y1 = max(y0, 0.0), min(y1, float(height))
        if x1 <= x0 or y1 <= y0:
            continue
        c0, c1 = int(math.floor(x0)), int(math.ceil(x1))
        r0, r1 = int(math.floor(y0)), int(math.ceil(y1))
        mask[r0:r1, c0:c1] = True
    return mask


def replace_background(image: torch.Tensor, other: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """Pixels outside ``fg`` taken from ``other``.

    image, other: ``[3, H, W]`` (``other`` already resized to the same size); fg: bool ``[H, W]``.
    """
    if other.shape != image.shape:
        raise ValueError(f"replacement image has shape {tuple(other.shape)}, expected "
                         f"{tuple(image.shape)}")
    return torch.where(fg.to(image.device), image, other.to(image.dtype))


def noise_background(image: torch.Tensor, fg: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``clip(image + noise, 0, 1)`` outside ``fg``; unchanged inside.

    image, noise: ``[3, H, W]``; noise is the caller's draw, e.g. ``sigma * randn(...,
    generator=g)``.
    """
    return torch.where(fg.to(image.device), image, (image + noise).clamp(0.0, 1.0))


def partner_index(index: int, n: int, seed: int) -> int:
    """The other validation image whose background replaces image ``index``'s (never itself).

    Uniform over the ``n - 1`` other images, deterministic in (seed, index) and independent of
    batching, worker count and ``--limit``.
    """
    if n < 2:
        raise ValueError("background replacement needs at least two validation images")
    g = sample_generator(seed, index, stream=1)
    offset = 1 + int(torch.randint(n - 1, (1,), generator=g))
    return (index + offset) % n


def gaussian_noise(shape, sigma: float, seed: int, index: int) -> torch.Tensor:
    """The N(0, sigma^2) draw for image ``index``: deterministic in (seed, index)."""
    g = sample_generator(seed, index, stream=2)
    return torch.randn(shape, generator=g) * sigma


def sample_generator(seed: int, index: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for one (seed, sample, stream) triple, so per-image draws do not depend on
    order."""
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + int(index) * 7 + int(stream)) % (2**63 - 1))
    return g
