"""The statistical compatibility test: paired differences, p-values, Benjamini-Hochberg.

Client ``i`` asks of each peer ``j``: is ``j``'s predictor *worse* on my data than my own,
by more than a negligible amount? On ``i``'s probes ``x`` (held out from ``i``'s own predictor,
so both predictors meet ``x`` for the first time) take the paired differences
``d(x) = e_j(x) - e_i(x)`` of the squared errors. If ``j``'s data come from ``i``'s
distribution, ``E[d] = 0`` by symmetry, whatever the population size; if not, ``j``'s
predictor has not learnt ``i``'s inputs and ``E[d] > 0``.

One-sided test per ordered pair (:func:`pair_pvalues`)::

    H0: E[d] <= delta * mean_x e_i(x)     against     H1: E[d] > delta * mean_x e_i(x)
    T = (mean d - delta * S_ii) / (sd(d) / sqrt(m)),    p = P(t_{m-1} > T)

``delta`` (``min_effect``) is the smallest relative excess that counts: with many probes a
test without it would split on shifts too small to matter for training. Student's ``t`` with
``m - 1`` degrees of freedom (``m`` probes); a pair with ``m < 2`` probes carries no evidence
(``p = 1``); a zero spread (identical predictors) gives ``p = 1`` at or below the margin and
``p = 0`` above it.

Multiplicity (:func:`bh_adjust`): each client tests all its peers, so its row of p-values
is adjusted by Benjamini-Hochberg. With every peer from its own distribution (the complete
null) BH's false discovery rate is the probability of *any* rejection in the row, so at
``alpha`` a client wrongly rejects one or more peers with probability at most ``alpha``
(for independent or positively dependent tests; the paired tests of one row share the
client's own errors ``e_i``), at 12 clients as at 10,000.

Evidence (:func:`evidence`): the adjusted ``q`` of a pair, taken in the direction that
rejects more strongly (mutual compatibility: one side rejecting is enough), becomes a soft
rejection ``v = min(1, log q / (2 log alpha))`` in ``[0, 1]``: ``v = 0`` for ``q = 1``,
``v = 1/2`` exactly at the significance boundary ``q = alpha``, ``v = 1`` at ``q <= alpha^2``.
:func:`fedrnd.rnd.extract.linkage_federations` merges groups while their average ``v`` stays
at or below ``1/2``, i.e. while most pairs between them are not rejected.
"""

from __future__ import annotations

import numpy as np
from scipy import special

__all__ = ["bh_adjust", "evidence", "pair_pvalues", "pair_statistic", "paired_moments",
           "symmetric_pvalues", "symmetric_q", "t_sf"]


def t_sf(t, df) -> np.ndarray:
    """Student's ``t`` survival function ``P(T > t)`` with ``df`` degrees of freedom (``>= 1``).

    The same values as ``scipy.stats.t.sf`` bit for bit (its ``_sf`` is this ufunc), without
    the distribution machinery's argument checks around it, which cost about 3x the ufunc on
    the ``C x C`` pairs of a dense decision (4.0 against 1.2 s on 4 million pairs).
    """
    return special.stdtr(df, -np.asarray(t, np.float64))


