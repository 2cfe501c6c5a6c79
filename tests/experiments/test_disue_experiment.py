"""The DisUE experiment (experiments/disue): its grid parses with every cell valid, and the
grid plus its report run end to end at a small size (digits instead of Fashion-MNIST)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from fedrnd.driver.compare import load_grid, run_grid
from tests.experiments._script import load_script

ROOT = Path(__file__).resolve().parents[2] / "experiments" / "disue"


@pytest.fixture(scope="module")
def report():
    return load_script(ROOT / "report.py", "disue_report")


def test_grid_parses_with_every_cell_valid():
    grid = load_grid(ROOT / "grid.toml")
    cells = grid.cells()
    assert cells and all(c.config is not None for c in cells)
    assert {s.partition_options["alpha"] for s in grid.scenarios} == {0.1, 0.5}
    names = {m.name for m in grid.methods}
    assert {"disue", "fedavg", "ifca", "rnd"} <= names
    assert all(c.config.data.num_clients == 100 for c in cells)


@pytest.mark.slow
def test_experiment_runs_end_to_end_at_small_size(tmp_path, report):
    small = ['data.source="digits"', "data.num_clients=8", "rounds=2", "eval_every=1",
             "local.steps=2", "model.options={hidden=[16]}"]
    grid = load_grid(ROOT / "grid.toml", small)
    grid.scenarios = grid.scenarios[:1]
    # The grid's methods with their distillation and discovery budgets cut to a few steps.
    cut = {"distill_steps": 2, "rnd_predictor_steps": 10}
    grid.methods = [dataclasses.replace(m, options={**m.options, **{
        k: v for k, v in cut.items() if k in m.options}})
        for m in grid.methods if m.label in ("fedavg", "disue ifca", "disue rnd")]
    grid.cache_dir = tmp_path / "cache"
    grid.results = tmp_path / "RESULTS.md"
    records = run_grid(grid, log=None, write=False)
    assert len(records) == 3
    out, done, n = report.write(grid)
    assert (done, n) == (3, 3)
    text = out.read_text()
    assert "## Global models on the global test set" in text and "| disue ifca |" in text
    rec = records[("dirichlet-0.1", "disue ifca", 0)]
    assert 0.0 <= rec["final"]["universal_acc"] <= 1.0
    hist = report.cell_history(grid, [c for c in grid.cells()
                                      if c.method.label == "disue ifca"][0])
    assert [h["round"] for h in hist] == [1, 2] and all("universal_acc" in h for h in hist)
    assert (tmp_path / "figures" / "disue_dirichlet-0.1_global.png").is_file()
    json.dumps(rec)  # the cached record stays plain JSON
