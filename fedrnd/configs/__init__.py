"""Configs shipped with the package: ``default.toml`` is the built-in default experiment
(``fedrnd run`` without a file), a copy of ``experiments/default.toml`` (a test keeps them equal)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def default_config_path() -> Path:
    """Path of the built-in default experiment config."""
    return Path(str(resources.files(__name__) / "default.toml"))
