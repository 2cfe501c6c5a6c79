"""Community graphs and collection over a tree: planted-partition block sizes and edge
densities for a fixed seed, connectivity, determinism by seed, groups placed on communities,
and the bytes of gathering at / broadcasting from one node by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrnd.graphs import (
    TOPOLOGIES,
    Graph,
    community_of,
    community_sizes,
    degrees,
    is_connected,
    make_topology,
    place_groups,
    to_numpy_edges,
)
from fedrnd.graphs.collect import bfs_tree, broadcast_bytes, gather_bytes


def _static(n, seed=0, **opts):
    return make_topology("planted_partition", n, **opts).static(jax.random.key(seed))


def _densities(g, block):
    e = to_numpy_edges(g)
    same = block[e[:, 0]] == block[e[:, 1]]
    sizes = np.bincount(block)
    pairs_in = int(np.sum(sizes * (sizes - 1) // 2))
    pairs_out = len(block) * (len(block) - 1) // 2 - pairs_in
    return same.sum() / pairs_in, (~same).sum() / pairs_out


def test_planted_partition_is_registered_with_its_options():
    assert "planted_partition" in TOPOLOGIES
    assert TOPOLOGIES["planted_partition"].options == ("communities", "p_in", "p_out")


def test_community_sizes_are_near_equal_contiguous_blocks():
    np.testing.assert_array_equal(community_sizes(10, 4), [3, 3, 2, 2])
    np.testing.assert_array_equal(community_of(10, 4), [0, 0, 0, 1, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(np.bincount(community_of(100, 4)), [25] * 4)


def test_edge_densities_inside_and_across_communities_match_p_in_and_p_out():
    n, k = 200, 4
    g = _static(n, communities=k, p_in=0.3, p_out=0.01)
    d_in, d_out = _densities(g, community_of(n, k))
    # 4 x 1225 pairs inside (sd of the density ~0.0065), 15000 across (sd ~0.0008).
    assert abs(d_in - 0.3) < 0.03
    assert abs(d_out - 0.01) < 0.004
    assert is_connected(g)
    e = to_numpy_edges(g)
    assert np.all(e[:, 0] < e[:, 1]) and len(np.unique(e, axis=0)) == len(e)


def test_p_out_zero_separates_the_communities_and_one_joins_everything():
    n, k = 40, 4
    g = make_topology("planted_partition", n, communities=k, p_in=1.0, p_out=0.0).draw(
        jax.random.key(0))
    block = community_of(n, k)
    e = to_numpy_edges(g)
    assert np.all(block[e[:, 0]] == block[e[:, 1]])
    np.testing.assert_array_equal(np.asarray(degrees(g)), np.full(n, 9))  # 10-cliques
    with pytest.raises(ValueError, match="disconnected"):
        make_topology("planted_partition", n, communities=k, p_in=1.0, p_out=0.0).static(
            jax.random.key(0))
    full = make_topology("planted_partition", n, communities=k, p_in=1.0, p_out=1.0).draw(
        jax.random.key(0))
    assert len(to_numpy_edges(full)) == n * (n - 1) // 2


def test_same_seed_same_graph_other_seed_other_graph():
    opts = {"communities": 4, "p_in": 0.3, "p_out": 0.02}
    a, b, c = _static(100, 0, **opts), _static(100, 0, **opts), _static(100, 1, **opts)
    np.testing.assert_array_equal(to_numpy_edges(a), to_numpy_edges(b))
    assert not np.array_equal(to_numpy_edges(a), to_numpy_edges(c))
    np.testing.assert_allclose(np.asarray(a.positions), np.asarray(b.positions))


@pytest.mark.parametrize("opts,match", [
    ({"communities": 0, "p_in": 0.5, "p_out": 0.1}, "communities"),
    ({"communities": 2, "p_in": 1.5, "p_out": 0.1}, "p_in"),
    ({"communities": 2, "p_in": 0.5}, "p_out"),
    ({"communities": 2, "p_in": 0.5, "p_out": 0.1, "radius": 1.0}, "no option"),
])
def test_bad_options_are_refused(opts, match):
    with pytest.raises(ValueError, match=match):
        make_topology("planted_partition", 20, **opts)


def test_place_groups_puts_group_g_on_community_g():
    n, k = 60, 3
    rng = np.random.default_rng(0)
    group = rng.permutation(community_of(n, k))  # groups dealt to clients in random order
    g = _static(n, communities=k, p_in=0.5, p_out=0.02)
    placed = place_groups(g, group)
    # The same graph up to relabelling: node r of the draw is client order[r].
    order = np.argsort(group, kind="stable")
    want = {tuple(sorted((order[a], order[b]))) for a, b in to_numpy_edges(g).tolist()}
    assert {tuple(e) for e in to_numpy_edges(placed).tolist()} == want
    np.testing.assert_array_equal(group[order], community_of(n, k))
    d_in, d_out = _densities(placed, group)  # the groups are now the communities
    assert d_in > 0.4 and d_out < 0.05
    np.testing.assert_allclose(np.asarray(placed.positions)[order], np.asarray(g.positions))


def test_gather_and_broadcast_bytes_on_a_small_tree_by_hand():
    """Path 0-1-2 plus 1-3 and 0-4 (a tree already), root 0, records 10, 20, 30, 40, 50
    bytes: 1 sends 20 + 30 + 40, 2 sends 30, 3 sends 40, 4 sends 50; 0 receives 90 + 50, 1
    receives 30 + 40. A 7-byte broadcast: 0 sends it twice, 1 twice, every other node
    receives it once."""
    u = jnp.asarray([0, 1, 1, 0], jnp.int32)
    v = jnp.asarray([1, 2, 3, 4], jnp.int32)
    g = Graph(u, v, jnp.ones(4, bool), jnp.zeros((5, 2), jnp.float32))
    np.testing.assert_array_equal(bfs_tree(g, 0), [-1, 0, 1, 1, 0])
    up, down = gather_bytes(g, np.array([10, 20, 30, 40, 50]), 0)
    np.testing.assert_allclose(up, [0, 90, 30, 40, 50])
    np.testing.assert_allclose(down, [140, 70, 0, 0, 0])
    up, down = broadcast_bytes(g, 7, 0)
    np.testing.assert_allclose(up, [14, 14, 0, 0, 0])
    np.testing.assert_allclose(down, [0, 7, 7, 7, 7])
    # Conservation: every byte sent is received once.
    up, down = gather_bytes(g, np.arange(1, 6) * 3.0, 2)
    assert up.sum() == down.sum()
    unreachable = Graph(u[:2], v[:2], jnp.ones(2, bool), jnp.zeros((5, 2), jnp.float32))
    with pytest.raises(ValueError, match="cannot be reached"):
        bfs_tree(unreachable, 0)
