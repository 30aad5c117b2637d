"""Pretraining data: ImageNet-style augmentation and the resumable, sharded epoch sampler.

Each sample's augmentation is drawn from torch's RNG seeded by (run seed, epoch, index) and epoch
e's order is a function of (seed, e), so a run is the same in every worker layout and after a
resume.

Three data paths (`data.loader`, chosen by `select_loader`):
  - "uint8" (default): workers decode with torchvision.io (libjpeg-turbo), crop, resize
    (antialiased) and flip uint8 [3, h, w] tensors and return them as uint8, with the colour
    jitter / lighting factors they drew; `batch_to_device` makes them float in [0, 1] on the
    device (channels_last when asked) and applies the colour ops there, batched. With
    `decode_device: cuda` the workers only read the bytes and draw the crop; nvJPEG decodes the
    batch on the GPU (`decode_batch`). The draws are the PIL path's, in its order, so the same
    seed gives the same crop, flip and factors (pixels within 1/255 on crop + flip, see
    tests/core/test_uint8_data.py).
  - "pil": the original PIL path (float tensors made in the workers); kept for comparison
    (tools/bench.py data).
  - "dali": NVIDIA DALI on the GPU (pretrain/dali.py), when installed and asked for (or "auto").
ImageNet mean/std normalisation stays inside the model (ResNetStages), on the device, for every
path: the mixing methods work in pixel units (ARCHITECTURE.md "Pixels").
"""

from __future__ import annotations

import importlib.util

import torch
from torch.utils.data import Dataset, Sampler

from mixup_transfer.core.config import ConfigError
from mixup_transfer.core.data import decode_uint8, encoded_size, is_jpeg

LOADERS = ("uint8", "pil", "dali", "auto")
DECODE_DEVICES = ("cpu", "cuda")
RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's aspect-ratio range (torchvision's default)


class Lighting:
    """AlexNet-style PCA lighting noise on a [3, h, w] tensor in [0, 1] (ImageNet
    eigen-decomposition)."""

    EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
    EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140],
                           [-0.5836, -0.6948, 0.4203]])

    def __init__(self, std: float):
        self.std = std

    def offset(self) -> torch.Tensor:
        """One draw: the RGB offset [3, 1, 1] (in [0, 1] units) added to every pixel."""
        alpha = torch.randn(3) * self.std
        return (self.EIGVEC * alpha.view(1, 3) * self.EIGVAL.view(1, 3)).sum(1).view(3, 1, 1)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return (img + self.offset()).clamp(0, 1)


def train_transform(size: int, scale_min: float, hflip: bool, color_jitter: float,
                    lighting: float):
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

    return T.Compose([T.Resize(resize or int(round(size / 0.875))), T.CenterCrop(size),
                      T.ToTensor()])


