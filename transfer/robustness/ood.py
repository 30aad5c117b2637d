"""Out-of-distribution detection with the maximum softmax probability (Hendrycks & Gimpel).

Scores: higher = more in-distribution (ID). Metrics, all computed by sorting (O(n log n)):

- ``auroc``: P(s_id > s_ood) + 0.5 P(s_id = s_ood) (Mann-Whitney with average ranks for ties);
- ``aupr_in``: average precision with ID as positive, score s;
  ``aupr_out``: average precision with OOD as positive, score -s.
  AP = sum_k (R_k - R_{k-1}) P_k over the distinct thresholds (every sample with score >= t is
  called positive), the step-wise area used by scikit-learn's ``average_precision_score``;
- ``det_acc``: best balanced accuracy over thresholds, max_t 0.5 (TPR_id(t) + TNR_ood(t)) (ODIN's
  "detection accuracy", both classes equally likely); ``det_acc_at_thr`` the same at the stated
  threshold ``det_acc_thr`` (default 0.5, AlignMix §4.3 / App. C "detection accuracy using a
  threshold of 0.5": a sample is ID when its score >= the threshold, else OOD);
- ``fpr95``: fraction of OOD samples called ID at the first threshold where TPR_id >= 95 %;
- ``aupr_in_odin`` / ``aupr_out_odin``: the AUPR of ODIN's ``calMetric.py`` (Liang et al. 2018, the
  code most OOD tables of the mixup papers descend from), in the limit of its fine threshold grid:
  precision from the rates, TPR / (TPR + FPR) (class-balanced), and each recall drop weighted by
  the precision at the next
  higher threshold: ``R_1 P_1 + sum_{k>=2} (R_k - R_{k-1}) P_{k-1}`` over the distinct thresholds
  descending. It differs from ``aupr_in`` unless the sets are equal-sized and the scores separate
  cleanly.

Which AUPR the papers computed is not stated: AlignMix §4.3 / App. C cite Hendrycks & Gimpel 2017
(whose code calls scikit-learn's ``average_precision_score``, our ``aupr_in`` / ``aupr_out``) and
publish no OOD code (shashankvkt/AlignMixup_CVPR22 has none); MultiMix Table 9 copies AlignMix's
numbers. Both variants are reported.
"""

from __future__ import annotations

import numpy as np


def _sorted_counts(pos_scores, neg_scores):
    """Cumulative (TP, FP) at each distinct threshold, thresholds descending.

    Returns (thresholds [T], tp [T], fp [T], n_pos, n_neg): at threshold thresholds[k] every sample
    with score >= thresholds[k] is predicted positive.
    """
    pos = np.asarray(pos_scores, dtype=np.float64).reshape(-1)
    neg = np.asarray(neg_scores, dtype=np.float64).reshape(-1)
    if pos.size == 0 or neg.size == 0:
        raise ValueError(f"need scores of both classes, got {pos.size} positive and {neg.size} "
                         "negative")
    scores = np.concatenate([pos, neg])
    labels = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    # the last index of each run of equal scores
    last = np.r_[np.nonzero(np.diff(scores))[0], scores.size - 1]
    tp = np.cumsum(labels)[last]
    fp = (last + 1) - tp
    return scores[last], tp, fp, pos.size, neg.size


def average_precision(pos_scores, neg_scores) -> float:
    """Step-wise area under the precision-recall curve, positives = ``pos_scores``."""
    _, tp, fp, n_pos, _ = _sorted_counts(pos_scores, neg_scores)
    precision = tp / (tp + fp)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def average_precision_odin(pos_scores, neg_scores) -> float:
    """ODIN-style AUPR (positives = ``pos_scores``): the fine-grid limit of calMetric.py's
    ``auprIn`` loop, ``R_1 P_1 + sum_{k>=2} (R_k - R_{k-1}) P_{k-1}`` with ``P_k = TPR_k / (TPR_k +
    FPR_k)``."""
    _, tp, fp, n_pos, n_neg = _sorted_counts(pos_scores, neg_scores)
    recall, fpr = tp / n_pos, fp / n_neg
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(recall + fpr > 0, recall / (recall + fpr), 0.0)
    return float(recall[0] * precision[0] + np.sum(np.diff(recall) * precision[:-1]))


def auroc(pos_scores, neg_scores) -> float:
    """Area under the ROC curve (ties count one half), via average ranks."""
    pos = np.asarray(pos_scores, dtype=np.float64).reshape(-1)
    neg = np.asarray(neg_scores, dtype=np.float64).reshape(-1)
    if pos.size == 0 or neg.size == 0:
        raise ValueError(f"need scores of both classes, got {pos.size} positive and {neg.size} "
                         "negative")
    scores = np.concatenate([pos, neg])
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size)
    # average 1-based rank within each run of ties
    starts = np.r_[0, np.nonzero(np.diff(sorted_scores))[0] + 1]
    ends = np.r_[starts[1:], scores.size]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def detection_accuracy(pos_scores, neg_scores) -> float:
    """max over thresholds t of 0.5 * (P(s_pos >= t) + P(s_neg < t)); t = +inf gives 0.5."""
    _, tp, fp, n_pos, n_neg = _sorted_counts(pos_scores, neg_scores)
    acc = 0.5 * (tp / n_pos + 1.0 - fp / n_neg)
    return float(max(acc.max(), 0.5))


def detection_accuracy_at(pos_scores, neg_scores, threshold: float) -> float:
    """0.5 * (P(s_pos >= threshold) + P(s_neg < threshold)): detection accuracy at one stated
    threshold."""
    pos = np.asarray(pos_scores, dtype=np.float64).reshape(-1)
    neg = np.asarray(neg_scores, dtype=np.float64).reshape(-1)
    if pos.size == 0 or neg.size == 0:
        raise ValueError(f"need scores of both classes, got {pos.size} positive and {neg.size} "
                         "negative")
    return float(0.5 * (np.mean(pos >= threshold) + np.mean(neg < threshold)))


def ood_metrics(id_scores, ood_scores, threshold: float = 0.5) -> dict:
    """All OOD metrics as percentages. ID is the positive class for det_acc, auroc, aupr_in.

    ``det_acc`` is the best-threshold value, ``det_acc_at_thr`` the value at ``threshold``
    (reported as ``det_acc_thr``; 0.5 is the papers' default)."""
    id_s = np.asarray(id_scores, dtype=np.float64).reshape(-1)
    ood_s = np.asarray(ood_scores, dtype=np.float64).reshape(-1)
    thr, tp, fp, n_pos, n_neg = _sorted_counts(id_s, ood_s)
    tpr = tp / n_pos
    k95 = int(np.searchsorted(tpr, 0.95 - 1e-12))  # tpr is non-decreasing
    return {
        "det_acc": 100.0 * detection_accuracy(id_s, ood_s),
        "auroc": 100.0 * auroc(id_s, ood_s),
        "aupr_in": 100.0 * average_precision(id_s, ood_s),
        "aupr_out": 100.0 * average_precision(-ood_s, -id_s),
        "det_acc_at_thr": 100.0 * detection_accuracy_at(id_s, ood_s, threshold),
        "det_acc_thr": float(threshold),
        "fpr95": 100.0 * float(fp[min(k95, fp.size - 1)] / n_neg),
        "aupr_in_odin": 100.0 * average_precision_odin(id_s, ood_s),
        "aupr_out_odin": 100.0 * average_precision_odin(-ood_s, -id_s),
        "n_id": int(id_s.size),
        "n_ood": int(ood_s.size),
    }
