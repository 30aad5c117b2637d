"""The main job: pretraining -> backbone -> detection, WSOL and robustness -> one report.

Every stage writes into its own folder under `runs/<name>/` and, when it finishes, a `stage.json`
marker holding its metrics and its content key: the hash of its resolved config, of the keys of the
stages it reads (the pipeline is a small DAG: pretraining -> detection, WSOL, robustness) and of
the content of the files it reads (`mixup_transfer/pipeline/inputs.py`: the backbone, the dataset's
index files). A stage whose marker holds the same key is reused, so an interrupted pipeline resumes
where it stopped (stages that keep their own training checkpoints also resume inside the stage),
and a changed override, backbone or dataset reruns exactly the stages it affects and their
dependents; `force` redoes stages by name. The report lists the reused stages. One pipeline at a
time writes a run folder (`mixup_transfer/core/lock.py`).

Seeds: `seeds.pretrain` and `seeds.transfer` (an int or a list; null: each stage config's own seed,
one run) make one pretraining stage per (method, pretraining seed) and one detection / WSOL stage
per (pretraining seed, transfer seed); the seed is an override of the stage's config, so it is part
of the stage's key. Robustness evaluates each backbone once (its own draws stay those of
`robustness.options`). `Pipeline.plan` lists the stages without running anything; the report shows
mean ± std over the runs of each entry.

Layout (with seeds given, `<method>/` becomes `<method>/seed<k>/` and each detection / WSOL folder
moves into `transfer_seed<t>/`, e.g. `erm/seed1/transfer_seed0/ssd_voc/`; the random-init baselines
get `transfer_seed<t>/`):
    runs/<name>/pipeline.yaml               resolved pipeline config
    runs/<name>/<method>/pretrain/          pretraining run (backbone.pth, log.jsonl, ...)
    runs/<name>/<method>/<detector>/        one folder per detection config (ssd_voc, frcnn_coco)
    runs/<name>/<method>/wsol/              CUB fine-tuning + localization
    runs/<name>/<method>/robustness/        clean / background / calibration / FGSM / PGD / OOD
    runs/<name>/baselines/<stage>/          the same downstream stages from a random backbone
    runs/<name>/report.md, report.html,     the report
        figures/
    runs/<name>/summary.json                every table entry: per-run values, mean, std, n

This module calls each stage's one entry point, `run(cfg, inputs, run_dir) -> metrics`, through the
adapters of `mixup_transfer/pipeline/stages.py` (`pretrain.task`, `transfer.detection.stage`,
`wsol.finetune`, `transfer.robustness.stage`); the downstream stages only see the backbone file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mixup_transfer.core import distributed as ddist
from mixup_transfer.core.cli import format_error as cli_error_line
from mixup_transfer.core.config import ConfigError, dump_config, load_config, validate
from mixup_transfer.core.lock import run_lock
from mixup_transfer.core.runtime import (
    atomic_write_text,
    barrier,
    init_distributed,
    is_main_process,
    write_json,
)
from mixup_transfer.pipeline.inputs import (
    Inputs,
    detection_inputs,
    pretrain_inputs,
    robustness_inputs,
    wsol_inputs,
)
from mixup_transfer.pipeline.stages import NAMES

log = logging.getLogger("pipeline")

STAGES = NAMES  # the declared stages (mixup_transfer/pipeline/stages.py)
ROBUSTNESS_KEYS = ("suites", "ood", "options", "root")
GENERATE_KEYS = ("preset", "seed", "track", "ood")

# Every key of a pipeline config, with its meaning.
DEFAULTS = {
    "name": "toy",                     # runs/<name>/
    "out_root": "runs",                # parent folder of the run
    "data": {
        # folder holding imagenet/, VOCdevkit/, coco/, CUB_200_2011/, wsol_metadata/
        "root": "data/toy",
        # {preset, seed, track, ood}: make the toy world there if it is missing (track: standard |
        # small | all, tools/make_toy_data.py --track; ood: N images per 32 px toy OOD set under
        # <root>/ood/, 0: none); null: never
        "generate": None,
    },
    "methods": ["erm"],                # pretraining methods (pretrain.methods.METHODS names)
    "pretrain": {
        "config": "configs/pretrain/toy_{method}.yaml",   # {method} is filled in
        "overrides": [],               # KEY=VALUE strings; {data}, {method} are filled in
        # {method: [KEY=VALUE, ...]}: one method's extra overrides (after those)
        "per_method": {},
    },
    "detection": [],                   # list of {name, config, overrides}
    "wsol": None,                      # {config, overrides}, or null to skip
    # {suites, ood, options, root}, or null to skip (root: the evaluation set's layout folder,
    # default {data}/imagenet; e.g. {data}/cifar-100-python)
    "robustness": None,
    "baselines": {
        # run detection and WSOL from a randomly initialised backbone too
        "random_init": True,
    },
    "seeds": {
        # int or list: one pretraining run per seed (config key seed); null: the config's
        "pretrain": None,
        # int or list: one detection (seeds=[t]) and WSOL (seed=t) run per seed and backbone;
        # null: each stage config's own seed(s)
        "transfer": None,
    },
}


# the types of the keys whose default is null (seeds.* are checked by `seed_list`)
TYPES = {"data.generate": dict, "wsol": dict, "robustness": dict}


def seed_list(value, key: str) -> list[int] | None:
    """`seeds.<key>` as a list of distinct ints (an int is one seed), or None (the stage configs'
    own seeds)."""
    if value is None:
        return None
    items = [value] if isinstance(value, int) else value
    if (not isinstance(items, (list, tuple)) or not items or len(set(items)) != len(items)
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in items)):
        raise ConfigError(f"config key seeds.{key}: {value!r} must be a seed (an int >= 0), a "
                          "non-empty list of distinct seeds, or null")
    return list(items)


def content_key(spec: dict) -> str:
    """A stage's content key: the hash of what it computes from (its resolved config, its upstream
    stages' keys and the content identity of the files it reads,
    `mixup_transfer.pipeline.inputs.Inputs`, read now)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True,
                                     default=_identity).encode()).hexdigest()[:16]


