"""The files a pipeline stage reads, as a content identity that goes into the stage's key.

A stage's key (`mixup_transfer.pipeline.run.content_key`) hashes its resolved config and an
`Inputs` object: the upstream backbone (hashed whole) and the dataset folders it reads. A changed
input then reruns exactly the stages that read it: a retrained backbone reruns its detection, WSOL
and robustness stages even when its pretraining config is unchanged; an edited split file,
annotation or metadata file reruns the stages that read that dataset.

Datasets are identified by their index files, not by every pixel: under a dataset folder every
non-image file (split lists, XML annotations, COCO json, wsolevaluation metadata, CIFAR batches,
class lists) counts by its content (files up to 1 MiB hashed whole; larger ones by size,
modification time and a hash of their first MiB), and image files by their relative names (the
folder listing: an image added, removed or renamed changes the key; an image rewritten in place
under the same name does not).

`Inputs` is evaluated when the key is computed, not when the stage is planned: the backbone of a
downstream stage exists only once its pretraining stage has run, and the pipeline computes each
stage's key right before it runs it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm",
                            ".pgm", ".gif"})
# files up to this size are hashed whole; larger ones by size, mtime and this many bytes
HEAD_BYTES = 1 << 20
# (path, size, mtime_ns, whole) -> identity: each file hashed once a process
_FILE_CACHE: dict[tuple, str] = {}


def file_identity(path: str | os.PathLike, whole: bool = False) -> str:
    """The content identity of one file: ``sha256`` of the whole file when it is small or `whole`,
    else ``<size>:<mtime_ns>:<sha256 of the first MiB>``; "missing" when there is no such file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing"
    full = whole or st.st_size <= HEAD_BYTES
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, full)
    if key not in _FILE_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            if full:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            else:
                h.update(f.read(HEAD_BYTES))
        digest = h.hexdigest()[:32]
        _FILE_CACHE[key] = digest if full else f"{st.st_size}:{st.st_mtime_ns}:{digest}"
    return _FILE_CACHE[key]


def tree_identity(root: str | os.PathLike) -> str:
    """The identity of a dataset folder (or file): image files by relative name, every other file
    by `file_identity`; one hash over the sorted entries. "missing" when `root` does not exist."""
    root = Path(root)
    if root.is_file():
        return file_identity(root)
    if not root.is_dir():
        return "missing"
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        for name in sorted(filenames):
            entry = os.path.join(rel, name)
            if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                h.update(f"{entry}\n".encode())
            else:
                h.update(f"{entry}\t{file_identity(os.path.join(dirpath, name))}\n".encode())
    return h.hexdigest()[:32]


class Inputs:
    """What a stage reads: `files` hashed whole (checkpoints), `trees` by `tree_identity` (dataset
    folders). `identity()` reads them now; the pipeline's `content_key` calls it when it computes
    the key."""

    def __init__(self, files: Iterable = (), trees: Iterable = ()):
        self.files = sorted({str(f) for f in files if f is not None})
        self.trees = sorted({str(t) for t in trees if t is not None})

    def identity(self) -> dict:
        return {"files": {f: file_identity(f, whole=True) for f in self.files},
                "trees": {t: tree_identity(t) for t in self.trees}}

    def __repr__(self) -> str:
        return f"Inputs(files={self.files}, trees={self.trees})"


def pretrain_inputs(cfg: dict) -> Inputs:
    """A pretraining stage reads its `data.root` (ImageNet layout, CIFAR or TinyImageNet
    folder)."""
    return Inputs(trees=[(cfg.get("data") or {}).get("root")])


def detection_inputs(cfg: dict, backbone) -> Inputs:
    """A detection stage reads the backbone and its `data.root` (VOCdevkit or COCO folder)."""
    from transfer.detection.config import resolve_config

    return Inputs(files=[backbone], trees=[resolve_config(cfg)["data"]["root"]])


def wsol_inputs(cfg: dict, backbone) -> Inputs:
    """A WSOL stage reads the backbone, the metadata of its two splits and the image folder's
    listing."""
    from wsol.finetune import resolve_config

    d = resolve_config(cfg)["data"]
    meta = Path(d["metadata_root"])
    return Inputs(files=[backbone],
                  trees=[meta / d["train_split"], meta / d["test_split"], d["image_root"]])


def robustness_inputs(backbone, root, ood: Iterable[str]) -> Inputs:
    """A robustness stage reads the backbone, the evaluation set's folder and its OOD folders (PATH
    or NAME=PATH)."""
    folders = [str(o).split("=", 1)[1] if "=" in str(o) and not Path(str(o)).exists() else str(o)
               for o in ood or []]
    return Inputs(files=[backbone], trees=[root, *folders])
