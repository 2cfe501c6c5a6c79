"""The cells of a sweep: one cached record per (scenario, method, seed) run, and the runs.

A record is written atomically and stamped with the hash of what produced it, so an
interrupted sweep resumes where it stopped (finished cells are skipped) and a cell whose
resolved config changed is re-run rather than reported stale. :class:`CellCache` is that
store on its own, for scripts that cache their own kind of cell (``experiments/ntk/run.py``,
``experiments/rnd/run.py``), with :func:`config_key` and :func:`method_defaults` for their keys.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fedrnd.driver.config import Config
    from fedrnd.driver.sweep.grid import Grid, MethodSpec, Scenario


class CellCache:
    """A directory of JSON records, each valid only for the key it was computed from.

    ``put(key, record)`` writes ``record`` with ``hash_field`` set to :meth:`key_hash` of
    ``key`` (a plain, JSON-able dict: a config, a setting, a seed); ``get(key)`` returns the
    record only while that hash still matches, so a changed key reads as a miss instead of a
    stale result. Writes go to a temporary file in the same directory and are moved into place
    with :func:`os.replace`, so a killed or failed write leaves the previous record (or none),
    never half a file. A record's file is ``name`` under ``root`` when given (readable paths,
    one file per cell, as compare and the experiment scripts lay them out), else
    ``<hash>.json``.

    ``legacy=True`` also accepts records that carry no hash at all: records written before
    their script used this cache, which trusted a file's existence alone. A record with a
    hash that does not match is never accepted.
    """

    def __init__(self, root: str | Path, *, hash_field: str = "key_hash", legacy: bool = False,
                 indent: int | None = 1, default: Callable[[Any], Any] | None = float) -> None:
        self.root = Path(root)
        self.hash_field = hash_field
        self.legacy = legacy
        self.indent = indent
        self.default = default

    @staticmethod
    def key_hash(key: dict[str, Any]) -> str:
        """16 hex digits of the SHA-256 of ``key``'s canonical JSON (sorted keys; values JSON
        cannot hold are written with ``str``), stable across processes and key order."""
        text = json.dumps(key, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def path(self, key: dict[str, Any], name: str | Path | None = None) -> Path:
        return self.root / (name if name is not None else f"{self.key_hash(key)}.json")

    def get(self, key: dict[str, Any], name: str | Path | None = None) -> dict[str, Any] | None:
        """The record stored for ``key``, or ``None`` when missing, unreadable or stale."""
        p = self.path(key, name)
        if not p.is_file():
            return None
        try:
            rec = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(rec, dict):
            return None
        if self.hash_field not in rec:
            return rec if self.legacy else None
        return rec if rec[self.hash_field] == self.key_hash(key) else None

    def put(self, key: dict[str, Any], record: dict[str, Any],
            name: str | Path | None = None) -> Path:
        """Store ``record`` for ``key`` (atomically) and return its path.

        The hash goes into ``record[hash_field]``, in place when the record already has that
        field (so records keep their field order), at the end otherwise.
        """
        rec = {**record, self.hash_field: self.key_hash(key)}
        return self._write(self.path(key, name), rec)

    def rewrite(self, name: str | Path, record: dict[str, Any]) -> Path:
        """Store ``record`` under ``name`` as it is (atomically), its hash field untouched.

        For a record whose derived fields were recomputed without re-running it (the hash it
        carries, or its lack of one, still says what produced it), and for side records outside
        the hash scheme (a note that a cell was skipped)."""
        return self._write(self.root / name, record)

    def _write(self, p: Path, rec: dict[str, Any]) -> Path:
        # Serialise before touching the disk: a record that cannot be written changes nothing.
        text = json.dumps(rec, indent=self.indent, default=self.default) + "\n"
        p.parent.mkdir(parents=True, exist_ok=True)
        # Same directory (os.replace must not cross file systems), a name no ``*.json`` glob
        # picks up, one per process; plain open() keeps the usual umask-derived permissions.
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(text)
            os.replace(tmp, p)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return p


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run: a method on a scenario with a seed. ``config`` is ``None`` when skipped."""

    scenario: Scenario
    method: MethodSpec
    seed: int
    config: Config | None
    resolved: dict[str, int]
    skip: str | None = None

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.+-]+", "_", self.method.label)

    def run_dir(self, cache: Path) -> Path:
        return cache / "runs" / self.scenario.name / self.slug / f"seed{self.seed}"

    @property
    def key(self) -> dict[str, Any]:
        """What the cell's result depends on: its resolved config without the fields that only
        say where or how verbosely it runs, plus the method's defaults (a changed default
        makes the cached cell stale)."""
        assert self.config is not None
        return {**config_key(self.config), "defaults": method_defaults(self.method.name)}

    @property
    def config_hash(self) -> str:
        return CellCache.key_hash(self.key)

    @property
    def name(self) -> str:
        """The record's file under the cache's ``cells/``: readable, one per cell."""
        return f"{self.scenario.name}/{self.slug}/seed{self.seed}.json"

    def path(self, cache: Path) -> Path:
        return cache / "cells" / self.name


