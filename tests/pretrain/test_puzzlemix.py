"""PuzzleMix's recipe knobs (pretrain.methods.PuzzleMix): the clean-loss term, train- or eval-mode
saliency, the BCE loss of the CIFAR / TinyImageNet script and the transport resolution, against
hand computations and the procedure of snu-mllab/PuzzleMix main.py / imagenet/train.py @ e2dbf3a
re-done on a copy of the model."""

import copy
import math

import mixing_reference as refmath
import pytest
import torch
import torch.nn.functional as F

from pretrain.methods import ResNetStages, build_method

C = 10
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def make(seed=0, **knobs):
    torch.manual_seed(seed)
    m = build_method("puzzlemix", ResNetStages("resnet18", C), C, solver="swap", grids=(2, 4),
                     **knobs)
    m.generator = torch.Generator()
    m.seed(seed)
    return m.train()


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(4, 3, 32, 32, generator=g), torch.tensor([0, 3, 3, 7])


def official_clean_forward(model, images, labels, weight):
    """main.py with clean_lam > 0: model.train(), loss = weight * CE(model(x_normalised)), backward
    into the input (and the parameters), unary = sqrt(mean_c grad^2). -> (loss, unary, the model
    after the forward)."""
    ref = copy.deepcopy(model).train()
    xn = ((images - ref.mean) / ref.std).requires_grad_(True)
    loss = weight * F.cross_entropy(ref(xn * ref.std + ref.mean), labels)
    loss.backward()
    return loss.detach(), torch.sqrt(torch.mean(xn.grad**2, dim=1)), ref


@pytest.mark.parametrize("loss, weight", [("ce", 0.5), ("bce", 2 * 0.5 / C)])
def test_clean_lam_adds_the_official_clean_loss_in_train_mode(loss, weight):
    """clean_lam 0.5: ce (imagenet/train.py) adds 0.5 * CE(clean), bce (main.py) 2 * 0.5 / C *
    CE(clean); the saliency is the gradient of that weighted loss in train mode (batch statistics;
    the running statistics move as after one train-mode forward), and the term backpropagates into
    the parameters."""
    images, labels = batch()
    m = make(clean_lam=0.5, saliency_mode="train", loss=loss)
    expect, unary, ref = official_clean_forward(m.model, images, labels, weight)
    sal, clean = m.saliency(images, labels)
    assert m.model.training
    assert clean.item() == pytest.approx(expect.item(), rel=1e-6)
    assert torch.allclose(sal, unary, rtol=1e-5, atol=1e-12)
    bn, bn_ref = m.model.net.bn1, ref.net.bn1
    assert torch.equal(bn.running_mean, bn_ref.running_mean) and bn.num_batches_tracked.item() == 1
    clean.backward()
    w, w_ref = m.model.net.conv1.weight, ref.net.conv1.weight
    assert torch.allclose(w.grad, w_ref.grad, rtol=1e-4, atol=1e-9)
    out = make(clean_lam=0.5, saliency_mode="train", loss=loss)(images, labels)
    assert set(out) == {"loss", "loss_clean"} and out["loss_clean"].item() == pytest.approx(
        expect.item(), rel=1e-6
    )


def test_eval_mode_saliency_has_no_clean_term_and_leaves_batchnorm_alone():
    images, labels = batch()
    m = make()
    before = m.model.net.bn1.running_mean.clone()
    sal, clean = m.saliency(images, labels)
    assert clean is None and torch.equal(m.model.net.bn1.running_mean, before) and m.model.training
    assert set(m(images, labels)) == {"loss"}


def test_bce_loss_by_hand():
    """main.py: BCELoss(softmax(logits), y) averaged over examples and classes. logits (log 3, 0)
    -> p = (3/4, 1/4); y = (1/2, 1/2): -(1/2 log 3/4 + 1/2 log 1/4) for each class; logits (0, 0),
    y = (1, 0): log 2."""
    m = make(loss="bce")
    got = m.mixed_loss(torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]]),
                       torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
    expect = (-(0.5 * math.log(0.75) + 0.5 * math.log(0.25)) + math.log(2.0)) / 2
    assert got.item() == pytest.approx(expect, rel=1e-6)
    assert make().mixed_loss(torch.zeros(1, 2),
                             torch.tensor([[1.0, 0.0]])).item() == pytest.approx(math.log(2.0))


def test_t_size_reaches_the_transport():
    """PuzzleMix(t_size=4) mixes as puzzle_mix(..., t_size=4) (pinned against the official code in
    tests/pretrain/test_mixing.py), and differs from the block-level transport on these images."""
    images, labels = batch()
    m = make(t_size=4, neigh_size=4)
    perm = torch.tensor([1, 2, 3, 0])
    sal_map = torch.zeros(4, 32, 32)
    # each image's saliency in one 4 x 4 px cell of its top-right block
    sal_map[:, 2:6, 20:24] = 1.0
    sal_map[:, 24:, :] = 0.01
    x, kept = m.puzzle(images, labels, perm, [0.5], 2, sal_map)
    fill = m.model.mean
    ref, ratio, mask = refmath.puzzle_mix(images, sal_map, perm, 2, 0.5, neigh_size=4,
                                          solver="swap", fill=fill, t_size=4)
    assert torch.equal(x, ref) and torch.equal(kept, ratio)
    assert ((mask > 0) & (mask < 1)).any() or ((mask == 0).any() and (mask == 1).any())
    block, _, _ = refmath.puzzle_mix(images, sal_map, perm, 2, 0.5, neigh_size=4, solver="swap",
                                     fill=fill)
    assert not torch.equal(x, block)


def test_knob_errors_name_the_knob():
    with pytest.raises(ValueError, match="clean_lam > 0 needs saliency_mode train"):
        make(clean_lam=1.0)
    with pytest.raises(ValueError, match="saliency_mode must be eval or train"):
        make(saliency_mode="both")
    with pytest.raises(ValueError, match="loss must be ce or bce"):
        make(loss="mse")
    with pytest.raises(ValueError, match="no dense form"):
        make(loss="bce", dense_loss=True)
    with pytest.raises(ValueError, match="t_size must be -1"):
        make(t_size=0)
    with pytest.raises(ValueError, match="t_size 3 must be -1 or a positive divisor of the "
                                         "block side 16"):
        make(t_size=3)._grid(32, 32)  # grids (2, 4): blocks 16 and 8, checked before the draw
    mm = build_method("multi_interp", ResNetStages("resnet18", C), C, base="puzzlemix", k=2,
                      puzzle={"clean_lam": 1.0, "saliency_mode": "train", "solver": "swap",
                              "grids": [2]})
    mm.generator = torch.Generator()
    with pytest.raises(ValueError, match="clean_lam > 0 adds a loss term"):
        mm(*batch())
