"""The toy world: small procedurally generated datasets written in the real on-disk layouts (ImageNet, VOC, COCO,
CUB), one module per format over one shared visual vocabulary (``toyworld.vocab``). Imports only ``core``."""

from core.constants import VOC_CLASSES
from toyworld.coco import coco_scene
from toyworld.cub import cub_scene
from toyworld.imagenet import imagenet_scene
from toyworld.render import render_scene
from toyworld.voc import voc_scene
from toyworld.vocab import (
    COCO_CATEGORIES,
    CUB_CLASSES,
    IMAGENET_CLASSES,
    PRESETS,
    VOC_OBJECT_CLASSES,
)
from toyworld.world import format_summary, make_toy_world

__all__ = ["COCO_CATEGORIES", "CUB_CLASSES", "IMAGENET_CLASSES", "PRESETS", "VOC_CLASSES", "VOC_OBJECT_CLASSES",
           "coco_scene", "cub_scene", "format_summary", "imagenet_scene", "make_toy_world", "render_scene", "voc_scene"]