NOT_IN_KEY = ("progress", "out_dir", "name", "tensorboard", "plugins", "loggers", "divergence")
"""Config fields that only say where or how verbosely a run goes: not part of a result's key.
Also the loggers and the divergence guard: neither changes a finished run's result, and leaving
them out keeps the hashes of cells cached before they existed."""


def config_key(config: Config) -> dict[str, Any]:
    """What a run's result depends on in its config: the resolved config as a dict, without
    the fields of :data:`NOT_IN_KEY`. A cache key for a result computed from ``config``."""
    d = config.to_dict()
    for k in NOT_IN_KEY:
        d.pop(k, None)
    return d


def method_defaults(name: str) -> dict[str, str]:
    """The registered method ``name``'s option defaults (``repr`` of each): in a cell's key, a
    changed default makes the cached cell stale."""
    from fedrnd.algorithms import ALGORITHMS

    return {f.name: repr(_field_default(f)) for f in dataclasses.fields(ALGORITHMS[name])
            if f.name != "engine"}


def _field_default(f: dataclasses.Field) -> Any:
    """A field's default value; a ``default_factory``'s product, not the ``MISSING`` sentinel
    (whose repr holds a memory address and would change the hash in every process)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _records(cache: Path) -> CellCache:
    """The grid's cell records: ``<cache>/cells/<scenario>/<method>/seed<k>.json``, stamped
    with ``config_hash`` (the field name older caches already use, so they stay valid)."""
    return CellCache(cache / "cells", hash_field="config_hash")


def load_cell(cell: Cell, cache: Path) -> dict[str, Any] | None:
    """The cached result of ``cell``, or ``None`` when missing, unreadable or stale."""
    if cell.config is None:
        return None
    return _records(cache).get(cell.key, name=cell.name)


def run_cell(cell: Cell, cache: Path, data: Any = None, fresh: bool = False) -> dict[str, Any]:
    """Run one cell with :func:`simulate` and cache its result (written atomically).

    A cell whose run was interrupted continues from its checkpoint (same config, same bits).
    ``fresh`` (``--rerun``), or a leftover run of another config, starts afresh; the earlier
    run directory is moved aside (``seed<k>.old-<n>``), never deleted.
    """
    from fedrnd.driver.rundir import RunDirError
    from fedrnd.driver.simulate import simulate

    assert cell.config is not None
    # Wall times are only comparable on a quiet machine: keep the load they were taken under.
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    t0 = time.perf_counter()
    kw = dict(run_dir=cell.run_dir(cache), data=data, verbose=False, progress=False)
    try:
        res = (simulate(cell.config, overwrite=True, **kw) if fresh else
               simulate(cell.config, resume=True, **kw))
    except RunDirError:
        res = simulate(cell.config, overwrite=True, **kw)
    wall = time.perf_counter() - t0
    m = res.methods[cell.method.label]
    history = [{"round": r["round"], "test_acc": r["test_acc/mean"]}
               for r in m.history if "test_acc/mean" in r]
    rec = {"scenario": cell.scenario.name, "method": cell.method.label,
           "algorithm": cell.method.name, "seed": cell.seed, "resolved": cell.resolved,
           "options": cell.config.algorithms[0].options, "config_hash": cell.config_hash,
           "wall_time": wall, "load_avg": load, "final": m.final, "history": history,
           "finished": datetime.datetime.now().isoformat(timespec="seconds")}
    _records(cache).put(cell.key, rec, name=cell.name)
    return rec


def pad_pool(data: Any, multiple: int = 256) -> Any:
    """``data`` with its example pool padded by zero rows to a multiple of ``multiple`` rows.

    No client indexes the new rows, so every result is unchanged; what changes is that seeds
    whose pools differ by a few rows (group transforms materialise a seed-dependent number of
    test rows) get identical shapes and reuse each other's compiled programs.
    """
    import jax.numpy as jnp

    from fedrnd.data.federated import FederatedData

    if not isinstance(data, FederatedData):
        return data
    p = int(data.x.shape[0])
    extra = (-p) % multiple
    if extra == 0:
        return data
    x = np.concatenate([np.asarray(data.x), np.zeros((extra, *data.x.shape[1:]), data.x.dtype)])
    y = np.concatenate([np.asarray(data.y), np.zeros((extra,), data.y.dtype)])
    return data.replace(x=jnp.asarray(x), y=jnp.asarray(y))


def run_grid(grid: Grid, *, log: Callable[[str], None] | None = print,
             rerun: bool = False, write: bool = True) -> dict[tuple[str, str, int], dict]:
    """Run every missing cell of ``grid`` (all cells with ``rerun``), then write the report.

    Data is built once per (scenario, seed) and shared by that seed's methods. Returns the
    cell records keyed by ``(scenario, method label, seed)``.
    """
    from fedrnd.driver.setup import build_data

    say = log or (lambda _m: None)
    cells = grid.cells()
    runnable = [c for c in cells if c.config is not None]
    records: dict[tuple[str, str, int], dict] = {}
    todo = []
    for c in runnable:
        rec = None if rerun else load_cell(c, grid.cache_dir)
        if rec is None:
            todo.append(c)
        else:
            records[(c.scenario.name, c.method.label, c.seed)] = rec
    say(f"grid {grid.name}: {len(cells)} cells, {len(records)} cached, {len(todo)} to run, "
        f"{len(cells) - len(runnable)} not applicable; cache {grid.cache_dir}")
    from fedrnd.engine import progress

    data_key, data = None, None
    # Printed lines must not tear a progress bar (progress.echo writes above it).
    tell = progress.echo if log is print else say
    # Cached cells count as done at once and stay out of the pace, so the ETA is that of
    # the cells still to run.
    with progress.task(f"compare {grid.name}", total=len(runnable), unit="cell",
                       initial=len(records)) as bar:
        for i, c in enumerate(todo, 1):
            bar.set_postfix(cell=f"{c.scenario.name}/{c.method.label}/seed {c.seed}")
            if data_key != (c.scenario.name, c.seed):
                data = pad_pool(build_data(c.config)[0])
                data_key = (c.scenario.name, c.seed)
            rec = run_cell(c, grid.cache_dir, data, fresh=rerun)
            records[(c.scenario.name, c.method.label, c.seed)] = rec
            bar.update()
            f = rec["final"]
            eta = bar.eta() if i < len(todo) else None
            tell(f"[{i}/{len(todo)}] {c.scenario.name} / {c.method.label} / seed {c.seed}: "
                 f"acc {f['test_acc/mean']:.4f}, +ft {f.get('test_acc_ft/mean', math.nan):.4f}, "
                 f"{rec['wall_time']:.1f} s; {bar.elapsed():.0f} s elapsed"
                 + (f", about {eta:.0f} s left" if eta is not None else ""))
    if write:
        # Imported here: the report imports the grid, which imports this module.
        from fedrnd.driver.sweep.report import write_report

        write_report(grid, records)
        say(f"report: {grid.results}")
    return records
