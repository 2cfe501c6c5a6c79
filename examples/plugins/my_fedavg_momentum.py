"""FedAvgM: FedAvg with server momentum (Hsu, Qi and Brown, 2019), as a fedrnd plug-in.

Each round a cohort trains from the global model ``w``; the server forms the pseudo-gradient
``d = w - mean_c(w_c)`` (sample-weighted), accumulates it in a velocity ``v <- beta v + d`` and
steps ``w <- w - server_lr v``. With ``momentum = 0`` and ``server_lr = 1`` this is FedAvg.
Model state that is no weight (BatchNorm statistics) takes no momentum step: it is averaged.

Nothing in fedrnd is edited: ``examples/plugins/config.toml`` lists this file under
``plugins``, and ``fedrnd run examples/plugins/config.toml`` loads it before checking the
config. The method is written from the engine's primitives, like the built-in ones.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import optax

import fedrnd
from fedrnd.algorithms import Algorithm, Report
from fedrnd.engine import comm, per_client, tree_bytes


@fedrnd.register_algorithm
@dataclasses.dataclass(frozen=True)
class FedAvgMomentum(Algorithm):
    """FedAvgM (Hsu et al., 2019): FedAvg whose server applies heavy-ball momentum."""

    name: ClassVar[str] = "fedavg_momentum"
    momentum: float = 0.9
    server_lr: float = 1.0

    def validate(self, data) -> None:
        super().validate(data)
        if not 0 <= self.momentum < 1:  # "momentum ..." is reported as that option's error
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not self.server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {self.server_lr}")

    def init(self, key, data, hp):
        params = self.engine.model.init(key)  # the initial model every method starts from
        weights, _ = self.engine.model.split(params)  # less any BatchNorm statistics
        return {"round": jnp.zeros((), jnp.int32), "params": params,
                "velocity": jax.tree.map(jnp.zeros_like, weights), "clients": {"hp": hp}}

    def round(self, state, data, key):
        k_cohort, k_train = jax.random.split(key)
        ids, part = self.cohort(k_cohort, data.num_clients)
        model = self.engine.model
        # sum_c n_c w_c and sum_c n_c straight out of the client map: one model in memory.
        wsum, n, m = self.engine.train_sum(state["params"], data, state["clients"]["hp"],
                                           k_train, state["round"], ids=ids)
        w, _ = model.split(state["params"])
        mean, mean_stats = model.split(jax.tree.map(lambda s: s / n, wsum))
        v = jax.tree.map(lambda v, w, m: self.momentum * v + (w - m), state["velocity"], w, mean)
        new = model.merge(jax.tree.map(lambda w, v: w - self.server_lr * v, w, v), mean_stats)
        nbytes = tree_bytes(state["params"])  # every participant downloads and uploads one model
        metrics = {"train_loss": m["loss"] / n, "local_steps": m["steps"],
                   **comm(up_model=per_client(nbytes, part), down_model=per_client(nbytes, part))}
        return {**state, "round": state["round"] + 1, "params": new, "velocity": v}, metrics

    def models(self, state):
        # One slot, every client assigned to it.
        slots = jax.tree.map(lambda p: p[None], state["params"])
        return slots, jnp.zeros(state["clients"]["hp"].lr.shape, jnp.int32)

    def report(self, state, data) -> Report:
        # A figure for final.json; Artifact values in Report.artifacts become files.
        return Report({"velocity_norm": float(optax.global_norm(state["velocity"]))})
