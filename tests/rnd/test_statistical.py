"""The statistical discovery decision (criterion "test"): paired statistics against per-pair
numpy references, p-values against scipy's one-sample t-test, Benjamini-Hochberg against a
plain reference, the false-split rate under the complete null as the population grows (BH
rows, evidence linkage and the tested linkage tree), robustness of average linkage and of the
tested tree to a false link and to outliers, sparse against dense and scipy linkage, the
two-stage path against the dense one, and federations from scores.

Tests marked ``xfail(strict=True)`` state a property the code does not have (each reason
says what fails); they turn into failures once it does, so the marker can be dropped."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from fedrnd.engine import EdgeList
from fedrnd.rnd import (
    RNDConfig,
    bh_adjust,
    candidate_edges,
    discover,
    evidence,
    federations,
    federations_from_scores,
    linkage_federations,
    linkage_test_federations,
    make_pair,
    pair_pvalues,
    pair_statistic,
    paired_edges,
    paired_matrix,
    paired_moments,
    self_errors,
    sparse_linkage_federations,
    symmetric_pvalues,
    symmetric_q,
    target_features,
)
from tests.rnd._data import grouped_gaussian, shuffled_groups
from tests.rnd.test_discovery import np_mlp

ALPHA = 0.05


def canon(labels) -> np.ndarray:
    """Labels renumbered ``0..F-1`` in order of first occurrence (compare partitions)."""
    labels = np.asarray(labels)
    _, first, inv = np.unique(labels, return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first))[inv]


def all_ordered_pairs(c: int) -> tuple[np.ndarray, np.ndarray]:
    src, dst = np.meshgrid(np.arange(c), np.arange(c))
    keep = src != dst
    return src[keep], dst[keep]


# --------------------------------------------------------------------------------------------
# 1. paired statistics S, Q against a per-pair numpy reference
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    """7 random MLP predictors (distinct, non-zero biases), a random pool and ragged probes
    (counts 1..9, padding slots pointing at arbitrary pool rows)."""
    c, d, pool = 7, 5, 60
    pair = make_pair("mlp", (d,), target_width=(16,), predictor_width=(4,), out_dim=8)
    tp = pair.target_params(3)
    rng = np.random.default_rng(0)
    # The shared init plus per-client noise, drawn in numpy (eager per-leaf jax ops are slow).
    preds = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)[None] + 0.2 * rng.normal(
        size=(c, *a.shape)), jnp.float32), pair.predictor.init(jax.random.key(1)))
    x = rng.normal(size=(pool, d)).astype(np.float32)
    count = np.array([9, 1, 4, 7, 2, 9, 5], np.int32)
    idx = rng.integers(0, pool, size=(c, 9)).astype(np.int32)  # padding rows are garbage
    t_pool = target_features(pair, tp, jnp.asarray(x))
    return dict(pair=pair, tp=tp, preds=preds, x=x, t=t_pool, idx=idx, count=count, c=c)


def reference_errors(s, i, j) -> np.ndarray:
    """``e_j(x)`` on client ``i``'s valid probes: numpy forward passes of target and predictor."""
    rows = s["idx"][i, : s["count"][i]]
    x = s["x"][rows]
    pj = jax.tree.map(lambda a: np.asarray(a[j]), s["preds"])
    return np.sum((np_mlp(pj, x) - np_mlp(s["tp"], x)) ** 2, axis=1)


def reference_sq(s) -> tuple[np.ndarray, np.ndarray]:
    """Double loop over (i, j): ``S = mean e_j``, ``Q = mean (e_j - e_i)^2`` on i's probes."""
    c = s["c"]
    ref_s, ref_q = np.zeros((c, c)), np.zeros((c, c))
    for i in range(c):
        e_i = reference_errors(s, i, i)
        for j in range(c):
            e_j = reference_errors(s, i, j)
            ref_s[i, j] = np.mean(e_j)
            ref_q[i, j] = np.mean((e_j - e_i) ** 2)
    return ref_s, ref_q


