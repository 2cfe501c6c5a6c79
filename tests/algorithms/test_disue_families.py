"""DisUE with heterogeneous experts (``families``): clients assigned to model families in the
configured shares, configs checked with the config path, one family of the task model's
architecture reproduces DisUE bit for bit, the teacher ensemble over families is the plain
per-teacher sum, each client's ledger counts its own family's model, each family's model is
FedAvg on the family's clients, and a run goes through the driver end to end."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrnd.algorithms import DisUE
from fedrnd.algorithms.disue import (
    assign_families,
    ensemble_agreement,
    family_counts,
    family_ensemble_logits,
    same_architecture,
)
from fedrnd.driver.config import from_dict, validate
from fedrnd.engine import Engine, LocalSpec, client_hparams, tree_bytes
from fedrnd.models import make_model

SMALL = {"distill_steps": 2, "distill_batch": 8, "noise_dim": 4, "generator_hidden": [8],
         "generator_output": "linear", "proxy_size": 16, "num_clusters": 2}
TWO = [{"model": "mlp", "hidden": [4]}, {"model": "mlp", "hidden": [16]}]


@pytest.fixture(scope="module")
def setup():
    from tests.conftest import gaussian_federated

    data = gaussian_federated([8, 12, 6, 10, 9, 7, 5, 11], dim=4, num_classes=3, seed=6)
    opt, hp = client_hparams(data.num_clients, lr=0.1)
    eng = Engine(make_model("mlp", (4,), 3, hidden=[8]), LocalSpec(batch_size=4, steps=2), opt)
    return data, hp, eng


def _run(alg, data, hp, rounds=2):
    state = alg.init(jax.random.key(0), data, hp)
    step = jax.jit(alg.round)
    metrics = None
    for r in range(rounds):
        state, metrics = step(state, data, jax.random.fold_in(jax.random.key(1), r))
    return state, metrics


# ------------------------------------------------------------------ assignment
def test_family_counts_follow_the_shares_and_sum_to_the_clients():
    assert family_counts(50, [0.5, 0.5]) == (25, 25)
    assert family_counts(10, [1, 2]) == (3, 7)  # 3.33 / 6.67: the larger remainder gets one
    assert family_counts(7, [1, 1, 1]) == (3, 2, 2)  # ties go to the earlier family
    assert sum(family_counts(101, [0.2, 0.3, 0.5])) == 101


def test_share_rule_draws_exact_counts_and_data_size_rule_ranks_by_training_rows():
    counts = jnp.array([5, 40, 12, 3, 30, 8])
    fam = np.asarray(assign_families(counts, (2, 4), "share", jax.random.key(0)))
    assert np.bincount(fam, minlength=2).tolist() == [2, 4]
    again = np.asarray(assign_families(counts, (2, 4), "share", jax.random.key(0)))
    np.testing.assert_array_equal(fam, again)  # fixed by the key
    fam = np.asarray(assign_families(counts, (2, 3, 1), "data_size", jax.random.key(0)))
    # Ranked by size 3, 5, 8, 12, 30, 40: the two smallest, the next three, the largest.
    np.testing.assert_array_equal(fam, [0, 2, 1, 0, 1, 1])


def test_init_assigns_families_in_the_shares_with_sorted_id_lists(setup):
    data, hp, eng = setup
    alg = DisUE(eng, families=TWO, family_shares=[1, 3], **SMALL)
    state = alg.init(jax.random.key(0), data, hp)
    fam = np.asarray(state["clients"]["family"])
    assert np.bincount(fam).tolist() == [2, 6]
    for f, ids in enumerate(state["family_ids"]):
        np.testing.assert_array_equal(np.asarray(ids), np.flatnonzero(fam == f))
    assert [jax.tree.leaves(s)[0].shape[0] for s in state["slots"]] == [2, 2]
    assert int(state["num_clusters"]) == 4


# ------------------------------------------------------------------ validation
def _config(**opts):
    return {"data": {"source": "digits", "num_clients": 8}, "progress": False,
            "model": {"name": "mlp", "options": {"hidden": [16]}},
            "algorithms": [{"name": "disue", "options": {"num_clusters": 2, **opts}}]}


@pytest.mark.parametrize("opts, match", [
    ({"families": [{"model": "mlpx"}]},
     r"algorithms\.0\.options\.families: family 0 model = 'mlpx' is unknown; allowed: .*'mlp'"),
    ({"families": [{"model": "mlp", "width": 3}]},
     r"algorithms\.0\.options\.families: family 0 \(model 'mlp'\): unknown option.*hidden"),
    ({"families": [{"hidden": [3]}]}, r"options\.families: family 0 model = None is unknown"),
    ({"families": [64]}, r"algorithms\.0\.options\.families = \[64\] must be a list"),
    ({"families": TWO, "family_shares": [1.0]},
     r"options\.family_shares must be a list of 2 numbers > 0 .*got \(1\.0,\)"),
    ({"families": TWO, "family_shares": [1.0, -1.0]}, r"options\.family_shares must be"),
    ({"families": TWO, "family_rule": "size"},
     r"options\.family_rule must be one of \['share', 'data_size'\]"),
    ({"families": TWO, "grouping": "rnd", "num_clusters": None},
     r"options\.families: grouping must be 'similarity' or 'ifca'"),
    ({"families": TWO, "distill": "average"},
     r"options\.families: distill must be 'generator' or 'proxy'"),
    ({"families": TWO, "cohort_size": 4}, r"options\.families: cohort_size must be unset"),
    ({"families": TWO, "family_shares": [1, 9]},
     r"families of \[1, 7\] clients; each needs at least num_clusters = 2"),
])
def test_bad_family_configs_fail_with_the_config_path_and_the_allowed_values(opts, match):
    with pytest.raises(ValueError, match=match):
        validate(from_dict(_config(**opts)))


def test_a_good_family_config_validates_and_average_start_needs_the_students_architecture(
        setup):
    validate(from_dict(_config(families=TWO, family_shares=[0.25, 0.75],
                               family_rule="data_size")))
    data, hp, eng = setup
    with pytest.raises(ValueError, match="student_init='average'.*no family has it"):
        DisUE(eng, families=TWO, student_init="average", **SMALL).validate(data)
    DisUE(eng, families=[*TWO, {"model": "mlp", "hidden": [8]}], student_init="average",
          **SMALL).validate(data)


def test_architecture_identity_is_name_and_parameter_shapes():
    a = make_model("mlp", (4,), 3, hidden=[8])
    assert same_architecture(a, make_model("mlp", (4,), 3, hidden=[8]))
    assert not same_architecture(a, make_model("mlp", (4,), 3, hidden=[9]))
    assert not same_architecture(a, make_model("mlp", (4,), 3, hidden=[8, 8]))
    assert not same_architecture(make_model("logreg", (4,), 3), make_model("mlp", (4,), 3,
                                                                            hidden=[]))


# ------------------------------------------------------------------ one family = DisUE
@pytest.mark.parametrize("opts", [
    {"grouping": "similarity"},
    {"grouping": "ifca", "distill": "proxy", "student_init": "average"},
])
def test_one_family_of_the_task_architecture_reproduces_disue_bit_for_bit(setup, opts):
    data, hp, eng = setup
    plain, pm = _run(DisUE(eng, **SMALL, **opts), data, hp)
    fam, fm = _run(DisUE(eng, families=[{"model": "mlp", "hidden": [8]}], **SMALL, **opts),
                   data, hp)
    for k, v in pm.items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(fm[k]), err_msg=k)
    assert set(fm) - set(pm) == {"family0_acc", "personal_acc"}
    for key in ("universal", "generator"):
        for u, v in zip(jax.tree.leaves(plain.get(key)), jax.tree.leaves(fam.get(key)),
                        strict=True):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    for u, v in zip(jax.tree.leaves(plain["slots"]), jax.tree.leaves(fam["slots"][0]),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    np.testing.assert_array_equal(plain["clients"]["cluster_id"], fam["clients"]["cluster_id"])


# ------------------------------------------------------------------ two families
def test_ensemble_over_two_families_is_the_plain_per_teacher_sum():
    models = [make_model("mlp", (5,), 4, hidden=[3]), make_model("mlp", (5,), 4, hidden=[7])]
    teachers = [jax.tree.map(lambda *a: jnp.stack(a), *[m.init(jax.random.key(10 * f + k))
                                                         for k in range(k_f)])
                for f, (m, k_f) in enumerate(zip(models, (2, 3), strict=True))]
    w = jax.random.uniform(jax.random.key(5), (5, 4))
    w = w / w.sum(0)
    x = jax.random.normal(jax.random.key(6), (9, 5))
    y = jax.random.randint(jax.random.key(7), (9,), 0, 4)
    got = family_ensemble_logits([m.apply for m in models], teachers, (w[:2], w[2:]), x, y)
    ref = np.zeros((9, 4))
    row = 0
    for m, t, k_f in zip(models, teachers, (2, 3), strict=True):
        for k in range(k_f):
            p = jax.tree.map(lambda a, k=k: a[k], t)
            for b in range(9):
                ref[b] += float(w[row, y[b]]) * np.asarray(m.apply(p, x[b:b + 1])[0])
            row += 1
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)


def test_agreement_over_two_families_matches_a_per_row_loop(setup):
    data, _, eng = setup
    models = [make_model("mlp", (4,), 3, hidden=[4]), make_model("mlp", (4,), 3, hidden=[16])]
    engines = [Engine(m) for m in models]
    teachers = tuple(jax.tree.map(lambda *a: jnp.stack(a), *[m.init(jax.random.key(f + 2 * k))
                                                              for k in range(2)])
                     for f, m in enumerate(models))
    mix = (jnp.array([0.1, 0.2]), jnp.array([0.3, 0.4]))
    student = eng.model.init(jax.random.key(9))
    agree, acc = ensemble_agreement(eng, student, teachers, mix, data,
                                    applies=[e.model.apply for e in engines])
    rows = np.concatenate([np.asarray(data.test_idx[c, :int(data.test_count[c])])
                           for c in range(data.num_clients)])
    x, y = data.x[rows], np.asarray(data.y[rows])
    t = sum(float(mix[f][k]) * np.asarray(models[f].apply(jax.tree.map(lambda a, k=k: a[k],
                                                                       teachers[f]), x))
            for f in range(2) for k in range(2))
    s = np.asarray(eng.model.apply(student, x))
    assert float(agree) == pytest.approx(np.mean(t.argmax(-1) == s.argmax(-1)), abs=1e-6)
    assert float(acc) == pytest.approx(np.mean(t.argmax(-1) == y), abs=1e-6)


@pytest.mark.parametrize("grouping", ["similarity", "ifca"])
def test_each_client_sends_and_receives_its_own_familys_model_bytes(setup, grouping):
    data, hp, eng = setup
    alg = DisUE(eng, families=TWO, grouping=grouping, **SMALL)
    state, m = _run(alg, data, hp, rounds=1)
    fam = np.asarray(state["clients"]["family"])
    nbytes = [tree_bytes(jax.eval_shape(f.engine.model.init, jax.random.key(0)))
              for f in alg.family_views]
    assert nbytes[0] < nbytes[1]
    per = np.asarray(nbytes, np.float32)[fam]
    np.testing.assert_array_equal(np.asarray(m["up/model"]), per)
    np.testing.assert_array_equal(np.asarray(m["down/model"]), per)
    down = 2 * per if grouping == "ifca" else per  # IFCA: the family's K = 2 experts
    np.testing.assert_array_equal(np.asarray(m["down/experts"]), down)
    np.testing.assert_array_equal(np.asarray(m["up/histogram"]), np.full(8, 3 * 4.0))


def test_each_familys_model_is_fedavg_on_its_clients(setup):
    """A family without the task architecture starts from its model, and the average of its
    cluster experts is FedAvg's aggregate of its clients trained from it (same client keys)."""
    data, hp, eng = setup
    alg = DisUE(eng, families=TWO, **SMALL)
    state = alg.init(jax.random.key(0), data, hp)
    key = jax.random.key(3)
    new, _ = jax.jit(alg.round)(state, data, key)
    k_train = jax.random.split(key, 4)[1]
    for f, fam in enumerate(alg.family_views):
        assert not fam.universal
        sums, n, _ = fam.engine.train_sum(state["family_models"][f], data, hp, k_train,
                                          state["round"], ids=state["family_ids"][f])
        ref = jax.tree.map(lambda s, n=n: s / n, sums)
        for u, v in zip(jax.tree.leaves(ref), jax.tree.leaves(new["family_models"][f]),
                        strict=True):
            np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-6)


