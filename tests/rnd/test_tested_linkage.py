"""The default federation extraction: an average-linkage tree of the symmetrised relative excess
split top-down by a group test (``fedrnd.rnd.linkage_test_federations``)."""

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from fedrnd.rnd import federations, linkage_test_federations


def _pairs(c):
    return np.triu_indices(c, 1)


def _block_stat(groups, between=0.5, se=0.05, seed=0):
    """Symmetric pair statistic: 0 within groups, ``between`` across, plus N(0, se^2) noise."""
    rng = np.random.default_rng(seed)
    g = np.asarray(groups)
    c = len(g)
    r = rng.normal(0.0, se, (c, c))
    stat = 0.5 * (r + r.T) + between * (g[:, None] != g[None, :])
    i, j = _pairs(c)
    return i, j, stat[i, j], np.full(len(i), se / np.sqrt(2)), np.full(len(i), 15.0)


def _fed(c, i, j, s, e, d, **kw):
    kw.setdefault("alpha", 0.01)
    kw.setdefault("min_effect", 0.05)
    return linkage_test_federations(c, i, j, s, e, d, **kw)


@pytest.mark.parametrize("c", [12, 200, 2000])
def test_one_distribution_is_not_split_at_any_population_size(c):
    # Pure measurement noise around 0 and no minimum effect (the strictest setting): the
    # root test must keep the population whole; tried on several draws.
    trials = {12: 40, 200: 10, 2000: 2}[c]
    splits = 0
    for seed in range(trials):
        i, j, s, e, d = _block_stat(np.zeros(c, int), se=0.05, seed=seed)
        splits += _fed(c, i, j, s, e, d, min_effect=0.0).max() > 0
    assert splits <= max(1, 0.01 * trials)


def test_groups_of_very_unequal_sizes_are_recovered_exactly():
    sizes = [120, 40, 10, 3, 3, 4]
    g = np.repeat(np.arange(len(sizes)), sizes)
    g = np.random.default_rng(1).permutation(g)
    fed = _fed(len(g), *_block_stat(g, between=0.4, se=0.05, seed=1))
    assert adjusted_rand_score(g, fed) == 1.0


def test_one_planted_false_link_does_not_merge_two_groups():
    g = np.repeat([0, 1], 5)
    c = len(g)
    i, j, s, e, d = _block_stat(g, between=0.5, se=0.02, seed=3)
    k = np.flatnonzero((i == 0) & (j == 7))[0]  # client 0 (group 0) and 7 (group 1)
    s = s.copy()
    s[k] = -0.1  # the false link looks even better than a same-group pair
    fed = _fed(c, i, j, s, e, d)
    # No federation holds two or more clients of each group, and everyone but the two
    # falsely linked clients is where they belong.
    for f in np.unique(fed):
        assert min(np.sum((fed == f) & (g == 0)), np.sum((fed == f) & (g == 1))) <= 1
    rest = np.setdiff1d(np.arange(c), [0, 7])
    assert adjusted_rand_score(g[rest], fed[rest]) == 1.0
    # The paper's components (single linkage) on the same scores do merge them: the property
    # is not trivial.
    comp = np.zeros((c, c), bool)
    comp[i, j] = comp[j, i] = s < 0.25
    np.fill_diagonal(comp, True)
    assert federations(comp, "mutual").max() == 0


def test_outliers_become_singletons_and_leave_the_others_unchanged():
    g = np.random.default_rng(4).permutation(np.repeat(np.arange(3), [30, 20, 10]))
    c = len(g)
    base = _fed(c, *_block_stat(g, between=0.4, se=0.05, seed=5))
    # Six outliers, each its own distribution: far from everyone, and from each other.
    g2 = np.concatenate([g, 3 + np.arange(6)])
    fed = _fed(len(g2), *_block_stat(g2, between=0.4, se=0.05, seed=5))
    assert adjusted_rand_score(g2, fed) == 1.0
    assert len(np.unique(fed[c:])) == 6 and not np.isin(fed[c:], fed[:c]).any()
    assert adjusted_rand_score(base, fed[:c]) == 1.0


def test_a_shift_too_weak_for_most_single_pairs_is_found_between_two_groups():
    # Between-group excess 0.1 with a pair standard error of 0.05: most pairs alone are not
    # significant at 0.01, but 2 x 50 clients pool the evidence.
    g = np.repeat([0, 1], 50)
    i, j, s, e, d = _block_stat(g, between=0.1, se=0.05 * np.sqrt(2), seed=6)
    from scipy.stats import t as student_t

    p_pair = student_t.sf(s / e, d)
    assert np.mean(p_pair[g[i] != g[j]] <= 0.01) < 0.5
    fed = _fed(len(g), i, j, s, e, d, min_effect=0.0)
    assert adjusted_rand_score(g, fed) == 1.0


