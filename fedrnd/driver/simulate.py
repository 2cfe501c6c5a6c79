"""The driver: a thin host loop around jitted blocks of rounds.

For each method in the config, the driver builds the state, then repeatedly runs a *block* of
rounds (one ``lax.scan`` of the method's pure ``round``, compiled once) up to the next
evaluation, checkpoint or host hook; between blocks it evaluates, logs, checkpoints and calls the
method's host hook. Round ``r`` always uses the key ``fold_in(key(seed), r)``, so an
interrupted run resumed from its last checkpoint ends with the same result as an uninterrupted
one. Resuming restores the checkpoint into the *structure* of the method's initial state
(:meth:`Algorithm.init_template`), so expensive initial work (RND discovery) is not redone.

With data drift (``[data.drift]``, :mod:`fedrnd.data.drift`) every drift round is also a block
boundary: after evaluating the rounds just run, the driver swaps in the next phase's
per-client arrays (same shapes, no recompilation) before the host hook, so a re-discovery at
that round already sees the new data. A resumed run picks the phase of its checkpoint's round.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedrnd.algorithms import Algorithm, make_algorithm
from fedrnd.data.drift import DriftingData
from fedrnd.data.federated import FederatedData
from fedrnd.driver import distributed, memory, outputs
from fedrnd.driver.checkpoint import Checkpointer
from fedrnd.driver.config import AlgorithmConfig, Config, from_dict, load_config, validate
from fedrnd.driver.protocol import finetune_results
from fedrnd.driver.setup import build_data, build_engine
from fedrnd.engine import ClientHParams, Engine, evaluate_clients, summarize
from fedrnd.engine.multihost import multiprocess, to_host


@dataclasses.dataclass
class MethodResult:
    """One method's outcome: per-round history, final evaluation summary, per-client ledger."""

    label: str
    history: list[dict[str, Any]]
    final: dict[str, float]
    per_client: dict[str, np.ndarray]
    bytes_up: np.ndarray
    bytes_down: np.ndarray
    state: Any = None
    wall_time: float = 0.0
    compile_time: float = 0.0


@dataclasses.dataclass
class SimulationResult:
    """What :func:`simulate` returns: the run directory and each method's :class:`MethodResult`."""

    config: Config
    run_dir: Path
    methods: dict[str, MethodResult]
    data: FederatedData | None = None
    drift: DriftingData | None = None
    memory: memory.MemoryPlan | None = None

    def table(self) -> str:
        return outputs.summary_table(self.methods)

    def final(self, label: str, key: str = "test_acc/mean") -> float:
        return self.methods[label].final[key]


def _as_config(config: Config | dict | str | Path | None) -> Config:
    if config is None:
        return validate(Config())
    if isinstance(config, Config):
        return validate(config)
    if isinstance(config, dict):
        return validate(from_dict(config))
    return load_config(config)


