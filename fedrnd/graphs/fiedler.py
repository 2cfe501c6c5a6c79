"""The Fiedler vector by message passing: gossip power iteration on the graph's links.

SSD-FL's set-up phase orders a cluster's nodes along the Fiedler vector of its (weighted)
Laplacian. :func:`fedrnd.graphs.spectral.fiedler_vector` solves for it on one machine; this
module computes the same vector the way devices could, each holding its own entry and talking
only to its neighbours. **The protocol is our reconstruction** (the SSD-FL paper does not
describe how its devices compute the vector; ``REFERENCES.md`` section 2); it is the
decentralized power method of the literature (e.g. Kempe and McSherry 2004; Bertrand and
Moonen 2013) specialised to the generalised problem ``L v = lambda D v`` that the host split
solves.

Protocol, on a connected graph with link weights ``a_ij`` and weighted degrees ``d_i``, and a
breadth-first tree of the graph rooted at its lowest-numbered node (depth ``h``):

1. *Start.* Every node draws a random ``x_i`` (no message).
2. *Power round*, one message round each: every node sends ``x_i`` to its neighbours and sets
   ``x_i <- x_i - (1 / (2 d_i)) sum_j a_ij (x_i - x_j)``: the lazy random walk
   ``M = I - D^-1 L / 2`` (the shifted Laplacian ``I - L / c`` with the local scale
   ``c = 2 d_i``), whose eigenvalues ``1 - lambda_k / 2`` lie in ``[0, 1]``. Its top eigenvector
   is the constant vector; the next is the Fiedler vector of ``L v = lambda D v``.
3. *Deflation and normalisation, once per window* of ``w = 2 h`` rounds (by default): at the
   start of a window the tree sums ``sum_i d_i``, ``sum_i d_i x_i`` and ``sum_i d_i x_i^2`` of the
   current iterate to the root (a convergecast: each node sends its subtree's three partial sums
   to its parent once) and sends back the ``D``-weighted mean ``c`` and spread ``s`` (each node
   forwards the two scalars to its children once); these messages ride on the power rounds,
   ``h`` up and ``h`` down. At the end of the window every node sets ``x_i <- (x_i - c) / s``.
   The walk keeps ``sum_i d_i x_i`` (``D M = D - L / 2`` is symmetric), so ``c`` is still the
   iterate's constant component ``w`` rounds later, and the subtraction removes it exactly; the
   common scale ``s`` keeps the iterate from under- or overflowing.

Why an exact tree sum rather than a gossip average of the iterate: on a graph with a
bottleneck, a few rounds of averaging leave exactly the slowest mode of consensus, which is the
Fiedler vector itself, so subtracting a gossip estimate of the mean would erase what is being
computed. And why deflate repeatedly: the constant component, once brought back by rounding,
grows by ``1 / (1 - lambda_2 / 2)`` a round relative to the Fiedler component, and on a
well-connected cluster a few hundred rounds would hand the iterate to it (float64 throughout;
messages are charged as 8-byte scalars). In the simulation the tree's sums are computed by
``jnp.sum`` (the same numbers, summed in another order); the power rounds run over the edge
list in one ``lax.fori_loop``. Power rounds are rounded up to whole windows.

Cost: per power round a node of (unweighted) degree ``deg_i`` sends and receives ``8 deg_i``
bytes; per window a node sends 24 bytes up to its parent (the root: none) and 16 to each child,
and receives 24 from each child and 16 from its parent. The rounds: the power rounds.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import breadth_first_order, shortest_path

SCALAR_BYTES = 8
"""Bytes of one message scalar (float64)."""
UP_SCALARS, DOWN_SCALARS = 3, 2
"""Scalars a node sends up the tree (three partial sums) and down it (mean, spread) a window."""


class GossipFiedler(NamedTuple):
    """Result of :func:`gossip_fiedler`.

    ``vector [N]``: the estimate, scaled so that ``sum_i d_i v_i^2 = 1`` (its sign is
    arbitrary, as the host eigensolver's); ``value``: its Rayleigh quotient ``v'Lv / v'Dv``
    (an estimate of the normalised ``lambda_2``; computed here for reporting, not by the
    devices); ``rounds``: message rounds (the power rounds, whole windows); ``sent``,
    ``received`` ``[N]``: bytes each node sent and received.
    """

    vector: np.ndarray
    value: float
    rounds: int
    sent: np.ndarray
    received: np.ndarray


def _pad(n: int) -> int:
    return 1 << max(3, int(np.ceil(np.log2(max(n, 1)))))


@jax.jit
def _power(u, v, w, deg, x0, real, rounds, window):
    """``rounds`` lazy-walk rounds from ``x0`` with deflation and normalisation by the
    window-start sums at the end of every window. ``u, v, w [E]`` (padding: ``w = 0``),
    ``deg, x0, real [N]`` (padding: ``deg = 1``, ``x0 = real = 0``)."""
    n = deg.shape[0]
    dw = deg * real

    def ssum(x, seg):
        return jax.ops.segment_sum(x, seg, num_segments=n)

    def body(t, carry):
        x, c, s = carry
        # Window start: what the tree sums and sends back (arrives by the window's end).
        mean = jnp.sum(dw * x) / jnp.sum(dw)
        spread = jnp.sqrt(jnp.sum(dw * (x - mean) ** 2) / jnp.sum(dw))
        start = t % window == 0
        c, s = jnp.where(start, mean, c), jnp.where(start, spread, s)
        flux = w * (x[u] - x[v])                       # what link (u, v) carries
        x = x - 0.5 * (ssum(flux, u) - ssum(flux, v)) / deg
        end = (t + 1) % window == 0
        x = jnp.where(end, real * (x - c) / jnp.where(s > 0, s, 1.0), x)
        return x, c, s

    zero = jnp.zeros((), x0.dtype)
    x, _, _ = jax.lax.fori_loop(0, rounds, body, (x0, zero, zero))
    return x


def gossip_fiedler(adj: sp.spmatrix | np.ndarray, iters: int, *, seed: int | tuple = 0,
                   window: int | None = None) -> GossipFiedler:
    """The Fiedler vector of ``L v = lambda D v`` by the gossip protocol of the module
    docstring, simulated in JAX over the edge list.

    Args:
      adj: symmetric ``[N, N]`` weighted adjacency of a connected graph (``N >= 2``).
      iters: power rounds (``>= 1``), rounded up to whole windows.
      seed: seed of the nodes' random start.
      window: rounds between deflations; at least (and by default) twice the depth of the
        breadth-first tree from node 0, the rounds its sums take to reach the root and return.
    """
    if not (isinstance(iters, int | np.integer) and iters >= 1):
        raise ValueError(f"gossip_fiedler: iters must be an integer >= 1, got {iters!r}")
    a = sp.csr_matrix(adj, dtype=np.float64)
    a.setdiag(0)
    a.eliminate_zeros()
    n = a.shape[0]
    if n < 2:
        raise ValueError(f"gossip_fiedler: a Fiedler vector needs at least 2 nodes, got {n}")
    order, pred = breadth_first_order(a, 0, directed=False, return_predecessors=True)
    if len(order) < n:
        raise ValueError("gossip_fiedler: the graph is disconnected; the Fiedler vector of a "
                         "disconnected graph is not unique and no message reaches across")
    parent = np.where(pred < 0, -1, pred)
    parent[0] = -1
    depth = shortest_path(a, indices=0, unweighted=True, directed=False)  # = the tree's
    shortest = 2 * int(depth.max())
    if window is None:
        window = shortest
    elif not (isinstance(window, int | np.integer) and window >= shortest):
        raise ValueError(f"gossip_fiedler: window must be an integer >= {shortest} (twice the "
                         f"depth of the breadth-first tree: the sums must reach the root and "
                         f"come back), got {window!r}")
    rounds = int(window * -(-iters // window))
    up = sp.triu(a, k=1).tocoo()
    deg = np.asarray(a.sum(axis=1)).ravel()
    x0 = np.random.default_rng(seed).normal(size=n)
    n_pad, e_pad = _pad(n), _pad(up.nnz)

    def padded(x, size, fill, dtype):
        out = np.full(size, fill, dtype)
        out[:len(x)] = x
        return out

    with jax.enable_x64(True):
        x = _power(jnp.asarray(padded(up.row, e_pad, 0, np.int32)),
                   jnp.asarray(padded(up.col, e_pad, 0, np.int32)),
                   jnp.asarray(padded(up.data, e_pad, 0.0, np.float64)),
                   jnp.asarray(padded(deg, n_pad, 1.0, np.float64)),
                   jnp.asarray(padded(x0, n_pad, 0.0, np.float64)),
                   jnp.asarray(padded(np.ones(n), n_pad, 0.0, np.float64)),
                   jnp.asarray(rounds, jnp.int32), jnp.asarray(window, jnp.int32))
        x = np.asarray(x, np.float64)[:n]
    norm = float(np.sqrt(x @ (deg * x)))
    vec = x / norm if norm > 0 else x
    value = float(vec @ ((sp.diags(deg) - a) @ vec))
    links = np.diff(a.indptr).astype(np.float64)       # unweighted degree
    children = np.bincount(parent[parent >= 0], minlength=n).astype(np.float64)
    has_parent = (parent >= 0).astype(np.float64)
    windows = rounds // window
    power = rounds * SCALAR_BYTES * links
    sent = power + windows * SCALAR_BYTES * (UP_SCALARS * has_parent + DOWN_SCALARS * children)
    received = power + windows * SCALAR_BYTES * (UP_SCALARS * children
                                                 + DOWN_SCALARS * has_parent)
    return GossipFiedler(vec, value, rounds, sent, received)


def agreement(adj: sp.spmatrix | np.ndarray, budgets: tuple[int, ...] = (1, 20, 50, 100, 200),
              seed: int = 0, min_size: int = 4) -> list[dict[str, float]]:
    """Agreement of :func:`gossip_fiedler` with the dense eigensolver against the set-up
    rounds: for each power-round budget, the rounds run, the mean bytes a node sends, the
    ``D``-weighted ``|cos|`` with the eigensolver's Fiedler vector, the relative error of
    ``lambda_2`` and whether the best sweep cut (sides of at least ``min_size`` nodes, each
    connected, as the split rule asks) is the same."""
    from fedrnd.graphs.spectral import fiedler_vector, sweep_cut

    a = sp.csr_matrix(adj, dtype=np.float64)
    deg = np.asarray(a.sum(axis=1)).ravel()
    lam, ref = fiedler_vector(a)

    def cut(v):
        order = np.argsort(v, kind="stable")
        k, _ = sweep_cut(a, order, min_size=min_size, connectivity=a)
        return {frozenset(order[:k].tolist()), frozenset(order[k:].tolist())}

    rows = []
    for b in budgets:
        g = gossip_fiedler(a, b, seed=seed)
        cos = abs(g.vector @ (deg * ref)) / np.sqrt(ref @ (deg * ref))
        rows.append({"budget": b, "rounds": g.rounds, "bytes_per_node": float(g.sent.mean()),
                     "cos": float(cos), "lambda2_rel_err": abs(g.value - lam) / lam,
                     "same_cut": cut(g.vector) == cut(ref)})
    return rows


if __name__ == "__main__":  # python -m fedrnd.graphs.fiedler: the tables of docs/methods/ssdfl.md
    from fedrnd.graphs import adjacency, make_topology

    for name, opts in (("planted_partition", {"communities": 2, "p_in": 0.6, "p_out": 0.05}),
                       ("random_geometric", {"radius": 0.3})):
        graph = make_topology(name, 24, **opts).static(jax.random.key(0))
        print(f"\n{name}, 24 nodes, {opts}, key 0\n")
        print("| power rounds | bytes sent per node | abs(cos) | lambda_2 rel. error | same cut |")
        print("|---|---|---|---|---|")
        for r in agreement(np.asarray(adjacency(graph), np.float64), (1, 20, 50, 100, 200, 400)):
            print(f"| {r['rounds']} | {r['bytes_per_node']:.0f} | {r['cos']:.6f} | "
                  f"{r['lambda2_rel_err']:.1e} | {'yes' if r['same_cut'] else 'no'} |")

    # SSD-FL's recursion (graph-only weights) on the community experiment's graph.
    from fedrnd.graphs.spectral import spectral_clusters

    graph = make_topology("planted_partition", 100, communities=4, p_in=0.3,
                          p_out=0.01).static(jax.random.key(0))
    host = spectral_clusters(graph).cluster_id
    print("\nplanted_partition, 100 nodes, 4 x 25, p_in 0.3, p_out 0.01, key 0: the recursion\n")
    print("| fiedler_iters | same clusters as host | max rounds on a device | "
          "KB sent + received per device |")
    print("|---|---|---|---|")
    for iters in (20, 50, 100, 200):
        sent, rounds = np.zeros(100), np.zeros(100)

        def fn(adj, nodes, iters=iters, sent=sent, rounds=rounds):
            g = gossip_fiedler(adj, iters, seed=(int(nodes[0]), len(nodes)))
            sent[nodes] += g.sent + g.received
            rounds[nodes] += g.rounds
            return g.vector

        same = np.array_equal(spectral_clusters(graph, fiedler=fn).cluster_id, host)
        print(f"| {iters} | {'yes' if same else 'no'} ({len(np.unique(host))} clusters) | "
              f"{rounds.max():.0f} | {sent.mean() / 1e3:.1f} |")
