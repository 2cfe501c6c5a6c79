"""``fedrnd.driver.sweep``: the generic cell record store (:class:`CellCache`) and the
``fedrnd.driver.compare`` shim that keeps the old import path working."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from fedrnd.driver import compare, sweep
from fedrnd.driver.sweep import CellCache
from fedrnd.driver.sweep import cells as sweep_cells

KEY = {"scenario": "rot", "seed": 0, "options": {"lr": 0.1, "tau": [1, 2]}}
REC = {"acc": 0.5, "history": [{"round": 1, "acc": 0.5}]}


def test_round_trip_stamps_the_key_hash(tmp_path):
    cache = CellCache(tmp_path)
    p = cache.put(KEY, REC)
    # Without a name the file is named by the hash; the hash is in the record as well.
    h = CellCache.key_hash(KEY)
    assert p == tmp_path / f"{h}.json"
    assert cache.get(KEY) == {**REC, "key_hash": h}
    # Key order does not matter: the hash is of the canonical (sorted) JSON.
    assert cache.get(dict(reversed(list(KEY.items())))) == {**REC, "key_hash": h}
    # A readable path under the root, as compare and the experiment scripts lay them out.
    q = cache.put(KEY, REC, name="rot/fedavg/seed0.json")
    assert q == tmp_path / "rot" / "fedavg" / "seed0.json"
    assert cache.get(KEY, name="rot/fedavg/seed0.json")["acc"] == 0.5
    assert cache.get(KEY, name="rot/fedavg/seed1.json") is None
    # No temporary file stays behind.
    assert sorted(x.name for x in tmp_path.rglob("*") if x.is_file()) == [f"{h}.json",
                                                                        "seed0.json"]


def test_stale_key_is_a_miss(tmp_path):
    cache = CellCache(tmp_path)
    cache.put(KEY, REC, name="cell.json")
    assert cache.get({**KEY, "seed": 1}, name="cell.json") is None
    assert cache.get({**KEY, "options": {"lr": 0.2, "tau": [1, 2]}}, name="cell.json") is None
    # Rewriting under the new key replaces the stale record.
    cache.put({**KEY, "seed": 1}, {"acc": 0.7}, name="cell.json")
    assert cache.get({**KEY, "seed": 1}, name="cell.json")["acc"] == 0.7
    assert cache.get(KEY, name="cell.json") is None


def test_hash_mismatch_missing_hash_and_garbage_are_ignored(tmp_path):
    cache = CellCache(tmp_path)
    p = cache.put(KEY, REC, name="cell.json")
    rec = json.loads(p.read_text())
    p.write_text(json.dumps({**rec, "key_hash": "0" * 16}))
    assert cache.get(KEY, name="cell.json") is None
    # No hash: not trusted, unless the cache adopts records from before it existed.
    p.write_text(json.dumps(REC))
    assert cache.get(KEY, name="cell.json") is None
    assert CellCache(tmp_path, legacy=True).get(KEY, name="cell.json") == REC
    # ... but legacy never accepts a record whose hash is wrong.
    p.write_text(json.dumps({**REC, "key_hash": "0" * 16}))
    assert CellCache(tmp_path, legacy=True).get(KEY, name="cell.json") is None
    for text in ("{half a rec", "[1, 2]", ""):
        p.write_text(text)
        assert cache.get(KEY, name="cell.json") is None
    p.write_bytes(b"\xff\xfe")
    assert cache.get(KEY, name="cell.json") is None


def test_failed_write_leaves_the_old_record(tmp_path, monkeypatch):
    cache = CellCache(tmp_path, default=None)
    p = cache.put(KEY, REC, name="cell.json")
    before = p.read_bytes()
    # A record that cannot be serialised changes nothing on disk.
    with pytest.raises(TypeError):
        cache.put(KEY, {"acc": object()}, name="cell.json")
    assert p.read_bytes() == before
    # A write that dies before the rename (disk full, killed) leaves the old file whole and
    # no temporary file behind.
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        cache.put(KEY, {"acc": 0.9}, name="cell.json")
    monkeypatch.undo()
    assert p.read_bytes() == before
    assert [x.name for x in tmp_path.iterdir()] == ["cell.json"]
    assert cache.get(KEY, name="cell.json")["acc"] == 0.5


def test_record_bytes_and_hash_match_the_compare_cells_before_the_split(tmp_path):
    """Cells cached by ``fedrnd compare`` before the package existed stay valid: same hash
    function (16 hex digits of SHA-256 of ``json.dumps(key, sort_keys=True, default=str)``),
    same field, same bytes."""
    key = {"b": 1, "a": {"x": 1.5}, "p": tmp_path}  # a Path: written with str()
    want = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert CellCache.key_hash(key) == want
    rec = {"scenario": "rot", "config_hash": "stale", "wall_time": 1.0}
    p = CellCache(tmp_path, hash_field="config_hash").put(key, rec, name="a/seed0.json")
    stamped = {"scenario": "rot", "config_hash": want, "wall_time": 1.0}  # same field order
    assert p.read_text() == json.dumps(stamped, indent=1, default=float) + "\n"


def test_compare_cells_use_the_cache(tmp_path):
    grid = compare.parse_grid({
        "name": "t", "seeds": [0], "cache_dir": str(tmp_path / "cache"),
        "config": {"rounds": 1, "data": {"source": "digits", "num_clients": 4},
                   "model": {"name": "logreg", "options": {}}},
        "scenarios": [{"name": "iid", "partition": "iid"}], "methods": ["fedavg"]}, tmp_path)
    cell = grid.cells()[0]
    assert cell.config_hash == CellCache.key_hash(cell.key)
    store = CellCache(grid.cache_dir / "cells", hash_field="config_hash")
    assert store.path(cell.key, cell.name) == cell.path(grid.cache_dir)
    assert compare.load_cell(cell, grid.cache_dir) is None
    store.put(cell.key, {"final": {}}, name=cell.name)
    assert compare.load_cell(cell, grid.cache_dir) == {"final": {}, "config_hash": cell.config_hash}


# Every name importable from fedrnd.driver.compare before the split that callers use: the
# public API, plus the private helpers experiments/decentralized/report.py imports.
SHIM_NAMES = {
    "grid": ["Grid", "Margins", "MethodSpec", "Scenario", "load_grid", "parse_grid", "resolve_k",
             "_make_cell"],
    "cells": ["Cell", "CellCache", "load_cell", "pad_pool", "run_cell", "run_grid"],
    "report": ["margin_rows", "margin_table", "plot_scenario", "scenario_rows", "scenario_table",
               "write_report", "_machine"],
}


@pytest.mark.parametrize("module, name", [(m, n) for m, ns in SHIM_NAMES.items() for n in ns])
def test_shim_reexports_the_same_objects(module, name):
    home = getattr(sweep, module)
    assert getattr(compare, name) is getattr(home, name)
    if not name.startswith("_"):
        assert name in compare.__all__ and getattr(sweep, name) is getattr(home, name)


def test_shim_all_is_complete():
    public = {n for ns in SHIM_NAMES.values() for n in ns if not n.startswith("_")}
    assert set(compare.__all__) == public == set(sweep.__all__)


def test_patching_the_shim_reaches_the_sweep(monkeypatch):
    """Tests patch ``compare.run_cell`` and expect ``run_grid`` to call the patch."""
    real = sweep_cells.run_cell
    fake = lambda *a, **k: None  # noqa: E731
    monkeypatch.setattr(compare, "run_cell", fake)
    assert sweep_cells.run_cell is fake and compare.run_cell is fake
    monkeypatch.undo()
    assert sweep_cells.run_cell is real and compare.run_cell is real
