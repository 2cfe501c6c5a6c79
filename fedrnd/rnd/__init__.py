"""RND federation discovery (Domini et al. 2026, arXiv 2606.30499).

One module per step of the pipeline:
:mod:`~fedrnd.rnd.networks` (frozen target / narrow predictor pairs, the target cache),
:mod:`~fedrnd.rnd.config` (:class:`RNDConfig`), :mod:`~fedrnd.rnd.predictors` (probe split,
every client's predictor trained in one jitted program), :mod:`~fedrnd.rnd.scoring` (novelty
and paired second moments, dense or over edges), :mod:`~fedrnd.rnd.stats` (the paired test,
Benjamini-Hochberg, evidence), :mod:`~fedrnd.rnd.rules` (the paper's eps rule and eps
selection), :mod:`~fedrnd.rnd.extract` (federations: components, leaders, average linkage),
:mod:`~fedrnd.rnd.fingerprints` (two-stage candidates) and :mod:`~fedrnd.rnd.pipeline`
(:func:`discover`; :func:`federations_from_scores` turns stored scores into federations).
:mod:`~fedrnd.rnd.decentral` is discovery without a server: neighbour scores only, a novelty
band, regions by leader election (:func:`discover_regions`). :mod:`~fedrnd.rnd.adversarial`
makes chosen clients lie in their uploads (``discover(..., attack=)``);
:mod:`~fedrnd.rnd.defences` holds the decision's defences (``discover(..., defences=)``).
"""

from fedrnd.rnd.adversarial import AttackConfig
from fedrnd.rnd.config import (
    DISCOVERY_CRITERIA,
    PROBE_CHOICES,
    PROBES,
    RULES,
    SIGMAS,
    RNDConfig,
    check_eps,
)
from fedrnd.rnd.decentral import (
    CRITERIA,
    PRIORITIES,
    SYMMETRIES,
    Regions,
    band_accepts,
    compatible_links,
    discover_regions,
    elect_leaders,
    election_reference,
    node_ranks,
    regions_from_scores,
)
from fedrnd.rnd.defences import STRICT, Defences
from fedrnd.rnd.extract import (
    LINKAGE_CUT,
    federations,
    linkage_federations,
    linkage_test_federations,
    sparse_linkage_federations,
)
from fedrnd.rnd.fingerprints import candidate_edges, fingerprint_bytes, fingerprints
from fedrnd.rnd.networks import (
    NETWORKS,
    RNDMLP,
    RNDConv,
    RNDPair,
    adaptive_avg_pool,
    adaptive_pool_matrix,
    conv_apply,
    make_pair,
    stacked_errors,
    target_features,
)
from fedrnd.rnd.pipeline import (
    Decision,
    Discovery,
    assign_newcomers,
    discover,
    federations_from_scores,
)
from fedrnd.rnd.predictors import FeatureMSE, predictor_engine, probe_split, train_predictors
from fedrnd.rnd.rules import (
    AUTO_MIN_RATIO,
    AUTO_MIN_SILHOUETTE,
    auto_eps,
    compatibility,
    gap_eps,
    normalised_scores,
    novelty_view,
    sigma_of,
)
from fedrnd.rnd.scoring import (
    edge_novelty,
    novelty_matrix,
    paired_edges,
    paired_matrix,
    self_errors,
    self_novelty,
)
from fedrnd.rnd.stats import (
    bh_adjust,
    evidence,
    pair_pvalues,
    pair_statistic,
    paired_moments,
    symmetric_pvalues,
    symmetric_q,
)

__all__ = [
    "STRICT",
    "AttackConfig",
    "Defences",
    "DISCOVERY_CRITERIA",
    "Decision",
    "LINKAGE_CUT",
    "PROBE_CHOICES",
    "bh_adjust",
    "candidate_edges",
    "evidence",
    "federations_from_scores",
    "fingerprint_bytes",
    "fingerprints",
    "linkage_federations",
    "pair_pvalues",
    "paired_edges",
    "paired_matrix",
    "paired_moments",
    "self_errors",
    "sparse_linkage_federations",
    "linkage_test_federations",
    "pair_statistic",
    "symmetric_q",
    "symmetric_pvalues",
    "CRITERIA",
    "PRIORITIES",
    "SYMMETRIES",
    "Regions",
    "band_accepts",
    "compatible_links",
    "discover_regions",
    "elect_leaders",
    "election_reference",
    "node_ranks",
    "regions_from_scores",
    "AUTO_MIN_RATIO",
    "NETWORKS",
    "PROBES",
    "RNDMLP",
    "RULES",
    "SIGMAS",
    "Discovery",
    "FeatureMSE",
    "RNDConfig",
    "RNDConv",
    "RNDPair",
    "adaptive_avg_pool",
    "adaptive_pool_matrix",
    "assign_newcomers",
    "auto_eps",
    "gap_eps",
    "AUTO_MIN_SILHOUETTE",
    "check_eps",
    "compatibility",
    "conv_apply",
    "discover",
    "edge_novelty",
    "federations",
    "make_pair",
    "normalised_scores",
    "novelty_matrix",
    "novelty_view",
    "predictor_engine",
    "probe_split",
    "self_novelty",
    "sigma_of",
    "stacked_errors",
    "target_features",
    "train_predictors",
]
