"""mixup_transfer.core.units: one unit per metric name, percent for every rate."""

from mixup_transfer.core.units import unit_of, units, with_units


def test_units_of_the_toolkits_metric_names():
    percent = ["val_top1", "top5", "train_top1", "mAP", "mAP_std", "AP", "AP50", "APl", "AR100",
               "top1_err", "top1_cls", "gt_known_loc", "maxboxacc_v1", "maxboxacc_v2",
               "maxboxacc_per_iou", "boxacc_mean", "ece", "oe", "auroc", "aupr_in", "fpr95",
               "det_acc_at_thr"]
    assert {n: unit_of(n) for n in percent} == {n: "%" for n in percent}
    assert unit_of("train_img_per_s") == unit_of("images_per_s") == "images/s"
    assert unit_of("train_time_s") == unit_of("test_seconds") == unit_of("seconds") == "s"
    assert unit_of("val_loss") == unit_of("loss_mix") == "nats"
    for none in ("arch", "method", "steps", "epochs", "global_batch", "num_images",
                 "best_threshold", "seed", "lr", "alignment", "iterations"):
        assert unit_of(none) is None, none


def test_units_field_of_nested_metrics():
    m = {"clean": {"top1_err": 24.0, "top5_err": None},
         "pgd": {"top1_err": 80.0, "eps": 0.0157, "iters": 20}, "AP": {"cat": 50.0, "dog": None},
         "maxboxacc_v2_per_iou": {"30": 90.0, "50": 70.0}, "arch": "resnet18",
         "figures": {"umap": "figures/umap.png"}, "flag": True}
    assert units(m) == {"AP": "%", "eps": "fraction of the [0, 1] pixel range",
                        "maxboxacc_v2_per_iou": "%", "top1_err": "%", "top5_err": "%"}
    out = with_units({"AP": 10.0, "units": {"stale": "x"}})
    assert out == {"AP": 10.0, "units": {"AP": "%"}}
