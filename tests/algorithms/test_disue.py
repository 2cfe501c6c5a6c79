"""DisUE: distillation matches the teacher on real inputs, per-class teacher weights against a
numpy reference, one compilation across rounds, the averaging pipeline equals FedAvg, the
update-similarity grouping, the ledger, validation, and the driver end to end."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedrnd.algorithms import ALGORITHMS, DisUE, FedAvg, make_algorithm
from fedrnd.algorithms.disue import (
    label_histograms,
    similarity_clusters,
    softened_kl,
    teacher_weights,
)
from fedrnd.data import load_source
from fedrnd.engine import (
    ClientHParams,
    ClientMapper,
    ClientOptimizer,
    Engine,
    LocalSpec,
    tree_bytes,
)
from fedrnd.models import make_generator, make_model


# ------------------------------------------------------------------ distillation converges
@pytest.fixture(scope="module")
def digits_teacher():
    """An MLP trained centrally on digits (about 97% test accuracy) and the held-out images."""
    ds = load_source("digits")
    model = make_model("mlp", ds.feature_shape, ds.num_classes, hidden=[32])
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    opt = optax.adam(3e-3)

    @jax.jit
    def train(p):
        def step(carry, k):
            p, s = carry
            i = jax.random.randint(k, (64,), 0, x.shape[0])
            g = jax.grad(lambda q: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
                model.apply(q, x[i]), y[i])))(p)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (p, _), _ = jax.lax.scan(step, (p, opt.init(p)), jax.random.split(jax.random.key(1), 600))
        return p

    teacher = train(model.init(jax.random.key(0)))
    xt, yt = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)
    assert float(jnp.mean(jnp.argmax(model.apply(teacher, xt), -1) == yt)) > 0.9
    return model, teacher, xt


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 3])
def test_student_converges_to_identical_teachers_on_real_held_out_inputs(digits_teacher, k):
    """With one cluster (k=1), or k identical teachers under arbitrary per-class weights, the
    data-free student (trained on generated inputs only) ends up predicting like the teacher
    on real test images it never saw, from a different random initialisation."""
    model, teacher, xt = digits_teacher
    alg = DisUE(Engine(model), num_clusters=k, distill_steps=300, student_steps=2)
    teachers = jax.tree.map(lambda a: jnp.broadcast_to(a, (k, *a.shape)), teacher)
    hist = jax.random.uniform(jax.random.key(3), (k, 10))
    weights = teacher_weights(hist, jnp.ones(k))
    gen = alg.generator
    gp = gen.init(jax.random.key(4))
    gs = {"params": gp, "opt": optax.adam(alg.generator_lr).init(gp)}
    student0 = model.init(jax.random.key(9))
    student, _, m = jax.jit(alg.distill_phase)(student0, teachers, weights, jnp.ones(k),
                                               jnp.ones(10, bool), gs, jax.random.key(5))
    t = model.apply(teacher, xt)

    def gap(s):
        out = model.apply(s, xt)
        return (float(jnp.mean(softened_kl(t, out, 1.0))),
                float(jnp.mean(jnp.argmax(out, -1) == jnp.argmax(t, -1))))

    kl0, agree0 = gap(student0)
    kl1, agree1 = gap(student)
    assert agree0 < 0.3 and agree1 >= 0.85
    assert kl1 < 0.2 * kl0
    assert np.isfinite(float(m["distill_loss"]))


# ------------------------------------------------------------------ per-class teacher weights
def _ref_weights(hist_c, cid, mass, k, mode):
    """Per-class teacher weights by plain loops."""
    num_classes = hist_c.shape[1]
    h = np.zeros((k, num_classes))
    for c in range(len(cid)):
        h[cid[c]] += hist_c[c]
    present = mass > 0
    out = np.zeros((k, num_classes))
    for y in range(num_classes):
        col = sum(h[j, y] for j in range(k) if present[j])
        for j in range(k):
            if not present[j]:
                continue
            if mode == "class_mass" and col > 0:
                out[j, y] = h[j, y] / col
            else:
                out[j, y] = 1.0 / present.sum()
    return out


@pytest.mark.parametrize("mode", ["class_mass", "uniform"])
def test_teacher_weights_sum_to_one_and_follow_label_mass(make_federated, mode):
    """Histograms equal numpy label counts of each client's training rows; per-class weights
    equal the plain-loop reference (each cluster's share of the class's label mass, an empty
    cluster weight 0, an absent class uniform) and every column sums to one."""
    counts = [7, 3, 12, 5, 9, 4, 6]
    data = make_federated(counts, dim=3, num_classes=5, seed=2)
    hist = np.array(label_histograms(data))
    y = np.asarray(data.y)
    for c, n in enumerate(counts):
        rows = np.asarray(data.train_idx)[c, :n]
        np.testing.assert_array_equal(hist[c], np.bincount(y[rows], minlength=5))
    # Remove every example of class 4 from the mass (a class no cluster holds).
    hist[:, 4] = 0
    k = 4
    cid = np.array([0, 2, 0, 1, 2, 0, 1])  # slot 3 empty
    mass = np.bincount(cid, weights=counts, minlength=k)
    h = jax.ops.segment_sum(jnp.asarray(hist), jnp.asarray(cid), num_segments=k)
    a = np.asarray(teacher_weights(h, jnp.asarray(mass), mode))
    np.testing.assert_allclose(a, _ref_weights(hist, cid, mass, k, mode), atol=1e-6)
    np.testing.assert_allclose(a.sum(0), 1.0, atol=1e-6)
    assert np.all(a[3] == 0)
    if mode == "class_mass":
        # Follows label mass: the cluster holding most of a class weighs most for it.
        h_np = np.asarray(h)
        for y_ in range(4):
            assert np.argmax(a[:, y_]) == np.argmax(h_np[:, y_])


def test_histogram_dp_noise_keeps_weights_normalised(make_federated):
    data = make_federated([20] * 6, dim=3, num_classes=4, seed=1)
    model = make_model("logreg", (3,), 4)
    hp = ClientHParams(jnp.zeros(6, jnp.int32), jnp.full(6, 0.1), jnp.zeros(6))
    exact = DisUE(Engine(model), num_clusters=2, distill="average").init(
        jax.random.key(0), data, hp)["clients"]["histogram"]
    noisy = DisUE(Engine(model), num_clusters=2, distill="average",
                  histogram_dp_eps=0.5).init(jax.random.key(0), data, hp)["clients"]["histogram"]
    assert np.all(np.asarray(noisy) >= 0) and not np.allclose(noisy, exact)
    a = teacher_weights(jax.ops.segment_sum(noisy, jnp.array([0, 1] * 3), num_segments=2),
                        jnp.ones(2))
    np.testing.assert_allclose(np.asarray(a).sum(0), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="histogram_dp_eps"):
        DisUE(Engine(model), num_clusters=2, histogram_dp_eps=0.0).validate(data)


# ------------------------------------------------------------------ one compilation
def test_distillation_phase_compiles_once_across_rounds(make_federated, monkeypatch):
    """Rounds with changing cluster experts, assignments and teacher weights reuse one
    compiled program: the distillation phase is traced once, and the jitted round and a
    jitted distillation phase each hold one cache entry after three rounds."""
    data = make_federated([9, 14, 6, 11, 8, 12], dim=4, num_classes=3, seed=5)
    model = make_model("mlp", (4,), 3, hidden=[8])
    eng = Engine(model, LocalSpec(batch_size=8, steps=3), ClientOptimizer(),
                 ClientMapper(chunk_size=3))
    alg = DisUE(eng, num_clusters=2, distill_steps=4, distill_batch=16, generator_hidden=(16,),
                noise_dim=8, generator_output="linear")
    traces = []
    original = DisUE.distill_phase

    def counted(self, *args, **kw):
        traces.append(1)
        return original(self, *args, **kw)

    monkeypatch.setattr(DisUE, "distill_phase", counted)
    hp = ClientHParams(jnp.zeros(6, jnp.int32), jnp.full(6, 0.2), jnp.zeros(6))
    state = alg.init(jax.random.key(0), data, hp)
    step = jax.jit(alg.round)
    distill = jax.jit(original, static_argnums=0)
    slots_seen = []
    for r in range(3):
        prev = state
        state, m = step(state, data, jax.random.key(r))
        slots_seen.append(np.asarray(jax.tree.leaves(state["slots"])[0]))
        present = jnp.ones(3, bool)
        distill(alg, prev["universal"], state["slots"], jnp.full((2, 3), 0.5), jnp.ones(2),
                present, prev["generator"], jax.random.key(10 + r))
    assert len(traces) == 1
    assert step._cache_size() == 1 and distill._cache_size() == 1
    assert not np.allclose(slots_seen[0], slots_seen[2])  # the teachers did change


# ------------------------------------------------------------------ averaging equals FedAvg
def test_average_pipeline_universal_expert_equals_fedavg(make_federated):
    """With ``distill="average"`` every client starts from the universal expert and the
    universal expert is the sample-weighted mean of the cluster experts, i.e. of all client
    models: FedAvg's global model, round after round (full-batch GD, so keys do not matter)."""
    data = make_federated([5, 12, 3, 9, 7, 10], dim=4, num_classes=3, seed=4)
    model = make_model("logreg", (4,), 3)
    eng = Engine(model, LocalSpec(batch_size=64, steps=2), ClientOptimizer(),
                 ClientMapper(chunk_size=4), path="general")
    hp = ClientHParams(jnp.zeros(6, jnp.int32),
                       jnp.asarray(np.linspace(0.1, 0.4, 6), jnp.float32), jnp.zeros(6))
    dis = DisUE(eng, num_clusters=3, distill="average")
    fed = FedAvg(eng)
    s1, s2 = dis.init(jax.random.key(0), data, hp), fed.init(jax.random.key(0), data, hp)
    for r in range(3):
        s1, m = jax.jit(dis.round)(s1, data, jax.random.key(r))
        s2, _ = jax.jit(fed.round)(s2, data, jax.random.key(100 + r))
        for u, v in zip(jax.tree.leaves(s1["universal"]), jax.tree.leaves(s2["params"]),
                        strict=True):
            np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-6)
        assert float(m["universal_acc"]) == pytest.approx(float(m["average_acc"]))


