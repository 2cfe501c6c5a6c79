"""SPARK's soft-label options: the direction of the annealing (``soft_schedule``) and whose
predictions the soft labels are (``soft_source``), each against a plain reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrnd.algorithms.ntk_dfl import _GRAPH_KEY, NTKDFL, SPARK, soft_targets
from fedrnd.data import build_federated, load_source
from fedrnd.data.federated import Partition
from fedrnd.engine import Engine, client_hparams
from fedrnd.graphs import adjacency
from fedrnd.models import make_model
from fedrnd.ntk import dense_jacobian, dense_kernel, evolve, jacobian_transpose


@pytest.fixture(scope="module")
def fed():
    """8 clients x 12 digits (equal sizes: the reference loop compiles once)."""
    ds = load_source("digits")
    rows = np.random.default_rng(1).permutation(len(ds.y_train))[:96].reshape(8, 12)
    part = Partition(train=[np.sort(r) for r in rows], test=[np.arange(4)] * 8,
                     group=np.zeros(8, np.int32), name="equal(12)")
    data = build_federated(ds, part)
    model = make_model("mlp", data.feature_shape, data.num_classes, hidden=[6])
    _, hp = client_hparams(8)
    return data, model, hp


def _betas(alg, rounds):
    return [float(alg.schedule(jnp.asarray(k, jnp.int32))[1]) for k in range(rounds)]


def test_decay_schedule_starts_at_soft_weight_and_halves_every_stage(fed):
    _, model, _ = fed
    alg = SPARK(Engine(model), soft_weight=0.4, soft_decay=0.5, stage_rounds=2)
    np.testing.assert_allclose(_betas(alg, 7), [0.4, 0.4, 0.2, 0.2, 0.1, 0.1, 0.05], rtol=1e-6)


def test_ramp_schedule_starts_at_zero_and_grows_to_soft_weight(fed):
    _, model, _ = fed
    alg = SPARK(Engine(model), soft_weight=0.4, soft_decay=0.5, stage_rounds=2,
                soft_schedule="ramp")
    np.testing.assert_allclose(_betas(alg, 7), [0.0, 0.0, 0.2, 0.2, 0.3, 0.3, 0.35],
                               rtol=1e-6, atol=1e-7)
    late = _betas(alg, 61)  # approaches soft_weight, never passes it (float32 rounding aside)
    assert np.all(np.diff(late) >= 0) and abs(late[-1] - 0.4) < 1e-6
    # The two schedules mirror each other: beta_ramp + beta_decay = soft_weight.
    dec = SPARK(Engine(model), soft_weight=0.4, soft_decay=0.5, stage_rounds=2)
    np.testing.assert_allclose(np.add(_betas(alg, 9), _betas(dec, 9)), 0.4, rtol=1e-6)


def test_soft_targets_by_hand():
    y = jnp.asarray([[1.0, 0.0]])
    logits = jnp.asarray([[0.0, 2.0 * np.log(3.0)]])  # softmax(logits / 2) = [1/4, 3/4]
    np.testing.assert_allclose(soft_targets(y, logits, 0.4, 2.0), [[0.7, 0.3]], rtol=1e-6)


@pytest.mark.parametrize("bad", [{"soft_schedule": "linear"}, {"soft_source": "peers"},
                                 {"soft_schedule": "Ramp"}])
def test_bad_soft_options_are_rejected(fed, bad):
    data, model, _ = fed
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        SPARK(Engine(model), **bad).validate(data)


def _distinct_state(alg, data, hp):
    """A state whose client models differ (at init they are all equal, which would make every
    source of soft labels the same)."""
    state = alg.init(jax.random.key(0), data, hp)
    p = state["clients"]["params"]
    leaves, tree = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    noisy = [a + 0.5 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
    return {**state, "clients": {**state["clients"],
                                 "params": jax.tree.unflatten(tree, noisy)}}


def _reference_round(alg, state, data, key):
    """One round per client with dense Jacobians and an explicit loop: soft labels of every
    pooled row from the model of the client that holds it."""
    model, c = alg.model, data.num_clients
    k_graph, _ = jax.random.split(key)
    g = alg.make_topology(c).draw(jax.random.fold_in(k_graph, _GRAPH_KEY))
    adj = np.asarray(adjacency(g))
    params = state["clients"]["params"]
    w = [jax.tree.map(lambda a, j=j: a[j], params) for j in range(c)]
    lr_k, beta = alg.schedule(state["round"])
    dt = lr_k * max(alg.taus) / alg.ode_steps
    steps = np.asarray(alg.horizon_steps())
    @jax.jit
    def step(wbar, x, y, soft):
        f0 = model.apply(wbar, x)
        target = (1 - beta) * y + beta * jax.nn.softmax(soft / alg.soft_temperature, axis=-1)
        h = dense_kernel(dense_jacobian(model.apply, wbar, x))
        n = x.shape[0]
        _, a = evolve(h, f0, target, jnp.ones(n), dt, alg.ode_steps, alg.loss)
        dw = jacobian_transpose(model.apply, wbar, x, -a[steps] / n)
        cand = jax.tree.map(lambda p, d: p[None] + d, wbar, dw)
        losses = jax.vmap(lambda wc: -jnp.mean(jnp.sum(
            y * jax.nn.log_softmax(model.apply(wc, x)), -1)))(cand)
        return jax.tree.map(lambda q: q[jnp.argmin(losses)], cand)

    new = []
    for i in range(c):
        group = [i, *np.flatnonzero(adj[i]).tolist()]
        wbar = jax.tree.map(lambda *a: sum(a) / len(a), *[w[j] for j in group])
        rows = [np.asarray(data.train_idx[j, : int(data.train_count[j])]) for j in group]
        x = jnp.concatenate([data.x[r] for r in rows])
        y = jax.nn.one_hot(jnp.concatenate([data.y[r] for r in rows]), data.num_classes)
        soft = jnp.concatenate([model.apply(w[j], data.x[r]) for j, r in zip(group, rows,
                                                                              strict=True)])
        new.append(step(wbar, x, y, soft))
    return new


def test_neighbours_source_labels_each_row_with_its_holders_own_model(fed):
    data, model, hp = fed
    opts = dict(graph={"degree": 3}, ode_steps=8, momentum=0.0, project=False,
                soft_weight=0.8, soft_temperature=1.0)
    alg = SPARK(Engine(model), soft_source="neighbours", **opts)
    state = _distinct_state(alg, data, hp)
    key = jax.random.key(3)
    out, met = jax.jit(alg.round)(state, data, key)
    ref = _reference_round(alg, state, data, key)
    ref = jax.tree.map(lambda *a: jnp.stack(a), *ref)

    def gap(p, q):
        return max(float(jnp.abs(a - b).max()) for a, b in zip(
            jax.tree.leaves(p), jax.tree.leaves(q), strict=True))

    err = gap(out["clients"]["params"], ref)
    # With the clients' own start points as the source the update differs, by far more than
    # the rounding between the structured and the dense-Jacobian paths.
    own, _ = jax.jit(SPARK(Engine(model), soft_source="own", **opts).round)(state, data, key)
    diff = gap(own["clients"]["params"], ref)
    assert err < 1e-3 and diff > 20 * err, (err, diff)
    # The extra message: n_j x C float32 from every neighbour j, none without it.
    g = alg.make_topology(data.num_clients).draw(
        jax.random.fold_in(jax.random.split(key)[0], _GRAPH_KEY))
    adj = np.asarray(adjacency(g))
    cnt = np.asarray(data.train_count)
    for i in range(data.num_clients):
        nb = np.flatnonzero(adj[i])
        assert float(met["down/soft_outputs"][i]) == sum(cnt[j] * 10 * 4 for j in nb)
        assert float(met["up/soft_outputs"][i]) == len(nb) * cnt[i] * 10 * 4
    _, met_own = jax.jit(SPARK(Engine(model), soft_source="own", **opts).round)(state, data, key)
    assert not any(k.endswith("soft_outputs") for k in met_own)


def test_ramp_round_zero_is_the_hard_label_ntk_dfl_round(fed):
    data, model, hp = fed
    base = dict(graph={"degree": 3}, ode_steps=8)
    ramp = SPARK(Engine(model), momentum=0.0, project=False, soft_weight=0.5,
                 soft_schedule="ramp", soft_source="neighbours", **base)
    state = _distinct_state(ramp, data, hp)
    key = jax.random.key(5)
    a, met = jax.jit(ramp.round)(state, data, key)
    b, _ = jax.jit(NTKDFL(Engine(model), **base).round)(state, data, key)
    for u, v in zip(jax.tree.leaves(a["clients"]["params"]),
                    jax.tree.leaves(b["clients"]["params"]), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)
    assert float(jnp.sum(met["down/soft_outputs"])) == 0.0  # beta = 0: nothing sent
    assert float(met["soft_weight"]) == 0.0


def test_exact_one_takes_the_sketchs_horizon_and_the_exact_update_for_it(fed):
    """``projected_update = "exact_one"``: the horizon the sketched updates choose, and the
    exact ``-(1/n) J^T A`` at that horizon (a reference built from the kernel, evolution and
    Jacobian-transpose parts), at 1 / M of ``exact``'s residual and update bytes."""
    from fedrnd.ntk import draw_projections, layer_features, project_features

    data, model, hp = fed
    base = dict(graph={"degree": 3}, ode_steps=8, taus=(2, 4, 8), momentum=0.0,
                soft_weight=0.0, proj_dim=4)
    one = SPARK(Engine(model), projected_update="exact_one", **base)
    sketch = SPARK(Engine(model), projected_update="sketch", **base)
    exact = SPARK(Engine(model), projected_update="exact", **base)
    look = jax.tree.map(lambda a: a[0], _distinct_state(one, data, hp)["clients"]["params"])
    rows = np.asarray(data.train_idx[:2]).reshape(-1)
    x = data.x[rows]
    y = jax.nn.one_hot(data.y[rows], model.num_classes)
    mask = jnp.ones(len(rows), jnp.float32)
    proj = draw_projections(jax.random.key(3), model, 4)
    lr_k, beta = one.schedule(jnp.asarray(0, jnp.int32))
    a = one.client_step(look, x, y, mask, lr_k, beta, proj)
    s = sketch.client_step(look, x, y, mask, lr_k, beta, proj)
    assert float(a["tau"]) == float(s["tau"])
    # Reference: the projected kernel drives the evolution; the exact J^T A at that horizon.
    feats = layer_features(model, look, x)
    pj = project_features(feats, proj)
    h = jnp.einsum("icp,jcp->ij", pj, pj) / model.num_classes
    dt = lr_k * 8 / 8
    _, traj = evolve(h, feats.logits, y, mask, dt, 8)
    m = one.taus.index(int(float(a["tau"])))
    cot = -traj[one.horizon_steps()[m]] / len(rows)
    ref = jax.tree.map(lambda d: d[0], jacobian_transpose(model.apply, look, x, cot[None]))
    for u, v in zip(jax.tree.leaves(a["update"]), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6)
    # Not the sketch's update (the projection is 4 rows per layer: far from exact).
    diff = sum(float(jnp.sum((u - v) ** 2)) for u, v in zip(
        jax.tree.leaves(a["update"]), jax.tree.leaves(s["update"]), strict=True))
    assert diff > 1e-6
    # Ledger: the second round trip carries one horizon instead of three.
    state = one.init(jax.random.key(0), data, hp)
    _, m1 = jax.jit(one.round)(state, data, jax.random.key(1))
    _, m3 = jax.jit(exact.round)(state, data, jax.random.key(1))
    for kind in ("up/residuals", "down/residuals", "up/updates", "down/updates"):
        np.testing.assert_allclose(3 * np.asarray(m1[kind]), np.asarray(m3[kind]), rtol=1e-6)
    _, ms = jax.jit(sketch.round)(state, data, jax.random.key(1))
    assert not any(k.endswith("residuals") for k in ms)
