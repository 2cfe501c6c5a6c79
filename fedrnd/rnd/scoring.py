"""Novelty scores: the dense matrix, the self-novelty and the edge scores (sparse mode).

With progress shown (:mod:`fedrnd.engine.progress`) the scoring programs run over a few host
blocks of tiles, rows or edge rows (:func:`~fedrnd.engine.progress.blocks`), counted as each
finishes; every score is computed alone in its loop step either way, so they are bit-identical.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedrnd.engine import (
    ClientMapper,
    EdgeList,
    progress,
)
from fedrnd.rnd.networks import RNDPair, stacked_errors

PyTree = Any

# --------------------------------------------------------------------------------------------
# novelty
# --------------------------------------------------------------------------------------------


def _probe_batch(x_pool, t_pool, idx, count):
    mask = (jnp.arange(idx.shape[0]) < count).astype(jnp.float32)
    return x_pool[idx], t_pool[idx], mask, jnp.maximum(count, 1).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _novelty_rows(apply, mapper: ClientMapper, col_tile: int, preds, x_pool, t_pool,
                  probe_idx, probe_count, self_err):
    n_pred = jax.tree.leaves(preds)[0].shape[0]

    def row(client, shared):
        ps, xp, tp = shared
        x, t, mask, n = _probe_batch(xp, tp, client["idx"], client["count"])

        def score(p):
            err = jnp.sum((apply(p, x) - t) ** 2, axis=-1)
            d = err - client["e"]
            return jnp.sum(err * mask) / n, jnp.sum(d * d * mask) / n

        return jax.lax.map(score, ps, batch_size=min(col_tile, n_pred))

    return mapper.map(row, {"idx": probe_idx, "count": probe_count, "e": self_err},
                      (preds, x_pool, t_pool))


def _check_probe(preds, x_pool, t_pool, probe_idx, probe_count, rows: int | None = None):
    c = jax.tree.leaves(preds)[0].shape[0]
    if t_pool.shape[0] != x_pool.shape[0]:
        raise ValueError(f"target outputs have {t_pool.shape[0]} rows but the pool has "
                         f"{x_pool.shape[0]}")
    if probe_idx.ndim != 2 or probe_count.shape != (probe_idx.shape[0],):
        raise ValueError(f"probe_idx must be [C, M] and probe_count [C], got "
                         f"{probe_idx.shape} and {probe_count.shape}")
    if rows is not None and probe_idx.shape[0] != rows:
        raise ValueError(f"{c} predictors but probes for {probe_idx.shape[0]} clients; "
                         "they must match")
    if np.any(np.asarray(probe_count) < 1):
        bad = np.flatnonzero(np.asarray(probe_count) < 1)[:10].tolist()
        raise ValueError(f"client(s) {bad} have no probe examples (empty client)")


def novelty_matrix(apply: Callable | RNDPair, preds: PyTree, x_pool: jax.Array,
                   t_pool: jax.Array, probe_idx: jax.Array, probe_count: jax.Array, *,
                   row_tile: int | None = None, col_tile: int = 64,
                   mapper: ClientMapper | None = None, tile_evals: int = 1 << 18) -> jax.Array:
    """Cross novelty ``S [R, C]``: ``S[i, j] = mean_{x in probe_i} ||f_j(x) - f(x)||^2``.

    Args:
      apply: the :class:`~fedrnd.rnd.networks.RNDPair` (fused path: a tile's predictors run
        together on the tile's probes, :func:`~fedrnd.rnd.networks.stacked_errors`), or any
        predictor ``apply(params, x [B, ...]) -> [B, out_dim]`` (generic path: the engine's
        client map over rows, a vmap over predictors).
      preds: predictors, leaves ``[C, ...]``.
      x_pool: ``[P, ...]``; t_pool: cached target outputs ``[P, out_dim]``.
      probe_idx, probe_count: ``[R, M]``, ``[R]`` pool rows each scoring client probes on
        (``R = C`` for the square matrix; newcomers score existing predictors with ``R != C``).
      row_tile: scoring clients per tile. ``None``: generic path: the mapper's chunk, capped at
        ``tile_evals // (col_tile * M)`` (an accelerator's default chunk of 256 clients times
        64 predictors times hundreds of probes would not fit); fused path: as many as fit
        ``tile_evals`` evaluations, on a CPU at most ``FUSED_TILE_EVALS[kind]``.
      col_tile: predictors applied at once (the fused path lowers it when ``col_tile * M``
        exceeds that budget). Live memory is about ``row_tile * col_tile * M`` predictor
        activations.
    """
    zeros = jnp.zeros(np.shape(probe_idx), jnp.float32)
    return _matrix(apply, preds, x_pool, t_pool, probe_idx, probe_count, zeros,
                   row_tile=row_tile, col_tile=col_tile, mapper=mapper,
                   tile_evals=tile_evals)[0]


def paired_matrix(apply: Callable | RNDPair, preds: PyTree, x_pool: jax.Array,
                  t_pool: jax.Array, probe_idx: jax.Array, probe_count: jax.Array,
                  self_err: jax.Array, *, row_tile: int | None = None, col_tile: int = 64,
                  mapper: ClientMapper | None = None, tile_evals: int = 1 << 18
                  ) -> tuple[jax.Array, jax.Array]:
    """The novelty matrix and the second moment of the paired differences, in one pass.

    Returns ``(S, Q)``, both ``[R, C]``: ``S[i, j] = mean_x e_j(x)`` and
    ``Q[i, j] = mean_x (e_j(x) - e_i(x))^2`` over client ``i``'s probes ``x``, where ``e_j(x)``
    is predictor ``j``'s squared error on ``x`` and ``e_i(x) = self_err[i]`` (``[R, M]``, from
    :func:`self_errors`: row ``i``'s own predictor on the same probes). With ``S[i, i]`` the
    mean of ``e_i``, the mean paired difference is ``S[i, j] - S[i, i]`` and its variance
    ``Q - (S[i, j] - S[i, i])^2``: everything a paired test needs (:mod:`fedrnd.rnd.stats`),
    without keeping ``R x C x M`` per-example errors. Arguments as for :func:`novelty_matrix`.
    """
    if np.shape(self_err) != np.shape(probe_idx):
        raise ValueError(f"self_err must be [R, M] like probe_idx {np.shape(probe_idx)}, got "
                         f"{np.shape(self_err)}")
    return _matrix(apply, preds, x_pool, t_pool, probe_idx, probe_count,
                   jnp.asarray(self_err, jnp.float32), row_tile=row_tile, col_tile=col_tile,
                   mapper=mapper, tile_evals=tile_evals)


def _matrix(apply, preds, x_pool, t_pool, probe_idx, probe_count, self_err, *, row_tile,
            col_tile, mapper, tile_evals):
    _check_probe(preds, x_pool, t_pool, probe_idx, probe_count)
    mapper = mapper or ClientMapper()
    if isinstance(apply, RNDPair):
        return _fused_matrix(apply, preds, x_pool, t_pool, probe_idx, probe_count, self_err,
                             row_tile=row_tile, col_tile=col_tile, mapper=mapper,
                             tile_evals=tile_evals)
    if row_tile is None:
        m = int(np.shape(probe_idx)[1])
        row_tile = max(1, min(mapper.chunk, int(tile_evals) // max(1, int(col_tile) * m)))
    mapper = dataclasses.replace(mapper, chunk_size=int(row_tile))
    x_pool, t_pool = jnp.asarray(x_pool), jnp.asarray(t_pool)
    rows, c = int(np.shape(probe_idx)[0]), jax.tree.leaves(preds)[0].shape[0]
    plan = _plan(rows, mapper, c * int(np.shape(probe_idx)[1]))
    n = plan[-1].lo + plan[-1].size
    idx, cnt = jnp.asarray(probe_idx, jnp.int32), jnp.asarray(probe_count, jnp.int32)
    if n > rows:
        # Padding rows (host blocks only) probe the first pool row once and are dropped.
        idx = jnp.asarray(_pad_rows(np.asarray(idx), n, 0))
        cnt = jnp.asarray(_pad_rows(np.asarray(cnt), n, 1))
        self_err = jnp.concatenate([self_err, jnp.zeros((n - rows, self_err.shape[1]),
                                                        self_err.dtype)])

    def block(lo: int, hi: int):
        return _novelty_rows(apply, mapper, int(col_tile), preds, x_pool, t_pool,
                             _part(idx, lo, hi), _part(cnt, lo, hi), _part(self_err, lo, hi))

    return _run_rows(block, plan, n, rows, c)


FUSED_TILE_EVALS = {"mlp": 1 << 16, "conv": 1 << 11}
"""Predictor evaluations per fused tile by network kind (``row_tile * col_tile * M``).

