"""SSD-FL: serverless semi-decentralized FL with heterogeneous optimizers, and its baselines.

Wang, Chiang, Poor, "Towards Serverless Semi-Decentralized Federated Learning with
Heterogeneous Optimizers" (2026; ``REFERENCES.md`` section 2). No server; devices on a
communication graph, each with its own local optimizer (the engine's per-client kinds and
learning rates).

1. *Set-up, once* (``init``, host): the graph is cut into clusters by recursive spectral
   bisection guided by the consensus gap and a data/optimizer heterogeneity score
   (:func:`fedrnd.graphs.spectral.spectral_clusters`; the rule is our reconstruction, see
   there). Every cluster is connected.
2. *Intra-cluster regime*, every round: local work with each device's own optimizer, then
   ``gossip_steps`` gossip steps over the links inside the clusters (Metropolis weights of the
   intra-cluster subgraph).
3. *Inter-cluster regime*, every ``inter_every``-th round instead: ``inter_steps`` gossip steps
   over the whole graph (``inter_links = "graph"``) or over the links between clusters only
   (``"bridges"``), so models cross cluster borders through the D2D links there.

Baselines of the paper's comparison, the same algorithm with other clusters and periods (each
registered under its own name, every option still settable):

=================== ==========================================================================
``sync_dfl``        synchronous DFL: one cluster, gossip over the whole graph every round
                    (DFedAvg with the SSD-FL options)
``periodic_dfl``    periodic DFL: every device its own cluster, so devices only train between
                    syncs; gossip over the whole graph every ``inter_every`` rounds
``random_dfl``      random DFL: one cluster; every round each link is up with probability
                    ``link_prob`` (0.5), gossip over the links that are up
``random_cluster_dfl`` random-cluster DFL: SSD-FL's regimes on ``num_clusters`` random clusters
                    of equal size (default: as many as the spectral rule finds); such clusters
                    need not be connected
=================== ==========================================================================

Ablations of the clustering: ``num_clusters = K`` with ``clustering = "spectral"`` bisects until
``K`` clusters whatever the criterion says; ``clustering = "random"`` is the random-cluster
baseline.

Placement (``placement = "communities"``): the drawn graph's nodes are relabelled so that the
data groups follow node order (:func:`fedrnd.graphs.place_groups`): on a ``planted_partition``
graph with one community per group, group ``g`` fills community ``g``, so the heterogeneity
follows the graph. The default ``"scattered"`` keeps the graph as drawn (the partitions shuffle
clients, so groups land anywhere).

State: per-device models, optimizer state and ``cluster_id [C]`` in ``state["clients"]``, the
static graph in ``state["graph"]``, the set-up phase's bytes in ``state["setup"]``. Metrics
(besides the decentralized ones): ``inter`` (1 in an inter-cluster round),
``cluster_consensus_distance`` (mean over devices of the squared distance to their cluster's
mean model). The ledger counts one model sent and one received per link used and gossip step
(``up/model``, ``down/model``) and, in round 0, the set-up phase (``up/setup``,
``down/setup``; :meth:`SSDFL.setup_bytes`): the spectral rule needs every device's descriptor
and neighbour list in one place, so they are gathered at a coordinating device (device 0) up a
breadth-first tree of the graph and the cluster ids sent back down it; every message crosses
one D2D link and every relay is charged. The descriptors are computed on the host, but what the
ledger counts is what that protocol would send. With ``fiedler = "gossip"`` every cluster's
Fiedler vector is computed by neighbour messages instead of the coordinator's eigensolver
(:func:`~fedrnd.graphs.fiedler.gossip_fiedler`, ``fiedler_iters`` power rounds; our
reconstruction) and its bytes are added to the set-up charge; the report's
``setup_fiedler_rounds`` is the largest number of its message rounds a device took part in. ``clustering = "none"``, ``"singletons"`` and
``"random"`` with ``num_clusters`` given need no set-up messages.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from fedrnd.algorithms._gossip import Gossip
from fedrnd.algorithms.base import Artifact, Metrics, Report, State, option
from fedrnd.data.federated import FederatedData
from fedrnd.engine import (
    ClientHParams,
    broadcast,
    clustering_scores,
    comm,
    segment_weighted_mean,
    tree_bytes,
)
from fedrnd.graphs import Graph, degrees, edge_chunk_for, gossip, mixing_edges, place_groups
from fedrnd.graphs.collect import broadcast_bytes, gather_bytes
from fedrnd.graphs.fiedler import gossip_fiedler
from fedrnd.graphs.spectral import client_descriptors, random_clusters, spectral_clusters

CLUSTERINGS = ("spectral", "random", "none", "singletons")
INTER_LINKS = ("graph", "bridges")
PLACEMENTS = ("scattered", "communities")
FIEDLERS = ("host", "gossip")
SETUP_ROOT = 0  # the coordinating device of the set-up phase
_WORD = 4  # bytes of one float32 descriptor entry, one int32 id
_LINK_KEY = 0x11C5  # folded into the round key to draw the links that are up
_CLUSTER_KEY = 0xC1A5
_SPECTRAL = "The spectral rule (:func:`~fedrnd.graphs.spectral.spectral_clusters`)"
_DESCRIPTOR = ("Weight of a descriptor block of the heterogeneity score "
               "(:func:`~fedrnd.graphs.spectral.client_descriptors`)")


@dataclasses.dataclass(frozen=True)
class SSDFL(Gossip):
    """SSD-FL (see the module docstring); besides the graph options of :class:`Gossip`
    (``gossip_steps``: the intra-cluster gossip per round), the options below."""

    name: ClassVar[str] = "ssdfl"
    clustering: str = option("spectral", choices=CLUSTERINGS,
                             doc="``spectral``, ``random``, ``none`` (one cluster) or "
                                 "``singletons``.")
    num_clusters: int | None = option(
        None, low=1, doc="``spectral``: bisect until this many (ablation); ``random``: how many "
                         "(unset: the spectral rule's count).")
    max_clusters: int | None = option(None, low=1, doc=f"{_SPECTRAL}: cap on the number of "
                                                       "clusters in criterion mode.")
    min_cluster_size: int = option(4, low=1, doc=f"{_SPECTRAL}: the smallest cluster a split "
                                                 "may leave.")
    split_threshold: float = option(0.5, low=0, doc=f"{_SPECTRAL}: split threshold.")
    gap_weight: float = option(1.0, low=0, doc=f"{_SPECTRAL}: weight of the spectral gap.")
    heterogeneity_weight: float = option(1.0, low=0, doc=f"{_SPECTRAL}: weight of the "
                                                         "heterogeneity score.")
    label_weight: float = option(1.0, low=0, doc=f"{_DESCRIPTOR}: labels (all 0: graph only).")
    input_weight: float = option(1.0, low=0, doc=f"{_DESCRIPTOR}: inputs.")
    optimizer_weight: float = option(1.0, low=0, doc=f"{_DESCRIPTOR}: local optimizer.")
    inter_every: int = option(5, low=0, doc="Period of the inter-cluster regime in rounds "
                                            "(0: never).")
    inter_steps: int = option(1, low=1, doc="Gossip steps in an inter-cluster round.")
    inter_links: str = option("graph", choices=INTER_LINKS,
                              doc="``graph`` (all links) or ``bridges`` (links between "
                                  "clusters only).")
    link_prob: float = option(1.0, low=0, high=1, low_open=True,
                              doc="Each link is up in a round with this probability (random "
                                  "DFL; 1: always).")
    placement: str = option("scattered", choices=PLACEMENTS,
                            doc="``scattered`` (the graph as drawn) or ``communities`` (data "
                                "groups follow node order: group ``g`` on community ``g`` of a "
                                "``planted_partition`` graph).")
    fiedler: str = option("host", choices=FIEDLERS,
                          doc=f"{_SPECTRAL}: how a cluster's Fiedler vector is computed: "
                              "``host`` (eigensolver at the coordinator) or ``gossip`` "
                              "(power iteration by neighbour messages, "
                              ":func:`~fedrnd.graphs.fiedler.gossip_fiedler`; its rounds and "
                              "bytes are charged to the set-up phase).")
    fiedler_iters: int = option(200, low=1, doc="``fiedler = gossip``: power rounds per "
                                                "Fiedler vector (one neighbour message "
                                                "each).")

    # -- configuration ------------------------------------------------------------------------
    def validate(self, data: FederatedData) -> None:
        super().validate(data)
        n, c = self.name, data.num_clients
        if self.redraw:
            raise ValueError(f"{n}: clusters are formed once on a static graph; redraw = true "
                             "is not supported (use random_dfl for links that change)")
        if self.num_clusters is not None and self.num_clusters > c:
            raise ValueError(f"{n}: num_clusters must be an integer in [1, {c}], got "
                             f"{self.num_clusters!r}")
        if self.num_clusters is not None and self.clustering in ("none", "singletons"):
            raise ValueError(f"{n}: num_clusters applies to clustering = spectral or random, "
                             f"not {self.clustering!r}")

    # -- set-up: clusters, once ---------------------------------------------------------------
    def descriptors(self, data: FederatedData, hp: ClientHParams) -> np.ndarray | None:
        if not (self.label_weight or self.input_weight or self.optimizer_weight):
            return None
        return client_descriptors(data, np.asarray(hp.kind), labels=self.label_weight,
                                  inputs=self.input_weight, optimizer=self.optimizer_weight)

    def spectral(self, graph: Graph, data: FederatedData, hp: ClientHParams,
                 num_clusters: int | None = None):
        """The spectral rule's clusters (:class:`~fedrnd.graphs.spectral.SpectralClusters`)."""
        return self.spectral_with_cost(graph, data, hp, num_clusters)[0]

    def spectral_with_cost(self, graph: Graph, data: FederatedData, hp: ClientHParams,
                           num_clusters: int | None = None):
        """``(clusters, cost)``: the spectral rule's clusters and, with ``fiedler =
        "gossip"``, the cost of its Fiedler computations, ``{"sent", "received", "rounds"}``
        (each ``[C]``: summed over every cluster whose cut was computed, rejected candidates
        included; clusters of one level are disjoint and could run at the same time, so the
        set-up's rounds are the largest per-device sum); ``None`` with ``fiedler = "host"``."""
        cost, fn = None, None
        if self.fiedler == "gossip":
            c = graph.num_nodes
            cost = {k: np.zeros(c) for k in ("sent", "received", "rounds")}

            def fn(adj, nodes):
                g = gossip_fiedler(adj, self.fiedler_iters, seed=(int(nodes[0]), len(nodes)))
                cost["sent"][nodes] += g.sent
                cost["received"][nodes] += g.received
                cost["rounds"][nodes] += g.rounds
                return g.vector

        res = spectral_clusters(graph, self.descriptors(data, hp), num_clusters=num_clusters,
                                max_clusters=self.max_clusters, min_size=self.min_cluster_size,
                                threshold=self.split_threshold, gap_weight=self.gap_weight,
                                heterogeneity_weight=self.heterogeneity_weight, fiedler=fn)
        return res, cost

    def form_clusters(self, key: jax.Array, graph: Graph, data: FederatedData,
                      hp: ClientHParams) -> np.ndarray:
        """``cluster_id [C]`` (host, once)."""
        return self.form_clusters_with_cost(key, graph, data, hp)[0]

    def form_clusters_with_cost(self, key: jax.Array, graph: Graph, data: FederatedData,
                                hp: ClientHParams) -> tuple[np.ndarray, dict | None]:
        """``(cluster_id [C], cost)``; ``cost`` as in :meth:`spectral_with_cost` (``None``
        when no gossip Fiedler computation runs)."""
        c = data.num_clients
        if self.clustering == "none":
            return np.zeros(c, np.int32), None
        if self.clustering == "singletons":
            return np.arange(c, dtype=np.int32), None
        if self.clustering == "spectral":
            res, cost = self.spectral_with_cost(graph, data, hp, self.num_clusters)
            return res.cluster_id, cost
        k, cost = self.num_clusters, None
        if k is None:
            res, cost = self.spectral_with_cost(graph, data, hp)
            k = res.num_clusters
        seed = int(jax.random.randint(jax.random.fold_in(key, _CLUSTER_KEY), (), 0, 2 ** 31 - 1))
        return random_clusters(c, k, seed), cost

    def runs_spectral(self) -> bool:
        """Whether the set-up phase runs the spectral rule (and so gathers the descriptors)."""
        return self.clustering == "spectral" or (self.clustering == "random"
                                                 and self.num_clusters is None)

    def descriptor_bytes(self, data: FederatedData) -> int:
        """Bytes of one device's descriptor as sent: its label histogram and mean input in
        float32 and its optimizer kind as one int32, each only if its weight is not 0."""
        words = 0
        if self.label_weight:
            words += int(data.num_classes)
        if self.input_weight:
            words += int(np.prod(data.x.shape[1:]))
        if self.optimizer_weight:
            words += 1
        return _WORD * words

    def setup_bytes(self, graph: Graph, data: FederatedData, fiedler_cost: dict | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
        """``(up [C], down [C])`` bytes of the set-up phase (host, once).

        Every device's record (its descriptor, :meth:`descriptor_bytes`, its id and its
        neighbours' ids, one int32 each) goes up a breadth-first tree to device
        ``SETUP_ROOT``, each device forwarding its subtree's records
        (:func:`~fedrnd.graphs.collect.gather_bytes`); the cluster ids (``[C]`` int32) come
        back down the tree (:func:`~fedrnd.graphs.collect.broadcast_bytes`). With
        ``fiedler_cost`` (:meth:`spectral_with_cost`, ``fiedler = "gossip"``), the bytes of
        the gossip Fiedler computations are added (``sent`` up, ``received`` down): the score
        terms of the rule are still evaluated at the coordinator, so the gather stays. Zero
        when no spectral rule runs.
        """
        c = data.num_clients
        if not self.runs_spectral():
            return np.zeros(c), np.zeros(c)
        deg = np.asarray(degrees(graph), np.float64)
        record = self.descriptor_bytes(data) + _WORD * (1 + deg)
        up_g, down_g = gather_bytes(graph, record, SETUP_ROOT)
        up_b, down_b = broadcast_bytes(graph, _WORD * c, SETUP_ROOT)
        up, down = up_g + up_b, down_g + down_b
        if fiedler_cost is not None:
            up, down = up + fiedler_cost["sent"], down + fiedler_cost["received"]
        return up, down

    def placed_graph(self, key: jax.Array, data: FederatedData) -> Graph:
        """The static graph, with the data groups placed on it (``placement``)."""
        graph = self.static_graph(key, data.num_clients)
        if self.placement == "communities":
            graph = place_groups(graph, np.asarray(data.group))
        return graph

    def init(self, key: jax.Array, data: FederatedData, hp: ClientHParams) -> State:
        graph = self.placed_graph(key, data)
        state = self._state(key, hp, data.num_clients, graph)
        cid, cost = self.form_clusters_with_cost(key, graph, data, hp)
        state["clients"]["cluster_id"] = jnp.asarray(cid, jnp.int32)
        up, down = self.setup_bytes(graph, data, cost)
        rounds = np.zeros(data.num_clients) if cost is None else cost["rounds"]
        state["setup"] = {"up": jnp.asarray(up, jnp.float32),
                          "down": jnp.asarray(down, jnp.float32),
                          "fiedler_rounds": jnp.asarray(rounds, jnp.float32)}
        return state

    def init_template(self, key: jax.Array, data: FederatedData, hp: ClientHParams) -> State:
        state = super().init_template(key, data, hp)
        c = data.num_clients
        state["clients"]["cluster_id"] = jax.ShapeDtypeStruct((c,), jnp.int32)
        state["setup"] = {"up": jax.ShapeDtypeStruct((c,), jnp.float32),
                          "down": jax.ShapeDtypeStruct((c,), jnp.float32),
                          "fiedler_rounds": jax.ShapeDtypeStruct((c,), jnp.float32)}
        return state

    # -- one round ----------------------------------------------------------------------------
    def is_inter(self, round_idx: jax.Array) -> jax.Array:
        """Whether round ``round_idx`` (0-based) is an inter-cluster round."""
        if self.inter_every == 0:
            return jnp.zeros((), bool)
        return (round_idx + 1) % self.inter_every == 0

    def round(self, state: State, data: FederatedData, key: jax.Array) -> tuple[State, Metrics]:
        c = data.num_clients
        graph: Graph = state["graph"]
        cl = state["clients"]
        cid = cl["cluster_id"]
        k_train = jax.random.fold_in(key, 0)
        up = graph.valid
        if self.link_prob < 1:
            up = up & jax.random.bernoulli(jax.random.fold_in(key, _LINK_KEY), self.link_prob,
                                           graph.valid.shape)
        same = cid[graph.u] == cid[graph.v]
        intra = graph._replace(valid=up & same)
        inter = graph._replace(valid=up & ~same if self.inter_links == "bridges" else up)

        x = cl["params"]
        z, opt, m = self.local_train(state, data, k_train)
        nbytes = tree_bytes(jax.tree.map(lambda a: a[0], x))
        chunk = self.edge_chunk or edge_chunk_for(nbytes)
        is_inter = self.is_inter(state["round"])
        e_intra, e_inter = mixing_edges(intra, self.mixing), mixing_edges(inter, self.mixing)
        if self.inter_every == 0:
            new = gossip(z, e_intra, c, self.gossip_steps, chunk)
        else:
            new = jax.lax.cond(is_inter,
                               lambda t: gossip(t, e_inter, c, self.inter_steps, chunk),
                               lambda t: gossip(t, e_intra, c, self.gossip_steps, chunk), z)
        deg = jnp.where(is_inter, degrees(inter), degrees(intra)).astype(jnp.float32)
        steps = jnp.where(is_inter, self.inter_steps, self.gossip_steps)
        metrics = self.round_metrics(m, data, new, deg, nbytes, steps)
        ones = jnp.ones((c,), jnp.float32)
        means, _ = segment_weighted_mean(new, ones, cid, c)
        own = broadcast(means, cid)
        metrics["cluster_consensus_distance"] = sum(
            jnp.sum((a.astype(jnp.float32) - b.astype(jnp.float32)) ** 2) / c
            for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(own), strict=True))
        metrics["inter"] = is_inter.astype(jnp.float32)
        first = (state["round"] == 0).astype(jnp.float32)
        metrics.update(comm(up_setup=first * state["setup"]["up"],
                            down_setup=first * state["setup"]["down"]))
        return self.next_state(state, new, opt), metrics

    def report(self, state: State, data: FederatedData) -> Report:
        """The graph's report, the ``clusters`` artifact (cluster ids, true groups, graph)
        and, for the spectral rule, ``clusters.json`` (every split made and the candidates
        rejected, with their terms); the cluster count, sizes and ARI/NMI against the true
        groups."""
        rep = super().report(state, data)
        cl = state["clients"]
        cid = np.asarray(cl["cluster_id"])
        group = np.asarray(data.group)
        g = state["graph"]
        ok = np.asarray(g.valid)
        rep.artifacts["clusters"] = Artifact("graph", {
            "cluster_id": cid, "group": group, "u": np.asarray(g.u)[ok],
            "v": np.asarray(g.v)[ok], "positions": np.asarray(g.positions)})
        if self.clustering == "spectral":
            hp = jax.tree.map(np.asarray, cl["hp"])
            res = self.spectral(g, data, hp, self.num_clusters)
            rep.artifacts["clusters.json"] = Artifact(
                "json", {"splits": res.splits, "rejected": res.rejected})
        setup = state["setup"]
        rep.scalars.update(clustering_scores(cid, group),
                           setup_bytes_per_device=float(np.mean(np.asarray(setup["up"])
                                                                + np.asarray(setup["down"]))),
                           setup_fiedler_rounds=float(np.max(np.asarray(
                               setup["fiedler_rounds"]))),
                           cluster_sizes_min=float(np.bincount(cid).min()),
                           cluster_sizes_max=float(np.bincount(cid).max()))
        return rep


@dataclasses.dataclass(frozen=True)
class SyncDFL(SSDFL):
    """Synchronous DFL: one cluster, gossip over the whole graph every round."""

    name: ClassVar[str] = "sync_dfl"
    clustering: str = "none"
    inter_every: int = 0


@dataclasses.dataclass(frozen=True)
class PeriodicDFL(SSDFL):
    """Periodic DFL: local training only, gossip over the whole graph every ``inter_every``."""

    name: ClassVar[str] = "periodic_dfl"
    clustering: str = "singletons"


@dataclasses.dataclass(frozen=True)
class RandomDFL(SSDFL):
    """Random DFL: every link up with probability ``link_prob`` in each round."""

    name: ClassVar[str] = "random_dfl"
    clustering: str = "none"
    inter_every: int = 0
    link_prob: float = 0.5


@dataclasses.dataclass(frozen=True)
class RandomClusterDFL(SSDFL):
    """Random-cluster DFL: SSD-FL's two regimes on random clusters of equal size."""

    name: ClassVar[str] = "random_cluster_dfl"
    clustering: str = "random"

