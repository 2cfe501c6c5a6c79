"""RND discovery: the novelty matrix against a per-pair reference, tiling, probes, sparse
mode, the compatibility rule, federation extraction, automatic eps, recovery of known groups,
newcomers and errors."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from fedrnd.data import build_federated, digits, feature_pattern, iid
from fedrnd.engine import EdgeList, tree_bytes
from fedrnd.rnd import (
    RNDConfig,
    assign_newcomers,
    auto_eps,
    compatibility,
    discover,
    edge_novelty,
    federations,
    gap_eps,
    normalised_scores,
    novelty_matrix,
    probe_split,
    self_novelty,
    sigma_of,
    target_features,
    train_predictors,
)
from tests.rnd._data import grouped_gaussian, shuffled_groups

SMALL = RNDConfig(network="mlp", target_width=(16,), predictor_width=(4,), out_dim=8,
                  epochs=2, batch_size=8)


# --------------------------------------------------------------------------------------------
# the novelty matrix
# --------------------------------------------------------------------------------------------


def np_mlp(params, x):
    """Plain numpy forward of a flax MLP (Dense_0 .. Dense_L, ReLU between)."""
    h = np.asarray(x, np.float64).reshape(len(x), -1)
    names = sorted(params, key=lambda s: int(s.split("_")[1]))
    for k, name in enumerate(names):
        h = h @ np.asarray(params[name]["kernel"], np.float64) + np.asarray(params[name]["bias"])
        if k < len(names) - 1:
            h = np.maximum(h, 0.0)
    return h


@pytest.fixture(scope="module")
def small():
    """7 ragged clients (3 groups), trained SMALL predictors, cached targets."""
    data = grouped_gaussian([0, 1, 0, 2, 1, 0, 2], n=12, n_test=4, dim=3, seed=5)
    # Ragged: client c keeps 5 + c of its 12 rows.
    data = data.replace(train_count=jnp.arange(5, 12, dtype=jnp.int32))
    pair = SMALL.pair(data.feature_shape)
    tp = pair.target_params(SMALL.seed)
    t_pool = target_features(pair, tp, data.x)
    tr_idx, tr_cnt, pr_idx, pr_cnt = probe_split(data, "train", seed=1)
    preds, _ = train_predictors(pair, SMALL, data.x, t_pool, tr_idx, tr_cnt, jax.random.key(0))
    return dict(data=data, pair=pair, tp=tp, t=t_pool, preds=preds, pr_idx=pr_idx,
                pr_cnt=pr_cnt)


def reference_matrix(s, pr_idx, pr_cnt):
    """``S[i, j]``: a Python loop over pairs, numpy forward passes of target and predictor."""
    x = np.asarray(s["data"].x)
    c = len(pr_cnt)
    ref = np.zeros((c, c))
    for i in range(c):
        rows = pr_idx[i, : pr_cnt[i]]
        target = np_mlp(s["tp"], x[rows])
        for j in range(c):
            pj = jax.tree.map(lambda a, j=j: np.asarray(a[j]), s["preds"])
            ref[i, j] = np.mean(np.sum((np_mlp(pj, x[rows]) - target) ** 2, axis=1))
    return ref


def test_matrix_equals_per_pair_reference(small):
    s = small
    apply = s["pair"].predictor.apply
    got = np.asarray(novelty_matrix(apply, s["preds"], s["data"].x, s["t"], s["pr_idx"],
                                    s["pr_cnt"]))
    ref = reference_matrix(s, s["pr_idx"], s["pr_cnt"])
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-6)
    # The predictors were trained (not all equal to the common init) and rows differ.
    assert np.ptp(ref[0]) > 1e-3
    mean, std = self_novelty(apply, s["preds"], s["data"].x, s["t"], s["pr_idx"], s["pr_cnt"])
    np.testing.assert_allclose(np.asarray(mean), np.diag(ref), rtol=2e-5)
    x = np.asarray(s["data"].x)
    for i in range(len(ref)):
        rows = s["pr_idx"][i, : s["pr_cnt"][i]]
        pi = jax.tree.map(lambda a, i=i: np.asarray(a[i]), s["preds"])
        per = np.sum((np_mlp(pi, x[rows]) - np_mlp(s["tp"], x[rows])) ** 2, axis=1)
        np.testing.assert_allclose(float(std[i]), per.std(), rtol=1e-4)


@pytest.mark.parametrize("row_tile,col_tile", [(3, 2), (2, 5), (4, 3)])
def test_blockwise_equals_unblocked(small, row_tile, col_tile):
    s = small
    args = (s["pair"].predictor.apply, s["preds"], s["data"].x, s["t"], s["pr_idx"],
            s["pr_cnt"])
    whole = np.asarray(novelty_matrix(*args, row_tile=7, col_tile=7))
    tiled = np.asarray(novelty_matrix(*args, row_tile=row_tile, col_tile=col_tile))
    np.testing.assert_allclose(tiled, whole, rtol=1e-5, atol=1e-7)


def test_probe_cap_subsets_each_clients_rows(small):
    s = small
    data = s["data"]
    tr = np.asarray(data.train_idx)
    cnt = np.asarray(data.train_count)
    _, _, idx, pc = probe_split(data, "train", cap=6, seed=3)
    np.testing.assert_array_equal(pc, np.minimum(cnt, 6))
    assert idx.shape == (7, 6)
    for c in range(7):
        chosen = idx[c, : pc[c]]
        assert len(set(chosen.tolist())) == pc[c]
        assert set(chosen.tolist()) <= set(tr[c, : cnt[c]].tolist())
    # Clients with more than 6 rows get a random subset, not always their first rows.
    assert any(set(idx[c, :6].tolist()) != set(tr[c, :6].tolist()) for c in range(2, 7))
    apply = s["pair"].predictor.apply
    capped = np.asarray(novelty_matrix(apply, s["preds"], data.x, s["t"], idx, pc))
    np.testing.assert_allclose(capped, reference_matrix(s, idx, pc), rtol=2e-5, atol=1e-6)
    full = np.asarray(novelty_matrix(apply, s["preds"], data.x, s["t"], s["pr_idx"],
                                     s["pr_cnt"]))
    assert np.max(np.abs(capped[2:] - full[2:])) > 1e-4  # the cap really dropped samples
    np.testing.assert_allclose(capped[:2], full[:2], rtol=1e-5)  # <= 6 rows: unchanged


def test_holdout_and_test_probes():
    data = grouped_gaussian([0, 1, 0], n=9, n_test=3, dim=3)
    tr_idx, tr_cnt, pr_idx, pr_cnt = probe_split(data, "holdout", holdout=0.25, seed=0)
    np.testing.assert_array_equal(pr_cnt, [2, 2, 2])  # round(0.25 * 9)
    np.testing.assert_array_equal(tr_cnt, [7, 7, 7])
    for c in range(3):
        train, probe = set(tr_idx[c, :7].tolist()), set(pr_idx[c, :2].tolist())
        assert not train & probe
        assert train | probe == set(np.asarray(data.train_idx)[c].tolist())
    _, t_cnt, p_idx, p_cnt = probe_split(data, "test")
    np.testing.assert_array_equal(t_cnt, 9)
    assert set(p_idx[1].tolist()) == set(np.asarray(data.test_idx)[1].tolist())


def test_sparse_scores_equal_dense_entries(small):
    s = small
    apply = s["pair"].predictor.apply
    dense = np.asarray(novelty_matrix(apply, s["preds"], s["data"].x, s["t"], s["pr_idx"],
                                      s["pr_cnt"]))
    src = np.array([0, 1, 2, 3, 4, 5, 6, 3, 0, 6], np.int32)
    dst = np.array([1, 2, 3, 4, 5, 6, 0, 0, 5, 2], np.int32)
    edges = EdgeList(jnp.asarray(src), jnp.asarray(dst), jnp.ones(10))
    got = np.asarray(edge_novelty(apply, s["preds"], s["data"].x, s["t"], s["pr_idx"],
                                  s["pr_cnt"], edges, edge_chunk=3))
    np.testing.assert_allclose(got, dense[dst, src], rtol=1e-5)


def test_sparse_discovery_on_complete_graph_equals_dense():
    groups = shuffled_groups([5, 3, 4], seed=2)
    data = grouped_gaussian(groups, seed=2, shift_seed=2)
    cfg = RNDConfig(network="mlp", criterion="eps")  # the paper's rule: eps, sigma, z
    dense = discover(data, cfg)
    c = data.num_clients
    src, dst = np.meshgrid(np.arange(c), np.arange(c))
    # Self-loops and zero-weight padding edges in the list are ignored.
    src = np.concatenate([src.ravel(), [0, 0]])
    dst = np.concatenate([dst.ravel(), [0, 0]])
    w = np.concatenate([np.ones(c * c), [0.0, 0.0]])
    sparse = discover(data, cfg, edges=EdgeList(jnp.asarray(src), jnp.asarray(dst),
                                                jnp.asarray(w)))
    assert sparse.scores is None and sparse.edge_scores.shape == (c * (c - 1),)
    e_src, e_dst = np.asarray(sparse.edges.src), np.asarray(sparse.edges.dst)
    np.testing.assert_allclose(sparse.edge_scores, dense.scores[e_dst, e_src], rtol=1e-5)
    np.testing.assert_allclose(sparse.sigma, dense.sigma, rtol=1e-5)
    # eps="auto" differs by mode (silhouette over the dense matrix, largest gap over edges);
    # both cut between the same modes here, and the compatibilities agree entry by entry.
    assert dense.auto_silhouette > 0.5 and sparse.auto_silhouette is None
    np.testing.assert_array_equal(sparse.compatible, dense.z[e_dst, e_src] <= sparse.eps)
    np.testing.assert_array_equal(sparse.federation, dense.federation)
    assert adjusted_rand_score(groups, sparse.federation) == 1.0
    # Peer to peer: a predictor to each of the c - 1 neighbours, a score back to each.
    nb = tree_bytes(jax.tree.map(lambda a: a[0], sparse.predictors))
    np.testing.assert_array_equal(sparse.bytes_up, (c - 1) * (nb + 4))
    # A ring only: each client observes two neighbours and pays for two.
    ring = EdgeList(jnp.arange(c), (jnp.arange(c) + 1) % c, jnp.ones(c))
    r = discover(data, cfg, edges=ring)
    np.testing.assert_array_equal(r.bytes_down, nb + 4)
    assert r.edge_scores.shape == (c,)


# --------------------------------------------------------------------------------------------
# compatibility, federations, eps
# --------------------------------------------------------------------------------------------


def test_sigma_readings_and_rule():
    s = np.array([[1.0, 1.2, 5.0], [1.15, 1.0, 6.0], [4.0, 4.5, 2.0]])
    self_std = np.array([0.5, 0.1, 1.0])
    np.testing.assert_allclose(sigma_of("row", s, self_std), s.std(1))
    np.testing.assert_allclose(sigma_of("self", s, self_std), self_std)
    z = normalised_scores(s, np.diag(s), self_std)
    np.testing.assert_allclose(z[0], [0.0, 0.4, 8.0])
    comp = compatibility(z, 1.0)
    # s_ij <= s_ii + eps * sigma_i, row by row.
    expected = s <= np.diag(s)[:, None] + 1.0 * self_std[:, None]
    np.testing.assert_array_equal(comp, expected)
    assert not comp[1, 0] and comp[0, 1]  # 1.15 > 1.0 + 0.1; 1.2 <= 1.0 + 0.5
    # Zero spread: equal scores compatible, larger ones not.
    z0 = normalised_scores(np.array([[1.0, 1.0, 2.0]] * 3), np.ones(3), np.zeros(3))
    np.testing.assert_array_equal(z0[0], [0.0, 0.0, np.inf])


def test_extraction_rules_differ_on_a_chain():
    # 0~1 mutual, 1~2 mutual, 0 and 2 incompatible; 3 likes 2 but 2 not 3; 4 alone.
    c = np.eye(5, dtype=bool)
    for i, j in [(0, 1), (1, 0), (1, 2), (2, 1), (3, 2)]:
        c[i, j] = True
    s_self = np.array([0.5, 0.1, 0.3, 0.2, 0.9])
    np.testing.assert_array_equal(federations(c, "mutual"), [0, 0, 0, 1, 2])
    np.testing.assert_array_equal(federations(c, "one_sided"), [0, 0, 0, 0, 1])
    # Leader 1 (lowest self-novelty) takes 0 and 2; then 3, then 4 lead alone.
    np.testing.assert_array_equal(federations(c, "leader", s_self), [0, 0, 0, 1, 2])
    s_self2 = np.array([0.1, 0.5, 0.3, 0.2, 0.9])  # leader 0 takes only 1; 2 is left over
    np.testing.assert_array_equal(federations(c, "leader", s_self2), [0, 0, 1, 2, 3])
    with pytest.raises(ValueError, match="needs s_self"):
        federations(c, "leader")


def test_dense_and_sparse_extraction_agree():
    from scipy.sparse import csr_matrix

    rng = np.random.default_rng(0)
    for _ in range(30):
        c = int(rng.integers(1, 25))
        comp = rng.random((c, c)) < rng.uniform(0.0, 0.3)
        np.fill_diagonal(comp, True)
        s_self = rng.random(c)
        for rule in ("mutual", "one_sided", "leader"):
            np.testing.assert_array_equal(federations(comp, rule, s_self),
                                          federations(csr_matrix(comp), rule, s_self))


def test_gap_eps_criterion():
    rng = np.random.default_rng(0)
    # Two modes: same-distribution peers near 0, others near 3, empty band between.
    z = np.concatenate([rng.uniform(-0.2, 0.3, 60), rng.uniform(2.0, 4.0, 180)])
    e = gap_eps(z)
    assert 0.3 < e < 2.0
    assert e == pytest.approx(0.5 * (np.sort(z)[59] + np.sort(z)[60]))
    # One unimodal population: no gap dominates its spread -> above every score.
    u = rng.normal(size=240)
    assert gap_eps(u) > u.max()
    # A gap narrower than the low mode's own spread does not count.
    z2 = np.concatenate([rng.uniform(0.0, 1.0, 60), rng.uniform(1.6, 3.0, 180)])
    assert gap_eps(z2) > z2.max()
    # A gap below zero (some peers look more familiar than one's own data) is never a cut.
    z3 = np.concatenate([rng.uniform(-3.0, -2.9, 60), rng.uniform(0.0, 0.5, 180)])
    assert gap_eps(z3) > 0.5 or gap_eps(z3) == pytest.approx(0.0)
    assert gap_eps(np.array([])) == 0.0


def _block_scores(groups, rng, within=(-0.2, 0.3), between=(2.0, 4.0)):
    g = np.asarray(groups)
    same = g[:, None] == g[None, :]
    z = np.where(same, rng.uniform(*within, same.shape), rng.uniform(*between, same.shape))
    np.fill_diagonal(z, 0.0)
    return z


def _silhouette(d, lab):
    """Per-client loops: silhouette with b over other federations of >= 2 clients only."""
    c = len(lab)
    sizes = np.bincount(lab)
    out = np.zeros(c)
    for i in range(c):
        if sizes[lab[i]] < 2:
            continue
        a = sum(d[i, j] for j in range(c) if lab[j] == lab[i] and j != i) / (sizes[lab[i]] - 1)
        others = [np.mean([d[i, j] for j in range(c) if lab[j] == f])
                  for f in range(len(sizes)) if f != lab[i] and sizes[f] >= 2]
        if others and max(a, min(others)) > 0:
            out[i] = (min(others) - a) / max(a, min(others))
    return out.mean()


def _silhouette_reference(z, rule="mutual"):
    """Brute force: every distinct eps, federations by the rule, their silhouette."""
    d = np.maximum(z, z.T) if rule == "mutual" else np.minimum(z, z.T)
    d = np.maximum(d, 0.0)
    np.fill_diagonal(d, 0.0)
    vals = np.unique(d[~np.eye(len(z), dtype=bool)])
    best = (-np.inf, None)
    for e in 0.5 * (vals[1:] + vals[:-1]):
        comp = compatibility(z, e)
        np.fill_diagonal(comp, True)
        lab = federations(comp, rule)
        if 2 <= lab.max() + 1 <= len(z) - 1:
            sc = _silhouette(d, lab)
            if sc > best[0]:
                best = (sc, lab)
    return best


@pytest.mark.parametrize("sizes", [(4, 4, 4), (10, 5, 3), (6, 1, 2, 3), (20, 2)])
def test_auto_eps_recovers_separated_groups_and_matches_brute_force_silhouette(sizes):
    rng = np.random.default_rng(len(sizes))
    groups = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    z = _block_scores(groups, rng)
    eps, score = auto_eps(z, return_score=True)
    assert 0.3 < eps < 2.0
    comp = compatibility(z, eps)
    np.fill_diagonal(comp, True)
    lab = federations(comp)
    assert adjusted_rand_score(groups, lab) == 1.0
    ref_score, ref_lab = _silhouette_reference(z)
    assert score == pytest.approx(ref_score, rel=1e-5)
    assert adjusted_rand_score(ref_lab, lab) == 1.0


def test_auto_eps_brute_force_on_noisy_scores_and_one_sided_rule():
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(3), [5, 4, 3])
    z = _block_scores(groups, rng, within=(-0.5, 1.2), between=(0.8, 3.0))
    for rule in ("mutual", "one_sided"):
        eps, score = auto_eps(z, rule=rule, return_score=True, min_silhouette=-1.0)
        ref_score, ref_lab = _silhouette_reference(z, rule)
        assert score == pytest.approx(ref_score, rel=1e-5)
        comp = compatibility(z, eps)
        np.fill_diagonal(comp, True)
        assert adjusted_rand_score(ref_lab, federations(comp, rule)) == 1.0


def test_auto_eps_keeps_unstructured_populations_whole():
    rng = np.random.default_rng(0)
    for c in (5, 12, 60):
        z = rng.normal(1.0, 0.5, (c, c))
        np.fill_diagonal(z, 0.0)
        eps, score = auto_eps(z, return_score=True)
        assert score < 0.5 and eps > z.max()
    # one far outlier in an otherwise uniform population is not structure
    z = rng.normal(1.0, 0.3, (40, 40))
    z[7, :] += 20.0
    z[:, 7] += 20.0
    np.fill_diagonal(z, 0.0)
    eps, score = auto_eps(z, return_score=True)
    assert score < 0.1 and eps > z.max()
    # fewer than three clients: no candidate, one federation
    assert auto_eps(np.array([[0.0, 3.0], [3.0, 0.0]])) > 3.0
    assert np.isnan(auto_eps(np.zeros((1, 1)), return_score=True)[1])
    with pytest.raises(ValueError, match="square"):
        auto_eps(np.zeros(5))
    with pytest.raises(ValueError, match="rule"):
        auto_eps(np.zeros((3, 3)), rule="nearest")


def test_auto_eps_sampled_silhouette_and_infinite_scores():
    rng = np.random.default_rng(1)
    groups = rng.permutation(np.repeat(np.arange(4), [120, 90, 60, 30]))
    z = _block_scores(groups, rng).astype(np.float32)
    z[5, 7] = np.inf  # a zero-spread row's larger score
    eps_full, s_full = auto_eps(z, return_score=True)
    eps_s, s_s = auto_eps(z, return_score=True, sample=80)
    for e in (eps_full, eps_s):
        comp = compatibility(z, e)
        np.fill_diagonal(comp, True)
        assert adjusted_rand_score(groups, federations(comp)) == 1.0
    assert s_s == pytest.approx(s_full, abs=0.05)


# --------------------------------------------------------------------------------------------
# discovery end to end
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[8, 4, 2, 2], [1, 5, 10], [3, 13]])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_separated_groups_exactly(sizes, seed):
    groups = shuffled_groups(sizes, seed)
    data = grouped_gaussian(groups, shift_seed=seed, seed=seed)
    res = discover(data, RNDConfig(network="mlp", criterion="eps"))
    assert adjusted_rand_score(groups, res.federation) == 1.0, (res.federation, res.eps)
    assert res.num_federations == len(sizes)
    # Every row shows the structure: in-group novelty below cross-group novelty.
    same = groups[:, None] == groups[None, :]
    inf = np.inf
    assert np.all(np.where(same, res.scores, -inf).max(1) < np.where(same, inf, res.scores).min(1))
    # The alternative extraction rules agree here; a fixed eps between the modes too.
    for rule in ("one_sided", "leader"):
        fed = federations(res.compatible, rule, res.self_novelty)
        assert adjusted_rand_score(groups, fed) == 1.0
    if seed == 0:
        fixed = discover(data, RNDConfig(network="mlp", criterion="eps", eps=res.eps))
        np.testing.assert_array_equal(fixed.federation, res.federation)


def test_bytes_follow_the_protocol():
    data = grouped_gaussian(shuffled_groups([8, 4, 2, 2], 0))
    # The paper's protocol: one row of scores up (the test criterion also sends Q's row).
    res = discover(data, RNDConfig(network="mlp", criterion="eps"))
    nb = tree_bytes(jax.tree.map(lambda a: a[0], res.predictors))
    assert nb == (6 * 32 + 32 + 32 * 64 + 64) * 4
    np.testing.assert_array_equal(res.bytes_up, nb + 16 * 4)
    np.testing.assert_array_equal(res.bytes_down, 15 * nb)
    assert res.scores.shape == (16, 16) and res.self_novelty.shape == (16,)
    assert np.all(np.isfinite(res.train_loss))


def test_iid_population_is_not_fragmented():
    for seed in range(3):
        data = grouped_gaussian(np.zeros(16, np.int32), seed=seed, shift_seed=seed)
        res = discover(data, RNDConfig(network="mlp"))
        assert res.num_federations == 1, res.eps
    # Different samples of one image distribution, conv predictors.
    d = digits()
    res = discover(build_federated(d, iid(d, 12, seed=0)), RNDConfig(network="conv"))
    assert res.num_federations == 1


def test_conv_discovery_on_feature_patterns():
    d = digits()
    data = build_federated(d, feature_pattern(d, 12, num_groups=3, seed=0,
                                              group_sizes=[2, 4, 6], rms=0.5))
    res = discover(data, RNDConfig(network="auto"))
    assert res.pair.kind == "conv"
    assert adjusted_rand_score(np.asarray(data.group), res.federation) == 1.0


def test_single_client_forms_its_own_federation():
    data = grouped_gaussian([3], n=20)
    res = discover(data, RNDConfig(network="mlp"))
    np.testing.assert_array_equal(res.federation, [0])
    assert res.scores.shape == (1, 1) and res.num_federations == 1
    assert res.bytes_down[0] == 0.0


def test_newcomers_join_their_groups_federation():
    groups = shuffled_groups([5, 4, 3], seed=1)
    data = grouped_gaussian(groups, shift_seed=1, seed=1)
    res = discover(data, RNDConfig(network="mlp"))
    assert adjusted_rand_score(groups, res.federation) == 1.0
    fed_of_group = {g: int(res.federation[groups == g][0]) for g in range(3)}
    # New clients of groups 2, 0, 1, 0 (fresh samples) and two of a group never seen.
    new = grouped_gaussian([2, 0, 1, 0, 5, 5], shift_seed=1, seed=99)
    got = assign_newcomers(res, new)
    np.testing.assert_array_equal(got[:4], [fed_of_group[g] for g in (2, 0, 1, 0)])
    assert got[4] == got[5] == res.num_federations  # together, in a new federation


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [-0.1, float("nan"), float("inf"), "large", None])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps must be"):
        RNDConfig(eps=eps)
    with pytest.raises(ValueError, match="eps must be"):
        compatibility(np.zeros((2, 2)), eps)


def test_bad_options():
    for kw, msg in [(dict(sigma="col"), "sigma"), (dict(rule="kmeans"), "rule"),
                    (dict(probe="valid"), "probe"), (dict(holdout=1.0), "holdout"),
                    (dict(probe_cap=0), "probe_cap"), (dict(epochs=0), "epochs")]:
        with pytest.raises(ValueError, match=msg):
            RNDConfig(**kw)


def test_empty_clients_and_shapes(small):
    s = small
    data = s["data"]
    empty = data.replace(train_count=data.train_count.at[3].set(0))
    with pytest.raises(ValueError, match=r"client\(s\) \[3\] have no training examples"):
        discover(empty, SMALL)
    no_test = data.replace(test_count=data.test_count.at[1].set(0))
    with pytest.raises(ValueError, match="no test examples"):
        probe_split(no_test, "test")
    one = data.replace(train_count=data.train_count.at[0].set(1))
    with pytest.raises(ValueError, match="holdout.*>= 2"):
        probe_split(one, "holdout")
    apply = s["pair"].predictor.apply
    with pytest.raises(ValueError, match="target outputs have 5 rows"):
        novelty_matrix(apply, s["preds"], data.x, s["t"][:5], s["pr_idx"], s["pr_cnt"])
    with pytest.raises(ValueError, match="probe_idx must be"):
        novelty_matrix(apply, s["preds"], data.x, s["t"], s["pr_idx"], s["pr_cnt"][:4])
    with pytest.raises(ValueError, match="7 predictors but probes for 4"):
        self_novelty(apply, s["preds"], data.x, s["t"], s["pr_idx"][:4], s["pr_cnt"][:4])
    with pytest.raises(ValueError, match="no probe examples"):
        novelty_matrix(apply, s["preds"], data.x, s["t"], s["pr_idx"],
                       np.zeros_like(s["pr_cnt"]))
    with pytest.raises(ValueError, match="client ids"):
        edge_novelty(apply, s["preds"], data.x, s["t"], s["pr_idx"], s["pr_cnt"],
                     EdgeList(jnp.array([0]), jnp.array([9]), jnp.ones(1)))
    with pytest.raises(ValueError, match="must be square"):
        federations(np.ones((2, 3), bool))
    res = discover(data, SMALL)
    other = grouped_gaussian([0, 1], dim=4)
    with pytest.raises(ValueError, match="newcomers have features"):
        assign_newcomers(res, other)
    with pytest.raises(ValueError, match="conv RND pair needs image features"):
        discover(data, RNDConfig(network="conv"))


def test_common_init_by_default_per_client_init_as_option():
    # Two clients holding the same rows: with one full batch per step their gradients match,
    # so predictors from a common init stay identical; per-client inits make them differ.
    data = grouped_gaussian([0, 0], n=10, dim=3)
    data = data.replace(train_idx=jnp.stack([data.train_idx[0]] * 2))
    pair = SMALL.pair(data.feature_shape)
    t = target_features(pair, pair.target_params(0), data.x)
    tr_idx, tr_cnt, _, _ = probe_split(data, "train")
    for per_client, same in [(False, True), (True, False)]:
        cfg = RNDConfig(network="mlp", target_width=(16,), predictor_width=(4,), out_dim=8,
                        epochs=3, batch_size=16, per_client_init=per_client)
        preds, _ = train_predictors(pair, cfg, data.x, t, tr_idx, tr_cnt, jax.random.key(0))
        k = np.asarray(preds["Dense_0"]["kernel"])
        assert np.allclose(k[0], k[1], atol=1e-6) == same


def test_min_steps_lengthens_short_epoch_schedules_only():
    cfg = RNDConfig(epochs=10, batch_size=128)
    assert cfg.schedule(64).steps == 300  # 10 epochs of one batch = 10 steps < 300
    big = cfg.schedule(128 * 40)  # 400 steps per the epochs: kept
    assert big.steps is None and big.total_steps(128 * 40) == 400
    assert RNDConfig(min_steps=None).schedule(64).total_steps(64) == 10
    assert RNDConfig(steps=50).schedule(64).steps == 50  # explicit steps win
    with pytest.raises(ValueError, match="min_steps"):
        RNDConfig(min_steps=0)


def test_input_pool_equals_discovery_on_pooled_images_and_checks_newcomers():
    # input_pool = 2 is discovery on 2x2-averaged images: the same scores and federations as
    # pooling the pool by hand (28x28 digits upsampled: 8x8 -> 16x16 by repetition, so the
    # 2x2 means give back the original digits exactly).
    d = digits()
    data = build_federated(d, feature_pattern(d, 12, num_groups=3, seed=0,
                                              group_sizes=[2, 4, 6], rms=0.5))
    big = data.replace(x=jnp.repeat(jnp.repeat(data.x, 2, axis=1), 2, axis=2))
    cfg = RNDConfig(network="mlp", steps=60)
    pooled = discover(big, dataclasses.replace(cfg, input_pool=2))
    plain = discover(data, cfg)
    assert pooled.pair.feature_shape == plain.pair.feature_shape == tuple(data.x.shape[1:])
    np.testing.assert_allclose(pooled.scores, plain.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(pooled.federation, plain.federation)
    # Newcomers are pooled the same way, and must have the discovery's image size.
    np.testing.assert_array_equal(assign_newcomers(pooled, big), assign_newcomers(plain, data))
    with pytest.raises(ValueError, match="newcomers have features"):
        assign_newcomers(pooled, data)
    with pytest.raises(ValueError, match="input_pool"):
        discover(grouped_gaussian([0, 1], n=10), RNDConfig(network="mlp", input_pool=2))
    with pytest.raises(ValueError, match="input_pool"):
        RNDConfig(input_pool=0)


def test_input_pool_auto_pools_the_mlp_pair_on_large_images_only():
    # "auto": 2 for the MLP pair on images of at least 28 x 28 pixels, else full resolution
    # (the conv pair, small images and vectors). The default network is the MLP pair.
    assert RNDConfig().network == "mlp" and RNDConfig().pair((28, 28, 1)).kind == "mlp"
    assert RNDConfig().pool_factor((28, 28, 1)) == 2
    mlp, auto = RNDConfig(network="mlp"), RNDConfig(network="auto")
    assert auto.pair((28, 28, 1)).kind == "conv" and auto.pair((10,)).kind == "mlp"
    assert mlp.pool_factor((28, 28, 1)) == 2 and mlp.pair((28, 28, 1)).feature_shape == (14, 14, 1)
    assert mlp.pool_factor((32, 32, 3)) == 2
    assert mlp.pool_factor((8, 8, 1)) == 1 and mlp.pool_factor((27, 40, 1)) == 1
    assert mlp.pool_factor((784,)) == 1
    assert auto.pool_factor((28, 28, 1)) == 1  # "auto" network: conv on images
    assert RNDConfig(network="conv").pool_factor((32, 32, 3)) == 1
    assert RNDConfig(network="mlp", input_pool=1).pool_factor((28, 28, 1)) == 1
    assert RNDConfig(network="conv", input_pool=2).pool_factor((28, 28, 1)) == 2
    with pytest.raises(ValueError, match="'auto'"):
        RNDConfig(input_pool="half")
