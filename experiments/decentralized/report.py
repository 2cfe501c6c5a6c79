"""Report of the decentralized experiments (issue 6): RESULTS.md and figures from cached cells.

Run the grids first (each resumable; cells cached under runs/compare/<name>/):

    nice -n 5 fedrnd compare experiments/decentralized/dfl_100.toml
    nice -n 5 fedrnd compare experiments/decentralized/dfl_1000.toml
    python experiments/decentralized/report.py            # this report
    python experiments/decentralized/report.py --cached-central   # skip uncached central runs

What it adds to the grids' own reports (COMPARE_100.md, COMPARE_1000.md):

- accuracy vs round and vs bytes per device (mean over seeds; the ledger's cumulative bytes);
- the graph of seed 0 coloured by the regions decentralized RND found, and by the clusters
  SSD-FL's spectral bisection formed, next to the true groups;
- SSD-FL's clusters: count, sizes, ARI against the true groups and against decentralized RND's
  regions on the same graph;
- ARI of decentralized RND's regions against the true groups and against *centralized* RND
  discovery (:func:`fedrnd.rnd.discover`, all pairs, the same predictors' settings and eps
  "auto") on the same data; the centralized federations are cached in the grid's cache
  directory (``central_rnd_seed<k>.npz``), so a re-run only redraws.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
GRIDS = ["dfl_100.toml", "dfl_1000.toml"]
CENTRAL_CAP_ABOVE = 500
CENTRAL_PROBE_CAP = 20
SSDFL_FAMILY = ("ssdfl", "sync_dfl", "periodic_dfl", "random_dfl", "random_cluster_dfl")
CLUSTER_PLOTS = ("ssdfl", "ssdfl_k4")  # method labels whose clusters are drawn on the graph


def _style(name: str) -> str:
    """Line style by family: RND solid, SSD-FL with its own clusters dashed, baselines dotted."""
    if name.startswith("rnd"):
        return "-"
    if name == "ssdfl":
        return "--"
    return ":"


def _history(run_dir: Path, label: str) -> list[dict]:
    path = run_dir / label / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _curves(grid, records):
    """label -> list over seeds of (rounds, acc, bytes per client) at the evaluated rounds."""
    out: dict[str, list] = {}
    for cell in grid.cells():
        key = (cell.scenario.name, cell.method.label, cell.seed)
        if key not in records:
            continue
        rows = [r for r in _history(cell.run_dir(grid.cache_dir), cell.method.label)
                if "test_acc/mean" in r]
        if rows:
            out.setdefault((cell.method.label, cell.method.name), []).append(
                (np.array([r["round"] for r in rows]), np.array([r["test_acc/mean"] for r in rows]),
                 np.array([r["bytes_per_client"] for r in rows])))
    return out


def _plot_curves(path: Path, curves: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    colours = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20").colors
    for i, ((label, name), runs) in enumerate(curves.items()):
        n = min(len(r[0]) for r in runs)
        rounds = runs[0][0][:n]
        acc = np.mean([r[1][:n] for r in runs], 0)
        mb = np.mean([r[2][:n] for r in runs], 0) / 2**20
        kw = dict(marker="o", ms=3, ls=_style(name), color=colours[i % len(colours)],
                  label=label)
        axes[0].plot(rounds, acc, **kw)
        axes[1].plot(mb, acc, **kw)
    axes[0].set_xlabel("round")
    axes[1].set_xlabel("MB sent + received per device (cumulative)")
    axes[1].set_xscale("log")
    axes[1].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for ax in axes:
        ax.set_ylabel("mean device test accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_graph(path: Path, npz: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    z = np.load(npz)
    pos, u, v, comp = z["positions"], z["u"], z["v"], z["compatible"].astype(bool)
    region, group = z["region"], z["group"]
    n = len(region)
    size = 30 if n <= 200 else 6
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.4))
    for ax, colour, name in ((axes[0], group, "true group (rotation)"),
                             (axes[1], region, f"decentralized RND region ({region.max() + 1})")):
        seg = np.stack([pos[u], pos[v]], 1)
        ax.add_collection(LineCollection(seg[~comp], colors="0.85", linewidths=0.4))
        ax.add_collection(LineCollection(seg[comp], colors="0.35", linewidths=0.6))
        cmap = "tab10" if colour.max() < 10 else "tab20"
        ax.scatter(pos[:, 0], pos[:, 1], c=colour % 20, cmap=cmap, s=size, zorder=3,
                   edgecolors="k", linewidths=0.3)
        ax.set_title(name)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title}; dark links: compatible (band rule, mutual)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_clusters(path: Path, npz: Path, title: str) -> None:
    """The graph coloured by SSD-FL's clusters next to the true groups (``clusters.npz``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    z = np.load(npz)
    pos, u, v, cid, group = z["positions"], z["u"], z["v"], z["cluster_id"], z["group"]
    intra = cid[u] == cid[v]
    size = 30 if len(cid) <= 200 else 6
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.4))
    for ax, colour, name in ((axes[0], group, "true group (rotation)"),
                             (axes[1], cid, f"SSD-FL cluster ({len(np.unique(cid))})")):
        seg = np.stack([pos[u], pos[v]], 1)
        ax.add_collection(LineCollection(seg[~intra], colors="0.85", linewidths=0.4))
        ax.add_collection(LineCollection(seg[intra], colors="0.35", linewidths=0.6))
        cmap = "tab10" if colour.max() < 10 else "tab20"
        ax.scatter(pos[:, 0], pos[:, 1], c=colour % 20, cmap=cmap, s=size, zorder=3,
                   edgecolors="k", linewidths=0.3)
        ax.set_title(name)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title}; dark links: inside a cluster, light: between clusters")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _central(grid, cell, log) -> dict:
    """Centralized RND discovery on the cell's data (cached): federations, ARI, seconds."""
    from sklearn.metrics import adjusted_rand_score

    from fedrnd.algorithms import make_algorithm
    from fedrnd.driver.setup import build_data
    from fedrnd.engine import ClientOptimizer, Engine, LocalSpec
    from fedrnd.models import make_model
    from fedrnd.rnd import discover

    cache = grid.cache_dir / f"central_rnd_seed{cell.seed}.npz"
    if cache.is_file():
        z = np.load(cache)
        return {"federation": z["federation"], "seconds": float(z["seconds"]),
                "group": z["group"]}
    if "--cached-central" in sys.argv:
        return None
    log(f"centralized RND discovery for {grid.name} seed {cell.seed} ...")
    data = build_data(cell.config)[0]
    opts = cell.config.algorithms[0].options
    dummy = Engine(make_model("logreg", data.feature_shape, data.num_classes), LocalSpec(16),
                   ClientOptimizer())
    alg = make_algorithm("rnd_dfl", dummy, **opts)  # the same predictor settings
    cfg = alg.rnd_config
    if data.num_clients > CENTRAL_CAP_ABOVE:
        # All pairs of 1,000 conv predictors on every training image is about 60M predictor
        # evaluations; a seeded subset of probes per device keeps it to a few CPU minutes.
        cfg = dataclasses.replace(cfg, probe_cap=CENTRAL_PROBE_CAP)
    t0 = time.perf_counter()
    disc = discover(data, cfg)
    sec = time.perf_counter() - t0
    group = np.asarray(data.group)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, federation=disc.federation, seconds=sec, group=group, eps=disc.eps)
    log(f"  {disc.num_federations} federations, ARI {adjusted_rand_score(group, disc.federation):.3f},"
        f" {sec:.0f} s")
    return {"federation": disc.federation, "seconds": sec, "group": group}


