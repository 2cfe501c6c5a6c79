"""Typed run configuration: plain data, loadable from TOML, overridable with ``key=value``.

A config file is TOML; every field below can be set in it or on the command line with
``--set section.field=value`` (values parsed as TOML: ``--set local.lr=0.1``,
``--set 'algorithms=["fedavg","local"]'``). :func:`validate` checks every field against its
allowed values before anything is loaded or compiled.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomllib


@dataclasses.dataclass
class DriftConfig:
    """Clients switching hidden group mid-run (``[data.drift]``; see :mod:`fedrnd.data.drift`).

    After ``at_round`` rounds (one round or a list), ``fraction`` of the clients, or the given
    ``clients`` ids, move to a different random group: their own examples, seen through the new
    group's transform. ``seed`` defaults to the run's seed.
    """

    at_round: int | list[int] | None = None
    fraction: float | None = None
    clients: list[int] | None = None
    seed: int | None = None

    @property
    def rounds(self) -> list[int]:
        r = self.at_round
        return [] if r is None else [r] if isinstance(r, int) else list(r)


@dataclasses.dataclass
class DataConfig:
    """What data and how it is split. ``source``: a name from ``fedrnd list`` or ``tfds:<name>``.

    ``drift``: optional :class:`DriftConfig`; clients switch group mid-run.
    """

    source: str = "digits"
    source_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    partition: str = "rotation"
    partition_options: dict[str, Any] = dataclasses.field(
        default_factory=lambda: {"num_groups": 4})
    num_clients: int = 20
    drift: DriftConfig | None = None


@dataclasses.dataclass
class ModelConfig:
    """Task model by name (``logreg``, ``mlp``, ``cnn``, ``resnet``) and its options."""

    name: str = "mlp"
    options: dict[str, Any] = dataclasses.field(default_factory=lambda: {"hidden": [64]})


@dataclasses.dataclass
class LocalConfig:
    """Local training of every client per round.

    ``optimizer``: one kind, a mix ``{sgd = 0.5, adam = 0.5}`` (proportions of the clients,
    assigned in a seeded random order), or one kind per ground-truth group
    ``["sgd", "adam", "prox_sgd"]`` (group ``g`` uses entry ``g``; the list is cycled when the
    data has more groups); ``lr``: one value or one per kind.
    ``steps`` (if set) replaces ``epochs``. ``schedule``: lr multiplier over rounds.
    ``path``: ``auto`` (the exact low-rank fast path where it applies and pays), ``general`` or
    ``lowrank`` (forced; see :mod:`fedrnd.engine.lowrank`).
    """

    batch_size: int = 16
    epochs: int = 1
    steps: int | None = None
    optimizer: str | dict[str, float] | list[str] = "sgd"
    lr: float | dict[str, float] = 0.1
    prox_mu: float = 0.0
    optimizer_options: dict[str, float] = dataclasses.field(default_factory=dict)
    schedule: str = "constant"
    schedule_options: dict[str, float] = dataclasses.field(default_factory=dict)
    path: str = "auto"


@dataclasses.dataclass
class DivergenceConfig:
    """When a run counts as diverged (``[divergence]``), checked after every block of rounds.

    ``action``: ``stop`` (the run ends with status ``failed`` naming the method and round),
    ``warn`` (a warning in the log and in ``status.json``; the run goes on) or ``off``.
    A run diverges when the mean training loss of a block's last round exceeds
    ``loss_factor`` x max(ln(classes), 1), i.e. far above the loss of a uniform guess, or when
    the mean client test accuracy collapses to within ``chance_margin`` of chance (1 / classes)
    after an earlier evaluation was at least 2 x ``chance_margin`` above it. A non-finite loss
    always stops the run.
    """

    action: str = "stop"
    loss_factor: float = 5.0
    chance_margin: float = 0.05


@dataclasses.dataclass
class AlgorithmConfig:
    """One method to run: its registered ``name``, ``options`` and a ``label`` for outputs."""

    name: str = "fedavg"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    label: str | None = None

    @property
    def tag(self) -> str:
        return self.label or self.name


@dataclasses.dataclass
class Config:
    """A whole simulation: data, model, local training, methods to compare, schedule, outputs."""

    name: str = "default"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    local: LocalConfig = dataclasses.field(default_factory=LocalConfig)
    algorithms: list[AlgorithmConfig] = dataclasses.field(
        default_factory=lambda: [AlgorithmConfig("fedavg"), AlgorithmConfig("local")])
    rounds: int = 30
    seed: int = 0
    cohort_size: int | None = None
    eval_every: int = 5
    checkpoint_every: int = 10
    out_dir: str = "runs"
    chunk_size: int | None = None
    num_devices: int = 1
    eval_batch: int = 0
    tensorboard: bool = False
    progress: bool = True
    finetune: bool = False
    finetune_epochs: int = 1
    autotune: bool = False
    memory_limit: int | str | None = None
    coordinator: str | None = None
    num_processes: int = 1
    process_id: int | None = None
    divergence: DivergenceConfig = dataclasses.field(default_factory=DivergenceConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "local": LocalConfig,
             "divergence": DivergenceConfig}


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"config: unknown field(s) {[f'{where}{u}' for u in unknown]}; "
                         f"allowed in {where or 'top level'}: {sorted(fields)}")
    return cls(**raw)


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a :class:`Config` from nested plain data (as read from TOML/JSON)."""
    raw = dict(raw)
    kw: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        if name in raw:
            section = raw.pop(name)
            if not isinstance(section, dict):
                raise ValueError(f"config: [{name}] must be a table, got {section!r}")
            if name == "data" and section.get("drift") is not None:
                drift = section["drift"]
                if not isinstance(drift, dict):
                    raise ValueError(f"config: [data.drift] must be a table, got {drift!r}")
                section = {**section, "drift": _build(DriftConfig, drift, "data.drift.")}
            kw[name] = _build(cls, section, f"{name}.")
    if "algorithms" in raw:
        algs = raw.pop("algorithms")
        if isinstance(algs, str | dict):
            algs = [algs]
        if not isinstance(algs, list):
            raise ValueError("config: algorithms must be a list of names or tables")
        kw["algorithms"] = [AlgorithmConfig(a) if isinstance(a, str)
                            else _build(AlgorithmConfig, a, "algorithms.") for a in algs]
    cfg = _build(Config, {**raw, **kw}, "")
    return cfg


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to nested plain data (list items by index: ``algorithms.0``)."""
    raw = json.loads(json.dumps(raw))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = raw
        for p in parts[:-1]:
            if isinstance(node, list):
                node = node[int(p)]
            else:
                if node.get(p) is None:  # an unset optional section, e.g. data.drift
                    node[p] = {}
                node = node[p]
        last = parts[-1]
        if isinstance(node, list):
            node[int(last)] = _parse_value(text)
        else:
            node[last] = _parse_value(text)
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML config (``None`` = built-in defaults) and apply ``--set`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {str(p)!r} does not exist")
        with open(p, "rb") as f:
            try:
                raw = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"config file {str(p)!r} is not valid TOML: {e}") from None
    if overrides:
        # Overrides act on the fully resolved tree, so any field can be set, even one the
        # file leaves at its default.
        raw = apply_overrides(from_dict(raw).to_dict(), overrides)
    return validate(from_dict(raw))


def _check_type(value: Any, hint: Any, where: str) -> None:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        errs = []
        for a in args:
            try:
                _check_type(value, a, where)
                return
            except ValueError as e:
                errs.append(str(e))
        raise ValueError(f"config: {where} = {value!r} has the wrong type; expected {hint}")
    if hint is type(None):
        if value is not None:
            raise ValueError(f"config: {where} must be empty")
        return
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config: {where} must be a table, got {value!r}")
        return
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"config: {where} must be a list, got {value!r}")
        return
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return
    if isinstance(hint, type) and (not isinstance(value, hint) or
                                   (hint is int and isinstance(value, bool))):
        raise ValueError(f"config: {where} = {value!r} must be of type {hint.__name__}")


def _check_types(obj: Any, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        _check_type(v, hints[f.name], prefix + f.name)
        if dataclasses.is_dataclass(v):
            _check_types(v, prefix + f.name + ".")


def validate(cfg: Config) -> Config:
    """Check every field; raise ``ValueError`` naming the field and the allowed values."""
    from fedrnd.algorithms import ALGORITHMS, algorithm_options
    from fedrnd.engine.optim import OPTIMIZERS
    from fedrnd.models import MODELS

    _check_types(cfg)
    for i, a in enumerate(cfg.algorithms):
        _check_types(a, f"algorithms.{i}.")

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ValueError(f"config: {msg}")

    need(cfg.rounds >= 1, f"rounds must be >= 1, got {cfg.rounds}")
    need(cfg.eval_every >= 1, f"eval_every must be >= 1, got {cfg.eval_every}")
    need(cfg.checkpoint_every >= 0, f"checkpoint_every must be >= 0 (0 = never), got "
                                    f"{cfg.checkpoint_every}")
    need(cfg.data.num_clients >= 1, f"data.num_clients must be >= 1, got {cfg.data.num_clients}")
    need(cfg.cohort_size is None or 1 <= cfg.cohort_size <= cfg.data.num_clients,
         f"cohort_size must be in [1, data.num_clients={cfg.data.num_clients}], got "
         f"{cfg.cohort_size}")
    need(cfg.chunk_size is None or cfg.chunk_size >= 1,
         f"chunk_size must be >= 1 (or unset for the backend default), got {cfg.chunk_size}")
    need(cfg.num_devices >= 1, f"num_devices must be >= 1, got {cfg.num_devices}")
    _validate_scale(cfg, need)
    need(cfg.finetune_epochs >= 1, f"finetune_epochs must be >= 1 (finetune = false turns the "
                                   f"fine-tune evaluation off), got {cfg.finetune_epochs}")
    need(cfg.model.name in MODELS, f"model.name={cfg.model.name!r} is unknown; allowed: "
                                   f"{sorted(MODELS)}")
    loc = cfg.local
    need(loc.batch_size >= 1, f"local.batch_size must be >= 1, got {loc.batch_size}")
    need(loc.epochs >= 1, f"local.epochs must be >= 1, got {loc.epochs}")
    need(loc.steps is None or loc.steps >= 1, f"local.steps must be >= 1, got {loc.steps}")
    kinds = [loc.optimizer] if isinstance(loc.optimizer, str) else list(loc.optimizer)
    need(len(kinds) >= 1, "local.optimizer must name at least one optimizer")
    for k in kinds:
        need(isinstance(k, str) and k in OPTIMIZERS,
             f"local.optimizer {k!r} is unknown; allowed: {list(OPTIMIZERS)}")
    if isinstance(loc.optimizer, dict):
        w = list(loc.optimizer.values())
        need(all(isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in w)
             and sum(w) > 0, f"local.optimizer mix proportions must be numbers >= 0 with a "
                             f"positive sum, got {loc.optimizer}")
    if isinstance(loc.lr, dict):
        missing = [k for k in dict.fromkeys(kinds) if k not in loc.lr]
        need(not missing, f"local.lr has no entry for optimizer(s) {missing}; give one lr or "
                          "one per optimizer kind")
    lrs = [loc.lr] if not isinstance(loc.lr, dict) else list(loc.lr.values())
    need(all(isinstance(v, int | float) and v > 0 for v in lrs),
         f"local.lr must be > 0, got {loc.lr}")
    need(loc.prox_mu >= 0, f"local.prox_mu must be >= 0, got {loc.prox_mu}")
    need(loc.path in ("auto", "general", "lowrank"),
         f"local.path={loc.path!r} is unknown; allowed: auto, general, lowrank")
    need(loc.schedule in ("constant", "exponential", "cosine", "step"),
         f"local.schedule={loc.schedule!r} is unknown; allowed: constant, exponential, cosine, "
         "step")
    if cfg.data.drift is not None:
        _validate_drift(cfg.data.drift, cfg, need)
    dv = cfg.divergence
    need(dv.action in ("stop", "warn", "off"),
         f"divergence.action={dv.action!r} is unknown; allowed: stop, warn, off")
    need(dv.loss_factor > 1, f"divergence.loss_factor must be > 1, got {dv.loss_factor}")
    need(0 < dv.chance_margin < 0.5,
         f"divergence.chance_margin must be in (0, 0.5), got {dv.chance_margin}")
    need(len(cfg.algorithms) >= 1, "algorithms must list at least one method")
    tags = [a.tag for a in cfg.algorithms]
    need(len(set(tags)) == len(tags), f"algorithms need distinct labels, got {tags}")
    for i, a in enumerate(cfg.algorithms):
        need(a.name in ALGORITHMS, f"algorithms.{i}.name={a.name!r} is unknown; allowed: "
                                   f"{sorted(ALGORITHMS)}")
        bad = sorted(set(a.options) - set(algorithm_options(a.name)) - {"cohort_size"})
        need(not bad, f"algorithms.{i} ({a.name}) has no option(s) {bad}; allowed: "
                      f"{algorithm_options(a.name)}")
    return cfg


def _validate_scale(cfg: Config, need: Callable[[bool, str], None]) -> None:
    """Multi-host and memory fields (see fedrnd.driver.distributed, fedrnd.driver.memory)."""
    if cfg.memory_limit is not None and not (
            isinstance(cfg.memory_limit, str) and cfg.memory_limit.strip().lower() == "off"):
        from fedrnd.driver.memory import parse_bytes

        try:
            parse_bytes(cfg.memory_limit)
        except ValueError as e:
            raise ValueError(f"config: {e}") from None
    n = cfg.num_processes
    need(n >= 0, f"num_processes must be >= 1 (or 0 to detect the cluster), got {n}")
    if n > 1:
        need(cfg.process_id is not None and cfg.coordinator is not None,
             f"num_processes = {n} needs coordinator (process 0's host:port) and process_id "
             "(this process's rank in [0, num_processes))")
    if cfg.process_id is not None:
        need(cfg.process_id >= 0 and (n == 0 or cfg.process_id < n),
             f"process_id must be in [0, num_processes = {n}), got {cfg.process_id}")
    if cfg.coordinator is not None:
        host, _, port = cfg.coordinator.rpartition(":")
        need(bool(host) and port.isdigit() and 0 < int(port) < 65536,
             f"coordinator must be host:port (e.g. '10.0.0.1:1234'), got {cfg.coordinator!r}")


def _validate_drift(d: DriftConfig, cfg: Config, need: Callable[[bool, str], None]) -> None:
    rounds = d.rounds
    need(len(rounds) >= 1, "data.drift.at_round must be set (the round after which clients "
                           "switch group), or remove [data.drift]")
    need(all(isinstance(r, int) and not isinstance(r, bool) for r in rounds),
         f"data.drift.at_round must be an integer or a list of integers, got {d.at_round!r}")
    need(all(1 <= r < cfg.rounds for r in rounds),
         f"data.drift.at_round must be in [1, rounds - 1 = {cfg.rounds - 1}] (a drift after "
         f"the last round changes nothing), got {d.at_round!r}")
    need(all(b > a for a, b in zip(rounds, rounds[1:], strict=False)),
         f"data.drift.at_round must be strictly increasing, got {d.at_round!r}")
    need((d.fraction is None) != (d.clients is None),
         "data.drift needs exactly one of fraction (share of clients that move) or clients "
         "(their ids)")
    if d.fraction is not None:
        need(0 < d.fraction <= 1, f"data.drift.fraction must be in (0, 1], got {d.fraction}")
    if d.clients is not None:
        c = cfg.data.num_clients
        ok = all(isinstance(i, int) and not isinstance(i, bool) for i in d.clients)
        need(ok and len(d.clients) >= 1 and all(0 <= i < c for i in d.clients),
             f"data.drift.clients must be a non-empty list of client ids in [0, {c}), got "
             f"{d.clients!r}")
        need(len(set(d.clients)) == len(d.clients),
             f"data.drift.clients must be distinct, got {d.clients!r}")
