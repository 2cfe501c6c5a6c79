"""Progress of long host-side phases: a bar on a terminal, timed lines in a log, or nothing.

Every phase a user may wait on for more than a few seconds (RND discovery's predictor training
and scoring, compilation, the cells of ``fedrnd compare``, the rounds of a run) reports through
this module, so one switch governs them all:

- ``"bar"``: a tqdm bar on stderr (the default when stderr is a terminal);
- ``"log"``: plain lines ``desc: 40/100 (40%), 12 s, about 18 s left``, at most one every
  :data:`LOG_EVERY` seconds plus the last (the default when stderr is not a terminal, e.g. a
  batch job's log file);
- ``"off"``: silent (``--no-progress``, ``progress = false``).

Use :func:`task` around a loop and :func:`note` for a one-line message such as
``compiling rnd round``. The mode is process-wide (:func:`set_mode`, or the :func:`mode`
context manager); library code never decides it.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any

MODES = ("auto", "bar", "log", "off")
LOG_EVERY = 10.0
"""Seconds between two lines of a task in ``log`` mode."""

_mode = "auto"


def set_mode(m: str | bool | None) -> None:
    """Set the process-wide progress mode (``True`` = ``auto``, ``False`` = ``off``)."""
    global _mode
    _mode = _normalize(m)


def get_mode() -> str:
    """The effective mode: ``bar``, ``log`` or ``off`` (``auto`` resolved against stderr)."""
    if _mode != "auto":
        return _mode
    try:
        return "bar" if sys.stderr.isatty() else "log"
    except (AttributeError, ValueError):
        return "log"


@contextlib.contextmanager
def mode(m: str | bool | None) -> Iterator[None]:
    """Use progress mode ``m`` inside the block (``None`` leaves the current one)."""
    global _mode
    old = _mode
    if m is not None:
        _mode = _normalize(m)
    try:
        yield
    finally:
        _mode = old


def _normalize(m: str | bool | None) -> str:
    if m is None or m is True:
        return "auto"
    if m is False:
        return "off"
    if m not in MODES:
        raise ValueError(f"progress mode must be one of {list(MODES)}, got {m!r}")
    return m


def note(message: str) -> None:
    """A one-line message on stderr (nothing when progress is off)."""
    if get_mode() != "off":
        print(message, file=sys.stderr, flush=True)


class Task:
    """A counted phase; :meth:`update` adds done units. Created by :func:`task`."""

    def __init__(self, desc: str, total: int | None, unit: str, initial: int = 0):
        self.desc, self.total, self.unit = desc, total, unit
        self.n = initial
        self._start = self._last = time.perf_counter()
        self._initial = initial
        self._mode = get_mode()
        self._bar = None
        self._postfix = ""
        if self._mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=True,
                             file=sys.stderr)

    def update(self, k: int = 1) -> None:
        self.n += k
        if self._bar is not None:
            self._bar.update(k)
        elif self._mode == "log":
            now = time.perf_counter()
            if now - self._last >= LOG_EVERY:
                self._last = now
                self._line()

    def set_postfix(self, **kw: Any) -> None:
        if self._bar is not None:
            self._bar.set_postfix(**kw)
        self._postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def eta(self) -> float | None:
        """Seconds left at the pace so far (``None`` before the first unit or without a total)."""
        done = self.n - self._initial
        if self.total is None or done <= 0:
            return None
        return self.elapsed() / done * (self.total - self.n)

    def _line(self) -> None:
        parts = [f"{self.desc}: {self.n}"]
        if self.total:
            parts[0] += f"/{self.total} {self.unit}s ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{self.elapsed():.0f} s")
        eta = self.eta()
        if eta is not None and self.n < (self.total or 0):
            parts.append(f"about {eta:.0f} s left")
        if self._postfix:
            parts.append(self._postfix)
        print(", ".join(parts), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._mode == "log" and self.n > self._initial:
            self._line()


@contextlib.contextmanager
def task(desc: str, total: int | None = None, unit: str = "step",
         initial: int = 0) -> Iterator[Task]:
    """A progress task over ``total`` units; closed (last line printed) when the block ends."""
    t = Task(desc, total, unit, initial)
    try:
        yield t
    finally:
        t.close()
