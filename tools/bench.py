#!/usr/bin/env python
"""Performance figures of the toolkit, as ratios measured in one run, gathered into one JSON + Markdown.

    python tools/bench.py all --out runs/bench          # everything (minutes on 2 CPU cores)
    python tools/bench.py pretrain [--quick]            # training-step time of each method / ERM
    python tools/bench.py wsol                          # MaxBoxAccV2 evaluator speed-up vs the per-threshold loop
    python tools/bench.py eval                          # COCO / VOC evaluation speed
    python tools/bench.py robustness                    # clean / FGSM / PGD images/s, AUROC vs pair count
    python tools/bench.py data [--quick]                # training-data images/s per CPU core: PIL vs uint8 vs decode
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import cli  # noqa: E402


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
    if results.get("data"):
        d = results["data"]
        lines += ["## Training data per CPU core (224 px RandomResizedCrop + flip, 500x375 JPEGs)", "",
                  "| path | img/s per core | ms / image |", "|---|---:|---:|"]
        lines += [f"| {k} | {v} | {d['ms_per_image'][k]} |" for k, v in d["img_per_s_per_core"].items()]
        lines += ["", "| ratio | measured | target | ok |", "|---|---:|---:|---|"]
        goals = {k: d["targets"].get(k, {"target": "", "ok": ""}) for k in d["ratios"]}
        lines += [f"| {k} | {v} | {goals[k]['target']} | {goals[k]['ok']} |" for k, v in d["ratios"].items()]
    return "\n".join(lines) + "\n"


@cli.entry
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["all", "pretrain", "wsol", "eval", "robustness", "data"])
    p.add_argument("--out", default=None, help="folder for bench.json and bench.md")
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (a smoke run)")
    args = p.parse_args(argv)
    import torch

    device = "CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only"
    results = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                          f"torch {torch.__version__}, {device}"}
    todo = ["pretrain", "wsol", "eval", "robustness", "data"] if args.what == "all" else [args.what]
    for what in todo:
        t0 = time.time()
        if what == "pretrain":
            from pretrain.bench import run_pretrain_bench
            results["pretrain"] = run_pretrain_bench(quick=args.quick)
        elif what == "wsol":
            from wsol.bench import run_wsol_bench
            results["wsol"] = run_wsol_bench(quick=args.quick)
        elif what == "eval":
            from transfer.bench import run_eval_bench
            results["eval"] = run_eval_bench(quick=args.quick)
        elif what == "robustness":
            from transfer.robustness.bench import run_robustness_bench
            results["robustness"] = run_robustness_bench(quick=args.quick)
        else:
            from pretrain.data_bench import run_data_bench
            results["data"] = run_data_bench(quick=args.quick)
        print(f"[bench] {what}: {time.time() - t0:.0f} s", file=sys.stderr)
    print(json.dumps(results, indent=2))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        from core.runtime import atomic_write_text

        atomic_write_text(json.dumps(results, indent=2) + "\n", out / "bench.json")
        atomic_write_text(to_markdown(results), out / "bench.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