def resize_uint8(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bilinear resize of uint8 [3, h, w] -> uint8 [3, height, width] (PIL's filter up
    to 1/255).

    Runs on a channels-last copy (torch's vectorised uint8 kernel; the decoder's buffer is HWC
    already) and returns a channels-last [3, height, width] tensor."""
    if img.shape[-2:] == (height, width):
        return img
    x = img.unsqueeze(0).contiguous(memory_format=torch.channels_last)
    return torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear",
                                           antialias=True, align_corners=False)[0]


class ColorDraws:
    """Colour jitter and PCA lighting drawn in the worker, applied on the device (`color_augment`):
    the draws of `train_transform`'s PIL pipeline in its order (ColorJitter.get_params:
    randperm(4), then the brightness, contrast and saturation factors; then Lighting's randn(3)),
    packed as float [10] = the order (4), the three factors, the lighting RGB offset (3). Doing the
    pixel work batched on the device instead of per image on the CPU is what keeps the uint8 path
    fast with the ImageNet recipe's jitter 0.4 + lighting 0.1."""

    def __init__(self, color_jitter: float, lighting: float):
        from torchvision import transforms as T

        self.jitter = T.ColorJitter(color_jitter, color_jitter,
                                    color_jitter) if color_jitter > 0 else None
        self.lighting = lighting

    @property
    def active(self) -> bool:
        return self.jitter is not None or self.lighting > 0

    def __call__(self) -> torch.Tensor:
        out = torch.tensor([0.0, 1.0, 2.0, 3.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
        if self.jitter is not None:
            j = self.jitter
            order, b, c, s, _ = j.get_params(j.brightness, j.contrast, j.saturation, j.hue)
            out[:4], out[4:7] = order.float(), torch.tensor([b, c, s])
        if self.lighting > 0:
            out[7:] = Lighting(self.lighting).offset().view(3)
        return out


def _gray(x: torch.Tensor) -> torch.Tensor:
    """torchvision's rgb_to_grayscale of float [b, 3, h, w] -> [b, 1, h, w]."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def color_augment(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """torchvision's float ColorJitter (brightness, contrast, saturation, in each image's drawn
    order) then PCA lighting, batched: x float [b, 3, h, w] in [0, 1], params [b, 10] from
    `ColorDraws` -> [b, 3, h, w]."""
    # from the loader's pinned memory: no wait
    p = params.to(x.device, non_blocking=True).to(x.dtype)
    view = (-1, 1, 1, 1)
    bright, contrast, sat = p[:, 4].view(view), p[:, 5].view(view), p[:, 6].view(view)
    # position k of each image's order (op 3, hue, is never drawn: a no-op here)
    for k in range(4):
        op = p[:, k].view(view)
        x = torch.where(op == 0, (bright * x).clamp(0, 1), x)
        mean = _gray(x).mean((1, 2, 3), keepdim=True)
        x = torch.where(op == 1, (contrast * x + (1.0 - contrast) * mean).clamp(0, 1), x)
        x = torch.where(op == 2, (sat * x + (1.0 - sat) * _gray(x)).clamp(0, 1), x)
    return (x + p[:, 7:].view(-1, 3, 1, 1)).clamp(0, 1)


class Uint8TrainTransform:
    """RandomResizedCrop(size, scale=(scale_min, 1)) + horizontal flip on uint8 [3, h, w] tensors,
    plus the colour jitter / lighting draws (`ColorDraws`, applied later on the device); torch's
    RNG is drawn in the order of `train_transform`'s PIL pipeline (same seed, same crop, flip and
    factors). Returns uint8 [3, size, size], or (that, float [10] colour params) when jitter or
    lighting is on."""

    def __init__(self, size: int, scale_min: float, hflip: bool, color_jitter: float,
                 lighting: float):
        from torchvision import transforms as T

        self.size, self.scale, self.hflip = size, (scale_min, 1.0), hflip
        self.color = ColorDraws(color_jitter, lighting)
        self.get_params = T.RandomResizedCrop.get_params

    def __call__(self, img: torch.Tensor):
        i, j, h, w = self.get_params(img, self.scale, RATIO)
        img = resize_uint8(img[:, i:i + h, j:j + w], self.size, self.size)
        if self.hflip and torch.rand(1) < 0.5:
            img = img.flip(-1)
        return (img, self.color()) if self.color.active else img


class Uint8ValTransform:
    """Resize the shorter side to `resize` (default size / 0.875, torchvision's rounding of the
    longer side), then centre-crop `size`; uint8 [3, h, w] -> uint8 [3, size, size]."""

    def __init__(self, size: int, resize: int | None):
        self.size, self.resize = size, resize or int(round(size / 0.875))

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        h, w = img.shape[-2:]
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(self.resize * long / short)
        img = resize_uint8(img, *((self.resize, new_long) if h <= w else (new_long, self.resize)))
        return F.center_crop(img, [self.size, self.size])


class EncodedTrainTransform:
    """For `decode_device: cuda`: encoded bytes -> (bytes, int64 [6] = top, left, height, width,
    flip, size), plus the float [10] colour params when jitter or lighting is on. The crop is drawn
    from the header's size with the same draws as `Uint8TrainTransform`; `batch_to_device` decodes,
    crops and colours on the GPU."""

    def __init__(self, size: int, scale_min: float, hflip: bool, color_jitter: float = 0.0,
                 lighting: float = 0.0):
        from torchvision import transforms as T

        self.size, self.scale, self.hflip = size, (scale_min, 1.0), hflip
        self.color = ColorDraws(color_jitter, lighting)
        self.get_params = T.RandomResizedCrop.get_params

    def __call__(self, data: torch.Tensor):
        width, height = encoded_size(data)
        i, j, h, w = self.get_params(torch.empty(3, height, width, device="meta"), self.scale,
                                     RATIO)
        flip = int(bool(self.hflip and torch.rand(1) < 0.5))
        crop = torch.tensor([i, j, h, w, flip, self.size])
        return (data, crop, self.color()) if self.color.active else (data, crop)


def collate_uint8(batch):
    """[(uint8 [3, h, w] or (that, colour [10]), label)] -> (uint8 [b, 3, h, w] in channels-last
    memory, labels [b][, colour [b, 10]]): one HWC copy per image (the decoder's and the resize's
    layout; default_collate's NCHW stack of these is 6x slower), into shared memory in a worker as
    default_collate does, so the batch reaches the main process without another copy."""
    color = isinstance(batch[0][0], tuple)
    images = [b[0][0] if color else b[0] for b in batch]
    c, h, w = images[0].shape
    if torch.utils.data.get_worker_info() is not None:
        out = images[0].new(images[0]._typed_storage()._new_shared(len(images) * c * h * w))
    else:
        out = torch.empty(len(images) * c * h * w, dtype=torch.uint8)
    out = out.view(len(images), h, w, c)
    for k, img in enumerate(images):
        if img.shape != (c, h, w):
            raise ValueError(f"batch item {k} is {tuple(img.shape)}, item 0 is {(c, h, w)}")
        out[k].copy_(img.permute(1, 2, 0))
    labels = torch.tensor([b[1] for b in batch])
    if color:
        return out.permute(0, 3, 1, 2), labels, torch.stack([b[0][1] for b in batch])
    return out.permute(0, 3, 1, 2), labels


def collate_encoded(batch):
    """[((bytes, crop [6][, colour [10]]), label)] -> (list of bytes, crops [b, 6], labels [b][,
    colour [b, 10]]) (the bytes differ in length, so they stay a list)."""
    out = ([b[0][0] for b in batch], torch.stack([b[0][1] for b in batch]),
           torch.tensor([b[1] for b in batch]))
    return out + (torch.stack([b[0][2] for b in batch]),) if len(batch[0][0]) > 2 else out


def decode_batch(datas: list, params: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Decode (nvJPEG on CUDA; libjpeg-turbo on CPU, the same code) and crop, resize, flip a batch:
    -> float [b, 3, size, size] in [0, 1] on `device`. Non-JPEG files are decoded on the CPU and
    moved (`host_to_device`: pinned, non-blocking). The resize is antialiased bilinear in float,
    rounded to whole levels as the uint8 CPU path rounds (equal to it within 1/255 where both
    decoders agree)."""
    jpeg = [k for k, d in enumerate(datas) if is_jpeg(d)]
    images: list = [None] * len(datas)
    if jpeg:
        decoded = decode_jpegs([datas[k] for k in jpeg], device)
        for k, img in zip(jpeg, decoded):
            images[k] = img
    for k, img in enumerate(images):
        if img is None:
            images[k] = host_to_device(decode_uint8(datas[k], f"batch item {k}"), device)
    out = []
    for img, (i, j, h, w, flip, size) in zip(images, params.tolist()):
        x = img[:, i:i + h, j:j + w].unsqueeze(0).float()
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                            align_corners=False).round_().clamp_(0, 255)
        out.append(x.flip(-1) if flip else x)
    return torch.cat(out).div_(255)


def decode_jpegs(datas: list, device: torch.device) -> list:
    """JPEG bytes -> uint8 [3, h, w] RGB tensors on `device`: one batched nvJPEG call on CUDA
    (libjpeg-turbo on the CPU). On CUDA the decode runs on a side stream that first waits for the
    caller's queued kernels, and its outputs are recorded on the caller's stream: torchvision's
    decoder writes on its own stream, and memory the caching allocator hands it must not be memory
    those kernels still read. Images nvJPEG refuses (CMYK JPEGs, about 22 in ImageNet's train set)
    are decoded on the CPU and moved."""
    from torchvision import io as tio

    def decode(items):
        if device.type != "cuda":
            return tio.decode_jpeg(items, mode=tio.ImageReadMode.RGB, device=device)
        current, side = torch.cuda.current_stream(device), _side_stream(device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            out = tio.decode_jpeg(items, mode=tio.ImageReadMode.RGB, device=device)
        current.wait_stream(side)
        for img in out:
            img.record_stream(current)
        return out

    try:
        return decode(datas)
    # one image the device decoder cannot read fails the whole batch: retry one by one
    except RuntimeError:
        out = []
        for k, data in enumerate(datas):
            try:
                out.append(decode([data])[0])
            except RuntimeError:
                out.append(host_to_device(decode_uint8(data, f"batch item {k}"), device))
        return out


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor copied to `device` without making the host wait: on CUDA through pinned memory
    with a non-blocking copy (a copy from pageable memory is staged through a pinned buffer by the
    host)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(index)
    return _SIDE_STREAMS[index]


def batch_to_device(batch, device: torch.device, channels_last: bool):
    """A loader's batch -> (float images [b, 3, h, w] in [0, 1] on `device`, labels): uint8 images
    are moved as uint8 (4x fewer bytes) and converted there; encoded batches (bytes, crops, labels)
    are decoded there; colour params, when the batch carries them, are applied there
    (`color_augment`)."""
    encoded = isinstance(batch[0], list)
    if encoded:
        images, labels = decode_batch(batch[0], batch[1], device), batch[2]
    else:
        images, labels = batch[0].to(device, non_blocking=True), batch[1]
    color = batch[3 if encoded else 2] if len(batch) > (3 if encoded else 2) else None
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    elif not images.is_contiguous():
        images = images.contiguous()
    if images.dtype == torch.uint8:
        # .float() keeps the memory format; same op as ToTensor's
        images = images.float().div_(255)
    if color is not None:
        images = color_augment(images, color)
    return images, labels.to(device, non_blocking=True)


def dali_importable() -> bool:
    return (
        importlib.util.find_spec("nvidia") is not None
        and importlib.util.find_spec("nvidia.dali") is not None
    )


def select_loader(loader: str, decode_device: str, device: torch.device, color_jitter: float = 0.0,
                  lighting: float = 0.0, dali_found: bool | None = None) -> str:
    """The data path to use: "uint8", "pil" or "dali" (see the module docstring); ConfigError when
    the asked one cannot run here. "auto" is DALI when it is importable, the device is CUDA and the
    augmentation is one DALI runs (crop + flip), else "uint8"."""
    if loader not in LOADERS:
        raise ConfigError(f"data.loader must be one of {LOADERS}, got {loader!r}")
    if decode_device not in DECODE_DEVICES:
        raise ConfigError(f"data.decode_device must be one of {DECODE_DEVICES}, got "
                          f"{decode_device!r}")
    found = dali_importable() if dali_found is None else dali_found
    plain = color_jitter == 0 and lighting == 0
    if loader == "auto":
        loader = "dali" if found and device.type == "cuda" and plain else "uint8"
    if loader == "dali":
        if not found:
            raise ConfigError("data.loader: dali needs NVIDIA DALI (pip install "
                              "nvidia-dali-cuda120); it is not importable here. Use "
                              "data.loader: uint8")
        if device.type != "cuda":
            raise ConfigError(f"data.loader: dali needs a CUDA device, the run is on {device}")
        if not plain:
            raise ConfigError("data.loader: dali runs crop + flip only; set data.color_jitter "
                              "and data.lighting to 0 or use data.loader: uint8")
    if decode_device == "cuda":
        if loader != "uint8":
            raise ConfigError(f"data.decode_device: cuda is for data.loader: uint8, not {loader}")
        if device.type != "cuda":
            raise ConfigError("data.decode_device: cuda needs a CUDA device, the run is on "
                              f"{device}")
    return loader


def padded_train_transform(size: int, padding: int, hflip: bool):
    """The small-image augmentation of the reference codes (manifold mixup, PuzzleMix, AlignMixup;
    the papers themselves do not state it): a random `size` crop of the image zero-padded by
    `padding` on each side, then a horizontal flip with probability 1/2."""
    from torchvision import transforms as T

    ts = [T.RandomCrop(size, padding=padding)] + ([T.RandomHorizontalFlip()] if hflip
                                                  else []) + [T.ToTensor()]
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
            # the CPU generator only: torch.manual_seed would also reseed every accelerator (and
            # cost 0.1 ms)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.default_generator.manual_seed(seed)
                    img = self.transform(img)
        return img, label


class EpochSampler(Sampler):
    """Shuffled, sharded, resumable: epoch e's order is randperm(seed * 7919 + e), cut to whole
    global batches (the remainder is dropped, as DistributedSampler with drop_last). The position
    in an epoch is kept in samples (`start_step` x `global_batch`), and each process takes every
    world-th of the samples still to visit, so a run resumes with another number of processes.
    Yields (index, sample seed)."""

    def __init__(self, n: int, global_batch: int, rank: int = 0, world: int = 1, seed: int = 0,
                 subset=None):
        if global_batch % world:
            raise ConfigError(f"the global batch {global_batch} is not divisible by {world} "
                              "process(es)")
        self.n, self.global_batch, self.rank, self.world = n, global_batch, rank, world
        self.seed = seed
        self.subset = subset
        self.steps = n // global_batch
        if self.steps == 0:
            raise ConfigError(f"the global batch {global_batch} is larger than the {n} training "
                              "images")
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
