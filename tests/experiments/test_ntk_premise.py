"""experiments/ntk/premise.py at smoke size: every planned cell is run, kept and reported, the
summary's numbers are those of the cells, and a second call reuses the cells."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.experiments._script import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "ntk" / "premise.py"


@pytest.fixture(scope="module")
def mod():
    return load_script(SCRIPT, "ntk_premise")


def test_summaries_by_hand(mod):
    hist = [{"round": r + 1, "acc": a} for r, a in enumerate([0.5, 0.7, 0.6, 0.8, 0.75])]
    assert mod.first_round(hist, 0.7) == 2 and mod.first_round(hist, 0.9) is None
    assert mod.max_drop(hist) == pytest.approx(0.1)
    assert mod.max_drop(hist[:2]) == 0.0
    assert mod.reach([3, 5, None], 3) == "4.0 (3-5), 2/3"
    assert mod.reach([None, None], 2) == "0/2"
    assert mod.spread([1.0, 3.0], "{:.1f}") == "2.0 ± 1.4"
    assert mod.spread([-1.0, -3.0], "{:+.1f}") == "-2.0 ± 1.4"


def test_tiny_run_writes_cells_report_and_figures(mod, tmp_path):
    assert mod.main(["--tiny", "--out", str(tmp_path), "--quiet"]) == 0
    size = mod.SIZES["tiny"]
    cells = sorted((tmp_path / "premise_cells").glob("*/*.json"))
    labels = {(exp, lb) for exp, lb, _, _ in mod.plan(size)}
    assert len(cells) == len(labels) * len(size["seeds"])
    text = (tmp_path / "PREMISE.md").read_text()
    assert "python experiments/ntk/premise.py --tiny" in text
    summ = json.loads((tmp_path / "premise_cells" / "summary.json").read_text())
    for exp, lb in labels:
        s = summ[f"{exp}/{lb}"]
        for seed, best in zip(s["seeds"], s["best_acc"], strict=True):
            rec = json.loads((tmp_path / "premise_cells" / exp / f"{lb}_s{seed}.json")
                             .read_text())
            assert len(rec["history"]) == size[exp]["rounds"]
            assert best == max(e["acc"] for e in rec["history"])
    # The ramp's first stage has beta = 0, so no neighbour soft labels are sent yet.
    nb = summ["premise/a0.1_mu0.9_ramp-nb"]["bytes_per_round"]
    off = summ["premise/a0.1_mu0_off"]["bytes_per_round"]
    assert nb == off
    # The sketched projection spends less than the unprojected rounds.
    assert summ["frontier/k16_sketch"]["bytes_per_round"] < off / 10
    assert "### Paired by seed against NTK-DFL (mu 0, regulariser off), alpha 0.1" in text
    for row in ("| 0 | off |", "| 0.9 | ramp-nb |", "| k16_sketch |", "| full |"):
        assert row in text, row
    for png in ("premise_acc_vs_round.png", "premise_local_acc_vs_round.png",
                "premise_acc_vs_bytes.png"):
        assert (tmp_path / "figures" / png).read_bytes()[:4] == b"\x89PNG"
    # A second call runs nothing: the cells are reused and the report is the same table.
    mtimes = [c.stat().st_mtime_ns for c in cells]
    assert mod.main(["--tiny", "--out", str(tmp_path), "--quiet"]) == 0
    assert [c.stat().st_mtime_ns for c in cells] == mtimes
