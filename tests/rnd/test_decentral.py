"""Decentralized RND discovery: the band rule, the symmetry rules, leader election against a
plain breadth-first reference (any node order, any starting state, with and without the
region-size limit), regions of real neighbour scores, and errors."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components, shortest_path

from fedrnd.graphs import make_topology, to_numpy_edges
from fedrnd.rnd import (
    RNDConfig,
    band_accepts,
    compatible_links,
    discover_regions,
    elect_leaders,
    election_reference,
    node_ranks,
    regions_from_scores,
)
from tests.rnd._data import grouped_gaussian, shuffled_groups


def random_links(n: int, p: float, rng: np.random.Generator):
    """All pairs with probability p (each once), and a random compatible flag per link."""
    a, b = np.triu_indices(n, 1)
    keep = rng.random(len(a)) < p
    u, v = a[keep], b[keep]
    flip = rng.random(len(u)) < 0.5  # either endpoint order
    u, v = np.where(flip, v, u), np.where(flip, u, v)
    return u, v, rng.random(len(u)) < 0.7


def same_partition(a, b) -> bool:
    """Two labelings group the nodes identically (up to renaming)."""
    a, b = np.asarray(a), np.asarray(b)
    pairs = np.unique(np.stack([a, b], 1), axis=0)
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


def components_of(u, v, ok, n):
    m = coo_matrix((np.ones(int(ok.sum())), (u[ok], v[ok])), shape=(n, n))
    return connected_components(m, directed=False)[1]


# --------------------------------------------------------------------------------------------
# band and symmetry rules
# --------------------------------------------------------------------------------------------


def test_band_rule_known_answers():
    s = np.array([0.69, 0.70, 0.71, 1.0, 1.29, 1.30, 1.31, 0.0, 5.0])
    got = band_accepts(s, np.ones_like(s), 0.3)
    np.testing.assert_array_equal(got, [0, 0, 1, 1, 1, 0, 0, 0, 0])
    # Relative to each scorer's own self-novelty.
    np.testing.assert_array_equal(band_accepts(np.array([2.5, 2.5]), np.array([2.0, 1.0]), 0.3),
                                  [1, 0])
    # A band of 1 or more has no lower bound left (novelty is > 0).
    np.testing.assert_array_equal(band_accepts(np.array([1e-6, 1.99, 2.0]), np.ones(3), 1.0),
                                  [1, 1, 0])


def test_symmetry_rules():
    at_u = np.array([True, True, False, False])
    at_v = np.array([True, False, True, False])
    np.testing.assert_array_equal(compatible_links(at_u, at_v, "mutual"), [1, 0, 0, 0])
    np.testing.assert_array_equal(compatible_links(at_u, at_v, "either"), [1, 1, 1, 0])


def test_regions_from_scores_known_answer():
    # Path 0-1-2-3-4: link 1-2 one-sided (2 rejects 1), link 3-4 rejected both ways.
    u, v = np.array([0, 1, 2, 3]), np.array([1, 2, 3, 4])
    s_self = np.ones(5)
    s_uv = np.array([1.1, 1.1, 0.9, 3.0])  # u's score of v's predictor
    s_vu = np.array([1.2, 2.0, 1.0, 3.0])
    r = regions_from_scores(u, v, s_uv, s_vu, s_self, priority="id")
    np.testing.assert_array_equal(r.compatible, [1, 0, 1, 0])
    np.testing.assert_array_equal(r.region, [0, 0, 1, 1, 2])
    np.testing.assert_array_equal(r.leader, [0, 0, 2, 2, 4])
    np.testing.assert_array_equal(r.hops, [0, 1, 0, 1, 0])
    r = regions_from_scores(u, v, s_uv, s_vu, s_self, priority="id", symmetry="either")
    np.testing.assert_array_equal(r.region, [0, 0, 0, 0, 1])
    np.testing.assert_array_equal(r.hops, [0, 1, 2, 3, 0])
    # Traffic: one verdict byte per link end, 8-byte election messages per compatible link.
    deg = np.array([1, 2, 2, 2, 1])
    cdeg = np.array([1, 2, 2, 1, 0])
    np.testing.assert_allclose(r.bytes_up, deg + cdeg * r.iterations * 8)
    # The lowest self-novelty leads by default (verdicts given: every link compatible).
    yes = np.ones(4, bool)
    r = regions_from_scores(u, v, s_uv, s_vu, np.array([1.0, 0.5, 1, 1, 1]), accepts=(yes, yes))
    np.testing.assert_array_equal(r.leader, 1)
    np.testing.assert_array_equal(r.hops, [1, 0, 1, 2, 3])


# --------------------------------------------------------------------------------------------
# leader election
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_hops", [None, 0, 1, 2, 3])
def test_election_equals_breadth_first_reference(seed, max_hops):
    rng = np.random.default_rng(seed)
    n = 40
    u, v, ok = random_links(n, 0.08, rng)
    ranks = node_ranks(rng.random(n))
    leader, hops, it = elect_leaders(u, v, ok, ranks, max_hops=max_hops)
    ref_leader, ref_hops = election_reference(u, v, ok, ranks, max_hops)
    np.testing.assert_array_equal(leader, ref_leader)
    np.testing.assert_array_equal(hops, ref_hops)
    assert it >= 1


@pytest.mark.parametrize("seed", range(4))
def test_without_limit_one_leader_per_connected_compatible_region(seed):
    rng = np.random.default_rng(100 + seed)
    n = 60
    u, v, ok = random_links(n, 0.05, rng)
    comp = components_of(u, v, ok, n)
    for pr in ("id", rng.random(n)):
        leader, hops, _ = elect_leaders(u, v, ok, node_ranks(pr, num_nodes=n))
        assert same_partition(leader, comp)
        leaders = np.flatnonzero(leader == np.arange(n))
        assert sorted(comp[leaders]) == sorted(np.unique(comp))  # exactly one per component
        np.testing.assert_array_equal(hops[leaders], 0)
        # Each member's hops are its shortest-path distance to its leader.
        dist = shortest_path(coo_matrix((np.ones(int(ok.sum())), (u[ok], v[ok])),
                                        shape=(n, n)), directed=False, unweighted=True)
        np.testing.assert_array_equal(hops, dist[np.arange(n), leader])


@pytest.mark.parametrize("max_hops", [None, 1, 2])
@pytest.mark.parametrize("seed", range(3))
def test_election_does_not_depend_on_node_order(seed, max_hops):
    """Relabel the nodes by a random permutation (priorities travel with them): the same
    regions, leaders and hops, relabelled."""
    rng = np.random.default_rng(200 + seed)
    n = 50
    u, v, ok = random_links(n, 0.07, rng)
    prio = rng.random(n)
    leader, hops, _ = elect_leaders(u, v, ok, node_ranks(prio), max_hops=max_hops)
    perm = rng.permutation(n)  # node i becomes perm[i]
    order = rng.permutation(len(u))  # and the link list is shuffled too
    p_prio = np.empty(n)
    p_prio[perm] = prio
    p_leader, p_hops, _ = elect_leaders(perm[u][order], perm[v][order], ok[order],
                                        node_ranks(p_prio), max_hops=max_hops)
    np.testing.assert_array_equal(p_leader[perm], perm[leader])
    np.testing.assert_array_equal(p_hops[perm], hops)
    if max_hops is None:  # and without a limit the regions do not depend on the priorities
        q_leader, _, _ = elect_leaders(perm[u], perm[v], ok, node_ranks("id", num_nodes=n))
        assert same_partition(q_leader[perm], leader)


@pytest.mark.parametrize("max_hops", [None, 2])
def test_election_self_stabilises_from_any_state(max_hops):
    rng = np.random.default_rng(7)
    n = 30
    u, v, ok = random_links(n, 0.1, rng)
    ranks = node_ranks(rng.random(n))
    clean = elect_leaders(u, v, ok, ranks, max_hops=max_hops)
    for _ in range(3):
        junk = (rng.integers(0, n, n), rng.integers(0, 2 * n, n))
        leader, hops, _ = elect_leaders(u, v, ok, ranks, max_hops=max_hops, init=junk)
        np.testing.assert_array_equal(leader, clean[0])
        np.testing.assert_array_equal(hops, clean[1])


def test_size_limit_known_answer_and_invariants():
    # A path of 7 nodes, node ids as priorities, regions of radius 2 hops.
    u, v = np.arange(6), np.arange(1, 7)
    leader, hops, _ = elect_leaders(u, v, np.ones(6, bool), node_ranks("id", num_nodes=7),
                                    max_hops=2)
    np.testing.assert_array_equal(leader, [0, 0, 0, 3, 3, 3, 6])
    np.testing.assert_array_equal(hops, [0, 1, 2, 0, 1, 2, 0])
    leader, _, _ = elect_leaders(u, v, np.ones(6, bool), node_ranks("id", num_nodes=7),
                                 max_hops=0)
    np.testing.assert_array_equal(leader, np.arange(7))
    # Random graphs: every region is connected through its own compatible links and every
    # member lies within max_hops hops of its leader inside the region.
    rng = np.random.default_rng(3)
    n = 80
    for max_hops in (1, 2, 4):
        a, b, ok = random_links(n, 0.04, rng)
        leader, hops, _ = elect_leaders(a, b, ok, node_ranks(rng.random(n)), max_hops=max_hops)
        assert hops.max() <= max_hops
        inside = ok & (leader[a] == leader[b])
        dist = shortest_path(coo_matrix((np.ones(int(inside.sum())), (a[inside], b[inside])),
                                        shape=(n, n)), directed=False, unweighted=True)
        np.testing.assert_array_equal(dist[np.arange(n), leader], hops)
        # The limit splits some component that is wider than it.
        full = components_of(a, b, ok, n)
        assert len(np.unique(leader)) >= len(np.unique(full))


def test_empty_and_isolated_graphs():
    leader, hops, it = elect_leaders(np.zeros(0, int), np.zeros(0, int), np.zeros(0, bool),
                                     node_ranks("id", num_nodes=4))
    np.testing.assert_array_equal(leader, np.arange(4))
    np.testing.assert_array_equal(hops, 0)
    assert it == 1


# --------------------------------------------------------------------------------------------
# discovery on data
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_regions_on_well_separated_groups(seed):
    """With in-group scores inside the band and cross-group ones outside it, the regions are
    exactly the connected pieces of each group on the graph (the whole group where its nodes
    are connected among themselves)."""
    groups = shuffled_groups([8, 8, 8], seed)
    data = grouped_gaussian(groups, shift_seed=seed, seed=seed)
    g = make_topology("random_geometric", 24, radius=0.5).static(jax.random.key(seed))
    e = to_numpy_edges(g)
    u, v = e[:, 0], e[:, 1]
    r = discover_regions(data, u, v, RNDConfig(network="mlp"), band=1.0)
    same = groups[u] == groups[v]
    np.testing.assert_array_equal(r.compatible, same)
    assert same_partition(r.region, components_of(u, v, same, 24))
    # Sparse traffic: predictors only over graph links (the sparse discovery's count) plus the
    # verdicts and the election messages.
    disc = r.discovery
    assert np.all(r.bytes_up > disc.bytes_up) and len(disc.edge_scores) == 2 * len(u)
    # On the complete graph every group is one region.
    kn = make_topology("complete", 24).static(jax.random.key(0))
    e = to_numpy_edges(kn)
    r = discover_regions(data, e[:, 0], e[:, 1], RNDConfig(network="mlp"), band=1.0)
    assert same_partition(r.region, groups)
    # The centralized criterion on the observed rows agrees here.
    r2 = discover_regions(data, e[:, 0], e[:, 1], RNDConfig(network="mlp"), criterion="eps")
    assert same_partition(r2.region, groups)


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("band", [0, -0.1, float("nan"), float("inf"), "wide", True, None])
def test_bad_band(band):
    with pytest.raises(ValueError, match="band"):
        band_accepts(np.ones(2), np.ones(2), band)


def test_bad_inputs():
    u, v, s = np.array([0, 1]), np.array([1, 2]), np.ones(3)
    with pytest.raises(ValueError, match="symmetry"):
        regions_from_scores(u, v, s[:2], s[:2], s, symmetry="both")
    with pytest.raises(ValueError, match="max_hops"):
        regions_from_scores(u, v, s[:2], s[:2], s, max_hops=-1)
    with pytest.raises(ValueError, match="max_hops"):
        regions_from_scores(u, v, s[:2], s[:2], s, max_hops=1.5)
    with pytest.raises(ValueError, match="priority"):
        regions_from_scores(u, v, s[:2], s[:2], s, priority="oldest")
    with pytest.raises(ValueError, match="one entry per link"):
        regions_from_scores(u, v, s, s[:2], s)
    with pytest.raises(ValueError, match="finite"):
        regions_from_scores(u, v, np.array([1.0, np.nan]), s[:2], s)
    with pytest.raises(ValueError, match="self-loops"):
        regions_from_scores(np.array([0, 1]), np.array([1, 1]), s[:2], s[:2], s)
    with pytest.raises(ValueError, match=r"node ids in \[0, 3\)"):
        regions_from_scores(np.array([0, 1]), np.array([1, 3]), s[:2], s[:2], s)
    with pytest.raises(ValueError, match="permutation"):
        elect_leaders(u, v, np.ones(2, bool), np.array([0, 0, 1]))
    with pytest.raises(ValueError, match="one entry per link"):
        elect_leaders(u, v, np.ones(3, bool), np.arange(3))
    with pytest.raises(ValueError, match="init"):
        elect_leaders(u, v, np.ones(2, bool), np.arange(3), init=(np.array([0, 5, 1]),
                                                                  np.zeros(3)))
    with pytest.raises(RuntimeError, match="did not settle"):
        elect_leaders(np.arange(5), np.arange(1, 6), np.ones(5, bool), np.arange(6)[::-1].copy(),
                      max_iters=2)
    with pytest.raises(ValueError, match="key"):
        node_ranks("random", num_nodes=3)
    data = grouped_gaussian([0, 0, 1], n=8)
    with pytest.raises(ValueError, match="once each"):
        discover_regions(data, np.array([0, 1]), np.array([1, 0]))
    with pytest.raises(ValueError, match="criterion"):
        discover_regions(data, u, v, criterion="z")
