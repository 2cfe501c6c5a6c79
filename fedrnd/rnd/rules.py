"""The paper's compatibility rule (Eq. 9): sigma, normalised scores, eps, and eps selection."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from fedrnd.rnd.config import RULES, SIGMAS, check_eps

PyTree = Any

# --------------------------------------------------------------------------------------------
# compatibility and federations (host side: small matrices, graph algorithms)
# --------------------------------------------------------------------------------------------


def sigma_of(kind: str, scores: np.ndarray, self_std: np.ndarray) -> np.ndarray:
    """``sigma_i`` per client ``[C]`` for a dense novelty matrix ``scores [C, C]``.

    ``"row"``: the standard deviation of row ``i`` of ``S`` (the paper's reading; in sparse
    mode the row is what client ``i`` observed: its neighbours' scores and its own).
    ``"self"``: ``self_std``, the spread of client ``i``'s per-example self-novelty.
    """
    if kind == "self":
        return np.asarray(self_std, np.float64)
    if kind != "row":
        raise ValueError(f"sigma must be one of {list(SIGMAS)}, got {kind!r}")
    s = np.asarray(scores)
    # Blocks of rows: a float64 std of a whole 10,000-client matrix needs gigabytes of
    # temporaries; per block it needs a few megabytes.
    return np.concatenate([s[i:i + _ROWS].std(axis=1, dtype=np.float64)
                           for i in range(0, max(len(s), 1), _ROWS)])[: len(s)]


_ROWS = 512


def _sparse_row_std(edge_scores, rows, c, diag=None):
    # Moments of each observed row (edges plus, when given, the diagonal).
    n = np.bincount(rows, minlength=c).astype(np.float64)
    s1 = np.bincount(rows, edge_scores, minlength=c)
    s2 = np.bincount(rows, edge_scores ** 2, minlength=c)
    if diag is not None:
        n, s1, s2 = n + 1, s1 + diag, s2 + diag ** 2
    mean = s1 / np.maximum(n, 1)
    return np.sqrt(np.maximum(s2 / np.maximum(n, 1) - mean ** 2, 0.0))


def novelty_view(scores: np.ndarray, sigma: np.ndarray, eps: float
                 ) -> tuple[np.ndarray, str, str]:
    """``(view [C, C], formula, label)``: the novelty matrix as the decision reads it, for a
    heat map. Raw rows differ in scale (some data are more novel to everyone) and the rules
    compare within a row: with a finite ``eps`` (the paper's rule) ``(s_ij - s_ii) / sigma_i``
    clipped at ``3 eps + 1``; otherwise (the paired test, which compares each peer with the
    client's own predictor on held-out probes) the relative excess ``(s_ij - s_ii) / s_ii``
    in ``[-1, 3]``."""
    s = np.asarray(scores)
    d = np.diag(s)
    if np.isfinite(eps):
        return (np.minimum(normalised_scores(s, d, np.asarray(sigma)), 3 * eps + 1),
                "(s_ij - s_ii) / sigma_i", "normalised novelty")
    return (np.clip((s - d[:, None]) / np.where(d > 0, d, 1.0)[:, None], -1, 3),
            "(s_ij - s_ii) / s_ii", "relative excess")


def normalised_scores(scores: np.ndarray, s_self: np.ndarray, sigma: np.ndarray,
                      rows: np.ndarray | None = None) -> np.ndarray:
    """``z = (s_ij - s_ii) / sigma_i``: compatible iff ``z <= eps``. Dense ``[C, C]`` or
    ``[E]`` edge scores with ``rows`` (the scoring client ``i`` of each edge).

    A zero ``sigma_i`` (identical scores) gives ``z = 0`` when ``s_ij == s_ii`` and ``+inf``
    when larger, which is the rule's limit."""
    # Dense matrices stay float32 and are built in place: a 10,000-client S is 400 MB, and
    # float64 or temporary copies would multiply that.
    dt = np.result_type(np.asarray(scores).dtype, np.float32)
    s = np.asarray(scores, dt)
    s_self = np.asarray(s_self, dt)
    sig = np.asarray(sigma, dt)
    if rows is None:
        z, sg = s - s_self[:, None], sig[:, None]
    else:
        z, sg = s - s_self[rows], sig[rows]
    np.divide(z, sg, out=z, where=np.broadcast_to(sg > 0, z.shape))
    # Zero spread (rows or edges): the rule's limit, equal scores 0 and larger ones +inf.
    bad = np.flatnonzero(sig <= 0) if rows is None else np.flatnonzero(sg <= 0)
    if bad.size:
        z[bad] = np.where(z[bad] <= 0, 0.0, np.inf)
    return z


def compatibility(z: np.ndarray, eps: float) -> np.ndarray:
    """``z <= eps`` (bool, same shape); ``eps`` must be finite and ``>= 0``."""
    check_eps(eps)
    if isinstance(eps, str):
        raise ValueError("resolve eps='auto' with auto_eps before calling compatibility")
    return np.asarray(z) <= float(eps)


AUTO_MIN_RATIO = 1.5
"""Default ``min_ratio`` of :func:`gap_eps` (see there for the measurements behind it)."""


def gap_eps(z: np.ndarray, *, min_count: int | None = None,
            min_ratio: float = AUTO_MIN_RATIO) -> float:
    """Tolerance from the *largest relative gap* in the sorted normalised scores (the automatic
    eps of the sparse mode, where no full matrix exists; dense matrices use :func:`auto_eps`).

    Criterion. Let ``z_(1) <= ... <= z_(n)`` be the finite off-diagonal normalised scores
    ``(s_ij - s_ii) / sigma_i``. For every split after the ``k``-th smallest score with
    ``k >= min_count`` (default ``ceil(sqrt(n))``, about one pair per client for a dense
    matrix) and ``z_(k+1) > 0``, compare the gap ``g_k = z_(k+1) - z_(k)`` with the upper
    half-width of the scores below it, ``w_k = z_(k) - z_(ceil(k/2))``. The tolerance is the
    midpoint of the gap maximising ``g_k / w_k`` when that ratio is at least ``min_ratio``:
    the scores then fall into a low mode (peers with the same distribution) and the rest,
    separated by an empty band wider than the low mode's own spread. When no split qualifies
    the population shows no separated structure and ``eps`` is placed above every score (one
    federation; nothing is incompatible).

    Why relative, why ``min_count``, why ``z_(k+1) > 0``: a plain largest gap also exists in a
    single IID population (the sparse tails of a unimodal spread) and would fragment it; a gap
    counts only if it dominates the spread below it, the low mode must hold enough pairs to be
    a mode rather than a tail, and a cut below zero would make clients incompatible with peers
    that look *more* familiar than their own data.

    Threshold: with ``sigma="row"`` and training-set probes, the best ratio of IID populations
    (digits and Gaussian, 8 to 60 clients, 8 seeds each) never exceeded 0.91 and fell with the
    number of clients (0.2 at 40), while separable grouped populations (Gaussian mixtures with
    2-4 groups of unequal sizes, feature patterns on digits) gave 2.4 to 27; 1.5 sits between.
    """
    z = np.sort(np.asarray(z), axis=None)  # one copy; +inf and NaN sort to the end
    z = z[: int(np.searchsorted(z, np.inf, side="left"))]
    n = z.size
    if n == 0:
        return 0.0
    top = max(float(z[-1]) + 1.0, 0.0)
    if n < 2:
        return top
    m = max(1, min(int(np.ceil(np.sqrt(n))) if min_count is None else int(min_count), n - 1))
    best_ratio, best_k = -1.0, -1
    # Candidate splits in blocks, so a 10,000-client matrix (1e8 scores) needs no 1e8-long
    # temporaries. Split k is between z[k] and z[k + 1] (0-based).
    for lo in range(m - 1, n - 1, _SPLITS):
        ks = np.arange(lo, min(lo + _SPLITS, n - 1))
        gaps = z[ks + 1] - z[ks]
        width = z[ks] - z[ks // 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(width > 0, gaps / width, np.where(gaps > 0, np.inf, 0.0))
        ratio = np.where(z[ks + 1] > 0, ratio, 0.0)
        b = int(np.argmax(ratio))
        if ratio[b] > best_ratio:
            best_ratio, best_k = float(ratio[b]), int(ks[b])
    if not best_ratio >= min_ratio:
        return top
    return float(max(0.5 * (z[best_k] + z[best_k + 1]), 0.0))


_SPLITS = 1 << 22


AUTO_MIN_SILHOUETTE = 0.5
"""Default ``min_silhouette`` of :func:`auto_eps` (see there for the measurements behind it)."""

AUTO_SAMPLE = 2000
"""Clients whose silhouette :func:`auto_eps` averages (all of them up to this many)."""


def _dissimilarity_rows(z: np.ndarray, rows: np.ndarray, rule: str, big: float) -> np.ndarray:
    """``d[rows]`` of the symmetric dissimilarity the rule acts on, ``[len(rows), C]``: ``max``
    of ``z_ij, z_ji`` (mutual, leader) or ``min`` (one-sided), clipped at 0, +inf -> ``big``."""
    a, b = z[rows], z[:, rows].T
    d = np.maximum(a, b) if rule != "one_sided" else np.minimum(a, b)
    d = np.nan_to_num(d, nan=big, posinf=big, neginf=0.0)
    return np.maximum(d, 0.0, out=d)


def _spanning_tree(z: np.ndarray, rule: str, big: float) -> tuple[np.ndarray, np.ndarray,
                                                                 np.ndarray]:
    """Minimum spanning tree of the dissimilarity (Prim, ``O(C^2)``, one row at a time):
    ``(u, v, height)`` of its ``C - 1`` edges. Components of the tree's edges ``<= eps`` are the
    rule's federations at ``eps`` (single linkage), for the mutual and one-sided rules."""
    c = z.shape[0]
    in_tree = np.zeros(c, bool)
    best = np.full(c, np.inf)
    parent = np.zeros(c, np.int64)
    u, v, h = (np.empty(c - 1, np.int64), np.empty(c - 1, np.int64), np.empty(c - 1))
    cur = 0
    for e in range(c - 1):
        in_tree[cur] = True
        row = _dissimilarity_rows(z, np.array([cur]), rule, big)[0]
        closer = ~in_tree & (row < best)
        best[closer] = row[closer]
        parent[closer] = cur
        cur = int(np.argmin(np.where(in_tree, np.inf, best)))
        u[e], v[e], h[e] = parent[cur], cur, best[cur]
    return u, v, h


def _find(parent: np.ndarray, i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def auto_eps(z: np.ndarray, *, rule: str = "mutual",
             min_silhouette: float = AUTO_MIN_SILHOUETTE, max_levels: int | None = None,
             sample: int = AUTO_SAMPLE, return_score: bool = False):
    """Tolerance from the data: the ``eps`` whose federations have the best *silhouette*.

    Criterion. Federations under the mutual rule are the single-linkage clusters of the
    dissimilarity ``d_ij = max(z_ij, z_ji)`` (``min`` for the one-sided rule; the leader rule
    uses the mutual one) cut at ``eps``, so the candidate tolerances are the gaps between the
    heights of its minimum spanning tree: cutting the ``k - 1`` highest tree edges gives ``k``
    federations, with ``eps`` midway between the two heights around the cut. Each candidate
    ``k = 2 .. max_levels`` (default ``min(C - 1, max(16, 2 ceil(sqrt(C))))``) is scored by
    the mean silhouette ``(b_i - a_i) / max(a_i, b_i)`` of its federations under ``d``
    (``a_i``: client ``i``'s mean dissimilarity to its own federation, ``b_i``: to the nearest
    other federation of at least two clients; 0 for a client alone or when no such other
    federation exists), averaged over all clients or, above ``sample`` of them, over a fixed
    random sample of rows (against every client). Leaving single clients out of ``b_i`` is our
    change to the textbook silhouette: otherwise splitting off one outlier from an IID
    population scores high (everyone is far from the outlier; 0.36 on 1,000 IID clients). The best candidate wins when
    its silhouette reaches ``min_silhouette``; otherwise the population shows no separated
    structure and ``eps`` is placed above every score (one federation).

    Threshold, measured on 94 novelty matrices (row sigma, training probes; generated and
    tabulated by ``experiments/rnd/auto_eps.py`` into ``experiments/rnd/AUTO_EPS.md``):
    populations with one input distribution (Gaussian and digits IID with 8-60 clients,
    Fashion-MNIST IID with 200 and 1,000 clients, the label-permutation control) scored at most
    0.31; grouped populations whose groups the best cut recovers scored 0.52 to 0.98. 0.5 sits
    between. All 28 one-distribution matrices stayed whole, and 58 of 66 grouped ones were
    recovered exactly (mean ARI 0.95), against 33 (mean ARI 0.51) for the
    largest-gap rule :func:`gap_eps`. Cost: the tree is ``O(C^2)``, the silhouettes one
    ``[sample, C] x [C, max_levels]`` product; about a second at 1,000 clients.

    Args:
      z: ``[C, C]`` normalised scores (diagonal ignored; ``+inf`` allowed).
      rule: the federation rule the tolerance is for.
      return_score: also return the winning silhouette (``nan`` when no candidate exists).
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {list(RULES)}, got {rule!r}")
    z = np.asarray(z)
    c = z.shape[0]
    if z.ndim != 2 or z.shape != (c, c):
        raise ValueError(f"auto_eps needs a square [C, C] matrix, got {z.shape}; "
                         "sparse mode uses gap_eps")
    finite = np.isfinite(z)
    hi = float(np.max(z, where=finite, initial=-np.inf))
    lo = float(np.min(z, where=finite, initial=np.inf))
    top = max(hi + 1.0, 0.0) if np.isfinite(hi) else 0.0
    del finite
    levels = min(c - 1, max(16, 2 * int(np.ceil(np.sqrt(c))))) if max_levels is None else \
        min(int(max_levels), c - 1)
    if c < 3 or levels < 2 or not np.isfinite(hi):
        return (top, float("nan")) if return_score else top
    big = 2.0 * max(abs(hi), abs(lo), 1.0)
    u, v, h = _spanning_tree(z, rule, big)
    order = np.argsort(-h, kind="stable")  # highest first
    u, v, h = u[order], v[order], h[order]
    # Fine partition: all but the levels - 1 highest tree edges.
    keep = slice(levels - 1, None)
    graph = coo_matrix((np.ones(c - levels), (u[keep], v[keep])), shape=(c, c))
    fine = connected_components(graph, directed=False)[1]
    rng = np.random.default_rng(0)
    rows = np.arange(c) if c <= sample else np.sort(rng.choice(c, sample, replace=False))
    d = _dissimilarity_rows(z, rows, rule, big)
    d[np.arange(len(rows)), rows] = 0.0
    onehot = np.zeros((c, levels), d.dtype)
    onehot[np.arange(c), fine] = 1.0
    sums = d @ onehot  # [rows, fine clusters]
    sizes = onehot.sum(0)
    # Merge fine clusters back edge by edge (lowest of the cut edges first): level k.
    uf = np.arange(levels)
    best_score, best_eps = -np.inf, top
    for k in range(levels, 1, -1):
        if k < levels:
            a, b = _find(uf, int(fine[u[k - 1]])), _find(uf, int(fine[v[k - 1]]))
            uf[a] = b
        if h[k - 1] >= h[k - 2]:
            continue  # a tie: no eps separates these two tree edges
        root = np.array([_find(uf, i) for i in range(levels)])
        ids, lab = np.unique(root, return_inverse=True)
        m = np.zeros((levels, len(ids)), d.dtype)
        m[np.arange(levels), lab] = 1.0
        ssum, n = sums @ m, sizes @ m
        own = lab[fine[rows]]
        r = np.arange(len(rows))
        n_own = n[own]
        a_i = np.where(n_own > 1, ssum[r, own] / np.maximum(n_own - 1, 1), 0.0)
        mean = ssum / n
        mean[:, n < 2] = np.inf  # a client alone is no federation to be near to
        mean[r, own] = np.inf
        b_i = mean.min(1)
        den = np.maximum(a_i, b_i)
        ok = (n_own > 1) & np.isfinite(b_i) & (den > 0)
        s_i = np.where(ok, (b_i - a_i) / np.where(ok, den, 1.0), 0.0)
        score = float(s_i.mean())
        if score > best_score:
            best_score, best_eps = score, float(0.5 * (h[k - 1] + h[k - 2]))
    eps = best_eps if best_score >= min_silhouette else top
    if return_score:
        return eps, (best_score if np.isfinite(best_score) else float("nan"))
    return eps

