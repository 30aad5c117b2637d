"""The robustness suites of one checkpoint on an ImageNet-layout validation set.

Suites (``SUITES``) and what ``metrics.json`` holds (all percentages):

- ``clean``: ``{top1_err, top5_err}`` after resize + centre crop.
- ``background``: ``{clean_loc, replace: {top1_err, top5_err, top1_loc}, noise: {...}}``;
  ``clean_loc`` is the top-1 localization of the clean images (CAM box at ``cam_threshold`` 0.25 of
  max, best IoU with the GT
  boxes ``iou_op`` ``iou_threshold``: >= 0.5 by default; multi-mix §IV-D counts IoU > 0.25).
- ``calibration``: ``{ece, oe}`` (10 equal-width bins) + reliability diagram.
- ``fgsm``: ``{top1_err}`` at eps 8/255; ``pgd``: ``{top1_err}`` at eps 4/255, step 2/255, 10
  iterations, random start, plus ``fgsm_same_eps_top1_err`` (FGSM at the PGD budget: PGD must be at
  least as strong).
- ``ood``: ``{<set>: {det_acc, det_acc_at_thr, auroc, aupr_in, aupr_out, ...}}`` with the maximum
  softmax
  probability (``det_acc``: best threshold; ``det_acc_at_thr``: at ``ood_threshold``, 0.5 as
  AlignMix §4.3); sets are the ``ood_dirs`` folders (``DIR`` named by its folder name, or
  ``NAME=DIR``; images found recursively) and synthetic ``uniform`` / ``gaussian`` noise images, as
  many as there are ID images.

Choices the papers leave open (documented here and in ``settings``): the background is corrupted at
the evaluation resolution (after resize + crop; ``corrupt_at="original"`` corrupts the stored image
before resizing), the noise is clipped to [0, 1], the replacement image is another uniformly drawn
validation image (seeded, never the image itself) resized to the same size. The Gaussian OOD noise
is N(mu, sigma) with mu = sigma = 0.5 as AlignMix App. C states it ("N(mu, sigma) with mu = sigma =
0.5": sigma the standard deviation; ``gaussian_std``), clipped to [0, 1]. Every per-image draw
depends on (seed, image index) only; the PGD random start is drawn per batch from (seed, batch
index), so it also depends on ``batch_size``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from mixup_transfer.core import distributed as ddist
from mixup_transfer.core.config import ConfigError
from mixup_transfer.core.data import DataError
from mixup_transfer.core.inference import inference_on_dataset, to_host
from mixup_transfer.core.runtime import (
    atomic_path,
    autocast,
    check_outputs_finite,
    count_nonfinite,
    get_device,
    is_main_process,
    progress,
    write_json,
)
from mixup_transfer.core.units import with_units

from . import figures
from .attacks import fgsm, pgd
from .calibration import calibration_bins, ece_oe
from .corruption import CORRUPTIONS, sample_generator
from .data import ImageFiles, NoiseImages, ValSet, collate, list_images, open_val_set
from .localization import cam_to_box, check_iou_op, class_activation_maps, localized
from .model import load_classifier_model
from .ood import ood_metrics

log = logging.getLogger("robustness")
# suites that need the val set's boxes (background replacement, CAM localization)
BOX_SUITES = ("background",)

SUITES = ("clean", "background", "calibration", "fgsm", "pgd", "ood")
NOISE_SETS = ("uniform", "gaussian")


def parse_suites(suites) -> list[str]:
    """'clean,pgd' or a list -> validated list in canonical order; 'all' = every suite."""
    if isinstance(suites, str):
        suites = [s.strip() for s in suites.split(",") if s.strip()]
    suites = list(SUITES) if list(suites) == ["all"] else list(suites)
    unknown = sorted(set(suites) - set(SUITES))
    if unknown or not suites:
        raise ConfigError(f"unknown suites {unknown}; valid: {', '.join(SUITES)} (or 'all')")
    return [s for s in SUITES if s in suites]


def subset_indices(n: int, limit: int | None) -> list[int]:
    """``limit`` evenly spaced indices of ``range(n)`` (every class of a class-sorted val set), or
    all."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    return sorted(set(np.linspace(0, n - 1, limit).round().astype(int).tolist()))


