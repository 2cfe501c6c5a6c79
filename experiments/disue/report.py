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
                             "experiments/disue/sweep.toml --run",
              "disue_ablation": "nice -n 10 python experiments/disue/report.py --grid "
                                "experiments/disue/ablation.toml --run --method-major"}
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
            row.update({k: opt[k] for k in ABLATION_KEYS})
            row.update({k: last.get(k) for k in RAW_KEYS})
        elif c.method.name == "fedavg":
            row["global_acc"] = f.get("test_acc/weighted")
        rows.append(row)
    return rows


def write_raw(grid: Grid, rows: list[dict], extra: tuple[str, ...] = ()) -> list[Path]:
    """``<name>_cells.csv`` (one row per cell) and ``<name>_rounds.csv`` (DisUE per round);
    ``extra``: more cell columns (the ablated options), after ``student_steps``."""
    import csv

    base = grid.results.parent
    cols = ["scenario", "method", "algorithm", "seed", "grouping", "distill", "student_init",
            "distill_steps", "student_steps", *extra, "test_acc", "test_acc_ft", "global_acc",
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

# ------------------------------------------------------------------------------------------
# The ablations (experiments/disue/ablation.toml): each variant against the base, per seed
# ------------------------------------------------------------------------------------------

ABLATION_BASE = {"disue_ablation": "disue sim g50 s2"}
"""Ablation grids and the label of their base variant (every other DisUE method changes one
option of it)."""

ABLATION_RERUN = {"disue_ablation": "disue_sweep_cells.csv"}
"""Raw cells (beside the report) of an earlier run of the same base cells: the base is
compared with them seed by seed, a measure of the run-to-run noise of one cell."""

ABLATION_KEYS = ("teacher_weights", "temperature", "adv_weight", "div_weight")
"""DisUE options the ablations change (kept in the raw cells of every DisUE run)."""


def ablation_diffs(rows: list[dict], base: str) -> dict[tuple[str, str], dict]:
    """Per (scenario, DisUE variant other than ``base``): paired differences to the base.

    ``universal`` and ``personalised``: the variant's final universal expert (global test set)
    and mean personalised client accuracy minus the base's, of the same seed (same split, same
    initial weights). ``outside``: the difference lies outside the spread over seeds: it has
    the same sign in every seed and its mean exceeds the larger of the two runs' sample sds
    over seeds; otherwise it is inside the spread, no finding. ``sign``: +1 / -1 / 0 (inside).
    """
    by = {(r["scenario"], r["method"], r["seed"]): r for r in rows}
    out: dict[tuple[str, str], dict] = {}
    for r in rows:
        if r["algorithm"] != "disue" or r["method"] == base:
            continue
        b = by.get((r["scenario"], base, r["seed"]))
        v = out.setdefault((r["scenario"], r["method"]), {"universal": [], "personalised": [],
                                                          "seeds": []})
        v["seeds"].append(r["seed"])
        if b is None:
            continue
        for key, col in (("universal", "global_acc"), ("personalised", "test_acc")):
            if r.get(col) is not None and b.get(col) is not None:
                v[key].append(r[col] - b[col])
    for (sc, m), v in out.items():
        for key, col in (("universal", "global_acc"), ("personalised", "test_acc")):
            d = v[key]
            sds = [_stats([r.get(col) for r in rows if r["scenario"] == sc and r["method"] == x])
                   for x in (m, base)]
            spread = max((st[1] for st in sds if st is not None), default=0.0)
            same = len(d) > 1 and (min(d) > 0 or max(d) < 0)
            outside = same and abs(float(np.mean(d))) > spread
            v[f"{key}_spread"] = spread
            v[f"{key}_outside"] = outside
            v[f"{key}_sign"] = (1 if np.mean(d) > 0 else -1) if outside else 0
    return out


def rerun_diffs(grid: Grid, rows: list[dict], label: str | None = None
                ) -> dict[str, list[float]]:
    """Per scenario: this run's global model of ``label`` (default: the base; DisUE's
    universal expert, FedAvg's global model) minus the same cell (same label, config and seed)
    in ``ABLATION_RERUN``'s raw cells, seed by seed; ``{}`` if none."""
    import csv

    path = grid.results.parent / ABLATION_RERUN.get(grid.name, "")
    if not ABLATION_RERUN.get(grid.name) or not path.is_file():
        return {}
    base = label or ABLATION_BASE[grid.name]
    with open(path) as fh:
        old = {(r["scenario"], int(r["seed"])): float(r["global_acc"])
               for r in csv.DictReader(fh) if r["method"] == base and r["global_acc"]}
    out: dict[str, list[float]] = {}
    for r in rows:
        k = (r["scenario"], r["seed"])
        if r["method"] == base and k in old and r["global_acc"] is not None:
            out.setdefault(r["scenario"], []).append(r["global_acc"] - old[k])
    return out


def _changed(grid: Grid, label: str, base: str) -> str:
    """The options of ``label`` that differ from the base method's, as ``k = v``."""
    opts = {m.label: m.options for m in grid.methods}
    if label == base:
        return "base"
    b, o = opts.get(base, {}), opts.get(label, {})
    diff = [f"{k} = {json.dumps(o[k])}" for k in o if b.get(k) != o[k]]
    diff += [f"{k} unset" for k in b if k not in o]
    return ", ".join(diff) or "-"


def ablation_section(grid: Grid, rows: list[dict], raw: list[Path]) -> list[str]:
    """Per scenario: every variant against the base (paired over seeds), verdict, figure."""
    from matplotlib.figure import Figure

    base = ABLATION_BASE[grid.name]
    diffs = ablation_diffs(rows, base)
    here = grid.results.parent
    lines = ["## Ablations: each reconstructed part against the base", "",
             f"Raw cells: [{raw[0].name}]({raw[0].name}) (one row per cell: the ablated "
             f"options, final and last-round metrics), [{raw[1].name}]({raw[1].name}) "
             "(DisUE's metrics per round); both are written by the command at the top.", "",
             f"Base: `{base}`; every other DisUE row changes the one option named. Every "
             "figure is mean ± sample sd over seeds; differences are paired within a seed "
             "(same split, same initial weights) and given with [min, max] over seeds. "
             "**universal**: the final universal expert on the global test set (FedAvg: its "
             "global model); **vs base**: the variant minus the base of the same seed; "
             "**ensemble**: the mass-weighted logit ensemble of the experts; **agree**: share "
             "of test rows where universal and ensemble agree; **gen acc**: the teachers' "
             "accuracy on the requested class of generated inputs; **personalised**: mean "
             "client accuracy with the model each client keeps, +FT after one epoch of local "
             "fine-tuning. **Spread rule**: a difference is *outside the spread over seeds* "
             "(a finding) only if it has the same sign in every seed and its mean exceeds "
             "the larger sample sd over seeds of the two runs compared; otherwise it is "
             "*inside the spread* and no finding.", ""]
    fig = Figure(figsize=(11, 4.6), dpi=110)
    axes = fig.subplots(1, len(grid.scenarios), squeeze=False)[0]
    labels = [m.label for m in grid.methods if m.name == "disue"]
    for ax, s in zip(axes, grid.scenarios, strict=True):
        sr = [r for r in rows if r["scenario"] == s.name]
        lines += [f"### {s.name}", "",
                  "| method | changed | universal % | vs base, points | universal vs base | "
                  "vs FedAvg, points | ensemble % | agree % | gen acc % | personalised % | "
                  "personalised vs base, points | +FT % | seeds |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        fed = {r["seed"]: r["global_acc"] for r in sr if r["algorithm"] == "fedavg"}
        for m in grid.methods:
            mr = [r for r in sr if r["method"] == m.label]
            if not mr:
                continue
            col = lambda k, rr=mr: [r.get(k) for r in rr]  # noqa: E731
            n = f"{len(mr)}/{len(grid.seeds)}"
            if m.name != "disue":
                lines.append(f"| {m.label} | - | {_pm(col('global_acc'))} | - | - | - | - | - "
                             f"| - | {_pm(col('test_acc'))} | - | {_pm(col('test_acc_ft'))} "
                             f"| {n} |")
                continue
            vs_f = _pm([r["global_acc"] - fed[r["seed"]] for r in mr
                        if r["seed"] in fed and r["global_acc"] is not None], sign=True,
                       span=True)
            d = diffs.get((s.name, m.label))
            if d is None:
                vs_b = verdict = vs_p = "-"
            else:
                vs_b = _pm(d["universal"], sign=True, span=True)
                vs_p = _pm(d["personalised"], sign=True, span=True)
                verdict = ("**outside: " + ("higher" if d["universal_sign"] > 0 else "lower")
                           + "**" if d["universal_outside"] else "inside: no finding")
            lines.append(
                f"| {m.label} | {_changed(grid, m.label, base)} | {_pm(col('global_acc'))} | "
                f"{vs_b} | {verdict} | {vs_f} | {_pm(col('ensemble_acc'))} | "
                f"{_pm(col('student_agree'))} | {_pm(col('gen_teacher_acc'))} | "
                f"{_pm(col('test_acc'))} | {vs_p} | {_pm(col('test_acc_ft'))} | {n} |")
        lines.append("")
        # The figure: universal expert per variant (mean ± sd, seeds as dots), FedAvg band.
        fst = _stats(list(fed.values()))
        if fst is not None:
            ax.axhline(100 * fst[0], color="k", lw=1.2, label="FedAvg (global model)")
            ax.axhspan(100 * (fst[0] - fst[1]), 100 * (fst[0] + fst[1]), color="k", alpha=0.1)
        for i, lab in enumerate(labels):
            mr = [r for r in sr if r["method"] == lab]
            st = _stats([r["global_acc"] for r in mr])
            if st is None:
                continue
            ax.errorbar([i], [100 * st[0]], yerr=[100 * st[1]], color="C0", marker="o",
                        capsize=3, ls="none", label="universal expert" if i == 0 else None)
            ax.plot([i] * len(mr), [100 * r["global_acc"] for r in mr], color="C0",
                    marker=".", alpha=0.4, ls="none")
            ens = _stats([r.get("ensemble_acc") for r in mr])
            if ens is not None:
                ax.plot([i], [100 * ens[0]], color="C1", marker="_", ms=14, ls="none",
                        label="teacher ensemble (same run)" if i == 0 else None)
        ax.set_xticks(range(len(labels)), labels, rotation=25, ha="right", fontsize=8)
        ax.set_ylabel("global test acc %")
        ax.set_title(s.name, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    handles = {lab: h for a in axes for h, lab in zip(*a.get_legend_handles_labels(),
                                                      strict=True)}
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=3, fontsize=7)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path = here / "figures" / f"{grid.name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    lines += [f"![universal expert per ablation]({os.path.relpath(path, here)})", ""]
    rerun = rerun_diffs(grid, rows)
    if rerun:
        lines += ["### Run-to-run noise of one cell", "",
                  f"The base `{base}` is the same cell (config, seed, split, initial weights) "
                  f"as in [{ABLATION_RERUN[grid.name]}]({ABLATION_RERUN[grid.name]}), run "
                  "again here. Its universal expert, this run minus that one, seed by seed:", ""]
        for s in grid.scenarios:
            d = rerun.get(s.name, [])
            if d:
                lines.append(f"- {s.name}: " + ", ".join(f"{100 * x:+.1f}" for x in d)
                             + f" points (largest |difference| {100 * max(map(abs, d)):.1f}).")
        fed = [x for d in rerun_diffs(grid, rows, "fedavg").values() for x in d]
        if fed:
            same = sum(1 for x in fed if x == 0)
            lines += ["", f"FedAvg's global model, the same comparison: {same} of {len(fed)} "
                      "cells identical" + ("" if same == len(fed) else ", largest |difference| "
                                           f"{100 * max(map(abs, fed)):.1f} points") + "."]
        lines += ["", "A difference to the base no larger than the base's own rerun "
                  "differences is not a finding, even when it is outside the spread over "
                  "seeds.", ""]
    lines += ["### Verdict", "", *ablation_verdict_lines(grid, diffs, rerun), ""]
    return lines


def ablation_verdict_lines(grid: Grid, diffs: dict,
                           rerun: dict[str, list[float]] | None = None) -> list[str]:
    """One line per variant: its universal-expert difference to the base in each scenario
    (and, with ``rerun``, whether it exceeds the base's largest run-to-run difference)."""
    out = []
    for m in grid.methods:
        if m.name != "disue" or m.label == ABLATION_BASE[grid.name]:
            continue
        parts = []
        for s in grid.scenarios:
            d = diffs.get((s.name, m.label))
            st = _stats(d["universal"]) if d else None
            if st is None:
                continue
            where = (f"**outside the spread** ({'higher' if d['universal_sign'] > 0 else 'lower'}"
                     ")" if d["universal_outside"] else "inside the spread (no finding)")
            noise = (rerun or {}).get(s.name)
            if d["universal_outside"] and noise:
                big = max(map(abs, noise))
                where += (f", {'above' if abs(st[0]) > big else 'within'} the rerun noise "
                          f"({100 * big:.1f})")
            parts.append(f"{s.name} {_pm(d['universal'], sign=True, span=True)} points, "
                         f"{where}, seed sd {100 * d['universal_spread']:.1f}")
        if parts:
            out.append(f"- `{m.label}` ({_changed(grid, m.label, ABLATION_BASE[grid.name])}), "
                       "universal minus base: " + "; ".join(parts) + ".")
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
    if grid.name in ABLATION_BASE:
        extra += ablation_section(grid, rows, write_raw(grid, rows, ABLATION_KEYS))
    elif any(r.get("distill") in ("generator", "proxy") for r in rows):
        extra += sweep_section(grid, rows, write_raw(grid, rows))
    extra += global_section(grid)
    extra += ["## Other data sets", "",
              "The paper's data sets go through tfds, which needs prepared data:", "",
              *skipped_sources(), ""]
    out.write_text(out.read_text().rstrip() + "\n\n" + "\n".join(extra).rstrip() + "\n")
    return out, len(records), sum(1 for c in grid.cells() if c.config is not None)


def run_missing(grid: Grid, log=print, order_by: str = "seed") -> int:
    """Run the grid's missing cells seed by seed (every scenario and method of seed 0 first).

    ``fedrnd compare`` runs method by method; seed-major order means a run stopped early
    leaves whole seeds, which the report can use. ``order_by="method"``: method by method in the
    grid's order (every scenario and seed of the first method first), so that a run stopped
    early leaves whole methods with all their seeds. Returns the number of cells run.
    """
    import time

    from fedrnd.driver.setup import build_data

    cells = [c for c in grid.cells() if c.config is not None]
    order = sorted(cells, key=lambda c: (grid.seeds.index(c.seed),
                                         [s.name for s in grid.scenarios].index(c.scenario.name)))
    if order_by == "method":
        labels = [m.label for m in grid.methods]
        order = sorted(order, key=lambda c: labels.index(c.method.label))
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
    ap.add_argument("--method-major", action="store_true",
                    help="with --run: run method by method (all seeds of a method together)")
    args = ap.parse_args(argv)
    grid = load_grid(args.grid, args.set)
    if args.cache_dir:
        grid.cache_dir = Path(args.cache_dir)
    if args.results:
        grid.results = Path(args.results)
    if args.run:
        run_missing(grid, order_by="method" if args.method_major else "seed")
    out, done, n = write(grid)
    print(f"{out}: {done}/{n} cells" + ("" if done == n else f" ({n - done} missing)"))


if __name__ == "__main__":
    main()
