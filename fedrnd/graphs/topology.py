"""Topologies drawn from a key with static shapes: the same code draws a static graph once on
the host and a fresh graph every round inside a jitted program.

``make_topology(name, num_nodes, **options)`` validates the options and returns a
:class:`Topology`; ``topology.draw(key) -> Graph`` is pure and jittable (the slot count ``E`` is
fixed by ``num_nodes`` and the options, never by the draw); ``topology.static(key)`` draws once
on the host, checks the graph (connectivity, exact degrees) and keeps only its real edges.

=================== ============================ =============================================
name                options                      graph
=================== ============================ =============================================
``ring``            ``shuffle``                  cycle ``0-1-...-N-1-0`` (nodes in random
                                                 order with ``shuffle``: a random ring)
``grid``            ``rows``, ``deform``,        ``rows x (N / rows)`` lattice, 4-neighbours;
                    ``radius``, ``shuffle``      ``deform`` jitters each node by up to that
                                                 fraction of the spacing per coordinate; with
                                                 ``radius`` (in spacings) nodes within that
                                                 distance of each other are linked instead
``random_geometric`` ``radius``                  ``N`` uniform points in the unit square,
                                                 linked within ``radius``
``erdos_renyi``     ``p``                        every pair independently with probability p
``d_regular``       ``degree``, ``repair_iters`` uniform-like random simple d-regular graph
``small_world``     ``k``, ``beta``              Watts-Strogatz: ring lattice of ``k``
                                                 neighbours, each edge rewired w.p. ``beta``
``complete``        --                           all pairs
``planted_partition`` ``communities``, ``p_in``, stochastic block model: ``communities``
                    ``p_out``                    contiguous blocks, pairs linked w.p. ``p_in``
                                                 inside a block, ``p_out`` across
                                                 (:mod:`fedrnd.graphs.community`)
=================== ============================ =============================================

How the random ones are drawn in a static shape:

- ``erdos_renyi``: Poissonization. ``K ~ Poisson(lam)`` unordered pairs are drawn uniformly with
  replacement and duplicates dropped; with ``lam = -M log(1 - p)`` (``M = N(N-1)/2``) every pair
  is then present independently with probability exactly ``p``. The slot count is
  ``lam + 8 sqrt(lam) + 16`` (a larger ``K`` would be truncated; probability below 1e-15), or
  all ``M`` pairs with a coin each when that is fewer slots.
- ``d_regular``: configuration model (``N d`` stubs paired by a random permutation), then
  degree-preserving switches repair self-loops and repeated edges: a bad edge ``(a, b)`` and a
  random good edge ``(x, y)`` become ``(a, x), (b, y)``, all bad edges at once, until none is
  left (a few iterations; ``repair_iters`` caps them, and any left are dropped, so a node may
  then have degree ``d - 1``; ``static`` redraws until the graph is exactly d-regular). Above
  ``d = (N - 1) / 2`` the graph is the complement of a random ``(N - 1 - d)``-regular one.
- ``small_world``: each lattice edge ``(i, i + j)`` is rewired with probability ``beta`` to
  ``(i, t)``, ``t`` uniform among the other nodes; a rewired edge that repeats another keeps
  its lattice end (as networkx's ``watts_strogatz_graph`` skips such rewirings), and the rare
  repeat left after that is dropped.
- ``random_geometric`` and ``grid`` with ``radius``: nodes are sorted by their first
  coordinate and each pair is listed by its left end, which checks the next ``window`` nodes
  and keeps its nearest ``max_forward`` within the radius (no ``N x N`` distance matrix); the
  pairs are packed into ``max_edges`` slots. For uniform points the caps are Poisson counts
  plus six standard deviations (reached with negligible probability); for grids they are exact
  lattice bounds.
  ``static`` computes the exact edge set of the drawn positions on the host (a k-d tree).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedrnd.graphs.graph import Graph, components, degrees, to_numpy_edges

_I32 = jnp.int32


def _circle(n: int) -> jax.Array:
    t = 2 * np.pi * np.arange(n) / max(n, 1)
    return jnp.asarray(np.stack([0.5 + 0.5 * np.cos(t), 0.5 + 0.5 * np.sin(t)], 1), jnp.float32)


def _empty(positions: jax.Array) -> Graph:
    z = jnp.zeros((0,), _I32)
    return Graph(z, z, jnp.zeros((0,), bool), positions)


def _simple(u: jax.Array, v: jax.Array, valid: jax.Array, n: int,
            priority: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Canonical ``(min, max)`` endpoints and the slots that hold a simple graph: self-loops and
    invalid slots dropped, of repeated pairs only the first kept (lowest ``priority``, then
    lowest slot)."""
    a = jnp.minimum(u, v).astype(_I32)
    b = jnp.maximum(u, v).astype(_I32)
    e = a.shape[0]
    if e == 0:
        return a, b, valid
    ok = valid & (a != b)
    sa, sb = jnp.where(ok, a, n), jnp.where(ok, b, n)
    slot = jnp.arange(e, dtype=_I32)
    keys = (sa, sb) + (() if priority is None else (priority.astype(_I32),)) + (slot,)
    out = jax.lax.sort(keys, num_keys=len(keys))
    sa_s, sb_s, slot_s = out[0], out[1], out[-1]
    repeat = jnp.concatenate([jnp.zeros((1,), bool),
                              (sa_s[1:] == sa_s[:-1]) & (sb_s[1:] == sb_s[:-1])])
    first = ~repeat & (sa_s < n)
    return a, b, jnp.zeros((e,), bool).at[slot_s].set(first)


