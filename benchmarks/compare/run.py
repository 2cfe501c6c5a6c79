"""Peer comparison: the throughput workload in fedrnd and in the peers installed, in one run.

Workload (``benchmarks/throughput.py``'s): ``--clients`` (1000) clients x ``--samples`` (64)
examples of 784 features, MLP 784-200-200-10, batch 16, one local epoch of plain SGD (lr 0.05),
every client every round, FedAvg (sample-weighted mean, server lr 1); ``--rounds`` rounds (6),
the first a warm-up. fedrnd builds the data, initial weights and every client's batch order;
all of it is exported to numpy (:mod:`benchmarks.compare.harness`) and each peer
(:mod:`benchmarks.compare.peers`: a numpy loop, a PyTorch loop, pfl-research, Flower) trains
from the same arrays. A peer that is not installed is skipped with a message.

Printed: the machine, versions and load average; per run, client updates/s (clients / median
round time over the rounds after the first), the first round, setup time, CPU seconds per
round and client updates per CPU second (the processes doing the work), test accuracy of the
final model (one numpy evaluation for all), and its agreement with fedrnd's model (test
accuracy within ``--acc-tol``, parameters within ``--param-tol`` relative L2); then the ratios
of fedrnd's client updates per wall second and per CPU second to each peer's. Exit status 1
when a finished run disagrees.

Usage::

    pip install -e ".[compare]"                 # torch, flwr[simulation], pfl (optional)
    python benchmarks/compare/run.py            # everything installed, ~3-4 min here
    python benchmarks/compare/run.py --peers torch,pfl --fedrnd general --json cmp.json
    python benchmarks/compare/run.py --clients 100 --rounds 3    # a quick check
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script from anywhere in the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))

from benchmarks.compare import harness, peers  # noqa: E402

FEDRND_PATHS = ("general", "lowrank")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("fedrnd", "jax", "jaxlib", "numpy", "torch", "flwr", "ray", "pfl"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _split(spec: str, allowed, what: str) -> list[str]:
    items = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad:
        raise ValueError(f"unknown {what} {bad}; allowed: {', '.join(allowed)}")
    return items


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=64, help="training examples per client")
    ap.add_argument("--test-samples", type=int, default=16, help="test examples per client")
    ap.add_argument("--rounds", type=int, default=6,
                    help="rounds in all, the first a warm-up (>= 2)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=str, default="200,200", help="hidden layer widths")
    ap.add_argument("--fedrnd", type=str, default="general,lowrank",
                    help="fedrnd engine paths to run (general = vmapped/chunked, lowrank = "
                         "the exact low-rank fast path)")
    ap.add_argument("--chunk-size", type=int, default=None,
                    help="fedrnd general path: clients per chunk (default: backend default)")
    ap.add_argument("--peers", type=str, default=",".join(peers.RUNNERS),
                    help=f"peers to run, of {', '.join(peers.RUNNERS)} (missing ones skip)")
    ap.add_argument("--acc-tol", type=float, default=0.005,
                    help="largest test-accuracy difference to fedrnd that counts as agreeing")
    ap.add_argument("--param-tol", type=float, default=1e-3,
                    help="largest relative L2 parameter difference to fedrnd that agrees")
    ap.add_argument("--flower-cpus", type=int, default=None,
                    help="Ray CPUs = Flower actors (default: all cores)")
    ap.add_argument("--threads", type=int, default=1,
                    help="BLAS / PyTorch threads of the numpy, PyTorch and pfl peers and of "
                         "each Flower actor (see peers.THREADS_NOTE)")
    ap.add_argument("--timeout", type=float, default=1800,
                    help="seconds a peer may take before it counts as skipped")
    ap.add_argument("--log-dir", type=str, default=None,
                    help="keep each peer's log here (default: a temporary folder)")
    ap.add_argument("--json", type=str, default=None, help="save everything here")
    args = ap.parse_args(argv)
    try:
        paths = _split(args.fedrnd, FEDRND_PATHS, "fedrnd path")
        names = _split(args.peers, tuple(peers.RUNNERS), "peer")
        hidden = tuple(int(h) for h in args.hidden.split(",") if h.strip())
    except ValueError as e:
        ap.error(str(e))
    if args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    if not paths:
        ap.error("--fedrnd names no path: fedrnd is the reference every peer is checked against")

    load0 = os.getloadavg()
    t0 = time.perf_counter()
    data, model, spec, init_key, keys = harness.fedrnd_setup(
        args.clients, args.samples, args.test_samples, args.rounds, args.batch, args.seed,
        hidden)
    w = harness.export_workload(data, model, spec, init_key, keys, args.lr, args.seed)
    build_s = time.perf_counter() - t0
    info = {"date": _dt.datetime.now().isoformat(timespec="minutes"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {platform.platform()}",
            "versions": _versions(), "loadavg_start": load0,
            "workload": {"clients": w.clients, "samples": args.samples,
                         "test_examples": int(w.y_test.shape[0]), "dims": w.dims,
                         "batch": w.batch, "steps": w.steps, "rounds": w.rounds, "lr": w.lr,
                         "seed": args.seed},
            "build_s": build_s}
    v = info["versions"]
    print(f"peer comparison | {info['date']} | {info['machine']}")
    print("versions: " + ", ".join(f"{k} {x}" for k, x in v.items() if x))
    print(f"workload: {w.clients} clients x {args.samples} examples, MLP "
          f"{'-'.join(map(str, w.dims))}, batch {w.batch} ({w.steps} SGD steps, lr {w.lr}), "
          f"FedAvg, {w.rounds} rounds (first = warm-up); built and exported in {build_s:.1f} s")
    print(f"load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} "
          f"(1/5/15 min; other processes on the machine slow every run)", flush=True)

    results: list[harness.Result] = []
    for p in paths:
        r = harness.run_fedrnd(data, model, spec, init_key, keys, args.lr, path=p,
                               chunk_size=args.chunk_size)
        results.append(r)
        _progress(r)
    del data
    with tempfile.TemporaryDirectory(prefix="fedrnd-compare-") as tmp:
        log_dir = args.log_dir or tmp
        os.makedirs(log_dir, exist_ok=True)
        path = os.path.join(tmp, "workload.npz")
        if names:
            w.save(path)
        for name in names:
            r = peers.run_isolated(name, path, threads=args.threads,
                                   flower_cpus=args.flower_cpus, timeout=args.timeout,
                                   log_dir=log_dir)
            results.append(r)
            _progress(r)
    for r in results:
        if r.ok:
            r.test_acc = harness.accuracy(r.layers, w.x_test, w.y_test)

    ref = results[0]
    agree = harness.agreement(results, ref, args.acc_tol, args.param_tol)
    print()
    print(harness.results_table(results, agree))
    print(f"\nreference: {ref.name}; agrees = test accuracy within {args.acc_tol} and "
          f"parameters within {args.param_tol:g} relative L2 of the reference "
          f"(same data, initial weights and batch order in every run)")
    print()
    print(harness.ratio_table(results))
    print()
    print(harness.ratio_table(results, "updates_per_cpu_s"))
    print("(CPU s: user + system seconds of the processes doing the work, all their threads; "
          "other jobs on the machine inflate wall time far more than CPU time)")
    for r in results:
        if r.ok and r.note:
            print(f"  {r.name}: {r.note}; setup {r.setup_s:.1f} s; load {r.loadavg[0]:.2f} -> "
                  f"{r.loadavg[1]:.2f}")
    load1 = os.getloadavg()
    print(f"load average at end: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    bad = [a.name for a in agree if not a.agrees]
    if bad:
        print(f"DISAGREEMENT: {', '.join(bad)} did not reach fedrnd's model")
    out = {**info, "loadavg_end": load1, "acc_tol": args.acc_tol, "param_tol": args.param_tol,
           "results": [r.summary() for r in results],
           "agreement": [a.__dict__ for a in agree],
           "ratios": {f"{a} / {b}": x for (a, b), x in harness.ratios(results).items()},
           "cpu_ratios": {f"{a} / {b}": x for (a, b), x
                          in harness.ratios(results, "updates_per_cpu_s").items()},
           "all_agree": not bad}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=float)
        print(f"saved {args.json}")
    return out


def _progress(r: harness.Result) -> None:
    if r.ok:
        print(f"  {r.name:<18} {r.updates_per_s:9.1f} client updates/s  (median round "
              f"{r.median_round_s:.3f} s, first {r.round_s[0]:.3f} s)", flush=True)
    else:
        print(f"  {r.name:<18} skipped: {r.skipped}", flush=True)


if __name__ == "__main__":
    sys.exit(0 if main()["all_agree"] else 1)
