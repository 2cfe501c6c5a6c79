"""Plain references for decentralized methods: full-batch local training of one node at a time
(``jax.grad`` of the node's mean cross-entropy, a Python loop over nodes and steps) and gossip
with a dense mixing matrix built entry by entry from the adjacency matrix.

With ``LocalSpec(batch_size >= every node's data, steps=T)`` the engine's minibatches are each
node's whole data set, so the engine's round must equal these loops whatever its keys."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def node_data(data, i):
    n = int(data.train_count[i])
    rows = np.asarray(data.train_idx)[i, :n]
    return np.asarray(data.x)[rows], np.asarray(data.y)[rows]


def full_batch_train(model, params, x, y, lr, steps, kind="sgd", momentum=0.9, state=None):
    """``steps`` full-batch steps of one node; ``kind`` sgd, momentum (heavy ball) or adam.

    Returns ``(params, state, grad_at_start)``; ``state`` carries momentum / Adam moments."""

    def loss(p):
        logits = model.apply(p, jnp.asarray(x))
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)))

    g0 = None
    if state is None:
        zeros = jax.tree.map(jnp.zeros_like, params)
        state = {"m": zeros, "v": zeros, "t": 0}
    for _ in range(steps):
        g = jax.grad(loss)(params)
        g0 = g if g0 is None else g0
        if kind == "sgd":
            params = jax.tree.map(lambda p, gg: p - lr * gg, params, g)
        elif kind == "momentum":
            m = jax.tree.map(lambda mm, gg: momentum * mm + gg, state["m"], g)
            state = {**state, "m": m}
            params = jax.tree.map(lambda p, mm: p - lr * mm, params, m)
        elif kind == "adam":
            t = state["t"] + 1
            m = jax.tree.map(lambda mm, gg: 0.9 * mm + 0.1 * gg, state["m"], g)
            v = jax.tree.map(lambda vv, gg: 0.999 * vv + 0.001 * gg * gg, state["v"], g)
            state = {"m": m, "v": v, "t": t}
            c1, c2 = 1 - 0.9 ** t, 1 - 0.999 ** t
            params = jax.tree.map(
                lambda p, mm, vv, c1=c1, c2=c2: p - lr * (mm / c1) / (jnp.sqrt(vv / c2) + 1e-8),
                params, m, v)
        else:
            raise ValueError(kind)
    return params, state, g0


def dense_mixing(adj: np.ndarray, mixing: str = "metropolis") -> np.ndarray:
    """The textbook mixing matrix of a 0/1 adjacency, entry by entry (isolated node: W_ii = 1)."""
    n = len(adj)
    deg = adj.sum(1)
    w = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j and adj[i, j]:
                w[i, j] = (1 / (1 + max(deg[i], deg[j])) if mixing == "metropolis"
                           else 1 / (1 + deg[i]))
        w[i, i] = 1 - w[i].sum() if mixing == "metropolis" else 1 / (1 + deg[i])
    return w


def node(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


def stack(trees):
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def mix(w: np.ndarray, trees: list, steps: int = 1) -> list:
    """``x_i <- sum_j W_ij x_j`` over a list of per-node pytrees, ``steps`` times."""
    n = len(trees)
    for _ in range(steps):
        trees = [jax.tree.map(lambda *a, i=i: sum(w[i, j] * a[j] for j in range(n)), *trees)
                 for i in range(n)]
    return trees


def assert_trees_close(a, b, atol=1e-5, rtol=1e-4):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=atol, rtol=rtol)
