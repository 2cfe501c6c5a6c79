"""The whole discovery pipeline: :func:`discover`, :class:`Discovery`, newcomers.

Pipeline (each step a module of :mod:`fedrnd.rnd`)::

    probes + predictors (predictors)  ->  target cache, self errors, fingerprints
      -> scores: dense S, Q or edge s, q (scoring)
      -> decision: scores -> federations (:func:`federations_from_scores`):
           criterion "test": paired test + Benjamini-Hochberg (stats) -> average linkage (extract)
           criterion "eps":  the paper's rule, eps / auto eps (rules) -> components (extract)

:func:`federations_from_scores` is the one function that turns scores into federations;
experiments and benchmarks call it on stored matrices instead of re-implementing the chain.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy.sparse import coo_matrix, csr_matrix

from fedrnd.data.federated import FederatedData, check_federated, id_list
from fedrnd.engine import ClientMapper, EdgeList, progress, tree_bytes
from fedrnd.engine.multihost import to_host
from fedrnd.rnd.config import RNDConfig
from fedrnd.rnd.defences import (
    Defences,
    check_uploads,
    consent_filter,
    replay_flags,
    robust_directions,
    robust_statistic,
)
from fedrnd.rnd.extract import _relabel, federations, linkage_test_federations
from fedrnd.rnd.fingerprints import candidate_edges, fingerprint_bytes, fingerprints
from fedrnd.rnd.networks import RNDPair, pool_inputs, pooled_shape, target_features
from fedrnd.rnd.predictors import probe_split, train_predictors
from fedrnd.rnd.rules import (
    _sparse_row_std,
    auto_eps,
    compatibility,
    gap_eps,
    normalised_scores,
    sigma_of,
)
from fedrnd.rnd.scoring import paired_edges, paired_matrix, self_errors
from fedrnd.rnd.stats import (
    bh_adjust,
    evidence,
    pair_pvalues,
    pair_statistic,
    paired_moments,
    symmetric_pvalues,
    symmetric_q,
    t_sf,
)

PyTree = Any

__all__ = ["Decision", "Discovery", "assign_newcomers", "discover", "federations_from_scores"]


# --------------------------------------------------------------------------------------------
# scores -> federations
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Decision:
    """What :func:`federations_from_scores` decided (host arrays).

    Attributes:
      federation: ``[C]`` federation ids ``0..F-1`` (numbered by lowest member).
      compatible: dense ``[C, C]`` bool (``compatible[i, j]``: ``j`` acceptable to ``i``) or
        ``[E]`` per edge (sparse).
      criterion: ``"test"`` or ``"eps"``.
      q: test: Benjamini-Hochberg adjusted p-values, ``[C, C]`` or ``[E]`` (one direction:
        row / ``dst`` tests the predictor of column / ``src``).
      evidence: test: the soft rejection of each unordered pair (dense ``[C, C]`` symmetric;
        sparse: ``[P]`` for ``pairs``).
      pairs: sparse test: ``[P, 2]`` the unordered observed pairs behind ``evidence``.
      z, sigma, eps: the paper's normalised scores, ``sigma_i`` and the tolerance (always
        computed: they are cheap and the reports show both criteria side by side).
      silhouette: dense ``eps="auto"``: the winning silhouette.
    """

    federation: np.ndarray
    compatible: np.ndarray
    criterion: str
    z: np.ndarray
    sigma: np.ndarray
    eps: float
    q: np.ndarray | None = None
    evidence: np.ndarray | None = None
    pairs: np.ndarray | None = None
    silhouette: float | None = None

    @property
    def num_federations(self) -> int:
        return int(self.federation.max()) + 1 if self.federation.size else 0


def federations_from_scores(scores: np.ndarray, config: RNDConfig = RNDConfig(), *,
                            second: np.ndarray | None = None,
                            count: np.ndarray | None = None,
                            s_self: np.ndarray | None = None,
                            self_std: np.ndarray | None = None,
                            edges: tuple[np.ndarray, np.ndarray] | None = None,
                            num_clients: int | None = None,
                            defences: Defences | None = None,
                            exclude: np.ndarray | None = None) -> Decision:
    """Turn novelty scores into federations with ``config``'s criterion.

    Dense: ``scores`` is ``S [C, C]`` (diagonal = self-novelty on the same probes). Sparse:
    ``scores`` is ``[E]`` with ``edges = (src, dst)`` (``dst`` scored ``src``'s predictor),
    ``s_self [C]`` and ``num_clients``.

    The test criterion also needs ``second`` (``Q`` of :func:`~fedrnd.rnd.scoring.paired_matrix`
    or ``q`` of :func:`~fedrnd.rnd.scoring.paired_edges`) and ``count [C]`` (probes per
    client). ``sigma="self"`` needs ``self_std [C]``.

    ``defences`` (:class:`~fedrnd.rnd.defences.Defences`, default: validation and the
    per-direction clip) are the decision's defences against lying clients; ``exclude`` (dense ``[C]``
    bool) leaves clients out of every federation, each alone (e.g. replayed predictors, found by
    :func:`~fedrnd.rnd.defences.replay_flags`); the other fields of the :class:`Decision` then
    hold the kept clients' values (excluded: compatible with themselves only, ``q = 1``, NaN).
    """
    cfg = config
    dfn = Defences() if defences is None else defences
    if dfn.validate:
        check_uploads(scores, second if cfg.criterion == "test" else None, edges=edges)
    if exclude is not None and np.any(exclude):
        if edges is not None:
            raise ValueError("exclude applies to dense scores only")
        return _without(np.asarray(exclude, bool), scores, cfg, second, count, self_std, dfn)
    if edges is None:
        s = np.asarray(scores, np.float32)
        c = s.shape[0]
        if s.ndim != 2 or s.shape != (c, c):
            raise ValueError(f"dense scores must be [C, C], got {s.shape}")
        s_self = np.diag(s).astype(np.float64)
        std = np.zeros(c) if self_std is None else np.asarray(self_std, np.float64)
        if cfg.sigma == "self" and self_std is None:
            raise ValueError("sigma='self' needs self_std")
        sigma = sigma_of(cfg.sigma, s, std)
        z = normalised_scores(s, s_self, sigma)
        if cfg.criterion == "eps":
            silhouette = None
            if cfg.eps == "auto":
                eps, silhouette = auto_eps(z, rule=cfg.rule, return_score=True)
            else:
                eps = float(cfg.eps)
            comp = compatibility(z, eps)
            np.fill_diagonal(comp, True)
            return Decision(federations(comp, cfg.rule, s_self), comp, "eps", z, sigma, eps,
                            silhouette=silhouette)
        _need(second, count)
        diff, se = paired_moments(s, second, s_self, count)
        q = bh_adjust(symmetric_pvalues(diff, se, s_self, count, cfg.min_effect))
        qs = symmetric_q(q)
        v = evidence(qs, cfg.alpha)
        np.fill_diagonal(v, 0.0)
        comp = qs > cfg.alpha
        np.fill_diagonal(comp, True)
        pi, pj, stat, err, df = pair_statistic(
            diff, se, s_self, count,
            directional=lambda r, sr, dense: robust_directions(r, sr, dfn, dense))
        stat, err = robust_statistic(stat, err, dfn)
        fed = linkage_test_federations(c, pi, pj, stat, err, df, alpha=cfg.alpha,
                                         min_effect=cfg.min_effect, dense=True,
                                         within_ratio=cfg.within_ratio)
        if dfn.consent is not None:
            # Member m accepts k by its own one-directional test (m's probes, k's predictor).
            accepts = bh_adjust(pair_pvalues(diff, se, s_self, count, cfg.min_effect)) > cfg.alpha
            fed = consent_filter(fed, accepts, dfn.consent, lambda ids: federations_from_scores(
                s[np.ix_(ids, ids)], cfg, second=np.asarray(second)[np.ix_(ids, ids)],
                count=np.asarray(count)[ids], self_std=std[ids], defences=dfn).federation)
        return Decision(fed, comp, "test", z, sigma, float("nan"), q=q, evidence=v)
    src, dst = (np.asarray(a, np.int64) for a in edges)
    e = np.asarray(scores, np.float64)
    if s_self is None or num_clients is None:
        raise ValueError("sparse scores need s_self and num_clients")
    c = int(num_clients)
    s_self = np.asarray(s_self, np.float64)
    if cfg.sigma == "self" and self_std is None:
        raise ValueError("sigma='self' needs self_std")
    sigma = (np.asarray(self_std, np.float64) if cfg.sigma == "self"
             else _sparse_row_std(e, dst, c, diag=s_self))
    z = normalised_scores(e, s_self, sigma, rows=dst)
    if cfg.criterion == "eps":
        eps = gap_eps(z) if cfg.eps == "auto" else float(cfg.eps)
        ok = compatibility(z, eps)
        # compatible[i, j]: i = dst (the scorer), j = src (the scored predictor).
        comp = coo_matrix((ok.astype(bool), (dst, src)), shape=(c, c)).tocsr()
        comp = (comp + csr_matrix((np.ones(c, bool), (np.arange(c), np.arange(c))),
                                  shape=(c, c))).astype(bool)
        return Decision(federations(comp, cfg.rule, s_self), ok, "eps", z, sigma, eps)
    _need(second, count)
    diff, se = paired_moments(e, second, s_self, count, rows=dst)
    q = bh_adjust(symmetric_pvalues(diff, se, s_self, count, cfg.min_effect, edges=(src, dst),
                                    num_clients=c), rows=dst, num_rows=c)
    # One value per unordered pair: the stronger rejection of its two directions.
    lo, hi = np.minimum(src, dst), np.maximum(src, dst)
    key = lo * c + hi
    uniq, inv = np.unique(key, return_inverse=True)
    qmin = np.full(len(uniq), np.inf)
    np.minimum.at(qmin, inv, q)
    v = evidence(qmin, cfg.alpha)
    pairs = np.stack([uniq // c, uniq % c], 1)
    pi, pj, stat, err, df = pair_statistic(
        diff, se, s_self, count, edges=(src, dst), num_clients=c,
        directional=lambda r, sr, dense: robust_directions(r, sr, dfn, dense))
    stat, err = robust_statistic(stat, err, dfn)
    if dfn.consent is not None:
        raise ValueError("Defences.consent needs dense scores (sparse consent is not built)")
    fed = linkage_test_federations(c, pi, pj, stat, err, df, alpha=cfg.alpha,
                                     min_effect=cfg.min_effect, min_support=cfg.min_support,
                                     dense=False, within_ratio=cfg.within_ratio)
    return Decision(fed, qmin[inv] > cfg.alpha, "test", z, sigma, float("nan"), q=q,
                    evidence=v, pairs=pairs)


def _without(out, scores, cfg, second, count, self_std, dfn) -> Decision:
    """:func:`federations_from_scores` on the clients not in ``out``; ``out`` alone."""
    keep = np.flatnonzero(~out)
    c = out.shape[0]
    ix = np.ix_(keep, keep)
    sub = lambda a: None if a is None else np.asarray(a)[ix]  # noqa: E731
    vec = lambda a: None if a is None else np.asarray(a)[keep]  # noqa: E731
    dec = federations_from_scores(np.asarray(scores)[ix], cfg, second=sub(second),
                                  count=vec(count), self_std=vec(self_std), defences=dfn)

    def full(a, fill):
        if a is None:
            return None
        b = np.full((c, c) if a.ndim == 2 else (c,), fill, a.dtype)
        b[ix if a.ndim == 2 else keep] = a
        if a.ndim == 2 and a.dtype == bool:
            np.fill_diagonal(b, True)
        return b

    fed = np.empty(c, np.int64)
    fed[keep] = dec.federation
    fed[out] = dec.num_federations + np.arange(int(out.sum()))
    v = full(dec.evidence, 1.0)
    if v is not None:
        np.fill_diagonal(v, 0.0)
    return dataclasses.replace(
        dec, federation=_relabel(fed), compatible=full(dec.compatible, False),
        z=full(dec.z, np.nan), sigma=full(dec.sigma, np.nan), q=full(dec.q, 1.0), evidence=v)


def _need(second, count):
    if second is None or count is None:
        raise ValueError("criterion='test' needs the paired second moments (second=) and the "
                         "probe counts (count=); score with paired_matrix / paired_edges")


# --------------------------------------------------------------------------------------------
# the whole pipeline
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Discovery:
    """Result of :func:`discover` (host arrays).

    Attributes:
      federation: ``[C]`` federation id per client, ``0..F-1``.
      scores: ``[C, C]`` novelty matrix ``S`` (dense mode) or ``None`` (sparse mode).
      second: ``Q`` (dense ``[C, C]``) or ``[E]``: mean squared paired difference against the
        scoring client's own predictor (:func:`~fedrnd.rnd.scoring.paired_matrix`).
      probe_count: ``[C]`` probes per client.
      edges, edge_scores: sparse mode: the scored edges and ``[E]`` scores ``S[dst, src]``.
      self_novelty: ``[C]`` ``S[i, i]``; self_std: ``[C]`` per-example spread of it.
      decision: the :class:`Decision` (criterion, q-values, evidence, z, eps).
      sigma, z, eps, compatible, auto_silhouette: shortcuts into ``decision``.
      bytes_up, bytes_down: ``[C]`` bytes each client sent / received for discovery
        (fingerprints and candidate lists included in the two-stage mode).
      predictors: leaves ``[C, ...]`` the trained predictors (kept for newcomers);
      target_params, pair, config: what produced them.
      train_loss: ``[C]`` predictor training loss.
      fingerprint: two-stage mode: ``[C, 2 * out_dim]`` the fingerprints.
      timings: wall seconds per phase: ``split``, ``target``, ``train``, ``self``,
        ``candidates`` (two-stage), ``scores``, ``federations`` (host side).
      cpu_timings: process CPU seconds (all threads) per phase, the same keys.
    """

    federation: np.ndarray
    scores: np.ndarray | None
    self_novelty: np.ndarray
    self_std: np.ndarray
    decision: Decision
    bytes_up: np.ndarray
    bytes_down: np.ndarray
    predictors: PyTree
    target_params: PyTree
    pair: RNDPair
    config: RNDConfig
    train_loss: np.ndarray
    probe_count: np.ndarray
    second: np.ndarray | None = None
    edges: EdgeList | None = None
    edge_scores: np.ndarray | None = None
    fingerprint: np.ndarray | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    cpu_timings: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def sigma(self) -> np.ndarray:
        return self.decision.sigma

    @property
    def z(self) -> np.ndarray:
        return self.decision.z

    @property
    def eps(self) -> float:
        return self.decision.eps

    @property
    def compatible(self) -> np.ndarray:
        return self.decision.compatible

    @property
    def auto_silhouette(self) -> float | None:
        return self.decision.silhouette

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


def _deciding(cfg: RNDConfig, c: int, edges: int | None = None) -> None:
    """Say that the host-side decision starts: one step without a count that took 40-90 s at
    10,000 clients (``federations`` in the timings of ``experiments/discovery/cells``)."""
    on = f"{c}x{c} scores" if edges is None else f"{edges} edge scores"
    progress.note(f"rnd: deciding federations from {on} (criterion {cfg.criterion}) ...")


def _drop_self_edges(edges: EdgeList) -> tuple[np.ndarray, np.ndarray]:
    src, dst = np.asarray(edges.src), np.asarray(edges.dst)
    w = np.asarray(edges.weight)
    keep = (src != dst) & (w != 0)  # self-loops and zero-weight padding carry no predictor
    pairs = np.unique(np.stack([src[keep], dst[keep]], 1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def discover(data: FederatedData, config: RNDConfig = RNDConfig(), *,
             key: jax.Array | None = None, mapper: ClientMapper | None = None,
             edges: EdgeList | None = None, attack: Any = None,
             defences: Defences | None = None) -> Discovery:
    """Discover federations among ``data``'s clients with RND (labels and ``group`` unused).

    Args:
      data: the federated data (``x`` pool and per-client train/test rows).
      config: :class:`RNDConfig` (criterion, probes, dense or two-stage).
      key: randomness for predictor init and batches (default ``key(config.seed)``).
      mapper: how the client axis is mapped (chunks / devices), as for training.
      edges: sparse mode with a given graph: client ``dst`` scores only the predictors of its
        in-neighbours ``src`` (self-loops and zero-weight padding edges are ignored). ``None``:
        every pair, or with ``config.candidates`` the fingerprint candidates.
      attack: an :class:`~fedrnd.rnd.adversarial.AttackConfig`: the clients it names upload
        what its strategy says instead of their honest predictor and scores (dense: their rows
        and columns re-scored, :func:`~fedrnd.rnd.adversarial.attack_uploads`; sparse: their
        inputs replaced before the edges are scored,
        :func:`~fedrnd.rnd.adversarial.attack_inputs`).
      defences: :class:`~fedrnd.rnd.defences.Defences` of the decision (default: uploads are
        validated and each direction of the pair statistic clipped;
        :data:`~fedrnd.rnd.defences.STRICT`: every defence).
    """
    cfg = config
    dfn = Defences() if defences is None else defences
    if not isinstance(cfg, RNDConfig):
        raise TypeError(f"config must be an RNDConfig, got {type(cfg).__name__}")
    # NaN inputs would otherwise come back as NaN scores and arbitrary federations.
    check_federated(data, "data", labels=False)
    mapper = mapper or ClientMapper()
    key = jax.random.key(cfg.seed) if key is None else key
    pair = cfg.pair(data.feature_shape)
    c = data.num_clients
    clock = _Clock()
    pool = cfg.pool_factor(data.feature_shape)
    if pool > 1:  # the pair sees coarser images (the pool is pooled once)
        data = data.replace(x=pool_inputs(data.x, pool))
    tr_idx, tr_cnt, pr_idx, pr_cnt = probe_split(
        data, cfg.probe_kind, holdout=cfg.holdout, cap=cfg.probe_cap,
        seed=int(jax.random.randint(jax.random.fold_in(key, 7), (), 0, 2**31 - 1)))
    clock("split")
    t_params = pair.target_params(cfg.seed)
    t_pool = clock("target", target_features(pair, t_params, data.x))
    preds, loss = clock("train", train_predictors(pair, cfg, data.x, t_pool, tr_idx, tr_cnt,
                                                  key, mapper))
    apply = pair.predictor.apply
    scorer = pair if cfg.fused else apply
    # to_host: with a mesh over several processes, per-client results are spread over hosts.
    s_self, s_std, e_self = clock("self", self_errors(apply, preds, data.x, t_pool, pr_idx,
                                                      pr_cnt, mapper))
    s_self, s_std = to_host(s_self, np.float64), to_host(s_std, np.float64)
    _check_self_errors(cfg, s_self, loss)
    nbytes = tree_bytes(jax.tree.map(lambda a: a[0], preds))
    count = np.asarray(pr_cnt)
    fp = None
    if edges is None and cfg.candidates is None:
        s, q2 = (to_host(v, np.float32) for v in clock("scores", paired_matrix(
            scorer, preds, data.x, t_pool, pr_idx, pr_cnt, e_self, row_tile=cfg.row_tile,
            col_tile=cfg.col_tile, mapper=mapper, tile_evals=cfg.tile_evals)))
        if attack is not None:  # only the attackers' rows and columns are scored again
            from fedrnd.rnd.adversarial import attack_uploads

            preds, s, q2, s_std = attack_uploads(attack, data, cfg, pair, key, mapper, preds,
                                                 t_pool, tr_idx, tr_cnt, pr_idx, pr_cnt,
                                                 e_self, s, q2, s_std)
            clock("attack")
        _check_scores(cfg, s, q2)
        s_self = np.diag(s).astype(np.float64)
        out = replay_flags(apply, preds, pair.feature_shape, dfn, cfg.seed)
        _deciding(cfg, c)
        dec = federations_from_scores(s, cfg, second=q2, count=count, self_std=s_std,
                                      defences=dataclasses.replace(dfn, validate=False),
                                      exclude=out)
        # Up: its predictor and one row of scores (and of second moments for the test);
        # down: the other C - 1 predictors.
        row = c * 4 * (2 if cfg.criterion == "test" else 1)
        up = np.full(c, nbytes + row, np.float64)
        down = np.full(c, (c - 1) * nbytes, np.float64)
        clock("federations")
        return Discovery(dec.federation, s, s_self, s_std, dec, up, down, preds, t_params,
                         pair, cfg, to_host(loss), count, q2, None, None, None, clock.times,
                         clock.cpu)
    extra_up = np.zeros(c)
    extra_down = np.zeros(c)
    fp_idx, att = tr_idx, np.zeros(0, np.int64)
    if attack is not None:  # the attackers' inputs to scoring replaced before it
        from fedrnd.rnd.adversarial import attack_inputs, forge_edges

        preds, pr_idx, e_self, s_self, s_std, fp_idx, att = attack_inputs(
            attack, data, cfg, pair, key, mapper, preds, t_pool, tr_idx, tr_cnt, pr_idx,
            pr_cnt, e_self, s_self, s_std)
        clock("attack")
    if edges is None:
        fp = fingerprints(t_pool, fp_idx, tr_cnt)
        edges = candidate_edges(fp, int(cfg.candidates), cfg.random_peers,
                                seed=int(cfg.seed) + 1)
        clock("candidates")
        # Each client sends its fingerprint; the coordinator returns its candidate list.
        extra_up += fingerprint_bytes(pair.out_dim)
        extra_down += np.bincount(np.asarray(edges.dst), minlength=c) * 4.0
    src, dst = _drop_self_edges(edges)
    e_scores, e_q2 = (to_host(v, np.float64) for v in clock("scores", paired_edges(
        scorer, preds, data.x, t_pool, pr_idx, pr_cnt, e_self,
        EdgeList(jnp.asarray(src), jnp.asarray(dst), jnp.ones(len(src))), cfg.edge_chunk,
        mapper)))
    if attack is not None and attack.row is not None:
        e_scores, e_q2 = forge_edges(e_scores, e_q2, src, dst, s_self, att, attack.row)
    _check_scores(cfg, e_scores, e_q2, (src, dst))
    # Replayed predictors (when that defence is on) leave the decision: their edges dropped,
    # each flagged client alone.
    out = replay_flags(apply, preds, pair.feature_shape, dfn, cfg.seed)
    kept = ~(out[src] | out[dst])
    _deciding(cfg, c, len(src))
    dec = federations_from_scores(e_scores[kept], cfg, second=e_q2[kept], count=count,
                                  s_self=s_self, self_std=s_std, edges=(src[kept], dst[kept]),
                                  num_clients=c, defences=dataclasses.replace(dfn, validate=False))
    in_deg = np.bincount(dst, minlength=c)
    out_deg = np.bincount(src, minlength=c)
    # Peer to peer: a predictor to each out-neighbour and, back to it, the score it gave
    # (needed for the mutual check; the test also returns the second moment);
    # received: in-neighbours' predictors and their scores.
    per_score = 8.0 if cfg.criterion == "test" else 4.0
    up = out_deg * float(nbytes) + in_deg * per_score + extra_up
    down = in_deg * float(nbytes) + out_deg * per_score + extra_down
    clock("federations")
    return Discovery(dec.federation, None, s_self, s_std, dec, up, down, preds, t_params, pair,
                     cfg, to_host(loss), count, e_q2,
                     EdgeList(jnp.asarray(src), jnp.asarray(dst), jnp.ones(len(src))), e_scores,
                     fp, clock.times, clock.cpu)


def _diverged(cfg: RNDConfig) -> str:
    return (f"predictor training diverged (inputs are finite); lower RNDConfig.lr (now "
            f"{cfg.lr:g}) or rescale the features")


def _check_self_errors(cfg: RNDConfig, s_self: np.ndarray, loss: jax.Array) -> None:
    """Raise naming the clients whose predictor's self-error is NaN/inf.

    Non-finite scores would otherwise turn into an opaque error in the test criterion or,
    with ``eps``, into singleton federations. Finite runs are untouched (only read here).
    """
    bad = np.flatnonzero(~np.isfinite(s_self))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"discover: the predictors of client(s) {id_list(bad)} ({bad.size} of "
                         f"{s_self.size}) have a non-finite self-error (client {i}: "
                         f"{s_self[i]}, training loss {to_host(loss, np.float64)[i]}); "
                         f"{_diverged(cfg)}")


def _check_scores(cfg: RNDConfig, scores: np.ndarray, second: np.ndarray,
                  edges: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Raise naming the clients behind NaN/inf or negative novelty scores (dense ``[C, C]``
    or ``[E]``; :func:`~fedrnd.rnd.defences.check_uploads`, always on in :func:`discover`).

    A predictor can have a finite self-error and still overflow on other clients' probes, and
    a client can upload a forged row. The second moments count only where the criterion reads
    them (``"test"``): there an overflowing ``Q`` would make every test pass.
    """
    check_uploads(scores, second if cfg.criterion == "test" else None, edges=edges,
                  hint=f"; either a forged upload or {_diverged(cfg)}")


