"""Memory planner: exact data/state figures, a chunk size that fits, clear refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrnd.data.drift import DriftingData
from fedrnd.driver import (
    AlgorithmConfig,
    Config,
    DataConfig,
    DriftConfig,
    ModelConfig,
    memory,
    simulate,
)
from fedrnd.engine import ClientMapper, Engine, LocalSpec, client_hparams
from fedrnd.models import make_model

ROOT = Path(__file__).resolve().parents[2]
MiB = 2**20


def _device_bytes(tree, device) -> int:
    """Bytes the arrays of ``tree`` occupy on ``device`` (each distinct buffer once)."""
    seen, total = set(), 0
    for leaf in jax.tree.leaves(tree):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        for shard in leaf.addressable_shards:
            if shard.device == device and id(shard.data) not in seen:
                seen.add(id(shard.data))
                total += shard.data.nbytes
    return total


def _placed_data(data) -> list:
    """Every distinct placed array of the data (phases share the pool)."""
    phases = data.phases if isinstance(data, DriftingData) else (data,)
    arrays = {id(phases[0].x): phases[0].x, id(phases[0].y): phases[0].y}
    for p in phases:
        arrays.update({id(v): v for v in p.client_arrays().values()})
    return list(arrays.values())


def _cfg(**kw) -> Config:
    base = dict(rounds=2, eval_every=1, checkpoint_every=0, progress=False,
                data=DataConfig(source="digits", partition="rotation",
                                partition_options={"num_groups": 2}, num_clients=8),
                model=ModelConfig("mlp", {"hidden": [16]}),
                algorithms=[AlgorithmConfig("fedavg", {"server_opt": "adam", "server_lr": 0.01}),
                            AlgorithmConfig("local"),
                            AlgorithmConfig("ifca", {"num_clusters": 2})])
    base.update(kw)
    return Config(**base)


def test_parse_bytes():
    assert memory.parse_bytes("8GiB") == 8 * 2**30
    assert memory.parse_bytes("512 MB") == 512 * 10**6
    assert memory.parse_bytes("1.5e9") == 1_500_000_000
    assert memory.parse_bytes("64k") == 64_000
    assert memory.parse_bytes(1234) == 1234
    for bad in ("lots", "8XB", "-1GB", 0, True):
        with pytest.raises(ValueError, match="memory_limit"):
            memory.parse_bytes(bad)


def test_budget_sources():
    assert memory.device_budget("2GiB") == (2 * 2**30, "memory_limit = '2GiB'")
    assert memory.device_budget("off")[0] is None
    budget, source = memory.device_budget(None)
    # This CPU has no memory_stats: the host's available memory over its local devices.
    assert jax.local_devices()[0].memory_stats() is None
    assert source.startswith("host MemAvailable") and budget > 0


def test_estimate_equals_placed_bytes_single_device(tmp_path):
    """Data (with a drift phase sharing the pool) and every method's state, to the byte."""
    cfg = _cfg(data=DataConfig(source="digits", partition="rotation",
                               partition_options={"num_groups": 2}, num_clients=8,
                               drift=DriftConfig(at_round=1, fraction=0.5)))
    res = simulate(cfg, run_dir=tmp_path / "run", verbose=False)
    plan = res.memory
    dev = jax.devices()[0]
    assert plan.shards == 1
    assert plan.data == _device_bytes(_placed_data(res.drift), dev)
    for tag in ("fedavg", "local", "ifca"):
        assert plan.states[tag] == _device_bytes(res.methods[tag].state, dev), tag
    # Local keeps a model per client, FedAvg one model plus Adam's two moments.
    params = memory.tree_bytes(jax.eval_shape(make_model("mlp", (8, 8, 1), 10,
                                                          hidden=[16]).init, jax.random.key(0)))
    assert plan.states["local"] >= 8 * params
    assert 3 * params <= plan.states["fedavg"] < 4 * params
    # The plan is in the run's metadata, with the chunk size the run used.
    meta = json.loads((tmp_path / "run" / "metadata.json").read_text())
    assert meta["memory"]["data"] == plan.data and meta["memory"]["chunk"] == meta["chunk_size"]


SHARDED = textwrap.dedent('''
    import json, sys
    import jax
    sys.path.insert(0, sys.argv[2])
    from test_memory import _cfg, _device_bytes, _placed_data
    from fedrnd.driver import simulate
    assert jax.device_count() == 4
    res = simulate(_cfg(num_devices=4), run_dir=sys.argv[1], verbose=False)
    out = {"plan": res.memory.to_dict(), "data": {}, "states": {}}
    for d in jax.devices():
        out["data"][str(d.id)] = _device_bytes(_placed_data(res.data), d)
        out["states"][str(d.id)] = {t: _device_bytes(m.state, d) for t, m in res.methods.items()}
    print("RESULT" + json.dumps(out))
''')


