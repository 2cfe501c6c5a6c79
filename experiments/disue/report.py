"""Write experiments/disue/RESULTS.md from the cached cells of experiments/disue/grid.toml.

Run after ``fedrnd compare experiments/disue/grid.toml`` (which runs and caches the cells):

    python experiments/disue/report.py [--grid experiments/disue/grid.toml]

The report is ``fedrnd compare``'s (personalised accuracy per method and scenario, plots of it
against rounds) followed by a section on the *global* models: the accuracy on the global test
set (every client's test rows pooled) of the universal expert (DisUE), of the plain average of
the cluster experts, and of FedAvg's global model, with a plot against rounds read from each
cell's per-round metrics (``runs/compare/disue/runs/.../metrics.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from fedrnd.driver.compare import Grid, load_cell, load_grid, write_report

HERE = Path(__file__).resolve().parent


def cell_history(grid: Grid, cell) -> list[dict]:
    """The per-round metrics of a finished cell (one dict per round), or ``[]``."""
    path = cell.run_dir(grid.cache_dir) / cell.method.label / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def global_curve(rows: list[dict], algorithm: str) -> tuple[list[int], list[float]]:
    """Rounds and the global-test accuracy of the method's single model, where it has one."""
    if algorithm == "disue":
        pts = [(r["round"], r["universal_acc"]) for r in rows if "universal_acc" in r]
    elif algorithm == "fedavg":
        # FedAvg's pooled test accuracy is its sample-weighted client accuracy.
        pts = [(r["round"], r["test_acc/weighted"]) for r in rows if "test_acc/weighted" in r]
    else:
        pts = []
    return [p[0] for p in pts], [p[1] for p in pts]


