"""The Vision Transformers a backbone checkpoint may hold: timm's `VisionTransformer`, with timm's
state-dict keys.

`vit_small_patch16_224` is ViT-S/16 (Dosovitskiy et al., "An image is worth 16x16 words",
arXiv:2010.11929; the network of the MultiMix paper's ImageNet ViT rows, arXiv:2311.05538 Table 3),
built by timm exactly as `timm.create_model("vit_small_patch16_224")`: 16 px patches, width 384, 12
blocks of 6 heads, a class token whose final-norm output is the embedding (`global_pool="token"`)
and the classifier `head`. `vit_tiny_toy` is a narrow ViT of the same module layout for the toy
world's 64 px crops and CPU runs: 8 px patches (an 8 x 8 grid), width 96, 4 blocks of 3 heads.

Both are built with `dynamic_img_size=True` (timm interpolates the position embedding when an image
is not the training size; the keys and shapes do not change), so evaluation may use another
resolution than training. The checkpoint keys are timm's (`cls_token`, `pos_embed`,
`patch_embed.proj.*`, `blocks.<i>.*`, `norm.*`, `head.*`): a file written by timm, or by this
toolkit, loads into either.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

# arch -> timm VisionTransformer keyword arguments (image size, patch, width, depth, heads)
VIT_SPECS = {
    "vit_small_patch16_224": {"img_size": 224, "patch_size": 16, "embed_dim": 384, "depth": 12,
                              "num_heads": 6},
    "vit_tiny_toy": {"img_size": 64, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3},
}
VIT_ARCHS = tuple(VIT_SPECS)
VIT_FEATURE_DIMS = {a: s["embed_dim"] for a, s in VIT_SPECS.items()}


def build_vit(arch: str, num_classes: int = 1000, **kwargs) -> nn.Module:
    """A randomly initialised timm VisionTransformer for `arch` (kwargs: timm's, e.g.
    drop_path_rate)."""
    if arch not in VIT_SPECS:
        raise ValueError(f"unknown ViT arch {arch!r}; supported: {list(VIT_ARCHS)}")
    # 1-2 s to import: only when a ViT is built
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(num_classes=num_classes, dynamic_img_size=True, **VIT_SPECS[arch],
                             **kwargs)


def looks_like_vit(keys) -> bool:
    """Whether a state dict's keys (any prefix) are a ViT's: a class token and a patch
    embedding."""
    keys = list(keys)
    return any(k.endswith("cls_token") for k in keys) and any("patch_embed.proj.weight" in k
                                                              for k in keys)


def infer_vit_arch(state: Mapping[str, torch.Tensor]) -> str | None:
    """The VIT_SPECS arch whose patch size, width and depth the keys show; None when none fits."""
    proj = state.get("patch_embed.proj.weight")
    if proj is None:
        return None
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    found = (int(proj.shape[0]), int(proj.shape[-1]), depth)
    for arch, s in VIT_SPECS.items():
        if (s["embed_dim"], s["patch_size"], s["depth"]) == found:
            return arch
    return None


def vit_grid(tokens: int, prefix: int = 1) -> int:
    """The side of the square patch grid of a token sequence of length `tokens` (class token
    first)."""
    n = tokens - prefix
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ValueError(f"{n} patch tokens do not form a square grid: the ViT adapter expects "
                         "square images")
    return side
