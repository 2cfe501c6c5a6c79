"""Write experiments/discovery/REPORT.md (and figures/) from the suite's cached cells.

    python experiments/discovery/suite.py report      # or: python experiments/discovery/report.py

Every number is re-derived from the stored scores of each cell (``cells/*.npz``, written by
``python experiments/discovery/suite.py run``) with :func:`fedrnd.rnd.federations_from_scores`,
so the default rule, the paper's rule at several eps, eps="auto" (silhouette) and the
decentralized +-30 % band are read off the *same* scores.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from fedrnd.rnd import RNDConfig, federations, federations_from_scores  # noqa: E402

HERE = Path(__file__).resolve().parent
CELLS = HERE / "cells"
FIG = HERE / "figures"
OUT = HERE / "REPORT.md"

GROUPED = ("rotation", "pattern", "labelskew", "unequal", "mixed", "outliers", "paper")
SINGLE = ("iid", "dirichlet", "labelperm")
ORDER = (*GROUPED, *SINGLE)


def _load(path: Path):
    z = np.load(path)
    return json.loads(str(z["meta"])), {k: z[k] for k in z.files if k != "meta"}


def truth(meta, arr) -> np.ndarray:
    """True groups; one-distribution populations (label permutation included) are one group."""
    if meta["population"] in SINGLE:
        return np.zeros_like(arr["group"])
    return arr["group"]


def decide(arr, cfg: RNDConfig) -> np.ndarray:
    if "scores" in arr:
        return federations_from_scores(arr["scores"], cfg, second=arr["second"],
                                       count=arr["count"], self_std=arr["self_std"]).federation
    c = len(arr["group"])
    return federations_from_scores(arr["edge_scores"], cfg, second=arr["edge_second"],
                                   count=arr["count"], s_self=arr["self_novelty"],
                                   self_std=arr["self_std"],
                                   edges=(arr["src"], arr["dst"]), num_clients=c).federation


def band(arr, width=0.3) -> np.ndarray:
    """The decentralized band rule on the dense matrix: ``|s_ij - s_ii| < width * s_ii`` both
    ways, federations as components (the centralised reading of regions)."""
    s = arr["scores"].astype(np.float64)
    d = np.diag(s)[:, None]
    ok = ((1 - width) * d < s) & (s < (1 + width) * d)
    np.fill_diagonal(ok, True)
    return federations(ok, "mutual")


def pairwise_vote(arr) -> np.ndarray:
    """Average linkage on the pairwise Benjamini-Hochberg evidence, cut at 1/2 (a majority of
    pairwise rejections keeps two groups apart): the alternative to the split test."""
    from fedrnd.rnd import linkage_federations

    dec = federations_from_scores(arr["scores"], RNDConfig(), second=arr["second"],
                                  count=arr["count"])
    return linkage_federations(dec.evidence)


READS = {
    "test (default)": lambda a: decide(a, RNDConfig()),
    "test, no homogeneity check": lambda a: decide(a, RNDConfig(within_ratio=float("inf"))),
    "test, min_effect 0.02": lambda a: decide(a, RNDConfig(min_effect=0.02)),
    "test, min_effect 0.03": lambda a: decide(a, RNDConfig(min_effect=0.03)),
    "pairwise vote": pairwise_vote,
    "eps auto": lambda a: decide(a, RNDConfig(criterion="eps")),
    "eps 0.5": lambda a: decide(a, RNDConfig(criterion="eps", eps=0.5)),
    "eps 1": lambda a: decide(a, RNDConfig(criterion="eps", eps=1.0)),
    "eps 2": lambda a: decide(a, RNDConfig(criterion="eps", eps=2.0)),
    "band 30%": band,
}
SENSITIVITY = ([dict(alpha=a, min_effect=m, within_ratio=0.3) for a in (0.01, 0.05)
                for m in (0.0, 0.02, 0.025, 0.03, 0.05)]
               + [dict(alpha=0.05, min_effect=0.025, within_ratio=w)
                  for w in (0.2, 0.4, float("inf"))])


def score(meta, arr, fed):
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    t = truth(meta, arr)
    return (adjusted_rand_score(t, fed) if len(np.unique(t)) > 1 or len(np.unique(fed)) > 1
            else 1.0, normalized_mutual_info_score(t, fed), int(fed.max()) + 1)


def _cell_reads(path: Path):
    """Every read of one cell: ``{read name: (ARI, NMI, federations)}`` and, for dense cells
    of at most 200 clients, the sensitivity decisions (one per :data:`SENSITIVITY` entry)."""
    meta, arr = _load(path)
    reads = {}
    for name, fn in READS.items():
        if "scores" not in arr and not name.startswith("test") and name != "eps auto":
            continue  # sparse cells: the test and the largest-gap eps only
        reads[name] = score(meta, arr, fn(arr))
    sens = []
    if "scores" in arr and meta["clients"] <= 200:
        sens = [score(meta, arr, decide(arr, dataclasses.replace(RNDConfig(), **kw)))
                for kw in SENSITIVITY]
    return reads, sens


def _all_reads(paths, workers: int | None = None):
    """:func:`_cell_reads` of every path, in worker processes (``FEDRND_REPORT_WORKERS``,
    default the CPU count): the reads are independent and the report re-decides a few
    thousand matrices."""
    import os
    from concurrent.futures import ProcessPoolExecutor

    workers = workers or int(os.environ.get("FEDRND_REPORT_WORKERS", os.cpu_count() or 1))
    if workers <= 1:
        return dict(zip(paths, map(_cell_reads, paths), strict=True))
    with ProcessPoolExecutor(workers) as ex:
        return dict(zip(paths, ex.map(_cell_reads, paths, chunksize=1), strict=True))


def _ms(v, fmt="{:.2f}"):
    v = np.asarray(v, float)
    if v.size == 0:
        return "-"
    return fmt.format(v.mean()) + (f" ± {fmt.format(v.std())}" if v.size > 1 else "")


def collect():
    cells = defaultdict(list)
    for p in sorted(CELLS.glob("*.npz")):
        if p.name.endswith(".tmp.npz"):
            continue
        meta, arr = _load(p)
        cells[(meta["source"], meta["population"], meta["clients"], meta["network"])].append(
            (p, meta, arr))
    return cells


def _heatmap(path: Path, arr, title: str, side: int = 200):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = arr["scores"].astype(np.float64)
    g = arr["group"]
    keep = np.sort(np.random.default_rng(0).choice(len(g), min(side, len(g)), replace=False))
    o = keep[np.argsort(g[keep], kind="stable")]
    d = np.diag(s)
    rel = np.log(np.maximum(s, 1e-30)) - np.log(np.maximum(d, 1e-30))[:, None]
    rel = 0.5 * (rel + rel.T)
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    im = ax.imshow(np.clip(rel[np.ix_(o, o)], -0.5, 2.0), cmap="viridis", interpolation="none")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(im, ax=ax, label="symmetrised log novelty ratio R_ij")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report() -> str:
    cells = collect()
    FIG.mkdir(exist_ok=True)
    lines = ["# RND discovery suite", "",
             "Generated by `python experiments/discovery/suite.py run` (cells, resumable) and "
             "`python experiments/discovery/suite.py report` (this file). Raw scores per cell: "
             "`experiments/discovery/cells/*.npz` (S, Q, self-novelty, probe counts, true groups; "
             "edge lists at 10,000 clients). Populations and the generator: the docstring of "
             "`experiments/discovery/suite.py`. ARI / NMI against the true groups "
             "(one-distribution populations: truth = one group, so ARI 1 means kept whole). "
             "Mean ± standard deviation over seeds.", ""]
    # Headline: the default per population and scale.
    lines += ["## The default (criterion \"test\")", "",
              "| data | population | clients | network | seeds | ARI | NMI | federations "
              "| CPU s | wall s | KB per client (up / down) | peak RSS MB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    keyed = sorted(cells, key=lambda k: (k[0], k[2], ORDER.index(k[1]) if k[1] in ORDER else 99))
    cell_reads = _all_reads([p for key in keyed for p, _, _ in cells[key]])
    singles_split = defaultdict(lambda: [0, 0])
    results = {}
    for key in keyed:
        source, pop, c, net = key
        rows = cells[key]
        reads = {name: [] for name in READS}
        for p, _, _ in rows:
            for name, v in cell_reads[p][0].items():
                reads[name].append(v)
        results[key] = reads
        d = np.array(reads["test (default)"])
        metas = [m for _, m, _ in rows]
        if pop in SINGLE:
            singles_split[c][0] += int(np.sum(d[:, 2] > 1))
            singles_split[c][1] += len(d)
        lines.append(
            f"| {source} | {pop} | {c} | {net} | {len(rows)} | {_ms(d[:, 0])} | {_ms(d[:, 1])} "
            f"| {_ms(d[:, 2], '{:.1f}')} | {_ms([m['cpu_s'] for m in metas], '{:.0f}')} "
            f"| {_ms([m['wall_s'] for m in metas], '{:.0f}')} "
            f"| {np.mean([m['bytes_up_mean'] for m in metas]) / 1024:.0f} / "
            f"{np.mean([m['bytes_down_mean'] for m in metas]) / 1024:.0f} "
            f"| {np.max([m['peak_rss_mb'] for m in metas]):.0f} |")
    lines += ["", "Cells kept whole among one-distribution populations (default rule): " + ", ".join(
                  f"{c} clients: {b - a} of {b}" for c, (a, b) in sorted(singles_split.items()))
              + ". (IID, label permutation and Dirichlet over the whole population; per "
              "population in the table above.)",
              "", "CPU and wall seconds are the whole `discover` call (probe split, target cache, "
              "predictor training, scoring, decision), measured while other jobs shared the 2 "
              "cores (load in each cell's meta); peak RSS is the process's, data set included.",
              ""]
    # Cost by phase.
    lines += ["## Cost by phase", "",
              "Mean CPU seconds of each phase of `discover` (process time, both cores), the "
              "wall seconds of the whole call, the 1-minute load average before the call "
              "(2 cores: above 2, other jobs were running) and the peak RSS, over all cells "
              "of a scale and network.", "",
              "| clients | network | mode | cells | train | scores | candidates | decision | "
              "whole (CPU s) | whole (wall s) | load | peak RSS MB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by_scale = defaultdict(list)
    for key in keyed:
        for _, meta, arr in cells[key]:
            by_scale[(key[2], key[3], "dense" if "scores" in arr else "two-stage")].append(meta)
    for (c, net, mode), metas in sorted(by_scale.items()):
        def ph(k, metas=metas):
            return np.mean([m["cpu_timings"].get(k, 0.0) for m in metas])

        lines.append(
            f"| {c} | {net} | {mode} | {len(metas)} | {ph('train'):.0f} | {ph('scores'):.0f} "
            f"| {ph('candidates'):.1f} | {ph('federations'):.1f} "
            f"| {np.mean([m['cpu_s'] for m in metas]):.0f} "
            f"| {np.mean([m['wall_s'] for m in metas]):.0f} "
            f"| {np.mean([m['load_before'] for m in metas]):.1f} "
            f"| {np.max([m['peak_rss_mb'] for m in metas]):.0f} |")
    lines.append("")
    # Side by side.
    lines += ["## The default beside the paper's rule on the same scores", "",
              "Mean ARI over seeds (federations found in parentheses). `eps` rows are the "
              "paper's Eq. 9 (row sigma, mutual components) on the held-out scores; `eps auto` "
              "the silhouette choice (the largest-gap rule in sparse mode); `band 30%` the "
              "decentralized rule's band read centrally (mutual, components); `pairwise vote` "
              "the same test's pairwise Benjamini-Hochberg decisions merged by majority "
              "(average linkage on the evidence, cut at 1/2) instead of the split test; "
              "`test, no homogeneity check` the default with `within_ratio = inf` (splits are "
              "kept even when the federations they yield are as mixed inside as between).", "",
              "| data | population | clients | " + " | ".join(READS) + " |",
              "|---|---|---|" + "---|" * len(READS)]
    for key in keyed:
        source, pop, c, net = key
        cellv = []
        for name in READS:
            v = results[key][name]
            if not v:
                cellv.append("-")
                continue
            v = np.array(v)
            cellv.append(f"{v[:, 0].mean():.2f} ({v[:, 2].mean():.0f})")
        lines.append(f"| {source} | {pop} | {c} | " + " | ".join(cellv) + " |")
    # Sensitivity of the defaults.
    lines += ["", "## Sensitivity of the test's settings", "",
              "Mean ARI over all grouped cells and the cells split among one-distribution "
              "populations, all dense cells at 12 and 200 clients (the same scores, "
              "re-decided).", "",
              "| alpha | min_effect | within_ratio | grouped mean ARI | grouped cells with "
              "ARI >= 0.95 | IID + label permutation cells split | Dirichlet cells split |",
              "|---|---|---|---|---|---|---|"]
    for k, kw in enumerate(SENSITIVITY):
        ag, good, n_g, split, n_s, dsplit, n_d = [], 0, 0, 0, 0, 0, 0
        for key in keyed:
            if key[2] > 200:
                continue
            for p, _, _ in cells[key]:
                sens = cell_reads[p][1]
                if not sens:
                    continue
                a, _, f = sens[k]
                if key[1] == "dirichlet":
                    dsplit += f > 1
                    n_d += 1
                elif key[1] in SINGLE:
                    split += f > 1
                    n_s += 1
                else:
                    ag.append(a)
                    good += a >= 0.95
                    n_g += 1
        lines.append(f"| {kw['alpha']} | {kw['min_effect']} | {kw['within_ratio']} | "
                     f"{np.mean(ag):.3f} | "
                     f"{good} / {n_g} | {split} / {n_s} | {dsplit} / {n_d} |")
    # Figures.
    lines += ["", "## Heat maps", "",
              "Symmetrised log novelty ratio `R_ij = (r_ij + r_ji) / 2`, "
              "`r_ij = log(S_ij / S_ii)` (the test's statistic; "
              "200 clients sampled, ordered by true group), seed 0.", ""]
    for key in keyed:
        source, pop, c, net = key
        if c not in (200, 12):
            continue
        p, meta, arr = cells[key][0]
        if "scores" not in arr:
            continue
        tag = "" if net in ("mlp", "conv") else f"_{net}"
        fig = FIG / f"{source}_{pop}_{c}{tag}.png"
        _heatmap(fig, arr, f"{source} {pop}, {c} clients, {net}, seed {meta['seed']}")
        lines.append(f"![{pop} {c} {net}](figures/{fig.name})")
    text = "\n".join(lines) + "\n"
    OUT.write_text(text)
    return text


if __name__ == "__main__":
    print(write_report())
