"""SSD-FL and its baselines: a round equals per-node full-batch training followed by dense
gossip inside the clusters (intra rounds) or over the whole graph / the bridges (inter rounds);
sync DFL equals DFedAvg; periodic DFL only talks every k rounds; random DFL uses a random
subset of links; clusters come from the spectral rule (heterogeneity splits a ring at the
boundary of two label groups), a fixed K, or random balanced clusters; bad options fail."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from fedrnd.algorithms import make_algorithm
from fedrnd.data import Dataset, Partition, build_federated
from fedrnd.driver.outputs import write_report
from fedrnd.engine import Engine, LocalSpec, client_hparams
from fedrnd.graphs import adjacency
from fedrnd.graphs.spectral import spectral_clusters
from fedrnd.models import make_model
from tests.algorithms._dfl_reference import (
    assert_trees_close,
    dense_mixing,
    full_batch_train,
    mix,
    node,
    node_data,
)

D, K = 4, 3


def two_label_groups(n, per=8, seed=0):
    """``n`` nodes; the first half hold classes 0/1, the second half class 2 (a label skew
    aligned with node ids, so an unshuffled ring has the groups on two arcs)."""
    rng = np.random.default_rng(seed)
    ys = [rng.integers(0, 2, per) if i < n // 2 else np.full(per, 2) for i in range(n)]
    y = np.concatenate(ys).astype(np.int32)
    means = rng.normal(size=(K, D))
    x = (means[y] + rng.normal(size=(len(y), D))).astype(np.float32)
    tr = np.split(np.arange(n * per), n)
    ds = Dataset(x, y, x[:n * 2], y[:n * 2], K, "two_groups")
    part = Partition(tr, np.split(np.arange(n * 2), n),
                     (np.arange(n) >= n // 2).astype(np.int32))
    return build_federated(ds, part)


def _alg(name, data, opt, steps=2, **options):
    model = make_model("logreg", (D,), K)
    eng = Engine(model, LocalSpec(batch_size=64, steps=steps), opt)
    alg = make_algorithm(name, eng, **options)
    alg.validate(data)
    return alg


def _reference_round(alg, state, data, lr, steps, edges_mask):
    """Per-node full-batch SGD, then gossip with the dense Metropolis matrix of the links in
    ``edges_mask`` (a bool over the graph's edge slots)."""
    c = data.num_clients
    model = alg.engine.model
    g = state["graph"]
    trained = []
    for i in range(c):
        x, y = node_data(data, i)
        p, _, _ = full_batch_train(model, node(state["clients"]["params"], i), x, y, lr, steps)
        trained.append(p)
    adj = np.zeros((c, c), int)
    u, v = np.asarray(g.u)[edges_mask], np.asarray(g.v)[edges_mask]
    adj[u, v] = adj[v, u] = 1
    return mix(dense_mixing(adj), trained, 1), adj


@pytest.mark.parametrize("inter_links", ["graph", "bridges"])
def test_ssdfl_rounds_equal_per_node_training_and_dense_gossip(inter_links):
    n, lr, steps = 16, 0.3, 2
    data = two_label_groups(n)
    opt, hp = client_hparams(n, optimizer="sgd", lr=lr)
    alg = _alg("ssdfl", data, opt, steps, topology="ring", inter_every=2, num_clusters=2,
               inter_links=inter_links, min_cluster_size=2, input_weight=0.0)
    state = alg.init(jax.random.key(0), data, hp)
    cid = np.asarray(state["clients"]["cluster_id"])
    assert sorted(np.bincount(cid)) == [8, 8]
    step = jax.jit(alg.round)
    nbytes = 4 * (D * K + K)
    g = state["graph"]
    same = cid[np.asarray(g.u)] == cid[np.asarray(g.v)]
    for r, inter in ((0, False), (1, True)):
        mask = (np.ones_like(same) if inter_links == "graph" else ~same) if inter else same
        want, adj = _reference_round(alg, state, data, lr, steps, mask)
        state, m = step(state, data, jax.random.key(r))
        for i in range(n):
            assert_trees_close(node(state["clients"]["params"], i), want[i])
        assert float(m["inter"]) == float(inter)
        np.testing.assert_allclose(np.asarray(m["up/model"]), adj.sum(1) * nbytes)
        np.testing.assert_allclose(np.asarray(m["down/model"]), adj.sum(1) * nbytes)
        assert float(m["links"]) == adj.sum() / 2
    # Clusters stay the same across rounds.
    np.testing.assert_array_equal(np.asarray(state["clients"]["cluster_id"]), cid)


def test_heterogeneity_clusters_a_ring_into_its_two_label_arcs():
    n = 24
    data = two_label_groups(n)
    opt, hp = client_hparams(n, optimizer="sgd", lr=0.1)
    alg = _alg("ssdfl", data, opt, topology="ring")
    state = alg.init(jax.random.key(0), data, hp)
    cid = np.asarray(state["clients"]["cluster_id"])
    np.testing.assert_array_equal(cid, (np.arange(n) >= n // 2).astype(int))
    # Without descriptors the ring has no bottleneck: one cluster.
    alg = _alg("ssdfl", data, opt, topology="ring", label_weight=0.0, input_weight=0.0,
               optimizer_weight=0.0)
    assert np.all(np.asarray(alg.init(jax.random.key(0), data, hp)["clients"]["cluster_id"])
                  == 0)


def test_optimizer_groups_drive_the_clusters_too():
    n = 24
    data = two_label_groups(n)
    data = data.replace(y=data.y % 2)  # no label skew left
    opt, hp = client_hparams(n, lr={"sgd": 0.1, "adam": 0.01}, group=np.arange(n) >= n // 2,
                             per_group=["sgd", "adam"])
    alg = _alg("ssdfl", data, opt, topology="ring", label_weight=0.0, input_weight=0.0)
    cid = np.asarray(alg.init(jax.random.key(0), data, hp)["clients"]["cluster_id"])
    np.testing.assert_array_equal(cid, (np.arange(n) >= n // 2).astype(int))


def test_sync_dfl_equals_dfedavg():
    n = 12
    data = two_label_groups(n)
    opt, hp = client_hparams(n, optimizer="sgd", lr=0.2)
    a = _alg("sync_dfl", data, opt, topology="d_regular", graph={"degree": 3})
    b = _alg("dfedavg", data, opt, topology="d_regular", graph={"degree": 3})
    sa, sb = a.init(jax.random.key(0), data, hp), b.init(jax.random.key(0), data, hp)
    for r in range(3):
        sa, ma = jax.jit(a.round)(sa, data, jax.random.key(r))
        sb, mb = jax.jit(b.round)(sb, data, jax.random.key(r))
    assert_trees_close(sa["clients"]["params"], sb["clients"]["params"])
    np.testing.assert_allclose(np.asarray(ma["up/model"]), np.asarray(mb["up/model"]))


def test_periodic_dfl_talks_only_every_k_rounds():
    n = 12
    data = two_label_groups(n)
    opt, hp = client_hparams(n, optimizer="sgd", lr=0.2)
    alg = _alg("periodic_dfl", data, opt, topology="ring", inter_every=3)
    state = alg.init(jax.random.key(0), data, hp)
    assert len(np.unique(np.asarray(state["clients"]["cluster_id"]))) == n
    model = alg.engine.model
    for r in range(6):
        before = state["clients"]["params"]
        state, m = jax.jit(alg.round)(state, data, jax.random.key(r))
        talk = (r + 1) % 3 == 0
        assert float(m["up/model"].sum() > 0) == float(talk)
        if not talk:  # local training only: each node equals its own training alone
            x, y = node_data(data, 5)
            p, _, _ = full_batch_train(model, node(before, 5), x, y, 0.2, 2)
            assert_trees_close(node(state["clients"]["params"], 5), p)


def test_random_dfl_uses_a_random_subset_of_links():
    n = 20
    data = two_label_groups(n)
    opt, hp = client_hparams(n, optimizer="sgd", lr=0.2)
    alg = _alg("random_dfl", data, opt, topology="d_regular", graph={"degree": 4},
               link_prob=0.5)
    state = alg.init(jax.random.key(0), data, hp)
    step = jax.jit(alg.round)
    links = []
    for r in range(12):
        state, m = step(state, data, jax.random.key(r))
        links.append(float(m["links"]))
    assert 0 < min(links) and max(links) < 40 and len(set(links)) > 1
    assert 0.35 < np.mean(links) / 40 < 0.65


def test_random_clusters_take_the_spectral_count_by_default_and_k_when_given():
    n = 24
    data = two_label_groups(n)
    opt, hp = client_hparams(n, optimizer="sgd", lr=0.1)
    alg = _alg("random_cluster_dfl", data, opt, topology="ring")
    cid = np.asarray(alg.init(jax.random.key(0), data, hp)["clients"]["cluster_id"])
    assert sorted(np.bincount(cid)) == [12, 12]
    assert not np.array_equal(cid, (np.arange(n) >= n // 2).astype(int))
    alg = _alg("random_cluster_dfl", data, opt, topology="ring", num_clusters=5)
    cid = np.asarray(alg.init(jax.random.key(1), data, hp)["clients"]["cluster_id"])
    assert sorted(np.bincount(cid)) == [4, 5, 5, 5, 5]


def test_fixed_number_of_spectral_clusters():
    n = 24
    data = two_label_groups(n)
    opt, hp = client_hparams(n, optimizer="sgd", lr=0.1)
    alg = _alg("ssdfl", data, opt, topology="ring", num_clusters=4, min_cluster_size=2)
    state = alg.init(jax.random.key(0), data, hp)
    cid = np.asarray(state["clients"]["cluster_id"])
    assert len(np.unique(cid)) == 4
    g = state["graph"]
    want = spectral_clusters(g, alg.descriptors(data, hp), num_clusters=4, min_size=2)
    np.testing.assert_array_equal(cid, want.cluster_id)
    # every cluster an arc of the ring: connected
    a = adjacency(g)
    from scipy.sparse.csgraph import connected_components
    for k in range(4):
        m = cid == k
        assert connected_components(a[m][:, m])[0] == 1


def test_report_writes_clusters_and_scores(tmp_path):
    n = 24
    data = two_label_groups(n)
    opt, hp = client_hparams(n, optimizer="sgd", lr=0.1)
    alg = _alg("ssdfl", data, opt, topology="ring")
    state = alg.init(jax.random.key(0), data, hp)
    rep = alg.report(state, data)
    assert rep.scalars["clusters"] == 2 and rep.scalars["ari"] == 1.0
    assert set(rep.artifacts) == {"graph", "clusters", "clusters.json"}
    assert write_report(tmp_path, rep) == rep.scalars  # the driver writes the files
    z = np.load(tmp_path / "clusters.npz")
    np.testing.assert_array_equal(z["cluster_id"], np.asarray(state["clients"]["cluster_id"]))
    assert (tmp_path / "clusters.json").exists()


@pytest.mark.parametrize("options,match", [
    ({"redraw": True, "topology": "erdos_renyi", "graph": {"p": 0.3}}, "redraw"),
    ({"clustering": "kmeans"}, "clustering"),
    ({"inter_links": "all"}, "inter_links"),
    ({"inter_every": -1}, "inter_every"),
    ({"inter_steps": 0}, "inter_steps"),
    ({"link_prob": 0.0}, "link_prob"),
    ({"num_clusters": 0}, "num_clusters"),
    ({"clustering": "none", "num_clusters": 2}, "num_clusters"),
    ({"min_cluster_size": 0}, "min_cluster_size"),
    ({"gap_weight": -1.0}, "gap_weight"),
    ({"fiedler": "power"}, "fiedler"),
    ({"fiedler": "gossip", "fiedler_iters": 0}, "fiedler_iters"),
])
def test_bad_options_are_refused(options, match):
    data = two_label_groups(12)
    opt, _ = client_hparams(12)
    with pytest.raises(ValueError, match=match):
        _alg("ssdfl", data, opt, **{"topology": "ring", **options})


def test_a_disconnected_graph_is_refused():
    data = two_label_groups(30)
    opt, hp = client_hparams(30)
    alg = _alg("ssdfl", data, opt, topology="random_geometric", graph={"radius": 0.05})
    with pytest.raises(ValueError, match="disconnected"):
        alg.init(jax.random.key(0), data, hp)


@pytest.mark.slow
def test_driver_run_resumes_to_the_same_models_and_reports_clusters(tmp_path):
    """Through the driver: checkpoint, resume across an inter-cluster round, outputs."""
    from fedrnd.driver import simulate
    from fedrnd.driver.config import AlgorithmConfig, Config, DataConfig, ModelConfig

    def cfg(rounds):
        opts = {"topology": "ring", "inter_every": 3, "min_cluster_size": 2}
        return Config(rounds=rounds, eval_every=2, checkpoint_every=2, progress=False,
                      data=DataConfig(source="digits", partition="rotation",
                                      partition_options={"num_groups": 2}, num_clients=12),
                      model=ModelConfig("logreg", {}),
                      algorithms=[AlgorithmConfig("ssdfl", opts),
                                  AlgorithmConfig("random_dfl", {"topology": "ring"})])

    full = simulate(cfg(6), run_dir=tmp_path / "full", verbose=False)
    simulate(cfg(4), run_dir=tmp_path / "cut", verbose=False)
    resumed = simulate(cfg(6), run_dir=tmp_path / "cut", resume=True, allow_change=["rounds"],
                       verbose=False)
    for tag in ("ssdfl", "random_dfl"):
        for a, b in zip(jax.tree.leaves(full.methods[tag].state),
                        jax.tree.leaves(resumed.methods[tag].state), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(full.methods[tag].bytes_up, resumed.methods[tag].bytes_up)
    final = full.methods["ssdfl"].final
    assert final["clusters"] >= 1 and "ari" in final
    assert (tmp_path / "full" / "ssdfl" / "clusters.npz").exists()
    inter = [row.get("inter") for row in full.methods["ssdfl"].history]
    assert inter == [0.0, 0.0, 1.0, 0.0, 0.0, 1.0]


# --- the set-up phase in the ledger, placement of groups on communities -----------------------

def test_setup_phase_is_charged_in_round_zero_as_a_gather_and_broadcast_by_hand():
    """Ring 0-1-2-3-4-5-0, coordinator 0. Breadth-first tree: 1 and 5 under 0, 2 under 1,
    4 under 5, 3 under 2. A record is the descriptor (3 label + 4 input floats + 1 optimizer
    id = 32 bytes) plus the device's id and its 2 neighbours' ids (12 bytes): R = 44. Gather:
    each device sends its subtree's records up; broadcast: the 6 cluster ids (24 bytes) go
    down, each device forwarding them to its children."""
    n = 6
    data = two_label_groups(n)
    opt, hp = client_hparams(n, optimizer="sgd", lr=0.1)
    alg = _alg("ssdfl", data, opt, topology="ring")
    assert alg.descriptor_bytes(data) == 4 * (K + D + 1)
    state = alg.init(jax.random.key(0), data, hp)
    r, ids = 44.0, 24.0
    subtree = np.array([0, 3, 2, 1, 1, 2])             # records each device sends up
    received = np.array([5, 2, 1, 0, 0, 1])             # records each device receives
    children = np.array([2, 1, 1, 0, 0, 1])
    want_up = subtree * r + children * ids
    want_down = received * r + (np.arange(n) != 0) * ids
    step = jax.jit(alg.round)
    state, m = step(state, data, jax.random.key(0))
    np.testing.assert_allclose(np.asarray(m["up/setup"]), want_up)
    np.testing.assert_allclose(np.asarray(m["down/setup"]), want_down)
    state, m = step(state, data, jax.random.key(1))  # charged once
    assert float(np.sum(m["up/setup"])) == 0.0 and float(np.sum(m["down/setup"])) == 0.0
    rep = alg.report(state, data)
    assert rep.scalars["setup_bytes_per_device"] == pytest.approx(
        float(np.mean(want_up + want_down)))
    # Dropping a descriptor block drops its bytes; the graph records stay.
    small = _alg("ssdfl", data, opt, topology="ring", input_weight=0.0)
    up, _ = small.setup_bytes(state["graph"], data)
    np.testing.assert_allclose(up, subtree * (4 * (K + 1) + 12) + children * ids)


@pytest.mark.parametrize("name,options", [("sync_dfl", {}), ("periodic_dfl", {}),
                                          ("random_cluster_dfl", {"num_clusters": 2})])
def test_methods_without_a_spectral_set_up_send_no_set_up_bytes(name, options):
    n = 8
    data = two_label_groups(n)
    opt, hp = client_hparams(n, optimizer="sgd", lr=0.1)
    alg = _alg(name, data, opt, topology="ring", **options)
    state = alg.init(jax.random.key(0), data, hp)
    _, m = jax.jit(alg.round)(state, data, jax.random.key(0))
    assert float(np.sum(m["up/setup"])) == 0.0 and float(np.sum(m["down/setup"])) == 0.0


def shuffled_two_groups(n, per=8, seed=0):
    """Two label groups (classes 0/1 vs class 2) dealt to clients in random order."""
    rng = np.random.default_rng(seed)
    group = rng.permutation(np.arange(n) >= n // 2).astype(np.int32)
    ys = [rng.integers(0, 2, per) if g == 0 else np.full(per, 2) for g in group]
    y = np.concatenate(ys).astype(np.int32)
    means = rng.normal(size=(K, D))
    x = (means[y] + rng.normal(size=(len(y), D))).astype(np.float32)
    ds = Dataset(x, y, x[:n * 2], y[:n * 2], K, "two_groups")
    part = Partition(np.split(np.arange(n * per), n), np.split(np.arange(n * 2), n), group)
    return build_federated(ds, part)


def test_groups_placed_on_communities_are_the_clusters_ssdfl_finds():
    n = 24
    data = shuffled_two_groups(n)
    group = np.asarray(data.group)
    opt, hp = client_hparams(n, optimizer="sgd", lr=0.1)
    graph = {"communities": 2, "p_in": 0.6, "p_out": 0.03}
    alg = _alg("ssdfl", data, opt, topology="planted_partition", graph=graph,
               placement="communities")
    state = alg.init(jax.random.key(0), data, hp)
    g = state["graph"]
    e = np.stack([np.asarray(g.u), np.asarray(g.v)], 1)[np.asarray(g.valid)]
    same = group[e[:, 0]] == group[e[:, 1]]
    assert same.mean() > 0.8  # most links inside a group: the groups are the communities
    rep = alg.report(state, data)
    assert rep.scalars["clusters"] == 2 and rep.scalars["ari"] == 1.0
    # As drawn (scattered), the same graph's communities are not the groups.
    alg = _alg("ssdfl", data, opt, topology="planted_partition", graph=graph,
               label_weight=0.0, input_weight=0.0, optimizer_weight=0.0)
    rep = alg.report(alg.init(jax.random.key(0), data, hp), data)
    assert rep.scalars["ari"] < 0.5


def test_unknown_placement_is_refused():
    data = two_label_groups(12)
    opt, _ = client_hparams(12)
    with pytest.raises(ValueError, match="placement"):
        _alg("ssdfl", data, opt, topology="ring", placement="by_hand")


# --- the Fiedler vector by gossip: the same clusters, its messages in the ledger -------------

@pytest.mark.parametrize("case", ["ring with two label arcs", "planted partition"])
def test_gossip_fiedler_finds_the_host_clusters(case):
    """With the default budget of power rounds, every cut the spectral rule makes (and every
    candidate it rejects) is the host eigensolver's."""
    n = 24
    if case == "planted partition":
        data = shuffled_two_groups(n)
        opts = {"topology": "planted_partition", "placement": "communities",
                "graph": {"communities": 2, "p_in": 0.6, "p_out": 0.03}}
    else:
        data = two_label_groups(n)
        opts = {"topology": "ring", "min_cluster_size": 3}
    opt, hp = client_hparams(n, optimizer="sgd", lr=0.1)
    host = _alg("ssdfl", data, opt, **opts)
    gossip = _alg("ssdfl", data, opt, fiedler="gossip", **opts)
    s_host, s_gossip = host.init(jax.random.key(0), data, hp), gossip.init(jax.random.key(0),
                                                                          data, hp)
    cid = np.asarray(s_host["clients"]["cluster_id"])
    assert len(np.unique(cid)) >= 2  # a split was made: the vector mattered
    np.testing.assert_array_equal(np.asarray(s_gossip["clients"]["cluster_id"]), cid)
    r_host = host.spectral(s_host["graph"], data, hp)
    r_gossip = gossip.spectral(s_gossip["graph"], data, hp)
    for a, b in zip(r_host.splits + r_host.rejected, r_gossip.splits + r_gossip.rejected,
                    strict=True):
        assert {a["size_a"], a["size_b"]} == {b["size_a"], b["size_b"]}
        assert b["phi"] == pytest.approx(a["phi"]) and b["score"] == pytest.approx(a["score"])
    assert gossip.report(s_gossip, data).scalars["setup_fiedler_rounds"] > 0
    assert host.report(s_host, data).scalars["setup_fiedler_rounds"] == 0


def test_gossip_fiedler_messages_are_charged_to_the_set_up_by_hand():
    """Ring 0-1-2-3-4-5-0, two label arcs, min_cluster_size 3: the rule computes one Fiedler
    vector (the whole ring's; sides of 3 cannot be cut again). The breadth-first tree from 0
    (1 and 5 under 0, 2 under 1, 4 under 5, 3 under 2) has depth 3: a window of 6 rounds, so
    fiedler_iters = 5 runs 6 power rounds. Each power round a device sends its entry (8
    bytes) to its 2 neighbours: 96 bytes each way. The window: 24 bytes of partial sums up to
    the parent, 16 bytes (mean, spread) down to each child. On top of the gather/broadcast of
    the host rule (the numbers of the hand test above)."""
    n = 6
    data = two_label_groups(n)
    opt, hp = client_hparams(n, optimizer="sgd", lr=0.1)
    alg = _alg("ssdfl", data, opt, topology="ring", min_cluster_size=3, fiedler="gossip",
               fiedler_iters=5)
    state = alg.init(jax.random.key(0), data, hp)
    r, ids = 44.0, 24.0
    subtree = np.array([0, 3, 2, 1, 1, 2])
    received = np.array([5, 2, 1, 0, 0, 1])
    children = np.array([2, 1, 1, 0, 0, 1])
    parent = np.arange(n) != 0
    gossip_up = 96 + 24 * parent + 16 * children
    gossip_down = 96 + 24 * children + 16 * parent
    _, m = jax.jit(alg.round)(state, data, jax.random.key(0))
    np.testing.assert_allclose(np.asarray(m["up/setup"]), subtree * r + children * ids
                               + gossip_up)
    np.testing.assert_allclose(np.asarray(m["down/setup"]), received * r + parent * ids
                               + gossip_down)
    assert alg.report(state, data).scalars["setup_fiedler_rounds"] == 6
