"""The command line: list, run with overrides, resume, and error reporting."""

from __future__ import annotations

import json
import subprocess
import sys

from fedrnd.cli.main import main


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
