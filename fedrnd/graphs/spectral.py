"""Recursive spectral bisection of a communication graph into clusters (SSD-FL's set-up phase).

SSD-FL (Wang, Chiang, Poor 2026; ``REFERENCES.md`` section 2) forms clusters once, before
training, by an iterative spectral method along the Fiedler vector of the graph Laplacian,
guided by the consensus gap (Cheeger's inequality) and a score of data and optimizer
heterogeneity; the number and the members of the clusters come out of it. The paper does not
publish the rule or the score. **What follows is our reconstruction**, with every constant an
option:

1. *Edge weights.* Each device ``i`` has a descriptor ``h_i`` (:func:`client_descriptors`: its
   label histogram, its mean input and a one-hot of its optimizer kind, each block scaled to unit
   total variance over the population). A link ``(i, j)`` of the communication graph gets the
   weight ``a_ij = exp(-||h_i - h_j||^2 / (2 s^2))`` (``s`` the median descriptor distance over
   the links; floored at ``1e-3`` so the weighted graph stays connected); without descriptors
   every link weighs 1.
2. *Candidate cut of a cluster S.* The Fiedler vector of the weighted normalised Laplacian of
   ``S`` (the generalised problem ``L v = lambda D v``) orders the nodes; the sweep cut of that
   order with the smallest weighted conductance ``cut(A, B) / min(vol A, vol B)`` is taken,
   among the cuts whose two sides are each connected in the communication graph (so gossip
   can run inside every cluster) and hold at least ``min_size`` nodes. Cheeger's inequality
   ties the two: ``nu / 2 <= phi(S) <= sqrt(2 nu)`` for the conductance ``phi`` of the best cut
   and the second eigenvalue ``nu`` of the normalised Laplacian, and the sweep of the Fiedler
   order attains the upper bound.
3. *Does the split pay?* Two terms, each in ``[0, 1]``:

   - consensus gap: gossip inside a cluster contracts disagreement at a rate set by ``nu``
     of the (unweighted) cluster graph. By Cheeger, ``S`` as a whole mixes no faster than
     ``2 phi`` (``phi`` the conductance of the cut in the communication graph), while each side
     mixes at its own ``nu``; ``gamma = min(nu(A), nu(B)) / (2 phi)`` says how much the cut is
     the bottleneck of consensus. Term: ``max(0, 1 - 1 / gamma)``. Two dense communities joined
     by one edge score close to 1; a ring, a path, a grid or a complete graph cut in two score
     0 (their cut is no narrower than the sides' own bottlenecks), however large.
   - heterogeneity: ``rho``, the share of the descriptors' dispersion in ``S`` that lies
     between ``A`` and ``B`` (``1 - (|A| H(A) + |B| H(B)) / (|S| H(S))``, ``H`` the mean
     squared distance to the set's mean), adjusted for chance like an adjusted R^2 (a random
     split of ``n`` nodes explains ``1 / (n - 1)`` on average).

   A cut *pays* when ``gap_weight * (1 - 1/gamma)^+ + heterogeneity_weight * rho_adj >=
   threshold`` (defaults 1, 1, 0.5). A cluster is split when its cut pays or when a cut of its
   sides within ``lookahead`` (2) levels below pays: in a chain of communities the first cut
   has community bottlenecks inside its sides, so it scores low, but its children pay. A
   deeper search would let any small local bottleneck (a sparse patch of a random geometric
   graph) cut the whole graph down to it. Clusters are split best score first up to
   ``max_clusters``; the number of clusters is an output.
4. Ablations: ``num_clusters = K`` splits the best-scoring cluster until there are ``K``,
   whatever the score; :func:`random_clusters` deals the nodes into ``K`` random clusters of
   equal size (the random-cluster baseline; those clusters need not be connected).

Everything here runs once on the host (numpy / scipy): dense eigensolves up to
``DENSE_MAX`` nodes, sparse shift-invert (``eigsh``) above.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse as sp

from fedrnd.graphs.graph import Graph, to_numpy_edges

DENSE_MAX = 200
"""Largest (sub)graph solved with a dense eigensolver; larger ones use sparse ``eigsh``."""


# --- Laplacians and the Fiedler vector --------------------------------------------------------

def _as_adjacency(graph: Graph | np.ndarray | sp.spmatrix) -> sp.csr_matrix:
    """Symmetric ``[N, N]`` csr adjacency (weights kept) of a Graph or a matrix."""
    if isinstance(graph, Graph):
        n = graph.num_nodes
        e = to_numpy_edges(graph)
        a = sp.coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n))
        a = a + a.T
    else:
        a = sp.csr_matrix(graph, dtype=np.float64)
        if a.shape[0] != a.shape[1]:
            raise ValueError(f"adjacency must be square, got shape {a.shape}")
        if abs(a - a.T).max() > 1e-12 if a.nnz else False:
            raise ValueError("adjacency must be symmetric (an undirected graph)")
        if a.nnz and a.data.min() < 0:
            raise ValueError("adjacency weights must be >= 0")
    a = sp.csr_matrix(a, dtype=np.float64)
    a.setdiag(0)
    a.eliminate_zeros()
    return a


def laplacian(adj: Graph | np.ndarray | sp.spmatrix, normalized: bool = False) -> sp.csr_matrix:
    """``L = D - A``, or ``I - D^-1/2 A D^-1/2`` with ``normalized`` (isolated nodes: 0 rows)."""
    a = _as_adjacency(adj)
    deg = np.asarray(a.sum(axis=1)).ravel()
    if not normalized:
        return sp.csr_matrix(sp.diags(deg) - a)
    inv = np.where(deg > 0, 1.0 / np.sqrt(np.where(deg > 0, deg, 1.0)), 0.0)
    eye = sp.diags((deg > 0).astype(np.float64))
    return sp.csr_matrix(eye - sp.diags(inv) @ a @ sp.diags(inv))


def _two_smallest(lap: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    n = lap.shape[0]
    if n <= DENSE_MAX:
        from threadpoolctl import threadpool_limits

        # Small dense problems: BLAS threads only cost (60x slower on a loaded 2-core CPU).
        with threadpool_limits(1):
            vals, vecs = np.linalg.eigh(lap.toarray())
        return vals[:2], vecs[:, :2]
    from scipy.sparse.linalg import eigsh

    # Shift-invert just below 0: the two eigenvalues nearest the shift are the two smallest.
    vals, vecs = eigsh(lap.tocsc(), k=2, sigma=-1e-3, which="LM")
    order = np.argsort(vals)
    return vals[order], vecs[:, order]


def _check_connected(a: sp.csr_matrix, what: str = "graph") -> None:
    from scipy.sparse.csgraph import connected_components

    count, label = connected_components(a, directed=False)
    if count > 1:
        sizes = np.sort(np.bincount(label))[::-1]
        shown = ", ".join(map(str, sizes[:8])) + (", ..." if len(sizes) > 8 else "")
        raise ValueError(f"{what} is disconnected ({count} components of sizes {shown}); "
                         "spectral clustering needs a connected graph (its Fiedler value is 0 "
                         "and the vector is not unique); cluster each component apart")


def algebraic_connectivity(adj: Graph | np.ndarray | sp.spmatrix,
                           normalized: bool = True) -> float:
    """Second-smallest eigenvalue of the (normalised) Laplacian: 0 iff disconnected."""
    a = _as_adjacency(adj)
    n = a.shape[0]
    if n < 2:
        return 0.0
    return float(max(0.0, _two_smallest(laplacian(a, normalized))[0][1]))


def fiedler_vector(adj: Graph | np.ndarray | sp.spmatrix, normalized: bool = True
                   ) -> tuple[float, np.ndarray]:
    """``(lambda_2, v)`` of a connected graph's Laplacian.

    With ``normalized`` (default), ``v`` solves ``L v = lambda D v`` (Shi-Malik; the vector
    whose sweep cut meets Cheeger's bound) and ``lambda_2`` is the normalised Laplacian's.
    ``ValueError`` on a disconnected graph.
    """
    a = _as_adjacency(adj)
    n = a.shape[0]
    if n < 2:
        raise ValueError(f"a Fiedler vector needs at least 2 nodes, got {n}")
    _check_connected(a)
    vals, vecs = _two_smallest(laplacian(a, normalized))
    v = vecs[:, 1]
    if normalized:
        v = v / np.sqrt(np.asarray(a.sum(axis=1)).ravel())
    return float(vals[1]), v


# --- sweep cut --------------------------------------------------------------------------------

def _connected_prefixes(order: np.ndarray, nbrs: list[np.ndarray]) -> np.ndarray:
    """``ok[k]``: the first ``k`` nodes of ``order`` form one connected piece (union-find)."""
    n = len(order)
    parent = np.arange(n)
    added = np.zeros(n, bool)

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    ok = np.zeros(n + 1, bool)
    comps = 0
    for k, i in enumerate(order):
        added[i] = True
        comps += 1
        for j in nbrs[i]:
            if added[j]:
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[ri] = rj
                    comps -= 1
        ok[k + 1] = comps == 1
    return ok


def sweep_cut(adj: sp.csr_matrix, order: np.ndarray, *, min_size: int = 1,
              connectivity: sp.csr_matrix | None = None) -> tuple[int, float]:
    """Best prefix of ``order``: ``(k, conductance)`` minimising ``cut / min(vol_A, vol_B)``
    over the weighted ``adj``, with ``A = order[:k]``, both sides at least ``min_size`` nodes
    and (with ``connectivity``) each side connected in that graph. ``(0, inf)`` if no cut
    qualifies."""
    n = len(order)
    a = sp.csr_matrix(adj)
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    coo = sp.triu(a, k=1).tocoo()
    lo = np.minimum(rank[coo.row], rank[coo.col])
    hi = np.maximum(rank[coo.row], rank[coo.col])
    # Edge (lo, hi) is cut by the prefixes of sizes lo + 1 .. hi.
    diff = np.zeros(n + 2)
    np.add.at(diff, lo + 1, coo.data)
    np.add.at(diff, hi + 1, -coo.data)
    cut = np.cumsum(diff)[: n + 1]
    deg = np.asarray(a.sum(axis=1)).ravel()
    vol_a = np.concatenate([[0.0], np.cumsum(deg[order])])
    vol_b = vol_a[-1] - vol_a
    k = np.arange(n + 1)
    ok = (k >= min_size) & (n - k >= min_size)
    if connectivity is not None:
        c = sp.csr_matrix(connectivity)
        nbrs = [c.indices[c.indptr[i]:c.indptr[i + 1]] for i in range(n)]
        ok &= _connected_prefixes(order, nbrs)
        ok &= _connected_prefixes(order[::-1], nbrs)[::-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        phi = np.where(ok, cut / np.maximum(np.minimum(vol_a, vol_b), 1e-300), np.inf)
    if not np.any(np.isfinite(phi)):
        return 0, float("inf")
    best = np.flatnonzero(phi <= phi[np.isfinite(phi)].min() * (1 + 1e-9) + 1e-15)
    k_best = int(best[np.argmin(np.abs(best - n / 2))])  # ties: the most balanced cut
    return k_best, float(phi[k_best])


def conductance(adj: Graph | np.ndarray | sp.spmatrix, side: np.ndarray) -> float:
    """``cut(A, B) / min(vol A, vol B)`` of the node set ``side`` (a bool mask or indices)."""
    a = _as_adjacency(adj)
    mask = np.zeros(a.shape[0], bool)
    mask[side] = True
    deg = np.asarray(a.sum(axis=1)).ravel()
    cut = float(a[mask][:, ~mask].sum())
    return float(cut / max(min(deg[mask].sum(), deg[~mask].sum()), 1e-300))


# --- heterogeneity descriptors ----------------------------------------------------------------

def _unit_block(b: np.ndarray) -> np.ndarray:
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    d = b - b.mean(0, keepdims=True)
    total = float(np.mean(np.sum(d * d, axis=1)))
    return d / np.sqrt(total) if total > 1e-12 else np.zeros_like(d)


def client_descriptors(data: Any, kind: Any = None, *, labels: float = 1.0,
                       inputs: float = 1.0, optimizer: float = 1.0,
                       chunk: int = 256) -> np.ndarray:
    """``[C, D]`` heterogeneity descriptors, one row per device (host).

    Blocks, each centred and scaled to unit total variance over the population (a block that
    does not vary is all zero), then multiplied by its weight: ``labels`` (the device's label
    histogram over its training data), ``inputs`` (its mean training input, flattened) and
    ``optimizer`` (one-hot of its optimizer kind, ``kind [C]``, e.g. ``hp.kind``). A weight of 0
    drops a block. In a deployment the devices would exchange these with their neighbours in
    the set-up phase; here they are read off the federated data.
    """
    idx = np.asarray(data.train_idx)
    count = np.asarray(data.train_count)
    c, n_max = idx.shape
    valid = np.arange(n_max)[None, :] < count[:, None]
    blocks = []
    if labels:
        y = np.asarray(data.y)[idx]
        k = max(int(data.num_classes), int(y.max()) + 1)
        hist = np.zeros((c, k))
        np.add.at(hist, (np.repeat(np.arange(c), n_max)[valid.ravel()], y[valid]), 1.0)
        blocks.append(labels * _unit_block(hist / np.maximum(count, 1)[:, None]))
    if inputs:
        x = np.asarray(data.x)
        mean = np.zeros((c, int(np.prod(x.shape[1:]))))
        for s in range(0, c, chunk):  # a chunk of devices at a time: [chunk, N, F] in memory
            rows = x[idx[s:s + chunk]].reshape(len(idx[s:s + chunk]), n_max, -1)
            w = valid[s:s + chunk, :, None]
            mean[s:s + chunk] = (rows * w).sum(1) / np.maximum(w.sum(1), 1)
        blocks.append(inputs * _unit_block(mean))
    if optimizer and kind is not None:
        kind = np.asarray(kind).astype(int)
        blocks.append(optimizer * _unit_block(np.eye(int(kind.max()) + 1)[kind]))
    if not blocks:
        return np.zeros((c, 0))
    return np.concatenate(blocks, axis=1)


def heterogeneity(desc: np.ndarray) -> float:
    """``H``: mean squared distance of the descriptors to their mean."""
    d = desc - desc.mean(0, keepdims=True)
    return float(np.mean(np.sum(d * d, axis=1))) if len(desc) else 0.0


def edge_weights(adj: sp.csr_matrix, desc: np.ndarray | None, floor: float = 1e-3
                 ) -> sp.csr_matrix:
    """``a_ij = max(floor, exp(-||h_i - h_j||^2 / (2 s^2)))`` on the links of ``adj``."""
    a = sp.csr_matrix(adj).tocoo()
    if desc is None or desc.shape[1] == 0:
        w = np.ones(a.nnz)
    else:
        d2 = np.sum((desc[a.row] - desc[a.col]) ** 2, axis=1)
        s2 = float(np.median(d2)) if a.nnz else 0.0
        if s2 <= 1e-12:
            s2 = float(np.mean(d2)) if a.nnz and np.mean(d2) > 1e-12 else 1.0
        w = np.maximum(floor, np.exp(-d2 / (2 * s2)))
    return sp.csr_matrix((w, (a.row, a.col)), shape=a.shape)


# --- recursive bisection ----------------------------------------------------------------------

@dataclasses.dataclass
class Split:
    """One candidate bisection of a cluster and the terms of the decision."""

    nodes: np.ndarray        # the cluster's node ids
    side: np.ndarray         # bool [len(nodes)]: True for side A
    nu: float                # normalised algebraic connectivity of the cluster
    nu_a: float
    nu_b: float
    phi: float               # conductance of the cut in the communication graph
    gamma: float             # min(nu_a, nu_b) / nu
    rho: float               # chance-adjusted share of heterogeneity between the sides
    score: float

    def record(self) -> dict[str, float]:
        return {"size": int(len(self.nodes)), "size_a": int(self.side.sum()),
                "size_b": int((~self.side).sum()), "nu": self.nu, "nu_a": self.nu_a,
                "nu_b": self.nu_b, "phi": self.phi,
                "cheeger_lower": self.nu / 2, "cheeger_upper": float(np.sqrt(2 * self.nu)),
                "gamma": self.gamma, "rho": self.rho, "score": self.score}


@dataclasses.dataclass
class SpectralClusters:
    """Result of :func:`spectral_clusters`: ``cluster_id [N]`` (0..K-1, numbered by smallest
    member), the splits made (in order) and the candidates rejected (the final leaves')."""

    cluster_id: np.ndarray
    splits: list[dict[str, float]]
    rejected: list[dict[str, float]]

    @property
    def num_clusters(self) -> int:
        return int(self.cluster_id.max()) + 1 if len(self.cluster_id) else 0


def _renumber(cid: np.ndarray) -> np.ndarray:
    first = {}
    for c in cid:
        first.setdefault(int(c), len(first))
    return np.asarray([first[int(c)] for c in cid], np.int32)


def _nu(a: sp.csr_matrix) -> float:
    return algebraic_connectivity(a) if a.shape[0] >= 2 else 0.0


def spectral_clusters(graph: Graph | np.ndarray | sp.spmatrix,
                      descriptors: np.ndarray | None = None, *,
                      num_clusters: int | None = None, max_clusters: int | None = None,
                      min_size: int = 4, threshold: float = 0.5, gap_weight: float = 1.0,
                      heterogeneity_weight: float = 1.0, lookahead: int = 2,
                      fiedler: Callable[[sp.csr_matrix, np.ndarray], np.ndarray] | None = None
                      ) -> SpectralClusters:
    """Clusters of a connected communication graph by recursive spectral bisection.

    Criterion mode (``num_clusters`` None): a cluster is split when its cut pays (score >=
    ``threshold``) or when a cut of its sides within ``lookahead`` levels below does (a
    bottleneck can sit one level down, as in a chain of communities), best score first, up to
    ``max_clusters``. Fixed mode (``num_clusters = K``): the cluster with the best-scoring cut
    is split until there are ``K``, whatever the scores.

    Args:
      graph: a :class:`Graph` or a symmetric adjacency ``[N, N]`` (weights are ignored).
      descriptors: ``[N, D]`` heterogeneity descriptors (:func:`client_descriptors`) or None.
      num_clusters: split until exactly this many clusters (ablation); ``None``: the criterion.
      max_clusters: cap on the number of clusters in criterion mode.
      min_size: smallest cluster a split may leave.
      threshold, gap_weight, heterogeneity_weight: the split rule (module docstring).
      lookahead: levels below a cut searched for one that pays (0: the cut itself only).
      fiedler: ``fiedler(weighted_adjacency, nodes) -> v [len(nodes)]``, the vector that orders
        a cluster's nodes (default: :func:`fiedler_vector`'s, on the host; SSD-FL's gossip
        option passes :func:`fedrnd.graphs.fiedler.gossip_fiedler`'s).

    Returns a :class:`SpectralClusters`. ``ValueError`` for a disconnected graph, bad options,
    or a ``num_clusters`` that connected clusters of ``min_size`` cannot reach.
    """
    a0 = _as_adjacency(graph)
    a0.data[:] = 1.0
    n = a0.shape[0]
    if not (isinstance(min_size, int | np.integer) and min_size >= 1):
        raise ValueError(f"min_size must be an integer >= 1, got {min_size!r}")
    if num_clusters is not None and not (isinstance(num_clusters, int | np.integer)
                                         and 1 <= num_clusters <= n):
        raise ValueError(f"num_clusters must be an integer in [1, N = {n}], got "
                         f"{num_clusters!r}")
    if max_clusters is not None and not (isinstance(max_clusters, int | np.integer)
                                         and max_clusters >= 1):
        raise ValueError(f"max_clusters must be an integer >= 1, got {max_clusters!r}")
    if not (isinstance(lookahead, int | np.integer) and lookahead >= 0):
        raise ValueError(f"lookahead must be an integer >= 0, got {lookahead!r}")
    if descriptors is not None:
        descriptors = np.asarray(descriptors, np.float64).reshape(n, -1)
        if not np.all(np.isfinite(descriptors)):
            raise ValueError("descriptors must be finite")
    if n >= 2:
        _check_connected(a0, "the communication graph")
    aw = edge_weights(a0, descriptors)

    def candidate(nodes: np.ndarray, nu: float) -> Split | None:
        m = len(nodes)
        if m < 2 * min_size:
            return None
        sub0 = a0[nodes][:, nodes]
        subw = aw[nodes][:, nodes]
        v = fiedler(subw, nodes) if fiedler is not None else fiedler_vector(subw)[1]
        order = np.argsort(v, kind="stable")
        k, _ = sweep_cut(subw, order, min_size=min_size, connectivity=sub0)
        if k == 0:
            return None
        side = np.zeros(m, bool)
        side[order[:k]] = True
        nu_a, nu_b = _nu(sub0[side][:, side]), _nu(sub0[~side][:, ~side])
        phi = conductance(sub0, side)
        # Cheeger: S mixes no faster than 2 phi; the sides mix at their own nu.
        gamma = min(nu_a, nu_b) / max(2 * phi, 1e-300)
        rho = 0.0
        if descriptors is not None and descriptors.shape[1]:
            h = heterogeneity(descriptors[nodes])
            if h > 1e-12:
                within = (side.sum() * heterogeneity(descriptors[nodes[side]])
                          + (~side).sum() * heterogeneity(descriptors[nodes[~side]]))
                raw = 1.0 - within / (m * h)
                chance = 1.0 / (m - 1)
                rho = float(max(0.0, (raw - chance) / (1.0 - chance)))
        gap = max(0.0, 1.0 - 1.0 / gamma) if gamma > 0 else 0.0
        score = gap_weight * gap + heterogeneity_weight * rho
        return Split(nodes, side, nu, nu_a, nu_b, phi, float(gamma), rho, float(score))

    root = (np.arange(n), _nu(a0) if n >= 2 else 0.0)
    if num_clusters is not None:
        leaves, splits, rejected = _split_greedy(root, candidate, num_clusters)
        if len(leaves) < num_clusters:
            raise ValueError(f"spectral bisection reached only {len(leaves)} clusters of the "
                             f"{num_clusters} asked: no remaining cluster has a cut into two "
                             f"connected sides of at least min_size = {min_size} nodes; lower "
                             "num_clusters or min_size")
    else:
        leaves, splits, rejected = _split_lookahead(root, candidate, threshold,
                                                    max_clusters or n, lookahead)
    cid = np.zeros(n, np.int64)
    for i, nodes in enumerate(leaves):
        cid[nodes] = i
    return SpectralClusters(_renumber(cid), splits, rejected)


def _split_greedy(root, candidate, k):
    """Split the cluster with the best-scoring cut until there are ``k``."""
    leaves = [root[0]]
    heap: list = []
    s = candidate(*root)
    if s is not None:
        heap.append((-s.score, 0, s))
    splits, tick = [], 1
    while heap and len(leaves) < k:
        _, _, s = heapq.heappop(heap)
        splits.append(s.record())
        leaves = [x for x in leaves if x is not s.nodes]
        for nodes, nu in ((s.nodes[s.side], s.nu_a), (s.nodes[~s.side], s.nu_b)):
            leaves.append(nodes)
            c = candidate(nodes, nu)
            if c is not None:
                heapq.heappush(heap, (-c.score, tick, c))
                tick += 1
    rejected = [s.record() for _, _, s in sorted(heap, key=lambda t: t[:2])]
    return leaves, splits, rejected


class _Node:
    """A cluster of the bisection tree; its cut and its sides are computed on first use."""

    def __init__(self, nodes: np.ndarray, nu: float, candidate):
        self.nodes, self.nu, self._candidate = nodes, nu, candidate
        self._split: Split | None | bool = False
        self._children: tuple[_Node, _Node] | None = None

    @property
    def split(self) -> Split | None:
        if self._split is False:
            self._split = self._candidate(self.nodes, self.nu)
        return self._split  # type: ignore[return-value]

    @property
    def children(self) -> tuple[_Node, _Node]:
        if self._children is None:
            s = self.split
            self._children = (_Node(s.nodes[s.side], s.nu_a, self._candidate),
                              _Node(s.nodes[~s.side], s.nu_b, self._candidate))
        return self._children

    def pays(self, threshold: float, depth: int) -> bool:
        s = self.split
        if s is None:
            return False
        if s.score >= threshold:
            return True
        return depth > 0 and any(c.pays(threshold, depth - 1) for c in self.children)


def _split_lookahead(root, candidate, threshold, cap, lookahead):
    """Split every cluster whose cut pays, or one of whose descendants within ``lookahead``
    levels pays, best score first, up to ``cap`` clusters."""
    leaves, splits, rejected = [], [], []
    heap: list = [(0.0, 0, _Node(*root, candidate))]
    tick = 1
    while heap:
        _, _, node = heapq.heappop(heap)
        s = node.split
        if s is not None and len(leaves) + len(heap) + 2 <= cap and node.pays(threshold,
                                                                               lookahead):
            splits.append(s.record())
            for c in node.children:
                score = c.split.score if c.split is not None else -1.0
                heapq.heappush(heap, (-score, tick, c))
                tick += 1
        else:
            leaves.append(node.nodes)
            if s is not None:
                rejected.append(s.record())
    return leaves, splits, rejected


def random_clusters(num_nodes: int, num_clusters: int, seed: int = 0) -> np.ndarray:
    """``[N]`` ids: the nodes dealt into ``num_clusters`` random clusters of (near) equal size,
    ignoring the graph (the random-cluster baseline)."""
    if not (isinstance(num_clusters, int | np.integer) and 1 <= num_clusters <= num_nodes):
        raise ValueError(f"num_clusters must be an integer in [1, N = {num_nodes}], got "
                         f"{num_clusters!r}")
    cid = np.arange(num_nodes) % num_clusters
    np.random.default_rng(seed).shuffle(cid)
    return _renumber(cid)
