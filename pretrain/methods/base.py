"""What every mixing method shares: the `Method` base class, the `ResNetStages` model, the samplers
and the losses.

Conventions of the method modules
- A mini-batch has b examples; `perm` is a LongTensor [b] (the partner of example i is `perm[i]`).
- Targets are soft label matrices y [b, c] whose rows sum to 1 (`one_hot`).
- `lam` is the weight of the *first* input: mix(x, x', lam) = lam * x + (1 - lam) * x'.
- The math is pure functions over tensors, with the randomness passed in: every sampler takes a
  `torch.Generator` (on the device where the draws are wanted) or the draw itself (a box centre, a
  lam); nothing touches a global RNG, so a test can pin every draw.
- Nothing reads a value back from the device except PuzzleMix's graph cut, which runs on the host
  by the authors' algorithm (one transfer per batch: `puzzlemix.puzzle_masks`): no `.item()`, no
  loop on a device value, no shape that depends on the data.
- Images are [b, 3, h, w] in [0, 1]; masks are [b, 1, h, w] with 1 = keep the first image.
- Under autocast (bf16 / fp16 training) the feature mixes run in the features' dtype, while the
  math that must stay fp32 runs with autocast off (`mixup_transfer.core.runtime.autocast_off`; a
  `.float()` operand of a matmul or einsum would otherwise be cast back): the soft targets (rows
  sum to 1), the mixed-logit losses of MultiMix and Dense MultiMix (their log-softmax of
  Lambda-weighted logits) and Dense MultiMix's attention.

Layer indices (where feature-space methods mix): 0 = input pixels, 1..4 = after layer1..layer4
(feature maps), 5 = embedding (after global average pooling, before fc).

Draws come from two streams that the trainer seeds before every micro-batch (`Method.seed`), so a
run is repeatable and resumable: draws that steer Python control flow or that the host needs (lam,
which layer or mode, a box, a PuzzleMix grid, the branch of a probability) come from
`self.host_rng`, a numpy Generator, so that nothing is read back from the device; tensors used only
on the device (permutations, Dirichlet weights) come from `self.generator`, a torch.Generator on
the model's device.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mixup_transfer.core.checkpoint import build_network, build_resnet, is_vit
from mixup_transfer.core.constants import IMAGENET_MEAN, IMAGENET_STD
from pretrain.adapters import EMBEDDING, Backbone, ViTBackbone, adapt, resnet_stages


def sample_log_gamma(alpha: torch.Tensor, generator: torch.Generator
                     | None = None) -> torch.Tensor:
    """log of Gamma(alpha, 1) draws, elementwise; alpha > 0, any shape, drawn with `generator`.

    torch's Gamma sampler (Marsaglia & Tsang's rejection loop runs inside the kernel, per entry, so
    no shape depends on the data and nothing is read back from the device) on a = alpha + 1 where
    alpha < 1, with the boost Gamma(alpha) = Gamma(alpha + 1) * U^(1/alpha); returned in the log
    domain so that small alphas never underflow to 0 (Dirichlet weights are a softmax of these).
    alpha is not checked here (that would read the device): the samplers below check their float
    parameters.
    """
    alpha = alpha.to(torch.float32) if not alpha.is_floating_point() else alpha
    boost = alpha < 1
    a = torch.where(boost, alpha + 1, alpha)
    out = torch.log(torch._standard_gamma(a, generator=generator))  # a >= 1: never 0
    u = torch.rand(alpha.shape, generator=generator, device=a.device,
                   dtype=a.dtype).clamp_min(1e-30)
    return torch.where(boost, out + torch.log(u) / alpha, out)


def _check_shape(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0 (a Gamma / Beta / Dirichlet shape parameter), got "
                         f"{value}")


def sample_beta(alpha: float, beta: float, size, generator: torch.Generator | None = None,
                device=None) -> torch.Tensor:
    """Beta(alpha, beta) draws of shape `size` (float32), via two Gamma draws (made in one
    call)."""
    _check_shape("alpha", alpha)
    _check_shape("beta", beta)
    size = (size,) if isinstance(size, int) else tuple(size)
    shape = torch.full((2, *size), float(alpha), device=device)
    shape[1] = float(beta)
    ga, gb = sample_log_gamma(shape, generator)
    return torch.sigmoid(ga - gb)


def sorted_betas(k: int, alpha: float, generator: torch.Generator | None = None,
                 device=None) -> torch.Tensor:
    """multi-mix: K draws from Beta(alpha, alpha) sorted ascending, lam_1 <= ... <= lam_K. [K]"""
    return torch.sort(sample_beta(alpha, alpha, k, generator, device)).values


def dirichlet_weights(b: int, n: int, alpha_low: float = 0.5, alpha_high: float = 2.0,
                      generator: torch.Generator | None = None, m: int | None = None,
                      sets: int | None = None, device=None) -> torch.Tensor:
    """MultiMix interpolation matrix Lambda [b, n] (or [sets, b, n]); every column on the simplex.

    Column k ~ Dir(alpha_k * 1_m) with alpha_k ~ U[alpha_low, alpha_high] drawn per column
    (alpha_low == alpha_high gives a fixed alpha). With m < b each column is supported on its own
    uniformly random m-subset of the b examples (zeros elsewhere), as in the paper's m ablation.
    `sets` adds a leading dimension of independent matrices (one per spatial position, Dense
    MultiMix).
    """
    if not 1 <= (m or b) <= b:
        raise ValueError(f"m must be in [1, b={b}], got {m}")
    _check_shape("alpha_low", alpha_low)
    if alpha_high < alpha_low:
        raise ValueError(f"alpha_high ({alpha_high}) must be >= alpha_low ({alpha_low})")
    lead = () if sets is None else (sets,)
    u = torch.rand(lead + (1, n), generator=generator, device=device)
    alpha = alpha_low + (alpha_high - alpha_low) * u
    logg = sample_log_gamma(alpha.expand(lead + (b, n)).contiguous(), generator)
    if m is not None and m < b:
        scores = torch.rand(lead + (b, n), generator=generator, device=device)
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep.scatter_(-2, scores.topk(m, dim=-2).indices, True)
        logg = logg.masked_fill(~keep, float("-inf"))
    return torch.softmax(logg, dim=-2)


def one_hot(labels: torch.Tensor, num_classes: int, dtype=torch.float32) -> torch.Tensor:
    """labels [b] int -> y [b, c]. A scatter into zeros: no int64 intermediate, and on CUDA no
    range check read back to the host (an out-of-range label fails the scatter's own bounds check
    instead)."""
    y = torch.zeros(*labels.shape, num_classes, dtype=dtype, device=labels.device)
    return y.scatter_(-1, labels.long().unsqueeze(-1), 1)


def soft_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """H(Y, softmax(logits)) averaged over rows. logits, y: [n, c]."""
    return -(y * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def dense_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy at every position with the example's (mixed) target, averaged over examples
    and positions ("dense loss", MultiMix paper Table 10). logits [n, c, r], y [n, c]."""
    logp = F.log_softmax(logits.float(), dim=1)
    return -(y.unsqueeze(-1) * logp).sum(1).mean()


