"""Chunk size autotuning: time local training at a few chunk sizes once, cache the winner.

How many clients one device should vmap at a time depends on the backend and the model (on a
CPU one at a time wins, on an accelerator large chunks fill the device; see
:mod:`fedrnd.engine.clientmap`). :func:`tune_chunk` measures it on the run's own workload: one
round of local training from a shared model (:meth:`Engine.train_sum`, the hot path of every
method) for the clients one device holds (at most ``sample`` of them), at chunk sizes
``1, 2, 4, ...`` up to that count (or ``max_chunk``, e.g. the memory planner's cap). Each
candidate is compiled ahead of time (compile time is reported apart), run once to warm up,
then timed ``repeats`` times; the fastest per client wins.

The result is cached on disk, keyed by everything that decides the answer and nothing else:
backend, device kind, jax version, the model's parameter shapes, the local work (batch size,
epochs or steps, padded client size), optimizer kinds, the engine path and the clients per
device. A later run with the same key reuses it without timing. The cache is a JSON file:
``$FEDRND_AUTOTUNE_CACHE``, else ``~/.cache/fedrnd/autotune.json``.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedrnd.data.federated import FederatedData
from fedrnd.engine.clientmap import ClientMapper
from fedrnd.engine.core import Engine
from fedrnd.engine.optim import ClientHParams


def cache_path() -> Path:
    """Where tuned chunk sizes are stored (``FEDRND_AUTOTUNE_CACHE`` overrides)."""
    env = os.environ.get("FEDRND_AUTOTUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fedrnd" / "autotune.json"


@dataclasses.dataclass(frozen=True)
class Tuned:
    """The outcome of :func:`tune_chunk`.

    ``chunk``: the winner; ``per_client``: seconds per client update by candidate chunk;
    ``compile``: seconds compiling each candidate; ``cached``: read from the cache (nothing
    was timed); ``key``: the cache key; ``workload``: what the key describes.
    """

    chunk: int
    per_client: dict[int, float]
    compile: dict[int, float]
    cached: bool
    key: str
    workload: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"chunk": self.chunk, "cached": self.cached, "key": self.key,
                "per_client_s": {str(k): v for k, v in self.per_client.items()},
                "compile_s": {str(k): v for k, v in self.compile.items()},
                "workload": self.workload}


def workload(engine: Engine, data: FederatedData, clients_per_device: int) -> dict[str, Any]:
    """The description the cache is keyed by (plain data)."""
    params = jax.eval_shape(engine.model.init, jax.random.key(0))
    dev = jax.local_devices()[0]
    return {
        "backend": jax.default_backend(), "device_kind": dev.device_kind,
        "jax": jax.__version__, "model": engine.model.name,
        "params": [[list(x.shape), str(x.dtype)] for x in jax.tree.leaves(params)],
        "feature_shape": list(data.feature_shape), "batch_size": engine.local.batch_size,
        "epochs": engine.local.epochs, "steps": engine.local.steps,
        "max_train": data.max_train, "optimizers": list(engine.optimizer.kinds),
        "path": engine.path, "clients_per_device": int(clients_per_device),
    }


def _key(desc: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:20]


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write(path: Path, key: str, entry: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = _read(path)
    table[key] = entry
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)  # atomic: concurrent runs never see half a file


def candidates(limit: int) -> list[int]:
    """Powers of two ``1, 2, 4, ...`` up to ``limit``, plus ``limit`` itself."""
    out, c = [], 1
    while c < limit:
        out.append(c)
        c *= 2
    return [*out, max(1, limit)]


def lookup(engine: Engine, data: FederatedData, clients_per_device: int,
           path: Path | None = None) -> Tuned | None:
    """The cached result for this workload, or ``None``."""
    desc = workload(engine, data, clients_per_device)
    key = _key(desc)
    entry = _read(path or cache_path()).get(key)
    if entry is None:
        return None
    return Tuned(int(entry["chunk"]), {int(k): float(v) for k, v in entry["per_client_s"].items()},
                 {}, True, key, desc)


def tune_chunk(engine: Engine, data: FederatedData, hp: ClientHParams, *,
               clients_per_device: int | None = None, max_chunk: int | None = None,
               chunks: list[int] | None = None, sample: int | None = None, repeats: int = 3,
               path: Path | None = None, use_cache: bool = True, write: bool = True,
               log=None) -> Tuned:
    """The fastest chunk size for ``engine`` on ``data``, from the cache or measured.

    Args:
      clients_per_device: clients one device processes per round (default all of ``data``);
        candidates never exceed it.
      max_chunk: upper bound on the candidates (the memory planner's largest fitting chunk).
      chunks: explicit candidates (default :func:`candidates` up to the bound).
      sample: at most this many clients are timed (default 4x the largest candidate, at
        least 32); the per-client time is what is compared.
      path: cache file (default :func:`cache_path`); ``use_cache=False`` always measures,
        ``write=False`` leaves the cache untouched.
    Runs on one local device (the chunk size is per device), with the engine's mapper
    replaced by a plain chunked one.
    """
    path = path or cache_path()
    c = data.num_clients
    per_device = int(clients_per_device or c)
    bound = max(1, min(per_device, max_chunk or per_device))
    cands = sorted({min(int(k), bound) for k in (chunks or candidates(bound)) if int(k) >= 1})
    if use_cache:
        hit = lookup(engine, data, per_device, path)
        if hit is not None:
            return hit
    desc = workload(engine, data, per_device)
    key = _key(desc)
    n = min(c, per_device, sample or max(32, 4 * max(cands)))
    ids = np.arange(n)
    dev = jax.local_devices()[0]
    sub = jax.device_put(data.select(ids), dev)
    sub_hp = jax.device_put(jax.tree.map(lambda a: np.asarray(a)[:n], hp), dev)
    params = jax.device_put(engine.model.init(jax.random.key(0)), dev)
    times, compiles = {}, {}
    for chunk in cands:
        eng = dataclasses.replace(engine, mapper=ClientMapper(chunk_size=chunk))
        fn = jax.jit(lambda p, d, h, k, e=eng: e.train_sum(p, d, h, k, jnp.zeros((), jnp.int32)))
        t0 = time.perf_counter()
        compiled = fn.lower(params, sub, sub_hp, jax.random.key(1)).compile()
        compiles[chunk] = time.perf_counter() - t0
        jax.block_until_ready(compiled(params, sub, sub_hp, jax.random.key(1)))
        best = float("inf")
        for r in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(params, sub, sub_hp, jax.random.key(2 + r)))
            best = min(best, time.perf_counter() - t0)
        times[chunk] = best / n
        if log:
            log(f"autotune: chunk {chunk}: {n / best:.0f} client updates/s "
                f"(compile {compiles[chunk]:.1f} s)")
    chunk = min(times, key=times.get)
    if write:
        _write(path, key, {"chunk": chunk, "per_client_s": {str(k): v for k, v in times.items()},
                           "compile_s": {str(k): v for k, v in compiles.items()},
                           "sample": n, "workload": desc,
                           "measured": datetime.datetime.now().isoformat(timespec="seconds")})
    return Tuned(chunk, times, compiles, False, key, desc)
