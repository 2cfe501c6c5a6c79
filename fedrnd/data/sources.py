"""Data sources: functions returning a centralised :class:`~fedrnd.data.federated.Dataset`.

Every source returns plain numpy arrays; partitioners (:mod:`fedrnd.data.partition`) then split
them over clients. Images are ``[n, H, W, C]`` float32 in ``[0, 1]``; vector data is
``[n, D]`` float32. Labels are ``[n]`` int32.

``digits`` (scikit-learn's bundled 8x8 digits) is the default everywhere because it needs no
download. ``fashion_mnist`` reads the IDX files of the Debian package ``dataset-fashion-mnist``;
``tfds:<name>`` reads a prepared TensorFlow Datasets directory; it downloads and prepares one
only when told (``download = true``).
LEAF's naturally federated ``femnist`` and ``shakespeare`` live in :mod:`fedrnd.data.leaf`.
"""

from __future__ import annotations

import difflib
import functools
import gzip
import inspect
import os
import re
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedrnd.data.federated import Dataset

__all__ = [
    "DEFAULT_FASHION_MNIST_DIR",
    "SOURCES",
    "TFDS_NAMES",
    "check_source_options",
    "digits",
    "fashion_mnist",
    "gaussian_mixture",
    "load_source",
    "read_idx",
    "register_source",
    "source_kwargs",
    "source_parameters",
    "synthetic",
    "tfds_source",
]

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "FEDRND_FASHION_MNIST_DIR"


def _readonly(*arrays: np.ndarray) -> None:
    # Cached arrays are shared by every caller in the process; a stray in-place edit would
    # silently corrupt later runs, so make that an error instead.
    for a in arrays:
        if a is not None:
            a.setflags(write=False)


def _check_fraction(test_fraction: Any) -> None:
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, int | float) or not (
            0.0 < test_fraction < 1.0):
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")


def _check_seed(seed: Any) -> None:
    # numpy and scikit-learn take seeds in [0, 2**32); say so before they do, in our words.
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer >= 0 (and < 2**32), got {seed!r}")


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


def _check_digits(test_fraction: float = 0.25, seed: int = 0) -> None:
    _check_fraction(test_fraction)
    _check_seed(seed)


