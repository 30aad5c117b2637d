"""Speed of the MaxBoxAcc(V2) sweep: the fast evaluator vs the per-threshold OpenCV loop.

Both run in this process on the same CAM-like 224 x 224 maps (14 x 14 random fields upsampled
bicubically, one in four with added texture so that they fragment), at interval 0.001; the
numbers they produce are compared for exact equality. The ratio is reported for the mix and for
each family: the reference loop's cost grows with the number of contours (about 40 ms per smooth
map, 350 ms per fragmented one here), the fast sweep's much less. Times are CPU seconds of this
process (``time.process_time``), which is steadier than wall time on a shared machine.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wsol.metrics import HAVE_NUMBA, MaxBoxAccEvaluator, fast_best_ious, threshold_grid

__all__ = ["make_bench_maps", "run_wsol_bench", "write_bench_split", "run_whole_process_bench"]


def make_bench_maps(n: int, size: int = 224, seed: int = 0, texture_every: int = 4):
    """n (map [size, size] float64 in [0, 1], GT boxes [1, 4]) pairs; every `texture_every`-th map
    gets fine texture (more contours). Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x = torch.from_numpy(rng.standard_normal((1, 1, 14, 14))).float()
        m = F.interpolate(x, size=(size, size), mode="bicubic",
                          align_corners=False)[0, 0].double().numpy()
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
    # JIT warm-up (numba), not timed
    fast_best_ious(maps[0][0], maps[0][1], threshold_grid(interval))
    out = {"maps": n_maps, "reference_maps": n_reference, "map_size": 224, "interval": interval,
           "numba": HAVE_NUMBA, "repeats": repeats, "family_share": share}
    identical = True
    for tag, multi in (("v2", True), ("v1", False)):
        ref_ms, fast_ms, same = {}, {}, True
        # all maps: the families' counts summed
        whole = MaxBoxAccEvaluator(interval, ious, multi_contour=multi)
        for fam, fmaps in families.items():
            sub = fmaps[:max(1, round(n_reference * share[fam]))]
            ref, ref_cpu, _ = _time(lambda sub=sub, multi=multi: _run("reference", multi, sub,
                                                                      interval, ious),
                                    repeats)
            same &= _same(ref, _run("fast", multi, sub, interval, ious))
            fast, fast_cpu, _ = _time(lambda fmaps=fmaps, multi=multi: _run("fast", multi, fmaps,
                                                                            interval, ious),
                                      repeats)
            ref_ms[fam], fast_ms[fam] = 1000 * ref_cpu / len(sub), 1000 * fast_cpu / len(fmaps)
            whole.count += fast.count
            for d in ious:
                whole.num_correct[d] += fast.num_correct[d]
        mix_ref = sum(share[f] * ref_ms[f] for f in families)
        mix_fast = sum(share[f] * fast_ms[f] for f in families)
        out[f"maxboxacc_{tag}_speedup"] = mix_ref / mix_fast if mix_fast > 0 else float("inf")
        out[f"maxboxacc_{tag}_speedup_by_family"] = {f: ref_ms[f] / fast_ms[f] if fast_ms[f] > 0
                                                     else float("inf")
                                                     for f in families}
        out[f"{tag}_reference_ms_per_image"] = mix_ref
        out[f"{tag}_fast_ms_per_image"] = mix_fast
        out[f"{tag}_reference_ms_by_family"] = ref_ms
        out[f"{tag}_fast_ms_by_family"] = fast_ms
        out[f"{tag}_identical"] = same
        identical &= same
        res = whole.compute()
        out[f"{tag}_result_fast"] = res["maxboxacc_v2"] if multi else res["maxboxacc_v1"]
    out["identical"] = identical
    return out


# ----------------------------------------------------------------------------- whole process
def write_bench_split(root, n_maps: int, seed: int = 0, subsets=()) -> dict:
    """The bench maps saved like ``tools/run_wsol.py evaluate`` saves them
    (``<root>/maps/<id>.npy``, float32, 224 x 224) with a wsolevaluation metadata split of all of
    them (``<root>/all``) and one per size k in ``subsets`` (``<root>/first<k>``: the first k ids,
    the same 3:1 mix of families when k is a multiple of 4). Returns {"maps": dir, n_maps: dir of
    all, k: dir, ...}."""
    from wsol.data import WSOLMetadata, write_wsol_metadata

    root = Path(root)
    (root / "maps").mkdir(parents=True, exist_ok=True)
    ids, boxes = [], {}
    threads = torch.get_num_threads()
    # tiny interpolations: extra threads only contend (10x slower on a busy machine)
    torch.set_num_threads(1)
    try:
        maps = make_bench_maps(n_maps, seed=seed)
    finally:
        torch.set_num_threads(threads)
    for i, (m, gt) in enumerate(maps):
        iid = f"m{i:05d}.jpg"
        np.save(root / "maps" / f"{iid}.npy", m.astype(np.float32))
        ids.append(iid)
        boxes[iid] = gt.astype(np.float64)

    def split(name, k):
        sub = ids[:k]
        return write_wsol_metadata(WSOLMetadata(sub, {i: 0 for i in sub},
                                                {i: (224, 224) for i in sub},
                                                {i: boxes[i] for i in sub}), root / name)

    return {"maps": root / "maps", n_maps: split("all", n_maps),
            **{k: split(f"first{k}", k) for k in subsets}}


