"""Flower's side of the comparison: the ClientApp (run by Ray's workers) and the simulation.

Imported only when ``flwr`` is installed (:func:`benchmarks.compare.peers.run_flower`). Ray's
workers import this module by name to run :data:`app` (Flower hands them the driver's
``sys.path``), so it holds no data: a worker
memory-maps the workload ``.npz`` named in the train config once and keeps one PyTorch model
(:func:`~benchmarks.compare.peers.torch_net`: the MLP or the CNN, as the PyTorch loop builds it).
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from benchmarks.compare.harness import Workload
from benchmarks.compare.peers import torch_layers, torch_net

REGISTER_TIMEOUT_S = 900
"""Seconds a Ray worker may take to start and register (Ray's default is 60)."""

_CACHE: dict[str, tuple[Workload, torch.nn.Module, torch.optim.Optimizer]] = {}

app = ClientApp()


def _client_state(path: str):
    if path not in _CACHE:
        w = Workload.load(path)
        net = torch_net(w)
        _CACHE[path] = (w, net, torch.optim.SGD(net.parameters(), lr=w.lr))
    return _CACHE[path]


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One client's local epoch: the global arrays in, SGD on this round's batches, arrays out."""
    cfg = msg.content["config"]
    torch.set_num_threads(int(cfg["torch-threads"]))
    w, net, opt = _client_state(str(cfg["workload"]))
    r = int(cfg["server-round"]) - 1
    c = int(context.node_config["partition-id"])
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    xc = torch.from_numpy(np.array(w.x_train[c]))
    yc = torch.from_numpy(np.array(w.y_train[c]))
    loss_sum = 0.0
    for t in range(w.steps):
        pos = torch.from_numpy(w.order[r, c, t].astype(np.int64))
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(net(xc[pos]), yc[pos])
        loss.backward()
        opt.step()
        loss_sum += float(loss)
    content = RecordDict({
        "arrays": ArrayRecord(net.state_dict()),
        "metrics": MetricRecord({"train_loss": loss_sum / w.steps,
                                 "num-examples": int(w.y_train.shape[1])})})
    return Message(content=content, reply_to=msg)


def tree_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and every live descendant: the Flower
    driver plus Ray's GCS, raylet and worker processes, which it starts. A descendant that
    exited before the call is not counted (Ray's workers live for the whole simulation)."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def simulate(path: str, *, num_cpus: int, torch_threads: int) -> dict:
    """Run FedAvg for the workload at ``path`` in Flower's simulation engine.

    Returns ``{"stamps": [perf_counter before round 1, after round 1, ...], "cpu_stamps"
    (:func:`tree_cpu_seconds` at the same points), "layers", "num_cpus"}``, or ``{"error": ...}`` when the ServerApp failed. Ray and the SuperNodes
    start while round 1 waits for them, so round 1 carries the start-up.
    """
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    # Ray gives a starting worker process 60 s to register with the raylet, then declares it
    # dead and, here, never starts another: under a load average of 20 on 2 cores both actors
    # missed that and the simulation waited forever in round 1 (2026-11-22). Started workers
    # inherit the raylet's environment, which inherits ours.
    os.environ.setdefault("RAY_worker_register_timeout_seconds", str(REGISTER_TIMEOUT_S))
    w = Workload.load(path)
    out: dict = {"stamps": [], "cpu_stamps": [], "layers": None, "num_cpus": num_cpus}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0,
                          min_train_nodes=w.clients, min_available_nodes=w.clients)

        def evaluate(server_round: int, arrays: ArrayRecord):
            out["stamps"].append(time.perf_counter())
            out["cpu_stamps"].append(tree_cpu_seconds())
            if server_round == w.rounds:
                net = torch_net(w)
                net.load_state_dict(arrays.to_torch_state_dict())
                out["layers"] = torch_layers(net)
            return None

        try:
            strategy.start(grid=grid, initial_arrays=ArrayRecord(torch_net(w).state_dict()),
                           num_rounds=w.rounds,
                           train_config=ConfigRecord({"workload": path,
                                                      "torch-threads": torch_threads}),
                           evaluate_fn=evaluate)
        except Exception as e:  # noqa: BLE001 - reported to the caller, not lost in a thread
            out["error"] = f"ServerApp failed: {type(e).__name__}: {e}"

    run_simulation(server_app=server, client_app=app, num_supernodes=w.clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": num_cpus}})
    if out["layers"] is None and "error" not in out:
        out["error"] = (f"the ServerApp finished {max(len(out['stamps']) - 1, 0)} of "
                        f"{w.rounds} rounds (see Flower's log above)")
    return out
