"""Arrays across processes: placing host values on a (possibly multi-process) mesh and back.

With ``jax.distributed`` every host runs the same program on its own devices, and a mesh over
``jax.devices()`` spans all processes. A global array then lives partly on other hosts:
``np.asarray`` of it fails, and ``jax.device_put`` of a host value onto such a mesh needs the
value to be the same on every process. These two helpers are what the driver and host-side
steps use instead; with one process they reduce to ``jax.device_put`` and ``np.asarray``.

- :func:`put` places a pytree with a sharding; each process materialises only the shards of its
  own devices (``jax.make_array_from_callback``), so a per-client array sharded over the client
  axis is held by each host for its clients only. Every process must pass the same values (the
  driver builds the data and initial state deterministically from the seed on every host).
- :func:`to_host` returns whole numpy arrays on every process: fully addressable or fully
  replicated arrays are read locally, others are all-gathered (a collective: every process
  must call it, in the same order, which the SPMD driver does).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Sharding

PyTree = Any


def multiprocess() -> bool:
    """Whether this run spans more than one JAX process."""
    return jax.process_count() > 1


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _put_leaf(x: Any, sharding: Sharding) -> jax.Array:
    if _is_key(x):
        # Typed keys cannot be built from host buffers: place their raw data and re-wrap.
        data = _put_leaf(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.sharding == sharding:
            return x
        # Already global: reshard on the devices (all processes take part).
        return jax.jit(lambda a: a, out_shardings=sharding)(x)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def put(tree: PyTree, sharding: Sharding) -> PyTree:
    """``jax.device_put(tree, sharding)`` that also works when ``sharding`` spans processes.

    Within one process this is ``jax.device_put``. Across processes each leaf must hold the
    same value on every process (host arrays or fully addressable arrays); each process then
    transfers only the shards of its own devices. Leaves that are already global arrays are
    resharded on the devices.
    """
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda x: _put_leaf(x, sharding), tree)


def _host_leaf(x: Any) -> Any:
    if not isinstance(x, jax.Array):
        return np.asarray(x) if isinstance(x, np.ndarray | np.generic) else x
    if _is_key(x):
        return x  # keys stay keys; they are replicated state, never per-client outputs
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def to_host(tree: PyTree, dtype: Any = None) -> PyTree:
    """The whole value of every array leaf as numpy, on every process.

    ``to_host(x, dtype)`` on one array is ``np.asarray(x, dtype)`` that also works for arrays
    spread over several processes (they are all-gathered; every process must make the same
    call). Non-array leaves pass through.
    """
    if dtype is not None:
        return np.asarray(_host_leaf(tree), dtype)
    return jax.tree.map(_host_leaf, tree)
