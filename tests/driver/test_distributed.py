"""Multi-host runs: two JAX processes on localhost give the single-process results.

The test launches ``fedrnd run`` twice as two processes of one ``jax.distributed`` run (each
with 2 virtual CPU devices, so the client axis is split over 4 devices on 2 hosts), and once
as a plain single-process, single-device run, then compares what they wrote. FedAvg and RND
(discovery with a fixed eps, then FedAvg per federation) must agree to float rounding; the
2-process run also autotunes its chunk size (each process times, process 0's choice is used),
checkpoints with orbax from both processes, and is resumed as two processes again.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedrnd.driver import load_config

ROOT = Path(__file__).resolve().parents[2]

CONFIG = """
name = "mh"
rounds = 3
seed = 0
eval_every = 2
checkpoint_every = 2
progress = false

[data]
source = "gaussian_mixture"
source_options = { samples_per_client = 20, dim = 6, num_groups = 2 }
partition = "natural"
partition_options = {}
num_clients = 8

[model]
name = "mlp"
options = { hidden = [8] }

[local]
batch_size = 8
lr = 0.1

[[algorithms]]
name = "fedavg"

[[algorithms]]
name = "rnd"
options = { criterion = "eps", eps = 1.0, predictor_steps = 10, predictor_batch = 8, network = "mlp" }
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int, tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["FEDRND_AUTOTUNE_CACHE"] = str(tmp / "autotune.json")
    return env


def _run(cfg: Path, out: Path, sets: list[str], *, processes: int, tmp: Path,
         resume: bool = False) -> list[str]:
    """Run ``fedrnd run`` as ``processes`` processes of one job; returns their logs."""
    base = [sys.executable, "-m", "fedrnd", "run", str(cfg), "--out", str(out),
            *(["--resume", "--allow-change", "rounds"] if resume else [])]
    for s in sets:
        base += ["--set", s]
    if processes == 1:
        cmds = [base]
        env = _env(1, tmp)
    else:
        coord = f'coordinator="localhost:{_free_port()}"'
        cmds = [[*base, "--set", f"num_processes={processes}", "--set", f"process_id={i}",
                 "--set", coord, "--set", "autotune=true"] for i in range(processes)]
        env = _env(2, tmp)
    procs = [subprocess.Popen(c, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for c in cmds]
    logs = []
    for i, p in enumerate(procs):
        try:
            log, _ = p.communicate(timeout=480)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, f"process {i} of {processes} failed:\n{log[-4000:]}"
        logs.append(log)
    return logs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost")
    cfg = tmp / "mh.toml"
    cfg.write_text(CONFIG)
    logs = {"multi": _run(cfg, tmp / "multi", [], processes=2, tmp=tmp),
            "single": _run(cfg, tmp / "single", [], processes=1, tmp=tmp)}
    return tmp, cfg, logs


def _final(run_dir: Path, tag: str) -> tuple[dict, dict]:
    final = json.loads((run_dir / tag / "final.json").read_text())
    with np.load(run_dir / tag / "per_client.npz") as z:
        per_client = dict(z)
    return final, per_client


def _assert_same(a_dir: Path, b_dir: Path) -> None:
    for tag in ("fedavg", "rnd"):
        fa, pa = _final(a_dir, tag)
        fb, pb = _final(b_dir, tag)
        keys = [k for k in fb if "time" not in k]
        assert keys and all(k in fa for k in keys), tag
        for k in keys:
            assert fa[k] == pytest.approx(fb[k], rel=1e-5, abs=1e-6), f"{tag}: {k}"
        assert sorted(pa) == sorted(pb)
        for k in pb:
            np.testing.assert_allclose(pa[k], pb[k], rtol=1e-5, atol=1e-6, err_msg=f"{tag}/{k}")
    # RND's discovery (novelty matrix and federations) is the same on 4 devices of 2 hosts.
    with np.load(a_dir / "rnd" / "novelty.npz") as za, np.load(b_dir / "rnd" / "novelty.npz") as zb:
        np.testing.assert_allclose(za["scores"], zb["scores"], rtol=1e-5)
        np.testing.assert_array_equal(za["federation"], zb["federation"])


@pytest.mark.slow
def test_two_processes_match_one_process(runs):
    tmp, _, logs = runs
    multi, single = tmp / "multi" / "mh", tmp / "single" / "mh"
    _assert_same(multi, single)
    meta = json.loads((multi / "metadata.json").read_text())
    assert meta["distributed"] == {"process_count": 2, "process_index": 0, "local_devices": 2,
                                   "global_devices": 4}
    assert meta["num_devices_used"] == 4
    assert json.loads((single / "metadata.json").read_text())["num_devices_used"] == 1
    # The runs did something: RND found the 2 groups, accuracy is above chance (3 classes).
    rnd, _ = _final(multi, "rnd")
    assert rnd["federations"] == 2 and rnd["ari"] == 1.0
    assert rnd["test_acc/mean"] > 0.5
    # Only process 0 printed the report; both processes took part in the checkpoints.
    assert "mean client test accuracy" in logs["multi"][0]
    assert "mean client test accuracy" not in logs["multi"][1]
    ckpt = multi / "fedavg" / "checkpoints" / "2" / "state"
    assert (ckpt / "ocdbt.process_0").exists() and (ckpt / "ocdbt.process_1").exists()
    # Autotuning: process 0's choice is the run's chunk size and is cached.
    cache = json.loads((tmp / "autotune.json").read_text())
    assert meta["autotune"]["key"] in cache
    assert meta["chunk_size"] == cache[meta["autotune"]["key"]]["chunk"] == \
        meta["memory"]["chunk"]


@pytest.mark.slow
def test_two_processes_resume_like_one_process(runs):
    tmp, cfg, _ = runs
    _run(cfg, tmp / "multi", ["rounds=5"], processes=2, tmp=tmp, resume=True)
    _run(cfg, tmp / "single", ["rounds=5"], processes=1, tmp=tmp, resume=True)
    _assert_same(tmp / "multi" / "mh", tmp / "single" / "mh")
    rounds = [json.loads(line)["round"] for line in
              (tmp / "multi" / "mh" / "fedavg" / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("sets, message", [
    (["num_processes=2"], "needs coordinator"),
    (["num_processes=2", "process_id=2", 'coordinator="h:1"'], "process_id must be in [0, num_processes = 2)"),
    (["num_processes=-1"], "num_processes must be >= 1"),
    (["num_processes=2", "process_id=0", 'coordinator="nohostport"'], "host:port"),
])
def test_bad_multihost_settings_are_clear_errors(sets, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(None, sets)


def test_single_process_initialize_is_a_no_op():
    from fedrnd.driver import distributed

    assert distributed.initialize(None, 1, None) is False
    assert distributed.is_primary()
    assert distributed.agree(3) == 3 and distributed.smallest(2.5) == 2.5
    assert distributed.describe()["process_count"] == 1


def test_multihost_after_jax_started_is_a_clear_error():
    import jax.numpy as jnp

    from fedrnd.driver import distributed

    jnp.ones(1).block_until_ready()  # this process's backend is running already
    with pytest.raises(ValueError, match="before any JAX computation"):
        distributed.initialize("localhost:1", 2, 0)
