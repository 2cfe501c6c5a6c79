"""Former home of the discovery pipeline, kept so ``from fedrnd.rnd.discovery import X`` works.

The pipeline now lives in one module per step (see :mod:`fedrnd.rnd`): :mod:`~.config`,
:mod:`~.predictors`, :mod:`~.scoring`, :mod:`~.stats`, :mod:`~.rules`, :mod:`~.extract`,
:mod:`~.fingerprints` and :mod:`~.pipeline`. New code imports from :mod:`fedrnd.rnd`.
"""

from fedrnd.rnd.config import PROBES, RULES, SIGMAS, RNDConfig, check_eps  # noqa: F401
from fedrnd.rnd.extract import federations  # noqa: F401
from fedrnd.rnd.pipeline import Discovery, assign_newcomers, discover  # noqa: F401
from fedrnd.rnd.predictors import (  # noqa: F401
    FeatureMSE,
    predictor_engine,
    probe_split,
    train_predictors,
)
from fedrnd.rnd.rules import (  # noqa: F401
    AUTO_MIN_RATIO,
    AUTO_MIN_SILHOUETTE,
    auto_eps,
    compatibility,
    gap_eps,
    normalised_scores,
    sigma_of,
)
from fedrnd.rnd.scoring import (  # noqa: F401
    FUSED_TILE_EVALS,
    edge_novelty,
    novelty_matrix,
    self_novelty,
)