def digits(test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1797 examples, 10 classes), offline.

    Returns images ``[n, 8, 8, 1]`` float32 in ``[0, 1]`` (pixel values / 16) and a stratified
    train/test split (``test_fraction`` of each class held out, fixed by ``seed``).
    Source: Alpaydin & Kaynak (1998), UCI optical recognition of handwritten digits.
    """
    _check_digits(test_fraction, seed)
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (np.asarray(d.images, np.float32) / 16.0)[..., None]
    y = np.asarray(d.target, np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed)
    return Dataset(x_train=np.ascontiguousarray(x_tr), y_train=y_tr,
                   x_test=np.ascontiguousarray(x_te), y_test=y_te,
                   num_classes=10, name="digits")


# --------------------------------------------------------------------------------------------
# IDX files (Fashion-MNIST)
# --------------------------------------------------------------------------------------------

# IDX type byte -> big-endian numpy dtype (LeCun's MNIST file format).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse one IDX file (raw or ``.gz``) into a numpy array of its declared shape.

    Raises ``ValueError`` naming the file when it cannot be read or decompressed (truncated or
    corrupt download), or when the magic number, the type code or the length does not match
    the header.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip magic; decide by content, not by the suffix
            raw = gzip.decompress(raw)
    except (EOFError, zlib.error, OSError) as e:  # OSError includes gzip.BadGzipFile
        kind = "zlib.error" if isinstance(e, zlib.error) else type(e).__name__
        raise ValueError(f"{path}: cannot read this IDX file, it is truncated or corrupt "
                         f"({kind}: {e}); reinstall or re-download it") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (magic number must start with two zero "
                         f"bytes, got {raw[:4].hex() or 'empty file'})")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX data type code 0x{code:02x}; expected one of "
                         f"{', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes for {ndim} dims)")
    shape = tuple(int(s) for s in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: IDX header declares shape {shape} ({expected} data bytes) "
                         f"but the file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="), copy=False)


_FASHION_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def _fashion_mnist_dir(data_dir: str | os.PathLike | None) -> Path:
    if data_dir is None:
        data_dir = os.environ.get(FASHION_MNIST_ENV) or DEFAULT_FASHION_MNIST_DIR
    return Path(data_dir).expanduser().resolve()


def _missing_fashion(directory: Path, missing: Sequence[str]) -> FileNotFoundError:
    looked = ", ".join(f"{f}[.gz]" for f in missing)
    return FileNotFoundError(
        f"Fashion-MNIST not found in {directory}: looked for {looked}. Install it with "
        f"`apt-get install dataset-fashion-mnist` (files go to {DEFAULT_FASHION_MNIST_DIR}), "
        f"or download the four IDX files from https://github.com/zalandoresearch/fashion-mnist "
        f"and pass data_dir=... or set {FASHION_MNIST_ENV}.")


def _fashion_paths(directory: Path) -> dict[str, Path]:
    """The four IDX files in ``directory`` (raw or ``.gz``); ``FileNotFoundError`` if any lack."""
    if not directory.is_dir():
        raise _missing_fashion(directory, list(_FASHION_FILES.values()))
    paths, missing = {}, []
    for key, base in _FASHION_FILES.items():
        for cand in (directory / base, directory / f"{base}.gz"):
            if cand.is_file():
                paths[key] = cand
                break
        else:
            missing.append(base)
    if missing:
        raise _missing_fashion(directory, missing)
    return paths


@functools.lru_cache(maxsize=4)
def _load_fashion_mnist(directory: Path) -> Dataset:
    arr = {k: read_idx(p) for k, p in _fashion_paths(directory).items()}
    for split in ("train", "test"):
        x, y = arr[f"x_{split}"], arr[f"y_{split}"]
        if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(f"Fashion-MNIST {split} files in {directory} disagree: images "
                             f"{x.shape}, labels {y.shape}; expected [n, H, W] and [n]")
        if y.size and (y.min() < 0 or y.max() > 9):
            raise ValueError(f"Fashion-MNIST {split} labels in {directory} must be in [0, 9], "
                             f"got values in [{y.min()}, {y.max()}]; the file is corrupt")
    x_train = (arr["x_train"].astype(np.float32) / 255.0)[..., None]
    x_test = (arr["x_test"].astype(np.float32) / 255.0)[..., None]
    y_train = arr["y_train"].astype(np.int32)
    y_test = arr["y_test"].astype(np.int32)
    _readonly(x_train, x_test, y_train, y_test)
    return Dataset(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                   num_classes=10, name="fashion_mnist")


def _check_fashion_mnist(data_dir: str | os.PathLike | None = None) -> None:
    if data_dir is not None and not isinstance(data_dir, str | os.PathLike):
        raise ValueError(f"data_dir must be a directory path, got {data_dir!r}")


def fashion_mnist(data_dir: str | os.PathLike | None = None) -> Dataset:
    """Fashion-MNIST from IDX files: train ``[60000, 28, 28, 1]``, test ``[10000, 28, 28, 1]``.

    Looks in ``data_dir``, else ``$FEDRND_FASHION_MNIST_DIR``, else
    ``/usr/share/datasets/fashion-mnist``; each file may be raw or gzipped. Cached per
    directory (arrays are read-only). Raises ``FileNotFoundError`` saying how to get the files.
    Source: Xiao, Rasul & Vollgraf (2017), Fashion-MNIST.
    """
    return _load_fashion_mnist(_fashion_mnist_dir(data_dir))


# --------------------------------------------------------------------------------------------
# Synthetic generators
# --------------------------------------------------------------------------------------------


def _split_per_client(client: np.ndarray, test_fraction: float, rng: np.random.Generator
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Boolean train/test masks holding out ``test_fraction`` of each client's rows (>= 1 each)."""
    n = client.shape[0]
    counts = np.bincount(client)
    n_test = np.clip(np.rint(counts * test_fraction).astype(np.int64), 1, counts - 1)
    # Rank of each row among its client's rows, in a random order.
    order = np.lexsort((rng.random(n), client))
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n) - np.repeat(start, counts)
    is_test = rank < n_test[client]
    return ~is_test, is_test


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_number(name: str, value: Any, low: float, strict: bool = False) -> None:
    ok = (not isinstance(value, bool) and isinstance(value, int | float | np.number)
          and np.isfinite(value) and (value > low if strict else value >= low))
    if not ok:
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low:g}, "
                         f"got {value!r}")


