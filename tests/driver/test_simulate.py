"""Driver: resume == uninterrupted, determinism, outputs, and errors before compilation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedrnd.driver import AlgorithmConfig, Config, DataConfig, ModelConfig, load_config, simulate


def _cfg(**kw) -> Config:
    base = dict(rounds=6, eval_every=2, checkpoint_every=2, progress=False,
                data=DataConfig(source="digits", partition="rotation",
                                partition_options={"num_groups": 2}, num_clients=8),
                model=ModelConfig("mlp", {"hidden": [16]}))
    base.update(kw)
    return Config(**base)


def _final_params(res, tag):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(res.methods[tag].state)]


def test_resume_equals_uninterrupted(tmp_path):
    full = simulate(_cfg(), run_dir=tmp_path / "full", verbose=False)
    # "Interrupt" after round 4 (the last checkpoint), then resume to round 6.
    simulate(_cfg(rounds=4), run_dir=tmp_path / "cut", verbose=False)
    resumed = simulate(_cfg(), run_dir=tmp_path / "cut", resume=True, allow_change=["rounds"],
                       verbose=False)
    for tag in ("fedavg", "local"):
        for a, b in zip(_final_params(full, tag), _final_params(resumed, tag), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        assert full.methods[tag].final["test_acc/mean"] == pytest.approx(
            resumed.methods[tag].final["test_acc/mean"])
        np.testing.assert_allclose(full.methods[tag].bytes_up, resumed.methods[tag].bytes_up)
        rounds = [json.loads(line)["round"] for line in
                  (tmp_path / "cut" / tag / "metrics.jsonl").read_text().splitlines()]
        assert rounds == list(range(1, 7)), "resumed log must hold each round exactly once"


def test_resume_discards_rounds_after_last_checkpoint(tmp_path):
    simulate(_cfg(rounds=6, checkpoint_every=4), run_dir=tmp_path / "r", verbose=False)
    log = tmp_path / "r" / "fedavg" / "metrics.jsonl"
    # Pretend the run died after logging round 6 but its last checkpoint is round 4 (drop 6).
    import shutil

    shutil.rmtree(tmp_path / "r" / "fedavg" / "checkpoints" / "6")
    res = simulate(_cfg(rounds=6, checkpoint_every=4), run_dir=tmp_path / "r", resume=True,
                   verbose=False)
    rounds = [json.loads(line)["round"] for line in log.read_text().splitlines()]
    assert rounds == list(range(1, 7))
    assert len(res.methods["fedavg"].history) == 6


def test_same_seed_same_result_and_different_seed_differs(tmp_path):
    a = simulate(_cfg(checkpoint_every=0), run_dir=tmp_path / "a", verbose=False)
    b = simulate(_cfg(checkpoint_every=0), run_dir=tmp_path / "b", verbose=False)
    c = simulate(_cfg(checkpoint_every=0, seed=1), run_dir=tmp_path / "c", verbose=False)
    for x, y in zip(_final_params(a, "fedavg"), _final_params(b, "fedavg"), strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(not np.allclose(x, y) for x, y in
               zip(_final_params(a, "fedavg"), _final_params(c, "fedavg"), strict=True))


def test_methods_share_initial_weights(tmp_path):
    # With a vanishing learning rate nothing moves, so every method still holds its init.
    cfg = _cfg(rounds=1, eval_every=1, checkpoint_every=0,
               local=load_config(None, ["local.lr=1e-12"]).local)
    res = simulate(cfg, run_dir=tmp_path / "i", verbose=False)
    import jax

    glob = jax.tree.leaves(res.methods["fedavg"].state["params"])
    per_client = jax.tree.leaves(res.methods["local"].state["clients"]["params"])
    for g, pc in zip(glob, per_client, strict=True):
        for c in range(pc.shape[0]):
            np.testing.assert_allclose(np.asarray(pc[c]), np.asarray(g), atol=1e-6)


def test_outputs_written(tmp_path):
    res = simulate(_cfg(), run_dir=tmp_path / "o", verbose=False)
    d = res.run_dir
    for f in ("config.json", "metadata.json", "summary.md", "summary.csv", "accuracy.png"):
        assert (d / f).is_file(), f
    meta = json.loads((d / "metadata.json").read_text())
    assert {"fedrnd", "jax", "jaxlib", "devices", "xla_flags", "git_commit"} <= set(meta)
    for tag in ("fedavg", "local"):
        for f in ("metrics.jsonl", "metrics.csv", "final.json", "per_client.npz"):
            assert (d / tag / f).is_file(), (tag, f)
        pc = np.load(d / tag / "per_client.npz")
        assert pc["test_acc"].shape == (8,)
    # The ledger: FedAvg moves the model up and down every round, Local moves nothing.
    n_params = 64 * 16 + 16 + 16 * 10 + 10
    np.testing.assert_allclose(res.methods["fedavg"].bytes_up, 6 * 4 * n_params)
    np.testing.assert_allclose(res.methods["local"].bytes_up, 0.0)
    assert "| fedavg |" in res.table()


def test_cohort_ledger_counts_only_participants(tmp_path):
    res = simulate(_cfg(cohort_size=2, checkpoint_every=0, algorithms=[AlgorithmConfig("fedavg")]),
                   run_dir=tmp_path / "c", verbose=False)
    up = res.methods["fedavg"].bytes_up
    n_params = 64 * 16 + 16 + 16 * 10 + 10
    assert up.sum() == pytest.approx(6 * 2 * 4 * n_params)
    # Every byte count is a whole number of model messages.
    np.testing.assert_allclose(up % (4 * n_params), 0.0)
    assert (up > 0).sum() >= 2


@pytest.mark.parametrize("override, match", [
    ("rounds=0", "rounds must be >= 1"),
    ("data.source=\"nope\"", "nope"),
    ("algorithms=[\"nope\"]", "algorithms.0.name='nope' is unknown"),
    ("local.lr=-0.1", "local.lr must be > 0"),
    ("model.name=\"vit\"", "model.name='vit' is unknown"),
    ("cohort_size=100", "cohort_size must be in"),
    ("data.num_clients=0", "data.num_clients must be >= 1"),
])
def test_bad_config_fails_with_named_field(tmp_path, override, match):
    with pytest.raises(ValueError, match=match):
        cfg = load_config(None, [override, "progress=false"])
        simulate(cfg, run_dir=tmp_path / "bad", verbose=False)


@pytest.mark.parametrize("override, match", [
    ("data.partition_options={alpha=0.0}", "alpha"),
    ("data.num_clients=5000", "clients"),
])
def test_bad_data_settings_fail_before_compiling(tmp_path, override, match):
    over = [override, "progress=false"]
    if "alpha" in override:
        over.append('data.partition="dirichlet"')
    with pytest.raises(ValueError, match=match):
        simulate(load_config(None, over), run_dir=tmp_path / "bad", verbose=False)


def test_unreadable_data_dir_is_named(tmp_path):
    cfg = load_config(None, ['data.source="fashion_mnist"',
                             f'data.source_options={{data_dir="{tmp_path}/none"}}'])
    with pytest.raises(FileNotFoundError, match="none"):
        simulate(cfg, run_dir=tmp_path / "bad", verbose=False)


def test_divergence_is_reported(tmp_path):
    cfg = _cfg(checkpoint_every=0, local=load_config(None, ["local.lr=1e30"]).local)
    with pytest.raises(FloatingPointError, match="diverged"):
        simulate(cfg, run_dir=tmp_path / "div", verbose=False)


def test_checkpoint_restores_grown_shapes(tmp_path):
    # A host hook may grow cluster slots mid-run; resuming must use the stored shapes.
    import jax.numpy as jnp

    from fedrnd.driver.checkpoint import Checkpointer

    ck = Checkpointer(tmp_path / "ck")
    grown = {"slots": jnp.arange(8.0).reshape(4, 2), "round": jnp.asarray(3)}
    ck.save(3, grown, {"round": 3})
    like = {"slots": jnp.zeros((2, 2)), "round": jnp.asarray(0)}
    state, meta = ck.restore(like)
    ck.close()
    assert meta["round"] == 3
    np.testing.assert_array_equal(np.asarray(state["slots"]), np.arange(8.0).reshape(4, 2))


def test_methods_of_two_families_get_one_accuracy_figure_per_family(tmp_path):
    from fedrnd.algorithms import ALGORITHMS, method_family

    # The families come from the method classes' metadata, not from names in the driver.
    assert {n: method_family(ALGORITHMS[n]) for n in ("fedavg", "local", "ifca", "dpsgd")} == {
        "fedavg": "centralized", "local": "centralized", "ifca": "clustered",
        "dpsgd": "decentralized"}
    res = simulate(_cfg(rounds=2, eval_every=1, checkpoint_every=2, algorithms=[
        AlgorithmConfig("fedavg"), AlgorithmConfig("local"),
        AlgorithmConfig("ifca", {"num_clusters": 2})]), run_dir=tmp_path / "fam", verbose=False)
    figs = sorted(p.name for p in res.run_dir.glob("accuracy*.png"))
    assert figs == ["accuracy.png", "accuracy_centralized.png", "accuracy_clustered.png"]
    # One family only (the default fedavg + local): accuracy.png is already that figure.
    one = simulate(_cfg(rounds=2, eval_every=1, checkpoint_every=2), run_dir=tmp_path / "one",
                   verbose=False)
    assert sorted(p.name for p in one.run_dir.glob("accuracy*.png")) == ["accuracy.png"]
