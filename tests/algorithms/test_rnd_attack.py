"""The attack harness as options of the methods that run discovery (``attack``,
``defences``): the same federations as :func:`fedrnd.rnd.discover` with the harness, the
attackers' fate in the report, and clear errors for bad tables (config path included)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import fedrnd.algorithms.rnd_dfl as rnd_dfl_module
from fedrnd.algorithms import make_algorithm
from fedrnd.driver import load_config, simulate
from fedrnd.engine import ClientOptimizer, Engine, LocalSpec, client_hparams
from fedrnd.models import make_model
from fedrnd.rnd import AttackConfig, Defences, discover
from tests.rnd._data import grouped_gaussian, shuffled_groups

DEFAULT = "experiments/default.toml"


@pytest.fixture(scope="module")
def setup():
    groups = shuffled_groups([6, 6], 0)
    data = grouped_gaussian(groups, shift_seed=0, seed=0)
    engine = Engine(make_model("logreg", (6,), 3), LocalSpec(batch_size=16, steps=2),
                    ClientOptimizer())
    _, hp = client_hparams(data.num_clients, lr=0.1)
    return groups, data, engine, hp


def _colluders(groups, k=2):
    return [int(i) for i in np.flatnonzero(groups == 1)[:k]]


def test_attack_option_equals_discover_with_the_harness(setup):
    groups, data, engine, hp = setup
    att = _colluders(groups)
    table = {"predictor": "other_group", "target_group": 0, "clients": att}
    alg = make_algorithm("rnd", engine, network="mlp", attack=table)
    hash(alg)  # jit hashes the method: a table with a list must not break it
    alg.validate(data)
    key = jax.random.key(3)
    state = alg.init(key, data, hp)
    ref = discover(data, alg.rnd_config, key=jax.random.fold_in(key, 1),
                   attack=AttackConfig(**{**table, "clients": tuple(att)}), defences=Defences())
    np.testing.assert_array_equal(np.asarray(state["clients"]["cluster_id"]), ref.federation)
    rep = alg.report(state, data)
    found = rep.artifacts["attack.json"].data
    assert found["attackers"] == att and found["admitted"] == att
    assert found["strategy"] == "other_group+honest" and not found["merged"]
    assert rep.scalars["attack_honest_ari"] == 1.0 and rep.scalars["attack_merged"] == 0.0
    # Without the option the report has no attack.
    assert "attack.json" not in make_algorithm("rnd", engine, network="mlp").report(
        state, data).artifacts


def test_defences_option_decides_whether_forged_rows_merge(setup):
    # Two colluders with one junk predictor and zero rows merge both groups when only
    # uploads are validated (defences = "off"); the default defences keep them apart.
    groups, data, engine, hp = setup
    table = {"predictor": "junk", "row": "zeros", "clients": _colluders(groups)}
    merged = {}
    for d in ("off", "default"):
        alg = make_algorithm("rnd", engine, network="mlp", attack=table, defences=d)
        state = alg.init(jax.random.key(0), data, hp)
        merged[d] = alg.report(state, data).artifacts["attack.json"].data["merged"]
    assert merged == {"off": True, "default": False}


@pytest.mark.parametrize("table, message", [
    ({"row": "bogus"}, r"rnd attack: row attack must be one of"),
    ({"rows": "zeros"}, r"rnd attack: unknown field\(s\) \['rows'\]"),
    ({"row": "zeros", "clients": [99]}, r"attacker ids must be in \[0, 12\)"),
    ({"predictor": "other_group"}, r"needs target_group"),
    ("zeros", r"rnd attack must be a table"),
])
def test_bad_attack_tables_are_rejected_by_name(setup, table, message):
    _, data, engine, _ = setup
    with pytest.raises(ValueError, match=message):
        make_algorithm("rnd", engine, network="mlp", attack=table).validate(data)


def test_bad_defences_value_names_the_choices(setup):
    _, data, engine, _ = setup
    with pytest.raises(ValueError, match=r"defences.*'default', 'strict', 'off'"):
        make_algorithm("rnd", engine, defences="paranoid").validate(data)


def test_decentralized_discovery_receives_the_attack(setup, monkeypatch):
    groups, data, engine, _ = setup
    seen = {}

    def spy(*args, **kw):
        seen.update(kw)
        raise RuntimeError("stop")

    monkeypatch.setattr(rnd_dfl_module, "discover_regions", spy)
    alg = make_algorithm("rnd_dfl", engine, network="mlp", attack={"row": "zeros",
                                                                    "clients": [1]})
    graph = alg.make_topology(data.num_clients).draw(jax.random.key(0))
    with pytest.raises(RuntimeError, match="stop"):
        alg.discover(data, graph, jax.random.key(0))
    assert seen["attack"] == AttackConfig(row="zeros", clients=(1,))


def test_attack_table_from_a_config_file_reaches_the_run(tmp_path):
    overrides = ["rounds=1", "eval_every=1", "checkpoint_every=0", "progress=false",
                 f"out_dir={str(tmp_path)!r}",
                 'algorithms=[{name="rnd", options={predictor_steps=50, '
                 'attack={row="zeros", fraction=0.1}}}]']
    cfg = load_config(DEFAULT, overrides)
    res = simulate(cfg)
    found = (res.run_dir / "rnd" / "attack.json").read_text()
    assert '"strategy": "honest+zeros"' in found
    # A bad table is a config error naming its path, raised before anything is written.
    out = tmp_path / "bad"
    bad = load_config(DEFAULT, [*overrides[:3], f"out_dir={str(out)!r}",
                                'algorithms=[{name="rnd", options={attack={row="bogus"}}}]'])
    with pytest.raises(ValueError, match=r"algorithms\.0\.options\.attack: row attack must be"):
        simulate(bad)
    assert not out.exists()


def test_nested_discovery_block_is_the_flat_options(setup, tmp_path):
    # One block for every method that runs discovery (DisUE's rnd_* names included); the
    # config keeps the flat form, so both spellings are one method (and one cell key).
    _, _, engine, _ = setup
    from fedrnd.algorithms import expand_discovery

    nested = make_algorithm("rnd", engine, discovery={"network": "mlp", "predictor_steps": 50,
                                                      "attack": {"row": "zeros",
                                                                 "clients": [1]}})
    flat = make_algorithm("rnd", engine, network="mlp", predictor_steps=50,
                          attack={"row": "zeros", "clients": [1]})
    assert nested == flat and hash(nested) == hash(flat)
    assert expand_discovery("disue", {"discovery": {"eps": 0.5, "network": "mlp"}}) == {
        "rnd_eps": 0.5, "rnd_network": "mlp"}
    cfg = load_config(DEFAULT, ['algorithms=[{name="rnd", options={tau=5, discovery={'
                                'network="mlp", predictor_steps=50}}}]'])
    from fedrnd.driver.config import validate

    validate(cfg)
    assert cfg.algorithms[0].options == {"tau": 5, "network": "mlp", "predictor_steps": 50}
    for opts, message in (('{discovery={netwrk="mlp"}}', r"algorithms\.0\.options\.discovery"
                                                          r": algorithm 'rnd' has no discovery "
                                                          r"option\(s\) \['netwrk'\]"),
                          ('{network="mlp", discovery={network="mlp"}}', r"given both"),
                          ('{discovery={}}', r"no RND discovery")):
        name = "fedavg" if "{}" in opts else "rnd"
        with pytest.raises(ValueError, match=message):
            load_config(DEFAULT, [f'algorithms=[{{name="{name}", options={opts}}}]'])
