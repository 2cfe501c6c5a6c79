"""The device suite's runner (benchmarks/device_suite.py): every step recorded, none fatal."""

from __future__ import annotations

import json
import sys

import pytest

from benchmarks import device_suite


def _fake_steps(quick):
    py = [sys.executable, "-c"]
    return [
        dict(name="env", argv=py + ["import json; print(json.dumps({'device_kind': 'fake'}))"],
             limit=60),
        dict(name="fails", argv=py + ["import sys; print('boom'); sys.exit(3)"], limit=60),
        dict(name="hangs", argv=py + ["import time; time.sleep(30)"], limit=1),
        dict(name="writes", argv=py + ["import json, sys; json.dump({'x': 1}, "
                                       "open(sys.argv[1], 'w'))", "{json}"], limit=60),
    ]


def test_steps_fail_or_time_out_without_stopping_the_suite(tmp_path, monkeypatch):
    monkeypatch.setattr(device_suite, "steps", _fake_steps)
    out = tmp_path / "suite"
    rec = device_suite.main(["--out", str(out)])
    by = {s["name"]: s for s in rec["steps"]}
    assert rec["device"] == "fake"
    assert by["env"]["rc"] == 0 and by["env"]["figures"] == {"device_kind": "fake"}
    assert by["fails"]["rc"] == 3 and "boom" in by["fails"]["tail"]
    assert by["hangs"]["rc"] == "timeout" and by["hangs"]["wall_s"] < 20
    assert by["writes"]["rc"] == 0 and by["writes"]["figures"] == {"x": 1}
    saved = json.loads((out / "suite.json").read_text())
    assert [s["name"] for s in saved["steps"]] == ["env", "fails", "hangs", "writes"]
    # --only and --budget: a step with no time left is recorded as skipped, not run.
    rec = device_suite.main(["--out", str(tmp_path / "b"), "--only", "env,writes",
                             "--budget", "10"])
    assert [s["name"] for s in rec["steps"]] == ["env", "writes"]
    assert all(s["rc"] in (0, "skipped (budget)") for s in rec["steps"])


def test_bad_arguments_exit_2_and_touch_nothing(tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("a user's file")
    with pytest.raises(SystemExit) as e:
        device_suite.main(["--out", str(full)])
    assert e.value.code == 2 and "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in full.iterdir()) == ["mine.txt"]
    with pytest.raises(SystemExit) as e:
        device_suite.main(["--out", str(tmp_path / "new"), "--only", "nope"])
    assert e.value.code == 2 and "allowed" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_every_benchmark_step_names_a_script_that_exists():
    for quick in (False, True):
        for step in device_suite.steps(quick):
            scripts = [a for a in step["argv"] if a.endswith(".py")]
            assert all((device_suite.ROOT / s).exists() for s in scripts), step["name"]
