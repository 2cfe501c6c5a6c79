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
import functools
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
    how = " (convolutions by im2col)" if w.model == "cnn" else ""
    return Result(name="numpy loop", version=np.__version__, clients=w.clients, round_s=times,
                  cpu_s=cpu, layers=layers,
                  note=f"plain numpy forward/backward per client and step{how}, {threads_note}",
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


@functools.cache
def _to_nchw():
    """A module turning fedrnd's NHWC images into PyTorch's NCHW (a view: no copy for one
    input channel)."""
    from torch import nn

    class ToNCHW(nn.Module):
        def forward(self, x):
            return x.permute(0, 3, 1, 2)

    return ToNCHW


def torch_cnn(layers: Layers, feature_shape: tuple[int, ...]):
    """fedrnd's built-in CNN in PyTorch, holding ``layers``; takes NHWC images ``[B, H, W, C]``
    as fedrnd does.

    Per convolution: ``nn.Conv2d(padding="same")`` (flax's 'same': ``(k - 1) // 2`` before,
    the rest after), ReLU, ``nn.MaxPool2d(2, ceil_mode=True)`` (flax's 'same' 2x2 pool: an odd
    last row or column pools alone); then ``nn.Flatten`` and Linear/ReLU layers. Kernels go
    from flax's HWIO to PyTorch's OIHW. PyTorch flattens ``(c, h, w)`` where fedrnd flattens
    NHWC ``(h, w, c)``, so the rows of the first dense kernel are permuted to match (the
    module computes the same function; :func:`torch_layers` permutes back). The flattened
    shape ``(h, w, c)`` is kept as ``net.flat_hwc``.
    """
    import torch
    from torch import nn

    def put(param, value):
        with torch.no_grad():
            param.copy_(torch.from_numpy(np.array(value, np.float32, order="C")))

    h, w = feature_shape[:2]
    mods = [_to_nchw()()]
    convs = 0
    for k, b in layers:
        k = np.asarray(k)
        if k.ndim != 4:
            break
        conv = nn.Conv2d(k.shape[2], k.shape[3], tuple(k.shape[:2]), padding="same")
        put(conv.weight, k.transpose(3, 2, 0, 1))
        put(conv.bias, b)
        mods += [conv, nn.ReLU(), nn.MaxPool2d(2, 2, ceil_mode=True)]
        h, w, c = -(-h // 2), -(-w // 2), k.shape[3]
        convs += 1
    mods.append(nn.Flatten())
    dense = layers[convs:]
    for i, (k, b) in enumerate(dense):
        k = np.asarray(k)
        if i == 0:  # rows (h, w, c) -> (c, h, w)
            k = k.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)
        lin = nn.Linear(k.shape[0], k.shape[1])
        put(lin.weight, k.T)
        put(lin.bias, b)
        mods.append(lin)
        if i < len(dense) - 1:
            mods.append(nn.ReLU())
    net = nn.Sequential(*mods)
    net.flat_hwc = (h, w, c)
    return net


def torch_net(w: Workload):
    """The workload's model in PyTorch from its initial weights: :func:`torch_mlp` or
    :func:`torch_cnn`."""
    return torch_cnn(w.init, w.feature_shape) if w.model == "cnn" else torch_mlp(w.init)


def torch_layers(net) -> Layers:
    """Back from :func:`torch_mlp`'s or :func:`torch_cnn`'s module to numpy :data:`Layers`."""
    from torch import nn

    def arr(t):
        return t.detach().cpu().numpy()

    out: Layers = []
    flat = getattr(net, "flat_hwc", None)
    first_dense = True
    for m in net:
        if isinstance(m, nn.Conv2d):
            out.append((arr(m.weight).transpose(2, 3, 1, 0).copy(), arr(m.bias).copy()))
        elif isinstance(m, nn.Linear):
            k = arr(m.weight).T
            if flat is not None and first_dense:  # rows (c, h, w) -> (h, w, c)
                h, w, c = flat
                k = k.reshape(c, h, w, -1).transpose(1, 2, 0, 3).reshape(h * w * c, -1)
            first_dense = False
            out.append((k.copy(), arr(m.bias).copy()))
    return out


TORCH_DEVICE_NOTE = """\
``--torch-device cuda`` runs the PyTorch loop on the GPU, each round ending with
``torch.cuda.synchronize()``. Its matmuls and cuDNN convolutions compute in float32 (TF32
off), as fedrnd's do then (``run.py --precision float32``, the default, sets JAX's default
matmul precision to float32 on an accelerator, where JAX would use TF32 on recent NVIDIA
GPUs); ``--precision tf32`` lets both use TF32. pfl and Flower stay on the CPU."""


def run_torch(w: Workload, threads: int = 1, device: str = "cpu", tf32: bool = False
              ) -> Result:
    """A plain PyTorch FedAvg loop: for each client, load the global weights, run its SGD
    steps with ``torch.optim.SGD``, add its weights into a running weighted sum. PyTorch runs
    on ``threads`` intra-op threads (see :data:`THREADS_NOTE`), on ``device`` (``"cpu"`` or
    ``"cuda"``, see :data:`TORCH_DEVICE_NOTE`; ``tf32``: allow TF32 there)."""
    name = torch_label(device)
    reason = missing("torch")
    if reason:
        return skipped(name, reason)
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    dev = torch.device(device)
    gpu = dev.type == "cuda"
    if gpu:
        if not torch.cuda.is_available():
            return skipped(name, f"torch {torch.__version__} sees no CUDA device")
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32

    def sync():
        if gpu:
            torch.cuda.synchronize(dev)

    before = os.getloadavg()[0]
    t0 = time.perf_counter()
    net = torch_net(w).to(dev)
    params = list(net.parameters())
    global_p = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=w.lr)
    x_all = torch.from_numpy(np.array(w.x_train)).to(dev)
    y_all = torch.from_numpy(np.array(w.y_train)).to(dev)
    order = torch.from_numpy(w.order.astype(np.int64)).to(dev)
    sync()
    setup_s = time.perf_counter() - t0
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
        sync()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    with torch.no_grad():
        for p, g in zip(params, global_p, strict=True):
            p.copy_(g)
    where = (f"{torch.get_num_threads()} thread(s)" if not gpu
             else f"{torch.cuda.get_device_name(dev)}, TF32 {'on' if tf32 else 'off'}")
    return Result(name=name, version=torch.__version__, clients=w.clients,
                  round_s=times, cpu_s=cpu, layers=torch_layers(net), setup_s=setup_s,
                  note=f"torch.optim.SGD, {where}",
                  loadavg=(before, os.getloadavg()[0]))


