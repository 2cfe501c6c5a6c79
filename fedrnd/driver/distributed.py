"""Multi-host runs with ``jax.distributed``: one ``fedrnd run`` per host, one client axis.

Every host runs the same command (SPMD). The config says how the processes find each other::

    coordinator = "10.0.0.1:1234"   # process 0's address and a free port
    num_processes = 2               # 0: detect the cluster (TPU pod slice, SLURM, Open MPI)
    process_id = 0                  # this host's rank; unset where the cluster is detected

(or on the command line: ``--set num_processes=2 --set process_id=0 --set
coordinator=host0:1234``). :func:`initialize` starts ``jax.distributed`` from these fields
before anything touches a device. Afterwards ``jax.devices()`` lists the devices of every
process and the driver shards the client axis over all of them (one mesh, the same
``ClientMapper``), so algorithm code is unchanged.

What differs from one process, and where it is handled:

- Data: every host builds the same federated data from the seed (cheap next to training) and
  places it with :func:`fedrnd.engine.multihost.put`: each host's devices receive only the
  per-client rows of their own clients; the example pool is replicated.
- Host reads (metrics, evaluation scores, cluster ids) go through
  :func:`fedrnd.engine.multihost.to_host`, which all-gathers what other hosts hold.
- Outputs: only process 0 writes logs, metrics, plots and reports (:func:`is_primary`);
  checkpoints are written by all processes together (orbax: each host writes its own shards,
  process 0 the metadata), so the run directory must be on a file system every host sees.
- Choices made on one host (an autotuned chunk size) are broadcast from process 0
  (:func:`agree`), so every process compiles the same program.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from fedrnd.engine.multihost import multiprocess


def initialize(coordinator: str | None, num_processes: int, process_id: int | None) -> bool:
    """Start ``jax.distributed`` for a run of ``num_processes`` processes; True if it did.

    ``num_processes == 1`` does nothing (a single-process run). ``num_processes == 0`` lets
    JAX detect everything from the cluster environment (Cloud TPU, SLURM, Open MPI). Must run
    before the first computation; calling it again with the same settings is a no-op.
    """
    if num_processes == 1:
        return False
    if jax.distributed.is_initialized():
        if num_processes and jax.process_count() != num_processes:
            raise ValueError(f"jax.distributed is already running with {jax.process_count()} "
                             f"processes, the config asks for num_processes={num_processes}")
        return False
    if num_processes and (coordinator is None or process_id is None):
        raise ValueError("config: num_processes > 1 needs coordinator (process 0's host:port) "
                         "and process_id (this process's rank) unless the cluster is detected "
                         "(num_processes = 0)")
    try:
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=num_processes or None, process_id=process_id)
    except RuntimeError as e:
        if "before" not in str(e):
            raise
        raise ValueError("a multi-host run must start jax.distributed before any JAX "
                         "computation in the process: run it in a fresh process (fedrnd run), "
                         "or call fedrnd.driver.distributed.initialize(...) first") from e
    return True


def cpu_devices(num_devices: int) -> bool:
    """Give JAX's CPU backend ``num_devices`` devices, one per core as
    ``docs/performance.md`` ("Several cores") recommends, when a one-process run asks for a
    mesh that large and nothing has set the count: True if it did.

    Left alone: ``num_devices <= 1``; a count already chosen (``jax_num_cpu_devices`` or
    ``XLA_FLAGS=--xla_force_host_platform_device_count``); a process where JAX has already
    computed something, since the count is fixed then (the mesh then checks what is there
    and says what to do). On a machine with accelerators the CPU backend is not the one the
    run uses, so the extra host devices cost nothing.
    """
    if num_devices <= 1 or jax.config.jax_num_cpu_devices >= 0:
        return False
    if "--xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return False
    try:
        jax.config.update("jax_num_cpu_devices", int(num_devices))
    except RuntimeError:  # JAX's backends are running: the count can no longer change
        return False
    return True


def is_primary() -> bool:
    """True on the process that writes outputs (process 0, or the only process)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches this point (no-op with one process)."""
    if multiprocess():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"fedrnd:{name}")


def agree(value: int) -> int:
    """Process 0's integer ``value``, on every process."""
    if not multiprocess():
        return value
    from jax.experimental import multihost_utils

    return int(np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int32))))


def smallest(value: float) -> float:
    """The minimum of ``value`` over all processes (e.g. the tightest memory budget)."""
    if not multiprocess():
        return value
    from jax.experimental import multihost_utils

    return float(np.min(multihost_utils.process_allgather(np.asarray(value, np.float64))))


def describe() -> dict[str, Any]:
    """Process layout for the run metadata."""
    return {"process_count": jax.process_count(), "process_index": jax.process_index(),
            "local_devices": jax.local_device_count(), "global_devices": jax.device_count()}
