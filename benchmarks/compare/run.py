"""Peer comparison: one FedAvg workload in fedrnd and in the peers installed, in one run.

Workloads (``--model``): ``mlp`` (default; ``benchmarks/throughput.py``'s): ``--clients``
(1000) clients x ``--samples`` (64) examples of 784 features, MLP 784-200-200-10. ``cnn``:
fedrnd's built-in ``cnn`` as the RND paper's task CNN (conv 5x5 8, conv 5x5 16, each ReLU +
2x2 max pool, dense 64, 10 outputs) on 28x28x1 images; ``lenet``: the same family at LeNet-5's
size (conv 5x5 6, conv 5x5 16, dense 120). The CNNs train on Fashion-MNIST IID over clients
when it is installed (``--data auto``), else on the MLP's synthetic examples reshaped to
28x28x1. All: batch 16, one local epoch of plain SGD (lr 0.05), every client every round,
FedAvg (sample-weighted mean, server lr 1); ``--rounds`` rounds (6), the first a warm-up.
fedrnd builds the data, initial weights and every client's batch order; all of it is exported
to numpy (:mod:`benchmarks.compare.harness`) and each peer (:mod:`benchmarks.compare.peers`: a
numpy loop, a PyTorch loop, pfl-research, Flower) trains from the same arrays. A peer that is
not installed is skipped with a message; fedrnd's low-rank path is skipped for the CNNs.

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
    python benchmarks/compare/run.py --model cnn --json cnn.json  # the CNN workload
    python benchmarks/compare/run.py --model cnn --devices 2      # one host device per core
    python benchmarks/compare/run.py --model lenet --torch-device cuda   # torch on the GPU
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
    ap.add_argument("--model", type=str, default="mlp", choices=("mlp", *harness.CNN_PRESETS),
                    help="mlp (784-200-200-10 on synthetic vectors), cnn (conv8-conv16-dense64)"
                         " or lenet (conv6-conv16-dense120) on 28x28x1 images")
    ap.add_argument("--hidden", type=str, default="200,200",
                    help="hidden layer widths (--model mlp)")
    ap.add_argument("--data", type=str, default="auto", choices=("auto", "fashion", "synthetic"),
                    help="images of the CNN workloads: Fashion-MNIST IID over clients, the MLP's"
                         " synthetic examples as 28x28x1, or auto = Fashion-MNIST when "
                         "installed, else synthetic")
    ap.add_argument("--fedrnd", type=str, default="general,lowrank",
                    help="fedrnd engine paths to run (general = vmapped/chunked, lowrank = "
                         "the exact low-rank fast path)")
    ap.add_argument("--chunk-size", type=int, default=None,
                    help="fedrnd general path: clients per chunk (default: backend default)")
    ap.add_argument("--devices", type=int, default=1,
                    help="fedrnd on a CPU: split the client axis over this many host devices "
                         "(XLA's --xla_force_host_platform_device_count, one per core), each "
                         "training its share of the clients on one thread; 1 = one device "
                         "whose operations use XLA's thread pool")
    ap.add_argument("--peers", type=str, default=",".join(peers.RUNNERS),
                    help=f"peers to run, of {', '.join(peers.RUNNERS)} (missing ones skip)")
    ap.add_argument("--acc-tol", type=float, default=0.005,
                    help="largest test-accuracy difference to fedrnd that counts as agreeing")
    ap.add_argument("--param-tol", type=float, default=1e-3,
                    help="largest relative L2 parameter difference to fedrnd that agrees")
    ap.add_argument("--flower-cpus", type=int, default=None,
                    help="Ray CPUs = Flower actors (default: all cores)")
    ap.add_argument("--torch-device", type=str, default="cpu",
                    help="where the PyTorch loop peer runs: cpu, or cuda (a GPU; see "
                         "peers.TORCH_DEVICE_NOTE)")
    ap.add_argument("--precision", type=str, default="float32", choices=("float32", "tf32"),
                    help="matmul / convolution precision on a GPU: float32 (JAX's default "
                         "matmul precision set to float32, PyTorch's TF32 off) or tf32 (JAX's "
                         "own default on recent NVIDIA GPUs, PyTorch's TF32 on); CPUs compute "
                         "float32 either way")
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
    if args.model != "mlp" and "general" not in paths:
        ap.error(f"--model {args.model} runs on fedrnd's general path only (the low-rank path "
                 f"takes dense stacks): --fedrnd must include general")

    if args.devices < 1 or args.clients % args.devices:
        ap.error(f"--devices must be >= 1 and divide --clients ({args.clients}), got "
                 f"{args.devices}")
    if args.devices > 1 and "jax" not in sys.modules:
        flag = f"--xla_force_host_platform_device_count={args.devices}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()

    import jax

    if len(jax.devices()) < args.devices:
        ap.error(f"--devices {args.devices}: JAX sees {len(jax.devices())} device(s); on a CPU "
                 f"start the process with XLA_FLAGS=--xla_force_host_platform_device_count="
                 f"{args.devices} (run.py sets it when it imports JAX first)")
    if args.precision == "float32" and jax.default_backend() != "cpu":
        # JAX computes float32 dots and convolutions in TF32 on recent NVIDIA GPUs by default;
        # the PyTorch loop has TF32 off: same arithmetic on both sides.
        jax.config.update("jax_default_matmul_precision", "float32")
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    data, model, spec, init_key, keys = harness.fedrnd_setup(
        args.clients, args.samples, args.test_samples, args.rounds, args.batch, args.seed,
        hidden, model=args.model, data=args.data)
    w = harness.export_workload(data, model, spec, init_key, keys, args.lr, args.seed)
    build_s = time.perf_counter() - t0
    info = {"date": _dt.datetime.now().isoformat(timespec="minutes"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {platform.platform()}",
            "versions": _versions(), "loadavg_start": load0,
            "workload": {"clients": w.clients, "samples": args.samples,
                         "test_examples": int(w.y_test.shape[0]), "dims": w.dims,
                         "batch": w.batch, "steps": w.steps, "rounds": w.rounds, "lr": w.lr,
                         "seed": args.seed, **({} if w.model == "mlp" else {
                             "model": args.model, "architecture": w.architecture,
                             "feature_shape": w.feature_shape, "data": w.data,
                             "param_shapes": w.param_shapes,
                             "num_params": int(sum(k.size + b.size for k, b in w.init))})},
            "torch_device": args.torch_device, "fedrnd_devices": args.devices, "precision": args.precision,
            "backend": jax.default_backend(),
            "build_s": build_s}
    v = info["versions"]
    print(f"peer comparison | {info['date']} | {info['machine']} | JAX backend "
          f"{info['backend']}, PyTorch loop on {args.torch_device}, precision {args.precision}")
    print("versions: " + ", ".join(f"{k} {x}" for k, x in v.items() if x))
    print(f"workload: {w.clients} clients x {args.samples} examples, {w.architecture}"
          f"{f' ({args.model})' if w.model == 'cnn' else ''}, data {w.data}, "
          f"batch {w.batch} ({w.steps} SGD steps, lr {w.lr}), "
          f"FedAvg, {w.rounds} rounds (first = warm-up); built and exported in {build_s:.1f} s")
    print(f"load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} "
          f"(1/5/15 min; other processes on the machine slow every run)", flush=True)

    results: list[harness.Result] = []
    for p in paths:
        r = harness.run_fedrnd(data, model, spec, init_key, keys, args.lr, path=p,
                               chunk_size=args.chunk_size, devices=args.devices)
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
                                   log_dir=log_dir, torch_device=args.torch_device,
                                   tf32=args.precision == "tf32")
            results.append(r)
            _progress(r)
    for r in results:
        if r.ok:
            r.test_acc = harness.accuracy(r.layers, w.x_test, w.y_test)

    ref = next(r for r in results if r.ok)  # the first fedrnd run that ran
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
