"""pretrain.methods' math: every function against hand-computed or independently computed
numbers."""

import math
from pathlib import Path

import mixing_reference as refmath
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretrain.methods import alignmix as am
from pretrain.methods import base as shared
from pretrain.methods import cutmix as cm
from pretrain.methods import multimix as mm
from pretrain.methods import puzzlemix as pz
from pretrain.methods import puzzlemix_graphcut as graphcut


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# samplers

def test_gamma_beta_dirichlet_moments():
    g = gen(1)
    for a in (0.3, 1.0, 2.5):
        x = torch.exp(shared.sample_log_gamma(torch.full((40000,), a), g))
        assert abs(x.mean().item() - a) < 0.04 * max(a, 1)  # Gamma(a, 1): mean a, var a
        assert abs(x.var().item() - a) < 0.1 * max(a, 1)
    lam = shared.sample_beta(2.0, 2.0, 40000, g)  # mean 1/2, var ab/((a+b)^2 (a+b+1)) = 1/20
    assert abs(lam.mean().item() - 0.5) < 0.01 and abs(lam.var().item() - 0.05) < 0.005
    w = shared.dirichlet_weights(4, 20000, 1.0, 1.0, g)  # Dir(1,1,1,1): mean 1/4, var (1/4)(3/4)/5
    assert torch.allclose(w.sum(0), torch.ones(20000), atol=1e-5) and (w >= 0).all()
    assert torch.allclose(w.mean(1), torch.full((4,), 0.25), atol=0.01)
    assert torch.allclose(w.var(1), torch.full((4,), 0.75 / 4 / 5), atol=0.003)


def test_dirichlet_is_repeatable_and_subsets():
    a = shared.dirichlet_weights(8, 50, generator=gen(3))
    b = shared.dirichlet_weights(8, 50, generator=gen(3))
    assert torch.equal(a, b)
    w = shared.dirichlet_weights(8, 50, generator=gen(4), m=3)
    assert ((w > 0).sum(0) == 3).all()
    assert torch.allclose(w.sum(0), torch.ones(50), atol=1e-5)
    d = shared.dirichlet_weights(5, 7, generator=gen(5), sets=3)
    assert d.shape == (3, 5, 7) and torch.allclose(d.sum(1), torch.ones(3, 7), atol=1e-5)
    s = shared.sorted_betas(5, 1.0, gen(6))
    assert (s[1:] >= s[:-1]).all()


# ----------------------------------------------------------------------------------------------
# pairs

def test_mixup_lam_one_gives_first_input_and_targets_sum_to_one():
    x = torch.randn(4, 3, 5, 5)
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.equal(shared.mixup(x, perm, 1.0), x)
    assert torch.equal(shared.mixup(x, perm, 0.0), x[perm])
    y = shared.one_hot(torch.tensor([0, 1, 2, 2]), 3)
    ym = shared.mixup(y, perm, 0.3)
    assert torch.allclose(ym.sum(1), torch.ones(4))
    assert torch.allclose(ym[0], torch.tensor([0.3, 0.0, 0.7]))  # 0.3 * y0 + 0.7 * y2
    k = shared.multi_mixup(x, perm, torch.tensor([1.0, 0.25]))
    assert torch.equal(k[:4], x) and torch.allclose(k[4:], 0.25 * x + 0.75 * x[perm])


def test_cutmix_lam_equals_kept_area():
    h, w = 24, 32
    x, x2 = torch.ones(1, 1, h, w), torch.zeros(1, 1, h, w)
    for seed in range(20):
        lam = float(torch.rand(1, generator=gen(100 + seed)))
        box, kept = cm.cutmix_box(h, w, lam, gen(seed))
        mixed = refmath.mask_mix(x, x2, cm.box_mask(h, w, box))
        assert mixed.mean().item() == pytest.approx(kept)  # fraction of pixels still from x
        y0, y1, x0, x1 = box
        assert 0 <= y0 <= y1 <= h and 0 <= x0 <= x1 <= w
    # an unclipped box: lam = 0.75 -> side ratio 1/2 -> (12, 16) box -> kept 3/4
    box, kept = cm.cutmix_box(24, 32, 0.75, centre=(12, 16))
    assert box == (6, 18, 8, 24) and kept == pytest.approx(0.75)


def test_cutmix_boxes_equal_the_official_rand_bbox():
    """tests/fixtures/cutmix_official.npz: 1500 boxes of rand_bbox (CutMix's sampler, as in
    snu-mllab/PuzzleMix imagenet/train.py) for seeded lam and centre on square inputs:
    identical."""
    d = dict(np.load(Path(__file__).parents[1] / "fixtures" / "cutmix_official.npz"))
    for size, lam, (c2, c3), (x1, y1, x2, y2) in zip(d["size"], d["lam"], d["centre"], d["box"]):
        (r0, r1, q0, q1), kept = cm.cutmix_box(int(size), int(size), float(lam),
                                               centre=(int(c2), int(c3)))
        assert (r0, r1, q0, q1) == (x1, x2, y1, y2)  # rows = the official dim-2 range
        assert kept == pytest.approx(1 - (x2 - x1) * (y2 - y1) / size**2, abs=1e-12)


