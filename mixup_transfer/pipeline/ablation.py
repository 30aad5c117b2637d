"""Ablations: sweep one knob of a pretraining recipe over values x seeds; a table, `ablation.json`
and the curve.

A config (configs/ablation/*.yaml, every key in `DEFAULTS`) names a pretraining recipe (`base`, a
configs/pretrain/*.yaml), the knob (`knob.key`, a dotted key of that recipe such as `method.n`,
plus `knob.tied` keys that take the same value, e.g. `method.alpha_high` for a fixed Dirichlet
alpha), its `values` and the `seeds`. Each (value, seed) is one pretraining stage run by the
pipeline's own stage machinery (`mixup_transfer.pipeline.run.Pipeline._stage` through
`AblationSweep`, a `Pipeline`): its content key is the hash of its resolved config, a `stage.json`
marker holds its metrics, so a finished run is reused exactly as the pipeline reuses it, an
interrupted sweep resumes, a changed override reruns exactly the runs it changes, and `force`
redoes runs by name. Every run's config is validated (recipe keys and ranges, the method's options,
the method built once) before the first one starts.

Layout (`<name>` is `knob.name`, the knob key's last part unless given; `<sweep>` is
`<out_root>/<config name>`):
    <sweep>/ablation.yaml                 resolved ablation config
    <sweep>/<name>=<value>/seed<k>/       one pretraining run (backbone.pth, log.jsonl,
                                          stage.json)
    <out_root>/baselines/<recipe>-<key>/  the reference recipe (ERM) per seed, when
                                          `baseline.config` is set; shared by the sweeps
                                          under out_root that run it
    <sweep>/ablation.json                 per value: per-seed top-1 / top-5, mean, std, n, bold
    <sweep>/ablation.md                   the table (mean ± std, the pipeline's bold rule)
    <sweep>/ablation_<name>.png           the curve: top-1 vs the knob, ± std, the seeds, ERM
                                          line

The y-axis is the final validation top-1 of each run (the MultiMix paper's Fig. 4 plots top-1
accuracy; the multi-mix paper's Fig. 6 plots test error, 100 - top-1).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

from mixup_transfer.core.config import (
    ConfigError,
    check_ranges,
    dump_config,
    load_config,
    validate,
)
from mixup_transfer.core.lock import run_lock
from mixup_transfer.core.runtime import atomic_write_text, write_json
from mixup_transfer.pipeline.run import (
    Pipeline,
    Stage,
    _fill,
    _named,
    content_key,
    pretrain_spec,
    seed_list,
)
from mixup_transfer.pipeline.tables import Column, Table, get

log = logging.getLogger("pipeline.ablation")

# Every key of an ablation config, with its meaning.
DEFAULTS = {
    "name": "ablation",                # <out_root>/<name>/
    "out_root": "runs/ablation",       # parent folder of the sweep
    "data": {
        # filled into {data} of `overrides` (a toy world or a dataset folder)
        "root": None,
        # {preset, seed}: make the toy world at data.root if it is missing
        "generate": None,
    },
    # the pretraining recipe whose knob is swept (configs/pretrain/*.yaml)
    "base": None,
    # its method name (checked against the recipe's method.name); null: the recipe's
    "method": None,
    # KEY=VALUE on every run (swept and baseline: data, epochs); {data} is filled in
    "overrides": [],
    # KEY=VALUE on the swept recipe only (method options); {data} is filled in
    "base_overrides": [],
    "knob": {
        "key": None,                   # the dotted recipe key swept, e.g. method.n
        "values": [],                  # the values, in plotting order
        # more dotted keys set to the same value (method.alpha_high for a fixed alpha)
        "tied": [],
        # short name (folders, the figure's file); null: the key's last part
        "name": None,
        "label": None,                 # x-axis label; null: the key
        # auto | log | linear | categorical (auto: log where the values are geometric)
        "scale": "auto",
    },
    "seeds": [0],                      # one run per seed and value (the recipe's `seed` key)
    "baseline": {
        # a reference recipe (configs/pretrain/*_erm.yaml) run once per seed; null: none
        "config": None,
        "label": "ERM",                # its row and line label
    },
}

SCALES = ("auto", "log", "linear", "categorical")
# Method options a sweep commonly sets whose out-of-range values the method constructors do not
# reject.
KNOB_RANGES = {"method.n": (">", 0), "method.m": (">=", 2), "method.k": (">", 0),
               "method.alpha": (">", 0), "method.alpha_low": (">", 0),
               "method.alpha_high": (">", 0), "method.resolution": (">", 0),
               "method.prob": (">=", 0, "<=", 1)}


def value_text(v) -> str:
    """A knob value as YAML / JSON reads it (the override's right-hand side): 1000, 0.5, true,
    null, [1, 2]."""
    return json.dumps(v)


def value_slug(v) -> str:
    """A folder-safe form of a value: 1000, 0.5, true, null, _1_2_."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", value_text(v))


