"""The interface every federated method implements.

An algorithm is a frozen dataclass (static configuration, hashable so it can be closed over by
``jax.jit``) with pure functions of arrays:

- ``init(key, data, hp) -> state``: the state is a dict of arrays (:data:`State`);
  ``state["clients"]`` holds the per-client leaves (leading axis ``C``, sharded across devices),
  everything else is replicated. :class:`MethodState` lists the keys with a meaning outside the
  method; the rest of the state is the method's own business.
- ``init_template(key, data, hp) -> state`` of ``jax.ShapeDtypeStruct``: ``init``'s structure
  without its work, what a resumed run restores its checkpoint into. The default traces
  ``init`` abstractly; a method whose ``init`` does host-side work (RND discovery) overrides it.
- ``round(state, data, key) -> (state, metrics)``: one communication round, jitted by the driver
  (possibly several rounds in one ``lax.scan``). ``metrics`` holds scalars and the ledger entries
  ``up/<kind>``, ``down/<kind>``: bytes per client ``[C]`` this round.
- ``models(state) -> (slots, assign)``: the models clients are evaluated with: leaves ``[K, ...]``
  and ``assign: [C]`` (client -> slot), or ``(per_client_params, None)`` for personalised models.
- ``host_hook(state, data, round) -> state`` runs on the host between jitted blocks, every
  ``hook_every`` rounds, for steps that are inherently host-side (a hierarchical clustering of a
  small matrix, a graph redraw). The default does nothing.
- ``report(state, data) -> Report`` runs once at the end of a run, on the host: its
  ``scalars`` are extra summary figures (they go into ``final.json``), its ``artifacts`` what
  the method found (a novelty matrix, federations, a graph) as data, by name. The driver
  decides how to write and plot them, so a method never touches files or plotting libraries
  (and never imports the driver). The default reports nothing.

Options: the dataclass fields after ``engine``, each declared once with :func:`option`
(type from the annotation, default, allowed values, meaning); :meth:`Algorithm.validate` checks
them all generically, and ``fedrnd list`` and the config reference show them from the same
declaration. A method's own ``validate`` adds only checks across options or against the data.

Class attributes (metadata the driver reads, so that it holds no method names):
``clusters_clients``, ``input_only``, ``clusters_in_round``, ``finetune_baseline``,
``family`` (:func:`method_family`).

What the driver reads of a method, in one place: the state keys of :class:`MethodState`
(through :func:`split_state`, :func:`join_state` and :func:`cluster_assignment`, never by
string), the round metrics ``train_loss`` (:data:`TRAIN_LOSS`) and the ledger entries
``up/<kind>``, ``down/<kind>`` (:func:`fedrnd.engine.ledger.comm`), the class attributes above,
and what ``models`` and ``report`` return.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, TypedDict

import jax
import jax.numpy as jnp

from fedrnd.algorithms._options import check_options, option
from fedrnd.data.federated import FederatedData
from fedrnd.engine import ClientHParams, Engine, sample_cohort

State = dict[str, Any]
"""A method's state at run time: a dict of arrays (a pytree), its keys the method's choice
except those of :class:`MethodState`. Checkpoints store it as it is, keys included."""
Metrics = dict[str, jax.Array]
"""A round's metrics: scalars (``train_loss``, ...) and ledger entries ``up/<kind>``,
``down/<kind>`` (bytes per client ``[C]``, from :func:`fedrnd.engine.ledger.comm`)."""

# Keys of a method's state with a meaning outside the method (see MethodState, ClientState).
CLIENTS = "clients"
ROUND = "round"
CLUSTER_ID = "cluster_id"
CLIENT_HP = "hp"
PENDING_UP = "pending_up"
PENDING_DOWN = "pending_down"

TRAIN_LOSS = "train_loss"
"""The round metric the driver watches for divergence: the mean local training loss (a scalar
per round; non-finite stops the run)."""


class ClientState(TypedDict, total=False):
    """``state["clients"]``: the per-client part of a method's state.

    Every leaf has the leading axis ``C`` (one row per client); the driver shards this part
    over the devices along the client axis (and the memory planner counts ``C / devices`` rows
    of it per device). A method keeps here whatever it holds per client; these keys have an
    agreed meaning:
    """

    hp: ClientHParams
    """Each client's local optimizer and learning rate, from ``init``'s
    ``hp`` argument."""
    params: Any
    """Per-client (personalised, or per-node in decentralized methods) model parameters,
    leaves ``[C, ...]``."""
    cluster_id: jax.Array
    """``[C]`` int: the cluster (slot) each client belongs to. ``fedrnd run`` reads it for its
    account of the clusters found (sizes, make-up by true group)."""
    pending_up: jax.Array
    """``[C]`` float32: bytes each client sent outside the jitted rounds (host-side discovery in
    ``init`` or a host hook), not yet in the ledger. The next ``round`` reports them as
    ``up/<kind>`` entries and resets them to zero, so host-side traffic lands in the ledger
    (and survives a checkpoint) without the driver knowing about it."""
    pending_down: jax.Array
    """``[C]`` float32: as ``pending_up``, for bytes received."""


class MethodState(TypedDict, total=False):
    """The keys of a method's state that have a meaning outside the method.

    The state itself is a plain dict (:data:`State`) that may hold any other keys (cluster
    slots, a server optimizer state, novelty rows, ...): the driver never looks inside them.
    None of these keys is required; a method that has the thing uses the key:

    - ``clients`` (:data:`CLIENTS`): the per-client part (:class:`ClientState`), sharded over
      devices; everything else in the state is replicated on every device.
    - ``round`` (:data:`ROUND`): int32 scalar, the rounds run so far, by convention advanced by
      ``round`` itself (the driver counts rounds on the host and passes each round's key).

    Checkpoints store the state with these keys as they are, so renaming one would make old
    checkpoints unreadable.
    """

    clients: ClientState
    round: jax.Array


def split_state(state: State) -> tuple[State, ClientState | None]:
    """``(replicated part, per-client part or None)``: how the driver places a state (and the
    memory planner counts it): the second is sharded over the client axis."""
    if not isinstance(state, Mapping) or CLIENTS not in state:
        return state, None
    return {k: v for k, v in state.items() if k != CLIENTS}, state[CLIENTS]


def join_state(rest: State, clients: ClientState | None) -> State:
    """The inverse of :func:`split_state` (the per-client part goes last)."""
    return rest if clients is None else {**rest, CLIENTS: clients}


def method_family(cls: type | Any) -> str:
    """The family of a method class (or instance): its ``family`` when set, else
    ``"clustered"`` for methods that cluster clients and ``"centralized"`` for the rest."""
    cls = cls if isinstance(cls, type) else type(cls)
    family = getattr(cls, "family", None)
    if family:
        return family
    return "clustered" if getattr(cls, "clusters_clients", False) else "centralized"


def cluster_assignment(state: Any) -> jax.Array | None:
    """``state["clients"]["cluster_id"]`` (``[C]``) when the method keeps one, else ``None``."""
    clients = state.get(CLIENTS) if isinstance(state, Mapping) else None
    return clients.get(CLUSTER_ID) if isinstance(clients, Mapping) else None

ARTIFACT_KINDS = ("arrays", "matrix", "graph", "json")


@dataclasses.dataclass(frozen=True)
class Artifact:
    """Something a method found, returned by :meth:`Algorithm.report` under a name; the
    driver writes it into the method's output directory and plots it.

    ``kind`` says what ``data`` is and so how it is written (``<name>`` is its key in the
    report; a key may end in the file's extension, ``clusters.json``, so that two artifacts
    of different kinds can share a stem):

    - ``"arrays"``: named arrays (``{name: array}``), written as ``<name>.npz``;
    - ``"matrix"``: a client x client matrix, ``data[meta.get("matrix", "matrix")]``
      ``[C, C]``, among named arrays: ``<name>.npz`` (all of them; none with
      ``meta["save"] = False``, for a view derived from arrays saved elsewhere) and a heat map
      ``<name>.png`` with the clients ordered by ``data[meta.get("group", "group")]`` when
      present. ``meta``: ``title``, ``label`` (the colour bar), ``xlabel``, ``ylabel``;
    - ``"graph"``: an edge list ``data["u"]``, ``data["v"]`` ``[E]`` (client ids) with node
      or edge arrays (``positions [C, 2]``, ``group [C]``, ...), written as ``<name>.npz``;
    - ``"json"``: plain data (dicts, lists, numbers, strings), written as ``<name>.json``.

    Arrays may be numpy or host-side jax arrays; the driver writes every file atomically.
    """

    kind: str
    data: Any
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in ARTIFACT_KINDS:
            raise ValueError(f"Artifact kind must be one of {ARTIFACT_KINDS}, got {self.kind!r}")
        if self.kind != "json" and not isinstance(self.data, Mapping):
            raise TypeError(f"a {self.kind!r} Artifact holds named arrays (a dict), got "
                            f"{type(self.data).__name__}")
        if self.kind == "graph" and not {"u", "v"} <= set(self.data):
            raise ValueError("a 'graph' Artifact needs its edge list: data['u'] and data['v']")
        if self.kind == "matrix" and self.meta.get("matrix", "matrix") not in self.data:
            key = self.meta.get("matrix", "matrix")
            raise ValueError(f"a 'matrix' Artifact needs data[{key!r}] (meta['matrix'] names "
                             "the array to draw)")


@dataclasses.dataclass
class Report:
    """What :meth:`Algorithm.report` returns: summary figures and artifacts, each by name.

    ``scalars`` go into the method's ``final.json`` (next to accuracy, bytes and times);
    ``artifacts`` become files named after their keys (``novelty`` -> ``novelty.npz``,
    ``novelty.png``; see :class:`Artifact`). A figure and an artifact may share a name
    (``regions``: a count and the regions' graph). A subclass extends its parent's report:
    ``rep = super().report(state, data); rep.scalars[...] = ...; return rep``.
    """

    scalars: dict[str, float] = dataclasses.field(default_factory=dict)
    artifacts: dict[str, Artifact] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """Base class: holds the engine and the cohort size; subclasses add their options."""

    name: ClassVar[str] = "algorithm"
    engine: Engine
    cohort_size: int | None = option(
        None, low=1, doc="Clients sampled per round (unset: the run's ``cohort_size``).")
    hook_every: ClassVar[int | None] = None
    clusters_clients: ClassVar[bool] = False
    """True for methods whose ``models`` assignment is a clustering (scored by ARI/NMI)."""
    input_only: ClassVar[bool] = False
    """True for methods that group clients from their inputs alone (by default): groups that
    differ in their labels only are invisible to them, so ``fedrnd compare`` marks their rows
    on such a split as a negative control."""
    clusters_in_round: ClassVar[bool] = False
    """True for methods that (re)assign clients inside the jitted rounds: their clustering
    cost is part of the round time (``fedrnd compare`` says so in its clustering column)."""
    finetune_baseline: ClassVar[bool] = False
    """True for the method whose fine-tuned evaluation is the usual personalisation baseline
    (FedAvg + fine-tune): ``fedrnd compare`` adds a ``<label>+ft`` row for it when it runs
    with its default options."""
    family: ClassVar[str | None] = None
    """The group of methods whose curves share a figure when a run compares methods of several
    groups (``accuracy_<family>.png``): ``"centralized"`` (one server, one model or one per
    client), ``"clustered"`` (one server, a model per cluster) or ``"decentralized"`` (no
    server: gossip over a graph), or a plug-in's own word. Unset, it follows
    ``clusters_clients``; read it with :func:`method_family`."""

    def init(self, key: jax.Array, data: FederatedData, hp: ClientHParams) -> State:
        raise NotImplementedError

    def init_template(self, key: jax.Array, data: FederatedData, hp: ClientHParams) -> State:
        """The structure, dtypes and (initial) shapes of ``init``'s state, computing nothing.

        A resumed run restores its checkpoint into this (shapes then come from the checkpoint),
        so ``init``'s expensive work is not redone. The default traces ``init`` with
        ``jax.eval_shape``; an ``init`` that needs concrete values on the host cannot be
        traced and is run for real (correct, but slow: such methods should override this).
        """
        try:
            return jax.eval_shape(self.init, key, data, hp)
        except jax.errors.JAXTypeError:
            return self.init(key, data, hp)

    def round(self, state: State, data: FederatedData, key: jax.Array) -> tuple[State, Metrics]:
        raise NotImplementedError

    def round_bytes(self, template: State, data: FederatedData, shards: int = 1) -> int:
        """Transient bytes per device one round holds beyond its state and the clients in
        flight (the memory planner adds them; :mod:`fedrnd.driver.memory`).

        ``template`` is :meth:`init_template`'s state. The default is 0: a server method's
        round adds a few models per cluster slot, which the headroom covers. Methods whose
        round builds a second stack of per-client models (gossip) override this.
        """
        return 0

    def models(self, state: State) -> tuple[Any, jax.Array | None]:
        raise NotImplementedError

    def host_hook(self, state: State, data: FederatedData, round_idx: int) -> State:
        return state

    def report(self, state: State, data: FederatedData) -> Report:
        """Summary figures and :class:`Artifact` values, once, at the end (host arrays):
        figures go into ``final.json``; the driver writes and plots the artifacts."""
        return Report()

    # Helpers shared by methods.
    def cohort(self, key: jax.Array, num_clients: int) -> tuple[jax.Array | None, jax.Array]:
        """``(ids or None, participating [C] 0/1)`` for this round's cohort."""
        m = self.cohort_size
        if m is None or m >= num_clients:
            return None, jnp.ones((num_clients,), jnp.float32)
        ids = sample_cohort(key, num_clients, m)
        return ids, jnp.zeros((num_clients,), jnp.float32).at[ids].set(1.0)

    def validate(self, data: FederatedData) -> None:
        """Raise ``ValueError`` for settings that cannot work on ``data`` (before compiling):
        here every declared option against its declaration (:func:`option`); a method extends
        this with checks across options or against the data."""
        check_options(self)
