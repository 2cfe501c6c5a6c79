"""RND fast paths: stacked predictor errors against numpy forward passes, the matrix-product
conv predictor against the flax module (values and gradients), the fused novelty matrix and fused
edge scores against the generic per-predictor path, and discovery through both paths."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrnd.data import build_federated, digits, feature_pattern
from fedrnd.engine import EdgeList
from fedrnd.models import from_flax
from fedrnd.rnd import (
    RNDConfig,
    RNDConv,
    conv_apply,
    discover,
    edge_novelty,
    make_pair,
    novelty_matrix,
    probe_split,
    stacked_errors,
    target_features,
    train_predictors,
)
from tests.rnd._data import grouped_gaussian, shuffled_groups
from tests.rnd.test_discovery import np_mlp
from tests.rnd.test_networks import torch_adaptive_avg_pool2d


def np_conv(params, x, pool=4):
    """Plain numpy forward of the RND conv network: loops over the 3x3 window offsets."""
    h = np.asarray(x, np.float64)
    names = sorted((k for k in params if k.startswith("Conv_")), key=lambda s: int(s[5:]))
    for i, name in enumerate(names):
        k = np.asarray(params[name]["kernel"], np.float64)  # [3, 3, Ci, Co]
        b, hh, ww, _ = h.shape
        hp = np.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
        out = np.zeros((b, hh, ww, k.shape[-1])) + np.asarray(params[name]["bias"])
        for dy in range(3):
            for dx in range(3):
                out += hp[:, dy:dy + hh, dx:dx + ww] @ k[dy, dx]
        h = np.maximum(out, 0.0)
        if i == 0:  # 2x2 max pool, floor
            h2, w2 = h.shape[1] // 2, h.shape[2] // 2
            h = h[:, :2 * h2, :2 * w2].reshape(b, h2, 2, w2, 2, -1).max(axis=(2, 4))
    h = torch_adaptive_avg_pool2d(h, (pool, pool)).reshape(len(h), -1)
    d = params["Dense_0"]
    return h @ np.asarray(d["kernel"], np.float64) + np.asarray(d["bias"])


def _perturbed(pair, k, seed=0, scale=0.1):
    """``k`` distinct predictors (leaves ``[k, ...]``) with non-zero biases."""
    p = jax.vmap(pair.predictor.init)(jax.random.split(jax.random.key(seed), k))
    leaves, tree = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [a + scale * jax.random.normal(kk, a.shape)
                                     for a, kk in zip(leaves, keys, strict=True)])


CASES = [
    ("mlp", (10,), (8,)),
    ("mlp", (4, 4, 1), (6, 5)),
    ("mlp", (3,), (2, 3, 4)),
    ("conv", (28, 28, 1), (2, 4)),
    ("conv", (7, 7, 2), (2, 3, 2)),
    ("conv", (13, 9, 3), (3,)),
    ("conv", (5, 6, 1), (2, 4)),
]


@pytest.mark.parametrize("kind,shape,width", CASES)
def test_stacked_errors_equal_numpy_forward_passes(kind, shape, width):
    pair = make_pair(kind, shape, predictor_width=width,
                     target_width=(4, 8) if kind == "conv" else (16,), out_dim=8)
    k, n = 5, 6
    preds = _perturbed(pair, k)
    x = jax.random.uniform(jax.random.key(2), (n, *shape))
    t = jax.random.normal(jax.random.key(3), (n, 8))
    got = np.asarray(jax.jit(stacked_errors, static_argnums=0)(pair, preds, x, t))
    assert got.shape == (k, n)
    fwd = np_conv if kind == "conv" else np_mlp
    for j in range(k):
        pj = jax.tree.map(lambda a, j=j: np.asarray(a[j]), preds)
        ref = np.sum((fwd(pj, np.asarray(x)) - np.asarray(t, np.float64)) ** 2, axis=1)
        np.testing.assert_allclose(got[j], ref, rtol=2e-5, atol=1e-6)


# Widths up to 64 take the banded-matrix convolution, wider images im2col; (8, 16) channels
# build the banded matrix by an einsum instead of the constant-map product.
@pytest.mark.parametrize("shape,width", [((28, 28, 1), (2, 4)), ((7, 9, 2), (3, 2, 2)),
                                         ((4, 4, 3), (2,)), ((5, 70, 2), (2, 3)),
                                         ((12, 11, 2), (8, 16))])
def test_conv_predictor_equals_flax_module(shape, width):
    pair = make_pair("conv", shape, predictor_width=width, target_width=(4, 8), out_dim=8)
    module = from_flax(RNDConv(width, 8), shape, 8)
    p = jax.tree.map(lambda a: a[0], _perturbed(pair, 1, seed=4))
    x = jax.random.uniform(jax.random.key(5), (3, *shape))
    assert pair.predictor.apply.func is conv_apply
    np.testing.assert_allclose(np.asarray(jax.jit(pair.predictor.apply)(p, x)),
                               np.asarray(jax.jit(module.apply)(p, x)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.jit(conv_apply)(p, x)),
                               np_conv(jax.tree.map(np.asarray, p), np.asarray(x)),
                               rtol=1e-5, atol=1e-6)
    # Training differentiates it: the gradients agree with the flax module's too.
    t = jax.random.normal(jax.random.key(6), (3, 8))

    def grads(apply):
        return jax.jit(jax.grad(lambda q: jnp.sum((apply(q, x) - t) ** 2)))(p)

    for a, b in zip(jax.tree.leaves(grads(pair.predictor.apply)),
                    jax.tree.leaves(grads(module.apply)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def _ragged_setup(kind):
    """9 ragged clients (3 groups) with trained small predictors of ``kind``."""
    if kind == "mlp":
        data = grouped_gaussian([0, 1, 0, 2, 1, 0, 2, 2, 1], n=12, n_test=4, dim=3, seed=5)
        cfg = RNDConfig(network="mlp", target_width=(16,), predictor_width=(4,), out_dim=8,
                        epochs=2, batch_size=8)
    else:
        d = digits()
        data = build_federated(d, feature_pattern(d, 9, num_groups=3, seed=0, rms=0.5))
        cfg = RNDConfig(network="conv", target_width=(4, 8), predictor_width=(2, 4),
                        out_dim=8, epochs=2, batch_size=32)
    data = data.replace(train_count=jnp.minimum(data.train_count,
                                                jnp.arange(5, 14, dtype=jnp.int32)))
    pair = cfg.pair(data.feature_shape)
    t_pool = target_features(pair, pair.target_params(0), data.x)
    tr_idx, tr_cnt, pr_idx, pr_cnt = probe_split(data, "train", seed=1)
    preds, _ = train_predictors(pair, cfg, data.x, t_pool, tr_idx, tr_cnt, jax.random.key(0))
    return pair, preds, data.x, t_pool, pr_idx, pr_cnt


@pytest.fixture(scope="module", params=["mlp", "conv"])
def ragged(request):
    return _ragged_setup(request.param)


@pytest.mark.parametrize("row_tile,col_tile", [(None, 64), (2, 4), (4, 3), (9, 9), (1, 1)])
def test_fused_matrix_equals_generic_path(ragged, row_tile, col_tile):
    pair, preds, x, t, idx, cnt = ragged
    generic = np.asarray(novelty_matrix(pair.predictor.apply, preds, x, t, idx, cnt,
                                        row_tile=9, col_tile=9))
    fused = np.asarray(novelty_matrix(pair, preds, x, t, idx, cnt, row_tile=row_tile,
                                      col_tile=col_tile))
    assert fused.shape == (9, 9)
    np.testing.assert_allclose(fused, generic, rtol=2e-5, atol=1e-7)
    assert np.ptp(generic) > 1e-3  # trained predictors: the entries differ
    # Rows of other clients (newcomers score existing predictors): R != C.
    rows = np.asarray(novelty_matrix(pair, preds, x, t, idx[[4, 0, 8]], cnt[[4, 0, 8]],
                                     row_tile=row_tile, col_tile=col_tile))
    np.testing.assert_allclose(rows, generic[[4, 0, 8]], rtol=2e-5, atol=1e-7)


def test_fused_tile_budget_bounds_the_tile(ragged):
    pair, preds, x, t, idx, cnt = ragged
    whole = np.asarray(novelty_matrix(pair, preds, x, t, idx, cnt))
    # A budget of 10 evaluations: col_tile drops to 10 // M predictors, one row per tile.
    tiny = np.asarray(novelty_matrix(pair, preds, x, t, idx[:, :5], np.minimum(cnt, 5),
                                     tile_evals=10))
    ref = np.asarray(novelty_matrix(pair.predictor.apply, preds, x, t, idx[:, :5],
                                    np.minimum(cnt, 5)))
    np.testing.assert_allclose(tiny, ref, rtol=2e-5, atol=1e-7)
    assert np.max(np.abs(tiny - whole)) > 1e-4  # five probes are not all of them


def test_fused_edges_equal_dense_entries_with_skewed_degrees(ragged):
    pair, preds, x, t, idx, cnt = ragged
    dense = np.asarray(novelty_matrix(pair.predictor.apply, preds, x, t, idx, cnt))
    rng = np.random.default_rng(0)
    # Client 0 scores everyone (a hub), 1-6 score one or two peers, 7 and 8 score nobody; an
    # edge listed twice and a self-loop are scored like any other pair; the order is random.
    pairs = [(j, 0) for j in range(9)] + [(2, 1), (3, 2), (4, 2), (0, 3), (8, 4), (8, 5),
                                          (1, 6), (5, 6), (5, 6)]
    pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    src = np.array([p[0] for p in pairs], np.int32)
    dst = np.array([p[1] for p in pairs], np.int32)
    edges = EdgeList(jnp.asarray(src), jnp.asarray(dst), jnp.ones(len(src)))
    for chunk in (1024, 3, 1):
        got = np.asarray(edge_novelty(pair, preds, x, t, idx, cnt, edges, edge_chunk=chunk))
        np.testing.assert_allclose(got, dense[dst, src], rtol=2e-5, atol=1e-7)
    generic = np.asarray(edge_novelty(pair.predictor.apply, preds, x, t, idx, cnt, edges))
    np.testing.assert_allclose(generic, dense[dst, src], rtol=2e-5, atol=1e-7)


def test_discovery_fused_and_generic_agree():
    groups = shuffled_groups([6, 4, 3], seed=3)
    data = grouped_gaussian(groups, seed=3, shift_seed=3)
    fast = discover(data, RNDConfig(network="mlp"))
    ref = discover(data, RNDConfig(network="mlp", fused=False))
    np.testing.assert_allclose(fast.scores, ref.scores, rtol=2e-5)
    np.testing.assert_array_equal(fast.federation, ref.federation)
    assert fast.num_federations == 3
    assert set(fast.timings) == {"split", "target", "train", "self", "scores", "federations"}
    assert set(fast.cpu_timings) == set(fast.timings)
    assert all(v >= 0 for v in fast.timings.values())
    # Sparse mode through both paths: a ring plus chords, both directions.
    c = len(groups)
    a = np.concatenate([np.arange(c), np.arange(c)])
    b = np.concatenate([(np.arange(c) + 1) % c, (np.arange(c) + 5) % c])
    ring = EdgeList(jnp.asarray(np.concatenate([a, b])), jnp.asarray(np.concatenate([b, a])),
                    jnp.ones(4 * c))
    fs = discover(data, RNDConfig(network="mlp"), edges=ring)
    gs = discover(data, RNDConfig(network="mlp", fused=False), edges=ring)
    np.testing.assert_allclose(fs.edge_scores, gs.edge_scores, rtol=2e-5)
    np.testing.assert_array_equal(fs.federation, gs.federation)
    e_src, e_dst = np.asarray(fs.edges.src), np.asarray(fs.edges.dst)
    np.testing.assert_allclose(fs.edge_scores, fast.scores[e_dst, e_src], rtol=2e-5)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("per_client_init", [False, True])
def test_full_batch_training_equals_the_engine_path(kind, per_client_init, monkeypatch):
    """The full-batch predictor trainer (rows gathered once per client) against the engine's
    general path on ragged clients: the same updates up to the order of a sum, so equal to
    float rounding; and a progress run over blocks of clients gives the same bits."""
    from fedrnd.engine import ClientHParams, progress
    from fedrnd.rnd.predictors import _full_batch, _train_program, predictor_engine

    pair, _, x, t_pool, _, _ = _ragged_setup(kind)
    cfg = RNDConfig(network=kind, target_width=(16,) if kind == "mlp" else (4, 8),
                    predictor_width=(4,) if kind == "mlp" else (2, 4), out_dim=8, steps=12,
                    batch_size=64, per_client_init=per_client_init)
    c = 9
    tr_cnt = np.arange(5, 5 + c, dtype=np.int32)
    tr_idx = (np.arange(c)[:, None] * 20 + np.arange(16)[None, :]).astype(np.int32)
    tr_idx = np.where(np.arange(16)[None, :] < tr_cnt[:, None], tr_idx, 0)
    key = jax.random.key(3)
    engine = predictor_engine(pair, cfg, max_count=16)
    assert _full_batch(engine, 16)
    with progress.mode("off"):
        got, loss = train_predictors(pair, cfg, x, t_pool, tr_idx, tr_cnt, key)
    # The engine's general path (shuffled full batches drawn every step).
    k_init, k_train = jax.random.split(key)
    init = pair.predictor.init(k_init)
    client_init = (jax.vmap(pair.predictor.init)(jax.random.split(k_init, c))
                   if per_client_init else None)
    z = jnp.zeros((c, 1), jnp.int32)
    from fedrnd.data import FederatedData
    data = FederatedData(x=x, y=t_pool, train_idx=jnp.asarray(tr_idx),
                         train_count=jnp.asarray(tr_cnt), test_idx=z, test_count=z[:, 0],
                         group=z[:, 0])
    hp = ClientHParams(jnp.zeros(c, jnp.int32), jnp.full(c, cfg.lr, jnp.float32),
                       jnp.zeros(c, jnp.float32))
    want, want_loss = _train_program(engine, init, client_init, data, hp, k_train)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(np.asarray(loss), np.asarray(want_loss), rtol=1e-4)
    # Blocks of clients (progress on) give the same bits as one program.
    monkeypatch.setattr(progress, "MIN_BLOCK_WORK", 0)
    assert len(progress.blocks(c, work=1.0)) > 1
    with progress.mode("log"):
        blocked, _ = train_predictors(pair, cfg, x, t_pool, tr_idx, tr_cnt, key)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(blocked), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
