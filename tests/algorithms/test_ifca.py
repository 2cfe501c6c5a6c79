"""IFCA: rounds against a numpy reference, restarts, cohorts, ledger, recovery, driver."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from fedrnd.algorithms import ALGORITHMS, IFCA, FedAvg, make_algorithm
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
    loss_grad,
    pack,
    permuted_groups,
    unpack,
    weighted_means,
)

D, NC, K = 4, 3, 2
COUNTS = [5, 12, 3, 9, 7, 10]
C = len(COUNTS)


@pytest.fixture(scope="module")
def tiny(make_federated):
    """6 ragged logistic-regression clients, per-client learning rates, two hand-made cluster
    models far enough apart that every client's choice is clear."""
    data = make_federated(COUNTS, dim=D, num_classes=NC, seed=4)
    model = make_model("logreg", (D,), NC)
    lrs = np.random.default_rng(1).uniform(0.1, 0.5, C).astype(np.float32)
    hp = ClientHParams(jnp.zeros(C, jnp.int32), jnp.asarray(lrs), jnp.zeros(C, jnp.float32))
    rng = np.random.default_rng(7)
    slots = pack(rng.normal(size=(K, D, NC)) * 1.5, rng.normal(size=(K, NC)))
    return data, model, hp, lrs, slots


def _engine(model, steps=2, chunk=4):
    # Batch 64 > every client's count: each step is one full-batch gradient step.
    return Engine(model, LocalSpec(batch_size=64, steps=steps), ClientOptimizer(),
                  ClientMapper(chunk_size=chunk))


def ref_round(slots, data, lrs, ids, *, steps=2, weighting="samples", averaging="model"):
    """IFCA by plain loops: each client in ``ids`` picks its lowest-loss model, trains it
    (``steps`` GD steps) or takes one gradient, and the server averages per cluster."""
    w0, b0 = unpack(slots)
    losses = np.array([[loss_grad(w0[k], b0[k], *client_xy(data, c))[0]
                        for k in range(len(w0))] for c in ids])
    cid = np.argmin(losses, axis=1)
    weights = np.array([COUNTS[c] if weighting == "samples" else 1.0 for c in ids])
    ws, bs = [], []
    for c, k in zip(ids, cid, strict=True):
        x, y = client_xy(data, c)
        if averaging == "model":
            w, b = gd(w0[k], b0[k], x, y, lrs[c], steps)
        else:  # the client's step; the server subtracts the mean step from the old model
            _, gw, gb = loss_grad(w0[k], b0[k], x, y)
            w, b = w0[k] - lrs[c] * gw, b0[k] - lrs[c] * gb
        ws.append(w)
        bs.append(b)
    new_w, new_b = weighted_means(np.stack(ws), np.stack(bs), weights, cid, w0, b0)
    return cid, losses, new_w, new_b


def _with_slots(alg, data, hp, slots):
    state = alg.init(jax.random.key(0), data, hp)
    return {**state, "slots": slots}


@pytest.mark.parametrize("weighting", ["samples", "uniform"])
@pytest.mark.parametrize("averaging", ["model", "gradient"])
def test_round_matches_numpy_reference(tiny, averaging, weighting):
    data, model, hp, lrs, slots = tiny
    alg = IFCA(engine=_engine(model), num_clusters=K, averaging=averaging, weighting=weighting)
    state = _with_slots(alg, data, hp, slots)
    new, m = jax.jit(alg.round)(state, data, jax.random.key(3))
    cid, losses, w, b = ref_round(slots, data, lrs, range(C), averaging=averaging,
                                  weighting=weighting)
    # Guard: both clusters are chosen and no choice is a near tie.
    assert set(cid.tolist()) == {0, 1}
    assert np.min(np.abs(losses[:, 0] - losses[:, 1])) > 1e-2
    np.testing.assert_array_equal(np.asarray(new["clients"]["cluster_id"]), cid)
    assert_tree_close(new["slots"], pack(w, b))
    wt = np.array(COUNTS if weighting == "samples" else [1] * C, np.float64)
    np.testing.assert_allclose(float(m["cluster_loss"]),
                               np.dot(wt, losses.min(1)) / wt.sum(), rtol=1e-5)
    assert float(m["clusters_used"]) == 2.0
    # Evaluation uses each client's chosen cluster.
    slots_out, assign = alg.models(new)
    np.testing.assert_array_equal(np.asarray(assign), cid)


