"""Training-data throughput per CPU core (`tools/bench.py data`): the PIL path, the uint8 path and
decode alone.

A generated ImageNet-layout folder of photo-like JPEGs (smooth colour fields plus sensor-like
noise, 500 x 375, quality 90, 4:2:0) is read through the real code: `ImageNetFolder` +
`SeededTransform` + the collate function, the worker's work per batch (fetch each item, collate)
done in this process on one thread (`torch.set_num_threads(1)`), so the process clock measures the
work of one core. The paths are timed round-robin batch by batch (`run_data_bench`), so a busy
neighbour slows them alike. Only ratios are targets.

  - pil:    read_image (PIL decode) -> RandomResizedCrop + flip (PIL) -> ToTensor (float)
            -> collate
  - uint8:  read_image_uint8 (torchvision.io decode_jpeg) -> crop + antialiased resize + flip
            (uint8) -> collate_uint8
            (the float conversion runs on the device, `batch_to_device`, and is not counted here)
  - decode: read_image_uint8 alone: the ceiling of any path that decodes the whole image on the
            CPU
  - pil_recipe, uint8_recipe (not with --quick): both with the ImageNet recipe's colour jitter
            0.4 + lighting 0.1; the PIL path applies them in the worker, the uint8 path only
            draws them there (the pixel work runs on the device, `color_augment`, not counted)
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate

from mixup_transfer.core.data import ImageNetFolder, read_image_uint8
from pretrain.data import (
    EpochSampler,
    SeededTransform,
    Uint8TrainTransform,
    collate_uint8,
    train_transform,
)

TARGETS = {"uint8_over_pil": (">=", 2.0), "decode_over_uint8": ("<=", 1.5)}


def write_jpegs(root: Path, n: int, size=(500, 375), quality: int = 90, classes: int = 4,
                seed: int = 0) -> float:
    """`n` photo-like JPEGs in `root/train/<class>/`; returns their mean file size in KB."""
    g = np.random.default_rng(seed)
    w, h = size
    total = 0
    for k in range(n):
        folder = root / "train" / f"n{k % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        low = Image.fromarray((g.random((6, 8, 3))
                               * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
        pixels = np.asarray(low).astype(np.float32) + g.normal(0.0, 10.0, (h, w, 3))
        path = folder / f"img_{k:05d}.JPEG"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=quality)
        total += path.stat().st_size
    return total / n / 1024


def _paths(root: Path, size: int, recipe: bool) -> dict:
    """{name: a function of one batch's sampler keys [(index, seed)]}: what a DataLoader worker
    does for a batch (fetch every item through SeededTransform, then collate), or the decode alone.
    recipe: also both paths with the ImageNet recipe's colour jitter 0.4 + lighting 0.1
    (`_base_imagenet.yaml`)."""
    pil_files = ImageNetFolder(root, "train", boxes=None)
    files = ImageNetFolder(root, "train", boxes=None, reader=read_image_uint8)
    out = {"decode": lambda keys: [files[index] for index, _ in keys]}
    for suffix, cj, light in [("", 0.0, 0.0)] + ([("_recipe", 0.4, 0.1)] if recipe else []):
        pil = SeededTransform(pil_files, train_transform(size, 0.08, True, cj, light))
        fast = SeededTransform(files, Uint8TrainTransform(size, 0.08, True, cj, light))
        out["pil" + suffix] = lambda keys, ds=pil: default_collate([ds[k] for k in keys])
        out["uint8" + suffix] = lambda keys, ds=fast: collate_uint8([ds[k] for k in keys])
    return out


def run_data_bench(quick: bool = False, n: int = 320, size: int = 224, batch: int = 32,
                   repeats: int = 3, root: str | None = None) -> dict:
    """{"img_per_s_per_core": {path: ...}, "ratios": ..., "targets": ..., "setup": ...} (see the
    module doc).

    Round-robin at the batch level: for every repeat and batch, each path processes that batch
    once; a path's time is the sum over batches of its fastest repeat (noise on a shared machine
    only ever adds time).
    quick: 96 images, 2 repeats, no recipe paths. root: an existing ImageNet-layout folder instead
    of the generated JPEGs."""
    if quick:
        n, repeats = 96, 2
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            kb = None
            if root is None:
                root = Path(tmp) / "imagenet"
                kb = write_jpegs(root, n)
            n = min(n, len(ImageNetFolder(root, "train", boxes=None))) // batch * batch
            keys = list(EpochSampler(n, batch, seed=0, subset=list(range(n))))
            batches = [keys[b:b + batch] for b in range(0, n, batch)]
            runs = _paths(Path(root), size, recipe=not quick)
            times = {name: torch.full((repeats, len(batches)), float("inf"), dtype=torch.float64)
                     for name in runs}
            for r in range(repeats + 1):
                for b, ks in enumerate(batches):
                    for name, fn in runs.items():
                        t0 = time.process_time()
                        fn(ks)
                        if r:  # the first round warms the page cache and the allocators
                            times[name][r - 1, b] = time.process_time() - t0
    finally:
        torch.set_num_threads(old_threads)
    return _summary(times, n, size, batch, repeats, kb, root)


def _summary(times: dict, n: int, size: int, batch: int, repeats: int, kb, root) -> dict:
    best = {k: n / float(v.min(0).values.sum()) for k, v in times.items()}  # [repeats, batches]
    ratios = {"uint8_over_pil": best["uint8"] / best["pil"],
              "decode_over_uint8": best["decode"] / best["uint8"],
              "decode_over_pil": best["decode"] / best["pil"]}
    if "pil_recipe" in best:
        ratios["uint8_over_pil_recipe"] = best["uint8_recipe"] / best["pil_recipe"]
    targets = {}
    for k, (op, t) in TARGETS.items():
        targets[k] = {"target": f"{op} {t}", "ratio": round(ratios[k], 3),
                      "ok": ratios[k] >= t if op == ">=" else ratios[k] <= t}
    return {
        "img_per_s_per_core": {k: round(v, 1) for k, v in best.items()},
        "img_per_s_per_core_median": {k: round(n / float(v.sum(1).median()), 1)
                                      for k, v in times.items()},
        "ms_per_image": {k: round(1000 / v, 3) for k, v in best.items()},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "targets": targets,
        "setup": {"images": n, "image_size": "500x375 JPEG q90" if kb else str(root),
                  "mean_file_kb": round(kb, 1) if kb else None, "crop": size, "batch": batch,
                  "repeats": repeats, "threads": 1, "workers": 0,
                  "clock": "process (CPU time of this process)",
                  "note": "decode_over_pil is the most any full-decode path can gain over the "
                          "PIL path; uint8_recipe counts only the worker's share (colour ops "
                          "run on the device)"},
    }
