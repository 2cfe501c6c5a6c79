"""Any optax optimizer or schedule by name (``optax:<name>``), gradient clipping for every kind,
and optimizers registered from Python: each equals the plain optax loop it stands for, and bad
names or keywords fail in the config check with the config path named."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedrnd
from fedrnd.driver.config import from_dict, validate
from fedrnd.driver.setup import build_engine
from fedrnd.engine import (
    ClientHParams,
    ClientOptimizer,
    Engine,
    LocalSpec,
    client_hparams,
    lowrank,
    lr_schedule,
    register_optimizer,
)
from fedrnd.engine.optim import REGISTERED_OPTIMIZERS, optax_optimizers
from fedrnd.models import make_model

LR = 0.05


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}


def _grads(params, t, scale=1.0):
    """A params-dependent gradient sequence (a quadratic pull plus fixed noise per step)."""
    rng = np.random.default_rng(100 + 7 * t)
    return jax.tree.map(
        lambda p: scale * (0.5 * p + jnp.asarray(rng.normal(size=p.shape), jnp.float32)), params)


def _run_reference(tx, params, steps, scale=1.0):
    state = tx.init(params)
    for t in range(steps):
        u, state = tx.update(_grads(params, t, scale), state, params)
        params = optax.apply_updates(params, u)
    return params


def _run_client(opt, kind, lr, params, steps, scale=1.0):
    update = jax.jit(opt.update)
    state = opt.init(params)
    for t in range(steps):
        u, state = update(_grads(params, t, scale), state, params, jnp.asarray(kind),
                          jnp.asarray(lr, jnp.float32))
        params = optax.apply_updates(params, u)
    return params


def _assert_trees(a, b, tol=1e-6):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=tol, atol=tol)


def _moved(a, b):
    return max(float(jnp.max(jnp.abs(u - v)))
               for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _cfg(**local):
    return validate(from_dict({"model": {"name": "mlp", "options": {"hidden": [6]}},
                               "data": {"num_clients": 8},
                               "local": {"batch_size": 4, "epochs": 2, **local}}))


@pytest.fixture(scope="module")
def data(make_federated):
    return make_federated([9, 4, 12, 7, 3, 12, 6, 10], dim=5, num_classes=3, seed=1)


@functools.partial(jax.jit, static_argnums=0)
def _train(engine, params, data, hp, key, ids):
    return engine.train(params, data, hp, key, jnp.asarray(0), ids=ids)


# ---- optax:<name> against the built-ins and plain optax --------------------------------------

def test_optax_adam_equals_builtin_adam():
    got = _run_client(ClientOptimizer(("optax:adam",)), 0, LR, _params(), 6)
    want = _run_client(ClientOptimizer(("adam",)), 0, LR, _params(), 6)
    _assert_trees(got, want)
    assert _moved(got, _params()) > 1e-2


def test_optax_adamw_with_options_equals_a_plain_optax_loop():
    opt = ClientOptimizer(("optax:adamw",), (), (("weight_decay", 0.1), ("b1", 0.8)))
    got = _run_client(opt, 0, LR, _params(), 6)
    want = _run_reference(optax.adamw(LR, weight_decay=0.1, b1=0.8), _params(), 6)
    _assert_trees(got, want)
    # The options reach the optimizer: the default weight decay gives another trajectory.
    plain = _run_client(ClientOptimizer(("optax:adamw",)), 0, LR, _params(), 6)
    assert _moved(got, plain) > 1e-4


def test_optax_options_shared_and_per_kind():
    opts = (("weight_decay", 0.05), ("optax:lion", {"b1": 0.8}))
    opt = ClientOptimizer(("optax:adamw", "optax:lion"), (), opts)
    hash(opt)  # static engine settings stay hashable with a nested table
    for i, tx in enumerate((optax.adamw(LR, weight_decay=0.05),
                            optax.lion(LR, weight_decay=0.05, b1=0.8))):
        _assert_trees(_run_client(opt, i, LR, _params(), 5), _run_reference(tx, _params(), 5))
    with pytest.raises(ValueError, match=r"\['b1'\] are not keywords of optax\.sgd"):
        ClientOptimizer(("optax:sgd",), (), (("optax:sgd", {"b1": 0.8}),))
    with pytest.raises(ValueError, match=r"tables for \['optax:adam'\]"):
        ClientOptimizer(("optax:sgd",), (), (("optax:adam", {"b1": 0.8}),))


def test_mix_of_sgd_and_optax_lion_equals_each_optimizer_run_alone(data):
    c, mix, lrs = 8, {"sgd": 0.5, "optax:lion": 0.5}, {"sgd": 0.2, "optax:lion": 0.01}
    model = make_model("mlp", (5,), 3, hidden=[6])
    spec = LocalSpec(batch_size=4, epochs=2)
    opt, hp = client_hparams(c, optimizer=mix, lr=lrs, seed=3)
    names = [opt.kinds[int(k)] for k in hp.kind]
    assert sorted(set(names)) == sorted(mix)
    params = model.init(jax.random.key(0))
    key = jax.random.key(1)
    got, _, _ = _train(Engine(model, spec, opt, path="general"), params, data, hp, key, None)
    alone = {k: Engine(model, spec, ClientOptimizer((k,)), path="general") for k in mix}
    for ci in range(c):
        hp_alone = ClientHParams(jnp.zeros(c, jnp.int32), jnp.full(c, lrs[names[ci]], jnp.float32),
                                 jnp.zeros(c, jnp.float32))
        want, _, _ = _train(alone[names[ci]], params, data, hp_alone, key, jnp.asarray([ci]))
        _assert_trees(jax.tree.map(lambda a, ci=ci: a[ci:ci + 1], got), want, tol=1e-5)
    # The lion clients are not sgd clients in disguise.
    ci = names.index("optax:lion")
    hp_sgd = ClientHParams(jnp.zeros(c, jnp.int32), jnp.full(c, 0.01, jnp.float32),
                           jnp.zeros(c, jnp.float32))
    sgd, _, _ = _train(alone["sgd"], params, data, hp_sgd, key, jnp.asarray([ci]))
    assert _moved(jax.tree.map(lambda a: a[ci:ci + 1], got), sgd) > 1e-4


def test_optax_optimizer_through_the_config(data):
    engine, hp, _ = build_engine(_cfg(optimizer={"sgd": 1, "optax:adamw": 1},
                                      lr={"sgd": 0.1, "optax:adamw": 0.01},
                                      optax_options={"weight_decay": 0.05}), data)
    assert engine.optimizer.kinds == ("sgd", "optax:adamw")
    assert dict(engine.optimizer.optax_options) == {"weight_decay": 0.05}
    np.testing.assert_allclose(np.asarray(hp.lr),
                               [0.1 if k == 0 else 0.01 for k in np.asarray(hp.kind)], rtol=1e-6)


# ---- gradient clipping ---------------------------------------------------------------------

def test_clip_norm_clips_the_gradient_of_every_kind():
    clip = 0.5
    params = _params()
    g = _grads(params, 0, scale=10.0)
    norm = float(optax.global_norm(g))
    assert norm > clip
    u, _ = ClientOptimizer(("sgd",), (("clip_norm", clip),)).update(
        g, (optax.EmptyState(),), params, jnp.asarray(0), jnp.asarray(LR))
    _assert_trees(u, jax.tree.map(lambda v: -LR * v * clip / norm, g))
    assert float(optax.global_norm(u)) == pytest.approx(LR * clip, rel=1e-5)
    # A built-in stateful kind and an optax kind: a clipped gradient, then the optimizer.
    for kind, tx in (("momentum", optax.sgd(LR, momentum=0.9)), ("optax:lion", optax.lion(LR))):
        got = _run_client(ClientOptimizer((kind,), (("clip_norm", clip),)), 0, LR, params, 5,
                          scale=10.0)
        want = _run_reference(optax.chain(optax.clip_by_global_norm(clip), tx), params, 5,
                              scale=10.0)
        _assert_trees(got, want)
    # Off (0) is no clipping at all.
    got = _run_client(ClientOptimizer(("sgd",), (("clip_norm", 0.0),)), 0, LR, params, 3, 10.0)
    _assert_trees(got, _run_reference(optax.sgd(LR), params, 3, scale=10.0))


def test_clip_norm_keeps_the_low_rank_path_away():
    model = make_model("mlp", (5,), 3, hidden=[6])
    assert lowrank.why_not(model, ClientOptimizer(("sgd",))) is None
    assert "clip_norm" in lowrank.why_not(model, ClientOptimizer(("sgd",), (("clip_norm", 1.0),)))


# ---- schedules -----------------------------------------------------------------------------

@pytest.mark.parametrize("name,kw", [
    ("cosine_decay_schedule", dict(init_value=1.0, decay_steps=10, alpha=0.1)),
    ("warmup_cosine_decay_schedule", dict(init_value=0.1, peak_value=1.0, warmup_steps=3,
                                          decay_steps=12, end_value=0.05)),
])
def test_optax_schedule_multipliers_equal_optax_values(name, kw, data):
    rounds = jnp.arange(15)
    got = np.asarray(jax.vmap(lr_schedule(f"optax:{name}", **kw))(rounds))
    want = np.asarray([getattr(optax, name)(**kw)(r) for r in range(15)])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # Through the config: the engine's lr multiplier at each round index.
    engine, _, _ = build_engine(_cfg(schedule=f"optax:{name}", schedule_options=kw), data)
    np.testing.assert_allclose([float(engine.lr_scale(jnp.asarray(r))) for r in range(15)],
                               want, rtol=1e-6, atol=1e-7)


# ---- register_optimizer --------------------------------------------------------------------

@pytest.fixture
def registered():
    names = []

    def register(name, factory, **kw):
        names.append(name)
        return register_optimizer(name, factory, **kw)

    yield register
    for n in names:
        REGISTERED_OPTIMIZERS.pop(n, None)


def test_register_optimizer_runs_end_to_end(registered, data):
    def scaled_sign(options):
        return optax.chain(optax.scale_by_sign(), optax.scale(options.get("sign_scale", 1.0)))

    assert registered("scaled_sign", scaled_sign, options=("sign_scale",)) is scaled_sign
    assert fedrnd.register_optimizer is register_optimizer
    cfg = _cfg(optimizer="scaled_sign", lr=0.05, optimizer_options={"sign_scale": 2.0})
    engine, hp, _ = build_engine(cfg, data)
    # scale 2 at lr 0.05 is optax's sign SGD at lr 0.1.
    ref, ref_hp, _ = build_engine(_cfg(optimizer="optax:sign_sgd", lr=0.1), data)
    params = engine.model.init(jax.random.key(0))
    key = jax.random.key(4)
    got, _, m = _train(engine, params, data, hp, key, None)
    want, _, _ = _train(ref, params, data, ref_hp, key, None)
    assert np.all(np.isfinite(np.asarray(m["loss"])))
    _assert_trees(got, want, tol=1e-6)
    assert _moved(jax.tree.map(lambda a: a[0], got), params) > 1e-2
    # A registered kind mixes with the others, and its options are checked by name.
    validate(from_dict({"local": {"optimizer": {"sgd": 1, "scaled_sign": 1},
                                  "lr": {"sgd": 0.1, "scaled_sign": 0.01}}}))
    with pytest.raises(ValueError, match=r"local\.optimizer_options\.sign_scal is not an "
                                         r"optimizer setting \(did you mean 'sign_scale'"):
        validate(from_dict({"local": {"optimizer": "scaled_sign",
                                      "optimizer_options": {"sign_scal": 2.0}}}))


def test_register_optimizer_refuses_clashes(registered):
    def ident(options):
        return optax.identity()

    with pytest.raises(ValueError, match="'adam' is built in"):
        registered("adam", ident)
    with pytest.raises(ValueError, match="letters, digits"):
        registered("optax:mine", ident)
    registered("mine", ident)
    with pytest.raises(ValueError, match="'mine' is already registered"):
        registered("mine", lambda options: optax.identity())
    registered("mine", ident)  # the same factory again is a no-op
    registered("mine", lambda options: optax.identity(), replace=True)


# ---- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("local,match", [
    (dict(optimizer="optax:adamx"),
     r"^config: local\.optimizer 'optax:adamx' is not an optax optimizer \(did you mean "
     r"'optax:adamax' or 'optax:adam'\?\); optax:<name> takes one of .*adamw"),
    (dict(optimizer={"sgd": 0.5, "optax:lino": 0.5}, lr=0.1),
     r"local\.optimizer 'optax:lino' .*did you mean 'optax:lion'"),
    (dict(optimizer="adamw"),
     r"local\.optimizer 'adamw' is unknown \(did you mean 'adam'\?\); allowed: .*optax:<name>"),
    (dict(optimizer="optax:adamw", optax_options={"weight_decy": 0.1}),
     r"^config: local\.optax_options\.weight_decy is not a keyword of optax\.adamw "
     r"\(local\.optimizer 'optax:adamw'\) \(did you mean 'weight_decay'\?\); allowed: b1, "),
    (dict(optimizer={"optax:adamw": 1, "optax:sgd": 1}, lr=0.1,
          optax_options={"weight_decay": 0.1}),
     r"local\.optax_options\.weight_decay is not a keyword of optax\.sgd .*give it to one "
     r"kind alone"),
    (dict(optimizer={"optax:adamw": 1, "optax:sgd": 1}, lr=0.1,
          optax_options={"optax:sgd": {"b1": 0.9}}),
     r"local\.optax_options\.\"optax:sgd\"\.b1 is not a keyword of optax\.sgd"),
    (dict(optimizer="optax:adamw", optax_options={"optax:lion": {"b1": 0.9}}),
     r"local\.optax_options\.\"optax:lion\" holds keywords of optax:lion, which "
     r"local\.optimizer does not use"),
    (dict(optimizer="adam", optax_options={"b1": 0.8}),
     r"local\.optax_options is set \(b1\) but no optax:<name> optimizer is used"),
    (dict(schedule="optax:cosine_decay"),
     r"^config: local\.schedule='optax:cosine_decay' is not an optax schedule \(did you mean "
     r"'optax:cosine_decay_schedule'"),
    (dict(schedule="optax:cosine_decay_schedule",
          schedule_options={"init_value": 1.0, "decay_steps": 10, "alfa": 0.1}),
     r"^config: local\.schedule_options\.alfa is not an option of local\.schedule = "
     r"'optax:cosine_decay_schedule' \(did you mean 'alpha'\?\)"),
    (dict(schedule="optax:cosine_decay_schedule", schedule_options={"init_value": 1.0}),
     r"local\.schedule_options\.decay_steps is required"),
    (dict(optimizer_options={"clip_nrom": 1.0}),
     r"local\.optimizer_options\.clip_nrom .*did you mean 'clip_norm'"),
])
def test_bad_optax_names_and_keywords_name_the_config_path(local, match):
    with pytest.raises(ValueError, match=match):
        validate(from_dict({"local": local}))


def test_engine_level_errors():
    with pytest.raises(ValueError, match=r"'optax:adamx' is not an optax optimizer"):
        ClientOptimizer(("optax:adamx",))
    with pytest.raises(ValueError, match=r"\['weight_decy'\] are not keywords of optax\.adamw"):
        ClientOptimizer(("optax:adamw",), (), (("weight_decy", 0.1),))
    with pytest.raises(ValueError, match=r"'optax:cosine' is not an optax schedule"):
        lr_schedule("optax:cosine")
    assert "adamw" in optax_optimizers() and "lbfgs" not in optax_optimizers()


def test_bad_optax_name_exits_2_on_the_command_line(tmp_path, capsys):
    from fedrnd.cli.main import main

    rc = main(["run", "experiments/default.toml", "--no-progress", "--out", str(tmp_path),
               "--set", "local.optimizer=optax:adamw", "--set", "local.optax_options.wd=0.1"])
    assert rc == 2
    assert "local.optax_options.wd is not a keyword of optax.adamw" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ---- one kind's own clipping and schedule, next to plain SGD --------------------------------

ADAMW = {"optimizer_options": {"optax:adamw": {"clip_norm": 0.5}},
         "optax_options": {"weight_decay": 0.05},
         "schedule": {"optax:adamw": "optax:cosine_decay_schedule"},
         "schedule_options": {"optax:adamw": {"init_value": 1.0, "decay_steps": 6,
                                              "alpha": 0.1}}}
"""AdamW with gradient clipping and a cosine schedule for its clients alone."""


def test_adamw_cosine_clipped_groups_and_sgd_groups_in_one_round_equal_each_group_alone(data):
    """A config gives even groups AdamW + cosine schedule + clipping and odd groups SGD; one
    jitted round of the mixed population gives every client the model that a run of its
    group's optimizer alone gives it, at every round index of the schedule."""
    mixed, hp, _ = build_engine(_cfg(optimizer=["optax:adamw", "sgd"],
                                     lr={"optax:adamw": 0.02, "sgd": 0.2}, **ADAMW), data)
    assert mixed.optimizer.clip_norms == (0.5, 0.0)
    adamw_alone, hp_a, _ = build_engine(_cfg(
        optimizer="optax:adamw", lr=0.02, optimizer_options={"clip_norm": 0.5},
        optax_options={"weight_decay": 0.05}, schedule="optax:cosine_decay_schedule",
        schedule_options=ADAMW["schedule_options"]["optax:adamw"]), data)
    sgd_alone, hp_s, _ = build_engine(_cfg(optimizer="sgd", lr=0.2), data)
    groups = np.asarray(data.group)
    assert set(groups) == {0, 1}
    np.testing.assert_array_equal(np.asarray(hp.kind), groups)  # group g runs entry g
    params = mixed.model.init(jax.random.key(0))
    key = jax.random.key(5)
    for r in (0, 4):
        got, _, _ = jax.jit(mixed.train)(params, data, hp, key, jnp.asarray(r))
        for engine, hp_alone, g in ((adamw_alone, hp_a, 0), (sgd_alone, hp_s, 1)):
            ids = jnp.asarray(np.flatnonzero(groups == g))
            want, _, _ = jax.jit(engine.train)(params, data, hp_alone, key, jnp.asarray(r),
                                               ids=ids)
            _assert_trees(jax.tree.map(lambda a, ids=ids: a[ids], got), want, tol=1e-5)
    # Each piece acts, on its group only: the schedule, the clipping, the kind itself.
    def start(engine, hp_, r, ids):
        out, _, _ = jax.jit(engine.train)(params, data, hp_, key, jnp.asarray(r), ids=ids)
        return out

    even, odd = (jnp.asarray(np.flatnonzero(groups == g)) for g in (0, 1))
    assert _moved(start(mixed, hp, 0, even), start(mixed, hp, 4, even)) > 1e-4
    _assert_trees(start(mixed, hp, 0, odd), start(mixed, hp, 4, odd))
    unclipped, hp_u, _ = build_engine(_cfg(optimizer=["optax:adamw", "sgd"],
                                           lr={"optax:adamw": 0.02, "sgd": 0.2},
                                           **{**ADAMW, "optimizer_options": {}}), data)
    assert _moved(start(mixed, hp, 0, even), start(unclipped, hp_u, 0, even)) > 1e-5
    _assert_trees(start(mixed, hp, 0, odd), start(unclipped, hp_u, 0, odd))
    sgd_too, _, _ = build_engine(_cfg(optimizer="sgd", lr=0.02), data)
    assert _moved(start(mixed, hp, 0, even), start(sgd_too, hp_u, 0, even)) > 1e-4


