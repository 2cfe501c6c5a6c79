"""Federated data: one shared pool of examples plus per-client index arrays.

A federated data set never copies an example per client. All examples live once in a pool
``x: [P, ...]`` / ``y: [P]``; client ``c`` owns ``train_idx[c, :train_count[c]]`` (rows into the
pool), padded with zeros to a common ``N_max`` so every per-client array has a static shape and
a leading client axis. Memory therefore grows with the data set, not with ``C x N_max``.

Group-wise transforms (a rotation or an additive pattern per hidden group) are materialised
once per (example, group) pair that some client actually uses, so a test example shared by
clients of two groups exists twice in the pool, transformed each way, and nothing else is
duplicated.

Bad input fails with one message naming the culprit: a malformed source by its first bad row
(:func:`check_dataset`, on construction), a federation by client and example
(:func:`check_federated`: what :func:`build_federated` checks, callable on data built any way).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

if TYPE_CHECKING:
    from fedrnd.data.drift import DriftingData

GroupTransform = Callable[[np.ndarray, int], np.ndarray]
"""``transform(x_rows, group) -> x_rows``: applied on the host, once per group."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A centralised data set as plain numpy arrays (what a *source* returns).

    Attributes:
      x_train: ``[n, *feature_shape]`` float32 (images as ``[n, H, W, C]`` in [0, 1]); token
        ids (text, e.g. LEAF Shakespeare) may be int32, kept as exact float32 values in the pool.
      y_train: ``[n]`` int32 labels in ``[0, num_classes)``.
      x_test, y_test: the held-out pool, same layout.
      num_classes: number of label values.
      name: the source's name.
      train_client, test_client: optional ``[n]`` int arrays giving a *natural* client for each
        example (generators such as LEAF Synthetic produce data per client, LEAF's FEMNIST
        and Shakespeare come per writer / role); used by the ``natural`` partitioner.
      client_group: optional ``[num_natural_clients]`` ground-truth group per natural client.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str
    train_client: np.ndarray | None = None
    test_client: np.ndarray | None = None
    client_group: np.ndarray | None = None

    def __post_init__(self):
        # Checked here, not only in build_federated: partitioners index labels and rows first,
        # and a bad custom data set would otherwise fail inside one as a shape error.
        check_dataset(self)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def check_dataset(dataset: Dataset) -> None:
    """Raise ``ValueError`` (naming the data set and the first bad row) for a malformed source.

    Checks what partitioners and :func:`build_federated` rely on: ``x`` and ``y`` of each
    split have one row per example, train and test share a feature shape, labels are integers
    in ``[0, num_classes)``, and the optional natural-client arrays have one entry per example.
    Features are checked for NaN/inf later, on the rows clients use (:func:`check_federated`).
    Costs one pass over the labels; the features are not read.
    """
    name = f"data set {dataset.name!r}"
    k = dataset.num_classes
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"{name}: num_classes must be an integer >= 1, got {k!r}")
    shapes = {}
    for split in ("train", "test"):
        x, y = getattr(dataset, f"x_{split}"), getattr(dataset, f"y_{split}")
        xs, ys = np.shape(x), np.shape(y)
        if len(xs) < 1:
            raise ValueError(f"{name}: x_{split} must be [n, *feature_shape], got shape {xs}")
        if ys != (xs[0],):
            raise ValueError(f"{name}: x_{split} has {xs[0]} rows but y_{split} has shape {ys}; "
                             f"give one label per example (y_{split} of shape ({xs[0]},))")
        shapes[split] = tuple(xs[1:])
        bad = _bad_labels(np.asarray(y), int(k))
        if bad.size:
            row = int(bad[0])
            raise ValueError(f"{name}: y_{split}[{row}] = {np.asarray(y)[row].item()} is not a class "
                             f"in [0, num_classes={k}); labels must be integers 0..{k - 1}")
    if shapes["test"] != shapes["train"]:
        raise ValueError(f"{name}: x_train has feature shape {shapes['train']} but x_test has "
                         f"{shapes['test']}; both splits need the same feature shape")
    for split in ("train", "test"):
        nat = getattr(dataset, f"{split}_client")
        n = np.shape(getattr(dataset, f"x_{split}"))[0]
        if nat is not None and np.shape(nat) != (n,):
            raise ValueError(f"{name}: {split}_client has shape {np.shape(nat)}, expected ({n},) "
                             f"(one natural client id per row of x_{split})")


