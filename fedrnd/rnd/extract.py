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


def _unique_pairs(c, i, j, v):
    """Unordered pairs ``(a < b)`` with duplicates averaged and the tie-breaking jitter added."""
    i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
    v = np.asarray(v, np.float64)
    if not (i.shape == j.shape == v.shape) or i.ndim != 1:
        raise ValueError(f"i, j and the values must be equal-length vectors, got {i.shape}, "
                         f"{j.shape}, {v.shape}")
    if i.size and (min(i.min(), j.min()) < 0 or max(i.max(), j.max()) >= c):
        raise ValueError(f"pair endpoints must be client ids in [0, {c})")
    if not np.all(np.isfinite(v)):
        raise ValueError("pair values must be finite")
    keep = i != j
    a, b = np.minimum(i[keep], j[keep]), np.maximum(i[keep], j[keep])
    uniq, inv = np.unique(a * c + b, return_inverse=True)
    mean = (np.bincount(inv, v[keep]) / np.bincount(inv)) if uniq.size else np.zeros(0)
    ua, ub = uniq // c, uniq % c
    return ua, ub, mean + _JITTER * _pair_jitter(ua, ub)


def _sparse_upgma(c: int, ua, ub, val, lim: float, min_support: float):
    """Average linkage over observed pairs (greedy, lowest mean first) while the mean is at
    most ``lim`` and the support rule holds. Returns ``(root [C], merges)``: each client's
    group and the merges in order as ``(node, node)`` with scipy's numbering (clients
    ``0..C-1``, the ``k``-th merge creates node ``C + k``)."""
    import heapq

    # Neighbour tables: nbr[g][h] = [sum of values, observed pairs] between groups g and h,
    # one list object shared by both directions.
    nbr: list[dict[int, list[float]]] = [dict() for _ in range(c)]
    for x, y, v in zip(ua.tolist(), ub.tolist(), val.tolist(), strict=True):
        nbr[x][y] = nbr[y][x] = [v, 1.0]
    size = [1] * c
    alive = [True] * c
    version = [0] * c
    node = list(range(c))
    merges: list[tuple[int, int]] = []
    heap = [(v, x, y, 0, 0) for x, y, v in zip(ua.tolist(), ub.tolist(), val.tolist(),
                                                strict=True) if v <= lim]
    heapq.heapify(heap)
    parent = list(range(c))
    while heap:
        v, x, y, vx, vy = heapq.heappop(heap)
        if not (alive[x] and alive[y]) or version[x] != vx or version[y] != vy:
            continue
        tot, n = nbr[x][y]
        if n < min_support * min(size[x], size[y]):
            continue  # re-pushed when either group changes
        merges.append((node[x], node[y]) if node[x] < node[y] else (node[y], node[x]))
        # Merge the smaller table into the larger; the survivor keeps its id.
        if len(nbr[x]) < len(nbr[y]):
            x, y = y, x
        alive[y] = False
        parent[y] = x
        node[x] = c + len(merges) - 1
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
    return root, merges


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
    c = int(num_clients)
    ua, ub, val = _unique_pairs(c, i, j, evidence)
    root, _ = _sparse_upgma(c, ua, ub, val, float(cut) + _JITTER, min_support)
    return _relabel(root)


# --------------------------------------------------------------------------------------------
# the default: a dendrogram of the test statistic, split top-down by a group test
# --------------------------------------------------------------------------------------------


def _leaf_order(c: int, merges: np.ndarray):
    """Leaves of every node as a contiguous slice of one order: ``(order, start, size)``."""
    n_nodes = c + len(merges)
    size = np.ones(n_nodes, np.int64)
    for k, (a, b) in enumerate(merges):
        size[c + k] = size[a] + size[b]
    start = np.zeros(n_nodes, np.int64)
    order = np.empty(c, np.int64)
    has_parent = np.zeros(n_nodes, bool)
    has_parent[np.asarray(merges, np.int64).reshape(-1)] = True
    roots = [n for n in range(n_nodes) if not has_parent[n]]
    pos = 0
    for r in roots:
        start[r] = pos
        stack = [r]
        while stack:
            n = stack.pop()
            if n < c:
                order[start[n]] = n
                continue
            a, b = merges[n - c]
            start[a] = start[n]
            start[b] = start[n] + size[a]
            stack.extend((a, b))
        pos += size[r]
    return order, start, size, roots


