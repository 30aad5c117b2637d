"""Backbone checkpoint -> detectron2 weights + configs, and -> a plain torchvision state file.

detectron2 (no import needed here):
- keys are renamed, in this order: keys without "layer" get the prefix `stem.`; `layerN` ->
  `res{N+1}`; `bnK` -> `convK.norm`; `downsample.0` -> `shortcut`; `downsample.1` ->
  `shortcut.norm`. Values become numpy arrays. `fc.*` is dropped, and so are the BatchNorm step
  counters `num_batches_tracked` (like detectron2's own ImageNet .pkl files: FrozenBN has no such
  buffer and they carry no information).
- the file is a pickle of {"model": {...}, "__author__": "mixup-transfer", "matching_heuristics":
  True}: detectron2 then matches keys by suffix, so `res5.*` lands in `roi_heads.res5.*` (C4) and
  in `backbone.bottom_up.res5.*` (FPN). An author of "Caffe2" would trigger its Caffe2 renaming
  instead.
- the configs must say INPUT.FORMAT RGB, the torchvision pixel mean/std in 0-255 units and
  RESNETS.STRIDE_IN_1X1 False (torchvision puts the stride on the 3x3 conv). detectron2's defaults
  (BGR, std 1, stride in the 1x1) load these weights without any error and silently compute
  different features; `check_detectron2_config` / `check_detectron2_weights` catch that.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mixup_transfer.core.data import InputError
from mixup_transfer.core.runtime import atomic_path

log = logging.getLogger(__name__)

PIXEL_MEAN_RGB = [123.675, 116.28, 103.53]   # torchvision ImageNet mean x 255, RGB order
PIXEL_STD_RGB = [58.395, 57.12, 57.375]      # torchvision ImageNet std x 255, RGB order
DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}
AUTHOR = "mixup-transfer"
# The toolkit's own detectron2 dataset names (registered by
# transfer.detection.d2_backend.register_toolkit_datasets). Never detectron2's built-in names
# (coco_2017_train, voc_2007_test, ...): detectron2 registers those itself, with their metadata
# (the 80 COCO / 20 VOC classes) fixed, and looks for them under
# $DETECTRON2_DATASETS.
VOC_TRAIN = ("mt_voc_2007_trainval", "mt_voc_2012_trainval")
VOC_TEST = ("mt_voc_2007_test",)
COCO_TRAIN = ("mt_coco_train2017",)
COCO_TEST = ("mt_coco_val2017",)

# torchvision ResNet backbone keys (fc excluded) and detectron2 ResNet keys.
_TV_KEY = re.compile(r"^(conv1|bn1|layer[1-4]\.\d+\.(conv[1-3]|bn[1-3]|downsample\.[01]))\."
                     r"(weight|bias|running_mean|running_var|num_batches_tracked)$")
_D2_KEY = re.compile(r"^(stem\.conv1|res[2-5]\.\d+\.(conv[1-3]|shortcut))(\.norm)?\."
                     r"(weight|bias|running_mean|running_var)$")
_FOREIGN_PREFIXES = ("module.", "encoder_q.", "encoder.", "backbone.", "model.", "bottom_up.",
                     "state_dict.")


class ConversionError(InputError):
    """A state dict, weights file or config that would give detectron2 wrong features."""


# -------------------------------------------------------------------------------------------------
# Weights


def _rename(key: str) -> str:
    if "layer" not in key:
        key = "stem." + key
    key = re.sub(r"^layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", key)
    key = re.sub(r"(^|\.)bn(\d)\.", r"\1conv\2.norm.", key)
    key = key.replace("downsample.0", "shortcut")
    key = key.replace("downsample.1", "shortcut.norm")
    return key


def _to_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):
        return v.detach().cpu().numpy().copy()
    return np.array(v, copy=True)


def to_detectron2(backbone_state: Mapping[str, Any]) -> OrderedDict:
    """torchvision-keyed ResNet state dict (as `mixup_transfer.core.checkpoint.load_backbone`
    returns it; fc allowed and dropped) -> detectron2-named state dict of numpy arrays.

    Raises ConversionError listing keys that are not torchvision ResNet keys (e.g. a leftover
    `module.` prefix: run the checkpoint through load_backbone first).
    """
    if not isinstance(backbone_state, Mapping):
        raise TypeError(f"to_detectron2 takes a state dict, got {type(backbone_state).__name__}; "
                        "for a checkpoint file use convert_to_detectron2(in_path, out_pkl, arch)")
    bad = [k for k in backbone_state if not k.startswith("fc.") and not _TV_KEY.match(k)]
    if bad:
        more = " ..." if len(bad) > 8 else ""
        raise ConversionError(f"not torchvision ResNet keys ({len(bad)}): {bad[:8]}{more}; load "
                              "the checkpoint with "
                              "mixup_transfer.core.checkpoint.load_backbone, which strips "
                              "foreign prefixes and checks the key set")
    out = OrderedDict()
    for k, v in backbone_state.items():
        if k.startswith("fc.") or k.endswith("num_batches_tracked"):
            continue
        out[_rename(k)] = _to_numpy(v)
    return out


def expected_detectron2_shapes(arch: str) -> dict[str, tuple]:
    """detectron2 key -> shape for a torchvision `arch` converted by `to_detectron2`."""
    from mixup_transfer.core.checkpoint import expected_shapes

    return {_rename(k): s for k, s in expected_shapes(arch).items()
            if not k.endswith("num_batches_tracked")}


def detectron2_weights_problems(d: Any, arch: str | None = None) -> list[str]:
    """What would make detectron2 load `d` (the unpickled weights file) wrongly or not at all."""
    if not isinstance(d, Mapping) or not isinstance(d.get("model"), Mapping):
        return ["not a detectron2 weights dict: expected {'model': {...}, "
                "'matching_heuristics': True, ...}"]
    problems = []
    if d.get("__author__") == "Caffe2":
        problems.append("__author__ is 'Caffe2': detectron2 would apply its Caffe2 name "
                        "conversion")
    if d.get("matching_heuristics") is not True:
        problems.append("matching_heuristics is not True: detectron2 would need full model names "
                        "(backbone.bottom_up.res2...) and match nothing")
    model = d["model"]
    prefixes = sorted({p for k in model for p in _FOREIGN_PREFIXES if k.startswith(p)})
    if prefixes:
        problems.append(f"leftover prefix {prefixes}: detectron2 matches nothing and only logs a "
                        "warning")
    fc = [k for k in model if k.startswith("fc.") or ".fc." in k]
    if fc:
        problems.append(f"classifier keys not dropped: {fc[:4]}")
    if any(k.startswith("layer") or k.startswith("conv1.") or k.startswith("bn1.") for k in model):
        problems.append("torchvision key names (layer1..., conv1/bn1): not converted to "
                        "detectron2 names")
    other = [k for k in model if not _D2_KEY.match(k) and not k.endswith("num_batches_tracked")]
    if other and not prefixes and not fc:
        problems.append(f"keys that are not detectron2 ResNet names: {other[:8]}")
    not_arrays = [k for k, v in model.items() if not isinstance(v, np.ndarray)
                  and not hasattr(v, "detach")]
    if not_arrays:
        problems.append(f"values that are not arrays: {not_arrays[:4]}")
    if arch is not None and not problems:
        shapes = expected_detectron2_shapes(arch)
        present = {k for k in model if not k.endswith("num_batches_tracked")}
        missing = sorted(set(shapes) - present)
        unexpected = sorted(present - set(shapes))
        misshaped = sorted(k for k in set(shapes) & present
                           if tuple(np.shape(model[k])) != shapes[k])
        for what, keys in (("missing", missing), ("unexpected", unexpected),
                           ("mis-shaped", misshaped)):
            if keys:
                problems.append(f"{what} keys for {arch} ({len(keys)}): {keys[:8]}")
    return problems


# What a detectron2 weights file may contain: dicts, strings, numbers and numpy arrays.
_SAFE_PICKLE_GLOBALS = {("collections", "OrderedDict"), ("numpy", "ndarray"), ("numpy", "dtype"),
                        ("numpy.core.multiarray", "_reconstruct"),
                        ("numpy._core.multiarray", "_reconstruct"),
                        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                        ("numpy.core.numeric", "_frombuffer"),
                        ("numpy._core.numeric", "_frombuffer")}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _SAFE_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not allowed in a weights file")


def read_detectron2_weights(path: str | os.PathLike) -> Any:
    """Unpickle a detectron2 `.pkl` weights file allowing only dicts and numpy arrays (no code can
    run); `ConversionError` naming the file otherwise."""
    try:
        with open(path, "rb") as f:
            return _ArraysOnlyUnpickler(f).load()
    except FileNotFoundError:
        raise ConversionError(f"{path}: detectron2 weights file not found") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError) as e:
        raise ConversionError(f"{path}: not a detectron2 weights file "
                              f"({type(e).__name__}: {e})") from e


def check_detectron2_weights(d: Any, arch: str | None = None) -> None:
    """Raise ConversionError listing every problem of a detectron2 weights dict (or .pkl path)."""
    name = "detectron2 weights"
    if isinstance(d, (str, os.PathLike)):
        name = str(d)
        d = read_detectron2_weights(d)
    problems = detectron2_weights_problems(d, arch)
    if problems:
        raise ConversionError(f"{name}:\n  - " + "\n  - ".join(problems))


def write_detectron2_weights(state: Mapping[str, Any], out_pkl: str | os.PathLike,
                             arch: str | None = None) -> Path:
    """Pickle detectron2-named `state` (from `to_detectron2`) as a detectron2 weights file,
    atomically."""
    model = OrderedDict((k, v if isinstance(v, np.ndarray) else _to_numpy(v))
                        for k, v in state.items())
    payload = {"model": model,
               "__author__": AUTHOR, "matching_heuristics": True}
    check_detectron2_weights(payload, arch)
    out_pkl = Path(out_pkl)
    out_pkl.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_pkl) as tmp, open(tmp, "wb") as f:
        pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL)
    return out_pkl


# -------------------------------------------------------------------------------------------------
# Configs (detectron2's own yacs format; keys as in detectron2/config/defaults.py)


def _common(weights_pkl, arch: str, norm: str) -> dict:
    depth = DEPTHS[arch]
    return {
        "META_ARCHITECTURE": "GeneralizedRCNN",
        "WEIGHTS": str(weights_pkl),
        "MASK_ON": False,
        "PIXEL_MEAN": list(PIXEL_MEAN_RGB),
        "PIXEL_STD": list(PIXEL_STD_RGB),
        "RESNETS": {"DEPTH": depth, "NORM": norm, "STRIDE_IN_1X1": False,
                    # detectron2 asserts 64 for the BasicBlock nets R18/R34 (its default 256 is for
                    # R50+)
                    "RES2_OUT_CHANNELS": 64 if depth in (18, 34) else 256},
    }


def voc_c4_config(weights_pkl, arch: str = "resnet50", norm: str = "SyncBN",
                  extra_norm: bool = True, num_classes: int = 20, train=VOC_TRAIN,
                  test=VOC_TEST) -> dict:
    """MoCo's VOC R50-C4 recipe: VOC07+12 trainval -> VOC07 test, 24k iterations (steps 18k/22k),
    batch 16, lr 0.02, SyncBN everywhere (FREEZE_AT 0), precise BN, and an extra BN after res5
    (`Res5ROIHeadsExtraNorm`, registered by `register_detectron2_extras`)."""
    if DEPTHS[arch] in (18, 34):
        raise ConversionError("the C4 recipe needs a bottleneck ResNet: detectron2's "
                              f"Res5ROIHeads builds res5 from bottleneck blocks, which {arch}'s "
                              "layer4 weights do not fit; use the FPN config")
    model = _common(weights_pkl, arch, norm)
    model["BACKBONE"] = {"NAME": "build_resnet_backbone", "FREEZE_AT": 0}
    model["RESNETS"]["OUT_FEATURES"] = ["res4"]
    model["RPN"] = {"PRE_NMS_TOPK_TEST": 6000, "POST_NMS_TOPK_TEST": 1000}
    model["ROI_HEADS"] = {"NAME": "Res5ROIHeadsExtraNorm" if extra_norm else "Res5ROIHeads",
                          "NUM_CLASSES": num_classes}
    return {
        "MODEL": model,
        "INPUT": {"FORMAT": "RGB", "MIN_SIZE_TRAIN": list(range(480, 801, 32)),
                  "MIN_SIZE_TEST": 800},
        "DATASETS": {"TRAIN": list(train), "TEST": list(test)},
        "SOLVER": {"IMS_PER_BATCH": 16, "BASE_LR": 0.02, "STEPS": [18000, 22000],
                   "MAX_ITER": 24000, "WARMUP_ITERS": 100},
        "TEST": {"PRECISE_BN": {"ENABLED": True}},
        "VERSION": 2,
    }


def _fpn_model(weights_pkl, arch: str, norm: str, num_classes: int) -> dict:
    model = _common(weights_pkl, arch, norm)
    feats = ["res2", "res3", "res4", "res5"]
    model["BACKBONE"] = {"NAME": "build_resnet_fpn_backbone",
                         "FREEZE_AT": 2 if norm == "FrozenBN" else 0}
    model["RESNETS"]["OUT_FEATURES"] = feats
    model["FPN"] = {"IN_FEATURES": feats}
    model["ANCHOR_GENERATOR"] = {"SIZES": [[32], [64], [128], [256], [512]],
                                 "ASPECT_RATIOS": [[0.5, 1.0, 2.0]]}
    model["RPN"] = {"IN_FEATURES": ["p2", "p3", "p4", "p5", "p6"], "PRE_NMS_TOPK_TRAIN": 2000,
                    "PRE_NMS_TOPK_TEST": 1000, "POST_NMS_TOPK_TRAIN": 1000,
                    "POST_NMS_TOPK_TEST": 1000}
    model["ROI_HEADS"] = {"NAME": "StandardROIHeads", "IN_FEATURES": ["p2", "p3", "p4", "p5"],
                          "NUM_CLASSES": num_classes}
    model["ROI_BOX_HEAD"] = {"NAME": "FastRCNNConvFCHead", "NUM_FC": 2, "POOLER_RESOLUTION": 7}
    return model


def coco_fpn_config(weights_pkl, arch: str = "resnet50", norm: str = "FrozenBN",
                    num_classes: int = 80, schedule: str = "1x", train=COCO_TRAIN,
                    test=COCO_TEST) -> dict:
    """detectron2's COCO Faster R-CNN R50-FPN recipe: 1x = 90k iterations (steps 60k/80k), 2x =
    180k (120k/160k), batch 16, lr 0.02, multi-scale 640-800 training, FrozenBN with stem+res2
    frozen."""
    iters = {"1x": (90000, [60000, 80000]), "2x": (180000, [120000, 160000])}
    if schedule not in iters:
        raise ValueError(f"unknown schedule {schedule!r}; valid: {list(iters)}")
    model = _fpn_model(weights_pkl, arch, norm, num_classes)
    max_iter, steps = iters[schedule]
    return {
        "MODEL": model,
        "INPUT": {"FORMAT": "RGB", "MIN_SIZE_TRAIN": list(range(640, 801, 32))},
        "DATASETS": {"TRAIN": list(train), "TEST": list(test)},
        "SOLVER": {"IMS_PER_BATCH": 16, "BASE_LR": 0.02, "STEPS": steps, "MAX_ITER": max_iter},
        "VERSION": 2,
    }


def voc_fpn_config(weights_pkl, arch: str = "resnet50", norm: str = "FrozenBN",
                   num_classes: int = 20, train=VOC_TRAIN, test=VOC_TEST) -> dict:
    """detectron2's PascalVOC-Detection/faster_rcnn_R_50_FPN recipe (any depth, R18/R34 included):
    VOC07+12 trainval -> VOC07 test, 18k iterations (steps 12k/16k), batch 16, lr 0.02, multi-scale
    480-800, test 800, FrozenBN with stem+res2 frozen."""
    model = _fpn_model(weights_pkl, arch, norm, num_classes)
    return {
        "MODEL": model,
        "INPUT": {"FORMAT": "RGB", "MIN_SIZE_TRAIN": list(range(480, 801, 32)),
                  "MIN_SIZE_TEST": 800},
        "DATASETS": {"TRAIN": list(train), "TEST": list(test)},
        "SOLVER": {"IMS_PER_BATCH": 16, "BASE_LR": 0.02, "STEPS": [12000, 16000],
                   "MAX_ITER": 18000, "WARMUP_ITERS": 100},
        "VERSION": 2,
    }


class _PlainDumper(yaml.SafeDumper):
    """No YAML anchors/aliases: every list is written out where it is used."""

    def ignore_aliases(self, data):
        return True


def detectron2_configs(out_dir: str | os.PathLike, weights_pkl: str | os.PathLike,
                       arch: str = "resnet50", voc_norm: str = "SyncBN",
                       coco_norm: str = "FrozenBN",
                       voc_extra_norm: bool = True) -> dict[str, Path]:
    """Write ready detectron2 configs next to the weights; returns {name: path}.

    `voc_<arch>_C4_24k.yaml` (MoCo-style VOC recipe; bottleneck ResNets only),
    `voc_<arch>_FPN_18k.yaml` (detectron2's VOC FPN recipe; every depth, the one for R18/R34) and
    `coco_<arch>_FPN_1x.yaml`. Their DATASETS are the toolkit's own names (`mt_voc_2007_trainval`,
    ..., `mt_coco_val2017`): register them with
    `transfer.detection.d2_backend.register_toolkit_datasets(format, root)` before detectron2's
    train_net.py-style code builds its loaders (the VOC C4 one also needs
    `register_detectron2_extras()` for its extra-norm RoI head, or voc_extra_norm=False).
    """
    if arch not in DEPTHS:
        raise ValueError(f"unknown arch {arch!r}; supported: {list(DEPTHS)}")
    if Path(out_dir).suffix == ".pkl" or Path(weights_pkl).is_dir():
        raise ValueError(f"detectron2_configs(out_dir, weights_pkl, arch): got out_dir={out_dir}, "
                         f"weights_pkl={weights_pkl} (swapped?)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = Path(weights_pkl).resolve()
    configs = {}
    if DEPTHS[arch] not in (18, 34):  # detectron2's C4 head builds bottleneck res5 blocks
        configs[f"voc_{arch}_C4_24k"] = voc_c4_config(weights, arch, voc_norm, voc_extra_norm)
    configs[f"voc_{arch}_FPN_18k"] = voc_fpn_config(weights, arch)
    configs[f"coco_{arch}_FPN_1x"] = coco_fpn_config(weights, arch, coco_norm)
    return {name: write_detectron2_yaml(cfg, out_dir / f"{name}.yaml", arch, weights.name)
            for name, cfg in configs.items()}


def write_detectron2_yaml(cfg: Mapping, path: str | os.PathLike, arch: str | None = None,
                          weights_name: str = "") -> Path:
    """Check `cfg` (check_detectron2_config) and write it as a detectron2 YAML, atomically (a
    temporary file per process, then a rename: an interrupted write never leaves a partial YAML
    behind)."""
    check_detectron2_config(cfg, arch)
    header = ("# detectron2 config written by mixup-transfer (transfer/convert.py) for "
              f"{weights_name}\n"
              "# RGB input, torchvision mean/std and STRIDE_IN_1X1 False are REQUIRED for "
              "them.\n"
              "# DATASETS are the toolkit's names: "
              "transfer.detection.d2_backend.register_toolkit_datasets(format, root)\n")
    with atomic_path(path) as tmp:
        tmp.write_text(header + yaml.dump(dict(cfg), Dumper=_PlainDumper, sort_keys=False,
                                          default_flow_style=None))
    return Path(path)


def _get(cfg: Mapping, dotted: str, default):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def detectron2_config_problems(cfg: Mapping, arch: str | None = None) -> list[str]:
    """What in a detectron2 config (nested dict) would compute wrong features with these weights.
    Keys left out take detectron2's defaults (BGR, caffe2 mean, std 1, stride in the 1x1)."""
    problems = []
    fmt = _get(cfg, "INPUT.FORMAT", "BGR")
    if fmt != "RGB":
        problems.append(f"INPUT.FORMAT is {fmt!r} (detectron2 default BGR); torchvision weights "
                        "need 'RGB'")
    mean = _get(cfg, "MODEL.PIXEL_MEAN", [103.53, 116.28, 123.675])
    std = _get(cfg, "MODEL.PIXEL_STD", [1.0, 1.0, 1.0])
    for name, value, want in (("PIXEL_MEAN", mean, PIXEL_MEAN_RGB),
                              ("PIXEL_STD", std, PIXEL_STD_RGB)):
        try:
            ok = np.allclose(np.asarray(value, dtype=float), want, atol=1e-3)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            why = ""
            try:
                flat = np.asarray(value, dtype=float).reshape(-1)
            except (TypeError, ValueError):
                flat = np.zeros(0)
            if flat.size == 3 and np.allclose(flat, want[::-1], atol=1e-3):
                why = " (BGR order)"
            elif name == "PIXEL_STD" and flat.size and np.allclose(flat, 1.0):
                why = " (std 1: detectron2's default for caffe2 weights)"
            problems.append(f"MODEL.{name} is {value!r}{why}; torchvision weights need {want}")
    if _get(cfg, "MODEL.RESNETS.STRIDE_IN_1X1", True) is not False:
        problems.append("MODEL.RESNETS.STRIDE_IN_1X1 is not False (detectron2 default True); "
                        "torchvision ResNets stride in the 3x3 conv")
    depth = _get(cfg, "MODEL.RESNETS.DEPTH", 50)
    if arch is not None and depth != DEPTHS.get(arch):
        problems.append(f"MODEL.RESNETS.DEPTH is {depth} but the weights are {arch}")
    if depth in (18, 34):
        if _get(cfg, "MODEL.RESNETS.RES2_OUT_CHANNELS", 256) != 64:
            problems.append("MODEL.RESNETS.RES2_OUT_CHANNELS must be 64 for R18/R34 (detectron2 "
                            "asserts it)")
        if "Res5ROIHeads" in str(_get(cfg, "MODEL.ROI_HEADS.NAME", "Res5ROIHeads")):
            problems.append("C4 (Res5ROIHeads) needs bottleneck blocks; R18/R34 weights do not "
                            "fit")
    weights = _get(cfg, "MODEL.WEIGHTS", "")
    if weights and str(weights).startswith("detectron2://ImageNetPretrained/MSRA"):
        problems.append(f"MODEL.WEIGHTS {weights!r} is detectron2's caffe2 ImageNet model, "
                        "not the converted file")
    return problems


