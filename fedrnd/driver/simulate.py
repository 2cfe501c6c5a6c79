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
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedrnd.algorithms import Algorithm, make_algorithm, method_family
from fedrnd.algorithms.base import TRAIN_LOSS, State, join_state, split_state
from fedrnd.data.drift import DriftingData
from fedrnd.data.federated import FederatedData, check_federated
from fedrnd.driver import distributed, loggers, memory, outputs, rundir
from fedrnd.driver.checkpoint import Checkpointer
from fedrnd.driver.config import (
    AlgorithmConfig,
    Config,
    algorithm_parameters,
    from_dict,
    load_config,
    option_error,
    validate,
)
from fedrnd.driver.protocol import finetune_results
from fedrnd.driver.setup import build_data, build_engine
from fedrnd.engine import ClientHParams, Engine, evaluate_clients, ledger, summarize
from fedrnd.engine import progress as progress_mod
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
             run_dir: str | Path | None = None, progress: bool | str | None = None,
             data: FederatedData | DriftingData | None = None, verbose: bool = True,
             overwrite: bool = False, allow_change: list[str] | tuple = ()) -> SimulationResult:
    """Run every method of ``config`` on the same data and initial weights.

    Args:
      config: a :class:`Config`, a nested dict, a TOML path, or ``None`` for the defaults.
      resume: continue from the last checkpoint in ``run_dir``; refused when the config
        differs from the stored one in a field that changes the computation
        (:mod:`fedrnd.driver.rundir`), except fields named in ``allow_change``.
      run_dir: where outputs go (default ``<out_dir>/<name>``). A directory that already holds
        a run is refused unless ``resume`` or ``overwrite`` (which moves it aside to
        ``<name>.old-<n>``; nothing is ever deleted).
      progress: ``True``/``"auto"`` (bar on a terminal, timed lines otherwise), ``"bar"``,
        ``"log"``, ``False``/``"off"``; default: ``config.progress``.
      data: a prebuilt :class:`FederatedData`, or :class:`DriftingData` for data that drifts
        (skips ``config.data``, including ``config.data.drift``); checked like built data.

    Everything (config, data, every method's options, the memory plan) is validated before
    the first write. ``status.json`` in the run directory follows the run (running /
    finished / failed / interrupted). Ctrl-C or SIGTERM stops after the current block of
    rounds with a checkpoint and raises :class:`~fedrnd.driver.rundir.RunInterrupted`; a
    diverging run raises :class:`~fedrnd.driver.rundir.Diverged` (``[divergence]``).

    The result's ``data`` is the data in effect at the end (after the last drift); with
    several processes, as host arrays (and each method's ``state`` too).

    Multi-host (``num_processes``, :mod:`fedrnd.driver.distributed`): call it on every
    process with the same config; process 0 writes the outputs and prints.
    """
    cfg = _as_config(config)
    if cfg.num_processes == 1:  # num_devices host devices on a CPU, if JAX has not started
        distributed.cpu_devices(cfg.num_devices)
    distributed.initialize(cfg.coordinator, cfg.num_processes, cfg.process_id)
    primary = distributed.is_primary()
    verbose = verbose and primary
    show = (cfg.progress if progress is None else progress) if primary else False
    if run_dir is None:
        rundir.check_name(cfg.name)
        run_dir = Path(cfg.out_dir) / cfg.name
    run_dir = Path(run_dir)
    decision, changes = _preflight(cfg, run_dir, resume, overwrite, allow_change)
    # Informational lines go to the "fedrnd" logger; printed on stdout when verbose and
    # logging is not configured (loggers.console).
    with loggers.console(verbose), progress_mod.mode(show), _Signals() as signals:
        setup = _set_up(cfg, data, loggers.log.info if primary else None)
        # The first write of the run: everything above is validated.
        status = _start(cfg, run_dir, decision, resume, changes, setup.meta) if primary else None
        distributed.barrier("run_dir")
        run = _Run(status, signals, run_dir)
        result = _run_methods(cfg, setup, run, resume and decision == "resume")
    if verbose:
        print(result.table())
    if primary:
        with loggers.console(verbose):
            loggers.log.info(f"outputs: {run_dir}")
    return result


