"""The one training loop: any mixing method of `pretrain.methods`, CPU or CUDA, one process or DDP.

`train(cfg, run_dir, resume=False) -> metrics` is the entry point (`tools/pretrain.py` and the pipeline
call it). `cfg` is a nested dict validated against `DEFAULTS` (every key documented there).

Exact resumption: the data order of an epoch is a function of (seed, epoch), each sample's
augmentation is drawn from a generator seeded by (seed, epoch, index), and the method's draws from a
generator seeded by (seed, rank, step). A checkpoint therefore needs only (model, optimizer,
scheduler, scaler, epoch, step) to continue bit-for-bit (it also stores the global RNG states).
"""

from __future__ import annotations

import math
import os
import time
from bisect import bisect_right
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from pretrain import runtime as rt
from pretrain.checkpoint import save_backbone
from pretrain.config import ConfigError, dump_config, validate
from pretrain.methods import ResNetStages, build_method
from pretrain.mixing import have_gco


def _puzzlemix_solver(method_cfg: dict) -> str:
    """The PuzzleMix graph-cut solver a run uses (logged in the header)."""
    asked = method_cfg.get("solver", (method_cfg.get("puzzle") or {}).get("solver", "auto"))
    if asked == "swap" or (asked == "auto" and not have_gco()):
        return "swap (built-in alpha-beta swap" + ("" if have_gco() else "; gco-wrapper not installed") + ")"
    return "gco"

DEFAULTS = {
    "name": "pretrain",              # run name (runs/<name>/ when the CLI picks the folder)
    "seed": 0,                       # one seed for data order, augmentation, initialisation and mixing
    "data": {
        "root": None,                # ImageNet-layout folder: root/train/<wnid>/*.JPEG, root/val/<wnid>/...
        "train_split": "train",
        "val_split": "val",
        "crop_size": 224,            # RandomResizedCrop output (train) and centre crop (val)
        "crop_schedule": None,       # [[epoch, size], ...]: train crop size from that epoch on
        "val_resize": None,          # shorter side before the val centre crop; None = crop_size / 0.875
        "scale_min": 0.08,           # RandomResizedCrop scale range lower bound
        "hflip": True,
        "color_jitter": 0.0,         # brightness/contrast/saturation strength (0 = off)
        "lighting": 0.0,             # AlexNet PCA lighting std (0.1 in the CutMix/AlignMix code; 0 = off)
        "num_workers": 4,            # DataLoader workers per process
        "max_train": None,           # use an evenly spaced subset of this many train images (quick runs)
        "max_val": None,
    },
    "model": {
        "arch": "resnet50",          # resnet18 | resnet34 | resnet50 | resnet101 (torchvision)
        "num_classes": None,         # None = number of train class folders
        "zero_init_residual": False,
    },
    "method": {},                    # name: <METHODS key> plus that method's knobs (see pretrain.methods)
    "optim": {
        "batch_size": 256,           # per process (MultiMix's b, n and m are per process as in the paper)
        "epochs": 300,
        "lr": 0.1,                   # peak learning rate (multiplied by the schedule's factor)
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 1.0e-4,
        "schedule": "step",          # step | cosine | piecewise
        "milestones": [75, 150, 225],  # step: epochs where lr *= gamma
        "gamma": 0.1,
        "points": None,              # piecewise: [[epoch, factor], ...], linear; repeat an epoch to jump
        "min_factor": 0.0,           # cosine: final lr / peak lr
        "warmup_epochs": 0.0,        # linear warm-up (fractional epochs allowed), multiplies the schedule
        "warmup_start": 0.01,        # warm-up starts at this fraction of the schedule's lr
    },
    "runtime": {
        "device": "auto",            # auto | cpu | cuda | cuda:N
        "precision": "bf16",         # bf16 | fp16 (GradScaler) | fp32; CPU always runs fp32
        "channels_last": True,       # CUDA only
        "compile": False,            # torch.compile the network stages (CUDA)
        "backend": None,             # DDP backend; None = nccl on CUDA, gloo on CPU
        "num_threads": None,         # torch.set_num_threads for this process (None = torch's default)
        "checkpoint_every_steps": 0,  # also checkpoint every N steps (0 = only at epoch ends)
        "log_every_steps": 20,
        "tensorboard": False,        # needs the tensorboard package
        "flops": True,               # fvcore parameter / FLOP counts in the log header
        "figures": True,             # runs/<name>/figures/curves.png at the end
        "grad_norm": True,           # mean squared gradient norm per epoch (multi-mix's variance proxy)
        "stop_after_steps": None,    # stop this invocation after N steps (simulates a kill; tests)
    },
}