def test_an_unchosen_cluster_keeps_its_model(tiny):
    data, model, hp, lrs, slots = tiny
    # A third model nobody can prefer: huge logits of the wrong sign everywhere.
    w3, b3 = unpack(slots)
    bad = pack(np.concatenate([w3, 50 * np.ones((1, D, NC))]),
               np.concatenate([b3, np.array([[0.0, 0.0, 100.0]])]))
    alg = IFCA(engine=_engine(model), num_clusters=3)
    state = _with_slots(alg, data, hp, bad)
    new, m = jax.jit(alg.round)(state, data, jax.random.key(3))
    cid, _, w, b = ref_round(bad, data, lrs, range(C))
    assert 2 not in cid
    assert_tree_close(new["slots"], pack(w, b))
    for a, o in zip(jax.tree.leaves(new["slots"]), jax.tree.leaves(bad), strict=True):
        np.testing.assert_array_equal(np.asarray(a[2]), np.asarray(o[2]))
    assert float(m["clusters_used"]) == 2.0


def test_cohort_and_ledger(tiny):
    """Only the cohort chooses and trains; it downloads K models and uploads one."""
    data, model, hp, lrs, slots = tiny
    alg = IFCA(engine=_engine(model), num_clusters=K, cohort_size=3)
    state = _with_slots(alg, data, hp, slots)
    before = np.asarray(state["clients"]["cluster_id"]).copy()
    new, m = jax.jit(alg.round)(state, data, jax.random.key(11))
    nbytes = (D * NC + NC) * 4
    part = np.asarray(m["up/model"]) > 0
    ids = np.flatnonzero(part)
    assert len(ids) == 3
    np.testing.assert_array_equal(np.asarray(m["up/model"]), part * nbytes)
    np.testing.assert_array_equal(np.asarray(m["down/model"]), part * K * nbytes)
    cid, _, w, b = ref_round(slots, data, lrs, ids)
    after = np.asarray(new["clients"]["cluster_id"])
    np.testing.assert_array_equal(after[ids], cid)
    np.testing.assert_array_equal(after[~part], before[~part])
    assert_tree_close(new["slots"], pack(w, b))


def test_initial_choice_and_independent_inits(tiny):
    data, model, hp, lrs, _ = tiny
    alg = IFCA(engine=_engine(model), num_clusters=3)
    state = alg.init(jax.random.key(5), data, hp)
    w, b = unpack(state["slots"])
    # Slot 0 is the initial model every method shares; the others are independent draws.
    assert_tree_close(jax.tree.map(lambda s: s[0], state["slots"]),
                      model.init(jax.random.key(5)), tol=0)
    assert not np.allclose(w[0], w[1]) and not np.allclose(w[1], w[2])
    losses = np.array([[loss_grad(w[k], b[k], *client_xy(data, c))[0] for k in range(3)]
                       for c in range(C)])
    np.testing.assert_array_equal(np.asarray(state["clients"]["cluster_id"]),
                                  np.argmin(losses, 1))


def test_one_cluster_is_fedavg(tiny):
    data, model, hp, lrs, _ = tiny
    engine = _engine(model, steps=3)
    ifca, fedavg = IFCA(engine=engine, num_clusters=1), FedAvg(engine=engine)
    s1, s2 = ifca.init(jax.random.key(2), data, hp), fedavg.init(jax.random.key(2), data, hp)
    step1, step2 = jax.jit(ifca.round), jax.jit(fedavg.round)
    for r in range(3):
        s1, _ = step1(s1, data, jax.random.key(r))
        s2, _ = step2(s2, data, jax.random.key(r))
    assert_tree_close(jax.tree.map(lambda s: s[0], s1["slots"]), s2["params"], tol=1e-6)


def test_restarts_keep_the_lowest_loss_set(tiny):
    """With restart_rounds=0 a restart is a fresh random set; init keeps the set whose
    clients' best losses sum lowest (numpy losses), and the selection traffic is reported in
    the first round only."""
    data, model, hp, lrs, _ = tiny
    r_count = 4
    alg = IFCA(engine=_engine(model), num_clusters=K, restarts=r_count, restart_rounds=0)
    key = jax.random.key(9)
    state = alg.init(key, data, hp)
    totals = []
    for r in range(r_count):
        w, b = unpack(alg._random_slots(key, r))
        totals.append(sum(COUNTS[c] * min(loss_grad(w[k], b[k], *client_xy(data, c))[0]
                                          for k in range(K)) for c in range(C)))
    best = int(np.argmin(totals))
    assert len(set(np.round(totals, 4))) == r_count  # distinct candidates
    assert_tree_close(state["slots"], alg._random_slots(key, best), tol=0)
    nbytes = (D * NC + NC) * 4
    step = jax.jit(alg.round)
    state, m1 = step(state, data, jax.random.key(0))
    _, m2 = step(state, data, jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(m1["down/restarts"]), r_count * K * nbytes)
    np.testing.assert_array_equal(np.asarray(m1["up/restarts"]), r_count * 4)
    np.testing.assert_array_equal(np.asarray(m2["down/restarts"]), 0)


