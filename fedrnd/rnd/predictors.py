"""Probe rows and predictor training: every client's predictor in one jitted program."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedrnd.data.federated import FederatedData
from fedrnd.engine import (
    ClientHParams,
    ClientMapper,
    ClientOptimizer,
    Engine,
    LocalSpec,
    progress,
)
from fedrnd.rnd.config import PROBES, RNDConfig
from fedrnd.rnd.networks import RNDPair

PyTree = Any

# --------------------------------------------------------------------------------------------
# probes and predictor training
# --------------------------------------------------------------------------------------------


def _shuffle_valid(idx: np.ndarray, count: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each row's first ``count`` entries in a random order, padding after them."""
    j = np.arange(idx.shape[1])
    u = np.where(j[None, :] < count[:, None], rng.random(idx.shape), np.inf)
    return np.take_along_axis(idx, np.argsort(u, axis=1, kind="stable"), axis=1)


def _check_clients(data: FederatedData, probe: str) -> None:
    tc = np.asarray(data.train_count)
    empty = np.flatnonzero(tc < 1)
    if empty.size:
        raise ValueError(f"client(s) {empty[:10].tolist()} have no training examples (empty "
                         "client); RND discovery needs inputs on every client")
    if probe == "test":
        te = np.flatnonzero(np.asarray(data.test_count) < 1)
        if te.size:
            raise ValueError(f"probe='test' but client(s) {te[:10].tolist()} have no test "
                             "examples; use probe='train' or 'holdout'")
    if probe == "holdout":
        small = np.flatnonzero(tc < 2)
        if small.size:
            raise ValueError(f"probe='holdout' needs >= 2 training examples per client; "
                             f"client(s) {small[:10].tolist()} have 1 (use probe='train')")


