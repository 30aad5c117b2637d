"""mixup_transfer.core.config: YAML 1.2 numbers, _BASE_ inheritance, and every declared key checked for type and
range."""

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
    assert validate({"n": 4, "flag": True, "xs": [], "free": [1, 2], "s": 0.5}, d)["free"] == [1, 2]
    for bad, key in (({"n": 2.5}, "n"), ({"flag": 1}, "flag"), ({"xs": 3}, "xs"), ({"sub": 3}, "sub")):
        with pytest.raises(ConfigError, match=f"config key {key}"):
            validate(bad, d)


def test_ranges_and_choices_name_the_allowed_values():
    rules = {"optim.epochs": (">", 0), "optim.momentum": (">=", 0, "<", 1), "optim.name": ("in", ("sgd", "adam"))}
    check_ranges({"optim": {"epochs": 1, "momentum": 0.9, "name": "sgd"}}, rules)
    with pytest.raises(ConfigError, match=r"optim\.epochs: 0 is out of range \(must be > 0\)"):
        check_ranges({"optim": {"epochs": 0}}, rules)
    with pytest.raises(ConfigError, match=r"optim\.momentum: 1\.0 is out of range \(must be >= 0 and < 1\)"):
        check_ranges({"optim": {"momentum": 1.0}}, rules)
    with pytest.raises(ConfigError, match=r"optim\.name: 'lamb' is not one of \['sgd', 'adam'\]"):
        check_ranges({"optim": {"name": "lamb"}}, rules)


def test_every_stage_checks_its_ranges():
    from pretrain.task import resolve_config as pretrain_cfg
    from transfer.detection.config import resolve_config as det_cfg
    from wsol.finetune import resolve_config as wsol_cfg

    with pytest.raises(ConfigError, match="optim.batch_size: -8"):
        pretrain_cfg({"data": {"root": "x"}, "method": {"name": "erm"}, "optim": {"batch_size": -8}})
    with pytest.raises(ConfigError, match="optim.lr: 0"):
        det_cfg({"optim": {"lr": 0}})
    with pytest.raises(ConfigError, match="seeds"):
        det_cfg({"seeds": [0, 0]})
    with pytest.raises(ConfigError, match="eval.loc_op"):
        wsol_cfg({"eval": {"loc_op": "=="}})
