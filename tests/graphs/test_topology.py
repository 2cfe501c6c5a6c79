"""Topologies: known edge sets and degrees, simple graphs, radius graphs equal brute force,
Erdos-Renyi edge density, redraws inside jit, connectivity checks and bad options."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrnd.graphs import (
    TOPOLOGIES,
    degrees,
    is_connected,
    make_topology,
    num_edges,
    to_numpy_edges,
)


def _draw(name, n, key=0, **opts):
    return jax.jit(make_topology(name, n, **opts).draw)(jax.random.key(key))


def _edge_set(g):
    return {tuple(e) for e in to_numpy_edges(g).tolist()}


def _assert_simple(g):
    e = to_numpy_edges(g)
    assert np.all(e[:, 0] < e[:, 1]), "self-loop or unordered pair"
    assert len(np.unique(e, axis=0)) == len(e), "repeated edge"
    assert np.all((e >= 0) & (e < g.num_nodes))


def _brute_radius(pos, radius):
    """All pairs within radius (float64 on the float32 positions), and pairs too close to the
    boundary to call (float32 rounding may decide them either way)."""
    p = np.asarray(pos, np.float64)
    d = np.sqrt(((p[:, None] - p[None]) ** 2).sum(-1))
    iu = np.triu_indices(len(p), 1)
    near = {(int(i), int(j)) for i, j in zip(*iu, strict=True) if d[i, j] <= radius}
    unsure = {(int(i), int(j)) for i, j in zip(*iu, strict=True)
              if abs(d[i, j] - radius) < 1e-5}
    return near, unsure


# --- known answers ----------------------------------------------------------------------------

def test_ring_is_the_cycle_and_shuffled_ring_is_a_random_cycle():
    n = 9
    g = _draw("ring", n)
    assert _edge_set(g) == {tuple(sorted((i, (i + 1) % n))) for i in range(n)}
    np.testing.assert_array_equal(np.asarray(degrees(g)), np.full(n, 2))
    s = _draw("ring", n, shuffle=True)
    assert _edge_set(s) != _edge_set(g)
    np.testing.assert_array_equal(np.asarray(degrees(s)), np.full(n, 2))
    assert is_connected(s)  # one cycle, not several
    assert _edge_set(_draw("ring", 2)) == {(0, 1)}
    assert int(num_edges(_draw("ring", 1))) == 0


def test_grid_is_the_lattice():
    g = _draw("grid", 12)  # default rows: largest divisor <= sqrt(12) -> 3 x 4
    want = set()
    for r, c in itertools.product(range(3), range(4)):
        i = 4 * r + c
        if c < 3:
            want.add((i, i + 1))
        if r < 2:
            want.add((i, i + 4))
    assert _edge_set(g) == want
    assert len(want) == 3 * 3 + 4 * 2
    deg = np.asarray(degrees(g)).reshape(3, 4)
    np.testing.assert_array_equal(deg, [[2, 3, 3, 2], [3, 4, 4, 3], [2, 3, 3, 2]])
    tall = _draw("grid", 12, rows=6)
    assert int(num_edges(tall)) == 6 * 1 + 2 * 5


def test_grid_radius_is_lattice_at_one_spacing_and_adds_diagonals_at_1_5():
    lattice = _edge_set(_draw("grid", 20, rows=4))
    assert _edge_set(_draw("grid", 20, rows=4, radius=1.0)) == lattice
    king = _edge_set(_draw("grid", 20, rows=4, radius=1.5))
    diagonals = 2 * (4 - 1) * (5 - 1)
    assert lattice < king and len(king) == len(lattice) + diagonals


@pytest.mark.parametrize("key", [0, 1, 2])
def test_deformed_grid_links_exactly_the_pairs_within_radius(key):
    g = _draw("grid", 30, key=key, rows=5, deform=0.3, radius=1.3)
    spacing = 1.0 / 5  # max(rows - 1, cols - 1) = 5
    near, unsure = _brute_radius(g.positions, 1.3 * spacing)
    got = _edge_set(g)
    assert got - unsure == near - unsure
    _assert_simple(g)
    # The jitter stays within deform x spacing of the lattice point.
    row, col = np.divmod(np.arange(30), 6)
    lattice = np.stack([col, row], 1) * spacing
    assert np.max(np.abs(np.asarray(g.positions) - lattice)) <= 0.3 * spacing + 1e-6


@pytest.mark.parametrize("n,radius,key", [(300, 0.1, 0), (300, 0.1, 1), (60, 0.35, 2),
                                          (500, 0.04, 3)])
def test_random_geometric_equals_brute_force_pairs(n, radius, key):
    g = _draw("random_geometric", n, key=key, radius=radius)
    pos = np.asarray(g.positions)
    assert pos.shape == (n, 2) and np.all((pos >= 0) & (pos <= 1))
    near, unsure = _brute_radius(pos, radius)
    assert _edge_set(g) - unsure == near - unsure
    _assert_simple(g)
    # The host-side static graph is the exact radius graph of its own positions.
    s = make_topology("random_geometric", n, radius=radius).static(jax.random.key(key),
                                                                   connected=False)
    near, unsure = _brute_radius(s.positions, radius)
    assert _edge_set(s) - unsure == near - unsure


def test_complete_graph():
    g = _draw("complete", 7)
    assert int(num_edges(g)) == 21
    np.testing.assert_array_equal(np.asarray(degrees(g)), np.full(7, 6))


@pytest.mark.parametrize("n,d", [(50, 3), (200, 5), (12, 4), (10, 7), (10, 9), (16, 1)])
def test_d_regular_has_exact_degrees_and_no_repeats(n, d):
    for key in range(5):
        g = _draw("d_regular", n, key=key, degree=d)
        _assert_simple(g)
        np.testing.assert_array_equal(np.asarray(degrees(g)), np.full(n, d))
    g = make_topology("d_regular", n, degree=d).static(jax.random.key(0), connected=d >= 3)
    np.testing.assert_array_equal(np.asarray(degrees(g)), np.full(n, d))
    assert g.num_slots == n * d // 2


def test_d_regular_draws_differ_and_are_not_one_relabelled_pattern():
    a, b = _draw("d_regular", 40, key=0, degree=4), _draw("d_regular", 40, key=1, degree=4)
    assert _edge_set(a) != _edge_set(b)
    # Triangles differ between draws (a relabelled fixed pattern would keep the count).
    counts = []
    for key in range(6):
        adj = np.zeros((40, 40))
        e = to_numpy_edges(_draw("d_regular", 40, key=key, degree=4))
        adj[e[:, 0], e[:, 1]] = adj[e[:, 1], e[:, 0]] = 1
        counts.append(int(np.trace(adj @ adj @ adj)) // 6)
    assert len(set(counts)) > 1


def test_small_world_without_rewiring_is_the_ring_lattice():
    n, k = 15, 4
    g = _draw("small_world", n, k=k, beta=0.0)
    assert _edge_set(g) == {tuple(sorted((i, (i + j) % n))) for i in range(n)
                            for j in range(1, k // 2 + 1)}
    np.testing.assert_array_equal(np.asarray(degrees(g)), np.full(n, k))


def test_small_world_rewires_about_beta_of_the_edges():
    n, k, beta = 400, 6, 0.3
    lattice = _edge_set(_draw("small_world", n, k=k, beta=0.0))
    moved = []
    for key in range(4):
        g = _draw("small_world", n, key=key, k=k, beta=beta)
        _assert_simple(g)
        e = _edge_set(g)
        assert len(e) >= n * k // 2 - 3  # a repeat is dropped only rarely
        moved.append(len(e - lattice) / (n * k // 2))
        # Rewiring keeps one end: every node keeps at least its own k/2 edges, minus repeats.
        assert np.asarray(degrees(g)).min() >= 1
    assert abs(np.mean(moved) - beta) < 0.03


@pytest.mark.parametrize("n,p", [(60, 0.05), (30, 0.2), (10, 0.6)])
def test_erdos_renyi_pairs_appear_with_probability_p(n, p):
    m = n * (n - 1) // 2
    draws = 300
    f = jax.jit(jax.vmap(make_topology("erdos_renyi", n, p=p).draw))
    gs = f(jax.random.split(jax.random.key(0), draws))
    counts = np.zeros((n, n))
    for t in range(draws):
        g = jax.tree.map(lambda a, t=t: a[t], gs)
        e = to_numpy_edges(g)
        assert len(np.unique(e, axis=0)) == len(e) and np.all(e[:, 0] < e[:, 1])
        counts[e[:, 0], e[:, 1]] += 1
    total = counts.sum() / draws
    # Edge count: mean of a Binomial(m, p) over `draws` draws, within 4 standard errors.
    assert abs(total - m * p) < 4 * np.sqrt(m * p * (1 - p) / draws)
    # No pair is favoured: per-pair frequencies spread like independent coins.
    freq = counts[np.triu_indices(n, 1)] / draws
    assert abs(freq.std() - np.sqrt(p * (1 - p) / draws)) < 0.3 * np.sqrt(p * (1 - p) / draws)


@pytest.mark.parametrize("name,opts", [("ring", {}), ("grid", {"rows": 2}),
                                       ("random_geometric", {"radius": 0.3}),
                                       ("erdos_renyi", {"p": 0.3}),
                                       ("d_regular", {"degree": 3}),
                                       ("small_world", {"k": 4, "beta": 0.5}),
                                       ("complete", {})])
def test_every_topology_draws_a_simple_graph_with_positions(name, opts):
    g = _draw(name, 12, **opts)
    _assert_simple(g)
    assert g.positions.shape == (12, 2) and g.positions.dtype == jnp.float32
    assert g.u.dtype == jnp.int32 and g.valid.dtype == jnp.bool_


# --- redraw inside jit ------------------------------------------------------------------------

@pytest.mark.parametrize("name,opts", [("erdos_renyi", {"p": 0.2}), ("d_regular", {"degree": 4}),
                                       ("small_world", {"k": 4, "beta": 0.3}),
                                       ("random_geometric", {"radius": 0.3}),
                                       ("ring", {"shuffle": True}),
                                       ("grid", {"deform": 0.4, "radius": 1.2})])
def test_redraw_in_jit_is_deterministic_per_key_and_changes_across_rounds(name, opts):
    topo = make_topology(name, 30, **opts)
    assert topo.random

    def rounds(key):  # one graph per round inside one jitted scan, as the driver runs blocks
        def body(c, r):
            g = topo.draw(jax.random.fold_in(key, r))
            return c, g

        return jax.lax.scan(body, 0, jnp.arange(4))[1]

    run = jax.jit(rounds)
    a, b = run(jax.random.key(5)), run(jax.random.key(5))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    per_round = [_edge_set(jax.tree.map(lambda t, r=r: t[r], a)) for r in range(4)]
    assert len({frozenset(e) for e in per_round}) == 4
    # The same draw outside the scan: the graph depends on the key only.
    assert _edge_set(topo.draw(jax.random.fold_in(jax.random.key(5), 2))) == per_round[2]


def test_deterministic_topologies_are_not_random():
    assert not make_topology("ring", 10).random
    assert not make_topology("grid", 10).random
    assert not make_topology("grid", 10, deform=0.2).random  # positions move, edges do not
    assert not make_topology("complete", 10).random


# --- static graphs: connectivity and errors ---------------------------------------------------

def test_static_graph_keeps_only_real_edges_and_is_deterministic():
    topo = make_topology("erdos_renyi", 40, p=0.2)
    a = topo.static(jax.random.key(3))
    b = topo.static(jax.random.key(3))
    assert bool(np.all(np.asarray(a.valid)))
    assert _edge_set(a) == _edge_set(b) and is_connected(a)
    assert topo.static(jax.random.key(4)).num_slots != a.num_slots or \
        _edge_set(topo.static(jax.random.key(4))) != _edge_set(a)


@pytest.mark.parametrize("name,opts,hint", [
    ("erdos_renyi", {"p": 0.01}, "raise p"),
    ("random_geometric", {"radius": 0.05}, "raise radius"),
    ("d_regular", {"degree": 1}, "degree >= 3"),
    ("grid", {"radius": 0.5}, "raise radius"),
])
def test_disconnected_static_graph_is_a_clear_error(name, opts, hint):
    topo = make_topology(name, 40, **opts)
    with pytest.raises(ValueError, match=f"disconnected.*{hint}.*connected = false"):
        topo.static(jax.random.key(0))
    g = topo.static(jax.random.key(0), connected=False)
    assert not is_connected(g)


@pytest.mark.parametrize("name,n,opts,match", [
    ("torus", 10, {}, "unknown; allowed"),
    ("ring", 10, {"p": 0.1}, "no option"),
    ("d_regular", 10, {"degree": 10}, r"degree must be an integer in \[0, N - 1 = 9\]"),
    ("d_regular", 10, {"degree": -1}, "degree must be"),
    ("d_regular", 10, {"degree": 2.5}, "degree must be"),
    ("d_regular", 9, {"degree": 3}, "must be even"),
    ("d_regular", 9, {}, "degree must be"),
    ("small_world", 10, {"k": 3}, "even integer"),
    ("small_world", 10, {"k": 10}, "even integer"),
    ("small_world", 10, {"k": 4, "beta": 1.5}, "beta"),
    ("erdos_renyi", 10, {"p": 0.0}, r"p must be in \(0, 1\]"),
    ("erdos_renyi", 10, {}, "p must be"),
    ("random_geometric", 10, {"radius": 0}, "radius must be"),
    ("grid", 10, {"rows": 3}, "divides the 10 nodes"),
    ("grid", 10, {"deform": -0.1}, "deform"),
    ("ring", 10, {"shuffle": "yes"}, "true or false"),
    ("ring", 0, {}, "num_nodes"),
])
def test_bad_topology_options_are_clear_errors(name, n, opts, match):
    with pytest.raises(ValueError, match=match):
        make_topology(name, n, **opts)


def test_registry_lists_every_topology():
    assert set(TOPOLOGIES) == {"ring", "grid", "random_geometric", "erdos_renyi", "d_regular",
                               "small_world", "complete", "planted_partition"}
