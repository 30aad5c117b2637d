"""NVIDIA DALI training loader (`data.loader: dali`): decode on the GPU (nvJPEG, `device="mixed"`),
random resized crop, flip and the [0, 1] scaling in one DALI pipeline.

Optional: DALI (`pip install nvidia-dali-cuda120`) is imported only when this loader is built, and
`pretrain.data.select_loader` refuses it, with a clear error, where DALI or a GPU is missing. It
has not been run in the toolkit's CPU-only test environment; the selection logic and the build /
reset logic (with a stand-in pipeline) are tested there.

What it keeps and what it does not:
  - the order: the pipeline reads its files through an external source, `EpochFiles`, which gives
    each epoch this process's files in `EpochSampler`'s order (no DALI shuffling), so the data
    order and a resume's position are exactly those of the other loaders;
  - the pipeline is built once per crop size and reset at each epoch; its files are read in
    `threads` Python worker processes (DALI's parallel external source);
  - the augmentation draws are DALI's, not torch's per sample seeds: the pipeline is seeded once,
    when it is built, by (run seed, rank, epoch, start step) (`dali_seed`), and later epochs
    continue its random streams. A run is repeatable and no two ranks draw alike, but a resumed
    run (built at the resume's epoch and step) does not redraw the crops of an uninterrupted
    one, and the crops differ from the uint8 / PIL loaders' for the same seed;
  - crop + flip only (no colour jitter or PCA lighting; `select_loader` refuses them).
Images come out as float [b, 3, size, size] in [0, 1] on the GPU (normalisation stays in the
model).
"""

from __future__ import annotations

import copy

import numpy as np
import torch

RATIO = (3.0 / 4.0, 4.0 / 3.0)


def _pipeline(source: EpochFiles, size: int, scale_min: float, hflip: bool, batch: int,
              threads: int, device_id: int, seed: int):
    """The built DALI pipeline: `source` (called with a BatchInfo in `threads` worker processes) ->
    (images float [b, 3, size, size] in [0, 1], labels) on the GPU."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=device_id, seed=seed,
                  py_num_workers=threads, py_start_method="spawn")
    def pipe():
        jpegs, label = fn.external_source(source=source, num_outputs=2, batch=True,
                                          batch_info=True, parallel=True,
                                          dtype=[types.UINT8, types.INT64])
        images = fn.decoders.image(jpegs, device="mixed", output_type=types.RGB)
        images = fn.random_resized_crop(images, size=[size, size], random_area=[scale_min, 1.0],
                                        random_aspect_ratio=list(RATIO))
        mirror = fn.random.coin_flip(probability=0.5) if hflip else 0
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                          mean=[0.0] * 3, std=[255.0] * 3, mirror=mirror)
        return images, label.gpu()

    p = pipe()
    p.build()
    return p


def _iterator(pipe):
    """DALI's PyTorch iterator over `pipe`, ending each epoch where the source does; reset by the
    caller."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    return DALIGenericIterator([pipe], ["images", "labels"],
                               last_batch_policy=LastBatchPolicy.DROP, auto_reset=False)


def dali_seed(seed: int, rank: int, epoch: int, start_step: int) -> int:
    """The DALI pipeline's seed for this process, built at (epoch, start_step): the run seed, the
    rank, the epoch and the start step, so that no two ranks draw the same crops and flips (the
    rank 0 value is the one used before the rank took part). In [0, 2**31 - 1)."""
    return (seed * 1_000_003 + epoch * 10_007 + start_step + rank * 1_000_000_007) % (2**31 - 1)


class EpochFiles:
    """DALI's external source: batch `info.iteration` of the pipeline's epoch `info.epoch_idx` (0
    at the build, +1 at each reset) is this process's files of the sampler's epoch `epoch +
    epoch_idx`, from `start_step` in epoch 0 and from the start in later ones -> (encoded bytes,
    uint8 arrays; labels, int64 [1] arrays). Raises StopIteration after the epoch's whole batches.
    A pure function of `info`: DALI calls it in worker processes, each with its own copy."""

    def __init__(self, samples, sampler, batch: int):
        self.samples, self.batch = samples, batch
        self.sampler = copy.copy(sampler)
        self.epoch, self.start_step = sampler.epoch, sampler.start_step
        self._order: tuple[int, list[int]] = (-1, [])

    def order(self, epoch_idx: int) -> list[int]:
        """The sample indices of the pipeline's epoch `epoch_idx`, cut to whole batches."""
        if self._order[0] != epoch_idx:
            self.sampler.set_epoch(self.epoch + epoch_idx,
                                   self.start_step if epoch_idx == 0 else 0)
            indices = [index for index, _ in self.sampler]
            self._order = (epoch_idx, indices[: len(indices) // self.batch * self.batch])
        return self._order[1]

    def __call__(self, info):
        order = self.order(info.epoch_idx)
        chunk = order[info.iteration * self.batch:(info.iteration + 1) * self.batch]
        if not chunk:
            raise StopIteration
        files = [np.fromfile(self.samples[i][0], dtype=np.uint8) for i in chunk]
        return files, [np.array([self.samples[i][1]], dtype=np.int64) for i in chunk]


class DaliTrainLoader:
    """Iterable over one epoch's (images float [b, 3, size, size] on the GPU, labels int64 [b])
    micro-batches, once per epoch: the caller `set_epoch`s the shared `sampler` (an `EpochSampler`,
    this process's share of the epoch from its start step) before each iteration.

    The pipeline is built at the first iteration and reset at each next one when that one continues
    it (the next epoch, from its start, after the previous epoch was read to its end); otherwise (a
    resume inside an epoch, an epoch left unfinished) it is built again."""

    def __init__(self, samples, sampler, size: int, scale_min: float, hflip: bool, batch: int,
                 device: torch.device, seed: int, threads: int = 4):
        self.samples, self.sampler, self.size, self.scale_min = samples, sampler, size, scale_min
        self.hflip = hflip
        self.batch, self.device, self.seed, self.threads = batch, device, seed, threads
        self._iter = None
        # the epoch a reset continues with (None: build at the next iteration)
        self._next_epoch: int | None = None
        self.builds = 0

    def __len__(self) -> int:
        return len(self.sampler) // self.batch

    def _start(self):
        s = self.sampler
        if self._iter is not None and s.epoch == self._next_epoch and s.start_step == 0:
            self._iter.reset()
            return self._iter
        source = EpochFiles(self.samples, s, self.batch)
        pipe = _pipeline(source, self.size, self.scale_min, self.hflip, self.batch, self.threads,
                         self.device.index or 0,
                         dali_seed(self.seed, s.rank, s.epoch, s.start_step))
        self._iter, self.builds = _iterator(pipe), self.builds + 1
        return self._iter

    def __iter__(self):
        if len(self) == 0:
            return
        epoch, it = self.sampler.epoch, self._start()
        self._next_epoch = None  # until this epoch is read to its end
        for out in it:
            yield out[0]["images"], out[0]["labels"].view(-1).long()
        self._next_epoch = epoch + 1
