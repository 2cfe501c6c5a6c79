"""Sharding the client axis over 8 (virtual CPU) devices gives the single-device results.

Each configuration runs in its own subprocess, because the device count is fixed when JAX
starts (``XLA_FLAGS=--xla_force_host_platform_device_count=8``). The subprocesses save their
results under ``tmp_path`` and the comparison happens here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent('''
    import json
    import sys

    import jax
    import jax.numpy as jnp
    import numpy as np

    from fedrnd.algorithms import FeSEM, FedAvg, IFCA, Local, RNDClustered
    from fedrnd.data import Dataset, Partition, build_federated
    from fedrnd.engine import (ClientMapper, Engine, LocalSpec, client_hparams,
                               evaluate_clients, make_mesh)
    from fedrnd.models import make_model

    mode, out = sys.argv[1], sys.argv[2]
    C, D, K = 16, 5, 3
    rng = np.random.default_rng(0)
    counts = rng.integers(3, 12, C)
    test_counts = rng.integers(2, 7, C)
    means = 2.0 * rng.normal(size=(K, D))

    def draw(n):
        y = rng.integers(0, K, n).astype(np.int32)
        return (means[y] + rng.normal(size=(n, D))).astype(np.float32), y

    (xtr, ytr), (xte, yte) = draw(counts.sum()), draw(test_counts.sum())
    split = lambda ns: np.split(np.arange(ns.sum()), np.cumsum(ns)[:-1])
    data = build_federated(Dataset(xtr, ytr, xte, yte, K, "toy"),
                           Partition(split(counts), split(test_counts), np.arange(C) % 2))

    if mode in ("mesh", "errors"):
        assert jax.device_count() == 8, jax.devices()
        mapper = ClientMapper(mesh=make_mesh(8))
    else:
        assert jax.device_count() == 1, jax.devices()
        mapper = ClientMapper()

    model = make_model("mlp", (D,), K, hidden=[8])
    opt, hp = client_hparams(C, optimizer={"sgd": 0.5, "momentum": 0.5},
                             lr={"sgd": 0.1, "momentum": 0.05}, seed=1)
    engine = Engine(model, LocalSpec(batch_size=4, epochs=2), opt, mapper)
    data = data.replace(**mapper.shard(data.client_arrays()))
    data = data.replace(x=mapper.replicate(data.x), y=mapper.replicate(data.y))

    def place(state):
        rest = mapper.replicate({k: v for k, v in state.items() if k != "clients"})
        return {**rest, "clients": mapper.shard(state["clients"])}

    if mode == "errors":
        errors = {}
        small = data.select(jnp.arange(12))
        try:
            mapper.map(lambda c, s: c, {"a": jnp.zeros((12, 2))})
        except ValueError as e:
            errors["map"] = str(e)
        try:
            alg = FedAvg(engine=engine, cohort_size=6)
            jax.jit(alg.round)(place(alg.init(jax.random.key(0), data, hp)), data,
                               jax.random.key(2))
        except ValueError as e:
            errors["cohort"] = str(e)
        try:
            hp12 = jax.tree.map(lambda a: a[:12], hp)
            engine.train_sum(model.init(jax.random.key(0)), small, hp12, jax.random.key(0), 0)
        except ValueError as e:
            errors["train_sum"] = str(e)
        with open(f"{out}/errors.json", "w") as f:
            json.dump(errors, f)
        sys.exit(0)

    algorithms = {
        "fedavg": FedAvg(engine=engine),
        "fedavg_cohort_adam": FedAvg(engine=engine, cohort_size=8, server_opt="adam",
                                     server_lr=0.05),
        "local": Local(engine=engine),
        "local_cohort": Local(engine=engine, cohort_size=8),
        # Discovery (host side, client map on the mesh) and per-slot sums (psum of K models).
        "rnd_cohort": RNDClustered(engine=engine, cohort_size=8, eps=1.0, predictor_epochs=3),
        # K-model choice inside the round; k-means of client models (segment means on the mesh).
        "ifca_cohort": IFCA(engine=engine, num_clusters=3, cohort_size=8),
        "fesem_cohort": FeSEM(engine=engine, num_clusters=3, cohort_size=8),
    }
    results, info = {}, {"devices": jax.device_count(), "sharded": {}}
    for name, alg in algorithms.items():
        state = place(alg.init(jax.random.key(0), data, hp))
        step = jax.jit(alg.round)
        for r in range(3):
            state, metrics = step(state, data, jax.random.fold_in(jax.random.key(1), r))
        slots, assign = alg.models(state)
        if assign is None:
            ev = jax.jit(lambda s, d: evaluate_clients(model.apply, s, None, d, mapper))(
                slots, data)
        else:
            ev = jax.jit(lambda s, a, d: evaluate_clients(model.apply, s, a, d, mapper))(
                slots, assign, data)
        for i, leaf in enumerate(jax.tree.leaves(slots)):
            results[f"{name}/params/{i}"] = np.asarray(leaf)
        for k, v in {**ev, **metrics}.items():
            results[f"{name}/{k}"] = np.asarray(v)
        info["sharded"][name] = sorted({len(leaf.sharding.device_set)
                                        for leaf in jax.tree.leaves(state["clients"])})

    np.savez(f"{out}/results.npz", **results)
    with open(f"{out}/info.json", "w") as f:
        json.dump(info, f)
''')


def _launch(mode: str, out: Path) -> subprocess.Popen:
    out.mkdir()
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    if mode in ("mesh", "errors"):
        flags.append("--xla_force_host_platform_device_count=8")
    env["XLA_FLAGS"] = " ".join(flags)
    return subprocess.Popen([sys.executable, "-c", SCRIPT, mode, str(out)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("sharding")
    procs = {m: _launch(m, base / m) for m in ("mesh", "single")}
    for mode, proc in procs.items():
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{mode} run failed:\n{log[-4000:]}"
    out = {}
    for mode in procs:
        with np.load(base / mode / "results.npz") as z:
            res = dict(z)
        out[mode] = (res, json.loads((base / mode / "info.json").read_text()))
    return out


def test_sharded_simulation_matches_single_device(runs):
    mesh, mesh_info = runs["mesh"]
    single, single_info = runs["single"]
    assert mesh_info["devices"] == 8 and single_info["devices"] == 1
    assert sorted(mesh) == sorted(single)
    for name in ("fedavg", "fedavg_cohort_adam", "local", "local_cohort", "rnd_cohort"):
        keys = [k for k in mesh if k.startswith(name + "/")]
        assert any("/params/" in k for k in keys) and f"{name}/test_acc" in keys
        # Per-client state really is split over the 8 devices.
        assert mesh_info["sharded"][name] == [8]
    for k in sorted(mesh):
        a, b = mesh[k], single[k]
        assert a.shape == b.shape, k
        assert np.all(np.isfinite(a)), k
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=k)
    # The runs did something: FedAvg's clients are scored per client, Local's models differ.
    assert mesh["fedavg/test_acc"].shape == (16,)
    assert mesh["local/params/0"].shape[0] == 16
    assert np.max(np.abs(mesh["local/params/0"][0] - mesh["local/params/0"][1])) > 1e-4
    # Partial participation: the ledger counts only the 8 cohort clients.
    assert np.sum(mesh["fedavg_cohort_adam/up/model"] > 0) == 8


def test_client_count_not_divisible_by_devices_is_a_clear_error(tmp_path):
    proc = _launch("errors", tmp_path / "errors")
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-4000:]
    errors = json.loads((tmp_path / "errors" / "errors.json").read_text())
    assert set(errors) == {"map", "cohort", "train_sum"}
    for n, msg in (("12", errors["map"]), ("6", errors["cohort"]), ("12", errors["train_sum"])):
        assert f"{n} clients (or cohort size) cannot be split evenly over 8 devices" in msg
        assert "divisible by 8" in msg
