"""Defences of RND discovery against clients that lie in their uploads.

Each client uploads its predictor (hence a column of ``S``) and its row of scores; nothing
in the plain pipeline checks either. The threat model, what each defence stops, what it costs
and what stays possible for an attacker are in ``docs/methods/threat-model.md``. Each defence
is one knob of :class:`Defences`:

* ``validate`` (on by default): every score and second moment is a mean of squares, so a
  NaN, an infinity or a negative value is no measurement; :func:`check_uploads` rejects it
  with a ``ValueError`` naming the uploading clients.
* ``replay``: predictors whose outputs on a shared random probe set are (near-)identical are
  one function uploaded under several identities (a replayed victim, Sybil copies);
  :func:`duplicate_predictors` finds them and discovery leaves them out of every federation.
* ``robust="direction"`` (default): each direction of a pair, ``r_ij = log(S_ij / S_ii)``
  (client ``i``'s probes, ``j``'s predictor), is 0 in expectation within a distribution and
  positive between two, so a value far below 0 can only come from a forged row;
  :func:`robust_directions` floors it at ``-clip`` median standard errors (and caps standard
  errors at ``ERR_CAP`` medians) *before* the two directions are averaged into the pair
  statistic ``R_ij``. A forged row then moves only its own half of each pair, and the honest
  half (the peer's probes on the forger's predictor) still says where the forger belongs.
  ``robust="clip"`` floors the averaged ``R_ij`` instead (:func:`robust_statistic`), which
  also erases that honest half: forged zero rows from 1 % of clients still merged groups.
* ``consent``: a client stays in its federation only if more than this fraction of the other
  members accept it by their *own* one-directional test (their probes, its predictor), which
  its own row cannot forge (:func:`consent_filter`); clients that fail are grouped among
  themselves.

Defaults: ``validate`` and ``robust="direction"`` at ``clip = 6``. Re-deciding the stored
cells of the honest discovery suite (``experiments/adversarial/SUITE_CHECK.md``), the
per-direction clip changes none, while majority consent changes dozens (it splits
one-distribution and very unequal populations: a one-directional test sees predictor
quality), so consent stays opt-in, as does replay detection (it isolates the victim of a
replay). :data:`STRICT` turns every defence on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedrnd.data.federated import id_list

__all__ = ["ROBUST", "STRICT", "Defences", "check_uploads", "consent_filter",
           "duplicate_predictors", "replay_flags", "robust_directions", "robust_statistic"]

ROBUST = ("mean", "clip", "direction")
REPLAY_ACTIONS = ("exclude",)


@dataclasses.dataclass(frozen=True)
class Defences:
    """Which defences discovery applies (hashable).

    Attributes:
      validate: reject non-finite or negative scores and second moments (:func:`check_uploads`).
      replay: relative distance below which two predictors count as one function
        (:func:`duplicate_predictors`); ``None``: off. Honest predictors trained on different
        data sit orders of magnitude above ``1e-3``.
      replay_probes: size of the shared random probe set the predictors are compared on.
      robust: ``"direction"`` (default, :func:`robust_directions`: each direction floored
        before a pair's two are averaged), ``"clip"`` (the averaged statistic floored,
        :func:`robust_statistic`) or ``"mean"`` (the plain pair statistic).
      clip: the floor in median standard errors (of ``r_ij`` for ``"direction"``, of
        ``R_ij`` for ``"clip"``).
      consent: fraction of a federation's other members that must accept a client
        (:func:`consent_filter`), e.g. ``0.5`` for a majority; ``None``: off (one link, the
        plain linkage, is enough).
    """

    validate: bool = True
    replay: float | None = None
    replay_probes: int = 64
    robust: str = "direction"
    clip: float = 6.0
    consent: float | None = None

    def __post_init__(self):
        if self.replay is not None and not (np.isfinite(self.replay) and self.replay > 0):
            raise ValueError(f"replay must be a distance > 0 or None, got {self.replay!r}")
        if self.replay_probes < 1:
            raise ValueError(f"replay_probes must be >= 1, got {self.replay_probes}")
        if self.robust not in ROBUST:
            raise ValueError(f"robust must be one of {list(ROBUST)}, got {self.robust!r}")
        if not (np.isfinite(self.clip) and self.clip >= 0):
            raise ValueError(f"clip must be finite and >= 0, got {self.clip}")
        if self.consent is not None and not 0.0 <= self.consent < 1.0:
            raise ValueError(f"consent must be in [0, 1) or None, got {self.consent!r}")


STRICT = Defences(validate=True, replay=1e-3, robust="direction", consent=0.5)
"""Every defence on."""


# --------------------------------------------------------------------------------------------
# (a) validation of uploads
# --------------------------------------------------------------------------------------------


def check_uploads(scores: np.ndarray, second: np.ndarray | None = None, *,
                  edges: tuple[np.ndarray, np.ndarray] | None = None, hint: str = "") -> None:
    """Raise ``ValueError`` naming the clients behind non-finite or negative uploads.

    ``scores`` (and ``second``) are dense ``[C, C]`` (row ``i`` uploaded by client ``i``, column
    ``j`` its score of predictor ``j``) or ``[E]`` per edge ``(src, dst)`` (``dst`` scored
    ``src``'s predictor). Both are means of squared errors, so only finite values ``>= 0`` are
    measurements. The message names the scoring clients (who uploaded the value) and the
    clients whose predictors were scored (an honest predictor can overflow too). Dense rows
    are screened by one float64 sum each, so a clean ``[C, C]`` costs no temporary of its size.
    ``hint`` is appended to the message (e.g. what to do when training diverged).
    """
    checks = [("novelty score(s)", scores)]
    if second is not None:
        checks.append(("second moment(s) Q of novelty scores", second))
    for what, a in checks:
        a = np.asarray(a)
        if edges is None:
            with np.errstate(over="ignore", invalid="ignore"):
                tot = np.sum(a, axis=1, dtype=np.float64)
            rows = np.flatnonzero(~np.isfinite(tot) | np.any(a < 0, axis=1))
            sub = a[rows]
            r, col = np.nonzero(~np.isfinite(sub) | (sub < 0))
            row, vals = rows[r], sub[r, col]
        else:
            hit = np.flatnonzero(~np.isfinite(a) | (a < 0))
            col, row, vals = edges[0][hit], edges[1][hit], a[hit]
        if row.size:
            kind = "non-finite" if not np.isfinite(vals[0]) else "negative"
            raise ValueError(f"discovery: {row.size} uploaded {what} are non-finite or negative "
                             f"(first: client {int(row[0])} scoring client {int(col[0])}'s "
                             f"predictor: {vals[0]}, {kind}); uploaded by client(s) "
                             f"{id_list(np.unique(row))}, predictors of client(s) "
                             f"{id_list(np.unique(col))}{hint}")


# --------------------------------------------------------------------------------------------
# (b) replayed / duplicated predictors
# --------------------------------------------------------------------------------------------


def replay_probes(feature_shape: tuple[int, ...], n: int, seed: int = 0) -> jax.Array:
    """The shared random probe set ``[n, *feature_shape]``: standard normal inputs from a
    public seed (a function is compared, not a data set, so no client's data is needed)."""
    return jax.random.normal(jax.random.key(seed), (n, *feature_shape), jnp.float32)


def predictor_outputs(apply: Callable, preds, x: jax.Array) -> np.ndarray:
    """Every predictor's outputs on the shared probes, flattened: ``[C, n * out_dim]``."""
    out = jax.lax.map(lambda p: apply(p, x).reshape(-1), preds)
    return np.asarray(out, np.float64)


def replay_flags(apply: Callable, preds, feature_shape: tuple[int, ...], defences: Defences,
                 seed: int = 0) -> np.ndarray:
    """``[C]`` bool: the predictors that :func:`duplicate_predictors` flags under ``defences``
    (all ``False`` when ``defences.replay`` is off)."""
    c = jax.tree.leaves(preds)[0].shape[0]
    if defences.replay is None:
        return np.zeros(c, bool)
    x = replay_probes(tuple(feature_shape), defences.replay_probes, seed)
    return duplicate_predictors(predictor_outputs(apply, preds, x), defences.replay)


def duplicate_predictors(outputs: np.ndarray, threshold: float) -> np.ndarray:
    """Flag clients whose predictor (outputs ``[C, D]``) is a near copy of another's: ``[C]`` bool.

    Relative distance ``||f_i - f_j|| / max(||f_i||, ||f_j||)``; ``i`` and ``j`` are duplicates
    below ``threshold``. Every member of a duplicate set is flagged: without labels the copy
    cannot be told from the original. Exact copies are found by hashing first; near copies by
    the distance to the nearest other predictor (a blocked ``[C, C]`` Gram, ``O(C^2 D)``).
    """
    f = np.asarray(outputs, np.float64)
    c = f.shape[0]
    flag = np.zeros(c, bool)
    if c < 2:
        return flag
    _, inv, cnt = np.unique(f, axis=0, return_inverse=True, return_counts=True)
    flag |= cnt[np.ravel(inv)] > 1
    norm2 = np.einsum("cd,cd->c", f, f)
    block = 1024
    for lo in range(0, c, block):
        hi = min(lo + block, c)
        d2 = norm2[lo:hi, None] + norm2[None, :] - 2.0 * f[lo:hi] @ f.T
        d2[np.arange(hi - lo), np.arange(lo, hi)] = np.inf
        scale = np.maximum(norm2[lo:hi, None], norm2[None, :])
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.sqrt(np.maximum(d2, 0.0) / np.where(scale > 0, scale, 1.0))
        flag[lo:hi] |= np.min(rel, axis=1) < threshold
    return flag


# --------------------------------------------------------------------------------------------
# (c) a pair statistic one row cannot drag down
# --------------------------------------------------------------------------------------------


def robust_statistic(stat: np.ndarray, err: np.ndarray, defences: Defences
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The pair statistic ``R`` and its standard error (:func:`fedrnd.rnd.stats.pair_statistic`)
    under ``defences``: ``(stat, err)``, unchanged for ``robust="mean"``.

    ``"clip"``, with ``e`` the median finite standard error over all pairs (an honest scale:
    a minority of lying clients cannot move a median):

    * ``R := max(R, -clip * e)``. Honest pairs have ``E[R] = 0`` within a distribution and
      ``E[R] > 0`` between two, so ``R`` below ``-3 e`` is rare and then moved only by the
      excess; a forged row (``S_aj = 0``: "everyone's predictor is perfect on my data")
      gives ``R`` near ``log(1e-12) / 2 = -14`` and would pull a whole group average (the
      tree's and the split test's) below the split threshold: one such row merges everything.
    * ``se := min(se, ERR_CAP * e)``. The same forged row also claims a spread that the log
      ratio turns into standard errors of ``10^6``; their mean is the split test's
      measurement noise, and one such pair would make every split insignificant.

    Pairs with an infinite error (fewer than 2 probes: no evidence) are left alone.
    """
    stat = np.asarray(stat, np.float64)
    err = np.asarray(err, np.float64)
    if defences.robust != "clip":  # "direction" clips before the directions are averaged
        return stat, err
    return _floor_and_cap(stat, err, np.isfinite(err), defences.clip)


def _floor_and_cap(value: np.ndarray, err: np.ndarray, scale_from: np.ndarray, clip: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``value`` floored at ``-clip * e`` and ``err`` capped at ``ERR_CAP * e`` wherever
    ``err`` is finite, ``e`` the median of ``err[scale_from]`` (unchanged when empty)."""
    fin = err[scale_from]
    if fin.size == 0:
        return value, err
    e = float(np.median(fin))
    ok = np.isfinite(err)
    return (np.where(ok, np.maximum(value, -clip * e), value),
            np.where(ok, np.minimum(err, ERR_CAP * e), err))


def robust_directions(r: np.ndarray, sr: np.ndarray, defences: Defences | None,
                      diagonal: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``robust="direction"``: each direction's log novelty ratio ``r_ij`` (client ``i``'s
    probes, ``j``'s predictor) floored at ``-clip * e`` and its standard error capped at
    ``ERR_CAP * e``, ``e`` the median finite directional standard error, *before* the two
    directions of a pair are averaged. A forged row then moves only its own half of each
    pair's statistic, by at most ``clip * e / 2``: the honest direction's evidence (the other
    client's probes on the forger's predictor) survives. ``diagonal``: dense ``[C, C]`` input,
    whose zero diagonal is left out of the median. Unchanged for other modes."""
    r = np.asarray(r, np.float64)
    sr = np.asarray(sr, np.float64)
    if defences is None or defences.robust != "direction":
        return r, sr
    ok = np.isfinite(sr)
    if diagonal:
        ok[np.diag_indices(r.shape[0])] = False
    return _floor_and_cap(r, sr, ok, defences.clip)


ERR_CAP = 10.0
"""``robust="clip"``: standard errors are capped at this many times their median."""


# --------------------------------------------------------------------------------------------
# (d) membership by majority consent
# --------------------------------------------------------------------------------------------


def consent_filter(federation: np.ndarray, accepts: np.ndarray, quorum: float,
                   regroup: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Keep a client in its federation only if more than ``quorum`` of the others accept it.

    Args:
      federation: ``[C]`` federation ids.
      accepts: ``[C, C]`` bool, ``accepts[m, k]``: member ``m``'s own test does not reject
        ``k``'s predictor (read from ``m``'s probes only, so ``k`` cannot forge it).
      quorum: the fraction of the *other* members of ``k``'s federation that must accept it.
      regroup: ``f(ids) -> [len(ids)]`` federation ids for the clients that failed, decided
        among themselves (``None``: each alone).
    Returns federation ids ``0..F-1`` (numbered by lowest member).

    Members are removed one by one per federation, the least accepted first, and the rest
    re-checked (a federation that lost members has a new majority), until everyone left has
    consent: in a federation that an attacker merged out of two groups, the attacker (whom
    neither group's test accepts) goes first and the smaller group next. The removed clients
    are then grouped among themselves by ``regroup`` (whose own consent step removes the
    attacker again), so the two groups come back as two federations rather than the larger
    one and a set of singletons. ``O(C^2)`` per round, at most the largest federation's size
    in rounds: a dense-only defence.
    """
    from fedrnd.rnd.extract import _relabel

    fed = np.asarray(federation, np.int64).copy()
    acc = np.asarray(accepts, bool)
    c = fed.shape[0]
    out = np.zeros(c, bool)
    for _ in range(c):
        same = (fed[:, None] == fed[None, :]) & ~out[:, None] & ~out[None, :]
        np.fill_diagonal(same, False)
        n = same.sum(0)
        share = (same & acc).sum(0) / np.maximum(n, 1)
        fail = ~out & (n > 0) & (share <= quorum)
        if not fail.any():
            break
        # The least accepted failing member of each federation (ties: all of them).
        worst = np.full(fed.max() + 1, np.inf)
        np.minimum.at(worst, fed[fail], share[fail])
        out |= fail & (share <= worst[fed])
    lost = np.flatnonzero(out)
    if lost.size:
        # Everyone failing would hand regroup the same set again: each alone then.
        alone = regroup is None or lost.size == c
        sub = np.arange(lost.size) if alone else np.asarray(regroup(lost))
        fed[lost] = fed.max() + 1 + sub
    return _relabel(fed)