def assign_newcomers(disc: Discovery, new: FederatedData, *, key: jax.Array | None = None,
                     mapper: ClientMapper | None = None) -> np.ndarray:
    """Federation ids ``[C_new]`` for clients that arrive after discovery.

    Each newcomer trains its own predictor (same target, same schedule, same probe split),
    then scores every existing predictor on its own probes.

    * criterion ``"test"``: the mean log novelty ratio of each federation's predictors on the
      newcomer's held-out probes (over its own predictor, :mod:`fedrnd.rnd.stats`); it joins
      the federation of lowest mean ratio unless a one-sided test rejects "excess <= min_effect" at ``alpha`` (spread
      over members or the probes' own noise, whichever is larger). One direction only
      (members do not score the newcomer's predictor), so an unusually good or bad newcomer
      predictor shifts all its scores; the test on a whole federation is the safeguard.
    * criterion ``"eps"``: its score for federation ``F`` is the mean of its scores of ``F``'s
      members' predictors; it joins the lowest-scoring federation when
      ``m_F <= s_nn + eps * sigma_n`` (the "row" sigma over the newcomer's row).

    Newcomers that join no federation are grouped among themselves by the same criterion
    (their mutual scores) into new federations numbered from ``disc.num_federations``.
    Bytes are not counted here (a newcomer downloads ``C`` predictors and uploads its own).
    """
    cfg, pair = disc.config, disc.pair
    check_federated(new, "newcomers", labels=False)
    shape = tuple(new.feature_shape)
    pool = cfg.pool_factor(shape)
    if pooled_shape(shape, pool) != tuple(disc.pair.feature_shape):
        raise ValueError(f"newcomers have features {shape}, the discovery was run on "
                         f"{disc.pair.feature_shape} (after input_pool = {pool})")
    if pool > 1:
        new = new.replace(x=pool_inputs(new.x, pool))
    mapper = mapper or ClientMapper()
    key = jax.random.key(cfg.seed + 1) if key is None else key
    tr_idx, tr_cnt, pr_idx, pr_cnt = probe_split(
        new, cfg.probe_kind, holdout=cfg.holdout, cap=cfg.probe_cap,
        seed=int(jax.random.randint(jax.random.fold_in(key, 7), (), 0, 2**31 - 1)))
    t_pool = target_features(pair, disc.target_params, new.x)
    preds, _ = train_predictors(pair, cfg, new.x, t_pool, tr_idx, tr_cnt, key, mapper)
    apply = pair.predictor.apply
    scorer = pair if cfg.fused else apply
    s_self, s_std, e_self = self_errors(apply, preds, new.x, t_pool, pr_idx, pr_cnt, mapper)
    s_self, s_std = np.asarray(s_self, np.float64), np.asarray(s_std, np.float64)
    count = np.asarray(pr_cnt)
    tiles = dict(row_tile=cfg.row_tile, col_tile=cfg.col_tile, mapper=mapper,
                 tile_evals=cfg.tile_evals)
    # [C_new, C]: each newcomer scores every existing predictor on its own probes.
    rows, rows_q = (np.asarray(v, np.float64) for v in paired_matrix(
        scorer, disc.predictors, new.x, t_pool, pr_idx, pr_cnt, e_self, **tiles))
    f = disc.num_federations
    member = np.eye(f)[disc.federation]  # [C, F]
    if cfg.criterion == "test":
        diff, se = paired_moments(rows, rows_q, s_self, count)
        base = np.where(s_self > 0, s_self, np.finfo(np.float64).tiny)[:, None]
        ratio = np.maximum(diff / base, -1.0 + 1e-12)  # as fedrnd.rnd.stats._relative
        r, sr = np.log1p(ratio), se / (base * (1.0 + ratio))
        size = member.sum(0)
        fed_r = r @ member / size  # [C_new, F] mean log novelty ratio per federation
        emp = np.maximum(r * r @ member / size - fed_r ** 2, 0.0) / size
        meas = (sr * sr) @ member / size  # the newcomer's probes are shared by all members
        var = np.maximum(emp, meas)
        t = (fed_r - cfg.min_effect) / np.sqrt(np.where(var > 0, var, np.inf))
        p = t_sf(t, np.maximum(count[:, None] - 1, 1))
        best = np.argmin(fed_r, axis=1)
        ok = p[np.arange(len(best)), best] > cfg.alpha
    else:
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
        s_new, q_new = (np.asarray(v, np.float32) for v in paired_matrix(
            scorer, sub, new.x, t_pool, pr_idx[lost], pr_cnt[lost], e_self[lost], **tiles))
        if cfg.criterion == "test":
            sub_cfg = cfg
        else:
            # The row sigma is over everything such a newcomer scored: the existing
            # predictors and the other unmatched newcomers' (a row of two alone says nothing).
            sub_cfg = dataclasses.replace(cfg, eps=disc.eps)
        std = (np.concatenate([rows[lost], s_new], 1).std(1) if cfg.sigma == "row"
               else s_std[lost])
        dec = _newcomer_decision(s_new, q_new, count[lost], std, sub_cfg)
        out[lost] = f + dec
    return out


def _newcomer_decision(s_new, q_new, count, row_std, cfg):
    if cfg.criterion == "test":
        return federations_from_scores(s_new, cfg, second=q_new, count=count).federation
    z = normalised_scores(s_new, np.diag(s_new), row_std)
    comp = compatibility(z, float(cfg.eps))
    np.fill_diagonal(comp, True)
    return federations(comp, cfg.rule, np.diag(s_new))
