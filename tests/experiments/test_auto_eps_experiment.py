"""experiments/rnd/auto_eps.py: cached discovery per population, criteria read off the cached
matrix, and the generated table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.experiments._script import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "rnd" / "auto_eps.py"


@pytest.fixture(scope="module")
def mod():
    return load_script(SCRIPT, "rnd_auto_eps")


def test_evaluate_scores_each_criterion_on_a_known_matrix(mod):
    rng = np.random.default_rng(0)
    g = np.repeat(np.arange(3), [4, 3, 5])
    same = g[:, None] == g[None, :]
    # raw scores whose normalised form is block structured: low within, high across groups
    s = np.where(same, 1.0 + rng.uniform(0, 0.05, same.shape), 3.0 + rng.uniform(0, 1, same.shape))
    np.fill_diagonal(s, 1.0)
    row = mod.evaluate("blocks", s, np.zeros(12), g)
    assert row["auto"] == {"ari": 1.0, "federations": 3}
    assert row["silhouette"] > 0.5 and row["groups"] == 3
    one = mod.evaluate("one", s, np.zeros(12), np.zeros(12, int))
    assert one["auto"]["federations"] == 3 and one["auto"]["ari"] == 0.0  # not kept whole


@pytest.mark.slow
def test_quick_run_caches_matrices_and_writes_the_table(mod, tmp_path, monkeypatch):
    pops = mod.populations(quick=True)
    monkeypatch.setattr(mod, "populations", lambda quick: [pops[0], pops[10]])
    assert mod.main(["--quick", "--out", str(tmp_path)]) == 0
    cached = sorted(p.name for p in (tmp_path / "cells" / "auto_eps").iterdir())
    assert cached == sorted([f"{pops[0][0]}.npz", f"{pops[10][0]}.npz"])
    text = (tmp_path / "AUTO_EPS.md").read_text()
    assert "| auto (silhouette >= 0.5) | 1/1 | 1/1 | 1.000 |" in text
    stamp = (tmp_path / "cells" / "auto_eps" / cached[0]).stat().st_mtime
    assert mod.main(["--quick", "--out", str(tmp_path)]) == 0  # re-run reads the cache
    assert (tmp_path / "cells" / "auto_eps" / cached[0]).stat().st_mtime == stamp
    # A matrix whose stored key no longer matches its population's config is recomputed.
    f = tmp_path / "cells" / "auto_eps" / cached[0]
    z = dict(np.load(f))
    np.savez_compressed(f, **{**z, "key": np.asarray("0000000000000000")})
    assert mod.main(["--quick", "--out", str(tmp_path)]) == 0
    assert str(np.load(f)["key"]) != "0000000000000000"