CKPT = "checkpoints/last.pth"


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


class Lighting:
    """AlexNet-style PCA lighting noise on a [3, h, w] tensor in [0, 1] (ImageNet eigen-decomposition)."""

    EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
    EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140],
                           [-0.5836, -0.6948, 0.4203]])

    def __init__(self, std: float):
        self.std = std

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        alpha = torch.randn(3) * self.std
        rgb = (self.EIGVEC * alpha.view(1, 3) * self.EIGVAL.view(1, 3)).sum(1)
        return (img + rgb.view(3, 1, 1)).clamp(0, 1)


def train_transform(size: int, scale_min: float, hflip: bool, color_jitter: float, lighting: float):
    from torchvision import transforms as T

    ts = [T.RandomResizedCrop(size, scale=(scale_min, 1.0))]
    if hflip:
        ts.append(T.RandomHorizontalFlip())
    if color_jitter > 0:
        ts.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
    ts.append(T.ToTensor())
    if lighting > 0:
        ts.append(Lighting(lighting))
    return T.Compose(ts)


def val_transform(size: int, resize: int | None):
    from torchvision import transforms as T

    return T.Compose([T.Resize(resize or int(round(size / 0.875))), T.CenterCrop(size), T.ToTensor()])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % (2**63 - 1)


class SeededTransform(Dataset):
    """Applies `transform` to `base[i]` with torch's RNG seeded from the key (index, seed), so each
    sample's augmentation depends only on (run seed, epoch, index): same in every worker layout and
    after a resume. The caller's RNG state is left untouched."""

    def __init__(self, base: Dataset, transform=None):
        self.base, self.transform = base, transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        img, label = self.base[index]
        if self.transform is not None:
            if seed is None:
                img = self.transform(img)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    img = self.transform(img)
        return img, label


