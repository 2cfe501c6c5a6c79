"""How ``eps="auto"`` decides: the silhouette criterion (:func:`fedrnd.rnd.auto_eps`) against
the largest-gap rule (:func:`fedrnd.rnd.gap_eps`) and fixed tolerances, on stored novelty
matrices.

Matrices: the 12-client Fashion-MNIST cells of ``run.py`` that keep ``S`` (discovery grid,
paper setup, label-permutation control) and populations generated here (Gaussian mixtures,
digits, Fashion-MNIST with 200 and 1,000 clients), each discovered once and cached as
``cells/auto_eps/<name>.npz`` (``S``, per-example self-novelty spread, true groups). The
1,000-client caches are not committed (4 MB each): a re-run recomputes them (minutes).
Writes ``AUTO_EPS.md`` beside this file.

    python experiments/rnd/auto_eps.py            # all populations
    python experiments/rnd/auto_eps.py --quick    # Gaussian only (the test)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _gaussian(groups, seed, sep):
    """Clients of group ``g`` draw ``x = m_y + shift_g + N(0, I)`` (6-dim, 3 classes)."""
    from fedrnd.data import Dataset, Partition, build_federated
    groups = np.asarray(groups, np.int32)
    rs = np.random.default_rng(seed)
    shift = rs.normal(size=(8, 6))
    shift *= sep / np.linalg.norm(shift, axis=1, keepdims=True)
    means = 2.0 * rs.normal(size=(3, 6))
    c, n = len(groups), 40

    def draw(m):
        g = np.repeat(groups, m)
        y = rs.integers(0, 3, c * m)
        return (means[y] + shift[g] + rs.normal(size=(c * m, 6))).astype(np.float32), \
            y.astype(np.int32)

    xtr, ytr = draw(n)
    xte, yte = draw(10)
    part = Partition([np.arange(i * n, (i + 1) * n) for i in range(c)],
                     [np.arange(i * 10, (i + 1) * 10) for i in range(c)], groups)
    return build_federated(Dataset(xtr, ytr, xte, yte, 3, "gaussian"), part)


def populations(quick: bool):
    """``(name, thunk -> (data, groups), RNDConfig options)``."""
    out = []
    for c in (8, 20, 60):
        for s in range(3):
            out.append((f"gauss-iid-{c}-s{s}", lambda c=c, s=s: (_gaussian([0] * c, s, 4.0),
                                                                 [0] * c),
                        dict(network="mlp", steps=300)))
    for sizes in ((10, 5, 3), (15, 15, 15, 15), (30, 6), (2, 2, 2, 2)):
        for s in range(2):
            def make(sizes=sizes, s=s):
                g = np.random.default_rng(s).permutation(np.repeat(np.arange(len(sizes)), sizes))
                return _gaussian(g, s, 4.0), g
            out.append((f"gauss-groups-{'-'.join(map(str, sizes))}-s{s}", make,
                        dict(network="mlp", steps=300)))
    if quick:
        return out
    from fedrnd.data import build_federated
    from fedrnd.data.partition import make_partition
    from fedrnd.data.sources import digits, fashion_mnist

    def part(src, name, c, seed, **kw):
        def make():
            ds = src()
            p = make_partition(name, ds, c, seed, **kw)
            return build_federated(ds, p), p.group
        return make

    for name, c, kw in (("iid", 20, {}), ("iid", 60, {}), ("feature_pattern", 20,
                                                        dict(num_groups=4)),
                        ("rotation", 20, dict(num_groups=2)),
                        ("feature_pattern", 60, dict(num_groups=3))):
        for s in range(2):
            out.append((f"digits-{name}-{c}-s{s}", part(digits, name, c, s, **kw),
                        dict(steps=300, batch_size=32)))
    uneq = {200: [80, 60, 40, 20], 1000: [400, 300, 200, 100]}
    for c, nets in ((200, ("mlp", "conv")), (1000, ("mlp",))):
        for name in ("iid", "feature_pattern", "rotation"):
            kw = (dict(sizes=[60] * c) if name == "iid"
                  else dict(num_groups=4, group_sizes=uneq[c]))
            for net in nets:
                out.append((f"fmnist-{name}-{c}-{net}", part(fashion_mnist, name, c, 0, **kw),
                            dict(network=net, steps=300 if net == "mlp" else 150,
                                 probe_cap=10)))
    return out


def stored_cells():
    """12-client matrices kept by run.py's cells."""
    out = []
    for f in sorted((HERE / "cells").glob("grid/*/*/seed*.json")) + \
            sorted((HERE / "cells").glob("paper/*/sim/seed*.json")):
        d = json.loads(f.read_text())
        if "scores" not in d:
            continue
        g = np.asarray(d["group"])
        if "labelperm" in str(f):
            g = np.zeros_like(g)  # one input distribution: RND should keep it whole
        out.append((str(f.relative_to(HERE / "cells")).removesuffix(".json"),
                    np.asarray(d["scores"]), np.asarray(d.get("self_std", np.zeros(len(g)))), g))
    return out


