"""Data drift: clients that switch hidden group mid-run, on one static data layout.

A drifting data set is a sequence of *phases*: phase 0 is the partition as built, and each
drift event at round ``r`` moves some clients to another group from round ``r + 1`` on (after
``r`` completed rounds). A client that moves keeps its own raw examples (train and test rows)
but from then on sees them through its new group's transform and label map: a rotated camera,
a new sensor offset, a relabelled concept. Only partitions whose groups change the data
(``rotation``, ``feature_pattern``, ``label_permutation``: a per-group transform or label map)
can drift; elsewhere a group is only a label and moving it would change nothing.

All phases share one :class:`~fedrnd.data.federated.FederatedData` layout: the pool holds
every (example, group) pair that any client uses in any phase, and every phase has per-client
index rows of the same padded width, so a jitted round compiled for one phase runs every
phase, and the driver swaps only the per-client arrays (``train_idx``, ``test_idx``, counts,
``group``) at the drift boundary. The ground-truth ``group`` of each phase is the one in
effect, so clustering scores after a drift are measured against the new groups.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from fedrnd.data.federated import (
    Dataset,
    FederatedData,
    Partition,
    _check_all,
    _check_partition,
    _materialise,
    _phase_name,
    _to_device,
)

__all__ = ["DriftEvent", "DriftingData", "build_drifting", "build_phases", "drift_groups"]


@dataclasses.dataclass(frozen=True)
class DriftEvent:
    """One drift: after ``at_round`` rounds, ``clients`` move from ``old_group`` to ``new_group``."""

    at_round: int
    clients: np.ndarray
    old_group: np.ndarray
    new_group: np.ndarray

    def to_dict(self) -> dict:
        return {"at_round": int(self.at_round), "clients": self.clients.tolist(),
                "old_group": self.old_group.tolist(), "new_group": self.new_group.tolist()}


@dataclasses.dataclass(frozen=True)
class DriftingData:
    """Phases of one federated data set, all on the same pool and shapes.

    Attributes:
      phases: one :class:`FederatedData` per phase; every phase shares ``x``/``y`` and has the
        same per-client shapes.
      starts: ``starts[i]`` is the number of completed rounds after which phase ``i`` is in
        effect (``starts[0] == 0``, strictly increasing).
      events: the :class:`DriftEvent` that starts each phase after the first.
    """

    phases: tuple[FederatedData, ...]
    starts: tuple[int, ...] = (0,)
    events: tuple[DriftEvent, ...] = ()

    def __post_init__(self):
        if not self.phases:
            raise ValueError("DriftingData needs at least one phase")
        if len(self.starts) != len(self.phases) or self.starts[0] != 0:
            raise ValueError(f"starts must give one round per phase beginning with 0, got "
                             f"{list(self.starts)} for {len(self.phases)} phases")
        if any(b <= a for a, b in zip(self.starts, self.starts[1:], strict=False)):
            raise ValueError(f"drift rounds must be strictly increasing, got {list(self.starts)}")
        first = self.phases[0]
        for i, p in enumerate(self.phases[1:], 1):
            if p.x is not first.x or p.y is not first.y:
                raise ValueError(f"phase {i} does not share the pool of phase 0")
            for k, v in p.client_arrays().items():
                w = first.client_arrays()[k]
                if v.shape != w.shape or v.dtype != w.dtype:
                    raise ValueError(f"phase {i}: {k} has shape {v.shape} {v.dtype}, phase 0 "
                                     f"has {w.shape} {w.dtype}; phases must share one layout")

    @classmethod
    def static(cls, data: FederatedData) -> DriftingData:
        """Data without drift: one phase."""
        return cls((data,))

    @property
    def initial(self) -> FederatedData:
        return self.phases[0]

    @property
    def drift_rounds(self) -> tuple[int, ...]:
        """Rounds after which the data changes."""
        return self.starts[1:]

    @property
    def num_clients(self) -> int:
        return self.initial.num_clients

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return self.initial.feature_shape

    @property
    def num_classes(self) -> int:
        return self.initial.num_classes

    @property
    def name(self) -> str:
        return self.initial.name

    def phase(self, completed_rounds: int) -> int:
        """Index of the phase in effect for the round after ``completed_rounds`` rounds."""
        if completed_rounds < 0:
            raise ValueError(f"completed_rounds must be >= 0, got {completed_rounds}")
        return bisect.bisect_right(self.starts, completed_rounds) - 1

    def at(self, completed_rounds: int) -> FederatedData:
        """The data the round after ``completed_rounds`` rounds trains on."""
        return self.phases[self.phase(completed_rounds)]

    def map_clients(self, fn: Callable) -> DriftingData:
        """Apply ``fn`` to every phase's per-client arrays (e.g. to shard them over devices)."""
        phases = tuple(p.replace(**{k: fn(v) for k, v in p.client_arrays().items()})
                       for p in self.phases)
        return dataclasses.replace(self, phases=phases)

    def summary(self) -> list[dict]:
        return [e.to_dict() for e in self.events]


