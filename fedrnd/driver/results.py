"""Load what runs left on disk as tables: per-round history and final figures of every method.

Why: a run's results are spread over ``config.json``, ``status.json`` and, per method,
``metrics.jsonl`` and ``final.json`` (:mod:`fedrnd.driver.outputs`); comparing methods or runs
meant reading those by hand. :func:`load_run` reads one run directory, :func:`load_runs`
several (paths or glob patterns), as lists of row dicts, or pandas ``DataFrame`` s when pandas
is installed (it is optional, so it is imported only by :meth:`RunResults.to_pandas`).

A method that has not finished (an interrupted or failed run) has a history but no final row.
"""

from __future__ import annotations

import dataclasses
import glob
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedrnd.driver import rundir


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    from fedrnd.driver.outputs import read_rows

    return read_rows(path)


def _pandas():
    try:
        import pandas
    except ImportError as e:
        raise ImportError("to_pandas() needs pandas, which is not installed: pip install "
                          "pandas (or use .history() / .final(), plain lists of dicts)") from e
    return pandas


@dataclasses.dataclass
class RunResults:
    """One run directory's results.

    ``methods`` maps each method's tag (its directory) to its per-round rows
    (``metrics.jsonl``); ``finals`` to its final figures (``final.json``; absent for a method
    that did not finish). ``run`` names the run in tables of several runs.
    """

    run_dir: Path
    config: dict[str, Any]
    status: dict[str, Any] | None
    methods: dict[str, list[dict[str, Any]]]
    finals: dict[str, dict[str, Any]]
    run: str = ""

    def history(self, method: str | None = None) -> list[dict[str, Any]]:
        """Per-round rows (all methods, or one), each with a ``method`` column added."""
        if method is not None and method not in self.methods:
            raise KeyError(f"no method {method!r} in {self.run_dir}; methods: "
                           f"{', '.join(self.methods) or 'none'}")
        tags = [method] if method is not None else list(self.methods)
        return [{"method": t, **row} for t in tags for row in self.methods[t]]

    def final(self) -> list[dict[str, Any]]:
        """One row per finished method: its final figures, with a ``method`` column."""
        return [{"method": t, **f} for t, f in self.finals.items()]

    def to_pandas(self, which: str = "history"):
        """``history`` (default) or ``final`` as a pandas ``DataFrame`` (needs pandas)."""
        if which not in ("history", "final"):
            raise ValueError(f"which must be 'history' or 'final', got {which!r}")
        rows = self.history() if which == "history" else self.final()
        return _pandas().DataFrame(rows)


def _method_tags(run_dir: Path, config: dict[str, Any]) -> list[str]:
    """Methods in the config's order; then any other method directory (a plug-in's, an older
    config's) in name order."""
    tags = [a.get("label") or a.get("name") for a in config.get("algorithms", [])
            if isinstance(a, dict)]
    found = sorted(p.name for p in run_dir.iterdir()
                   if p.is_dir() and ((p / "metrics.jsonl").is_file()
                                      or (p / "final.json").is_file()))
    return [t for t in dict.fromkeys([*tags, *found]) if t in found]


def load_run(run_dir: str | Path) -> RunResults:
    """Read one run directory (``<out_dir>/<name>``); raise ``FileNotFoundError`` when it holds
    no fedrnd run (neither ``config.json`` nor ``status.json``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not rundir.is_run_dir(run_dir):
        raise FileNotFoundError(f"{run_dir} holds no fedrnd run (no config.json or "
                                f"{rundir.STATUS})")
    config = _read_json(run_dir / "config.json") or {}
    status = rundir.read_status(run_dir)
    methods, finals = {}, {}
    for tag in _method_tags(run_dir, config):
        methods[tag] = _read_jsonl(run_dir / tag / "metrics.jsonl")
        final = _read_json(run_dir / tag / "final.json")
        if final is not None:
            finals[tag] = final
    return RunResults(run_dir, config, status, methods, finals, run=run_dir.name)


@dataclasses.dataclass
class RunsResults:
    """Several runs (:func:`load_runs`); tables carry a ``run`` column before ``method``."""

    runs: list[RunResults]

    def history(self, method: str | None = None) -> list[dict[str, Any]]:
        return [{"run": r.run, **row} for r in self.runs
                if method is None or method in r.methods for row in r.history(method)]

    def final(self) -> list[dict[str, Any]]:
        return [{"run": r.run, **row} for r in self.runs for row in r.final()]

    def to_pandas(self, which: str = "history"):
        if which not in ("history", "final"):
            raise ValueError(f"which must be 'history' or 'final', got {which!r}")
        return _pandas().DataFrame(self.history() if which == "history" else self.final())


def load_runs(paths: str | Path | Iterable[str | Path]) -> RunsResults:
    """Several run directories: paths and/or glob patterns (``"runs/sweep-*"``), in order.

    Directories a pattern matches that hold no run are skipped; a path named outright that
    holds none is an error. Runs keep their directory name as ``run`` unless two share it,
    then their path tells them apart.
    """
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    dirs: list[Path] = []
    for item in items:
        text = str(item)
        if glob.has_magic(text):
            dirs += [Path(p) for p in sorted(glob.glob(text))
                     if Path(p).is_dir() and rundir.is_run_dir(Path(p))]
        else:
            dirs.append(Path(item))
    runs = [load_run(d) for d in dict.fromkeys(dirs)]
    names = [r.run for r in runs]
    for r in runs:
        if names.count(r.run) > 1:
            r.run = str(r.run_dir)
    return RunsResults(runs)
