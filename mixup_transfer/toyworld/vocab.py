"""The shared visual vocabulary of the four toy worlds, their size presets and per-image seeding.

An object class is a (colour, texture, shape) combination; the ImageNet, VOC, COCO and CUB worlds
draw their classes from the same shapes, colours and textures, the way ImageNet shares its visual
world with VOC, COCO and CUB, so that pretraining on the ImageNet-layout world helps on the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mixup_transfer.core.constants import VOC_CLASSES

SHAPES = (
    "circle",
    "ellipse",
    "ring",
    "square",
    "diamond",
    "triangle",
    "star",
    "cross",
    "hexagon",
    "crescent",
)
# Hue on OpenCV's 0..179 scale; saturated colours, jittered per object.
COLOURS = {
    "red": 0,
    "orange": 14,
    "yellow": 28,
    "green": 60,
    "cyan": 90,
    "blue": 115,
    "purple": 135,
    "magenta": 160,
}
TEXTURES = ("solid", "stripes", "dots", "checker", "gradient")
TEXTURE_ADJECTIVES = {
    "solid": "solid",
    "stripes": "striped",
    "dots": "dotted",
    "checker": "checkered",
    "gradient": "shaded",
}

# (category id, name, supercategory): real COCO ids, deliberately non-contiguous (12 and 21 are
# absent).
COCO_CATEGORIES = (
    (1, "person", "person"),
    (2, "bicycle", "vehicle"),
    (3, "car", "vehicle"),
    (4, "motorcycle", "vehicle"),
    (5, "airplane", "vehicle"),
    (6, "bus", "vehicle"),
    (7, "train", "vehicle"),
    (8, "truck", "vehicle"),
    (9, "boat", "vehicle"),
    (10, "traffic light", "outdoor"),
    (11, "fire hydrant", "outdoor"),
    (13, "stop sign", "outdoor"),
    (14, "parking meter", "outdoor"),
    (15, "bench", "outdoor"),
    (16, "bird", "animal"),
    (17, "cat", "animal"),
    (18, "dog", "animal"),
    (19, "horse", "animal"),
    (20, "sheep", "animal"),
    (22, "elephant", "animal"),
)


@dataclass(frozen=True)
class ObjectClass:
    """An object class of the toy vocabulary: a (shape, colour, texture) combination."""

    name: str
    shape: str
    colour: str
    texture: str

    @property
    def description(self) -> str:
        return f"{self.colour} {TEXTURE_ADJECTIVES[self.texture]} {self.shape}"


@dataclass(frozen=True)
class BirdClass:
    """A fine-grained "bird": same silhouette for every class; colours and markings differ.

    Colours are names of ``BIRD_COLOURS``; a marking colour of ``None`` means no such marking.
    """

    name: str
    body: str
    head: str
    wing: str
    wing_stripe: str | None = None
    breast_band: str | None = None
    head_spot: str | None = None

    @property
    def description(self) -> str:
        parts = [f"{self.body} body", f"{self.head} head", f"{self.wing} wing"]
        for what, c in (
            ("wing stripe", self.wing_stripe),
            ("breast band", self.breast_band),
            ("head spot", self.head_spot),
        ):
            if c is not None:
                parts.append(f"{c} {what}")
        return ", ".join(parts)


# RGB; jittered a little per image.
BIRD_COLOURS = {
    "grey": (128, 128, 132),
    "yellow": (225, 200, 40),
    "olive": (120, 110, 45),
    "red": (200, 35, 30),
    "blue": (45, 80, 200),
    "white": (240, 240, 235),
    "black": (25, 25, 25),
    "brown": (110, 70, 35),
}

# The ImageNet world: pairs share a colour (so mean colour cannot separate them) and classes 4/5
# share shape and colour and differ only in texture; shapes recur across colours (star, hexagon).
IMAGENET_CLASSES = tuple(
    ObjectClass(f"{c} {TEXTURE_ADJECTIVES[t]} {s}", s, c, t)
    for s, c, t in (
        ("circle", "red", "solid"),
        ("star", "red", "stripes"),
        ("square", "blue", "solid"),
        ("triangle", "blue", "checker"),
        ("hexagon", "green", "dots"),
        ("hexagon", "green", "stripes"),
        ("diamond", "yellow", "solid"),
        ("cross", "yellow", "gradient"),
        ("ring", "purple", "solid"),
        ("star", "purple", "dots"),
    )
)
COLOUR_NAMES = tuple(COLOURS)
VOC_OBJECT_CLASSES = tuple(
    ObjectClass(name, SHAPES[i % 10], COLOUR_NAMES[(3 * i + i // 10) % 8],
                TEXTURES[(i + 2 * (i // 10)) % 5])
    for i, name in enumerate(VOC_CLASSES)
)
# COCO categories: like the VOC world, every colour, shape and texture is shared by several
# categories, so that only their combination names a category. A detector has to learn the shape
# and texture features that pretraining on the ImageNet world provides; with 8 colour-coded
# categories a randomly initialised Faster R-CNN learned the task as fast as a pretrained one (COCO
# AP 13.7 vs 12.5 after one toy epoch).
COCO_OBJECT_CLASSES = tuple(
    ObjectClass(name, SHAPES[(i + 3) % 10], COLOUR_NAMES[(3 * i + i // 10 + 1) % 8],
                TEXTURES[(i + 2 * (i // 10) + 1) % 5])
    for i, (_, name, _) in enumerate(COCO_CATEGORIES)
)
CUB_CLASSES = (
    BirdClass("Red_Capped_Warbler", body="grey", head="red", wing="grey"),
    BirdClass("Blue_Capped_Warbler", body="grey", head="blue", wing="grey"),
    BirdClass("Striped_Wing_Warbler", body="grey", head="grey", wing="grey", wing_stripe="white"),
    BirdClass("Banded_Warbler", body="grey", head="grey", wing="grey", breast_band="black"),
    BirdClass("Yellow_Finch", body="yellow", head="yellow", wing="yellow"),
    BirdClass("Banded_Yellow_Finch", body="yellow", head="yellow", wing="yellow",
              breast_band="black"),
    BirdClass("Black_Winged_Finch", body="yellow", head="yellow", wing="black"),
    BirdClass("Olive_Sparrow", body="olive", head="olive", wing="brown"),
    BirdClass("Striped_Olive_Sparrow", body="olive", head="olive", wing="brown",
              wing_stripe="white"),
    BirdClass("Spotted_Olive_Sparrow", body="olive", head="olive", wing="brown",
              head_spot="white"),
)

for _group in (IMAGENET_CLASSES, VOC_OBJECT_CLASSES, COCO_OBJECT_CLASSES):
    assert len({(c.shape, c.colour, c.texture)
                for c in _group}) == len(_group), "duplicate class combo"


def small_image_classes(n: int) -> tuple[ObjectClass, ...]:
    """The classes of the small-image worlds (CIFAR-10: n = 10, CIFAR-100: 100, TinyImageNet: 200):
    the ImageNet world's classes first (so CIFAR-10 is the ImageNet world at 32 px), then further
    (shape, colour, texture) combinations of the same vocabulary in a fixed shuffled order (up to
    400 exist)."""
    combos = [(s, c, t) for s in SHAPES for c in COLOURS for t in TEXTURES]
    if n > len(combos):
        raise ValueError(f"the vocabulary has {len(combos)} classes, {n} asked")
    used = {(c.shape, c.colour, c.texture) for c in IMAGENET_CLASSES}
    order = np.random.default_rng(20231204).permutation(len(combos))
    extra = [combos[i] for i in order if combos[i] not in used]
    more = tuple(ObjectClass(f"{c} {TEXTURE_ADJECTIVES[t]} {s}", s, c, t) for s, c, t in extra)
    return (IMAGENET_CLASSES + more)[:n]


def imagenet_wnids(n: int) -> list[str]:
    """Made-up, real-looking, sorted synset ids: ``n01000000``, ``n01104729``, ..."""
    return [f"n{1000000 + 104729 * k:08d}" for k in range(n)]

# -------------------------------------------------------------------------------------------------
# Presets
# -------------------------------------------------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
    "demo": dict(
        imagenet_train=100,
        imagenet_val=20,
        imagenet_size=(96, 128),
        voc07_trainval=300,
        voc07_test=200,
        voc12_trainval=300,
        voc_size=(112, 144),
        coco_train=400,
        coco_val=150,
        coco_size=(112, 144),
        cub_train=30,
        cub_test=20,
        cub_size=(112, 144),
        cifar_train=50,      # per class (CIFAR-10; CIFAR-100 writes a fifth of it, at least 2)
        cifar_test=10,
        tiny_train=10,       # per class, 200 classes
        tiny_val=3,
    ),
    "tiny": dict(
        imagenet_train=10,
        imagenet_val=3,
        imagenet_size=(96, 128),
        voc07_trainval=30,
        voc07_test=20,
        voc12_trainval=30,
        voc_size=(112, 144),
        coco_train=40,
        coco_val=16,
        coco_size=(112, 144),
        cub_train=3,
        cub_test=2,
        cub_size=(112, 144),
        cifar_train=10,
        cifar_test=3,
        tiny_train=2,
        tiny_val=1,
    ),
}

# World codes used in the per-image seeds (``image_rng(seed, WORLDS[name], index)``).
WORLDS = {
    "imagenet_train": 1,
    "imagenet_val": 2,
    "voc2007": 3,
    "voc2012": 4,
    "coco_train2017": 5,
    "coco_val2017": 6,
    "cub": 7,
    "splits": 8,
    "cifar_train": 9,
    "cifar_test": 10,
    "tiny_train": 11,
    "tiny_val": 12,
}
_W_IMNET_TRAIN, _W_IMNET_VAL, _W_VOC07, _W_VOC12, _W_COCO_TRAIN, _W_COCO_VAL, _W_CUB, _W_SPLITS = (
    list(WORLDS.values())[:8]
)
JPEG_QUALITY = 90


def image_rng(seed: int, world: int, index: int) -> np.random.Generator:
    """The generator of one image: independent of every other image and of the number of
    workers."""
    return np.random.default_rng([int(seed), int(world), int(index)])
