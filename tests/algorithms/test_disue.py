"""DisUE: distillation (generator and proxy) matches the teacher on real inputs, per-class
teacher weights against a numpy reference, the generator and agreement diagnostics against
known answers, one compilation across rounds, the averaging pipeline equals FedAvg, the
update-similarity grouping, the ledger, validation, and the driver end to end."""

from __future__ import annotations

import csv
import importlib.util
import itertools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedrnd.algorithms import ALGORITHMS, DisUE, FedAvg, make_algorithm
from fedrnd.algorithms.disue import (
    DISTILLS,
    batch_diagnostics,
    ensemble_agreement,
    global_accuracy,
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


@pytest.mark.slow
def test_proxy_student_converges_to_the_teacher_on_real_held_out_inputs(digits_teacher):
    """``distill="proxy"`` (the upper bound): the student, trained on 256 unlabeled real images
    the teacher labels, predicts like the teacher on test images it never saw."""
    model, teacher, xt = digits_teacher
    ds = load_source("digits")
    alg = DisUE(Engine(model), num_clusters=2, distill="proxy", distill_steps=150,
                student_steps=2)
    teachers = jax.tree.map(lambda a: jnp.broadcast_to(a, (2, *a.shape)), teacher)
    weights = teacher_weights(jnp.ones((2, 10)), jnp.ones(2))
    proxy_x = jnp.asarray(ds.x_train[:256])
    student0 = model.init(jax.random.key(9))
    student, gen, m = jax.jit(alg.distill_phase)(student0, teachers, weights, jnp.ones(2),
                                                 jnp.ones(10, bool), None, jax.random.key(5),
                                                 proxy_x)
    assert gen is None
    t = jnp.argmax(model.apply(teacher, xt), -1)
    agree0 = float(jnp.mean(jnp.argmax(model.apply(student0, xt), -1) == t))
    agree1 = float(jnp.mean(jnp.argmax(model.apply(student, xt), -1) == t))
    assert agree0 < 0.3 and agree1 >= 0.9
    # On real inputs the ensemble's pseudo-labels are its own argmax: accuracy 1 by construction.
    assert float(m["gen_teacher_acc"]) == 1.0 and float(m["gen_coverage"]) >= 0.9


# ------------------------------------------------------------------ diagnostics
def _ref_batch_diagnostics(x, y, logits, present):
    """Plain loops: teacher accuracy, coverage, entropy, same-class RMS distance."""
    pred = logits.argmax(-1)
    b, num_classes = logits.shape
    covered = [c for c in range(num_classes) if present[c] and np.any(pred == c)]
    p = np.bincount(pred, minlength=num_classes) / b
    ent = -sum(q * np.log(q) for q in p if q > 0)
    xf = x.reshape(b, -1).astype(np.float64)
    d = [np.sqrt(np.mean((xf[i] - xf[j]) ** 2)) for i in range(b) for j in range(b)
         if i != j and y[i] == y[j]]
    return {"gen_teacher_acc": np.mean(pred == y), "gen_coverage": len(covered) / present.sum(),
            "gen_pred_entropy": ent, "gen_diversity": np.mean(d) if d else 0.0}


def test_batch_diagnostics_match_a_plain_loop_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 3, 2)).astype(np.float32)
    y = rng.integers(0, 5, 24).astype(np.int32)
    logits = rng.normal(size=(24, 5)).astype(np.float32)
    present = np.array([True, True, False, True, True])
    got = batch_diagnostics(jnp.asarray(x), jnp.asarray(y), jnp.asarray(logits),
                            jnp.asarray(present))
    for k, v in _ref_batch_diagnostics(x, y, logits, present).items():
        assert float(got[k]) == pytest.approx(v, rel=1e-4, abs=1e-5), k