def _bad_labels(y: np.ndarray, num_classes: int) -> np.ndarray:
    """Positions of labels that are not integers in ``[0, num_classes)`` (sorted)."""
    if y.size == 0:
        return np.zeros(0, np.int64)
    if np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
        if y.min() >= 0 and y.max() < num_classes:  # the common case: two reductions
            return np.zeros(0, np.int64)
        return np.flatnonzero((y < 0) | (y >= num_classes))
    if np.issubdtype(y.dtype, np.floating):  # NaN fails every comparison, so it is caught
        return np.flatnonzero(~((y >= 0) & (y < num_classes) & (y == np.floor(y))))
    return np.arange(y.size)


@dataclasses.dataclass(frozen=True)
class Partition:
    """How a data set is split over clients (what a *partitioner* returns).

    Attributes:
      train: one int array per client: rows of ``x_train`` that client owns.
      test: one int array per client: rows of ``x_test`` in its held-out split.
      group: ``[C]`` ground-truth group id per client (all zeros when there is no structure).
      transform: optional host-side ``transform(x_rows, group)``, applied to every row a
        client of that group sees (train and test). ``None`` means the identity.
      label_map: optional ``[G, num_classes]`` int array: a client of group ``g`` sees label
        ``label_map[g, y]`` (concept shift such as label permutation). ``None``: labels as is.
      name: a short description, e.g. ``"rotation(k=4)+dirichlet(alpha=0.5)"``.
    """

    train: Sequence[np.ndarray]
    test: Sequence[np.ndarray]
    group: np.ndarray
    transform: GroupTransform | None = None
    name: str = ""
    label_map: np.ndarray | None = None

    @property
    def num_clients(self) -> int:
        return len(self.train)

    @property
    def per_group(self) -> bool:
        """Whether rows are materialised once per group (a transform or a label map is set)."""
        return self.transform is not None or self.label_map is not None


@struct.dataclass
class FederatedData:
    """Device-resident federated data set with a leading client axis (a pytree).

    Shapes (``C`` clients, ``P`` pool rows, ``N``/``T`` padded train/test sizes):
      x: ``[P, *feature_shape]`` float32, the shared pool (train and test rows).
      y: ``[P]`` int32.
      train_idx: ``[C, N]`` int32 rows into the pool, valid for ``j < train_count[c]``.
      train_count: ``[C]`` int32.
      test_idx: ``[C, T]`` int32, valid for ``j < test_count[c]``.
      test_count: ``[C]`` int32.
      group: ``[C]`` int32 ground-truth group (for evaluation only; algorithms must not read it).
    """

    x: jax.Array
    y: jax.Array
    train_idx: jax.Array
    train_count: jax.Array
    test_idx: jax.Array
    test_count: jax.Array
    group: jax.Array
    num_classes: int = struct.field(pytree_node=False, default=0)
    name: str = struct.field(pytree_node=False, default="")

    @property
    def num_clients(self) -> int:
        return int(self.train_idx.shape[0])

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def max_train(self) -> int:
        return int(self.train_idx.shape[1])

    @property
    def max_test(self) -> int:
        return int(self.test_idx.shape[1])

    @property
    def num_groups(self) -> int:
        return int(np.max(np.asarray(self.group))) + 1

    def client_arrays(self) -> dict[str, jax.Array]:
        """The per-client leaves (leading axis ``C``), e.g. for gathering a cohort."""
        return dict(
            train_idx=self.train_idx,
            train_count=self.train_count,
            test_idx=self.test_idx,
            test_count=self.test_count,
            group=self.group,
        )

    def select(self, clients: jax.Array) -> FederatedData:
        """The same pool with only ``clients`` (an int array) on the client axis."""
        return self.replace(**{k: v[clients] for k, v in self.client_arrays().items()})

    def nbytes(self) -> int:
        return int(sum(np.asarray(v).nbytes if not isinstance(v, jax.Array) else v.nbytes
                       for v in jax.tree_util.tree_leaves(self)))


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------