def probe_split(data: FederatedData, probe: str = "train", *, holdout: float = 0.25,
                cap: int | None = None, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows each client trains its predictor on and rows it scores predictors on.

    Returns ``(train_idx [C, N], train_count [C], probe_idx [C, M], probe_count [C])`` (pool
    rows, valid up to the counts). ``probe="train"``: both are the client's training rows;
    ``"holdout"``: a random ``max(1, round(holdout * n_c))`` of them are held out to probe and
    the rest train (at least one each); ``"test"``: probe on the test split. ``cap`` keeps a
    seeded random subset of at most ``cap`` probe rows per client (``M = min(cap, max count)``).
    """
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {list(PROBES)}, got {probe!r}")
    _check_clients(data, probe)
    rng = np.random.default_rng(seed)
    tr_idx = np.asarray(data.train_idx)
    tr_cnt = np.asarray(data.train_count).astype(np.int64)
    if probe == "train":
        pr_idx, pr_cnt = _shuffle_valid(tr_idx, tr_cnt, rng), tr_cnt.copy()
    elif probe == "test":
        te_cnt = np.asarray(data.test_count).astype(np.int64)
        pr_idx, pr_cnt = _shuffle_valid(np.asarray(data.test_idx), te_cnt, rng), te_cnt
    else:
        shuffled = _shuffle_valid(tr_idx, tr_cnt, rng)
        h = np.clip(np.rint(holdout * tr_cnt), 1, tr_cnt - 1).astype(np.int64)
        keep = tr_cnt - h
        j = np.arange(tr_idx.shape[1])
        # Train on the first ``keep`` shuffled rows, probe on the next ``h``.
        src = np.minimum(j[None, :] + keep[:, None], tr_idx.shape[1] - 1)
        pr_idx = np.where(j[None, :] < h[:, None], np.take_along_axis(shuffled, src, 1), 0)
        tr_idx = np.where(j[None, :] < keep[:, None], shuffled, 0)
        tr_cnt, pr_cnt = keep, h
    if cap is not None:
        if cap < 1:
            raise ValueError(f"probe cap must be >= 1, got {cap}")
        # Rows are already in a random order, so the first ``cap`` are a random subset.
        pr_cnt = np.minimum(pr_cnt, cap)
    m = max(1, int(pr_cnt.max()))
    pr_idx = np.where(np.arange(pr_idx.shape[1])[None, :] < pr_cnt[:, None], pr_idx, 0)[:, :m]
    return (tr_idx.astype(np.int32), tr_cnt.astype(np.int32), pr_idx.astype(np.int32),
            pr_cnt.astype(np.int32))


@dataclasses.dataclass(frozen=True)
class FeatureMSE:
    """RND loss for ``local_train``: ``y`` holds the cached target outputs ``[B, out_dim]``.

    Masked mean over examples of the squared error summed over output dimensions (the same
    per-example quantity as the novelty score). Hashable, so an :class:`Engine` holding it is
    a valid static argument.
    """

    apply: Callable[[PyTree, jax.Array], jax.Array]

    def __call__(self, params, x, y, mask):
        err = jnp.sum((self.apply(params, x) - y) ** 2, axis=-1)
        return jnp.sum(err * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@functools.partial(jax.jit, static_argnums=(0,))
def _train_program(engine: Engine, init, client_init, data, hp, key, ids=None):
    if ids is not None and client_init is not None:
        client_init = jax.tree.map(lambda a: a[ids], client_init)
    p, _, m = engine.train(init, data, hp, key, jnp.zeros((), jnp.int32), ids=ids,
                           client_params=client_init)
    return p, m["loss"]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _full_batch_program(apply, engine: Engine, init, client_init, x, targets, idx, count, lr,
                        ids=None):
    """Every client's predictor trained on all of its rows at every step (full batch).

    The same updates as ``engine.train`` when the batch holds a client's whole training set:
    each step's loss is the masked mean over all of the client's rows, so the engine's per-step
    shuffle changes only the order of a sum. Here the rows are gathered once per client
    instead of once per step, and no batch plan is drawn: about 2x fewer CPU seconds for the
    MLP pair (``benchmarks/RESULTS.md``).
    """
    if ids is not None:
        idx, count = idx[ids], count[ids]
        if client_init is not None:
            client_init = jax.tree.map(lambda a: a[ids], client_init)
    opt, steps = engine.optimizer, engine.local.total_steps(int(idx.shape[1]))
    n_max = idx.shape[1]
    per = {"idx": idx, "count": count}
    if client_init is not None:
        per["params"] = client_init

    def one(client, shared):
        p0, x_pool, t_pool = shared
        p = client.get("params", p0)
        xb, tb = x_pool[client["idx"]], t_pool[client["idx"]]
        mask = (jnp.arange(n_max) < client["count"]).astype(xb.dtype)
        grad = jax.value_and_grad(lambda q: FeatureMSE(apply)(q, xb, tb, mask))
        kind = jnp.zeros((), jnp.int32)

        def step(carry, _):
            w, s = carry
            loss, g = grad(w)
            u, s = opt.update(g, s, w, kind, lr)
            return (optax.apply_updates(w, u), s), loss

        (p, _), losses = jax.lax.scan(step, (p, opt.init(p)), None, length=steps)
        return p, jnp.mean(losses)

    return engine.mapper.map(one, per, (None if client_init is not None else init, x,
                                        targets))


def _full_batch(engine: Engine, n_max: int) -> bool:
    """Whether every step of ``engine``'s schedule sees a client's whole training set."""
    return engine.local.batch_size >= n_max


def predictor_engine(pair: RNDPair, cfg: RNDConfig, mapper: ClientMapper | None = None,
                     max_count: int | None = None) -> Engine:
    """The engine that trains predictors: Adam, ``cfg``'s schedule (with ``min_steps`` applied
    for clients of at most ``max_count`` examples when given), the RND feature loss."""
    spec = (LocalSpec(cfg.batch_size, cfg.epochs, cfg.steps) if max_count is None
            else cfg.schedule(max_count))
    return Engine(pair.predictor, spec,
                  ClientOptimizer(("adam",)), mapper or ClientMapper(),
                  loss=FeatureMSE(pair.predictor.apply))


def train_predictors(pair: RNDPair, cfg: RNDConfig, x: jax.Array, targets: jax.Array,
                     train_idx: jax.Array, train_count: jax.Array, key: jax.Array,
                     mapper: ClientMapper | None = None) -> tuple[PyTree, jax.Array]:
    """Train every client's predictor in one jitted program.

    With progress shown (:mod:`fedrnd.engine.progress`) the program runs over a few blocks of
    clients from the host, counted as each block finishes; client ``i``'s key is
    ``fold_in(key, i)`` whatever block it is in, so the predictors are bit-identical.

    Args:
      x: pool ``[P, *feature_shape]``; targets: cached target outputs ``[P, out_dim]``.
      train_idx, train_count: ``[C, N]``, ``[C]`` rows each client trains on.
    Returns:
      ``(predictors, loss)``: leaves ``[C, ...]`` and the mean training loss per client ``[C]``.
    """
    c = int(train_idx.shape[0])
    if targets.shape[0] != x.shape[0]:
        raise ValueError(f"target outputs have {targets.shape[0]} rows but the pool has "
                         f"{x.shape[0]}")
    engine = predictor_engine(pair, cfg, mapper, int(train_idx.shape[1]))
    k_init, k_train = jax.random.split(key)
    init = pair.predictor.init(k_init)
    client_init = None
    if cfg.per_client_init:
        client_init = jax.vmap(pair.predictor.init)(jax.random.split(k_init, c))
    # The pool's "labels" are the target outputs: local_train gathers y rows like x rows.
    z = jnp.zeros((c, 1), jnp.int32)
    data = FederatedData(x=x, y=targets, train_idx=jnp.asarray(train_idx),
                         train_count=jnp.asarray(train_count), test_idx=z,
                         test_count=z[:, 0], group=z[:, 0])
    hp = ClientHParams(jnp.zeros(c, jnp.int32), jnp.full(c, cfg.lr, jnp.float32),
                       jnp.zeros(c, jnp.float32))
    n_max = int(train_idx.shape[1])
    if _full_batch(engine, n_max):
        lr = jnp.float32(cfg.lr)

        def program(ids=None):
            return _full_batch_program(pair.predictor.apply, engine, init, client_init, x,
                                       targets, data.train_idx, data.train_count, lr, ids)
    else:
        def program(ids=None):
            return _train_program(engine, init, client_init, data, hp, k_train, ids)
    # The low-rank path batches clients in blocks of its own (never taken with Adam).
    if progress.get_mode() == "off" or engine.use_lowrank(data, materialize=1):
        return program()
    # A training step on one example costs about three predictor evaluations (back and forth).
    work = 3 * engine.local.total_steps(n_max) * min(engine.local.batch_size, n_max)
    m = engine.mapper
    plan = progress.blocks(c, chunk=m.chunk, shards=m.num_shards, work=work)

    def block(b: progress.Block):
        if b.size == c:  # one block: the program as without progress
            return program()
        # Padding slots train a copy of the last client; their results are dropped.
        return program(np.minimum(np.arange(b.lo, b.lo + b.size), c - 1).astype(np.int32))

    return progress.run_blocks(block, plan, c, f"rnd: training {c} predictors", c, "predictor",
                               compile_note="rnd: compiling predictor training ...")