def paired_moments(scores, second, s_self, count, rows=None) -> tuple[np.ndarray, np.ndarray]:
    """Mean paired difference and its standard error.

    Args:
      scores, second: ``S`` and ``Q`` of :func:`fedrnd.rnd.scoring.paired_matrix` (``[R, C]``)
        or of :func:`~fedrnd.rnd.scoring.paired_edges` (``[E]``, with ``rows``).
      s_self: ``[R]`` (or ``[C]`` for edges) mean own error on the probes, ``S[i, i]``.
      count: ``[R]`` probes per scoring client ``m_i``.
      rows: for edge scores, the scoring client of each edge (``dst``).
    Returns ``(diff, se)`` of the same shape as ``scores``: ``mean d`` and
    ``sqrt(var(d) / m)`` with the unbiased variance ``(Q - diff^2) m / (m - 1)`` (``inf`` when
    ``m < 2``).
    """
    s = np.asarray(scores, np.float64)
    q = np.asarray(second, np.float64)
    s_self = np.asarray(s_self, np.float64)
    m = np.asarray(count, np.float64)
    if rows is None:
        base, m = s_self[:, None], m[:, None]
    else:
        base, m = s_self[rows], m[rows]
    diff = s - base
    var = np.maximum(q - diff * diff, 0.0) * m / np.maximum(m - 1.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        se = np.where(m >= 2, np.sqrt(var / np.maximum(m, 1.0)), np.inf)
    return diff, se


def pair_pvalues(diff, se, s_self, count, min_effect: float, rows=None) -> np.ndarray:
    """One-sided p-values of ``H0: E[d] <= min_effect * S_ii`` (module docstring)."""
    if not (np.isfinite(min_effect) and min_effect >= 0):
        raise ValueError(f"min_effect must be finite and >= 0, got {min_effect}")
    s_self = np.asarray(s_self, np.float64)
    m = np.asarray(count, np.float64)
    if rows is None:
        margin, df = min_effect * s_self[:, None], np.broadcast_to(m[:, None] - 1, diff.shape)
    else:
        margin, df = min_effect * s_self[rows], m[rows] - 1
    excess = np.asarray(diff) - margin
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(se > 0, excess / se, np.where(excess > 0, np.inf, -np.inf))
    p = t_sf(t, np.maximum(df, 1))
    p = np.where(np.isfinite(se) & (df >= 1), p, 1.0)
    # Non-finite scores (a diverged predictor) are not evidence of compatibility.
    return np.where(np.isnan(excess), 0.0, p)


def bh_adjust(p, rows=None, num_rows: int | None = None, skip_diagonal: bool = True
              ) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (``q``), each row a family of its own.

    Dense ``[R, C]`` (the diagonal, a client's own predictor, is not a test when
    ``skip_diagonal`` and gets ``q = 1``), or ``[E]`` edge p-values grouped by ``rows``.
    ``q_(k) = min_{l >= k} p_(l) n / l`` over the ``n`` tests of the row, capped at 1: a pair is
    rejected at level ``alpha`` iff ``q <= alpha``.
    """
    p = np.asarray(p, np.float64)
    if rows is None:
        r, c = p.shape
        pp = p.copy()
        if skip_diagonal and r == c:
            pp[np.arange(r), np.arange(r)] = np.inf  # sorts last, counts as no test
        n = c - 1 if (skip_diagonal and r == c) else c
        order = np.argsort(pp, axis=1, kind="stable")
        ps = np.take_along_axis(pp, order, 1)
        rank = np.arange(1, c + 1, dtype=np.float64)[None, :]
        adj = ps * max(n, 1) / rank
        adj = np.minimum.accumulate(adj[:, ::-1], axis=1)[:, ::-1]
        q = np.empty_like(adj)
        np.put_along_axis(q, order, np.minimum(adj, 1.0), 1)
        if skip_diagonal and r == c:
            q[np.arange(r), np.arange(r)] = 1.0
        return q
    rows = np.asarray(rows)
    if p.shape != rows.shape:
        raise ValueError(f"edge p-values {p.shape} and rows {rows.shape} differ")
    if p.size == 0:
        return p.copy()
    nr = int(rows.max()) + 1 if num_rows is None else int(num_rows)
    order = np.lexsort((p, rows))
    ro, ps = rows[order], p[order]
    n = np.bincount(rows, minlength=nr)
    start = np.cumsum(n) - n
    rank = np.arange(len(p)) - start[ro] + 1
    adj = ps * n[ro] / rank
    # Running minimum from the end of each row: reverse, then a segmented accumulate.
    rev = adj[::-1].copy()
    ro_rev = ro[::-1]
    out = np.empty_like(rev)
    # Segments are contiguous; minimum.accumulate per segment via reduceat boundaries.
    bounds = np.flatnonzero(np.r_[True, ro_rev[1:] != ro_rev[:-1]])
    for a, b in zip(bounds, np.r_[bounds[1:], len(rev)], strict=True):
        out[a:b] = np.minimum.accumulate(rev[a:b])
    q = np.empty_like(p)
    q[order] = np.minimum(out[::-1], 1.0)
    return q


def symmetric_q(q: np.ndarray) -> np.ndarray:
    """``min(q_ij, q_ji)``: a pair is incompatible when either side rejects (dense)."""
    q = np.asarray(q)
    return np.minimum(q, q.T)


def evidence(q, alpha: float) -> np.ndarray:
    """Soft rejection ``v = min(1, log q / (2 log alpha))`` in ``[0, 1]`` (``1/2`` at ``q = alpha``)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    q = np.clip(np.asarray(q, np.float64), 1e-300, 1.0)
    return np.minimum(np.log(q) / (2.0 * np.log(alpha)), 1.0)


def _relative(diff, se, s_self, rows=None):
    """Log novelty ratio ``log(S_ij / S_ii) = log1p(mean d / S_ii)`` and its standard error.

    Why the log and not the relative excess ``mean d / S_ii``: for two clients of one
    distribution the pair ``(S_ij, S_ii)`` is exchangeable (neither predictor saw the probes),
    so ``E[log S_ij - log S_ii] = 0`` exactly, while ``E[S_ij / S_ii] - 1 > 0`` by Jensen
    (about the squared coefficient of variation of ``S``), and its symmetrised form
    ``(S_ij / S_ii + S_ji / S_jj) / 2 - 1`` is never negative. The standard error is the delta
    method's for ``log(S_ii + mean d)``, ``se(d) / S_ij``: ``se(d) / S_ii`` at the null, and
    shrinking with the ratio far from it (the log compresses large shifts, so dividing by
    ``S_ii`` there would overstate the error and hide them).
    """
    s_self = np.asarray(s_self, np.float64)
    tiny = np.finfo(np.float64).tiny
    base = s_self[:, None] if rows is None else s_self[rows]
    base = np.where(base > 0, base, tiny)
    diff = np.asarray(diff, np.float64)
    # S_ij >= 0, so ratio >= -1; the floor only guards log(0) for a perfect peer predictor.
    ratio = np.maximum(diff / base, -1.0 + 1e-12)
    return np.log1p(ratio), np.asarray(se) / (base * (1.0 + ratio))


def symmetric_pvalues(diff, se, s_self, count, min_effect: float, *, edges=None,
                      num_clients: int | None = None) -> np.ndarray:
    """p-values of the *symmetrised* log novelty ratio of each pair (the default statistic).

    ``r_ij = log(S_ij / S_ii)`` is how much worse ``j``'s predictor does on ``i``'s held-out
    probes than ``i``'s own, on a log scale (``log1p`` of the relative excess
    ``mean d / S_ii``; unbiased under the null, see :func:`_relative`); the pair statistic is
    ``R_ij = (r_ij + r_ji) / 2`` with standard error ``sqrt(se_ij^2 + se_ji^2) / 2``
    (relative standard errors; the two directions use disjoint probes). Why both directions:
    a predictor that happens to train better or worse than its peers shifts a whole row
    (``e_i`` is shared by all of row ``i``'s differences) and would make a client reject its
    whole federation or be rejected by it; that offset enters ``r_ij`` and ``r_ji`` with
    opposite signs and cancels in ``R_ij``, while a real shift between the two distributions
    enters both with the same sign. Test ``H0: R_ij <= min_effect`` one-sided, Student's ``t``
    with ``min(m_i, m_j) - 1`` degrees of freedom. A pair scored in one direction only (a
    sparse graph without the reverse edge) is tested on that direction alone.

    Dense: ``diff, se`` ``[C, C]`` from :func:`paired_moments`, returns a symmetric ``[C, C]``.
    Sparse: ``[E]`` with ``edges = (src, dst)`` and ``num_clients``; returns ``[E]`` (both
    directions of a pair get the pair's p-value).
    """
    if not (np.isfinite(min_effect) and min_effect >= 0):
        raise ValueError(f"min_effect must be finite and >= 0, got {min_effect}")
    m = np.asarray(count, np.float64)
    if edges is None:
        r, sr = _relative(diff, se, s_self)
        stat = 0.5 * (r + r.T)
        err = 0.5 * np.sqrt(sr * sr + sr.T * sr.T)
        df = np.minimum(m[:, None], m[None, :]) - 1
    else:
        src, dst = (np.asarray(a, np.int64) for a in edges)
        c = int(num_clients)
        r, sr = _relative(diff, se, s_self, rows=dst)
        # The reverse direction of each edge, where it was scored.
        key = dst * c + src
        order = np.argsort(key)
        rev = src * c + dst
        pos = np.searchsorted(key[order], rev)
        pos = np.minimum(pos, len(key) - 1)
        has = key[order][pos] == rev
        back = order[pos]
        stat = np.where(has, 0.5 * (r + r[back]), r)
        err = np.where(has, 0.5 * np.sqrt(sr * sr + sr[back] ** 2), sr)
        df = np.where(has, np.minimum(m[dst], m[src]), m[dst]) - 1
    excess = stat - float(min_effect)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(err > 0, excess / err, np.where(excess > 0, np.inf, -np.inf))
    p = t_sf(t, np.maximum(df, 1))
    p = np.where(np.isfinite(err) & (df >= 1), p, 1.0)
    return np.where(np.isnan(excess), 0.0, p)


def pair_statistic(diff, se, s_self, count, *, edges=None, num_clients: int | None = None,
                   directional=None):
    """The symmetrised log novelty ratio of every observed unordered pair.

    Returns ``(i, j, R, se_R, df)``, one entry per pair ``i < j``: ``R_ij = (r_ij + r_ji) / 2``
    with ``r_ij = log(S_ij / S_ii)`` (see :func:`symmetric_pvalues` for why both directions),
    its standard error and ``min(m_i, m_j) - 1`` degrees of freedom. Dense ``[C, C]`` input
    gives all ``C (C - 1) / 2`` pairs; edge input (``edges = (src, dst)``) the pairs scored
    in at least one direction (one direction alone where the reverse is missing).
    ``directional(r, sr, dense) -> (r, sr)``: applied to the per-direction ratios and errors
    before they are averaged (a defence, :func:`fedrnd.rnd.defences.robust_directions`).
    """
    m = np.asarray(count, np.float64)
    if edges is None:
        r, sr = _relative(diff, se, s_self)
        if directional is not None:
            r, sr = directional(r, sr, True)
        c = r.shape[0]
        i, j = np.triu_indices(c, 1)
        stat = 0.5 * (r[i, j] + r[j, i])
        err = 0.5 * np.sqrt(sr[i, j] ** 2 + sr[j, i] ** 2)
        return i, j, stat, err, np.minimum(m[i], m[j]) - 1
    src, dst = (np.asarray(a, np.int64) for a in edges)
    c = int(num_clients)
    r, sr = _relative(diff, se, s_self, rows=dst)
    if directional is not None:
        r, sr = directional(r, sr, False)
    lo, hi = np.minimum(src, dst), np.maximum(src, dst)
    uniq, inv = np.unique(lo * c + hi, return_inverse=True)
    n = np.bincount(inv, minlength=len(uniq)).astype(np.float64)
    stat = np.bincount(inv, r, minlength=len(uniq)) / n
    err = np.sqrt(np.bincount(inv, sr * sr, minlength=len(uniq))) / n
    dfm = np.full(len(uniq), np.inf)
    np.minimum.at(dfm, inv, m[dst])
    np.minimum.at(dfm, inv, m[src])
    return uniq // c, uniq % c, stat, err, dfm - 1
