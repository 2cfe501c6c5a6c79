"""FeSEM, federated stochastic expectation maximisation (Xie et al., "Multi-center federated
learning", arXiv 2005.01026): k-means of the clients' model weights around ``K`` centres.

The server keeps ``K`` centres (the engine's slots, leaves ``[K, ...]``) and each client a
cluster id. A round, all inside one jitted program:

1. every (cohort) client trains its local model starting from its centre;
2. E-step: each client joins the centre nearest to its local model, in the L2 distance of the
   flattened weights;
3. M-step: each centre becomes the weighted mean of its clients' local models (training-set
   sizes by default, ``weighting="uniform"`` for the plain k-means mean); a centre no client
   joined keeps its weights.

Steps 2-3 are one Lloyd iteration; ``kmeans_iters`` repeats them on the round's local models
(the paper's stochastic EM does one per round; more make the round's clustering exact k-means).

Our reading of the paper where it is open: the paper alternates E-step, M-step and a local
update from the assigned centre, starting from local models it does not specify. Before any
training there is nothing to cluster, so all centres start at the initial weights every other
method starts from, and round 0 is a warm start: every client trains from those weights and
the centres are then *seeded* from the resulting local models by k-means++ (``seeding``;
``"random"`` picks ``K`` distinct clients' models), followed by the Lloyd iterations. From
then on each round is exactly steps 1-3. With ``K = 1`` FeSEM is FedAvg.

Clients are evaluated with their centre (``models`` returns the centres and cluster ids);
a client that has not yet taken part is in cluster 0. Ledger per participating client and
round: ``down/model`` one centre, ``up/model`` one local model.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from fedrnd.algorithms._clusters import (
    WEIGHTING,
    WEIGHTING_DOC,
    aggregation_weights,
    check_num_clusters,
)
from fedrnd.algorithms.base import Algorithm, Metrics, State, option
from fedrnd.data.federated import FederatedData
from fedrnd.engine import (
    ClientHParams,
    ClientMapper,
    broadcast,
    comm,
    keep_nonempty,
    per_client,
    segment_weighted_mean,
    tree_bytes,
)

SEEDING = ("kmeans++", "random")


def sq_distances(mapper: ClientMapper, models, centres) -> jax.Array:
    """``D[c, k] = ||w_c - centre_k||^2`` over all parameters.

    Args:
      models: per-client models, leaves ``[M, ...]``; centres: leaves ``[K, ...]``.
    Returns:
      ``[M, K]``.
    """

    def one(w, cs):
        def dist(c):
            return sum(jnp.sum((a - b) ** 2) for a, b in
                       zip(jax.tree.leaves(w), jax.tree.leaves(c), strict=True))

        return jax.vmap(dist)(cs)

    return mapper.map(one, models, centres)


def lloyd(mapper: ClientMapper, models, weights: jax.Array, centres, iters: int):
    """``iters`` weighted k-means (Lloyd) iterations of client models around ``centres``.

    Each iteration assigns every client to its nearest centre and moves each centre to the
    ``weights``-weighted mean of its clients; a centre with no client keeps its weights.
    Returns ``(centres, cluster_id [M], mass [K], dist [M])``: the last assignment, the centres
    it produced, the weight per centre and each client's squared distance at assignment.
    """
    k = jax.tree.leaves(centres)[0].shape[0]

    def step(carry, _):
        cs = carry
        d = sq_distances(mapper, models, cs)
        cid = jnp.argmin(d, axis=1).astype(jnp.int32)
        means, mass = segment_weighted_mean(models, weights, cid, k)
        return keep_nonempty(means, cs, mass), (cid, mass, jnp.min(d, axis=1))

    centres, (cid, mass, dist) = jax.lax.scan(step, centres, None, length=iters)
    return centres, cid[-1], mass[-1], dist[-1]


def seed_centres(mapper: ClientMapper, models, weights: jax.Array, num_clusters: int,
                 key: jax.Array, how: str = "kmeans++"):
    """``K`` initial centres picked among the client models (leaves ``[M, ...]``).

    ``"kmeans++"``: the first with probability proportional to ``weights``, each next one with
    probability proportional to ``weights * (squared distance to the nearest centre so far)``
    (Arthur & Vassilvitskii 2007); ``"random"``: ``K`` distinct clients, uniformly.
    """
    m = jax.tree.leaves(models)[0].shape[0]
    take = lambda i: jax.tree.map(lambda a: a[i], models)  # noqa: E731
    if how == "random":
        return take(jax.random.choice(key, m, (num_clusters,), replace=False))
    w = weights / jnp.sum(weights)
    first = jax.random.choice(jax.random.fold_in(key, 0), m, p=w)
    centres = jax.tree.map(
        lambda a: jnp.zeros((num_clusters, *a.shape[1:]), a.dtype).at[0].set(a[first]), models)

    def nearest(i):
        return sq_distances(mapper, models, jax.tree.map(lambda a: a[i][None], models))[:, 0]

    def body(j, carry):
        cs, d2 = carry
        p = w * d2
        # All clients already coincide with a centre: fall back to the weights.
        p = jnp.where(jnp.sum(p) > 0, p / jnp.where(jnp.sum(p) > 0, jnp.sum(p), 1.0), w)
        i = jax.random.choice(jax.random.fold_in(key, j), m, p=p)
        cs = jax.tree.map(lambda c, a: c.at[j].set(a[i]), cs, models)
        return cs, jnp.minimum(d2, nearest(i))

    centres, _ = jax.lax.fori_loop(1, num_clusters, body, (centres, nearest(first)))
    return centres


@dataclasses.dataclass(frozen=True)
class FeSEM(Algorithm):
    """FeSEM (Xie et al. 2020): k-means of client weights (L2) around ``K`` centres."""

    name: ClassVar[str] = "fesem"
    clusters_clients: ClassVar[bool] = True
    clusters_in_round: ClassVar[bool] = True  # every round reassigns by model distance
    num_clusters: int | None = option(
        None, low=1, doc="``K`` (required), an integer in ``[1, num_clients]``; the cohort must "
                         "hold at least ``K`` clients (centres are seeded from round 0's cohort).")
    kmeans_iters: int = option(5, low=1, doc="Lloyd iterations per round on the round's local "
                                             "models.")
    seeding: str = option("kmeans++", choices=SEEDING,
                          doc="How round 0 picks the centres: ``kmeans++`` or ``random``.")
    seed_trials: int = option(5, low=1, doc="Independent seedings at round 0, the lowest "
                                            "k-means inertia kept (scikit-learn's ``n_init``).")
    weighting: str = option("samples", choices=WEIGHTING, doc=WEIGHTING_DOC)

    def validate(self, data: FederatedData) -> None:
        super().validate(data)
        check_num_clusters(self.name, self.num_clusters, data.num_clients)
        if self.cohort_size is not None and self.cohort_size < self.num_clusters:
            raise ValueError(f"fesem seeds its {self.num_clusters} centres from the first "
                             f"round's clients; cohort_size={self.cohort_size} must be >= "
                             f"num_clusters")

    def init(self, key: jax.Array, data: FederatedData, hp: ClientHParams) -> State:
        self.validate(data)
        params = self.engine.model.init(key)
        k = self.num_clusters
        centres = jax.tree.map(lambda p: jnp.broadcast_to(p, (k, *p.shape)).copy(), params)
        return {"round": jnp.zeros((), jnp.int32), "slots": centres,
                "clients": {"hp": hp,
                            "cluster_id": jnp.zeros((data.num_clients,), jnp.int32)}}

    def seed(self, local, weights: jax.Array, key: jax.Array):
        """Initial centres from round 0's local models: ``seed_trials`` seedings, each refined
        by ``kmeans_iters`` Lloyd iterations; the one with the lowest inertia is kept."""
        mapper = self.engine.mapper

        def trial(k):
            cs = seed_centres(mapper, local, weights, self.num_clusters, k, self.seeding)
            cs, _, _, dist = lloyd(mapper, local, weights, cs, self.kmeans_iters)
            return cs, jnp.sum(weights * dist)

        keys = jax.random.split(key, self.seed_trials)
        cands, inertia = jax.lax.map(trial, keys)
        best = jnp.argmin(inertia)
        return jax.tree.map(lambda a: a[best], cands)

    def round(self, state: State, data: FederatedData, key: jax.Array) -> tuple[State, Metrics]:
        k_cohort, k_train, k_seed = jax.random.split(key, 3)
        ids, part = self.cohort(k_cohort, data.num_clients)
        cl = state["clients"]
        centres = state["slots"]
        cid = cl["cluster_id"] if ids is None else cl["cluster_id"][ids]
        # 1. Local update from the assigned centre.
        local, _, m = self.engine.train(None, data, cl["hp"], k_train, state["round"], ids=ids,
                                        client_params=broadcast(centres, cid))
        counts = data.train_count if ids is None else data.train_count[ids]
        w = aggregation_weights(self.weighting, counts)
        mapper = self.engine.mapper
        # Round 0: the centres all equal the initial model; seed them from the local models.
        start = jax.lax.cond(state["round"] == 0, lambda: self.seed(local, w, k_seed),
                             lambda: centres)
        # 2-3. E- and M-steps on this round's local models.
        new, new_cid, mass, dist = lloyd(mapper, local, w, start, self.kmeans_iters)
        cluster_id = new_cid if ids is None else cl["cluster_id"].at[ids].set(new_cid)
        n = counts.astype(jnp.float32)
        nbytes = tree_bytes(jax.tree.map(lambda s: s[0], centres))
        metrics = {"train_loss": jnp.sum(n * m["loss"]) / jnp.sum(n),
                   "local_steps": jnp.sum(m["steps"]).astype(jnp.float32),
                   "kmeans_inertia": jnp.sum(w * dist) / jnp.sum(w),
                   "clusters_used": jnp.sum(mass > 0).astype(jnp.float32),
                   "moved": jnp.sum(new_cid != cid).astype(jnp.float32),
                   **comm(up_model=per_client(nbytes, part), down_model=per_client(nbytes, part))}
        state = {**state, "round": state["round"] + 1, "slots": new,
                 "clients": {**cl, "cluster_id": cluster_id}}
        return state, metrics

    def models(self, state: State):
        return state["slots"], state["clients"]["cluster_id"]
