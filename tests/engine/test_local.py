"""local_train against a plain numpy re-implementation of the documented semantics."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedrnd.engine import ClientOptimizer, LocalSpec, cross_entropy_loss, local_train

D, K, P = 3, 3, 48
GARBAGE = 40  # pool rows >= GARBAGE hold huge features; padded positions point at them


def apply(params, x):
    return x @ params["w"] + params["b"]


LOSS = cross_entropy_loss(apply)


def _pool(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(P, D)).astype(np.float32)
    x[GARBAGE:] *= 1e3
    y = rng.integers(0, K, P).astype(np.int32)
    return x, y


def _params(seed=1):
    rng = np.random.default_rng(seed)
    return {"w": (0.3 * rng.normal(size=(D, K))).astype(np.float32),
            "b": (0.1 * rng.normal(size=K)).astype(np.float32)}


def _idx(count, n_max, seed=2):
    """``count`` distinct real rows, then padding positions pointing at garbage rows."""
    rng = np.random.default_rng(seed)
    real = rng.permutation(GARBAGE)[:count]
    pad = rng.integers(GARBAGE, P, n_max - count)
    return np.concatenate([real, pad]).astype(np.int32)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _train(spec, opt, p, s, x, y, idx, count, key, lr, mu, anchor):
    return local_train(LOSS, opt, spec, p, s, x, y, idx, count, key, jnp.asarray(0), lr, mu,
                       anchor)


def _run(spec, params, idx, count, key, lr=0.3, optimizer=None, prox_mu=0.0, anchor=None,
         seed=0):
    x, y = _pool(seed)
    opt = optimizer or ClientOptimizer()
    p0 = jax.tree.map(jnp.asarray, params)
    return _train(spec, opt, p0, opt.init(p0), jnp.asarray(x), jnp.asarray(y), jnp.asarray(idx),
                  jnp.asarray(count, jnp.int32), key, jnp.asarray(lr, jnp.float32),
                  jnp.asarray(prox_mu, jnp.float32),
                  None if anchor is None else jax.tree.map(jnp.asarray, anchor))


# ---- plain numpy reference ------------------------------------------------------------------

def _ref_loss_grad(p, x, y, mu=0.0, anchor=None):
    x = x.astype(np.float64)
    logits = x @ p["w"] + p["b"]
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    n = len(y)
    loss = -logp[np.arange(n), y].mean()
    d = np.exp(logp)
    d[np.arange(n), y] -= 1.0
    g = {"w": x.T @ d / n, "b": d.sum(0) / n}
    if mu:
        loss += 0.5 * mu * sum(np.sum((p[k] - anchor[k]) ** 2) for k in p)
        g = {k: g[k] + mu * (p[k] - anchor[k]) for k in p}
    return loss, g


def _f64(t):
    return {k: np.asarray(v, np.float64) for k, v in t.items()}


def _uniform(key, t, n_max):
    return np.asarray(jax.random.uniform(jax.random.fold_in(key, t), (n_max,)))


def _sgd_step(p, g, lr, tx, state):
    if tx is None:
        return {k: p[k] - lr * g[k] for k in p}, state
    u, state = tx.update(g, state, p)
    return _f64(optax.apply_updates(p, u)), state


def ref_epochs(params, idx, count, key, batch, epochs, lr, mu=0.0, anchor=None, seed=0, tx=None):
    """Each epoch: a fresh permutation of the client's own examples, ceil(n/B) steps.

    Plain SGD in float64, or the optax transformation ``tx`` applied step by step.
    """
    x, y = _pool(seed)
    p = _f64(params)
    anchor = p if anchor is None else _f64(anchor)
    state = None if tx is None else tx.init(p)
    losses = []
    for e in range(epochs):
        u = _uniform(key, e, len(idx))
        order = np.argsort(u[:count], kind="stable")  # the client's real positions, shuffled
        for s in range(0, count, batch):
            rows = idx[order[s:s + batch]]
            loss, g = _ref_loss_grad(p, x[rows], y[rows], mu, anchor)
            p, state = _sgd_step(p, g, lr, tx, state)
            losses.append(loss)
    return p, losses


def ref_steps(params, idx, count, key, batch, steps, lr, mu=0.0, anchor=None, seed=0):
    """``steps`` SGD steps, each on min(B, n) of the client's examples without replacement."""
    x, y = _pool(seed)
    p = _f64(params)
    anchor = p if anchor is None else _f64(anchor)
    losses = []
    for t in range(steps):
        u = _uniform(key, t, len(idx))
        rows = idx[np.argsort(-u[:count], kind="stable")[:batch]]
        assert len(rows) == min(batch, count)
        loss, g = _ref_loss_grad(p, x[rows], y[rows], mu, anchor)
        p = {k: p[k] - lr * g[k] for k in p}
        losses.append(loss)
    return p, losses


