"""Analysis of the embedding space (MultiMix §4.4, arXiv:2311.05538): alignment and uniformity
(Wang & Isola, ICML
2020) of the validation-set embeddings, and a 2-D UMAP of them coloured by class (MultiMix Figure
      3).

Definitions (Wang & Isola 2020, eqs. 4-5; MultiMix §4.4 for the positive pairs):

- ``alignment = E_{(i, j) positive} ||f_i - f_j||_2^alpha`` with ``alpha = 2``; MultiMix §4.4: "the
  expected pairwise distance of examples in the same class", so a positive pair is two distinct
  validation examples of the same class (every unordered pair counted once);
- ``uniformity = log E_{i < j} exp(-t ||f_i - f_j||_2^2)`` with ``t = 2``, over every unordered
  pair of distinct examples (Wang & Isola's reference code:
  ``torch.pdist(x).pow(2).mul(-t).exp().mean().log()``).

``f`` is the embedding the classifier reads (the input of its last linear layer: the pooled
backbone feature, or a stage-2 head's output), L2-normalised by default as Wang & Isola define both
quantities on the hypersphere. On the sphere Jensen gives ``uniformity >= -t * E||f_i - f_j||^2 >=
-2t = -4``, and ``alignment <= 4``: MultiMix reports uniformity -4.77 and -5.68 (§4.4, poster
table), below that bound, so its numbers cannot come from normalised embeddings with t = 2; the
paper does not say what it computed. ``normalize=False`` gives the unnormalised variant.

Everything is computed in float64 in row blocks of the pairwise-distance matrix (O(block * n)
memory), with a running log-sum-exp for the uniformity term.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mixup_transfer.core.runtime import (
    autocast,
    check_outputs_finite,
    count_nonfinite,
    progress,
    save_figure,
)


def _pair_blocks(emb: torch.Tensor, block: int):
    """Yield (row slice start, squared distances ``[b, n]`` of rows ``start:start+b`` to every
    row)."""
    sq = (emb * emb).sum(1)
    for s in range(0, emb.shape[0], block):
        e = emb[s:s + block]
        d2 = sq[s:s + block, None] + sq[None, :] - 2.0 * (e @ emb.T)
        yield s, d2.clamp_(min=0.0)


def alignment_uniformity(embeddings, labels, alpha: float = 2.0, t: float = 2.0,
                         normalize: bool = True, block: int = 1024) -> dict:
    """Alignment and uniformity of ``embeddings`` ``[n, d]`` with class ``labels`` ``[n]``
    (definitions above).

    Returns ``{alignment, uniformity, n, n_positive_pairs, alpha, t, normalized}``; ``alignment``
    is None when no class has two examples. Raises ValueError for fewer than two embeddings or
    mismatched lengths.
    """
    emb = torch.as_tensor(np.asarray(embeddings), dtype=torch.float64)
    lab = torch.as_tensor(np.asarray(labels).reshape(-1), dtype=torch.int64)
    if emb.ndim != 2 or emb.shape[0] != lab.shape[0]:
        raise ValueError(f"embeddings {tuple(emb.shape)} and labels {tuple(lab.shape)} do not "
                         "match ([n, d], [n])")
    n = emb.shape[0]
    if n < 2:
        raise ValueError(f"alignment and uniformity need at least two embeddings, got {n}")
    if normalize:
        emb = nn.functional.normalize(emb, dim=1)
    cols = torch.arange(n)
    lse, align_sum, n_pos = -math.inf, 0.0, 0
    for s, d2 in _pair_blocks(emb, block):
        rows = torch.arange(s, s + d2.shape[0])
        upper = cols[None, :] > rows[:, None]  # each unordered pair i < j once
        vals = -t * d2[upper]
        if vals.numel():
            lse = float(torch.logaddexp(torch.tensor(lse, dtype=torch.float64),
                                        torch.logsumexp(vals, 0)))
        pos = upper & (lab[rows][:, None] == lab[None, :])
        align_sum += float(d2[pos].pow(alpha / 2.0).sum())
        n_pos += int(pos.sum())
    n_pairs = n * (n - 1) // 2
    return {"alignment": align_sum / n_pos if n_pos else None,
            "uniformity": lse - math.log(n_pairs), "n": int(n), "n_positive_pairs": n_pos,
            "alpha": float(alpha), "t": float(t), "normalized": bool(normalize)}


def embedding_layer(model: nn.Module) -> nn.Module:
    """The layer whose input is the embedding: ``model.embedding_layer`` if the model names one,
    else the classifier ``fc`` of a wrapped torchvision ResNet (``model.model.fc``), the ``head``
    of a wrapped timm ViT, or the model's own ``fc``, else the last ``nn.Linear`` the model
    registers."""
    named = getattr(model, "embedding_layer", None)
    if isinstance(named, nn.Module):
        return named
    # a wrapped ResNet's fc or ViT's head (timm), then the model's own fc
    for owner, name in ((getattr(model, "model", None), "fc"),
                        (getattr(model, "model", None), "head"), (model, "fc")):
        fc = getattr(owner, name, None)
        if isinstance(fc, nn.Linear):
            return fc
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no linear classifier to read the embedding "
                         "from")
    return linears[-1]


@torch.no_grad()
def extract_embeddings(model: nn.Module, loader, device, precision: str = "fp32",
                       desc: str = "embeddings") -> tuple[np.ndarray, np.ndarray]:
    """(embeddings ``[n, d]`` float32, labels ``[n]``) over ``loader`` (items ``(images, labels,
    ...)``): the input of ``embedding_layer(model)`` during the ordinary forward pass."""
    layer, seen = embedding_layer(model), []
    handle = layer.register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].detach().float().flatten(1))
    )
    feats, labels = [], []
    try:
        for batch in progress(loader, desc=desc):
            images, y = batch[0], batch[1]
            seen.clear()
            with autocast(device, precision):
                model(images.to(device))
            if len(seen) != 1:
                raise RuntimeError(f"the embedding layer ran {len(seen)} times in one forward "
                                   "pass (expected 1)")
            feats.append(seen[0].cpu())
            labels.append(torch.as_tensor(y).reshape(-1))
    finally:
        handle.remove()
    out = torch.cat(feats)
    check_outputs_finite("robustness", desc, {"embedding": int(count_nonfinite(out))})
    return out.numpy(), torch.cat(labels).numpy()


def umap_subset(labels, n_classes: int = 10, per_class: int = 100, seed: int = 0) -> np.ndarray:
    """Indices for the UMAP figure (MultiMix Figure 3: "100 test examples per class of 10 randomly
    chosen classes"): ``n_classes`` classes drawn with ``seed``, the first ``per_class`` examples
    of each, sorted."""
    labels = np.asarray(labels).reshape(-1)
    classes = np.unique(labels)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(classes, size=min(n_classes, classes.size), replace=False))
    idx = [np.nonzero(labels == c)[0][:per_class] for c in chosen]
    return np.sort(np.concatenate(idx)) if idx else np.zeros(0, np.int64)


def umap_2d(embeddings, n_neighbors: int = 15, min_dist: float = 0.1, n_epochs: int | None = None,
            seed: int = 0, metric: str = "euclidean") -> np.ndarray:
    """2-D UMAP (umap-learn) of ``embeddings`` ``[n, d]`` -> ``[n, 2]``; ``seed`` makes it
    repeatable."""
    import umap  # umap-learn: imported here, its numba start-up is slow

    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.shape[0] <= 2:
        raise ValueError(f"UMAP needs more than two embeddings, got {emb.shape[0]}")
    # the spectral initialisation needs more points than eigenvectors; tiny sets start at random
    init = "spectral" if emb.shape[0] >= 16 else "random"
    reducer = umap.UMAP(n_components=2, n_neighbors=min(n_neighbors, emb.shape[0] - 1),
                        min_dist=min_dist, init=init, n_epochs=n_epochs, random_state=seed,
                        metric=metric, transform_seed=seed, n_jobs=1)
    return reducer.fit_transform(emb)


def umap_figure(points, labels, path, title: str = "", class_names=None) -> Path:
    """Scatter of the 2-D ``points`` ``[n, 2]`` coloured by class (one colour per class, legend
    when <= 20)."""
    from .figures import plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pts, labels = np.asarray(points), np.asarray(labels).reshape(-1)
    classes = np.unique(labels)
    cmap = plt.get_cmap("tab10" if classes.size <= 10 else "tab20" if classes.size <= 20
                        else "hsv")
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for k, c in enumerate(classes):
        m = labels == c
        name = class_names[int(c)] if class_names is not None else str(int(c))
        ax.scatter(pts[m, 0], pts[m, 1], s=6,
                   color=cmap(k / max(1, classes.size - 1) if classes.size > 20 else k),
                   label=name, alpha=0.8, linewidths=0)
    if classes.size <= 20:
        ax.legend(fontsize=6, markerscale=2, loc="best", frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or "UMAP of the embeddings", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def embedding_analysis(model: nn.Module, dataset, device, out_dir=None, batch_size: int = 64,
                       num_workers: int = 0, precision: str = "fp32", alpha: float = 2.0,
                       t: float = 2.0, normalize: bool = True, umap: bool = True,
                       umap_classes: int = 10, umap_per_class: int = 100, umap_neighbors: int = 15,
                       umap_epochs: int | None = None, seed: int = 0, title: str = "",
                       class_names=None) -> dict:
    """Embeddings of every item of ``dataset`` (``(image [3, S, S] in [0, 1], label, ...)``, any
    classification set) under ``model``: alignment / uniformity over all of them, and (``umap``)
    the UMAP figure of a ``umap_classes`` x ``umap_per_class`` subset written to
    ``out_dir/figures/umap.png``.

    Returns ``{"embedding": {alignment, uniformity, ..., dim, umap: {...}}, "figures": {"umap":
    path}}``.
    """
    from torch.utils.data import DataLoader

    from .data import collate

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate if _has_boxes(dataset) else None)
    emb, labels = extract_embeddings(model, loader, device, precision)
    res = alignment_uniformity(emb, labels, alpha=alpha, t=t, normalize=normalize)
    res["dim"] = int(emb.shape[1])
    figs = {}
    if umap:
        idx = umap_subset(labels, umap_classes, umap_per_class, seed)
        pts = umap_2d(emb[idx] / (np.linalg.norm(emb[idx], axis=1, keepdims=True) + 1e-12)
                      if normalize
                      else emb[idx], n_neighbors=umap_neighbors, n_epochs=umap_epochs, seed=seed)
        res["umap"] = {"n": int(idx.size),
                       "classes": sorted(int(c) for c in np.unique(labels[idx])),
                       "n_neighbors": int(min(umap_neighbors, idx.size - 1)),
                       "n_epochs": umap_epochs, "seed": int(seed), "normalized": bool(normalize)}
        if out_dir is not None:
            umap_figure(pts, labels[idx], Path(out_dir) / "figures" / "umap.png", title=title,
                        class_names=class_names)
            figs["umap"] = "figures/umap.png"
    return {"embedding": res, "figures": figs}


def _has_boxes(dataset) -> bool:
    """Robustness-style items ``(image, label, boxes, index)`` need the ragged-box collate."""
    item = dataset[0]
    return isinstance(item, tuple) and len(item) == 4


def run_embedding_suite(cfg: dict, checkpoint, imagenet_root, out_dir, metrics: dict) -> dict:
    """The stage's ``embedding`` suite over the val split of ``imagenet_root`` (resolved stage
    options ``cfg``): adds ``embedding`` and ``figures.umap`` to ``metrics`` (or starts it) and
    rewrites ``out_dir/metrics.json``."""
    import time

    from mixup_transfer.core.runtime import get_device, write_json

    from .data import ValSet, open_val_set
    from .evaluate import _rounded, subset_indices
    from .model import load_classifier_model

    t0 = time.time()
    device = get_device(cfg["runtime"]["device"])
    base = open_val_set(imagenet_root)  # ImageNet, TinyImageNet or CIFAR layout
    indices = subset_indices(len(base), cfg["data"]["max_val"])
    model, meta = load_classifier_model(checkpoint, num_classes=len(base.classes),
                                        arch=cfg["arch"], classes=base.classes)
    model = model.to(device)
    ds = ValSet(base, indices, cfg["image_size"], cfg["resize"], need_boxes=False)
    workers = cfg["data"]["num_workers"] if cfg["data"]["num_workers"] is not None else 0
    res = embedding_analysis(model, ds, device, out_dir, batch_size=cfg["eval"]["batch_size"],
                             num_workers=workers, precision=cfg["runtime"]["precision"],
                             alpha=cfg["embedding_alpha"], t=cfg["embedding_t"],
                             normalize=cfg["embedding_normalize"], umap=cfg["umap"],
                             umap_classes=cfg["umap_classes"],
                             umap_per_class=cfg["umap_per_class"],
                             umap_neighbors=cfg["umap_neighbors"], umap_epochs=cfg["umap_epochs"],
                             seed=cfg["seed"], title=str(meta.get("method") or ""),
                             class_names=base.classes)
    out = dict(metrics) if metrics else {"checkpoint": str(checkpoint),
                                         "method": meta.get("method"), "arch": meta.get("arch"),
                                         "num_classes": len(base.classes),
                                         "n_images": len(indices), "figures": {}, "seconds": {}}
    out["embedding"] = res["embedding"]
    out.setdefault("figures", {}).update(res["figures"])
    out.setdefault("seconds", {})["embedding"] = round(time.time() - t0, 2)
    out = _rounded(out)
    if out_dir is not None:
        write_json(out, Path(out_dir) / "metrics.json")
    return out
