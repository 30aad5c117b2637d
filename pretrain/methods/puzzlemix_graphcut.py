"""PuzzleMix's graph cut: gco-wrapper's alpha-beta swap (what the authors call) and the built-in
re-implementation of the same algorithm on the same integers (`_cut_swap`), one problem per image,
in a thread pool.

The problems come from `pretrain.methods.puzzlemix.puzzle_energy`: unary int32 [g, g, L], label
distance [L, L], edge weights w_v int32 [g-1, g] and w_h int32 [g, g-1]; the labels are int [g, g].
tests/pretrain/test_mixing.py pins the built-in solver against gco on 300 random problems
(tests/fixtures/puzzlemix_swap_gco.npz).
"""

from __future__ import annotations

import warnings

import numpy as np

from mixup_transfer.core.runtime import local_world_size, usable_cpus


def have_gco() -> bool:
    try:
        import gco  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


# GCoptimization.h: a larger scaled edge weight makes GCO abort the process
GCO_MAX_ENERGYTERM = 10_000_000


def _cut_gco(unary, dist, w_v, w_h) -> np.ndarray:
    if max(int(w_v.max(initial=0)), int(w_h.max(initial=0))) * 1000 > GCO_MAX_ENERGYTERM:
        raise ValueError("PuzzleMix: an edge weight exceeds what gco-wrapper accepts (it would "
                         "abort the process); lower beta / gamma (the official 1.2 / 0.5 stay "
                         "5x below it) or use solver swap")
    import gco  # noqa: PLC0415  (a dependency where its wheels exist: pip install gco-wrapper)

    return np.asarray(gco.cut_grid_graph(unary, dist, w_v, w_h,
                                         algorithm="swap")).reshape(unary.shape[:2])


def _gco_integer_terms(unary, dist, w_v, w_h):
    """The integers gco-wrapper hands to GCO for these arrays: a float label-distance matrix makes
    it treat the problem as real-valued and scale unaries by 1e5, edge weights by 1e3 and the
    distance by 1e2 (int32 arithmetic, as numpy does it)."""
    g, _, L = unary.shape
    u = (unary.reshape(g * g, L) * 100000).astype(np.intc).astype(np.int64)
    w = (np.r_[w_v.flatten(), w_h.flatten()] * 1000).astype(np.intc).astype(np.int64)
    v = (dist * 100).astype(np.intc).astype(np.int64)
    ids = np.arange(g * g).reshape(g, g)
    src = np.r_[ids[:-1, :].flatten(), ids[:, :-1].flatten()]
    dst = np.r_[ids[1:, :].flatten(), ids[:, 1:].flatten()]
    return u, v, w, src, dst


def _wrap_int32(v: np.ndarray) -> np.ndarray:
    """int64 values reduced to int32 the way C++ int arithmetic wraps (two's complement), kept as
    int64.

    GCO adds every term of a node's terminal capacity into one int32 (`Graph::add_tweights`), so
    where the unaries are large (gco-wrapper's unary * 1e5 already wrapped when one block carries
    more than about 21.5 / g^2 of the saliency) the capacity is the exact sum modulo 2^32.
    INT32_MIN, whose negation GCO cannot represent, becomes -(2^31 - 1)."""
    w = (v + 2**31) % 2**32 - 2**31
    return np.maximum(w, -(2**31 - 1))


_ALL_BITS: dict = {}


