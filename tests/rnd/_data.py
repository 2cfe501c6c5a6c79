"""Small federated data sets with known groups for the RND tests (built from numpy arrays)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedrnd.data import Dataset, FederatedData, Partition, build_federated

MAX_GROUPS = 8


def grouped_gaussian(groups: Sequence[int], *, n: int = 40, n_test: int = 10, dim: int = 6,
                     sep: float = 8.0, num_classes: int = 3, group_labels: bool = False,
                     shift_seed: int = 0, seed: int = 0) -> FederatedData:
    """Client ``c`` belongs to group ``groups[c]``: ``x = m_{pi_g(y)} + shift_g + N(0, I)``.

    Group shifts (norm ``sep``) and class means depend on ``shift_seed`` only, so data drawn
    with another ``seed`` (e.g. newcomers) comes from the same group distributions.
    ``group_labels`` gives every group its own label permutation ``pi_g`` (concept shift on
    top of the input shift).
    """
    groups = np.asarray(groups, np.int32)
    rs = np.random.default_rng(shift_seed)
    shift = rs.normal(size=(MAX_GROUPS, dim))
    shift *= sep / np.linalg.norm(shift, axis=1, keepdims=True)
    means = 2.0 * rs.normal(size=(num_classes, dim))
    perms = np.stack([np.arange(num_classes)] + [rs.permutation(num_classes)
                                                 for _ in range(MAX_GROUPS - 1)])
    if not group_labels:
        perms[:] = np.arange(num_classes)
    rng = np.random.default_rng(seed)
    c = len(groups)

    def draw(m):
        g = np.repeat(groups, m)
        y = rng.integers(0, num_classes, c * m)
        x = means[perms[g, y]] + shift[g] + rng.normal(size=(c * m, dim))
        return x.astype(np.float32), y.astype(np.int32)

    x_tr, y_tr = draw(n)
    x_te, y_te = draw(n_test)
    ds = Dataset(x_tr, y_tr, x_te, y_te, num_classes, "grouped_gaussian")
    part = Partition([np.arange(i * n, (i + 1) * n) for i in range(c)],
                     [np.arange(i * n_test, (i + 1) * n_test) for i in range(c)], groups)
    return build_federated(ds, part)


def shuffled_groups(sizes: Sequence[int], seed: int = 0) -> np.ndarray:
    """Group ids with ``sizes[g]`` clients in group ``g``, in a random client order."""
    g = np.repeat(np.arange(len(sizes)), sizes)
    return np.random.default_rng(seed).permutation(g).astype(np.int32)
