"""RND discovery without a server: neighbour scores, a novelty band, leader-elected regions.

The decentralized variant of RND discovery (Domini et al. 2026, the authors' demo code):
clients sit on a communication graph and exchange predictors with their graph neighbours only.

1. Every client trains its predictor (as in :func:`fedrnd.rnd.discover`); client ``i`` scores
   the predictor of each graph neighbour ``j`` on its own probes, ``S[i, j]`` (the *sparse*
   mode, :func:`fedrnd.rnd.edge_novelty`), and its own, the self-novelty ``S[i, i]``.
2. **Band rule.** ``i`` accepts ``j`` when ``(1 - a) S[i, i] < S[i, j] < (1 + a) S[i, i]``
   (the authors' rule, ``a = band = 0.3``): ``j``'s predictor reconstructs ``i``'s data about
   as well as ``i``'s own. ``criterion = "eps"`` uses the centralized rule on the observed row
   instead (``(S[i, j] - S[i, i]) / sigma_i <= eps``, :class:`~fedrnd.rnd.RNDConfig`'s
   ``sigma`` and ``eps``).
3. **Symmetry** (the authors leave it open; a region must not depend on who asked): a link
   ``{i, j}`` is *compatible* when both ends accept each other (``symmetry = "mutual"``, the
   default) or when either does (``"either"``). Each end learns the other's verdict with one
   bit sent back along the link.
4. **Regions** by self-stabilising leader election along chains of compatible links
   (:func:`elect_leaders`): every node repeatedly adopts the best (lowest-ranked) leader it
   hears of over compatible links, together with its hop distance, or itself. Without a size
   limit the regions are exactly the connected components of the compatible graph, each led
   by its best-ranked member. With the region-size limit ``max_hops`` (our reading of the
   authors' limit: the *grain* of aggregate programming's sparse-choice block, on which their
   election builds), a leader's offer travels at most ``max_hops`` compatible hops, so every
   member is within ``max_hops`` hops of its leader inside its region (region diameter at most
   ``2 max_hops``) and long chains break into several regions.

Rank: a total order of the nodes by ``priority`` (lower leads; ties by node id). Default: the
self-novelty, so the client whose predictor fits its own data best leads (the centralized
``rule = "leader"`` uses the same order); ``"id"`` and ``"random"`` are options.

The election runs as one jitted ``lax.while_loop`` over the edge list (segment minima over
the ``2L`` directed links, static shapes) until no node changes. Starting from any state it
converges (self-stabilisation): stale offers grow one hop per iteration and die past the limit
(``N - 1`` hops when none is set, the longest simple path). From the clean start (every node
its own leader) it needs at most ``(number of leaders) x (max_hops + 1) + 1`` iterations, and
``diameter + 2`` without a limit.

Fixed point (what the tests compare with a plain reference): nodes in rank order, each still
unassigned node becomes a leader and takes every unassigned node within ``max_hops`` compatible
hops of it, paths through unassigned nodes only (breadth-first).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedrnd.data.federated import FederatedData
from fedrnd.engine import ClientMapper, EdgeList
from fedrnd.rnd.config import RNDConfig
from fedrnd.rnd.extract import _relabel
from fedrnd.rnd.pipeline import Discovery, discover

__all__ = [
    "CRITERIA",
    "PRIORITIES",
    "SYMMETRIES",
    "Regions",
    "band_accepts",
    "check_band",
    "compatible_links",
    "discover_regions",
    "elect_leaders",
    "election_reference",
    "node_ranks",
    "regions_from_scores",
]

CRITERIA = ("band", "eps")
SYMMETRIES = ("mutual", "either")
PRIORITIES = ("self_novelty", "id", "random")
STATE_BYTES = 8
"""Bytes of one election message: the leader's rank and the hop distance (two int32)."""


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------


def check_band(band: Any) -> float:
    """``band`` as a float; ``ValueError`` unless it is a finite number ``> 0``."""
    if isinstance(band, bool):
        raise ValueError(f"band must be a number > 0 (e.g. 0.3 for +-30%), got {band!r}")
    try:
        a = float(band)
    except (TypeError, ValueError):
        raise ValueError(f"band must be a number > 0 (e.g. 0.3 for +-30%), got {band!r}") from None
    if not np.isfinite(a) or a <= 0:
        raise ValueError(f"band must be a finite number > 0 (e.g. 0.3 for +-30%), got {band!r}")
    return a


