"""Backbone -> detectron2 conversion: exact features in a detectron2-named ResNet, config/weights
checks."""

import copy
import importlib.util
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
import yaml
from torch import nn

from transfer.convert import (
    ConversionError,
    check_detectron2_config,
    check_detectron2_weights,
    convert_to_detectron2,
    detectron2_config_problems,
    detectron2_configs,
    detectron2_weights_problems,
    to_detectron2,
    write_detectron2_weights,
)

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------
# A small ResNet with detectron2's module names (stem.conv1.norm, res2..res5, convK.norm, shortcut)


class FrozenBN(nn.Module):
    """detectron2's FrozenBatchNorm2d at inference: F.batch_norm with fixed statistics."""

    def __init__(self, c):
        super().__init__()
        for name in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(name, torch.zeros(c))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False,
                            0.0, 1e-5)


class Conv(nn.Conv2d):
    """detectron2's Conv2d: the norm is a child named `norm`, applied inside forward."""

    def __init__(self, cin, cout, k, stride=1):
        super().__init__(cin, cout, k, stride=stride, padding=k // 2, bias=False)
        self.norm = FrozenBN(cout)

    def forward(self, x):
        return self.norm(super().forward(x))


class Basic(nn.Module):
    def __init__(self, cin, cout, stride, stride_in_1x1=False):
        super().__init__()
        self.conv1 = Conv(cin, cout, 3, stride)
        self.conv2 = Conv(cout, cout, 3)
        self.shortcut = Conv(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x):
        y = self.conv2(F.relu(self.conv1(x)))
        return F.relu(y + (self.shortcut(x) if self.shortcut is not None else x))


class Bottleneck(nn.Module):
    def __init__(self, cin, cout, stride, stride_in_1x1=False):
        super().__init__()
        mid = cout // 4
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = Conv(cin, mid, 1, s1)
        self.conv2 = Conv(mid, mid, 3, s3)
        self.conv3 = Conv(mid, cout, 1)
        self.shortcut = Conv(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x):
        y = self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))
        return F.relu(y + (self.shortcut(x) if self.shortcut is not None else x))


class Stem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = Conv(3, 64, 7, 2)

    def forward(self, x):
        return F.max_pool2d(F.relu(self.conv1(x)), 3, 2, 1)


class D2ResNet(nn.Module):
    SPECS = {"resnet18": (Basic, [2, 2, 2, 2], 1), "resnet50": (Bottleneck, [3, 4, 6, 3], 4)}

    def __init__(self, arch, stride_in_1x1=False):
        super().__init__()
        block, counts, expansion = self.SPECS[arch]
        self.stem = Stem()
        cin = 64
        for i, n in enumerate(counts):
            cout = 64 * 2 ** i * expansion
            first_stride = 1 if i == 0 else 2
            blocks = [block(cin if j == 0 else cout, cout, first_stride if j == 0 else 1,
                            stride_in_1x1)
                      for j in range(n)]
            setattr(self, f"res{i + 2}", nn.Sequential(*blocks))
            cin = cout

    def forward(self, x):
        out = {}
        x = self.stem(x)
        for i in range(2, 6):
            x = out[f"res{i}"] = getattr(self, f"res{i}")(x)
        return out


def random_torchvision(arch, seed=0):
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(weights=None)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def torchvision_features(model, x):
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out = {}
    for i in range(1, 5):
        x = out[f"res{i + 1}"] = getattr(model, f"layer{i}")(x)
    return out


def load_d2(net, d2_state):
    net.load_state_dict({k: torch.from_numpy(v) for k, v in d2_state.items()}, strict=True)
    return net.eval()


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_converted_weights_reproduce_torchvision_features_exactly(arch):
    tv = random_torchvision(arch)
    d2 = to_detectron2(tv.state_dict())
    assert all(isinstance(v, np.ndarray) for v in d2.values())
    net = load_d2(D2ResNet(arch), d2)  # strict: every key has a home and nothing is left over
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = torchvision_features(tv, x), net(x)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    if arch == "resnet50":  # detectron2's default (stride on the 1x1): same shapes, other features
        wrong = load_d2(D2ResNet(arch, stride_in_1x1=True), d2)
        with torch.no_grad():
            bad = wrong(x)
        assert torch.equal(bad["res2"], want["res2"])  # res2 has no stride
        assert not torch.allclose(bad["res3"], want["res3"], atol=1e-3)