def test_two_family_round_reports_family_and_personal_accuracy(setup):
    data, hp, eng = setup
    alg = DisUE(eng, families=TWO, distill="proxy", **SMALL)
    state, m = _run(alg, data, hp)
    for k in ("universal_acc", "family0_acc", "family1_acc", "personal_acc", "ensemble_acc",
              "student_agree"):
        assert 0.0 <= float(m[k]) <= 1.0, k
    assert "average_acc" not in m  # no family has the task architecture: nothing to average
    # personal_acc against a per-client loop: each client's own family's cluster expert on its
    # own test rows, the numpy way.
    fam_of = np.asarray(state["clients"]["family"])
    gid = np.asarray(state["clients"]["cluster_id"])
    offsets = np.cumsum([0] + [jax.tree.leaves(sl)[0].shape[0] for sl in state["slots"]])
    x, y = np.asarray(data.x), np.asarray(data.y)
    accs = []
    for c in range(data.num_clients):
        f = int(fam_of[c])
        model = make_model("mlp", (4,), 3, hidden=TWO[f]["hidden"])
        p = jax.tree.map(lambda a, k=int(gid[c] - offsets[f]): a[k], state["slots"][f])
        rows = np.asarray(data.test_idx[c])[: int(data.test_count[c])]
        pred = np.argmax(np.asarray(model.apply(p, x[rows])), -1)
        accs.append(np.mean(pred == y[rows]))
    assert float(m["personal_acc"]) == pytest.approx(np.mean(accs), abs=1e-6)
    slots, assign = alg.models(state)
    assert jax.tree.leaves(slots)[0].shape[0] == 4 and int(assign.max()) < 4
    # Global cluster ids: family 1's clusters come after family 0's.
    fam = np.asarray(state["clients"]["family"])
    assert np.all(np.asarray(assign)[fam == 1] >= 2) and np.all(np.asarray(assign)[fam == 0] < 2)
    rep = alg.report(state, data)
    assert set(rep.scalars) == {"universal_acc", "family0_acc", "family1_acc"}


