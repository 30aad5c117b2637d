"""Speed of the MaxBoxAcc(V2) sweep: the fast evaluator vs the per-threshold OpenCV loop.

Both run in this process on the same CAM-like 224 x 224 maps (14 x 14 random fields upsampled
bicubically, one in four with added texture so that they fragment), at interval 0.001; the
numbers they produce are compared for exact equality. The ratio is reported for the mix and for
each family: the reference loop's cost grows with the number of contours (about 40 ms per smooth
map, 350 ms per fragmented one here), the fast sweep's much less. Times are CPU seconds of this
process (``time.process_time``), which is steadier than wall time on a shared machine.
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


def _same(a: MaxBoxAccEvaluator, b: MaxBoxAccEvaluator) -> bool:
    return a.compute() == b.compute() and all(np.array_equal(a.num_correct[d], b.num_correct[d])
                                              for d in a.iou_thresholds)


def run_wsol_bench(quick: bool = False, n_maps: int | None = None, n_reference: int | None = None,
                   interval: float = 0.001, seed: int = 0, repeats: int | None = None) -> dict:
    """Returns {"maxboxacc_v2_speedup": ratio, "maxboxacc_v1_speedup": ratio, per-family ratios,
    per-image ms, "identical": bool, ...}.

    Two families of maps: "smooth" (the plain upsampled fields, 3 in 4) and "fragmented" (with
    texture, 1 in 4). Per family, the reference loop is timed on its first maps (``n_reference`` in
    all: it is slow) and the fast one on all of them; the headline ratio is that of the mean
    per-image times over the mix, and results on the maps both ran must be identical. Each side is
    timed ``repeats`` times (3; 1 with ``quick``) and its fastest run counts.
    """
    repeats = repeats or (1 if quick else 3)
    n_maps = n_maps or (16 if quick else 100)
    n_reference = min(n_maps, n_reference or (4 if quick else 16))
    maps = make_bench_maps(n_maps, seed=seed)
    families = {"smooth": [m for i, m in enumerate(maps) if i % 4 != 3],
                "fragmented": [m for i, m in enumerate(maps) if i % 4 == 3]}
    share = {f: len(fm) / n_maps for f, fm in families.items()}
    ious = (30, 50, 70)
    fast_best_ious(maps[0][0], maps[0][1], threshold_grid(interval))  # JIT warm-up (numba), not timed
    out = {"maps": n_maps, "reference_maps": n_reference, "map_size": 224, "interval": interval,
           "numba": HAVE_NUMBA, "repeats": repeats, "family_share": share}
    identical = True
    for tag, multi in (("v2", True), ("v1", False)):
        ref_ms, fast_ms, same = {}, {}, True
        whole = MaxBoxAccEvaluator(interval, ious, multi_contour=multi)  # all maps: the families' counts summed
        for fam, fmaps in families.items():
            sub = fmaps[:max(1, round(n_reference * share[fam]))]
            ref, ref_cpu, _ = _time(lambda sub=sub: _run("reference", multi, sub, interval, ious), repeats)
            same &= _same(ref, _run("fast", multi, sub, interval, ious))
            fast, fast_cpu, _ = _time(lambda fmaps=fmaps: _run("fast", multi, fmaps, interval, ious), repeats)
            ref_ms[fam], fast_ms[fam] = 1000 * ref_cpu / len(sub), 1000 * fast_cpu / len(fmaps)
            whole.count += fast.count
            for d in ious:
                whole.num_correct[d] += fast.num_correct[d]
        mix_ref = sum(share[f] * ref_ms[f] for f in families)
        mix_fast = sum(share[f] * fast_ms[f] for f in families)
        out[f"maxboxacc_{tag}_speedup"] = mix_ref / mix_fast if mix_fast > 0 else float("inf")
        out[f"maxboxacc_{tag}_speedup_by_family"] = {f: ref_ms[f] / fast_ms[f] if fast_ms[f] > 0 else float("inf")
                                                     for f in families}
        out[f"{tag}_reference_ms_per_image"] = mix_ref
        out[f"{tag}_fast_ms_per_image"] = mix_fast
        out[f"{tag}_reference_ms_by_family"] = ref_ms
        out[f"{tag}_fast_ms_by_family"] = fast_ms
        out[f"{tag}_identical"] = same
        identical &= same
        res = whole.compute()
        out[f"{tag}_result_fast"] = res["maxboxacc_v2"] if multi else res["maxboxacc"]["50"]
    out["identical"] = identical
    return out