def _check_choice(field: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{field} must be one of {list(allowed)}, got {value!r}")


def _check_max_hops(max_hops: Any) -> None:
    if max_hops is None:
        return
    if isinstance(max_hops, bool) or not isinstance(max_hops, int | np.integer) or max_hops < 0:
        raise ValueError(f"max_hops (region-size limit, hops from the leader) must be an "
                         f"integer >= 0 or None (no limit), got {max_hops!r}")


def _check_links(u, v, num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    u = np.asarray(u)
    v = np.asarray(v)
    if u.ndim != 1 or u.shape != v.shape:
        raise ValueError(f"link endpoints u, v must be equal-length vectors, got shapes "
                         f"{u.shape} and {v.shape}")
    if u.size and (min(u.min(), v.min()) < 0 or max(u.max(), v.max()) >= num_nodes):
        raise ValueError(f"link endpoints must be node ids in [0, {num_nodes})")
    if u.size and np.any(u == v):
        raise ValueError(f"links must join two different nodes; self-loops at "
                         f"{np.unique(u[u == v])[:10].tolist()}")
    return u.astype(np.int32), v.astype(np.int32)


# --------------------------------------------------------------------------------------------
# compatibility
# --------------------------------------------------------------------------------------------


def band_accepts(scores, s_self, band: float = 0.3):
    """``(1 - band) s_self < scores < (1 + band) s_self`` elementwise (numpy or jax arrays).

    ``scores[e]`` is the scoring client's novelty of a neighbour's predictor and ``s_self[e]``
    the scoring client's own self-novelty (the authors' rule; both bounds strict).
    """
    a = check_band(band)
    xp = jnp if isinstance(scores, jax.Array) else np
    scores = xp.asarray(scores)
    s_self = xp.asarray(s_self)
    return ((1.0 - a) * s_self < scores) & (scores < (1.0 + a) * s_self)


def compatible_links(accepts_at_u, accepts_at_v, symmetry: str = "mutual"):
    """A link ``{u, v}`` is compatible when both ends accept (``"mutual"``) or either does
    (``"either"``). ``accepts_at_u[l]``: ``u`` accepts ``v``'s predictor."""
    _check_choice("symmetry", symmetry, SYMMETRIES)
    a, b = np.asarray(accepts_at_u, bool), np.asarray(accepts_at_v, bool)
    if a.shape != b.shape:
        raise ValueError(f"verdicts at both ends must have the same shape, got {a.shape} and "
                         f"{b.shape}")
    return a & b if symmetry == "mutual" else a | b


def node_ranks(priority, key: jax.Array | None = None, num_nodes: int | None = None
               ) -> np.ndarray:
    """``[N]`` distinct ranks ``0..N-1``: by ``priority`` (lower leads), ties by node id.

    ``priority`` is an ``[N]`` array, ``"id"`` (node id order) or ``"random"`` (a random order
    from ``key``; needs ``num_nodes``)."""
    if isinstance(priority, str):
        _check_choice("priority", priority, ("id", "random"))
        if num_nodes is None:
            raise ValueError("node_ranks needs num_nodes for priority 'id' or 'random'")
        if priority == "id":
            return np.arange(num_nodes, dtype=np.int32)
        if key is None:
            raise ValueError("priority 'random' needs a key")
        priority = np.asarray(jax.random.uniform(key, (num_nodes,)))
    p = np.asarray(priority, np.float64)
    if p.ndim != 1:
        raise ValueError(f"priority must be a vector [N], got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("priority must be finite")
    order = np.lexsort((np.arange(len(p)), p))
    ranks = np.empty(len(p), np.int32)
    ranks[order] = np.arange(len(p), dtype=np.int32)
    return ranks


# --------------------------------------------------------------------------------------------
# leader election (jitted)
# --------------------------------------------------------------------------------------------

_BIG = np.iinfo(np.int32).max


def _election_step(lead, dist, rank, src, dst, ok, limit, n):
    """One synchronous round: each node takes the best offer among its own (rank, 0) and its
    compatible neighbours' (leader rank, hops + 1) within ``limit`` hops."""
    heard = ok & (dist[src] < limit)
    offer = jnp.where(heard, lead[src], _BIG)
    best = jnp.minimum(rank, jax.ops.segment_min(offer, dst, num_segments=n))
    hops = jnp.where(heard & (lead[src] == best[dst]), dist[src] + 1, _BIG)
    d = jnp.minimum(jnp.where(rank == best, 0, _BIG),
                    jax.ops.segment_min(hops, dst, num_segments=n))
    return best, d


@functools.partial(jax.jit, static_argnums=(0,))
def _elect(n: int, rank, src, dst, ok, limit, max_iters, lead0, dist0):
    def cond(c):
        _, _, it, changed = c
        return changed & (it < max_iters)

    def body(c):
        lead, dist, it, _ = c
        new_lead, new_dist = _election_step(lead, dist, rank, src, dst, ok, limit, n)
        changed = jnp.any((new_lead != lead) | (new_dist != dist))
        return new_lead, new_dist, it + 1, changed

    lead, dist, it, changed = jax.lax.while_loop(
        cond, body, (lead0, dist0, jnp.zeros((), jnp.int32), jnp.ones((), bool)))
    return lead, dist, it, ~changed


def elect_leaders(u, v, compatible, ranks, *, max_hops: int | None = None,
                  max_iters: int | None = None, init: tuple[Any, Any] | None = None
                  ) -> tuple[np.ndarray, np.ndarray, int]:
    """Self-stabilising multi-leader election over the compatible links of a graph.

    Args:
      u, v: ``[L]`` the graph's undirected links (each once, ``u != v``).
      compatible: ``[L]`` bool, which links may carry the election.
      ranks: ``[N]`` distinct ranks ``0..N-1`` (:func:`node_ranks`; lower leads).
      max_hops: region-size limit in hops from the leader (``None``: no limit, regions are the
        connected components of the compatible links).
      max_iters: iteration cap (default ``4 N + 4``, beyond any convergence time).
      init: a starting state ``(leader rank [N], hops [N])`` (default: every node its own
        leader); any state converges to the same regions (self-stabilisation).
    Returns:
      ``(leader [N] node id, hops [N] distance to it, iterations)``. ``RuntimeError`` if the
      loop hit ``max_iters`` without settling.
    """
    r = np.asarray(ranks)
    n = int(r.shape[0]) if r.ndim == 1 else -1
    if r.ndim != 1 or not np.array_equal(np.sort(r), np.arange(n)):
        raise ValueError("ranks must be a permutation of 0..N-1 (use node_ranks)")
    u, v = _check_links(u, v, n)
    ok = np.asarray(compatible, bool)
    if ok.shape != u.shape:
        raise ValueError(f"compatible must have one entry per link ({u.shape[0]}), got "
                         f"shape {ok.shape}")
    _check_max_hops(max_hops)
    limit = n if max_hops is None else min(int(max_hops), n)
    cap = 4 * n + 4 if max_iters is None else int(max_iters)
    if init is None:
        lead0, dist0 = r.astype(np.int32), np.zeros(n, np.int32)
    else:
        lead0, dist0 = (np.asarray(a, np.int32) for a in init)
        if lead0.shape != (n,) or dist0.shape != (n,):
            raise ValueError(f"init must be two [N={n}] arrays")
        if lead0.min(initial=0) < 0 or lead0.max(initial=0) >= n or dist0.min(initial=0) < 0:
            raise ValueError("init leader ranks must be in [0, N) and hops >= 0")
    src = jnp.asarray(np.concatenate([u, v]))
    dst = jnp.asarray(np.concatenate([v, u]))
    ok2 = jnp.asarray(np.concatenate([ok, ok]))
    lead, dist, it, done = _elect(n, jnp.asarray(r, jnp.int32), src, dst, ok2,
                                  jnp.asarray(limit, jnp.int32), jnp.asarray(cap, jnp.int32),
                                  jnp.asarray(lead0), jnp.asarray(dist0))
    if not bool(done):
        raise RuntimeError(f"leader election did not settle in {cap} iterations")
    order = np.argsort(r)  # rank -> node id
    return order[np.asarray(lead)].astype(np.int32), np.asarray(dist, np.int32), int(it)


def election_reference(u, v, compatible, ranks, max_hops: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Plain reference of the election's fixed point (host loops, breadth-first search).

    Nodes in rank order; a still unassigned node leads and takes, breadth-first through
    unassigned nodes, every node within ``max_hops`` compatible hops. Returns
    ``(leader [N], hops [N])``."""
    r = np.asarray(ranks)
    n = len(r)
    adj: list[list[int]] = [[] for _ in range(n)]
    for a, b, ok in zip(np.asarray(u), np.asarray(v), np.asarray(compatible, bool), strict=True):
        if ok:
            adj[int(a)].append(int(b))
            adj[int(b)].append(int(a))
    limit = n if max_hops is None else int(max_hops)
    leader = np.full(n, -1, np.int64)
    hops = np.zeros(n, np.int64)
    for s in np.argsort(r):
        if leader[s] >= 0:
            continue
        leader[s], hops[s] = s, 0
        frontier = [int(s)]
        d = 0
        while frontier and d < limit:
            d += 1
            nxt = []
            for x in frontier:
                for y in adj[x]:
                    if leader[y] < 0:
                        leader[y], hops[y] = s, d
                        nxt.append(y)
            frontier = nxt
    return leader, hops


# --------------------------------------------------------------------------------------------
# regions from scores, and the whole pipeline
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Regions:
    """Result of decentralized discovery (host arrays).

    Attributes:
      region: ``[N]`` region id per client, ``0..R-1`` numbered by each region's lowest id.
      leader: ``[N]`` the node id of each client's leader; hops: ``[N]`` hops to it.
      iterations: election iterations until no node changed.
      u, v: ``[L]`` the graph's links; score_uv, score_vu: ``[L]`` ``S[u, v]`` (``u`` scores
        ``v``'s predictor) and ``S[v, u]``; accepts_u, accepts_v: each end's verdict;
        compatible: ``[L]`` the symmetric rule's result.
      self_novelty: ``[N]``; ranks: ``[N]`` the election order.
      bytes_up, bytes_down: ``[N]`` discovery traffic per client: predictors and scores over
        links (as the sparse :func:`~fedrnd.rnd.discover`), one verdict bit-byte back per link
        end, and ``iterations`` election messages over every compatible link.
      discovery: the sparse :class:`~fedrnd.rnd.Discovery` the scores came from (``None`` when
        built from given scores).
    """

    region: np.ndarray
    leader: np.ndarray
    hops: np.ndarray
    iterations: int
    u: np.ndarray
    v: np.ndarray
    score_uv: np.ndarray
    score_vu: np.ndarray
    accepts_u: np.ndarray
    accepts_v: np.ndarray
    compatible: np.ndarray
    self_novelty: np.ndarray
    ranks: np.ndarray
    bytes_up: np.ndarray
    bytes_down: np.ndarray
    discovery: Discovery | None = None

    @property
    def num_regions(self) -> int:
        return int(self.region.max()) + 1 if self.region.size else 0

    @property
    def num_clients(self) -> int:
        return int(self.region.shape[0])

    def sizes(self) -> np.ndarray:
        return np.bincount(self.region, minlength=self.num_regions)


def regions_from_scores(u, v, score_uv, score_vu, s_self, *, band: float = 0.3,
                        symmetry: str = "mutual", max_hops: int | None = None,
                        priority: Any = "self_novelty", key: jax.Array | None = None,
                        accepts: tuple[Any, Any] | None = None) -> Regions:
    """Regions from given neighbour scores (no training): the band rule, the symmetry rule and
    the election.

    Args:
      u, v: ``[L]`` links; score_uv, score_vu: ``[L]`` ``S[u, v]`` and ``S[v, u]``.
      s_self: ``[N]`` self-novelty.
      band: the rule's ``a``; symmetry: ``"mutual"`` or ``"either"``; max_hops: the limit.
      priority: ``"self_novelty"`` (default), ``"id"``, ``"random"`` (needs ``key``) or an
        ``[N]`` array (lower leads).
      accepts: the two ends' verdicts ``[L]`` decided elsewhere (another criterion), instead of
        the band rule.
    """
    s_self = np.asarray(s_self, np.float64)
    if s_self.ndim != 1:
        raise ValueError(f"s_self must be a vector [N], got shape {s_self.shape}")
    n = s_self.shape[0]
    u, v = _check_links(u, v, n)
    su, sv = np.asarray(score_uv, np.float64), np.asarray(score_vu, np.float64)
    if su.shape != u.shape or sv.shape != u.shape:
        raise ValueError(f"scores must have one entry per link ({u.shape[0]}), got shapes "
                         f"{su.shape} and {sv.shape}")
    if not (np.all(np.isfinite(su)) and np.all(np.isfinite(sv)) and np.all(np.isfinite(s_self))):
        raise ValueError("novelty scores must be finite")
    _check_choice("symmetry", symmetry, SYMMETRIES)
    _check_max_hops(max_hops)
    if isinstance(priority, str):
        _check_choice("priority", priority, PRIORITIES)
    if accepts is None:
        at_u = band_accepts(su, s_self[u], band)
        at_v = band_accepts(sv, s_self[v], band)
    else:
        at_u, at_v = (np.asarray(a, bool) for a in accepts)
    comp = compatible_links(at_u, at_v, symmetry)
    pr = s_self if isinstance(priority, str) and priority == "self_novelty" else priority
    ranks = node_ranks(pr, key, n)
    leader, hops, it = elect_leaders(u, v, comp, ranks, max_hops=max_hops)
    deg = np.bincount(np.concatenate([u, v]), minlength=n).astype(np.float64)
    cdeg = np.bincount(np.concatenate([u[comp], v[comp]]), minlength=n).astype(np.float64)
    # One verdict byte per link end, then every election iteration one message per
    # compatible link and direction.
    election = deg * 1.0 + cdeg * it * STATE_BYTES
    return Regions(_relabel(leader), leader, hops, it, u, v, su, sv, at_u, at_v, comp, s_self,
                   ranks, election, election.copy(), None)


def discover_regions(data: FederatedData, u, v, config: RNDConfig = RNDConfig(), *,
                     band: float = 0.3, criterion: str = "band", symmetry: str = "mutual",
                     max_hops: int | None = None, priority: Any = "self_novelty",
                     key: jax.Array | None = None, mapper: ClientMapper | None = None,
                     attack: Any = None) -> Regions:
    """Decentralized RND discovery on the graph with links ``(u, v)`` (labels unused).

    Every client trains its predictor and scores its neighbours' (sparse
    :func:`~fedrnd.rnd.discover`, ``config``'s network, schedule and probes); then
    :func:`regions_from_scores`. ``criterion = "eps"`` replaces the band rule by the
    centralized ``z <= eps`` on each client's observed row (``config.eps``, ``config.sigma``).

    ``attack``: an :class:`~fedrnd.rnd.adversarial.AttackConfig`; its clients send their
    neighbours the predictor its strategy says and forge the scores they give (their verdicts
    follow from those scores by the band rule). Non-finite scores are rejected with the
    sender's id, as in :func:`~fedrnd.rnd.discover`. Not attacked: the election messages (a
    node's claimed rank and leader are trusted; see ``docs/methods/threat-model.md``).
    """
    _check_choice("criterion", criterion, CRITERIA)
    check_band(band)
    n = data.num_clients
    u, v = _check_links(u, v, n)
    if u.size:
        a, b = np.minimum(u, v), np.maximum(u, v)
        if len(np.unique(a.astype(np.int64) * n + b)) != len(u):
            raise ValueError("links must be listed once each (no repeated pairs)")
    key = jax.random.key(config.seed) if key is None else key
    k_disc, k_rank = jax.random.split(key)
    # Eps is only needed by criterion "eps"; a fixed one skips auto_eps's sort otherwise.
    # Regions use the paper's per-link rule: the scores come from the "eps" criterion.
    cfg = dataclasses.replace(config, criterion="eps")
    cfg = cfg if criterion == "eps" else dataclasses.replace(cfg, eps=0.0)
    src = np.concatenate([v, u])  # u scores v's predictor, v scores u's
    dst = np.concatenate([u, v])
    edges = EdgeList(jnp.asarray(src), jnp.asarray(dst), jnp.ones(len(src), jnp.float32))
    disc = discover(data, cfg, key=k_disc, mapper=mapper, edges=edges, attack=attack)
    # discover sorts the directed pairs; look each link's two scores up by (dst, src).
    d_src, d_dst = np.asarray(disc.edges.src), np.asarray(disc.edges.dst)
    keys = d_dst.astype(np.int64) * n + d_src
    order = np.argsort(keys)

    def lookup(table, i, j):
        pos = order[np.searchsorted(keys[order], i.astype(np.int64) * n + j)]
        return np.asarray(table)[pos]

    su = lookup(disc.edge_scores, u, v)
    sv = lookup(disc.edge_scores, v, u)
    accepts = None
    if criterion == "eps":
        accepts = (lookup(disc.compatible, u, v), lookup(disc.compatible, v, u))
    reg = regions_from_scores(u, v, su, sv, disc.self_novelty, band=band, symmetry=symmetry,
                              max_hops=max_hops, priority=priority, key=k_rank,
                              accepts=accepts)
    return dataclasses.replace(reg, bytes_up=reg.bytes_up + disc.bytes_up,
                               bytes_down=reg.bytes_down + disc.bytes_down, discovery=disc)