def _lam_view(lam, x: torch.Tensor):
    if isinstance(lam, torch.Tensor):
        return (lam.view(-1, *([1] * (x.ndim - 1))) if lam.ndim == 1 else lam).to(x.dtype)
    return lam


def mixup(x: torch.Tensor, perm: torch.Tensor, lam) -> torch.Tensor:
    """lam * x + (1 - lam) * x[perm]. x [b, ...] floating; lam a float, 0-d tensor or [b] tensor.

    Also mixes targets: mixup(y, perm, lam) gives the mixed soft labels. Computed as one
    `torch.lerp` from the partner (x[perm] + lam (x - x[perm])), in place on the gathered copy: one
    new tensor instead of four.
    """
    return x.index_select(0, perm).lerp_(x, _lam_view(lam, x))


def multi_mixup(x: torch.Tensor, perm: torch.Tensor, lams: torch.Tensor) -> torch.Tensor:
    """multi-mix: K mixes of every pair at once. x [b, ...], lams [K] -> [K * b, ...] (block k uses
    lam_k)."""
    lam = lams.to(x.dtype).view(-1, 1, *([1] * (x.ndim - 1)))
    return (lam * x.unsqueeze(0) + (1 - lam) * x[perm].unsqueeze(0)).flatten(0, 1)


