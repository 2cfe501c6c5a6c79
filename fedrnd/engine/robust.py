"""Robust aggregation inside clusters, and the poisoned updates it is measured against.

Every function is pure and works over the leading client axis of a pytree of *updates*
(``u_c = p_c - p_start``, leaves ``[M, ...]``), per cluster slot as in
:mod:`fedrnd.engine.aggregate`: client ``c`` belongs to slot ``cluster_id[c]`` in ``[0, K)``
and the result has leaves ``[K, ...]`` (an empty slot holds zeros; callers keep its model with
:func:`~fedrnd.engine.keep_nonempty`). Shapes are static, so everything jits and vmaps.

Aggregators (``AGGREGATORS``), each a classic defence against a minority of clients that send
arbitrary updates once they are inside a federation:

* ``"mean"``: the weighted mean (FedAvg), no defence: one update scaled by ``s`` moves the
  cluster model by ``s / n`` of it.
* ``"median"``: the coordinate-wise median of the members' updates (Yin et al. 2018,
  "Byzantine-robust distributed learning"); unweighted.
* ``"trimmed_mean"``: per coordinate, drop the ``floor(trim * n)`` smallest and largest of the
  ``n`` members' values and average the rest (Yin et al. 2018); unweighted.
* ``"clip"``: the weighted mean of updates clipped to the cluster's median update norm (norm
  clipping, Sun et al. 2019, "Can you really backdoor federated learning?", with a threshold
  that a minority cannot move): a scaled update weighs no more than a typical one. It does
  not stop a sign-flipped update of typical norm.

Median and trimmed mean sort the members' values per coordinate: ``O(K M P log M)`` work and
``K x M x P`` memory for ``P`` parameters (one slot at a time under :func:`jax.lax.map`), so
they are meant for the per-client path of small and medium populations, not the ``K``-model
memory of :meth:`~fedrnd.engine.Engine.train_segment_sum`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any

__all__ = ["AGGREGATORS", "POISONS", "clip_by_norm", "coordinate_median", "poison_updates",
           "robust_aggregate", "segment_median", "tree_norms", "trimmed_mean"]

AGGREGATORS = ("mean", "median", "trimmed_mean", "clip")
POISONS = ("scale", "sign_flip")


def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
    return v.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))


def tree_norms(updates: PyTree) -> jax.Array:
    """The L2 norm of each client's whole update (all leaves together): ``[M]``."""
    sq = [jnp.sum(jnp.square(x.reshape(x.shape[0], -1)), axis=1)
          for x in jax.tree.leaves(updates)]
    return jnp.sqrt(sum(sq))


def clip_by_norm(updates: PyTree, max_norm: jax.Array) -> PyTree:
    """Scale each client's update down to norm at most ``max_norm`` (scalar or ``[M]``)."""
    norm = tree_norms(updates)
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-12))
    return jax.tree.map(lambda x: x * _bcast(scale, x), updates)


def _member_order_stats(x: jax.Array, cluster_id: jax.Array, num_slots: int, fn):
    """``fn(sorted, n)`` per slot, where ``sorted [M, ...]`` holds the slot's members' values
    sorted along the client axis (non-members last, as NaN) and ``n`` their number."""

    def one(k):
        member = cluster_id == k
        xs = jnp.sort(jnp.where(_bcast(member, x), x, jnp.nan), axis=0)  # NaN sorts last
        return fn(xs, jnp.sum(member))

    return jax.lax.map(one, jnp.arange(num_slots))


def segment_median(values: jax.Array, cluster_id: jax.Array, num_slots: int) -> jax.Array:
    """The median of ``values [M]`` per slot: ``[K]`` (0 for an empty slot)."""
    return coordinate_median({"v": values}, cluster_id, num_slots)[0]["v"]


