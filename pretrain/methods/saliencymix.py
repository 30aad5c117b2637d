"""SaliencyMix (Uddin et al., "SaliencyMix: A Saliency Guided Data Augmentation Strategy for Better
Regularization", arXiv:2006.01791): a CutMix box centred on the saliency peak of the pasted image.

The official code (afm-shahab-uddin/SaliencyMix, `saliency_bbox` in
SaliencyMix_CIFAR/saliencymix.py and SaliencyMix-ImageNet/train.py) computes one saliency map per
batch, of the partner of the first example, with OpenCV's `cv2.saliency.StaticSaliencyFineGrained`
(opencv-contrib), and pastes the same box into every example. `fine_grained_saliency` is that
detector (Montabone & Soto, "Human detection using a mobile platform and novel features derived
from a visual saliency mechanism", 2010) written in numpy: it equals OpenCV's output (the contrib
build of the OpenCV this project installs) on tests/fixtures/saliencymix_official.npz, so the
project keeps its plain OpenCV dependency. The map runs on the host: one image of the batch crosses
to it (`read_image`), one transfer per mixed batch, as PuzzleMix's graph cut
(pretrain/methods/base.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pretrain.methods.base import Method, mixup

# the centre-surround half-widths of the six scales (OpenCV's fine-grained saliency)
NEIGHBOURHOODS = (12, 24, 48, 28, 56, 112)


def gray_bgr(image: np.ndarray) -> np.ndarray:
    """uint8 [h, w, 3] -> uint8 [h, w]: OpenCV's 8-bit BGR2GRAY (15-bit fixed point, round half
    up). Channel 0 is read as blue: the official code hands OpenCV an RGB tensor, so its red counts
    with blue's weight."""
    c = image.astype(np.int64)
    return ((c[..., 0] * 3735 + c[..., 1] * 19235 + c[..., 2] * 9798
             + (1 << 14)) >> 15).astype(np.uint8)


def blur3(gray: np.ndarray) -> np.ndarray:
    """uint8 [h, w] -> uint8: the 3 x 3 Gaussian [1, 2, 1] / 4 in both directions, border reflected
    about the edge pixel, rounded half up (OpenCV's bit-exact 8-bit GaussianBlur with sigma 0)."""
    p = np.pad(gray.astype(np.int64), 1, mode="reflect")
    rows = p[:-2] + 2 * p[1:-1] + p[2:]
    return ((rows[:, :-2] + 2 * rows[:, 1:-1] + rows[:, 2:] + 8) >> 4).astype(np.uint8)


def centre_surround(integral: np.ndarray, gray: np.ndarray,
                    n: int) -> tuple[np.ndarray, np.ndarray]:
    """On- and off-centre contrast at half-width n: the mean of the (2n) x (2n) window (clipped to
    the image, the centre pixel left out) against the pixel, truncated to uint8, in float32 as
    OpenCV computes it.
    integral: [h + 1, w + 1] float32 box sums; gray: uint8 [h, w] -> (on, off) uint8 [h, w]."""
    h, w = gray.shape
    ys, xs = np.arange(h), np.arange(w)
    y1, y2 = np.clip(ys - n + 1, 0, h), np.clip(ys + n + 1, 0, h)
    x1, x2 = np.clip(xs - n + 1, 0, w), np.clip(xs + n + 1, 0, w)
    window = integral[y2][:, x2] + integral[y1][:, x1] - integral[y2][:, x1] - integral[y1][:, x2]
    count = ((y2 - y1)[:, None] * (x2 - x1)[None, :] - 1).astype(np.float32)
    g = gray.astype(np.float32)
    mean = (window.astype(np.float32) - g) / count
    return np.maximum(g - mean, 0).astype(np.uint8), np.maximum(mean - g, 0).astype(np.uint8)


def _to_255(total: np.ndarray) -> np.ndarray:
    """A scale sum [h, w] (int) stretched so that its maximum is 255, truncated; an all-zero sum
    stays 0."""
    top = total.max()
    if top == 0:
        return np.zeros(total.shape, np.uint8)
    return (255.0 * (total.astype(np.float32) / np.float32(top))).astype(np.uint8)


