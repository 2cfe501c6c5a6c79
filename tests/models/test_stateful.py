"""Models with dropout, BatchNorm state and flax NNX modules: how local training, evaluation,
aggregation and the low-rank fast path treat them (``Model.train_apply``, ``Model.stateful``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from fedrnd.engine import ClientMapper, Engine, LocalSpec, client_hparams, evaluate_clients, lowrank
from fedrnd.models import MLP, from_flax, from_nnx, make_model
from fedrnd.models._core import MODELS, register_model
from tests.conftest import gaussian_federated

K = 3


class DropCNN(nn.Module):
    """A small CNN with dropout before its dense layer."""

    num_classes: int
    rate: float = 0.3

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = nn.Dropout(self.rate, deterministic=not train)(x.reshape(x.shape[0], -1))
        return nn.Dense(self.num_classes)(x)


class PlainCNN(nn.Module):
    """``DropCNN`` without dropout (same parameter names) and without a ``train`` argument."""

    num_classes: int

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


class Probe(nn.Module):
    """Logits ``[z, -z]`` with ``z = dropout(ones) . w``, ``w`` starting at 0: one SGD step
    moves ``w`` exactly on the units its dropout mask kept (one mask for the whole batch)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        w = self.param("w", nn.initializers.zeros, (64,))
        h = nn.Dropout(0.5, broadcast_dims=(0,), deterministic=not train)(
            jnp.ones((x.shape[0], 64)))
        z = h @ w
        return jnp.stack([z, -z], -1)


class DropMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(6)(x))
        return nn.Dense(K)(nn.Dropout(0.5, deterministic=not train)(x))


