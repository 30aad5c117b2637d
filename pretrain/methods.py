"""Mixing methods as small modules: `method(images, targets) -> {"loss": ..., ...}`.

Every method wraps the same `ResNetStages` model and returns a dict whose tensors named `loss*` are
summed by the trainer; `logits` (clean predictions, ERM only) feed the train accuracy. The training
loop never asks which method it runs. Knobs are constructor keyword arguments whose defaults are
the papers' defaults; `build_method(name, model, num_classes, **knobs)` rejects unknown names and
knobs with the valid ones listed.

Layer indices (where feature-space methods mix): 0 = input pixels, 1..4 = after layer1..layer4
(feature maps), 5 = embedding (after global average pooling, before fc).

Draws come from two streams that the trainer seeds before every micro-batch (`Method.seed`), so a run is
repeatable and resumable: draws that steer Python control flow or that the host needs (lam, which layer or
mode, a box, a PuzzleMix grid, the branch of a probability) come from `self.host_rng`, a numpy Generator, so
that nothing is read back from the device; tensors used only on the device (permutations, Dirichlet weights)
come from `self.generator`, a torch.Generator on the model's device.
"""

from __future__ import annotations

import contextlib
import inspect

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mixup_transfer.core import runtime as rt
from mixup_transfer.core.checkpoint import build_resnet
from mixup_transfer.core.constants import IMAGENET_MEAN, IMAGENET_STD
from pretrain import mixers
from pretrain import mixing as mx
from pretrain.adapters import EMBEDDING, Backbone, adapt, resnet_stages

ATTENTIONS = ("gap_l1relu", "gap_softmax", "cam_l1relu", "cam_softmax", "uniform")


class ResNetStages(Backbone):
    """A torchvision ResNet split at its stages, with ImageNet normalisation inside (inputs in [0, 1]):
    `pretrain.adapters.Backbone` over `build_resnet(arch)`.

    `self.net` is the plain torchvision ResNet (its state_dict has exactly torchvision's keys; the
    normalisation buffers live outside it and are not persistent).
    """

    def __init__(self, arch: str = "resnet50", num_classes: int = 1000, zero_init_residual: bool = False):
        net = build_resnet(arch, num_classes=num_classes, zero_init_residual=zero_init_residual)
        super().__init__(net, resnet_stages(net), net.fc, None, IMAGENET_MEAN, IMAGENET_STD)
        self.arch = arch