def _identity(obj):
    return obj.identity() if isinstance(obj, Inputs) else str(obj)


@dataclass(frozen=True)
class Stage:
    """One planned stage. label: its folder relative to the run (also its name in logs and the
    reused list)."""
    label: str
    owner: str                 # the method, or "baselines"
    name: str                  # "pretrain", a detection name, "wsol" or "robustness"
    forced_by: frozenset
    spec: dict                 # what it computes from; content_key(spec) is its key
    call: Callable[[Path], dict]
    seeds: dict                # {"pretrain": k or None, "transfer": t or None}

    @property
    def key(self) -> str:
        return content_key(self.spec)


def _check_vit_stages(arch: str, method: str, cfg: dict) -> None:
    """A ViT backbone goes to the robustness stage only: detection and WSOL build ResNets from the
    checkpoint."""
    from mixup_transfer.core.checkpoint import is_vit

    if is_vit(arch) and (cfg["detection"] or cfg["wsol"]):
        raise ConfigError(f"method {method!r} pretrains a Vision Transformer ({arch}), which "
                          "detection and WSOL cannot read (they build ResNets): run it with a "
                          "pipeline without them, e.g. configs/pipeline/toy_vit.yaml")


def _fill(value, **subs):
    if isinstance(value, str):
        for k, v in subs.items():
            value = value.replace("{" + k + "}", str(v))
        return value
    if isinstance(value, list):
        return [_fill(v, **subs) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, **subs) for k, v in value.items()}
    return value


