"""Fine-tune evaluation against a per-client numpy loop; 0 epochs is the plain evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrnd.engine import (
    ClientHParams,
    ClientMapper,
    ClientOptimizer,
    Engine,
    LocalSpec,
    evaluate_clients,
    finetune_clients,
    finetune_evaluate,
    lr_schedule,
)
from fedrnd.models import make_model

D, K = 4, 3
COUNTS = [5, 9, 3, 12, 7, 4]
C = len(COUNTS)


@pytest.fixture(scope="module")
def setup(make_federated):
    data = make_federated(COUNTS, test_counts=[6, 4, 5, 7, 3, 8], dim=D, num_classes=K, seed=5)
    model = make_model("logreg", (D,), K)
    lrs = np.random.default_rng(1).uniform(0.1, 0.6, C).astype(np.float32)
    hp = ClientHParams(jnp.zeros(C, jnp.int32), jnp.asarray(lrs), jnp.zeros(C, jnp.float32))
    # Two cluster slots with different weights, clients assigned to them.
    k0, k1 = jax.random.split(jax.random.key(0))
    slots = jax.tree.map(lambda a, b: jnp.stack([a, b]), model.init(k0), model.init(k1))
    assign = jnp.asarray([0, 1, 1, 0, 1, 0], jnp.int32)
    return data, model, hp, lrs, slots, assign


def _engine(model, chunk=4, schedule=None):
    # Batch 64 > every client's size: one full-batch step per epoch, so the reference is exact
    # whatever order the client's examples are drawn in.
    return Engine(model, LocalSpec(batch_size=64, epochs=7), ClientOptimizer(),
                  ClientMapper(chunk_size=chunk), schedule)


def _rows(data, c, split):
    idx = np.asarray(getattr(data, f"{split}_idx"))[c, : int(getattr(data, f"{split}_count")[c])]
    return np.asarray(data.x, np.float64)[idx], np.asarray(data.y)[idx]


def _logp(w, b, x):
    z = x @ w + b
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def ref_finetune(slots, assign, data, lrs, epochs):
    """Plain loop: each client copies its slot, runs ``epochs`` full-batch GD steps, is scored."""
    ws, bs, acc, loss = [], [], [], []
    for c in range(C):
        s = int(assign[c])
        w = np.asarray(slots["Dense_0"]["kernel"][s], np.float64).copy()
        b = np.asarray(slots["Dense_0"]["bias"][s], np.float64).copy()
        x, y = _rows(data, c, "train")
        for _ in range(epochs):
            d = np.exp(_logp(w, b, x))
            d[np.arange(len(y)), y] -= 1.0
            w, b = w - lrs[c] * x.T @ d / len(y), b - lrs[c] * d.sum(0) / len(y)
        xt, yt = _rows(data, c, "test")
        lp = _logp(w, b, xt)
        acc.append(np.mean(lp.argmax(1) == yt))
        loss.append(-lp[np.arange(len(yt)), yt].mean())
        ws.append(w)
        bs.append(b)
    return np.stack(ws), np.stack(bs), np.asarray(acc), np.asarray(loss)


@pytest.mark.parametrize("epochs", [1, 3])
def test_finetune_equals_per_client_loop(setup, epochs):
    data, model, hp, lrs, slots, assign = setup
    eng = _engine(model)
    params = jax.jit(finetune_clients, static_argnums=(0, 6))(
        eng, slots, assign, data, hp, jax.random.key(3), epochs)
    w, b, acc, loss = ref_finetune(slots, np.asarray(assign), data, lrs, epochs)
    np.testing.assert_allclose(np.asarray(params["Dense_0"]["kernel"]), w, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(params["Dense_0"]["bias"]), b, rtol=2e-5, atol=2e-5)
    scores = jax.jit(finetune_evaluate, static_argnums=(0, 6))(
        eng, slots, assign, data, hp, jax.random.key(3), epochs)
    np.testing.assert_allclose(np.asarray(scores["test_acc"]), acc, atol=1e-6)
    np.testing.assert_allclose(np.asarray(scores["test_loss"]), loss, rtol=1e-4, atol=1e-5)
    assert scores["test_acc"].shape == (C,)


def test_personalised_models_finetune_from_their_own_weights(setup):
    data, model, hp, lrs, slots, assign = setup
    per_client = jax.tree.map(lambda s: s[assign], slots)
    eng = _engine(model)
    a = finetune_evaluate(eng, per_client, None, data, hp, jax.random.key(0), 2)
    _, _, acc, loss = ref_finetune(slots, np.asarray(assign), data, lrs, 2)
    np.testing.assert_allclose(np.asarray(a["test_acc"]), acc, atol=1e-6)
    np.testing.assert_allclose(np.asarray(a["test_loss"]), loss, rtol=1e-4, atol=1e-5)


def test_zero_epochs_is_plain_evaluation(setup):
    data, model, hp, _, slots, assign = setup
    eng = _engine(model)
    ft = finetune_evaluate(eng, slots, assign, data, hp, jax.random.key(0), 0)
    plain = evaluate_clients(model.apply, slots, assign, data, eng.mapper)
    for k in plain:
        np.testing.assert_array_equal(np.asarray(ft[k]), np.asarray(plain[k]))


def test_minibatch_finetune_independent_of_chunking_and_ignores_schedule(setup):
    data, model, hp, _, slots, assign = setup
    small = Engine(model, LocalSpec(batch_size=2), ClientOptimizer(), ClientMapper(chunk_size=1))
    big = Engine(model, LocalSpec(batch_size=2), ClientOptimizer(), ClientMapper(chunk_size=6),
                 lr_schedule("exponential", rate=50.0))
    a = finetune_clients(small, slots, assign, data, hp, jax.random.key(9), 2)
    b = finetune_clients(big, slots, assign, data, hp, jax.random.key(9), 2)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    # And it moved every client away from its slot.
    start = jax.tree.map(lambda s: s[assign], slots)
    moved = np.asarray(jnp.abs(a["Dense_0"]["kernel"] - start["Dense_0"]["kernel"]).sum((1, 2)))
    assert np.all(moved > 0)


@pytest.mark.parametrize("epochs", [-1, 1.5, True])
def test_bad_epochs_rejected(setup, epochs):
    data, model, hp, _, slots, assign = setup
    with pytest.raises(ValueError, match="fine-tune epochs"):
        finetune_evaluate(_engine(model), slots, assign, data, hp, jax.random.key(0), epochs)