def _check_synthetic(alpha: float = 1.0, beta: float = 1.0, num_clients: int = 30, dim: int = 60,
                     num_classes: int = 10, iid: bool = False, seed: int = 0,
                     mean_samples: float | None = None, sigma_samples: float = 2.0,
                     min_samples: int = 50, test_fraction: float = 0.2) -> None:
    _check_int("num_clients", num_clients, 1)
    _check_int("dim", dim, 1)
    _check_int("num_classes", num_classes, 1)
    _check_int("min_samples", min_samples, 2)  # one train and one test row
    _check_fraction(test_fraction)
    _check_number("alpha", alpha, 0.0)
    _check_number("beta", beta, 0.0)
    _check_number("sigma_samples", sigma_samples, 0.0)
    _check_seed(seed)
    if mean_samples is not None:
        _check_number("mean_samples", mean_samples, 0.0)
        if mean_samples <= min_samples:
            raise ValueError(f"mean_samples must exceed min_samples={min_samples}, got "
                             f"{mean_samples}")


def synthetic(alpha: float = 1.0, beta: float = 1.0, num_clients: int = 30, dim: int = 60,
              num_classes: int = 10, iid: bool = False, seed: int = 0,
              mean_samples: float | None = None, sigma_samples: float = 2.0,
              min_samples: int = 50, test_fraction: float = 0.2) -> Dataset:
    """LEAF/FedProx Synthetic(alpha, beta): vectors ``[n, dim]``, naturally split per client.

    Per client k: ``u_k ~ N(0, alpha)``, ``W_k ~ N(u_k, 1)`` ``[dim, classes]``,
    ``b_k ~ N(u_k, 1)``; ``B_k ~ N(0, beta)``, ``v_k ~ N(B_k, 1)``; ``x ~ N(v_k, Sigma)`` with
    ``Sigma_jj = j^-1.2``; ``y = argmax softmax(W_k^T x + b_k)``. As in the reference code,
    alpha and beta are used as *standard deviations*. ``iid=True`` is Synthetic-IID: one shared
    ``W, b ~ N(0, 1)`` and ``v_k = 0``.

    Client sizes are ``min_samples + floor(LogNormal(mu, sigma_samples))`` with LEAF's
    ``mu = 4``; ``mean_samples`` instead picks ``mu`` so the expected size is ``mean_samples``.
    Each client's rows are split ``test_fraction`` to test (at least one row each side).
    ``train_client``/``test_client`` give the natural client; ``client_group`` is all zeros
    because the generator has a continuum of clients, not discrete groups.
    Source: Li et al. (2020), Federated Optimization in Heterogeneous Networks (FedProx).
    """
    _check_synthetic(alpha, beta, num_clients, dim, num_classes, iid, seed, mean_samples,
                     sigma_samples, min_samples, test_fraction)
    rng = np.random.default_rng(seed)
    mu = 4.0
    if mean_samples is not None:
        mu = float(np.log(mean_samples - min_samples) - sigma_samples ** 2 / 2)
    sizes = rng.lognormal(mu, sigma_samples, num_clients).astype(np.int64) + min_samples

    u = rng.normal(0.0, alpha, num_clients)
    big_b = rng.normal(0.0, beta, num_clients)
    diag = np.arange(1, dim + 1, dtype=np.float64) ** -1.2
    if iid:
        w = np.broadcast_to(rng.normal(0.0, 1.0, (dim, num_classes)), (num_clients, dim, num_classes))
        b = np.broadcast_to(rng.normal(0.0, 1.0, num_classes), (num_clients, num_classes))
        v = np.zeros((num_clients, dim))
    else:
        w = rng.normal(u[:, None, None], 1.0, (num_clients, dim, num_classes))
        b = rng.normal(u[:, None], 1.0, (num_clients, num_classes))
        v = rng.normal(big_b[:, None], 1.0, (num_clients, dim))
    client = np.repeat(np.arange(num_clients), sizes)
    x = v[client] + rng.standard_normal((client.size, dim)) * np.sqrt(diag)
    # Rows are contiguous per client, so one small matmul per client avoids an [n, dim, K] gather.
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    y = np.empty(client.size, np.int32)
    for k in range(num_clients):
        s = slice(bounds[k], bounds[k + 1])
        y[s] = np.argmax(x[s] @ w[k] + b[k], axis=1)  # softmax is monotone
    tr, te = _split_per_client(client, test_fraction, rng)
    x = x.astype(np.float32)
    return Dataset(x_train=x[tr], y_train=y[tr], x_test=x[te], y_test=y[te],
                   num_classes=num_classes,
                   name="synthetic_iid" if iid else f"synthetic({alpha:g},{beta:g})",
                   train_client=client[tr].astype(np.int32),
                   test_client=client[te].astype(np.int32),
                   client_group=np.zeros(num_clients, np.int32))


