"""The backbone checkpoint: the one contract between pretraining and every downstream stage.

File format (ARCHITECTURE.md): a `torch.save`d plain dict
    {"model": <torchvision-keyed ResNet state_dict (fc included), or timm-keyed ViT (head incl.)>,
     "meta": {"arch", "num_classes", "method", "epochs", "config" (YAML text), "metrics" (dict)}}
loadable with `torch.load(..., weights_only=True)`.

`load_backbone` also reads the layouts users bring from other codebases (DataParallel `module.`,
MoCo `module.encoder_q.`, `backbone.`, `model.`, AlignMixup `module.model.` + `module.classifier.`,
`{"state_dict": ...}` wrappers) and checks the exact key set and shapes for the architecture: a
checkpoint that does not fit raises `CheckpointError` naming the missing, unexpected and mis-shaped
keys.

The Vision Transformers (`mixup_transfer/core/vits.py`) keep timm's own key layout (`cls_token`,
`pos_embed`, `patch_embed.*`, `blocks.<i>.*`, `norm.*`) with the classifier `head.*` where a ResNet
has `fc.*` (`classifier_prefix`); they are checked key by key in the same way, and
`classifier_from_checkpoint` builds either family.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from functools import cache
from typing import Any

import torch
import torchvision

from mixup_transfer.core.data import InputError
from mixup_transfer.core.runtime import atomic_save, unwrap
from mixup_transfer.core.smallnets import SMALL_ARCHS, SMALL_FEATURE_DIMS, build_small
from mixup_transfer.core.vits import (
    VIT_ARCHS,
    VIT_FEATURE_DIMS,
    build_vit,
    infer_vit_arch,
    looks_like_vit,
)

# torchvision's (detection, WSOL, conversion)
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
# the torchvision ResNet layout (mixup_transfer/core/smallnets.py included)
RESNET_ARCHS = ARCHS + SMALL_ARCHS
# every architecture a backbone checkpoint may hold: torchvision's, the small-image ones and the
# ViTs (mixup_transfer/core/vits.py)
ALL_ARCHS = RESNET_ARCHS + VIT_ARCHS

# Prefixes tried when unwrapping foreign layouts; the one matching most backbone keys wins.
_PREFIXES = ("", "module.", "module.encoder_q.", "encoder_q.", "module.backbone.", "backbone.",
             "module.model.", "model.", "module.encoder.", "encoder.", "backbone.body.")
# Wrapper keys under which other codebases store the state dict.
_WRAPPERS = ("state_dict", "model", "model_state", "net", "network")


class CheckpointError(InputError):
    """A checkpoint that is unreadable or does not fit the requested architecture."""


def build_resnet(arch: str, num_classes: int = 1000, **kwargs) -> torch.nn.Module:
    """A randomly initialised torchvision ResNet (kwargs: norm_layer,
    replace_stride_with_dilation...), or one of the small-image networks of
    `mixup_transfer.core.smallnets` (kwargs: zero_init_residual), same module layout."""
    if arch in SMALL_ARCHS:
        return build_small(arch, num_classes, **kwargs)
    if arch in VIT_ARCHS:
        raise ValueError(f"{arch} is a Vision Transformer, not a ResNet: build it with "
                         "build_network")
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; supported: {list(ALL_ARCHS)}")
    return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes, **kwargs)


def build_network(arch: str, num_classes: int = 1000, **kwargs) -> torch.nn.Module:
    """Any architecture of ALL_ARCHS, randomly initialised: a ResNet (`build_resnet`) or a timm ViT
    (`mixup_transfer.core.vits.build_vit`)."""
    if arch in VIT_ARCHS:
        return build_vit(arch, num_classes, **kwargs)
    return build_resnet(arch, num_classes, **kwargs)


def is_vit(arch: str) -> bool:
    return arch in VIT_ARCHS


def classifier_prefix(arch: str) -> str:
    """The key prefix of the classifier: `fc.` (torchvision ResNets) or `head.` (timm ViTs)."""
    return "head." if arch in VIT_ARCHS else "fc."


def feature_dim(arch: str) -> int:
    """Width of the pooled features (the embedding) that the classifier reads."""
    if arch in SMALL_FEATURE_DIMS:
        return SMALL_FEATURE_DIMS[arch]
    if arch in VIT_FEATURE_DIMS:
        return VIT_FEATURE_DIMS[arch]
    return 2048 if arch in ("resnet50", "resnet101") else 512


@cache
def expected_shapes(arch: str) -> dict[str, tuple]:
    """Backbone key -> shape for `arch` (the classifier, fc or head, excluded)."""
    with torch.device("meta"):
        model = build_network(arch, num_classes=1000)
    head = classifier_prefix(arch)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith(head)}


def infer_arch(state: Mapping[str, torch.Tensor]) -> str:
    """Guess the ResNet depth from the keys: BasicBlock vs Bottleneck and the number of layer3
    blocks; the small-image networks by their stem (3x3 conv1; no stem BN for the pre-activation
    ones but the AlignMixup one, told from resnet18_cifar by its BN-free projection shortcut; WRN's
    layer4.bn); a ViT by its patch size, width and depth."""
    if looks_like_vit(state):
        arch = infer_vit_arch(state)
        if arch is None:
            proj = state.get("patch_embed.proj.weight")
            raise CheckpointError(
                "cannot infer the ViT architecture (patch embedding "
                f"{None if proj is None else tuple(proj.shape)}, "
                f"{len({k.split('.')[1] for k in state if k.startswith('blocks.')})} blocks); "
                f"pass arch= one of {list(VIT_ARCHS)}")
        return arch
    if "layer4.bn.weight" in state:
        return "wrn16_8"
    conv1 = state.get("conv1.weight")
    if "layer1.0.conv1.weight" in state and "bn1.weight" not in state:
        return (
            "preactresnet18_w16"
            if conv1 is not None and conv1.shape[0] == 16
            else "preactresnet18"
        )
    if "layer2.0.downsample.0.weight" in state and "layer2.0.downsample.1.weight" not in state:
        # a stem BN, and pre-activation blocks (their projection has no BN)
        return "preactresnet18_alignmixup"
    if (
        conv1 is not None
        and tuple(conv1.shape[-2:]) == (3, 3)
        and "layer1.0.conv3.weight" not in state
    ):
        return "resnet18_cifar"
    bottleneck = "layer1.0.conv3.weight" in state
    n3 = len({k.split(".")[1] for k in state if k.startswith("layer3.")})
    table = {(False, 2): "resnet18", (False, 6): "resnet34", (True, 6): "resnet50",
             (True, 23): "resnet101"}
    if (bottleneck, n3) not in table:
        raise CheckpointError(
            f"cannot infer the architecture (bottleneck={bottleneck}, layer3 blocks={n3}); pass "
            f"arch= one of {list(ARCHS)}")
    return table[(bottleneck, n3)]


def _to_plain(value: Any, where: str) -> Any:
    """Check that meta holds only primitives (weights_only loading refuses anything else)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_to_plain(v, where) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _to_plain(v, f"{where}.{k}") for k, v in value.items()}
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()  # numpy / torch scalars
    raise TypeError(f"checkpoint meta {where} has a {type(value).__name__}; only primitives are "
                    "allowed")


