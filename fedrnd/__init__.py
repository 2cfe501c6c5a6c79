"""fedrnd: a JAX-native simulator for clustered and decentralized federated learning.

Quick start::

    import fedrnd
    result = fedrnd.simulate()            # digits, 4 rotated groups, FedAvg vs Local
    print(result.table())

The package is lazy: ``import fedrnd`` (or ``import fedrnd.data``) does not load the driver,
the algorithms or orbax; ``fedrnd.simulate`` and friends import them on first use.

Extending without editing fedrnd: ``fedrnd.register_algorithm``, ``register_model``,
``register_optimizer``, ``register_partition`` and ``register_source`` add entries to the
tables the built-ins are registered in; a config's ``plugins = ["my_method.py"]`` (or ``fedrnd run --plugin``) loads
such a file before the config is checked. See ``docs/extending.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {"Config": "fedrnd.driver", "load_config": "fedrnd.driver", "simulate": "fedrnd.driver",
         # Extension points: each registry lives in the floor that owns its table.
         "register_algorithm": "fedrnd.algorithms", "register_model": "fedrnd.models",
         "register_optimizer": "fedrnd.engine",
         "register_partition": "fedrnd.data.partition", "register_source": "fedrnd.data.sources",
         "load_plugins": "fedrnd.driver.plugins"}

__all__ = ["Config", "__version__", "load_config", "load_plugins", "register_algorithm",
           "register_model", "register_optimizer", "register_partition", "register_source",
           "simulate"]

if TYPE_CHECKING:
    from fedrnd.algorithms import register_algorithm
    from fedrnd.data.partition import register_partition
    from fedrnd.data.sources import register_source
    from fedrnd.driver import Config, load_config, simulate
    from fedrnd.driver.plugins import load_plugins
    from fedrnd.engine import register_optimizer
    from fedrnd.models import register_model


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fedrnd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