def _check_gaussian_mixture(num_groups: int = 4, num_clients: int = 20,
                            samples_per_client: int = 100, dim: int = 10, num_classes: int = 3,
                            separation: float = 4.0, class_separation: float = 3.0,
                            noise: float = 1.0, group_labels: bool = False, seed: int = 0,
                            test_fraction: float = 0.2) -> None:
    _check_int("num_clients", num_clients, 1)
    if (isinstance(num_groups, bool) or not isinstance(num_groups, int | np.integer)
            or not 1 <= num_groups <= num_clients):
        raise ValueError(f"num_groups must be an integer in [1, num_clients={num_clients}], "
                         f"got {num_groups!r}")
    _check_int("samples_per_client", samples_per_client, 2)
    _check_int("dim", dim, 1)
    _check_int("num_classes", num_classes, 1)
    _check_number("separation", separation, 0.0)
    _check_number("class_separation", class_separation, 0.0)
    _check_number("noise", noise, 0.0)
    _check_seed(seed)
    _check_fraction(test_fraction)


def gaussian_mixture(num_groups: int = 4, num_clients: int = 20, samples_per_client: int = 100,
                     dim: int = 10, num_classes: int = 3, separation: float = 4.0,
                     class_separation: float = 3.0, noise: float = 1.0,
                     group_labels: bool = False, seed: int = 0,
                     test_fraction: float = 0.2) -> Dataset:
    """Well-separated clustered toy data: vectors ``[n, dim]`` with known client groups.

    Classes have shared means ``m_k`` (random directions, norm ``class_separation``); group
    ``g`` adds its own input shift ``s_g`` (random direction, norm ``separation``), so
    ``x = m_y + s_g + noise * N(0, I)`` with balanced labels. By default the labelling rule is
    shared (pure covariate shift). ``group_labels=True`` also gives each group its own rule:
    group ``g`` draws class ``k`` around ``m_{pi_g(k)}`` for a fixed permutation ``pi_g``
    (``pi_0`` = identity), so the same region means different labels in different groups.
    Clients are assigned to groups round-robin (sizes differ by at most one);
    ``client_group`` holds the group, ``train_client``/``test_client`` the natural client.
    Source: a standard clustered-FL test bed, e.g. Ghosh et al. (2020), IFCA.
    """
    _check_gaussian_mixture(num_groups, num_clients, samples_per_client, dim, num_classes,
                            separation, class_separation, noise, group_labels, seed,
                            test_fraction)
    rng = np.random.default_rng(seed)

    def directions(k: int, norm: float) -> np.ndarray:
        d = rng.standard_normal((k, dim))
        return norm * d / np.linalg.norm(d, axis=1, keepdims=True)

    class_mean = directions(num_classes, class_separation)
    shift = directions(num_groups, separation)
    perms = np.stack([np.arange(num_classes)] + [
        rng.permutation(num_classes) if group_labels else np.arange(num_classes)
        for _ in range(num_groups - 1)])
    client_group = (np.arange(num_clients) % num_groups).astype(np.int32)
    client = np.repeat(np.arange(num_clients), samples_per_client)
    g = client_group[client]
    # Balanced labels per client: a shuffled repeat of 0..K-1.
    y = (np.arange(samples_per_client)[None, :] % num_classes
         + np.zeros((num_clients, 1), np.int64))
    y = rng.permuted(y, axis=1).reshape(-1)
    x = class_mean[perms[g, y]] + shift[g] + noise * rng.standard_normal((client.size, dim))
    tr, te = _split_per_client(client, test_fraction, rng)
    x = x.astype(np.float32)
    y = y.astype(np.int32)
    return Dataset(x_train=x[tr], y_train=y[tr], x_test=x[te], y_test=y[te],
                   num_classes=num_classes, name=f"gaussian_mixture(G={num_groups})",
                   train_client=client[tr].astype(np.int32),
                   test_client=client[te].astype(np.int32), client_group=client_group)


