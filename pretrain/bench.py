"""Training-step time of each mixing method relative to ERM (`tools/bench.py pretrain`).

One model, one batch, one resolution; a step is forward + backward + SGD update. Methods are timed
round-robin (every repeat times each method once), so a noisy neighbour on a shared machine slows
all methods alike instead of biasing one; the ratio uses each method's fastest repeat (the median
is reported too).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from pretrain.methods import build_method, have_gco, network_stages

# (label, method name, knobs). Feature-space methods are forced onto their mixing branch (prob 1,
# AlignMix's aligned-feature mode) so that the ratio is the cost of the mixing itself, the worst
# case.
FULL = [
    ("erm", "erm", {}),
    ("input_mixup", "input_mixup", {}),
    ("multimix", "multimix", {"prob": 1.0}),
    ("dense_multimix", "dense_multimix", {"prob": 1.0}),
    ("alignmix", "alignmix", {}),  # the released code: its own mode draw (input 1/2, aligned 1/2)
    ("alignmix_stage2", "alignmix_stage2", {"modes": ["feat", "feat_rev"]}),
    ("multi_interp_manifold_embedding_k5", "multi_interp",
     {"base": "manifold", "layers": [5], "k": 5}),
    ("multi_interp_manifold_layer2_k5", "multi_interp",
     {"base": "manifold", "layers": [2], "k": 5}),
    ("multi_interp_input_k5", "multi_interp", {"base": "input", "k": 5}),
    ("cutmix", "cutmix", {}),
    ("puzzlemix", "puzzlemix", {"solver": "gco"}),  # skipped when gco-wrapper is not installed
    ("puzzlemix_swap", "puzzlemix", {"solver": "swap"}),  # the built-in fallback
    ("zeta_mixup", "zeta_mixup", {}),  # a [b, b] combination of the whole batch
    # the token branch; no teacher forward
    ("tokenmix", "tokenmix", {"switch_prob": 1.0, "labels": "area"}),
    # the host optimisation (gco); skipped without gco-wrapper
    ("comixup", "comixup", {"solver": "gco"}),
    # ViT archs only; its CutMix branch (the attention read)
    ("transmix", "transmix", {"switch_prob": 1.0}),
    # one image to the host per batch for its saliency map
    ("saliencymix", "saliencymix", {"prob": 1.0}),
    ("supermix", "supermix", {}),  # 50 teacher forward-backward-forward mask iterations per batch
]
# rows that need a ViT (the class token's attention), and rows that need a CNN's feature map
# (AlignMix's alignment)
VIT_ONLY = {"transmix"}
CNN_ONLY = {"alignmix", "alignmix_stage2"}
TARGETS = {"multimix": 1.03, "dense_multimix": 1.15, "alignmix": 1.10, "alignmix_stage2": 1.10,
           "multi_interp_manifold_embedding_k5": 1.10, "puzzlemix": 2.0, "puzzlemix_swap": 2.0}


def run_pretrain_bench(quick: bool = False, arch: str = "resnet50", batch: int = 32,
                       size: int = 112, num_classes: int = 1000, n: int = 1000, repeats: int = 5,
                       warmup: int = 1, methods: list[str] | None = None, device: str = "cpu",
                       seed: int = 0, threads: int | None = None, clock: str = "auto") -> dict:
    """{"step_time_ratio": {label: time / erm time}, "step_time_s": {...}, "targets": ..., "setup":
    ...}.

    quick: ResNet-18, batch 16, 64 px, 2 repeats (a smoke version that finishes in seconds).
    methods: labels from FULL to time (erm is always included).
    threads: torch.set_num_threads for the run (restored after); None = 1 on CPU, untouched on
    CUDA.
    clock: "wall" (perf_counter), "process" (CPU time of this process) or "auto" (process on CPU,
    wall on CUDA). On a CPU shared with other jobs, one thread timed by the process clock measures
    the work itself rather than the neighbours.
    """
    if clock == "auto":
        clock = "wall" if torch.device(device).type == "cuda" else "process"
    if threads is None and torch.device(device).type == "cpu":
        threads = 1
    if clock not in ("wall", "process"):
        raise ValueError(f"clock must be wall, process or auto, got {clock!r}")
    timer = time.perf_counter if clock == "wall" else time.process_time
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _bench(quick, arch, batch, size, num_classes, n, repeats, warmup, methods, device,
                      seed, timer, clock)
    finally:
        torch.set_num_threads(old_threads)


def _build_methods(model, methods, num_classes, n, size, dev, seed):
    """([(label, method)] for the FULL entries in `methods` (all when None; erm always), [skipped
    labels])."""
    built, skipped = [], []
    for label, name, knobs in FULL:
        if methods is not None and label not in methods and label != "erm":
            continue
        if name in ("multimix", "dense_multimix"):
            knobs = dict(knobs, n=n)
        # the paper's 4 x 4 tensor, or the whole map when the input is smaller
        if name == "alignmix_stage2":
            knobs = dict(knobs, resolution=min(4, size // 32))
        if knobs.get("solver") == "gco" and not have_gco():
            skipped.append(f"{label} (gco-wrapper not installed)")
            continue
        vit = hasattr(model, "features_and_attention")
        if (name in VIT_ONLY and not vit) or (name in CNN_ONLY and vit):
            skipped.append(f"{label} "
                           f"({'a ViT arch only' if name in VIT_ONLY else 'a ResNet arch only'})")
            continue
        # a method's own layers (AlignMix's encoder2)
        m = build_method(name, model, num_classes, **knobs).to(dev)
        # SuperMix: a frozen network of the same shape (its weights do not change the cost)
        if m.needs_teacher:
            m.teacher = copy.deepcopy(model).to(dev)
        # meta: no generator
        m.generator = torch.Generator(device=dev) if dev.type in ("cpu", "cuda") else None
        m.seed(seed)
        built.append((label, m))
    return built, skipped


def _all_parameters(built) -> list:
    """Every parameter of the shared model and of the methods' own layers, once each."""
    params: dict[int, torch.nn.Parameter] = {}
    for _, m in built:
        params.update((id(p), p) for p in m.parameters())
    return list(params.values())


