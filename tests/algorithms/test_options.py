"""Declared options: one declaration per option feeds validation, ``fedrnd list`` and the docs."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pytest

from fedrnd.algorithms import ALGORITHMS, Algorithm, declared_options, make_algorithm, option
from fedrnd.algorithms._discovery import DiscoveryOptions, FederationOptions
from fedrnd.algorithms._options import check_options
from fedrnd.engine import Engine
from fedrnd.models import make_model

BUILT_IN = {n: c for n, c in ALGORITHMS.items() if c.__module__.startswith("fedrnd.algorithms")}
DATA = SimpleNamespace(num_clients=6, feature_shape=(4,))


def _engine():
    return Engine(make_model("logreg", (4,), 3))


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_every_option_of_every_built_in_method_is_declared_with_a_doc(name):
    opts = declared_options(BUILT_IN[name])
    assert opts, name
    for opt, (spec, _) in opts.items():
        assert spec is not None and len(spec.doc) > 5, f"{name}.{opt} has no declared doc"


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_defaults_pass_the_generic_check(name):
    check_options(BUILT_IN[name](engine=_engine()))


@pytest.mark.parametrize("name,options,message", [
    ("rnd", {"aggregation": "krum"},
     "rnd aggregation must be one of ['mean', 'median', 'trimmed_mean', 'clip'], got 'krum'"),
    ("rnd", {"trim": 0.5}, "rnd trim must be a number in [0, 0.5), got 0.5"),
    ("rnd", {"eps": -1.0}, "rnd eps must be a finite number >= 0 or 'auto', got -1.0"),
    ("rnd", {"input_pool": "half"}, "rnd input_pool must be an integer >= 1 or 'auto', got 'half'"),
    ("rnd", {"poison": "noise"}, "rnd poison must be one of [None, 'scale', 'sign_flip'], got "
                                 "'noise'"),
    ("rnd_dfl", {"max_hops": 1.5}, "rnd_dfl max_hops must be an integer >= 0 or None, got 1.5"),
    ("rnd_dfl", {"predictor_lr": 0.0}, "rnd_dfl predictor_lr must be a finite number > 0"),
    ("ifca", {"num_clusters": 2, "restarts": True}, "ifca restarts must be an integer >= 1, got "
                                                    "True"),
    ("ifca", {"num_clusters": 2, "weighting": "size"}, "ifca weighting must be one of "
                                                       "['samples', 'uniform'], got 'size'"),
    ("fedavg", {"server_opt": "lbfgs"}, "fedavg server_opt must be one of"),
    ("fedprox", {"prox_mu": -0.5}, "fedprox prox_mu must be a number >= 0, got -0.5"),
    ("fedavg", {"server_lr": "fast"}, "fedavg server_lr must be a finite number, got 'fast'"),
    ("dfedavgm", {"momentum": 1.0}, "dfedavgm momentum must be a number in [0, 1), got 1.0"),
    ("dfedavg", {"gossip_steps": 0}, "dfedavg gossip_steps must be an integer >= 1, got 0"),
    ("dpsgd", {"step_then_gossip": 1}, "dpsgd step_then_gossip must be true or false, got 1"),
    ("pacfl", {"keep_proximity": "yes"}, "pacfl keep_proximity must be true, false or None"),
    ("cfl", {"smoothing": float("nan")}, "cfl smoothing must be a number in [0, 1), got nan"),
    ("cfl", {"eps1": float("inf")}, "cfl eps1 must be a finite number > 0 or None, got inf"),
    ("disue", {"num_clusters": 2, "rnd_rule": "all"}, "disue rnd_rule must be one of "
                                                      "['mutual', 'one_sided', 'leader']"),
    ("ssdfl", {"link_prob": 0.0}, "ssdfl link_prob must be a number in (0, 1], got 0.0"),
    ("spark", {"soft_weight": 1.5}, "spark soft_weight must be a number in [0, 1], got 1.5"),
])
def test_generic_validation_names_method_option_allowed_values_and_value(name, options,
                                                                         message):
    alg = make_algorithm(name, _engine(), **options)
    with pytest.raises(ValueError) as err:
        alg.validate(DATA)
    assert str(err.value).startswith(message), str(err.value)


def test_numbers_of_any_kind_pass_where_allowed():
    # Integers in float options (TOML ``server_lr = 1``) and numpy scalars are numbers.
    check_options(make_algorithm("fedavg", _engine(), server_lr=1, prox_mu=np.float32(0.1)))
    check_options(make_algorithm("rnd", _engine(), tau=np.int64(3), input_pool=2, eps=0))


def test_a_subclass_that_changes_a_default_keeps_the_declaration():
    fedavg, fedprox = (declared_options(ALGORITHMS[n])["prox_mu"][0] for n in ("fedavg",
                                                                                "fedprox"))
    assert fedprox is fedavg and ALGORITHMS["fedprox"](engine=_engine()).prox_mu == 0.01
    assert declared_options(ALGORITHMS["spark"])["momentum"][0] is \
        declared_options(ALGORITHMS["ntk_dfl"])["momentum"][0]


def test_discovery_options_are_declared_once_for_every_method_that_discovers():
    shared = declared_options(DiscoveryOptions)
    for name in ("rnd", "rnd_dfl"):
        opts = declared_options(ALGORITHMS[name])
        for opt in DiscoveryOptions.discovery_options:
            assert opts[opt][0] is shared[opt][0], (name, opt)
    assert ALGORITHMS["rnd_dfl"](engine=_engine()).rnd_config.probe == "train"
    fed = declared_options(FederationOptions)
    disue = declared_options(ALGORITHMS["disue"])
    for mine, theirs in (("rnd_eps", "eps"), ("rnd_rule", "rule"), ("rnd_seed", "rnd_seed"),
                         ("rnd_predictor_steps", "predictor_steps"), ("rnd_network", "network")):
        assert disue[mine][0] is fed[theirs][0]
    cfg = make_algorithm("disue", _engine(), grouping="rnd", rnd_eps=0.5, rnd_rule="leader",
                         rnd_seed=3, rnd_predictor_steps=7, rnd_network="mlp").rnd_config
    assert (cfg.criterion, cfg.eps, cfg.rule, cfg.seed, cfg.steps, cfg.network) == (
        "eps", 0.5, "leader", 3, 7, "mlp")
    rnd = make_algorithm("rnd", _engine(), criterion="eps", alpha=0.1, candidates=5,
                         predictor_batch=32, input_pool=1).rnd_config
    assert (rnd.criterion, rnd.alpha, rnd.candidates, rnd.batch_size, rnd.input_pool) == (
        "eps", 0.1, 5, 32, 1)


def test_a_plug_in_declares_options_the_same_way():
    @dataclasses.dataclass(frozen=True)
    class Toy(Algorithm):
        name: ClassVar[str] = "toy_options"
        beta: float = option(0.9, low=0, high=1, high_open=True, doc="Momentum.")
        mode: str = option("a", choices=("a", "b"), doc="Mode.")
        plain: int = 3  # undeclared: no check, no doc

    Toy(engine=None, plain=-7).validate(DATA)
    with pytest.raises(ValueError, match=r"^toy_options mode must be one of \['a', 'b'\], got 'c'$"):
        Toy(engine=None, mode="c").validate(DATA)
    assert declared_options(Toy)["plain"][0] is None


def test_config_errors_name_the_option_path():
    from fedrnd.driver.config import load_config

    with pytest.raises(ValueError, match=r"^config: algorithms\.0\.options\.aggregation must be "
                                         r"one of \['mean'"):
        load_config(None, ['algorithms=[{name="rnd", options={aggregation="krum"}}]'])


def test_fedrnd_list_shows_option_docs(capsys):
    from fedrnd.cli.main import main

    assert main(["list"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "trim = 0.1: trimmed_mean: the share dropped at each end." in out
    assert "prox_mu = 0.0: Proximal weight mu of the local loss." in out
