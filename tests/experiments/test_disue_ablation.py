"""The DisUE ablations (experiments/disue/ablation.toml and report.py): the grid is the
sweep's base with one option changed per variant, the spread rule calls a difference a
finding only when it has one sign in every seed and exceeds the seed spread, and the report
command writes the ablation table, raw cells and figure at a tiny size."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import pytest

from fedrnd.driver.compare import load_grid
from tests.experiments._script import load_script

ROOT = Path(__file__).resolve().parents[2] / "experiments" / "disue"


@pytest.fixture(scope="module")
def report():
    return load_script(ROOT / "report.py", "disue_ablation_report")


def test_ablation_grid_is_the_sweep_base_with_one_option_changed_per_variant(report):
    grid = load_grid(ROOT / "ablation.toml")
    sweep = load_grid(ROOT / "sweep.toml")
    assert grid.seeds == [0, 1, 2]
    assert {s.partition_options["alpha"] for s in grid.scenarios} == {0.1, 0.5}
    assert grid.base == sweep.base
    assert [m.name for m in grid.methods if m.name != "disue"] == ["fedavg"]
    base = report.ABLATION_BASE[grid.name]
    opts = {m.label: m.options for m in grid.methods if m.name == "disue"}
    assert opts[base] == {m.label: m.options for m in sweep.methods}[base]
    changed = {lab: {k: v for k, v in o.items() if opts[base].get(k) != v}
               for lab, o in opts.items() if lab != base}
    assert all(len(c) == 1 and set(c) <= set(report.ABLATION_KEYS) for c in changed.values())
    assert sorted(map(str, changed.values())) == sorted(map(str, [
        {"teacher_weights": "uniform"}, {"temperature": 1.0}, {"temperature": 10.0},
        {"adv_weight": 0.0}, {"div_weight": 0.0}]))


def _row(method, seed, glob, pers=0.8):
    return {"scenario": "a", "method": method, "seed": seed, "algorithm": "disue",
            "global_acc": glob, "test_acc": pers}


def test_spread_rule_needs_one_sign_in_every_seed_and_a_gap_above_the_seed_sd(report):
    rows = [_row("base", s, g) for s, g in enumerate((0.70, 0.72, 0.74))]
    rows += [_row("lower", s, g) for s, g in enumerate((0.60, 0.62, 0.64))]  # -10 every seed
    rows += [_row("small", s, g) for s, g in enumerate((0.69, 0.71, 0.73))]  # -1 < sd 2
    rows += [_row("mixed", s, g) for s, g in enumerate((0.80, 0.80, 0.70))]  # signs differ
    d = report.ablation_diffs(rows, "base")
    assert set(d) == {("a", "lower"), ("a", "small"), ("a", "mixed")}
    assert d[("a", "lower")]["universal"] == pytest.approx([-0.10] * 3)
    assert d[("a", "lower")]["universal_outside"] and d[("a", "lower")]["universal_sign"] == -1
    assert not d[("a", "small")]["universal_outside"]
    assert not d[("a", "mixed")]["universal_outside"]


def test_report_command_writes_the_ablation_table_raw_cells_and_figure(tmp_path, report):
    small = ['data.source="digits"', "data.num_clients=6", "rounds=2", "eval_every=2",
             "local.steps=1", "model.options={hidden=[8]}"]
    grid = load_grid(ROOT / "ablation.toml", small)
    grid.scenarios = grid.scenarios[:1]
    grid.seeds = [0]
    keep = ("fedavg", "disue sim g50 s2", "uniform teachers")
    grid.methods = [dataclasses.replace(m, options={
        **m.options, **({"distill_steps": 2, "noise_dim": 8, "generator_hidden": [8]}
                        if "distill_steps" in m.options else {})})
        for m in grid.methods if m.label in keep]
    grid.cache_dir = tmp_path / "cache"
    grid.results = tmp_path / "ABLATION.md"
    assert report.run_missing(grid, log=None, order_by="method") == 3
    out, done, n = report.write(grid)
    assert (done, n) == (3, 3)
    text = out.read_text()
    assert "## Ablations: each reconstructed part against the base" in text
    assert "| uniform teachers | teacher_weights = \"uniform\" |" in text
    assert "### Verdict" in text and "budget sweep" not in text
    assert (tmp_path / "figures" / f"{grid.name}.png").stat().st_size > 0
    with open(tmp_path / f"{grid.name}_cells.csv") as fh:
        cells = {r["method"]: r for r in csv.DictReader(fh)}
    assert sorted(cells) == sorted(keep)
    assert cells["uniform teachers"]["teacher_weights"] == "uniform"
    assert cells["disue sim g50 s2"]["teacher_weights"] == "class_mass"
    # An earlier run of the same cells beside the report: the run-to-run check appears.
    assert "Run-to-run noise" not in text
    (tmp_path / report.ABLATION_RERUN[grid.name]).write_text(
        (tmp_path / f"{grid.name}_cells.csv").read_text())
    text = report.write(grid)[0].read_text()
    assert "- dirichlet-0.1: +0.0 points (largest |difference| 0.0)." in text
    assert "FedAvg's global model, the same comparison: 1 of 1 cells identical." in text
