"""The stage as a declared object (mixup_transfer/core/stage.py): every stage is declared once, by
its package, with one name used for its package, configs/<name>/, tools/run_<name>.py, the launcher
and its run folder."""

from pathlib import Path

import pytest

from mixup_transfer.core.config import ConfigError
from mixup_transfer.pipeline import launch
from mixup_transfer.pipeline.stages import NAMES, stage

ROOT = Path(__file__).resolve().parents[2]


def test_one_name_everywhere():
    assert NAMES == ("pretrain", "detection", "wsol", "robustness")
    for name in NAMES:
        declared = stage(name)
        assert declared.name == name
        assert (ROOT / "configs" / name).is_dir(), name
        assert (ROOT / "tools" / f"run_{name}.py").is_file(), name
        assert name in launch.STAGES
    with pytest.raises(ConfigError, match="unknown stage 'evaluate'; valid stages"):
        stage("evaluate")


def test_declarations_resolve_to_their_schemas_and_entry_points():
    from pretrain.task import DEFAULTS as PRETRAIN
    from pretrain.task import run as pretrain_run
    from transfer.robustness.stage import DEFAULTS as ROBUSTNESS

    assert (
        stage("pretrain").defaults() is PRETRAIN and stage("robustness").defaults() is ROBUSTNESS
    )
    from wsol.finetune import DEFAULTS as WSOL

    assert stage("wsol").defaults() is WSOL
    assert stage("pretrain").run.__self__ is stage("pretrain")
    from mixup_transfer.core.stage import _resolve

    assert _resolve(stage("pretrain").entry) is pretrain_run
    for name in NAMES:
        assert callable(_resolve(stage(name).entry)), name


def test_the_launcher_reads_the_declarations(tmp_path):
    assert [launch.default_gpus_per_node(n) for n in (*NAMES, "pipeline")] == [8, 8, 1, 1, 1]
    # its defaults are a valid config
    cfg = stage("robustness").load_config(None, ["out=elsewhere"])
    assert launch.default_run_dir("robustness", None, cfg, tmp_path) == tmp_path / "elsewhere"
    cfg = stage("pretrain").load_config(str(ROOT / "configs/pretrain/toy_erm.yaml"))
    assert launch.default_run_dir("pretrain", None, cfg,
                                  tmp_path) == tmp_path / "runs" / cfg["name"]
    with pytest.raises(ConfigError, match="stage pretrain needs --config"):
        stage("pretrain").load_config(None)
    with pytest.raises(ConfigError, match="stage robustness needs --checkpoint and --imagenet"):
        launch._check_inputs("robustness", {})
    with pytest.raises(ConfigError, match="stage robustness needs --imagenet$"):
        launch._check_inputs("robustness", {"checkpoint": "c.pth"})
    with pytest.raises(ConfigError, match="--weights is for detection and wsol, not pretrain"):
        launch._check_inputs("pretrain", {"weights": "w.pth"})
    launch._check_inputs("wsol", {"weights": None})  # random init


def test_run_passes_only_the_options_a_stage_declares(monkeypatch):
    from mixup_transfer.core import stage as core_stage

    seen = {}
    def resolve(ref):
        return lambda cfg, inputs, run_dir, **kw: seen.update(kw) or {}
    monkeypatch.setattr(core_stage, "_resolve", resolve)
    stage("robustness").run({}, None, "r", resume=True, force=False)
    assert seen == {}  # robustness only evaluates: neither option
    for name in ("pretrain", "detection", "wsol"):
        seen.clear()
        stage(name).run({}, None, "r", resume=True, force=False)
        assert seen == {"resume": True, "force": False}, name
    with pytest.raises(TypeError, match="unknown options"):
        stage("pretrain").run({}, None, "r", restart=True)


def _flags(p) -> dict:
    return {opt: a.help for a in p._actions for opt in a.option_strings}


def test_every_tool_and_the_launcher_take_the_declared_arguments():
    """tools/run_<stage>.py and tools/submit.py build their flags from the declarations: the same
    input flags with the same help, --force where the stage trains, --run-dir where no config key
    names the run folder."""
    import importlib.util

    from mixup_transfer.core.cli import stage_parser
    from mixup_transfer.core.stage import INPUT_FLAGS

    for name in NAMES:
        declared = stage(name)
        p = stage_parser(declared, None)
        if declared.subcommand:
            p = p._subparsers._group_actions[0].choices[declared.subcommand]
        flags = _flags(p)
        for key in declared.inputs + declared.optional_inputs:
            assert flags[f"--{key}"].startswith(INPUT_FLAGS[key][0]), (name, key)
        assert "--config" in flags and ("--force" in flags) == ("force" in declared.options), name
        assert ("--run-dir" in flags) == declared.run_dir_flag, name
    spec = importlib.util.spec_from_file_location("submit_tool", ROOT / "tools" / "submit.py")
    submit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(submit)
    flags = _flags(submit._parser())
    for key, (text, _) in INPUT_FLAGS.items():
        assert flags[f"--{key}"].startswith(text), key
    assert {"--config", "--run-dir", "--force", "--allow-pickle"} <= set(flags)


@pytest.mark.parametrize("tool,args", [
    ("run_pretrain", ["--config", ROOT / "configs/pretrain/toy_erm.yaml", "--resume"]),
    ("run_wsol", ["finetune", "--config", ROOT / "configs/wsol/toy_multimix.yaml", "--no-resume"]),
    ("submit", ["pretrain", "--config", ROOT / "configs/pretrain/toy_erm.yaml", "--resume"]),
])
def test_one_resume_convention_the_retired_flags_are_refused(tool, args, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{tool}_resume", ROOT / "tools" / f"{tool}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit) as e:
        mod.main([str(a) for a in args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--resume and --no-resume are not options" in err and "--force starts over" in err, err
