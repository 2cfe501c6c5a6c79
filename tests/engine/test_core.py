"""Engine.train_segment_sum against Engine.train followed by a numpy per-slot weighted sum."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrnd.engine import ClientMapper, Engine, LocalSpec, client_hparams
from fedrnd.models import make_model
from tests.conftest import gaussian_federated


@pytest.mark.parametrize("chunk, cohort", [(1, None), (3, None), (2, [0, 2, 3, 6])])
def test_train_segment_sum_equals_train_then_per_slot_sums(chunk, cohort):
    data = gaussian_federated([5, 9, 3, 7, 4, 6, 8], dim=4)
    c, k = data.num_clients, 4
    model = make_model("mlp", (4,), 3, hidden=[6])
    opt, hp = client_hparams(c, optimizer={"sgd": 0.5, "adam": 0.5}, lr={"sgd": 0.2, "adam": 0.01},
                             seed=3)
    engine = Engine(model, LocalSpec(batch_size=3, epochs=2), opt, ClientMapper(chunk_size=chunk))
    keys = jax.random.split(jax.random.key(0), k)
    slots = jax.vmap(model.init)(keys)
    cid_all = np.array([1, 3, 1, 0, 3, 1, 0], np.int32)  # slot 2 stays empty
    ids = None if cohort is None else jnp.asarray(cohort)
    cid = cid_all if cohort is None else cid_all[cohort]
    key = jax.random.key(5)

    sums, mass, m = jax.jit(lambda s: engine.train_segment_sum(
        s, jnp.asarray(cid), data, hp, key, jnp.int32(0), ids=ids))(slots)
    p, _, m_ref = engine.train(None, data, hp, key, jnp.int32(0), ids=ids,
                               client_params=jax.tree.map(lambda s: s[cid], slots))
    counts = np.asarray(data.train_count)[cohort if cohort is not None else slice(None)]
    counts = counts.astype(np.float64)
    for slot in range(k):
        sel = cid == slot
        np.testing.assert_allclose(float(mass[slot]), counts[sel].sum())
        np.testing.assert_allclose(float(m["loss"][slot]),
                                   np.sum(counts[sel] * np.asarray(m_ref["loss"])[sel]), rtol=1e-5)
        for leaf, ref in zip(jax.tree.leaves(sums), jax.tree.leaves(p), strict=True):
            want = np.tensordot(counts[sel], np.asarray(ref, np.float64)[sel], axes=1)
            np.testing.assert_allclose(np.asarray(leaf[slot]), want, rtol=1e-5, atol=1e-5)
    assert float(mass[2]) == 0.0


def test_donated_client_models_are_held_twice_not_three_times_in_a_gossip_round():
    # Local training writes each node's model over its own slot of the donated stack, so a
    # decentralized round (train, then gossip into a new stack) holds two stacks, not three.
    from fedrnd.graphs import gossip, make_topology, mixing_edges

    n = 64
    data = gaussian_federated([6] * n, dim=32, num_classes=4)
    model = make_model("mlp", (32,), 4, hidden=[64])
    opt, hp = client_hparams(n, optimizer="sgd", lr=0.1)
    engine = Engine(model, LocalSpec(batch_size=3, steps=2), opt, ClientMapper(chunk_size=1))
    one = model.init(jax.random.key(0))
    stack = jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)) + 0, one)
    stack_bytes = sum(a.nbytes for a in jax.tree.leaves(stack))
    edges = mixing_edges(make_topology("ring", n).static(jax.random.key(1)), "metropolis")

    def round_(models, key):
        z, _, m = engine.train(None, data, hp, key, jnp.asarray(0), client_params=models)
        return gossip(z, edges, n, 1, 8), m["loss"]

    mem = jax.jit(round_, donate_argnums=0).lower(stack, jax.random.key(2)).compile() \
        .memory_analysis()
    if mem is None:
        pytest.skip("backend without memory_analysis")
    assert mem.alias_size_in_bytes >= stack_bytes
    messages = 8 * stack_bytes / n  # one edge chunk of messages
    assert mem.temp_size_in_bytes < 1.5 * stack_bytes + messages
    # The same models as the copying map.
    wide = engine.train(None, data, hp, jax.random.key(2), jnp.asarray(0), client_params=stack)
    narrow = dataclasses.replace(engine, mapper=ClientMapper(chunk_size=4)).train(
        None, data, hp, jax.random.key(2), jnp.asarray(0), client_params=stack)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), wide, narrow)
