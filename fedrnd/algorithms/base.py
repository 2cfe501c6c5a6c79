"""The interface every federated method implements.

An algorithm is a frozen dataclass (static configuration, hashable so it can be closed over by
``jax.jit``) with pure functions of arrays:

- ``init(key, data, hp) -> state``: the state is a dict of arrays; ``state["clients"]`` holds the
  per-client leaves (leading axis ``C``, sharded across devices), everything else is replicated.
- ``init_template(key, data, hp) -> state`` of ``jax.ShapeDtypeStruct``: ``init``'s structure
  without its work, what a resumed run restores its checkpoint into. The default traces
  ``init`` abstractly; a method whose ``init`` does host-side work (RND discovery) overrides it.
- ``round(state, data, key) -> (state, metrics)``: one communication round, jitted by the driver
  (possibly several rounds in one ``lax.scan``). ``metrics`` holds scalars and the ledger entries
  ``up/<kind>``, ``down/<kind>``: bytes per client ``[C]`` this round.
- ``models(state) -> (slots, assign)``: the models clients are evaluated with: leaves ``[K, ...]``
  and ``assign: [C]`` (client -> slot), or ``(per_client_params, None)`` for personalised models.
- ``host_hook(state, data, round) -> state`` runs on the host between jitted blocks, every
  ``hook_every`` rounds, for steps that are inherently host-side (a hierarchical clustering of a
  small matrix, a graph redraw). The default does nothing.
- ``report(state, data, out_dir) -> dict`` runs once at the end of a run: it may write
  method-specific artifacts (a novelty matrix, a heat map) into ``out_dir`` and returns extra
  summary figures. The default writes nothing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from fedrnd.data.federated import FederatedData
from fedrnd.engine import ClientHParams, Engine, sample_cohort

State = dict[str, Any]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """Base class: holds the engine and the cohort size; subclasses add their hyperparameters."""

    name: ClassVar[str] = "algorithm"
    engine: Engine
    cohort_size: int | None = None
    hook_every: ClassVar[int | None] = None
    clusters_clients: ClassVar[bool] = False
    """True for methods whose ``models`` assignment is a clustering (scored by ARI/NMI)."""

    def init(self, key: jax.Array, data: FederatedData, hp: ClientHParams) -> State:
        raise NotImplementedError

    def init_template(self, key: jax.Array, data: FederatedData, hp: ClientHParams) -> State:
        """The structure, dtypes and (initial) shapes of ``init``'s state, computing nothing.

        A resumed run restores its checkpoint into this (shapes then come from the checkpoint),
        so ``init``'s expensive work is not redone. The default traces ``init`` with
        ``jax.eval_shape``; an ``init`` that needs concrete values on the host cannot be
        traced and is run for real (correct, but slow: such methods should override this).
        """
        try:
            return jax.eval_shape(self.init, key, data, hp)
        except jax.errors.JAXTypeError:
            return self.init(key, data, hp)

    def round(self, state: State, data: FederatedData, key: jax.Array) -> tuple[State, Metrics]:
        raise NotImplementedError

    def models(self, state: State) -> tuple[Any, jax.Array | None]:
        raise NotImplementedError

    def host_hook(self, state: State, data: FederatedData, round_idx: int) -> State:
        return state

    def report(self, state: State, data: FederatedData, out_dir: Path) -> dict[str, float]:
        return {}

    # Helpers shared by methods.
    def cohort(self, key: jax.Array, num_clients: int) -> tuple[jax.Array | None, jax.Array]:
        """``(ids or None, participating [C] 0/1)`` for this round's cohort."""
        m = self.cohort_size
        if m is None or m >= num_clients:
            return None, jnp.ones((num_clients,), jnp.float32)
        ids = sample_cohort(key, num_clients, m)
        return ids, jnp.zeros((num_clients,), jnp.float32).at[ids].set(1.0)

    def validate(self, data: FederatedData) -> None:
        """Raise ``ValueError`` for settings that cannot work on ``data`` (before compiling)."""
        if self.cohort_size is not None and not 1 <= self.cohort_size:
            raise ValueError(f"cohort_size must be >= 1, got {self.cohort_size}")
