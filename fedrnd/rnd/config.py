"""Configuration of RND discovery: :class:`RNDConfig` and its allowed values."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedrnd.engine import (
    LocalSpec,
)
from fedrnd.rnd.networks import RNDPair, make_pair, pooled_shape

PyTree = Any

SIGMAS = ("row", "self")
RULES = ("mutual", "one_sided", "leader")
PROBES = ("train", "holdout", "test")
DISCOVERY_CRITERIA = ("test", "eps")
PROBE_CHOICES = ("auto", *PROBES)


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RNDConfig:
    """Everything static about a discovery run (hashable).

    Two compatibility criteria (``criterion``):

    * ``"test"`` (default): unbiased held-out novelty and paired statistics per pair
      (:mod:`fedrnd.rnd.stats`); an average-linkage tree of the symmetrised log novelty ratio,
      split top-down wherever a one-sided group test at level ``alpha`` with minimum effect
      ``min_effect`` says two subtrees differ
      (:func:`fedrnd.rnd.extract.linkage_test_federations`). Pairwise Benjamini-Hochberg
      decisions at ``alpha`` are reported as ``compatible``. Nothing depends on the number of
      clients; evidence for the defaults is in ``experiments/discovery/REPORT.md``.
    * ``"eps"``: the paper's rule as published (Eq. 9): ``j`` compatible with ``i`` iff
      ``S[i, j] <= S[i, i] + eps * sigma_i``, federations as components (``rule``), ``eps`` a
      number or ``"auto"`` (silhouette, :func:`fedrnd.rnd.rules.auto_eps`).

    Attributes:
      criterion: ``"test"`` or ``"eps"`` (above).
      alpha: test: the level of each split test (a one-distribution population is split with
        probability at most ``alpha``) and of the pairwise Benjamini-Hochberg decisions.
      min_effect: test: two groups count as different only if peers' predictors do worse on
        each other's held-out probes than the clients' own by more than this, as a log ratio
        of novelty (0.025: about 2.5 % more error), on average over the clients of both groups.
      within_ratio: test: a split is kept only if the federations it yields are homogeneous,
        their mean statistic inside at most this fraction of the mean between them (0.3);
        otherwise the split set is a continuum and stays one federation (``inf``: no check).
        See :func:`fedrnd.rnd.extract.linkage_test_federations`.
      candidates: ``None``: score every pair (dense). An integer ``k``: two-stage discovery,
        every client scores only its ``k`` nearest peers by fingerprint plus ``random_peers``
        random ones, both ways (:mod:`fedrnd.rnd.fingerprints`).
      random_peers: random extra candidates per client in the two-stage mode.
      min_support: sparse linkage: observed pairs needed between two groups to merge, per
        member of the smaller group.
      network: ``"mlp"`` (default: the MLP pair on flattened inputs, images pooled by
        ``input_pool``), ``"conv"`` (the authors' conv pair) or ``"auto"`` (conv for
        ``[H, W, C]`` features, MLP otherwise). Why the MLP pair is the default: below.
      input_pool: average-pool image inputs by this factor before the pair sees them (1: full
        resolution; 2: 28x28 -> 14x14, about a quarter of the MLP pair's training cost;
        :func:`fedrnd.rnd.networks.pool_inputs`). Images only. ``"auto"`` (default): 2 for the
        MLP pair on images at least 28 pixels on each side, 1 otherwise (the conv pair, small
        images and vectors see full resolution); see :meth:`pool_factor`.
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
      probe: which examples client ``i`` scores predictors on: ``"auto"`` (``"holdout"`` for
        the test criterion, whose statistics need probes the own predictor did not train on;
        ``"train"`` for ``"eps"``, as in the paper), ``"train"`` (its training set,
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
    * ``network="mlp"`` (the conv pair was the default until 2026-12-04): the discovery suite
      (``experiments/discovery/REPORT.md``: 9 populations x 3 seeds at 200 and 1,000 clients
      on Fashion-MNIST and digits, two-stage at 10,000) is the evidence for the default
      decision, and it was run with the MLP pair (on 2x2-pooled Fashion-MNIST); the conv
      pair costs about 7x its CPU seconds with the same 300 steps (1,000 clients x 64
      images at 14x14: 97 against 14, ``benchmarks/RESULTS.md``), and its
      translation-pooled features could not tell digits from their 180-degree rotations
      (docs/methods/rnd.md). On the paper's 12-client setup both pairs recovered the groups
      in 10 of 10 seeds (``experiments/rnd/RESULTS.md``). ``network="conv"`` keeps the
      authors' pair.
    * ``eps="auto"`` (criterion in :func:`auto_eps`: the best silhouette over the candidate
      cuts, one federation below 0.5), ``rule="mutual"``: all three rules agreed wherever the
      scores were separable; mutual compatibility is the symmetric reading. (The bullets above
      were measured with the earlier largest-gap criterion, now :func:`gap_eps`; the silhouette
      replaced it after it kept the paper's 12-client setup whole in 2 of 5 seeds and every
      1,000-client population whole.)
    """

    network: str = "mlp"
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
    probe: str = "auto"
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
    criterion: str = "test"
    alpha: float = 0.05
    min_effect: float = 0.025
    within_ratio: float = 0.3
    input_pool: int | str = "auto"
    candidates: int | None = None
    random_peers: int = 4
    min_support: float = 1.0

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
        if self.probe not in PROBE_CHOICES:
            raise ValueError(f"probe must be one of {list(PROBE_CHOICES)}, got {self.probe!r}")
        if self.criterion not in DISCOVERY_CRITERIA:
            raise ValueError(f"criterion must be one of {list(DISCOVERY_CRITERIA)}, got "
                             f"{self.criterion!r}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if not (np.isfinite(self.min_effect) and self.min_effect >= 0):
            raise ValueError(f"min_effect must be finite and >= 0, got {self.min_effect}")
        if isinstance(self.input_pool, str) and self.input_pool != "auto":
            raise ValueError(f"input_pool must be an integer >= 1 or 'auto', got "
                             f"{self.input_pool!r}")
        if self.input_pool != "auto":
            pooled_shape((1, 1, 1), self.input_pool)  # validates the factor
        if not self.within_ratio > 0:
            raise ValueError(f"within_ratio must be > 0 (inf: no homogeneity check), got "
                             f"{self.within_ratio}")
        if self.candidates is not None and (not isinstance(self.candidates, int | np.integer)
                                            or self.candidates < 1):
            raise ValueError(f"candidates must be an integer >= 1 or None, got "
                             f"{self.candidates!r}")
        if not isinstance(self.random_peers, int | np.integer) or self.random_peers < 0:
            raise ValueError(f"random_peers must be an integer >= 0, got {self.random_peers!r}")
        if not (np.isfinite(self.min_support) and self.min_support >= 0):
            raise ValueError(f"min_support must be finite and >= 0, got {self.min_support}")
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

    @property
    def probe_kind(self) -> str:
        """The probe set actually used (``"auto"`` resolved by the criterion)."""
        if self.probe != "auto":
            return self.probe
        return "holdout" if self.criterion == "test" else "train"

    def schedule(self, max_count: int) -> LocalSpec:
        """The predictors' local schedule for clients of at most ``max_count`` examples."""
        spec = LocalSpec(self.batch_size, self.epochs, self.steps)
        if (self.steps is None and self.min_steps is not None
                and spec.total_steps(max_count) < self.min_steps):
            return LocalSpec(self.batch_size, steps=self.min_steps)
        return spec

    def pool_factor(self, feature_shape: Sequence[int]) -> int:
        """``input_pool`` for data of ``feature_shape``, ``"auto"`` resolved.

        ``"auto"`` is 2 for the MLP pair on images of at least 28 x 28 pixels and 1 otherwise.
        Why: on Fashion-MNIST the MLP pair on 14x14 images matched or beat full resolution in
        every population of the discovery suite (label skew at 1,000 clients: ARI 0.98 against
        0.94) at about a third of the CPU seconds (experiments/discovery/REPORT.md,
        benchmarks/RESULTS.md). The conv pair keeps full resolution (the paper's setup).
        """
        if self.input_pool != "auto":
            return int(self.input_pool)
        shape = tuple(int(s) for s in feature_shape)
        kind = self.network if self.network != "auto" else ("conv" if len(shape) == 3
                                                            else "mlp")
        return 2 if kind == "mlp" and len(shape) == 3 and min(shape[:2]) >= 28 else 1

    def pair(self, feature_shape: tuple[int, ...]) -> RNDPair:
        """The RND pair for data of ``feature_shape`` (before ``input_pool``)."""
        return make_pair(self.network,
                         pooled_shape(feature_shape, self.pool_factor(feature_shape)),
                         target_width=self.target_width,
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

