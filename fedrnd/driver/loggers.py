"""Where per-round metrics go: ``metrics.jsonl`` always, TensorBoard and Weights & Biases on request.

A run picks its loggers with the config field ``loggers`` (``["jsonl"]`` by default, and
``metrics.jsonl`` is written in any case; ``tensorboard = true`` still adds ``"tensorboard"``). Every logger is a :class:`Logger`: the
driver hands each one the same row dicts, one per round, and closes it when a method ends. The
packages of the optional loggers are checked by :func:`check_loggers` when the config is
validated, so a missing ``tensorboardX`` or ``wandb`` is an error before any data is built or
any directory written, not a crash after the expensive part.

The driver's informational lines (data summary, memory plan, resume point, compilation time,
where the outputs went) go to the ``"fedrnd"`` :mod:`logging` logger, so an application can
route or silence them like any other library's; :func:`console` prints them on stdout, as
before, for a run with ``verbose=True``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger("fedrnd")
"""The driver's logger (informational lines of a run)."""


@runtime_checkable
class Logger(Protocol):
    """What the driver needs of a metrics logger: one call per round's row, one at the end."""

    def log(self, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's numbers other than the round (the step): what dashboards can plot."""
    return {k: float(v) for k, v in row.items()
            if k != "round" and isinstance(v, int | float) and not isinstance(v, bool)}


class JsonlLogger:
    """Appends one JSON line per round to ``<out>/metrics.jsonl``, flushed at once.

    Why flushed: a resumed run re-reads this file up to its checkpoint's round
    (:func:`fedrnd.driver.outputs.read_history`), so every row must be on disk when the
    checkpoint after it is written.
    """

    def __init__(self, out: Path, **_: Any):
        self._f = open(Path(out) / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())

    def log(self, row: dict[str, Any]) -> None:
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class TensorBoardLogger:
    """TensorBoard event files in ``<out>/tensorboard`` (through tensorboardX), step = round."""

    def __init__(self, out: Path, **_: Any):
        from tensorboardX import SummaryWriter

        self._w = SummaryWriter(str(Path(out) / "tensorboard"))

    def log(self, row: dict[str, Any]) -> None:
        for k, v in _scalars(row).items():
            self._w.add_scalar(k, v, row["round"])

    def close(self) -> None:
        self._w.close()


class WandbLogger:
    """One Weights & Biases run per method: project ``$WANDB_PROJECT`` (default ``fedrnd``),
    run name ``<config name>/<method>``, grouped by the config's name, the config attached.

    ``WANDB_MODE=offline`` (or ``disabled``) is honoured: wandb reads it itself, and it is also
    passed on explicitly so a value set after ``wandb`` was imported still counts.
    """

    def __init__(self, out: Path, *, name: str = "fedrnd", method: str = "",
                 config: dict[str, Any] | None = None, **_: Any):
        import wandb

        kw: dict[str, Any] = {}
        if os.environ.get("WANDB_MODE"):
            kw["mode"] = os.environ["WANDB_MODE"]
        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fedrnd"),
                               name=f"{name}/{method}" if method else name, group=name,
                               config=config or {}, dir=str(out), reinit=True, **kw)

    def log(self, row: dict[str, Any]) -> None:
        self._run.log(_scalars(row), step=int(row["round"]))

    def close(self) -> None:
        self._run.finish()


LOGGERS: dict[str, tuple[Callable[..., Logger], str | None, str]] = {
    "jsonl": (JsonlLogger, None, ""),
    "tensorboard": (TensorBoardLogger, "tensorboardX", "pip install 'fedrnd[tensorboard]'"),
    "wandb": (WandbLogger, "wandb", "pip install 'fedrnd[wandb]'"),
}
"""Logger name -> (class, the package it imports, how to install that package)."""