# --------------------------------------------------------------------------------------------
# TensorFlow Datasets (prepared directories only)
# --------------------------------------------------------------------------------------------

TFDS_NAMES = ("mnist", "fashion_mnist", "cifar10", "cifar100", "emnist", "svhn_cropped")
_TFDS_ALIASES = {"svhn": "svhn_cropped"}


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("tfds:<name> sources need tensorflow-datasets: "
                          "pip install 'fedrnd[tfds]'") from e
    return tfds


def _tfds_split_arrays(builder, split: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """All examples of one split as ``(images uint8 [n, H, W, C], labels [n])``."""
    try:
        # Random-access reading works without TensorFlow (array_record / parquet formats).
        source = builder.as_data_source(split=split)
    except NotImplementedError as e:
        # Data prepared in the default TFRecord format can only be read through tf.data.
        try:
            import tensorflow  # noqa: F401
        except ImportError:
            raise ImportError(
                f"{builder.name} in {builder.data_dir} was prepared as TFRecord, which needs "
                "TensorFlow to read. Either `pip install tensorflow`, or re-prepare it as "
                f"array_record: `tfds build {builder.name} --file_format=array_record` on a "
                "machine with internet, then copy the directory.") from e
        tfds = _import_tfds()
        arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
        return np.asarray(arrays["image"]), np.asarray(arrays[label_key])
    n = len(source)
    if n == 0:
        raise ValueError(f"{builder.name} split {split!r} is empty")
    # Per-record reads: decoding dominates, and it works with every data-source backend.
    first = source[0]
    images = np.empty((n, *np.shape(first["image"])), np.uint8)
    labels = np.empty(n, np.int64)
    for i in range(n):
        rec = first if i == 0 else source[i]
        images[i] = rec["image"]
        labels[i] = rec[label_key]
    return images, labels


def _tfds_to_dataset(builder, name: str, splits: Sequence[str], label_key: str) -> Dataset:
    features = builder.info.features
    if "image" not in features or label_key not in features:
        raise ValueError(f"{name}: expected 'image' and {label_key!r} features, found "
                         f"{sorted(features.keys())}")
    num_classes = int(features[label_key].num_classes)
    out = []
    for split in splits:
        img, lab = _tfds_split_arrays(builder, split, label_key)
        if img.ndim == 3:  # grey images stored without a channel axis
            img = img[..., None]
        out.append((img.astype(np.float32) / 255.0, lab.astype(np.int32)))
    (x_tr, y_tr), (x_te, y_te) = out
    return Dataset(x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
                   num_classes=num_classes, name=f"tfds:{name}")


def _check_tfds_source(name: str, data_dir: str | os.PathLike | None = None,
                       split: tuple[str, str] = ("train", "test"),
                       label_key: str = "label", download: bool = False) -> None:
    base = name.partition("/")[0]
    if _TFDS_ALIASES.get(base, base) not in TFDS_NAMES:
        allowed = TFDS_NAMES + tuple(_TFDS_ALIASES)
        close = difflib.get_close_matches(base, allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown tfds data set {name!r}{hint}; allowed: {', '.join(allowed)}")
    if (isinstance(split, str) or not isinstance(split, Sequence) or len(split) != 2
            or not all(isinstance(s, str) for s in split)):
        raise ValueError(f"split must be a (train, test) pair of split names, got {split!r}")
    if data_dir is not None and not isinstance(data_dir, str | os.PathLike):
        raise ValueError(f"data_dir must be a directory path, got {data_dir!r}")
    if not isinstance(label_key, str):
        raise ValueError(f"label_key must be a feature name, got {label_key!r}")
    if not isinstance(download, bool):
        raise ValueError(f"download must be true or false, got {download!r}")


def tfds_source(name: str, data_dir: str | os.PathLike | None = None,
                split: tuple[str, str] = ("train", "test"), label_key: str = "label",
                download: bool = False) -> Dataset:
    """A TensorFlow Datasets image set as a :class:`Dataset` (images NHWC in [0, 1]).

    ``name`` is one of :data:`TFDS_NAMES` (``svhn`` is an alias of ``svhn_cropped``), optionally
    with a config, e.g. ``emnist/balanced``. ``split`` gives the (train, test) split names.
    Any prepared format tfds reads without TensorFlow (array_record, parquet) is read; TFRecord
    needs TensorFlow. With ``download=False`` (the default) nothing is fetched: a set not
    prepared in ``data_dir`` raises ``FileNotFoundError`` naming the data set and the directory.
    ``download=True`` lets tfds fetch and prepare it there (as array_record) first, which needs
    a machine that reaches the data's source. Source: TensorFlow Datasets,
    https://www.tensorflow.org/datasets.
    """
    _check_tfds_source(name, data_dir, split, label_key, download)
    base, _, config = name.partition("/")
    base = _TFDS_ALIASES.get(base, base)
    full = f"{base}/{config}" if config else base
    tfds = _import_tfds()
    kwargs = {} if data_dir is None else {"data_dir": os.fspath(data_dir)}
    try:
        builder = tfds.builder(full, **kwargs)
    except (ValueError, KeyError, TypeError) as e:  # e.g. an unknown config name after the /
        raise ValueError(f"tfds cannot open {full!r}: {' '.join(str(e).split())}") from None
    if not builder.is_prepared() and download:
        # array_record, so the prepared set reads back without TensorFlow.
        builder.download_and_prepare(file_format="array_record")
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"tfds data set {full!r} is not prepared in {builder.data_dir} "
            f"(data_dir={data_dir if data_dir is not None else 'tfds default'}). fedrnd does "
            f"not download unless told: set data.source_options.download = true (or "
            f"tfds_source(..., download=True)) on a machine with internet, or there run `tfds "
            f"build {full} --file_format=array_record --data_dir=DIR`, then copy DIR here and "
            f"pass data_dir=DIR.")
    return _tfds_to_dataset(builder, full, split, label_key)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

SOURCES: dict[str, Callable[..., Dataset]] = {}
"""Data sources by name, each ``source(**options) -> Dataset``; filled by
:func:`register_source` (the built-ins below use it too)."""

_CHECKS: dict[str, Callable[..., None]] = {}
"""Cheap argument checks of each source, run by the source itself and, before anything is
loaded, by :func:`check_source_options` (config validation)."""

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


def register_source(name: str | Callable[..., Dataset] | None = None,
                    fn: Callable[..., Dataset] | None = None, *,
                    check: Callable[..., None] | None = None, replace: bool = False) -> Any:
    """Add a data source to :data:`SOURCES`.

    ``register_source("name", fn)``, or as a decorator: ``@register_source("name")``
    (``@register_source`` alone takes the function's own name). ``fn(**options)`` returns a
    :class:`~fedrnd.data.federated.Dataset`; its keyword arguments are
    ``data.source_options``, validated against the signature like a built-in's (a generator
    taking ``num_clients`` or ``seed`` gets the run's unless the options set them).
    ``check(**options)``: a cheap check run by config validation before anything is loaded
    (``ValueError`` whose message starts with the option at fault). A name that exists raises
    ``ValueError`` unless ``replace=True``; ``tfds:`` names are reserved.
    """
    if callable(name):
        return register_source(None, name, check=check, replace=replace)
    if fn is None:
        return lambda f: register_source(name, f, check=check, replace=replace)
    key = fn.__name__ if name is None else name
    if not isinstance(key, str) or not _NAME.fullmatch(key):
        raise ValueError(f"a data source name must be letters, digits, _ . + - (tfds:<name> "
                         f"is reserved); got {key!r}")
    if key in SOURCES and SOURCES[key] is not fn and not replace:
        raise ValueError(f"data source {key!r} is already registered; choose another name, or "
                         "pass replace=True to replace it")
    SOURCES[key] = fn
    if check is None:
        _CHECKS.pop(key, None)
    else:
        _CHECKS[key] = check
    return fn


register_source("digits", digits, check=_check_digits)
register_source("fashion_mnist", fashion_mnist, check=_check_fashion_mnist)
register_source("synthetic", synthetic, check=_check_synthetic)
register_source("gaussian_mixture", gaussian_mixture, check=_check_gaussian_mixture)


def _unknown_source(name: str) -> ValueError:
    close = difflib.get_close_matches(name, list(SOURCES), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"unknown data source {name!r}{hint}; allowed: {', '.join(SOURCES)}, or "
                      f"tfds:<name> with name in {', '.join(TFDS_NAMES + tuple(_TFDS_ALIASES))}")


def source_parameters(name: str) -> dict[str, inspect.Parameter]:
    """The options a source takes (``data.source_options``), by name, with their defaults."""
    if name.startswith("tfds:"):
        params = dict(inspect.signature(tfds_source).parameters)
        params.pop("name")
        return params
    if name not in SOURCES:
        raise _unknown_source(name)
    return dict(inspect.signature(SOURCES[name]).parameters)


def source_kwargs(name: str, options: dict[str, Any], num_clients: int, seed: int
                  ) -> dict[str, Any]:
    """``options`` plus what a run supplies: generators that make data per client get the
    run's client count and seed unless the options set them."""
    opts = dict(options)
    params = source_parameters(name)
    if "num_clients" in params:
        opts.setdefault("num_clients", num_clients)
    if "seed" in params:
        opts.setdefault("seed", seed)
    return opts


def check_source_options(name: str, options: dict[str, Any]) -> None:
    """Check a source's options without loading anything; ``ValueError`` names the option.

    ``options`` as :func:`load_source` would get them (see :func:`source_kwargs`).
    """
    params = source_parameters(name)
    bad = sorted(set(options) - set(params))
    if bad and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise ValueError(f"unknown option(s) {bad}; allowed: {', '.join(params)}")
    if name.startswith("tfds:"):
        _check_tfds_source(name[len("tfds:"):], **options)
    elif name in _CHECKS:
        _CHECKS[name](**options)


def load_source(name: str, **kwargs) -> Dataset:
    """Load a source by name: a key of :data:`SOURCES`, or ``"tfds:<name>"``."""
    if name.startswith("tfds:"):
        return tfds_source(name[len("tfds:"):], **kwargs)
    if name not in SOURCES:
        raise _unknown_source(name)
    return SOURCES[name](**kwargs)
