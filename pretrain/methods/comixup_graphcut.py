"""Co-Mixup's mask optimisation (Kim, Choo, Jeong, Song, "Co-Mixup: Saliency Guided Joint Mixup
with Supermodular Diversity", ICLR 2021, arXiv:2102.03065, Algorithm 1): n_out outputs, each a
labeling of a g x g block grid by the n inputs, minimising -saliency + eta * prior + beta *
smoothness + gamma * (supermodular) diversity, by coordinate descent over the outputs: the
diversity term is made modular around the other outputs' labels and each output is one multi-label
graph cut (PuzzleMix's, `pretrain.methods.puzzlemix_graphcut.cut_grid`: gco-wrapper's alpha-beta
swap or the built-in re-implementation).

The steps equal the official code (snu-mllab/Co-Mixup match.py: `get_onehot_matrix`,
`graphcut_wrapper`, `graphcut_multi`, `resolve_label`, `obj_fn`), pinned by
tests/fixtures/comixup_official.npz. It runs on the host, on CPU float32 tensors. Shapes: cost [n,
g, g] (the unary of every input), A [n, n] (input compatibility), labelings as one-hot [n_out, g,
g, n] (a block may hold two or three inputs at 0.5 each, see `cut_output`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pretrain.methods.puzzlemix_graphcut import cut_grid

# the official soft labels of the three-label extension: each new label mixes two of the top three
# inputs
PAIRS3 = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.0, 0.5], [0.0, 0.5, 0.5]])
NEAR = np.array([[0.25, 0.25, 1.0], [0.25, 1.0, 0.25], [1.0, 0.25, 0.25]], dtype=np.float32)


def objective(cost: torch.Tensor, onehot: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Co-Mixup's objective without the threshold (`obj_fn`): unary + beta / 2 * squared label
    differences of neighbouring blocks + gamma * sum over pairs of different outputs of their
    shared input counts. -> 0-d."""
    n_out, n = onehot.shape[0], onehot.shape[-1]
    counts = onehot.reshape(n_out, -1, n).sum(1)
    loss = torch.sum(cost.permute(1, 2, 0).unsqueeze(0) * onehot)
    loss = loss + beta / 2 * (((onehot[:, :-1] - onehot[:, 1:]) ** 2).sum() +
                              ((onehot[:, :, :-1] - onehot[:, :, 1:]) ** 2).sum())
    return loss + gamma * (torch.sum(counts.sum(0) ** 2) - torch.sum(counts**2))


def modular_penalty(A: torch.Tensor, others: torch.Tensor, thres: float, gamma: float,
                    kind: str = "hard"):
    """The diversity term made modular for one output: others [n] the other outputs' input counts.
    hard: as the official expression evaluates, 2 gamma (A with column j zeroed where (A others)_j
    <= thres) @ others; soft: 2 gamma [(A others) > thres] ((A others) - thres). -> [n]."""
    shared = A @ others
    over = (shared > thres).float()
    if kind == "hard":
        # the official `(A @ p > thres).float() * A @ p` groups this way
        return 2 * gamma * ((over * A) @ others)
    if kind == "soft":
        return 2 * gamma * (over * (shared - thres))
    raise ValueError(f"comixup: thres_type must be hard | soft, got {kind!r}")


def _extended(unary: torch.Tensor, assigned: torch.Tensor, n_new: int):
    """The official multi-label extension: n_new extra labels, each a pair of the assigned inputs
    at 0.5 each, with cost the pair's mean unary - 5e-4 and label distance 0.25 to its own inputs.
    -> (unary, dist, soft [n_new, n])."""
    n = unary.shape[-1]
    dist = np.ones((n + n_new, n + n_new), dtype=np.float32) - np.eye(n + n_new, dtype=np.float32)
    idx = assigned.numpy()
    if n_new == 1:
        extra = unary[:, :, assigned].mean(-1, keepdim=True) - 5e-4
        dist[-1, :-1][idx] = 0.25
        dist[:-1, -1][idx] = 0.25
        soft = torch.zeros(1, n)
        soft[0, assigned] = 0.5
    else:
        extra = torch.matmul(unary[:, :, assigned], PAIRS3) - 5e-4
        dist[-3:, :-3][:, idx] = NEAR
        dist[:-3, -3:][idx, :] = NEAR
        soft = torch.zeros(3, n)
        soft[:, assigned] = PAIRS3
    return torch.cat([unary, extra], -1), dist, soft


def cut_output(unary: torch.Tensor, counts: torch.Tensor, beta: float, first: bool,
               solver: str) -> torch.Tensor:
    """One output's graph cut (`graphcut_wrapper`). unary [g, g, n]; counts [n] its previous input
    counts. After the first round an output that used two inputs may also take their 50/50 mix, one
    that used three or more the 50/50 mixes of its three most used. -> one-hot labeling [g, g, n]
    (0.5 entries for the mixes)."""
    g, _, n = unary.shape
    assigned = counts > 0
    used = 0 if first else int(assigned.sum())
    soft = None
    dist = np.ones((n, n), dtype=np.float32) - np.eye(n, dtype=np.float32)
    if used == 2:
        unary, dist, soft = _extended(unary, assigned, 1)
    elif used >= 3:
        top = torch.zeros_like(assigned)
        top[torch.topk(counts, k=3).indices] = True
        unary, dist, soft = _extended(unary, top, 3)
    w_v = beta * np.ones((g - 1, g), dtype=np.float32)
    w_h = beta * np.ones((g, g - 1), dtype=np.float32)
    labels = torch.from_numpy(np.asarray(cut_grid(np.ascontiguousarray(unary.numpy()), dist, w_v,
                                                  w_h, solver)))
    onehot = F.one_hot(labels.long().reshape(g, g), unary.shape[-1]).float()
    if soft is None:
        return onehot
    return onehot[..., :n] + onehot[..., n:] @ soft


