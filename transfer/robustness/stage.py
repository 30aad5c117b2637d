"""The robustness stage: `run(cfg, inputs, run_dir) -> metrics`, with every option declared once in
DEFAULTS.

inputs: {"checkpoint": a backbone checkpoint with its classifier, "imagenet": an ImageNet-layout
root with val/ and val boxes}. The options are `evaluate_checkpoint`'s, translated here at the
edge. `protocol` (cifar, tinyimagenet, imagenet: `protocols.PROTOCOLS`) fills the options left at
null (image size, attack budgets, OOD transform); null keeps the evaluator's defaults. The
`embedding` suite (not part of "all": it needs umap-learn) adds alignment / uniformity and a UMAP
figure (`embedding.py`).
"""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path

from mixup_transfer.core.basics import metric_line
from mixup_transfer.core.config import ConfigError, check_ranges, validate
from mixup_transfer.core.stage import Stage
from mixup_transfer.core.vocabulary import DATA, EVAL, RUNTIME, fragment
from transfer.robustness.data import OOD_TRANSFORMS
from transfer.robustness.evaluate import NOISE_SETS, SUITES, evaluate_checkpoint, parse_suites
from transfer.robustness.protocols import (
    EVALUATOR_DEFAULTS,
    PROTOCOL_KEYS,
    PROTOCOLS,
    apply_protocol,
)

log = logging.getLogger("robustness")

STAGE_SUITES = ("embedding",)  # suites of this stage beyond evaluate_checkpoint's; never in "all"

DEFAULTS = {
    # comma-separated (or a list) of clean, background, calibration, fgsm, pgd, ood, embedding, or
    # all (every suite but embedding)
    "suites": ",".join(SUITES),
    # cifar | tinyimagenet | imagenet: fills the null keys below (null: none)
    "protocol": None,
    # output folder of tools/run_robustness.py (the pipeline gives its own)
    "out": "runs/robustness",
    # the shared keys: mixup_transfer/core/vocabulary.py (data.num_workers null: 0 on CPU, min(8,
    # cores) on CUDA)
    "data": fragment(DATA, "max_val", "num_workers"),
    "eval": fragment(EVAL, "batch_size", batch_size=64),
    "runtime": fragment(RUNTIME, "device", "precision", "tensorboard"),
    "image_size": None,              # centre-crop size (protocol; evaluator default 224)
    "resize": None,                  # short side before the crop (protocol; evaluator default 256)
    # replacement images, noise, PGD random starts, synthetic OOD images
    "seed": 0,
    "arch": None,                    # from the checkpoint's meta
    # eval (after resize + crop) | original (stored resolution, then resize)
    "corrupt_at": "eval",
    # background noise std in [0, 1] pixel units, clipped to [0, 1]
    "sigma": 0.1,
    "export_corrupted": None,        # folder to write the corrupted val sets as PNG (+ index.json)
    # FGSM budget: a number or a fraction string (protocol; default 8/255)
    "fgsm_eps": None,
    "pgd_eps": None,                 # PGD budget (protocol; default 4/255)
    "pgd_step": None,                # PGD step size (protocol; default 2/255)
    "pgd_iters": None,               # PGD iterations (protocol: 20; without a protocol 10)
    "pgd_random_start": True,        # PGD starts at a random point of the eps-ball
    "ood_noise": ",".join(NOISE_SETS),  # synthetic OOD sets: uniform,gaussian (empty for none)
    # std of the Gaussian OOD noise N(0.5, std), clipped (AlignMix App. C)
    "gaussian_std": 0.5,
    "cam_threshold": 0.25,           # localization: CAM box at this fraction of the map's max
    # localization: IoU against the GT boxes (multi-mix §IV-D: 0.25)
    "iou_threshold": 0.5,
    "iou_op": ">=",                  # localization: IoU comparison, >= or > (multi-mix: >)
    # OOD detection accuracy also at this max-softmax threshold (AlignMix §4.3)
    "ood_threshold": 0.5,
    "ood": [],                       # OOD image folders, each PATH or NAME=PATH
    # OOD folder image -> S x S: eval (val resize + crop) | crop | resize (protocol)
    "ood_transform": None,
    "embedding_alpha": 2.0,          # alignment exponent (Wang & Isola 2020)
    "embedding_t": 2.0,              # uniformity kernel scale t (Wang & Isola 2020)
    # L2-normalise the embeddings first (Wang & Isola: on the hypersphere)
    "embedding_normalize": True,
    "umap": True,                    # embedding suite: also the UMAP figure
    "umap_classes": 10,              # MultiMix Fig. 3: 10 randomly chosen classes ...
    "umap_per_class": 100,           # ... 100 test examples each
    "umap_neighbors": 15,            # umap-learn default
    "umap_epochs": None,             # umap-learn default (200 for large sets, 500 for small)
}


