"""The one learning-rate schedule of every stage: a factor of each parameter group's base lr.

`t` is measured in the schedule's own unit: fractional epochs for pretraining, iterations for
detection (the reference recipes' unit), whole epochs for WSOL fine-tuning (the lr changes only at
epoch starts). Each stage's config is translated to these arguments once, at its edge.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence

KINDS = ("step", "cosine", "piecewise", "constant")


def lr_factor(t: float, kind: str = "constant", *, total: float = 1.0,
              milestones: Sequence[float] = (), gamma: float = 0.1,
              points: Sequence[Sequence[float]] | None = None, min_factor: float = 0.0,
              warmup: float = 0.0, warmup_start: float = 1.0) -> float:
    """Multiplier of the base learning rate at time `t`.

    step: ``gamma ** (number of milestones <= t)``; cosine: from 1 to `min_factor` over `total`;
    piecewise: linear between ``points`` ``[[t, factor], ...]`` (repeat a t to jump); constant: 1.
    Warm-up (``t < warmup``) multiplies the schedule by ``warmup_start * (1 - a) + a`` with ``a = t
    / warmup``, detectron2's linear warm-up.
    """
    if kind == "step":
        f = gamma ** sum(1 for m in milestones if t >= m)
    elif kind == "cosine":
        u = min(t / max(total, 1e-12), 1.0)
        f = min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * u))
    elif kind == "piecewise":
        f = _piecewise(t, points)
    elif kind == "constant":
        f = 1.0
    else:
        raise ValueError(f"schedule must be one of {list(KINDS)}, got {kind!r}")
    if warmup and t < warmup:
        a = t / warmup
        f *= warmup_start * (1 - a) + a
    return f


def _piecewise(t: float, points) -> float:
    if not points:
        raise ValueError("a piecewise schedule needs points: [[t, factor], ...]")
    xs = [float(p[0]) for p in points]
    if t <= xs[0]:
        return float(points[0][1])
    if t >= xs[-1]:
        return float(points[-1][1])
    i = bisect_right(xs, t)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return float(y0) if x1 == x0 else float(y0) + (float(y1) - float(y0)) * (t - x0) / (x1 - x0)