def test_fedavg_runs_the_mixed_config_end_to_end(tmp_path):
    """The same mix through ``simulate``: FedAvg trains and the per-kind tables round-trip
    through the config file the run writes."""
    from fedrnd.driver import simulate
    from fedrnd.driver.config import load_config, to_toml

    raw = {"name": "mix", "rounds": 3, "eval_every": 3, "checkpoint_every": 0,
           "progress": False,
           "data": {"source": "digits", "partition": "rotation", "num_clients": 6,
                    "partition_options": {"num_groups": 2}},
           "model": {"name": "mlp", "options": {"hidden": [8]}},
           "local": {"batch_size": 8, "epochs": 1, "optimizer": ["optax:adamw", "sgd"],
                     "lr": {"optax:adamw": 0.01, "sgd": 0.1}, **ADAMW},
           "algorithms": [{"name": "fedavg"}]}
    cfg = validate(from_dict(raw))
    path = tmp_path / "mix.toml"
    path.write_text(to_toml(cfg))
    again = load_config(path)
    assert again.local.schedule == ADAMW["schedule"]
    assert again.local.optimizer_options == ADAMW["optimizer_options"]
    res = simulate(again, run_dir=tmp_path / "run", verbose=False)
    final = res.methods["fedavg"].final
    # 3 rounds at small learning rates: well above chance (0.1), not yet converged.
    assert np.isfinite(final["train_loss/mean"]) and final["test_acc/mean"] > 0.2


