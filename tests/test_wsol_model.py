"""CAM model (stride, identity, checkpoint loading), recipes (trainable layers, lrs), a tiny run."""
import json

import pytest
import torch

from pretrain.checkpoint import CheckpointError, build_resnet, save_backbone
from pretrain.config import load_config
from wsol.finetune import DEFAULTS, build_optimizer, finetune, set_frozen_eval
from wsol.model import CAMModel, build_cam_model, normalise_cams


def test_cam_identity_and_stride():
    torch.manual_seed(0)
    model = CAMModel("resnet18", num_classes=5).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert model.features(x).shape == (2, 512, 4, 4)  # input / 16: layer4 at stride 1
        logits, cams = model.logits_and_cams(x)            # CAMs of every class
        _, cams_y = model.logits_and_cams(x, torch.tensor([3, 1]))
    # spatial mean of the CAM x channels + bias == logits (the CAM is W_y . F / C, no bias / ReLU)
    recon = cams.mean((2, 3)) * 512 + model.fc.bias
    torch.testing.assert_close(recon, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cams_y[:, 0], torch.stack([cams[0, 3], cams[1, 1]]))
    assert cams.min() < 0  # no ReLU


def test_normalise_cams():
    cams = torch.zeros(3, 1, 2, 2)
    cams[0, 0] = torch.tensor([[0.0, 1.0], [2.0, 4.0]])
    cams[2, 0, 0, 0] = float("nan")
    out = normalise_cams(cams, (8, 8))
    assert out.shape == (3, 1, 8, 8)
    assert out[0].min() == 0 and out[0].max() == 1
    assert out[1].abs().sum() == 0 and out[2].abs().sum() == 0  # constant / NaN -> zeros


def test_backbone_loading_strict(tmp_path):
    net = build_resnet("resnet18", num_classes=10)
    save_backbone(tmp_path / "b.pth", net, {"arch": "resnet18", "num_classes": 10})
    model = build_cam_model("resnet18", 7, str(tmp_path / "b.pth"))
    torch.testing.assert_close(model.trunk[4][0].conv1.weight, net.layer1[0].conv1.weight)
    torch.testing.assert_close(model.trunk[7][1].bn2.running_var, net.layer4[1].bn2.running_var)
    assert model.fc.out_features == 7 and model.trunk[7][0].conv1.stride == (1, 1)
    with pytest.raises(CheckpointError):
        build_cam_model("resnet50", 7, str(tmp_path / "b.pth"))  # a wrong arch never loads silently


def _groups(cfg):
    model = CAMModel("resnet18", 4)
    opt = build_optimizer(model, cfg["optim"])
    names = {id(p): n for n, p in model.named_parameters()}
    layers = {g["name"]: (g["lr"], sorted({names[id(p)].split(".")[0] if names[id(p)].startswith("fc")
                                           else model._TRUNK_NAMES[int(names[id(p)].split(".")[1])]
                                           for p in g["params"]})) for g in opt.param_groups}
    frozen = sorted({n for n, p in model.named_parameters() if not p.requires_grad})
    return model, opt, layers, frozen


def test_alignmix_recipe_lrs():
    cfg = load_config("configs/wsol/cub_alignmix.yaml", defaults=DEFAULTS)
    _, opt, layers, frozen = _groups(cfg)
    assert isinstance(opt, torch.optim.SGD) and frozen == []
    assert layers["large_lr"] == (0.01, ["fc"])
    assert layers["trunk"] == (0.001, ["bn1", "conv1", "layer1", "layer2", "layer3", "layer4"])
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["weight_decay"] == 1e-4
    cfg = load_config("configs/wsol/cub_alignmix.yaml", ["optim.large_lr_layers=[layer4, fc]"], DEFAULTS)
    _, _, layers, _ = _groups(cfg)
    assert layers["large_lr"] == (0.01, ["fc", "layer4"])


def test_multimix_recipe_trains_layer4_and_fc_only():
    cfg = load_config("configs/wsol/cub_multimix.yaml", defaults=DEFAULTS)
    model, opt, layers, frozen = _groups(cfg)
    assert isinstance(opt, torch.optim.Adam)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(
        [p for n, p in model.named_parameters() if n.startswith(("trunk.7.", "fc."))])
    assert {lr for lr, _ in layers.values()} == {1e-4}
    assert sorted({layer for _, ls in layers.values() for layer in ls}) == ["fc", "layer4"]
    assert all(n.startswith(("trunk.0.", "trunk.1.", "trunk.4.", "trunk.5.", "trunk.6.")) for n in frozen)
    model.train()
    set_frozen_eval(model, cfg["optim"]["freeze"])
    assert not model.trunk[6].training and model.trunk[7].training  # frozen BN keeps its statistics
    assert cfg["eval"]["every"] == 1 and cfg["eval"]["loc_threshold"] == 0.75


@pytest.mark.slow
def test_tiny_finetune_resume_and_outputs(toy_world, tmp_path):
    from wsol.data import cub_to_wsol_metadata

    meta = tmp_path / "meta"
    if (toy_world / "wsol_metadata" / "CUB" / "test").is_dir():
        meta = toy_world / "wsol_metadata" / "CUB"
    else:
        cub_to_wsol_metadata(toy_world / "CUB_200_2011", meta)
    overrides = [f"data.image_root={toy_world / 'CUB_200_2011' / 'images'}", f"data.metadata_root={meta}",
                 "data.num_workers=0", "data.limit_train=8", "data.limit_test=6", "input.resize=40",
                 "input.crop=32", "input.test_size=32", "batch_size=4", "epochs=1", "eval.every=1",
                 "eval.cam_curve_interval=0.01", "eval.num_figure_images=2", "runtime.device=cpu"]
    cfg = load_config("configs/wsol/toy_multimix.yaml", overrides)
    run = tmp_path / "run"
    m1 = finetune(cfg, None, run)
    assert json.loads((run / "metrics.json").read_text())["maxboxacc_v2"] == m1["maxboxacc_v2"]
    for f in ("cam_grid.png", "boxacc.png", "loc_curve.png"):
        assert (run / "figures" / f).stat().st_size > 1000
    cfg2 = load_config("configs/wsol/toy_multimix.yaml", overrides + ["epochs=2"])
    m2 = finetune(cfg2, None, run)  # resumes from epoch 1, trains epoch 2
    assert [c["epoch"] for c in m2["curve"]] == [1, 2]
    assert m2["curve"][0] == m1["curve"][0]
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "resume" and r["epoch"] == 1 for r in log)
    for k in ("top1_cls", "maxboxacc", "maxboxacc_v2", "top1_loc", "gt_known_loc"):
        assert 0 <= m2[k] <= 100
