"""``fedrnd compare``: methods x scenarios x seeds under one protocol, and a generated report.

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

Fairness: within a seed every method gets the same data split, the same initial weights (the
model init key depends on the seed only), the same task model and local budget, and the same
fine-tune protocol; no method is tuned per scenario (the grid states the options each runs with).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import inspect
import json
import math
import os
import platform
import re
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedrnd.driver import outputs, rundir
from fedrnd.driver.config import Config, apply_overrides, from_dict, validate

_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
_K_EXPR = re.compile(r"^\s*K\s*(?:([+-])\s*(\d+))?\s*$")
# No method or partition names here: what the grid needs to know about them (input-only,
# clustering inside the rounds, the fine-tune baseline; grouped or label-only partitions) is
# metadata on the method classes (fedrnd.algorithms.base.Algorithm) and on the partition
# registry (fedrnd.data.partition.PartitionInfo), so plug-ins take part like built-ins.


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One data setting: a partition of the base data set and its number of true groups."""

    name: str
    partition: str
    partition_options: dict[str, Any]
    data: dict[str, Any]
    groups: int
    has_groups: bool
    negative_control: bool
    description: str = ""


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One method of the grid: a registered algorithm, its options (may use ``K``), a label."""

    name: str
    label: str
    options: dict[str, Any]
    input_only: bool
    ft_row: bool
    in_round: bool = False


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

    def path(self, cache: Path) -> Path:
        return cache / "cells" / self.scenario.name / self.slug / f"seed{self.seed}.json"

    def run_dir(self, cache: Path) -> Path:
        return cache / "runs" / self.scenario.name / self.slug / f"seed{self.seed}"

    @property
    def config_hash(self) -> str:
        assert self.config is not None
        d = self.config.to_dict()
        for k in ("progress", "out_dir", "name", "tensorboard", "plugins"):
            d.pop(k, None)
        # The method's defaults too: a changed default makes the cached cell stale.
        from fedrnd.algorithms import ALGORITHMS

        d["defaults"] = {f.name: repr(_field_default(f)) for f in
                         dataclasses.fields(ALGORITHMS[self.method.name]) if f.name != "engine"}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _field_default(f: dataclasses.Field) -> Any:
    """A field's default value; a ``default_factory``'s product, not the ``MISSING`` sentinel
    (whose repr holds a memory address and would change the hash in every process)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


@dataclasses.dataclass(frozen=True)
class Margins:
    """Report each method's accuracy gain over ``baseline`` (a method label), paired by seed;
    ``reference`` (points) is a published gap the mean gain is compared with."""

    baseline: str
    reference: float | None = None
    reference_note: str = ""


@dataclasses.dataclass
class Grid:
    """A parsed grid file."""

    name: str
    path: Path | None
    base: Config
    scenarios: list[Scenario]
    methods: list[MethodSpec]
    seeds: list[int]
    finetune_epochs: int
    results: Path
    cache_dir: Path
    title: str = ""
    description: str = ""
    tuning: str = ""
    margins: Margins | None = None

    def cells(self) -> list[Cell]:
        out = []
        for s in self.scenarios:
            for m in self.methods:
                for seed in self.seeds:
                    out.append(_make_cell(self, s, m, seed))
        return out


# ------------------------------------------------------------------------------------------
# Parsing
# ------------------------------------------------------------------------------------------

_TOP = {"name", "title", "description", "base", "config", "seeds", "finetune_epochs",
        "results", "cache_dir", "tuning", "scenarios", "methods", "margins"}
_SCENARIO = {"name", "partition", "partition_options", "source", "source_options",
             "num_clients", "groups", "negative_control", "description"}
_METHOD = {"name", "label", "options", "input_only", "ft_row", "in_round"}
_MARGINS = {"baseline", "reference", "reference_note"}


def _err(msg: str) -> ValueError:
    return ValueError(f"grid: {msg}")


def _check_keys(raw: dict[str, Any], allowed: set[str], where: str) -> None:
    bad = sorted(set(raw) - allowed)
    if bad:
        raise _err(f"unknown field(s) {bad} in {where}; allowed: {sorted(allowed)}")


def _default_groups(partition: str, options: dict[str, Any]) -> int:
    from fedrnd.data.partition import partition_info

    if not partition_info(partition).grouped:
        return 1
    if "num_groups" in options:
        return options["num_groups"]
    from fedrnd.data.partition import PARTITIONS

    p = inspect.signature(PARTITIONS[partition]).parameters.get("num_groups")
    if p is None or p.default is inspect.Parameter.empty:
        raise _err(f"partition {partition!r} needs partition_options.num_groups")
    return int(p.default)