def _relabel(key: jax.Array, u, v, positions) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Put the nodes in random order: node ``i`` of the pattern becomes node ``order[i]``."""
    n = positions.shape[0]
    order = jax.random.permutation(key, n).astype(_I32)
    return order[u], order[v], jnp.zeros_like(positions).at[order].set(positions)


# --- radius graphs ----------------------------------------------------------------------------

def _radius_edges(pos: jax.Array, radius: float, window: int, max_forward: int,
                  max_edges: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Edges between nodes within ``radius``, each pair once, in ``max_edges`` slots.

    Nodes are sorted by their first coordinate; a pair is listed by its left end, which
    looks at most ``window`` nodes to the right (the nodes whose first coordinate is within
    ``radius``) and keeps its ``max_forward`` nearest within the radius; the listed pairs are
    then packed into ``max_edges`` slots. The caps are set so that they are almost never
    reached.
    """
    n = pos.shape[0]
    w = min(int(window), n - 1)
    if w <= 0:
        z = jnp.zeros((0,), _I32)
        return z, z, jnp.zeros((0,), bool)
    d = min(int(max_forward), w)
    order = jnp.argsort(pos[:, 0]).astype(_I32)
    sp = pos[order]
    right = jnp.arange(n, dtype=_I32)[:, None] + jnp.arange(1, w + 1, dtype=_I32)[None, :]
    inside = right < n
    right = jnp.minimum(right, n - 1)
    d2 = jnp.sum((sp[right] - sp[:, None, :]) ** 2, axis=-1)
    near = inside & (d2 <= jnp.float32(radius) ** 2)
    score, k = jax.lax.top_k(jnp.where(near, -d2, -jnp.inf), d)
    v = order[jnp.take_along_axis(right, k, axis=1)].reshape(-1)
    u = jnp.broadcast_to(order[:, None], (n, d)).reshape(-1)
    ok = jnp.isfinite(score).reshape(-1)
    cap = min(int(max_edges), n * d)
    at = jnp.where(ok, jnp.cumsum(ok.astype(_I32)) - 1, cap)
    pack = lambda a: jnp.zeros((cap,), a.dtype).at[at].set(a, mode="drop")  # noqa: E731
    return pack(u), pack(v), pack(ok)


def _poisson_cap(lam: float) -> int:
    return math.ceil(lam + 6 * math.sqrt(lam) + 6)


def _geometric_caps(n: int, radius: float) -> tuple[int, int, int]:
    """``(window, max_forward, max_edges)`` for N uniform points: the nodes in a strip of width
    r to the right, the in-radius nodes among them (half a disc), and all in-radius pairs;
    each a Poisson count (the disc's area bounds the chance that two points are linked)."""
    area = min(1.0, math.pi * radius ** 2)
    return (_poisson_cap((n - 1) * min(radius, 1.0)), _poisson_cap((n - 1) * area / 2),
            _poisson_cap(n * (n - 1) / 2 * area))


