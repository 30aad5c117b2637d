"""transfer.robustness: numbers checked by hand or by direct (brute-force) computation."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn

from mixup_transfer.core.data import DataError, ImageNetFolder
from transfer.robustness import compare, parse_suites
from transfer.robustness.attacks import fgsm, pgd
from transfer.robustness.calibration import calibration_bins, ece_oe
from transfer.robustness.corruption import (
    foreground_mask,
    gaussian_noise,
    noise_background,
    partner_index,
    replace_background,
)
from transfer.robustness.data import NoiseImages, ValSet, check_boxes, list_images, resize_crop
from transfer.robustness.evaluate import subset_indices
from transfer.robustness.localization import box_iou, cam_to_box, class_activation_maps, localized
from transfer.robustness.ood import (
    auroc,
    average_precision,
    detection_accuracy,
    detection_accuracy_at,
    ood_metrics,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# ---------------------------------------------------------------- a tiny ImageNet-layout folder
# (PNG, exact)


def _xml(path: Path, w: int, h: int, boxes, wnid: str) -> None:
    objs = "".join(f"<object><name>{wnid}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                   f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for b in boxes)
    path.write_text(
        f"<annotation><size><width>{w}</width><height>{h}</height><depth>3</depth></size>{objs}</annotation>"
    )


@pytest.fixture()
def tiny_val(tmp_path):
    """2 classes x 3 val PNGs of random pixels (various sizes), one or two boxes each (1-based
    XML)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imagenet"
    (root / "val_boxes").mkdir(parents=True)
    sizes = [(40, 30), (36, 36), (30, 44), (48, 40), (40, 40), (33, 50)]  # (w, h)
    k = 0
    for _c, wnid in enumerate(["n0001", "n0002"]):
        (root / "val" / wnid).mkdir(parents=True)
        for _ in range(3):
            w, h = sizes[k]
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                root / "val" / wnid / f"val_{k:04d}.png")
            boxes = [(6, 5, 20, 18)] + ([(15, 20, 28, 29)] if k % 2 else [])
            _xml(root / "val_boxes" / f"val_{k:04d}.xml", w, h, boxes, wnid)
            k += 1
    return root


# ---------------------------------------------------------------- corruption


def test_foreground_mask_covers_every_touched_pixel():
    # 2nd box: no area
    m = foreground_mask(4, 6, np.array([[1.5, 0.2, 3.0, 2.0], [5.0, 3.0, 5.0, 4.0]]))
    expected = torch.zeros(4, 6, dtype=torch.bool)
    expected[0:2, 1:3] = True
    assert torch.equal(m, expected)
    assert not foreground_mask(3, 3, np.zeros((0, 4))).any()


def test_replace_keeps_boxes_and_takes_background_from_other():
    g = torch.Generator().manual_seed(0)
    img, other = torch.rand(3, 10, 12, generator=g), torch.rand(3, 10, 12, generator=g)
    fg = foreground_mask(10, 12, np.array([[2, 3, 5, 7]]))
    out = replace_background(img, other, fg)
    assert torch.equal(out[:, fg], img[:, fg])
    assert torch.equal(out[:, ~fg], other[:, ~fg])


def test_noise_statistics_and_clipping():
    img = torch.full((3, 200, 200), 0.5)
    fg = foreground_mask(200, 200, np.array([[50, 50, 120, 150]]))
    noise = gaussian_noise(img.shape, 0.1, seed=3, index=7)
    out = noise_background(img, fg, noise)
    assert torch.equal(out[:, fg], img[:, fg])
    d = (out - img)[:, ~fg]  # 0.5 +- 0.1: clipping (5 sigma away) never happens here
    assert abs(d.mean().item()) < 0.003
    assert abs(d.std().item() - 0.1) < 0.002
    no_boxes = foreground_mask(50, 50, np.zeros((0, 4)))
    bright = noise_background(torch.full((3, 50, 50), 0.98), no_boxes, noise[:, :50, :50])
    assert bright.max() <= 1.0 and bright.min() >= 0.0 and (bright == 1.0).any()
    # seeds reproduce, a different seed or image index draws differently
    assert torch.equal(noise, gaussian_noise(img.shape, 0.1, seed=3, index=7))
    assert not torch.equal(noise, gaussian_noise(img.shape, 0.1, seed=4, index=7))
    assert not torch.equal(noise, gaussian_noise(img.shape, 0.1, seed=3, index=8))


