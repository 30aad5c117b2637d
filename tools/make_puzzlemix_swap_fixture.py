"""Write tests/fixtures/puzzlemix_swap_gco.npz: seeded random PuzzleMix graph-cut problems and the
labels that gco-wrapper (the graph cut the PuzzleMix authors call, `gco.cut_grid_graph(...,
algorithm="swap")`) gives them, so that the built-in swap solver is pinned against it on machines
without gco-wrapper too.

    python tools/make_puzzlemix_swap_fixture.py [--out tests/fixtures]

Problems: grids 2 / 4 / 8 / 16 (40 / 60 / 100 / 100), half of them with one block holding a large
share of an image's saliency (up to 0.97), which puts most grid-8 and grid-16 ones in the band
where gco-wrapper's int32 product unary * 1e5 wraps (a share above about 21.5 / g^2); lam ~ U(0.03,
0.97); beta, gamma, eta the official defaults or uniform in [0, 3] / [0, 1] / [0, 1] (gamma <= 1
keeps every edge weight >= 0, the submodular case the official settings are in); boundary
differences uniform. The integer energies are stored (not recomputed).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from mixup_transfer.core import cli
from mixup_transfer.core.official import write_fixture
from pretrain.methods import puzzlemix as pz
from pretrain.methods import puzzlemix_graphcut as graphcut

GRIDS = ((2, 40), (4, 60), (8, 100), (16, 100))


def problem(rng: np.random.Generator, g: int, concentrated: bool):
    """One seeded problem -> (unary int32 [g, g, 3], w_v int32 [g-1, g], w_h int32 [g, g-1], lam,
    share)."""
    sal = rng.gamma(float(rng.choice([0.2, 0.5, 2.0])), 1.0, (2, g, g))
    share = 0.0
    if concentrated:
        share = float(rng.uniform(0.02, 0.97))
        for k in range(2):
            if k == 0 or rng.random() < 0.5:
                i, j = rng.integers(g), rng.integers(g)
                sal[k, i, j] = share / (1 - share) * (sal[k].sum() - sal[k, i, j])
    sal = torch.from_numpy(sal / sal.sum((1, 2), keepdims=True)).float()
    scale = float(rng.choice([0.05, 0.3, 1.0]))
    dv = torch.from_numpy(rng.uniform(0, scale, (1, 2, 2, g - 1, g))).float()
    dh = torch.from_numpy(rng.uniform(0, scale, (1, 2, 2, g, g - 1))).float()
    lam = float(rng.uniform(0.03, 0.97))
    official = rng.random() < 0.5
    beta = 1.2 if official else float(rng.uniform(0, 3))
    gamma = 0.5 if official else float(rng.uniform(0, 1))
    eta = 0.2 if official else float(rng.uniform(0, 1))
    unary, _, w_v, w_h = pz.puzzle_energy(sal[:1], sal[1:], dv, dh, lam, beta, gamma, eta)
    return unary[0], w_v[0], w_h[0], lam, share


def build(seed: int = 20261207) -> dict:
    import gco  # noqa: F401, PLC0415  (fail early with ImportError)

    rng = np.random.default_rng(seed)
    rows = {k: [] for k in ("grid", "unary", "w_v", "w_h", "labels", "lam", "share")}
    dist = None
    for g, n in GRIDS:
        for c in range(n):
            unary, w_v, w_h, lam, share = problem(rng, g, c % 2 == 1)
            dist = pz.puzzle_energy(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2),
                                    torch.zeros(1, 2, 2, 1, 2), torch.zeros(1, 2, 2, 2, 1), 0.5)[1]
            labels = graphcut._cut_gco(unary, dist, w_v, w_h)
            pad = np.zeros((16, 16, 3), np.int32)
            pad[:g, :g] = unary
            pv, ph = np.zeros((15, 16), np.int32), np.zeros((16, 15), np.int32)
            pv[: g - 1, :g], ph[:g, : g - 1] = w_v, w_h
            lab = np.full((16, 16), -1, np.int8)
            lab[:g, :g] = labels
            for k, v in (("grid", g), ("unary", pad), ("w_v", pv), ("w_h", ph), ("labels", lab),
                         ("lam", lam), ("share", share)):
                rows[k].append(v)
    out = {k: np.stack([np.asarray(v) for v in vs]) for k, vs in rows.items()}
    out["dist"] = dist
    return out


@cli.entry
def main(argv=None) -> int:
    ap = cli.parser(__doc__)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests"
                    / "fixtures",
                    help="folder of the fixture file (default tests/fixtures)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from importlib.metadata import version  # noqa: PLC0415

    arrays = build()
    note = {
        "repository": f"https://github.com/Borda/pyGCO (gco-wrapper {version('gco-wrapper')}, "
                      "PyPI wheel)",
        "functions": ["gco.cut_grid_graph(unary, dist, w_v, w_h, algorithm='swap'), as "
                      "snu-mllab/PuzzleMix mixup.py:graphcut_multi calls it"],
        "problems": {str(g): n for g, n in GRIDS},
        "generator": "tools/make_puzzlemix_swap_fixture.py (seeded)",
        "arrays": "grid [n]; unary int32 [n, 16, 16, 3], w_v int32 [n, 15, 16], w_h int32 [n, "
                  "16, 15] (top-left part used); dist float32 [3, 3]; labels int8 [n, 16, 16] = "
                  "gco's labels (-1 outside the grid); lam, share (the concentrated block's "
                  "saliency share, 0 = none) [n]"}
    write_fixture(args.out, "puzzlemix_swap_gco.npz", arrays, note)
    wrap = int(sum((np.abs(u.astype(np.int64)) * 100000 >= 2**31).any() for u in arrays["unary"]))
    print(f"{len(arrays['grid'])} problems, {wrap} in the wrap band")
    return 0


if __name__ == "__main__":
    sys.exit(main())