def _grid_caps(n: int, rows: int, radius: float, deform: float) -> tuple[int, int, int]:
    """Exact bounds for a jittered lattice (each coordinate moved by at most ``deform``
    spacings): the nodes whose first coordinate is within reach to the right, and the lattice
    points within ``radius + 2 sqrt(2) deform`` of a node."""
    window = (math.floor(radius + 4 * deform) + 2) * rows
    reach = radius + 2 * math.sqrt(2) * deform
    k = math.floor(reach)
    dx, dy = np.meshgrid(np.arange(-k, k + 1), np.arange(-k, k + 1))
    degree = max(1, int(np.sum(dx ** 2 + dy ** 2 <= reach ** 2)) - 1)
    return window, degree, n * degree // 2


# --- generators: (n, key, **options) -> Graph, jittable ---------------------------------------

def _ring(n: int, key: jax.Array, shuffle: bool = False) -> Graph:
    pos = _circle(n)
    if n < 2:
        return _empty(pos)
    i = jnp.arange(n, dtype=_I32)
    u, v = i, (i + 1) % n
    if shuffle:
        u, v, pos = _relabel(key, u, v, pos)
    a, b, ok = _simple(u, v, jnp.ones((n,), bool), n)
    return Graph(a, b, ok, pos)


def _default_rows(n: int) -> int:
    return max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)


def _grid(n: int, key: jax.Array, rows: int | None = None, deform: float = 0.0,
          radius: float | None = None, shuffle: bool = False) -> Graph:
    r = rows or _default_rows(n)
    c = n // r
    row, col = np.divmod(np.arange(n), c)
    spacing = 1.0 / max(r - 1, c - 1, 1)
    pos = jnp.asarray(np.stack([col, row], 1) * spacing, jnp.float32)
    k_jitter, k_order = jax.random.split(key)
    if deform:
        pos = pos + jax.random.uniform(k_jitter, (n, 2), jnp.float32, -deform, deform) * spacing
    if radius is None:
        ids = np.arange(n).reshape(r, c)
        u = np.concatenate([ids[:, :-1].ravel(), ids[:-1, :].ravel()])
        v = np.concatenate([ids[:, 1:].ravel(), ids[1:, :].ravel()])
        u, v, ok = jnp.asarray(u, _I32), jnp.asarray(v, _I32), jnp.ones((len(u),), bool)
    else:
        u, v, ok = _radius_edges(pos, radius * spacing, *_grid_caps(n, r, radius, deform))
    if shuffle:
        u, v, pos = _relabel(k_order, u, v, pos)
    a, b, ok = _simple(u, v, ok, n)
    return Graph(a, b, ok, pos)


def _random_geometric(n: int, key: jax.Array, radius: float) -> Graph:
    pos = jax.random.uniform(key, (n, 2), jnp.float32)
    u, v, ok = _radius_edges(pos, radius, *_geometric_caps(n, radius))
    return Graph(u, v, ok, pos)


def _er_slots(n: int, p: float) -> tuple[int, float]:
    """``(slots, lam)``: Poissonized slot count, or ``(M, 0)`` when all pairs are fewer."""
    m = n * (n - 1) // 2
    if p >= 1.0:
        return m, 0.0
    lam = -m * math.log1p(-p)
    cap = math.ceil(lam + 8 * math.sqrt(lam) + 16)
    return (m, 0.0) if cap >= m else (cap, lam)


def _erdos_renyi(n: int, key: jax.Array, p: float) -> Graph:
    pos = _circle(n)
    slots, lam = _er_slots(n, p)
    if slots == 0:
        return _empty(pos)
    if lam == 0.0:  # every pair gets its own coin
        u, v = np.triu_indices(n, 1)
        ok = jax.random.bernoulli(key, p, (slots,))
        return Graph(jnp.asarray(u, _I32), jnp.asarray(v, _I32), ok, pos)
    k_count, k_a, k_b = jax.random.split(key, 3)
    count = jax.random.poisson(k_count, lam)
    a = jax.random.randint(k_a, (slots,), 0, n, _I32)
    b = (a + jax.random.randint(k_b, (slots,), 1, n, _I32)) % n  # uniform unordered pair
    a, b, ok = _simple(a, b, jnp.arange(slots) < count, n)
    return Graph(a, b, ok, pos)


def _bad_edges(u: jax.Array, v: jax.Array, n: int) -> jax.Array:
    _, _, ok = _simple(u, v, jnp.ones(u.shape, bool), n)
    return ~ok


