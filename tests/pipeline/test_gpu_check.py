"""`make gpu-check` (tools/gpu_check.py over mixup_transfer/pipeline/gpu_check.py) on a machine
without CUDA: it says so and exits non-zero, and its checks and report run on the CPU (the same
code; a GPU node runs them on CUDA)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from mixup_transfer.pipeline import gpu_check

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("gpu_check_cli", ROOT / "tools" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_without_cuda_it_says_so_and_exits_non_zero(cli, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["--out", str(tmp_path / "out")]) == 2
    assert "gpu-check: no CUDA device is visible here" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing was checked or written


def test_checks_run_and_report_on_the_cpu(toy_world, tmp_path, monkeypatch):
    """Two method checks and the decoder check on the CPU (fp32: CPU runs ignore bf16 / fp16), one
    check made to
    fail: every row is reported, the failure with its error, and the table and JSON agree."""
    monkeypatch.setattr(gpu_check, "check_nccl",
                        lambda: (_ for _ in ()).throw(RuntimeError("torchrun exited 1")))
    report = gpu_check.run_checks(tmp_path, "cpu", only=("methods", "decode", "nccl"),
                                  methods=["erm", "cutmix"], precisions=("fp32",), toy=toy_world)
    rows = {r["check"]: r for r in report["rows"]}
    assert list(rows) == ["erm fp32", "cutmix fp32", "decode", "nccl"]
    assert [rows[k]["ok"] for k in rows] == [True, True, True, False]
    assert rows["decode"]["detail"].endswith("(1 CMYK) identical to the CPU decoder")
    assert rows["nccl"]["detail"] == "RuntimeError: torchrun exited 1"
    assert json.loads((tmp_path / "gpu_check.json").read_text())["rows"] == report["rows"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert md.startswith("# gpu-check: 3 of 4 passed")
    assert "| nccl | FAIL |" in md and "| erm fp32 | pass |" in md


def test_the_cli_exits_one_when_a_check_fails(cli, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    rows = [{"check": "decode", "ok": False, "seconds": 0.1, "detail": "x"}]
    monkeypatch.setattr(gpu_check, "run_checks", lambda out, device, only, toy: {
        "device": "d", "torch": "t", "rows": rows, "throughput": []})
    assert cli.main(["--out", str(tmp_path), "--only", "decode"]) == 1
    rows[0]["ok"] = True
    assert cli.main(["--out", str(tmp_path), "--only", "decode"]) == 0
    with pytest.raises(SystemExit):
        cli.main(["--only", "nonsense"])


def test_every_registered_method_is_checked():
    from pretrain.methods import METHODS

    assert {name for name, _ in gpu_check.METHOD_CASES} == set(METHODS)
