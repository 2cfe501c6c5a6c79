"""Regression guard for the benchmarks: the fast paths they measure are the paths taken.

A change that makes a workload fall back silently (the low-rank path not taken for the
throughput MLP, predictors trained through the engine's general path instead of the
full-batch trainer, pairs scored one predictor at a time instead of stacked) leaves every
result equal and every unit test green; only a benchmark would show it, slower. These tests
fail instead, without timing anything: each builds the benchmark's own workload (at a small
size) and checks which path the library chooses or calls.
"""

from __future__ import annotations

import jax
import pytest

import fedrnd.rnd.predictors as predictors
import fedrnd.rnd.scoring as scoring
from benchmarks import throughput
from fedrnd.data import build_federated
from fedrnd.engine import ClientMapper, Engine, LocalSpec, client_hparams
from fedrnd.models import make_model
from fedrnd.rnd import RNDConfig, discover
from tests.rnd._data import grouped_gaussian, shuffled_groups


def test_throughput_workload_takes_the_low_rank_path():
    # The README's throughput figure: MLP 784-200-200-10, 64 examples per client, batch 16,
    # one epoch of SGD (benchmarks/throughput.py at its defaults, fewer clients).
    clients, samples = 8, 64
    data = build_federated(throughput.synthetic_dataset(clients, samples, 4),
                           throughput.iid_partition(clients, samples, 4))
    model = make_model("mlp", (throughput.FEATURES,), throughput.CLASSES,
                       hidden=list(throughput.HIDDEN))
    opt, _ = client_hparams(clients, optimizer="sgd", lr=0.05)
    engine = Engine(model=model, local=LocalSpec(batch_size=16, epochs=1), optimizer=opt,
                    mapper=ClientMapper())
    assert engine.use_lowrank(data)
    # ... and not where it cannot apply (Adam), so the check itself can fail.
    adam, _ = client_hparams(clients, optimizer="adam", lr=1e-3)
    assert not Engine(model=model, local=LocalSpec(batch_size=16, epochs=1),
                      optimizer=adam).use_lowrank(data)


@pytest.mark.parametrize("network", ["mlp", "conv"])
def test_discovery_trains_full_batch_and_scores_stacked(monkeypatch, network):
    # benchmarks/discovery.py's setting: clients whose training rows fit in one predictor
    # batch train through the full-batch trainer; pairs are scored by stacked predictors.
    # stacked_errors is called while a jitted scorer is traced: start from empty caches so a
    # program compiled by an earlier test cannot hide the call.
    jax.clear_caches()
    calls = {"full_batch": 0, "stacked": 0}
    full, stacked = predictors._full_batch_program, scoring.stacked_errors

    def spy_full(*a, **k):
        calls["full_batch"] += 1
        return full(*a, **k)

    def spy_stacked(*a, **k):
        calls["stacked"] += 1
        return stacked(*a, **k)

    monkeypatch.setattr(predictors, "_full_batch_program", spy_full)
    monkeypatch.setattr(scoring, "stacked_errors", spy_stacked)
    groups = shuffled_groups([4, 4], 0)
    data = grouped_gaussian(groups, shift_seed=0, seed=0, dim=64)
    if network == "conv":  # the same inputs as 8 x 8 one-channel images
        data = data.replace(x=data.x.reshape(-1, 8, 8, 1))
    disc = discover(data, RNDConfig(network=network, steps=20, min_steps=None))
    assert disc.federation.shape == (len(groups),)
    assert calls["full_batch"] >= 1, "predictors fell back to the engine's general path"
    assert calls["stacked"] >= 1, "scoring fell back to one predictor at a time"


def test_auto_path_keeps_the_general_path_on_an_accelerator():
    # Measured on a GPU (benchmarks/RESULTS.md, "On a GPU"): the general path is 1.5-1.7x
    # faster there, so "auto" must not pick the fast path off a CPU; on a CPU it still does.
    from fedrnd.engine import lowrank

    model = make_model("mlp", (throughput.FEATURES,), throughput.CLASSES,
                       hidden=list(throughput.HIDDEN))
    spec = LocalSpec(batch_size=16, epochs=1)
    assert lowrank.pays(model, spec, 64, backend="cpu")
    assert not lowrank.pays(model, spec, 64, backend="gpu")
    assert not lowrank.pays(model, spec, 64, backend="tpu")
