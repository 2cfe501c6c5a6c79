"""Typed run configuration: plain data, loadable from TOML, overridable with ``key=value``.

A config file is TOML; every field below can be set in it or on the command line with
``--set path=value``, the value parsed as TOML (a bare word is a string):

* a dotted path sets one key: ``--set local.lr=0.1``, ``--set data.partition_options.alpha=0.3``;
  list items by index: ``--set algorithms.0.options.eps=0.5``;
* a table or list value replaces the whole field: ``--set 'data.partition_options={alpha=0.3}'``,
  ``--set 'algorithms=["fedavg","local"]'``;
* changing ``data.source``, ``data.partition`` or ``model.name`` drops the options of the old
  choice (``source_options``, ``partition_options``, ``options``): they rarely mean anything
  to the new one. Options set in the same command line are kept, on an empty table:
  ``--set data.partition=dirichlet --set data.partition_options.alpha=0.3`` gives exactly
  ``{alpha = 0.3}``.

:func:`validate` checks every field, including the options of the data source, partition,
model and algorithms, before anything is loaded or compiled; errors name the config path
(``data.partition_options.alpha``), the allowed values and the closest match for a typo.
:func:`to_toml` writes a config back as TOML (``fedrnd run --print-config``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import inspect
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


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
    data has more groups); ``lr``: one value or one per kind. A kind is a built-in one, one
    added by :func:`fedrnd.register_optimizer`, or ``"optax:<name>"``, any optax optimizer
    alias (``"optax:adamw"``, ``"optax:lion"``) run with the client's lr.
    ``optimizer_options``: settings of the built-in kinds (also passed to registered ones);
    ``clip_norm > 0`` clips every client's gradient to that global norm before any kind's
    update. A table under a kind's name holds settings for that kind alone
    (``"optax:adamw" = { clip_norm = 1.0 }`` clips only the AdamW clients). ``optax_options``: keywords of the ``optax:<name>`` kinds (``weight_decay = 1e-4``),
    checked against the optax function's signature; a plain key goes to every optax kind of
    a mix, a table under a kind's name (``"optax:lion" = { b1 = 0.95 }``) to that kind alone.
    ``steps`` (if set) replaces ``epochs``. ``schedule``: lr multiplier over rounds, evaluated
    at the round index: a built-in one or ``"optax:<schedule>"``, any optax schedule
    (``"optax:warmup_cosine_decay_schedule"``) with ``schedule_options`` as its keywords; its
    values multiply each client's lr (give ``init_value = 1.0`` and the like). ``schedule`` may
    also be a table, one schedule per kind (``{ "optax:adamw" = "optax:cosine_decay_schedule" }``;
    kinds not named keep a constant lr), and ``schedule_options`` then holds a table of options
    under each kind's name.
    ``path``: ``auto`` (the exact low-rank fast path where it applies and pays), ``general`` or
    ``lowrank`` (forced; see :mod:`fedrnd.engine.lowrank`).
    ``loss``: the clients' training loss (and the loss IFCA-style cluster choices compare):
    ``cross_entropy`` (softmax cross-entropy) or ``mse`` (squared error of the model's outputs
    against one-hot labels, :data:`fedrnd.engine.local.PER_EXAMPLE_LOSSES`); any other loss is a
    Python function given to :class:`fedrnd.engine.Engine` ``loss``.
    """

    batch_size: int = 16
    epochs: int = 1
    steps: int | None = None
    optimizer: str | dict[str, float] | list[str] = "sgd"
    lr: float | dict[str, float] = 0.1
    prox_mu: float = 0.0
    optimizer_options: dict[str, float | dict[str, float]] = dataclasses.field(
        default_factory=dict)
    optax_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    schedule: str | dict[str, str] = "constant"
    schedule_options: dict[str, float | dict[str, float]] = dataclasses.field(
        default_factory=dict)
    path: str = "auto"
    loss: str = "cross_entropy"


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
    """A whole simulation: data, model, local training, methods to compare, schedule, outputs.

    ``plugins``: Python files (``*.py``, relative to the config file's directory) or module
    names to load before the config is checked; they register methods, models, partitions
    or data sources (see :mod:`fedrnd.driver.plugins`).
    """

    name: str = "default"
    plugins: list[str] = dataclasses.field(default_factory=list, metadata={"doc": (
        "Python files (relative to the config file) or module names loaded before the config "
        "is checked; they register methods, models, partitions or data sources "
        "(docs/extending.md)")})
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
    num_devices: int = dataclasses.field(default=1, metadata={"doc": (
        "Devices the client axis is split over (a mesh; clients and cohort size must divide "
        "by it). On a CPU one device per core is faster (docs/performance.md, \"Several "
        "cores\"); ``fedrnd run`` and ``fedrnd.simulate`` create that many host devices in a "
        "fresh process")})
    eval_batch: int = 0
    tensorboard: bool = False
    loggers: list[str] = dataclasses.field(default_factory=lambda: ["jsonl"], metadata={"doc": (
        "Where per-round metrics go: ``jsonl`` (``metrics.jsonl``, always written), ``tensorboard`` "
        "(``pip install 'fedrnd[tensorboard]'``) and ``wandb`` (``pip install 'fedrnd[wandb]'``; project "
        "``$WANDB_PROJECT``, offline with ``WANDB_MODE=offline``); ``tensorboard = true`` "
        "also adds ``tensorboard``")})
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
_TABLES = ("data", "model", "local", "divergence")
"""Sections written as TOML tables (``[data]``), in this order, by :func:`to_toml`."""

DIVERGENCE_ACTIONS = ("stop", "warn", "off")

_CHOICES = {("data", "source"): ("data", "source_options"),
            ("data", "partition"): ("data", "partition_options"),
            ("model", "name"): ("model", "options")}
