"""``fedrnd compare``: K substitution, table rows and columns, resume from cached cells, errors."""

from __future__ import annotations

import dataclasses
import json
import re
from typing import ClassVar

import numpy as np
import pytest

from fedrnd.algorithms import ALGORITHMS, FedAvg
from fedrnd.cli.main import main
from fedrnd.driver import compare
from fedrnd.driver.compare import load_cell, parse_grid, resolve_k, run_grid, scenario_rows


@dataclasses.dataclass(frozen=True)
class _FedAvgK(FedAvg):
    """FedAvg with an (unused) cluster count, to exercise ``K`` options without a real method."""

    name: ClassVar[str] = "fedavg_k"
    clusters_clients: ClassVar[bool] = True
    num_clusters: int = 1


@pytest.fixture
def fedavg_k(monkeypatch):
    monkeypatch.setitem(ALGORITHMS, "fedavg_k", _FedAvgK)


def _raw(tmp_path, **kw):
    raw = {
        "name": "tiny",
        "seeds": [0, 1],
        "cache_dir": str(tmp_path / "cache"),
        "results": str(tmp_path / "out" / "RESULTS.md"),
        "config": {"rounds": 2, "eval_every": 1,
                   "data": {"source": "digits", "num_clients": 6},
                   "model": {"name": "logreg", "options": {}}},
        "scenarios": [
            {"name": "rot", "partition": "rotation", "partition_options": {"num_groups": 2}},
            {"name": "iid", "partition": "iid"},
        ],
        "methods": [{"name": "fedavg"},
                    {"name": "fedavg_k", "options": {"num_clusters": "K-1"}}],
    }
    raw.update(kw)
    return raw


def test_k_expressions_resolve_from_the_scenario():
    opts, res = resolve_k({"num_clusters": "K+2", "a": "K", "b": "K - 1", "c": 0.5, "d": "x"}, 4)
    assert opts == {"num_clusters": 6, "a": 4, "b": 3, "c": 0.5, "d": "x"}
    assert res == {"num_clusters": 6, "a": 4, "b": 3}


