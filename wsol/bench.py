"""Speed of the MaxBoxAcc(V2) sweep: the fast evaluator vs the per-threshold OpenCV loop.

Both run in this process on the same CAM-like 224 x 224 maps (14 x 14 random fields upsampled
bicubically, some with added texture so that they fragment), at interval 0.001; the numbers
they produce are compared for exact equality. Times are CPU seconds of this process
(``time.process_time``), which is steadier than wall time on a shared machine.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from wsol.metrics import HAVE_NUMBA, MaxBoxAccEvaluator, fast_best_ious, threshold_grid

__all__ = ["make_bench_maps", "run_wsol_bench"]


def make_bench_maps(n: int, size: int = 224, seed: int = 0, texture_every: int = 4):
    """n (map [size, size] float64 in [0, 1], GT boxes [1, 4]) pairs; every `texture_every`-th map
    gets fine texture (more contours). Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x = torch.from_numpy(rng.standard_normal((1, 1, 14, 14))).float()
        m = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)[0, 0].double().numpy()
        if texture_every and i % texture_every == texture_every - 1:
            m = m + 0.15 * rng.standard_normal(m.shape)
        m = (m - m.min()) / (m.max() - m.min())
        x0, y0 = rng.integers(0, size // 2, 2)
        w, h = rng.integers(size // 8, size // 2, 2)
        out.append((m, np.array([[x0, y0, min(x0 + w, size - 1), min(y0 + h, size - 1)]])))
    return out


def _time(fn, repeats: int = 1):
    """(result, CPU seconds, wall seconds) of fn; the fastest of `repeats` runs (timeit's rule: the
    slower runs measure interference from other processes, not the code)."""
    cpu = wall = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        w0 = time.perf_counter()
        result = fn()
        cpu, wall = min(cpu, time.process_time() - t0), min(wall, time.perf_counter() - w0)
    return result, cpu, wall


def _run(method, multi, maps, interval, ious):
    ev = MaxBoxAccEvaluator(interval, ious, multi_contour=multi, method=method)
    for m, gt in maps:
        ev.accumulate(m, gt)
    return ev


def run_wsol_bench(quick: bool = False, n_maps: int | None = None, n_reference: int | None = None,
                   interval: float = 0.001, seed: int = 0, repeats: int | None = None) -> dict:
    """Returns {"maxboxacc_v2_speedup": ratio, "maxboxacc_v1_speedup": ratio, per-image ms, "identical": bool, ...}.

    The reference loop is timed on the first ``n_reference`` maps (it is slow), the fast one on
    ``n_maps``; per-image times are compared, and results on the shared maps must be identical.
    Each side is timed ``repeats`` times (3; 1 with ``quick``) and its fastest run counts.
    """
    repeats = repeats or (1 if quick else 3)
    n_maps = n_maps or (16 if quick else 100)
    n_reference = min(n_maps, n_reference or (4 if quick else 16))
    maps = make_bench_maps(n_maps, seed=seed)
    ious = (30, 50, 70)
    fast_best_ious(maps[0][0], maps[0][1], threshold_grid(interval))  # JIT warm-up (numba), not timed
    out = {"maps": n_maps, "reference_maps": n_reference, "map_size": 224, "interval": interval,
           "numba": HAVE_NUMBA, "repeats": repeats}
    identical = True
    for tag, multi in (("v2", True), ("v1", False)):
        ref, ref_cpu, ref_wall = _time(lambda multi=multi: _run("reference", multi, maps[:n_reference], interval,
                                                                 ious), repeats)
        fast_sub = _run("fast", multi, maps[:n_reference], interval, ious)
        same = ref.compute() == fast_sub.compute() and all(
            np.array_equal(ref.num_correct[d], fast_sub.num_correct[d]) for d in ious)
        identical &= same
        fast, fast_cpu, fast_wall = _time(lambda multi=multi: _run("fast", multi, maps, interval, ious), repeats)
        ref_ms, fast_ms = 1000 * ref_cpu / n_reference, 1000 * fast_cpu / n_maps
        out[f"maxboxacc_{tag}_speedup"] = ref_ms / fast_ms if fast_ms > 0 else float("inf")
        out[f"{tag}_reference_ms_per_image"] = ref_ms
        out[f"{tag}_fast_ms_per_image"] = fast_ms
        out[f"{tag}_wall_speedup"] = (ref_wall / n_reference) / max(fast_wall / n_maps, 1e-12)
        out[f"{tag}_identical"] = same
        res = fast.compute()
        out[f"{tag}_result_fast"] = res["maxboxacc_v2"] if multi else res["maxboxacc"]["50"]
    out["identical"] = identical
    return out