"""Fields that pick a registered function, and the table of that function's options."""

OPTIMIZER_OPTIONS = ("momentum", "eps", "weight_decay", "b1", "b2", "decay",
                     "initial_accumulator", "clip_norm")
"""``local.optimizer_options`` keys: the settings :mod:`fedrnd.engine.optim` reads
(``clip_norm`` for every kind, the others for the built-in kinds)."""

SCHEDULE_OPTIONS = {"constant": (), "exponential": ("decay_rate", "rate"),
                    "cosine": ("rounds", "alpha"), "step": ("every", "gamma")}
"""``local.schedule_options`` keys of each schedule (:func:`fedrnd.engine.optim.lr_schedule`)."""


def did_you_mean(word: Any, choices: Sequence[str], path: str | None = None) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to a typo, else ``""``.

    With ``path`` the suggestions are config paths, unquoted (``data.`` gives
    ``data.partition``).
    """
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=2, cutoff=0.6)
    if not close:
        return ""
    names = [path + c for c in close] if path is not None else [repr(c) for c in close]
    return f" (did you mean {' or '.join(names)}?)"


# ------------------------------------------------------------------------------------------
# Plain data -> Config
# ------------------------------------------------------------------------------------------


def _build(cls: type, raw: Any, where: str) -> Any:
    """``cls(**raw)`` for a table at config path ``where`` (``""`` = top level)."""
    name = where.rstrip(".") or "the top level"
    if not isinstance(raw, dict):
        raise ValueError(f"config: {name} must be a table, got {_show(raw)}")
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in fields:
            raise ValueError(f"config: unknown field {where}{key}"
                             f"{did_you_mean(key, fields, where)}; allowed in {name}: "
                             f"{', '.join(fields)}")
    return cls(**raw)


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a :class:`Config` from nested plain data (as read from TOML/JSON).

    A section that picks a different data source, partition or model than the default and
    gives no options gets empty options (the defaults' options belong to the default choice).
    """
    if not isinstance(raw, dict):
        raise ValueError(f"config: expected a table of fields, got {_show(raw)}")
    raw = dict(raw)
    if isinstance(raw.get("plugins"), str):
        raw["plugins"] = [raw["plugins"]]
    kw: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        if name in raw:
            section = raw.pop(name)
            if not isinstance(section, dict):
                raise ValueError(f"config: [{name}] must be a table, got {_show(section)}")
            section = dict(section)
            for (sec, choice), (_, options) in _CHOICES.items():
                default = getattr(cls(), choice) if sec == name else None
                if sec == name and choice in section and options not in section and \
                        section[choice] != default:
                    section[options] = {}
            if name == "data" and section.get("drift") is not None:
                section["drift"] = _build(DriftConfig, section["drift"], "data.drift.")
            kw[name] = _build(cls, section, f"{name}.")
    if "algorithms" in raw:
        algs = raw.pop("algorithms")
        if isinstance(algs, str | dict):
            algs = [algs]
        if not isinstance(algs, list):
            raise ValueError(f"config: algorithms must be a list of names or tables, got "
                             f"{_show(algs)}")
        out = []
        for i, a in enumerate(algs):
            if isinstance(a, str):
                out.append(AlgorithmConfig(a))
            elif isinstance(a, dict):
                out.append(_build(AlgorithmConfig, a, f"algorithms.{i}."))
            else:
                raise ValueError(f"config: algorithms.{i} must be a name or a table "
                                 f"{{name = ..., options = {{...}}}}, got {_show(a)}")
        kw["algorithms"] = out
    return _build(Config, {**raw, **kw}, "")


# ------------------------------------------------------------------------------------------
# --set overrides
# ------------------------------------------------------------------------------------------


def _parse_value(text: str, key: str) -> Any:
    """A ``--set`` value: TOML, or the text itself when it is a bare word (``dirichlet``)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError as e:
        t = text.strip()
        if t[:1] in "[{\"'" or "\n" in t:
            raise ValueError(f"--set {key}: {text!r} is not a valid TOML value ({e}); quote "
                             "strings, e.g. --set 'name=\"x\"', and close every [ or {") from None
        return t


def _parse_override(item: Any) -> tuple[str, list[str], Any]:
    if not isinstance(item, str) or "=" not in item:
        raise ValueError(f"--set expects KEY=VALUE (e.g. --set local.lr=0.05), got {item!r}")
    key, text = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p.strip() for p in parts):
        raise ValueError(f"--set {item!r}: the key must be a dotted path of field names, e.g. "
                         "data.partition_options.alpha")
    return key, [p.strip() for p in parts], _parse_value(text, key)


def _index(node: list, p: str, where: str, key: str) -> int:
    if not re.fullmatch(r"\d+", p) or int(p) >= len(node):
        have = f"indices 0 to {len(node) - 1}" if node else "no entries"
        raise ValueError(f"--set {key}: {where} is a list with {len(node)} entries ({have}); "
                         f"{p!r} is not one of them. Set the whole list instead, e.g. "
                         f"--set '{where}=[...]'")
    return int(p)


def _set_path(tree: dict[str, Any], parts: list[str], value: Any, key: str) -> None:
    """Set ``tree[parts[0]][parts[1]]... = value``; missing or unset tables are created."""
    node: Any = tree
    for depth, p in enumerate(parts):
        where = ".".join(parts[:depth]) or "the config"
        last = depth == len(parts) - 1
        if isinstance(node, list):
            i = _index(node, p, where, key)
            if last:
                node[i] = value
                return
            if depth == 1 and parts[0] == "algorithms" and isinstance(node[i], str):
                node[i] = {"name": node[i]}  # a bare name is short for {name = ...}
            node = node[i]
        elif isinstance(node, dict):
            if last:
                node[p] = value
                return
            if node.get(p) is None:  # an unset optional table (data.drift) or a new key
                node[p] = {}
            node = node[p]
        else:
            raise ValueError(f"--set {key}: {where} is {_show(node)}, not a table or a list, "
                             f"so it has no field {p!r}")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to nested plain data; see the module docstring.

    When an override changes ``data.source``, ``data.partition`` or ``model.name`` (compared
    with ``raw``), the options table of that choice becomes only what the overrides set in it.
    """
    tree = copy.deepcopy(raw)
    parsed = [_parse_override(item) for item in overrides]
    for key, parts, value in parsed:
        _set_path(tree, parts, copy.deepcopy(value), key)
    # The same overrides on a tree whose options tables are empty: what the user set in them.
    shadow = copy.deepcopy(raw)
    for sec, opts in _CHOICES.values():
        if isinstance(shadow.get(sec), dict):
            shadow[sec][opts] = {}
    for key, parts, value in parsed:
        try:
            _set_path(shadow, parts, copy.deepcopy(value), key)
        except ValueError:
            pass  # it failed on ``tree`` already if it could
    for choice, (sec, opts) in _CHOICES.items():
        if _get(tree, choice) != _get(raw, choice) and isinstance(tree.get(sec), dict):
            mine = shadow.get(sec, {}).get(opts, {}) if isinstance(shadow.get(sec), dict) else {}
            tree[sec][opts] = copy.deepcopy(mine)
    return tree


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(p)
    return tree