@pytest.mark.slow  # about 40 s with a cold compilation cache (6 cells), 12 s warm
def test_tiny_grid_table_and_resume(tmp_path, fedavg_k, monkeypatch):
    grid = parse_grid(_raw(tmp_path), tmp_path)
    assert [s.groups for s in grid.scenarios] == [2, 1]
    cells = grid.cells()
    # K-1 = 0 on the ungrouped scenario: not applicable, never run.
    assert sum(c.config is None for c in cells) == 2
    records = run_grid(grid, log=None)
    assert len(records) == 6
    assert len(list((tmp_path / "cache" / "cells").rglob("*.json"))) == 6
    for c in cells:
        if c.config is not None:
            assert c.config.algorithms[0].options.get("num_clusters", 1) == 1
            assert c.config.finetune and c.config.seed == c.seed

    text = grid.results.read_text()
    assert "## rot" in text and "## iid" in text
    header = ("| method | test acc % | test acc % +FT | ARI | NMI | clusters | MB/client | "
              "clustering s | wall s | seeds |")
    assert text.count(header) == 2
    rot = text.split("## rot")[1].split("## iid")[0]
    iid = text.split("## iid")[1]
    assert re.findall(r"^\| (.+?) \|", rot, re.M)[1:] == [
        "fedavg", "fedavg+ft", "fedavg_k K-1 (num_clusters=1)"]
    assert re.findall(r"^\| (.+?) \|", iid, re.M)[1:] == ["fedavg", "fedavg+ft"]
    assert "Not applicable here: fedavg_k K-1" in iid
    assert "jax" in text and "Machine:" in text and "Same initial weights" in text
    for name in ("rot", "iid"):
        assert (tmp_path / "out" / "figures" / f"tiny_{name}.png").is_file()
        assert f"figures/tiny_{name}.png" in text
    # fedavg and fedavg_k (which clusters clients) are two families: a figure for each too.
    assert (tmp_path / "out" / "figures" / "tiny_rot_centralized.png").is_file()
    assert "figures/tiny_rot_clustered.png" in text
    # On iid fedavg_k does not run: one family, no per-family figures.
    assert not list((tmp_path / "out" / "figures").glob("tiny_iid_*.png"))

    # Table figures are the mean and sample std over the cached seeds.
    accs = [records[("rot", "fedavg", s)]["final"]["test_acc/mean"] for s in (0, 1)]
    fts = [records[("rot", "fedavg", s)]["final"]["test_acc_ft/mean"] for s in (0, 1)]
    row = {r["method"]: r for r in scenario_rows(grid, grid.scenarios[0], records)}
    assert row["fedavg"]["acc"] == f"{np.mean(accs) * 100:.1f} ± {np.std(accs, ddof=1) * 100:.1f}"
    assert row["fedavg+ft"]["acc"] == row["fedavg"]["acc_ft"] == \
        f"{np.mean(fts) * 100:.1f} ± {np.std(fts, ddof=1) * 100:.1f}"
    assert row["fedavg"]["ari"] == "-"  # FedAvg does not cluster clients
    assert row["fedavg_k K-1 (num_clusters=1)"]["ari"] != "-"
    assert row["fedavg_k K-1 (num_clusters=1)"]["clusters"] == "1.0 ± 0.0"
    assert {r["method"]: r for r in scenario_rows(grid, grid.scenarios[1], records)
            }["fedavg"]["ari"] == "-"

    # Resume: every cell cached, nothing runs; the report is the same.
    calls = []
    real = compare.run_cell
    monkeypatch.setattr(compare, "run_cell", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    before = grid.results.read_text()
    run_grid(parse_grid(_raw(tmp_path), tmp_path), log=None)
    assert calls == [] and grid.results.read_text() == before
    # A lost cell is the only one re-run; a changed config makes cells stale.
    (cells[1].path(grid.cache_dir)).unlink()
    run_grid(parse_grid(_raw(tmp_path), tmp_path), log=None)
    assert [(c.scenario.name, c.method.label, c.seed) for c in calls] == [
        (cells[1].scenario.name, cells[1].method.label, cells[1].seed)]
    changed = parse_grid(_raw(tmp_path), tmp_path, overrides=["rounds=3"])
    assert load_cell(changed.cells()[0], grid.cache_dir) is None
    assert load_cell(parse_grid(_raw(tmp_path), tmp_path).cells()[0], grid.cache_dir) is not None


def _fake_record(acc, ari=None):
    final = {"test_acc/mean": acc, "test_acc_ft/mean": acc + 0.1, "bytes_per_client": 2e6,
             "cluster_time": 0.5}
    if ari is not None:
        final.update(ari=ari, nmi=ari, clusters=1.0)
    return {"final": final, "wall_time": 3.0, "history": [{"round": 1, "test_acc": acc}]}


def test_negative_control_marks_input_only_methods(tmp_path):
    raw = _raw(tmp_path, seeds=[0], scenarios=[
        {"name": "perm", "partition": "label_permutation", "partition_options": {"num_groups": 2}},
        {"name": "rot", "partition": "rotation", "partition_options": {"num_groups": 2}}],
        methods=[{"name": "fedavg"}, {"name": "rnd", "options": {"predictor_epochs": 1}},
                 {"name": "local", "input_only": True, "ft_row": False}])
    grid = parse_grid(raw, tmp_path)
    assert [s.negative_control for s in grid.scenarios] == [True, False]
    recs = {(s, m, 0): _fake_record(0.5, ari=0.0 if m == "rnd" else None)
            for s in ("perm", "rot") for m in ("fedavg", "rnd", "local")}
    perm = [r["method"] for r in scenario_rows(grid, grid.scenarios[0], recs)]
    rot = [r["method"] for r in scenario_rows(grid, grid.scenarios[1], recs)]
    assert perm == ["fedavg", "fedavg+ft", "rnd †", "local †"]
    assert rot == ["fedavg", "fedavg+ft", "rnd", "local"]
    rnd_row = scenario_rows(grid, grid.scenarios[0], recs)[2]
    assert rnd_row["ari"] == "0.00 ± 0.00" and rnd_row["cluster_time"] == "0.50 ± 0.00"
    assert rnd_row["seeds"] == "1/1"
    compare.write_report(grid, recs)
    assert "† Negative control" in grid.results.read_text().split("## rot")[0]
    # Clustering done inside the rounds is flagged next to the host-side time.
    raw["methods"][1]["in_round"] = True
    flagged = scenario_rows(parse_grid(raw, tmp_path), grid.scenarios[1], recs)[2]
    assert flagged["cluster_time"] == "0.50 ± 0.00 + in rounds"


@pytest.mark.parametrize("change, match", [
    ({"bogus": 1}, r"unknown field\(s\) \['bogus'\]"),
    ({"scenarios": []}, "at least one \\[\\[scenarios\\]\\]"),
    ({"methods": []}, "at least one \\[\\[methods\\]\\]"),
    ({"seeds": [0, 0]}, "seeds must be distinct"),
    ({"seeds": "0"}, "seeds must be a non-empty list"),
    ({"finetune_epochs": 0}, "finetune_epochs must be an integer >= 1"),
    ({"scenarios": [{"name": "a", "partition": "nope"}]}, "partition 'nope' is unknown"),
    ({"scenarios": [{"name": "a b", "partition": "iid"}]}, "name must be"),
    ({"scenarios": [{"name": "a", "partition": "iid", "alpha": 1}]}, "unknown field"),
    ({"scenarios": [{"name": "a", "partition": "iid"}, {"name": "a", "partition": "iid"}]},
     "scenario names must be distinct"),
    ({"methods": [{"name": "nope"}]}, "algorithm 'nope' is not registered"),
    ({"methods": ["fedavg", "fedavg"]}, "method labels must be distinct"),
    ({"methods": [{"name": "fedavg", "options": {"prox": "K*2"}}]}, "K expression"),
    ({"methods": [{"name": "fedavg", "options": {"nope": 1}}]}, "has no option"),
    ({"methods": ["fedavg", {"name": "local", "label": "fedavg+ft"}]}, "clash"),
    ({"config": {"rounds": 0}}, "base config: config: rounds must be >= 1"),
    ({"config": {"algorithms": ["fedavg"]}}, "must not set algorithms"),
    ({"margins": {"baseline": "nope"}}, "margins.baseline must be one of the method labels"),
    ({"margins": {"baseline": "fedavg", "reference": 0}}, "margins.reference must be"),
    ({"margins": {"baseline": "fedavg", "gap": 7}}, r"unknown field\(s\) \['gap'\] in \[margins\]"),
])
def test_bad_grid_errors_name_the_problem(tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        parse_grid(_raw(tmp_path, methods=["fedavg"]) | change, tmp_path)


def test_cli_compare_runs_and_reports(tmp_path, capsys):
    grid = tmp_path / "g.toml"
    grid.write_text(f'''
name = "cli"
seeds = [0]
cache_dir = "{tmp_path / 'cache'}"
[config]
rounds = 1
data = {{ source = "digits", num_clients = 4 }}
model = {{ name = "logreg", options = {{}} }}
[[scenarios]]
name = "iid"
partition = "iid"
[[methods]]
name = "fedavg"
''')
    assert main(["compare", str(grid)]) == 0
    out = (tmp_path / "RESULTS.md").read_text()
    assert "| fedavg+ft |" in out
    rec = json.loads(next((tmp_path / "cache").rglob("seed0.json")).read_text())
    assert rec["scenario"] == "iid" and "test_acc_ft/mean" in rec["final"]
    (tmp_path / "RESULTS.md").unlink()
    assert main(["compare", str(grid), "--report-only"]) == 0
    assert "| fedavg |" in (tmp_path / "RESULTS.md").read_text()
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    grid.write_text("seeds = [\n")
    assert main(["compare", str(grid)]) == 2
    assert "not valid TOML" in capsys.readouterr().err


def test_pool_padding_changes_shapes_not_results(tmp_path):
    from fedrnd.driver import load_config, simulate
    from fedrnd.driver.compare import pad_pool
    from fedrnd.driver.setup import build_data

    cfg = load_config(None, ["rounds=2", "eval_every=2", "checkpoint_every=0", "progress=false",
                             "data.num_clients=6", 'model.name="logreg"', "model.options={}",
                             'algorithms=["fedavg"]', "finetune=true"])
    data, _ = build_data(cfg)
    padded = pad_pool(data, 256)
    assert padded.x.shape[0] % 256 == 0 and padded.x.shape[0] > data.x.shape[0]
    np.testing.assert_array_equal(np.asarray(padded.x[: data.x.shape[0]]), np.asarray(data.x))
    a = simulate(cfg, data=data, run_dir=tmp_path / "a", verbose=False).methods["fedavg"]
    b = simulate(cfg, data=padded, run_dir=tmp_path / "b", verbose=False).methods["fedavg"]
    for k in ("test_acc/mean", "test_acc_ft/mean", "train_loss/mean"):
        assert a.final[k] == b.final[k], k
    assert pad_pool(padded, 256) is padded


def test_shipped_grid_is_valid():
    from fedrnd.driver.compare import load_grid

    grid = load_grid("experiments/compare.toml")
    assert [s.name for s in grid.scenarios] == [
        "feature_pattern", "rotation", "label_permutation", "dirichlet-0.1", "dirichlet-0.5",
        "shards-2"]
    assert [s.groups for s in grid.scenarios] == [4, 4, 4, 1, 1, 1]
    assert grid.scenarios[2].negative_control and grid.seeds == [0, 1, 2]
    cells = grid.cells()
    ks = {(c.scenario.name, c.method.label): c.resolved.get("num_clusters") for c in cells}
    assert ks[("rotation", "ifca K-1")] == 3 and ks[("rotation", "fesem K+2")] == 6
    assert ks[("shards-2", "ifca K+2")] == 3
    assert sum(c.config is not None for c in cells) == 198
    assert {m.label for m in grid.methods if m.input_only} == {"rnd", "pacfl unsupervised"}


def _record(acc: float, acc_ft: float) -> dict:
    return {"final": {"test_acc/mean": acc, "test_acc_ft/mean": acc_ft}, "wall_time": 1.0,
            "history": [{"round": 1, "test_acc": acc}]}


def test_margins_are_paired_by_seed_against_the_baseline(tmp_path):
    from fedrnd.driver.compare import margin_rows, margin_table, write_report

    raw = _raw(tmp_path, seeds=[0, 1, 2], scenarios=[{"name": "iid", "partition": "iid"}],
               methods=["fedavg", "local", {"name": "fedavg", "label": "other"}],
               margins={"baseline": "fedavg", "reference": 7.0, "reference_note": "paper"})
    grid = parse_grid(raw, tmp_path)
    acc = {"fedavg": [0.80, 0.70, 0.75], "local": [0.90, 0.72, 0.70], "other": [0.85, 0.0, 0.0]}
    ft = {"fedavg": [0.81, 0.71, 0.76], "local": [0.91, 0.74, 0.77], "other": [0.85, 0.0, 0.0]}
    records = {("iid", m, s): _record(acc[m][s], ft[m][s]) for m in acc for s in range(3)}
    del records[("iid", "other", 1)], records[("iid", "other", 2)]  # one seed finished
    rows = {r["method"]: r for r in margin_rows(grid, grid.scenarios[0], records)}
    assert set(rows) == {"local", "other"}  # the baseline has no row
    want = 100 * (np.array(acc["local"]) - np.array(acc["fedavg"]))
    np.testing.assert_allclose(rows["local"]["gain"], want)
    assert rows["local"]["gain_mean"] == pytest.approx(want.mean())
    assert rows["local"]["gain_std"] == pytest.approx(want.std(ddof=1))
    assert rows["local"]["gain_min"] == pytest.approx(-5.0)
    assert rows["local"]["gain_max"] == pytest.approx(10.0)
    assert rows["local"]["gain_wins"] == 2
    assert rows["local"]["ratio"] == pytest.approx(want.mean() / 7.0)
    np.testing.assert_allclose(rows["local"]["gain_ft"],
                               100 * (np.array(ft["local"]) - np.array(ft["fedavg"])))
    np.testing.assert_allclose(rows["other"]["gain"], [5.0])  # only the seed both finished
    lines = margin_table(grid, list(rows.values()))
    assert "| local | +2.3 ± 7.5 | -5.0 | +10.0 | 2/3 | 0.33 | +4.7 ± 4.7 | +1.0 |" in lines
    write_report(grid, records)
    assert "Gain over `fedavg`" in grid.results.read_text()
    # Without [margins] nothing is added.
    plain = parse_grid({k: v for k, v in raw.items() if k != "margins"}, tmp_path)
    assert margin_rows(plain, plain.scenarios[0], records) == []


def test_shipped_ifca_rotation_grid_is_valid():
    from fedrnd.driver.compare import load_grid

    grid = load_grid("experiments/ifca_rotation.toml")
    assert len(grid.seeds) >= 5 and grid.margins.baseline == "fedavg"
    assert grid.margins.reference == 7.0
    (scen,) = grid.scenarios
    assert scen.groups == 4 and grid.base.data.source == "fashion_mnist"
    cells = {c.method.label: c for c in grid.cells() if c.seed == grid.seeds[0]}
    assert cells["ifca K"].resolved == {"num_clusters": 4}
    # RND: the library defaults under the rule and pair its stored results were produced with.
    assert cells["rnd"].config.algorithms[0].options == {"criterion": "eps", "network": "conv"}
