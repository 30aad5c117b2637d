"""SaliencyMix against the official code: OpenCV's fine-grained saliency and the official
`saliency_bbox` (tests/fixtures/saliencymix_official.npz, tools/make_saliencymix_fixture.py), and
the method's mixing by hand."""

from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.methods import ResNetStages, build_method
from pretrain.methods.saliencymix import (
    blur3,
    fine_grained_saliency,
    gray_bgr,
    paste_box,
    peak_box,
    read_image,
    saliency_peak,
)

FIXTURE = Path(__file__).parents[1] / "fixtures" / "saliencymix_official.npz"


def test_fine_grained_saliency_equals_opencv():
    """33 images (16 px to 224 px, non-square too; noise, flat with a patch, ramps): every pixel
    equal."""
    f = np.load(FIXTURE)
    for k in range(int(f["count"])):
        image = f[f"image_{k}"].transpose(1, 2, 0)
        np.testing.assert_array_equal(fine_grained_saliency(image), f[f"saliency_{k}"],
                                      err_msg=str(k))


def test_boxes_equal_the_official_saliency_bbox():
    f = np.load(FIXTURE)
    for k in range(int(f["count"])):
        image = f[f"image_{k}"]
        (y0, y1, x0, x1), kept = peak_box(*image.shape[1:], float(f[f"lam_{k}"]),
                                          saliency_peak(image))
        assert [y0, x0, y1, x1] == f[f"box_{k}"].tolist(), k
        assert kept == pytest.approx(1 - (y1 - y0) * (x1 - x0) / (image.shape[1] * image.shape[2]))


def test_grey_and_blur_by_hand():
    # grey: (3735 b + 19235 g + 9798 r + 2^14) >> 15 with channel 0 read as blue
    img = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 100, 200]]], dtype=np.uint8)
    assert gray_bgr(img).tolist() == [[29, 150, 76, (37350 + 1923500 + 1959600 + 16384) >> 15]]
    # blur of a single bright pixel: the [1 2 1]^T [1 2 1] / 16 kernel, rounded half up
    g = np.zeros((5, 5), np.uint8)
    g[2, 2] = 160
    out = blur3(g)
    assert out[1:4, 1:4].tolist() == [[10, 20, 10], [20, 40, 20],
                                      [10, 20, 10]] and out.sum() == 160


def test_peak_box_by_hand():
    # lam 0.75: side ratio 0.5, 16 x 16 -> an 8 x 8 box around (3, 12), clipped at the top
    assert peak_box(16, 16, 0.75, (3, 12)) == ((0, 7, 8, 16), 1 - 7 * 8 / 256)
    assert peak_box(10, 20, 0.0, (5, 10)) == ((0, 10, 0, 20), 0.0)  # lam 0: the whole image


def test_the_method_mixes_around_the_peak_of_the_first_partner():
    torch.manual_seed(0)
    method = build_method("saliencymix", ResNetStages("resnet18", 4), 4, prob=1.0)
    images = torch.rand(3, 3, 16, 16)
    images[2, :, 10, 4] = 1.0  # a bright spot in image 2, the partner of example 0
    images[2, :, 9:12, 3:6] = torch.tensor([1.0, 1.0, 1.0]).view(3, 1, 1)
    perm = torch.tensor([2, 0, 1])
    x, y = method.mix(images, torch.tensor([0, 1, 2]), perm, 0.75)
    peak = saliency_peak(read_image(images, perm[:1]))
    box, kept = peak_box(16, 16, 0.75, peak)
    assert torch.equal(x, paste_box(images, perm, box))
    y0, y1, x0, x1 = box
    assert torch.equal(x[0, :, y0:y1, x0:x1], images[2, :, y0:y1, x0:x1])
    assert torch.equal(x[1, :, :y0], images[1, :, :y0])
    expect = torch.tensor([[kept, 0, 1 - kept, 0], [1 - kept, kept, 0, 0], [0, 1 - kept, kept, 0]])
    assert torch.allclose(y, expect)
    assert read_image(images, perm[:1]).dtype == np.uint8
    assert np.array_equal(read_image(images, perm[:1]),
                          np.round(images[2].numpy() * 255).astype(np.uint8))


def test_knobs_are_checked():
    net = ResNetStages("resnet18", 4)
    with pytest.raises(ValueError, match="prob"):
        build_method("saliencymix", net, 4, prob=1.5)
    with pytest.raises(ValueError, match="alpha"):
        build_method("saliencymix", net, 4, alpha=0.0)
