"""Pretraining as a task of the one engine (`mixup_transfer.core.engine`): any mixing method of
`pretrain.methods`, CPU or CUDA, one process or DDP.

`run(cfg, inputs, run_dir) -> metrics` is the stage entry point (`tools/run_pretrain.py` and the
pipeline call it). `cfg` is a nested dict validated against `DEFAULTS` (every key documented
there); its one optional upstream input is the `teacher` checkpoint of a method that needs one
(SuperMix).

Batch sizes are global, as the papers state them: `optim.batch_size` images per optimizer step over
all processes (or `optim.batch_per_process`, MultiMix's b per GPU), split into `world size x
accumulate` micro-batches. Exact
resumption: the data order of an epoch is a function of (seed, epoch), each sample's augmentation
of (seed, epoch, index), and the method's draws of (seed, rank, micro-step): both of its streams
(the host generator that steers control flow and the device generator, `pretrain.methods`) are
seeded from them before every micro-batch, and the host generator's state is saved in the task
state as well.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable

import torch
import torch.distributed as dist
from fvcore.nn.precise_bn import update_bn_stats
from torch.utils.data import DataLoader

from mixup_transfer.core import distributed as ddist
from mixup_transfer.core import fingerprint
from mixup_transfer.core import runtime as rt
from mixup_transfer.core.checkpoint import (
    ALL_ARCHS,
    CheckpointError,
    classifier_head,
    load_classifier,
    save_backbone,
)
from mixup_transfer.core.config import ConfigError, check_ranges, dump_config, validate
from mixup_transfer.core.data import read_bytes, read_image, read_image_uint8
from mixup_transfer.core.engine import ClassificationTask, Engine, LoopSettings, build_optimizer
from mixup_transfer.core.schedule import lr_factor
from mixup_transfer.core.smalldata import DATASETS, detect_layout, open_classification
from mixup_transfer.core.units import units
from mixup_transfer.core.vocabulary import DATA, OPTIM, RUNTIME, fragment
from pretrain.data import (
    EncodedTrainTransform,
    EpochSampler,
    SeededTransform,
    Uint8TrainTransform,
    Uint8ValTransform,
    batch_to_device,
    collate_encoded,
    collate_uint8,
    evenly_spaced,
    padded_train_transform,
    padded_val_transform,
    sample_seed,
    select_loader,
    train_transform,
    val_transform,
)
from pretrain.figures import plot_curves
from pretrain.methods import (
    METHODS,
    ResNetStages,
    build_configured,
    check_method_config,
    have_gco,
    network_stages,
)

log = logging.getLogger(__name__)

DEFAULTS = {
    "name": "pretrain",              # run name (runs/<name>/ when the CLI picks the folder)
    # one seed for data order, augmentation, initialisation and mixing
    "seed": 0,
    # before each evaluation, replace the BatchNorm running statistics (an EMA over the batches the
    # method trained on: mixed images for input-space mixing) by the population statistics of this
    # many clean train batches (precise BN, `recompute_bn_statistics`); 0 = keep the running
    # statistics
    "precise_bn_batches": 0,
    # the shared keys (data, optim, runtime) are declared in mixup_transfer/core/vocabulary.py
    "data": {
        # root: an ImageNet-layout folder (root/train/<wnid>/*.JPEG, root/val/<wnid>/...), or a
        # CIFAR / TinyImageNet folder (mixup_transfer/core/smalldata.py: the folder or its parent)
        **fragment(DATA, "root"),
        # auto (from the layout) | imagenet | cifar10 | cifar100 | tinyimagenet
        "dataset": "auto",
        "train_split": "train",
        "val_split": "val",          # CIFAR: val = its test batch (CIFAR has no validation split)
        # resized (RandomResizedCrop; val: resize + centre crop) | padded (random crop of the
        # stored size after zero padding; val: the stored image) | auto: resized for ImageNet,
        # padded for CIFAR / TinyImageNet
        "crop": "auto",
        "padding": 4,                # padded crop: pixels of zero padding on each side
        # the train crop (and the val centre crop); 32 for CIFAR, 64 for TinyImageNet
        "crop_size": 224,
        "crop_schedule": None,       # [[epoch, size], ...]: train crop size from that epoch on
        # shorter side before the val centre crop; None = crop_size / 0.875
        "val_resize": None,
        "scale_min": 0.08,           # RandomResizedCrop scale range lower bound
        "hflip": True,
        "color_jitter": 0.0,         # brightness/contrast/saturation strength (0 = off)
        # AlexNet PCA lighting std (0.1 in the CutMix/AlignMix code; 0 = off)
        "lighting": 0.0,
        # (num_workers null: the CPUs this process may use over the node's processes, minus one,
        # at most 8; persistent across epochs)
        **fragment(DATA, "num_workers"),
        # uint8 (torchvision.io decode, uint8 crops) | pil (the float PIL path) | dali (NVIDIA DALI
        # on the GPU) | auto (dali when importable on CUDA, else uint8)
        "loader": "uint8",
        # cpu | cuda: nvJPEG decodes each train batch on the GPU (loader uint8, CUDA)
        "decode_device": "cpu",
        **fragment(DATA, "max_train", "max_val"),
    },
    "model": {
        # resnet18 | resnet34 | resnet50 | resnet101 (torchvision); small images: preactresnet18 |
        # wrn16_8 | resnet18_cifar (mixup_transfer/core/smallnets.py) ViTs (timm):
        # vit_small_patch16_224 | vit_tiny_toy (mixup_transfer/core/vits.py)
        "arch": "resnet50",
        "num_classes": None,         # None = number of train class folders
        "zero_init_residual": False,
    },
    # name: <METHODS key> plus that method's knobs (see pretrain.methods)
    "method": {},
    # the frozen teacher of a method that needs one (supermix): a classifier checkpoint with its
    # head for this dataset's classes (backbone.pth of a pretraining run, or any layout of
    # mixup_transfer/core/checkpoint.py); the stage's optional input `teacher` sets it; other
    # methods refuse one
    "teacher": None,
    "optim": {
        # the global batch, or the batch per process (MultiMix's b per GPU; then batch_size: null)
        **fragment(OPTIM, "batch_size", "batch_per_process"),
        # micro-batches per step; None = 1 unless max_batch_per_process needs more
        "accumulate": None,
        # largest micro-batch one process holds (drives automatic accumulation)
        "max_batch_per_process": None,
        # lr_classifier: AlignMix ImageNet uses 0.1 vs 0.01
        **fragment(OPTIM, "epochs", "lr", "lr_classifier"),
        # sgd | adamw (torch's AdamW, betas (0.9, 0.999); momentum and nesterov unused)
        "optimizer": "sgd",
        **fragment(OPTIM, "momentum", "nesterov", "weight_decay", "schedule"),
        "milestones": [75, 150, 225],  # step: epochs where lr *= gamma
        **fragment(OPTIM, "gamma"),
        # piecewise: [[epoch, factor], ...], linear; repeat an epoch to jump
        "points": None,
        "min_factor": 0.0,           # cosine: final lr / peak lr
        # linear warm-up (fractional epochs allowed), multiplies the schedule
        "warmup_epochs": 0.0,
        "warmup_start": 0.01,        # warm-up starts at this fraction of the schedule's lr
    },
    "runtime": {
        # precision: bf16 is the one whose step never waits for the GPU: fp16's GradScaler reads
        # its inf flag every step (torch's design), one synchronisation per step
        **fragment(RUNTIME, "device", "precision", "channels_last", precision="bf16"),
        # torch.compile each network stage as its own region, batch size dynamic
        # (pretrain.adapters.Backbone.enable_compile; a stage that reaches dynamo's recompile_limit
        # is logged as a warning and runs eagerly)
        "compile": False,
        "backend": None,             # DDP backend; None = nccl on CUDA, gloo on CPU
        **fragment(RUNTIME, "num_threads"),
        "checkpoint_every_steps": 0,  # also checkpoint every N steps (0 = only at epoch ends)
        # tensorboard: runs/<name>/tensorboard (the `tensorboard` extra installs the package)
        **fragment(RUNTIME, "log_every_steps", "tensorboard"),
        "flops": True,               # fvcore parameter / FLOP counts in the log header
        "figures": True,             # runs/<name>/figures/curves.png at the end
        # mean squared gradient norm per epoch (multi-mix's variance proxy)
        "grad_norm": True,
        "stop_after_steps": None,    # stop this invocation after N steps (simulates a kill; tests)
    },
}


RANGES = {
    "optim.epochs": (">", 0), "optim.batch_size": (">", 0), "optim.batch_per_process": (">", 0),
    "optim.accumulate": (">", 0), "optim.max_batch_per_process": (">", 0), "optim.lr": (">", 0),
    "optim.lr_classifier": (">", 0), "optim.momentum": (">=", 0, "<", 1),
    "optim.weight_decay": (">=", 0), "optim.gamma": (">", 0), "optim.warmup_epochs": (">=", 0),
    "optim.warmup_start": (">=", 0, "<=", 1),
    "optim.schedule": ("in", ("step", "cosine", "piecewise", "constant")),
    "data.crop_size": (">", 0), "optim.optimizer": ("in", ("sgd", "adamw")),
    "data.num_workers": (">=", 0), "data.max_train": (">", 0), "data.max_val": (">", 0),
    "data.scale_min": (">", 0, "<=", 1), "data.loader": ("in", ("uint8", "pil", "dali", "auto")),
    "data.decode_device": ("in", ("cpu", "cuda")),
    "runtime.precision": ("in", ("fp32", "bf16", "fp16")), "runtime.log_every_steps": (">", 0),
    "runtime.checkpoint_every_steps": (">=", 0), "model.arch": ("in", ALL_ARCHS),
    "model.num_classes": (">", 0), "data.dataset": ("in", DATASETS),
    "data.crop": ("in", ("auto", "resized", "padded")), "data.padding": (">=", 0),
    "precise_bn_batches": (">=", 0),
}


# the types of the keys whose default is null (mixup_transfer.core.config.validate checks the
# others against their defaults)
TYPES = {"teacher": str,
         "data.root": str, "data.num_workers": int, "data.crop_schedule": list[list],
         "data.val_resize": int, "data.max_train": int,
         "data.max_val": int, "model.num_classes": int, "optim.batch_per_process": int,
         "optim.accumulate": int, "optim.max_batch_per_process": int, "optim.lr_classifier": float,
         "optim.points": list[list], "runtime.backend": str, "runtime.num_threads": int,
         "runtime.stop_after_steps": int}


def resolve_config(cfg: dict) -> dict:
    cfg = validate(cfg, DEFAULTS, types=TYPES)
    check_ranges(cfg, RANGES)
    if not cfg["data"]["root"]:
        raise ConfigError("data.root is required (an ImageNet-layout folder)")
    if not isinstance(cfg["method"], dict) or "name" not in cfg["method"]:
        raise ConfigError("method.name is required (e.g. method: {name: multimix})")
    check_method_config(cfg["method"]["name"],
                        {k: v for k, v in cfg["method"].items() if k != "name"})
    check_teacher(cfg["method"], cfg["teacher"])
    return cfg


def check_teacher(method_cfg: dict, teacher: str | None) -> None:
    """A method that needs a teacher gets one, and no other method does (ConfigError naming the
    key)."""
    method = method_cfg["name"]
    needs = METHODS[method].uses_teacher({k: v for k, v in method_cfg.items() if k != "name"})
    if needs and not teacher:
        raise ConfigError(f"teacher: method {method!r} needs a teacher checkpoint (set teacher: "
                          "<path to a classifier checkpoint of this dataset, e.g. an erm run's "
                          "backbone.pth>)")
    if teacher and not needs:
        raise ConfigError(f"teacher: method {method!r} does not use a teacher (got {teacher!r}); "
                          "remove the key")


def load_teacher(path: str, num_classes: int, device: torch.device) -> ResNetStages:
    """The teacher network from a classifier checkpoint (its arch from the checkpoint, its head for
    `num_classes`), in eval mode, frozen, on `device`; a checkpoint that does not fit is a
    ConfigError."""
    try:
        state, meta = load_classifier(path, None, num_classes)
        if classifier_head(path) is not None:
            raise CheckpointError(f"{path}: its classifier has its own head between layer4 and "
                                  "fc (a teacher here is a network whose fc reads the pooled "
                                  "features)")
    except (CheckpointError, OSError) as e:
        raise ConfigError(f"teacher: {e}") from e
    net = network_stages(meta["arch"], meta["num_classes"])
    net.net.load_state_dict(state, strict=True)
    return net.to(device).eval().requires_grad_(False)


def batch_plan(optim: dict, world: int) -> dict:
    """Split the configured batch over `world` processes: global, per process, accumulation,
    micro-batch."""
    if (optim["batch_size"] is None) == (optim["batch_per_process"] is None):
        raise ConfigError("set exactly one of optim.batch_size (global) and "
                          "optim.batch_per_process")
    if optim["batch_per_process"] is not None:
        per_process = int(optim["batch_per_process"])
    else:
        if int(optim["batch_size"]) % world:
            raise ConfigError(f"optim.batch_size={optim['batch_size']} is not divisible by "
                              f"{world} processes")
        per_process = int(optim["batch_size"]) // world
    acc = optim["accumulate"]
    if acc is None:
        acc, cap = 1, optim["max_batch_per_process"]
        while cap and (per_process // acc > cap or per_process % acc):
            acc += 1
    if int(acc) < 1 or per_process % int(acc):
        raise ConfigError(f"optim.accumulate={acc} does not divide the per-process batch "
                          f"{per_process}")
    acc = int(acc)
    return {"world_size": world, "global_batch": per_process * world,
            "per_process_batch": per_process, "accumulate": acc, "micro_batch": per_process // acc}


class PretrainTask(ClassificationTask):
    """One mixing method on an ImageNet-layout folder; the engine runs its steps. The train top-1
    of the epoch record counts the steps whose method returns clean logits (ERM;
    `ClassificationTask`)."""

    resumable_across_world_sizes = True

    @property
    def resume_may_change(self) -> tuple[str, ...]:
        """Config keys a resume may change: how the run is executed and logged, not what it
        computes; the number of epochs too when the schedule does not depend on it."""
        keys = ["name", "data.num_workers", "runtime.device", "runtime.backend",
                "runtime.num_threads", "runtime.checkpoint_every_steps", "runtime.log_every_steps",
                "runtime.tensorboard", "runtime.flops", "runtime.figures",
                "runtime.stop_after_steps"]
        if self.cfg["optim"]["schedule"] != "cosine":
            keys.append("optim.epochs")
        return tuple(keys)

    def __init__(self, cfg: dict, rank: int, world: int, device: torch.device):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        dcfg, ocfg = cfg["data"], cfg["optim"]
        self.plan = batch_plan(ocfg, world)
        self.layout = detect_layout(dcfg["root"], dcfg["dataset"])[0]
        self.crop = (
            dcfg["crop"]
            if dcfg["crop"] != "auto"
            else ("resized" if self.layout == "imagenet" else "padded")
        )
        self.loader = self._choose_loader(dcfg, device)
        self.encoded = dcfg["decode_device"] == "cuda"
        train_reader = read_bytes if self.encoded else (read_image if self.loader == "pil"
                                                        else read_image_uint8)
        self.train_set = open_classification(dcfg["root"], dcfg["train_split"], dcfg["dataset"],
                                             reader=train_reader)
        self.val_set = open_classification(dcfg["root"], dcfg["val_split"], dcfg["dataset"],
                                           classes=self.train_set.classes,
                                           reader=read_image if self.loader == "pil"
                                           else read_image_uint8)
        self._train_loader: tuple[int, Iterable] | None = None  # (crop size, persistent loader)
        self._val: DataLoader | None = None
        self.num_classes = cfg["model"]["num_classes"] or len(self.train_set.classes)
        subset = evenly_spaced(len(self.train_set), dcfg["max_train"])
        n_train = len(subset) if subset else len(self.train_set)
        self.sampler = EpochSampler(n_train, self.plan["global_batch"], rank, world, cfg["seed"],
                                    subset)
        self.steps_per_epoch = self.sampler.steps
        net = network_stages(cfg["model"]["arch"], self.num_classes,
                             cfg["model"]["zero_init_residual"])
        knobs = {k: v for k, v in cfg["method"].items() if k != "name"}
        self.model = build_configured(cfg["method"]["name"], net, self.num_classes,
                                      knobs).to(device)
        if cfg["teacher"]:
            self.model.teacher = load_teacher(cfg["teacher"], self.num_classes, device)
        if cfg["runtime"]["channels_last"] and device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
        if cfg["runtime"]["compile"]:
            net.enable_compile()
        self.model.generator = torch.Generator(device=device)
        self.history: list[dict] = []

    @property
    def workers(self) -> int:
        n = self.cfg["data"]["num_workers"]
        return rt.default_workers() if n is None else int(n)

    @property
    def find_unused_parameters(self) -> bool:
        return self.model.find_unused_parameters

    @property
    def net(self) -> ResNetStages:
        return self.model.model

    def param_groups(self) -> list[dict]:
        o = self.cfg["optim"]
        params = [p for p in self.model.parameters() if p.requires_grad]
        if o["lr_classifier"] is None:
            return [{"params": params, "lr": o["lr"], "name": "all"}]
        fc = {id(p) for p in self.net.fc.parameters()}
        return [{"params": [p for p in params if id(p) not in fc], "lr": o["lr"],
                 "name": "backbone"},
                {"params": [p for p in params if id(p) in fc], "lr": o["lr_classifier"],
                 "name": "classifier"}]

    def lr_lambda(self, step: int) -> float:
        o = self.cfg["optim"]
        return lr_factor(step / self.steps_per_epoch, o["schedule"], total=o["epochs"],
                         milestones=o["milestones"], gamma=o["gamma"], points=o["points"],
                         min_factor=o["min_factor"], warmup=o["warmup_epochs"],
                         warmup_start=o["warmup_start"])

    def _choose_loader(self, dcfg: dict, device: torch.device) -> str:
        """`select_loader`'s data path; the small-image sets (CIFAR, TinyImageNet: decoded arrays
        or tiny files) and the padded crop always take the PIL path, and asking them for DALI or
        GPU decoding is an error."""
        if self.layout == "imagenet" and self.crop != "padded":
            return select_loader(dcfg["loader"], dcfg["decode_device"], device,
                                 dcfg["color_jitter"], dcfg["lighting"])
        if dcfg["loader"] == "dali" or dcfg["decode_device"] == "cuda":
            raise ConfigError(f"data.loader: {dcfg['loader']} / data.decode_device: "
                              f"{dcfg['decode_device']} are for ImageNet-layout JPEGs with the "
                              f"resized crop; this run is {self.layout} with the {self.crop} "
                              "crop (data.loader: uint8 or pil, data.decode_device: cpu)")
        return "pil"

    def before_step(self, micro_step: int) -> None:
        # the method's draws depend only on (seed, rank, micro-step): exact resumption, whatever
        # was saved
        self.model.seed(sample_seed(self.cfg["seed"] + 1, self.rank, micro_step),
                        shared=sample_seed(self.cfg["seed"] + 2, 0, micro_step))

    def to_device(self, batch, device: torch.device, channels_last: bool):
        return batch_to_device(batch, device, channels_last)

    def batches(self, epoch: int, start_step: int):
        """The epoch's micro-batches. The loader persists across epochs (one per crop size of
        `crop_schedule`: the DataLoader's workers, DALI's pipeline); the shared sampler gives each
        epoch its own order from `set_epoch`."""
        size = crop_size_at(epoch, self.cfg["data"])
        self.sampler.set_epoch(epoch, start_step)
        if self._train_loader is None or self._train_loader[0] != size:
            self._train_loader = None  # let the old workers go before starting new ones
            self._train_loader = (size, self._make_train_loader(size))
        return self._train_loader[1]

    def _make_train_loader(self, size: int):
        d = self.cfg["data"]
        if self.loader == "dali":
            from pretrain.dali import DaliTrainLoader

            return DaliTrainLoader(self.train_set.samples, self.sampler, size, d["scale_min"],
                                   d["hflip"], self.plan["micro_batch"], self.device,
                                   self.cfg["seed"])
        if self.encoded:
            tf = EncodedTrainTransform(size, d["scale_min"], d["hflip"], d["color_jitter"],
                                       d["lighting"])
            collate = collate_encoded
        elif self.crop == "padded":
            tf, collate = padded_train_transform(size, d["padding"], d["hflip"]), None
        elif self.loader == "pil":
            tf, collate = train_transform(size, d["scale_min"], d["hflip"], d["color_jitter"],
                                          d["lighting"]), None
        else:
            tf = Uint8TrainTransform(size, d["scale_min"], d["hflip"], d["color_jitter"],
                                     d["lighting"])
            collate = collate_uint8
        return DataLoader(SeededTransform(self.train_set, tf), batch_size=self.plan["micro_batch"],
                          sampler=self.sampler, num_workers=self.workers, drop_last=True,
                          collate_fn=collate, pin_memory=self.device.type == "cuda",
                          persistent_workers=self.workers > 0,
                          generator=torch.Generator().manual_seed(self.cfg["seed"]))

    def _val_loader(self) -> DataLoader:
        if self._val is not None:
            return self._val
        d = self.cfg["data"]
        idx = evenly_spaced(len(self.val_set), d["max_val"]) or list(range(len(self.val_set)))
        if self.crop == "padded":
            tf = padded_val_transform(d["crop_size"])
        else:
            tf = (val_transform if self.loader == "pil" else Uint8ValTransform)(d["crop_size"],
                                                                                d["val_resize"])
        ds = torch.utils.data.Subset(SeededTransform(self.val_set, tf),
                                     idx[self.rank:: self.world])
        self._val = DataLoader(ds, batch_size=self.plan["micro_batch"], shuffle=False,
                               num_workers=self.workers,
                               collate_fn=None if self.loader == "pil" else collate_uint8,
                               pin_memory=self.device.type == "cuda",
                               persistent_workers=self.workers > 0)
        return self._val

    @torch.no_grad()
    def evaluate(self, precision: str) -> dict:
        """Top-1 / top-5 / loss on the val set, each rank its shard, summed over ranks. Rank 0's
        BatchNorm statistics first: after DDP training each rank holds those of its own last
        batches."""
        ddist.broadcast_buffers(self.model)
        self.model.eval()
        # as the model
        channels_last = self.device.type == "cuda" and self.cfg["runtime"]["channels_last"]
        # n, top1, top5, loss, non-finite logits
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)
        for images, labels in self._val_loader():
            images, labels = self.to_device((images, labels), self.device, channels_last)
            with rt.autocast(self.device, precision):
                # the network's fc unless the method has its own head
                logits = self.model.predict(images).float()
            hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels.view(-1, 1)
            # torch.full fills on the device; torch.tensor(host value, device=...) would be a
            # blocking copy
            sums += torch.stack([torch.full((), float(len(labels)), dtype=torch.float64,
                                            device=self.device),
                                 hit[:, :1].any(1).sum().double(), hit.any(1).sum().double(),
                                 torch.nn.functional.cross_entropy(logits, labels,
                                                                   reduction="sum").double(),
                                 rt.count_nonfinite(logits).double()])
        if self.world > 1:
            dist.all_reduce(sums)
        self.model.train()
        n, top1, top5, loss, nonfinite = sums.tolist()  # the one read of the evaluation
        rt.check_outputs_finite("pretraining", "val", {"logit": int(nonfinite)})
        n = max(n, 1.0)
        return {"val_top1": 100 * top1 / n, "val_top5": 100 * top5 / n, "val_loss": loss / n}

    @torch.no_grad()
    def recompute_bn_statistics(self, epoch: int, precision: str) -> int:
        """Precise BN (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", section 3;
        detectron2's PreciseBN hook, fvcore's `update_bn_stats`): the network's BatchNorm running
        statistics become the population statistics of the first `precise_bn_batches` train batches
        of `epoch` (1-based) as the loader gives them: augmented crops, not mixed. The running
        statistics otherwise describe the inputs the method trained on, which for input-space
        mixing are blends with a smaller per-channel variance than clean images, while evaluation,
        transfer and a detector's frozen BatchNorm see clean images. Returns the number of batches
        used (at most one epoch's)."""
        n = min(int(self.cfg["precise_bn_batches"]), self.steps_per_epoch)
        if n == 0:
            return 0
        channels_last = self.device.type == "cuda" and self.cfg["runtime"]["channels_last"]
        images = (self.to_device(b, self.device, channels_last)[0]
                  for b in self.batches(epoch - 1, 0))
        was_training = self.net.training
        self.net.train()
        with rt.autocast(self.device, precision):
            update_bn_stats(self.net, images, n)
        self.net.train(was_training)
        return n

    def end_of_epoch(self, engine: Engine, epoch: int, record: dict) -> dict:
        self.recompute_bn_statistics(epoch, engine.precision)
        out = self.evaluate(engine.precision)
        if not all(map(lambda v: v == v and abs(v) != float("inf"), out.values())):
            raise rt.NonFiniteLossError(f"non-finite validation metrics {out} after epoch "
                                        f"{epoch}; stopping. The last good checkpoint is kept.")
        self.history.append({**record, **out})
        return out

    def state_dict(self) -> dict:
        return {"history": self.history, "host_rng": self.model.host_rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state["history"])
        if "host_rng" in state:  # a checkpoint without it: keep the seeded state
            self.model.host_rng.bit_generator.state = state["host_rng"]

    def header(self, engine: Engine) -> dict:
        head = {"method": self.cfg["method"]["name"], "arch": self.cfg["model"]["arch"],
                "num_classes": self.num_classes,
                "params": sum(p.numel() for p in self.net.net.parameters()), **self.plan,
                "device": str(self.device), "precision": engine.precision,
                "train_images": self.sampler.steps * self.sampler.global_batch,
                "steps_per_epoch": self.steps_per_epoch, "torch_threads": torch.get_num_threads(),
                "puzzlemix_solver": puzzlemix_solver(self.cfg["method"]), "config": self.cfg}
        if self.cfg["runtime"]["flops"]:
            head["flops_per_image"] = fvcore_flops(self.net, self.cfg["data"]["crop_size"])
        return head


def puzzlemix_solver(method_cfg: dict) -> str:
    """The PuzzleMix graph-cut solver a run uses (logged in the header)."""
    asked = method_cfg.get("solver", (method_cfg.get("puzzle") or {}).get("solver", "auto"))
    if asked == "swap" or (asked == "auto" and not have_gco()):
        return "swap (built-in alpha-beta swap" + ("" if have_gco()
                                                   else "; gco-wrapper not installed") + ")"
    return "gco"


def crop_size_at(epoch: int, data: dict) -> int:
    size = data["crop_size"]
    for e, s in sorted(data["crop_schedule"] or []):
        if epoch >= e:
            size = s
    return int(size)


def fvcore_flops(model: ResNetStages, size: int) -> float | None:
    """fvcore's count (multiply-adds, its "FLOP" convention) for one image at `size`, or None."""
    import copy
    import warnings

    try:
        with warnings.catch_warnings():
            # fvcore's import and tracing use deprecated torch.jit APIs
            warnings.simplefilter("ignore")
            from fvcore.nn import FlopCountAnalysis

            m = copy.deepcopy(model).cpu().float().eval()
            fca = FlopCountAnalysis(m, torch.zeros(1, 3, size, size))
            fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            return float(fca.total())
    except Exception:  # noqa: BLE001 - a header nicety must never stop training
        return None


def build(cfg: dict, run_dir: str | os.PathLike) -> tuple[PretrainTask, Engine]:
    """The task and its engine for a resolved config (under torchrun every process builds its
    own)."""
    cfg = resolve_config(cfg)
    rcfg, ocfg = cfg["runtime"], cfg["optim"]
    if rcfg["num_threads"]:
        torch.set_num_threads(int(rcfg["num_threads"]))
    rank, world, _ = rt.init_distributed(rcfg["backend"])
    device = rt.get_device(rcfg["device"])
    if device.type == "cuda":
        # fixed crop sizes (a crop_schedule re-tunes once per size)
        rt.configure_cuda(benchmark=True)
    rt.seed_everything(cfg["seed"])
    task = PretrainTask(cfg, rank, world, device)
    optimizer = build_optimizer(ocfg["optimizer"], task.param_groups(), ocfg["lr"],
                                ocfg["momentum"], ocfg["weight_decay"], ocfg["nesterov"])
    settings = LoopSettings(
        total_steps=task.steps_per_epoch * ocfg["epochs"], device=device,
        precision=rcfg["precision"], channels_last=rcfg["channels_last"] and device.type == "cuda",
        accumulate=task.plan["accumulate"], grad_norm=rcfg["grad_norm"],
        log_every=rcfg["log_every_steps"], checkpoint_every=rcfg["checkpoint_every_steps"],
        stop_after_steps=rcfg["stop_after_steps"], tensorboard=rcfg["tensorboard"])
    engine = Engine(task, run_dir, settings, optimizer, task.lr_lambda,
                    config_text=dump_config(cfg))
    return task, engine


def finish(task: PretrainTask, engine: Engine) -> dict:
    """Export backbone.pth (the contract), metrics.json and the curves; returns the metrics."""
    cfg, run_dir = task.cfg, engine.run_dir
    last = task.history[-1] if task.history else task.evaluate(engine.precision)
    metrics = {"method": cfg["method"]["name"], "method_variant": task.model.variant,
               "arch": cfg["model"]["arch"], "epochs": cfg["optim"]["epochs"],
               "steps": engine.step, "val_top1": last.get("val_top1"),
               "val_top5": last.get("val_top5"),
               # short aliases (report)
               "top1": last.get("val_top1"), "top5": last.get("val_top5"),
               "val_loss": last.get("val_loss"), "train_loss": last.get("train_loss"),
               "best_val_top1": max((h.get("val_top1", 0.0) for h in task.history), default=None),
               "train_time_s": sum(h.get("epoch_time_s", 0.0) for h in task.history),
               "global_batch": task.plan["global_batch"]}
    metrics["units"] = units(metrics)
    if rt.is_main_process():
        engine.check_parameters()
        meta = {"arch": cfg["model"]["arch"], "num_classes": task.num_classes,
                "method": cfg["method"]["name"], "method_variant": task.model.variant,
                "epochs": cfg["optim"]["epochs"], "config": dump_config(cfg), "metrics": metrics,
                # what each fc row means (checked downstream)
                "classes": [str(c) for c in task.train_set.classes]}
        save_backbone(run_dir / "backbone.pth", task.net.net, meta, head=task.model.export_head())
        rt.write_json(metrics, run_dir / "metrics.json")
        engine.logger.log({"event": "end", **metrics})
        if cfg["runtime"]["figures"] and task.history:
            plot_curves(task.history, run_dir / "figures" / "curves.png", cfg["method"]["name"])
    rt.barrier()
    return metrics


def run(cfg: dict, inputs: dict | None, run_dir: str | os.PathLike, resume: bool = True,
        force: bool = False) -> dict:
    """Pretrain with `cfg` (nested dict, see DEFAULTS) into `run_dir`; returns the final metrics
    (the stage interface; `inputs` may name the `teacher` checkpoint, see `with_inputs`). With
    resume=True an existing `run_dir/checkpoints/last.pth` is continued exactly (a finished run
    only rewrites its outputs) if it was made from the same config (runtime settings excepted; see
    `PretrainTask.resume_may_change`); without it an existing checkpoint is an error unless
    `force`. Under torchrun every process calls this."""
    cfg = with_inputs(cfg, inputs)
    task, engine = build(cfg, run_dir)
    t0 = time.time()
    try:
        stopped = engine.fit(resume=resume, header=task.header(engine), force=force,
                             fingerprint=fingerprint.make(task.cfg, {}))
    except rt.NonFiniteLossError as e:
        engine.logger.log({"event": "error", "step": getattr(e, "step", None) or engine.step + 1,
                           "message": str(e)})
        raise
    if stopped:
        return stopped
    metrics = finish(task, engine)
    log.info("pretraining finished in %.1f s", time.time() - t0)
    return metrics


def with_inputs(cfg: dict, inputs: dict | None) -> dict:
    """cfg with the stage's inputs: the optional `teacher` checkpoint becomes the `teacher` key
    (the same path given both ways is fine; two different ones are an error)."""
    inputs = {k: v for k, v in (inputs or {}).items() if v}
    unknown = sorted(set(inputs) - {"teacher"})
    if unknown:
        raise ValueError(f"pretraining takes only the optional input 'teacher', got {unknown}")
    if "teacher" not in inputs:
        return cfg
    given = cfg.get("teacher")
    if given and os.path.abspath(given) != os.path.abspath(inputs["teacher"]):
        raise ConfigError(f"teacher: the config names {given!r} and the stage input "
                          f"{inputs['teacher']!r}")
    return {**cfg, "teacher": str(inputs["teacher"])}


def train(cfg: dict, run_dir: str | os.PathLike, resume: bool = False) -> dict:
    """`run` without inputs (the name scripts and notebooks used)."""
    return run(cfg, None, run_dir, resume=resume)
