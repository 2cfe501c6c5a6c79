"""The peers: a plain numpy loop, a plain PyTorch loop, pfl-research and Flower's simulation.

Each ``run_*`` takes the exported :class:`~benchmarks.compare.harness.Workload` and returns a
:class:`~benchmarks.compare.harness.Result` (final layers, wall time of every round), or a
skipped one naming why when its framework is not installed or fails. Every peer trains client
``c`` in round ``r`` on the batches ``w.order[r, c]`` from fedrnd's initial weights, with plain
SGD (lr ``w.lr``), mean cross-entropy per batch, and sample-weighted FedAvg with server lr 1:
the same computation as fedrnd's, in each framework's own way of running it.

Optional frameworks are imported inside their runner only (``pip install -e ".[compare]"``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.compare.harness import (
    Layers,
    Result,
    Workload,
    load_result,
    numpy_fedavg,
    save_result,
    skipped,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INSTALL = 'pip install -e ".[compare]"'


THREADS_NOTE = """\
The CPU peers run their BLAS / PyTorch on one thread by default. The steps are small
(16 x 784 by 784 x 200), and PyTorch with 2 intra-op threads on this 2-core machine collapsed
under outside load: a 784-200-200-10 SGD step ran 1,460 steps/s on 1 thread and 7 to 38
steps/s on 2 threads, load average 14 (2026-11-22). ``run.py --threads`` changes it."""


def missing(*modules: str) -> str | None:
    """A skip reason naming the first of ``modules`` that is not installed, else ``None``."""
    for m in modules:
        if importlib.util.find_spec(m) is None:
            return f"{m} is not installed ({INSTALL})"
    return None


# --------------------------------------------------------------------------------------------
# numpy
# --------------------------------------------------------------------------------------------
def run_numpy(w: Workload, threads: int = 1) -> Result:
    """:func:`~benchmarks.compare.harness.numpy_fedavg`: one client and step at a time, BLAS
    limited to ``threads`` threads (see :data:`THREADS_NOTE`)."""
    before = os.getloadavg()[0]
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # without it BLAS picks its own thread count
        limit = contextlib.nullcontext()
        threads_note = "BLAS default threads"
    else:
        limit = threadpool_limits(threads)
        threads_note = f"BLAS on {threads} thread(s)"
    cpu: list[float] = []
    with limit:
        layers, times, _ = numpy_fedavg(w, cpu=cpu)
    return Result(name="numpy loop", version=np.__version__, clients=w.clients, round_s=times,
                  cpu_s=cpu, layers=layers,
                  note=f"plain numpy forward/backward per client and step, {threads_note}",
                  loadavg=(before, os.getloadavg()[0]))


# --------------------------------------------------------------------------------------------
# PyTorch
# --------------------------------------------------------------------------------------------
def torch_mlp(layers: Layers):
    """An ``nn.Sequential`` of Linear/ReLU holding ``layers`` (kernels transposed to
    PyTorch's ``[out, in]``)."""
    import torch
    from torch import nn

    mods = []
    for i, (k, b) in enumerate(layers):
        lin = nn.Linear(k.shape[0], k.shape[1])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.array(np.asarray(k).T, np.float32)))
            lin.bias.copy_(torch.from_numpy(np.array(b, np.float32)))
        mods.append(lin)
        if i < len(layers) - 1:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def torch_layers(net) -> Layers:
    """Back from :func:`torch_mlp`'s module to numpy :data:`Layers`."""
    from torch import nn

    return [(lin.weight.detach().numpy().T.copy(), lin.bias.detach().numpy().copy())
            for lin in net if isinstance(lin, nn.Linear)]


