"""Community graphs and placing data groups on them: heterogeneity that follows the graph.

``planted_partition`` (a stochastic block model with equal blocks) is registered in
:data:`fedrnd.graphs.TOPOLOGIES`: ``N`` nodes in ``communities`` blocks of near equal size,
node ``i`` in block ``community_of(N, k)[i]`` (contiguous: the first ``N // k (+1)`` nodes are
block 0, and so on), every pair inside a block linked with probability ``p_in`` and every
other pair with ``p_out``, each by its own coin (``N (N - 1) / 2`` slots, so up to a few
thousand nodes). Positions put every block on its own small circle, the blocks on a large one,
so plots show the communities. ``Topology.static`` redraws until the graph is connected.

:func:`place_groups` relabels a graph's nodes so that the clients of data group ``g`` sit on a
contiguous run of nodes in node order: on ``planted_partition`` with as many communities as
groups (and the same near-equal sizes) group ``g`` fills community ``g`` exactly; on ``ring``,
``small_world`` or an unshuffled ``grid`` each group takes an arc or a band.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fedrnd.graphs.graph import Graph
from fedrnd.graphs.topology import TOPOLOGIES, _is_int, _is_num, _need, _Spec

_I32 = jnp.int32


def community_sizes(num_nodes: int, communities: int) -> np.ndarray:
    """``[k]`` block sizes: ``N // k``, the first ``N % k`` blocks one more (as the grouped
    partitions size their groups)."""
    return np.full(communities, num_nodes // communities) + (
        np.arange(communities) < num_nodes % communities)


def community_of(num_nodes: int, communities: int) -> np.ndarray:
    """``[N]`` block of each node of a ``planted_partition`` graph (contiguous blocks)."""
    return np.repeat(np.arange(communities), community_sizes(num_nodes, communities)
                     ).astype(np.int32)


def _community_positions(num_nodes: int, communities: int) -> np.ndarray:
    block = community_of(num_nodes, communities)
    sizes = community_sizes(num_nodes, communities)
    rank = np.arange(num_nodes) - np.concatenate([[0], np.cumsum(sizes)[:-1]])[block]
    centre = 2 * np.pi * block / communities
    inner = 2 * np.pi * rank / np.maximum(sizes[block], 1)
    small = 0.5 * math.sin(math.pi / communities) * 0.8 if communities > 1 else 0.45
    big = 0.5 - small if communities > 1 else 0.0
    return np.stack([0.5 + big * np.cos(centre) + small * np.cos(inner),
                     0.5 + big * np.sin(centre) + small * np.sin(inner)], 1)


def _planted_partition(n: int, key: jax.Array, communities: int, p_in: float,
                       p_out: float) -> Graph:
    pos = jnp.asarray(_community_positions(n, communities), jnp.float32)
    u, v = np.triu_indices(n, 1)
    block = community_of(n, communities)
    p = np.where(block[u] == block[v], p_in, p_out).astype(np.float32)
    ok = jax.random.uniform(key, (len(u),), jnp.float32) < jnp.asarray(p)
    return Graph(jnp.asarray(u, _I32), jnp.asarray(v, _I32), ok, pos)


def _check_planted_partition(n: int, o: dict) -> None:
    k = o.get("communities")
    _need(_is_int(k) and 1 <= k <= n, f"planted_partition: communities must be an integer in "
                                      f"[1, N = {n}], got {k!r}")
    for name in ("p_in", "p_out"):
        p = o.get(name)
        _need(_is_num(p) and 0 <= p <= 1, f"planted_partition: {name} must be in [0, 1], "
                                          f"got {p!r}")
    _need(n * (n - 1) // 2 < 2 ** 26, f"planted_partition: N = {n} needs N(N-1)/2 = "
                                      f"{n * (n - 1) // 2} edge slots, more than fit")


def _hint_planted_partition(n: int, o: dict) -> str:
    k = o.get("communities", 1)
    m = n // max(k, 1)
    return (f"raise p_in (each block needs p_in above about ln(N/k) / (N/k) = "
            f"{math.log(max(m, 2)) / max(m, 1):.3g}) or p_out")


TOPOLOGIES["planted_partition"] = _Spec(
    _planted_partition, ("communities", "p_in", "p_out"), _check_planted_partition,
    _hint_planted_partition)


def place_groups(graph: Graph, group: np.ndarray) -> Graph:
    """``graph`` with its nodes relabelled so that data groups follow node order (host).

    Node ``r`` of the drawn graph becomes client ``order[r]``, ``order`` the clients sorted by
    ``group [C]`` (stably, so within a group by client id): group 0's clients take the first
    nodes, group 1's the next, and so on. The graph's structure is unchanged (an isomorphic
    copy); only which client sits where.
    """
    group = np.asarray(group)
    n = graph.num_nodes
    if group.shape != (n,):
        raise ValueError(f"place_groups: group must have one entry per node ({n}), got shape "
                         f"{group.shape}")
    order = jnp.asarray(np.argsort(group, kind="stable"), _I32)
    u, v = order[graph.u], order[graph.v]
    pos = jnp.zeros_like(graph.positions).at[order].set(graph.positions)
    a, b = jnp.minimum(u, v), jnp.maximum(u, v)
    return Graph(a, b, graph.valid, pos)
