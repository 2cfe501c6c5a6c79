"""Shared by the clustered-FL tests: well-separated clustered populations built with fedrnd's
own source and partition, and a plain numpy reference of multinomial logistic regression."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedrnd.data import FederatedData, build_federated, load_source, make_partition

DIM, CLASSES = 6, 4


def permuted_groups(num_clients: int, num_groups: int, seed: int = 0,
                    samples: int = 60) -> FederatedData:
    """``num_clients`` clients in ``num_groups`` groups with distinct label permutations of a
    4-class, 6-dimensional Gaussian mixture (``samples`` examples per client before the
    train/test split): the IFCA paper's concept shift, invisible in the inputs."""
    ds = load_source("gaussian_mixture", num_groups=1, num_clients=num_clients,
                     samples_per_client=samples, dim=DIM, num_classes=CLASSES,
                     class_separation=4.0, seed=seed)
    part = make_partition("label_permutation", ds, num_clients, seed=seed,
                          num_groups=num_groups)
    return build_federated(ds, part)


# --- numpy logistic regression (params {"Dense_0": {"kernel": [D, K], "bias": [K]}}) --------

def client_xy(data: FederatedData, c: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.asarray(data.train_idx)[c, : int(data.train_count[c])]
    return np.asarray(data.x, np.float64)[idx], np.asarray(data.y)[idx]


def loss_grad(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray):
    """Mean softmax cross-entropy of ``x @ w + b`` and its gradients ``(loss, dw, db)``."""
    z = x @ w + b
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    n = len(y)
    d = np.exp(logp)
    d[np.arange(n), y] -= 1.0
    return -logp[np.arange(n), y].mean(), x.T @ d / n, d.sum(0) / n


def gd(w, b, x, y, lr: float, steps: int):
    """``steps`` full-batch gradient descent steps."""
    for _ in range(steps):
        _, gw, gb = loss_grad(w, b, x, y)
        w, b = w - lr * gw, b - lr * gb
    return w, b


def unpack(params) -> tuple[np.ndarray, np.ndarray]:
    """``(kernel, bias)`` as float64 (leading slot/client axes kept)."""
    return (np.asarray(params["Dense_0"]["kernel"], np.float64),
            np.asarray(params["Dense_0"]["bias"], np.float64))


def pack(w: np.ndarray, b: np.ndarray):
    return {"Dense_0": {"bias": jnp.asarray(b, jnp.float32),
                        "kernel": jnp.asarray(w, jnp.float32)}}


def weighted_means(ws, bs, weights, cid, old_w, old_b):
    """Per-cluster weighted means of client models; clusters with no client keep ``old``."""
    new_w, new_b = old_w.copy(), old_b.copy()
    for k in range(len(old_w)):
        sel = np.flatnonzero(cid == k)
        if len(sel):
            a = np.asarray(weights, np.float64)[sel]
            new_w[k] = np.einsum("c,cij->ij", a, ws[sel]) / a.sum()
            new_b[k] = np.einsum("c,cj->j", a, bs[sel]) / a.sum()
    return new_w, new_b


def assert_tree_close(a, b, tol: float = 2e-5) -> None:
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=tol, atol=tol)
