"""FeSEM: rounds against a numpy k-means reference, seeding, cohorts, recovery, driver."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from fedrnd.algorithms import ALGORITHMS, FedAvg, FeSEM, make_algorithm
from fedrnd.algorithms.fesem import seed_centres, sq_distances
from fedrnd.engine import (
    ClientHParams,
    ClientMapper,
    ClientOptimizer,
    Engine,
    LocalSpec,
    client_hparams,
    evaluate_clients,
)
from fedrnd.models import make_model
from tests.algorithms._clustered import (
    assert_tree_close,
    client_xy,
    gd,
    pack,
    permuted_groups,
    unpack,
    weighted_means,
)

D, NC, K = 4, 3, 2
COUNTS = [5, 12, 3, 9, 7, 10]
C = len(COUNTS)
STEPS = 4


@pytest.fixture(scope="module")
def tiny(make_federated):
    """6 ragged logistic-regression clients with per-client learning rates."""
    data = make_federated(COUNTS, dim=D, num_classes=NC, seed=4)
    model = make_model("logreg", (D,), NC)
    lrs = np.random.default_rng(1).uniform(0.5, 1.0, C).astype(np.float32)
    hp = ClientHParams(jnp.zeros(C, jnp.int32), jnp.asarray(lrs), jnp.zeros(C, jnp.float32))
    return data, model, hp, lrs


def _engine(model, steps=STEPS, chunk=4):
    # Batch 64 > every client's count: each step is one full-batch gradient step.
    return Engine(model, LocalSpec(batch_size=64, steps=steps), ClientOptimizer(),
                  ClientMapper(chunk_size=chunk))


def ref_local(centres, cid, data, lrs, ids, steps=STEPS):
    """Each client in ``ids`` trains from its centre: ``[M, D, NC]``, ``[M, NC]``."""
    cw, cb = unpack(centres)
    out = [gd(cw[k], cb[k], *client_xy(data, c), lrs[c], steps) for c, k in zip(ids, cid,
                                                                                 strict=True)]
    return np.stack([w for w, _ in out]), np.stack([b for _, b in out])


def ref_lloyd(ws, bs, weights, cw, cb, iters):
    """Plain Lloyd iterations; returns the last assignment, its centres and its distances."""
    for _ in range(iters):
        d = (((ws[:, None] - cw[None]) ** 2).sum((2, 3)) + ((bs[:, None] - cb[None]) ** 2).sum(2))
        cid = np.argmin(d, axis=1)
        cw, cb = weighted_means(ws, bs, weights, cid, cw, cb)
    return cid, cw, cb, d


def _state(alg, data, hp, centres, cid, round_=1):
    state = alg.init(jax.random.key(0), data, hp)
    return {**state, "round": jnp.asarray(round_, jnp.int32), "slots": centres,
            "clients": {**state["clients"], "cluster_id": jnp.asarray(cid, jnp.int32)}}


def _centres(seed=8, gap=0.05):
    """Two centres close together (``base -/+ gap * delta``), so local training carries clients
    across the boundary and the E-step has work to do."""
    rng = np.random.default_rng(seed)
    base_w, base_b = rng.normal(size=(D, NC)) * 0.5, rng.normal(size=NC) * 0.5
    dw, db = rng.normal(size=(D, NC)), rng.normal(size=NC)
    return pack(np.stack([base_w - gap * dw, base_w + gap * dw]),
                np.stack([base_b - gap * db, base_b + gap * db]))


@pytest.mark.parametrize("iters,weighting", [(1, "samples"), (4, "samples"), (4, "uniform")])
def test_round_matches_numpy_reference(tiny, iters, weighting):
    """Local training from the assigned centre, then ``iters`` Lloyd iterations (L2 on all
    weights, weighted means, empty centres kept), equal to plain loops."""
    data, model, hp, lrs = tiny
    alg = FeSEM(engine=_engine(model), num_clusters=K, kmeans_iters=iters, weighting=weighting)
    cid0 = np.array([0, 1, 0, 1, 1, 0])
    centres = _centres()
    state = _state(alg, data, hp, centres, cid0)
    new, m = jax.jit(alg.round)(state, data, jax.random.key(2))
    ws, bs = ref_local(centres, cid0, data, lrs, range(C))
    weights = np.array(COUNTS if weighting == "samples" else [1] * C, np.float64)
    cid, cw, cb, d = ref_lloyd(ws, bs, weights, *unpack(centres), iters)
    # Guard: the E-step moves clients, and no assignment is a near tie.
    assert (cid != cid0).any()
    srt = np.sort(d, axis=1)
    assert np.min(srt[:, 1] - srt[:, 0]) > 1e-3
    np.testing.assert_array_equal(np.asarray(new["clients"]["cluster_id"]), cid)
    assert_tree_close(new["slots"], pack(cw, cb))
    assert float(m["moved"]) == float(np.sum(cid != cid0))
    np.testing.assert_allclose(float(m["kmeans_inertia"]),
                               np.dot(weights, d.min(1)) / weights.sum(), rtol=1e-4)
    nbytes = (D * NC + NC) * 4
    np.testing.assert_array_equal(np.asarray(m["up/model"]), np.full(C, nbytes))
    np.testing.assert_array_equal(np.asarray(m["down/model"]), np.full(C, nbytes))
    slots, assign = alg.models(new)
    np.testing.assert_array_equal(np.asarray(assign), cid)


def test_empty_centre_keeps_its_weights(tiny):
    data, model, hp, lrs = tiny
    alg = FeSEM(engine=_engine(model), num_clusters=3, kmeans_iters=2)
    cw, cb = unpack(_centres())
    far = pack(np.concatenate([cw, np.full((1, D, NC), 40.0)]),
               np.concatenate([cb, np.full((1, NC), 40.0)]))
    cid0 = np.array([0, 1, 0, 1, 1, 0])
    new, m = jax.jit(alg.round)(_state(alg, data, hp, far, cid0), data, jax.random.key(2))
    for a, o in zip(jax.tree.leaves(new["slots"]), jax.tree.leaves(far), strict=True):
        np.testing.assert_array_equal(np.asarray(a[2]), np.asarray(o[2]))
    assert 2 not in np.asarray(new["clients"]["cluster_id"])
    assert float(m["clusters_used"]) == 2.0


@pytest.mark.parametrize("seeding", ["kmeans++", "random"])
def test_first_round_seeds_centres_and_converges(tiny, seeding):
    """Round 0: every client trains from the shared initial model; the centres are seeded
    from those local models and refined to a k-means fixed point (each centre the weighted
    mean of its clients, each client nearest its own centre)."""
    data, model, hp, lrs = tiny
    alg = FeSEM(engine=_engine(model), num_clusters=3, kmeans_iters=20, seeding=seeding)
    state = alg.init(jax.random.key(4), data, hp)
    init = model.init(jax.random.key(4))
    for leaf, ref in zip(jax.tree.leaves(state["slots"]), jax.tree.leaves(init), strict=True):
        np.testing.assert_array_equal(np.asarray(leaf), np.broadcast_to(ref, leaf.shape))
    new, m = jax.jit(alg.round)(state, data, jax.random.key(8))
    ws, bs = ref_local(state["slots"], np.zeros(C, int), data, lrs, range(C))
    cid = np.asarray(new["clients"]["cluster_id"])
    cw, cb = unpack(new["slots"])
    assert len(set(cid.tolist())) == 3 and float(m["clusters_used"]) == 3.0
    mw, mb = weighted_means(ws, bs, np.asarray(COUNTS, np.float64), cid, cw, cb)
    np.testing.assert_allclose(cw, mw, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cb, mb, rtol=1e-4, atol=1e-5)
    d = ((ws[:, None] - cw[None]) ** 2).sum((2, 3)) + ((bs[:, None] - cb[None]) ** 2).sum(2)
    np.testing.assert_array_equal(np.argmin(d, axis=1), cid)


@pytest.mark.parametrize("how", ["kmeans++", "random"])
def test_seeding_with_as_many_centres_as_clients_takes_every_client(tiny, how):
    """k-means++ never picks a model that is already a centre (its distance is 0)."""
    rng = np.random.default_rng(0)
    models = {"w": jnp.asarray(rng.normal(size=(5, 3, 2)), jnp.float32)}
    cs = seed_centres(ClientMapper(chunk_size=2), models, jnp.ones(5), 5, jax.random.key(1), how)
    got = sorted(map(tuple, np.asarray(cs["w"]).reshape(5, -1).round(6)))
    want = sorted(map(tuple, np.asarray(models["w"]).reshape(5, -1).round(6)))
    assert got == want
    d = sq_distances(ClientMapper(), models, cs)
    ref = ((np.asarray(models["w"])[:, None] - np.asarray(cs["w"])[None]) ** 2).sum((2, 3))
    np.testing.assert_allclose(np.asarray(d), ref, rtol=1e-5)


def test_cohort_only_participants_move(tiny):
    data, model, hp, lrs = tiny
    alg = FeSEM(engine=_engine(model), num_clusters=K, kmeans_iters=3, cohort_size=4)
    cid0 = np.array([0, 1, 0, 1, 1, 0])
    centres = _centres()
    new, m = jax.jit(alg.round)(_state(alg, data, hp, centres, cid0), data, jax.random.key(6))
    part = np.asarray(m["up/model"]) > 0
    ids = np.flatnonzero(part)
    assert len(ids) == 4
    ws, bs = ref_local(centres, cid0[ids], data, lrs, ids)
    cid, cw, cb, _ = ref_lloyd(ws, bs, np.asarray(COUNTS, np.float64)[ids], *unpack(centres), 3)
    after = np.asarray(new["clients"]["cluster_id"])
    np.testing.assert_array_equal(after[ids], cid)
    np.testing.assert_array_equal(after[~part], cid0[~part])
    assert_tree_close(new["slots"], pack(cw, cb))
    np.testing.assert_array_equal(np.asarray(m["down/model"]), np.asarray(m["up/model"]))


def test_one_cluster_is_fedavg(tiny):
    data, model, hp, lrs = tiny
    engine = _engine(model, steps=2)
    fesem, fedavg = FeSEM(engine=engine, num_clusters=1), FedAvg(engine=engine)
    s1, s2 = fesem.init(jax.random.key(2), data, hp), fedavg.init(jax.random.key(2), data, hp)
    step1, step2 = jax.jit(fesem.round), jax.jit(fedavg.round)
    for r in range(3):
        s1, _ = step1(s1, data, jax.random.key(r))
        s2, _ = step2(s2, data, jax.random.key(r))
    assert_tree_close(jax.tree.map(lambda s: s[0], s1["slots"]), s2["params"], tol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_recovers_label_permutation_groups(seed):
    """12 clients in 3 groups with distinct label permutations: the k-means of the first
    round's local models separates the groups, and cluster models beat one global model."""
    data = permuted_groups(12, 3, seed=seed)
    model = make_model("logreg", data.feature_shape, data.num_classes)
    _, hp = client_hparams(data.num_clients, lr=0.1)
    engine = Engine(model, LocalSpec(batch_size=16, epochs=1))
    accs = {}
    for alg in (FedAvg(engine=engine), FeSEM(engine=engine, num_clusters=3)):
        state = alg.init(jax.random.key(seed), data, hp)
        step = jax.jit(alg.round)
        for r in range(8):
            state, _ = step(state, data, jax.random.key(r))
        slots, assign = alg.models(state)
        accs[alg.name] = float(np.mean(evaluate_clients(model.apply, slots, assign,
                                                        data)["test_acc"]))
    assert adjusted_rand_score(np.asarray(data.group), np.asarray(assign)) == 1.0
    assert accs["fesem"] > 0.9 and accs["fesem"] > accs["fedavg"] + 0.3, accs