def _preflight(cfg: Config, run_dir: Path, resume: bool, overwrite: bool,
               allow_change: list[str] | tuple) -> tuple[str, list]:
    """Read-only: refuse a directory that cannot be used before anything is built or written.
    Process 0 decides (the others would see its writes); every process learns the outcome:
    ``("new" | "resume" | "overwrite", the config changes allowed on resume)``."""
    decisions = ("new", "resume", "overwrite")
    decision, changes, refused = "new", [], None
    if distributed.is_primary():
        try:
            decision, changes = rundir.preflight(
                run_dir, resume=resume, overwrite=overwrite, config=cfg.to_dict(),
                allow_change=list(allow_change), defaults=Config().to_dict())
        except rundir.RunDirError as e:
            refused = e
    code = distributed.agree(-1 if refused is not None else decisions.index(decision))
    if code < 0:
        raise refused or rundir.RunDirError(
            f"process 0 refused the run directory {run_dir}; see its message")
    return decisions[code], changes


@dataclasses.dataclass
class _Setup:
    """What every method of a run shares: the data (placed for the program, and on the host),
    client hyperparameters, the methods by tag, the memory plan and the run's metadata."""

    phases: DriftingData
    host: DriftingData
    hp: ClientHParams
    algorithms: list[tuple[str, Algorithm]]
    plan: memory.MemoryPlan
    meta: dict[str, Any]


def _set_up(cfg: Config, data: FederatedData | DriftingData | None, log) -> _Setup:
    """Data, engine, methods (their options checked against the data) and memory plan, all
    validated before the first write; the data placed on the devices last."""
    if data is None:
        # Built on the host (the CPU device) so the memory plan comes before placement.
        with _on_host():
            data, dataset_info = build_data(cfg, log=log)
    else:
        check_federated(data)
        dataset_info = {"name": data.name, "clients": data.num_clients}
        if isinstance(data, DriftingData):
            dataset_info["drift"] = data.summary()
    phases = data if isinstance(data, DriftingData) else DriftingData.static(data)
    late = [r for r in phases.drift_rounds if r >= cfg.rounds]
    if late:
        raise ValueError(f"data drifts after round(s) {late}, but the run has only "
                         f"rounds={cfg.rounds}")
    engine, hp, mapper = build_engine(cfg, phases.initial)
    algorithms = _make_all(cfg, engine, phases)
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
    host = phases if multiprocess() else placed
    meta = outputs.run_metadata(cfg, placed.initial, dataset_info, mapper)
    meta.update(memory=plan.to_dict(), distributed=distributed.describe())
    if tuned is not None:
        meta["autotune"] = tuned.to_dict()
    return _Setup(placed, host, hp, algorithms, plan, meta)


def _make_all(cfg: Config, engine: Engine, phases: DriftingData) -> list[tuple[str, Algorithm]]:
    """Every method of the config by tag, its options checked against every data phase."""
    algorithms = []
    for i, a in enumerate(cfg.algorithms):
        try:
            alg = _make(a, engine, cfg)
            for d in phases.phases:
                alg.validate(d)
        except (TypeError, ValueError) as e:
            # Options only the data can check (e.g. too many clusters for the clients).
            raise option_error(f"algorithms.{i}.options", f"algorithms.{i}.name = "
                               f"{a.name!r}", e, list(algorithm_parameters(a.name))) from None
        algorithms.append((a.tag, alg))
    return algorithms