def test_multi_mix_boxes_nested_and_share_a_centre():
    lams = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])
    for seed in range(10):
        boxes, kept = refmath.nested_boxes(40, 40, lams, gen(seed))
        for (a0, a1, b0, b1), (c0, c1, d0, d1) in zip(boxes[:-1].tolist(), boxes[1:].tolist()):
            assert c0 <= a0 and a1 <= c1 and d0 <= b0 and b1 <= d1  # box k inside box k+1
        assert (kept[1:] <= kept[:-1]).all()
    # a centre far from the border: no clipping, exact centre and areas
    boxes, kept = refmath.nested_boxes(400, 400, lams, centre=(200, 200))
    centres = {((y0 + y1) / 2, (x0 + x1) / 2) for y0, y1, x0, x1 in boxes.tolist()}
    assert centres == {(200.0, 200.0)}
    sides = (boxes[:, 1] - boxes[:, 0]).float()
    assert torch.allclose(sides, 2 * torch.floor(400 * lams.sqrt() / 2), atol=0)


# ----------------------------------------------------------------------------------------------
# MultiMix

def test_multimix_hand_case_and_logit_fast_path():
    z = torch.tensor([[1.0, 2.0, 3.0], [5.0, 6.0, 7.0]])
    y = shared.one_hot(torch.tensor([0, 1]), 2)
    lam = torch.tensor([[0.25, 1.0], [0.75, 0.0]])
    zm, ym = refmath.multimix(z, y, lam)
    assert torch.allclose(zm, torch.tensor([[4.0, 5.0, 6.0], [1.0, 2.0, 3.0]]))
    assert torch.allclose(ym, torch.tensor([[0.25, 0.75], [1.0, 0.0]]))
    # g(Z Lambda) = g(Z) Lambda for a linear classifier with bias, columns summing to one
    fc = torch.nn.Linear(16, 10)
    z = torch.randn(12, 16)
    lam = shared.dirichlet_weights(12, 300, generator=gen(0))
    assert torch.allclose(fc(refmath.multimix(z, y.new_zeros(12, 2), lam)[0]), lam.t() @ fc(z),
                          atol=1e-5)
    labels = torch.randint(0, 10, (12,))
    zm, ym = refmath.multimix(z, shared.one_hot(labels, 10), lam)
    pure = shared.soft_cross_entropy(fc(zm), ym)
    assert mm.multimix_loss_from_logits(fc(z), labels, lam).item() == pytest.approx(pure.item(),
                                                                                    rel=1e-5)


def test_dense_attention_by_hand():
    z = torch.tensor([[[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]]])  # [1, d=2, r=3]
    # u = GAP = (1, 2/3); scores (1, 2/3, 8/3); l1 -> (3, 2, 8) / 13
    a = mm.dense_attention(z, "gap_l1relu")
    assert torch.allclose(a, torch.tensor([[3.0, 2.0, 8.0]]) / 13)
    soft = torch.softmax(torch.tensor([[1, 2 / 3, 8 / 3]]), -1)
    assert torch.allclose(mm.dense_attention(z, "gap_softmax"), soft)
    assert torch.allclose(mm.dense_attention(z, "uniform"), torch.full((1, 3), 1 / 3))
    # u = W^T y = row of class 1 = (0, 1): scores (0, 1, 1)
    w = torch.tensor([[1.0, -1.0], [0.0, 1.0]])
    a = mm.dense_attention(z, "cam_l1relu", w, shared.one_hot(torch.tensor([1]), 2))
    assert torch.allclose(a, torch.tensor([[0.0, 0.5, 0.5]]))
    with pytest.raises(ValueError, match="valid"):
        mm.dense_attention(z, "gap_relu")


def _hand_case():
    z = torch.tensor([[[1.0, 2.0, 3.0]], [[4.0, 5.0, 6.0]]])  # [b=2, d=1, r=3]
    y = shared.one_hot(torch.tensor([0, 1]), 2)
    attn = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]])
    lam = torch.tensor([[[0.5, 0.0], [0.5, 1.0]],     # position 0: columns (1/2, 1/2), (0, 1)
                        [[0.2, 1.0], [0.8, 0.0]],     # position 1: (0.2, 0.8), (1, 0)
                        [[1.0, 0.5], [0.0, 0.5]]])    # position 2: (1, 0), (1/2, 1/2)
    return z, y, attn, lam


