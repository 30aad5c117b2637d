"""Comparison tables: several checkpoints' ``metrics.json`` -> one table per suite, methods as
rows, laid out like the papers' tables (Markdown with the best value in bold, and JSON)."""

from __future__ import annotations

# suite -> [(column title, path into the suite's dict, higher is better)]
COLUMNS = {
    "clean": [("top-1 err", ("top1_err",), False), ("top-5 err", ("top5_err",), False)],
    "background": [
        ("clean top-1 loc", ("clean_loc",), True),
        ("replace top-1 err", ("replace", "top1_err"), False),
        ("replace top-5 err", ("replace", "top5_err"), False),
        ("replace top-1 loc", ("replace", "top1_loc"), True),
        ("noise top-1 err", ("noise", "top1_err"), False),
        ("noise top-5 err", ("noise", "top5_err"), False),
        ("noise top-1 loc", ("noise", "top1_loc"), True),
    ],
    "calibration": [("ECE", ("ece",), False), ("OE", ("oe",), False)],
    "fgsm": [("FGSM top-1 err", ("top1_err",), False)],
    "pgd": [("PGD top-1 err", ("top1_err",), False),
            ("FGSM top-1 err at the PGD eps", ("fgsm_same_eps_top1_err",), False)],
    "embedding": [("alignment", ("alignment",), False), ("uniformity", ("uniformity",), False)],
}
OOD_COLUMNS = [("det acc", ("det_acc",), True), ("det acc @thr", ("det_acc_at_thr",), True),
               ("AUROC", ("auroc",), True), ("AUPR-in", ("aupr_in",), True),
               ("AUPR-out", ("aupr_out",), True)]
TITLES = {"clean": "Clean ImageNet-val error (%)", "background": "Background-corrupted val (%)",
          "calibration": "Calibration (%)", "fgsm": "FGSM (%)", "pgd": "PGD (%)",
          "embedding": "Embedding alignment / uniformity (MultiMix §4.4)"}


def _get(d, path):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d if isinstance(d, (int, float)) else None


def _table(title: str, metrics_by_method: dict, suite_of, columns) -> tuple[str, dict]:
    names = list(metrics_by_method)
    values = {m: [_get(suite_of(metrics_by_method[m]), path) for _, path, _ in columns]
              for m in names}
    best = {}
    for c, (col, _, higher) in enumerate(columns):
        present = [(values[m][c], m) for m in names if values[m][c] is not None]
        if len(present) > 1:
            target = (max if higher else min)(v for v, _ in present)
            best[col] = [m for v, m in present if abs(v - target) < 1e-9]
    arrows = ["↑" if higher else "↓" for _, _, higher in columns]
    lines = [f"### {title}", "", "| method | " + " | ".join(f"{col} {a}" for (col, _, _), a in
                                                          zip(columns, arrows)) + " |",
             "|---|" + "---:|" * len(columns)]
    for m in names:
        cells = []
        for c, (col, _, _) in enumerate(columns):
            v = values[m][c]
            cell = "—" if v is None else f"{v:.2f}"
            cells.append(f"**{cell}**" if v is not None and m in best.get(col, []) else cell)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    table = {"title": title, "columns": [col for col, _, _ in columns],
             "higher_is_better": {col: h for col, _, h in columns},
             "rows": {m: dict(zip([col for col, _, _ in columns], values[m])) for m in names},
             "best": best}
    return "\n".join(lines) + "\n", table


def compare(metrics_by_method: dict) -> tuple[str, dict]:
    """(Markdown, JSON-able dict) with one table per suite present in any of the metrics dicts.

    metrics_by_method: ``name -> metrics dict`` as written by ``evaluate_checkpoint``. OOD gives
    one table per OOD set (JSON key ``ood/<set>``). Missing values show as "—"; the best value of
    each column is bold.
    """
    if not metrics_by_method:
        raise ValueError("compare needs at least one method's metrics")
    parts, out = [], {}
    for suite, columns in COLUMNS.items():
        if any(suite in m for m in metrics_by_method.values()):
            md, table = _table(TITLES[suite], metrics_by_method, lambda m, s=suite: m.get(s, {}),
                               columns)
            parts.append(md)
            out[suite] = table
    ood_sets = []
    for m in metrics_by_method.values():
        for name in m.get("ood", {}):
            if name not in ood_sets:
                ood_sets.append(name)
    for name in ood_sets:
        md, table = _table(f"OOD detection (max softmax), {name} (%)", metrics_by_method,
                           lambda m, n=name: m.get("ood", {}).get(n, {}), OOD_COLUMNS)
        parts.append(md)
        out[f"ood/{name}"] = table
    return "\n".join(parts), out
