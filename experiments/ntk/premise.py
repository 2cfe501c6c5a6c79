"""SPARK's premise, tested (issue 18): does Nesterov momentum across rounds destabilise NTK
updates, does the annealed soft-label regulariser fix it (in which direction of annealing), and
what projection size keeps NTK-DFL's rounds at what fraction of its bytes.

    nice -n 10 python experiments/ntk/premise.py            # every cell, then the report
    python experiments/ntk/premise.py --report-only         # PREMISE.md + figures from cells
    python experiments/ntk/premise.py --tiny --out /tmp/p   # smoke size (the test runs this)

Two experiments, every cell run for 3 seeds (the seed draws the partition, the initial model
and the graphs) and cached as JSON under ``premise_cells/`` (``<experiment>/<label>_s<seed>
.json``, :class:`fedrnd.driver.sweep.CellCache`: a cell whose setting changed is re-run):

- ``premise``: SPARK without projection, momentum ``mu`` in {0, 0.5, 0.7, 0.9} x soft-label
  regulariser {off, ``decay``, ``ramp``} (weight 0.3, factor 0.5 every 4 rounds, T = 2, soft
  labels from the client's own start point) x Dirichlet alpha {0.1, 0.5}. ``mu = 0`` with the
  regulariser off is NTK-DFL. At ``mu = 0.9`` also the ``ramp`` regulariser with soft labels
  from the neighbours' own models (``soft_source = "neighbours"``).
- ``frontier``: NTK-DFL's update with projected Jacobians (no momentum, no regulariser),
  ``proj_dim`` k in {16, 64, 256, 1024} x ``projected_update`` {exact, exact_one, sketch},
  against unprojected NTK-DFL, at alpha 0.1: accuracy against cumulative bytes.

Data and metric as ``experiments/ntk/run.py`` (Fashion-MNIST, equal-size clients with Dir(alpha)
label mixes, MLP 784-100-10, 5-regular graph redrawn every round); every cell runs its full
round budget (no early stop) so that late drops show. Per round: the averaged model's accuracy
on the 10,000 test images, the mean accuracy of the client models on a fixed 2,000-image test
subset, the pooled training loss and the cumulative bytes per client (sent + received, mean
over clients).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fedrnd.algorithms import make_algorithm
from fedrnd.driver.sweep import CellCache
from fedrnd.engine import Engine, LocalSpec, client_hparams
from fedrnd.models import make_model

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("ntk_run_for_premise", HERE / "run.py")
_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_run)

GRAPH = {"topology": "d_regular", "graph": {"degree": 5}}
SOFT = {"soft_weight": 0.3, "soft_decay": 0.5, "stage_rounds": 4, "soft_temperature": 2.0}
REGS = {"off": {"soft_weight": 0.0}, "decay": dict(SOFT, soft_schedule="decay"),
        "ramp": dict(SOFT, soft_schedule="ramp"),
        "ramp-nb": dict(SOFT, soft_schedule="ramp", soft_source="neighbours")}
TARGETS = (0.70, 0.75, 0.80)
LOCAL_TEST = 2000

SIZES = {
    # k = 1024's projection (m x 785 x 100 x k per node) makes a round ~16x dearer than
    # k = 64 (about 40 s of wall time under load here); its cells ran on a quiet machine.
    "full": dict(premise=dict(clients=30, per_client=100, rounds=10),
                 frontier=dict(clients=30, per_client=100, rounds=10),
                 mus=(0.0, 0.5, 0.7, 0.9), regs=("off", "decay", "ramp"),
                 extra=((0.9, "ramp-nb"),), alphas=(0.1, 0.5), seeds=(0, 1, 2),
                 dims=(16, 64, 256, 1024), modes=("exact", "exact_one", "sketch")),
    "tiny": dict(premise=dict(clients=6, per_client=20, rounds=2),
                 frontier=dict(clients=6, per_client=20, rounds=2),
                 mus=(0.0,), regs=("off",), extra=((0.9, "ramp-nb"),), alphas=(0.1,),
                 seeds=(0, 1), dims=(16,), modes=("sketch",)),
}


def premise_label(mu: float, reg: str) -> str:
    return f"mu{mu:g}_{reg}"


def _full_is_premise(size: dict) -> str | None:
    """The premise cell that is the frontier's unprojected NTK-DFL (same setting), if any."""
    if size["frontier"] == size["premise"] and 0.1 in size["alphas"] and 0.0 in size["mus"] \
            and "off" in size["regs"]:
        return f"premise/a0.1_{premise_label(0.0, 'off')}"
    return None


