"""Seeds end to end: the seed lists' stage plan, mean ± std in the tables, the bold rule,
summary.json."""

import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
import yaml

from mixup_transfer.core.config import ConfigError, load_config
from mixup_transfer.pipeline import tables
from mixup_transfer.pipeline.run import Pipeline
from mixup_transfer.pipeline.tables import (
    RULE_ONE,
    RULE_SPREAD,
    Cell,
    Column,
    Table,
    best_rows,
    mean_std,
)

ROOT = Path(__file__).resolve().parents[2]


# -- mean, std and their formatting
# ----------------------------------------------------------------------------
def test_mean_and_sample_std():
    mean, std = mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    # ddof = 1: 1.2910
    assert std == pytest.approx(math.sqrt((1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 3))
    assert mean_std([7.25]) == (7.25, None)  # one run: the value itself, no std
    assert mean_std([3.0, 3.0]) == (3.0, 0.0)


def test_cell_text():
    assert Cell([1.0, 2.0, 3.0], []).text("{:.2f}") == "2.00 ± 1.00"
    assert Cell([10.0, 11.0], []).text("{:.1f}") == "10.5 ± 0.7"  # std of (10, 11) = 0.7071
    assert Cell([61.234], []).text("{:.2f}") == "61.23"  # one run: the value alone, no ± part
    assert Cell([], []).text("{:.2f}") == "—"


# -- the bold rule
# ------------------------------------------------------------------------------------------
def test_bold_clear_win_with_spread():
    # gap 2.0 beats both stds (0.5, 0.4)
    assert best_rows([(78.0, 0.5, 3), (80.0, 0.4, 3), (70.0, 0.1, 3)], "high") == {1}


def test_no_bold_where_stds_overlap():
    # gap 1.0 < 1.5 (larger than 0.4 only)
    assert best_rows([(80.0, 1.5, 3), (79.0, 0.4, 3)], "high") == set()
    # the next-best's std counts too
    assert best_rows([(80.0, 0.4, 3), (79.0, 1.5, 3)], "high") == set()
    # gap equal to a std: not larger
    assert best_rows([(80.0, 1.0, 3), (79.0, 0.5, 3)], "high") == set()


def test_ties():
    assert best_rows([(80.0, 0.0, 2), (80.0, 0.0, 2)], "high") == set()  # runs: a tie is no win
    # one run: all tied
    assert best_rows([(80.0, None, 1), (80.0, None, 1), (70.0, None, 1)], "high") == {0, 1}


def test_one_run_is_todays_rule():
    assert best_rows([(78.0, None, 1), (78.1, None, 1)], "high") == {1}  # any gap wins
    assert best_rows([(5.0, None, 1)], "high") == {0}
    # no entry, nan: never best
    assert best_rows([None, (5.0, None, 1), (float("nan"), None, 1)], "high") == {1}
    # a column without a direction
    assert best_rows([(5.0, None, 1), (6.0, None, 1)], None) == set()


def test_lower_is_better():
    # ECE: 3.0 ± 0.2 against 5.0 ± 0.3 is a clear win; 3.0 ± 0.8 against 3.5 ± 0.1 is not
    assert best_rows([(5.0, 0.3, 3), (3.0, 0.2, 3)], "low") == {1}
    assert best_rows([(3.5, 0.1, 3), (3.0, 0.8, 3)], "low") == set()
    assert best_rows([(3.0, None, 1), (2.0, None, 1)], "low") == {1}


def test_mixed_run_counts_and_a_lone_entry():
    # the single run has no std (0): the gap 1.0 must beat the best's 0.5 only
    assert best_rows([(80.0, 0.5, 3), (79.0, None, 1)], "high") == {0}
    assert best_rows([(80.0, 0.5, 3), None], "high") == {0}  # nothing to beat


# -- tables from hand-made runs
# ---------------------------------------------------------------------------------
def _runs(stage, method, vals, key="top1"):
    return [{"metrics": {key: v}, "folder": f"{method}/seed{k}/{stage}",
             "seeds": {"pretrain": k, "transfer": None}}
            for k, v in enumerate(vals)]


def _table(erm, mixup, base=None):
    rows = [("erm", {"pretrain": _runs("pretrain", "erm", erm)}, False),
            ("mixup", {"pretrain": _runs("pretrain", "mixup", mixup)}, False)]
    if base is not None:
        rows.append(("chance", tables.const("pretrain", {"top1": base}), True))
    return Table("T", "Caption.", [Column("top-1", "pretrain", lambda m: tables.get(m, "top1"))],
                 rows)


def test_table_with_seeds():
    md = _table([80.0, 82.0, 81.0], [70.0, 71.0, 69.0], base=99.0).markdown()
    # gap 11 > 1.00, 1.00; the link: the seeds' parent
    assert "| erm | **[81.00 ± 1.00](erm/)** |" in md
    assert "| mixup | [70.00 ± 1.00](mixup/) |" in md
    assert "| *chance* | 99.00 |" in md  # a baseline is never bold, even when higher
    assert "n=3 runs" not in md and "over the runs, n=3." in md and RULE_SPREAD in md
    md = _table([80.0, 82.0, 81.0], [79.0, 80.0, 81.0]).markdown()  # 81 ± 1 vs 80 ± 1: overlapping
    assert "**" not in md.split("| method |")[1].split(RULE_SPREAD)[0]


def test_table_with_one_run_reads_as_before():
    md = _table([80.0], [80.0], base=99.0).markdown()
    assert md == ("### T\n"
                  "\n"
                  "Caption. One run per entry (n=1).\n"
                  "\n"
                  "| method | top-1 ↑ |\n"
                  "|---|---:|\n"
                  "| erm | **[80.00](erm/seed0/pretrain/)** |\n"
                  "| mixup | **[80.00](mixup/seed0/pretrain/)** |\n"
                  "| *chance* | 99.00 |\n"
                  "\n" + RULE_ONE + "\n")


def test_detection_seeds_inside_a_stage_are_runs():
    """A detection config's own seeds (its `per_seed` list) count as runs; one seed keeps the
    stage's numbers."""
    per_seed = [{"seed": s, "mAP": v} for s, v in ((0, 10.0), (1, 14.0))]
    res = {"methods": {"erm": {"ssd_voc": [{"metrics": {"mAP": 12.0, "per_seed": per_seed},
                                            "folder": "erm/ssd_voc",
                                            "seeds": {"pretrain": None, "transfer": None}}]},
                       "mixup": {"ssd_voc": [{"metrics": {"mAP": 3.0, "per_seed": per_seed[:1]},
                                              "folder": "mixup/ssd_voc", "seeds": {}}]}}}
    t = tables.detection_table(res, ["ssd_voc"])
    s = t.summary()["rows"]
    assert (
        s["erm"]["ssd_voc mAP (%)"]["values"] == [10.0, 14.0]
        and s["erm"]["ssd_voc mAP (%)"]["n"] == 2
    )
    assert s["erm"]["ssd_voc mAP (%)"]["std"] == pytest.approx(math.sqrt(8.0))
    assert [r["folder"] for r in s["erm"]["ssd_voc mAP (%)"]["runs"]] == ["erm/ssd_voc/seed_0",
                                                                          "erm/ssd_voc/seed_1"]
    assert s["mixup"]["ssd_voc mAP (%)"]["values"] == [3.0]
    md = t.markdown()
    assert "[12.00 ± 2.83](erm/ssd_voc/)" in md and "n=2 (erm), n=1 (mixup)" in md


def test_summary_holds_values_mean_std_and_bold():
    s = _table([80.0, 82.0, 81.0], [70.0, 71.0, 69.0]).summary()
    erm = s["rows"]["erm"]["top-1"]
    assert (
        erm["values"] == [80.0, 82.0, 81.0]
        and erm["mean"] == 81.0
        and erm["std"] == 1.0
        and erm["n"] == 3
    )
    assert erm["bold"] and not s["rows"]["mixup"]["top-1"]["bold"]
    assert erm["runs"][1] == {"folder": "erm/seed1/pretrain",
                              "seeds": {"pretrain": 1, "transfer": None}}
    assert s["columns"] == {"top-1": {"better": "high"}}
    json.dumps(s, allow_nan=False)  # plain JSON


# -- the stage plan
# ---------------------------------------------------------------------------------------------
def _cfg(**extra) -> dict:
    cfg = yaml.safe_load((ROOT / "configs/pipeline/toy.yaml").read_text())
    cfg["methods"] = ["erm", "multimix"]
    cfg["pretrain"]["config"] = str(ROOT / cfg["pretrain"]["config"])
    for det in cfg["detection"]:
        det["config"] = str(ROOT / det["config"])
    cfg["wsol"]["config"] = str(ROOT / cfg["wsol"]["config"])
    cfg.update(extra)
    return cfg


def test_default_plan_is_todays_stages_and_keys():
    cfg = _cfg()
    plan = Pipeline(cfg).plan()
    labels = [s.label for s in plan]
    assert labels == [f"{m}/{s}" for m in ("erm", "multimix")
                      for s in ("pretrain", "ssd_voc", "frcnn_coco", "wsol", "robustness")] + \
        ["baselines/ssd_voc", "baselines/frcnn_coco", "baselines/wsol"]
    data = cfg["data"]["root"]
    p = cfg["pretrain"]
    ov = [o.replace("{data}", data).replace("{method}", "erm") for o in p["overrides"]]
    det = cfg["detection"][0]
    by_label = {s.label: s for s in plan}
    # a stage's key hashes its resolved config, its upstream stage's key and its inputs' identity
    assert by_label["erm/pretrain"].spec["config"] == load_config(
        p["config"].replace("{method}", "erm"), ov
    )
    assert by_label["erm/ssd_voc"].spec["config"] == load_config(
        det["config"], [o.replace("{data}", data) for o in det["overrides"]])
    assert by_label["erm/ssd_voc"].spec["backbone"] == by_label["erm/pretrain"].key
    # the config's own seed
    assert by_label["erm/pretrain"].seeds == {"pretrain": None, "transfer": None}


def test_seed_lists_expand_to_one_stage_per_seed():
    plan = Pipeline(_cfg(seeds={"pretrain": [0, 1], "transfer": [0, 2]})).plan()
    labels = [s.label for s in plan]
    want = []
    for m in ("erm", "multimix"):
        for k in (0, 1):
            want.append(f"{m}/seed{k}/pretrain")
            want += [f"{m}/seed{k}/transfer_seed{t}/{s}" for t in (0, 2)
                     for s in ("ssd_voc", "frcnn_coco", "wsol")]
            want.append(f"{m}/seed{k}/robustness")
    want += [f"baselines/transfer_seed{t}/{s}" for t in (0, 2)
             for s in ("ssd_voc", "frcnn_coco", "wsol")]
    assert labels == want and len(want) == 38
    assert len({s.key for s in plan}) == 38  # every run its own content key
    st = {s.label: s for s in plan}
    assert st["erm/seed1/pretrain"].spec["config"]["seed"] == 1
    assert st["erm/seed1/transfer_seed2/ssd_voc"].spec["config"]["seeds"] == [2]
    assert st["erm/seed1/transfer_seed2/wsol"].spec["config"]["seed"] == 2
    # downstream reads its own backbone
    for s in ("transfer_seed2/ssd_voc", "transfer_seed0/wsol", "robustness"):
        assert st[f"erm/seed1/{s}"].spec["backbone"] == st["erm/seed1/pretrain"].key
    assert st["erm/seed1/transfer_seed2/wsol"].seeds == {"pretrain": 1, "transfer": 2}
    assert st["baselines/transfer_seed2/wsol"].spec["backbone"] is None

    # adding a seed leaves the existing runs' keys alone: they are reused
    more = {s.label: s.key
            for s in Pipeline(_cfg(seeds={"pretrain": [0, 1, 2], "transfer": [0, 2]})).plan()}
    assert all(more[label] == s.key for label, s in st.items())


def test_a_single_int_is_one_seed():
    plan = Pipeline(_cfg(seeds={"pretrain": 3}, methods=["erm"])).plan()
    assert [s.label for s in plan][:2] == ["erm/seed3/pretrain", "erm/seed3/ssd_voc"]
    assert plan[0].spec["config"]["seed"] == 3


@pytest.mark.parametrize("bad", [[1, 1], [], "0", True, [0, -1], {"a": 1}])
def test_bad_seed_lists(bad):
    with pytest.raises(ConfigError, match="seeds.pretrain"):
        Pipeline(_cfg(seeds={"pretrain": bad}))


def test_unknown_seed_key():
    with pytest.raises(ConfigError, match="detection"):
        Pipeline(_cfg(seeds={"detection": [0]}))


# -- end to end: two pretraining seeds on the tiny toy world
# -------------------------------------------------------
@pytest.mark.slow
def test_pipeline_with_two_pretraining_seeds(tmp_path, toy_world):
    from test_pipeline import _tiny_config

    from mixup_transfer.pipeline.run import run_pipeline

    data = tmp_path / "data"
    shutil.copytree(toy_world, data)
    path = _tiny_config(tmp_path, data, "seeds")
    cfg = yaml.safe_load(path.read_text())
    cfg.update(methods=["erm"], seeds={"pretrain": [0, 1], "transfer": [0]},
               baselines={"random_init": False})
    cfg["detection"] = cfg["detection"][:1]  # ssd_voc
    path.write_text(yaml.safe_dump(cfg))
    report = run_pipeline(str(path))
    run_dir = tmp_path / "runs" / "seeds"
    stages = sorted(p.parent.relative_to(run_dir).as_posix() for p in run_dir.rglob("stage.json"))
    assert stages == sorted(f"erm/seed{k}/{s}" for k in (0, 1)
                            for s in ("pretrain", "transfer_seed0/ssd_voc", "transfer_seed0/wsol",
                                      "robustness"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["seeds"] == {"pretrain": [0, 1], "transfer": [0]}
    got = summary["tables"]["Classification (ImageNet layout, validation)"]["rows"]["erm"][
        "top-1 acc (%)"
    ]
    top1 = [
        json.loads((run_dir / f"erm/seed{k}/pretrain/stage.json").read_text())["metrics"]["top1"]
        for k in (0, 1)
    ]
    assert got["values"] == top1 and got["n"] == 2
    assert got["mean"] == pytest.approx(statistics.mean(top1)) and got["std"] == pytest.approx(
        statistics.stdev(top1)
    )
    text = report.read_text()
    assert (
        f"[{got['mean']:.2f} ± {got['std']:.2f}](erm/)" in text
        and "n=2" in text
        and RULE_SPREAD in text
    )
    wsol = summary["tables"][next(t for t in summary["tables"]
                                  if t.startswith("Weakly"))]["rows"]["erm"]
    assert wsol["MaxBoxAccV2 (%)"]["n"] == 2
    stamps = {s: (run_dir / s / "stage.json").stat().st_mtime_ns for s in stages}
    run_pipeline(str(path))  # the same seeds again: every stage reused
    assert {s: (run_dir / s / "stage.json").stat().st_mtime_ns for s in stages} == stamps
