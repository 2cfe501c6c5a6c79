"""Spectral clustering of communication graphs (SSD-FL's set-up): Laplacians and Fiedler
vectors against dense numpy eigensolves; the sweep cut against a brute force over all prefixes;
two dense communities joined by one edge are split exactly; homogeneous graphs stay whole;
heterogeneity drives a split the graph alone would not make; the fixed-K and random ablations;
errors for disconnected graphs and unreachable K."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from fedrnd.graphs import adjacency, make_topology
from fedrnd.graphs.spectral import (
    client_descriptors,
    fiedler_vector,
    laplacian,
    random_clusters,
    spectral_clusters,
    sweep_cut,
)


def communities(sizes, p=0.7, bridges=None, seed=0):
    """Dense random communities (each connected) chained by single edges, nodes shuffled.

    Returns ``(adj, label)``."""
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    a = np.zeros((n, n), np.int8)
    start = np.concatenate([[0], np.cumsum(sizes)])
    for s, e in zip(start[:-1], start[1:], strict=True):
        for i in range(s, e):
            a[i, i + 1 if i + 1 < e else s] = 1  # a cycle keeps the community connected
            for j in range(i + 1, e):
                if rng.random() < p:
                    a[i, j] = 1
    for k in range(len(sizes) - 1):  # one edge between consecutive communities
        a[rng.integers(start[k], start[k + 1]), rng.integers(start[k + 1], start[k + 2])] = 1
    a = np.maximum(a, a.T)
    np.fill_diagonal(a, 0)
    label = np.repeat(np.arange(len(sizes)), sizes)
    perm = rng.permutation(n)
    return a[perm][:, perm], label[perm]


def same_partition(a, b):
    pairs_a = a[:, None] == a[None, :]
    pairs_b = b[:, None] == b[None, :]
    return bool(np.all(pairs_a == pairs_b))


@pytest.mark.parametrize("sizes,seed", [((12, 15), 0), ((20, 8), 1), ((30, 30), 2), ((5, 40), 3)])
def test_two_dense_communities_joined_by_one_edge_are_split_exactly(sizes, seed):
    a, label = communities(sizes, seed=seed)
    res = spectral_clusters(a, min_size=4)
    assert res.num_clusters == 2
    assert same_partition(res.cluster_id, label)
    assert res.splits[0]["gamma"] > 5  # the bridge is the bottleneck: each side mixes far faster


def test_a_chain_of_four_communities_gives_four_clusters():
    a, label = communities((10, 14, 9, 12), seed=5)
    res = spectral_clusters(a)
    assert res.num_clusters == 4
    assert same_partition(res.cluster_id, label)


@pytest.mark.parametrize("name,opts,n", [("ring", {}, 60), ("grid", {"rows": 6}, 48),
                                         ("complete", {}, 20)])
def test_homogeneous_graphs_are_not_split(name, opts, n):
    g = make_topology(name, n, **opts).static(jax.random.key(0))
    res = spectral_clusters(g)
    assert res.num_clusters == 1
    assert res.rejected and res.rejected[0]["score"] < 0.5


def test_fiedler_vector_solves_the_generalised_problem_and_matches_numpy():
    g = make_topology("random_geometric", 40, radius=0.35).static(jax.random.key(3))
    a = adjacency(g).astype(float)
    lam, v = fiedler_vector(a)
    deg = a.sum(1)
    lap = np.diag(deg) - a
    np.testing.assert_allclose(lap @ v, lam * deg * v, atol=1e-8)
    # lambda_2 of the normalised Laplacian, by numpy on the dense matrix
    ns = np.eye(40) - a / np.sqrt(np.outer(deg, deg))
    np.testing.assert_allclose(lam, np.linalg.eigvalsh(ns)[1], rtol=1e-8)
    np.testing.assert_allclose(laplacian(a, normalized=True).toarray(), ns, atol=1e-12)
    np.testing.assert_allclose(laplacian(a).toarray(), lap)


def test_sweep_cut_equals_brute_force_over_prefixes():
    rng = np.random.default_rng(0)
    g = make_topology("erdos_renyi", 16, p=0.3).static(jax.random.key(1))
    a0 = adjacency(g).astype(float)
    w = np.triu(a0 * rng.uniform(0.1, 1.0, a0.shape), 1)
    w = w + w.T
    order = rng.permutation(16)
    for min_size in (1, 3):
        k, phi = sweep_cut(sp.csr_matrix(w), order, min_size=min_size,
                           connectivity=sp.csr_matrix(a0))
        best = (np.inf, 0)
        for kk in range(min_size, 16 - min_size + 1):
            side = np.zeros(16, bool)
            side[order[:kk]] = True
            conn = all(connected_components(sp.csr_matrix(a0[m][:, m]))[0] == 1
                       for m in (side, ~side))
            if not conn:
                continue
            cut = w[side][:, ~side].sum()
            val = cut / min(w[side].sum(), w[~side].sum())
            if val < best[0] - 1e-12:
                best = (val, kk)
        assert np.isclose(phi, best[0])
        side_k = np.zeros(16, bool)
        side_k[order[:k]] = True
        assert np.isclose(w[side_k][:, ~side_k].sum() / min(w[side_k].sum(), w[~side_k].sum()),
                          best[0])


class _Data:
    """The few fields client_descriptors reads."""

    def __init__(self, x, y, idx, count, num_classes):
        self.x, self.y, self.train_idx, self.train_count = x, y, idx, count
        self.num_classes = num_classes


def test_heterogeneity_splits_a_ring_where_the_graph_alone_would_not():
    n, per = 32, 10
    rng = np.random.default_rng(0)
    # Nodes 0..15 hold classes 0/1, nodes 16..31 classes 2/3: two contiguous arcs of the ring.
    y = np.concatenate([rng.integers(0, 2, per) if i < 16 else rng.integers(2, 4, per)
                        for i in range(n)]).astype(np.int32)
    x = rng.normal(size=(n * per, 3)).astype(np.float32)
    data = _Data(x, y, np.arange(n * per).reshape(n, per), np.full(n, per), 4)
    desc = client_descriptors(data, labels=1.0, inputs=0.0)
    g = make_topology("ring", n).static(jax.random.key(0))
    assert spectral_clusters(g).num_clusters == 1
    res = spectral_clusters(g, desc)
    assert res.num_clusters == 2
    assert same_partition(res.cluster_id, (np.arange(n) >= 16).astype(int))
    assert res.splits[0]["rho"] > 0.8
    # Optimizer heterogeneity alone does the same.
    res = spectral_clusters(g, client_descriptors(data, np.arange(n) >= 16, labels=0.0,
                                                  inputs=0.0))
    assert same_partition(res.cluster_id, (np.arange(n) >= 16).astype(int))


def test_descriptor_blocks_have_unit_variance_and_constant_blocks_vanish():
    rng = np.random.default_rng(1)
    n, per = 12, 6
    data = _Data(rng.normal(size=(n * per, 2, 2)).astype(np.float32),
                 rng.integers(0, 3, n * per).astype(np.int32),
                 np.arange(n * per).reshape(n, per), np.array([6] * 6 + [4] * 6), 3)
    d = client_descriptors(data, np.zeros(n, int), labels=1.0, inputs=2.0, optimizer=1.0)
    assert d.shape == (n, 3 + 4 + 1)
    # label block: histograms over each node's real examples only
    y = data.y.reshape(n, per)
    hist = np.stack([np.bincount(y[i, :data.train_count[i]], minlength=3) / data.train_count[i]
                     for i in range(n)])
    c = hist - hist.mean(0)
    np.testing.assert_allclose(d[:, :3], c / np.sqrt(np.mean(np.sum(c * c, 1))), atol=1e-10)
    assert np.isclose(np.mean(np.sum(d[:, 3:7] ** 2, 1)), 4.0)  # weight 2 -> variance 4
    assert np.all(d[:, 7] == 0)  # every node has the same optimizer


def test_fixed_number_of_clusters_gives_k_connected_clusters():
    g = make_topology("random_geometric", 120, radius=0.2).static(jax.random.key(2))
    a = adjacency(g)
    for k in (2, 3, 5, 8):
        res = spectral_clusters(g, num_clusters=k, min_size=4)
        assert res.num_clusters == k
        assert len(res.splits) == k - 1
        for c in range(k):
            m = res.cluster_id == c
            assert m.sum() >= 4
            assert connected_components(sp.csr_matrix(a[m][:, m]))[0] == 1


def test_max_clusters_caps_the_criterion():
    a, _ = communities((10, 14, 9, 12), seed=5)
    assert spectral_clusters(a, max_clusters=2).num_clusters == 2


def test_random_clusters_are_balanced_and_seeded():
    cid = random_clusters(103, 4, seed=3)
    assert sorted(np.bincount(cid)) == [25, 26, 26, 26]
    np.testing.assert_array_equal(cid, random_clusters(103, 4, seed=3))
    assert not np.array_equal(cid, random_clusters(103, 4, seed=4))


def test_errors_name_the_problem():
    a, _ = communities((10, 10), seed=0)
    disconnected = a.copy()
    disconnected[:, :] = 0
    disconnected[:5, :5] = 1
    disconnected[5:, 5:] = 1
    np.fill_diagonal(disconnected, 0)
    with pytest.raises(ValueError, match="disconnected .2 components"):
        spectral_clusters(disconnected)
    with pytest.raises(ValueError, match="disconnected"):
        fiedler_vector(disconnected)
    with pytest.raises(ValueError, match="reached only"):
        spectral_clusters(a, num_clusters=5, min_size=4)
    with pytest.raises(ValueError, match="num_clusters must be"):
        spectral_clusters(a, num_clusters=0)
    with pytest.raises(ValueError, match="min_size"):
        spectral_clusters(a, min_size=0)
    with pytest.raises(ValueError, match="symmetric"):
        spectral_clusters(np.triu(a))
    with pytest.raises(ValueError, match="num_clusters must be"):
        random_clusters(5, 6)