def _assert_params(out, ref, tol=2e-5):
    for k in ref:
        np.testing.assert_allclose(np.asarray(out[k], np.float64), ref[k], rtol=tol, atol=tol)


# ---- tests ----------------------------------------------------------------------------------

@pytest.mark.parametrize("count,n_max,batch,epochs", [
    (10, 10, 4, 2),   # the largest client, ragged: batches 4, 4, 2
    (7, 10, 4, 2),    # ragged and padded: 4, 3, then one masked step per epoch
    (8, 10, 4, 2),    # a multiple of B, padded
    (3, 10, 4, 2),    # count < B: one partial batch per epoch, two masked steps
    (7, 10, 16, 2),   # B > N_max: one full-batch step per epoch
])
def test_epochs_mode_matches_reference(count, n_max, batch, epochs):
    params, idx, key, lr = _params(), _idx(count, n_max), jax.random.key(7), 0.3
    spec = LocalSpec(batch_size=batch, epochs=epochs)
    p, _, m = _run(spec, params, idx, count, key, lr)
    ref_p, ref_losses = ref_epochs(params, idx, count, key, batch, epochs, lr)
    _assert_params(p, ref_p)
    real_steps = epochs * -(-count // batch)
    assert len(ref_losses) == real_steps
    assert int(m["steps"]) == real_steps
    np.testing.assert_allclose(float(m["loss"]), np.mean(ref_losses), rtol=1e-5)


def test_epochs_mode_permutation_changes_per_epoch():
    """Two epochs over different permutations differ from two epochs over one permutation."""
    params, idx, key = _params(), _idx(9, 9), jax.random.key(3)
    p, _, _ = _run(LocalSpec(batch_size=2, epochs=2), params, idx, 9, key, 0.5)
    ref_p, _ = ref_epochs(params, idx, 9, key, 2, 2, 0.5)
    _assert_params(p, ref_p)
    # Same-permutation variant, written out: both epochs use epoch 0's order.
    x, y = _pool()
    order = np.argsort(_uniform(key, 0, 9), kind="stable")
    q = _f64(params)
    for _ in range(2):
        for s in range(0, 9, 2):
            rows = idx[order[s:s + 2]]
            _, g = _ref_loss_grad(q, x[rows], y[rows])
            q = {k: q[k] - 0.5 * g[k] for k in q}
    assert max(np.max(np.abs(np.asarray(p[k]) - q[k])) for k in q) > 1e-4


@pytest.mark.parametrize("count,n_max,batch,steps", [
    (10, 10, 4, 5),
    (7, 12, 4, 6),
    (3, 10, 4, 4),    # count < B: every step uses all 3 examples
    (5, 5, 8, 3),     # B > N_max
])
def test_steps_mode_runs_exactly_steps(count, n_max, batch, steps):
    params, idx, key, lr = _params(), _idx(count, n_max), jax.random.key(11), 0.2
    p, _, m = _run(LocalSpec(batch_size=batch, steps=steps), params, idx, count, key, lr)
    ref_p, ref_losses = ref_steps(params, idx, count, key, batch, steps, lr)
    _assert_params(p, ref_p)
    assert int(m["steps"]) == steps
    np.testing.assert_allclose(float(m["loss"]), np.mean(ref_losses), rtol=1e-5)
    # One step fewer or more is a different model.
    fewer, _ = ref_steps(params, idx, count, key, batch, steps - 1, lr)
    more, _ = ref_steps(params, idx, count, key, batch, steps + 1, lr)
    for other in (fewer, more):
        assert max(np.max(np.abs(np.asarray(p[k]) - other[k])) for k in other) > 1e-4


REFERENCE_TX = {"sgd": lambda lr: optax.sgd(lr), "adam": lambda lr: optax.adam(lr),
                "momentum": lambda lr: optax.sgd(lr, momentum=0.9)}


@pytest.mark.parametrize("kind,count,batch,big", [
    ("adam", 4, 4, 16), ("momentum", 4, 4, 16),
    ("adam", 6, 8, 16), ("momentum", 6, 8, 16),
    ("sgd", 5, 2, 11), ("adam", 5, 2, 11),
])
def test_masked_steps_leave_params_and_state_unchanged(kind, count, batch, big):
    """Padding to a large N_max adds only masked steps: params and optimizer state (e.g.
    Adam's step count, momentum) do not move on them."""
    opt = ClientOptimizer((kind,))
    spec = LocalSpec(batch_size=batch, epochs=3)
    params, key, lr = _params(), jax.random.key(5), 0.1
    small_idx = _idx(count, count)
    big_idx = np.concatenate([small_idx, _idx(0, big - count, seed=9)])
    p_big, s_big, m_big = _run(spec, params, big_idx, count, key, lr, opt)
    assert int(m_big["steps"]) == 3 * -(-count // batch)
    ref_p, _ = ref_epochs(params, big_idx, count, key, batch, 3, lr, tx=REFERENCE_TX[kind](lr))
    _assert_params(p_big, ref_p)
    if count <= batch:
        # One real (full) batch per epoch, so the order within it does not matter: the same
        # client in a data set with N_max = count gives the same model and state.
        p_small, s_small, m_small = _run(spec, params, small_idx, count, key, lr, opt)
        assert int(m_small["steps"]) == 3
        _assert_params(p_big, _f64(p_small), tol=1e-5)
        for a, b in zip(jax.tree.leaves(s_big), jax.tree.leaves(s_small), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(m_big["loss"]), float(m_small["loss"]), rtol=1e-5)


def test_prox_term_matches_reference_gradient_and_pulls_toward_anchor():
    params, idx, key = _params(), _idx(8, 10), jax.random.key(2)
    anchor = {k: v + 0.5 for k, v in _params(seed=4).items()}
    spec = LocalSpec(batch_size=4, steps=6)
    mu, lr = 0.8, 0.3
    p_prox, _, m = _run(spec, params, idx, 8, key, lr, prox_mu=mu, anchor=anchor)
    ref_p, ref_losses = ref_steps(params, idx, 8, key, 4, 6, lr, mu, anchor)
    _assert_params(p_prox, ref_p)
    np.testing.assert_allclose(float(m["loss"]), np.mean(ref_losses), rtol=1e-5)

    p_free, _, _ = _run(spec, params, idx, 8, key, lr, prox_mu=0.0, anchor=anchor)
    _assert_params(p_free, ref_steps(params, idx, 8, key, 4, 6, lr)[0])

    def dist(p):
        return sum(np.sum((np.asarray(p[k], np.float64) - anchor[k]) ** 2) for k in anchor)

    assert dist(p_prox) < dist(p_free)


def test_prox_anchor_defaults_to_start_params():
    params, idx, key = _params(), _idx(8, 10), jax.random.key(4)
    spec = LocalSpec(batch_size=3, epochs=2)
    p, _, _ = _run(spec, params, idx, 8, key, 0.4, prox_mu=2.0)
    _assert_params(p, ref_epochs(params, idx, 8, key, 3, 2, 0.4, mu=2.0, anchor=params)[0])
    free = ref_epochs(params, idx, 8, key, 3, 2, 0.4)[0]
    assert max(np.max(np.abs(np.asarray(p[k]) - free[k])) for k in free) > 1e-4


@pytest.mark.parametrize("kw", [dict(batch_size=0), dict(epochs=0), dict(steps=0),
                                dict(steps=-2, epochs=3)])
def test_local_spec_rejects_bad_values(kw):
    with pytest.raises(ValueError, match=">= 1"):
        LocalSpec(**kw)


def test_local_spec_step_counts():
    assert LocalSpec(batch_size=4, epochs=3).total_steps(10) == 9
    assert LocalSpec(batch_size=5, epochs=2).total_steps(10) == 4
    assert LocalSpec(batch_size=32, epochs=1).total_steps(10) == 1
    assert LocalSpec(batch_size=4, steps=7).total_steps(100) == 7


# ---- the loop against the masked scan it replaced -------------------------------------------

def _masked_scan(spec, opt, p, s, x_pool, y_pool, idx, count, key, lr):
    """The former loop, kept as a reference: every step of ``T`` runs, gathers its batch from
    the pool, and a select keeps the old parameters and state on padding steps."""
    from fedrnd.engine.local import batch_schedule

    positions, valid, active, n_steps = batch_schedule(spec, idx.shape[0], count, key)

    def step(carry, plan):
        pos, val, act = plan
        w, st = carry
        rows = idx[pos]
        loss, g = jax.value_and_grad(LOSS)(w, x_pool[rows], y_pool[rows], val.astype(jnp.float32))
        u, st2 = opt.update(g, st, w, jnp.asarray(0), lr)
        w2 = optax.apply_updates(w, u)
        keep = functools.partial(jax.tree.map, lambda a, b: jnp.where(act, a, b))
        return (keep(w2, w), keep(st2, st)), jnp.where(act, loss, 0.0)

    (p, s), losses = jax.lax.scan(step, (p, s), (positions, valid, active))
    return p, s, {"loss": jnp.sum(losses) / jnp.maximum(n_steps, 1), "steps": n_steps}


@pytest.mark.parametrize("spec", [LocalSpec(batch_size=4, epochs=3), LocalSpec(batch_size=5, steps=7)],
                         ids=["epochs", "steps"])
@pytest.mark.parametrize("gather_once", [True, False])
def test_real_step_loop_equals_masked_scan_bit_for_bit(spec, gather_once):
    # Ragged clients (0, 1, partial last batch, full) one at a time and vmapped over clients:
    # running only the real steps on rows gathered once gives the former loop's bits.
    n_max, counts = 12, [0, 1, 7, 12]
    x, y = map(jnp.asarray, _pool())
    opt = ClientOptimizer(("adam",))
    p0 = jax.tree.map(jnp.asarray, _params())
    idx = jnp.asarray(np.stack([_idx(c, n_max, seed=c) for c in counts]))
    count = jnp.asarray(counts, jnp.int32)
    keys = jax.random.split(jax.random.key(3), len(counts))
    lr = jnp.asarray(0.1, jnp.float32)

    def new(i, c, k):
        return local_train(LOSS, opt, spec, p0, opt.init(p0), x, y, i, c, k, jnp.asarray(0), lr,
                           gather_once=gather_once)

    def old(i, c, k):
        return _masked_scan(spec, opt, p0, opt.init(p0), x, y, i, c, k, lr)

    for i, c, k in zip(idx, count, keys, strict=True):
        got, want = jax.jit(new)(i, c, k), jax.jit(old)(i, c, k)
        jax.tree.map(np.testing.assert_array_equal, got, want)
    got, want = jax.jit(jax.vmap(new))(idx, count, keys), jax.jit(jax.vmap(old))(idx, count, keys)
    jax.tree.map(np.testing.assert_array_equal, got, want)