def test_dense_multimix_weights_by_hand():
    z, y, attn, lam = _hand_case()
    zm, ym, weight = refmath.dense_multimix(z, y, attn, lam)
    # M^j = diag(a^j) Lambda^j; s = column sums; Mhat = M / s
    # pos 0: col1 M=(.25,.1) s=.35 Mhat=(5/7,2/7); col2 M=(0,.2) s=.2 Mhat=(0,1)
    # pos 1: col1 M=(.05,.16) s=.21 Mhat=(5/21,16/21); col2 M=(.25,0) s=.25 Mhat=(1,0)
    # pos 2: col1 M=(.25,0) s=.25 Mhat=(1,0); col2 M=(.125,.3) s=.425 Mhat=(5/17,12/17)
    assert torch.allclose(weight, torch.tensor([[0.35, 0.21, 0.25], [0.2, 0.25, 0.425]]))
    assert torch.allclose(zm[:, 0], torch.tensor([[13 / 7, 30 / 7, 3.0], [4.0, 2.0, 87 / 17]]))
    assert torch.allclose(ym[0, 0], torch.tensor([5 / 7, 5 / 21, 1.0]))  # class-0 share, first mix
    assert torch.allclose(ym[1, 1], torch.tensor([1.0, 0.0, 12 / 17]))  # class-1 share, second mix
    assert torch.allclose(ym.sum(1), torch.ones(2, 3))


def test_dense_multimix_loss_by_hand_and_fast_path():
    z, y, attn, lam = _hand_case()
    # classifier W = (1, -1)^T, no bias: logits (z, -z); log p0 = -log(1 + e^{-2z}), log p1 =
    # -log(1 + e^{2z})
    zt = [[13 / 7, 30 / 7, 3.0], [4.0, 2.0, 87 / 17]]
    y0 = [[5 / 7, 5 / 21, 1.0], [0.0, 1.0, 5 / 17]]
    s = [[0.35, 0.21, 0.25], [0.2, 0.25, 0.425]]

    def ce(zv, p0):
        return -(p0 * -math.log1p(math.exp(-2 * zv)) + (1 - p0) * -math.log1p(math.exp(2 * zv)))

    expected = sum((s[0][j] * ce(zt[0][j], y0[0][j]) + s[1][j] * ce(zt[1][j], y0[1][j]))
                   / (s[0][j] + s[1][j])
                   for j in range(3)) / 3
    zm, ym, weight = refmath.dense_multimix(z, y, attn, lam)
    w = torch.tensor([[1.0], [-1.0]])
    logits_mix = torch.einsum("ndr,cd->ncr", zm, w)
    assert refmath.weighted_dense_cross_entropy(logits_mix, ym,
                                                weight).item() == pytest.approx(expected, rel=1e-5)
    mhat, s_t = mm.dense_mix_weights(attn, lam)
    fast = mm.dense_multimix_loss_from_logits(torch.einsum("bdr,cd->bcr", z, w), y, mhat, s_t)
    assert fast.item() == pytest.approx(expected, rel=1e-5)


def test_dense_fast_path_equals_pure_functions_random():
    torch.manual_seed(0)
    b, d, r, c, n = 6, 8, 4, 5, 40
    z, fc = torch.randn(b, d, r), torch.nn.Linear(d, c)
    y = shared.one_hot(torch.randint(0, c, (b,)), c)
    attn = mm.dense_attention(z)
    lam = shared.dirichlet_weights(b, n, generator=gen(1), sets=r)
    zm, ym, weight = refmath.dense_multimix(z, y, attn, lam)
    logits_mix = torch.einsum("ndr,cd->ncr", zm, fc.weight) + fc.bias.view(1, -1, 1)
    pure = refmath.weighted_dense_cross_entropy(logits_mix, ym, weight)
    logits = torch.einsum("bdr,cd->bcr", z, fc.weight) + fc.bias.view(1, -1, 1)
    mhat, s = mm.dense_mix_weights(attn, lam)
    fast = mm.dense_multimix_loss_from_logits(logits, y, mhat, s)
    assert fast.item() == pytest.approx(pure.item(), rel=1e-5)
    # hard-label gather path
    fast_labels = mm.dense_multimix_loss_from_logits(logits, y.argmax(1), mhat, s)
    assert fast_labels.item() == pytest.approx(pure.item(), rel=1e-5)


# ----------------------------------------------------------------------------------------------
# Sinkhorn

def numpy_sinkhorn(cost, eps, n_iters):
    """Plain Sinkhorn-Knopp on K = exp(-M / eps) with uniform marginals (independent reference)."""
    r = cost.shape[0]
    K = np.exp(-cost / eps)
    a = np.full(r, 1.0 / r)
    u, v = np.ones(r), np.ones(r)
    for _ in range(n_iters):
        u = a / (K @ v)
        v = a / (K.T @ u)
    return u[:, None] * K * v[None, :]


