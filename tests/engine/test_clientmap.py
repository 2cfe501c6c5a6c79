"""ClientMapper.map / .sum against a plain per-client Python loop, for several chunk sizes;
ClientMapper.place_data on a mesh of host devices."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrnd import compilation_cache
from fedrnd.engine import ClientMapper, default_chunk_size

C = 7  # not divisible by 3 (nor by 2, 4, 5)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    per_client = {"a": rng.normal(size=(C, 3)).astype(np.float32),
                  "b": rng.uniform(0.5, 2.0, size=(C,)).astype(np.float32),
                  "n": np.arange(C, dtype=np.int32) + 1}
    shared = {"m": rng.normal(size=(3, 4)).astype(np.float32),
              "s": np.float32(0.7)}
    return per_client, shared


def fn(client, shared):
    """A nonlinear per-client function of its own leaves and the shared ones."""
    h = jnp.tanh(client["a"] @ shared["m"]) * client["b"]
    return {"h": h, "stats": {"sq": jnp.sum(client["a"] ** 2) * shared["s"],
                              "n": client["n"].astype(jnp.float32) * h[0]}}


def ref_one(client, shared):
    h = np.tanh(client["a"].astype(np.float64) @ shared["m"]) * client["b"]
    return {"h": h, "stats": {"sq": np.sum(client["a"].astype(np.float64) ** 2) * shared["s"],
                              "n": float(client["n"]) * h[0]}}


def ref_map(per_client, shared):
    outs = [ref_one({k: v[c] for k, v in per_client.items()}, shared) for c in range(C)]
    return jax.tree.map(lambda *xs: np.stack(xs), *outs)


def _close(a, b, tol=1e-5):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=tol, atol=tol)


CHUNKS = [1, 2, 3, C, 10, None]


@pytest.mark.parametrize("chunk", CHUNKS)
def test_map_matches_per_client_loop(chunk):
    per_client, shared = _inputs()
    mapper = ClientMapper(chunk_size=chunk)
    out = jax.jit(lambda p, s: mapper.map(fn, p, s))(per_client, shared)
    _close(out, ref_map(per_client, shared))
    assert out["h"].shape == (C, 4)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_sum_matches_sum_of_per_client_loop(chunk):
    per_client, shared = _inputs(1)
    mapper = ClientMapper(chunk_size=chunk)
    out = jax.jit(lambda p, s: mapper.sum(fn, p, s))(per_client, shared)
    _close(out, jax.tree.map(lambda x: x.sum(0), ref_map(per_client, shared)))
    assert out["h"].shape == (4,)
    # And sum == sum of map, for the same mapper.
    mapped = mapper.map(fn, per_client, shared)
    _close(out, jax.tree.map(lambda x: jnp.sum(x, 0), mapped))


def test_results_agree_across_chunk_sizes():
    per_client, shared = _inputs(2)
    maps = [ClientMapper(chunk_size=c).map(fn, per_client, shared) for c in (1, 3, C)]
    sums = [ClientMapper(chunk_size=c).sum(fn, per_client, shared) for c in (1, 3, C)]
    for m in maps[1:]:
        _close(m, maps[0])
    for s in sums[1:]:
        _close(s, sums[0])


def test_shared_may_be_none_and_single_client():
    x = {"a": jnp.arange(6.0).reshape(2, 3)}
    for chunk in (1, 2, 5):
        mapper = ClientMapper(chunk_size=chunk)
        out = mapper.map(lambda c, s: jnp.sum(c["a"] ** 2), x)
        np.testing.assert_allclose(np.asarray(out), [5.0, 50.0])
        total = mapper.sum(lambda c, s: c["a"] * 2.0, x)
        np.testing.assert_allclose(np.asarray(total), [6.0, 10.0, 14.0])
        one = mapper.sum(lambda c, s: c["a"], {"a": x["a"][:1]})
        np.testing.assert_allclose(np.asarray(one), [0.0, 1.0, 2.0])


def test_default_chunk_and_no_mesh():
    mapper = ClientMapper()
    assert mapper.chunk == default_chunk_size() >= 1
    assert mapper.num_shards == 1
    tree = {"a": jnp.ones((3, 2))}
    assert mapper.shard(tree) is tree and mapper.replicate(tree) is tree


@pytest.mark.parametrize("chunk", [1, 2, 3, C, 16])
def test_segment_sum_matches_per_segment_loop(chunk):
    per_client, shared = _inputs(3)
    seg = np.array([2, 0, 2, 5, 0, 2, 7], np.int32)  # 7 is out of range for K=6: dropped
    per_client["seg"] = seg
    mapper = ClientMapper(chunk_size=chunk)
    out = jax.jit(lambda p, s: mapper.segment_sum(lambda c, sh: (c["seg"], fn(c, sh)), p, s,
                                                  num_segments=6))(per_client, shared)
    ref = ref_map({k: v for k, v in per_client.items() if k != "seg"}, shared)
    for k in range(6):
        members = np.flatnonzero(seg == k)
        expect = jax.tree.map(lambda x, m=members: x[m].sum(0), ref)
        _close(jax.tree.map(lambda x, k=k: x[k], out), expect)
    assert np.all(np.asarray(out["h"][1]) == 0)  # empty segment: exactly zero


def test_segment_sum_rejects_no_segments():
    per_client, shared = _inputs()
    with pytest.raises(ValueError, match="num_segments"):
        ClientMapper().segment_sum(lambda c, s: (0, c["a"]), per_client, shared, num_segments=0)


def _update(client, carried, shared):
    """A per-client step that rewrites the client's carried slot and reports a metric."""
    h = jnp.tanh(carried["w"] @ shared["m"]) * client["b"]
    return {"w": carried["w"] + h[:3] * shared["s"]}, {"h0": h[0], "n": client["n"]}