def _d_regular(n: int, key: jax.Array, degree: int, repair_iters: int = 100) -> Graph:
    pos = _circle(n)
    if degree > (n - 1) // 2 and degree > 1:
        # Dense: the complement of a random (N - 1 - d)-regular graph, where switches have
        # room to work.
        sparse = _d_regular(n, key, n - 1 - degree, repair_iters)
        adj = jnp.zeros((n, n), bool).at[sparse.u, sparse.v].max(sparse.valid)
        u, v = np.triu_indices(n, 1)
        return Graph(jnp.asarray(u, _I32), jnp.asarray(v, _I32), ~adj[u, v], pos)
    e = n * degree // 2
    if e == 0:
        return _empty(pos)
    k_pair, k_fix = jax.random.split(key)
    stubs = jax.random.permutation(k_pair, jnp.repeat(jnp.arange(n, dtype=_I32), degree))
    u, v = stubs[0::2], stubs[1::2]
    slot = jnp.arange(e, dtype=_I32)

    def cond(c):
        u, v, it = c
        return (it < repair_iters) & jnp.any(_bad_edges(u, v, n))

    def switch(c):
        u, v, it = c
        bad = _bad_edges(u, v, n)
        k_partner, k_flip = jax.random.split(jax.random.fold_in(k_fix, it))
        partner = jax.random.randint(k_partner, (e,), 0, e, _I32)
        cand = bad & ~bad[partner] & (partner != slot)
        # One bad edge per partner (the lowest slot), so the switches are disjoint.
        first = jax.ops.segment_min(jnp.where(cand, slot, e), partner, num_segments=e)
        go = cand & (first[partner] == slot)
        flip = jax.random.bernoulli(k_flip, 0.5, (e,))
        x = jnp.where(flip, v[partner], u[partner])
        y = jnp.where(flip, u[partner], v[partner])
        # (a, b) + (x, y) -> (a, x) + (b, y): every node keeps its degree.
        tgt = jnp.where(go, partner, e)
        u2 = u.at[tgt].set(v, mode="drop")
        v2 = jnp.where(go, x, v.at[tgt].set(y, mode="drop"))
        return u2, v2, it + 1

    u, v, _ = jax.lax.while_loop(cond, switch, (u, v, jnp.zeros((), _I32)))
    a, b, ok = _simple(u, v, jnp.ones((e,), bool), n)
    return Graph(a, b, ok, pos)


def _small_world(n: int, key: jax.Array, k: int, beta: float = 0.1) -> Graph:
    pos = _circle(n)
    half = k // 2
    i = jnp.tile(jnp.arange(n, dtype=_I32), half)
    lattice = (i + jnp.repeat(jnp.arange(1, half + 1, dtype=_I32), n)) % n
    e = n * half
    k_rewire, k_target = jax.random.split(key)
    rewired = jax.random.bernoulli(k_rewire, beta, (e,))
    target = (i + jax.random.randint(k_target, (e,), 1, n, _I32)) % n
    v = jnp.where(rewired, target, lattice)
    # Lattice edges win over rewired repeats; a rewired repeat falls back to its lattice end.
    _, _, ok = _simple(i, v, jnp.ones((e,), bool), n, priority=rewired)
    v = jnp.where(ok | ~rewired, v, lattice)
    a, b, ok = _simple(i, v, jnp.ones((e,), bool), n, priority=rewired)
    return Graph(a, b, ok, pos)


def _complete(n: int, key: jax.Array) -> Graph:
    u, v = np.triu_indices(n, 1)
    return Graph(jnp.asarray(u, _I32), jnp.asarray(v, _I32), jnp.ones((len(u),), bool),
                 _circle(n))


# --- validation -------------------------------------------------------------------------------

def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _is_int(x: Any) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)


def _check_flag(name: str, o: dict, key: str) -> None:
    if key in o:
        _need(isinstance(o[key], bool | np.bool_), f"{name}: {key} must be true or false, "
                                                    f"got {o[key]!r}")


def _check_ring(n: int, o: dict) -> None:
    _check_flag("ring", o, "shuffle")


def _check_grid(n: int, o: dict) -> None:
    rows = o.get("rows")
    if rows is not None:
        _need(_is_int(rows) and rows >= 1 and n % rows == 0,
              f"grid: rows must be an integer >= 1 that divides the {n} nodes, got {rows!r}")
    deform = o.get("deform", 0.0)
    _need(_is_num(deform) and deform >= 0, f"grid: deform must be >= 0 (a fraction of the "
                                           f"grid spacing), got {deform!r}")
    radius = o.get("radius")
    if radius is not None:
        _need(_is_num(radius) and radius > 0, f"grid: radius must be > 0 (in grid spacings), "
                                              f"got {radius!r}")
    _check_flag("grid", o, "shuffle")