def plan(size: dict) -> list[tuple[str, str, dict, dict]]:
    """Every cell but the seed: ``(experiment, label, setting, algorithm options)``."""
    cells = []
    for alpha in size["alphas"]:
        scn = dict(size["premise"], alpha=alpha)
        combos = [(mu, reg) for mu in size["mus"] for reg in size["regs"]] + list(size["extra"])
        for mu, reg in combos:
            opts = dict(GRAPH, project=False, momentum=mu, **REGS[reg])
            cells.append(("premise", f"a{alpha:g}_{premise_label(mu, reg)}", scn, opts))
    scn = dict(size["frontier"], alpha=0.1)
    none = dict(GRAPH, momentum=0.0, soft_weight=0.0)
    if _full_is_premise(size) is None:
        cells.append(("frontier", "full", scn, dict(none, project=False)))
    for k in size["dims"]:
        for mode in size["modes"]:
            cells.append(("frontier", f"k{k}_{mode}", scn,
                          dict(none, project=True, proj_dim=k, projected_update=mode)))
    return cells


def run_cell(scn: dict, options: dict, seed: int, log=print) -> dict:
    _, data, xt, yt = _run.build(dict(scn), seed)
    model = make_model("mlp", data.feature_shape, data.num_classes, hidden=[100])
    opt, hp = client_hparams(data.num_clients)
    alg = make_algorithm("spark", Engine(model, LocalSpec(batch_size=20), opt), **options)
    alg.validate(data)
    state = alg.init(jax.random.key(seed), data, hp)
    step = jax.jit(alg.round)
    sub = np.random.default_rng(12345).permutation(len(yt))[:LOCAL_TEST]
    xs, ys = xt[sub], yt[sub]

    @jax.jit
    def accuracies(params):
        avg = jax.tree.map(lambda a: jnp.mean(a, axis=0), params)
        acc = jnp.mean(jnp.argmax(model.apply(avg, xt), -1) == yt)
        local = jax.lax.map(lambda p: jnp.mean(jnp.argmax(model.apply(p, xs), -1) == ys),
                            params)
        return acc, jnp.mean(local), jnp.min(local)

    hist, total = [], 0.0
    t0, cpu0 = time.time(), time.process_time()
    for r in range(scn["rounds"]):
        state, met = step(state, data, jax.random.fold_in(jax.random.key(seed + 1000), r))
        acc, local, worst = (float(v) for v in accuracies(state["clients"]["params"]))
        per_client = sum(np.asarray(v, np.float64) for k, v in met.items()
                         if k.startswith(("up/", "down/")))
        total += float(np.mean(per_client))
        hist.append({"round": r + 1, "acc": acc, "local_acc": local, "worst_local_acc": worst,
                     "bytes": total, "train_loss": float(met["train_loss"]),
                     "start_loss": float(met["start_loss"]), "tau_mean": float(met["tau_mean"]),
                     "soft_weight": float(met["soft_weight"]),
                     "kinds": {k: float(np.mean(v)) for k, v in met.items()
                               if k.startswith(("up/", "down/"))}})
        log(f"    round {r + 1}: acc {acc:.4f} local {local:.4f} "
            f"MB {total / 2**20:.1f} ({time.time() - t0:.0f}s)")
    return {"history": hist, "wall": time.time() - t0, "cpu": time.process_time() - cpu0}


# -- summaries ---------------------------------------------------------------------------------

def first_round(hist: list[dict], target: float) -> int | None:
    return next((e["round"] for e in hist if e["acc"] >= target), None)


def max_drop(hist: list[dict], key: str = "acc") -> float:
    """The largest fall of ``key`` from one round to the next (0 when it never falls)."""
    a = [e[key] for e in hist]
    return max([0.0] + [a[i - 1] - a[i] for i in range(1, len(a))])


