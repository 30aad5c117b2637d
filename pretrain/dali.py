"""NVIDIA DALI training loader (`data.loader: dali`): decode on the GPU (nvJPEG, `device="mixed"`), random
resized crop, flip and the [0, 1] scaling in one DALI pipeline.

Optional: DALI (`pip install nvidia-dali-cuda120`) is imported only when this loader is built, and
`pretrain.data.select_loader` refuses it, with a clear error, where DALI or a GPU is missing. It has not
been run in the toolkit's CPU-only test environment; only the selection logic is tested there.

What it keeps and what it does not:
  - the order: each epoch reads this process's files in `EpochSampler`'s order (a new file list per epoch,
    no DALI shuffling), so the data order and a resume's position are exactly those of the other loaders;
  - the augmentation draws are DALI's (seeded by the run seed, the epoch and the start step), not torch's per
    sample seeds: a run is repeatable, but a resumed epoch does not redraw the crops of an uninterrupted one,
    and the crops differ from the uint8 / PIL loaders' for the same seed;
  - crop + flip only (no colour jitter or PCA lighting; `select_loader` refuses them);
  - the pipeline is rebuilt at each epoch (its file list is the epoch's order): a few seconds per epoch, against
    minutes for an ImageNet epoch; the draws are seeded by (run seed, rank, epoch, start step) (`dali_seed`).
Images come out as float [b, 3, size, size] in [0, 1] on the GPU (normalisation stays in the model).
"""

from __future__ import annotations

import torch

RATIO = (3.0 / 4.0, 4.0 / 3.0)


def _pipeline(files: list[str], labels: list[int], size: int, scale_min: float, hflip: bool, batch: int,
              threads: int, device_id: int, seed: int):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=device_id, seed=seed)
    def pipe():
        jpegs, label = fn.readers.file(files=files, labels=labels, random_shuffle=False, name="reader")
        images = fn.decoders.image(jpegs, device="mixed", output_type=types.RGB)
        images = fn.random_resized_crop(images, size=[size, size], random_area=[scale_min, 1.0],
                                        random_aspect_ratio=list(RATIO))
        mirror = fn.random.coin_flip(probability=0.5) if hflip else 0
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=[0.0] * 3,
                                          std=[255.0] * 3, mirror=mirror)
        return images, label.gpu()

    p = pipe()
    p.build()
    return p


def dali_seed(seed: int, rank: int, epoch: int, start_step: int) -> int:
    """The DALI pipeline's seed for this process's share of an epoch: the run seed, the rank, the epoch and the
    start step, so that no two ranks draw the same crops and flips (the rank 0 value is the one used before the
    rank took part). In [0, 2**31 - 1)."""
    return (seed * 1_000_003 + epoch * 10_007 + start_step + rank * 1_000_000_007) % (2**31 - 1)


class DaliTrainLoader:
    """Iterable over one epoch's (images float [b, 3, size, size] on the GPU, labels int64 [b]) micro-batches.

    samples: the dataset's [(path, label)]; sampler: an `EpochSampler` already `set_epoch`-ed (this process's
    share of the epoch, from its start step)."""

    def __init__(self, samples, sampler, size: int, scale_min: float, hflip: bool, batch: int, device: torch.device,
                 seed: int, threads: int = 4):
        self.samples, self.sampler, self.size, self.scale_min, self.hflip = samples, sampler, size, scale_min, hflip
        self.batch, self.device, self.seed, self.threads = batch, device, seed, threads

    def __len__(self) -> int:
        return len(self.sampler) // self.batch

    def __iter__(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        order = [index for index, _ in self.sampler][: len(self) * self.batch]
        if not order:
            return
        files = [self.samples[i][0] for i in order]
        labels = [self.samples[i][1] for i in order]
        seed = dali_seed(self.seed, self.sampler.rank, self.sampler.epoch, self.sampler.start_step)
        pipe = _pipeline(files, labels, self.size, self.scale_min, self.hflip, self.batch, self.threads,
                         self.device.index or 0, seed)
        it = DALIGenericIterator([pipe], ["images", "labels"], reader_name="reader",
                                 last_batch_policy=LastBatchPolicy.DROP, auto_reset=False)
        for out in it:
            yield out[0]["images"], out[0]["labels"].view(-1).long()
