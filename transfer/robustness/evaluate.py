"""The robustness suites of one checkpoint on an ImageNet-layout validation set.

Suites (``SUITES``) and what ``metrics.json`` holds (all percentages):

- ``clean``: ``{top1_err, top5_err}`` after resize + centre crop.
- ``background``: ``{clean_loc, replace: {top1_err, top5_err, top1_loc}, noise: {...}}``; ``clean_loc`` is
  the top-1 localization of the clean images (CAM box at ``cam_threshold`` 0.25 of max, best IoU with the GT
  boxes ``iou_op`` ``iou_threshold``: >= 0.5 by default; multi-mix §IV-D counts IoU > 0.25).
- ``calibration``: ``{ece, oe}`` (10 equal-width bins) + reliability diagram.
- ``fgsm``: ``{top1_err}`` at eps 8/255; ``pgd``: ``{top1_err}`` at eps 4/255, step 2/255, 10 iterations,
  random start, plus ``fgsm_same_eps_top1_err`` (FGSM at the PGD budget: PGD must be at least as strong).
- ``ood``: ``{<set>: {det_acc, det_acc_at_thr, auroc, aupr_in, aupr_out, ...}}`` with the maximum softmax
  probability (``det_acc``: best threshold; ``det_acc_at_thr``: at ``ood_threshold``, 0.5 as AlignMix §4.3);
  sets are the ``ood_dirs`` folders (``DIR`` named by its folder name, or ``NAME=DIR``; images found
  recursively) and synthetic ``uniform`` / ``gaussian`` noise images, as many as there are ID images.

Choices the papers leave open (documented here and in ``settings``): the background is corrupted at the
evaluation resolution (after resize + crop; ``corrupt_at="original"`` corrupts the stored image before
resizing), the noise is clipped to [0, 1], the replacement image is another uniformly drawn validation
image (seeded, never the image itself) resized to the same size. The Gaussian OOD noise is N(mu, sigma) with
mu = sigma = 0.5 as AlignMix App. C states it ("N(mu, sigma) with mu = sigma = 0.5": sigma the standard
deviation; ``gaussian_std``), clipped to [0, 1]. Every per-image
draw depends on (seed, image index) only; the PGD random start is drawn per batch from (seed, batch
index), so it also depends on ``batch_size``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from core.runtime import autocast, get_device, progress, write_json

from . import figures
from .attacks import fgsm, pgd
from .calibration import calibration_bins, ece_oe
from .corruption import CORRUPTIONS, sample_generator
from .data import ImageFiles, NoiseImages, ValSet, collate, list_images
from .localization import cam_to_box, check_iou_op, class_activation_maps, localized
from .model import load_classifier_model
from .ood import ood_metrics

SUITES = ("clean", "background", "calibration", "fgsm", "pgd", "ood")
NOISE_SETS = ("uniform", "gaussian")


def parse_suites(suites) -> list[str]:
    """'clean,pgd' or a list -> validated list in canonical order; 'all' = every suite."""
    if isinstance(suites, str):
        suites = [s.strip() for s in suites.split(",") if s.strip()]
    suites = list(SUITES) if list(suites) == ["all"] else list(suites)
    unknown = sorted(set(suites) - set(SUITES))
    if unknown or not suites:
        raise ValueError(f"unknown suites {unknown}; valid: {', '.join(SUITES)} (or 'all')")
    return [s for s in SUITES if s in suites]


def subset_indices(n: int, limit: int | None) -> list[int]:
    """``limit`` evenly spaced indices of ``range(n)`` (every class of a class-sorted val set), or all."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    return sorted(set(np.linspace(0, n - 1, limit).round().astype(int).tolist()))


def _loader(ds, batch_size: int, num_workers: int, device: torch.device) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate,
                      pin_memory=device.type == "cuda")


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