_SHOW = 10  # client ids named in a message before "..."


def id_list(ids: np.ndarray) -> str:
    """``"[3, 7]"``; a long list as its first ten ids and ``...``, so a message stays short."""
    head = ", ".join(str(int(i)) for i in ids[:_SHOW])
    return f"[{head}, ...]" if ids.size > _SHOW else f"[{head}]"


def _empty_message(where: str, empty: np.ndarray, num_clients: int) -> str:
    """The one message for clients without training examples (data checks and RND alike)."""
    return (f"{where}: client(s) {id_list(empty)} have no training examples ({empty.size} of "
            f"{num_clients} clients are empty); every client needs at least one (use fewer "
            "clients or a partition with a minimum size)")


def _bad_pool_rows(x: jax.Array | np.ndarray) -> np.ndarray:
    """Sorted pool rows with a NaN or inf feature.

    One reduction per row (a row's sum is non-finite when any entry is), computed where ``x``
    lives, so the pool is neither copied to the host nor expanded to a boolean array of its
    own size; rows whose sum only overflowed are then re-checked entry by entry.
    """
    p = int(x.shape[0])
    if p == 0 or np.issubdtype(np.dtype(x.dtype), np.integer) or x.dtype == np.bool_:
        return np.zeros(0, np.int64)
    flat = x.reshape(p, -1)
    if isinstance(x, jax.Array):
        sums = jnp.sum(flat, axis=1)
    else:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is what we look for
            sums = np.sum(flat, axis=1)
    suspect = np.flatnonzero(~np.isfinite(np.asarray(sums)))
    if suspect.size == 0:
        return suspect
    rows = np.asarray(flat[suspect])
    return suspect[~np.all(np.isfinite(rows), axis=1)]


def _first_hit(hit: np.ndarray) -> tuple[int, int]:
    """(client, example) of the first True in a ``[C, N]`` mask (lowest client, then example)."""
    c, j = np.unravel_index(int(np.argmax(hit)), hit.shape)
    return int(c), int(j)