class Pipeline:
    def __init__(self, cfg: dict, methods: list[str] | None = None, force: tuple[str, ...] = (),
                 stop_after: int | None = None):
        self.cfg = validate(cfg, DEFAULTS, types=TYPES)
        if methods:
            self.cfg["methods"] = list(methods)
        self.run_dir = Path(self.cfg["out_root"]) / self.cfg["name"]
        self.data = Path(self.cfg["data"]["root"])
        self.seeds = {k: seed_list(self.cfg["seeds"][k], k) for k in ("pretrain", "transfer")}
        self._check_methods()
        self.force = set(force)
        bad = self.force - set(STAGES) - {d["name"] for d in self.cfg["detection"]}
        if bad:
            raise ConfigError(f"--force: unknown stage(s) {sorted(bad)}; valid: {list(STAGES)} "
                              f"or a detection name {[d['name'] for d in self.cfg['detection']]}")
        if "pretrain" in self.force:  # a new backbone invalidates everything downstream of it
            self.force |= set(STAGES) | {d["name"] for d in self.cfg["detection"]}
        self.stop_after = stop_after
        self.stages_run = 0
        self.reused: list[str] = []
        self.timings: dict[str, float] = {}

    def _check_methods(self) -> None:
        """Every method name and its pretraining config are checked before the first stage runs."""
        from pretrain.methods import METHODS

        unknown = [m for m in self.cfg["methods"] if m not in METHODS]
        if unknown:
            raise ConfigError(f"unknown method(s) {unknown}; valid: {sorted(METHODS)}")
        extra = sorted(set(self.cfg["pretrain"]["per_method"]) - set(METHODS))
        if extra:
            raise ConfigError(f"config key pretrain.per_method: unknown method(s) {extra}; "
                              f"valid: {sorted(METHODS)}")
        for m in self.cfg["methods"]:
            path = Path(_fill(self.cfg["pretrain"], data=self.data, method=m)["config"])
            if not path.is_file():
                raise ConfigError(f"{path}: pretraining config of method {m!r} not found")
        self._check_stage_configs()

    def _check_stage_configs(self) -> None:
        """Every stage's resolved config (with the pipeline's overrides) is validated before
        anything runs."""
        from mixup_transfer.core.config import check_ranges
        from pretrain.task import resolve_config as pretrain_config
        from transfer.detection.config import resolve_config as detection_config
        from transfer.robustness.stage import DEFAULTS as ROBUSTNESS
        from transfer.robustness.stage import RANGES
        from wsol.finetune import resolve_config as wsol_config

        subs = {"data": self.data}
        check_entries(self.cfg)
        for m in self.cfg["methods"]:
            # the recipe's own method.name, to compare
            p = self._pretrain_spec(m, name_override=False)
            resolved = _named(pretrain_config, load_config(p["config"], p["overrides"]),
                              f"{m} pretraining ({p['config']})")
            if resolved["method"]["name"] != m:
                raise ConfigError(f"{p['config']}: method.name is {resolved['method']['name']!r} "
                                  "(with the pipeline's overrides), but the pipeline runs this "
                                  f"config as method {m!r}; point pretrain.config at that "
                                  "method's recipe")
            _check_vit_stages(resolved["model"]["arch"], m, self.cfg)
        for det in self.cfg["detection"]:
            det = _fill(det, **subs)
            _named(detection_config, load_config(det["config"], det.get("overrides", [])),
                   f"detection {det['name']} ({det['config']})")
        if self.cfg["wsol"]:
            w = _fill(self.cfg["wsol"], **subs)
            _named(wsol_config, load_config(w["config"], w.get("overrides", [])),
                   f"wsol ({w['config']})")
        if self.cfg["robustness"]:
            r = self.cfg["robustness"]
            unknown = sorted(set(r) - set(ROBUSTNESS_KEYS))
            if unknown:
                raise ConfigError(f"config key robustness: unknown key(s) {unknown}; valid: "
                                  f"{list(ROBUSTNESS_KEYS)}")
            cfg = {"suites": r.get("suites", "all"), "ood": r.get("ood") or [],
                   **(r.get("options") or {})}
            _named(lambda c: check_ranges(validate(c, ROBUSTNESS), RANGES), cfg, "robustness")

    # -- bookkeeping
    # -------------------------------------------------------------------------------
    def _stage(self, key: str, folder: Path, forced_by: set[str], fn: Callable[[Path], dict],
               spec: dict) -> tuple[dict, str]:
        """Run `fn(folder)` unless `folder/stage.json` holds the result of the same `spec`; returns
        the stage's metrics and its content key.

        spec: what the stage computes from (its resolved config and the content keys of the stages
        it reads); its hash is the stage's content key, so a changed override reruns exactly the
        stages it affects and, through their keys, everything downstream of them."""
        content = content_key(spec)
        marker = folder / "stage.json"
        # under torchrun rank 0 decides (and clears a stale folder) and every rank follows its
        # decision
        stored = ddist.all_gather_objects(self._reusable(key, folder, forced_by, content)
                                          if is_main_process()
                                          else None)[0]
        if stored is not None:
            self.reused.append(key)
            return stored["metrics"], content
        if self.stop_after is not None and self.stages_run >= self.stop_after:
            raise StopPipeline(f"stopping before {key} as asked (--stop-after {self.stop_after})")
        if is_main_process():
            folder.mkdir(parents=True, exist_ok=True)
        barrier()
        log.info("[%s] running in %s", key, folder)
        t0 = time.time()
        # every rank computes (DDP training, sharded evaluation); rank 0 writes
        metrics = fn(folder)
        # rank 0's metrics (some stages return {} on the other ranks), so that every rank holds the
        # same results
        metrics, seconds = ddist.all_gather_objects((metrics, round(time.time() - t0, 1)))[0]
        self.timings[key] = seconds
        if is_main_process():
            write_json({"stage": key, "key": content, "seconds": seconds, "metrics": metrics},
                       marker)
        barrier()
        self.stages_run += 1
        log.info("[%s] finished in %.1f s", key, seconds)
        return metrics, content

    def _reusable(self, key: str, folder: Path, forced_by: set[str], content: str) -> dict | None:
        """The stored `stage.json` of `folder` when it holds the result of `content` (and the stage
        is not forced); otherwise None, after removing the folder's stale results."""
        marker = folder / "stage.json"
        if not marker.exists():
            return None
        stored = json.loads(marker.read_text())
        if forced_by & self.force:
            log.info("[%s] forced: removing %s", key, folder)
        elif stored.get("key") != content:
            log.info("[%s] its config or inputs changed (key %s -> %s): rerunning", key,
                     stored.get("key"), content)
        else:
            log.info("[%s] done already, reusing (%s)", key, marker)
            return stored
        shutil.rmtree(folder)
        return None

    # -- the job
    # -----------------------------------------------------------------------------------
    def run(self) -> dict:
        """Every planned stage (reused where done); returns {"methods": {method: {stage name: [run,
        ...]}}, "baselines": {stage name: [run, ...]}, "seeds", "reused"}, a run being {"metrics",
        "folder", "seeds"}."""
        # under torchrun: rank 0 writes, the others wait for it at the barrier
        if is_main_process():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(dump_config(self.cfg), self.run_dir / "pipeline.yaml")
            self._ensure_data()
        barrier()
        results: dict = {"methods": {m: {} for m in self.cfg["methods"]}, "baselines": {},
                         "seeds": dict(self.seeds)}
        # label -> why (its own error, or the upstream stage that failed)
        failed: dict[str, str] = {}
        for st in self.plan():
            owner = (
                results["baselines"] if st.owner == "baselines" else results["methods"][st.owner]
            )
            run = {"metrics": None, "folder": st.label, "seeds": st.seeds}
            upstream = next((lab for lab in failed
                             if st.label.startswith(lab.rsplit("/", 1)[0] + "/")
                             and lab.endswith("/pretrain")), None)
            if upstream is not None:
                run["failed"] = failed[st.label] = f"not run: {upstream} failed"
            else:
                try:
                    run["metrics"], _ = self._stage(st.label, self.run_dir / st.label,
                                                    set(st.forced_by), st.call, st.spec)
                except (StopPipeline, KeyboardInterrupt):
                    raise
                except Exception as e:  # one stage's failure must not cost the others' results
                    run["failed"] = failed[st.label] = cli_error_line(e).removeprefix("error: ")
                    log.error("[%s] FAILED: %s (its folder %s is kept for inspection; the other "
                              "stages go on)",
                              st.label, run["failed"], self.run_dir / st.label)
            owner.setdefault(st.name, []).append(run)
        results["reused"] = list(self.reused)
        results["failed"] = failed
        return results

    def plan(self) -> list[Stage]:
        """The stages in running order: per method and pretraining seed, pretraining, then per
        transfer seed detection and WSOL, then robustness; then the random-init baselines per
        transfer seed. Runs nothing."""
        from mixup_transfer.pipeline import stages  # the adapters to each package's entry point

        out = []
        for method in self.cfg["methods"]:
            pcfg = self._pretrain_spec(method)
            for k in self.seeds["pretrain"] or [None]:
                base = method if k is None else f"{method}/seed{k}"
                ov = pcfg["overrides"] + ([] if k is None else [f"seed={k}"])
                spec = pretrain_spec(pcfg["config"], ov)
                out.append(Stage(f"{base}/pretrain", method, "pretrain", frozenset({"pretrain"}),
                                 spec, lambda d, c=pcfg["config"],
                                 ov=ov: stages.pretrain(c, ov, d),
                                 {"pretrain": k, "transfer": None}))
                out += self._plan_downstream(method, base,
                                             self.run_dir / base / "pretrain" / "backbone.pth",
                                             content_key(spec), k)
        if self.cfg["baselines"]["random_init"]:
            out += self._plan_downstream("baselines", "baselines", None, None, None,
                                         robustness=False)
        return out

    def _pretrain_spec(self, method: str, name_override: bool = True) -> dict:
        """{"config", "overrides"} of `method`'s pretraining: the shared overrides, then its
        `per_method` ones."""
        p = _fill(self.cfg["pretrain"], data=self.data, method=method)
        overrides = list(p["overrides"]) + list(p["per_method"].get(method) or [])
        # the stage runs the pipeline's method (checked to agree with the recipe's)
        if name_override:
            overrides.append(f"method.name={method}")
        return {"config": p["config"], "overrides": overrides}

    def _plan_downstream(self, owner: str, base: str, backbone: Path | None, upstream: str | None,
                         pseed: int | None, robustness: bool = True) -> list[Stage]:
        from mixup_transfer.pipeline import stages

        out, subs = [], {"data": self.data}
        for t in self.seeds["transfer"] or [None]:
            folder, seeds = (base if t is None
                             else f"{base}/transfer_seed{t}"), {"pretrain": pseed, "transfer": t}
            for det in self.cfg["detection"]:
                det = _fill(det, **subs)
                ov = det.get("overrides", []) + ([] if t is None else [f"seeds=[{t}]"])
                dcfg = load_config(det["config"], ov)
                spec = {"config": dcfg, "backbone": upstream,
                        "inputs": detection_inputs(dcfg, backbone)}
                out.append(Stage(f"{folder}/{det['name']}", owner, det["name"],
                                 frozenset({"detection", det["name"]}), spec,
                                 lambda d, c=det["config"],
                                 ov=ov: stages.detection(c, ov, backbone, d), seeds))
            if self.cfg["wsol"]:
                w = _fill(self.cfg["wsol"], **subs)
                ov = w.get("overrides", []) + ([] if t is None else [f"seed={t}"])
                wcfg = load_config(w["config"], ov)
                spec = {"config": wcfg, "backbone": upstream,
                        "inputs": wsol_inputs(wcfg, backbone)}
                out.append(Stage(f"{folder}/wsol", owner, "wsol", frozenset({"wsol"}), spec,
                                 lambda d, c=w["config"], ov=ov: stages.wsol(c, ov, backbone, d),
                                 seeds))
        if robustness and self.cfg["robustness"]:
            r = _fill(self.cfg["robustness"], **subs)
            root = Path(r.get("root") or self.data / "imagenet")
            out.append(Stage(f"{base}/robustness", owner, "robustness", frozenset({"robustness"}),
                             {"spec": r, "backbone": upstream,
                              "inputs": robustness_inputs(backbone, root, r.get("ood"))},
                             lambda d: stages.robustness(backbone, root, r, d),
                             {"pretrain": pseed, "transfer": None}))
        return out

    def _ensure_data(self) -> None:
        gen = self.cfg["data"]["generate"]
        unknown = sorted(set(gen or {}) - set(GENERATE_KEYS))
        if unknown:
            raise ConfigError(f"config key data.generate: unknown key(s) {unknown}; valid: "
                              f"{list(GENERATE_KEYS)}")
        t0 = time.time()
        if not ((self.data / "toy_world.json").exists() or (self.data / "imagenet").exists()):
            if not gen:
                raise ConfigError(f"data root {self.data} has no datasets, and data.generate is "
                                  "null")
            from mixup_transfer.toyworld import make_toy_world
            from wsol.data import cub_to_wsol_metadata

            log.info("generating the toy world (%s) in %s", gen, self.data)
            make_toy_world(self.data, preset=gen.get("preset", "demo"), seed=gen.get("seed", 0),
                           wsol_metadata=cub_to_wsol_metadata, track=gen.get("track", "standard"))
        n_ood = int((gen or {}).get("ood") or 0)
        if n_ood > 0 and not (self.data / "ood").exists():
            from mixup_transfer.toyworld.ood import write_ood_folders

            log.info("writing the toy OOD sets (%d images each) in %s", n_ood, self.data / "ood")
            write_ood_folders(self.data / "ood", seed=gen.get("seed", 0), n=n_ood)
        if time.time() - t0 > 0.5:
            self.timings["toy_world"] = round(time.time() - t0, 1)


