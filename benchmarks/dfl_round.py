"""One DFedAvg round (local steps + gossip) for many nodes on a d-regular graph: time and memory.

Workload (defaults, issue 6): 10,000 nodes, each with its own MLP 784-100-10 (79,510 float32
parameters, 318 KB), on a random 5-regular graph with Metropolis weights. Each node holds 6
Fashion-MNIST training images (the 60,000 split IID; ``--data synthetic`` draws Gaussian
784-d classes instead) and runs 5 local SGD steps on batches of 6, then one gossip step with
its neighbours. The round is ``jax.jit(DFedAvg.round)`` with the state donated, so the per-node
models are updated in place where XLA can.

Reported: compilation, the first round, the median of ``--repeats`` further rounds in wall and
process CPU seconds (CPU time is the figure that survives a loaded machine), the same split into
local training alone and gossip alone, XLA's buffer sizes for the round program (arguments,
outputs, aliased (donated) and temporaries), the peak resident memory of the process
(``ru_maxrss``, which includes the data and the jax runtime), the size of the per-node
models, bytes per node and per link from the ledger, and the load average.

Usage::

    python benchmarks/dfl_round.py                      # the issue's workload
    python benchmarks/dfl_round.py --nodes 1000 --repeats 3 --json /tmp/r.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script from anywhere in the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fedrnd.algorithms import DFedAvg  # noqa: E402
from fedrnd.data.federated import Dataset, Partition, build_federated  # noqa: E402
from fedrnd.driver import memory  # noqa: E402
from fedrnd.engine import ClientMapper, Engine, LocalSpec, client_hparams, tree_bytes  # noqa: E402
from fedrnd.graphs import edge_chunk_for, gossip, mixing_edges  # noqa: E402
from fedrnd.models import make_model  # noqa: E402

MiB = 2**20


def device_memory() -> dict | None:
    """The first device's allocator figures (peak and limit), where the backend has them."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - a backend without the call
        return None
    keep = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
    return {k: int(stats[k]) for k in keep if k in stats} if stats else None


def peak_rss_mib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / MiB if sys.platform == "darwin" else r / 1024


def load_images(n: int, source: str, seed: int = 0) -> tuple[Dataset, str]:
    """``n`` training images (Fashion-MNIST when available, else synthetic), test = 2 x 16."""
    if source in ("auto", "fashion_mnist"):
        try:
            from fedrnd.data import load_source

            ds = load_source("fashion_mnist")
            if len(ds.y_train) >= n:
                x = ds.x_train[:n].reshape(n, -1).astype(np.float32)
                return Dataset(x, ds.y_train[:n], ds.x_test[:32].reshape(32, -1),
                               ds.y_test[:32], 10, "fashion_mnist"), "Fashion-MNIST"
            if source == "fashion_mnist":
                raise ValueError(f"Fashion-MNIST has {len(ds.y_train)} training images, "
                                 f"fewer than the {n} asked")
        except (FileNotFoundError, OSError, ValueError):
            if source == "fashion_mnist":
                raise
    rng = np.random.default_rng(seed)
    means = (0.3 * rng.standard_normal((10, 784))).astype(np.float32)
    y = rng.integers(0, 10, n + 32).astype(np.int32)
    x = (means[y] + rng.standard_normal((n + 32, 784)).astype(np.float32))
    return Dataset(x[:n], y[:n], x[n:], y[n:], 10, "synthetic"), "synthetic Gaussian 784-d"


