"""Runs never lose a user's data: refused reuse, --overwrite moves aside, honest resume,
status.json, divergence, Ctrl-C / SIGTERM with a checkpoint, atomic writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from fedrnd.cli.main import main
from fedrnd.driver import (
    AlgorithmConfig,
    Config,
    DataConfig,
    ModelConfig,
    outputs,
    rundir,
    simulate,
)
from fedrnd.driver.config import DivergenceConfig, LocalConfig

SMALL = ["--set", "rounds=4", "--set", "eval_every=2", "--set", "checkpoint_every=2",
         "--set", "data.num_clients=8", "--set", "algorithms=['fedavg']",
         "--set", "model.options.hidden=[16]", "--no-progress"]


def _cfg(**kw) -> Config:
    base = dict(rounds=6, eval_every=2, checkpoint_every=2, progress=False,
                data=DataConfig(source="digits", partition="rotation",
                                partition_options={"num_groups": 2}, num_clients=8),
                model=ModelConfig("mlp", {"hidden": [16]}),
                algorithms=[AlgorithmConfig("fedavg")])
    base.update(kw)
    return Config(**base)


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def _leaves(res, tag="fedavg"):
    return [np.asarray(x) for x in jax.tree.leaves(res.methods[tag].state)]


@pytest.fixture(scope="module")
def earlier(tmp_path_factory):
    """A finished CLI run in <root>/runs/default and a snapshot of its bytes."""
    root = tmp_path_factory.mktemp("earlier")
    assert main(["run", "--out", str(root / "runs"), *SMALL]) == 0
    return root, _snapshot(root / "runs" / "default")


def _error_paragraph(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedrnd: error:"), err
    assert "Traceback" not in err and "\n\n" not in err
    return err


@pytest.mark.parametrize("extra, needle", [
    ([], "--resume"),                                         # same name twice
    (["--set", "local.lr=0.3"], "--overwrite"),               # changed config, no --resume
    (["--resume", "--set", "seed=3"], "seed: 0 -> 3"),
    (["--resume", "--set", "local.lr=0.3"], "local.lr: 0.1 -> 0.3"),
    (["--resume", "--set", "data.num_clients=12"], "data.num_clients: 8 -> 12"),
    (["--resume", "--set", "model.options.hidden=[32]"], "model.options.hidden"),
    (["--resume", "--set", "rounds=6"], "rounds: 4 -> 6"),    # extending needs --allow-change
    (["--resume", "--allow-change", "seed", "--set", "seed=3"], "--allow-change seed"),
    (["--resume", "--overwrite"], "exclude each other"),
    (["--allow-change", "rounds"], "only applies with --resume"),
])
def test_refused_runs_leave_the_earlier_run_byte_for_byte(earlier, capsys, extra, needle):
    root, before = earlier
    rc = main(["run", "--out", str(root / "runs"), *SMALL, *extra])
    assert rc == 2
    assert needle in _error_paragraph(capsys)
    assert _snapshot(root / "runs" / "default") == before
    assert sorted(p.name for p in (root / "runs").iterdir()) == ["default"]


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "/abs", "a\\b"])
def test_run_names_are_one_path_component(tmp_path, capsys, name):
    (tmp_path / "runs").mkdir()
    (tmp_path / "keep").write_text("mine")
    rc = main(["run", "--out", str(tmp_path / "runs"), *SMALL, "--set", f"name='{name}'"])
    assert rc == 2
    assert "config: name" in _error_paragraph(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep", "runs"]
    assert not any((tmp_path / "runs").iterdir())


def test_a_directory_with_other_content_is_never_used(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("notes.txt").write_text("my notes")
    for flags in ([], ["--overwrite"], ["--resume"]):
        assert main(["run", "--run-dir", ".", *SMALL, *flags]) == 2
        assert "holds no fedrnd run" in _error_paragraph(capsys)
    assert sorted(os.listdir(".")) == ["notes.txt"]


def test_out_pointing_at_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["run", "--out", str(tmp_path / "f"), *SMALL]) == 2
    assert "file, not a directory" in _error_paragraph(capsys)
    assert (tmp_path / "f").read_text() == "x"


def test_overwrite_moves_the_earlier_run_aside(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["run", "--out", str(out), *SMALL]) == 0
    before = _snapshot(out / "default")
    assert main(["run", "--out", str(out), *SMALL, "--overwrite", "--set", "seed=1"]) == 0
    assert main(["run", "--out", str(out), *SMALL, "--overwrite", "--set", "seed=2"]) == 0
    assert _snapshot(out / "default.old-1") == before
    assert sorted(p.name for p in out.iterdir()) == ["default", "default.old-1", "default.old-2"]
    status = rundir.read_status(out / "default")
    assert status["state"] == "finished"
    assert status["replaced_run_moved_to"].endswith("default.old-2")
    assert json.loads((out / "default" / "config.json").read_text())["seed"] == 2


def test_bad_input_after_the_config_leaves_the_run_intact(tmp_path, capsys):
    # Errors found while building data or methods (not by the config check) come before any
    # write: a prebuilt bad federation through the Python API, here an RND option.
    out = tmp_path / "runs"
    assert main(["run", "--out", str(out), *SMALL]) == 0
    before = _snapshot(out / "default")
    rc = main(["run", "--out", str(out), *SMALL, "--overwrite", "--set",
               "data.partition_options.num_groups=50"])
    assert rc == 2
    _error_paragraph(capsys)
    assert _snapshot(out / "default") == before
    assert not (out / "default.old-1").exists()


def test_status_file_follows_a_finished_run(earlier):
    root, _ = earlier
    s = rundir.read_status(root / "runs" / "default")
    assert s["state"] == "finished" and s["round"] == 4 and s["reason"] is None
    assert s["config_hash"] == rundir.config_hash(
        json.loads((root / "runs" / "default" / "config.json").read_text()))
    assert (root / "runs" / "default" / "fedavg" / "final.json").is_file()


def test_extending_rounds_with_allow_change_equals_the_longer_run(tmp_path):
    full = simulate(_cfg(), run_dir=tmp_path / "full", verbose=False)
    simulate(_cfg(rounds=4), run_dir=tmp_path / "cut", verbose=False)
    with pytest.raises(rundir.RunDirError, match="rounds: 4 -> 6"):
        simulate(_cfg(), run_dir=tmp_path / "cut", resume=True, verbose=False)
    ext = simulate(_cfg(), run_dir=tmp_path / "cut", resume=True, verbose=False,
                   allow_change=["rounds"])
    for a, b in zip(_leaves(full), _leaves(ext), strict=True):
        np.testing.assert_array_equal(a, b)
    s = rundir.read_status(tmp_path / "cut")
    assert s["state"] == "finished" and s["attempts"][-1]["changed"] == {"rounds": [4, 6]}


def test_extending_a_cosine_schedule_is_refused(tmp_path):
    cos = LocalConfig(schedule="cosine")
    simulate(_cfg(rounds=4, local=cos), run_dir=tmp_path / "r", verbose=False)
    with pytest.raises(rundir.RunDirError, match="cosine"):
        simulate(_cfg(local=cos), run_dir=tmp_path / "r", resume=True, verbose=False,
                 allow_change=["rounds"])


def _interrupt_at(monkeypatch, round_: int, sig=signal.SIGINT):
    """Send ``sig`` to this process when the driver logs ``round_`` (inside a block)."""
    log = outputs.MetricLogger.log

    def log_and_signal(self, row):
        log(self, row)
        if row["round"] == round_:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(outputs.MetricLogger, "log", log_and_signal)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_checkpoints_and_resume_equals_uninterrupted(tmp_path, monkeypatch, sig):
    # Evaluations every 2 rounds, checkpoints every 6: the signal during the first block
    # stops the run at round 2 with a checkpoint the schedule would not have written.
    cfg = _cfg(checkpoint_every=6)
    full = simulate(cfg, run_dir=tmp_path / "full", verbose=False)
    _interrupt_at(monkeypatch, 1, sig)
    with pytest.raises(rundir.RunInterrupted) as e:
        simulate(cfg, run_dir=tmp_path / "cut", verbose=False)
    monkeypatch.undo()
    assert e.value.round == 2 and e.value.checkpointed and e.value.method == "fedavg"
    s = rundir.read_status(tmp_path / "cut")
    assert s["state"] == "interrupted" and s["round"] == 2 and "--resume" in s["reason"]
    assert not (tmp_path / "cut" / "fedavg" / "final.json").exists()
    resumed = simulate(cfg, run_dir=tmp_path / "cut", resume=True, verbose=False)
    for a, b in zip(_leaves(full), _leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    assert resumed.methods["fedavg"].final["test_acc/mean"] == \
        full.methods["fedavg"].final["test_acc/mean"]
    assert rundir.read_status(tmp_path / "cut")["state"] == "finished"
    rows = [json.loads(x)["round"] for x in
            (tmp_path / "cut" / "fedavg" / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, 7))


def test_interrupt_prints_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    _interrupt_at(monkeypatch, 1)
    rc = main(["run", "--out", str(tmp_path), *SMALL])
    assert rc == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"fedrnd: interrupted at round 2 of fedavg ({tmp_path / 'default'}); "
                       "continue with --resume")
    assert not any("Traceback" in line for line in err)


def test_diverging_run_fails_with_status_and_message(tmp_path, capsys):
    rc = main(["run", "--out", str(tmp_path), *SMALL, "--set", "local.lr=100.0"])
    assert rc == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedrnd: run failed: [fedavg] training diverged by round")
    assert "local.lr" in err and "Traceback" not in err
    s = rundir.read_status(tmp_path / "default")
    assert s["state"] == "failed" and "diverged" in s["reason"]
    assert not (tmp_path / "default" / "fedavg" / "final.json").exists()


def test_divergence_warn_goes_on_and_records_the_warning(tmp_path):
    cfg = _cfg(rounds=4, local=LocalConfig(lr=100.0),
               divergence=DivergenceConfig(action="warn"))
    res = simulate(cfg, run_dir=tmp_path / "w", verbose=False)
    s = rundir.read_status(tmp_path / "w")
    assert s["state"] == "finished" and len(res.methods["fedavg"].history) == 4
    assert any("diverged" in w for w in s["warnings"])
    assert any("never rose above chance" in w for w in s["warnings"])


def test_accuracy_collapse_stops_the_run(tmp_path, monkeypatch):
    # A method whose accuracy falls back to chance after learning (evaluations faked).
    import importlib

    sim = importlib.import_module("fedrnd.driver.simulate")

    real = sim.summarize
    calls = []

    def fake(*a, **k):
        out = real(*a, **k)
        calls.append(1)
        out["test_acc/mean"] = 0.9 if len(calls) == 1 else 0.1
        return out

    monkeypatch.setattr(sim, "summarize", fake)
    with pytest.raises(rundir.Diverged, match="collapsed to 0.100"):
        simulate(_cfg(), run_dir=tmp_path / "c", verbose=False)
    assert rundir.read_status(tmp_path / "c")["state"] == "failed"


def test_a_healthy_run_is_not_flagged(tmp_path):
    simulate(_cfg(), run_dir=tmp_path / "ok", verbose=False)
    assert rundir.read_status(tmp_path / "ok")["warnings"] == []


def test_sigterm_from_outside_stops_a_cli_run(tmp_path):
    # A real signal to a real process: exit 130, one line, status interrupted, checkpoint kept.
    cmd = [sys.executable, "-m", "fedrnd", "run", "--out", str(tmp_path), *SMALL,
           "--set", "rounds=100000", "--set", "eval_every=1", "--set", "checkpoint_every=50"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    status = tmp_path / "default" / "status.json"
    deadline = time.time() + 240
    while time.time() < deadline:
        s = rundir.read_status(tmp_path / "default") if status.exists() else None
        if s and s.get("round", 0) >= 2:
            break
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("fedrnd: interrupted at round ")
    s = rundir.read_status(tmp_path / "default")
    assert s["state"] == "interrupted"
    assert (tmp_path / "default" / "fedavg" / "checkpoints" / str(s["round"])).is_dir()


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    p = tmp_path / "final.json"
    p.write_text("old")
    with pytest.raises(RuntimeError), rundir.atomic_write(p) as f:
        f.write("half")
        raise RuntimeError("crash")
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["final.json"]


def test_history_reader_skips_a_line_cut_by_a_crash(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"round": 1}\n{"round": 2}\n{"rou')
    assert outputs.read_history(p, upto=5) == [{"round": 1}, {"round": 2}]


def test_config_diff_lists_computation_fields_only():
    a = _cfg().to_dict()
    b = _cfg(progress=True, name="other", out_dir="x", seed=5).to_dict()
    assert rundir.config_diff(a, b) == [("seed", 0, 5)]
    # A stored config from before a field existed counts as having its default.
    old = dict(a)
    del old["divergence"]
    assert rundir.config_diff(old, a, defaults=Config().to_dict()) == []
