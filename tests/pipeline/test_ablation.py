"""Ablation sweeps: the plan (values x seeds -> stages), config errors before anything runs,
aggregation and the table on hand-made numbers, the figure, and one tiny sweep end to end (a second
invocation reuses every run)."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from mixup_transfer.core.config import ConfigError
from mixup_transfer.pipeline.ablation import (
    DEFAULTS,
    AblationSweep,
    axis_scale,
    summarize,
    value_slug,
    write_outputs,
)
from mixup_transfer.pipeline.run import content_key, pretrain_spec
from mixup_transfer.pipeline.tables import RULE_SPREAD

ROOT = Path(__file__).resolve().parents[2]
TINY = ["optim.epochs=1", "optim.batch_size=32", "data.crop_size=32", "data.val_resize=36",
        "data.num_workers=0", "runtime.flops=false", "runtime.figures=false"]


def _cfg(tmp_path, **extra) -> dict:
    cfg = yaml.safe_load((ROOT / "configs/ablation/toy_multimix_n.yaml").read_text())
    cfg.update(out_root=str(tmp_path / "runs"), base=str(ROOT / cfg["base"]))
    cfg["data"] = {"root": str(tmp_path / "data"), "generate": None}
    cfg["baseline"]["config"] = str(ROOT / cfg["baseline"]["config"])
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


# -- the plan
# -------------------------------------------------------------------------------------------------
def test_values_times_seeds_are_distinct_stages(tmp_path):
    sweep = AblationSweep(_cfg(tmp_path, seeds=[0, 3], knob={"values": [1, 10, 100]}))
    plan = sweep.plan()
    assert [s.label for s in plan] == [f"n={v}/seed{k}" for v in (1, 10, 100) for k in (0, 3)] + \
        ["baseline/seed0", "baseline/seed3"]
    assert len({s.key for s in plan}) == 8
    st = {s.label: s for s in plan}
    cfg = st["n=10/seed3"].spec["config"]
    # the recipe's other knobs
    assert cfg["method"]["n"] == 10 and cfg["seed"] == 3 and cfg["method"]["m"] == 4
    assert (
        cfg["data"]["root"] == str(tmp_path / "data") + "/imagenet" and cfg["optim"]["epochs"] == 2
    )
    assert st["baseline/seed3"].spec["config"]["method"] == {"name": "erm"}
    assert st["baseline/seed3"].spec["config"]["seed"] == 3
    # the key is the pipeline's pretraining key: the hash of the resolved recipe with the same
    # overrides
    ov = [f"data.root={tmp_path / 'data'}/imagenet", "optim.epochs=2", "runtime.figures=false",
          "runtime.flops=false", "method.n=10", "seed=3"]
    assert st["n=10/seed3"].key == content_key(
        pretrain_spec(ROOT / "configs/pretrain/toy_multimix.yaml", ov)
    )
    # a shared baseline folder, named by its key; swept runs live in the sweep's folder
    assert (
        sweep.folder_of(st["baseline/seed0"])
        == tmp_path / "runs/baselines" / f"toy_erm-{st['baseline/seed0'].key}"
    )
    assert sweep.folder_of(st["n=1/seed0"]) == tmp_path / "runs/toy_multimix_n/n=1/seed0"
    # adding a value leaves the existing runs' keys alone
    more = {
        s.label: s.key
        for s in AblationSweep(
            _cfg(tmp_path, seeds=[0, 3], knob={"values": [1, 10, 100, 1000]})
        ).plan()
    }
    assert all(more[label] == s.key for label, s in st.items())


def test_tied_keys_take_the_value(tmp_path):
    knob = {"key": "method.alpha_low", "tied": ["method.alpha_high"], "name": "alpha",
            "values": [0.5, 1.0]}
    plan = AblationSweep(_cfg(tmp_path, knob=knob, baseline={"config": None})).plan()
    assert [s.label for s in plan] == ["alpha=0.5/seed0", "alpha=1.0/seed0"]
    m = plan[1].spec["config"]["method"]
    assert (m["alpha_low"], m["alpha_high"]) == (1.0, 1.0)


def test_unknown_method_option_names_the_key_and_lists_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError) as e:
        AblationSweep(_cfg(tmp_path, knob={"key": "method.num_mixes"}))
    msg = str(e.value)
    assert (
        "method.num_mixes" in msg
        and "multimix" in msg
        and "'method.n'" in msg
        and "'method.m'" in msg
    )


def test_unknown_recipe_key_lists_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"'optim.lrr'.*'lrr'.*under optim.*'optim.lr'"):
        AblationSweep(_cfg(tmp_path, knob={"key": "optim.lrr", "values": [0.1]}))
    with pytest.raises(ConfigError, match="is a section"):
        AblationSweep(_cfg(tmp_path, knob={"key": "optim", "values": [0.1]}))
    with pytest.raises(ConfigError, match="seeds"):
        AblationSweep(_cfg(tmp_path, knob={"key": "seed", "values": [1]}))


@pytest.mark.parametrize("knob, match", [
    # a range the method does not check
    ({"values": [10, 0]}, r"n=0/seed0.*method.n: 0 is out of range"),
    ({"values": [10, 2.5]}, r"n=2.5/seed0.*method.n: expected an integer"),   # the option's type
    ({"key": "method.prob", "values": [0.5, 1.5]}, r"prob=1.5.*method.prob"),
    # the recipe's
    ({"key": "optim.epochs", "values": [2, 0]},
     r"epochs=0/seed0.*optim.epochs: 0 is out of range"),
    ({"values": []}, "knob.values"),
    ({"values": [1, 1]}, "repeats"),
    ({"scale": "cubic"}, "knob.scale"),
])
def test_a_bad_value_fails_before_anything_runs(tmp_path, knob, match):
    with pytest.raises(ConfigError, match=match):
        AblationSweep(_cfg(tmp_path, knob=knob))
    assert not (tmp_path / "runs").exists()


def test_the_method_constructor_checks_run_too(tmp_path):
    cfg = _cfg(tmp_path, base=str(ROOT / "configs/pretrain/toy_dense_multimix.yaml"),
               method="dense_multimix",
               knob={"key": "method.attention", "values": ["gap_l1relu", "gap_max"]})
    with pytest.raises(ConfigError, match=r"attention=_gap_max_/seed0.*attention must be one of"):
        AblationSweep(cfg)


def test_other_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="trains 'multimix'"):
        AblationSweep(_cfg(tmp_path, method="alignmix"))
    with pytest.raises(ConfigError, match="config key seeds"):
        AblationSweep(_cfg(tmp_path, seeds=[0, 0]))
    with pytest.raises(ConfigError, match="base"):
        AblationSweep(_cfg(tmp_path, base="configs/pretrain/nope.yaml"))
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['knob.values_'\]"):
        load_config_dict({"knob": {"values_": [1]}})
    with pytest.raises(ConfigError, match=r"--force: unknown run\(s\) \['n=7'\]; valid: 'all' or "
                       r"\['baseline', "
                                          r"'n=1', 'n=10', 'n=100', 'n=1000'\]"):
        AblationSweep(_cfg(tmp_path), force=("n=7",))


def load_config_dict(cfg):
    from mixup_transfer.core.config import validate

    return validate(cfg, DEFAULTS)


def test_value_slugs_and_axis():
    assert [value_slug(v) for v in (1000, 0.5, True, None, [1, 2], "gap")] == \
        ["1000", "0.5", "true", "null", "_1__2_", "_gap_"]
    assert axis_scale([1, 10, 100, 1000, 10000], "auto") == "log"
    assert axis_scale([2, 4, 8, 16, 32, 64, 128], "auto") == "log"
    assert axis_scale([1, 3, 5, 7, 9], "auto") == "linear"  # ratios 3 .. 1.29: not geometric
    assert axis_scale([0, 1, 2, 3, 5], "auto") == "linear"
    assert axis_scale([False, True], "auto") == "categorical"
    assert axis_scale([1, 10, 100], "categorical") == "categorical"


# -- aggregation, table and figure on hand-made numbers
# -----------------------------------------------------------
def _fake():
    def runs(folder, vals):
        return [{"metrics": {"top1": v, "top5": v + 10}, "folder": f"{folder}/seed{k}",
                 "seeds": {"pretrain": k, "transfer": None}} for k, v in enumerate(vals)]

    return {"points": [{"value": 1, "folder": "n=1", "runs": runs("n=1", [50.0, 52.0, 51.0])},
                       {"value": 10, "folder": "n=10", "runs": runs("n=10", [60.0, 62.0, 64.0])},
                       {"value": 100, "folder": "n=100",
                        "runs": runs("n=100", [70.0, 71.0, 72.0])}],
            "baseline": runs("../baselines/toy_erm", [80.0, 81.0, 82.0])}


KNOB = {"key": "method.n", "tied": [], "name": None, "label": None, "scale": "auto"}


def test_summary_values_mean_std_n_and_bold():
    s = summarize(_fake(), KNOB)
    assert [p["value"] for p in s["points"]] == [1, 10, 100]
    p10 = s["points"][1]["top1"]
    assert (
        p10["values"] == [60.0, 62.0, 64.0]
        and p10["mean"] == 62.0
        and p10["std"] == 2.0
        and p10["n"] == 3
    )
    assert s["points"][0]["top1"]["std"] == 1.0 and s["points"][0]["top5"]["mean"] == 61.0
    # bold: n=100 (71 ± 1) beats n=10 (62 ± 2) by 9 > both stds; the baseline (81) is never bold
    assert [p["top1"]["bold"] for p in s["points"]] == [False, False, True]
    assert s["baseline"]["label"] == "ERM" and s["baseline"]["top1"]["mean"] == 81.0
    assert not s["baseline"]["top1"]["bold"]
    assert s["points"][2]["top1"]["runs"][1] == {"folder": "n=100/seed1",
                                                 "seeds": {"pretrain": 1, "transfer": None}}
    json.dumps(s, allow_nan=False)


def test_table_and_files(tmp_path):
    out = write_outputs(tmp_path, _fake(), KNOB, "ERM", {"name": "fake"})
    md = out["markdown"].read_text()
    assert "| n | top-1 acc (%) ↑ | top-5 acc (%) ↑ |" in md
    assert "| n = 1 | [51.00 ± 1.00](n=1/) | [61.00 ± 1.00](n=1/) |" in md
    assert "| n = 100 | **[71.00 ± 1.00](n=100/)** | **[81.00 ± 1.00](n=100/)** |" in md
    assert "| *ERM* | [81.00 ± 1.00](../baselines/toy_erm/) |" in md
    assert (
        "over the runs, n=3." in md and RULE_SPREAD in md and "![method.n](ablation_n.png)" in md
    )
    data = json.loads(out["json"].read_text())
    assert (
        data["name"] == "fake"
        and data["figure"] == "ablation_n.png"
        and data["knob"]["key"] == "method.n"
    )
    assert out["figure"] == tmp_path / "ablation_n.png" and out["figure"].stat().st_size > 5000


def test_a_missing_seed_and_one_seed(tmp_path):
    res = _fake()
    res["points"][0]["runs"] = res["points"][0]["runs"][:1]  # one run: the value alone, no std
    res["baseline"] = None
    s = summarize(res, {**KNOB, "name": "n_mix", "label": "n"})
    assert s["points"][0]["top1"] == {**s["points"][0]["top1"], "values": [50.0], "std": None,
                                      "n": 1}
    assert s["baseline"] is None and s["knob"]["name"] == "n_mix"
    out = write_outputs(tmp_path, res, {**KNOB, "name": "n_mix"})
    assert "| n_mix = 1 | [50.00](n=1/seed0/) |" in out["markdown"].read_text()
    assert out["figure"].name == "ablation_n_mix.png" and out["figure"].exists()


# -- end to end
# -------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_sweep_end_to_end_and_reuse(tmp_path, toy_world, one_thread):
    from mixup_transfer.pipeline.ablation import run_ablation

    shutil.copytree(toy_world / "imagenet", tmp_path / "data" / "imagenet")
    cfg = _cfg(tmp_path, knob={"values": [1, 100]}, baseline={"config": None})
    cfg["overrides"] = cfg["overrides"] + TINY
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = run_ablation(str(path))
    run_dir = tmp_path / "runs" / "toy_multimix_n"
    data = json.loads(out["json"].read_text())
    assert data["reused"] == [] and [p["value"] for p in data["points"]] == [1, 100]
    for p in data["points"]:
        stage = json.loads((run_dir / f"n={p['value']}/seed0/stage.json").read_text())
        assert p["top1"]["values"] == [stage["metrics"]["val_top1"]] and p["top1"]["n"] == 1
        assert 0.0 <= p["top1"]["mean"] <= 100.0 and p["top5"]["values"] == [
            stage["metrics"]["val_top5"]
        ]
        assert (run_dir / f"n={p['value']}/seed0/backbone.pth").exists()
    assert out["figure"].exists() and "| n = 100 |" in out["markdown"].read_text()
    stamps = {d: (run_dir / d / "stage.json").stat().st_mtime_ns
              for d in ("n=1/seed0", "n=100/seed0")}
    # a second invocation: every run reused
    again = json.loads(run_ablation(str(path))["json"].read_text())
    assert again["reused"] == ["n=1/seed0", "n=100/seed0"] and again["points"] == data["points"]
    assert {d: (run_dir / d / "stage.json").stat().st_mtime_ns for d in stamps} == stamps
    run_ablation(str(path), force=["n=100"])  # --force one value: only that run is redone
    assert (run_dir / "n=1/seed0/stage.json").stat().st_mtime_ns == stamps["n=1/seed0"]
    assert (run_dir / "n=100/seed0/stage.json").stat().st_mtime_ns != stamps["n=100/seed0"]


# -- the command line
# ----------------------------------------------------------------------------------------------
def _cli():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ablate_cli", ROOT / "tools" / "ablate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_cli_plan_and_a_bad_knob(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(_cfg(tmp_path, knob={"values": [1, 10]})))
    assert _cli()(["--config", str(path), "--plan"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == ["n=1/seed0", "n=10/seed0", "baseline/seed0"]
    assert all(ln.endswith("to run") for ln in lines)
    # bad input: exit 2, one error line
    assert _cli()(["--config", str(path), "knob.key=method.nn"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: knob key 'method.nn': not an option of method 'multimix'; "
                          "valid: [")
    assert not (tmp_path / "runs").exists()