@pytest.mark.parametrize("local,match", [
    ({"optimizer": "sgd", "optimizer_options": {"optax:adamw": {"clip_norm": 1.0}}},
     r"local\.optimizer_options\.\"optax:adamw\" holds settings of 'optax:adamw', which "
     r"local\.optimizer does not use"),
    ({"optimizer": "sgd", "optimizer_options": {"sgd": {"clip_nrom": 1.0}}},
     r"local\.optimizer_options\.\"sgd\"\.clip_nrom is not an optimizer setting \(did you "
     r"mean 'clip_norm'"),
    ({"optimizer": "sgd", "schedule": {"adam": "cosine"}},
     r"local\.schedule\.\"adam\" names an optimizer kind that local\.optimizer does not use"),
    ({"optimizer": "sgd", "schedule": {"sgd": "optax:cosine_decay_schedule"},
      "schedule_options": {"init_value": 1.0}},
     r"local\.schedule is a table per kind, so local\.schedule_options holds a table"),
    ({"optimizer": "sgd", "schedule": {"sgd": "optax:cosine_decay_schedul"}},
     r"local\.schedule\.\"sgd\"='optax:cosine_decay_schedul' is not an optax schedule"),
    ({"optimizer": "sgd", "schedule": {"sgd": "optax:cosine_decay_schedule"},
      "schedule_options": {"sgd": {"init_value": 1.0, "decay_step": 3}}},
     r"local\.schedule_options\.\"sgd\"\.decay_step"),
    ({"optimizer": "sgd", "schedule_options": {"sgd": {"rounds": 3}}},
     r"local\.schedule_options has tables \['sgd'\], which are for a schedule per kind"),
])
def test_bad_per_kind_tables_name_the_config_path(local, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**local)
