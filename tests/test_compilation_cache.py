"""fedrnd.compilation_cache: where the cache lives, that JAX locks it, and what child
processes inherit. Cache settings are global to a process, so the JAX checks run in a child."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from fedrnd import compilation_cache

ROOT = Path(__file__).resolve().parents[1]


def test_cache_root_reads_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("FEDRND_CACHE_DIR", raising=False)
    assert compilation_cache.cache_root() == Path.home() / ".cache" / "fedrnd" / "jax"
    for off in ("0", ""):
        monkeypatch.setenv("FEDRND_CACHE_DIR", off)
        assert compilation_cache.cache_root() is None
        assert compilation_cache.enable() is None
    monkeypatch.setenv("FEDRND_CACHE_DIR", str(tmp_path / "c"))
    assert compilation_cache.cache_root() == tmp_path / "c"
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("FEDRND_CACHE_DIR", "~/d")
    assert compilation_cache.cache_root() == tmp_path / "d"


def test_max_bytes_must_be_positive(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDRND_CACHE_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="max_bytes must be positive"):
        compilation_cache.enable(max_bytes=-1)
    assert not any(tmp_path.iterdir())


CHILD = """
import json, sys
import jax, jax.numpy as jnp
from fedrnd import compilation_cache
path = compilation_cache.enable(min_compile_secs=0.0, max_bytes=int(sys.argv[1]))
f = jax.jit(lambda x: jnp.sin(x) @ x.T + 1.0)
f(jnp.ones((8, 8))).block_until_ready()
print(json.dumps({"path": str(path), "dir": jax.config.jax_compilation_cache_dir,
                  "max": jax.config.jax_compilation_cache_max_size,
                  "env": compilation_cache.subprocess_env({})}))
"""


def _child(tmp_path: Path, max_bytes: int) -> dict:
    env = {"FEDRND_CACHE_DIR": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(max_bytes)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_enable_writes_locked_entries_under_the_jax_version(tmp_path):
    out = _child(tmp_path, 1 << 30)
    path = tmp_path / "cache" / f"jax-{jax.__version__}"
    assert out["path"] == out["dir"] == str(path) and out["max"] == 1 << 30
    entries = sorted(p.name for p in path.iterdir())
    # With a size limit JAX takes its file lock and records access times for LRU eviction;
    # without one it writes neither (and an entry can be read while it is being written).
    assert ".lockfile" in entries
    caches = [n for n in entries if n.endswith("-cache")]
    assert caches and all(n.removesuffix("-cache") + "-atime" in entries for n in caches)
    # What a child process needs to share this cache, lock included.
    assert out["env"] == {"JAX_COMPILATION_CACHE_DIR": str(path),
                          "JAX_COMPILATION_CACHE_MAX_SIZE": str(1 << 30),
                          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.0"}
    # A second process reads the entry instead of compiling (and leaves the count alone).
    _child(tmp_path, 1 << 30)
    assert sorted(n for n in (p.name for p in path.iterdir()) if n.endswith("-cache")) == caches


def test_the_size_limit_evicts(tmp_path):
    """A limit smaller than two entries keeps at most one entry (the newest)."""
    out = _child(tmp_path, 1 << 30)
    path = Path(out["dir"])
    size = max(p.stat().st_size for p in path.glob("*-cache"))
    # Recompile something else into a cache capped at just over one entry's size.
    code = CHILD.replace("jnp.sin(x) @ x.T + 1.0", "jnp.cos(x) @ x + 2.0")
    env = {"FEDRND_CACHE_DIR": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    before = {p.name for p in path.glob("*-cache")}
    proc = subprocess.run([sys.executable, "-c", code, str(size + size // 2)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = {p.name for p in path.glob("*-cache")}
    assert sum(p.stat().st_size for p in path.glob("*-cache")) <= size + size // 2
    assert after - before, "the new program was not cached"