def _bench(quick, arch, batch, size, num_classes, n, repeats, warmup, methods, device, seed, timer,
           clock):
    if quick:
        arch, batch, size, repeats = "resnet18", 16, 64, 2
    torch.manual_seed(seed)
    dev = torch.device(device)
    model = network_stages(arch, num_classes).to(dev)
    built, skipped = _build_methods(model, methods, num_classes, n, size, dev, seed)
    opt = torch.optim.SGD(_all_parameters(built), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=g).to(dev)
    labels = torch.randint(0, num_classes, (batch,), generator=g).to(dev)

    def step(method):
        out = method(images, labels)
        loss = sum(v for k, v in out.items() if k.startswith("loss"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {label: [] for label, _ in built}
    for r in range(warmup + repeats):
        for label, m in built:
            t0 = timer()
            step(m)
            if r >= warmup:
                times[label].append(timer() - t0)
    # the minimum over repeats: noise on a shared machine only ever adds time
    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = {k: round(v / best["erm"], 3) for k, v in best.items()}
    return {
        "step_time_ratio": ratio,
        "step_time_ratio_median": {k: round(v / med["erm"], 3) for k, v in med.items()},
        "step_time_s": {k: round(v, 4) for k, v in best.items()},
        "targets": {k: {"target": t, "ratio": ratio.get(k),
                        "ok": ratio.get(k) is not None and ratio[k] <= t}
                    for k, t in TARGETS.items() if k in ratio},
        "setup": {"arch": arch, "batch": batch, "size": size, "num_classes": num_classes, "n": n,
                  "repeats": repeats, "device": str(dev), "threads": torch.get_num_threads(),
                  "clock": clock, "note": "min (and median) of round-robin repeats; feature "
                                          "methods forced onto their mixing branch; puzzlemix = "
                                          "gco-wrapper's graph cut, puzzlemix_swap = the "
                                          "built-in alpha-beta swap (both solve the per-image "
                                          "cuts in a thread pool; the process clock counts "
                                          "every thread's CPU time)",
                  "skipped": skipped},
    }


def run_gpu_bench(device: str = "cuda", arch: str = "resnet50", size: int = 224, batch: int = 128,
                  warmup: int = 3, steps: int = 10, methods: list[str] | None = None,
                  precision: str = "bf16", channels_last: bool | None = None,
                  num_classes: int = 1000, n: int = 1000, seed: int = 0) -> dict:
    """Training images/s of each method on one device (`tools/bench.py gpu`): {"rows": [{"method",
    "img_per_s", "step_s", "step_time_ratio" (step time / ERM's; ERM 1.0), "peak_memory_gib" (CUDA:
    the most memory allocated during the method's steps; None elsewhere)}], "skipped": [...],
    "setup": {...}}.

    A step is forward + backward + SGD update under ``mixup_transfer.core.runtime.autocast(device,
    precision)`` (bf16 on CUDA; CPU runs fp32) with the model and batch in channels_last (default:
    on CUDA only). Per method: ``warmup`` untimed steps, then ``steps`` timed ones with the device
    synchronised only before and after them (a synchronisation per step would stall the launch
    queue). One model serves every method.
    """
    from mixup_transfer.core.runtime import autocast, make_grad_scaler

    dev = torch.device(device)
    channels_last = dev.type == "cuda" if channels_last is None else channels_last
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(seed)
    model = network_stages(arch, num_classes).to(dev, memory_format=fmt)
    built, skipped = _build_methods(model, methods, num_classes, n, size, dev, seed)
    for _, m in built:
        m.to(memory_format=fmt)
    opt = torch.optim.SGD(_all_parameters(built), lr=1e-3, momentum=0.9)
    scaler = make_grad_scaler(dev, precision)
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=g).to(dev).contiguous(memory_format=fmt)
    labels = torch.randint(0, num_classes, (batch,), generator=g).to(dev)

    def step(method):
        with autocast(dev, precision):
            out = method(images, labels)
            loss = sum(v for k, v in out.items() if k.startswith("loss"))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    seconds, peak = _time_methods(built, step, dev, warmup, steps)
    rows = [{"method": k, "img_per_s": round(batch / v, 1), "step_s": round(v, 6),
             "step_time_ratio": round(v / seconds["erm"], 3), "peak_memory_gib": peak[k]}
             for k, v in seconds.items()]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    return {"rows": rows, "skipped": skipped,
            "setup": {"arch": arch, "size": size, "batch": batch, "warmup": warmup, "steps": steps,
                      "precision": precision if dev.type == "cuda" else "fp32",
                      "channels_last": channels_last, "device": f"{dev} ({name})",
                      "num_classes": num_classes, "n": n, "clock": "wall"}}


def _time_methods(built, step, dev: torch.device, warmup: int, steps: int) -> tuple[dict, dict]:
    """Seconds per step of each method (the device synchronised only around the timed steps) and
    its peak allocated CUDA memory in GiB (None elsewhere)."""

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    seconds, peak = {}, {}
    for label, m in built:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        for _ in range(warmup):
            step(m)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step(m)
        sync()
        seconds[label] = (time.perf_counter() - t0) / steps
        peak[label] = round(torch.cuda.max_memory_allocated(dev) / 2**30,
                            2) if dev.type == "cuda" else None
    return seconds, peak