def knob_name(knob: dict) -> str:
    return knob["name"] or str(knob["key"]).split(".")[-1]


def check_key(key, method: str) -> None:
    """`key` must be a dotted key of a pretraining config: `method.<an option of method>` or a key
    of `pretrain.task.DEFAULTS`; the error names the key and lists the valid ones."""
    from pretrain.methods import method_knobs
    from pretrain.task import DEFAULTS as RECIPE

    if not isinstance(key, str) or not key:
        raise ConfigError(f"config key knob.key: {key!r} must be a dotted recipe key such as "
                          "method.n")
    parts = key.split(".")
    if parts[0] == "seed":
        raise ConfigError("config key knob.key: seed is swept by the `seeds` list, not as a knob")
    if parts[0] == "method":
        valid = sorted(method_knobs(method))
        if len(parts) < 2 or parts[1] not in valid:
            raise ConfigError(f"knob key {key!r}: not an option of method {method!r}; valid: "
                              f"{['method.' + k for k in valid]}")
        return
    node, where = RECIPE, []
    for p in parts:
        if not isinstance(node, dict) or p not in node:
            prefix = ".".join(where)
            valid = sorted(f"{prefix}.{k}" if prefix else k
                           for k in node) if isinstance(node, dict) else []
            raise ConfigError(f"knob key {key!r}: {p!r} is not a pretraining config key"
                              f"{' under ' + prefix if prefix else ''}; valid: {valid}")
        node, where = node[p], where + [p]
    if isinstance(node, dict) and node:
        raise ConfigError(f"knob key {key!r} is a section; valid: "
                          f"{sorted(key + '.' + k for k in node)}")


def check_values(values) -> list:
    if not isinstance(values, list) or not values:
        raise ConfigError(f"config key knob.values: {values!r} must be a non-empty list")
    slugs = [value_slug(v) for v in values]
    dup = sorted({s for s in slugs if slugs.count(s) > 1})
    if dup:
        raise ConfigError(f"config key knob.values: {values!r} repeats {dup}")
    return list(values)


def check_method_options(cfg: dict, what: str, nets: dict) -> None:
    """The method of a resolved recipe: option types (as the constructor's defaults), the ranges of
    `KNOB_RANGES`, and the method built once on the recipe's network (its constructor's own
    checks)."""
    from pretrain.methods import build_method, method_knobs, network_stages

    name = cfg["method"]["name"]
    knobs = {k: v for k, v in cfg["method"].items() if k != "name"}
    try:
        declared = method_knobs(name)
        validate({k: v for k, v in knobs.items() if k in declared},
                 {k: d for k, d in declared.items() if k in knobs}, "method")
        check_ranges({"method": knobs}, KNOB_RANGES)
        arch, classes = cfg["model"]["arch"], cfg["model"]["num_classes"] or 10
        if (arch, classes) not in nets:
            nets[(arch, classes)] = network_stages(arch, classes)
        build_method(name, nets[(arch, classes)], classes, **knobs)
    except (ConfigError, ValueError, TypeError, ImportError) as e:
        raise ConfigError(f"{what}: {e}") from e


def geometric(values: list) -> bool:
    """Positive numbers (three or more) whose consecutive ratios are all >= 1.5 and within 2.5x of
    each other."""
    if len(values) < 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                                  for v in values):
        return False
    s = sorted(values)
    ratios = [b / a for a, b in zip(s, s[1:])]
    return min(ratios) >= 1.5 and max(ratios) / min(ratios) <= 2.5


def axis_scale(values: list, scale: str) -> str:
    """The x-axis of the curve: `scale`, or for auto log (geometric values), linear (numbers) or
    categorical."""
    if scale != "auto":
        return scale
    if geometric(values):
        return "log"
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    return "linear" if numeric else "categorical"


