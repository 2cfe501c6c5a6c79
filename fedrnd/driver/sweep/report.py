"""The report of a sweep: the cached cell records as a markdown file with tables and figures.

Separate from running so that a report can be (re)written from the records alone
(``fedrnd compare --report-only``, the experiment scripts' own reports) without running or
even importing the run machinery; nothing in the report is typed by hand.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from fedrnd.driver import outputs, rundir
from fedrnd.driver.sweep.grid import Grid, Scenario, _make_cell


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
                  records: dict[tuple[str, str, int], dict], family: str = "") -> bool:
    """Mean (over seeds) client test accuracy vs round per method; ``x`` marks +FT at the end.

    ``family``: draw only the methods of that family (:func:`method_families`)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=110)
    ax = fig.subplots()
    drawn = False
    families = method_families(grid) if family else {}
    methods = [m for m in grid.methods if not family or families[m.label] == family]
    for i, m in enumerate(methods):
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
    ax.set_title(f"{scenario.name}{', ' + family if family else ''} (mean ± std over seeds; "
                 f"x = after fine-tuning)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    outputs.save_figure(fig, path)
    return True


def method_families(grid: Grid) -> dict[str, str]:
    """Method label -> family (centralized, clustered, decentralized), from the method classes'
    metadata (:func:`fedrnd.algorithms.method_family`)."""
    from fedrnd.algorithms import ALGORITHMS, method_family

    return {m.label: method_family(ALGORITHMS[m.name]) for m in grid.methods}


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
        ran = method_families(grid)
        families = list(dict.fromkeys(
            f for label, f in ran.items()
            if any((s.name, label, seed) in records for seed in grid.seeds)))
        for family in families if len(families) > 1 else ():
            fig = fig_dir / f"{grid.name}_{s.name}_{family}.png"
            if plot_scenario(fig, grid, s, records, family):
                rel = os.path.relpath(fig, out.parent)
                lines += [f"![accuracy vs round, {s.name}, {family} methods]({rel})", ""]
    rundir.write_text(out, "\n".join(lines).rstrip() + "\n")
    return out
