"""Aggregation primitives shared by all methods: weighted, per-cluster slots, over edges.

Clusters live in a fixed number of *slots* ``K`` (a static shape) and each client carries a
``cluster_id`` in ``[0, K)``; per-cluster aggregation is a segment sum into the slots and the
broadcast back to clients a gather. When a method needs more clusters than it has slots, the
host side calls :func:`grow_slots`, which returns the next power-of-two slot count (the round
recompiles once for the new shape), or raises when the hard cap ``max_slots`` is hit.

Graphs are edge lists ``(src, dst, weight)`` of static length ``E``; aggregation over edges
``out[i] = sum_{e: dst_e = i} w_e * x[src_e]`` runs over chunks of edges so memory is bounded by
the chunk, not by ``E``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def weighted_mean(tree: PyTree, weights: jax.Array) -> PyTree:
    """``sum_c w_c x_c / sum_c w_c`` over the leading client axis. ``weights: [C]``."""
    total = jnp.sum(weights)
    return jax.tree.map(
        lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=1) / total.astype(x.dtype), tree)


def keep_local(shared: PyTree, local: PyTree, local_mask: PyTree) -> PyTree:
    """Each client's model: the leaves of ``local`` (``[C, ...]``) where ``local_mask`` (a tree
    of Python bools, e.g. :meth:`fedrnd.models.Model.local_layers`) is True, ``shared``
    (one model, broadcast over the clients) elsewhere. FedBN's start models and evaluation."""
    return jax.tree.map(
        lambda keep, s, c: c if keep else jnp.broadcast_to(s, c.shape).astype(c.dtype),
        local_mask, shared, local)


def local_leaves(tree: PyTree, local_mask: PyTree) -> list[Any]:
    """The leaves of ``tree`` where ``local_mask`` (a tree of Python bools shaped like it, e.g.
    :meth:`fedrnd.models.Model.local_layers`) is True, in flattening order: the part of a model
    that FedBN keeps on each client (a list, so a per-client state holds nothing else)."""
    return [x for x, keep in zip(jax.tree.leaves(tree), jax.tree.leaves(local_mask), strict=True)
            if keep]


def shared_leaves(tree: PyTree, local_mask: PyTree) -> list[Any]:
    """The leaves of ``tree`` where ``local_mask`` is False: what the server aggregates and
    what travels (see :func:`local_leaves`)."""
    return [x for x, keep in zip(jax.tree.leaves(tree), jax.tree.leaves(local_mask), strict=True)
            if not keep]


def with_local_leaves(shared: PyTree, local: list[Any], local_mask: PyTree) -> PyTree:
    """Each client's model ``[C, ...]``: ``shared`` (one model) broadcast over the clients, with
    the leaves where ``local_mask`` is True taken from ``local`` (:func:`local_leaves` of the
    clients' models, each ``[C, ...]``)."""
    flat, treedef = jax.tree.flatten(shared)
    keeps = jax.tree.leaves(local_mask)
    if len(keeps) != len(flat) or sum(keeps) != len(local) or not local:
        raise ValueError(f"{len(local)} local leaves for a mask that marks {sum(keeps)} of "
                         f"{len(flat)}; at least one is needed")
    c = local[0].shape[0]
    mine = iter(local)
    return jax.tree.unflatten(treedef, [
        next(mine) if keep else jnp.broadcast_to(s, (c, *jnp.shape(s)))
        for s, keep in zip(flat, keeps, strict=True)])


def segment_weighted_mean(tree: PyTree, weights: jax.Array, cluster_id: jax.Array,
                          num_slots: int) -> tuple[PyTree, jax.Array]:
    """Per-cluster weighted mean into ``num_slots`` slots.

    Args:
      tree: leaves ``[C, ...]``; weights: ``[C]``; cluster_id: ``[C]`` ints in ``[0, K)``.
    Returns:
      ``(slots, mass)``: leaves ``[K, ...]`` and the total weight per slot ``[K]``. An empty slot
      (mass 0) holds zeros; callers keep their previous model there.
    """
    mass = jax.ops.segment_sum(weights, cluster_id, num_segments=num_slots)
    safe = jnp.where(mass > 0, mass, 1.0)

    def agg(x):
        w = weights.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        s = jax.ops.segment_sum(w * x, cluster_id, num_segments=num_slots)
        return s / safe.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))

    return jax.tree.map(agg, tree), mass


