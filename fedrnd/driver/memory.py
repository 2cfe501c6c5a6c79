"""Memory planner: device memory a run needs, checked before the state is allocated.

Per device (the client axis is split over ``S`` devices; everything else is replicated):

- ``data``: the example pool ``x``, ``y`` (replicated) plus the per-client index rows and
  counts of every data phase, ``ceil(C / S)`` clients' worth. Exact (from the built data's
  shapes, before it is placed on the devices).
- ``state``: each method's state from ``jax.eval_shape`` of ``Algorithm.init_template``:
  models per slot or per client, server and client optimizer state, per-client hyper-
  parameters and whatever else a method keeps (RND's novelty rows); ``state["clients"]``
  leaves split over the devices, the rest replicated. Exact for the initial shapes (methods
  that grow their cluster slots later use more). The driver keeps every finished method's
  final state in its result, so the states of all methods add up.
- ``history``: the per-round metrics of one block of rounds (ledger entries are ``[C]`` per
  round), from ``jax.eval_shape`` of one round, times the longest block.
- working set: local training and evaluation run ``chunk`` clients at a time on each
  device. The bytes of one client in flight are bounded by the sum of every intermediate
  array in the traced program of one client's local training (and of its evaluation), with
  loop bodies counted once; XLA fuses and reuses buffers, so the bound errs on the safe side
  (several times over for models whose parameters dominate). When that bound would lower the
  chunk size or refuse the run, the planner compiles the two one-client programs and uses
  XLA's buffer assignment (temporaries plus outputs) instead.

:func:`plan` compares ``data + states + history + chunk x per_client`` with the budget
(``memory_limit`` from the config, else the device's ``memory_stats()`` limit minus what is in
use, else on a CPU the host's ``MemAvailable`` shared by the local devices), keeps
``headroom`` for XLA's own buffers, and keeps the preferred chunk size if it fits, else
lowers it to the largest that does. If even one client at a time does not fit, or an explicit ``chunk_size`` does
not, it raises ``MemoryError``-flavoured ``ValueError`` naming every figure.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedrnd.algorithms.base import split_state
from fedrnd.data.drift import DriftingData
from fedrnd.data.federated import FederatedData
from fedrnd.engine import ClientHParams, Engine, evaluate_clients

PyTree = Any
MiB = 2**20

HEADROOM = 0.1
"""Share of the budget left for XLA's own buffers, compiled code and fragmentation."""

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_bytes(value: int | float | str) -> int:
    """``"8GiB"``, ``"512MB"``, ``"1.5g"`` or a plain number of bytes -> bytes."""
    if isinstance(value, bool):
        raise ValueError(f"memory_limit must be a size such as '8GiB' or a byte count, got "
                         f"{value!r}")
    if isinstance(value, int | float):
        if value <= 0:
            raise ValueError(f"memory_limit must be > 0 bytes, got {value}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"memory_limit={value!r} is not a size; use e.g. '8GiB', '512MB', "
                         f"'1.5e9' bytes, or 'off' to skip the memory check")
    n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if n <= 0:
        raise ValueError(f"memory_limit must be > 0 bytes, got {value!r}")
    return int(n)


def _key_bytes(x: Any) -> int:
    shape = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype)).shape
    return int(np.prod(shape)) * 4


def tree_bytes(tree: PyTree) -> int:
    """Bytes of a pytree of arrays or ``ShapeDtypeStruct``s (typed keys included)."""
    total = 0
    for x in jax.tree.leaves(tree):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            total += _key_bytes(x)
        else:
            total += int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
    return total


def _split_bytes(tree: PyTree, shards: int) -> int:
    """Per-device bytes of a tree whose leaves are split over ``shards`` on their first axis."""
    total = 0
    for x in jax.tree.leaves(tree):
        rows = math.ceil(x.shape[0] / shards) if x.shape else 1
        per_row = tree_bytes(jax.ShapeDtypeStruct(x.shape[1:], x.dtype))
        total += rows * per_row
    return total


def data_bytes(data: FederatedData | DriftingData, shards: int = 1) -> int:
    """Bytes one device holds of ``data``: the whole pool plus its clients' index rows."""
    phases = data.phases if isinstance(data, DriftingData) else (data,)
    first = phases[0]
    pool = tree_bytes((first.x, first.y))
    return pool + sum(_split_bytes(p.client_arrays(), shards) for p in phases)