def _parse_scenario(raw: Any, i: int, base: Config) -> Scenario:
    from fedrnd.data.partition import PARTITIONS, partition_info
    from fedrnd.driver.plugins import load_entry_points

    where = f"scenarios[{i}]"
    if not isinstance(raw, dict):
        raise _err(f"{where} must be a table, got {raw!r}")
    _check_keys(raw, _SCENARIO, where)
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise _err(f"{where}.name must be a non-empty name of letters, digits, _ . + -; "
                   f"got {name!r}")
    part = raw.get("partition")
    if isinstance(part, str) and part not in PARTITIONS:
        load_entry_points()  # an installed plug-in's, on demand
    if part not in PARTITIONS:
        raise _err(f"{where} ({name}): partition {part!r} is unknown; allowed: "
                   f"{sorted(PARTITIONS)}")
    opts = raw.get("partition_options", {})
    if not isinstance(opts, dict):
        raise _err(f"{where} ({name}): partition_options must be a table")
    data = {k: raw[k] for k in ("source", "source_options", "num_clients") if k in raw}
    groups = raw.get("groups", _default_groups(part, opts))
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise _err(f"{where} ({name}): groups must be an integer >= 1, got {groups!r}")
    info = partition_info(part)
    neg = raw.get("negative_control", info.labels_only)
    if not isinstance(neg, bool):
        raise _err(f"{where} ({name}): negative_control must be true or false")
    return Scenario(name, part, dict(opts), data, groups,
                    has_groups=info.grouped and groups > 1,
                    negative_control=neg, description=str(raw.get("description", "")))


def _parse_method(raw: Any, i: int) -> MethodSpec:
    from fedrnd.algorithms import ALGORITHMS
    from fedrnd.driver.plugins import load_entry_points

    where = f"methods[{i}]"
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise _err(f"{where} must be a name or a table, got {raw!r}")
    _check_keys(raw, _METHOD, where)
    name = raw.get("name")
    if isinstance(name, str) and name not in ALGORITHMS:
        load_entry_points()  # an installed plug-in's, on demand
    if name not in ALGORITHMS:
        raise _err(f"{where}: algorithm {name!r} is not registered; allowed: "
                   f"{sorted(ALGORITHMS)}")
    opts = raw.get("options", {})
    if not isinstance(opts, dict):
        raise _err(f"{where} ({name}): options must be a table")
    for k, v in opts.items():
        if isinstance(v, str) and v.strip().startswith("K") and not _K_EXPR.match(v):
            raise _err(f"{where} ({name}): option {k} = {v!r}: a K expression is K, K-n or K+n")
    exprs = [v.replace(" ", "") for v in opts.values() if isinstance(v, str) and _K_EXPR.match(v)]
    label = raw.get("label") or " ".join([name, *exprs])
    if not isinstance(label, str) or not label.strip():
        raise _err(f"{where} ({name}): label must be a non-empty string")
    cls = ALGORITHMS[name]
    input_only = raw.get("input_only", cls.input_only)
    ft_row = raw.get("ft_row", cls.finetune_baseline and not opts)
    in_round = raw.get("in_round", cls.clusters_in_round)
    for field, v in (("input_only", input_only), ("ft_row", ft_row), ("in_round", in_round)):
        if not isinstance(v, bool):
            raise _err(f"{where} ({name}): {field} must be true or false")
    return MethodSpec(name, label.strip(), dict(opts), input_only, ft_row, in_round)


def _parse_margins(raw: Any, labels: set[str]) -> Margins | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _err("[margins] must be a table")
    _check_keys(raw, _MARGINS, "[margins]")
    base = raw.get("baseline")
    if base not in labels:
        raise _err(f"margins.baseline must be one of the method labels {sorted(labels)}, "
                   f"got {base!r}")
    ref = raw.get("reference")
    if ref is not None and (isinstance(ref, bool) or not isinstance(ref, int | float)
                            or not math.isfinite(ref) or ref <= 0):
        raise _err(f"margins.reference must be a number of points > 0, got {ref!r}")
    return Margins(base, None if ref is None else float(ref),
                   str(raw.get("reference_note", "")))


