"""The small-image track: CIFAR / TinyImageNet readers on the toy world's files, the restricted
unpickler, the papers' small networks (parameter counts derived by hand) in the checkpoint
contract, and their use by pretraining and the robustness evaluation."""

import pickle

import numpy as np
import pytest
import torch

from mixup_transfer.core.data import DataError
from mixup_transfer.core.smalldata import detect_layout, open_classification, read_cifar_pickle

# ------------------------------------------------------------------------------------------------
# readers

def test_cifar_read_back_equals_the_renderer(small_toy_world):
    from mixup_transfer.toyworld.cifar import cifar_split
    from mixup_transfer.toyworld.vocab import PRESETS, small_image_classes

    for _kind, n, key in (("cifar10", 10, "cifar10"), ("cifar100", 100, "cifar100")):
        per = PRESETS["tiny"]["cifar_train"] if n == 10 else max(2, PRESETS["tiny"]["cifar_train"]
                                                                 // 5)
        images, labels = cifar_split(0, n, per, test=False)
        ds = open_classification(small_toy_world, "train", key)
        assert ds.classes == [c.name for c in small_image_classes(n)]
        assert ds.targets == labels and len(ds) == n * per
        assert np.array_equal(ds.data, images)  # raw uint8: exactly the rendered pixels
        assert np.array_equal(np.asarray(ds.image(7)), images[7]) and ds[7][1] == labels[7]
        per_test = (
            PRESETS["tiny"]["cifar_test"]
            if n == 10
            else max(1, PRESETS["tiny"]["cifar_test"] // 5)
        )
        test = open_classification(small_toy_world, "val", key)  # val = CIFAR's test batch
        assert np.array_equal(test.data, cifar_split(0, n, per_test, test=True)[0])


def test_cifar_plane_order_by_hand(tmp_path):
    """b"data" rows are the R, G, B planes, each row-major: pixel (row 1, col 2) of plane c is at
    c*1024 + 34."""
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    row = np.zeros((1, 3072), np.uint8)
    row[0, 0 * 1024 + 34], row[0, 1 * 1024 + 34], row[0, 2 * 1024 + 34] = 10, 20, 30
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(root / name, "wb") as f:
            # protocol 2 bytes: _codecs.encode
            pickle.dump({b"data": row, b"labels": [3]}, f, protocol=2)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f, protocol=2)
    ds = open_classification(tmp_path, "train")
    assert len(ds) == 5 and ds.targets == [3] * 5 and ds.classes[3] == "c3"
    assert ds.data[0, 1, 2].tolist() == [10, 20, 30] and int(ds.data.sum()) == 5 * 60


def test_real_cifar_pickles_numpy_globals_load(tmp_path):
    """The real files (Python 2 cPickle) name numpy.core.multiarray._reconstruct; numpy 2 writes
    numpy._core."""
    data = pickle.dumps({b"data": np.arange(6, dtype=np.uint8).reshape(2, 3)}, protocol=2)
    legacy = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert legacy != data
    (tmp_path / "b").write_bytes(legacy)
    assert read_cifar_pickle(tmp_path / "b")[b"data"].tolist() == [[0, 1, 2], [3, 4, 5]]


def test_cifar_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "data_batch_1"
    with open(path, "wb") as f:
        pickle.dump({b"data": Boom()}, f)
    with pytest.raises(DataError, match=r"data_batch_1: refused to unpickle .*open"):
        read_cifar_pickle(path)
    assert not marker.exists()


def _as_jpeg(img, tmp_path):
    """The rendered image through the writer's JPEG encoding, decoded as the reader decodes."""
    from mixup_transfer.core.data import read_image
    from mixup_transfer.toyworld.render import _write_jpeg

    _write_jpeg(tmp_path / "x.JPEG", img)
    return np.asarray(read_image(tmp_path / "x.JPEG"))


def test_tinyimagenet_read_back_equals_the_renderer(small_toy_world, tmp_path):
    from mixup_transfer.toyworld.tinyimagenet import TINY_CLASSES, _scene
    from mixup_transfer.toyworld.vocab import imagenet_wnids

    train = open_classification(small_toy_world, "train", "tinyimagenet")
    assert train.classes == imagenet_wnids(TINY_CLASSES) and len(train) == 2 * TINY_CLASSES
    assert train.names[train.classes[0]] == "red solid circle"  # the ImageNet world's first class
    for i in (0, 5, 399):
        k, j = divmod(i, 2)
        img, objs = _scene(0, "tiny_train", k * 2 + j, k)
        got = np.asarray(train.image(i)).astype(float)
        assert train.targets[i] == k and got.shape == (64, 64, 3)
        # the real files are JPEGs too (quality 90 here)
        assert np.array_equal(got, _as_jpeg(img, tmp_path))
        assert np.abs(got - img).mean() < 8.0
        # 0-based inclusive on disk, +1 on read
        assert train.boxes(i)[0].tolist() == list(objs[0].box)
    val = open_classification(small_toy_world, "val", "tinyimagenet")
    name = val.samples[0][0].rsplit("/", 1)[1]
    idx = int(name[4:-5])
    img, objs = _scene(0, "tiny_val", idx, val.targets[0])
    assert np.array_equal(np.asarray(val.image(0)), _as_jpeg(img, tmp_path))
    assert val.boxes(0)[0].tolist() == list(objs[0].box)


def test_detect_layout(small_toy_world, tmp_path):
    assert detect_layout(small_toy_world / "cifar-100-python") == ("cifar100", small_toy_world
                                                                   / "cifar-100-python")
    assert detect_layout(small_toy_world, "tinyimagenet")[0] == "tinyimagenet"
    with pytest.raises(DataError, match="several layouts"):
        detect_layout(small_toy_world)
    assert detect_layout(tmp_path) == ("imagenet", tmp_path)
    with pytest.raises(DataError, match="no cifar10 layout"):
        detect_layout(tmp_path, "cifar10")


# ------------------------------------------------------------------------------------------------
# models

def test_parameter_counts_by_hand():
    from mixup_transfer.core.checkpoint import build_resnet

    # PreAct-ResNet-18, 10 classes (BN: 2 per channel; convs without bias; 1x1 projection without
    # BN):
    #   conv1 3*64*9                                                                  =      1,728
    #   layer1: 2 x (bn 128 + conv 36,864 + bn 128 + conv 36,864)                     =    147,968
    #   layer2: (128 + 73,728 + 256 + 147,456 + proj 8,192) + (256 + 147,456 + 256 + 147,456)
    #   =    525,184
    #   layer3: (256 + 294,912 + 512 + 589,824 + 32,768) + (512 + 589,824 + 512 + 589,824)
    #   =  2,098,944
    #   layer4: (512 + 1,179,648 + 1,024 + 2,359,296 + 131,072) + (1,024 + 2,359,296 + 1,024 +
    #   2,359,296) = 8,392,192 fc 512*10 + 10
    #   =      5,130 total
    #   = 11,171,146
    assert sum(p.numel() for p in build_resnet("preactresnet18", 10).parameters()) == 11_171_146
    # WRN-16-8, 10 classes: (16 - 4) / 6 = 2 blocks per group, widths 128, 256, 512:
    #   conv1 3*16*9                                                                  =        432
    #   group1: (bn 32 + conv 16*128*9 = 18,432 + bn 256 + conv 147,456 + proj 2,048) + (256 +
    #   147,456 + 256 + 147,456)
    #         = 168,224 + 295,424                                                    =    463,648
    #   group2 (as PreAct layer3 above)                                               =  2,098,944
    #   group3 (as PreAct layer4 above)                                               =  8,392,192
    #   final bn 2*512 = 1,024; fc 5,130                                              =      6,154
    #   total                                                                          = 10,961,370
    assert sum(p.numel() for p in build_resnet("wrn16_8", 10).parameters()) == 10_961_370
    # CIFAR-stem ResNet-18 = torchvision resnet18 (11,689,512 with 1000 classes) - fc 513,000 + fc
    # 5,130
    #   - (7x7 stem 9,408 - 3x3 stem 1,728)                                          = 11,173,962
    assert sum(p.numel() for p in build_resnet("resnet18_cifar", 10).parameters()) == 11_173_962


@pytest.mark.parametrize("arch,maps",
                         [("preactresnet18", [64, 128, 256, 512]),
                          ("wrn16_8", [128, 256, 512, 512]),
                                       ("resnet18_cifar", [64, 128, 256, 512])])
def test_stage_shapes_at_32_and_64_px(arch, maps):
    from pretrain.methods import ResNetStages

    net = ResNetStages(arch, 100).eval()
    sides = [32, 16, 8, 8] if arch == "wrn16_8" else [32, 16, 8, 4]
    for size in (32, 64):
        x = torch.rand(2, 3, size, size)
        for k in range(1, 5):
            h = net.forward_to(x, k)
            assert tuple(h.shape) == (2, maps[k - 1], sides[k - 1] * size // 32,
                                      sides[k - 1] * size // 32)
            assert torch.allclose(net.forward_from(h, k), net.features(x), atol=1e-5)
        assert tuple(net(x).shape) == (2, 100)


@pytest.mark.parametrize("arch", ["preactresnet18", "wrn16_8", "resnet18_cifar"])
def test_checkpoint_contract_and_robustness_model(arch, tmp_path):
    """save_backbone -> load_classifier -> the robustness wrapper reproduces the pretraining
    model's logits."""
    from mixup_transfer.core.checkpoint import infer_arch, load_backbone, save_backbone
    from pretrain.methods import ResNetStages
    from transfer.robustness.model import load_classifier_model

    torch.manual_seed(0)
    net = ResNetStages(arch, 10).eval()
    save_backbone(tmp_path / "b.pth", net.net, {"arch": arch, "method": "erm"})
    assert infer_arch(load_backbone(tmp_path / "b.pth", arch=None)) == arch
    model, meta = load_classifier_model(tmp_path / "b.pth", num_classes=10)
    assert meta["arch"] == arch
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), net(x), atol=1e-5)
        fmap, logits = model.features_logits(x)
        assert torch.allclose(fmap, net.features(x), atol=1e-5) and torch.allclose(logits, net(x),
                                                                                   atol=1e-5)