def _group_pvalue(side, pa, pb, stat, se2, df_pair, min_effect):
    """One-sided p-value that the clients of side 0 and side 1 come from different
    distributions (see :func:`linkage_test_federations`). ``side [C]``: 0, 1 or -1."""
    from scipy.stats import t as student_t

    sa, sb = side[pa], side[pb]
    inside = (sa >= 0) & (sb >= 0)
    pa, pb, r, e2, dfp = pa[inside], pb[inside], stat[inside], se2[inside], df_pair[inside]
    sa, sb = sa[inside], sb[inside]
    cross = sa != sb
    c = side.shape[0]
    ends = np.concatenate([pa, pb])
    cross2 = np.concatenate([cross, cross])
    r2 = np.concatenate([r, r])
    n_cross = np.bincount(ends[cross2], minlength=c)
    s_cross = np.bincount(ends[cross2], r2[cross2], minlength=c)
    members = np.flatnonzero((side >= 0) & (n_cross > 0))
    if members.size == 0 or not cross.any():
        return 1.0
    u = s_cross[members] / n_cross[members]
    n = members.size
    # Two sources of noise: clients differ (the spread of u) and each pair's statistic is
    # measured on finitely many probes; use the larger, so two single clients reduce to the
    # pair's own test.
    emp = u.var(ddof=1) / n if n > 2 else 0.0
    n_a = np.count_nonzero(side[members] == 0)
    n_b = n - n_a
    # Pairs measured on fewer than 2 probes have an infinite error: no evidence either way,
    # left out of the measurement term rather than blocking every split they touch.
    known = cross & np.isfinite(e2)
    if not known.any():
        return 1.0
    meas = float(np.mean(e2[known])) / max(1, min(n_a, n_b))
    var = max(emp, meas)
    df = (n - 1) if emp >= meas else float(np.median(dfp[known]))
    excess = float(u.mean()) - float(min_effect)
    if var <= 0:
        return 0.0 if excess > 0 else 1.0
    return float(student_t.sf(excess / np.sqrt(var), max(df, 1)))


REFINE_ITERS = 10
"""Reassignment passes per split (:func:`_refine`)."""


def _refine(members, side, pa, pb, stat, iters: int = REFINE_ITERS):
    """Move each member to the side of lower mean ``R`` (observed pairs, itself excluded) until
    nothing moves: the tree's split, locally improved (a two-means step on ``R``). A client
    the tree placed through one false link goes back to the side its other pairs point to.
    ``side [C]`` holds 0 / 1 for ``members`` and -1 elsewhere; returns the refined copy."""
    side = side.copy()
    c = side.shape[0]
    inside = (side[pa] >= 0) & (side[pb] >= 0)
    a, b, r = pa[inside], pb[inside], stat[inside]
    ends = np.concatenate([a, b])
    other = np.concatenate([b, a])
    r2 = np.concatenate([r, r])
    for _ in range(iters):
        to1 = side[other] == 1
        n1 = np.bincount(ends[to1], minlength=c)
        s1 = np.bincount(ends[to1], r2[to1], minlength=c)
        n0 = np.bincount(ends[~to1], minlength=c)
        s0 = np.bincount(ends[~to1], r2[~to1], minlength=c)
        m0 = np.where(n0[members] > 0, s0[members] / np.maximum(n0[members], 1), np.inf)
        m1 = np.where(n1[members] > 0, s1[members] / np.maximum(n1[members], 1), np.inf)
        cur = side[members]
        want = np.where(m1 < m0, 1, np.where(m0 < m1, 0, cur))
        if np.array_equal(want, cur):
            break
        new = side.copy()
        new[members] = want
        if not ((want == 0).any() and (want == 1).any()):
            break  # a side would empty: keep the last split
        side = new
    return side