DETECTION_KEYS = ("name", "config", "overrides")
WSOL_KEYS = ("config", "overrides")


def _check_entry(entry, keys: tuple, required: tuple, where: str) -> None:
    """A stage entry of the pipeline config: a mapping of `keys` (`required` present), overrides a
    list."""
    if not isinstance(entry, dict):
        raise ConfigError(f"config key {where}: expected a mapping with keys {list(keys)}, got "
                          f"{entry!r}")
    unknown = sorted(set(entry) - set(keys))
    if unknown:
        raise ConfigError(f"config key {where}: unknown key(s) {unknown}; valid: {list(keys)}")
    missing = [k for k in required if not isinstance(entry.get(k), str) or not entry.get(k)]
    if missing:
        raise ConfigError(f"config key {where}: {missing[0]!r} must be a non-empty string")
    ov = entry.get("overrides", [])
    if not isinstance(ov, list) or not all(isinstance(o, str) for o in ov):
        raise ConfigError(f"config key {where}.overrides: expected a list of KEY=VALUE strings, "
                          f"got {ov!r}")


def check_entries(cfg: dict) -> None:
    """Unknown or malformed keys in the detection, WSOL and per-method entries are errors naming
    the key (a misspelled `overides:` would otherwise be dropped without a word)."""
    if not isinstance(cfg["detection"], list):
        raise ConfigError(f"config key detection: expected a list of {{name, config, overrides}}, "
                          f"got {cfg['detection']!r}")
    names = []
    for i, det in enumerate(cfg["detection"]):
        _check_entry(det, DETECTION_KEYS, ("name", "config"), f"detection[{i}]")
        names.append(det["name"])
    if len(set(names)) != len(names):
        raise ConfigError(f"config key detection: duplicate names {names}")
    if cfg["wsol"] is not None:
        _check_entry(cfg["wsol"], WSOL_KEYS, ("config",), "wsol")
    ov = cfg["pretrain"]["overrides"]
    if not all(isinstance(o, str) for o in ov):
        raise ConfigError("config key pretrain.overrides: expected a list of KEY=VALUE strings, "
                          f"got {ov!r}")
    for m, ov in cfg["pretrain"]["per_method"].items():
        if ov is not None and not isinstance(ov, list) or not all(isinstance(o, str) for o in ov):
            raise ConfigError(f"config key pretrain.per_method.{m}: expected a list of KEY=VALUE "
                              f"strings, got {ov!r}")