def _start(cfg: Config, run_dir: Path, decision: str, resume: bool, changes: list,
           meta: dict[str, Any]) -> rundir.Status:
    """Process 0 prepares the run directory (moving an earlier run aside on ``overwrite``) and
    writes the status, config and metadata."""
    cfg_dict = cfg.to_dict()
    moved = rundir.prepare(run_dir, decision)
    if moved is not None:
        loggers.log.info(f"the earlier run in {run_dir} was moved to {moved}")
    if resume and decision == "new":
        loggers.log.info(f"nothing to resume in {run_dir}; starting a new run")
    status = rundir.Status(run_dir, cfg_dict, resumed=decision == "resume",
                           changes=changes, moved=moved)
    status.update()
    outputs.write_json(run_dir / "config.json", cfg_dict)
    outputs.write_json(run_dir / "metadata.json", meta)
    return status


def _run_methods(cfg: Config, setup: _Setup, run: _Run, resume: bool) -> SimulationResult:
    """Every method in turn, then the run's summary; the status says how the run ended."""
    try:
        results = {}
        for tag, alg in setup.algorithms:
            with _CompileClock() as clock:
                results[tag] = _run_method(cfg, tag, alg, setup.phases, setup.host, setup.hp,
                                           run.run_dir / tag, resume, clock, run)
        host = setup.host
        result = SimulationResult(cfg, run.run_dir, results, host.at(cfg.rounds),
                                  host if host.events else None, setup.plan)
        if distributed.is_primary():
            outputs.write_summary(run.run_dir, results)
            outputs.plot_accuracy(run.run_dir / "accuracy.png", results, title=cfg.name)
            outputs.plot_accuracy_by_family(
                run.run_dir, results, {tag: method_family(alg) for tag, alg in setup.algorithms},
                title=cfg.name)
    except KeyboardInterrupt:
        # A second Ctrl-C, or one outside the rounds loop: the last checkpoint stands.
        raise run.interrupted(checkpointed=None) from None
    except rundir.RunInterrupted as e:
        run.set(state="interrupted", reason=str(e))
        raise
    except BaseException as e:
        run.set(state="failed", reason=f"{type(e).__name__}: {e}")
        raise
    run.set(state="finished", round=cfg.rounds)
    return result


class _Signals:
    """SIGINT and SIGTERM while a run is in its rounds loop stop it at the next block boundary.

    Inside :meth:`deferring` a first signal only sets :attr:`requested` (the loop then saves
    a checkpoint and stops); a second one, or one outside the loop (data loading, discovery),
    raises ``KeyboardInterrupt`` at once. Handlers are installed only in the main thread.
    """

    def __init__(self):
        self.requested: str | None = None
        self._defer = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._old[sig] = signal.signal(sig, self._handle)
                except (ValueError, OSError):  # e.g. an embedding interpreter
                    pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._defer and self.requested is None:
            self.requested = name
            progress_mod.note(f"{name}: stopping after the current block of rounds with a "
                              "checkpoint (press Ctrl-C again to stop at once)")
            return
        raise KeyboardInterrupt(name)

    @contextlib.contextmanager
    def deferring(self):
        self._defer = True
        try:
            yield
        finally:
            self._defer = False


class _Run:
    """What a method's loop reports to the run: status, interrupts, where it stands."""

    def __init__(self, status: rundir.Status | None, signals: _Signals, run_dir: Path):
        self.status, self.signals, self.run_dir = status, signals, run_dir
        self.method: str | None = None
        self.round = 0
        self.checkpoint_round: int | None = None

    def set(self, **kw: Any) -> None:
        if self.status is not None:
            self.status.update(**kw)

    def at(self, method: str, round_: int) -> None:
        self.method, self.round = method, round_
        self.set(method=method, round=round_)

    def warn(self, message: str) -> None:
        progress_mod.note(f"warning: {message}")
        if self.status is not None:
            self.status.warn(message)

    def interrupted(self, checkpointed: bool | None) -> rundir.RunInterrupted:
        if checkpointed is None:
            checkpointed = self.checkpoint_round is not None
        r = self.checkpoint_round if self.checkpoint_round is not None else 0
        e = rundir.RunInterrupted(self.run_dir, self.method, r, checkpointed)
        self.set(state="interrupted", reason=str(e), round=r)
        return e


