"""experiments/adversarial/run.py: the honest-accuracy column equals scikit-learn's
nearest-centroid classifier trained on each federation's pooled training rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.neighbors import NearestCentroid

from tests.experiments._script import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "adversarial" / "run.py"


def _module():
    return load_script(SCRIPT, "adversarial_run")


def test_honest_accuracy_equals_a_nearest_centroid_per_federation():
    mod = _module()
    data = mod.population(16, seed=1)
    x, y = np.asarray(data.x, np.float64), np.asarray(data.y)
    tr, tc = np.asarray(data.train_idx), np.asarray(data.train_count)
    te, ec = np.asarray(data.test_idx), np.asarray(data.test_count)
    group = np.asarray(data.group)
    attackers = np.array([2, 9])
    for fed in (group.astype(int), np.zeros(16, int), (np.arange(16) % 3)):
        accs = []
        for i in np.setdiff1d(np.arange(16), attackers):
            members = np.flatnonzero(fed == fed[i])
            rows = np.concatenate([tr[m, :tc[m]] for m in members])
            clf = NearestCentroid().fit(x[rows], y[rows])
            t = te[i, :ec[i]]
            accs.append(np.mean(clf.predict(x[t]) == y[t]))
        np.testing.assert_allclose(mod.honest_accuracy(data, fed, attackers), np.mean(accs),
                                   rtol=1e-12)
