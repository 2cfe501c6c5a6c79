"""IFCA, the Iterative Federated Clustering Algorithm (Ghosh et al., NeurIPS 2020).

The server keeps ``K`` cluster models (the engine's slots, leaves ``[K, ...]``) and sends all of
them to every client of the round. Each client estimates its cluster identity as the model
with the lowest loss on its own training data, ``argmin_k L_c(theta_k)``, trains that model
and sends it back; the server averages the returned models per cluster. The number of
clusters ``K`` is given.

Both of the paper's server updates are here (``averaging``):

- ``"model"`` (the paper's model averaging, the default): the chosen model is trained with
  the engine's local schedule (epochs or steps, each client's own optimizer) and the server
  takes the per-cluster weighted mean of the trained models.
- ``"gradient"`` (the paper's gradient averaging): each client computes one full-batch
  gradient of its loss at the chosen model and sends its step ``lr_c * g_c``; the server
  moves every cluster model by the weighted mean step of its clients. Equal to ``"model"``
  with one full-batch SGD step, at the cost of one forward and backward pass.

Weights are training-set sizes (``weighting="samples"``, FedAvg's) or one per client
(``"uniform"``, the paper's plain mean). Clusters that no client chose keep their model.

Initialisation: ``K`` independent random initialisations of the task model; slot 0 uses the
initial weights every other method starts from, so IFCA with ``K = 1`` is FedAvg. The paper
reports that random initialisation works when combined with *random restarts*:
``restarts = R > 1`` draws ``R`` independent sets of ``K`` models, runs ``restart_rounds``
IFCA rounds from each inside :meth:`IFCA.init`, and keeps the set with the lowest total
training loss ``sum_c w_c min_k L_c(theta_k)``; the main run then starts from round 0 with that
set. The restarts' traffic is reported in the first round as ``up/restarts`` and
``down/restarts`` (their rounds' model traffic, plus ``R * K`` models down and ``R`` losses up
for the selection).

Cluster estimates live in ``state["clients"]["cluster_id"]`` ``[C]``: every client's choice in
the latest round it took part in (before round 0, its choice among the initial models). A
client is evaluated with that cluster's *current* model; the paper's test-time rule
re-estimates the identity on the client's training data against the final models, which
differs only while assignments still move.

Ledger per participating client and round: ``down/model`` ``K`` models, ``up/model`` one model
(or one gradient step, the same size).
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
    cluster_losses,
    comm,
    keep_nonempty,
    per_client,
    slot_means,
    tree_bytes,
)

AVERAGING = ("model", "gradient")
LOSS_BYTES = 4
"""A float32 loss value, what a client reports per candidate set during restarts."""


@dataclasses.dataclass(frozen=True)
class IFCA(Algorithm):
    """IFCA (Ghosh et al. 2020): each client trains the cluster model with its lowest loss."""

    name: ClassVar[str] = "ifca"
    clusters_clients: ClassVar[bool] = True
    clusters_in_round: ClassVar[bool] = True  # every round re-estimates the identities
    num_clusters: int | None = option(None, low=1, doc="``K`` (required), an integer in "
                                                       "``[1, num_clients]``.")
    averaging: str = option("model", choices=AVERAGING, doc="``model`` or ``gradient`` (see "
                                                            "the module docstring).")
    weighting: str = option("samples", choices=WEIGHTING, doc=WEIGHTING_DOC)
    restarts: int = option(1, low=1, doc="Random initialisations tried (1: no restarts).")
    restart_rounds: int = option(10, low=0, doc="IFCA rounds run from each initialisation "
                                                "before choosing one.")

    def validate(self, data: FederatedData) -> None:
        super().validate(data)
        check_num_clusters(self.name, self.num_clusters, data.num_clients)
        if self.averaging == "gradient" and not self.engine.model.plain:
            raise ValueError(f"{self.name}: averaging = 'gradient' differentiates Model.apply in "
                             f"every leaf; model {self.engine.model.name!r} has dropout or state "
                             f"(BatchNorm), so use averaging = 'model'")

    # ---------------------------------------------------------------------------------------
    def _random_slots(self, key: jax.Array, restart: int):
        """``K`` independent initialisations; restart 0's slot 0 is the shared initial model."""
        k = self.num_clusters
        keys = [key if restart == 0 and j == 0 else jax.random.fold_in(key, 1 + restart * k + j)
                for j in range(k)]
        models = [self.engine.model.init(kk) for kk in keys]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *models)

    def choose(self, slots, data: FederatedData) -> jax.Array:
        """Every client's cluster estimate ``[C]`` among ``slots``: its lowest-loss model."""
        return jnp.argmin(cluster_losses(self.engine, slots, data), axis=1).astype(jnp.int32)

    def _fresh(self, key: jax.Array, restart: int, data: FederatedData,
               hp: ClientHParams) -> State:
        slots = self._random_slots(key, restart)
        cid = _jit_choose(self, slots, data)
        zero = jnp.zeros((data.num_clients,), jnp.float32)
        return {"round": jnp.zeros((), jnp.int32), "slots": slots,
                "clients": {"hp": hp, "cluster_id": cid, "pending_up": zero,
                            "pending_down": zero}}

    def total_loss(self, state: State, data: FederatedData) -> jax.Array:
        """``sum_c w_c min_k L_c(theta_k)`` over all clients: what restarts minimise."""
        losses = cluster_losses(self.engine, state["slots"], data)
        w = aggregation_weights(self.weighting, data.train_count)
        return jnp.sum(w * jnp.min(losses, axis=1))

    def init(self, key: jax.Array, data: FederatedData, hp: ClientHParams) -> State:
        self.validate(data)
        if self.restarts == 1:
            return self._fresh(key, 0, data, hp)
        candidates, scores = [], []
        up = jnp.zeros((data.num_clients,), jnp.float32)
        down = jnp.zeros((data.num_clients,), jnp.float32)
        for r in range(self.restarts):
            state = self._fresh(key, r, data, hp)
            for t in range(self.restart_rounds):
                rk = jax.random.fold_in(jax.random.fold_in(key, 1_000_003), r * 100_003 + t)
                state, m = _jit_round(self, state, data, rk)
                up = up + m["up/model"]
                down = down + m["down/model"]
            candidates.append(state)
            scores.append(_jit_total_loss(self, state, data))
        best = jnp.argmin(jnp.stack(scores))
        chosen = jax.tree.map(lambda *xs: jnp.stack(xs)[best], *candidates)
        # Selection: every client scores all R x K models and reports one loss per set.
        nbytes = tree_bytes(jax.tree.map(lambda s: s[0], chosen["slots"]))
        up = up + float(self.restarts * LOSS_BYTES)
        down = down + float(self.restarts * self.num_clusters * nbytes)
        return {**chosen, "round": jnp.zeros((), jnp.int32),
                "clients": {**chosen["clients"], "hp": hp, "pending_up": up,
                            "pending_down": down}}

    # ---------------------------------------------------------------------------------------
    def round(self, state: State, data: FederatedData, key: jax.Array) -> tuple[State, Metrics]:
        k_cohort, k_train = jax.random.split(key)
        ids, part = self.cohort(k_cohort, data.num_clients)
        cl = state["clients"]
        slots = state["slots"]
        # Cluster identity estimation: every (cohort) client scores all K models.
        losses = cluster_losses(self.engine, slots, data, ids)
        cid = jnp.argmin(losses, axis=1).astype(jnp.int32)
        counts = data.train_count if ids is None else data.train_count[ids]
        w = aggregation_weights(self.weighting, counts)
        if self.averaging == "model":
            sums, mass, m = self.engine.train_segment_sum(slots, cid, data, cl["hp"], k_train,
                                                          state["round"], ids=ids, weights=w)
            new = slot_means(sums, mass)
            steps = jnp.sum(m["steps"])
            train_loss = jnp.sum(m["loss"]) / jnp.sum(mass)
        else:
            step_sums, mass = self._gradient_steps(slots, cid, w, data, cl["hp"],
                                                   state["round"], ids)
            new = jax.tree.map(jnp.subtract, slots, slot_means(step_sums, mass))
            steps = jnp.sum(part)
            train_loss = jnp.sum(w * jnp.min(losses, axis=1)) / jnp.sum(w)
        slots = keep_nonempty(new, slots, mass)
        cluster_id = cid if ids is None else cl["cluster_id"].at[ids].set(cid)
        k = self.num_clusters
        nbytes = tree_bytes(jax.tree.map(lambda s: s[0], state["slots"]))
        zero = jnp.zeros_like(cl["pending_up"])
        metrics = {"train_loss": train_loss, "local_steps": steps,
                   "cluster_loss": jnp.sum(w * jnp.min(losses, axis=1)) / jnp.sum(w),
                   "clusters_used": jnp.sum(mass > 0).astype(jnp.float32),
                   **comm(up_model=per_client(nbytes, part),
                          down_model=per_client(k * nbytes, part),
                          up_restarts=cl["pending_up"], down_restarts=cl["pending_down"])}
        state = {**state, "round": state["round"] + 1, "slots": slots,
                 "clients": {**cl, "cluster_id": cluster_id, "pending_up": zero,
                             "pending_down": zero}}
        return state, metrics

    def _gradient_steps(self, slots, cid, w, data, hp, round_idx, ids):
        """Per-slot sums of ``w_c * lr_c * grad L_c(theta_{cid_c})`` and the mass ``[K]``."""
        take = (lambda a: a) if ids is None else (lambda a: a[ids])
        per = dict(idx=take(data.train_idx), count=take(data.train_count), cid=cid, w=w,
                   lr=take(hp.lr) * self.engine.lr_scale(round_idx))
        grad_fn = jax.grad(self.engine.loss_fn)

        def one(client, shared):
            sl, x_pool, y_pool = shared
            idx = client["idx"]
            x, y = x_pool[idx], y_pool[idx]
            mask = (jnp.arange(idx.shape[0]) < client["count"]).astype(x.dtype)
            p = jax.tree.map(lambda s: s[client["cid"]], sl)
            g = grad_fn(p, x, y, mask)
            scale = client["w"] * client["lr"]
            return client["cid"], (jax.tree.map(lambda a: scale.astype(a.dtype) * a, g),
                                   client["w"])

        return self.engine.mapper.segment_sum(one, per, (slots, data.x, data.y),
                                              num_segments=self.num_clusters)

    def models(self, state: State):
        return state["slots"], state["clients"]["cluster_id"]


# Compiled once per (hashable) configuration, for the host-side work in ``init``.
_jit_choose = jax.jit(IFCA.choose, static_argnums=0)
_jit_round = jax.jit(IFCA.round, static_argnums=0)
_jit_total_loss = jax.jit(IFCA.total_loss, static_argnums=0)