def resolve_k(options: dict[str, Any], k: int) -> tuple[dict[str, Any], dict[str, int]]:
    """Replace ``"K"``, ``"K-n"``, ``"K+n"`` option values by numbers for a scenario's ``K``.

    Returns ``(options, resolved)`` where ``resolved`` maps each substituted option to its value.
    """
    out, resolved = dict(options), {}
    for name, v in options.items():
        m = _K_EXPR.match(v) if isinstance(v, str) else None
        if m:
            sign, n = m.group(1), int(m.group(2) or 0)
            out[name] = resolved[name] = k + n if sign == "+" else k - n
    return out, resolved


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: sections (``[data]``, ...) field by field, fields replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) and \
            k in ("data", "model", "local") else v
    return out


def load_grid(path: str | Path, overrides: list[str] | None = None,
              seeds: list[int] | None = None) -> Grid:
    """Read and check a grid file. ``overrides`` (``key=value``) apply to the base config."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"grid file {str(p)!r} does not exist")
    with open(p, "rb") as f:
        try:
            raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"grid file {str(p)!r} is not valid TOML: {e}") from None
    return parse_grid(raw, p.parent, overrides=overrides, seeds=seeds, path=p)


def parse_grid(raw: dict[str, Any], root: Path | str = ".", *, overrides: list[str] | None = None,
               seeds: list[int] | None = None, path: Path | None = None) -> Grid:
    """Build a :class:`Grid` from plain data; relative paths are taken from ``root``."""
    from fedrnd.driver.config import load_config, with_plugin_paths

    root = Path(root)
    _check_keys(raw, _TOP, "the grid file")
    name = raw.get("name", path.stem if path is not None else "compare")
    if not isinstance(name, str) or not _NAME.match(name):
        raise _err(f"name must be letters, digits, _ . + -; got {name!r}")
    base_raw: dict[str, Any] = {}
    if "base" in raw:
        if not isinstance(raw["base"], str):
            raise _err("base must be a path to a config file")
        base_raw = load_config(root / raw["base"]).to_dict()
    cfg_over = raw.get("config", {})
    if not isinstance(cfg_over, dict):
        raise _err("[config] must be a table of config fields")
    cfg_over = with_plugin_paths(cfg_over, root)  # the grid's plug-ins: from its directory
    if "algorithms" in cfg_over:
        raise _err("[config] must not set algorithms; list them as [[methods]]")
    base_plugins = base_raw.get("plugins") or []
    base_raw = _merge(base_raw or Config().to_dict(), cfg_over)
    if isinstance(cfg_over.get("plugins"), list):  # the grid's plug-ins add to the base's
        base_raw["plugins"] = list(dict.fromkeys([*base_plugins, *cfg_over["plugins"]]))
    if overrides:
        base_raw = apply_overrides(base_raw, overrides)
    try:
        base = validate(from_dict(base_raw))
    except ValueError as e:
        raise _err(f"base config: {e}") from None

    seeds = raw.get("seeds", [0]) if seeds is None else seeds
    if (not isinstance(seeds, list) or not seeds or
            not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise _err(f"seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise _err(f"seeds must be distinct, got {seeds}")
    ft = raw.get("finetune_epochs", 1)
    if not isinstance(ft, int) or isinstance(ft, bool) or ft < 1:
        raise _err(f"finetune_epochs must be an integer >= 1, got {ft!r}")

    scen_raw = raw.get("scenarios")
    if not isinstance(scen_raw, list) or not scen_raw:
        raise _err("needs at least one [[scenarios]] table")
    scenarios = [_parse_scenario(s, i, base) for i, s in enumerate(scen_raw)]
    meth_raw = raw.get("methods")
    if not isinstance(meth_raw, list) or not meth_raw:
        raise _err("needs at least one [[methods]] entry")
    methods = [_parse_method(m, i) for i, m in enumerate(meth_raw)]
    for what, names in (("scenario names", [s.name for s in scenarios]),
                        ("method labels", [m.label for m in methods])):
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise _err(f"{what} must be distinct; repeated: {dup}")
    labels = {m.label for m in methods}
    clash = sorted(f"{m.label}+ft" for m in methods if m.ft_row and f"{m.label}+ft" in labels)
    if clash:
        raise _err(f"labels {clash} clash with the derived fine-tune rows; rename them")

    margins = _parse_margins(raw.get("margins"), labels)
    results = root / raw.get("results", "RESULTS.md")
    cache = Path(raw["cache_dir"]) if "cache_dir" in raw else Path(base.out_dir) / "compare" / name
    if "cache_dir" in raw and not cache.is_absolute():
        cache = root / cache
    grid = Grid(name, path, base, scenarios, methods, list(seeds), ft, results, cache,
                title=str(raw.get("title", "")), description=str(raw.get("description", "")),
                tuning=str(raw.get("tuning", "")), margins=margins)
    grid.cells()  # builds and validates every cell's config before anything runs
    return grid


def _make_cell(grid: Grid, s: Scenario, m: MethodSpec, seed: int) -> Cell:
    options, resolved = resolve_k(m.options, s.groups)
    bad = {k: v for k, v in resolved.items() if v < 1}
    if bad:
        return Cell(s, m, seed, None, resolved,
                    skip=", ".join(f"{k} = {v} < 1" for k, v in bad.items()))
    d = grid.base.to_dict()
    d["data"] = {**d["data"], "partition": s.partition, "partition_options": s.partition_options,
                 **s.data}
    d.update(seed=seed, finetune=True, finetune_epochs=grid.finetune_epochs, progress=False,
             checkpoint_every=0, tensorboard=False,
             algorithms=[{"name": m.name, "options": options, "label": m.label}],
             name=f"{s.name}-{m.label}-seed{seed}")
    try:
        cfg = validate(from_dict(d))
    except ValueError as e:
        raise _err(f"scenario {s.name!r}, method {m.label!r}: {e}") from None
    return Cell(s, m, seed, cfg, resolved)


# ------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------


def load_cell(cell: Cell, cache: Path) -> dict[str, Any] | None:
    """The cached result of ``cell``, or ``None`` when missing, unreadable or stale."""
    p = cell.path(cache)
    if cell.config is None or not p.is_file():
        return None
    try:
        rec = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return rec if rec.get("config_hash") == cell.config_hash else None


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
    p = cell.path(cache)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1, default=float) + "\n")
    os.replace(tmp, p)
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
        write_report(grid, records)
        say(f"report: {grid.results}")
    return records


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------


def _stats(values: list[float]) -> tuple[float, float, int]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    if len(v) == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def _pm(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    mean, std, n = _stats(values)
    if n == 0:
        return "-"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def scenario_rows(grid: Grid, scenario: Scenario,
                  records: dict[tuple[str, str, int], dict]) -> list[dict[str, Any]]:
    """The rows of one scenario's table as plain data (formatted cells plus raw figures)."""
    rows = []
    for m in grid.methods:
        cells = [_make_cell(grid, scenario, m, s) for s in grid.seeds]
        if cells[0].config is None:
            continue
        recs = [records[k] for k in ((scenario.name, m.label, s) for s in grid.seeds)
                if k in records]
        fin = [r["final"] for r in recs]
        get = lambda key, fs=fin: [f.get(key) for f in fs]  # noqa: E731
        clustering = any("clusters" in f for f in fin)
        label = m.label
        if cells[0].resolved:
            label += " (" + ", ".join(f"{k}={v}" for k, v in cells[0].resolved.items()) + ")"
        marked = m.input_only and scenario.negative_control
        base = {
            "method": label + (" †" if marked else ""),
            "seeds": f"{len(recs)}/{len(grid.seeds)}",
            "acc": _pm(get("test_acc/mean"), 100),
            "acc_ft": _pm(get("test_acc_ft/mean"), 100),
            "ari": _pm(get("ari"), digits=2) if clustering and scenario.has_groups else "-",
            "nmi": _pm(get("nmi"), digits=2) if clustering and scenario.has_groups else "-",
            "clusters": _pm(get("clusters")) if clustering else "-",
            "mb": _pm(get("bytes_per_client"), 1e-6, 2),
            "cluster_time": (_pm(get("cluster_time"), digits=2)
                             + (" + in rounds" if m.in_round else "")) if clustering else "-",
            "wall": _pm([r["wall_time"] for r in recs]),
            "raw_acc": _stats(get("test_acc/mean"))[0],
            "raw_acc_ft": _stats(get("test_acc_ft/mean"))[0],
        }
        rows.append(base)
        if m.ft_row:
            rows.append({**base, "method": f"{m.label}+ft", "acc": base["acc_ft"],
                         "acc_ft": "-", "raw_acc": base["raw_acc_ft"],
                         "raw_acc_ft": math.nan})
    return rows


