"""Write tests/fixtures/*.npz (PuzzleMix, CutMix, AlignMix) by running the AUTHORS' functions
offline.

Nothing of the authors' code is copied into this project: this script imports it from a checkout
of the official repository whose path is given on the command line, feeds it seeded inputs and
stores inputs and outputs (numbers only) with a note of repository, commit and function.

    git --git-dir=<bare mirror> archive HEAD | tar -x -C /work/ref/PuzzleMix   (or any checkout)
    git --git-dir=<bare mirror> rev-parse HEAD > /work/ref/PuzzleMix/COMMIT
    python tools/make_method_fixtures.py --puzzlemix /work/ref/PuzzleMix \\
        --alignmix /work/ref/AlignMixup_CVPR22 [--out tests/fixtures]

Needs torch, numpy and (for PuzzleMix) gco-wrapper, the graph-cut package the authors import.
The official code calls `.cuda()`; on a machine without a GPU that call is made the identity.
"""

# the official code draws from numpy's global RNG (and uses np.int): seeding it is the point here
# ruff: noqa: NPY001, NPY002

from __future__ import annotations

import importlib.util
import json
import random
import sys
import zlib
from pathlib import Path

import numpy as np
import torch

from mixup_transfer.core import cli
from mixup_transfer.core.constants import IMAGENET_MEAN, IMAGENET_STD
from mixup_transfer.core.official import checkout_commit, write_fixture

MEAN = np.array(IMAGENET_MEAN, np.float32).reshape(1, 3, 1, 1)
STD = np.array(IMAGENET_STD, np.float32).reshape(1, 3, 1, 1)


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def smooth_images(rng: np.random.Generator, b: int, width: int) -> np.ndarray:
    """uint8 [b, 3, w, w]: blocky low-frequency colour fields plus noise (so that the smoothness
    term sees real boundaries)."""
    low = rng.uniform(0, 1, (b, 3, 4, 4))
    up = low.repeat(width // 4, 2).repeat(width // 4, 3)
    img = np.clip(up + rng.normal(0, 0.08, up.shape), 0, 1)
    return (img * 255).round().astype(np.uint8)


def saliency_maps(rng: np.random.Generator, b: int, width: int) -> np.ndarray:
    """float16 [b, w, w] >= 0: a few bumps plus noise, like |grad| maps."""
    yy, xx = np.mgrid[0:width, 0:width] / width
    out = np.zeros((b, width, width))
    for i in range(b):
        for _ in range(3):
            cy, cx, s = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
            out[i] += rng.uniform(0.5, 2) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2)
                                                   / (2 * s * s))
    out += np.abs(rng.normal(0, 0.05, out.shape))
    return (out * 0.01).astype(np.float16)