def resolve_cost(assigned: torch.Tensor) -> torch.Tensor:
    """`resolve_label`: for each pair of outputs i1 < i2 that use the same set of inputs (more than
    one), an extra unit of cost on i1's first input for i1 and on its second input for i2. assigned
    [n_out, n] in {0, 1}. -> same."""
    add = torch.zeros_like(assigned)
    dist = torch.clamp((assigned.unsqueeze(1) - assigned.unsqueeze(0)).abs().sum(-1), max=1.0)
    for i1, i2 in torch.triu(1.0 - dist, diagonal=1).nonzero().tolist():
        inputs = assigned[i1].nonzero()[:, 0]
        if len(inputs) > 1:
            add[i1, inputs[0]] = 1.0
            add[i2, inputs[1]] = 1.0
    return add


def comix_labelings(cost: torch.Tensor, A: torch.Tensor, init: torch.Tensor, prior: torch.Tensor,
                    beta: float = 0.32, gamma: float = 1.0, eta: float = 0.05, thres: float = 0.83,
                    thres_type: str = "hard", set_resolve: bool = True, niter: int = 4,
                    solver: str = "auto") -> torch.Tensor:
    """Co-Mixup's labelings of one partition (`get_onehot_matrix`). cost [n, g, g] (minus the
    normalised saliency); A [n, n]; init [n_out, g, g] the initial labels (the official draws them
    uniformly); prior [n] a Dirichlet draw (its -eta log is added to each input's cost). beta,
    gamma, eta and thres (a fraction of the g^2 blocks) are per-grid coefficients, divided by g^2
    as there. `niter` rounds over the outputs, stopped early when the objective changes by less
    than 1e-6 (relative); before the last round, outputs with identical input sets are pushed apart
    (`resolve_cost`). -> one-hot labelings [n_out, g, g, n]."""
    n, g, _ = cost.shape
    n_out = init.shape[0]
    thres, beta, gamma, eta = thres * g * g, beta / g / g, gamma / g / g, eta / g / g
    cost = cost - eta * torch.log(prior.reshape(n, 1, 1) + 1e-8)
    onehot = F.one_hot(init.long(), n).float()
    loss_prev = objective(cost, onehot, beta, gamma)
    total = onehot.reshape(-1, n).sum(0)
    add = None
    for it in range(niter):
        for i in range(n_out):
            counts = onehot[i].reshape(g * g, n).sum(0)
            total = total - counts
            unary = cost + modular_penalty(A, total, thres, gamma, thres_type).reshape(n, 1, 1)
            if add is not None:
                unary = unary + gamma * add[i].reshape(n, 1, 1)
            onehot[i] = cut_output(unary.permute(1, 2, 0), counts, beta, it == 0, solver)
            total = total + onehot[i].reshape(g * g, n).sum(0)
        if it == niter - 2 and set_resolve:
            add = resolve_cost((onehot.reshape(n_out, -1, n).sum(1) > 0).float())
        loss = objective(cost, onehot, beta, gamma)
        if (loss_prev - loss).abs() / loss.abs() < 1e-6:
            break
        loss_prev = loss
    return onehot


def compatibility(a_dist: torch.Tensor, omega: float) -> torch.Tensor:
    """A = (1 - omega) I + omega * a_dist * n / sum(a_dist) (mixup_process) for one partition,
    a_dist [n, n] the l1 distances of the salient points. A partition whose points all coincide
    (sum 0) keeps A = (1 - omega) I."""
    n = a_dist.shape[0]
    total = a_dist.sum()
    scaled = a_dist / total * n if total > 0 else torch.zeros_like(a_dist)
    return (1 - omega) * torch.eye(n) + omega * scaled


def partition_costs(pooled: torch.Tensor, a_dist: torch.Tensor, part: int, omega: float):
    """Per partition of `part` consecutive examples (the last may be smaller): (cost [n, g, g] =
    minus the block saliency normalised to sum 1 per image, A [n, n]). pooled [b, g, g] block
    saliency, a_dist [b, b]."""
    out = []
    for s in range(0, pooled.shape[0], part):
        sc = pooled[s:s + part]
        n = sc.shape[0]
        cost = -(sc / sc.reshape(n, -1).sum(1).reshape(n, 1, 1))
        out.append((cost, compatibility(a_dist[s:s + part, s:s + part], omega)))
    return out


def batch_labelings(pooled: np.ndarray, a_dist: np.ndarray, part: int, rng, alpha: float = 2.0,
                    omega: float = 0.001, **knobs) -> np.ndarray:
    """`comix_labelings` of every partition of a batch (`mixup_process`), from host copies of the
    block saliency pooled [b, g, g] and the salient-point distances a_dist [b, b]; per partition
    the prior Dirichlet(alpha) and the initial labels drawn from rng (a numpy Generator). knobs:
    those of `comix_labelings`. -> float32, the partitions' [n, g, g, n] labelings flattened and
    concatenated."""
    out = []
    for cost, A in partition_costs(torch.from_numpy(pooled), torch.from_numpy(a_dist), part,
                                   omega):
        n, g, _ = cost.shape
        prior = torch.from_numpy(rng.dirichlet(np.full(n, alpha)).astype(np.float32))
        init = torch.from_numpy(rng.integers(0, n, (n, g, g)))
        out.append(comix_labelings(cost, A, init, prior, **knobs).reshape(-1).numpy())
    return np.concatenate(out)
