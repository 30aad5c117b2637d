"""TokenMix (Liu, Liu, Zhou, Li, Li, "TokenMix: Rethinking Image Mixing for Data Augmentation in
Vision Transformers", arXiv:2207.08409, ECCV 2022): the partner image is pasted on a block-wise set
of whole tokens (patches), and each image's share of the target is the part of its teacher
activation map that stays visible.

The math equals the official code (Sense-X/TokenMix, tokenmix.py: `generate_mask`,
`generate_mask_random`, `get_labelmaps_with_coords`, `Mixup.__call__`);
tests/pretrain/test_tokenmix.py compares every piece with tests/fixtures/tokenmix_official.npz,
produced by running that code. As there, one mask per batch, the partner of example i is example
b-1-i (the batch reversed), half the batches (switch_prob) are plain input mixup instead, and the
targets carry label smoothing.

Conventions: token masks are [gh, gw] with 1 = the token comes from the partner (the official
convention); the activation map of an image is [gh, gw] on the same token grid.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from pretrain.methods.base import Method, host_to_device


def block_token_mask(gh: int, gw: int, n_mask: int, rng, min_aspect: float = 0.3,
                     min_patches: int = 1, attempts: int = 10) -> tuple[np.ndarray, int]:
    """Block-wise token mask (`generate_mask`): rectangles of tokens with a log-uniform aspect
    ratio in [min_aspect, 1 / min_aspect] are added until n_mask tokens are covered or `attempts`
    tries in a row add nothing. rng: a host generator with `uniform(a, b)` and `integers(lo, hi)`
    (hi exclusive; numpy's Generator). -> (mask int64 [gh, gw], 1 = partner token; the number of
    partner tokens)."""
    mask = np.zeros((gh, gw), dtype=np.int64)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    count = 0
    while count < n_mask:
        room = min(n_mask - count, gh * gw)
        delta = 0
        for _ in range(attempts):
            area = rng.uniform(min_patches, room)
            aspect = math.exp(rng.uniform(*log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w >= gw or h >= gh:
                continue
            top, left = int(rng.integers(0, gh - h + 1)), int(rng.integers(0, gw - w + 1))
            block = mask[top:top + h, left:left + w]
            fresh = h * w - int(block.sum())
            if 0 < fresh <= room:
                block[...] = 1  # a view: marks the block in `mask`
                delta += fresh
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return mask, count


def random_token_mask(gh: int, gw: int, n_mask: int, rng) -> tuple[np.ndarray, int]:
    """Token mask of n_mask tokens drawn without replacement (`generate_mask_random`): the first
    n_mask entries of `rng.permutation(gh * gw)`. -> (mask int64 [gh, gw], n_mask)."""
    mask = np.zeros(gh * gw, dtype=np.int64)
    mask[rng.permutation(gh * gw)[:n_mask]] = 1
    return mask.reshape(gh, gw), n_mask


def masked_tokens(gh: int, gw: int, mask_ratio: float = 0.5, minimum_tokens: int = 14) -> int:
    """Tokens to take from the partner: int(mask_ratio * N) + minimum_tokens, at most N = gh *
    gw."""
    return min(gh * gw, int(mask_ratio * gh * gw) + minimum_tokens)


def token_mix(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x [b, C, h, w], token mask [gh, gw] (1 = partner) -> each image with the masked tokens of
    its partner (the batch reversed), the mask upsampled to pixels by nearest neighbour."""
    m = F.interpolate(mask.to(x.dtype)[None, None], size=x.shape[-2:], mode="nearest")
    return x * (1 - m) + x.flip(0) * m