class BNNet(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(8)(x.reshape(x.shape[0], -1))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
        return nn.Dense(self.num_classes)(nn.relu(x))


class NNXMLP(nnx.Module):
    """An NNX MLP ``din-hidden-classes``, optionally with BatchNorm and dropout."""

    def __init__(self, din, hidden, num_classes, *, rngs, dropout=0.0, batchnorm=False):
        self.l0 = nnx.Linear(din, hidden, rngs=rngs)
        self.bn = nnx.BatchNorm(hidden, rngs=rngs) if batchnorm else None
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.l1 = nnx.Linear(hidden, num_classes, rngs=rngs)

    def __call__(self, x):
        h = self.l0(x.reshape(x.shape[0], -1))
        if self.bn is not None:
            h = self.bn(h)
        return self.l1(self.drop(nnx.relu(h)))


def images(counts, **kw):
    data = gaussian_federated(counts, dim=16, num_classes=K, **kw)
    return data.replace(x=data.x.reshape(-1, 4, 4, 1))


def sgd(c, lr=0.1):
    return client_hparams(c, optimizer="sgd", lr=lr)


def fedavg(engine, data, hp, rounds, params):
    losses = []
    for r in range(rounds):
        s, n, m = engine.train_sum(params, data, hp, jax.random.key(r), jnp.int32(r))
        params = jax.tree.map(lambda a, n=n: a / n, s)
        losses.append(float(m["loss"] / n))
    return params, losses


# ------------------------------------------------------------------------------------------
# Dropout
# ------------------------------------------------------------------------------------------
def test_train_argument_and_state_are_detected_when_wrapping():
    plain = from_flax(PlainCNN(K), (4, 4, 1), K)
    drop = from_flax(DropCNN(K), (4, 4, 1), K)
    bn = from_flax(BNNet(K), (4,), K)
    assert plain.plain and plain.train_apply is None and not plain.stateful
    assert not drop.plain and drop.train_apply is not None and not drop.stateful
    assert bn.stateful and set(bn.init(jax.random.key(0))) == {"params", "batch_stats"}
    # Built-ins are untouched: their tree is still the bare weights.
    assert make_model("mlp", (4,), K, hidden=[5]).plain


def test_dropout_cnn_trains_and_its_loss_falls():
    data = images([24, 30, 18, 26])
    model = from_flax(DropCNN(K, 0.3), (4, 4, 1), K)
    opt, hp = sgd(data.num_clients, lr=0.2)
    engine = Engine(model, LocalSpec(batch_size=8, epochs=1), opt)
    params, losses = fedavg(engine, data, hp, 8, model.init(jax.random.key(0)))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses
    # Evaluation is deterministic (train=False): the same scores twice.
    slots = jax.tree.map(lambda a: a[None], params)
    assign = jnp.zeros(data.num_clients, jnp.int32)
    a = evaluate_clients(model.apply, slots, assign, data)
    b = evaluate_clients(model.apply, slots, assign, data)
    np.testing.assert_array_equal(np.asarray(a["test_loss"]), np.asarray(b["test_loss"]))


def test_dropout_rate_zero_equals_the_model_without_dropout():
    data = images([9, 14, 5, 11])
    opt, hp = client_hparams(data.num_clients, optimizer={"sgd": 0.5, "adam": 0.5},
                             lr={"sgd": 0.2, "adam": 0.01}, seed=1)
    out = []
    for module in (DropCNN(K, 0.0), PlainCNN(K)):
        model = from_flax(module, (4, 4, 1), K)
        engine = Engine(model, LocalSpec(batch_size=4, epochs=2), opt)
        p0 = model.init(jax.random.key(0))
        out.append(jax.jit(lambda p, e=engine: e.train(p, data, hp, jax.random.key(3),
                                                       jnp.int32(0)))(p0))
    for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(out[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _probe_masks(steps, chunk):
    """The dropout mask of every client's last local step (where that step moved ``w``)."""
    data = gaussian_federated([6, 6, 6, 6, 6], dim=4, num_classes=1)  # all labels 0
    model = from_flax(Probe(), (4,), 2)
    opt, hp = sgd(data.num_clients, lr=1.0)
    engine = Engine(model, LocalSpec(batch_size=4, steps=steps), opt,
                    ClientMapper(chunk_size=chunk))
    w, _, _ = engine.train(model.init(jax.random.key(0)), data, hp, jax.random.key(7),
                           jnp.int32(0))
    return np.asarray(w["w"])


def test_dropout_masks_differ_across_clients_and_steps_but_not_with_chunking():
    w1 = _probe_masks(1, 0)
    w2 = _probe_masks(2, 0)
    mask1 = w1 != 0
    mask2 = (w2 - w1) != 0
    assert 10 < mask1[0].sum() < 54  # about half the units kept
    # Clients have the same data and start: only their dropout keys differ.
    assert all(not np.array_equal(mask1[0], mask1[c]) for c in range(1, 5))
    assert all(not np.array_equal(mask1[c], mask2[c]) for c in range(5))
    for chunk in (1, 2, 3):
        np.testing.assert_array_equal(_probe_masks(2, chunk) != 0, w2 != 0)
        np.testing.assert_allclose(_probe_masks(2, chunk), w2, rtol=1e-6)


# ------------------------------------------------------------------------------------------
# BatchNorm state
# ------------------------------------------------------------------------------------------
def test_batchnorm_stats_come_from_the_forward_pass_not_from_gradients():
    data = gaussian_federated([7, 7], dim=4, num_classes=K)
    model = from_flax(BNNet(K), (4,), K)
    # Weight decay would move every leaf it sees: it must not reach the statistics.
    opt, hp = client_hparams(data.num_clients, optimizer="optax:adamw", lr=0.5)
    engine = Engine(model, LocalSpec(batch_size=7, steps=1), opt)
    p0 = model.init(jax.random.key(0))
    p, _, _ = engine.train(p0, data, hp, jax.random.key(1), jnp.int32(0))
    for c in range(2):
        rows = np.asarray(data.train_idx[c, :7])
        _, want = BNNet(K).apply(p0, data.x[rows], train=True, mutable=["batch_stats"])
        got = jax.tree.map(lambda a, c=c: a[c], p["batch_stats"])
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want["batch_stats"]), strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
        # ... and they did change, as did the weights.
        assert not np.allclose(np.asarray(got["BatchNorm_0"]["mean"]),
                               np.asarray(p0["batch_stats"]["BatchNorm_0"]["mean"]))
    assert not np.allclose(np.asarray(p["params"]["Dense_0"]["kernel"][0]),
                           np.asarray(p0["params"]["Dense_0"]["kernel"]))
    # The loss is differentiated with respect to the weights only.
    tl = engine.train_loss
    trainable, state = model.split(p0)
    x, y = data.x[:7], data.y[:7]
    g = jax.grad(lambda q: tl.fn(q, state, x, y, jnp.ones(7), jax.random.key(0))[0])(trainable)
    assert jax.tree.structure(g) == jax.tree.structure(trainable)


def test_batchnorm_is_frozen_in_evaluation():
    model = from_flax(BNNet(K), (4,), K)
    p = model.init(jax.random.key(0))
    p = {**p, "batch_stats": jax.tree.map(lambda a: a + 0.7, p["batch_stats"])}
    x = jax.random.normal(jax.random.key(1), (6, 4))
    out = model.apply(p, x)
    # Running statistics, not the batch's: one example scores the same alone or in a batch.
    np.testing.assert_allclose(np.asarray(model.apply(p, x[:1])), np.asarray(out[:1]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out),
                               np.asarray(BNNet(K).apply(p, x, train=False)), rtol=1e-6)
    assert not np.allclose(np.asarray(model.apply(model.init(jax.random.key(0)), x)),
                           np.asarray(out))


def test_fedavg_averages_batchnorm_stats_with_the_weights():
    data = gaussian_federated([5, 9, 3, 7], dim=4, num_classes=K)
    model = from_flax(BNNet(K), (4,), K)
    opt, hp = sgd(data.num_clients)
    engine = Engine(model, LocalSpec(batch_size=4, epochs=1), opt, ClientMapper(chunk_size=3))
    p0 = model.init(jax.random.key(0))
    per, _, _ = engine.train(p0, data, hp, jax.random.key(2), jnp.int32(0))
    s, n, _ = engine.train_sum(p0, data, hp, jax.random.key(2), jnp.int32(0))
    w = np.asarray(data.train_count, np.float64)
    assert set(s) == {"params", "batch_stats"}
    for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(per), strict=True):
        np.testing.assert_allclose(np.asarray(a) / float(n),
                                   np.tensordot(w, np.asarray(b, np.float64), 1) / w.sum(),
                                   rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# The low-rank fast path refuses them
# ------------------------------------------------------------------------------------------
def test_lowrank_path_refuses_dropout_and_state():
    dense = make_model("mlp", (4,), K, hidden=[6]).dense  # the same layer names
    data = gaussian_federated([5, 9, 3], dim=4, num_classes=K)
    opt, _ = sgd(3)
    for model in (from_flax(DropMLP(), (4,), K, dense=dense), from_flax(BNNet(K), (4,), K)):
        assert "dropout or state" in lowrank.why_not(model, opt)
        with pytest.raises(ValueError, match="dropout or state"):
            Engine(model, LocalSpec(), opt, path="lowrank")
        assert not Engine(model, LocalSpec(), opt).use_lowrank(data)
    with pytest.raises(ValueError, match="custom loss"):
        Engine(from_flax(BNNet(K), (4,), K), LocalSpec(), opt, loss=lambda p, x, y, m: 0.0)


@pytest.mark.parametrize("name", ["disue", "ntk_dfl"])
def test_methods_that_differentiate_apply_refuse_stateful_models(name):
    """DisUE, NTK-DFL and IFCA's gradient averaging; IFCA's model averaging is fine."""
    from fedrnd.algorithms import make_algorithm

    data = gaussian_federated([5, 9, 3, 7], dim=4, num_classes=K)
    opt, _ = sgd(4)
    for model in (from_flax(BNNet(K), (4,), K), from_flax(DropMLP(), (4,), K)):
        with pytest.raises(ValueError, match="dropout or state"):
            make_algorithm(name, Engine(model, LocalSpec(), opt)).validate(data)
    with pytest.raises(ValueError, match="dropout or state"):
        make_algorithm("ifca", Engine(model, LocalSpec(), opt), num_clusters=2,
                       averaging="gradient").validate(data)
    make_algorithm("ifca", Engine(model, LocalSpec(), opt), num_clusters=2).validate(data)


# ------------------------------------------------------------------------------------------
# Flax NNX
# ------------------------------------------------------------------------------------------
def test_nnx_mlp_matches_the_linen_mlp_with_the_same_weights():
    lin = make_model("mlp", (4,), K, hidden=[6])
    lp = lin.init(jax.random.key(0))
    model = from_nnx(NNXMLP(4, 6, K, rngs=nnx.Rngs(0), dropout=0.0), (4,), K)
    assert not model.stateful and model.train_apply is not None  # it holds dropout rngs
    tree = {"l0": lp["Dense_0"], "l1": lp["Dense_1"]}
    assert jax.tree.structure(model.init(jax.random.key(5))) == jax.tree.structure(tree)
    x = jax.random.normal(jax.random.key(1), (5, 4))
    want = np.asarray(MLP(K, (6,)).apply({"params": lp}, x))
    np.testing.assert_allclose(np.asarray(model.apply(tree, x)), want, rtol=1e-6)
    logits, state = model.train_apply(tree, x, jax.random.key(2))
    np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-6)
    assert state is None


def test_nnx_factory_init_depends_on_the_key_and_state_is_kept():
    model = from_nnx(lambda rngs: NNXMLP(4, 6, K, rngs=rngs, dropout=0.5, batchnorm=True),
                     (4,), K, "nnx")
    a, b = model.init(jax.random.key(0)), model.init(jax.random.key(1))
    assert model.stateful and set(a) == {"params", "state"}
    assert not np.allclose(np.asarray(a["params"]["l0"]["kernel"]),
                           np.asarray(b["params"]["l0"]["kernel"]))
    x = jax.random.normal(jax.random.key(1), (8, 4))
    # Training: dropout varies with the key, the statistics move; evaluation is fixed.
    l1, s1 = model.train_apply(a, x, jax.random.key(3))
    l2, _ = model.train_apply(a, x, jax.random.key(4))
    assert not np.allclose(np.asarray(l1), np.asarray(l2))
    assert not np.allclose(np.asarray(s1["state"]["bn"]["mean"]),
                           np.asarray(a["state"]["bn"]["mean"]))
    np.testing.assert_array_equal(np.asarray(model.apply(a, x)), np.asarray(model.apply(a, x)))
    np.testing.assert_allclose(np.asarray(model.apply(a, x[:2])),
                               np.asarray(model.apply(a, x)[:2]), rtol=1e-5)


def nnx_mlp(num_classes, hidden=16, dropout=0.1, batchnorm=True, *, feature_shape, rngs):
    """An NNX MLP for the registry tests."""
    return NNXMLP(int(np.prod(feature_shape)), hidden, num_classes, rngs=rngs, dropout=dropout,
                  batchnorm=batchnorm)


@pytest.fixture
def registered_nnx():
    register_model("nnx_mlp_test", nnx_mlp)
    yield "nnx_mlp_test"
    MODELS.pop("nnx_mlp_test", None)


def test_nnx_model_by_name_trains_through_simulate(tmp_path, registered_nnx):
    from fedrnd.driver import load_config, simulate
    from fedrnd.driver.config import model_parameters

    assert set(model_parameters(registered_nnx)) == {"hidden", "dropout", "batchnorm"}
    (tmp_path / "c.toml").write_text(f"""
name = "nnx"
rounds = 4
eval_every = 2
checkpoint_every = 2
progress = false

[data]
source = "digits"
partition = "iid"
num_clients = 6

[model]
name = "{registered_nnx}"
options = {{ hidden = 16, dropout = 0.1 }}

[local]
batch_size = 16
epochs = 1
optimizer = "sgd"
lr = 0.1

[[algorithms]]
name = "fedavg"

[[algorithms]]
name = "fedavg"
label = "fedbn"
options = {{ batchnorm = "local" }}
""")
    cfg = load_config(tmp_path / "c.toml")
    res = simulate(cfg, run_dir=tmp_path / "run", verbose=False)
    state = res.methods["fedavg"].state["params"]
    assert set(state) == {"params", "state"}
    assert not np.allclose(np.asarray(state["state"]["bn"]["mean"]), 0.0)
    for tag in ("fedavg", "fedbn"):
        acc = float(res.methods[tag].final["test_acc/mean"])
        assert acc > 0.3, (tag, acc)
    assert {x.shape[0] for x in res.methods["fedbn"].state["clients"]["batchnorm"]} == {6}
    # The state (each client's BatchNorm layers too) checkpoints and resumes with the weights.
    simulate(load_config(tmp_path / "c.toml", ["rounds=2"]), run_dir=tmp_path / "cut",
             verbose=False)
    resumed = simulate(cfg, run_dir=tmp_path / "cut", resume=True, allow_change=["rounds"],
                       verbose=False)
    for tag in ("fedavg", "fedbn"):
        for a, b in zip(jax.tree.leaves(res.methods[tag].state),
                        jax.tree.leaves(resumed.methods[tag].state), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="not an option"):
        simulate(load_config(tmp_path / "c.toml", ["model.options.width=3"]),
                 run_dir=tmp_path / "bad", verbose=False)


# ------------------------------------------------------------------------------------------
# BatchNorm kept local (FedBN), and an NNX model under FedAvg, FedBN and RND
# ------------------------------------------------------------------------------------------
EXAMPLES = __import__("pathlib").Path(__file__).resolve().parents[2] / "examples" / "plugins"


@pytest.fixture
def fedbn():
    """The example plug-ins (FedBN, the NNX MLP with BatchNorm and dropout), registered for
    one test and removed after it."""
    import sys

    from fedrnd.algorithms import ALGORITHMS
    from fedrnd.driver import plugins

    files = [str(EXAMPLES / "my_fedbn.py"), str(EXAMPLES / "my_nnx_mlp.py")]
    modules = [plugins.load_plugin(f) for f in files]
    yield modules[0].FedBN
    ALGORITHMS.pop("fedbn", None)
    MODELS.pop("nnx_bn_mlp", None)
    for f, module in zip(files, modules, strict=True):
        plugins._LOADED.pop(plugins.resolve(f), None)
        plugins._ORIGIN.pop(module.__name__, None)
        sys.modules.pop(module.__name__, None)


def test_local_layers_are_the_batchnorm_state_scale_and_bias():
    lin = from_flax(BNNet(K), (4,), K)
    mask = lin.local_layers(lin.init(jax.random.key(0)))
    assert mask["batch_stats"] == {"BatchNorm_0": {"mean": True, "var": True}}
    assert mask["params"]["BatchNorm_0"] == {"bias": True, "scale": True}
    assert not any(jax.tree.leaves({k: v for k, v in mask["params"].items()
                                    if k != "BatchNorm_0"}))
    nx = from_nnx(lambda rngs: NNXMLP(4, 6, K, rngs=rngs, dropout=0.5, batchnorm=True), (4,), K)
    mask = nx.local_layers(nx.init(jax.random.key(0)))
    assert mask["state"] == {"bn": {"mean": True, "var": True}}
    assert mask["params"]["bn"] == {"bias": True, "scale": True}
    assert not any(jax.tree.leaves([mask["params"]["l0"], mask["params"]["l1"]]))
    plain = make_model("mlp", (4,), K, hidden=[6])
    assert not any(jax.tree.leaves(plain.local_layers(plain.init(jax.random.key(0)))))


def _fedbn_reference_round(engine, data, hp, local, shared, mine, w, key, r):
    """One FedBN round by hand: every client starts from the shared leaves and its own
    BatchNorm leaves (``local`` marks them), trains with the engine, and the server averages
    the trained models by sample count in float64. Returns ``(per-client models, mean)``."""
    start = jax.tree.map(lambda keep, s, c: c if keep else jnp.broadcast_to(s, c.shape),
                         local, shared, mine)
    want, _, _ = engine.train(shared, data, hp, jax.random.split(key)[1], jnp.int32(r),
                              client_params=start)
    return want, jax.tree.map(
        lambda a: np.tensordot(w, np.asarray(a, np.float64), 1) / w.sum(), want)


def test_fedbn_averages_the_shared_weights_and_keeps_each_clients_batchnorm(fedbn):
    """Two FedBN rounds against a per-client reference: each client starts from the shared
    weights and its own BatchNorm layers of the round before; the server's shared weights are
    the sample-weighted mean; a client's BatchNorm layers are those it trained."""
    data = gaussian_federated([5, 9, 3, 7], dim=4, num_classes=K, sep=2.0)
    model = from_nnx(lambda rngs: NNXMLP(4, 6, K, rngs=rngs, dropout=0.3, batchnorm=True),
                     (4,), K)
    opt, hp = sgd(data.num_clients)
    engine = Engine(model, LocalSpec(batch_size=4, epochs=1), opt, ClientMapper(chunk_size=3))
    alg = fedbn(engine)
    state = alg.init(jax.random.key(0), data, hp)
    local = model.local_layers(state["params"])
    w = np.asarray(data.train_count, np.float64)
    mine = jax.tree.map(lambda p: jnp.broadcast_to(p, (4, *p.shape)), state["params"])
    shared = state["params"]
    for r in range(2):
        key = jax.random.key(10 + r)
        state, m = jax.jit(alg.round)(state, data, key)
        mine, shared = _fedbn_reference_round(engine, data, hp, local, shared, mine, w, key, r)
        for a, b in zip(jax.tree.leaves(state["clients"]["model"]), jax.tree.leaves(mine),
                        strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(shared), strict=True):
            np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6)
    # Evaluated per client: shared weights equal across clients, statistics their own.
    per, assign = alg.models(state)
    assert assign is None
    l0 = np.asarray(per["params"]["l0"]["kernel"])
    np.testing.assert_allclose(l0, np.broadcast_to(l0[0], l0.shape))
    stats = np.asarray(per["state"]["bn"]["mean"])
    assert min(np.abs(stats[i] - stats[j]).max() for i in range(4) for j in range(i)) > 1e-4
    assert float(m["up/model"][0]) < float(jax.tree.reduce(
        lambda a, b: a + b, jax.tree.map(lambda x: x.nbytes, state["params"])))