class EpochSampler(Sampler):
    """Shuffled, sharded, resumable: epoch e's order is randperm(seed + e); each process takes every
    world-th index of the first `steps * batch * world` (the remainder is dropped, as DistributedSampler
    with drop_last); `start_step` skips the batches already trained. Yields (index, sample seed)."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0, subset=None):
        self.n, self.bs, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.subset = subset
        self.steps = n // (batch_size * world)
        if self.steps == 0:
            raise ConfigError(f"batch_size {batch_size} x {world} process(es) is larger than the "
                              f"{n} training images")
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        order = torch.randperm(self.n, generator=g)[: self.steps * self.bs * self.world]
        mine = order[self.rank:: self.world][self.start_step * self.bs:].tolist()
        for i in mine:
            index = self.subset[i] if self.subset is not None else i
            yield index, sample_seed(self.seed, self.epoch, index)

    def __len__(self):
        return (self.steps - self.start_step) * self.bs


def _subset(n: int, k: int | None) -> list[int] | None:
    if k is None or k >= n:
        return None
    return [int(i * n / k) for i in range(k)]


# --------------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------------


def lr_factor(epoch: float, optim: dict) -> float:
    """Multiplier of optim.lr at fractional epoch `epoch` (warm-up times the schedule)."""
    kind = optim["schedule"]
    if kind == "step":
        f = optim["gamma"] ** sum(1 for m in optim["milestones"] if epoch >= m)
    elif kind == "cosine":
        t = min(epoch / max(optim["epochs"], 1e-12), 1.0)
        f = optim["min_factor"] + (1 - optim["min_factor"]) * 0.5 * (1 + math.cos(math.pi * t))
    elif kind == "piecewise":
        pts = optim["points"]
        if not pts:
            raise ConfigError("optim.points must list [epoch, factor] pairs for schedule: piecewise")
        xs = [float(p[0]) for p in pts]
        if epoch <= xs[0]:
            f = float(pts[0][1])
        elif epoch >= xs[-1]:
            f = float(pts[-1][1])
        else:
            i = bisect_right(xs, epoch)
            (x0, y0), (x1, y1) = pts[i - 1], pts[i]
            f = float(y0) if x1 == x0 else float(y0) + (float(y1) - float(y0)) * (epoch - x0) / (x1 - x0)
    else:
        raise ConfigError(f"optim.schedule must be step, cosine or piecewise, got {kind!r}")
    w = optim["warmup_epochs"]
    if w and epoch < w:
        s = optim["warmup_start"]
        f *= s + (1 - s) * epoch / w
    return f


def crop_size_at(epoch: int, data: dict) -> int:
    size = data["crop_size"]
    for e, s in sorted(data["crop_schedule"] or []):
        if epoch >= e:
            size = s
    return int(size)


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------


def resolve_config(cfg: dict) -> dict:
    cfg = validate(cfg, DEFAULTS)
    if not cfg["data"]["root"]:
        raise ConfigError("data.root is required (an ImageNet-layout folder)")
    if not isinstance(cfg["method"], dict) or "name" not in cfg["method"]:
        raise ConfigError("method.name is required (e.g. method: {name: multimix})")
    return cfg


class Trainer:
    def __init__(self, cfg: dict, run_dir: str | os.PathLike):
        from pretrain.data import ImageNetFolder

        self.cfg = cfg = resolve_config(cfg)
        self.run_dir = Path(run_dir)
        rcfg, ocfg, dcfg = cfg["runtime"], cfg["optim"], cfg["data"]
        if rcfg["num_threads"]:
            torch.set_num_threads(int(rcfg["num_threads"]))
        self.rank, self.world, _ = rt.init_distributed(rcfg["backend"])
        self.device = rt.get_device(rcfg["device"])
        self.precision = rcfg["precision"] if self.device.type == "cuda" else "fp32"
        self.channels_last = rcfg["channels_last"] and self.device.type == "cuda"
        rt.seed_everything(cfg["seed"])

        self.train_set = ImageNetFolder(dcfg["root"], dcfg["train_split"], boxes=None)
        self.val_set = ImageNetFolder(dcfg["root"], dcfg["val_split"], boxes=None,
                                      classes=self.train_set.classes)
        self.num_classes = cfg["model"]["num_classes"] or len(self.train_set.classes)
        self.train_subset = _subset(len(self.train_set), dcfg["max_train"])
        n_train = len(self.train_subset) if self.train_subset else len(self.train_set)
        self.sampler = EpochSampler(n_train, ocfg["batch_size"], self.rank, self.world, cfg["seed"],
                                    self.train_subset)
        self.steps_per_epoch = self.sampler.steps
        self.total_steps = self.steps_per_epoch * ocfg["epochs"]

        model = ResNetStages(cfg["model"]["arch"], self.num_classes, cfg["model"]["zero_init_residual"])
        knobs = {k: v for k, v in cfg["method"].items() if k != "name"}
        self.method = build_method(cfg["method"]["name"], model, self.num_classes, **knobs).to(self.device)
        if self.channels_last:
            self.method.to(memory_format=torch.channels_last)
        if rcfg["compile"]:
            model.enable_compile()
        self.method.generator = torch.Generator(device=self.device)
        self.ddp = self.method
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DDP(self.method, device_ids=ids)

        params = [p for p in self.method.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=ocfg["lr"], momentum=ocfg["momentum"],
                                         nesterov=ocfg["nesterov"] and ocfg["momentum"] > 0,
                                         weight_decay=ocfg["weight_decay"])
        spe = self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s / spe, ocfg))
        self.scaler = rt.make_grad_scaler(self.device, self.precision)
        self.step = 0
        self.history: list[dict] = []
        self.logger = rt.JsonlLogger(self.run_dir / "log.jsonl")
        self.tb = None

    @property
    def model(self) -> ResNetStages:
        return self.method.model

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"method": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": self.step // self.steps_per_epoch, "step": self.step, "rng": rt.rng_state(),
                "history": self.history, "world_size": self.world, "config": dump_config(self.cfg)}

    def save_checkpoint(self) -> None:
        if rt.is_main_process():
            rt.atomic_save(self.state_dict(), self.run_dir / CKPT)
        rt.barrier()

    def load_checkpoint(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["world_size"] != self.world:
            raise RuntimeError(f"{path}: saved with {state['world_size']} process(es), resuming with "
                               f"{self.world}; the data order would change")
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.history = state["step"], state["history"]
        rt.set_rng_state(state["rng"])

    # -- data ---------------------------------------------------------------------------------------
    def _loader(self, epoch: int, start_step: int) -> DataLoader:
        d = self.cfg["data"]
        tf = train_transform(crop_size_at(epoch, d), d["scale_min"], d["hflip"], d["color_jitter"],
                             d["lighting"])
        self.sampler.set_epoch(epoch, start_step)
        return DataLoader(SeededTransform(self.train_set, tf), batch_size=self.cfg["optim"]["batch_size"],
                          sampler=self.sampler, num_workers=d["num_workers"], drop_last=True,
                          pin_memory=self.device.type == "cuda", persistent_workers=False,
                          generator=torch.Generator().manual_seed(self.cfg["seed"]))

    def _val_loader(self) -> DataLoader:
        d = self.cfg["data"]
        idx = _subset(len(self.val_set), d["max_val"]) or list(range(len(self.val_set)))
        mine = idx[self.rank:: self.world]
        tf = val_transform(d["crop_size"], d["val_resize"])
        ds = torch.utils.data.Subset(SeededTransform(self.val_set, tf), mine)
        return DataLoader(ds, batch_size=self.cfg["optim"]["batch_size"], shuffle=False,
                          num_workers=d["num_workers"], pin_memory=self.device.type == "cuda")

    def _to_device(self, images, labels):
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(self.device, non_blocking=True)

    # -- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        model = self.model
        model.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # n, top1, top5, loss
        for images, labels in self._val_loader():
            images, labels = self._to_device(images, labels)
            with rt.autocast(self.device, self.precision):
                logits = self.method.predict(images).float()  # model(images) unless the method has its own head
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top == labels.view(-1, 1)
            sums += torch.stack([torch.tensor(float(len(labels)), device=self.device),
                                 hit[:, :1].any(1).sum().double(), hit.any(1).sum().double(),
                                 torch.nn.functional.cross_entropy(logits, labels, reduction="sum").double()])
        if self.world > 1:
            dist.all_reduce(sums)
        model.train()
        n = max(sums[0].item(), 1.0)
        return {"val_top1": 100 * sums[1].item() / n, "val_top5": 100 * sums[2].item() / n,
                "val_loss": sums[3].item() / n}

    # -- one step -----------------------------------------------------------------------------------
    def train_step(self, images, labels) -> tuple[dict, float]:
        rcfg = self.cfg["runtime"]
        # the method's draws depend only on (seed, rank, step): exact resumption without generator state
        self.method.generator.manual_seed(sample_seed(self.cfg["seed"] + 1, self.rank, self.step))
        with rt.autocast(self.device, self.precision):
            out = self.ddp(images, labels)
        losses = {k: v for k, v in out.items() if k.startswith("loss")}
        loss = sum(losses.values())
        value = loss.detach().float().reshape(1)
        if self.world > 1:  # every rank must stop together
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world
        rt.check_finite(value, self.step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        gn2 = float("nan")
        if rcfg["grad_norm"]:
            self.scaler.unscale_(self.optimizer)
            grads = [p.grad for p in self.method.parameters() if p.grad is not None]
            gn2 = float(sum(n.float() ** 2 for n in torch._foreach_norm(grads))) if grads else 0.0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        record = {k: float(v.detach()) for k, v in losses.items()}
        record["loss"] = float(value)
        record.update({k: float(v) for k, v in out.items() if k.startswith("stat_")})  # e.g. Sinkhorn marginals
        if "logits" in out:
            record["correct"] = float((out["logits"].argmax(1) == labels).sum())
            record["count"] = float(len(labels))
        return record, gn2

    # -- the loop -----------------------------------------------------------------------------------
    def _header(self) -> dict:
        n_params = sum(p.numel() for p in self.model.net.parameters())
        head = {"event": "header", "method": self.cfg["method"]["name"], "arch": self.cfg["model"]["arch"],
                "num_classes": self.num_classes, "params": n_params, "world_size": self.world,
                "device": str(self.device), "precision": self.precision,
                "train_images": self.sampler.steps * self.sampler.bs * self.world,
                "steps_per_epoch": self.steps_per_epoch, "torch_threads": torch.get_num_threads(),
                "puzzlemix_solver": _puzzlemix_solver(self.cfg["method"]),
                "config": self.cfg}
        if self.cfg["runtime"]["flops"]:
            head["flops_per_image"] = fvcore_flops(self.model, self.cfg["data"]["crop_size"])
        return head

    def fit(self, resume: bool = False) -> dict:
        ckpt = self.run_dir / CKPT
        if resume and ckpt.is_file():
            self.load_checkpoint(ckpt)
            self.logger.log({"event": "resume", "step": self.step, "time": time.time()})
        elif rt.is_main_process():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "log.jsonl").unlink(missing_ok=True)
            (self.run_dir / CKPT).unlink(missing_ok=True)  # never resume a previous run by mistake
            rt.atomic_write_text(dump_config(self.cfg), self.run_dir / "config.yaml")
            self.logger.log(self._header())
        rt.barrier()
        if self.cfg["runtime"]["tensorboard"] and rt.is_main_process():
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("runtime.tensorboard: true needs the tensorboard package "
                                  "(pip install tensorboard)") from e
            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))

        rcfg, ocfg = self.cfg["runtime"], self.cfg["optim"]
        stop_after = rcfg["stop_after_steps"]
        done_here = 0
        self.method.train()
        while self.step < self.total_steps:
            epoch, start = divmod(self.step, self.steps_per_epoch)
            t0, sums, n_steps = time.time(), {}, 0
            bar = rt.progress(total=self.steps_per_epoch, initial=start,
                              desc=f"epoch {epoch + 1}/{ocfg['epochs']}")
            for images, labels in self._loader(epoch, start):
                images, labels = self._to_device(images, labels)
                try:
                    record, gn2 = self.train_step(images, labels)
                except rt.NonFiniteLossError as e:
                    self.logger.log({"event": "error", "step": self.step + 1, "message": str(e)})
                    raise
                record["grad_norm2"] = gn2
                for k, v in record.items():
                    sums[k] = sums.get(k, 0.0) + v
                n_steps += 1
                done_here += 1
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}")
                if self.step % rcfg["log_every_steps"] == 0:
                    self.logger.log({"event": "step", "step": self.step, "epoch": epoch,
                                     "lr": self.optimizer.param_groups[0]["lr"],
                                     **{k: v for k, v in record.items() if k not in ("correct", "count")}})
                    if self.tb is not None:
                        self.tb.add_scalar("train/loss", record["loss"], self.step)
                every = rcfg["checkpoint_every_steps"]
                end_of_epoch = self.step % self.steps_per_epoch == 0
                if every and self.step % every == 0 and not end_of_epoch:
                    self.save_checkpoint()
                if stop_after is not None and done_here >= stop_after and not end_of_epoch:
                    bar.close()
                    return {"stopped_at_step": self.step}
            bar.close()
            rec = {"event": "epoch", "epoch": epoch + 1, "step": self.step,
                   "lr": self.optimizer.param_groups[0]["lr"], "epoch_time_s": time.time() - t0}
            if n_steps:
                rec["train_loss"] = sums["loss"] / n_steps
                rec["images_per_s"] = n_steps * ocfg["batch_size"] * self.world / rec["epoch_time_s"]
                if rcfg["grad_norm"]:
                    rec["grad_norm2"] = sums["grad_norm2"] / n_steps
                if sums.get("count"):
                    rec["train_top1"] = 100 * sums["correct"] / sums["count"]
            rec.update(self.evaluate())
            self.history.append(rec)
            self.logger.log(rec)
            if self.tb is not None:
                for k in ("train_loss", "val_loss", "val_top1", "val_top5"):
                    if k in rec:
                        self.tb.add_scalar(k.replace("_", "/", 1), rec[k], epoch + 1)
            self.save_checkpoint()
            if stop_after is not None and done_here >= stop_after and self.step < self.total_steps:
                return {"stopped_at_step": self.step}
        return self.finish()

    def finish(self) -> dict:
        last = self.history[-1] if self.history else self.evaluate()
        metrics = {"method": self.cfg["method"]["name"], "arch": self.cfg["model"]["arch"],
                   "epochs": self.cfg["optim"]["epochs"], "steps": self.step,
                   "val_top1": last.get("val_top1"), "val_top5": last.get("val_top5"),
                   "top1": last.get("val_top1"), "top5": last.get("val_top5"),  # short aliases (report)
                   "val_loss": last.get("val_loss"), "train_loss": last.get("train_loss"),
                   "best_val_top1": max((h.get("val_top1", 0.0) for h in self.history), default=None),
                   "train_time_s": sum(h.get("epoch_time_s", 0.0) for h in self.history)}
        if rt.is_main_process():
            meta = {"arch": self.cfg["model"]["arch"], "num_classes": self.num_classes,
                    "method": self.cfg["method"]["name"], "epochs": self.cfg["optim"]["epochs"],
                    "config": dump_config(self.cfg), "metrics": metrics}
            save_backbone(self.run_dir / "backbone.pth", self.model.net, meta)
            rt.write_json(metrics, self.run_dir / "metrics.json")
            self.logger.log({"event": "end", **metrics})
            if self.cfg["runtime"]["figures"] and self.history:
                plot_curves(self.history, self.run_dir / "figures" / "curves.png", self.cfg["method"]["name"])
            if self.tb is not None:
                self.tb.close()
        rt.barrier()
        return metrics


def fvcore_flops(model: ResNetStages, size: int) -> float | None:
    """fvcore's count (multiply-adds, its "FLOP" convention) for one image at `size`, or None."""
    import copy
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fvcore's import and tracing use deprecated torch.jit APIs
            from fvcore.nn import FlopCountAnalysis

            m = copy.deepcopy(model).cpu().float().eval()
            fca = FlopCountAnalysis(m, torch.zeros(1, 3, size, size))
            fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            return float(fca.total())
    except Exception:  # noqa: BLE001 - a header nicety must never stop training
        return None


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    for key in ("train_loss", "val_loss"):
        if all(key in h for h in history):
            a.plot(ep, [h[key] for h in history], marker="o", label=key)
    a.set_yscale("log")  # the first epoch's val loss can be huge (BN running stats not settled yet)
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.legend()
    for key in ("val_top1", "val_top5", "train_top1"):
        if all(key in h for h in history):
            b.plot(ep, [h[key] for h in history], marker="o", label=key)
    b.set_xlabel("epoch"), b.set_ylabel("accuracy (%)"), b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train(cfg: dict, run_dir: str | os.PathLike, resume: bool = False) -> dict:
    """Train with `cfg` (nested dict, see DEFAULTS) into `run_dir`; returns the final metrics.

    With resume=True an existing `run_dir/checkpoints/last.pth` is continued exactly (a finished run
    only rewrites its outputs). Under torchrun every process calls this; rank 0 writes the files.
    """
    return Trainer(cfg, run_dir).fit(resume=resume)