def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    v = np.asarray(values, np.float64)
    if len(v) == 0:
        return "-"
    if len(v) == 1:
        return fmt.format(v[0])
    return f"{fmt.format(v.mean())} ± {fmt.format(v.std(ddof=1)).lstrip('+')}"


def reach(values: list[int | None], n: int) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return f"0/{n}"
    body = f"{np.mean(got):.1f} ({min(got)}-{max(got)})"
    return body if len(got) == n else f"{body}, {len(got)}/{n}"


def _mb(b: float) -> str:
    return f"{b / 2**20:,.1f} MB" if b < 2**30 else f"{b / 2**30:,.2f} GB"


def stable(cells: list[dict]) -> bool:
    return all(np.isfinite(e["train_loss"]) for c in cells for e in c["history"])


def summarise(records: dict[tuple[str, str], list[dict]], size: dict) -> dict:
    """Per label: the numbers the tables show (kept beside the cells as ``summary.json``)."""
    out = {}
    for (exp, label), cells in records.items():
        hs = [c["history"] for c in cells]
        out[f"{exp}/{label}"] = {
            "seeds": [c["seed"] for c in cells],
            "best_acc": [max(e["acc"] for e in h) for h in hs],
            "final_acc": [h[-1]["acc"] for h in hs],
            "final_minus_best": [h[-1]["acc"] - max(e["acc"] for e in h) for h in hs],
            "max_drop": [max_drop(h) for h in hs],
            "local_final": [h[-1]["local_acc"] for h in hs],
            "local_max_drop": [max_drop(h, "local_acc") for h in hs],
            "loss_rises": [sum(h[i]["train_loss"] > h[i - 1]["train_loss"] for i in
                               range(1, len(h))) for h in hs],
            "finite": stable(cells),
            **{f"rounds_to_{t:g}": [first_round(h, t) for h in hs] for t in TARGETS},
            **{f"bytes_to_{t:g}": [next((e["bytes"] for e in h if e["acc"] >= t), None)
                                   for h in hs] for t in TARGETS},
            "bytes_per_round": float(np.mean([h[-1]["bytes"] / len(h) for h in hs])),
            "cpu": float(sum(c["cpu"] for c in cells)),
        }
    return out


