"""Data checks of the Python API: check_dataset, check_federated, build_federated, discover.

Known answers on hand-built federations. Messages index clients and examples from 0:
``client 2, train example 2`` is the third valid entry of ``train_idx[2]``.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrnd.data import Dataset, FederatedData, Partition, build_federated
from fedrnd.data.drift import DriftingData, build_phases
from fedrnd.data.federated import check_dataset, check_federated
from fedrnd.rnd import RNDConfig, assign_newcomers, discover
from tests.rnd._data import grouped_gaussian

K = 3  # classes of the hand-built federations


def _hand(x: np.ndarray | None = None, y: np.ndarray | None = None, **over) -> FederatedData:
    """4 clients over a 24-row pool (numpy leaves, as a user would build it by hand).

    Client ``c`` trains on pool rows ``5c .. 5c + count_c - 1`` (counts 5, 3, 4, 2; padding
    entries point at rows ``5c + count_c ..``) and tests on rows 20 + c (client 3: none).
    """
    x = np.arange(48, dtype=np.float32).reshape(24, 2) if x is None else x
    y = (np.arange(24) % K).astype(np.int32) if y is None else y
    arrays = dict(train_idx=np.arange(20, dtype=np.int32).reshape(4, 5),
                  train_count=np.array([5, 3, 4, 2], np.int32),
                  test_idx=np.array([[20], [21], [22], [0]], np.int32),
                  test_count=np.array([1, 1, 1, 0], np.int32),
                  group=np.zeros(4, np.int32))
    arrays.update(over)
    return FederatedData(x=x, y=y, num_classes=K, name="hand", **arrays)


def _x_with(row: int, value: float) -> np.ndarray:
    x = np.arange(48, dtype=np.float32).reshape(24, 2)
    x[row, 1] = value
    return x


def test_valid_federation_passes_on_host_and_device():
    check_federated(_hand())
    check_federated(jax.tree.map(jnp.asarray, _hand()))


def test_nan_in_client_2s_third_training_row():
    # Client 2 trains on rows 10..13; its third (example 2) is pool row 12.
    with pytest.raises(ValueError, match=re.escape(
            "data: client 2, train example 2 (pool row 12) has NaN features; 1 example(s) on "
            "1 client(s) have non-finite")):
        check_federated(_hand(_x_with(12, np.nan)))


def test_inf_in_a_test_row_and_on_device():
    with pytest.raises(ValueError, match=re.escape(
            "client 1, test example 0 (pool row 21) has inf features")):
        check_federated(_hand(jnp.asarray(_x_with(21, -np.inf))))


def test_inf_in_padding_or_unused_rows_is_ignored():
    # Client 3 has count 2: row 18 is padding of its index row; row 23 no client uses;
    # client 3's test index points at row 0 but its test count is 0.
    x = _x_with(18, np.inf)
    x[23] = np.nan
    check_federated(_hand(x))
    check_federated(_hand(_x_with(0, 1.0), test_idx=np.array([[20], [21], [22], [23]],
                                                             np.int32)))


def test_huge_but_finite_features_pass():
    # Row sums overflow float32 (the screen), the entries are finite (the re-check).
    x = np.full((24, 2), 3e38, np.float32)
    check_federated(_hand(x))


def test_empty_clients_named_with_count():
    with pytest.raises(ValueError, match=re.escape(
            "data: client(s) [1] have no training examples (1 of 4 clients are empty)")):
        check_federated(_hand(train_count=np.array([5, 0, 4, 2], np.int32)))
    c = 30
    many = FederatedData(x=np.zeros((4, 2), np.float32), y=np.zeros(4, np.int32),
                         train_idx=np.zeros((c, 2), np.int32),
                         train_count=np.array([2] + [0] * (c - 1), np.int32),
                         test_idx=np.zeros((c, 1), np.int32), test_count=np.zeros(c, np.int32),
                         group=np.zeros(c, np.int32), num_classes=K)
    with pytest.raises(ValueError, match=re.escape(
            "client(s) [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, ...] have no training examples "
            "(29 of 30 clients are empty)")):
        check_federated(many, "newcomers")


def test_labels_equal_to_num_classes():
    y = (np.arange(24) % K).astype(np.int32)
    y[7] = K  # client 1's example 2
    with pytest.raises(ValueError, match=re.escape(
            "client 1, train example 2 (pool row 7) has label 3, outside [0, num_classes=3)")):
        check_federated(_hand(y=y))
    check_federated(_hand(y=y), labels=False)  # RND does not read labels
    y = (np.arange(24) % K).astype(np.int32)
    y[22] = -1
    with pytest.raises(ValueError, match=re.escape(
            "client 2, test example 0 (pool row 22) has label -1")):
        check_federated(_hand(y=y))


def test_inconsistent_counts_and_indices():
    with pytest.raises(ValueError, match=re.escape(
            "client 2 has train_count 6 but its train_idx row holds 5 examples")):
        check_federated(_hand(train_count=np.array([5, 3, 6, 2], np.int32)))
    with pytest.raises(ValueError, match=re.escape(
            "client 0 has test_count -1")):
        check_federated(_hand(test_count=np.array([-1, 1, 1, 0], np.int32)))
    idx = np.arange(20, dtype=np.int32).reshape(4, 5)
    idx[3, 1] = 24
    with pytest.raises(ValueError, match=re.escape(
            "client 3, train example 1 points to pool row 24, outside the pool [0, 24)")):
        check_federated(_hand(train_idx=idx))
    idx[3, 1], idx[3, 4] = 16, 99  # beyond the count of 2: padding, ignored
    check_federated(_hand(train_idx=idx))
    with pytest.raises(ValueError, match=r"train_count has shape \(3,\), expected \(4,\)"):
        check_federated(_hand(train_count=np.array([5, 3, 4], np.int32)))
    with pytest.raises(ValueError, match=r"y has shape \(23,\) but the pool x has 24 rows"):
        check_federated(_hand(y=np.zeros(23, np.int32)))
    with pytest.raises(TypeError, match="expected FederatedData or DriftingData"):
        check_federated("data")


def test_ten_thousand_clients():
    """The check is vectorised: 10,000 clients x 60 examples (just run; no timing assert)."""
    c, n = 10_000, 60
    rng = np.random.default_rng(0)
    x = rng.random((c * n, 4), dtype=np.float32)
    data = FederatedData(x=x, y=rng.integers(0, K, c * n).astype(np.int32),
                         train_idx=np.arange(c * n, dtype=np.int32).reshape(c, n),
                         train_count=rng.integers(1, n + 1, c).astype(np.int32),
                         test_idx=np.zeros((c, 1), np.int32), test_count=np.zeros(c, np.int32),
                         group=np.zeros(c, np.int32), num_classes=K)
    check_federated(data)
    x[n * 9_999] = np.nan
    with pytest.raises(ValueError, match=re.escape(
            f"client 9999, train example 0 (pool row {n * 9_999}) has NaN")):
        check_federated(data)


def test_drifting_data_names_the_phase():
    base = _hand()
    late = base.replace(train_idx=np.array([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9],
                                            [10, 11, 12, 13, 14], [23, 16, 17, 18, 19]],
                                           np.int32))
    x = _x_with(23, np.nan)
    dd = DriftingData((base.replace(x=x), late.replace(x=x)), (0, 3))
    with pytest.raises(ValueError, match=re.escape(
            "data, phase 1 (after round 3): client 3, train example 0 (pool row 23) has NaN")):
        check_federated(dd)
    check_federated(DriftingData.static(base))


# ------------------------------------------------------------------------ the source level


def _source(n_train: int = 12, n_test: int = 4) -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset(rng.random((n_train, 2), dtype=np.float32),
                   (np.arange(n_train) % K).astype(np.int32),
                   rng.random((n_test, 2), dtype=np.float32),
                   (np.arange(n_test) % K).astype(np.int32), K, "custom")


def _two_clients(**kw) -> Partition:
    return Partition([np.arange(0, 6), np.arange(6, 12)], [np.arange(0, 2), np.arange(2, 4)],
                     np.zeros(2, np.int32), **kw)


def test_custom_dataset_out_of_range_label_named_by_row():
    ds = _source()
    check_dataset(ds)
    ds.y_train[7] = K  # changed in place after construction: build_federated checks again
    with pytest.raises(ValueError, match=re.escape(
            "data set 'custom': y_train[7] = 3 is not a class in [0, num_classes=3)")):
        build_federated(ds, _two_clients())
    with pytest.raises(ValueError, match=re.escape("y_test[1] = -2 is not a class")):
        Dataset(ds.x_train, ds.y_train % K, ds.x_test, np.array([0, -2, 1, 0]), K, "custom")
    with pytest.raises(ValueError, match=re.escape("y_train[0] = 0.5 is not a class")):
        Dataset(ds.x_train, ds.y_train / 2 + 0.5, ds.x_test, ds.y_test, K, "custom")


def test_custom_dataset_length_mismatch():
    ds = _source()
    with pytest.raises(ValueError, match=re.escape(
            "data set 'custom': x_train has 12 rows but y_train has shape (10,)")):
        Dataset(ds.x_train, ds.y_train[:10], ds.x_test, ds.y_test, K, "custom")
    with pytest.raises(ValueError, match=re.escape(
            "x_train has feature shape (2,) but x_test has (3,)")):
        Dataset(ds.x_train, ds.y_train, np.zeros((4, 3), np.float32), ds.y_test, K, "custom")
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
        Dataset(ds.x_train, ds.y_train, ds.x_test, ds.y_test, 0, "custom")


def test_build_federated_names_client_and_source_row():
    ds = _source()
    ds.x_train[8, 0] = np.nan  # client 1's example 2
    with pytest.raises(ValueError, match=re.escape(
            "data set 'custom': client 1, train example 2 (x_train[8]) has NaN features")):
        build_federated(ds, _two_clients())
    empty = Partition([np.arange(0, 6), np.arange(0)], [np.arange(2)] * 2, np.zeros(2, np.int32))
    with pytest.raises(ValueError, match=re.escape(
            "client(s) [1] have no training examples (1 of 2 clients are empty)")):
        build_federated(_source(), empty)


def test_drift_phases_name_the_real_client():
    # Group 1's transform breaks client 1's rows; client 1 moves to group 1 after round 2.
    def transform(x, g):
        return np.full_like(x, np.nan) if g == 1 else x

    part = _two_clients(transform=transform, name="broken")
    with pytest.raises(ValueError, match=re.escape(
            "data set 'custom', partition 'broken', phase 1 (after round 2): client 1, train "
            "example 0 (x_train[6], as seen by group 1) has NaN features")):
        build_phases(_source(), part, [(2, np.array([0, 1], np.int32))])


# ----------------------------------------------------------------------------- discovery

SMALL = RNDConfig(network="mlp", target_width=(16,), predictor_width=(4,), out_dim=8,
                  epochs=2, batch_size=8)


@pytest.fixture(scope="module")
def gauss():
    return grouped_gaussian([0, 1, 0, 1, 0], n=12, n_test=4, dim=3, seed=5)


def _with_nan(data: FederatedData, client: int, example: int) -> FederatedData:
    x = np.asarray(data.x).copy()
    x[int(data.train_idx[client, example])] = np.nan
    return data.replace(x=jnp.asarray(x))


def test_discover_rejects_nan_features(gauss):
    with pytest.raises(ValueError, match=re.escape(
            "data: client 3, train example 4 (pool row")):
        discover(_with_nan(gauss, 3, 4), SMALL)


def test_discover_rejects_diverged_predictors(gauss):
    with pytest.raises(ValueError, match=r"non-finite self-error .*lower RNDConfig.lr \(now "
                                         r"1e\+12\)"):
        discover(gauss, dataclasses.replace(SMALL, lr=1e12))


def test_newcomers_rejects_nan_features(gauss):
    disc = discover(gauss, SMALL)
    new = grouped_gaussian([1, 0], n=12, n_test=4, dim=3, seed=9)
    with pytest.raises(ValueError, match=re.escape("newcomers: client 1, train example 0")):
        assign_newcomers(disc, _with_nan(new, 1, 0))
