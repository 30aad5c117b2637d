"""The unit of every metric the toolkit prints or saves, in one place.

One convention across tools: every rate is in percent (accuracies and errors, AP / AR / mAP, BoxAcc
and MaxBoxAcc, localization, ECE, the OOD metrics), times in seconds, throughput in images per
second, losses in nats (cross-entropy). A metric that could not be computed is null, never -1 or 0.
Each metrics JSON carries a `units` field, `{metric name: unit}` for the names it holds (nested
names by their own key):

    {"val_top1": 71.2, "train_time_s": 830.0, "units": {"val_top1": "%", "train_time_s": "s"}}
"""

from __future__ import annotations

import re

PERCENT = "%"
# leaf names in percent: accuracies, errors, COCO / VOC AP and AR, BoxAcc, localization,
# calibration, OOD
_PERCENT = re.compile(
    r"(^|_)(top[15]|err|acc|loc|cls|ece|oe|auroc|aupr|fpr95)($|_)|boxacc|^m?A[PR]"
)
_EXACT = {"eps": "fraction of the [0, 1] pixel range",
          "step": "fraction of the [0, 1] pixel range", "seconds": "s"}


def unit_of(name: str) -> str | None:
    """The unit of a metric named `name` (its last dotted part), or None for counts, settings and
    names."""
    leaf = str(name).rsplit(".", 1)[-1]
    if leaf in _EXACT:
        return _EXACT[leaf]
    if leaf.endswith("_per_s"):
        return "images/s"
    if leaf.endswith(("_time_s", "_seconds")) or leaf in ("train_s", "test_s"):
        return "s"
    if "loss" in leaf:
        return "nats"
    if leaf.startswith(("best_threshold", "num_", "n_")):
        return None
    return PERCENT if _PERCENT.search(leaf) else None


def units(metrics: dict) -> dict[str, str]:
    """`{name: unit}` for every numeric (or null) entry of `metrics` with a unit, nested dicts
    included (by their own key; a dict of per-IoU or per-class values by the dict's key)."""
    out: dict[str, str] = {}

    def walk(d: dict) -> None:
        for k, v in d.items():
            if k == "units":
                continue
            if isinstance(v, dict):
                leaves = list(v.values())
                if leaves and all(x is None or isinstance(x, (int, float))
                                  for x in leaves) and unit_of(k):
                    out[k] = unit_of(k)  # {"30": .., "50": ..} or {class: AP}: the dict's unit
                else:
                    walk(v)
            elif (v is None or (isinstance(v, (int, float))
                                and not isinstance(v, bool))) and unit_of(k):
                out[k] = unit_of(k)

    walk(metrics)
    return dict(sorted(out.items()))


def with_units(metrics: dict) -> dict:
    """`metrics` with its `units` field (see `units`)."""
    return {**metrics, "units": units(metrics)}
