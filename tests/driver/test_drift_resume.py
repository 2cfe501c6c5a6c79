"""Driver with data drift and resume: phases swapped at the drift round, resumed == whole run,
re-discovery catches the drift, resume does not redo RND discovery, bad drift config."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from fedrnd.algorithms import RNDClustered
from fedrnd.data import Dataset, Partition
from fedrnd.data.drift import build_drifting
from fedrnd.driver import AlgorithmConfig, Config, DataConfig, ModelConfig, load_config, simulate
from fedrnd.driver.config import DriftConfig, from_dict

RND_FAST = {"predictor_steps": 20, "predictor_batch": 32, "network": "mlp"}


def _cfg(**kw) -> Config:
    base = dict(rounds=6, eval_every=2, checkpoint_every=2, progress=False,
                data=DataConfig(source="digits", partition="rotation",
                                partition_options={"num_groups": 2}, num_clients=8,
                                drift=DriftConfig(at_round=3, fraction=0.5)),
                model=ModelConfig("mlp", {"hidden": [16]}),
                algorithms=[AlgorithmConfig("fedavg"), AlgorithmConfig("local"),
                            AlgorithmConfig("rnd", {"tau": 2, **RND_FAST})])
    base.update(kw)
    return Config(**base)


def _leaves(res, tag):
    return [np.asarray(x) for x in jax.tree.leaves(res.methods[tag].state)]


def _rows(run_dir, tag):
    lines = (run_dir / tag / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in lines]


@pytest.mark.slow
@pytest.mark.parametrize("drift_at", [3, 5])
def test_resumed_run_across_drift_equals_uninterrupted(tmp_path, drift_at):
    # Checkpoints at rounds 4 and 6. Drift after round 3: the resumed run starts after the
    # drift and must train on the new data; drift after round 5: the resumed run crosses it.
    cfg = _cfg(data=DataConfig(source="digits", partition="rotation",
                               partition_options={"num_groups": 2}, num_clients=8,
                               drift=DriftConfig(at_round=drift_at, fraction=0.5)))
    full = simulate(cfg, run_dir=tmp_path / "full", verbose=False)
    simulate(cfg, run_dir=tmp_path / "cut", verbose=False)
    for tag in ("fedavg", "local", "rnd"):
        shutil.rmtree(tmp_path / "cut" / tag / "checkpoints" / "6")  # "died" after round 4
    resumed = simulate(cfg, run_dir=tmp_path / "cut", resume=True, verbose=False)
    for tag in ("fedavg", "local", "rnd"):
        for a, b in zip(_leaves(full, tag), _leaves(resumed, tag), strict=True):
            np.testing.assert_array_equal(a, b)
        assert _rows(tmp_path / "full", tag) == _rows(tmp_path / "cut", tag)
        np.testing.assert_array_equal(full.methods[tag].per_client["test_acc"],
                                      resumed.methods[tag].per_client["test_acc"])
    # The drift is logged once, at its round; the final groups are the drifted ones.
    rows = _rows(tmp_path / "full", "fedavg")
    assert [r["round"] for r in rows if "drift_moved" in r] == [drift_at]
    assert rows[drift_at - 1]["drift_moved"] == 4.0
    moved = full.drift.events[0]
    np.testing.assert_array_equal(np.asarray(full.data.group)[moved.clients], moved.new_group)
    assert np.any(np.asarray(full.data.group) != np.asarray(full.drift.initial.group))


def _shifted_groups(sizes, n=30, n_test=10, dim=6, sep=8.0, seed=0):
    """Raw Gaussian classes; group ``g`` adds its own offset (norm ``sep``): a transform, so
    clients can move between groups."""
    rng = np.random.default_rng(seed)
    groups = rng.permutation(np.repeat(np.arange(len(sizes)), sizes)).astype(np.int32)
    c, k = len(groups), 3
    shift = rng.normal(size=(len(sizes), dim))
    shift *= sep / np.linalg.norm(shift, axis=1, keepdims=True)
    means = 2.0 * rng.normal(size=(k, dim))

    def draw(m):
        y = rng.integers(0, k, m).astype(np.int32)
        return (means[y] + rng.normal(size=(m, dim))).astype(np.float32), y

    x_tr, y_tr = draw(c * n)
    x_te, y_te = draw(c * n_test)
    ds = Dataset(x_tr, y_tr, x_te, y_te, k, "shifted")
    part = Partition([np.arange(i * n, (i + 1) * n) for i in range(c)],
                     [np.arange(i * n_test, (i + 1) * n_test) for i in range(c)], groups,
                     transform=lambda x, g: x + shift[g].astype(np.float32), name="shifted")
    return ds, part


def test_rediscovery_recovers_the_drifted_groups(tmp_path):
    ds, part = _shifted_groups([4, 4])
    moved = [int(np.flatnonzero(part.group == 0)[0]), int(np.flatnonzero(part.group == 1)[0])]
    dd = build_drifting(ds, part, 3, clients=moved)
    new_group = np.asarray(dd.phases[1].group)
    cfg = Config(rounds=6, eval_every=1, checkpoint_every=0, progress=False,
                 model=ModelConfig("mlp", {"hidden": [8]}),
                 algorithms=[AlgorithmConfig("rnd", {"tau": 4, **RND_FAST}, label="rnd_tau"),
                             AlgorithmConfig("rnd", RND_FAST, label="rnd_once"),
                             AlgorithmConfig("fedavg")])
    res = simulate(cfg, run_dir=tmp_path / "run", data=dd, verbose=False)
    ari = {t: [h["ari"] for h in res.methods[t].history] for t in ("rnd_tau", "rnd_once")}
    # Both find the groups; after the drift (round 3) the old federations are wrong for the
    # two moved clients until re-discovery at round 4 (tau = 4) catches up.
    assert ari["rnd_once"][:3] == [1.0] * 3 and ari["rnd_tau"][:3] == [1.0] * 3
    assert max(ari["rnd_once"][3:]) < 1.0 and ari["rnd_tau"][3] < 1.0
    assert ari["rnd_tau"][4:] == [1.0, 1.0]
    fed = np.asarray(res.methods["rnd_tau"].state["clients"]["cluster_id"])
    assert adjusted_rand_score(new_group, fed) == 1.0
    assert res.methods["rnd_tau"].final["ari"] == 1.0
    # Clustering scores and per-group accuracy use the groups in effect: the new ones.
    np.testing.assert_array_equal(np.asarray(res.data.group), new_group)
    saved = np.load(tmp_path / "run" / "rnd_tau" / "per_client.npz")
    np.testing.assert_array_equal(saved["group"], new_group)
    assert "ari" not in res.methods["fedavg"].history[0]
    # The moved clients are also scored on their own, before and after the drift.
    fa = res.methods["fedavg"]
    assert fa.final["test_acc/drifted"] == pytest.approx(np.mean(fa.per_client["test_acc"][moved]))
    stayed = np.setdiff1d(np.arange(8), moved)
    assert fa.final["test_acc/stayed"] == pytest.approx(np.mean(fa.per_client["test_acc"][stayed]))
    assert "test_acc/drifted" in fa.history[0]


def test_resume_does_not_rerun_discovery(tmp_path, monkeypatch):
    calls = []
    real = RNDClustered.discover

    def counting(self, data, key):
        calls.append(1)
        return real(self, data, key)

    monkeypatch.setattr(RNDClustered, "discover", counting)
    cfg = _cfg(rounds=4, data=DataConfig(source="digits", partition="rotation",
                                         partition_options={"num_groups": 2}, num_clients=8),
               algorithms=[AlgorithmConfig("rnd", RND_FAST)])
    full = simulate(cfg, run_dir=tmp_path / "full", verbose=False)
    assert len(calls) == 1  # init only (no tau)
    shutil.rmtree(tmp_path / "full" / "rnd" / "checkpoints" / "4")
    calls.clear()
    resumed = simulate(cfg, run_dir=tmp_path / "full", resume=True, verbose=False)
    assert calls == [], "resuming re-ran RND discovery"
    # The template has one slot; the checkpoint's (grown) slot count is what is restored.
    assert jax.tree.leaves(resumed.methods["rnd"].state["slots"])[0].shape[0] == 2
    for a, b in zip(_leaves(full, "rnd"), _leaves(resumed, "rnd"), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name, options", [("fedavg", {"server_opt": "adam"}),
                                           ("fedprox", {}), ("local", {}),
                                           ("rnd", {}), ("rnd", {"keep_scores": False})])
def test_init_template_matches_init(name, options):
    from fedrnd.algorithms import make_algorithm
    from fedrnd.driver.setup import build_data, build_engine

    cfg = _cfg(data=DataConfig(source="digits", partition="rotation",
                               partition_options={"num_groups": 2}, num_clients=6),
               local=load_config(None, ['local.optimizer={sgd = 0.5, adam = 0.5}']).local)
    data, _ = build_data(cfg)
    engine, hp, _ = build_engine(cfg, data)
    alg = make_algorithm(name, engine, **options, **(RND_FAST if name == "rnd" else {}))
    key = jax.random.key(0)
    tmpl = alg.init_template(key, data, hp)
    state = alg.init(key, data, hp)
    assert jax.tree.structure(tmpl) == jax.tree.structure(state)
    for path, (t, s) in zip(jax.tree_util.tree_flatten_with_path(tmpl)[0],
                            zip(jax.tree.leaves(tmpl), jax.tree.leaves(state), strict=True),
                            strict=True):
        assert isinstance(t, jax.ShapeDtypeStruct), path
        assert t.dtype == s.dtype, path
        if "slots" not in jax.tree_util.keystr(path[0]):  # slot count comes from discovery
            assert t.shape == s.shape, path


@pytest.mark.parametrize("overrides, match", [
    (["data.drift.at_round=3"], "exactly one of fraction"),
    (["data.drift.fraction=0.5"], "at_round must be set"),
    (["data.drift.at_round=30", "data.drift.fraction=0.5"], r"in \[1, rounds - 1 = 29\]"),
    (["data.drift.at_round=0", "data.drift.fraction=0.5"], "at_round must be in"),
    (["data.drift.at_round=[5, 5]", "data.drift.fraction=0.5"], "strictly increasing"),
    (["data.drift.at_round=3", "data.drift.fraction=1.5"], "fraction must be in"),
    (["data.drift.at_round=3", "data.drift.fraction=0.5", "data.drift.clients=[1]"],
     "exactly one of"),
    (["data.drift.at_round=3", "data.drift.clients=[1, 20]"], r"client ids in \[0, 20\)"),
    (["data.drift.at_round=3", "data.drift.clients=[2, 2]"], "distinct"),
    (["data.drift.at_round=3.5", "data.drift.fraction=0.5"], "at_round"),
    (["data.drift.when=3"], "unknown field"),
])
def test_bad_drift_config_is_named(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, overrides)


def test_drift_config_round_trip_and_partition_check(tmp_path):
    cfg = load_config(None, ["data.drift.at_round=[3, 6]", "data.drift.fraction=0.25",
                             "data.drift.seed=4"])
    assert cfg.data.drift == DriftConfig(at_round=[3, 6], fraction=0.25, seed=4)
    assert from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    toml = tmp_path / "c.toml"
    toml.write_text('rounds = 10\n[data]\npartition = "dirichlet"\n'
                    'partition_options = {alpha = 0.5}\n'
                    '[data.drift]\nat_round = 4\nfraction = 0.5\n')
    cfg = load_config(toml, ["progress=false"])
    with pytest.raises(ValueError, match="groups change the data"):
        simulate(cfg, run_dir=tmp_path / "bad", verbose=False)
    ds, part = _shifted_groups([2, 2])
    dd = build_drifting(ds, part, 8, fraction=0.5)
    with pytest.raises(ValueError, match="only rounds=6"):
        simulate(Config(rounds=6, progress=False), data=dd, run_dir=tmp_path / "bad2",
                 verbose=False)