def test_batch_diagnostics_known_answers():
    """A teacher that always says class 0 is right exactly on the requested 0s, covers one of
    the present classes, has zero prediction entropy; identical inputs have zero diversity."""
    y = jnp.array([0, 1, 0, 2, 0, 1, 1, 0])
    logits = jnp.tile(jnp.array([[5.0, 0.0, 0.0, 0.0]]), (8, 1))
    present = jnp.array([True, True, True, False])
    x = jnp.ones((8, 6))
    got = batch_diagnostics(x, y, logits, present)
    assert float(got["gen_teacher_acc"]) == pytest.approx(0.5)  # four of eight asked for 0
    assert float(got["gen_coverage"]) == pytest.approx(1 / 3)
    assert float(got["gen_pred_entropy"]) == pytest.approx(0.0, abs=1e-7)
    assert float(got["gen_diversity"]) == pytest.approx(0.0, abs=1e-6)
    # A perfect teacher covers every present class it is asked for; entropy log(3) here.
    got = batch_diagnostics(x, y, jax.nn.one_hot(y, 4) * 5.0, present)
    assert float(got["gen_teacher_acc"]) == 1.0 and float(got["gen_coverage"]) == 1.0
    assert float(got["gen_pred_entropy"]) == pytest.approx(
        -(0.5 * np.log(0.5) + 3 / 8 * np.log(3 / 8) + 1 / 8 * np.log(1 / 8)), rel=1e-5)


def _class0_teachers(k, dim=4, num_classes=3):
    """``k`` logistic regressions that predict class 0 whatever the input."""
    p = {"Dense_0": {"kernel": jnp.zeros((k, dim, num_classes)),
                     "bias": jnp.tile(jnp.array([10.0] + [0.0] * (num_classes - 1)), (k, 1))}}
    return make_model("logreg", (dim,), num_classes), p


@pytest.mark.parametrize("distill", ["generator", "proxy"])
def test_distill_phase_diagnostics_of_a_teacher_that_always_says_class_0(distill):
    """Generator: asked only for class 0, accuracy and coverage are 1; asked uniformly for three
    classes, coverage is exactly 1/3 and accuracy the share of requested 0s (about 1/3).
    Proxy: the pseudo-labels are the teachers' own argmax (class 0): accuracy 1, coverage 1/3."""
    model, teachers = _class0_teachers(2)
    alg = DisUE(Engine(model), num_clusters=2, distill=distill, distill_steps=2,
                distill_batch=256, noise_dim=4, generator_hidden=(8,),
                generator_output="linear")
    weights = teacher_weights(jnp.ones((2, 3)), jnp.ones(2))
    gp = alg.generator.init(jax.random.key(1))
    gs = {"params": gp, "opt": optax.adam(1e-3).init(gp)} if distill == "generator" else None
    proxy_x = jax.random.normal(jax.random.key(2), (50, 4)) if distill == "proxy" else None
    student0 = model.init(jax.random.key(3))
    run = jax.jit(alg.distill_phase)
    _, _, m = run(student0, teachers, weights, jnp.ones(2), jnp.ones(3, bool), gs,
                  jax.random.key(4), proxy_x)
    assert float(m["gen_coverage"]) == pytest.approx(1 / 3)
    assert float(m["gen_pred_entropy"]) == pytest.approx(0.0, abs=1e-6)
    assert float(m["gen_diversity"]) > 0
    if distill == "proxy":
        assert float(m["gen_teacher_acc"]) == 1.0
    else:
        assert 0.2 < float(m["gen_teacher_acc"]) < 0.45  # Binomial(256, 1/3) / 256
        _, _, m0 = run(student0, teachers, weights, jnp.ones(2),
                       jnp.array([True, False, False]), gs, jax.random.key(4), proxy_x)
        assert float(m0["gen_teacher_acc"]) == 1.0 and float(m0["gen_coverage"]) == 1.0


def test_student_agreement_is_one_for_identical_models_and_matches_numpy(make_federated):
    """Identical student and teachers agree everywhere and the ensemble's accuracy is the
    model's own; a different student's agreement equals a plain count over the pooled test
    rows (padding excluded) against the mass-weighted ensemble's argmax."""
    data = make_federated([6, 8, 5, 7], test_counts=[3, 9, 1, 6], dim=4, num_classes=3, seed=7)
    model = make_model("mlp", (4,), 3, hidden=[8])
    eng = Engine(model, mapper=ClientMapper(chunk_size=3))
    p = model.init(jax.random.key(0))
    same = jax.tree.map(lambda a: jnp.stack([a, a]), p)
    agree, ens_acc = ensemble_agreement(eng, p, same, jnp.array([0.3, 0.7]), data)
    assert float(agree) == 1.0
    own = global_accuracy(eng, jax.tree.map(lambda a: a[None], p), data)[0]
    assert float(ens_acc) == pytest.approx(float(own))

    teachers = jax.tree.map(lambda a, b: jnp.stack([a, b]), model.init(jax.random.key(1)),
                            model.init(jax.random.key(2)))
    mix = jnp.array([0.25, 0.75])
    agree, ens_acc = ensemble_agreement(eng, p, teachers, mix, data)
    rows = np.concatenate([np.asarray(data.test_idx)[c, :n]
                           for c, n in enumerate(np.asarray(data.test_count))])
    x, y = data.x[rows], np.asarray(data.y)[rows]
    each = [model.apply(q, x) for q in (jax.tree.map(lambda a: a[0], teachers),
                                        jax.tree.map(lambda a: a[1], teachers))]
    t = np.asarray(mix[0] * each[0] + mix[1] * each[1]).argmax(-1)
    s = np.asarray(model.apply(p, x)).argmax(-1)
    assert float(agree) == pytest.approx(np.mean(s == t))
    assert float(ens_acc) == pytest.approx(np.mean(t == y))


