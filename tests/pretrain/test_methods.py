"""pretrain.methods: registry, the fast paths against the pure functions, and a few training steps
of every method on the tiny toy world."""

import mixing_reference as refmath
import numpy as np
import pytest
import torch

from pretrain.methods import ResNetStages, build_method, method_knobs
from pretrain.methods import alignmix as am
from pretrain.methods import base as shared
from pretrain.methods import multimix as mm
from pretrain.methods import puzzlemix_graphcut as graphcut

C = 10


@pytest.fixture(scope="module")
def batch(toy_world):
    from mixup_transfer.core.data import ImageNetFolder
    from pretrain.data import val_transform

    ds = ImageNetFolder(toy_world / "imagenet", "train", transform=val_transform(64, 64),
                        boxes=None)
    idx = [int(i * len(ds) / 8) for i in range(8)]
    images = torch.stack([ds[i][0] for i in idx])
    labels = torch.tensor([ds[i][1] for i in idx])
    return images, labels


def make(name, seed=0, **knobs):
    torch.manual_seed(seed)
    m = build_method(name, ResNetStages("resnet18", C), C, **knobs)
    m.generator = torch.Generator()
    return m


def test_registry_errors_list_valid_names():
    with pytest.raises(ValueError, match="valid methods: .*multimix"):
        build_method("mixmulti", ResNetStages("resnet18", C), C)
    with pytest.raises(ValueError, match="valid: .*alpha_high"):
        build_method("multimix", ResNetStages("resnet18", C), C, nn=5)
    assert method_knobs("multimix")["n"] == 1000
    # alignmix is the released code's variant: its knobs are the code's constants (no head, modes
    # or resolution)
    assert method_knobs("alignmix") == {"alpha": 2.0, "eps": 0.1, "n_iters": 100, "tol": 0.1,
                                        "dense_loss": False}
    assert (
        method_knobs("alignmix_stage2")["resolution"] == 4
        and method_knobs("alignmix_stage2")["tol"] is None
    )
    with pytest.raises(ValueError, match=r"'alignmix_official' was renamed: use alignmix \(the "
                       r"AlignMixup released"):
        build_method("alignmix_official", ResNetStages("resnet18", C), C)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['head'\] for method 'alignmix'"):
        build_method("alignmix", ResNetStages("resnet18", C), C, head="fc")
    assert method_knobs("dense_multimix")["attention"] == "gap_l1relu"


def test_multi_mix_is_refused_with_the_name_of_multi_interp():
    """Two papers, two unmistakable names: `multimix` (Venkataramanan et al.) and `multi_interp`
    (Shen et al.); the name `multi_mix` is refused, by the registry and at a config's edge, with
    the name to use."""
    from mixup_transfer.core.config import ConfigError
    from pretrain.methods import METHODS, MultiMix, build_configured, check_method_config
    from pretrain.methods.multi_interp import MultiInterp

    assert (
        METHODS["multi_interp"] is MultiInterp
        and METHODS["multimix"] is MultiMix
        and "multi_mix" not in METHODS
    )
    with pytest.raises(ValueError, match=r"'multi_mix' was renamed: use multi_interp"):
        build_method("multi_mix", ResNetStages("resnet18", C), C, k=2)
    with pytest.raises(ValueError, match=r"'multi_mix' was renamed: use multi_interp"):
        method_knobs("multi_mix")
    with pytest.raises(ConfigError, match=r"method.name: unknown method 'multi_mix' \(renamed: "
                       r"use multi_interp"):
        check_method_config("multi_mix", {"k": 2})
    with pytest.raises(ConfigError, match=r"renamed: use multi_interp"):
        build_configured("multi_mix", ResNetStages("resnet18", C), C, {"k": 2})