def _check_phase(data: FederatedData, where: str, labels: bool, bad_x: np.ndarray,
                 row_name: Callable[[int, str], str]) -> None:
    """:func:`check_federated` on one :class:`FederatedData`, given its pool's bad rows."""
    p = int(data.x.shape[0])
    tr_idx = np.asarray(data.train_idx)
    if tr_idx.ndim != 2:
        raise ValueError(f"{where}: train_idx must be [clients, max_train], got shape "
                         f"{tr_idx.shape}")
    c = tr_idx.shape[0]
    if c < 1:
        raise ValueError(f"{where}: there are no clients (train_idx has shape {tr_idx.shape})")
    if np.shape(data.group) != (c,):
        raise ValueError(f"{where}: group has shape {np.shape(data.group)}, expected ({c},) "
                         "(one ground-truth group per client)")
    used = {}  # split -> (index rows, valid mask)
    for split in ("train", "test"):
        idx = tr_idx if split == "train" else np.asarray(data.test_idx)
        cnt = np.asarray(getattr(data, f"{split}_count"))
        if idx.ndim != 2 or idx.shape[0] != c:
            raise ValueError(f"{where}: {split}_idx has shape {idx.shape}, expected ({c}, N) "
                             f"(one row of pool indices per client)")
        if cnt.shape != (c,):
            raise ValueError(f"{where}: {split}_count has shape {cnt.shape}, expected ({c},)")
        w = idx.shape[1]
        over = np.flatnonzero((cnt < 0) | (cnt > w))
        if over.size:
            i = int(over[0])
            raise ValueError(f"{where}: client {i} has {split}_count {int(cnt[i])} but its "
                             f"{split}_idx row holds {w} examples; counts must be in [0, {w}] "
                             f"({over.size} client(s) affected: {id_list(over)})")
        valid = np.arange(w)[None, :] < cnt[:, None]
        out = valid & ((idx < 0) | (idx >= p))
        if out.any():
            i, j = _first_hit(out)
            raise ValueError(f"{where}: client {i}, {split} example {j} points to pool row "
                             f"{int(idx[i, j])}, outside the pool [0, {p}) "
                             f"({int(out.sum())} such entries)")
        used[split] = idx, valid
    empty = np.flatnonzero(np.asarray(data.train_count) < 1)
    if empty.size:
        raise ValueError(_empty_message(where, empty, c))
    if labels:
        k = data.num_classes
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"{where}: num_classes must be an integer >= 1, got {k!r}")
        y = np.asarray(data.y)
        if y.shape != (p,):
            raise ValueError(f"{where}: y has shape {y.shape} but the pool x has {p} rows; "
                             f"give one label per pool row (shape ({p},))")
        bad_y = _bad_labels(y, int(k))
    else:
        bad_y = np.zeros(0, np.int64)
    for bad, what in ((bad_x, "x"), (bad_y, "y")):
        if bad.size == 0:
            continue
        mark = np.zeros(p, bool)
        mark[bad] = True
        hits = {s: valid & mark[np.clip(idx, 0, p - 1)] for s, (idx, valid) in used.items()}
        found = [(s, *_first_hit(h)) for s, h in hits.items() if h.any()]
        if not found:
            continue  # only rows no client uses (e.g. padding targets): harmless
        split, i, j = min(found, key=lambda f: (f[1], f[0] == "test"))
        r = int(used[split][0][i, j])
        n_ex = sum(int(h.sum()) for h in hits.values())
        n_cl = int((np.any(hits["train"], 1) | np.any(hits["test"], 1)).sum())
        at = f"{where}: client {i}, {split} example {j} ({row_name(r, what)})"
        if what == "x":
            kind = "NaN" if np.isnan(np.asarray(data.x[r])).any() else "inf"
            raise ValueError(
                f"{at} has {kind} features; {n_ex} example(s) on {n_cl} client(s) have "
                "non-finite (NaN/inf) features; clean or drop them (e.g. np.nan_to_num, or "
                "leave those rows out of the partition) before training")
        raise ValueError(
            f"{at} has label {np.asarray(data.y)[r].item()}, outside [0, num_classes="
            f"{data.num_classes}); {n_ex} example(s) on {n_cl} client(s) have such labels")


def check_federated(data: FederatedData | DriftingData, where: str = "data", *,
                    labels: bool = True) -> None:
    """Raise ``ValueError`` naming the client and the example if ``data`` can not be trained on.

    The checks the CLI's data path makes, for data built any way (by hand, by a custom
    pipeline): index rows and counts agree (``count <= N``, indices inside the pool), every
    client has a training example, no example a client uses (train or test) has a NaN or inf
    feature, and (with ``labels``) every label a client uses is in ``[0, num_classes)``.
    Padding entries beyond a client's count and pool rows no client uses are ignored.
    Messages index clients and examples from 0: ``client 2, train example 2 (pool row 9)`` is
    the third valid entry of ``train_idx[2]``, pointing at ``x[9]``.

    Vectorised over clients; the pool is reduced once, where it lives (see
    :func:`_bad_pool_rows`), and only bad rows are mapped back to clients. A
    :class:`~fedrnd.data.drift.DriftingData` is checked phase by phase (its phases share one
    pool, reduced once), the message naming the phase.

    Args:
      where: how the message names the data (e.g. ``"newcomers"``).
      labels: also check the labels (off for label-free uses such as RND discovery).
    """
    from fedrnd.data.drift import DriftingData  # drift builds on this module

    if isinstance(data, DriftingData):
        k = len(data.phases)
        phases = [(_phase_name(where, i, s, k), d)
                  for i, (s, d) in enumerate(zip(data.starts, data.phases, strict=True))]
    elif isinstance(data, FederatedData):
        phases = [(where, data)]
    else:
        raise TypeError(f"{where}: expected FederatedData or DriftingData, got "
                        f"{type(data).__name__}")
    _check_all(phases, labels, lambda r, _: f"pool row {r}")


