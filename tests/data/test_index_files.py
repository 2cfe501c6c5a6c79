"""Published partitions: the ``dirichlet_mix`` generator (the NTK-DFL authors' law) and the
``index_file`` partition with its safe reader (pickles that would run code are refused)."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest

from fedrnd.data import Dataset, build_federated
from fedrnd.data.index_files import SafeIndexUnpickler, read_index_map
from fedrnd.data.partition import check_partition_options, make_partition


def toy(n_train=3000, n_test=2000, k=10, seed=0) -> Dataset:
    rng = np.random.default_rng(seed)
    y_tr = rng.permutation((np.arange(n_train) % k).astype(np.int32))
    y_te = (np.arange(n_test) % k).astype(np.int32)
    return Dataset(rng.random((n_train, 2), dtype=np.float32), y_tr,
                   rng.random((n_test, 2), dtype=np.float32), y_te, k, "toy")


# ------------------------------------------------------------------------------------------
# dirichlet_mix
# ------------------------------------------------------------------------------------------


def test_dirichlet_mix_sizes_and_rows():
    ds = toy()
    p = make_partition("dirichlet_mix", ds, 30, 0, alpha=0.1)
    per = 3000 // 30
    for rows in p.train:
        # floor(per * q_k) summed over K classes: between per - (K - 1) and per.
        assert per - 9 <= len(rows) <= per
        assert len(np.unique(rows)) == len(rows)  # distinct within a client
    assert p.name == "dirichlet_mix(alpha=0.1, per_client=100)"
    # Rows repeat across clients (each client draws from the full class pools).
    cat = np.concatenate(p.train)
    assert len(np.unique(cat)) < len(cat)
    # Deterministic in the seed, different across seeds.
    q = make_partition("dirichlet_mix", ds, 30, 0, alpha=0.1)
    assert all(np.array_equal(a, b) for a, b in zip(p.train, q.train, strict=True))
    r = make_partition("dirichlet_mix", ds, 30, 1, alpha=0.1)
    assert not all(np.array_equal(a, b) for a, b in zip(p.train, r.train, strict=True))


def test_dirichlet_mix_skew_follows_alpha():
    ds = toy(n_train=6000)
    y = np.asarray(ds.y_train)

    def top_share(alpha):
        p = make_partition("dirichlet_mix", ds, 60, 3, alpha=alpha, per_client=200)
        return np.mean([np.bincount(y[t], minlength=10).max() / len(t) for t in p.train])

    # E[max_k q_k] for q ~ Dir(alpha * 1_10): about 0.9 at alpha 0.05, 0.1 + O(1/sqrt(n))
    # at alpha 1000 (floor(200 q_k) is 20 +- 2 rows of every class).
    assert top_share(0.05) > 0.75
    assert top_share(1000.0) < 0.13
    p = make_partition("dirichlet_mix", ds, 20, 0, alpha=1000.0, per_client=200)
    for t in p.train:
        counts = np.bincount(y[t], minlength=10)
        assert counts.min() >= 17 and counts.max() <= 23  # 200 q_k has sd 0.6


def test_dirichlet_mix_options_checked():
    for bad, match in (({"alpha": 0}, "alpha must be a number > 0"),
                       ({"alpha": 0.1, "per_client": 0}, "per_client must be an integer")):
        with pytest.raises(ValueError, match=match):
            check_partition_options("dirichlet_mix", 10, bad)
        with pytest.raises(ValueError, match=match):
            make_partition("dirichlet_mix", toy(), 10, 0, **bad)


def test_dirichlet_mix_test_rows_follow_the_client_labels():
    ds = toy()
    p = make_partition("dirichlet_mix", ds, 10, 0, alpha=0.05, test_size=30)
    y, yt = np.asarray(ds.y_train), np.asarray(ds.y_test)
    for tr, te in zip(p.train, p.test, strict=True):
        assert len(te) == 30 and set(yt[te]) <= set(y[tr])
    data = build_federated(ds, p)  # shared rows are fine for the index pool
    assert data.num_clients == 10


# ------------------------------------------------------------------------------------------
# index files
# ------------------------------------------------------------------------------------------


def _authors_map(n_clients=8, n=3000, seed=0) -> dict[int, np.ndarray]:
    """A map shaped like the authors' ``user_dataidx_map`` (int keys, int64 arrays)."""
    rng = np.random.default_rng(seed)
    return {u: rng.choice(n, 40, replace=False).astype(np.int64) for u in range(n_clients)}


def _write(path, obj, protocol=pickle.HIGHEST_PROTOCOL):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return str(path)


@pytest.mark.parametrize("fmt", ["dat", "pkl", "npz", "json", "npy"])
def test_index_file_round_trip(tmp_path, fmt):
    ds = toy()
    m = _authors_map()
    path = tmp_path / f"map.{fmt}"
    if fmt in ("dat", "pkl"):
        _write(path, m)
    elif fmt == "npz":
        np.savez(path, **{str(k): v for k, v in m.items()})
    elif fmt == "json":
        path.write_text(json.dumps({str(k): v.tolist() for k, v in m.items()}))
    else:
        np.save(path, np.stack(list(m.values())))
    p = make_partition("index_file", ds, 8, 0, path=str(path))
    for c in range(8):
        np.testing.assert_array_equal(p.train[c], np.sort(m[c]))
    assert p.name == f"index_file(map.{fmt})"
    assert make_partition("index_file", ds, 3, 0, path=str(path)).num_clients == 3
    assert make_partition("index_file", ds, None, 0, path=str(path)).num_clients == 8


