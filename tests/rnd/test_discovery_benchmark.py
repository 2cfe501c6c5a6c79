"""benchmarks/discovery.py: its population (feature patterns with known groups), its random
graph, fixed-eps federations, and one tiny end-to-end run printing the JSON figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.discovery import federations_at, main, population, random_graph
from fedrnd.data import feature_patterns
from fedrnd.data.sources import DEFAULT_FASHION_MNIST_DIR, fashion_mnist

needs_fmnist = pytest.mark.skipif(
    not Path(DEFAULT_FASHION_MNIST_DIR).is_dir(),
    reason=f"{DEFAULT_FASHION_MNIST_DIR} absent (apt-get install dataset-fashion-mnist)")


def test_random_graph_is_symmetric_without_self_loops():
    e = random_graph(50, 6, seed=1)
    src, dst = np.asarray(e.src), np.asarray(e.dst)
    assert np.all(src != dst)
    pairs = set(zip(src.tolist(), dst.tolist(), strict=True))
    assert len(pairs) == len(src)  # no repeated edge
    assert all((d, s) in pairs for s, d in pairs)  # both directions
    deg = np.bincount(dst, minlength=50)
    assert deg.min() >= 3 and abs(deg.mean() - 6) < 0.5
    with pytest.raises(ValueError, match="sparse degree"):
        random_graph(3, 8)


@needs_fmnist
def test_population_is_feature_patterns_with_known_groups():
    data = population(40, 16, groups=4, rms=0.3, seed=2)
    g = np.asarray(data.group)
    np.testing.assert_array_equal(np.bincount(g), [10, 10, 10, 10])
    idx = np.asarray(data.train_idx)
    assert len(np.unique(idx)) == idx.size  # 640 of 60,000 images: no client shares one
    # Each client's images are training images plus its group's pattern, clipped to [0, 1].
    pats = feature_patterns((28, 28, 1), 4, rms=0.3, seed=2)
    x_train = np.asarray(fashion_mnist().x_train).reshape(60000, -1)
    x = np.asarray(data.x).reshape(len(data.x), -1)
    for c in range(4):
        for gg in (g[c], (g[c] + 1) % 4):  # its own group's pattern, and another one
            shifted = np.clip(x_train + pats[gg].reshape(-1), 0, 1)
            err = np.min(np.max(np.abs(shifted - x[idx[c, 0]]), axis=1))
            assert (err < 1e-6) == (gg == g[c])
    # More images than a group holds: windows wrap around and clients share images.
    big = population(9, 20000, groups=3, seed=0)
    assert len(big.x) == 60000 and len(np.unique(np.asarray(big.train_idx))) == 60000
    with pytest.raises(ValueError, match="per_client"):
        population(4, 20000, groups=4)  # a group holds 15,000 images


@needs_fmnist
@pytest.mark.slow
def test_tiny_run_prints_figures(tmp_path, capsys):
    out_file = tmp_path / "fig.json"
    out = main(["--clients", "8", "--per-client", "8", "--repeat", "1", "--rms", "0.5",
                "--ari-eps", "0.5,1e9", "--json", str(out_file)])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(line) == json.loads(out_file.read_text()) == json.loads(json.dumps(out))
    assert out["pairs"] == 64 and out["evals"] == 8 * 8 * 8
    assert set(out["phases_s"]) == {"split", "target", "train", "self", "scores", "federations"}
    assert len(out["runs"]) == 2 and out["peak_rss_mib"] > 0
    assert out["ari_at_eps"]["1000000000.0"] == 0.0  # one federation at a huge eps
    sparse = main(["--clients", "8", "--per-client", "8", "--repeat", "0",
                   "--sparse-degree", "2", "--probe-cap", "4"])
    assert sparse["evals"] == 4 * sparse["pairs"] and sparse["pairs"] < 64


def test_federations_at_reproduces_discovery():
    from fedrnd.rnd import RNDConfig, discover
    from tests.rnd._data import grouped_gaussian, shuffled_groups

    groups = shuffled_groups([5, 4, 3], 1)
    data = grouped_gaussian(groups, seed=1, shift_seed=1)
    cfg = RNDConfig(network="mlp", criterion="eps")  # federations_at replays the eps rule
    res = discover(data, cfg)
    np.testing.assert_array_equal(federations_at(res, res.eps), res.federation)
    assert federations_at(res, 1e9).max() == 0
    sparse = discover(data, cfg, edges=random_graph(12, 6))
    np.testing.assert_array_equal(federations_at(sparse, sparse.eps), sparse.federation)
