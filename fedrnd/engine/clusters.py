"""What the engine offers methods that keep cluster models: every slot's loss on every client.

IFCA assigns a client to the cluster model with the lowest loss on its training data, and
DisUE does the same with its experts; the loss matrix is one client map, so it lives here,
next to the per-cluster aggregation (:mod:`fedrnd.engine.aggregate`), and methods compose it
instead of importing each other.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fedrnd.data.federated import FederatedData


def cluster_losses(engine: Any, slots: Any, data: FederatedData,
                   ids: jax.Array | None = None) -> jax.Array:
    """``L[c, k]``: the engine's training loss of slot ``k`` on client ``c``'s training data.

    Args:
      engine: the :class:`~fedrnd.engine.Engine` (its ``loss_fn`` and client map).
      slots: ``K`` models, leaves ``[K, ...]``.
      ids: the cohort ``[M]`` (``None``: every client).
    Returns:
      ``[M, K]`` mean losses over each client's real examples (padding masked).
    """
    take = (lambda a: a) if ids is None else (lambda a: a[ids])
    per = dict(idx=take(data.train_idx), count=take(data.train_count))
    loss_fn = engine.loss_fn

    def one(client, shared):
        sl, x_pool, y_pool = shared
        idx = client["idx"]
        x, y = x_pool[idx], y_pool[idx]
        mask = (jnp.arange(idx.shape[0]) < client["count"]).astype(x.dtype)
        return jax.vmap(lambda p: loss_fn(p, x, y, mask))(sl)

    return engine.mapper.map(one, per, (slots, data.x, data.y))
