"""Throughput of the client engine: FedAvg rounds on a synthetic federated data set.

Workload (the reference throughput workload of ``fedrnd.engine.clientmap.DEFAULT_CHUNK``):
``--clients`` clients (1000) x ``--samples`` examples (64) of 784 features, 10 classes drawn
from Gaussian class means; MLP 784-200-200-10; batch 16; one local epoch of plain SGD
(lr 0.05); every client every round; server SGD with lr 1 (plain FedAvg).

Reported: client updates per second (steady state: clients / median round time over
``--rounds`` timed rounds after the first round), achieved GFLOP/s, compile time, steady round
time (median, min, and the process CPU seconds per round), peak memory (max RSS of each run
from compiling on, the peak being reset there on Linux; device ``memory_stats()`` where the
backend has them), test accuracy of the final global model,
backend, device, jax version, date. ``--sweep`` repeats the measurement for several chunk
sizes; ``--json PATH`` saves everything, per-round times included.

Compile time: ``jit(round).lower(...).compile()`` is timed on its own, and any excess of the
first call through the compiled executable over the steady round time is added
(``compile_s = lower_compile_s + max(0, first_call_s - round_s)``).

``--devices N`` splits the client axis over a mesh of N devices; on a CPU it first creates N
host devices (``--xla_force_host_platform_device_count``), so it must be given on the command
line, not through :func:`main`'s ``argv``.

CPU timings move with other load on the machine (XLA's CPU runtime uses every core for one
round, so a busy core can double the round time); the process CPU seconds per round
(``cpu s``) are the steadier figure when comparing runs.

FLOPs: training FLOPs per round = 3 x (forward FLOPs per example) x (examples processed). The
forward FLOPs come from XLA's cost analysis (``fedrnd.models.count_flops``, multiply-adds count
2) for a batch of ``--batch`` examples divided by the batch; the analytic ``2 x MACs`` of the
dense layers is printed next to it. Padding steps (none here: every client has the same count)
are not counted. These *model* FLOPs (``GFLOP/s``) are what the general path executes; the
low-rank fast path (``--path lowrank``, :mod:`fedrnd.engine.lowrank`) executes a different
count (``exec GF/s``; from ``lowrank.flops``: shared products plus Gram corrections), printed
beside them.

Paths: ``--path auto|general|lowrank`` (or a comma list to compare, e.g. ``general,lowrank``)
sets ``Engine.path``; ``auto`` takes the fast path where it applies and the cost model says it
pays (it does on this workload at one epoch). The fast path runs clients in blocks of its own
and ignores ``--chunk-size``. The load average (``os.getloadavg``) before and after each run is
recorded, since other processes on the machine move CPU timings.

Usage::

    python benchmarks/throughput.py                       # backend default chunk size
    python benchmarks/throughput.py --sweep 1,2,4,8,16,32,all --json sweep.json
    python benchmarks/throughput.py --clients 10000 --rounds 3
    python benchmarks/throughput.py --path general,lowrank       # both paths, same data
"""

from __future__ import annotations

import argparse
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


def _cpu_devices_from_argv(argv: list[str]) -> int | None:
    """``--devices N`` must act before jax is imported (it sets the host device count)."""
    for i, a in enumerate(argv):
        if a == "--devices" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--devices="):
            return int(a.split("=", 1)[1])
    return None


_N_DEV = _cpu_devices_from_argv(sys.argv[1:])
if _N_DEV and _N_DEV > 1 and "xla_force_host_platform_device_count" not in os.environ.get(
        "XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_N_DEV}").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fedrnd.algorithms import FedAvg  # noqa: E402
from fedrnd.data.federated import Dataset, Partition, build_federated  # noqa: E402
from fedrnd.engine import (  # noqa: E402
    ClientMapper,
    Engine,
    LocalSpec,
    client_hparams,
    default_chunk_size,
    lowrank,
    make_mesh,
)
from fedrnd.models import count_flops, make_model  # noqa: E402

FEATURES = 784
CLASSES = 10
HIDDEN = (200, 200)