HEAD_KINDS = ("pooled_linear",)


def check_head(head: Mapping) -> dict:
    """A classifier head that sits between the layer4 map and fc (AlignMix's stage-2 encoder, paper
    §4.1): ``{"kind": "pooled_linear", "resolution": r, "weight": [d, c*r*r], "bias": [d]}``:
    logits = fc(weight @ flatten(adaptive_avg_pool(layer4, r)) + bias)."""
    if head.get("kind") not in HEAD_KINDS:
        raise ValueError(f"head kind must be one of {list(HEAD_KINDS)}, got {head.get('kind')!r}")
    r, w, b = int(head["resolution"]), head["weight"], head["bias"]
    if r < 1 or w.ndim != 2 or b.shape != (w.shape[0],) or w.shape[1] % (r * r):
        raise ValueError(f"malformed pooled_linear head: resolution {r}, weight {tuple(w.shape)}, "
                         f"bias {tuple(b.shape)}")
    return {"kind": head["kind"], "resolution": r, "weight": w.detach().cpu().clone(),
            "bias": b.detach().cpu().clone()}


def save_backbone(path: str | os.PathLike, model: torch.nn.Module, meta: Mapping,
                  head: Mapping | None = None) -> None:
    """Write the contract file for a torchvision ResNet or a timm ViT (DDP / compile wrappers are
    unwrapped).

    head: the classifier's own layers between layer4 and fc when the method has them
    (`check_head`); stored beside "model" as "head" (the "model" keys stay exactly torchvision's),
    and meta["classifier"] names it, so that an evaluator never applies that fc to pooled
    features."""
    model = unwrap(model)
    state = OrderedDict((k, v.detach().cpu().clone()) for k, v in model.state_dict().items())
    meta = _to_plain(dict(meta), "meta")
    arch = meta.get("arch")
    if arch not in ALL_ARCHS:
        raise ValueError(f"meta['arch'] must be one of {list(ALL_ARCHS)}, got {arch!r}")
    fc = classifier_prefix(arch)
    _check_keys({k: v for k, v in state.items() if not k.startswith(fc)}, arch, path)
    if fc + "weight" not in state:
        raise ValueError(f"save_backbone expects a network with its classifier {fc}weight (the "
                         "classifier is part of the contract)")
    meta.setdefault("num_classes", int(state[fc + "weight"].shape[0]))
    for key in ("method", "epochs", "config", "metrics"):
        meta.setdefault(key, None if key != "metrics" else {})
    meta["classifier"] = head["kind"] if head is not None else "fc"
    obj = {"model": state, "meta": meta}
    if head is not None:
        obj["head"] = check_head(head)
    atomic_save(obj, path)


