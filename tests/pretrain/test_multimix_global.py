"""MultiMix / Dense MultiMix `global_batch` (this toolkit's extension): two gloo processes under
DDP mixing the global batch give the loss and the gradients of one process holding the whole batch
with both ranks' draws."""

import os
import socket

import mixing_reference as refmath
import numpy as np
import pytest
import torch

from pretrain.methods import ResNetStages, build_method
from pretrain.methods import base as shared
from pretrain.methods import multimix as mm

# classes, examples per rank, ranks, interpolations per rank, draw seed
C, B, WORLD, N, SEED = 10, 4, 2, 40, 17
# m = 6 > b = 4: only the global batch (8) has 6 examples
KNOBS = {"multimix": {"m": 6}, "dense_multimix": {}}

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _method(name, global_batch=True, prob=1.0):
    torch.manual_seed(0)  # the same initial weights in every process
    m = build_method(name, ResNetStages("resnet18", C), C, n=N, prob=prob,
                     global_batch=global_batch, **KNOBS[name])
    m.generator = torch.Generator()
    return m


def _data():
    g = torch.Generator().manual_seed(5)
    return torch.rand(WORLD * B, 3, 64, 64, generator=g), torch.randint(C, (WORLD * B,),
                                                                        generator=g)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_rank(name, rank):
    """One DDP step of `name` on this rank's slice: its loss, the layer4 map's gradient, the
    averaged grads."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    m = _method(name)
    ddp, seen = DDP(m), {}

    def keep(module, args, out):
        out.retain_grad()
        seen["fmap"] = out

    m.model.net.layer4.register_forward_hook(keep)
    images, labels = _data()
    m.seed(SEED + rank)
    loss = ddp(images[rank * B:(rank + 1) * B], labels[rank * B:(rank + 1) * B])["loss"]
    loss.backward()
    return {"loss": loss.detach(), "fmap_grad": seen["fmap"].grad,
            "grads": {k: p.grad.clone() for k, p in m.named_parameters()}}


def _worker(rank, port, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    out = {name: _one_rank(name, rank) for name in KNOBS}
    coin = _method("multimix", prob=0.5)
    out["branch_draws"] = []
    for t in range(4):
        coin.seed(100 * t + rank, shared=100 * t)  # the task passes a rank-independent shared seed
        out["branch_draws"].append(coin._branch_draw())
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pth"))
    dist.destroy_process_group()


def _reference(name):
    """One process holding the whole batch: per-rank BatchNorm statistics (DDP without SyncBN) and
    both ranks' draws replayed by the pure functions, world x n interpolations; the loss is their
    mean (eq. 14 for dense)."""
    m = _method(name)
    images, labels = _data()
    fmaps = [m.model.features(images[r * B:(r + 1) * B]) for r in range(WORLD)]
    for f in fmaps:
        f.retain_grad()
    z, y = torch.cat(fmaps).flatten(2), shared.one_hot(labels, C)  # [world*b, d, r]
    lams = []
    for r in range(WORLD):
        # the device stream (the branch draw is a host draw)
        g = torch.Generator().manual_seed(SEED + r)
        sets = None if name == "multimix" else z.shape[-1]
        lams.append(shared.dirichlet_weights(WORLD * B, N, 0.5, 2.0, g, m=KNOBS[name].get("m"),
                                             sets=sets))
    if name == "multimix":
        z_mix, y_mix = refmath.multimix(z.mean(-1), y, torch.cat(lams, dim=1))  # [b, world*n]
        loss = shared.soft_cross_entropy(m.model.fc(z_mix), y_mix)
    else:
        z_mix, y_mix, weight = refmath.dense_multimix(z, y, mm.dense_attention(z.detach()),
                                                      torch.cat(lams, dim=2))
        logits = torch.einsum("ndr,cd->ncr", z_mix,
                              m.model.fc.weight) + m.model.fc.bias.view(1, -1, 1)
        loss = refmath.weighted_dense_cross_entropy(logits, y_mix, weight)
    loss.backward()
    return loss.detach(), [f.grad for f in fmaps], {k: p.grad for k, p in m.named_parameters()}


@pytest.mark.slow
def test_global_batch_two_ranks_equal_one_process_with_both_ranks_draws(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pth") for r in range(WORLD)]
    for name in KNOBS:
        ref_loss, ref_fmap_grads, ref_grads = _reference(name)
        got = [r[name] for r in ranks]
        # DDP logs and optimises the mean over ranks of the ranks' losses
        assert float(sum(r["loss"] for r in got)) / WORLD == pytest.approx(float(ref_loss),
                                                                           abs=1e-6)
        # each rank mixes with its own draws
        assert got[0]["loss"] != pytest.approx(got[1]["loss"])
        for k, g in ref_grads.items():  # DDP's averaged gradients (identical on both ranks)
            assert torch.allclose(got[0]["grads"][k], g, rtol=1e-5, atol=1e-6), (name, k)
            assert torch.equal(got[0]["grads"][k], got[1]["grads"][k])
        assert sum(g.abs().sum() for g in ref_grads.values()) > 0
        for r in range(WORLD):  # a rank's rows get every rank's loss gradient: world x the mean's
            assert torch.allclose(got[r]["fmap_grad"] / WORLD, ref_fmap_grads[r], rtol=1e-5,
                                  atol=1e-8), (name, r)
    # the MultiMix / input-mixup coin is the same on both ranks, from the shared host stream (no
    # broadcast) the shared stream's draws
    expected = [float(np.random.default_rng(100 * t).random()) for t in range(4)]
    assert ranks[0]["branch_draws"] == ranks[1]["branch_draws"] == pytest.approx(expected)


def test_global_batch_is_a_no_op_in_one_process():
    images, labels = _data()
    for name in KNOBS:
        losses = []
        for global_batch in (False, True):
            m = _method(name, global_batch=global_batch)
            m.seed(SEED)
            losses.append(float(m(images, labels)["loss"].detach()))
        assert losses[0] == losses[1], name
    with pytest.raises(ValueError, match="embedding .layer 5. only"):
        build_method("multimix", ResNetStages("resnet18", C), C, layer=2, global_batch=True)
