"""The pipeline's report: the papers' tables (pipeline/tables.py) with figures (pipeline/figures.py), written as
Markdown and HTML (pipeline/html.py)."""

from __future__ import annotations

import json
from pathlib import Path

from core.runtime import atomic_write_text
from pipeline import figures, tables
from pipeline.html import to_html


def write_report(run_dir: Path, results: dict, cfg: dict) -> Path:
    """runs/<name>/report.md and report.html (+ figures/) from the stages' metrics; returns report.md."""
    run_dir = Path(run_dir)
    fig_dir = run_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    methods = list(results["methods"])
    dets = [d["name"] for d in cfg.get("detection") or []]
    sections = [f"# Mixup-family pretraining and transfer: report `{cfg.get('name')}`", "",
                f"Methods: {', '.join(methods)}. Data: `{cfg['data']['root']}`. Every number links to the run "
                "folder that produced it; **bold** is the best method in each column; rows in *italics* are "
                "baselines. ↑: higher is better, ↓: lower is better. One pretraining seed per method unless a "
                "table says otherwise.", "", tables.classification_table(results)]
    if dets:
        sections.append(tables.detection_table(results, dets))
    if cfg.get("wsol"):
        sections.append(tables.wsol_table(results))
        curve = figures.wsol_curves(results, fig_dir / "wsol_curve.png")
        if curve:
            sections.append(f"![WSOL localization vs fine-tuning epoch](figures/{curve.name})\n")
    if cfg.get("robustness"):
        sections += [tables.background_table(results), tables.calibration_adversarial_table(results)]
        ood = tables.ood_table(results)
        if ood:
            sections.append(ood)
    reused = results.get("reused") or []
    sections.append(f"Stages reused from an earlier run (same config and inputs): {', '.join(reused)}.\n"
                    if reused else "Every stage ran in this invocation.\n")
    sections += figure_sections(run_dir, results, methods, dets)
    timings = timing_section(run_dir, methods, dets)
    if timings:
        sections.append(timings)
    md = "\n".join(sections)
    atomic_write_text(md, run_dir / "report.md")
    atomic_write_text(to_html(md, cfg.get("name", "")), run_dir / "report.html")
    return run_dir / "report.md"


def figure_sections(run_dir: Path, results: dict, methods: list[str], dets: list[str]) -> list[str]:
    """The summary bars, the pretraining curves and each method's stage figures, as Markdown."""
    fig_dir = run_dir / "figures"
    out = ["## Figures\n"]
    per_method = results["methods"]
    panels = [
        ("val top-1 acc (%)", {m: tables.get(r.get("pretrain") or {}, "top1") for m, r in per_method.items()}),
        *[(f"{d} {'AP' if 'coco' in d else 'mAP'}",
           {m: tables.det_get("AP" if "coco" in d else "mAP")(r.get(d) or {}) for m, r in per_method.items()})
          for d in dets],
        ("MaxBoxAccV2 (%)", {m: tables.get(r.get("wsol") or {}, "maxboxacc_v2") for m, r in per_method.items()}),
        ("bg-replace top-1 err", {m: tables.get(r.get("robustness") or {}, "background", "replace", "top1_err")
                                  for m, r in per_method.items()}),
    ]
    panels = [(t, {k: v for k, v in vals.items() if v is not None}) for t, vals in panels]
    bars = figures.summary_bars(panels, fig_dir / "summary.png")
    if bars:
        out.append(f"![Summary of the main numbers per method](figures/{bars.name})\n")
    curves = figures.pretrain_curves(run_dir, methods, fig_dir / "pretrain_curves.png")
    if curves:
        out.append(f"![Pretraining curves](figures/{curves.name})\n")
    for m in methods:
        pics = []
        for stage, pats in (("wsol", ("figures/*cam*.png", "figures/*grid*.png")),
                            *[(d, ("figures/*example*.png", "figures/*.png")) for d in dets],
                            ("robustness", ("figures/*reliab*.png",))):
            p = figures.first_png(run_dir / m / stage, pats)
            if p:
                pics.append(f"![{m} {stage}]({p.relative_to(run_dir).as_posix()})")
        if pics:
            out.append(f"### {m}\n\n" + "\n".join(pics) + "\n")
    return out


def timing_section(run_dir: Path, methods: list[str], dets: list[str]) -> str | None:
    t_lines = []
    for m in methods:
        for s in ("pretrain", *dets, "wsol", "robustness"):
            marker = run_dir / m / s / "stage.json"
            if marker.exists():
                seconds = json.loads(marker.read_text()).get("seconds", 0)
                t_lines.append(f"| {m} | {s} | {seconds:.0f} |")
    if not t_lines:
        return None
    return "## Stage timings\n\n| method | stage | seconds |\n|---|---|---:|\n" + "\n".join(t_lines) + "\n"