def test_sparse_tree_equals_dense_when_every_pair_is_observed():
    g = np.random.default_rng(7).permutation(np.repeat(np.arange(4), [20, 15, 10, 5]))
    args = _block_stat(g, between=0.3, se=0.08, seed=8)
    dense = _fed(len(g), *args, dense=True)
    sparse = _fed(len(g), *args, dense=False)
    np.testing.assert_array_equal(dense, sparse)
    assert adjusted_rand_score(g, dense) == 1.0


def test_sparse_tree_with_random_cross_peers_is_not_merged_by_one_false_link():
    # Two-stage shape: each group fully observed inside, every client also scored against two
    # random clients of the other group (the random peers), and one false link that looks
    # better than any clean pair.
    rng = np.random.default_rng(9)
    g = np.repeat([0, 1], 8)
    c = len(g)
    i, j, s, e, d = _block_stat(g, between=0.5, se=0.05, seed=9)
    keep = g[i] == g[j]
    for k in range(c):
        for o in rng.choice(np.flatnonzero(g != g[k]), 2, replace=False):
            keep |= (i == min(k, o)) & (j == max(k, o))
    link = (i == 0) & (j == 8)
    keep |= link
    s = np.where(link, s.min() - 0.05, s)
    fed = _fed(c, i[keep], j[keep], s[keep], e[keep], d[keep], dense=False)
    assert adjusted_rand_score(g, fed) == 1.0


def test_rejects_repeated_pairs_and_bad_alpha():
    i, j, s, e, d = _block_stat(np.zeros(5, int))
    with pytest.raises(ValueError, match="each unordered pair once"):
        linkage_test_federations(5, np.r_[i, i[:1]], np.r_[j, j[:1]], np.r_[s, s[:1]],
                                   np.r_[e, e[:1]], np.r_[d, d[:1]])
    with pytest.raises(ValueError, match="alpha"):
        linkage_test_federations(5, i, j, s, e, d, alpha=1.5)


def _continuum_stat(pos, scale=1.0, se=0.02, seed=0):
    """Pair statistic of a continuum: clients at positions ``pos [C, D]`` (every client its
    own distribution), ``R_ij = scale * |pos_i - pos_j|`` plus measurement noise."""
    rng = np.random.default_rng(seed)
    c = len(pos)
    dist = np.linalg.norm(pos[:, None, :] - pos[None, :, :], axis=-1)
    noise = rng.normal(0.0, se, (c, c))
    stat = scale * dist + 0.5 * (noise + noise.T)
    i, j = _pairs(c)
    return i, j, stat[i, j], np.full(len(i), se / np.sqrt(2)), np.full(len(i), 15.0)


@pytest.mark.parametrize("dim", [1, 3])
def test_a_continuum_stays_one_federation_only_because_of_the_homogeneity_check(dim):
    # Clients spread uniformly over a cube: every pair differs (most pair tests reject), but
    # no split yields homogeneous groups. The check keeps the population whole; without it
    # the tree cuts the continuum into many arbitrary pieces.
    rng = np.random.default_rng(dim)
    pos = rng.uniform(0.0, 1.0, (150, dim))
    args = _continuum_stat(pos, seed=dim)
    assert _fed(150, *args).max() == 0
    assert _fed(150, *args, within_ratio=np.inf).max() >= 3


def test_two_separated_continua_are_two_federations_each_kept_whole():
    # The check works per split: each continuum is kept whole, the wide gap between them
    # still splits the population.
    rng = np.random.default_rng(5)
    a = rng.uniform(0.0, 1.0, (80, 2))
    b = rng.uniform(0.0, 1.0, (80, 2)) + np.array([6.0, 0.0])
    g = np.repeat([0, 1], 80)
    fed = _fed(160, *_continuum_stat(np.concatenate([a, b]), scale=0.3, seed=5))
    assert adjusted_rand_score(g, fed) == 1.0


def test_homogeneity_check_leaves_discrete_groups_alone():
    # Groups whose members are identical up to noise: every ratio W / B is near 0, the
    # decision is the same with and without the check.
    sizes = [60, 30, 10, 5, 3]
    g = np.random.default_rng(2).permutation(np.repeat(np.arange(len(sizes)), sizes))
    args = _block_stat(g, between=0.3, se=0.05, seed=2)
    with_check = _fed(len(g), *args)
    np.testing.assert_array_equal(with_check, _fed(len(g), *args, within_ratio=np.inf))
    assert adjusted_rand_score(g, with_check) == 1.0
    with pytest.raises(ValueError, match="within_ratio"):
        _fed(len(g), *args, within_ratio=0.0)