def _fmt(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    v = [x for x in values if x is not None and np.isfinite(x)]
    if not v:
        return "-"
    m = scale * float(np.mean(v))
    if len(v) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {scale * float(np.std(v, ddof=1)):.{digits}f}"


def global_section(grid: Grid) -> list[str]:
    from matplotlib.figure import Figure

    lines = ["## Global models on the global test set", "",
             "The global test set is every client's held-out test rows pooled (multiplicities "
             "kept), so its label mix is the data set's. **universal**: DisUE's universal "
             "expert after the last round (for `fedavg`, its global model: the same number as "
             "its sample-weighted client accuracy); **average of experts**: the sample-weighted "
             "average of the last round's cluster experts (what plain averaging would "
             "broadcast); **personalised**: mean client accuracy with the model each client "
             "keeps (its cluster expert), as in the table above. IFCA and RND keep cluster "
             "models only and have no single model to score.", ""]
    from fedrnd.algorithms import DisUE

    defaults = {f.name: f.default for f in DisUE.__dataclass_fields__.values()}
    for m in grid.methods:
        if m.name != "disue":
            continue
        opt = {**defaults, **m.options}
        if opt["distill"] in ("generator", "proxy"):
            it, st = opt["distill_steps"], opt["student_steps"]
            gen = "1 generator step + " if opt["distill"] == "generator" else ""
            lines.append(f"- Distillation budget of `{m.label}`: {it} iterations per round x "
                         f"({gen}{st} student steps, batch {opt['distill_batch']}) x "
                         f"{grid.base.rounds} rounds = {it * st * grid.base.rounds:,} student "
                         f"steps; temperature {opt['temperature']}, student Adam lr "
                         f"{opt['student_lr']}, student init `{opt['student_init']}`.")
        else:
            lines.append(f"- `{m.label}`: no distillation (`distill = \"{opt['distill']}\"`).")
    lines.append("")
    fig_dir = grid.results.parent / "figures"
    for s in grid.scenarios:
        rows = ["| method | universal % | universal - FedAvg, points | average of experts % | "
                "personalised % | MB/client | seeds |", "|---|---|---|---|---|---|---|"]
        base = [load_cell(c, grid.cache_dir) for c in grid.cells()
                if c.scenario.name == s.name and c.method.name == "fedavg"
                and not c.method.options and c.config is not None]
        base_acc = {r["seed"]: r["final"]["test_acc/weighted"] for r in base if r is not None}
        fig = Figure(figsize=(7, 4.2), dpi=110)
        ax = fig.subplots()
        drawn = False
        for i, m in enumerate(grid.methods):
            cells = [c for c in grid.cells() if c.scenario.name == s.name
                     and c.method.label == m.label and c.config is not None]
            recs = [(c, load_cell(c, grid.cache_dir)) for c in cells]
            recs = [(c, r) for c, r in recs if r is not None]
            if not recs:
                continue
            fin = [r["final"] for _, r in recs]
            if m.name == "disue":
                uni = [f.get("universal_acc") for f in fin]
            elif m.name == "fedavg":
                uni = [f.get("test_acc/weighted") for f in fin]
            else:
                uni = []
            hist = [cell_history(grid, c) for c, _ in recs]
            avg = [h[-1].get("average_acc") for h in hist if h and "average_acc" in h[-1]]
            gap = [u - base_acc[r["seed"]] for u, (_, r) in zip(uni, recs, strict=False)
                   if u is not None and r["seed"] in base_acc]
            gap_s = "-" if m.name == "fedavg" else _fmt(gap)
            if gap_s != "-" and not gap_s.startswith("-"):
                gap_s = "+" + gap_s
            rows.append(f"| {m.label} | {_fmt(uni)} | {gap_s} | {_fmt(avg)} | "
                        f"{_fmt([f.get('test_acc/mean') for f in fin])} | "
                        f"{_fmt([f.get('bytes_per_client') for f in fin], 1e-6, 2)} | "
                        f"{len(recs)}/{len(grid.seeds)} |")
            curves = [global_curve(h, m.name) for h in hist]
            curves = [c for c in curves if c[0]]
            if curves:
                rounds = curves[0][0]
                acc = np.nanmean([c[1] for c in curves if c[0] == rounds], axis=0)
                ax.plot(rounds, acc, color=f"C{i % 10}", lw=1.4, label=m.label,
                        marker="o" if len(rounds) < 8 else None, ms=3)
                drawn = True
        lines += [f"### {s.name}", "", *rows, ""]
        if drawn:
            ax.set_xlabel("round")
            ax.set_ylabel("global test accuracy")
            ax.set_title(f"{s.name}: universal expert (DisUE) and FedAvg's global model")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
            fig.tight_layout()
            fig_dir.mkdir(parents=True, exist_ok=True)
            path = fig_dir / f"{grid.name}_{s.name}_global.png"
            fig.savefig(path)
            lines += [f"![global test accuracy vs round, {s.name}]"
                      f"({os.path.relpath(path, grid.results.parent)})", ""]
    return lines


def skipped_sources() -> list[str]:
    """Why the CIFAR-10 / SVHN / CIFAR-100 versions of the experiment did not run here."""
    from fedrnd.data import load_source

    out = []
    for name in ("tfds:cifar10", "tfds:svhn_cropped", "tfds:cifar100"):
        try:
            load_source(name)
        except (FileNotFoundError, ImportError, ValueError) as e:
            out.append(f"- `{name}`: skipped; the loader says: {str(e).splitlines()[0]}")
        else:
            out.append(f"- `{name}`: available on this machine but not run (CPU budget).")
    return out


def write(grid: Grid) -> tuple[Path, int, int]:
    """Write ``grid.results`` from the cached cells; returns ``(path, finished, cells)``."""
    records = {}
    for c in grid.cells():
        rec = load_cell(c, grid.cache_dir)
        if rec is not None:
            records[(c.scenario.name, c.method.label, c.seed)] = rec
    out = write_report(grid, records)
    extra = global_section(grid)
    extra += ["## Other data sets", "",
              "The paper's data sets go through tfds, which needs prepared data:", "",
              *skipped_sources(), ""]
    out.write_text(out.read_text().rstrip() + "\n\n" + "\n".join(extra).rstrip() + "\n")
    return out, len(records), sum(1 for c in grid.cells() if c.config is not None)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default=str(HERE / "grid.toml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a base config field, as for fedrnd compare")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--results", default=None)
    args = ap.parse_args(argv)
    grid = load_grid(args.grid, args.set)
    if args.cache_dir:
        grid.cache_dir = Path(args.cache_dir)
    if args.results:
        grid.results = Path(args.results)
    out, done, n = write(grid)
    print(f"{out}: {done}/{n} cells" + ("" if done == n else f" ({n - done} missing)"))


if __name__ == "__main__":
    main()
