"""WSOL metrics: hand-computed boxes / IoU / MaxBoxAcc, and fast == reference on many maps."""
import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsol import metrics as M


def test_iou_hand_computed():
    # intersection x 3..4 (2 px) * y 2..5 (4 px) = 8; areas 25 and 10 -> 8 / 27
    assert M.iou_matrix([[1, 2, 5, 6]], [[3, 1, 4, 5]])[0, 0] == pytest.approx(8 / 27)
    assert M.iou_matrix([[0, 0, 0, 0]], [[0, 0, 0, 0]])[0, 0] == 1.0  # one pixel vs itself
    assert M.iou_matrix([[0, 0, 1, 1]], [[5, 5, 6, 6]])[0, 0] == 0.0
    ious = M.iou_matrix([[1, 2, 5, 6], [3, 1, 4, 5]], [[3, 1, 4, 5]])
    assert ious.shape == (2, 1) and ious[1, 0] == 1.0


def test_rescale_box_truncates():
    # int(10.7 * 224 / 200) = int(11.98) = 11; int(20 * 224 / 300) = int(14.93) = 14;
    # int(99.9 * 224 / 200) = int(111.89) = 111; int(150 * 224 / 300) = 112
    assert M.rescale_box((10.7, 20, 99.9, 150), (200, 300), (224, 224)) == (11, 14, 111, 112)


def _unimodal():
    # 8 x 8 zeros; a 3 x 3 block of 0.5 (u8 127) at rows 2-4, cols 3-5; its centre 1.0 (u8 255)
    m = np.zeros((8, 8))
    m[2:5, 3:6] = 0.5
    m[3, 4] = 1.0
    return m


def _check_both(m, thr, expected, multi=True):
    """Reference boxes at threshold thr equal `expected`; fast best IoU equals reference."""
    got = M.boxes_at_threshold(m, thr, multi)
    assert got.tolist() == expected
    gt = np.array(expected[:1])
    thresholds = np.array([thr])
    ref = M.reference_best_ious(m, gt, thresholds, multi)
    assert ref[0] == 1.0
    assert M.fast_best_ious(m, gt, thresholds, multi)[0] == 1.0
    assert M.fast_best_ious(m, gt, thresholds, multi, use_numba=False)[0] == 1.0


def test_boxes_unimodal_each_threshold():
    m = _unimodal()
    # tau 0 and 0.4: cut 0 / int(102.0) = 102 -> the block; boundingRect (3, 2, 3, 3) -> [3, 2, 6,
    # 5]
    _check_both(m, 0.0, [[3, 2, 6, 5]])
    _check_both(m, 0.4, [[3, 2, 6, 5]])
    # tau 0.625: cut int(159.375) = 159 -> only the centre (4, 3): [4, 3, 5, 4]
    _check_both(m, 0.625, [[4, 3, 5, 4]])


def test_strict_threshold_boundary():
    m = _unimodal()
    # tau 0.5: cut int(127.5) = 127; the block's pixels are 127, and 127 > 127 is false -> centre
    # only
    assert M.boxes_at_threshold(m, 0.5).tolist() == [[4, 3, 5, 4]]
    # tau 0.498: cut int(126.99) = 126 -> the block is in
    assert M.boxes_at_threshold(m, 0.498).tolist() == [[3, 2, 6, 5]]


def test_multimodal_all_vs_largest_contour():
    m = np.zeros((10, 12))
    m[1:3, 1:3] = 1.0     # small blob: 2 x 2 at x 1-2, y 1-2 -> [1, 1, 3, 3]
    m[5:9, 6:11] = 0.75   # large blob: 5 x 4 at x 6-10, y 5-8 -> [6, 5, 11, 9], x + w = 11 = W - 1
    boxes = sorted(M.boxes_at_threshold(m, 0.1, multi_contour=True).tolist())
    assert boxes == [[1, 1, 3, 3], [6, 5, 11, 9]]
    assert M.boxes_at_threshold(m, 0.1, multi_contour=False).tolist() == [[6, 5, 11, 9]]
    # above 0.75 of the max (cut int(0.8 * 255) = 204 > 191) only the small blob remains
    assert M.boxes_at_threshold(m, 0.8, multi_contour=True).tolist() == [[1, 1, 3, 3]]
    gt = [[6, 5, 11, 9]]
    for multi in (True, False):
        ref = M.reference_best_ious(m, gt, [0.1, 0.8], multi)
        assert ref.tolist() == [1.0, 0.0]
        assert M.fast_best_ious(m, gt, [0.1, 0.8], multi).tolist() == [1.0, 0.0]


