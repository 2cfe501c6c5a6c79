"""The command line: list, run with overrides, resume, and error reporting."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedrnd.cli.main import main, run_report


def test_list_names_every_registry(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("digits", "fashion_mnist", "tfds:<name>", "dirichlet", "rotation", "mlp",
                 "cnn", "fedavg", "fedprox", "local", "adam"):
        assert name in out, name


def test_run_with_overrides_writes_run_dir(tmp_path, capsys):
    rc = main(["run", "experiments/default.toml", "--no-progress", "--out", str(tmp_path),
               "--set", "rounds=2", "--set", "eval_every=1", "--set", "data.num_clients=8",
               "--set", 'algorithms=["fedavg"]'])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| fedavg |" in out
    cfg = json.loads((tmp_path / "default" / "config.json").read_text())
    assert cfg["rounds"] == 2 and cfg["data"]["num_clients"] == 8
    rows = (tmp_path / "default" / "fedavg" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["round"] for r in rows] == [1, 2]


def test_errors_exit_2_with_message(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path), "--set", 'data.partition="nope"']) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = [\n")
    assert main(["run", str(bad)]) == 2
    assert "not valid TOML" in capsys.readouterr().err


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "fedrnd", "list"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "algorithms" in out.stdout


def _fake_result(tmp_path, assign, group, final):
    """A finished run with one clustering method and one baseline, as simulate returns it."""
    from types import SimpleNamespace

    from fedrnd.driver.simulate import MethodResult, SimulationResult

    (tmp_path / "rnd").mkdir()
    (tmp_path / "rnd" / "novelty.png").write_bytes(b"")
    c = len(group)
    rnd = MethodResult("rnd", [], final, {}, np.zeros(c), np.zeros(c),
                       state={"clients": {"cluster_id": np.asarray(assign)}})
    fedavg = MethodResult("fedavg", [], {"test_acc/mean": 0.5}, {}, np.zeros(c), np.zeros(c))
    data = SimpleNamespace(group=np.asarray(group))
    return SimulationResult(None, tmp_path, {"rnd": rnd, "fedavg": fedavg}, data)


def test_run_report_lists_federations_against_true_groups(tmp_path):
    group = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2])
    assign = np.array([1, 1, 0, 0, 0, 0, 2, 2, 2])
    final = {"test_acc/mean": 0.75, "clusters": 3.0, "federations": 3.0, "eps": 0.5,
             "ari": 0.6, "nmi": 0.7, "cluster_time": 1.25}
    text = run_report(_fake_result(tmp_path, assign, group, final))
    lines = text.splitlines()
    assert lines[0] == "rnd: 3 federations found (eps = 0.5; 1.2 s, compilation included), sizes 4 2 3"
    # Make-up of each federation, checked against a plain count.
    for f in range(3):
        mix = ", ".join(f"group {g} x{int(np.sum((assign == f) & (group == g)))}"
                        for g in np.unique(group[assign == f]))
        assert f"  federation {f}: {int(np.sum(assign == f))} clients ({mix})" in lines
    assert "  against the 3 true groups: ARI 0.600, NMI 0.700" in lines
    assert "mean client test accuracy: rnd 0.750, fedavg 0.500" in lines
    assert f"rnd heat maps: {tmp_path / 'rnd' / 'novelty.png'}" in lines
    assert f"accuracy vs round: {tmp_path / 'accuracy.png'}" in lines


def test_run_report_caps_long_cluster_lists(tmp_path):
    group = np.arange(12) % 2
    assign = np.arange(12)  # every client alone: 12 clusters
    final = {"test_acc/mean": 0.5, "clusters": 12.0, "ari": 0.0, "nmi": 0.5}
    lines = run_report(_fake_result(tmp_path, assign, group, final)).splitlines()
    assert lines[0] == "rnd: 12 clusters found, sizes " + " ".join(["1"] * 12)
    assert sum(line.startswith("  cluster ") for line in lines) == 8
    assert "  ... and 4 more" in lines


@pytest.mark.slow
def test_default_run_prints_federations_and_heat_maps(tmp_path, capsys):
    rc = main(["run", "experiments/default.toml", "--no-progress", "--out", str(tmp_path),
               "--set", "rounds=1", "--set", "data.num_clients=8", "--set", "checkpoint_every=0",
               "--set", 'algorithms=[{name = "rnd", options = {predictor_steps = 100, '
               'predictor_batch = 32}}, "fedavg"]'])
    assert rc == 0
    out = capsys.readouterr().out
    head = re.search(r"^rnd: (\d+) federations found .*, sizes ([\d ]+)$", out, re.M)
    assert head, out
    sizes = [int(s) for s in head.group(2).split()]
    assert len(sizes) == int(head.group(1)) and sum(sizes) == 8
    assert re.search(r"against the 2 true groups: ARI [0-9.-]+, NMI [0-9.-]+", out)
    assert re.search(r"mean client test accuracy: rnd [0-9.]+, fedavg [0-9.]+", out)
    maps = re.search(r"^rnd heat maps: (.+)$", out, re.M).group(1).split(", ")
    assert {Path(p).name for p in maps} >= {"novelty.png", "novelty_normalised.png"}
    assert all(Path(p).is_file() for p in maps)


def test_builtin_default_config_is_the_experiments_default():
    from fedrnd.configs import default_config_path
    from fedrnd.driver import load_config

    shipped = default_config_path()
    assert shipped.read_bytes() == (Path(__file__).parents[2] / "experiments" /
                                    "default.toml").read_bytes(), \
        "fedrnd/configs/default.toml must be a copy of experiments/default.toml"
    cfg = load_config(shipped)
    assert [a.name for a in cfg.algorithms] == ["rnd", "fedavg", "local"]


def test_run_without_config_uses_builtin_default(tmp_path, capsys):
    rc = main(["run", "--no-progress", "--out", str(tmp_path), "--set", "rounds=1",
               "--set", "data.num_clients=6", "--set", "checkpoint_every=0",
               "--set", 'algorithms=["local"]'])
    assert rc == 0
    cfg = json.loads((tmp_path / "default" / "config.json").read_text())
    assert cfg["data"]["partition_options"] == {"num_groups": 2}