def classifier_head(path: str | os.PathLike, allow_pickle: bool = False) -> dict | None:
    """The checkpoint's stage-2 classifier head (`check_head`), or None when its fc follows global
    pooling."""
    obj = read_checkpoint(path, allow_pickle)
    head = obj.get("head") if isinstance(obj, dict) else None
    return check_head(head) if head is not None else None


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format is a zip archive
_PICKLE_MAGIC = b"\x80"      # pickle protocol >= 2 (also torch.save's legacy format)


class _GlobalRefused(pickle.UnpicklingError):
    pass


class _NoGlobalsUnpickler(pickle.Unpickler):
    """Unpickles plain data only (lists, dicts, numbers, strings): any class or function is
    refused."""

    def find_class(self, module, name):
        raise _GlobalRefused(f"GLOBAL {module}.{name}")

    def persistent_load(self, pid):
        raise _GlobalRefused("a persistent id (tensor storage)")


_TRUSTED: set[str] = set()  # files named with --allow-pickle on this process's command line


def trust_pickled(path: str | os.PathLike) -> None:
    """Allow full unpickling of this one file: what a tool's `--allow-pickle` flag does for the
    checkpoint(s) named on its command line. Never set from a config file or an override (a recipe
    shared by someone else must not be able to run code)."""
    _TRUSTED.add(os.path.realpath(path))


CONVERT_HINT = ("Only if you trust the file, pass --allow-pickle to the tool that reads it "
                "(tools/run_robustness.py, run_detection.py, run_wsol.py, convert.py, "
                "submit.py), or convert it once into a safe file: tools/convert.py --to "
                "torchvision --allow-pickle FILE OUT.pth")


