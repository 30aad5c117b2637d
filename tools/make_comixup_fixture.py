"""Write tests/fixtures/comixup_official.npz: the official Co-Mixup functions (snu-mllab/Co-Mixup,
match.py: `get_onehot_matrix`, `obj_fn`, `mix_input`; mixup.py: `mixup_process`) run offline on
seeded inputs, numbers only.

    git --git-dir=<mirror of snu-mllab/Co-Mixup> archive HEAD | tar -x -C /tmp/Co-Mixup
    git --git-dir=<mirror of snu-mllab/Co-Mixup> rev-parse HEAD > /tmp/Co-Mixup/COMMIT
    python tools/make_comixup_fixture.py --comixup /tmp/Co-Mixup [--out tests/fixtures]

It needs gco-wrapper (match.py imports gco). The official code draws a Dirichlet prior (torch's
global generator) and the initial labels (`random_initialize`, numpy's global generator) inside
`get_onehot_matrix`: the script records both (`prior_*`, `init_*`, what
`pretrain.methods.comixup_graphcut.comix_labelings` takes). `mixup_process` calls it with device
"cuda": the script makes that the CPU.
"""

# the official code draws from the global RNGs: seeding them is the point here
# ruff: noqa: NPY002

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from mixup_transfer.core import cli
from mixup_transfer.core.official import checkout_commit, write_fixture

# (n inputs = outputs, grid, thres_type, set_resolve, niter, beta, gamma, thres)
SOLVER_CASES = [(4, 4, "hard", True, 4, 0.32, 1.0, 0.83), (6, 4, "hard", True, 4, 0.32, 1.0, 0.83),
                (8, 2, "hard", True, 3, 0.32, 1.0, 0.83),
                (5, 8, "soft", False, 4, 0.48, 0.5, 0.81),
                (10, 4, "hard", True, 4, 0.16, 1.0, 0.84),
                (3, 4, "soft", True, 2, 0.32, 2.0, 0.83)]
# mixup_process: (batch, m_part, m_block_num, image size)
PROCESS_CASES = [(8, 4, 4, 16), (10, 4, 2, 16)]
ARGS = {"m_beta": 0.32, "m_gamma": 1.0, "m_thres": 0.83, "m_thres_type": "hard", "m_eta": 0.05,
        "mixup_alpha": 2.0, "m_omega": 0.001, "set_resolve": True, "m_niter": 4}


