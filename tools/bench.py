#!/usr/bin/env python
"""Performance figures of the toolkit, as ratios measured in one run, gathered into one JSON +
Markdown.

    python tools/bench.py all --out runs/bench   # everything (minutes on a laptop CPU)
    python tools/bench.py pretrain [--quick]     # training-step time of each method / ERM
        [--methods erm,tokenmix] [--arch vit_small_patch16_224] [--repeats 3]
    python tools/bench.py wsol         # MaxBoxAccV2 evaluator speed-up vs the per-threshold
                                       # loop, in this process and as whole eval_wsol.py processes
    python tools/bench.py eval         # COCO / VOC evaluation speed
    python tools/bench.py robustness   # clean / FGSM / PGD images/s, AUROC vs pair count
    python tools/bench.py data [--quick]   # training-data images/s per CPU core: PIL vs uint8
                                           # vs decode
    python tools/bench.py gpu          # CUDA: training images/s per method, vs ERM and the loader
    python tools/bench.py mixers [--quick] [--device cuda]
                                       # mixup / CutMix calls vs timm's Mixup and torchvision v2
"""

import json
import os
import platform
import sys
import time
from pathlib import Path

from mixup_transfer.core import cli


def bench_data(root: str | None = None, workers=(0, 1, 2), size: int = 224, batches: int = 8,
               batch_size: int = 32) -> dict:
    """Images/s of the ImageNet-layout training loader (the default uint8 path: decode +
    RandomResizedCrop + flip in the workers, `pretrain.data`) per worker count."""
    import tempfile

    import torch

    from mixup_transfer.core.data import ImageNetFolder, read_image_uint8
    from pretrain.data import Uint8TrainTransform, collate_uint8

    if root is None:
        from mixup_transfer.toyworld import make_toy_world
        from wsol.data import cub_to_wsol_metadata

        root = Path(tempfile.mkdtemp()) / "toy"
        make_toy_world(root, preset="tiny", seed=0, wsol_metadata=cub_to_wsol_metadata)
        root = root / "imagenet"
    tf = Uint8TrainTransform(size, 0.08, True, 0.0, 0.0)
    ds = ImageNetFolder(root, "train", transform=tf, reader=read_image_uint8)
    out = {}
    for w in workers:
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True,
                                             num_workers=w, drop_last=False,
                                             persistent_workers=w > 0, collate_fn=collate_uint8)
        it, n = iter(loader), 0
        next(it)  # start-up (worker spawn) is not throughput
        t0 = time.perf_counter()
        for _ in range(batches):
            try:
                n += len(next(it)[0])
            except StopIteration:
                it = iter(loader)
        dt = time.perf_counter() - t0
        out[str(w)] = {"img_per_s": round(n / dt, 1),
                       "img_per_s_per_worker": round(n / dt / max(w, 1), 1)}
    return {"data_loading": out, "image_size": size, "dataset": str(root)}


def bench_gpu(quick: bool = False, device: str | None = None, loader_root=None,
              loader_workers: int | None = None, **knobs) -> dict:
    """Training images/s per method on the CUDA device (`pretrain.bench.run_gpu_bench`: ResNet-50,
    224 px, bf16 autocast, channels_last; `knobs` override its arguments), step time relative to
    ERM, and the data-loader
    ceiling: images/s of the training data path (`bench_data` on `loader_root`, the toy world by
    default) with `loader_workers` workers (default: the CPU cores, at most 16). `device` defaults
    to CUDA; without it: {"skipped": ...} and a printed line."""
    import torch

    if device is None and not torch.cuda.is_available():
        print("[bench] gpu: skipped (no CUDA device)", file=sys.stderr)
        return {"skipped": "no CUDA device"}
    from pretrain.bench import run_gpu_bench

    out = run_gpu_bench(device or "cuda",
                        **{**({"arch": "resnet18", "steps": 5} if quick else {}), **knobs})
    workers = min(16, os.cpu_count() or 1) if loader_workers is None else loader_workers
    st = out["setup"]
    loader = bench_data(loader_root, workers=(workers,), size=st["size"], batch_size=st["batch"],
                        batches=3 if quick else 8)
    ceiling = loader["data_loading"][str(workers)]["img_per_s"]
    out["data_loader"] = {"workers": workers, "img_per_s": ceiling, "dataset": loader["dataset"],
                          "note": "toy-world images are small: real ImageNet JPEGs decode slower"
                          if loader_root is None else "the given dataset"}
    for row in out["rows"]:
        row["loader_bound"] = row["img_per_s"] > ceiling
    return out


def bench_mixers(quick: bool = False, device: str | None = None) -> dict:
    """`pretrain.mixer_bench` at batch 256: 224 px (ImageNet) and 32 px (CIFAR; the per-example
    Python loop of timm's elem / pair modes weighs most there); --quick: 32 px only."""
    import torch

    from pretrain.mixer_bench import run_mixer_bench

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    sizes = (32,) if quick else (224, 32)
    repeats = {224: 5, 32: 10 if quick else 50}  # more repeats where a call takes a millisecond
    runs = [run_mixer_bench(batch=256, size=s, repeats=repeats[s], device=device) for s in sizes]
    return {"runs": runs}