def coordinate_median(updates: PyTree, cluster_id: jax.Array, num_slots: int
                      ) -> tuple[PyTree, jax.Array]:
    """Coordinate-wise median of the members' updates per slot.

    Args:
      updates: leaves ``[M, ...]``; cluster_id: ``[M]`` ints in ``[0, K)``; num_slots: ``K``.
    Returns:
      ``(slots, count)``: leaves ``[K, ...]`` and members per slot ``[K]``; an even count takes
      the mean of the two middle values, an empty slot holds zeros.
    """

    def med(xs, n):
        lo = jnp.take(xs, jnp.maximum((n - 1) // 2, 0), axis=0)
        hi = jnp.take(xs, jnp.maximum(n // 2, 0), axis=0)
        return jnp.where(n > 0, 0.5 * (lo + hi), 0.0)

    count = jax.ops.segment_sum(jnp.ones_like(cluster_id), cluster_id, num_segments=num_slots)
    return jax.tree.map(lambda x: _member_order_stats(x, cluster_id, num_slots, med),
                        updates), count


def trimmed_mean(updates: PyTree, cluster_id: jax.Array, num_slots: int, trim: float
                 ) -> tuple[PyTree, jax.Array]:
    """Coordinate-wise trimmed mean per slot: of a slot's ``n`` values per coordinate, the
    ``floor(trim * n)`` smallest and largest are dropped and the rest averaged.

    ``trim`` in ``[0, 0.5)``; ``0`` is the unweighted mean. Returns ``(slots, count)`` as
    :func:`coordinate_median`.
    """
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim!r}")

    def tmean(xs, n):
        t = jnp.floor(trim * n).astype(jnp.int32)
        rank = jnp.arange(xs.shape[0]).reshape((-1,) + (1,) * (xs.ndim - 1))
        keep = (rank >= t) & (rank < n - t)
        tot = jnp.sum(jnp.where(keep, xs, 0.0), axis=0)
        return tot / jnp.maximum(n - 2 * t, 1).astype(xs.dtype)

    count = jax.ops.segment_sum(jnp.ones_like(cluster_id), cluster_id, num_segments=num_slots)
    return jax.tree.map(lambda x: _member_order_stats(x, cluster_id, num_slots, tmean),
                        updates), count


def robust_aggregate(kind: str, updates: PyTree, weights: jax.Array, cluster_id: jax.Array,
                     num_slots: int, *, trim: float = 0.1) -> tuple[PyTree, jax.Array]:
    """Aggregate updates per slot with the aggregator ``kind`` (``AGGREGATORS``).

    Args:
      updates: leaves ``[M, ...]``; weights: ``[M]`` (used by ``"mean"`` and ``"clip"``; a
        weight of 0 leaves a client out of every aggregator); cluster_id: ``[M]``.
    Returns:
      ``(slots, mass)``: the aggregated update per slot (leaves ``[K, ...]``, zeros when the
      slot has no member) and the total weight per slot ``[K]`` (callers keep slots of mass 0).
    """
    from fedrnd.engine.aggregate import segment_weighted_mean

    if kind not in AGGREGATORS:
        raise ValueError(f"aggregation must be one of {list(AGGREGATORS)}, got {kind!r}")
    weights = weights.astype(jnp.float32)
    mass = jax.ops.segment_sum(weights, cluster_id, num_segments=num_slots)
    # Clients of weight 0 (padding, absent) go to a slot past the end and are dropped.
    cid = jnp.where(weights > 0, cluster_id, num_slots)
    if kind == "mean":
        return segment_weighted_mean(updates, weights, cluster_id, num_slots)[0], mass
    if kind == "clip":
        bound = segment_median(tree_norms(updates), cid, num_slots + 1)[cid]
        return segment_weighted_mean(clip_by_norm(updates, bound), weights, cluster_id,
                                     num_slots)[0], mass
    if kind == "median":
        out, _ = coordinate_median(updates, cid, num_slots + 1)
    else:
        out, _ = trimmed_mean(updates, cid, num_slots + 1, trim)
    return jax.tree.map(lambda x: x[:num_slots], out), mass


def poison_updates(updates: PyTree, poisoner: jax.Array, kind: str, factor: float) -> PyTree:
    """The updates that poisoners send instead of their honest ones.

    ``poisoner [M]`` bool; ``kind`` in ``POISONS``: ``"scale"`` multiplies the honest update by
    ``factor`` (model replacement, Bagdasaryan et al. 2020), ``"sign_flip"`` by ``-factor``
    (gradient ascent on the federation's objective). Honest clients' updates are unchanged.
    """
    if kind not in POISONS:
        raise ValueError(f"poison must be one of {list(POISONS)}, got {kind!r}")
    f = factor if kind == "scale" else -factor
    mult = jnp.where(poisoner, f, 1.0)
    return jax.tree.map(lambda x: x * _bcast(mult, x), updates)
