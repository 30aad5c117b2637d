"""Robustness of a pretrained classifier on ImageNet-layout val: background corruption,
calibration, FGSM / PGD, out-of-distribution detection (``evaluate_checkpoint``), and paper-style
tables across methods (``compare``)."""

from .compare import compare
from .evaluate import SUITES, evaluate_checkpoint, parse_suites

__all__ = ["SUITES", "compare", "evaluate_checkpoint", "parse_suites"]
