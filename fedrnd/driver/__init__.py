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
from fedrnd.driver.loggers import JsonlLogger, Logger, TensorBoardLogger, WandbLogger
from fedrnd.driver.results import RunResults, RunsResults, load_run, load_runs
from fedrnd.driver.setup import build_data, build_engine
from fedrnd.driver.simulate import MethodResult, SimulationResult, simulate

__all__ = ["AlgorithmConfig", "Config", "DataConfig", "DriftConfig", "JsonlLogger", "LocalConfig",
           "Logger", "MethodResult", "ModelConfig", "RunResults", "RunsResults",
           "SimulationResult", "TensorBoardLogger", "WandbLogger", "build_data", "build_engine",
           "from_dict", "load_config", "load_run", "load_runs", "simulate", "validate"]
