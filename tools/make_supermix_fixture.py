"""Write tests/fixtures/supermix_official.npz: the official SuperMix mask optimisation
(alldbi/SuperMix, `supermix.py:mix_batch` with `Smoothing`, `mask_process`, `kldiv2`, `onehot`) run
offline on seeded inputs with a small seeded teacher, numbers only.

    git --git-dir=<mirror of alldbi/SuperMix> archive HEAD | tar -x -C /tmp/SuperMix
    git --git-dir=<mirror of alldbi/SuperMix> rev-parse HEAD > /tmp/SuperMix/COMMIT
    python tools/make_supermix_fixture.py --supermix /tmp/SuperMix

The script's other lines load data and a teacher, so only those definitions are taken from the file
(by its syntax tree). The official code calls `.cuda()`; this script makes it the identity (CPU),
and records the Dirichlet weights `mix_batch` draws from numpy's global generator. The teacher is
`teacher()` below (its weights are stored too): tests/pretrain/test_supermix.py builds the same
network.
"""

# the official code draws from numpy's global RNG: seeding it is the point here
# ruff: noqa: NPY002

from __future__ import annotations

import ast
import copy
import math
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mixup_transfer.core import cli
from mixup_transfer.core.official import checkout_commit, write_fixture

SOURCE = "supermix.py"
NAMES = ("onehot", "Smoothing", "kldiv2", "mask_process", "mix_batch")
CLASSES = 5
# (batch, K, mask_w, sigma, lambda_s, max_iter, tol (examples), alpha, image side)
CASES = [(6, 2, 4, 1.0, 25.0, 4, 0, 3.0, 16), (5, 3, 8, 1.0, 25.0, 4, 0, 1.0, 16),
         (8, 2, 4, 2.0, 10.0, 6, 4, 3.0, 16), (4, 2, 8, 0.0, 25.0, 5, 0, 3.0, 12),
         (10, 2, 8, 1.0, 25.0, 8, 7, 3.0, 16), (8, 2, 8, 1.0, 25.0, 10, 0, 3.0, 16)]


def teacher() -> nn.Sequential:
    """The fixture's teacher: 3 -> 6 channels (3 x 3), ReLU, 2 x 2 average pooling, a linear layer
    to 5 classes."""
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(24, CLASSES))


def _official(root: Path, lambda_s: float):
    """The official definitions, compiled alone into one namespace with the globals they read."""
    tree = ast.parse((root / SOURCE).read_text())
    nodes = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
             and n.name in NAMES]
    scope = {"np": np, "torch": torch, "nn": nn, "F": F, "math": math, "copy": copy,
             "Variable": lambda t, requires_grad=False: t.detach().requires_grad_(requires_grad),
             "opt": types.SimpleNamespace(n_classes=CLASSES, lambda_s=lambda_s)}
    exec(compile(ast.Module(nodes, type_ignores=[]), SOURCE, "exec"), scope)
    scope["smoother"] = scope["Smoothing"]()
    return scope


def _run_case(root: Path, k: int, case) -> dict:
    b, kk, mask_w, sigma, lambda_s, max_iter, tol, alpha, side = case
    scope = _official(root, lambda_s)
    torch.manual_seed(100 + k)
    net = teacher().eval()
    data = torch.randn(b, 3, side, side)
    draws, dirichlet, logits = [], np.random.dirichlet, []
    process = scope["mask_process"]

    # the last call gets the final mask logits of every example
    def recorded_mask(x, upsample_size):
        logits[:] = [x.detach().clone()]
        return process(x, upsample_size)

    scope["mask_process"] = recorded_mask

    def recorded(*args, **kwargs):
        out = dirichlet(*args, **kwargs)
        draws.append(out.reshape(-1))
        return out

    np.random.seed(200 + k)
    np.random.dirichlet = recorded
    try:
        mixed, masks, pred, data_x, iters = scope["mix_batch"](net, data, kk, alpha=alpha,
                                                               mask_w=mask_w, sigma_grad=sigma,
                                                               max_iter=max_iter, toler=tol)
    finally:
        np.random.dirichlet = dirichlet
    out = {f"data_{k}": data.numpy(), f"lams_{k}": np.stack(draws).astype(np.float32),
           f"mixed_{k}": mixed.detach().numpy(), f"masks_{k}": masks.detach().numpy(),
           f"pred_{k}": pred.detach().numpy(), f"iters_{k}": np.int64(iters),
           f"logits_{k}": logits[0].numpy()}
    out.update({f"teacher_{k}/{name}": t.numpy() for name, t in net.state_dict().items()})
    return out


def build(root: Path) -> dict:
    # the official code's .cuda(), on the CPU
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    nn.Module.cuda = lambda self, *args, **kwargs: self
    torch.set_num_threads(1)  # as the tests run (conftest.py one_thread): the same float sums
    out = {"cases": np.array(CASES, dtype=np.float64)}
    for k, case in enumerate(CASES):
        out.update(_run_case(root, k, case))
    return out


@cli.entry
def main(argv=None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--supermix", type=Path, required=True, help="a checkout of alldbi/SuperMix")
    p.add_argument("--out", type=Path, default=Path("tests/fixtures"), help="the fixtures folder")
    args = p.parse_args(argv)
    note = {
        "repository": "https://github.com/alldbi/SuperMix",
        "commit": checkout_commit(args.supermix),
        "functions": [f"{SOURCE}:{name}" for name in NAMES],
        "cases": "rows of `cases`: batch, K, mask_w, sigma, lambda_s, max_iter, tol (examples), "
                 "alpha, image side",
        "inputs": "data_k [b, 3, s, s] (torch.randn after torch.manual_seed(100 + k), after the "
                  "teacher's initialisation), teacher_k/<name> the teacher's weights "
                  "(tools/make_supermix_fixture.py teacher()), lams_k [b, K] the Dirichlet "
                  "draws of mix_batch (np.random.seed(200 + k))",
        "outputs": "mix_batch's return: mixed_k, masks_k, pred_k (the successfully mixed "
                   "examples only, in batch order), iters_k (iterations run); logits_k [b, K, "
                   "1, w, w] the final mask logits of every example (the argument of "
                   "mix_batch's last mask_process call)"}
    path = write_fixture(args.out, "supermix_official.npz", build(args.supermix), note)
    print(f"wrote {path} ({len(CASES)} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
