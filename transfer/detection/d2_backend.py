"""The detectron2 backend of detection fine-tuning: ``finetune(cfg, weights, run_dir)``.

``transfer.detection.stage.finetune_detector`` dispatches here for ``backend: detectron2``. What it
does, in the order a detectron2 user would do it by hand:

0. refuses a run folder made from another config or backbone (``run_dir/fingerprint.json``,
   :func:`check_resume`) before anything is written;
1. converts the backbone checkpoint to ``run_dir/backbone_d2.pkl`` (``transfer/convert.py``; rank 0
   only, the others wait at a barrier);
2. registers the datasets under the toolkit's own names (``mt_voc_2007_trainval``,
   ``mt_coco_val2017``, ``..._first<N>`` for ``data.max_*_images`` prefixes; never detectron2's
   built-in ``coco_2017_train`` / ``voc_2007_test``, whose metadata detectron2 has fixed) with
   their real class lists, read from ``data.root`` with detectron2's own loaders
   (``load_voc_instances``, ``load_coco_json``), so ``$DETECTRON2_DATASETS`` plays no part;
3. writes one detectron2 YAML, ``run_dir/detectron2_<format>_<arch>_<C4|FPN>.yaml``: the
   architecture of the ``transfer/convert.py`` recipe that ``model.type`` selects (R-C4 with MoCo's
   extra norm, or FPN), with DATASETS, NUM_CLASSES, MODEL.DEVICE and every toolkit key mapped to
   its detectron2 key (:func:`detectron2_overrides`: the same config trains the same schedule in
   both backends); a setting with no detectron2 counterpart raises :class:`Detectron2BackendError`;
4. for each seed trains with detectron2's ``DefaultTrainer`` in ``run_dir/seed_<s>/detectron2/``
   (its checkpoints, ``last_checkpoint``, event ``metrics.json``; a rerun resumes there), then
   evaluates ONCE: one inference pass feeds detectron2's evaluator (``PascalVOCDetectionEvaluator``
   / ``COCOEvaluator``) and the toolkit's (the same comp4 files / COCO json and numbers as the
   torchvision backend; a NaN or infinite box or score stops every rank first,
   ``scoring.check_finite``), and writes ``run_dir/seed_<s>/metrics.json``;
5. writes ``run_dir/metrics.json``: mAP mean and std over seeds, train / test images per second,
   and detectron2's own AP / AP50 / AP75 under ``"detectron2"``.

Distributed: under ``torchrun`` the process group is already up, and this module makes the
per-machine group that detectron2's ``launch`` would make (``comm.create_local_process_group``);
without torchrun, :func:`launch_finetune` runs the whole thing through detectron2's ``launch``
(``--num-gpus``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from mixup_transfer.core import distributed as ddist
from mixup_transfer.core import fingerprint as fp
from mixup_transfer.core import runtime
from mixup_transfer.core.checkpoint import trust_pickled
from mixup_transfer.core.config import dump_config
from transfer import convert
from transfer.detection.config import DEFAULTS, RESUME_MAY_CHANGE, resolve_config, scaled_lr
from transfer.detection.scoring import (
    check_finite,
    count_nonfinite,
    detection_figure,
    score_predictions,
    split_name,
    write_summary,
)

log = logging.getLogger(__name__)

INSTALL = (
    "detectron2 is not importable. It is not on PyPI; build it from source (it compiles C++ "
    "extensions):\n"
    "  make d2\n"
    "  (= .venv/bin/pip install 'git+https://github.com/facebookresearch/detectron2.git' "
    "--no-build-isolation)\n"
    "or use the default backend: --backend torchvision")

# toolkit model.kwargs -> detectron2 key (the torchvision builder's keyword names,
# transfer/detection/models.py)
KWARGS = {
    "anchor_sizes": "MODEL.ANCHOR_GENERATOR.SIZES",
    "aspect_ratios": "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS",
    "rpn_pre_nms_top_n_train": "MODEL.RPN.PRE_NMS_TOPK_TRAIN",
    "rpn_pre_nms_top_n_test": "MODEL.RPN.PRE_NMS_TOPK_TEST",
    "rpn_post_nms_top_n_train": "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    "rpn_post_nms_top_n_test": "MODEL.RPN.POST_NMS_TOPK_TEST",
    "rpn_batch_size_per_image": "MODEL.RPN.BATCH_SIZE_PER_IMAGE",
    "box_batch_size_per_image": "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
    "box_detections_per_img": "TEST.DETECTIONS_PER_IMAGE",
    "box_score_thresh": "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
    "fpn_channels": "MODEL.FPN.OUT_CHANNELS",
    "box_head_dim": "MODEL.ROI_BOX_HEAD.FC_DIM",
}
FPN_ONLY = ("fpn_channels", "box_head_dim")
NORMS = {"frozen_bn": "FrozenBN", "bn": "BN", "syncbn": "SyncBN"}
SOLVER = {"lr": "SOLVER.BASE_LR", "momentum": "SOLVER.MOMENTUM",
          "weight_decay": "SOLVER.WEIGHT_DECAY", "warmup_iters": "SOLVER.WARMUP_ITERS",
          "warmup_factor": "SOLVER.WARMUP_FACTOR", "gamma": "SOLVER.GAMMA"}
# toolkit keys that shape the run rather than a detectron2 key (datasets, seeds, evaluation,
# threads)
STRUCTURAL = {
    "name", "backend", "model.type", "model.arch", "data.format", "data.root", "data.voc_train",
    "data.voc_test", "data.coco_train", "data.coco_val", "data.max_train", "data.max_val",
    "data.num_workers", "seeds", "eval.metric", "eval.batch_size", "eval.figure_examples",
    "eval.figure_score_thresh", "runtime.device", "runtime.num_threads", "runtime.log_every_steps",
    "runtime.precision", "runtime.channels_last",
}


class Detectron2BackendError(RuntimeError):
    """detectron2 missing, or a toolkit setting the detectron2 backend cannot honour (the message
    names it)."""


def require_detectron2():
    try:
        import detectron2
    except ImportError as e:
        raise Detectron2BackendError(INSTALL) from e
    return detectron2


# -----------------------------------------------------------------------------------------
# datasets

def _split_ids(list_file: Path) -> list[str]:
    if not list_file.is_file():
        raise Detectron2BackendError(f"VOC split file not found: {list_file} (data.root must be "
                                     "the VOCdevkit folder holding VOC<year>/)")
    return [ln.split()[0] for ln in list_file.read_text().splitlines() if ln.strip()]


def _coco_classes(json_file: Path) -> tuple[list[str], dict[int, int]]:
    """(class names in sorted category-id order, {category id: contiguous index}) from a COCO
    json."""
    if not json_file.is_file():
        raise Detectron2BackendError(f"COCO annotation file not found: {json_file}")
    with open(json_file) as f:
        cats = sorted(json.load(f)["categories"], key=lambda c: c["id"])
    return [c["name"] for c in cats], {int(c["id"]): i for i, c in enumerate(cats)}


def dataset_specs(cfg: dict) -> dict:
    """What to register, from the toolkit's ``data`` section (no detectron2 needed).

    Returns {"format", "classes", "train": [spec], "test": spec}; a spec is a dict with the
    registered ``name`` and where its images and annotations are. ``data.max_train`` takes a prefix
    of the concatenated training sets (like the torchvision backend's Subset of the ConcatDataset).
    """
    from mixup_transfer.core.constants import VOC_CLASSES

    d = cfg["data"]
    root = Path(d["root"]).expanduser().resolve()
    limit_train, limit_test = int(d["max_train"] or 0), int(d["max_val"] or 0)
    if d["format"] == "voc":
        classes = list(d.get("classes") or VOC_CLASSES)

        def voc(spec, limit):
            year, split = str(spec).split("/")
            dirname = root / f"VOC{year}"
            ids = _split_ids(dirname / "ImageSets" / "Main" / f"{split}.txt")
            if int(year) not in (2007, 2012):
                raise Detectron2BackendError(f"data: VOC year {year} (detectron2's VOC evaluator "
                                             "knows 2007 and 2012)")
            n = min(limit, len(ids)) if limit else len(ids)
            return {"kind": "voc", "name": f"mt_voc_{year}_{split}"
                    + (f"_first{n}" if limit else ""),
                    "dirname": str(dirname), "year": int(year), "split": split, "ids": ids[:n],
                    "limit": limit, "classes": classes}

        train, left = [], limit_train
        for spec in d["voc_train"]:
            if limit_train and left <= 0:
                break
            s = voc(spec, left if limit_train else 0)
            left -= len(s["ids"])
            train.append(s)
        test = voc(d["voc_test"], limit_test)
    elif d["format"] == "coco":
        (tr_img, tr_json), (te_img, te_json) = d["coco_train"], d["coco_val"]
        classes, id_map = _coco_classes(root / te_json)

        def coco(img, ann, limit, train):
            return {"kind": "coco", "name": f"mt_coco_{Path(img).name}"
                    + (f"_first{limit}" if limit else ""),
                    "json_file": str(root / ann), "image_root": str(root / img), "limit": limit,
                    "drop_empty": train, "classes": classes, "id_map": id_map}

        train = [coco(tr_img, tr_json, limit_train, True)]
        test = coco(te_img, te_json, limit_test, False)
    else:
        raise Detectron2BackendError(f"data.format={d['format']!r} is not one of ['voc', 'coco']")
    return {"format": d["format"], "classes": classes, "train": train, "test": test}


def _voc_dicts(spec: dict) -> list[dict]:
    from detectron2.data.datasets import load_voc_instances

    if not spec["limit"]:
        return load_voc_instances(spec["dirname"], spec["split"], spec["classes"])
    keep = set(spec["ids"])
    dicts = load_voc_instances(spec["dirname"], spec["split"], spec["classes"])
    return [r for r in dicts if r["image_id"] in keep]


def _coco_dicts(spec: dict) -> list[dict]:
    from detectron2.data.datasets import load_coco_json

    dicts = load_coco_json(spec["json_file"], spec["image_root"], spec["name"])
    if spec["drop_empty"]:  # the torchvision backend's remove_empty: images with a non-crowd box
        dicts = [r for r in dicts
                 if any(a.get("iscrowd", 0) == 0 for a in r.get("annotations", ()))]
    return dicts[:spec["limit"]] if spec["limit"] else dicts


def register_toolkit_datasets(fmt_or_specs, root: str | os.PathLike | None = None) -> dict:
    """Register the toolkit's detectron2 datasets; idempotent, and re-registers a name whose files
    changed.

    ``register_toolkit_datasets("voc", "/data/VOCdevkit")`` registers the names the YAMLs of
    ``tools/convert.py`` use (``mt_voc_2007_trainval``, ``mt_voc_2012_trainval``,
    ``mt_voc_2007_test`` / ``mt_coco_train2017``, ``mt_coco_val2017``); the backend passes
    :func:`dataset_specs` instead. Returns the specs.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if isinstance(fmt_or_specs, str):
        specs = dataset_specs(resolve_config({"data": {"format": fmt_or_specs,
                                                       "root": str(root)}}))
    else:
        specs = fmt_or_specs
    for spec in [*specs["train"], specs["test"]]:
        name = spec["name"]
        key = json.dumps({k: v for k, v in spec.items() if k not in ("ids", "id_map")},
                         sort_keys=True)
        if name in DatasetCatalog.list():
            if MetadataCatalog.get(name).get("toolkit_spec") == key:
                continue
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        if spec["kind"] == "voc":
            DatasetCatalog.register(name, lambda s=spec: _voc_dicts(s))
            MetadataCatalog.get(name).set(thing_classes=list(spec["classes"]),
                                          dirname=spec["dirname"], year=spec["year"],
                                          split=spec["split"], evaluator_type="pascal_voc",
                                          toolkit_spec=key)
        else:
            DatasetCatalog.register(name, lambda s=spec: _coco_dicts(s))
            MetadataCatalog.get(name).set(thing_classes=list(spec["classes"]),
                                          thing_dataset_id_to_contiguous_id=dict(spec["id_map"]),
                                          json_file=spec["json_file"],
                                          image_root=spec["image_root"], evaluator_type="coco",
                                          toolkit_spec=key)
    return specs


def _voc_subset_dir(spec: dict, out_dir: Path, write: bool = True) -> dict:
    """detectron2's VOC evaluator scores every image of ``<dirname>/ImageSets/Main/<split>.txt``;
    for a prefix, a folder with links to the real Annotations / JPEGImages and the prefix as its
    split file (written by one process: ``write`` is False on the other ranks, which wait at a
    barrier)."""
    if not spec["limit"]:
        return spec
    src = Path(spec["dirname"])
    dst = out_dir / f"VOC{spec['year']}"
    split = f"{spec['split']}_first{len(spec['ids'])}"
    out = dict(spec, dirname=str(dst), split=split, limit=0)
    if not write:
        return out
    (dst / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for sub in ("Annotations", "JPEGImages"):
        link = dst / sub
        if not link.exists():
            tmp = dst / f".{sub}.{os.getpid()}"
            tmp.symlink_to(src / sub, target_is_directory=True)
            os.replace(tmp, link)
    runtime.atomic_write_text("".join(i + "\n" for i in spec["ids"]),
                              dst / "ImageSets" / "Main" / f"{split}.txt")
    return out


# ---------------------------------------------------------------------------------- configuration

def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _set(tree: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[last] = value


def device_name(cfg: dict) -> str:
    """MODEL.DEVICE from runtime.device ('auto': 'cuda' when there is a GPU, else 'cpu')."""
    dev = cfg["runtime"]["device"]
    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(dev)


def recipe(cfg: dict, weights_pkl, specs: dict) -> tuple[str, dict]:
    """(short name, detectron2 config dict) of the recipe ``model.type`` x ``data.format`` selects,
    with the toolkit's dataset names and class count (transfer/convert.py's recipes)."""
    m, fmt = cfg["model"], specs["format"]
    train, test = [s["name"] for s in specs["train"]], [specs["test"]["name"]]
    n = len(specs["classes"])
    # overridden anyway
    norm = NORMS.get("frozen_bn" if m["norm"] == "auto" else m["norm"], "FrozenBN")
    if m["type"] == "faster_rcnn_c4":
        if convert.DEPTHS.get(m["arch"]) in (18, 34):
            raise Detectron2BackendError(
                f"model.type=faster_rcnn_c4 with model.arch={m['arch']}: detectron2's C4 head "
                "builds bottleneck res5 blocks, which a basic-block ResNet's layer4 does not "
                "fit; use model.type=faster_rcnn_fpn")
        d2 = convert.voc_c4_config(weights_pkl, m["arch"], norm, True, n, train, test)
        if fmt == "coco":  # detectron2's COCO R50-C4 1x schedule, MoCo's extra norm kept
            d2["SOLVER"].update(STEPS=[60000, 80000], MAX_ITER=90000)
            d2["INPUT"]["MIN_SIZE_TRAIN"] = list(range(640, 801, 32))
        return "C4", d2
    if m["type"] == "faster_rcnn_fpn":
        if fmt == "voc":
            return "FPN", convert.voc_fpn_config(weights_pkl, m["arch"], norm, n, train, test)
        return "FPN", convert.coco_fpn_config(weights_pkl, m["arch"], norm, n, "1x", train, test)
    raise Detectron2BackendError(f"model.type={m['type']!r}: the detectron2 backend trains "
                                 "faster_rcnn_fpn or faster_rcnn_c4 (detectron2 has no SSD); "
                                 "use --backend torchvision for SSD")


def detectron2_overrides(cfg: dict, *, kind: str, world: int, n_train: int,
                         device: str) -> tuple[dict, dict]:
    """Toolkit config -> detectron2 keys: the toolkit config is the truth, so the same config
    trains the same schedule in both backends (the recipe only supplies what the toolkit has no key
    for: RPN / RoI feature maps, aspect ratios, pooler, ...). Every key is mapped, defaults
    included, as the torchvision backend reads it: ``model.norm: auto`` and ``trainable_layers:
    null`` resolve as ``transfer.detection.models`` resolves them for a pretrained trunk (FrozenBN,
    3 trainable
    stages: FREEZE_AT 2); ``optim.batch_per_process`` is per process (IMS_PER_BATCH = batch_size x
    processes); ``optim.max_iter`` 0 means ``epochs`` x iterations per epoch (training images //
    IMS_PER_BATCH, at least 1, like the torchvision loader's drop_last); ``optim.steps`` are
    fractions of MAX_ITER.

    kind: "FPN" | "C4"; world: processes; n_train: training images after the prefix. Returns
    ({dotted detectron2 key: value}, {toolkit key: what it became}). Raises Detectron2BackendError
    listing every setting that has no detectron2 counterpart.
    """
    flat, defaults = _flat(cfg), _flat(DEFAULTS)
    changed = {k for k, v in flat.items() if k not in defaults or v != defaults[k]}
    mp = _Mapped()
    mp.put("runtime.device", "MODEL.DEVICE", device)
    mp.put("data.num_workers", "DATALOADER.NUM_WORKERS", int(cfg["data"]["num_workers"]))
    # evaluation runs once, after training (not detectron2's EvalHook)
    mp.out["TEST.EVAL_PERIOD"] = 0
    _map_model(mp, cfg["model"], kind, world, device)
    _map_solver(mp, cfg["optim"], world, n_train)
    _map_runtime(mp, cfg, device, changed, flat)
    out, mapped, refused = mp.out, mp.mapped, mp.refused
    handled = STRUCTURAL | set(mapped) | {"model.norm", "optim.clip_grad_norm", "optim.epochs",
                                          "optim.max_iter", "data.zoom_out_ratio",
                                          "data.photometric", "eval.every_epochs"}
    for key in sorted(changed - handled):
        if not key.startswith("model.kwargs."):
            refused.append(f"{key}={flat[key]!r} (no detectron2 counterpart)")
    if refused:
        raise Detectron2BackendError("the detectron2 backend cannot honour these settings:\n  - "
                                     + "\n  - ".join(refused))
    return out, mapped



class _Mapped:
    """The detectron2 keys a toolkit config maps to, what each toolkit key became, and what is
    refused."""

    def __init__(self):
        self.out, self.mapped, self.refused = {}, {}, []

    def put(self, toolkit_key: str, d2_key: str, value) -> None:
        self.out[d2_key] = value
        text = f"{d2_key}={value!r}"
        self.mapped[toolkit_key] = (
            f"{self.mapped[toolkit_key]}, {text}" if toolkit_key in self.mapped else text
        )


def _map_model(mp: _Mapped, m: dict, kind: str, world: int, device: str) -> None:
    """model.*: norm, trainable stages, sizes, the builder's keyword arguments."""
    norm = "frozen_bn" if m["norm"] == "auto" else m["norm"]
    if norm not in NORMS:
        mp.refused.append(f"model.norm={m['norm']!r} (not one of {['auto', *NORMS]})")
    else:
        d2_norm = NORMS[norm]
        if d2_norm == "SyncBN" and world > 1 and not device.startswith("cuda"):
            # torch's SyncBatchNorm needs CUDA; detectron2's gloo all_reduce one works
            d2_norm = "NaiveSyncBN"
        mp.put("model.norm", "MODEL.RESNETS.NORM", d2_norm)
    trainable = 3 if m["trainable_layers"] is None else int(m["trainable_layers"])
    if not 0 <= trainable <= 5:
        mp.refused.append(f"model.trainable_layers={trainable} (must be in 0..5)")
    mp.put("model.trainable_layers", "MODEL.BACKBONE.FREEZE_AT", 5 - trainable)
    mp.put("model.size", "INPUT.MIN_SIZE_TEST", int(m["size"]))
    train_sizes = (
        [int(m["size"])] if m["train_sizes"] is None else [int(v) for v in m["train_sizes"]]
    )
    mp.put("model.train_sizes", "INPUT.MIN_SIZE_TRAIN", train_sizes)
    mp.put("model.max_size", "INPUT.MAX_SIZE_TRAIN", int(m["max_size"]))
    mp.put("model.max_size", "INPUT.MAX_SIZE_TEST", int(m["max_size"]))
    for name, value in m["kwargs"].items():
        key = f"model.kwargs.{name}"
        if name not in KWARGS or (kind == "C4" and name in FPN_ONLY):
            mp.refused.append(f"{key}={value!r} (no detectron2 key for it in the {kind} recipe; "
                              f"known: {sorted(KWARGS)})")
        elif name == "anchor_sizes":
            sizes = [int(v) for v in value]
            if kind == "FPN" and len(sizes) != 5:
                mp.refused.append(f"{key}={value!r} (one size per FPN level P2..P6: 5)")
            else:
                mp.put(key, KWARGS[name], [[v] for v in sizes] if kind == "FPN" else [sizes])
        elif name == "aspect_ratios":
            mp.put(key, KWARGS[name], [[float(v) for v in value]])
        else:
            mp.put(key, KWARGS[name], float(value) if name == "box_score_thresh" else int(value))


def _map_solver(mp: _Mapped, s: dict, world: int, n_train: int) -> None:
    """optim.*: batch over processes, iterations, steps, lr (scaled like the torchvision backend),
    warm-up."""
    ims = int(s["batch_per_process"]) * world
    mp.put("optim.batch_per_process", "SOLVER.IMS_PER_BATCH", ims)
    if int(s["max_iter"]) > 0:
        max_iter = int(s["max_iter"])
        mp.put("optim.max_iter", "SOLVER.MAX_ITER", max_iter)
    else:
        per_epoch = max(1, n_train // ims)
        max_iter = int(s["epochs"]) * per_epoch
        mp.put("optim.epochs", "SOLVER.MAX_ITER", max_iter)
    steps = sorted({int(round(f * max_iter)) for f in s["steps"]})
    kept = [v for v in steps if 0 < v < max_iter]
    if kept != steps:
        log.warning("optim.steps %s x %d iterations = %s: detectron2 needs 0 < step < MAX_ITER; "
                    "keeping %s",
                    s["steps"], max_iter, steps, kept)
    mp.put("optim.steps", "SOLVER.STEPS", kept)
    for key, d2_key in SOLVER.items():
        mp.put(f"optim.{key}", d2_key, int(s[key]) if key == "warmup_iters" else float(s[key]))
    # the linear scaling rule, as the torchvision backend applies it
    if s["reference_batch"] is not None:
        mp.put("optim.reference_batch", "SOLVER.BASE_LR",
            scaled_lr(s["lr"], s["batch_per_process"], world, s["reference_batch"]))
    if float(s["clip_grad_norm"]) > 0:
        mp.mapped["optim.clip_grad_norm"] = ("clip_grad_norm_(all parameters, "
                                             f"{s['clip_grad_norm']}) after each backward (a "
                                             "hook: detectron2's CLIP_GRADIENTS clips per "
                                             "parameter)")


def _map_runtime(mp: _Mapped, cfg: dict, device: str, changed: set, flat: dict) -> None:
    """runtime.* and eval.*: precision, channels-last, evaluation period, SSD-only keys."""
    rt = cfg["runtime"]
    if rt["precision"] == "fp16":
        if not device.startswith("cuda"):
            mp.refused.append("runtime.precision=fp16 on CPU (detectron2's AMP trainer is CUDA "
                              "only)")
        mp.put("runtime.precision", "SOLVER.AMP.ENABLED", True)
    elif rt["precision"] == "bf16":
        mp.refused.append("runtime.precision=bf16 (detectron2's AMPTrainer uses float16: set "
                          "runtime.precision=fp16 or fp32)")
    if rt["channels_last"] and device.startswith("cuda"):
        log.warning("runtime.channels_last: detectron2 has no channels-last option; the model "
                    "runs contiguous")
    if cfg["eval"]["every_epochs"]:
        mp.refused.append(f"eval.every_epochs={cfg['eval']['every_epochs']} (the detectron2 "
                          "backend evaluates once, after training)")
    for key in ("data.zoom_out_ratio", "data.photometric"):
        if key in changed:
            mp.refused.append(f"{key}={flat[key]!r} (SSD augmentation; detectron2's R-CNN "
                              "pipeline has none)")


def build_detectron2_config(cfg: dict, weights_pkl, specs: dict, *, world: int = 1, n_train: int,
                            device: str) -> tuple[str, dict, dict]:
    """(kind, detectron2 config dict ready for write_detectron2_yaml, mapping report)."""
    kind, d2 = recipe(cfg, weights_pkl, specs)
    overrides, mapped = detectron2_overrides(cfg, kind=kind, world=world, n_train=n_train,
                                             device=device)
    for key, value in overrides.items():
        _set(d2, key, value)
    return kind, d2, mapped


# ------------------------------------------------------------------------------------------
# running

def _ensure_local_process_group() -> None:
    """What detectron2's ``launch`` does in each worker after init_process_group, for torchrun's
    workers."""
    if runtime.world_size() == 1:
        return
    from detectron2.utils import comm

    try:
        comm.get_local_rank()
    except AssertionError:  # "Local process group is not yet created"
        comm.create_local_process_group(int(os.environ.get("LOCAL_WORLD_SIZE",
                                                           runtime.world_size())))


@contextlib.contextmanager
def _ddp_on_cpu():
    """detectron2's create_ddp_model passes device_ids=[local rank], which DDP rejects for a CPU
    model."""
    from detectron2.engine import defaults
    from detectron2.utils import comm

    real = defaults.create_ddp_model

    def create(model, **kwargs):
        if comm.get_world_size() > 1 and next(model.parameters()).device.type == "cpu":
            kwargs.setdefault("device_ids", None)
        return real(model, **kwargs)

    defaults.create_ddp_model = create
    try:
        yield
    finally:
        defaults.create_ddp_model = real


def _trainer_class(clip: float, log_period: int):
    from detectron2.engine import DefaultTrainer, hooks
    from detectron2.utils.events import CommonMetricPrinter, JSONWriter

    class ClipGradNorm(hooks.HookBase):
        """The torchvision backend's clip_grad_norm_ over all trainable parameters (unscaled under
        AMP)."""

        def after_backward(self):
            t = self.trainer
            if getattr(t, "grad_scaler", None) is not None:
                t.grad_scaler.unscale_(t.optimizer)
            params = [p for g in t.optimizer.param_groups for p in g["params"]
                      if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, clip)

    class Trainer(DefaultTrainer):
        def build_hooks(self):
            # no EvalHook: evaluation runs once, after training (finetune); writers every
            # log_period
            ret = [h for h in super().build_hooks()
                   if not isinstance(h, (hooks.EvalHook, hooks.PeriodicWriter))]
            from detectron2.utils import comm

            if comm.is_main_process():
                ret.append(hooks.PeriodicWriter(self.build_writers(), period=log_period))
            if clip > 0:  # SimpleTrainer runs after_backward on its own hooks
                self._trainer.register_hooks([ClipGradNorm()])
            return ret

        def build_writers(self):
            writers = [CommonMetricPrinter(self.max_iter),
                       JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"))]
            try:
                import tensorboard  # noqa: F401
                from detectron2.utils.events import TensorboardXWriter

                writers.append(TensorboardXWriter(self.cfg.OUTPUT_DIR))
            except ImportError:
                pass
            return writers

    return Trainer


class _Timed(torch.nn.Module):
    """Wraps a detectron2 model; counts the seconds spent in its forward (the torchvision backend's
    test
    speed: model time only, not data loading)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seconds = model, 0.0

    def forward(self, inputs):
        cuda = torch.cuda.is_available() and any(p.is_cuda for p in self.model.parameters())
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = self.model(inputs)
        if cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t0
        return out


def _collector(split: str):
    from detectron2.evaluation import DatasetEvaluator
    from detectron2.utils import comm

    class Collect(DatasetEvaluator):
        """Keeps every prediction (image id, boxes [K, 4] original pixels, scores [K], labels [K]
        1-based), gathered on rank 0, for the toolkit's evaluators. Evaluated first: a NaN or
        infinite box or score stops every rank (`scoring.check_finite` naming ``split``) before any
        evaluator scores them."""

        def reset(self):
            self._preds, self.predictions = [], []

        def process(self, inputs, outputs):
            for inp, out in zip(inputs, outputs):
                inst = out["instances"].to("cpu")
                self._preds.append((inp["image_id"], inst.pred_boxes.tensor.float(),
                                    inst.scores.float(), inst.pred_classes + 1))

        def evaluate(self):
            check_finite(split, ddist.sum_counts([count_nonfinite(self._preds)])[0])
            gathered = comm.gather(self._preds, dst=0)
            if comm.is_main_process():
                self.predictions = [p for part in gathered for p in part]
            return None

    return Collect()


def _toolkit_ctx(specs: dict):
    """The torchvision backend's evaluation context (its readers; scoring.score_predictions)."""
    from transfer.datasets import COCODetection, VOCDetection

    t = specs["test"]
    if t["kind"] == "voc":
        ds = VOCDetection(Path(t["dirname"]).parent, str(t["year"]), t["split"],
                          classes=tuple(t["classes"]))
        return {"format": "voc", "classes": tuple(t["classes"]), "split": t["split"],
                "dataset": ds}
    ds = COCODetection(t["image_root"], t["json_file"])
    return {"format": "coco", "classes": ds.classes, "dataset": ds}


def evaluate_once(d2cfg, model, specs: dict, cfg: dict, out_dir: Path) -> dict:
    """One inference pass over the test set feeding detectron2's evaluator and the toolkit's.

    Returns {"toolkit": metrics (mAP ...), "detectron2": {"AP", "AP50", "AP75", ...},
    "test_seconds", "n_test", "predictions"} on rank 0 ({} elsewhere)."""
    from detectron2.data import DatasetCatalog, DatasetMapper, build_detection_test_loader
    from detectron2.evaluation import (
        COCOEvaluator,
        DatasetEvaluators,
        PascalVOCDetectionEvaluator,
        inference_on_dataset,
    )
    from detectron2.utils import comm

    name = specs["test"]["name"]
    dicts = DatasetCatalog.get(name)
    loader = build_detection_test_loader(dicts, mapper=DatasetMapper(d2cfg, is_train=False),
                                         batch_size=int(cfg["eval"]["batch_size"]),
                                         num_workers=int(cfg["data"]["num_workers"]))
    if specs["test"]["kind"] == "voc":
        theirs = PascalVOCDetectionEvaluator(name)
    else:
        # as DefaultTrainer
        theirs = COCOEvaluator(name, tasks=("bbox",), output_dir=str(out_dir / "detectron2"))
    ours = _collector(split_name(cfg))
    timed = _Timed(model)
    results = inference_on_dataset(timed, loader, DatasetEvaluators([ours, theirs]))
    if not comm.is_main_process():
        return {}
    toolkit = score_predictions(ours.predictions, _toolkit_ctx(specs), out_dir,
                                cfg["eval"]["metric"])
    # detectron2 reports NaN where an area range has no ground truth: None here (JSON has no NaN)
    theirs_bbox = {k: (None if v != v else float(v)) for k, v in results["bbox"].items()}
    return {"toolkit": toolkit, "detectron2": theirs_bbox,
            "test_seconds": timed.seconds, "n_test": len(dicts), "predictions": ours.predictions}


def _figure(preds, ctx, path: Path, cfg: dict) -> None:
    k = int(cfg["eval"]["figure_examples"])
    if not k:
        return
    ds = ctx["dataset"]
    index = {str(i): n for n, i in enumerate(ds.ids)}
    examples = []
    for image_id, boxes, scores, labels in preds[:k]:
        image, target = ds[index[str(image_id)]]
        image = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        examples.append({"image": image, "pred_boxes": boxes, "scores": scores, "labels": labels,
                         "gt_boxes": target["boxes"], "gt_labels": target["labels"]})
    detection_figure(examples, ctx["classes"], path, cfg["eval"]["figure_score_thresh"])


def train_one_seed(yaml_path: Path, cfg: dict, specs: dict, seed_dir: Path, seed: int) -> dict:
    """Train one seed with DefaultTrainer (resuming from ``seed_dir/detectron2/last_checkpoint``),
    evaluate once, write ``seed_dir/metrics.json``. A seed whose metrics.json exists is not run
    again."""
    from detectron2.config import get_cfg

    done = seed_dir / "metrics.json"
    if done.is_file():
        log.info("%s exists: seed %d already finished", done, seed)
        return json.loads(done.read_text())
    d2cfg = get_cfg()
    d2cfg.merge_from_file(str(yaml_path))
    d2cfg.SEED = int(seed)
    d2cfg.OUTPUT_DIR = str(seed_dir / "detectron2")
    d2cfg.freeze()
    if runtime.is_main_process():
        runtime.atomic_write_text(d2cfg.dump(), seed_dir / "detectron2" / "config.yaml")
    runtime.barrier()
    Trainer = _trainer_class(float(cfg["optim"]["clip_grad_norm"]),
                             int(cfg["runtime"]["log_every_steps"]))
    with _ddp_on_cpu():
        trainer = Trainer(d2cfg)
    trainer.resume_or_load(resume=True)
    start = trainer.start_iter
    t0 = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - t0
    train_images = (d2cfg.SOLVER.MAX_ITER - start) * d2cfg.SOLVER.IMS_PER_BATCH
    res = evaluate_once(d2cfg, trainer.model, specs, cfg, seed_dir / "eval")
    metrics = {}
    if runtime.is_main_process():
        metrics = dict(res["toolkit"])
        metrics.update(seed=seed, iterations=int(d2cfg.SOLVER.MAX_ITER),
                       ims_per_batch=d2cfg.SOLVER.IMS_PER_BATCH, detectron2=res["detectron2"],
                       train_img_per_s=train_images / max(train_seconds, 1e-9),
                       test_img_per_s=res["n_test"] / max(res["test_seconds"], 1e-9),
                       train_seconds=train_seconds, test_seconds=res["test_seconds"],
                       device=d2cfg.MODEL.DEVICE, resumed_at=start)
        _figure(res["predictions"], _toolkit_ctx(specs), seed_dir / "figures" / "detections.png",
                cfg)
        runtime.write_json(metrics, done)
    runtime.barrier()
    return metrics


def finetune(cfg: dict, weights: str | None, run_dir) -> dict:
    """Convert, register, write the YAML, train every seed, evaluate each once; returns (rank 0)
    and writes ``run_dir/metrics.json``. ``cfg`` is a resolved detection config
    (``transfer.detection.config``) with
    ``backend: detectron2``."""
    require_detectron2()
    if weights is None:
        raise Detectron2BackendError("the detectron2 backend needs --weights (a backbone "
                                     "checkpoint to convert)")
    run_dir = Path(run_dir)
    if cfg["runtime"]["num_threads"]:
        torch.set_num_threads(int(cfg["runtime"]["num_threads"]))
    yaml_path, specs, mapped = _prepare(cfg, weights, run_dir)
    per_seed = [train_one_seed(yaml_path, cfg, specs, run_dir / f"seed_{s}", int(s))
                for s in cfg["seeds"]]
    if not runtime.is_main_process():
        return {}
    d2_keys = sorted(k for k in set.intersection(*(set(m["detectron2"]) for m in per_seed))
                     if not k.startswith("AP-"))  # the per-class APs stay in per_seed
    d2_means = {k: (None if any(m["detectron2"][k] is None for m in per_seed) else
                    float(np.mean([m["detectron2"][k] for m in per_seed]))) for k in d2_keys}
    return write_summary(run_dir, cfg, per_seed, backend="detectron2", weights=str(weights),
                         detectron2_config=str(yaml_path), mapped=mapped,
                         iterations=per_seed[0]["iterations"], detectron2=d2_means)


def _prepare(cfg: dict, weights: str, run_dir: Path) -> tuple[Path, dict, dict]:
    """Refusals first, then (rank 0) the converted weights and the YAML; every rank registers the
    datasets. Returns (YAML path, dataset specs, mapping report)."""
    check_resume(cfg, weights, run_dir)
    _ensure_local_process_group()
    world = runtime.world_size()
    device = device_name(cfg)
    if device.startswith("cuda") and world > 1:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    specs = dataset_specs(cfg)
    # every refusal before anything is written: a corrected rerun never meets files of the refused
    # one
    build_detectron2_config(cfg, run_dir / "backbone_d2.pkl", specs, world=world, n_train=1,
                            device=device)
    main = runtime.is_main_process()
    subsets = run_dir / "d2_datasets"
    specs = dict(specs, train=[_voc_subset_dir(s, subsets, main) if s["kind"] == "voc" else s
                               for s in specs["train"]])
    if specs["test"]["kind"] == "voc":
        specs["test"] = _voc_subset_dir(specs["test"], subsets, main)
    pkl = run_dir / "backbone_d2.pkl"
    if main:  # only rank 0 converts; the others wait for the finished file
        run_dir.mkdir(parents=True, exist_ok=True)
        runtime.atomic_write_text(dump_config(cfg), run_dir / "config.yaml")
        fp.write(run_dir, run_fingerprint(cfg, weights))
        from mixup_transfer.core.checkpoint import load_backbone

        state = load_backbone(weights, cfg["model"]["arch"])
        convert.write_detectron2_weights(convert.to_detectron2(state), pkl, cfg["model"]["arch"])
    runtime.barrier()
    register_toolkit_datasets(specs)
    from detectron2.data import DatasetCatalog

    n_train = sum(len(DatasetCatalog.get(s["name"])) for s in specs["train"])
    kind, d2, mapped = build_detectron2_config(cfg, pkl.resolve(), specs, world=world,
                                               n_train=n_train, device=device)
    yaml_path = run_dir / f"detectron2_{specs['format']}_{cfg['model']['arch']}_{kind}.yaml"
    if main:
        convert.write_detectron2_yaml(d2, yaml_path, cfg["model"]["arch"], pkl.name)
    if kind == "C4":
        convert.register_detectron2_extras()
    runtime.barrier()
    log.info("detectron2 config %s; toolkit keys mapped: %s", yaml_path, mapped)
    return yaml_path, specs, mapped


RESTART = "choose another --run-dir, or pass --force to start over"


def run_fingerprint(cfg: dict, weights: str | None) -> dict:
    """What a detectron2 run folder is made from: the resolved config (the list of seeds aside: a
    rerun may add seeds) and the backbone's hash."""
    return fp.make({k: v for k, v in cfg.items() if k != "seeds"}, {"weights": weights})


def check_resume(cfg: dict, weights: str | None, run_dir: Path) -> None:
    """Refuse (`FingerprintMismatch`, before anything is written) to continue a run folder made
    from another config or backbone (keys outside `RESUME_MAY_CHANGE`): a refused resume leaves the
    folder as it was, and finished seeds are never relabelled with new inputs."""
    if (Path(run_dir) / fp.FILE).is_file():
        fp.check(run_dir, run_fingerprint(cfg, weights), RESUME_MAY_CHANGE, RESTART)


def _launched(cfg, weights, run_dir, trusted=()):
    # a spawned process starts with nothing trusted: the parent's --allow-pickle again
    for path in trusted:
        trust_pickled(path)
    finetune(copy.deepcopy(cfg), weights, run_dir)


def launch_finetune(cfg: dict, weights: str | None, run_dir, num_gpus: int, dist_url: str = "auto",
                    trusted=()) -> dict:
    """``finetune`` in ``num_gpus`` processes started by detectron2's ``launch`` (as its
    train_net.py --num-gpus does; gloo on CPU). ``trusted``: the checkpoints the command line
    allowed to unpickle (``--allow-pickle``), trusted again in every process. Returns the metrics
    rank 0 wrote."""
    require_detectron2()
    from detectron2.engine import launch

    launch(_launched, int(num_gpus), num_machines=1, machine_rank=0, dist_url=dist_url,
           args=(cfg, weights, str(run_dir), tuple(str(p) for p in trusted)))
    return json.loads((Path(run_dir) / "metrics.json").read_text())
