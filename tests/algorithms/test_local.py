"""Local-only training: independent per-client models, persistent state, no communication."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrnd.algorithms import Local
from fedrnd.engine import (
    ClientHParams,
    ClientOptimizer,
    Engine,
    LocalSpec,
    client_hparams,
    sample_cohort,
)
from fedrnd.models import make_model

D, K = 4, 3
COUNTS = [6, 9, 4, 8, 7, 5]
C = len(COUNTS)


@pytest.fixture(scope="module")
def data(make_federated):
    return make_federated(COUNTS, dim=D, num_classes=K, seed=2)


def _run(alg, data, hp, rounds, seed=0):
    state = alg.init(jax.random.key(0), data, hp)
    step = jax.jit(alg.round)
    metrics = []
    for r in range(rounds):
        state, m = step(state, data, jax.random.fold_in(jax.random.key(seed), r))
        metrics.append(m)
    return state, metrics


def _client(tree, c):
    return [np.asarray(x[c]) for x in jax.tree.leaves(tree)]


def test_changing_one_clients_data_changes_only_its_model(data):
    model = make_model("mlp", (D,), K, hidden=[6])
    opt, hp = client_hparams(C, optimizer="momentum", lr=0.05)
    alg = Local(engine=Engine(model, LocalSpec(batch_size=3, epochs=2), opt))
    rows = np.asarray(data.train_idx)[3, : COUNTS[3]]
    changed = data.replace(x=data.x.at[rows].add(1.5),
                           y=data.y.at[rows].set((data.y[rows] + 1) % K))
    s_a, m_a = _run(alg, data, hp, 2)
    s_b, m_b = _run(alg, changed, hp, 2)
    p_a, _ = alg.models(s_a)
    p_b, assign = alg.models(s_b)
    assert assign is None
    for c in range(C):
        a, b = _client(p_a, c), _client(p_b, c)
        diff = max(float(np.max(np.abs(u - v))) for u, v in zip(a, b, strict=True))
        if c == 3:
            assert diff > 1e-3
        else:
            assert diff < 1e-6, (c, diff)
    for m in m_a + m_b:
        ledger = {k: v for k, v in m.items() if k.startswith(("up/", "down/"))}
        assert ledger and set(ledger) >= {"up/model", "down/model"}
        for v in ledger.values():
            assert v.shape == (C,)
            np.testing.assert_array_equal(np.asarray(v), np.zeros(C))


def _logreg_grad(w, b, x, y):
    logits = x @ w + b
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    n = len(y)
    p[np.arange(n), y] -= 1.0
    return x.T @ p / n, p.sum(0) / n


@pytest.mark.parametrize("kind,cohort", [("sgd", None), ("momentum", None), ("momentum", 3)])
def test_each_client_continues_its_own_model_and_optimizer_state(data, kind, cohort):
    """Full-batch GD (and heavy-ball momentum carried across rounds) from a shared init; with a
    cohort, a client advances only in the rounds it is sampled."""
    model = make_model("logreg", (D,), K)
    lrs = np.linspace(0.1, 0.6, C).astype(np.float32)
    hp = ClientHParams(jnp.zeros(C, jnp.int32), jnp.asarray(lrs), jnp.zeros(C, jnp.float32))
    alg = Local(engine=Engine(model, LocalSpec(batch_size=64, steps=2), ClientOptimizer((kind,))),
                cohort_size=cohort)
    rounds = 3
    state, metrics = _run(alg, data, hp, rounds)
    rounds_in = np.full(C, rounds)
    if cohort is not None:
        rounds_in[:] = 0
        for r in range(rounds):
            k_cohort = jax.random.split(jax.random.fold_in(jax.random.key(0), r))[0]
            rounds_in[np.asarray(sample_cohort(k_cohort, C, cohort))] += 1
        assert len(set(rounds_in.tolist())) > 1
    init = model.init(jax.random.key(0))
    x_pool, y_pool = np.asarray(data.x, np.float64), np.asarray(data.y)
    params, _ = alg.models(state)
    for c in range(C):
        rows = np.asarray(data.train_idx)[c, : COUNTS[c]]
        x, y = x_pool[rows], y_pool[rows]
        w = np.asarray(init["Dense_0"]["kernel"], np.float64)
        b = np.asarray(init["Dense_0"]["bias"], np.float64)
        tw, tb = np.zeros_like(w), np.zeros_like(b)
        for _ in range(rounds_in[c] * 2):  # 2 steps per round taken, state never reset
            gw, gb = _logreg_grad(w, b, x, y)
            if kind == "momentum":
                tw, tb = gw + 0.9 * tw, gb + 0.9 * tb
                gw, gb = tw, tb
            w, b = w - lrs[c] * gw, b - lrs[c] * gb
        np.testing.assert_allclose(np.asarray(params["Dense_0"]["kernel"][c]), w, rtol=2e-5,
                                   atol=2e-5)
        np.testing.assert_allclose(np.asarray(params["Dense_0"]["bias"][c]), b, rtol=2e-5,
                                   atol=2e-5)
    assert float(metrics[-1]["local_steps"]) == 2 * (cohort or C)


def test_cohort_leaves_other_clients_untouched(data):
    model = make_model("mlp", (D,), K, hidden=[6])
    opt, hp = client_hparams(C, optimizer="adam", lr=0.01)
    alg = Local(engine=Engine(model, LocalSpec(batch_size=4, epochs=1), opt), cohort_size=2)
    state = alg.init(jax.random.key(0), data, hp)
    key = jax.random.key(7)
    ids = np.asarray(sample_cohort(jax.random.split(key)[0], C, 2))
    new, m = jax.jit(alg.round)(state, data, key)
    for c in range(C):
        before = _client(state["clients"]["params"], c) + _client(state["clients"]["opt"], c)
        after = _client(new["clients"]["params"], c) + _client(new["clients"]["opt"], c)
        same = all(np.array_equal(u, v) for u, v in zip(before, after, strict=True))
        assert same == (c not in ids), (c, ids)
    np.testing.assert_array_equal(np.asarray(m["up/model"]), np.zeros(C))
    np.testing.assert_array_equal(np.asarray(m["down/model"]), np.zeros(C))
    assert float(m["local_steps"]) == sum(-(-COUNTS[c] // 4) for c in ids)