def run_torch(w: Workload, threads: int = 1) -> Result:
    """A plain PyTorch FedAvg loop: for each client, load the global weights, run its SGD
    steps with ``torch.optim.SGD``, add its weights into a running weighted sum. PyTorch runs
    on ``threads`` intra-op threads (see :data:`THREADS_NOTE`)."""
    reason = missing("torch")
    if reason:
        return skipped("pytorch loop", reason)
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)

    before = os.getloadavg()[0]
    net = torch_mlp(w.init)
    params = list(net.parameters())
    global_p = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=w.lr)
    x_all = torch.from_numpy(np.array(w.x_train))
    y_all = torch.from_numpy(np.array(w.y_train))
    order = torch.from_numpy(w.order.astype(np.int64))
    n = float(w.y_train.shape[1])
    times, cpu = [], []
    for r in range(w.rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        sums = [torch.zeros_like(p) for p in params]
        for c in range(w.clients):
            with torch.no_grad():
                for p, g in zip(params, global_p, strict=True):
                    p.copy_(g)
            xc, yc = x_all[c], y_all[c]
            for t in range(w.steps):
                pos = order[r, c, t]
                opt.zero_grad(set_to_none=False)
                F.cross_entropy(net(xc[pos]), yc[pos]).backward()
                opt.step()
            with torch.no_grad():
                for s, p in zip(sums, params, strict=True):
                    s.add_(p, alpha=n)
        global_p = [s / (n * w.clients) for s in sums]
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    with torch.no_grad():
        for p, g in zip(params, global_p, strict=True):
            p.copy_(g)
    return Result(name="pytorch loop", version=torch.__version__, clients=w.clients,
                  round_s=times, cpu_s=cpu, layers=torch_layers(net),
                  note=f"torch.optim.SGD, {torch.get_num_threads()} thread(s)",
                  loadavg=(before, os.getloadavg()[0]))


# --------------------------------------------------------------------------------------------
# pfl-research
# --------------------------------------------------------------------------------------------
def run_pfl(w: Workload, threads: int = 1) -> Result:
    """pfl-research's simulated FedAvg (``FederatedAveraging`` + ``SimulatedBackend`` +
    ``PyTorchModel``), every user in every round's cohort.

    pfl iterates a user's dataset in order, batch by batch; each time user ``c`` is loaded,
    its dataset is its examples in round ``r``'s batch order (``r`` = how often ``c`` was
    loaded before), so pfl runs fedrnd's batches. pfl averages the users' model differences
    with equal weights, which is FedAvg's sample weighting here (equal client sizes). PyTorch
    runs on ``threads`` intra-op threads (see :data:`THREADS_NOTE`).
    """
    reason = missing("torch", "pfl")
    if reason:
        return skipped("pfl-research", reason)
    try:
        import pfl
        import torch
        import torch.nn.functional as F
        from pfl.aggregate.simulate import SimulatedBackend
        from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
        from pfl.callback.base import TrainingProcessCallback
        from pfl.data.dataset import Dataset
        from pfl.data.federated_dataset import FederatedDataset
        from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
        from pfl.metrics import Metrics, Weighted
        from pfl.model.pytorch import PyTorchModel
    except Exception as e:  # noqa: BLE001 - an installed but broken framework is a skip
        return skipped("pfl-research", f"import failed: {type(e).__name__}: {e}")
    import asyncio

    # pfl asks asyncio for the current loop; a host that closed or never set one (a test
    # runner's worker, a notebook) gets a fresh one instead of a RuntimeError.
    try:
        asyncio.get_event_loop()
    except RuntimeError:
        asyncio.set_event_loop(asyncio.new_event_loop())

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch_mlp(w.init)

        def forward(self, x):
            return self.body(x)

        def loss(self, x, y, eval=False):  # noqa: A002 - pfl's keyword
            return F.cross_entropy(self(x), y)

        def metrics(self, x, y, eval=False):  # noqa: A002
            with torch.no_grad():
                logits = self(x)
            return {"loss": Weighted(float(F.cross_entropy(logits, y, reduction="sum")),
                                     len(y))}

    loads = np.zeros(w.clients, np.int64)

    def make_dataset(uid: int):
        r = int(loads[uid])
        loads[uid] += 1
        pos = w.order[r, uid].reshape(-1)
        # Tensors, not numpy: pfl turns numpy arrays into float32 tensors, labels included.
        return Dataset((torch.from_numpy(np.array(w.x_train[uid][pos])),
                        torch.from_numpy(np.array(w.y_train[uid][pos]))), user_id=str(uid))

    users = itertools.cycle(range(w.clients))
    train_data = FederatedDataset(make_dataset, lambda: next(users))

    times: list[float] = []
    cpu: list[float] = []

    class Clock(TrainingProcessCallback):
        def on_train_begin(self, *, model):
            times.append(time.perf_counter())
            cpu.append(time.process_time())
            return Metrics()

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            times.append(time.perf_counter())
            cpu.append(time.process_time())
            return False, Metrics()

    torch.set_num_threads(threads)
    before = os.getloadavg()[0]
    t0 = time.perf_counter()
    net = Net()
    model = PyTorchModel(model=net, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0))
    backend = SimulatedBackend(training_data=train_data, val_data=train_data)
    params = NNAlgorithmParams(central_num_iterations=w.rounds,
                               evaluation_frequency=10 * w.rounds + 1,
                               train_cohort_size=w.clients, val_cohort_size=0)
    train = NNTrainHyperParams(local_learning_rate=w.lr, local_num_epochs=1,
                               local_batch_size=w.batch)
    setup_s = time.perf_counter() - t0
    try:
        FederatedAveraging().run(algorithm_params=params, backend=backend, model=model,
                                 model_train_params=train,
                                 model_eval_params=NNEvalHyperParams(local_batch_size=None),
                                 callbacks=[Clock()])
    except Exception as e:  # noqa: BLE001
        return skipped("pfl-research", f"run failed: {type(e).__name__}: {e}")
    if not np.all(loads == w.rounds):
        return skipped("pfl-research", f"pfl loaded users {loads.min()}..{loads.max()} times "
                                       f"for {w.rounds} rounds; cannot vouch for the batches")
    return Result(name="pfl-research", version=pfl.__version__ if hasattr(pfl, "__version__")
                  else _dist_version("pfl"), clients=w.clients,
                  round_s=list(np.diff(times)), cpu_s=list(np.diff(cpu)),
                  layers=torch_layers(net.body),
                  setup_s=setup_s,
                  note=f"SimulatedBackend, PyTorchModel, 1 process, {threads} torch thread(s)",
                  loadavg=(before, os.getloadavg()[0]))


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


