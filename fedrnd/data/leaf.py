"""Natural federated data sets in the LEAF JSON layout: FEMNIST (by writer), Shakespeare (by role).

LEAF (Caldas et al., 2018, https://github.com/TalwalkarLab/leaf) ships scripts that download
and preprocess each data set into JSON files::

    <root>/femnist/data/train/*.json      <root>/shakespeare/data/train/*.json
    <root>/femnist/data/test/*.json       <root>/shakespeare/data/test/*.json

Each file holds ``{"users": [...], "num_samples": [...], "user_data": {user: {"x": [...],
"y": [...]}}}``. Every LEAF user is one *natural client*: its train examples are the client's
training set, its test examples the client's held-out set, so the sources here fill
``Dataset.train_client``/``test_client`` and are meant for the ``natural`` partition.

fedrnd never downloads: run LEAF's ``preprocess.sh`` on a machine with internet (with
``-t sample``, so that every user has train *and* test examples), copy the directory, and
point ``data_dir`` (or ``$FEDRND_LEAF_DIR``) at it.

FEMNIST: ``x`` is 784 floats per example, a 28x28 greyscale image flattened row by row and
scaled to ``[0, 1]`` by LEAF (pixel / 255), where **1 is the white background** and the ink is
dark. The images are returned as ``[n, 28, 28, 1]`` float32 with these values unchanged;
``invert=True`` gives ``1 - x`` (ink 1, background 0, the MNIST convention). ``y`` is one of
62 classes: digits 0-9, upper-case letters 10-35, lower-case letters 36-61.

Shakespeare: ``x`` is a string of 80 characters, ``y`` the character that follows. Characters
map to ids by LEAF's 80-character vocabulary :data:`SHAKESPEARE_VOCAB` (id = position); any
other character becomes the out-of-vocabulary id 80 (LEAF's own code would give it -1), so
there are 81 classes. ``x`` is returned as int32 token ids ``[n, 80]`` (stored as exact float32
values once on the device pool, like every feature), ``y`` as int32 class ids.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedrnd.data.federated import Dataset
from fedrnd.data.sources import _check_int, _check_seed, _readonly, register_source

__all__ = [
    "LEAF_ENV",
    "SHAKESPEARE_OOV",
    "SHAKESPEARE_VOCAB",
    "femnist",
    "leaf_users",
    "shakespeare",
    "shakespeare_tokens",
]

LEAF_ENV = "FEDRND_LEAF_DIR"

SHAKESPEARE_VOCAB = ("\n !\"&'(),-.0123456789:;>?"
                     "ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}")
"""LEAF's Shakespeare vocabulary (``ALL_LETTERS`` in LEAF's ``language_utils.py``): newline,
space, ``! " & ' ( ) , - .``, the digits, ``: ; > ?``, A-Z, ``[ ]``, a-z and ``}``; 80
characters, a character's id is its position."""

SHAKESPEARE_OOV = len(SHAKESPEARE_VOCAB)
"""The id (80) of every character outside :data:`SHAKESPEARE_VOCAB`."""

_SELECT = ("first", "random")


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def _leaf_root(data_dir: str | os.PathLike | None) -> Path | None:
    if data_dir is None:
        data_dir = os.environ.get(LEAF_ENV) or None
    return None if data_dir is None else Path(data_dir).expanduser().resolve()


def _split_dir(root: Path, name: str) -> Path | None:
    """The directory holding ``train/`` and ``test/``: ``root`` may be LEAF's ``data``
    directory (``root/<name>/data``), the data set's own (``root/data``), or that itself."""
    for cand in (root / name / "data", root / "data", root):
        if (cand / "train").is_dir() and (cand / "test").is_dir():
            return cand
    return None


def _missing_leaf(name: str, root: Path | None, what: str = "") -> FileNotFoundError:
    """The one message for missing LEAF data; ``what`` says what is missing (``root`` set)."""
    where = (f"data_dir is not set (data.source_options.data_dir in a config) and neither is "
             f"${LEAF_ENV}" if root is None else what)
    flags = "-s niid --sf 0.05 -k 0 -t sample" if name == "femnist" else \
        "-s niid --sf 0.2 -k 0 -t sample -tf 0.8"
    return FileNotFoundError(
        f"LEAF {name} data not found: {where}. Expected the JSON files of LEAF's preprocessing "
        f"as <data_dir>/{name}/data/train/*.json and <data_dir>/{name}/data/test/*.json "
        f"(data_dir may also be the {name} directory itself or its data/ directory). fedrnd "
        f"never downloads, and cannot here: on a machine with internet clone "
        f"https://github.com/TalwalkarLab/leaf, run `./preprocess.sh {flags}` in "
        f"leaf/data/{name} (keep -t sample so every user has train and test examples), then "
        f"copy leaf/data/{name} here and pass data_dir (data.source_options.data_dir in a "
        f"config: the directory holding {name}/) or set {LEAF_ENV}.")


