"""Heterogeneous local optimizers declared in the config: a mix with proportions or one kind
per ground-truth group (``local.optimizer = ["sgd", "adam"]``). A population mixing all eight
kinds, built by the driver, runs one jitted DFedAvg round that equals each optimizer run alone
on its own clients (then the same gossip); bad declarations fail with the field named."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrnd.algorithms import make_algorithm
from fedrnd.driver.config import from_dict, load_config, validate
from fedrnd.driver.setup import build_engine
from fedrnd.engine import OPTIMIZERS, ClientHParams, ClientOptimizer, Engine
from fedrnd.graphs import adjacency
from tests.algorithms._dfl_reference import assert_trees_close, dense_mixing, mix, node

COUNTS = [9, 4, 12, 7, 3, 12, 6, 10, 8, 5, 11, 7, 6, 9, 4, 8]
C = len(COUNTS)
LRS = {"sgd": 0.2, "prox_sgd": 0.15, "momentum": 0.05, "nesterov": 0.04, "adam": 0.01,
       "rmsprop": 0.005, "adagrad": 0.1, "yogi": 0.02}


@pytest.fixture(scope="module")
def data(make_federated):
    return make_federated(COUNTS, dim=5, num_classes=3, seed=1)


def _cfg(**local):
    return validate(from_dict({"model": {"name": "mlp", "options": {"hidden": [6]}},
                               "data": {"num_clients": C},
                               "local": {"batch_size": 4, "epochs": 2, **local}}))


def test_all_eight_optimizers_in_one_jitted_round_equal_each_run_alone(data):
    cfg = _cfg(optimizer={k: 1 for k in OPTIMIZERS}, lr=LRS, prox_mu=0.5,
               optimizer_options={"momentum": 0.8})
    engine, hp, _ = build_engine(cfg, data)
    names = [engine.optimizer.kinds[int(k)] for k in np.asarray(hp.kind)]
    assert sorted(set(names)) == sorted(OPTIMIZERS)  # every kind present, 2 clients each
    np.testing.assert_allclose(np.asarray(hp.lr), [LRS[n] for n in names], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(hp.prox_mu), [0.5 * (n == "prox_sgd") for n in names])

    alg = make_algorithm("dfedavg", engine, topology="ring")
    state = alg.init(jax.random.key(0), data, hp)
    key = jax.random.key(7)
    new, _ = jax.jit(alg.round)(state, data, key)

    # The same round by hand: each kind alone (an engine that knows only that optimizer) on
    # its own clients, with the round's training key, then the dense Metropolis gossip.
    k_train = jax.random.split(key)[1]
    trained = [None] * C
    for kind in OPTIMIZERS:
        ids = np.flatnonzero(np.asarray(names) == kind)
        alone = Engine(engine.model, engine.local, ClientOptimizer(
            (kind,), engine.optimizer.settings), engine.mapper)
        hp_alone = ClientHParams(jnp.zeros(C, jnp.int32), hp.lr, hp.prox_mu)
        start = jax.tree.map(lambda a, ids=ids: a[ids], state["clients"]["params"])
        p, _, _ = alone.train(None, data, hp_alone, k_train, jnp.asarray(0),
                              ids=jnp.asarray(ids), client_params=start)
        for j, i in enumerate(ids):
            trained[i] = node(p, j)
    want = mix(dense_mixing(adjacency(state["graph"])), trained)
    for i in range(C):
        assert_trees_close(node(new["clients"]["params"], i), want[i])


def test_one_optimizer_per_group(data):
    # conftest data: client c is in group c % 2
    cfg = _cfg(optimizer=["adam", "prox_sgd"], lr={"adam": 0.01, "prox_sgd": 0.1}, prox_mu=0.3)
    engine, hp, _ = build_engine(cfg, data)
    names = [engine.optimizer.kinds[int(k)] for k in np.asarray(hp.kind)]
    group = np.asarray(data.group)
    assert names == ["adam" if g == 0 else "prox_sgd" for g in group]
    np.testing.assert_allclose(np.asarray(hp.lr), np.where(group == 0, 0.01, 0.1), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(hp.prox_mu), np.where(group == 0, 0.0, 0.3))
    # more groups than entries: the list is cycled
    cfg = _cfg(optimizer=["momentum"], lr=0.1)
    engine, hp, _ = build_engine(cfg, data)
    assert engine.optimizer.kinds == ("momentum",)
    assert np.all(np.asarray(hp.kind) == 0)


def test_per_group_optimizers_from_the_command_line():
    cfg = load_config(None, ['local.optimizer=["sgd", "nesterov"]',
                             "local.lr={sgd = 0.1, nesterov = 0.05}"])
    assert cfg.local.optimizer == ["sgd", "nesterov"]


@pytest.mark.parametrize("local,match", [
    ({"optimizer": ["sgd", "lbfgs"]}, "lbfgs"),
    ({"optimizer": []}, "at least one"),
    ({"optimizer": {"sgd": -1, "adam": 2}}, "proportions"),
    ({"optimizer": {"sgd": 0, "adam": 0}}, "proportions"),
    ({"optimizer": ["sgd", "adam"], "lr": {"sgd": 0.1}}, r"no entry for optimizer\(s\) \['adam'\]"),
    ({"optimizer": ["sgd", 3]}, "local.optimizer"),
])
def test_bad_optimizer_declarations_are_refused(local, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**local)