def puzzlemix_cases(repo: Path, out: Path, n_cases: int = 48, b: int = 2, width: int = 32,
                    n_full: int = 12):
    mod = _load(repo / "mixup.py", "official_puzzlemix_mixup")
    masks_seen, plans_seen = [], []
    real_cut, real_transport = mod.graphcut_multi, mod.mask_transport

    def cut(*a, **k):
        m = real_cut(*a, **k)
        masks_seen.append(np.asarray(m, np.float32))
        return m

    def transport(mask, grad_pool, eps=0.01):
        p = real_transport(mask, grad_pool, eps=eps)
        plans_seen.append(p.clone())
        return p

    mod.graphcut_multi, mod.mask_transport = cut, transport
    rng = np.random.default_rng(20240613)
    grids, lams = [2, 4, 8, 16], [0.1, 0.3, 0.5, 0.7, 0.9, 0.2, 0.4, 0.6, 0.8]
    betas, gammas, etas, neighs = [1.2, 0.0, 3.0], [0.5, 0.0, 2.0], [0.2, 0.0, 1.0], [2, 4]
    t_epss = [0.8, 0.2]
    rec = {k: [] for k in ("images", "sal", "perm", "grid", "lam", "beta", "gamma", "eta", "neigh",
                           "t_eps", "mask", "src1", "src2", "ratio")}
    full = []
    mean, std = torch.from_numpy(MEAN), torch.from_numpy(STD)
    for c in range(n_cases):
        img = smooth_images(rng, b, width)
        sal = saliency_maps(rng, b, width)
        perm = rng.permutation(b) if b > 2 else np.array([1, 0])
        g, lam = grids[c % 4], lams[c % len(lams)]
        beta, gamma, eta = betas[(c // 4) % 3], gammas[(c // 12) % 3], etas[(c // 2) % 3]
        neigh, t_eps = neighs[(c // 3) % 2], t_epss[(c // 5) % 2]
        x = (torch.from_numpy(img.astype(np.float32)) / 255 - mean) / std
        grad = torch.from_numpy(sal.astype(np.float32))
        masks_seen.clear(), plans_seen.clear()
        with torch.no_grad():
            mixed, ratio = mod.mixup_graph(x.clone(), grad, perm, block_num=g, alpha=lam,
                                           beta=beta, gamma=gamma, eta=eta, neigh_size=neigh,
                                           n_labels=3, mean=mean, std=std, transport=True,
                                           t_eps=t_eps, t_size=-1, device="cpu", mp=None)
        mask = np.zeros((b, 16, 16), np.float32)
        mask[:, :g, :g] = np.stack(masks_seen)
        src = [_plan_sources(p, b, g) for p in plans_seen]
        for k, v in (("images", img), ("sal", sal), ("perm", perm), ("grid", g), ("lam", lam),
                     ("beta", beta), ("gamma", gamma), ("eta", eta), ("neigh", neigh),
                     ("t_eps", t_eps), ("mask", mask), ("src1", src[0]), ("src2", src[1]),
                     ("ratio", ratio.numpy())):
            rec[k].append(v)
        if c < n_full:
            full.append(mixed.numpy().astype(np.float32))
    arrays = {k: np.stack([np.asarray(v) for v in vs]) for k, vs in rec.items()}
    arrays.update(mixed=np.stack(full), mean=MEAN, std=STD)
    note = _puzzlemix_note(repo, n_cases, b, width, n_full)
    write_fixture(out, "puzzlemix_official.npz", arrays, note)
    return note


def _plan_sources(plan, b: int, g: int) -> np.ndarray:
    """A transport plan as "block i goes to place j" [b, 256]: -1 where a row of the plan is
    empty."""
    s = np.full((b, 256), -1, np.int16)
    has, col = plan.max(-1)
    s[:, : g * g] = np.where(has.numpy() > 0, col.numpy(), -1)
    return s


def _puzzlemix_note(repo: Path, n_cases: int, b: int, width: int, n_full: int) -> dict:
    return {"repository": "https://github.com/snu-mllab/PuzzleMix",
            "commit": checkout_commit(repo),
            "functions": ["mixup.py:mixup_graph", "mixup.py:graphcut_multi",
                          "mixup.py:mask_transport", "mixup.py:transport_image"],
            "cases": n_cases, "batch": b, "width": width, "n_labels": 3, "t_size": -1,
            "inputs": "images uint8 (x / 255 normalised with ImageNet mean/std, as the official "
                      "ImageNet script feeds them), sal float16 = the unary map sqrt(mean_c "
                      "grad^2) [b, w, w]",
            "outputs": "mask [case, b, 16, 16] (top-left grid x grid used), src1/src2 [case, b, "
                       "256]: the place each block of x / x[perm] is moved to (-1: dropped), "
                       f"ratio [case, b], mixed [first {n_full} cases] = the normalised mixed "
                       "images"}


def cutmix_cases(repo: Path, out: Path, n: int = 1500):
    """CutMix boxes from PuzzleMix imagenet/train.py:rand_bbox (the CutMix authors' function,
    copied there from clovaai/CutMix-PyTorch train.py), seeded; square sizes (the function swaps H
    and W)."""
    if not hasattr(np, "int"):
        np.int = int  # the official code uses np.int (removed in numpy 1.24); same meaning
    # imagenet/mixup.py builds cuda tensors at import
    torch.Tensor.cuda = lambda self, *a, **k: self
    sys.path.insert(0, str(repo / "imagenet"))
    train = _load(repo / "imagenet" / "train.py", "official_puzzlemix_imagenet_train")
    rng = np.random.default_rng(3)
    sizes, lams, boxes, centres = [], [], [], []
    for i in range(n):
        size = [224, 64, 32, 7][i % 4]
        lam = float(rng.beta(1.0, 1.0))
        np.random.seed(i)
        cx, cy = np.random.randint(size), np.random.randint(size)  # the draws rand_bbox makes
        np.random.seed(i)
        boxes.append([int(v) for v in train.rand_bbox((4, 3, size, size), lam)])
        sizes.append(size), lams.append(lam), centres.append((cx, cy))
    arrays = {"size": np.array(sizes), "lam": np.array(lams), "centre": np.array(centres),
              "box": np.array(boxes)}
    note = _cutmix_note(repo)
    write_fixture(out, "cutmix_official.npz", arrays, note)
    return note


def _cutmix_note(repo: Path) -> dict:
    return {"repository": "https://github.com/snu-mllab/PuzzleMix",
            "commit": checkout_commit(repo),
            "functions": ["imagenet/train.py:rand_bbox (CutMix's box sampler)"],
            "inputs": "size (square), lam ~ Beta(1, 1), centre = rand_bbox's two "
                      "np.random.randint draws (dim 2, dim 3)",
            "outputs": "box = (bbx1, bby1, bbx2, bby2) as rand_bbox returns it; the pasted "
                       "region is [:, :, bbx1:bbx2, bby1:bby2]"}


def _alignmix_note(repo: Path) -> dict:
    """The fixture's provenance entry (official_fixtures.json)."""
    return {"repository": "https://github.com/shashankvkt/AlignMixup_CVPR22",
            "commit": checkout_commit(repo),
            "functions": ["imagenet/models/resnet50_classifier.py:mixup_aligned",
                          "imagenet/utils/OT.py:SinkhornDistance (eps 0.1, max_iter 100, "
                          "threshold 1e-1)"],
            "inputs": "feat [case, b, c, h, w] zero-padded to [4, 16, 7, 7]; shape gives the "
                      "used part; lam; perm and branch = the draws np.random.permutation / "
                      "random.randint(0, 1) made inside mixup_aligned (seeded)",
            "outputs": "mixed (the function's output), plan = SinkhornDistance(A^T, A[perm]^T) "
                       "[case, b, 49, 49] zero-padded, iters = Sinkhorn iterations run before "
                       "the official stopping rule"}


def alignmix_cases(repo: Path, out: Path):
    torch.Tensor.cuda = lambda self, *a, **k: self  # the official code calls .cuda() everywhere
    base = repo / "imagenet"
    sys.path.insert(0, str(base))
    ot = _load(base / "utils" / "OT.py", "official_alignmix_ot")
    sys.modules["utils.OT"] = ot
    clf = _load(base / "models" / "resnet50_classifier.py", "official_alignmix_classifier")
    n_calls = [0]
    real_m = ot.SinkhornDistance.M

    def counted(self, C, u, v):
        n_calls[0] += 1
        return real_m(self, C, u, v)

    ot.SinkhornDistance.M = counted
    rng = np.random.default_rng(7)
    rec = {k: [] for k in ("feat", "lam", "perm", "branch", "mixed", "plan", "iters")}
    shapes = [(4, 8, 4, 4), (4, 8, 4, 4), (3, 16, 2, 2), (4, 8, 7, 7), (4, 4, 4, 4), (4, 8, 4, 4)]
    scales = [0.3, 1.0, 0.5, 0.3, 2.0, 0.1]
    for c in range(12):
        shape, scale = shapes[c % len(shapes)], scales[c % len(scales)]
        feat = np.zeros((4, 16, 7, 7), np.float32)
        f = np.maximum(rng.normal(0, scale, shape), 0).astype(np.float32)
        feat[: shape[0], : shape[1], : shape[2], : shape[3]] = f
        lam = float(rng.beta(2, 2))
        seed = 1000 + c
        np.random.seed(seed)
        perm = np.random.permutation(shape[0])
        random.seed(seed)
        branch = random.randint(0, 1)
        np.random.seed(seed)
        random.seed(seed)
        x = torch.from_numpy(f)
        y = torch.arange(shape[0])
        final, ya, yb = clf.mixup_aligned(x, y, lam)
        assert torch.equal(yb, y[perm])
        n_calls[0] = 0
        a = x.view(shape[0], shape[1], -1)
        plan = ot.SinkhornDistance(eps=0.1, max_iter=100)(a.permute(0, 2, 1),
                                                          a[perm].permute(0, 2, 1))
        mixed = np.zeros_like(feat)
        mixed[: shape[0], : shape[1], : shape[2], : shape[3]] = final.numpy()
        p = np.zeros((4, 49, 49), np.float32)
        r = shape[2] * shape[3]
        p[: shape[0], :r, :r] = plan.numpy()
        for k, v in (("feat", feat), ("lam", lam), ("perm", np.pad(perm, (0, 4 - shape[0]))),
                     ("branch", branch), ("mixed", mixed), ("plan", p),
                     ("iters", (n_calls[0] - 1) // 2)):
            rec[k].append(v)
        rec.setdefault("shape", []).append(shape)
    arrays = {k: np.stack([np.asarray(v) for v in vs]) for k, vs in rec.items()}
    note = _alignmix_note(repo)
    write_fixture(out, "alignmix_official.npz", arrays, note)
    return note


def _official_alignmix_modules(base: Path, tag: str):
    """(OT module, classifier module, counter of Sinkhorn iterations) of one folder of the
    AlignMixup code."""
    torch.Tensor.cuda = lambda self, *a, **k: self  # the official code calls .cuda() everywhere
    for name in ("models", "models.resnet", "utils", "utils.OT"):
        sys.modules.pop(name, None)
    sys.path.insert(0, str(base))
    ot = _load(base / "utils" / "OT.py", f"official_alignmix_ot_{tag}")
    sys.modules["utils.OT"] = ot
    clf = _load(base / "models" / "resnet18_classifier.py", f"official_alignmix_classifier_{tag}")
    sys.path.remove(str(base))
    calls = [0]
    real_m = ot.SinkhornDistance.M

    def counted(self, C, u, v):
        calls[0] += 1
        return real_m(self, C, u, v)

    ot.SinkhornDistance.M = counted
    return ot, clf, calls


def layer4_like(rng: np.random.Generator, b: int, c: int, side: int, scale: float) -> np.ndarray:
    """float16-exact [b, c, side, side] maps shaped like a trained ResNet's layer4 output: ReLU of
    Gaussians with a per-channel mean (some channels mostly off) and a per-image spatial bump,
    times `scale`."""
    mu = rng.normal(-0.3, 0.8, (1, c, 1, 1))
    yy, xx = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    cy, cx = rng.uniform(0, side - 1, (2, b, 1, 1, 1))
    bump = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / side)
    f = np.maximum(mu + bump + rng.normal(0, 1, (b, c, side, side)), 0) * scale
    return f.astype(np.float16).astype(np.float32)


def alignmix_c512_cases(repo: Path, out: Path):
    """The released `mixup_aligned` (cifar10_100 and tiny_imgnet, whose copies are the same
    function) with SinkhornDistance's threshold stop, at the channel count it runs at (c = 512) on
    4 x 4 and 8 x 8 maps."""
    rec: dict[str, list] = {}
    rng = np.random.default_rng(512)
    # feature scales: trained layer4 maps are O(1); the small ones make the threshold stop the
    # iterations early
    for folder, side, scales in (("cifar10_100", 4, (0.5, 1.0, 2.0, 0.05, 0.1, 1.0)),
                                 ("tiny_imgnet", 8, (1.0, 0.05))):
        ot, clf, calls = _official_alignmix_modules(repo / folder, folder)
        for case, scale in enumerate(scales):
            feat = layer4_like(rng, 4, 512, side, scale)
            lam, seed = float(rng.beta(2, 2)), 5120 + 100 * side + 10 * case
            while (random.seed(seed), random.randint(0, 1))[1] != case % 2:  # both branches
                seed += 1
            np.random.seed(seed)
            perm = np.random.permutation(4)
            random.seed(seed)
            branch = random.randint(0, 1)
            np.random.seed(seed)
            random.seed(seed)
            x = torch.from_numpy(feat)
            final, _, yb = clf.mixup_aligned(x, torch.arange(4), lam)
            assert torch.equal(yb, torch.arange(4)[perm])
            calls[0] = 0
            a = x.view(4, 512, -1)
            plan = ot.SinkhornDistance(eps=0.1, max_iter=100)(a.permute(0, 2, 1),
                                                              a[perm].permute(0, 2, 1))
            for k, v in (("feat", feat.reshape(4, 512, -1).astype(np.float16)), ("lam", lam),
                         ("perm", perm), ("branch", branch),
                         ("mixed", final.numpy().reshape(4, 512, -1)[:, :64]),
                         ("plan", plan.numpy()), ("iters", (calls[0] - 1) // 2)):
                rec.setdefault(f"{k}_s{side}", []).append(v)
    arrays = {k: np.stack([np.asarray(v) for v in vs]) for k, vs in rec.items()}
    note = _alignmix_c512_note(repo)
    write_fixture(out, "alignmix_official_c512.npz", arrays, note)
    return note


def _alignmix_c512_note(repo: Path) -> dict:
    return {"repository": "https://github.com/shashankvkt/AlignMixup_CVPR22",
            "commit": checkout_commit(repo),
            "functions": ["cifar10_100/models/resnet18_classifier.py:mixup_aligned (side 4)",
                          "tiny_imgnet/models/resnet18_classifier.py:mixup_aligned (side 8)",
                          "{cifar10_100,tiny_imgnet}/utils/OT.py:SinkhornDistance (eps 0.1, "
                          "max_iter 100, threshold 1e-1)"],
            "inputs": "per map side s in (4, 8), key suffix _s<s>: feat [case, 4, 512, s*s] "
                      "float16 (exact in float32: the layer4-like map [4, 512, s, s] flattened "
                      "row-major); lam; perm and branch = the draws made inside mixup_aligned "
                      "(seeded)",
            "outputs": "mixed [case, 4, 64, s*s] = the function's output, first 64 of the 512 "
                       "channels; plan = SinkhornDistance(A^T, A[perm]^T) [case, 4, s*s, s*s]; "
                       "iters = Sinkhorn iterations run before the official stopping rule"}


def fill_by_name(state: dict, rename=lambda k: k) -> dict:
    """A deterministic state dict: each tensor drawn from a generator seeded with crc32 of its
    (renamed) key, so that two implementations of one network get equal weights without storing
    them. BN weights in [0.5, 1.5], running variances in [0.5, 2], other tensors N(0, 0.05);
    num_batches_tracked kept."""
    out = {}
    for k, v in state.items():
        name = rename(k)
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        if k.endswith("num_batches_tracked"):
            out[k] = v
        elif k.endswith("running_var") or (k.endswith(".weight") and v.ndim == 1):
            out[k] = torch.from_numpy(rng.uniform(0.5, 2.0 if "running" in k else 1.5,
                                                  v.shape).astype(np.float32))
        else:
            out[k] = torch.from_numpy(rng.normal(0, 0.05, v.shape).astype(np.float32))
    return out


def alignmix_network_case(repo: Path, out: Path):
    """The AlignMixup CIFAR PreAct-ResNet-18 (cifar10_100/models/resnet.py `ResNet18`, the encoder
    of resnet18_classifier.py) with `fill_by_name` weights (keys renamed to the toolkit's: shortcut
    -> downsample): its layer4 map of seeded images, in eval mode."""
    resnet = _load(repo / "cifar10_100" / "models" / "resnet.py", "official_alignmix_resnet")
    net = resnet.ResNet18().eval()
    net.load_state_dict(fill_by_name(net.state_dict(),
                                     lambda k: k.replace("shortcut", "downsample")))
    x = np.random.default_rng(18).uniform(0, 1, (2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        fmap = net(torch.from_numpy(x)).numpy()
    note = _alignmix_network_note(repo)
    write_fixture(out, "alignmix_preactresnet18.npz", {"x": x, "layer4": fmap}, note)
    return note


def _alignmix_network_note(repo: Path) -> dict:
    return {"repository": "https://github.com/shashankvkt/AlignMixup_CVPR22",
            "commit": checkout_commit(repo),
            "functions": ["cifar10_100/models/resnet.py:ResNet18 (forward, eval mode)"],
            "inputs": "x [2, 3, 32, 32] in [0, 1] (fed to the network as is); weights: "
                      "make_method_fixtures.fill_by_name on the network's state dict with "
                      "'shortcut' renamed 'downsample'",
            "outputs": "layer4 [2, 512, 4, 4] = ResNet18()(x) (stem conv-BN-ReLU, then "
                       "layer1..layer4)"}


@cli.entry
def main(argv=None) -> int:
    ap = cli.parser(__doc__)
    ap.add_argument("--puzzlemix", type=Path, help="checkout of github.com/snu-mllab/PuzzleMix")
    ap.add_argument("--alignmix", type=Path, help="checkout of "
                                                  "github.com/shashankvkt/AlignMixup_CVPR22")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests"
                    / "fixtures",
                    help="output folder of the .npz fixtures (default tests/fixtures)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    notes = {}
    if args.puzzlemix:
        notes["puzzlemix_official.npz"] = puzzlemix_cases(args.puzzlemix, args.out)
        notes["cutmix_official.npz"] = cutmix_cases(args.puzzlemix, args.out)
    if args.alignmix:
        notes["alignmix_official.npz"] = alignmix_cases(args.alignmix, args.out)
        notes["alignmix_official_c512.npz"] = alignmix_c512_cases(args.alignmix, args.out)
        notes["alignmix_preactresnet18.npz"] = alignmix_network_case(args.alignmix, args.out)
    print(json.dumps(notes, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