Measured on a 2-core CPU (``benchmarks/RESULTS.md``): the MLP pair ran 200-250 GFLOP per CPU
second for tiles of 256-4096 probe rows x 64 predictors; the conv pair's activations are 25x
larger per evaluation (``H x W x c1`` after the first convolution) and it ran best, about 250k
evaluations per CPU second, with 256-1024 evaluations per tile and fell to 190k at 4096.
These caps apply on a CPU; other backends use ``tile_evals`` alone (not yet measured).
"""


def _fused_budget(kind: str, tile_evals: int) -> int:
    cap = FUSED_TILE_EVALS[kind] if jax.default_backend() == "cpu" else tile_evals
    return max(1, min(int(tile_evals), cap))


def _pad_rows(a: np.ndarray, n: int, fill) -> np.ndarray:
    if n == a.shape[0]:
        return a
    pad = np.full((n - a.shape[0], *a.shape[1:]), fill, a.dtype)
    return np.concatenate([a, pad])


def _plan(n: int, mapper: ClientMapper, work: float) -> list[progress.Block]:
    """Host blocks of ``n`` mapped items of ``work`` predictor evaluations each when progress
    is shown, else one block."""
    if progress.get_mode() == "off":
        return [progress.Block(0, n, n)]
    return progress.blocks(n, chunk=mapper.chunk, shards=mapper.num_shards, work=work)


def _part(a, lo: int, hi: int):
    """Rows ``[lo, hi)`` of ``a``; ``a`` itself when that is all of it (no copy)."""
    return a if lo == 0 and hi == a.shape[0] else a[lo:hi]


def _run_rows(call, plan: list[progress.Block], n: int, rows: int, cols: int, per: int = 1
              ) -> tuple[jax.Array, ...]:
    """``call(lo, hi)`` over the blocks of ``plan``, joined on the first axis: ``n`` mapped
    items (rows, or tiles of ``per`` rows) of which ``rows`` scoring rows are real; progress
    off: one plain call (``n`` items, no padding)."""
    if progress.get_mode() == "off":
        return call(0, n)

    def block(b: progress.Block):
        return call(b.lo, b.lo + b.size)

    last = plan[-1].hi  # the items before host-block padding
    return progress.run_blocks(
        block, plan, last, f"rnd: scoring {rows}x{cols} pairs", rows, "row",
        count=lambda b: min(b.hi * per, rows) - min(b.lo * per, rows),
        compile_note="rnd: compiling scoring ...")


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _fused_rows(pair: RNDPair, mapper: ClientMapper, k: int, preds, x_pool, t_pool, idx, count,
                self_err):
    c = jax.tree.leaves(preds)[0].shape[0]
    n_cols = -(-c // k)
    # Predictor tiles are slices [s, s + k) of preds, not a padded copy of them (1 GB for
    # 10,000 MLP predictors): the last tile starts at c - k and overlaps the one before it.
    starts = jnp.minimum(jnp.arange(n_cols) * k, c - k)

    def tile(rows, shared):
        ps, xp, tp = shared
        r, m = rows["idx"].shape
        flat = rows["idx"].reshape(-1)
        x, t = xp[flat], tp[flat]
        mask = (jnp.arange(m)[None, :] < rows["count"][:, None]).astype(jnp.float32)
        n = jnp.maximum(rows["count"], 1).astype(jnp.float32)

        def col(s):
            p = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, s, k), ps)
            err = stacked_errors(pair, p, x, t).reshape(k, r, m)  # [K, R, M]
            d = err - rows["e"]
            return (jnp.sum(err * mask, axis=-1) / n,  # [K, R]
                    jnp.sum(d * d * mask, axis=-1) / n)

        out = jax.lax.map(col, starts)  # [T, K, R] twice
        j = jnp.arange(c)
        tj = jnp.minimum(j // k, n_cols - 1)
        return tuple(o[tj, j - starts[tj]].T for o in out)  # [R, C] twice

    return mapper.map(tile, {"idx": idx, "count": count, "e": self_err},
                      (preds, x_pool, t_pool))


def _fused_matrix(pair: RNDPair, preds, x_pool, t_pool, probe_idx, probe_count, self_err, *,
                  row_tile, col_tile, mapper, tile_evals):
    c = jax.tree.leaves(preds)[0].shape[0]
    rows, m = (int(v) for v in np.shape(probe_idx))
    budget = _fused_budget(pair.kind, tile_evals)
    k = max(1, min(int(col_tile), c, budget // m))
    if row_tile is None:
        row_tile = max(1, budget // (k * m))
    r = max(1, min(int(row_tile), rows))
    # Tiles of r rows; their count divisible by the mapper's devices. Padding rows probe the
    # first pool row once and are dropped.
    n_tiles = -(-rows // r)
    n_tiles += (-n_tiles) % mapper.num_shards
    one = dataclasses.replace(mapper, chunk_size=1)
    plan = _plan(n_tiles, one, r * m * c)
    n_tiles = max(n_tiles, plan[-1].lo + plan[-1].size)  # host blocks may pad whole tiles
    idx = _pad_rows(np.asarray(probe_idx, np.int32), n_tiles * r, 0)
    cnt = _pad_rows(np.asarray(probe_count, np.int32), n_tiles * r, 1)
    err = jnp.asarray(self_err, jnp.float32)
    if n_tiles * r > rows:
        err = jnp.concatenate([err, jnp.zeros((n_tiles * r - rows, m), err.dtype)])
    x_pool, t_pool = jnp.asarray(x_pool), jnp.asarray(t_pool)
    idx, cnt, err = idx.reshape(n_tiles, r, m), cnt.reshape(n_tiles, r), err.reshape(n_tiles, r, m)

    def tiles(lo: int, hi: int):
        # Host arrays go to the jitted call as they are: cheaper than a jnp.asarray each.
        return _fused_rows(pair, one, k, preds, x_pool, t_pool, idx[lo:hi], cnt[lo:hi],
                           _part(err, lo, hi))

    out = _run_rows(tiles, plan, n_tiles, rows, c, per=r)
    return tuple(o.reshape(-1, c)[:rows] for o in out)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _self_rows(apply, mapper: ClientMapper, preds, x_pool, t_pool, probe_idx, probe_count):
    def one(client, shared):
        xp, tp = shared
        x, t, mask, n = _probe_batch(xp, tp, client["idx"], client["count"])
        err = jnp.sum((apply(client["p"], x) - t) ** 2, axis=-1)
        mean = jnp.sum(err * mask) / n
        std = jnp.sqrt(jnp.sum(((err - mean) ** 2) * mask) / n)
        return mean, std, err * mask

    return mapper.map(one, {"p": preds, "idx": probe_idx, "count": probe_count},
                      (x_pool, t_pool))


def self_novelty(apply: Callable, preds: PyTree, x_pool: jax.Array, t_pool: jax.Array,
                 probe_idx: jax.Array, probe_count: jax.Array,
                 mapper: ClientMapper | None = None) -> tuple[jax.Array, jax.Array]:
    """Each client's own predictor on its own probes: ``(mean, std)`` per client, ``[C]`` each.

    ``mean`` is ``S[i, i]``; ``std`` is the spread of the per-example novelty (``sigma="self"``).
    """
    return self_errors(apply, preds, x_pool, t_pool, probe_idx, probe_count, mapper)[:2]


def self_errors(apply: Callable, preds: PyTree, x_pool: jax.Array, t_pool: jax.Array,
                probe_idx: jax.Array, probe_count: jax.Array,
                mapper: ClientMapper | None = None
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Each client's own predictor on its own probes: ``(mean [C], std [C], errors [C, M])``.

    ``errors[i, m]`` is the squared error of predictor ``i`` on client ``i``'s ``m``-th probe
    (0 past its count): the ``e_i(x)`` every paired difference is taken against
    (:func:`paired_matrix`, :func:`paired_edges`).
    """
    c = jax.tree.leaves(preds)[0].shape[0]
    _check_probe(preds, x_pool, t_pool, probe_idx, probe_count, rows=c)
    return _self_rows(apply, mapper or ClientMapper(), preds, jnp.asarray(x_pool),
                      jnp.asarray(t_pool), jnp.asarray(probe_idx, jnp.int32),
                      jnp.asarray(probe_count, jnp.int32))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _edge_rows(apply, chunk: int, preds, x_pool, t_pool, probe_idx, probe_count, self_err,
               src, dst):
    def one(e):
        s, d = e
        p = jax.tree.map(lambda a: a[s], preds)
        x, t, mask, n = _probe_batch(x_pool, t_pool, probe_idx[d], probe_count[d])
        err = jnp.sum((apply(p, x) - t) ** 2, axis=-1)
        diff = err - self_err[d]
        return jnp.sum(err * mask) / n, jnp.sum(diff * diff * mask) / n

    return jax.lax.map(one, (src, dst), batch_size=min(chunk, src.shape[0]))