def simulate(config: Config | dict | str | Path | None = None, *, resume: bool = False,
             run_dir: str | Path | None = None, progress: bool | None = None,
             data: FederatedData | DriftingData | None = None,
             verbose: bool = True) -> SimulationResult:
    """Run every method of ``config`` on the same data and initial weights.

    Args:
      config: a :class:`Config`, a nested dict, a TOML path, or ``None`` for the defaults.
      resume: continue from the last checkpoint in ``run_dir`` instead of starting afresh.
      run_dir: where outputs go (default ``<out_dir>/<name>``); a fresh run clears it.
      data: a prebuilt :class:`FederatedData`, or :class:`DriftingData` for data that drifts
        (skips ``config.data``, including ``config.data.drift``).

    The result's ``data`` is the data in effect at the end (after the last drift); with
    several processes, as host arrays (and each method's ``state`` too).

    Multi-host (``num_processes``, :mod:`fedrnd.driver.distributed`): call it on every
    process with the same config; process 0 writes the outputs and prints.
    """
    cfg = _as_config(config)
    distributed.initialize(cfg.coordinator, cfg.num_processes, cfg.process_id)
    primary = distributed.is_primary()
    verbose = verbose and primary
    show = (cfg.progress if progress is None else progress) and primary
    run_dir = Path(run_dir) if run_dir is not None else Path(cfg.out_dir) / cfg.name
    if primary:
        if run_dir.exists() and not resume:
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier("run_dir")

    log = print if verbose else None
    if data is None:
        # Built on the host (the CPU device) so the memory plan comes before device placement.
        with _on_host():
            data, dataset_info = build_data(cfg, log=log)
    else:
        dataset_info = {"name": data.name, "clients": data.num_clients}
        if isinstance(data, DriftingData):
            dataset_info["drift"] = data.summary()
    phases = data if isinstance(data, DriftingData) else DriftingData.static(data)
    late = [r for r in phases.drift_rounds if r >= cfg.rounds]
    if late:
        raise ValueError(f"data drifts after round(s) {late}, but the run has only "
                         f"rounds={cfg.rounds}")
    engine, hp, mapper = build_engine(cfg, phases.initial)
    algorithms = []
    for a in cfg.algorithms:
        alg = _make(a, engine, cfg)
        for d in phases.phases:
            alg.validate(d)
        algorithms.append((a.tag, alg))
    # Memory plan and chunk size (autotuned on request) before anything else is allocated.
    plan, tuned = _plan(cfg, phases, hp, algorithms, log)
    if plan.chunk != mapper.chunk:
        mapper = dataclasses.replace(mapper, chunk_size=plan.chunk)
        engine = dataclasses.replace(engine, mapper=mapper)
        algorithms = [(t, dataclasses.replace(a, engine=engine)) for t, a in algorithms]
    # Host-side steps (discovery in init, hooks, reports, summaries) read the data from a
    # host copy when several processes share the run: placed per-client arrays are spread
    # over the hosts. With one process both are the placed data.
    placed = _place_data(phases, mapper)
    host, phases = (phases if multiprocess() else placed), placed

    meta = outputs.run_metadata(cfg, phases.initial, dataset_info, mapper)
    meta.update(memory=plan.to_dict(), distributed=distributed.describe())
    if tuned is not None:
        meta["autotune"] = tuned.to_dict()
    if primary:
        outputs.write_json(run_dir / "config.json", cfg.to_dict())
        outputs.write_json(run_dir / "metadata.json", meta)
    results = {}
    for tag, alg in algorithms:
        with _CompileClock() as clock:
            results[tag] = _run_method(cfg, tag, alg, phases, host, hp, run_dir / tag, resume,
                                       show, verbose, clock)
    result = SimulationResult(cfg, run_dir, results, host.at(cfg.rounds),
                              host if host.events else None, plan)
    if primary:
        outputs.write_summary(run_dir, results)
        outputs.plot_accuracy(run_dir / "accuracy.png", results, title=cfg.name)
    if verbose:
        print(result.table())
        print(f"outputs: {run_dir}")
    return result


def _on_host():
    """Build on the host's CPU device when the default device is an accelerator."""
    if jax.default_backend() == "cpu":
        return contextlib.nullcontext()
    try:
        return jax.default_device(jax.local_devices(backend="cpu")[0])
    except RuntimeError:  # no CPU backend (JAX_PLATFORMS without cpu): build where we are
        return contextlib.nullcontext()


def _place_data(phases: DriftingData, mapper) -> DriftingData:
    """Per-client arrays split over the mesh, the pool replicated (or all on the device)."""
    first = phases.initial
    if mapper.mesh is None:
        dev = jax.devices()[0]
        x, y = jax.device_put((first.x, first.y), dev)
        clients = [jax.device_put(p.client_arrays(), dev) for p in phases.phases]
    else:
        x, y = mapper.replicate((first.x, first.y))
        clients = [mapper.shard(p.client_arrays()) for p in phases.phases]
    return dataclasses.replace(phases, phases=tuple(
        p.replace(x=x, y=y, **c) for p, c in zip(phases.phases, clients, strict=True)))


