"""fedrnd.compilation_cache: where the cache lives, that entries appear whole or not at all,
the size-limit option, and what child processes inherit. Cache settings are global to a
process, so the checks that compile run in a child."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import jax
import pytest
from jax._src import lru_cache

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


def test_bad_sizes_are_refused_before_anything_changes(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDRND_CACHE_DIR", str(tmp_path))
    before = jax.config.jax_compilation_cache_dir
    with pytest.raises(ValueError, match="max_bytes must be positive"):
        compilation_cache.enable(max_bytes=-1)
    monkeypatch.setenv("FEDRND_CACHE_MAX_BYTES", "4G")
    with pytest.raises(ValueError, match=r"\$FEDRND_CACHE_MAX_BYTES must be a whole number"):
        compilation_cache.enable()
    assert not any(tmp_path.iterdir()) and jax.config.jax_compilation_cache_dir == before


def test_a_reader_never_sees_a_partial_entry(tmp_path):
    """JAX's cache without a size limit, with fedrnd's atomic writes: a thread reading the
    entry while another writes it finds nothing or all of it (JAX's own in-place write lets it
    read a prefix), and no temporary file is left behind."""
    assert compilation_cache.atomic_writes() and compilation_cache.atomic_writes()
    cache = lru_cache.LRUCache(str(tmp_path), max_size=-1)
    value = bytes(range(256)) * (1 << 17)  # 32 MiB: the write takes a while
    seen: list[int] = []
    done = threading.Event()

    def read():
        while not done.is_set():
            got = cache.get("k")
            if got is not None:
                seen.append(len(got))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(3):
            cache.put(f"k{i}", value)  # other keys: the reader keeps polling "k" meanwhile
        cache.put("k", value)
        cache.put("k", b"other")  # an existing entry is kept, as JAX's put does
    finally:
        done.set()
        reader.join()
    assert cache.get("k") == value
    assert all(n == len(value) for n in seen)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k-cache", "k0-cache", "k1-cache",
                                                          "k2-cache"]


CHILD = """
import json, sys
import jax, jax.numpy as jnp
from fedrnd import compilation_cache
limit = int(sys.argv[1]) or None
path = compilation_cache.enable(min_compile_secs=0.0, max_bytes=limit)
f = jax.jit(lambda x: jnp.sin(x) @ x.T + float(sys.argv[2]))
f(jnp.ones((8, 8))).block_until_ready()
print(json.dumps({"path": str(path), "dir": jax.config.jax_compilation_cache_dir,
                  "max": jax.config.jax_compilation_cache_max_size,
                  "env": {k: v for k, v in compilation_cache.subprocess_env({}).items()}}))
"""


def _child(tmp_path: Path, max_bytes: int, const: float = 1.0) -> dict:
    env = {"FEDRND_CACHE_DIR": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(max_bytes), str(const)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_enable_caches_under_the_jax_version_without_a_lock(tmp_path):
    out = _child(tmp_path, 0)
    path = tmp_path / "cache" / f"jax-{jax.__version__}"
    assert out["path"] == out["dir"] == str(path) and out["max"] == -1
    entries = sorted(p.name for p in path.iterdir())
    caches = [n for n in entries if n.endswith("-cache")]
    # Atomic writes: entries only, no lock file, no access times, no temporary files.
    assert caches and entries == caches
    # What a child process needs to share this cache.
    assert out["env"] == {"FEDRND_CACHE_DIR": str(tmp_path / "cache"),
                          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.0"}
    # A second process reads the entries instead of compiling them again.
    _child(tmp_path, 0)
    assert sorted(p.name for p in path.iterdir()) == caches


def test_a_size_limit_takes_jax_s_lock_and_evicts(tmp_path):
    out = _child(tmp_path, 1 << 30)
    path = Path(out["dir"])
    assert out["max"] == 1 << 30 and out["env"]["FEDRND_CACHE_MAX_BYTES"] == str(1 << 30)
    assert (path / ".lockfile").exists()
    size = max(p.stat().st_size for p in path.glob("*-cache"))
    before = {p.name for p in path.glob("*-cache")}
    # Another program into a cache capped at one and a half entries: older entries go.
    _child(tmp_path, size + size // 2, const=2.0)
    after = {p.name for p in path.glob("*-cache")}
    assert after - before, "the new program was not cached"
    assert sum(p.stat().st_size for p in path.glob("*-cache")) <= size + size // 2
