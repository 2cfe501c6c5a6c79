"""RND federation discovery: predictors, the novelty matrix, compatibility, federations.

Method (Domini et al. 2026, "Discovering Collaboration from Novelty: Random Network
Distillation for Clustered Federated Learning", arXiv 2606.30499):

1. Every client trains a narrow *predictor* ``f_i`` to imitate one frozen random *target*
   ``f`` on its own inputs (labels unused): MSE, Adam 1e-3, 10 epochs, batch 128. All clients
   train in one jitted program through :class:`fedrnd.engine.Engine` / ``local_train``; the
   target outputs are precomputed once per pool row and passed as the "labels" of the pool.
2. Cross novelty ``S[i, j] = mean_{x in D_i} ||f_j(x) - f(x)||^2`` (peer ``j``'s predictor on
   client ``i``'s data, squared error summed over the output dimensions). ``S[i, i]`` is the
   self-novelty. Computed blockwise: tiles of ``row_tile`` client rows are mapped by the
   engine's :class:`~fedrnd.engine.ClientMapper` and predictors go in tiles of ``col_tile``
   (``lax.map``), so intermediate memory is bounded by the tile whatever ``N`` is. Each tile
   runs its ``col_tile`` predictors on the tile's shared probe examples at once
   (:func:`fedrnd.rnd.networks.stacked_errors`, the predictor index inside the layers); the
   generic path (any ``apply``, one predictor at a time under a vmap) is the reference. In
   *sparse* mode only the pairs of an edge list are scored, grouped by scoring client.
3. Compatibility: ``j`` is compatible with ``i`` iff ``S[i, j] <= S[i, i] + eps * sigma_i``.
   ``sigma_i`` is either the standard deviation of row ``i`` of ``S`` (``sigma="row"``, the
   paper's reading) or of client ``i``'s per-example self-novelty (``sigma="self"``).
4. Federations (the paper leaves this open): ``rule="mutual"`` keeps pairs compatible both
   ways and takes connected components (default); ``"one_sided"`` keeps pairs compatible
   either way (weak components); ``"leader"`` elects leaders by lowest self-novelty, each
   taking every still-free client mutually compatible with it (no chaining). The number of
   federations is never given.

``eps="auto"`` picks the tolerance from the data: the federations with the best silhouette
(:func:`auto_eps`; the sparse mode, which has no full matrix, uses the largest relative gap of
:func:`gap_eps`).

Self-novelty on the training examples is biased low (the predictor has seen them), which
inflates every ``S[i, j] - S[i, i]`` for ``j != i``; ``probe="holdout"`` (score on a held-out
share of each client's train split, the rest trains the predictor) or ``probe="test"`` remove
that bias, at the price of noisier scores. Defaults and the measurements behind them are in
:class:`RNDConfig`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy.sparse import coo_matrix, csr_matrix, issparse
from scipy.sparse.csgraph import connected_components

from fedrnd.data.federated import FederatedData
from fedrnd.engine import (
    ClientHParams,
    ClientMapper,
    ClientOptimizer,
    EdgeList,
    Engine,
    LocalSpec,
    tree_bytes,
)
from fedrnd.engine.multihost import to_host
from fedrnd.rnd.networks import RNDPair, make_pair, stacked_errors, target_features

PyTree = Any

__all__ = [
    "AUTO_MIN_RATIO",
    "PROBES",
    "RULES",
    "SIGMAS",
    "Discovery",
    "FeatureMSE",
    "RNDConfig",
    "assign_newcomers",
    "auto_eps",
    "gap_eps",
    "check_eps",
    "compatibility",
    "discover",
    "edge_novelty",
    "federations",
    "normalised_scores",
    "novelty_matrix",
    "predictor_engine",
    "probe_split",
    "self_novelty",
    "sigma_of",
    "train_predictors",
]

SIGMAS = ("row", "self")
RULES = ("mutual", "one_sided", "leader")
PROBES = ("train", "holdout", "test")


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RNDConfig:
    """Everything static about a discovery run (hashable).

    Attributes:
      network: ``"conv"``, ``"mlp"`` or ``"auto"`` (conv for ``[H, W, C]`` features).
      target_width, predictor_width, out_dim: network sizes (see :func:`make_pair`).
      seed: the global seed of the frozen target (the same target for every client).
      epochs, steps, batch_size, lr: predictor training (Adam); ``steps`` replaces ``epochs``.
      min_steps: when ``epochs`` of the largest client come to fewer Adam steps than this, train
        ``min_steps`` steps instead (``None``: the paper's schedule as is). The paper's clients
        held ~5,000 images, so 10 epochs of batch 128 were ~390 steps; with 64 images they are
        10 steps and the predictors barely leave their shared init, which leaves S flat
        (measured in experiments/rnd/RESULTS.md: ARI 0 at 10 steps vs 1.0 at 400 on the paper's
        Fashion-MNIST setup). Default 300.
      per_client_init: each predictor starts from its own random init (default: all from the
        same init, so differences between predictors come from the data alone).
      probe: which examples client ``i`` scores predictors on: ``"train"`` (its training set,
        as in the paper), ``"holdout"`` (a held-out ``holdout`` share of its train split, the
        rest trains its predictor) or ``"test"`` (its test split).
      probe_cap: at most this many probe examples per client (a seeded random subset).
      eps: tolerance ``>= 0``, or ``"auto"`` (:func:`auto_eps`).
      sigma: ``"row"`` or ``"self"`` (see :func:`sigma_of`).
      rule: ``"mutual"``, ``"one_sided"`` or ``"leader"`` (see :func:`federations`).
      row_tile, col_tile: clients scored at once x predictors applied at once (memory bound of
        the novelty matrix); ``row_tile=None`` sizes tiles to at most ``tile_evals`` predictor
        evaluations (``row_tile * col_tile * M``; see :func:`novelty_matrix`).
      edge_chunk: sparse mode: at most this many in-neighbours of one client are scored in
        one step (the generic path: edges scored at once).
      fused: score with :func:`~fedrnd.rnd.networks.stacked_errors` (many predictors on shared
        probes at once, the default) or with the generic per-predictor ``apply`` (the
        reference; same numbers up to float rounding, several times slower).

    Defaults and why (MLP pair, the paper's schedule; 7 populations x 6 seeds: Gaussian
    mixtures with 4 groups, with 2 unequal groups, and with group sizes 8/4/2/2, 1/5/10 or
    3/13; feature patterns on digits, 3 and 4 unequal groups at RMS 0.3; and two single-group
    populations, scored 1 when left whole; numbers are mean ARI over all 42 runs):

    * ``sigma="row"``: with ``eps="auto"`` both readings recovered every population exactly
      (mean ARI 1.00) on training probes, but on held-out probes "row" scored 0.88 against
      0.83, and with a fixed ``eps`` only "row" has a scale that transfers between data sets:
      normalised cross-group scores are ``>= 1 / sqrt(p (1 - p)) >= 2`` for a client whose
      federation is a fraction ``p`` of its row, so ``eps`` 0.25, 0.5 and 1 all worked
      (0.81, 0.93, 0.97 on held-out probes, mutual rule), whereas per-example spreads dwarf
      the differences between predictors and "self" needed ``eps`` well below 0.25 (0.50 at
      0.25; 0.29-0.30, i.e. only the single-group populations right, from 0.5 up).
    * ``probe="train"`` (the paper's): with ``eps="auto"`` it recovered all populations
      (ARI 1.00) against 0.88 for held-out probes, whose predictors see less data and whose
      scores are noisier. Its self-novelty bias (every ``S[i, j] > S[i, i]``) fragments IID
      populations under any fixed ``eps <= 2``; ``eps="auto"`` sees no separated mode there
      and keeps them whole. Use ``probe="holdout"`` when fixing ``eps`` by hand.
    * ``eps="auto"`` (criterion in :func:`auto_eps`: the best silhouette over the candidate
      cuts, one federation below 0.5), ``rule="mutual"``: all three rules agreed wherever the
      scores were separable; mutual compatibility is the symmetric reading. (The bullets above
      were measured with the earlier largest-gap criterion, now :func:`gap_eps`; the silhouette
      replaced it after it kept the paper's 12-client setup whole in 2 of 5 seeds and every
      1,000-client population whole.)
    """

    network: str = "auto"
    target_width: tuple[int, ...] | None = None
    predictor_width: tuple[int, ...] | None = None
    out_dim: int = 64
    seed: int = 0
    epochs: int = 10
    steps: int | None = None
    min_steps: int | None = 300
    batch_size: int = 128
    lr: float = 1e-3
    per_client_init: bool = False
    probe: str = "train"
    holdout: float = 0.25
    probe_cap: int | None = None
    eps: float | str = "auto"
    sigma: str = "row"
    rule: str = "mutual"
    row_tile: int | None = None
    col_tile: int = 64
    tile_evals: int = 1 << 18
    edge_chunk: int = 1024
    fused: bool = True

    def __post_init__(self):
        # Lists from TOML/JSON configs become tuples so the config stays hashable.
        for f in ("target_width", "predictor_width"):
            v = getattr(self, f)
            if v is not None and not isinstance(v, tuple):
                object.__setattr__(self, f, tuple(int(u) for u in np.ravel(v)))
        check_eps(self.eps)
        if self.sigma not in SIGMAS:
            raise ValueError(f"sigma must be one of {list(SIGMAS)}, got {self.sigma!r}")
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {list(RULES)}, got {self.rule!r}")
        if self.probe not in PROBES:
            raise ValueError(f"probe must be one of {list(PROBES)}, got {self.probe!r}")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout must be in (0, 1), got {self.holdout}")
        if self.probe_cap is not None and self.probe_cap < 1:
            raise ValueError(f"probe_cap must be >= 1 or None, got {self.probe_cap}")
        if not (self.lr > 0 and np.isfinite(self.lr)):
            raise ValueError(f"predictor lr must be finite and > 0, got {self.lr}")
        for f in ("col_tile", "edge_chunk", "tile_evals"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")
        if self.row_tile is not None and self.row_tile < 1:
            raise ValueError(f"row_tile must be >= 1 or None, got {self.row_tile}")
        LocalSpec(self.batch_size, self.epochs, self.steps)  # validates the schedule
        if self.min_steps is not None and self.min_steps < 1:
            raise ValueError(f"min_steps must be >= 1 or None, got {self.min_steps}")

    def schedule(self, max_count: int) -> LocalSpec:
        """The predictors' local schedule for clients of at most ``max_count`` examples."""
        spec = LocalSpec(self.batch_size, self.epochs, self.steps)
        if (self.steps is None and self.min_steps is not None
                and spec.total_steps(max_count) < self.min_steps):
            return LocalSpec(self.batch_size, steps=self.min_steps)
        return spec

    def pair(self, feature_shape: tuple[int, ...]) -> RNDPair:
        return make_pair(self.network, feature_shape, target_width=self.target_width,
                         predictor_width=self.predictor_width, out_dim=self.out_dim)


def check_eps(eps: Any) -> None:
    """Raise ``ValueError`` unless ``eps`` is ``"auto"`` or a finite number ``>= 0``."""
    if isinstance(eps, str):
        if eps != "auto":
            raise ValueError(f"eps must be a number >= 0 or 'auto', got {eps!r}")
        return
    try:
        e = float(eps)
    except (TypeError, ValueError):
        raise ValueError(f"eps must be a number >= 0 or 'auto', got {eps!r}") from None
    if not np.isfinite(e) or e < 0:
        raise ValueError(f"eps must be finite and >= 0 (or 'auto'), got {eps!r}")


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
def _train_program(engine: Engine, init, client_init, data, hp, key):
    p, _, m = engine.train(init, data, hp, key, jnp.zeros((), jnp.int32),
                           client_params=client_init)
    return p, m["loss"]


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
    return _train_program(engine, init, client_init, data, hp, k_train)


# --------------------------------------------------------------------------------------------
# novelty
# --------------------------------------------------------------------------------------------


def _probe_batch(x_pool, t_pool, idx, count):
    mask = (jnp.arange(idx.shape[0]) < count).astype(jnp.float32)
    return x_pool[idx], t_pool[idx], mask, jnp.maximum(count, 1).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _novelty_rows(apply, mapper: ClientMapper, col_tile: int, preds, x_pool, t_pool,
                  probe_idx, probe_count):
    n_pred = jax.tree.leaves(preds)[0].shape[0]

    def row(client, shared):
        ps, xp, tp = shared
        x, t, mask, n = _probe_batch(xp, tp, client["idx"], client["count"])

        def score(p):
            err = jnp.sum((apply(p, x) - t) ** 2, axis=-1)
            return jnp.sum(err * mask) / n

        return jax.lax.map(score, ps, batch_size=min(col_tile, n_pred))

    return mapper.map(row, {"idx": probe_idx, "count": probe_count}, (preds, x_pool, t_pool))


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
    _check_probe(preds, x_pool, t_pool, probe_idx, probe_count)
    mapper = mapper or ClientMapper()
    if isinstance(apply, RNDPair):
        return _fused_matrix(apply, preds, x_pool, t_pool, probe_idx, probe_count,
                             row_tile=row_tile, col_tile=col_tile, mapper=mapper,
                             tile_evals=tile_evals)
    if row_tile is None:
        m = int(np.shape(probe_idx)[1])
        row_tile = max(1, min(mapper.chunk, int(tile_evals) // max(1, int(col_tile) * m)))
    mapper = dataclasses.replace(mapper, chunk_size=int(row_tile))
    return _novelty_rows(apply, mapper, int(col_tile), preds, jnp.asarray(x_pool),
                         jnp.asarray(t_pool), jnp.asarray(probe_idx, jnp.int32),
                         jnp.asarray(probe_count, jnp.int32))


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


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _fused_rows(pair: RNDPair, mapper: ClientMapper, k: int, preds, x_pool, t_pool, idx, count):
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
            err = stacked_errors(pair, p, x, t)  # [K, R * M]
            return jnp.sum(err.reshape(k, r, m) * mask, axis=-1) / n  # [K, R]

        out = jax.lax.map(col, starts)  # [T, K, R]
        j = jnp.arange(c)
        tj = jnp.minimum(j // k, n_cols - 1)
        return out[tj, j - starts[tj]].T  # [R, C]

    return mapper.map(tile, {"idx": idx, "count": count}, (preds, x_pool, t_pool))


def _fused_matrix(pair: RNDPair, preds, x_pool, t_pool, probe_idx, probe_count, *, row_tile,
                  col_tile, mapper, tile_evals):
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
    idx = _pad_rows(np.asarray(probe_idx, np.int32), n_tiles * r, 0)
    cnt = _pad_rows(np.asarray(probe_count, np.int32), n_tiles * r, 1)
    out = _fused_rows(pair, dataclasses.replace(mapper, chunk_size=1), k, preds,
                      jnp.asarray(x_pool), jnp.asarray(t_pool),
                      jnp.asarray(idx.reshape(n_tiles, r, m)),
                      jnp.asarray(cnt.reshape(n_tiles, r)))
    return out.reshape(n_tiles * r, c)[:rows]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _self_rows(apply, mapper: ClientMapper, preds, x_pool, t_pool, probe_idx, probe_count):
    def one(client, shared):
        xp, tp = shared
        x, t, mask, n = _probe_batch(xp, tp, client["idx"], client["count"])
        err = jnp.sum((apply(client["p"], x) - t) ** 2, axis=-1)
        mean = jnp.sum(err * mask) / n
        std = jnp.sqrt(jnp.sum(((err - mean) ** 2) * mask) / n)
        return mean, std

    return mapper.map(one, {"p": preds, "idx": probe_idx, "count": probe_count},
                      (x_pool, t_pool))


def self_novelty(apply: Callable, preds: PyTree, x_pool: jax.Array, t_pool: jax.Array,
                 probe_idx: jax.Array, probe_count: jax.Array,
                 mapper: ClientMapper | None = None) -> tuple[jax.Array, jax.Array]:
    """Each client's own predictor on its own probes: ``(mean, std)`` per client, ``[C]`` each.

    ``mean`` is ``S[i, i]``; ``std`` is the spread of the per-example novelty (``sigma="self"``).
    """
    c = jax.tree.leaves(preds)[0].shape[0]
    _check_probe(preds, x_pool, t_pool, probe_idx, probe_count, rows=c)
    return _self_rows(apply, mapper or ClientMapper(), preds, jnp.asarray(x_pool),
                      jnp.asarray(t_pool), jnp.asarray(probe_idx, jnp.int32),
                      jnp.asarray(probe_count, jnp.int32))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _edge_rows(apply, chunk: int, preds, x_pool, t_pool, probe_idx, probe_count, src, dst):
    def one(e):
        s, d = e
        p = jax.tree.map(lambda a: a[s], preds)
        x, t, mask, n = _probe_batch(x_pool, t_pool, probe_idx[d], probe_count[d])
        err = jnp.sum((apply(p, x) - t) ** 2, axis=-1)
        return jnp.sum(err * mask) / n

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
    c = jax.tree.leaves(preds)[0].shape[0]
    _check_probe(preds, x_pool, t_pool, probe_idx, probe_count, rows=c)
    src, dst = np.asarray(edges.src), np.asarray(edges.dst)
    if src.shape != dst.shape or src.ndim != 1:
        raise ValueError(f"edge src/dst must be equal-length vectors, got {src.shape}, {dst.shape}")
    if src.size and (min(src.min(), dst.min()) < 0 or max(src.max(), dst.max()) >= c):
        raise ValueError(f"edge endpoints must be client ids in [0, {c})")
    if src.size == 0:
        return jnp.zeros((0,), jnp.float32)
    if isinstance(apply, RNDPair):
        return _fused_edges(apply, preds, x_pool, t_pool, probe_idx, probe_count, src, dst,
                            int(edge_chunk), mapper or ClientMapper())
    return _edge_rows(apply, int(edge_chunk), preds, jnp.asarray(x_pool), jnp.asarray(t_pool),
                      jnp.asarray(probe_idx, jnp.int32), jnp.asarray(probe_count, jnp.int32),
                      jnp.asarray(src, jnp.int32), jnp.asarray(dst, jnp.int32))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _fused_edge_rows(pair: RNDPair, mapper: ClientMapper, preds, x_pool, t_pool, probe_idx,
                     probe_count, row_dst, row_src):
    def row(r, shared):
        ps, xp, tp, pidx, pcnt = shared
        idx, cnt = pidx[r["dst"]], pcnt[r["dst"]]
        x, t = xp[idx], tp[idx]
        p = jax.tree.map(lambda a: a[r["src"]], ps)  # [w, ...] the row's in-neighbours
        err = stacked_errors(pair, p, x, t)  # [w, M]
        mask = (jnp.arange(idx.shape[0]) < cnt).astype(jnp.float32)
        return jnp.sum(err * mask, axis=-1) / jnp.maximum(cnt, 1).astype(jnp.float32)

    return mapper.map(row, {"dst": row_dst, "src": row_src},
                      (preds, x_pool, t_pool, probe_idx, probe_count))


def _fused_edges(pair, preds, x_pool, t_pool, probe_idx, probe_count, src, dst, max_width,
                 mapper):
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
    out = _fused_edge_rows(pair, mapper, preds, jnp.asarray(x_pool), jnp.asarray(t_pool),
                           jnp.asarray(probe_idx, jnp.int32),
                           jnp.asarray(probe_count, jnp.int32), jnp.asarray(row_dst),
                           jnp.asarray(row_src))
    flat = jnp.asarray(row_of * w + slot)
    scores = out.reshape(-1)[flat]
    return jnp.zeros(len(dst), scores.dtype).at[jnp.asarray(order)].set(scores)


# --------------------------------------------------------------------------------------------
# compatibility and federations (host side: small matrices, graph algorithms)
# --------------------------------------------------------------------------------------------


def sigma_of(kind: str, scores: np.ndarray, self_std: np.ndarray) -> np.ndarray:
    """``sigma_i`` per client ``[C]`` for a dense novelty matrix ``scores [C, C]``.

    ``"row"``: the standard deviation of row ``i`` of ``S`` (the paper's reading; in sparse
    mode the row is what client ``i`` observed: its neighbours' scores and its own).
    ``"self"``: ``self_std``, the spread of client ``i``'s per-example self-novelty.
    """
    if kind == "self":
        return np.asarray(self_std, np.float64)
    if kind != "row":
        raise ValueError(f"sigma must be one of {list(SIGMAS)}, got {kind!r}")
    s = np.asarray(scores)
    # Blocks of rows: a float64 std of a whole 10,000-client matrix needs gigabytes of
    # temporaries; per block it needs a few megabytes.
    return np.concatenate([s[i:i + _ROWS].std(axis=1, dtype=np.float64)
                           for i in range(0, max(len(s), 1), _ROWS)])[: len(s)]


_ROWS = 512


def _sparse_row_std(edge_scores, rows, c, diag=None):
    # Moments of each observed row (edges plus, when given, the diagonal).
    n = np.bincount(rows, minlength=c).astype(np.float64)
    s1 = np.bincount(rows, edge_scores, minlength=c)
    s2 = np.bincount(rows, edge_scores ** 2, minlength=c)
    if diag is not None:
        n, s1, s2 = n + 1, s1 + diag, s2 + diag ** 2
    mean = s1 / np.maximum(n, 1)
    return np.sqrt(np.maximum(s2 / np.maximum(n, 1) - mean ** 2, 0.0))


def normalised_scores(scores: np.ndarray, s_self: np.ndarray, sigma: np.ndarray,
                      rows: np.ndarray | None = None) -> np.ndarray:
    """``z = (s_ij - s_ii) / sigma_i``: compatible iff ``z <= eps``. Dense ``[C, C]`` or
    ``[E]`` edge scores with ``rows`` (the scoring client ``i`` of each edge).

    A zero ``sigma_i`` (identical scores) gives ``z = 0`` when ``s_ij == s_ii`` and ``+inf``
    when larger, which is the rule's limit."""
    # Dense matrices stay float32 and are built in place: a 10,000-client S is 400 MB, and
    # float64 or temporary copies would multiply that.
    dt = np.result_type(np.asarray(scores).dtype, np.float32)
    s = np.asarray(scores, dt)
    s_self = np.asarray(s_self, dt)
    sig = np.asarray(sigma, dt)
    if rows is None:
        z, sg = s - s_self[:, None], sig[:, None]
    else:
        z, sg = s - s_self[rows], sig[rows]
    np.divide(z, sg, out=z, where=np.broadcast_to(sg > 0, z.shape))
    # Zero spread (rows or edges): the rule's limit, equal scores 0 and larger ones +inf.
    bad = np.flatnonzero(sig <= 0) if rows is None else np.flatnonzero(sg <= 0)
    if bad.size:
        z[bad] = np.where(z[bad] <= 0, 0.0, np.inf)
    return z


def compatibility(z: np.ndarray, eps: float) -> np.ndarray:
    """``z <= eps`` (bool, same shape); ``eps`` must be finite and ``>= 0``."""
    check_eps(eps)
    if isinstance(eps, str):
        raise ValueError("resolve eps='auto' with auto_eps before calling compatibility")
    return np.asarray(z) <= float(eps)


AUTO_MIN_RATIO = 1.5
"""Default ``min_ratio`` of :func:`gap_eps` (see there for the measurements behind it)."""


def gap_eps(z: np.ndarray, *, min_count: int | None = None,
            min_ratio: float = AUTO_MIN_RATIO) -> float:
    """Tolerance from the *largest relative gap* in the sorted normalised scores (the automatic
    eps of the sparse mode, where no full matrix exists; dense matrices use :func:`auto_eps`).

    Criterion. Let ``z_(1) <= ... <= z_(n)`` be the finite off-diagonal normalised scores
    ``(s_ij - s_ii) / sigma_i``. For every split after the ``k``-th smallest score with
    ``k >= min_count`` (default ``ceil(sqrt(n))``, about one pair per client for a dense
    matrix) and ``z_(k+1) > 0``, compare the gap ``g_k = z_(k+1) - z_(k)`` with the upper
    half-width of the scores below it, ``w_k = z_(k) - z_(ceil(k/2))``. The tolerance is the
    midpoint of the gap maximising ``g_k / w_k`` when that ratio is at least ``min_ratio``:
    the scores then fall into a low mode (peers with the same distribution) and the rest,
    separated by an empty band wider than the low mode's own spread. When no split qualifies
    the population shows no separated structure and ``eps`` is placed above every score (one
    federation; nothing is incompatible).

    Why relative, why ``min_count``, why ``z_(k+1) > 0``: a plain largest gap also exists in a
    single IID population (the sparse tails of a unimodal spread) and would fragment it; a gap
    counts only if it dominates the spread below it, the low mode must hold enough pairs to be
    a mode rather than a tail, and a cut below zero would make clients incompatible with peers
    that look *more* familiar than their own data.

    Threshold: with ``sigma="row"`` and training-set probes, the best ratio of IID populations
    (digits and Gaussian, 8 to 60 clients, 8 seeds each) never exceeded 0.91 and fell with the
    number of clients (0.2 at 40), while separable grouped populations (Gaussian mixtures with
    2-4 groups of unequal sizes, feature patterns on digits) gave 2.4 to 27; 1.5 sits between.
    """
    z = np.sort(np.asarray(z), axis=None)  # one copy; +inf and NaN sort to the end
    z = z[: int(np.searchsorted(z, np.inf, side="left"))]
    n = z.size
    if n == 0:
        return 0.0
    top = max(float(z[-1]) + 1.0, 0.0)
    if n < 2:
        return top
    m = max(1, min(int(np.ceil(np.sqrt(n))) if min_count is None else int(min_count), n - 1))
    best_ratio, best_k = -1.0, -1
    # Candidate splits in blocks, so a 10,000-client matrix (1e8 scores) needs no 1e8-long
    # temporaries. Split k is between z[k] and z[k + 1] (0-based).
    for lo in range(m - 1, n - 1, _SPLITS):
        ks = np.arange(lo, min(lo + _SPLITS, n - 1))
        gaps = z[ks + 1] - z[ks]
        width = z[ks] - z[ks // 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(width > 0, gaps / width, np.where(gaps > 0, np.inf, 0.0))
        ratio = np.where(z[ks + 1] > 0, ratio, 0.0)
        b = int(np.argmax(ratio))
        if ratio[b] > best_ratio:
            best_ratio, best_k = float(ratio[b]), int(ks[b])
    if not best_ratio >= min_ratio:
        return top
    return float(max(0.5 * (z[best_k] + z[best_k + 1]), 0.0))


_SPLITS = 1 << 22


AUTO_MIN_SILHOUETTE = 0.5
"""Default ``min_silhouette`` of :func:`auto_eps` (see there for the measurements behind it)."""

AUTO_SAMPLE = 2000
"""Clients whose silhouette :func:`auto_eps` averages (all of them up to this many)."""


def _dissimilarity_rows(z: np.ndarray, rows: np.ndarray, rule: str, big: float) -> np.ndarray:
    """``d[rows]`` of the symmetric dissimilarity the rule acts on, ``[len(rows), C]``: ``max``
    of ``z_ij, z_ji`` (mutual, leader) or ``min`` (one-sided), clipped at 0, +inf -> ``big``."""
    a, b = z[rows], z[:, rows].T
    d = np.maximum(a, b) if rule != "one_sided" else np.minimum(a, b)
    d = np.nan_to_num(d, nan=big, posinf=big, neginf=0.0)
    return np.maximum(d, 0.0, out=d)


def _spanning_tree(z: np.ndarray, rule: str, big: float) -> tuple[np.ndarray, np.ndarray,
                                                                 np.ndarray]:
    """Minimum spanning tree of the dissimilarity (Prim, ``O(C^2)``, one row at a time):
    ``(u, v, height)`` of its ``C - 1`` edges. Components of the tree's edges ``<= eps`` are the
    rule's federations at ``eps`` (single linkage), for the mutual and one-sided rules."""
    c = z.shape[0]
    in_tree = np.zeros(c, bool)
    best = np.full(c, np.inf)
    parent = np.zeros(c, np.int64)
    u, v, h = (np.empty(c - 1, np.int64), np.empty(c - 1, np.int64), np.empty(c - 1))
    cur = 0
    for e in range(c - 1):
        in_tree[cur] = True
        row = _dissimilarity_rows(z, np.array([cur]), rule, big)[0]
        closer = ~in_tree & (row < best)
        best[closer] = row[closer]
        parent[closer] = cur
        cur = int(np.argmin(np.where(in_tree, np.inf, best)))
        u[e], v[e], h[e] = parent[cur], cur, best[cur]
    return u, v, h


def _find(parent: np.ndarray, i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def auto_eps(z: np.ndarray, *, rule: str = "mutual",
             min_silhouette: float = AUTO_MIN_SILHOUETTE, max_levels: int | None = None,
             sample: int = AUTO_SAMPLE, return_score: bool = False):
    """Tolerance from the data: the ``eps`` whose federations have the best *silhouette*.

    Criterion. Federations under the mutual rule are the single-linkage clusters of the
    dissimilarity ``d_ij = max(z_ij, z_ji)`` (``min`` for the one-sided rule; the leader rule
    uses the mutual one) cut at ``eps``, so the candidate tolerances are the gaps between the
    heights of its minimum spanning tree: cutting the ``k - 1`` highest tree edges gives ``k``
    federations, with ``eps`` midway between the two heights around the cut. Each candidate
    ``k = 2 .. max_levels`` (default ``min(C - 1, max(16, 2 ceil(sqrt(C))))``) is scored by
    the mean silhouette ``(b_i - a_i) / max(a_i, b_i)`` of its federations under ``d``
    (``a_i``: client ``i``'s mean dissimilarity to its own federation, ``b_i``: to the nearest
    other federation of at least two clients; 0 for a client alone or when no such other
    federation exists), averaged over all clients or, above ``sample`` of them, over a fixed
    random sample of rows (against every client). Leaving single clients out of ``b_i`` is our
    change to the textbook silhouette: otherwise splitting off one outlier from an IID
    population scores high (everyone is far from the outlier; 0.36 on 1,000 IID clients). The best candidate wins when
    its silhouette reaches ``min_silhouette``; otherwise the population shows no separated
    structure and ``eps`` is placed above every score (one federation).

    Threshold, measured on 94 novelty matrices (row sigma, training probes; generated and
    tabulated by ``experiments/rnd/auto_eps.py`` into ``experiments/rnd/AUTO_EPS.md``):
    populations with one input distribution (Gaussian and digits IID with 8-60 clients,
    Fashion-MNIST IID with 200 and 1,000 clients, the label-permutation control) scored at most
    0.31; grouped populations whose groups the best cut recovers scored 0.52 to 0.98. 0.5 sits
    between. All 28 one-distribution matrices stayed whole, and 58 of 66 grouped ones were
    recovered exactly (mean ARI 0.95), against 33 (mean ARI 0.51) for the
    largest-gap rule :func:`gap_eps`. Cost: the tree is ``O(C^2)``, the silhouettes one
    ``[sample, C] x [C, max_levels]`` product; about a second at 1,000 clients.

    Args:
      z: ``[C, C]`` normalised scores (diagonal ignored; ``+inf`` allowed).
      rule: the federation rule the tolerance is for.
      return_score: also return the winning silhouette (``nan`` when no candidate exists).
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {list(RULES)}, got {rule!r}")
    z = np.asarray(z)
    c = z.shape[0]
    if z.ndim != 2 or z.shape != (c, c):
        raise ValueError(f"auto_eps needs a square [C, C] matrix, got {z.shape}; "
                         "sparse mode uses gap_eps")
    finite = np.isfinite(z)
    hi = float(np.max(z, where=finite, initial=-np.inf))
    lo = float(np.min(z, where=finite, initial=np.inf))
    top = max(hi + 1.0, 0.0) if np.isfinite(hi) else 0.0
    del finite
    levels = min(c - 1, max(16, 2 * int(np.ceil(np.sqrt(c))))) if max_levels is None else \
        min(int(max_levels), c - 1)
    if c < 3 or levels < 2 or not np.isfinite(hi):
        return (top, float("nan")) if return_score else top
    big = 2.0 * max(abs(hi), abs(lo), 1.0)
    u, v, h = _spanning_tree(z, rule, big)
    order = np.argsort(-h, kind="stable")  # highest first
    u, v, h = u[order], v[order], h[order]
    # Fine partition: all but the levels - 1 highest tree edges.
    keep = slice(levels - 1, None)
    graph = coo_matrix((np.ones(c - levels), (u[keep], v[keep])), shape=(c, c))
    fine = connected_components(graph, directed=False)[1]
    rng = np.random.default_rng(0)
    rows = np.arange(c) if c <= sample else np.sort(rng.choice(c, sample, replace=False))
    d = _dissimilarity_rows(z, rows, rule, big)
    d[np.arange(len(rows)), rows] = 0.0
    onehot = np.zeros((c, levels), d.dtype)
    onehot[np.arange(c), fine] = 1.0
    sums = d @ onehot  # [rows, fine clusters]
    sizes = onehot.sum(0)
    # Merge fine clusters back edge by edge (lowest of the cut edges first): level k.
    uf = np.arange(levels)
    best_score, best_eps = -np.inf, top
    for k in range(levels, 1, -1):
        if k < levels:
            a, b = _find(uf, int(fine[u[k - 1]])), _find(uf, int(fine[v[k - 1]]))
            uf[a] = b
        if h[k - 1] >= h[k - 2]:
            continue  # a tie: no eps separates these two tree edges
        root = np.array([_find(uf, i) for i in range(levels)])
        ids, lab = np.unique(root, return_inverse=True)
        m = np.zeros((levels, len(ids)), d.dtype)
        m[np.arange(levels), lab] = 1.0
        ssum, n = sums @ m, sizes @ m
        own = lab[fine[rows]]
        r = np.arange(len(rows))
        n_own = n[own]
        a_i = np.where(n_own > 1, ssum[r, own] / np.maximum(n_own - 1, 1), 0.0)
        mean = ssum / n
        mean[:, n < 2] = np.inf  # a client alone is no federation to be near to
        mean[r, own] = np.inf
        b_i = mean.min(1)
        den = np.maximum(a_i, b_i)
        ok = (n_own > 1) & np.isfinite(b_i) & (den > 0)
        s_i = np.where(ok, (b_i - a_i) / np.where(ok, den, 1.0), 0.0)
        score = float(s_i.mean())
        if score > best_score:
            best_score, best_eps = score, float(0.5 * (h[k - 1] + h[k - 2]))
    eps = best_eps if best_score >= min_silhouette else top
    if return_score:
        return eps, (best_score if np.isfinite(best_score) else float("nan"))
    return eps


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Federation ids ``0..F-1`` in order of each federation's lowest client id."""
    _, first, inv = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))
    return order[inv].astype(np.int32)


def _dense_components(adj: np.ndarray) -> np.ndarray:
    """Connected components of a symmetric dense boolean adjacency ``[C, C]``.

    Breadth-first by whole frontiers: every client's row is read once, so the work is
    ``O(C^2)`` boolean operations and no ``C^2``-entry sparse copy is ever built (a mostly
    compatible 10,000-client population would otherwise need gigabytes of index arrays).
    """
    c = adj.shape[0]
    lab = np.full(c, -1, np.int64)
    for seed in range(c):
        if lab[seed] >= 0:
            continue
        lab[seed] = seed
        frontier = np.array([seed])
        while frontier.size:
            reach = adj[frontier].any(axis=0) & (lab < 0)
            frontier = np.flatnonzero(reach)
            lab[frontier] = seed
    return lab


def federations(compatible, rule: str = "mutual", s_self: np.ndarray | None = None
                ) -> np.ndarray:
    """Federation id per client ``[C]`` from a compatibility relation.

    Args:
      compatible: ``[C, C]`` bool (``compatible[i, j]``: ``j`` is compatible with ``i``) or a
        scipy sparse matrix of the same meaning (sparse mode).
      rule: ``"mutual"``: components of the graph of pairs compatible both ways;
        ``"one_sided"``: components of pairs compatible either way; ``"leader"``: clients in
        increasing self-novelty order become leaders when still free, each taking every free
        client mutually compatible with it (no chaining through intermediaries).
      s_self: ``[C]`` self-novelty (needed by ``"leader"``).
    Returns ids ``0..F-1`` numbered by each federation's lowest client id.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {list(RULES)}, got {rule!r}")
    sparse = issparse(compatible)
    a = csr_matrix(compatible, dtype=bool) if sparse else np.asarray(compatible, bool)
    c = a.shape[0]
    if a.ndim != 2 or a.shape != (c, c):
        raise ValueError(f"compatibility must be square, got {a.shape}")
    if rule == "one_sided":
        if sparse:
            return _relabel(connected_components(a, directed=True, connection="weak")[1])
        return _relabel(_dense_components(a | a.T))
    mutual = a.multiply(a.T).tocsr() if sparse else a & a.T
    if rule == "mutual":
        if sparse:
            return _relabel(connected_components(mutual, directed=False)[1])
        return _relabel(_dense_components(mutual))
    if s_self is None or np.shape(s_self) != (c,):
        raise ValueError(f"rule='leader' needs s_self of shape ({c},)")
    lab = np.full(c, -1, np.int64)
    for leader in np.argsort(np.asarray(s_self), kind="stable"):
        if lab[leader] >= 0:
            continue
        lab[leader] = leader
        row = mutual.getrow(leader).indices if sparse else np.flatnonzero(mutual[leader])
        free = row[lab[row] < 0]
        lab[free] = leader
    return _relabel(lab)


# --------------------------------------------------------------------------------------------
# the whole pipeline
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Discovery:
    """Result of :func:`discover` (host arrays).

    Attributes:
      federation: ``[C]`` federation id per client, ``0..F-1``.
      scores: ``[C, C]`` novelty matrix ``S`` (dense mode) or ``None`` (sparse mode).
      edges, edge_scores: sparse mode: the scored edges and ``[E]`` scores ``S[dst, src]``.
      self_novelty: ``[C]`` ``S[i, i]``; self_std: ``[C]`` per-example spread of it.
      sigma: ``[C]`` the ``sigma_i`` used; z: normalised scores (``[C, C]`` or ``[E]``).
      eps: the tolerance used (after ``"auto"``); compatible: ``z <= eps``.
      bytes_up, bytes_down: ``[C]`` bytes each client sent / received for discovery.
      predictors: leaves ``[C, ...]`` the trained predictors (kept for newcomers);
      target_params, pair, config: what produced them.
      train_loss: ``[C]`` predictor training loss.
      timings: wall seconds per phase: ``split`` (probe rows), ``target`` (target cache),
        ``train`` (predictors), ``self`` (self-novelty), ``scores`` (the matrix or the edge
        scores), ``federations`` (sigma, eps, compatibility, extraction; host side).
      cpu_timings: process CPU seconds (all threads) per phase, the same keys; steadier than
        wall seconds when other jobs share the CPU.
      auto_silhouette: dense mode with ``eps="auto"``: the best candidate's silhouette
        (:func:`auto_eps`; below ``AUTO_MIN_SILHOUETTE`` means one federation was kept).
    """

    federation: np.ndarray
    scores: np.ndarray | None
    self_novelty: np.ndarray
    self_std: np.ndarray
    sigma: np.ndarray
    z: np.ndarray
    eps: float
    compatible: np.ndarray
    bytes_up: np.ndarray
    bytes_down: np.ndarray
    predictors: PyTree
    target_params: PyTree
    pair: RNDPair
    config: RNDConfig
    train_loss: np.ndarray
    edges: EdgeList | None = None
    edge_scores: np.ndarray | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    cpu_timings: dict[str, float] = dataclasses.field(default_factory=dict)
    auto_silhouette: float | None = None

    @property
    def num_federations(self) -> int:
        return int(self.federation.max()) + 1 if self.federation.size else 0

    @property
    def num_clients(self) -> int:
        return int(self.federation.shape[0])


class _Clock:
    """Wall and process CPU seconds per phase of :func:`discover`; waits for a phase's device
    arrays, so each phase is charged its own work (phases run one after another anyway)."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._last = (time.perf_counter(), time.process_time())

    def __call__(self, phase: str, value=None):
        value = jax.block_until_ready(value)
        now = (time.perf_counter(), time.process_time())
        self.times[phase] = self.times.get(phase, 0.0) + now[0] - self._last[0]
        self.cpu[phase] = self.cpu.get(phase, 0.0) + now[1] - self._last[1]
        self._last = now
        return value


def _drop_self_edges(edges: EdgeList) -> tuple[np.ndarray, np.ndarray]:
    src, dst = np.asarray(edges.src), np.asarray(edges.dst)
    w = np.asarray(edges.weight)
    keep = (src != dst) & (w != 0)  # self-loops and zero-weight padding carry no predictor
    pairs = np.unique(np.stack([src[keep], dst[keep]], 1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def discover(data: FederatedData, config: RNDConfig = RNDConfig(), *,
             key: jax.Array | None = None, mapper: ClientMapper | None = None,
             edges: EdgeList | None = None) -> Discovery:
    """Discover federations among ``data``'s clients with RND (labels and ``group`` unused).

    Args:
      data: the federated data (``x`` pool and per-client train/test rows).
      config: :class:`RNDConfig`.
      key: randomness for predictor init and batches (default ``key(config.seed)``).
      mapper: how the client axis is mapped (chunks / devices), as for training.
      edges: sparse mode: client ``dst`` scores only the predictors of its in-neighbours
        ``src`` (self-loops and zero-weight padding edges are ignored); ``None``: all pairs.
    """
    cfg = config
    if not isinstance(cfg, RNDConfig):
        raise TypeError(f"config must be an RNDConfig, got {type(cfg).__name__}")
    mapper = mapper or ClientMapper()
    key = jax.random.key(cfg.seed) if key is None else key
    pair = cfg.pair(data.feature_shape)
    c = data.num_clients
    clock = _Clock()
    tr_idx, tr_cnt, pr_idx, pr_cnt = probe_split(
        data, cfg.probe, holdout=cfg.holdout, cap=cfg.probe_cap,
        seed=int(jax.random.randint(jax.random.fold_in(key, 7), (), 0, 2**31 - 1)))
    clock("split")
    t_params = pair.target_params(cfg.seed)
    t_pool = clock("target", target_features(pair, t_params, data.x))
    preds, loss = clock("train", train_predictors(pair, cfg, data.x, t_pool, tr_idx, tr_cnt,
                                                  key, mapper))
    apply = pair.predictor.apply
    scorer = pair if cfg.fused else apply
    # to_host: with a mesh over several processes, per-client results are spread over hosts.
    s_self, s_std = (to_host(v, np.float64) for v in
                     clock("self", self_novelty(apply, preds, data.x, t_pool, pr_idx, pr_cnt,
                                                mapper)))
    nbytes = tree_bytes(jax.tree.map(lambda a: a[0], preds))
    if edges is None:
        s = to_host(clock("scores", novelty_matrix(
            scorer, preds, data.x, t_pool, pr_idx, pr_cnt, row_tile=cfg.row_tile,
            col_tile=cfg.col_tile, mapper=mapper, tile_evals=cfg.tile_evals)), np.float32)
        s_self = np.diag(s).copy()
        sigma = sigma_of(cfg.sigma, s, s_std)
        z = normalised_scores(s, s_self, sigma)
        silhouette = None
        if cfg.eps == "auto":
            eps, silhouette = auto_eps(z, rule=cfg.rule, return_score=True)
        else:
            eps = float(cfg.eps)
        comp = compatibility(z, eps)
        np.fill_diagonal(comp, True)
        fed = federations(comp, cfg.rule, s_self)
        # Up: its predictor and one row of scores; down: the other C - 1 predictors.
        up = np.full(c, nbytes + c * 4, np.float64)
        down = np.full(c, (c - 1) * nbytes, np.float64)
        clock("federations")
        return Discovery(fed, s, s_self, s_std, sigma, z, eps, comp, up, down, preds, t_params,
                         pair, cfg, to_host(loss), None, None, clock.times, clock.cpu,
                         silhouette)
    src, dst = _drop_self_edges(edges)
    e_scores = to_host(clock("scores", edge_novelty(
        scorer, preds, data.x, t_pool, pr_idx, pr_cnt,
        EdgeList(jnp.asarray(src), jnp.asarray(dst), jnp.ones(len(src))), cfg.edge_chunk,
        mapper)), np.float64)
    sigma = (s_std if cfg.sigma == "self"
             else _sparse_row_std(e_scores, dst, c, diag=s_self))
    z = normalised_scores(e_scores, s_self, sigma, rows=dst)
    eps = gap_eps(z) if cfg.eps == "auto" else float(cfg.eps)
    ok = compatibility(z, eps)
    # compatible[i, j]: i = dst (the scorer), j = src (the scored predictor).
    comp = coo_matrix((ok.astype(bool), (dst, src)), shape=(c, c)).tocsr()
    comp = (comp + csr_matrix((np.ones(c, bool), (np.arange(c), np.arange(c))),
                              shape=(c, c))).astype(bool)
    fed = federations(comp, cfg.rule, s_self)
    in_deg = np.bincount(dst, minlength=c)
    out_deg = np.bincount(src, minlength=c)
    # Peer to peer: a predictor to each out-neighbour and, back to it, the score it gave
    # (needed for the mutual check); received: in-neighbours' predictors and their scores.
    up = out_deg * float(nbytes) + in_deg * 4.0
    down = in_deg * float(nbytes) + out_deg * 4.0
    clock("federations")
    return Discovery(fed, None, s_self, s_std, sigma, z, eps, ok, up, down, preds, t_params,
                     pair, cfg, to_host(loss),
                     EdgeList(jnp.asarray(src), jnp.asarray(dst), jnp.ones(len(src))), e_scores,
                     clock.times, clock.cpu)


def assign_newcomers(disc: Discovery, new: FederatedData, *, key: jax.Array | None = None,
                     mapper: ClientMapper | None = None) -> np.ndarray:
    """Federation ids ``[C_new]`` for clients that arrive after discovery.

    Each newcomer trains its own predictor (same target, same schedule), then scores every
    existing predictor on its own probes. Its score for federation ``F`` is the mean of its
    scores of ``F``'s members' predictors; it joins the lowest-scoring federation when that
    score satisfies the compatibility rule ``m_F <= s_nn + eps * sigma_n`` (``eps`` and the
    sigma reading of ``disc``; the "row" sigma is over the newcomer's row: its self-novelty and
    its scores of all existing predictors). Newcomers compatible with no federation are grouped
    among themselves by ``disc``'s rule (their mutual scores, the row sigma over all they
    scored) into new federations numbered from ``disc.num_federations``.

    Returns ``[C_new]`` ids; bytes are not counted here (a newcomer downloads ``C``
    predictors and uploads its own plus one row of scores).
    """
    cfg, pair = disc.config, disc.pair
    if tuple(new.feature_shape) != tuple(disc.pair.feature_shape):
        raise ValueError(f"newcomers have features {tuple(new.feature_shape)}, the discovery "
                         f"was run on {disc.pair.feature_shape}")
    mapper = mapper or ClientMapper()
    key = jax.random.key(cfg.seed + 1) if key is None else key
    tr_idx, tr_cnt, pr_idx, pr_cnt = probe_split(
        new, cfg.probe, holdout=cfg.holdout, cap=cfg.probe_cap,
        seed=int(jax.random.randint(jax.random.fold_in(key, 7), (), 0, 2**31 - 1)))
    t_pool = target_features(pair, disc.target_params, new.x)
    preds, _ = train_predictors(pair, cfg, new.x, t_pool, tr_idx, tr_cnt, key, mapper)
    apply = pair.predictor.apply
    scorer = pair if cfg.fused else apply
    s_self, s_std = (np.asarray(v, np.float64) for v in
                     self_novelty(apply, preds, new.x, t_pool, pr_idx, pr_cnt, mapper))
    # [C_new, C]: each newcomer scores every existing predictor on its own probes.
    rows = np.asarray(novelty_matrix(scorer, disc.predictors, new.x, t_pool, pr_idx, pr_cnt,
                                     row_tile=cfg.row_tile, col_tile=cfg.col_tile,
                                     mapper=mapper, tile_evals=cfg.tile_evals), np.float32)
    f = disc.num_federations
    member = np.eye(f)[disc.federation]  # [C, F]
    fed_score = rows @ member / member.sum(0)  # [C_new, F]
    if cfg.sigma == "row":
        sigma = np.concatenate([s_self[:, None], rows], 1).std(1)
    else:
        sigma = s_std
    z = normalised_scores(fed_score, s_self, sigma)
    best = np.argmin(fed_score, axis=1)
    ok = z[np.arange(len(best)), best] <= disc.eps
    out = np.where(ok, best, -1).astype(np.int32)
    lost = np.flatnonzero(~ok)
    if lost.size:
        sub = jax.tree.map(lambda a: a[lost], preds)
        s_new = np.asarray(novelty_matrix(scorer, sub, new.x, t_pool, pr_idx[lost],
                                          pr_cnt[lost], row_tile=cfg.row_tile,
                                          col_tile=cfg.col_tile, mapper=mapper,
                                          tile_evals=cfg.tile_evals), np.float32)
        # The row sigma is over everything such a newcomer scored: the existing predictors
        # and the other unmatched newcomers' (a row of two alone would say nothing).
        sg = (np.concatenate([rows[lost], s_new], 1).std(1) if cfg.sigma == "row"
              else s_std[lost])
        zz = normalised_scores(s_new, np.diag(s_new), sg)
        comp = compatibility(zz, disc.eps)
        np.fill_diagonal(comp, True)
        out[lost] = f + federations(comp, cfg.rule, np.diag(s_new))
    return out