# --------------------------------------------------------------------------------------------
# Flower
# --------------------------------------------------------------------------------------------
def run_flower(w: Workload, *, num_cpus: int | None = None, torch_threads: int = 1,
               workload_path: str | None = None) -> Result:
    """Flower's Simulation Engine (Ray backend) with the Message API: a ``ServerApp`` running
    ``flwr.serverapp.strategy.FedAvg`` over ``w.clients`` virtual SuperNodes, a ``ClientApp``
    training a PyTorch copy of the model (:mod:`benchmarks.compare.flower_app`).

    The workload goes to an ``.npz`` (``workload_path`` when it is saved already) that every
    Ray worker memory-maps once; client
    ``partition-id`` ``c`` trains in server round ``r`` on ``w.order[r - 1, c]``. Round times
    are the gaps between the strategy's centralized evaluations (after every round; the
    evaluation itself only keeps the arrays). Each Ray actor takes one CPU and runs PyTorch on
    ``torch_threads`` threads; ``num_cpus`` (default: all) Ray CPUs, so as many actors.
    """
    reason = missing("torch", "flwr", "ray")
    if reason:
        return skipped("flower", reason)
    try:
        import flwr

        from benchmarks.compare import flower_app
    except Exception as e:  # noqa: BLE001
        return skipped("flower", f"import failed: {type(e).__name__}: {e}")

    before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="fedrnd-compare-") as tmp:
        path = workload_path or os.path.join(tmp, "workload.npz")
        if workload_path is None:
            w.save(path)
        try:
            out = flower_app.simulate(path, num_cpus=num_cpus or os.cpu_count() or 1,
                                      torch_threads=torch_threads)
        except Exception as e:  # noqa: BLE001
            return skipped("flower", f"run failed: {type(e).__name__}: {e}")
    if out.get("error"):
        return skipped("flower", out["error"])
    stamps, cpu = out["stamps"], out.get("cpu_stamps", [])
    if len(stamps) != w.rounds + 1:
        return skipped("flower", f"{len(stamps) - 1} of {w.rounds} rounds finished "
                                 f"(see Flower's log above)")
    return Result(name="flower", version=flwr.__version__, clients=w.clients,
                  round_s=list(np.diff(stamps)), layers=out["layers"],
                  cpu_s=list(np.diff(cpu)) if len(cpu) == len(stamps) else [],
                  note=f"Ray backend, {out['num_cpus']} actors x {torch_threads} torch "
                       f"thread(s); Ray and SuperNode start-up fall in the first round; "
                       f"CPU s = this process and all its descendants (Ray's GCS, raylet, "
                       f"workers)",
                  loadavg=(before, os.getloadavg()[0]))


