"""Federations from a compatibility relation: components, leaders, and linkage."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.sparse import csr_matrix, issparse
from scipy.sparse.csgraph import connected_components

from fedrnd.rnd.config import RULES

PyTree = Any


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Federation ids ``0..F-1`` in order of each federation's lowest client id."""
    _, first, inv = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))
    return order[inv].astype(np.int32)


def _dense_components(adj: np.ndarray) -> np.ndarray:
    """Connected components of a symmetric dense boolean adjacency ``[C, C]``.

    Breadth-first by whole frontiers: every client's row is read once, so the work is
    ``O(C^2)`` boolean operations and no ``C^2``-entry sparse copy is ever built (a mostly
    compatible 10,000-client population would otherwise need gigabytes of index arrays).
    """
    c = adj.shape[0]
    lab = np.full(c, -1, np.int64)
    for seed in range(c):
        if lab[seed] >= 0:
            continue
        lab[seed] = seed
        frontier = np.array([seed])
        while frontier.size:
            reach = adj[frontier].any(axis=0) & (lab < 0)
            frontier = np.flatnonzero(reach)
            lab[frontier] = seed
    return lab


def federations(compatible, rule: str = "mutual", s_self: np.ndarray | None = None
                ) -> np.ndarray:
    """Federation id per client ``[C]`` from a compatibility relation.

    Args:
      compatible: ``[C, C]`` bool (``compatible[i, j]``: ``j`` is compatible with ``i``) or a
        scipy sparse matrix of the same meaning (sparse mode).
      rule: ``"mutual"``: components of the graph of pairs compatible both ways;
        ``"one_sided"``: components of pairs compatible either way; ``"leader"``: clients in
        increasing self-novelty order become leaders when still free, each taking every free
        client mutually compatible with it (no chaining through intermediaries).
      s_self: ``[C]`` self-novelty (needed by ``"leader"``).
    Returns ids ``0..F-1`` numbered by each federation's lowest client id.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {list(RULES)}, got {rule!r}")
    sparse = issparse(compatible)
    a = csr_matrix(compatible, dtype=bool) if sparse else np.asarray(compatible, bool)
    c = a.shape[0]
    if a.ndim != 2 or a.shape != (c, c):
        raise ValueError(f"compatibility must be square, got {a.shape}")
    if rule == "one_sided":
        if sparse:
            return _relabel(connected_components(a, directed=True, connection="weak")[1])
        return _relabel(_dense_components(a | a.T))
    mutual = a.multiply(a.T).tocsr() if sparse else a & a.T
    if rule == "mutual":
        if sparse:
            return _relabel(connected_components(mutual, directed=False)[1])
        return _relabel(_dense_components(mutual))
    if s_self is None or np.shape(s_self) != (c,):
        raise ValueError(f"rule='leader' needs s_self of shape ({c},)")
    lab = np.full(c, -1, np.int64)
    for leader in np.argsort(np.asarray(s_self), kind="stable"):
        if lab[leader] >= 0:
            continue
        lab[leader] = leader
        row = mutual.getrow(leader).indices if sparse else np.flatnonzero(mutual[leader])
        free = row[lab[row] < 0]
        lab[free] = leader
    return _relabel(lab)




# --------------------------------------------------------------------------------------------
# average linkage on the test's evidence (the default extraction)
# --------------------------------------------------------------------------------------------

LINKAGE_CUT = 0.5
"""Default cut of :func:`linkage_federations`: groups merge while their mean evidence is at
most 1/2, the significance boundary of :func:`fedrnd.rnd.stats.evidence`."""

_JITTER = 1e-9


def _pair_jitter(i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """A fixed pseudo-random ``[0, 1)`` per unordered pair: breaks exact ties identically in
    the dense and the sparse extraction (many pairs have evidence exactly 0)."""
    a = np.minimum(i, j).astype(np.uint64)
    b = np.maximum(i, j).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = (a * np.uint64(0x9E3779B97F4A7C15)) ^ (b * np.uint64(0xC2B2AE3D27D4EB4F))
        h ^= h >> np.uint64(29)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(32)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def linkage_federations(evidence: np.ndarray, cut: float = LINKAGE_CUT) -> np.ndarray:
    """Federations by average linkage on a dense symmetric evidence matrix ``[C, C]``.

    Start from single clients; repeatedly merge the two groups whose *mean* pairwise evidence
    is lowest, while it is at most ``cut`` (UPGMA cut at ``cut``). Two groups of ``a`` and
    ``b`` clients join only when most of their ``a * b`` pairs look compatible, so one false
    link (one low entry among many high ones) cannot merge them, unlike the connected
    components of the paper's rule (single linkage). A client compatible with nobody stays
    alone and never changes the merges of the others. No cap on the number of federations.
    Exact ties are broken by a fixed per-pair jitter of ``1e-9`` (the same as the sparse
    :func:`sparse_linkage_federations`, which it equals when every pair is observed).
    """
    from scipy.cluster.hierarchy import fcluster, linkage

    v = np.asarray(evidence, np.float64)
    c = v.shape[0]
    if v.ndim != 2 or v.shape != (c, c):
        raise ValueError(f"evidence must be a square [C, C] matrix, got {v.shape}")
    if c < 2:
        return np.zeros(c, np.int32)
    iu, ju = np.triu_indices(c, 1)
    cond = 0.5 * (v[iu, ju] + v[ju, iu]) + _JITTER * _pair_jitter(iu, ju)
    if not np.all(np.isfinite(cond)):
        raise ValueError("evidence must be finite")
    z = linkage(cond, method="average")
    lab = fcluster(z, t=float(cut) + _JITTER, criterion="distance")
    return _relabel(lab)


def sparse_linkage_federations(num_clients: int, i: np.ndarray, j: np.ndarray,
                               evidence: np.ndarray, cut: float = LINKAGE_CUT,
                               min_support: float = 1.0) -> np.ndarray:
    """Average linkage over the *observed* pairs of a sparse graph (two-stage discovery).

    ``(i, j, evidence)``: one entry per unordered observed pair (duplicates are averaged).
    The mean evidence between two groups is taken over their observed pairs only; groups
    merge (lowest mean first) while it is at most ``cut`` and the pairs observed between them
    number at least ``min_support * min(a, b)`` (on average every member of the smaller
    group has ``min_support`` observed pairs with the other): a single candidate edge
    between two groups of 5, even a false link, is too little support. With every pair
    observed the support always holds and the result equals :func:`linkage_federations`.

    Greedy with a heap and small-into-large merging of the groups' neighbour tables:
    ``O(E log E)`` for ``E`` observed pairs (a second or two per 10^5 pairs).
    """
    import heapq

    c = int(num_clients)
    i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
    v = np.asarray(evidence, np.float64)
    if not (i.shape == j.shape == v.shape) or i.ndim != 1:
        raise ValueError(f"i, j, evidence must be equal-length vectors, got {i.shape}, "
                         f"{j.shape}, {v.shape}")
    if i.size and (min(i.min(), j.min()) < 0 or max(i.max(), j.max()) >= c):
        raise ValueError(f"pair endpoints must be client ids in [0, {c})")
    if not np.all(np.isfinite(v)):
        raise ValueError("evidence must be finite")
    keep = i != j
    a, b = np.minimum(i[keep], j[keep]), np.maximum(i[keep], j[keep])
    key = a * c + b
    uniq, inv = np.unique(key, return_inverse=True)
    total = np.bincount(inv, v[keep]) if uniq.size else np.zeros(0)
    cnt = np.bincount(inv) if uniq.size else np.zeros(0)
    ua, ub = uniq // c, uniq % c
    val = total / np.maximum(cnt, 1) + _JITTER * _pair_jitter(ua, ub)
    # Neighbour tables: nbr[g][h] = [sum of evidence, observed pairs] between groups g and h.
    nbr: list[dict[int, list[float]]] = [dict() for _ in range(c)]
    for x, y, s in zip(ua.tolist(), ub.tolist(), val.tolist(), strict=True):
        nbr[x][y] = nbr[y][x] = [s, 1.0]  # one shared entry per pair of groups
    size = [1] * c
    alive = [True] * c
    version = [0] * c
    lim = float(cut) + _JITTER
    heap = [(s, x, y, 0, 0) for x, y, s in zip(ua.tolist(), ub.tolist(), val.tolist(),
                                                strict=True) if s <= lim]
    heapq.heapify(heap)
    parent = list(range(c))
    while heap:
        s, x, y, vx, vy = heapq.heappop(heap)
        if not (alive[x] and alive[y]) or version[x] != vx or version[y] != vy:
            continue
        tot, n = nbr[x][y]
        if n < min_support * min(size[x], size[y]):
            continue  # re-pushed when either group changes
        # Merge the smaller table into the larger; the survivor keeps its id.
        if len(nbr[x]) < len(nbr[y]):
            x, y = y, x
        alive[y] = False
        parent[y] = x
        del nbr[x][y]
        del nbr[y][x]
        for h, (t2, n2) in nbr[y].items():
            del nbr[h][y]
            cur = nbr[x].get(h)
            if cur is None:
                cur = [0.0, 0.0]
                nbr[x][h] = cur
                nbr[h][x] = cur
            cur[0] += t2
            cur[1] += n2
        nbr[y] = {}
        size[x] += size[y]
        version[x] += 1
        for h, (t2, n2) in nbr[x].items():
            m = t2 / n2
            if m <= lim and alive[h]:
                lo, hi = (x, h) if x < h else (h, x)
                heapq.heappush(heap, (m, lo, hi, version[lo], version[hi]))
    root = np.array(parent)
    for _ in range(64):  # path halving over the merge forest (depth is logarithmic)
        nxt = root[root]
        if np.array_equal(nxt, root):
            break
        root = nxt
    return _relabel(root)