def test_rename_table_and_dropped_keys():
    state = random_torchvision("resnet50").state_dict()
    d2 = to_detectron2(state)
    assert d2["stem.conv1.weight"].shape == (64, 3, 7, 7)
    np.testing.assert_array_equal(d2["stem.conv1.norm.running_var"],
                                  state["bn1.running_var"].numpy())
    np.testing.assert_array_equal(d2["res2.0.shortcut.weight"],
                                  state["layer1.0.downsample.0.weight"].numpy())
    np.testing.assert_array_equal(d2["res2.0.shortcut.norm.bias"],
                                  state["layer1.0.downsample.1.bias"].numpy())
    np.testing.assert_array_equal(d2["res5.2.conv3.norm.weight"],
                                  state["layer4.2.bn3.weight"].numpy())
    np.testing.assert_array_equal(d2["res4.5.conv2.weight"],
                                  state["layer3.5.conv2.weight"].numpy())
    assert not any(k.startswith("fc") or "num_batches_tracked" in k or "layer" in k or "bn" in k
                   for k in d2)
    n_tv = sum(not k.startswith("fc.") and not k.endswith("num_batches_tracked") for k in state)
    assert len(d2) == n_tv == 265  # resnet50: 53 convs + 53 norms x 4
    assert detectron2_weights_problems({"model": d2, "__author__": "x",
                                        "matching_heuristics": True},
                                       "resnet50") == []
    with pytest.raises(ConversionError, match="not torchvision ResNet keys.*module.conv1.weight"):
        to_detectron2({"module." + k: v for k, v in state.items()})


def test_weights_checks_catch_prefix_author_heuristics_and_shapes(tmp_path):
    d2 = to_detectron2(random_torchvision("resnet18").state_dict())
    path = write_detectron2_weights(d2, tmp_path / "w.pkl", "resnet18")
    with open(path, "rb") as f:
        payload = pickle.load(f)
    assert payload["__author__"] == "mixup-transfer" and payload["matching_heuristics"] is True
    check_detectron2_weights(path, "resnet18")
    bad = dict(payload, model={"module." + k: v for k, v in d2.items()})
    with pytest.raises(ConversionError, match="leftover prefix \\['module.'\\]"):
        check_detectron2_weights(bad)
    with pytest.raises(ConversionError, match="Caffe2"):
        check_detectron2_weights(dict(payload, __author__="Caffe2"))
    with pytest.raises(ConversionError, match="matching_heuristics"):
        check_detectron2_weights({"model": payload["model"]})
    with pytest.raises(ConversionError, match="missing keys for resnet50"):
        check_detectron2_weights(payload, "resnet50")
    with pytest.raises(ConversionError, match="leftover prefix"):
        write_detectron2_weights({"module." + k: v for k, v in d2.items()}, tmp_path / "bad.pkl")
    assert not (tmp_path / "bad.pkl").exists()


