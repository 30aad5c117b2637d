"""The one training engine: pretraining, detection fine-tuning and WSOL fine-tuning all run through
`Engine.fit`.

The engine owns the loop, AMP and the gradient scaler, gradient accumulation, per-group
learning-rate schedules, finite checks, resume, JSON-lines logging, atomic checkpoints and DDP. A
task plugs in what differs (STYLE.md 1); `Task` declares everything the engine reads from it, each
with its default:

    class MyTask(Task):
        # nn.Module; model(*task.inputs(batch)) -> dict, its "loss*" tensors are summed
        model
        # optimizer steps in one epoch
        steps_per_epoch
        # the epoch's micro-batches from optimizer step start_step
        def batches(self, epoch, start_step): ...
        # [{"params": [...], "lr": float, "name": str}, ...]
        def param_groups(self): ...
        # evaluation; returns entries for the epoch record
        def end_of_epoch(self, engine, epoch, record): ...
        # counts for the epoch record (ClassificationTask: top-1)
        def step_metrics(self, batch, out): ...
        # the task's own resumable state (primitives, tensors)
        def state_dict(self) / load_state_dict(state)

A checkpoint (`run_dir/checkpoints/last.pth`, written atomically, loadable with
``weights_only=True``) holds the model, optimizer, scheduler and scaler states, the step, every
global RNG state and the task's state, so a killed run continues bit for bit.

The step never waits for the device: losses, gradient norms and a method's statistics stay on the
device as 0-d tensors and are read in one transfer every `log_every` steps (and before every
checkpoint and at each epoch end), where they are checked, logged and summed. A non-finite loss or
gradient norm is therefore found at that read, up to `log_every` steps after it happened, and stops
the run with `NonFiniteError` naming its step. Nothing non-finite is ever saved: a checkpoint is
written only right after a read that found every pending value finite and a check of every
parameter and buffer.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mixup_transfer.core import fingerprint as fp
from mixup_transfer.core import runtime as rt
from mixup_transfer.core.basics import bars_enabled, metric_line
from mixup_transfer.core.config import ConfigError
from mixup_transfer.core.prefetch import DevicePrefetcher, side_stream

CKPT = "checkpoints/last.pth"
log = logging.getLogger("train")


@dataclass
class LoopSettings:
    """How the engine runs a task (translated from each stage's config at its edge).

    total_steps: optimizer steps of the whole run (the task's steps_per_epoch x epochs, or an
    iteration budget).
    accumulate: micro-batches per optimizer step (the loss of each is divided by it).
    clip_grad_norm: clip the global gradient norm to this (0: off). grad_norm: log the squared
    gradient norm (measured on the device, read with the other metrics). log_every: steps between
    "step" log records, which is also how often the device's metrics are read and checked.
    checkpoint_every: also checkpoint every N steps (0: epoch ends). stop_after_steps: return after
    this many steps of this invocation (simulates a kill; tests).
    tensorboard: also write run_dir/tensorboard (every numeric field of the step and epoch
    records): True, False, or "auto" (when the tensorboard package is installed).
    """

    total_steps: int
    device: torch.device
    precision: str = "fp32"
    channels_last: bool = False
    accumulate: int = 1
    clip_grad_norm: float = 0.0
    grad_norm: bool = False
    log_every: int = 20
    checkpoint_every: int = 0
    stop_after_steps: int | None = None
    progress_desc: str = "epoch"
    tensorboard: bool | str = False


def tensorboard_dir(run_dir: str | os.PathLike, setting: bool | str) -> Path | None:
    """run_dir/tensorboard when `setting` is True, or "auto" and the tensorboard package is
    installed; else None."""
    if setting not in (True, False, "auto"):
        raise ConfigError(f"tensorboard must be true, false or auto, got {setting!r}")
    if setting == "auto":
        setting = importlib.util.find_spec("tensorboard") is not None
    return Path(run_dir) / "tensorboard" if setting else None


class Task:
    """What a training task provides: everything `Engine` reads from a task is declared here, with
    the default that suits a task with no extra state (see the module docstring)."""

    # model(*inputs(batch)) -> dict; its "loss*" entries are summed (`losses`)
    model: torch.nn.Module
    steps_per_epoch: int  # optimizer steps in one epoch
    sync_batchnorm: bool = False  # convert BatchNorm to SyncBatchNorm under DDP on CUDA
    # True when a step may leave some parameters without a gradient (a method whose modes use
    # different heads): DDP then looks for them every step (slower); with False such a step stops
    # DDP at the next one
    find_unused_parameters: bool = False
    # True when a checkpoint may be resumed by a different number of processes (the data order does
    # not depend on it); otherwise such a resume is an error
    resumable_across_world_sizes: bool = False
    # config keys (fnmatch patterns, mixup_transfer.core.fingerprint) that a resume may change: how
    # the run is executed and logged, not what it computes
    resume_may_change: tuple[str, ...] = ()

    def batches(self, epoch: int, start_step: int) -> Iterable:
        raise NotImplementedError

    def inputs(self, batch) -> tuple:
        """The positional arguments of `model` for one micro-batch (already on the device)."""
        return tuple(batch)

    def to_device(self, batch, device: torch.device, channels_last: bool):
        images, labels = batch[0], batch[1]
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(device, non_blocking=True)

    def batch_size(self, batch) -> int:
        return len(batch[0])

    def losses(self, out: dict) -> dict:
        """The entries of the model's output that are summed into the loss (default: names starting
        "loss")."""
        return {k: v for k, v in out.items() if k.startswith("loss")}

    def before_step(self, micro_step: int) -> None:
        """Called before each micro-batch's forward (e.g. to seed the method's generator)."""

    def step_metrics(self, batch, out: dict) -> dict:
        """Counts of one micro-batch for the epoch record (e.g. correct predictions and examples):
        0-d device tensors (read with the losses, never waited for) or host numbers, summed over
        the step's micro-batches and the epoch. They stay out of the step records; `epoch_metrics`
        turns the epoch's sums into entries of the epoch record. Default: none."""
        return {}

    def epoch_metrics(self, sums: dict) -> dict:
        """Entries of the epoch record from the epoch's sums (of `step_metrics`, the losses and the
        statistics).
        Default: none."""
        return {}

    def param_groups(self) -> list[dict]:
        raise NotImplementedError

    def train_mode(self) -> None:
        self.model.train()

    def end_of_epoch(self, engine: Engine, epoch: int, record: dict) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ClassificationTask(Task):
    """A task whose model returns the clean-image `logits` [b, c] on the steps that have them (ERM,
    fine-tuning without mixing), with the labels at batch[1]: the epoch record's `train_top1`, in
    percent of the examples of those steps."""

    def step_metrics(self, batch, out: dict) -> dict:
        if "logits" not in out:
            return {}
        labels = batch[1]
        return {"correct": (out["logits"].argmax(1) == labels).sum(), "count": float(len(labels))}

    def epoch_metrics(self, sums: dict) -> dict:
        return {"train_top1": 100 * sums["correct"] / sums["count"]} if sums.get("count") else {}