def check_detectron2_config(cfg: Mapping | str | os.PathLike, arch: str | None = None) -> None:
    """Raise ConversionError listing every problem of a detectron2 config (dict or YAML path; a
    relative `_BASE_` chain is followed when the files exist)."""
    name = "detectron2 config"
    if isinstance(cfg, (str, os.PathLike)):
        name = str(cfg)
        cfg = _load_yaml_chain(Path(cfg))
    problems = detectron2_config_problems(cfg, arch)
    if problems:
        raise ConversionError(f"{name}:\n  - " + "\n  - ".join(problems))


def _merge(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = (
            _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
        )
    return out


def _load_yaml_chain(path: Path, depth: int = 0) -> dict:
    if not path.is_file():
        raise ConversionError(f"{path}: config not found")
    cfg = yaml.safe_load(path.read_text()) or {}
    base = cfg.pop("_BASE_", None)
    if base and depth < 10:
        base_path = path.parent / base
        if base_path.is_file():
            cfg = _merge(_load_yaml_chain(base_path, depth + 1), cfg)
        else:
            log.warning("%s: _BASE_ %s not found; checking this file alone", path, base)
    return cfg


def register_detectron2_extras() -> None:
    """Register `Res5ROIHeadsExtraNorm` (MoCo's C4 head: one more norm layer after res5) with
    detectron2's ROI head registry. Needs detectron2; idempotent."""
    from detectron2.layers import get_norm
    from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads

    if "Res5ROIHeadsExtraNorm" in ROI_HEADS_REGISTRY:
        return

    class Res5ROIHeadsExtraNorm(Res5ROIHeads):
        """Res5ROIHeads with a norm layer appended to res5 (MoCo's detection recipe)."""

        def __init__(self, cfg, input_shape):
            super().__init__(cfg, input_shape)
            self.res5.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM,
                                                  self.res5[-1].out_channels))

    ROI_HEADS_REGISTRY.register(Res5ROIHeadsExtraNorm)


