"""Time of one mixing call of `pretrain.mixers` against timm's `Mixup` (modes batch / pair / elem)
and torchvision's `v2.MixUp` / `v2.CutMix` on the same batches (`tools/bench.py mixers`).

Every call gets a fresh copy of one batch (timm mixes in place), made outside the timer;
implementations are timed round-robin (every repeat times each once, so a noisy neighbour slows all
alike) and each keeps its fastest repeat. Every call returns the mixed images and soft targets [b,
c] (no label smoothing). timm is an optional extra (`pip install 'mixup-transfer[bench]'`): without
it its rows are skipped with a printed line.
"""

from __future__ import annotations

import sys
import time

import torch

from pretrain import mixers

# (row, ours, [(competitor label, kind, knobs)]): per-sample rows compare against timm's per-sample
# modes
ROWS = [
    ("mixup batch", ("mixup", False),
     [("timm batch", "timm", "mixup", "batch"), ("torchvision", "tv", "mixup", "")]),
    ("mixup per-sample", ("mixup", True), [("timm elem", "timm", "mixup", "elem"),
                                           ("timm pair", "timm", "mixup", "pair")]),
    ("cutmix batch", ("cutmix", False), [("timm batch", "timm", "cutmix", "batch"),
                                         ("torchvision", "tv", "cutmix", "")]),
    ("cutmix per-sample", ("cutmix", True), [("timm elem", "timm", "cutmix", "elem"),
                                             ("timm pair", "timm", "cutmix", "pair")]),
]
GOALS = {"per-sample vs timm elem": 10.0, "batch vs timm batch": 1.0, "batch vs torchvision": 1.0}


def _ours(method: str, per_sample: bool, num_classes: int, device):
    cls = mixers.MixUp if method == "mixup" else mixers.CutMix
    g = torch.Generator(device=device).manual_seed(0)
    return cls(1.0, num_classes, per_sample=per_sample, generator=g)


def _competitor(kind: str, method: str, mode: str, num_classes: int):
    """A callable (x, y) -> (x, soft targets), or None when the library is missing."""
    if kind == "tv":
        from torchvision.transforms import v2  # noqa: PLC0415

        tf = v2.MixUp(alpha=1.0, num_classes=num_classes) if method == "mixup" else v2.CutMix(
            alpha=1.0, num_classes=num_classes)
        return lambda x, y: tf(x, y)
    try:
        from timm.data import Mixup  # noqa: PLC0415
    except ImportError:
        return None
    alphas = (
        {"mixup_alpha": 1.0, "cutmix_alpha": 0.0}
        if method == "mixup"
        else {"mixup_alpha": 0.0, "cutmix_alpha": 1.0}
    )
    return Mixup(**alphas, mode=mode, label_smoothing=0.0, num_classes=num_classes)


def _time_once(fn, x, y, timer, sync) -> float:
    xc = x.clone()
    sync()
    t0 = timer()
    out = fn(xc, y)
    sync()
    dt = timer() - t0
    del out
    return dt


def run_mixer_bench(batch: int = 256, size: int = 224, num_classes: int = 1000, repeats: int = 5,
                    device: str = "cpu", threads: int | None = 1, clock: str = "auto") -> dict:
    """{"rows": [{"row", "ours_ms", competitor label: {"ms", "ratio"}}], "setup", "skipped",
    "goals"}; a ratio is the competitor's time / ours (> 1: ours is faster). threads: torch threads
    on CPU (restored after).
    clock: "process" (CPU time of this process, the work itself on a shared CPU), "wall", or "auto"
    (process on CPU, wall on CUDA)."""
    dev = torch.device(device)
    clock = ("wall" if dev.type == "cuda" else "process") if clock == "auto" else clock
    timer = time.perf_counter if clock == "wall" else time.process_time
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    old = torch.get_num_threads()
    if threads and dev.type == "cpu":
        torch.set_num_threads(threads)
    try:
        g = torch.Generator(device=dev).manual_seed(1)
        x = torch.rand(batch, 3, size, size, generator=g, device=dev)
        y = torch.randint(num_classes, (batch,), generator=g, device=dev)
        rows, skipped = _time_rows(x, y, num_classes, repeats, timer, sync, dev)
    finally:
        torch.set_num_threads(old)
    setup = {"batch": batch, "size": size, "num_classes": num_classes, "repeats": repeats,
             "device": str(dev), "threads": threads if threads else torch.get_num_threads(),
             "clock": clock}
    return {"rows": rows, "setup": setup, "skipped": skipped, "goals": _goals(rows)}


def _time_rows(x, y, num_classes, repeats, timer, sync, dev):
    rows, skipped = [], []
    for label, (method, per_sample), others in ROWS:
        impls = {"ours": _ours(method, per_sample, num_classes, dev)}
        for name, kind, meth, mode in others:
            fn = _competitor(kind, meth, mode, num_classes)
            if fn is None:
                if "timm" not in skipped:
                    print("[bench] mixers: timm rows skipped (timm not installed: pip install "
                          "timm)", file=sys.stderr)
                    skipped.append("timm")
                continue
            impls[name] = fn
        for fn in impls.values():  # warm-up (allocator, first-call set-up)
            _time_once(fn, x, y, timer, sync)
        best = {k: float("inf") for k in impls}
        for _ in range(repeats):
            for k, fn in impls.items():
                best[k] = min(best[k], _time_once(fn, x, y, timer, sync))
        row = {"row": label, "ours_ms": round(best["ours"] * 1e3, 3)}
        for k in impls:
            if k != "ours":
                row[k] = {"ms": round(best[k] * 1e3, 3), "ratio": round(best[k] / best["ours"], 2)}
        rows.append(row)
    return rows, skipped


def _goals(rows) -> dict:
    """The measured ratio against each goal (competitor time / ours; the goal is the least
    acceptable)."""
    out = {}
    for row in rows:
        kind = "per-sample" if "per-sample" in row["row"] else "batch"
        for name in ("timm elem", "timm batch", "torchvision"):
            key = f"{kind} vs {name}"
            if name in row and key in GOALS:
                r = row[name]["ratio"]
                out[f"{row['row']} vs {name}"] = {"ratio": r, "goal": GOALS[key],
                                                  "ok": r >= GOALS[key]}
    return out


def to_markdown(res: dict) -> list[str]:
    st = res["setup"]
    lines = [f"## Mixing calls ({st['device']}, batch {st['batch']}, {st['size']} px, "
             f"{st['clock']} clock, {st['threads']} thread(s)); ratio = their time / ours", "",
             "| row | ours ms | competitor | their ms | ratio |", "|---|---:|---|---:|---:|"]
    for row in res["rows"]:
        others = [(k, v) for k, v in row.items() if isinstance(v, dict)]
        for k, v in others or [("-", {"ms": "", "ratio": ""})]:
            lines.append(f"| {row['row']} | {row['ours_ms']} | {k} | {v['ms']} | {v['ratio']} |")
    lines += ["", "| goal | ratio | at least | ok |", "|---|---:|---:|---|"]
    lines += [f"| {k} | {v['ratio']} | {v['goal']} | {v['ok']} |" for k, v in res["goals"].items()]
    if res["skipped"]:
        lines.append(f"\nSkipped: {', '.join(res['skipped'])} (not installed).")
    return lines + [""]
