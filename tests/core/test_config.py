"""mixup_transfer.core.config: YAML 1.2 numbers, _BASE_ inheritance, and every declared key checked
for type and range."""

from pathlib import Path

import pytest

from mixup_transfer.core.config import ConfigError, check_ranges, load_config, parse_yaml, validate


def test_numbers_are_read_as_yaml_1_2_reads_them():
    assert parse_yaml("lr: 1e-3\nwd: 5E-4\nx: .5\ny: 3\nz: '1e-3'\nw: 1.0e-4") == {
        "lr": 0.001, "wd": 0.0005, "x": 0.5, "y": 3, "z": "1e-3", "w": 0.0001}


def test_overrides_and_base_files(tmp_path):
    (tmp_path / "base.yaml").write_text("optim: {lr: 0.1, epochs: 3}\nname: base\n")
    (tmp_path / "cfg.yaml").write_text("_BASE_: base.yaml\nname: child\n")
    cfg = load_config(tmp_path / "cfg.yaml", ["optim.lr=1e-3"])
    assert cfg == {"optim": {"lr": 0.001, "epochs": 3}, "name": "child"}


@pytest.mark.parametrize("value, match", [
    ("fast", "expected a number"), (True, "expected a number"), ([1], "expected a number")])
def test_a_wrong_type_names_the_key(value, match):
    with pytest.raises(ConfigError, match=rf"optim\.lr: {match}"):
        validate({"optim": {"lr": value}}, {"optim": {"lr": 0.1, "epochs": 3}})


def test_types_by_default():
    d = {"n": 3, "flag": False, "xs": [1], "sub": {"a": 1}, "free": None, "s": "x"}
    assert validate({"n": 4, "flag": True, "xs": [], "free": [1, 2], "s": 0.5},
                    d)["free"] == [1, 2]
    for bad, key in (({"n": 2.5}, "n"), ({"flag": 1}, "flag"), ({"xs": 3}, "xs"),
                     ({"sub": 3}, "sub")):
        with pytest.raises(ConfigError, match=f"config key {key}"):
            validate(bad, d)


def test_ranges_and_choices_name_the_allowed_values():
    rules = {"optim.epochs": (">", 0), "optim.momentum": (">=", 0, "<", 1),
             "optim.name": ("in", ("sgd", "adam"))}
    check_ranges({"optim": {"epochs": 1, "momentum": 0.9, "name": "sgd"}}, rules)
    with pytest.raises(ConfigError, match=r"optim\.epochs: 0 is out of range \(must be > 0\)"):
        check_ranges({"optim": {"epochs": 0}}, rules)
    with pytest.raises(ConfigError, match=r"optim\.momentum: 1\.0 is out of range \(must be >= 0 "
                       r"and < 1\)"):
        check_ranges({"optim": {"momentum": 1.0}}, rules)
    with pytest.raises(ConfigError, match=r"optim\.name: 'lamb' is not one of \['sgd', 'adam'\]"):
        check_ranges({"optim": {"name": "lamb"}}, rules)


def test_every_stage_checks_its_ranges():
    from pretrain.task import resolve_config as pretrain_cfg
    from transfer.detection.config import resolve_config as det_cfg
    from wsol.finetune import resolve_config as wsol_cfg

    with pytest.raises(ConfigError, match="optim.batch_size: -8"):
        pretrain_cfg({"data": {"root": "x"}, "method": {"name": "erm"},
                      "optim": {"batch_size": -8}})
    with pytest.raises(ConfigError, match="optim.lr: 0"):
        det_cfg({"optim": {"lr": 0}})
    with pytest.raises(ConfigError, match="seeds"):
        det_cfg({"seeds": [0, 0]})
    with pytest.raises(ConfigError, match="eval.loc_op"):
        wsol_cfg({"eval": {"loc_op": "=="}})


# -- the shared vocabulary (mixup_transfer/core/vocabulary.py)
# --------------------------------------------------------

def _stage_defaults():
    from pretrain.task import DEFAULTS as PRETRAIN
    from transfer.detection.config import DEFAULTS as DETECTION
    from transfer.robustness.stage import DEFAULTS as ROBUSTNESS
    from wsol.finetune import DEFAULTS as WSOL

    return {"pretrain": PRETRAIN, "detection": DETECTION, "wsol": WSOL, "robustness": ROBUSTNESS}