WITHIN_RATIO = 0.3
"""Default of :func:`linkage_test_federations`'s ``within_ratio`` (:func:`_homogeneous`)."""

_Z95 = 1.6448536269514722  # one-sided 95% normal quantile

PEEL = 0.1
""":func:`_split_tree`: a split the test does not accept, whose smaller side holds at most this
share of the members, is peeled: the larger side is tested on (an outlier, or a forged
client, at the top of a subtree must not hide the structure below it)."""

MAX_PEELS = 32
"""Longest chain of peels :func:`_split_tree` follows (each costs one test over the remaining
members' pairs); past it the descent ends as without peeling."""


def _homogeneous(members, lab, pa, pb, stat, se2, within_ratio, inside) -> bool:
    """Does the partition ``lab`` of ``members`` consist of homogeneous federations?

    ``W``: the mean statistic over pairs of ``members`` in the same federation, lowered by
    1.645 of its measurement standard error (small federations measure ``W`` noisily);
    ``B``: the mean over pairs in different federations. Discrete groups have ``E[W] = 0``
    (clients of one distribution), so ``W`` is a small fraction of ``B``; a continuum (every
    client its own mix, e.g. a Dirichlet label skew over the whole population) cut into
    pieces leaves ``W`` a large fraction of ``B``: the pieces are as mixed inside as between.
    Homogeneous iff ``W <= within_ratio * B``. ``inside`` is a ``[C]`` scratch buffer.
    """
    inside[:] = False
    inside[members] = True
    m = inside[pa] & inside[pb]
    r = stat[m]
    same = lab[pa[m]] == lab[pb[m]]
    if not (~same).any():
        return True
    b = float(r[~same].mean())
    if b <= 0:
        return False
    if not same.any():
        return True
    e2 = se2[m][same]
    e2 = e2[np.isfinite(e2)]
    w = float(r[same].mean())
    if e2.size:
        w -= _Z95 * float(np.sqrt(e2.mean() / same.sum()))
    return w <= within_ratio * b


def _split_tree(c, merges, pa, pb, stat, se2, dfp, alpha, min_effect, refine=True,
                within_ratio=np.inf):
    merges = np.asarray(merges, np.int64).reshape(-1, 2)
    order, start, size, roots = _leaf_order(c, merges)
    pos = np.empty(c, np.int64)
    pos[order] = np.arange(c)
    lab = np.empty(c, np.int64)
    side = np.full(c, -1, np.int64)
    # Work items: (tree node, members). The tree proposes a split of the members: the first
    # node below whose two children both hold members (the tree restricted to the members).
    # The third field counts the peels above an item: its test runs at alpha / 4^peels, so a
    # chain of peeled tests spends at most 4/3 of alpha (the root test alone keeps alpha).
    stack = [(r, order[start[r]:start[r] + size[r]], 0) for r in roots]
    split_nodes: list[np.ndarray] = []  # members of every accepted split, parents first
    while stack:
        n, members, peels = stack.pop()
        split = None
        while n >= c and members.size > 1:
            a, b = merges[n - c]
            p_m = pos[members]
            in_a = (p_m >= start[a]) & (p_m < start[a] + size[a])
            if in_a.all():
                n = a
            elif not in_a.any():
                n = b
            else:
                split = in_a
                break
        if split is not None:
            side[members] = np.where(split, 0, 1)
            if refine:
                side = _refine(members, side, pa, pb, stat)
            p = _group_pvalue(side, pa, pb, stat, se2, dfp, min_effect)
            sides = side[members]
            side[members] = -1
            if p <= alpha * 0.25 ** peels:
                split_nodes.append(members)
                stack.append((n, members[sides == 0], 0))
                stack.append((n, members[sides == 1], 0))
                continue
            small = int(min(np.sum(sides == 0), np.sum(sides == 1)))
            if small <= PEEL * members.size and peels < MAX_PEELS:
                # A few clients split off the rest and the test cannot place them apart (too
                # few pairs to reject): that says nothing about the structure of the rest,
                # which is tested on. The few stay a federation of their own here;
                # _merge_back re-joins them wherever the test cannot tell them apart.
                big = 0 if np.sum(sides == 0) >= np.sum(sides == 1) else 1
                few = members[sides != big]
                lab[few] = few.min()
                stack.append((n, members[sides == big], peels + 1))
                continue
        lab[members] = members.min()
    if np.isfinite(within_ratio):
        # Bottom-up (children were split after their parents): a split set whose federations
        # are not homogeneous is no discrete structure; it becomes one federation, and its
        # parent is judged with it whole.
        inside = np.zeros(c, bool)
        for members in reversed(split_nodes):
            if not _homogeneous(members, lab, pa, pb, stat, se2, within_ratio, inside):
                lab[members] = members.min()
    return _relabel(lab)


