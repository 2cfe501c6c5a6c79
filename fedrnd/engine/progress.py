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

A phase that is one jitted program reports nothing until it returns. :func:`blocks` and
:func:`run_blocks` split such a program's mapped axis (clients, score tiles, edges) into a few
host-side calls of one shape (two at most), counted as each finishes, in a way that leaves every result
bit-identical; :func:`compiling` says when the first call compiles. Callers keep the single
call when the mode is ``"off"``, so a silent run pays nothing.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

MODES = ("auto", "bar", "log", "off")
LOG_EVERY = 10.0
"""Seconds between two lines of a task in ``log`` mode."""

_mode = "auto"
_clock = time.perf_counter  # what tasks time with (a fake clock in tests)


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
    """A one-line message on stderr (nothing when progress is off), above any open bar."""
    m = get_mode()
    if m == "bar":
        echo(message, file=sys.stderr)
    elif m != "off":
        print(message, file=sys.stderr, flush=True)


def echo(message: str, file: Any = None) -> None:
    """Print ``message`` (to stdout by default) whatever the mode, without tearing an open bar.

    Why: a plain ``print`` in the middle of a tqdm bar leaves half a bar on the line; results
    a command prints while a bar runs (a cell of ``fedrnd compare``) go through here.
    """
    if get_mode() == "bar":
        from tqdm.auto import tqdm

        tqdm.write(message, file=file)
    else:
        print(message, file=file, flush=True)


class Task:
    """A counted phase; :meth:`update` adds done units. Created by :func:`task`."""

    def __init__(self, desc: str, total: int | None, unit: str, initial: int = 0):
        self.desc, self.total, self.unit = desc, total, unit
        self.n = initial
        self._start = self._last = _clock()
        self._initial = initial
        self._mode = get_mode()
        self._bar = None
        self._postfix = ""
        self._shown = initial  # the count of the last line printed (log mode)
        if self._mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=True,
                             file=sys.stderr)

    def update(self, k: int = 1) -> None:
        self.n += k
        if self._bar is not None:
            self._bar.update(k)
        elif self._mode == "log":
            now = _clock()
            if now - self._last >= LOG_EVERY:
                self._last = now
                self._line()

    def skip(self, k: int = 1) -> None:
        """Count ``k`` units that took no work (cached results): done, left out of the pace."""
        self._initial += k
        self.update(k)

    def set_postfix(self, **kw: Any) -> None:
        if self._bar is not None:
            self._bar.set_postfix(**kw)
        self._postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def elapsed(self) -> float:
        return _clock() - self._start

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
        self._shown = self.n

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._mode == "log" and self.n > self._initial and self.n != self._shown:
            self._line()  # the last count, unless the last update just printed it


@contextlib.contextmanager
def task(desc: str, total: int | None = None, unit: str = "step",
         initial: int = 0) -> Iterator[Task]:
    """A progress task over ``total`` units; closed (last line printed) when the block ends."""
    t = Task(desc, total, unit, initial)
    try:
        yield t
    finally:
        t.close()


# --------------------------------------------------------------------------------------------
# progress out of a jitted program: compilation notes and host blocks
# --------------------------------------------------------------------------------------------

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
"""The ``jax.monitoring`` event JAX records when it has traced a function: lowering and
compiling follow, so it is the earliest sign that a call is compiling."""


@contextlib.contextmanager
def compiling(message: str) -> Iterator[None]:
    """Print ``message`` (a :func:`note`) once if JAX traces a program inside the block.

    Why: the first call of a jitted program traces and compiles it before it runs, often the
    longest silent wait of a phase (seconds), while a cached program starts at once and says
    nothing. Nothing is registered when progress is off.
    """
    if get_mode() == "off":
        yield
        return
    said = False

    def listen(event: str, duration: float, **_: Any) -> None:
        nonlocal said
        if event == TRACE_EVENT and not said:
            said = True
            note(message)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


BLOCKS = 16
"""At most this many host calls (at least half as many) :func:`blocks` splits a mapped program
into: enough for a bar and an ETA."""

MIN_BLOCK_WORK = 1 << 19
"""Predictor evaluations (forward passes on one example) a host block holds at least. On a
2-core CPU a block cost 0.3-0.5 ms more than its items inside one call (1,000-client edge
scores in 167 blocks against one) and the digits MLP pair ran about 3M evaluations a second:
2^19 (about 0.17 s) keep it under 0.3%. Phases shorter than two such blocks run as one call."""


class Block(NamedTuple):
    """Items ``[lo, hi)`` of a mapped axis, run as one call of ``size`` items (when ``size`` is
    larger, the call is padded with copies of a real item, whose results are dropped)."""

    lo: int
    hi: int
    size: int