def test_partner_is_another_image_and_seeded():
    partners = [partner_index(i, 5, seed=0) for i in range(5)]
    assert all(p != i and 0 <= p < 5 for i, p in enumerate(partners))
    assert partners == [partner_index(i, 5, seed=0) for i in range(5)]
    many = {tuple(partner_index(i, 50, seed=s) for i in range(50)) for s in range(3)}
    assert len(many) == 3  # different seeds choose differently
    with pytest.raises(ValueError):
        partner_index(0, 1, seed=0)


def test_resize_crop_boxes_follow_by_hand():
    # 30 x 20 (w x h) -> short side 40: 60 x 40, centre crop 40 -> left 10, top 0
    img = torch.zeros(3, 20, 30)
    img[:, 2:8, 4:10] = 1.0  # box x0=4, y0=2, x1=10, y1=8
    out, boxes = resize_crop(img, np.array([[4, 2, 10, 8], [25, 0, 30, 5]]), resize=40, crop=40)
    assert out.shape == (3, 40, 40)
    # box 1: [8, 4, 20, 16] - [10, 0] -> [-2, 4, 10, 16] clipped; box 2: [50, ...] - 10 = [40, ..]
    # outside
    np.testing.assert_allclose(boxes, [[0, 4, 10, 16]])
    assert out[:, 5:15, 0:9].min() > 0.99 and out[:, 5:15, 11:].max() < 0.01


def test_valset_corruption_at_eval_resolution(tiny_val):
    base = ImageNetFolder(tiny_val, split="val")
    clean = ValSet(base, range(6), image_size=24, resize=28)
    for corr in ("replace", "noise"):
        ds = ValSet(base, range(6), image_size=24, resize=28, corruption=corr, seed=1)
        for k in range(6):
            c_img, label, boxes, i = clean[k]
            x, label2, boxes2, i2 = ds[k]
            assert (label, i) == (label2, i2) and torch.equal(boxes, boxes2)
            fg = foreground_mask(24, 24, boxes.numpy())
            assert fg.any() and (~fg).any()
            assert torch.equal(x[:, fg], c_img[:, fg])          # every box pixel unchanged
            assert (x[:, ~fg] != c_img[:, ~fg]).float().mean() > 0.9  # the background changed
            # the background is the other image's, resized + cropped the same way
            if corr == "replace":
                j = partner_index(i, 6, seed=1)
                assert j != i
                assert torch.equal(x[:, ~fg], clean[j][0][:, ~fg])
            assert torch.equal(x, ds[k][0])  # deterministic
        other_seed = ValSet(base, range(6), image_size=24, resize=28, corruption=corr, seed=2)
        assert not torch.equal(ds[0][0], other_seed[0][0])


def test_valset_corruption_at_original_resolution(tiny_val):
    base = ImageNetFolder(tiny_val, split="val")
    ds = ValSet(base, range(6), image_size=24, resize=28, corruption="replace", at="original",
                seed=0)
    img, boxes, label, i = ds.corrupted_image(1)
    orig = TF.pil_to_tensor(Image.open(base.samples[i][0]).convert("RGB")).float() / 255
    fg = foreground_mask(orig.shape[1], orig.shape[2], base.boxes(i))
    assert torch.equal(img[:, fg], orig[:, fg])
    j = partner_index(i, 6, seed=0)
    other = TF.pil_to_tensor(Image.open(base.samples[j][0]).convert("RGB")).float() / 255
    other = TF.resize(other, list(orig.shape[1:]), antialias=True).clamp(0, 1)
    assert torch.equal(img[:, ~fg], other[:, ~fg])
    assert ds[1][0].shape == (3, 24, 24)


# ---------------------------------------------------------------- bad input


def test_bad_input_errors(tiny_val, tmp_path):
    base = ImageNetFolder(tiny_val, split="val")
    with pytest.raises(DataError, match="x0, y0, x1, y1"):
        check_boxes(np.array([[0, 0, 45, 10]]), height=30, width=40, image_path="img.png")
    (tiny_val / "val_boxes" / "val_0002.xml").unlink()
    with pytest.raises(DataError, match="val_0002"):
        ValSet(base, range(6), 24, 28)[2]
    _xml(tiny_val / "val_boxes" / "val_0003.xml", 30, 44, [(1, 1, 60, 10)], "n0002")
    with pytest.raises(DataError, match="val_0003"):
        ValSet(base, range(6), 24, 28)[3]
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="empty.*no images"):
        list_images(tmp_path / "empty")


# ---------------------------------------------------------------- calibration