def test_ring_hole_contour_counts():
    m = np.zeros((10, 10))
    m[1:9, 1:9] = 1.0   # square x, y 1-8 -> outer contour [1, 1, 9, 9] (x + w = 9 = W - 1)
    m[3:6, 3:7] = 0.0   # hole x 3-6, y 3-5; its contour runs over x 2-7, y 2-6 -> [2, 2, 8, 7]
    boxes = M.boxes_at_threshold(m, 0.5, multi_contour=True).tolist()
    assert sorted(boxes) == [[1, 1, 9, 9], [2, 2, 8, 7]]
    gt = [[2, 2, 8, 7]]
    # the hole's box matches the GT exactly; the outer box alone gives 42 / 81
    assert M.reference_best_ious(m, gt, [0.5], True)[0] == 1.0
    assert M.fast_best_ious(m, gt, [0.5], True)[0] == 1.0
    assert M.fast_best_ious(m, gt, [0.5], True, use_numba=False)[0] == 1.0
    assert M.iou_matrix([[1, 1, 9, 9]], gt)[0, 0] == pytest.approx(42 / 81)


def test_all_zero_map_gives_zero_box():
    m = np.zeros((6, 6))
    assert M.boxes_at_threshold(m, 0.3).tolist() == [[0, 0, 0, 0]]
    thr = M.threshold_grid(0.1)
    for fn in (M.reference_best_ious, M.fast_best_ious):
        assert fn(m, [[0, 0, 0, 0]], thr).tolist() == [1.0] * 10
        assert fn(m, [[0, 0, 1, 1]], thr).tolist() == [0.25] * 10


def test_threshold_chosen_over_split_not_per_image():
    m = _unimodal()
    # image A is right only below 0.5 (block box), image B only above (centre box)
    gt_a, gt_b = [[3, 2, 6, 5]], [[4, 3, 5, 4]]
    for method in ("fast", "reference"):
        ev = M.MaxBoxAccEvaluator(0.01, (50,), multi_contour=True, method=method)
        ia = ev.accumulate(m, gt_a)
        ib = ev.accumulate(m, gt_b)
        assert ia.max() == 1.0 and ib.max() == 1.0        # per image, each can be perfect
        res = ev.compute()
        # but one threshold serves both: 50, not 100
        assert res["maxboxacc_per_iou"]["50"] == 50.0
        assert res["best_threshold"]["50"] == 0.0


def test_maxboxacc_v2_is_mean_over_ious():
    m = _unimodal()
    ev = M.MaxBoxAccEvaluator(0.001, (30, 50, 70))
    ev.accumulate(m, [[3, 2, 7, 6]])  # block box [3,2,6,5] vs this: 16 / 25 = 0.64
    res = ev.compute()
    assert res["maxboxacc_per_iou"] == {"30": 100.0, "50": 100.0, "70": 0.0}
    assert res["maxboxacc_v2"] == pytest.approx(200 / 3)
    assert len(ev.thresholds) == 1000


def _cam_like(rng, s, n):
    x = torch.from_numpy(rng.standard_normal((1, 1, s, s))).float()
    x = F.interpolate(x, size=(n, n), mode="bicubic", align_corners=False)[0, 0].double().numpy()
    return (x - x.min()) / (x.max() - x.min())


def _random_maps(rng, count):
    for i in range(count):
        n = int(rng.integers(4, 33))
        kind = i % 5
        if kind == 0:
            m = rng.random((n, n))
        elif kind == 1:
            m = _cam_like(rng, int(rng.integers(2, 8)), n)
        elif kind == 2:
            m = (rng.random((n, n)) > 0.5) * rng.random()
        elif kind == 3:
            m = np.floor(rng.random((n, n)) * 4) / 3
        else:  # rings and nested holes
            yy, xx = np.mgrid[:n, :n]
            r = np.hypot(yy - n / 2 + rng.random(), xx - n / 2 + rng.random())
            m = (np.sin(r * rng.uniform(0.5, 2.0)) + 1) / 2
        gt = rng.integers(0, n, (int(rng.integers(1, 4)), 4))
        gt[:, 2:] = np.maximum(gt[:, :2], gt[:, 2:])
        yield m, gt


@pytest.mark.parametrize("multi", [True, False])
def test_fast_equals_reference_on_random_maps(multi):
    rng = np.random.default_rng(0)
    thr = M.threshold_grid(0.001)
    for m, gt in _random_maps(rng, 60):
        ref = M.reference_best_ious(m, gt, thr, multi)
        np.testing.assert_array_equal(M.fast_best_ious(m, gt, thr, multi), ref)
        if multi:
            np.testing.assert_array_equal(M.fast_best_ious(m, gt, thr, multi, use_numba=False),
                                          ref)


