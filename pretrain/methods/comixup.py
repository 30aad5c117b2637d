"""Co-Mixup (Kim, Choo, Jeong, Song, "Co-Mixup: Saliency Guided Joint Mixup with Supermodular
Diversity", ICLR 2021, arXiv:2102.03065): every output image is a block-wise labeling by several
inputs of its partition of the batch, chosen jointly so that outputs show salient blocks and differ
from each other; targets are the inputs' block shares.

The method equals the official CIFAR / TinyImageNet code (snu-mllab/Co-Mixup main.py `train`,
mixup.py `mixup_process`, match.py `mix_input`); the mask optimisation is
`pretrain.methods.comixup_graphcut`, the saliency PuzzleMix's (the same definition: sqrt of the
channel mean of the squared input gradient of the clean loss). tests/pretrain/test_comixup.py pins
it with tests/fixtures/comixup_official.npz.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pretrain.methods.base import Method, host_to_device
from pretrain.methods.comixup_graphcut import batch_labelings
from pretrain.methods.puzzlemix import _saliency_forward, read_to_host
from pretrain.methods.puzzlemix_graphcut import have_gco

PEAK_WINDOW = 8  # main.py: the most salient 8 x 8 window locates each image (input compatibility)


def salient_points(sal: torch.Tensor, window: int = PEAK_WINDOW) -> torch.Tensor:
    """The corner (row, column) of each image's most salient window x window patch (main.py:
    avg_pool2d with stride 1, argmax, the first on ties). sal [b, h, w] -> float [b, 2]."""
    z = F.avg_pool2d(sal, kernel_size=window, stride=1)
    idx = z.reshape(sal.shape[0], -1).argmax(1)
    return torch.stack([idx // z.shape[-1], idx % z.shape[-1]], 1).float()


def mix_input(onehot: torch.Tensor, x: torch.Tensor,
              y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One partition's outputs (`mix_input`): onehot [n_out, g, g, n] upsampled to the images by
    nearest neighbour; x [n, C, h, w], y [n, c] -> (images [n_out, C, h, w], targets [n_out, c]:
    the block shares of the inputs' targets, normalised to sum 1)."""
    mask = F.interpolate(onehot.permute(0, 3, 1, 2).to(x.dtype), size=x.shape[-2:], mode="nearest")
    out = torch.einsum("oihw,ichw->ochw", mask, x)
    target = onehot.sum((1, 2)).float() @ y.float()
    return out, target / target.sum(-1, keepdim=True)


class CoMixup(Method):
    """Co-Mixup as the official CIFAR-100 / TinyImageNet command runs it (snu-mllab/Co-Mixup
    README, main.py): the saliency of the clean batch (PuzzleMix's; `clean_lam` > 0: the model in
    train mode and the clean loss 2 clean_lam / num_classes * CE added, as main.py; 0: eval mode,
    no clean loss), pooled to a `block_num` x `block_num` grid (-1: a grid drawn from 2, 4, 8, 16);
    the batch cut into partitions of `part`; per partition `comix_labelings` (beta, gamma, thres,
    thres_type, eta, omega, set_resolve, niter; the prior Dirichlet(alpha) and the initial labels
    drawn on the host), then `mix_input`.
    loss: bce (main.py: BCELoss(softmax(logits), targets), the mean over examples and classes) or
    ce. The optimisation runs on the host after one device-to-host copy per batch; solver: gco |
    swap | auto (as PuzzleMix)."""

    def __init__(self, model, num_classes, block_num: int = 4, part: int = 20, alpha: float = 2.0,
                 beta: float = 0.32, gamma: float = 1.0, thres: float = 0.83,
                 thres_type: str = "hard", eta: float = 0.05, omega: float = 0.001,
                 set_resolve: bool = True, niter: int = 4, clean_lam: float = 1.0,
                 loss: str = "bce", solver: str = "auto", dense_loss: bool = False):
        super().__init__(model, num_classes, dense_loss)
        if (
            thres_type not in ("hard", "soft")
            or loss not in ("bce", "ce")
            or solver not in ("auto", "gco", "swap")
        ):
            raise ValueError(f"comixup: thres_type hard | soft (got {thres_type!r}), loss bce | "
                             f"ce (got {loss!r}), solver auto | gco | swap (got {solver!r})")
        if solver == "gco" and not have_gco():
            raise ImportError("comixup solver='gco' needs gco-wrapper (pip install "
                              "gco-wrapper); use swap or auto")
        if dense_loss and loss == "bce":
            raise ValueError("comixup: dense_loss needs loss ce")
        self.block_num, self.part, self.alpha, self.beta = int(block_num), int(part), alpha, beta
        self.gamma = gamma
        self.thres, self.thres_type, self.eta, self.omega = thres, thres_type, eta, omega
        self.set_resolve, self.niter = bool(set_resolve), int(niter)
        self.clean_lam = float(clean_lam)
        self.loss, self.solver = loss, solver

    def _grid(self, h: int) -> int:
        g = self.block_num if self.block_num != -1 else self._choice([2, 4, 8, 16])
        if h % g:
            raise ValueError(f"comixup: block_num {g} must divide the input size {h}")
        return g

    def saliency(self, images, labels):
        """-> (saliency [b, h, w], the weighted clean loss with its graph, or None when clean_lam
        is 0)."""
        if self.clean_lam > 0:
            return _saliency_forward(self, images, labels, True,
                                     2 * self.clean_lam / self.num_classes)
        return _saliency_forward(self, images, labels, False)[0], None

    def labelings(self, pooled: np.ndarray, a_dist: np.ndarray) -> np.ndarray:
        """Host: `batch_labelings` of the host copies, prior and initial labels from host_rng."""
        return batch_labelings(pooled, a_dist, self.part, self.host_rng, self.alpha, self.omega,
                               beta=self.beta, gamma=self.gamma, eta=self.eta, thres=self.thres,
                               thres_type=self.thres_type, set_resolve=self.set_resolve,
                               niter=self.niter, solver=self.solver)

    def mix(self, images, labels, sal):
        """-> (mixed images [b, 3, h, w], targets [b, c]) from the saliency sal [b, h, w]."""
        g = self._grid(images.shape[-1])
        sal = sal.detach().float()
        pooled = F.avg_pool2d(sal, images.shape[-1] // g)
        pts = salient_points(sal)
        a_dist = (pts.unsqueeze(1) - pts.unsqueeze(0)).abs().sum(-1)
        onehots = host_to_device(self.labelings(*read_to_host([pooled, a_dist])), images.device)
        y, xs, ys, i = self.targets(labels), [], [], 0
        for s in range(0, images.shape[0], self.part):
            n = min(self.part, images.shape[0] - s)
            onehot = onehots[i:i + n * g * g * n].reshape(n, g, g, n)
            i += onehot.numel()
            x_p, y_p = mix_input(onehot, images[s:s + n], y[s:s + n])
            xs.append(x_p)
            ys.append(y_p)
        return torch.cat(xs), torch.cat(ys)

    def forward(self, images, labels):
        sal, clean = self.saliency(images, labels)
        with torch.no_grad():
            x, y = self.mix(images, labels, sal)
        logits = self.logits_of(self.model.features(x))
        if self.loss == "bce":
            out = {"loss": F.binary_cross_entropy(torch.softmax(logits.float(), dim=-1),
                                                  y.float())}
        else:
            out = {"loss": self.loss_of(logits, y)}
        if clean is not None:
            out["loss_clean"] = clean
        return out
