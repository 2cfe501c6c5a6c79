"""RND-clustered FL: FedAvg per discovered federation, slots, ledger, re-discovery, driver."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from fedrnd.algorithms import ALGORITHMS, FedAvg, RNDClustered, make_algorithm
from fedrnd.engine import (
    ClientOptimizer,
    Engine,
    LocalSpec,
    client_hparams,
    evaluate_clients,
    tree_bytes,
)
from fedrnd.models import make_model
from tests.rnd._data import grouped_gaussian, shuffled_groups

DIM, K = 6, 3


def _engine(model, **local):
    return Engine(model, LocalSpec(**(local or dict(batch_size=16, epochs=1))),
                  ClientOptimizer())


@pytest.fixture(scope="module")
def clustered():
    """12 clients in 3 groups (sizes 6/4/2) with group-specific labelling rules."""
    groups = shuffled_groups([6, 4, 2], seed=0)
    data = grouped_gaussian(groups, n=40, n_test=20, dim=DIM, num_classes=K, sep=8.0,
                            group_labels=True)
    model = make_model("logreg", (DIM,), K)
    _, hp = client_hparams(data.num_clients, lr=0.1)
    return groups, data, model, hp


def _mean_test_acc(alg, state, data):
    ev = evaluate_clients(alg.engine.model.apply, *alg.models(state), data)
    return float(np.mean(np.asarray(ev["test_acc"])))


def test_rnd_beats_fedavg_and_finds_the_groups(clustered):
    groups, data, model, hp = clustered
    engine = _engine(model)
    accs = {}
    for alg in (FedAvg(engine=engine), RNDClustered(engine=engine)):
        alg.validate(data)
        state = alg.init(jax.random.key(0), data, hp)
        step = jax.jit(alg.round)
        for r in range(12):
            state, metrics = step(state, data, jax.random.key(r))
        accs[alg.name] = _mean_test_acc(alg, state, data)
        if alg.name == "rnd":
            ids = np.asarray(state["clients"]["cluster_id"])
            assert adjusted_rand_score(groups, ids) == 1.0
            assert int(state["num_federations"]) == 3
            assert jax.tree.leaves(state["slots"])[0].shape[0] == 4  # next power of two
            assert float(metrics["num_federations"]) == 3.0
    assert accs["rnd"] > accs["fedavg"] + 0.1, accs
    assert accs["rnd"] > 0.85, accs


def test_round_is_fedavg_inside_each_federation(clustered):
    """With deterministic full-batch local steps, slot k after one round equals FedAvg run on
    federation k's clients alone."""
    groups, data, model, hp = clustered
    # Ragged clients, so a count-weighted mean differs from a plain one.
    data = data.replace(train_count=jnp.asarray(np.arange(12) * 3 + 5, jnp.int32))
    engine = _engine(model, batch_size=64, steps=2)
    alg = RNDClustered(engine=engine)
    state = alg.init(jax.random.key(1), data, hp)
    ids = np.asarray(state["clients"]["cluster_id"])
    new, m = jax.jit(alg.round)(state, data, jax.random.key(7))
    fedavg = FedAvg(engine=engine)
    for f in range(3):
        members = jnp.asarray(np.flatnonzero(ids == f))
        sub = data.select(members)
        fs = fedavg.init(jax.random.key(1), sub, jax.tree.map(lambda a, m=members: a[m], hp))
        fs = {**fs, "params": jax.tree.map(lambda s, f=f: s[f], state["slots"])}
        out, _ = jax.jit(fedavg.round)(fs, sub, jax.random.key(3))
        mine = jax.tree.map(lambda s, f=f: s[f], new["slots"])
        for a, b in zip(jax.tree.leaves(out["params"]), jax.tree.leaves(mine), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)
    # The unused fourth slot keeps its previous model.
    for a, b in zip(jax.tree.leaves(state["slots"]), jax.tree.leaves(new["slots"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a[3]), np.asarray(b[3]))
    # All federations share one initial model (the same as FedAvg's).
    for leaf in jax.tree.leaves(state["slots"]):
        np.testing.assert_array_equal(np.asarray(leaf[0]), np.asarray(leaf[2]))


def test_ledger_reports_discovery_once(clustered):
    groups, data, model, hp = clustered
    alg = RNDClustered(engine=_engine(model))
    state = alg.init(jax.random.key(0), data, hp)
    disc = alg.discover(data, jax.random.fold_in(jax.random.key(0), 1))
    step = jax.jit(alg.round)
    state, m1 = step(state, data, jax.random.key(0))
    state, m2 = step(state, data, jax.random.key(1))
    c = data.num_clients
    nb = tree_bytes(model.init(jax.random.key(0)))
    for m in (m1, m2):
        np.testing.assert_array_equal(np.asarray(m["up/model"]), np.full(c, nb))
        np.testing.assert_array_equal(np.asarray(m["down/model"]), np.full(c, nb))
    np.testing.assert_allclose(np.asarray(m1["up/discovery"]), disc.bytes_up)
    np.testing.assert_allclose(np.asarray(m1["down/discovery"]), disc.bytes_down)
    assert float(np.sum(m1["down/discovery"])) > 0
    np.testing.assert_array_equal(np.asarray(m2["up/discovery"]), 0.0)
    np.testing.assert_array_equal(np.asarray(m2["down/discovery"]), 0.0)


def test_partial_participation(clustered):
    groups, data, model, hp = clustered
    alg = RNDClustered(engine=_engine(model), cohort_size=5)
    state = alg.init(jax.random.key(0), data, hp)
    new, m = jax.jit(alg.round)(state, data, jax.random.key(4))
    part = np.asarray(m["up/model"]) > 0
    assert part.sum() == 5
    ids = np.asarray(state["clients"]["cluster_id"])
    touched = set(ids[part].tolist())
    for f in range(4):  # slots of federations with no participant are unchanged
        same = all(np.array_equal(np.asarray(a[f]), np.asarray(b[f])) for a, b in
                   zip(jax.tree.leaves(state["slots"]), jax.tree.leaves(new["slots"]),
                       strict=True))
        assert same == (f not in touched)


def test_adopt_relabels_and_grows_slots(clustered):
    groups, data, model, hp = clustered
    alg = RNDClustered(engine=_engine(model))
    state = alg.init(jax.random.key(0), data, hp)
    # Make each slot recognisable.
    state = {**state, "slots": jax.tree.map(
        lambda s: s + jnp.arange(s.shape[0], dtype=s.dtype).reshape(-1, *[1] * (s.ndim - 1)),
        state["slots"])}
    old = np.asarray(state["clients"]["cluster_id"])
    disc = alg.discover(data, jax.random.key(5))

    class Fake:  # a re-discovery that renumbers federations and splits one into three
        federation = np.where(old == 0, 4, 2 - old).astype(np.int32)
        federation[np.flatnonzero(old == 0)[:2]] = [3, 5]
        num_federations = 6
        eps = 0.75
        scores = disc.scores
        sigma = disc.sigma
        bytes_up = disc.bytes_up
        bytes_down = disc.bytes_down

    moved = alg.adopt(state, Fake, np.asarray(data.train_count))
    assert jax.tree.leaves(moved["slots"])[0].shape[0] == 8  # grown to the next power of two
    leaf_old = np.asarray(jax.tree.leaves(state["slots"])[0])
    leaf_new = np.asarray(jax.tree.leaves(moved["slots"])[0])
    for new_f, old_f in [(0, 2), (1, 1), (2, 0), (3, 0), (4, 0), (5, 0)]:
        np.testing.assert_array_equal(leaf_new[new_f], leaf_old[old_f])
    np.testing.assert_array_equal(np.asarray(moved["clients"]["cluster_id"]), Fake.federation)
    assert int(moved["num_federations"]) == 6 and float(moved["eps"]) == 0.75
    np.testing.assert_allclose(np.asarray(moved["clients"]["novelty"]), disc.scores)
    np.testing.assert_allclose(np.asarray(moved["clients"]["pending_up"]),
                               np.asarray(state["clients"]["pending_up"]) + disc.bytes_up)
    # The round runs on the grown state.
    jax.jit(alg.round)(moved, data, jax.random.key(0))


def test_registry_options_and_errors(clustered):
    groups, data, model, hp = clustered
    assert ALGORITHMS["rnd"] is RNDClustered
    alg = make_algorithm("rnd", _engine(model), eps=0.5, tau=3, rule="leader", sigma="self",
                         probe="holdout", probe_cap=10, network="mlp", predictor_steps=5)
    assert alg.hook_every == 3 and RNDClustered(engine=alg.engine).hook_every is None
    cfg = alg.rnd_config
    assert (cfg.eps, cfg.rule, cfg.sigma, cfg.probe, cfg.probe_cap, cfg.steps) == (
        0.5, "leader", "self", "holdout", 10, 5)
    alg.validate(data)
    for kw, msg in [(dict(eps=-1.0), "eps must be"), (dict(eps="big"), "eps must be"),
                    (dict(tau=0), "tau"), (dict(network="conv"), "image features"),
                    (dict(sigma="max"), "sigma"), (dict(max_slots=0), "max_slots")]:
        with pytest.raises(ValueError, match=msg):
            make_algorithm("rnd", _engine(model), **kw).validate(data)
    with pytest.raises(ValueError, match="has no option"):
        make_algorithm("rnd", _engine(model), k=3)


def test_driver_runs_rnd_with_rediscovery(tmp_path):
    from fedrnd.driver import AlgorithmConfig, Config, ModelConfig, simulate

    groups = shuffled_groups([4, 4], seed=3)
    data = grouped_gaussian(groups, n=30, n_test=10, dim=DIM, num_classes=K, group_labels=True,
                            shift_seed=3, seed=3)
    cfg = Config(rounds=4, eval_every=2, checkpoint_every=0, progress=False,
                 model=ModelConfig("mlp", {"hidden": [8]}),
                 algorithms=[AlgorithmConfig("rnd", {"tau": 2, "criterion": "eps",
                                                     "eps": "auto"})])
    res = simulate(cfg, run_dir=tmp_path / "run", data=data, verbose=False)
    r = res.methods["rnd"]
    assert [h["num_federations"] for h in r.history] == [2.0] * 4
    # Discovery traffic in round 1 and again in round 3 (after re-discovery at round 2).
    disc = [h.get("bytes_up_discovery", 0.0) for h in r.history]
    assert disc[0] > 0 and disc[2] > 0 and disc[1] == 0 and disc[3] == 0
    assert adjusted_rand_score(groups, np.asarray(r.state["clients"]["cluster_id"])) == 1.0
    assert r.final["ari"] == 1.0 and r.final["federations"] == 2.0 and r.final["eps"] > 0
    saved = np.load(tmp_path / "run" / "rnd" / "novelty.npz")
    assert saved["scores"].shape == (8, 8)
    np.testing.assert_array_equal(saved["federation"], r.state["clients"]["cluster_id"])
    for png in ("novelty.png", "novelty_normalised.png"):
        assert (tmp_path / "run" / "rnd" / png).stat().st_size > 0


def test_keep_scores_option(clustered):
    groups, data, model, hp = clustered
    assert "novelty" in RNDClustered(engine=_engine(model)).init(
        jax.random.key(0), data, hp)["clients"]
    state = RNDClustered(engine=_engine(model), keep_scores=False).init(
        jax.random.key(0), data, hp)
    assert "novelty" not in state["clients"]
    rep = RNDClustered(engine=_engine(model), keep_scores=False).report(state, data)
    assert rep.scalars["federations"] == 3.0 and rep.artifacts == {}
