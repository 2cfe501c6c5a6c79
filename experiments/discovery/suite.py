"""The discovery suite: RND federation discovery on populations with known groups, at scale.

Run (resumable: every cell is cached in ``experiments/discovery/cells``; delete a cell to redo
it)::

    python experiments/discovery/suite.py run [--scales 12,200,1000,10000] [--seeds 0,1,2]
                                              [--only rotation,pattern] [--data fmnist,digits]
    python experiments/discovery/suite.py report      # REPORT.md + figures from the cells

Populations (a *generator with known groups*: every client draws its examples i.i.d., with
replacement, from its group's distribution, so any number of clients holds ``--per-client``
examples each; group pools are disjoint shares of the source's training images):

* ``rotation``: 4 equal groups, group g sees images rotated by g x 90 degrees.
* ``pattern``: 4 equal groups, group g sees ``clip(x + pattern_g, 0, 1)`` (the RND paper's
  smooth equidistant patterns, per-pixel RMS 0.15).
* ``labelskew``: 4 equal groups, group g draws its classes from its own Dirichlet(0.5) mix
  (no transform: the groups differ only in which images they hold).
* ``unequal``: pattern groups (RMS 0.15, one pattern per group) of very unequal sizes
  (shares 1/2, 1/4, 1/8 and the rest split into groups of 3 clients).
* ``mixed``: 4 groups with four kinds of shift: plain, rotated 90 degrees, pattern at RMS 0.3,
  Dirichlet(0.5) class mix; sizes 40/30/20/10 %.
* ``outliers``: the ``rotation`` population plus 5 % of clients (at least 1) that each have a
  unique distribution (their own pattern at RMS 0.3); each outlier is its own true group.
* ``iid``, ``dirichlet`` (every client its own Dirichlet(0.3) class mix over one pool),
  ``labelperm`` (4 groups that differ only in a label permutation; RND sees inputs only, so
  one federation is the honest answer): one-distribution populations, truth = one group.
* ``paper`` (12 clients only): the RND paper's setup, Fashion-MNIST, 4 pattern groups of 3,
  300 images each, the conv pair with 400 predictor steps.

Discovery: library defaults (criterion "test", held-out probes) with the MLP pair (the conv
pair at 1,000 clients costs about 20 CPU minutes here; ``--network`` to change, e.g.
``mlp-pool2`` for the MLP pair on 2x2-pooled images), and at
10,000 clients the two-stage mode (``candidates=32``). Each cell stores the raw scores
(``S``, ``Q``, self-novelty, probe counts, the true groups; edge lists in sparse mode), the
default decision, CPU and wall seconds per phase, bytes per client and peak memory, so
the report re-reads every rule from the same scores.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fedrnd.data import FederatedData, feature_patterns, load_source  # noqa: E402

HERE = Path(__file__).resolve().parent
CELLS = HERE / "cells"
GROUPED = ("rotation", "pattern", "labelskew", "unequal", "mixed", "outliers")
SINGLE = ("iid", "dirichlet", "labelperm")
POPULATIONS = (*GROUPED, *SINGLE, "paper")
SOURCES = {"fmnist": "fashion_mnist", "digits": "digits"}


# --------------------------------------------------------------------------------------------
# populations
# --------------------------------------------------------------------------------------------


def _group_sizes(pop: str, c: int) -> list[int]:
    if pop in ("rotation", "pattern", "labelskew", "labelperm", "outliers"):
        return [c // 4 + (g < c % 4) for g in range(4)]
    if pop == "unequal":
        big = [c // 2, c // 4, c // 8]
        rest = c - sum(big)
        small = [3] * (rest // 3)
        small[-1] += rest - 3 * len(small) if small else 0
        return big + small if small else big[:2] + [c - big[0] - big[1]]
    if pop == "mixed":
        s = [int(round(f * c)) for f in (0.4, 0.3, 0.2)]
        return s + [c - sum(s)]
    return [c]


def _rot(x, k):
    return np.ascontiguousarray(np.rot90(x, k=k, axes=(1, 2)))


def population(pop: str, clients: int, seed: int, source: str = "fmnist",
               per_client: int = 64, test: int = 8) -> FederatedData:
    """A population with known groups (module docstring); ``group`` holds the truth."""
    ds = load_source(SOURCES[source])
    x_all = np.asarray(ds.x_train, np.float32)
    y_all = np.asarray(ds.y_train, np.int64)
    rng = np.random.default_rng(1000 + seed)
    shape = x_all.shape[1:]
    if pop == "paper":
        clients, per_client = 12, 300
    n_out = max(1, int(round(0.05 * clients))) if pop == "outliers" else 0
    sizes = _group_sizes("rotation" if pop == "paper" else pop, clients - n_out)
    g_count = len(sizes)
    group = rng.permutation(np.repeat(np.arange(g_count), sizes))
    perm = rng.permutation(len(x_all))
    share = len(x_all) // g_count if pop not in SINGLE else len(x_all)
    pools, weights = [], []
    kinds = {"rotation": "rot", "unequal": "pat", "outliers": "rot", "pattern": "pat",
             "paper": "pat", "labelskew": "lab", "iid": "none", "dirichlet": "dir",
             "labelperm": "none"}
    pats = None
    for g in range(g_count):
        rows = perm[g * share:(g + 1) * share] if pop not in SINGLE else perm
        kind = kinds.get(pop) if pop != "mixed" else ("none", "rot", "pat3", "lab")[g]
        x = x_all[rows]
        w = None
        if kind == "rot":
            x = _rot(x, g % 4)
        elif kind in ("pat", "pat3"):
            if pats is None:
                pats = feature_patterns(shape, max(g_count, 2) if pop != "mixed" else 4,
                                        rms=0.15 if kind == "pat" else 0.3,
                                        smooth=7 if shape[0] >= 14 else 3, seed=seed)
            x = np.clip(x + pats[g], 0.0, 1.0)
        elif kind == "lab":
            mix = rng.dirichlet(np.full(10, 0.5))
            w = mix[y_all[rows]]
            w = w / w.sum()
        pools.append(x)
        weights.append(w)
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in pools])])
    n = per_client + test
    idx = np.empty((clients, n), np.int64)
    for i in range(clients - n_out):
        g = group[i]
        size = len(pools[g])
        w = weights[g]
        if pop == "dirichlet":
            mix = rng.dirichlet(np.full(10, 0.3))
            w = mix[y_all[perm]]
            w = w / w.sum()
        idx[i] = offsets[g] + rng.choice(size, n, replace=True, p=w)
    x_pool = np.concatenate(pools)
    group_full = np.concatenate([group, g_count + np.arange(n_out)]).astype(np.int32)
    if n_out:
        own = feature_patterns(shape, max(n_out, 2), rms=0.3,
                               smooth=7 if shape[0] >= 14 else 3, seed=10_000 + seed)
        blocks = []
        base = len(x_pool)
        for k in range(n_out):
            rows = rng.choice(len(x_all), n, replace=False)
            blocks.append(np.clip(x_all[rows] + own[k], 0.0, 1.0))
            idx[clients - n_out + k] = base + k * n + np.arange(n)
        x_pool = np.concatenate([x_pool, *blocks])
    return FederatedData(
        x=jnp.asarray(x_pool), y=jnp.zeros(len(x_pool), jnp.int32),
        train_idx=jnp.asarray(idx[:, :per_client], jnp.int32),
        train_count=jnp.full(clients, per_client, jnp.int32),
        test_idx=jnp.asarray(idx[:, per_client:], jnp.int32),
        test_count=jnp.full(clients, test, jnp.int32),
        group=jnp.asarray(group_full), num_classes=10, name=f"{source}/{pop}")


# --------------------------------------------------------------------------------------------
# cells
# --------------------------------------------------------------------------------------------


def cell_name(source, pop, clients, seed, network):
    c = 12 if pop == "paper" else clients
    return f"{source}_{pop}_{c}_{network}_s{seed}"


def rnd_config(pop: str, clients: int, network: str):
    """The discovery settings of a cell: library defaults, with ``network`` ``"mlp"``,
    ``"conv"`` or ``"<kind>-pool<k>"`` (the pair on images average-pooled by ``k``,
    ``RNDConfig.input_pool``), optionally ending in ``-s<n>``: at least ``n`` predictor
    steps instead of the default 300 (``RNDConfig.min_steps``), e.g. ``conv-pool2-s100``."""
    from fedrnd.rnd import RNDConfig

    if pop == "paper":
        return RNDConfig(network="conv", steps=400)
    network, _, steps = network.partition("-s")
    kind, _, pool = network.partition("-pool")
    extra = {"min_steps": int(steps)} if steps else {}
    return RNDConfig(network=kind, input_pool=int(pool or 1),
                     candidates=32 if clients >= 5000 else None, **extra)


def run_cell(source, pop, clients, seed, network, force=False) -> Path:
    from fedrnd.rnd import discover

    path = CELLS / (cell_name(source, pop, clients, seed, network) + ".npz")
    if path.exists() and not force:
        return path
    cfg = rnd_config(pop, clients, network)
    t0 = time.perf_counter()
    data = population(pop, clients, seed, source)
    build_s = time.perf_counter() - t0
    load0 = os.getloadavg()[0]
    w0, c0 = time.perf_counter(), time.process_time()
    disc = discover(data, cfg, key=jax.random.key(seed))
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    meta = {"source": source, "population": pop, "clients": int(data.num_clients),
            "seed": seed, "network": "conv" if pop == "paper" else network,
            "config": repr(cfg), "wall_s": wall,
            "cpu_s": cpu, "build_s": build_s, "timings": disc.timings,
            "cpu_timings": disc.cpu_timings, "federations": disc.num_federations,
            "bytes_up_mean": float(np.mean(disc.bytes_up)),
            "bytes_down_mean": float(np.mean(disc.bytes_down)),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "load_before": load0, "load_after": os.getloadavg()[0],
            "machine": f"{platform.machine()} {os.cpu_count()} cpus", "jax": jax.__version__,
            "date": _dt.date.today().isoformat(),
            "command": "python experiments/discovery/suite.py run"}
    arrays = {"group": np.asarray(data.group), "federation": disc.federation,
              "self_novelty": disc.self_novelty, "self_std": disc.self_std,
              "count": disc.probe_count}
    if disc.scores is not None:
        arrays.update(scores=disc.scores.astype(np.float32),
                      second=disc.second.astype(np.float32))
    else:
        arrays.update(src=np.asarray(disc.edges.src), dst=np.asarray(disc.edges.dst),
                      edge_scores=disc.edge_scores.astype(np.float32),
                      edge_second=disc.second.astype(np.float32))
    CELLS.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, meta=json.dumps(meta), **arrays)
    os.replace(tmp, path)
    return path


def load_cell(path: Path) -> tuple[dict, dict]:
    z = np.load(path)
    meta = json.loads(str(z["meta"]))
    return meta, {k: z[k] for k in z.files if k != "meta"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--scales", default="200,1000")
    r.add_argument("--seeds", default="0,1,2")
    r.add_argument("--only", default=",".join(POPULATIONS))
    r.add_argument("--data", default="fmnist")
    r.add_argument("--network", default="mlp")
    r.add_argument("--force", action="store_true")
    sub.add_parser("report")
    a = p.parse_args(argv)
    if a.cmd == "report":
        from report import write_report  # noqa: PLC0415  (sibling script)

        print(write_report())
        return
    for source in a.data.split(","):
        for clients in (int(s) for s in a.scales.split(",")):
            for pop in a.only.split(","):
                if pop == "paper" and clients != 12:
                    continue
                if pop != "paper" and clients == 12:
                    continue
                for seed in (int(s) for s in a.seeds.split(",")):
                    t = time.perf_counter()
                    path = run_cell(source, pop, clients, seed, a.network, a.force)
                    meta, arr = load_cell(path)
                    from sklearn.metrics import adjusted_rand_score

                    ari = adjusted_rand_score(arr["group"], arr["federation"])
                    print(f"{path.name}: {meta['federations']} federations, ARI {ari:.3f}, "
                          f"{meta['cpu_s']:.0f} CPU s, {meta['wall_s']:.0f} s wall "
                          f"({time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