def test_model_is_plain_torchvision_with_normalisation_inside():
    import torchvision

    m = ResNetStages("resnet18", C)
    ref = torchvision.models.resnet18(num_classes=C)
    assert list(m.net.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(m.net.state_dict())
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    m.eval(), ref.eval()
    assert torch.allclose(m(x), ref((x - mean) / std), atol=1e-5)
    # stage split: forward_from(forward_to(x, k), k) is the full map for every k
    for k in range(5):
        assert torch.allclose(m.forward_from(m.forward_to(x, k), k), m.features(x), atol=1e-5)


def test_multimix_fast_path_equals_pure_function(batch):
    images, labels = batch
    m = make("multimix", prob=1.0, n=200).eval()
    m.seed(7)
    loss = m(images, labels)["loss"]
    # replay the same draws with the pure functions: Lambda from the device stream (the branch is a
    # host draw)
    g = torch.Generator().manual_seed(7)
    lam = shared.dirichlet_weights(8, 200, 0.5, 2.0, g)
    z = m.model.pool(m.model.features(images))
    z_mix, y_mix = refmath.multimix(z, shared.one_hot(labels, C), lam)
    ref = shared.soft_cross_entropy(m.model.fc(z_mix), y_mix)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_dense_multimix_fast_path_equals_pure_function(batch):
    images, labels = batch
    m = make("dense_multimix", prob=1.0, n=100).eval()
    m.seed(3)
    loss = m(images, labels)["loss"]
    g = torch.Generator().manual_seed(3)  # the device stream; the branch draw is a host draw
    fmap = m.model.features(images)
    z = fmap.flatten(2)
    y = shared.one_hot(labels, C)
    lam = shared.dirichlet_weights(8, 100, 0.5, 2.0, g, sets=z.shape[-1])
    z_mix, y_mix, weight = refmath.dense_multimix(z, y, mm.dense_attention(z), lam)
    logits = torch.einsum("ndr,cd->ncr", z_mix, m.model.fc.weight) + m.model.fc.bias.view(1, -1, 1)
    ref = refmath.weighted_dense_cross_entropy(logits, y_mix, weight)
    assert z.shape[-1] == 4  # 64 px -> 2x2 layer4 map
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_embedding_mixing_by_logits_equals_mixing_embeddings(batch):
    images, labels = batch
    m = make("multi_interp", base="manifold", layers=[5], k=5).eval()
    m.seed(11)
    loss = m(images, labels)["loss"]
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(11))  # device stream
    # host stream: the sorted lams, then the layer choice (one option)
    host = np.random.default_rng(11)
    lams = torch.tensor(np.sort(host.beta(2.0, 2.0, 5)), dtype=torch.float32)
    z = m.model.pool(m.model.features(images))
    y = shared.one_hot(labels, C)
    ref = shared.soft_cross_entropy(m.model.fc(shared.multi_mixup(z, perm, lams)),
                                    shared.multi_mixup(y, perm, lams))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


VARIANTS = [
    ("erm", {}), ("erm", {"dense_loss": True}), ("input_mixup", {}), ("manifold_mixup", {}),
    ("cutmix", {}), ("puzzlemix", {"solver": "swap"}), ("puzzlemix", {}),
    ("multimix", {"prob": 1.0}), ("multimix", {"prob": 1.0, "m": 3, "dense_loss": True}),
    ("dense_multimix", {"prob": 1.0}),
    ("dense_multimix", {"prob": 1.0, "attention": "cam_softmax"}),
    ("multi_interp", {"base": "input", "k": 3}), ("multi_interp", {"base": "manifold", "k": 3}),
    ("multi_interp", {"base": "cutmix", "k": 3}), ("multi_interp", {"base": "puzzlemix", "k": 2}),
    ("multi_interp", {"base": "manifold", "k": 2, "large_batch": True}),
    ("alignmix_stage2", {"modes": ["feat"], "resolution": 1}),
    ("alignmix_stage2", {"modes": ["feat_rev"], "resolution": 1}),
    ("alignmix", {"dense_loss": True}), ("alignmix", {}),
    ("alignmix_ae", {"modes": ["clean"], "resolution": 1, "decoder_size": 32}),
    ("alignmix_ae", {"resolution": 1, "decoder_size": 32}),
]


IDS = [f"{n}-{'-'.join(map(str, k.values()))}" for n, k in VARIANTS]


@pytest.mark.parametrize("name,knobs", VARIANTS, ids=IDS)
def test_every_method_trains(batch, name, knobs):
    """Same batch and same draws every step: the loss must go down."""
    images, labels = batch
    # quick
    images = torch.nn.functional.interpolate(images, size=32, mode="bilinear", antialias=True)
    m = make(name, **knobs)
    opt = torch.optim.SGD(m.parameters(), lr=0.02, momentum=0.9)
    losses = []
    for _ in range(3):
        m.seed(5)
        out = m(images, labels)
        loss = sum(v for k, v in out.items() if k.startswith("loss"))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses


