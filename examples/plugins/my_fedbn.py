"""FedBN (Li, Jiang, Zhang, Kamp and Dou, 2021) as a fedrnd plug-in: FedAvg whose BatchNorm
layers stay on each client.

FedBN is built in: ``name = "fedavg"`` (or ``"fedprox"``) with ``batchnorm = "local"`` (see
``docs/methods/fedavg.md``); use that. This file writes the same method from scratch, as a
worked example of a personalised method on ``Model.local_layers`` and ``keep_local``; the tests
check that both give the same models.

fedrnd's FedAvg averages a model's BatchNorm statistics (and scale and bias) with the other
weights. FedBN keeps them local: every client holds its own BatchNorm layers across rounds, the
server averages only the other weights, and each client is evaluated with the shared weights and
its own BatchNorm layers. ``Model.local_layers`` says which leaves those are (the model's state
and the weights of the layers that hold it); ``keep_local`` builds each client's model from the
shared one and its own leaves. Only the shared weights travel. With a model without BatchNorm
this is FedAvg. Every client's model is kept, ``[C, ...]``: meant for populations whose models
fit in memory side by side.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

import fedrnd
from fedrnd.algorithms import Algorithm
from fedrnd.engine import comm, keep_local, per_client, tree_bytes, weighted_mean


@fedrnd.register_algorithm
@dataclasses.dataclass(frozen=True)
class FedBN(Algorithm):
    """FedBN (Li et al., 2021): FedAvg with each client's BatchNorm layers kept local."""

    name: ClassVar[str] = "fedbn"

    def init(self, key, data, hp):
        params = self.engine.model.init(key)
        c = data.num_clients
        mine = jax.tree.map(lambda p: jnp.broadcast_to(p, (c, *p.shape)), params)
        return {"round": jnp.zeros((), jnp.int32), "params": params,
                "clients": {"hp": hp, "model": mine}}

    def round(self, state, data, key):
        k_cohort, k_train = jax.random.split(key)
        ids, part = self.cohort(k_cohort, data.num_clients)
        take = (lambda a: a) if ids is None else (lambda a: a[ids])
        shared, mine = state["params"], state["clients"]["model"]
        local = self.engine.model.local_layers(shared)
        start = keep_local(shared, jax.tree.map(take, mine), local)
        trained, _, m = self.engine.train(shared, data, state["clients"]["hp"], k_train,
                                          state["round"], ids=ids, client_params=start)
        n = take(data.train_count).astype(jnp.float32)
        # The local layers' mean too: what a client starts from before its first round.
        new_shared = weighted_mean(trained, n)
        mine = jax.tree.map(lambda a, t: t if ids is None else a.at[ids].set(t), mine, trained)
        nbytes = tree_bytes([p for p, keep in zip(jax.tree.leaves(shared),
                                                  jax.tree.leaves(local), strict=True)
                             if not keep])  # only the shared weights travel
        metrics = {"train_loss": jnp.sum(n * m["loss"]) / jnp.sum(n),
                   "local_steps": jnp.sum(m["steps"]),
                   **comm(up_model=per_client(nbytes, part), down_model=per_client(nbytes, part))}
        return {**state, "round": state["round"] + 1, "params": new_shared,
                "clients": {**state["clients"], "model": mine}}, metrics

    def models(self, state):
        # Personalised: each client's shared weights and own BatchNorm layers.
        local = self.engine.model.local_layers(state["params"])
        return keep_local(state["params"], state["clients"]["model"], local), None
