"""AlignMix (AlignMixup, Venkataramanan et al., CVPR 2022, arXiv 2103.15375): the released code's
variant, the paper's stage-2 encoder, AlignMix/AE, and the entropic optimal transport that aligns
two feature tensors."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.methods.base import Method, mixup


class _AlignMixBase(Method):
    """The machinery the AlignMix variants share (AlignMixup, Venkataramanan et al., CVPR 2022,
    arXiv 2103.15375): per batch one mode (`_mode`): input (input mixup), feat (the partner's
    feature tensor A' aligned to A and mixed, eq. 12), feat_rev (A aligned to A', eq. 13; the same
    plan, as the released code's branch 1), embedding (mixup of e = f(A), logit trick). lam ~
    Beta(alpha, alpha); Sinkhorn in the log domain with `eps`, at most `n_iters` iterations,
    optional early stop `tol` (see `sinkhorn`); the plan is detached. The returned
    "stat_sinkhorn_*" numbers (iterations, row / column marginal errors) are logged by the trainer.

    head "gap": e = global average pool of the full layer4 map (the released code). head "fc": the
    paper's stage-2 encoder (`StageTwoEncoder`) on A pooled to resolution x resolution. With the
    GAP head aligned mixing (eq. 12) equals embedding mixing (every column of R sums to 1), which
    tests pin."""

    # the modes a variant may draw (`modes`); AlignMix/AE adds "clean", the reconstruction of
    # `reconstruct`
    MODES = ("input", "feat", "feat_rev", "embedding")

    def __init__(self, model, num_classes, alpha, eps, n_iters, tol, modes, head, resolution,
                 dense_loss=False):
        super().__init__(model, num_classes, dense_loss)
        if getattr(self.model, "tokens", False):
            raise ValueError("alignmix aligns the spatial positions of a CNN's feature map [b, "
                             "d, h, w]; a ViT's last stage gives tokens (use a ResNet arch)")
        bad = [m for m in modes if m not in self.MODES]
        if bad or not modes:
            raise ValueError(f"alignmix modes {bad or modes} invalid; valid: {list(self.MODES)}")
        if head == "fc" and not (isinstance(resolution, int) and resolution >= 1):
            raise ValueError("alignmix resolution must be an integer >= 1 (the paper pools A to "
                             f"4 x 4), got {resolution!r}")
        self.alpha, self.eps, self.n_iters, self.tol = alpha, eps, n_iters, tol
        self.modes, self.head, self.resolution = tuple(modes), head, resolution
        self.encoder2 = StageTwoEncoder(model.fc.in_features, resolution) if head == "fc" else None

    # -- heads ------------------------------------------------------------------------------------
    def tensor_of(self, fmap: torch.Tensor) -> torch.Tensor:
        """The feature tensor A that is aligned: the full layer4 map (GAP head), or that map
        average-pooled to `resolution` (stage-2 encoder: 7 x 7 -> 4 x 4 at 224 px)."""
        if self.head == "gap" or tuple(fmap.shape[-2:]) == (self.resolution, self.resolution):
            return fmap
        if min(fmap.shape[-2:]) < self.resolution:
            raise ValueError(f"alignmix resolution {self.resolution} is larger than the layer4 "
                             f"map {tuple(fmap.shape[-2:])}; set method.resolution <= the map "
                             "side (input size / 32)")
        return F.adaptive_avg_pool2d(fmap, self.resolution)

    def embed(self, a: torch.Tensor) -> torch.Tensor:
        """e = f(A): A [b, c, h, w] (already `tensor_of`) -> [b, d]."""
        return a.mean((2, 3)) if self.head == "gap" else self.encoder2(a)

    def classify(self, a: torch.Tensor) -> torch.Tensor:
        if self.head == "gap":
            return self.logits_of(a)
        return self.model.fc(self.embed(a))

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.fc(self.embed(self.tensor_of(self.model.features(images))))

    def export_head(self) -> dict | None:
        return None if self.head == "gap" else self.encoder2.export()

    def _mode(self) -> str:
        return self._choice(self.modes)

    def forward(self, images, labels):
        y = self.targets(labels)
        mode = self._mode()
        lam, perm = self._beta(self.alpha), self._perm(images.shape[0])
        y_mix = mixup(y, perm, lam)
        if mode == "clean":
            return self.reconstruct(images)
        if mode == "input":
            logits = self.classify(self.tensor_of(self.model.features(mixup(images, perm, lam))))
            return {"loss": self.loss_of(logits, y_mix)}
        a = self.tensor_of(self.model.features(images))
        if mode == "embedding":
            return {"loss": self.loss_of(mixup(self.classify(a), perm, lam), y_mix)}
        mixed, info = aligned_mix(a.flatten(2), perm, lam, 0 if mode == "feat" else 1, self.eps,
                                  self.n_iters,
                                     self.tol)
        logits = self.classify(mixed.view_as(a))
        return {"loss": self.loss_of(logits, y_mix), "stat_sinkhorn_iters": info["iters"],
                "stat_sinkhorn_row_err": info["row_err"], "stat_sinkhorn_col_err": info["col_err"]}


class AlignMix(_AlignMixBase):
    """AlignMix as the authors' released code trains it (shashankvkt/AlignMixup_CVPR22 at ec01a68,
    the same in cifar10_100/models/resnet18_classifier.py,
    tiny_imgnet/models/resnet18_classifier.py and imagenet/models/resnet50_classifier.py): per
    batch input mixup with probability 1/2 (`layer_mix = 0`), else `mixup_aligned` on the full
    layer4 map (4 x 4 on CIFAR, 8 x 8 on TinyImageNet, 7 x 7 on ImageNet) with branch 0 (eq. 12) or
    branch 1 (A aligned to A', eq. 13), 1/2 each; then global average pooling and the classifier
    (no stage-2 encoder, no embedding mode). Sinkhorn stops at the code's threshold `tol` = 0.1
    (utils/OT.py `thresh`), after at most 100 iterations.
    dense_loss: the loss at every position (MultiMix Table 10)."""

    variant = ("released code (shashankvkt/AlignMixup_CVPR22 @ ec01a68): GAP head, input 1/2, "
               "aligned 1/4 + 1/4")

    def __init__(self, model, num_classes, alpha: float = 2.0, eps: float = 0.1,
                 n_iters: int = 100, tol: float | None = 0.1, dense_loss: bool = False):
        super().__init__(model, num_classes, alpha, eps, n_iters, tol,
                         ("input", "feat", "feat_rev"), "gap", None, dense_loss)

    def _mode(self) -> str:
        if self._choice((0, 1)) == 0:  # layer_mix = random.randint(0, 1)
            return "input"
        return self._choice(("feat", "feat_rev"))  # align_mix = random.randint(0, 1)


class StageTwoEncoder(nn.Module):
    """The paper's stage-2 encoder f (AlignMixup §4.1, "a fully-connected layer"): A [b, c, r, r]
    -> e [b, c] = W vec(A) / r + bias, W [c, c r r].

    Initialised to global average pooling (W = [I ... I] / r, zero bias; e = GAP(A) at step 0, the
    released code's head) and scaled by 1 / r. Why: a plain nn.Linear on vec(A) sees an input whose
    squared norm is about r^2 times that of the pooled vector fc reads in a GAP head (the positions
    are correlated), so at the same learning rate its step on e is r^2 larger and the product with
    fc grows unstably. Measured on the toy world (ResNet-18, r = 2, lr 0.1, 6 epochs): the logits
    grew 100-fold within the warm-up, the last block's ReLUs died (layer4 output rms 1.3 -> 0.008)
    and top-1 stayed at chance (10.5 %); initialised to GAP but unscaled it still diverged (10.5
    %); with the scale, 68 % (and 80.5-81.5 % over three seeds at lr 0.05, where lr 0.1 still
    spiked on two of three: configs/pretrain/toy_alignmix_stage2.yaml). The function class (any
    linear map of vec(A)) is unchanged; only SGD's steps are those of a GAP head.
    """

    def __init__(self, channels: int, resolution: int):
        super().__init__()
        self.resolution = resolution
        self.linear = nn.Linear(channels * resolution * resolution, channels)
        with torch.no_grad():  # vec(A) is channel-major: column ch * r * r + position
            rr = resolution * resolution
            self.linear.weight.copy_(torch.eye(channels).repeat_interleave(rr, dim=1) / resolution)
            self.linear.bias.zero_()

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.linear(a.flatten(1) / self.resolution)

    def export(self) -> dict:
        """The head as `mixup_transfer.core.checkpoint.check_head` stores it (the 1 / r scale
        folded into the weight)."""
        return {"kind": "pooled_linear", "resolution": self.resolution,
                "weight": self.linear.weight / self.resolution, "bias": self.linear.bias}


class AlignMixStage2(_AlignMixBase):
    """AlignMix as the paper describes it (AlignMixup §4.1 and App. A; no released code): the
    layer4 map is average-pooled to resolution x resolution (the paper's A is c x 4 x 4) and the
    stage-2 encoder f (`StageTwoEncoder`) maps it to the embedding e, so the ResNet's fc is the
    classifier g; one of `modes` (x, A by eq. 12, A by eq. 13, e) drawn uniformly per batch;
    Sinkhorn for all n_iters = 100 iterations (App. B; tol None). f lives in this module and in the
    exported checkpoint's "head", not in the backbone."""

    variant = ("paper section 4.1 (arXiv 2103.15375): stage-2 encoder on A pooled to r x r, "
               "4 modes uniform")

    def __init__(self, model, num_classes, alpha: float = 2.0, eps: float = 0.1,
                 n_iters: int = 100, tol: float | None = None,
                 modes=("input", "feat", "feat_rev", "embedding"), resolution: int = 4):
        super().__init__(model, num_classes, alpha, eps, n_iters, tol, modes, "fc", resolution)


class _ResUp(nn.Module):
    """Residual up-sampling block of the WGAN-GP ResNet generator (Gulrajani et al., 2017):
    BN-ReLU-up-conv3x3-BN-ReLU-conv3x3 plus an up-sampled 1x1 shortcut."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = F.interpolate(F.relu(self.bn1(x)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h))))
        return h + self.skip(F.interpolate(x, scale_factor=2, mode="nearest"))


class ResidualDecoder(nn.Module):
    """D: R^d -> images [b, 3, s, s] in [0, 1]: a linear layer to a width x s0 x s0 map (s0 = s
    halved while even and >= 8: 7 for 224, 4 for 64 / 32), residual up-sampling blocks to s,
    BN-ReLU-conv3x3 and a sigmoid (the residual generator of the paper's AlignMix/AE, with a [0, 1]
    output)."""

    def __init__(self, embed_dim: int, size: int = 224, width: int = 128):
        super().__init__()
        s0, n_up = size, 0
        while s0 % 2 == 0 and s0 >= 8:
            s0, n_up = s0 // 2, n_up + 1
        self.size, self.s0, self.width = size, s0, width
        self.fc = nn.Linear(embed_dim, width * s0 * s0)
        self.blocks = nn.Sequential(*[_ResUp(width, width) for _ in range(n_up)])
        self.bn, self.out = nn.BatchNorm2d(width), nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, e):
        h = self.fc(e).view(-1, self.width, self.s0, self.s0)
        return torch.sigmoid(self.out(F.relu(self.bn(self.blocks(h)))))


class AlignMixAE(AlignMixStage2):
    """AlignMix/AE (paper section 4, Algorithm 1; no released code): the paper's variant
    (`AlignMixStage2`, the stage-2 encoder f makes the embedding e that the decoder reads) plus a
    fifth mode "clean" drawn uniformly with the four AlignMix modes, in which e = f(F(x)) of the
    clean images is decoded by a residual decoder D and only the reconstruction loss trains F, f
    and D; the classifier never sees decoded images. The paper's L_r = ||x - x_hat||^2 is averaged
    over pixels here (times recon_weight): its sum is ~1e5 times the classification loss at 224 px.
    decoder_size: the decoder's output side (the training crop; other input sizes are matched by
    bilinear resizing)."""

    variant = ("paper section 4 / Algorithm 1 (arXiv 2103.15375): stage-2 encoder, 4 modes + "
               "clean reconstruction")

    MODES = AlignMixStage2.MODES + ("clean",)
    find_unused_parameters = True  # the clean mode never uses fc, the others never use the decoder

    def __init__(self, model, num_classes, alpha: float = 2.0, eps: float = 0.1,
                 n_iters: int = 100, tol: float | None = None,
                 modes=("clean", "input", "feat", "feat_rev", "embedding"), resolution: int = 4,
                 decoder_size: int = 224, decoder_width: int = 128, recon_weight: float = 1.0):
        super().__init__(model, num_classes, alpha, eps, n_iters, tol, modes, resolution)
        self.decoder = ResidualDecoder(model.fc.in_features, decoder_size, decoder_width)
        self.recon_weight = recon_weight

    def reconstruct(self, images):
        x_hat = self.decoder(self.embed(self.tensor_of(self.model.features(images))))
        if x_hat.shape[-2:] != images.shape[-2:]:
            x_hat = F.interpolate(x_hat, size=images.shape[-2:], mode="bilinear",
                                  align_corners=False)
        loss = F.mse_loss(x_hat.float(), images.float())
        return {"loss": self.recon_weight * loss, "stat_recon_mse": loss.detach()}


@torch.no_grad()
def sinkhorn(cost: torch.Tensor, eps: float = 0.1, n_iters: int = 100, tol: float | None = None,
             return_info: bool = False):
    """Entropic OT plan with uniform marginals, in the log domain.

    cost [B, r, r] -> P [B, r, r] = argmin <P, M> - eps H(P) s.t. P 1 = P^T 1 = 1/r, by
    Sinkhorn-Knopp (each iteration a row then a column normalisation, so the columns are exact and
    the rows carry the remaining error) on log K = -M / eps, so raw squared distances with a small
    eps never underflow. No gradient.

    n_iters: the most iterations. tol: stop early, as the official AlignMix code does (its
    threshold is 0.1), once eps * mean over the batch of sum_i |change of the row potential| < tol
    (None: run all n_iters). The stop is decided on the device: the potentials freeze at the
    iteration that meets tol and the remaining iterations change nothing (the same plan as breaking
    there, without reading the criterion back every iteration; it costs the full n_iters of
    arithmetic). return_info: also return {"iters", "row_err", "col_err"} as 0-d tensors (read them
    when logging): the iterations that changed the plan and the marginal errors max |r P 1 - 1| and
    max |r P^T 1 - 1| over the batch, so a user can see whether the plan converged.
    """
    cost = cost.float()
    B, r, c = cost.shape
    logk = -cost / eps
    log_a = torch.full((B, r), -math.log(r), device=cost.device)
    log_b = torch.full((B, c), -math.log(c), device=cost.device)
    u = torch.zeros_like(log_a)
    v = torch.zeros_like(log_b)
    iters = torch.full((), n_iters if tol is None else 0, dtype=torch.long, device=cost.device)
    done = torch.zeros((), dtype=torch.bool, device=cost.device)
    for _ in range(n_iters):
        u_new = log_a - torch.logsumexp(logk + v.unsqueeze(1), dim=2)
        v_new = log_b - torch.logsumexp(logk + u_new.unsqueeze(2), dim=1)
        if tol is None:
            u, v = u_new, v_new
            continue
        iters = iters + (~done).long()
        converged = eps * (u_new - u).abs().sum(-1).mean() < tol
        u, v = torch.where(done, u, u_new), torch.where(done, v, v_new)
        done = done | converged
    plan = torch.exp(u.unsqueeze(2) + logk + v.unsqueeze(1))
    if not return_info:
        return plan
    info = {"iters": iters, "row_err": (plan.sum(2) * r - 1).abs().max(),
            "col_err": (plan.sum(1) * c - 1).abs().max()}
    return plan, info


def feature_cost(a: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """m_ij = ||a_i - a2_j||^2 between the columns of a, a2 [b, c, r] -> [b, r, r] (eq. 7),
    computed from differences (not the |a|^2 + |b|^2 - 2ab expansion, which loses digits that
    exp(-m / 0.1) amplifies)."""
    d = torch.cdist(a.float().transpose(1, 2), a2.float().transpose(1, 2),
                    compute_mode="donot_use_mm_for_euclid_dist")
    return d**2


def aligned_mix(a: torch.Tensor, perm: torch.Tensor, lam: float, branch: int, eps: float = 0.1,
                n_iters: int = 100, tol: float | None = None):
    """AlignMix feature-tensor mixing, as the official `mixup_aligned` (AlignMixup_CVPR22,
    imagenet/models/resnet50_classifier.py): one plan P for the cost between A (columns of a) and
    A' = a[perm], R = r P (detached), then
      branch 0 (eq. 12): lam * A + (1 - lam) * A' R^T   (A' aligned to A),
      branch 1 (eq. 13): lam * A R + (1 - lam) * A'     (A aligned to A').
    Either way the target is lam * y + (1 - lam) * y[perm].

    a [b, c, r] -> (mixed [b, c, r], sinkhorn info dict: iters, row_err, col_err).
    """
    if branch not in (0, 1):
        raise ValueError(f"aligned_mix branch must be 0 or 1, got {branch}")
    a2 = a[perm]
    r = a.shape[-1]
    with torch.no_grad():
        plan, info = sinkhorn(feature_cost(a.detach(), a2.detach()), eps, n_iters, tol,
                              return_info=True)
        plan = (plan * r).to(a.dtype)
    if branch == 0:
        return lam * a + (1 - lam) * torch.matmul(a2, plan.transpose(1, 2)), info
    return lam * torch.matmul(a, plan) + (1 - lam) * a2, info
