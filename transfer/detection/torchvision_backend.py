"""The torchvision backend of the detection stage: fine-tune a torchvision detector from a backbone
checkpoint, evaluate it like the devkits, time it.

``finetune(cfg, weights, run_dir)`` takes a resolved config (``transfer.detection.config``; the
stage, ``transfer.detection.stage``, dispatches here for ``backend: torchvision``). For each seed
in ``cfg["seeds"]`` it trains in ``run_dir/seed_<s>/`` (``log.jsonl``, ``checkpoints/last.pth``
written atomically at each epoch end, ``metrics.json``), evaluates on VOC07 test (11-point AP,
comp4 result files in the XML's 1-based coordinates) or COCO val (pycocotools stats, results json
with the original category ids), then writes ``run_dir/metrics.json`` with the mean and std over
seeds, train and test images/s (Table 5's SPEED), and ``run_dir/figures/detections.png``. A seed
whose ``metrics.json`` exists is skipped; one with ``checkpoints/last.pth`` resumes from it.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from mixup_transfer.core import distributed as ddist
from mixup_transfer.core import fingerprint as fp
from mixup_transfer.core import runtime
from mixup_transfer.core.config import dump_config
from mixup_transfer.core.engine import Engine, LoopSettings, Task, build_optimizer
from mixup_transfer.core.inference import inference_on_dataset, to_host
from mixup_transfer.core.schedule import lr_factor
from transfer.detection.config import RESUME_MAY_CHANGE, scaled_lr
from transfer.detection.models import build_detector
from transfer.detection.scoring import (
    check_finite,
    detection_figure,
    primary_key,
    score_predictions,
    split_name,
    write_summary,
)
from transfer.detection.transforms import SeedWorker, augment_seed, build_transforms

log = logging.getLogger(__name__)


# -----------------------------------------------------------------------------------------------
# data

def collate(batch):
    return tuple(zip(*batch))


def _transform_kind(model_type: str) -> str:
    return "ssd" if model_type == "ssd" else "rcnn"


def build_datasets(cfg: dict, seed: int = 0):
    """(train dataset, test dataset, eval context) for ``cfg["data"]["format"]``."""
    from mixup_transfer.core.constants import VOC_CLASSES
    from transfer.datasets import COCODetection, VOCDetection

    d, m = cfg["data"], cfg["model"]
    kind = _transform_kind(m["type"])
    common = dict(size=m["size"], max_size=m["max_size"])
    train_tf = build_transforms(kind, True, train_sizes=m["train_sizes"],
                                zoom_out_ratio=d["zoom_out_ratio"], photometric=d["photometric"],
                                seed=seed, **common)
    test_tf = build_transforms(kind, False, **common)
    root = Path(d["root"])
    if d["format"] == "voc":
        parts = []
        classes = tuple(d["classes"] or VOC_CLASSES)
        for spec in d["voc_train"]:
            year, split = str(spec).split("/")
            parts.append(VOCDetection(root, year, split, transform=train_tf, classes=classes))
        train = parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)
        year, split = str(d["voc_test"]).split("/")
        test = VOCDetection(root, year, split, transform=test_tf, classes=classes)
        ctx = {"format": "voc", "classes": classes, "split": split, "dataset": test}
    elif d["format"] == "coco":
        train = COCODetection(root / d["coco_train"][0], root / d["coco_train"][1],
                              transform=train_tf, remove_empty=True)
        test = COCODetection(root / d["coco_val"][0], root / d["coco_val"][1], transform=test_tf)
        ctx = {"format": "coco", "classes": test.classes, "dataset": test}
    else:
        raise ValueError(f"data.format={d['format']!r} is not one of ['voc', 'coco']")
    if d["max_train"]:
        train = Subset(train, range(min(len(train), int(d["max_train"]))))
    if d["max_val"]:
        test = Subset(test, range(min(len(test), int(d["max_val"]))))
    ctx["num_classes"] = len(ctx["classes"]) + 1
    return train, test, ctx, train_tf


def build_model(cfg: dict, num_classes: int, weights: str | None):
    m = cfg["model"]
    kwargs = dict(arch=m["arch"], norm=m["norm"], trainable_layers=m["trainable_layers"],
                  **m["kwargs"])
    if m["type"] == "ssd":
        kwargs["size"] = m["size"]
    else:
        kwargs.update(min_size=m["size"], max_size=m["max_size"], resize_inside=False)
    return build_detector(m["type"], num_classes, weights, **kwargs)


# ---------------------------------------------------------------------------------------
# evaluation

def _to_original(boxes: torch.Tensor, target: dict) -> torch.Tensor:
    """Boxes predicted on the resized tensor -> original image pixels (clipped)."""
    sx, sy = target["scale"]
    h, w = target["size"]
    out = boxes.clone()
    out[:, [0, 2]] = (out[:, [0, 2]] / sx).clamp(0, w)
    out[:, [1, 3]] = (out[:, [1, 3]] / sy).clamp(0, h)
    return out


# the modules whose raw outputs the detectors' post-processing would silently drop when NaN (a NaN
# score fails every score threshold: a broken detector would report mAP 0); torchvision's
# FasterRCNN and SSD names
_RAW_OUTPUTS = ("backbone", "rpn.head", "roi_heads.box_predictor", "head")


class _NonFiniteCounter:
    """Counts, on the device, the NaN / inf values of the raw outputs of `_RAW_OUTPUTS` during
    predictions."""

    def __init__(self, model, device):
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self.handles = []
        for name in _RAW_OUTPUTS:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                continue
            self.handles.append(module.register_forward_hook(self._hook))

    def _hook(self, module, args, output) -> None:
        self.count += runtime.count_nonfinite(output).to(self.count.device)

    def close(self) -> int:
        for h in self.handles:
            h.remove()
        return int(self.count)


def _batch_records(counter: _NonFiniteCounter, max_keep_examples: int):
    """The per-batch callable of `predict_sharded`: one record per image, ((image_id, boxes [K, 4]
    in original pixels, scores [K], labels [K]), its example for figures or None), after one device
    -> host transfer; the NaN / inf values of the final boxes and scores are added to ``counter``
    on the device."""
    def to_records(batch, outputs, indices):
        images, targets = batch
        counter.count += runtime.count_nonfinite([[o["boxes"], o["scores"]]
                                                  for o in outputs]).to(counter.count.device)
        host = to_host([t for o in outputs
                        for t in (o["boxes"].float(), o["scores"].float(), o["labels"])])
        records = []
        for k, (i, im, tgt) in enumerate(zip(indices, images, targets)):
            boxes, scores, labels = host[3 * k:3 * k + 3]
            example = None
            if i < max_keep_examples:
                example = {"image": im.float(), "pred_boxes": boxes, "scores": scores,
                           "labels": labels, "gt_boxes": tgt["boxes"], "gt_labels": tgt["labels"]}
            records.append(((tgt["image_id"], _to_original(boxes, tgt), scores, labels), example))
        return records
    return to_records


def predict_sharded(model, dataset, batch_size: int, workers: int, device, precision="fp32",
                    channels_last=False, max_keep_examples=0, split: str = "test"):
    """The model over ``dataset`` (``mixup_transfer.core.inference``: each rank its shard of whole
    test batches, rank 0's buffers). Returns, on every rank in dataset order, the per-image
    predictions (image_id, boxes [K, 4] original pixels, scores [K], labels [K]), the examples of
    the first ``max_keep_examples`` images for figures, the seconds spent in the model (the slowest
    rank's) and the number of images, so scoring them gives the single-process numbers. A NaN or
    infinite box, score or raw head output stops it on every rank (`NonFiniteOutputError` naming
    ``split``): nothing is scored. ``channels_last``: the model's format (set by its owner); the
    per-image [3, h, w] inputs keep theirs (the detector batches them)."""
    counter = _NonFiniteCounter(model, device)
    res = inference_on_dataset(model, dataset, lambda m, images: m(list(images)),
                               _batch_records(counter, max_keep_examples), batch_size=batch_size,
                               device=device, workers=workers, collate_fn=collate,
                               precision=precision, timed=True, select=lambda batch: batch[0],
                               desc="eval")
    check_finite(split, ddist.sum_counts([counter.close()])[0])
    return ([r[0] for r in res.records], [r[1] for r in res.records if r[1] is not None],
            res.seconds, res.count)


# -----------------------------------------------------------------------------------------
# training

class DetectionTask(Task):
    """A torchvision detector fine-tuned on VOC or COCO; ``model(images, targets)`` returns its
    loss dict."""

    sync_batchnorm = True  # trainable BN (random init, SSD extras) synchronised across GPUs
    resume_may_change = RESUME_MAY_CHANGE

    def __init__(self, cfg: dict, weights: str | None, seed: int, device: torch.device):
        self.cfg, self.seed, self.device = cfg, seed, device
        self.world = runtime.world_size()
        self.rank = torch.distributed.get_rank() if self.world > 1 else 0
        self.train_set, self.test_set, self.ctx, self.train_tf = build_datasets(cfg, seed)
        self.model = build_model(cfg, self.ctx["num_classes"], weights).to(device)
        if cfg["runtime"]["channels_last"] and device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.steps_per_epoch = len(self._loader(0))
        if self.steps_per_epoch == 0:
            raise ValueError(f"training set has {len(self.train_set)} images, fewer than one "
                             "batch")
        s = cfg["optim"]
        self.total = int(s["max_iter"]) or int(s["epochs"]) * self.steps_per_epoch
        self.train_time, self.train_images, self.history = 0.0, 0, []

    def _loader(self, epoch: int) -> DataLoader:
        s, train = self.cfg["optim"], self.train_set
        if self.world > 1:
            sampler = torch.utils.data.DistributedSampler(train, num_replicas=self.world,
                                                          rank=self.rank, shuffle=True,
                                                          seed=self.seed)
            sampler.set_epoch(epoch)
        else:  # epoch-determined order: exact resume
            sampler = torch.utils.data.RandomSampler(
                train, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch)
            )
        return DataLoader(train, batch_size=s["batch_per_process"], sampler=sampler,
                          num_workers=self.cfg["data"]["num_workers"],
                          collate_fn=collate,
                          drop_last=len(train) >= s["batch_per_process"] * self.world,
                          # pinned: the copies to the GPU never wait
                          pin_memory=self.device.type == "cuda",
                          worker_init_fn=SeedWorker(self.train_tf, self.seed, epoch, self.rank))

    def batches(self, epoch: int, start_step: int):
        # the augmentation streams are fixed per (epoch, rank, worker): see transforms.augment_seed
        self.train_tf.augment.set_random_seed(augment_seed(self.seed, epoch, self.rank))
        if start_step:
            raise RuntimeError("detection checkpoints are written at epoch ends only")
        return self._loader(epoch)

    def to_device(self, batch, device, channels_last):
        """Images stay per-image [3, h, w] tensors (channels_last needs rank 4): the detector
        batches them, and only the model is converted to channels_last
        (`DetectionTask.__init__`)."""
        images, targets = batch
        images = [im.to(device, non_blocking=True) for im in images]
        return images, [{"boxes": t["boxes"].to(device, non_blocking=True),
                         "labels": t["labels"].to(device, non_blocking=True)} for t in targets]

    def losses(self, out: dict) -> dict:
        return out  # every entry of a torchvision detector's training output is a loss

    def lr(self) -> float:
        s = self.cfg["optim"]
        return scaled_lr(s["lr"], s["batch_per_process"], self.world, s["reference_batch"])

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.model.parameters() if p.requires_grad],
                 "lr": self.lr()}]

    def lr_lambda(self, it: int) -> float:
        s = self.cfg["optim"]
        return lr_factor(it, "step", milestones=[int(round(f * self.total)) for f in s["steps"]],
                         gamma=s["gamma"], warmup=s["warmup_iters"],
                         warmup_start=s["warmup_factor"])

    def end_of_epoch(self, engine, epoch: int, record: dict) -> dict:
        self.train_time += record["epoch_time_s"]
        self.train_images += record["images"]
        period = self.cfg["eval"]["every_epochs"]
        if engine.step >= self.total or not period or epoch % period:
            return {}
        preds, _, _, _ = self.predict_test(engine)  # every rank predicts its shard; rank 0 scores
        if not runtime.is_main_process():
            return {}
        m = score_predictions(preds, self.ctx, engine.run_dir / "eval", self.cfg["eval"]["metric"])
        key = primary_key(m)
        self.history.append({"epoch": epoch, key: m[key]})
        return {f"eval_{key}": m[key]}

    def predict_test(self, engine, max_keep_examples: int = 0):
        """``predict_sharded`` over the test set: (predictions, examples, seconds, images), on
        every rank (with rank 0's BatchNorm statistics: every shard is scored with the same
        model)."""
        return predict_sharded(self.model, self.test_set, self.cfg["eval"]["batch_size"],
                               self.cfg["data"]["num_workers"],
                               self.device, engine.precision, engine.settings.channels_last,
                               max_keep_examples, split=split_name(self.cfg))

    def state_dict(self) -> dict:
        return {"train_time": self.train_time, "train_images": self.train_images,
                "history": self.history, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.train_time, self.train_images = state["train_time"], state["train_images"]
        self.history = list(state["history"])


def train_one_seed(cfg: dict, weights: str | None, seed_dir: Path, seed: int) -> dict:
    """Train + evaluate one seed in ``seed_dir``; returns its metrics (also written to
    metrics.json)."""
    seed_dir = Path(seed_dir)
    done = seed_dir / "metrics.json"
    fingerprint = seed_fingerprint(cfg, weights, seed)
    if done.is_file():
        # never relabel old results with new inputs
        fp.check(seed_dir, fingerprint, RESUME_MAY_CHANGE, RESTART)
        log.info("%s exists: seed %d already finished", done, seed)
        return json.loads(done.read_text())
    rt, s = cfg["runtime"], cfg["optim"]
    device = runtime.get_device(rt["device"])
    if rt["num_threads"]:
        torch.set_num_threads(int(rt["num_threads"]))
    runtime.seed_everything(seed)
    task = DetectionTask(cfg, weights, seed, device)
    optimizer = build_optimizer("sgd", task.param_groups(), task.lr(), s["momentum"],
                                s["weight_decay"])
    settings = LoopSettings(total_steps=task.total, device=device, precision=rt["precision"],
                            channels_last=bool(rt["channels_last"]) and device.type == "cuda",
                            clip_grad_norm=s["clip_grad_norm"], log_every=rt["log_every_steps"],
                            progress_desc=f"seed {seed} epoch", tensorboard=rt["tensorboard"])
    engine = Engine(task, seed_dir, settings, optimizer, task.lr_lambda,
                    config_text=dump_config(cfg))
    engine.fit(resume=True, fingerprint=fingerprint,
               header={"seed": seed, "weights": weights, "steps_per_epoch": task.steps_per_epoch,
                       "per_process_batch": s["batch_per_process"],
                       "total_steps": task.total, "device": str(device)})
    # every rank predicts its shard of the test set
    metrics = _final_metrics(task, engine, seed_dir)
    if runtime.is_main_process():
        runtime.write_json(metrics, done)
    runtime.barrier()
    return metrics


RESTART = ("choose another --run-dir, or pass --force to start over (or delete one seed's folder "
           "to redo that seed)")


def seed_fingerprint(cfg: dict, weights: str | None, seed: int) -> dict:
    """What one seed is made from: the config (the list of seeds aside), the seed and the
    backbone's hash."""
    seed_cfg = {k: v for k, v in cfg.items() if k != "seeds"}
    return fp.make({**seed_cfg, "seed": seed}, {"weights": weights})


def check_resume(cfg: dict, weights: str | None, run_dir: Path) -> None:
    """Refuse (before anything is written) to continue a run folder whose seeds were made from
    another config or backbone: a refused resume leaves the folder as it was."""
    for seed in cfg["seeds"]:
        seed_dir = Path(run_dir) / f"seed_{seed}"
        if (seed_dir / fp.FILE).is_file():
            fp.check(seed_dir, seed_fingerprint(cfg, weights, int(seed)), RESUME_MAY_CHANGE,
                     RESTART)


def _final_metrics(task: DetectionTask, engine: Engine, seed_dir: Path) -> dict:
    """Predictions gathered from every rank; rank 0 scores them and writes the figure ({} on the
    others)."""
    cfg = task.cfg
    preds, examples, test_seconds, n_test = task.predict_test(
        engine, cfg["eval"]["figure_examples"]
    )
    if not runtime.is_main_process():
        return {}
    metrics = score_predictions(preds, task.ctx, seed_dir / "eval", cfg["eval"]["metric"])
    metrics.update(seed=task.seed, epochs=math.ceil(task.total / task.steps_per_epoch),
                   iterations=engine.step, history=task.history,
                   train_img_per_s=task.train_images / max(task.train_time, 1e-9),
                   test_img_per_s=n_test / max(test_seconds, 1e-9), train_seconds=task.train_time,
                   test_seconds=test_seconds, device=str(task.device))
    engine.logger.log({"final": True,
                       **{k: v for k, v in metrics.items() if not isinstance(v, dict)}})
    detection_figure(examples, task.ctx["classes"], seed_dir / "figures" / "detections.png",
                     cfg["eval"]["figure_score_thresh"])
    return metrics


def finetune(cfg: dict, weights: str | None, run_dir: Path) -> dict:
    """Every seed of a resolved config (``config.resolve_config``) with ``backend: torchvision``;
    returns (rank 0) and writes ``run_dir/metrics.json``. A resume refused by ``check_resume``
    writes nothing."""
    check_resume(cfg, weights, run_dir)
    if runtime.is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        runtime.atomic_write_text(dump_config(cfg), run_dir / "config.yaml")
    per_seed = []
    for seed in cfg["seeds"]:
        per_seed.append(train_one_seed(cfg, weights, run_dir / f"seed_{seed}", int(seed)))
    if not runtime.is_main_process():
        return {}
    return write_summary(run_dir, cfg, per_seed, weights=str(weights) if weights else None)