def _nnx_bn_setup(chunk=3):
    data = gaussian_federated([5, 9, 3, 7], dim=4, num_classes=K, sep=2.0)
    model = from_nnx(lambda rngs: NNXMLP(4, 6, K, rngs=rngs, dropout=0.3, batchnorm=True),
                     (4,), K)
    opt, hp = sgd(data.num_clients)
    engine = Engine(model, LocalSpec(batch_size=4, epochs=1), opt, ClientMapper(chunk_size=chunk))
    return data, model, engine, hp


def _fedavg_round_before_the_batchnorm_option(alg, state, data, key):
    """``FedAvg.round`` as it was before ``batchnorm`` became an option, verbatim."""
    import optax

    from fedrnd.engine import comm, per_client, tree_bytes

    k_cohort, k_train = jax.random.split(key)
    ids, part = alg.cohort(k_cohort, data.num_clients)
    params = state["params"]
    wsum, n, m = alg.engine.train_sum(params, data, state["clients"]["hp"], k_train,
                                      state["round"], ids=ids,
                                      prox_mu=alg.prox_mu if alg.prox_mu else None)
    pseudo_grad = jax.tree.map(lambda p, s: p - s / n, params, wsum)
    updates, opt = alg._server.update(pseudo_grad, state["server_opt"], params)
    new_params = optax.apply_updates(params, updates)
    nbytes = tree_bytes(params)
    metrics = {"train_loss": m["loss"] / n, "local_steps": m["steps"],
               **comm(up_model=per_client(nbytes, part), down_model=per_client(nbytes, part))}
    state = {**state, "round": state["round"] + 1, "params": new_params, "server_opt": opt}
    return state, metrics