@pytest.mark.parametrize("distill", ["generator", "proxy", "average", "none"])
def test_round_metrics_carry_the_diagnostics(make_federated, distill):
    """Every round logs ``student_agree`` and ``ensemble_acc``; generator and proxy rounds also
    the batch diagnostics, all in range. With one cluster and ``distill="average"`` the
    universal expert is the only teacher, so it agrees with the ensemble everywhere."""
    data = make_federated([9, 14, 6, 11], dim=4, num_classes=3, seed=5)
    model = make_model("mlp", (4,), 3, hidden=[8])
    eng = Engine(model, LocalSpec(batch_size=8, steps=2))
    hp = ClientHParams(jnp.zeros(4, jnp.int32), jnp.full(4, 0.2), jnp.zeros(4))
    # Per-cluster FedAvg ("none") needs clusters that persist across rounds: IFCA's.
    grouping = "ifca" if distill == "none" else "similarity"
    alg = DisUE(eng, grouping=grouping, num_clusters=2, distill=distill, distill_steps=3,
                distill_batch=16, generator_hidden=(16,), noise_dim=8,
                generator_output="linear", proxy_size=20)
    state = alg.init(jax.random.key(0), data, hp)
    _, m = jax.jit(alg.round)(state, data, jax.random.key(1))
    diag = ("gen_teacher_acc", "gen_coverage", "gen_diversity", "gen_pred_entropy")
    for k in ("student_agree", "ensemble_acc") + (diag if distill in ("generator", "proxy")
                                                  else ()):
        v = float(m[k])
        assert np.isfinite(v) and v >= 0, k
        if k != "gen_diversity" and k != "gen_pred_entropy":
            assert v <= 1.0, k
    if distill in ("average", "none"):
        assert not any(k in m for k in diag)
    one = DisUE(eng, num_clusters=1, distill="average")
    _, m1 = jax.jit(one.round)(one.init(jax.random.key(0), data, hp), data, jax.random.key(1))
    assert float(m1["student_agree"]) == 1.0
    assert float(m1["ensemble_acc"]) == pytest.approx(float(m1["universal_acc"]))


def test_proxy_rows_are_distinct_training_rows_of_the_clients(make_federated):
    """The proxy set is drawn once, without replacement, among the clients' real training rows
    (never padding, never the test rows the diagnostics and accuracies are measured on)."""
    data = make_federated([5, 12, 3, 9], test_counts=[4, 4, 4, 4], dim=4, num_classes=3)
    model = make_model("logreg", (4,), 3)
    hp = ClientHParams(jnp.zeros(4, jnp.int32), jnp.full(4, 0.1), jnp.zeros(4))
    alg = DisUE(Engine(model), num_clusters=2, distill="proxy", proxy_size=29)
    idx = np.asarray(alg.init(jax.random.key(0), data, hp)["proxy_idx"])
    train = {int(r) for c, n in enumerate(np.asarray(data.train_count))
             for r in np.asarray(data.train_idx)[c, :n]}
    assert len(set(idx.tolist())) == 29 and set(idx.tolist()) == train


def test_unknown_distill_names_the_allowed_values(make_federated):
    data = make_federated([6, 8, 5], dim=4, num_classes=3)
    alg = DisUE(Engine(make_model("logreg", (4,), 3)), num_clusters=2, distill="public")
    with pytest.raises(ValueError, match="distill") as err:
        alg.validate(data)
    assert all(repr(d) in str(err.value) for d in DISTILLS) and "proxy" in DISTILLS


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