class Method(nn.Module):
    """Base: holds the model, the class count, the generator and the shared classifier/loss helpers.

    dense_loss: apply the loss at every position of the layer4 map (fc as 1x1 conv) with the
    example's mixed target (MultiMix paper, Table 10), instead of after global pooling.
    """

    # which published form the class reproduces where a method has several (recorded in the checkpoint meta)
    variant = ""
    # whether a step may leave parameters without a gradient (modes that use different heads): DDP must be told
    find_unused_parameters = False

    def __init__(self, model: nn.Module, num_classes: int, dense_loss: bool = False):
        super().__init__()
        self.model = adapt(model)  # any network: `pretrain.adapters` gives it the stage interface
        self.num_classes = num_classes
        self.dense_loss = dense_loss
        self.generator: torch.Generator | None = None  # device draws
        self.host_rng = np.random.default_rng(0)  # host draws (see the module docstring)
        self.shared_rng = np.random.default_rng(0)  # host draws every rank makes alike (no broadcast needed)

    # -- randomness -------------------------------------------------------------------------------
    def seed(self, seed: int, shared: int | None = None) -> None:
        """Seed the streams: the device generator (when set), the host generator, and the host generator that
        is the same on every rank (`shared`: a rank-independent seed; default `seed`)."""
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
        return mx.host_to_device(values, self._device())

    # -- heads ------------------------------------------------------------------------------------
    def logits_of(self, fmap: torch.Tensor) -> torch.Tensor:
        """[b, c] (pooled) or [b, c, r] (dense loss) from a layer4 map."""
        return self.model.dense_logits(fmap) if self.dense_loss else self.model.fc(self.model.pool(fmap))

    @staticmethod
    def loss_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return mx.dense_cross_entropy(logits, y) if logits.ndim == 3 else mx.soft_cross_entropy(logits, y)

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        return mx.one_hot(labels, self.num_classes)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Clean-image logits for evaluation (methods with their own head override this)."""
        return self.model(images)

    def export_head(self) -> dict | None:
        """The classifier's layers between layer4 and fc for the exported backbone
        (mixup_transfer.core.checkpoint.check_head);
        None when fc follows global average pooling."""
        return None


class ERM(Method):
    """Plain cross-entropy on clean images."""

    def forward(self, images, labels):
        logits = self.logits_of(self.model.features(images))
        out = {"loss": self.loss_of(logits, self.targets(labels))}
        out["logits"] = logits if logits.ndim == 2 else logits.mean(-1)
        return out


class InputMixup(Method):
    """Input mixup: lam ~ Beta(alpha, alpha), one lam and one permutation per batch."""

    def __init__(self, model, num_classes, alpha: float = 1.0, dense_loss: bool = False):
        super().__init__(model, num_classes, dense_loss)
        self.alpha = alpha
        self.mixer = mixers.MixUp(alpha, num_classes)

    def forward(self, images, labels):
        lam, perm = self._beta(self.alpha), self._perm(images.shape[0])
        x, y_mix = self.mixer.apply(images, labels, mixers.Draw(perm, [lam]))
        return {"loss": self.loss_of(self.logits_of(self.model.features(x)), y_mix)}


def _mix_at(method: Method, images, perm, lams, layer: int):
    """Mix pairs at `layer` with K weights lams [K] and return logits [K*b, c(, r)].

    At the embedding (layer 5) the classifier is linear and each pair's weights sum to 1, so the
    b logit vectors are mixed instead of the embeddings (identical up to rounding, far cheaper).
    """
    model = method.model
    if layer >= EMBEDDING:
        return mx.multi_mixup(method.logits_of(model.features(images)), perm, lams)
    h = model.forward_to(images, layer)
    return method.logits_of(model.forward_from(mx.multi_mixup(h, perm, lams), layer))


class ManifoldMixup(Method):
    """Manifold mixup: per batch a layer drawn uniformly from `layers` (0 = input, 1..4 after
    layer1..4, 5 = embedding), lam ~ Beta(alpha, alpha)."""

    def __init__(self, model, num_classes, alpha: float = 2.0, layers=(0, 1, 2), dense_loss: bool = False):
        super().__init__(model, num_classes, dense_loss)
        self.alpha, self.layers = alpha, tuple(int(v) for v in layers)
        if not self.layers or any(not 0 <= v <= EMBEDDING for v in self.layers):
            raise ValueError(f"manifold_mixup layers must be in 0..5, got {layers}")

    def forward(self, images, labels):
        y = self.targets(labels)
        layer = self._choice(self.layers)
        lam, perm = self._beta(self.alpha), self._perm(images.shape[0])
        logits = _mix_at(self, images, perm, self._on_device([lam]), layer)
        return {"loss": self.loss_of(logits, mx.mixup(y, perm, lam))}


class CutMix(Method):
    """CutMix: lam ~ Beta(alpha, alpha), a box of side sqrt(1 - lam) pasted from the partner, label
    weight recomputed from the clipped box; applied with probability `prob` (else plain ERM)."""

    def __init__(self, model, num_classes, alpha: float = 1.0, prob: float = 1.0, dense_loss: bool = False):
        super().__init__(model, num_classes, dense_loss)
        self.alpha, self.prob = alpha, prob
        self.mixer = mixers.CutMix(alpha, num_classes)

    def forward(self, images, labels):
        y = self.targets(labels)
        b, _, h, w = images.shape
        if self._rand() >= self.prob:
            return {"loss": self.loss_of(self.logits_of(self.model.features(images)), y)}
        perm, lam = self._perm(b), self._beta(self.alpha)
        x, y_mix = self.mixer.apply(images, labels, mixers.Draw(perm, [lam], self._centre(h, w)))
        return {"loss": self.loss_of(self.logits_of(self.model.features(x)), y_mix)}


def _saliency_forward(method: Method, images, labels, train_mode: bool, weight: float = 1.0):
    """The saliency forward of the official PuzzleMix scripts: the mean cross-entropy of the clean batch (times
    `weight`) differentiated w.r.t. the *normalised* input, sqrt(mean over channels of grad^2), with the model in
    eval or train mode (the mode is restored after). -> (sal [b, h, w], the weighted loss with its graph when
    train_mode, else None). Under fp16 autocast this pass runs in fp32: the input gradient of a confidently
    classified image underflows fp16 to an all-zero map (bf16 has fp32's range and keeps autocast)."""
    model = method.model
    mean, std = model.mean.to(images.dtype), model.std.to(images.dtype)
    was_training = model.training
    fp16 = rt.autocast_dtype(images.device.type) == torch.float16
    model.train(train_mode)
    try:
        xn = ((images.detach() - mean) / std).requires_grad_(True)
        with torch.enable_grad(), (rt.autocast_off(images.device) if fp16 else contextlib.nullcontext()):
            loss = weight * F.cross_entropy(model(xn * std + mean).float(), labels)
            (grad,) = torch.autograd.grad(loss, xn, retain_graph=train_mode)
    finally:
        model.train(was_training)
    return mx.saliency_map(grad), (loss if train_mode else None)


def _puzzle_saliency(method: Method, images, labels) -> torch.Tensor:
    """PuzzleMix saliency as snu-mllab/PuzzleMix main.py and imagenet/train.py compute it with clean_lam 0: the
    model in eval mode (BatchNorm running statistics, nothing updated), no parameter gradients. -> [b, h, w]."""
    return _saliency_forward(method, images, labels, False)[0]


def _puzzle_saliency_train(method: Method, images, labels, weight: float):
    """The same scripts with clean_lam > 0: the model in train mode (batch statistics; this forward updates the
    running statistics, as there), the gradient of weight * CE, and that weighted clean loss returned with its
    graph: the scripts backpropagate it into the parameters together with the mixed loss.
    -> (sal [b, h, w], loss 0-d)."""
    return _saliency_forward(method, images, labels, True, weight)


class PuzzleMix(Method):
    """PuzzleMix as the official code runs it (snu-mllab/PuzzleMix `mixup.py:mixup_graph`, the CIFAR /
    TinyImageNet `main.py` and the ImageNet `imagenet/train.py`): lam ~ Beta(alpha, alpha), a block grid drawn
    uniformly from `grids`, a 3-label mask from the graph cut of -(revealed saliency) + eta * prior + smoothness
    (beta + gamma * boundary differences of the `neigh_size`-pooled images), the greedy transport of each image's
    salient blocks onto its visible places (t_eps) at resolution `t_size` (pixels; -1 = the mask's blocks, see
    `mixing.transport_grid`), label weight = mask mean. Saliency: see `_puzzle_saliency`; `saliency_mode`
    eval | train. `clean_lam` > 0 adds the official clean-loss term, computed by the train-mode saliency forward:
    clean_lam * CE(clean) with loss ce (imagenet/train.py), 2 * clean_lam / num_classes * CE(clean) with loss bce
    (main.py). loss: ce = soft cross-entropy of the mixed targets (imagenet/train.py's lam-weighted CE); bce =
    main.py's BCELoss(softmax(logits), mixed targets), the mean over examples and classes. Solver: gco-wrapper's
    alpha-beta swap when installed, else the built-in re-implementation of the same algorithm (`solver` knob:
    auto | gco | swap); `threads` solves the per-image graph cuts in a thread pool (None: one per image up to the
    CPU count).
    """

    def __init__(self, model, num_classes, alpha: float = 1.0, grids=(2, 4, 8, 16), beta: float = 1.2,
                 gamma: float = 0.5, eta: float = 0.2, neigh_size: int = 2, n_labels: int = 3,
                 transport: bool = True, t_eps: float = 0.8, t_size: int = -1, clean_lam: float = 0.0,
                 saliency_mode: str = "eval", loss: str = "ce", solver: str = "auto", threads: int | None = None,
                 dense_loss: bool = False):
        super().__init__(model, num_classes, dense_loss)
        self.alpha, self.grids, self.beta, self.gamma, self.eta = alpha, tuple(grids), beta, gamma, eta
        self.neigh_size, self.n_labels, self.transport, self.t_eps = neigh_size, n_labels, transport, t_eps
        self.t_size, self.clean_lam, self.saliency_mode, self.loss = int(t_size), float(clean_lam), saliency_mode, loss
        self.solver, self.threads = solver, threads
        _check_puzzle_knobs(self)
        if solver == "gco" and not mx.have_gco():
            raise ImportError("puzzlemix solver='gco' needs gco-wrapper (pip install gco-wrapper; a regular "
                              "dependency on CPython <= 3.11 x86 / x86-64); use solver=swap or auto for the built-in "
                              "re-implementation")

    def _grid(self, h: int, w: int) -> int:
        if h != w:
            raise ValueError(f"PuzzleMix needs square inputs (the official code does too), got {h}x{w}")
        # the block side must divide the input and be a multiple of neigh_size (or smaller than it)
        ok = [g for g in self.grids if h % g == 0 and (h // g) % min(self.neigh_size, h // g) == 0]
        if not ok:
            raise ValueError(f"no PuzzleMix grid in {self.grids} fits the input size {h}x{w} with "
                             f"neigh_size {self.neigh_size} (block side = size / grid, a multiple of neigh_size)")
        if self.transport:
            for g in ok:  # a t_size that does not divide every drawable block fails at the first step, not later
                mx.transport_grid(h, g, self.t_size)
        return self._choice(ok)

    def saliency(self, images, labels):
        """-> (saliency map [b, h, w], the weighted clean loss (0-d, with its graph) or None); see the class."""
        if self.saliency_mode == "eval":
            return _puzzle_saliency(self, images, labels), None
        weight = self.clean_lam * (2.0 / self.num_classes if self.loss == "bce" else 1.0)
        return _puzzle_saliency_train(self, images, labels, weight if weight > 0 else 1.0)

    def puzzle(self, images, labels, perm, lams, grid, sal_map=None):
        """K PuzzleMix images per pair for weights lams (K host floats): -> (x [K*b, 3, h, w], lam_kept [K*b]).
        The graph cuts of all K run on the host after one device-to-host transfer (`mixing.puzzle_masks`).
        sal_map: the saliency (default: computed here; a clean-loss term needs `forward`, which adds it)."""
        if sal_map is None:
            if self.clean_lam > 0:
                raise ValueError("puzzlemix clean_lam > 0 adds a loss term that only PuzzleMix.forward returns; "
                                 "set clean_lam 0 where PuzzleMix is used as a mixing step (multi_mix puzzle)")
            sal_map = self.saliency(images, labels)[0]
        fill = self.model.mean.to(images.dtype)  # an empty transport place: 0 in the normalised input
        with torch.no_grad():
            x, kept, _ = mx.puzzle_mix_many(images, sal_map.detach(), perm, grid, list(lams), self.beta, self.gamma,
                                            self.eta, self.neigh_size, self.n_labels, self.transport, self.t_eps,
                                            self.solver, fill=fill, threads=self.threads, t_size=self.t_size)
        return x.detach(), kept

    def mixed_loss(self, logits, y_mix):
        """ce: soft cross-entropy (dense if dense_loss); bce: BCELoss(softmax(logits), y_mix) as main.py."""
        if self.loss == "bce":
            return F.binary_cross_entropy(torch.softmax(logits.float(), dim=-1), y_mix.float())
        return self.loss_of(logits, y_mix)

    def forward(self, images, labels):
        y = self.targets(labels)
        b, _, h, w = images.shape
        perm, grid = self._perm(b), self._grid(h, w)
        sal_map, clean = self.saliency(images, labels)
        x, kept = self.puzzle(images, labels, perm, [self._beta(self.alpha)], grid, sal_map)
        logits = self.logits_of(self.model.features(x))
        out = {"loss": self.mixed_loss(logits, mx.mixup(y, perm, kept))}
        if self.clean_lam > 0:
            out["loss_clean"] = clean
        return out


def _check_puzzle_knobs(m: PuzzleMix) -> None:
    """One-line errors for PuzzleMix knob values the official scripts do not define."""
    if m.solver not in ("auto", "gco", "swap"):
        raise ValueError(f"puzzlemix solver must be auto, gco or swap, got {m.solver!r}")
    if m.saliency_mode not in ("eval", "train"):
        raise ValueError(f"puzzlemix saliency_mode must be eval or train, got {m.saliency_mode!r}")
    if m.loss not in ("ce", "bce"):
        raise ValueError(f"puzzlemix loss must be ce or bce, got {m.loss!r}")
    if m.loss == "bce" and m.dense_loss:
        raise ValueError("puzzlemix loss bce (main.py's BCE of the softmax) has no dense form; use loss ce")
    if m.clean_lam < 0:
        raise ValueError(f"puzzlemix clean_lam must be >= 0, got {m.clean_lam}")
    if m.clean_lam > 0 and m.saliency_mode != "train":
        raise ValueError("puzzlemix clean_lam > 0 needs saliency_mode train: the official scripts compute the "
                         "clean loss and the saliency in one train-mode forward")
    if m.t_size != -1 and m.t_size < 1:
        raise ValueError(f"puzzlemix t_size must be -1 (the mask's blocks) or a size in pixels, got {m.t_size}")


class MultiMix(Method):
    """MultiMix: n interpolations of the whole mini-batch with Dirichlet weights, at the embedding.

    With probability `prob` per batch MultiMix, else input mixup (alpha `input_alpha`). Lambda [b, n]
    has columns ~ Dir(alpha_k) with alpha_k ~ U[alpha_low, alpha_high] (equal bounds: fixed alpha);
    `m` < b restricts each column to a random m-subset. At the embedding (layer 5) the logits are
    mixed (g(Z Lambda) = g(Z) Lambda); at layer < 5 the n mixed feature maps run through the rest of
    the network (the paper's layer ablation; costly). dense_loss mixes dense logits with the same
    Lambda at every position (Table 10's "dense loss only").

    global_batch (this toolkit's extension, not in the paper, whose b, m and n are per GPU): under DDP
    the logits g(Z) of every rank are gathered (gradients return to their rank through the gather), so
    each process mixes the global batch of world x b examples (m up to world x b) with its own n
    Dirichlet draws; DDP's gradient average then equals one process holding the whole batch with
    world x n interpolations. The MultiMix / input-mixup coin comes from the rank-independent host stream
    (the same on every rank, no broadcast). Embedding only (layer 5). In one process it changes nothing (the
    local batch is the global batch).
    """

    def __init__(self, model, num_classes, n: int = 1000, m: int | None = None, alpha_low: float = 0.5,
                 alpha_high: float = 2.0, prob: float = 0.5, input_alpha: float = 1.0, layer: int = EMBEDDING,
                 dense_loss: bool = False, global_batch: bool = False):
        super().__init__(model, num_classes, dense_loss)
        self.n, self.m, self.alpha_low, self.alpha_high = n, m, alpha_low, alpha_high
        self.prob, self.input_alpha, self.layer = prob, input_alpha, int(layer)
        self.global_batch = bool(global_batch)
        if self.global_batch and self.layer < EMBEDDING:
            raise ValueError(f"multimix global_batch mixes at the embedding (layer 5) only, got layer {layer}: "
                             "gathering every rank's feature maps would not fit in memory")

    def _branch_draw(self) -> float:
        """The uniform draw that picks MultiMix or input mixup; under global_batch from the rank-independent host
        stream (every rank must take the same branch: only MultiMix gathers), so no broadcast (no sync) is needed."""
        return float((self.shared_rng if self.global_batch else self.host_rng).random())

    def _global_multimix(self, images, labels):
        """global_batch: mix the logits [world*b, c(, r)] of every rank with this rank's Lambda [world*b, n]."""
        logits = rt.gather_with_grad(self.logits_of(self.model.features(images)))
        labels = rt.all_gather(labels)
        lam = self._lambda(labels.shape[0])
        if not self.dense_loss:
            return {"loss": mx.multimix_loss_from_logits(logits, labels, lam)}
        with rt.autocast_off(logits.device):  # fp32 (see pretrain.mixing's conventions)
            mixed = torch.einsum("bc...,bn->nc...", logits.float(), lam)
            return {"loss": self.loss_of(mixed, lam.t() @ self.targets(labels))}

    def _input_mixup(self, images, y):
        lam, perm = self._beta(self.input_alpha), self._perm(images.shape[0])
        logits = self.logits_of(self.model.features(mx.mixup(images, perm, lam)))
        return {"loss": self.loss_of(logits, mx.mixup(y, perm, lam))}

    def _lambda(self, b):
        return mx.dirichlet_weights(b, self.n, self.alpha_low, self.alpha_high, self.generator,
                                    m=min(self.m, b) if self.m else None, device=self._device())

    def forward(self, images, labels):
        y = self.targets(labels)
        if self._branch_draw() >= self.prob:
            return self._input_mixup(images, y)
        if self.global_batch:
            return self._global_multimix(images, labels)
        b = images.shape[0]
        lam = self._lambda(b)  # [b, n]
        if self.layer >= EMBEDDING and not self.dense_loss:  # the fast path: mix b logit vectors
            logits = self.model.fc(self.model.pool(self.model.features(images)))
            return {"loss": mx.multimix_loss_from_logits(logits, labels, lam)}
        with rt.autocast_off(y.device):  # the targets in fp32
            y_mix = lam.t() @ y
        if self.layer >= EMBEDDING:
            logits = self.logits_of(self.model.features(images))  # [b, c] or [b, c, r]
            with rt.autocast_off(logits.device):  # the mixed logits in fp32, as the fast path's
                mixed = torch.einsum("bc...,bn->nc...", logits.float(), lam)
        else:
            h = self.model.forward_to(images, self.layer)
            h_mix = torch.einsum("b...,bn->n...", h, lam.to(h.dtype))
            mixed = self.logits_of(self.model.forward_from(h_mix, self.layer))
        return {"loss": self.loss_of(mixed, y_mix)}


class DenseMultiMix(MultiMix):
    """Dense MultiMix (eqs. (9)-(14)): per-position Dirichlet interpolation of the layer4 map,
    weighted by attention, with the weighted dense loss. Fast path: the dense logit maps are mixed.

    attention: gap_l1relu (default) | gap_softmax | cam_l1relu | cam_softmax | uniform (detached: it
    weights the interpolation, it is not trained through). resolution: average-pool the layer4 map to
    resolution x resolution first (None keeps it; 7x7 for 224 px inputs).

    global_batch: as MultiMix's (this toolkit's extension): the dense logits [world*b, c, r], attention
    and labels of every rank are gathered, and the weighted loss of eq. (14) is normalised by the sum of
    the weights s over every rank's n columns (times world), so that DDP's average equals one process
    with world x n interpolations. Memory: world*b*c*r floats per process (8 x 128 x 1000 x 49: 200 MB).
    """

    def __init__(self, model, num_classes, n: int = 1000, m: int | None = None, alpha_low: float = 0.5,
                 alpha_high: float = 2.0, prob: float = 0.5, input_alpha: float = 1.0,
                 attention: str = "gap_l1relu", resolution: int | None = None, global_batch: bool = False):
        super().__init__(model, num_classes, n, m, alpha_low, alpha_high, prob, input_alpha,
                         global_batch=global_batch)
        if attention not in ATTENTIONS:
            raise ValueError(f"dense_multimix attention must be one of {ATTENTIONS}, got {attention!r}")
        self.attention, self.resolution = attention, resolution

    def forward(self, images, labels):
        y = self.targets(labels)
        if self._branch_draw() >= self.prob:
            return self._input_mixup(images, y)
        fmap = self.model.features(images)
        if self.resolution:
            fmap = F.adaptive_avg_pool2d(fmap, self.resolution)
        z = fmap.flatten(2)  # [b, d, r]
        b, _, r = z.shape
        with torch.no_grad():
            attn = mx.dense_attention(z.detach().float(), self.attention, self.model.fc.weight.float(), y)
        logits = self.model.dense_logits(fmap)
        if self.global_batch:  # every rank's examples (see the class docstring)
            logits, attn, labels = rt.gather_with_grad(logits), rt.all_gather(attn), rt.all_gather(labels)
            b = labels.shape[0]
        lam = mx.dirichlet_weights(b, self.n, self.alpha_low, self.alpha_high, self.generator,
                                   m=min(self.m, b) if self.m else None, sets=r, device=self._device())
        mhat, s = mx.dense_mix_weights(attn, lam)
        if not self.global_batch:
            return {"loss": mx.dense_multimix_loss_from_logits(logits, labels, mhat, s)}
        total = rt.all_reduce_sum(s.float().sum(1))  # [r]: sum of s over every rank's n columns
        loss = mx.dense_multimix_loss_from_logits(logits, labels, mhat, s, weight_total=total)
        return {"loss": loss * rt.world_size()}


class MultiMixK(Method):
    """multi-mix (Shen et al.): K sorted interpolations lam_1 <= ... <= lam_K ~ Beta(alpha, alpha) of
    every pair; the loss is the mean over the K mixed samples.

    base: input | manifold (layer drawn from `layers`; 5 = embedding, logit trick) | cutmix (K nested
    boxes sharing a uniform centre, box k of size H sqrt(lam_k) x W sqrt(lam_k) replaced by the
    partner) | puzzlemix (K masks, one per lam_k, sharing the saliency). alpha None = the base
    method's default (input 1.0, manifold 2.0, cutmix 1.0, puzzlemix 1.0). large_batch: the paper's
    "large-batch mixup" baseline instead (K random pairings per example, one lam), base input/manifold.
    """

    BASES = {"input": 1.0, "manifold": 2.0, "cutmix": 1.0, "puzzlemix": 1.0}

    def __init__(self, model, num_classes, base: str = "puzzlemix", k: int = 5, alpha: float | None = None,
                 layers=(0, 1, 2), puzzle: dict | None = None, large_batch: bool = False,
                 dense_loss: bool = False):
        super().__init__(model, num_classes, dense_loss)
        if base not in self.BASES:
            raise ValueError(f"multi_mix base must be one of {sorted(self.BASES)}, got {base!r}")
        if large_batch and base not in ("input", "manifold"):
            raise ValueError("multi_mix large_batch (the paper's 'large-batch mixup' baseline) needs "
                             "base input or manifold")
        self.large_batch = large_batch
        self.base, self.k = base, int(k)
        self.alpha = self.BASES[base] if alpha is None else alpha
        self.layers = tuple(int(v) for v in layers)
        # the PuzzleMix helper shares the model; kept out of the module tree so it is not registered twice
        object.__setattr__(self, "puzzler",
                           PuzzleMix(model, num_classes, **(puzzle or {})) if base == "puzzlemix" else None)

    def forward(self, images, labels):
        y = self.targets(labels)
        b, _, h, w = images.shape
        perm = self._perm(b)
        lams = self._sorted_betas(self.k, self.alpha)  # host floats
        if self.large_batch:
            # baseline: K random pairings per example, all with one unsorted lam (same cost as multi-mix)
            layer = 0 if self.base == "input" else self._choice(self.layers)
            lam = self._beta(self.alpha)
            perms = [perm] + [self._perm(b) for _ in range(self.k - 1)]
            one = self._on_device([lam])
            logits = torch.cat([_mix_at(self, images, p, one, layer) for p in perms])
            return {"loss": self.loss_of(logits, torch.cat([mx.mixup(y, p, lam) for p in perms]))}
        if self.base in ("input", "manifold"):
            layer = 0 if self.base == "input" else self._choice(self.layers)
            lams = self._on_device(lams)
            logits = _mix_at(self, images, perm, lams, layer)
            return {"loss": self.loss_of(logits, mx.multi_mixup(y, perm, lams))}
        if self.base == "cutmix":  # the library's multi-mix CutMix on these draws
            draw = mixers.Draw(perm, lams, self._centre(h, w))
            x, y_k = mixers.MultiMixK(mixers.CutMix(self.alpha, self.num_classes), self.k).apply(images, labels, draw)
            return {"loss": self.loss_of(self.logits_of(self.model.features(x)), y_k)}
        else:
            self.puzzler.generator, self.puzzler.host_rng = self.generator, self.host_rng
            x, kept = self.puzzler.puzzle(images, labels, perm, lams, self.puzzler._grid(h, w))
        logits = self.logits_of(self.model.features(x))
        kept = kept.view(-1, 1)  # [K*b, 1], block k holds pair weights lam_kept_k
        y_k = kept * y.repeat(self.k, 1) + (1 - kept) * y[perm].repeat(self.k, 1)
        return {"loss": self.loss_of(logits, y_k)}


class _AlignMixBase(Method):
    """The machinery the AlignMix variants share (AlignMixup, Venkataramanan et al., CVPR 2022, arXiv 2103.15375):
    per batch one mode (`_mode`): input (input mixup), feat (the partner's feature tensor A' aligned to A and
    mixed, eq. 12), feat_rev (A aligned to A', eq. 13; the same plan, as the released code's branch 1),
    embedding (mixup of e = f(A), logit trick). lam ~ Beta(alpha, alpha); Sinkhorn in the log domain with `eps`,
    at most `n_iters` iterations, optional early stop `tol` (see `mixing.sinkhorn`); the plan is detached. The
    returned "stat_sinkhorn_*" numbers (iterations, row / column marginal errors) are logged by the trainer.

    head "gap": e = global average pool of the full layer4 map (the released code). head "fc": the paper's
    stage-2 encoder (`StageTwoEncoder`) on A pooled to resolution x resolution. With the GAP head aligned mixing
    (eq. 12) equals embedding mixing (every column of R sums to 1), which tests pin."""

    MODES = ("input", "feat", "feat_rev", "embedding")

    def __init__(self, model, num_classes, alpha, eps, n_iters, tol, modes, head, resolution, dense_loss=False):
        super().__init__(model, num_classes, dense_loss)
        valid = self.MODES + (("clean",) if isinstance(self, AlignMixAE) else ())
        bad = [m for m in modes if m not in valid]
        if bad or not modes:
            raise ValueError(f"alignmix modes {bad or modes} invalid; valid: {list(valid)}")
        if head == "fc" and not (isinstance(resolution, int) and resolution >= 1):
            raise ValueError(f"alignmix resolution must be an integer >= 1 (the paper pools A to 4 x 4), "
                             f"got {resolution!r}")
        self.alpha, self.eps, self.n_iters, self.tol = alpha, eps, n_iters, tol
        self.modes, self.head, self.resolution = tuple(modes), head, resolution
        self.encoder2 = StageTwoEncoder(model.fc.in_features, resolution) if head == "fc" else None

    # -- heads ------------------------------------------------------------------------------------
    def tensor_of(self, fmap: torch.Tensor) -> torch.Tensor:
        """The feature tensor A that is aligned: the full layer4 map (GAP head), or that map average-pooled to
        `resolution` (stage-2 encoder: 7 x 7 -> 4 x 4 at 224 px)."""
        if self.head == "gap" or tuple(fmap.shape[-2:]) == (self.resolution, self.resolution):
            return fmap
        if min(fmap.shape[-2:]) < self.resolution:
            raise ValueError(f"alignmix resolution {self.resolution} is larger than the layer4 map "
                             f"{tuple(fmap.shape[-2:])}; set method.resolution <= the map side (input size / 32)")
        return F.adaptive_avg_pool2d(fmap, self.resolution)

    def embed(self, a: torch.Tensor) -> torch.Tensor:
        """e = f(A): A [b, c, h, w] (already `tensor_of`) -> [b, d]."""
        return a.mean((2, 3)) if self.head == "gap" else self.encoder2(a)

    def classify(self, a: torch.Tensor) -> torch.Tensor:
        if self.head == "gap":
            return self.logits_of(a)
        return self.model.fc(self.embed(a))

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.fc(self.embed(self.tensor_of(self.model.features(images))))

    def export_head(self) -> dict | None:
        return None if self.head == "gap" else self.encoder2.export()

    def _mode(self) -> str:
        return self._choice(self.modes)

    def forward(self, images, labels):
        y = self.targets(labels)
        mode = self._mode()
        lam, perm = self._beta(self.alpha), self._perm(images.shape[0])
        y_mix = mx.mixup(y, perm, lam)
        if mode == "clean":
            return self.reconstruct(images)
        if mode == "input":
            logits = self.classify(self.tensor_of(self.model.features(mx.mixup(images, perm, lam))))
            return {"loss": self.loss_of(logits, y_mix)}
        a = self.tensor_of(self.model.features(images))
        if mode == "embedding":
            return {"loss": self.loss_of(mx.mixup(self.classify(a), perm, lam), y_mix)}
        mixed, info = mx.aligned_mix(a.flatten(2), perm, lam, 0 if mode == "feat" else 1, self.eps, self.n_iters,
                                     self.tol)
        logits = self.classify(mixed.view_as(a))
        return {"loss": self.loss_of(logits, y_mix), "stat_sinkhorn_iters": info["iters"],
                "stat_sinkhorn_row_err": info["row_err"], "stat_sinkhorn_col_err": info["col_err"]}


class AlignMix(_AlignMixBase):
    """AlignMix as the authors' released code trains it (shashankvkt/AlignMixup_CVPR22 at ec01a68, the same in
    cifar10_100/models/resnet18_classifier.py, tiny_imgnet/models/resnet18_classifier.py and
    imagenet/models/resnet50_classifier.py): per batch input mixup with probability 1/2 (`layer_mix = 0`), else
    `mixup_aligned` on the full layer4 map (4 x 4 on CIFAR, 8 x 8 on TinyImageNet, 7 x 7 on ImageNet) with branch
    0 (eq. 12) or branch 1 (A aligned to A', eq. 13), 1/2 each; then global average pooling and the classifier
    (no stage-2 encoder, no embedding mode). Sinkhorn stops at the code's threshold `tol` = 0.1 (utils/OT.py
    `thresh`), after at most 100 iterations. dense_loss: the loss at every position (MultiMix Table 10)."""

    variant = "released code (shashankvkt/AlignMixup_CVPR22 @ ec01a68): GAP head, input 1/2, aligned 1/4 + 1/4"

    def __init__(self, model, num_classes, alpha: float = 2.0, eps: float = 0.1, n_iters: int = 100,
                 tol: float | None = 0.1, dense_loss: bool = False):
        super().__init__(model, num_classes, alpha, eps, n_iters, tol, ("input", "feat", "feat_rev"), "gap", None,
                         dense_loss)

    def _mode(self) -> str:
        if self._choice((0, 1)) == 0:  # layer_mix = random.randint(0, 1)
            return "input"
        return self._choice(("feat", "feat_rev"))  # align_mix = random.randint(0, 1)


class StageTwoEncoder(nn.Module):
    """The paper's stage-2 encoder f (AlignMixup §4.1, "a fully-connected layer"): A [b, c, r, r] -> e [b, c] =
    W vec(A) / r + bias, W [c, c r r].

    Initialised to global average pooling (W = [I ... I] / r, zero bias; e = GAP(A) at step 0, the released
    code's head) and scaled by 1 / r. Why: a plain nn.Linear on vec(A) sees an input whose squared norm is about
    r^2 times that of the pooled vector fc reads in a GAP head (the positions are correlated), so at the same
    learning rate its step on e is r^2 larger and the product with fc grows unstably. Measured on the toy world
    (ResNet-18, r = 2, lr 0.1, 6 epochs): the logits grew 100-fold within the warm-up, the last block's ReLUs died
    (layer4 output rms 1.3 -> 0.008) and top-1 stayed at chance (10.5 %); initialised to GAP but unscaled it still
    diverged (10.5 %); with the scale, 68 % (and 80.5-81.5 % over three seeds at lr 0.05, where lr 0.1 still
    spiked on two of three: configs/pretrain/toy_alignmix_stage2.yaml). The function class (any linear map of
    vec(A)) is unchanged; only SGD's steps are those of a GAP head.
    """

    def __init__(self, channels: int, resolution: int):
        super().__init__()
        self.resolution = resolution
        self.linear = nn.Linear(channels * resolution * resolution, channels)
        with torch.no_grad():  # vec(A) is channel-major: column ch * r * r + position
            rr = resolution * resolution
            self.linear.weight.copy_(torch.eye(channels).repeat_interleave(rr, dim=1) / resolution)
            self.linear.bias.zero_()

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.linear(a.flatten(1) / self.resolution)

    def export(self) -> dict:
        """The head as `mixup_transfer.core.checkpoint.check_head` stores it (the 1 / r scale folded into the
        weight)."""
        return {"kind": "pooled_linear", "resolution": self.resolution,
                "weight": self.linear.weight / self.resolution, "bias": self.linear.bias}


class AlignMixStage2(_AlignMixBase):
    """AlignMix as the paper describes it (AlignMixup §4.1 and App. A; no released code): the layer4 map is
    average-pooled to resolution x resolution (the paper's A is c x 4 x 4) and the stage-2 encoder f
    (`StageTwoEncoder`) maps it to the embedding e, so the ResNet's fc is the classifier g; one of `modes`
    (x, A by eq. 12, A by eq. 13, e) drawn uniformly per batch; Sinkhorn for all n_iters = 100 iterations (App. B;
    tol None). f lives in this module and in the exported checkpoint's "head", not in the backbone."""

    variant = "paper section 4.1 (arXiv 2103.15375): stage-2 encoder on A pooled to r x r, 4 modes uniform"

    def __init__(self, model, num_classes, alpha: float = 2.0, eps: float = 0.1, n_iters: int = 100,
                 tol: float | None = None, modes=("input", "feat", "feat_rev", "embedding"), resolution: int = 4):
        super().__init__(model, num_classes, alpha, eps, n_iters, tol, modes, "fc", resolution)


class _ResUp(nn.Module):
    """Residual up-sampling block of the WGAN-GP ResNet generator (Gulrajani et al., 2017):
    BN-ReLU-up-conv3x3-BN-ReLU-conv3x3 plus an up-sampled 1x1 shortcut."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = F.interpolate(F.relu(self.bn1(x)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h))))
        return h + self.skip(F.interpolate(x, scale_factor=2, mode="nearest"))


class ResidualDecoder(nn.Module):
    """D: R^d -> images [b, 3, s, s] in [0, 1]: a linear layer to a width x s0 x s0 map (s0 = s halved
    while even and >= 8: 7 for 224, 4 for 64 / 32), residual up-sampling blocks to s, BN-ReLU-conv3x3
    and a sigmoid (the residual generator of the paper's AlignMix/AE, with a [0, 1] output)."""

    def __init__(self, embed_dim: int, size: int = 224, width: int = 128):
        super().__init__()
        s0, n_up = size, 0
        while s0 % 2 == 0 and s0 >= 8:
            s0, n_up = s0 // 2, n_up + 1
        self.size, self.s0, self.width = size, s0, width
        self.fc = nn.Linear(embed_dim, width * s0 * s0)
        self.blocks = nn.Sequential(*[_ResUp(width, width) for _ in range(n_up)])
        self.bn, self.out = nn.BatchNorm2d(width), nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, e):
        h = self.fc(e).view(-1, self.width, self.s0, self.s0)
        return torch.sigmoid(self.out(F.relu(self.bn(self.blocks(h)))))


class AlignMixAE(AlignMixStage2):
    """AlignMix/AE (paper section 4, Algorithm 1; no released code): the paper's variant (`AlignMixStage2`, the
    stage-2 encoder f makes the embedding e that the decoder reads) plus a fifth mode "clean" drawn uniformly with
    the four AlignMix modes, in which e = f(F(x)) of the clean images is decoded by a residual decoder D and only
    the reconstruction loss trains F, f and D; the classifier never sees decoded images. The paper's
    L_r = ||x - x_hat||^2 is averaged over pixels here (times recon_weight): its sum is ~1e5 times the
    classification loss at 224 px. decoder_size: the decoder's output side (the training crop; other input sizes
    are matched by bilinear resizing)."""

    variant = "paper section 4 / Algorithm 1 (arXiv 2103.15375): stage-2 encoder, 4 modes + clean reconstruction"

    find_unused_parameters = True  # the clean mode never uses fc, the others never use the decoder

    def __init__(self, model, num_classes, alpha: float = 2.0, eps: float = 0.1, n_iters: int = 100,
                 tol: float | None = None, modes=("clean", "input", "feat", "feat_rev", "embedding"),
                 resolution: int = 4, decoder_size: int = 224, decoder_width: int = 128, recon_weight: float = 1.0):
        super().__init__(model, num_classes, alpha, eps, n_iters, tol, modes, resolution)
        self.decoder = ResidualDecoder(model.fc.in_features, decoder_size, decoder_width)
        self.recon_weight = recon_weight

    def reconstruct(self, images):
        x_hat = self.decoder(self.embed(self.tensor_of(self.model.features(images))))
        if x_hat.shape[-2:] != images.shape[-2:]:
            x_hat = F.interpolate(x_hat, size=images.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.mse_loss(x_hat.float(), images.float())
        return {"loss": self.recon_weight * loss, "stat_recon_mse": loss.detach()}


METHODS = {
    "erm": ERM,
    "input_mixup": InputMixup,
    "manifold_mixup": ManifoldMixup,
    "cutmix": CutMix,
    "puzzlemix": PuzzleMix,
    "multimix": MultiMix,
    "dense_multimix": DenseMultiMix,
    "multi_mix": MultiMixK,
    "alignmix": AlignMix,
    "alignmix_stage2": AlignMixStage2,
    "alignmix_ae": AlignMixAE,
}
# names that no longer exist, with the one to use instead
RENAMED = {"alignmix_official": "alignmix (the AlignMixup released code's variant)"}


def method_knobs(name: str) -> dict:
    """The knobs of a method and their defaults (the papers' defaults)."""
    cls = _lookup(name)
    params = list(inspect.signature(cls.__init__).parameters.values())[3:]  # self, model, num_classes
    return {p.name: p.default for p in params}


def _lookup(name: str):
    if name in RENAMED:
        raise ValueError(f"method {name!r} was renamed: use {RENAMED[name]}; valid methods: {sorted(METHODS)}")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {sorted(METHODS)}")
    return METHODS[name]


def build_method(name: str, model: ResNetStages, num_classes: int, **knobs) -> Method:
    """METHODS[name](model, num_classes, **knobs), rejecting unknown knobs with the valid ones listed."""
    cls = _lookup(name)
    valid = method_knobs(name)
    unknown = sorted(set(knobs) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {name!r}; valid: {sorted(valid)}")
    return cls(model, num_classes, **knobs)


def build_configured(name: str, model: ResNetStages, num_classes: int, knobs: dict, where: str = "method",
                     name_key: str = "method.name") -> Method:
    """`build_method` at a config's edge: a bad method name, knob name or knob value is a ConfigError naming the
    config key (knobs under `where`, the name at `name_key`), so that a tool exits 2 on it like on any other bad
    config."""
    from mixup_transfer.core.config import ConfigError

    check_method_config(name, knobs, where, name_key)
    try:
        return build_method(name, model, num_classes, **knobs)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where}: {e}") from e


def check_method_config(name: str, knobs: dict, where: str = "method", name_key: str = "method.name") -> None:
    """The method's name and knob names (before any data is read): ConfigError naming the config key (the knobs
    live under `where`, the name under `name_key`)."""
    from mixup_transfer.core.config import ConfigError

    if name not in METHODS:
        raise ConfigError(f"{name_key}: unknown method {name!r}; valid methods: {sorted(METHODS)}")
    unknown = sorted(set(knobs) - set(method_knobs(name)))
    if unknown:
        raise ConfigError(f"unknown config key(s) {[f'{where}.{k}' for k in unknown]} for method {name!r}; "
                          f"valid: {sorted(method_knobs(name))}")
