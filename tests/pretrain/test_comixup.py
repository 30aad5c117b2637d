"""Co-Mixup (pretrain.methods.comixup, comixup_graphcut) against the official code
(tests/fixtures/comixup_official.npz, made by tools/make_comixup_fixture.py from
snu-mllab/Co-Mixup) and hand computations."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretrain.methods import build_method, have_gco
from pretrain.methods import comixup as cm
from pretrain.methods import comixup_graphcut as cs
from pretrain.methods.base import ResNetStages

FIX = Path(__file__).parents[1] / "fixtures" / "comixup_official.npz"
SOLVER_CASES = [(4, 4, "hard", True, 4, 0.32, 1.0, 0.83), (6, 4, "hard", True, 4, 0.32, 1.0, 0.83),
                (8, 2, "hard", True, 3, 0.32, 1.0, 0.83),
                (5, 8, "soft", False, 4, 0.48, 0.5, 0.81),
                (10, 4, "hard", True, 4, 0.16, 1.0, 0.84),
                (3, 4, "soft", True, 2, 0.32, 2.0, 0.83)]
PROCESS_CASES = [(8, 4, 4, 16), (10, 4, 2, 16)]
SOLVERS = ["swap"] + (["gco"] if have_gco() else [])


@pytest.fixture(scope="module")
def fix():
    return np.load(FIX)


def _t(a):
    return torch.from_numpy(np.asarray(a))


@pytest.mark.parametrize("solver", SOLVERS)
def test_labelings_equal_the_official_code(fix, solver):
    for k, (_, g, kind, resolve, niter, beta, gamma, thres) in enumerate(SOLVER_CASES):
        onehot = cs.comix_labelings(_t(fix[f"cost_{k}"]), _t(fix[f"A_{k}"]), _t(fix[f"init_{k}"]),
                                    _t(fix[f"prior_{k}"]), beta, gamma, 0.05, thres, kind, resolve,
                                    niter, solver)
        np.testing.assert_array_equal(onehot.numpy(), fix[f"onehot_{k}"], err_msg=f"case {k}")
        obj = cs.objective(_t(fix[f"cost_{k}"]), onehot, beta / g / g, gamma / g / g)
        np.testing.assert_allclose(obj.numpy(), fix[f"obj_{k}"], rtol=1e-6)


@pytest.mark.parametrize("solver", SOLVERS)
def test_mixup_process_equals_the_official_code(fix, solver):
    for k, (_, part, blocks, size) in enumerate(PROCESS_CASES):
        pooled = F.avg_pool2d(_t(fix[f"p_sc_{k}"]), size // blocks)
        priors, inits = _t(fix[f"p_priors_{k}"]), _t(fix[f"p_inits_{k}"])
        x, y = _t(fix[f"p_x_{k}"]), _t(fix[f"p_y_{k}"])
        xs, ys = [], []
        for p, (cost, A) in enumerate(cs.partition_costs(pooled, _t(fix[f"p_adist_{k}"]), part,
                                                         0.001)):
            s, n = p * part, cost.shape[0]
            onehot = cs.comix_labelings(cost, A, inits[s:s + n], priors[s:s + n], 0.32, 1.0, 0.05,
                                        0.83, solver=solver)
            out = cm.mix_input(onehot, x[s:s + n], y[s:s + n])
            xs.append(out[0])
            ys.append(out[1])
        torch.testing.assert_close(torch.cat(xs), _t(fix[f"p_mixed_{k}"]), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(torch.cat(ys), _t(fix[f"p_target_{k}"]), rtol=1e-6, atol=1e-6)


def test_objective_and_penalty_by_hand():
    """2 outputs on a 1 x 2 grid, 2 inputs: output 0 = [0, 1], output 1 = [0, 0]. Unary: costs
    picked; smoothness: output 0 differs once (2 squared differences -> beta / 2 * 2); diversity:
    counts [[1, 1], [2, 0]], sum over inputs of (column sum)^2 - sum of squares = (9 + 1) - (1 + 1
    + 4 + 0) = 4."""
    cost = torch.tensor([[[1.0, 2.0]], [[3.0, 5.0]]])  # [n = 2, 1, 2]
    onehot = F.one_hot(torch.tensor([[[0, 1]], [[0, 0]]]), 2).float()
    assert cs.objective(cost, onehot, 0.5, 0.25).item() == pytest.approx((1 + 5 + 1 + 2) + 0.5
                                                                         + 0.25 * 4)
    A, others = torch.tensor([[1.0, 0.5], [0.0, 1.0]]), torch.tensor([2.0, 4.0])
    # A others = [4, 4]; thres 3.5: both over -> hard = 2 g (A @ others), soft = 2 g (A others -
    # thres)
    torch.testing.assert_close(cs.modular_penalty(A, others, 3.5, 0.5, "hard"),
                               torch.tensor([4.0, 4.0]))
    torch.testing.assert_close(cs.modular_penalty(A, others, 3.5, 0.5, "soft"),
                               torch.tensor([0.5, 0.5]))
    # none over
    torch.testing.assert_close(cs.modular_penalty(A, others, 4.0, 0.5, "hard"), torch.zeros(2))
    # others [2, 2]: A others = [3, 2], thres 2.5, only input 0 over. The official hard expression
    # zeroes the columns of A not over: [[1, 0], [0, 0]] @ [2, 2] = [2, 0] (not [3, 0]); soft: [3 -
    # 2.5, 0]
    two = torch.tensor([2.0, 2.0])
    torch.testing.assert_close(cs.modular_penalty(A, two, 2.5, 0.5, "hard"),
                               torch.tensor([2.0, 0]))
    torch.testing.assert_close(cs.modular_penalty(A, two, 2.5, 0.5, "soft"),
                               torch.tensor([0.5, 0]))


def test_resolve_cost_by_hand():
    """Outputs 0 and 2 use inputs {1, 2}: +1 on input 1 for output 0, on input 2 for output 2;
    output 1 uses {0} alone (like output 3): single-input pairs are left."""
    assigned = torch.tensor([[0, 1, 1], [1, 0, 0], [0, 1, 1], [1, 0, 0]]).float()
    expected = torch.zeros(4, 3)
    expected[0, 1] = expected[2, 2] = 1.0
    torch.testing.assert_close(cs.resolve_cost(assigned), expected)


def test_salient_points_and_compatibility_by_hand():
    sal = torch.zeros(2, 10, 10)
    # windows covering (1, 2): corners rows 0-1, columns 0-2; the first is (0, 0)
    sal[0, 1, 2] = 1.0
    sal[1, 9, 9] = 1.0  # only the window at (2, 2)
    pts = cm.salient_points(sal)
    torch.testing.assert_close(pts, torch.tensor([[0.0, 0.0], [2.0, 2.0]]))
    a_dist = torch.tensor([[0.0, 4.0], [4.0, 0.0]])
    # n / sum = 2 / 8: off-diagonal 1 * omega
    torch.testing.assert_close(cs.compatibility(a_dist, 0.1),
                               torch.tensor([[0.9, 0.1], [0.1, 0.9]]))
    torch.testing.assert_close(cs.compatibility(torch.zeros(2, 2), 0.1), 0.9 * torch.eye(2))


def test_method_step_targets_are_block_shares():
    """A full step on a 32 px batch of 6 (partitions 4 + 2): every target row sums to 1 and equals
    the shares of the inputs whose pixels the output shows."""
    torch.manual_seed(0)
    m = build_method("comixup", ResNetStages("resnet18", num_classes=6), 6, part=4, solver="swap")
    m.seed(3)
    x, labels = torch.rand(6, 3, 32, 32), torch.arange(6)
    sal, clean = m.saliency(x, labels)
    assert clean is not None and clean.ndim == 0
    xm, y = m.mix(x, labels, sal)
    torch.testing.assert_close(y.sum(1), torch.ones(6))
    # partitions mix only their own inputs
    assert (y[:4, 4:] == 0).all() and (y[4:, :4] == 0).all()
    # each 8 x 8 block of an output is one input or the mean of two: the share of input j is its
    # pixel weight
    for o in range(6):
        d = torch.stack([(xm[o] - x[j]).abs().amax(0) for j in range(6)])  # [6, 32, 32]
        exact = (d < 1e-6).float().mean((1, 2))
        assert (exact <= y[o] + 1e-6).all()
    out = m(x, labels)
    assert set(out) == {"loss", "loss_clean"} and torch.isfinite(out["loss"])
