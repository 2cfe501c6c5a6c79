"""The former home of ``fedrnd compare``, kept so that existing imports keep working.

The code now lives in :mod:`fedrnd.driver.sweep` (``grid``, ``cells``, ``report``); this module
re-exports the names callers used from here. Assigning one of them here (``monkeypatch.setattr
(compare, "run_cell", ...)``) also assigns it in the module that defines it, because that is
where the sweep's own code looks it up; a plain re-export would make such a patch a silent
no-op.
"""

from __future__ import annotations

import sys
import types

from fedrnd.driver.sweep.cells import Cell, CellCache, load_cell, pad_pool, run_cell, run_grid
from fedrnd.driver.sweep.grid import (
    Grid,
    Margins,
    MethodSpec,
    Scenario,
    _make_cell,  # noqa: F401 (experiments/decentralized/report.py)
    load_grid,
    parse_grid,
    resolve_k,
)
from fedrnd.driver.sweep.report import (
    _machine,  # noqa: F401 (experiments/decentralized/report.py)
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

# Each re-exported name -> the module that defines it (``_make_cell`` and ``_machine`` are
# private but used by experiments/decentralized/report.py).
_HOMES = {name: sys.modules[globals()[name].__module__]
          for name in (*__all__, "_make_cell", "_machine")}


class _Forwarding(types.ModuleType):
    """A module whose assignments to re-exported names reach their defining module too."""

    def __setattr__(self, name: str, value: object) -> None:
        home = _HOMES.get(name)
        if home is not None:
            setattr(home, name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Forwarding
