"""The small-image toy pipeline (configs/pipeline/toy_cifar.yaml): its stage plan, the pipeline
keys it needs (pretrain.per_method, robustness.root, data.generate track / ood), the narrow
PreAct-ResNet-18 and the report's CIFAR tables. The whole run (about 20 minutes) is `make
demo-cifar`, not a test."""

from pathlib import Path

import pytest
import torch
import yaml

from mixup_transfer.core.checkpoint import (
    build_resnet,
    feature_dim,
    infer_arch,
    resnet_from_checkpoint,
    save_backbone,
)
from mixup_transfer.core.config import ConfigError
from mixup_transfer.pipeline import tables
from mixup_transfer.pipeline.report import write_report
from mixup_transfer.pipeline.run import Pipeline

ROOT = Path(__file__).resolve().parents[2]
METHODS = ["erm", "input_mixup", "manifold_mixup", "cutmix", "puzzlemix", "alignmix", "multimix",
           "dense_multimix", "multi_interp", "saliencymix"]


def _cfg(**extra) -> dict:
    cfg = yaml.safe_load((ROOT / "configs/pipeline/toy_cifar.yaml").read_text())
    cfg["pretrain"]["config"] = str(ROOT / cfg["pretrain"]["config"])
    cfg.update(extra)
    return cfg


def test_plan_is_ten_methods_three_seeds_pretrain_and_robustness_only():
    plan = Pipeline(_cfg()).plan()
    want = [f"{m}/seed{k}/{s}" for m in METHODS for k in (0, 1, 2)
            for s in ("pretrain", "robustness")]
    assert [s.label for s in plan] == want and len(plan) == 60
    assert sum(s.name == "pretrain" for s in plan) == 30 and sum(s.name == "robustness"
                                                                 for s in plan) == 30
    assert len({s.key for s in plan}) == 60
    st = {s.label: s for s in plan}
    cfg = st["multi_interp/seed2/pretrain"].spec["config"]
    # per_method override
    assert cfg["seed"] == 2 and cfg["method"]["base"] == "input" and cfg["method"]["k"] == 5
    erm = st["erm/seed1/pretrain"].spec["config"]
    assert erm["model"]["arch"] == "preactresnet18_w16" and erm["optim"]["epochs"] == 5
    assert erm["data"]["root"] == "data/toy_cifar/cifar-100-python"
    assert "base" not in st["puzzlemix/seed0/pretrain"].spec["config"]["method"]
    rob = st["cutmix/seed1/robustness"].spec
    assert rob["spec"]["root"] == "data/toy_cifar/cifar-100-python"
    assert rob["spec"]["ood"][0] == "LSUN=data/toy_cifar/ood/LSUN"
    assert rob["backbone"] == st["cutmix/seed1/pretrain"].key


def test_per_method_overrides_apply_to_their_method_only():
    cfg = _cfg(methods=["erm", "cutmix"])
    cfg["pretrain"]["per_method"] = {"cutmix": ["method.alpha=0.5"]}
    st = {s.label: s for s in Pipeline(cfg).plan()}
    assert st["cutmix/seed0/pretrain"].spec["config"]["method"]["alpha"] == 0.5
    assert "alpha" not in st["erm/seed0/pretrain"].spec["config"]["method"]


def test_unknown_keys_are_errors(tmp_path):
    cfg = _cfg()
    cfg["pretrain"]["per_method"] = {"not_a_method": ["optim.lr=1"]}
    with pytest.raises(ConfigError, match="per_method.*not_a_method"):
        Pipeline(cfg)
    cfg = _cfg()
    cfg["robustness"]["roots"] = "x"
    with pytest.raises(ConfigError, match="robustness.*roots"):
        Pipeline(cfg)
    cfg = _cfg(data={"root": str(tmp_path / "d"),
                     "generate": {"preset": "tiny", "tracks": "small"}})
    with pytest.raises(ConfigError, match="data.generate.*tracks"):
        Pipeline(cfg)._ensure_data()


def _params(w: int, c: int) -> int:
    """PreAct-ResNet-18 of base width w counted by hand: stem, four stages of two blocks (BN, 3x3
    convs, a 1x1 projection where the shape changes), fc."""
    total = 27 * w + 2 * (4 * w + 18 * w * w)
    for co in (2 * w, 4 * w, 8 * w):
        ci = co // 2
        total += 2 * ci + 9 * ci * co + 2 * co + 9 * co * co + ci * co + 4 * co + 18 * co * co
    return total + 8 * w * c + c


def test_narrow_preactresnet18(tmp_path):
    assert _params(64, 10) == 11_171_146  # the formula reproduces the paper network's count
    net = build_resnet("preactresnet18_w16", 100)
    assert sum(p.numel() for p in net.parameters()) == _params(16, 100) == 712_372
    assert feature_dim("preactresnet18_w16") == 128 and net.fc.in_features == 128
    assert infer_arch(net.state_dict()) == "preactresnet18_w16"
    assert infer_arch(build_resnet("preactresnet18", 10).state_dict()) == "preactresnet18"
    save_backbone(tmp_path / "b.pth", net, {"arch": "preactresnet18_w16", "method": "erm"})
    back, meta = resnet_from_checkpoint(tmp_path / "b.pth")
    assert meta["arch"] == "preactresnet18_w16"
    x = torch.rand(2, 3, 32, 32)
    net.eval(), back.eval()
    assert torch.equal(net(x), back(x))


def _run(folder, **metrics):
    return {"metrics": metrics, "folder": folder, "seeds": {}}


def test_report_on_the_cifar_track(tmp_path):
    ood = {s: {"det_acc": 60.0 + i, "det_acc_at_thr": 50.0, "auroc": 55.0, "aupr_in": 70.0,
               "aupr_out": 40.0}
           for i, s in enumerate(("LSUN", "iSUN", "TinyImageNet", "uniform"))}
    def rob(k, e):
        return _run(f"erm/seed{k}/robustness", clean={"top1_err": e},
                    calibration={"ece": 3.0, "oe": 1.0}, fgsm={"top1_err": 96.0},
                    pgd={"top1_err": 97.0, "iters": 20}, ood=ood,
                    embedding={"alignment": 0.2, "uniformity": -2.0, "n": 200, "dim": 128})
    results = {"methods": {"erm": {
        "pretrain": [_run(f"erm/seed{k}/pretrain", top1=t, top5=50.0, num_classes=100,
                          dataset="cifar100")
                     for k, t in ((0, 14.0), (1, 16.0))],
        "robustness": [rob(0, 86.0), rob(1, 84.0)]}}, "baselines": {},
        "seeds": {"pretrain": [0, 1]}}
    cls = tables.classification_table(results)
    assert cls.title == "Classification (CIFAR-100 layout, test)"
    assert tables.background_table(results) is None
    cal = tables.calibration_adversarial_table(results, with_clean=True)
    assert [c.header for c in cal.columns][:2] == ["clean top-1 err (%)",
                                                   "ECE (%)"] and "20 iterations" in cal.note
    cfg = {"name": "t", "data": {"root": "d"}, "robustness": {"suites": "all"}}
    md = write_report(tmp_path, results, cfg).read_text()
    # mean ± sample std of 14 and 16 (a lone row: bold)
    assert "| erm | **[15.00 ± 1.41](erm/)** |" in md
    assert "Background corruption" not in md
    # one table per set when more than three
    assert md.count("### Out-of-distribution detection") == 4
    assert "Out-of-distribution detection (maximum softmax probability): iSUN" in md
    assert "In-distribution: the CIFAR-100 test set" in md
