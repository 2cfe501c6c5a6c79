"""fedrnd.engine.progress: log lines, rate limit, off mode, mode switching, ETA, host blocks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrnd.engine import ClientMapper, progress


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(progress, "_clock", c)
    return c


def test_log_mode_ends_with_count_and_percent(capsys):
    with progress.mode("log"), progress.task("demo", total=8, unit="item") as t:
        for _ in range(8):
            t.update()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1  # LOG_EVERY (10 s) did not pass: only the closing line
    assert err[0].startswith("demo: 8/8 items (100%), ")


def test_log_lines_are_rate_limited(capsys, clock, monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY", 5.0)
    with progress.mode("log"), progress.task("demo", total=20, unit="step") as t:
        for _ in range(20):
            clock.t += 1.0
            t.update()
    lines = capsys.readouterr().err.strip().splitlines()
    # One line every 5 s of the 20 s; the last update printed the final count, not repeated.
    assert [ln.split(",")[0] for ln in lines] == [f"demo: {n}/20 steps ({5 * n}%)"
                                                  for n in (5, 10, 15, 20)]
    assert "about 15 s left" in lines[0] and "left" not in lines[-1]


def test_off_mode_prints_nothing(capsys, monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)
    with progress.mode("off"):
        with progress.task("demo", total=3) as t:
            t.update(3)
        progress.note("compiling")
        with progress.compiling("compiling"):
            jax.jit(lambda x: x + 1)(jnp.arange(3.0))
    assert capsys.readouterr() == ("", "")


def test_mode_context_restores_and_rejects_bad_modes():
    progress.set_mode("log")
    try:
        with progress.mode("off"):
            assert progress.get_mode() == "off"
        assert progress.get_mode() == "log"
        with pytest.raises(RuntimeError), progress.mode(False):
            assert progress.get_mode() == "off"
            raise RuntimeError
        assert progress.get_mode() == "log"
        with progress.mode(None):  # None keeps the current mode
            assert progress.get_mode() == "log"
        with pytest.raises(ValueError, match="progress mode"):
            progress.set_mode("loud")
        with pytest.raises(ValueError, match="progress mode"), progress.mode("verbose"):
            pass
        assert progress.get_mode() == "log"
    finally:
        progress.set_mode("auto")


def test_eta_at_the_pace_so_far(clock):
    with progress.mode("off"), progress.task("demo", total=10) as t:
        assert t.eta() is None  # nothing done yet
        clock.t += 4.0
        t.update(2)
        assert t.elapsed() == pytest.approx(4.0)
        assert t.eta() == pytest.approx(4.0 / 2 * 8)  # 2 s a unit, 8 units left
    # Units done before the task (resumed) or without work (cached) are out of the pace.
    with progress.mode("off"), progress.task("demo", total=10, initial=4) as t:
        t.skip(2)
        assert t.n == 6 and t.eta() is None
        clock.t += 3.0
        t.update(1)
        assert t.eta() == pytest.approx(3.0 * 3)


def test_note_in_log_mode_goes_to_stderr(capsys):
    with progress.mode("log"):
        progress.note("rnd: compiling")
        progress.echo("result line")
    out, err = capsys.readouterr()
    assert err == "rnd: compiling\n" and out == "result line\n"


def test_compiling_notes_a_new_program_once(capsys):
    f = jax.jit(lambda x: jnp.sin(x) * 2)
    with progress.mode("log"):
        with progress.compiling("compiling f ..."):
            f(jnp.arange(4.0))
            f(jnp.arange(5.0))  # a second new shape: still one note
        with progress.compiling("compiling f ..."):
            f(jnp.arange(4.0))  # cached: no note
    assert capsys.readouterr().err == "compiling f ...\n"


# --------------------------------------------------------------------------------------------
# host blocks
# --------------------------------------------------------------------------------------------


def _covers(plan, n):
    assert plan[0].lo == 0 and plan[-1].hi == n
    assert all(a.hi == b.lo for a, b in zip(plan, plan[1:], strict=False))
    assert all(b.lo < b.hi <= b.lo + b.size for b in plan)


@pytest.mark.parametrize("n", [4, 5, 16, 20, 200, 997, 1000, 1333, 10_000])
def test_blocks_one_item_per_step(n):
    plan = progress.blocks(n)
    _covers(plan, n)
    sizes = {b.size for b in plan}
    assert len(sizes) == 1 and min(sizes) >= 2  # one program shape, never a one-step loop
    assert 2 <= len(plan) <= progress.BLOCKS
    assert len(plan) * plan[0].size - n <= max(2, n // 100)  # little padding
    assert progress.blocks(1000, parts=1) == [progress.Block(0, 1000, 1000)]


def test_blocks_hold_enough_work():
    w = progress.MIN_BLOCK_WORK
    assert progress.blocks(1000, work=w / 1000) == [progress.Block(0, 1000, 1000)]  # one's worth
    plan = progress.blocks(1000, work=3 * w / 1000)  # three blocks' worth: two or three
    assert 2 <= len(plan) <= 3 and all(b.size * 3 * w / 1000 >= w for b in plan)
    assert len(progress.blocks(1000, work=w)) == len(progress.blocks(1000))  # BLOCKS bounds


def test_blocks_keep_chunks_and_devices():
    # Too few items for two blocks of two loop steps: one call.
    assert progress.blocks(3) == [progress.Block(0, 3, 3)]
    # Several devices, one item per step: each block a multiple of the devices.
    plan = progress.blocks(1000, shards=4)
    _covers(plan, 1000)
    assert all(b.size % 4 == 0 and b.size // 4 >= 2 for b in plan)
    # Chunks of 256: blocks aligned on whole chunks, the last takes the partial chunk.
    plan = progress.blocks(10_000, chunk=256)
    _covers(plan, 10_000)
    assert all(b.lo % 256 == 0 and b.size == b.hi - b.lo for b in plan)
    assert all(b.size == plan[0].size for b in plan[:-1]) and plan[0].size >= 512
    assert plan[-1].size - plan[0].size < 256 * (plan[0].size // 256)
    assert progress.blocks(1000, chunk=256) == [progress.Block(0, 1000, 1000)]
    # Chunks over several devices would change each device's share: one call.
    assert progress.blocks(10_000, chunk=256, shards=2) == [progress.Block(0, 10_000, 10_000)]


@functools.partial(jax.jit, static_argnums=0)
def _squares(mapper, x):
    return mapper.map(lambda v, _: v * v + 1.0, x)


@pytest.mark.parametrize("chunk", [1, 3])
def test_run_blocks_matches_one_call_and_counts(capsys, monkeypatch, chunk):
    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)
    x = np.linspace(-1, 1, 41, dtype=np.float32)
    mapper = ClientMapper(chunk)
    plan = progress.blocks(len(x), chunk=chunk, parts=4)
    assert len(plan) >= 2
    xp = np.concatenate([x, np.repeat(x[-1:], plan[-1].lo + plan[-1].size - len(x))])
    order = []

    def call(b):
        order.append(b.lo)
        v = xp[b.lo:b.lo + b.size]
        return {"sq": _squares(mapper, v), "id": jnp.asarray(v)}

    with progress.mode("log"):
        got = progress.run_blocks(call, plan, len(x), "squares", len(x), "item",
                                  compile_note="compiling squares ...")
    assert got["sq"].shape == x.shape  # padding dropped
    np.testing.assert_array_equal(got["sq"], _squares(mapper, x))
    np.testing.assert_array_equal(got["id"], x)
    # Each shape's first block is dispatched first (compiled before the task's clock starts).
    firsts = sorted({b.size: b.lo for b in reversed(plan)}.values())
    assert order[:len(firsts)] == firsts and sorted(order) == [b.lo for b in plan]
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "compiling squares ..."
    counts = [int(ln.split(":")[1].split("/")[0]) for ln in err[1:]]
    assert counts == sorted(counts) and counts[-1] == len(x) and len(counts) == len(plan)
