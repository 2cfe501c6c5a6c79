"""The host-side driver: config, the rounds loop, logging, checkpoints and plots."""

from fedrnd.driver.config import (
    AlgorithmConfig,
    Config,
    DataConfig,
    DriftConfig,
    LocalConfig,
    ModelConfig,
    from_dict,
    load_config,
    validate,
)
from fedrnd.driver.setup import build_data, build_engine
from fedrnd.driver.simulate import MethodResult, SimulationResult, simulate

__all__ = ["AlgorithmConfig", "Config", "DataConfig", "DriftConfig", "LocalConfig", "MethodResult",
           "ModelConfig", "SimulationResult", "build_data", "build_engine", "from_dict",
           "load_config", "simulate", "validate"]
