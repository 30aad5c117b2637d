"""Write tests/fixtures/tokenmix_official.npz: the official TokenMix functions (Sense-X/TokenMix,
tokenmix.py: `generate_mask`, `generate_mask_random`, `get_labelmaps_with_coords`, `mixup_target`,
`Mixup.__call__`) run offline on seeded inputs, numbers only.

    git --git-dir=<mirror of Sense-X/TokenMix> archive HEAD | tar -x -C /tmp/TokenMix
    git --git-dir=<mirror of Sense-X/TokenMix> rev-parse HEAD > /tmp/TokenMix/COMMIT
    python tools/make_tokenmix_fixture.py --tokenmix /tmp/TokenMix [--out tests/fixtures]

`generate_mask` draws from Python's global `random`: the script seeds it and records every draw
with its arguments (kind 0 = uniform(a, b), 1 = randint(a, b); `draws_k` rows [kind, a, b, value])
so that a test can replay them into `pretrain.methods.tokenmix.block_token_mask`.
`generate_mask_random` draws `np.random.permutation(196)`, recorded the same way (`perm_k`). The
official code needs opencv-python at import and `np.int` (numpy < 1.24): the script defines `np.int
= int`, and makes the CPU the default device of `get_labelmaps_with_coords`.
"""

# the official code draws from the global RNGs: seeding them is the point here
# ruff: noqa: NPY002

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import numpy as np
import torch

from mixup_transfer.core import cli
from mixup_transfer.core.official import checkout_commit, write_fixture

BLOCK_CASES = [(0.5, 14), (0.5, 0), (0.3, 14), (0.8, 1), (0.1, 0), (0.5, 14), (0.95, 14), (0.2, 5)]
RANDOM_CASES = [(0.5, 14), (0.3, 0)]
CLASSES, B, K, MAP = 10, 4, 5, 15  # label maps: top-K of CLASSES scores on a MAP x MAP grid


class _Recorder:
    """Python's `random` for the official module, recording every uniform / randint draw."""

    def __init__(self):
        self.rows = []

    def uniform(self, a, b):
        v = random.uniform(a, b)
        self.rows.append((0, a, b, v))
        return v

    def randint(self, a, b):
        v = random.randint(a, b)
        self.rows.append((1, a, b, v))
        return v