def test_generated_configs_are_right_and_checks_catch_traps(tmp_path):
    paths = detectron2_configs(tmp_path, tmp_path / "w.pkl", "resnet50")
    assert sorted(paths) == ["coco_resnet50_FPN_1x", "voc_resnet50_C4_24k", "voc_resnet50_FPN_18k"]
    voc = yaml.safe_load(paths["voc_resnet50_C4_24k"].read_text())
    coco = yaml.safe_load(paths["coco_resnet50_FPN_1x"].read_text())
    for cfg in (voc, coco):
        assert cfg["INPUT"]["FORMAT"] == "RGB"
        assert cfg["MODEL"]["PIXEL_MEAN"] == [123.675, 116.28, 103.53]
        assert cfg["MODEL"]["PIXEL_STD"] == [58.395, 57.12, 57.375]
        assert cfg["MODEL"]["RESNETS"]["STRIDE_IN_1X1"] is False
        assert cfg["MODEL"]["RESNETS"]["DEPTH"] == 50
        assert cfg["MODEL"]["WEIGHTS"] == str((tmp_path / "w.pkl").resolve())
    assert (
        voc["MODEL"]["RESNETS"]["NORM"] == "SyncBN" and voc["MODEL"]["BACKBONE"]["FREEZE_AT"] == 0
    )
    assert voc["SOLVER"]["MAX_ITER"] == 24000 and voc["SOLVER"]["STEPS"] == [18000, 22000]
    # the toolkit's own dataset names, never detectron2's built-in voc_2007_* / coco_2017_*
    assert voc["DATASETS"] == {"TRAIN": ["mt_voc_2007_trainval", "mt_voc_2012_trainval"],
                               "TEST": ["mt_voc_2007_test"]}
    assert coco["DATASETS"] == {"TRAIN": ["mt_coco_train2017"], "TEST": ["mt_coco_val2017"]}
    assert voc["MODEL"]["ROI_HEADS"] == {"NAME": "Res5ROIHeadsExtraNorm", "NUM_CLASSES": 20}
    assert coco["MODEL"]["RESNETS"]["NORM"] == "FrozenBN" and coco["SOLVER"]["MAX_ITER"] == 90000
    check_detectron2_config(paths["coco_resnet50_FPN_1x"], "resnet50")

    def broken(path, **changes):
        cfg = copy.deepcopy(coco)
        for dotted, value in changes.items():
            node = cfg
            *parents, last = dotted.split("__")
            for p in parents:
                node = node[p]
            if value is None:
                del node[last]
            else:
                node[last] = value
        return cfg

    cases = [
        (dict(INPUT__FORMAT="BGR"), "INPUT.FORMAT is 'BGR'"),
        (dict(INPUT__FORMAT=None), "INPUT.FORMAT is 'BGR' \\(detectron2 default"),
        (dict(MODEL__PIXEL_STD=[1.0, 1.0, 1.0]), "std 1"),
        (dict(MODEL__PIXEL_MEAN=[103.53, 116.28, 123.675]), "PIXEL_MEAN .* \\(BGR order\\)"),
        (dict(MODEL__RESNETS__STRIDE_IN_1X1=True), "STRIDE_IN_1X1 is not False"),
        (dict(MODEL__RESNETS__STRIDE_IN_1X1=None), "STRIDE_IN_1X1 is not False"),
        (dict(MODEL__RESNETS__DEPTH=101), "DEPTH is 101 but the weights are resnet50"),
    ]
    for changes, match in cases:
        with pytest.raises(ConversionError, match=match):
            check_detectron2_config(broken(coco, **changes), "resnet50")
    # a YAML written by hand with a leftover default is caught through its _BASE_ chain too
    (tmp_path / "child.yaml").write_text("_BASE_: coco_resnet50_FPN_1x.yaml\n"
                                         "INPUT:\n"
                                         "  FORMAT: BGR\n")
    with pytest.raises(ConversionError, match="child.yaml:\n  - INPUT.FORMAT"):
        check_detectron2_config(tmp_path / "child.yaml")