# ------------------------------------------------------------------ driver end to end
def test_simulate_runs_two_families_end_to_end(tmp_path):
    from fedrnd.driver import simulate

    opts = {**SMALL, "families": TWO, "family_rule": "data_size"}
    cfg = {"rounds": 2, "eval_every": 1, "progress": False, "out_dir": str(tmp_path),
           "data": {"source": "digits", "partition": "dirichlet",
                    "partition_options": {"alpha": 0.5}, "num_clients": 8},
           "model": {"name": "mlp", "options": {"hidden": [8]}},
           "local": {"batch_size": 16, "steps": 2, "optimizer": "sgd", "lr": 0.1},
           "algorithms": [{"name": "disue", "options": opts}]}
    res = simulate(cfg, verbose=False)
    m = res.methods["disue"]
    assert [h["round"] for h in m.history] == [1, 2]
    for h in m.history:
        assert 0.0 <= h["family1_acc"] <= 1.0 and 0.0 <= h["personal_acc"] <= 1.0
    assert set(m.final) >= {"universal_acc", "family0_acc", "family1_acc"}
    # The driver scores the universal expert for every client.
    assert m.final["test_acc/weighted"] == pytest.approx(m.final["universal_acc"], abs=1e-6)
    fam = np.asarray(m.state["clients"]["family"])
    counts = np.asarray(res.data.train_count)
    assert counts[fam == 0].max() <= counts[fam == 1].min()  # data_size: the small ones first


def test_the_config_example_of_the_method_page_validates():
    import re
    import tomllib
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "methods" / "disue.md").read_text()
    section = page[page.index("### Heterogeneous experts (`families`)"):]
    block = re.search(r"```toml\n(.*?)```", section, re.S).group(1)
    raw = tomllib.loads(block)
    assert raw["algorithms"][0]["options"]["families"][1] == {"model": "mlp", "hidden": [400]}
    validate(from_dict({**raw, "data": {"source": "digits", "num_clients": 8},
                        "progress": False}))
