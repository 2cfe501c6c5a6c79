"""Federated methods, one module each, all behind :class:`Algorithm`.

``ALGORITHMS`` maps a name to its class; :func:`make_algorithm` builds one from a config.
A new method is one module with an ``Algorithm`` subclass plus a line here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fedrnd.algorithms.base import Algorithm, Metrics, State
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

ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (FedAvg, FedProx, Local, RNDClustered, IFCA, FeSEM,
                                                                  CFL, PACFL, DPSGD, DFedAvg,
                                                                  DFedAvgM, RNDDFL, DisUE, NTKDFL, SPARK,
                                                                  SSDFL, SyncDFL, PeriodicDFL,
                                                                  RandomDFL, RandomClusterDFL)}


def algorithm_options(name: str) -> list[str]:
    """The hyperparameters an algorithm accepts (its dataclass fields beyond the engine)."""
    return [f.name for f in dataclasses.fields(ALGORITHMS[name]) if f.name != "engine"]


def make_algorithm(name: str, engine: Engine, **options: Any) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"algorithm {name!r} is unknown; allowed: {sorted(ALGORITHMS)}")
    allowed = algorithm_options(name)
    bad = sorted(set(options) - set(allowed))
    if bad:
        raise ValueError(f"algorithm {name!r} has no option(s) {bad}; allowed: {allowed}")
    return ALGORITHMS[name](engine=engine, **options)


__all__ = ["ALGORITHMS", "Algorithm", "CFL", "DFedAvg", "DFedAvgM", "DPSGD", "DisUE", "FeSEM", "FedAvg", "FedProx", "IFCA", "Local", "Metrics", "NTKDFL", "SPARK", "PACFL", "RNDDFL", "State",
           "SSDFL", "SyncDFL", "PeriodicDFL", "RandomDFL", "RandomClusterDFL",
           "algorithm_options", "make_algorithm"]
