"""Federated data: one shared pool of examples plus per-client index arrays.

A federated data set never copies an example per client. All examples live once in a pool
``x: [P, ...]`` / ``y: [P]``; client ``c`` owns ``train_idx[c, :train_count[c]]`` (rows into the
pool), padded with zeros to a common ``N_max`` so every per-client array has a static shape and
a leading client axis. Memory therefore grows with the data set, not with ``C x N_max``.

Group-wise transforms (a rotation or an additive pattern per hidden group) are materialised
once per (example, group) pair that some client actually uses, so a test example shared by
clients of two groups exists twice in the pool, transformed each way, and nothing else is
duplicated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

GroupTransform = Callable[[np.ndarray, int], np.ndarray]
"""``transform(x_rows, group) -> x_rows``: applied on the host, once per group."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A centralised data set as plain numpy arrays (what a *source* returns).

    Attributes:
      x_train: ``[n, *feature_shape]`` float32 (images as ``[n, H, W, C]`` in [0, 1]).
      y_train: ``[n]`` int32 labels in ``[0, num_classes)``.
      x_test, y_test: the held-out pool, same layout.
      num_classes: number of label values.
      name: the source's name.
      train_client, test_client: optional ``[n]`` int arrays giving a *natural* client for each
        example (generators such as LEAF Synthetic produce data per client); used by the
        ``natural`` partitioner.
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

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


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

    Raises ``ValueError`` naming the problem for empty clients, out-of-range indices, labels
    outside ``[0, num_classes)`` or non-finite features.
    """
    c = partition.num_clients
    if c < 1:
        raise ValueError("partition has no clients")
    n_train = dataset.x_train.shape[0]
    n_test = dataset.x_test.shape[0]
    group = np.asarray(partition.group, np.int32)
    if group.shape != (c,):
        raise ValueError(f"partition.group has shape {group.shape}, expected ({c},)")
    for i, (tr, te) in enumerate(zip(partition.train, partition.test, strict=True)):
        if len(tr) == 0:
            raise ValueError(f"client {i} has no training examples (empty client); "
                             "use fewer clients or a partition with a minimum size")
        if len(tr) and (np.min(tr) < 0 or np.max(tr) >= n_train):
            raise ValueError(f"client {i}: train index out of range [0, {n_train})")
        if len(te) and (np.min(te) < 0 or np.max(te) >= n_test):
            raise ValueError(f"client {i}: test index out of range [0, {n_test})")
    for nm, y in (("y_train", dataset.y_train), ("y_test", dataset.y_test)):
        if y.size and (y.min() < 0 or y.max() >= dataset.num_classes):
            raise ValueError(f"{nm} has labels outside [0, {dataset.num_classes})")

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
    if not np.all(np.isfinite(x_all_rows)):
        raise ValueError(f"data set {dataset.name!r} has non-finite (NaN/inf) features")

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
    return FederatedData(
        x=jnp.asarray(x_all_rows), y=jnp.asarray(y_all),
        train_idx=jnp.asarray(train_idx), train_count=jnp.asarray(train_count),
        test_idx=jnp.asarray(test_idx), test_count=jnp.asarray(test_count),
        group=jnp.asarray(group), num_classes=int(dataset.num_classes),
        name=f"{dataset.name}/{partition.name}" if partition.name else dataset.name,
    )
