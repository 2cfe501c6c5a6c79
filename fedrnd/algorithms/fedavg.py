"""FedAvg (McMahan et al., 2017), with FedOpt server optimizers (Reddi et al., 2021).

Each round: a cohort starts from the global model, trains locally, and the server averages the
cohort's models weighted by their sample counts. With a server optimizer other than SGD(lr=1),
the server applies it to the pseudo-gradient ``w - mean(w_c)`` (FedAdam, FedYogi, ...).

BatchNorm is averaged like the other weights by default (``batchnorm = "average"``). With
``batchnorm = "local"`` it is FedBN (Li, Jiang, Zhang, Kamp and Dou, 2021): the leaves that
:meth:`fedrnd.models.Model.local_layers` marks (BatchNorm statistics, scale and bias) stay on
each client, ``state["clients"]["batchnorm"]`` (a list of ``[C, ...]`` leaves); a client starts
each round from the shared weights and its own BatchNorm layers, only the shared weights travel,
and each client is evaluated with its own. The server's model keeps the mean of the trained
BatchNorm layers too, unused by the clients (which hold their own from ``init`` on).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax

from fedrnd.algorithms.base import Algorithm, Metrics, State, option
from fedrnd.data.federated import FederatedData
from fedrnd.engine import (
    ClientHParams,
    comm,
    local_leaves,
    per_client,
    server_optimizer,
    shared_leaves,
    tree_bytes,
    with_local_leaves,
)
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
    batchnorm: str = option("average", choices=("average", "local"), doc="BatchNorm layers "
                            "(statistics, scale and bias): ``average`` them with the other "
                            "weights, or keep them ``local`` on each client, as FedBN (Li et "
                            "al., 2021) does; ``local`` needs a model with BatchNorm.")

    @property
    def _server(self) -> optax.GradientTransformation:
        return server_optimizer(self.server_opt, self.server_lr)

    def init(self, key: jax.Array, data: FederatedData, hp: ClientHParams) -> State:
        params = self.engine.model.init(key)
        clients = {"hp": hp}
        if self.batchnorm == "local":
            c = data.num_clients
            clients["batchnorm"] = [jnp.broadcast_to(p, (c, *p.shape))
                                    for p in local_leaves(params, self._local(params))]
        return {"round": jnp.zeros((), jnp.int32), "params": params,
                "server_opt": self._server.init(params), "clients": clients}

    def _local(self, params: Any) -> Any:
        """The mask of the leaves FedBN keeps on each client; ``ValueError`` when none."""
        mask = self.engine.model.local_layers(params)
        if not any(jax.tree.leaves(mask)):
            raise ValueError(
                f"{self.name} batchnorm='local' keeps each client's BatchNorm layers (FedBN), "
                f"but model {self.engine.model.name!r} has no BatchNorm (no state such as "
                "BatchNorm statistics); use batchnorm='average'")
        return mask

    def validate(self, data: FederatedData) -> None:
        super().validate(data)
        if self.batchnorm == "local":
            self._local(jax.eval_shape(self.engine.model.init, jax.random.key(0)))

    def round(self, state: State, data: FederatedData, key: jax.Array) -> tuple[State, Metrics]:
        k_cohort, k_train = jax.random.split(key)
        ids, part = self.cohort(k_cohort, data.num_clients)
        params, clients = state["params"], state["clients"]
        prox_mu = self.prox_mu if self.prox_mu else None
        if self.batchnorm == "local":
            local = self._local(params)
            wsum, n, m, clients = self._train_fedbn(params, local, clients, data, k_train,
                                                    state["round"], ids, prox_mu)
            nbytes = tree_bytes(shared_leaves(params, local))  # only the shared weights travel
        else:
            wsum, n, m = self.engine.train_sum(params, data, clients["hp"], k_train,
                                               state["round"], ids=ids, prox_mu=prox_mu)
            nbytes = tree_bytes(params)
        pseudo_grad = jax.tree.map(lambda p, s: p - s / n, params, wsum)  # w - mean(w_c)
        updates, opt = self._server.update(pseudo_grad, state["server_opt"], params)
        new_params = optax.apply_updates(params, updates)
        metrics = {"train_loss": m["loss"] / n, "local_steps": m["steps"],
                   **comm(up_model=per_client(nbytes, part), down_model=per_client(nbytes, part))}
        state = {**state, "round": state["round"] + 1, "params": new_params, "server_opt": opt,
                 "clients": clients}
        return state, metrics

    def _train_fedbn(self, params, local, clients, data, key, round_idx, ids, prox_mu):
        """FedBN's local training: each cohort client starts from the shared weights and its
        own BatchNorm layers, and keeps the BatchNorm layers it trained. Returns what
        ``Engine.train_sum`` does (``sum_c n_c w_c``, ``sum_c n_c``, metric sums) and the
        clients' state with their new BatchNorm layers."""
        take = (lambda a: a) if ids is None else (lambda a: a[ids])
        mine = clients["batchnorm"]
        start = with_local_leaves(params, [take(a) for a in mine], local)  # [M, ...]
        trained, _, m = self.engine.train(params, data, clients["hp"], key, round_idx, ids=ids,
                                          client_params=start, prox_mu=prox_mu)
        w = take(data.train_count).astype(jnp.float32)
        wsum = jax.tree.map(lambda t: jnp.tensordot(w.astype(t.dtype), t, axes=1), trained)
        mine = [t if ids is None else a.at[ids].set(t)
                for a, t in zip(mine, local_leaves(trained, local), strict=True)]
        sums = {"loss": jnp.sum(w * m["loss"]), "steps": jnp.sum(m["steps"].astype(jnp.float32))}
        return wsum, jnp.sum(w), sums, {**clients, "batchnorm": mine}

    def models(self, state: State):
        if self.batchnorm == "local":
            # Personalised: the shared weights with each client's own BatchNorm layers.
            params = state["params"]
            return with_local_leaves(params, state["clients"]["batchnorm"],
                                     self._local(params)), None
        return jax.tree.map(lambda p: p[None], state["params"]), jnp.zeros(
            state["clients"]["hp"].lr.shape, jnp.int32)


@dataclasses.dataclass(frozen=True)
class FedProx(FedAvg):
    """FedProx (Li et al., 2020): FedAvg whose local loss adds ``(mu/2) ||w - w_global||^2``."""

    name: ClassVar[str] = "fedprox"
    finetune_baseline: ClassVar[bool] = False
    prox_mu: float = 0.01