def _headline(n: int, rows: list[dict], grid) -> str:
    """One line per grid: mean final accuracy (and MB per device) of every method, best first,
    grouped as SSD-FL, the DFL baselines and decentralized RND."""
    name = {m.label: m.name for m in grid.methods}
    done = [r for r in rows if r["seeds"].split("/")[0] != "0" and "+ft" not in r["method"]]

    def fmt(r):
        return f"{r['method']} {100 * r['raw_acc']:.1f}% ({r['mb'].split(' ')[0]} MB)"

    fam = {"SSD-FL and its ablations": lambda m: name[m] == "ssdfl",
           "DFL baselines": lambda m: name[m] in ("dfedavg", *SSDFL_FAMILY) and name[m] != "ssdfl",
           "decentralized RND": lambda m: name[m] == "rnd_dfl"}
    parts = []
    for title, pick in fam.items():
        sel = sorted((r for r in done if pick(r["method"])), key=lambda r: -r["raw_acc"])
        if sel:
            parts.append(f"{title}: " + ", ".join(fmt(r) for r in sel))
    return f"- **{n} devices** (mean test accuracy over seeds, MB sent + received per device): " \
        + "; ".join(parts) + "."


def _reading(counts: list[tuple[int, int, int]]) -> list[str]:
    """What SSD-FL's cluster count means for the comparison (from the cached cells)."""
    if not counts:
        return []
    if all(k == 1 for _, _, k in counts):
        return ["SSD-FL's split rule (our reconstruction) kept every graph whole (one cluster, "
                "every grid and seed; `clusters.json` of each run lists the rejected cut and "
                "its terms): with the groups scattered over the graph, no connected cut "
                "separates them (heterogeneity share near 0) and a random geometric graph has "
                "no consensus bottleneck. With one cluster SSD-FL is the same program as "
                "`sync_dfl`, and the numbers are identical; `ssdfl_k4` (4 spectral clusters, "
                "forced) and `random_cluster_dfl` (4 random clusters) show what clusters would "
                "change here."]
    return ["SSD-FL's clusters per grid and seed: "
            + ", ".join(f"{n} devices seed {s}: {k}" for n, s, k in counts) + "."]