@pytest.mark.parametrize("server_opt", ["sgd", "adam"])
def test_fedavg_batchnorm_average_gives_the_bits_of_fedavg_before_the_option(server_opt):
    from fedrnd.algorithms import FedAvg

    data, _, engine, hp = _nnx_bn_setup()
    alg = FedAvg(engine, cohort_size=3, server_opt=server_opt, server_lr=0.5)
    assert alg.batchnorm == "average"
    state = alg.init(jax.random.key(0), data, hp)
    assert set(state["clients"]) == {"hp"}  # nothing per client but the hyper-parameters
    old = state
    for r in range(2):
        key = jax.random.key(10 + r)
        state, m = jax.jit(alg.round)(state, data, key)
        old, m_old = jax.jit(lambda s, d, k: _fedavg_round_before_the_batchnorm_option(
            alg, s, d, k))(old, data, key)
        assert jax.tree.structure(state) == jax.tree.structure(old)
        for a, b in zip(jax.tree.leaves((state, m)), jax.tree.leaves((old, m_old)),
                        strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fedavg_batchnorm_local_is_fedbn_against_a_per_client_reference_and_the_plugin(fedbn):
    """``batchnorm = "local"``, two rounds against a per-client reference: each client starts
    from the shared weights and its own BatchNorm layers of the round before; the server's
    weights are the sample-weighted mean; a client keeps the BatchNorm layers it trained; only
    the shared weights are counted as sent. The example plug-in FedBN gives the same models."""
    from fedrnd.algorithms import FedAvg
    from fedrnd.engine import local_leaves, shared_leaves

    data, model, engine, hp = _nnx_bn_setup()
    alg = FedAvg(engine, batchnorm="local")
    alg.validate(data)
    state = alg.init(jax.random.key(0), data, hp)
    plugin = fedbn(engine)
    pstate = plugin.init(jax.random.key(0), data, hp)
    local = model.local_layers(state["params"])
    assert [x.shape for x in state["clients"]["batchnorm"]] == [
        (4, *x.shape) for x in local_leaves(state["params"], local)]
    w = np.asarray(data.train_count, np.float64)
    mine = jax.tree.map(lambda p: jnp.broadcast_to(p, (4, *p.shape)), state["params"])
    shared = state["params"]
    for r in range(2):
        key = jax.random.key(10 + r)
        state, m = jax.jit(alg.round)(state, data, key)
        pstate, _ = jax.jit(plugin.round)(pstate, data, key)
        mine, shared = _fedbn_reference_round(engine, data, hp, local, shared, mine, w, key, r)
        for a, b in zip(state["clients"]["batchnorm"], local_leaves(mine, local), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(shared), strict=True):
            np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6)
    per, assign = alg.models(state)
    assert assign is None
    for a, b in zip(jax.tree.leaves(per), jax.tree.leaves(plugin.models(pstate)[0]),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # Evaluated per client: the shared weights equal across clients, BatchNorm their own.
    for x in shared_leaves(per, local):
        np.testing.assert_array_equal(np.asarray(x), np.broadcast_to(x[0], x.shape))
    for x in local_leaves(per, local):
        x = np.asarray(x)
        assert min(np.abs(x[i] - x[j]).max() for i in range(4) for j in range(i)) > 1e-5
    sent = sum(x.nbytes for x in shared_leaves(state["params"], local))
    np.testing.assert_array_equal(np.asarray(m["up/model"]), sent)
    np.testing.assert_array_equal(np.asarray(m["down/model"]), sent)
    assert sent < sum(x.nbytes for x in jax.tree.leaves(state["params"]))
    scores = evaluate_clients(model.apply, per, assign, data, engine.mapper)
    assert scores["test_acc"].shape == (4,)


def test_fedprox_batchnorm_local_leaves_clients_outside_the_cohort_untouched():
    from fedrnd.algorithms import FedProx

    data, _, engine, hp = _nnx_bn_setup()
    alg = FedProx(engine, batchnorm="local", cohort_size=2)
    state = alg.init(jax.random.key(0), data, hp)
    before = [np.asarray(x) for x in state["clients"]["batchnorm"]]
    ids, _ = alg.cohort(jax.random.split(jax.random.key(5))[0], data.num_clients)
    state, m = jax.jit(alg.round)(state, data, jax.random.key(5))
    out = np.setdiff1d(np.arange(4), np.asarray(ids))
    after = [np.asarray(x) for x in state["clients"]["batchnorm"]]
    for a, b in zip(after, before, strict=True):
        np.testing.assert_array_equal(a[out], b[out])
    for a, b in zip(after, before, strict=True):  # the cohort's own, trained
        assert np.abs(a[ids] - b[ids]).max() > 0
    assert np.asarray(m["up/model"])[out].sum() == 0 < np.asarray(m["up/model"])[ids].min()


def test_nnx_batchnorm_dropout_model_trains_under_fedavg_fedbn_and_rnd(tmp_path, fedbn):
    """An NNX model with BatchNorm and dropout on two hidden groups (one rotated): FedAvg
    (statistics averaged), FedAvg with ``batchnorm = "local"`` and the FedBN plug-in (kept
    local) and RND-clustered FedAvg (averaged within each federation found) all learn; RND
    finds the two groups and keeps statistics per federation."""
    from fedrnd.driver import simulate
    from fedrnd.driver.config import from_dict, validate

    raw = {"name": "nnx_bn", "rounds": 6, "eval_every": 3, "checkpoint_every": 0,
           "progress": False,
           "data": {"source": "digits", "partition": "rotation", "num_clients": 8,
                    "partition_options": {"num_groups": 2}},
           "model": {"name": "nnx_bn_mlp", "options": {"hidden": 16, "dropout": 0.1}},
           "local": {"batch_size": 16, "epochs": 1, "lr": 0.1},
           "algorithms": [{"name": "fedavg"}, {"name": "fedbn"},
                          {"name": "fedavg", "label": "fedavg_bn_local",
                           "options": {"batchnorm": "local"}},
                          {"name": "rnd", "options": {"predictor_steps": 100,
                                                      "predictor_batch": 32}}]}
    res = simulate(validate(from_dict(raw)), run_dir=tmp_path / "run", verbose=False)
    acc = {k: float(m.final["test_acc/mean"]) for k, m in res.methods.items()}
    assert min(acc.values()) > 0.5, acc  # 10 classes: chance is 0.1
    rnd = res.methods["rnd"]
    assert rnd.final["clusters"] == 2 and rnd.final["ari"] == 1.0
    slots = rnd.state["slots"]["state"]["bn"]["mean"]
    assert slots.shape[0] == 2 and np.abs(np.asarray(slots[0] - slots[1])).max() > 1e-3
    fedavg_stats = res.methods["fedavg"].state["params"]["state"]["bn"]["mean"]
    assert fedavg_stats.ndim == 1 and not np.allclose(np.asarray(fedavg_stats), 0.0)
    assert res.methods["fedbn"].state["clients"]["model"]["state"]["bn"]["mean"].shape[0] == 8
    assert {x.shape[0] for x in res.methods["fedavg_bn_local"].state["clients"]["batchnorm"]} \
        == {8}