def _pythonpath() -> str:
    """The repository root first, so Ray's workers import ``benchmarks.compare``."""
    rest = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join([REPO, rest]) if rest else REPO


RUNNERS = {"numpy": run_numpy, "torch": run_torch, "pfl": run_pfl, "flower": run_flower}
"""Peer name (``--peers``) -> runner."""

LABELS = {"numpy": "numpy loop", "torch": "pytorch loop", "pfl": "pfl-research",
          "flower": "flower"}


def run_isolated(name: str, workload_path: str, *, threads: int = 1,
                 flower_cpus: int | None = None, timeout: float = 1800.0,
                 log_dir: str | None = None) -> Result:
    """Run peer ``name`` on the saved workload in a fresh Python process.

    Each peer gets a process of its own, with only its framework loaded: no JAX thread pool
    or fedrnd arrays beside it, and a peer that crashes or hangs becomes a skip with the tail
    of its log. The log (Flower and Ray are talkative) goes to ``log_dir/<name>.log``.
    """
    if name not in RUNNERS:
        raise ValueError(f"unknown peer {name!r}; allowed: {', '.join(RUNNERS)}")
    out_dir = log_dir or tempfile.mkdtemp(prefix="fedrnd-compare-")
    out, log = os.path.join(out_dir, f"{name}.npz"), os.path.join(out_dir, f"{name}.log")
    cmd = [sys.executable, "-m", "benchmarks.compare.peers", name, workload_path, out,
           "--threads", str(threads)]
    if flower_cpus:
        cmd += ["--flower-cpus", str(flower_cpus)]
    env = {**os.environ, "PYTHONPATH": _pythonpath()}
    with open(log, "w") as f:
        try:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return skipped(LABELS[name], f"no result within {timeout:.0f} s (log: {log})")
    if proc.returncode != 0 or not os.path.exists(out):
        with open(log) as f:
            tail = " | ".join(line.strip() for line in f.readlines()[-3:])
        return skipped(LABELS[name], f"exit status {proc.returncode}: {tail} (log: {log})")
    return load_result(out)


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.compare.peers PEER WORKLOAD.npz RESULT.npz``: one peer's run."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("peer", choices=tuple(RUNNERS))
    ap.add_argument("workload")
    ap.add_argument("out")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--flower-cpus", type=int, default=None)
    args = ap.parse_args(argv)
    w = Workload.load(args.workload)
    if args.peer == "flower":
        r = run_flower(w, num_cpus=args.flower_cpus, torch_threads=args.threads,
                       workload_path=args.workload)
    else:
        r = RUNNERS[args.peer](w, threads=args.threads)
    save_result(r, args.out)


if __name__ == "__main__":
    main()