def run(nodes: int, degree: int, samples: int, steps: int, batch: int, hidden: int,
        repeats: int, data_source: str = "auto", lr: float = 0.05, split: bool = True) -> dict:
    ds, data_name = load_images(nodes * samples, data_source)
    part = Partition([np.arange(i * samples, (i + 1) * samples) for i in range(nodes)],
                     [np.arange(2 * (i % 16), 2 * (i % 16) + 2) for i in range(nodes)],
                     np.zeros(nodes, np.int32), None, "iid")
    data = build_federated(ds, part)
    model = make_model("mlp", (784,), 10, hidden=[hidden])
    opt, hp = client_hparams(nodes, optimizer="sgd", lr=lr)
    engine = Engine(model, LocalSpec(batch_size=batch, steps=steps), opt, ClientMapper())
    alg = DFedAvg(engine=engine, topology="d_regular", graph={"degree": degree})
    alg.validate(data)

    # The memory planner's estimate for this run (what `fedrnd run` checks before allocating):
    # data + the method's state + one block's history + chunk x the per-client working set.
    template = alg.init_template(jax.random.key(0), data, hp)
    estimate = memory.plan(data, engine, hp, {"dfedavg": template},
                           {"dfedavg": memory.history_bytes(alg, template, data, 1)},
                           preferred_chunk=engine.mapper.chunk, refine=False,
                           rounds={"dfedavg": alg.round_bytes(template, data)})

    t0 = time.perf_counter()
    # The round donates its state; the state gets its own copy of hp, which must outlive it.
    state = alg.init(jax.random.key(0), data, jax.tree.map(jnp.array, hp))
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    model_bytes = tree_bytes(model.init(jax.random.key(0)))

    step = jax.jit(alg.round, donate_argnums=0)
    t0 = time.perf_counter()
    compiled = step.lower(state, data, jax.random.key(0)).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    xla = {k: int(getattr(mem, k, 0) or 0) for k in (
        "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
        "temp_size_in_bytes")} if mem is not None else {}
    print(f"compiled in {compile_s:.1f} s; XLA buffers (bytes): {xla}", flush=True)
    t0 = time.perf_counter()
    state, m = step(state, data, jax.random.key(0))
    jax.block_until_ready((state, m))
    first_s = time.perf_counter() - t0
    times, cpu = [], []
    for r in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        state, m = step(state, data, jax.random.key(r + 1))
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    m = jax.tree.map(np.asarray, m)
    round_rss = peak_rss_mib()
    round_device = device_memory()  # before the halves below hold their own copies
    print(f"round: {statistics.median(times) if times else float('nan'):.2f} s, peak RSS "
          f"{round_rss:.0f} MiB", flush=True)

    # The two halves alone: local training of every node, and one gossip step (the state is
    # let go first, so these never hold more models than the round did).
    params, graph = state["clients"]["params"], state["graph"]
    del state
    train = jax.jit(lambda p, d, h, k: engine.train(None, d, h, k, jnp.asarray(0),
                                                    client_params=p)[0])
    train_cpu = train_s = float("nan")
    for i in range(2 if split else 0):
        t0, c0 = time.perf_counter(), time.process_time()
        out = jax.block_until_ready(train(params, data, hp, jax.random.key(9 + i)))
        train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
        del out
    chunk = edge_chunk_for(model_bytes)
    edges = mixing_edges(graph)
    mixer = jax.jit(lambda p, e: gossip(p, e, nodes, 1, chunk))
    gossip_cpu = gossip_s = float("nan")
    for _ in range(2 if split else 0):
        t0, c0 = time.perf_counter(), time.process_time()
        out = jax.block_until_ready(mixer(params, edges))
        gossip_s, gossip_cpu = time.perf_counter() - t0, time.process_time() - c0
        del out

    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "device": jax.devices()[0].device_kind, "jax": jax.__version__,
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "data": data_name, "nodes": nodes, "degree": degree, "samples_per_node": samples,
        "local_steps": steps, "batch": batch, "model": f"MLP 784-{hidden}-10",
        "model_bytes": model_bytes, "models_mib": nodes * model_bytes / MiB,
        "edge_chunk": chunk, "init_s": init_s, "compile_s": compile_s, "first_round_s": first_s,
        "round_s": statistics.median(times) if times else float("nan"),
        "round_cpu_s": statistics.median(cpu) if cpu else float("nan"),
        "rounds_s": times, "train_only_s": train_s, "gossip_only_s": gossip_s,
        "train_only_cpu_s": train_cpu, "gossip_only_cpu_s": gossip_cpu,
        "xla_round_bytes": xla, "round_peak_rss_mib": round_rss, "peak_rss_mib": peak_rss_mib(),
        "device_memory": device_memory(), "round_device_memory": round_device,
        "planner": {"data": estimate.data, "state": sum(estimate.states.values()),
                    "history": max(estimate.histories.values(), default=0),
                    "round": max(estimate.rounds.values(), default=0),
                    "per_client": estimate.per_client, "chunk": estimate.chunk,
                    "total": estimate.total()},
        "bytes_per_node": float(m["up/model"].mean() + m["down/model"].mean()),
        "bytes_per_link": float(m["bytes_per_link"]), "links": float(m["links"]),
        "consensus_distance": float(m["consensus_distance"]),
        "train_loss": float(m["train_loss"]),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=10_000)
    p.add_argument("--degree", type=int, default=5)
    p.add_argument("--samples", type=int, default=6, help="training images per node")
    p.add_argument("--steps", type=int, default=5, help="local SGD steps per round")
    p.add_argument("--batch", type=int, default=6)
    p.add_argument("--hidden", type=int, default=100)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--data", choices=["auto", "fashion_mnist", "synthetic"], default="auto")
    p.add_argument("--no-split", action="store_true",
                   help="skip timing local training and gossip apart (saves their memory)")
    p.add_argument("--json", default=None, help="also write the figures here")
    a = p.parse_args(argv)
    r = run(a.nodes, a.degree, a.samples, a.steps, a.batch, a.hidden, a.repeats, a.data,
            split=not a.no_split)
    print(f"{r['date']}, {r['machine']}, jax {r['jax']}, load {r['load_avg']}")
    print(f"{r['nodes']} nodes, {r['degree']}-regular, {r['model']} ({r['model_bytes']} B per "
          f"node, {r['models_mib']:.0f} MiB of models), {r['data']}, {r['local_steps']} steps "
          f"of batch {r['batch']}")
    print(f"init {r['init_s']:.1f} s, compile {r['compile_s']:.1f} s, first round "
          f"{r['first_round_s']:.1f} s, round {r['round_s']:.2f} s wall / "
          f"{r['round_cpu_s']:.2f} s CPU (local training {r['train_only_s']:.2f} / "
          f"{r['train_only_cpu_s']:.2f} s, gossip {r['gossip_only_s']:.2f} / "
          f"{r['gossip_only_cpu_s']:.2f} s), peak RSS {r['round_peak_rss_mib']:.0f} MiB through "
          f"the rounds, {r['peak_rss_mib']:.0f} MiB in all")
    x = r["xla_round_bytes"]
    if x:
        print("XLA buffers of the round (MiB): " + ", ".join(
            f"{k.replace('_size_in_bytes', '')} {v / MiB:.0f}" for k, v in x.items()))
    e = r["planner"]
    print(f"memory planner: data {e['data'] / MiB:.0f} + state {e['state'] / MiB:.0f} + history "
          f"{e['history'] / MiB:.0f} + round {e['round'] / MiB:.0f} + chunk {e['chunk']} x {e['per_client'] / MiB:.1f} MiB per "
          f"client = {e['total'] / MiB:.0f} MiB")
    for label, dm in (("through the rounds", r["round_device_memory"]),
                      ("in all", r["device_memory"])):
        if dm:
            print(f"device memory {label} (MiB): " + ", ".join(
                f"{k} {v / MiB:.0f}" for k, v in dm.items()))
    print(f"bytes per node {r['bytes_per_node']:.0f}, per link {r['bytes_per_link']:.0f}, "
          f"consensus distance {r['consensus_distance']:.3g}")
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))
    return r


if __name__ == "__main__":
    main()