def test_bench_returns_ratios():
    from pretrain.bench import run_pretrain_bench

    out = run_pretrain_bench(arch="resnet18", batch=4, size=32, num_classes=10, n=10, repeats=1,
                             warmup=0, methods=["multimix"], clock="process")
    assert (
        set(out["step_time_ratio"]) == {"erm", "multimix"} and out["step_time_ratio"]["erm"] == 1.0
    )
    assert out["targets"]["multimix"]["target"] == 1.03
    out = run_pretrain_bench(arch="resnet18", batch=4, size=32, num_classes=10, repeats=1,
                             warmup=0, methods=["puzzlemix", "puzzlemix_swap"], clock="process")
    assert out["targets"]["puzzlemix_swap"]["target"] == 2.0  # the built-in solver is always timed
    assert ("puzzlemix" in out["step_time_ratio"]) == graphcut.have_gco()


def test_alignmix_feat_with_lam_one_is_clean_and_modes_validated(batch):
    images, labels = batch
    m = make("alignmix_stage2", modes=["feat"], alpha=1.0, resolution=2).eval()
    with pytest.raises(ValueError, match="valid"):
        make("alignmix_stage2", modes=["pixels"])
    with pytest.raises(ValueError, match="resolution 4 is larger"):
        # 64 px -> 2 x 2 map, the paper's 4 x 4 cannot be pooled from it
        make("alignmix_stage2")(images, labels)
    # with lam forced to 1 the aligned partner has no weight: loss = clean cross-entropy of the fc
    # head
    m._beta = lambda a: 1.0
    clean = torch.nn.functional.cross_entropy(m.predict(images), labels)
    assert m(images, labels)["loss"].item() == pytest.approx(clean.item(), rel=1e-5)


def test_stage2_encoder_is_outside_the_backbone_starts_as_gap_and_exports_its_scale(batch):
    import torchvision

    images, labels = batch
    m = make("alignmix_stage2", resolution=2).eval()
    assert m.encoder2.linear.in_features == 512 * 2 * 2 and m.encoder2.linear.out_features == 512
    keys = list(m.model.net.state_dict())
    # exported backbone unchanged
    assert keys == list(torchvision.models.resnet18(num_classes=C).state_dict())
    assert "encoder2.linear.weight" in m.state_dict() and not any("encoder2" in k for k in keys)
    a = m.model.features(images)  # 2 x 2 already
    # initialised to global average pooling: e = GAP(A) at step 0, as the released code's head
    assert torch.allclose(m.encoder2(a), a.mean((2, 3)), atol=1e-6)
    with torch.no_grad():
        m.encoder2.linear.weight.normal_(0, 0.02)
    ref = m.model.fc(m.encoder2.linear(a.flatten(1) / 2))  # e = W vec(A) / r + bias
    assert torch.allclose(m.predict(images), ref, atol=1e-6)
    # mixup_transfer.core.checkpoint's pooled_linear: weight @ vec(A) + bias, the 1 / r folded in
    head = m.export_head()
    assert torch.allclose(a.flatten(1) @ head["weight"].T + head["bias"], m.encoder2(a), atol=1e-5)
    # on a 7 x 7 map the tensor is average-pooled to the paper's 4 x 4 first
    big = make("alignmix_stage2", resolution=4)
    assert big.tensor_of(torch.rand(2, 512, 7, 7)).shape == (2, 512, 4, 4)


def test_gap_head_aligned_mixing_equals_embedding_mixing(batch):
    """With the released code's GAP head the alignment is invisible (columns of R sum to 1): the
    feat mode's loss equals mixup of the pooled embeddings with the same draws, to 1e-6. With a
    trained stage-2 encoder it is not. The feature maps are crafted so that each partner is its
    example mirrored (R is a permutation, not identity; a randomly initialised ResNet's maps are
    position-dominated and align to the identity)."""
    images, labels = batch
    torch.manual_seed(3)
    half = torch.relu(torch.randn(4, 512, 2, 2))
    feats = torch.cat([half, half.flip(-1)])
    perm = torch.tensor([4, 5, 6, 7, 0, 1, 2, 3])
    y = shared.one_hot(labels, C)
    released = make("alignmix").eval()
    released.model.features = lambda x: feats
    released._perm, released._mode, released._beta = lambda b: perm, lambda: "feat", lambda a: 0.3
    e_mix = 0.3 * feats.mean((2, 3)) + 0.7 * feats[perm].mean((2, 3))
    ref = shared.soft_cross_entropy(released.model.fc(e_mix), 0.3 * y + 0.7 * y[perm])
    assert released(images, labels)["loss"].item() == pytest.approx(ref.item(), abs=1e-6)
    losses = {}
    for mode in ("feat", "embedding"):
        m = make("alignmix_stage2", modes=[mode], resolution=2).eval()
        with torch.no_grad():
            m.encoder2.linear.weight.normal_(0, 0.05)  # away from its GAP initialisation
        m.model.features = lambda x: feats
        m._perm = lambda b: perm
        m.seed(4)
        losses[mode] = m(images, labels)["loss"].item()
    assert abs(losses["feat"] - losses["embedding"]) > 1e-3


