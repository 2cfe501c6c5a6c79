"""Chunk autotuning: measured once per workload, cached on disk, reused by the driver."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedrnd.driver import AlgorithmConfig, Config, DataConfig, ModelConfig, simulate
from fedrnd.driver.setup import build_data, build_engine
from fedrnd.engine import ClientMapper, Engine, LocalSpec, autotune, client_hparams
from fedrnd.models import make_model


def _engine(hidden=8, batch=4):
    model = make_model("mlp", (5,), 3, hidden=[hidden])
    return Engine(model, LocalSpec(batch_size=batch, epochs=1),
                  client_hparams(1, optimizer="sgd", lr=0.1)[0], ClientMapper())


def test_candidates():
    assert autotune.candidates(1) == [1]
    assert autotune.candidates(8) == [1, 2, 4, 8]
    assert autotune.candidates(10) == [1, 2, 4, 8, 10]


def test_tune_measures_caches_and_reuses(tmp_path, make_federated):
    data = make_federated([6, 9, 4, 7, 8, 5], dim=5)
    _, hp = client_hparams(data.num_clients, optimizer="sgd", lr=0.1)
    engine = _engine()
    path = tmp_path / "tune.json"
    t = autotune.tune_chunk(engine, data, hp, chunks=[1, 8], repeats=1, path=path)
    # 8 is clamped to the 6 clients there are; every candidate was compiled and timed.
    assert not t.cached and sorted(t.per_client) == [1, 6] == sorted(t.compile)
    assert t.chunk == min(t.per_client, key=t.per_client.get)
    assert all(v > 0 for v in t.per_client.values())
    table = json.loads(path.read_text())
    assert table[t.key]["chunk"] == t.chunk and table[t.key]["workload"]["model"] == "mlp"
    # Same workload (other data values, same shapes): read from the cache, nothing timed.
    other = make_federated([6, 9, 4, 7, 8, 5], dim=5, seed=3)
    again = autotune.tune_chunk(engine, other, hp, chunks=[1, 8], path=path)
    assert again.cached and again.chunk == t.chunk and again.compile == {}
    assert autotune.lookup(engine, other, 6, path).chunk == t.chunk
    # A different model or local work is a different key; both entries are kept.
    assert autotune.lookup(_engine(hidden=16), data, 6, path) is None
    assert autotune.lookup(_engine(batch=2), data, 6, path) is None
    t2 = autotune.tune_chunk(_engine(hidden=16), data, hp, chunks=[1, 2], repeats=1, path=path,
                             max_chunk=1)
    assert sorted(t2.per_client) == [1] and t2.chunk == 1  # the memory cap bounds candidates
    assert set(json.loads(path.read_text())) == {t.key, t2.key}
    # use_cache=False measures again, write=False leaves the file alone.
    before = path.read_text()
    fresh = autotune.tune_chunk(engine, data, hp, chunks=[1], repeats=1, path=path,
                                use_cache=False, write=False)
    assert not fresh.cached and path.read_text() == before


def test_cache_location_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDRND_AUTOTUNE_CACHE", str(tmp_path / "x.json"))
    assert autotune.cache_path() == tmp_path / "x.json"
    monkeypatch.delenv("FEDRND_AUTOTUNE_CACHE")
    assert autotune.cache_path().name == "autotune.json"


def _cfg(**kw) -> Config:
    base = dict(rounds=2, eval_every=1, checkpoint_every=0, progress=False,
                data=DataConfig(source="digits", partition="rotation",
                                partition_options={"num_groups": 2}, num_clients=6),
                model=ModelConfig("mlp", {"hidden": [16]}),
                algorithms=[AlgorithmConfig("fedavg")])
    base.update(kw)
    return Config(**base)


@pytest.mark.slow
def test_simulate_uses_the_cached_chunk_and_reports_compile_time(tmp_path, monkeypatch):
    cache = tmp_path / "tune.json"
    monkeypatch.setenv("FEDRND_AUTOTUNE_CACHE", str(cache))
    cfg = _cfg(autotune=True)
    data, _ = build_data(cfg)
    engine, _, _ = build_engine(cfg, data)
    # Seed the cache with chunk 3 for this workload (6 clients on one device): no timing.
    desc = autotune.workload(engine, data, 6)
    cache.write_text(json.dumps({autotune._key(desc): {"chunk": 3, "per_client_s": {"3": 1.0}}}))
    res = simulate(cfg, run_dir=tmp_path / "run", verbose=False)
    meta = json.loads((tmp_path / "run" / "metadata.json").read_text())
    assert meta["autotune"]["cached"] and meta["autotune"]["chunk"] == 3
    assert meta["chunk_size"] == 3 == res.memory.chunk
    # Without autotune the backend default is used; results do not depend on the chunk size.
    plain = simulate(_cfg(), run_dir=tmp_path / "plain", verbose=False)
    assert json.loads((tmp_path / "plain" / "metadata.json").read_text())["chunk_size"] == 1
    a, b = res.methods["fedavg"], plain.methods["fedavg"]
    assert a.final["test_acc/mean"] == pytest.approx(b.final["test_acc/mean"], abs=1e-6)
    np.testing.assert_allclose(a.per_client["test_loss"], b.per_client["test_loss"], rtol=1e-4)
    # Compilation is reported apart from the rounds.
    f = a.final
    assert f["compile_time"] > 0 and 0 <= f["round_time"] <= f["time"]
    assert a.compile_time == f["compile_time"]
