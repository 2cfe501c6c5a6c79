"""DisUE with heterogeneous experts (issue 19): two client families of different architectures
(MLPs 784-64-10 and 784-400-10) distilled into one universal expert (784-200-10), against the
baselines that averaging can run. Writes experiments/disue/HETERO.md and its raw cells.

    nice -n 10 python experiments/disue/hetero.py

Per (Dirichlet alpha, seed), on one data split:

- ``disue hetero``: DisUE with ``families`` (half of the clients, drawn at random, run the
  64-wide MLP, half the 400-wide one), similarity grouping with 2 clusters per family, data-free
  distillation into the task model (the 200-wide MLP) at the budget SWEEP.md found best for the
  scenario; the student starts from the previous universal expert (the only start open when
  no family shares its architecture). The same run gives each family's model on the global test
  set (``family<f>_acc``): every client of a family other than the universal expert's starts
  from its family's model, the sample-weighted average of the family's cluster experts, so that
  model *is* per-family FedAvg's global model (FedAvg on the family's clients alone).
- ``disue hetero proxy``: the same with 512 real unlabeled training rows instead of the
  generator: the upper bound of the distillation.
- ``fedavg mlp64``: FedAvg on the smallest architecture, which every client can run.
- ``fedavg mlp200 (reference)``: FedAvg with every client on the universal expert's
  architecture, which the 64-wide clients cannot run here: a reference, not a baseline.

Every score is the accuracy on the global test set (every client's test rows pooled). Finished
(alpha, seed) cells are cached in ``--cache`` (one JSON each), so a rerun only runs what is
missing; ``--fresh`` reruns everything.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
COMMAND = "nice -n 10 python experiments/disue/hetero.py"
BUDGETS = {0.1: (50, 2), 0.5: (200, 2)}
"""``distill_steps x student_steps`` per round, the best generator budget of SWEEP.md for each
scenario (50 x 2 at alpha 0.1, 200 x 2 at alpha 0.5)."""
RAW_KEYS = ("universal_acc", "family0_acc", "family1_acc", "personal_acc", "ensemble_acc",
            "student_agree", "gen_teacher_acc", "distill_loss")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default="fashion_mnist")
    p.add_argument("--num-clients", type=int, default=50)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.5])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--widths", type=int, nargs=2, default=[64, 400],
                   help="hidden widths of the two client families")
    p.add_argument("--universal", type=int, default=200, help="the universal expert's width")
    p.add_argument("--clusters", type=int, default=2, help="clusters per family")
    p.add_argument("--distill-steps", type=int, default=None,
                   help="override the per-scenario budget (tiny runs)")
    p.add_argument("--student-steps", type=int, default=None)
    p.add_argument("--proxy-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=10, help="local steps per round")
    p.add_argument("--no-proxy", action="store_true", help="skip the proxy upper bound")
    p.add_argument("--out", default=str(HERE), help="where HETERO.md and the raw cells go")
    p.add_argument("--cache", default=str(ROOT / "runs" / "disue_hetero"))
    p.add_argument("--fresh", action="store_true")
    return p.parse_args(argv)


def budget(args, alpha: float) -> tuple[int, int]:
    d, s = BUDGETS.get(alpha, (50, 2))
    return args.distill_steps or d, args.student_steps or s


def base_config(args, alpha: float, seed: int, width: int, algorithms: list[dict]) -> dict:
    return {"name": f"a{alpha}-s{seed}-w{width}", "seed": seed, "rounds": args.rounds,
            "eval_every": args.rounds, "checkpoint_every": 0, "progress": False,
            "divergence": {"action": "warn"},
            "data": {"source": args.source, "num_clients": args.num_clients,
                     "partition": "dirichlet", "partition_options": {"alpha": alpha}},
            "model": {"name": "mlp", "options": {"hidden": [width]}},
            "local": {"batch_size": 32, "steps": args.steps, "optimizer": "sgd", "lr": 0.05},
            "algorithms": algorithms}


def disue_options(args, alpha: float, distill: str) -> dict:
    d, s = budget(args, alpha)
    opts = {"grouping": "similarity", "num_clusters": args.clusters,
            "families": [{"model": "mlp", "hidden": [w]} for w in args.widths],
            "family_shares": [0.5, 0.5], "family_rule": "share", "distill": distill,
            "distill_steps": d, "student_steps": s, "student_init": "previous"}
    if distill == "proxy":
        opts["proxy_size"] = args.proxy_size
    else:
        opts["generator_head"] = "dense"
    return opts


def run_cell(args, alpha: float, seed: int) -> dict:
    """Both simulations of one (alpha, seed) on the same split; the global-test figures."""
    from fedrnd.driver import simulate

    cache = Path(args.cache)
    algs = [{"name": "disue", "label": "disue hetero",
             "options": disue_options(args, alpha, "generator")}]
    if not args.no_proxy:
        algs.append({"name": "disue", "label": "disue hetero proxy",
                     "options": disue_options(args, alpha, "proxy")})
    algs.append({"name": "fedavg", "label": "fedavg mlp200 (reference)"})
    cfgs = [base_config(args, alpha, seed, args.universal, algs),
            base_config(args, alpha, seed, args.widths[0],
                        [{"name": "fedavg", "label": "fedavg mlp64"}])]
    key = hashlib.sha256(json.dumps(cfgs, sort_keys=True).encode()).hexdigest()[:16]
    path = cache / "cells" / f"alpha{alpha}-seed{seed}-{key}.json"
    if path.is_file() and not args.fresh:
        return json.loads(path.read_text())
    rows, t0 = [], time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    for cfg in cfgs:
        res = simulate(cfg, run_dir=cache / "runs" / cfg["name"], overwrite=True, verbose=False,
                       progress=False)
        for label, m in res.methods.items():
            last = m.history[-1] if m.history else {}
            row = {"scenario": f"dirichlet-{alpha}", "alpha": alpha, "seed": seed,
                   "method": label, "wall_s": m.wall_time}
            if label.startswith("disue"):
                row.update({k: float(last[k]) for k in RAW_KEYS if k in last})
                row["universal_acc"] = float(m.final["universal_acc"])
                fam = np.asarray(m.state["clients"]["family"])
                total = np.asarray(m.bytes_up) + np.asarray(m.bytes_down)
                for f in range(len(args.widths)):
                    row[f"mb_family{f}"] = float(total[fam == f].mean()) / 1e6
                    row[f"clients_family{f}"] = int(np.sum(fam == f))
            else:
                row["universal_acc"] = float(m.final["test_acc/weighted"])
                row["mb_all"] = float(np.mean(np.asarray(m.bytes_up)
                                              + np.asarray(m.bytes_down))) / 1e6
            rows.append(row)
    rec = {"alpha": alpha, "seed": seed, "rows": rows, "wall_s": time.perf_counter() - t0,
           "load_avg": load, "configs": cfgs}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    tmp.replace(path)
    return rec


# ------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------

def _pm(values, scale: float = 100.0, digits: int = 1, sign: bool = False) -> str:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float) * scale
    if not len(v):
        return "-"
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    if len(v) == 1:
        return f.format(v[0])
    return f"{f.format(v.mean())} ± {v.std(ddof=1):.{digits}f} [{f.format(v.min())}, " \
           f"{f.format(v.max())}]"


def table_rows(args, rows: list[dict], alpha: float) -> list[tuple[str, list, list]]:
    """``(label, accuracies by seed, gap to fedavg mlp64 by seed)`` per line of the table."""
    at = [r for r in rows if r["alpha"] == alpha]
    base = {r["seed"]: r["universal_acc"] for r in at if r["method"] == "fedavg mlp64"}

    def line(label, method, key):
        vals = {r["seed"]: r.get(key) for r in at if r["method"] == method}
        vals = {s: v for s, v in vals.items() if v is not None}
        gaps = [v - base[s] for s, v in vals.items() if s in base]
        return label, list(vals.values()), gaps

    w0, w1, u = args.widths[0], args.widths[1], args.universal
    out = [line(f"universal expert (DisUE, MLP-{u}, generator)", "disue hetero",
                "universal_acc")]
    if not args.no_proxy:
        out.append(line("universal expert, proxy upper bound (real unlabeled inputs)",
                        "disue hetero proxy", "universal_acc"))
    out += [line("teacher ensemble (all experts, mass-weighted)", "disue hetero",
                 "ensemble_acc"),
            line(f"FedAvg, MLP-{w0} on every client", "fedavg mlp64", "universal_acc"),
            line(f"per-family FedAvg, MLP-{w0} (its family's clients)", "disue hetero",
                 "family0_acc"),
            line(f"per-family FedAvg, MLP-{w1} (its family's clients)", "disue hetero",
                 "family1_acc"),
            line(f"reference: FedAvg, MLP-{u} on every client (not runnable here)",
                 "fedavg mlp200 (reference)", "universal_acc")]
    return out


def write_outputs(args, recs: list[dict]) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for rec in recs for r in rec["rows"]]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "hetero_cells.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    (out / "hetero_cells.json").write_text(json.dumps(
        [{k: v for k, v in rec.items() if k != "configs"} | {"config": rec["configs"]}
         for rec in recs], indent=1))
    import jax

    from fedrnd import __version__

    wall = sum(rec["wall_s"] for rec in recs)
    loads = [rec["load_avg"] for rec in recs]
    w0, w1, u = args.widths[0], args.widths[1], args.universal
    lines = [
        "# DisUE with heterogeneous experts: two architectures, one universal expert", "",
        f"Generated by `{COMMAND}` on {time.strftime('%Y-%m-%d')}; every number below comes "
        "from the raw cells `hetero_cells.csv` / `hetero_cells.json` (cached per alpha and "
        "seed under `runs/disue_hetero/cells/`); do not edit by hand, except the verdict "
        "paragraph at the end (between the `verdict` markers), written by hand from these "
        "numbers and kept when the file is regenerated.", "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"backend {jax.default_backend()}; jax {jax.__version__}; fedrnd {__version__}. "
        f"{len(recs)} (alpha, seed) cells, {wall / 60:.1f} min of wall time in all "
        f"(1-minute load average at their start: median {np.median(loads):.1f} on a shared "
        "CPU; times scale with it).", "",
        "## Setup", "",
        f"- Data: `{args.source}`, {args.num_clients} clients, Dirichlet label skew (alpha "
        f"{', '.join(str(a) for a in args.alphas)}), seeds {args.seeds}; {args.rounds} rounds, "
        f"all clients every round; local training {args.steps} SGD steps of batch 32, lr 0.05 "
        "(the sweep's).",
        f"- Client families: half of the clients (at random, fixed before training) run an MLP "
        f"with one hidden layer of {w0} units (MLP-{w0}), half one of {w1} (MLP-{w1}); "
        "parameter averaging across the two is impossible.",
        f"- DisUE (`families`): similarity grouping with {args.clusters} clusters per family "
        f"({2 * args.clusters} experts), teacher weights by class mass, a dense class-conditional "
        f"generator; the universal expert is an MLP-{u}, distilled every round from all "
        "experts at the best generator budget of [SWEEP.md](SWEEP.md) for the scenario ("
        + ", ".join(f"alpha {a}: {budget(args, a)[0]} x {budget(args, a)[1]}"
                    for a in args.alphas)
        + " iterations x student steps), student started from the previous universal expert "
        "(starting from the experts' average, the sweep's better start, needs a family of the "
        "student's architecture). Clients of a family start each round from their family's "
        "model; the universal expert is not sent back to them (it cannot be loaded into "
        "either architecture).",
        "- `per-family FedAvg` rows are each family's model in the same DisUE run: the "
        "sample-weighted average of the family's cluster experts, from which all the family's "
        "clients start, is FedAvg's global model on that family's clients alone.",
        f"- The `reference` row is FedAvg with every client on the {u}-wide MLP, which the "
        f"{w0}-wide clients cannot run in this scenario: what the universal expert would be "
        "with homogeneous clients, not a baseline.",
        "- Score: accuracy on the global test set (every client's held-out test rows pooled); "
        "mean ± sample sd over seeds [min, max]; gaps are paired within a seed.", ""]
    verdict = []
    for a in args.alphas:
        lines += [f"## Dirichlet alpha = {a}", "",
                  f"| model | global test acc % | minus FedAvg MLP-{w0}, points |",
                  "|---|---|---|"]
        trs = table_rows(args, rows, a)
        for label, vals, gaps in trs:
            gap = "-" if "FedAvg, MLP-" + str(w0) + " on" in label else _pm(gaps, sign=True)
            lines.append(f"| {label} | {_pm(vals)} | {gap} |")
        dis = [r for r in rows if r["alpha"] == a and r["method"] == "disue hetero"]
        if dis:
            mb = [_pm([r.get(f"mb_family{f}") for r in dis], 1.0, 2) for f in range(2)]
            fed = [r.get("mb_all") for r in rows if r["alpha"] == a
                   and r["method"] == "fedavg mlp64"]
            lines += ["", f"Communication over the run, MB per client: DisUE MLP-{w0} clients "
                      f"{mb[0]}, MLP-{w1} clients {mb[1]} (each sends and receives its own "
                      f"family's models); FedAvg MLP-{w0} {_pm(fed, 1.0, 2)}. Diagnostics "
                      "(last round): personalised accuracy of the cluster experts "
                      f"{_pm([r.get('personal_acc') for r in dis])}, student agreement with "
                      f"the teacher ensemble {_pm([r.get('student_agree') for r in dis])}, "
                      "share of generated inputs the teachers give the requested class "
                      f"{_pm([r.get('gen_teacher_acc') for r in dis])}."]
        lines.append("")
        uni = trs[0]
        best = max(trs[1:], key=lambda t: np.mean(t[1]) if t[1] and "reference" not in t[0]
                   and "ensemble" not in t[0] and "proxy" not in t[0] else -1)
        verdict.append((a, uni, best))
    lines += ["## What DisUE gives where averaging cannot run", ""]
    for a, uni, best in verdict:
        if not uni[1] or not best[1]:
            continue
        d = np.mean(uni[1]) - np.mean(best[1])
        lines.append(f"- alpha {a}: the universal expert reaches {_pm(uni[1])}% on the global "
                     f"test set; the best baseline that can run, {best[0]}, reaches "
                     f"{_pm(best[1])}% ({'+' if d >= 0 else ''}{100 * d:.1f} points on the "
                     "mean).")
    lines += ["", "VERDICT_PLACEHOLDER", ""]
    path = out / "HETERO.md"
    text = "\n".join(lines)
    if path.is_file():
        # Keep a hand-written verdict paragraph between the markers across regenerations.
        old = path.read_text()
        a, b = "<!-- verdict -->", "<!-- /verdict -->"
        if a in old and b in old:
            text = text.replace("VERDICT_PLACEHOLDER", old[old.index(a):old.index(b) + len(b)])
    text = text.replace("VERDICT_PLACEHOLDER", "<!-- verdict -->\n<!-- /verdict -->")
    path.write_text(text + "\n")
    return path


def main(argv=None) -> Path:
    args = parse_args(argv)
    recs = []
    for a in args.alphas:
        for s in args.seeds:
            t0 = time.perf_counter()
            recs.append(run_cell(args, a, s))
            print(f"alpha {a} seed {s}: {time.perf_counter() - t0:.0f} s", flush=True)
    path = write_outputs(args, recs)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