def torch_label(device: str = "cpu") -> str:
    """The PyTorch loop's name in the tables: ``"pytorch loop"`` on the CPU,
    ``"pytorch loop (cuda)"`` elsewhere."""
    return "pytorch loop" if device == "cpu" else f"pytorch loop ({device})"


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
            self.body = torch_net(w)

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
                 log_dir: str | None = None, torch_device: str = "cpu",
                 tf32: bool = False) -> Result:
    """Run peer ``name`` on the saved workload in a fresh Python process.

    Each peer gets a process of its own, with only its framework loaded: no JAX thread pool
    or fedrnd arrays beside it, and a peer that crashes or hangs becomes a skip with the tail
    of its log. The log (Flower and Ray are talkative) goes to ``log_dir/<name>.log``.
    ``torch_device``: where the PyTorch loop runs, ``tf32``: whether it may use TF32 there
    (the other peers ignore both).
    """
    if name not in RUNNERS:
        raise ValueError(f"unknown peer {name!r}; allowed: {', '.join(RUNNERS)}")
    out_dir = log_dir or tempfile.mkdtemp(prefix="fedrnd-compare-")
    out, log = os.path.join(out_dir, f"{name}.npz"), os.path.join(out_dir, f"{name}.log")
    cmd = [sys.executable, "-m", "benchmarks.compare.peers", name, workload_path, out,
           "--threads", str(threads)]
    if flower_cpus:
        cmd += ["--flower-cpus", str(flower_cpus)]
    label = LABELS[name]
    if name == "torch":
        cmd += ["--torch-device", torch_device] + (["--tf32"] if tf32 else [])
        label = torch_label(torch_device)
    env = {**os.environ, "PYTHONPATH": _pythonpath()}
    with open(log, "w") as f:
        try:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return skipped(label, f"no result within {timeout:.0f} s (log: {log})")
    if proc.returncode != 0 or not os.path.exists(out):
        with open(log) as f:
            tail = " | ".join(line.strip() for line in f.readlines()[-3:])
        return skipped(label, f"exit status {proc.returncode}: {tail} (log: {log})")
    return load_result(out)


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.compare.peers PEER WORKLOAD.npz RESULT.npz``: one peer's run."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("peer", choices=tuple(RUNNERS))
    ap.add_argument("workload")
    ap.add_argument("out")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--flower-cpus", type=int, default=None)
    ap.add_argument("--torch-device", type=str, default="cpu")
    ap.add_argument("--tf32", action="store_true")
    args = ap.parse_args(argv)
    w = Workload.load(args.workload)
    if args.peer == "flower":
        r = run_flower(w, num_cpus=args.flower_cpus, torch_threads=args.threads,
                       workload_path=args.workload)
    elif args.peer == "torch":
        r = run_torch(w, threads=args.threads, device=args.torch_device, tf32=args.tf32)
    else:
        r = RUNNERS[args.peer](w, threads=args.threads)
    save_result(r, args.out)


if __name__ == "__main__":
    main()
