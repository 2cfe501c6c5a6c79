"""benchmarks/clustering_cost.py: the RND / IFCA ratios, the FLOP accounting, the generated
section of RESULTS.md, and one tiny end-to-end measurement."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks.clustering_cost import (
    federations_at,
    flop_counts,
    main,
    markdown,
    parse_model,
    ratios,
    write_section,
)
from fedrnd.models import count_flops, make_model
from fedrnd.rnd import RNDConfig


def test_ratios_over_a_run():
    # Discovery 10 s once vs 0.5 s of IFCA clustering in each of 100 rounds: 10 / 50.
    r = ratios(10.0, 0.5, 100)
    assert r["once"] == pytest.approx(0.2)
    assert r["every_round"] == pytest.approx(20.0)  # 100 discoveries vs 100 estimations
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        ratios(1.0, 1.0, 0)
    with pytest.raises(ValueError, match="times must be positive"):
        ratios(1.0, 0.0, 5)


def test_flop_counts_add_up_the_phases():
    task = make_model("logreg", (8, 8, 1), 10)
    pair = RNDConfig(network="mlp").pair((8, 8, 1))
    f = flop_counts(task, pair, clusters=3, train_examples=500, pool_rows=700, num_clients=20,
                    predictor_examples=64, probe_examples=500)
    # Logistic regression forward: one 64 x 10 product (2 FLOPs per multiply-add) plus bias.
    assert 2 * 64 * 10 <= count_flops(task) <= 2 * 64 * 10 + 2 * 10
    assert f["ifca_round"] == pytest.approx(3 * 500 * count_flops(task))
    f_t, f_p = count_flops(pair.target), count_flops(pair.predictor)
    assert f["rnd_target"] == pytest.approx(700 * f_t)
    assert f["rnd_train"] == pytest.approx(20 * 64 * 3 * f_p)
    assert f["rnd_scores"] == pytest.approx(20 * 500 * f_p)  # every predictor, every probe
    assert f["rnd"] == pytest.approx(f["rnd_target"] + f["rnd_train"] + f["rnd_scores"])
    only = flop_counts(task, pair, clusters=3, train_examples=500, pool_rows=700,
                       num_clients=20, predictor_examples=64, probe_examples=None)
    assert set(only) == {"ifca_round"}


def test_federations_reread_at_other_tolerances():
    # Two groups of 5: normalised scores about 0 inside a group and 3 across (self-novelty 1
    # and sigma "self" = 1, so z = s - 1). The discovery's own criterion (the default test)
    # does not matter: the re-read is the paper's eps rule.
    group = np.repeat([0, 1], 5)
    rng = np.random.default_rng(0)
    z = np.where(group[:, None] == group[None, :], 0.0, 3.0) + rng.uniform(0, 0.2, (10, 10))
    np.fill_diagonal(z, 0.0)
    scores = (1.0 + z).astype(np.float32)
    disc = SimpleNamespace(scores=scores.copy(), self_std=np.ones(10),
                           config=RNDConfig(sigma="self"))
    auto, low, high = federations_at(disc, group, ["auto", 1.0, 10.0])
    assert 0.2 < auto["eps_used"] < 3.0  # the empty band between the two modes
    assert (auto["federations"], auto["ari"]) == (2, 1.0)
    assert (low["federations"], low["ari"]) == (2, 1.0)
    assert (high["federations"], high["ari"]) == (1, 0.0)  # everything compatible
    np.testing.assert_array_equal(disc.scores, scores)  # the input is not modified


def test_parse_model():
    assert parse_model("cnn") == ("cnn", {})
    assert parse_model('cnn:{"channels": [8, 16]}') == ("cnn", {"channels": [8, 16]})
    with pytest.raises(ValueError, match="JSON"):
        parse_model("cnn:{channels}")


def test_section_is_appended_once_then_replaced(tmp_path):
    p = tmp_path / "RESULTS.md"
    p.write_text("# Benchmarks\n\nearlier text\n")
    write_section(p, "## A\n\nfirst")
    write_section(p, "## B\n\nother", tag="cnn")
    write_section(p, "## A\n\nsecond")
    text = p.read_text()
    assert text.startswith("# Benchmarks\n\nearlier text\n")
    assert "second" in text and "first" not in text and "other" in text
    assert text.count("## A") == 1 and text.index("## A") < text.index("## B")
    with pytest.raises(ValueError, match="tag"):
        write_section(p, "x", tag="a b")


@pytest.mark.slow  # a real (tiny) discovery and IFCA timing: about 20-40 s on a busy CPU
def test_tiny_measurement_end_to_end(tmp_path, capsys):
    grid = tmp_path / "g.toml"
    grid.write_text(f'''
name = "tiny"
cache_dir = "{tmp_path / 'cache'}"
[config]
rounds = 7
data = {{ source = "digits", num_clients = 8 }}
model = {{ name = "logreg", options = {{}} }}
local = {{ batch_size = 8, steps = 2 }}
[[scenarios]]
name = "rot"
partition = "rotation"
partition_options = {{ num_groups = 2, sizes = 40 }}
[[methods]]
name = "fedavg"
[[methods]]
name = "ifca"
options = {{ num_clusters = "K" }}
[[methods]]
name = "rnd"
options = {{ network = "mlp", predictor_steps = 5, predictor_batch = 8, criterion = "eps", eps = 1.0 }}
''')
    out = tmp_path / "RESULTS.md"
    r = main(["--grid", str(grid), "--repeat", "2", "--results", str(out),
              "--also-model", 'mlp:{"hidden": [16]}'])
    assert r["rounds"] == 7 and r["clients"] == 8 and r["ifca_clusters"] == 2
    assert r["train_examples"] == 8 * 40
    for kind in ("wall", "cpu"):
        want = r["rnd_warm"][kind] / (7 * r["ifca_estimate"][kind])
        assert r["ratio"][kind]["once"] == pytest.approx(want)
        assert r["ratio"][kind]["every_round"] == pytest.approx(7 * want)
    assert r["ratio_flops"]["once"] == pytest.approx(
        r["flops"]["rnd"] / (7 * r["flops"]["ifca_round"]))
    assert set(r["rnd_phases"]) >= {"train", "scores", "federations"}
    assert [q["eps"] for q in r["eps_reread"]] == ["auto", 1.0]
    assert r["eps_reread"][1]["federations"] == r["rnd"]["federations"]
    (other,) = r["other_models"]
    assert other["model"].startswith("mlp") and other["params"] == 64 * 16 + 16 + 16 * 10 + 10
    text = out.read_text()
    assert "| RND discovery, warm = RND once |" in text and "| mlp {" in text
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-2])["seed"] == 0
    assert markdown(r) in text