@pytest.mark.slow
def test_diagnostics_experiment_writes_its_numbers_figure_and_command(tmp_path):
    """experiments/disue/diagnostics.py at a small size (digits, 6 clients, 2 rounds): every
    variant's per-round diagnostics land in the JSON and CSV, the figure is written and the
    markdown names the command that made it."""
    path = Path(__file__).resolve().parents[2] / "experiments" / "disue" / "diagnostics.py"
    spec = importlib.util.spec_from_file_location("disue_diagnostics", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--rounds", "2", "--num-clients", "6", "--source", "digits",
              "--out", str(tmp_path), "--run-dir", str(tmp_path / "run")])
    raw = json.loads((tmp_path / "diagnostics.json").read_text())
    assert set(raw["history"]) == set(mod.VARIANTS)
    for label, rows in raw["history"].items():
        assert [r["round"] for r in rows] == [1, 2]
        assert all(0.0 <= r["student_agree"] <= 1.0 for r in rows)
        if label != "average":
            assert all(0.0 <= r["gen_coverage"] <= 1.0 for r in rows)
    with open(tmp_path / "diagnostics.csv") as f:
        assert len(list(csv.DictReader(f))) == 2 * len(mod.VARIANTS)
    assert (tmp_path / "figures" / "disue_diagnostics.png").stat().st_size > 0
    text = (tmp_path / "DIAGNOSTICS.md").read_text()
    assert "`python experiments/disue/diagnostics.py --rounds 2" in text


# ------------------------------------------------------------------ the paper's grouping
def _label_permuted(make_federated, counts, seed=0):
    """Gaussian clients whose odd clients see every label shifted by one (two true groups)."""
    import dataclasses

    data = make_federated(counts, dim=6, num_classes=3, sep=3.0, seed=seed)
    y = np.asarray(data.y).copy()
    for c in range(1, len(counts), 2):
        rows = np.concatenate([np.asarray(data.train_idx)[c, :counts[c]],
                               np.asarray(data.test_idx)[c, :5]])
        y[rows] = (y[rows] + 1) % 3
    return dataclasses.replace(data, y=jnp.asarray(y))


def test_similarity_is_the_default_grouping_and_separates_label_permuted_groups(make_federated):
    """The default grouping is the paper's (update similarity): after one round from a shared
    model, clients whose labels are permuted relative to the others end up in a different
    cluster from them, and each cluster holds exactly one of the two groups."""
    assert DisUE.__dataclass_fields__["grouping"].default == "similarity"
    counts = [40, 50, 45, 35, 50, 40, 45, 50]
    data = _label_permuted(make_federated, counts)
    model = make_model("logreg", (6,), 3)
    eng = Engine(model, LocalSpec(batch_size=16, steps=5))
    hp = ClientHParams(jnp.zeros(8, jnp.int32), jnp.full(8, 0.5), jnp.zeros(8))
    alg = DisUE(eng, num_clusters=2, distill="average")
    state, _ = jax.jit(alg.round)(alg.init(jax.random.key(0), data, hp), data, jax.random.key(1))
    cid = np.asarray(state["clients"]["cluster_id"])
    truth = np.arange(8) % 2
    assert len(set(cid[truth == 0])) == 1 and len(set(cid[truth == 1])) == 1
    assert cid[0] != cid[1]


def test_similarity_grouping_sends_nothing_beyond_the_models_it_aggregates(make_federated):
    """In the clear the similarity grouping reuses the uploads: a client's traffic per round is
    one model up, its histogram, the universal expert and its own expert down; IFCA's
    grouping sends K - 1 more models down (all K experts)."""
    data = make_federated([6, 8, 5, 7, 9, 4], dim=4, num_classes=3, seed=3)
    model = make_model("logreg", (4,), 3)
    eng = Engine(model, LocalSpec(batch_size=8, steps=1))
    hp = ClientHParams(jnp.zeros(6, jnp.int32), jnp.full(6, 0.1), jnp.zeros(6))
    nb = tree_bytes(model.init(jax.random.key(0)))
    totals = {}
    for grouping in ("similarity", "ifca"):
        alg = DisUE(eng, grouping=grouping, num_clusters=3, distill="average")
        _, m = jax.jit(alg.round)(alg.init(jax.random.key(0), data, hp), data,
                                  jax.random.key(1))
        ledger = {k for k in m if k.startswith(("up/", "down/"))}
        assert ledger == {"up/model", "up/histogram", "down/model", "down/experts"}
        totals[grouping] = sum(np.asarray(m[k]) for k in ledger)
    np.testing.assert_allclose(totals["similarity"], 3 * nb + 3 * 4)
    np.testing.assert_allclose(totals["ifca"] - totals["similarity"], 2 * nb)