def test_alignmix_modes_and_step_equal_the_released_code(batch):
    """Released resnet50_classifier.py / resnet18_classifier.py (AlignMixup_CVPR22 at ec01a68):
    layer_mix = randint(0, 1) (0: input mixup), else mixup_aligned with align_mix = randint(0, 1):
    input 1/2, branch 0 1/4, branch 1 1/4, then GAP of the full map and the classifier. One step
    replayed with the pure functions (the official mixup_aligned is pinned by
    tests/pretrain/test_mixing.py's fixtures)."""
    from collections import Counter

    images, labels = batch
    m = make("alignmix").eval()
    assert m.encoder2 is None and m.export_head() is None and "AlignMixup_CVPR22" in m.variant
    m.seed(0)
    freq = Counter(m._mode() for _ in range(4000))
    assert freq["input"] / 4000 == pytest.approx(0.5, abs=0.03)
    assert freq["feat"] / 4000 == pytest.approx(0.25, abs=0.03)
    assert freq["feat_rev"] / 4000 == pytest.approx(0.25, abs=0.03)
    for seed in range(40):  # find a branch-1 step
        m.seed(seed)
        if m._mode() == "feat_rev":
            break
    m.seed(seed)
    out = m(images, labels)
    host = np.random.default_rng(seed)  # host stream: the two mode draws, then lam
    host.integers(2), host.integers(2)
    lam = float(host.beta(2.0, 2.0))
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(seed))  # device stream
    a = m.model.features(images)
    mixed, info = am.aligned_mix(a.flatten(2), perm, lam, 1, 0.1, 100, tol=0.1)
    y = shared.one_hot(labels, C)
    ref = shared.soft_cross_entropy(m.model.fc(mixed.mean(-1)), lam * y + (1 - lam) * y[perm])
    assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-5)
    assert out["stat_sinkhorn_iters"] == info["iters"] and "stat_sinkhorn_row_err" in out


def test_alignmix_ae_clean_case_trains_the_autoencoder_only(batch):
    images, labels = batch
    m = make("alignmix_ae", modes=["clean"], resolution=2, decoder_size=64)
    out = m(images, labels)
    x_hat = m.decoder(m.embed(m.tensor_of(m.model.features(images))))
    assert x_hat.shape == images.shape
    assert out["loss"].item() == pytest.approx(torch.nn.functional.mse_loss(x_hat, images).item(),
                                               rel=1e-5)
    out["loss"].backward()
    assert m.model.fc.weight.grad is None  # the classifier is not in the clean case
    assert m.decoder.fc.weight.grad is not None and m.encoder2.linear.weight.grad is not None
    m.zero_grad(set_to_none=True)
    mixed = make("alignmix_ae", modes=["feat"], resolution=2, decoder_size=64)
    mixed(images, labels)["loss"].backward()
    assert mixed.decoder.fc.weight.grad is None  # decoded images never reach the classifier
    # the fifth case is drawn uniformly with the four AlignMix cases
    assert make("alignmix_ae", resolution=2).modes == ("clean", "input", "feat", "feat_rev",
                                                       "embedding")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_puzzlemix_saliency_as_the_official_script(batch):
    """Official train.py: model.eval(), mean cross-entropy of the clean batch, gradient w.r.t. the
    normalised input, sqrt(mean_c grad^2); BatchNorm statistics untouched, train mode restored."""
    import copy

    import torchvision

    from mixup_transfer.core.constants import IMAGENET_MEAN, IMAGENET_STD
    from pretrain.methods.puzzlemix import _puzzle_saliency

    images, labels = batch
    m = make("puzzlemix").train()
    before = copy.deepcopy(m.model.net.state_dict())
    sal = _puzzle_saliency(m, images, labels)
    assert m.model.training
    for k, v in m.model.net.state_dict().items():
        assert torch.equal(v, before[k]), k
    ref = torchvision.models.resnet18(num_classes=C)
    ref.load_state_dict(before)
    ref.eval()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    xn = ((images - mean) / std).requires_grad_(True)
    torch.nn.functional.cross_entropy(ref(xn), labels).backward()
    expect = torch.sqrt(torch.mean(xn.grad**2, dim=1))
    assert torch.allclose(sal, expect, rtol=1e-4, atol=1e-9 + 1e-4 * expect.abs().max().item())


