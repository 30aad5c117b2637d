"""The GPU section of tools/bench.py (`pretrain.bench.run_gpu_bench`), run on the CPU: same code
path, tiny sizes."""

import importlib.util
from pathlib import Path

import pytest
import torch

from pretrain.bench import FULL, VIT_ONLY, run_gpu_bench
from pretrain.methods import have_gco

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_cli", ROOT / "tools" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_section_on_cpu_gives_a_row_per_method(channels_last):
    out = run_gpu_bench(device="cpu", arch="resnet18", size=64, batch=2, warmup=1, steps=2,
                        num_classes=10, n=4, channels_last=channels_last)
    expected = [label for label, name, knobs in FULL
                if (knobs.get("solver") != "gco" or have_gco()) and name not in VIT_ONLY]
    assert [r["method"] for r in out["rows"]] == expected
    gco_rows = [f"{label} (gco-wrapper not installed)" for label, _,
                knobs in FULL if knobs.get("solver") == "gco"]
    assert out["skipped"] == ([] if have_gco() else gco_rows) + ["transmix (a ViT arch only)"]
    rows = {r["method"]: r for r in out["rows"]}
    assert rows["erm"]["step_time_ratio"] == 1.0
    for r in out["rows"]:  # the three numbers of a row describe one measurement
        # 0.1 img/s rounding
        assert r["img_per_s"] == pytest.approx(2 / r["step_s"], rel=1e-3, abs=0.051)
        assert r["step_time_ratio"] == pytest.approx(r["step_s"] / rows["erm"]["step_s"], rel=1e-3,
                                                     abs=2e-3)
    setup = out["setup"]
    # CPU runs stay in fp32
    assert setup["precision"] == "fp32" and setup["channels_last"] is channels_last
    assert (setup["arch"], setup["size"], setup["batch"], setup["steps"]) == ("resnet18", 64, 2, 2)


def test_gpu_section_subset_keeps_erm():
    out = run_gpu_bench(device="cpu", arch="resnet18", size=32, batch=2, warmup=0, steps=1,
                        num_classes=10, n=4, methods=["cutmix"])
    assert [r["method"] for r in out["rows"]] == ["erm", "cutmix"]
    assert out["rows"][0]["step_time_ratio"] == 1.0


def test_bench_gpu_subcommand_is_skipped_without_cuda(bench, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.bench_gpu() == {"skipped": "no CUDA device"}
    assert "gpu: skipped (no CUDA device)" in capsys.readouterr().err
    assert "Skipped: no CUDA device." in bench.to_markdown({"machine": "m",
                                                            "gpu": {"skipped": "no CUDA device"}})


def test_bench_gpu_section_with_loader_ceiling_and_markdown(bench, toy_world):
    out = bench.bench_gpu(device="cpu", loader_root=toy_world / "imagenet", loader_workers=0,
                          arch="resnet18", size=32, batch=2, warmup=0, steps=1, num_classes=10,
                          n=4, methods=["cutmix"])
    ceiling = out["data_loader"]["img_per_s"]
    assert out["data_loader"]["workers"] == 0 and ceiling > 0
    assert [(r["method"], r["loader_bound"]) for r in out["rows"]] == [
        (r["method"], r["img_per_s"] > ceiling) for r in out["rows"]]
    md = bench.to_markdown({"machine": "m", "gpu": out})
    assert ("## GPU training throughput (cpu (CPU), resnet18, 32 px, batch 2, fp32, "
            "channels_last False)" in md)
    assert f"Data-loader ceiling: {ceiling} img/s with 0 workers" in md
    erm = out["rows"][0]
    assert f"| erm | {erm['img_per_s']} | 1.000 | {'yes' if erm['loader_bound'] else 'no'} |" in md


def test_a_vit_arch_times_transmix_and_skips_the_feature_map_methods():
    out = run_gpu_bench(device="cpu", arch="vit_tiny_toy", size=32, batch=2, warmup=0, steps=1,
                        num_classes=10, n=4,
                        methods=["multimix", "dense_multimix", "transmix", "alignmix"])
    assert [r["method"] for r in out["rows"]] == ["erm", "multimix", "dense_multimix", "transmix"]
    assert out["skipped"] == ["alignmix (a ResNet arch only)"]