MERGE_NEIGHBOURS = 3
"""Nearest federations (by mean ``R``) each federation is tested against in :func:`_merge_back`."""


def _merge_back(lab, pa, pb, stat, se2, dfp, alpha, min_effect, k=MERGE_NEIGHBOURS):
    """Merge federations that the top-down splits separated although the test cannot tell
    them apart: repeatedly take the untested pair of federations with the lowest mean ``R``
    among each one's ``k`` nearest, and merge it when the same group test does not reject.
    Top-down splitting never re-joins clients; a small group whose members the tree attached
    to different neighbours would otherwise stay in pieces."""
    lab = _relabel(lab).astype(np.int64)
    c = lab.shape[0]
    tested: set[tuple[int, int]] = set()  # pairs of member-sets (by lowest member) rejected
    side = np.full(c, -1, np.int64)
    while True:
        f = int(lab.max()) + 1
        if f < 2:
            return lab
        la, lb = lab[pa], lab[pb]
        x = la != lb
        lo, hi = np.minimum(la[x], lb[x]), np.maximum(la[x], lb[x])
        key = lo * f + hi
        tot = np.bincount(key, stat[x], minlength=f * f)
        cnt = np.bincount(key, minlength=f * f)
        m = np.where(cnt > 0, tot / np.maximum(cnt, 1), np.inf).reshape(f, f)
        m = np.minimum(m, m.T)
        np.fill_diagonal(m, np.inf)
        first = np.full(f, c, np.int64)
        np.minimum.at(first, lab, np.arange(c))
        near = np.argsort(m, axis=1, kind="stable")[:, :k]
        cand = {(min(a, b), max(a, b)) for a in range(f) for b in near[a].tolist()
                if np.isfinite(m[a, b])}
        merged = False
        for a, b in sorted(cand, key=lambda ab: m[ab[0], ab[1]]):
            ident = (int(first[a]), int(first[b]))
            if ident in tested:
                continue
            side[lab == a], side[lab == b] = 0, 1
            p = _group_pvalue(side, pa, pb, stat, se2, dfp, min_effect)
            side[lab == a], side[lab == b] = -1, -1
            if p > alpha:
                lab = _relabel(np.where(lab == b, a, lab)).astype(np.int64)
                merged = True
                break
            tested.add(ident)
        if not merged:
            return lab


