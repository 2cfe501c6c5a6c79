"""benchmarks/dfl_round.py runs end to end at a tiny size and reports figures that agree with
the workload: model size, ledger bytes per node and per link, links of a d-regular graph."""

from __future__ import annotations

import json
import math

from benchmarks.dfl_round import main


def test_dfl_round_benchmark_runs_at_tiny_size(tmp_path):
    out = tmp_path / "r.json"
    r = main(["--nodes", "12", "--degree", "3", "--samples", "4", "--steps", "2", "--batch",
              "4", "--hidden", "8", "--repeats", "1", "--data", "synthetic", "--json", str(out)])
    assert json.loads(out.read_text())["nodes"] == 12
    model_bytes = 4 * (784 * 8 + 8 + 8 * 10 + 10)
    assert r["model_bytes"] == model_bytes
    assert r["links"] == 12 * 3 / 2
    assert r["bytes_per_link"] == 2 * model_bytes
    assert r["bytes_per_node"] == 2 * 3 * model_bytes  # 3 neighbours, one model each way
    for k in ("first_round_s", "round_s", "train_only_s", "gossip_only_s", "peak_rss_mib"):
        assert r[k] > 0 and math.isfinite(r[k])
    assert math.isfinite(r["consensus_distance"]) and r["consensus_distance"] >= 0
