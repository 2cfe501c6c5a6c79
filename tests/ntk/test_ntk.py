"""NTK kernel, output evolution, projections and the NTK-DFL / SPARK rounds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrnd.algorithms import make_algorithm
from fedrnd.algorithms.ntk_dfl import _GRAPH_KEY, NTKDFL, SPARK, neighbour_table
from fedrnd.data import build_federated, load_source, make_partition
from fedrnd.engine import Engine, client_hparams, tree_bytes
from fedrnd.graphs import adjacency, make_topology
from fedrnd.models import make_model
from fedrnd.ntk import (
    dense_jacobian,
    dense_kernel,
    draw_projections,
    evolve,
    jacobian_transpose,
    layer_features,
    mse_closed_form,
    project_features,
    structured_kernel,
    unproject_update,
)


def _tiny(hidden=(7, 5), classes=3, dim=4, n=9, seed=0):
    model = make_model("mlp", (dim,), classes, hidden=list(hidden))
    params = model.init(jax.random.key(seed))
    # Larger biases so that ReLUs are mixed on and off across samples.
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(seed + 1),
                                                                 p.shape), params)
    x = jax.random.normal(jax.random.key(seed + 2), (n, dim))
    return model, params, x


def test_structured_kernel_equals_dense_jjt():
    model, params, x = _tiny()
    jac = dense_jacobian(model.apply, params, x)
    assert jac.shape == (9, 3, model.num_params())
    ref = np.einsum("icp,jcp->ij", np.asarray(jac, np.float64), np.asarray(jac, np.float64)) / 3
    feats = layer_features(model, params, x)
    np.testing.assert_allclose(structured_kernel(feats), ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(feats.logits, model.apply(params, x), rtol=1e-5, atol=1e-6)
    # Cross kernel between two sample sets.
    x2 = x[:4] * 2.0 + 0.1
    jac2 = np.asarray(dense_jacobian(model.apply, params, x2), np.float64)
    cross = structured_kernel(feats, layer_features(model, params, x2))
    np.testing.assert_allclose(cross, np.einsum("icp,jcp->ij", np.asarray(jac, np.float64),
                                                jac2) / 3, rtol=1e-4, atol=1e-5)


def test_jacobian_transpose_is_dense_jt_product():
    model, params, x = _tiny()
    jac = np.asarray(dense_jacobian(model.apply, params, x), np.float64)
    cot = jax.random.normal(jax.random.key(5), (2, 9, 3))
    out = jacobian_transpose(model.apply, params, x, cot)
    flat = np.stack([np.concatenate([np.asarray(g[m]).reshape(-1)
                                     for g in jax.tree.leaves(out)]) for m in range(2)])
    ref = np.einsum("icp,mic->mp", jac, np.asarray(cot, np.float64))
    np.testing.assert_allclose(flat, ref, rtol=1e-4, atol=1e-5)


def _linear_setup(n=12, dim=5, classes=4):
    model = make_model("logreg", (dim,), classes)
    params = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (n, dim)) * 0.5
    y = jax.nn.one_hot(jax.random.randint(jax.random.key(2), (n,), 0, classes), classes)
    return model, params, x, y


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_linear_model_outputs_at_updated_weights_equal_evolved_outputs(loss):
    model, params, x, y = _linear_setup()
    n = x.shape[0]
    h = structured_kernel(layer_features(model, params, x))
    f0 = model.apply(params, x)
    f, a = evolve(h, f0, y, jnp.ones(n), 0.05, 40, loss)
    for s in (10, 25, 40):
        dw = jacobian_transpose(model.apply, params, x, -a[s][None] / n)
        w = jax.tree.map(lambda p, d: p + d[0], params, dw)
        np.testing.assert_allclose(model.apply(w, x), f[s], rtol=1e-4, atol=1e-5)
    assert np.all(np.diff([float(jnp.mean((f[s] - y) ** 2)) for s in range(41)]) <= 1e-7) or \
        loss == "ce"


def test_mse_mode_matches_closed_form_of_linear_ode():
    model, params, x, y = _linear_setup()
    h = structured_kernel(layer_features(model, params, x))
    f0 = model.apply(params, x)
    f, _ = evolve(h, f0, y, jnp.ones(x.shape[0]), 0.05, 40, "mse")
    for s in (1, 20, 40):
        np.testing.assert_allclose(f[s], mse_closed_form(h, f0, y, 0.05 * s), rtol=1e-4,
                                   atol=1e-5)


def test_evolve_padding_rows_stay_put_and_do_not_change_real_rows():
    model, params, x, y = _linear_setup()
    h = structured_kernel(layer_features(model, params, x))
    f0 = model.apply(params, x)
    mask = jnp.arange(12) < 8
    hm = h * mask[:, None] * mask[None, :]
    f, a = evolve(hm, f0, y, mask, 0.05, 20, "ce")
    ref, _ = evolve(h[:8, :8], f0[:8], y[:8], jnp.ones(8), 0.05, 20, "ce")
    np.testing.assert_allclose(f[:, :8], ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f[:, 8:], jnp.broadcast_to(f0[8:], f[:, 8:].shape))
    assert float(jnp.abs(a[:, 8:]).max()) == 0.0


def test_projection_preserves_kernel_within_jl_tolerance():
    model, params, x = _tiny(hidden=(24,), classes=3, dim=30, n=10)
    feats = layer_features(model, params, x)
    exact = np.asarray(structured_kernel(feats), np.float64)
    scale = np.sqrt(np.outer(np.diag(exact), np.diag(exact)))
    errs = []
    for k in (8, 32, 128, 512):
        proj = draw_projections(jax.random.key(k), model, k)
        pj = np.asarray(project_features(feats, proj), np.float64)
        approx = np.einsum("icp,jcp->ij", pj, pj) / 3
        err = float(np.max(np.abs(approx - exact) / scale))
        # JL for inner products: |<Ru, Rv> - <u, v>| <= eps |u||v| with eps ~ sqrt(log m / k);
        # summing blocks keeps the bound relative to sqrt(H_ii H_jj) (Cauchy-Schwarz).
        eps = 3.0 * np.sqrt(2.0 * np.log(10 * 10 * 2 * 3) / k)
        assert err <= eps, (k, err, eps)
        errs.append(err)
    assert errs[-1] < errs[0] / 3


def test_unprojected_layers_are_exact_and_unproject_inverts_identity_blocks():
    model, params, x = _tiny(hidden=(6,), classes=3, dim=4, n=5)
    feats = layer_features(model, params, x)
    big = draw_projections(jax.random.key(0), model, 10_000)  # k >= every block: no projection
    assert all(r is None for r in big)
    pj = project_features(feats, big)
    jac = dense_jacobian(model.apply, params, x)
    np.testing.assert_allclose(dense_kernel(pj), dense_kernel(jac), rtol=1e-5, atol=1e-6)
    cot = jax.random.normal(jax.random.key(1), (5, 3))
    upd = unproject_update(model, jnp.einsum("icp,ic->p", pj, cot), big)
    ref = jacobian_transpose(model.apply, params, x, cot[None])
    for a, b in zip(jax.tree.leaves(upd), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b[0], rtol=1e-4, atol=1e-5)


def test_neighbour_table_lists_the_adjacency():
    g = make_topology("d_regular", 20, degree=3).draw(jax.random.key(3))
    table, valid, dropped = neighbour_table(g, 3)
    adj = adjacency(g)
    for i in range(20):
        got = sorted(np.asarray(table[i])[np.asarray(valid[i])].tolist())
        assert got == sorted(np.flatnonzero(adj[i]).tolist())
    assert int(dropped) == 0
    _, valid2, dropped2 = neighbour_table(g, 2)
    assert int(valid2.sum()) == 40 and int(dropped2) == int(adj.sum()) - 40


@pytest.fixture(scope="module")
def small_fed():
    ds = load_source("digits")
    data = build_federated(ds, make_partition("dirichlet", ds, 12, seed=0, alpha=0.5))
    model = make_model("mlp", data.feature_shape, data.num_classes, hidden=[16])
    _, hp = client_hparams(12)
    return data, model, hp


def _one_round(alg, data, hp, key=1, rounds=1):
    state = alg.init(jax.random.key(0), data, hp)
    metrics = None
    for r in range(rounds):
        state, metrics = jax.jit(alg.round)(state, data, jax.random.key(key + r))
    return state, metrics


@pytest.mark.parametrize("project", [False, True])
def test_byte_counts_match_message_array_sizes(small_fed, project):
    data, model, hp = small_fed
    opts = dict(graph={"degree": 3}, ode_steps=8, project=project, proj_dim=32)
    alg = NTKDFL(Engine(model), **opts)
    _, met = _one_round(alg, data, hp)
    c = data.num_clients
    g = alg.make_topology(c).draw(jax.random.fold_in(jax.random.split(jax.random.key(1))[0],
                                                     _GRAPH_KEY))
    adj = adjacency(g)
    params = model.init(jax.random.key(0))
    proj = draw_projections(jax.random.key(0), model, 32) if project else None
    msg = []
    for j in range(c):
        rows = np.asarray(data.train_idx[j, : int(data.train_count[j])])
        xj = data.x[rows]
        # The messages' shapes as the functions that build them produce them (no compute).
        if project:
            jac = jax.eval_shape(lambda x: project_features(layer_features(model, params, x),
                                                            proj), xj)
        else:
            jac = jax.eval_shape(lambda x: dense_jacobian(model.apply, params, x), xj)
        outputs = jax.eval_shape(model.apply, params, xj)
        labels = np.asarray(data.y[rows], np.int32)
        msg.append({"jacobian": tree_bytes(jac), "labels": labels.nbytes,
                    "outputs": tree_bytes(outputs)})
        assert jac.shape == (len(rows), 10, 32 * 2 if project else model.num_params())
    mb = tree_bytes(params)
    for i in range(c):
        nb = np.flatnonzero(adj[i])
        assert float(met["up/model"][i]) == 2 * len(nb) * mb
        assert float(met["down/model"][i]) == 2 * len(nb) * mb
        for kind in ("jacobian", "labels", "outputs"):
            assert float(met[f"down/{kind}"][i]) == sum(msg[j][kind] for j in nb)
            assert float(met[f"up/{kind}"][i]) == len(nb) * msg[i][kind]
        if project:  # exact update: residuals out to each neighbour, J_j^T A_j back, per tau
            m = len(alg.taus)
            n_i = int(data.train_count[i])
            assert float(met["down/residuals"][i]) == len(nb) * m * n_i * 10 * 4
            assert float(met["up/residuals"][i]) == sum(
                m * int(data.train_count[j]) * 10 * 4 for j in nb)
            assert float(met["up/updates"][i]) == float(met["down/updates"][i]) == \
                len(nb) * m * mb


def test_spark_without_momentum_and_regulariser_is_the_ntk_dfl_update(small_fed):
    data, model, hp = small_fed
    base = dict(graph={"degree": 3}, ode_steps=8)
    ref, _ = _one_round(NTKDFL(Engine(model), **base), data, hp, rounds=2)
    spark, _ = _one_round(SPARK(Engine(model), momentum=0.0, soft_weight=0.0, project=False,
                                **base), data, hp, rounds=2)
    for a, b in zip(jax.tree.leaves(ref["clients"]["params"]),
                    jax.tree.leaves(spark["clients"]["params"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # The parts do change the update when switched on.
    mom, _ = _one_round(SPARK(Engine(model), momentum=0.5, soft_weight=0.0, project=False,
                              **base), data, hp, rounds=2)
    reg, _ = _one_round(SPARK(Engine(model), momentum=0.0, soft_weight=0.5, project=False,
                              **base), data, hp, rounds=2)
    for other in (mom, reg):
        diff = sum(float(jnp.abs(a - b).max()) for a, b in zip(
            jax.tree.leaves(ref["clients"]["params"]),
            jax.tree.leaves(other["clients"]["params"]), strict=True))
        assert diff > 1e-4


def test_ntk_dfl_learns_and_final_model_is_the_client_average(small_fed):
    data, model, hp = small_fed
    alg = make_algorithm("ntk_dfl", Engine(model), graph={"degree": 3}, ode_steps=16)
    state, met = _one_round(alg, data, hp, rounds=3)
    assert float(met["train_loss"]) < float(met["start_loss"])
    slots, assign = alg.models(state)
    mean = jax.tree.map(lambda a: a.mean(0), state["clients"]["params"])
    for a, b in zip(jax.tree.leaves(slots), jax.tree.leaves(mean), strict=True):
        np.testing.assert_allclose(a[0], b, rtol=1e-6)
    assert assign.shape == (12,) and int(assign.max()) == 0


def test_options_are_checked(small_fed):
    data, model, _ = small_fed
    with pytest.raises(ValueError, match="between RK4 steps"):
        NTKDFL(Engine(model), taus=(100, 250, 800), ode_steps=8).validate(data)
    with pytest.raises(ValueError, match="momentum"):
        SPARK(Engine(model), momentum=1.0).validate(data)
    with pytest.raises(ValueError, match="max_degree"):
        NTKDFL(Engine(model), topology="erdos_renyi", graph={"p": 0.3}).validate(data)
    with pytest.raises(ValueError, match="same in every draw"):
        NTKDFL(Engine(model), topology="ring", graph={}).validate(data)
    with pytest.raises(ValueError, match="proj_dim must be an integer >= 1"):
        SPARK(Engine(model), proj_dim=0).validate(data)