def drift_groups(group: np.ndarray, num_groups: int, *, fraction: float | None = None,
                 clients: Sequence[int] | None = None,
                 seed: int | Sequence[int] = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pick clients and a new, different group for each: ``(moved ids, new group [C])``.

    Exactly one of ``fraction`` (that share of all clients, rounded, at least one, drawn
    without replacement) or ``clients`` (explicit ids) says who moves. Each moved client goes
    to a group drawn uniformly from the ``num_groups - 1`` groups other than its own.
    """
    group = np.asarray(group, np.int64)
    c = group.shape[0]
    if not isinstance(num_groups, int | np.integer) or num_groups < 2:
        raise ValueError(f"drift needs at least 2 groups to switch between, got {num_groups!r}")
    if group.size and (group.min() < 0 or group.max() >= num_groups):
        raise ValueError(f"group ids must be in [0, {num_groups})")
    if (fraction is None) == (clients is None):
        raise ValueError("drift: give exactly one of fraction (share of clients that move) "
                         "or clients (their ids)")
    rng = np.random.default_rng(seed)
    if fraction is not None:
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or \
                not 0 < fraction <= 1:
            raise ValueError(f"drift fraction must be in (0, 1], got {fraction!r}")
        m = max(1, int(round(fraction * c)))
        moved = np.sort(rng.choice(c, m, replace=False))
    else:
        moved = np.asarray(list(clients))
        if moved.size == 0 or moved.ndim != 1 or not np.issubdtype(moved.dtype, np.integer):
            raise ValueError(f"drift clients must be a non-empty list of client ids, got "
                             f"{list(clients)!r}")
        if moved.min() < 0 or moved.max() >= c:
            raise ValueError(f"drift clients must be in [0, {c}), got {moved.tolist()}")
        if len(np.unique(moved)) != moved.size:
            raise ValueError(f"drift clients must be distinct, got {moved.tolist()}")
        moved = np.sort(moved)
    new = group.copy()
    new[moved] = (group[moved] + rng.integers(1, num_groups, moved.size)) % num_groups
    return moved.astype(np.int64), new.astype(np.int32)


def _num_groups(partition: Partition) -> int:
    """Groups a partition's transform / label map is defined for."""
    if partition.label_map is not None:
        return int(np.asarray(partition.label_map).shape[0])
    patterns = getattr(partition.transform, "patterns", None)
    if patterns is not None:
        return int(np.asarray(patterns).shape[0])
    return int(np.max(partition.group)) + 1


def build_phases(dataset: Dataset, partition: Partition,
                 schedule: Sequence[tuple[int, np.ndarray]],
                 events: Sequence[DriftEvent] = ()) -> DriftingData:
    """Materialise ``partition`` once per group assignment in ``schedule`` on one pool.

    ``schedule``: ``(at_round, group [C])`` per drift, in increasing round order; each phase
    keeps every client's raw rows and applies the group's transform / label map. Raises
    ``ValueError`` for a partition whose groups do not change the data.
    """
    c = partition.num_clients
    if schedule and not partition.per_group:
        raise ValueError(f"data drift needs a partition whose groups change the data (rotation, "
                         f"feature_pattern, label_permutation); {partition.name or 'this one'!r} "
                         "has no per-group transform or label map")
    groups = [np.asarray(partition.group, np.int32)]
    starts = [0]
    for at, g in schedule:
        g = np.asarray(g, np.int32)
        if g.shape != (c,):
            raise ValueError(f"drift group vector has shape {g.shape}, expected ({c},)")
        if isinstance(at, bool) or not isinstance(at, int | np.integer) or at <= starts[-1]:
            raise ValueError(f"drift rounds must be integers >= 1, strictly increasing; got "
                             f"{at!r} after {starts[-1]}")
        groups.append(g)
        starts.append(int(at))
    k = len(groups)
    # One partition of k * C "virtual" clients (phase p's client i is p * C + i) puts every
    # (example, group) pair of every phase in one pool and pads all index rows alike.
    joint = dataclasses.replace(
        partition, train=list(partition.train) * k, test=list(partition.test) * k,
        group=np.concatenate(groups))
    where = _check_partition(dataset, partition)  # the joint one repeats it k times
    host, row_name = _materialise(dataset, joint)

    def split(full: FederatedData) -> tuple[FederatedData, ...]:
        return tuple(full.replace(**{name: v[p * c:(p + 1) * c]
                                     for name, v in full.client_arrays().items()})
                     for p in range(k))

    # Checked per phase, so a message names the real client and the phase, not joint ids.
    _check_all([(_phase_name(where, p, starts[p], k), d) for p, d in enumerate(split(host))],
               True, row_name)
    return DriftingData(split(_to_device(host)), tuple(starts), tuple(events))


def build_drifting(dataset: Dataset, partition: Partition, at_round: int | Sequence[int], *,
                   fraction: float | None = None, clients: Sequence[int] | None = None,
                   seed: int = 0) -> DriftingData:
    """``partition`` with clients switching group after ``at_round`` rounds (one or several).

    At each drift round, ``fraction`` of the clients (or the given ``clients``) move from their
    current group to a different random one (:func:`drift_groups`, seeded by ``(seed, event)``).
    Their data keeps its raw examples and takes the new group's transform / label map.
    """
    rounds = [at_round] if isinstance(at_round, int | np.integer) else list(at_round)
    if not rounds:
        raise ValueError("drift needs at least one at_round")
    if not partition.per_group:
        # Checked here too, before groups are drawn, for the clearer message.
        build_phases(dataset, partition, [(1, partition.group)])
    num_groups = _num_groups(partition)
    current = np.asarray(partition.group, np.int32)
    schedule, events = [], []
    for e, at in enumerate(rounds):
        moved, new = drift_groups(current, num_groups, fraction=fraction, clients=clients,
                                  seed=(seed, e))
        schedule.append((at, new))
        events.append(DriftEvent(at, moved, current[moved], new[moved]))
        current = new
    return build_phases(dataset, partition, schedule, events)
