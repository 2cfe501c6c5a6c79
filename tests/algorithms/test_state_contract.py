"""The part of a method's state the driver reads (``MethodState``): every registered method's
state keeps the documented shapes under the documented keys, and the driver's accessors
(``split_state``, ``join_state``, ``cluster_assignment``) read exactly those keys."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrnd.algorithms.base import (
    CLIENTS,
    CLUSTER_ID,
    PENDING_DOWN,
    PENDING_UP,
    ROUND,
    ClientState,
    MethodState,
    cluster_assignment,
    join_state,
    split_state,
)
from tests.algorithms.test_conformance import METHODS, C, build, tiny_federation


def test_key_constants_are_the_typed_dicts_keys():
    # The constants the driver uses and the TypedDicts a method author reads name the same keys.
    assert {CLIENTS, ROUND} == set(MethodState.__annotations__)
    assert {CLUSTER_ID, PENDING_UP, PENDING_DOWN} < set(ClientState.__annotations__)


@pytest.mark.parametrize("name", METHODS)
def test_driver_visible_state_keys_have_their_documented_shapes(name):
    alg, hp = build(name)
    state = alg.init_template(jax.random.key(0), tiny_federation(), hp)
    assert isinstance(state, dict)
    if ROUND in state:
        assert state[ROUND].shape == () and jnp.issubdtype(state[ROUND].dtype, jnp.integer)
    rest, clients = split_state(state)
    assert CLIENTS not in rest
    if clients is None:
        return
    # The driver shards every per-client leaf along its first axis.
    assert all(x.shape[:1] == (C,) for x in jax.tree.leaves(clients)), name
    if CLUSTER_ID in clients:
        assert clients[CLUSTER_ID].shape == (C,)
        assert jnp.issubdtype(clients[CLUSTER_ID].dtype, jnp.integer)
    for k in (PENDING_UP, PENDING_DOWN):
        if k in clients:
            assert clients[k].shape == (C,) and clients[k].dtype == jnp.float32


def test_split_then_join_gives_the_state_back():
    state = {"slots": np.zeros((2, 3)), ROUND: np.int32(4),
             CLIENTS: {CLUSTER_ID: np.arange(C), "hp": np.ones(C)}}
    rest, clients = split_state(state)
    assert set(rest) == {"slots", ROUND} and clients is state[CLIENTS]
    assert join_state(rest, clients) == state
    assert split_state(rest) == (rest, None) and join_state(rest, None) is rest


def test_cluster_assignment_is_the_clients_cluster_id_or_none():
    assign = np.arange(C) % 2
    assert cluster_assignment({CLIENTS: {CLUSTER_ID: assign}}) is assign
    assert cluster_assignment({CLIENTS: {"hp": 1}}) is None
    assert cluster_assignment({"slots": 0}) is None
    assert cluster_assignment(None) is None
