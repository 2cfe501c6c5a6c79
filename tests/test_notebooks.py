"""Execute every notebook under ``notebooks/`` and fail on any cell error.

Each notebook is copied to a temporary directory and run there with nbclient, so nothing
(outputs, run directories) is written into the repository. The kernel is a ``python3``
kernelspec written for this test that runs the *current* interpreter (``sys.executable``), so a
user-level ``python3`` kernelspec pointing at another Python cannot shadow it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="notebook tests need nbformat")
nbclient = pytest.importorskip("nbclient", reason="notebook tests need nbclient")
pytest.importorskip("ipykernel", reason="notebook tests need ipykernel (pip install ipykernel)")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 300  # seconds per cell


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A ``python3`` kernelspec for this interpreter, found first on ``JUPYTER_PATH``."""
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (test)", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    old = os.environ.get("JUPYTER_PATH")
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(
        [str(tmp_path / "jupyter"), *([old] if old else [])]))
    # Let the kernel import fedrnd from this checkout even if it is not installed.
    old_pp = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), *([old_pp] if old_pp else [])]))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # Temporary files the notebooks make (run directories) land under tmp_path.
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    return tmp_path


def _execute(path: Path, workdir: Path):
    """Run a copy of ``path`` in ``workdir``; return the executed notebook (in memory)."""
    workdir.mkdir()
    copy = workdir / path.name
    shutil.copy(path, copy)
    nb = nbformat.read(copy, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT,
                                     resources={"metadata": {"path": str(workdir)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name}: a cell raised an error:\n{e}")
    return nb


def _text(cell) -> str:
    """All plain-text output of a code cell (stream text and text/plain results)."""
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif "text/plain" in out.get("data", {}):
            parts.append(out["data"]["text/plain"])
    return "".join(parts)


def _images(nb) -> int:
    return sum("image/png" in out.get("data", {})
               for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)


def test_notebooks_found():
    assert NOTEBOOKS, f"no notebooks found under {ROOT / 'notebooks'}"


def test_notebooks_saved_without_outputs():
    """Notebooks are committed with cleared outputs so diffs stay small."""
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        dirty = [i for i, c in enumerate(nb.cells)
                 if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
        assert not dirty, f"{path.name}: clear the outputs of cells {dirty} before committing"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, kernel_env):
    before = set((ROOT / "notebooks").iterdir())
    nb = _execute(path, kernel_env / "run")
    assert set((ROOT / "notebooks").iterdir()) == before, "the notebook wrote into the repo"

    if path.name == "01_quickstart.ipynb":
        text = "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")
        m = re.search(r"final test accuracy: fedavg=([0-9.]+) local=([0-9.]+)", text)
        assert m, "the quickstart did not print its final accuracies"
        fedavg, local = float(m.group(1)), float(m.group(2))
        assert fedavg > 0.3 and local > 0.3, (fedavg, local)
        assert "| fedavg |" in text and "| local |" in text, "result.table() missing"
        # The per-group example images and the accuracy plot are shown inline.
        assert _images(nb) >= 2, f"expected at least 2 inline figures, got {_images(nb)}"

    if path.name == "02_rnd_discovery.ipynb":
        text = "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")
        m = re.search(r"(\d+) federations, eps = ([0-9.]+) \(auto\)\n.*\n.*\nARI ([0-9.-]+)",
                      text)
        assert m, "the discovery notebook did not print its federations and ARI"
        assert int(m.group(1)) == 4 and float(m.group(3)) > 0.9, m.group(0)
        # Every held-back client joins the federation of its own true group; the stranger
        # (rotated digits, no pattern) gets a new federation.
        joins = re.findall(r"true group (\d)\) -> federation \d+, whose members are in "
                           r"group\(s\) \[([0-9, ]+)\]", text)
        assert len(joins) == 4 and all(g == m2 for g, m2 in joins), joins
        assert "rotated stranger -> federation 4 (new" in text
        # Patterns, heat maps, eps sweep, sigma comparison.
        assert _images(nb) >= 4, f"expected at least 4 inline figures, got {_images(nb)}"

    if path.name == "03_decentralized.ipynb":
        text = "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")
        assert "average kept: True" in text, "gossip lost the average"
        m = re.search(r"edge-list gossip vs dense W x, max \|diff\|: ([0-9.e-]+)", text)
        assert m and float(m.group(1)) < 1e-5, "edge-list gossip differs from the dense reference"
        assert re.search(r"discovery: .* regions .* election settled", text), "no regions printed"
        assert "rnd_dfl: final test accuracy" in text
        # Graphs, consensus curve, region picture, score histogram, accuracy curves.
        assert _images(nb) >= 5, f"expected at least 5 inline figures, got {_images(nb)}"
