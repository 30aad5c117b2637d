"""The detection stage's configuration, shared by both backends: every key once in
:data:`DEFAULTS`, the validation (:func:`resolve_config`, :func:`load_det_config`) and the linear
lr scaling rule (:func:`scaled_lr`). Imports no backend."""

from __future__ import annotations

from mixup_transfer.core.config import ConfigError, check_ranges, load_config, validate
from mixup_transfer.core.vocabulary import DATA, EVAL, OPTIM, RUNTIME, fragment

# Every key, with its meaning: the shared keys (optim.lr, data.num_workers, ...) mean what
# mixup_transfer/core/vocabulary.py says; the stage's own keys are commented here. Real recipes and
# toy configs in configs/detection/ override these.
DEFAULTS = {
    "name": "detection",                  # run name (informational)
    "backend": "torchvision",             # torchvision | detectron2
    "model": {
        "type": "ssd",                    # ssd | faster_rcnn_fpn | faster_rcnn_c4
        "arch": "resnet50",               # resnet18 | resnet34 | resnet50 | resnet101
        # auto (frozen_bn with weights, bn without) | frozen_bn | bn | syncbn
        "norm": "auto",
        "trainable_layers": None,         # None: 3 (R-CNN) / 4 (SSD) with weights, 5 without
        "size": 300,                      # SSD input side; R-CNN test shorter side
        "max_size": 1333,                 # R-CNN longer-side cap
        "train_sizes": None,              # R-CNN multi-scale training shorter sides (None: [size])
        # extra builder keyword arguments (anchor sizes, proposal counts)
        "kwargs": {},
    },
    "data": {
        "format": "voc",                  # voc | coco
        # root: VOC: the VOCdevkit dir; COCO: the dir holding annotations/. max_train / max_val:
        # the first N images
        **fragment(DATA, "root", "num_workers", "max_train", "max_val", root="", num_workers=2),
        "voc_train": ["2007/trainval", "2012/trainval"],
        "voc_test": "2007/test",
        # VOC layout: the class names, in label order (null: the 20 VOC classes)
        "classes": None,
        "coco_train": ["train2017", "annotations/instances_train2017.json"],
        "coco_val": ["val2017", "annotations/instances_val2017.json"],
        "zoom_out_ratio": 4.0,            # SSD zoom-out canvas ratio (1 disables)
        "photometric": True,              # SSD photometric distortion
    },
    "optim": {                            # SGD; epochs are used when max_iter is 0
        **fragment(OPTIM, "epochs", "batch_per_process", "lr", "momentum", "weight_decay", "gamma",
                   epochs=12, batch_per_process=2, lr=0.02),
        # >0: train this many iterations (the reference recipes' unit)
        "max_iter": 0,
        "warmup_iters": 500,
        "warmup_factor": 0.001,
        # lr drops (x gamma), as fractions of the total iterations
        "steps": [0.6667, 0.8889],
        "clip_grad_norm": 0.0,            # 0: off
        # null: lr as given; int: lr is for this global batch and is scaled linearly to
        # batch_per_process x world size (scaled_lr)
        "reference_batch": None,
    },
    "eval": {
        **fragment(EVAL, "every_epochs", "batch_size", batch_size=4),
        "metric": "11point",              # VOC metric: 11point (VOC07) | area
        "figure_examples": 6,
        "figure_score_thresh": 0.3,
    },
    "seeds": [0],
    "runtime": fragment(RUNTIME, "device", "precision", "channels_last", "log_every_steps",
                        "tensorboard", "num_threads"),
}


RANGES = {
    "optim.epochs": (">", 0), "optim.max_iter": (">=", 0), "optim.batch_per_process": (">", 0),
    "optim.lr": (">", 0), "optim.momentum": (">=", 0, "<", 1), "optim.weight_decay": (">=", 0),
    "optim.warmup_iters": (">=", 0), "optim.warmup_factor": (">", 0, "<=", 1),
    "optim.gamma": (">", 0), "optim.clip_grad_norm": (">=", 0), "optim.reference_batch": (">", 0),
    "model.size": (">", 0), "model.max_size": (">", 0), "data.max_train": (">", 0),
    "data.max_val": (">", 0), "data.num_workers": (">=", 0), "eval.every_epochs": (">=", 0),
    "eval.batch_size": (">", 0), "eval.metric": ("in", ("11point", "area")),
    "data.format": ("in", ("voc", "coco")), "backend": ("in", ("torchvision", "detectron2")),
    "runtime.precision": ("in", ("fp32", "bf16", "fp16")), "runtime.log_every_steps": (">", 0),
}


# the types of the keys whose default is null (mixup_transfer.core.config.validate checks the
# others against their defaults)
TYPES = {"model.trainable_layers": int, "model.train_sizes": list[int],
         "optim.reference_batch": int, "data.max_train": int, "data.max_val": int,
         "runtime.num_threads": int}


def resolve_config(cfg: dict) -> dict:
    """Validate against :data:`DEFAULTS` (unknown keys rejected, missing ones filled, types and
    RANGES checked)."""
    cfg = validate(cfg, DEFAULTS, types=TYPES)
    check_ranges(cfg, RANGES)
    if not cfg["seeds"] or len(set(cfg["seeds"])) != len(cfg["seeds"]):
        raise ConfigError(f"config key seeds: {cfg['seeds']!r} must be a non-empty list of "
                          "distinct seeds")
    classes = cfg["data"]["classes"]
    if classes is not None and (not isinstance(classes, list) or not classes
                                or len(set(classes)) != len(classes)
                                or not all(isinstance(c, str) and c for c in classes)):
        raise ConfigError(f"config key data.classes: {classes!r} must be a non-empty list of "
                          "distinct class names (or null: the 20 VOC classes)")
    return cfg


def load_det_config(path, overrides=()) -> dict:
    """A detection YAML (``_BASE_`` chain, ``KEY=VALUE`` overrides) validated against
    :data:`DEFAULTS`."""
    return load_config(path, overrides, defaults=DEFAULTS)



def scaled_lr(lr: float, batch_per_process: int, world_size: int,
              reference_batch: int | None) -> float:
    """The linear scaling rule (Goyal et al. 2017, as torchvision's detection reference states it:
    lr 0.02 for 8 GPUs x 2 images, "0.02/8*$NGPU" otherwise): ``lr * batch_per_process * world_size
    / reference_batch``; ``reference_batch`` None returns ``lr`` unchanged."""
    if reference_batch is None:
        return float(lr)
    if reference_batch <= 0 or batch_per_process <= 0 or world_size <= 0:
        raise ValueError("scaled_lr needs positive batches and world size, got "
                         f"batch_per_process={batch_per_process}, world_size={world_size}, "
                         f"reference_batch={reference_batch}")
    return float(lr) * batch_per_process * world_size / reference_batch


# config keys a resume (or the reuse of a finished seed) may change, in both backends: execution
# and reporting, not results
RESUME_MAY_CHANGE = ("name", "data.num_workers", "runtime.device", "runtime.num_threads",
                     "runtime.log_every_steps", "runtime.tensorboard",
                     "eval.figure_examples", "eval.figure_score_thresh")