def _check_geometric(n: int, o: dict) -> None:
    r = o.get("radius")
    _need(_is_num(r) and r > 0, f"random_geometric: radius must be a number > 0 (the unit "
                                f"square's side is 1), got {r!r}")


def _check_er(n: int, o: dict) -> None:
    p = o.get("p")
    _need(_is_num(p) and 0 < p <= 1, f"erdos_renyi: p must be in (0, 1], got {p!r}")
    slots, _ = _er_slots(n, float(p))
    _need(slots < 2 ** 28, f"erdos_renyi: N={n}, p={p} needs {slots} edge slots, more than "
                           f"fit; lower p")


def _check_d_regular(n: int, o: dict) -> None:
    d = o.get("degree")
    _need(_is_int(d) and 0 <= d < n,
          f"d_regular: degree must be an integer in [0, N - 1 = {n - 1}], got {d!r}")
    _need(n * d % 2 == 0, f"d_regular: N * degree must be even (each edge has two ends), got "
                          f"N={n}, degree={d}")
    it = o.get("repair_iters", 100)
    _need(_is_int(it) and it >= 0, f"d_regular: repair_iters must be an integer >= 0, got {it!r}")


def _check_small_world(n: int, o: dict) -> None:
    k = o.get("k")
    _need(_is_int(k) and k >= 2 and k % 2 == 0 and k < n,
          f"small_world: k (lattice neighbours) must be an even integer in [2, N - 1 = {n - 1}]"
          f", got {k!r}")
    beta = o.get("beta", 0.1)
    _need(_is_num(beta) and 0 <= beta <= 1, f"small_world: beta must be in [0, 1], got {beta!r}")


@dataclasses.dataclass(frozen=True)
class _Spec:
    draw: Callable[..., Graph]
    options: tuple[str, ...]
    check: Callable[[int, dict], None]
    hint: Callable[[int, dict], str]


