"""The pipeline's outcome with fake stages: a failed stage costs only what depends on it (the
report marks it, the command exits non-zero), the CI completeness check, and publishing a finished
run into the docs."""

import json
from pathlib import Path

import pytest
import yaml
from conftest import load_tool

from mixup_transfer.pipeline import stages
from mixup_transfer.pipeline.run import StagesFailed, run_pipeline

ROOT = Path(__file__).resolve().parents[2]
tool = load_tool("run_pipeline")


def _fake_stages(monkeypatch, calls: list[str]) -> None:
    def pretrain(config, overrides, run_dir):
        calls.append(f"{run_dir.parent.name}/pretrain")
        if "name=input_mixup" in overrides:
            raise RuntimeError("non-finite loss (nan) at step 7; stopping")
        (Path(run_dir) / "backbone.pth").write_bytes(b"")
        return {"top1": 61.5, "top5": 97.0, "num_classes": 10, "train_time_s": 1.0}

    def detection(config, overrides, weights, run_dir):
        calls.append(f"{run_dir.parent.name}/{run_dir.name}")
        return {"mAP": 12.5, "AP": 7.25, "AP50": 20.0, "train_img_per_s": 3.0,
                "test_img_per_s": 9.0}

    def wsol(config, overrides, weights, run_dir):
        calls.append(f"{run_dir.parent.name}/wsol")
        return {"top1_cls": 40.0, "maxboxacc": 30.0, "maxboxacc_v2": 33.0}

    monkeypatch.setattr(stages, "pretrain", pretrain)
    monkeypatch.setattr(stages, "detection", detection)
    monkeypatch.setattr(stages, "wsol", wsol)


def _config(tmp_path: Path) -> Path:
    cfg = yaml.safe_load((ROOT / "configs/pipeline/toy.yaml").read_text())
    (tmp_path / "data" / "imagenet").mkdir(parents=True)
    cfg.update(name="failing", out_root=str(tmp_path / "runs"),
               methods=["erm", "input_mixup", "multimix"], robustness=None,
               data={"root": str(tmp_path / "data"), "generate": None})
    for key in ("pretrain", "wsol"):
        cfg[key]["config"] = str(ROOT / cfg[key]["config"])
    for det in cfg["detection"]:
        det["config"] = str(ROOT / det["config"])
    path = tmp_path / "failing.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_failed_method_costs_only_its_own_stages(tmp_path, monkeypatch):
    calls: list[str] = []
    _fake_stages(monkeypatch, calls)
    with pytest.raises(StagesFailed) as err:
        run_pipeline(str(_config(tmp_path)))
    # input_mixup's pretraining failed: its downstream stages never ran, every other method's did
    assert calls == ["erm/pretrain", "erm/ssd_voc", "erm/frcnn_coco", "erm/wsol",
                     "input_mixup/pretrain", "multimix/pretrain", "multimix/ssd_voc",
                     "multimix/frcnn_coco", "multimix/wsol", "baselines/ssd_voc",
                     "baselines/frcnn_coco", "baselines/wsol"]
    assert err.value.failed == {
        "input_mixup/pretrain": "RuntimeError: non-finite loss (nan) at step 7; stopping",
        "input_mixup/ssd_voc": "not run: input_mixup/pretrain failed",
        "input_mixup/frcnn_coco": "not run: input_mixup/pretrain failed",
        "input_mixup/wsol": "not run: input_mixup/pretrain failed"}
    text = (tmp_path / "runs" / "failing" / "report.md").read_text()
    assert (
        "| input_mixup/pretrain | RuntimeError: non-finite loss (nan) at step 7; stopping |"
        in text
    )
    rows = {}  # each row label's first line: the classification table
    for line in text.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split("|")[1].strip(), line)
    assert "61.50" in rows["erm"] and "*failed*" not in rows["erm"]
    assert "61.50" in rows["multimix"]
    assert rows["input_mixup"].count("*failed*") == 3  # top-1, top-5, train time
    detection = [line for line in text.splitlines() if line.startswith("| input_mixup |")][1]
    assert detection.count("*failed*") == 7  # SSD mAP, Faster R-CNN AP, AP50 and the four speeds
    # kept for inspection
    assert (tmp_path / "runs" / "failing" / "input_mixup" / "pretrain").is_dir()
    assert not (tmp_path / "runs" / "failing" / "input_mixup" / "pretrain" / "stage.json").exists()


