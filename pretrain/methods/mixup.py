"""ERM, input mixup and manifold mixup (Zhang et al., ICLR 2018; Verma et al., ICML 2019)."""

from __future__ import annotations

from pretrain import mixers
from pretrain.adapters import EMBEDDING
from pretrain.methods.base import Method, mix_at, mixup


class ERM(Method):
    """Plain cross-entropy on clean images."""

    def forward(self, images, labels):
        logits = self.logits_of(self.model.features(images))
        out = {"loss": self.loss_of(logits, self.targets(labels))}
        out["logits"] = logits if logits.ndim == 2 else logits.mean(-1)
        return out


class InputMixup(Method):
    """Input mixup: lam ~ Beta(alpha, alpha), one lam and one permutation per batch."""

    def __init__(self, model, num_classes, alpha: float = 1.0, dense_loss: bool = False):
        super().__init__(model, num_classes, dense_loss)
        self.alpha = alpha
        self.mixer = mixers.MixUp(alpha, num_classes)

    def forward(self, images, labels):
        lam, perm = self._beta(self.alpha), self._perm(images.shape[0])
        x, y_mix = self.mixer.apply(images, labels, mixers.Draw(perm, [lam]))
        return {"loss": self.loss_of(self.logits_of(self.model.features(x)), y_mix)}


class ManifoldMixup(Method):
    """Manifold mixup: per batch a layer drawn uniformly from `layers` (0 = input, 1..4 after
    layer1..4, 5 = embedding), lam ~ Beta(alpha, alpha)."""

    def __init__(self, model, num_classes, alpha: float = 2.0, layers=(0, 1, 2),
                 dense_loss: bool = False):
        super().__init__(model, num_classes, dense_loss)
        self.alpha, self.layers = alpha, tuple(int(v) for v in layers)
        if not self.layers or any(not 0 <= v <= EMBEDDING for v in self.layers):
            raise ValueError(f"manifold_mixup layers must be in 0..5, got {layers}")

    def forward(self, images, labels):
        y = self.targets(labels)
        layer = self._choice(self.layers)
        lam, perm = self._beta(self.alpha), self._perm(images.shape[0])
        logits = mix_at(self, images, perm, self._on_device([lam]), layer)
        return {"loss": self.loss_of(logits, mixup(y, perm, lam))}
