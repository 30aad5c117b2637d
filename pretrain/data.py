"""Pretraining data: ImageNet-style augmentation and the resumable, sharded epoch sampler.

Each sample's augmentation is drawn from torch's RNG seeded by (run seed, epoch, index) and epoch e's order is
a function of (seed, e), so a run is the same in every worker layout and after a resume.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Sampler

from core.config import ConfigError


class Lighting:
    """AlexNet-style PCA lighting noise on a [3, h, w] tensor in [0, 1] (ImageNet eigen-decomposition)."""

    EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
    EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140],
                           [-0.5836, -0.6948, 0.4203]])

    def __init__(self, std: float):
        self.std = std

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        alpha = torch.randn(3) * self.std
        rgb = (self.EIGVEC * alpha.view(1, 3) * self.EIGVAL.view(1, 3)).sum(1)
        return (img + rgb.view(3, 1, 1)).clamp(0, 1)


def train_transform(size: int, scale_min: float, hflip: bool, color_jitter: float, lighting: float):
    from torchvision import transforms as T

    ts = [T.RandomResizedCrop(size, scale=(scale_min, 1.0))]
    if hflip:
        ts.append(T.RandomHorizontalFlip())
    if color_jitter > 0:
        ts.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
    ts.append(T.ToTensor())
    if lighting > 0:
        ts.append(Lighting(lighting))
    return T.Compose(ts)


def val_transform(size: int, resize: int | None):
    from torchvision import transforms as T

    return T.Compose([T.Resize(resize or int(round(size / 0.875))), T.CenterCrop(size), T.ToTensor()])


def padded_train_transform(size: int, padding: int, hflip: bool):
    """The small-image augmentation of the reference codes (manifold mixup, PuzzleMix, AlignMixup; the papers
    themselves do not state it): a random `size` crop of the image zero-padded by `padding` on each side, then a
    horizontal flip with probability 1/2."""
    from torchvision import transforms as T

    ts = [T.RandomCrop(size, padding=padding)] + ([T.RandomHorizontalFlip()] if hflip else []) + [T.ToTensor()]
    return T.Compose(ts)


def padded_val_transform(size: int):
    """The stored image (a centre crop of `size`, the identity at the stored size)."""
    from torchvision import transforms as T

    return T.Compose([T.CenterCrop(size), T.ToTensor()])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % (2**63 - 1)


class SeededTransform(Dataset):
    """Applies `transform` to `base[i]` with torch's RNG seeded from the key (index, seed), so each
    sample's augmentation depends only on (run seed, epoch, index): same in every worker layout and
    after a resume. The caller's RNG state is left untouched."""

    def __init__(self, base: Dataset, transform=None):
        self.base, self.transform = base, transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        img, label = self.base[index]
        if self.transform is not None:
            if seed is None:
                img = self.transform(img)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    img = self.transform(img)
        return img, label


class EpochSampler(Sampler):
    """Shuffled, sharded, resumable: epoch e's order is randperm(seed * 7919 + e), cut to whole global batches
    (the remainder is dropped, as DistributedSampler with drop_last). The position in an epoch is kept in samples
    (`start_step` x `global_batch`), and each process takes every world-th of the samples still to visit, so a run
    resumes with another number of processes. Yields (index, sample seed)."""

    def __init__(self, n: int, global_batch: int, rank: int = 0, world: int = 1, seed: int = 0, subset=None):
        if global_batch % world:
            raise ConfigError(f"the global batch {global_batch} is not divisible by {world} process(es)")
        self.n, self.global_batch, self.rank, self.world, self.seed = n, global_batch, rank, world, seed
        self.subset = subset
        self.steps = n // global_batch
        if self.steps == 0:
            raise ConfigError(f"the global batch {global_batch} is larger than the {n} training images")
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        order = torch.randperm(self.n, generator=g)[: self.steps * self.global_batch]
        mine = order[self.start_step * self.global_batch:][self.rank:: self.world].tolist()
        for i in mine:
            index = self.subset[i] if self.subset is not None else i
            yield index, sample_seed(self.seed, self.epoch, index)

    def __len__(self):
        return (self.steps - self.start_step) * self.global_batch // self.world


def evenly_spaced(n: int, k: int | None) -> list[int] | None:
    """`k` evenly spaced indices of range(n) (None: all of them)."""
    if k is None or k >= n:
        return None
    return [int(i * n / k) for i in range(k)]
