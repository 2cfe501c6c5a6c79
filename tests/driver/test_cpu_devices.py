"""``num_devices`` on a CPU without XLA_FLAGS: the driver gives JAX's CPU backend that many
devices (one per core) in a fresh process, and leaves a count someone already chose alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from fedrnd import compilation_cache
from fedrnd.driver import distributed
from fedrnd.engine import make_mesh

ROOT = Path(__file__).resolve().parents[2]

CONFIG = """
name = "mesh"
rounds = 2
eval_every = 1
checkpoint_every = 2
progress = false
num_devices = 2
[data]
source = "digits"
partition = "rotation"
partition_options = { num_groups = 2 }
num_clients = 8
[model]
name = "mlp"
options = { hidden = [16] }
[[algorithms]]
name = "fedavg"
"""


def _run(tmp_path: Path, xla_flags: str | None) -> dict:
    (tmp_path / "c.toml").write_text(CONFIG)
    env = compilation_cache.subprocess_env()
    env.pop("XLA_FLAGS", None)
    if xla_flags:
        env["XLA_FLAGS"] = xla_flags
    env.update(JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "fedrnd", "run", str(tmp_path / "c.toml"),
                           "--out", str(tmp_path / "runs"), "--no-progress"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return json.loads((tmp_path / "runs" / "mesh" / "metadata.json").read_text())


def test_fedrnd_run_splits_clients_over_host_devices_without_xla_flags(tmp_path):
    meta = _run(tmp_path, None)
    assert meta["num_devices_used"] == 2
    assert len(meta["devices"]) == 2 and all("cpu" in str(d).lower() for d in meta["devices"])


def test_a_device_count_from_xla_flags_is_kept(tmp_path):
    meta = _run(tmp_path, "--xla_force_host_platform_device_count=4")
    assert meta["num_devices_used"] == 2 and len(meta["devices"]) == 4


def test_left_alone_once_jax_runs_or_when_chosen(monkeypatch):
    jax.numpy.zeros(1).block_until_ready()  # this process's backends are running
    count = jax.device_count()
    assert distributed.cpu_devices(1) is False
    assert distributed.cpu_devices(count + 1) is False and jax.device_count() == count
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=3")
    assert distributed.cpu_devices(count + 1) is False
    # The mesh then says how to get the devices.
    with pytest.raises(ValueError, match="jax_num_cpu_devices"):
        make_mesh(count + 1)