def main(argv: list[str] | None = None) -> None:
    from sklearn.metrics import adjusted_rand_score

    from fedrnd.driver.compare import _machine, load_cell, load_grid, scenario_rows

    lines_tables: list[str] = []
    figures: list[str] = []
    ari_rows: list[str] = []
    ssd_rows: list[str] = []
    ssd_counts: list[tuple[int, int, int]] = []  # (devices, seed, clusters) of label ssdfl
    headline: list[str] = []
    settings: list[str] = []
    fig_dir = HERE / "figures"
    for name in GRIDS:
        grid = load_grid(HERE / name)
        records = {}
        for c in grid.cells():
            rec = load_cell(c, grid.cache_dir)
            if rec is not None:
                records[(c.scenario.name, c.method.label, c.seed)] = rec
        if not records:
            print(f"{name}: no finished cells yet (run fedrnd compare first)")
            continue
        b = grid.base
        n = b.data.num_clients
        settings.append(
            f"- **{n} devices** (`{name}`, seeds {grid.seeds}): {b.rounds} rounds, "
            f"{b.local.steps} local steps of batch {b.local.batch_size} per round, partition "
            f"{grid.scenarios[0].partition} {json.dumps(grid.scenarios[0].partition_options)}, "
            f"graph {json.dumps(grid.methods[0].options.get('graph'))} "
            f"({grid.methods[0].options.get('topology')}); report of the grid: "
            f"[{grid.results.name}]({grid.results.name}).")
        for s in grid.scenarios:
            rows = scenario_rows(grid, s, records)
            lines_tables += [f"### {n} devices ({s.name})", "",
                             "| method | test acc % | +FT % | MB/device | ARI | clusters | wall s "
                             "| seeds |", "|---|---|---|---|---|---|---|---|"]
            for r in rows:
                lines_tables.append(f"| {r['method']} | {r['acc']} | {r['acc_ft']} | "
                                    f"{r['mb']} | {r['ari']} | {r['clusters']} | {r['wall']} | "
                                    f"{r['seeds']} |")
            lines_tables.append("")
            curves = _curves(grid, records)
            fig = fig_dir / f"{grid.name}_curves.png"
            _plot_curves(fig, curves, f"{n} devices, Fashion-MNIST rotations, mixed optimizers")
            figures.append(f"![accuracy vs round and bytes, {n} devices](figures/{fig.name})")
            headline.append(_headline(n, rows, grid))
            regions = {}  # seed -> decentralized RND's regions (label rnd_dfl), for the SSD-FL table
            for c in grid.cells():
                run = c.run_dir(grid.cache_dir) / c.method.label
                if c.method.label == "rnd_dfl" and (run / "regions.npz").is_file():
                    regions[c.seed] = np.load(run / "regions.npz")["region"]
            for c in grid.cells():
                run = c.run_dir(grid.cache_dir) / c.method.label
                if (c.method.name not in ("ssdfl", "random_cluster_dfl")
                        or (s.name, c.method.label, c.seed) not in records
                        or not (run / "clusters.npz").is_file()):
                    continue
                z = np.load(run / "clusters.npz")
                cid, group = z["cluster_id"], z["group"]
                sizes = np.bincount(cid)
                sizes = sizes[sizes > 0]
                if c.method.label == "ssdfl":
                    ssd_counts.append((n, c.seed, len(sizes)))
                reg = regions.get(c.seed)
                ssd_rows.append(
                    f"| {n} | {c.method.label} | {c.seed} | {len(sizes)} | {sizes.min()}-"
                    f"{sizes.max()} | {adjusted_rand_score(group, cid):.3f} | "
                    + (f"{adjusted_rand_score(reg, cid):.3f}" if reg is not None else "-")
                    + f" | {records[(s.name, c.method.label, c.seed)]['final']['test_acc/mean'] * 100:.1f} |")
                if c.seed == grid.seeds[0] and c.method.label in CLUSTER_PLOTS:
                    gfig = fig_dir / f"{grid.name}_{c.slug}_clusters.png"
                    _plot_clusters(gfig, run / "clusters.npz",
                                   f"{c.method.label}, {n} devices, seed {c.seed}")
                    figures.append(f"![graph coloured by SSD-FL cluster, {n} devices, "
                                   f"{c.method.label}](figures/{gfig.name})")
            for c in grid.cells():
                if c.method.name != "rnd_dfl" or (s.name, c.method.label, c.seed) not in records:
                    continue
                rec = records[(s.name, c.method.label, c.seed)]
                run = c.run_dir(grid.cache_dir) / c.method.label
                if c.seed == grid.seeds[0] and (run / "regions.npz").is_file():
                    gfig = fig_dir / f"{grid.name}_{c.slug}_regions.png"
                    _plot_graph(gfig, run / "regions.npz",
                                f"{c.method.label}, {n} devices, seed {c.seed}")
                    figures.append(f"![graph coloured by region, {n} devices, {c.method.label}]"
                                   f"(figures/{gfig.name})")
                reg = np.load(run / "regions.npz")["region"]
                cen = _central(grid, c, print)
                if cen is None:  # --cached-central: not computed yet
                    ari_rows.append(f"| {n} | {c.method.label} | {c.seed} | {int(reg.max()) + 1} | "
                                    f"{rec['final'].get('ari', float('nan')):.3f} | "
                                    "not run | | | "
                                    f"{rec['final'].get('cluster_time', float('nan')):.0f} | |")
                    continue
                ari_rows.append(
                    f"| {n} | {c.method.label} | {c.seed} | {int(reg.max()) + 1} | "
                    f"{adjusted_rand_score(cen['group'], reg):.3f} | "
                    f"{int(cen['federation'].max()) + 1} | "
                    f"{adjusted_rand_score(cen['group'], cen['federation']):.3f} | "
                    f"{adjusted_rand_score(cen['federation'], reg):.3f} | "
                    f"{rec['final'].get('cluster_time', float('nan')):.0f} | "
                    f"{cen['seconds']:.0f} |")
    mach = _machine()
    text = [
        "# Decentralized FL: SSD-FL, DFL baselines and decentralized RND (issue 6)", "",
        f"Generated by `python experiments/decentralized/report.py` on "
        f"{datetime.date.today().isoformat()} from the cached cells of the grids below; do not "
        "edit by hand.", "",
        f"Machine: {mach['cpu']}; {mach['platform']}; backend {mach['backend']}; {mach['jax']};"
        f" Python {mach['python']}; fedrnd at commit {mach['commit']}. The CPU was shared "
        "with other jobs, so wall times are indicative only.", "",
        "## Setting", "",
        "- Data: Fashion-MNIST (the offline IDX files, `fashion_mnist` source), 4 clustered "
        "groups by rotation (0/90/180/270 degrees); devices are assigned to groups in a random "
        "order, so every group is scattered over the whole graph.",
        "- Task model: MLP 784-100-10 for every method. Mixed local optimizers: 40% SGD (lr "
        "0.05), 30% proximal SGD (lr 0.05, mu 0.01), 30% momentum SGD (lr 0.01, momentum 0.9), "
        "assigned at random; every device trains every round.",
        "- Graph: random geometric in the unit square, drawn from the seed, the same for every "
        "method (no server anywhere).",
        "- Methods: `dfedavg` (local steps, then one gossip step over the whole graph, "
        "Metropolis weights); SSD-FL (`ssdfl`: clusters formed once by recursive spectral "
        "bisection with our reconstruction of the consensus-gap and heterogeneity criterion; "
        "every round local steps then one gossip step inside the clusters, every 5th round one "
        "gossip step over the whole graph instead) and the baselines of its paper, the same "
        "program with other clusters and periods: `sync_dfl` (one cluster, gossip over the "
        "whole graph every round), `periodic_dfl` (local training only, gossip over the whole "
        "graph every 5th round), `random_dfl` (every link up with probability 0.5 each round), "
        "`random_cluster_dfl` (SSD-FL's regimes on random clusters of equal size, which need "
        "not be connected; the number is set in the grid, see the cluster table; it doubles as "
        "the random-clusters ablation); ablation `ssdfl_k4` (spectral bisection until 4 "
        "clusters whatever the criterion says); decentralized RND (`rnd_dfl`: discovery "
        "before round 0 on graph neighbours, then gossip inside its regions; `rnd_dfl_hops2`: "
        "regions limited to 2 hops from their leader).",
        *settings, "",
        "## Headline", "",
        *headline, "",
        *_reading(ssd_counts), "",
        "## Accuracy and traffic", "",
        *lines_tables,
        *[f + "\n" for f in figures],
        "## Regions: decentralized vs centralized RND", "",
        "Decentralized RND scores only graph neighbours (band +-30% around the self-novelty, "
        "mutual links, regions by leader election without a size limit); centralized RND "
        "scores all pairs (eps auto, mutual compatibility, connected components) with the same "
        f"predictors' settings on the same data (above {CENTRAL_CAP_ABOVE} devices scored on "
        f"{CENTRAL_PROBE_CAP} probe images per device, a seeded subset, to bound its cost).",
        "",
        "| devices | method | seed | regions | ARI regions vs groups | central federations | "
        "ARI central vs groups | ARI regions vs central | decentral discovery s | "
        "central discovery s |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *ari_rows, "",
        "Regions are local by construction: a group whose devices are not connected through "
        "compatible links among themselves becomes several regions, which lowers ARI against "
        "the (global) groups without mixing groups.", "",
        "## SSD-FL's clusters", "",
        "Clusters formed once before training (connected in the graph for the spectral rule; "
        "random clusters need not be). ARI against the true groups and against decentralized "
        "RND's regions (`rnd_dfl`, same seed and graph).", "",
        "| devices | method | seed | clusters | sizes | ARI vs groups | ARI vs RND regions | "
        "test acc % |",
        "|---|---|---|---|---|---|---|---|",
        *ssd_rows, "",
        "The groups are scattered over the graph, so clusters that must be connected pieces of "
        "it cannot follow them: SSD-FL's clusters are spatial, and its heterogeneity score "
        "(label histogram, mean input, optimizer kind) only steers where the cuts fall.", "",
        f"Python {platform.python_version()}, run at {datetime.datetime.now():%Y-%m-%d %H:%M}"
        f" (load average {os.getloadavg()[0]:.1f}).",
    ]
    (HERE / "RESULTS.md").write_text("\n".join(text).rstrip() + "\n")
    print(f"wrote {HERE / 'RESULTS.md'}")


if __name__ == "__main__":
    main(sys.argv[1:])
