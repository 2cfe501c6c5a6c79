"""Natural federated data sets in TensorFlow Federated's h5 files: EMNIST (by writer) and
Shakespeare (by role).

``tff.simulation.datasets.emnist.load_data`` and ``...shakespeare.load_data`` download these
files, one per split, into TFF's cache (``~/.keras/datasets``)::

    fed_emnist_train.h5, fed_emnist_test.h5                      (62 classes, 3,400 writers)
    fed_emnist_digitsonly_train.h5, fed_emnist_digitsonly_test.h5  (10 classes, 3,383 writers)
    shakespeare_train.h5, shakespeare_test.h5                    (715 roles)

Inside, every client is a group ``examples/<client_id>``: EMNIST holds ``pixels`` (float32
``[n, 28, 28]`` in ``[0, 1]``, **1 = white background**, as LEAF stores them) and ``label``
(int ``[n]``); Shakespeare holds ``snippets`` (byte strings, a role's lines). Each client has
train examples in the train file and held-out examples in the test file, so the sources here
fill ``Dataset.train_client``/``test_client`` for the ``natural`` partition, like
:mod:`fedrnd.data.leaf`.

Reading needs ``h5py`` (``pip install 'fedrnd[tff]'``); fedrnd never downloads: copy the
files from a machine where TFF fetched them and point ``data_dir`` (or ``$FEDRND_TFF_DIR``)
at their directory.

Shakespeare examples are LEAF's task on TFF's text: every window of ``seq_len`` (80)
characters of a snippet, every ``stride`` characters, is an input and the character after it
the label, with LEAF's vocabulary (:data:`~fedrnd.data.leaf.SHAKESPEARE_VOCAB`, 81 classes
with the out-of-vocabulary id); snippets of ``seq_len`` characters or fewer give no example.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import numpy as np

from fedrnd.data.federated import Dataset
from fedrnd.data.leaf import (
    SHAKESPEARE_OOV,
    _check_leaf,
    _natural,
    _select_users,
    shakespeare_tokens,
)
from fedrnd.data.sources import _check_int, _readonly, register_source

__all__ = ["TFF_ENV", "read_tff_h5", "tff_emnist", "tff_shakespeare"]

TFF_ENV = "FEDRND_TFF_DIR"

_FILES = {"emnist": "fed_emnist", "emnist_digits": "fed_emnist_digitsonly",
          "shakespeare": "shakespeare"}

_Users = dict[str, tuple[np.ndarray, np.ndarray]]


def _h5py():
    try:
        import h5py
    except ImportError as e:
        raise ImportError("the TFF h5 sources (tff_emnist, tff_shakespeare) read h5 files with "
                          "h5py, which is not installed: pip install 'fedrnd[tff]' (or pip "
                          "install h5py)") from e
    return h5py


def _tff_root(data_dir: str | os.PathLike | None) -> Path | None:
    if data_dir is None:
        data_dir = os.environ.get(TFF_ENV) or None
    return None if data_dir is None else Path(data_dir).expanduser().resolve()


def _file(root: Path | None, stem: str, split: str) -> Path:
    name = f"{stem}_{split}.h5"
    where = (f"data_dir is not set (data.source_options.data_dir in a config) and neither is "
             f"${TFF_ENV}" if root is None else f"{root / name} does not exist")
    if root is not None and (root / name).is_file():
        return root / name
    raise FileNotFoundError(
        f"TFF h5 file {name} not found: {where}. fedrnd never downloads: on a machine with "
        f"internet, tensorflow_federated's tff.simulation.datasets load_data() saves "
        f"{stem}_train.h5 and {stem}_test.h5 under ~/.keras/datasets; copy both into one "
        f"directory and pass it as data_dir or set ${TFF_ENV}.")


def read_tff_h5(path: str | os.PathLike, fields: tuple[str, ...]) -> dict[str, dict]:
    """``client_id -> {field: array}`` of a TFF h5 file (``examples/<client_id>/<field>``)."""
    h5py = _h5py()
    out: dict[str, dict] = {}
    try:
        with h5py.File(path, "r") as f:
            if "examples" not in f:
                raise ValueError(f"{path}: not a TFF federated h5 file (no 'examples' group)")
            for cid, group in f["examples"].items():
                missing = [k for k in fields if k not in group]
                if missing:
                    raise ValueError(f"{path}: client {cid!r} has no {', '.join(missing)} "
                                     f"(expected examples/<client_id>/{'|'.join(fields)})")
                out[str(cid)] = {k: group[k][()] for k in fields}
    except OSError as e:
        raise ValueError(f"{path}: cannot read this h5 file ({e}); it is truncated or corrupt"
                         ) from None
    return out


def _emnist_split(path: Path) -> _Users:
    users = {}
    for cid, rec in read_tff_h5(path, ("pixels", "label")).items():
        x = np.asarray(rec["pixels"], np.float32)
        y = np.asarray(rec["label"]).reshape(-1)
        if x.ndim != 3 or x.shape[1:] != (28, 28) or len(x) != len(y):
            raise ValueError(f"{path}: client {cid!r} needs pixels [n, 28, 28] and label [n], "
                             f"got {x.shape} and {y.shape}")
        if len(y):
            users[cid] = x[..., None], y.astype(np.int32)
    return users


def _windows(text: str, seq_len: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    ids = shakespeare_tokens(text)
    starts = np.arange(0, len(ids) - seq_len, stride)
    if not len(starts):
        return np.zeros((0, seq_len), np.int32), np.zeros(0, np.int32)
    return ids[starts[:, None] + np.arange(seq_len)], ids[starts + seq_len]


def _shakespeare_split(path: Path, seq_len: int, stride: int) -> _Users:
    users = {}
    for cid, rec in read_tff_h5(path, ("snippets",)).items():
        parts = [_windows(s.decode("utf-8") if isinstance(s, bytes) else str(s), seq_len,
                          stride) for s in np.asarray(rec["snippets"]).reshape(-1)]
        x = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, seq_len), np.int32)
        y = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int32)
        if len(y):
            users[cid] = x, y
    return users


@functools.lru_cache(maxsize=2)
def _parsed(kind: str, root: Path | None, seq_len: int = 80, stride: int = 1
            ) -> tuple[Path, _Users, _Users]:
    stem = _FILES[kind]
    paths = [_file(root, stem, s) for s in ("train", "test")]
    read = _emnist_split if kind != "shakespeare" else functools.partial(
        _shakespeare_split, seq_len=seq_len, stride=stride)
    train, test = (read(p) for p in paths)
    if not train:
        raise ValueError(f"{paths[0]}: no client has an example")
    for x, y in (*train.values(), *test.values()):
        _readonly(x, y)
    return paths[0].parent, train, test


def _check_emnist(data_dir: str | os.PathLike | None = None, only_digits: bool = False,
                  num_clients: int | None = None, min_samples: int = 1, select: str = "first",
                  seed: int = 0, invert: bool = False) -> None:
    _check_leaf(data_dir, num_clients, min_samples, select, seed)
    for name, v in (("only_digits", only_digits), ("invert", invert)):
        if not isinstance(v, bool):
            raise ValueError(f"{name} must be true or false, got {v!r}")


def tff_emnist(data_dir: str | os.PathLike | None = None, only_digits: bool = False,
               num_clients: int | None = None, min_samples: int = 1, select: str = "first",
               seed: int = 0, invert: bool = False) -> Dataset:
    """TFF's federated EMNIST from its h5 files, one natural client per writer.

    Reads ``fed_emnist_{train,test}.h5`` (62 classes) or, with ``only_digits``,
    ``fed_emnist_digitsonly_{train,test}.h5`` (10 classes) from ``data_dir`` (else
    ``$FEDRND_TFF_DIR``); needs ``h5py``; never downloads. Images ``[n, 28, 28, 1]`` float32
    with 1 = background as stored (``invert=True``: 1 = ink). ``num_clients``,
    ``min_samples``, ``select`` and ``seed`` pick the writers as in
    :func:`~fedrnd.data.leaf.femnist` (client ``c`` is the ``c``-th kept writer by sorted
    id); use the ``natural`` partition. Source: Caldas et al. (2018), LEAF; TFF.
    """
    _check_emnist(data_dir, only_digits, num_clients, min_samples, select, seed, invert)
    kind = "emnist_digits" if only_digits else "emnist"
    base, train, test = _parsed(kind, _tff_root(data_dir))
    users = _select_users(train, test, num_clients, min_samples, select, seed)
    d = _natural(f"tff_{kind}", base, train, test, users, 10 if only_digits else 62)
    if invert:
        x_train, x_test = 1.0 - d.x_train, 1.0 - d.x_test
        _readonly(x_train, x_test)
        d = dataclasses.replace(d, x_train=x_train, x_test=x_test)
    return d


def _check_shakespeare(data_dir: str | os.PathLike | None = None,
                       num_clients: int | None = None, min_samples: int = 1,
                       select: str = "first", seed: int = 0, seq_len: int = 80,
                       stride: int = 1) -> None:
    _check_leaf(data_dir, num_clients, min_samples, select, seed)
    _check_int("seq_len", seq_len, 1)
    _check_int("stride", stride, 1)


def tff_shakespeare(data_dir: str | os.PathLike | None = None, num_clients: int | None = None,
                    min_samples: int = 1, select: str = "first", seed: int = 0,
                    seq_len: int = 80, stride: int = 1) -> Dataset:
    """TFF's federated Shakespeare from its h5 files: next character, one client per role.

    Reads ``shakespeare_{train,test}.h5`` from ``data_dir`` (else ``$FEDRND_TFF_DIR``); needs
    ``h5py``; never downloads. ``x``: int32 token ids ``[n, seq_len]``, every ``stride``-th
    window of a snippet; ``y``: the next character's id; 81 classes (LEAF's vocabulary plus
    the out-of-vocabulary id), so models for ``shakespeare`` (``char_lstm``) run unchanged.
    Roles are picked as in :func:`~fedrnd.data.leaf.femnist`; use the ``natural`` partition.
    Source: Caldas et al. (2018), LEAF; McMahan et al. (2017); TFF.
    """
    _check_shakespeare(data_dir, num_clients, min_samples, select, seed, seq_len, stride)
    base, train, test = _parsed("shakespeare", _tff_root(data_dir), seq_len, stride)
    users = _select_users(train, test, num_clients, min_samples, select, seed)
    return _natural("tff_shakespeare", base, train, test, users, SHAKESPEARE_OOV + 1)


register_source("tff_emnist", tff_emnist, check=_check_emnist)
register_source("tff_shakespeare", tff_shakespeare, check=_check_shakespeare)
