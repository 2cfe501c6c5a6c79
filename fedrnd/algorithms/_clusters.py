"""Shared by the clustered methods: checks and weights for those that take a number of clusters
(IFCA, FeSEM) and the FedAvg round inside fixed cluster slots (RND, PACFL), plain or with a
robust aggregator and poisoners (:func:`cluster_round`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

WEIGHTING = ("samples", "uniform")
"""Per-cluster averaging weights: training-set sizes (FedAvg's) or one per client."""
WEIGHTING_DOC = "Per-cluster averaging weights: ``samples`` (training-set sizes) or ``uniform``."


def check_num_clusters(method: str, k: object, num_clients: int) -> None:
    """``ValueError`` unless ``k`` is an integer in ``[1, num_clients]``."""
    if k is None:
        raise ValueError(f"{method} needs num_clusters (the number of clusters K), e.g. "
                         f"options = {{num_clusters = 4}}")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= num_clients:
        raise ValueError(f"{method} num_clusters must be an integer in [1, num_clients="
                         f"{num_clients}], got {k!r}")


def aggregation_weights(weighting: str, counts: jax.Array) -> jax.Array:
    """Per-client aggregation weights ``[M]``: sample counts or ones."""
    counts = counts.astype(jnp.float32)
    return counts if weighting == "samples" else jnp.ones_like(counts)


def fixed_cluster_round(alg, state, data, key) -> tuple[dict, dict, jax.Array]:
    """One FedAvg round inside fixed clusters: every cohort client trains its cluster's slot,
    the slots become the sample-weighted means of their members (empty slots kept).

    ``state`` holds ``slots`` (leaves ``[K, ...]``), ``round`` and ``clients`` with
    ``cluster_id`` and ``hp``. Returns ``(slots, metrics, participating)``: the new slots,
    ``train_loss``, ``local_steps`` and the model traffic (``up/model``, ``down/model``).
    """
    from fedrnd.engine import comm, keep_nonempty, per_client, slot_means, tree_bytes

    k_cohort, k_train = jax.random.split(key)
    ids, part = alg.cohort(k_cohort, data.num_clients)
    cl, slots = state["clients"], state["slots"]
    cid = cl["cluster_id"] if ids is None else cl["cluster_id"][ids]
    # Per-slot sums straight out of the client map: memory of K models, not one per client.
    sums, mass, m = alg.engine.train_segment_sum(slots, cid, data, cl["hp"], k_train,
                                                 state["round"], ids=ids)
    nbytes = tree_bytes(jax.tree.map(lambda x: x[0], slots))
    metrics = {"train_loss": jnp.sum(m["loss"]) / jnp.sum(mass),
               "local_steps": jnp.sum(m["steps"]),
               **comm(up_model=per_client(nbytes, part), down_model=per_client(nbytes, part))}
    return keep_nonempty(slot_means(sums, mass), slots, mass), metrics, part


def cluster_round(alg, state, data, key, *, aggregation: str = "mean", trim: float = 0.1,
                  poisoners: np.ndarray | None = None, poison: str | None = None,
                  factor: float = 1.0) -> tuple[dict, dict, jax.Array]:
    """:func:`fixed_cluster_round`, or with ``aggregation`` other than ``"mean"`` or with
    ``poisoners`` (``[C]`` bool, sending their honest update times ``factor``, ``"scale"``,
    or ``-factor``, ``"sign_flip"``) its robust variant: one model per cohort client (memory
    of ``M`` models, not ``K``), updates aggregated per slot by
    :func:`~fedrnd.engine.robust.robust_aggregate` (``trim``: the trimmed mean's share).
    Same ``(slots, metrics, participating)``."""
    from fedrnd.engine import broadcast, comm, keep_nonempty, per_client, tree_bytes
    from fedrnd.engine.robust import poison_updates, robust_aggregate

    if aggregation == "mean" and poison is None:
        return fixed_cluster_round(alg, state, data, key)
    k_cohort, k_train = jax.random.split(key)
    ids, part = alg.cohort(k_cohort, data.num_clients)
    cl, slots = state["clients"], state["slots"]
    cid = cl["cluster_id"] if ids is None else cl["cluster_id"][ids]
    start = broadcast(slots, cid)
    params, _, m = alg.engine.train(None, data, cl["hp"], k_train, state["round"], ids=ids,
                                    client_params=start)
    updates = jax.tree.map(jnp.subtract, params, start)
    if poison is not None:
        bad = jnp.asarray(poisoners)
        updates = poison_updates(updates, bad if ids is None else bad[ids], poison, factor)
    w = (data.train_count if ids is None else data.train_count[ids]).astype(jnp.float32)
    k = jax.tree.leaves(slots)[0].shape[0]
    agg, mass = robust_aggregate(aggregation, updates, w, cid, k, trim=trim)
    nbytes = tree_bytes(jax.tree.map(lambda x: x[0], slots))
    metrics = {"train_loss": jnp.sum(w * m["loss"]) / jnp.sum(w),
               "local_steps": jnp.sum(m["steps"].astype(jnp.float32)),
               **comm(up_model=per_client(nbytes, part), down_model=per_client(nbytes, part))}
    return keep_nonempty(jax.tree.map(jnp.add, slots, agg), slots, mass), metrics, part