@pytest.mark.parametrize("chunk", [1, 3, C])
def test_map_update_equals_map_over_client_and_carried(chunk):
    per_client, shared = _inputs()
    carried = {"w": per_client.pop("a")}
    mapper = ClientMapper(chunk_size=chunk)
    got = jax.jit(lambda p, c, s: mapper.map_update(_update, p, c, s))(per_client, carried, shared)
    want = jax.jit(lambda p, c, s: mapper.map(lambda xc, sh: _update(xc[0], xc[1], sh), (p, c),
                                              s))(per_client, carried, shared)
    jax.tree.map(np.testing.assert_array_equal, got, want)



PLACE_SCRIPT = """
import numpy as np, jax
from fedrnd import compilation_cache
compilation_cache.enable()
from tests.conftest import gaussian_federated
from fedrnd.engine import ClientMapper, make_mesh

data = gaussian_federated([3, 5, 2, 4, 6, 1, 2, 3])
for mapper in (ClientMapper(), ClientMapper(mesh=make_mesh(4))):
    placed = mapper.place_data(data)
    devices = set(jax.devices()) if mapper.mesh is not None else {jax.devices()[0]}
    for name in ("x", "y"):  # the pool: whole on every device
        a = getattr(placed, name)
        assert a.sharding.device_set == devices and a.sharding.is_fully_replicated, name
        np.testing.assert_array_equal(np.asarray(a), np.asarray(getattr(data, name)))
    for name, a in placed.client_arrays().items():  # per-client leaves: split over the mesh
        assert a.sharding.device_set == devices, name
        shards = {s.data.shape[0] for s in a.addressable_shards}
        assert shards == ({8 // 4} if mapper.mesh is not None else {8}), (name, shards)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(data.client_arrays()[name]))
    # A later phase reuses the placed pool as it is (no second copy).
    again = mapper.place_data(data, pool=(placed.x, placed.y))
    assert again.x is placed.x and again.y is placed.y
    assert again.num_clients == data.num_clients and again.num_classes == data.num_classes
print("ok")
"""


def test_place_data_replicates_the_pool_and_splits_the_clients():
    """ClientMapper.place_data on 4 host devices (a subprocess: the device count is fixed when
    JAX starts) and without a mesh: where each array lands, and that values are unchanged."""
    root = Path(__file__).resolve().parents[2]
    env = compilation_cache.subprocess_env()
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", PLACE_SCRIPT], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
