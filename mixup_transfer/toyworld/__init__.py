"""The toy world: small procedurally generated datasets written in the real on-disk layouts
(ImageNet, VOC, COCO, CUB), one module per format over one shared visual vocabulary
(``mixup_transfer.toyworld.vocab``). Imports only ``core``."""

from mixup_transfer.core.constants import VOC_CLASSES
from mixup_transfer.toyworld.coco import coco_scene
from mixup_transfer.toyworld.cub import cub_scene
from mixup_transfer.toyworld.imagenet import imagenet_scene
from mixup_transfer.toyworld.render import render_scene
from mixup_transfer.toyworld.voc import voc_scene
from mixup_transfer.toyworld.vocab import (
    COCO_CATEGORIES,
    CUB_CLASSES,
    IMAGENET_CLASSES,
    PRESETS,
    VOC_OBJECT_CLASSES,
)
from mixup_transfer.toyworld.world import format_summary, make_toy_world

__all__ = ["COCO_CATEGORIES", "CUB_CLASSES", "IMAGENET_CLASSES", "PRESETS", "VOC_CLASSES",
           "VOC_OBJECT_CLASSES", "coco_scene", "cub_scene", "format_summary", "imagenet_scene",
           "make_toy_world", "render_scene", "voc_scene"]