# ------------------------------------------------------------------ update-similarity grouping
def test_similarity_clusters_recover_update_directions():
    """Updates drawn around three orthogonal directions (different norms) are grouped by
    direction, whatever the starting client."""
    rng = np.random.default_rng(0)
    dirs = np.eye(3, 20)
    truth = rng.permutation(np.repeat(np.arange(3), [6, 4, 5]))
    u = dirs[truth] * rng.uniform(0.5, 5.0, (15, 1)) + 0.05 * rng.normal(size=(15, 20))
    for seed in range(4):
        cid = np.asarray(similarity_clusters(jnp.asarray(u, jnp.float32), jnp.ones(15), 3,
                                             jax.random.key(seed), iters=5))
        pairs = [(truth[i] == truth[j]) == (cid[i] == cid[j])
                 for i, j in itertools.combinations(range(15), 2)]
        assert all(pairs)


# ------------------------------------------------------------------ ledger
@pytest.mark.parametrize("grouping,distill", [("ifca", "average"), ("similarity", "average"),
                                              ("ifca", "none")])
def test_ledger_counts_histograms_and_experts(make_federated, grouping, distill):
    data = make_federated([6, 8, 5, 7, 9, 4], dim=4, num_classes=3, seed=3)
    model = make_model("logreg", (4,), 3)
    eng = Engine(model, LocalSpec(batch_size=8, steps=1))
    hp = ClientHParams(jnp.zeros(6, jnp.int32), jnp.full(6, 0.1), jnp.zeros(6))
    alg = DisUE(eng, grouping=grouping, num_clusters=2, distill=distill, cohort_size=4)
    state = alg.init(jax.random.key(0), data, hp)
    _, m = jax.jit(alg.round)(state, data, jax.random.key(1))
    nb = tree_bytes(model.init(jax.random.key(0)))
    part = np.asarray(m["up/model"]) > 0
    assert part.sum() == 4
    np.testing.assert_allclose(np.asarray(m["up/model"])[part], nb)
    np.testing.assert_allclose(np.asarray(m["up/histogram"])[part], 3 * 4)
    np.testing.assert_allclose(np.asarray(m["up/histogram"])[~part], 0)
    if distill == "none":
        assert "down/experts" not in m
        np.testing.assert_allclose(np.asarray(m["down/model"])[part], 2 * nb)
    else:
        np.testing.assert_allclose(np.asarray(m["down/model"])[part], nb)
        experts = 2 if grouping == "ifca" else 1
        np.testing.assert_allclose(np.asarray(m["down/experts"])[part], experts * nb)


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("options,match", [
    ({"grouping": "kmeans", "num_clusters": 2}, "grouping"),
    ({"grouping": "ifca"}, "num_clusters"),
    ({"grouping": "rnd", "num_clusters": 2}, "num_clusters"),
    ({"grouping": "similarity", "num_clusters": 2, "distill": "none"}, "identity"),
    ({"num_clusters": 2, "distill": "gan"}, "distill"),
    ({"num_clusters": 2, "temperature": 0.0}, "temperature"),
    ({"num_clusters": 2, "distill_steps": 0}, "distill_steps"),
    ({"num_clusters": 2, "adv_weight": -1.0}, "adv_weight"),
    ({"num_clusters": 2, "distill": "proxy", "proxy_size": 10_000}, "proxy_size"),
    ({"num_clusters": 2, "generator_head": "conv"}, "conv"),
    ({"num_clusters": 2, "student_init": "random"}, "student_init"),
])
def test_bad_options_raise_clear_errors(make_federated, options, match):
    data = make_federated([6, 8, 5], dim=4, num_classes=3)
    alg = make_algorithm("disue", Engine(make_model("logreg", (4,), 3)), **options)
    with pytest.raises(ValueError, match=match):
        alg.validate(data)