def _on_host():
    """Build on the host's CPU device when the default device is an accelerator."""
    if jax.default_backend() == "cpu":
        return contextlib.nullcontext()
    try:
        return jax.default_device(jax.local_devices(backend="cpu")[0])
    except RuntimeError:  # no CPU backend (JAX_PLATFORMS without cpu): build where we are
        return contextlib.nullcontext()


def _place_data(phases: DriftingData, mapper) -> DriftingData:
    """Per-client arrays split over the mesh, the pool replicated (or all on the device);
    the phases share the first phase's pool."""
    first = mapper.place_data(phases.initial)
    rest = [mapper.place_data(p, pool=(first.x, first.y)) for p in phases.phases[1:]]
    return dataclasses.replace(phases, phases=(first, *rest))


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
    states, histories, rounds = {}, {}, {}
    for tag, alg in algorithms:
        states[tag] = alg.init_template(key, phases.initial, hp)
        rounds[tag] = alg.round_bytes(states[tag], phases.initial, shards)
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
                       eval_batch=cfg.eval_batch, rounds=rounds)
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
                host: DriftingData, hp: ClientHParams, out: Path, resume: bool,
                compile_clock: _CompileClock, run: _Run) -> MethodResult:
    """One method's run: restore or init, then blocks of rounds with evaluation, ledger, host
    hooks, checkpoints and interrupts between them (:class:`_MethodLoop`), then the final
    figures. ``phases``: the placed data; ``host``: the same data readable on this host (the
    same object with one process), for host-side steps and summaries."""
    if distributed.is_primary():
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier(f"method:{tag}")
    ckpt = Checkpointer(out / "checkpoints") if cfg.checkpoint_every else None
    run.at(tag, 0)
    run.checkpoint_round = None
    state, tally = _restore_or_init(cfg, tag, alg, phases, host, hp, out, ckpt, resume, run)
    loop = _MethodLoop(cfg, tag, alg, phases, host, out, ckpt, compile_clock, run, tally)
    state = loop.pending_hook(state)
    state = loop.rounds(state)
    return loop.finish(state, hp)


@dataclasses.dataclass
class _Tally:
    """One method's host-side counters; a checkpoint stores them (:meth:`meta`) beside the state.

    ``bytes_up``, ``bytes_down``: the ledger, bytes per client ``[C]`` summed over the rounds
    run; ``elapsed``: seconds spent in blocks of rounds; ``cluster_time``: seconds of host-side
    work (init, host hooks); ``wall0``: ``perf_counter`` at the run's start, moved back by the
    wall time of the runs it resumes; ``hook_pending``: the checkpoint's round still owes its
    host hook (a run extended past its last round).
    """

    bytes_up: np.ndarray
    bytes_down: np.ndarray
    history: list[dict[str, Any]]
    round: int = 0
    elapsed: float = 0.0
    cluster_time: float = 0.0
    wall0: float = 0.0
    hook_pending: bool = False

    @classmethod
    def fresh(cls, num_clients: int, wall0: float) -> _Tally:
        return cls(np.zeros(num_clients), np.zeros(num_clients), [], wall0=wall0)

    @classmethod
    def from_meta(cls, meta: dict[str, Any], history: list[dict[str, Any]],
                  wall0: float) -> _Tally:
        return cls(np.asarray(meta["bytes_up"]), np.asarray(meta["bytes_down"]), history,
                   round=int(meta["round"]), elapsed=float(meta["elapsed"]),
                   cluster_time=float(meta.get("cluster_time", 0.0)),
                   wall0=wall0 - float(meta.get("wall_time", 0.0)),
                   hook_pending=bool(meta.get("hook_pending", False)))

    def meta(self, cfg: Config, alg: Algorithm) -> dict[str, Any]:
        r = self.round
        return {"round": r, "elapsed": self.elapsed, "bytes_up": self.bytes_up.tolist(),
                "bytes_down": self.bytes_down.tolist(), "cluster_time": self.cluster_time,
                "wall_time": time.perf_counter() - self.wall0,
                "config_hash": rundir.config_hash(cfg.to_dict()),
                # The last round has no hook; a run extended past it must run this one.
                "hook_pending": bool(alg.hook_every and r % alg.hook_every == 0
                                     and r >= cfg.rounds)}

    def bytes_per_client(self) -> float:
        return float((self.bytes_up + self.bytes_down).mean())

    def account(self, metrics: dict[str, Any], first: int, stop: int) -> list[dict[str, Any]]:
        """One history row per round ``first .. stop - 1`` of a block's ``metrics`` (leaves
        ``[n, ...]``): its scalars and its traffic (``up/<kind>``, ``down/<kind>`` ``[n, C]``),
        which the ledger adds up per client."""
        rows = []
        for i, rr in enumerate(range(first, stop)):
            row: dict[str, Any] = {"round": rr + 1}
            up = down = 0.0
            for k, v in metrics.items():
                v = np.asarray(v[i])
                if k.startswith(ledger.UP):
                    self.bytes_up += v
                    up += float(v.sum())
                    row[f"bytes_{k.replace('/', '_')}"] = float(v.sum())
                elif k.startswith(ledger.DOWN):
                    self.bytes_down += v
                    down += float(v.sum())
                    row[f"bytes_{k.replace('/', '_')}"] = float(v.sum())
                elif v.ndim == 0:
                    row[k] = float(v)
            row["bytes_up"], row["bytes_down"] = up, down
            row["bytes_per_client"] = self.bytes_per_client()
            rows.append(row)
        return rows


