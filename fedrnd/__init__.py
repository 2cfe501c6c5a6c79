"""fedrnd: a JAX-native simulator for clustered and decentralized federated learning.

Quick start::

    import fedrnd
    result = fedrnd.simulate()            # digits, 4 rotated groups, FedAvg vs Local
    print(result.table())
"""

__version__ = "0.1.0"

from fedrnd.driver import Config, load_config, simulate  # noqa: E402

__all__ = ["Config", "__version__", "load_config", "simulate"]