# one max-flow algorithm, read at once
def _sink_side_small(m: int, diff, pi, qi, cw) -> np.ndarray:  # noqa: C901
    """`_binary_cut` by Edmonds-Karp on Python integers (shortest augmenting paths), then the nodes
    that can reach the sink in the residual graph."""
    s, t = m, m + 1
    res: list[dict] = [{} for _ in range(m + 2)]

    def add(a, b, c):
        res[a][b] = res[a].get(b, 0) + c
        res[b].setdefault(a, 0)

    for p, d in enumerate(diff.tolist()):
        if d > 0:
            add(s, p, d)
        elif d < 0:
            add(p, t, -d)
    for a, b, c in zip(pi.tolist(), qi.tolist(), cw.tolist()):
        if c > 0:
            add(a, b, c)
            add(b, a, c)
    while True:
        parent, queue = {s: s}, [s]
        for x in queue:
            for y, c in res[x].items():
                if c > 0 and y not in parent:
                    parent[y] = x
                    queue.append(y)
            if t in parent:
                break
        if t not in parent:
            break
        f, y = None, t
        while y != s:
            x = parent[y]
            f = res[x][y] if f is None else min(f, res[x][y])
            y = x
        y = t
        while y != s:
            x = parent[y]
            res[x][y] -= f
            res[y][x] += f
            y = x
    reach, queue = {t}, [t]
    for y in queue:
        for x in res[y]:  # neighbours (every edge has its reverse entry)
            if x not in reach and res[x][y] > 0:
                reach.add(x)
                queue.append(x)
    return np.array([p in reach for p in range(m)], dtype=bool)


def _binary_cut(diff: np.ndarray, pi: np.ndarray, qi: np.ndarray, cw: np.ndarray) -> np.ndarray:
    """argmin over x in {0, 1}^m of sum_p diff_p x_p + sum_e cw_e [x_pi != x_qi] (cw >= 0; a
    negative, non-submodular cw is exact in the exhaustive case and left out by the max-flows), and
    among the minimisers the one with the fewest ones: the labels that can reach the sink in the
    residual graph of a max flow (what Boykov-Kolmogorov's maxflow labels SINK; the same set for
    every max flow). Exhaustive for m <= 12, a small Edmonds-Karp for m <= 64 (cheaper than scipy's
    call overhead there), else scipy's max-flow. -> bool [m] (True = 1)."""
    m = diff.shape[0]
    if m <= 12:
        if m not in _ALL_BITS:
            _ALL_BITS[m] = ((np.arange(2**m)[:, None] >> np.arange(m)[None, :])
                            & 1).astype(np.int64)
        bits = _ALL_BITS[m]
        e = bits @ diff + (bits[:, pi] != bits[:, qi]).astype(np.int64) @ cw
        best = bits[e == e.min()]
        return best.min(0).astype(bool)  # the intersection of the minimisers is one too (lattice)
    if m <= 64:
        return _sink_side_small(m, diff, pi, qi, cw)
    import scipy.sparse as sp  # noqa: PLC0415
    from scipy.sparse.csgraph import maximum_flow  # noqa: PLC0415

    s, t = m, m + 1
    cap = np.zeros((m + 2, m + 2), np.int64)
    cap[s, :m] = np.maximum(diff, 0)  # cut when p takes 1 (sink side)
    cap[:m, t] = np.maximum(-diff, 0)  # cut when p takes 0 (source side)
    # a negative edge is left out, as in `_sink_side_small`
    np.add.at(cap, (pi, qi), np.maximum(cw, 0))
    np.add.at(cap, (qi, pi), np.maximum(cw, 0))
    # terminal capacities are int32 already (`_wrap_int32`); an edge can exceed it only with
    # weights GCO refuses
    cap = np.minimum(cap, 2**31 - 1)
    flow = maximum_flow(sp.csr_matrix(cap.astype(np.int32)), s, t).flow.toarray()
    residual = (cap - flow) > 0  # flow is antisymmetric: reverse edges gain the flow
    reach = np.zeros(m + 2, bool)
    reach[t] = True
    while True:
        grown = reach | residual[:, reach].any(1)
        if (grown == reach).all():
            break
        reach = grown
    return reach[:m]