# --------------------------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------------------------
def synthetic_dataset(clients: int, samples: int, test_per_client: int, seed: int = 0,
                      separation: float = 0.3) -> Dataset:
    """Gaussian class means in 784-d; each example is its class mean plus unit noise.

    ``separation`` is the per-coordinate standard deviation of the class means. At 0.3 the
    classes are separable, but slowly enough learned that accuracy moves over the benchmark's
    rounds (FedAvg here: about 0.1 -> 0.8 test accuracy in 6 rounds), so a broken engine shows.
    """
    rng = np.random.default_rng(seed)
    means = (separation * rng.standard_normal((CLASSES, FEATURES))).astype(np.float32)

    def draw(n):
        y = rng.integers(0, CLASSES, n).astype(np.int32)
        x = means[y] + rng.standard_normal((n, FEATURES), dtype=np.float32)
        return x, y

    x_tr, y_tr = draw(clients * samples)
    x_te, y_te = draw(clients * test_per_client)
    return Dataset(x_tr, y_tr, x_te, y_te, CLASSES, "gaussian-means")


def iid_partition(clients: int, samples: int, test_per_client: int) -> Partition:
    train = [np.arange(c * samples, (c + 1) * samples) for c in range(clients)]
    test = [np.arange(c * test_per_client, (c + 1) * test_per_client) for c in range(clients)]
    return Partition(train, test, np.zeros(clients, np.int32), None, "iid")