SMALL_STEP_KNOBS = {"multimix": {"prob": 1.0}, "dense_multimix": {"prob": 1.0},
                    "puzzlemix": {"solver": "swap"},
                    "multi_interp": {"base": "puzzlemix", "k": 2, "puzzle": {"solver": "swap"}},
                    "alignmix_ae": {"decoder_size": 32}, "comixup": {"solver": "swap"},
                    "tokenmix": {"labels": "area", "patch_size": 4, "minimum_tokens": 1},
                    "supermix": {"max_iter": 2, "mask_w": 4}}


@pytest.fixture(scope="module")
def cifar_batch(small_toy_world):
    from mixup_transfer.core.smalldata import open_classification
    from pretrain.data import padded_val_transform

    ds = open_classification(small_toy_world, "train", "cifar10",
                             transform=padded_val_transform(32))
    images = torch.stack([ds[i][0] for i in range(4)])
    return images, torch.tensor([ds[i][1] for i in range(4)])


def _small_cases():
    from mixup_transfer.core.smallnets import SMALL_ARCHS
    from pretrain.methods import METHODS

    # the paper networks; preactresnet18_w16 is preactresnet18's code at width 16 (the toy CIFAR
    # pipeline runs every method on it), and there one lr-1e-3 step of cutmix on 4 images does not
    # lower the loss preactresnet18_alignmixup (the AlignMixup code's R-18) is selected by the
    # AlignMix configs only
    skip = ("preactresnet18_w16", "preactresnet18_alignmixup")
    # transmix: ViTs only
    cases = [(a, n) for a in SMALL_ARCHS if a not in skip for n in METHODS if n != "transmix"]
    return cases + [("preactresnet18_alignmixup", n)
                    for n in ("erm", "alignmix", "alignmix_stage2")]


@pytest.mark.parametrize("arch,name", _small_cases(), ids=[f"{a}-{n}" for a, n in _small_cases()])
def test_every_method_steps_on_the_small_image_models(cifar_batch, arch, name, one_thread):
    """One SGD step of every method on PreAct-ResNet-18, WRN-16-8 and the CIFAR-stem ResNet-18 at
    32 px (toy CIFAR-10 images): finite loss, finite non-zero gradients at both ends of the
    network, and with the same draws the loss is lower after the step."""
    images, labels = cifar_batch
    torch.manual_seed(0)
    m = build_method(name, ResNetStages(arch, C), C, **SMALL_STEP_KNOBS.get(name, {}))
    if m.needs_teacher:  # SuperMix: a frozen network of the same shape
        m.teacher = ResNetStages(arch, C)
    m.generator = torch.Generator()
    # small: the first-order decrease must show in one step
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    losses = []
    for step in range(2):
        m.generator.manual_seed(3)
        loss = sum(v for k, v in m(images, labels).items() if k.startswith("loss"))
        losses.append(loss.item())
        if step == 0:
            opt.zero_grad()
            loss.backward()
            last = (
                m.model.net.layer4.bn.weight
                if arch == "wrn16_8"
                else m.model.net.layer4[-1].conv2.weight
            )
            for p in (m.model.net.conv1.weight, last):
                assert (
                    p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
                )
            opt.step()
    assert all(v == v for v in losses)
    assert losses[1] < losses[0], losses


def test_the_report_names_each_methods_variant():
    from mixup_transfer.pipeline.report import variants_sentence
    from pretrain.methods import METHODS

    assert (
        METHODS["alignmix"].variant != METHODS["alignmix_stage2"].variant
        and METHODS["erm"].variant == ""
    )
    results = {
        "methods": {
            "erm": {"pretrain": [{"metrics": {"method_variant": ""}}]},
            "alignmix": {
                "pretrain": [{"metrics": {"method_variant": METHODS["alignmix"].variant}}]
            },
            "multimix": {},
        }
    }
    assert variants_sentence(results) == ["Method variants: `alignmix`: "
                                          f"{METHODS['alignmix'].variant}.", ""]
    assert variants_sentence({"methods": {"erm": {}}}) == []
