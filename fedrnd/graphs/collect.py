"""Bytes of collecting records at one node and sending a result back, over a graph's links.

A set-up phase that needs a global view (SSD-FL's spectral split needs every device's
descriptor and neighbour list in one place) can run without a server: a breadth-first tree
rooted at a coordinating device carries every record up to it (each device forwards its own
record and those of its subtree to its parent: a *convergecast*) and carries the result back
down (each device forwards it to its children). Every message crosses one link of the graph.
These functions count the bytes each device sends and receives in both phases (host, numpy);
the coordinator is charged like any other device.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import breadth_first_order

from fedrnd.graphs.graph import Graph, to_numpy_edges


def _bfs(graph: Graph, root: int) -> tuple[np.ndarray, np.ndarray]:
    n = graph.num_nodes
    e = to_numpy_edges(graph)
    a = sp.coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n))
    order, pred = breadth_first_order(sp.csr_matrix(a + a.T), root, directed=False,
                                      return_predecessors=True)
    if len(order) < n:
        raise ValueError(f"bfs_tree: {n - len(order)} of {n} nodes cannot be reached from node "
                         f"{root}; collecting at one node needs a connected graph")
    parent = np.where(pred < 0, -1, pred).astype(np.int64)
    parent[root] = -1
    return order, parent


def bfs_tree(graph: Graph, root: int = 0) -> np.ndarray:
    """``parent [N]`` of the breadth-first tree from ``root`` (``-1`` at the root).
    ``ValueError`` when some node cannot be reached."""
    return _bfs(graph, root)[1]


def gather_bytes(graph: Graph, record_bytes: np.ndarray, root: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``(up [N], down [N])`` bytes of a convergecast of one record per node to ``root``.

    Node ``i`` sends its parent the records of its whole subtree (its own included), so
    ``up_i = sum_{j in subtree(i)} record_bytes[j]`` (0 at the root), and receives what its
    children send, ``down_i = sum_{c child of i} up_c``.
    """
    rec = np.asarray(record_bytes, np.float64)
    order, parent = _bfs(graph, root)
    subtree = rec.copy()
    for i in order[::-1]:  # children before parents: a subtree is complete when added up
        if parent[i] >= 0:
            subtree[parent[i]] += subtree[i]
    up = np.where(parent >= 0, subtree, 0.0)
    down = np.zeros_like(up)
    np.add.at(down, parent[parent >= 0], up[parent >= 0])
    return up, down


def broadcast_bytes(graph: Graph, nbytes: float, root: int = 0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """``(up [N], down [N])`` bytes of sending one ``nbytes`` message from ``root`` to every
    node down the breadth-first tree: each node but the root receives it once and forwards it
    to each of its children."""
    parent = bfs_tree(graph, root)
    children = np.bincount(parent[parent >= 0], minlength=len(parent)).astype(np.float64)
    return children * float(nbytes), np.where(parent >= 0, float(nbytes), 0.0)
