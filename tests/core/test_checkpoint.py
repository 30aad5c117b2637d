"""The backbone checkpoint contract: save, load, foreign layouts, failures."""

import pytest
import torch

from mixup_transfer.core.checkpoint import (
    CheckpointError,
    build_resnet,
    infer_arch,
    load_backbone,
    load_classifier,
    resnet_from_checkpoint,
    save_backbone,
)


@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(0)
    m = build_resnet("resnet18", num_classes=7)
    for mod in m.modules():  # non-trivial BN statistics, so a mix-up of keys would show
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
    return m


def _same(a, b):
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_roundtrip_is_plain_and_weights_only(tmp_path, r18):
    path = tmp_path / "backbone.pth"
    save_backbone(path, r18, {"arch": "resnet18", "method": "erm", "epochs": 3, "config": "a: 1\n",
                              "metrics": {"top1": 12.5}})
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"model", "meta"}
    assert raw["meta"] == {"arch": "resnet18", "method": "erm", "epochs": 3, "config": "a: 1\n",
                           "metrics": {"top1": 12.5}, "num_classes": 7, "classifier": "fc"}
    assert "fc.weight" in raw["model"]
    state = load_backbone(path, "resnet18")
    expected = {k: v for k, v in r18.state_dict().items() if not k.startswith("fc.")}
    _same(state, expected)
    assert load_backbone(path, None).keys() == state.keys()  # arch from meta


def test_save_rejects_non_primitive_meta(tmp_path, r18):
    import argparse

    with pytest.raises(TypeError, match="Namespace"):
        save_backbone(tmp_path / "x.pth", r18,
                      {"arch": "resnet18", "config": argparse.Namespace(a=1)})


@pytest.mark.parametrize("layout", ["module", "moco", "backbone", "model", "alignmixup",
                                    "state_dict", "state_dict_module"])
def test_foreign_layouts(tmp_path, r18, layout):
    sd = r18.state_dict()
    trunk = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    if layout == "module":
        obj = {"module." + k: v for k, v in sd.items()}
    elif layout == "moco":  # MoCo v2: query and key encoders with an MLP head, plus the queue
        obj = {"state_dict": {**{"module.encoder_q." + k: v for k, v in trunk.items()},
                              **{"module.encoder_k." + k: v for k, v in trunk.items()},
                              "module.encoder_q.fc.0.weight": torch.zeros(512, 512),
                              "module.encoder_q.fc.2.weight": torch.zeros(128, 512),
                              "module.queue": torch.zeros(128, 16)}, "epoch": 200,
                              "arch": "resnet18"}
    elif layout == "backbone":
        obj = {"backbone." + k: v for k, v in trunk.items()}
    elif layout == "model":
        obj = {"model": {"model." + k: v for k, v in sd.items()}}
    elif layout == "alignmixup":
        obj = {**{"module.model." + k: v for k, v in trunk.items()},
               "module.classifier.weight": sd["fc.weight"],
               "module.classifier.bias": sd["fc.bias"]}
    elif layout == "state_dict":  # CutMix-style
        obj = {"state_dict": dict(sd), "epoch": 300, "best_err1": 21.4}
    else:
        obj = {"state_dict": {"module." + k: v for k, v in sd.items()}, "optimizer": {"state": {}}}
    path = tmp_path / f"{layout}.pth"
    torch.save(obj, path)
    _same(load_backbone(path, "resnet18"), trunk)
    if layout in ("alignmixup", "module", "state_dict"):
        state, meta = load_classifier(path, num_classes=7)
        assert torch.equal(state["fc.weight"], sd["fc.weight"]) and meta["arch"] == "resnet18"


def test_wrong_arch_names_keys(tmp_path, r18):
    path = tmp_path / "r18.pth"
    torch.save({"module." + k: v for k, v in r18.state_dict().items()}, path)
    with pytest.raises(CheckpointError) as e:
        load_backbone(path, "resnet50")
    msg = str(e.value)
    assert "missing keys: " in msg and "layer1.0.conv3.weight" in msg
    assert "mis-shaped keys: " in msg and "layer1.0.conv1.weight: checkpoint (64, 64, 3, 3)" in msg


def test_partial_and_extra_keys(tmp_path, r18):
    sd = dict(r18.state_dict())
    sd.pop("layer2.1.bn2.weight")
    sd["layer5.0.conv1.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as e:
        load_backbone(tmp_path / "bad.pth", "resnet18")
    assert "missing keys: 1 ['layer2.1.bn2.weight']" in str(e.value)
    assert "unexpected keys: 1 ['layer5.0.conv1.weight']" in str(e.value)


def test_unrelated_checkpoint_never_loads(tmp_path):
    torch.save({"encoder.weight": torch.zeros(3, 3), "decoder.bias": torch.zeros(3)},
               tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="missing keys"):
        load_backbone(tmp_path / "x.pth", "resnet18")
    with pytest.raises(CheckpointError, match="infer the architecture"):
        load_backbone(tmp_path / "x.pth", None)


class Namespaceish:  # an arbitrary class, as older training scripts pickled their args
    pass


def test_pickle_needs_opt_in(tmp_path, r18):
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": dict(r18.state_dict()), "args": Namespaceish()}, path)
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_backbone(path, "resnet18")
    with pytest.warns(UserWarning, match="weights_only=False"):
        assert len(load_backbone(path, "resnet18", allow_pickle=True)) == 120


def test_missing_file_and_head(tmp_path, r18):
    with pytest.raises(CheckpointError, match="not found"):
        load_backbone(tmp_path / "nope.pth")
    torch.save({k: v for k, v in r18.state_dict().items() if not k.startswith("fc.")},
               tmp_path / "h.pth")
    with pytest.raises(CheckpointError, match="no classifier head"):
        load_classifier(tmp_path / "h.pth")
    save_backbone(tmp_path / "ok.pth", r18, {"arch": "resnet18"})
    with pytest.raises(CheckpointError, match="fc.weight has 7 classes"):
        load_classifier(tmp_path / "ok.pth", num_classes=10)


def test_infer_arch_and_model_outputs(tmp_path, r18):
    assert infer_arch(r18.state_dict()) == "resnet18"
    assert infer_arch(build_resnet("resnet50").state_dict()) == "resnet50"
    save_backbone(tmp_path / "b.pth", r18, {"arch": "resnet18"})
    model, meta = resnet_from_checkpoint(tmp_path / "b.pth")
    x = torch.rand(2, 3, 32, 32)
    r18.eval(), model.eval()
    assert torch.equal(model(x), r18(x)) and meta["num_classes"] == 7
