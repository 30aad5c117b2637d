"""Write tests/fixtures/transmix_official.npz: the official TransMix functions (Beckschen/TransMix,
`transmix.py:Mixup_transmix.__call__` and `Mixup_transmix.transmix_label`, over timm 0.5.4's
`Mixup`) run offline on seeded inputs, numbers only.

    git --git-dir=<mirror of Beckschen/TransMix> archive HEAD | tar -x -C /tmp/TransMix
    git --git-dir=<mirror of Beckschen/TransMix> rev-parse HEAD > /tmp/TransMix/COMMIT
    # the timm version its requirements.txt pins
    pip install --no-deps --target /tmp/timm054 timm==0.5.4
    PYTHONPATH=/tmp/timm054:$PYTHONPATH \
        python tools/make_transmix_fixture.py --transmix /tmp/TransMix

The official mixing draws from numpy's global generator (`np.random.rand` twice, `np.random.beta`,
then `np.random.randint` for the box centre's row and column): each case seeds it and records every
draw as it is made (what `pretrain.methods.transmix` takes from its own host generator), then keeps
the mixed images, the box, the area-based lam and the final targets (`transmix_label` on a seeded
positive attention [b, side^2] for CutMix).
"""

# the official code draws from numpy's global RNG: seeding and recording it is the point here
# ruff: noqa: NPY002

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

from mixup_transfer.core import cli
from mixup_transfer.core.official import checkout_commit, write_fixture

# (batch, image side, patch-grid side, P(mixing)); one-channel images (the mixing treats channels
# alike), 8-bit values as a decoded image's, kept small; knobs are the DeiT-S config's (mixup 0.8,
# cutmix 1.0) and train.py's defaults (switch 0.5, smoothing 0.1)
CASES = [(4, 32, 4, 1.0), (4, 64, 8, 1.0), (2, 64, 8, 1.0), (2, 56, 7, 1.0), (4, 50, 7, 1.0),
         (4, 64, 8, 1.0), (4, 32, 4, 0.5), (4, 64, 8, 0.5), (2, 32, 4, 1.0), (4, 48, 6, 1.0),
         (6, 32, 4, 1.0), (4, 64, 8, 1.0), (4, 50, 7, 1.0), (2, 50, 7, 1.0), (4, 60, 8, 1.0),
         (4, 50, 7, 1.0), (2, 42, 6, 1.0), (4, 56, 7, 1.0)]
CLASSES, MIXUP_ALPHA, CUTMIX_ALPHA, SWITCH, SMOOTHING = 10, 0.8, 1.0, 0.5, 0.1


def _official(root: Path):
    """Mixup_transmix from a checkout (it imports timm.data.mixup: timm 0.5.4 on the path)."""
    spec = importlib.util.spec_from_file_location("transmix", root / "transmix.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.Mixup_transmix


class _Recorder:
    """Wrap np.random.rand / beta / randint, recording each value drawn, in order."""

    def __init__(self):
        self.draws: list[tuple[str, float]] = []
        self._orig = {n: getattr(np.random, n) for n in ("rand", "beta", "randint")}

    def __enter__(self):
        for name, fn in self._orig.items():
            setattr(np.random, name, self._wrap(name, fn))
        return self

    def _wrap(self, name, fn):
        def drawn(*args, **kwargs):
            v = fn(*args, **kwargs)
            self.draws.append((name, float(v)))
            return v
        return drawn

    def __exit__(self, *exc):
        for name, fn in self._orig.items():
            setattr(np.random, name, fn)


def _case(mixup_cls, k: int, b: int, size: int, side: int, prob: float) -> dict:
    seed = 2000 + k
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(256, (b, 1, size, size), generator=g, dtype=torch.uint8)
    x = pixels.float() / 255
    y = torch.randint(CLASSES, (b,), generator=g)
    # positive, rows not normalised (cls -> cls left out)
    attn = torch.rand(b, side * side, generator=g) * 0.02
    fn = mixup_cls(mixup_alpha=MIXUP_ALPHA, cutmix_alpha=CUTMIX_ALPHA, prob=prob,
                   switch_prob=SWITCH, label_smoothing=SMOOTHING, num_classes=CLASSES)
    np.random.seed(seed)
    with _Recorder() as rec:
        mixed, target = fn(x.clone(), y)
    box = np.full(4, -1, np.int64)
    if isinstance(target, tuple):  # CutMix: the attention-based label
        box = np.array(target[3], dtype=np.int64)
        target = fn.transmix_label(target, attn, mixed.shape)
    names = [n for n, _ in rec.draws]
    return {f"pixels_{k}": pixels.numpy(), f"y_{k}": y.numpy(), f"attn_{k}": attn.numpy(),
            f"mixed_{k}": mixed.numpy(), f"targets_{k}": target.numpy(), f"box_{k}": box,
            f"draws_{k}": np.array([v for _, v in rec.draws]), f"draw_names_{k}": np.array(names)}


def build(root: Path) -> dict:
    if not torch.cuda.is_available():
        # transmix_label builds its mask with .cuda()
        torch.Tensor.cuda = lambda self, *a, **k: self
    mixup_cls = _official(root)
    out = {}
    for k, (b, size, side, prob) in enumerate(CASES):
        out.update(_case(mixup_cls, k, b, size, side, prob))
    out["cases"] = np.array(CASES, dtype=np.float64)
    return out


@cli.entry
def main(argv=None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--transmix", type=Path, required=True, help="a checkout of Beckschen/TransMix")
    p.add_argument("--out", type=Path, default=Path("tests/fixtures"), help="the fixtures folder")
    args = p.parse_args(argv)
    import timm

    note = {
        "repository": "https://github.com/Beckschen/TransMix",
        "commit": checkout_commit(args.transmix),
        "functions": ["transmix.py:Mixup_transmix.__call__",
                      "transmix.py:Mixup_transmix.transmix_label"],
        "timm": timm.__version__,
        "cases": [list(c) for c in CASES],
        "knobs": {"mixup_alpha": MIXUP_ALPHA, "cutmix_alpha": CUTMIX_ALPHA, "switch_prob": SWITCH,
                  "label_smoothing": SMOOTHING, "num_classes": CLASSES},
        "inputs": "np.random.seed(2000 + k); x = pixels_k / 255 (pixels_k [b, 1, s, s] uint8), "
                  "y_k [b], attn_k [b, side^2] uniform * 0.02 (torch, seeded with 2000 + k); "
                  "draws_k / draw_names_k: every numpy draw of the call, in order",
        "outputs": "mixed_k (the mixed images), box_k (yl, yh, xl, xh; -1 without CutMix), "
                   "targets_k (transmix_label for CutMix, the smoothed mixup target otherwise)"}
    path = write_fixture(args.out, "transmix_official.npz", build(args.transmix), note)
    print(f"wrote {path} ({len(CASES)} cases, timm {timm.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