def blocks(n: int, *, chunk: int = 1, shards: int = 1, parts: int | None = None,
           work: float = 0.0) -> list[Block]:
    """Split ``n`` items mapped as :class:`~fedrnd.engine.ClientMapper` maps them (``shards``
    devices, ``chunk`` items vmapped together per step of a loop) into host calls whose results
    are bit-identical to one call over all ``n``.

    Why these rules: an item's result depends on what it is batched with, so a block keeps the
    single call's batches. With ``chunk == 1`` every item runs alone in a loop step: blocks of
    ``k >= 2`` steps per device (a one-step loop may be compiled differently) and one shape,
    the last block padded, so no second program is compiled. With ``chunk > 1`` blocks are
    whole multiples of ``chunk`` aligned on them, and the last block takes the remaining
    chunks and the partial one (the single call's vmapped tail): one extra shape at most. With
    ``chunk > 1`` over several devices each device's contiguous share would change, so it is
    not split. ``work``: predictor evaluations per item, to keep :data:`MIN_BLOCK_WORK` per
    block (0: no bound). Returns one block ``(0, n, n)`` when no split applies.
    """
    parts = BLOCKS if parts is None else int(parts)
    if work > 0:
        parts = min(parts, int(n * work // max(1, MIN_BLOCK_WORK)))
    whole = [Block(0, n, n)]
    if n < 1 or parts < 2:
        return whole
    if chunk <= 1:
        if n % shards:
            return whole
        m = n // shards  # items per device
        best = None
        # Between parts / 2 and parts blocks if any fits, else fewer (a small prime m).
        for low in (max(2, min(parts, m) // 2), 2):
            for nb in range(low, min(parts, m // 2) + 1):
                k = -(-m // nb)
                if k < 2 or (nb - 1) * k >= m:  # every block holds real items
                    continue
                cost = (nb * k - m, -nb)  # the least padding, then the most blocks
                if best is None or cost < best[0]:
                    best = (cost, nb, k)
            if best is not None:
                break
        if best is None:
            return whole
        _, nb, k = best
        b = k * shards
        return [Block(i * b, min((i + 1) * b, n), b) for i in range(nb)]
    if shards > 1:
        return whole
    q = n // chunk  # full chunks; the partial one (n % chunk items) goes with the last block
    k = max(2, -(-q // parts))  # chunks per block
    nb = q // k
    if nb < 2:
        return whole
    b = k * chunk
    out = [Block(i * b, (i + 1) * b, b) for i in range(nb - 1)]
    lo = (nb - 1) * b
    return out + [Block(lo, n, n - lo)]


def run_blocks(call: Callable[[Block], Any], plan: Sequence[Block], n: int, desc: str,
               total: int, unit: str, *, count: Callable[[Block], int] | None = None,
               compile_note: str | None = None) -> Any:
    """The outputs of ``call(b)`` for the blocks of ``plan`` joined on their leading axis, cut
    to the first ``n`` items, and counted in a :func:`task` as each block's result is ready.

    ``call`` dispatches a jitted program and returns its output pytree (not yet ready); one
    block stays queued ahead, so the device never waits for the host to report. The first block
    of each shape is dispatched before the task opens: that is when JAX compiles (announced by
    ``compile_note``), so the bar's pace and ETA leave compilation out. ``count(b)`` is the
    units a block adds (default ``b.hi - b.lo``). Finished blocks are copied into one output
    updated in place, so memory holds the result once (plus the blocks in flight), not the
    blocks and their concatenation.
    """
    count = count or (lambda b: b.hi - b.lo)
    if len(plan) == 1 and plan[0] == Block(0, n, n):  # one plain call, counted when done
        with compiling(compile_note) if compile_note else contextlib.nullcontext():
            res = call(plan[0])
        with task(desc, total, unit) as t:
            jax.block_until_ready(res)
            t.update(count(plan[0]))
        return res
    firsts: dict[int, int] = {}
    for i, b in enumerate(plan):
        firsts.setdefault(b.size, i)
    pending: list[tuple[Block, Any]] = []
    with compiling(compile_note) if compile_note else contextlib.nullcontext():
        pending += [(plan[i], call(plan[i])) for i in firsts.values()]
    out = _Joined(n)
    with task(desc, total, unit) as t:
        for i, b in enumerate(plan):
            if i not in firsts.values():
                pending.append((b, call(b)))
            while pending and (len(pending) > 1 or i == len(plan) - 1):
                done, res = pending.pop(0)
                jax.block_until_ready(res)
                out.add(done, res)
                t.update(count(done))
    return out.result()


@functools.partial(jax.jit, static_argnums=3, donate_argnums=0)
def _put(buf: Any, part: Any, lo: jax.Array, keep: int) -> Any:
    return jax.tree.map(lambda b, p: jax.lax.dynamic_update_slice_in_dim(b, p[:keep], lo, 0),
                        buf, part)


class _Joined:
    """Block outputs written into arrays of ``n`` items as they come (in place: the buffer is
    donated); on several devices, where such a buffer would sit on one, concatenated instead."""

    def __init__(self, n: int):
        self.n = n
        self.buf: Any = None
        self.parts: list[tuple[int, Any]] | None = None

    def add(self, b: Block, part: Any) -> None:
        keep = min(b.hi, self.n) - b.lo
        if self.buf is None and self.parts is None:
            if any(len(a.sharding.device_set) > 1 for a in jax.tree.leaves(part)):
                self.parts = []
            else:
                self.buf = jax.tree.map(lambda a: jnp.zeros((self.n, *a.shape[1:]), a.dtype),
                                        part)
        if self.parts is not None:
            self.parts.append((b.lo, jax.tree.map(lambda a: a[:keep], part)))
        else:
            self.buf = _put(self.buf, part, b.lo, keep)

    def result(self) -> Any:
        if self.parts is None:
            return self.buf
        parts = [p for _, p in sorted(self.parts, key=lambda lp: lp[0])]
        return jax.tree.map(lambda *a: jnp.concatenate(a), *parts)
