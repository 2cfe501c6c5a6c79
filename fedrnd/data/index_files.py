"""Read a published client partition: a file that maps each client to rows of a training set.

Papers often publish their partitions as files, e.g. the NTK-FL and NTK-DFL authors'
``user_dataidx_map_<alpha>_<k>.dat`` (a pickled ``{client id: int array of rows}``). This module
reads such a map without running anything the file asks for:

* ``.json``: ``{"<client id>": [rows, ...], ...}`` or a list of row lists;
* ``.npz``: one integer array per client, named by its client id (``np.load`` with
  ``allow_pickle=False``);
* ``.npy``: a 2-d integer array, one row of row indices per client;
* ``.dat`` / ``.pkl`` / ``.pickle``: a pickled dict (or list) of integer arrays or lists, read by
  a restricted unpickler (:class:`SafeIndexUnpickler`) that resolves only the handful of globals
  a pickled numpy integer array needs (``ndarray``, ``dtype``, the array reconstructor and
  ``OrderedDict``); any other global (``os.system``, ``builtins.eval``, a class of the file's
  choosing) is refused before it is looked up, so a hostile file raises instead of running
  code.

:func:`read_index_map` returns the clients in the order of their ids (numeric ids sorted as
numbers) as int64 arrays, checked to be non-empty, one-dimensional and integral.
"""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["INDEX_SUFFIXES", "SafeIndexUnpickler", "read_index_map"]

INDEX_SUFFIXES = (".json", ".npz", ".npy", ".dat", ".pkl", ".pickle")
"""File name endings :func:`read_index_map` reads."""

_ALLOWED_GLOBALS = frozenset({
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol 5 pickles of arrays
    ("numpy._core.numeric", "_frombuffer"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # protocol 2 writes bytes as encode(text, "latin1"): a pure function
})


class SafeIndexUnpickler(pickle.Unpickler):
    """An unpickler that builds only dicts, lists, tuples, numbers and numpy arrays.

    ``find_class`` is the one place a pickle names code to run; it answers only for the globals
    a pickled numpy array (or ``OrderedDict``) needs and raises ``pickle.UnpicklingError`` for
    every other, without importing anything the file names.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: an index file may hold only "
                "dicts/lists of integer arrays")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[11:]  # numpy >= 2 renamed it (the old one warns)
        elif module.startswith("numpy._core.") and not hasattr(np, "_core"):
            module = "numpy.core." + module[12:]  # a numpy 2 file read under numpy 1
        return super().find_class(module, name)


def _clients_of(obj: Any, where: str) -> list[tuple[Any, Any]]:
    if isinstance(obj, Mapping):
        items = list(obj.items())

        def order(kv):
            k = kv[0]
            try:
                return (0, int(k), "")
            except (TypeError, ValueError):
                return (1, 0, str(k))
        return sorted(items, key=order)
    if isinstance(obj, Sequence) and not isinstance(obj, str | bytes) or isinstance(obj,
                                                                                   np.ndarray):
        return list(enumerate(obj))
    raise ValueError(f"{where}: expected a mapping of client id -> rows or a list of row "
                     f"lists, found {type(obj).__name__}")


def _rows(value: Any, client: Any, where: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 1:
        raise ValueError(f"{where}: client {client!r} holds an array of shape {arr.shape}; "
                         "expected a 1-d list of row indices")
    if arr.size == 0:
        raise ValueError(f"{where}: client {client!r} has no rows")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{where}: client {client!r} holds non-integer row indices")
    elif arr.dtype.kind not in "iu":
        raise ValueError(f"{where}: client {client!r} holds {arr.dtype} values; expected "
                         "integer row indices")
    return arr.astype(np.int64)


def read_index_map(path: str | Path) -> list[np.ndarray]:
    """The per-client row arrays in ``path`` (see the module docstring for the formats).

    Raises ``FileNotFoundError`` if the file is missing and ``ValueError`` (message starting
    with the path) for an unknown suffix, a file that does not parse, a refused pickle global,
    or a client whose rows are empty, not 1-d or not integers.
    """
    p = Path(path)
    where = str(p)
    suffix = p.suffix.lower()
    if suffix not in INDEX_SUFFIXES:
        raise ValueError(f"{where}: unknown index-file type {suffix or '(none)'!r}; allowed: "
                         f"{', '.join(INDEX_SUFFIXES)}")
    if not p.is_file():
        raise FileNotFoundError(f"{where}: no such index file")
    try:
        if suffix == ".json":
            obj = json.loads(p.read_text())
        elif suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                obj = {k: z[k] for k in z.files}
        elif suffix == ".npy":
            obj = np.load(p, allow_pickle=False)
            if obj.ndim != 2:
                raise ValueError(f"a .npy index file must be 2-d (clients x rows), got shape "
                                 f"{obj.shape}")
        else:
            obj = SafeIndexUnpickler(io.BytesIO(p.read_bytes())).load()
    except (pickle.UnpicklingError, json.JSONDecodeError, ValueError, EOFError,
            AttributeError, ImportError, IndexError, TypeError, KeyError) as e:
        raise ValueError(f"{where}: cannot read the index file: {e}") from None
    clients = _clients_of(obj, where)
    if not clients:
        raise ValueError(f"{where}: the index file holds no clients")
    return [_rows(v, k, where) for k, v in clients]
