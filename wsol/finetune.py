"""WSOL fine-tuning of a CAM model on a wsolevaluation split (CUB), and its evaluation.

``finetune(cfg, weights, run_dir) -> metrics`` is the entry point (``tools/run_wsol.py finetune``
and the pipeline). Two recipes are configs, not code paths:

* AlignMix-style: SGD, ``optim.lr_classifier`` (0.01) for ``optim.large_lr_layers`` (fc, or
  layer4 + fc) and ``optim.lr`` (0.001) for the rest, step decay; resize 256 / random crop 224 /
  flip for training, resize 224 for testing.
* multi-mix-style: ``optim.freeze`` = everything but layer4 and fc, Adam lr 1e-4,
  ``eval.every_epochs: 1`` (localization after every epoch -> the fine-tuning curve).

Run folder: config.yaml, log.jsonl, checkpoints/last.pth (model, optimizer, scheduler, epoch,
curve, RNG; atomic), cam_model.pth (for ``tools/run_wsol.py evaluate``), metrics.json,
figures/*.png.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.transforms import v2 as T

from mixup_transfer.core import distributed as ddist
from mixup_transfer.core import fingerprint
from mixup_transfer.core.checkpoint import ARCHS, CheckpointError, read_checkpoint
from mixup_transfer.core.config import ConfigError, check_ranges, dump_config, validate
from mixup_transfer.core.engine import ClassificationTask, Engine, LoopSettings
from mixup_transfer.core.engine import build_optimizer as _build_optimizer
from mixup_transfer.core.runtime import (
    atomic_save,
    barrier,
    configure_cuda,
    get_device,
    is_main_process,
    seed_everything,
    write_json,
)
from mixup_transfer.core.schedule import lr_factor
from mixup_transfer.core.units import with_units
from mixup_transfer.core.vocabulary import DATA, EVAL, OPTIM, RUNTIME, fragment
from pretrain.methods import build_configured, check_method_config
from wsol.data import WSOLDataset
from wsol.evaluate import centred_box_baseline, evaluate_model
from wsol.figures import boxacc_curves, cam_grid, loc_curve
from wsol.model import CAMModel, build_cam_model

__all__ = ["DEFAULTS", "finetune", "evaluate_run", "build_optimizer", "param_groups",
           "build_transforms", "TRUNK_LAYERS"]

TRUNK_LAYERS = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")

# Every key of a WSOL config, with its meaning (unknown keys are rejected): the shared keys
# (optim.lr, data.num_workers, method.name, ...) mean what mixup_transfer/core/vocabulary.py says;
# the stage's own keys are commented here.
DEFAULTS = {
    "name": "wsol",
    "seed": 0,
    "model": {
        "arch": "resnet50",             # torchvision ResNet of the backbone checkpoint
    },
    "data": {
        "image_root": "data/CUB_200_2011/images",   # image ids are paths relative to this
        "metadata_root": "data/wsol_metadata/CUB",  # holds <train_split>/ and <test_split>/
        "train_split": "train",
        "test_split": "test",
        # max_train / max_val: the first N images of each split (smoke runs)
        **fragment(DATA, "num_workers", "max_train", "max_val", num_workers=4),
    },
    "input": {
        # train: resize to resize x resize, random crop `crop`, flip
        "resize": 256,
        "crop": 224,
        # test: resize to test_size x test_size; CAMs scored at this size
        "test_size": 224,
        "flip": True,
    },
    "optim": {
        "name": "sgd",                  # sgd | adam
        # lr: the trunk layers; lr_classifier: the layers in large_lr_layers
        **fragment(OPTIM, "epochs", "batch_per_process", "lr", "lr_classifier", "momentum",
                   "weight_decay", "nesterov", "schedule", "gamma", epochs=600,
                   batch_per_process=16, lr=0.001, lr_classifier=0.01, nesterov=False),
        "large_lr_layers": ["fc"],      # which layers get lr_classifier: [fc] or [layer4, fc]
        "freeze": [],                   # trunk layers kept frozen (params and BN statistics)
        "step_size": 150,               # epochs between x gamma decays (schedule step)
    },
    # name: none (cross-entropy; the default) | a pretraining method (pretrain.methods.METHODS),
    # with that method's knobs beside it
    "method": {},
    "eval": {
        # every_epochs: the localization curve
        **fragment(EVAL, "every_epochs", "batch_size", batch_size=32),
        "cam_curve_interval": 0.001,
        "iou_thresholds": [30, 50, 70],
        "loc_threshold": 0.15,          # Top-1 / GT-known Loc: CAM threshold, IoU and comparison
        "loc_iou": 0.5,
        "loc_op": ">=",
        "num_figure_images": 16,
    },
    "runtime": fragment(RUNTIME, "device", "precision", "channels_last", "tensorboard",
                        "log_every_steps"),
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


def param_groups(model: CAMModel, lr: float, lr_classifier: float, large_lr_layers,
                 freeze) -> list[dict]:
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
    groups = param_groups(model, optim["lr"], optim["lr_classifier"], optim["large_lr_layers"],
                          optim["freeze"])
    return _build_optimizer(optim["name"], groups, optim["lr"], optim["momentum"],
                            optim["weight_decay"], optim["nesterov"])


def set_frozen_eval(model: CAMModel, freeze) -> None:
    """Frozen layers keep their BN statistics: put them in eval mode after model.train()."""
    for name, module in model.named_trunk().items():
        if name in freeze:
            module.eval()


RANGES = {
    "optim.epochs": (">", 0), "optim.batch_per_process": (">", 0), "optim.lr": (">", 0),
    "optim.lr_classifier": (">", 0),
    "optim.momentum": (">=", 0, "<", 1), "optim.weight_decay": (">=", 0), "optim.gamma": (">", 0),
    "optim.step_size": (">", 0), "optim.name": ("in", ("sgd", "adam", "adamw")),
    "optim.schedule": ("in", ("step", "cosine", "constant")), "input.resize": (">", 0),
    "input.crop": (">", 0), "input.test_size": (">", 0), "data.num_workers": (">=", 0),
    "data.max_train": (">", 0), "data.max_val": (">", 0), "eval.every_epochs": (">=", 0),
    "eval.cam_curve_interval": (">", 0, "<", 1), "eval.loc_threshold": (">=", 0, "<=", 1),
    "eval.loc_iou": (">", 0, "<=", 1), "eval.loc_op": ("in", (">=", ">")),
    "eval.batch_size": (">", 0), "runtime.log_every_steps": (">", 0),
    "runtime.precision": ("in", ("fp32", "bf16", "fp16")),
}


# the types of the keys whose default is null
TYPES = {"data.max_train": int, "data.max_val": int}


def resolve_config(cfg: dict) -> dict:
    """Validate against DEFAULTS (unknown keys rejected, missing ones filled, types and RANGES
    checked)."""
    # a recipe (someone else's, or an override) must never switch unpickling on
    if "allow_pickle" in cfg:
        raise ConfigError("config key allow_pickle: unpickling cannot be turned on from a "
                          "config or an override; pass --allow-pickle to tools/run_wsol.py for "
                          "a checkpoint you trust")
    cfg = validate(cfg, DEFAULTS, types=TYPES)
    check_ranges(cfg, RANGES)
    cfg["method"] = {"name": "none", **cfg["method"]}
    name, knobs = cfg["method"]["name"], method_knobs(cfg["method"])
    if name != "none":
        check_method_config(name, knobs, "method", "method.name")
    elif knobs:
        raise ConfigError(f"config keys method.{', method.'.join(sorted(knobs))} would be "
                          "ignored: method.name is none (plain cross-entropy); name the method "
                          "(e.g. method.name=multimix) or drop them")
    return cfg


def method_knobs(method: dict) -> dict:
    """The knobs of a `method: {name, ...knobs}` mapping."""
    return {k: v for k, v in method.items() if k != "name"}


class WSOLObjective(nn.Module):
    """The CAM model's training loss: plain cross-entropy (``method.name: none``) or any
    pretraining method of the method registry wrapped around the CAM model. forward(images, labels)
    -> {"loss", "logits"?}."""

    def __init__(self, cam: CAMModel, num_classes: int, method: dict):
        super().__init__()
        self.cam = cam
        name = method.get("name", "none")
        self.method = None if name == "none" else build_configured(name, cam, num_classes,
                                                                   method_knobs(method), "method",
                                                                   "method.name")
        if self.method is not None and self.method.export_head() is not None:
            raise ConfigError(f"mixing {name!r} trains its own classifier head; CAMs need fc on "
                              "pooled features: use a method without one (alignmix: the "
                              "released code's GAP head)")

    @property
    def generator(self):
        return None if self.method is None else self.method.generator

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        if self.method is not None:
            return self.method(images, labels)
        logits = self.cam(images)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def _datasets(cfg):
    d, inp = cfg["data"], cfg["input"]
    train_tf, test_tf = build_transforms(inp["resize"], inp["crop"], inp["test_size"], inp["flip"])
    root = Path(d["metadata_root"])
    train = WSOLDataset(d["image_root"], root / d["train_split"], train_tf)
    test = WSOLDataset(d["image_root"], root / d["test_split"], test_tf, require_boxes=True)
    for ds, lim in ((train, d["max_train"]), (test, d["max_val"])):
        if lim:
            ds.image_ids = ds.image_ids[:lim]
            ds.metadata.image_ids = ds.image_ids
    num_classes = max(train.num_classes, test.num_classes)
    return train, test, num_classes


def _eval(model, test, cfg, device, scoremap_dir=None, keep_examples=0):
    e = cfg["eval"]
    return evaluate_model(model, test, test.metadata, device, e["batch_size"],
                          cfg["data"]["num_workers"], size=(cfg["input"]["test_size"],) * 2,
                          cam_curve_interval=e["cam_curve_interval"],
                          iou_thresholds=e["iou_thresholds"], loc_threshold=e["loc_threshold"],
                          loc_iou=e["loc_iou"], loc_op=e["loc_op"], scoremap_dir=scoremap_dir,
                          keep_examples=keep_examples, precision=cfg["runtime"]["precision"],
                          split=cfg["data"]["test_split"])


def _public(res: dict) -> dict:
    return {k: v for k, v in res.items() if not k.startswith("_")}


# ----------------------------------------------------------------------------- fine-tuning
class WSOLTask(ClassificationTask):
    """Fine-tune a CAM model on the train split; localization every ``eval.every`` epochs (the
    curve)."""

    def __init__(self, cfg: dict, weights: str | None, device: torch.device):
        self.cfg, self.device = cfg, device
        self.rank, self.world = ddist.rank_world()
        self.train_set, self.test_set, self.num_classes = _datasets(cfg)
        cam = build_cam_model(cfg["model"]["arch"], self.num_classes, weights).to(device)
        if device.type == "cuda" and cfg["runtime"]["channels_last"]:
            cam = cam.to(memory_format=torch.channels_last)
        self.cam = cam
        self.model = WSOLObjective(cam, self.num_classes, cfg["method"]).to(device)
        if self.model.method is not None:
            self.model.method.generator = torch.Generator(device=device)
        self.steps_per_epoch = len(self._loader(0))
        self.curve: list[dict] = []

    @property
    def find_unused_parameters(self) -> bool:  # a mixing method whose modes use different heads
        return self.model.method is not None and self.model.method.find_unused_parameters

    def _loader(self, epoch: int) -> DataLoader:
        """The epoch's loader: `batch_size` images per process; under DDP each rank reads its own
        shard of the epoch's order (DistributedSampler with the run seed, `set_epoch`), so the
        ranks train on different images. The order is a function of (seed, epoch) either way: exact
        resume."""
        n, b, workers = (
            len(self.train_set),
            self.cfg["optim"]["batch_per_process"],
            self.cfg["data"]["num_workers"],
        )
        if self.world == 1:
            return DataLoader(self.train_set, batch_size=b, shuffle=True, drop_last=n > b,
                              num_workers=workers,
                              generator=torch.Generator().manual_seed(self.cfg["seed"] * 100003
                                                                      + epoch))
        sampler = DistributedSampler(self.train_set, num_replicas=self.world, rank=self.rank,
                                     shuffle=True, seed=self.cfg["seed"])
        sampler.set_epoch(epoch)
        return DataLoader(self.train_set, batch_size=b, sampler=sampler,
                          drop_last=n > b * self.world, num_workers=workers)

    def batches(self, epoch: int, start_step: int):
        if start_step:
            raise RuntimeError("WSOL checkpoints are written at epoch ends only")
        return self._loader(epoch)

    def before_step(self, micro_step: int) -> None:
        if self.model.method is not None:  # draws depend only on (seed, step), as in pretraining
            # host and device streams
            self.model.method.seed(self.cfg["seed"] * 1_000_003 + micro_step)

    def param_groups(self) -> list[dict]:
        o = self.cfg["optim"]
        return param_groups(self.cam, o["lr"], o["lr_classifier"], o["large_lr_layers"],
                            o["freeze"])

    def lr_lambda(self, step: int) -> float:
        o = self.cfg["optim"]
        epochs = o["epochs"]
        kind = o["schedule"]
        step_size = max(1, o["step_size"])
        return lr_factor(step // self.steps_per_epoch, kind, total=epochs, gamma=o["gamma"],
                         milestones=range(step_size, epochs + step_size, step_size)
                         if kind == "step" else ())

    def train_mode(self) -> None:
        self.model.train()
        set_frozen_eval(self.cam, self.cfg["optim"]["freeze"])

    def end_of_epoch(self, engine, epoch: int, record: dict) -> dict:
        every = self.cfg["eval"]["every_epochs"]
        if not every or epoch % every or epoch >= self.cfg["optim"]["epochs"]:
            return {}
        res = _public(_eval(self.cam, self.test_set, self.cfg, self.device))
        point = {"epoch": epoch, **{k: res[k] for k in _CURVE_KEYS}}
        self.curve.append(point)
        return {"eval": point}

    @property
    def resume_may_change(self) -> tuple[str, ...]:
        keys = ["name", "data.num_workers", "runtime.device", "runtime.tensorboard",
                "runtime.log_every_steps", "eval.num_figure_images", "eval.batch_size"]
        if self.cfg["optim"]["schedule"] != "cosine":
            keys.append("optim.epochs")  # train longer: the schedule does not depend on the total
        return tuple(keys)

    def state_dict(self) -> dict:
        return {"curve": self.curve}

    def load_state_dict(self, state: dict) -> None:
        self.curve = list(state["curve"])


_CURVE_KEYS = ("top1_cls", "maxboxacc_v1", "maxboxacc_v2", "top1_loc", "gt_known_loc")


def run(cfg: dict, inputs: dict | None, run_dir, resume: bool = True, force: bool = False) -> dict:
    """The WSOL stage: fine-tune a CAM model from ``inputs["weights"]`` (a backbone checkpoint;
    None or absent: random init) and evaluate it.

    Returns metrics in percent (its "units" field says so): top1_cls, maxboxacc_v1 (largest
    contour, IoU 50), maxboxacc_v2 (all contours, mean over IoU 30/50/70), top1_loc, gt_known_loc,
    top5_loc, maxboxacc_v2_per_iou, best_threshold, centred_box baseline, curve (one entry per
    evaluated epoch). Writes run_dir/metrics.json and figures/*.png. An existing
    run_dir/checkpoints/last.pth is resumed (resume=True) when it was made from the same config and
    weights (`WSOLTask.resume_may_change` excepted); a finished run just re-reports. Without resume
    an existing checkpoint is an error unless `force`.
    """
    inputs = dict(inputs or {})
    weights = inputs.pop("weights", None)
    if inputs:
        raise ValueError(f"WSOL takes only a 'weights' input, got {sorted(inputs)}")
    cfg = resolve_config(cfg)
    run_dir = Path(run_dir)
    seed_everything(cfg["seed"])
    device = get_device(cfg["runtime"]["device"])
    if device.type == "cuda":
        configure_cuda(benchmark=True)  # fixed-size crops
    task = WSOLTask(cfg, weights, device)
    o = cfg["optim"]
    optimizer = _build_optimizer(o["name"], task.param_groups(), o["lr"], o["momentum"],
                                 o["weight_decay"], o["nesterov"])
    settings = LoopSettings(total_steps=task.steps_per_epoch * o["epochs"], device=device,
                            precision=cfg["runtime"]["precision"],
                            channels_last=device.type == "cuda"
                            and cfg["runtime"]["channels_last"],
                            log_every=cfg["runtime"]["log_every_steps"],
                            progress_desc="wsol epoch", tensorboard=cfg["runtime"]["tensorboard"])
    engine = Engine(task, run_dir, settings, optimizer, task.lr_lambda,
                    config_text=dump_config(cfg))
    engine.fit(resume=resume, force=force, fingerprint=fingerprint.make(cfg, {"weights": weights}),
               header={"weights": weights, "num_classes": task.num_classes,
                       "train_images": len(task.train_set),
                       "per_process_batch": o["batch_per_process"],
                       "test_images": len(task.test_set)})
    engine.check_parameters()
    # the final evaluation stops on non-finite logits or CAMs before the model or any result is
    # written
    metrics = _final_report(task.cam, task.test_set, cfg, device, run_dir, task.curve,
                            engine.logger, weights)
    # keep the final point, so that a longer resumed run reports the whole curve
    task.curve = metrics["curve"]
    engine.save_checkpoint()
    return metrics


def finetune(cfg: dict, weights: str | None, run_dir, resume: bool = True,
             force: bool = False) -> dict:
    """``run`` with the backbone as an argument (the name scripts used)."""
    return run(cfg, {"weights": weights}, run_dir, resume=resume, force=force)


def _final_report(model, test_set, cfg, device, run_dir, curve, logger, weights) -> dict:
    res = _eval(model, test_set, cfg, device, keep_examples=cfg["eval"]["num_figure_images"])
    final = {"epoch": cfg["optim"]["epochs"],
             **{k: res[k] for k in ("top1_cls", "maxboxacc_v1", "maxboxacc_v2",
                                                             "top1_loc", "gt_known_loc")}}
    curve = [c for c in curve if c["epoch"] != final["epoch"]] + [final]
    size = (cfg["input"]["test_size"],) * 2
    baseline = centred_box_baseline(test_set.metadata, size, 0.5, cfg["eval"]["iou_thresholds"])
    metrics = with_units({**_public(res), "curve": curve, "weights": weights,
                          "centred_box": baseline})
    # every rank evaluated its shard and holds the numbers; rank 0 writes
    if not is_main_process():
        barrier()
        return metrics
    atomic_save({"model": model.state_dict(), "arch": cfg["model"]["arch"],
                 "num_classes": model.fc.out_features, "config": dump_config(cfg)},
                 Path(run_dir) / "cam_model.pth")
    fig = Path(run_dir) / "figures"
    cam_grid(res["_examples"], fig / "cam_grid.png")
    boxacc_curves(res["_thresholds"],
                  {**{f"IoU {d} (all contours)": a for d, a in res["_box_acc"].items()},
                                       "IoU 50 (largest contour)": res["_box_acc_v1"]},
                                       fig / "boxacc.png")
    loc_curve(curve, fig / "loc_curve.png")
    write_json(metrics, Path(run_dir) / "metrics.json")
    logger.log({"event": "done",
                **{k: metrics[k] for k in ("top1_cls", "maxboxacc_v1", "maxboxacc_v2",
                                                             "top1_loc", "gt_known_loc")}})
    barrier()
    return metrics


def read_cam_model(path) -> dict:
    """A `cam_model.pth` file ({"arch", "num_classes", "model": state dict}) loaded safely; a
    `CheckpointError` naming the file when it is not one (a backbone, random bytes, a
    pickle...)."""
    ck = read_checkpoint(path)
    if not isinstance(ck, dict) or not {"arch", "num_classes", "model"} <= set(ck):
        keys = sorted(ck)[:10] if isinstance(ck, dict) else type(ck).__name__
        raise CheckpointError(f"{path}: not a CAM model file (expected keys 'arch', "
                              "'num_classes', 'model' as written by `tools/run_wsol.py "
                              f"finetune`, found {keys})")
    if (not isinstance(ck["model"], dict) or ck["arch"] not in ARCHS
        or not isinstance(ck["num_classes"], int)
            or ck["num_classes"] <= 0):
        raise CheckpointError(f"{path}: malformed CAM model file (arch={ck['arch']!r}, "
                              f"num_classes={ck['num_classes']!r})")
    return ck


def evaluate_run(cfg: dict, cam_model_path, scoremap_dir=None, out_json=None) -> dict:
    """Evaluate a fine-tuned CAM model file (``run_dir/cam_model.pth``) on the test split, saving
    score maps as ``<scoremap_dir>/<image_id>.npy`` (float32, [0, 1], test_size x test_size)."""
    cfg = resolve_config(cfg)
    device = get_device(cfg["runtime"]["device"])
    ck = read_cam_model(cam_model_path)
    _, test_set, _ = _datasets(cfg)
    model = CAMModel(ck["arch"], ck["num_classes"])
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:  # missing / unexpected / mis-shaped keys
        raise CheckpointError(f"{cam_model_path}: does not fit a {ck['arch']} CAM model with "
                              f"{ck['num_classes']} classes: {str(e)[:500]}") from e
    # under torchrun each rank writes the score maps of its shard (distinct files), rank 0 the JSON
    res = _public(_eval(model.to(device), test_set, cfg, device, scoremap_dir=scoremap_dir))
    if out_json and is_main_process():
        write_json(res, out_json)
    return res