def test_generator_shapes_and_ranges():
    for shape, out in (((8, 8, 1), "sigmoid"), ((4, 4, 2), "tanh"), ((6,), "linear")):
        g = make_generator(shape, 5, noise_dim=8, hidden=(16,), output=out)
        p = g.init(jax.random.key(0))
        x = g.apply(p, jax.random.normal(jax.random.key(1), (4, 8)), jnp.arange(4))
        assert x.shape == (4, *shape)
        if out == "sigmoid":
            assert float(x.min()) >= 0 and float(x.max()) <= 1
    with pytest.raises(ValueError, match="output"):
        make_generator((6,), 3, output="relu")


# ------------------------------------------------------------------ driver end to end
@pytest.mark.slow
def test_simulate_end_to_end_reports_universal_and_personalised_accuracy(tmp_path):
    """Through the driver on digits: every grouping and distillation mode runs, the round
    metrics carry the universal expert's global accuracy, the final summary both accuracies."""
    from fedrnd.driver import simulate

    algs = [
        {"name": "disue", "label": "gen", "options": {"num_clusters": 2, "distill_steps": 3}},
        {"name": "disue", "label": "proxy", "options": {
            "grouping": "similarity", "num_clusters": 2, "distill": "proxy",
            "distill_steps": 3, "proxy_size": 64, "student_init": "average"}},
        {"name": "disue", "label": "rnd", "options": {
            "grouping": "rnd", "rnd_network": "mlp", "rnd_predictor_steps": 20,
            "distill_steps": 2}},
    ]
    cfg = {"rounds": 2, "eval_every": 1, "progress": False, "out_dir": str(tmp_path),
           "data": {"source": "digits", "partition": "dirichlet",
                    "partition_options": {"alpha": 0.5}, "num_clients": 8},
           "model": {"name": "mlp", "options": {"hidden": [16]}},
           "local": {"batch_size": 16, "steps": 2, "optimizer": "sgd", "lr": 0.1},
           "algorithms": algs}
    res = simulate(cfg, verbose=False)
    for label in ("gen", "proxy", "rnd"):
        m = res.methods[label]
        assert [h["round"] for h in m.history] == [1, 2]
        for h in m.history:
            assert 0.0 <= h["universal_acc"] <= 1.0 and 0.0 <= h["average_acc"] <= 1.0
            assert h["bytes_up_histogram"] == 8 * 10 * 4
        assert 0.0 <= m.final["universal_acc"] <= 1.0
        assert m.final["universal_acc"] == pytest.approx(m.history[-1]["universal_acc"])
        assert 0.0 <= m.final["test_acc/mean"] <= 1.0
    assert res.methods["rnd"].history[0]["bytes_up_discovery"] > 0
    assert "disue" in ALGORITHMS