def state_bytes(state: PyTree, shards: int = 1) -> int:
    """Bytes one device holds of a method's state: its per-client part (``state["clients"]``,
    :func:`~fedrnd.algorithms.base.split_state`) split over devices, the rest replicated."""
    rest, clients = split_state(state)
    return tree_bytes(rest) + (0 if clients is None else _split_bytes(clients, shards))


def _sub_jaxprs(eqn) -> list:
    out = []
    for v in eqn.params.values():
        for item in v if isinstance(v, tuple | list) else (v,):
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                out.append(item.jaxpr)
            elif isinstance(item, jax.extend.core.Jaxpr):
                out.append(item)
    return out


def intermediate_bytes(jaxpr) -> int:
    """Sum of the bytes of every value a (closed) jaxpr computes, inner jaxprs included once.

    An upper bound on a program's working memory beyond its arguments: every intermediate
    as if all were alive at once; a loop body counts once since iterations reuse buffers.
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0
    for eqn in jaxpr.eqns:
        total += sum(tree_bytes(jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype))
                     for v in eqn.outvars if hasattr(v.aval, "shape"))
        total += sum(intermediate_bytes(sub) for sub in _sub_jaxprs(eqn))
    return total


def _abstract(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), tree)


def per_client_bytes(engine: Engine, data: FederatedData, hp: ClientHParams,
                     eval_batch: int = 0) -> dict[str, int]:
    """Working bytes of one client in flight: ``{"train": ..., "eval": ...}`` (traced bounds).

    ``train``: one client's local training from a shared model (the engine's choice of path);
    ``eval``: one client's evaluation on its train and test rows.
    """
    from fedrnd.engine import ClientMapper

    one = jax.tree.map(lambda a: jax.ShapeDtypeStruct((1, *np.shape(a)[1:]), a.dtype),
                       data.client_arrays())
    d1 = _abstract(data).replace(**one)
    h1 = jax.tree.map(lambda a: jax.ShapeDtypeStruct((1, *np.shape(a)[1:]), a.dtype), hp)
    params = jax.eval_shape(engine.model.init, jax.random.key(0))
    local = dataclasses.replace(engine, mapper=ClientMapper(chunk_size=1))
    train = jax.make_jaxpr(lambda p, d, h, k: local.train_sum(p, d, h, k, jnp.zeros((), jnp.int32))
                           )(params, d1, h1, jax.random.key(0))
    slots = jax.tree.map(lambda s: jax.ShapeDtypeStruct((1, *s.shape), s.dtype), params)
    ev = jax.make_jaxpr(lambda s, a, d: evaluate_clients(engine.model.apply, s, a, d,
                                                         ClientMapper(chunk_size=1), eval_batch)
                        )(slots, jax.ShapeDtypeStruct((1,), jnp.int32), d1)
    return {"train": intermediate_bytes(train), "eval": intermediate_bytes(ev)}


def xla_per_client_bytes(engine: Engine, data: FederatedData, hp: ClientHParams,
                         eval_batch: int = 0) -> dict[str, int] | None:
    """Working bytes of one client in flight from XLA's buffer assignment (compiles both).

    The same programs as :func:`per_client_bytes`, compiled for one client: temporaries plus
    outputs (``memory_analysis()``). Tighter than the traced bound, at the price of two
    compilations; ``None`` where the backend gives no analysis.
    """
    from fedrnd.engine import ClientMapper

    one = jax.tree.map(lambda a: jax.ShapeDtypeStruct((1, *np.shape(a)[1:]), a.dtype),
                       data.client_arrays())
    d1 = _abstract(data).replace(**one)
    h1 = jax.tree.map(lambda a: jax.ShapeDtypeStruct((1, *np.shape(a)[1:]), a.dtype), hp)
    params = jax.eval_shape(engine.model.init, jax.random.key(0))
    local = dataclasses.replace(engine, mapper=ClientMapper(chunk_size=1))
    slots = jax.tree.map(lambda s: jax.ShapeDtypeStruct((1, *s.shape), s.dtype), params)
    programs = {
        "train": jax.jit(lambda p, d, h, k: local.train_sum(p, d, h, k, jnp.zeros((), jnp.int32))
                         ).lower(params, d1, h1, jax.random.key(0)),
        "eval": jax.jit(lambda s, a, d: evaluate_clients(engine.model.apply, s, a, d,
                                                         ClientMapper(chunk_size=1), eval_batch)
                        ).lower(slots, jax.ShapeDtypeStruct((1,), jnp.int32), d1)}
    out = {}
    for name, lowered in programs.items():
        stats = lowered.compile().memory_analysis()
        if stats is None:
            return None
        out[name] = int(stats.temp_size_in_bytes + stats.output_size_in_bytes)
    return out


def device_budget(limit: int | str | None = None) -> tuple[int | None, str]:
    """``(bytes available per device, where the figure comes from)``.

    ``limit`` (bytes or a size string) wins; ``"off"`` disables the check (``None`` bytes).
    Otherwise the first local device's ``memory_stats()`` (``bytes_limit - bytes_in_use``,
    accelerators), else on a CPU the host's available memory divided by the local devices.
    """
    if isinstance(limit, str) and limit.strip().lower() in ("off", "none", "unlimited"):
        return None, "memory check off (memory_limit = 'off')"
    if limit is not None:
        return parse_bytes(limit), f"memory_limit = {limit!r}"
    dev = jax.local_devices()[0]
    stats = None
    try:
        stats = dev.memory_stats()
    except Exception:  # noqa: BLE001 (backends without the query raise various errors)
        stats = None
    if stats and stats.get("bytes_limit"):
        free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return free, f"{dev.device_kind} memory_stats (limit - in use)"
    avail = _host_available()
    if avail is None:
        return None, "device memory unknown (no memory_stats, no /proc/meminfo)"
    n = jax.local_device_count()
    return avail // n, (f"host MemAvailable / {n} local devices" if n > 1
                        else "host MemAvailable")


def _host_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device of a run and the chunk size that fits.

    ``states`` and ``histories`` are per method (label -> bytes); ``per_client`` is the working
    set of one client in flight (the larger of training and evaluation); ``chunk`` the chunk
    size chosen and ``max_chunk`` the largest that fits (``None``: no budget, no cap).
    """

    budget: int | None
    source: str
    shards: int
    data: int
    states: dict[str, int]
    histories: dict[str, int]
    per_client: int
    in_flight: int
    chunk: int
    max_chunk: int | None
    working: str = "traced bound"
    rounds: dict[str, int] = dataclasses.field(default_factory=dict)
    """Per method, the transient bytes of one round beyond its state and the clients in
    flight (:meth:`fedrnd.algorithms.Algorithm.round_bytes`: a gossip method's second stack
    of models and one edge chunk of messages). Methods run one after another: the largest
    counts."""

    @property
    def fixed(self) -> int:
        """Bytes that do not depend on the chunk size."""
        return (self.data + sum(self.states.values()) + max(self.histories.values(), default=0)
                + max(self.rounds.values(), default=0))

    def total(self, chunk: int | None = None) -> int:
        c = min(self.chunk if chunk is None else chunk, self.in_flight)
        return self.fixed + c * self.per_client

    def with_chunk(self, chunk: int) -> MemoryPlan:
        """The same plan running ``chunk`` clients at a time (at most :attr:`max_chunk`)."""
        cap = self.max_chunk or int(chunk)
        return dataclasses.replace(self, chunk=max(1, min(int(chunk), cap)))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["total"] = self.total()
        return out

    def describe(self) -> str:
        states = ", ".join(f"{k} {v / MiB:.1f}" for k, v in self.states.items())
        head = (f"memory per device: data {self.data / MiB:.1f} MiB, states ({states}) MiB, "
                f"block history {max(self.histories.values(), default=0) / MiB:.1f} MiB, "
                + (f"round working set {max(self.rounds.values()) / MiB:.1f} MiB, "
                   if any(self.rounds.values()) else "")
                + f"{self.per_client / MiB:.2f} MiB per client in flight ({self.working}) "
                f"x chunk {self.chunk} "
                f"= {self.total() / MiB:.1f} MiB")
        if self.budget is None:
            return f"{head}; {self.source}"
        cap = "" if self.max_chunk is None else f", largest chunk that fits {self.max_chunk}"
        return f"{head} of {self.budget / MiB:.1f} MiB available ({self.source}{cap})"


