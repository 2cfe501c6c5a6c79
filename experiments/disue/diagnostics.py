"""DisUE's distillation diagnostics per round, for a short run (issue 19, first part).

Run (about 5 minutes on a shared 2-core CPU):

    python experiments/disue/diagnostics.py [--rounds 12] [--out experiments/disue]

Fashion-MNIST, 20 clients with Dirichlet(0.1) label skew, MLP 784-200-10, one seed, IFCA's
grouping with K = 4 and the distillation budget of experiments/disue/grid.toml (50 iterations
of 1 generator step + 2 student steps, batch 64, dense generator head). Variants: the
generator with the student started from the previous universal expert (as specified) or
from the experts' average, ``distill = "proxy"`` (512 unlabeled real training rows in place of
the generator: the upper bound that separates generator failure from distillation failure),
and ``distill = "average"`` (no distillation: FedAvg's model) for reference.

Writes ``DIAGNOSTICS.md`` (naming this command), ``diagnostics.json`` and ``diagnostics.csv``
(every logged round metric of every variant) and ``figures/disue_diagnostics.png``. The run
itself goes to ``runs/disue_diagnostics`` (ignored by git; ``--overwrite`` moves an old one
aside).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import time
from pathlib import Path

import jax

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
COMMAND = "python experiments/disue/diagnostics.py"

BUDGET = {"grouping": "ifca", "num_clusters": 4, "distill_steps": 50,
          "generator_head": "dense"}
VARIANTS = {
    "generator": {**BUDGET},
    "generator avg-init": {**BUDGET, "student_init": "average"},
    "proxy": {**BUDGET, "distill": "proxy", "proxy_size": 512},
    "average": {"grouping": "ifca", "num_clusters": 4, "distill": "average"},
}
PANELS = [
    ("universal_acc", "universal expert, global test acc"),
    ("student_agree", "student agrees with teacher ensemble (real test rows)"),
    ("gen_teacher_acc", "teachers' accuracy on requested class"),
    ("gen_coverage", "class coverage of a batch"),
    ("gen_diversity", "same-class RMS input distance"),
    ("gen_pred_entropy", "entropy of predicted classes (nats)"),
]


def config(rounds: int, alpha: float, num_clients: int, seed: int,
           source: str = "fashion_mnist") -> dict:
    return {"rounds": rounds, "eval_every": rounds, "progress": False, "seed": seed,
            "data": {"source": source, "num_clients": num_clients,
                     "partition": "dirichlet", "partition_options": {"alpha": alpha}},
            "model": {"name": "mlp", "options": {"hidden": [200]}},
            "local": {"batch_size": 32, "steps": 10, "optimizer": "sgd", "lr": 0.05},
            "algorithms": [{"name": "disue", "label": label, "options": opts}
                           for label, opts in VARIANTS.items()]}


def plot(histories: dict[str, list[dict]], path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 6.5), dpi=100)
    axes = fig.subplots(2, 3).ravel()
    for ax, (key, name) in zip(axes, PANELS, strict=True):
        for i, (label, rows) in enumerate(histories.items()):
            pts = [(r["round"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), color=f"C{i}", marker="o", ms=3, lw=1.3,
                        label=label)
        if key == "universal_acc":
            pts = [(r["round"], r["ensemble_acc"]) for r in histories["generator"]]
            ax.plot(*zip(*pts, strict=True), color="k", ls=":", lw=1.2,
                    label="teacher ensemble (generator run)")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("round", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--num-clients", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--source", default="fashion_mnist", help="data source (tests: digits)")
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--run-dir", default=str(REPO / "runs" / "disue_diagnostics"))
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)

    from fedrnd.driver import simulate

    cfg = config(args.rounds, args.alpha, args.num_clients, args.seed, args.source)
    t0 = time.perf_counter()
    res = simulate(cfg, run_dir=args.run_dir, verbose=False, overwrite=args.overwrite)
    minutes = (time.perf_counter() - t0) / 60
    histories = {label: res.methods[label].history for label in VARIANTS}
    finals = {label: res.methods[label].final for label in VARIANTS}

    out = Path(args.out)
    (out / "diagnostics.json").write_text(json.dumps(
        {"command": COMMAND, "config": cfg, "history": histories, "final": finals},
        indent=1) + "\n")
    keys = sorted({k for rows in histories.values() for r in rows for k in r
                   if not k.startswith("bytes") and k != "round"})
    with open(out / "diagnostics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "round", *keys])
        for label, rows in histories.items():
            for r in rows:
                w.writerow([label, r["round"], *(r.get(k, "") for k in keys)])
    fig = out / "figures" / "disue_diagnostics.png"
    title = (f"DisUE diagnostics: {args.source}, {args.num_clients} clients, "
             f"Dirichlet({args.alpha}), seed {args.seed}")
    plot(histories, fig, title)
    write_markdown(out / "DIAGNOSTICS.md", args, histories, finals, minutes, fig)
    print(f"{out / 'DIAGNOSTICS.md'} ({minutes:.1f} min)")


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def write_markdown(path: Path, args, histories, finals, minutes: float, fig: Path) -> None:
    argv = (f" --rounds {args.rounds} --alpha {args.alpha} --num-clients {args.num_clients} "
            f"--seed {args.seed}" + ("" if args.source == "fashion_mnist"
                                     else f" --source {args.source}"))
    lines = [
        "# DisUE distillation diagnostics per round", "",
        f"Generated by `{COMMAND}{argv}` on {time.strftime('%Y-%m-%d')} "
        f"({minutes:.1f} min; {platform.machine()}, backend {jax.default_backend()}); "
        "do not edit by hand. Raw numbers: [diagnostics.json](diagnostics.json), "
        "[diagnostics.csv](diagnostics.csv).", "",
        f"`{args.source}`, {args.num_clients} clients, Dirichlet({args.alpha}) label skew, MLP "
        f"784-200-10, {args.rounds} rounds, one seed ({args.seed}), IFCA's grouping with K = 4; "
        "50 distillation iterations per round (1 generator step + 2 student steps, batch 64, "
        "dense generator head), the budget of experiments/disue/grid.toml. A short diagnostic "
        "run, not a comparison of methods: one seed, few rounds, few clients.", "",
        "Metrics (all computed inside the jitted round; see docs/methods/disue.md):", "",
        "- `gen_teacher_acc`: share of a fresh batch from the final generator that the teacher "
        "ensemble (per-class weights of the requested class) assigns to the requested class. "
        "With `proxy`, the batch is real proxy rows and the 'requested' class is the "
        "ensemble's own pseudo-label, so it is near 1 by construction.",
        "- `gen_coverage`: share of the classes some cluster holds that the ensemble assigns "
        "to at least one sample of the batch; `gen_pred_entropy`: entropy of the predicted "
        "classes (log 10 = 2.30 for a uniform spread); `gen_diversity`: mean RMS feature "
        "distance between samples that requested the same class (0: one input per class). "
        "The `proxy` row gives the same figures for real inputs.",
        "- `student_agree`: share of all clients' test rows (pooled) where the universal "
        "expert's argmax equals the mass-weighted teacher ensemble's; `ensemble_acc`: that "
        "ensemble's test accuracy, what a perfect distillation would reach.", "",
        "## Last round", "",
        "| variant | universal % | teacher ensemble % | student agree % | gen teacher acc % | "
        "coverage % | diversity | pred. entropy | personalised % |",
        "|---|---|---|---|---|---|---|---|---|"]
    for label, rows in histories.items():
        r = rows[-1]
        div = r.get("gen_diversity")
        ent = r.get("gen_pred_entropy")
        lines.append(
            f"| {label} | {_pct(r.get('universal_acc'))} | {_pct(r.get('ensemble_acc'))} | "
            f"{_pct(r.get('student_agree'))} | {_pct(r.get('gen_teacher_acc'))} | "
            f"{_pct(r.get('gen_coverage'))} | {'-' if div is None else f'{div:.3f}'} | "
            f"{'-' if ent is None else f'{ent:.2f}'} | "
            f"{_pct(finals[label].get('test_acc/mean'))} |")
    lines += ["", "## Per round (generator, student from the previous universal expert)", "",
              "| round | universal % | student agree % | gen teacher acc % | coverage % | "
              "diversity | pred. entropy |", "|---|---|---|---|---|---|---|"]
    for r in histories["generator"]:
        lines.append(f"| {r['round']} | {_pct(r['universal_acc'])} | "
                     f"{_pct(r['student_agree'])} | {_pct(r['gen_teacher_acc'])} | "
                     f"{_pct(r['gen_coverage'])} | {r['gen_diversity']:.3f} | "
                     f"{r['gen_pred_entropy']:.2f} |")
    lines += ["", f"![diagnostics per round]({fig.relative_to(path.parent)})", ""]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