# ------------------------------------------------------------------------------------------------
# stages

def test_pretrain_on_toy_cifar_then_robustness(small_toy_world, tmp_path, one_thread):
    from pretrain.task import run
    from transfer.robustness.evaluate import evaluate_checkpoint

    cfg = {"data": {"root": str(small_toy_world / "cifar-10-batches-py"), "crop_size": 32,
                    "num_workers": 0},
           "model": {"arch": "preactresnet18"}, "method": {"name": "input_mixup"},
           "optim": {"batch_size": 20, "epochs": 1, "milestones": [1]},
           "runtime": {"device": "cpu", "precision": "fp32", "flops": False, "figures": False}}
    metrics = run(cfg, None, tmp_path / "run")
    assert metrics["arch"] == "preactresnet18" and metrics["steps"] == 100 // 20
    header = [ln for ln in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
              if "train_images" in ln][0]
    assert '"num_classes": 10' in header
    out = evaluate_checkpoint(tmp_path / "run" / "backbone.pth",
                              small_toy_world / "cifar-10-batches-py",
                              suites="clean,calibration,fgsm", image_size=32, resize=32,
                              batch_size=10, device="cpu", ood_noise=())
    assert out["n_images"] == 30 and out["arch"] == "preactresnet18"
    assert 0 <= out["clean"]["top1_err"] <= 100


