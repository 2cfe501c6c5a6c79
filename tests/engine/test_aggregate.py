"""Aggregation primitives against plain numpy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrnd.engine import (
    EdgeList,
    broadcast,
    edge_aggregate,
    grow_slots,
    keep_nonempty,
    segment_weighted_mean,
    weighted_mean,
)

SHAPES = {"dense": {"kernel": (3, 2), "bias": (2,)}, "scalar": (), "vec": (5,)}


def _random_tree(rng, lead):
    def leaf(shape):
        return rng.normal(size=(lead, *shape)).astype(np.float32)

    return {"dense": {"kernel": leaf((3, 2)), "bias": leaf((2,))}, "scalar": leaf(()),
            "vec": leaf((5,))}


def _leaves(tree):
    return jax.tree.leaves(tree)


def _close(a, b, tol=1e-5):
    ta, tb = jax.tree.structure(a), jax.tree.structure(b)
    assert ta == tb, (ta, tb)
    for u, v in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=tol, atol=tol)


def test_weighted_mean_matches_numpy():
    rng = np.random.default_rng(0)
    c = 9
    tree = _random_tree(rng, c)
    w = rng.uniform(0.1, 5.0, size=c).astype(np.float32)
    w[2] = 0.0  # a zero weight contributes nothing
    out = weighted_mean(jax.tree.map(jnp.asarray, tree), jnp.asarray(w))

    def ref(x):
        x = x.astype(np.float64)
        return np.einsum("c,c...->...", w.astype(np.float64), x) / w.astype(np.float64).sum()

    _close(out, jax.tree.map(ref, tree))
    for leaf, shape in zip(_leaves(out), jax.tree.leaves(SHAPES, is_leaf=lambda s: isinstance(s, tuple)),
                           strict=True):
        assert leaf.shape == shape


def test_weighted_mean_integer_weights_are_counts():
    x = {"a": jnp.asarray([[1.0, 2.0], [3.0, 4.0], [10.0, 20.0]])}
    out = weighted_mean(x, jnp.asarray([1, 3, 0], jnp.int32))
    np.testing.assert_allclose(np.asarray(out["a"]), [(1 + 9) / 4, (2 + 12) / 4], rtol=1e-6)


def test_segment_weighted_mean_matches_numpy_and_empty_slots_have_mass_zero():
    rng = np.random.default_rng(1)
    c, k = 11, 6
    tree = _random_tree(rng, c)
    w = rng.uniform(0.5, 3.0, size=c).astype(np.float32)
    cid = np.array([0, 3, 3, 1, 0, 5, 3, 1, 0, 5, 3], np.int32)  # slots 2 and 4 are empty
    slots, mass = segment_weighted_mean(jax.tree.map(jnp.asarray, tree), jnp.asarray(w),
                                        jnp.asarray(cid), k)

    ref_mass = np.array([w[cid == s].astype(np.float64).sum() for s in range(k)])
    np.testing.assert_allclose(np.asarray(mass), ref_mass, rtol=1e-6)
    assert ref_mass[2] == 0 and ref_mass[4] == 0

    def ref(x):
        out = np.zeros((k, *x.shape[1:]))
        for s in range(k):
            sel = cid == s
            if sel.any():
                out[s] = np.einsum("c,c...->...", w[sel].astype(np.float64), x[sel]) / w[sel].sum()
        return out

    _close(slots, jax.tree.map(ref, tree))
    for leaf in _leaves(slots):
        assert np.all(np.asarray(leaf)[[2, 4]] == 0.0)
        assert np.all(np.isfinite(np.asarray(leaf)))

    old = _random_tree(rng, k)
    kept = keep_nonempty(slots, jax.tree.map(jnp.asarray, old), mass)
    nonempty = ref_mass > 0

    def ref_keep(new, o):
        return np.where(nonempty.reshape((-1,) + (1,) * (o.ndim - 1)), new, o)

    _close(kept, jax.tree.map(ref_keep, jax.tree.map(ref, tree), old))
    for leaf, o in zip(_leaves(kept), _leaves(old), strict=True):
        np.testing.assert_array_equal(np.asarray(leaf)[[2, 4]], o[[2, 4]])


def test_segment_weighted_mean_zero_weight_slot_counts_as_empty():
    x = {"a": jnp.asarray([[1.0], [2.0], [3.0], [4.0]])}
    w = jnp.asarray([1.0, 1.0, 0.0, 0.0])
    cid = jnp.asarray([0, 0, 1, 1])
    slots, mass = segment_weighted_mean(x, w, cid, 3)
    np.testing.assert_allclose(np.asarray(mass), [2.0, 0.0, 0.0])
    np.testing.assert_allclose(np.asarray(slots["a"])[:, 0], [1.5, 0.0, 0.0])
    old = {"a": jnp.asarray([[7.0], [8.0], [9.0]])}
    np.testing.assert_allclose(np.asarray(keep_nonempty(slots, old, mass)["a"])[:, 0],
                               [1.5, 8.0, 9.0])


def test_broadcast_is_numpy_indexing():
    rng = np.random.default_rng(2)
    k = 5
    slots = _random_tree(rng, k)
    cid = np.array([4, 0, 0, 2, 4, 1, 3, 3], np.int32)
    out = broadcast(jax.tree.map(jnp.asarray, slots), jnp.asarray(cid))
    for leaf, s in zip(_leaves(out), _leaves(slots), strict=True):
        np.testing.assert_array_equal(np.asarray(leaf), s[cid])


def _edges(rng, n, e):
    src = rng.integers(0, n, e).astype(np.int32)
    dst = rng.integers(0, n, e).astype(np.int32)
    # Force duplicates (same src -> dst more than once) and self-loops.
    src[1], dst[1] = src[0], dst[0]
    src[5], dst[5] = src[0], dst[0]
    src[3] = dst[3]
    w = rng.uniform(-1.0, 2.0, e).astype(np.float32)
    return src, dst, w


@pytest.mark.parametrize("edge_chunk", [1, 4, 5, 7, 23, 100, 4096])
def test_edge_aggregate_equals_dense_mixing_matrix(edge_chunk):
    rng = np.random.default_rng(3)
    n, e = 7, 23
    src, dst, w = _edges(rng, n, e)
    tree = _random_tree(rng, n)
    dense = np.zeros((n, n))
    np.add.at(dense, (dst, src), w.astype(np.float64))  # W[i, j]: weight of j's message to i
    assert len({(int(s), int(d)) for s, d in zip(src, dst, strict=True)}) < e  # duplicates
    out = edge_aggregate(jax.tree.map(jnp.asarray, tree),
                         EdgeList(jnp.asarray(src), jnp.asarray(dst), jnp.asarray(w)), n,
                         edge_chunk=edge_chunk)

    def ref(x):
        return (dense @ x.reshape(n, -1).astype(np.float64)).reshape(x.shape)

    _close(out, jax.tree.map(ref, tree))


def test_edge_aggregate_node_without_in_edges_gets_zero_and_jits():
    n = 4
    x = {"a": jnp.arange(8.0).reshape(n, 2)}
    edges = EdgeList(jnp.asarray([0, 1, 1]), jnp.asarray([1, 2, 2]), jnp.asarray([0.5, 1.0, 2.0]))
    out = jax.jit(lambda t, ed: edge_aggregate(t, ed, n, edge_chunk=2))(x, edges)
    ref = np.zeros((n, 2))
    ref[1] = 0.5 * np.array([0.0, 1.0])
    ref[2] = 3.0 * np.array([2.0, 3.0])
    np.testing.assert_allclose(np.asarray(out["a"]), ref, rtol=1e-6)


def test_edge_aggregate_empty_edge_list_gives_zeros():
    n = 3
    x = {"a": jnp.ones((n, 2))}
    empty = EdgeList(jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.int32), jnp.zeros((0,)))
    out = edge_aggregate(x, empty, n)
    np.testing.assert_array_equal(np.asarray(out["a"]), np.zeros((n, 2)))


@pytest.mark.parametrize("needed,current,max_slots,expected", [
    (3, 4, 4096, 4),      # enough slots: unchanged
    (4, 4, 4096, 4),
    (0, 2, 4096, 2),
    (5, 4, 4096, 8),      # next power of two
    (8, 4, 4096, 8),
    (9, 8, 4096, 16),
    (17, 16, 4096, 32),
    (2, 1, 4096, 2),
    (33, 8, 4096, 64),    # may jump several powers
    (4096, 1024, 4096, 4096),
    (17, 16, 20, 20),     # capped at max_slots when the cap is not a power of two
    (20, 16, 20, 20),
])
def test_grow_slots(needed, current, max_slots, expected):
    assert grow_slots(needed, current, max_slots) == expected


@pytest.mark.parametrize("needed,current,max_slots", [(4097, 8, 4096), (5, 4, 4), (21, 16, 20)])
def test_grow_slots_raises_past_cap(needed, current, max_slots):
    with pytest.raises(ValueError, match=rf"{needed} clusters needed but the slot cap is "
                                         rf"{max_slots}.*max_slots"):
        grow_slots(needed, current, max_slots)