_Converter = Callable[[str, list, list], tuple[np.ndarray, np.ndarray]]
"""``convert(where, x, y) -> (x array, y array)`` of one user's examples in one file;
``where`` names the file, split and user for messages."""

_Users = dict[str, tuple[np.ndarray, np.ndarray]]


def _read_split(directory: Path, split: str, convert: _Converter) -> _Users:
    """``user -> (x, y)`` arrays from every ``*.json`` of one split (files in name order).

    Each file's lists become arrays before the next file is read, so the peak memory is the
    arrays plus one file's Python objects (JSON floats cost ~30 bytes each).
    """
    chunks: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for path in sorted(directory.glob("*.json")):
        try:
            with open(path, encoding="utf-8") as f:
                blob = json.load(f)
        except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"{path}: cannot read this LEAF JSON file ({type(e).__name__}: "
                             f"{e}); it is truncated or corrupt, re-run LEAF's preprocessing"
                             ) from None
        data = blob.get("user_data") if isinstance(blob, dict) else None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not a LEAF JSON file (expected an object with "
                             "'users', 'num_samples' and 'user_data')")
        for user, rec in data.items():
            where = f"{path}: {split} user {user!r}"
            if (not isinstance(rec, dict) or not isinstance(rec.get("x"), list)
                    or not isinstance(rec.get("y"), list) or len(rec["x"]) != len(rec["y"])):
                raise ValueError(f"{where} needs lists 'x' and 'y' of equal length in "
                                 "user_data")
            if rec["x"]:
                chunks.setdefault(str(user), []).append(convert(where, rec["x"], rec["y"]))
        del blob, data
    out = {}
    for user, parts in chunks.items():
        xs, ys = zip(*parts, strict=True)
        if len({x.shape[1:] for x in xs}) != 1:
            raise ValueError(f"{directory}: {split} user {user!r} has examples of different "
                             f"shapes {sorted({x.shape[1:] for x in xs})} in different files")
        out[user] = np.concatenate(xs), np.concatenate(ys)
    return out


def _read_leaf(name: str, root: Path | None, convert: _Converter
               ) -> tuple[Path, _Users, _Users]:
    if root is None:
        raise _missing_leaf(name, None)
    base = _split_dir(root, name)
    if base is None:
        raise _missing_leaf(name, root, f"no train/ and test/ directories under {root}")
    train = _read_split(base / "train", "train", convert)
    if not train:
        raise _missing_leaf(name, root, f"no user with examples in {base / 'train'}/*.json")
    return base, train, _read_split(base / "test", "test", convert)


def _select_users(train: _Users, test: _Users, num_clients: int | None, min_samples: int,
                  select: str, seed: int) -> list[str]:
    """Users kept as clients, in client order (sorted by user id)."""
    def size(u: str) -> int:
        return len(train[u][1]) + (len(test[u][1]) if u in test else 0)

    users = sorted(u for u in train if size(u) >= min_samples)
    if num_clients is not None and num_clients < len(users):
        if select == "first":
            users = users[:num_clients]
        else:
            pick = np.random.default_rng(seed).choice(len(users), num_clients, replace=False)
            users = [users[i] for i in np.sort(pick)]
    return users


def _check_leaf(data_dir: str | os.PathLike | None = None, num_clients: int | None = None,
                min_samples: int = 1, select: str = "first", seed: int = 0) -> None:
    if data_dir is not None and not isinstance(data_dir, str | os.PathLike):
        raise ValueError(f"data_dir must be a directory path, got {data_dir!r}")
    if num_clients is not None:
        _check_int("num_clients", num_clients, 1)
    _check_int("min_samples", min_samples, 1)
    if select not in _SELECT:
        raise ValueError(f"select must be one of {', '.join(map(repr, _SELECT))}, got "
                         f"{select!r}")
    _check_seed(seed)