def test_index_file_orders_clients_by_numeric_id(tmp_path):
    m = {10: np.array([5, 6]), 2: np.array([1]), 1: np.array([7, 8, 9])}
    got = read_index_map(_write(tmp_path / "m.dat", m))
    assert [g.tolist() for g in got] == [[7, 8, 9], [1], [5, 6]]
    (tmp_path / "m.json").write_text(json.dumps({"10": [5], "9": [4]}))
    assert [g.tolist() for g in read_index_map(tmp_path / "m.json")] == [[4], [5]]


def test_legacy_numpy_pickle_reads(tmp_path):
    """Files written under numpy 1 name ``numpy.core.multiarray``; they read the same."""
    m = _authors_map(3)
    raw = pickle.dumps(m, protocol=2)  # text GLOBAL opcodes: module names are plain strings
    legacy = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in legacy
    (tmp_path / "old.dat").write_bytes(legacy)
    got = read_index_map(tmp_path / "old.dat")
    assert all(np.array_equal(g, m[i]) for i, g in enumerate(got))


class _Touch:
    """A pickle payload that would create a file if it were allowed to run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mknod if hasattr(os, "mknod") else open, (self.path,))


def test_hostile_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    path = _write(tmp_path / "evil.dat", {0: _Touch(str(marker))})
    with pytest.raises(ValueError, match=r"evil.dat: cannot read the index file: refusing to "
                                         r"load global"):
        make_partition("index_file", toy(), 1, 0, path=path)
    assert not marker.exists()
    # Plain pickle would have run it: the payload is real.
    with open(path, "rb") as f:
        pickle.load(f)  # noqa: S301  (the point of the test)
    assert marker.exists()
    # Any class the file names is refused, also an importable harmless one.
    with pytest.raises(pickle.UnpicklingError, match="collections.Counter"):
        import collections
        import io
        SafeIndexUnpickler(io.BytesIO(pickle.dumps(collections.Counter([1])))).load()


@pytest.mark.parametrize("obj,match", [
    ({0: np.array([1, 2]), 1: np.array([], np.int64)}, "client 1 has no rows"),
    ({0: np.array([[1, 2]])}, r"client 0 holds an array of shape \(1, 2\)"),
    ({0: np.array([0.5, 1.0])}, "client 0 holds non-integer row indices"),
    ({0: np.array(["a"])}, "expected integer row indices"),
    ({}, "holds no clients"),
    ("text", "expected a mapping of client id -> rows"),
])
def test_bad_contents(tmp_path, obj, match):
    with pytest.raises(ValueError, match=match):
        read_index_map(_write(tmp_path / "bad.dat", obj))


def test_bad_rows_for_the_data_set(tmp_path):
    ds = toy()
    with pytest.raises(ValueError, match="client 1 names row 3000 .* outside the 3000 "
                                         "training rows of 'toy'"):
        make_partition("index_file", ds, 2, 0, path=_write(tmp_path / "a.dat",
                                                           {0: [1, 2], 1: [3, 3000]}))
    with pytest.raises(ValueError, match="client 0 lists a row twice"):
        make_partition("index_file", ds, 1, 0, path=_write(tmp_path / "b.dat", {0: [1, 1]}))
    with pytest.raises(ValueError, match=r"num_clients must be in \[1, 2\]"):
        make_partition("index_file", ds, 3, 0, path=_write(tmp_path / "c.dat",
                                                           {0: [1], 1: [2]}))


def test_path_checked_before_any_data(tmp_path):
    with pytest.raises(ValueError, match="path 'nope.dat': no such file"):
        check_partition_options("index_file", 4, {"path": "nope.dat"})
    (tmp_path / "m.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match="unknown type; allowed endings: .json, .npz"):
        check_partition_options("index_file", 4, {"path": str(tmp_path / "m.csv")})
    with pytest.raises(ValueError, match="path is required by partition 'index_file'"):
        check_partition_options("index_file", 4, {})
    (tmp_path / "broken.dat").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(ValueError, match="broken.dat: cannot read the index file"):
        read_index_map(tmp_path / "broken.dat")


def test_config_names_the_path(tmp_path):
    """A run config with a missing file fails validation naming data.partition_options.path."""
    from fedrnd.driver.config import load_config

    with pytest.raises(ValueError, match=r"data.partition_options.path 'nope.dat': no such "
                                         r"file \(data.partition = 'index_file'\)"):
        load_config(None, ["data.partition=index_file",
                           "data.partition_options={path='nope.dat'}"])
    path = _write(tmp_path / "m.dat", _authors_map(4, n=1000))
    cfg = load_config(None, ["data.partition=index_file", "data.num_clients=4",
                             f"data.partition_options={{path='{path}'}}"])
    assert cfg.data.partition_options == {"path": path}