def with_plugin_paths(raw: dict[str, Any], base_dir: str | Path) -> dict[str, Any]:
    """``raw`` with its ``plugins`` file paths made absolute from ``base_dir`` (the directory
    of the file that lists them), so the config means the same from any working directory
    (in the run's ``config.json`` too)."""
    from fedrnd.driver.plugins import resolve

    specs = raw.get("plugins")
    if isinstance(specs, str):
        specs = [specs]
    if not isinstance(specs, list):
        return raw  # not a list: validation says so
    return {**raw, "plugins": [resolve(s, base_dir) if isinstance(s, str) else s
                               for s in specs]}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML config (``None`` = built-in defaults) and apply ``--set`` overrides.

    The config's ``plugins`` are loaded (by :func:`validate`) before anything else is checked;
    their relative paths are taken from the config file's directory, those set with ``--set``
    from the working directory.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ValueError(f"config file {str(p)!r} is a directory; give a .toml file")
        if not p.is_file():
            raise FileNotFoundError(f"config file {str(p)!r} does not exist")
        with open(p, "rb") as f:
            try:
                raw = tomllib.load(f)
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"config file {str(p)!r} is not valid TOML: {e}") from None
        raw = with_plugin_paths(raw, p.parent)
    if overrides:
        # Overrides act on the fully resolved tree, so any field can be set, even one the
        # file leaves at its default.
        raw = apply_overrides(from_dict(raw).to_dict(), overrides)
    return validate(from_dict(raw))


# ------------------------------------------------------------------------------------------
# Config -> TOML
# ------------------------------------------------------------------------------------------


def _toml_string(s: str) -> str:
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_key(k: Any) -> str:
    k = str(k)
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_string(k)


def toml_value(v: Any) -> str:
    """One value as TOML (inline tables for dicts; ``None`` entries of a table are left out,
    TOML has no null)."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, os.PathLike):
        return _toml_string(os.fspath(v))
    if isinstance(v, list | tuple | np.ndarray):
        items = list(v)
        if any(x is None for x in items):
            raise ValueError(f"cannot write {v!r} as TOML: a list cannot hold an unset value")
        return "[" + ", ".join(toml_value(x) for x in items) + "]"
    if isinstance(v, Mapping):
        items = [f"{_toml_key(k)} = {toml_value(x)}" for k, x in v.items() if x is not None]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    raise ValueError(f"cannot write {v!r} as TOML")


def _show(v: Any) -> str:
    """A value as the user would have typed it (TOML), for messages."""
    if v is None:
        return "unset"
    try:
        return toml_value(v)
    except ValueError:
        return repr(v)


def _toml_table(d: dict[str, Any]) -> list[str]:
    return [f"{_toml_key(k)} = {toml_value(v)}" for k, v in d.items() if v is not None]


def to_toml(cfg: Config) -> str:
    """The config as a TOML document that :func:`load_config` reads back to an equal config.

    Unset (``None``) fields are left out: TOML has no null, and unset is every such field's
    default.
    """
    d = cfg.to_dict()
    tables = {k: d.pop(k) for k in (*_TABLES, "algorithms")}
    lines = _toml_table(d)
    drift = tables["data"].pop("drift")
    for name in _TABLES:
        lines += ["", f"[{name}]", *_toml_table(tables[name])]
        if name == "data" and drift is not None:
            lines += ["", "[data.drift]", *_toml_table(drift)]
    for a in tables["algorithms"]:
        lines += ["", "[[algorithms]]", *_toml_table(a)]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------
# Types
# ------------------------------------------------------------------------------------------


def _type_ok(value: Any, hint: Any) -> bool | None:
    """Whether a plain (TOML) value fits the annotation ``hint``; ``None``: cannot tell."""
    if hint is Any or hint is inspect.Parameter.empty or isinstance(hint, str):
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        results = [_type_ok(value, a) for a in args]
        return True if True in results else None if None in results else False
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int | np.integer) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float | np.number) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is os.PathLike or origin is os.PathLike:
        return isinstance(value, os.PathLike)
    if hint is np.ndarray:
        return isinstance(value, list | tuple | np.ndarray)
    if origin is Callable or hint is Callable:
        return callable(value) and not isinstance(value, type)
    if hint in (dict, Mapping) or origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            return False
        if len(args) == 2 and False in (_type_ok(v, args[1]) for v in value.values()):
            return False
        return True
    if hint in (list, tuple, Sequence) or origin in (list, tuple, Sequence):
        if isinstance(value, str) or not isinstance(value, list | tuple):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                return False
            return False not in (_type_ok(v, a) for v, a in zip(value, args, strict=True))
        if args and False in (_type_ok(v, args[0]) for v in value):
            return False
        return True
    return None


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               np.ndarray: "a list"}
_PLURALS = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}


def _describe(hint: Any) -> str:
    """``int | list[int] | None`` -> ``an integer or a list of integers``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        parts = list(dict.fromkeys(p for p in (_describe(a) for a in args) if p))
        if any(p.startswith("a list of ") for p in parts):
            parts = [p for p in parts if p != "a list"]
        return " or ".join(parts)
    if hint is type(None) or hint is os.PathLike or origin is os.PathLike or \
            origin is Callable or hint is Callable:
        return ""  # TOML cannot write these; unset is always allowed where they are
    if hint in _TYPE_NAMES:
        return _TYPE_NAMES[hint]
    if hint in (dict, Mapping) or origin in (dict, Mapping):
        inner = _PLURALS.get(args[1]) if len(args) == 2 else None
        return f"a table of {inner}" if inner else "a table"
    if hint in (list, tuple, Sequence) or origin in (list, tuple, Sequence):
        if origin is tuple and args and args[-1] is not Ellipsis:
            inner = _PLURALS.get(args[0])
            return f"a list of {len(args)} {inner}" if inner else f"a list of {len(args)}"
        inner = _PLURALS.get(args[0]) if args else None
        return f"a list of {inner}" if inner else "a list"
    return getattr(hint, "__name__", str(hint))