RANGES = {
    "data.max_val": (">", 0), "image_size": (">", 0), "resize": (">", 0),
    "eval.batch_size": (">", 0), "data.num_workers": (">=", 0),
    "sigma": (">=", 0), "pgd_iters": (">=", 0), "gaussian_std": (">", 0),
    "cam_threshold": (">=", 0, "<=", 1), "iou_threshold": (">=", 0, "<=", 1),
    "iou_op": ("in", (">=", ">")), "ood_threshold": (">=", 0, "<=", 1),
    "corrupt_at": ("in", ("eval", "original")),
    "runtime.precision": ("in", ("fp32", "bf16", "fp16")), "protocol": ("in", tuple(PROTOCOLS)),
    "ood_transform": ("in", OOD_TRANSFORMS), "embedding_t": (">", 0), "embedding_alpha": (">", 0),
    "umap_classes": (">", 0), "umap_per_class": (">", 0), "umap_neighbors": (">", 1),
    "umap_epochs": (">", 0), "runtime.tensorboard": ("in", (True, False, "auto")),
}


def parse_eps(v) -> float:
    """'8/255' or 0.0314 -> float."""
    try:
        return float(Fraction(str(v))) if "/" in str(v) else float(v)
    except (ValueError, ZeroDivisionError) as e:
        raise ConfigError(f"not a number or fraction: {v!r}") from e


# the types of the keys whose default is null (mixup_transfer.core.config.validate checks the
# others against their defaults)
TYPES = {"protocol": str, "data.max_val": int, "image_size": int, "resize": int,
         "data.num_workers": int, "arch": str, "export_corrupted": str, "fgsm_eps": (float, str),
         "pgd_eps": (float, str), "pgd_step": (float, str), "pgd_iters": int, "ood_transform": str,
         "umap_epochs": int}


def resolve_config(cfg: dict) -> dict:
    """Stage options: DEFAULTS filled in, the protocol's values for the keys left at null, types
    and ranges checked (ConfigError naming the key)."""
    cfg = validate(cfg, DEFAULTS, types=TYPES)
    check_ranges({"protocol": cfg["protocol"]}, {"protocol": RANGES["protocol"]})
    cfg = apply_protocol(cfg)
    # types of the filled keys
    validate({k: cfg[k] for k in PROTOCOL_KEYS}, EVALUATOR_DEFAULTS, "robustness")
    check_ranges(cfg, RANGES)
    return cfg


def split_suites(suites) -> tuple[list[str], list[str]]:
    """(evaluate_checkpoint's suites, this stage's extra suites) of a comma-separated string or a
    list."""
    if isinstance(suites, str):
        suites = [s.strip() for s in suites.split(",") if s.strip()]
    extra = [s for s in STAGE_SUITES if s in suites]
    core = [s for s in suites if s not in STAGE_SUITES]
    if not core and not extra:
        raise ValueError(f"no suites given; valid: {', '.join(SUITES + STAGE_SUITES)} (or 'all')")
    return (parse_suites(core) if core else []), extra


