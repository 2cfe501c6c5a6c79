"""Tables and a figure for docs/methods/rnd-drift.md from runs of experiments/rnd_drift.toml.

Run:   for s in 0 1 2; do fedrnd run experiments/rnd_drift.toml --set seed=$s \
           --set name="\"rnd_drift_s$s\""; done
       python experiments/rnd_drift_report.py runs/rnd_drift_s0 runs/rnd_drift_s1 runs/rnd_drift_s2
Prints markdown tables (per-round figures averaged over the given runs, then the final figures
of each run) and writes docs/drift.png (``--png`` to change).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

METHODS = ("rnd_once", "rnd_tau5", "fedavg")
ROUNDS = (5, 20, 22, 23, 24, 25, 26, 30, 40)
KEYS = (("test_acc/mean", "acc, all"), ("test_acc/drifted", "acc, moved clients"),
        ("test_acc/stayed", "acc, other clients"), ("ari", "ARI"))


def _history(run: Path, method: str) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run / method / "metrics.jsonl").read_text().splitlines()]
    return {r["round"]: r for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--png", type=Path, default=Path("docs/drift.png"))
    args = ap.parse_args()
    hist = {m: [_history(r, m) for r in args.runs] for m in METHODS}
    drift = json.loads((args.runs[0] / "metadata.json").read_text())["data"]["drift"][0]

    def mean(m: str, key: str, rnd: int) -> float:
        vals = [h[rnd].get(key) for h in hist[m]]
        return float(np.mean(vals)) if all(v is not None for v in vals) else float("nan")

    print(f"Mean over {len(args.runs)} run(s); drift after round {drift['at_round']} "
          f"({len(drift['clients'])} clients in the first run).\n")
    for key, title in KEYS:
        print(f"**{title}**\n")
        print("| method | " + " | ".join(f"r{r}" for r in ROUNDS) + " |")
        print("|---|" + "---|" * len(ROUNDS))
        for m in METHODS:
            cells = [mean(m, key, r) for r in ROUNDS]
            if all(np.isnan(cells)):
                continue
            print(f"| {m} | " + " | ".join("-" if np.isnan(c) else f"{c:.3f}" for c in cells)
                  + " |")
        print()
    print("**final (round 40), per run**\n")
    print("| run | " + " | ".join(f"{m} acc / moved / ARI" for m in METHODS) + " |")
    print("|---|" + "---|" * len(METHODS))
    for run in args.runs:
        cells = []
        for m in METHODS:
            f = json.loads((run / m / "final.json").read_text())
            ari = f"{f['ari']:.2f}" if "ari" in f else "-"
            cells.append(f"{f['test_acc/mean']:.3f} / {f['test_acc/drifted']:.3f} / {ari}")
        print(f"| {run.name} | " + " | ".join(cells) + " |")

    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.4), dpi=110)
    axes = fig.subplots(1, 3)
    last = max(hist[METHODS[0]][0])
    rounds = np.arange(1, last + 1)
    for ax, (key, title) in zip(axes, (KEYS[0], KEYS[1], KEYS[3]), strict=True):
        for m in METHODS:
            y = [mean(m, key, int(r)) for r in rounds]
            if not all(np.isnan(y)):
                ax.plot(rounds, y, label=m, ls="--" if m == "rnd_once" else "-")
        ax.axvline(drift["at_round"], color="k", ls="--", lw=0.8)
        ax.set_title(title)
        ax.set_xlabel("round")
    axes[0].legend(loc="lower right")
    fig.suptitle(f"drift after round {drift['at_round']} (dashed); mean of {len(args.runs)} "
                 "seed(s)", fontsize=9)
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png)
    print(f"\nfigure: {args.png}")


if __name__ == "__main__":
    main()
