"""CAM model (stride, identity, checkpoint loading), recipes (trainable layers, lrs), a tiny
run."""
import json

import cv2
import numpy as np
import pytest
import torch

from mixup_transfer.core.checkpoint import CheckpointError, build_resnet, save_backbone
from mixup_transfer.core.config import load_config
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


def _keys_resize_matrix(n_in, n_out, a=-0.75):
    """[n_out, n_in] bicubic (Keys, a = -0.75) weights, half-pixel centres, edge pixels
    replicated."""
    def kernel(t):
        t = abs(t)
        return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1 if t <= 1 else (a * t ** 3 - 5 * a * t ** 2
                                                                       + 8 * a * t - 4 * a
                                                                      if t < 2 else 0.0)
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        s = (o + 0.5) * n_in / n_out - 0.5
        f = int(np.floor(s))
        for k in range(f - 1, f + 3):
            m[o, min(max(k, 0), n_in - 1)] += kernel(s - k)
    return m


def test_normalise_cams_matches_wsolevaluation():
    cams = torch.zeros(3, 2, 2, 3)
    cams[0, 0] = torch.tensor([[0.0, 1.0, -1.0], [2.0, 4.0, 0.5]])
    cams[0, 1] = 7.0                     # constant -> zeros
    cams[1, 0] = torch.tensor([[3.0, -2.0, 0.0], [1.0, 1.0, 5.0]])
    cams[2, 0, 0, 0] = float("nan")      # NaN -> zeros
    out = normalise_cams(cams, (8, 12))  # size = (H, W)
    assert out.shape == (3, 2, 8, 12) and out.dtype == torch.float32
    for b in (0, 1):
        cam = cams[b, 0].numpy()
        # wsolevaluation inference.py: cv2.resize(cam, (W, H), INTER_CUBIC), then min-max in
        # float32
        ref = cv2.resize(cam, (12, 8), interpolation=cv2.INTER_CUBIC)
        ref -= ref.min()
        ref /= ref.max()
        np.testing.assert_array_equal(out[b, 0].numpy(), ref)
        # independently: separable Keys bicubic in float64
        up = _keys_resize_matrix(2, 8) @ cam.astype(np.float64) @ _keys_resize_matrix(3, 12).T
        np.testing.assert_allclose(out[b, 0].numpy(), (up - up.min()) / (up.max() - up.min()),
                                   atol=2e-6)
        assert out[b, 0].min() == 0 and out[b, 0].max() == 1
    assert out[0, 1].abs().sum() == 0 and out[1, 1].abs().sum() == 0 and out[2].abs().sum() == 0


def test_backbone_loading_strict(tmp_path):
    net = build_resnet("resnet18", num_classes=10)
    save_backbone(tmp_path / "b.pth", net, {"arch": "resnet18", "num_classes": 10})
    model = build_cam_model("resnet18", 7, str(tmp_path / "b.pth"))
    torch.testing.assert_close(model.trunk[4][0].conv1.weight, net.layer1[0].conv1.weight)
    torch.testing.assert_close(model.trunk[7][1].bn2.running_var, net.layer4[1].bn2.running_var)
    assert model.fc.out_features == 7 and model.trunk[7][0].conv1.stride == (1, 1)
    with pytest.raises(CheckpointError):
        # a wrong arch never loads silently
        build_cam_model("resnet50", 7, str(tmp_path / "b.pth"))


def _groups(cfg):
    model = CAMModel("resnet18", 4)
    opt = build_optimizer(model, cfg["optim"])
    names = {id(p): n for n, p in model.named_parameters()}
    layers = {g["name"]: (g["lr"], sorted({names[id(p)].split(".")[0]
                                           if names[id(p)].startswith("fc")
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
    cfg = load_config("configs/wsol/cub_alignmix.yaml", ["optim.large_lr_layers=[layer4, fc]"],
                      DEFAULTS)
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
    assert all(n.startswith(("trunk.0.", "trunk.1.", "trunk.4.", "trunk.5.", "trunk.6."))
               for n in frozen)
    model.train()
    set_frozen_eval(model, cfg["optim"]["freeze"])
    # frozen BN keeps its statistics
    assert not model.trunk[6].training and model.trunk[7].training
    assert cfg["eval"]["every_epochs"] == 1 and cfg["eval"]["loc_threshold"] == 0.75


@pytest.mark.slow
def test_tiny_finetune_resume_and_outputs(toy_world, tmp_path):
    from wsol.data import cub_to_wsol_metadata

    meta = tmp_path / "meta"
    if (toy_world / "wsol_metadata" / "CUB" / "test").is_dir():
        meta = toy_world / "wsol_metadata" / "CUB"
    else:
        cub_to_wsol_metadata(toy_world / "CUB_200_2011", meta)
    overrides = [f"data.image_root={toy_world / 'CUB_200_2011' / 'images'}",
                 f"data.metadata_root={meta}", "data.num_workers=0", "data.max_train=8",
                 "data.max_val=6", "input.resize=40", "input.crop=32", "input.test_size=32",
                 "optim.batch_per_process=4", "optim.epochs=1", "eval.every_epochs=1",
                 "eval.cam_curve_interval=0.01", "eval.num_figure_images=2", "runtime.device=cpu"]
    cfg = load_config("configs/wsol/toy_multimix.yaml", overrides)
    run = tmp_path / "run"
    m1 = finetune(cfg, None, run)
    assert json.loads((run / "metrics.json").read_text())["maxboxacc_v2"] == m1["maxboxacc_v2"]
    for f in ("cam_grid.png", "boxacc.png", "loc_curve.png"):
        assert (run / "figures" / f).stat().st_size > 1000
    cfg2 = load_config("configs/wsol/toy_multimix.yaml", overrides + ["optim.epochs=2"])
    m2 = finetune(cfg2, None, run)  # resumes from epoch 1, trains epoch 2
    assert [c["epoch"] for c in m2["curve"]] == [1, 2]
    assert m2["curve"][0] == m1["curve"][0]
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "resume" and r["epoch"] == 1 for r in log)
    for k in ("top1_cls", "maxboxacc_v1", "maxboxacc_v2", "top1_loc", "gt_known_loc"):
        assert 0 <= m2[k] <= 100


def test_cam_model_has_the_stage_interface_of_the_method_registry():
    """Any pretraining method can wrap a CAM model: its stages compose to the features, at every
    layer."""
    from wsol.finetune import WSOLObjective

    torch.manual_seed(0)
    cam = CAMModel("resnet18", 4).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        full = cam.features(x)
        for layer in range(5):
            assert torch.allclose(cam.forward_from(cam.forward_to(x, layer), layer), full,
                                  atol=1e-6), layer
        assert torch.allclose(cam.fc(cam.pool(full)), cam(x), atol=1e-6)
        dense = cam.dense_logits(full).mean(-1)
        # fc is linear: the mean of the dense logits
        assert torch.allclose(dense, cam(x), atol=1e-5)
    plain = WSOLObjective(cam, 4, {"name": "none"})
    labels = torch.tensor([1, 3])
    out = plain(x, labels)
    assert torch.allclose(out["loss"], torch.nn.functional.cross_entropy(cam(x), labels))
    mixed = WSOLObjective(cam, 4, {"name": "cutmix", "alpha": 1.0})
    mixed.method.generator = torch.Generator().manual_seed(0)
    assert torch.isfinite(mixed(x, labels)["loss"])
    with pytest.raises(ValueError, match="own classifier head.*alignmix: the released code's "
                                         "GAP head"):
        WSOLObjective(cam, 4, {"name": "alignmix_stage2", "resolution": 2})
