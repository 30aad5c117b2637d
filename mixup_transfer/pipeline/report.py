"""The pipeline's report: the papers' tables (mixup_transfer/pipeline/tables.py) with figures
(mixup_transfer/pipeline/figures.py), written as Markdown and HTML
(mixup_transfer/pipeline/html.py), and the same tables as data in summary.json."""

from __future__ import annotations

import json
from pathlib import Path

from mixup_transfer.core.runtime import atomic_write_text, write_json
from mixup_transfer.pipeline import figures, tables
from mixup_transfer.pipeline.html import to_html


def write_report(run_dir: Path, results: dict, cfg: dict) -> Path:
    """runs/<name>/report.md, report.html (+ figures/) and summary.json from the stages' metrics
    (`Pipeline.run`'s results: per method and stage, a list of runs); returns report.md."""
    run_dir = Path(run_dir)
    fig_dir = run_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    methods = list(results["methods"])
    dets = [d["name"] for d in cfg.get("detection") or []]
    sections = [f"# Mixup-family pretraining and transfer: report `{cfg.get('name')}`", "",
                f"Methods: {', '.join(methods)}. Data: `{cfg['data']['root']}`. Every number "
                "links to the run folder that produced it; **bold** is the best method in each "
                "column (the rule is under each table); rows in *italics* are baselines. ↑: "
                "higher is better, ↓: lower is better. "
                + seeds_sentence(results.get("seeds") or {}), ""]
    failed = results.get("failed") or {}
    sections += failed_section(failed)
    sections += variants_sentence(results)
    tabs = [tables.classification_table(results)]
    if dets:
        tabs.append(tables.detection_table(results, dets))
    sections += [t.markdown() for t in tabs]
    if cfg.get("wsol"):
        tabs.append(tables.wsol_table(results))
        sections.append(tabs[-1].markdown())
        sections += wsol_curve_section(results, fig_dir)
    if cfg.get("robustness"):
        background = tables.background_table(results)
        sets = tables.ood_sets(results)
        ood = ([tables.ood_table(results, [s]) for s in sets] if len(sets) > 3
               else [tables.ood_table(results)])
        more = [
            background,
            tables.calibration_adversarial_table(results, with_clean=background is None),
            *ood,
            tables.embedding_table(results),
        ]
        tabs += [t for t in more if t is not None]
        sections += [t.markdown() for t in more if t is not None]
    reused = results.get("reused") or []
    sections.append("Stages reused from an earlier run (same config and inputs): "
                    f"{', '.join(reused)}.\n"
                    if reused else "Every stage ran in this invocation.\n")
    sections += figure_sections(run_dir, results, methods, dets)
    timings = timing_section(run_dir, results)
    if timings:
        sections.append(timings)
    md = "\n".join(sections)
    write_json({"name": cfg.get("name"), "seeds": results.get("seeds") or {}, "failed": failed,
                "provenance": results.get("provenance") or {},
                "tables": {t.title: t.summary() for t in tabs}}, run_dir / "summary.json")
    atomic_write_text(md, run_dir / "report.md")
    atomic_write_text(to_html(md, cfg.get("name", "")), run_dir / "report.html")
    return run_dir / "report.md"


def failed_section(failed: dict) -> list[str]:
    """The report's list of failed stages (nothing when every stage finished)."""
    if not failed:
        return []
    return ["## Failed stages", "",
            f"**{len(failed)} stage(s) failed or did not run**; their entries read *failed* in "
            "the tables below. A failed stage's folder is kept for inspection; run the same "
            "command again to retry it (finished stages are reused).", "",
            "| stage | why |", "|---|---|",
            *[f"| {label} | {why.replace('|', '/')} |" for label, why in failed.items()], ""]


def wsol_curve_section(results: dict, fig_dir: Path) -> list[str]:
    """The WSOL localization-vs-epoch figure of every method and random init (if it was drawn)."""
    series = [(m, [r["metrics"] for r in res.get("wsol") or [] if r["metrics"]])
              for m, res in results["methods"].items()]
    baseline = (results.get("baselines") or {}).get("wsol") or []
    series.append(("random init", [r["metrics"] for r in baseline if r["metrics"]]))
    curve = figures.wsol_curves(series, fig_dir / "wsol_curve.png")
    if not curve:
        return []
    return [f"![WSOL localization vs fine-tuning epoch](figures/{curve.name})\n"]


