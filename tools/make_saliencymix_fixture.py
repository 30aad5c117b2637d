"""Write tests/fixtures/saliencymix_official.npz: the official SaliencyMix box
(afm-shahab-uddin/SaliencyMix, `SaliencyMix_CIFAR/saliencymix.py:saliency_bbox`, the same function
as SaliencyMix-ImageNet/train.py's) and the OpenCV fine-grained saliency it calls, run offline on
seeded 8-bit images, numbers only.

    git --git-dir=<mirror of afm-shahab-uddin/SaliencyMix> archive HEAD \\
        | tar -x -C /tmp/SaliencyMix
    git --git-dir=<mirror of afm-shahab-uddin/SaliencyMix> rev-parse HEAD > /tmp/SaliencyMix/COMMIT
    pip install --target /tmp/cv2-contrib opencv-contrib-python-headless==5.1.0.95
    PYTHONPATH=/tmp/cv2-contrib python tools/make_saliencymix_fixture.py \\
        --saliencymix /tmp/SaliencyMix

The script's other lines parse arguments and train, so only `saliency_bbox` is taken from the file
(by its syntax tree) and run with numpy, OpenCV (the contrib build: `cv2.saliency`) and `np.int =
int` (numpy >= 1.24).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import numpy as np
import torch

from mixup_transfer.core import cli
from mixup_transfer.core.official import checkout_commit, write_fixture

SOURCE = "SaliencyMix_CIFAR/saliencymix.py"
# h, w, cases
SIZES = [(16, 16, 6), (32, 32, 9), (33, 33, 3), (64, 64, 6), (20, 48, 3), (96, 96, 3),
         (224, 224, 3)]


def _official(root: Path):
    """`saliency_bbox` from the official script, compiled alone, and the cv2 module it uses."""
    import cv2

    if not hasattr(cv2, "saliency"):
        raise SystemExit("cv2.saliency is missing: put opencv-contrib-python-headless first on "
                         "PYTHONPATH")
    tree = ast.parse((root / SOURCE).read_text())
    func = next(n for n in tree.body if isinstance(n, ast.FunctionDef)
                and n.name == "saliency_bbox")
    np.int = int  # noqa: NPY001 - the official code's np.int, removed in numpy 1.24
    scope = {"np": np, "cv2": cv2}
    exec(compile(ast.Module([func], type_ignores=[]), SOURCE, "exec"), scope)
    return scope["saliency_bbox"], cv2


def _image(rng: np.random.Generator, h: int, w: int, kind: int) -> np.ndarray:
    """uint8 [3, h, w]: noise, a flat image with a patch, or smooth ramps (the kinds that stress
    the map)."""
    if kind == 0:
        return rng.integers(0, 256, (3, h, w), dtype=np.uint8)
    if kind == 1:
        img = np.clip(rng.integers(40, 216, (3, 1, 1)) + rng.normal(0, 12, (3, h, w)), 0, 255)
        y, x = int(rng.integers(h - h // 4)), int(rng.integers(w - w // 4))
        img[:, y:y + h // 4, x:x + w // 4] = rng.integers(0, 256, (3, 1, 1))
        return img.astype(np.uint8)
    yy, xx = np.mgrid[:h, :w]
    return np.stack([yy * 255 // (h - 1), xx * 255 // (w - 1),
                     (3 * yy + xx) % 256]).astype(np.uint8)


def build(root: Path) -> dict:
    bbox, cv2 = _official(root)
    detector = cv2.saliency.StaticSaliencyFineGrained_create()
    rng = np.random.default_rng(2006)
    out, k = {}, 0
    for h, w, n in SIZES:
        for j in range(n):
            img, lam = _image(rng, h, w, j % 3), float(rng.beta(1.0, 1.0))
            ok, sal = detector.computeSaliency(np.ascontiguousarray(img.transpose(1, 2, 0)))
            assert ok
            out[f"image_{k}"] = img
            out[f"saliency_{k}"] = np.round(sal * 255).astype(np.uint8)  # sal = an 8-bit map / 255
            out[f"lam_{k}"] = np.float64(lam)
            out[f"box_{k}"] = np.array([int(v) for v in bbox(torch.from_numpy(img), lam)])
            k += 1
    out["count"] = np.int64(k)
    return out


@cli.entry
def main(argv=None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--saliencymix", type=Path, required=True,
                   help="a checkout of afm-shahab-uddin/SaliencyMix")
    p.add_argument("--out", type=Path, default=Path("tests/fixtures"), help="the fixtures folder")
    args = p.parse_args(argv)
    from importlib.metadata import version

    data = build(args.saliencymix)
    note = {
        "repository": "https://github.com/afm-shahab-uddin/SaliencyMix",
        "commit": checkout_commit(args.saliencymix),
        "functions": [f"{SOURCE}:saliency_bbox",
                      "cv2.saliency.StaticSaliencyFineGrained.computeSaliency"],
        "opencv": f"opencv-contrib-python-headless {version('opencv-contrib-python-headless')}",
        "cases": int(data["count"]), "sizes": " ".join(f"{h}x{w}:{n}" for h, w, n in SIZES),
        "inputs": "image_k uint8 [3, h, w] (noise, flat with a patch, ramps; numpy "
                  "default_rng(2006)), lam_k a Beta(1, 1) draw of the same generator",
        "outputs": "saliency_k uint8 [h, w] = 255 x computeSaliency(the HWC image), rounded "
                   "(its float32 map is an 8-bit map / 255), box_k = saliency_bbox(image_k as a "
                   "tensor, lam_k): (bbx1, bby1, bbx2, bby2), rows then columns"}
    path = write_fixture(args.out, "saliencymix_official.npz", data, note)
    print(f"wrote {path} ({int(data['count'])} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