def test_sinkhorn_marginals_and_numpy_agreement():
    torch.manual_seed(0)
    cost = torch.rand(3, 6, 6)
    plan = am.sinkhorn(cost, eps=0.5, n_iters=50)
    assert torch.allclose(plan.sum(2), torch.full((3, 6), 1 / 6), atol=1e-5)
    assert torch.allclose(plan.sum(1), torch.full((3, 6), 1 / 6), atol=1e-6)
    for i in range(3):
        ref = numpy_sinkhorn(cost[i].double().numpy(), 0.5, 50)
        np.testing.assert_allclose(plan[i].numpy(), ref, rtol=1e-4, atol=1e-7)
    # exactly n_iters: 1 iteration differs from 50 on a non-trivial cost
    assert not torch.allclose(am.sinkhorn(cost, 0.5, 1), plan, atol=1e-6)


def test_sinkhorn_log_domain_does_not_underflow_and_align_recovers_permutation():
    torch.manual_seed(0)
    a = torch.randn(2, 32, 9) * 5  # [b, c, r] raw features: squared distances in the hundreds
    perm = torch.randperm(9)
    a2 = a[:, :, perm]
    cost = torch.cdist(a.transpose(1, 2), a2.transpose(1, 2)) ** 2
    plan = am.sinkhorn(cost, eps=0.1, n_iters=100)
    assert torch.isfinite(plan).all()
    assert torch.allclose(plan.sum(1), torch.full((2, 9), 1 / 9), atol=1e-5)
    # aligning a permuted copy back onto the original recovers the original columns
    assert torch.allclose(refmath.align(a, a2, 0.1, 100), a, atol=1e-3)


def test_sinkhorn_tolerance_and_marginal_errors():
    torch.manual_seed(1)
    a = torch.relu(torch.randn(2, 8, 16))
    cost = am.feature_cost(a, a.flip(0))
    full, info = am.sinkhorn(cost, 0.1, 100, return_info=True)
    assert info["iters"] == 100 and info["col_err"] < 1e-5  # the last step normalises the columns
    assert torch.allclose(full.sum(2) * 16, torch.ones(2, 16), atol=info["row_err"] + 1e-6)
    early, info_early = am.sinkhorn(cost, 0.1, 100, tol=0.1, return_info=True)
    assert info_early["iters"] < 100 and info_early["row_err"] > info["row_err"]
    # stopping = fewer iterations
    assert torch.equal(early, am.sinkhorn(cost, 0.1, info_early["iters"]))
    # cost from differences: equals the expansion-free definition
    ref = ((a.transpose(1, 2).unsqueeze(2) - a.flip(0).transpose(1, 2).unsqueeze(1)) ** 2).sum(-1)
    assert torch.allclose(cost, ref, rtol=1e-6, atol=1e-6)


def _check_against_official(a, perm, lam, branch, plan_ref, mixed_ref, iters_ref):
    """Our Sinkhorn plan and aligned mixing against the released code's on one case (a [b, c, r]),
    with tolerances derived from float32 rounding rather than fixed.

    The plan is P_ij = exp((-C_ij + u_i + v_j) / eps). Both codes hold C, u and v in float32 and
    round them at different places (the official potentials live in cost units, u += eps (log mu -
    lse(M)); ours in units of eps), so -C + u + v differs by a few float32 roundings of numbers as
    large as max C, i.e. by k * eps32 * max C, and each entry of R = r P by that divided by eps (R
    <= 1 and its error is relative). With features at a trained network's scale and c = 512, max C
    is in the hundreds to thousands and eps = 0.1: rho = eps32 * max C / eps is ~1e-3, far above a
    fixed 1e-5, and the plan is far from converged after 100 iterations (row sums off by up to
    4.5), so differences are carried forward rather than contracted; k = 16 covers them (measured:
    at most 4.3 rho on the c = 512 cases). The mixed tensor then differs by at most max|A| times
    the largest row / column L1 norm of the plan difference (triangle inequality on A' R^T or A R),
    plus the float32 rounding of an r-term product."""
    eps32 = float(np.finfo(np.float32).eps)
    r = a.shape[-1]
    cost = am.feature_cost(a, a[perm])
    plan, info = am.sinkhorn(cost, 0.1, 100, tol=0.1, return_info=True)
    assert info["iters"] == iters_ref  # the threshold stops both codes at the same iteration
    d_r = np.abs(plan.numpy() * r - plan_ref * r)
    rho = eps32 * cost.max().item() / 0.1
    np.testing.assert_array_less(d_r.max(), 16 * rho + eps32)
    mixed, _ = am.aligned_mix(a, perm, lam, branch, 0.1, 100, tol=0.1)
    amax = a.abs().max().item()
    bound = amax * max(d_r.sum(-1).max(), d_r.sum(-2).max()) + 4 * r * eps32 * amax
    np.testing.assert_allclose(mixed.numpy()[:, : mixed_ref.shape[1]], mixed_ref, rtol=0,
                               atol=bound)
    return d_r.max()


