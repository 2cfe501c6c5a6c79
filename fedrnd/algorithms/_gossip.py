"""The machinery every gossip method shares: per-node models, a graph, local work, gossip.

Not a method itself (no registered name): D-PSGD, DFedAvg, DFedAvgM
(:mod:`fedrnd.algorithms.decentralized`), RND-DFL and the SSD-FL family derive from
:class:`Gossip` and override its hooks (``local_engine``, ``combine``, ``round_graph``), so no
method module imports another. The gossip itself (``x_i <- sum_j W_ij x_j`` over an edge list,
chunked) lives in :mod:`fedrnd.graphs`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from fedrnd.algorithms.base import Algorithm, Artifact, Metrics, Report, State, option
from fedrnd.data.federated import FederatedData
from fedrnd.engine import ClientHParams, Engine, comm, tree_bytes
from fedrnd.graphs import (
    MIXINGS,
    Graph,
    Topology,
    consensus_distance,
    degrees,
    edge_chunk_for,
    gossip,
    make_topology,
    mixing_edges,
)

_GRAPH_KEY = 0x6EA7  # folded into a key to draw graphs, apart from training keys


class _Options(dict):
    """A dict of scalar options that hashes by value, so the frozen algorithm stays hashable
    (``jax.jit(alg.round)`` hashes the bound method, hence the algorithm)."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))


