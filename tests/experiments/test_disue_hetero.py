"""experiments/disue/hetero.py (DisUE with two architectures, issue 19): the table pairs every
row with FedAvg on the smallest architecture seed by seed, and the one command runs the cells
and writes the report and its raw cells at a tiny size."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.experiments._script import load_script

ROOT = Path(__file__).resolve().parents[2] / "experiments" / "disue"


@pytest.fixture(scope="module")
def hetero():
    return load_script(ROOT / "hetero.py", "disue_hetero")


def _rows(alpha, seed, uni, fed64, fam0, fam1, ens):
    base = {"alpha": alpha, "seed": seed}
    return [{**base, "method": "disue hetero", "universal_acc": uni, "family0_acc": fam0,
             "family1_acc": fam1, "ensemble_acc": ens},
            {**base, "method": "fedavg mlp64", "universal_acc": fed64},
            {**base, "method": "fedavg mlp200 (reference)", "universal_acc": 0.9}]


def test_table_rows_pair_every_model_with_fedavg_on_the_smallest_architecture(hetero):
    args = hetero.parse_args(["--no-proxy"])
    rows = _rows(0.1, 0, 0.50, 0.60, 0.55, 0.65, 0.70) + _rows(0.1, 1, 0.52, 0.58, 0.5, 0.6,
                                                                0.7)
    table = {label: (vals, gaps) for label, vals, gaps in hetero.table_rows(args, rows, 0.1)}
    uni = table["universal expert (DisUE, MLP-200, generator)"]
    assert uni[0] == [0.50, 0.52]
    assert uni[1] == pytest.approx([-0.10, -0.06])
    fam1 = table["per-family FedAvg, MLP-400 (its family's clients)"]
    assert fam1[1] == pytest.approx([0.05, 0.02])
    assert hetero.budget(args, 0.1) == (50, 2) and hetero.budget(args, 0.5) == (200, 2)


def test_command_runs_the_cells_and_writes_report_and_raw_cells(tmp_path, hetero):
    argv = ["--source", "digits", "--num-clients", "6", "--rounds", "1", "--seeds", "0",
            "--alphas", "0.5", "--distill-steps", "1", "--student-steps", "1", "--widths",
            "4", "8", "--universal", "6", "--clusters", "1", "--steps", "2", "--no-proxy",
            "--out", str(tmp_path), "--cache", str(tmp_path / "cache")]
    path = hetero.main(argv)
    text = path.read_text()
    assert hetero.COMMAND in text and "## Dirichlet alpha = 0.5" in text
    assert "per-family FedAvg, MLP-8" in text and "FedAvg, MLP-4 on every client" in text
    assert "What DisUE gives where averaging cannot run" in text
    with open(tmp_path / "hetero_cells.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["method"] for r in rows} == {"disue hetero", "fedavg mlp64",
                                           "fedavg mlp200 (reference)"}
    dis = next(r for r in rows if r["method"] == "disue hetero")
    assert int(dis["clients_family0"]) == int(dis["clients_family1"]) == 3
    assert float(dis["mb_family0"]) < float(dis["mb_family1"])
    assert json.loads((tmp_path / "hetero_cells.json").read_text())[0]["alpha"] == 0.5
    # A second run reads the cached cell instead of running it again, and keeps the verdict.
    path.write_text(text.replace("<!-- verdict -->\n", "<!-- verdict -->\nkept\n"))
    hetero.main(argv)
    assert "<!-- verdict -->\nkept\n<!-- /verdict -->" in path.read_text()
