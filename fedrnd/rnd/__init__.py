"""RND federation discovery (Domini et al. 2026, arXiv 2606.30499).

:mod:`~fedrnd.rnd.networks` builds the frozen-target / narrow-predictor pairs and caches the
target's outputs; :mod:`~fedrnd.rnd.discovery` trains every client's predictor through the
engine, scores the novelty matrix blockwise (or over an edge list), applies the compatibility
rule and extracts federations. :func:`discover` runs the whole pipeline.
"""

from fedrnd.rnd.discovery import (
    AUTO_MIN_RATIO,
    PROBES,
    RULES,
    SIGMAS,
    Discovery,
    FeatureMSE,
    RNDConfig,
    assign_newcomers,
    auto_eps,
    check_eps,
    compatibility,
    discover,
    edge_novelty,
    federations,
    normalised_scores,
    novelty_matrix,
    predictor_engine,
    probe_split,
    self_novelty,
    sigma_of,
    train_predictors,
)
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

__all__ = [
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
    "check_eps",
    "compatibility",
    "conv_apply",
    "discover",
    "edge_novelty",
    "federations",
    "make_pair",
    "normalised_scores",
    "novelty_matrix",
    "predictor_engine",
    "probe_split",
    "self_novelty",
    "sigma_of",
    "stacked_errors",
    "target_features",
    "train_predictors",
]
