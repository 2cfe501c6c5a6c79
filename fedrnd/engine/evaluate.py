"""Evaluation: per-client loss and accuracy on train and test, masked for ragged clients.

Models are given as *slots* (leaves ``[K, ...]``) plus an assignment ``[C]`` of clients to slots:
a global model is ``K = 1``, clustered methods have one slot per cluster, personalised methods
``K = C``. Each client is scored with its own slot's model on its own data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedrnd.data.federated import FederatedData
from fedrnd.engine.clientmap import ClientMapper

PyTree = Any


def _scores(apply, params, x, y, mask, eval_batch):
    n = x.shape[0]
    if eval_batch and n > eval_batch and n % eval_batch == 0:
        # Bound activation memory for large per-client sets.
        def body(acc, blk):
            xb, yb, mb = blk
            logits = apply(params, xb)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
            hit = (jnp.argmax(logits, -1) == yb).astype(jnp.float32)
            return (acc[0] + jnp.sum(loss * mb), acc[1] + jnp.sum(hit * mb)), None

        shape = lambda a: a.reshape(n // eval_batch, eval_batch, *a.shape[1:])  # noqa: E731
        (ls, hs), _ = jax.lax.scan(body, (0.0, 0.0), (shape(x), shape(y), shape(mask)))
        return ls, hs
    logits = apply(params, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    hit = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    return jnp.sum(loss * mask), jnp.sum(hit * mask)


def evaluate_clients(apply: Callable[[PyTree, jax.Array], jax.Array], slots: PyTree,
                     assign: jax.Array | None, data: FederatedData,
                     mapper: ClientMapper | None = None,
                     eval_batch: int = 0,
                     splits: tuple[str, ...] = ("train", "test")) -> dict[str, jax.Array]:
    """Per-client ``{train,test}_{loss,acc}`` (``[C]`` each) of ``slots[assign[c]]`` on client c.

    With ``assign=None``, ``slots`` are per-client models ``[C, ...]`` and travel with the client
    axis (each device holds only its clients' models). ``splits`` limits the rows scored (e.g.
    ``("test",)`` for a metric inside a round).
    """
    mapper = mapper or ClientMapper()

    def one(client, shared):
        slots_, x_pool, y_pool = shared
        if slots_ is None:
            params = client["params"]
        else:
            params = jax.tree.map(lambda s: s[client["slot"]], slots_)
        out = {}
        for split in splits:
            idx, count = client[f"{split}_idx"], client[f"{split}_count"]
            mask = (jnp.arange(idx.shape[0]) < count).astype(jnp.float32)
            ls, hs = _scores(apply, params, x_pool[idx], y_pool[idx], mask, eval_batch)
            denom = jnp.maximum(count, 1).astype(jnp.float32)
            out[f"{split}_loss"] = ls / denom
            out[f"{split}_acc"] = hs / denom
        return out

    per_client = dict(train_idx=data.train_idx, train_count=data.train_count,
                      test_idx=data.test_idx, test_count=data.test_count)
    if assign is None:
        per_client["params"] = slots
        slots = None
    else:
        per_client["slot"] = assign
    return mapper.map(one, per_client, (slots, data.x, data.y))


def summarize(per_client: dict[str, np.ndarray], train_count: np.ndarray, test_count: np.ndarray,
              group: np.ndarray) -> dict[str, float]:
    """Host-side summary: mean over clients, sample-weighted mean, and per ground-truth group."""
    out: dict[str, float] = {}
    group = np.asarray(group)
    for k, v in per_client.items():
        v = np.asarray(v, np.float64)
        w = np.asarray(train_count if k.startswith("train") else test_count, np.float64)
        out[f"{k}/mean"] = float(np.mean(v))
        out[f"{k}/weighted"] = float(np.sum(v * w) / max(np.sum(w), 1.0))
        if k.endswith("acc"):
            out[f"{k}/worst10"] = float(np.mean(np.sort(v)[: max(1, len(v) // 10)]))
        for g in np.unique(group):
            sel = group == g
            out[f"{k}/group{int(g)}"] = float(np.sum(v[sel] * w[sel]) / max(np.sum(w[sel]), 1.0))
    return out


def clustering_scores(assign: np.ndarray, group: np.ndarray) -> dict[str, float]:
    """ARI and NMI of a client -> cluster assignment ``[C]`` against the ground-truth groups
    ``[C]``, and the number of clusters. Host side; shared by the driver (every evaluation of
    a clustering method) and the methods' reports (regions, spectral clusters)."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    return {"ari": float(adjusted_rand_score(group, assign)),
            "nmi": float(normalized_mutual_info_score(group, assign)),
            "clusters": float(len(np.unique(assign)))}
