"""The main job end to end on the tiny toy world: two methods, every stage, an interruption and a
resume."""

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from mixup_transfer.pipeline.run import StopPipeline, run_pipeline

ROOT = Path(__file__).resolve().parents[2]


def _tiny_config(tmp: Path, data: Path, name: str) -> Path:
    cfg = yaml.safe_load((ROOT / "configs/pipeline/toy.yaml").read_text())
    cfg.update(name=name, out_root=str(tmp / "runs"), methods=["erm", "multimix"])
    cfg["data"] = {"root": str(data), "generate": None}
    cfg["pretrain"]["config"] = str(ROOT / "configs/pretrain/toy_{method}.yaml")
    cfg["pretrain"]["overrides"] += ["optim.epochs=1", "optim.batch_size=32", "data.crop_size=32",
                                     "data.val_resize=36", "data.num_workers=0",
                                     "runtime.flops=false", "runtime.figures=false"]
    tiny_det = ["optim.epochs=1", "optim.batch_per_process=8", "optim.warmup_iters=2",
                "data.max_train=16", "data.max_val=8", "model.size=64", "data.num_workers=0"]
    for det in cfg["detection"]:
        det["config"] = str(ROOT / det["config"])
        det["overrides"] += tiny_det
    cfg["wsol"]["config"] = str(ROOT / cfg["wsol"]["config"])
    cfg["wsol"]["overrides"] += ["optim.epochs=1", "input.resize=40", "input.crop=32",
                                 "input.test_size=32", "data.num_workers=0",
                                 "eval.num_figure_images=2", "eval.cam_curve_interval=0.01"]
    cfg["robustness"]["options"] = {"image_size": 32, "resize": 36, "eval": {"batch_size": 20},
                                    "data": {"max_val": 10}, "pgd_iters": 2}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _numbers(report: Path) -> list[str]:
    """The report's table rows without links, timings and speeds: what must not change across a
    resume."""
    out, keep = [], []
    for line in report.read_text().split("## Stage timings")[0].splitlines():
        if not line.startswith("| ") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == "method":  # a header: drop the columns that measure time
            keep = [i for i, c in enumerate(cells) if "time" not in c and "images/s" not in c]
        out.append(" | ".join(re.sub(r"\]\([^)]*\)", "]", cells[i]) for i in keep
                              if i < len(cells)))
    return out


@pytest.mark.slow
def test_pipeline_interrupt_resume_and_report(tmp_path, toy_world):
    data = tmp_path / "data"
    shutil.copytree(toy_world, data)
    cfg = _tiny_config(tmp_path, data, "resumed")
    with pytest.raises(StopPipeline):  # killed after three stages
        run_pipeline(str(cfg), stop_after=3)
    run_dir = tmp_path / "runs" / "resumed"
    done = sorted(p.parent.relative_to(run_dir).as_posix() for p in run_dir.rglob("stage.json"))
    assert done == ["erm/frcnn_coco", "erm/pretrain", "erm/ssd_voc"]
    stamps = {d: (run_dir / d / "stage.json").stat().st_mtime_ns for d in done}
    report = run_pipeline(str(cfg))
    for d, t in stamps.items():  # finished stages were skipped, not redone
        assert (run_dir / d / "stage.json").stat().st_mtime_ns == t
    stages = sorted(p.parent.relative_to(run_dir).as_posix() for p in run_dir.rglob("stage.json"))
    assert stages == sorted(["erm/pretrain", "erm/ssd_voc", "erm/frcnn_coco", "erm/wsol",
                             "erm/robustness", "multimix/pretrain", "multimix/ssd_voc",
                             "multimix/frcnn_coco", "multimix/wsol", "multimix/robustness",
                             "baselines/ssd_voc", "baselines/frcnn_coco", "baselines/wsol"])
    text = report.read_text()
    for title in ("Classification", "Detection transfer", "Weakly-supervised localization",
                  "Background corruption", "Calibration and adversarial", "Out-of-distribution"):
        assert title in text
    method_rows = [r for r in _numbers(report) if r.startswith(("erm ", "multimix "))]
    assert len(method_rows) == 2 * 6 and "—" not in "\n".join(method_rows), (
        "every method cell is filled"
    )
    assert (run_dir / "report.html").exists() and (run_dir / "figures" / "summary.png").exists()
    backbone = json.loads((run_dir / "erm" / "pretrain" / "stage.json").read_text())["metrics"]
    assert 0 <= backbone["top1"] <= 100

    # the same pipeline without interruption gives the same numbers
    fresh = run_pipeline(str(_tiny_config(tmp_path, data, "fresh")))
    assert _numbers(fresh) == _numbers(report)

    # --force redoes one stage and only that one
    wsol_stamp = (run_dir / "erm" / "wsol" / "stage.json").stat().st_mtime_ns
    run_pipeline(str(cfg), force=["robustness"])
    assert (run_dir / "erm" / "wsol" / "stage.json").stat().st_mtime_ns == wsol_stamp
    assert (run_dir / "erm" / "robustness"
            / "stage.json").stat().st_mtime_ns > stamps["erm/pretrain"]


def test_the_method_is_an_override_checked_against_its_recipe(tmp_path, toy_world):
    from mixup_transfer.core.config import ConfigError
    from mixup_transfer.pipeline.run import Pipeline

    path = _tiny_config(tmp_path, toy_world, "methods")
    cfg = yaml.safe_load(path.read_text())
    pipe = Pipeline(cfg)
    stage = next(s for s in pipe.plan() if s.label == "multimix/pretrain")
    assert stage.spec["config"]["method"]["name"] == "multimix"
    # the pipeline's method
    assert pipe._pretrain_spec("multimix")["overrides"][-1] == "method.name=multimix"
    # a recipe that names another method (here: every method reads the ERM recipe) stops before
    # anything runs
    cfg["pretrain"]["config"] = str(ROOT / "configs/pretrain/toy_erm.yaml")
    with pytest.raises(ConfigError, match=r"toy_erm.yaml: method.name is 'erm' .* as method "
                       r"'multimix'"):
        Pipeline(cfg)
    # so does a per-method override that renames it
    cfg["pretrain"]["config"] = str(ROOT / "configs/pretrain/toy_{method}.yaml")
    cfg["pretrain"]["per_method"] = {"erm": ["method.name=input_mixup"]}
    with pytest.raises(ConfigError, match="method.name is .input_mixup. .* as method .erm."):
        Pipeline(cfg)
    assert not (tmp_path / "runs" / "methods").exists()