def _loader(ds, batch_size: int, num_workers: int, device: torch.device) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=collate, pin_memory=device.type == "cuda")


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


# the per-image arrays `predict` returns
_DTYPES = {"label": np.int64, "pred": np.int64, "correct1": bool, "correct5": bool,
           "confidence": np.float32, "loc": bool, "nonfinite": np.int64}
ARRAY_KEYS = tuple(_DTYPES)


def _forward(localize: bool):
    """The model call of `predict`: (features or None, logits, labels on the device)."""
    def forward(model, inputs):
        x, y = inputs[0], inputs[1]
        return (*model.features_logits(x), y) if localize else (None, model(x), y)
    return forward


def _batch_records(model, localize: bool, cam_threshold: float, iou_threshold: float, iou_op: str,
                   keep: set):
    """The per-batch callable of `predict`: one record per image (its arrays' entries and, for a
    dataset index in ``keep``, its example), read back in one transfer."""
    def to_records(batch, outputs, indices):
        images, labels, boxes, idx = batch
        feats, logits, y = outputs
        logits = logits.float()
        conf, pred = logits.softmax(1).max(1)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        bad = (~torch.isfinite(logits)).sum(1)
        cams = []
        if localize:
            cams = [class_activation_maps(feats.float(), model.fc_weight.float(), pred,
                                          tuple(images.shape[-2:]))]
            bad = bad + (~torch.isfinite(cams[0])).reshape(len(cams[0]), -1).sum(1)
        pred, c1, c5, conf, bad, *cams = to_host([pred, pred == y, (top5 == y[:, None]).any(1),
                                                  conf, bad] + cams)
        records = []
        for b, (i, label) in enumerate(zip(idx.tolist(), labels.tolist())):
            r = {"label": label, "pred": int(pred[b]), "correct1": bool(c1[b]),
                 "correct5": bool(c5[b]), "confidence": conf[b].numpy(), "nonfinite": int(bad[b]),
                 "loc": None, "example": None}
            if localize:
                r["pred_box"] = cam_to_box(cams[0][b].numpy(), cam_threshold)
                r["loc"] = r["pred"] == label and localized(r["pred_box"], boxes[b].numpy(),
                                                            iou_threshold, iou_op)
            if i in keep:
                r["example"] = (i, images[b], boxes[b].numpy(), r.get("pred_box"))
            records.append(r)
        return records
    return to_records


def predict_sharded(model, ds, batch_size: int, num_workers: int, device, precision: str = "fp32",
                    localize: bool = False, cam_threshold: float = 0.25,
                    iou_threshold: float = 0.5, keep=(), desc: str = "predict",
                    iou_op: str = ">=") -> dict:
    """One pass (``mixup_transfer.core.inference``: each rank its shard of whole batches of ``ds``,
    gathered to every rank in dataset order): top-1 / top-5 correctness, max-softmax confidence and
    (``localize``) top-1 localization.

    Returns numpy arrays ``label [n]``, ``pred [n]``, ``correct1 [n]``, ``correct5 [n]``,
    ``confidence [n]``, ``loc [n]`` (bool, or None), ``nonfinite [n]`` (how many logit and CAM
    values of each image are NaN or
    infinite: `check_finite` stops on any), plus the images / boxes / CAM boxes of the dataset
    indices in ``keep`` (the 4th item of each sample) for figures, and ``example_index`` (their
    dataset indices).
    """
    res = inference_on_dataset(model, ds, _forward(localize),
                               _batch_records(model, localize, cam_threshold, iou_threshold,
                                              iou_op, set(keep)),
                               batch_size=batch_size, device=device, workers=num_workers,
                               collate_fn=collate, precision=precision,
                               channels_last=device.type == "cuda",
                               pin_memory=device.type == "cuda", select=lambda batch: batch[:2],
                               desc=desc)
    return _arrays(res.records, localize)


