"""Federated methods, one module each, all behind :class:`Algorithm`.

``ALGORITHMS`` maps a name to its class; :func:`make_algorithm` builds one from a config.
Every method, built-in or not, enters the table through :func:`register_algorithm`, so a
method written outside fedrnd (a plug-in, see ``docs/extending.md``) is validated, listed and
run exactly like the built-ins. A method declares each option once with :func:`option`
(default, allowed values, meaning): :meth:`Algorithm.validate` checks them all, and ``fedrnd
list`` and the config reference show them (:func:`declared_options`, :func:`option_doc`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, TypeVar

from fedrnd.algorithms._gossip import Gossip
from fedrnd.algorithms._options import OptionSpec, declared_options, option, option_doc
from fedrnd.algorithms.base import (
    ARTIFACT_KINDS,
    Algorithm,
    Artifact,
    ClientState,
    MethodState,
    Metrics,
    Report,
    State,
    cluster_assignment,
    join_state,
    method_family,
    split_state,
)
from fedrnd.algorithms.cfl import CFL
from fedrnd.algorithms.decentralized import DPSGD, DFedAvg, DFedAvgM
from fedrnd.algorithms.disue import DisUE
from fedrnd.algorithms.fedavg import FedAvg, FedProx
from fedrnd.algorithms.fesem import FeSEM
from fedrnd.algorithms.ifca import IFCA
from fedrnd.algorithms.local import Local
from fedrnd.algorithms.ntk_dfl import NTKDFL, SPARK
from fedrnd.algorithms.pacfl import PACFL
from fedrnd.algorithms.rnd import RNDClustered
from fedrnd.algorithms.rnd_dfl import RNDDFL
from fedrnd.algorithms.ssdfl import (
    SSDFL,
    PeriodicDFL,
    RandomClusterDFL,
    RandomDFL,
    SyncDFL,
)
from fedrnd.engine import Engine

_A = TypeVar("_A", bound=Algorithm)

ALGORITHMS: dict[str, type[Algorithm]] = {}
"""Methods by name (their class attribute ``name``), in registration order."""

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
"""A method's name doubles as its output directory and label: one path component."""


def register_algorithm(cls: type[_A] | None = None, *, replace: bool = False
                       ) -> type[_A] | Callable[[type[_A]], type[_A]]:
    """Add a method class to :data:`ALGORITHMS` under its ``name``; use as a decorator.

    ``@register_algorithm`` (or ``@register_algorithm(replace=True)``) above
    ``@dataclasses.dataclass(frozen=True)``. The class must derive from :class:`Algorithm`,
    be a frozen dataclass of its own (its fields are its options, checked by config
    validation; frozen so ``jax.jit`` can hash it) and set a ``name`` of its own.
    Registering a name that exists raises ``ValueError`` unless ``replace=True``: silently
    shadowing a built-in would change what a config means.
    """
    if cls is None:
        return lambda c: register_algorithm(c, replace=replace)
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        raise TypeError(f"register_algorithm expects a subclass of fedrnd.algorithms.Algorithm, "
                        f"got {cls!r}")
    params = vars(cls).get("__dataclass_params__")
    if params is None or not params.frozen:
        raise TypeError(f"{cls.__qualname__} must be decorated with "
                        "@dataclasses.dataclass(frozen=True) (below @register_algorithm): its "
                        "fields are its options and jax.jit hashes it")
    name = cls.name
    if "name" not in vars(cls) or not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{cls.__qualname__} needs a name of its own, a class attribute "
                         "name: ClassVar[str] = \"...\" of letters, digits, _ . + -")
    if name in ALGORITHMS and ALGORITHMS[name] is not cls and not replace:
        raise ValueError(f"algorithm {name!r} is already registered "
                         f"({ALGORITHMS[name].__module__}.{ALGORITHMS[name].__qualname__}); "
                         "choose another name, or pass replace=True to replace it")
    ALGORITHMS[name] = cls
    return cls


for _cls in (FedAvg, FedProx, Local, RNDClustered, IFCA, FeSEM, CFL, PACFL, DPSGD, DFedAvg,
             DFedAvgM, RNDDFL, DisUE, NTKDFL, SPARK, SSDFL, SyncDFL, PeriodicDFL, RandomDFL,
             RandomClusterDFL):
    register_algorithm(_cls)
del _cls


def algorithm_options(name: str) -> list[str]:
    """The hyperparameters an algorithm accepts (its dataclass fields beyond the engine)."""
    return [f.name for f in dataclasses.fields(ALGORITHMS[name]) if f.name != "engine"]


DISCOVERY_BLOCK = "discovery"
"""Options key of the nested RND discovery block: ``options = {discovery = {network = "mlp",
predictor_steps = 200}}`` is the same method as the flat ``{network = "mlp",
predictor_steps = 200}`` (:func:`expand_discovery`)."""


def expand_discovery(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with a nested :data:`DISCOVERY_BLOCK` table flattened into the method's own
    discovery options (the class's ``discovery_names``: block key -> option name; DisUE maps
    ``eps`` to ``rnd_eps``, ...). One block, whatever method runs discovery; a key given both
    in the block and flat, or one the method has no discovery option for, is an error."""
    if DISCOVERY_BLOCK not in options:
        return options
    from fedrnd.algorithms._discovery import discovery_names

    names = discovery_names(ALGORITHMS[name]) if name in ALGORITHMS else None
    if names is None:
        raise ValueError(f"algorithm {name!r} runs no RND discovery, so it takes no "
                         f"{DISCOVERY_BLOCK!r} block")
    block = options[DISCOVERY_BLOCK]
    if not isinstance(block, dict):
        raise ValueError(f"{DISCOVERY_BLOCK} must be a table of discovery options "
                         f"({', '.join(names)}), got {block!r}")
    unknown = sorted(set(block) - set(names))
    if unknown:
        raise ValueError(f"{DISCOVERY_BLOCK}: algorithm {name!r} has no discovery option(s) "
                         f"{unknown}; allowed: {', '.join(names)}")
    out = {k: v for k, v in options.items() if k != DISCOVERY_BLOCK}
    twice = sorted(k for k in block if names[k] in out)
    if twice:
        raise ValueError(f"{DISCOVERY_BLOCK}: {twice} given both inside the block and as "
                         f"plain options; give each once")
    out.update({names[k]: v for k, v in block.items()})
    return out


def make_algorithm(name: str, engine: Engine, **options: Any) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"algorithm {name!r} is unknown; allowed: {sorted(ALGORITHMS)}")
    options = expand_discovery(name, options)
    allowed = algorithm_options(name)
    bad = sorted(set(options) - set(allowed))
    if bad:
        raise ValueError(f"algorithm {name!r} has no option(s) {bad}; allowed: {allowed}")
    return ALGORITHMS[name](engine=engine, **options)


__all__ = ["ALGORITHMS", "ARTIFACT_KINDS", "Algorithm", "Artifact", "CFL", "ClientState",
           "DFedAvg", "DFedAvgM", "DPSGD", "DisUE", "FeSEM", "FedAvg", "FedProx", "Gossip", "IFCA",
           "Local", "MethodState", "Metrics", "NTKDFL", "OptionSpec", "PACFL", "RNDDFL", "Report",
           "SPARK", "SSDFL", "State", "SyncDFL", "PeriodicDFL", "RandomDFL", "RandomClusterDFL",
           "DISCOVERY_BLOCK", "algorithm_options", "cluster_assignment", "declared_options",
           "expand_discovery", "join_state",
           "make_algorithm", "method_family", "option", "option_doc", "register_algorithm", "split_state"]
