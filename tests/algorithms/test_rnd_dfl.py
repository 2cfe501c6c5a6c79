"""Decentralized RND (rnd_dfl): regions found on separated groups, gossip confined to regions
(equal to the region average on a complete graph), ledger, driver outputs, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from fedrnd.algorithms import ALGORITHMS, RNDDFL, make_algorithm
from fedrnd.engine import Engine, LocalSpec, client_hparams, tree_bytes
from fedrnd.models import make_model
from tests.rnd._data import grouped_gaussian, shuffled_groups

DIM, K = 6, 3


@pytest.fixture(scope="module")
def setup():
    groups = shuffled_groups([6, 6, 6], seed=1)
    data = grouped_gaussian(groups, n=30, n_test=10, dim=DIM, num_classes=K, sep=8.0,
                            group_labels=True, shift_seed=1, seed=1)
    model = make_model("logreg", (DIM,), K)
    opt, hp = client_hparams(data.num_clients, optimizer={"sgd": 0.5, "momentum": 0.5},
                             lr={"sgd": 0.1, "momentum": 0.05})
    engine = Engine(model, LocalSpec(batch_size=10, epochs=1), opt)
    alg = RNDDFL(engine=engine, topology="complete", band=1.0, network="mlp")
    alg.validate(data)
    state = alg.init(jax.random.key(0), data, hp)
    return groups, data, hp, alg, state


def _leaf(tree):
    return np.concatenate([np.asarray(x).reshape(x.shape[0], -1) for x in jax.tree.leaves(tree)],
                          1)


def test_regions_recovered_on_separated_groups(setup):
    groups, data, _, alg, state = setup
    region = np.asarray(state["clients"]["region"])
    assert adjusted_rand_score(groups, region) == 1.0
    assert int(state["num_regions"]) == 3
    assert ALGORITHMS["rnd_dfl"] is RNDDFL
    # Compatible links join clients of one group only (most in-group links are compatible).
    g = state["graph"]
    same = groups[np.asarray(g.u)] == groups[np.asarray(g.v)]
    comp = np.asarray(state["compatible"])
    assert not np.any(comp & ~same) and comp[same].mean() > 0.8


def test_gossip_is_the_region_average_on_a_complete_graph(setup):
    """Metropolis weights inside a complete region of k nodes are all 1/k: one gossip step is
    the plain average of the region's trained models (FedAvg with equal weights)."""
    _, data, hp, alg, state = setup
    key = jax.random.key(5)
    new, metrics = jax.jit(alg.round)(state, data, key)
    _, k_train = jax.random.split(key)
    cl = state["clients"]
    z, _, _ = alg.engine.train(None, data, hp, k_train, state["round"],
                               client_params=cl["params"], opt_state=cl["opt"])
    region = np.asarray(cl["region"])
    z, got = _leaf(z), _leaf(new["clients"]["params"])
    for r in np.unique(region):
        m = region == r
        np.testing.assert_allclose(got[m], np.broadcast_to(z[m].mean(0), got[m].shape),
                                   rtol=1e-5, atol=1e-6)
    # Ledger: each node sends its model to its k - 1 region peers; discovery bytes in round 1.
    nbytes = tree_bytes(jax.tree.map(lambda a: a[0], cl["params"]))
    np.testing.assert_allclose(np.asarray(metrics["up/model"]), 5 * nbytes)
    assert np.all(np.asarray(metrics["up/discovery"]) > 0)
    assert float(metrics["links"]) == 3 * 15 and float(metrics["num_regions"]) == 3
    _, metrics2 = jax.jit(alg.round)(new, data, key)
    assert np.all(np.asarray(metrics2["up/discovery"]) == 0)


def test_gossip_stays_within_regions():
    """On a sparse graph: changing the models of one region changes nothing outside it."""
    groups = shuffled_groups([8, 8], seed=2)
    data = grouped_gaussian(groups, n=20, n_test=5, dim=DIM, num_classes=K, shift_seed=2,
                            seed=2)
    model = make_model("logreg", (DIM,), K)
    opt, hp = client_hparams(data.num_clients, lr=0.1)
    alg = RNDDFL(engine=Engine(model, LocalSpec(batch_size=10, epochs=1), opt),
                 topology="random_geometric", graph={"radius": 0.6}, band=1.0, network="mlp",
                 gossip_steps=3)
    state = alg.init(jax.random.key(1), data, hp)
    region = np.asarray(state["clients"]["region"])
    # Some graph links join different regions (otherwise the test would prove nothing).
    g = state["graph"]
    assert np.any(region[np.asarray(g.u)] != region[np.asarray(g.v)])
    inside = np.asarray(alg.round_graph(state, jax.random.key(0), 16).valid)
    np.testing.assert_array_equal(inside, region[np.asarray(g.u)] == region[np.asarray(g.v)])
    target = region == region[0]
    bump = jnp.asarray(np.where(target, 100.0, 0.0), jnp.float32)
    moved = jax.tree.map(lambda p: p + bump.reshape((-1,) + (1,) * (p.ndim - 1)),
                         state["clients"]["params"])
    other = {**state, "clients": {**state["clients"], "params": moved}}
    step = jax.jit(alg.round)
    a = _leaf(step(state, data, jax.random.key(3))[0]["clients"]["params"])
    b = _leaf(step(other, data, jax.random.key(3))[0]["clients"]["params"])
    np.testing.assert_array_equal(a[~target], b[~target])
    assert np.all(np.abs(a[target] - b[target]).max(1) > 1.0)


def test_driver_reports_regions(tmp_path):
    from fedrnd.driver import AlgorithmConfig, Config, ModelConfig, simulate

    groups = shuffled_groups([5, 5], seed=3)
    data = grouped_gaussian(groups, n=30, n_test=10, dim=DIM, num_classes=K, shift_seed=3,
                            seed=3)
    cfg = Config(rounds=3, eval_every=3, checkpoint_every=0, progress=False,
                 model=ModelConfig("mlp", {"hidden": [8]}),
                 algorithms=[AlgorithmConfig("rnd_dfl", {"topology": "complete", "band": 1.0,
                                                         "network": "mlp"})])
    res = simulate(cfg, run_dir=tmp_path / "run", data=data, verbose=False)
    r = res.methods["rnd_dfl"]
    assert r.final["ari"] == 1.0 and r.final["regions"] == 2.0
    assert r.history[0]["bytes_up_discovery"] > 0 and r.history[1]["bytes_up_discovery"] == 0
    saved = np.load(tmp_path / "run" / "rnd_dfl" / "regions.npz")
    np.testing.assert_array_equal(saved["region"], r.state["clients"]["region"])
    assert saved["compatible"].sum() == r.final["compatible_links"] > 0


def test_bad_options(setup):
    _, data, _, alg, _ = setup
    engine = alg.engine
    for kw, msg in [(dict(band=0), "band"), (dict(symmetry="both"), "symmetry"),
                    (dict(criterion="z"), "criterion"), (dict(priority="age"), "priority"),
                    (dict(max_hops=-1), "max_hops"), (dict(eps="big"), "eps"),
                    (dict(topology="random_geometric", graph={"radius": 0.5}, redraw=True),
                     "redraw"),
                    (dict(network="conv"), "image")]:
        with pytest.raises(ValueError, match=msg):
            make_algorithm("rnd_dfl", engine, **kw).validate(data)
    with pytest.raises(ValueError, match="has no option"):
        make_algorithm("rnd_dfl", engine, num_clusters=3)
