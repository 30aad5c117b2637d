"""Write tests/fixtures/puzzlemix_tsize_official.npz by running the authors' PuzzleMix
`mixup_graph` offline with a transport resolution `t_size` finer than the mask's blocks (the
official CIFAR-100 command's `--t_size 4`).

Nothing of the authors' code is copied into this project: the official `mixup.py` is imported from
a checkout given on the command line (as in `tools/make_method_fixtures.py`, whose seeded image and
saliency makers are reused), fed seeded inputs, and its inputs and outputs (numbers only) are
stored with a note of repository, commit and functions in `tests/fixtures/official_fixtures.json`.

    git --git-dir=<mirror of snu-mllab/PuzzleMix> archive HEAD | tar -x -C /tmp/PuzzleMix
    git --git-dir=<mirror of snu-mllab/PuzzleMix> rev-parse HEAD > /tmp/PuzzleMix/COMMIT
    python tools/make_puzzlemix_tsize_fixture.py --puzzlemix /tmp/PuzzleMix

Needs torch, numpy and gco-wrapper (the official module imports it).
"""

# the official code draws from numpy's global RNG: seeding it is the point here
# ruff: noqa: NPY002

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch

from mixup_transfer.core import cli
from mixup_transfer.core.official import checkout_commit, write_fixture


def _sibling(name: str):
    """tools/<name>.py as a module (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_fixtures = _sibling("make_method_fixtures")
MEAN, STD, _load = _fixtures.MEAN, _fixtures.STD, _fixtures._load
saliency_maps, smooth_images = _fixtures.saliency_maps, _fixtures.smooth_images

# (width, grid, t_size, neigh_size): t_size below the block side (a finer transport grid), equal to
# it, above it; the official cost matrices exist for transport grids 2, 4, 8 and 16 only
CASES = [(32, 2, 4, 4), (32, 4, 4, 4), (32, 8, 4, 4), (32, 16, 4, 4), (32, 2, 8, 4), (32, 4, 2, 4),
         (32, 2, 2, 2), (32, 4, 4, 2), (64, 2, 4, 4), (64, 4, 4, 4), (64, 8, 4, 2), (64, 16, 4, 4)]


def tsize_cases(repo: Path, out: Path, b: int = 2) -> dict:
    mod = _load(repo / "mixup.py", "official_puzzlemix_mixup_tsize")
    plans_seen = []
    real_transport = mod.mask_transport

    def transport(mask, grad_pool, eps=0.01):
        p = real_transport(mask, grad_pool, eps=eps)
        plans_seen.append(p.clone())
        return p

    mod.mask_transport = transport
    rng = np.random.default_rng(20261207)
    mean, std = torch.from_numpy(MEAN), torch.from_numpy(STD)
    rec = {k: [] for k in ("width", "grid", "t_size", "neigh", "lam", "perm", "images", "sal",
                           "src1", "src2", "ratio", "mixed")}
    for width, g, t_size, neigh in CASES:
        img = np.zeros((b, 3, 64, 64), np.uint8)
        sal = np.zeros((b, 64, 64), np.float16)
        img[:, :, :width, :width] = smooth_images(rng, b, width)
        sal[:, :width, :width] = saliency_maps(rng, b, width)
        perm = rng.permutation(b)
        lam = float(rng.uniform(0.1, 0.9))
        x = (torch.from_numpy(img[:, :, :width, :width].astype(np.float32)) / 255 - mean) / std
        grad = torch.from_numpy(sal[:, :width, :width].astype(np.float32))
        plans_seen.clear()
        with torch.no_grad():
            mixed, ratio = mod.mixup_graph(x.clone(), grad, perm, block_num=g, alpha=lam, beta=1.2,
                                           gamma=0.5, eta=0.2, neigh_size=neigh, n_labels=3,
                                           mean=mean, std=std, transport=True, t_eps=0.8,
                                           t_size=t_size, device="cpu", mp=None)
        src = [_sources(p, b) for p in plans_seen]
        for k, v in (("width", width), ("grid", g), ("t_size", t_size), ("neigh", neigh),
                     ("lam", lam), ("perm", perm), ("images", img), ("sal", sal), ("src1", src[0]),
                     ("src2", src[1]), ("ratio", ratio.numpy())):
            rec[k].append(v)
        # the mixed images of the 64 px cases follow from the same plans (kept out for size)
        if width == 32:
            rec["mixed"].append(mixed.numpy().astype(np.float32))
    arrays = {"mean": MEAN, "std": STD,
              **{k: np.stack([np.asarray(v) for v in vs]) for k, vs in rec.items()}}
    note = _note(repo, b)
    write_fixture(out, "puzzlemix_tsize_official.npz", arrays, note)
    return note


def _sources(plan, b: int) -> np.ndarray:
    """A transport plan as "block i goes to place j" [b, 256]: -1 where a row is empty (or past the
    grid)."""
    s = np.full((b, 256), -1, np.int16)
    has, col = plan.max(-1)
    n = plan.shape[-1]
    s[:, :n] = np.where(has.numpy() > 0, col.numpy(), -1)
    return s


def _note(repo: Path, b: int) -> dict:
    return {"repository": "https://github.com/snu-mllab/PuzzleMix",
            "commit": checkout_commit(repo),
            "functions": ["mixup.py:mixup_graph (t_size >= 1)", "mixup.py:mask_transport",
                          "mixup.py:transport_image"],
            "cases": [list(c) for c in CASES], "case_layout": "(width, grid, t_size, neigh_size)",
            "batch": b, "knobs": "beta 1.2, gamma 0.5, eta 0.2, n_labels 3, t_eps 0.8, lam ~ "
                                 "U(0.1, 0.9) stored",
            "inputs": "images uint8 [case, b, 3, 64, 64] and sal float16 [case, b, 64, 64], the "
                      "top-left width x width used; x / 255 normalised with ImageNet mean / std",
            "outputs": "src1 / src2 [case, b, 256]: the place each transport block of x / "
                       "x[perm] moves to (-1: dropped), on the transport grid; ratio [case, b]; "
                       "mixed [case with width 32, b, 3, 32, 32] = the normalised mixed images"}


@cli.entry
def main(argv=None) -> int:
    ap = cli.parser(__doc__)
    ap.add_argument("--puzzlemix", type=Path, required=True,
                    help="checkout of github.com/snu-mllab/PuzzleMix")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests"
                    / "fixtures",
                    help="folder of the fixture file (default tests/fixtures)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(json.dumps(tsize_cases(args.puzzlemix, args.out), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