# Keys of detectron2/config/defaults.py that the generated configs may use (yacs rejects unknown
# keys).
D2_KEYS = {
    "VERSION", "MODEL.META_ARCHITECTURE", "MODEL.WEIGHTS", "MODEL.MASK_ON", "MODEL.PIXEL_MEAN",
    "MODEL.PIXEL_STD",
    "MODEL.BACKBONE.NAME", "MODEL.BACKBONE.FREEZE_AT", "MODEL.RESNETS.DEPTH", "MODEL.RESNETS.NORM",
    "MODEL.RESNETS.STRIDE_IN_1X1", "MODEL.RESNETS.RES2_OUT_CHANNELS", "MODEL.RESNETS.OUT_FEATURES",
    "MODEL.FPN.IN_FEATURES", "MODEL.ANCHOR_GENERATOR.SIZES",
    "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", "MODEL.RPN.IN_FEATURES",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "MODEL.RPN.PRE_NMS_TOPK_TEST", "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "MODEL.ROI_HEADS.NAME", "MODEL.ROI_HEADS.IN_FEATURES",
    "MODEL.ROI_HEADS.NUM_CLASSES", "MODEL.ROI_BOX_HEAD.NAME", "MODEL.ROI_BOX_HEAD.NUM_FC",
    "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "INPUT.FORMAT", "INPUT.MIN_SIZE_TRAIN",
    "INPUT.MIN_SIZE_TEST", "DATASETS.TRAIN", "DATASETS.TEST", "SOLVER.IMS_PER_BATCH",
    "SOLVER.BASE_LR", "SOLVER.STEPS", "SOLVER.MAX_ITER", "SOLVER.WARMUP_ITERS",
    "TEST.PRECISE_BN.ENABLED",
}


def _leaves(cfg, prefix=""):
    for k, v in cfg.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield prefix + k


@pytest.mark.parametrize("arch", ["resnet18", "resnet101"])
def test_generated_configs_use_only_detectron2_keys(tmp_path, arch):
    for path in detectron2_configs(tmp_path, tmp_path / "w.pkl", arch).values():
        keys = set(_leaves(yaml.safe_load(path.read_text())))
        assert keys <= D2_KEYS, sorted(keys - D2_KEYS)


def test_r18_configs_need_res2_64_and_no_c4(tmp_path):
    paths = detectron2_configs(tmp_path, tmp_path / "w.pkl", "resnet18")
    # detectron2's C4 head builds bottleneck res5 blocks: VOC gets detectron2's VOC FPN recipe
    # instead
    assert list(paths) == ["voc_resnet18_FPN_18k", "coco_resnet18_FPN_1x"]
    voc = yaml.safe_load(paths["voc_resnet18_FPN_18k"].read_text())
    assert voc["MODEL"]["ROI_HEADS"]["NUM_CLASSES"] == 20 and voc["SOLVER"]["MAX_ITER"] == 18000
    assert voc["MODEL"]["RESNETS"]["NORM"] == "FrozenBN" and voc["INPUT"]["MIN_SIZE_TEST"] == 800
    cfg = yaml.safe_load(paths["coco_resnet18_FPN_1x"].read_text())
    assert (
        cfg["MODEL"]["RESNETS"]["RES2_OUT_CHANNELS"] == 64
        and cfg["MODEL"]["RESNETS"]["DEPTH"] == 18
    )
    cfg["MODEL"]["RESNETS"]["RES2_OUT_CHANNELS"] = 256
    assert any("RES2_OUT_CHANNELS must be 64" in p
               for p in detectron2_config_problems(cfg, "resnet18"))