def _plan(cfg: Config, phases: DriftingData, hp: ClientHParams,
          algorithms: list[tuple[str, Algorithm]], log) -> tuple[memory.MemoryPlan, Any]:
    """The memory plan of the run and its chunk size (autotuned when asked)."""
    from fedrnd.engine.autotune import tune_chunk
    from fedrnd.engine.clientmap import default_chunk_size

    engine = algorithms[0][1].engine
    shards = engine.mapper.num_shards
    c = phases.num_clients
    in_flight = -(-min(c, cfg.cohort_size or c) // shards)
    key = jax.random.fold_in(jax.random.key(cfg.seed), 0)
    states, histories = {}, {}
    for tag, alg in algorithms:
        states[tag] = alg.init_template(key, phases.initial, hp)
        stops = _boundaries(cfg, alg, phases.drift_rounds)
        histories[tag] = memory.history_bytes(alg, states[tag], phases.initial,
                                              memory.longest_block(stops))
    budget, source = memory.device_budget(cfg.memory_limit)
    if budget is not None:
        budget = int(distributed.smallest(budget))  # the tightest host decides
    preferred = cfg.chunk_size or default_chunk_size()
    plan = memory.plan(phases, engine, hp, states, histories, shards=shards,
                       in_flight=in_flight, preferred_chunk=preferred,
                       explicit_chunk=cfg.chunk_size is not None, budget=budget, source=source,
                       eval_batch=cfg.eval_batch)
    tuned = None
    if cfg.autotune and cfg.chunk_size is None:
        # Timed on this process's devices; process 0's choice is everyone's (same program).
        # phases are not placed yet: local arrays on every process; hp may be spread.
        tuned = tune_chunk(engine, phases.initial, hp if not multiprocess() else to_host(hp),
                           clients_per_device=in_flight, max_chunk=plan.max_chunk,
                           write=distributed.is_primary(), log=log)
        plan = plan.with_chunk(int(distributed.agree(tuned.chunk)))
    if log:
        log(plan.describe())
    return plan, tuned


def _make(a: AlgorithmConfig, engine: Engine, cfg: Config) -> Algorithm:
    opts = dict(a.options)
    opts.setdefault("cohort_size", cfg.cohort_size)
    return make_algorithm(a.name, engine, **opts)


def _block_fn(alg: Algorithm, base_key: jax.Array):
    """A jitted function running rounds ``first .. first + n - 1`` in one scan."""

    def block(state, data, rounds):
        def body(s, r):
            return alg.round(s, data, jax.random.fold_in(base_key, r))

        return jax.lax.scan(body, state, rounds)

    return jax.jit(block, donate_argnums=(0,))


def _boundaries(cfg: Config, alg: Algorithm, drift_rounds: tuple[int, ...] = ()) -> list[int]:
    """Rounds after which the host must act (evaluation, checkpoint, hook, data drift, end)."""
    stops = set(range(cfg.eval_every, cfg.rounds, cfg.eval_every)) | {cfg.rounds}
    stops |= {r for r in drift_rounds if r < cfg.rounds}
    if cfg.checkpoint_every:
        stops |= set(range(cfg.checkpoint_every, cfg.rounds, cfg.checkpoint_every))
    if alg.hook_every:
        stops |= set(range(alg.hook_every, cfg.rounds, alg.hook_every))
    return sorted(stops)


def _run_method(cfg: Config, tag: str, alg: Algorithm, phases: DriftingData,
                host: DriftingData, hp: ClientHParams, out: Path, resume: bool, show: bool,
                verbose: bool, compile_clock: _CompileClock) -> MethodResult:
    """One method's rounds. ``phases``: the placed data; ``host``: the same data readable on
    this host (the same object with one process), for host-side steps and summaries."""
    primary = distributed.is_primary()
    if primary:
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier(f"method:{tag}")
    key = jax.random.key(cfg.seed)
    # Same initial weights for every method: the model init key depends on the seed only.
    init_key = jax.random.fold_in(key, 0)
    c = phases.num_clients
    ledger_up, ledger_down = np.zeros(c), np.zeros(c)
    history: list[dict[str, Any]] = []
    start_round, elapsed, cluster_time, wall0 = 0, 0.0, 0.0, time.perf_counter()

    ckpt = Checkpointer(out / "checkpoints") if cfg.checkpoint_every else None
    if resume and ckpt is not None and ckpt.latest() is not None:
        # Restore into init's structure without running init (no repeated discovery);
        # shapes come from the checkpoint.
        state, meta = ckpt.restore(alg.init_template(init_key, phases.initial, hp))
        state = _place_state(state, alg)
        start_round, elapsed = int(meta["round"]), float(meta["elapsed"])
        cluster_time = float(meta.get("cluster_time", 0.0))
        wall0 -= float(meta.get("wall_time", 0.0))
        ledger_up, ledger_down = np.asarray(meta["bytes_up"]), np.asarray(meta["bytes_down"])
        history = outputs.read_history(out / "metrics.jsonl", upto=start_round)
        distributed.barrier(f"read:{tag}")  # read before process 0 rewrites it
        if verbose:
            print(f"[{tag}] resumed at round {start_round}")
    else:
        if resume and verbose:
            print(f"[{tag}] no checkpoint found; starting from round 0")
        # Clustering compute time: host-side work in init and host hooks (discovery, one-shot
        # clustering, splits), compilation included, waited on so it is not billed to round 1.
        t_init = time.perf_counter()
        state = jax.block_until_ready(alg.init(init_key, host.initial, hp))
        cluster_time = time.perf_counter() - t_init
        # Blocks donate the state; copy so arrays shared with other methods (hp) survive.
        state = _place_state(jax.tree.map(jnp.array, state), alg)
    if primary:
        outputs.rewrite_history(out / "metrics.jsonl", history)

    block = _block_fn(alg, jax.random.fold_in(key, 1))
    # Data is an argument, not a closure: a closed-over array would be baked into the program.
    evaluate_fn = jax.jit(lambda s, d: evaluate_clients(alg.engine.model.apply, *alg.models(s), d,
                                                        alg.engine.mapper, cfg.eval_batch))

    drifted = (np.unique(np.concatenate([e.clients for e in phases.events]))
               if phases.events else None)

    def evaluate(s, d, h):
        # d: the placed data the program runs on; h: the same data on the host.
        scores = {k: np.asarray(v) for k, v in to_host(evaluate_fn(s, d)).items()}
        summary = summarize(scores, np.asarray(h.train_count), np.asarray(h.test_count),
                            np.asarray(h.group))
        if drifted is not None:
            # The clients that switch group in some drift, before and after it, against the rest.
            for k in ("test_acc", "test_loss"):
                summary[f"{k}/drifted"] = float(np.mean(scores[k][drifted]))
                summary[f"{k}/stayed"] = float(np.mean(np.delete(scores[k], drifted)))
        _, assign = alg.models(s)
        if alg.clusters_clients and assign is not None:
            # Against the groups in effect for the rounds just run (they move with drift).
            summary.update(outputs.clustering_scores(to_host(assign), np.asarray(h.group)))
        return scores, summary

    logger = outputs.MetricLogger(out, cfg.tensorboard) if primary else _NoLogger()
    bar = outputs.progress(cfg.rounds, start_round, tag, show)
    per_client: dict[str, np.ndarray] = {}
    final: dict[str, float] = {}
    r = start_round
    data, hdata = phases.at(r), host.at(r)
    block_compile = 0.0
    for stop in _boundaries(cfg, alg, phases.drift_rounds):
        if stop <= r:
            continue
        t0, c0 = time.perf_counter(), compile_clock.seconds
        state, m = block(state, data, jnp.arange(r, stop))
        m = to_host(m)
        elapsed += time.perf_counter() - t0
        block_compile += compile_clock.seconds - c0
        _check_finite(m, tag, stop)
        for i, rr in enumerate(range(r, stop)):
            row: dict[str, Any] = {"round": rr + 1}
            up = down = 0.0
            for k, v in m.items():
                v = np.asarray(v[i])
                if k.startswith("up/"):
                    ledger_up += v
                    up += float(v.sum())
                    row[f"bytes_{k.replace('/', '_')}"] = float(v.sum())
                elif k.startswith("down/"):
                    ledger_down += v
                    down += float(v.sum())
                    row[f"bytes_{k.replace('/', '_')}"] = float(v.sum())
                elif v.ndim == 0:
                    row[k] = float(v)
            row["bytes_up"], row["bytes_down"] = up, down
            row["bytes_per_client"] = float((ledger_up + ledger_down).mean())
            if i < stop - r - 1:
                history.append(row)
                logger.log(row)
        r = stop
        if r % cfg.eval_every == 0 or r == cfg.rounds:
            per_client, final = evaluate(state, data, hdata)
            row.update(final)
        if phases.phase(r) != phases.phase(r - 1):
            # Drift: the following rounds (and the host hook below) see the next phase.
            data, hdata = phases.at(r), host.at(r)
            row["drift_moved"] = float(len(phases.events[phases.phase(r) - 1].clients))
        row["time"] = elapsed
        history.append(row)
        logger.log(row)
        bar.update(stop - bar.n)
        if final:
            bar.set_postfix(acc=f"{final['test_acc/mean']:.3f}")
        if alg.hook_every and r % alg.hook_every == 0 and r < cfg.rounds:
            t_hook = time.perf_counter()
            state = _place_state(jax.block_until_ready(
                alg.host_hook(_host_state(state), hdata, r)), alg)
            cluster_time += time.perf_counter() - t_hook
        if ckpt is not None and (r % cfg.checkpoint_every == 0 or r == cfg.rounds):
            ckpt.save(r, state, {"round": r, "elapsed": elapsed, "bytes_up": ledger_up.tolist(),
                                 "bytes_down": ledger_down.tolist(), "cluster_time": cluster_time,
                                 "wall_time": time.perf_counter() - wall0})
    bar.close()
    logger.close()
    if ckpt is not None:
        ckpt.close()
    if not per_client:  # resumed after the last round: evaluate once more
        per_client, final = evaluate(state, data, hdata)
    # Methods that group clients are scored against the true groups (ARI, NMI) in evaluate.
    final = {**final, "bytes_per_client": float((ledger_up + ledger_down).mean()),
             "time": elapsed, "round_time": elapsed - block_compile}
    ft_per_client, ft_final = finetune_results(cfg, alg, state, data, hp)
    per_client.update(ft_per_client)
    if multiprocess():
        # The result holds the state as host arrays: readable on every process.
        state = to_host(state)
    if primary:  # reports write files; other processes skip them
        final.update(alg.report(state, hdata, out))
    compile_time = compile_clock.seconds
    final.update(ft_final, cluster_time=cluster_time, compile_time=compile_time,
                 wall_time=time.perf_counter() - wall0)
    if verbose:
        print(f"[{tag}] compilation {compile_time:.1f} s (rounds: {block_compile:.1f} s of "
              f"{elapsed:.1f} s)")
    if primary:
        outputs.write_csv(out / "metrics.csv", history)
        outputs.write_json(out / "final.json", final)
        np.savez(out / "per_client.npz", **per_client, bytes_up=ledger_up,
                 bytes_down=ledger_down, group=np.asarray(hdata.group))
    return MethodResult(tag, history, final, per_client, ledger_up, ledger_down, state, elapsed,
                        compile_time)


class _NoLogger:
    def log(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class _CompileClock:
    """Seconds JAX spends tracing, lowering and compiling while it runs (jax.monitoring)."""

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
              "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")

    def __init__(self):
        self.seconds = 0.0

    def _listen(self, event: str, duration: float, **_: Any) -> None:
        if event in self.EVENTS:
            self.seconds += duration

    def __enter__(self) -> _CompileClock:
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc: Any) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)


def _host_state(state: dict) -> dict:
    """The state for a host hook: as is with one process, else gathered to host arrays."""
    return to_host(state) if multiprocess() else state


def _place_state(state: dict, alg: Algorithm) -> dict:
    mapper = alg.engine.mapper
    if mapper.mesh is None:
        return state
    rest = {k: v for k, v in state.items() if k != "clients"}
    placed = mapper.replicate(rest)
    if "clients" in state:
        placed["clients"] = mapper.shard(state["clients"])
    return placed


def _check_finite(metrics: dict, tag: str, round_: int) -> None:
    loss = metrics.get("train_loss")
    if loss is not None and not np.all(np.isfinite(np.asarray(loss))):
        raise FloatingPointError(
            f"[{tag}] training diverged (non-finite loss) by round {round_}; lower local.lr "
            "or check the data for NaNs")
