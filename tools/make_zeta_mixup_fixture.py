"""Write tests/fixtures/zeta_mixup_official.npz: the official zeta-mixup functions
(kakumarabhishek/zeta-mixup, `utils.py:zeta_mixup_weights` and `zeta_mixup.py:zeta_mixup`) run
offline on seeded inputs, numbers only.

    git --git-dir=<mirror of kakumarabhishek/zeta-mixup> archive HEAD | tar -x -C /tmp/zeta-mixup
    git --git-dir=<mirror of kakumarabhishek/zeta-mixup> rev-parse HEAD > /tmp/zeta-mixup/COMMIT
    python tools/make_zeta_mixup_fixture.py --zeta /tmp/zeta-mixup [--out tests/fixtures]

The official weights draw `np.random.rand(b, b)` from numpy's global generator: each case seeds it,
records that draw (`order`, what `pretrain.mixers.zeta_weights` takes), reseeds and calls the
official functions.
"""

# the official code draws from numpy's global RNG: seeding it is the point here
# ruff: noqa: NPY002

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

from mixup_transfer.core import cli
from mixup_transfer.core.official import checkout_commit, write_fixture

CASES = [(1, 2.8), (2, 2.8), (4, 2.8), (7, 2.4), (16, 4.0), (33, 1.5), (64, 2.8), (128, 2.8)]
CLASSES = 10


def _official(root: Path):
    """(zeta_mixup_weights, zeta_mixup) from a checkout, imported by file (their modules import
    `utils`)."""
    loaded = {}
    for name in ("utils", "zeta_mixup"):
        spec = importlib.util.spec_from_file_location(name, root / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # zeta_mixup.py does `from utils import zeta_mixup_weights`
        spec.loader.exec_module(mod)
        loaded[name] = mod
    return loaded["utils"].zeta_mixup_weights, loaded["zeta_mixup"].zeta_mixup


def build(root: Path) -> dict:
    weights_fn, mix_fn = _official(root)
    out = {}
    for k, (b, gamma) in enumerate(CASES):
        seed = 1000 + k
        np.random.seed(seed)
        out[f"order_{k}"] = np.random.rand(b, b)
        np.random.seed(seed)
        out[f"weights_{k}"] = weights_fn(b, gamma).numpy()
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(b, 3, 8, 8, generator=g)
        y = torch.randint(CLASSES, (b,), generator=g)
        np.random.seed(seed)
        x_new, y_new = mix_fn(x, y, CLASSES, gamma)
        out.update({f"x_{k}": x.numpy(), f"y_{k}": y.numpy(), f"mixed_{k}": x_new.numpy(),
                    f"targets_{k}": y_new.numpy()})
    out["gamma"] = np.array([g for _, g in CASES])
    return out


@cli.entry
def main(argv=None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--zeta", type=Path, required=True,
                   help="a checkout of kakumarabhishek/zeta-mixup")
    p.add_argument("--out", type=Path, default=Path("tests/fixtures"), help="the fixtures folder")
    args = p.parse_args(argv)
    note = {
        "repository": "https://github.com/kakumarabhishek/zeta-mixup",
        "commit": checkout_commit(args.zeta),
        "functions": ["utils.py:zeta_mixup_weights", "zeta_mixup.py:zeta_mixup"],
        "cases": [list(c) for c in CASES],
        "inputs": "order_k = np.random.rand(b, b) drawn after np.random.seed(1000 + k) (the draw "
                  "inside zeta_mixup_weights); x_k [b, 3, 8, 8] float32, y_k [b] in 0..9 (torch, "
                  "seeded)",
        "outputs": "weights_k [b, b] (zeta_mixup_weights), mixed_k and targets_k (zeta_mixup "
                   "with 10 classes)"}
    path = write_fixture(args.out, "zeta_mixup_official.npz", build(args.zeta), note)
    print(f"wrote {path} ({len(CASES)} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
