"""TokenMix (pretrain.methods.tokenmix) against the official code
(tests/fixtures/tokenmix_official.npz, made by tools/make_tokenmix_fixture.py from
Sense-X/TokenMix) and hand computations."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from pretrain.methods import build_method
from pretrain.methods import tokenmix as tm
from pretrain.methods.base import ResNetStages

FIX = Path(__file__).parents[1] / "fixtures" / "tokenmix_official.npz"


class Replay:
    """The official code's recorded draws (rows [kind, a, b, value]; kind 0 uniform(a, b), 1
    randint(a, b)) served through the host-generator interface `block_token_mask` uses; every call
    must ask for the recorded range."""

    def __init__(self, rows):
        self.rows = [tuple(r) for r in rows]

    def uniform(self, a, b):
        kind, ra, rb, v = self.rows.pop(0)
        assert kind == 0 and np.isclose(ra, a) and np.isclose(rb, b)
        return v

    def integers(self, lo, hi):
        kind, ra, rb, v = self.rows.pop(0)
        assert kind == 1 and (ra, rb) == (lo, hi - 1)
        return int(v)


@pytest.fixture(scope="module")
def fix():
    return np.load(FIX)


def test_block_masks_equal_the_official_code(fix):
    for k, (lam, start) in enumerate(fix["block_cases"]):
        rng = Replay(fix[f"draws_{k}"])
        mask, count = tm.block_token_mask(14, 14, tm.masked_tokens(14, 14, 1 - lam, int(start)),
                                          rng)
        assert rng.rows == []  # the same number of draws
        np.testing.assert_array_equal(mask, fix[f"block_mask_{k}"])
        assert 1 - count / 196 == pytest.approx(float(fix[f"block_lam_{k}"]), abs=1e-12)


def test_random_masks_equal_the_official_code(fix):
    class Perm:
        def __init__(self, p):
            self.p = p

        def permutation(self, n):
            assert n == len(self.p)
            return self.p

    for k, (lam, start) in enumerate(fix["random_cases"]):
        n = tm.masked_tokens(14, 14, 1 - lam, int(start))
        mask, count = tm.random_token_mask(14, 14, n, Perm(fix[f"perm_{k}"]))
        np.testing.assert_array_equal(mask, fix[f"random_mask_{k}"])
        assert 1 - count / 196 == pytest.approx(float(fix[f"random_lam_{k}"]), abs=1e-12)


def _class_maps(topk: np.ndarray, classes: int = 10) -> torch.Tensor:
    """TokenLabeling top-k maps [b, 2, k, h, w] (scores, indices) -> dense [b, classes, h, w], 0
    off the top-k."""
    t = torch.from_numpy(topk)
    maps = torch.zeros(t.shape[0], classes, *t.shape[-2:])
    return maps.scatter_(1, t[:, 1].long(), t[:, 0])


def test_activation_and_targets_equal_the_official_code(fix):
    for k in range(3):
        labels = torch.from_numpy(fix[f"t_labels_{k}"])
        act = tm.token_activation(_class_maps(fix[f"t_topk_{k}"]), labels, 14, 14)
        official = torch.from_numpy(fix[f"t_label_map_{k}"])[torch.arange(4), labels]
        torch.testing.assert_close(act, official, rtol=0, atol=1e-7)
        rng = Replay(fix[f"t_draws_{k}"])
        mask, _ = tm.block_token_mask(14, 14, tm.masked_tokens(14, 14, 0.5, 14), rng)
        y = tm.activation_targets(act, torch.from_numpy(mask), labels, 10, smoothing=0.1)
        torch.testing.assert_close(y, torch.from_numpy(fix[f"t_target_{k}"]), rtol=1e-6, atol=1e-7)
        if k == 0:
            mixed = tm.token_mix(torch.from_numpy(fix["t_x"]).float(), torch.from_numpy(mask))
            np.testing.assert_array_equal(mixed.numpy().astype(np.uint8), fix["t_mixed"])


def test_area_targets_equal_the_official_mixup_target(fix):
    labels = torch.from_numpy(fix["mixup_labels"])
    for k, lam in enumerate(fix["mixup_lams"]):
        torch.testing.assert_close(tm.area_targets(float(lam), labels, 10, 0.1),
                                   torch.from_numpy(fix[f"mixup_target_{k}"]), rtol=0, atol=1e-7)


def test_targets_by_hand():
    """2 x 2 tokens, mask [[0, 1], [0, 0]]; image 0's map [[1, 1], [2, 0]] (sum 4), image 1's [[0,
    3], [1, 0]] (sum 4). Image 0 keeps 3 of its 4 mass units -> y1 = 0.75, receives image 1's
    top-right 3 / 4 -> y2 = 0.75."""
    act = torch.tensor([[[1.0, 1.0], [2.0, 0.0]], [[0.0, 3.0], [1.0, 0.0]]])
    mask = torch.tensor([[0, 1], [0, 0]])
    y = tm.activation_targets(act, mask, torch.tensor([0, 2]), 4, smoothing=0.0)
    # image 1 keeps 1 / 4 of its map, receives image 0's top-right 1 / 4
    torch.testing.assert_close(y, torch.tensor([[0.75, 0, 0.75, 0], [0.25, 0, 0.25, 0]]), rtol=0,
                               atol=1e-6)
    s = 0.2  # smoothing: 0.05 everywhere and y - 0.1 on each label
    torch.testing.assert_close(tm.activation_targets(act, mask, torch.tensor([0, 2]), 4,
                                                     smoothing=s),
                               torch.tensor([[0.7, 0.05, 0.7, 0.05], [0.2, 0.05, 0.2, 0.05]]),
                               rtol=0, atol=1e-6)


class Uniform(nn.Module):
    """A teacher whose class maps are constant: every token carries the same activation."""

    def forward(self, x):
        return torch.zeros(x.shape[0], 5, 4, 4)


def _method(**knobs):
    torch.manual_seed(0)
    m = build_method("tokenmix", ResNetStages("resnet18", num_classes=5), 5, **knobs)
    m.seed(7)
    return m


def test_uniform_teacher_gives_the_kept_fraction_and_the_teacher_is_not_a_submodule():
    """With a constant activation map and no smoothing, the activation targets are the area
    targets: the kept token fraction on the label. The teacher stays out of parameters() and
    state_dict()."""
    m = _method(switch_prob=1.0, patch_size=8, minimum_tokens=0, smoothing=0.0)
    m.teacher = Uniform()
    assert "teacher" not in dict(m.named_children()) and len(m.state_dict()) == len(
        _method().state_dict()
    )
    x, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    xm, y = m.mix(x, labels)
    partner = (xm != x).any(1)[:, ::8, ::8].float()  # the tokens that changed: [4, 4, 4]
    kept = 1 - partner[0].mean()
    assert 0 < kept < 1
    expected = kept * torch.eye(5)[labels] + (1 - kept) * torch.eye(5)[labels.flip(0)]
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)
    assert m(x, labels)["loss"].ndim == 0


def test_activation_without_teacher_is_an_error_and_area_needs_none():
    m = _method(switch_prob=1.0, patch_size=8)
    assert (
        tm.TokenMix.needs_teacher and m.needs_teacher and not _method(labels="area").needs_teacher
    )
    with pytest.raises(ValueError, match="needs a teacher"):
        m.mix(torch.rand(2, 3, 32, 32), torch.tensor([0, 1]))
    y = _method(switch_prob=1.0, patch_size=8, labels="area").mix(torch.rand(2, 3, 32, 32),
                                                                  torch.tensor([0, 1]))[1]
    torch.testing.assert_close(y.sum(1), torch.ones(2))


def test_token_mask_is_aligned_with_vit_patches():
    """Mixing whole 16 x 16 patches in pixel space equals mixing the patch tokens of a ViT's patch
    embedding."""
    timm = pytest.importorskip("timm")
    vit = timm.models.vision_transformer.VisionTransformer(img_size=64, patch_size=16,
                                                           embed_dim=24, depth=1, num_heads=2,
                                                           num_classes=5)
    x = torch.rand(2, 3, 64, 64)
    mask, _ = tm.block_token_mask(4, 4, 7, np.random.default_rng(0))
    m = torch.from_numpy(mask)
    tokens = vit.patch_embed(tm.token_mix(x, m))  # [2, 16, 24]
    own, partner = vit.patch_embed(x), vit.patch_embed(x.flip(0))
    expected = torch.where(m.flatten().bool()[None, :, None], partner, own)
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)