def test_ece_oe_by_hand():
    conf = [0.95, 0.95, 0.65, 0.65, 0.25]
    correct = [1, 0, 1, 1, 0]
    # bins (0.9,1]: acc .5 conf .95 w .4; (0.6,0.7]: acc 1 conf .65 w .4; (0.2,0.3]: acc 0 conf .25
    # w .2
    ece, oe = ece_oe(conf, correct, n_bins=10)
    assert ece == pytest.approx(0.4 * 0.45 + 0.4 * 0.35 + 0.2 * 0.25)
    assert oe == pytest.approx(0.4 * 0.95 * 0.45 + 0.2 * 0.25 * 0.25)
    b = calibration_bins([0.0, 0.1, 0.7, 1.0], [1, 1, 0, 1], n_bins=10)  # right-closed bins
    assert b["count"].tolist() == [2, 0, 0, 0, 0, 0, 1, 0, 0, 1]
    assert ece_oe([0.8] * 5, [1, 1, 1, 1, 0]) == pytest.approx((0.0, 0.0))  # perfectly calibrated


# ---------------------------------------------------------------- attacks


class Linear(nn.Module):
    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = torch.tensor(w), torch.tensor(b)

    def forward(self, x):
        return x.flatten(1) @ self.w.T + self.b


def test_fgsm_on_linear_model_by_hand():
    # 2 classes, label 0: dCE/dx = p1 * (w1 - w0) = p1 * [-2, 3, 0, 3] -> sign [-1, 1, 0, 1]
    model = Linear([[1.0, -2.0, 0.0, 0.0], [-1.0, 1.0, 0.0, 3.0]], [0.0, 0.0])
    x = torch.tensor([0.5, 0.99, 0.3, 0.01]).view(1, 1, 2, 2)
    eps = 8 / 255
    adv = fgsm(model, x, torch.tensor([0]), eps)
    # 0.99 + eps clipped to 1
    expected = torch.tensor([0.5 - eps, 1.0, 0.3, 0.01 + eps]).view(1, 1, 2, 2)
    torch.testing.assert_close(adv, expected)
    assert adv.min() >= 0 and adv.max() <= 1
    assert not x.requires_grad and x[0, 0, 0, 1] == pytest.approx(0.99)  # input untouched


def _small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(16, 5)).eval()


def test_pgd_stays_in_eps_ball_and_reduces_to_fgsm():
    model = _small_cnn()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 8, 8, generator=g)
    x[:, :, 0] = 0.0
    x[:, :, 1] = 1.0
    y = torch.randint(5, (6,), generator=g)
    eps = 4 / 255
    for step, iters in ((2 / 255, 10), (3 * eps, 4)):
        g0 = torch.Generator().manual_seed(0)
        adv = pgd(model, x, y, eps, step, iters, random_start=True, generator=g0)
        assert (adv - x).abs().max() <= eps + 1e-6
        assert adv.min() >= 0 and adv.max() <= 1
    # one step of size eps from x itself is FGSM
    one = pgd(model, x, y, eps, eps, 1, random_start=False)
    torch.testing.assert_close(one, fgsm(model, x, y, eps))
    # the loss never goes down compared to the clean input for a true-gradient ascent of a few
    # steps
    ce = nn.functional.cross_entropy
    assert ce(model(pgd(model, x, y, eps, 1 / 255, 5, False)), y) > ce(model(x), y)


# ---------------------------------------------------------------- OOD metrics


def _direct_auroc(pos, neg):
    return np.mean([1.0 if p > n else 0.5 if p == n else 0.0
                    for p, n in itertools.product(pos, neg)])


def _direct_ap(pos, neg):
    """Precision at every distinct threshold, counted directly; AP = sum (R_k - R_k-1) P_k."""
    scores = sorted(set(pos) | set(neg), reverse=True)
    ap, prev_r = 0.0, 0.0
    for t in scores:
        tp = sum(p >= t for p in pos)
        fp = sum(n >= t for n in neg)
        r = tp / len(pos)
        ap += (r - prev_r) * tp / (tp + fp)
        prev_r = r
    return ap


def _direct_det_acc(pos, neg):
    ts = sorted(set(pos) | set(neg)) + [np.inf]
    return max(0.5 * (np.mean([p >= t for p in pos]) + np.mean([n < t for n in neg])) for t in ts)


def test_ood_metrics_by_hand():
    id_s, ood_s = [0.9, 0.8], [0.7, 0.85]
    assert auroc(id_s, ood_s) == pytest.approx(0.75)
    assert average_precision(id_s, ood_s) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert detection_accuracy(id_s, ood_s) == pytest.approx(0.75)
    m = ood_metrics(id_s, ood_s)
    # OOD positive with -score: order .7(O) .8(I) .85(O) .9(I) -> P = 1 at R=.5, 2/3 at R=1
    assert m["aupr_out"] == pytest.approx(100 * (0.5 + 0.5 * 2 / 3))