def linkage_test_federations(num_clients: int, i, j, stat, se, df, *,
                               alpha: float = 0.05, min_effect: float = 0.0,
                               min_support: float = 1.0, dense: bool | None = None,
                               within_ratio: float = WITHIN_RATIO) -> np.ndarray:
    """Federations from a pair statistic: an average-linkage tree, split where a test says so.

    Inputs, one entry per observed unordered pair ``(i, j)``: ``stat`` the symmetrised
    log novelty ratio ``R_ij`` (0 in expectation for two clients of one distribution, larger
    the more each one's predictor misses the other's data), its standard error ``se`` and
    degrees of freedom ``df`` (:func:`fedrnd.rnd.stats.pair_statistic`).

    1. Tree: average linkage (UPGMA) on ``R``: at every step the two groups with the lowest
       mean ``R`` between them merge. Dense input (every pair observed) uses scipy; a sparse
       graph uses the observed pairs only, with the support rule of
       :func:`sparse_linkage_federations`, and may leave a forest.
    2. Split top-down: the tree proposes a split of a set of clients into ``A`` and ``B`` (the
       first node below which both children hold members of the set); a two-means pass
       moves each client to the side of lower mean ``R`` (:func:`_refine`: a client the tree
       placed through one false link goes back). Each client ``k`` of ``A + B`` then gives
       ``u_k``, its mean ``R`` to the other side (observed pairs). One-sided test of
       ``mean u > min_effect``, Student's t over the clients, or over the pairs' own
       measurement error when that is larger (so two single clients reduce to their pair
       test). ``R`` is 0 in expectation between clients of one distribution, so under that
       null ``E[u] = 0``. Rejected at ``alpha``: ``A`` and ``B`` stay apart and each is split
       in turn; otherwise the set is one federation.
    3. Homogeneity (``within_ratio``, :func:`_homogeneous`), bottom-up over the accepted
       splits: a split set whose resulting federations are as mixed inside as between them
       (mean statistic within federations above ``within_ratio`` times the mean between them)
       has no discrete structure and becomes one federation. This keeps a continuum (every
       client its own label mix) whole: each pair differs, so the splits are significant,
       but no split yields homogeneous groups. ``inf`` turns the check off.
    4. Merge back (:func:`_merge_back`): federations that the same test cannot tell apart
       (tried against each one's three nearest by mean ``R``) are merged, since top-down
       splitting never re-joins clients that an early split separated.

    Why this shape: the tree is built from averages, so one false link (one low ``R``
    among many high ones) cannot merge two groups, and a client that fits nowhere joins the
    tree last and is split off by its own test without moving anyone else. The test pools
    every client of both children, so a shift too weak to reject any single pair is still
    found between two groups of many clients, while the client-level spread of ``u``
    (clients differ even within one distribution) keeps its false-split rate at ``alpha``
    per tested node, whatever the number of clients. A one-distribution population is kept
    whole unless its root test rejects: at most ``alpha`` of the time.
    """
    c = int(num_clients)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if c < 2:
        return np.zeros(c, np.int32)
    i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
    stat = np.asarray(stat, np.float64)
    se = np.asarray(se, np.float64)
    df = np.broadcast_to(np.asarray(df, np.float64), stat.shape)
    ua, ub, val = _unique_pairs(c, i, j, stat)
    if len(ua) != len(stat):
        raise ValueError("linkage_test_federations needs each unordered pair once")
    # Align se and df with the sorted unique pairs.
    key = np.minimum(i, j) * c + np.maximum(i, j)
    order = np.argsort(key)
    se2 = se[order] ** 2
    dfp = df[order]
    if dense is None:
        dense = len(ua) == c * (c - 1) // 2
    if dense:
        from scipy.cluster.hierarchy import linkage

        cond = np.empty(c * (c - 1) // 2)
        # Condensed order of scipy: (0,1), (0,2), ..., (1,2), ...; ua*c+ub sorted is the same.
        cond[:] = val - val.min()
        merges = linkage(cond, method="average")[:, :2].astype(np.int64)
    else:
        _, merges = _sparse_upgma(c, ua, ub, val, np.inf, min_support)
    if not (within_ratio > 0):
        raise ValueError(f"within_ratio must be > 0 (inf: no check), got {within_ratio}")
    lab = _split_tree(c, merges, ua, ub, val, se2, dfp, alpha, min_effect,
                      within_ratio=float(within_ratio))
    return _relabel(_merge_back(lab, ua, ub, val, se2, dfp, alpha, min_effect))
