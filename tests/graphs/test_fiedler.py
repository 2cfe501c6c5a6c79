"""The gossip Fiedler vector agrees with numpy's eigensolver (up to sign, or within the
eigenspace when it is degenerate), stays orthogonal to the constant vector, does not underflow
over long runs, charges exactly its messages, and refuses what it cannot compute."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import scipy.sparse as sp

from fedrnd.graphs import adjacency, make_topology
from fedrnd.graphs.fiedler import agreement, gossip_fiedler
from fedrnd.graphs.spectral import sweep_cut


def two_cliques(m):
    a = np.ones((2 * m, 2 * m))
    a[:m, m:] = a[m:, :m] = 0
    np.fill_diagonal(a, 0)
    a[m - 1, m] = a[m, m - 1] = 1
    return a


def path(n):
    a = np.zeros((n, n))
    i = np.arange(n - 1)
    a[i, i + 1] = a[i + 1, i] = 1
    return a


def ring(n):
    a = path(n)
    a[0, n - 1] = a[n - 1, 0] = 1
    return a


def planted(n=24, seed=0):
    g = make_topology("planted_partition", n, communities=2, p_in=0.6,
                      p_out=0.05).static(jax.random.key(seed))
    return np.asarray(adjacency(g), np.float64)


def weighted(a, seed=0):
    """The same links with random weights in [0.2, 1.2]."""
    w = np.triu(np.random.default_rng(seed).uniform(0.2, 1.2, a.shape), 1)
    return a * (w + w.T)


def eigh_generalised(a):
    """``L v = lambda D v`` by numpy: eigh of ``D^-1/2 L D^-1/2``, ``v = D^-1/2 u``."""
    d = a.sum(1)
    s = 1 / np.sqrt(d)
    vals, u = np.linalg.eigh(s[:, None] * (np.diag(d) - a) * s[None, :])
    return vals, s[:, None] * u, d


def sweep_side(a, v):
    """The best sweep cut of the order of ``v``, as a partition ``{A, B}``."""
    order = np.argsort(v, kind="stable")
    k, _ = sweep_cut(sp.csr_matrix(a), order, min_size=2)
    return frozenset((frozenset(order[:k].tolist()), frozenset(order[k:].tolist())))


def d_cos(x, y, d):
    return abs(x @ (d * y)) / np.sqrt((x @ (d * x)) * (y @ (d * y)))


@pytest.mark.parametrize("name,a,iters", [
    ("two cliques of 8 joined by one edge", two_cliques(8), 40),
    ("path of 12", path(12), 200),
    ("planted partition, 2 x 12", planted(), 200),
    ("weighted planted partition", weighted(planted(seed=1)), 300),
])
def test_gossip_fiedler_matches_numpy_eigh_up_to_sign(name, a, iters):
    vals, vecs, d = eigh_generalised(a)
    assert vals[2] - vals[1] > 1e-3, "the test graph's Fiedler vector must be unique"
    g = gossip_fiedler(a, iters)
    assert d_cos(g.vector, vecs[:, 1], d) > 0.999
    assert g.value == pytest.approx(vals[1], rel=1e-3)
    # The split orders nodes by this vector: its best sweep cut is the eigensolver's.
    assert sweep_side(a, g.vector) == sweep_side(a, vecs[:, 1])


def test_gossip_fiedler_on_a_ring_lies_in_the_degenerate_fiedler_plane():
    """A ring's lambda_2 has two eigenvectors (cos and sin): any vector of their plane is a
    Fiedler vector."""
    a = ring(16)
    vals, vecs, d = eigh_generalised(a)
    assert vals[2] - vals[1] < 1e-9
    g = gossip_fiedler(a, 300)
    plane = vecs[:, 1:3]                     # D-orthonormal columns
    proj = plane @ (plane.T @ (d * g.vector))
    assert np.sqrt(proj @ (d * proj)) > 0.999  # g.vector is D-normalised
    assert g.value == pytest.approx(vals[1], rel=1e-4)


def test_too_few_rounds_do_not_agree():
    """Agreement is earned by the rounds: on a path of 12 one window (22 rounds) is short of
    0.99, five windows are past 0.9999."""
    a = path(12)
    _, vecs, d = eigh_generalised(a)
    assert gossip_fiedler(a, 1).rounds == 22
    assert d_cos(gossip_fiedler(a, 1).vector, vecs[:, 1], d) < 0.99
    assert d_cos(gossip_fiedler(a, 110).vector, vecs[:, 1], d) > 0.9999


@pytest.mark.parametrize("iters", [1, 7, 50])
def test_iterate_stays_orthogonal_to_the_constant_vector(iters):
    a = weighted(planted(seed=2))
    d = a.sum(1)
    v = gossip_fiedler(a, iters).vector
    assert abs(v @ d) < 1e-9 * np.sqrt(d.sum())
    assert v @ (d * v) == pytest.approx(1.0)


def test_long_runs_are_normalised_and_do_not_underflow():
    """Two triangles joined by one edge (lazy-walk eigenvalues about 0.9 and below 0.5):
    5,000 rounds would underflow float64 without the rescaling, and the constant component,
    brought back by rounding, would win without the repeated deflation."""
    a = two_cliques(3)
    _, vecs, d = eigh_generalised(a)
    for window in (None, 6, 7, 50):
        g = gossip_fiedler(a, 5000, window=window)
        assert np.all(np.isfinite(g.vector)) and d_cos(g.vector, vecs[:, 1], d) > 0.999999


def test_bytes_and_rounds_by_hand_on_a_path_of_three():
    """Path 0-1-2; the breadth-first tree from 0 is the path (depth 2), so a window is 4
    rounds and 3 power rounds round up to 4. A power round: each node sends its entry (8 bytes)
    to each neighbour: 32 bytes per link end. The window's tree messages: 1 and 2 send three
    partial sums (24 bytes) up to their parents 0 and 1; 0 and 1 send the mean and spread
    (16 bytes) down to their children 1 and 2."""
    g = gossip_fiedler(path(3), 3)
    assert g.rounds == 4
    np.testing.assert_array_equal(g.sent, [32 + 16, 64 + 24 + 16, 32 + 24])
    np.testing.assert_array_equal(g.received, [32 + 24, 64 + 16 + 24, 32 + 16])
    # Weights change the arithmetic, not the messages; 9 rounds are 3 windows.
    g = gossip_fiedler(weighted(path(3)), 9)
    assert g.rounds == 12
    np.testing.assert_array_equal(g.sent, [3 * 48, 3 * 104, 3 * 56])


@pytest.mark.parametrize("a,kwargs,match", [
    (np.zeros((4, 4)), {"iters": 5}, "disconnected"),
    (np.zeros((1, 1)), {"iters": 5}, "at least 2 nodes"),
    (path(4), {"iters": 0}, "iters"),
    (path(4), {"iters": 5, "window": 5}, "window must be an integer >= 6"),
])
def test_bad_inputs_are_refused(a, kwargs, match):
    with pytest.raises(ValueError, match=match):
        gossip_fiedler(a, **kwargs)


def test_agreement_table_rises_with_the_rounds_to_the_eigensolver():
    """The docs' table (python -m fedrnd.graphs.fiedler): on a path of 16 agreement grows with
    the budget, and enough rounds reach the eigensolver's vector, value and cut."""
    rows = agreement(path(16), (1, 30, 400))
    assert [r["rounds"] for r in rows] == [30, 30, 420]
    assert rows[0]["cos"] < 0.999 < rows[2]["cos"]
    assert rows[2]["lambda2_rel_err"] < 1e-6 and rows[2]["same_cut"]
    assert rows[2]["bytes_per_node"] > rows[0]["bytes_per_node"]