@pytest.mark.slow
def test_estimate_equals_placed_bytes_per_device_on_a_mesh(tmp_path):
    """Sharded over 4 devices: per-client leaves split, the rest replicated, per device."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, "--xla_force_host_platform_device_count=4"])
    proc = subprocess.run([sys.executable, "-c", SHARDED, str(tmp_path / "run"),
                           str(Path(__file__).parent)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    plan = out["plan"]
    assert plan["shards"] == 4
    assert all(v == plan["data"] for v in out["data"].values()), (plan["data"], out["data"])
    for states in out["states"].values():
        assert states == plan["states"]
    # Splitting the clients really saves: Local's per-client models are a quarter per device.
    single = memory.state_bytes(jax.eval_shape(lambda: {"clients": jnp.zeros((8, 1000))}), 1)
    assert memory.state_bytes(jax.eval_shape(lambda: {"clients": jnp.zeros((8, 1000))}), 4) \
        == single // 4


def _engine_data(make_federated):
    data = make_federated([12, 7, 9, 20, 5, 11], dim=6)
    model = make_model("mlp", (6,), 3, hidden=[32])
    opt, hp = client_hparams(data.num_clients, optimizer="momentum", lr=0.1)
    return Engine(model, LocalSpec(batch_size=4, epochs=2), opt, ClientMapper()), data, hp


def test_plan_picks_the_largest_chunk_that_fits_and_refuses_clearly(make_federated):
    engine, data, hp = _engine_data(make_federated)
    states = {"m": jax.eval_shape(lambda: {"p": jnp.zeros((50, 50)),
                                           "clients": {"w": jnp.zeros((6, 100))}})}
    free = memory.plan(data, engine, hp, states, {"m": 1000}, preferred_chunk=8)
    assert free.budget is None and free.max_chunk is None and free.chunk == 8
    assert free.fixed == free.data + 50 * 50 * 4 + 6 * 100 * 4 + 1000
    assert free.per_client > 0
    # A budget with room for exactly 3 clients in flight (after the 10% headroom).
    budget = int((free.fixed + 3.5 * free.per_client) / 0.9) + 1
    p = memory.plan(data, engine, hp, states, {"m": 1000}, preferred_chunk=8, budget=budget,
                    source="test", refine=False)
    assert (p.chunk, p.max_chunk) == (3, 3)
    assert p.total() <= 0.9 * budget < p.total(4)
    # Preferring less than fits keeps the preference.
    assert memory.plan(data, engine, hp, states, preferred_chunk=2, budget=budget,
                       refine=False).chunk == 2
    # A preference above the clients in flight is kept (it means "all at once").
    roomy = memory.plan(data, engine, hp, states, preferred_chunk=8, budget=10**12)
    assert (roomy.chunk, roomy.max_chunk) == (8, 6) and roomy.total() == roomy.total(6)
    # An explicit chunk_size above the cap is refused, naming the figures and the cap.
    with pytest.raises(ValueError, match=r"chunk_size = 8 needs .* MiB per device: data .*"
                                         r"largest chunk size that fits is 3"):
        memory.plan(data, engine, hp, states, {"m": 1000}, preferred_chunk=8,
                    explicit_chunk=True, budget=budget, source="test", refine=False)
    # Not even one client fits: refused with every figure and the budget's source.
    with pytest.raises(ValueError) as e:
        memory.plan(data, engine, hp, states, {"m": 1000}, preferred_chunk=1,
                    budget=free.fixed, source="memory_limit = 'x'", refine=False)
    msg = str(e.value)
    for part in ("memory: this run needs", "data ", "method states", "block history",
                 "per client in flight", "available per device (memory_limit = 'x')"):
        assert part in msg, part


def test_simulate_refuses_before_placing_anything(tmp_path):
    with pytest.raises(ValueError, match=r"memory: this run needs [0-9.]+ MiB per device .*"
                                         r"memory_limit = '64KB'"):
        simulate(_cfg(memory_limit="64KB"), run_dir=tmp_path / "r", verbose=False)
    assert not (tmp_path / "r" / "metadata.json").exists()
    with pytest.raises(ValueError, match="memory_limit"):
        simulate(_cfg(memory_limit="lots"), run_dir=tmp_path / "r", verbose=False)


def test_working_set_bound_covers_xla_buffers_and_is_refined_when_it_binds(make_federated):
    """The traced per-client bound is at least XLA's buffers for the same programs; when the
    bound would lower the chunk, the plan decides on XLA's figure instead."""
    engine, data, hp = _engine_data(make_federated)
    bound = memory.per_client_bytes(engine, data, hp)
    exact = memory.xla_per_client_bytes(engine, data, hp)
    assert bound["train"] >= exact["train"] > 0 and bound["eval"] >= exact["eval"] > 0
    # It grows with the work: a wider model needs more per client.
    wide = Engine(make_model("mlp", (6,), 3, hidden=[256]), engine.local, engine.optimizer)
    assert memory.per_client_bytes(wide, data, hp)["train"] > bound["train"]
    # A budget where the bound fits 1 client at a time but XLA's figure fits all 6.
    states = {"m": jax.eval_shape(lambda: {"p": jnp.zeros((50, 50))})}
    loose = memory.plan(data, engine, hp, states, preferred_chunk=6, budget=None)
    assert loose.working == "traced bound"
    budget = int((loose.fixed + max(1.5 * loose.per_client, 6.5 * max(exact.values()))) / 0.9)
    p = memory.plan(data, engine, hp, states, preferred_chunk=6, budget=budget)
    assert p.working == "XLA buffer assignment" and p.per_client == max(exact.values())
    assert p.chunk == 6 and p.total() <= 0.9 * budget


