"""The uint8 data path of pretraining (pretrain/data.py, mixup_transfer/core/data.py decode):
libjpeg-turbo decode equals PIL's, the uint8 crop / flip / jitter / lighting / val transforms equal
the PIL path's for the same seed within the tolerances measured here, the device-side float
conversion equals ToTensor's, the GPU-decode code path (run on the CPU) equals the uint8 path,
persistent workers keep each epoch's order, and the loader selection refuses what cannot run."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from mixup_transfer.core.config import ConfigError
from mixup_transfer.core.data import (
    DataError,
    decode_uint8,
    read_bytes,
    read_image,
    read_image_uint8,
)
from pretrain.data import (
    EncodedTrainTransform,
    EpochSampler,
    SeededTransform,
    Uint8TrainTransform,
    Uint8ValTransform,
    batch_to_device,
    collate_encoded,
    collate_uint8,
    decode_batch,
    resize_uint8,
    select_loader,
    train_transform,
    val_transform,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four smooth-plus-noise photos-like images: three JPEGs (quality 90, 4:2:0) of odd sizes and
    one PNG."""
    out = tmp_path_factory.mktemp("img")
    g = np.random.default_rng(0)
    paths = []
    for k, (w, h) in enumerate([(160, 120), (97, 131), (200, 75), (90, 90)]):
        low = Image.fromarray((g.random((6, 8, 3))
                               * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
        arr = np.asarray(low).astype(np.float32) + g.normal(0, 12, (h, w, 3))
        im = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
        path = out / (f"{k}.JPEG" if k < 3 else f"{k}.png")
        im.save(path, quality=90) if k < 3 else im.save(path)
        paths.append(path)
    return paths


def pil_u8(img: Image.Image) -> torch.Tensor:
    return TF.pil_to_tensor(img).int()


def test_decode_equals_pil(images, tmp_path):
    """Measured: libjpeg-turbo through torchvision and through Pillow give identical pixels (max
    diff 0), PNG too; the decode is a channels-last view of the decoder's HWC buffer."""
    for p in images:
        x = read_image_uint8(p)
        assert x.dtype == torch.uint8 and x.shape == (3, *read_image(p).size[::-1])
        assert torch.equal(x.int(), pil_u8(read_image(p)))
    assert read_image_uint8(images[0]).stride() == (1, 3 * 160, 3)
    gray = tmp_path / "gray.jpg"  # grayscale JPEG -> 3 equal channels, as PIL's convert("RGB")
    read_image(images[0]).convert("L").save(gray, quality=90)
    assert torch.equal(read_image_uint8(gray).int(), pil_u8(read_image(gray)))
    # a content check, not the name: ImageNet has CMYK JPEGs and a PNG named .JPEG
    cmyk = tmp_path / "cmyk.jpg"
    read_image(images[0]).convert("CMYK").save(cmyk, quality=90)
    assert torch.equal(read_image_uint8(cmyk).int(), pil_u8(read_image(cmyk)))
    png_named_jpeg = tmp_path / "png.JPEG"
    png_named_jpeg.write_bytes(images[3].read_bytes())
    assert torch.equal(read_image_uint8(png_named_jpeg).int(), pil_u8(read_image(images[3])))


def test_decode_errors_name_the_file(images, tmp_path):
    cut = tmp_path / "cut.JPEG"
    data = images[0].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.JPEG: corrupt"):
        read_image_uint8(cut)
    empty = tmp_path / "empty.JPEG"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty.JPEG: empty image file"):
        read_image_uint8(empty)
    with pytest.raises(DataError, match="nope.JPEG: image not found"):
        read_image_uint8(tmp_path / "nope.JPEG")
    with pytest.raises(DataError, match="item 3: corrupt"):
        decode_uint8(torch.tensor(list(b"\xff\xd8\xffjunk"), dtype=torch.uint8), "item 3")


def test_hand_computed_crop_and_resize():
    """A 2x antialiased bilinear downscale by hand: a triangle filter of radius 2 input pixels, so
    output pixel 0 weighs inputs 0, 1, 2 by 3/7, 3/7, 1/7 (centre at 1.0, inputs at 0.5, 1.5, 2.5)
    and output 1 weighs inputs 1, 2, 3 by 1/7, 3/7, 3/7; horizontal pass first, each pass rounded
    to uint8 (as PIL does). Channel 0 is 20 r + 5 c: the horizontal pass gives 20 r + 25/7 -> 4,
    24, 44, 64 and 20 r + 80/7 -> 11, 31, 51, 71; the vertical pass (4*3 + 24*3 + 44) / 7 = 18.29
    -> 18, 177/7 -> 25, 348/7 -> 50, 397/7 -> 57."""
    img = torch.arange(48, dtype=torch.uint8).view(3, 4, 4) * 5
    out = resize_uint8(img, 2, 2)
    assert out[0].tolist() == [[18, 25], [50, 57]]
    assert torch.equal(out.int(), pil_u8(TF.to_pil_image(img).resize((2, 2), Image.BILINEAR)))
    # same size: the slice itself
    assert torch.equal(resize_uint8(img[:, 1:3, 0:3], 2, 3), img[:, 1:3, 0:3])


def _new_path(transform, path, seed):
    """The uint8 path for one image as training sees it: worker transform, collate, batch_to_device
    (CPU)."""
    torch.manual_seed(seed)
    item = transform(read_image_uint8(path))
    return item, batch_to_device(collate_uint8([(item, 0)]), CPU, False)[0][0]


def test_train_transform_equals_pil_path(images):
    """Same seed -> the same crop, flip, jitter and lighting draws as the PIL pipeline, in the same
    order (the RNG is left where the PIL path leaves it). Pixels, as measured on these images
    (levels of 1/255): crop + flip (+ lighting) max 1, mean 0.24 (PIL and torch round the
    antialiased bilinear differently, most often on upsampled small crops); + colour jitter 0.4 max
    4.75, mean 1.67, all of it a bias: PIL's ImageEnhance rounds to 8 bits after each of its three
    steps, the device-side ops are torchvision's float formulas (checked exactly in
    test_color_augment_is_torchvisions_float_jitter)."""
    cases = [(64, 0.0, 0.0, 1, 0.3), (48, 0.0, 0.1, 1, 0.3), (32, 0.4, 0.0, 5, 2.0),
             (48, 0.4, 0.1, 5, 2.0)]
    for size, cj, light, tol, mean_tol in cases:
        old, new = train_transform(size, 0.08, True, cj,
                                   light), Uint8TrainTransform(size, 0.08, True, cj, light)
        for p in images:
            for seed in range(6):
                torch.manual_seed(seed)
                a = old(read_image(p))
                after_old = torch.rand(1).item()
                item, b = _new_path(new, p, seed)
                assert torch.rand(1).item() == after_old  # the same draws consumed
                assert isinstance(item, tuple) == (cj > 0 or light > 0) and b.shape == (
                    3,
                    size,
                    size,
                )
                d = (a - b).abs() * 255
                assert d.max() <= tol + 1e-3 and d.mean() <= mean_tol, (p, seed, cj, light,
                                                                        d.max(), d.mean())


def test_color_augment_is_torchvisions_float_jitter(images):
    """The device-side colour ops equal torchvision's ColorJitter + the PIL path's Lighting applied
    to the float crop with the same draws (replayed from the seed), to float rounding, for a batch
    of different orders."""
    from torchvision import transforms as T

    from pretrain.data import Lighting, color_augment

    new = Uint8TrainTransform(40, 0.08, True, 0.4, 0.1)
    got, want = [], []
    for k, p in enumerate(images * 2):
        torch.manual_seed(k)
        crop, params = new(read_image_uint8(p))
        torch.manual_seed(k)
        T.RandomResizedCrop.get_params(read_image_uint8(p), (0.08, 1.0), (3 / 4, 4 / 3))
        torch.rand(1)  # the flip draw
        ref = T.ColorJitter(0.4, 0.4, 0.4)(crop.float() / 255)
        want.append(Lighting(0.1)(ref))
        got.append((crop, params))
    orders = {tuple(p[:4].int().tolist()) for _, p in got}
    assert len(orders) > 3  # several jitter orders in one batch
    x = torch.stack([c.float() / 255 for c, _ in got])
    out = color_augment(x, torch.stack([p for _, p in got]))
    assert torch.allclose(out, torch.stack(want), atol=1e-6, rtol=0)
    identity = torch.tensor([[0.0, 1, 2, 3, 1, 1, 1, 0, 0, 0]]).expand(len(x), 10)
    assert torch.equal(color_augment(x, identity), x)


def test_val_transform_equals_pil_path(images):
    """Resize the shorter side + centre crop: within 1/255 of the PIL path (measured max 1)."""
    for size, resize in [(32, None), (56, 64), (80, 80)]:
        old, new = val_transform(size, resize), Uint8ValTransform(size, resize)
        for p in images:
            a, b = old(read_image(p)), new(read_image_uint8(p))
            assert b.shape == (3, size, size)
            assert (a * 255 - b.float()).abs().max() <= 1 + 1e-3


def test_device_conversion_equals_float_normalisation(images):
    """uint8 batch -> batch_to_device -> the model's normalisation equals ToTensor -> the same
    normalisation, bit for bit (both divide the same integers by 255 in float32); channels_last is
    honoured."""
    from pretrain.methods import ResNetStages

    u8 = torch.stack([Uint8ValTransform(32, None)(read_image_uint8(p)) for p in images])
    old = torch.stack([TF.to_tensor(TF.to_pil_image(x)) for x in u8])
    for cl in (False, True):
        x, labels = batch_to_device((u8, torch.arange(4)), CPU, cl)
        assert (
            x.dtype == torch.float32
            and torch.equal(x, old)
            and torch.equal(labels, torch.arange(4))
        )
        assert x.is_contiguous(memory_format=torch.channels_last if cl
                               else torch.contiguous_format)
    net = ResNetStages("resnet18", 10)
    normalised = (batch_to_device((u8, torch.arange(4)), CPU, False)[0] - net.mean) / net.std
    assert torch.equal(normalised, (old - net.mean) / net.std)
    ref = TF.normalize(old, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert torch.allclose(normalised, ref, atol=1e-6)


def test_gpu_decode_path_on_cpu_equals_uint8_path(images):
    """`decode_device: cuda`'s code path (worker: bytes + drawn crop; device: batch decode, crop,
    resize, flip) run on the CPU: the same draws as the uint8 path and pixels within 1/255 (float
    resize rounded vs uint8 kernel), with and without the colour params; the PNG goes through the
    CPU fallback. nvJPEG itself is not exercised here."""
    for cj, light in [(0.0, 0.0), (0.4, 0.1)]:
        enc, ref = EncodedTrainTransform(40, 0.08, True, cj,
                                         light), Uint8TrainTransform(40, 0.08, True, cj, light)
        items, want = [], []
        for k, p in enumerate(images):
            torch.manual_seed(k)
            items.append((enc(read_bytes(p)), k))
            want.append(_new_path(ref, p, k)[1])
        batch = collate_encoded(items)
        datas, crops, labels = batch[:3]
        assert (
            len(batch) == (4 if cj else 3)
            and crops.shape == (4, 6)
            and crops[:, 5].tolist() == [40] * 4
        )
        assert labels.tolist() == [0, 1, 2, 3]
        x, y = batch_to_device(batch, CPU, False)
        # a 1-level rounding difference, times contrast x saturation (each <= 1.4)
        tol = 1.96 if cj else 1.0
        assert (
            x.shape == (4, 3, 40, 40) and (x - torch.stack(want)).abs().max() * 255 <= tol + 1e-3
        )
        if not cj:
            assert torch.equal(decode_batch(datas, crops, CPU), x)


def test_persistent_workers_keep_each_epochs_order(images):
    """Two workers that persist over epochs see each epoch's own permutation, the same as fresh
    loaders, and a mid-epoch start (resume) gives the tail of that epoch."""
    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return 12

        def __getitem__(self, i):
            return read_image_uint8(images[i % 4]), i

    sampler = EpochSampler(12, 4, seed=5)
    ds = SeededTransform(Files(), Uint8ValTransform(16, None))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler, num_workers=2,
                                         persistent_workers=True)
    seen = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        seen.append(torch.cat([b[1] for b in loader]).tolist())
    for epoch in range(3):
        want = torch.randperm(
            12, generator=torch.Generator().manual_seed(5 * 7919 + epoch)
        ).tolist()
        assert seen[epoch] == want
    assert seen[0] != seen[1] != seen[2]
    sampler.set_epoch(1, start_step=2)
    assert torch.cat([b[1] for b in loader]).tolist() == seen[1][8:]
    # a partly consumed epoch, then a new one: the leftovers are discarded
    first = next(iter(loader))
    sampler.set_epoch(2)
    assert (
        first[1].tolist() == seen[1][8:] and torch.cat([b[1] for b in loader]).tolist() == seen[2]
    )


def test_select_loader():
    assert select_loader("uint8", "cpu", CPU) == "uint8" and select_loader("pil", "cpu",
                                                                           CUDA) == "pil"
    assert select_loader("auto", "cpu", CUDA, dali_found=True) == "dali"
    assert select_loader("auto", "cpu", CPU, dali_found=True) == "uint8"
    assert select_loader("auto", "cpu", CUDA, dali_found=False) == "uint8"
    # DALI runs crop + flip only
    assert select_loader("auto", "cpu", CUDA, 0.4, 0.1, dali_found=True) == "uint8"
    assert select_loader("dali", "cpu", CUDA, dali_found=True) == "dali"
    assert select_loader("uint8", "cuda", CUDA) == select_loader("uint8", "cuda", CUDA, 0.4,
                                                                 0.1) == "uint8"
    bad = [(("dali", "cpu", CUDA), {"dali_found": False}, "pip install nvidia-dali-cuda120"),
           (("dali", "cpu", CPU), {"dali_found": True}, "needs a CUDA device"),
           (("dali", "cpu", CUDA, 0.4), {"dali_found": True}, "crop \\+ flip only"),
           (("uint8", "cuda", CPU), {}, "decode_device: cuda needs a CUDA device"),
           (("pil", "cuda", CUDA), {}, "is for data.loader: uint8"),
           (("fast", "cpu", CPU), {}, "data.loader must be one of"),
           (("uint8", "gpu", CPU), {}, "data.decode_device must be one of")]
    for args, kw, match in bad:
        with pytest.raises(ConfigError, match=match):
            select_loader(*args, **kw)


def test_dali_module_imports_without_dali():
    """pretrain.dali imports DALI lazily: the module loads where DALI is absent; building an
    iterator is where it would be needed (select_loader refuses that first, tested above)."""
    import importlib

    mod = importlib.import_module("pretrain.dali")
    assert hasattr(mod, "DaliTrainLoader")


@pytest.mark.slow
def test_resume_with_persistent_workers_equals_an_uninterrupted_run(toy_world, tmp_path):
    """The uint8 path (with jitter, lighting and a crop schedule) trained in one go without
    workers, and with two persistent workers killed after step 3 (checkpoint at 2) then resumed:
    the same weights bit for bit, since the order is a function of (seed, epoch) and each sample's
    augmentation of (seed, epoch, index)."""
    from pretrain.task import train

    cfg = {"name": "t", "seed": 3, "model": {"arch": "resnet18"}, "method": {"name": "erm"},
           "data": {"root": str(toy_world / "imagenet"), "crop_size": 32,
                    "crop_schedule": [[1, 24]], "val_resize": 36, "num_workers": 0,
                    "max_train": 32, "max_val": 8, "color_jitter": 0.4, "lighting": 0.1},
           "optim": {"batch_size": 8, "epochs": 2, "lr": 0.05, "schedule": "cosine"},
           "runtime": {"precision": "fp32", "flops": False, "figures": False,
                       "checkpoint_every_steps": 2}}
    train(cfg, tmp_path / "a")
    workers = dict(cfg, data=dict(cfg["data"], num_workers=2))
    stopped = dict(workers, runtime=dict(cfg["runtime"], stop_after_steps=3))
    assert train(stopped, tmp_path / "b") == {"stopped_at_step": 3}
    train(workers, tmp_path / "b", resume=True)
    a = torch.load(tmp_path / "a/backbone.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "b/backbone.pth", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
