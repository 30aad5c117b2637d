"""Speed of the robustness suites: images/s of a clean forward, FGSM and PGD on the machine that
runs it, and the sorting-based OOD metrics against the direct O(n^2) pair count.

``run_robustness_bench(quick=False) -> dict`` (JSON-able).
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import torch

from mixup_transfer.core.checkpoint import build_resnet
from mixup_transfer.core.runtime import get_device

from .attacks import fgsm, pgd
from .model import NormalizedClassifier
from .ood import auroc


def _rate(fn, n_images: int, repeats: int, device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n_images * repeats / (time.perf_counter() - t0)


def run_robustness_bench(quick: bool = False, arch: str | None = None,
                         image_size: int | None = None, batch_size: int | None = None,
                         device: str = "auto") -> dict:
    """images/s for clean / FGSM / PGD-10 and the OOD-metric speed-up; small sizes on CPU."""
    dev = get_device(device)
    cpu = dev.type == "cpu"
    arch = arch or ("resnet18" if cpu else "resnet50")
    image_size = image_size or (64 if cpu else 224)
    batch_size = batch_size or (8 if cpu else 128)
    repeats = 1 if quick else 3
    model = NormalizedClassifier(build_resnet(arch, num_classes=10 if cpu
                                              else 1000)).to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch_size, 3, image_size, image_size, generator=g).to(dev)
    y = torch.zeros(batch_size, dtype=torch.int64, device=dev)

    def clean():
        with torch.no_grad():
            model(x)

    res = {"device": str(dev), "arch": arch, "image_size": image_size, "batch_size": batch_size,
           "clean_images_per_s": _rate(clean, batch_size, repeats, dev),
           "fgsm_images_per_s": _rate(lambda: fgsm(model, x, y, 8 / 255), batch_size, repeats,
                                      dev),
           "pgd10_images_per_s": _rate(lambda: pgd(model, x, y, 4 / 255, 2 / 255, 10, True, g),
                                       batch_size, 1, dev)}
    rng = np.random.default_rng(0)
    n = 300 if quick else 1000
    pos, neg = rng.random(n), rng.random(n) * 0.9
    t0 = time.perf_counter()
    fast = auroc(pos, neg)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    direct = np.mean([1.0 if p > q else 0.5 if p == q else 0.0
                      for p, q in itertools.product(pos, neg)])
    t_direct = time.perf_counter() - t0
    res.update(auroc_n=n, auroc_sort_s=t_fast, auroc_direct_s=t_direct,
               auroc_speedup=t_direct / max(t_fast, 1e-9),
               auroc_agree=bool(abs(fast - direct) < 1e-12))
    return res