def _arrays(records: list[dict], localize: bool) -> dict:
    """`predict_sharded`'s result from its per-image records (empty arrays of the usual dtypes for
    none)."""
    out = {k: np.array([r[k] for r in records], dtype=_DTYPES[k]) for k in ARRAY_KEYS}
    if not localize:
        out["loc"] = None
    ex = [r["example"] for r in records if r["example"] is not None]
    out["examples"] = torch.stack([e[1] for e in ex]) if ex else None
    out["example_boxes"] = [e[2] for e in ex]
    out["example_pred_boxes"] = [e[3] for e in ex] if localize else []
    out["example_index"] = [e[0] for e in ex]
    return out


def check_finite(p: dict, split: str) -> None:
    """Stop (NonFiniteOutputError, exit 1) when any logit or CAM value of `p` (a `predict` result)
    is not finite: the top-1 error of NaN logits would be a number."""
    check_outputs_finite("robustness", split, {"logit or CAM": int(p["nonfinite"].sum())})


def _errors(p: dict) -> dict:
    r = {"top1_err": 100.0 * (1.0 - p["correct1"].mean()),
         "top5_err": 100.0 * (1.0 - p["correct5"].mean())}
    if p["loc"] is not None:
        r["top1_loc"] = 100.0 * p["loc"].mean()
    return r


def adversarial_errors(model, loader, attacks: dict, device, precision: str = "fp32",
                       desc: str = "attacks", batch_ids=None) -> dict:
    """Top-1 error (%) under each attack (``name -> fn(model, x, y, batch_index) -> x_adv``), one
    pass.

    batch_ids: the batch index of each of the loader's batches (default 0, 1, ...: a shard passes
    the single-process batch numbers, mixup_transfer.core.distributed.shard_blocks); the counts are
    summed over ranks."""
    wrong = {name: 0 for name in attacks}
    n, bad = 0, torch.zeros((), dtype=torch.int64, device=device)
    for k, (images, labels, _, _) in enumerate(progress(loader, desc=desc)):
        b = k if batch_ids is None else batch_ids[k]
        x, y = _to_device(images, device), labels.to(device)
        for name, attack in attacks.items():
            with autocast(device, precision):
                x_adv = attack(model, x, y, b)
                with torch.no_grad():
                    logits = model(x_adv)
                    bad += count_nonfinite(logits) + count_nonfinite(x_adv)
                    pred = logits.argmax(1)
            wrong[name] += int((pred != y).sum())
        n += y.numel()
    totals = ddist.sum_counts([n, int(bad), *wrong.values()])
    check_outputs_finite("robustness", desc, {"logit or adversarial image": totals[1]})
    return {name: 100.0 * w / totals[0] for name, w in zip(wrong, totals[2:])}