def selected(names: Sequence[str], tensorboard: bool = False) -> list[str]:
    """The loggers a config asks for, once each, in order; ``tensorboard = true`` adds one
    (the field predates ``loggers`` and keeps its meaning).

    ``jsonl`` is always first, listed or not: ``metrics.jsonl`` is the run's own record, which
    ``--resume`` and :func:`fedrnd.driver.results.load_run` read back.
    """
    out = list(dict.fromkeys(["jsonl", *names]))
    if tensorboard and "tensorboard" not in out:
        out.append("tensorboard")
    return out


def check_loggers(names: Sequence[str], tensorboard: bool = False) -> list[str]:
    """Raise ``ValueError`` for an unknown logger name or one whose package cannot be imported.

    Called from config validation, before anything is built or written: a run that would fail
    at its first logged round must fail in its first second instead.
    """
    from fedrnd.driver.config import did_you_mean

    chosen = selected(names, tensorboard)
    for i, name in enumerate(names):
        if name not in LOGGERS:
            raise ValueError(f"config: loggers.{i} = {name!r} is unknown"
                             f"{did_you_mean(name, list(LOGGERS))}; allowed: "
                             f"{', '.join(LOGGERS)}")
    for name in chosen:
        _, module, install = LOGGERS[name]
        if module is None:
            continue
        try:
            importlib.import_module(module)
        except ImportError as e:
            field = ("tensorboard = true" if name == "tensorboard" and name not in names
                     else f"loggers = [..., {name!r}]")
            raise ValueError(f"config: {field} needs the {module} package, which cannot be "
                             f"imported ({e}): {install}") from None
    return chosen


class MultiLogger:
    """Hands every row to several loggers; closes them all even when one fails to close."""

    def __init__(self, loggers: Sequence[Logger]):
        self.loggers = list(loggers)

    def log(self, row: dict[str, Any]) -> None:
        for lg in self.loggers:
            lg.log(row)

    def close(self) -> None:
        with contextlib.ExitStack() as stack:
            for lg in self.loggers:
                stack.callback(lg.close)


def open_loggers(cfg: Any, out: Path, method: str = "") -> MultiLogger:
    """The loggers ``cfg`` selects for one method's directory ``out``.

    ``cfg`` is a :class:`~fedrnd.driver.config.Config`; a logger that fails to open closes
    the ones opened before it (no open file is left behind).
    """
    opened: list[Logger] = []
    try:
        for name in selected(getattr(cfg, "loggers", ["jsonl"]), cfg.tensorboard):
            cls = LOGGERS[name][0]
            if name == "jsonl":
                # Looked up at call time: outputs.MetricLogger is this class, and tests patch it.
                from fedrnd.driver import outputs

                cls = outputs.MetricLogger
            opened.append(cls(out, name=cfg.name, method=method, config=cfg.to_dict()))
    except BaseException:
        MultiLogger(opened).close()
        raise
    return MultiLogger(opened)


class _Stdout(logging.Handler):
    """Writes a record's message to the current ``sys.stdout`` (as ``print`` did), above any
    open progress bar (:func:`fedrnd.engine.progress.echo`)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from fedrnd.engine.progress import echo

            echo(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never stop a run
            self.handleError(record)


@contextlib.contextmanager
def console(verbose: bool) -> Iterator[None]:
    """While a run lasts, print the ``"fedrnd"`` logger's INFO lines on stdout when
    ``verbose``, unless handlers are attached to ``"fedrnd"`` itself (then they decide).

    Why not look at the root logger: libraries the driver imports (orbax) attach a root
    handler themselves, so its presence says nothing about the user's wishes. While the stdout
    handler is installed the records do not propagate (a root handler would print them a
    second time, on stderr); with ``verbose=False`` they propagate as usual, so an application
    that configured :mod:`logging` receives them there. A level set on ``"fedrnd"``
    (``WARNING``: silent) is kept.
    """
    if not verbose or log.handlers:
        yield
        return
    handler = _Stdout()
    handler.setFormatter(logging.Formatter("%(message)s"))
    level, propagate = log.level, log.propagate
    log.addHandler(handler)
    log.propagate = False
    if level == logging.NOTSET:
        log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.propagate = propagate
        log.setLevel(level)
