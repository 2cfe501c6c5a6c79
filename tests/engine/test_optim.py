"""Per-client optimizers against plain optax, mixed populations, client_hparams."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedrnd.engine import (
    OPTIMIZERS,
    ClientHParams,
    ClientOptimizer,
    Engine,
    LocalSpec,
    client_hparams,
    lr_schedule,
    server_optimizer,
)
from fedrnd.models import make_model

LR = 0.05

# The plain optax optimizer each kind must equal (defaults as documented in optim._direction).
REFERENCE = {
    "sgd": lambda lr: optax.sgd(lr),
    "prox_sgd": lambda lr: optax.sgd(lr),  # the prox term lives in the loss, not the optimizer
    "momentum": lambda lr: optax.sgd(lr, momentum=0.9),
    "nesterov": lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True),
    "adam": lambda lr: optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8),
    "rmsprop": lambda lr: optax.rmsprop(lr, decay=0.9, eps=1e-8),
    "adagrad": lambda lr: optax.adagrad(lr, initial_accumulator_value=0.1, eps=1e-7),
    "yogi": lambda lr: optax.yogi(lr, b1=0.9, b2=0.999, eps=1e-3),
}


def test_reference_table_covers_every_kind():
    assert set(REFERENCE) == set(OPTIMIZERS)


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}


def _grads(params, t, seed=0):
    """A params-dependent gradient sequence (a quadratic pull plus fixed noise per step)."""
    rng = np.random.default_rng(100 + 7 * t + seed)
    return jax.tree.map(lambda p: 0.5 * p + jnp.asarray(rng.normal(size=p.shape), jnp.float32),
                        params)


def _run_reference(tx, params, steps, seed=0):
    state = tx.init(params)
    out = []
    for t in range(steps):
        u, state = tx.update(_grads(params, t, seed), state, params)
        params = optax.apply_updates(params, u)
        out.append(params)
    return out


def _run_client(opt, kind, lr, params, steps, seed=0):
    update = jax.jit(opt.update)
    state = opt.init(params)
    out = []
    for t in range(steps):
        u, state = update(_grads(params, t, seed), state, params, jnp.asarray(kind),
                          jnp.asarray(lr, jnp.float32))
        params = optax.apply_updates(params, u)
        out.append(params)
    return out, state


def _assert_trees(a, b, tol=1e-5):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_single_kind_matches_optax(kind):
    params = _params()
    got, _ = _run_client(ClientOptimizer((kind,)), 0, LR, params, 6)
    ref = _run_reference(REFERENCE[kind](LR), params, 6)
    for g, r in zip(got, ref, strict=True):
        _assert_trees(g, r)
    # The trajectory actually moves (a no-op optimizer would not pass by accident).
    assert np.max(np.abs(np.asarray(got[-1]["w"] - params["w"]))) > 1e-3


def test_mixed_optimizer_each_client_matches_its_own_optax():
    kinds = ("sgd", "adam", "yogi", "nesterov", "adagrad")
    opt = ClientOptimizer(kinds)
    for i, kind in enumerate(kinds):
        lr = LR * (i + 1)
        got, state = _run_client(opt, i, lr, _params(), 5, seed=i)
        ref = _run_reference(REFERENCE[kind](lr), _params(), 5, seed=i)
        for g, r in zip(got, ref, strict=True):
            _assert_trees(g, r)
        # The kinds a client does not use keep their initial state.
        init = opt.init(_params())
        for j in range(len(kinds)):
            if j != i:
                _assert_trees(state[j], init[j], tol=0)


def test_mixed_optimizer_under_vmap_selects_per_client():
    kinds = ("momentum", "rmsprop", "adam")
    opt = ClientOptimizer(kinds)
    c = 6
    kind = jnp.asarray([2, 0, 1, 1, 0, 2])
    lr = jnp.asarray([0.01, 0.1, 0.02, 0.05, 0.2, 0.03], jnp.float32)
    params = jax.tree.map(lambda p: jnp.broadcast_to(p, (c, *p.shape)), _params())
    state = jax.vmap(opt.init)(params)
    step = jax.jit(jax.vmap(opt.update))
    traj = []
    for t in range(4):
        noise = _grads(jax.tree.map(jnp.zeros_like, _params()), t)  # the same for every client
        grads = jax.tree.map(lambda p, n: 0.5 * p + n, params, noise)
        u, state = step(grads, state, params, kind, lr)
        params = optax.apply_updates(params, u)
        traj.append(params)
    for ci in range(c):
        ref = _run_reference(REFERENCE[kinds[int(kind[ci])]](float(lr[ci])), _params(), 4)
        for got, r in zip(traj, ref, strict=True):
            _assert_trees(jax.tree.map(lambda a, ci=ci: a[ci], got), r)


def test_optimizer_settings_override_defaults():
    settings = (("momentum", 0.5), ("weight_decay", 0.01))
    got, _ = _run_client(ClientOptimizer(("momentum",), settings), 0, LR, _params(), 5)
    ref = _run_reference(optax.chain(optax.add_decayed_weights(0.01),
                                     optax.sgd(LR, momentum=0.5)), _params(), 5)
    for g, r in zip(got, ref, strict=True):
        _assert_trees(g, r)
    got, _ = _run_client(ClientOptimizer(("adam",), (("b1", 0.5), ("eps", 1e-3))), 0, LR,
                         _params(), 5)
    ref = _run_reference(optax.adam(LR, b1=0.5, eps=1e-3), _params(), 5)
    for g, r in zip(got, ref, strict=True):
        _assert_trees(g, r)


# ---- heterogeneous populations through the engine -------------------------------------------

@functools.partial(jax.jit, static_argnums=0)
def _train(engine, params, data, hp, key, ids, opt_state):
    return engine.train(params, data, hp, key, jnp.asarray(0), ids=ids, opt_state=opt_state)


@pytest.mark.parametrize("mix,lrs", [
    ({"sgd": 0.5, "adam": 0.5}, {"sgd": 0.1, "adam": 0.01}),
    ({"momentum": 1, "yogi": 1, "sgd": 2}, {"momentum": 0.05, "yogi": 0.02, "sgd": 0.2}),
])
def test_heterogeneous_optimizers_match_each_optimizer_run_alone(make_federated, mix, lrs):
    c = 8
    data = make_federated([9, 4, 12, 7, 3, 12, 6, 10], dim=5, num_classes=3)
    model = make_model("mlp", (5,), 3, hidden=[6])
    spec = LocalSpec(batch_size=4, epochs=2)
    opt, hp = client_hparams(c, optimizer=mix, lr=lrs, seed=3)
    names = [opt.kinds[int(k)] for k in hp.kind]
    assert set(names) == set(mix)  # every kind is present
    engine = Engine(model, spec, opt)
    params = model.init(jax.random.key(0))
    key1, key2 = jax.random.key(1), jax.random.key(2)
    # Two rounds, carrying each client's optimizer state (as a stateful method does).
    p1, s1, m1 = _train(engine, params, data, hp, key1, None, None)
    p2, _, m2 = _train(engine, params, data, hp, key2, None, s1)
    assert np.all(np.isfinite(np.asarray(m1["loss"])))

    alone = {k: Engine(model, spec, ClientOptimizer((k,))) for k in mix}
    for ci in range(c):
        hp_alone = ClientHParams(jnp.zeros(c, jnp.int32), jnp.full(c, lrs[names[ci]], jnp.float32),
                                 jnp.zeros(c, jnp.float32))
        ids = jnp.asarray([ci])
        q1, t1, _ = _train(alone[names[ci]], params, data, hp_alone, key1, ids, None)
        q2, _, _ = _train(alone[names[ci]], params, data, hp_alone, key2, ids, t1)
        _assert_trees(jax.tree.map(lambda a, ci=ci: a[ci:ci + 1], p1), q1)
        _assert_trees(jax.tree.map(lambda a, ci=ci: a[ci:ci + 1], p2), q2)
    # And the kinds matter: an adam/yogi/momentum client trained with plain sgd differs.
    ci = next(i for i, n in enumerate(names) if n != "sgd")
    hp_sgd = ClientHParams(jnp.zeros(c, jnp.int32), jnp.full(c, lrs[names[ci]], jnp.float32),
                           jnp.zeros(c, jnp.float32))
    q, _, _ = _train(Engine(model, spec, ClientOptimizer(("sgd",))), params, data, hp_sgd, key1,
                     jnp.asarray([ci]), None)
    diff = max(float(jnp.max(jnp.abs(a[ci] - b[0])))
               for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(q), strict=True))
    assert diff > 1e-4


# ---- client_hparams -------------------------------------------------------------------------

def _counts(opt, hp):
    names = [opt.kinds[int(k)] for k in np.asarray(hp.kind)]
    return {k: names.count(k) for k in opt.kinds}, names


def test_client_hparams_single_kind():
    opt, hp = client_hparams(5, optimizer="adam", lr=0.003)
    assert opt.kinds == ("adam",)
    np.testing.assert_array_equal(np.asarray(hp.kind), np.zeros(5))
    np.testing.assert_allclose(np.asarray(hp.lr), np.full(5, 0.003), rtol=1e-7)
    np.testing.assert_array_equal(np.asarray(hp.prox_mu), np.zeros(5))
    assert hp.kind.shape == hp.lr.shape == hp.prox_mu.shape == (5,)


@pytest.mark.parametrize("c,mix,expected", [
    (10, {"sgd": 0.5, "adam": 0.3, "yogi": 0.2}, {"sgd": 5, "adam": 3, "yogi": 2}),
    (9, {"sgd": 1, "adam": 2}, {"sgd": 3, "adam": 6}),          # unnormalised proportions
    (4, {"sgd": 1.0, "adam": 0.0}, {"sgd": 4, "adam": 0}),
    (7, {"sgd": 0.3, "adam": 0.7}, {"sgd": 2, "adam": 5}),     # 2.1 -> 2, 4.9 -> 5
    (16, {"sgd": 0.25, "momentum": 0.75}, {"sgd": 4, "momentum": 12}),
])
def test_client_hparams_mix_counts(c, mix, expected):
    lrs = {k: 0.01 * (i + 1) for i, k in enumerate(mix)}
    opt, hp = client_hparams(c, optimizer=mix, lr=lrs, seed=1)
    counts, names = _counts(opt, hp)
    assert counts == expected
    np.testing.assert_allclose(np.asarray(hp.lr), [lrs[n] for n in names], rtol=1e-6)


def test_client_hparams_mix_rounding_sums_to_num_clients():
    for c in (3, 7, 11, 13):
        mix = {"sgd": 0.5, "adam": 0.3, "rmsprop": 0.2}
        opt, hp = client_hparams(c, optimizer=mix, lr=0.1)
        counts, _ = _counts(opt, hp)
        assert sum(counts.values()) == c
        for k, w in mix.items():
            assert abs(counts[k] - w * c) < 2, (c, counts)


def test_client_hparams_seeded_assignment():
    mix = {"sgd": 0.5, "adam": 0.5}
    a = np.asarray(client_hparams(20, optimizer=mix, lr=0.1, seed=4)[1].kind)
    b = np.asarray(client_hparams(20, optimizer=mix, lr=0.1, seed=4)[1].kind)
    np.testing.assert_array_equal(a, b)
    others = [np.asarray(client_hparams(20, optimizer=mix, lr=0.1, seed=s)[1].kind)
              for s in (5, 6, 7)]
    assert any(not np.array_equal(a, o) for o in others)
    assert not np.array_equal(a, np.sort(a))  # shuffled, not blocks


def test_client_hparams_prox_mu_only_for_prox_sgd():
    opt, hp = client_hparams(6, optimizer={"prox_sgd": 0.5, "sgd": 0.5}, lr=0.1, prox_mu=0.3)
    _, names = _counts(opt, hp)
    np.testing.assert_allclose(np.asarray(hp.prox_mu),
                               [0.3 if n == "prox_sgd" else 0.0 for n in names], rtol=1e-6)


def test_client_hparams_per_group():
    group = np.array([0, 1, 2, 0, 1, 2, 3])
    opt, hp = client_hparams(7, group=group, per_group=["adam", "sgd"],
                             lr={"adam": 0.001, "sgd": 0.1})
    _, names = _counts(opt, hp)
    assert names == ["adam", "sgd", "adam", "adam", "sgd", "adam", "sgd"]
    np.testing.assert_allclose(np.asarray(hp.lr), [0.001 if n == "adam" else 0.1 for n in names],
                               rtol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(optimizer="sgdd"), r"optimizer 'sgdd' is unknown"),
    (dict(optimizer={"sgd": 0.5, "lbfgs": 0.5}, lr=0.1), r"optimizer 'lbfgs' is unknown"),
    (dict(lr=0.0), r"learning rates must be finite and > 0"),
    (dict(lr=-0.1), r"learning rates must be finite and > 0"),
    (dict(lr=float("nan")), r"learning rates must be finite and > 0"),
    (dict(optimizer={"sgd": 0.5, "adam": 0.5}, lr={"sgd": 0.1, "adam": -1e-3}),
     r"learning rates must be finite and > 0"),
    (dict(optimizer={"sgd": 0.5, "adam": 0.5}, lr={"sgd": 0.1}),
     r"lr has no entry for optimizer\(s\) \['adam'\]"),
    (dict(optimizer={"sgd": -0.5, "adam": 1.0}), r"proportions must be >= 0 and sum > 0"),
    (dict(optimizer={"sgd": 0.0, "adam": 0.0}), r"proportions must be >= 0 and sum > 0"),
    (dict(per_group=["sgd", "adam"]), r"per_group optimizers need the clients' group ids"),
])
def test_client_hparams_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        client_hparams(6, **kwargs)


def test_client_optimizer_errors():
    with pytest.raises(ValueError, match="at least one optimizer kind"):
        ClientOptimizer(())
    with pytest.raises(ValueError, match=r"optimizer 'adamw' is unknown \(did you mean "
                                         r"'adam'\?\); allowed: sgd, "):
        ClientOptimizer(("sgd", "adamw"))


# ---- schedules and server optimizers --------------------------------------------------------

def test_lr_schedules():
    r = jnp.arange(12)
    np.testing.assert_allclose(np.asarray(lr_schedule()(r)), 1.0)
    np.testing.assert_allclose(np.asarray(lr_schedule("exponential", rate=0.07)(r)),
                               np.exp(-0.07 * np.arange(12)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(lr_schedule("exponential", decay_rate=0.9)(r)),
                               0.9 ** np.arange(12), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(lr_schedule("step", every=5, gamma=0.5)(r)),
                               0.5 ** (np.arange(12) // 5), rtol=1e-6)
    cos = np.asarray(jax.vmap(lr_schedule("cosine", rounds=10, alpha=0.1))(jnp.arange(11)))
    k = np.arange(11)
    np.testing.assert_allclose(cos, 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * k / 10)), rtol=1e-5)
    with pytest.raises(ValueError, match="lr schedule 'linear' is unknown"):
        lr_schedule("linear")


def test_server_optimizer_unknown():
    with pytest.raises(ValueError, match="server optimizer 'lbfgs' is unknown"):
        server_optimizer("lbfgs")