def token_activation(class_maps: torch.Tensor, labels: torch.Tensor, gh: int,
                     gw: int) -> torch.Tensor:
    """The activation map of each image's own class on the token grid, as the official code reads
    TokenLabeling label maps: the label's channel of class_maps [b, C, h, w], RoIAligned
    (aligned=False, adaptive sampling) over the whole map to gh x gw (the official crop box [0, 0,
    1, 1] scaled by the map width, minus 0.5). -> [b, gh, gw]."""
    from torchvision.ops import roi_align  # noqa: PLC0415  (only the teacher path needs it)

    b, _, _, w = class_maps.shape
    own = class_maps.gather(1, labels.view(b, 1, 1, 1).expand(b, 1, *class_maps.shape[2:])).float()
    # [index, x1, y1, x2, y2], filled on the device
    rois = torch.full((b, 5), -0.5, device=own.device)
    rois[:, 0] = torch.arange(b, device=own.device)
    rois[:, 3:] = w - 0.5
    return roi_align(own, rois, output_size=(gh, gw))[:, 0]


def smoothed_pair_targets(labels: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                          num_classes: int, smoothing: float) -> torch.Tensor:
    """smoothing / C everywhere, plus w1 at each label and w2 at its partner's (the batch reversed)
    -> [b, C]."""
    eye = F.one_hot(labels, num_classes).float()
    return smoothing / num_classes + eye * w1.view(-1, 1) + eye.flip(0) * w2.view(-1, 1)


def activation_targets(act: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                       num_classes: int, smoothing: float = 0.1) -> torch.Tensor:
    """TokenMix's targets from activation maps act [b, gh, gw] and the token mask [gh, gw] (1 =
    partner): each map normalised to sum 1 (+1e-8), y1 = its mass on the image's own visible
    tokens, y2 = the partner's mass on the pasted ones; label weight y - smoothing / 2 over
    smoothing / C everywhere (rows sum to y1 + y2) -> [b, C]."""
    a = act.float() / (act.float().sum((1, 2), keepdim=True) + 1e-8)
    m = mask.to(a.dtype)
    y1, y2 = (a * (1 - m)).sum((1, 2)), (a.flip(0) * m).sum((1, 2))
    return smoothed_pair_targets(labels, y1 - smoothing / 2, y2 - smoothing / 2, num_classes,
                                 smoothing)


def area_targets(lam: float, labels: torch.Tensor, num_classes: int,
                 smoothing: float = 0.1) -> torch.Tensor:
    """Mixup-style targets (`mixup_target`): lam on the image's label, 1 - lam on its partner's,
    smoothed -> [b, C]. For a token mask lam = 1 - masked tokens / N (the area assignment)."""
    lam_t = torch.full((labels.shape[0],), float(lam), device=labels.device)
    return smoothed_pair_targets(labels, (1 - smoothing) * lam_t, (1 - smoothing) * (1 - lam_t),
                                 num_classes, smoothing)