def _natural(name: str, base: Path, train: _Users, test: _Users, users: list[str],
             num_classes: int) -> Dataset:
    """The kept ``users`` as natural clients ``0..len(users)-1`` of one :class:`Dataset`."""
    if not users:
        raise ValueError(f"min_samples / num_clients leave no LEAF {name} user in {base} "
                         f"({len(train)} users in train/)")
    if not any(u in test for u in users):
        raise ValueError(f"LEAF {name} in {base}: none of the {len(users)} kept users has test "
                         "examples; the data was probably split by user (-t user): re-run "
                         "LEAF's preprocess.sh with -t sample")
    out = {}
    for split, data in (("train", train), ("test", test)):
        mine = [(c, data[u]) for c, u in enumerate(users) if u in data]
        shape = train[users[0]][0].shape[1:]
        for c, (x, _) in mine:
            if x.shape[1:] != shape:
                raise ValueError(f"LEAF {name} in {base}: {split} examples of user "
                                 f"{users[c]!r} have shape {x.shape[1:]} but those of "
                                 f"{users[0]!r} {shape}; every example needs the same shape")
        out[f"x_{split}"] = np.concatenate([xy[0] for _, xy in mine])
        out[f"y_{split}"] = np.concatenate([xy[1] for _, xy in mine])
        out[f"{split}_client"] = np.concatenate(
            [np.full(len(xy[1]), c, np.int32) for c, xy in mine])
    _readonly(*out.values())
    return Dataset(**out, num_classes=num_classes, name=name)


# --------------------------------------------------------------------------------------------
# FEMNIST
# --------------------------------------------------------------------------------------------


def _femnist_convert(where: str, x: list, y: list) -> tuple[np.ndarray, np.ndarray]:
    try:
        xa = np.asarray(x, np.float32)
        ya = np.asarray(y)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: x must be lists of 784 numbers, y integers") from None
    if xa.ndim != 2 or xa.shape[1] != 784:
        raise ValueError(f"{where}: each x must be 784 pixel values (a flattened 28x28 "
                         f"image), got x of shape {xa.shape}")
    if ya.ndim != 1 or not np.issubdtype(ya.dtype, np.integer):
        raise ValueError(f"{where}: y must be integer class ids in [0, 62), got "
                         f"{ya[:5].tolist()}")
    return xa.reshape(-1, 28, 28, 1), ya.astype(np.int32)  # LEAF flattens row by row


def _load_femnist(root: Path | None, num_clients: int | None, min_samples: int, select: str,
                  seed: int, invert: bool) -> Dataset:
    base, train, test = _parsed("femnist", root)
    users = _select_users(train, test, num_clients, min_samples, select, seed)
    d = _natural("femnist", base, train, test, users, 62)
    if invert:
        x_train, x_test = 1.0 - d.x_train, 1.0 - d.x_test
        _readonly(x_train, x_test)
        d = dataclasses.replace(d, x_train=x_train, x_test=x_test)
    return d


def _check_femnist(data_dir: str | os.PathLike | None = None, num_clients: int | None = None,
                   min_samples: int = 1, select: str = "first", seed: int = 0,
                   invert: bool = False) -> None:
    _check_leaf(data_dir, num_clients, min_samples, select, seed)
    if not isinstance(invert, bool):
        raise ValueError(f"invert must be true or false, got {invert!r}")


def femnist(data_dir: str | os.PathLike | None = None, num_clients: int | None = None,
            min_samples: int = 1, select: str = "first", seed: int = 0,
            invert: bool = False) -> Dataset:
    """LEAF FEMNIST: handwritten characters, one natural client per writer (62 classes).

    Images ``[n, 28, 28, 1]`` float32 in ``[0, 1]`` as LEAF stores them (1 = white background;
    ``invert=True``: 1 = ink). Reads ``<data_dir>/femnist/data/{train,test}/*.json``
    (``data_dir``, else ``$FEDRND_LEAF_DIR``); never downloads (``FileNotFoundError`` saying
    how to produce the files). Writers with no training example, or fewer than
    ``min_samples`` examples (train and test together, like LEAF's ``-k``), are dropped; of
    the rest, ``num_clients`` (``None``: all) are kept: the first by sorted writer id
    (``select="first"``) or a ``seed``-ed random sample (``select="random"``). Client ``c`` is
    the ``c``-th kept writer in sorted order (:func:`leaf_users` lists them); use the
    ``natural`` partition. The parsed files are cached per directory (arrays are read-only).
    Source: Caldas et al. (2018), LEAF; Cohen et al. (2017), EMNIST.
    """
    _check_femnist(data_dir, num_clients, min_samples, select, seed, invert)
    return _load_femnist(_leaf_root(data_dir), num_clients, min_samples, select, seed, invert)


