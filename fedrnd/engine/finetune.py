"""The fine-tune evaluation protocol: every client adapts its model locally, then is scored.

Personalisation baselines (FedAvg + fine-tune) and clustered methods whose papers report
accuracy after a final local step (PACFL) are compared under one protocol: each client takes
the model it is evaluated with (its cluster's slot, the global model, or its own personalised
model), trains it on its own training data for a fixed budget of ``epochs`` local epochs with
its own optimizer kind and learning rate from the run (a fresh optimizer state; the lr
schedule is not applied, so a schedule that decays to zero does not silence fine-tuning), and
is then scored on its own train and test split. All clients fine-tune in one jitted program,
mapped over the client axis by the engine's :class:`~fedrnd.engine.ClientMapper`.
``epochs = 0`` is the plain evaluation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from fedrnd.data.federated import FederatedData
from fedrnd.engine.aggregate import broadcast
from fedrnd.engine.core import Engine
from fedrnd.engine.evaluate import evaluate_clients
from fedrnd.engine.local import LocalSpec
from fedrnd.engine.optim import ClientHParams

PyTree = Any


def finetune_engine(engine: Engine, epochs: int) -> Engine:
    """``engine`` with a local budget of ``epochs`` epochs (batch size kept) and no schedule."""
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"fine-tune epochs must be an integer >= 1, got {epochs!r}")
    return dataclasses.replace(engine, local=LocalSpec(engine.local.batch_size, epochs),
                               schedule=None)


def finetune_clients(engine: Engine, slots: PyTree, assign: jax.Array | None,
                     data: FederatedData, hp: ClientHParams, key: jax.Array,
                     epochs: int) -> PyTree:
    """Every client's model after ``epochs`` local epochs from the model it is evaluated with.

    Args:
      slots, assign: as returned by ``Algorithm.models``: leaves ``[K, ...]`` and ``[C]``
        client -> slot, or per-client models ``[C, ...]`` with ``assign=None``.
      hp: the run's per-client optimizer kinds and learning rates.
      key: fine-tuning randomness; client ``c`` uses ``fold_in(key, c)``.
    Returns:
      per-client parameters, leaves ``[C, ...]``.
    """
    eng = finetune_engine(engine, epochs)
    start = slots if assign is None else broadcast(slots, assign)
    params, _, _ = eng.train(None, data, hp, key, jnp.zeros((), jnp.int32),
                             client_params=start)
    return params


def finetune_evaluate(engine: Engine, slots: PyTree, assign: jax.Array | None,
                      data: FederatedData, hp: ClientHParams, key: jax.Array, epochs: int,
                      eval_batch: int = 0) -> dict[str, jax.Array]:
    """Per-client ``{train,test}_{loss,acc}`` ``[C]`` after fine-tuning (``epochs=0``: none).

    Jit it with ``epochs`` static (it fixes the program length).
    """
    if epochs == 0:
        return evaluate_clients(engine.model.apply, slots, assign, data, engine.mapper,
                                eval_batch)
    params = finetune_clients(engine, slots, assign, data, hp, key, epochs)
    return evaluate_clients(engine.model.apply, params, None, data, engine.mapper, eval_batch)


def finetune_key(seed: int) -> jax.Array:
    """The fine-tuning key of a run with ``seed``: the same for every method (a fair protocol)."""
    return jax.random.fold_in(jax.random.key(seed), 2)
