"""Publish a finished pipeline run into the documentation: its report with provenance (command,
commit, hardware, wall time), run-folder links removed and figures copied beside it, so the numbers
in the docs are always regenerated from a run, never typed.

    python tools/run_pipeline.py --config configs/pipeline/toy.yaml --publish docs/results.md
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import shutil
from pathlib import Path

from mixup_transfer.core.fingerprint import code_version
from mixup_transfer.core.runtime import atomic_write_text

_LINK = re.compile(r"\[([^\]]*)\]\((?!figures/)[^)]*/\)")  # [value](erm/ssd_voc/) -> value
_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)]+\.png)\)")
_REUSE = re.compile(r"^(Every stage ran in this invocation|Stages reused from an earlier run).*\n",
                    re.M)


def cpu_name() -> str:
    """The processor's model name (/proc/cpuinfo on Linux), or platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> str:
    """One line: CPU model and cores usable by this process, memory, and the GPUs torch sees."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        mem_text = f", {mem:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        mem_text = ""
    gpus = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
    gpu_text = f"; GPU: {', '.join(gpus)}" if gpus else "; no GPU"
    return (f"{cpu_name()}, {cores} cores{mem_text}{gpu_text}; torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def provenance(command: str, started: float, finished: float, stages_run: int,
               reused: list[str]) -> dict:
    """What the docs say next to a run's numbers."""
    def iso(t):
        return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return {"command": command, "commit": code_version(), "hardware": hardware(),
            "started": iso(started), "finished": iso(finished),
            "wall_s": round(finished - started, 1), "stages_run": stages_run,
            "stages_reused": len(reused)}


def publish(run_dir: Path, out: Path) -> Path:
    """Write `out` (Markdown) from `run_dir`'s report.md and summary.json; figures go to `<out
    stem>_figures/`."""
    run_dir, out = Path(run_dir), Path(out)
    summary = json.loads((run_dir / "summary.json").read_text())
    prov = summary.get("provenance") or {}
    if summary.get("failed"):
        raise RuntimeError(f"{run_dir}: the run has failed stages {sorted(summary['failed'])}; "
                           "not publishing it")
    fig_dir = out.parent / f"{out.stem}_figures"
    # the figures are copied here first
    staging = fig_dir.with_name(f"{fig_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)

    def copy(match):
        src = run_dir / match.group(2)
        name = match.group(2).replace("/", "_").replace("figures_", "")
        shutil.copyfile(src, staging / name)
        return f"![{match.group(1)}]({fig_dir.name}/{name})"

    try:
        body = _IMAGE.sub(
            copy, _LINK.sub(r"\1", _REUSE.sub("", (run_dir / "report.md").read_text()))
        )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # our own title replaces the report's
    body = body.split("\n", 1)[1] if body.startswith("# ") else body
    # the links are gone here
    body = body.replace("Every number links to the run folder that produced it; ", "")
    minutes, seconds = divmod(int(round(prov.get("wall_s", 0))), 60)
    head = [f"# Results of `{summary.get('name')}`", "",
            "Generated from a finished run; regenerate with the command below (finished stages "
            "are reused, so publishing a finished run takes seconds).", "",
            "| | |", "|---|---|",
            f"| command | `{prov.get('command', '?')}` |",
            f"| commit | `{prov.get('commit', '?')}` |",
            f"| hardware | {prov.get('hardware', '?')} |",
            f"| run | {prov.get('started', '?')} to {prov.get('finished', '?')}: {minutes} min "
            f"{seconds} s wall, {prov.get('stages_run', '?')} stages run, "
            f"{prov.get('stages_reused', '?')} reused |",
            ""]
    _swap_in(staging, fig_dir)
    atomic_write_text("\n".join(head) + body, out)
    return out


def _swap_in(staging: Path, fig_dir: Path) -> None:
    """Replace `fig_dir` by the complete `staging` folder: a failure while copying (a full disk, a
    missing figure) leaves the published figures as they were."""
    old = fig_dir.with_name(f"{fig_dir.name}.{os.getpid()}.old")
    if fig_dir.exists():
        os.replace(fig_dir, old)
    os.replace(staging, fig_dir)
    shutil.rmtree(old, ignore_errors=True)
