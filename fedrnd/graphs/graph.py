"""Undirected communication graphs as padded edge lists, mixing weights, gossip.

A :class:`Graph` on ``N`` nodes is ``E`` edge *slots* ``(u, v, valid)``: every real edge once,
padding and dropped edges with ``valid = False``. The slot count ``E`` is a static shape, so a
graph redrawn every round inside a jitted program keeps one compiled shape; a static graph is
the same object with every slot valid.

Gossip runs on the engine's :class:`~fedrnd.engine.EdgeList` (directed, ``src -> dst``, with
self-loops carrying a node's own weight) through :func:`~fedrnd.engine.edge_aggregate`, which
is chunked over edges, so memory is bounded by the chunk and not by ``E``:

``x_i <- sum_j W_ij x_j`` with ``W`` from :func:`mixing_edges`:

- ``"metropolis"`` (Metropolis-Hastings): ``W_ij = 1 / (1 + max(d_i, d_j))`` on an edge,
  ``W_ii = 1 - sum_j W_ij``. Symmetric and doubly stochastic, so repeated gossip converges to
  the plain average on a connected graph.
- ``"uniform"``: ``W_ij = 1 / (1 + d_i)`` for ``j`` in ``i``'s closed neighbourhood. Row
  stochastic only: on an irregular graph repeated gossip reaches consensus on the average
  weighted by ``1 + d_i``, not the plain average.

:func:`mixing_matrix` gives the dense ``[N, N]`` matrix of an edge list (a reference for tests
and for spectral analysis of small graphs); :func:`components` and :func:`is_connected` are
host-side checks.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedrnd.engine.aggregate import EdgeList, edge_aggregate

PyTree = Any

MIXINGS = ("metropolis", "uniform")


class Graph(NamedTuple):
    """An undirected graph on ``N`` nodes in ``E`` edge slots (a pytree of arrays).

    Attributes:
      u, v: ``[E]`` int32 endpoints of each slot (``u != v`` on valid slots).
      valid: ``[E]`` bool; ``False`` marks padding and edges dropped as duplicates.
      positions: ``[N, 2]`` float32 node coordinates: a geometric graph's own positions in the
        unit square, a layout (circle, lattice) for the others.
    """

    u: jax.Array
    v: jax.Array
    valid: jax.Array
    positions: jax.Array

    @property
    def num_nodes(self) -> int:
        return int(self.positions.shape[0])

    @property
    def num_slots(self) -> int:
        return int(self.u.shape[0])


def degrees(graph: Graph) -> jax.Array:
    """``[N]`` int32 number of valid edges at each node."""
    n = graph.num_nodes
    w = graph.valid.astype(jnp.int32)
    return (jax.ops.segment_sum(w, graph.u, num_segments=n)
            + jax.ops.segment_sum(w, graph.v, num_segments=n))


def num_edges(graph: Graph) -> jax.Array:
    """Number of valid (undirected) edges, a scalar."""
    return jnp.sum(graph.valid.astype(jnp.int32))


def check_mixing(mixing: str) -> None:
    if mixing not in MIXINGS:
        raise ValueError(f"mixing {mixing!r} is unknown; allowed: {list(MIXINGS)}")


def mixing_edges(graph: Graph, mixing: str = "metropolis") -> EdgeList:
    """The gossip matrix ``W`` of ``graph`` as an engine :class:`EdgeList` of ``2E + N`` edges.

    Layout: ``u -> v`` for every slot, then ``v -> u``, then the ``N`` self-loops; padding slots
    carry weight 0. ``edge_aggregate(x, mixing_edges(g), N)[i] = sum_j W_ij x_j``.
    """
    check_mixing(mixing)
    n = graph.num_nodes
    deg = degrees(graph).astype(jnp.float32)
    valid = graph.valid.astype(jnp.float32)
    du, dv = deg[graph.u], deg[graph.v]
    if mixing == "metropolis":
        w = valid / (1.0 + jnp.maximum(du, dv))
        w_to_v, w_to_u = w, w
        out = jax.ops.segment_sum(w, graph.u, num_segments=n) + jax.ops.segment_sum(
            w, graph.v, num_segments=n)
        w_self = 1.0 - out
    else:
        w_to_v = valid / (1.0 + dv)  # W_vu: v averages its closed neighbourhood
        w_to_u = valid / (1.0 + du)
        w_self = 1.0 / (1.0 + deg)
    nodes = jnp.arange(n, dtype=jnp.int32)
    u, v = graph.u.astype(jnp.int32), graph.v.astype(jnp.int32)
    return EdgeList(src=jnp.concatenate([u, v, nodes]), dst=jnp.concatenate([v, u, nodes]),
                    weight=jnp.concatenate([w_to_v, w_to_u, w_self]))


def mixing_matrix(edges: EdgeList, num_nodes: int) -> jax.Array:
    """Dense ``W [N, N]`` with ``W[dst, src] += weight`` (small graphs: tests, spectra)."""
    return jnp.zeros((num_nodes, num_nodes), edges.weight.dtype).at[edges.dst, edges.src].add(
        edges.weight)


def gossip(tree: PyTree, edges: EdgeList, num_nodes: int, steps: int = 1,
           edge_chunk: int = 4096) -> PyTree:
    """``steps`` rounds of ``x <- W x`` on every leaf ``[N, ...]`` (chunked over edges)."""
    if steps < 1:
        raise ValueError(f"gossip steps must be >= 1, got {steps}")

    def once(t):
        return edge_aggregate(t, edges, num_nodes, edge_chunk)

    if steps == 1:
        return once(tree)
    return jax.lax.fori_loop(0, steps, lambda _, t: once(t), tree)


def consensus_distance(tree: PyTree) -> jax.Array:
    """Mean over nodes of ``||x_i - mean_j x_j||^2`` summed over all leaves ``[N, ...]``."""
    total = jnp.zeros((), jnp.float32)
    for x in jax.tree.leaves(tree):
        x = x.astype(jnp.float32)
        d = x - jnp.mean(x, axis=0, keepdims=True)
        total = total + jnp.sum(d * d) / x.shape[0]
    return total


def edge_chunk_for(tree_nbytes: int, budget: int = 64 * 2**20, cap: int = 4096) -> int:
    """Edges per gossip chunk so that one chunk of messages stays within ``budget`` bytes."""
    return int(max(1, min(cap, budget // max(1, tree_nbytes))))


# --- host-side analysis -----------------------------------------------------------------------

def to_numpy_edges(graph: Graph) -> np.ndarray:
    """``[E_valid, 2]`` int array of the valid edges, each as ``(min, max)``, sorted."""
    u, v, ok = (np.asarray(a) for a in (graph.u, graph.v, graph.valid))
    e = np.stack([np.minimum(u, v), np.maximum(u, v)], 1)[ok.astype(bool)]
    return e[np.lexsort((e[:, 1], e[:, 0]))]


def adjacency(graph: Graph) -> np.ndarray:
    """Dense symmetric 0/1 adjacency ``[N, N]`` (host, small graphs)."""
    n = graph.num_nodes
    a = np.zeros((n, n), np.int8)
    e = to_numpy_edges(graph)
    a[e[:, 0], e[:, 1]] = 1
    a[e[:, 1], e[:, 0]] = 1
    return a


def components(graph: Graph) -> tuple[int, np.ndarray]:
    """``(count, label [N])``: the connected components of the valid edges (host)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = graph.num_nodes
    e = to_numpy_edges(graph)
    mat = coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n))
    count, label = connected_components(mat, directed=False)
    return int(count), label


def is_connected(graph: Graph) -> bool:
    return graph.num_nodes <= 1 or components(graph)[0] == 1