def _plots(records, size, figures: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures.mkdir(parents=True, exist_ok=True)
    names = []
    regs = list(size["regs"])
    colours = dict(zip(size["mus"], ["k", "tab:blue", "tab:orange", "tab:red"], strict=False))
    for metric, what in (("acc", "averaged model"), ("local_acc", "mean client model")):
        fig, axes = plt.subplots(len(size["alphas"]), len(regs), squeeze=False,
                                 figsize=(4 * len(regs), 3.2 * len(size["alphas"])),
                                 sharey=True)
        for ia, alpha in enumerate(size["alphas"]):
            for ir, reg in enumerate(regs):
                ax = axes[ia][ir]
                for mu in size["mus"]:
                    cells = records.get(("premise", f"a{alpha:g}_{premise_label(mu, reg)}"))
                    if not cells:
                        continue
                    a = np.array([[e[metric] for e in c["history"]] for c in cells])
                    x = np.arange(1, a.shape[1] + 1)
                    ax.plot(x, a.mean(0), color=colours[mu], label=f"mu {mu:g}")
                    ax.fill_between(x, a.min(0), a.max(0), color=colours[mu], alpha=0.15)
                ax.set_title(f"alpha {alpha:g}, regulariser {reg}", fontsize=9)
                ax.set_xlabel("round")
                ax.grid(alpha=0.3)
                if ir == 0:
                    ax.set_ylabel(f"test accuracy ({what})")
                ax.set_ylim(0.3, 0.9)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"SPARK premise: momentum x regulariser ({what}; mean over seeds, "
                     "band min-max)", fontsize=10)
        fig.tight_layout()
        name = f"premise_{metric}_vs_round.png"
        fig.savefig(figures / name, dpi=110)
        plt.close(fig)
        names.append(name)
    # Accuracy vs cumulative bytes: the premise cells (one panel per alpha) and the frontier.
    fig, axes = plt.subplots(1, len(size["alphas"]) + 1, figsize=(5 * (len(size["alphas"]) + 1),
                                                                 3.6), squeeze=False)
    for ia, alpha in enumerate(size["alphas"]):
        ax = axes[0][ia]
        for mu in size["mus"]:
            for reg, ls in zip(regs, ["-", "--", ":"], strict=False):
                cells = records.get(("premise", f"a{alpha:g}_{premise_label(mu, reg)}"))
                if not cells:
                    continue
                a = np.array([[e["acc"] for e in c["history"]] for c in cells]).mean(0)
                b = np.array([[e["bytes"] for e in c["history"]] for c in cells]).mean(0)
                ax.plot(b / 2**30, a, ls, color=colours[mu],
                        label=f"mu {mu:g}, {reg}" if ia == 0 else None)
        ax.set_title(f"premise, alpha {alpha:g} (mean over seeds)", fontsize=9)
        ax.set_xlabel("cumulative GB per client")
        ax.set_ylabel("test accuracy (averaged model)")
        ax.set_ylim(0.3, 0.9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6, ncol=2)
    ax = axes[0][-1]
    shared = _full_is_premise(size)
    if shared is not None and tuple(shared.split("/")) in records:
        records = {**records, ("frontier", "full"): records[tuple(shared.split("/"))]}
    fr = sorted([lb for (exp, lb) in records if exp == "frontier"],
                key=lambda s: (s != "full", s))
    cmap = plt.get_cmap("viridis")
    dims = list(size["dims"])
    for lb in fr:
        cells = records[("frontier", lb)]
        a = np.array([[e["acc"] for e in c["history"]] for c in cells])
        b = np.array([[e["bytes"] for e in c["history"]] for c in cells]).mean(0)
        if lb == "full":
            colour, ls = "k", "-"
        else:
            k, mode = lb[1:].split("_", 1)
            colour = cmap(dims.index(int(k)) / max(1, len(dims) - 1) * 0.9)
            ls = {"exact": "-", "exact_one": "-."}.get(mode, "--")
        ax.plot(b / 2**20, a.mean(0), ls, color=colour, label=lb, marker=".", ms=3)
        ax.fill_between(b / 2**20, a.min(0), a.max(0), color=colour, alpha=0.12)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative MB per client (log)")
    ax.set_ylabel("test accuracy (averaged model)")
    ax.set_title("projection frontier, alpha 0.1 (band min-max)", fontsize=9)
    ax.set_ylim(0.3, 0.9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    name = "premise_acc_vs_bytes.png"
    fig.savefig(figures / name, dpi=110)
    plt.close(fig)
    names.append(name)
    return names


def report(records, size, size_name: str, out: Path, figures: Path, command: str) -> str:
    summ = summarise(records, size)
    (out / "summary.json").write_text(json.dumps(summ, indent=1) + "\n")
    figs = _plots(records, size, figures)
    nseed = len(size["seeds"])
    p, f = size["premise"], size["frontier"]
    load = os.getloadavg()
    cpu = sum(s["cpu"] for s in summ.values())
    lines = [
        "# SPARK's premise: momentum, the soft-label regulariser, projection size",
        "",
        f"Generated by `{command}` (size `{size_name}`) from the cells under "
        f"`{out.name}/` (one JSON per cell and seed; `summary.json` holds every number "
        "below per seed). Raw cells are kept; `--report-only` rebuilds this page.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other "
        f"engineers' jobs (load average at report time {load[0]:.1f}), no accelerator; "
        f"jax {jax.__version__}, python {platform.python_version()}; "
        f"{datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}. "
        f"All cells: {cpu / 60:.0f} minutes of process CPU time.",
        "",
        f"**Setting** (CPU-feasible, not the papers' scale): Fashion-MNIST, MLP 784-100-10, "
        f"5-regular graph redrawn every round, equal-size clients with Dirichlet(alpha) label "
        f"mixes; premise: {p['clients']} clients x {p['per_client']} images, {p['rounds']} "
        f"rounds; frontier: {f['clients']} clients x {f['per_client']} images, alpha 0.1, "
        f"{f['rounds']} rounds. Seeds {list(size['seeds'])} (partition, initial model and "
        "graphs). NTK step as the NTK-DFL paper (lr 0.01 decayed by exp(-0.07 k), horizons "
        "tau in {100..600, 800}, RK4 with 64 steps, horizon chosen by pooled loss). SPARK's "
        "parts are **our reconstruction** (no code or schedules published): Nesterov momentum "
        "across rounds; soft labels `Y_s = (1 - beta) Y + beta softmax(f / 2)` with "
        "weight 0.3 and factor 0.5 every 4 rounds, `decay` = 0.3, 0.15, 0.075 (strong first), "
        "`ramp` = 0, 0.15, 0.225 (pure NTK evolution first, the direction of SPARK v1's "
        "wording); soft labels from the client's own start point unless `nb` (from each "
        "neighbour's own model on its own rows).",
        "",
        f"Numbers are mean ± sd over {nseed} seeds unless stated; rounds to a target are "
        f"mean (min-max) over the seeds that reach it, with the count when not all do. "
        "`max drop` = the largest fall of the averaged model's test accuracy from one round "
        "to the next (a destabilised update shows as a large drop); `loss rises` = rounds in "
        "which the pooled training loss after the step rose over the previous round's. "
        f"Mean local accuracy: the client models on a fixed {LOCAL_TEST}-image test subset. "
        "A difference inside the spread is not a finding.",
        "",
    ]
    for alpha in size["alphas"]:
        lines += [f"## Momentum x regulariser, alpha {alpha:g}", "",
                  "| mu | regulariser | " + " | ".join(f"rounds to {t:.0%}" for t in TARGETS)
                  + " | best acc | final acc | max drop | loss rises | mean local acc (final) "
                    "| finite |",
                  "|---|---|" + "---|" * len(TARGETS) + "---|---|---|---|---|---|"]
        combos = [(mu, reg) for mu in size["mus"] for reg in size["regs"]] + list(size["extra"])
        for mu, reg in combos:
            s = summ.get(f"premise/a{alpha:g}_{premise_label(mu, reg)}")
            if s is None:
                continue
            n = len(s["seeds"])
            lines.append(
                f"| {mu:g} | {reg} | " + " | ".join(reach(s[f"rounds_to_{t:g}"], n)
                                                    for t in TARGETS)
                + f" | {spread(s['best_acc'])} | {spread(s['final_acc'])} | "
                  f"{spread(s['max_drop'])} | {spread(s['loss_rises'], '{:.1f}')} | "
                  f"{spread(s['local_final'])} | {'yes' if s['finite'] else 'NO'} |")
        lines.append("")
    shared = _full_is_premise(size)
    if shared is not None and shared in summ:
        summ["frontier/full"] = summ[shared]
    for alpha in size["alphas"]:
        base = summ.get(f"premise/a{alpha:g}_{premise_label(0.0, 'off')}")
        if base is None:
            continue
        lines += [f"### Paired by seed against NTK-DFL (mu 0, regulariser off), alpha {alpha:g}",
                  "",
                  "Each seed's cell minus the NTK-DFL cell of the same seed (same partition, "
                  "initial model and graphs); mean ± sd over seeds. `noise` marks a mean "
                  "difference no larger than its sd.", "",
                  "| mu | regulariser | Δ best acc | Δ rounds to 75% | Δ max drop "
                  "| Δ mean local acc (final) |", "|---|---|---|---|---|---|"]
        combos = [(mu, reg) for mu in size["mus"] for reg in size["regs"]] + list(size["extra"])
        for mu, reg in combos:
            s = summ.get(f"premise/a{alpha:g}_{premise_label(mu, reg)}")
            if s is None or (mu, reg) == (0.0, "off"):
                continue
            cols = []
            for key in ("best_acc", "rounds_to_0.75", "max_drop", "local_final"):
                d = [s[key][s["seeds"].index(sd)] - base[key][base["seeds"].index(sd)]
                     for sd in s["seeds"] if sd in base["seeds"]
                     and s[key][s["seeds"].index(sd)] is not None
                     and base[key][base["seeds"].index(sd)] is not None]
                fmt = "{:+.1f}" if key.startswith("rounds") else "{:+.3f}"
                txt = spread(d, fmt)
                if len(d) > 1 and abs(np.mean(d)) <= np.std(d, ddof=1):
                    txt += " noise"
                cols.append(txt + ("" if len(d) == len(s["seeds"]) else f" ({len(d)} seeds)"))
            lines.append(f"| {mu:g} | {reg} | " + " | ".join(cols) + " |")
        lines.append("")
    fr = [(lb, summ[f"frontier/{lb}"]) for lb in
          ["full"] + [f"k{k}_{m}" for k in size["dims"] for m in size["modes"]]
          if f"frontier/{lb}" in summ]
    if fr:
        full = dict(fr).get("full")
        lines += ["## Projection frontier (alpha 0.1, no momentum, no regulariser)", "",
                  "`full` = NTK-DFL with unprojected Jacobians (the premise table's mu 0, "
                  "regulariser off cells at alpha 0.1 where the settings agree); `kK_exact` = kernel from "
                  "projected Jacobians, exact update by a second exchange (residuals out, "
                  "J^T A per candidate horizon back; the default); `kK_exact_one` = the "
                  "horizon chosen with the sketched updates, then the exact update of that one "
                  "horizon by the second exchange (1 / M of its bytes; ours); `kK_sketch` = "
                  "update R R^T J^T A, no second exchange. Bytes per client per round (sent + "
                  "received) are deterministic given the graph draw.", "",
                  "| cell | seeds | bytes/round | fraction of full | "
                  + " | ".join(f"rounds to {t:.0%}" for t in TARGETS)
                  + " | bytes to 75% | best acc | final acc |",
                  "|---|---|---|---|" + "---|" * len(TARGETS) + "---|---|---|"]
        for lb, s in fr:
            n = len(s["seeds"])
            frac = s["bytes_per_round"] / full["bytes_per_round"] if full else float("nan")
            b75 = [b for b in s["bytes_to_0.75"] if b is not None]
            lines.append(f"| {lb} | {n} | {_mb(s['bytes_per_round'])} | {frac:.4f} | "
                         + " | ".join(reach(s[f"rounds_to_{t:g}"], n) for t in TARGETS)
                         + f" | {_mb(np.mean(b75)) if b75 else '-'} | "
                           f"{spread(s['best_acc'])} | {spread(s['final_acc'])} |")
        lines.append("")
    lines += ["## Figures", ""] + [f"![{n}](figures/{n})" for n in figs] + [""]
    return "\n".join(lines) + "\n"


def collect(cache: CellCache, cells_dir: Path, size: dict) -> dict:
    records = {}
    for exp, label, scn, opts in plan(size):
        got = []
        for seed in size["seeds"]:
            rec = cache.get(cell_key(exp, label, scn, opts, seed), name=f"{exp}/{label}_s{seed}.json")
            if rec is not None:
                got.append(rec)
        if got:
            records[(exp, label)] = got
    return records


def cell_key(exp: str, label: str, scn: dict, opts: dict, seed: int) -> dict:
    return {"experiment": exp, "label": label, "setting": scn, "options": opts, "seed": seed,
            "local_test": LOCAL_TEST}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="smoke size (seconds)")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for cells, report and figures (default: experiments/ntk)")
    ap.add_argument("--only", nargs="*", default=None, help="experiments: premise frontier")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    size_name = "tiny" if args.tiny else "full"
    size = SIZES[size_name]
    base = args.out if args.out is not None else HERE
    cells_dir = base / "premise_cells"
    cache = CellCache(cells_dir, default=None)
    log = (lambda *a, **k: None) if args.quiet else (lambda *a: print(*a, flush=True))
    if not args.report_only:
        for exp, label, scn, opts in plan(size):
            if args.only and exp not in args.only:
                continue
            for seed in size["seeds"]:
                key = cell_key(exp, label, scn, opts, seed)
                name = f"{exp}/{label}_s{seed}.json"
                if cache.get(key, name=name) is not None:
                    continue
                log(f"cell {exp} / {label} / seed {seed}")
                rec = run_cell(scn, opts, seed, log)
                cache.put(key, {**key, **rec}, name=name)
    records = collect(cache, cells_dir, size)
    command = "python experiments/ntk/premise.py" + (" --tiny" if args.tiny else "")
    text = report(records, size, size_name, cells_dir, base / "figures", command)
    (base / "PREMISE.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