def generated(cache: Path, quick: bool):
    import jax

    from fedrnd.rnd import RNDConfig, discover
    cache.mkdir(parents=True, exist_ok=True)
    out = []
    from fedrnd.driver.sweep import CellCache

    for name, make, opts in populations(quick):
        f = cache / f"{name}.npz"
        # As CellCache: a matrix is valid only for the key it was computed from (a file
        # written before the key was stored is accepted, as CellCache(legacy=True) does).
        cfg = RNDConfig(criterion="eps", eps=1.0, **opts)
        key = CellCache.key_hash({"name": name, "config": dataclasses.asdict(cfg), "seed": 0})
        stale = f.exists() and str(np.load(f).get("key", key)) != key
        if not f.exists() or stale:
            data, g = make()
            # The eps criterion (training probes), as the matrices were measured with.
            d = discover(data, cfg, key=jax.random.key(0))
            tmp = f.with_suffix(".tmp.npz")
            np.savez_compressed(tmp, S=np.asarray(d.scores, np.float32),
                                self_std=np.asarray(d.self_std, np.float32),
                                group=np.asarray(g, np.int32), key=np.asarray(key))
            os.replace(tmp, f)  # atomic: a killed run leaves the old matrix or none
            print(f"  discovered {name}", flush=True)
        z = np.load(f)
        out.append((name, z["S"], z["self_std"], z["group"]))
    return out


def evaluate(name, s, self_std, group):
    from sklearn.metrics import adjusted_rand_score

    from fedrnd.rnd import RNDConfig, auto_eps, federations_from_scores, gap_eps

    def decide(eps):
        # The paper's rule with sigma row and the mutual rule, as discover(criterion="eps").
        return federations_from_scores(np.asarray(s, np.float32),
                                       RNDConfig(criterion="eps", eps=eps, sigma="row"),
                                       self_std=self_std)

    auto = decide("auto")
    _, best = auto_eps(auto.z, return_score=True, min_silhouette=-np.inf)
    off = auto.z.copy()
    np.fill_diagonal(off, np.inf)
    row = {"name": name, "clients": len(group), "groups": int(len(np.unique(group))),
           "silhouette": float(best)}
    for key, e in (("auto", "auto"), ("gap", gap_eps(off)), ("0.5", 0.5), ("1.0", 1.0)):
        lab = (auto if key == "auto" else decide(e)).federation
        row[key] = {"ari": float(adjusted_rand_score(group, lab)) if row["groups"] > 1
                    else float(lab.max() == 0), "federations": int(lab.max()) + 1}
    return row


def report(rows, out: Path) -> None:
    def ok(r, k):
        return r[k]["ari"] == 1.0

    one = [r for r in rows if r["groups"] == 1]
    grp = [r for r in rows if r["groups"] > 1]
    lines = ["# eps = \"auto\": silhouette vs largest gap vs fixed eps", "",
             "Generated by `python experiments/rnd/auto_eps.py`. Do not edit by hand.", "",
             f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} "
             f"cores; {datetime.date.today().isoformat()}",
             "- normalised scores with sigma row, training probes, mutual rule; exact = the "
             "true groups recovered (ARI 1) or, for one input distribution (IID and the "
             "label-permutation control), one federation kept", "",
             "| criterion | one distribution kept whole | grouped recovered exactly | mean ARI "
             "(grouped) |", "|---|---|---|---|"]
    for k, label in (("auto", "auto (silhouette >= 0.5)"), ("gap", "largest gap (gap_eps)"),
                     ("0.5", "fixed 0.5"), ("1.0", "fixed 1.0")):
        mean = np.mean([r[k]["ari"] for r in grp]) if grp else float("nan")
        lines.append(f"| {label} | {sum(ok(r, k) for r in one)}/{len(one)} | "
                     f"{sum(ok(r, k) for r in grp)}/{len(grp)} | {mean:.3f} |")
    if one:
        lines += ["", f"Best silhouette on one-distribution matrices: at most "
                      f"{max(r['silhouette'] for r in one):.2f}; on grouped matrices recovered "
                      f"exactly at their best cut: from "
                      f"{min([r['silhouette'] for r in grp if ok(r, 'auto')] or [np.nan]):.2f}."]
    lines += ["", "| matrix | clients | groups | best silhouette | auto ARI (feds) | gap ARI "
                  "(feds) | eps 0.5 | eps 1.0 |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = " | ".join(f"{r[k]['ari']:.2f} ({r[k]['federations']})"
                           for k in ("auto", "gap", "0.5", "1.0"))
        lines.append(f"| {r['name']} | {r['clients']} | {r['groups']} | "
                     f"{r['silhouette']:.2f} | {cells} |")
    out.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="Gaussian populations only")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args(argv)
    mats = ([] if args.quick else stored_cells()) + generated(
        args.out / "cells" / "auto_eps", args.quick)
    rows = [evaluate(*m) for m in mats]
    report(rows, args.out / "AUTO_EPS.md")
    print(f"wrote {args.out / 'AUTO_EPS.md'} ({len(rows)} matrices)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
