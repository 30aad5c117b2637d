"""pretrain.mixers: hand-computed mixes and targets, the vectorised boxes against the host
function, any batch size, per-example draws, no global RNG, and timm's targets as a reference."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretrain import mixers as M
from pretrain.methods import base as shared
from pretrain.methods import cutmix as cm


def const_images(values, size=8):
    """Image i is the constant values[i] (so a mixed pixel tells where it came from). -> [b, 3,
    size, size]"""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, size,
                                                                              size).clone()


def test_mixup_per_sample_by_hand():
    x = const_images([1.0, 2.0, 4.0], 2)
    draw = M.Draw(torch.tensor([1, 2, 0]), torch.tensor([0.25, 0.5, 1.0]))
    out, t = M.MixUp(num_classes=3, per_sample=True).apply(x, torch.tensor([0, 1, 2]), draw)
    assert torch.allclose(out[:, 0, 0, 0],
                          torch.tensor([0.25 * 1 + 0.75 * 2, 0.5 * 2 + 0.5 * 4, 4.0]))
    assert torch.allclose(t, torch.tensor([[0.25, 0.75, 0], [0, 0.5, 0.5], [0, 0, 1.0]]))


def test_label_smoothing_by_hand_and_pair_loss_equals_soft_loss():
    """s = 0.2, C = 4: 0.85 on the label, 0.05 elsewhere; lam 0.25 between labels 0 and 1 -> [0.25,
    0.65, .05, .05]. Cross-entropy is linear in the target, so interpolating two losses equals the
    loss of the mixed target."""
    y, draw = torch.tensor([0, 1]), M.Draw(torch.tensor([1, 0]), [0.25])
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    _, soft = M.MixUp(num_classes=4, label_smoothing=0.2).apply(x, y, draw)
    assert torch.allclose(soft[0], torch.tensor([0.25, 0.65, 0.05, 0.05]))
    _, pair = M.MixUp(targets="pair", label_smoothing=0.2).apply(x, y, draw)
    assert torch.equal(pair.y_b, torch.tensor([1, 0])) and torch.allclose(
        pair.lam, torch.tensor([0.25, 0.25])
    )
    logits = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    assert M.mixed_loss(logits, pair).item() == pytest.approx(M.mixed_loss(logits, soft).item(),
                                                              rel=1e-6)
    assert M.mixed_loss(logits, soft).item() == pytest.approx(
        F.cross_entropy(logits, soft).item(), rel=1e-6)  # torch's soft-target cross-entropy


def test_soft_targets_equal_timms():
    """timm's mixup_target (flip pairing, label smoothing) is the reference for the soft
    targets."""
    timm_mixup = pytest.importorskip("timm.data.mixup")
    y = torch.tensor([3, 1, 4, 1, 5, 9])
    ref = timm_mixup.mixup_target(y, 10, lam=0.3, smoothing=0.1)
    _, ours = M.MixUp(num_classes=10, label_smoothing=0.1).apply(torch.rand(6, 3, 2, 2), y,
                                                                 M.Draw(torch.arange(5, -1, -1),
                                                                        [0.3]))
    assert torch.allclose(ours, ref, atol=1e-7)


def test_vectorised_boxes_equal_the_host_function():
    """cutmix_boxes on n draws at once == cutmix.cutmix_box one by one (integer sizes included), on
    a non-square image, lam near 0 and 1 included."""
    g = torch.Generator().manual_seed(2)
    h, w, n = 37, 23, 400
    lam = torch.cat([torch.rand(n - 2, generator=g, dtype=torch.float64),
                     torch.tensor([0.0, 1.0])])
    centre = torch.stack([torch.randint(h, (n,), generator=g),
                          torch.randint(w, (n,), generator=g)], 1)
    boxes, kept = M.cutmix_boxes(h, w, torch.sqrt(1 - lam), centre)
    for i in range(n):
        box, k = cm.cutmix_box(h, w, float(lam[i]), centre=tuple(centre[i].tolist()))
        assert tuple(boxes[i].tolist()) == box and float(kept[i]) == pytest.approx(k, abs=1e-12)


def test_cutmix_per_sample_kept_fraction_is_the_label_weight():
    """Constant images: the fraction of pixels still showing image i is its label weight, per
    example."""
    b = 7  # odd
    x = const_images(range(10, 10 + b), 16)
    mixer = M.CutMix(num_classes=b, per_sample=True, generator=torch.Generator().manual_seed(3))
    draw = mixer.draw(x)
    out, t = mixer.apply(x, torch.arange(b), draw)
    own = (out[:, 0] == x[:, 0]).float().mean((1, 2))
    moved = draw.perm != torch.arange(b)
    assert torch.allclose(t[torch.arange(b), torch.arange(b)][moved], own[moved])
    assert len(set(draw.lam.tolist())) == b  # one lam per example
    assert torch.allclose(t.sum(1), torch.ones(b))


def test_keep_masks_equal_the_host_box_mask():
    boxes = [(0, 5, 0, 7), (2, 9, 3, 7), (0, 0, 0, 0), (0, 12, 0, 10), (11, 12, 9, 10)]
    masks = M.keep_masks(12, 10, torch.tensor(boxes))
    for i, box in enumerate(boxes):
        assert torch.equal(masks[i:i + 1], cm.box_mask(12, 10, box))


def test_one_host_box_and_the_device_mask_paste_the_same():
    x = torch.rand(5, 3, 12, 12, generator=torch.Generator().manual_seed(4))
    perm = torch.tensor([4, 0, 1, 2, 3])
    by_slice = M.paste_boxes(x, perm, (2, 9, 3, 7))
    by_mask = M.paste_boxes(x, perm, torch.tensor([[2, 9, 3, 7]]))
    assert torch.equal(by_slice, by_mask)
    assert torch.equal(by_slice[1, :, 2:9, 3:7],
                       x[0, :, 2:9, 3:7]) and torch.equal(by_slice[1, :, :2], x[1, :, :2])


@pytest.mark.parametrize("b", [1, 2, 5])
@pytest.mark.parametrize("kind", ["mixup", "cutmix", "mixup_elem", "cutmix_elem"])
def test_any_batch_size(kind, b):
    cls = M.MixUp if kind.startswith("mixup") else M.CutMix
    mixer = cls(num_classes=3, per_sample=kind.endswith("elem"),
                generator=torch.Generator().manual_seed(b))
    x, y = torch.rand(b, 3, 8, 8), torch.randint(3, (b,))
    out, t = mixer(x, y)
    assert out.shape == x.shape and torch.allclose(t.sum(1), torch.ones(b))
    if b == 1:  # the only partner is itself: nothing changes
        assert torch.allclose(out, x) and torch.equal(t, shared.one_hot(y, 3))


def test_draws_come_from_the_generator_only():
    x, y = torch.rand(6, 3, 8, 8), torch.randint(5, (6,))
    state = torch.get_rng_state()
    outs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        outs.append(M.CutMix(num_classes=5, per_sample=True, seed=9)(x, y))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    torch.set_rng_state(state)
    before = torch.get_rng_state()
    M.MixUp(num_classes=5, per_sample=True, generator=torch.Generator().manual_seed(1))(x, y)
    assert torch.equal(before, torch.get_rng_state())  # the global generator was not touched


def test_prob_zero_leaves_the_batch_clean():
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    for cls in (M.MixUp, M.CutMix):
        out, t = cls(num_classes=4, per_sample=True, prob=0.0)(x, y)
        assert torch.equal(out, x) and torch.equal(t, shared.one_hot(y, 4))


def test_multi_mix_cutmix_nested_boxes_host_and_tensor_draws_agree():
    """K nested boxes sharing a centre: host draws (the trainer's) and tensor draws give the same
    images, and block k keeps 1 - area_k of the first image (cutmix.nested_box_list)."""
    x = const_images([1.0, 2.0, 3.0], 16)
    lams, centre = [0.1, 0.4, 0.8], (6, 9)
    mixer = M.MultiMixK(M.CutMix(num_classes=3), k=3)
    host = mixer.apply(x, torch.arange(3), M.Draw(torch.tensor([2, 0, 1]), lams, centre))
    dev = mixer.apply(x, torch.arange(3),
                      M.Draw(torch.tensor([2, 0, 1]), torch.tensor(lams, dtype=torch.float64),
                                                 torch.tensor([centre])))
    assert torch.equal(host[0], dev[0]) and torch.allclose(host[1], dev[1])
    _, kept = cm.nested_box_list(16, 16, lams, centre)
    own = (host[0][:, 0] == x[:, 0].repeat(3, 1, 1)).float().mean((1, 2))
    assert torch.allclose(own, torch.tensor(kept, dtype=torch.float32).repeat_interleave(3))
    assert torch.allclose(host[1][torch.arange(9), torch.arange(3).repeat(3)], own)


def test_multi_mix_mixup_is_k_interpolations():
    x = const_images([1.0, 3.0], 2)
    out, t = M.MultiMixK(M.MixUp(targets="pair"), k=2).apply(x, torch.tensor([0, 1]),
                                                             M.Draw(torch.tensor([1, 0]),
                                                                    [0.25, 0.75]))
    assert torch.allclose(out[:, 0, 0, 0], torch.tensor([0.25 * 1 + 0.75 * 3, 0.25 * 3 + 0.75 * 1,
                                                         0.75 * 1 + 0.25 * 3,
                                                         0.75 * 3 + 0.25 * 1]))
    assert torch.allclose(t.lam, torch.tensor([0.25, 0.25, 0.75, 0.75]))
    assert torch.equal(t.y_b, torch.tensor([1, 0] * 2))


def test_random_choice_per_example_takes_each_examples_pick():
    x, y = torch.rand(6, 3, 8, 8), torch.arange(6)
    mix, cut = M.MixUp(num_classes=6, per_sample=True), M.CutMix(num_classes=6, per_sample=True)
    chooser = M.RandomChoice([mix, cut], per_sample=True)
    draw = chooser.draw(x)
    draw.choice = torch.tensor([0, 1, 1, 0, 1, 0])
    out, t = chooser.apply(x, y, draw)
    xa, ta = mix.apply(x, y, draw.parts[0])
    xb, tb = cut.apply(x, y, draw.parts[1])
    pick = draw.choice.bool()
    assert torch.equal(out[~pick], xa[~pick]) and torch.equal(out[pick], xb[pick])
    assert torch.equal(t[~pick], ta[~pick]) and torch.equal(t[pick], tb[pick])
    per_batch = M.RandomChoice([mix, cut], p=[0.0, 1.0])
    assert isinstance(per_batch.mixers[int(per_batch.draw(x).choice)], M.CutMix)


def test_puzzlemix_saliency_callback_and_bad_inputs():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    mixer = M.PuzzleMix(M.gradient_saliency(net), num_classes=3, grids=(4,), solver="swap")
    out, t = mixer(x, y)
    assert out.shape == x.shape and torch.allclose(t.sum(1), torch.ones(4))
    # the saliency leaves no parameter gradient
    assert all(p.grad is None for p in net.parameters())
    with pytest.raises(ValueError, match="saliency"):
        M.PuzzleMix(num_classes=3, grids=(4,))(x, y)
    with pytest.raises(ValueError, match="num_classes"):
        M.MixUp()
    with pytest.raises(ValueError, match="probabilities"):
        M.RandomChoice([M.MixUp(num_classes=3)], p=[0.5])


def test_mixer_bench_times_every_row_and_skips_timm_when_missing(monkeypatch):
    from pretrain import mixer_bench

    out = mixer_bench.run_mixer_bench(batch=4, size=8, num_classes=5, repeats=1)
    assert [r["row"] for r in out["rows"]] == ["mixup batch", "mixup per-sample", "cutmix batch",
                                               "cutmix per-sample"]
    assert all(r["torchvision"]["ratio"] > 0 for r in out["rows"]
               if r["row"].split()[1] == "batch")
    monkeypatch.setattr(mixer_bench, "_competitor",
                        lambda kind, *a: None if kind == "timm" else (lambda x, y: (x, y)))
    out = mixer_bench.run_mixer_bench(batch=4, size=8, num_classes=5, repeats=1)
    assert out["skipped"] == ["timm"] and not any("timm elem" in r for r in out["rows"])
    assert set(out["goals"]) == {"mixup batch vs torchvision", "cutmix batch vs torchvision"}


# ------------------------------------------------------------------------------------------
# zeta-mixup
ZETA = Path(__file__).parents[1] / "fixtures" / "zeta_mixup_official.npz"


def test_zeta_weights_equal_the_official_code():
    """kakumarabhishek/zeta-mixup utils.py:zeta_mixup_weights on 8 seeded cases (b = 1 .. 128,
    gamma 1.5 .. 4): the same uniform draws give the official matrix (float32 rounding: the
    official code divides by column sums that equal the row sums only up to rounding)."""
    from pretrain.mixers import zeta_weights

    f = np.load(ZETA)
    for k, gamma in enumerate(f["gamma"]):
        w = zeta_weights(torch.from_numpy(f[f"order_{k}"]), float(gamma))
        ref = torch.from_numpy(f[f"weights_{k}"])
        assert w.dtype == torch.float32 and torch.allclose(w, ref, rtol=1e-6, atol=1e-7), k
        b = ref.shape[0]
        assert torch.equal(w.argmax(1), torch.arange(b))  # every example keeps the largest weight


def test_zeta_mixup_equals_the_official_code():
    from pretrain.mixers import Draw, ZetaMixup

    f = np.load(ZETA)
    for k, gamma in enumerate(f["gamma"]):
        x, y = torch.from_numpy(f[f"x_{k}"]), torch.from_numpy(f[f"y_{k}"]).long()
        mixer = ZetaMixup(gamma=float(gamma), num_classes=10)
        draw = Draw(torch.arange(len(y)), [1.0], order=torch.from_numpy(f[f"order_{k}"]))
        mixed, targets = mixer.apply(x, y, draw)
        assert torch.allclose(mixed, torch.from_numpy(f[f"mixed_{k}"]), rtol=1e-5, atol=1e-6), k
        assert torch.allclose(targets, torch.from_numpy(f[f"targets_{k}"]), rtol=1e-6,
                              atol=1e-7), k


def test_zeta_mixup_by_hand_and_its_draws():
    from pretrain.mixers import ZetaMixup, zeta_weights

    # b = 3, row 0 ranks examples (0, 1, 2) as (1, 2, 3); row 1 as (3, 1, 2) rotated so that
    # example 1 is first
    order = torch.tensor([[0.1, 0.5, 0.9], [0.2, 0.8, 0.3], [0.7, 0.1, 0.4]], dtype=torch.float64)
    w = zeta_weights(order, gamma=2.0)
    z = 1 + 1 / 4 + 1 / 9
    # row 1: argsort (0, 2, 1) + 1 = (1, 3, 2); rank 1 at column 0, shifted left by -1 -> (2, 1, 3)
    # row 2: argsort (1, 2, 0) + 1 = (2, 3, 1); rank 1 at column 2, shift 0 -> (2, 3, 1)
    expect = torch.tensor([[1, 1 / 4, 1 / 9], [1 / 4, 1, 1 / 9], [1 / 4, 1 / 9, 1]]) / z
    assert torch.allclose(w, expect, atol=1e-7)
    mixer = ZetaMixup(gamma=2.8, num_classes=4, seed=3)
    x, y = torch.rand(5, 3, 4, 4), torch.tensor([0, 1, 2, 3, 0])
    a, ta = mixer(x, y)
    b, tb = ZetaMixup(gamma=2.8, num_classes=4, seed=3)(x, y)
    assert torch.equal(a, b) and torch.equal(ta, tb)  # seeded
    assert torch.allclose(ta.sum(1), torch.ones(5)) and (ta.argmax(1) == y).all()
    with pytest.raises(ValueError, match="gamma must be > 0"):
        ZetaMixup(gamma=0, num_classes=4)