def analytic_forward_flops() -> float:
    """``2 x MACs`` of the dense layers for one example (bias adds and ReLUs not counted)."""
    dims = (FEATURES, *HIDDEN, CLASSES)
    return float(sum(2 * a * b for a, b in zip(dims[:-1], dims[1:], strict=False)))


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------
def peak_rss_mib() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def current_rss_mib() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (Linux ``clear_refs``), so a run's own peak can be read."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset_mib() -> float | None:
    """``VmHWM`` (peak RSS since the last :func:`reset_peak_rss`), Linux only."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def device_memory() -> dict | None:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - a backend without the call
        return None
    if not stats:
        return None
    keep = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
    return {k: int(stats[k]) for k in keep if k in stats}


def run_one(data, model, *, chunk_size: int | None, rounds: int, batch: int, lr: float,
            epochs: int, fwd_flops_per_example: float, seed: int = 0, devices: int = 1,
            accuracy: bool = True, path: str = "auto") -> dict:
    """Build FedAvg with ``chunk_size`` and time ``rounds`` steady rounds after a compile round.

    ``chunk_size`` is clients per vmapped chunk *per device*; ``devices > 1`` splits the client
    axis over a mesh of that many devices.
    """
    clients = data.num_clients
    mesh = make_mesh(devices) if devices > 1 else None
    opt, hp = client_hparams(clients, optimizer="sgd", lr=lr)
    engine = Engine(model=model, local=LocalSpec(batch_size=batch, epochs=epochs),
                    optimizer=opt, mapper=ClientMapper(chunk_size=chunk_size, mesh=mesh),
                    path=path)
    fast = engine.use_lowrank(data)
    data = engine.mapper.place_data(data)  # as the driver does: the pool on every device, once
    load_before = os.getloadavg()
    alg = FedAvg(engine=engine, server_opt="sgd", server_lr=1.0)
    state = alg.init(jax.random.key(seed), data, hp)
    step = jax.jit(alg.round)
    keys = jax.random.split(jax.random.key(seed + 1), rounds + 1)
    # From here on (after alg.init, whose input checks copy the data to the host once):
    # compile and rounds only.
    rss_start = current_rss_mib()
    run_peak = reset_peak_rss()

    t0 = time.perf_counter()
    compiled = step.lower(state, data, keys[0]).compile()
    lower_compile_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    state, metrics = compiled(state, data, keys[0])
    jax.block_until_ready((state, metrics))
    first_s = time.perf_counter() - t0

    times, cpu, losses = [], [], [float(metrics["train_loss"])]
    for r in range(1, rounds + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        state, metrics = compiled(state, data, keys[r])
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        losses.append(float(metrics["train_loss"]))

    round_s = statistics.median(times)
    examples = float(np.sum(np.asarray(data.train_count))) * epochs
    train_flops = 3.0 * fwd_flops_per_example * examples
    executed = train_flops
    if fast:
        executed = lowrank.executed_flops(model, engine.local, data.train_idx.shape[1],
                                          clients)["executed"]
    out = {
        "path": path,
        "lowrank": fast,
        "chunk_size": chunk_size,
        "effective_chunk": engine.mapper.chunk,
        "devices": devices,
        "block_rows": lowrank.block_rows(engine.mapper) if fast else None,
        "clients": clients,
        "rounds_timed": len(times),
        "updates_per_s": clients / round_s,
        "gflops": train_flops / round_s / 1e9,
        "round_s": round_s,
        "round_s_all": times,
        "round_s_min": min(times),
        "round_s_max": max(times),
        # Process CPU seconds (all threads) per round: with other load on the machine the wall
        # time moves much more than this does.
        "round_cpu_s": statistics.median(cpu),
        "lower_compile_s": lower_compile_s,
        # The first call through the already-compiled executable; minus the steady round time
        # it shows any first-run overhead that is not compilation.
        "first_call_s": first_s,
        "compile_s": lower_compile_s + max(0.0, first_s - round_s),
        "train_loss_per_round": losses,
        "train_flops_per_round": train_flops,
        # What the chosen path executes (the fast path's own count; else the model FLOPs).
        "executed_flops_per_round": executed,
        "executed_gflops": executed / round_s / 1e9,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "peak_rss_mib": peak_rss_mib(),
        # This run's own peak (compile + rounds; data built, state initialised), and the RSS
        # it started from: the difference is what compiling and training added.
        "run_peak_rss_mib": peak_rss_since_reset_mib() if run_peak else None,
        "run_start_rss_mib": rss_start,
        "current_rss_mib": current_rss_mib(),
        "device_memory": device_memory(),
    }
    if accuracy:
        params = state["params"]
        x_te = data.x[data.test_idx.reshape(-1)]
        y_te = data.y[data.test_idx.reshape(-1)]
        logits = jax.jit(model.apply)(params, x_te)
        out["test_acc"] = float(jnp.mean(jnp.argmax(logits, -1) == y_te))
        out["rounds_trained"] = len(times) + 1
    return out


def parse_chunks(spec: str, clients: int) -> list[int | None]:
    out: list[int | None] = []
    for tok in spec.split(","):
        tok = tok.strip().lower()
        if not tok:
            continue
        if tok == "all":
            out.append(clients)
        elif tok in ("default", "none"):
            out.append(None)
        else:
            out.append(int(tok))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=64, help="training examples per client")
    ap.add_argument("--test-samples", type=int, default=16, help="test examples per client")
    ap.add_argument("--chunk-size", type=int, default=None,
                    help="clients per vmapped chunk (default: backend default)")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds after the compile round")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--sweep", type=str, default=None,
                    help="comma-separated chunk sizes, e.g. 1,2,4,8,16,32,all")
    ap.add_argument("--devices", type=int, default=1,
                    help="split clients over this many devices (on CPU: host devices made with "
                         "--xla_force_host_platform_device_count, one per core)")
    ap.add_argument("--path", type=str, default="auto",
                    help="Engine path: auto, general, lowrank, or a comma list to compare")
    ap.add_argument("--block-rows", type=int, default=None,
                    help="low-rank path: stored rows per block of clients (default: "
                         "fedrnd.engine.lowrank.block_rows, 2048, or 256 over host CPU devices)")
    ap.add_argument("--json", type=str, default=None, help="save the results here")
    args = ap.parse_args(argv)
    if args.block_rows is not None:
        if args.block_rows < 1:
            ap.error(f"--block-rows must be >= 1, got {args.block_rows}")
        lowrank.BLOCK_ROWS = lowrank.BLOCK_ROWS_PER_CORE = args.block_rows

    t_data = time.perf_counter()
    ds = synthetic_dataset(args.clients, args.samples, args.test_samples)
    data = build_federated(ds, iid_partition(args.clients, args.samples, args.test_samples))
    del ds
    data_s = time.perf_counter() - t_data
    rss_data = peak_rss_mib()

    model = make_model("mlp", (FEATURES,), CLASSES, hidden=list(HIDDEN))
    xla_fwd = count_flops(model, batch=args.batch) / args.batch
    analytic_fwd = analytic_forward_flops()
    fwd = xla_fwd if xla_fwd > 0 else analytic_fwd

    dev = jax.devices()[0]
    info = {
        "date": _dt.date.today().isoformat(),
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
        "num_devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "default_chunk": default_chunk_size(),
        "workload": {
            "clients": args.clients, "samples": args.samples, "features": FEATURES,
            "classes": CLASSES, "model": "mlp 784-200-200-10", "params": model.num_params(),
            "batch": args.batch, "epochs": args.epochs, "local_opt": f"sgd lr={args.lr}",
            "server_opt": "sgd lr=1", "steps_per_client": args.epochs * -(-args.samples //
                                                                            args.batch),
        },
        "forward_flops_per_example": {"xla_cost_analysis": xla_fwd, "analytic_2mac": analytic_fwd,
                                      "used": fwd},
        "data_build_s": data_s,
        # Generating the data holds host copies next to the device pool, so the process peak
        # may be set here rather than by training; compare with the per-run figures.
        "peak_rss_after_data_mib": rss_data,
        "data_device_mib": data.nbytes() / 2**20,
    }
    print(f"fedrnd throughput | jax {info['jax_version']} | backend {info['backend']} "
          f"({info['device']}, {info['num_devices']} device(s), {info['cpu_count']} cpus) | "
          f"{info['date']}")
    print(f"workload: {args.clients} clients x {args.samples} samples, MLP 784-200-200-10 "
          f"({info['workload']['params']:,} params), batch {args.batch}, {args.epochs} epoch "
          f"SGD lr {args.lr}, server SGD lr 1")
    print(f"forward FLOPs/example: {xla_fwd:,.0f} (XLA cost analysis; used), "
          f"{analytic_fwd:,.0f} (analytic 2*MACs); training = 3x forward")
    lr_flops = lowrank.flops(lowrank.layer_dims(model), info["workload"]["steps_per_client"],
                             min(args.batch, args.samples))
    info["lowrank_flops_per_client"] = lr_flops
    print(f"per client and round: model {lr_flops['model'] / 1e6:.1f} MFLOP (analytic); low-rank "
          f"path executes {lr_flops['executed'] / 1e6:.1f} MFLOP ({lr_flops['shared'] / 1e6:.1f} "
          f"shared + {lr_flops['corrections'] / 1e6:.1f} corrections)")
    print(f"load average at start: {os.getloadavg()[0]:.1f} (1 min), {os.cpu_count()} cpus")
    print(f"data: {info['data_device_mib']:.0f} MiB federated arrays, built in {data_s:.1f} s; "
          f"peak RSS after building {rss_data:.0f} MiB")

    if args.clients % args.devices:
        ap.error(f"--clients {args.clients} must be divisible by --devices {args.devices}")
    per_device = args.clients // args.devices
    chunks = parse_chunks(args.sweep, per_device) if args.sweep else [args.chunk_size]
    paths = [p.strip() for p in args.path.split(",") if p.strip()]
    for p in paths:
        if p not in lowrank.PATHS:
            ap.error(f"--path {p!r} is unknown; allowed: {', '.join(lowrank.PATHS)}")
    results = []
    header = (f"{'path':>12} {'chunk':>7} {'upd/s':>8} {'GFLOP/s':>8} {'exec GF/s':>9} "
              f"{'round s':>8} {'min s':>7} {'cpu s':>7} {'compile s':>9} {'RSS MiB':>8} "
              f"{'+run MiB':>8} {'acc':>6} {'load':>5}")
    print(header)
    for p in paths:
        for ch in chunks:
            r = run_one(data, model, chunk_size=ch, rounds=args.rounds, batch=args.batch,
                        lr=args.lr, epochs=args.epochs, fwd_flops_per_example=fwd,
                        devices=args.devices, path=p)
            results.append(r)
            label = f"{r['effective_chunk']}" + ("*" if ch is None else "")
            used = f"{p}:{'lowrank' if r['lowrank'] else 'general'}" if p == "auto" else p
            added = (r["run_peak_rss_mib"] - r["run_start_rss_mib"]
                     if r["run_peak_rss_mib"] and r["run_start_rss_mib"] else float("nan"))
            print(f"{used:>12} {label:>7} {r['updates_per_s']:8.1f} {r['gflops']:8.2f} "
                  f"{r['executed_gflops']:9.2f} {r['round_s']:8.3f} {r['round_s_min']:7.3f} "
                  f"{r['round_cpu_s']:7.3f} {r['compile_s']:9.2f} {r['peak_rss_mib']:8.0f} "
                  f"{added:8.0f} {r.get('test_acc', float('nan')):6.3f} "
                  f"{r['loadavg_after'][0]:5.1f}", flush=True)
    if any(ch is None for ch in chunks):
        print("(* = backend default chunk size)")
    print(f"RSS is the peak of each run from compiling on (on Linux the peak is reset before "
          f"compiling, else the process peak so far); +run is that peak over the RSS before "
          f"compiling; current RSS {current_rss_mib() or float('nan'):.0f} MiB.")
    dm = device_memory()
    if dm:
        print(f"device memory: {dm}")
    if len(results) > 1:
        best = max(results, key=lambda r: r["updates_per_s"])
        print(f"best: path {best['path']}, chunk size {best['effective_chunk']} "
              f"({best['updates_per_s']:.1f} updates/s)")
    out = {**info, "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"saved {args.json}")
    return out


if __name__ == "__main__":
    main()
