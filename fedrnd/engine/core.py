"""The client engine: local training of many clients as one jitted program.

An :class:`Engine` bundles what is static about client work (the model, the local schedule,
the optimizer kinds, how the client axis is mapped). Algorithms call :meth:`Engine.train` (one
model per client out), :meth:`Engine.train_sum` (a weighted sum of client models out, without
stacking them) or :meth:`Engine.train_segment_sum` (weighted sums per cluster slot, each client
starting from its slot's model; memory of ``K`` models); all derive each client's random key from its id (``fold_in``), so results do
not depend on chunking, cohort order or device count.

``path`` picks how local training runs: ``"general"`` is :func:`~fedrnd.engine.local_train`
mapped over clients; ``"lowrank"`` is the exact fast path of :mod:`fedrnd.engine.lowrank`
(dense models, optimizers linear in the gradient; no per-client weight copies); ``"auto"``
(default) takes the fast path where it applies and its cost model says it pays. A call the
fast path cannot serve (per-client start models, carried optimizer state) always runs the
general path.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fedrnd.data.federated import FederatedData
from fedrnd.engine import lowrank
from fedrnd.engine.clientmap import ClientMapper
from fedrnd.engine.local import (
    LOSSES,
    LocalSpec,
    LossFn,
    TrainLoss,
    local_train,
    model_loss,
    named_loss,
)
from fedrnd.engine.optim import ClientHParams, ClientOptimizer
from fedrnd.models import Model

PyTree = Any

GATHER_ONCE_BYTES = 256 * 2**20
"""Largest ``chunk x N x row`` bytes of client rows that :meth:`Engine.train` gathers once per
round (:func:`~fedrnd.engine.local_train` ``gather_once``); beyond it, per step."""


def client_keys(key: jax.Array, client_ids: jax.Array) -> jax.Array:
    """One key per client, ``fold_in(key, id)``: independent of order and chunking."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(client_ids)


def sample_cohort(key: jax.Array, num_clients: int, cohort_size: int) -> jax.Array:
    """``cohort_size`` distinct client ids, sorted (all clients when the sizes are equal)."""
    if cohort_size >= num_clients:
        return jnp.arange(num_clients)
    return jnp.sort(jax.random.choice(key, num_clients, (cohort_size,), replace=False))


