"""Adversarial clients in RND discovery: an attack harness applied at the level of uploads.

A client uploads two things to discovery: its predictor (every other client scores it, so it
becomes a column of ``S`` and of the per-probe differences) and its own row of scores. An
:class:`AttackConfig` names attacker clients and what they upload instead:

* ``predictor`` (the column): ``"replay"`` a copy of a victim's predictor, ``"junk"`` a
  constant predictor (all parameters 0, output 0), ``"other_group"`` a predictor trained on
  the data of ``target_group`` (a tuple of groups: an even mixture), ``None`` its own honest
  predictor. The attacker's row is then scored honestly with that predictor as its own, on
  its own probes, except for ``"other_group"``: there on probes drawn from the target group
  too, so the attacker uploads exactly what a member of that group would (it *is* one, as far
  as any upload shows).
* ``row`` (the row, off the diagonal): ``"zeros"`` (every peer perfect on my data),
  ``"constant"`` (every peer exactly as good as mine), ``"reversed"`` (the honest values in
  reversed order: best peers worst), ``"nan"``, ``"inf"``; ``None``: the honest row.
* ``sybil=k``: attackers come in blocks of ``k`` identities that upload one predictor.

Efficient by design: honest predictors are trained and scored once (:func:`prepare`); an
attack replaces only the attackers' predictors and re-scores only their rows and columns
(:func:`attack_uploads`), so many strategies are evaluated on one population at the cost of
``A`` rows and ``A`` columns each. :func:`fedrnd.rnd.discover` takes ``attack=`` and calls the
same function. The defences are in :mod:`fedrnd.rnd.defences`; the threat model in
``docs/methods/threat-model.md``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.metrics import adjusted_rand_score

from fedrnd.data.federated import FederatedData, check_federated
from fedrnd.engine import ClientMapper
from fedrnd.engine.multihost import to_host
from fedrnd.rnd.config import RNDConfig
from fedrnd.rnd.defences import Defences, replay_flags
from fedrnd.rnd.networks import RNDPair, pool_inputs, target_features
from fedrnd.rnd.pipeline import Decision, federations_from_scores
from fedrnd.rnd.predictors import probe_split, train_predictors
from fedrnd.rnd.scoring import paired_matrix, self_errors

PyTree = Any

__all__ = ["PREDICTOR_ATTACKS", "ROW_ATTACKS", "AttackConfig", "Population", "Uploads",
           "attack_inputs", "attack_population", "attack_uploads", "decide", "forge_edges",
           "forge_rows", "outcome", "prepare"]

PREDICTOR_ATTACKS = ("replay", "junk", "other_group")
ROW_ATTACKS = ("zeros", "constant", "reversed", "nan", "inf")


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """Who attacks and with what (hashable).

    Attributes:
      predictor: what the attackers upload as predictor (``PREDICTOR_ATTACKS`` or ``None``).
      row: how the attackers forge their score row (``ROW_ATTACKS`` or ``None``).
      clients: the attacker ids; ``None``: ``round(fraction * C)`` clients drawn with ``seed``
        from outside ``target_group`` (an attacker inside it has nothing to gain).
      fraction: share of attackers when ``clients`` is ``None``.
      target_group: the group (or tuple of groups, a mixture) an ``"other_group"`` predictor
        is trained on, whose members a ``"replay"`` attacker copies, and that the attackers
        want to join (:func:`outcome`). Uses ``data.group``: the attacker knows the groups.
      target_client: ``"replay"``: the one victim every attacker copies.
      sybil: identities per attacker: blocks of ``sybil`` consecutive attackers upload one
        predictor (the block's first).
      seed: draws attackers, victims and the rows an ``"other_group"`` predictor trains on.
    """

    predictor: str | None = None
    row: str | None = None
    clients: tuple[int, ...] | None = None
    fraction: float = 0.0
    target_group: int | tuple[int, ...] | None = None
    target_client: int | None = None
    sybil: int = 1
    seed: int = 0

    def __post_init__(self):
        if self.clients is not None:
            object.__setattr__(self, "clients", tuple(int(i) for i in np.ravel(self.clients)))
        if isinstance(self.target_group, list | np.ndarray):
            object.__setattr__(self, "target_group", tuple(int(g) for g in self.target_group))
        if self.predictor not in (None, *PREDICTOR_ATTACKS):
            raise ValueError(f"predictor attack must be one of {list(PREDICTOR_ATTACKS)} or "
                             f"None, got {self.predictor!r}")
        if self.row not in (None, *ROW_ATTACKS):
            raise ValueError(f"row attack must be one of {list(ROW_ATTACKS)} or None, got "
                             f"{self.row!r}")
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {self.fraction}")
        if self.sybil < 1:
            raise ValueError(f"sybil must be >= 1, got {self.sybil}")
        if self.predictor == "other_group" and self.target_group is None:
            raise ValueError("predictor='other_group' needs target_group")
        if (self.predictor == "replay" and self.target_client is None
                and self.target_group is None):
            raise ValueError("predictor='replay' needs target_client or target_group")

    @property
    def name(self) -> str:
        """``"predictor+row"`` with ``honest`` for an unchanged part, ``xk`` for Sybils."""
        s = f"{self.predictor or 'honest'}+{self.row or 'honest'}"
        return s + (f"x{self.sybil}" if self.sybil > 1 else "")

    def targets(self) -> tuple[int, ...]:
        g = self.target_group
        return () if g is None else (g,) if isinstance(g, int | np.integer) else tuple(g)

    def attackers(self, groups: np.ndarray) -> np.ndarray:
        """Sorted attacker ids ``[A]`` for a population with true ``groups [C]``."""
        c = len(groups)
        if self.clients is not None:
            ids = np.unique(np.asarray(self.clients, np.int64))
            if ids.size and (ids.min() < 0 or ids.max() >= c):
                raise ValueError(f"attacker ids must be in [0, {c}), got {self.clients}")
            return ids
        pool = np.flatnonzero(~np.isin(groups, self.targets()))
        if self.target_client is not None:
            pool = pool[pool != self.target_client]
        n = min(int(round(self.fraction * c)), pool.size)
        rng = np.random.default_rng(self.seed)
        return np.sort(rng.choice(pool, n, replace=False)).astype(np.int64)


# --------------------------------------------------------------------------------------------
# forged rows (pure numpy: also used on synthetic scores)
# --------------------------------------------------------------------------------------------


def forge_rows(scores: np.ndarray, second: np.ndarray, attackers: np.ndarray, how: str
               ) -> tuple[np.ndarray, np.ndarray]:
    """Copies of ``S, Q [C, C]`` with the attackers' rows forged off the diagonal (``how`` in
    ``ROW_ATTACKS``). The diagonal (the attacker's self-novelty) is kept; forged ``Q`` claims
    no spread (``Q = (S_aj - S_aa)^2``, a standard error of 0: as confident as possible)."""
    if how not in ROW_ATTACKS:
        raise ValueError(f"row attack must be one of {list(ROW_ATTACKS)}, got {how!r}")
    s, q = np.array(scores, copy=True), np.array(second, copy=True)
    c = s.shape[0]
    for a in np.asarray(attackers, np.int64):
        off = np.arange(c) != a
        own = s[a, a]
        if how == "zeros":
            s[a, off] = 0.0
        elif how == "constant":
            s[a, off] = own
        elif how == "reversed":
            cols = np.flatnonzero(off)
            order = cols[np.argsort(s[a, cols], kind="stable")]
            s[a, order] = s[a, order[::-1]]
            q[a, order] = q[a, order[::-1]]
            continue
        else:
            s[a, off] = np.nan if how == "nan" else np.inf
        q[a, off] = (s[a, off] - own) ** 2
    return s, q


# --------------------------------------------------------------------------------------------
# predictors and their rows / columns
# --------------------------------------------------------------------------------------------


def _victims(attack: AttackConfig, attackers: np.ndarray, groups: np.ndarray) -> np.ndarray:
    if attack.target_client is not None:
        return np.full(attackers.size, int(attack.target_client))
    members = np.flatnonzero(np.isin(groups, attack.targets()))
    if members.size == 0:
        raise ValueError(f"target_group {attack.target_group} has no members")
    return np.random.default_rng(attack.seed + 1).choice(members, attackers.size)


def _group_rows(attack, attackers, groups, tr_idx, tr_cnt, salt=2):
    """Rows ``[A, N]`` drawn from the target group(s)' rows ``tr_idx`` (training or probe
    rows), as many as each attacker has."""
    rng = np.random.default_rng(attack.seed + salt)
    tr_idx, tr_cnt = np.asarray(tr_idx), np.asarray(tr_cnt)
    pools = []
    for g in attack.targets():
        m = np.flatnonzero(groups == g)
        if m.size == 0:
            raise ValueError(f"target_group {g} has no members")
        pools.append(np.concatenate([tr_idx[i, :tr_cnt[i]] for i in m]))
    out = np.zeros((attackers.size, tr_idx.shape[1]), tr_idx.dtype)
    for k, a in enumerate(attackers):
        n = int(tr_cnt[a])
        per = np.array_split(np.arange(n), len(pools))  # an even mixture of the groups
        rows = [rng.choice(p, len(s), replace=len(s) > p.size) for p, s in zip(pools, per,
                                                                               strict=True)]
        out[k, :n] = np.concatenate(rows)
    return out


def _attack_predictors(attack, attackers, groups, preds, pair, cfg, x, t_pool, tr_idx, tr_cnt,
                       key, mapper):
    """The attackers' predictors, leaves ``[A, ...]``."""
    if attack.predictor == "replay":
        v = _victims(attack, attackers, groups)
        new = jax.tree.map(lambda a: a[v], preds)
    elif attack.predictor == "junk":
        new = jax.tree.map(lambda a: jnp.zeros_like(a[attackers]), preds)
    elif attack.predictor == "other_group":
        rows = _group_rows(attack, attackers, groups, tr_idx, tr_cnt)
        # The same key: the shared init of the honest predictors (indistinguishable start).
        new, _ = train_predictors(pair, cfg, x, t_pool, jnp.asarray(rows),
                                  jnp.asarray(tr_cnt)[attackers], key, mapper)
    else:
        new = jax.tree.map(lambda a: a[attackers], preds)
    if attack.sybil > 1:  # each block's identities upload the block's first predictor
        first = (np.arange(attackers.size) // attack.sybil) * attack.sybil
        new = jax.tree.map(lambda a: a[first], new)
    return new


def attack_uploads(attack: AttackConfig, data: FederatedData, cfg: RNDConfig, pair: RNDPair,
                   key: jax.Array, mapper: ClientMapper | None, preds: PyTree,
                   t_pool: jax.Array, tr_idx, tr_cnt, pr_idx, pr_cnt, e_self,
                   scores: np.ndarray, second: np.ndarray, self_std: np.ndarray):
    """Replace the attackers' uploads in honest dense scores.

    ``data`` (after ``input_pool``), ``preds``, ``t_pool``, the train / probe split and
    ``e_self`` are :func:`~fedrnd.rnd.discover`'s; ``scores, second [C, C]`` and
    ``self_std [C]`` its honest results. Returns ``(preds, scores, second, self_std)`` with the
    attackers' predictors in place, their columns re-scored by every client and their rows
    re-scored on their own probes with their new predictor as their own (``A`` rows and ``A``
    columns, not ``C^2``), then forged by ``attack.row``.
    """
    groups = np.asarray(data.group)
    att = attack.attackers(groups)
    s = np.array(scores, np.float32, copy=True)
    q = np.array(second, np.float32, copy=True)
    std = np.array(self_std, np.float64, copy=True)
    if att.size == 0:
        return preds, s, q, std
    mapper = mapper or ClientMapper()
    if attack.predictor is not None or attack.sybil > 1:
        new = _attack_predictors(attack, att, groups, preds, pair, cfg, data.x, t_pool, tr_idx,
                                 tr_cnt, key, mapper)
        preds = jax.tree.map(lambda a, b: a.at[att].set(b), preds, new)
        apply = pair.predictor.apply
        scorer = pair if cfg.fused else apply
        tiles = dict(row_tile=cfg.row_tile, col_tile=cfg.col_tile, mapper=mapper,
                     tile_evals=cfg.tile_evals)
        cols, cols_q = (to_host(v, np.float32) for v in paired_matrix(
            scorer, new, data.x, t_pool, pr_idx, pr_cnt, e_self, **tiles))
        s[:, att], q[:, att] = cols, cols_q
        a_idx, a_cnt = pr_idx[att], pr_cnt[att]
        if attack.predictor == "other_group":  # it scores on the target group's data too
            a_idx = jnp.asarray(_group_rows(attack, att, groups, pr_idx, pr_cnt, salt=3))
        _, s_std_a, e_a = self_errors(apply, new, data.x, t_pool, a_idx, a_cnt, mapper)
        rows, rows_q = (to_host(v, np.float32) for v in paired_matrix(
            scorer, preds, data.x, t_pool, a_idx, a_cnt, e_a, **tiles))
        s[att], q[att] = rows, rows_q
        std[att] = to_host(s_std_a, np.float64)
    if attack.row is not None:
        s, q = forge_rows(s, q, att, attack.row)
    return preds, s, q, std


def attack_inputs(attack: AttackConfig, data: FederatedData, cfg: RNDConfig, pair: RNDPair,
                  key: jax.Array, mapper: ClientMapper | None, preds: PyTree,
                  t_pool: jax.Array, tr_idx, tr_cnt, pr_idx, pr_cnt, e_self, s_self, self_std):
    """The attackers' uploads in place *before* scoring, for sparse (edge) discovery.

    Sparse discovery scores each edge once, so rather than patching finished scores (as
    :func:`attack_uploads` does for a dense matrix) the attackers' inputs to scoring are
    replaced: their predictors, and for ``"other_group"`` the probe rows they score on and the
    rows their fingerprint summarises (drawn from the target group: as far as any upload
    shows, the attacker is one of its members), with their self-errors recomputed. A
    ``"replay"`` attacker keeps the fingerprint of its own data (it sees the victim's
    predictor, not the victim's fingerprint). Forged rows are applied to the scored edges
    afterwards (:func:`forge_edges`).

    Returns ``(preds, probe_idx, self_err, s_self, self_std, fingerprint_idx, attackers)``.
    """
    groups = np.asarray(data.group)
    att = attack.attackers(groups)
    s_self = np.array(s_self, np.float64, copy=True)
    std = np.array(self_std, np.float64, copy=True)
    fp_idx = tr_idx
    if att.size == 0 or (attack.predictor is None and attack.sybil == 1):
        return preds, pr_idx, e_self, s_self, std, fp_idx, att
    mapper = mapper or ClientMapper()
    new = _attack_predictors(attack, att, groups, preds, pair, cfg, data.x, t_pool, tr_idx,
                             tr_cnt, key, mapper)
    preds = jax.tree.map(lambda a, b: a.at[att].set(b), preds, new)
    pr_idx = jnp.asarray(pr_idx)
    if attack.predictor == "other_group":
        pr_idx = pr_idx.at[att].set(jnp.asarray(
            _group_rows(attack, att, groups, pr_idx, pr_cnt, salt=3)))
        fp_idx = jnp.asarray(tr_idx).at[att].set(jnp.asarray(
            _group_rows(attack, att, groups, tr_idx, tr_cnt)))
    mean_a, std_a, e_a = self_errors(pair.predictor.apply, new, data.x, t_pool, pr_idx[att],
                                     jnp.asarray(pr_cnt)[att], mapper)
    e_self = jnp.asarray(e_self).at[att].set(e_a)
    s_self[att] = to_host(mean_a, np.float64)
    std[att] = to_host(std_a, np.float64)
    return preds, pr_idx, e_self, s_self, std, fp_idx, att


def forge_edges(scores: np.ndarray, second: np.ndarray, src: np.ndarray, dst: np.ndarray,
                s_self: np.ndarray, attackers: np.ndarray, how: str
                ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`forge_rows` for edge scores ``[E]`` (edge ``e``: client ``dst[e]`` scored
    ``src[e]``'s predictor): the attackers' rows are their in-edges, forged the same way
    (``s_self [C]`` stands for the diagonal)."""
    if how not in ROW_ATTACKS:
        raise ValueError(f"row attack must be one of {list(ROW_ATTACKS)}, got {how!r}")
    s, q = np.array(scores, copy=True), np.array(second, copy=True)
    for a in np.asarray(attackers, np.int64):
        e = np.flatnonzero(dst == a)
        own = s_self[a]
        if how == "reversed":
            order = e[np.argsort(s[e], kind="stable")]
            s[order], q[order] = s[order[::-1]], q[order[::-1]]
            continue
        s[e] = {"zeros": 0.0, "constant": own, "nan": np.nan, "inf": np.inf}[how]
        with np.errstate(invalid="ignore"):
            q[e] = (s[e] - own) ** 2
    return s, q


# --------------------------------------------------------------------------------------------
# one honest population, many attacks
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Population:
    """An honest dense discovery's state, kept so that attacks only re-score attackers.

    ``data`` is after ``input_pool``; ``scores, second [C, C]``, ``self_std``, ``count [C]``.
    """

    data: FederatedData
    config: RNDConfig
    pair: RNDPair
    key: jax.Array
    mapper: ClientMapper
    preds: PyTree
    t_pool: jax.Array
    train_idx: jax.Array
    train_count: jax.Array
    probe_idx: jax.Array
    probe_count: jax.Array
    self_err: jax.Array
    scores: np.ndarray
    second: np.ndarray
    self_std: np.ndarray

    @property
    def groups(self) -> np.ndarray:
        return np.asarray(self.data.group)


@dataclasses.dataclass(frozen=True)
class Uploads:
    """What the coordinator receives under an attack: predictors, ``S, Q [C, C]``,
    ``self_std [C]``, and (for the report) the attacker ids ``[A]``."""

    preds: PyTree
    scores: np.ndarray
    second: np.ndarray
    self_std: np.ndarray
    attackers: np.ndarray


def prepare(data: FederatedData, config: RNDConfig = RNDConfig(), *,
            key: jax.Array | None = None, mapper: ClientMapper | None = None) -> Population:
    """Train and score the honest population once, exactly as dense :func:`~fedrnd.rnd.discover`
    does (same split, keys and scores), and keep what attacks need."""
    from fedrnd.rnd.pipeline import _check_scores

    cfg = config
    check_federated(data, "data", labels=False)
    mapper = mapper or ClientMapper()
    key = jax.random.key(cfg.seed) if key is None else key
    pair = cfg.pair(data.feature_shape)
    pool = cfg.pool_factor(data.feature_shape)
    if pool > 1:
        data = data.replace(x=pool_inputs(data.x, pool))
    tr_idx, tr_cnt, pr_idx, pr_cnt = probe_split(
        data, cfg.probe_kind, holdout=cfg.holdout, cap=cfg.probe_cap,
        seed=int(jax.random.randint(jax.random.fold_in(key, 7), (), 0, 2**31 - 1)))
    t_pool = target_features(pair, pair.target_params(cfg.seed), data.x)
    preds, _ = train_predictors(pair, cfg, data.x, t_pool, tr_idx, tr_cnt, key, mapper)
    apply = pair.predictor.apply
    _, s_std, e_self = self_errors(apply, preds, data.x, t_pool, pr_idx, pr_cnt, mapper)
    s, q = (to_host(v, np.float32) for v in paired_matrix(
        pair if cfg.fused else apply, preds, data.x, t_pool, pr_idx, pr_cnt, e_self,
        row_tile=cfg.row_tile, col_tile=cfg.col_tile, mapper=mapper, tile_evals=cfg.tile_evals))
    _check_scores(cfg, s, q)
    return Population(data, cfg, pair, key, mapper, preds, t_pool, tr_idx, tr_cnt, pr_idx,
                      pr_cnt, e_self, s, q, to_host(s_std, np.float64))


def attack_population(pop: Population, attack: AttackConfig | None) -> Uploads:
    """The uploads of ``pop`` under ``attack`` (``None``: the honest uploads)."""
    if attack is None:
        return Uploads(pop.preds, pop.scores, pop.second, pop.self_std, np.zeros(0, np.int64))
    preds, s, q, std = attack_uploads(attack, pop.data, pop.config, pop.pair, pop.key,
                                      pop.mapper, pop.preds, pop.t_pool, pop.train_idx,
                                      pop.train_count, pop.probe_idx, pop.probe_count,
                                      pop.self_err, pop.scores, pop.second, pop.self_std)
    return Uploads(preds, s, q, std, attack.attackers(pop.groups))


def decide(pop: Population, up: Uploads, defences: Defences | None = None) -> Decision:
    """Federations from ``up`` under ``defences``, as :func:`~fedrnd.rnd.discover` decides."""
    dfn = Defences() if defences is None else defences
    out = replay_flags(pop.pair.predictor.apply, up.preds, pop.pair.feature_shape, dfn,
                       pop.config.seed)
    return federations_from_scores(up.scores, pop.config, second=up.second,
                                   count=np.asarray(pop.probe_count), self_std=up.self_std,
                                   defences=dfn, exclude=out)


# --------------------------------------------------------------------------------------------
# what an attack achieved
# --------------------------------------------------------------------------------------------


def outcome(federation: np.ndarray, groups: np.ndarray, attackers: np.ndarray,
            target_group: int | tuple[int, ...] | None = None) -> dict[str, Any]:
    """What the attackers achieved, from the decided federations ``[C]`` and true ``groups``.

    * ``honest_ari``: ARI of the honest clients' federations against their groups.
    * ``merged``: some federation holds at least half of the honest members of two groups.
    * ``admitted``: the attackers whose federation's honest majority is a target group
      (``None`` without a target), and ``admitted_share`` their share.
    * ``isolated``: honest clients alone in their federation whose group has others.
    """
    fed, g = np.asarray(federation), np.asarray(groups)
    honest = np.setdiff1d(np.arange(len(g)), attackers)
    fh, gh = fed[honest], g[honest]
    tab = {}
    for gg in np.unique(gh):
        f, n = np.unique(fh[gh == gg], return_counts=True)
        tab[int(gg)] = {int(a): int(b) for a, b in zip(f, n, strict=True)}
    size = {gg: sum(v.values()) for gg, v in tab.items()}
    merged = False
    for f in np.unique(fh):
        big = [gg for gg in tab if 2 * tab[gg].get(int(f), 0) >= size[gg]]
        merged |= len(big) >= 2
    admitted = None
    if target_group is not None and len(attackers):
        tg = (target_group,) if isinstance(target_group, int | np.integer) else target_group
        admitted = []
        for a in attackers:
            mates = gh[fh == fed[a]]
            if mates.size:
                vals, n = np.unique(mates, return_counts=True)
                if int(vals[np.argmax(n)]) in tg:
                    admitted.append(int(a))
    alone = np.bincount(fed, minlength=fed.max() + 1)[fh] == 1
    gsize = np.bincount(gh)[gh]
    return dict(honest_ari=float(adjusted_rand_score(gh, fh)) if honest.size else 1.0,
                merged=bool(merged),
                admitted=admitted,
                admitted_share=(None if admitted is None
                                else len(admitted) / max(len(attackers), 1)),
                isolated=[int(i) for i in honest[alone & (gsize > 1)]])
