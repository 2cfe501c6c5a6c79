"""Report of the community-graph grid (issue 18): COMMUNITY_100.md and community_100.json.

    nice -n 5 fedrnd compare experiments/decentralized/community_100.toml   # the cells
    python experiments/decentralized/community_report.py                    # this report

Reads the cached cells (runs/compare/community_100/) and writes, for SSD-FL, sync DFL and the
controls (4 random clusters, random links) on a planted-partition graph whose communities hold
the rotation groups: the accuracy-vs-bytes Pareto front (the paper's claim), the clusters SSD-FL's split found (count, sizes, ARI against the groups = the communities), final mean device test
accuracy, bytes per device (set-up phase separately), accuracy and bytes at every evaluated
round, consensus distances; mean and sample standard deviation over seeds, every raw number in
the JSON file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
NAME = "community_100"
SCENARIO = "rotation_on_communities"
METHODS = ("ssdfl", "sync_dfl", "periodic_dfl", "random_cluster_dfl", "random_dfl")
COMMAND = ("nice -n 5 fedrnd compare experiments/decentralized/community_100.toml && "
           "python experiments/decentralized/community_report.py")


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def collect(cache: Path) -> dict:
    """method -> seed -> raw numbers of that cell."""
    out: dict = {}
    for m in METHODS:
        for cell in sorted((cache / "cells" / SCENARIO / m).glob("seed*.json")):
            c = json.loads(cell.read_text())
            seed = int(c["seed"])
            f = c["final"]
            rows = _rows(cache / "runs" / SCENARIO / m / f"seed{seed}" / m / "metrics.jsonl")
            evals = [r for r in rows if "test_acc/mean" in r]
            out.setdefault(m, {})[seed] = {
                "test_acc": f["test_acc/mean"],
                "test_acc_groups": [f[f"test_acc/group{g}"] for g in range(4)],
                "mb_per_device": f["bytes_per_client"] / 1e6,
                "setup_bytes_per_device": f.get("setup_bytes_per_device", 0.0),
                "clusters": f.get("clusters"), "ari": f.get("ari"), "nmi": f.get("nmi"),
                "cluster_sizes": [f.get("cluster_sizes_min"), f.get("cluster_sizes_max")],
                "graph_edges": f.get("graph_edges"),
                "graph_mean_degree": f.get("graph_mean_degree"),
                "wall_s": c["wall_time"],
                "curve": [{"round": r["round"], "test_acc": r["test_acc/mean"],
                           "mb_per_device": r["bytes_per_client"] / 1e6} for r in evals],
                "consensus_distance": [r.get("consensus_distance") for r in rows],
                "cluster_consensus_distance": [r.get("cluster_consensus_distance")
                                               for r in rows],
            }
    return out


def _ms(xs) -> str:
    xs = np.asarray([x for x in xs if x is not None], float)
    if len(xs) == 0:
        return "-"
    sd = xs.std(ddof=1) if len(xs) > 1 else 0.0
    return f"{xs.mean():.3g} ± {sd:.2g}"


def _pct(xs) -> str:
    xs = 100 * np.asarray(xs, float)
    sd = xs.std(ddof=1) if len(xs) > 1 else 0.0
    return f"{xs.mean():.1f} ± {sd:.1f}"


def _headline(raw: dict, seeds: list[int]) -> list[str]:
    """The two questions of the grid, answered from the numbers."""
    ss, sy = raw.get("ssdfl", {}), raw.get("sync_dfl", {})
    common = sorted(set(ss) & set(sy))
    if not common:
        return []
    k = [ss[s]["clusters"] for s in common]
    ari = [ss[s]["ari"] for s in common]
    d = [100 * (ss[s]["test_acc"] - sy[s]["test_acc"]) for s in common]
    r = [ss[s]["mb_per_device"] / sy[s]["mb_per_device"] for s in common]
    return ["## Headline", "",
            f"- Does SSD-FL's split find the communities? Clusters found: "
            f"{', '.join(f'{x:.0f}' for x in k)} (4 planted); ARI against the communities "
            f"(= the rotation groups): {', '.join(f'{x:.2f}' for x in ari)} (seeds {common}).",
            f"- Accuracy against sync_dfl, paired by seed: {_ms(d)} points "
            f"({', '.join(f'{x:+.1f}' for x in d)}), with {_ms(r)} times its bytes (set-up "
            "phase included).", ""]


def pareto(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names whose ``(mb, acc)`` no other point dominates (no more bytes and at least the
    accuracy, one of the two strictly better)."""
    front = []
    for m, (b, a) in points.items():
        if not any((b2 <= b and a2 >= a) and (b2 < b or a2 > a)
                   for m2, (b2, a2) in points.items() if m2 != m):
            front.append(m)
    return front


