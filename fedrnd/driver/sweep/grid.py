"""The grid of a sweep: scenarios x methods x seeds, parsed from a TOML file into cells.

Parsing and checking live apart from running (:mod:`.cells`) and reporting (:mod:`.report`) so
that a script can enumerate, filter or re-read a grid without importing the run machinery;
every cell's config is built and validated here, before anything runs, so a bad grid fails
at once rather than hours in. The file format is described in :mod:`fedrnd.driver.sweep`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import tomllib
from pathlib import Path
from typing import Any

from fedrnd.driver.config import Config, apply_overrides, from_dict, validate
from fedrnd.driver.sweep.cells import Cell

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