def slot_means(sums: PyTree, mass: jax.Array) -> PyTree:
    """Weighted sums per slot (leaves ``[K, ...]``) divided by their mass ``[K]``; an empty slot
    (mass 0) holds zeros (see :func:`keep_nonempty`). The second half of
    :func:`segment_weighted_mean`, for sums made by :meth:`Engine.train_segment_sum`."""
    safe = jnp.where(mass > 0, mass, 1.0)
    return jax.tree.map(lambda s: s / safe.astype(s.dtype).reshape((-1,) + (1,) * (s.ndim - 1)),
                        sums)


def broadcast(slots: PyTree, cluster_id: jax.Array) -> PyTree:
    """Each client's copy of its cluster's model: leaves ``[K, ...] -> [C, ...]``."""
    return jax.tree.map(lambda s: s[cluster_id], slots)


def keep_nonempty(new_slots: PyTree, old_slots: PyTree, mass: jax.Array) -> PyTree:
    """Slots that received no client keep their previous model."""

    def pick(n, o):
        return jnp.where((mass > 0).reshape((-1,) + (1,) * (n.ndim - 1)), n, o)

    return jax.tree.map(pick, new_slots, old_slots)


def grow_slots(needed: int, current: int, max_slots: int = 4096) -> int:
    """Slot count to use when a method needs ``needed`` clusters and has ``current`` slots."""
    if needed <= current:
        return current
    if needed > max_slots:
        raise ValueError(f"{needed} clusters needed but the slot cap is {max_slots}; raise "
                         "max_slots (memory grows with slots x model size) or merge clusters")
    return min(max_slots, 1 << int(np.ceil(np.log2(needed))))


class EdgeList(NamedTuple):
    """A weighted directed graph on ``num_nodes`` nodes: ``[E]`` arrays, message ``src -> dst``.

    Padding edges have weight 0. Undirected graphs list both directions. Self-loops carry the
    node's own mixing weight.
    """

    src: jax.Array
    dst: jax.Array
    weight: jax.Array

    @property
    def num_edges(self) -> int:
        return int(self.src.shape[0])


def pad_edges(edges: EdgeList, multiple: int) -> EdgeList:
    """Pad with zero-weight self-edges on node 0 to a multiple of ``multiple`` edges."""
    e = edges.num_edges
    extra = (-e) % multiple
    if extra == 0:
        return edges
    z = jnp.zeros((extra,), edges.src.dtype)
    return EdgeList(jnp.concatenate([edges.src, z]), jnp.concatenate([edges.dst, z]),
                    jnp.concatenate([edges.weight, jnp.zeros((extra,), edges.weight.dtype)]))


def edge_aggregate(tree: PyTree, edges: EdgeList, num_nodes: int,
                   edge_chunk: int = 4096) -> PyTree:
    """``out[i] = sum_{e: dst_e = i} weight_e * x[src_e]`` for every leaf ``x: [N, ...]``.

    Edges are processed ``edge_chunk`` at a time in a scan, so at most ``edge_chunk`` messages
    exist at once; the result has the nodes' shapes.
    """
    chunk = max(1, min(edge_chunk, edges.num_edges))
    edges = pad_edges(edges, chunk)
    n_chunks = edges.num_edges // chunk
    src = edges.src.reshape(n_chunks, chunk)
    dst = edges.dst.reshape(n_chunks, chunk)
    w = edges.weight.reshape(n_chunks, chunk)

    def one_leaf(x):
        def body(acc, e):
            s, d, ww = e
            msg = x[s] * ww.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
            return acc + jax.ops.segment_sum(msg, d, num_segments=num_nodes), None

        acc, _ = jax.lax.scan(body, jnp.zeros((num_nodes, *x.shape[1:]), x.dtype), (src, dst, w))
        return acc

    return jax.tree.map(one_leaf, tree)