@torch.no_grad()
def predict(model, loader, device, precision: str = "fp32", localize: bool = False,
            cam_threshold: float = 0.25, iou_threshold: float = 0.5, keep=(),
            desc: str = "predict", iou_op: str = ">=") -> dict:
    """One pass: top-1 / top-5 correctness, max-softmax confidence and (``localize``) top-1 localization.

    Returns numpy arrays ``label [n]``, ``pred [n]``, ``correct1 [n]``, ``correct5 [n]``, ``confidence [n]``,
    ``loc [n]`` (bool, or None), plus the images / boxes / CAM boxes of the dataset indices in ``keep``
    (the 4th item of each sample) for figures.
    """
    out = {k: [] for k in ("label", "pred", "correct1", "correct5", "confidence", "loc")}
    examples, ex_boxes, ex_pred_boxes = [], [], []
    keep = set(keep)
    for images, labels, boxes, idx in progress(loader, desc=desc):
        x = _to_device(images, device)
        y = labels.to(device)
        with autocast(device, precision):
            if localize:
                feats, logits = model.features_logits(x)
            else:
                logits = model(x)
        logits = logits.float()
        prob = logits.softmax(1)
        conf, pred = prob.max(1)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        out["label"].append(labels.numpy())
        out["pred"].append(pred.cpu().numpy())
        out["correct1"].append((pred == y).cpu().numpy())
        out["correct5"].append((top5 == y[:, None]).any(1).cpu().numpy())
        out["confidence"].append(conf.cpu().numpy())
        if localize:
            cams = class_activation_maps(feats.float(), model.fc_weight.float(), pred, tuple(x.shape[-2:]))
            cams = cams.cpu().numpy()
            pboxes = [cam_to_box(c, cam_threshold) for c in cams]
            ok = [bool(p == t) and localized(b, g.numpy(), iou_threshold, iou_op)
                  for b, g, p, t in zip(pboxes, boxes, pred.tolist(), labels.tolist())]
            out["loc"].append(np.array(ok, dtype=bool))
        for b, i in enumerate(idx.tolist()):
            if i in keep:
                examples.append(images[b])
                ex_boxes.append(boxes[b].numpy())
                if localize:
                    ex_pred_boxes.append(pboxes[b])
    res = {k: (np.concatenate(v) if v else None) for k, v in out.items()}
    res["examples"] = torch.stack(examples) if examples else None
    res["example_boxes"], res["example_pred_boxes"] = ex_boxes, ex_pred_boxes
    return res


def _errors(p: dict) -> dict:
    r = {"top1_err": 100.0 * (1.0 - p["correct1"].mean()), "top5_err": 100.0 * (1.0 - p["correct5"].mean())}
    if p["loc"] is not None:
        r["top1_loc"] = 100.0 * p["loc"].mean()
    return r


def adversarial_errors(model, loader, attacks: dict, device, precision: str = "fp32",
                       desc: str = "attacks") -> dict:
    """Top-1 error (%) under each attack (``name -> fn(model, x, y, batch_index) -> x_adv``), one pass."""
    wrong = {name: 0 for name in attacks}
    n = 0
    for b, (images, labels, _, _) in enumerate(progress(loader, desc=desc)):
        x, y = _to_device(images, device), labels.to(device)
        for name, attack in attacks.items():
            with autocast(device, precision):
                x_adv = attack(model, x, y, b)
                with torch.no_grad():
                    pred = model(x_adv).argmax(1)
            wrong[name] += int((pred != y).sum())
        n += y.numel()
    return {name: 100.0 * w / n for name, w in wrong.items()}


def export_corrupted_set(base, indices, out_dir, corruption: str, at: str = "eval", image_size: int = 224,
                         resize: int = 256, sigma: float = 0.1, seed: int = 0) -> Path:
    """Write the corrupted images as PNG (``out_dir/<corruption>/<wnid>/<stem>.png``, at the corruption
    resolution) and ``out_dir/<corruption>/index.json`` (settings, image -> label and boxes)."""
    ds = ValSet(base, indices, image_size, resize, corruption=corruption, at=at, sigma=sigma, seed=seed)
    root = Path(out_dir) / corruption
    index = {"corruption": corruption, "at": at, "sigma": sigma, "seed": seed, "image_size": image_size,
             "resize": resize, "box_convention": "x0,y0,x1,y1 continuous pixel coordinates", "images": {}}
    from PIL import Image

    for k in progress(range(len(ds)), desc=f"export {corruption}"):
        img, boxes, label, i = ds.corrupted_image(k)
        wnid = base.classes[label]
        rel = Path(wnid) / (Path(base.samples[i][0]).stem + ".png")
        (root / wnid).mkdir(parents=True, exist_ok=True)
        arr = (img.permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(arr).save(root / rel)
        index["images"][str(rel)] = {"label": label, "boxes": boxes.tolist()}
    write_json(index, root / "index.json")
    return root


def _ood_sets(ood_dirs, limit, n_id, image_size, resize, seed, ood_noise, gaussian_std) -> dict:
    sets = {}
    for d in ood_dirs:
        d, name = str(d), None
        if "=" in d and not Path(d).exists():  # NAME=DIR
            name, d = d.split("=", 1)
        files = list_images(d)
        files = [files[i] for i in subset_indices(len(files), limit)]
        name = name or Path(d).resolve().name or d
        while name in sets or name in ood_noise:
            name += "_"
        sets[name] = ImageFiles(files, image_size, resize)
    for kind in ood_noise:
        sets[kind] = NoiseImages(kind, n_id, image_size, seed=seed, std=gaussian_std)
    return sets


def _rounded(obj, digits: int = 6):
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v, digits) for v in obj]
    return obj