def read_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> Any:
    """The object in a `torch.save`d file, loaded with `weights_only=True` (tensors and primitives
    only).

    Every failure is a `CheckpointError` that names the file and says what it is: missing, empty,
    not a PyTorch file at all (random bytes, text), a truncated or corrupt archive, or a file
    holding pickled Python objects. Only the last one can be loaded, and only with
    `allow_pickle=True` or for a file the command line trusted (`trust_pickled`, a tool's
    `--allow-pickle`), which unpickles arbitrary objects (it can run code: trusted files only) and
    warns.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    if not head.startswith((_ZIP_MAGIC, _PICKLE_MAGIC)):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a torch.save zip "
                              f"archive nor a pickle; it starts with bytes {head!r})")
    try:
        # torch's note on a plain pickle's protocol: we explain it below
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - classified below, the file named
        err = e
    text = str(err)
    if head.startswith(_ZIP_MAGIC) and "Unsupported global" not in text:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint (the archive cannot be "
                              f"read: {text.splitlines()[0][:200]})") from err
    if not head.startswith(_ZIP_MAGIC) and "Unsupported global" not in text:
        # not torch's format: a plain pickle? Read it with every global refused (nothing can run),
        # so that a pickled list or dict is reported as what it is
        try:
            with open(path, "rb") as f:
                return _NoGlobalsUnpickler(f).load()
        except _GlobalRefused as e:
            text = f"Unsupported global: {e}"
        except Exception as e:  # noqa: BLE001 - truncated or random bytes
            raise CheckpointError(f"{path}: not a checkpoint (neither a torch.save archive nor a "
                                  f"readable pickle: {type(e).__name__}: {str(e)[:120]})") from err
    return _load_pickled(path, text, err, allow_pickle)


def _load_pickled(path: str, text: str, err: Exception, allow_pickle: bool) -> Any:
    """A file that pickles classes or functions (an argparse Namespace, numpy objects, ...):
    refused unless the caller or the command line trusts it, then unpickled with a warning."""
    trusted = os.path.realpath(path) in _TRUSTED
    if not (allow_pickle or trusted):
        what = (
            text[text.index("GLOBAL") :].split(" was not")[0]
            if "GLOBAL" in text
            else "Python objects"
        )
        raise CheckpointError(
            f"{path}: holds pickled Python objects ({what}); safe loading (weights_only=True) "
            f"refuses them. {CONVERT_HINT} (from Python: allow_pickle=True)") from err
    how = (
        "by --allow-pickle on the command line" if trusted else "by the caller (allow_pickle=True)"
    )
    warnings.warn(f"{path}: unpickling with weights_only=False as requested {how}: this can run "
                  "arbitrary code; do it only for files you trust", stacklevel=3)
    try:
        # the one guarded full unpickling of the library (tests/test_bad_inputs.py checks it stays
        # so)
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - the file named
        raise CheckpointError(f"{path}: not a checkpoint (unpickling failed: {type(e).__name__}: "
                              f"{str(e)[:200]})") from e


def _unwrap_container(obj: Any, path) -> tuple[dict, dict]:
    """(flat tensor dict, meta) from the checkpoint's top-level object."""
    meta = {}
    for _ in range(3):  # wrappers can nest: {"state_dict": {"model": ...}}
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path}: not a checkpoint: it holds a {type(obj).__name__}, "
                                  "expected a dict of tensors")
        if isinstance(obj.get("meta"), Mapping):
            meta = dict(obj["meta"])
        if any(isinstance(v, torch.Tensor) for v in obj.values()) and not any(
                isinstance(obj.get(w), Mapping) for w in _WRAPPERS):
            break
        inner = next((obj[w] for w in _WRAPPERS if isinstance(obj.get(w), Mapping)), None)
        if inner is None:
            break
        obj = inner
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: no tensors found (top-level keys: {sorted(obj)[:20]})")
    return tensors, meta


def _strip_prefix(state: Mapping[str, torch.Tensor], arch: str | None) -> tuple[dict, str]:
    """Choose the prefix under which most backbone keys sit, and strip it.

    AlignMixup keeps the trunk under `module.model.` and the classifier under `module.classifier.`:
    a `<x>model.` prefix also maps `<x>classifier.` to `fc.`.
    """
    archs = [arch] if arch else list(VIT_ARCHS if looks_like_vit(state) else RESNET_ARCHS)
    wanted = set().union(*(expected_shapes(a) for a in archs))
    best, best_prefix, best_hits = None, "", -1
    for prefix in _PREFIXES:
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if prefix.endswith("model."):
            head = prefix[: -len("model.")] + "classifier."
            sub.update({"fc." + k[len(head):]: v for k, v in state.items() if k.startswith(head)})
        hits = len(wanted & set(sub))
        if hits > best_hits:
            best, best_prefix, best_hits = sub, prefix, hits
    return best, best_prefix


def _check_keys(backbone: Mapping[str, torch.Tensor], arch: str, path) -> None:
    shapes = expected_shapes(arch)
    missing = sorted(set(shapes) - set(backbone))
    unexpected = sorted(set(backbone) - set(shapes))
    misshaped = sorted(f"{k}: checkpoint {tuple(backbone[k].shape)} vs {arch} {shapes[k]}"
                       for k in set(shapes) & set(backbone)
                       if tuple(backbone[k].shape) != shapes[k])
    if missing or unexpected or misshaped:
        def show(items):
            return f"{len(items)} {items[:12]}{' ...' if len(items) > 12 else ''}"
        raise CheckpointError(
            f"{path}: does not fit {'timm' if arch in VIT_ARCHS else 'torchvision'} {arch}:\n"
            f"  missing keys: {show(missing)}\n"
            f"  unexpected keys: {show(unexpected)}\n  mis-shaped keys: {show(misshaped)}")


