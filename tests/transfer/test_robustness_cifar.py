"""The CIFAR / TinyImageNet robustness track: protocol presets, OOD metric variants, OOD folder
readers, the toy OOD writer and the embedding analysis (alignment / uniformity, UMAP), with
hand-computed numbers."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from mixup_transfer.core.config import ConfigError
from mixup_transfer.core.data import DataError
from transfer.robustness.attacks import fgsm, pgd
from transfer.robustness.data import ImageFiles, ood_folder, ood_transform, read_rgb
from transfer.robustness.embedding import (
    alignment_uniformity,
    embedding_layer,
    extract_embeddings,
    umap_2d,
    umap_figure,
    umap_subset,
)
from transfer.robustness.model import NormalizedClassifier
from transfer.robustness.ood import auroc, average_precision, average_precision_odin, ood_metrics
from transfer.robustness.stage import parse_eps, resolve_config, split_suites

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# ---------------------------------------------------------------- protocol presets


def test_protocol_presets_fill_only_unset_keys():
    c = resolve_config({"protocol": "cifar"})
    assert (c["image_size"], c["resize"], c["pgd_iters"],
            c["ood_transform"]) == (32, 32, 20, "crop")
    assert [parse_eps(c[k]) for k in ("fgsm_eps", "pgd_eps", "pgd_step")] == [8 / 255, 4 / 255,
                                                                              2 / 255]
    t = resolve_config({"protocol": "tinyimagenet", "pgd_iters": 7})
    assert (t["image_size"], t["resize"], t["pgd_iters"]) == (64, 64, 7)  # a set key wins
    plain = resolve_config({})  # no protocol: the evaluator's own defaults
    assert (plain["image_size"], plain["resize"], plain["pgd_iters"], plain["ood_transform"]) == (
        224, 256, 10, "eval")
    assert resolve_config({"protocol": "imagenet"})["pgd_iters"] == 20
    with pytest.raises(ConfigError, match="protocol"):
        resolve_config({"protocol": "cifar10"})
    with pytest.raises(ConfigError, match="image_size"):
        resolve_config({"protocol": "cifar", "image_size": [32]})
    with pytest.raises(ConfigError, match="ood_transform"):
        resolve_config({"ood_transform": "squash"})


def test_split_suites():
    assert split_suites("all") == (["clean", "background", "calibration", "fgsm", "pgd", "ood"],
                                   [])
    assert split_suites("pgd,embedding,clean") == (["clean", "pgd"], ["embedding"])
    assert split_suites(["embedding"]) == ([], ["embedding"])
    with pytest.raises(ValueError, match="unknown suites"):
        split_suites("clean,umap")


# ---------------------------------------------------------------- attacks at the CIFAR budgets


def test_fgsm_through_normalisation_is_sign_of_w():
    # logits [0, w . ((x - m) / s)], label 0: dCE/dx = p1 * w / s, and s > 0, so the step is eps *
    # sign(w)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3 * 4 * 4, generator=g)
    w[::7] = 0.0
    lin = nn.Linear(48, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.stack([torch.zeros(48), w]))
    model = NormalizedClassifier(nn.Sequential(nn.Flatten(), lin), mean=(0.5, 0.4, 0.3),
                                 std=(0.2, 0.25, 0.3))
    x = torch.rand(1, 3, 4, 4, generator=g)
    eps = parse_eps(resolve_config({"protocol": "cifar"})["fgsm_eps"])
    expected = (x + eps * torch.sign(w).view(1, 3, 4, 4)).clamp(0, 1)
    torch.testing.assert_close(fgsm(model, x, torch.tensor([0]), eps), expected)


def test_pgd_cifar_budget_on_resnet18_stays_in_ball():
    from mixup_transfer.core.checkpoint import build_resnet

    torch.manual_seed(0)
    model = NormalizedClassifier(build_resnet("resnet18", num_classes=10)).eval()
    c = resolve_config({"protocol": "cifar"})
    eps, step = parse_eps(c["pgd_eps"]), parse_eps(c["pgd_step"])
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    x[:, :, :4] = 1.0  # saturated pixels: the [0, 1] clip binds
    y = torch.tensor([3, 7])
    adv = pgd(model, x, y, eps, step, c["pgd_iters"], True,
              generator=torch.Generator().manual_seed(2))
    assert (adv - x).abs().max() <= eps + 1e-6
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    assert (adv[:, :, :4] <= 1.0).all() and not torch.equal(adv, x)
    ce = nn.functional.cross_entropy
    assert ce(model(adv), y) > ce(model(x), y)


# ---------------------------------------------------------------- OOD metrics (Table 9 / Table 3
# columns)


def test_four_point_ood_metrics_by_hand():
    id_s, ood_s = [0.9, 0.4], [0.6, 0.1]
    # pairs (id > ood): .9>.6 .9>.1 .4<.6 .4>.1 -> 3/4
    assert auroc(id_s, ood_s) == pytest.approx(0.75)
    # step-wise AP, ID positive: order .9(I) .6(O) .4(I) .1(O): P = 1 at R = .5, 2/3 at R = 1
    assert average_precision(id_s, ood_s) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # (the trapezoid through (0, 1), (.5, 1), (.5, .5), (1, 2/3) would give .5 + .5 * (.5 + 2/3) /
    # 2 = .7917)
    # ODIN-style: R1 P1 + (R3 - R2) P2 with P from rates: P2 = .5 / (.5 + .5) -> .5 + .5 * .5
    assert average_precision_odin(id_s, ood_s) == pytest.approx(0.75)
    m = ood_metrics(id_s, ood_s, threshold=0.5)
    assert m["det_acc"] == pytest.approx(75.0)  # t = .9 or .4: (1/2 + 1) / 2, (1 + 1/2) / 2
    assert m["det_acc_at_thr"] == pytest.approx(50.0)  # ID >= .5: 1/2, OOD < .5: 1/2
    # OOD positive with -score: -.1(O) -.4(I) -.6(O) -.9(I) -> the mirror image: 5/6
    assert m["aupr_out"] == pytest.approx(100 * (0.5 + 0.5 * 2 / 3))
    assert m["aupr_in_odin"] == pytest.approx(75.0) and m["aupr_out_odin"] == pytest.approx(75.0)


def _odin_grid_aupr_in(pos, neg, steps=200000):
    """The fine threshold-grid loop of ODIN's calMetric.py auprIn, vectorised: thresholds from min
    to max (max excluded), recall = TPR, precision = TPR / (TPR + FPR), each drop of recall times
    the new precision."""
    pos, neg = np.asarray(pos), np.asarray(neg)
    lo, hi = min(pos.min(), neg.min()), max(pos.max(), neg.max())
    deltas = np.arange(lo, hi, (hi - lo) / steps)
    tpr = (pos[None, :] >= deltas[:, None]).mean(1)
    fpr = (neg[None, :] >= deltas[:, None]).mean(1)
    prec = tpr / (tpr + fpr)
    prev = np.r_[1.0, tpr[:-1]]
    return float(np.sum((prev - tpr) * prec) + tpr[-1] * prec[-1])


@pytest.mark.parametrize("seed", range(3))
def test_odin_aupr_is_the_fine_grid_limit(seed):
    rng = np.random.default_rng(seed)
    # distinct scores on a 1e-3 lattice: the 2e5-step grid visits every gap between them
    vals = rng.permutation(np.arange(1, 1000))[: rng.integers(6, 30)] / 1000.0
    k = int(rng.integers(2, vals.size - 2))
    pos, neg = vals[:k], vals[k:]
    assert average_precision_odin(pos, neg) == pytest.approx(_odin_grid_aupr_in(pos, neg),
                                                             abs=1e-9)
    # equal-sized, well-separated sets: every variant is 1
    assert average_precision_odin([0.9, 0.8], [0.1, 0.2]) == pytest.approx(1.0)
    assert average_precision([0.9, 0.8], [0.1, 0.2]) == pytest.approx(1.0)


# ---------------------------------------------------------------- OOD folder readers


def _png(path, w, h, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def test_ood_folder_layouts_and_errors(tmp_path):
    for i in range(3):
        _png(tmp_path / "LSUN_resize" / "LSUN_resize" / f"{i}.png", 32, 32, i)
        _png(tmp_path / "iSUN" / f"{i}.png", 32, 32, 10 + i)
    nested, flat = ood_folder(tmp_path / "LSUN_resize"), ood_folder(tmp_path / "iSUN")
    assert len(nested) == len(flat) == 3
    assert [p.name for p in nested.files] == ["0.png", "1.png", "2.png"]
    assert len(ood_folder(tmp_path / "iSUN", limit=2)) == 2
    with pytest.raises(DataError, match="nowhere"):
        ood_folder(tmp_path / "nowhere")
    (tmp_path / "empty" / "empty").mkdir(parents=True)
    with pytest.raises(DataError, match="empty.*no images"):
        ood_folder(tmp_path / "empty")


def test_ood_transforms_by_hand(tmp_path):
    arr = _png(tmp_path / "a.png", 40, 36)  # w 40, h 36
    img = read_rgb(tmp_path / "a.png")
    crop = ood_transform(img, "crop", 32, 32)
    # centre: top 2, left 4
    expected = torch.from_numpy(arr[2:34, 4:36]).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(crop, expected)
    assert ood_transform(img, "resize", 32, 32).shape == (3, 32, 32)
    small = _png(tmp_path / "s.png", 32, 32, 1)
    s = read_rgb(tmp_path / "s.png")
    ref = torch.from_numpy(small).permute(2, 0, 1).float() / 255
    for mode in ("crop", "resize", "eval"):  # every mode is the identity on a stored 32 x 32 image
        torch.testing.assert_close(ood_transform(s, mode, 32, 32), ref)
    _png(tmp_path / "tiny.png", 20, 40)
    with pytest.raises(DataError, match="tiny.png: 20x40 image is smaller"):
        ImageFiles([tmp_path / "tiny.png"], 32, 32, "crop")[0]
    with pytest.raises(ValueError, match="unknown OOD transform"):
        ImageFiles([], 32, 32, "squash")


def test_toy_ood_writer(tmp_path):
    from mixup_transfer.toyworld.ood import OOD_SETS, write_ood_folders

    folders = write_ood_folders(tmp_path / "ood", seed=3, n=4)
    assert set(folders) == set(OOD_SETS)
    assert len(list((tmp_path / "ood" / "LSUN" / "LSUN").glob("*.jpg"))) == 4
    assert len(list((tmp_path / "ood" / "iSUN").glob("*.jpg"))) == 4  # flat
    for _name, folder in folders.items():
        ds = ood_folder(folder)
        assert len(ds) == 4 and Image.open(ds.files[0]).size == (32, 32)
    first = (tmp_path / "ood" / "Imagenet" / "Imagenet" / "Imagenet_00000.jpg").read_bytes()
    write_ood_folders(tmp_path / "ood", seed=3, n=2)  # a rerun replaces the sets: no stale files
    assert len(list((tmp_path / "ood" / "LSUN" / "LSUN").glob("*.jpg"))) == 2
    assert (tmp_path / "ood" / "Imagenet" / "Imagenet"
            / "Imagenet_00000.jpg").read_bytes() == first
    (tmp_path / "mine" / "LSUN").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not written by mixup_transfer.toyworld.ood"):
        write_ood_folders(tmp_path / "mine", n=1, sets=["LSUN"])


# ---------------------------------------------------------------- alignment / uniformity


def test_alignment_uniformity_four_points_on_the_circle():
    pts = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    r = alignment_uniformity(pts * 3.0, [0, 0, 1, 1])  # scaled: normalisation brings them back
    # same class: (0, 1) and (2, 3), squared distance 2 each
    assert r["alignment"] == pytest.approx(2.0) and r["n_positive_pairs"] == 2
    # six pairs: four at squared distance 2, two at 4
    assert r["uniformity"] == pytest.approx(math.log((4 * math.exp(-4) + 2 * math.exp(-8)) / 6))
    # positives (0, 2), (1, 3): distance 2
    r1 = alignment_uniformity(pts, [0, 1, 0, 1], alpha=1.0, t=1.0)
    assert r1["alignment"] == pytest.approx(2.0)
    assert r1["uniformity"] == pytest.approx(math.log((4 * math.exp(-2) + 2 * math.exp(-4)) / 6))
    assert alignment_uniformity(pts, [0, 1, 2, 3])["alignment"] is None
    with pytest.raises(ValueError, match="do not match"):
        alignment_uniformity(pts, [0, 1])


@pytest.mark.parametrize("normalize,alpha,t", [(True, 2.0, 2.0), (False, 1.0, 0.5)])
def test_alignment_uniformity_equal_a_double_loop(normalize, alpha, t):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(23, 5))
    y = rng.integers(0, 4, 23)
    r = alignment_uniformity(x, y, alpha=alpha, t=t, normalize=normalize, block=5)
    f = x / np.linalg.norm(x, axis=1, keepdims=True) if normalize else x
    align, unif = [], []
    for i, j in itertools.combinations(range(23), 2):
        d = np.linalg.norm(f[i] - f[j])
        unif.append(math.exp(-t * d * d))
        if y[i] == y[j]:
            align.append(d ** alpha)
    assert r["alignment"] == pytest.approx(np.mean(align), rel=1e-9)
    assert r["uniformity"] == pytest.approx(math.log(np.mean(unif)), rel=1e-9)
    assert r["n_positive_pairs"] == len(align)
    # Jensen on the sphere: uniformity >= -2t, alignment <= 4 (MultiMix's -5.68 is below)
    if normalize:
        assert r["uniformity"] >= -2 * t and r["alignment"] <= 4


def test_embeddings_are_the_classifier_input():
    from mixup_transfer.core.checkpoint import build_resnet

    torch.manual_seed(0)
    model = NormalizedClassifier(build_resnet("resnet18", num_classes=4)).eval()
    assert embedding_layer(model) is model.model.fc
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    loader = [(x[:3], torch.tensor([0, 1, 2])), (x[3:], torch.tensor([3, 0]))]
    emb, lab = extract_embeddings(model, loader, torch.device("cpu"))
    with torch.no_grad():
        feats, logits = model.features_logits(x)
    torch.testing.assert_close(torch.from_numpy(emb), feats.mean((2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(emb) @ model.model.fc.weight.T
                               + model.model.fc.bias, logits,
                               rtol=1e-4, atol=1e-4)
    assert lab.tolist() == [0, 1, 2, 3, 0]


# umap-learn compiles its numba kernels on first use (about a minute on 2 busy cores)
@pytest.mark.slow
def test_umap_subset_and_figure(tmp_path):
    labels = np.repeat(np.arange(6), 7)
    idx = umap_subset(labels, n_classes=3, per_class=5, seed=0)
    assert idx.size == 15 and np.unique(labels[idx]).size == 3
    assert all((labels[idx] == c).sum() == 5 for c in np.unique(labels[idx]))
    assert np.array_equal(idx, umap_subset(labels, 3, 5, seed=0))
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 10
    lab = np.repeat(np.arange(3), 12)
    emb = centres[lab] + rng.normal(size=(36, 8)) * 0.1
    pts = umap_2d(emb, n_neighbors=5, n_epochs=30, seed=0)
    assert pts.shape == (36, 2)
    np.testing.assert_array_equal(pts, umap_2d(emb, n_neighbors=5, n_epochs=30, seed=0))  # seeded
    # three tight clusters stay apart: every point is nearer its own class's 2-D centre than any
    # other
    c2 = np.stack([pts[lab == k].mean(0) for k in range(3)])
    nearest = np.argmin(((pts[:, None, :] - c2[None]) ** 2).sum(-1), 1)
    assert (nearest == lab).all()
    path = umap_figure(pts, lab, tmp_path / "fig" / "umap.png", title="toy",
                       class_names=["a", "b", "c"])
    assert path.stat().st_size > 2000


# ---------------------------------------------------------------- the stage end to end (CIFAR
# protocol)


@pytest.mark.slow
def test_stage_cifar_protocol_with_toy_ood_and_embedding(toy_world, tmp_path):
    import json

    from mixup_transfer.core.checkpoint import build_resnet, save_backbone
    from mixup_transfer.toyworld.ood import write_ood_folders
    from transfer.robustness.stage import run

    imagenet = toy_world / "imagenet"
    n_classes = len([d for d in (imagenet / "val").iterdir() if d.is_dir()])
    torch.manual_seed(0)
    ckpt = tmp_path / "erm" / "backbone.pth"
    save_backbone(ckpt, build_resnet("resnet18", num_classes=n_classes),
                  {"arch": "resnet18", "num_classes": n_classes, "method": "erm", "epochs": 0,
                   "config": "", "metrics": {}})
    ood = write_ood_folders(tmp_path / "ood", n=5, sets=["LSUN", "iSUN"])
    cfg = {"protocol": "cifar", "suites": "clean,pgd,ood,embedding", "data": {"max_val": 18},
           "eval": {"batch_size": 6},
           "pgd_iters": 2, "ood": [f"{k}={v}" for k, v in ood.items()], "ood_noise": "",
           "umap_classes": 3, "umap_per_class": 4, "umap_neighbors": 3, "umap_epochs": 10}
    m = run(cfg, {"checkpoint": ckpt, "imagenet": imagenet}, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == m
    s = m["settings"]
    assert (s["image_size"], s["resize"], s["pgd_iters"],
            s["ood_transform"]) == (32, 32, 2, "crop")
    assert s["pgd_eps"] == pytest.approx(4 / 255, abs=1e-6) and s["pgd_step"] == pytest.approx(
        2 / 255, abs=1e-6
    )
    assert set(m["ood"]) == {"LSUN", "iSUN"} and m["ood"]["LSUN"]["n_ood"] == 5
    e = m["embedding"]
    assert (
        e["n"] == 18
        and e["dim"] == 512
        and 0 <= e["alignment"] <= 4
        and -4 <= e["uniformity"] <= 0
    )
    assert m["figures"]["umap"] == "figures/umap.png" and (tmp_path / "out" / "figures"
                                                           / "umap.png").is_file()
    assert "fgsm" not in m and "calibration" not in m


def _runs(metrics: dict, folder: str) -> list:
    # mixup_transfer/pipeline/run.py's results by stage
    return [{"metrics": metrics, "folder": folder, "seeds": {}}]


def test_embedding_table_in_the_report():
    from mixup_transfer.pipeline.tables import embedding_table

    e = {"alignment": 3.0, "uniformity": -1.9, "n": 10, "dim": 512, "alpha": 2.0, "t": 2.0,
         "normalized": True}
    res = {"methods": {
        "erm": {"robustness": _runs({"embedding": e}, "erm/robustness")},
        "multimix": {"robustness": _runs({"embedding": {"alignment": 1.25, "uniformity": -3.5,
                                                        "n": 10, "dim": 512}},
                                                        "multimix/robustness")},
        "none": {"robustness": _runs({"clean": {"top1_err": 1.0}}, "none/robustness")}}}
    md = embedding_table(res).markdown()
    assert "| erm | [3.000](erm/robustness/) | [-1.900](erm/robustness/) |" in md
    assert (
        "| multimix | **[1.250](multimix/robustness/)** | **[-3.500](multimix/robustness/)** |"
        in md
    )
    assert "| none |" not in md and "L2-normalised" in md
    assert (
        embedding_table({"methods": {"erm": {"robustness": _runs({}, "erm/robustness")}}}) is None
    )


def test_compare_has_an_embedding_table_only_when_present():
    from transfer.robustness import compare

    md, table = compare({"a": {"embedding": {"alignment": 1.5, "uniformity": -2.0}},
                         "b": {"embedding": {"alignment": 0.5, "uniformity": -1.0}}})
    assert table["embedding"]["best"] == {"alignment": ["b"], "uniformity": ["a"]}
    assert "| b | **0.50** | -1.00 |" in md
    md, table = compare({"a": {"clean": {"top1_err": 1.0, "top5_err": 0.5}}})
    assert "embedding" not in table and "alignment" not in md


def test_ood_table_has_the_papers_threshold_column():
    from mixup_transfer.pipeline.tables import ood_table

    ood = {"LSUN": {"det_acc": 80.0, "det_acc_at_thr": 61.5, "auroc": 70.0, "aupr_in": 75.0,
                    "aupr_out": 65.0}}
    md = ood_table({"methods": {"erm": {"robustness": _runs({"ood": ood},
                                                            "erm/robustness")}}}).markdown()
    assert "LSUN det acc @thr (%) ↑" in md and "[61.50](erm/robustness/)" in md
