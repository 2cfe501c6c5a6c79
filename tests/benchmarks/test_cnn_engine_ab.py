"""benchmarks/cnn_engine_ab.py in its own process: all three variants train the same CNN (full
bands, blocked, blocked over two host devices) and an existing result file is never replaced."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cnn_engine_ab.py"


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, timeout=600)


def test_variants_agree_and_results_are_kept(tmp_path):
    out = tmp_path / "ab.json"
    proc = _run("--clients", "4", "--repeats", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = json.loads(out.read_text())
    assert [r["variant"] for r in rec["rows"]] == ["full", "blocked", "blocked_mesh"]
    assert rec["devices"] == 2
    assert all(r["max_rel_diff"] < 1e-5 and r["cpu_s"] > 0 for r in rec["rows"])
    before = out.read_text()
    again = _run("--clients", "4", "--repeats", "1", "--json", str(out))
    assert again.returncode == 2 and "the file exists" in again.stderr
    assert out.read_text() == before
    assert _run("--clients", "5").returncode == 2  # 2 devices do not divide 5 clients
