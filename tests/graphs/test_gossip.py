"""Mixing weights and gossip: edge-list gossip equals the dense mixing matrix built by a plain
loop; Metropolis weights are symmetric and doubly stochastic; repeated gossip reaches the
average (Metropolis) or the degree-weighted average (uniform); consensus distance."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrnd.graphs import (
    adjacency,
    consensus_distance,
    gossip,
    make_topology,
    mixing_edges,
    mixing_matrix,
)
from tests.algorithms._dfl_reference import dense_mixing

GRAPHS = [("ring", {}), ("grid", {"rows": 3}), ("random_geometric", {"radius": 0.35}),
          ("erdos_renyi", {"p": 0.25}), ("small_world", {"k": 4, "beta": 0.4}),
          ("d_regular", {"degree": 3})]


@pytest.mark.parametrize("mixing", ["metropolis", "uniform"])
@pytest.mark.parametrize("name,opts", GRAPHS)
def test_edge_list_gossip_equals_dense_mixing_matrix(name, opts, mixing):
    n = 18
    # A redraw-style graph (padding and dropped slots included), not only a compact one.
    g = jax.jit(make_topology(name, n, **opts).draw)(jax.random.key(1))
    w = dense_mixing(adjacency(g), mixing)
    edges = mixing_edges(g, mixing)
    np.testing.assert_allclose(np.asarray(mixing_matrix(edges, n)), w, atol=1e-6)
    rng = np.random.default_rng(0)
    tree = {"a": rng.normal(size=(n, 3, 2)).astype(np.float32),
            "b": rng.normal(size=(n,)).astype(np.float32)}
    for chunk, steps in ((4096, 1), (5, 3)):  # one chunk and many, one step and several
        out = jax.jit(lambda t, e, c=chunk, s=steps: gossip(t, e, n, s, c))(tree, edges)
        wp = np.linalg.matrix_power(w, steps)
        np.testing.assert_allclose(np.asarray(out["a"]),
                                   np.einsum("ij,j...->i...", wp, tree["a"]), atol=1e-5)
        np.testing.assert_allclose(np.asarray(out["b"]), wp @ tree["b"], atol=1e-5)


@pytest.mark.parametrize("name,opts", GRAPHS)
def test_metropolis_weights_are_symmetric_nonnegative_and_doubly_stochastic(name, opts):
    for key in range(3):
        g = make_topology(name, 24, **opts).draw(jax.random.key(key))
        w = np.asarray(mixing_matrix(mixing_edges(g, "metropolis"), 24), np.float64)
        np.testing.assert_allclose(w, w.T, atol=1e-7)
        assert w.min() >= -1e-7
        np.testing.assert_allclose(w.sum(0), 1.0, atol=1e-6)
        np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)


def test_uniform_weights_are_row_stochastic_but_not_doubly_on_an_irregular_graph():
    g = make_topology("grid", 12).static(jax.random.key(0))
    w = np.asarray(mixing_matrix(mixing_edges(g, "uniform"), 12), np.float64)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)
    assert np.max(np.abs(w.sum(0) - 1.0)) > 0.05


def test_repeated_metropolis_gossip_converges_to_the_average():
    n = 16
    g = make_topology("small_world", n, k=2, beta=0.3).static(jax.random.key(2))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(n, 5)), jnp.float32)
    edges = mixing_edges(g, "metropolis")
    out = jax.jit(lambda t: gossip(t, edges, n, steps=400))(x)
    np.testing.assert_allclose(np.asarray(out), np.broadcast_to(np.asarray(x).mean(0), (n, 5)),
                               atol=1e-4)
    # The average itself is preserved by every step.
    one = gossip(x, edges, n)
    np.testing.assert_allclose(np.asarray(one).mean(0), np.asarray(x).mean(0), atol=1e-6)
    assert float(consensus_distance(one)) < float(consensus_distance(x))


def test_repeated_uniform_gossip_converges_to_the_degree_weighted_average():
    n = 12
    g = make_topology("grid", n).static(jax.random.key(0))
    x = np.random.default_rng(3).normal(size=(n,))
    out = np.asarray(gossip(jnp.asarray(x, jnp.float32), mixing_edges(g, "uniform"), n,
                            steps=600))
    deg = adjacency(g).sum(1)
    pi = (1 + deg) / (1 + deg).sum()  # the stationary distribution of W = D^-1 (A + I)
    np.testing.assert_allclose(out, np.full(n, pi @ x), atol=1e-4)
    assert abs(pi @ x - x.mean()) > 1e-3  # a different point from the plain average


def test_gossip_on_a_disconnected_graph_averages_each_component():
    n = 20
    g = make_topology("random_geometric", n, radius=0.2).static(jax.random.key(4),
                                                                connected=False)
    from fedrnd.graphs import components

    count, label = components(g)
    assert count > 1
    x = np.random.default_rng(0).normal(size=(n,))
    out = np.asarray(gossip(jnp.asarray(x, jnp.float32), mixing_edges(g), n, steps=3000))
    for c in range(count):
        np.testing.assert_allclose(out[label == c], x[label == c].mean(), atol=1e-3)


def test_consensus_distance_is_mean_squared_distance_to_the_average():
    rng = np.random.default_rng(5)
    tree = {"w": rng.normal(size=(6, 3, 4)), "b": rng.normal(size=(6, 2))}
    want = np.mean([np.sum((tree["w"][i] - tree["w"].mean(0)) ** 2)
                    + np.sum((tree["b"][i] - tree["b"].mean(0)) ** 2) for i in range(6)])
    got = consensus_distance(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree))
    assert float(got) == pytest.approx(want, rel=1e-5)
    same = jax.tree.map(lambda a: jnp.broadcast_to(jnp.asarray(a[0]), a.shape), tree)
    assert float(consensus_distance(same)) == pytest.approx(0.0, abs=1e-10)


def test_bad_mixing_and_steps_are_clear_errors():
    g = make_topology("ring", 5).static(jax.random.key(0))
    with pytest.raises(ValueError, match="mixing 'max_degree' is unknown"):
        mixing_edges(g, "max_degree")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        gossip(jnp.zeros((5, 2)), mixing_edges(g), 5, steps=0)