@dataclasses.dataclass(frozen=True)
class Engine:
    """Static description of client work. Hashable, so it can close over jitted functions.

    ``loss``: ``None`` or a name of :data:`~fedrnd.engine.local.LOSSES` (``"cross_entropy"``,
    the default, or ``"mse"``), which runs any model, through ``Model.train_apply`` when it has
    dropout or state; or a user :data:`~fedrnd.engine.local.LossFn` ``(params, x, y, mask)``,
    for models without dropout or state.
    """

    model: Model
    local: LocalSpec = LocalSpec()
    optimizer: ClientOptimizer = ClientOptimizer()
    mapper: ClientMapper = ClientMapper()
    schedule: Callable[[jax.Array], jax.Array] | None = None
    loss: LossFn | str | None = None
    path: str = "auto"

    def __post_init__(self):
        if self.path not in lowrank.PATHS:
            raise ValueError(f"Engine path={self.path!r} is unknown; allowed: {list(lowrank.PATHS)}")
        if isinstance(self.loss, str) and self.loss not in LOSSES:
            raise ValueError(f"Engine loss={self.loss!r} is unknown; allowed: "
                             f"{', '.join(LOSSES)} or a function (params, x, y, mask)")
        if callable(self.loss) and not self.model.plain:
            raise ValueError(f"Engine loss: a custom loss takes (params, x, y, mask) and cannot "
                             f"run model {self.model.name!r}, which has dropout or state "
                             f"(Model.train_apply); use a named loss ({', '.join(LOSSES)})")
        if self.path == "lowrank":
            reason = lowrank.why_not(self.model, self.optimizer, self._other_loss)
            if reason:
                raise ValueError(f"Engine path='lowrank' cannot be used: {reason}")

    def use_lowrank(self, data: FederatedData, *, slots: int = 1, materialize: int = 0) -> bool:
        """Whether a call on ``data`` takes the low-rank fast path (a static decision)."""
        if self.path == "general":
            return False
        if self.path == "lowrank":
            return True
        if lowrank.why_not(self.model, self.optimizer, self._other_loss) is not None:
            return False
        return lowrank.pays(self.model, self.local, data.train_idx.shape[1], slots=slots,
                            materialize=materialize)

    def _lowrank(self, mode, slots, per, data, round_idx, prox_mu, num_slots=1):
        if prox_mu is not None:
            per = {**per, "mu": jnp.full_like(per["lr"], prox_mu)}
        if self.optimizer.schedules:  # a kind's own schedule is a factor of its clients' lr
            per = {**per, "lr": per["lr"] * self.optimizer.kind_lr_scale(round_idx)[per["kind"]]}
        return lowrank.run(self.model, self.local, self.optimizer, self.mapper, mode, slots, per,
                           data.x, data.y, self.lr_scale(round_idx), num_slots=num_slots)

    @property
    def _other_loss(self) -> LossFn | str | None:
        """``loss`` unless it is the default cross-entropy (the one the low-rank path computes)."""
        return None if self.loss is None or self.loss == "cross_entropy" else self.loss

    @property
    def loss_fn(self) -> LossFn:
        """The loss of a model tree in evaluation mode (IFCA's cluster choice, scores)."""
        if callable(self.loss):
            return self.loss
        return named_loss(self.loss or "cross_entropy", self.model.apply)

    @property
    def train_loss(self) -> LossFn | TrainLoss:
        """The local training loss: :attr:`loss_fn`, or a :class:`~fedrnd.engine.local.TrainLoss`
        through ``Model.train_apply`` for a model with dropout or state."""
        if callable(self.loss):
            return self.loss
        return model_loss(self.model, self.loss or "cross_entropy")

    def lr_scale(self, round_idx: jax.Array) -> jax.Array:
        """The lr multiplier of every client at ``round_idx`` (the engine's ``schedule``)."""
        return jnp.ones(()) if self.schedule is None else self.schedule(round_idx)

    def kind_lr_scales(self, round_idx: jax.Array) -> jax.Array:
        """``[K]``: the lr multiplier of each optimizer kind's clients at ``round_idx``: the
        engine's schedule times the kind's own (``ClientOptimizer.schedules``)."""
        return self.lr_scale(round_idx) * self.optimizer.kind_lr_scale(round_idx)

    def _per_client(self, data: FederatedData, hp: ClientHParams, ids: jax.Array | None,
                    key: jax.Array) -> dict[str, jax.Array]:
        c = data.num_clients
        ids_ = jnp.arange(c) if ids is None else ids
        take = (lambda a: a) if ids is None else (lambda a: a[ids])
        return dict(idx=take(data.train_idx), count=take(data.train_count),
                    key=client_keys(key, ids_), kind=take(hp.kind), lr=take(hp.lr),
                    mu=take(hp.prox_mu), id=ids_)

    def _one(self, client, params, opt_state, x, y, lr_scale, prox_mu):
        if opt_state is None:
            opt_state = self.optimizer.init(params)
        mu = client["mu"] if prox_mu is None else prox_mu
        n_max = client["idx"].shape[0]
        # A chunk of clients holds its rows for the round when they fit in GATHER_ONCE_BYTES
        # (always one client per map step); larger chunks gather each batch per step.
        rows = self.mapper.chunk * n_max * math.prod(x.shape[1:]) * x.dtype.itemsize
        return local_train(self.train_loss, self.optimizer, self.local, params, opt_state, x, y,
                           client["idx"], client["count"], client["key"], client["kind"],
                           client["lr"] * (lr_scale[client["kind"]] if lr_scale.shape[0] > 1
                                           else lr_scale[0]), mu,
                           gather_once=self.mapper.chunk == 1 or rows <= GATHER_ONCE_BYTES)

    def train(self, params: PyTree, data: FederatedData, hp: ClientHParams, key: jax.Array,
              round_idx: jax.Array, *, ids: jax.Array | None = None,
              client_params: PyTree | None = None, opt_state: PyTree | None = None,
              prox_mu: float | None = None) -> tuple[PyTree, PyTree, dict[str, jax.Array]]:
        """Train a cohort; returns per-client ``(params, opt_state, metrics)``, each ``[M, ...]``.

        Args:
          params: a shared start model (ignored when ``client_params`` is given).
          client_params: per-client start models ``[M, ...]`` (personalised / clustered methods).
          opt_state: per-client persistent optimizer state ``[M, ...]``; ``None`` = fresh.
          ids: the cohort's client ids ``[M]`` (``None`` = all clients, no gather).
          prox_mu: a proximal weight for all clients (FedProx); ``None`` = per-client ``hp``.
        """
        per = self._per_client(data, hp, ids, key)
        if client_params is None and opt_state is None and self.use_lowrank(
                data, materialize=1 + any(k in ("momentum", "nesterov")
                                          for k in self.optimizer.kinds)):
            return self._lowrank("clients", jax.tree.map(lambda a: a[None], params), per, data,
                                 round_idx, prox_mu)
        scale = self.kind_lr_scales(round_idx)
        if client_params is not None:
            # Each client's model (and optimizer state) is updated in its own slot, so a caller
            # that donates them (a decentralized round) holds one copy, not two.
            def update(client, carried, shared):
                x, y = shared
                p, s, m = self._one(client, carried["params"], carried.get("opt_state"), x, y,
                                    scale, prox_mu)
                if "opt_state" in carried:
                    return {"params": p, "opt_state": s}, m
                return {"params": p}, (s, m)

            carried = {"params": client_params}
            if opt_state is not None:
                carried["opt_state"] = opt_state
            new, out = self.mapper.map_update(update, per, carried, (data.x, data.y))
            if opt_state is not None:
                return new["params"], new["opt_state"], out
            return new["params"], out[0], out[1]
        if opt_state is not None:
            per["opt_state"] = opt_state

        def fn(client, shared):
            p0, x, y = shared
            return self._one(client, p0, client.get("opt_state"), x, y, scale, prox_mu)

        return self.mapper.map(fn, per, (params, data.x, data.y))

    def train_sum(self, params: PyTree, data: FederatedData, hp: ClientHParams, key: jax.Array,
                  round_idx: jax.Array, *, ids: jax.Array | None = None,
                  prox_mu: float | None = None) -> tuple[PyTree, jax.Array, dict[str, jax.Array]]:
        """Train a cohort from one shared model and return ``(sum_c n_c w_c, sum_c n_c, metrics)``.

        ``n_c`` is the client's training-set size (FedAvg's weights). Metrics are sums over the
        cohort (``loss`` weighted by ``n_c``, ``steps``), so memory stays that of one model.
        """
        per = self._per_client(data, hp, ids, key)
        if self.use_lowrank(data):
            per["w"] = per["count"].astype(jnp.float32)
            return self._lowrank("sum", jax.tree.map(lambda a: a[None], params), per, data,
                                 round_idx, prox_mu)
        scale = self.kind_lr_scales(round_idx)

        def fn(client, shared):
            p0, x, y = shared
            p, _, m = self._one(client, p0, None, x, y, scale, prox_mu)
            n = client["count"].astype(jnp.float32)
            return (jax.tree.map(lambda a: n * a, p), n,
                    {"loss": n * m["loss"], "steps": m["steps"].astype(jnp.float32)})

        return self.mapper.sum(fn, per, (params, data.x, data.y))

    def train_segment_sum(self, slots: PyTree, cluster_id: jax.Array, data: FederatedData,
                          hp: ClientHParams, key: jax.Array, round_idx: jax.Array, *,
                          ids: jax.Array | None = None, weights: jax.Array | None = None,
                          prox_mu: float | None = None
                          ) -> tuple[PyTree, jax.Array, dict[str, jax.Array]]:
        """Clustered training without per-client models: every client starts from its cluster's
        slot and the result is summed back per slot.

        Args:
          slots: ``K`` models, leaves ``[K, ...]``.
          cluster_id: ``[M]`` the slot of each cohort client (of all clients when ``ids`` is None).
          weights: ``[M]`` aggregation weights; ``None``: training-set sizes (FedAvg).
        Returns:
          ``(sums, mass, metrics)``: ``sums`` leaves ``[K, ...]`` = ``sum_{c in k} w_c p_c``,
          ``mass [K]`` = ``sum_{c in k} w_c`` and per-slot metric sums ``loss`` (weighted by
          ``w_c``) and ``steps``, each ``[K]``. Equal to :meth:`train` followed by
          :func:`~fedrnd.engine.segment_weighted_mean` (before dividing), at the memory of ``K``
          models instead of ``M``.
        """
        per = self._per_client(data, hp, ids, key)
        per["cid"] = cluster_id
        if weights is not None:
            per["w"] = weights
        scale = self.kind_lr_scales(round_idx)
        num_slots = jax.tree.leaves(slots)[0].shape[0]
        if self.use_lowrank(data, slots=num_slots):
            per["w"] = per.get("w", per["count"].astype(jnp.float32)).astype(jnp.float32)
            return self._lowrank("segment", slots, per, data, round_idx, prox_mu, num_slots)

        def fn(client, shared):
            sl, x, y = shared
            p0 = jax.tree.map(lambda s: s[client["cid"]], sl)
            p, _, m = self._one(client, p0, None, x, y, scale, prox_mu)
            w = client["w"] if "w" in client else client["count"].astype(jnp.float32)
            out = (jax.tree.map(lambda a: w.astype(a.dtype) * a, p), w,
                   {"loss": w * m["loss"], "steps": m["steps"].astype(jnp.float32)})
            return client["cid"], out

        sums, mass, metrics = self.mapper.segment_sum(fn, per, (slots, data.x, data.y),
                                                      num_segments=num_slots)
        return sums, mass, metrics