def test_fast_equals_reference_cam_sized_maps():
    rng = np.random.default_rng(1)
    thr = M.threshold_grid(0.01)
    for i in range(3):
        m = _cam_like(rng, 14, 224)
        m = np.clip(m + (rng.random(m.shape) * 0.1 if i == 2 else 0), 0, 1)  # a fragmented one
        gt = [[40, 50, 150, 170], [0, 0, 60, 60]]
        for multi in (True, False):
            np.testing.assert_array_equal(M.fast_best_ious(m, gt, thr, multi),
                                          M.reference_best_ious(m, gt, thr, multi))


def test_evaluators_agree_and_bad_maps_are_named():
    rng = np.random.default_rng(2)
    fast = M.MaxBoxAccEvaluator(0.005, (30, 50, 70), True, "fast")
    ref = M.MaxBoxAccEvaluator(0.005, (30, 50, 70), True, "reference")
    for m, gt in _random_maps(rng, 20):
        fast.accumulate(m, gt)
        ref.accumulate(m, gt)
    assert fast.compute() == ref.compute()
    with pytest.raises(M.ScoreMapError, match="img7.*2-D"):
        fast.accumulate(np.zeros((2, 2, 2)), [[0, 0, 1, 1]], "img7")
    with pytest.raises(M.ScoreMapError, match="img8.*NaN"):
        fast.accumulate(np.full((4, 4), np.nan), [[0, 0, 1, 1]], "img8")
    with pytest.raises(M.ScoreMapError, match="img9.*outside"):
        fast.accumulate(np.full((4, 4), 1.5), [[0, 0, 1, 1]], "img9")


def test_loc_at_fixed_threshold_and_operator():
    m = _unimodal()
    # threshold 0.15 -> block box [3, 2, 6, 5]; vs [3, 2, 7, 6]: IoU 16 / 25 = 0.64
    gt = [[3, 2, 7, 6]]
    assert M.loc_at_threshold(m, gt, 0.15, 0.64, ">=")
    assert not M.loc_at_threshold(m, gt, 0.15, 0.64, ">")
    assert not M.loc_at_threshold(m, gt, 0.625, 0.5)
    acc = M.LocAccuracy(0.15, 0.5)
    acc.accumulate(m, gt, label=3, topk_pred=[3, 1, 2, 0, 4])   # correct class, box ok
    acc.accumulate(m, gt, label=3, topk_pred=[1, 3, 2, 0, 4])   # box ok, class in top-5 only
    acc.accumulate(m, [[0, 0, 1, 1]], label=3, topk_pred=[3, 0, 1, 2, 4])  # wrong box
    acc.accumulate(m, gt, label=3, topk_pred=[0, 1, 2, 4, 5])   # box ok, class not in top-5
    r = acc.compute()
    assert r == {"gt_known_loc": 75.0, "top1_loc": 25.0, "top5_loc": 50.0, "top1_cls": 50.0}


def test_centred_box():
    assert M.centred_box((224, 224), 0.5).tolist() == [[56, 56, 167, 167]]
    # w 10: side 5 from x (10 - 5) // 2 = 2 to 6; h 6: side 3 from y 1 to 3
    assert M.centred_box((10, 6), 0.5).tolist() == [[2, 1, 6, 3]]