def test_aligned_mix_equals_official_mixup_aligned():
    """tests/fixtures/alignmix_official.npz: shashankvkt/AlignMixup_CVPR22 imagenet/models/
    resnet50_classifier.py:mixup_aligned and utils/OT.py:SinkhornDistance on 12 seeded feature
    tensors (c <= 16; r = 4, 16, 49; both branches). Same number of Sinkhorn iterations; plan and
    output within the float32 tolerances of `_check_against_official`."""
    d = dict(np.load(FIXTURES / "alignmix_official.npz"))
    assert set(d["branch"].tolist()) == {0, 1}
    for c in range(len(d["lam"])):
        b, ch, h, w = (int(v) for v in d["shape"][c])
        r = h * w
        a = torch.from_numpy(d["feat"][c][:b, :ch, :h, :w]).reshape(b, ch, r)
        perm = torch.from_numpy(d["perm"][c][:b]).long()
        _check_against_official(a, perm, float(d["lam"][c]), int(d["branch"][c]),
                                d["plan"][c][:b, :r, :r],
                                d["mixed"][c][:b, :ch, :h, :w].reshape(b, ch, r),
                                int(d["iters"][c]))


def test_aligned_mix_equals_official_at_512_channels():
    """tests/fixtures/alignmix_official_c512.npz: the released cifar10_100 / tiny_imgnet
    mixup_aligned with SinkhornDistance's threshold stop at c = 512 (the channel count of their
    ResNet-18) on 4 x 4 and 8 x 8 layer4-like maps at scales 0.05-2: iterations equal (2, 5, 12 and
    100: the stop and the cap both occur), plan and mixed tensor within the derived float32
    tolerances."""
    d = dict(np.load(FIXTURES / "alignmix_official_c512.npz"))
    errors, iters = [], set()
    for side in (4, 8):
        for c in range(len(d[f"lam_s{side}"])):
            a = torch.from_numpy(d[f"feat_s{side}"][c].astype(np.float32))
            perm = torch.from_numpy(d[f"perm_s{side}"][c]).long()
            iters.add(int(d[f"iters_s{side}"][c]))
            errors.append(_check_against_official(a, perm, float(d[f"lam_s{side}"][c]),
                                                  int(d[f"branch_s{side}"][c]),
                                                  d[f"plan_s{side}"][c], d[f"mixed_s{side}"][c],
                                                  int(d[f"iters_s{side}"][c])))
    assert {2, 100} <= iters and set(d["branch_s4"].tolist()) == {0, 1}
    # a fixed 1e-5 on R would fail here although both codes are right: the scale matters
    assert max(errors) > 1e-3


def test_gap_of_aligned_tensor_is_gap_of_tensor():
    """Why the paper needs its FC stage-2 encoder: every column of R = r P sums to 1, so global
    average pooling of A' R^T is GAP(A'), and aligned mixing (eq. 12) under GAP = embedding
    mixing."""
    torch.manual_seed(2)
    a = torch.relu(torch.randn(4, 16, 9))
    perm = torch.tensor([2, 0, 3, 1])
    mixed, _ = am.aligned_mix(a, perm, 0.3, 0, 0.1, 100)
    assert torch.allclose(mixed.mean(-1), 0.3 * a.mean(-1) + 0.7 * a[perm].mean(-1), atol=1e-6)
    # the tensors themselves differ
    assert not torch.allclose(mixed, 0.3 * a + 0.7 * a[perm], atol=1e-2)


# ----------------------------------------------------------------------------------------------
# PuzzleMix

FIXTURES = Path(__file__).parents[1] / "fixtures"


def test_saliency_grid_hand_case():
    sal = torch.zeros(1, 8, 8)
    sal[:, :4, 4:] = 2.0  # top-right block of a 2x2 grid holds all the saliency
    assert torch.equal(pz.saliency_grid(sal, 2), torch.tensor([[[0.0, 1.0], [0.0, 0.0]]]))
    grad = torch.zeros(1, 3, 2, 2)
    grad[0, :, 0, 0] = torch.tensor([1.0, 2.0, 2.0])
    assert pz.saliency_map(grad)[0, 0, 0].item() == pytest.approx(math.sqrt(3.0))