def export_corrupted_set(base, indices, out_dir, corruption: str, at: str = "eval",
                         image_size: int = 224, resize: int = 256, sigma: float = 0.1,
                         seed: int = 0) -> Path:
    """Write the corrupted images as PNG (``out_dir/<corruption>/<wnid>/<stem>.png``, at the
    corruption resolution) and ``out_dir/<corruption>/index.json`` (settings, image -> label and
    boxes)."""
    ds = ValSet(base, indices, image_size, resize, corruption=corruption, at=at, sigma=sigma,
                seed=seed)
    root = Path(out_dir) / corruption
    index = {"corruption": corruption, "at": at, "sigma": sigma, "seed": seed,
             "image_size": image_size, "resize": resize,
             "box_convention": "x0,y0,x1,y1 continuous pixel coordinates", "images": {}}
    from PIL import Image

    for k in progress(range(len(ds)), desc=f"export {corruption}"):
        img, boxes, label, i = ds.corrupted_image(k)
        wnid = base.classes[label]
        rel = Path(wnid) / (Path(base.samples[i][0]).stem + ".png")
        (root / wnid).mkdir(parents=True, exist_ok=True)
        arr = (img.permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
        with atomic_path(root / rel) as tmp:
            Image.fromarray(arr).save(tmp, format="PNG")
        index["images"][str(rel)] = {"label": label, "boxes": boxes.tolist()}
    write_json(index, root / "index.json")
    return root


def _ood_sets(ood_dirs, limit, n_id, image_size, resize, seed, ood_noise, gaussian_std,
              ood_transform: str = "eval") -> dict:
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
        sets[name] = ImageFiles(files, image_size, resize, ood_transform)
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


def evaluate_checkpoint(checkpoint, imagenet_root, suites=SUITES, out_dir=None, ood_dirs=(),
                        limit=None, image_size: int = 224, resize: int = 256, batch_size: int = 64,
                        seed: int = 0, device="auto", precision: str = "fp32",
                        num_workers: int | None = None, arch: str | None = None,
                        corrupt_at: str = "eval", sigma: float = 0.1, export_dir=None,
                        fgsm_eps: float = 8 / 255, pgd_eps: float = 4 / 255,
                        pgd_step: float = 2 / 255, pgd_iters: int = 10,
                        pgd_random_start: bool = True, ood_noise=NOISE_SETS,
                        gaussian_std: float = 0.5, n_bins: int = 10, cam_threshold: float = 0.25,
                        iou_threshold: float = 0.5, iou_op: str = ">=", ood_threshold: float = 0.5,
                        n_examples: int = 8, ood_transform: str = "eval") -> dict:
    """Run ``suites`` on the val split of ``imagenet_root``; write out_dir/metrics.json and
    out_dir/figures/.

    checkpoint: a backbone checkpoint with its classifier head (``mixup_transfer.core.checkpoint``)
    for the dataset's classes. limit: evaluate this many evenly spaced val images (and at most this
    many per OOD folder).
    ood_transform: how OOD folder images become S x S (``data.ood_transform``: eval | crop |
    resize). Returns the metrics dict (also written to ``out_dir/metrics.json`` when ``out_dir`` is
    given).
    """
    o = dict(locals())
    suites = parse_suites(suites)
    _check_options(corrupt_at, iou_op, ood_noise)
    ev = _Evaluation(o, suites)
    with exact_fp32(ev.device, precision):
        ev.run_suites()
    # plain JSON values
    metrics = with_units(_rounded(json.loads(json.dumps(ev.metrics, default=float))))
    if ev.out_dir is not None and is_main_process():
        write_json(metrics, ev.out_dir / "metrics.json")
    return metrics


@contextlib.contextmanager
def exact_fp32(device: torch.device, precision: str):
    """An fp32 evaluation on CUDA with TF32 off: torch's default runs cuDNN convolutions in TF32 on
    Ampere and newer GPUs (`mixup_transfer.core.runtime.configure_cuda`), which rounds an "fp32"
    attack's gradients to 10-bit mantissas. The previous settings are restored after."""
    if device.type != "cuda" or precision != "fp32":
        yield
        return
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _check_options(corrupt_at: str, iou_op: str, ood_noise) -> None:
    if corrupt_at not in ("eval", "original"):
        raise ValueError(f"corrupt_at must be 'eval' or 'original', got {corrupt_at!r}")
    check_iou_op(iou_op)
    unknown_noise = sorted(set(ood_noise) - set(NOISE_SETS))
    if unknown_noise:
        raise ValueError(f"unknown OOD noise sets {unknown_noise}; valid: {list(NOISE_SETS)}")


_SETTINGS = ("image_size", "resize", "seed", "limit", "corrupt_at", "sigma", "fgsm_eps", "pgd_eps",
             "pgd_step", "pgd_iters", "pgd_random_start", "n_bins", "cam_threshold",
             "iou_threshold", "iou_op", "ood_threshold", "ood_transform")


class _Evaluation:
    """One checkpoint's suites over one val set; `o` holds `evaluate_checkpoint`'s arguments."""

    def __init__(self, o: dict, suites: list[str]):
        self.o, self.suites = o, suites
        self.device = get_device(o["device"]) if isinstance(o["device"], str) else o["device"]
        workers = o["num_workers"]
        self.num_workers = workers if workers is not None else (
            min(8, os.cpu_count() or 1) if self.device.type == "cuda" else 0)
        self.out_dir = Path(o["out_dir"]) if o["out_dir"] is not None else None
        self.fig_dir = self.out_dir / "figures" if self.out_dir is not None else None
        # under torchrun every rank evaluates its shard, rank 0 writes
        self.write = is_main_process()
        # ImageNet, TinyImageNet or CIFAR (transfer/robustness/data.py)
        self.base = open_val_set(o["imagenet_root"])
        self.suites = suites = self._drop_box_suites(suites)
        self.indices = subset_indices(len(self.base), o["limit"])
        # fail before any compute on a checkpoint without a head for these classes, or on empty OOD
        # folders
        model, self.meta = load_classifier_model(o["checkpoint"],
                                                 num_classes=len(self.base.classes),
                                                 arch=o["arch"],
                                                    classes=self.base.classes)
        self.model = model.to(self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ood_sets = _ood_sets(o["ood_dirs"], o["limit"], len(self.indices), o["image_size"],
                                  o["resize"], o["seed"], tuple(o["ood_noise"]), o["gaussian_std"],
                                  o["ood_transform"]) if "ood" in suites else {}
        settings = {k: o[k] for k in _SETTINGS}
        settings.update(noise_clipped=True, gaussian_ood_mean=0.5,
                        gaussian_ood_std=o["gaussian_std"], precision=o["precision"],
                        device=str(self.device))
        self.metrics: dict = {"checkpoint": str(o["checkpoint"]),
                              "method": self.meta.get("method"), "arch": self.meta.get("arch"),
                              "num_classes": len(self.base.classes), "n_images": len(self.indices),
                              "settings": settings, "figures": {}, "seconds": {}}
        self.examples = [self.indices[p]
                         for p in subset_indices(len(self.indices), o["n_examples"])]
        self.clean = None

    def _drop_box_suites(self, suites: list[str]) -> list[str]:
        """Without box annotations the suites that need them are skipped, with a note saying so."""
        skipped = [s for s in suites if s in BOX_SUITES]
        if not skipped or self.base.has_boxes:
            return suites
        rest = [s for s in suites if s not in BOX_SUITES]
        log.warning("%s: skipped: %s has no box annotations (val_boxes/*.xml or "
                    "LOC_val_solution.csv), which "
                    "%s needs%s", ", ".join(skipped), self.o["imagenet_root"],
                    "it" if len(skipped) == 1 else "they",
                    f"; running {','.join(rest)} (--suites {','.join(rest)} says so without this "
                    "note)" if rest
                    else "")
        if not rest:
            raise DataError(f"{self.o['imagenet_root']}: no box annotations, and every suite "
                            f"asked for ({', '.join(skipped)}) needs them; choose others with "
                            "--suites (e.g. clean,calibration,fgsm,pgd,ood)")
        return rest

    def loader(self, ds):
        return _loader(ds, self.o["batch_size"], self.num_workers, self.device)

    def timed(self, name: str, t0: float) -> None:
        self.metrics["seconds"][name] = round(time.time() - t0, 2)

    def predict(self, ds, localize: bool, desc: str) -> dict:
        o = self.o
        p = predict_sharded(self.model, ds, o["batch_size"], self.num_workers, self.device,
                            precision=o["precision"], localize=localize,
                            cam_threshold=o["cam_threshold"], iou_threshold=o["iou_threshold"],
                            keep=self.examples, desc=desc, iou_op=o["iou_op"])
        check_finite(p, desc)
        return p

    def run_suites(self) -> None:
        o, suites = self.o, self.suites
        if {"clean", "background", "calibration", "ood"} & set(suites):
            t0 = time.time()
            want_loc = "background" in suites
            ds = ValSet(self.base, self.indices, o["image_size"], o["resize"], need_boxes=want_loc)
            self.clean = self.predict(ds, want_loc, "clean")
            self.timed("clean", t0)
        if "clean" in suites:
            e = _errors(self.clean)
            self.metrics["clean"] = {"top1_err": e["top1_err"], "top5_err": e["top5_err"]}
        if "background" in suites:
            self.background()
        if "calibration" in suites:
            self.calibration()
        if {"fgsm", "pgd"} & set(suites):
            self.adversarial()
        if "ood" in suites:
            self.ood()

    def background(self) -> None:
        o, clean, t0 = self.o, self.clean, time.time()
        bg = {"clean_loc": _errors(clean)["top1_loc"]}
        rows, pred_boxes = {"clean": clean["examples"]}, {"clean": clean["example_pred_boxes"]}
        for corruption in CORRUPTIONS:
            ds = ValSet(self.base, self.indices, o["image_size"], o["resize"],
                        corruption=corruption, at=o["corrupt_at"], sigma=o["sigma"],
                        seed=o["seed"])
            p = self.predict(ds, True, f"background/{corruption}")
            bg[corruption] = _errors(p)
            rows[corruption], pred_boxes[corruption] = p["examples"], p["example_pred_boxes"]
            if o["export_dir"] is not None and self.write:
                export_corrupted_set(self.base, self.indices, o["export_dir"], corruption,
                                     o["corrupt_at"], o["image_size"], o["resize"], o["sigma"],
                                     o["seed"])
        self.metrics["background"] = bg
        if self.fig_dir is not None:
            if self.write:
                figures.image_grid(rows, self.fig_dir / "background_examples.png",
                                   boxes=clean["example_boxes"], pred_boxes=pred_boxes)
            self.metrics["figures"]["background_examples"] = "figures/background_examples.png"
        self.timed("background", t0)

    def calibration(self) -> None:
        n_bins, clean = self.o["n_bins"], self.clean
        ece, oe = ece_oe(clean["confidence"], clean["correct1"], n_bins)
        self.metrics["calibration"] = {"ece": 100.0 * ece, "oe": 100.0 * oe}
        if self.fig_dir is not None:
            bins = calibration_bins(clean["confidence"], clean["correct1"], n_bins)
            if self.write:
                figures.reliability_diagram(bins, self.fig_dir / "reliability.png",
                                            title=str(self.meta.get("method") or ""), ece=ece)
            self.metrics["figures"]["reliability"] = "figures/reliability.png"

    def adversarial(self) -> None:
        o, suites, attacks = self.o, self.suites, {}
        if "fgsm" in suites:
            attacks["fgsm"] = lambda m, x, y, b: fgsm(m, x, y, o["fgsm_eps"])
        if "pgd" in suites:
            attacks["pgd"] = lambda m, x, y, b: pgd(m, x, y, o["pgd_eps"], o["pgd_step"],
                                                    o["pgd_iters"], o["pgd_random_start"],
                                                    generator=sample_generator(o["seed"], b,
                                                                               stream=5))
            attacks["fgsm_same_eps"] = lambda m, x, y, b: fgsm(m, x, y, o["pgd_eps"])
        t0 = time.time()
        ds = ValSet(self.base, self.indices, o["image_size"], o["resize"], need_boxes=False)
        # whole batches: PGD starts keep their index
        mine = ddist.shard_indices(len(ds), block=o["batch_size"])
        err = adversarial_errors(self.model, self.loader(Subset(ds, mine)), attacks, self.device,
                                 o["precision"], desc="+".join(attacks),
                                 batch_ids=ddist.shard_blocks(len(ds), o["batch_size"]))
        if "fgsm" in suites:
            self.metrics["fgsm"] = {"top1_err": err["fgsm"], "eps": o["fgsm_eps"]}
        if "pgd" in suites:
            self.metrics["pgd"] = {"top1_err": err["pgd"], "eps": o["pgd_eps"],
                                   "step": o["pgd_step"], "iters": o["pgd_iters"],
                                   "random_start": o["pgd_random_start"],
                                   "fgsm_same_eps_top1_err": err["fgsm_same_eps"]}
        self.timed("adversarial", t0)

    def ood(self) -> None:
        t0, ood, scores = time.time(), {}, {}
        for name, ds in self.ood_sets.items():
            p = predict_sharded(self.model, ds, self.o["batch_size"], self.num_workers,
                                self.device, precision=self.o["precision"], desc=f"ood/{name}")
            check_finite(p, f"ood/{name}")
            scores[name] = p["confidence"]
            ood[name] = ood_metrics(self.clean["confidence"], p["confidence"],
                                    self.o["ood_threshold"])
        self.metrics["ood"] = ood
        if self.fig_dir is not None and scores:
            if self.write:
                figures.score_histograms(self.clean["confidence"], scores,
                                         self.fig_dir / "ood_scores.png")
            self.metrics["figures"]["ood_scores"] = "figures/ood_scores.png"
        self.timed("ood", t0)