def test_registry_and_errors(tiny):
    data, model, hp, lrs = tiny
    assert ALGORITHMS["fesem"] is FeSEM and FeSEM.clusters_clients
    make_algorithm("fesem", _engine(model), num_clusters=2, kmeans_iters=1, seeding="random",
                   seed_trials=2, weighting="uniform", cohort_size=2).validate(data)
    for kw, msg in [({}, "needs num_clusters"), (dict(num_clusters=0), "num_clusters"),
                    (dict(num_clusters=C + 1), r"\[1, num_clients=6\]"),
                    (dict(num_clusters=2, kmeans_iters=0), "kmeans_iters"),
                    (dict(num_clusters=2, seed_trials=0), "seed_trials"),
                    (dict(num_clusters=2, seeding="farthest"), "seeding"),
                    (dict(num_clusters=2, weighting="x"), "weighting"),
                    (dict(num_clusters=3, cohort_size=2), "cohort_size=2 must be >= num_clusters")]:
        with pytest.raises(ValueError, match=msg):
            make_algorithm("fesem", _engine(model), **kw).validate(data)
        with pytest.raises(ValueError, match=msg):
            make_algorithm("fesem", _engine(model), **kw).init(jax.random.key(0), data, hp)


def test_simulate_end_to_end_and_resume(tmp_path):
    from fedrnd.driver import AlgorithmConfig, Config, ModelConfig, simulate

    data = permuted_groups(8, 2, seed=1, samples=40)

    def cfg(rounds):
        return Config(rounds=rounds, eval_every=2, checkpoint_every=2, progress=False,
                      model=ModelConfig("logreg", {}),
                      algorithms=[AlgorithmConfig("fesem", {"num_clusters": 2})])

    full = simulate(cfg(6), run_dir=tmp_path / "full", data=data, verbose=False)
    simulate(cfg(2), run_dir=tmp_path / "cut", data=data, verbose=False)
    resumed = simulate(cfg(6), run_dir=tmp_path / "cut", data=data, verbose=False,
                       resume=True, allow_change=["rounds"])
    a, b = full.methods["fesem"], resumed.methods["fesem"]
    for u, v in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(a.bytes_up, b.bytes_up)
    assert a.final["test_acc/mean"] == pytest.approx(b.final["test_acc/mean"])
    assert a.final["ari"] == 1.0 and b.final["ari"] == 1.0
    assert [h["round"] for h in b.history] == list(range(1, 7))