@pytest.mark.parametrize("stage,text,message", [
    ("detection", "solver: {lr: 0.01, batch_size: 4}",
     "solver.lr was renamed: use optim.lr; solver.batch_size was renamed: use "
     "optim.batch_per_process"),
    ("detection", "data: {workers: 2, max_train_images: 8}",
     "data.workers was renamed: use data.num_workers; data.max_train_images was renamed: use "
     "data.max_train"),
    ("detection", "runtime: {log_period: 5}",
     "runtime.log_period was renamed: use runtime.log_every_steps"),
    ("wsol", "epochs: 3\nbatch_size: 8\nlog_every: 2",
     "epochs was renamed: use optim.epochs; batch_size was renamed: use "
     "optim.batch_per_process; log_every was renamed: use runtime.log_every_steps"),
    ("wsol", "mixing: {name: multimix, knobs: {n: 10}}", "mixing was renamed: use method"),
    ("wsol", "data: {limit_train: 8}", "data.limit_train was renamed: use data.max_train"),
    # one old spelling, two stages: each stage's own new key
    ("robustness", "batch_size: 8\nlimit: 4\nworkers: 0",
     "batch_size was renamed: use eval.batch_size; limit was renamed: use data.max_val; workers "
     "was renamed: use data.num_workers"),
])
def test_a_renamed_key_is_refused_with_the_file_and_the_key_to_use(tmp_path, stage, text, message):
    path = tmp_path / f"{stage}.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, defaults=_stage_defaults()[stage])
    assert str(e.value) == f"{path}: {message}"


def test_a_renamed_key_in_a_base_file_or_an_override_is_refused(tmp_path):
    from transfer.detection.config import DEFAULTS

    (tmp_path / "base.yaml").write_text("solver: {epochs: 2}\n")
    (tmp_path / "child.yaml").write_text("_BASE_: base.yaml\n")
    with pytest.raises(ConfigError, match=r"child.yaml: solver.epochs was renamed: use "
                       r"optim.epochs$"):
        load_config(tmp_path / "child.yaml", defaults=DEFAULTS)
    (tmp_path / "ok.yaml").write_text("optim: {epochs: 2}\n")
    with pytest.raises(ConfigError, match=r"^solver.lr was renamed: use optim.lr$"):
        load_config(tmp_path / "ok.yaml", ["solver.lr=0.1"], defaults=DEFAULTS)
    assert load_config(tmp_path / "ok.yaml", ["optim.lr=0.1"],
                       defaults=DEFAULTS)["optim"]["lr"] == 0.1


def test_a_key_a_stage_declares_is_its_own_not_a_renamed_one():
    """`arch` is robustness's own key (WSOL's moved to model.arch); `batch_size` is pretraining's
    optim.batch_size."""
    d = _stage_defaults()
    assert validate({"arch": "resnet18"}, d["robustness"])["arch"] == "resnet18"
    assert validate({"optim": {"batch_size": 64}}, d["pretrain"])["optim"]["batch_size"] == 64
    with pytest.raises(ConfigError, match="^arch was renamed: use model.arch$"):
        validate({"arch": "resnet18"}, d["wsol"])


def test_every_stage_spells_a_shared_key_the_vocabulary_way():
    """No stage declares a synonym of a shared key in a fragment, and each vocabulary key a stage
    declares has the vocabulary's type (its default may differ)."""
    from mixup_transfer.core.vocabulary import FRAGMENTS

    synonyms = {"workers", "limit", "limit_train", "limit_test", "max_train_images",
                "max_test_images", "log_period", "log_every", "period", "every"}
    for stage, defaults in _stage_defaults().items():
        for frag in FRAGMENTS:
            keys = set(defaults.get(frag) or {}) if isinstance(defaults.get(frag), dict) else set()
            assert not keys & synonyms, (stage, frag, keys & synonyms)
            for key in keys & set(FRAGMENTS[frag]):
                shared, own = FRAGMENTS[frag][key].default, defaults[frag][key]
                assert shared is None or own is None or type(shared) is type(own), (stage, frag,
                                                                                    key)


STAGE_MODULES = {"pretrain": "pretrain/task.py", "detection": "transfer/detection/config.py",
                 "wsol": "wsol/finetune.py", "robustness": "transfer/robustness/stage.py"}


def _composed_keys(path: Path) -> dict[str, set]:
    """{fragment table name: keys} of every `fragment(TABLE, "key", ...)` call in a module."""
    import ast

    out: dict[str, set] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "fragment":
            table, *keys = node.args
            out.setdefault(table.id, set()).update(k.value for k in keys)
    return out


@pytest.mark.parametrize("stage", sorted(STAGE_MODULES))
def test_every_stage_composes_its_shared_keys_from_the_vocabulary(stage):
    """Each vocabulary key a stage's DEFAULTS holds comes from a `fragment(...)` call of its module
    (declared once in mixup_transfer/core/vocabulary.py), never written out again."""
    from mixup_transfer.core.vocabulary import FRAGMENTS

    root = Path(__file__).resolve().parents[2]
    composed = _composed_keys(root / STAGE_MODULES[stage])
    defaults = _stage_defaults()[stage]
    for frag, table in FRAGMENTS.items():
        section = defaults.get(frag)
        if not isinstance(section, dict):
            continue
        shared = set(section) & set(table)
        if frag == "method" and not section:
            continue
        missing = shared - composed.get(frag.upper(), set())
        assert not missing, f"{STAGE_MODULES[stage]}: {frag}.{sorted(missing)} written out"
