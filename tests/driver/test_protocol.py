"""The driver's end-of-run protocol: fine-tune figures, clustering time and wall time."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedrnd.driver import AlgorithmConfig, Config, DataConfig, ModelConfig, load_config, simulate
from fedrnd.engine import finetune_evaluate, finetune_key


def _cfg(**kw) -> Config:
    base = dict(rounds=2, eval_every=1, checkpoint_every=0, progress=False,
                data=DataConfig(source="digits", partition="rotation",
                                partition_options={"num_groups": 2}, num_clients=6),
                model=ModelConfig("mlp", {"hidden": [8]}),
                algorithms=[AlgorithmConfig("fedavg"), AlgorithmConfig("local")])
    base.update(kw)
    return Config(**base)


def test_finetune_figures_match_engine_on_final_state(tmp_path):
    res = simulate(_cfg(finetune=True, finetune_epochs=2), run_dir=tmp_path / "ft",
                   verbose=False)
    for tag in ("fedavg", "local"):
        m = res.methods[tag]
        alg_models = m.state
        # Recompute with the engine from the final state: the driver adds nothing of its own.
        from fedrnd.algorithms import make_algorithm
        from fedrnd.driver import build_engine

        engine, hp, _ = build_engine(res.config, res.data)
        alg = make_algorithm(tag, engine)
        want = finetune_evaluate(engine, *alg.models(alg_models), res.data, hp,
                                 finetune_key(res.config.seed), 2)
        np.testing.assert_allclose(m.per_client["test_acc_ft"], np.asarray(want["test_acc"]),
                                   atol=1e-6)
        assert m.final["test_acc_ft/mean"] == pytest.approx(
            float(np.mean(np.asarray(want["test_acc"]))))
        final = json.loads((res.run_dir / tag / "final.json").read_text())
        assert {"test_acc_ft/mean", "test_acc_ft/worst10", "finetune_time", "cluster_time",
                "wall_time"} <= set(final)
        assert final["wall_time"] >= final["cluster_time"] >= 0
        assert "test_acc_ft" in np.load(res.run_dir / tag / "per_client.npz")
    assert "test acc +FT" in res.table()


def test_finetune_off_reports_no_ft_figures(tmp_path):
    res = simulate(_cfg(algorithms=[AlgorithmConfig("fedavg")]), run_dir=tmp_path / "p",
                   verbose=False)
    assert not any("_ft" in k for k in res.methods["fedavg"].final)
    assert "+FT" not in res.table()


def test_bad_finetune_epochs_named():
    with pytest.raises(ValueError, match="finetune_epochs must be >= 1"):
        load_config(None, ["finetune=true", "finetune_epochs=0"])


def test_fedavg_finetune_on_own_data_helps_a_rotated_federation(tmp_path):
    # One global model for two rotated groups: a local epoch on the client's own data
    # adapts it to the client's rotation, so the fine-tuned accuracy is higher.
    cfg = _cfg(rounds=8, eval_every=8, finetune=True, finetune_epochs=3,
               algorithms=[AlgorithmConfig("fedavg")],
               local=load_config(None, ["local.lr=0.3"]).local)
    f = simulate(cfg, run_dir=tmp_path / "h", verbose=False).methods["fedavg"].final
    assert f["test_acc_ft/mean"] > f["test_acc/mean"] + 0.02