def edge_novelty(apply: Callable | RNDPair, preds: PyTree, x_pool: jax.Array,
                 t_pool: jax.Array, probe_idx: jax.Array, probe_count: jax.Array,
                 edges: EdgeList, edge_chunk: int = 1024,
                 mapper: ClientMapper | None = None) -> jax.Array:
    """Sparse mode: ``[E]`` scores ``S[dst_e, src_e]`` (``dst`` scores the predictor ``src``
    sent it, on ``dst``'s own probes).

    ``apply``: the :class:`~fedrnd.rnd.networks.RNDPair` (fused path: edges grouped by scoring
    client into rows of up to ``w`` in-neighbours, ``w`` the mean in-degree capped at
    ``edge_chunk``; each row runs its ``w`` predictors together on the client's probes; rows are
    mapped by the engine's client map), or a predictor ``apply`` (generic path: ``edge_chunk``
    edges at a time, one predictor and one probe set per edge).
    """
    zeros = jnp.zeros(np.shape(probe_idx), jnp.float32)
    return _edges(apply, preds, x_pool, t_pool, probe_idx, probe_count, zeros, edges,
                  edge_chunk, mapper)[0]


def paired_edges(apply: Callable | RNDPair, preds: PyTree, x_pool: jax.Array,
                 t_pool: jax.Array, probe_idx: jax.Array, probe_count: jax.Array,
                 self_err: jax.Array, edges: EdgeList, edge_chunk: int = 1024,
                 mapper: ClientMapper | None = None) -> tuple[jax.Array, jax.Array]:
    """Sparse mode of :func:`paired_matrix`: ``(s [E], q [E])``, the entries
    ``S[dst_e, src_e]`` and ``Q[dst_e, src_e]`` (same paths as :func:`edge_novelty`)."""
    if np.shape(self_err) != np.shape(probe_idx):
        raise ValueError(f"self_err must be [C, M] like probe_idx {np.shape(probe_idx)}, got "
                         f"{np.shape(self_err)}")
    return _edges(apply, preds, x_pool, t_pool, probe_idx, probe_count,
                  jnp.asarray(self_err, jnp.float32), edges, edge_chunk, mapper)