def _run_tool(cmd: list[str], repeats: int) -> tuple[float, float, dict]:
    """(wall-clock seconds, CPU seconds (user + sys, all threads), JSON output) of the fastest of
    `repeats` runs of the command, by wall clock."""
    env = dict(os.environ, MT_NO_PROGRESS="1")
    best = (float("inf"), float("inf"), None)
    for _ in range(repeats):
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): "
                               f"{proc.stderr.strip()[-2000:]}")
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        if wall < best[0]:
            best = (wall, cpu, json.loads(proc.stdout))
    return best


def _numbers(res: dict) -> dict:
    """The tool's JSON without the name of the implementation that ran."""
    return {k: v for k, v in res.items() if k != "sweep"}


def _extrapolate(t_one: float, t_sub: float, n_sub: int, n: int) -> float:
    """Time of n maps from the times of 1 and n_sub maps (start-up + n x per-map cost)."""
    return t_one + (n - 1) * (t_sub - t_one) / (n_sub - 1) if n_sub < n else t_sub


def run_whole_process_bench(tool, n_maps: int = 2000, n_reference: int = 64,
                            interval: float = 0.001, workers: int | None = None, repeats: int = 1,
                            seed: int = 0, workdir=None) -> dict:
    """Whole processes timed: ``python <tool>`` (tools/eval_wsol.py: start-up, imports, reading the
    metadata and ``n_maps`` .npy maps, the sweep, JSON) with its default threads (or ``workers``)
    and with one, vs the same tool with ``--reference``, the straightforward per-threshold OpenCV
    loop, in its own process.

    The reference is run on the first ``n_reference`` maps and on the first one (start-up + one
    map); its time on all maps is extrapolated linearly from those two (measured when ``n_reference
    >= n_maps``). Its numbers on those maps must equal the fast tool's on the same maps
    ("identical"). Ratios of wall clock and of CPU time (user + sys of every thread, steadier on a
    shared machine) are reported.
    """
    n_reference = min(max(2, n_reference), n_maps)
    base = [sys.executable, str(tool), "--cam-curve-interval", str(interval)]
    threads = [] if workers is None else ["--workers", str(workers)]
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        d = write_bench_split(Path(tmp), n_maps, seed, subsets=sorted({1, n_reference} - {n_maps}))

        def run(k, *extra):  # the tool on the first k maps
            return _run_tool(base + ["--metadata", str(d[k]), "--scoremaps", str(d["maps"]),
                                     *extra], repeats)

        # warm-up: the first run after installation compiles the numba kernels into their cache
        run(1)
        fast = run(n_maps, *threads)
        fast1 = run(n_maps, "--workers", "1")
        fast_one = run(1)
        fast_sub = run(n_reference, *threads)
        ref_sub = run(n_reference, "--reference")
        ref_one = run(1, "--reference")
    ref_wall = _extrapolate(ref_one[0], ref_sub[0], n_reference, n_maps)
    ref_cpu = _extrapolate(ref_one[1], ref_sub[1], n_reference, n_maps)
    return {
        "whole_process_speedup": ref_wall / fast[0],
        "whole_process_speedup_1_thread": ref_wall / fast1[0],
        "whole_process_cpu_ratio": ref_cpu / fast[1],
        "maps": n_maps, "reference_maps": n_reference, "workers": workers or "tool default",
        "repeats": repeats, "sweep": fast[2]["sweep"], "reference_sweep": ref_sub[2]["sweep"],
        "fast_s": fast[0], "fast_cpu_s": fast[1], "fast_1_thread_s": fast1[0],
        "fast_startup_s": fast_one[0], "reference_s": ref_wall, "reference_cpu_s": ref_cpu,
        "reference_measured_s": ref_sub[0], "reference_startup_s": ref_one[0],
        "reference_extrapolated": n_reference < n_maps,
        "identical": _numbers(fast_sub[2]) == _numbers(ref_sub[2]) and fast[2] == fast1[2],
        "maxboxacc_v2": fast[2]["maxboxacc_v2"],
    }
