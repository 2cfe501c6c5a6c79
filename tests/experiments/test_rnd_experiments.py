"""The RND experiment script (experiments/rnd/run.py): re-reads, caching, skips and the report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from fedrnd.rnd import RNDConfig, discover
from tests.experiments._script import load_script
from tests.rnd._data import grouped_gaussian, shuffled_groups

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "rnd" / "run.py"


@pytest.fixture(scope="module")
def run():
    return load_script(SCRIPT, "rnd_experiments_run")


@pytest.fixture(scope="module")
def population():
    groups = shuffled_groups([5, 4, 3], seed=1)
    return groups, grouped_gaussian(groups, n=40, dim=6, sep=6.0)


@pytest.mark.parametrize("sigma,eps,rule", [("row", "auto", "mutual"), ("self", 0.5, "mutual"),
                                            ("row", 1.0, "mutual"), ("self", "auto", "mutual"),
                                            ("row", 0.0, "mutual"), ("row", 1.0, "leader"),
                                            ("self", 2.0, "leader")])
def test_reading_a_matrix_with_another_setting_is_discover_with_that_setting(
        run, population, sigma, eps, rule):
    _, data = population
    base = RNDConfig(network="mlp", epochs=3, criterion="eps")  # the reads replay the eps rule
    ref = discover(data, base, key=jax.random.key(3))
    other = discover(data, dataclasses.replace(base, sigma=sigma, eps=eps, rule=rule),
                     key=jax.random.key(3))
    fed, used = run.read_federations(ref.scores, ref.self_std, sigma, eps, rule)
    np.testing.assert_array_equal(fed, other.federation)
    assert used == pytest.approx(other.eps)


def test_score_reads_finds_separable_groups_and_reports_sizes(run, population):
    groups, data = population
    disc = discover(data, RNDConfig(network="mlp", epochs=3, criterion="eps"),
                    key=jax.random.key(0))
    reads = run.score_reads(disc.scores, disc.self_std, groups)
    assert set(reads) == {run.read_key(s, e, r) for s in run.SIGMAS for e in run.EPS_READS
                          for r in run.RULES}
    assert "row/auto" in reads and "row/auto/leader" in reads
    r = reads[run.DEFAULT_READ]
    assert r["federations"] == disc.num_federations
    assert sum(r["sizes"]) == len(groups) and r["sizes"] == sorted(r["sizes"], reverse=True)
    assert r["ari"] == 1.0 and r["sizes"] == [5, 4, 3]


def test_label_tv_within_and_across_federations(run):
    hist = np.array([[1, 0], [1, 0], [0.5, 0.5], [0, 1]], float)
    fed = np.array([0, 0, 1, 1])
    within, across = run.label_tv(hist, fed)
    # Within: pairs (0,1) -> 0 and (2,3) -> 0.5, both ordered ways: mean 0.25.
    assert within == pytest.approx(0.25)
    # Across: (0,2) 0.5, (0,3) 1, (1,2) 0.5, (1,3) 1: mean 0.75.
    assert across == pytest.approx(0.75)
    assert np.isnan(run.label_tv(hist, np.zeros(4, int))[1])


def test_label_hist_counts_each_clients_training_labels(run, population):
    _, data = population
    h = run._label_hist(data)
    y, idx, cnt = np.asarray(data.y), np.asarray(data.train_idx), np.asarray(data.train_count)
    for c in range(data.num_clients):
        ref = np.bincount(y[idx[c, :cnt[c]]], minlength=data.num_classes) / cnt[c]
        np.testing.assert_allclose(h[c], ref)


def test_mean_std_format(run):
    assert run.mean_std([1.0, 3.0]) == "2.000 ± 1.000"
    assert run.mean_std([0.5], "{:.1f}") == "0.5"
    assert run.mean_std([]) == "n/a" and run.mean_std([float("nan")]) == "n/a"
    assert run.mean_std([None, 2.0, 4.0], "{:.0f}") == "3 ± 1"


def test_quick_settings_shrink_every_population(run):
    for pop in run.PAPER + run.CONTROL + run.SCALED:
        cfg = run.load_cfg(pop, seed=3, quick=True)
        assert cfg.seed == 3 and cfg.rounds == 2 and cfg.data.num_clients <= 24
        opts = cfg.data.partition_options
        if "group_sizes" in opts:
            assert sum(opts["group_sizes"]) == cfg.data.num_clients
            assert min(opts["group_sizes"]) >= 1
        assert cfg.data.source != "fashion_mnist"


def test_quick_discovery_parts_cache_cells_skip_missing_data_and_report(
        run, tmp_path, monkeypatch):
    mlp = run.Variant("mlp-train-e10", {"network": "mlp"}, "MLP")
    # One cheap setting per population keeps this a smoke test of the plumbing.
    monkeypatch.setattr(run, "GRID", [mlp])
    monkeypatch.setattr(run, "CONTROL_GRID", [mlp])
    monkeypatch.setattr(run, "SCALED_GRID", [dataclasses.replace(mlp, rnd={"network": "mlp",
                                                                           "probe_cap": 10})])
    monkeypatch.setattr(run, "CONTROL", [])
    monkeypatch.setattr(run, "SCALED", [p for p in run.SCALED if p.name == "scaled_dirichlet"])
    assert run.main(["--quick", "--out", str(tmp_path), "--parts", "grid", "scaled"]) == 0
    cells = sorted(p.relative_to(tmp_path / "cells").as_posix()
                   for p in (tmp_path / "cells").rglob("*.json"))
    assert cells == ["grid/paper_cifar10/skipped.json",
                     "grid/paper_fmnist/mlp-train-e10/seed0.json",
                     "scaled/scaled_dirichlet/mlp-train-e10/seed0.json"]
    cell = json.loads((tmp_path / "cells/grid/paper_fmnist/mlp-train-e10/seed0.json").read_text())
    assert cell["num_clients"] == 12 and cell["quick"] and len(cell["scores"]) == 12
    assert cell["reads"]["row/auto"]["federations"] >= 1
    skip = json.loads((tmp_path / "cells/grid/paper_cifar10/skipped.json").read_text())
    assert "cifar10" in skip["reason"] and "not prepared" in skip["reason"]
    text = (tmp_path / "RESULTS.md").read_text()
    assert "QUICK SMOKE RUN" in text and "skipped (data not available here)" in text
    assert "| MLP | 1 |" in text  # the grid table row, generated from the cell
    assert "label TV within / across" in text
    # Re-reading from the stored matrices (in the cell; runs/matrices at scale) restores reads.
    for rel in ("grid/paper_fmnist/mlp-train-e10/seed0.json",
                "scaled/scaled_dirichlet/mlp-train-e10/seed0.json"):
        path = tmp_path / "cells" / rel
        before = json.loads(path.read_text())
        path.write_text(json.dumps({**before, "reads": {}}))
    assert run.reread(tmp_path / "cells", tmp_path / "runs") == 2
    for rel in ("grid/paper_fmnist/mlp-train-e10/seed0.json",
                "scaled/scaled_dirichlet/mlp-train-e10/seed0.json"):
        after = json.loads((tmp_path / "cells" / rel).read_text())
        assert after["reads"]["row/auto"]["federations"] >= 1
        assert "self/0.5/leader" in after["reads"]
    # A second run finds every cell and computes nothing.
    import fedrnd.rnd as rnd_pkg

    def boom(*a, **k):
        raise AssertionError("a cached cell was recomputed")

    monkeypatch.setattr(rnd_pkg, "discover", boom)
    assert run.main(["--quick", "--out", str(tmp_path), "--parts", "grid", "scaled"]) == 0


@pytest.mark.slow
def test_quick_paper_part_runs_all_methods_and_writes_heat_maps(run, tmp_path, monkeypatch):
    monkeypatch.setattr(run, "PAPER", run.PAPER[:1])
    assert run.main(["--quick", "--out", str(tmp_path), "--parts", "paper", "paper_eps"]) == 0
    cell = json.loads((tmp_path / "cells/paper/paper_fmnist/sim/seed0.json").read_text())
    assert set(cell["methods"]) == {"rnd", "fedavg", "local"}
    rnd = cell["methods"]["rnd"]
    assert 0.0 <= rnd["test_acc/mean"] <= 1.0 and rnd["federations"] >= 1
    assert np.asarray(cell["scores"]).shape == (12, 12)
    for f in ("paper_fmnist_novelty_seed0.png", "paper_fmnist_novelty_normalised_seed0.png",
              "paper_fmnist_novelty_seeds.png"):
        assert (tmp_path / "figures" / f).stat().st_size > 0
    eps_cell = json.loads((tmp_path / "cells/paper_eps/paper_fmnist/sim/seed0.json").read_text())
    assert list(eps_cell["methods"]) == ["rnd (eps 0.5)"]
    assert eps_cell["methods"]["rnd (eps 0.5)"]["eps"] == 0.5
    text = (tmp_path / "RESULTS.md").read_text()
    for row in ("| rnd | 1 |", "| fedavg | 1 |", "| local | 1 |", "| rnd (eps 0.5) | 1 |"):
        assert row in text
