"""Memory plan and chunk autotuning on the throughput workload (``benchmarks/throughput.py``).

Prints, for FedAvg and Local (one model per client) on ``--clients`` clients x 64 examples of
784 features, MLP 784-200-200-10, batch 16, one epoch of SGD:

- the memory planner's figures per device (:mod:`fedrnd.driver.memory`): data, each method's
  state, the per-client working set bound, the budget and the largest chunk that fits;
- ``--tune``: :func:`fedrnd.engine.autotune.tune_chunk` on the general path (the low-rank fast
  path runs clients in blocks of its own): client updates/s and compile seconds per candidate
  chunk, and the winner. Uses a throw-away cache file unless ``--cache`` is given.

Usage::

    python benchmarks/scale.py --clients 1000 10000
    python benchmarks/scale.py --clients 1000 --tune --chunks 1,2,4,8,16 --sample 64
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script from anywhere in the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks.throughput import HIDDEN, iid_partition, synthetic_dataset  # noqa: E402
from fedrnd.algorithms import FedAvg, Local  # noqa: E402
from fedrnd.data.federated import build_federated  # noqa: E402
from fedrnd.driver import memory  # noqa: E402
from fedrnd.engine import ClientMapper, Engine, LocalSpec, autotune, client_hparams  # noqa: E402
from fedrnd.models import make_model  # noqa: E402

MiB = 2**20


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[1000])
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--tune", action="store_true")
    p.add_argument("--chunks", default="1,2,4,8,16")
    p.add_argument("--sample", type=int, default=64)
    p.add_argument("--cache", default=None)
    a = p.parse_args(argv)
    print(f"{datetime.date.today()}, jax {jax.__version__}, {jax.devices()[0].device_kind}, "
          f"load {os.getloadavg()[0]:.1f}")
    budget, source = memory.device_budget()
    for c in a.clients:
        ds = synthetic_dataset(c, a.samples, 16)
        data = build_federated(ds, iid_partition(c, a.samples, 16))
        model = make_model("mlp", (784,), 10, hidden=list(HIDDEN))
        opt, hp = client_hparams(c, optimizer="sgd", lr=0.05)
        engine = Engine(model, LocalSpec(batch_size=16, epochs=1), opt, ClientMapper(),
                        path="general")
        key = jax.random.key(0)
        states = {"fedavg": FedAvg(engine=engine).init_template(key, data, hp),
                  "local": Local(engine=engine).init_template(key, data, hp)}
        plan = memory.plan(data, engine, hp, states, preferred_chunk=1, budget=budget,
                           source=source)
        print(f"{c} clients: {plan.describe()}")
        if a.tune:
            path = Path(a.cache) if a.cache else Path(tempfile.mkdtemp()) / "autotune.json"
            chunks = [int(k) for k in a.chunks.split(",")]
            t = autotune.tune_chunk(engine, data, hp, chunks=chunks, sample=a.sample,
                                    path=path, log=print)
            print(f"autotune: chunk {t.chunk} ({'cached' if t.cached else 'measured'}; "
                  f"cache {path})")


if __name__ == "__main__":
    main()
