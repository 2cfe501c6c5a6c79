"""Plug-ins: code outside fedrnd that adds methods, models, partitions, data sources or local
optimizers.

A plug-in is a Python file or an importable module that, when imported, calls the register
functions (:func:`fedrnd.register_algorithm`, ``register_model``, ``register_optimizer``,
``register_partition``, ``register_source``). The built-ins enter the same tables the same way, so once loaded a
plug-in's entries are validated, listed (``fedrnd list``) and run exactly like theirs.
Plug-ins are loaded

* from a config: ``plugins = ["my_method.py", "my_pkg.my_module"]``; a file path is taken
  from the config file's directory, a module name must be importable as is. They are loaded
  before the config is checked, so its names are known to validation;
* from the command line: ``fedrnd run|compare|list --plugin FILE_OR_MODULE`` (repeatable;
  paths from the working directory);
* from installed packages: entry points of the group ``fedrnd.plugins`` (in a package's
  ``pyproject.toml``: ``[project.entry-points."fedrnd.plugins"] name = "pkg.module"``), loaded
  on demand, i.e. when a config names something no loaded table has, and by ``fedrnd list``.
  An entry point names a module whose import registers, or a function called with no
  arguments that does.

Loading is idempotent (a file or module is executed once per process, so a config validated
twice does not register twice), and a plug-in that fails leaves the tables as they were:
its error (:class:`PluginError`, a ``ValueError``, so the CLI reports it in one paragraph
and exits with code 2) names where it was listed and what went wrong, with the line of the
plug-in that raised.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

ENTRY_POINT_GROUP = "fedrnd.plugins"

_LOADED: dict[str, ModuleType] = {}
"""Loaded plug-ins by resolved file path or module name."""
_ORIGIN: dict[str, str] = {}
"""Module ``__name__`` -> the plug-in as it was given (shown by ``fedrnd list``)."""
_ENTRY_POINTS: dict[str, str] = {}
"""Entry points loaded so far: name -> value."""


class PluginError(ValueError):
    """A plug-in that could not be loaded; the message says where it was listed and why."""


def is_file(spec: str) -> bool:
    """Whether a plug-in spec is a file path (``*.py`` or containing a path separator) rather
    than a module name."""
    return spec.endswith(".py") or "/" in spec or os.sep in spec


def resolve(spec: str, base_dir: str | os.PathLike | None = None) -> str:
    """A file spec as an absolute path (relative ones taken from ``base_dir``, default the
    working directory); a module name unchanged."""
    if not is_file(spec):
        return spec
    p = Path(spec).expanduser()
    if not p.is_absolute():
        p = Path(base_dir if base_dir is not None else os.getcwd()) / p
    return os.path.normpath(p)


@contextlib.contextmanager
def registry_snapshot() -> Iterator[None]:
    """Restore the five registries (and their metadata) if the block raises.

    A plug-in that fails halfway through must not leave half of its entries behind: loading
    it again after a fix would then refuse its names as duplicates.
    """
    from fedrnd.algorithms import ALGORITHMS
    from fedrnd.data import partition, sources
    from fedrnd.engine import optim
    from fedrnd.models import _core as models

    tables: list[Any] = [ALGORITHMS, models.MODELS, models._IMAGE_MODELS, partition.PARTITIONS,
                         partition.PARTITION_INFO, sources.SOURCES, sources._CHECKS,
                         optim.REGISTERED_OPTIMIZERS, optim._REGISTERED_OPTIONS]
    saved = [t.copy() for t in tables]
    try:
        yield
    except BaseException:
        for t, s in zip(tables, saved, strict=True):
            t.clear()
            t.update(s)
        raise


def _where_failed(err: BaseException, path: str | None) -> str:
    """`` (at FILE line N)``: the innermost line of the plug-in that raised (no traceback
    is printed, so this is how the author finds it)."""
    if isinstance(err, SyntaxError) and err.filename and err.lineno:
        return f" (at {err.filename} line {err.lineno})"
    frames = traceback.extract_tb(err.__traceback__)
    if path is not None:
        mine = [f for f in frames if os.path.normpath(f.filename) == path]
    else:  # a module: the innermost frame outside the import machinery
        mine = [f for f in frames if not f.filename.startswith("<")
                and "importlib" not in Path(f.filename).parts and f.filename != __file__]
    last = mine[-1] if mine else None
    return f" (at {last.filename} line {last.lineno})" if last else ""


def _module_name(path: str) -> str:
    """A private, unique module name for a plug-in file: its stem plus a hash of its path, so
    a plug-in called ``json.py`` cannot shadow the standard library."""
    stem = re.sub(r"\W", "_", Path(path).stem)
    return f"_fedrnd_plugin_{stem}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"


def _exec_file(path: str) -> ModuleType:
    name = _module_name(path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    # Registered before running: dataclasses and typing.get_type_hints (config validation
    # reads option types) look the module up by name.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def load_plugin(spec: str, base_dir: str | os.PathLike | None = None,
                where: str | None = None) -> ModuleType:
    """Load one plug-in (a file path or a module name); see the module docstring.

    ``where`` names the plug-in in errors (``plugins[0]``, ``--plugin``); relative file paths
    are taken from ``base_dir`` (default: the working directory).
    """
    label = (f"plug-in {spec!r}" if not where else f"{where} {spec!r}"
             if where.startswith("--") else f"{where} = {spec!r}")
    if not isinstance(spec, str) or not spec.strip():
        raise PluginError(f"{label}: a plug-in is a .py file path or a module name")
    key = resolve(spec.strip(), base_dir)
    if key in _LOADED:
        return _LOADED[key]
    path = key if is_file(key) else None
    if path is not None and not Path(path).is_file():
        # Config files list theirs already resolved (from the config's directory).
        raise PluginError(f"{label}: no such file" + ("" if path == spec else f" {path}"))
    try:
        with registry_snapshot():
            module = _exec_file(path) if path is not None else importlib.import_module(key)
    except (Exception, SystemExit) as e:
        msg = " ".join(f"{type(e).__name__}: {e}".split())
        raise PluginError(f"{label} could not be loaded: {msg}{_where_failed(e, path)}"
                          ) from None
    _LOADED[key] = module
    _ORIGIN[module.__name__] = spec
    return module


def load_plugins(specs: Sequence[str], base_dir: str | os.PathLike | None = None,
                 where: str | None = "plugins") -> list[ModuleType]:
    """Load plug-ins in order; errors name each as ``{where}[i]`` (``plugins[0]``)."""
    if isinstance(specs, str):
        specs = [specs]
    return [load_plugin(s, base_dir, f"{where}[{i}]" if where else None)
            for i, s in enumerate(specs)]


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def load_entry_points() -> list[str]:
    """Load every installed ``fedrnd.plugins`` entry point not loaded yet; their names."""
    done = []
    for ep in _entry_points():
        if _ENTRY_POINTS.get(ep.name) == ep.value:
            continue
        try:
            with registry_snapshot():
                obj = ep.load()
                if callable(obj) and not isinstance(obj, type | ModuleType):
                    obj()
        except (Exception, SystemExit) as e:
            msg = " ".join(f"{type(e).__name__}: {e}".split())
            dist = getattr(getattr(ep, "dist", None), "name", None)
            owner = f", installed by {dist}" if dist else ""
            raise PluginError(f"entry point {ep.name} = {ep.value!r} (group "
                              f"{ENTRY_POINT_GROUP}{owner}) could not be loaded: {msg}"
                              ) from None
        _ENTRY_POINTS[ep.name] = ep.value
        _ORIGIN.setdefault(ep.value.split(":")[0].strip(), f"entry point {ep.name}")
        done.append(ep.name)
    return done


def origin(obj: Any) -> str | None:
    """Where a registered entry came from: the plug-in as given, ``None`` for fedrnd's own."""
    module = getattr(obj, "__module__", None) or ""
    if module == "fedrnd" or module.startswith("fedrnd."):
        return None
    return _ORIGIN.get(module, module or None)


__all__ = ["ENTRY_POINT_GROUP", "PluginError", "is_file", "load_entry_points", "load_plugin",
           "load_plugins", "origin", "registry_snapshot", "resolve"]