@pytest.mark.parametrize("seed", range(5))
def test_ood_metrics_match_direct_rank_computation(seed):
    rng = np.random.default_rng(seed)
    pos = np.round(rng.uniform(0, 1, rng.integers(1, 12)), 1).tolist()  # rounding makes ties
    neg = np.round(rng.uniform(0, 0.8, rng.integers(1, 12)), 1).tolist()
    assert auroc(pos, neg) == pytest.approx(_direct_auroc(pos, neg))
    assert average_precision(pos, neg) == pytest.approx(_direct_ap(pos, neg))
    assert average_precision([-v for v in neg], [-v for v in pos]) == pytest.approx(
        _direct_ap([-v for v in neg], [-v for v in pos]))
    assert detection_accuracy(pos, neg) == pytest.approx(_direct_det_acc(pos, neg))


def test_ood_detection_accuracy_at_a_stated_threshold_by_hand():
    id_s, ood_s = [0.9, 0.6, 0.4], [0.3, 0.55]
    # t = 0.5: ID kept 2/3 (0.9, 0.6), OOD rejected 1/2 (0.3) -> (2/3 + 1/2) / 2 = 7/12
    assert detection_accuracy_at(id_s, ood_s, 0.5) == pytest.approx(7 / 12)
    # the best threshold is t = 0.6: (2/3 + 1) / 2 = 5/6
    assert detection_accuracy(id_s, ood_s) == pytest.approx(5 / 6)
    m = ood_metrics(id_s, ood_s)  # the papers' default 0.5
    assert m["det_acc"] == pytest.approx(100 * 5 / 6) and m["det_acc_at_thr"] == pytest.approx(
        100 * 7 / 12
    )
    assert m["det_acc_thr"] == 0.5
    m = ood_metrics(id_s, ood_s, threshold=0.6)
    assert m["det_acc_at_thr"] == pytest.approx(100 * 5 / 6) and m["det_acc_thr"] == 0.6
    # a score equal to the threshold is called ID ("OOD if the maximum class probability is below")
    assert detection_accuracy_at([0.5], [0.5], 0.5) == pytest.approx(0.5)
    assert detection_accuracy_at([0.5], [0.4999], 0.5) == pytest.approx(1.0)


def test_noise_images():
    u = NoiseImages("uniform", 3, 16, seed=0)
    gs = NoiseImages("gaussian", 3, 64, seed=0, std=0.5)
    assert u[0][0].shape == (3, 16, 16) and torch.equal(u[1][0], NoiseImages("uniform", 3, 16,
                                                                             seed=0)[1][0])
    x = gs[0][0]
    assert x.min() >= 0 and x.max() <= 1
    # clipped N(0.5, 0.25): P(x == 0) = P(z < -1) = 0.1587
    assert (x == 0).float().mean().item() == pytest.approx(0.1587, abs=0.02)
    # the default is AlignMix App. C's N(mu, sigma), mu = sigma = 0.5 (sigma a standard deviation)
    d = NoiseImages("gaussian", 3, 64, seed=0)
    assert d.mean == 0.5 and d.std == 0.5 and torch.equal(d[0][0], x)


# ---------------------------------------------------------------- localization, tables, helpers


def test_cam_box_and_iou_by_hand():
    cam = np.zeros((10, 10), np.float32)
    cam[2:5, 5:9] = 1.0    # 3 x 4 blob: the largest region
    cam[8, 1] = 0.5        # a one-pixel region above 0.25
    np.testing.assert_allclose(cam_to_box(cam, 0.25), [5, 2, 9, 5])
    assert box_iou(np.array([0, 0, 2, 2]),
                   np.array([[1, 1, 3, 3], [0, 0, 2, 2]])).tolist() == pytest.approx(
        [1 / 7, 1.0])
    feats = torch.zeros(1, 2, 2, 2)
    feats[0, 0, 0, 0] = 3.0
    cams = class_activation_maps(feats, torch.tensor([[1.0, 0.0]]), torch.tensor([0]), (4, 4))
    assert (
        cams.shape == (1, 4, 4)
        and cams.max() == 1.0
        and cams.min() == 0.0
        and cams[0, 0, 0] == 1.0
    )