# -------------------------------------------------------------------------------------------------
# Files end to end (tools/convert.py)


def convert_to_detectron2(in_path: str | os.PathLike, out_pkl: str | os.PathLike,
                          arch: str | None = "resnet50", configs: bool = True,
                          allow_pickle: bool = False) -> dict[str, Path]:
    """Any checkpoint layout load_backbone reads -> detectron2 .pkl (+ configs beside it).

    arch None: from the checkpoint's meta or inferred from its keys.
    Returns {"weights": path, <config name>: path}.
    """
    from mixup_transfer.core.checkpoint import infer_arch, load_backbone

    state = load_backbone(in_path, arch, allow_pickle=allow_pickle)
    arch = arch or infer_arch(state)
    out = {"weights": write_detectron2_weights(to_detectron2(state), out_pkl, arch)}
    if configs:
        out.update(detectron2_configs(Path(out_pkl).parent, out_pkl, arch))
    return out


def convert_to_torchvision(in_path: str | os.PathLike, out_pth: str | os.PathLike,
                           arch: str | None = "resnet50", allow_pickle: bool = False) -> Path:
    """Any checkpoint layout load_backbone reads -> the plain contract file {"model":
    torchvision-keyed backbone state (no fc), "meta": {...}}, loadable with weights_only=True and
    by load_backbone."""
    from mixup_transfer.core.checkpoint import infer_arch, load_backbone
    from mixup_transfer.core.runtime import atomic_save

    state = load_backbone(in_path, arch, allow_pickle=allow_pickle)
    arch = arch or infer_arch(state)
    meta = {"arch": arch, "num_classes": None, "method": None, "epochs": None, "config": None,
            "metrics": {}, "converted_from": str(in_path)}
    atomic_save({"model": state, "meta": meta}, out_pth)
    return Path(out_pth)