def test_restart_rounds_traffic_is_counted(tiny):
    data, model, hp, lrs, _ = tiny
    alg = IFCA(engine=_engine(model), num_clusters=K, restarts=2, restart_rounds=3)
    state = alg.init(jax.random.key(9), data, hp)
    nbytes = (D * NC + NC) * 4
    assert int(state["round"]) == 0
    np.testing.assert_array_equal(np.asarray(state["clients"]["pending_down"]),
                                  2 * 3 * K * nbytes + 2 * K * nbytes)
    np.testing.assert_array_equal(np.asarray(state["clients"]["pending_up"]),
                                  2 * 3 * nbytes + 2 * 4)


@pytest.mark.parametrize("seed", [0, 1])
def test_recovers_label_permutation_groups(seed):
    """12 clients in 3 groups with distinct label permutations: IFCA with restarts finds the
    groups exactly and beats one global model."""
    data = permuted_groups(12, 3, seed=seed)
    model = make_model("logreg", data.feature_shape, data.num_classes)
    _, hp = client_hparams(data.num_clients, lr=0.1)
    engine = Engine(model, LocalSpec(batch_size=16, epochs=1))
    accs = {}
    for alg in (FedAvg(engine=engine),
                IFCA(engine=engine, num_clusters=3, restarts=4, restart_rounds=8)):
        state = alg.init(jax.random.key(seed), data, hp)
        step = jax.jit(alg.round)
        for r in range(10):
            state, _ = step(state, data, jax.random.key(r))
        slots, assign = alg.models(state)
        accs[alg.name] = float(np.mean(evaluate_clients(model.apply, slots, assign,
                                                        data)["test_acc"]))
    assert adjusted_rand_score(np.asarray(data.group), np.asarray(assign)) == 1.0
    assert accs["ifca"] > 0.9 and accs["ifca"] > accs["fedavg"] + 0.3, accs


def test_registry_and_errors(tiny):
    data, model, hp, lrs, _ = tiny
    assert ALGORITHMS["ifca"] is IFCA and IFCA.clusters_clients
    alg = make_algorithm("ifca", _engine(model), num_clusters=2, averaging="gradient",
                         weighting="uniform", restarts=3, restart_rounds=0)
    alg.validate(data)
    for kw, msg in [({}, "needs num_clusters"), (dict(num_clusters=0), "num_clusters"),
                    (dict(num_clusters=C + 1), r"num_clusters must be .*\[1, num_clients=6\]"),
                    (dict(num_clusters=2.0), "num_clusters"),
                    (dict(num_clusters=True), "num_clusters"),
                    (dict(num_clusters=2, averaging="median"), "averaging"),
                    (dict(num_clusters=2, weighting="loss"), "weighting"),
                    (dict(num_clusters=2, restarts=0), "restarts"),
                    (dict(num_clusters=2, restart_rounds=-1), "restart_rounds")]:
        with pytest.raises(ValueError, match=msg):
            make_algorithm("ifca", _engine(model), **kw).validate(data)
        with pytest.raises(ValueError, match=msg):
            make_algorithm("ifca", _engine(model), **kw).init(jax.random.key(0), data, hp)
    with pytest.raises(ValueError, match="has no option"):
        make_algorithm("ifca", _engine(model), k=2)


def test_simulate_end_to_end_and_resume(tmp_path):
    """Through the driver: ARI/NMI reported, restarts traffic in the ledger, and a run resumed
    from its checkpoint ends exactly where an uninterrupted one does."""
    from fedrnd.driver import AlgorithmConfig, Config, ModelConfig, simulate

    data = permuted_groups(8, 2, seed=2, samples=30)

    def cfg(rounds):
        return Config(rounds=rounds, eval_every=2, checkpoint_every=2, progress=False,
                      model=ModelConfig("logreg", {}),
                      algorithms=[AlgorithmConfig("ifca", {"num_clusters": 2, "restarts": 2,
                                                           "restart_rounds": 2})])

    full = simulate(cfg(6), run_dir=tmp_path / "full", data=data, verbose=False)
    simulate(cfg(4), run_dir=tmp_path / "cut", data=data, verbose=False)
    resumed = simulate(cfg(6), run_dir=tmp_path / "cut", data=data, verbose=False,
                       resume=True, allow_change=["rounds"])
    a, b = full.methods["ifca"], resumed.methods["ifca"]
    for u, v in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(a.bytes_down, b.bytes_down)
    assert a.final["test_acc/mean"] == pytest.approx(b.final["test_acc/mean"])
    assert "ari" in a.final and "nmi" in a.final and a.final["ari"] == b.final["ari"]
    assert a.history[0]["bytes_down_restarts"] > 0 and a.history[1]["bytes_down_restarts"] == 0
    assert [h["round"] for h in b.history] == list(range(1, 7))
