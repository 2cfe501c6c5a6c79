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
import time
from pathlib import Path

import numpy as np

from fedrnd.driver.compare import Grid, load_cell, load_grid, pad_pool, run_cell, write_report

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


# ------------------------------------------------------------------------------------------
# The budget sweep (experiments/disue/sweep.toml): universal expert against averaging, per seed
# ------------------------------------------------------------------------------------------

COMMAND_OF = {"disue_sweep": "nice -n 10 python experiments/disue/report.py --grid "
                             "experiments/disue/sweep.toml --run"}
"""Grids this script runs itself, and the command that does it (named in the report)."""

RAW_KEYS = ("universal_acc", "average_acc", "ensemble_acc", "student_agree", "gen_teacher_acc",
            "gen_coverage", "gen_diversity", "gen_pred_entropy", "distill_loss")
"""Round metrics of DisUE kept in the raw tables (last round in the cell table)."""


def _stats(values: list[float]) -> tuple[float, float, float, float] | None:
    """``(mean, sample sd, min, max)`` of the finite values, or ``None``."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    if not len(v):
        return None
    return (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, float(v.min()),
            float(v.max()))


def _pm(values: list[float], scale: float = 100.0, digits: int = 1, sign: bool = False,
        span: bool = False) -> str:
    """``mean ± sd`` (and ``[min, max]`` with ``span``) of ``values`` scaled, or ``-``."""
    st = _stats(values)
    if st is None:
        return "-"
    m, sd, lo, hi = (scale * x for x in st)
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    n = sum(1 for x in values if x is not None and np.isfinite(x))
    if n == 1:
        return f.format(m)  # one seed: no spread to give
    out = f"{f.format(m)} ± {sd:.{digits}f}"
    return out + (f" [{f.format(lo)}, {f.format(hi)}]" if span else "")


def sweep_cells(grid: Grid) -> list[dict]:
    """One plain row per finished cell: method, seed, options, final and last-round metrics."""
    from fedrnd.algorithms import DisUE

    defaults = {f.name: f.default for f in DisUE.__dataclass_fields__.values()}
    rows = []
    for c in grid.cells():
        rec = load_cell(c, grid.cache_dir) if c.config is not None else None
        if rec is None:
            continue
        hist = cell_history(grid, c)
        last = hist[-1] if hist else {}
        f = rec["final"]
        row = {"scenario": c.scenario.name, "method": c.method.label,
               "algorithm": c.method.name, "seed": c.seed,
               "test_acc": f.get("test_acc/mean"), "test_acc_ft": f.get("test_acc_ft/mean"),
               "global_acc": None, "mb_per_client": f.get("bytes_per_client", 0) / 1e6,
               "wall_s": rec.get("wall_time"), "load_avg": rec.get("load_avg"),
               "rounds": last.get("round")}
        if c.method.name == "disue":
            opt = {**defaults, **c.method.options}
            row.update(grouping=opt["grouping"], distill=opt["distill"],
                       student_init=opt["student_init"],
                       distill_steps=opt["distill_steps"] if opt["distill"] in (
                           "generator", "proxy") else 0,
                       student_steps=opt["student_steps"] if opt["distill"] in (
                           "generator", "proxy") else 0)
            row["global_acc"] = f.get("universal_acc")
            row.update({k: last.get(k) for k in RAW_KEYS})
        elif c.method.name == "fedavg":
            row["global_acc"] = f.get("test_acc/weighted")
        rows.append(row)
    return rows


def write_raw(grid: Grid, rows: list[dict]) -> list[Path]:
    """``<name>_cells.csv`` (one row per cell) and ``<name>_rounds.csv`` (DisUE per round)."""
    import csv

    base = grid.results.parent
    cols = ["scenario", "method", "algorithm", "seed", "grouping", "distill", "student_init",
            "distill_steps", "student_steps", "test_acc", "test_acc_ft", "global_acc",
            *RAW_KEYS, "mb_per_client", "rounds", "wall_s", "load_avg"]
    cells_path = base / f"{grid.name}_cells.csv"
    with open(cells_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for r in rows:
            w.writerow([r.get(k, "") if r.get(k) is not None else "" for k in cols])
    rounds_path = base / f"{grid.name}_rounds.csv"
    with open(rounds_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["scenario", "method", "seed", "round", *RAW_KEYS])
        for c in grid.cells():
            if c.method.name != "disue" or c.config is None:
                continue
            for h in cell_history(grid, c):
                if "universal_acc" in h:
                    w.writerow([c.scenario.name, c.method.label, c.seed, h["round"],
                                *(h.get(k, "") for k in RAW_KEYS)])
    return [cells_path, rounds_path]


def verdicts(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """Per (scenario, distilling DisUE method): paired gaps to averaging and the verdict.

    ``vs_fedavg``: universal expert minus FedAvg's global model of the same seed (same split,
    same initial weights); ``vs_average``: universal expert minus the average of the same run's
    last cluster experts (what averaging would have broadcast at that point). The universal
    expert *beats averaging* only if both gaps are positive in every seed; a mean gap inside
    one sd of zero is no finding.
    """
    fed = {(r["scenario"], r["seed"]): r["global_acc"] for r in rows
           if r["algorithm"] == "fedavg"}
    out: dict[tuple[str, str], dict] = {}
    for r in rows:
        if r["algorithm"] != "disue" or r.get("distill") not in ("generator", "proxy"):
            continue
        v = out.setdefault((r["scenario"], r["method"]), {"vs_fedavg": [], "vs_average": [],
                                                          "seeds": []})
        v["seeds"].append(r["seed"])
        if (r["scenario"], r["seed"]) in fed and r["global_acc"] is not None:
            v["vs_fedavg"].append(r["global_acc"] - fed[(r["scenario"], r["seed"])])
        if r.get("average_acc") is not None and r["global_acc"] is not None:
            v["vs_average"].append(r["global_acc"] - r["average_acc"])
    for v in out.values():
        both = v["vs_fedavg"] + v["vs_average"]
        v["beats"] = bool(both) and min(both) > 0 and len(v["vs_fedavg"]) == len(v["seeds"])
    return out


def sweep_section(grid: Grid, rows: list[dict], raw: list[Path]) -> list[str]:
    """Tables per scenario (universal expert, gaps with spread, diagnostics), verdict, figure."""
    from matplotlib.figure import Figure

    if not any(r.get("distill") in ("generator", "proxy") for r in rows):
        return []
    ver = verdicts(rows)
    here = grid.results.parent
    lines = ["## Does the universal expert beat averaging? (budget sweep)", "",
             f"Raw cells: [{raw[0].name}]({raw[0].name}) (one row per cell: final and "
             f"last-round metrics), [{raw[1].name}]({raw[1].name}) (DisUE's metrics per "
             "round); both are written by the command at the top.", "",
             "Every figure is mean ± sample sd over seeds; gaps are paired within a seed and "
             "given with [min, max] over seeds. **universal**: the final universal expert on "
             "the global test set (FedAvg: its global model); **vs FedAvg**: universal minus "
             "FedAvg's global model of the same seed; **vs own average**: universal minus the "
             "sample-weighted average of the same run's final cluster experts (what averaging "
             "would broadcast at that point); **ensemble**: the mass-weighted logit ensemble of "
             "the experts, what a perfect distillation would reach; **agree**: share of test "
             "rows where universal and ensemble agree; **gen acc**: the teachers' accuracy on "
             "the requested class of generated inputs (proxy: 100% by construction); "
             "**personalised**: mean client accuracy with the model each client keeps, "
             "+FT after one epoch of local fine-tuning. A method *beats averaging* only if "
             "both gaps are positive in every seed.", ""]
    fig = Figure(figsize=(11, 4.8), dpi=110)
    axes = fig.subplots(1, len(grid.scenarios), squeeze=False)[0]
    for ax, s in zip(axes, grid.scenarios, strict=True):
        sr = [r for r in rows if r["scenario"] == s.name]
        lines += [f"### {s.name}", "",
                  "| method | distill iters x student steps / round | universal % | vs FedAvg, "
                  "points | vs own average, points | ensemble % | agree % | gen acc % | "
                  "personalised % | +FT % | MB/client | seeds |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for m in grid.methods:
            mr = [r for r in sr if r["method"] == m.label]
            if not mr:
                continue
            col = lambda k, rr=mr: [r.get(k) for r in rr]  # noqa: E731
            budget = "-"
            if mr[0].get("distill") in ("generator", "proxy"):
                budget = f"{mr[0]['distill_steps']} x {mr[0]['student_steps']}"
            elif mr[0].get("distill"):
                budget = f"none ({mr[0]['distill']})"
            v = ver.get((s.name, m.label), {})
            vs_f = _pm(v.get("vs_fedavg", []), sign=True, span=True) if v else "-"
            vs_a = _pm(v.get("vs_average", []), sign=True, span=True) if v else "-"
            lines.append(
                f"| {m.label} | {budget} | {_pm(col('global_acc'))} | {vs_f} | {vs_a} | "
                f"{_pm(col('ensemble_acc'))} | {_pm(col('student_agree'))} | "
                f"{_pm(col('gen_teacher_acc'))} | {_pm(col('test_acc'))} | "
                f"{_pm(col('test_acc_ft'))} | {_pm(col('mb_per_client'), 1.0, 2)} | "
                f"{len(mr)}/{len(grid.seeds)} |")
            if m.name == "fedavg":
                lines.append(f"| fedavg+ft | - | - | - | - | - | - | - | "
                             f"{_pm(col('test_acc_ft'))} | - | "
                             f"{_pm(col('mb_per_client'), 1.0, 2)} | "
                             f"{len(mr)}/{len(grid.seeds)} |")
        lines.append("")
        # The figure: universal accuracy against the student steps per round.
        fed = _stats([r["global_acc"] for r in sr if r["algorithm"] == "fedavg"])
        if fed is not None:
            ax.axhline(100 * fed[0], color="k", lw=1.2, label="FedAvg (global model)")
            ax.axhspan(100 * (fed[0] - fed[1]), 100 * (fed[0] + fed[1]), color="k", alpha=0.1)
        marks = {("generator", 2): ("C0", "o"), ("generator", 5): ("C1", "s"),
                 ("proxy", 2): ("C2", "^"), ("proxy", 5): ("C2", "^")}
        drawn = set()
        for m in grid.methods:
            mr = [r for r in sr if r["method"] == m.label and r.get("distill") in (
                "generator", "proxy")]
            st = _stats([r["global_acc"] for r in mr])
            if st is None:
                continue
            x = mr[0]["distill_steps"] * mr[0]["student_steps"]
            if mr[0]["distill"] == "proxy":
                x *= 1.08  # beside the generator point of the same budget, not on it
            prev = mr[0]["student_init"] == "previous"
            color, mk = marks.get((mr[0]["distill"], mr[0]["student_steps"]), ("C3", "D"))
            if prev:
                color, mk = "C3", "D"
            lab = ("proxy (real unlabeled rows)" if mr[0]["distill"] == "proxy" else
                   "generator, student from previous universal" if prev else
                   f"generator, {mr[0]['student_steps']} student steps / iter")
            ax.errorbar([x], [100 * st[0]], yerr=[100 * st[1]], color=color, marker=mk,
                        capsize=3, ls="none", label=None if lab in drawn else lab)
            drawn.add(lab)
            ens = _stats([r.get("ensemble_acc") for r in mr])
            if ens is not None:
                ax.plot([x], [100 * ens[0]], color=color, marker="_", ms=14, ls="none",
                        label=None if "ens" in drawn else "teacher ensemble (same run)")
                drawn.add("ens")
        ax.set_xscale("log")
        ax.set_xlabel("student steps per round (distill iterations x student steps)")
        ax.set_ylabel("universal expert, global test acc %")
        ax.set_title(s.name, fontsize=10)
        ax.grid(alpha=0.3)
    # One legend below the panels, where it hides no point.
    handles = {lab: h for a in axes for h, lab in zip(*a.get_legend_handles_labels(),
                                                      strict=True)}
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=3, fontsize=7)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    path = here / "figures" / f"{grid.name}_budget.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    lines += [f"![universal expert against distillation budget]"
              f"({os.path.relpath(path, here)})", ""]
    lines += ["### Verdict", "", *verdict_lines(grid, rows, ver), ""]
    return lines


def verdict_lines(grid: Grid, rows: list[dict], ver: dict) -> list[str]:
    """The plain answer: does the universal expert beat averaging anywhere in the sweep?"""
    kind = {(r["scenario"], r["method"]): r["distill"] for r in rows
            if r["algorithm"] == "disue"}
    seeds = {k: len(v["seeds"]) for k, v in ver.items()}
    beats = sorted(k for k, v in ver.items() if v["beats"])
    scen = " and ".join(s.name for s in grid.scenarios)
    if beats:
        out = ["The universal expert beats averaging (both gaps positive in every seed) in: "
               + ", ".join(f"`{m}` at {s} ({seeds[(s, m)]} seeds)" for s, m in beats) + "."]
    else:
        out = [f"**No.** At {scen}, in no cell of the sweep (generator budgets and the proxy "
               "upper bound alike) does DisUE's universal expert beat averaging: in every "
               "cell its gap to FedAvg's global model, or to the average of its own "
               "cluster experts, is not positive in at least one seed."]
    for s in grid.scenarios:
        for what, label in (("generator", "best generator budget"),
                            ("proxy", "proxy upper bound")):
            best = None
            for (sc, m), v in ver.items():
                st = _stats(v["vs_fedavg"])
                if sc == s.name and kind.get((sc, m)) == what and st is not None and (
                        best is None or st[0] > best[1][0]):
                    best = (m, st, _stats(v["vs_average"]), seeds[(sc, m)])
            if best is None:
                continue
            m, st, sa, n = best
            own = ("" if sa is None else f"; against its own experts' average "
                   f"{100 * sa[0]:+.1f} ± {100 * sa[1]:.1f} [{100 * sa[2]:+.1f}, "
                   f"{100 * sa[3]:+.1f}]")
            out.append(f"- {s.name}, {label} (`{m}`, {n} seeds): universal minus FedAvg "
                       f"{100 * st[0]:+.1f} ± {100 * st[1]:.1f} points [{100 * st[2]:+.1f}, "
                       f"{100 * st[3]:+.1f}]{own}.")
    return out


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
    if COMMAND_OF.get(grid.name):
        # The grid is run by this script (``--run``), not by ``fedrnd compare``: say so.
        text = out.read_text().splitlines()
        text[2] = (f"Generated by `{COMMAND_OF[grid.name]}` on {time.strftime('%Y-%m-%d')}; "
                   "every number below comes from the cached cell results, do not edit by "
                   "hand.")
        out.write_text("\n".join(text) + "\n")
    rows = sweep_cells(grid)
    extra = []
    if any(r.get("distill") in ("generator", "proxy") for r in rows):
        extra += sweep_section(grid, rows, write_raw(grid, rows))
    extra += global_section(grid)
    extra += ["## Other data sets", "",
              "The paper's data sets go through tfds, which needs prepared data:", "",
              *skipped_sources(), ""]
    out.write_text(out.read_text().rstrip() + "\n\n" + "\n".join(extra).rstrip() + "\n")
    return out, len(records), sum(1 for c in grid.cells() if c.config is not None)


def run_missing(grid: Grid, log=print) -> int:
    """Run the grid's missing cells seed by seed (every scenario and method of seed 0 first).

    ``fedrnd compare`` runs method by method; seed-major order means a run stopped early
    leaves whole seeds, which the report can use. Returns the number of cells run.
    """
    import time

    from fedrnd.driver.setup import build_data

    cells = [c for c in grid.cells() if c.config is not None]
    order = sorted(cells, key=lambda c: (grid.seeds.index(c.seed),
                                         [s.name for s in grid.scenarios].index(c.scenario.name)))
    todo = [c for c in order if load_cell(c, grid.cache_dir) is None]
    data_key, data, t0 = None, None, time.perf_counter()
    for i, c in enumerate(todo, 1):
        if data_key != (c.scenario.name, c.seed):
            data = pad_pool(build_data(c.config)[0])
            data_key = (c.scenario.name, c.seed)
        rec = run_cell(c, grid.cache_dir, data)
        if log:
            log(f"[{i}/{len(todo)}] {c.scenario.name} / {c.method.label} / seed {c.seed}: "
                f"{rec['wall_time']:.0f} s ({time.perf_counter() - t0:.0f} s in all)",
                flush=True)
    return len(todo)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default=str(HERE / "grid.toml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a base config field, as for fedrnd compare")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--results", default=None)
    ap.add_argument("--run", action="store_true",
                    help="run the missing cells first (seed by seed), then write the report")
    args = ap.parse_args(argv)
    grid = load_grid(args.grid, args.set)
    if args.cache_dir:
        grid.cache_dir = Path(args.cache_dir)
    if args.results:
        grid.results = Path(args.results)
    if args.run:
        run_missing(grid)
    out, done, n = write(grid)
    print(f"{out}: {done}/{n} cells" + ("" if done == n else f" ({n - done} missing)"))


if __name__ == "__main__":
    main()
