"""The method registry: `build_method(name, model, num_classes, **knobs)` and the names it accepts
(`METHODS`).

A method is a small module, `method(images, targets) -> {"loss": ..., ...}`: every method wraps the
same `ResNetStages` model (or any network `pretrain.adapters` gives the stage interface) and
returns a dict whose tensors named `loss*` are summed by the trainer; `logits` (clean predictions,
ERM only) feed the train accuracy. The training loop never asks which method it runs. Knobs are
constructor keyword arguments whose defaults are the papers' defaults; `build_method` rejects
unknown names and knobs with the valid ones listed.

One module per family holds its classes and their math (`base` what they share; conventions, layer
indices and the random streams are described there):

    mixup         ERM, input mixup, manifold mixup
    cutmix        CutMix
    puzzlemix     PuzzleMix (saliency, energy, transport); its graph cut in puzzlemix_graphcut
    multimix      MultiMix and Dense MultiMix (Venkataramanan et al.)
    multi_interp  K sorted interpolations of every pair (Shen et al.'s multi-mix)
    alignmix      AlignMix: the released code's variant, the paper's stage-2 encoder, AlignMix/AE
    zeta_mixup    zeta-mixup
    comixup       Co-Mixup (joint saliency-guided masks of a partition); its optimisation in
                  comixup_graphcut
    tokenmix      TokenMix (token-level masks; a teacher's activation maps or the area assign
                  the labels)
    transmix      TransMix (Chen et al.): Mixup / CutMix with attention-weighted labels, for
                  Vision Transformers
    saliencymix   SaliencyMix (a CutMix box on the saliency peak)
    supermix      SuperMix (masks optimised under a frozen teacher)
"""

from __future__ import annotations

import inspect

from pretrain.methods.alignmix import AlignMix, AlignMixAE, AlignMixStage2
from pretrain.methods.base import Method, ResNetStages, ViTStages, network_stages
from pretrain.methods.comixup import CoMixup
from pretrain.methods.cutmix import CutMix
from pretrain.methods.mixup import ERM, InputMixup, ManifoldMixup
from pretrain.methods.multi_interp import MultiInterp
from pretrain.methods.multimix import DenseMultiMix, MultiMix
from pretrain.methods.puzzlemix import PuzzleMix
from pretrain.methods.puzzlemix_graphcut import have_gco
from pretrain.methods.saliencymix import SaliencyMix
from pretrain.methods.supermix import SuperMix
from pretrain.methods.tokenmix import TokenMix
from pretrain.methods.transmix import TransMix
from pretrain.methods.zeta_mixup import ZetaMixup

__all__ = ["METHODS", "RENAMED", "Method", "ResNetStages", "ViTStages", "build_configured",
           "build_method", "check_method_config", "have_gco", "method_knobs", "network_stages"]

METHODS = {
    "erm": ERM,
    "input_mixup": InputMixup,
    "manifold_mixup": ManifoldMixup,
    "cutmix": CutMix,
    "puzzlemix": PuzzleMix,
    "multimix": MultiMix,
    "dense_multimix": DenseMultiMix,
    "multi_interp": MultiInterp,
    "alignmix": AlignMix,
    "alignmix_stage2": AlignMixStage2,
    "alignmix_ae": AlignMixAE,
    "zeta_mixup": ZetaMixup,
    "tokenmix": TokenMix,
    "comixup": CoMixup,
    "transmix": TransMix,
    "saliencymix": SaliencyMix,
    "supermix": SuperMix,
}
# retired names, each with the one to use instead
RENAMED = {"alignmix_official": "alignmix (the AlignMixup released code's variant)",
           "multi_mix": "multi_interp (Shen et al.'s multiple interpolations; MultiMix is "
                        "multimix)"}


def method_knobs(name: str) -> dict:
    """The knobs of a method and their defaults (the papers' defaults)."""
    cls = _lookup(name)
    # self, model, num_classes
    params = list(inspect.signature(cls.__init__).parameters.values())[3:]
    return {p.name: p.default for p in params}


def _lookup(name: str):
    if name in RENAMED:
        raise ValueError(f"method {name!r} was renamed: use {RENAMED[name]}; valid methods: "
                         f"{sorted(METHODS)}")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {sorted(METHODS)}")
    return METHODS[name]


def build_method(name: str, model: ResNetStages, num_classes: int, **knobs) -> Method:
    """METHODS[name](model, num_classes, **knobs), rejecting unknown knobs with the valid ones
    listed."""
    cls = _lookup(name)
    valid = method_knobs(name)
    unknown = sorted(set(knobs) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {name!r}; valid: "
                         f"{sorted(valid)}")
    return cls(model, num_classes, **knobs)


def build_configured(name: str, model: ResNetStages, num_classes: int, knobs: dict,
                     where: str = "method", name_key: str = "method.name") -> Method:
    """`build_method` at a config's edge: a bad method name, knob name or knob value is a
    ConfigError naming the config key (knobs under `where`, the name at `name_key`), so that a tool
    exits 2 on it like on any other bad config."""
    from mixup_transfer.core.config import ConfigError

    check_method_config(name, knobs, where, name_key)
    try:
        return build_method(name, model, num_classes, **knobs)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where}: {e}") from e


def check_method_config(name: str, knobs: dict, where: str = "method",
                        name_key: str = "method.name") -> None:
    """The method's name and knob names (before any data is read): ConfigError naming the config
    key (the knobs live under `where`, the name under `name_key`)."""
    from mixup_transfer.core.config import ConfigError

    if name not in METHODS:
        renamed = f" (renamed: use {RENAMED[name]})" if name in RENAMED else ""
        raise ConfigError(f"{name_key}: unknown method {name!r}{renamed}; valid methods: "
                          f"{sorted(METHODS)}")
    unknown = sorted(set(knobs) - set(method_knobs(name)))
    if unknown:
        raise ConfigError(f"unknown config key(s) {[f'{where}.{k}' for k in unknown]} for method "
                          f"{name!r}; valid: {sorted(method_knobs(name))}")