def fine_grained_saliency(image: np.ndarray) -> np.ndarray:
    """Montabone & Soto's fine-grained static saliency of uint8 [h, w, 3] -> uint8 [h, w], equal to
    OpenCV's `StaticSaliencyFineGrained.computeSaliency` times 255: grey, blurred twice, on/off
    centre-surround contrast summed over six scales, each sum stretched to 255, on + off stretched
    by the larger maximum. That last stretch can exceed 255, and OpenCV's integer conversion keeps
    the low byte; so does this function."""
    gray = blur3(blur3(gray_bgr(image)))
    integral = np.zeros((gray.shape[0] + 1, gray.shape[1] + 1), np.float32)
    integral[1:, 1:] = gray.astype(np.int64).cumsum(0).cumsum(1)
    on_sum = np.zeros(gray.shape, np.int64)
    off_sum = np.zeros(gray.shape, np.int64)
    for n in NEIGHBOURHOODS:
        on, off = centre_surround(integral, gray, n)
        on_sum += on
        off_sum += off
    on8, off8 = _to_255(on_sum), _to_255(off_sum)
    top = max(int(on8.max()), int(off8.max()))
    if top == 0:
        return np.zeros(gray.shape, np.uint8)
    both = (255.0 * (on8.astype(np.int64) + off8).astype(np.float32)) / np.float32(top)
    return (both.astype(np.int64) & 255).astype(np.uint8)


def saliency_peak(image: np.ndarray) -> tuple[int, int]:
    """(row, column) of the first maximum (row-major) of the saliency of uint8 [3, h, w]."""
    sal = fine_grained_saliency(np.ascontiguousarray(image.transpose(1, 2, 0)))
    row, col = np.unravel_index(int(np.argmax(sal)), sal.shape)
    return int(row), int(col)


def peak_box(h: int, w: int, lam: float,
             peak: tuple[int, int]) -> tuple[tuple[int, int, int, int], float]:
    """The official box of side ratio sqrt(1 - lam) around `peak`, clipped to the image: ((y0, y1,
    x0, x1), lam_kept) with lam_kept = 1 - box area / (h * w), the label weight of the first
    image."""
    cut = math.sqrt(1.0 - float(lam))
    ch, cw = int(h * cut), int(w * cut)
    (cy, cx) = peak
    y0, y1 = min(max(cy - ch // 2, 0), h), min(max(cy + ch // 2, 0), h)
    x0, x1 = min(max(cx - cw // 2, 0), w), min(max(cx + cw // 2, 0), w)
    return (y0, y1, x0, x1), 1.0 - (y1 - y0) * (x1 - x0) / (h * w)


def read_image(images: torch.Tensor, index: torch.Tensor) -> np.ndarray:
    """The image images[index] ([b, 3, h, w] in [0, 1]; index a 1-element LongTensor on the same
    device) as uint8 [3, h, w], round(255 x): the one device-to-host transfer of a mixed batch."""
    x = images.detach().index_select(0, index)[0].float().mul(255).round_().clamp_(0, 255)
    return x.to(torch.uint8).numpy(force=True)


def paste_box(images: torch.Tensor, perm: torch.Tensor, box) -> torch.Tensor:
    """[b, 3, h, w]: every image with the box (y0, y1, x0, x1) taken from its partner
    images[perm]."""
    y0, y1, x0, x1 = box
    out = images.clone()
    out[..., y0:y1, x0:x1] = images[..., y0:y1, x0:x1].index_select(0, perm)
    return out


class SaliencyMix(Method):
    """SaliencyMix as the official code runs it: with probability `prob` (0.5 in the CIFAR script,
    1.0 in the ImageNet command), lam ~ Beta(alpha, alpha), the partners a permutation, one box of
    side ratio sqrt(1 - lam) centred on the saliency peak of the first example's partner, pasted
    from the partners into every image; the label weight is the kept area (the official
    lam-weighted cross-entropy, as a soft target). The saliency is that of the 8-bit image
    round(255 x) (the official code hands OpenCV the normalised float tensor, whose bytes OpenCV's
    8-bit detector then reads; see docs/fidelity.md). Otherwise plain ERM."""

    def __init__(self, model, num_classes, alpha: float = 1.0, prob: float = 0.5,
                 dense_loss: bool = False):
        super().__init__(model, num_classes, dense_loss)
        if not alpha > 0:
            raise ValueError(f"saliencymix alpha must be > 0, got {alpha}")
        if not 0 <= prob <= 1:
            raise ValueError(f"saliencymix prob must be in [0, 1], got {prob}")
        self.alpha, self.prob = float(alpha), float(prob)

    def mix(self, images, labels, perm, lam):
        """-> (mixed images [b, 3, h, w], soft targets [b, c]) for a permutation and a host lam."""
        h, w = images.shape[-2:]
        box, kept = peak_box(h, w, lam, saliency_peak(read_image(images, perm[:1])))
        return paste_box(images, perm, box), mixup(self.targets(labels), perm, kept)

    def forward(self, images, labels):
        if self._rand() >= self.prob:
            return {"loss": self.loss_of(self.logits_of(self.model.features(images)),
                                         self.targets(labels))}
        perm, lam = self._perm(images.shape[0]), self._beta(self.alpha)
        with torch.no_grad():
            x, y_mix = self.mix(images, labels, perm, lam)
        return {"loss": self.loss_of(self.logits_of(self.model.features(x)), y_mix)}