def test_intermediate_bytes_counts_loop_bodies_once():
    x = jax.ShapeDtypeStruct((100,), jnp.float32)
    flat = jax.make_jaxpr(lambda a: jnp.sin(a) + 1.0)(x)
    assert memory.intermediate_bytes(flat) == 2 * 400
    looped = jax.make_jaxpr(lambda a: jax.lax.scan(lambda c, _: (jnp.sin(c) + 1.0, None),
                                                   a, None, length=50)[0])(x)
    # The body (2 values) once, plus the loop's own output; not 50 iterations' worth.
    assert memory.intermediate_bytes(looped) == 3 * 400
    assert np.isclose(memory.tree_bytes({"k": jax.random.key(0)}), 8)


def test_gossip_round_working_set_matches_xla_buffers_of_a_donated_round(make_federated):
    """A gossip method's round holds a second stack of the per-node models (the accumulator)
    and one edge chunk of messages beyond its state: the planner's round figure covers XLA's
    temporaries of the donated DFedAvg round, and is not a loose bound (within 25%)."""
    from fedrnd.algorithms import DFedAvg, FedAvg

    data = make_federated([6] * 40, dim=200, num_classes=10)
    model = make_model("mlp", (200,), 10, hidden=[64])
    opt, hp = client_hparams(40, optimizer="sgd", lr=0.1)
    engine = Engine(model, LocalSpec(batch_size=3, steps=2), opt, ClientMapper(chunk_size=1))
    for edge_chunk in (None, 16):  # None: the default chunk (every edge at once here)
        alg = DFedAvg(engine=engine, topology="d_regular", graph={"degree": 4},
                      edge_chunk=edge_chunk)
        state = alg.init(jax.random.key(0), data, jax.tree.map(jnp.array, hp))
        template = alg.init_template(jax.random.key(0), data, hp)
        extra = alg.round_bytes(template, data)
        one = memory.tree_bytes(model.init(jax.random.key(0)))
        edges = 2 * 40 * 4 // 2 + 40  # 80 undirected edges, both directions, self-loops
        chunk = edge_chunk or edges  # the default chunk (64 MiB of messages) holds them all
        assert extra == 40 * one + chunk * one
        mem = jax.jit(alg.round, donate_argnums=0).lower(
            state, data, jax.random.key(1)).compile().memory_analysis()
        if mem is None:  # a backend without buffer figures
            pytest.skip("no memory_analysis on this backend")
        temp = mem.temp_size_in_bytes
        assert temp <= extra + 4 * MiB, (temp, extra)
        assert extra <= 1.25 * temp + MiB, (temp, extra)
        # The plan counts it once, beside the state.
        p = memory.plan(data, engine, hp, {"dfedavg": template}, preferred_chunk=1,
                        rounds={"dfedavg": extra})
        assert p.fixed == p.data + memory.state_bytes(template) + extra
        assert "round working set" in p.describe()
    # A server method's round adds nothing.
    fedavg = FedAvg(engine=engine)
    assert fedavg.round_bytes(fedavg.init_template(jax.random.key(0), data, hp), data) == 0