def _load(root: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, root / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # mixup.py does `from match import ...`
    spec.loader.exec_module(mod)
    return mod


class _Draws:
    """Records the Dirichlet prior and the initial labels each `get_onehot_matrix` call draws."""

    def __init__(self, match):
        self.priors, self.inits = [], []
        dirichlet = match.torch.distributions.dirichlet.Dirichlet
        sample, init = dirichlet.sample, match.random_initialize

        def rec_sample(d, *a, **k):
            v = sample(d, *a, **k)
            self.priors.append(v.numpy().copy())
            return v

        def rec_init(*a):
            v = init(*a)
            self.inits.append(v.copy())
            return v

        self.undo = lambda: (setattr(dirichlet, "sample", sample),
                             setattr(match, "random_initialize", init))
        dirichlet.sample, match.random_initialize = rec_sample, rec_init


def _solver_cases(match, out: dict) -> None:
    for k, (n, g, kind, resolve, niter, beta, gamma, thres) in enumerate(SOLVER_CASES):
        gen = torch.Generator().manual_seed(6000 + k)
        sc = torch.rand(n, g, g, generator=gen) ** 3
        cost = -sc / sc.reshape(n, -1).sum(1).reshape(n, 1, 1)
        a_dist = torch.randint(0, 20, (n, n), generator=gen).float()
        a_dist = (a_dist + a_dist.T) * (1 - torch.eye(n))
        A = 0.999 * torch.eye(n) + 0.001 * a_dist / a_dist.sum() * n
        draws = _Draws(match)
        torch.manual_seed(7000 + k)
        np.random.seed(7000 + k)
        try:
            onehot = match.get_onehot_matrix(cost.clone(), A, n, beta=beta, gamma=gamma, eta=0.05,
                                             mixup_alpha=2.0, thres=thres, thres_type=kind,
                                             set_resolve=resolve, niter=niter, device="cpu")
        finally:
            draws.undo()
        obj = match.obj_fn(cost, onehot, beta / g / g, gamma / g / g)
        out.update({f"cost_{k}": cost.numpy(), f"A_{k}": A.numpy(), f"prior_{k}": draws.priors[0],
                    f"init_{k}": draws.inits[0], f"onehot_{k}": onehot.numpy(),
                    f"obj_{k}": obj.numpy()})


def _process_cases(mixup, match, out: dict) -> None:
    official = match.get_onehot_matrix
    mixup.get_onehot_matrix = lambda *a, **kw: official(*a, **{**kw, "device": "cpu"})
    for k, (b, part, blocks, size) in enumerate(PROCESS_CASES):
        gen = torch.Generator().manual_seed(8000 + k)
        x = torch.rand(b, 3, size, size, generator=gen)
        y = torch.nn.functional.one_hot(torch.randint(0, 5, (b,), generator=gen), 5).float()
        sc = torch.rand(b, size, size, generator=gen) ** 2
        z = torch.randint(0, size, (b, 2), generator=gen).float()
        a_dist = (z.unsqueeze(1) - z.unsqueeze(0)).abs().sum(-1)
        args = SimpleNamespace(m_block_num=blocks, m_part=part, **ARGS)
        draws = _Draws(match)
        torch.manual_seed(9000 + k)
        np.random.seed(9000 + k)
        try:
            mixed, target = mixup.mixup_process(x.clone(), y.clone(), args=args, sc=sc,
                                                A_dist=a_dist)
        finally:
            draws.undo()
        out.update({f"p_x_{k}": x.numpy(), f"p_y_{k}": y.numpy(), f"p_sc_{k}": sc.numpy(),
                    f"p_adist_{k}": a_dist.numpy(),
                    f"p_priors_{k}": np.concatenate(draws.priors),
                    f"p_inits_{k}": np.concatenate(draws.inits), f"p_mixed_{k}": mixed.numpy(),
                    f"p_target_{k}": target.numpy()})


def build(root: Path) -> dict:
    match = _load(root, "match")
    mixup = _load(root, "mixup")
    out: dict = {}
    _solver_cases(match, out)
    _process_cases(mixup, match, out)
    return out


@cli.entry
def main(argv=None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--comixup", type=Path, required=True, help="a checkout of snu-mllab/Co-Mixup")
    p.add_argument("--out", type=Path, default=Path("tests/fixtures"), help="the fixtures folder")
    args = p.parse_args(argv)
    note = {
        "repository": "https://github.com/snu-mllab/Co-Mixup",
        "commit": checkout_commit(args.comixup),
        "functions": ["match.py:get_onehot_matrix", "match.py:obj_fn", "mixup.py:mixup_process"],
        "cases": {"get_onehot_matrix (n, grid, thres_type, set_resolve, niter, beta, gamma, "
                  "thres)": [list(c) for c in SOLVER_CASES],
                  "mixup_process (batch, m_part, m_block_num, size)":
                      [list(c) for c in PROCESS_CASES],
                  "mixup_process args": ARGS},
        "inputs": "torch seeded 6000 + k (solver cases: cost = minus a normalised saliency, A = "
                  "0.999 I + 0.001 normalised distances) and 8000 + k (process cases: images, "
                  "one-hot targets of 5 classes, saliency, l1 distances of random points); the "
                  "global generators seeded 7000 + k / 9000 + k before the call, their draws "
                  "recorded (prior_k, init_k; p_priors_k, p_inits_k in partition order)",
        "outputs": "onehot_k [n, g, g, n] and obj_k (obj_fn of it); p_mixed_k, p_target_k "
                   "(mixup_process)"}
    print(f"wrote {write_fixture(args.out, 'comixup_official.npz', build(args.comixup), note)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
