"""RND-clustered FL with robust aggregation and poisoning clients inside federations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrnd.algorithms import RNDClustered, make_algorithm
from fedrnd.engine import ClientOptimizer, Engine, LocalSpec, client_hparams
from fedrnd.engine.robust import coordinate_median
from fedrnd.models import make_model
from tests.rnd._data import grouped_gaussian, shuffled_groups

DIM, K = 6, 3


@pytest.fixture(scope="module")
def setup():
    """12 clients in 3 known federations (6/4/2), states built without discovery."""
    groups = shuffled_groups([6, 4, 2], seed=0)
    data = grouped_gaussian(groups, n=40, n_test=20, dim=DIM, num_classes=K, sep=8.0,
                            group_labels=True)
    data = data.replace(train_count=jnp.asarray(np.arange(12) * 3 + 5, jnp.int32))
    model = make_model("logreg", (DIM,), K)
    _, hp = client_hparams(data.num_clients, lr=0.1)
    engine = Engine(model, LocalSpec(batch_size=64, steps=2), ClientOptimizer())
    return groups, data, engine, hp


def _state(alg, groups, hp):
    c = len(groups)
    found = {"federation": np.asarray(groups), "num_federations": 3, "eps": float("nan"),
             "bytes_up": np.zeros(c), "bytes_down": np.zeros(c)}
    return alg._initial_state(jax.random.key(1), hp, found, 4)


def _round(alg, state, data):
    return jax.jit(alg.round)(state, data, jax.random.key(7))


def _close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def test_per_client_mean_path_equals_the_default_round(setup):
    """aggregation="mean" through the per-client path (a poison option with no poisoner)
    gives the slots of the default K-model round, metrics included."""
    groups, data, engine, hp = setup
    plain = RNDClustered(engine=engine)
    robust = RNDClustered(engine=engine, poison="scale", poison_fraction=0.0)
    state = _state(plain, groups, hp)
    a, ma = _round(plain, state, data)
    b, mb = _round(robust, state, data)
    _close(a["slots"], b["slots"], rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(float(ma["train_loss"]), float(mb["train_loss"]), rtol=1e-5)
    assert float(ma["local_steps"]) == float(mb["local_steps"])


def test_median_round_is_the_slot_plus_the_members_median_update(setup):
    groups, data, engine, hp = setup
    alg = RNDClustered(engine=engine, aggregation="median")
    state = _state(alg, groups, hp)
    new, _ = _round(alg, state, data)
    cid = state["clients"]["cluster_id"]
    start = jax.tree.map(lambda s: s[cid], state["slots"])
    k_train = jax.random.split(jax.random.key(7))[1]
    params, _, _ = engine.train(None, data, hp, k_train, state["round"], client_params=start)
    upd = jax.tree.map(jnp.subtract, params, start)
    med, _ = coordinate_median(upd, cid, 4)
    _close(new["slots"], jax.tree.map(lambda s, m, c=state: s + m, state["slots"], med),
           rtol=1e-5, atol=1e-6)


def test_a_sign_flipping_poisoner_moves_the_mean_but_not_the_robust_aggregators(setup):
    groups, data, engine, hp = setup
    bad = dict(poison="sign_flip", poison_fraction=1 / 12, poison_factor=50.0)
    assert RNDClustered(engine=engine, **bad).poisoners(12).sum() == 1
    state = _state(RNDClustered(engine=engine), groups, hp)

    def drift(**kw):
        honest, _ = _round(RNDClustered(engine=engine, **kw), state, data)
        poisoned, _ = _round(RNDClustered(engine=engine, **kw, **bad), state, data)
        return max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
            jax.tree.leaves(honest["slots"]), jax.tree.leaves(poisoned["slots"]), strict=True))

    mean = drift()  # the poisoner (client 8) is in the federation of 4: trim 0.25 drops 1
    for agg in ("median", "trimmed_mean", "clip"):
        assert drift(aggregation=agg, trim=0.25) < 0.2 * mean, agg


def test_robust_options_are_validated_with_clear_errors(setup):
    groups, data, engine, hp = setup
    for kw, msg in [(dict(aggregation="krum"), "aggregation must be one of"),
                    (dict(trim=0.5), "trim must be"),
                    (dict(poison="noise"), "poison must be one of"),
                    (dict(poison="scale", poison_fraction=1.5), "poison_fraction"),
                    (dict(poison_factor=float("inf")), "poison_factor")]:
        with pytest.raises(ValueError, match=msg):
            make_algorithm("rnd", engine, **kw).validate(data)
    make_algorithm("rnd", engine, aggregation="trimmed_mean", trim=0.2).validate(data)