def variants_sentence(results: dict) -> list[str]:
    """One line naming the published form each method's pretraining ran where a method has several
    (its checkpoint meta's `method_variant`, e.g. AlignMix's released code vs the paper's stage-2
    encoder)."""
    found = {m: ((res.get("pretrain") or [{}])[0].get("metrics") or {}).get("method_variant")
             for m, res in results["methods"].items()}
    named = [f"`{m}`: {v}" for m, v in found.items() if v]
    return [f"Method variants: {'; '.join(named)}.", ""] if named else []


def seeds_sentence(seeds: dict) -> str:
    """What the runs behind each entry are, in words."""
    def words(key, what):
        s = seeds.get(key)
        return f"{what} seeds {s}" if s else f"each {what} config's own seed"
    if not seeds.get("pretrain") and not seeds.get("transfer"):
        return "One pretraining seed per method unless a table says otherwise (seeds: null)."
    return (f"Runs per entry: {words('pretrain', 'pretraining')} × "
            f"{words('transfer', 'transfer')} (robustness: one evaluation per pretrained "
            "backbone); summary.json holds every run's value.")


def figure_sections(run_dir: Path, results: dict, methods: list[str],
                    dets: list[str]) -> list[str]:
    """The summary bars, the pretraining curves and each method's stage figures (of its first run),
    as Markdown."""
    fig_dir = run_dir / "figures"
    out = ["## Figures\n"]
    per_method = results["methods"]

    def panel(stage, getter, per_seed=False):
        return {m: [v for v, _ in tables.values(r, stage, getter, per_seed)]
                for m, r in per_method.items()}
    panels = [
        ("val top-1 acc (%)", panel("pretrain", lambda m: tables.get(m, "top1"))),
        *[(f"{d} {tables.detection_key(d)} (%)",
           # the default binds each d's key
           panel(d, lambda m, k=tables.detection_key(d): tables.get(m, k), True))  # noqa: B008
          for d in dets],
        ("MaxBoxAccV2 (%)", panel("wsol", lambda m: tables.get(m, "maxboxacc_v2"))),
        ("bg-replace top-1 err (%)",
         panel("robustness", lambda m: tables.get(m, "background", "replace", "top1_err"))),
        *([] if dets else [  # the small-image track (no detection): its robustness numbers
            ("PGD top-1 err (%)", panel("robustness", lambda m: tables.get(m, "pgd", "top1_err"))),
            ("ECE (%)", panel("robustness", lambda m: tables.get(m, "calibration", "ece")))]),
    ]
    bars = figures.summary_bars(panels, fig_dir / "summary.png")
    if bars:
        out.append(f"![Summary of the main numbers per method](figures/{bars.name})\n")
    folders = {m: [r["folder"] for r in per_method[m].get("pretrain") or []] for m in methods}
    curves = figures.pretrain_curves(run_dir, folders, fig_dir / "pretrain_curves.png")
    if curves:
        out.append(f"![Pretraining curves](figures/{curves.name})\n")
    for m in methods:
        pics = []
        for stage, pats in (("wsol", ("figures/*cam*.png", "figures/*grid*.png")),
                            *[(d, ("figures/*example*.png", "figures/*.png")) for d in dets],
                            ("robustness", ("figures/*reliab*.png",)),
                            ("robustness", ("figures/umap.png",))):
            runs = per_method[m].get(stage) or []
            p = figures.first_png(run_dir / runs[0]["folder"], pats) if runs else None
            if p:
                pics.append(f"![{m} {stage}]({p.relative_to(run_dir).as_posix()})")
        if pics:
            out.append(f"### {m}\n\n" + "\n".join(pics) + "\n")
    return out


def timing_section(run_dir: Path, results: dict) -> str | None:
    """Each method stage's time from its stage.json, one line per run (`erm/seed1 | pretrain`)."""
    t_lines = []
    for res in results["methods"].values():
        for runs in res.values():
            for r in runs:
                marker = run_dir / r["folder"] / "stage.json"
                if marker.exists():
                    seconds = json.loads(marker.read_text()).get("seconds", 0)
                    where, stage = r["folder"].rsplit("/", 1)
                    t_lines.append(f"| {where} | {stage} | {seconds:.0f} |")
    if not t_lines:
        return None
    return (
        "## Stage timings\n\n| method | stage | seconds |\n|---|---|---:|\n"
        + "\n".join(t_lines)
        + "\n"
    )


def missing_entries(summary: dict) -> list[str]:
    """'table: row: column' of every method row's entry that holds no run in summary.json (baseline
    rows, which may leave columns empty by design, are not checked)."""
    return [f"{title}: {label}: {column}"
            for title, table in (summary.get("tables") or {}).items()
            for label, row in table["rows"].items() if not row["baseline"]
            for column, entry in row.items() if column != "baseline" and not entry["n"]]
