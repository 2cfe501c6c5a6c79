"""Data sources: digits, Fashion-MNIST IDX parsing, LEAF synthetic, Gaussian mixture, tfds."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from fedrnd.data import sources
from fedrnd.data.sources import (
    DEFAULT_FASHION_MNIST_DIR,
    digits,
    fashion_mnist,
    gaussian_mixture,
    load_source,
    read_idx,
    synthetic,
    tfds_source,
)

# ------------------------------------------------------------------------------------ digits


def test_digits_shapes_range_and_stratified_split():
    d = digits()
    assert d.x_train.shape == (1347, 8, 8, 1) and d.x_test.shape == (450, 8, 8, 1)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int32
    assert d.x_train.min() == 0.0 and d.x_train.max() == 1.0
    assert d.num_classes == 10 and set(np.unique(d.y_test)) == set(range(10))
    # Stratified: each class's test share is ~25%.
    share = np.bincount(d.y_test, minlength=10) / (
        np.bincount(d.y_test, minlength=10) + np.bincount(d.y_train, minlength=10))
    assert np.all(np.abs(share - 0.25) < 0.02)
    again = digits()
    np.testing.assert_array_equal(again.y_train, d.y_train)
    assert not np.array_equal(digits(seed=1).y_train, d.y_train)


# ------------------------------------------------------------------------------ IDX parsing


def _idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    dtype = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[code]
    return header + arr.astype(dtype).tobytes()


def _write_fashion(tmp: Path, n_train=5, n_test=3, gz=("train-images-idx3-ubyte",)):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 4, 3), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 4, 3), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, arr in arrays.items():
        raw = _idx_bytes(arr)
        if name in gz:
            (tmp / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (tmp / name).write_bytes(raw)
    return arrays


def test_read_idx_hand_written_raw_and_gzip(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(_idx_bytes(a))
    (tmp_path / "a.gz").write_bytes(gzip.compress(_idx_bytes(a)))
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), a)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), a)
    b = np.array([-5, 7, 1 << 20], np.int32)
    (tmp_path / "b").write_bytes(_idx_bytes(b, 0x0C))
    np.testing.assert_array_equal(read_idx(tmp_path / "b"), b)
    f = np.array([[0.5, -1.25]], np.float32)
    (tmp_path / "f").write_bytes(_idx_bytes(f, 0x0D))
    np.testing.assert_array_equal(read_idx(tmp_path / "f"), f)


def test_read_idx_rejects_malformed(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="magic"):
        read_idx(bad)
    bad.write_bytes(b"\x00\x00\x42\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="type code 0x42"):
        read_idx(bad)
    bad.write_bytes(_idx_bytes(np.zeros((3, 2), np.uint8))[:-1])  # one byte short
    with pytest.raises(ValueError, match=r"shape \(3, 2\)"):
        read_idx(bad)
    bad.write_bytes(b"")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)


def test_fashion_mnist_parser_on_tiny_files(tmp_path):
    arrays = _write_fashion(tmp_path)  # train images gzipped, the rest raw
    d = fashion_mnist(data_dir=tmp_path)
    assert d.x_train.shape == (5, 4, 3, 1) and d.x_test.shape == (3, 4, 3, 1)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int32
    np.testing.assert_allclose(d.x_train[..., 0], arrays["train-images-idx3-ubyte"] / 255.0,
                               rtol=1e-6)
    np.testing.assert_array_equal(d.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert fashion_mnist(data_dir=tmp_path) is d  # cached per directory
    with pytest.raises(ValueError, match="read-only"):
        d.x_train[0, 0, 0, 0] = 1.0


def test_fashion_mnist_env_var(tmp_path, monkeypatch):
    _write_fashion(tmp_path, n_train=4, gz=())
    monkeypatch.setenv("FEDRND_FASHION_MNIST_DIR", str(tmp_path))
    assert fashion_mnist().x_train.shape == (4, 4, 3, 1)


def test_fashion_mnist_missing_dir_and_files(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as e:
        fashion_mnist(data_dir=missing)
    msg = str(e.value)
    assert str(missing) in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "train-images-idx3-ubyte" in msg and "FEDRND_FASHION_MNIST_DIR" in msg
    _write_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte") as e:
        fashion_mnist(data_dir=tmp_path)
    assert "train-images" not in str(e.value)


def test_fashion_mnist_label_image_count_mismatch(tmp_path):
    _write_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(2, np.uint8)))
    with pytest.raises(ValueError, match="disagree"):
        fashion_mnist(data_dir=tmp_path)


@pytest.mark.skipif(not Path(DEFAULT_FASHION_MNIST_DIR).is_dir(),
                    reason=f"{DEFAULT_FASHION_MNIST_DIR} absent (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_real_files(monkeypatch):
    monkeypatch.delenv("FEDRND_FASHION_MNIST_DIR", raising=False)
    d = fashion_mnist()
    assert d.x_train.shape == (60000, 28, 28, 1) and d.x_test.shape == (10000, 28, 28, 1)
    assert d.x_train.dtype == np.float32 and 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0
    np.testing.assert_array_equal(np.bincount(d.y_train), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(d.y_test), np.full(10, 1000))
    assert load_source("fashion_mnist") is d


# ----------------------------------------------------------------------------- generators


def test_synthetic_shapes_natural_clients_and_sizes():
    d = synthetic(alpha=0.5, beta=0.5, num_clients=12, dim=20, num_classes=5, seed=3)
    assert d.x_train.shape[1:] == (20,) and d.x_train.dtype == np.float32
    assert d.train_client.shape == d.y_train.shape and d.test_client.shape == d.y_test.shape
    tr = np.bincount(d.train_client, minlength=12)
    te = np.bincount(d.test_client, minlength=12)
    assert tr.min() >= 1 and te.min() >= 1
    assert (tr + te).min() >= 50  # LEAF's minimum
    np.testing.assert_allclose(te / (tr + te), 0.2, atol=0.02)
    np.testing.assert_array_equal(d.client_group, np.zeros(12))
    assert d.y_train.max() < 5
    d2 = synthetic(alpha=0.5, beta=0.5, num_clients=12, dim=20, num_classes=5, seed=3)
    np.testing.assert_array_equal(d.x_train, d2.x_train)


def test_synthetic_iid_matches_generator_statistics():
    # Synthetic-IID: v = 0, Sigma_jj = j^-1.2, one shared (W, b).
    d = synthetic(iid=True, num_clients=20, dim=10, num_classes=4, mean_samples=500, seed=0)
    x = np.concatenate([d.x_train, d.x_test])
    np.testing.assert_allclose(x.mean(0), 0.0, atol=0.05)
    np.testing.assert_allclose(x.var(0), np.arange(1, 11) ** -1.2, rtol=0.1)
    # A single linear rule explains all labels: a linear model fits them almost perfectly.
    from sklearn.linear_model import LogisticRegression
    y = np.concatenate([d.y_train, d.y_test])
    assert LogisticRegression(C=1e4, max_iter=3000).fit(x, y).score(x, y) > 0.97


def test_synthetic_heterogeneity_grows_with_alpha_beta():
    def spread(a, b):
        d = synthetic(alpha=a, beta=b, num_clients=20, dim=10, seed=1)
        means = np.stack([d.x_train[d.train_client == c].mean(0) for c in range(20)])
        return means.std(0).mean()
    assert spread(0.0, 0.0) < spread(1.0, 1.0) < spread(1.0, 3.0)


def test_gaussian_mixture_groups_are_separated():
    d = gaussian_mixture(num_groups=3, num_clients=9, samples_per_client=60, dim=8,
                         num_classes=3, separation=10.0, seed=0)
    np.testing.assert_array_equal(d.client_group, np.arange(9) % 3)
    g = d.client_group[d.train_client]
    centres = np.stack([d.x_train[g == k].mean(0) for k in range(3)])
    # Nearest group centre recovers the group of (almost) every example.
    dist = ((d.x_train[:, None, :] - centres[None]) ** 2).sum(-1)
    assert (dist.argmin(1) == g).mean() > 0.97
    assert np.bincount(d.test_client).min() >= 1


def test_gaussian_mixture_group_labels_changes_the_rule():
    kw = dict(num_groups=2, num_clients=2, samples_per_client=400, dim=6, num_classes=4,
              separation=0.0, class_separation=6.0, seed=2)
    same, diff = gaussian_mixture(**kw), gaussian_mixture(group_labels=True, **kw)

    def cross_acc(d):  # nearest class mean fitted on group 0, scored on group 1
        g = d.client_group[d.train_client]
        m = np.stack([d.x_train[(g == 0) & (d.y_train == k)].mean(0) for k in range(4)])
        x1, y1 = d.x_train[g == 1], d.y_train[g == 1]
        return (((x1[:, None] - m[None]) ** 2).sum(-1).argmin(1) == y1).mean()
    assert cross_acc(same) > 0.9 and cross_acc(diff) < 0.6


def test_gaussian_mixture_validation():
    with pytest.raises(ValueError, match="num_groups"):
        gaussian_mixture(num_groups=5, num_clients=4)


# ------------------------------------------------------------------------------- registry


def test_load_source_registry_and_unknown_name():
    assert load_source("digits").name == "digits"
    assert load_source("gaussian_mixture", num_groups=2, num_clients=4).client_group.shape == (4,)
    with pytest.raises(ValueError, match="unknown data source 'nope'.*digits.*tfds:<name>"):
        load_source("nope")
    with pytest.raises(ValueError, match="unknown tfds data set 'imagenet'.*mnist"):
        load_source("tfds:imagenet")


# ----------------------------------------------------------------------------------- tfds



def _tfds():
    return pytest.importorskip("tensorflow_datasets")


@pytest.mark.parametrize("name,shape,classes", [
    ("mnist", (28, 28, 1), 10), ("svhn", (32, 32, 3), 10), ("cifar100", (32, 32, 3), 100)])
def test_tfds_source_with_mock_data(name, shape, classes):
    t = _tfds()
    # mock_data fakes the records but not is_prepared(); declare the mock data prepared.
    with t.testing.mock_data(num_examples=7), \
            mock.patch.object(t.core.DatasetBuilder, "is_prepared", return_value=True):
        d = load_source(f"tfds:{name}")
    assert d.x_train.shape == (7, *shape) and d.x_test.shape == (7, *shape)
    assert d.x_train.dtype == np.float32 and 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0
    assert d.y_train.dtype == np.int32 and d.num_classes == classes
    assert d.y_train.min() >= 0 and d.y_train.max() < classes


def test_tfds_not_prepared_raises_file_not_found(tmp_path):
    _tfds()
    with pytest.raises(FileNotFoundError) as e:
        tfds_source("fashion_mnist", data_dir=tmp_path)
    msg = str(e.value)
    assert "'fashion_mnist'" in msg and str(tmp_path) in msg and "tfds build" in msg


def test_tfds_reads_a_real_array_record_directory(tmp_path):
    # A tiny builder prepared offline exercises the real (non-mocked) reading path.
    t = _tfds()
    pil = pytest.importorskip("PIL.Image")

    class TinyImages(t.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = t.core.Version("1.0.0")

        def _info(self):
            return t.core.DatasetInfo(builder=self, features=t.features.FeaturesDict({
                "image": t.features.Image(shape=(4, 4, 1)),
                "label": t.features.ClassLabel(num_classes=3)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(9), "test": self._generate_examples(4)}

        def _generate_examples(self, n):
            for i in range(n):
                img = np.full((4, 4), i * 20, np.uint8)
                yield i, {"image": pil.fromarray(img), "label": i % 3}

    b = TinyImages(data_dir=str(tmp_path), file_format="array_record")
    b.download_and_prepare()
    d = sources._tfds_to_dataset(b, "tiny", ("train", "test"), "label")
    assert d.x_train.shape == (9, 4, 4, 1) and d.num_classes == 3
    # Each record's pixels encode its index i; the label must be i % 3.
    idx = np.rint(d.x_train[:, 0, 0, 0] * 255 / 20).astype(int)
    np.testing.assert_array_equal(np.sort(idx), np.arange(9))
    np.testing.assert_array_equal(d.y_train, idx % 3)
    np.testing.assert_allclose(d.x_train[:, :, :, 0], np.broadcast_to(
        (idx * 20 / 255.0)[:, None, None], (9, 4, 4)), rtol=1e-6)


def test_tfds_download_true_prepares_then_reads_and_false_never_downloads(tmp_path):
    """``download=True`` (API and config) calls tfds's download_and_prepare for a set that is
    not prepared, as array_record, then reads it; the default never calls it. Offline: tfds's
    mock_data fakes the records and the download is a recorded mock."""
    t = _tfds()
    prepared = {"done": False}

    def fake_download(self, **kw):
        calls.append(kw)
        prepared["done"] = True

    calls: list[dict] = []
    with t.testing.mock_data(num_examples=5), \
            mock.patch.object(t.core.DatasetBuilder, "is_prepared",
                              lambda self: prepared["done"]), \
            mock.patch.object(t.core.DatasetBuilder, "download_and_prepare", fake_download):
        with pytest.raises(FileNotFoundError, match="download = true"):
            tfds_source("mnist", data_dir=tmp_path)
        assert calls == []
        d = load_source("tfds:mnist", data_dir=str(tmp_path), download=True)
        assert calls == [{"file_format": "array_record"}]
        assert d.x_train.shape == (5, 28, 28, 1) and d.num_classes == 10
        # Prepared now: a second load reads it and downloads nothing more.
        load_source("tfds:mnist", data_dir=str(tmp_path), download=True)
        assert len(calls) == 1
    # The config form is checked like any source option.
    from fedrnd.driver.config import from_dict, validate

    cfg = validate(from_dict({"data": {"source": "tfds:mnist", "partition": "iid",
                                       "source_options": {"download": True}}}))
    assert cfg.data.source_options == {"download": True}
    with pytest.raises(ValueError, match=r"data\.source_options\.download = \"yes\" must be "
                                         r"true or false"):
        validate(from_dict({"data": {"source": "tfds:mnist", "partition": "iid",
                                     "source_options": {"download": "yes"}}}))
