"""Sweeps (``fedrnd compare``): methods x scenarios x seeds under one protocol, and a report.

A *grid* file (TOML) names a base config, the scenarios (data partitions), the methods with
their options and the seeds; every (scenario, method, seed) *cell* is one :func:`simulate`
run of one method, whose result is cached as a JSON file, so an interrupted grid resumes
where it stopped (finished cells are skipped; a cell whose resolved config changed is re-run).
At the end :func:`write_report` turns the cached cells into a markdown file (``RESULTS.md``)
with one table per scenario and an accuracy-vs-round plot per scenario; nothing in it is typed.

Grid file::

    name = "compare"                 # cache key; outputs default to runs/compare/<name>
    base = "default.toml"            # optional base config (relative to the grid file)
    seeds = [0, 1, 2]
    finetune_epochs = 1              # the fine-tune protocol's local budget
    results = "RESULTS.md"           # the report (relative to the grid file)
    [config]                         # overrides of the base config (any field)
    rounds = 30
    [[scenarios]]
    name = "rotation"
    partition = "rotation"
    partition_options = { num_groups = 4 }
    [[methods]]
    name = "ifca"
    label = "ifca K-1"
    options = { num_clusters = "K-1" }   # "K", "K-1", "K+2": the scenario's number of groups
    [margins]                        # optional: each method's gain over a baseline, by seed
    baseline = "fedavg"              # a method label
    reference = 7.0                  # optional: a published gap in points, to compare with
    reference_note = "IFCA paper, rotated MNIST"

Modules: :mod:`.grid` (the file, its scenarios and methods, the cells it enumerates),
:mod:`.cells` (running cells and caching their records; :class:`~.cells.CellCache`, the record
store, is meant for other scripts' cells too), :mod:`.report` (tables, figures, the markdown).

Fairness: within a seed every method gets the same data split, the same initial weights (the
model init key depends on the seed only), the same task model and local budget, and the same
fine-tune protocol; no method is tuned per scenario (the grid states the options each runs with).
"""

from fedrnd.driver.sweep.cells import (
    Cell,
    CellCache,
    load_cell,
    pad_pool,
    run_cell,
    run_grid,
)
from fedrnd.driver.sweep.grid import (
    Grid,
    Margins,
    MethodSpec,
    Scenario,
    load_grid,
    parse_grid,
    resolve_k,
)
from fedrnd.driver.sweep.report import (
    margin_rows,
    margin_table,
    plot_scenario,
    scenario_rows,
    scenario_table,
    write_report,
)

__all__ = ["Cell", "CellCache", "Grid", "Margins", "MethodSpec", "Scenario", "load_cell",
           "load_grid", "margin_rows", "margin_table", "pad_pool", "parse_grid", "plot_scenario",
           "resolve_k", "run_cell", "run_grid", "scenario_rows", "scenario_table", "write_report"]