def build_optimizer(name: str, groups: list[dict], lr: float, momentum: float = 0.9,
                    weight_decay: float = 0.0, nesterov: bool = False) -> torch.optim.Optimizer:
    """SGD / Adam / AdamW over `groups` (each with its own "lr"); `lr` is the default of groups
    without one."""
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=nesterov and momentum > 0)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of ['sgd', 'adam', 'adamw'], got {name!r}")


class NonFiniteError(rt.NonFiniteLossError):
    """A loss, gradient or parameter became NaN/inf; the last good checkpoint is kept. `step`: the
    optimizer step whose value was non-finite (found at a later read), when known."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


class Engine:
    """Runs `task` for `settings.total_steps` optimizer steps into `run_dir` (rank 0 writes)."""

    def __init__(self, task: Task, run_dir: str | os.PathLike, settings: LoopSettings,
                 optimizer: torch.optim.Optimizer,
                 lr_lambda: Callable[[int], float] | Sequence[Callable], config_text: str = "",
                 logger: rt.JsonlLogger | None = None):
        self.task, self.settings = task, settings
        self.run_dir = Path(run_dir)
        self.device = settings.device
        self.precision = settings.precision if self.device.type == "cuda" else "fp32"
        self.world = rt.world_size()
        self.rank = dist.get_rank() if self.world > 1 else 0
        self.optimizer = optimizer
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        self.scaler = rt.make_grad_scaler(self.device, self.precision)
        self.ddp = self._wrap(task.model)
        self.step = 0
        self.config_text = config_text
        self.logger = logger or rt.JsonlLogger(self.run_dir / "log.jsonl",
                                               tensorboard=tensorboard_dir(self.run_dir,
                                                                           settings.tensorboard))
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        # (host facts, device metrics) of steps not read yet
        self._pending: list[tuple[dict, dict]] = []
        # the keys of the task's step_metrics: summed, not written per step
        self._counts: set[str] = set()
        self._epoch_sums: dict[str, float] = {}
        self._epoch_steps = 0
        self._bar = None
        # (time, step) where this invocation started: the eta's rate
        self._clock = (time.time(), 0)
        # on CUDA the next step's batches are moved on this side stream while a step runs
        self._copy_stream = side_stream(self.device)

    # -- set-up
    # -------------------------------------------------------------------------------------
    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.world == 1:
            return model
        if self.task.sync_batchnorm and self.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        from torch.nn.parallel import DistributedDataParallel as DDP

        # gradient_as_bucket_view: the gradients are views into DDP's buckets (no copy in and out,
        # less memory)
        return DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                   find_unused_parameters=bool(self.task.find_unused_parameters),
                   gradient_as_bucket_view=True)

    @property
    def epoch(self) -> int:
        return self.step // self.task.steps_per_epoch

    def lrs(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    # -- checkpoints
    # --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"model": self.task.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "step": self.step, "epoch": self.epoch, "rng": rt.rng_state(),
                "task": self.task.state_dict(), "world_size": self.world,
                "config": self.config_text}

    def save_checkpoint(self) -> None:
        """Read (and check) every pending metric, check the parameters, then write: never a
        non-finite state."""
        self.read_metrics()
        self.check_parameters()
        if rt.is_main_process():
            rt.atomic_save(self.state_dict(), self.run_dir / CKPT)
        rt.barrier()

    def load_checkpoint(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing = sorted({"model", "optimizer", "scheduler", "scaler", "step", "rng", "task"}
                         - set(state))
        if missing:
            raise ValueError(f"{path}: not a checkpoint of this engine (missing {missing})")
        if state.get("world_size", 1) != self.world and not self.task.resumable_across_world_sizes:
            raise RuntimeError(f"{path}: saved with {state['world_size']} process(es), resuming "
                               f"with {self.world}; the data order would change")
        self.task.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.task.load_state_dict(state["task"])
        rt.set_rng_state(state["rng"])

    def check_parameters(self) -> None:
        """Stop before anything non-finite is saved: every parameter and buffer must be finite (one
        read)."""
        named = [(n, t) for n, t in list(self.task.model.named_parameters())
                 + list(self.task.model.named_buffers())
                 if t.is_floating_point()]
        if not named:
            return
        finite = torch.stack([torch.isfinite(t.detach()).all() for _, t in named]).tolist()
        bad = [n for (n, _), ok in zip(named, finite) if not ok]
        if bad:
            raise NonFiniteError("non-finite values in "
                                 f"{bad[:5]}{' ...' if len(bad) > 5 else ''} after step "
                                 f"{self.step}; stopping. The last good checkpoint is kept.")

    # -- one optimizer step
    # -------------------------------------------------------------------------
    def _forward(self, batch, micro_step: int) -> tuple[dict, dict, torch.Tensor]:
        self.task.before_step(micro_step)
        with rt.autocast(self.device, self.precision):
            out = self.ddp(*self.task.inputs(batch))
        losses = self.task.losses(out)
        return out, losses, sum(losses.values())

    def _add(self, record: dict, key: str, value, acc: int) -> None:
        """record[key] += value / acc, on the device for tensors (never read here), on the host for
        numbers."""
        if isinstance(value, torch.Tensor):
            value = value.detach().to(self.device, torch.float32)
        else:
            value = float(value)
        record[key] = record.get(key, 0.0) + (value / acc if acc > 1 else value)

    def train_step(self, micro_batches: list) -> dict:
        """One optimizer step over `micro_batches` without reading anything from the device;
        returns the step's
        record: 0-d device tensors (read later by `read_metrics`) and host numbers."""
        s, acc = self.settings, len(micro_batches)
        record: dict = {}
        self.optimizer.zero_grad(set_to_none=True)
        for k, batch in enumerate(micro_batches):
            sync = k == acc - 1 or self.world == 1
            ctx = contextlib.nullcontext() if sync else self.ddp.no_sync()
            with ctx:
                out, losses, loss = self._forward(batch, self.step * s.accumulate + k)
                self.scaler.scale(loss / acc if acc > 1 else loss).backward()
            self._add(record, "loss", loss, acc)  # the total; averaged over ranks when read
            for key, v in losses.items():
                if key != "loss":
                    self._add(record, key, v, acc)
            for key, v in out.items():  # a method's diagnostics, e.g. Sinkhorn marginal errors
                if key.startswith("stat_"):
                    self._add(record, key, v, acc)
            # summed over micro-batches, not averaged
            for key, v in self.task.step_metrics(batch, out).items():
                self._counts.add(key)
                self._add(record, key, v, 1)
        self._unscale_clip_and_measure(record)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        return record

    def _unscale_clip_and_measure(self, record: dict) -> None:
        """Gradient norms stay on the device; `read_metrics` checks them (fp16 excepted: the scaler
        skips steps with non-finite gradients)."""
        s = self.settings
        if not (s.grad_norm or s.clip_grad_norm):
            return
        self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self._params if p.grad is not None]
        if s.grad_norm:
            norms = torch._foreach_norm(grads) if grads else []
            record["grad_norm2"] = (
                torch.stack([n.float() for n in norms]).square().sum() if grads else 0.0
            )
        if s.clip_grad_norm:  # the total norm before clipping: checked, not logged
            record["_clip_norm"] = torch.nn.utils.clip_grad_norm_(self._params,
                                                                  s.clip_grad_norm).float()

    # -- reading the device's metrics
    # ---------------------------------------------------------------
    def read_metrics(self) -> list[dict]:
        """Read every pending step's metrics in one device-to-host transfer (the loss averaged over
        ranks), check them, log the due "step" records and add them to the epoch's sums. Returns
        the steps' records. Raises NonFiniteError at the first step whose loss (or, outside fp16,
        gradient norm) is not finite."""
        if not self._pending:
            return []
        pending, self._pending = self._pending, []
        losses = torch.stack([m["loss"] for _, m in pending])
        if self.world > 1:  # every rank reads the same mean and stops together
            losses = losses.clone()
            dist.all_reduce(losses)
            losses /= self.world
        keys = [[k for k, v in m.items() if k != "loss" and isinstance(v, torch.Tensor)]
                for _, m in pending]
        flat = torch.cat([losses] + [torch.stack([m[k] for k in ks]) for (_, m),
                                     ks in zip(pending, keys) if ks])
        values = iter(flat.tolist())  # the one read
        records = [{"loss": next(values)} for _ in pending]
        for (_, m), ks, rec in zip(pending, keys, records):
            rec.update({k: v for k, v in m.items() if not isinstance(v, torch.Tensor)})
            rec.update({k: next(values) for k in ks})
        for (host, _), rec in zip(pending, records):
            self._check_record(host["step"], rec)
            self._account(host, rec)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{records[-1]['loss']:.3f}")
        return records

    def _check_record(self, step: int, rec: dict) -> None:
        if not math.isfinite(rec["loss"]):
            raise NonFiniteError(f"non-finite loss ({rec['loss']}) at step {step}; stopping. "
                                 "The last good checkpoint is kept.", step)
        for key in ("grad_norm2", "_clip_norm"):
            if key in rec and not math.isfinite(rec[key]) and self.precision != "fp16":
                raise NonFiniteError(f"non-finite gradient norm at step {step}; stopping. "
                                     "The last good checkpoint is kept.", step)

    def _account(self, host: dict, rec: dict) -> None:
        for k, v in rec.items():
            if not k.startswith("_"):
                self._epoch_sums[k] = self._epoch_sums.get(k, 0.0) + v
        self._epoch_steps += 1
        step = host["step"]
        if step % self.settings.log_every == 0 or step == 1:
            self.logger.log({"event": "step", "step": step, "epoch": host["epoch"],
                             "lr": host["lr"],
                             **{k: v for k, v in rec.items() if k not in self._counts
                                and k[0] != "_"}})
            if not bars_enabled():
                self._console_step(host, rec)

    # -- the console (logging, rank 0): a header, periodic lines where no bar is drawn, one line
    # per epoch -------
    def _console_header(self, header: dict | None) -> None:
        h, s = header or {}, self.settings
        batch = h.get("per_process_batch")
        batch_text = "" if batch is None else (f", per-process batch {batch} ({s.accumulate} "
                                               "micro-batch(es)), global batch "
                                               f"{h.get('global_batch', batch * self.world)}")
        log.info("run folder %s: world size %d%s, precision %s, device %s, %d steps (%d per "
                 "epoch)", self.run_dir,
                 self.world, batch_text, self.precision, self.device, s.total_steps,
                 self.task.steps_per_epoch)

    def _console_step(self, host: dict, rec: dict) -> None:
        s, (t0, step0) = self.settings, self._clock
        eta = (time.time() - t0) / max(host["step"] - step0, 1) * (s.total_steps - host["step"])
        terms = "  ".join(f"{k} {v:.4g}" for k, v in rec.items() if k.startswith("loss"))
        log.info("epoch %d/%d  step %d/%d  %s  lr %.4g  %.1f images/s  eta %s", host["epoch"],
                 -(-s.total_steps // self.task.steps_per_epoch), host["step"], s.total_steps,
                 terms, host["lr"], host["images_per_s"], _hms(eta))

    def _console_epoch(self, rec: dict) -> None:
        values = metric_line({k: v for k, v in rec.items()
                              if k not in ("event", "epoch", "step", "images")})
        log.info("epoch %d/%d done (step %d): %s", rec["epoch"],
                 -(-self.settings.total_steps // self.task.steps_per_epoch), rec["step"], values)

    # -- the loop
    # -----------------------------------------------------------------------------------
    def _grouped(self, batches: Iterable) -> Iterable[list]:
        """The epoch's micro-batches in groups of `accumulate` (an incomplete last group is
        dropped), moved to the device; on CUDA one optimizer step ahead, on a side stream
        (`DevicePrefetcher`)."""
        acc = self.settings.accumulate

        def host_groups():
            group = []
            for batch in batches:
                group.append(batch)
                if len(group) == acc:
                    yield group
                    group = []

        # the mover holds the task, not the engine: no reference cycle keeps the engine (and the
        # task's loaders and their worker processes) alive after a run
        task, device, channels_last = self.task, self.device, self.settings.channels_last

        def move(batch):
            return task.to_device(batch, device, channels_last)

        return DevicePrefetcher(move, self._copy_stream)(host_groups())

    def fit(self, resume: bool = False, header: dict | None = None,
            fingerprint: dict | None = None, force: bool = False) -> dict:
        """Train to `total_steps`; returns ``{"stopped_at_step": n}`` when `stop_after_steps`
        interrupted the run, else ``{}``.

        resume: continue `run_dir/checkpoints/last.pth` when there is one, after checking that the
        run was made from the same `fingerprint` (mixup_transfer.core.fingerprint: config and input
        hashes; the task's `resume_may_change` keys excepted). Without `resume`, a run directory
        that already holds a checkpoint is an error unless `force` (then it starts over)."""
        ckpt = self.run_dir / CKPT
        may_change = self.task.resume_may_change
        if ckpt.is_file() and not (resume or force):
            raise ConfigError(f"{self.run_dir}: already holds a checkpoint ({ckpt}); continue it "
                              "(resume=True; the tools continue by default), or start over "
                              "(force=True; the tools' --force)")
        if resume and ckpt.is_file():
            if fingerprint is not None:
                fp.check(self.run_dir, fingerprint, may_change)
            self.load_checkpoint(ckpt)
            self.logger.log({"event": "resume", "step": self.step, "epoch": self.epoch,
                             "time": time.time()})
        elif rt.is_main_process():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "log.jsonl").unlink(missing_ok=True)
            ckpt.unlink(missing_ok=True)
            if self.config_text:
                rt.atomic_write_text(self.config_text, self.run_dir / "config.yaml")
            if header is not None:
                self.logger.log({"event": "header", **header})
        if fingerprint is not None and rt.is_main_process():
            fp.write(self.run_dir, fingerprint)
        rt.barrier()
        if rt.is_main_process():
            self._console_header(header)
        self._clock = (time.time(), self.step)
        s, done_here = self.settings, 0
        while self.step < s.total_steps:
            stopped, done_here = self._run_epoch(done_here)
            if stopped:
                return {"stopped_at_step": self.step}
        return {}

    def _run_epoch(self, done_here: int) -> tuple[bool, int]:
        s, spe = self.settings, self.task.steps_per_epoch
        epoch, start = divmod(self.step, spe)
        end = min((epoch + 1) * spe, s.total_steps)
        t0, images = time.time(), 0
        self._epoch_sums, self._epoch_steps = {}, 0
        self.task.train_mode()
        self._bar = bar = rt.progress(total=end - epoch * spe, initial=start,
                                      desc=f"{s.progress_desc} {epoch + 1}")
        for micro in self._grouped(self.task.batches(epoch, start)):
            if self.step >= end:
                break
            record = self.train_step(micro)
            images += sum(self.task.batch_size(b) for b in micro) * self.world
            self._pending.append(({"step": self.step, "epoch": epoch + 1, "lr": self.lrs()[0],
                                   "images_per_s": images / max(time.time() - t0, 1e-9)}, record))
            done_here += 1
            bar.update(1)
            if self.step % s.log_every == 0:
                self.read_metrics()
            end_of_epoch = self.step == end
            if s.checkpoint_every and self.step % s.checkpoint_every == 0 and not end_of_epoch:
                self.save_checkpoint()
            if (
                s.stop_after_steps is not None
                and done_here >= s.stop_after_steps
                and not end_of_epoch
            ):
                self.read_metrics()
                bar.close()
                return True, done_here
        bar.close()
        self._end_epoch(epoch, time.time() - t0, images)
        stop = (
            s.stop_after_steps is not None
            and done_here >= s.stop_after_steps
            and self.step < s.total_steps
        )
        return stop, done_here

    def _end_epoch(self, epoch: int, seconds: float, images: int) -> None:
        """Read the last steps, write the epoch record (the task's evaluation included) and the
        checkpoint."""
        self.read_metrics()
        self._bar = None
        sums, n_steps = self._epoch_sums, self._epoch_steps
        rec: dict[str, Any] = {"event": "epoch", "epoch": epoch + 1, "step": self.step,
                               "lr": self.lrs()[0], "epoch_time_s": seconds, "images": images}
        if n_steps:
            rec["train_loss"] = sums["loss"] / n_steps
            rec["images_per_s"] = images / max(seconds, 1e-9)
            if "grad_norm2" in sums:
                rec["grad_norm2"] = sums["grad_norm2"] / n_steps
            rec.update(self.task.epoch_metrics(sums))
        self.check_parameters()
        rec.update(self.task.end_of_epoch(self, epoch + 1, rec))
        self.logger.log(rec)
        if rt.is_main_process():
            self._console_epoch(rec)
        self.save_checkpoint()


def _hms(seconds: float) -> str:
    """0:04:12 for 252 seconds."""
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"