def test_localized_iou_threshold_and_comparison_by_hand():
    pred = np.array([0.0, 0.0, 4.0, 4.0])            # area 16
    # area 4 inside pred: IoU = 4 / 16 = 0.25 exactly
    inside = np.array([[0.0, 0.0, 2.0, 2.0]])
    assert box_iou(pred, inside)[0] == pytest.approx(0.25)
    assert localized(pred, inside, 0.25, ">=")
    assert not localized(pred, inside, 0.25, ">")   # multi-mix §IV-D: "higher than 0.25"
    assert not localized(pred, inside)               # default IoU >= 0.5
    # area 32/3 inside pred: IoU = (32/3) / 16 = 2/3
    third = np.array([[0.0, 0.0, 4.0, 8.0 / 3.0]])
    assert localized(pred, third, 0.25, ">") and localized(pred, third)
    # the best of several boxes counts; no box is never localized
    assert localized(pred, np.concatenate([inside, third]), 0.5, ">")
    assert not localized(pred, np.zeros((0, 4)), 0.0, ">=")
    with pytest.raises(ValueError, match="IoU comparison"):
        localized(pred, inside, 0.25, "=>")


def test_compare_tables():
    a = {"clean": {"top1_err": 30.0, "top5_err": 10.0},
         "pgd": {"top1_err": 80.0, "fgsm_same_eps_top1_err": 70.0},
         "ood": {"uniform": {"det_acc": 90.0, "auroc": 95.0, "aupr_in": 94.0, "aupr_out": 96.0}}}
    b = {"clean": {"top1_err": 25.0, "top5_err": 12.0}, "calibration": {"ece": 3.0, "oe": 1.0}}
    md, table = compare({"erm": a, "mixup": b})
    assert "| mixup | **25.00** | 12.00 |" in md and "| erm | 30.00 | **10.00** |" in md
    assert table["clean"]["rows"]["mixup"]["top-1 err"] == 25.0
    assert table["calibration"]["rows"]["erm"]["ECE"] is None and "| erm | — | — |" in md
    assert table["ood/uniform"]["rows"]["erm"]["AUROC"] == 95.0


def test_suites_and_subset():
    assert parse_suites("pgd,clean") == ["clean", "pgd"]
    assert parse_suites("all") == list(parse_suites("clean,background,calibration,fgsm,pgd,ood"))
    with pytest.raises(ValueError, match="valid"):
        parse_suites("clean,bogus")
    assert subset_indices(10, 4) == [0, 3, 6, 9]
    assert subset_indices(3, None) == [0, 1, 2]


def test_a_stage_two_head_is_exported_and_evaluated_through(tmp_path):
    """AlignMix with the paper's fc stage-2 encoder: the exported backbone carries the head, and
    the robustness classifier's logits equal the method's own predictions; its CAMs use the
    per-position class weights."""
    from mixup_transfer.core.checkpoint import classifier_head, save_backbone
    from pretrain.methods import ResNetStages, build_method
    from transfer.robustness.localization import class_activation_maps
    from transfer.robustness.model import load_classifier_model

    torch.manual_seed(0)
    method = build_method("alignmix_stage2", ResNetStages("resnet18", 5), 5, resolution=2).eval()
    with torch.no_grad():
        method.encoder2.linear.weight.normal_(0, 0.02)  # away from its GAP initialisation
    path = tmp_path / "backbone.pth"
    save_backbone(path, method.model.net, {"arch": "resnet18"}, head=method.export_head())
    assert classifier_head(path)["resolution"] == 2
    model, meta = load_classifier_model(path, num_classes=5)
    assert meta["classifier"] == "pooled_linear"
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), method.predict(x), atol=1e-5)
        feats, logits = model.features_logits(x)
        assert feats.shape == (3, 512, 2, 2) and model.fc_weight.shape == (5, 512, 2, 2)
        # the CAM sums to the class score minus the bias terms: check one by hand before
        # normalisation
        w = model.fc_weight[logits.argmax(1)]
        const = model.model.fc.weight @ model.head.bias + model.model.fc.bias
        score = (w * feats).sum((1, 2, 3)) + const[logits.argmax(1)]
        assert torch.allclose(score, logits.max(1).values, atol=1e-4)
        cams = class_activation_maps(feats, model.fc_weight, logits.argmax(1), (64, 64))
        assert cams.shape == (3, 64, 64) and float(cams.max()) == pytest.approx(1.0)
    plain = tmp_path / "plain.pth"
    save_backbone(plain, method.model.net, {"arch": "resnet18"})
    assert classifier_head(plain) is None