def pretrain_spec(config: str, overrides: list[str]) -> dict:
    """What a pretraining stage computes from: its config with the overrides and its dataset
    folder."""
    cfg = load_config(config, overrides)
    return {"config": cfg, "inputs": pretrain_inputs(cfg)}


def _named(check, cfg: dict, what: str):
    try:
        return check(cfg)
    except ConfigError as e:
        raise ConfigError(f"{what}: {e}") from e


class StopPipeline(RuntimeError):
    """Raised by --stop-after to simulate an interruption between stages."""


def _provenance(pipe: Pipeline, command: str, t0: float) -> dict:
    """This invocation's provenance, or the stored one when every stage was reused (the numbers are
    that run's)."""
    from mixup_transfer.pipeline.publish import provenance

    old = pipe.run_dir / "summary.json"
    if pipe.stages_run == 0 and old.exists():
        stored = json.loads(old.read_text()).get("provenance")
        if stored:
            return stored
    return provenance(command, t0, time.time(), pipe.stages_run, pipe.reused)


def run_pipeline(config_path: str, overrides=(), methods=None, force=(), stop_after=None,
                 command: str = "") -> Path:
    """Run (or resume) the pipeline of `config_path`; returns the path of the report.

    Under torchrun (the process group joined by the caller,
    `mixup_transfer.core.distributed.torchrun_session`) every rank runs every stage: training under
    DDP, evaluation sharded; rank 0 alone writes stage.json, the report and the stages' files, and
    the ranks meet at a barrier at each stage boundary."""
    from mixup_transfer.pipeline.report import write_report

    # under torchrun: join the group now (a no-op when the caller did, or outside torchrun)
    init_distributed()
    cfg = load_config(config_path, overrides, DEFAULTS)
    pipe = Pipeline(cfg, methods=methods, force=tuple(force), stop_after=stop_after)
    t0 = time.time()
    with run_lock(pipe.run_dir, "pipeline"):  # one pipeline per run folder (rank 0 holds it)
        results = pipe.run()
        report = pipe.run_dir / "report.md"
        if is_main_process():
            results["provenance"] = _provenance(pipe, command, t0)
            report = write_report(pipe.run_dir, results, pipe.cfg)
        barrier()
    log.info("pipeline finished in %.1f s; report: %s", time.time() - t0, report)
    if results["failed"]:
        raise StagesFailed(report, results["failed"])
    return report


class StagesFailed(RuntimeError):
    """Some stages failed (and their dependents did not run); the report was written with them
    marked."""

    def __init__(self, report: Path, failed: dict[str, str]):
        self.report, self.failed = report, failed
        lines = "\n".join(f"  {label}: {why}" for label, why in failed.items())
        super().__init__(f"{len(failed)} stage(s) failed or did not run (marked in {report}):\n"
                         f"{lines}")