def _edges(apply, preds, x_pool, t_pool, probe_idx, probe_count, self_err, edges, edge_chunk,
           mapper):
    c = jax.tree.leaves(preds)[0].shape[0]
    _check_probe(preds, x_pool, t_pool, probe_idx, probe_count, rows=c)
    src, dst = np.asarray(edges.src), np.asarray(edges.dst)
    if src.shape != dst.shape or src.ndim != 1:
        raise ValueError(f"edge src/dst must be equal-length vectors, got {src.shape}, {dst.shape}")
    if src.size and (min(src.min(), dst.min()) < 0 or max(src.max(), dst.max()) >= c):
        raise ValueError(f"edge endpoints must be client ids in [0, {c})")
    if src.size == 0:
        return jnp.zeros((0,), jnp.float32), jnp.zeros((0,), jnp.float32)
    if isinstance(apply, RNDPair):
        return _fused_edges(apply, preds, x_pool, t_pool, probe_idx, probe_count, self_err,
                            src, dst, int(edge_chunk), mapper or ClientMapper())
    args = (preds, jnp.asarray(x_pool), jnp.asarray(t_pool), jnp.asarray(probe_idx, jnp.int32),
            jnp.asarray(probe_count, jnp.int32), self_err)
    e = len(src)
    # Edges run in a loop over batches of min(edge_chunk, E): host blocks keep those batches.
    plan = _plan(e, ClientMapper(min(int(edge_chunk), e)), int(np.shape(probe_idx)[1]))
    n = plan[-1].lo + plan[-1].size
    src, dst = (_pad_rows(v.astype(np.int32), n, 0) for v in (src, dst))

    def block(b: progress.Block):
        hi = b.lo + b.size
        return _edge_rows(apply, int(edge_chunk), *args, src[b.lo:hi], dst[b.lo:hi])

    if progress.get_mode() == "off":
        return block(plan[0])
    return progress.run_blocks(block, plan, e, f"rnd: scoring {e} edges", e, "edge",
                               compile_note="rnd: compiling scoring ...")


