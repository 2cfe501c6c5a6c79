"""Progress of RND discovery: training and scoring report on stderr when progress is on, say
nothing when it is off, and the results are bit-identical either way (host blocks)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from fedrnd.engine import progress
from fedrnd.rnd import RNDConfig, assign_newcomers, discover
from tests.rnd._data import grouped_gaussian

# Small networks; row_tile=2 gives the dense scores six tiles, enough for host blocks.
TINY = RNDConfig(network="mlp", target_width=(16,), predictor_width=(4,), out_dim=8,
                 epochs=2, batch_size=8, min_steps=40, row_tile=2)


def _counts(lines: list[str], desc: str) -> list[int]:
    return [int(ln[len(desc) + 2:].split("/")[0]) for ln in lines if ln.startswith(desc + ": ")]


def _arrays(d) -> list[np.ndarray]:
    out = [d.scores, d.second, d.edge_scores, d.self_novelty, d.train_loss, d.federation]
    return ([np.asarray(a) for a in out if a is not None]
            + [np.asarray(a) for a in jax.tree.leaves(d.predictors)])


@pytest.mark.parametrize("candidates", [None, 4])
def test_discovery_progress_on_stderr_and_identical_results(capsys, monkeypatch, candidates):
    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)  # a line at every finished block
    monkeypatch.setattr(progress, "MIN_BLOCK_WORK", 0)  # host blocks even for tiny work
    data = grouped_gaussian([0] * 6 + [1] * 6)
    cfg = RNDConfig(**{**TINY.__dict__, "candidates": candidates})
    res, err = {}, {}
    for m in ("off", "log"):
        with progress.mode(m):
            res[m] = discover(data, cfg, key=jax.random.key(3))
        err[m] = capsys.readouterr().err
    assert err["off"] == ""
    lines = err["log"].splitlines()
    train = _counts(lines, "rnd: training 12 predictors")
    assert len(train) >= 2 and train == sorted(train) and train[-1] == 12
    assert "rnd: training 12 predictors: 12/12 predictors (100%)" in err["log"]
    if candidates is None:
        scored = _counts(lines, "rnd: scoring 12x12 pairs")
        total = 12
    else:
        e = len(np.asarray(res["log"].edges.src))
        scored = _counts(lines, f"rnd: scoring {e} edges")
        total = e
    assert len(scored) >= 2 and scored == sorted(scored) and scored[-1] == total
    assert any(ln.startswith("rnd: deciding federations") for ln in lines)
    for a, b in zip(_arrays(res["off"]), _arrays(res["log"]), strict=True):
        assert np.array_equal(a, b)


def test_newcomers_same_with_and_without_progress(capsys):
    data = grouped_gaussian([0] * 4 + [1] * 4)
    new = grouped_gaussian([0, 1, 1, 0, 1, 0], seed=7)
    with progress.mode("off"):
        disc = discover(data, TINY, key=jax.random.key(0))
        quiet = assign_newcomers(disc, new, key=jax.random.key(1))
    with progress.mode("log"):
        loud = assign_newcomers(disc, new, key=jax.random.key(1))
    assert "rnd: training 6 predictors" in capsys.readouterr().err
    np.testing.assert_array_equal(quiet, loud)


def test_small_phases_run_as_one_call_with_one_line(capsys):
    data = grouped_gaussian([0] * 3 + [1] * 3)
    with progress.mode("log"):
        discover(data, TINY, key=jax.random.key(0))
    lines = capsys.readouterr().err.splitlines()
    # Far less work than two blocks' worth (MIN_BLOCK_WORK): one plain call a phase, one line.
    assert [ln for ln in lines if "/" in ln] == [
        ln for ln in lines if ln.startswith(("rnd: training 6 predictors: 6/6 predictors (100%)",
                                             "rnd: scoring 6x6 pairs: 6/6 rows (100%)"))]
    assert len([ln for ln in lines if "/" in ln]) == 2