def _restore_or_init(cfg: Config, tag: str, alg: Algorithm, phases: DriftingData,
                     host: DriftingData, hp: ClientHParams, out: Path,
                     ckpt: Checkpointer | None, resume: bool, run: _Run) -> tuple[Any, _Tally]:
    """The placed state and counters to start from: the last checkpoint when resuming (restored
    into init's structure without running init: no repeated discovery), else ``alg.init``."""
    primary, wall0 = distributed.is_primary(), time.perf_counter()
    # Same initial weights for every method: the model init key depends on the seed only.
    init_key = jax.random.fold_in(jax.random.key(cfg.seed), 0)
    if resume and ckpt is not None and ckpt.latest() is not None:
        # Shapes come from the checkpoint.
        state, meta = ckpt.restore(alg.init_template(init_key, phases.initial, hp))
        state = _place_state(state, alg)
        start = int(meta["round"])
        tally = _Tally.from_meta(meta, outputs.read_history(out / "metrics.jsonl", upto=start),
                                 wall0)
        distributed.barrier(f"read:{tag}")  # read before process 0 rewrites it
        run.at(tag, start)
        run.checkpoint_round = start
        if primary:
            loggers.log.info(f"[{tag}] resumed at round {start}")
    else:
        tally = _Tally.fresh(phases.num_clients, wall0)
        if resume and primary:
            loggers.log.info(f"[{tag}] no checkpoint found; starting from round 0")
        # Clustering compute time: host-side work in init and host hooks (discovery, one-shot
        # clustering, splits), compilation included, waited on so it is not billed to round 1.
        t_init = time.perf_counter()
        state = jax.block_until_ready(alg.init(init_key, host.initial, hp))
        tally.cluster_time = time.perf_counter() - t_init
        # Blocks donate the state; copy so arrays shared with other methods (hp) survive.
        state = _place_state(jax.tree.map(jnp.array, state), alg)
    if primary:
        outputs.rewrite_history(out / "metrics.jsonl", tally.history)
    return state, tally