@functools.partial(jax.jit, static_argnums=(0, 1))
def _fused_edge_rows(pair: RNDPair, mapper: ClientMapper, preds, x_pool, t_pool, probe_idx,
                     probe_count, self_err, row_dst, row_src):
    def row(r, shared):
        ps, xp, tp, pidx, pcnt, es = shared
        idx, cnt = pidx[r["dst"]], pcnt[r["dst"]]
        x, t = xp[idx], tp[idx]
        p = jax.tree.map(lambda a: a[r["src"]], ps)  # [w, ...] the row's in-neighbours
        err = stacked_errors(pair, p, x, t)  # [w, M]
        mask = (jnp.arange(idx.shape[0]) < cnt).astype(jnp.float32)
        n = jnp.maximum(cnt, 1).astype(jnp.float32)
        d = err - es[r["dst"]]
        return jnp.sum(err * mask, axis=-1) / n, jnp.sum(d * d * mask, axis=-1) / n

    return mapper.map(row, {"dst": row_dst, "src": row_src},
                      (preds, x_pool, t_pool, probe_idx, probe_count, self_err))


def _fused_edges(pair, preds, x_pool, t_pool, probe_idx, probe_count, self_err, src, dst,
                 max_width, mapper):
    c = jax.tree.leaves(preds)[0].shape[0]
    m = int(np.shape(probe_idx)[1])
    deg = np.bincount(dst, minlength=c)
    # Row width: the mean in-degree of scoring clients, so padding stays below one row per
    # client (a skewed degree distribution gives its hubs several rows, not a wide table).
    w = int(max(1, min(max_width, -(-len(dst) // max(1, int(np.count_nonzero(deg)))))))
    order = np.argsort(dst, kind="stable")
    d_sorted = dst[order]
    rank = np.arange(len(dst)) - (np.cumsum(deg) - deg)[d_sorted]
    per = -(-deg // w)
    row_of = (np.cumsum(per) - per)[d_sorted] + rank // w
    slot = rank % w
    chunk = max(1, min(mapper.chunk, _fused_budget(pair.kind, 1 << 18) // (w * m)))
    mapper = dataclasses.replace(mapper, chunk_size=chunk)
    n_rows = int(per.sum())
    n_rows += (-n_rows) % mapper.num_shards
    row_dst = _pad_rows(np.repeat(np.arange(c), per).astype(np.int32), n_rows, 0)
    row_src = np.zeros((n_rows, w), np.int32)  # empty slots score predictor 0, dropped
    row_src[row_of, slot] = src[order]
    plan = _plan(n_rows, mapper, w * m)
    if plan[-1].lo + plan[-1].size > n_rows:  # host blocks pad whole rows, dropped as above
        row_dst = _pad_rows(row_dst, plan[-1].lo + plan[-1].size, 0)
        row_src = _pad_rows(row_src, len(row_dst), 0)
    args = (preds, jnp.asarray(x_pool), jnp.asarray(t_pool), jnp.asarray(probe_idx, jnp.int32),
            jnp.asarray(probe_count, jnp.int32), self_err)

    def block(b: progress.Block):
        hi = b.lo + b.size
        return _fused_edge_rows(pair, mapper, *args, row_dst[b.lo:hi], row_src[b.lo:hi])

    if progress.get_mode() == "off":
        out = block(plan[0])
    else:
        # Edges per table row, to count the real edges of each block.
        per_row = np.cumsum(np.concatenate([[0], np.bincount(row_of, minlength=len(row_dst))]))
        out = progress.run_blocks(
            block, plan, n_rows, f"rnd: scoring {len(dst)} edges", len(dst), "edge",
            count=lambda b: int(per_row[b.hi] - per_row[b.lo]),
            compile_note="rnd: compiling scoring ...")
    flat = jnp.asarray(row_of * w + slot)
    inv = jnp.asarray(order)
    return tuple(jnp.zeros(len(dst), o.dtype).at[inv].set(o.reshape(-1)[flat]) for o in out)


