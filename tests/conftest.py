"""Shared fixtures (small federated data sets built from random numpy arrays) and the slow
tests kept out of the development lane ``pytest -m "not slow" -n 2``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from fedrnd import compilation_cache
from fedrnd.data import Dataset, FederatedData, Partition, build_federated

# Persistent XLA cache (fedrnd.compilation_cache: $FEDRND_CACHE_DIR, shared by the xdist
# workers and the subprocesses the tests start, with JAX's lock around every read and write):
# repeated test runs, and CI's tests after its docs build, skip most compilation.
compilation_cache.enable(min_compile_secs=0.5)

# Tests that took more than ~20 s each under `pytest -n 2 --durations` on 2 shared CPU cores
# (2026-12-03), marked `slow` here, beside the ones marked in their files: the development
# lane `pytest -m "not slow" -n 2` skips them, CI runs everything. An id without `[...]`
# covers every parametrization. Prefer `@pytest.mark.slow` in the file for new tests.
SLOW_TESTS = {
    "tests/engine/test_sharding.py::test_sharded_simulation_matches_single_device",  # 65 s
    "tests/ntk/test_ntk.py::test_structured_kernel_equals_dense_jjt",  # 31 s
    "tests/ntk/test_ntk.py::test_byte_counts_match_message_array_sizes[False]",  # 28 s
    "tests/ntk/test_ntk.py::test_spark_without_momentum_and_regulariser_is_the_ntk_dfl_update",
    "tests/algorithms/test_decentralized.py::"  # 40 s, four cases
    "test_dfedavg_round_equals_per_node_training_then_dense_gossip",
    "tests/algorithms/test_rnd_dfl.py::test_gossip_stays_within_regions",  # 19 s
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid in SLOW_TESTS or item.nodeid.split("[")[0] in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


def gaussian_federated(counts: Sequence[int], test_counts: Sequence[int] | None = None,
                       dim: int = 4, num_classes: int = 3, sep: float = 1.0,
                       seed: int = 0) -> FederatedData:
    """Clients with disjoint rows of a Gaussian-classes data set (class means scaled by ``sep``).

    Client ``c`` owns ``counts[c]`` train rows and ``test_counts[c]`` test rows (default 5).
    """
    rng = np.random.default_rng(seed)
    counts = [int(n) for n in counts]
    test_counts = [5] * len(counts) if test_counts is None else [int(n) for n in test_counts]
    means = rng.normal(size=(num_classes, dim)) * sep

    def draw(n):
        y = rng.integers(0, num_classes, n).astype(np.int32)
        return (means[y] + rng.normal(size=(n, dim))).astype(np.float32), y

    x_tr, y_tr = draw(sum(counts))
    x_te, y_te = draw(sum(test_counts))
    split = lambda ns: np.split(np.arange(sum(ns)), np.cumsum(ns)[:-1])  # noqa: E731
    ds = Dataset(x_tr, y_tr, x_te, y_te, num_classes, "gauss")
    part = Partition(split(counts), split(test_counts),
                     np.arange(len(counts), dtype=np.int32) % 2)
    return build_federated(ds, part)


@pytest.fixture(scope="session")
def make_federated():
    """Factory fixture: ``make_federated(counts, test_counts=None, dim=4, num_classes=3, ...)``."""
    return gaussian_federated