TOPOLOGIES: dict[str, _Spec] = {
    "ring": _Spec(_ring, ("shuffle",), _check_ring, lambda n, o: ""),
    "grid": _Spec(_grid, ("rows", "deform", "radius", "shuffle"), _check_grid,
                  lambda n, o: "raise radius (at least 1 spacing plus 2 x deform)"),
    "random_geometric": _Spec(
        _random_geometric, ("radius",), _check_geometric,
        lambda n, o: f"raise radius (connectivity needs about sqrt(ln N / (pi N)) = "
                     f"{math.sqrt(math.log(max(n, 2)) / (math.pi * n)):.3g})"),
    "erdos_renyi": _Spec(
        _erdos_renyi, ("p",), _check_er,
        lambda n, o: f"raise p (connectivity needs p above about ln N / N = "
                     f"{math.log(max(n, 2)) / n:.3g})"),
    "d_regular": _Spec(_d_regular, ("degree", "repair_iters"), _check_d_regular,
                       lambda n, o: "use degree >= 3 (degree 1 is a matching, degree 2 a union "
                                    "of cycles)"),
    "small_world": _Spec(_small_world, ("k", "beta"), _check_small_world,
                         lambda n, o: "raise k or lower beta"),
    "complete": _Spec(_complete, (), lambda n, o: None, lambda n, o: ""),
}
"""Registered topologies: name -> generator, its option names, validation, connectivity hint."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """A named topology on ``num_nodes`` nodes with its options (hashable, static)."""

    name: str
    num_nodes: int
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        if self.name not in TOPOLOGIES:
            raise ValueError(f"topology {self.name!r} is unknown; allowed: {sorted(TOPOLOGIES)}")
        _need(_is_int(self.num_nodes) and self.num_nodes >= 1,
              f"topology {self.name}: num_nodes must be >= 1, got {self.num_nodes!r}")
        spec = TOPOLOGIES[self.name]
        opts = dict(self.options)
        bad = sorted(set(opts) - set(spec.options))
        _need(not bad, f"topology {self.name!r} has no option(s) {bad}; allowed: "
                       f"{list(spec.options)}")
        spec.check(self.num_nodes, opts)

    @property
    def kw(self) -> dict[str, Any]:
        return dict(self.options)

    def describe(self) -> str:
        args = ", ".join([f"N={self.num_nodes}"] + [f"{k}={v}" for k, v in self.options])
        return f"{self.name}({args})"

    @property
    def random(self) -> bool:
        """Whether draws depend on the key (a redrawn graph changes from round to round)."""
        o = self.kw
        if self.name == "complete":
            return False
        if self.name == "ring":
            return bool(o.get("shuffle", False)) and self.num_nodes > 3
        if self.name == "grid":
            return bool(o.get("shuffle", False)) or (
                o.get("radius") is not None and o.get("deform", 0) > 0)
        return True

    def draw(self, key: jax.Array) -> Graph:
        """One graph from ``key`` (pure, jittable; shapes depend on the options only)."""
        return TOPOLOGIES[self.name].draw(self.num_nodes, key, **self.kw)

    def static(self, key: jax.Array, *, connected: bool = True, tries: int = 10) -> Graph:
        """Draw once on the host and keep the real edges; ``connected`` requires one component.

        Random topologies are redrawn (from ``fold_in(key, t)``) up to ``tries`` times until
        the graph is connected and, for ``d_regular``, exactly regular; then a ``ValueError``
        says what to change.
        """
        draw = jax.jit(self.draw)
        n = self.num_nodes
        why = ""
        for t in range(tries if self.random else 1):
            g = draw(jax.random.fold_in(key, t))
            if self._radius_based():
                g = self._exact_radius(g)
            g = _compact(g)
            if self.name == "d_regular":
                deg = np.asarray(degrees(g))
                d = self.kw["degree"]
                if np.any(deg != d):
                    why = f"{int(np.sum(deg != d))} nodes short of degree {d} after repair"
                    continue
            if connected and n > 1:
                count, label = components(g)
                if count > 1:
                    sizes = np.sort(np.bincount(label))[::-1]
                    shown = ", ".join(map(str, sizes[:8])) + (", ..." if len(sizes) > 8 else "")
                    why = f"disconnected: {count} components of sizes {shown}"
                    continue
            return g
        tried = f" in {tries} draws" if self.random else ""
        hint = TOPOLOGIES[self.name].hint(n, self.kw)
        fix = f"{hint}, or set connected = false to allow it" if hint else \
            "set connected = false to allow it"
        if self.name == "d_regular" and "short" in why:
            fix = "raise repair_iters"
        raise ValueError(f"graph {self.describe()} is {why}{tried}; {fix}")

    def _radius_based(self) -> bool:
        return self.name == "random_geometric" or (
            self.name == "grid" and self.kw.get("radius") is not None)

    def _exact_radius(self, g: Graph) -> Graph:
        """The exact radius graph of ``g``'s positions (host, k-d tree), not capped."""
        from scipy.spatial import cKDTree

        o = self.kw
        pos = np.asarray(g.positions, np.float64)
        radius = o["radius"]
        if self.name == "grid":
            r = o.get("rows") or _default_rows(self.num_nodes)
            radius *= 1.0 / max(r - 1, self.num_nodes // r - 1, 1)
        # float32 distances decide in the jitted draw; match them at the boundary.
        pairs = cKDTree(pos).query_pairs(radius * (1 + 1e-6), output_type="ndarray")
        if len(pairs):
            p32 = np.asarray(g.positions, np.float32)
            d2 = np.sum((p32[pairs[:, 0]] - p32[pairs[:, 1]]) ** 2, axis=1, dtype=np.float32)
            pairs = pairs[d2 <= np.float32(radius) ** 2]
        pairs = pairs.reshape(-1, 2).astype(np.int32)
        return Graph(jnp.asarray(pairs[:, 0]), jnp.asarray(pairs[:, 1]),
                     jnp.ones((len(pairs),), bool), g.positions)


def _compact(g: Graph) -> Graph:
    """Only the valid edges, as sorted ``(min, max)`` pairs (host)."""
    e = to_numpy_edges(g).astype(np.int32)
    return Graph(jnp.asarray(e[:, 0]), jnp.asarray(e[:, 1]), jnp.ones((len(e),), bool),
                 jnp.asarray(g.positions, jnp.float32))


def make_topology(name: str, num_nodes: int, **options: Any) -> Topology:
    """A validated :class:`Topology`; ``ValueError`` names a bad option and the allowed ones."""
    return Topology(name, int(num_nodes), tuple(sorted(options.items())))