@pytest.mark.parametrize("solver", ["gco", "swap"])
def test_puzzle_mask_hand_case_without_smoothness(solver):
    """beta = gamma = 0, lam = 1/2, eta = 0.2, g = 2: per block the cheapest of mask 1: sal2 + 0.2
    * -log(1/4) / 4, mask 1/2: (sal + sal2) / 2 + 0.2 * -log(1/2) / 4, mask 0:
    sal + ..."""
    if solver == "gco" and not graphcut.have_gco():
        pytest.skip("gco-wrapper not installed")
    sal = torch.tensor([[[0.5, 0.2], [0.2, 0.1]]])
    sal2 = torch.tensor([[[0.1, 0.2], [0.2, 0.5]]])
    dv, dh = torch.zeros(1, 2, 2, 1, 2), torch.zeros(1, 2, 2, 2, 1)
    m = refmath.puzzle_mask(sal, sal2, dv, dh, 0.5, beta=0.0, gamma=0.0, eta=0.2, solver=solver)
    assert torch.equal(m, torch.tensor([[[1.0, 0.5], [0.5, 0.0]]]))
    # the prior alone (equal saliency): lam = 0.9 -> mask 1 (p = 0.81), lam = 0.5 -> 1/2 (p = 1/2)
    assert torch.equal(refmath.puzzle_mask(sal, sal, dv, dh, 0.9, 0.0, 0.0, 0.2, solver=solver),
                       torch.ones(1, 2, 2))
    assert torch.equal(refmath.puzzle_mask(sal, sal, dv, dh, 0.5, 0.0, 0.0, 0.2, solver=solver),
                       torch.full((1, 2, 2), 0.5))


def test_transport_hand_case():
    """sal = [[0, 1], [0, 0]], the image visible only at the bottom-left place, t_eps = 0.1: block
    1 costs [0.1, 0, -0.8, 0.1] and wins place 2. Blocks 0, 2, 3 claim their own place at cost 0,
    which ties with the zeros of the non-claims: the official column resolve (min over rows of plan
    * cost) gives such a place to row 0, so only block 0 keeps its place and blocks 2, 3 are
      dropped (invisible here)."""
    sal = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
    mask = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]])
    plan = pz.transport_plan(sal, mask, t_eps=0.1)
    expect = torch.zeros(1, 4, 4)
    expect[0, 0, 0] = expect[0, 1, 2] = 1
    assert torch.equal(plan, expect)
    x = torch.arange(16.0).view(1, 1, 4, 4)
    out = pz.apply_transport(x, plan, 2, fill=-1.0)
    assert torch.equal(out[..., 2:, :2], x[..., :2, 2:])  # block 1 now at place 2
    assert torch.equal(out[..., :2, :2], x[..., :2, :2])  # block 0 stays
    assert torch.equal(out[..., :2, 2:], torch.full((1, 1, 2, 2), -1.0))  # place 1 empty
    # a large t_eps makes moving too costly: block 1 stays at place 1 ... and loses it the same way
    expect = torch.zeros(1, 4, 4)
    expect[0, 0, 0] = 1
    assert torch.equal(pz.transport_plan(sal, mask, t_eps=10.0), expect)
    # with saliency everywhere and the image visible everywhere every block keeps its place
    full = pz.transport_plan(torch.full((1, 2, 2), 0.25), torch.ones(1, 2, 2), t_eps=0.8)
    assert torch.equal(full, torch.eye(4).unsqueeze(0))


def _official_cases():
    d = dict(np.load(FIXTURES / "puzzlemix_official.npz"))
    mean, std = torch.from_numpy(d["mean"]), torch.from_numpy(d["std"])
    for c in range(len(d["grid"])):
        # as the official script
        x = (torch.from_numpy(d["images"][c].astype(np.float32)) / 255 - mean) / std
        knobs = dict(lam=float(d["lam"][c]), beta=float(d["beta"][c]), gamma=float(d["gamma"][c]),
                     eta=float(d["eta"][c]), neigh_size=int(d["neigh"][c]),
                     t_eps=float(d["t_eps"][c]))
        yield c, d, x, x * std + mean, knobs


def test_puzzlemix_equals_official_mixup_graph():
    """tests/fixtures/puzzlemix_official.npz: snu-mllab/PuzzleMix mixup.py (mixup_graph,
    graphcut_multi, mask_transport, transport_image) run on 48 seeded cases, grids 2-16, lam
    0.1-0.9, several beta, gamma, eta, neigh_size, t_eps. Masks and transport plans identical,
    mixed images and ratios exact."""
    if not graphcut.have_gco():
        pytest.skip("gco-wrapper not installed (the fallback is pinned by the next test)")
    for c, d, x, pix, kn in _official_cases():
        g = int(d["grid"][c])
        perm = torch.from_numpy(d["perm"][c]).long()
        sal_map = torch.from_numpy(d["sal"][c].astype(np.float32))
        mixed, ratio, mask = refmath.puzzle_mix(x, sal_map, perm, g, kn["lam"], kn["beta"],
                                                kn["gamma"], kn["eta"],
                                           kn["neigh_size"], 3, True, kn["t_eps"], "gco",
                                           pixels=pix)
        assert torch.equal(mask, torch.from_numpy(d["mask"][c][:, :g, :g])), c
        sal = pz.saliency_grid(sal_map, g)
        for s, m, key in ((sal, mask, "src1"), (sal[perm], 1 - mask, "src2")):
            has, col = pz.transport_plan(s, m, kn["t_eps"]).max(-1)
            got = torch.where(has > 0, col, -1)
            assert torch.equal(got, torch.from_numpy(d[key][c][:, : g * g]).long()), (c, key)
        np.testing.assert_allclose(ratio.numpy(), d["ratio"][c], rtol=0, atol=1e-7)
        if c < len(d["mixed"]):
            np.testing.assert_allclose(mixed.numpy(), d["mixed"][c], rtol=0, atol=1e-6)


