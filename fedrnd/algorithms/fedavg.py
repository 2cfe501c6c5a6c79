"""FedAvg (McMahan et al., 2017), with FedOpt server optimizers (Reddi et al., 2021).

Each round: a cohort starts from the global model, trains locally, and the server averages the
cohort's models weighted by their sample counts. With a server optimizer other than SGD(lr=1),
the server applies it to the pseudo-gradient ``w - mean(w_c)`` (FedAdam, FedYogi, ...).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import optax

from fedrnd.algorithms.base import Algorithm, Metrics, State, option
from fedrnd.data.federated import FederatedData
from fedrnd.engine import ClientHParams, comm, per_client, server_optimizer, tree_bytes
from fedrnd.engine.optim import SERVER_OPTIMIZERS


@dataclasses.dataclass(frozen=True)
class FedAvg(Algorithm):
    """FedAvg (McMahan et al., 2017): sample-weighted mean of the cohort's local models."""

    name: ClassVar[str] = "fedavg"
    finetune_baseline: ClassVar[bool] = True
    server_opt: str = option("sgd", choices=SERVER_OPTIMIZERS, doc="Server optimizer of the "
                             "pseudo-gradient (FedOpt: ``adam`` is FedAdam, ``yogi`` FedYogi).")
    server_lr: float = option(1.0, finite=True, doc="Server learning rate.")
    prox_mu: float = option(0.0, low=0, doc="Proximal weight ``mu`` of the local loss.")

    @property
    def _server(self) -> optax.GradientTransformation:
        return server_optimizer(self.server_opt, self.server_lr)

    def init(self, key: jax.Array, data: FederatedData, hp: ClientHParams) -> State:
        params = self.engine.model.init(key)
        return {"round": jnp.zeros((), jnp.int32), "params": params,
                "server_opt": self._server.init(params), "clients": {"hp": hp}}

    def round(self, state: State, data: FederatedData, key: jax.Array) -> tuple[State, Metrics]:
        k_cohort, k_train = jax.random.split(key)
        ids, part = self.cohort(k_cohort, data.num_clients)
        params = state["params"]
        wsum, n, m = self.engine.train_sum(params, data, state["clients"]["hp"], k_train,
                                           state["round"], ids=ids,
                                           prox_mu=self.prox_mu if self.prox_mu else None)
        pseudo_grad = jax.tree.map(lambda p, s: p - s / n, params, wsum)  # w - mean(w_c)
        updates, opt = self._server.update(pseudo_grad, state["server_opt"], params)
        new_params = optax.apply_updates(params, updates)
        nbytes = tree_bytes(params)
        metrics = {"train_loss": m["loss"] / n, "local_steps": m["steps"],
                   **comm(up_model=per_client(nbytes, part), down_model=per_client(nbytes, part))}
        state = {**state, "round": state["round"] + 1, "params": new_params, "server_opt": opt}
        return state, metrics

    def models(self, state: State):
        return jax.tree.map(lambda p: p[None], state["params"]), jnp.zeros(
            state["clients"]["hp"].lr.shape, jnp.int32)


@dataclasses.dataclass(frozen=True)
class FedProx(FedAvg):
    """FedProx (Li et al., 2020): FedAvg whose local loss adds ``(mu/2) ||w - w_global||^2``."""

    name: ClassVar[str] = "fedprox"
    finetune_baseline: ClassVar[bool] = False
    prox_mu: float = 0.01
