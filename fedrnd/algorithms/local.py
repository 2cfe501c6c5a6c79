"""Local-only training: every client trains its own model on its own data, no communication.

All clients start from the same initial weights as the federated methods (a fair comparison)
and keep their model and optimizer state across rounds.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from fedrnd.algorithms.base import Algorithm, Metrics, State
from fedrnd.data.federated import FederatedData
from fedrnd.engine import ClientHParams, comm


@dataclasses.dataclass(frozen=True)
class Local(Algorithm):
    """Local-only baseline: each client trains its own model; nothing is communicated."""

    name: ClassVar[str] = "local"

    def init(self, key: jax.Array, data: FederatedData, hp: ClientHParams) -> State:
        params = self.engine.model.init(key)
        c = data.num_clients
        stacked = jax.tree.map(lambda p: jnp.broadcast_to(p, (c, *p.shape)), params)
        opt = jax.vmap(self.engine.optimizer.init)(stacked)
        return {"round": jnp.zeros((), jnp.int32),
                "clients": {"hp": hp, "params": stacked, "opt": opt}}

    def round(self, state: State, data: FederatedData, key: jax.Array) -> tuple[State, Metrics]:
        k_cohort, k_train = jax.random.split(key)
        ids, part = self.cohort(k_cohort, data.num_clients)
        cl = state["clients"]
        take = (lambda t: t) if ids is None else (lambda t: jax.tree.map(lambda a: a[ids], t))
        p, o, m = self.engine.train(None, data, cl["hp"], k_train, state["round"], ids=ids,
                                    client_params=take(cl["params"]), opt_state=take(cl["opt"]))
        if ids is not None:
            p = jax.tree.map(lambda a, b: a.at[ids].set(b), cl["params"], p)
            o = jax.tree.map(lambda a, b: a.at[ids].set(b), cl["opt"], o)
        counts = data.train_count.astype(jnp.float32) if ids is None else \
            data.train_count[ids].astype(jnp.float32)
        zero = jnp.zeros_like(part)
        metrics = {"train_loss": jnp.sum(m["loss"] * counts) / jnp.sum(counts),
                   "local_steps": jnp.sum(m["steps"]).astype(jnp.float32),
                   **comm(up_model=zero, down_model=zero)}
        return {**state, "round": state["round"] + 1,
                "clients": {**cl, "params": p, "opt": o}}, metrics

    def models(self, state: State):
        return state["clients"]["params"], None
