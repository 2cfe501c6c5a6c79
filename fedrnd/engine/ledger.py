"""Communication ledger: bytes per client per round, by message kind, from shapes and dtypes.

Every algorithm reports what each client sent (``up``) and received (``down``) as
``{"up/<kind>": [C], "down/<kind>": [C]}`` arrays in its round metrics; the sizes come from the
messages' array shapes and dtypes (never measured on a wire), so they are exact for the
simulated protocol and identical on every backend.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

UP, DOWN = "up/", "down/"
"""Prefixes of the ledger entries in a round's metrics: ``up/<kind>`` bytes each client sent,
``down/<kind>`` bytes it received (``[C]`` each); the driver adds up every key that starts with
one of them."""


def tree_bytes(tree: PyTree) -> int:
    """Bytes of a pytree of arrays or ``ShapeDtypeStruct``s."""
    return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)))


def per_client(nbytes: int, participating: jax.Array) -> jax.Array:
    """``[C]`` bytes: ``nbytes`` for participating clients (a ``[C]`` bool/0-1 mask), else 0."""
    return jnp.asarray(participating, jnp.float32) * float(nbytes)


def comm(**kinds: jax.Array) -> dict[str, jax.Array]:
    """Pack ledger entries: ``comm(up_model=a, down_model=b)`` -> ``{"up/model": a, ...}``."""
    out = {}
    for k, v in kinds.items():
        direction, _, kind = k.partition("_")
        if direction not in ("up", "down") or not kind:
            raise ValueError(f"ledger entry {k!r} must be named up_<kind> or down_<kind>")
        out[(UP if direction == "up" else DOWN) + kind] = v
    return out
