"""fedrnd: a JAX-native simulator for clustered and decentralized federated learning.

Quick start::

    import fedrnd
    result = fedrnd.simulate()            # digits, 4 rotated groups, FedAvg vs Local
    print(result.table())

The package is lazy: ``import fedrnd`` (or ``import fedrnd.data``) does not load the driver,
the algorithms or orbax; ``fedrnd.simulate`` and friends import them on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {"Config": "fedrnd.driver", "load_config": "fedrnd.driver", "simulate": "fedrnd.driver"}

__all__ = ["Config", "__version__", "load_config", "simulate"]

if TYPE_CHECKING:
    from fedrnd.driver import Config, load_config, simulate


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fedrnd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