def host_to_device(values, device=None, dtype=torch.float32) -> torch.Tensor:
    """Host numbers (a sequence or numpy array) as a tensor on `device`, copied without waiting for
    the device (a pinned buffer and a non-blocking copy on CUDA; a plain pageable copy would
    synchronise)."""
    t = torch.as_tensor(np.asarray(values), dtype=dtype)
    device = torch.device(device) if device is not None else t.device
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class ResNetStages(Backbone):
    """A torchvision ResNet split at its stages, with ImageNet normalisation inside (inputs in [0,
    1]): `pretrain.adapters.Backbone` over `build_resnet(arch)`.

    `self.net` is the plain torchvision ResNet (its state_dict has exactly torchvision's keys; the
    normalisation buffers live outside it and are not persistent).
    """

    def __init__(self, arch: str = "resnet50", num_classes: int = 1000,
                 zero_init_residual: bool = False):
        net = build_resnet(arch, num_classes=num_classes, zero_init_residual=zero_init_residual)
        super().__init__(net, resnet_stages(net), net.fc, None, IMAGENET_MEAN, IMAGENET_STD)
        self.arch = arch


class ViTStages(ViTBackbone):
    """A timm Vision Transformer of `mixup_transfer.core.vits` (ViT-S/16, the toy ViT) as four
    groups of blocks, with ImageNet normalisation inside: `pretrain.adapters.ViTBackbone` over
    `build_network(arch)`. `self.net` is the plain timm model (its state_dict has exactly timm's
    keys)."""

    def __init__(self, arch: str = "vit_small_patch16_224", num_classes: int = 1000,
                 zero_init_residual: bool = False):
        if zero_init_residual:
            raise ValueError(f"zero_init_residual is for BN-ended residual blocks; {arch} is a "
                             "Vision Transformer")
        super().__init__(build_network(arch, num_classes=num_classes), IMAGENET_MEAN, IMAGENET_STD)
        self.arch = arch


def network_stages(arch: str, num_classes: int = 1000,
                   zero_init_residual: bool = False) -> Backbone:
    """The stage interface over a randomly initialised network of the checkpoint contract:
    `ViTStages` for a ViT, `ResNetStages` otherwise."""
    cls = ViTStages if is_vit(arch) else ResNetStages
    return cls(arch, num_classes, zero_init_residual)


def dense_features(model: nn.Module, fmap: torch.Tensor) -> torch.Tensor:
    """The dense features [b, d, h, w] of a last-stage output: the adapter's `dense_map` (a ViT's
    patch tokens on their grid), or the map itself for a model without one (a CNN's stage
    interface)."""
    dense_map = getattr(model, "dense_map", None)
    return fmap if dense_map is None else dense_map(fmap)