def evaluate_checkpoint(checkpoint, imagenet_root, suites=SUITES, out_dir=None, ood_dirs=(), limit=None,
                        image_size: int = 224, resize: int = 256, batch_size: int = 64, seed: int = 0,
                        device="auto", precision: str = "fp32", num_workers: int | None = None,
                        arch: str | None = None, corrupt_at: str = "eval", sigma: float = 0.1,
                        export_dir=None, fgsm_eps: float = 8 / 255, pgd_eps: float = 4 / 255,
                        pgd_step: float = 2 / 255, pgd_iters: int = 10, pgd_random_start: bool = True,
                        ood_noise=NOISE_SETS, gaussian_std: float = 0.5, n_bins: int = 10,
                        cam_threshold: float = 0.25, iou_threshold: float = 0.5, iou_op: str = ">=",
                        ood_threshold: float = 0.5, n_examples: int = 8) -> dict:
    """Run ``suites`` on the val split of ``imagenet_root``; write out_dir/metrics.json and out_dir/figures/.

    checkpoint: a backbone checkpoint with its classifier head (``core.checkpoint``) for the dataset's
    classes. limit: evaluate this many evenly spaced val images (and at most this many per OOD folder).
    Returns the metrics dict (also written to ``out_dir/metrics.json`` when ``out_dir`` is given).
    """
    from core.data import ImageNetFolder

    suites = parse_suites(suites)
    if corrupt_at not in ("eval", "original"):
        raise ValueError(f"corrupt_at must be 'eval' or 'original', got {corrupt_at!r}")
    check_iou_op(iou_op)
    unknown_noise = sorted(set(ood_noise) - set(NOISE_SETS))
    if unknown_noise:
        raise ValueError(f"unknown OOD noise sets {unknown_noise}; valid: {list(NOISE_SETS)}")
    device = get_device(device) if isinstance(device, str) else device
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
    out_dir = Path(out_dir) if out_dir is not None else None
    fig_dir = out_dir / "figures" if out_dir is not None else None

    base = ImageNetFolder(imagenet_root, split="val", boxes="auto")
    indices = subset_indices(len(base), limit)
    # fail before any compute on a checkpoint without a head for these classes, or on empty OOD folders
    model, meta = load_classifier_model(checkpoint, num_classes=len(base.classes), arch=arch)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    ood_sets = _ood_sets(ood_dirs, limit, len(indices), image_size, resize, seed, tuple(ood_noise),
                         gaussian_std) if "ood" in suites else {}

    metrics: dict = {
        "checkpoint": str(checkpoint), "method": meta.get("method"), "arch": meta.get("arch"),
        "num_classes": len(base.classes), "n_images": len(indices),
        "settings": {"image_size": image_size, "resize": resize, "seed": seed, "limit": limit,
                     "corrupt_at": corrupt_at, "sigma": sigma, "noise_clipped": True,
                     "fgsm_eps": fgsm_eps, "pgd_eps": pgd_eps, "pgd_step": pgd_step, "pgd_iters": pgd_iters,
                     "pgd_random_start": pgd_random_start, "n_bins": n_bins, "cam_threshold": cam_threshold,
                     "iou_threshold": iou_threshold, "iou_op": iou_op, "ood_threshold": ood_threshold,
                     "gaussian_ood_mean": 0.5,
                     "gaussian_ood_std": gaussian_std,
                     "precision": precision, "device": str(device)},
        "figures": {}, "seconds": {},
    }
    figs = metrics["figures"]

    def loader(ds):
        return _loader(ds, batch_size, num_workers, device)

    def timed(name, t0):
        metrics["seconds"][name] = round(time.time() - t0, 2)

    clean = None
    examples = [indices[p] for p in subset_indices(len(indices), n_examples)]  # spread over the classes
    want_loc = "background" in suites
    if {"clean", "background", "calibration", "ood"} & set(suites):
        t0 = time.time()
        ds = ValSet(base, indices, image_size, resize, need_boxes=want_loc)
        clean = predict(model, loader(ds), device, precision, localize=want_loc, cam_threshold=cam_threshold,
                        iou_threshold=iou_threshold, keep=examples, desc="clean", iou_op=iou_op)
        timed("clean", t0)
    if "clean" in suites:
        e = _errors(clean)
        metrics["clean"] = {"top1_err": e["top1_err"], "top5_err": e["top5_err"]}

    if "background" in suites:
        t0 = time.time()
        bg = {"clean_loc": _errors(clean)["top1_loc"]}
        rows, pred_boxes = {"clean": clean["examples"]}, {"clean": clean["example_pred_boxes"]}
        for corruption in CORRUPTIONS:
            ds = ValSet(base, indices, image_size, resize, corruption=corruption, at=corrupt_at, sigma=sigma,
                        seed=seed)
            p = predict(model, loader(ds), device, precision, localize=True, cam_threshold=cam_threshold,
                        iou_threshold=iou_threshold, keep=examples,
                        desc=f"background/{corruption}", iou_op=iou_op)
            bg[corruption] = _errors(p)
            rows[corruption], pred_boxes[corruption] = p["examples"], p["example_pred_boxes"]
            if export_dir is not None:
                export_corrupted_set(base, indices, export_dir, corruption, corrupt_at, image_size, resize,
                                     sigma, seed)
        metrics["background"] = bg
        if fig_dir is not None:
            figures.image_grid(rows, fig_dir / "background_examples.png", boxes=clean["example_boxes"],
                               pred_boxes=pred_boxes)
            figs["background_examples"] = "figures/background_examples.png"
        timed("background", t0)

    if "calibration" in suites:
        ece, oe = ece_oe(clean["confidence"], clean["correct1"], n_bins)
        metrics["calibration"] = {"ece": 100.0 * ece, "oe": 100.0 * oe}
        if fig_dir is not None:
            bins = calibration_bins(clean["confidence"], clean["correct1"], n_bins)
            figures.reliability_diagram(bins, fig_dir / "reliability.png",
                                        title=str(meta.get("method") or ""), ece=ece)
            figs["reliability"] = "figures/reliability.png"

    attacks = {}
    if "fgsm" in suites:
        attacks["fgsm"] = lambda m, x, y, b: fgsm(m, x, y, fgsm_eps)
    if "pgd" in suites:
        attacks["pgd"] = lambda m, x, y, b: pgd(m, x, y, pgd_eps, pgd_step, pgd_iters, pgd_random_start,
                                                generator=sample_generator(seed, b, stream=5))
        attacks["fgsm_same_eps"] = lambda m, x, y, b: fgsm(m, x, y, pgd_eps)
    if attacks:
        t0 = time.time()
        ds = ValSet(base, indices, image_size, resize, need_boxes=False)
        err = adversarial_errors(model, loader(ds), attacks, device, precision, desc="+".join(attacks))
        if "fgsm" in suites:
            metrics["fgsm"] = {"top1_err": err["fgsm"], "eps": fgsm_eps}
        if "pgd" in suites:
            metrics["pgd"] = {"top1_err": err["pgd"], "eps": pgd_eps, "step": pgd_step, "iters": pgd_iters,
                              "random_start": pgd_random_start,
                              "fgsm_same_eps_top1_err": err["fgsm_same_eps"]}
        timed("adversarial", t0)

    if "ood" in suites:
        t0 = time.time()
        ood, scores = {}, {}
        for name, ds in ood_sets.items():
            p = predict(model, loader(ds), device, precision, desc=f"ood/{name}")
            scores[name] = p["confidence"]
            ood[name] = ood_metrics(clean["confidence"], p["confidence"], ood_threshold)
        metrics["ood"] = ood
        if fig_dir is not None and scores:
            figures.score_histograms(clean["confidence"], scores, fig_dir / "ood_scores.png")
            figs["ood_scores"] = "figures/ood_scores.png"
        timed("ood", t0)

    metrics = _rounded(json.loads(json.dumps(metrics, default=float)))  # plain JSON values
    if out_dir is not None:
        write_json(metrics, out_dir / "metrics.json")
    return metrics
