"""Checks and weights shared by the methods that take a number of clusters (IFCA, FeSEM)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

WEIGHTING = ("samples", "uniform")
"""Per-cluster averaging weights: training-set sizes (FedAvg's) or one per client."""


def check_num_clusters(method: str, k: object, num_clients: int) -> None:
    """``ValueError`` unless ``k`` is an integer in ``[1, num_clients]``."""
    if k is None:
        raise ValueError(f"{method} needs num_clusters (the number of clusters K), e.g. "
                         f"options = {{num_clusters = 4}}")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= num_clients:
        raise ValueError(f"{method} num_clusters must be an integer in [1, num_clients="
                         f"{num_clients}], got {k!r}")


def check_int(method: str, field: str, value: object, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < lo:
        raise ValueError(f"{method} {field} must be an integer >= {lo}, got {value!r}")


def check_choice(method: str, field: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{method} {field} must be one of {list(allowed)}, got {value!r}")


def aggregation_weights(weighting: str, counts: jax.Array) -> jax.Array:
    """Per-client aggregation weights ``[M]``: sample counts or ones."""
    counts = counts.astype(jnp.float32)
    return counts if weighting == "samples" else jnp.ones_like(counts)