class AblationSweep(Pipeline):
    """The sweep's stages, run by `Pipeline._stage` (content keys, `stage.json` reuse, force,
    stop-after)."""

    def __init__(self, cfg: dict, force: tuple[str, ...] = (), stop_after: int | None = None):
        self.cfg = validate(cfg, DEFAULTS)
        self.run_dir = Path(self.cfg["out_root"]) / self.cfg["name"]
        root = self.cfg["data"]["root"]
        self.data = Path(root) if root else None
        if root and not any("{data}" in str(o)
                            for o in [*self.cfg["overrides"], *self.cfg["base_overrides"]]):
            raise ConfigError(f"config key data.root: {root!r} would be ignored: no entry of "
                              "overrides or base_overrides has a {data} placeholder; give the "
                              "runs their data there instead, e.g. "
                              f"'overrides=[\"data.root={root}\"]'")
        knob = self.cfg["knob"]
        if knob["scale"] not in SCALES:
            raise ConfigError(f"config key knob.scale: {knob['scale']!r} is not one of "
                              f"{list(SCALES)}")
        self.values = check_values(knob["values"])
        try:
            self.seeds = seed_list(self.cfg["seeds"], "pretrain")
        except ConfigError:
            raise ConfigError(f"config key seeds: {self.cfg['seeds']!r} must be a non-empty list "
                              "of distinct seeds (ints >= 0)") from None
        self.name = knob_name(knob)
        self.force = set(force)
        names = self.stage_names()
        bad = self.force - names
        if bad:
            raise ConfigError(f"--force: unknown run(s) {sorted(bad)}; valid: 'all' or "
                              f"{sorted(names - {'all'})}")
        self.stop_after, self.stages_run = stop_after, 0
        self.reused: list[str] = []
        self.timings: dict[str, float] = {}
        self.check()

    def stage_names(self) -> set[str]:
        """The names --force accepts: all, one per value (its folder), baseline."""
        names = {"all"} | {f"{self.name}={value_slug(v)}" for v in self.values}
        return names | ({"baseline"} if self.cfg["baseline"]["config"] else set())

    def _overrides(self, extra: list[str], swept: bool = True) -> list[str]:
        ov = list(self.cfg["overrides"]) + (list(self.cfg["base_overrides"]) if swept else [])
        if any("{data}" in o for o in ov) and self.data is None:
            raise ConfigError("config key overrides uses {data} but data.root is null")
        return _fill(ov, data=self.data) + extra

    def _knob_overrides(self, v) -> list[str]:
        knob = self.cfg["knob"]
        return [f"{k}={value_text(v)}" for k in [knob["key"], *knob["tied"]]]

    def check(self) -> None:
        """The recipe, the knob and every run's resolved config, before anything runs."""
        from pretrain.task import resolve_config

        base, bcfg = self.cfg["base"], self.cfg["baseline"]["config"]
        if not base or not Path(base).is_file():
            raise ConfigError(f"config key base: pretraining recipe {base!r} not found")
        if bcfg and not Path(bcfg).is_file():
            raise ConfigError(f"config key baseline.config: pretraining recipe {bcfg!r} not found")
        recipe = load_config(base, self._overrides([]))
        method = (recipe.get("method") or {}).get("name")
        if self.cfg["method"] and self.cfg["method"] != method:
            raise ConfigError(f"config key method: {self.cfg['method']!r}, but the recipe {base} "
                              f"trains {method!r}")
        for key in [self.cfg["knob"]["key"], *self.cfg["knob"]["tied"]]:
            check_key(key, method)
        nets: dict = {}
        for st in self.plan():
            what = f"run {st.label} ({bcfg if st.owner == 'baseline' else base})"
            _named(resolve_config, st.spec["config"], what)
            check_method_options(resolve_config(st.spec["config"]), what, nets)

    def plan(self) -> list[Stage]:
        """One pretraining stage per (value, seed), then the baseline's per seed. Runs nothing."""
        out, base = [], self.cfg["base"]
        for v in self.values:
            folder = f"{self.name}={value_slug(v)}"
            for k in self.seeds:
                ov = self._overrides(self._knob_overrides(v) + [f"seed={k}"])
                out.append(self._stage_of(f"{folder}/seed{k}", folder, base, ov, k))
        if self.cfg["baseline"]["config"]:
            for k in self.seeds:
                ov = self._overrides([f"seed={k}"], swept=False)
                out.append(self._stage_of(f"baseline/seed{k}", "baseline",
                                          self.cfg["baseline"]["config"], ov, k))
        return out

    @staticmethod
    def _stage_of(label: str, owner: str, recipe: str, ov: list[str], seed: int) -> Stage:
        from mixup_transfer.pipeline import stages

        # the spec is the pipeline's pretraining spec: the same recipe and overrides give the same
        # content key
        return Stage(label, owner, "pretrain", frozenset({"all", owner}),
                     pretrain_spec(recipe, ov), lambda d, c=recipe,
                     ov=ov: stages.pretrain(c, ov, d), {"pretrain": seed, "transfer": None})

    def folder_of(self, st: Stage) -> Path:
        """A swept run's folder: <name>=<value>/seed<k>/ in the sweep's; a baseline run's:
        <out_root>/baselines/ <recipe>-<content key>/, shared by every sweep under out_root that
        runs the same baseline config."""
        if st.owner != "baseline":
            return self.run_dir / st.label
        return (
            Path(self.cfg["out_root"])
            / "baselines"
            / f"{Path(self.cfg['baseline']['config']).stem}-{st.key}"
        )

    def run(self) -> dict:
        """Every run (reused where done); returns {"points": [{"value", "folder", "runs"}],
        "baseline": runs or None, "reused"}, a run being {"metrics", "folder", "seeds"} as in the
        pipeline."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(dump_config(self.cfg), self.run_dir / "ablation.yaml")
        self._ensure_data()
        points = {
            f"{self.name}={value_slug(v)}": {
                "value": v,
                "folder": f"{self.name}={value_slug(v)}",
                "runs": [],
            }
            for v in self.values
        }
        baseline = [] if self.cfg["baseline"]["config"] else None
        for st in self.plan():
            folder = self.folder_of(st)
            metrics, _ = self._stage(st.label, folder, set(st.forced_by), st.call, st.spec)
            run = {"metrics": metrics, "folder": os.path.relpath(folder, self.run_dir),
                   "seeds": st.seeds}
            (baseline if st.owner == "baseline" else points[st.owner]["runs"]).append(run)
        return {"points": list(points.values()), "baseline": baseline, "reused": list(self.reused)}

    def _ensure_data(self) -> None:
        gen = self.cfg["data"]["generate"]
        if not gen or self.data is None or (self.data / "toy_world.json").exists():
            return
        from mixup_transfer.toyworld import make_toy_world
        from wsol.data import cub_to_wsol_metadata

        log.info("generating the toy world (%s) in %s", gen, self.data)
        t0 = time.time()
        make_toy_world(self.data, preset=gen.get("preset", "demo"), seed=gen.get("seed", 0),
                       wsol_metadata=cub_to_wsol_metadata)
        self.timings["toy_world"] = round(time.time() - t0, 1)


# -- results: the table, ablation.json, the curve
# --------------------------------------------------------------
def _top(key: str):
    return lambda m: get(m, f"val_{key}") if get(m, f"val_{key}") is not None else get(m, key)


def ablation_table(results: dict, knob: dict, baseline_label: str = "ERM") -> Table:
    """Rows: the knob's values in order (then the baseline, in italics); columns: final val top-1
    (and top-5 where a run has it), mean ± std over the seeds, bold by the pipeline's rule
    (`best_rows`) among the values."""
    name = knob_name(knob)
    rows = [(f"{name} = {value_text(p['value'])}", {"pretrain": p["runs"]}, False)
            for p in results["points"]]
    if results.get("baseline"):
        rows.append((baseline_label, {"pretrain": results["baseline"]}, True))
    runs = [r for _, res, _ in rows for r in res["pretrain"]]
    cols = [Column("top-1 acc (%)", "pretrain", _top("top1"))]
    if any(_top("top5")(r.get("metrics") or {}) is not None for r in runs):
        cols.append(Column("top-5 acc (%)", "pretrain", _top("top5")))
    tied = f" (with {', '.join(knob['tied'])} = the same value)" if knob.get("tied") else ""
    return Table(f"Ablation: {knob.get('label') or knob['key']}",
                 "Final validation accuracy of each pretraining run, sweeping "
                 f"{knob['key']}{tied}.", cols, rows,
                 row_header=name)


def summarize(results: dict, knob: dict, baseline_label: str = "ERM") -> dict:
    """The body of ablation.json: per value (in order) each column's per-seed values, mean, std, n,
    bold and runs; the baseline the same way (or None)."""
    table = ablation_table(results, knob, baseline_label)
    rows = table.summary()["rows"]
    labels = [label for label, _, _ in table.rows]
    points = [{"value": p["value"], "folder": p["folder"],
               **{_metric_key(h): e for h, e in rows[label].items() if h != "baseline"}}
              for p, label in zip(results["points"], labels)]
    base = None
    if results.get("baseline"):
        base = {"label": baseline_label,
                **{_metric_key(h): e for h, e in rows[baseline_label].items() if h != "baseline"}}
    return {"knob": {"key": knob["key"], "tied": list(knob.get("tied") or []),
                     "name": knob_name(knob), "label": knob.get("label") or knob["key"]},
            "metric": "final validation accuracy (%) of each pretraining run",
            "units": {"top1": "%", "top5": "%"}, "points": points, "baseline": base}


def _metric_key(header: str) -> str:
    return {"top-1 acc (%)": "top1", "top-5 acc (%)": "top5"}[header]


def write_outputs(run_dir: Path, results: dict, knob: dict, baseline_label: str = "ERM",
                  extra: dict | None = None
                  ) -> dict:
    """ablation.json, ablation.md and ablation_<name>.png in run_dir; returns their paths."""
    from mixup_transfer.pipeline.figures import ablation_curve

    run_dir = Path(run_dir)
    summary = {**summarize(results, knob, baseline_label), **(extra or {})}
    name = knob_name(knob)
    fig = run_dir / f"ablation_{value_slug(name).strip('_') or 'knob'}.png"
    points = [(p["value"], p["top1"]["values"]) for p in summary["points"]]
    base = summary["baseline"]["top1"]["values"] if summary["baseline"] else None
    ablation_curve(points, base, fig, xlabel=knob.get("label") or knob["key"],
                   scale=axis_scale([p["value"] for p in summary["points"]],
                                    knob.get("scale", "auto")),
                   baseline_label=baseline_label, title=f"Ablation of {knob['key']}")
    summary["figure"] = fig.name
    write_json(summary, run_dir / "ablation.json")
    md = ablation_table(results, knob, baseline_label).markdown()
    atomic_write_text(md + f"\n![{knob['key']}]({fig.name})\n", run_dir / "ablation.md")
    return {"json": run_dir / "ablation.json", "markdown": run_dir / "ablation.md", "figure": fig}


def run_ablation(config_path: str, overrides=(), force=(), stop_after=None) -> dict:
    """Run (or resume) the sweep of `config_path`; returns the paths of its outputs (see
    `write_outputs`)."""
    sweep = AblationSweep(load_config(config_path, overrides, DEFAULTS), force=tuple(force),
                          stop_after=stop_after)
    t0 = time.time()
    with run_lock(sweep.run_dir, "ablation"):  # one sweep per folder
        results = sweep.run()
        cfg = sweep.cfg
        extra = {"name": cfg["name"], "base": cfg["base"],
                 "baseline_config": cfg["baseline"]["config"], "seeds": sweep.seeds,
                 "reused": results["reused"], "seconds": dict(sweep.timings)}
        out = write_outputs(sweep.run_dir, results, cfg["knob"], cfg["baseline"]["label"], extra)
    log.info("ablation finished in %.1f s (%d run(s) reused); %s", time.time() - t0,
             len(results["reused"]), out["markdown"])
    return out


def plan_lines(config_path: str, overrides=()) -> list[str]:
    """The planned runs (label, content key, done / to run) without running anything."""
    sweep = AblationSweep(load_config(config_path, overrides, DEFAULTS))
    lines = []
    for st in sweep.plan():
        marker = sweep.folder_of(st) / "stage.json"
        done = marker.exists() and json.loads(marker.read_text()).get("key") == content_key(
            st.spec
        )
        lines.append(f"{st.label}  key {st.key}  {'done (reused)' if done else 'to run'}")
    return lines
