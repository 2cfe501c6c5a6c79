"""The CNN workload through the engine, A/B in one process: full-width banded convolutions vs
the blocked ones, and one device vs the client axis over N host devices (one per core).

    python benchmarks/cnn_engine_ab.py --json benchmarks/results/cnn_engine_ab_<date>.json
    python benchmarks/cnn_engine_ab.py --clients 4 --repeats 1     # a quick check

``benchmarks/general_path.py``'s ``cnn`` workload (synthetic 28x28x1 images, conv 8-16 5x5,
dense 64, SGD, one epoch of batch 16 over 64 images), ``Engine.train_sum`` jitted, chunk 1.
The script starts JAX with ``--devices`` host devices itself
(``--xla_force_host_platform_device_count``), so it must be what imports JAX first. Variants,
interleaved over ``--repeats`` rounds of calls: ``full`` (every layer one full-width banded
product, :func:`fedrnd.models.banded.block_width` forced to ``None``), ``blocked`` (the
built-in CNN as shipped), ``blocked_mesh`` (the same, clients split over the devices). Prints
and saves the median wall and CPU seconds per call, the largest parameter difference to
``blocked`` and the load average.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.devices < 2 or args.clients % args.devices:
        ap.error(f"--devices must be >= 2 and divide --clients, got {args.devices}")
    if args.json and os.path.exists(args.json):
        ap.error(f"--json {args.json}: the file exists; results never replace an earlier one")
    if "jax" in sys.modules:
        ap.error("JAX is already imported: run this script in its own process")
    flag = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.general_path import WORKLOADS, synthetic
    from fedrnd.engine import ClientMapper, Engine, client_hparams, make_mesh
    from fedrnd.models import banded, make_model

    w = WORKLOADS["cnn"]
    data = synthetic(args.clients, w["rows"], w["feature"])
    opt, hp = client_hparams(args.clients, optimizer="sgd", lr=0.01)
    original = banded.block_width
    calls = {}
    for name, width, mesh in (("full", lambda *a: None, None), ("blocked", original, None),
                              ("blocked_mesh", original, make_mesh(args.devices))):
        banded.block_width = width  # read when the model's apply is traced, below
        model = make_model(w["model"][0], w["feature"], 10, **w["model"][1])
        mapper = ClientMapper(chunk_size=1, mesh=mesh)
        engine = Engine(model=model, local=w["spec"], optimizer=opt, mapper=mapper,
                        path="general")
        h = mapper.shard(hp)
        params = model.init(jax.random.key(0))
        call = jax.jit(lambda p, k, e=engine, h=h: e.train_sum(p, data, h, k, jnp.asarray(0)))
        out = jax.block_until_ready(call(params, jax.random.key(1)))  # compile here
        calls[name] = (call, params, out[0])
    banded.block_width = original
    times = {n: [] for n in calls}
    load0 = os.getloadavg()
    for r in range(args.repeats):
        for n, (call, params, _) in calls.items():
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(call(params, jax.random.key(2 + r)))
            times[n].append((time.perf_counter() - t0, time.process_time() - c0))
    ref = calls["blocked"][2]
    rows = []
    for n, v in times.items():
        diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(
            1.0, float(np.max(np.abs(np.asarray(b))))))
                   for a, b in zip(jax.tree.leaves(calls[n][2]), jax.tree.leaves(ref),
                                   strict=True))
        rows.append({"variant": n, "wall_s": statistics.median(x[0] for x in v),
                     "cpu_s": statistics.median(x[1] for x in v), "max_rel_diff": diff})
        print(f"{n:13s} wall {rows[-1]['wall_s']:.3f} s  CPU {rows[-1]['cpu_s']:.3f} s per "
              f"call  (max rel. param diff to blocked {diff:.1e})")
    info = {"date": datetime.datetime.now().isoformat(timespec="minutes"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
            "jax": jax.__version__, "clients": args.clients, "devices": args.devices,
            "repeats": args.repeats, "loadavg_start": load0, "loadavg_end": os.getloadavg(),
            "rows": rows}
    print(f"load average {load0[0]:.2f} -> {info['loadavg_end'][0]:.2f}")
    if args.json:
        with open(args.json, "x") as f:  # never replaces an earlier result
            json.dump(info, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