# --------------------------------------------------------------------------------------------
# Shakespeare
# --------------------------------------------------------------------------------------------

_CHAR_ID = {ch: i for i, ch in enumerate(SHAKESPEARE_VOCAB)}


def shakespeare_tokens(text: str) -> np.ndarray:
    """Token ids (int32) of ``text`` under :data:`SHAKESPEARE_VOCAB`; other characters -> 80."""
    return np.fromiter((_CHAR_ID.get(ch, SHAKESPEARE_OOV) for ch in text), np.int32, len(text))


def _shakespeare_convert(where: str, x: list, y: list) -> tuple[np.ndarray, np.ndarray]:
    if not all(isinstance(t, str) for t in x) or len({len(t) for t in x}) != 1:
        lengths = sorted({len(t) for t in x if isinstance(t, str)})
        raise ValueError(f"{where}: every x must be a string of the same length (LEAF uses 80 "
                         f"characters), got lengths {lengths[:5]}")
    if not all(isinstance(t, str) and len(t) == 1 for t in y):
        raise ValueError(f"{where}: every y must be one character (the next one)")
    return np.stack([shakespeare_tokens(t) for t in x]), shakespeare_tokens("".join(y))


def _load_shakespeare(root: Path | None, num_clients: int | None, min_samples: int,
                      select: str, seed: int) -> Dataset:
    base, train, test = _parsed("shakespeare", root)
    users = _select_users(train, test, num_clients, min_samples, select, seed)
    return _natural("shakespeare", base, train, test, users, SHAKESPEARE_OOV + 1)


def shakespeare(data_dir: str | os.PathLike | None = None, num_clients: int | None = None,
                min_samples: int = 1, select: str = "first", seed: int = 0) -> Dataset:
    """LEAF Shakespeare: next-character prediction, one natural client per speaking role.

    ``x``: int32 token ids ``[n, 80]`` (80 characters of a role's lines), ``y``: the id of the
    next character; 81 classes (LEAF's 80 characters, :data:`SHAKESPEARE_VOCAB`, plus 80 for
    any other character). Reads ``<data_dir>/shakespeare/data/{train,test}/*.json``
    (``data_dir``, else ``$FEDRND_LEAF_DIR``); never downloads. ``num_clients``,
    ``min_samples``, ``select`` and ``seed`` pick the roles as in :func:`femnist`; use the
    ``natural`` partition and a text model such as ``char_lstm``.
    Source: Caldas et al. (2018), LEAF; McMahan et al. (2017).
    """
    _check_leaf(data_dir, num_clients, min_samples, select, seed)
    return _load_shakespeare(_leaf_root(data_dir), num_clients, min_samples, select, seed)


def leaf_users(name: str, data_dir: str | os.PathLike | None = None,
               num_clients: int | None = None, min_samples: int = 1, select: str = "first",
               seed: int = 0) -> list[str]:
    """The LEAF user ids (writers, roles) that ``femnist``/``shakespeare`` with the same
    arguments keep, in client order: client ``c`` is ``leaf_users(...)[c]``."""
    if name not in ("femnist", "shakespeare"):
        raise ValueError(f"name must be 'femnist' or 'shakespeare', got {name!r}")
    _check_leaf(data_dir, num_clients, min_samples, select, seed)
    _, train, test = _parsed(name, _leaf_root(data_dir))
    return _select_users(train, test, num_clients, min_samples, select, seed)


@functools.lru_cache(maxsize=2)
def _parsed(name: str, root: Path | None) -> tuple[Path, _Users, _Users]:
    """Every user's arrays of one LEAF data set (read-only), cached per directory: parsing
    the JSON is the slow part, so other selections of users reuse it."""
    convert = _femnist_convert if name == "femnist" else _shakespeare_convert
    base, train, test = _read_leaf(name, root, convert)
    for x, y in (*train.values(), *test.values()):
        _readonly(x, y)
    return base, train, test


register_source("femnist", femnist, check=_check_femnist)
register_source("shakespeare", shakespeare, check=_check_leaf)
