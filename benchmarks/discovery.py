"""Speed of RND federation discovery: the whole pipeline, phase by phase, on Fashion-MNIST.

Workload: ``--clients`` clients (1000) with ``--per-client`` training images (64) each, from
Fashion-MNIST with the RND paper's feature-pattern shift: ``--groups`` hidden groups (4, equal
sizes, clients in a random order), group ``g`` sees ``clip(x + pattern_g, 0, 1)`` with smooth,
equidistant patterns of per-pixel RMS ``--rms`` (0.15, the paper's value;
:func:`fedrnd.data.feature_patterns`). Each group draws its images from its own quarter of the
60,000 training images, so clients share images only when ``clients x per_client`` exceeds
60,000 (a 10,000-client population reuses each image about 10 times within its group).

``--network mlp`` is the MLP pair (target 784-256-256-64, predictor 784-32-64), ``conv`` the
authors' conv pair (target channels 32/64, predictor 2/4, max pool after the first
convolution, adaptive average pool to 4x4, 64 outputs). Predictors train with Adam 1e-3,
batch 128, ``--epochs`` (the paper's 10) or ``--steps``; with 64 images an epoch is one step. ``--probe-cap`` scores on at most that many of each
client's images; ``--candidates k`` runs the two-stage mode (each client scores its ``k``
fingerprint candidates, ``RNDConfig.candidates``); ``--sparse-degree d`` scores only a random graph in which every client scores
about ``d`` random peers, both ways (sparse mode), instead of the whole ``C x C``
matrix.

Reported (one JSON line; ``--json PATH`` also writes it to a file): wall seconds of the whole
:func:`fedrnd.rnd.discover` call, the first one (compilation included) and the median / min of
``--repeat`` later ones, with per-phase seconds (``Discovery.timings``: split, target, train,
self, scores, federations); process CPU seconds; pair evaluations per second, where a *pair* is
one entry ``S[i, j]`` (``C^2`` dense, edges sparse) and an *evaluation* is one predictor applied
to one probe image (``pairs x probes``), both over the ``scores`` phase (and evaluations per
process CPU second, ``Discovery.cpu_timings``, the figure to compare under outside load); peak memory (process
``ru_maxrss``, which includes the data set); the criterion (``--criterion``, the library's
default ``test`` or the paper's ``eps`` rule), federations found and ARI / NMI against the true
groups, ``eps`` and ``auto_silhouette`` under the eps criterion (``null`` otherwise), and with
``--ari-eps`` the ARI of the paper's eps rule at fixed tolerances, from the same scores
(:func:`fedrnd.rnd.federations_from_scores`); the load average before and after (other jobs share the CPU: compare ``cpu_s`` when the
load is high); machine, jax version and date.

Usage::

    python benchmarks/discovery.py                                   # MLP, 1000 clients
    python benchmarks/discovery.py --input-pool 2                    # the MLP pair on 14x14
    python benchmarks/discovery.py --network conv --probe-cap 10
    python benchmarks/discovery.py --network conv --clients 200 --rms 0.5 --ari-eps 0.5,1
    python benchmarks/discovery.py --clients 10000 --sparse-degree 20
    python benchmarks/discovery.py --generic                         # the reference path
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import sys
import time

if __package__ in (None, ""):  # run as a script from anywhere in the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fedrnd.data import FederatedData, fashion_mnist, feature_patterns  # noqa: E402
from fedrnd.engine import EdgeList  # noqa: E402
from fedrnd.rnd import (  # noqa: E402
    DISCOVERY_CRITERIA,
    RNDConfig,
    discover,
    federations_from_scores,
)


def population(clients: int, per_client: int, groups: int = 4, rms: float = 0.15,
               seed: int = 0, data_dir: str | None = None) -> FederatedData:
    """Feature-pattern Fashion-MNIST clients with known groups (see the module docstring)."""
    if clients < 1 or per_client < 1 or groups < 1:
        raise ValueError(f"clients, per_client and groups must be >= 1, got {clients}, "
                         f"{per_client}, {groups}")
    ds = fashion_mnist(data_dir)
    rng = np.random.default_rng(seed)
    x = np.asarray(ds.x_train, np.float32)
    share = len(x) // groups
    if per_client > share:
        raise ValueError(f"per_client={per_client} exceeds the {share} images of a group")
    perm = rng.permutation(len(x))
    pats = feature_patterns(x.shape[1:], groups, rms=rms, seed=seed)
    group = rng.permutation(np.arange(clients) % groups).astype(np.int32)
    idx = np.empty((clients, per_client), np.int32)
    blocks, start = [], 0
    for g in range(groups):
        members = np.flatnonzero(group == g)
        used = min(share, len(members) * per_client)  # only images some client holds
        src = perm[g * share:g * share + used]
        blocks.append(np.clip(x[src] + pats[g], 0.0, 1.0))
        # Consecutive windows of the group's images: disjoint until they run out, then reused.
        rows = np.arange(len(members) * per_client) % max(used, 1) + start
        idx[members] = rows.reshape(len(members), per_client)
        start += used
    pool = np.concatenate(blocks)
    one = np.zeros((clients, 1), np.int32)
    return FederatedData(x=jnp.asarray(pool), y=jnp.zeros(len(pool), jnp.int32),
                         train_idx=jnp.asarray(idx),
                         train_count=jnp.full(clients, per_client, jnp.int32),
                         test_idx=jnp.asarray(one), test_count=jnp.ones(clients, jnp.int32),
                         group=jnp.asarray(group), num_classes=10,
                         name=f"fashion_mnist/feature_pattern(k={groups},rms={rms:g})")


def random_graph(clients: int, degree: int, seed: int = 0) -> EdgeList:
    """A random undirected graph, both directions listed: every client picks ``degree // 2``
    distinct random peers (``degree`` rounded up to even), so in-degrees are about ``degree``
    and every scored pair is scored both ways (the mutual rule needs both)."""
    half = -(-degree // 2)
    if not 1 <= half < clients:
        raise ValueError(f"sparse degree must be in [1, {2 * (clients - 1)}], got {degree}")
    rng = np.random.default_rng(seed)
    # Distinct nonzero offsets per client: no self-loops, no repeated peer.
    offs = np.stack([rng.choice(clients - 1, half, replace=False) + 1 for _ in range(clients)])
    a = np.repeat(np.arange(clients), half)
    b = (a + offs.ravel()) % clients
    pairs = np.unique(np.stack([np.concatenate([a, b]), np.concatenate([b, a])], 1), axis=0)
    return EdgeList(jnp.asarray(pairs[:, 0], jnp.int32), jnp.asarray(pairs[:, 1], jnp.int32),
                    jnp.ones(len(pairs), jnp.float32))


def federations_at(res, eps: float) -> np.ndarray:
    """The federations ``res`` would give under the paper's eps rule with a fixed ``eps`` (same
    scores, sigma and rule; :func:`fedrnd.rnd.federations_from_scores`, criterion ``"eps"``)."""
    cfg = dataclasses.replace(res.config, criterion="eps", eps=float(eps))
    if res.scores is not None:
        return federations_from_scores(res.scores, cfg, self_std=res.self_std).federation
    return federations_from_scores(
        res.edge_scores, cfg, s_self=res.self_novelty, self_std=res.self_std,
        edges=(np.asarray(res.edges.src), np.asarray(res.edges.dst)),
        num_clients=res.num_clients).federation


def _finite(v) -> float | None:
    return float(v) if v is not None and np.isfinite(v) else None


def _machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "backend": jax.default_backend(),
            "device": str(jax.devices()[0]), "jax": jax.__version__,
            "python": platform.python_version()}


def run(args: argparse.Namespace) -> dict:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    data = population(args.clients, args.per_client, args.groups, args.rms, args.seed,
                      args.data_dir)
    data_s = time.perf_counter() - t0
    edges = (random_graph(args.clients, args.sparse_degree, args.seed)
             if args.sparse_degree else None)
    cfg = RNDConfig(criterion=args.criterion, network=args.network, probe_cap=args.probe_cap,
                    input_pool=args.input_pool, fused=not args.generic,
                    min_steps=args.min_steps or None,
                    seed=args.seed, epochs=args.epochs, steps=args.steps,
                    candidates=args.candidates or None)
    runs, res = [], None
    for _ in range(1 + args.repeat):
        res = None  # the previous result is not part of this run's peak memory
        c0, w0 = time.process_time(), time.perf_counter()
        res = discover(data, cfg, edges=edges)
        runs.append({"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0,
                     "phases": dict(res.timings), "cpu_phases": dict(res.cpu_timings)})
    groups = np.asarray(data.group)
    probes = np.minimum(np.asarray(data.train_count), args.probe_cap or np.inf)
    if res.edges is None:
        pairs = args.clients ** 2
        evals = float(probes.sum()) * args.clients
    else:
        pairs = int(res.edge_scores.shape[0])
        evals = float(probes[np.asarray(res.edges.dst)].sum())
    warm = runs[1:] or runs
    scores_s = statistics.median(r["phases"]["scores"] for r in warm)
    scores_cpu = statistics.median(r["cpu_phases"]["scores"] for r in warm)
    whole = [r["wall_s"] for r in warm]
    out = {
        "benchmark": "discovery",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "clients": args.clients, "per_client": args.per_client, "network": args.network,
        "probe_cap": args.probe_cap, "input_pool": args.input_pool,
        "sparse_degree": args.sparse_degree, "candidates": args.candidates or None,
        "epochs": args.epochs, "steps": args.steps,
        "path": "generic" if args.generic else "fused", "groups": args.groups, "rms": args.rms,
        "first_s": runs[0]["wall_s"],
        "whole_s": statistics.median(whole), "whole_min_s": min(whole),
        "cpu_s": statistics.median(r["cpu_s"] for r in warm),
        "phases_s": {k: statistics.median(r["phases"][k] for r in warm)
                     for k in warm[0]["phases"]},
        "cpu_phases_s": {k: statistics.median(r["cpu_phases"][k] for r in warm)
                         for k in warm[0]["cpu_phases"]},
        "first_phases_s": runs[0]["phases"],
        "pairs": pairs, "evals": evals,
        "pairs_per_s": pairs / scores_s, "evals_per_s": evals / scores_s,
        "evals_per_cpu_s": evals / scores_cpu,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "data_s": data_s,
        "criterion": cfg.criterion, "federations": res.num_federations,
        # The eps criterion's tolerance and auto silhouette; None under the test criterion
        # (no eps) or where undefined, so the line stays strict JSON.
        "eps": _finite(res.eps), "auto_silhouette": _finite(res.auto_silhouette),
        "min_steps": cfg.min_steps,
        "ari": float(adjusted_rand_score(groups, res.federation)),
        "nmi": float(normalized_mutual_info_score(groups, res.federation)),
        "ari_at_eps": {str(e): float(adjusted_rand_score(groups, federations_at(res, e)))
                       for e in args.ari_eps},
        "load_before": [round(v, 2) for v in load_before],
        "load_after": [round(v, 2) for v in os.getloadavg()],
        "runs": runs, **_machine(),
    }
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--per-client", type=int, default=64)
    p.add_argument("--network", choices=["mlp", "conv"], default="mlp")
    p.add_argument("--probe-cap", type=int, default=None)
    p.add_argument("--input-pool", type=int, default=1,
                   help="average-pool images by this factor before the pair (RNDConfig.input_pool)")
    p.add_argument("--candidates", type=int, default=0,
                   help="two-stage discovery: score each client's k fingerprint candidates "
                        "(RNDConfig.candidates; the library's setting at 10,000 clients is 32) "
                        "instead of every pair (0: dense)")
    p.add_argument("--sparse-degree", type=int, default=0,
                   help="score about d random peers per client, both ways, not all (0: dense)")
    p.add_argument("--repeat", type=int, default=1,
                   help="timed runs after the first (which includes compilation)")
    p.add_argument("--epochs", type=int, default=10, help="predictor epochs (the paper's 10)")
    p.add_argument("--steps", type=int, default=None,
                   help="predictor Adam steps instead of epochs (64 images, batch 128: one "
                        "epoch is one step)")
    p.add_argument("--min-steps", type=int, default=300,
                   help="train at least this many steps when the epochs come to fewer "
                        "(RNDConfig.min_steps, library default 300; 0 = the paper's schedule "
                        "as is)")
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--rms", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--criterion", choices=list(DISCOVERY_CRITERIA),
                   default=RNDConfig.criterion,
                   help="discovery criterion (RNDConfig.criterion; 'eps' is the paper's rule "
                        "with eps auto)")
    p.add_argument("--generic", action="store_true",
                   help="score with the generic per-predictor apply (the reference path)")
    p.add_argument("--ari-eps", default="",
                   type=lambda v: [float(e) for e in v.split(",") if e.strip()],
                   help="also report the ARI of the paper's eps rule at these fixed eps "
                        "(comma-separated; re-read from the same scores, any criterion)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX files")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    if args.repeat < 0:
        p.error("--repeat must be >= 0")
    out = run(args)
    line = json.dumps(out)
    print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")
    return out


if __name__ == "__main__":
    main()
