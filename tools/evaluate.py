#!/usr/bin/env python
"""Robustness suites of pretrained classifiers on ImageNet-layout val.

    tools/evaluate.py --checkpoint CKPT --imagenet DIR --suites clean,background,calibration,fgsm,pgd,ood
        [--ood DIR ...] [--out DIR] [--limit N]

One checkpoint writes OUT/metrics.json and OUT/figures/. Several checkpoints (comparison mode; name them
with NAME=PATH, otherwise the run folder of `.../<run>/backbone.pth` or the file stem) write
OUT/<name>/metrics.json and OUT/comparison.md + OUT/comparison.json: one table per suite, methods as rows.
`--config configs/eval/X.yaml` supplies defaults for the options; command-line flags override it.
"""

from __future__ import annotations

import argparse
import json
import sys
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.runtime import atomic_write_text, write_json  # noqa: E402
from transfer.robustness import SUITES, compare, evaluate_checkpoint  # noqa: E402
from transfer.robustness.evaluate import NOISE_SETS  # noqa: E402

# option -> (type, default); also the keys a --config file may set
OPTIONS = {
    "suites": (str, ",".join(SUITES)), "out": (str, "runs/robustness"), "limit": (int, None),
    "image_size": (int, 224), "resize": (int, 256), "batch_size": (int, 64), "seed": (int, 0),
    "device": (str, "auto"), "precision": (str, "fp32"), "workers": (int, None), "arch": (str, None),
    "corrupt_at": (str, "eval"), "sigma": (float, 0.1), "export_corrupted": (str, None),
    "fgsm_eps": ("eps", "8/255"), "pgd_eps": ("eps", "4/255"), "pgd_step": ("eps", "2/255"),
    "pgd_iters": (int, 10), "pgd_random_start": (bool, True), "ood_noise": (str, ",".join(NOISE_SETS)),
    "cam_threshold": (float, 0.25), "iou_threshold": (float, 0.5), "iou_op": (str, ">="),
    "ood_threshold": (float, 0.5), "gaussian_std": (float, 0.5),
}


HELP = {
    "suites": "comma-separated: clean,background,calibration,fgsm,pgd,ood (or all)",
    "limit": "evaluate N evenly spaced val images (and at most N per OOD folder)",
    "image_size": "centre-crop size", "resize": "short side before the crop",
    "corrupt_at": "eval (after resize + crop, default) or original (stored resolution)",
    "sigma": "background noise std in [0, 1] pixel units",
    "export_corrupted": "write the corrupted val sets as PNG here",
    "fgsm_eps": "e.g. 8/255", "pgd_eps": "e.g. 4/255", "pgd_step": "e.g. 2/255",
    "ood_noise": "synthetic OOD sets: uniform,gaussian (empty for none)",
    "precision": "fp32 | bf16 | fp16 (CUDA autocast)", "workers": "data-loading workers",
    "cam_threshold": "localization: CAM box at this fraction of the map's max",
    "iou_threshold": "localization: IoU threshold against the GT boxes (multi-mix: 0.25)",
    "iou_op": "localization: IoU comparison, >= or > (multi-mix: >)",
    "ood_threshold": "OOD detection accuracy also reported at this max-softmax threshold (papers: 0.5)",
    "gaussian_std": "std of the Gaussian OOD noise N(0.5, std) (AlignMix: 0.5)",
}


def parse_eps(v) -> float:
    """'8/255' or 0.0314 -> float."""
    return float(Fraction(str(v))) if "/" in str(v) else float(v)


def _name(spec: str) -> tuple[str, str]:
    if "=" in spec and not Path(spec).exists():
        name, path = spec.split("=", 1)
        return name, path
    p = Path(spec)
    return (p.parent.name if p.stem == "backbone" and p.parent.name else p.stem), spec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", nargs="+", required=True, help="CKPT or NAME=CKPT, one or more")
    ap.add_argument("--imagenet", required=True, help="ImageNet-layout root (val/ and val_boxes/)")
    ap.add_argument("--ood", nargs="*", default=[], help="OOD image folders (recursive)")
    ap.add_argument("--config", help="YAML with defaults for the options below (configs/eval/)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    for key, (typ, _) in OPTIONS.items():
        flag = "--" + key.replace("_", "-")
        if typ is bool:
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            ap.add_argument(flag, type=str if typ == "eps" else typ, default=None, help=HELP.get(key))
    args = ap.parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)

    opts = {k: d for k, (_, d) in OPTIONS.items()}
    if args.config:
        from pretrain.config import load_config
        opts = load_config(args.config, defaults=opts)
    opts.update({k: getattr(args, k) for k in OPTIONS if getattr(args, k) is not None})
    kwargs = dict(
        suites=opts["suites"], ood_dirs=args.ood, limit=opts["limit"], image_size=opts["image_size"],
        resize=opts["resize"], batch_size=opts["batch_size"], seed=opts["seed"], device=opts["device"],
        precision=opts["precision"], num_workers=opts["workers"], arch=opts["arch"],
        corrupt_at=opts["corrupt_at"], sigma=opts["sigma"], fgsm_eps=parse_eps(opts["fgsm_eps"]),
        pgd_eps=parse_eps(opts["pgd_eps"]), pgd_step=parse_eps(opts["pgd_step"]), pgd_iters=opts["pgd_iters"],
        pgd_random_start=opts["pgd_random_start"], cam_threshold=opts["cam_threshold"],
        iou_threshold=opts["iou_threshold"], iou_op=opts["iou_op"], ood_threshold=opts["ood_threshold"],
        gaussian_std=opts["gaussian_std"],
        ood_noise=tuple(s for s in str(opts["ood_noise"] or "").split(",") if s))

    named = [_name(s) for s in args.checkpoint]
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise SystemExit(f"duplicate method names {names}; name them with NAME=PATH")
    out = Path(opts["out"])
    results = {}
    for name, path in named:
        run_out = out if len(named) == 1 else out / name
        export = opts["export_corrupted"]
        if export and len(named) > 1:
            export = None if results else export  # the corrupted set does not depend on the model
        results[name] = evaluate_checkpoint(path, args.imagenet, out_dir=run_out, export_dir=export, **kwargs)
        print(f"{name}: {run_out / 'metrics.json'}", file=sys.stderr)
    md, table = compare(results)
    if len(named) > 1:
        atomic_write_text(md, out / "comparison.md")
        write_json(table, out / "comparison.json")
        print(f"comparison: {out / 'comparison.md'}", file=sys.stderr)
    print(md)
    if len(named) == 1:
        print(json.dumps({k: v for k, v in results[names[0]].items() if k in SUITES}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