class _MethodLoop:
    """One method's host loop: blocks of rounds and, between them, evaluation, logging, the
    divergence watch, the method's host hook, checkpoints and interrupts."""

    def __init__(self, cfg: Config, tag: str, alg: Algorithm, phases: DriftingData,
                 host: DriftingData, out: Path, ckpt: Checkpointer | None,
                 compile_clock: _CompileClock, run: _Run, tally: _Tally):
        self.cfg, self.tag, self.alg, self.out, self.run = cfg, tag, alg, out, run
        self.phases, self.host, self.ckpt, self.tally = phases, host, ckpt, tally
        self.clock = compile_clock
        self.primary = distributed.is_primary()
        self.start_round = tally.round
        self.block = _block_fn(alg, jax.random.fold_in(jax.random.key(cfg.seed), 1))
        # Data is an argument, not a closure: a closed-over array would be baked into the program.
        self.evaluate_fn = jax.jit(lambda s, d: evaluate_clients(
            alg.engine.model.apply, *alg.models(s), d, alg.engine.mapper, cfg.eval_batch))
        self.drifted = (np.unique(np.concatenate([e.clients for e in phases.events]))
                        if phases.events else None)
        self.logger = loggers.open_loggers(cfg, out, tag) if self.primary else _NoLogger()
        self.per_client: dict[str, np.ndarray] = {}
        self.final: dict[str, float] = {}
        # d: the placed data the program runs on; h: the same data on the host.
        self.data, self.hdata = phases.at(tally.round), host.at(tally.round)
        self.block_compile = 0.0  # compilation seconds within the blocks of rounds

    def evaluate(self, state: Any) -> None:
        """Per-client scores and their summary (clustering scores too) into ``per_client``,
        ``final``, on the data of the rounds just run."""
        h = self.hdata
        scores = {k: np.asarray(v)
                  for k, v in to_host(self.evaluate_fn(state, self.data)).items()}
        summary = summarize(scores, np.asarray(h.train_count), np.asarray(h.test_count),
                            np.asarray(h.group))
        if self.drifted is not None:
            # The clients that switch group in some drift, before and after it, against the rest.
            for k in ("test_acc", "test_loss"):
                summary[f"{k}/drifted"] = float(np.mean(scores[k][self.drifted]))
                summary[f"{k}/stayed"] = float(np.mean(np.delete(scores[k], self.drifted)))
        _, assign = self.alg.models(state)
        if self.alg.clusters_clients and assign is not None:
            # Against the groups in effect for the rounds just run (they move with drift).
            summary.update(outputs.clustering_scores(to_host(assign), np.asarray(h.group)))
        self.per_client, self.final = scores, summary

    def host_hook(self, state: Any, r: int) -> Any:
        """The method's host hook after round ``r``, timed as clustering compute."""
        t_hook = time.perf_counter()
        state = _place_state(jax.block_until_ready(
            self.alg.host_hook(_host_state(state), self.hdata, r)), self.alg)
        self.tally.cluster_time += time.perf_counter() - t_hook
        return state

    def pending_hook(self, state: Any) -> Any:
        """A run extended past the round it ended at: that round's hook has not run yet."""
        if self.tally.hook_pending and self.tally.round < self.cfg.rounds:
            state = self.host_hook(state, self.tally.round)
        return state

    def run_block(self, state: Any, r: int, stop: int) -> tuple[Any, list[dict[str, Any]]]:
        """Rounds ``r + 1 .. stop`` in one compiled block; their history rows."""
        if r == self.start_round:
            progress_mod.note(f"[{self.tag}] compiling the round program "
                              f"(rounds {r + 1}-{stop}) ...")
        t0, c0 = time.perf_counter(), self.clock.seconds
        state, m = self.block(state, self.data, jnp.arange(r, stop))
        m = to_host(m)
        self.tally.elapsed += time.perf_counter() - t0
        self.block_compile += self.clock.seconds - c0
        _check_finite(m, self.tag, stop)
        return state, self.tally.account(m, r, stop)

    def rounds(self, state: Any) -> Any:
        """Every block of rounds from the start round to ``cfg.rounds``, with what the host does
        after each: the last round's row gets the evaluation, drift and time."""
        cfg, tally, phases = self.cfg, self.tally, self.phases
        watch = _Divergence(cfg, self.tag, phases.num_classes, tally.history, self.run)
        with progress_mod.task(f"[{self.tag}] rounds", total=cfg.rounds, unit="round",
                               initial=self.start_round) as bar, self.run.signals.deferring():
            for stop in _boundaries(cfg, self.alg, phases.drift_rounds):
                if stop <= tally.round:
                    continue
                state, rows = self.run_block(state, tally.round, stop)
                *done, row = rows
                for d in done:
                    self.log(d)
                r = tally.round = stop
                if r % cfg.eval_every == 0 or r == cfg.rounds:
                    self.evaluate(state)
                    row.update(self.final)
                if phases.phase(r) != phases.phase(r - 1):
                    # Drift: the following rounds (and the host hook below) see the next phase.
                    self.data, self.hdata = phases.at(r), self.host.at(r)
                    row["drift_moved"] = float(len(phases.events[phases.phase(r) - 1].clients))
                row["time"] = tally.elapsed
                self.log(row)
                bar.update(stop - bar.n)
                if self.final:
                    bar.set_postfix(acc=f"{self.final['test_acc/mean']:.3f}")
                watch.check(row, r)  # before a host hook spends time on a diverged state
                if self.alg.hook_every and r % self.alg.hook_every == 0 and r < cfg.rounds:
                    state = self.host_hook(state, r)
                self.run.at(self.tag, r)
                self.checkpoint_or_stop(state, r)
        self.close()
        watch.final(self.final.get("test_acc/mean") if self.final else None)
        return state

    def log(self, row: dict[str, Any]) -> None:
        self.tally.history.append(row)
        self.logger.log(row)

    def checkpoint_or_stop(self, state: Any, r: int) -> None:
        """Checkpoint when due; after a Ctrl-C / SIGTERM during the block, checkpoint here (a
        block boundary) and stop."""
        stopping = self.run.signals.requested is not None and r < self.cfg.rounds
        ckpt = self.ckpt
        due = ckpt is not None and (r % self.cfg.checkpoint_every == 0 or r == self.cfg.rounds)
        if ckpt is not None and (due or stopping):
            ckpt.save(r, state, self.tally.meta(self.cfg, self.alg))
            self.run.checkpoint_round = r
        if stopping:
            self.close()
            raise self.run.interrupted(checkpointed=ckpt is not None)

    def close(self) -> None:
        self.logger.close()
        if self.ckpt is not None:
            self.ckpt.close()

    def finish(self, state: Any, hp: ClientHParams) -> MethodResult:
        """The method's final figures, fine-tuned evaluation and report, written out."""
        cfg, tally, out = self.cfg, self.tally, self.out
        if not self.per_client:  # resumed after the last round: evaluate once more
            self.evaluate(state)
        per_client, elapsed = self.per_client, tally.elapsed
        # Methods that group clients are scored against the true groups (ARI, NMI) in evaluate.
        final = {**self.final, "bytes_per_client": tally.bytes_per_client(),
                 "time": elapsed, "round_time": elapsed - self.block_compile}
        ft_per_client, ft_final = finetune_results(cfg, self.alg, state, self.data, hp)
        per_client.update(ft_per_client)
        if multiprocess():
            # The result holds the state as host arrays: readable on every process.
            state = to_host(state)
        if self.primary:  # the driver writes what the report found; other processes skip it
            final.update(outputs.write_report(out, self.alg.report(state, self.hdata), self.tag))
        compile_time = self.clock.seconds
        final.update(ft_final, cluster_time=tally.cluster_time, compile_time=compile_time,
                     wall_time=time.perf_counter() - tally.wall0)
        if self.primary:
            loggers.log.info(f"[{self.tag}] compilation {compile_time:.1f} s (rounds: "
                             f"{self.block_compile:.1f} s of {elapsed:.1f} s)")
            outputs.write_csv(out / "metrics.csv", tally.history)
            outputs.savez(out / "per_client.npz", **per_client, bytes_up=tally.bytes_up,
                          bytes_down=tally.bytes_down, group=np.asarray(self.hdata.group))
            # Last: final.json exists only when the method finished and all else is written.
            outputs.write_json(out / "final.json", final)
        return MethodResult(self.tag, tally.history, final, per_client, tally.bytes_up,
                            tally.bytes_down, state, elapsed, compile_time)


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


