"""Calibration: expected calibration error (ECE) and overconfidence error (OE) with equal-width
bins.

ECE = sum_m |B_m|/n * |acc(B_m) - conf(B_m)|
OE  = sum_m |B_m|/n * conf(B_m) * max(conf(B_m) - acc(B_m), 0)

Bin m (1-based, M bins) holds confidences in ((m-1)/M, m/M]; a confidence of exactly 0 goes to bin
1.
"""

from __future__ import annotations

import numpy as np


def calibration_bins(confidence, correct, n_bins: int = 10) -> dict:
    """Per-bin statistics.

    confidence: ``[n]`` max softmax probability in [0, 1]; correct: ``[n]`` bool (top-1 prediction
    right). Returns numpy arrays ``count [M]``, ``accuracy [M]``, ``confidence [M]`` (0 for empty
    bins), ``lower [M]``, ``upper [M]`` bin edges.
    """
    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
    corr = np.asarray(correct, dtype=np.float64).reshape(-1)
    if conf.shape != corr.shape:
        raise ValueError(f"confidence has {conf.size} entries, correct has {corr.size}")
    if conf.size and (conf.min() < 0 or conf.max() > 1):
        raise ValueError("confidences must lie in [0, 1]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # right-closed bins: index = ceil(conf * M) - 1, with 0 -> bin 0
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    acc_sum = np.bincount(idx, weights=corr, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    nz = count > 0
    accuracy = np.zeros(n_bins)
    mean_conf = np.zeros(n_bins)
    accuracy[nz] = acc_sum[nz] / count[nz]
    mean_conf[nz] = conf_sum[nz] / count[nz]
    return {"count": count, "accuracy": accuracy, "confidence": mean_conf,
            "lower": edges[:-1], "upper": edges[1:]}


def ece_oe(confidence, correct, n_bins: int = 10) -> tuple[float, float]:
    """(ECE, OE) as fractions in [0, 1] (multiply by 100 for the tables)."""
    b = calibration_bins(confidence, correct, n_bins)
    n = b["count"].sum()
    if n == 0:
        raise ValueError("calibration needs at least one prediction")
    w = b["count"] / n
    gap = b["confidence"] - b["accuracy"]
    ece = float(np.sum(w * np.abs(gap)))
    oe = float(np.sum(w * b["confidence"] * np.maximum(gap, 0.0)))
    return ece, oe