def _official(root: Path):
    if not hasattr(np, "int"):
        # the official generate_mask uses the alias (removed in numpy 1.24)
        np.int = int  # noqa: NPY001
    spec = importlib.util.spec_from_file_location("official_tokenmix", root / "tokenmix.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # Mixup.__call__ builds its label maps on the default device "cuda": make it the CPU
    mod.get_labelmaps_with_coords.__defaults__ = (1.0, 0.0, 1, "cpu")
    return mod


def _masks(mod, out: dict) -> None:
    for k, (lam, start) in enumerate(BLOCK_CASES):
        rec = _Recorder()
        mod.random = rec
        random.seed(2000 + k)
        mask, lam_out = mod.generate_mask(lam, "cpu", start)
        out.update({f"block_mask_{k}": mask[0, 0].numpy().astype(np.int64),
                    f"block_lam_{k}": np.float64(lam_out),
                    f"draws_{k}": np.array(rec.rows, dtype=np.float64)})
    for k, (lam, start) in enumerate(RANDOM_CASES):
        np.random.seed(3000 + k)
        out[f"perm_{k}"] = np.random.permutation(196)
        np.random.seed(3000 + k)
        mask, lam_out = mod.generate_mask_random(lam, "cpu", start)
        out.update({f"random_mask_{k}": mask[0, 0].numpy().astype(np.int64),
                    f"random_lam_{k}": np.float64(lam_out)})
    out["block_cases"], out["random_cases"] = np.array(BLOCK_CASES), np.array(RANDOM_CASES)


def _label_maps(g: torch.Generator) -> torch.Tensor:
    """TokenLabeling-format targets [B, 3, K, MAP, MAP]: top-K scores, their class indices, and in
    [:, 2, 0, 0] the crop box (0, 0, 1, 1: the whole map; the official code adds x1, y1 to w, h)
    and the hard label at 5."""
    t = torch.zeros(B, 3, K, MAP, MAP)
    t[:, 0] = torch.rand(B, K, MAP, MAP, generator=g).sort(1, descending=True).values
    t[:, 1] = torch.stack([torch.randperm(CLASSES, generator=g)[:K] for _ in range(B * MAP * MAP)]
                          ).reshape(B, MAP, MAP, K).permute(0, 3, 1, 2).float()
    t[:, 2, 0, 0, 2:4] = 1.0
    t[:, 2, 0, 0, 5] = torch.randint(CLASSES, (B,), generator=g).float()
    return t


def _targets(mod, out: dict) -> None:
    g = torch.Generator().manual_seed(4000)
    for k in range(3):
        target = _label_maps(g)
        x = torch.randint(0, 4, (B, 1, 224, 224), generator=g).float()
        label_map = mod.get_labelmaps_with_coords(target.clone(), CLASSES, label_size=14,
                                                  device="cpu")
        mixer = mod.Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.1,
                          num_classes=CLASSES)
        rec = _Recorder()
        mod.random = rec
        random.seed(5000 + k)
        np.random.seed(5000 + k)
        mixed, y = mixer(x.clone(), target.clone())
        out.update({f"t_topk_{k}": target[:, :2].numpy(),
                    f"t_labels_{k}": target[:, 2, 0, 0, 5].long().numpy(),
                    f"t_label_map_{k}": label_map.numpy(), f"t_target_{k}": y.numpy(),
                    f"t_draws_{k}": np.array(rec.rows, dtype=np.float64)})
        if k == 0:  # the images of one case (the mask of every case is pinned by its draws)
            out.update({"t_x": x.numpy().astype(np.uint8),
                        "t_mixed": mixed.numpy().astype(np.uint8)})
    labels = torch.tensor([3, 1, 4, 1, 5, 9])
    for k, lam in enumerate([0.0, 0.37, 1.0]):
        out[f"mixup_target_{k}"] = mod.mixup_target(labels, CLASSES, lam, 0.1,
                                                    device="cpu").numpy()
    out["mixup_labels"], out["mixup_lams"] = labels.numpy(), np.array([0.0, 0.37, 1.0])


def build(root: Path) -> dict:
    mod = _official(root)
    out: dict = {}
    _masks(mod, out)
    _targets(mod, out)
    return out


@cli.entry
def main(argv=None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--tokenmix", type=Path, required=True, help="a checkout of Sense-X/TokenMix")
    p.add_argument("--out", type=Path, default=Path("tests/fixtures"), help="the fixtures folder")
    args = p.parse_args(argv)
    note = {
        "repository": "https://github.com/Sense-X/TokenMix",
        "commit": checkout_commit(args.tokenmix),
        "functions": ["tokenmix.py:generate_mask", "tokenmix.py:generate_mask_random",
                      "tokenmix.py:get_labelmaps_with_coords", "tokenmix.py:mixup_target",
                      "tokenmix.py:Mixup"],
        "cases": {"block (lam, mask_token_num_start)": [list(c) for c in BLOCK_CASES],
                  "random (lam, mask_token_num_start)": [list(c) for c in RANDOM_CASES]},
        "inputs": "Python random seeded 2000 + k (block masks, every draw recorded in draws_k), "
                  "numpy seeded 3000 + k (perm_k: the permutation generate_mask_random draws); "
                  "TokenLabeling-format targets of 4 images, 10 classes, top-5 on 15 x 15 maps, "
                  "the whole map as crop box (torch seeded 4000); images [4, 1, 224, 224] with "
                  "values 0..3 (those of case 0 kept)",
        "outputs": "block/random masks [14, 14] and lam; label maps [4, 10, 14, 14]; "
                   "Mixup(cutmix only, smoothing 0.1) mixed images and targets with its draws "
                   "(t_draws_k); mixup_target for lam 0, 0.37, 1"}
    print(f"wrote {write_fixture(args.out, 'tokenmix_official.npz', build(args.tokenmix), note)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