def test_run_pipeline_tool_exits_1_after_writing_the_report(tmp_path, monkeypatch, capsys):
    _fake_stages(monkeypatch, [])
    assert tool.main(["--config", str(_config(tmp_path))]) == 1
    out, err = capsys.readouterr()
    assert "## Failed stages" in out
    assert (
        "4 stage(s) failed or did not run" in err and "input_mixup/pretrain: RuntimeError" in err
    )


def test_check_report_lists_empty_entries_and_failed_stages(tmp_path, monkeypatch, capsys):
    check = load_tool("check_report")
    _fake_stages(monkeypatch, [])
    with pytest.raises(StagesFailed):
        run_pipeline(str(_config(tmp_path)))
    summary = tmp_path / "runs" / "failing" / "summary.json"
    capsys.readouterr()
    assert check.main([str(summary)]) == 1
    err = capsys.readouterr().err
    assert "failed stage input_mixup/pretrain: RuntimeError" in err
    assert (
        "empty entry Classification (ImageNet layout, validation): input_mixup: top-1 acc (%)"
        in err
    )
    assert "4 failed stages" in err
    complete = {"failed": {}, "tables": {"T": {"rows": {"erm": {"baseline": False, "a": {"n": 1}},
                                                        "chance": {"baseline": True,
                                                                   "a": {"n": 0}}}}}}
    (tmp_path / "ok.json").write_text(json.dumps(complete))
    assert check.main([str(tmp_path / "ok.json")]) == 0
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert check.main([str(tmp_path / "bad.json")]) == 2


def test_publish_writes_numbers_provenance_and_figures(tmp_path, monkeypatch, capsys):
    _fake_stages(monkeypatch, [])
    cfg = _config(tmp_path)
    text = cfg.read_text().replace("- input_mixup\n", "")
    cfg.write_text(text)
    out = tmp_path / "docs" / "results.md"
    assert tool.main(["--config", str(cfg), "--publish", str(out)]) == 0
    first = out.read_text()
    assert "| commit | `" in first and "| hardware | " in first and "cores" in first
    assert "2 min" not in first and "stages run, 0 reused" in first
    assert "| erm | **61.50** |" in first  # the value without its run-folder link
    assert "](erm/" not in first and "](multimix/" not in first
    figures = sorted(p.name for p in (tmp_path / "docs" / "results_figures").iterdir())
    assert "summary.png" in figures and all(f"results_figures/{f}" in first for f in figures)
    # publishing again reuses every stage and keeps the provenance of the run that computed the
    # numbers
    assert tool.main(["--config", str(cfg), "--publish", str(out)]) == 0
    assert out.read_text() == first


def test_a_failed_publish_keeps_the_published_page_and_figures(tmp_path, monkeypatch):
    from mixup_transfer.pipeline import publish as pub

    _fake_stages(monkeypatch, [])
    cfg = _config(tmp_path)
    cfg.write_text(cfg.read_text().replace("- input_mixup\n", ""))
    out = tmp_path / "docs" / "results.md"
    assert tool.main(["--config", str(cfg), "--publish", str(out)]) == 0
    fig_dir = tmp_path / "docs" / "results_figures"
    before = {p.name: p.read_bytes() for p in fig_dir.iterdir()}
    page = out.read_text()

    def full_disk(src, dst):
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr(pub.shutil, "copyfile", full_disk)
    with pytest.raises(OSError, match="No space left"):
        pub.publish(tmp_path / "runs" / "failing", out)
    assert {p.name: p.read_bytes()
            for p in fig_dir.iterdir()} == before and out.read_text() == page
    assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == ["results.md",
                                                                     "results_figures"]