def test_convert_files_from_a_foreign_layout_and_cli(tmp_path, capsys):
    tv = random_torchvision("resnet18")
    foreign = tmp_path / "dp.pth.tar"  # DataParallel-style wrapper, as other codebases save it
    torch.save({"state_dict": {"module." + k: v for k, v in tv.state_dict().items()}, "epoch": 3},
               foreign)
    out = convert_to_detectron2(foreign, tmp_path / "d2" / "r18.pkl", arch="resnet18")
    assert set(out) == {"weights", "voc_resnet18_FPN_18k", "coco_resnet18_FPN_1x"}
    with open(out["weights"], "rb") as f:
        payload = pickle.load(f)
    want = to_detectron2(tv.state_dict())
    assert list(payload["model"]) == list(want)
    assert all(np.array_equal(payload["model"][k], want[k]) for k in want)

    spec = importlib.util.spec_from_file_location("convert_cli", ROOT / "tools" / "convert.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--to", "torchvision", str(foreign), str(tmp_path / "tv.pth")]) == 0
    assert json.loads(capsys.readouterr().out)["weights"] == str(tmp_path / "tv.pth")
    saved = torch.load(tmp_path / "tv.pth", weights_only=True)
    assert saved["meta"]["arch"] == "resnet18"
    assert "fc.weight" not in saved["model"]
    assert all(torch.equal(saved["model"][k], v)
               for k, v in tv.state_dict().items() if not k.startswith("fc."))
    from mixup_transfer.core.checkpoint import load_backbone
    assert set(load_backbone(tmp_path / "tv.pth", "resnet18")) == set(saved["model"])

    # a checkpoint that does not fit: the loader's error, nothing written
    assert cli.main(["--to", "detectron2", str(foreign), str(tmp_path / "x.pkl"), "--arch",
                     "resnet50"]) == 2
    assert "missing keys" in capsys.readouterr().err and not (tmp_path / "x.pkl").exists()


# ------------------------------------------------------------------------------------------------
# Through detectron2 itself (skipped where it is not installed: it does not come from PyPI)


@pytest.mark.d2
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_detectron2_loads_converted_weights(tmp_path, arch):
    """Every generated config builds in detectron2, the .pkl loads with only the heads missing (no
    unexpected or mis-shaped key), and res2..res5 through detectron2's own preprocessing equal
    torchvision's layer1..4 on the same image."""
    pytest.importorskip("detectron2")
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from transfer.convert import PIXEL_MEAN_RGB, PIXEL_STD_RGB, register_detectron2_extras

    register_detectron2_extras()
    tv = random_torchvision(arch)
    pkl = write_detectron2_weights(to_detectron2(tv.state_dict()), tmp_path / "w.pkl", arch)
    paths = detectron2_configs(tmp_path, pkl, arch, voc_norm="FrozenBN")
    assert sorted(paths) == sorted([f"voc_{arch}_FPN_18k", f"coco_{arch}_FPN_1x"]
                                   + ([f"voc_{arch}_C4_24k"] if arch == "resnet50" else []))
    image = torch.randint(0, 256, (3, 64, 64), generator=torch.Generator().manual_seed(2),
                          dtype=torch.uint8)
    mean = torch.tensor(PIXEL_MEAN_RGB).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD_RGB).view(3, 1, 1)
    with torch.no_grad():  # torchvision's input: RGB in [0, 1], ImageNet mean / std
        want = torchvision_features(tv, ((image.float() / 255 - mean / 255) / (std / 255))[None])
    for name, path in paths.items():
        cfg = get_cfg()
        cfg.merge_from_file(str(path))  # every generated key must exist in detectron2's schema
        cfg.MODEL.DEVICE = "cpu"
        model = build_model(cfg).eval()
        ckpt = DetectionCheckpointer(model)
        loaded = ckpt._load_model(ckpt._load_file(str(pkl)))
        assert loaded.unexpected_keys == [] and loaded.incorrect_shapes == [], name
        heads = ("backbone.fpn_", "proposal_generator.", "roi_heads.box_head.",
                 "roi_heads.box_predictor.",
                 "roi_heads.res5.norm.")  # C4: MoCo's extra norm after res5
        assert loaded.missing_keys and all(k.startswith(heads) for k in loaded.missing_keys), name
        with torch.no_grad():
            x = model.preprocess_image([{"image": image}]).tensor  # detectron2's normalisation
            if "FPN" in name:
                got = model.backbone.bottom_up(x)
            else:
                got = {"res4": model.backbone(x)["res4"]}
                # without MoCo's extra norm (missing)
                got["res5"] = model.roi_heads.res5[:-1](got["res4"])
        for k, v in got.items():  # float32 reassociation only: relative to the feature's scale
            assert v.shape == want[k].shape
            assert float((v - want[k]).abs().max()) <= 1e-5 * float(want[k].abs().max()), (name, k)