def best_within(curve: list[dict], budget: float) -> float | None:
    """The highest accuracy a run reached at an evaluated round within ``budget`` MB."""
    acc = [p["test_acc"] for p in curve if p["mb_per_device"] <= budget + 1e-9]
    return max(acc) if acc else None


def _pareto_lines(raw: dict, seeds: list[int]) -> list[str]:
    """Is SSD-FL on the accuracy-vs-bytes front? Final points, per seed and on the mean, and
    each method's best accuracy within SSD-FL's bytes and within the cheapest method's."""
    if "ssdfl" not in raw:
        return []
    lines = ["## Accuracy against bytes: the Pareto front", "",
             "A method is on the front if no other method reaches at least its accuracy with "
             "no more bytes per device (final round, set-up phase included).", ""]
    mean = {m: (float(np.mean([c["mb_per_device"] for c in cells.values()])),
                float(np.mean([c["test_acc"] for c in cells.values()])))
            for m, cells in raw.items()}
    front = pareto(mean)
    lines.append(f"- Mean over seeds: front = {', '.join(front)}; SSD-FL "
                 f"{'on' if 'ssdfl' in front else 'not on'} it.")
    for s in seeds:
        pts = {m: (cells[s]["mb_per_device"], cells[s]["test_acc"])
               for m, cells in raw.items() if s in cells}
        f = pareto(pts)
        lines.append(f"- Seed {s}: front = {', '.join(f)}; SSD-FL "
                     f"{'on' if 'ssdfl' in f else 'not on'} it.")
    cheap = min(mean, key=lambda m: mean[m][0])
    for label, budget_of in (("SSD-FL's final bytes", "ssdfl"), (f"{cheap}'s final bytes",
                                                                 cheap)):
        lines += ["", f"Best accuracy (%) reached at an evaluated round within {label} "
                      "(per seed, then mean):", ""]
        for m, cells in raw.items():
            vals = []
            for s in seeds:
                if s not in cells or s not in raw[budget_of]:
                    continue
                vals.append(best_within(cells[s]["curve"], raw[budget_of][s]["mb_per_device"]))
            got = [v for v in vals if v is not None]
            txt = ", ".join("-" if v is None else f"{100 * v:.1f}" for v in vals)
            lines.append(f"- {m}: {txt}" + (f" (mean {100 * np.mean(got):.1f})" if got else ""))
    lines.append("")
    return lines


