"""``--set`` semantics (dotted keys, whole tables, options reset on a new choice), the TOML
writer behind ``--print-config``, and options checked against the functions they go to."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedrnd.driver.config import (
    Config,
    apply_overrides,
    from_dict,
    load_config,
    to_toml,
    validate,
)

REPO = Path(__file__).parents[2]
DEFAULT = REPO / "experiments" / "default.toml"


def test_dotted_key_sets_one_key_and_a_table_replaces_the_table():
    cfg = load_config(DEFAULT, ["data.partition_options.group_sizes=[5, 15]"])
    assert cfg.data.partition_options == {"num_groups": 2, "group_sizes": [5, 15]}
    cfg = load_config(DEFAULT, ["data.partition_options={num_groups=3}"])
    assert cfg.data.partition_options == {"num_groups": 3}


@pytest.mark.parametrize("overrides, want", [
    # A new partition starts from empty options: rotation's num_groups means nothing to it.
    (["data.partition=iid"], {}),
    # Options set in the same command line are kept, in either order, on an empty table.
    (["data.partition=dirichlet", "data.partition_options.alpha=0.3"], {"alpha": 0.3}),
    (["data.partition_options.alpha=0.3", "data.partition=dirichlet"], {"alpha": 0.3}),
    (["data.partition=dirichlet", "data.partition_options={alpha=0.5, min_size=3}"],
     {"alpha": 0.5, "min_size": 3}),
    # The same partition again is no change: its options stay.
    (["data.partition=rotation", "data.partition_options.within=iid"],
     {"num_groups": 2, "within": "iid"}),
    # So is a change back within the same command line.
    (["data.partition=iid", "data.partition=rotation"], {"num_groups": 2}),
])
def test_changing_the_partition_resets_its_options(overrides, want):
    assert load_config(DEFAULT, overrides).data.partition_options == want


def test_changing_the_model_or_source_resets_their_options():
    cfg = load_config(DEFAULT, ["model.name=cnn", "model.options.channels=[4]"])
    assert cfg.model.options == {"channels": [4]}
    assert load_config(DEFAULT, ["model.name=logreg"]).model.options == {}
    cfg = load_config(DEFAULT, ["data.source_options.test_fraction=0.5"])
    assert cfg.data.source_options == {"test_fraction": 0.5}
    cfg = load_config(DEFAULT, ["data.source_options.num_groups=2",
                                "data.source=gaussian_mixture", "data.partition=iid"])
    assert cfg.data.source_options == {"num_groups": 2} and cfg.data.partition_options == {}


def test_readme_override_example():
    # README: --set rounds=100 --set local.lr=0.05 --set 'algorithms=[...]' plus a Dirichlet
    # split; alpha alone belongs to no partition of the default config and says which does.
    over = ["rounds=100", "local.lr=0.05", 'algorithms=["fedavg","fedprox","local"]',
            "data.partition_options.alpha=0.3"]
    with pytest.raises(ValueError, match=r"data\.partition_options\.alpha is not an option of "
                                         r"data\.partition = 'rotation'.*--set "
                                         r"data\.partition=dirichlet"):
        load_config(None, over)
    cfg = load_config(None, [*over, "data.partition=dirichlet"])
    assert (cfg.rounds, cfg.local.lr, [a.name for a in cfg.algorithms]) == (
        100, 0.05, ["fedavg", "fedprox", "local"])
    assert cfg.data.partition_options == {"alpha": 0.3}


def test_a_file_choosing_another_partition_gets_empty_options(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[data]\npartition = "iid"\n[model]\nname = "logreg"\n')
    cfg = load_config(f)
    assert cfg.data.partition_options == {} and cfg.model.options == {}


def test_bare_words_are_strings_and_broken_structures_are_errors():
    assert load_config(None, ["name=my-run"]).name == "my-run"
    with pytest.raises(ValueError, match="not a valid TOML value"):
        apply_overrides(Config().to_dict(), ['algorithms=["fedavg"'])


def test_a_bare_algorithm_name_can_take_options_in_the_same_command():
    cfg = load_config(None, ['algorithms=["rnd", "fedavg"]', "algorithms.0.options.eps=0.5"])
    assert cfg.algorithms[0].name == "rnd" and cfg.algorithms[0].options == {"eps": 0.5}


@pytest.mark.parametrize("path", sorted(
    p for p in (REPO / "experiments").rglob("*.toml")
    if "scenarios" not in tomllib.loads(p.read_text())))
def test_every_shipped_config_round_trips_through_toml(path):
    cfg = load_config(path)
    assert from_dict(tomllib.loads(to_toml(cfg))) == cfg


def test_toml_writer_escapes_and_leaves_out_unset_values():
    cfg = validate(from_dict({"out_dir": 'a "b" \\ c\u00e9\t', "cohort_size": None,
                              "local": {"optimizer": {"sgd": 0.5, "adam": 0.5},
                                        "lr": {"sgd": 0.1, "adam": 1e-3}},
                              "algorithms": [{"name": "rnd", "label": None,
                                              "options": {"eps": 0.5, "probe_cap": None}}]}))
    text = to_toml(cfg)
    assert "cohort_size" not in text and "probe_cap" not in text and "label" not in text
    back = from_dict(tomllib.loads(text))
    assert back.out_dir == cfg.out_dir and back.local == cfg.local
    assert back.algorithms[0].options == {"eps": 0.5}


@pytest.mark.parametrize("overrides, match", [
    (["data.source_options.test_fraction=0"], r"data\.source_options\.test_fraction must be"),
    (['data.source_options.seed="x"'], r"data\.source_options\.seed = \"x\" must be an integer"),
    (["data.partition=quantity_skew", "data.partition_options.dist=zipf"],
     r"data\.partition_options.*dist must be"),
    (["data.partition=iid", "data.partition_options.sizes=[1, 2]"],
     r"data\.partition_options\.sizes must give one integer per client \(20\)"),
    (["data.partition_options.group_sizes=[1, 1]"],
     r"data\.partition_options\.group_sizes must sum to num_clients=20"),
    (["data.partition=feature_pattern", "data.partition_options.smooth=4"],
     r"data\.partition_options\.smooth must be an odd integer"),
    (["model.name=cnn", "model.options.kernel=0"], r"model\.options\.kernel must be"),
    (["model.name=resnet", "model.options.stages=[]"], r"model\.options\.stages must list"),
    (["local.schedule=step", "local.schedule_options.rounds=3"],
     r"local\.schedule_options\.rounds is not an option of local\.schedule = 'step'"),
    (["local.lr={sgd=\"fast\"}"], r"local\.lr = \{ sgd = \"fast\" \} must be"),
    (['algorithms=[{name="dfedavgm", options={momentum=1.5}}]'],
     r"algorithms\.0\.options\.momentum must be a number in \[0, 1\)"),
    (['algorithms=[{name="fedavg", options={server_lr="x"}}]'],
     r"algorithms\.0\.options\.server_lr = \"x\" must be a number"),
    (["eval_batch=-1"], "eval_batch must be >= 0"),
])
def test_values_are_checked_before_any_data_is_loaded(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(DEFAULT, overrides)