def margin_rows(grid: Grid, scenario: Scenario,
                records: dict[tuple[str, str, int], dict]) -> list[dict[str, Any]]:
    """Per method: its accuracy minus the baseline's, seed by seed (same split and init).

    Returns one dict per method other than the baseline with the paired gains in points
    (``gain``, ``gain_ft``: lists over the seeds where both ran), their mean, sample std, min
    and max, and ``ratio``: the mean gain over ``grid.margins.reference`` (``nan`` without one).
    """
    mg = grid.margins
    if mg is None:
        return []
    rows = []
    for m in grid.methods:
        if m.label == mg.baseline:
            continue
        row: dict[str, Any] = {"method": m.label}
        for key, name in (("test_acc/mean", "gain"), ("test_acc_ft/mean", "gain_ft")):
            g = []
            for seed in grid.seeds:
                a = records.get((scenario.name, m.label, seed))
                b = records.get((scenario.name, mg.baseline, seed))
                if a is None or b is None:
                    continue
                x, y = a["final"].get(key), b["final"].get(key)
                if x is not None and y is not None and np.isfinite(x) and np.isfinite(y):
                    g.append(100.0 * (float(x) - float(y)))
            mean, std, n = _stats(g)
            row.update({name: g, f"{name}_mean": mean, f"{name}_std": std,
                        f"{name}_min": min(g) if g else math.nan,
                        f"{name}_max": max(g) if g else math.nan,
                        f"{name}_wins": sum(v > 0 for v in g)})
        row["ratio"] = (row["gain_mean"] / mg.reference if mg.reference else math.nan)
        if row["gain"] or row["gain_ft"]:
            rows.append(row)
    return rows


