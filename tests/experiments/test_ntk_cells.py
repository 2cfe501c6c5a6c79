"""experiments/ntk/run.py caches its cells with :class:`fedrnd.driver.sweep.CellCache`: the
committed cells (written before it, without a hash) stay reusable, new ones carry the hash of
their key, and a changed setting is a miss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.experiments._script import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "ntk" / "run.py"


@pytest.fixture(scope="module")
def mod():
    return load_script(SCRIPT, "ntk_run")


def test_committed_cells_are_reused(mod):
    found = 0
    for scn, labels in mod.PLAN.items():
        for label in labels:
            name = mod.cell_name(scn, label, 0)
            if not (mod.CELLS / name).is_file():
                continue
            found += 1
            key = mod.cell_key(scn, label, 0, None)
            rec = mod.CACHE.get(key, name=name)
            assert rec is not None, name
            # And they were computed under today's key: the legacy read is not a stale read.
            assert all(json.loads(json.dumps(v)) == rec[k] for k, v in key.items()
                       if k != "target"), name
    assert found > 0


def test_new_cells_carry_their_key(mod, tmp_path, monkeypatch):
    monkeypatch.setattr(mod, "CACHE", type(mod.CACHE)(tmp_path, legacy=True, default=None))
    key = mod.cell_key("main", "dfedavg", 0, 2)
    assert key["max_rounds"] == 2 and mod.cell_key("main", "ntk_dfl", 0, None)["max_rounds"] == 20
    name = mod.cell_name("main", "spark(reg+mom)", 0)
    assert name == "main/spark_reg-mom_seed0.json"
    mod.CACHE.put(key, {"history": []}, name=name)
    assert mod.CACHE.get(key, name=name) is not None
    assert mod.CACHE.get(mod.cell_key("main", "dfedavg", 0, None), name=name) is None


def test_main_skips_cached_cells_and_reruns_changed_ones(mod, tmp_path, monkeypatch):
    runs = []
    monkeypatch.setattr(mod, "HERE", tmp_path)
    monkeypatch.setattr(mod, "CELLS", tmp_path / "cells")
    monkeypatch.setattr(mod, "CACHE", type(mod.CACHE)(tmp_path / "cells", legacy=True,
                                                      default=None))
    monkeypatch.setattr(mod, "report", lambda seed: "report\n")
    monkeypatch.setattr(mod, "run_cell", lambda *a: runs.append(a) or {"label": a[1]})
    argv = ["--only", "main", "--methods", "dfedavg", "--max-rounds", "2"]
    assert mod.main(argv) == 0 and len(runs) == 1
    rec = json.loads((tmp_path / "cells" / "main" / "dfedavg_seed0.json").read_text())
    assert rec == {"label": "dfedavg",
                   "key_hash": mod.CACHE.key_hash(mod.cell_key("main", "dfedavg", 0, 2))}
    assert mod.main(argv) == 0 and len(runs) == 1  # cached
    assert mod.main(argv[:-2]) == 0 and len(runs) == 2  # another round budget: re-run
    assert mod.main([*argv, "--no-cache"]) == 0 and len(runs) == 3  # not read
