"""Process CPU seconds of the engine's general path (``Engine(path="general").train_sum``).

Workloads (synthetic data, one client per map step, ``train_sum`` jitted, the same call
repeated with fresh keys; the median of ``--repeats`` calls after a compile call):

- ``small``: 1,000 clients x 48 rows, MLP 196-32-64-10, Adam, 100 full-batch steps (the shape
  of RND predictor training: small model, many steps);
- ``ragged``: 1,000 clients with 1 to 48 rows (uniform), the same MLP, Adam, 5 epochs of
  batch 8 (about half the steps of the static schedule are padding);
- ``cnn``: 50 clients x 64 images 28x28, CNN conv8-conv16-dense64, SGD, 1 epoch of batch 16;
- ``mlp``: the throughput workload (``benchmarks/throughput.py --path general``).

``chk`` (sum of absolute weights of the result) and ``loss`` are printed so that two versions
of the engine can be checked for identical results on the same call.

Usage::

    python benchmarks/general_path.py small ragged cnn --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script from anywhere in the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fedrnd.data.federated import FederatedData  # noqa: E402
from fedrnd.engine import ClientMapper, Engine, LocalSpec, client_hparams  # noqa: E402
from fedrnd.models import make_model  # noqa: E402

WORKLOADS = {
    "small": dict(clients=1000, rows=48, feature=(196,), model=("mlp", {"hidden": (32, 64)}),
                  spec=LocalSpec(48, steps=100), optimizer="adam"),
    "ragged": dict(clients=1000, rows=48, feature=(196,), model=("mlp", {"hidden": (32, 64)}),
                   spec=LocalSpec(8, 5), optimizer="adam", ragged=True),
    "cnn": dict(clients=50, rows=64, feature=(28, 28, 1),
                model=("cnn", {"channels": (8, 16), "dense": 64}), spec=LocalSpec(16, 1),
                optimizer="sgd"),
    "mlp": dict(clients=1000, rows=64, feature=(784,), model=("mlp", {}), spec=LocalSpec(16, 1),
                optimizer="sgd"),
}


def synthetic(clients: int, rows: int, feature: tuple[int, ...], ragged: bool = False,
              classes: int = 10, seed: int = 0) -> FederatedData:
    rng = np.random.default_rng(seed)
    pool = clients * rows
    x = rng.standard_normal((pool, *feature)).astype(np.float32)
    y = rng.integers(0, classes, pool).astype(np.int32)
    idx = rng.permutation(pool).reshape(clients, rows).astype(np.int32)
    count = (rng.integers(1, rows + 1, clients) if ragged else np.full(clients, rows)).astype(
        np.int32)
    return FederatedData(jnp.asarray(x), jnp.asarray(y), jnp.asarray(idx), jnp.asarray(count),
                         jnp.asarray(idx[:, :4]), jnp.full((clients,), 4, jnp.int32),
                         jnp.zeros(clients, jnp.int32), classes, "synthetic")


def measure(name: str, repeats: int, chunk: int | None = 1) -> dict:
    w = WORKLOADS[name]
    data = synthetic(w["clients"], w["rows"], w["feature"], w.get("ragged", False))
    model = make_model(w["model"][0], w["feature"], 10, **w["model"][1])
    opt, hp = client_hparams(w["clients"], optimizer=w["optimizer"], lr=0.01)
    engine = Engine(model=model, local=w["spec"], optimizer=opt,
                    mapper=ClientMapper(chunk_size=chunk), path="general")
    params = model.init(jax.random.key(0))
    call = jax.jit(lambda p, k: engine.train_sum(p, data, hp, k, jnp.asarray(0)))
    t0 = time.process_time()
    jax.block_until_ready(call(params, jax.random.key(1)))
    compile_cpu = time.process_time() - t0
    cpu, wall = [], []
    for r in range(repeats):
        t0, w0 = time.process_time(), time.perf_counter()
        out = jax.block_until_ready(call(params, jax.random.key(2 + r)))
        cpu.append(time.process_time() - t0)
        wall.append(time.perf_counter() - w0)
    return {"workload": name, "chunk": engine.mapper.chunk, "clients": w["clients"],
            "device": jax.devices()[0].device_kind, "cpu_s": statistics.median(cpu), "cpu_s_min": min(cpu),
            "wall_s": statistics.median(wall), "compile_cpu_s": compile_cpu,
            "load": os.getloadavg()[0],
            "chk": float(sum(jnp.sum(jnp.abs(a)) for a in jax.tree.leaves(out[0]))),
            "loss": float(out[2]["loss"])}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workloads", nargs="*", default=["small", "ragged", "cnn"],
                    choices=sorted(WORKLOADS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", default="1",
                    help="clients per map step: a number, or 'auto' for the backend's default "
                         "(1 on a CPU, 256 on an accelerator)")
    ap.add_argument("--json", default=None, help="also write every workload's figures here")
    args = ap.parse_args(argv)
    chunk = None if args.chunk == "auto" else int(args.chunk)
    results = []
    for name in args.workloads:
        r = measure(name, args.repeats, chunk)
        results.append(r)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"{name} (chunk {r['chunk']}): cpu s/call median {r['cpu_s']:.3f} min {r['cpu_s_min']:.3f} | wall "
              f"{r['wall_s']:.3f} | compile cpu {r['compile_cpu_s']:.1f} | load "
              f"{r['load']:.1f} | chk {r['chk']!r} loss {r['loss']!r}", flush=True)


if __name__ == "__main__":
    main()