@dataclasses.dataclass(frozen=True)
class Gossip(Algorithm):
    """Shared machinery: per-node models and optimizer state, a graph, local work, gossip."""

    name: ClassVar[str] = "gossip"
    family: ClassVar[str] = "decentralized"
    topology: str = option("ring", doc="A topology of :data:`fedrnd.graphs.TOPOLOGIES` "
                                       "(``ring``, ``grid``, ``random_geometric``, "
                                       "``erdos_renyi``, ``d_regular``, ``small_world``, "
                                       "``complete``, ``planted_partition``).")
    graph: dict[str, Any] = option(default_factory=dict,
                                   doc="The topology's options, e.g. ``{radius = 0.2}``, "
                                       "``{p = 0.1}``, ``{degree = 5}``.")
    mixing: str = option("metropolis", choices=MIXINGS,
                         doc="Gossip weights: ``metropolis`` (doubly stochastic) or "
                             "``uniform``.")
    redraw: bool = option(False, doc="Draw a new graph every round inside the jitted round.")
    connected: bool = option(True, doc="A static graph must be connected (``ValueError`` "
                                       "otherwise).")
    gossip_steps: int = option(1, low=1, doc="Gossip iterations per round.")
    edge_chunk: int | None = option(None, low=1, doc="Edges per gossip chunk (unset: as many "
                                                     "as fit 64 MiB of messages).")
    reset_opt: bool = option(False, doc="Fresh optimizer state every round instead of a "
                                        "persistent one.")

    def __post_init__(self):
        if isinstance(self.graph, dict) and not isinstance(self.graph, _Options):
            object.__setattr__(self, "graph", _Options(self.graph))

    # -- configuration ------------------------------------------------------------------------
    def make_topology(self, num_nodes: int) -> Topology:
        if not isinstance(self.graph, dict):
            raise ValueError(f"{self.name}: graph must be a table of topology options, got "
                             f"{self.graph!r}")
        return make_topology(self.topology, num_nodes, **self.graph)

    @property
    def local_engine(self) -> Engine:
        """The engine of the local work (subclasses fix its schedule or optimizer)."""
        return self.engine

    @property
    def local_prox_mu(self) -> float | None:
        """A proximal weight for every node (``None``: each node's own, from ``hp``)."""
        return None

    def local_train(self, state: State, data: FederatedData, key: jax.Array):
        """Every node's local work from its own model: ``(params, opt_state, metrics)``."""
        cl = state["clients"]
        return self.local_engine.train(None, data, cl["hp"], key, state["round"],
                                       client_params=cl["params"],
                                       opt_state=None if self.reset_opt else cl["opt"],
                                       prox_mu=self.local_prox_mu)

    def validate(self, data: FederatedData) -> None:
        super().validate(data)
        c = data.num_clients
        if self.cohort_size is not None and self.cohort_size < c:
            raise ValueError(f"{self.name}: every node trains and gossips every round; "
                             f"cohort_size={self.cohort_size} < {c} nodes is not supported")
        topo = self.make_topology(c)
        if self.redraw and not topo.random:
            raise ValueError(f"{self.name}: redraw = true, but {topo.describe()} is the same "
                             "graph in every draw; use a random topology (or shuffle = true "
                             "for ring and grid)")

    # -- state --------------------------------------------------------------------------------
    def static_graph(self, key: jax.Array, num_nodes: int) -> Graph:
        """The static graph of a run, drawn on the host from the init key."""
        return self.make_topology(num_nodes).static(jax.random.fold_in(key, _GRAPH_KEY),
                                                    connected=self.connected)

    def _state(self, key: jax.Array, hp: ClientHParams, num_nodes: int,
               graph: Graph | None) -> State:
        # Every node starts from the same weights (the other methods' initial model).
        params = self.engine.model.init(key)
        stacked = jax.tree.map(lambda p: jnp.broadcast_to(p, (num_nodes, *p.shape)), params)
        clients = {"hp": hp, "params": stacked}
        if not self.reset_opt:
            clients["opt"] = jax.vmap(self.local_engine.optimizer.init)(stacked)
        state = {"round": jnp.zeros((), jnp.int32), "clients": clients}
        if graph is not None:
            state["graph"] = graph
        return state

    def init(self, key: jax.Array, data: FederatedData, hp: ClientHParams) -> State:
        graph = None if self.redraw else self.static_graph(key, data.num_clients)
        return self._state(key, hp, data.num_clients, graph)

    def init_template(self, key: jax.Array, data: FederatedData, hp: ClientHParams) -> State:
        c = data.num_clients
        graph = None if self.redraw else self.static_graph(key, c)
        return jax.eval_shape(lambda k, h, g: self._state(k, h, c, g), key, hp, graph)

    def round_bytes(self, template: State, data: FederatedData, shards: int = 1) -> int:
        """The gossip's accumulator (a second stack of the per-node models, split over the
        devices like the clients) plus one edge chunk of messages (one model per edge).

        Measured against XLA's buffer assignment of a donated DFedAvg round in
        ``tests/driver/test_memory.py``: the round's temporaries are this figure.
        """
        c = data.num_clients
        stack = tree_bytes(template["clients"]["params"])
        one = stack // max(1, c)
        graph = (jax.eval_shape(self.make_topology(c).draw, jax.random.key(0)) if self.redraw
                 else template["graph"])
        edges = 2 * graph.u.shape[0] + c  # mixing_edges: both directions and the self-loops
        chunk = min(self.edge_chunk or edge_chunk_for(one), edges)
        return -(-stack // max(1, shards)) + chunk * one

    # -- one round ----------------------------------------------------------------------------
    def round_graph(self, state: State, key: jax.Array, num_nodes: int) -> Graph:
        """This round's graph: the static one, or a fresh draw from the round key."""
        if not self.redraw:
            return state["graph"]
        return self.make_topology(num_nodes).draw(jax.random.fold_in(key, _GRAPH_KEY))

    def combine(self, start: Any, trained: Any, gossip_fn) -> Any:
        """New models from the round's start models and the locally trained ones."""
        return gossip_fn(trained)

    def round(self, state: State, data: FederatedData, key: jax.Array) -> tuple[State, Metrics]:
        c = data.num_clients
        k_graph, k_train = jax.random.split(key)
        graph = self.round_graph(state, k_graph, c)
        edges = mixing_edges(graph, self.mixing)
        cl = state["clients"]
        x = cl["params"]
        z, opt, m = self.local_train(state, data, k_train)
        one = jax.tree.map(lambda a: a[0], x)
        nbytes = tree_bytes(one)
        chunk = self.edge_chunk or edge_chunk_for(nbytes)
        new = self.combine(x, z, lambda t: gossip(t, edges, c, self.gossip_steps, chunk))
        deg = degrees(graph).astype(jnp.float32)
        metrics = self.round_metrics(m, data, new, deg, nbytes, self.gossip_steps)
        return self.next_state(state, new, opt), metrics

    def next_state(self, state: State, params: Any, opt: Any) -> State:
        clients = {**state["clients"], "params": params}
        if not self.reset_opt:
            clients["opt"] = opt
        return {**state, "round": state["round"] + 1, "clients": clients}

    @staticmethod
    def round_metrics(m: dict[str, jax.Array], data: FederatedData, new: Any, deg: jax.Array,
                      nbytes: int, steps: jax.Array | int) -> Metrics:
        """Loss, consensus distance, links and the ledger of a round in which node ``i``
        exchanged its model (``nbytes``) with each of its ``deg[i]`` neighbours ``steps`` times
        (one copy sent and one received per link and gossip step)."""
        steps = jnp.asarray(steps, jnp.float32)
        sent = deg * float(nbytes) * steps
        counts = data.train_count.astype(jnp.float32)
        return {"train_loss": jnp.sum(m["loss"] * counts) / jnp.sum(counts),
                "local_steps": jnp.sum(m["steps"]).astype(jnp.float32),
                "consensus_distance": consensus_distance(new),
                "links": jnp.sum(deg) / 2,
                "bytes_per_link": 2.0 * float(nbytes) * steps,
                **comm(up_model=sent, down_model=sent)}

    def models(self, state: State):
        return state["clients"]["params"], None

    def report(self, state: State, data: FederatedData) -> Report:
        """The static graph (``graph``: edges, positions, true groups) and its size."""
        if "graph" not in state:
            return Report()
        g = state["graph"]
        u, v, ok = (np.asarray(a) for a in (g.u, g.v, g.valid))
        return Report({"graph_edges": float(ok.sum()),
                       "graph_mean_degree": float(2 * ok.sum() / max(1, data.num_clients))},
                      {"graph": Artifact("graph", {"u": u[ok], "v": v[ok],
                                                   "positions": np.asarray(g.positions),
                                                   "group": np.asarray(data.group)})})