def teacher_class_maps(teacher: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The teacher's class-probability maps [b, C, h, w]: softmax over the classes of its dense
    class scores, read from a `pretrain.adapters.Backbone` (fc at every position of its last stage)
    or from a module whose forward returns [b, C, h, w] scores. Run without gradients, in eval mode
    (the mode is restored after)."""
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():
            if hasattr(teacher, "dense_logits") and hasattr(teacher, "features"):
                fmap = teacher.features(images)
                scores = teacher.dense_logits(fmap).unflatten(2, fmap.shape[-2:])
            else:
                scores = teacher(images)
    finally:
        teacher.train(was_training)
    if scores.ndim != 4:
        raise ValueError("tokenmix: the teacher must give class maps [b, C, h, w], got shape "
                         f"{tuple(scores.shape)}")
    return scores.float().softmax(1)


class TokenMix(Method):
    """TokenMix as the official code trains DeiT (Sense-X/TokenMix `Mixup`, `main.py`,
    `exp/deit_small/run.sh`): per batch, with probability `prob` the batch is mixed; then with
    probability `switch_prob` by TokenMix (a token mask of `masked_tokens(mask_ratio,
    minimum_tokens)` tokens, `mask_type` block | random, on a grid of `patch_size` pixels), else by
    input mixup with lam ~ Beta(mixup_alpha, mixup_alpha). Partner: the batch reversed. TokenMix
    targets: `labels` activation (the official: the teacher's activation maps,
    `activation_targets`; set `method.teacher`) or area (lam = the kept token fraction,
    `area_targets`, no teacher). loss: bce (run.sh --use-bce: BCE with logits, mean over examples
    and classes) or ce (soft cross-entropy). Draws: the branch, lam and the mask on the host.

    `teacher` (a pretrained network, or None) is set after construction. It is deliberately not a
    submodule: it stays out of parameters(), state_dict() and `.to()`, so the caller places it on
    the images' device.
    `needs_teacher`: True on the class (the official default, labels activation); an instance with
    labels area says False."""

    needs_teacher = True

    def __init__(self, model, num_classes, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 prob: float = 1.0, switch_prob: float = 0.5, mask_type: str = "block",
                 mask_ratio: float = 0.5, minimum_tokens: int = 14, patch_size: int = 16,
                 labels: str = "activation", smoothing: float = 0.1, loss: str = "bce",
                 dense_loss: bool = False):
        super().__init__(model, num_classes, dense_loss)
        if (
            mask_type not in ("block", "random")
            or labels not in ("activation", "area")
            or loss not in ("bce", "ce")
        ):
            raise ValueError(f"tokenmix: mask_type must be block | random (got {mask_type!r}), "
                             f"labels activation | area (got {labels!r}), loss bce | ce (got "
                             f"{loss!r})")
        if dense_loss and loss == "bce":
            raise ValueError("tokenmix: dense_loss needs loss ce (the BCE of the official code "
                             "is on pooled logits)")
        self.mixup_alpha, self.cutmix_alpha, self.prob = mixup_alpha, cutmix_alpha, prob
        self.switch_prob = switch_prob
        self.mask_type, self.mask_ratio = mask_type, float(mask_ratio)
        self.minimum_tokens = int(minimum_tokens)
        self.patch_size, self.labels, self.smoothing = int(patch_size), labels, float(smoothing)
        self.loss = loss
        self.teacher = None
        # this instance: the area assignment reads no teacher
        self.needs_teacher = labels == "activation"

    @classmethod
    def uses_teacher(cls, knobs: dict) -> bool:
        # the area assignment reads no teacher
        return knobs.get("labels", "activation") == "activation"

    def _draw(self) -> tuple[float, bool]:
        """(lam, use_tokenmix) per batch, in the official order (`_params_per_batch`)."""
        if not self.host_rng.random() < self.prob:
            return 1.0, False
        use_tokens = bool(self.host_rng.random() < self.switch_prob)
        return self._beta(self.cutmix_alpha if use_tokens else self.mixup_alpha), use_tokens

    def _token_mask(self, h: int, w: int) -> tuple[np.ndarray, int]:
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"tokenmix: patch_size {self.patch_size} must divide the input size "
                             f"{h}x{w}")
        gh, gw = h // self.patch_size, w // self.patch_size
        n = masked_tokens(gh, gw, self.mask_ratio, self.minimum_tokens)
        fn = block_token_mask if self.mask_type == "block" else random_token_mask
        return fn(gh, gw, n, self.host_rng)

    def mix(self, images, labels):
        """-> (mixed images [b, 3, h, w], targets [b, C]) for one batch."""
        lam, use_tokens = self._draw()
        if not use_tokens:
            x = lam * images + (1 - lam) * images.flip(0)
            return x, area_targets(lam, labels, self.num_classes, self.smoothing)
        mask_np, count = self._token_mask(*images.shape[-2:])
        mask = host_to_device(mask_np, images.device)
        x = token_mix(images, mask)
        if self.labels == "area":
            return x, area_targets(1 - count / mask_np.size, labels, self.num_classes,
                                   self.smoothing)
        if self.teacher is None:
            raise ValueError("tokenmix labels=activation needs a teacher (method.teacher, a "
                             "pretrained network); set labels: area to assign by the kept token "
                             "fraction instead")
        act = token_activation(teacher_class_maps(self.teacher, images), labels, *mask_np.shape)
        return x, activation_targets(act, mask, labels, self.num_classes, self.smoothing)

    def forward(self, images, labels):
        x, y = self.mix(images, labels)
        logits = self.logits_of(self.model.features(x))
        if self.loss == "bce":
            return {"loss": F.binary_cross_entropy_with_logits(logits.float(), y)}
        return {"loss": self.loss_of(logits, y)}