def plan(data: FederatedData | DriftingData, engine: Engine, hp: ClientHParams,
         states: dict[str, PyTree], histories: dict[str, int] | None = None, *,
         shards: int = 1, in_flight: int | None = None, preferred_chunk: int,
         explicit_chunk: bool = False, budget: int | None = None, source: str = "",
         eval_batch: int = 0, headroom: float = HEADROOM, refine: bool = True,
         rounds: dict[str, int] | None = None) -> MemoryPlan:
    """Check a run against ``budget`` bytes per device and pick its chunk size.

    Args:
      data: the built (not yet placed) data; its shapes are what gets placed.
      engine, hp: the client engine and hyperparameters (for the per-client working set).
      states: per method, its state or an abstract template (``ShapeDtypeStruct`` leaves).
      histories: per method, bytes of one block's metrics (see :func:`history_bytes`).
      rounds: per method, a round's transient bytes beyond state and clients in flight
        (:meth:`fedrnd.algorithms.Algorithm.round_bytes`).
      shards: devices the client axis is split over.
      in_flight: clients one device processes per program (``ceil(C / shards)``, or the
        cohort's share); chunks beyond it change nothing.
      preferred_chunk: the chunk size the run would use (config, autotuned or default).
      explicit_chunk: the config set ``chunk_size``: refuse instead of shrinking it.
      refine: when the traced per-client bound would lower the chunk or refuse the run,
        measure the working set with XLA's buffer assignment (:func:`xla_per_client_bytes`,
        two compilations) and decide on that figure instead.
    Raises:
      ValueError: the run does not fit even one client at a time, or ``chunk_size`` is set
        above the largest chunk that fits; the message names every figure.
    """
    phases = data if isinstance(data, DriftingData) else DriftingData.static(data)
    first = phases.initial
    c = first.num_clients
    in_flight = in_flight or math.ceil(c / shards)
    work = per_client_bytes(engine, first, hp, eval_batch)
    p = MemoryPlan(budget=budget, source=source, shards=shards, data=data_bytes(phases, shards),
                   states={k: state_bytes(v, shards) for k, v in states.items()},
                   histories=dict(histories or {}), per_client=max(work.values()),
                   in_flight=max(1, in_flight), chunk=max(1, preferred_chunk), max_chunk=None,
                   rounds=dict(rounds or {}))
    if budget is None:
        return p
    usable = int(budget * (1.0 - headroom))
    fit = (usable - p.fixed) // max(p.per_client, 1)
    if refine and fit < min(preferred_chunk, p.in_flight):
        # The loose bound constrains the run: ask XLA for the real figure before acting on it.
        exact = xla_per_client_bytes(engine, first, hp, eval_batch)
        if exact is not None:
            p = dataclasses.replace(p, per_client=max(exact.values()),
                                    working="XLA buffer assignment")
            fit = (usable - p.fixed) // max(p.per_client, 1)
    figures = (f"data {p.data / MiB:.1f} MiB + method states "
               f"{sum(p.states.values()) / MiB:.1f} MiB ({', '.join(f'{k} {v / MiB:.1f}' for k, v in p.states.items())}) "
               f"+ block history {max(p.histories.values(), default=0) / MiB:.1f} MiB + "
               f"round working set {max(p.rounds.values(), default=0) / MiB:.1f} MiB + "
               f"{p.per_client / MiB:.2f} MiB per client in flight ({p.working}); "
               f"{budget / MiB:.1f} MiB available per device ({source}), "
               f"{usable / MiB:.1f} MiB usable after {headroom:.0%} headroom")
    if fit < 1:
        raise ValueError(
            f"memory: this run needs {p.total(1) / MiB:.1f} MiB per device with one client "
            f"at a time: {figures}. Use fewer clients or a smaller model, spread the clients "
            "over more devices (num_devices, or more hosts), set eval_batch, or set "
            "memory_limit if the available figure is wrong ('off' skips the check)")
    fit = int(min(fit, p.in_flight))
    if explicit_chunk and min(preferred_chunk, p.in_flight) > fit:
        raise ValueError(
            f"memory: chunk_size = {preferred_chunk} needs "
            f"{p.total(preferred_chunk) / MiB:.1f} MiB per device: {figures}. The largest "
            f"chunk size that fits is {fit}; set chunk_size <= {fit} or leave it unset")
    # Lowered only when memory requires it: a preferred chunk above the clients in flight
    # (an accelerator's default with few clients) is kept, evaluation runs all clients with it.
    chunk = preferred_chunk if min(preferred_chunk, p.in_flight) <= fit else fit
    return dataclasses.replace(p, chunk=max(1, chunk), max_chunk=fit)


def history_bytes(alg: Any, state: PyTree, data: FederatedData, block: int) -> int:
    """Bytes of the metrics one jitted block of ``block`` rounds returns (traced, not run)."""
    metrics = jax.eval_shape(lambda s, d, k: alg.round(s, d, k)[1], state, data,
                             jax.random.key(0))
    return tree_bytes(metrics) * int(block)


def longest_block(stops: Sequence[int]) -> int:
    """The most rounds between two host stops (``stops`` sorted, starting after round 0)."""
    prev, most = 0, 1
    for s in stops:
        most, prev = max(most, s - prev), s
    return most