def _phase_name(where: str, phase: int, start: int, num_phases: int) -> str:
    """``where`` for one phase of drifting data: ``"data, phase 1 (after round 3)"``."""
    if num_phases == 1:
        return where
    return f"{where}, phase {phase} ({f'after round {start}' if phase else 'from the start'})"


def _check_all(phases: Sequence[tuple[str, FederatedData]], labels: bool,
               row_name: Callable[[int, str], str]) -> None:
    """Check ``(where, data)`` phases; ``row_name(pool_row, "x" or "y")`` names a bad row."""
    first = phases[0][1]
    if np.ndim(first.x) < 1:
        raise ValueError(f"{phases[0][0]}: x must be [pool rows, *feature_shape], got shape "
                         f"{np.shape(first.x)}")
    bad_x = _bad_pool_rows(first.x)
    for where, d in phases:
        # Phases of DriftingData share the pool; anything else is reduced on its own.
        _check_phase(d, where, labels, bad_x if d.x is first.x else _bad_pool_rows(d.x),
                     row_name)


def _pad(rows: Sequence[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
    out = np.zeros((len(rows), max(width, 1)), np.int32)
    counts = np.zeros(len(rows), np.int32)
    for c, r in enumerate(rows):
        out[c, : len(r)] = r
        counts[c] = len(r)
    return out, counts


def estimate_bytes(dataset: Dataset, partition: Partition) -> int:
    """Bytes :func:`build_federated` will allocate, computed before allocating anything."""
    row = int(np.prod(dataset.feature_shape)) * 4 + 4
    c = partition.num_clients
    n = max((len(r) for r in partition.train), default=0)
    t = max((len(r) for r in partition.test), default=0)
    pairs = _used_pairs(partition, dataset.x_train.shape[0])[0].shape[0]
    return pairs * row + c * (n + t) * 4 + 3 * c * 4


def _used_pairs(partition: Partition, n_train: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique ``(group, row)`` pairs used by any client.

    ``row`` indexes the concatenation of the train and test pools (test rows offset by
    ``n_train``). Without a transform every group shares one copy, so ``group`` is 0.
    """
    rows, groups = [], []
    for c in range(partition.num_clients):
        r = np.concatenate([np.asarray(partition.train[c], np.int64),
                            np.asarray(partition.test[c], np.int64) + n_train])
        rows.append(r)
        g = int(partition.group[c]) if partition.per_group else 0
        groups.append(np.full(r.shape, g, np.int64))
    if not rows:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.int64)
    pairs = np.unique(np.stack([np.concatenate(groups), np.concatenate(rows)], 1), axis=0)
    return pairs, np.asarray(partition.group, np.int64)


def build_federated(dataset: Dataset, partition: Partition) -> FederatedData:
    """Materialise ``partition`` of ``dataset`` as a :class:`FederatedData` (host -> device).

    Raises ``ValueError`` naming the problem for a malformed data set (:func:`check_dataset`),
    empty clients, out-of-range indices, and, naming the client, the example and the source
    row, labels outside ``[0, num_classes)`` (also after a label map) or non-finite features
    (also after a transform) on any row a client uses (:func:`check_federated`).
    """
    where = _check_partition(dataset, partition)
    host, row_name = _materialise(dataset, partition)
    # Checked on the host arrays, before they go to the device.
    _check_all([(where, host)], True, row_name)
    return _to_device(host)


def _check_partition(dataset: Dataset, partition: Partition) -> str:
    """Raise ``ValueError`` for a partition that can not be built; return how to name it.

    Checks the data set (:func:`check_dataset`), the group vector, empty clients and index
    ranges, before anything is allocated.
    """
    check_dataset(dataset)  # again: the arrays may have been changed in place since
    where = f"data set {dataset.name!r}" + (f", partition {partition.name!r}"
                                             if partition.name else "")
    c = partition.num_clients
    if c < 1:
        raise ValueError("partition has no clients")
    n_train = dataset.x_train.shape[0]
    n_test = dataset.x_test.shape[0]
    group = np.asarray(partition.group)
    if group.shape != (c,):
        raise ValueError(f"partition.group has shape {group.shape}, expected ({c},)")
    if len(partition.test) != c:
        raise ValueError(f"partition has {c} train lists but {len(partition.test)} test lists")
    empty = np.flatnonzero(np.array([len(r) for r in partition.train]) == 0)
    if empty.size:
        raise ValueError(_empty_message(where, empty, c))
    for i, (tr, te) in enumerate(zip(partition.train, partition.test, strict=True)):
        if len(tr) and (np.min(tr) < 0 or np.max(tr) >= n_train):
            raise ValueError(f"client {i}: train index out of range [0, {n_train})")
        if len(te) and (np.min(te) < 0 or np.max(te) >= n_test):
            raise ValueError(f"client {i}: test index out of range [0, {n_test})")
    return where


def _materialise(dataset: Dataset, partition: Partition
                ) -> tuple[FederatedData, Callable[[int, str], str]]:
    """The federation as host (numpy) arrays, and ``row_name(pool_row, "x" | "y")``.

    ``row_name`` names a pool row as the source row it came from (and the group whose
    transform / label map made it, when there is one), for messages about bad rows.
    Unchecked: call :func:`_check_partition` first, :func:`check_federated`'s checks after.
    """
    c = partition.num_clients
    n_train = dataset.x_train.shape[0]
    n_test = dataset.x_test.shape[0]
    group = np.asarray(partition.group, np.int32)

    pairs, _ = _used_pairs(partition, n_train)
    pair_group, pair_row = pairs[:, 0], pairs[:, 1]
    x_all_rows = np.empty((len(pairs), *dataset.feature_shape), np.float32)
    y_all = np.empty(len(pairs), np.int32)
    is_test = pair_row >= n_train
    x_all_rows[~is_test] = dataset.x_train[pair_row[~is_test]]
    x_all_rows[is_test] = dataset.x_test[pair_row[is_test] - n_train]
    y_all[~is_test] = dataset.y_train[pair_row[~is_test]]
    y_all[is_test] = dataset.y_test[pair_row[is_test] - n_train]
    if partition.transform is not None:
        for g in np.unique(pair_group):
            sel = pair_group == g
            x_all_rows[sel] = partition.transform(x_all_rows[sel], int(g))
    if partition.label_map is not None:
        lm = np.asarray(partition.label_map)
        if lm.ndim != 2 or lm.shape[0] <= int(group.max()) or lm.shape[1] != dataset.num_classes:
            raise ValueError(f"partition.label_map must have shape [groups, {dataset.num_classes}]"
                             f", got {lm.shape}")
        y_all = lm[pair_group, y_all].astype(np.int32)
    # Map (group, global row) -> pool position by binary search in the sorted unique pairs.
    span = n_train + n_test
    code = pair_group * span + pair_row

    def lookup(rows: np.ndarray, g: int, offset: int) -> np.ndarray:
        gg = g if partition.per_group else 0
        return np.searchsorted(code, gg * span + np.asarray(rows, np.int64) + offset).astype(np.int32)

    train_rows = [lookup(partition.train[i], int(group[i]), 0) for i in range(c)]
    test_rows = [lookup(partition.test[i], int(group[i]), n_train) for i in range(c)]
    train_idx, train_count = _pad(train_rows, max(len(r) for r in train_rows))
    test_idx, test_count = _pad(test_rows, max((len(r) for r in test_rows), default=1))
    name = f"{dataset.name}/{partition.name}" if partition.name else dataset.name
    host = FederatedData(x=x_all_rows, y=y_all, train_idx=train_idx, train_count=train_count,
                         test_idx=test_idx, test_count=test_count, group=group,
                         num_classes=int(dataset.num_classes), name=name)

    def row_name(r: int, what: str) -> str:
        split, row = ("train", pair_row[r]) if pair_row[r] < n_train else \
            ("test", pair_row[r] - n_train)
        g = f", as seen by group {pair_group[r]}" if partition.per_group else ""
        return f"{what}_{split}[{row}]{g}"

    return host, row_name


def _to_device(host: FederatedData) -> FederatedData:
    """``host`` with every array leaf on the default device."""
    return jax.tree.map(jnp.asarray, host)
