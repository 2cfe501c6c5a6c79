"""The low-rank fast path (fedrnd.engine.lowrank) against the general path and numpy references.

The fast path must give the general path's results (same batches, masked ragged steps,
per-client learning rates and schedules, loss), round by round, for every linear optimizer, and
must decline adaptive optimizers, mixes containing one, non-dense models and custom losses.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrnd.engine import (
    ClientMapper,
    ClientOptimizer,
    Engine,
    LocalSpec,
    client_hparams,
    cross_entropy_loss,
    lowrank,
    lr_schedule,
)
from fedrnd.models import make_model
from tests.conftest import gaussian_federated

ROOT = Path(__file__).resolve().parents[2]


def _engines(model, spec, opt, **kw):
    return (Engine(model, spec, opt, ClientMapper(chunk_size=1), path="general", **kw),
            Engine(model, spec, opt, ClientMapper(chunk_size=1), path="lowrank", **kw))


def _close(a, b, rtol=2e-5, atol=2e-6, what=""):
    for (path, u), v in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b),
                            strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol,
                                   err_msg=f"{what}{jax.tree_util.keystr(path)}")


# --------------------------------------------------------------------------------------------
# The model's layer structure and the coefficients
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, kw, shape", [("mlp", {"hidden": [7, 5]}, (3, 4)),
                                             ("mlp", {"hidden": [6]}, (5,)),
                                             ("logreg", {}, (2, 3, 1))])
def test_dense_stack_describes_the_model(name, kw, shape):
    model = make_model(name, shape, 4, **kw)
    params = model.init(jax.random.key(0))
    x = np.random.default_rng(0).normal(size=(6, *shape)).astype(np.float32)
    a = x.reshape(6, -1).astype(np.float64)
    names = model.dense.layers
    for i, layer in enumerate(names):
        a = a @ np.asarray(params[layer]["kernel"]) + np.asarray(params[layer]["bias"])
        if i < len(names) - 1:
            a = np.maximum(a, 0.0)
    np.testing.assert_allclose(np.asarray(model.apply(params, x)), a, rtol=1e-5, atol=1e-5)
    assert make_model("cnn", (8, 8, 1), 3).dense is None


def _numpy_optimizer(kind, lr, mu, wd, beta, grads, active, w0):
    """Plain loop: parameters (and momentum) after every step, for given gradient vectors."""
    w, m, ws, ms = w0.copy(), np.zeros_like(w0), [w0.copy()], [np.zeros_like(w0)]
    for g, on in zip(grads, active, strict=True):
        d = g + mu * (w - w0) + wd * w
        if kind in ("momentum", "nesterov"):
            m_new = d + beta * m
            u = m_new if kind == "momentum" else d + beta * m_new
        else:
            m_new, u = m, d
        if on:
            w, m = w - lr * u, m_new
        ws.append(w.copy())
        ms.append(m.copy())
    return np.array(ws), np.array(ms)


@pytest.mark.parametrize("kind", ["sgd", "prox_sgd", "momentum", "nesterov"])
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_coefficients_reproduce_the_optimizer_on_any_gradients(kind, wd):
    rng = np.random.default_rng(1)
    steps, dim = 6, 5
    grads = rng.normal(size=(steps, dim))
    w0 = rng.normal(size=dim)
    active = np.array([1, 1, 0, 1, 1, 0], bool)
    mu = 0.4 if kind == "prox_sgd" else 0.0
    settings = (("momentum", 0.8), ("weight_decay", wd))
    # A mix of linear kinds: this client's kind is picked per client inside one program.
    opt = ClientOptimizer(("sgd", "prox_sgd", "momentum", "nesterov"), settings)
    k = opt.kinds.index(kind)
    P, state = lowrank.coefficients(opt, {"w": jnp.zeros(dim)}, jnp.int32(k), jnp.float32(0.3),
                                    jnp.float32(mu), jnp.asarray(active))
    ws, ms = _numpy_optimizer(kind, 0.3, mu, wd, 0.8, grads, active, w0)
    basis = np.concatenate([w0[None], grads])                   # (W0, Gr_0, ..., Gr_{T-1})
    P = np.asarray(P, np.float64)
    np.testing.assert_allclose(P @ basis, ws, rtol=1e-5, atol=1e-5)
    # The state of this client's kind (a trace for momentum/nesterov), after the last step.
    leaves = [np.asarray(v) for v in jax.tree.leaves(state[k])]
    if kind in ("momentum", "nesterov"):
        np.testing.assert_allclose(leaves[0] @ basis, ms[-1], rtol=1e-5, atol=1e-5)
    else:
        assert leaves == []


# --------------------------------------------------------------------------------------------
# Fast path == general path
# --------------------------------------------------------------------------------------------
CASES = [
    # hidden, batch, epochs, steps, optimizer, settings, prox_mu (engine call), schedule
    ([9], 4, 2, None, "sgd", (), None, None),
    ([7, 5], 3, 1, None, "momentum", (("momentum", 0.9),), None, None),
    ([6, 6], 5, 1, 3, "nesterov", (("momentum", 0.7), ("weight_decay", 0.01)), None, None),
    ([8], 4, 1, None, {"sgd": 0.5, "prox_sgd": 0.5}, (), None, ("exponential", 0.5)),
    ([5], 16, 2, None, {"momentum": 0.5, "nesterov": 0.5}, (("weight_decay", 0.02),), 0.3, None),
    ([], 4, 1, 2, "sgd", (), 0.1, ("step", 1)),
]


@pytest.mark.parametrize("hidden, batch, epochs, steps, optimizer, settings, mu, sched", CASES)
def test_train_sum_equals_general_path_round_by_round(hidden, batch, epochs, steps, optimizer,
                                                      settings, mu, sched):
    counts = [11, 3, 7, 16, 1, 9]          # ragged: masked steps, clients below one batch
    data = gaussian_federated(counts, dim=5, num_classes=4, seed=len(hidden))
    model = (make_model("mlp", (5,), 4, hidden=hidden) if hidden
             else make_model("logreg", (5,), 4))
    lrs = {"sgd": 0.2, "prox_sgd": 0.3, "momentum": 0.05, "nesterov": 0.08}
    opt, hp = client_hparams(len(counts), optimizer=optimizer, prox_mu=0.5, seed=2,
                             lr={k: lrs[k] for k in ([optimizer] if isinstance(optimizer, str)
                                                     else optimizer)})
    # Per-client learning rates, not just per kind.
    hp = hp._replace(lr=hp.lr * jnp.linspace(0.6, 1.4, len(counts)))
    opt = ClientOptimizer(opt.kinds, settings)
    schedule = None
    if sched is not None:
        schedule = (lr_schedule("exponential", decay_rate=sched[1]) if sched[0] == "exponential"
                    else lr_schedule("step", every=sched[1], gamma=0.5))
    general, fast = _engines(model, LocalSpec(batch, epochs, steps), opt, schedule=schedule)
    assert fast.use_lowrank(data)

    def round_fn(engine):
        def f(params, key, r):
            s, n, m = engine.train_sum(params, data, hp, key, r, prox_mu=mu)
            return jax.tree.map(lambda a: a / n, s), n, m
        return jax.jit(f)

    g_round, f_round = round_fn(general), round_fn(fast)
    params = model.init(jax.random.key(0))
    p_fast = params
    for r in range(3):
        key = jax.random.fold_in(jax.random.key(7), r)
        mean_g, n_g, m_g = g_round(params, key, jnp.int32(r))
        mean_f, n_f, m_f = f_round(params, key, jnp.int32(r))
        assert float(n_f) == float(n_g) == sum(counts)
        _close(mean_f, mean_g, what=f"round {r} ")
        np.testing.assert_allclose(float(m_f["loss"]), float(m_g["loss"]), rtol=1e-5)
        assert float(m_f["steps"]) == float(m_g["steps"])
        assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
            jax.tree.leaves(mean_g), jax.tree.leaves(params), strict=True)) > 1e-3
        params = mean_g
        p_fast = f_round(p_fast, key, jnp.int32(r))[0]
    # The fast path's own trajectory stays on the general one.
    _close(p_fast, params, rtol=1e-4, atol=1e-5, what="trajectory ")


def test_many_steps_scan_and_uneven_blocks_equal_general_path():
    """Beyond UNROLL_MAX steps the step loop is a scan; blocks that do not divide the cohort
    are padded with empty clients; a cohort is gathered by id."""
    counts = [13, 5, 9, 2, 11, 7, 4]
    data = gaussian_federated(counts, dim=3, seed=4)
    model = make_model("mlp", (3,), 3, hidden=[4])
    opt, hp = client_hparams(len(counts), optimizer={"sgd": 0.5, "momentum": 0.5}, lr=0.1)
    spec = LocalSpec(batch_size=3, epochs=1, steps=lowrank.UNROLL_MAX + 3)
    general, fast = _engines(model, spec, opt)
    params = model.init(jax.random.key(1))
    ids = jnp.array([0, 2, 3, 5, 6])
    key = jax.random.key(3)
    want = general.train_sum(params, data, hp, key, 0, ids=ids)
    per = fast._per_client(data, hp, ids, key)
    per["w"] = per["count"].astype(jnp.float32)
    for block in (2, 5):
        got = jax.jit(lambda p, per, block=block: lowrank.run(
            model, spec, opt, fast.mapper, "sum", jax.tree.map(lambda a: a[None], p), per,
            data.x, data.y, jnp.ones(()), block=block))(params, per)
        _close(got[0], want[0], rtol=1e-4, atol=1e-5, what=f"block {block} ")
        np.testing.assert_allclose(float(got[2]["loss"]), float(want[2]["loss"]), rtol=1e-5)


@pytest.mark.parametrize("optimizer", ["momentum", "sgd"])
def test_train_per_client_models_and_state_equal_general_path(optimizer):
    counts = [6, 10, 3, 8, 5]
    data = gaussian_federated(counts, dim=4, seed=2)
    model = make_model("mlp", (4,), 3, hidden=[6, 5])
    opt, hp = client_hparams(len(counts), optimizer=optimizer, lr=0.1, prox_mu=0.2)
    opt = ClientOptimizer(opt.kinds, (("weight_decay", 0.01),))
    general, fast = _engines(model, LocalSpec(3, 2), opt)
    params = model.init(jax.random.key(0))
    want = jax.jit(lambda p: general.train(p, data, hp, jax.random.key(4), 0, prox_mu=0.2))(params)
    got = jax.jit(lambda p: fast.train(p, data, hp, jax.random.key(4), 0, prox_mu=0.2))(params)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    _close(got[0], want[0], what="params ")
    _close(got[1], want[1], what="opt_state ")
    _close(got[2], want[2], what="metrics ")


def test_train_segment_sum_equals_general_path():
    counts = [7, 4, 12, 9, 3, 6, 10]
    data = gaussian_federated(counts, dim=4, seed=6)
    model = make_model("mlp", (4,), 3, hidden=[7])
    opt, hp = client_hparams(len(counts), optimizer={"sgd": 0.5, "nesterov": 0.5},
                             lr={"sgd": 0.2, "nesterov": 0.05}, prox_mu=0.1, seed=1)
    opt = opt.__class__(opt.kinds)
    general, fast = _engines(model, LocalSpec(4, 1), opt)
    slots = jax.vmap(model.init)(jax.random.split(jax.random.key(0), 4))
    cid = jnp.array([2, 0, 2, 3, 0, 7, 3])          # slot 1 empty; id 7 is outside: dropped
    weights = jnp.linspace(0.5, 2.0, len(counts))
    for w in (None, weights):
        want = general.train_segment_sum(slots, cid, data, hp, jax.random.key(2), 0, weights=w)
        got = jax.jit(lambda s, w=w: fast.train_segment_sum(s, cid, data, hp, jax.random.key(2),
                                                            0, weights=w))(slots)
        _close(got[0], want[0], rtol=1e-4, atol=1e-5, what="sums ")
        _close(got[1:], want[1:], rtol=1e-5, atol=1e-5, what="mass/metrics ")
        assert float(got[1][1]) == 0.0


# --------------------------------------------------------------------------------------------
# Declining, dispatch, cost model
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["adam", {"sgd": 0.5, "adam": 0.5},
                                       {"momentum": 0.5, "rmsprop": 0.5}])
def test_declines_nonlinear_optimizers(optimizer):
    data = gaussian_federated([8, 8], dim=4)
    model = make_model("mlp", (4,), 3, hidden=[64])
    opt, _ = client_hparams(2, optimizer=optimizer, lr=0.01)
    assert "not linear" in lowrank.why_not(model, opt)
    assert not Engine(model, LocalSpec(4), opt).use_lowrank(data)
    with pytest.raises(ValueError, match="not linear in the gradient"):
        Engine(model, LocalSpec(4), opt, path="lowrank")


def test_declines_non_dense_models_and_custom_losses():
    data = gaussian_federated([8, 8], dim=16)
    cnn = make_model("cnn", (4, 4, 1), 3, channels=[2], dense=8)
    opt = ClientOptimizer(("sgd",))
    assert not Engine(cnn, LocalSpec(4), opt).use_lowrank(data)
    with pytest.raises(ValueError, match="dense layer stack"):
        Engine(cnn, LocalSpec(4), opt, path="lowrank")
    mlp = make_model("mlp", (16,), 3, hidden=[64])
    loss = cross_entropy_loss(mlp.apply)
    assert not Engine(mlp, LocalSpec(4), opt, loss=loss).use_lowrank(data)
    with pytest.raises(ValueError, match="custom loss"):
        Engine(mlp, LocalSpec(4), opt, loss=loss, path="lowrank")
    with pytest.raises(ValueError, match="path='fast' is unknown"):
        Engine(mlp, LocalSpec(4), opt, path="fast")


def test_per_client_start_models_use_the_general_path():
    """Per-client start models or carried optimizer state cannot share one product: even a
    forced fast path runs the general path there (bit-identical results)."""
    data = gaussian_federated([6, 9, 4], dim=4)
    model = make_model("mlp", (4,), 3, hidden=[5])
    opt, hp = client_hparams(3, optimizer="momentum", lr=0.1)
    general, fast = _engines(model, LocalSpec(3), opt)
    stacked = jax.vmap(model.init)(jax.random.split(jax.random.key(0), 3))
    state = jax.vmap(opt.init)(stacked)
    for kw in ({"client_params": stacked}, {"client_params": stacked, "opt_state": state}):
        want = general.train(None, data, hp, jax.random.key(1), 0, **kw)
        got = fast.train(None, data, hp, jax.random.key(1), 0, **kw)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_cost_model_follows_samples_per_round_against_layer_width():
    model = make_model("mlp", (784,), 10, hidden=[200, 200])
    dims = lowrank.layer_dims(model)
    assert dims == [(784, 200), (200, 200), (200, 10)]
    f = lowrank.flops(dims, steps=4, batch=16)
    # Model FLOPs: 3 x forward (2 x MACs) per example, 64 examples.
    assert f["model"] == 3 * 2 * (784 * 200 + 200 * 200 + 200 * 10) * 64
    assert f["executed"] == f["shared"] + f["corrections"] < f["model"]
    # One dense layer, counted by hand: the forward corrections of the 4 steps read 0+1+2+3
    # past batches of 16 rows, and the first layer's Gram matrix is only its block below the
    # diagonal ((64-16)^2 entries) while the steps are unrolled, all 64^2 in the scan.
    one = lowrank.flops([(784, 10)], steps=4, batch=16)
    assert one["corrections"] == 2 * 16 * (16 * 6) * 10 + 2 * 48 ** 2 * 784
    many = lowrank.flops([(784, 10)], steps=lowrank.UNROLL_MAX + 1, batch=2)
    n = 2 * (lowrank.UNROLL_MAX + 1)
    assert many["corrections"] == 2 * 2 * (2 * (n // 2) ** 2) * 10 + 2 * n ** 2 * 784
    # The throughput workload (1 epoch of 4 batches of 16): the fast path pays ...
    assert lowrank.pays(model, LocalSpec(16, 1), 64)
    # ... and with 10 epochs (640 samples a round, above every layer width) it does not.
    assert not lowrank.pays(model, LocalSpec(16, 10), 64)
    # Corrections grow with (steps x batch)^2, the shared part linearly.
    g = lowrank.flops(dims, steps=8, batch=16)
    assert g["shared"] == pytest.approx(2 * f["shared"])
    assert g["corrections"] > 4 * f["corrections"]
    data = gaussian_federated([64, 64], dim=784)
    opt = ClientOptimizer(("sgd",))
    assert Engine(model, LocalSpec(16, 1), opt).use_lowrank(data)
    assert not Engine(model, LocalSpec(16, 10), opt).use_lowrank(data)
    assert not Engine(model, LocalSpec(16, 1), opt, path="general").use_lowrank(data)
    assert Engine(model, LocalSpec(16, 10), opt, path="lowrank").use_lowrank(data)


def test_config_field_local_path_reaches_the_engine():
    from fedrnd.driver.config import from_dict, validate
    from fedrnd.driver.setup import build_engine

    data = gaussian_federated([6, 6, 6], dim=4)
    for path in ("auto", "general", "lowrank"):
        cfg = validate(from_dict({"local": {"path": path}, "data": {"num_clients": 3, "partition_options": {"num_groups": 3}}}))
        engine, _, _ = build_engine(cfg, data)
        assert engine.path == path
    with pytest.raises(ValueError, match="local.path"):
        validate(from_dict({"local": {"path": "fast"}}))
    with pytest.raises(ValueError, match="not linear"):
        build_engine(validate(from_dict({"local": {"path": "lowrank", "optimizer": "adam"},
                                         "data": {"num_clients": 3, "partition_options": {"num_groups": 3}}})), data)


# --------------------------------------------------------------------------------------------
# Sharded over devices
# --------------------------------------------------------------------------------------------
SCRIPT = textwrap.dedent('''
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from fedrnd.engine import ClientMapper, Engine, LocalSpec, client_hparams, make_mesh
    from fedrnd.models import make_model
    from tests.conftest import gaussian_federated

    out = sys.argv[1]
    data = gaussian_federated([5, 9, 3, 7, 4, 6, 8, 2], dim=4, seed=3)
    model = make_model("mlp", (4,), 3, hidden=[6])
    opt, hp = client_hparams(8, optimizer={"sgd": 0.5, "momentum": 0.5}, lr=0.1, seed=1)
    params = model.init(jax.random.key(0))
    slots = jax.vmap(model.init)(jax.random.split(jax.random.key(1), 3))
    cid = jnp.array([0, 2, 2, 1, 0, 1, 2, 0])
    from fedrnd.engine import lowrank
    res = {"rows": np.array([lowrank.block_rows(ClientMapper(mesh=make_mesh(2))),
                             lowrank.block_rows(ClientMapper(chunk_size=1))])}
    lowrank.BLOCK_ROWS_PER_CORE = 9  # one client (3 steps x 3 rows) a block: 4 blocks a device
    for name, mapper, path in (("mesh", ClientMapper(mesh=make_mesh(2)), "lowrank"),
                               ("single", ClientMapper(chunk_size=1), "general")):
        e = Engine(model, LocalSpec(3, 1), opt, mapper, path=path)
        s, n, m = jax.jit(lambda p: e.train_sum(p, data, hp, jax.random.key(2), 0))(params)
        q, mass, _ = jax.jit(lambda p: e.train_segment_sum(p, cid, data, hp, jax.random.key(2),
                                                           0))(slots)
        for i, leaf in enumerate(jax.tree.leaves((s, n, m, q, mass))):
            res[f"{name}/{i}"] = np.asarray(leaf)
    try:
        Engine(model, LocalSpec(3, 1), opt, ClientMapper(mesh=make_mesh(2)), path="lowrank"
               ).train_sum(params, data, hp, jax.random.key(2), 0, ids=jnp.arange(3))
    except ValueError as err:
        res["error"] = np.array(str(err))
    np.savez(out, **res)
''')


@pytest.mark.slow
def test_sharded_fast_path_equals_single_device_general_path(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, "--xla_force_host_platform_device_count=2"])
    out = tmp_path / "res.npz"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with np.load(out) as z:
        res = dict(z)
    keys = sorted(k.split("/")[1] for k in res if k.startswith("mesh/"))
    assert keys and keys == sorted(k.split("/")[1] for k in res if k.startswith("single/"))
    for k in keys:
        np.testing.assert_allclose(res[f"mesh/{k}"], res[f"single/{k}"], rtol=2e-5, atol=2e-5,
                                   err_msg=k)
    assert "3 clients (or cohort size) cannot be split evenly over 2 devices" in str(res["error"])
    # host CPU devices (one per core) take cache-sized blocks; one device the default
    assert res["rows"].tolist() == [256, 2048]