def test_padded_crop_by_hand():
    from PIL import Image

    from pretrain.data import padded_train_transform

    img = Image.fromarray(np.full((32, 32, 3), 200, np.uint8))
    torch.manual_seed(0)
    crops = [padded_train_transform(32, 4, hflip=True)(img) for _ in range(20)]
    assert all(tuple(c.shape) == (3, 32, 32) for c in crops)
    # zero padding: a crop offset by (dy, dx) holds 32*32 - (32-|dy|)(32-|dx|) black pixels, never
    # more than 4*32 + 4*32 - 16 = 240 per channel; some crops are shifted
    black = [int((c[0] == 0).sum()) for c in crops]
    assert max(black) <= 240 and max(black) > 0
    assert all(torch.allclose(c[c > 0], torch.tensor(200 / 255)) for c in crops)


def test_preactresnet18_alignmixup_parameters_and_checkpoint():
    """The AlignMixup code's PreAct-ResNet-18 (shashankvkt/AlignMixup_CVPR22 at ec01a68,
    cifar10_100/models/ resnet.py): preactresnet18 plus the stem's BatchNorm2d(64), i.e. 11,171,146
    + 2 * 64 = 11,171,274 parameters for 10 classes (its other difference, identity shortcuts from
    the pre-activated input, has none); a checkpoint of it is recognised (a stem BN, and projection
    shortcuts without BN unlike resnet18_cifar)."""
    from mixup_transfer.core.checkpoint import build_resnet, infer_arch

    net = build_resnet("preactresnet18_alignmixup", 10).eval()
    assert sum(p.numel() for p in net.parameters()) == 11_171_146 + 2 * 64 == 11_171_274
    assert isinstance(net.bn1, torch.nn.BatchNorm2d) and isinstance(net.relu, torch.nn.ReLU)
    assert infer_arch(net.state_dict()) == "preactresnet18_alignmixup"
    assert infer_arch(build_resnet("resnet18_cifar", 10).state_dict()) == "resnet18_cifar"


def test_preactresnet18_alignmixup_equals_the_alignmixup_network():
    """tests/fixtures/alignmix_preactresnet18.npz: the AlignMixup code's ResNet18
    (cifar10_100/models/resnet.py at ec01a68) with deterministic weights
    (tools/make_method_fixtures.py `fill_by_name`, keyed by parameter name):
    preactresnet18_alignmixup given the same weights gives the same layer4 map (eval mode; float32
    rounding of a different summation order)."""
    import importlib.util
    from pathlib import Path

    from mixup_transfer.core.checkpoint import build_resnet

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("fixture_tool",
                                                  root / "tools" / "make_method_fixtures.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    d = np.load(root / "tests" / "fixtures" / "alignmix_preactresnet18.npz")
    net = build_resnet("preactresnet18_alignmixup", 10).eval()
    trunk = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    net.load_state_dict({**net.state_dict(), **tool.fill_by_name(trunk)})
    with torch.no_grad():
        h = net.maxpool(net.relu(net.bn1(net.conv1(torch.from_numpy(d["x"])))))
        fmap = net.layer4(net.layer3(net.layer2(net.layer1(h))))
    ref = torch.from_numpy(d["layer4"])
    assert fmap.shape == ref.shape == (2, 512, 4, 4)
    assert torch.allclose(fmap, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    plain = build_resnet("preactresnet18", 10).eval()
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("bn1.")})
    with torch.no_grad():
        other = plain.layer4(
            plain.layer3(plain.layer2(plain.layer1(plain.conv1(torch.from_numpy(d["x"])))))
        )
    assert not torch.allclose(other, ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