def test_puzzlemix_fallback_agrees_with_official_graph_cut():
    """The built-in alpha-beta swap (no gco) on the same 48 official cases: >= 97% of blocks
    (measured: 100%)."""
    same = total = 0
    for c, d, _x, pix, kn in _official_cases():
        g = int(d["grid"][c])
        sal = pz.saliency_grid(torch.from_numpy(d["sal"][c].astype(np.float32)), g)
        perm = torch.from_numpy(d["perm"][c]).long()
        dv, dh = pz.boundary_differences(pix, pix[perm], g, kn["neigh_size"])
        mask = refmath.puzzle_mask(sal, sal[perm], dv, dh, kn["lam"], kn["beta"], kn["gamma"],
                                   kn["eta"], solver="swap")
        ref = torch.from_numpy(d["mask"][c][:, :g, :g])
        same += int((mask == ref).sum())
        total += ref.numel()
    assert same / total >= 0.97, same / total
    assert same == total  # today the re-implementation reproduces GCO exactly


def test_swap_wraps_int32_terminal_capacities_as_gco():
    """gco-wrapper multiplies the int32 unaries by 1e5 in int32 and GCO sums a node's terminal
    capacity in int32 (`Graph::add_tweights`): both wrap. Site 0 costs 20000 for labels 0 and 1
    (2e9 after scaling, no wrap) and 22950 for label 2 (2.295e9, wraps to -1999967296). Its swap
    (0, 2) capacity -1999967296 - 2e9 = -3999967296 wraps to +295000000: label 2 looks dearer,
    nothing moves, all labels stay 0 (exact arithmetic would move all four sites to 2, whose true
    energy is lower). Exact arithmetic overflows int32 above 64 active sites."""
    unary = np.zeros((2, 2, 3), np.int32)
    unary[0, 0] = [20000, 20000, 22950]
    dist = np.array([[0, 0.25, 1], [0.25, 0, 0.25], [1, 0.25, 0]], np.float32)
    w_v, w_h = np.ones((1, 2), np.int32), np.ones((2, 1), np.int32)
    assert graphcut._gco_integer_terms(unary, dist, w_v,
                                       w_h)[0][0].tolist() == [2000000000, 2000000000, -1999967296]
    assert graphcut._wrap_int32(np.array([-1999967296 - 2000000000, -(2**31),
                                          2**31 - 1])).tolist() == [
        295000000, -(2**31 - 1), 2**31 - 1]
    assert graphcut._cut_swap(unary, dist, w_v, w_h).tolist() == [[0, 0], [0, 0]]
    if graphcut.have_gco():
        assert graphcut._cut_gco(unary, dist, w_v, w_h).tolist() == [[0, 0], [0, 0]]


def test_swap_warns_once_where_gco_is_undefined_and_gco_limit_is_an_error(monkeypatch):
    """A negative edge weight (gamma > 1 can make one) is a non-submodular move: the swap solves
    it, warning once that gco may differ there. Edge weights past GCO_MAX_ENERGYTERM make GCO abort
    the process: a ValueError."""
    monkeypatch.setattr(graphcut, "_WARNED", set())
    unary = np.zeros((2, 2, 3), np.int32)
    # site 0 prefers labels 1 and 2; the negative edges make the neighbours disagree
    unary[0, 0, 0] = 5
    dist = np.array([[0, 0.25, 1], [0.25, 0, 0.25], [1, 0.25, 0]], np.float32)
    w_v, w_h = -np.ones((1, 2), np.int32), -np.ones((2, 1), np.int32)
    with pytest.warns(RuntimeWarning, match="non-submodular"):
        lab = graphcut._cut_swap(unary, dist, w_v, w_h)
    # the exact minimum: every edge between labels 0 and 2 (-100000 each)
    assert lab.tolist() == [[2, 0], [0, 2]]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graphcut._cut_swap(unary, dist, w_v, w_h)  # once per run
    with pytest.raises(ValueError, match="exceeds what gco-wrapper accepts"):
        graphcut._cut_gco(unary, dist, np.full((1, 2), 10001, np.int32), w_h)


def _swap_fixture():
    d = dict(np.load(FIXTURES / "puzzlemix_swap_gco.npz"))
    for i, g in enumerate(d["grid"].tolist()):
        yield (
            i,
            g,
            d["unary"][i, :g, :g],
            d["dist"],
            d["w_v"][i, : g - 1, :g],
            d["w_h"][i, :g, : g - 1],
            d,
        )


def _in_wrap_band(unary) -> bool:
    return bool((np.abs(unary.astype(np.int64)) * 100000 >= 2**31).any())


