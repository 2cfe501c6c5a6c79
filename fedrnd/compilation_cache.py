"""JAX's persistent compilation cache as the CLI, the experiment scripts and the tests use it.

A second run of the same config loads its compiled programs from disk instead of compiling
them again. The directory is ``$FEDRND_CACHE_DIR`` (default ``~/.cache/fedrnd/jax``;
``FEDRND_CACHE_DIR=0`` turns the cache off), one subdirectory per JAX version, since an entry
written by another JAX version never matches.

Several processes may share the directory (parallel runs, a sweep's workers, pytest-xdist).
JAX's cache writes an entry in place, so without a lock one process can read an entry that
another is still writing and crash while deserializing it (a test worker segfaulted this way,
2026-12-04). JAX takes a file lock around every read and write only when the cache has a size
limit (``jax_compilation_cache_max_size``), so :func:`enable` always sets one, which also
keeps the directory from growing without bound (least recently used entries go first).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "FEDRND_CACHE_DIR"
DEFAULT_DIR = Path.home() / ".cache" / "fedrnd" / "jax"
DEFAULT_MAX_BYTES = 4 << 30


def cache_root() -> Path | None:
    """The cache directory from ``$FEDRND_CACHE_DIR`` (default ``~/.cache/fedrnd/jax``), or
    None when it is set to ``0`` or to an empty string."""
    value = os.environ.get(ENV)
    if value is None:
        return DEFAULT_DIR
    if value in ("", "0"):
        return None
    return Path(value).expanduser()


def enable(min_compile_secs: float | None = None,
           max_bytes: int = DEFAULT_MAX_BYTES) -> Path | None:
    """Point JAX's persistent compilation cache at this JAX version's directory under
    :func:`cache_root` with a size limit of ``max_bytes`` (which makes JAX lock the directory
    around every read and write). ``min_compile_secs`` caches programs that took at least that
    long to compile (JAX's default: 1 s). Returns the directory, or None when the cache is off.
    """
    import jax

    root = cache_root()
    if root is None:
        return None
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive (it turns on the cache's lock), "
                         f"got {max_bytes}")
    path = root / f"jax-{jax.__version__}"
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_compilation_cache_max_size", int(max_bytes))
    if min_compile_secs is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
    return path


def subprocess_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: a copy of ``os.environ``) with the JAX variables that give a child
    Python process the cache this process uses, lock included; unchanged when it has none."""
    import jax

    env = dict(os.environ if env is None else env)
    path = jax.config.jax_compilation_cache_dir
    if path:
        env["JAX_COMPILATION_CACHE_DIR"] = str(path)
        env["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(jax.config.jax_compilation_cache_max_size)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(
            jax.config.jax_persistent_cache_min_compile_time_secs)
    return env
