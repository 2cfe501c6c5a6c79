"""JAX's persistent compilation cache as the CLI, the experiment scripts and the tests use it.

A second run of the same config loads its compiled programs from disk instead of compiling
them again. The directory is ``$FEDRND_CACHE_DIR`` (default ``~/.cache/fedrnd/jax``;
``FEDRND_CACHE_DIR=0`` turns the cache off), one subdirectory per JAX version, since an entry
written by another JAX version never matches.

Several processes may share the directory (parallel runs, a sweep's workers, pytest-xdist).
JAX (0.10) writes an entry in place, so one process could read an entry that another was
still writing and crash while deserializing it (a test worker segfaulted this way,
2026-12-04). JAX's own remedy, a size limit (``jax_compilation_cache_max_size``), takes a file
lock around every read and write and rescans the whole directory at every write to evict; with
the thousands of entries of the test suite that scan, under the lock, made the suite slower
than compiling every program once per process. So by default :func:`enable` makes JAX's writes atomic
instead: each entry is written to a temporary file in the same directory and renamed into
place, so a reader finds either no entry or a whole one. This replaces one method of JAX's
private ``LRUCache`` (checked against the interface it expects; if JAX changes it, fedrnd
falls back to the size limit and its lock). ``max_bytes`` (or ``$FEDRND_CACHE_MAX_BYTES``)
asks for the size limit instead.

A child process shares the cache safely when it calls :func:`enable` itself (``fedrnd run``
does); :func:`subprocess_env` passes it the settings.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

ENV = "FEDRND_CACHE_DIR"
MAX_ENV = "FEDRND_CACHE_MAX_BYTES"
DEFAULT_DIR = Path.home() / ".cache" / "fedrnd" / "jax"
FALLBACK_MAX_BYTES = 16 << 30
"""The size limit used when JAX's writes cannot be made atomic (its lock comes with it)."""


def cache_root() -> Path | None:
    """The cache directory from ``$FEDRND_CACHE_DIR`` (default ``~/.cache/fedrnd/jax``), or
    None when it is set to ``0`` or to an empty string."""
    value = os.environ.get(ENV)
    if value is None:
        return DEFAULT_DIR
    if value in ("", "0"):
        return None
    return Path(value).expanduser()


def enable(min_compile_secs: float | None = None, max_bytes: int | None = None) -> Path | None:
    """Point JAX's persistent compilation cache at this JAX version's directory under
    :func:`cache_root`, safe to share between processes (see the module's text).

    ``min_compile_secs`` caches programs that took at least that long to compile (JAX's
    default: 1 s). ``max_bytes`` (default ``$FEDRND_CACHE_MAX_BYTES``, else None: no limit,
    with atomic writes) limits the directory's size (least recently used entries go first;
    JAX then locks every read and write and rescans the directory at each write). Returns the
    directory, or None when the cache is off.
    """
    import jax

    root = cache_root()
    if root is None:
        return None
    if max_bytes is None and os.environ.get(MAX_ENV, "").strip():
        try:
            max_bytes = int(os.environ[MAX_ENV])
        except ValueError:
            raise ValueError(f"${MAX_ENV} must be a whole number of bytes, got "
                             f"{os.environ[MAX_ENV]!r}") from None
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive or None (no limit), got {max_bytes}")
    if max_bytes is None and not atomic_writes():
        max_bytes = FALLBACK_MAX_BYTES
    path = root / f"jax-{jax.__version__}"
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_compilation_cache_max_size", -1 if max_bytes is None else int(max_bytes))
    if min_compile_secs is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
    return path


def atomic_writes() -> bool:
    """Make the writes of JAX's file cache atomic (idempotent); False where this JAX's cache
    does not have the shape this relies on, and nothing was changed."""
    try:
        from jax._src import lru_cache
    except ImportError:
        return False
    cls = getattr(lru_cache, "LRUCache", None)
    suffix = getattr(lru_cache, "_CACHE_SUFFIX", None)
    local = getattr(lru_cache, "_is_local_filesystem", None)
    if cls is None or not isinstance(suffix, str) or local is None or not hasattr(cls, "put"):
        return False
    if getattr(cls.put, "_fedrnd_atomic", False):
        return True
    plain_put = cls.put

    def put(self, key: str, value: bytes) -> None:
        # Eviction on (a size limit): JAX's own put, under its lock. Off: JAX's put is
        # ``if not exists: write_bytes``; the same, through a temporary file and a rename.
        if getattr(self, "eviction_enabled", True) or not key or not local(str(self.path)):
            return plain_put(self, key, value)
        final = Path(str(self.path)) / f"{key}{suffix}"
        if final.exists():
            return None
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        try:
            tmp.write_bytes(value)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return None

    put._fedrnd_atomic = True
    put.__doc__ = plain_put.__doc__
    cls.put = put
    return True


def subprocess_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: a copy of ``os.environ``) with this process's cache settings for a
    child that calls :func:`enable` (``fedrnd run`` does): ``$FEDRND_CACHE_DIR``,
    ``$FEDRND_CACHE_MAX_BYTES`` and JAX's minimum compile time; the cache off (``0``) when
    this process has none."""
    import jax

    env = dict(os.environ if env is None else env)
    path = jax.config.jax_compilation_cache_dir
    env.pop(MAX_ENV, None)
    if not path:
        env[ENV] = "0"
        return env
    env[ENV] = str(Path(path).parent)
    if jax.config.jax_compilation_cache_max_size > 0:
        env[MAX_ENV] = str(jax.config.jax_compilation_cache_max_size)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(
        jax.config.jax_persistent_cache_min_compile_time_secs)
    return env