@pytest.mark.slow
def test_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path, make_federated):
    """The generator, its optimizer state and the universal expert are checkpointed: a run
    resumed from round 2 ends with the same state as a run of 4 rounds."""
    from fedrnd.driver import AlgorithmConfig, Config, ModelConfig, simulate

    data = make_federated([8, 12, 6, 10], dim=4, num_classes=3, seed=6)
    opts = {"num_clusters": 2, "distill_steps": 3, "distill_batch": 8, "noise_dim": 4,
            "generator_hidden": [8], "generator_output": "linear"}

    def cfg(rounds):
        return Config(rounds=rounds, eval_every=2, checkpoint_every=2, progress=False,
                      model=ModelConfig("logreg", {}),
                      algorithms=[AlgorithmConfig("disue", opts)])

    full = simulate(cfg(4), run_dir=tmp_path / "full", data=data, verbose=False)
    simulate(cfg(2), run_dir=tmp_path / "cut", data=data, verbose=False)
    resumed = simulate(cfg(4), run_dir=tmp_path / "cut", data=data, verbose=False, resume=True,
                       allow_change=["rounds"])
    a, b = full.methods["disue"], resumed.methods["disue"]
    for u, v in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-6)
    assert a.final["universal_acc"] == pytest.approx(b.final["universal_acc"])
