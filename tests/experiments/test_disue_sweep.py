"""The DisUE budget sweep (experiments/disue/sweep.toml and report.py): the grid parses, the
verdict rule says "beats averaging" only when the universal expert wins in every seed, and
the one command (run the missing cells, then write the report) works end to end at a tiny
size."""

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
    return load_script(ROOT / "report.py", "disue_sweep_report")


def test_sweep_grid_has_three_seeds_both_alphas_and_the_required_rows():
    grid = load_grid(ROOT / "sweep.toml")
    assert grid.seeds == [0, 1, 2]
    assert {s.partition_options["alpha"] for s in grid.scenarios} == {0.1, 0.5}
    assert all(c.config is not None for c in grid.cells())
    names = {m.name for m in grid.methods}
    assert {"fedavg", "ifca", "disue"} <= names
    from fedrnd.algorithms import DisUE

    defaults = {f.name: f.default for f in DisUE.__dataclass_fields__.values()}
    disue = [{**defaults, **m.options} for m in grid.methods if m.name == "disue"]
    assert {o["distill"] for o in disue} == {"average", "generator", "proxy"}
    assert {o["grouping"] for o in disue} == {"similarity"}  # the paper's grouping
    gen = {(o["distill_steps"], o["student_steps"]) for o in disue
           if o["distill"] == "generator" and o["student_init"] == "average"}
    assert len({d for d, _ in gen}) >= 2 and len({s for _, s in gen}) >= 2
    assert any(o == {**defaults, "num_clusters": 4, "generator_head": "dense"} for o in disue)


def _row(method, seed, glob, avg=None, algorithm="disue", distill="generator"):
    return {"scenario": "a", "method": method, "seed": seed, "algorithm": algorithm,
            "distill": distill if algorithm == "disue" else None, "global_acc": glob,
            "average_acc": avg}


def test_verdict_needs_a_win_over_fedavg_and_own_average_in_every_seed(report):
    fed = [_row("fedavg", s, 0.70, algorithm="fedavg") for s in range(3)]
    rows = fed + [
        _row("win", 0, 0.72, 0.71), _row("win", 1, 0.71, 0.70), _row("win", 2, 0.73, 0.72),
        # Better on average, but one seed loses to FedAvg: no finding.
        _row("mixed", 0, 0.80, 0.70), _row("mixed", 1, 0.80, 0.70), _row("mixed", 2, 0.69, 0.60),
        # Beats FedAvg but not the average of its own experts: distillation did not help.
        _row("own", 0, 0.75, 0.76), _row("own", 1, 0.75, 0.74), _row("own", 2, 0.75, 0.74),
        _row("avg", 0, 0.70, 0.70, distill="average"),
    ]
    v = report.verdicts(rows)
    assert set(v) == {("a", "win"), ("a", "mixed"), ("a", "own")}
    assert v[("a", "win")]["beats"] and not v[("a", "mixed")]["beats"]
    assert not v[("a", "own")]["beats"]
    assert v[("a", "mixed")]["vs_fedavg"] == pytest.approx([0.10, 0.10, -0.01])
    assert v[("a", "own")]["vs_average"] == pytest.approx([-0.01, 0.01, 0.01])
    m, sd, lo, hi = report._stats([0.1, 0.2, 0.3])
    assert (m, sd, lo, hi) == pytest.approx((0.2, 0.1, 0.1, 0.3))


def test_report_command_runs_the_sweep_and_writes_tables_raw_cells_and_figure(tmp_path, report):
    """The report's one command at a tiny size: digits, 6 clients, 2 rounds, 2 distillation
    iterations; every cell runs, the raw CSVs hold one row per cell and per DisUE round, and
    the report has the sweep table, the verdict and the budget figure."""
    small = ['data.source="digits"', "data.num_clients=6", "rounds=2", "eval_every=2",
             "local.steps=1", "model.options={hidden=[8]}"]
    grid = load_grid(ROOT / "sweep.toml", small)
    grid.scenarios = grid.scenarios[:1]
    grid.seeds = [0]
    keep = ("fedavg", "disue sim g50 s2", "disue sim proxy g200 s2")
    grid.methods = [dataclasses.replace(m, options={
        **m.options, **({"distill_steps": 2, "noise_dim": 8, "generator_hidden": [8]}
                        if "distill_steps" in m.options else {}),
        **({"proxy_size": 32} if "proxy_size" in m.options else {})})
        for m in grid.methods if m.label in keep]
    grid.cache_dir = tmp_path / "cache"
    grid.results = tmp_path / "SWEEP.md"
    assert report.run_missing(grid, log=None) == 3
    assert report.run_missing(grid, log=None) == 0  # cached: nothing left to run
    out, done, n = report.write(grid)
    assert (done, n) == (3, 3)
    text = out.read_text()
    assert "## Does the universal expert beat averaging? (budget sweep)" in text
    assert "### Verdict" in text and "| disue sim g50 s2 | 2 x 2 |" in text
    assert "| fedavg+ft |" in text
    assert (tmp_path / "figures" / f"{grid.name}_budget.png").stat().st_size > 0
    with open(tmp_path / f"{grid.name}_cells.csv") as fh:
        cells = list(csv.DictReader(fh))
    assert sorted(r["method"] for r in cells) == sorted(keep)
    for r in cells:
        assert 0.0 <= float(r["test_acc"]) <= 1.0
        if r["algorithm"] == "disue":
            assert 0.0 <= float(r["global_acc"]) <= 1.0 and r["rounds"] == "2"
    with open(tmp_path / f"{grid.name}_rounds.csv") as fh:
        rounds = list(csv.DictReader(fh))
    assert len(rounds) == 2 * 2  # two DisUE cells x two rounds