def write(raw: dict, md: Path) -> None:
    seeds = sorted(next(iter(raw.values())))
    lines = ["# SSD-FL vs sync DFL on a community graph (issue 18)", "",
             "Generated by `python experiments/decentralized/community_report.py` from the "
             "cached cells; do not edit by hand.", "",
             f"Command: `{COMMAND}`", "",
             "Raw numbers: [community_100.json](community_100.json) (every cell, every "
             "evaluated round). Grid report: [COMPARE_COMMUNITY_100.md]"
             "(COMPARE_COMMUNITY_100.md).", "",
             "Setting: Fashion-MNIST, 100 devices on a planted-partition graph (4 communities "
             "of 25, p_in = 0.3, p_out = 0.01, drawn from the seed), 4 rotation groups "
             "(0/90/180/270 degrees) placed one per community (`placement = \"communities\"`), "
             "100 training / 50 test images per device, mixed local optimizers assigned at "
             "random (40% SGD, 30% proximal SGD, 30% momentum SGD), MLP 784-100-10, 10 local "
             f"steps of batch 10 per round, 20 rounds, seeds {seeds}. Both methods see the "
             "same split, graph and initial weights. Test accuracy is the mean over devices "
             "of each device's own model on its own test rows (its group's rotation). "
             "Mean ± sample standard deviation over seeds.", "",
             *_headline(raw, seeds),
             *_pareto_lines(raw, seeds),
             "| method | test acc % | MB / device | set-up KB / device | clusters | ARI vs "
             "communities | wall s |", "|---|---|---|---|---|---|---|"]
    for m, cells in raw.items():
        v = [cells[s] for s in seeds if s in cells]
        lines.append(
            f"| {m} | {_pct([c['test_acc'] for c in v])} | "
            f"{_ms([c['mb_per_device'] for c in v])} | "
            f"{_ms([c['setup_bytes_per_device'] / 1e3 for c in v])} | "
            f"{_ms([c['clusters'] for c in v])} | {_ms([c['ari'] for c in v])} | "
            f"{_ms([c['wall_s'] for c in v])} |")
    lines += ["", "Per seed (test acc %, MB / device, clusters, ARI):", ""]
    for m, cells in raw.items():
        per = "; ".join(f"seed {s}: {100 * c['test_acc']:.1f}%, {c['mb_per_device']:.1f} MB, "
                        f"{c['clusters']:.0f} clusters, ARI {c['ari']:.2f}"
                        for s, c in sorted(cells.items()))
        lines.append(f"- {m}: {per}")
    base = raw.get("sync_dfl", {})
    lines += ["", "Paired by seed against sync_dfl (same graph, split and initial weights): "
              "accuracy difference in points, bytes ratio:", ""]
    for m, cells in raw.items():
        common = sorted(set(cells) & set(base))
        if m == "sync_dfl" or not common:
            continue
        d = [100 * (cells[s]["test_acc"] - base[s]["test_acc"]) for s in common]
        r = [cells[s]["mb_per_device"] / base[s]["mb_per_device"] for s in common]
        lines.append(f"- {m}: {_ms(d)} points ({', '.join(f'{x:+.1f}' for x in d)}), "
                     f"bytes x {_ms(r)}")
    lines += ["", "Accuracy (%) and MB per device at the evaluated rounds (mean over seeds):",
              "", "| round | " + " | ".join(f"{m} acc | {m} MB" for m in raw) + " |",
              "|---|" + "---|---|" * len(raw)]
    rounds = [p["round"] for p in raw["ssdfl"][seeds[0]]["curve"]]
    for i, r in enumerate(rounds):
        cells = []
        for m in raw:
            pts = [raw[m][s]["curve"][i] for s in seeds if s in raw[m]]
            cells.append(f"{100 * np.mean([p['test_acc'] for p in pts]):.1f} | "
                         f"{np.mean([p['mb_per_device'] for p in pts]):.1f}")
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    lines += ["", "Consensus distance after the last round (mean over devices of the squared "
              "distance to the mean model; for SSD-FL also to its cluster's mean):", ""]
    for m, cells in raw.items():
        cd = [c["consensus_distance"][-1] for c in cells.values()]
        ccd = [c["cluster_consensus_distance"][-1] for c in cells.values()]
        lines.append(f"- {m}: global {_ms(cd)}, within cluster {_ms(ccd)}")
    md.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", default=str(ROOT / "runs" / "compare" / NAME))
    ap.add_argument("--out", default=str(HERE))
    a = ap.parse_args()
    raw = collect(Path(a.cache_dir))
    if not raw:
        raise SystemExit(f"no cells under {a.cache_dir}; run the grid first:\n  {COMMAND}")
    out = Path(a.out)
    (out / f"{NAME}.json").write_text(json.dumps({"command": COMMAND, "cells": raw},
                                                 indent=1) + "\n")
    write(raw, out / "COMMUNITY_100.md")
    print(f"wrote {out / 'COMMUNITY_100.md'} and {out / (NAME + '.json')}")


if __name__ == "__main__":
    main()
