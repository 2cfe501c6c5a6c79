"""FedAvg / FedProx rounds against a numpy reference of the protocol."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrnd.algorithms import FedAvg, FedProx, make_algorithm
from fedrnd.engine import (
    ClientHParams,
    ClientMapper,
    ClientOptimizer,
    Engine,
    LocalSpec,
    client_hparams,
    evaluate_clients,
    sample_cohort,
)
from fedrnd.models import make_model

D, K = 4, 3
COUNTS = [5, 9, 3, 12, 7, 4, 10, 6, 8, 11]
C = len(COUNTS)


@pytest.fixture(scope="module")
def setup(make_federated):
    data = make_federated(COUNTS, dim=D, num_classes=K, seed=3)
    model = make_model("logreg", (D,), K)
    lrs = np.random.default_rng(0).uniform(0.05, 0.5, C).astype(np.float32)
    hp = ClientHParams(jnp.zeros(C, jnp.int32), jnp.asarray(lrs), jnp.zeros(C, jnp.float32))
    return data, model, hp, lrs


def _engine(model, steps=1, batch=64):
    return Engine(model, LocalSpec(batch_size=batch, steps=steps), ClientOptimizer(),
                  ClientMapper(chunk_size=3))


def _client_data(data, c):
    idx = np.asarray(data.train_idx)[c, : int(data.train_count[c])]
    return np.asarray(data.x, np.float64)[idx], np.asarray(data.y)[idx]


def _loss_grad(w, b, x, y):
    logits = x @ w + b
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    n = len(y)
    d = np.exp(logp)
    d[np.arange(n), y] -= 1.0
    return -logp[np.arange(n), y].mean(), x.T @ d / n, d.sum(0) / n


def _unpack(params):
    return (np.asarray(params["Dense_0"]["kernel"], np.float64),
            np.asarray(params["Dense_0"]["bias"], np.float64))


def ref_round(params, data, lrs, ids, steps=1, mu=0.0):
    """Each client in ``ids``: ``steps`` full-batch GD steps (+ prox toward the global model);
    the server: the mean of the client models weighted by their sample counts."""
    w0, b0 = _unpack(params)
    ws, bs, ns, losses = [], [], [], []
    for c in ids:
        x, y = _client_data(data, c)
        w, b = w0.copy(), b0.copy()
        for t in range(steps):
            loss, gw, gb = _loss_grad(w, b, x, y)
            if t == 0:
                losses.append(loss)
            w, b = w - lrs[c] * (gw + mu * (w - w0)), b - lrs[c] * (gb + mu * (b - b0))
        ws.append(w)
        bs.append(b)
        ns.append(len(y))
    n = np.asarray(ns, np.float64)
    mean_w = np.einsum("c,cij->ij", n, np.stack(ws)) / n.sum()
    mean_b = np.einsum("c,cj->j", n, np.stack(bs)) / n.sum()
    return mean_w, mean_b, float(np.dot(n, losses) / n.sum())


def _assert_params(params, w, b, tol=2e-5):
    gw, gb = _unpack(params)
    np.testing.assert_allclose(gw, w, rtol=tol, atol=tol)
    np.testing.assert_allclose(gb, b, rtol=tol, atol=tol)


def test_one_round_is_count_weighted_mean_of_one_step_updates(setup):
    data, model, hp, lrs = setup
    alg = FedAvg(engine=_engine(model))
    state = alg.init(jax.random.key(0), data, hp)
    new, m = jax.jit(alg.round)(state, data, jax.random.key(5))
    w, b, loss = ref_round(state["params"], data, lrs, range(C))
    _assert_params(new["params"], w, b)
    np.testing.assert_allclose(float(m["train_loss"]), loss, rtol=1e-5)
    assert float(m["local_steps"]) == C
    assert int(new["round"]) == 1
    nbytes = (D * K + K) * 4
    np.testing.assert_array_equal(np.asarray(m["up/model"]), np.full(C, nbytes))
    np.testing.assert_array_equal(np.asarray(m["down/model"]), np.full(C, nbytes))
    slots, assign = alg.models(new)
    assert jax.tree.leaves(slots)[0].shape[0] == 1
    np.testing.assert_array_equal(np.asarray(assign), np.zeros(C))


def test_unweighted_mean_would_differ(setup):
    """Guard for the test above: the count weighting matters on this data."""
    data, model, hp, lrs = setup
    state = FedAvg(engine=_engine(model)).init(jax.random.key(0), data, hp)
    w, _, _ = ref_round(state["params"], data, lrs, range(C))
    w0, b0 = _unpack(state["params"])
    per = []
    for c in range(C):
        x, y = _client_data(data, c)
        _, gw, _ = _loss_grad(w0, b0, x, y)
        per.append(w0 - lrs[c] * gw)
    assert np.max(np.abs(np.mean(per, 0) - w)) > 1e-4


def test_partial_participation_uses_only_the_cohort(setup):
    data, model, hp, lrs = setup
    m_size = 4
    alg = FedAvg(engine=_engine(model), cohort_size=m_size)
    state = alg.init(jax.random.key(0), data, hp)
    step = jax.jit(alg.round)
    nbytes = (D * K + K) * 4
    seen = []
    for r in range(2):
        key = jax.random.key(10 + r)
        k_cohort, _ = jax.random.split(key)
        ids = np.asarray(sample_cohort(k_cohort, C, m_size))
        assert len(set(ids.tolist())) == m_size and ids.min() >= 0 and ids.max() < C
        seen.append(tuple(ids))
        w, b, loss = ref_round(state["params"], data, lrs, ids)
        w_all, _, _ = ref_round(state["params"], data, lrs, range(C))
        state, m = step(state, data, key)
        _assert_params(state["params"], w, b)
        assert np.max(np.abs(w - w_all)) > 1e-4  # the cohort really is a subset
        np.testing.assert_allclose(float(m["train_loss"]), loss, rtol=1e-5)
        assert float(m["local_steps"]) == m_size
        expected = np.zeros(C)
        expected[ids] = nbytes
        np.testing.assert_array_equal(np.asarray(m["up/model"]), expected)
        np.testing.assert_array_equal(np.asarray(m["down/model"]), expected)
    assert seen[0] != seen[1]


def test_fedprox_matches_reference_and_mu_zero_is_fedavg(setup):
    data, model, hp, lrs = setup
    engine = _engine(model, steps=3)
    state = FedAvg(engine=engine).init(jax.random.key(0), data, hp)
    key = jax.random.key(3)
    prox, _ = jax.jit(FedProx(engine=engine, prox_mu=0.7).round)(state, data, key)
    w, b, _ = ref_round(state["params"], data, lrs, range(C), steps=3, mu=0.7)
    _assert_params(prox["params"], w, b)
    w_avg, _, _ = ref_round(state["params"], data, lrs, range(C), steps=3)
    assert np.max(np.abs(w - w_avg)) > 1e-4

    # mu = 0: identical to FedAvg, also with stochastic mini-batches and partial participation.
    engine = Engine(model, LocalSpec(batch_size=3, epochs=2), ClientOptimizer())
    a, ma = jax.jit(FedAvg(engine=engine, cohort_size=6).round)(state, data, key)
    p, mp = jax.jit(FedProx(engine=engine, cohort_size=6, prox_mu=0.0).round)(state, data, key)
    for u, v in zip(jax.tree.leaves((a, ma)), jax.tree.leaves((p, mp)), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6, atol=1e-7)


def test_fedavg_learns_an_easy_task(make_federated):
    data = make_federated([30] * 8, test_counts=[20] * 8, dim=5, num_classes=3, sep=4.0,
                              seed=1)
    model = make_model("mlp", (5,), 3, hidden=[16])
    opt, hp = client_hparams(8, lr=0.1)
    alg = FedAvg(engine=Engine(model, LocalSpec(batch_size=10, epochs=1), opt))
    state = alg.init(jax.random.key(0), data, hp)
    evaluate = jax.jit(lambda s, a: evaluate_clients(model.apply, s, a, data))
    before = evaluate(*alg.models(state))
    step = jax.jit(alg.round)
    for r in range(5):
        state, m = step(state, data, jax.random.key(r))
    after = evaluate(*alg.models(state))
    tc = np.asarray(data.test_count, np.float64)
    acc = float(np.sum(np.asarray(after["test_acc"]) * tc) / tc.sum())
    assert acc > 0.9, acc
    assert float(np.sum(np.asarray(before["test_acc"]) * tc) / tc.sum()) < 0.8  # it learned
    assert float(np.mean(after["test_loss"])) < float(np.mean(before["test_loss"]))
    assert np.isfinite(float(m["train_loss"]))


def test_server_adam_is_fedadam_and_differs_from_sgd(setup):
    data, model, hp, lrs = setup
    engine = _engine(model)
    sgd = FedAvg(engine=engine)
    adam = FedAvg(engine=engine, server_opt="adam", server_lr=0.01)
    s_sgd = sgd.init(jax.random.key(0), data, hp)
    s_adam = adam.init(jax.random.key(0), data, hp)
    key = jax.random.key(9)
    n_sgd, _ = jax.jit(sgd.round)(s_sgd, data, key)
    n_adam, m = jax.jit(adam.round)(s_adam, data, key)
    # First FedAdam step on the pseudo-gradient g = w - mean: w - lr * g / (|g| + eps).
    for p0, mean, got in zip(jax.tree.leaves(s_adam["params"]), jax.tree.leaves(n_sgd["params"]),
                             jax.tree.leaves(n_adam["params"]), strict=True):
        g = np.asarray(p0, np.float64) - np.asarray(mean, np.float64)
        np.testing.assert_allclose(np.asarray(got), p0 - 0.01 * g / (np.abs(g) + 1e-3),
                                   rtol=1e-5, atol=1e-6)
    step = jax.jit(adam.round)
    for r in range(2):
        n_adam, m = step(n_adam, data, jax.random.key(20 + r))
    leaves = jax.tree.leaves(n_adam["params"])
    assert all(np.all(np.isfinite(np.asarray(x))) for x in leaves)
    assert np.isfinite(float(m["train_loss"]))
    diff = max(float(jnp.max(jnp.abs(a - b)))
               for a, b in zip(leaves, jax.tree.leaves(n_sgd["params"]), strict=True))
    assert diff > 1e-4


def test_validation_errors(setup):
    data, model, hp, _ = setup
    with pytest.raises(ValueError, match="fedavg cohort_size must be an integer >= 1 or None"):
        FedAvg(engine=_engine(model), cohort_size=0).validate(data)
    with pytest.raises(ValueError, match="fedprox prox_mu must be a number >= 0, got -0.1"):
        FedProx(engine=_engine(model), prox_mu=-0.1).validate(data)
    with pytest.raises(ValueError, match="algorithm 'fedsgd' is unknown"):
        make_algorithm("fedsgd", _engine(model))
    with pytest.raises(ValueError, match=r"has no option\(s\) \['mu'\]"):
        make_algorithm("fedprox", _engine(model), mu=0.1)
    with pytest.raises(ValueError, match=r"fedavg batchnorm must be one of \['average', 'local'\]"):
        FedAvg(engine=_engine(model), batchnorm="mean").validate(data)
    # FedBN needs BatchNorm layers to keep: a model without them is refused, naming the option.
    with pytest.raises(ValueError, match="fedprox batchnorm='local' .* has no BatchNorm"):
        FedProx(engine=_engine(model), batchnorm="local").validate(data)
    with pytest.raises(ValueError, match="fedavg batchnorm='local'"):
        FedAvg(engine=_engine(model), batchnorm="local").init(jax.random.key(0), data, None)
    alg = make_algorithm("fedprox", _engine(model), prox_mu=0.2, cohort_size=3)
    assert isinstance(alg, FedProx) and alg.prox_mu == 0.2 and alg.cohort_size == 3