class Method(nn.Module):
    """Base: holds the model, the class count, the generator and the shared classifier/loss
    helpers.

    dense_loss: apply the loss at every position of the layer4 map (fc as 1x1 conv) with the
    example's mixed target (MultiMix paper, Table 10), instead of after global pooling.
    """

    # which published form the class reproduces where a method has several (recorded in the
    # checkpoint meta)
    variant = ""
    # whether a step may leave parameters without a gradient (modes that use different heads): DDP
    # must be told
    find_unused_parameters = False
    # whether the method needs a frozen teacher network (SuperMix): the pretraining task loads the
    # checkpoint that the config's `teacher` key names and sets `teacher`; a method without this
    # flag refuses one
    needs_teacher = False
    # the teacher: images [b, 3, h, w] in [0, 1] -> logits [b, c]; in eval mode, no gradients, on
    # the method's device; never a submodule (`__setattr__`): not trained, not in the state dict,
    # not moved by `.to`
    teacher: nn.Module | None = None

    def __init__(self, model: nn.Module, num_classes: int, dense_loss: bool = False):
        super().__init__()
        self.model = adapt(model)  # any network: `pretrain.adapters` gives it the stage interface
        self.num_classes = num_classes
        self.dense_loss = dense_loss
        self.generator: torch.Generator | None = None  # device draws
        self.host_rng = np.random.default_rng(0)  # host draws (see the module docstring)
        # host draws every rank makes alike (no broadcast needed)
        self.shared_rng = np.random.default_rng(0)

    @classmethod
    def uses_teacher(cls, knobs: dict) -> bool:
        """Whether the method built with `knobs` reads a teacher: the class flag, unless a knob
        decides it."""
        return cls.needs_teacher

    def __setattr__(self, name, value):
        if name == "teacher":  # frozen and outside the module tree (see the class attribute)
            if value is not None:
                value.eval().requires_grad_(False)
            object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)

    # -- randomness -------------------------------------------------------------------------------
    def seed(self, seed: int, shared: int | None = None) -> None:
        """Seed the streams: the device generator (when set), the host generator, and the host
        generator that is the same on every rank (`shared`: a rank-independent seed; default
        `seed`)."""
        if self.generator is not None:
            self.generator.manual_seed(seed)
        self.host_rng = np.random.default_rng(seed)
        self.shared_rng = np.random.default_rng(seed if shared is None else shared)

    def _device(self) -> torch.device:
        return self.model.fc.weight.device

    def _rand(self) -> float:
        return float(self.host_rng.random())

    def _perm(self, b: int) -> torch.Tensor:
        return torch.randperm(b, generator=self.generator, device=self._device())

    def _beta(self, alpha: float) -> float:
        if not alpha > 0:
            raise ValueError(f"Beta parameter alpha must be > 0, got {alpha}")
        return float(self.host_rng.beta(alpha, alpha))

    def _sorted_betas(self, k: int, alpha: float) -> list[float]:
        """K draws from Beta(alpha, alpha), ascending (multi-mix)."""
        if not alpha > 0:
            raise ValueError(f"Beta parameter alpha must be > 0, got {alpha}")
        return np.sort(self.host_rng.beta(alpha, alpha, k)).tolist()

    def _centre(self, h: int, w: int) -> tuple[int, int]:
        """A uniform box centre (row, column), as CutMix's rand_bbox draws it."""
        return int(self.host_rng.integers(h)), int(self.host_rng.integers(w))

    def _choice(self, options):
        return options[int(self.host_rng.integers(len(options)))]

    def _on_device(self, values) -> torch.Tensor:
        return host_to_device(values, self._device())

    # -- heads ------------------------------------------------------------------------------------
    def logits_of(self, fmap: torch.Tensor) -> torch.Tensor:
        """[b, c] (pooled) or [b, c, r] (dense loss) from a layer4 map."""
        if self.dense_loss:
            return self.model.dense_logits(dense_features(self.model, fmap))
        return self.model.fc(self.model.pool(fmap))

    @staticmethod
    def loss_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (
            dense_cross_entropy(logits, y) if logits.ndim == 3 else soft_cross_entropy(logits, y)
        )

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        return one_hot(labels, self.num_classes)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Clean-image logits for evaluation (methods with their own head override this)."""
        return self.model(images)

    def export_head(self) -> dict | None:
        """The classifier's layers between layer4 and fc for the exported backbone
        (mixup_transfer.core.checkpoint.check_head);
        None when fc follows global average pooling."""
        return None


def mix_at(method: Method, images, perm, lams, layer: int):
    """Mix pairs at `layer` with K weights lams [K] and return logits [K*b, c(, r)].

    At the embedding (layer 5) the classifier is linear and each pair's weights sum to 1, so the
    b logit vectors are mixed instead of the embeddings (identical up to rounding, far cheaper).
    """
    model = method.model
    if layer >= EMBEDDING:
        return multi_mixup(method.logits_of(model.features(images)), perm, lams)
    h = model.forward_to(images, layer)
    return method.logits_of(model.forward_from(multi_mixup(h, perm, lams), layer))