def test_self_errors_and_paired_matrix_equal_per_pair_reference_fused_and_generic(tiny):
    s = tiny
    apply = s["pair"].predictor.apply
    mean, std, err = (np.asarray(a) for a in self_errors(apply, s["preds"], s["x"], s["t"],
                                                          s["idx"], s["count"]))
    for i in range(s["c"]):
        e_i = reference_errors(s, i, i)
        np.testing.assert_allclose(err[i, : s["count"][i]], e_i, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(err[i, s["count"][i]:], 0.0)  # padding is masked
        np.testing.assert_allclose(mean[i], e_i.mean(), rtol=1e-4)
        np.testing.assert_allclose(std[i], e_i.std(), rtol=1e-3, atol=1e-6)
    ref_s, ref_q = reference_sq(s)
    assert np.ptp(ref_s) > 0.1 and np.ptp(ref_q) > 0.1  # distinct predictors
    # Fused (whole, and in tiles whose last predictor tile overlaps the one before) and generic.
    for scorer, tiles in ((s["pair"], {}), (s["pair"], dict(row_tile=2, col_tile=3)),
                          (apply, dict(row_tile=3, col_tile=2))):
        got_s, got_q = (np.asarray(a) for a in paired_matrix(
            scorer, s["preds"], s["x"], s["t"], s["idx"], s["count"], err, **tiles))
        np.testing.assert_allclose(got_s, ref_s, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got_q, ref_q, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.diag(got_s), mean, rtol=1e-5)


def test_paired_edges_equal_dense_entries_fused_and_generic(tiny):
    s = tiny
    apply = s["pair"].predictor.apply
    _, _, err = self_errors(apply, s["preds"], s["x"], s["t"], s["idx"], s["count"])
    ref_s, ref_q = reference_sq(s)
    rng = np.random.default_rng(4)
    src, dst = all_ordered_pairs(s["c"])
    pick = rng.choice(len(src), 19, replace=False)  # uneven in-degrees, random order
    src, dst = src[pick].astype(np.int32), dst[pick].astype(np.int32)
    edges = EdgeList(jnp.asarray(src), jnp.asarray(dst), jnp.ones(len(src)))
    for scorer in (s["pair"], apply):
        got_s, got_q = (np.asarray(a) for a in paired_edges(
            scorer, s["preds"], s["x"], s["t"], s["idx"], s["count"], err, edges,
            edge_chunk=3))
        np.testing.assert_allclose(got_s, ref_s[dst, src], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got_q, ref_q[dst, src], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# 2. p-values against scipy's one-sample t-test on explicit paired differences
# --------------------------------------------------------------------------------------------


def explicit_population(c, rng, excess=None, m_range=(2, 30), rel=0.4):
    """Per-probe errors made explicit: ``e_i(x) > 0`` on ``m_i`` probes of client ``i`` and
    ``e_j(x) = e_i(x) + d_ij(x)``, ``d_ij ~ N(excess[i, j] * mean e_i, (rel * mean e_i)^2)``.
    Returns ``S, Q, count, d`` (``d[i][j]``: the differences on ``i``'s probes)."""
    m = rng.integers(m_range[0], m_range[1] + 1, c)
    excess = np.zeros((c, c)) if excess is None else excess
    s, q = np.zeros((c, c)), np.zeros((c, c))
    d_all = []
    for i in range(c):
        e_i = rng.gamma(3.0, rng.uniform(0.3, 1.0), m[i])
        base = e_i.mean()
        row = []
        for j in range(c):
            d = np.zeros(m[i]) if j == i else rng.normal(excess[i, j] * base, rel * base, m[i])
            row.append(d)
            s[i, j] = np.mean(e_i + d)
            q[i, j] = np.mean(d * d)
        d_all.append(row)
    return s, q, m, d_all


def test_pair_pvalues_equal_one_sided_t_test_on_explicit_differences():
    rng = np.random.default_rng(0)
    c = 9
    excess = rng.choice([0.0, 0.02, 0.1, 0.4], size=(c, c))
    s, q, m, d = explicit_population(c, rng, excess)
    s_self = np.diag(s).copy()
    diff, se = paired_moments(s, q, s_self, m)
    for min_effect in (0.0, 0.05, 0.3):
        p = pair_pvalues(diff, se, s_self, m, min_effect)
        ref = np.ones((c, c))
        for i in range(c):
            for j in range(c):
                if i == j:
                    continue
                np.testing.assert_allclose(diff[i, j], d[i][j].mean(), atol=1e-12)
                if m[i] >= 2:
                    np.testing.assert_allclose(se[i, j], sps.sem(d[i][j]), rtol=1e-9)
                    ref[i, j] = sps.ttest_1samp(d[i][j], min_effect * s_self[i],
                                                alternative="greater").pvalue
                else:
                    assert np.isinf(se[i, j])
        off = ~np.eye(c, dtype=bool)
        np.testing.assert_allclose(p[off], ref[off], rtol=1e-7, atol=1e-12)
        assert np.any(p[off] < 0.01) and np.any(p[off] > 0.5)  # both outcomes occur
    # The margin only ever makes a pair harder to reject.
    assert np.all(pair_pvalues(diff, se, s_self, m, 0.3) >= pair_pvalues(diff, se, s_self, m, 0.0))


def symmetric_reference(diff, se, s_self, m, min_effect, i, j, both=True) -> float:
    """The symmetrised log novelty ratio test of one pair, scalar arithmetic."""
    # log(S_ij / S_ii) and the delta method's error se(d) / S_ij.
    r_ij = np.log(s_self[i] + diff[i, j]) - np.log(s_self[i])
    sr_ij = se[i, j] / (s_self[i] + diff[i, j])
    if not both:
        stat, err, df = r_ij, sr_ij, m[i] - 1
    else:
        r_ji = np.log(s_self[j] + diff[j, i]) - np.log(s_self[j])
        sr_ji = se[j, i] / (s_self[j] + diff[j, i])
        stat = 0.5 * (r_ij + r_ji)
        err = 0.5 * np.sqrt(sr_ij ** 2 + sr_ji ** 2)
        df = min(m[i], m[j]) - 1
    if df < 1 or not np.isfinite(err):
        return 1.0
    return float(sps.t.sf((stat - min_effect) / err, df))


def test_symmetric_pvalues_dense_and_sparse_equal_loop_reference():
    rng = np.random.default_rng(1)
    c = 8
    excess = rng.choice([0.0, 0.1, 0.5], size=(c, c))
    s, q, m, _ = explicit_population(c, rng, excess, m_range=(1, 25))
    m[0] = 1  # a client with a single probe: no evidence in either direction
    s_self = np.diag(s).copy()
    diff, se = paired_moments(s, q, s_self, m)
    me = 0.05
    dense = symmetric_pvalues(diff, se, s_self, m, me)
    np.testing.assert_allclose(dense, dense.T, rtol=1e-12)
    for i in range(c):
        for j in range(c):
            if i != j:
                ref = symmetric_reference(diff, se, s_self, m, me, i, j)
                np.testing.assert_allclose(dense[i, j], ref, rtol=1e-7, atol=1e-14)
    np.testing.assert_array_equal(dense[0, 1:], 1.0)
    assert np.any(dense < 1e-3) and np.any(dense > 0.5)
    # Sparse with every ordered pair (shuffled): the dense entries.
    src, dst = all_ordered_pairs(c)
    perm = rng.permutation(len(src))
    src, dst = src[perm], dst[perm]
    de, se_e = paired_moments(s[dst, src], q[dst, src], s_self, m, rows=dst)
    sparse = symmetric_pvalues(de, se_e, s_self, m, me, edges=(src, dst), num_clients=c)
    np.testing.assert_allclose(sparse, dense[dst, src], rtol=1e-12)
    # Drop some reverse edges: those pairs fall back to their one scored direction.
    pairs = {(a, b) for a, b in zip(src.tolist(), dst.tolist(), strict=True)}
    drop = np.array([(a, b) in pairs and a < b and rng.random() < 0.4
                     for a, b in zip(src.tolist(), dst.tolist(), strict=True)])
    src2, dst2 = src[~drop], dst[~drop]
    kept = {(a, b) for a, b in zip(src2.tolist(), dst2.tolist(), strict=True)}
    de2, se2 = paired_moments(s[dst2, src2], q[dst2, src2], s_self, m, rows=dst2)
    got = symmetric_pvalues(de2, se2, s_self, m, me, edges=(src2, dst2), num_clients=c)
    n_one = 0
    for e, (a, b) in enumerate(zip(src2.tolist(), dst2.tolist(), strict=True)):
        if (b, a) in kept:
            np.testing.assert_allclose(got[e], dense[b, a], rtol=1e-12)
        else:
            n_one += 1
            ref = symmetric_reference(diff, se, s_self, m, me, b, a, both=False)
            np.testing.assert_allclose(got[e], ref, rtol=1e-7, atol=1e-14)
    assert n_one >= 5


def test_pair_statistic_is_the_symmetrised_test_and_matches_its_pvalues():
    rng = np.random.default_rng(11)
    c = 8
    excess = rng.choice([0.0, 0.1, 0.5], size=(c, c))
    s, q, m, _ = explicit_population(c, rng, excess, m_range=(3, 25))
    s_self = np.diag(s).copy()
    diff, se = paired_moments(s, q, s_self, m)
    me = 0.05
    i, j, stat, err, df = pair_statistic(diff, se, s_self, m)
    iu, ju = np.triu_indices(c, 1)
    np.testing.assert_array_equal(i, iu)
    np.testing.assert_array_equal(j, ju)
    r = np.log(s) - np.log(s_self)[:, None]  # log(S_ij / S_ii)
    sr = se / s
    np.testing.assert_allclose(stat, 0.5 * (r[iu, ju] + r[ju, iu]), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(err, 0.5 * np.hypot(sr[iu, ju], sr[ju, iu]), rtol=1e-9)
    np.testing.assert_array_equal(df, np.minimum(m[iu], m[ju]) - 1)
    dense_p = symmetric_pvalues(diff, se, s_self, m, me)
    np.testing.assert_allclose(sps.t.sf((stat - me) / err, df), dense_p[iu, ju], rtol=1e-9)
    # Edges: every ordered pair (shuffled) gives the dense pairs; a pair scored one way only
    # gets that direction's relative excess and error.
    src, dst = all_ordered_pairs(c)
    perm = rng.permutation(len(src))
    src, dst = src[perm], dst[perm]
    de, se_e = paired_moments(s[dst, src], q[dst, src], s_self, m, rows=dst)
    got = pair_statistic(de, se_e, s_self, m, edges=(src, dst), num_clients=c)
    for a, b in zip(got, (i, j, stat, err, df), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    one = src > dst  # keep only the direction dst < src scores
    i1, j1, st1, er1, df1 = pair_statistic(de[one], se_e[one], s_self, m,
                                           edges=(src[one], dst[one]), num_clients=c)
    np.testing.assert_array_equal(i1, iu)
    np.testing.assert_allclose(st1, r[iu, ju], rtol=1e-9, atol=1e-12)  # row i scores predictor j
    np.testing.assert_allclose(er1, sr[iu, ju], rtol=1e-9)
    assert np.all(df1 <= m[iu] - 1)


# --------------------------------------------------------------------------------------------
# 3. Benjamini-Hochberg against a plain reference
# --------------------------------------------------------------------------------------------


def bh_reference(p) -> np.ndarray:
    """Plain BH of one family: sort, ``p * n / rank``, running minimum from the end, cap 1."""
    p = np.asarray(p, np.float64)
    n = len(p)
    order = np.argsort(p)
    adj = p[order] * n / np.arange(1, n + 1)
    adj = np.minimum.accumulate(adj[::-1])[::-1]
    q = np.empty(n)
    q[order] = np.minimum(adj, 1.0)
    return q


def random_pvalues(rng, shape):
    """A mix of tiny, moderate and null p-values with exact ties, zeros and ones."""
    p = np.where(rng.random(shape) < 0.3, rng.random(shape) * 1e-3, rng.random(shape))
    p = np.where(rng.random(shape) < 0.2, np.round(p, 1), p)  # ties (and some 0 and 1)
    return p


def test_bh_adjust_dense_equals_per_row_reference_diagonal_excluded():
    rng = np.random.default_rng(2)
    for c in (2, 3, 10, 31):
        p = random_pvalues(rng, (c, c))
        q = bh_adjust(p)
        for i in range(c):
            others = np.delete(np.arange(c), i)
            np.testing.assert_allclose(q[i, others], bh_reference(p[i, others]), rtol=1e-12)
        np.testing.assert_array_equal(np.diag(q), 1.0)
        # Without skipping the diagonal, or for rectangular rows (newcomers): whole rows.
        q_all = bh_adjust(p, skip_diagonal=False)
        for i in range(c):
            np.testing.assert_allclose(q_all[i], bh_reference(p[i]), rtol=1e-12)
        rect = p[: max(1, c // 2)]
        q_rect = bh_adjust(rect)
        for i in range(len(rect)):
            np.testing.assert_allclose(q_rect[i], bh_reference(rect[i]), rtol=1e-12)


def test_bh_adjust_edges_equal_per_group_reference():
    rng = np.random.default_rng(3)
    for c, e in ((5, 12), (20, 150), (40, 7)):
        rows = rng.integers(0, c, e)
        p = random_pvalues(rng, (e,))
        q = bh_adjust(p, rows=rows, num_rows=c)
        ref = np.empty(e)
        for r in range(c):
            sel = np.flatnonzero(rows == r)
            if sel.size:
                ref[sel] = bh_reference(p[sel])
        np.testing.assert_allclose(q, ref, rtol=1e-12)
    # The edge form of a full dense matrix (off-diagonal entries grouped by row) is dense BH.
    p = random_pvalues(rng, (9, 9))
    src, dst = all_ordered_pairs(9)
    np.testing.assert_allclose(bh_adjust(p[dst, src], rows=dst, num_rows=9),
                               bh_adjust(p)[dst, src], rtol=1e-12)


# --------------------------------------------------------------------------------------------
# 4. the false-split rate under the complete null, as the population grows
# --------------------------------------------------------------------------------------------


def null_moments(c, rng, rel=0.5):
    """``S, Q, count`` of a one-distribution population straight from the sampling
    distribution of Gaussian paired differences with mean 0: per ordered pair the mean of
    ``m_i`` differences ``~ N(0, sd_i^2 / m_i)`` and, independently, the unbiased variance
    ``~ sd_i^2 chi2_{m_i - 1} / (m_i - 1)`` (vectorised, no per-probe arrays)."""
    m = rng.integers(20, 61, c)
    s_self = rng.uniform(0.5, 2.0, c)
    sd = rel * s_self[:, None]
    mm = m[:, None].astype(np.float64)
    mean = rng.standard_normal((c, c)) * sd / np.sqrt(mm)
    var = sd ** 2 * rng.chisquare(mm - 1, (c, c)) / (mm - 1)
    q = (mm - 1) / mm * var + mean ** 2
    s = s_self[:, None] + mean
    np.fill_diagonal(s, s_self)
    np.fill_diagonal(q, 0.0)
    return s, q, m


def tree_decision(s, q2, m, alpha, min_effect):
    """The default decision's federations from dense ``S, Q``: pair statistic -> tested tree."""
    s_self = np.diag(s).copy()
    diff, se = paired_moments(s, q2, s_self, m)
    i, j, stat, err, df = pair_statistic(diff, se, s_self, m)
    return linkage_test_federations(len(m), i, j, stat, err, df, alpha=alpha,
                                    min_effect=min_effect)


@pytest.mark.parametrize("c,reps", [(12, 300), (200, 8), (2000, 1)])
def test_false_split_rate_stays_nominal_as_clients_grow(c, reps):
    rng = np.random.default_rng(c)
    cfg = RNDConfig()
    any_rejection, naive, tree_split = [], [], []
    for _ in range(reps):
        s, q2, m = null_moments(c, rng)
        s_self = np.diag(s).copy()
        diff, se = paired_moments(s, q2, s_self, m)
        # min_effect 0: the exact null, where BH's level is attained (the margin only helps).
        p = symmetric_pvalues(diff, se, s_self, m, 0.0)
        q = bh_adjust(p)
        any_rejection.append(np.any(q <= ALPHA, axis=1))
        off = p + np.eye(c)  # the diagonal is no test
        naive.append(np.any(off <= ALPHA, axis=1))
        fed = linkage_federations(evidence(symmetric_q(q), ALPHA))
        assert fed.max() == 0, f"one-distribution population split into {fed.max() + 1}"
        # The default decision (tested linkage tree at the config's alpha and min_effect).
        tree_split.append(tree_decision(s, q2, m, cfg.alpha, cfg.min_effect).max() > 0)
    rate = np.mean(any_rejection)
    n_rows = c * reps
    # Rows are nearly independent; 4 binomial standard errors of slack.
    slack = 4.0 * np.sqrt(ALPHA * (1 - ALPHA) / n_rows)
    assert rate <= ALPHA + slack, (rate, ALPHA + slack)
    if c == 12:
        assert rate >= ALPHA / 5  # not vacuous: the exact-null test does reject sometimes
    # Contrast: without the per-row correction a client's chance of rejecting some
    # same-distribution peer grows with the number of peers.
    if c >= 200:
        assert np.mean(naive) > 0.5
    # A whole population is split by the tested tree at most alpha of the time.
    tree_slack = 4.0 * np.sqrt(cfg.alpha * (1 - cfg.alpha) / reps)
    assert np.mean(tree_split) <= cfg.alpha + tree_slack, np.mean(tree_split)


def test_tested_tree_false_split_rate_is_nominal_without_margin():
    rng = np.random.default_rng(12)
    reps = 300
    split = [tree_decision(*null_moments(12, rng), ALPHA, 0.0).max() > 0
             for _ in range(reps)]
    assert np.mean(split) <= ALPHA + 4.0 * np.sqrt(ALPHA * (1 - ALPHA) / reps), np.mean(split)


def test_false_split_rate_decision_through_federations_from_scores():
    """The whole test criterion from S, Q (float32 as stored) keeps a null population whole."""
    rng = np.random.default_rng(7)
    s, q2, m = null_moments(300, rng)
    cfg = RNDConfig()
    dec = federations_from_scores(s, cfg, second=q2, count=m)
    assert dec.criterion == "test" and dec.num_federations == 1
    assert np.mean(np.any(dec.q <= cfg.alpha, axis=1)) <= cfg.alpha


# --------------------------------------------------------------------------------------------
# 5. one false link does not merge two groups
# --------------------------------------------------------------------------------------------


def two_blocks(seed=0, sizes=(5, 6)):
    g = np.random.default_rng(seed).permutation(np.repeat([0, 1], sizes))
    v = (g[:, None] != g[None, :]).astype(np.float64)
    return g, v


def knn_like_pairs(g, extra=()):
    """Each member linked to its next two in a ring within its group, plus ``extra`` pairs."""
    i, j = [], []
    for k in np.unique(g):
        members = np.flatnonzero(g == k)
        for a in range(len(members)):
            for step in (1, 2):
                i.append(members[a])
                j.append(members[(a + step) % len(members)])
    for a, b in extra:
        i.append(a)
        j.append(b)
    return np.array(i), np.array(j)


def test_false_link_does_not_merge_two_groups_dense_and_complete_sparse():
    g, v = two_blocks()
    c = len(g)
    iu, ju = np.triu_indices(c, 1)
    for a in np.flatnonzero(g == 0):
        for b in np.flatnonzero(g == 1):
            w = v.copy()
            w[a, b] = w[b, a] = 0.0  # one pair across the groups looks fully compatible
            dense = linkage_federations(w)
            sparse = sparse_linkage_federations(c, iu, ju, w[iu, ju])
            np.testing.assert_array_equal(sparse, dense)
            assert dense.max() == 1  # still two federations
            # Every client but the false link's two ends stays exactly with its group. (The
            # ends themselves may be taken together first, when the false pair's tie-breaking
            # jitter is the lowest, and one of them then follows the other: at most one client
            # changes side.)
            rest = np.ones(c, bool)
            rest[[a, b]] = False
            np.testing.assert_array_equal(canon(dense[rest]), canon(g[rest]))
            home_a = dense[rest & (g == 0)][0]
            home_b = dense[rest & (g == 1)][0]
            assert dense[a] == home_a or dense[b] == home_b
            # Contrast: the paper's components merge everything through that one pair.
            comp = evidence_compatible(w)
            assert federations(comp, rule="mutual").max() == 0
            # With the false link a little above the clean pairs, the planted groups exactly.
            w[a, b] = w[b, a] = 0.1
            np.testing.assert_array_equal(canon(linkage_federations(w)), canon(g))


def evidence_compatible(v):
    comp = v <= 0.5
    np.fill_diagonal(comp, True)
    return comp


def test_false_link_lacks_support_on_a_sparse_graph():
    g, v = two_blocks(seed=1)
    c = len(g)
    for a in np.flatnonzero(g == 0):
        for b in np.flatnonzero(g == 1):
            i, j = knn_like_pairs(g, extra=[(a, b)])  # the only observed pair across groups
            w = v.copy()
            w[a, b] = w[b, a] = 0.1  # below the cut: a false link
            fed = sparse_linkage_federations(c, i, j, w[i, j])
            np.testing.assert_array_equal(canon(fed), canon(g))
            # It is the support rule that holds them apart: without it they merge.
            merged = sparse_linkage_federations(c, i, j, w[i, j], min_support=0.0)
            assert merged.max() == 0


@pytest.mark.xfail(strict=True, reason=(
    "sparse_linkage_federations: min_support is relative to the smaller "
    "group, so while an end of the false link is still a singleton one pair suffices; a "
    "false link tied with the within-group evidence (here all 0) can then pull that client "
    "into the other group and chain the rest of its group in through its (unopposed, "
    "unobserved-elsewhere) ring pairs, merging the two groups"))
def test_false_link_tied_with_clean_pairs_does_not_merge_on_a_sparse_graph():
    g, v = two_blocks(seed=1)
    c = len(g)
    for a in np.flatnonzero(g == 0):
        for b in np.flatnonzero(g == 1):
            i, j = knn_like_pairs(g, extra=[(a, b)])
            w = v.copy()
            w[a, b] = w[b, a] = 0.0
            fed = sparse_linkage_federations(c, i, j, w[i, j])
            assert fed.max() == 1, f"false link {a}-{b} merged the two groups"


def planted_statistic(g, rng, noise=0.03, between=0.5):
    """A symmetric relative-excess matrix ``R``: about 0 within groups, ``between`` across."""
    c = len(g)
    r = np.where(g[:, None] == g[None, :], 0.0, between) + rng.normal(0, noise, (c, c))
    r = 0.5 * (r + r.T)
    np.fill_diagonal(r, 0.0)
    return r


def tree_of(c, i, j, r, se=0.03, **kw):
    """The tested tree on the pairs ``(i, j)`` of ``r`` with a fixed per-pair error."""
    n = len(i)
    return linkage_test_federations(c, i, j, r[i, j], np.full(n, se), np.full(n, 30.0),
                                    alpha=0.01, min_effect=0.05, **kw)


def test_tested_tree_splits_only_shifts_larger_than_min_effect():
    g = shuffled_groups([9, 9], seed=4)
    c = len(g)
    iu, ju = np.triu_indices(c, 1)
    for seed in range(3):
        rng = np.random.default_rng(seed)
        # Precise statistics (many probes): a real but negligible shift stays one federation,
        # one above the margin separates the groups exactly.
        small = planted_statistic(g, rng, noise=0.004, between=0.03)
        assert tree_of(c, iu, ju, small, se=0.004).max() == 0
        large = planted_statistic(g, rng, noise=0.004, between=0.08)
        np.testing.assert_array_equal(canon(tree_of(c, iu, ju, large, se=0.004)), canon(g))


def test_tested_tree_splits_three_groups_pairwise_beyond_min_effect():
    g = shuffled_groups([7, 6, 5], seed=4)
    c = len(g)
    iu, ju = np.triu_indices(c, 1)
    r = planted_statistic(g, np.random.default_rng(0), noise=0.004, between=0.08)
    np.testing.assert_array_equal(canon(tree_of(c, iu, ju, r, se=0.004)), canon(g))


def test_false_link_does_not_merge_two_groups_in_the_tested_tree():
    g, _ = two_blocks(seed=2)
    c = len(g)
    r = planted_statistic(g, np.random.default_rng(2))
    iu, ju = np.triu_indices(c, 1)
    assert np.array_equal(canon(tree_of(c, iu, ju, r)), canon(g))  # clean: the planted groups
    for a in np.flatnonzero(g == 0):
        for b in np.flatnonzero(g == 1):
            w = r.copy()
            w[a, b] = w[b, a] = r[iu, ju].min() - 0.01  # the most compatible-looking pair
            fed = tree_of(c, iu, ju, w)
            np.testing.assert_array_equal(tree_of(c, iu, ju, w, dense=False), fed)
            rest = np.ones(c, bool)
            rest[[a, b]] = False
            np.testing.assert_array_equal(canon(fed[rest]), canon(g[rest]))


@pytest.mark.xfail(strict=True, reason=(
    "the sparse tested tree (two-stage mode) builds its dendrogram with the support rule of "
    "sparse_linkage_federations, which a singleton meets with one pair: a false link tied "
    "with or below the clean pairs lets its ends join the other group early, the ring "
    "neighbours chain in, and no observed cross pair is left to reject the merge"))
def test_false_link_does_not_merge_two_groups_in_the_sparse_tested_tree():
    g, _ = two_blocks(seed=2)
    c = len(g)
    r = planted_statistic(g, np.random.default_rng(2))
    iu, ju = np.triu_indices(c, 1)
    for a in np.flatnonzero(g == 0):
        for b in np.flatnonzero(g == 1):
            i, j = knn_like_pairs(g, extra=[(a, b)])
            i, j = np.minimum(i, j), np.maximum(i, j)
            w = r.copy()
            w[a, b] = w[b, a] = r[iu, ju].min() - 0.01
            fed = tree_of(c, i, j, w, dense=False)
            rest = np.ones(c, bool)
            rest[[a, b]] = False
            np.testing.assert_array_equal(canon(fed[rest]), canon(g[rest]))


# --------------------------------------------------------------------------------------------
# 6. outliers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_outliers_stay_alone_and_leave_the_others_unchanged(seed):
    rng = np.random.default_rng(seed)
    g = shuffled_groups([4, 6, 5], seed=seed)
    n = len(g)
    # Noisy evidence, so the others' partition is not simply the planted one.
    v = np.where(g[:, None] == g[None, :], rng.uniform(0, 0.6, (n, n)),
                 rng.uniform(0.4, 1.0, (n, n)))
    v = 0.5 * (v + v.T)
    np.fill_diagonal(v, 0.0)
    k = 3
    c = n + k
    outliers = np.sort(rng.choice(c, k, replace=False))
    others = np.setdiff1d(np.arange(c), outliers)
    full = np.ones((c, c))
    full[np.ix_(others, others)] = v
    np.fill_diagonal(full, 0.0)
    without = linkage_federations(v)
    assert without.max() >= 1  # a non-trivial partition of the others
    iu, ju = np.triu_indices(c, 1)
    for fed in (linkage_federations(full), sparse_linkage_federations(c, iu, ju, full[iu, ju])):
        np.testing.assert_array_equal(canon(fed[others]), canon(without))
        for o in outliers:
            assert np.count_nonzero(fed == fed[o]) == 1  # a singleton


def with_outliers(r, k, rng):
    """``r`` embedded among ``k`` outliers whose statistic to everyone is about 1."""
    n = len(r) + k
    outliers = np.sort(rng.choice(n, k, replace=False))
    others = np.setdiff1d(np.arange(n), outliers)
    full = 1.0 + rng.normal(0, 0.03, (n, n))
    full = 0.5 * (full + full.T)
    full[np.ix_(others, others)] = r
    np.fill_diagonal(full, 0.0)
    return full, outliers, others


@pytest.mark.parametrize("k", [1, 2, 4])
def test_outliers_leave_the_tested_tree_of_the_others_unchanged(k):
    for seed in range(4):
        rng = np.random.default_rng(seed)
        g = shuffled_groups([4, 6, 5], seed=seed)
        r = planted_statistic(g, rng, noise=0.08, between=0.3)
        iu, ju = np.triu_indices(len(g), 1)
        without = tree_of(len(g), iu, ju, r)
        full, outliers, others = with_outliers(r, k, rng)
        n = len(full)
        iu, ju = np.triu_indices(n, 1)
        fed = tree_of(n, iu, ju, full)
        np.testing.assert_array_equal(canon(fed[others]), canon(without))
        assert not set(fed[outliers].tolist()) & set(fed[others].tolist())


def test_outliers_are_singletons_in_the_tested_tree():
    for seed in range(8):
        rng = np.random.default_rng(seed)
        g = shuffled_groups([4, 6, 5], seed=seed)
        full, outliers, _ = with_outliers(planted_statistic(g, rng), 4, rng)
        iu, ju = np.triu_indices(len(full), 1)
        fed = tree_of(len(full), iu, ju, full)
        for o in outliers:
            assert np.count_nonzero(fed == fed[o]) == 1, f"seed {seed}: outlier {o} grouped"


# --------------------------------------------------------------------------------------------
# 7. sparse linkage equals dense linkage and scipy's average linkage
# --------------------------------------------------------------------------------------------


def test_sparse_linkage_equals_dense_when_every_pair_is_observed():
    rng = np.random.default_rng(5)
    for c in (2, 3, 7, 20, 45):
        for kind in ("continuous", "quantised", "asymmetric"):
            if kind == "quantised":
                v = rng.integers(0, 5, (c, c)) / 4.0  # many exact ties, some at the cut
                v = np.maximum(v, v.T)
            else:
                v = rng.random((c, c))
                if kind == "continuous":
                    v = 0.5 * (v + v.T)
            np.fill_diagonal(v, 0.0)
            dense = linkage_federations(v)
            if kind == "asymmetric":  # both directions listed: duplicates are averaged
                i, j = all_ordered_pairs(c)
            else:
                i, j = np.triu_indices(c, 1)
                perm = rng.permutation(len(i))
                i, j = i[perm], j[perm]
            sparse = sparse_linkage_federations(c, i, j, v[i, j])
            np.testing.assert_array_equal(sparse, dense)
            for cut in (0.3, 0.7):
                np.testing.assert_array_equal(
                    sparse_linkage_federations(c, i, j, v[i, j], cut=cut),
                    linkage_federations(v, cut=cut))


def test_linkage_matches_scipy_average_linkage_on_tie_free_input():
    rng = np.random.default_rng(6)
    nontrivial = 0
    for c in (4, 12, 30, 60):
        for cut in (0.35, 0.5, 0.65):
            g = rng.integers(0, 4, c)
            v = np.where(g[:, None] == g[None, :], 0.35, 0.65) + rng.normal(0, 0.2, (c, c))
            v = np.clip(0.5 * (v + v.T), 0.0, 1.0)
            np.fill_diagonal(v, 0.0)
            ref = canon(fcluster(linkage(squareform(v, checks=False), method="average"),
                                 t=cut, criterion="distance"))
            iu, ju = np.triu_indices(c, 1)
            np.testing.assert_array_equal(linkage_federations(v, cut), ref)
            np.testing.assert_array_equal(sparse_linkage_federations(c, iu, ju, v[iu, ju], cut),
                                          ref)
            nontrivial += 0 < ref.max() < c - 1
    assert nontrivial >= 4  # most cuts split the population, but not into singletons


def test_sparse_tested_tree_equals_dense_when_every_pair_is_observed():
    rng = np.random.default_rng(12)
    n_split = 0
    for c in (2, 5, 13, 30):
        for quantised in (False, True):
            g = rng.integers(0, 3, c)
            r = planted_statistic(g, rng, noise=0.1, between=0.3)
            if quantised:  # exact ties, broken by the shared per-pair jitter
                r = np.round(r * 10) / 10
            i, j = np.triu_indices(c, 1)
            se = rng.uniform(0.02, 0.1, len(i))
            df = rng.integers(5, 40, len(i)).astype(np.float64)
            dense = linkage_test_federations(c, i, j, r[i, j], se, df, alpha=0.01,
                                             min_effect=0.05, dense=True)
            perm = rng.permutation(len(i))
            sparse = linkage_test_federations(c, i[perm], j[perm], r[i, j][perm], se[perm],
                                              df[perm], alpha=0.01, min_effect=0.05,
                                              dense=False)
            np.testing.assert_array_equal(sparse, dense)
            n_split += dense.max() > 0
    assert n_split >= 4


# --------------------------------------------------------------------------------------------
# 8. the two-stage path equals the dense path when every pair is a candidate
# --------------------------------------------------------------------------------------------


def test_candidate_edges_are_symmetric_without_self_loops_or_duplicates():
    rng = np.random.default_rng(8)
    for c, k, r in ((30, 3, 2), (11, 1, 0), (6, 10, 3)):
        fp = rng.normal(size=(c, 6))
        e = candidate_edges(fp, k, r, seed=1)
        src, dst = np.asarray(e.src), np.asarray(e.dst)
        assert np.all(src != dst)
        pairs = set(zip(src.tolist(), dst.tolist(), strict=True))
        assert len(pairs) == len(src)  # no duplicates
        assert all((b, a) in pairs for a, b in pairs)  # both directions
        # Every client scores at least its k nearest fingerprints (scaled coordinates).
        x = (fp - fp.mean(0)) / fp.std(0)
        dist = np.linalg.norm(x[:, None] - x[None], axis=-1)
        np.fill_diagonal(dist, np.inf)
        kk = min(k, c - 1)
        for i in range(c):
            assert set(np.argsort(dist[i])[:kk].tolist()) <= {a for a, b in pairs if b == i}
        order = np.lexsort((src, dst))
        np.testing.assert_array_equal(order, np.arange(len(src)))  # sorted by (dst, src)
    # k = C - 1: every ordered pair.
    c = 9
    e = candidate_edges(rng.normal(size=(c, 4)), k=c - 1)
    got = set(zip(np.asarray(e.src).tolist(), np.asarray(e.dst).tolist(), strict=True))
    ref_src, ref_dst = all_ordered_pairs(c)
    assert got == set(zip(ref_src.tolist(), ref_dst.tolist(), strict=True))
    assert len(np.asarray(e.src)) == c * (c - 1)


def test_two_stage_discovery_with_every_pair_a_candidate_equals_dense():
    groups = shuffled_groups([4, 3, 3], seed=1)
    data = grouped_gaussian(groups, n=32, n_test=4, dim=5, seed=1, shift_seed=1)
    c = data.num_clients
    cfg = RNDConfig(network="mlp", steps=30, target_width=(64,), predictor_width=(8,),
                    out_dim=16)
    dense = discover(data, cfg)
    assert dense.decision.criterion == "test"
    src, dst = all_ordered_pairs(c)
    given = discover(data, cfg, edges=EdgeList(jnp.asarray(src), jnp.asarray(dst),
                                               jnp.ones(len(src))))
    staged = discover(data, dataclasses.replace(cfg, candidates=c - 1, random_peers=0))
    assert staged.fingerprint is not None and staged.fingerprint.shape == (c, 2 * 16)
    assert staged.num_federations >= 2  # the groups are told apart (not a trivial match)
    for sp in (given, staged):
        e_src, e_dst = np.asarray(sp.edges.src), np.asarray(sp.edges.dst)
        assert len(e_src) == c * (c - 1)
        np.testing.assert_array_equal(sp.federation, dense.federation)
        np.testing.assert_allclose(sp.edge_scores, dense.scores[e_dst, e_src], rtol=1e-5)
        # Q = mean (e_j - e_i)^2 of float32 errors in the thousands: absolute rounding.
        np.testing.assert_allclose(sp.second, dense.second[e_dst, e_src], rtol=1e-4,
                                   atol=1e-3)
        # q entry by entry. Float32 scores: the sparse path takes S_ii from self_errors
        # (the predictor's apply), the dense one from the fused diagonal; their last-bit
        # differences move the t statistics slightly, hence rtol 3e-4 on small q.
        q_d = dense.decision.q[e_dst, e_src]
        np.testing.assert_allclose(sp.decision.q, q_d, rtol=3e-4, atol=1e-8)
        assert np.any(q_d <= ALPHA) and np.any(q_d > 0.5)
        pi, pj = sp.decision.pairs[:, 0], sp.decision.pairs[:, 1]
        np.testing.assert_allclose(sp.decision.evidence, dense.decision.evidence[pi, pj],
                                   rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------------------------
# 9. federations from scores
# --------------------------------------------------------------------------------------------


def test_federations_from_scores_recovers_planted_groups_and_keeps_one_distribution_whole():
    rng = np.random.default_rng(9)
    groups = shuffled_groups([4, 5, 3], seed=3)
    c = len(groups)
    excess = np.where(groups[:, None] == groups[None, :], 0.0, 0.5)
    s, q, m, _ = explicit_population(c, rng, excess, m_range=(20, 40), rel=0.3)
    dec = federations_from_scores(s, RNDConfig(), second=q, count=m)
    np.testing.assert_array_equal(canon(dec.federation), canon(groups))
    np.testing.assert_array_equal(dec.compatible, groups[:, None] == groups[None, :])
    # The same scores along every ordered pair (sparse form): the same federations.
    src, dst = all_ordered_pairs(c)
    sp = federations_from_scores(s[dst, src], RNDConfig(), second=q[dst, src], count=m,
                                 s_self=np.diag(s), edges=(src, dst), num_clients=c)
    np.testing.assert_array_equal(sp.federation, dec.federation)
    np.testing.assert_allclose(sp.q, dec.q[dst, src], rtol=1e-4, atol=1e-10)
    # One distribution: kept whole.
    s0, q0, m0, _ = explicit_population(c, rng, None, m_range=(20, 40), rel=0.3)
    whole = federations_from_scores(s0, RNDConfig(), second=q0, count=m0)
    assert whole.num_federations == 1


def test_federations_from_scores_test_criterion_needs_second_moments_and_counts():
    rng = np.random.default_rng(10)
    s, q, m, _ = explicit_population(5, rng)
    src, dst = all_ordered_pairs(5)
    for kwargs in (dict(), dict(second=q), dict(count=m)):
        with pytest.raises(ValueError, match=r"criterion='test' needs .*second=.*count="):
            federations_from_scores(s, RNDConfig(), **kwargs)
    with pytest.raises(ValueError, match="criterion='test' needs"):
        federations_from_scores(s[dst, src], RNDConfig(), count=m, s_self=np.diag(s),
                                edges=(src, dst), num_clients=5)
    # The paper's criterion needs neither.
    assert federations_from_scores(s, RNDConfig(criterion="eps")).criterion == "eps"


def test_an_unplaceable_client_at_the_top_of_the_tree_hides_no_structure(monkeypatch):
    # Client x fits nowhere (high R with everyone, so it joins the tree last: the root split is
    # {x} against the rest) and is measured so noisily that its own test cannot place it
    # apart. The structure below must still be tested: the two groups are found, and x is
    # left alone or joined to one of them, never merging them. Without peeling, the root's
    # non-rejection kept everything as one federation.
    import fedrnd.rnd.extract as extract

    rng = np.random.default_rng(0)
    g = np.concatenate([shuffled_groups([20, 20], seed=1), [2]])
    c = len(g)
    x = c - 1
    r = planted_statistic(g, rng)
    r[x, :x] = r[:x, x] = 0.8
    iu, ju = np.triu_indices(c, 1)
    se = np.where((iu == x) | (ju == x), 20.0, 0.03)

    def tree():
        return linkage_test_federations(c, iu, ju, r[iu, ju], se, np.full(len(iu), 30.0),
                                        alpha=0.01, min_effect=0.05)

    fed = tree()
    np.testing.assert_array_equal(canon(fed[:x]), canon(g[:x]))
    monkeypatch.setattr(extract, "PEEL", 0.0)
    assert tree().max() == 0  # the failure peeling removes


def test_t_sf_equals_scipys_t_sf_bit_for_bit():
    """The decision's p-values come from the bare ufunc; they must equal scipy.stats.t.sf
    exactly (cached decisions and stored results rest on them), edge values included."""
    from scipy.stats import t as student_t

    from fedrnd.rnd.stats import t_sf

    rng = np.random.default_rng(0)
    t = np.concatenate([rng.standard_normal(5000) * 4, [np.inf, -np.inf, np.nan, 0.0, 1e300,
                                                        -1e300, 1e-300]])
    df = np.concatenate([rng.integers(1, 200, 5000).astype(np.float64), [1, 1, 1, 1, 3, 3, 7]])
    a, b = t_sf(t, df), student_t.sf(t, df)
    assert np.array_equal(a, b, equal_nan=True)
    # Integer degrees of freedom and broadcasting, as the federation test uses them.
    counts = rng.integers(2, 64, 30)
    tt = rng.standard_normal((30, 5))
    assert np.array_equal(t_sf(tt, np.maximum(counts[:, None] - 1, 1)),
                          student_t.sf(tt, np.maximum(counts[:, None] - 1, 1)))