def evaluate_kwargs(cfg: dict) -> dict:
    """DEFAULTS-shaped options (after `resolve_config`) -> keyword arguments of
    `evaluate_checkpoint`."""
    data, rt = cfg["data"], cfg["runtime"]
    return dict(suites=cfg["suites"], ood_dirs=list(cfg["ood"] or ()), limit=data["max_val"],
                image_size=cfg["image_size"], resize=cfg["resize"],
                batch_size=cfg["eval"]["batch_size"], seed=cfg["seed"], device=rt["device"],
                precision=rt["precision"], num_workers=data["num_workers"], arch=cfg["arch"],
                corrupt_at=cfg["corrupt_at"], sigma=cfg["sigma"],
                fgsm_eps=parse_eps(cfg["fgsm_eps"]), pgd_eps=parse_eps(cfg["pgd_eps"]),
                pgd_step=parse_eps(cfg["pgd_step"]), pgd_iters=cfg["pgd_iters"],
                pgd_random_start=cfg["pgd_random_start"], gaussian_std=cfg["gaussian_std"],
                cam_threshold=cfg["cam_threshold"], iou_threshold=cfg["iou_threshold"],
                iou_op=cfg["iou_op"], ood_threshold=cfg["ood_threshold"],
                ood_transform=cfg["ood_transform"],
                ood_noise=tuple(s for s in str(cfg["ood_noise"] or "").split(",") if s))


def run(cfg: dict, inputs: dict, run_dir) -> dict:
    """Every suite of `cfg` on `inputs["checkpoint"]` over `inputs["imagenet"]`; writes
    run_dir/metrics.json."""
    cfg = resolve_config(cfg)
    missing = sorted({"checkpoint", "imagenet"} - set(inputs))
    if missing:
        raise ValueError(f"the robustness stage needs inputs {missing}")
    core, extra = split_suites(cfg["suites"])
    metrics = {}
    if core:
        metrics = evaluate_checkpoint(inputs["checkpoint"], inputs["imagenet"], out_dir=run_dir,
                                      export_dir=cfg["export_corrupted"],
                                      **{**evaluate_kwargs(cfg), "suites": core})
    if "embedding" in extra:
        from transfer.robustness.embedding import run_embedding_suite

        metrics = run_embedding_suite(cfg, inputs["checkpoint"], inputs["imagenet"], run_dir,
                                      metrics)
    for suite in [*core, *extra]:  # one console line per suite
        if isinstance(metrics.get(suite), dict):
            log.info("%s: %s", suite, metric_line(metrics[suite]))
    write_tensorboard(metrics, run_dir, cfg["runtime"]["tensorboard"])
    return metrics


def write_tensorboard(metrics: dict, run_dir, setting) -> None:
    """Every numeric metric as a scalar `suite/name` at step 0 of run_dir/tensorboard (rank 0)."""
    from mixup_transfer.core.engine import tensorboard_dir
    from mixup_transfer.core.runtime import is_main_process

    folder = tensorboard_dir(run_dir, setting) if run_dir is not None else None
    if folder is None or not is_main_process():
        return
    from torch.utils.tensorboard import SummaryWriter

    def leaves(d: dict, prefix: str = ""):
        for k, v in d.items():
            if isinstance(v, dict) and k != "units":
                yield from leaves(v, f"{prefix}{k}/")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                yield f"{prefix}{k}", v

    with SummaryWriter(str(folder)) as writer:
        for name, value in leaves({k: v for k, v in metrics.items()
                                   if k not in ("settings", "seconds")}):
            writer.add_scalar(name, value, 0)


STAGE = Stage(
    name="robustness",
    entry="transfer.robustness.stage:run",
    schema="transfer.robustness.stage:DEFAULTS",
    # a backbone with its classifier; an ImageNet-layout root with val/
    inputs=("checkpoint", "imagenet"),
    outputs=("metrics.json",),
    gpus_per_node=1,
    config_required=False,  # the defaults are the protocol
    run_dir=lambda cfg, config, cwd: Path(cwd) / cfg["out"],
    run_dir_flag=False,  # its `out` key (--out) names the output folder
    multi_inputs=("checkpoint",),  # several checkpoints: one run each and a comparison table
    # a flag for each top-level option, --threads, the comparison mode
    cli="transfer.robustness.cli",
    description="background corruption, calibration, attacks, OOD and embedding suites on a "
                "backbone",
)
