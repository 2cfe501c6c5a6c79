"""TensorFlow Federated's h5 files (EMNIST by writer, Shakespeare by role), on tiny fixture
files written here in TFF's layout ``examples/<client_id>/<field>``."""

from __future__ import annotations

import builtins
from pathlib import Path

import numpy as np
import pytest

from fedrnd.data import build_federated, make_partition
from fedrnd.data.leaf import SHAKESPEARE_OOV, shakespeare_tokens
from fedrnd.data.tff import tff_emnist, tff_shakespeare

h5py = pytest.importorskip("h5py")


def _write(path: Path, clients: dict[str, dict[str, np.ndarray]]) -> None:
    with h5py.File(path, "w") as f:
        ex = f.create_group("examples")
        for cid, fields in clients.items():
            g = ex.create_group(cid)
            for k, v in fields.items():
                g.create_dataset(k, data=v)


# Writers (train count, test count); w3 has train examples only.
_EMNIST = {"w2": (3, 1), "w0": (4, 2), "w1": (2, 1), "w3": (2, 0)}


@pytest.fixture()
def emnist_dir(tmp_path):
    rng = np.random.default_rng(0)
    data = {"train": {}, "test": {}}
    for cid, counts in _EMNIST.items():
        for split, n in zip(("train", "test"), counts, strict=True):
            if n:
                data[split][cid] = {"pixels": rng.random((n, 28, 28)).astype(np.float32),
                                    "label": rng.integers(0, 62, n).astype(np.int32)}
    for split in ("train", "test"):
        _write(tmp_path / f"fed_emnist_{split}.h5", data[split])
    return tmp_path, data


def test_emnist_writers_are_clients_with_exactly_their_examples(emnist_dir):
    root, data = emnist_dir
    ds = tff_emnist(data_dir=root)
    assert ds.num_classes == 62 and ds.x_train.shape[1:] == (28, 28, 1)
    for c, cid in enumerate(sorted(_EMNIST)):  # client c = c-th writer by sorted id
        for split in ("train", "test"):
            rows = np.flatnonzero(getattr(ds, f"{split}_client") == c)
            want = data[split].get(cid)
            if want is None:
                assert len(rows) == 0
                continue
            np.testing.assert_array_equal(getattr(ds, f"x_{split}")[rows, ..., 0],
                                          want["pixels"])
            np.testing.assert_array_equal(getattr(ds, f"y_{split}")[rows], want["label"])
    inv = tff_emnist(data_dir=root, invert=True, num_clients=2)
    np.testing.assert_allclose(inv.x_train[inv.train_client == 0, ..., 0],
                               1.0 - data["train"]["w0"]["pixels"])
    fed = build_federated(ds, make_partition("natural", ds, 4, seed=0))
    np.testing.assert_array_equal(np.asarray(fed.train_count), [4, 2, 3, 2])


def test_shakespeare_snippets_become_next_character_windows(tmp_path):
    text = "To be, or not to be: that is the question."
    snippets = {"train": {"HAMLET": [text.encode(), b"short"], "LEAR": ["ab\u00e9cdefg".encode()]},
                "test": {"HAMLET": [text[::-1].encode()], "LEAR": [b"xyzxyzxyz"]}}
    for split, clients in snippets.items():
        _write(tmp_path / f"shakespeare_{split}.h5",
               {c: {"snippets": np.array(s, dtype=object)} for c, s in clients.items()})
    ds = tff_shakespeare(data_dir=tmp_path, seq_len=5, stride=2)
    assert ds.num_classes == SHAKESPEARE_OOV + 1
    ids = shakespeare_tokens(text)
    hamlet = ds.train_client == 0  # "HAMLET" < "LEAR"; "short" is too short for a window
    starts = range(0, len(ids) - 5, 2)
    np.testing.assert_array_equal(ds.x_train[hamlet], [ids[s:s + 5] for s in starts])
    np.testing.assert_array_equal(ds.y_train[hamlet], [ids[s + 5] for s in starts])
    lear = ds.x_train[ds.train_client == 1]
    assert lear.shape == (2, 5) and lear[0, 2] == SHAKESPEARE_OOV  # the accented e
    assert np.sum(ds.test_client == 1) == 2


def test_missing_files_and_missing_h5py_give_clear_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDRND_TFF_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="data_dir is not set.*FEDRND_TFF_DIR"):
        tff_emnist()
    with pytest.raises(FileNotFoundError, match="fed_emnist_digitsonly_train.h5 does not exist"):
        tff_emnist(data_dir=tmp_path, only_digits=True)
    (tmp_path / "shakespeare_train.h5").write_bytes(b"not h5")
    (tmp_path / "shakespeare_test.h5").write_bytes(b"not h5")
    with pytest.raises(ValueError, match="shakespeare_train.h5: cannot read this h5 file"):
        tff_shakespeare(data_dir=tmp_path)
    real_import = builtins.__import__

    def no_h5py(name, *args, **kw):
        if name == "h5py":
            raise ImportError("No module named 'h5py'")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_h5py)
    with pytest.raises(ImportError, match=r"pip install 'fedrnd\[tff\]'"):
        tff_shakespeare(data_dir=tmp_path, stride=3)