def to_markdown(results: dict) -> str:
    lines = [f"# Benchmarks\n\nMachine: {results['machine']}\n"]
    pre = results.get("pretrain") or {}
    if "step_time_ratio" in pre:
        lines += ["## Training step time relative to ERM", "", "| method | ratio |", "|---|---:|"]
        lines += [f"| {m} | {r:.3f} |" for m, r in pre["step_time_ratio"].items()]
        lines.append("")
    for key, title in (("wsol", "WSOL evaluator"), ("eval", "Detection evaluation"),
                       ("robustness", "Robustness evaluation")):
        if results.get(key):
            lines += [f"## {title}", "", "```json", json.dumps(results[key], indent=2), "```", ""]
    gpu = results.get("gpu") or {}
    if gpu.get("skipped"):
        lines += ["## GPU training throughput", "", f"Skipped: {gpu['skipped']}.", ""]
    if gpu.get("rows"):
        st, dl = gpu["setup"], gpu["data_loader"]
        lines += [f"## GPU training throughput ({st['device']}, {st['arch']}, {st['size']} px, "
                  f"batch {st['batch']}, "
                  f"{st['precision']}, channels_last {st['channels_last']})", "",
                  f"Data-loader ceiling: {dl['img_per_s']} img/s with {dl['workers']} workers "
                  f"({dl['note']}).", "",
                  "| method | img/s | step time vs ERM | above the loader ceiling |",
                  "|---|---:|---:|---|"]
        lines += [f"| {r['method']} | {r['img_per_s']} | {r['step_time_ratio']:.3f} | "
                  f"{'yes' if r['loader_bound'] else 'no'} |" for r in gpu["rows"]]
        lines.append("")
    if results.get("mixers"):
        from pretrain.mixer_bench import to_markdown as mixers_markdown

        for run in results["mixers"]["runs"]:
            lines += mixers_markdown(run)
    if results.get("data"):
        d = results["data"]
        lines += ["## Training data per CPU core (224 px RandomResizedCrop + flip, 500x375 JPEGs)",
                  "", "| path | img/s per core | ms / image |", "|---|---:|---:|"]
        lines += [f"| {k} | {v} | {d['ms_per_image'][k]} |"
                  for k, v in d["img_per_s_per_core"].items()]
        lines += ["", "| ratio | measured | target | ok |", "|---|---:|---:|---|"]
        goals = {k: d["targets"].get(k, {"target": "", "ok": ""}) for k in d["ratios"]}
        lines += [f"| {k} | {v} | {goals[k]['target']} | {goals[k]['ok']} |"
                  for k, v in d["ratios"].items()]
    return "\n".join(lines) + "\n"


def _parser():
    p = cli.parser(__doc__)
    p.add_argument("what", choices=["all", "pretrain", "wsol", "eval", "robustness", "data", "gpu",
                                    "mixers"],
                   help="which figures to measure (see above)")
    p.add_argument("--out", default=None, help="folder for bench.json and bench.md")
    p.add_argument("--quick", action="store_true",
                   help="smaller sizes and fewer repeats (a smoke run)")
    p.add_argument("--device", default=None,
                   help="mixers: the device of the batches (default: cuda if available)")
    p.add_argument("--methods", default=None,
                   help="pretrain: comma-separated rows of pretrain.bench.FULL to time "
                        "(default: all; erm always)")
    p.add_argument("--arch", default="resnet50",
                   help="pretrain: the network (a ViT arch times the ViT rows)")
    p.add_argument("--repeats", type=int, default=5,
                   help="pretrain: round-robin repeats (min and median reported)")
    return p


def _measure(what: str, args) -> dict:
    """The figures of one part of the bench."""
    if what == "pretrain":
        from pretrain.bench import run_pretrain_bench
        rows = args.methods.split(",") if args.methods else None
        return run_pretrain_bench(quick=args.quick, arch=args.arch, repeats=args.repeats,
                                  methods=rows)
    if what == "wsol":
        from wsol.bench import run_whole_process_bench, run_wsol_bench
        out = run_wsol_bench(quick=args.quick)
        out["whole_process"] = run_whole_process_bench(
            Path(__file__).with_name("eval_wsol.py"), n_maps=2000,
            n_reference=16 if args.quick else 64)
        return out
    if what == "eval":
        from transfer.bench import run_eval_bench
        return run_eval_bench(quick=args.quick)
    if what == "robustness":
        from transfer.robustness.bench import run_robustness_bench
        return run_robustness_bench(quick=args.quick)
    if what == "gpu":
        return bench_gpu(quick=args.quick)
    if what == "mixers":
        return bench_mixers(args.quick, args.device)
    from pretrain.data_bench import run_data_bench
    return run_data_bench(quick=args.quick)


@cli.entry
def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    import torch

    device = "CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only"
    results = {"machine": f"{platform.processor() or platform.machine()}, "
                          f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
                          f"{device}"}
    todo = (["pretrain", "wsol", "eval", "robustness", "data", "mixers"]
            if args.what == "all" else [args.what])
    if args.what == "all" and torch.cuda.is_available():
        todo.append("gpu")
    elif args.what == "all":
        print("[bench] gpu: skipped (no CUDA device)", file=sys.stderr)
    for what in todo:
        t0 = time.time()
        results[what] = _measure(what, args)
        print(f"[bench] {what}: {time.time() - t0:.0f} s", file=sys.stderr)
    print(json.dumps(results, indent=2))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        from mixup_transfer.core.runtime import atomic_write_text

        atomic_write_text(json.dumps(results, indent=2) + "\n", out / "bench.json")
        atomic_write_text(to_markdown(results), out / "bench.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
