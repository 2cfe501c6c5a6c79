"""Checkpoints restore named tuples leaf by leaf by name: a Graph (fields u, v, valid,
positions, stored by orbax as a dict in key order) comes back with every field in its place."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedrnd.driver.checkpoint import Checkpointer
from fedrnd.engine import ClientHParams
from fedrnd.graphs import Graph


def test_named_tuples_restore_field_by_field(tmp_path):
    state = {"graph": Graph(jnp.arange(5, dtype=jnp.int32), jnp.arange(5, 10, dtype=jnp.int32),
                            jnp.array([True, False, True, True, False]),
                            jnp.arange(6, dtype=jnp.float32).reshape(3, 2)),
             "hp": ClientHParams(jnp.array([0, 1, 0], jnp.int32), jnp.array([0.1, 0.2, 0.3]),
                                 jnp.zeros(3)),
             "round": jnp.asarray(4, jnp.int32)}
    ck = Checkpointer(tmp_path)
    ck.save(1, state, {"round": 1})
    out, meta = ck.restore(jax.eval_shape(lambda: state))
    ck.close()
    assert meta == {"round": 1}
    assert isinstance(out["graph"], Graph)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(out), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