def _normalise(path, arch: str | None, allow_pickle: bool) -> tuple[OrderedDict, dict, str]:
    tensors, meta = _unwrap_container(read_checkpoint(path, allow_pickle), path)
    state, _ = _strip_prefix(tensors, arch)
    # Older checkpoints lack BN step counters; they carry no information, so fill them in.
    for k in list(state):
        if k.endswith(".running_mean"):
            state.setdefault(k[: -len("running_mean")] + "num_batches_tracked", torch.tensor(0))
    if arch is None:
        arch = meta.get("arch") if meta.get("arch") in ALL_ARCHS else infer_arch(state)
    if arch not in ALL_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; supported: {list(ALL_ARCHS)}")
    fc = classifier_prefix(arch)
    backbone = {k: v for k, v in state.items() if not k.startswith(fc)}
    # Heads other codebases add (MoCo MLP as fc.0/fc.2, ...) are not part of the backbone.
    _check_keys(backbone, arch, path)
    ordered = OrderedDict((k, state[k]) for k in expected_shapes(arch))
    for k in (fc + "weight", fc + "bias"):
        if k in state:
            ordered[k] = state[k]
    return ordered, meta, arch


def load_backbone(path: str | os.PathLike, arch: str | None = "resnet50",
                  allow_pickle: bool = False) -> OrderedDict:
    """torchvision-keyed backbone state dict (fc excluded) from any supported layout; timm-keyed
    for a ViT (head excluded).

    `arch=None` takes the architecture from the checkpoint's meta or infers it from the keys.
    Raises `CheckpointError` listing missing / unexpected / mis-shaped keys when it does not fit.
    """
    state, _, arch = _normalise(path, arch, allow_pickle)
    return OrderedDict((k, v) for k, v in state.items()
                       if not k.startswith(classifier_prefix(arch)))


def load_classifier(path: str | os.PathLike, arch: str | None = None,
                    num_classes: int | None = None,
                    allow_pickle: bool = False) -> tuple[OrderedDict, dict]:
    """(state dict with fc, meta) for a checkpoint that carries its classifier head.

    meta always has "arch" and "num_classes". Raises `CheckpointError` when the head is missing or
    has the wrong number of classes.
    """
    state, meta, arch = _normalise(path, arch, allow_pickle)
    w, b = classifier_prefix(arch) + "weight", classifier_prefix(arch) + "bias"
    if w not in state or b not in state:
        raise CheckpointError(f"{path}: no classifier head ({w} / {b}) in the checkpoint")
    n = int(state[w].shape[0])
    if num_classes is not None and n != num_classes:
        raise CheckpointError(
            f"{path}: classifier head {w} has {n} classes (shape {tuple(state[w].shape)}), "
            f"the dataset has {num_classes}")
    expected_in = feature_dim(arch)
    if state[w].shape[1] != expected_in or tuple(state[b].shape) != (n,):
        raise CheckpointError(f"{path}: mis-shaped head: {w} {tuple(state[w].shape)}, "
                              f"{b} {tuple(state[b].shape)} for {arch}")
    meta = dict(meta)
    meta.update(arch=arch, num_classes=n)
    return state, meta


def resnet_from_checkpoint(path: str | os.PathLike, arch: str | None = None,
                           num_classes: int | None = None,
                           allow_pickle: bool = False) -> tuple[torchvision.models.ResNet, dict]:
    """A torchvision ResNet classifier with the checkpoint's weights loaded strictly, and its
    meta."""
    state, meta = load_classifier(path, arch, num_classes, allow_pickle)
    if meta["arch"] in VIT_ARCHS:
        raise CheckpointError(f"{path}: holds a Vision Transformer ({meta['arch']}), not a "
                              "ResNet: this stage needs a ResNet backbone (one of "
                              f"{list(RESNET_ARCHS)})")
    model = build_resnet(meta["arch"], num_classes=meta["num_classes"])
    model.load_state_dict(state, strict=True)
    return model, meta


def classifier_from_checkpoint(path: str | os.PathLike, arch: str | None = None,
                               num_classes: int | None = None,
                               allow_pickle: bool = False) -> tuple[torch.nn.Module, dict]:
    """The checkpoint's classifier, whatever its family (a torchvision ResNet or a timm ViT), with
    its weights loaded strictly, and its meta."""
    state, meta = load_classifier(path, arch, num_classes, allow_pickle)
    model = build_network(meta["arch"], num_classes=meta["num_classes"])
    model.load_state_dict(state, strict=True)
    return model, meta