def _host_state(state: State) -> State:
    """The state for a host hook: as is with one process, else gathered to host arrays."""
    return to_host(state) if multiprocess() else state


def _place_state(state: State, alg: Algorithm) -> State:
    """The per-client part split over the mesh, the rest replicated (:func:`split_state`)."""
    mapper = alg.engine.mapper
    if mapper.mesh is None:
        return state
    rest, clients = split_state(state)
    return join_state(mapper.replicate(rest), None if clients is None else mapper.shard(clients))


def _check_finite(metrics: dict, tag: str, round_: int) -> None:
    loss = metrics.get(TRAIN_LOSS)
    if loss is not None and not np.all(np.isfinite(np.asarray(loss))):
        raise rundir.Diverged(
            f"[{tag}] training diverged (non-finite loss) by round {round_}; lower local.lr "
            "or check the data for NaNs")


class _Divergence:
    """The ``[divergence]`` rules of one method's run (see :class:`DivergenceConfig`)."""

    def __init__(self, cfg: Config, tag: str, num_classes: int, history: list[dict], run: _Run):
        self.cfg, self.tag, self.run = cfg.divergence, tag, run
        self.lr = cfg.local.lr
        self.k = max(int(num_classes), 2)
        self.chance = 1.0 / self.k
        self.loss_limit = self.cfg.loss_factor * max(math.log(self.k), 1.0)
        accs = [h["test_acc/mean"] for h in history if "test_acc/mean" in h]
        self.best = max(accs) if accs else None
        self.warned: set[str] = set()

    def check(self, row: dict[str, Any], round_: int) -> None:
        """After a block: the last round's mean training loss, and the evaluation if any."""
        if self.cfg.action == "off":
            return
        loss, acc = row.get(TRAIN_LOSS), row.get("test_acc/mean")
        margin = self.cfg.chance_margin
        if loss is not None and loss > self.loss_limit:
            self._act("loss", round_, f"the mean training loss {loss:.4g} is above "
                      f"divergence.loss_factor x max(ln {self.k}, 1) = {self.loss_limit:.3g} "
                      f"(a uniform guess scores ln {self.k} = {math.log(self.k):.3g})")
        if acc is not None:
            if (self.best is not None and self.best >= self.chance + 2 * margin
                    and acc <= self.chance + margin):
                self._act("accuracy", round_, f"the mean client test accuracy collapsed to "
                          f"{acc:.3f} (chance: {self.chance:.3f}) after reaching {self.best:.3f}")
            self.best = acc if self.best is None else max(self.best, acc)

    def final(self, acc: float | None) -> None:
        """A run whose accuracy never left chance finishes, with a warning."""
        if (self.cfg.action != "off" and acc is not None and self.best is not None
                and self.best <= self.chance + self.cfg.chance_margin):
            self.run.warn(f"[{self.tag}] the mean client test accuracy never rose above chance "
                          f"(best {self.best:.3f}, chance {self.chance:.3f}); check local.lr "
                          f"(= {self.lr}) and the data")

    def _act(self, kind: str, round_: int, what: str) -> None:
        msg = (f"[{self.tag}] training diverged by round {round_}: {what}. Lower local.lr "
               f"(now {self.lr}), or set divergence.action = \"warn\" (or \"off\") to go on")
        if self.cfg.action == "stop":
            raise rundir.Diverged(msg)
        if kind not in self.warned:
            self.warned.add(kind)
            self.run.warn(msg)