def _edge_case_maps(rng):
    """(name, map) pairs the compiled sweep must get exactly right."""
    yy, xx = np.mgrid[:21, :21]
    rings = (np.hypot(yy - 10, xx - 10) // 2 % 2) * 0.6 + 0.2  # concentric rings: nested holes
    ring_hole = np.full((9, 9), 0.3)
    ring_hole[2:7, 2:7] = 1.0
    ring_hole[4, 4] = 0.9          # a hole that exists only at the top levels (u8 229..254)
    framed = rng.random((12, 17)) * 0.5
    framed[0, :] = framed[-1, :] = framed[:, 0] = framed[:, -1] = 1.0  # bright frame
    return [
        ("constant", np.full((5, 7), 0.5)),
        ("all ones", np.ones((6, 4))),
        ("one pixel", np.array([[0.7]])),
        ("row", rng.random((1, 13))),
        ("column", rng.random((11, 1))),
        ("two levels", (rng.random((9, 23)) > 0.5) * 0.4 + 0.3),
        ("plateaus", np.floor(rng.random((16, 10)) * 3) / 2),
        ("ties", np.round(rng.random((17, 29)) * 4) / 4),
        ("rings", rings),
        ("ring hole", ring_hole),
        ("bright frame", framed),
        ("checkerboard", (yy + xx) % 2 * 1.0),
        ("float32", _cam_like(rng, 5, 37).astype(np.float32)),
        ("textured", np.clip(_cam_like(rng, 4, 40) + 0.15 * rng.standard_normal((40, 40)), 0, 1)),
    ]


def test_fast_equals_reference_edge_cases():
    rng = np.random.default_rng(5)
    thr = M.threshold_grid(0.001)
    for name, m in _edge_case_maps(rng):
        h, w = m.shape
        gts = [[[0, 0, w - 1, h - 1]],
               [[w // 3, h // 4, w - 1, h // 2], [0, 0, 0, 0], [1, 1, w // 2, h - 1]]]
        for gt in gts:
            for multi in (True, False):
                ref = M.reference_best_ious(m, gt, thr, multi)
                np.testing.assert_array_equal(M.fast_best_ious(m, gt, thr, multi), ref,
                                              err_msg=f"{name} {multi}")
                if multi:
                    np.testing.assert_array_equal(M.fast_best_ious(m, gt, thr, multi,
                                                                   use_numba=False), ref,
                                                  err_msg=name)


def test_fast_equals_reference_non_square_several_boxes():
    rng = np.random.default_rng(6)
    thr = M.threshold_grid(0.001)
    for i in range(12):
        h, w = (int(v) for v in rng.integers(3, 48, 2))
        m = _cam_like(rng, int(rng.integers(2, 7)), max(h, w))[:h, :w]
        m = (m - m.min()) / (m.max() - m.min() + 1e-12)
        if i % 3 == 2:  # fragmented, many small components and holes
            m = np.clip(m + 0.2 * rng.standard_normal(m.shape), 0, 1)
        k = int(rng.integers(1, 5))  # GT boxes
        bx, by = np.sort(rng.integers(0, w, (k, 2)), 1), np.sort(rng.integers(0, h, (k, 2)), 1)
        gt = np.stack([bx[:, 0], by[:, 0], bx[:, 1], by[:, 1]], 1)
        ref = M.reference_best_ious(m, gt, thr, True)
        np.testing.assert_array_equal(M.fast_best_ious(m, gt, thr, True), ref)


def test_euler_table_counts_holes():
    # adding pixels one by one, sum(_EULER8[mask]) / 4 = components (8-conn) - holes (4-conn, not
    # on the frame)
    rng = np.random.default_rng(7)
    # (dy, dx): E, NE, ..., SE
    ring = [(0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1)]
    for _ in range(20):
        fg = rng.random((10, 12)) < rng.uniform(0.2, 0.8)
        on = np.zeros((12, 14), bool)
        euler4 = 0
        for y, x in rng.permutation(np.argwhere(fg)):
            mask = sum(int(on[y + 1 + dy, x + 1 + dx]) << d for d, (dy, dx) in enumerate(ring))
            euler4 += int(M._EULER8[mask])
            on[y + 1, x + 1] = True
        n_fg = cv2.connectedComponents(fg.astype(np.uint8), connectivity=8)[0] - 1
        n_bg, lab = cv2.connectedComponents(np.pad(~fg, 1, constant_values=True).astype(np.uint8),
                                            connectivity=4)
        # background labels: 0 is fg, one touches the frame
        assert euler4 == 4 * (n_fg - (n_bg - 2))


def test_fast_validates_maps():
    for bad, msg in ((np.full((4, 4), np.nan), "NaN"), (np.full((4, 4), 1.5), "outside"),
                     (np.full((4, 4), -0.1, np.float32), "outside"), (np.zeros((2, 2, 2)), "2-D")):
        with pytest.raises(M.ScoreMapError, match=msg):
            M.fast_best_ious(bad, [[0, 0, 1, 1]], [0.5], image_id="x")


def test_bench_families_identical_and_mixed_ratio():
    # the bench's own exactness check and bookkeeping (not its timings): families 3:1, headline =
    # mix of per-image times
    from wsol.bench import make_bench_maps, run_wsol_bench

    out = run_wsol_bench(n_maps=4, n_reference=4, repeats=1, interval=0.01)
    assert out["identical"] and out["v2_identical"] and out["v1_identical"]
    # the reported result over all maps, recomputed
    ref_ev = M.MaxBoxAccEvaluator(0.01, method="reference")
    for m, gt in make_bench_maps(4):
        ref_ev.accumulate(m, gt)
    assert out["v2_result_fast"] == ref_ev.compute()["maxboxacc_v2"]
    assert out["family_share"] == {"smooth": 0.75, "fragmented": 0.25}
    ref, fast = out["v2_reference_ms_by_family"], out["v2_fast_ms_by_family"]
    assert out["v2_reference_ms_per_image"] == pytest.approx(0.75 * ref["smooth"] + 0.25
                                                             * ref["fragmented"])
    assert out["maxboxacc_v2_speedup"] == pytest.approx(
        out["v2_reference_ms_per_image"] / (0.75 * fast["smooth"] + 0.25 * fast["fragmented"]))
    assert out["maxboxacc_v2_speedup_by_family"]["smooth"] == pytest.approx(ref["smooth"]
                                                                            / fast["smooth"])
