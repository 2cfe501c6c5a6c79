"""D-PSGD, DFedAvg, DFedAvgM against plain references: a Python loop over nodes trains each
one alone (full batch, its own optimizer: SGD, heavy-ball momentum, Adam with state kept across
rounds) and mixes with the dense Metropolis matrix built entry by entry; the consensus distance
the round reports equals the reference's and falls under gossip; the ledger's bytes per client
and per link equal degree x model size; disconnected graphs and invalid degrees are refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrnd.algorithms import make_algorithm
from fedrnd.engine import ClientHParams, Engine, LocalSpec, client_hparams
from fedrnd.graphs import adjacency
from fedrnd.models import make_model
from tests.algorithms._dfl_reference import (
    assert_trees_close,
    dense_mixing,
    full_batch_train,
    mix,
    node,
    node_data,
    stack,
)

D, K = 4, 3
COUNTS = [6, 9, 4, 8, 7, 5, 10, 6, 7, 8]
C = len(COUNTS)


@pytest.fixture(scope="module")
def data(make_federated):
    return make_federated(COUNTS, dim=D, num_classes=K, seed=3)


def _alg(name, opt, steps=2, **options):
    model = make_model("mlp", (D,), K, hidden=[5])
    # batch 64 >= every node's data: each local step is a full-batch step
    return make_algorithm(name, Engine(model, LocalSpec(batch_size=64, steps=steps), opt),
                          **options)


def _dense_w(state, mixing="metropolis"):
    return dense_mixing(adjacency(state["graph"]), mixing)


def _consensus(trees):
    leaves = [np.stack([np.asarray(x) for x in xs]) for xs in
              zip(*[jax.tree.leaves(t) for t in trees], strict=True)]
    return sum(np.sum((x - x.mean(0)) ** 2) / len(x) for x in leaves)


@pytest.mark.parametrize("mixing", ["metropolis", "uniform"])
@pytest.mark.parametrize("gossip_steps", [1, 3])
def test_dfedavg_round_equals_per_node_training_then_dense_gossip(data, mixing, gossip_steps):
    opt, hp = client_hparams(C, optimizer="sgd", lr=0.3)
    alg = _alg("dfedavg", opt, steps=3, topology="d_regular", graph={"degree": 3},
               mixing=mixing, gossip_steps=gossip_steps)
    alg.validate(data)
    state = alg.init(jax.random.key(0), data, hp)
    w = _dense_w(state, mixing)
    step = jax.jit(alg.round)
    for r in range(2):
        trained = [full_batch_train(alg.engine.model, node(state["clients"]["params"], i),
                                    *node_data(data, i), 0.3, 3)[0] for i in range(C)]
        want = mix(w, trained, gossip_steps)
        state, m = step(state, data, jax.random.key(r))
        for i in range(C):
            assert_trees_close(node(state["clients"]["params"], i), want[i])
        np.testing.assert_allclose(float(m["consensus_distance"]), _consensus(want), rtol=1e-3,
                                   atol=1e-9)


def test_dfedavg_mixed_optimizers_keep_their_state_across_rounds(data):
    """Half the nodes SGD, half Adam (moments carried over rounds), in one jitted round."""
    kinds = np.array([0, 1] * (C // 2), np.int32)
    lrs = np.where(kinds == 0, 0.2, 0.02).astype(np.float32)
    opt, _ = client_hparams(C, optimizer={"sgd": 0.5, "adam": 0.5}, lr={"sgd": 0.2,
                                                                         "adam": 0.02})
    hp = ClientHParams(jnp.asarray(kinds), jnp.asarray(lrs), jnp.zeros(C))
    alg = _alg("dfedavg", opt, steps=2, topology="ring")
    state = alg.init(jax.random.key(0), data, hp)
    w = _dense_w(state)
    states = [None] * C
    params = [node(state["clients"]["params"], i) for i in range(C)]
    step = jax.jit(alg.round)
    for r in range(3):
        trained = []
        for i in range(C):
            kind = "sgd" if kinds[i] == 0 else "adam"
            p, states[i], _ = full_batch_train(alg.engine.model, params[i], *node_data(data, i),
                                               float(lrs[i]), 2, kind=kind, state=states[i])
            trained.append(p)
        params = mix(w, trained)
        state, _ = step(state, data, jax.random.key(r))
        assert_trees_close(state["clients"]["params"], stack(params), atol=2e-5)


@pytest.mark.parametrize("step_then_gossip", [False, True])
def test_dpsgd_round_equals_reference(data, step_then_gossip):
    opt, hp = client_hparams(C, optimizer="sgd", lr=0.5)
    alg = _alg("dpsgd", opt, topology="small_world", graph={"k": 4, "beta": 0.3},
               step_then_gossip=step_then_gossip)
    state = alg.init(jax.random.key(1), data, hp)
    w = _dense_w(state)
    step = jax.jit(alg.round)
    for r in range(2):
        x = [node(state["clients"]["params"], i) for i in range(C)]
        grads = [full_batch_train(alg.engine.model, x[i], *node_data(data, i), 0.5, 1)[2]
                 for i in range(C)]
        stepped = [jax.tree.map(lambda p, g: p - 0.5 * g, x[i], grads[i]) for i in range(C)]
        if step_then_gossip:  # x <- W (x - lr g)
            want = mix(w, stepped)
        else:  # x_i <- sum_j W_ij x_j - lr g_i(x_i)   (Lian et al. 2017, Algorithm 1)
            want = [jax.tree.map(lambda a, g: a - 0.5 * g, avg, grads[i])
                    for i, avg in enumerate(mix(w, x))]
        state, m = step(state, data, jax.random.key(r))
        assert_trees_close(state["clients"]["params"], stack(want))
        assert float(m["local_steps"]) == C


def test_dfedavgm_heavy_ball_restarts_every_round_and_ignores_prox(data):
    # Some nodes are prox_sgd in the population; DFedAvgM runs momentum SGD for all of them.
    opt, hp = client_hparams(C, optimizer={"sgd": 0.5, "prox_sgd": 0.5}, lr=0.1, prox_mu=5.0)
    alg = _alg("dfedavgm", opt, steps=3, topology="ring", momentum=0.8)
    state = alg.init(jax.random.key(2), data, hp)
    assert "opt" not in state["clients"]
    w = _dense_w(state)
    step = jax.jit(alg.round)
    for r in range(2):
        trained = [full_batch_train(alg.engine.model, node(state["clients"]["params"], i),
                                    *node_data(data, i), 0.1, 3, kind="momentum",
                                    momentum=0.8)[0] for i in range(C)]
        want = mix(w, trained)
        state, _ = step(state, data, jax.random.key(r))
        assert_trees_close(state["clients"]["params"], stack(want))


def test_consensus_distance_falls_under_gossip(data):
    opt, hp = client_hparams(C, optimizer="sgd", lr=1e-6)  # (almost) no local progress
    alg = _alg("dfedavg", opt, steps=1, topology="d_regular", graph={"degree": 4})
    state = alg.init(jax.random.key(0), data, hp)
    rng = np.random.default_rng(0)
    spread = jax.tree.map(lambda a: a + jnp.asarray(rng.normal(size=a.shape), a.dtype),
                          state["clients"]["params"])
    state = {**state, "clients": {**state["clients"], "params": spread}}
    before = _consensus([node(spread, i) for i in range(C)])
    step = jax.jit(alg.round)
    dist = []
    for r in range(6):
        state, m = step(state, data, jax.random.key(r))
        dist.append(float(m["consensus_distance"]))
    assert dist[0] < before
    assert all(b < a for a, b in zip(dist, dist[1:], strict=False))
    assert dist[-1] < 0.05 * before
    # the average model is kept: Metropolis weights are doubly stochastic
    mean0 = jax.tree.map(lambda a: a.mean(0), spread)
    assert_trees_close(jax.tree.map(lambda a: a.mean(0), state["clients"]["params"]), mean0,
                       atol=1e-4)


@pytest.mark.parametrize("name,gossip_steps", [("dfedavg", 1), ("dfedavg", 2), ("dpsgd", 1)])
def test_ledger_bytes_per_client_and_per_link_match_array_sizes(data, name, gossip_steps):
    opt, hp = client_hparams(C, optimizer="sgd", lr=0.1)
    alg = _alg(name, opt, topology="random_geometric", graph={"radius": 0.6},
               gossip_steps=gossip_steps)
    state = alg.init(jax.random.key(0), data, hp)
    model_bytes = 4 * ((D * 5 + 5) + (5 * K + K))  # float32 MLP 4-5-3
    deg = adjacency(state["graph"]).sum(1)
    _, m = jax.jit(alg.round)(state, data, jax.random.key(0))
    np.testing.assert_allclose(np.asarray(m["up/model"]), deg * model_bytes * gossip_steps)
    np.testing.assert_allclose(np.asarray(m["down/model"]), deg * model_bytes * gossip_steps)
    assert float(m["bytes_per_link"]) == 2 * model_bytes * gossip_steps
    assert float(m["links"]) == deg.sum() / 2
    # every byte sent is received: totals over clients agree with links x bytes per link
    assert float(m["up/model"].sum() + m["down/model"].sum()) == pytest.approx(
        float(m["links"] * m["bytes_per_link"]) * 2)


def test_ledger_of_a_redrawn_graph_counts_only_real_edges(data):
    opt, hp = client_hparams(C, optimizer="sgd", lr=0.1)
    alg = _alg("dfedavg", opt, topology="erdos_renyi", graph={"p": 0.3}, redraw=True)
    state = alg.init(jax.random.key(0), data, hp)
    assert "graph" not in state
    step = jax.jit(alg.round)
    links = set()
    for r in range(4):
        state, m = step(state, data, jax.random.key(r))
        nb = float(m["bytes_per_link"]) / 2
        assert float(m["up/model"].sum()) == pytest.approx(2 * float(m["links"]) * nb)
        links.add(float(m["links"]))
    assert len(links) > 1  # a new graph every round


@pytest.mark.parametrize("name", ["dpsgd", "dfedavg", "dfedavgm"])
def test_a_disconnected_graph_is_refused_with_its_components(data, name):
    opt, hp = client_hparams(C)
    alg = _alg(name, opt, topology="random_geometric", graph={"radius": 0.05})
    with pytest.raises(ValueError, match="disconnected: .* components"):
        alg.init(jax.random.key(0), data, hp)
    # allowed on request
    alg = _alg(name, opt, topology="random_geometric", graph={"radius": 0.05}, connected=False)
    alg.init(jax.random.key(0), data, hp)


@pytest.mark.parametrize("graph,match", [
    ({"degree": C}, r"degree must be an integer in \[0, N - 1"),
    ({"degree": -1}, "degree must be an integer"),
    ({"degree": 2.5}, "degree must be an integer"),
    ({}, "degree must be an integer"),
])
def test_invalid_degrees_are_refused(data, graph, match):
    opt, _ = client_hparams(C)
    with pytest.raises(ValueError, match=match):
        _alg("dfedavg", opt, topology="d_regular", graph=graph).validate(data)


def test_odd_degree_sum_is_refused(make_federated):
    odd = make_federated([5] * 9, dim=D, num_classes=K)
    opt, _ = client_hparams(9)
    with pytest.raises(ValueError, match="N \\* degree must be even"):
        _alg("dfedavg", opt, topology="d_regular", graph={"degree": 3}).validate(odd)


@pytest.mark.parametrize("options,match", [
    ({"mixing": "max_degree"}, "mixing"),
    ({"gossip_steps": 0}, "gossip_steps"),
    ({"cohort_size": 3}, "cohort_size"),
    ({"redraw": True}, "redraw"),
    ({"topology": "torus"}, "unknown"),
    ({"graph": {"radius": 0.3}}, "no option"),
])
def test_bad_options_are_refused(data, options, match):
    opt, _ = client_hparams(C)
    with pytest.raises(ValueError, match=match):
        _alg("dfedavg", opt, **{"topology": "ring", **options}).validate(data)


def test_dfedavgm_momentum_out_of_range_is_refused(data):
    opt, _ = client_hparams(C)
    with pytest.raises(ValueError, match="momentum"):
        _alg("dfedavgm", opt, topology="ring", momentum=1.0).validate(data)