def _check_value(value: Any, hint: Any, where: str, context: str = "") -> None:
    if _type_ok(value, hint) is False:
        raise ValueError(f"config: {where} = {_show(value)} must be {_describe(hint)}{context}")


def _check_types(obj: Any, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            _check_types(v, prefix + f.name + ".")
        else:
            _check_value(v, hints[f.name], prefix + f.name)


def _check_seed(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise ValueError(f"config: {where} must be an integer >= 0 (and < 2**32), got "
                         f"{_show(value)}")


# ------------------------------------------------------------------------------------------
# Options of registered functions (sources, partitions, models, algorithms)
# ------------------------------------------------------------------------------------------


def option_list(params: Mapping[str, inspect.Parameter]) -> str:
    """``alpha (required), min_size = 2, test_size (unset)``: options with their defaults."""
    return ", ".join(option_items(params))


def option_items(params: Mapping[str, inspect.Parameter]) -> list[str]:
    """One ``name = default`` (or ``name (required)``, ``name (unset)``) per option."""
    out = []
    for name, p in params.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty:
            out.append(f"{name} (required)")
        elif p.default is None:
            out.append(f"{name} (unset)")
        else:
            try:
                out.append(f"{name} = {toml_value(p.default)}")
            except ValueError:
                out.append(name)
    return out


def option_error(where: str, what: str, err: Exception, names: Sequence[str], *,
                 general: bool = False) -> ValueError:
    """A builder's complaint about its options as a config error at path ``where``.

    ``what`` says whose options they are (``data.partition = 'dirichlet'``); a message that
    starts with an option's name (``alpha must be > 0``) is attached to that option's path.
    Other messages are put under ``where``, or under ``what`` with ``general=True`` (for
    errors raised while building, which need not be about the options: a corrupt file).
    """
    msg = " ".join(str(err).split())
    if msg.startswith("config: "):
        return ValueError(msg)
    # The option's name: the first word ("alpha must ..."), or the second after the
    # algorithm's name ("cfl eps1 must ...", "dfedavgm: momentum must ...").
    m = re.match(r"(?:[A-Za-z_]\w*:? )?([A-Za-z_]\w*)(?=[\s:=(]|$)", msg)
    plain = re.match(r"([A-Za-z_]\w*)(?=[\s:=(]|$)", msg)
    if plain and plain.group(1) in names:
        return ValueError(f"config: {where}.{msg} ({what})")
    if m and m.group(1) in names:  # "cfl eps1 must be ..." / "rnd: tau ..."
        msg = msg[m.start(1):]
        return ValueError(f"config: {where}.{msg} ({what})")
    unexpected = re.search(r"unexpected keyword argument '(\w+)'", msg)
    if unexpected:
        return ValueError(f"config: {where}.{unexpected.group(1)} is not an option of {what}"
                          f"{did_you_mean(unexpected.group(1), names)}; allowed: "
                          f"{', '.join(names) or 'none'}")
    missing = re.search(r"missing \d+ required (?:keyword-only |positional )?arguments?: "
                        r"'(\w+)'", msg)
    if missing:
        return ValueError(f"config: {where}.{missing.group(1)} is required by {what}")
    return ValueError(f"config: {what}: {msg}" if general else f"config: {where} ({what}): {msg}")


def _parameters(fn: Callable, skip: Sequence[str] = ()) -> dict[str, inspect.Parameter]:
    try:
        sig = inspect.signature(fn, eval_str=True)
    except (NameError, TypeError, ValueError):
        sig = inspect.signature(fn)
    return {k: p for k, p in sig.parameters.items() if k not in skip}


def _check_options(where: str, options: dict[str, Any], params: Mapping[str, inspect.Parameter],
                   what: str, others: Mapping[str, Callable[[], Mapping[str, Any]]] | None = None
                   ) -> None:
    """Keys, required keys and value types of one options table against a signature.

    ``others``: the other choices of the same field (name -> their parameters), to say which
    of them takes an option this one lacks (``alpha`` is a ``dirichlet`` option).
    """
    names = [k for k, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for k, v in options.items():
        if k not in params or params[k].kind in (inspect.Parameter.VAR_POSITIONAL,
                                                  inspect.Parameter.VAR_KEYWORD):
            if takes_any:
                continue
            allowed = option_list(params) or "none"
            field = what.split(" = ")[0]
            owners = [name for name, get in (others or {}).items() if k in get()]
            hint = (f"; {k} is an option of {' and '.join(owners[:3])}: set {field} too, e.g. "
                    f"--set {field}={owners[0]}" if owners else "")
            raise ValueError(f"config: {where}.{k} is not an option of {what}"
                             f"{did_you_mean(k, names)}; allowed: {allowed}{hint}")
        _check_value(v, params[k].annotation, f"{where}.{k}", f" ({what})")
    for k in names:
        if params[k].default is inspect.Parameter.empty and k not in options:
            raise ValueError(f"config: {where}.{k} is required by {what}, e.g. "
                             f"--set {where}.{k}=...")


def source_parameters(source: str) -> dict[str, inspect.Parameter]:
    """``data.source_options`` of a source, resolved annotations included."""
    from fedrnd.data.sources import SOURCES, tfds_source

    if source.startswith("tfds:"):
        return _parameters(tfds_source, ("name",))
    return _parameters(SOURCES[source])


def partition_parameters(partition: str) -> dict[str, inspect.Parameter]:
    """``data.partition_options`` of a partitioner (the run supplies data, clients, seed)."""
    from fedrnd.data.partition import PARTITIONS

    return _parameters(PARTITIONS[partition], ("dataset", "num_clients", "seed"))


def model_parameters(model: str) -> dict[str, inspect.Parameter]:
    """``model.options`` of a registered model."""
    from fedrnd.models import MODELS
    from fedrnd.models._core import _NNX_SUPPLIED, is_nnx_builder

    nnx = is_nnx_builder(MODELS[model])
    return _parameters(MODELS[model], ("num_classes", *(_NNX_SUPPLIED if nnx else ())))


def algorithm_parameters(name: str) -> dict[str, inspect.Parameter]:
    """``algorithms[].options`` of an algorithm: its dataclass fields beyond the engine."""
    from fedrnd.algorithms import ALGORITHMS

    cls = ALGORITHMS[name]
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name == "engine" or not f.init:
            continue
        default = (f.default if f.default is not dataclasses.MISSING else
                   f.default_factory() if f.default_factory is not dataclasses.MISSING
                   else inspect.Parameter.empty)
        out[f.name] = inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                        default=default, annotation=hints.get(f.name, Any))
    return out


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------


def validate(cfg: Config) -> Config:
    """Check every field; raise ``ValueError`` naming the field and the allowed values.

    Everything that can be told without loading data is checked here: the options of the
    data source, partition, model and algorithms against their signatures and their own
    argument checks, and the output paths (an existing file where a directory must go).
    """
    _check_seed(cfg.seed, "seed")
    if cfg.data.drift is not None and cfg.data.drift.seed is not None:
        _check_seed(cfg.data.drift.seed, "data.drift.seed")
    _check_types(cfg)
    for i, a in enumerate(cfg.algorithms):
        _check_types(a, f"algorithms.{i}.")
    _load_plugins(cfg)

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
    need(cfg.eval_batch >= 0, f"eval_batch must be >= 0 (0 = the whole client set at once), "
                              f"got {cfg.eval_batch}")
    _validate_scale(cfg, need)
    need(cfg.finetune_epochs >= 1, f"finetune_epochs must be >= 1 (finetune = false turns the "
                                   f"fine-tune evaluation off), got {cfg.finetune_epochs}")
    div = cfg.divergence
    need(div.action in DIVERGENCE_ACTIONS,
         f"divergence.action={div.action!r} is unknown"
         f"{did_you_mean(div.action, DIVERGENCE_ACTIONS)}; allowed: "
         f"{', '.join(DIVERGENCE_ACTIONS)}")
    need(math.isfinite(div.loss_factor) and div.loss_factor > 1,
         f"divergence.loss_factor must be > 1, got {div.loss_factor}")
    need(0 < div.chance_margin < 0.5,
         f"divergence.chance_margin must be in (0, 0.5), got {div.chance_margin}")
    _validate_outputs(cfg)
    _validate_loggers(cfg)
    _validate_data(cfg)
    _validate_model(cfg)
    _validate_local(cfg, need)
    if cfg.data.drift is not None:
        _validate_drift(cfg.data.drift, cfg, need)
    _validate_algorithms(cfg, need)
    return cfg


def _load_plugins(cfg: Config) -> None:
    """Load the config's plug-ins, then installed ones if a name is still unknown.

    First, so that every check below treats plug-ins' entries exactly like the built-ins.
    Paths are absolute when the config came from a file (:func:`load_config`); others are
    taken from the working directory. Installed plug-ins (entry points) load only on demand:
    a broken package that a run does not use cannot stop it.
    """
    from fedrnd.algorithms import ALGORITHMS
    from fedrnd.data.partition import PARTITIONS
    from fedrnd.data.sources import SOURCES
    from fedrnd.driver.plugins import load_entry_points, load_plugins
    from fedrnd.engine.optim import unknown_optimizer
    from fedrnd.models import MODELS

    load_plugins(cfg.plugins, where="config: plugins")
    d = cfg.data
    opt = cfg.local.optimizer
    kinds = [opt] if isinstance(opt, str) else list(opt) if isinstance(opt, dict | list) else []
    if ((not d.source.startswith("tfds:") and d.source not in SOURCES)
            or d.partition not in PARTITIONS or cfg.model.name not in MODELS
            or any(a.name not in ALGORITHMS for a in cfg.algorithms)
            or any(isinstance(k, str) and unknown_optimizer(k) is not None for k in kinds)):
        load_entry_points()


def _validate_outputs(cfg: Config) -> None:
    """The run directory ``out_dir/name`` must be a directory that can exist."""
    from fedrnd.driver.rundir import check_name

    name = cfg.name
    check_name(name)  # one path component, so a run stays inside out_dir
    out = Path(cfg.out_dir).expanduser()
    if not cfg.out_dir.strip():
        raise ValueError("config: out_dir (--out) must be a directory path, got an empty string")
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                what = "is" if p == out else f"is inside {str(p)!r}, which is"
                raise ValueError(f"config: out_dir (--out) = {cfg.out_dir!r} {what} an existing "
                                 "file, not a directory; choose another output root")
            break
    run = out / name
    if run.exists() and not run.is_dir():
        raise ValueError(f"config: the run directory {str(run)!r} (out_dir/name) is an existing "
                         "file; choose another name or out_dir")


def _validate_loggers(cfg: Config) -> None:
    """Known logger names whose packages import: a missing one fails here, not at round 1."""
    from fedrnd.driver.loggers import check_loggers

    check_loggers(cfg.loggers, cfg.tensorboard)


def _validate_data(cfg: Config) -> None:
    from fedrnd.data.partition import PARTITIONS, check_partition_options
    from fedrnd.data.sources import SOURCES, TFDS_NAMES, check_source_options, source_kwargs

    d = cfg.data
    tfds = d.source.startswith("tfds:")
    if not tfds and d.source not in SOURCES:
        raise ValueError(f"config: data.source = {d.source!r} is unknown"
                         f"{did_you_mean(d.source, list(SOURCES))}; allowed: "
                         f"{', '.join(SOURCES)}, or tfds:<name> with name in "
                         f"{', '.join(TFDS_NAMES)}")
    if tfds:
        try:
            check_source_options(d.source, {})
        except ValueError as e:
            raise ValueError(f"config: data.source = {d.source!r}: {e}") from None
    what = f"data.source = {d.source!r}"
    params = source_parameters(d.source)
    others = {k: functools.partial(source_parameters, k) for k in SOURCES if k != d.source}
    _check_options("data.source_options", d.source_options, params, what, others)
    try:
        check_source_options(d.source, source_kwargs(d.source, d.source_options,
                                                      d.num_clients, cfg.seed))
    except (ValueError, TypeError) as e:
        raise option_error("data.source_options", what, e, list(params)) from None

    if d.partition not in PARTITIONS:
        raise ValueError(f"config: data.partition = {d.partition!r} is unknown"
                         f"{did_you_mean(d.partition, list(PARTITIONS))}; allowed: "
                         f"{', '.join(PARTITIONS)}")
    what = f"data.partition = {d.partition!r}"
    params = partition_parameters(d.partition)
    others = {k: functools.partial(partition_parameters, k) for k in PARTITIONS
              if k != d.partition}
    _check_options("data.partition_options", d.partition_options, params, what, others)
    try:
        check_partition_options(d.partition, d.num_clients, d.partition_options)
    except (ValueError, TypeError) as e:
        raise option_error("data.partition_options", what, e, list(params)) from None


def _validate_model(cfg: Config) -> None:
    from fedrnd.models import MODELS, check_model_options

    m = cfg.model
    # "model.name='x' is unknown": the wording scripts and tests already match on.
    if m.name not in MODELS:
        raise ValueError(f"config: model.name={m.name!r} is unknown"
                         f"{did_you_mean(m.name, list(MODELS))}; allowed: "
                         f"{', '.join(sorted(MODELS))}")
    what = f"model.name = {m.name!r}"
    params = model_parameters(m.name)
    others = {k: functools.partial(model_parameters, k) for k in MODELS if k != m.name}
    _check_options("model.options", m.options, params, what, others)
    try:
        check_model_options(m.name, m.options)
    except (ValueError, TypeError) as e:
        raise option_error("model.options", what, e, list(params)) from None


def _validate_local(cfg: Config, need: Callable[[bool, str], None]) -> None:
    from fedrnd.engine.local import LOSSES
    from fedrnd.engine.optim import OPTAX_PREFIX, extra_optimizer_options, unknown_optimizer

    loc = cfg.local
    need(loc.batch_size >= 1, f"local.batch_size must be >= 1, got {loc.batch_size}")
    need(loc.epochs >= 1, f"local.epochs must be >= 1, got {loc.epochs}")
    need(loc.steps is None or loc.steps >= 1, f"local.steps must be >= 1, got {loc.steps}")
    kinds = [loc.optimizer] if isinstance(loc.optimizer, str) else list(loc.optimizer)
    need(len(kinds) >= 1, "local.optimizer must name at least one optimizer")
    for k in kinds:
        why = unknown_optimizer(k) if isinstance(k, str) else "is not a string"
        need(why is None, f"local.optimizer {k!r} {why}")
    if isinstance(loc.optimizer, dict):
        w = list(loc.optimizer.values())
        need(all(isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in w)
             and sum(w) > 0, f"local.optimizer mix proportions must be numbers >= 0 with a "
                             f"positive sum, got {_show(loc.optimizer)}")
    if isinstance(loc.lr, dict):
        missing = [k for k in dict.fromkeys(kinds) if k not in loc.lr]
        need(not missing, f"local.lr has no entry for optimizer(s) {missing}; give one lr or "
                          "one per optimizer kind")
    lrs = [loc.lr] if not isinstance(loc.lr, dict) else list(loc.lr.values())
    need(all(isinstance(v, int | float) and math.isfinite(v) and v > 0 for v in lrs),
         f"local.lr must be > 0, got {_show(loc.lr)}")
    need(math.isfinite(loc.prox_mu) and loc.prox_mu >= 0,
         f"local.prox_mu must be >= 0, got {loc.prox_mu}")
    uniq = list(dict.fromkeys(kinds))

    def setting(path: str, k: str, v: Any, settings: Sequence[str]) -> None:
        need(k in settings, f"local.optimizer_options.{path} is not an optimizer "
                            f"setting{did_you_mean(k, settings)}; allowed: "
                            f"{', '.join(settings)}")
        need(math.isfinite(v) and v >= 0,
             f"local.optimizer_options.{path} must be a finite number >= 0, got {v}")

    for k, v in loc.optimizer_options.items():
        if isinstance(v, dict):  # settings of one kind alone
            need(k in uniq, f"local.optimizer_options.\"{k}\" holds settings of {k!r}, which "
                            f"local.optimizer does not use; its kinds: {', '.join(uniq)}")
            for kk, vv in v.items():
                setting(f'"{k}".{kk}', kk, vv, OPTIMIZER_OPTIONS + extra_optimizer_options([k]))
        else:
            setting(k, k, v, OPTIMIZER_OPTIONS + extra_optimizer_options(kinds))
    _validate_optax_options(loc, [k for k in dict.fromkeys(kinds)
                                  if k.startswith(OPTAX_PREFIX)], need)
    paths = ("auto", "general", "lowrank")
    need(loc.path in paths, f"local.path={loc.path!r} is unknown"
                            f"{did_you_mean(loc.path, paths)}; allowed: {', '.join(paths)}")
    need(isinstance(loc.loss, str) and loc.loss in LOSSES,
         f"local.loss={loc.loss!r} is unknown{did_you_mean(loc.loss, LOSSES)}; allowed: "
         f"{', '.join(LOSSES)} (another loss is a Python function: Engine(loss=...))")
    need(loc.path != "lowrank" or loc.loss == "cross_entropy",
         f"local.path = \"lowrank\" computes the cross-entropy loss; local.loss = {loc.loss!r} "
         f"needs local.path = \"auto\" or \"general\"")
    opts = loc.schedule_options
    tables = [k for k, v in opts.items() if isinstance(v, dict)]
    if isinstance(loc.schedule, dict):  # one schedule per kind
        for kind in loc.schedule:
            need(kind in uniq, f"local.schedule.\"{kind}\" names an optimizer kind that "
                               f"local.optimizer does not use; its kinds: {', '.join(uniq)}")
        plain = [k for k in opts if k not in tables]
        need(not plain, f"local.schedule is a table per kind, so local.schedule_options holds a "
                        f"table of options per kind (\"<kind>\" = {{ ... }}), got {plain}")
        stray = [k for k in tables if k not in loc.schedule]
        need(not stray, f"local.schedule_options has tables for {stray}, which local.schedule "
                        f"gives no schedule; it names {', '.join(loc.schedule)}")
        for kind, name in loc.schedule.items():
            _validate_schedule(name, opts.get(kind, {}), f'local.schedule."{kind}"',
                               f'local.schedule_options."{kind}"', need)
        return
    need(not tables, f"local.schedule_options has tables {tables}, which are for a schedule "
                     f"per kind: write local.schedule = {{ \"<kind>\" = \"<schedule>\" }} too")
    _validate_schedule(loc.schedule, opts, "local.schedule", "local.schedule_options", need)


def _validate_schedule(name: str, opts: dict[str, Any], where: str, where_opts: str,
                       need: Callable[[bool, str], None]) -> None:
    """One lr schedule (``where``) and its options (``where_opts``)."""
    from fedrnd.engine.optim import OPTAX_PREFIX

    if name.startswith(OPTAX_PREFIX):
        _validate_optax_schedule(name, opts, where, where_opts, need)
        return
    need(name in SCHEDULE_OPTIONS,
         f"{where}={name!r} is unknown"
         f"{did_you_mean(name, list(SCHEDULE_OPTIONS))}; allowed: "
         f"{', '.join(SCHEDULE_OPTIONS)}, or optax:<name> for any optax schedule")
    allowed = SCHEDULE_OPTIONS[name]
    for k, v in opts.items():
        need(k in allowed, f"{where_opts}.{k} is not an option of {where} = "
                           f"{name!r}{did_you_mean(k, allowed)}; allowed: "
                           f"{', '.join(allowed) or 'none'}")
        need(math.isfinite(v), f"{where_opts}.{k} must be a finite number, got {v}")
    if "rounds" in opts:
        need(opts["rounds"] >= 1, f"{where_opts}.rounds must be >= 1, got {opts['rounds']}")
    if "every" in opts:
        need(opts["every"] >= 1, f"{where_opts}.every must be >= 1, got {opts['every']}")


def _validate_optax_options(loc: LocalConfig, optax_kinds: list[str],
                            need: Callable[[bool, str], None]) -> None:
    """``local.optax_options``: keywords of the ``optax:<name>`` kinds, and buildable.

    A plain key goes to every optax kind, so each must take it; a table under a kind's name
    (``"optax:lion" = { b1 = 0.95 }``) goes to that kind alone.
    """
    from fedrnd.engine.optim import OPTAX_PREFIX, ClientOptimizer, optax_optimizer_parameters

    opts = loc.optax_options
    need(not opts or bool(optax_kinds),
         f"local.optax_options is set ({', '.join(opts)}) but no optax:<name> optimizer is "
         f"used; these are keywords of optax optimizers (local.optimizer = \"optax:adamw\"); "
         f"the built-in kinds read local.optimizer_options")
    for k, v in opts.items():
        if k.startswith(OPTAX_PREFIX):
            need(k in optax_kinds, f"local.optax_options.\"{k}\" holds keywords of {k}, which "
                                   f"local.optimizer does not use; its optax kinds: "
                                   f"{', '.join(optax_kinds)}")
            need(isinstance(v, dict), f"local.optax_options.\"{k}\" must be a table of "
                                      f"keywords of optax.{k[len(OPTAX_PREFIX):]}, got {_show(v)}")
    for kind in optax_kinds:
        name = kind[len(OPTAX_PREFIX):]
        params = optax_optimizer_parameters(name)
        own = [(f'"{kind}".{k}', k) for k in opts.get(kind, {})]
        shared = [(k, k) for k in opts if not k.startswith(OPTAX_PREFIX)]
        for path, k in shared + own:
            hint = (f"; give it to one kind alone as local.optax_options.\"optax:<name>\" = "
                    f"{{ {k} = ... }}" if (path, k) in shared and len(optax_kinds) > 1 else "")
            need(k in params, f"local.optax_options.{path} is not a keyword of optax.{name} "
                              f"(local.optimizer {kind!r}){did_you_mean(k, list(params))}; "
                              f"allowed: {', '.join(params) or 'none'}{hint}")
    if optax_kinds:
        try:
            ClientOptimizer(tuple(optax_kinds), (), tuple(opts.items())).init({})
        except (TypeError, ValueError) as e:
            raise ValueError(f"config: local.optax_options ({', '.join(optax_kinds)}): "
                             f"{' '.join(str(e).split())}") from None


def _validate_optax_schedule(schedule: str, options: dict[str, Any], where: str,
                             where_opts: str, need: Callable[[bool, str], None]) -> None:
    """``local.schedule = "optax:<name>"``: a schedule of optax, its keywords, and buildable."""
    from fedrnd.engine.optim import (
        OPTAX_PREFIX,
        lr_schedule,
        optax_schedule_parameters,
        optax_schedules,
    )

    name = schedule[len(OPTAX_PREFIX):]
    names = optax_schedules()
    close = difflib.get_close_matches(name, names, n=2, cutoff=0.6)
    hint = (f" (did you mean {' or '.join(repr(OPTAX_PREFIX + c) for c in close)}?)"
            if close else "")
    need(name in names, f"{where}={schedule!r} is not an optax schedule{hint}; "
                        f"optax:<name> takes one of {', '.join(names)}")
    params = optax_schedule_parameters(name)
    what = f"{where} = {schedule!r}"
    _check_options(where_opts, options, params, what)
    try:
        lr_schedule(schedule, **options)(0)
    except (TypeError, ValueError) as e:
        raise option_error(where_opts, what, e, list(params)) from None


class _NeedsData(Exception):
    """Raised by the stand-ins below when a check needs the real data or engine."""


class _Unbuilt:
    """Stands in for the engine or the data in an algorithm's early :meth:`validate`."""

    def __init__(self, **known: Any):
        self.__dict__.update(known)

    def __getattr__(self, name: str) -> Any:
        raise _NeedsData(name)


def _validate_algorithms(cfg: Config, need: Callable[[bool, str], None]) -> None:
    from fedrnd.algorithms import ALGORITHMS, DISCOVERY_BLOCK, expand_discovery

    need(len(cfg.algorithms) >= 1, "algorithms must list at least one method")
    tags = [a.tag for a in cfg.algorithms]
    dup = sorted({t for t in tags if tags.count(t) > 1})
    need(not dup, f"algorithms need distinct labels, got {tags}; give the repeated "
                  f"{dup[0] if dup else ''} entries a label each, e.g. algorithms = "
                  f'[{{name = "{dup[0] if dup else ""}", label = "a"}}, ...]')
    for i, a in enumerate(cfg.algorithms):
        # "algorithms.0.name='x' is unknown": the wording scripts and tests already match on.
        need(a.name in ALGORITHMS, f"algorithms.{i}.name={a.name!r} is unknown"
                                   f"{did_you_mean(a.name, list(ALGORITHMS))}; allowed: "
                                   f"{', '.join(sorted(ALGORITHMS))}")
        where, what = f"algorithms.{i}.options", f"algorithms.{i}.name = {a.name!r}"
        if DISCOVERY_BLOCK in a.options:
            # The nested discovery block is the flat options under one key; the config keeps
            # the flat form from here on (config.json, cell keys), so both spell one method.
            try:
                a.options = expand_discovery(a.name, dict(a.options))
            except ValueError as e:
                msg = str(e).removeprefix(f"{DISCOVERY_BLOCK}: ")
                raise ValueError(f"config: {where}.{DISCOVERY_BLOCK}: {msg} ({what})") from None
        params = algorithm_parameters(a.name)
        for k, v in a.options.items():
            if k not in params:
                raise ValueError(f"config: {where}.{k}: algorithm {a.name!r} has no option "
                                 f"{k!r}{did_you_mean(k, list(params))}; allowed: "
                                 f"{', '.join(params)}")
            _check_value(v, params[k].annotation, f"{where}.{k}", f" ({what})")
        # What the algorithm can check without data (its validate stops at the first thing
        # that needs the data set or the engine; the rest is checked once they exist).
        opts = dict(a.options)
        opts.setdefault("cohort_size", cfg.cohort_size)
        try:
            alg = ALGORITHMS[a.name](engine=_Unbuilt(), **opts)
            alg.validate(_Unbuilt(num_clients=cfg.data.num_clients))
        except _NeedsData:
            pass
        except (ValueError, TypeError) as e:
            raise option_error(where, what, e, list(params)) from None
        except Exception:  # noqa: BLE001 - anything else is left to the real check after loading
            pass


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
