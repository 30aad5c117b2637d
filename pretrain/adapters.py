"""Any classifier as the stages + pooling + linear head that the feature-space methods mix inside.

The methods of `pretrain.methods` (manifold mixup, MultiMix, Dense MultiMix, multi-mix, AlignMix,
...) read a model through six members: `forward_to(x, layer)`, `forward_from(h, layer)`,
`features(x)`, `pool(fmap)`, `fc` (an `nn.Linear`) and `dense_logits(fmap)`, plus `mean` / `std`
(the input normalisation, used by PuzzleMix's saliency). `Backbone` gives them to any network split
into at most four stages:

    from pretrain.adapters import adapt
    from pretrain.methods import build_method

    method = build_method("multimix", adapt(torchvision.models.resnet18(num_classes=10)), 10)
    loss = method(images, labels)["loss"]

`adapt` splits a torchvision ResNet at layer1..layer4, a timm Vision Transformer into four groups
of blocks (`from_vit`), any other timm model at `forward_features` / `forward_head`;
`from_sequential` splits an `nn.Sequential` where you say. The adapter owns no weights: the wrapped
network is `backbone.net`, trained in place, its `state_dict` keys unchanged under `net.`.

Layer indices: 0 = the input, 1..n = after stage 1..n (n <= 4), 5 = the embedding (after `pool`,
before `fc`).

Dense features (`dense_map`: what Dense MultiMix interpolates per position and the dense loss
classifies): the last stage's map [b, d, h, w] for a CNN; for a ViT the patch tokens after the
final norm, laid out on their grid.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

EMBEDDING = 5  # the layer index of the pooled embedding
MAX_STAGES = 4


class Backbone(nn.Module):
    """A network seen as `stages` (callables, applied in turn; the last one gives the feature map),
    `pool` (feature map -> embedding [b, d]; default: mean over the positions) and `fc` (nn.Linear,
    embedding -> logits).

    net: the module that owns every parameter of stages, pool and fc (checked: a stage outside it
    would not be trained or saved). mean, std: sequences of per-channel values; when given, inputs
    are normalised inside (x - mean) / std at the start of stage 1, so the methods mix images in
    pixel units (0..1) as the toolkit's trainer does; without them the network sees its input as
    given (identity mean 0 / std 1). Feature maps are [b, d, h, w] (dense losses need this layout)
    or [b, d] (then `pool` is the identity).
    """

    def __init__(self, net: nn.Module, stages: Sequence[Callable], fc: nn.Linear,
                 pool: Callable | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None):
        super().__init__()
        if not isinstance(fc, nn.Linear):
            raise TypeError("the head fc must be an nn.Linear (the methods mix logits "
                            f"linearly), got {type(fc).__name__}")
        if not 1 <= len(stages) <= MAX_STAGES:
            raise ValueError(f"a backbone has 1..{MAX_STAGES} stages (layer indices 1..4; 5 is "
                             f"the embedding), got {len(stages)}")
        self.net = net
        _check_owned(net, list(stages) + [fc, pool])
        # views of net's modules, kept out of the module tree so that nothing is registered twice
        object.__setattr__(self, "_stages", tuple(stages))
        object.__setattr__(self, "_fc", fc)
        object.__setattr__(self, "_pool_fn", pool)
        self.normalise = mean is not None
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        mean_t = torch.tensor(mean if mean is not None else [0.0]).view(1, -1, 1, 1)
        std_t = torch.tensor(std if std is not None else [1.0]).view(1, -1, 1, 1)
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("std", std_t, persistent=False)
        self._compiled = None
        self.compile_fallbacks = 0  # stages that dynamo gave up compiling (see enable_compile)
        # (dynamo's frame count, its recompile-limit hits) at the last look
        self._dynamo_seen = (-1, 0)

    @property
    def num_stages(self) -> int:
        return len(self._stages)

    @property
    def fc(self) -> nn.Linear:
        return self._fc

    def enable_compile(self, backend: str = "inductor", mode: str | None = None) -> None:
        """torch.compile each stage as its own region (the module tree and state_dict keys stay the
        network's own).

        Dynamo keeps compiled graphs, and counts recompilations against
        `torch._dynamo.config.recompile_limit`, per code object: each stage runs through a function
        with its own code object, so the stages do not share one budget, and the batch dimension is
        marked dynamic, so batch sizes (a method's mixed batches, the last val batch) share one
        graph. A stage then needs one graph per grad mode (training, evaluation), per dtype and per
        memory format. Where dynamo still reaches the limit it runs that stage eagerly; this is
        logged as a warning naming the stage (`compile_fallbacks` counts them). A copy
        (`copy.deepcopy`, pickle) starts uncompiled."""
        import torch._dynamo  # 2 s to import: only when compiling

        self._compiled = tuple(torch.compile(_stage_function(self, i), backend=backend, mode=mode)
                               for i in range(1, self.num_stages + 1))
        self._dynamo_seen = (-1, recompile_limit_hits())

    def __getstate__(self) -> dict:
        # the compiled regions run this instance's stages: a copy (deepcopy, pickle) starts
        # uncompiled
        return {**self.__dict__, "_compiled": None, "_dynamo_seen": (-1, 0)}

    def _stage(self, i: int, h: torch.Tensor) -> torch.Tensor:
        if i == 1 and self.normalise:
            h = (h - self.mean.to(h.dtype)) / self.std.to(h.dtype)
        return self._stages[i - 1](h)

    def _run_stage(self, i: int, h: torch.Tensor) -> torch.Tensor:
        if self._compiled is None:
            return self._stage(i, h)
        torch._dynamo.maybe_mark_dynamic(h, 0)
        out = self._compiled[i - 1](h)
        # dynamo looked at a frame in this call
        if _dynamo_counters()["frames"]["total"] != self._dynamo_seen[0]:
            self._report_fallback(i)
        return out

    def _report_fallback(self, i: int) -> None:
        hits = recompile_limit_hits()
        new = hits - self._dynamo_seen[1]
        self._dynamo_seen = (_dynamo_counters()["frames"]["total"], hits)
        if new > 0:
            self.compile_fallbacks += new
            log.warning("torch.compile: stage %d of %s reached "
                        "torch._dynamo.config.recompile_limit (%d graphs); inputs that match "
                        "none of its graphs run eagerly (TORCH_LOGS=recompiles prints why it "
                        "recompiled)", i, type(self.net).__name__,
                        torch._dynamo.config.recompile_limit)

    def _check_layer(self, layer: int) -> None:
        if not (0 <= layer <= self.num_stages or layer == EMBEDDING):
            raise ValueError(f"layer {layer} is not a mixing point of this backbone: 0 (input), "
                             f"1..{self.num_stages} (after each stage) or {EMBEDDING} (embedding)")

    def forward_to(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Features after `layer` (0..n; the embedding index gives the feature map) of inputs x."""
        self._check_layer(layer)
        for i in range(1, min(layer, self.num_stages) + 1):
            x = self._run_stage(i, x)
        return x

    def forward_from(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """The feature map (the last stage's output) from features after `layer` (0..n)."""
        self._check_layer(layer)
        for i in range(layer + 1, self.num_stages + 1):
            h = self._run_stage(i, h)
        return h

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's output: [b, d, h, w] (or [b, d])."""
        return self.forward_from(x, 0)

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        """Feature map -> embedding [b, d]."""
        if self._pool_fn is not None:
            return self._pool_fn(fmap)
        return fmap if fmap.ndim == 2 else fmap.mean(tuple(range(2, fmap.ndim)))

    def dense_map(self, fmap: torch.Tensor) -> torch.Tensor:
        """The dense features of a last-stage output: [b, d, h, w] (or [b, d]), on which fc applies
        per position. For this class the feature map itself, which needs the default global-average
        pooling (then the mean of the dense logits over the positions is the model's logits)."""
        if self._pool_fn is not None:
            raise ValueError("dense losses (dense_loss, Dense MultiMix) apply fc at every "
                             "position of the feature map, which needs a backbone pooled by "
                             "global averaging (pool=None)")
        return fmap

    def dense_logits(self, fmap: torch.Tensor) -> torch.Tensor:
        """fc applied at every position (a 1x1 convolution) of dense features (`dense_map`): [b, d,
        h, w] -> [b, c, h*w]."""
        if fmap.ndim == 2:
            fmap = fmap.unsqueeze(-1)
        w, bias = self.fc.weight, self.fc.bias
        logits = torch.einsum("bdr,cd->bcr", fmap.flatten(2), w.to(fmap.dtype))
        return logits if bias is None else logits + bias.to(fmap.dtype).view(1, -1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)))


def _stage_function(backbone: Backbone, i: int) -> Callable:
    """`backbone._stage(i, h)` as a function of h with a code object of its own (named stage<i>):
    dynamo's cache and recompile limit are per code object, and a closure alone would share the
    code of every stage."""
    def stage(h):
        return backbone._stage(i, h)

    code = stage.__code__.replace(co_name=f"stage{i}")
    return types.FunctionType(code, stage.__globals__, f"stage{i}", None, stage.__closure__)


def _dynamo_counters():
    from torch._dynamo.utils import counters

    return counters


def recompile_limit_hits() -> int:
    """How many times dynamo reached a recompile limit in this process (and ran that frame eagerly
    after)."""
    return sum(n for reason, n in _dynamo_counters()["unimplemented"].items()
               if "recompile limit" in reason.lower() or "cache_size_limit" in reason.lower())


def _check_owned(net: nn.Module, parts) -> None:
    owned = {id(p) for p in net.parameters()}
    for part in parts:
        if isinstance(part, nn.Module) and any(id(p) not in owned for p in part.parameters()):
            raise ValueError(f"a stage, pool or head ({type(part).__name__}) has parameters "
                             "outside the wrapped network: they would be neither trained by its "
                             "optimiser nor saved with it")


def resnet_stages(net: nn.Module) -> list[nn.Module]:
    """A torchvision-layout ResNet's four stages: stem + layer1, layer2, layer3, layer4 (views of
    its modules)."""
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
    return [stem, net.layer2, net.layer3, net.layer4]


def from_resnet(net: nn.Module, mean=None, std=None) -> Backbone:
    """A torchvision ResNet (or any module with conv1, bn1, relu, maxpool, layer1..layer4 and fc)
    split at its four stages, pooled by global average as torchvision's forward does."""
    return Backbone(net, resnet_stages(net), net.fc, None, mean, std)


def from_timm(net: nn.Module, mean=None, std=None) -> Backbone:
    """A timm model: one stage `forward_features`, pooled by `forward_head(..., pre_logits=True)`,
    head `get_classifier()` (mixing points: 0 = input, 1 = the feature map, 5 = the embedding)."""
    fc = net.get_classifier()
    return Backbone(net, [net.forward_features], fc, partial(net.forward_head, pre_logits=True),
                    mean, std)


def from_sequential(net: nn.Sequential, stage_ends: Sequence[int], mean=None,
                    std=None) -> Backbone:
    """An nn.Sequential split after the modules at `stage_ends` (increasing indices; the last one
    ends the feature extractor). What follows is the head: its last module must be the nn.Linear
    classifier and the modules between (e.g. AdaptiveAvgPool2d + Flatten) are the pooling (none:
    global average pooling)."""
    ends = [int(e) for e in stage_ends]
    if not ends or ends != sorted(set(ends)) or ends[0] < 0 or ends[-1] >= len(net) - 1:
        raise ValueError("stage_ends must be increasing indices of the Sequential before its "
                         f"last module (0..{len(net) - 2}), got {list(stage_ends)}")
    starts = [0] + [e + 1 for e in ends[:-1]]
    stages = [net[s:e + 1] for s, e in zip(starts, ends)]
    pool = net[ends[-1] + 1:-1]
    # the default pooling: dense losses stay available
    if all(_is_global_average(m) for m in pool):
        pool = None
    return Backbone(net, stages, net[-1], pool, mean, std)


def _is_global_average(m: nn.Module) -> bool:
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return m.output_size in (1, (1, 1))
    return isinstance(m, (nn.Flatten, nn.Identity))


def vit_embed(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A timm ViT's tokens before its first block: patch embedding, class token, position
    embedding. [b, T, d]"""
    return net.norm_pre(net.patch_drop(net._pos_embed(net.patch_embed(x))))


class ViTStage:
    """Blocks start..end - 1 of a timm ViT as one stage, with the embedding first (the first stage)
    and the final norm last (the last stage): tokens [b, T, d] -> tokens. A plain object holding
    the network, so that a copy of the adapter (`copy.deepcopy`) runs its own copy of the
    network."""

    def __init__(self, net: nn.Module, start: int, end: int, first: bool, last: bool):
        self.net, self.start, self.end, self.first, self.last = net, start, end, first, last

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if self.first:
            h = vit_embed(self.net, h)
        for i in range(self.start, self.end):
            h = self.net.blocks[i](h)
        return self.net.norm(h) if self.last else h


def vit_stages(net: nn.Module, n: int = MAX_STAGES) -> list[ViTStage]:
    """A timm ViT's blocks in n consecutive groups of (nearly) equal depth (`ViTStage`): stage 1
    embeds the image first, the last stage ends with the final norm."""
    depth = len(net.blocks)
    n = min(n, depth)
    bounds = [round(i * depth / n) for i in range(n + 1)]
    return [ViTStage(net, bounds[i], bounds[i + 1], i == 0, i == n - 1) for i in range(n)]


def cls_attention(attn: nn.Module, x: torch.Tensor, prefix: int = 1) -> torch.Tensor:
    """The class token's attention over the patch tokens in a timm `Attention` module:
    softmax(q_cls k^T * scale) of each head, averaged over the heads, the columns of the patches
    (the first `prefix` tokens dropped).

    x: the tokens entering the attention (after the block's norm1) [b, T, d] -> [b, T - prefix];
    rows do not sum to 1 (the class token's attention to itself is left out). Only the class query
    is formed."""
    b, t, d = x.shape
    h = attn.num_heads
    w, bias = attn.qkv.weight, attn.qkv.bias
    q = F.linear(x[:, :1], w[:d], None if bias is None
                 else bias[:d]).view(b, 1, h, d // h).transpose(1, 2)
    k = F.linear(x, w[d:2 * d], None if bias is None
                 else bias[d:2 * d]).view(b, t, h, d // h).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    a = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # [b, heads, 1, T]
    return a[:, :, 0, prefix:].mean(1)


class ViTBackbone(Backbone):
    """A timm VisionTransformer as the stage interface: four groups of blocks (`vit_stages`; layer
    indices 1..4 are token tensors [b, T, d]), the embedding = the class token after the final norm
    (timm's `forward_head(..., pre_logits=True)`, global_pool "token"), fc = `net.head`. Dense
    features (`dense_map`) are the patch tokens after the final norm on their square grid [b, d, s,
    s]; `features_and_attention` also gives the last block's class-token attention over the patches
    (TransMix)."""

    # the stages give token tensors [b, T, d], not feature maps (methods that need maps refuse it)
    tokens = True

    def __init__(self, net: nn.Module, mean=None, std=None, stages: int = MAX_STAGES):
        if getattr(net, "global_pool", "token") != "token" or net.cls_token is None:
            raise ValueError("the ViT adapter reads the class token: build the ViT with "
                             "global_pool='token'")
        super().__init__(net, vit_stages(net, stages), net.head,
                         partial(net.forward_head, pre_logits=True), mean, std)
        self.prefix = int(net.num_prefix_tokens)

    def dense_map(self, fmap: torch.Tensor) -> torch.Tensor:
        """Tokens [b, T, d] (the last stage's output, normed) -> the patch tokens [b, d, s, s]."""
        from mixup_transfer.core.vits import vit_grid

        s = vit_grid(fmap.shape[1], self.prefix)
        return fmap[:, self.prefix:].transpose(1, 2).reshape(fmap.shape[0], fmap.shape[2], s, s)

    def features_and_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the last stage's tokens [b, T, d], the last block's class-token attention over the
        patches [b, T - 1], detached). One forward pass: the attention is read from the tokens
        entering the last block."""
        h = self.forward_to(x, self.num_stages - 1)
        net, last = self.net, self.net.blocks[-1]
        if self.num_stages == 1:
            h = vit_embed(net, (h - self.mean.to(h.dtype)) / self.std.to(h.dtype) if self.normalise
                          else h)
        for block in net.blocks[self._stages[-1].start:-1]:
            h = block(h)
        with torch.no_grad():
            attn = cls_attention(last.attn, last.norm1(h), self.prefix)
        return net.norm(last(h)), attn


def from_vit(net: nn.Module, mean=None, std=None) -> ViTBackbone:
    """A timm VisionTransformer split into four groups of blocks (`ViTBackbone`)."""
    return ViTBackbone(net, mean, std)


def is_timm_vit(model: nn.Module) -> bool:
    return all(hasattr(model, a)
               for a in ("blocks", "patch_embed", "cls_token", "_pos_embed", "head", "norm"))


def has_stage_interface(model: nn.Module) -> bool:
    return all(hasattr(model, a)
               for a in ("forward_to", "forward_from", "features", "pool", "fc", "dense_logits"))


def adapt(model: nn.Module, mean=None, std=None) -> nn.Module:
    """The stage interface for `model`: itself when it has it (a Backbone, the toolkit's
    ResNetStages), a split ResNet (conv1 ... layer4, fc), a timm ViT (`from_vit`), another timm
    model (forward_features, forward_head, get_classifier); anything else asks for `Backbone(...)`
    or `from_sequential(...)`."""
    if has_stage_interface(model):
        return model
    if all(hasattr(model, a) for a in ("conv1", "bn1", "relu", "maxpool", "layer4", "fc")):
        return from_resnet(model, mean, std)
    if is_timm_vit(model):
        return from_vit(model, mean, std)
    if all(hasattr(model, a) for a in ("forward_features", "forward_head", "get_classifier")):
        return from_timm(model, mean, std)
    raise TypeError(f"cannot split a {type(model).__name__} into stages and a linear head by "
                    "itself: wrap it with pretrain.adapters.from_sequential(net, stage_ends) or "
                    "Backbone(net, stages, fc, pool)")