def margin_table(grid: Grid, rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines for :func:`margin_rows` (empty when there is nothing to show)."""
    mg = grid.margins
    if mg is None or not rows:
        return []
    ref = mg.reference
    head = ["method", "gain, points (mean ± std)", "min", "max", "seeds > 0"]
    if ref:
        head.append(f"mean / {ref:g}")
    head += ["gain +FT (mean ± std)", "min +FT"]
    f = lambda v: "-" if not np.isfinite(v) else f"{v:+.1f}"  # noqa: E731
    lines = [f"Gain over `{mg.baseline}` in points of mean client test accuracy, paired by "
             "seed (same split and initial weights; positive: the method is better)"
             + (f"; the last ratio compares the mean gain with the reference gap of {ref:g} "
                f"points ({mg.reference_note or 'reference'})" if ref else "") + ".", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        n = len(r["gain"])
        cells = [r["method"],
                 "-" if n == 0 else f"{r['gain_mean']:+.1f} ± {r['gain_std']:.1f}",
                 f(r["gain_min"]), f(r["gain_max"]), f"{r['gain_wins']}/{n}"]
        if ref:
            cells.append("-" if not np.isfinite(r["ratio"]) else f"{r['ratio']:.2f}")
        cells += ["-" if not r["gain_ft"] else
                  f"{r['gain_ft_mean']:+.1f} ± {r['gain_ft_std']:.1f}", f(r["gain_ft_min"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


_TABLE = [("method", "method"), ("acc", "test acc %"), ("acc_ft", "test acc % +FT"),
          ("ari", "ARI"), ("nmi", "NMI"), ("clusters", "clusters"), ("mb", "MB/client"),
          ("cluster_time", "clustering s"), ("wall", "wall s"), ("seeds", "seeds")]


def scenario_table(rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(h for _, h in _TABLE) + " |"
    lines = [head, "|" + "---|" * len(_TABLE)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[k]) for k, _ in _TABLE) + " |")
    return "\n".join(lines)


def plot_scenario(path: Path, grid: Grid, scenario: Scenario,
                  records: dict[tuple[str, str, int], dict]) -> bool:
    """Mean (over seeds) client test accuracy vs round per method; ``x`` marks +FT at the end."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=110)
    ax = fig.subplots()
    drawn = False
    for i, m in enumerate(grid.methods):
        recs = [records[k] for k in ((scenario.name, m.label, s) for s in grid.seeds)
                if k in records]
        if not recs:
            continue
        rounds = sorted({h["round"] for r in recs for h in r["history"]})
        curves = np.full((len(recs), len(rounds)), np.nan)
        for j, r in enumerate(recs):
            for h in r["history"]:
                curves[j, rounds.index(h["round"])] = h["test_acc"]
        mean = np.nanmean(curves, 0)
        color = f"C{i % 10}"
        ax.plot(rounds, mean, color=color, lw=1.4, label=m.label,
                ls="-" if i < 10 else "--")
        if len(recs) > 1:
            std = np.nanstd(curves, 0, ddof=1)
            ax.fill_between(rounds, mean - std, mean + std, color=color, alpha=0.12, lw=0)
        ft = [r["final"].get("test_acc_ft/mean") for r in recs]
        ft = [x for x in ft if x is not None]
        if ft:
            ax.plot([rounds[-1]], [float(np.mean(ft))], marker="x", color=color, ms=7)
        drawn = True
    if not drawn:
        return False
    ax.set_xlabel("round")
    ax.set_ylabel("mean client test accuracy")
    ax.set_title(f"{scenario.name} (mean ± std over seeds; x = after fine-tuning)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    outputs.save_figure(fig, path)
    return True


def _machine() -> dict[str, str]:
    import jax

    from fedrnd.driver.outputs import _git_commit

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import jaxlib
        jaxlib_v = jaxlib.__version__
    except (ImportError, AttributeError):
        jaxlib_v = "?"
    import fedrnd

    return {"cpu": f"{cpu or 'unknown CPU'}, {os.cpu_count()} cores",
            "platform": platform.platform(), "python": platform.python_version(),
            "backend": f"{jax.default_backend()} ({len(jax.devices())} device(s))",
            "jax": f"jax {jax.__version__}, jaxlib {jaxlib_v}", "fedrnd": fedrnd.__version__,
            "commit": (_git_commit() or "unknown")[:12]}


def _describe_base(grid: Grid) -> list[str]:
    from fedrnd.algorithms import ALGORITHMS

    b = grid.base
    loc = b.local
    # The +ft rows: each such method's own runs, evaluated after fine-tuning.
    ft_rows = "".join(f" `{m.label}+ft` is {ALGORITHMS[m.name].__name__} + fine-tune: the "
                      f"`{m.label}` runs evaluated this way (same cells, not extra runs)."
                      for m in grid.methods if m.ft_row)
    budget = (f"{loc.steps} steps" if loc.steps is not None else
              f"{loc.epochs} epoch{'s' if loc.epochs != 1 else ''}")
    model = f"`{b.model.name}` {json.dumps(b.model.options)}"
    src = f"`{b.data.source}`" + (f" {json.dumps(b.data.source_options)}"
                                  if b.data.source_options else "")
    return [
        f"- Data: {src}, {b.data.num_clients} clients (per scenario below), the partition's "
        "held-out test rows per client drawn from the client's own distribution.",
        f"- Task model (all methods): {model}.",
        f"- Local budget (all methods): {budget} per round, batch {loc.batch_size}, "
        f"optimizer `{json.dumps(loc.optimizer)}`, lr {json.dumps(loc.lr)}, schedule "
        f"`{loc.schedule}`; {b.rounds} rounds"
        + (f", cohort {b.cohort_size}" if b.cohort_size else ", all clients every round") + ".",
        "- Same initial weights: within a seed every method starts from the same model "
        "(the init key depends on the seed only), on the same data split.",
        f"- Fine-tune protocol (column +FT): after the last round every client trains the model "
        f"it is evaluated with for {grid.finetune_epochs} local epoch"
        f"{'s' if grid.finetune_epochs != 1 else ''} (its own optimizer and lr, fresh "
        "optimizer state, same key for all methods), then is scored." + ft_rows,
        "- Tuning budget: " + (grid.tuning or "none for every method: one run per cell with "
                               "the shared local training above and the options listed under "
                               "Methods; nothing was tuned per scenario or per seed."),
        f"- Seeds: {grid.seeds}; figures are mean ± sample std over seeds of the mean "
        "per-client test accuracy.",
    ]


_COLUMN_NOTES = [
    "- **test acc %**: mean over clients of each client's accuracy on its own test rows, "
    "with the model the method assigns it (cluster model, global model or own model).",
    "- **ARI / NMI**: client clustering vs the true groups (only where the scenario has "
    "groups and the method clusters clients); **clusters**: distinct clusters at the end.",
    "- **MB/client**: bytes sent plus received per client over the whole run (communication "
    "ledger, from message shapes; includes discovery/one-shot uploads).",
    "- **clustering s**: wall seconds the driver spent in the method's host-side clustering "
    "(its `init` and host hooks: RND discovery, one-shot PACFL, CFL splits), compilation "
    "included. Clustering done inside the jitted rounds (IFCA's and FeSEM's per-round "
    "assignment, marked \"+ in rounds\") is part of the rounds' time and not in this number.",
    "- **wall s**: wall seconds of the whole cell (build, compile, rounds, evaluation, "
    "fine-tuning); cells share the persistent compilation cache, so later seeds compile less.",
]


def _load_note(records: dict[tuple[str, str, int], dict]) -> str:
    loads = [r["load_avg"] for r in records.values()
             if isinstance(r.get("load_avg"), float) and np.isfinite(r["load_avg"])]
    if not loads:
        return ""
    return (f" (1-minute load average when cells started: median {np.median(loads):.1f}, "
            f"max {max(loads):.1f}, on {os.cpu_count()} cores; times scale with it)")


def write_report(grid: Grid, records: dict[tuple[str, str, int], dict]) -> Path:
    """Write ``grid.results`` (markdown) and one accuracy-vs-round PNG per scenario."""
    out = grid.results
    out.parent.mkdir(parents=True, exist_ok=True)
    fig_dir = out.parent / "figures"
    mach = _machine()
    total = sum(r["wall_time"] for r in records.values())
    n_cells = sum(1 for c in grid.cells() if c.config is not None)
    src = f"`fedrnd compare {grid.path}`" if grid.path else "`fedrnd compare`"
    lines = [f"# {grid.title or 'Clustered FL comparison: ' + grid.name}", "",
             f"Generated by {src} on {datetime.date.today().isoformat()}; every number below "
             "comes from the cached cell results, do not edit by hand.", ""]
    if grid.description:
        lines += [grid.description.strip(), ""]
    lines += [f"Machine: {mach['cpu']}; {mach['platform']}; backend {mach['backend']}; "
              f"{mach['jax']}; Python {mach['python']}; fedrnd {mach['fedrnd']} at commit "
              f"{mach['commit']}.", "",
              f"Grid: {len(grid.scenarios)} scenarios x {len(grid.methods)} methods x "
              f"{len(grid.seeds)} seeds = {n_cells} runs ({len(records)} finished), "
              f"{total / 60:.1f} min of cell wall time in all{_load_note(records)}.", "",
              "## Shared settings", "", *_describe_base(grid), "",
              "## Methods", "", "| label | algorithm | options |", "|---|---|---|"]
    for m in grid.methods:
        opts = ", ".join(f"{k} = {json.dumps(v)}" for k, v in m.options.items()) or "defaults"
        lines.append(f"| {m.label} | `{m.name}` | {opts} |")
    lines += ["", "`K` in options is the scenario's number of true groups (1 where the "
              "partition has none); a method whose K resolves below 1 is not run there.", "",
              "## Columns", "", *_COLUMN_NOTES, ""]
    for s in grid.scenarios:
        opts = ", ".join(f"{k} = {json.dumps(v)}" for k, v in s.partition_options.items())
        lines += [f"## {s.name}", "",
                  f"Partition `{s.partition}`" + (f" ({opts})" if opts else "")
                  + (f", data {json.dumps(s.data)}" if s.data else "")
                  + (f"; {s.groups} true groups (K = {s.groups})." if s.has_groups else
                     "; no true groups (K = 1)."), ""]
        if s.description:
            lines += [s.description.strip(), ""]
        rows = scenario_rows(grid, s, records)
        lines += [scenario_table(rows), ""]
        lines += margin_table(grid, margin_rows(grid, s, records))
        skipped = [m.label for m in grid.methods
                   if _make_cell(grid, s, m, grid.seeds[0]).config is None]
        if skipped:
            lines += [f"Not applicable here: {', '.join(skipped)} (K expression below 1).", ""]
        if s.negative_control and any(m.input_only for m in grid.methods):
            lines += ["† Negative control: this split changes labels only, and this method "
                      "clusters on client inputs alone, so it cannot see the groups (expected "
                      "ARI near 0, one cluster).", ""]
        fig = fig_dir / f"{grid.name}_{s.name}.png"
        if plot_scenario(fig, grid, s, records):
            rel = os.path.relpath(fig, out.parent)
            lines += [f"![accuracy vs round, {s.name}]({rel})", ""]
    rundir.write_text(out, "\n".join(lines).rstrip() + "\n")
    return out
