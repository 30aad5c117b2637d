"""WSOL fine-tuning of a CAM model on a wsolevaluation split (CUB), and its evaluation.

``finetune(cfg, weights, run_dir) -> metrics`` is the entry point (``tools/wsol.py finetune``
and the pipeline). Two recipes are configs, not code paths:

* AlignMix-style: SGD, ``optim.lr_classifier`` (0.01) for ``optim.large_lr_layers`` (fc, or
  layer4 + fc) and ``optim.lr`` (0.001) for the rest, step decay; resize 256 / random crop 224 /
  flip for training, resize 224 for testing.
* multi-mix-style: ``optim.freeze`` = everything but layer4 and fc, Adam lr 1e-4, ``eval.every: 1``
  (localization after every epoch -> the fine-tuning curve).

Run folder: config.yaml, log.jsonl, checkpoints/last.pth (model, optimizer, scheduler, epoch,
curve, RNG; atomic), cam_model.pth (for ``tools/wsol.py evaluate``), metrics.json, figures/*.png.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.transforms import v2 as T

from pretrain.config import dump_config, validate
from pretrain.runtime import (
    JsonlLogger,
    atomic_save,
    atomic_write_text,
    autocast,
    check_finite,
    get_device,
    make_grad_scaler,
    progress,
    rng_state,
    seed_everything,
    set_rng_state,
    write_json,
)
from wsol.data import WSOLDataset
from wsol.evaluate import centred_box_baseline, evaluate_model
from wsol.figures import boxacc_curves, cam_grid, loc_curve
from wsol.model import CAMModel, build_cam_model

__all__ = ["DEFAULTS", "finetune", "evaluate_run", "build_optimizer", "param_groups", "build_transforms",
           "TRUNK_LAYERS"]

TRUNK_LAYERS = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")

# Every key of a WSOL config, with its meaning (unknown keys are rejected).
DEFAULTS = {
    "name": "wsol",
    "seed": 0,
    "arch": "resnet50",                 # torchvision ResNet of the backbone checkpoint
    "allow_pickle": False,              # load non-weights_only checkpoints (trusted files only)
    "data": {
        "image_root": "data/CUB_200_2011/images",   # image ids are paths relative to this
        "metadata_root": "data/wsol_metadata/CUB",  # holds <train_split>/ and <test_split>/
        "train_split": "train",
        "test_split": "test",
        "num_workers": 4,
        "limit_train": 0,               # >0: use only the first N images (smoke runs)
        "limit_test": 0,
    },
    "input": {
        "resize": 256,                  # train: resize to resize x resize, random crop `crop`, flip
        "crop": 224,
        "test_size": 224,               # test: resize to test_size x test_size; CAMs scored at this size
        "flip": True,
    },
    "epochs": 600,
    "batch_size": 16,
    "optim": {
        "name": "sgd",                  # sgd | adam
        "lr": 0.001,                    # trunk layers
        "lr_classifier": 0.01,          # layers in large_lr_layers
        "large_lr_layers": ["fc"],      # which layers get lr_classifier: [fc] or [layer4, fc]
        "freeze": [],                   # trunk layers kept frozen (params and BN statistics)
        "momentum": 0.9,
        "weight_decay": 1.0e-4,
        "nesterov": False,
        "schedule": "step",             # step | cosine | constant
        "step_size": 150,               # epochs between x gamma decays (step)
        "gamma": 0.1,
    },
    "mixing": {
        "name": "none",                 # none | a pretraining method (pretrain.methods.METHODS key, e.g. alignmix)
        "knobs": {},                    # that method's constructor knobs (pretrain.methods), e.g. {alpha: 2.0}
    },
    "eval": {
        "every": 0,                     # evaluate localization every N epochs (0: only at the end)
        "cam_curve_interval": 0.001,
        "iou_thresholds": [30, 50, 70],
        "loc_threshold": 0.15,          # Top-1 / GT-known Loc: CAM threshold, IoU and comparison
        "loc_iou": 0.5,
        "loc_op": ">=",
        "batch_size": 32,
        "num_figure_images": 16,
    },
    "runtime": {
        "device": "auto",
        "precision": "fp32",            # fp32 | bf16 | fp16 (CUDA only)
        "channels_last": True,          # CUDA only
    },
    "log_every": 20,                    # iterations between log lines
}


# ----------------------------------------------------------------------------- components
def build_transforms(resize: int, crop: int, test_size: int, flip: bool):
    """(train, test) transforms: PIL RGB -> float tensor [3, H, W] in [0, 1]."""
    to_tensor = [T.ToImage(), T.ToDtype(torch.float32, scale=True)]
    train = [T.Resize((resize, resize), antialias=True), T.RandomCrop(crop)]
    if flip:
        train.append(T.RandomHorizontalFlip())
    return (T.Compose(train + to_tensor),
            T.Compose([T.Resize((test_size, test_size), antialias=True)] + to_tensor))


def _layer_of(name: str) -> str:
    """'trunk.4.0.conv1.weight' -> 'layer1'; 'fc.weight' -> 'fc'."""
    parts = name.split(".")
    if parts[0] == "fc":
        return "fc"
    return CAMModel._TRUNK_NAMES[int(parts[1])]


def param_groups(model: CAMModel, lr: float, lr_classifier: float, large_lr_layers, freeze) -> list[dict]:
    """Optimizer groups: ``large_lr_layers`` at lr_classifier, the rest at lr; ``freeze`` excluded
    (requires_grad=False). Each group carries "name" and "layers"."""
    known = set(TRUNK_LAYERS) | {"fc"}
    for what, names in (("large_lr_layers", large_lr_layers), ("freeze", freeze)):
        bad = sorted(set(names) - known)
        if bad:
            raise ValueError(f"optim.{what}: unknown layer(s) {bad}; valid: {sorted(known)}")
    if "fc" in freeze:
        raise ValueError("optim.freeze cannot contain fc (the new classifier must train)")
    large, small = [], []
    for name, p in model.named_parameters():
        layer = _layer_of(name)
        if layer in freeze:
            p.requires_grad_(False)
            continue
        p.requires_grad_(True)
        (large if layer in large_lr_layers else small).append(p)
    groups = []
    if small:
        groups.append({"params": small, "lr": lr, "name": "trunk"})
    if large:
        groups.append({"params": large, "lr": lr_classifier, "name": "large_lr"})
    return groups


def build_optimizer(model: CAMModel, optim: dict) -> torch.optim.Optimizer:
    groups = param_groups(model, optim["lr"], optim["lr_classifier"], optim["large_lr_layers"], optim["freeze"])
    if optim["name"] == "sgd":
        return torch.optim.SGD(groups, lr=optim["lr"], momentum=optim["momentum"],
                               weight_decay=optim["weight_decay"], nesterov=optim["nesterov"])
    if optim["name"] == "adam":
        return torch.optim.Adam(groups, lr=optim["lr"], weight_decay=optim["weight_decay"])
    raise ValueError(f"optim.name must be sgd or adam, got {optim['name']!r}")


def lr_factor(epoch: int, optim: dict, epochs: int) -> float:
    s = optim["schedule"]
    if s == "step":
        return optim["gamma"] ** (epoch // max(1, optim["step_size"]))
    if s == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / max(1, epochs)))
    if s == "constant":
        return 1.0
    raise ValueError(f"optim.schedule must be step, cosine or constant, got {s!r}")


def set_frozen_eval(model: CAMModel, freeze) -> None:
    """Frozen layers keep their BN statistics: put them in eval mode after model.train()."""
    for name, module in model.named_trunk().items():
        if name in freeze:
            module.eval()


def _mix_batch(images, labels, mixing: dict, generator: torch.Generator):
    """Optional input mixing. Returns (images, labels_a, labels_b, lam) with lam the weight of labels_a."""
    method = mixing["method"]
    if method == "none" or torch.rand((), generator=generator).item() >= mixing["prob"]:
        return images, labels, labels, 1.0
    from pretrain import mixing as M  # pure functions only

    perm = torch.randperm(images.shape[0], generator=generator).to(images.device)
    lam = float(torch.distributions.Beta(mixing["alpha"], mixing["alpha"]).sample().item()) \
        if mixing["alpha"] > 0 else 1.0
    if method == "mixup":
        return M.mixup(images, perm, lam), labels, labels[perm], lam
    if method == "cutmix":
        h, w = images.shape[-2:]
        box, kept = M.cutmix_box(h, w, lam, generator)
        mask = M.box_mask(h, w, box, device=images.device, dtype=images.dtype)
        return M.mask_mix(images, images[perm], mask), labels, labels[perm], kept
    raise ValueError(f"mixing.method must be none, mixup or cutmix, got {method!r}")


def _datasets(cfg):
    d, inp = cfg["data"], cfg["input"]
    train_tf, test_tf = build_transforms(inp["resize"], inp["crop"], inp["test_size"], inp["flip"])
    root = Path(d["metadata_root"])
    train = WSOLDataset(d["image_root"], root / d["train_split"], train_tf)
    test = WSOLDataset(d["image_root"], root / d["test_split"], test_tf, require_boxes=True)
    for ds, lim in ((train, d["limit_train"]), (test, d["limit_test"])):
        if lim:
            ds.image_ids = ds.image_ids[:lim]
            ds.metadata.image_ids = ds.image_ids
    num_classes = max(train.num_classes, test.num_classes)
    return train, test, num_classes


def _eval(model, test, cfg, device, scoremap_dir=None, keep_examples=0):
    e = cfg["eval"]
    loader = DataLoader(test, batch_size=e["batch_size"], shuffle=False, num_workers=cfg["data"]["num_workers"])
    size = (cfg["input"]["test_size"],) * 2
    return evaluate_model(model, loader, test.metadata, device, size=size,
                          cam_curve_interval=e["cam_curve_interval"], iou_thresholds=e["iou_thresholds"],
                          loc_threshold=e["loc_threshold"], loc_iou=e["loc_iou"], loc_op=e["loc_op"],
                          scoremap_dir=scoremap_dir, keep_examples=keep_examples,
                          autocast_ctx=lambda: autocast(device, cfg["runtime"]["precision"]), progress=progress)


def _public(res: dict) -> dict:
    return {k: v for k, v in res.items() if not k.startswith("_")}


# ----------------------------------------------------------------------------- fine-tuning
def finetune(cfg: dict, weights: str | None, run_dir, resume: bool = True) -> dict:
    """Fine-tune a CAM model from a backbone checkpoint (None: random init) and evaluate it.

    Returns metrics in percent: top1_cls, maxboxacc, maxboxacc_v2, top1_loc, gt_known_loc,
    top5_loc, maxboxacc_per_iou, best_threshold, centred_box baseline, curve (one entry per
    evaluated epoch). Writes run_dir/metrics.json and figures/*.png. An existing
    run_dir/checkpoints/last.pth is resumed (resume=True); a finished run just re-reports.
    """
    cfg = validate(cfg, DEFAULTS)
    run_dir = Path(run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    atomic_write_text(dump_config(cfg), run_dir / "config.yaml")
    seed_everything(cfg["seed"])
    device = get_device(cfg["runtime"]["device"])
    train_set, test_set, num_classes = _datasets(cfg)
    model = build_cam_model(cfg["arch"], num_classes, weights, cfg["allow_pickle"]).to(device)
    if device.type == "cuda" and cfg["runtime"]["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    optim = cfg["optim"]
    optimizer = build_optimizer(model, optim)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    scaler = make_grad_scaler(device, cfg["runtime"]["precision"])
    logger = JsonlLogger(run_dir / "log.jsonl")
    gen = torch.Generator().manual_seed(cfg["seed"])
    start_epoch, curve, step = 0, [], 0
    ckpt_path = run_dir / "checkpoints" / "last.pth"
    if resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        set_rng_state(ck["rng"])
        gen.set_state(ck["generator"])
        start_epoch, curve, step = ck["epoch"], list(ck["curve"]), ck["step"]
        logger.log({"event": "resume", "epoch": start_epoch, "time": time.time()})
    else:
        logger.log({"event": "start", "weights": weights, "num_classes": num_classes,
                    "train_images": len(train_set), "test_images": len(test_set), "time": time.time()})
    loader = DataLoader(train_set, batch_size=cfg["batch_size"], shuffle=True, drop_last=len(train_set) >
                        cfg["batch_size"], num_workers=cfg["data"]["num_workers"],
                        generator=torch.Generator().manual_seed(cfg["seed"]))
    epochs = cfg["epochs"]
    if cfg["mixing"]["name"] != "none":  # TEMPORARY until the engine routes mixing through pretrain.methods
        raise NotImplementedError(f"mixing.name={cfg['mixing']['name']!r}: method mixing is not wired into WSOL "
                                  "fine-tuning yet (set mixing.name=none)")
    for epoch in range(start_epoch, epochs):
        loader.generator.manual_seed(cfg["seed"] * 100003 + epoch)  # same order after a resume
        factor = lr_factor(epoch, optim, epochs)
        for g, lr in zip(optimizer.param_groups, base_lrs, strict=True):
            g["lr"] = lr * factor
        model.train()
        set_frozen_eval(model, optim["freeze"])
        t0, seen, loss_sum, correct = time.time(), 0, 0.0, 0
        bar = progress(loader, desc=f"wsol epoch {epoch + 1}/{epochs}")
        for images, labels, _ in bar:
            images, labels = images.to(device, non_blocking=True), labels.to(device)
            if device.type == "cuda" and cfg["runtime"]["channels_last"]:
                images = images.contiguous(memory_format=torch.channels_last)
            images, ya, yb, lam = _mix_batch(images, labels, {"method": "none"}, gen)
            with autocast(device, cfg["runtime"]["precision"]):
                logits = model(images)
                loss = lam * F.cross_entropy(logits, ya) + (1 - lam) * F.cross_entropy(logits, yb)
            check_finite(loss, step)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            seen += images.shape[0]
            loss_sum += float(loss.detach()) * images.shape[0]
            correct += int((logits.argmax(1) == ya).sum())
            if step % cfg["log_every"] == 0:
                logger.log({"step": step, "epoch": epoch + 1, "loss": float(loss.detach()),
                            "lr": [g["lr"] for g in optimizer.param_groups]})
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        record = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / max(1, seen),
                  "train_acc": 100.0 * correct / max(1, seen), "time": time.time() - t0}
        every = cfg["eval"]["every"]
        if every and (epoch + 1) % every == 0 and epoch + 1 < epochs:
            res = _public(_eval(model, test_set, cfg, device))
            point = {"epoch": epoch + 1, **{k: res[k] for k in ("top1_cls", "maxboxacc", "maxboxacc_v2",
                                                                 "top1_loc", "gt_known_loc")}}
            curve.append(point)
            record.update({"eval": point})
        logger.log(record)
        atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "rng": rng_state(), "generator": gen.get_state(),
                     "epoch": epoch + 1, "step": step, "curve": curve, "config": dump_config(cfg)}, ckpt_path)
    atomic_save({"model": model.state_dict(), "arch": cfg["arch"], "num_classes": num_classes,
                 "config": dump_config(cfg)}, run_dir / "cam_model.pth")
    metrics = _final_report(model, test_set, cfg, device, run_dir, curve, logger, weights)
    if ckpt_path.is_file():  # keep the final point, so that a longer resumed run reports the whole curve
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        ck["curve"] = metrics["curve"]
        atomic_save(ck, ckpt_path)
    return metrics


def _final_report(model, test_set, cfg, device, run_dir, curve, logger, weights) -> dict:
    res = _eval(model, test_set, cfg, device, keep_examples=cfg["eval"]["num_figure_images"])
    final = {"epoch": cfg["epochs"], **{k: res[k] for k in ("top1_cls", "maxboxacc", "maxboxacc_v2",
                                                             "top1_loc", "gt_known_loc")}}
    curve = [c for c in curve if c["epoch"] != final["epoch"]] + [final]
    size = (cfg["input"]["test_size"],) * 2
    baseline = centred_box_baseline(test_set.metadata, size, 0.5, cfg["eval"]["iou_thresholds"])
    metrics = {**_public(res), "curve": curve, "weights": weights, "centred_box": baseline}
    fig = Path(run_dir) / "figures"
    cam_grid(res["_examples"], fig / "cam_grid.png")
    boxacc_curves(res["_thresholds"], {**{f"IoU {d} (all contours)": a for d, a in res["_box_acc"].items()},
                                       "IoU 50 (largest contour)": res["_box_acc_v1"]}, fig / "boxacc.png")
    loc_curve(curve, fig / "loc_curve.png")
    write_json(metrics, Path(run_dir) / "metrics.json")
    logger.log({"event": "done", **{k: metrics[k] for k in ("top1_cls", "maxboxacc", "maxboxacc_v2",
                                                             "top1_loc", "gt_known_loc")}})
    return metrics


def evaluate_run(cfg: dict, cam_model_path, scoremap_dir=None, out_json=None) -> dict:
    """Evaluate a fine-tuned CAM model file (``run_dir/cam_model.pth``) on the test split, saving
    score maps as ``<scoremap_dir>/<image_id>.npy`` (float32, [0, 1], test_size x test_size)."""
    cfg = validate(cfg, DEFAULTS)
    device = get_device(cfg["runtime"]["device"])
    ck = torch.load(cam_model_path, map_location="cpu", weights_only=True)
    _, test_set, _ = _datasets(cfg)
    model = CAMModel(ck["arch"], ck["num_classes"])
    model.load_state_dict(ck["model"])
    res = _public(_eval(model.to(device), test_set, cfg, device, scoremap_dir=scoremap_dir))
    if out_json:
        write_json(res, out_json)
    return res
