"""``fedrnd`` command line entry point."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _enable_compilation_cache() -> None:
    # Persistent XLA cache: a second run of the same config skips most compilation.
    import jax

    cache = os.environ.get("FEDRND_CACHE_DIR",
                           str(Path.home() / ".cache" / "fedrnd" / "jax"))
    if cache and cache != "0":
        jax.config.update("jax_compilation_cache_dir", cache)


def _cmd_run(args: argparse.Namespace) -> int:
    from fedrnd.driver import load_config, simulate

    cfg = load_config(args.config, args.set)
    if args.out:
        cfg.out_dir = args.out
    _enable_compilation_cache()
    simulate(cfg, resume=args.resume, run_dir=args.run_dir,
             progress=False if args.no_progress else None)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from fedrnd.driver.compare import load_grid, run_grid, write_report

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
    _enable_compilation_cache()
    if args.report_only:
        from fedrnd.driver.compare import load_cell

        records = {}
        for c in grid.cells():
            rec = load_cell(c, grid.cache_dir)
            if rec is not None:
                records[(c.scenario.name, c.method.label, c.seed)] = rec
        print(f"report from {len(records)} cached cells: {write_report(grid, records)}")
        return 0
    run_grid(grid, rerun=args.rerun)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    import dataclasses

    from fedrnd.algorithms import ALGORITHMS, algorithm_options
    from fedrnd.data.partition import PARTITIONS
    from fedrnd.data.sources import SOURCES
    from fedrnd.engine.optim import OPTIMIZERS, SERVER_OPTIMIZERS
    from fedrnd.models import MODELS

    def doc(obj) -> str:
        text = (getattr(obj, "__doc__", None) or "").strip().splitlines()
        return text[0] if text else ""

    print("data sets (data.source):")
    for name, fn in SOURCES.items():
        print(f"  {name:20s} {doc(fn)}")
    print("  tfds:<name>          mnist, fashion_mnist, cifar10, cifar100, emnist, svhn "
          "(tensorflow-datasets, data must be prepared)")
    print("partitions (data.partition):")
    for name, fn in PARTITIONS.items():
        print(f"  {name:20s} {doc(fn)}")
    print("models (model.name):")
    for name in MODELS:
        print(f"  {name}")
    print("algorithms (algorithms[].name, options):")
    for name, cls in ALGORITHMS.items():
        fields = {f.name: f.default for f in dataclasses.fields(cls) if f.name != "engine"}
        opts = ", ".join(f"{k}={v!r}" for k, v in fields.items() if k in algorithm_options(name))
        print(f"  {name:10s} {doc(cls)}\n             options: {opts}")
    print(f"local optimizers (local.optimizer): {', '.join(OPTIMIZERS)}")
    print(f"server optimizers (server_opt): {', '.join(SERVER_OPTIMIZERS)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedrnd", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a simulation from a TOML config")
    r.add_argument("config", nargs="?", default=None,
                   help="TOML config file (default: the built-in default experiment)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set local.lr=0.05 (repeatable)")
    r.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its last checkpoint")
    r.add_argument("--out", default=None, help="output root (config out_dir)")
    r.add_argument("--run-dir", default=None, help="exact run directory (default out_dir/name)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    c.set_defaults(func=_cmd_compare)
    ls = sub.add_parser("list", help="list data sets, partitions, models and algorithms")
    ls.set_defaults(func=_cmd_list)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError, FloatingPointError) as e:
        print(f"fedrnd: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
