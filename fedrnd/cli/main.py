"""``fedrnd`` command line entry point.

``--plugin FILE_OR_MODULE`` (alias ``--import``; ``run``, ``compare``, ``list``) loads a
plug-in before anything else (see :mod:`fedrnd.driver.plugins`); a plug-in that fails is
reported like bad input.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import textwrap
import typing
from pathlib import Path

import numpy as np

from fedrnd import compilation_cache


def _load_cli_plugins(args: argparse.Namespace) -> list[str]:
    """Load the ``--plugin`` files and modules (paths from the working directory) before
    anything reads a config or a table; return them resolved (absolute paths)."""
    from fedrnd.driver.plugins import load_plugin, resolve

    for spec in args.plugin:
        load_plugin(spec, where="--plugin")
    return [resolve(spec) for spec in args.plugin]


def _cmd_run(args: argparse.Namespace) -> int:
    from fedrnd.configs import default_config_path
    from fedrnd.driver import load_config, simulate
    from fedrnd.driver.config import to_toml, toml_value

    extra = _load_cli_plugins(args)
    # --out goes through the config checks like any other out_dir (an existing file, ...).
    out = [f"out_dir={toml_value(args.out)}"] if args.out is not None else []
    cfg = load_config(args.config or default_config_path(), [*args.set, *out])
    # Recorded with the config (config.json), so the run can be repeated from it alone.
    cfg.plugins = list(dict.fromkeys([*cfg.plugins, *extra]))
    if args.print_config:  # the resolved config only: nothing runs, nothing is written
        print(to_toml(cfg), end="")
        return 0
    compilation_cache.enable()
    result = simulate(cfg, resume=args.resume, run_dir=args.run_dir,
                      progress=False if args.no_progress else None, overwrite=args.overwrite,
                      allow_change=args.allow_change)
    from fedrnd.driver.distributed import is_primary

    if is_primary():  # multi-host: one report, from process 0
        print(run_report(result))
    return 0


_MAX_LISTED = 8
"""Clusters listed one per line in :func:`run_report`; the rest are summarised."""


def _cluster_lines(res, group: np.ndarray | None) -> list[str]:
    """What a clustering method found: count, sizes, make-up by true group, ARI/NMI."""
    from fedrnd.algorithms.base import cluster_assignment

    f = res.final
    kind = "federations" if "federations" in f else "clusters"
    head = f"{res.label}: {f.get('clusters', float('nan')):.0f} {kind} found"
    eps = f.get("eps")
    notes = ([f"eps = {eps:.3g}"] if eps is not None and np.isfinite(eps) else []) + (
        [f"{f['cluster_time']:.1f} s, compilation included"] if "cluster_time" in f else [])
    if notes:
        head += f" ({'; '.join(notes)})"
    assign = cluster_assignment(res.state)
    lines = [head]
    if assign is not None:
        assign = np.asarray(assign)
        ids, sizes = np.unique(assign, return_counts=True)
        lines[0] += f", sizes {' '.join(str(int(n)) for n in sizes)}"
        if group is not None and group.shape == assign.shape:
            for k, (i, n) in enumerate(zip(ids, sizes, strict=True)):
                if k == _MAX_LISTED:
                    lines.append(f"  ... and {len(ids) - k} more")
                    break
                g, cnt = np.unique(group[assign == i], return_counts=True)
                mix = ", ".join(f"group {int(a)} x{int(b)}" for a, b in zip(g, cnt, strict=True))
                lines.append(f"  {kind[:-1]} {int(i)}: {int(n)} clients ({mix})")
    if "ari" in f:
        n_groups = len(np.unique(group)) if group is not None else None
        against = f"the {n_groups} true groups" if n_groups else "the true groups"
        lines.append(f"  against {against}: ARI {f['ari']:.3f}, NMI {f.get('nmi', float('nan')):.3f}")
    return lines


def run_report(result) -> str:
    """A plain-text account of a finished run, printed after the summary table.

    For every method that groups clients: how many clusters (federations) it found, their
    sizes and make-up by true group, ARI/NMI against the true groups; then each method's mean
    client test accuracy and where the plots and heat maps were written.
    """
    group = None if result.data is None else np.asarray(result.data.group)
    lines: list[str] = []
    for res in result.methods.values():
        if "clusters" in res.final or "ari" in res.final:
            lines += _cluster_lines(res, group)
    accs = ", ".join(f"{tag} {res.final['test_acc/mean']:.3f}"
                     for tag, res in result.methods.items() if "test_acc/mean" in res.final)
    if accs:
        lines.append(f"mean client test accuracy: {accs}")
    run_dir = Path(result.run_dir)
    lines.append(f"accuracy vs round: {run_dir / 'accuracy.png'}")
    per_family = sorted(run_dir.glob("accuracy_*.png"))
    if per_family:
        lines.append(f"per method family: {', '.join(str(p) for p in per_family)}")
    for tag in result.methods:
        figs = sorted(p for p in (run_dir / tag).glob("*.png"))
        if figs:
            lines.append(f"{tag} heat maps: {', '.join(str(p) for p in figs)}")
    return "\n".join(lines)


def _cmd_compare(args: argparse.Namespace) -> int:
    from fedrnd.driver.compare import load_grid, run_grid, write_report

    _load_cli_plugins(args)
    seeds = None
    if args.seeds:
        try:
            seeds = [int(s) for s in args.seeds.split(",")]
        except ValueError:
            raise ValueError(f"--seeds expects comma-separated integers, got {args.seeds!r}"
                             ) from None
    grid = load_grid(args.grid, args.set, seeds=seeds)
    if args.results:
        grid.results = Path(args.results)
    if args.cache_dir:
        grid.cache_dir = Path(args.cache_dir)
    # A grid compiles the same small programs once per cell; cache them all, not only those
    # that took over a second (JAX's default threshold).
    compilation_cache.enable(min_compile_secs=0.0)
    if args.report_only:
        from fedrnd.driver.compare import load_cell

        records = {}
        cells = grid.cells()
        for c in cells:
            rec = load_cell(c, grid.cache_dir)
            if rec is not None:
                records[(c.scenario.name, c.method.label, c.seed)] = rec
        if not records:
            # An empty table would replace a committed report (experiments/RESULTS.md).
            raise ValueError(
                f"--report-only: none of the grid's {len(cells)} cells is cached in "
                f"{grid.cache_dir}, so there is nothing to report; the report "
                f"{grid.results} was left untouched. Run the grid first (fedrnd compare "
                f"{args.grid}), or point --cache-dir at the cache that holds its cells")
        print(f"report from {len(records)} cached cells: {write_report(grid, records)}")
        return 0
    run_grid(grid, rerun=args.rerun)
    return 0


_LIST_WIDTH = 100
"""Column at which ``fedrnd list`` wraps its descriptions."""


def _describe(obj) -> str:
    """The first paragraph of ``obj``'s docstring as one line of plain text.

    Sphinx markup (``code``, :func:`name`) is reduced to its text.
    """
    doc = inspect.getdoc(obj) or ""
    para = " ".join(doc.split("\n\n")[0].split())
    return re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", para).replace("``", "")


def _wrap(text: str, first: str, indent: int) -> str:
    return textwrap.fill(text, _LIST_WIDTH, initial_indent=first,
                         subsequent_indent=" " * indent)


def _entry(name: str, text: str, options: list[str]) -> str:
    """A name, its description wrapped under column 23, then its options (``k = v`` kept whole)."""
    keep = ", ".join(o.replace(" ", "\xa0") for o in options) or "none"
    return (_wrap(text, f"  {name:20s} ", 23) + "\n"
            + _wrap(f"options: {keep}", " " * 23, 32).replace("\xa0", " "))


def _cmd_list(args: argparse.Namespace) -> int:
    from fedrnd.algorithms import ALGORITHMS, option_doc
    from fedrnd.data.partition import PARTITIONS
    from fedrnd.data.sources import SOURCES, TFDS_NAMES
    from fedrnd.driver.config import (
        DIVERGENCE_ACTIONS,
        OPTIMIZER_OPTIONS,
        SCHEDULE_OPTIONS,
        algorithm_parameters,
        model_parameters,
        option_items,
        partition_parameters,
        source_parameters,
    )
    from fedrnd.driver.plugins import load_entry_points, origin
    from fedrnd.engine.optim import (
        SERVER_OPTIMIZERS,
        optax_optimizers,
        optax_schedules,
        optimizer_names,
    )
    from fedrnd.models import MODELS

    _load_cli_plugins(args)
    load_entry_points()

    def describe(obj) -> str:
        src = origin(obj)
        return _describe(obj) + (f" [plug-in: {src}]" if src else "")

    print("data sets (data.source; options go in data.source_options):")
    for name, fn in SOURCES.items():
        print(_entry(name, describe(fn), option_items(source_parameters(name))))
    print(_entry("tfds:<name>", f"A prepared TensorFlow Datasets image set, name in "
                 f"{', '.join(TFDS_NAMES)} (needs tensorflow-datasets; never downloads).",
                 option_items(source_parameters("tfds:mnist"))))
    print("partitions (data.partition; options go in data.partition_options):")
    for name, fn in PARTITIONS.items():
        print(_entry(name, describe(fn), option_items(partition_parameters(name))))
    print("models (model.name; options go in model.options):")
    for name, fn in MODELS.items():
        print(_entry(name, describe(fn), option_items(model_parameters(name))))
    print("algorithms (algorithms[].name; options go in algorithms[].options, each with its "
          "meaning):")
    for name, cls in ALGORITHMS.items():
        print(_wrap(describe(cls), f"  {name:20s} ", 23))
        params = algorithm_parameters(name)
        for item, opt in zip(option_items(params), params, strict=True):
            doc = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", option_doc(cls, opt)).replace("``", "")
            print(_wrap(f"{item}: {doc}" if doc else item, " " * 4, 8))
    schedules = "; ".join(f"{k} ({', '.join(v)})" if v else k
                          for k, v in SCHEDULE_OPTIONS.items())
    for line in (f"local optimizers (local.optimizer): {', '.join(optimizer_names())}; "
                 f"settings (local.optimizer_options): {', '.join(OPTIMIZER_OPTIONS)}",
                 f"optax optimizers (local.optimizer = \"optax:<name>\"; keywords in "
                 f"local.optax_options): {', '.join(optax_optimizers())}",
                 f"lr schedules (local.schedule; options in local.schedule_options): "
                 f"{schedules}; or optax:<name> for {', '.join(optax_schedules())}",
                 f"server optimizers (algorithm option server_opt): "
                 f"{', '.join(SERVER_OPTIMIZERS)}",
                 f"divergence rules (divergence.action): {', '.join(DIVERGENCE_ACTIONS)}"):
        print(_wrap(line, "", 2))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with errors as one ``fedrnd: error: ...`` line (no usage block), exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"fedrnd: error: {_paragraph(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from fedrnd import __version__

    p = _Parser(prog="fedrnd", description=__doc__)
    p.add_argument("--version", action="version", version=f"fedrnd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="run a simulation from a TOML config")
    r.add_argument("config", nargs="?", default=None,
                   help="TOML config file (default: the built-in default experiment)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set local.lr=0.05 (repeatable)")
    r.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its last checkpoint (refused when the "
                        "config changes the computation)")
    r.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run of the same name: it is moved aside to "
                        "<name>.old-<n>, never deleted")
    r.add_argument("--allow-change", action="append", default=[], metavar="FIELD",
                   help="with --resume: accept a new value of FIELD (only fields that cannot "
                        "change the computation, e.g. eval_every, rounds; repeatable)")
    r.add_argument("--out", default=None, help="output root (config out_dir)")
    r.add_argument("--run-dir", default=None, help="exact run directory (default out_dir/name)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--print-config", action="store_true",
                   help="print the resolved config (file + --set) as TOML and exit without "
                        "running or writing anything")
    _plugin_flag(r)
    r.set_defaults(func=_cmd_run)
    c = sub.add_parser("compare", help="run a grid of methods x scenarios x seeds (cached per "
                       "cell, resumable) and write a results report")
    c.add_argument("grid", help="grid TOML file (see experiments/compare.toml)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the grid's base config, e.g. --set rounds=5")
    c.add_argument("--seeds", default=None, help="comma-separated seeds replacing the grid's")
    c.add_argument("--results", default=None, help="report path (default: the grid's results)")
    c.add_argument("--cache-dir", default=None,
                   help="cell cache directory (default: the grid's cache_dir)")
    c.add_argument("--rerun", action="store_true", help="ignore cached cells and run all")
    c.add_argument("--report-only", action="store_true",
                   help="write the report from cached cells without running anything")
    _plugin_flag(c)
    c.set_defaults(func=_cmd_compare)
    ls = sub.add_parser("list", help="list data sets, partitions, models and algorithms")
    _plugin_flag(ls)
    ls.set_defaults(func=_cmd_list)
    return p


def _plugin_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugin", "--import", dest="plugin", action="append", default=[],
                   metavar="FILE_OR_MODULE",
                   help="load a plug-in first: a .py file or a module name that registers "
                        "methods, models, partitions or data sources (repeatable; --import "
                        "is the same flag)")


def _paragraph(text: object) -> str:
    """A message as one paragraph: line breaks and runs of blanks become single spaces."""
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (already printed)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    from fedrnd.driver.rundir import Diverged, RunInterrupted

    try:
        return args.func(args)
    except RunInterrupted as e:
        if args.command == "compare":
            print(f"fedrnd: interrupted in the cell {e.run_dir} at round {e.round}; finished "
                  "cells are cached and this one continues from its checkpoint: run the same "
                  "command again", file=sys.stderr)
        else:
            print(f"fedrnd: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        # fedrnd run: before the run directory was touched (loading, checking, building the
        # data); fedrnd compare: finished cells are cached.
        print("fedrnd: interrupted" + (
            "; finished cells are cached: run the same command again to continue"
            if args.command == "compare" else " before the run directory was written"),
              file=sys.stderr)
        return 130
    except Diverged as e:
        # Not bad input: the run itself failed (status.json says failed, with this reason).
        print(f"fedrnd: run failed: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError, ImportError, FloatingPointError) as e:
        # Bad input (config, flags, paths, data files): one paragraph, no traceback.
        # OSError covers FileNotFoundError, PermissionError, NotADirectoryError, ...
        print(f"fedrnd: error: {_paragraph(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