def test_swap_solver_equals_gco_on_300_random_problems():
    """tests/fixtures/puzzlemix_swap_gco.npz (tools/make_puzzlemix_swap_fixture.py): 300 seeded
    problems, grids 2 / 4 / 8 / 16, half with one block holding up to 97% of the saliency, 81 of
    them (31 at grid 8, 50 at grid 16) in the band where gco-wrapper's unary * 1e5 wraps; the
    labels gco-wrapper 3.0.9 gave. The built-in swap: 300 / 300 identical."""
    same = {False: 0, True: 0}
    for i, g, unary, dist, w_v, w_h, d in _swap_fixture():
        # never raises, also with more than 64 active sites
        lab = graphcut._cut_swap(unary, dist, w_v, w_h)
        same[_in_wrap_band(unary)] += int(np.array_equal(lab, d["labels"][i, :g, :g]))
    # every mask identical: 219 / 219 outside the band, 81 / 81 in it
    assert same == {False: 219, True: 81}


def test_swap_fixture_is_what_gco_gives():
    """The stored labels are gco-wrapper's own: re-run it on every stored problem (skips without
    gco-wrapper)."""
    if not graphcut.have_gco():
        pytest.skip("gco-wrapper not installed")
    for i, g, unary, dist, w_v, w_h, d in _swap_fixture():
        assert np.array_equal(graphcut._cut_gco(unary, dist, w_v, w_h), d["labels"][i, :g, :g]), i


def test_transport_grid_follows_the_official_t_size():
    """mixup_graph: t_size = min(t_size, block); -1 or >= block -> the mask grid, else width //
    t_size."""
    # blocks 16, 8 -> 4 px
    assert pz.transport_grid(32, 2, 4) == 8 and pz.transport_grid(32, 4, 4) == 8
    # blocks 4, 2: the mask grid
    assert pz.transport_grid(32, 8, 4) == 8 and pz.transport_grid(32, 16, 4) == 16
    assert pz.transport_grid(32, 4, -1) == 4 and pz.transport_grid(64, 2, 2) == 32
    with pytest.raises(ValueError, match="t_size 3 must be"):
        pz.transport_grid(32, 2, 3)


def test_puzzlemix_t_size_equals_official_mixup_graph():
    """tests/fixtures/puzzlemix_tsize_official.npz (tools/make_puzzlemix_tsize_fixture.py): the
    official `mixup_graph` with t_size 2 / 4 / 8 on 12 seeded cases (32 and 64 px, grids 2-16,
    neigh 2 / 4): transport plans on the finer grid identical, label weights exact, the 32 px mixed
    images max |diff| 0."""
    d = dict(np.load(FIXTURES / "puzzlemix_tsize_official.npz"))
    mean, std = torch.from_numpy(d["mean"]), torch.from_numpy(d["std"])
    n32 = 0
    for c in range(len(d["grid"])):
        w, g, t, neigh = (int(d[k][c]) for k in ("width", "grid", "t_size", "neigh"))
        x = (torch.from_numpy(d["images"][c][:, :, :w, :w].astype(np.float32)) / 255 - mean) / std
        sal_map = torch.from_numpy(d["sal"][c][:, :w, :w].astype(np.float32))
        perm = torch.from_numpy(d["perm"][c]).long()
        mixed, ratio, mask = refmath.puzzle_mix(x, sal_map, perm, g, float(d["lam"][c]),
                                                neigh_size=neigh,
                                           pixels=x * std + mean, t_size=t)
        tg = pz.transport_grid(w, g, t)
        tmask = F.interpolate(mask.unsqueeze(1), size=tg).squeeze(1)
        tsal = pz.saliency_grid(sal_map, tg)
        for s, m, key in ((tsal, tmask, "src1"), (tsal[perm], 1 - tmask, "src2")):
            has, col = pz.transport_plan(s, m, 0.8).max(-1)
            assert torch.equal(torch.where(has > 0, col, -1),
                               torch.from_numpy(d[key][c][:, : tg * tg]).long())
        np.testing.assert_allclose(ratio.numpy(), d["ratio"][c], rtol=0, atol=1e-7)
        if w == 32:
            np.testing.assert_allclose(mixed.numpy(), d["mixed"][n32], rtol=0, atol=1e-6)
            n32 += 1
    assert n32 == 8


def test_soft_and_dense_cross_entropy():
    logits = torch.randn(4, 5)
    labels = torch.tensor([0, 3, 1, 4])
    assert shared.soft_cross_entropy(logits, shared.one_hot(labels, 5)).item() == pytest.approx(
        F.cross_entropy(logits, labels).item(), rel=1e-6)
    dense = logits.unsqueeze(-1).expand(4, 5, 3)
    assert shared.dense_cross_entropy(dense, shared.one_hot(labels, 5)).item() == pytest.approx(
        F.cross_entropy(logits, labels).item(), rel=1e-6)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