_WARNED: set = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _cut_swap(unary, dist, w_v, w_h) -> np.ndarray:
    """The built-in fallback: GCO's alpha-beta swap (initial labels 0; per cycle the pairs (a, b)
    in GCO's order; each move an exact min cut; the labels that can still reach the sink in the
    residual graph take b, as in Boykov-Kolmogorov's maxflow; cycles until the energy stops
    decreasing) on the same integers, in GCO's int32 arithmetic: gco-wrapper's scaled unaries and
    every node's terminal capacity wrap as there (`_wrap_int32`), so the masks equal gco's also
    where one block holds a large share of the saliency. A negative edge weight (gamma > 1 can make
    one) is a non-submodular move GCO's max-flow does not
    define: the solver then warns once that the masks may differ from gco's."""
    u, v, w, src, dst = _gco_integer_terms(unary, dist, w_v, w_h)
    if (w < 0).any():
        _warn_once("negative", "PuzzleMix swap solver: a negative edge weight (gamma > 1 makes "
                               "the energy non-submodular); the masks may differ from "
                               "gco-wrapper's there")
    n, L = u.shape
    lab = np.zeros(n, np.int64)
    rows = np.arange(n)

    def energy(lab):
        return int(u[rows, lab].sum() + (w * v[lab[src], lab[dst]]).sum())

    def move(a, b):
        act = (lab == a) | (lab == b)
        m = int(act.sum())
        if m == 0:
            return
        ids = np.flatnonzero(act)
        loc = np.full(n, -1)
        loc[ids] = np.arange(m)
        e0, e1 = u[ids, a].copy(), u[ids, b].copy()
        inner = act[src] & act[dst]
        for x, y in ((src, dst), (dst, src)):  # edges to fixed neighbours become unary terms
            half = act[x] & ~act[y]
            np.add.at(e0, loc[x[half]], w[half] * v[a, lab[y[half]]])
            np.add.at(e1, loc[x[half]], w[half] * v[b, lab[y[half]]])
        # extra cost of taking b, as GCO's int32 terminal capacity holds it
        diff = _wrap_int32(e1 - e0)
        pi, qi, cw = loc[src[inner]], loc[dst[inner]], w[inner] * v[a, b]
        lab[ids] = np.where(_binary_cut(diff, pi, qi, cw), b, a)

    pairs = [(i, j) for i in range(L) for j in range(L - 1, -1, -1) if i < j]
    e_new, e_old = energy(lab), None
    while e_old is None or e_old > e_new:
        e_old = e_new
        for a, b in pairs:
            move(a, b)
        e_new = energy(lab)
    return lab.reshape(unary.shape[:2])


def cut_grid(unary, dist, w_v, w_h, solver: str = "auto") -> np.ndarray:
    """One grid problem (unary [g, g, L], label distance [L, L], edge weights w_v [g-1, g], w_h [g,
    g-1]; int32, or float32 which gco-wrapper scales to integers, see `_gco_integer_terms`) by
    `solver` gco | swap | auto (gco if installed). -> labels int [g, g]."""
    if solver == "auto":
        solver = "gco" if have_gco() else "swap"
    if solver not in ("gco", "swap"):
        raise ValueError(f"unknown graph-cut solver {solver!r}; valid: auto, gco, swap")
    return (_cut_gco if solver == "gco" else _cut_swap)(unary, dist, w_v, w_h)


_POOL: dict = {}


def _pool(threads: int):
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    if threads not in _POOL:
        _POOL[threads] = ThreadPoolExecutor(threads)
    return _POOL[threads]


def grid_labels(unary, dist, w_v, w_h, solver: str = "auto",
                threads: int | None = None) -> np.ndarray:
    """Solve the b graph cuts of `puzzle_energy`'s output -> labels int [b, g, g].
    solver: "gco" (gco-wrapper's alpha-beta swap, what the authors call), "swap" (the built-in
    re-implementation of the same algorithm on the same integers) or "auto" (gco if installed).
    threads: solve the b problems in a thread pool (gco releases the GIL); None = min(b, the CPUs
    this process may use shared by the node's processes)."""
    if solver == "auto":
        solver = "gco" if have_gco() else "swap"
    if solver not in ("gco", "swap"):
        raise ValueError(f"unknown PuzzleMix solver {solver!r}; valid: auto, gco, swap")
    fn = _cut_gco if solver == "gco" else _cut_swap
    b = unary.shape[0]
    if threads is None:
        threads = min(b, max(1, usable_cpus() // local_world_size()))
    if threads <= 1 or b == 1:
        return np.stack([fn(unary[i], dist, w_v[i], w_h[i]) for i in range(b)])
    return np.stack(list(_pool(threads).map(fn, unary, [dist] * b, w_v, w_h)))
