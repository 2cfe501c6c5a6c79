"""CFL (Sattler et al.): FedAvg per cluster, update statistics, split criterion and bipartition,
partial participation, ledger, registry errors, and splits through the driver (resume)."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.cluster import AgglomerativeClustering

from fedrnd.algorithms import ALGORITHMS, CFL, FedAvg, make_algorithm
from fedrnd.algorithms.cfl import bipartition, cosine_similarity
from fedrnd.engine import ClientOptimizer, Engine, LocalSpec, client_hparams, tree_bytes
from fedrnd.models import make_model
from tests.rnd._data import grouped_gaussian, shuffled_groups

DIM, K = 6, 3


def _engine(model, **local):
    return Engine(model, LocalSpec(**(local or dict(batch_size=16, epochs=1))),
                  ClientOptimizer())


def _flat_rows(tree) -> np.ndarray:
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
    return np.concatenate([x.reshape(x.shape[0], -1) for x in leaves], axis=1)


@pytest.fixture(scope="module")
def two_groups():
    """10 clients in 2 groups whose labelling rules disagree (concept shift)."""
    groups = shuffled_groups([5, 5], seed=0)
    data = grouped_gaussian(groups, n=40, n_test=10, dim=DIM, num_classes=K, sep=2.0,
                            group_labels=True, shift_seed=1)
    model = make_model("logreg", (DIM,), K)
    _, hp = client_hparams(data.num_clients, lr=0.1)
    return groups, data, model, hp


def test_round_is_fedavg_per_cluster_with_update_statistics(two_groups):
    """Slot k after a round equals FedAvg on cluster k's clients; the kept updates are each
    client's own trained model minus its start; norms per cluster match numpy."""
    groups, data, model, hp = two_groups
    data = data.replace(train_count=jnp.asarray(np.arange(10) * 3 + 10, jnp.int32))  # ragged
    engine = _engine(model, batch_size=64, steps=2)  # deterministic full-batch steps
    alg = CFL(engine=engine)
    state = alg.init(jax.random.key(1), data, hp)
    # Two clusters in four slots, with different models.
    cid = np.asarray(groups)
    slots = jax.tree.map(lambda s: jnp.concatenate([s, s + 0.3, s, s]), state["slots"])
    state = {**state, "slots": slots, "num_clusters": jnp.asarray(2, jnp.int32),
             "mean_norm": jnp.full((4,), jnp.inf), "max_norm": jnp.zeros(4),
             "born": jnp.zeros(4, jnp.int32),
             "clients": {**state["clients"], "cluster_id": jnp.asarray(cid, jnp.int32)}}
    new, m = jax.jit(alg.round)(state, data, jax.random.key(7))

    fedavg = FedAvg(engine=engine)
    n = np.asarray(data.train_count, np.float64)
    upd = _flat_rows(new["clients"]["update"])
    for c in range(data.num_clients):  # each client's update, from a one-client FedAvg round
        one = jnp.asarray([c])
        fs = fedavg.init(jax.random.key(1), data.select(one), jax.tree.map(lambda a, o=one: a[o], hp))
        start = jax.tree.map(lambda s, k=int(cid[c]): s[k], slots)
        out, _ = jax.jit(fedavg.round)({**fs, "params": start}, data.select(one),
                                       jax.random.key(0))
        want = _flat_rows(jax.tree.map(lambda a, b: (a - b)[None], out["params"], start))[0]
        np.testing.assert_allclose(upd[c], want, rtol=1e-5, atol=1e-6)
    for k in range(2):
        members = np.flatnonzero(cid == k)
        sub = data.select(jnp.asarray(members))
        fs = fedavg.init(jax.random.key(1), sub, jax.tree.map(lambda a, m=members: a[m], hp))
        fs = {**fs, "params": jax.tree.map(lambda s, k=k: s[k], slots)}
        out, _ = jax.jit(fedavg.round)(fs, sub, jax.random.key(3))
        for a, b in zip(jax.tree.leaves(out["params"]), jax.tree.leaves(new["slots"]),
                        strict=True):
            np.testing.assert_allclose(np.asarray(b[k]), np.asarray(a), rtol=2e-5, atol=1e-6)
        mean = np.average(upd[members], axis=0, weights=n[members])
        assert float(new["mean_norm"][k]) == pytest.approx(np.linalg.norm(mean), rel=1e-4)
        assert float(new["max_norm"][k]) == pytest.approx(
            np.linalg.norm(upd[members], axis=1).max(), rel=1e-5)
    assert np.all(np.isinf(np.asarray(new["mean_norm"][2:])))  # empty slots: no statistics
    # Empty slots keep their models; round 0 sets the reference norm.
    for a, b in zip(jax.tree.leaves(slots), jax.tree.leaves(new["slots"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a[2:]), np.asarray(b[2:]))
    assert float(new["ref_norm"]) == pytest.approx(np.linalg.norm(upd, axis=1).mean(), rel=1e-5)
    assert np.asarray(new["clients"]["fresh"]).all()
    # Ledger: one model up and down per client.
    nb = tree_bytes(model.init(jax.random.key(0)))
    np.testing.assert_array_equal(np.asarray(m["up/model"]), np.full(10, nb))
    np.testing.assert_array_equal(np.asarray(m["down/model"]), np.full(10, nb))
    assert float(m["num_clusters"]) == 2.0
    # The reference stays the first round's.
    newer, _ = jax.jit(alg.round)(new, data, jax.random.key(8))
    assert float(newer["ref_norm"]) == float(new["ref_norm"])


def test_smoothing_is_an_exponential_average_of_updates(two_groups):
    groups, data, model, hp = two_groups
    engine = _engine(model, batch_size=64, steps=1)
    plain, smooth = CFL(engine=engine, smoothing=0.0), CFL(engine=engine, smoothing=0.75)
    s_plain = plain.init(jax.random.key(0), data, hp)
    s_smooth = smooth.init(jax.random.key(0), data, hp)
    ema = None
    for r in range(3):
        s_plain, _ = jax.jit(plain.round)(s_plain, data, jax.random.key(r))
        s_smooth, _ = jax.jit(smooth.round)(s_smooth, data, jax.random.key(r))
        dw = _flat_rows(s_plain["clients"]["update"])
        ema = dw if ema is None else 0.75 * ema + 0.25 * dw
        np.testing.assert_allclose(_flat_rows(s_smooth["clients"]["update"]), ema, rtol=1e-5,
                                   atol=1e-7)
        assert float(s_smooth["max_norm"][0]) == pytest.approx(
            np.linalg.norm(ema, axis=1).max(), rel=1e-5)
    # Smoothing changes the statistics only, never the models.
    for a, b in zip(jax.tree.leaves(s_plain["slots"]), jax.tree.leaves(s_smooth["slots"]),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bipartition_is_complete_linkage_like_the_authors_code():
    rng = np.random.default_rng(0)
    for n in (2, 3, 7, 12):
        s = rng.uniform(-1, 1, (n, n))
        s = (s + s.T) / 2
        np.fill_diagonal(s, 1.0)
        ours = bipartition(s)
        ref = AgglomerativeClustering(n_clusters=2, metric="precomputed",
                                      linkage="complete").fit(-s).labels_
        assert ours[0] == 0 and set(ours) == {0, 1}
        np.testing.assert_array_equal(ours, ref != ref[0])
    u = rng.normal(size=(5, 9))
    want = np.array([[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in u] for a in u])
    np.testing.assert_allclose(cosine_similarity(u), want, rtol=1e-12, atol=1e-12)


def _constructed(alg, data, hp, *, round_idx=25, mean_norm=0.1, max_norm=2.0, noise=0.1,
                 fresh=None):
    """A state whose clients' latest updates point along +v (clients 0-3) and -v (4-7)."""
    state = alg.init(jax.random.key(0), data, hp)
    c = data.num_clients
    rng = np.random.default_rng(1)
    sign = np.where(np.arange(c) < 4, 1.0, -1.0)
    leaves, treedef = jax.tree.flatten(state["clients"]["update"])
    upd = []
    for x in leaves:
        v = rng.normal(size=x.shape[1:])
        upd.append(jnp.asarray(sign.reshape(-1, *[1] * v.ndim) * v
                               + noise * rng.normal(size=x.shape), x.dtype))
    fresh = np.ones(c, bool) if fresh is None else fresh
    cl = {**state["clients"], "update": jax.tree.unflatten(treedef, upd),
          "fresh": jnp.asarray(fresh), "has_update": jnp.ones(c, bool)}
    state = {**state, "round": jnp.asarray(round_idx, jnp.int32), "clients": cl,
             "ref_norm": jnp.asarray(1.0, jnp.float32),
             "mean_norm": jnp.asarray([mean_norm], jnp.float32),
             "max_norm": jnp.asarray([max_norm], jnp.float32)}
    return state


@pytest.fixture(scope="module")
def eight():
    groups = np.repeat([0, 1], 4).astype(np.int32)
    data = grouped_gaussian(groups, n=20, n_test=5, dim=DIM, num_classes=K)
    model = make_model("logreg", (DIM,), K)
    _, hp = client_hparams(data.num_clients, lr=0.1)
    return data, model, hp


def test_opposite_updates_split_exactly_in_two(eight):
    data, model, hp = eight
    alg = CFL(engine=_engine(model), eps1=0.4, eps2=1.6)
    state = _constructed(alg, data, hp)
    out = alg.host_hook(state, data, 25)
    np.testing.assert_array_equal(np.asarray(out["clients"]["cluster_id"]), np.repeat([0, 1], 4))
    assert int(out["num_clusters"]) == 2
    assert jax.tree.leaves(out["slots"])[0].shape[0] == 2
    # Both sides start from the parent's model; the new cluster is stamped with the round.
    for leaf in jax.tree.leaves(out["slots"]):
        np.testing.assert_array_equal(np.asarray(leaf[0]), np.asarray(leaf[1]))
    np.testing.assert_array_equal(np.asarray(out["born"]), [0, 25])
    assert np.isinf(np.asarray(out["mean_norm"])).all()  # no re-split before fresh statistics
    assert alg.host_hook(out, data, 26) is out
    assert alg.report(out, data).scalars == {
        "ref_norm": 1.0, "first_split_round": 25.0, "last_split_round": 25.0}
    jax.jit(alg.round)(out, data, jax.random.key(0))  # the round runs on the grown state


@pytest.mark.parametrize("case", ["before_min_round", "mean_too_large", "max_too_small",
                                  "too_few_participants", "gamma_check"])
def test_no_split_unless_every_condition_holds(eight, case):
    data, model, hp = eight
    kw, st = dict(eps1=0.4, eps2=1.6), {}
    round_idx = 25
    if case == "before_min_round":
        round_idx = 19
    elif case == "mean_too_large":
        st = dict(mean_norm=0.5)
    elif case == "max_too_small":
        st = dict(max_norm=1.5)
    elif case == "too_few_participants":
        st = dict(fresh=np.arange(8) < 2)
    else:  # the sides are similar (little noise around one direction): alpha_cross ~ 1
        kw["gamma_max"] = 0.5
    alg = CFL(engine=_engine(model), **kw)
    state = _constructed(alg, data, hp, **st)
    if case == "gamma_check":
        same = jax.tree.map(lambda u: jnp.abs(u), state["clients"]["update"])
        state = {**state, "clients": {**state["clients"], "update": same}}
    out = alg.host_hook(state, data, round_idx)
    assert int(out["num_clusters"]) == 1
    np.testing.assert_array_equal(np.asarray(out["clients"]["cluster_id"]), 0)
    if case == "gamma_check":  # the same state splits without the check
        assert int(CFL(engine=_engine(model), eps1=0.4, eps2=1.6, gamma_max=None).host_hook(
            state, data, round_idx)["num_clusters"]) == 2


def test_relative_thresholds_scale_with_the_reference(eight):
    data, model, hp = eight
    alg = CFL(engine=_engine(model), eps1=0.4, eps2=1.6)  # relative by default
    state = _constructed(alg, data, hp, mean_norm=1.0, max_norm=17.0)
    assert alg.split_candidates(state) == []  # ref = 1: 1.0 >= 0.4
    scaled = {**state, "ref_norm": jnp.asarray(10.0, jnp.float32)}
    assert alg.split_candidates(scaled) == [0]  # ref = 10: 1.0 < 4.0 and 17.0 > 16.0
    absolute = CFL(engine=_engine(model), thresholds="absolute")
    assert absolute.eps == (0.4, 1.6)
    assert absolute.split_candidates(scaled) == []  # absolute ignores the reference


def test_absent_clients_follow_the_more_similar_side(eight):
    data, model, hp = eight
    alg = CFL(engine=_engine(model), eps1=0.4, eps2=1.6, cohort_size=6)
    fresh = np.array([1, 1, 1, 0, 1, 1, 1, 0], bool)
    state = _constructed(alg, data, hp, fresh=fresh)
    has = np.array([1, 1, 1, 1, 1, 1, 1, 0], bool)  # client 7 never took part
    state = {**state, "clients": {**state["clients"], "has_update": jnp.asarray(has)}}
    out = alg.host_hook(state, data, 25)
    # Client 3's stale update points along +v (side 0); client 7 has none: larger side (0,
    # a tie on sample counts goes to the side that keeps the slot).
    np.testing.assert_array_equal(np.asarray(out["clients"]["cluster_id"]),
                                  [0, 0, 0, 0, 1, 1, 1, 0])


def test_partial_participation_updates_only_the_cohort(two_groups):
    groups, data, model, hp = two_groups
    alg = CFL(engine=_engine(model), cohort_size=4)
    state = alg.init(jax.random.key(0), data, hp)
    new, m = jax.jit(alg.round)(state, data, jax.random.key(3))
    part = np.asarray(m["up/model"]) > 0
    assert part.sum() == 4
    np.testing.assert_array_equal(np.asarray(new["clients"]["fresh"]), part)
    np.testing.assert_array_equal(np.asarray(new["clients"]["has_update"]), part)
    norms = np.linalg.norm(_flat_rows(new["clients"]["update"]), axis=1)
    assert np.all(norms[part] > 0) and np.all(norms[~part] == 0)


def test_registry_options_and_errors(two_groups):
    groups, data, model, hp = two_groups
    assert ALGORITHMS["cfl"] is CFL and CFL.clusters_clients
    alg = make_algorithm("cfl", _engine(model), eps1=0.2, eps2=0.9, min_round=3,
                         check_every=2, gamma_max=0.5, smoothing=0.5)
    assert alg.hook_every == 2 and alg.eps == (0.2, 0.9)
    alg.validate(data)
    for kw, msg in [(dict(thresholds="scaled"), "thresholds must be"),
                    (dict(eps1=0.0), "eps1"), (dict(eps2=-1.0), "eps2"),
                    (dict(eps1=float("nan")), "eps1"), (dict(min_round=-1), "min_round"),
                    (dict(check_every=0), "check_every"), (dict(gamma_max=1.5), "gamma_max"),
                    (dict(smoothing=1.0), "smoothing"), (dict(smoothing=-0.1), "smoothing"),
                    (dict(max_slots=0), "max_slots")]:
        with pytest.raises(ValueError, match=msg):
            make_algorithm("cfl", _engine(model), **kw).validate(data)
    with pytest.raises(ValueError, match="has no option"):
        make_algorithm("cfl", _engine(model), k=3)


def _simulate(groups, run_dir, *, rounds, checkpoint_every=0, resume=False, **options):
    from fedrnd.driver import AlgorithmConfig, Config, ModelConfig, simulate

    data = grouped_gaussian(groups, n=40, n_test=10, dim=DIM, num_classes=K, sep=2.0,
                            group_labels=True, shift_seed=1)
    cfg = Config(rounds=rounds, eval_every=4, checkpoint_every=checkpoint_every,
                 progress=False, model=ModelConfig("logreg", {}),
                 algorithms=[AlgorithmConfig("cfl", {"min_round": 6, "eps2": 0.5, **options})])
    return simulate(cfg, run_dir=run_dir, data=data, resume=resume, verbose=False)


def test_driver_splits_two_groups_and_not_one(tmp_path):
    groups = shuffled_groups([5, 5], seed=0)
    two = _simulate(groups, tmp_path / "two", rounds=20).methods["cfl"]
    assert [h["num_clusters"] for h in two.history][:6] == [1.0] * 6  # none before min_round
    assert two.history[-1]["num_clusters"] == 2.0
    assert two.final["ari"] == 1.0 and 6 <= two.final["first_split_round"] <= 20
    one = _simulate(np.zeros(10, np.int32), tmp_path / "one", rounds=20).methods["cfl"]
    assert one.history[-1]["num_clusters"] == 1.0 and one.final["clusters"] == 1.0


def test_resume_after_a_split_equals_uninterrupted(tmp_path):
    """Splits happen in the host hook; a run interrupted after one resumes to the same end."""
    groups = shuffled_groups([5, 5], seed=0)
    full = _simulate(groups, tmp_path / "full", rounds=20, checkpoint_every=4).methods["cfl"]
    split_at = int(full.final["first_split_round"])
    assert split_at < 16
    # The run dies after its checkpoint at round 16 (drop the last one), then resumes.
    cut = tmp_path / "cut"
    _simulate(groups, cut, rounds=20, checkpoint_every=4)
    shutil.rmtree(cut / "cfl" / "checkpoints" / "20")
    resumed = _simulate(groups, cut, rounds=20, checkpoint_every=4, resume=True).methods["cfl"]
    for a, b in zip(jax.tree.leaves(full.state), jax.tree.leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert resumed.final["ari"] == full.final["ari"] == 1.0
    rounds = [json.loads(line)["round"] for line in
              (cut / "cfl" / "metrics.jsonl").read_text().splitlines()]
    assert rounds == list(range(1, 21))
