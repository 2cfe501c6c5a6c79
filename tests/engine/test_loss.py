"""The named client losses (``Engine(loss=...)``, ``local.loss``): ``mse`` against a numpy
reference, the default unchanged, a user function still possible, models with dropout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from fedrnd.driver.config import Config, from_dict, validate
from fedrnd.driver.setup import build_engine
from fedrnd.engine import Engine, LocalSpec, client_hparams
from fedrnd.models import from_flax, make_model
from tests.conftest import gaussian_federated

K = 3


def _one_step(loss, data, lr=0.1):
    model = make_model("logreg", (4,), K)
    opt, hp = client_hparams(data.num_clients, optimizer="sgd", lr=lr)
    engine = Engine(model, LocalSpec(batch_size=16, steps=1), opt, loss=loss, path="general")
    p0 = model.init(jax.random.key(0))
    p, _, m = jax.jit(lambda p: engine.train(p, data, hp, jax.random.key(1), jnp.int32(0)))(p0)
    return engine, p0, p, m


def test_mse_one_sgd_step_equals_a_numpy_reference():
    data = gaussian_federated([6, 4], dim=4, num_classes=K)
    lr = 0.1
    engine, p0, p, m = _one_step("mse", data, lr)
    assert not engine.use_lowrank(data)
    w0 = np.asarray(p0["Dense_0"]["kernel"], np.float64)
    b0 = np.asarray(p0["Dense_0"]["bias"], np.float64)
    x_all, y_all = np.asarray(data.x, np.float64), np.asarray(data.y)
    for c in range(data.num_clients):
        # batch 16 > n_c: the one step sees all of the client's rows (order does not matter).
        rows = np.asarray(data.train_idx[c])[: int(data.train_count[c])]
        x, y = x_all[rows], y_all[rows]
        n = len(y)
        err = x @ w0 + b0 - np.eye(K)[y]
        loss = np.mean(err ** 2)
        d = 2.0 * err / (n * K)
        np.testing.assert_allclose(float(m["loss"][c]), loss, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(p["Dense_0"]["kernel"][c]), w0 - lr * x.T @ d,
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(p["Dense_0"]["bias"][c]), b0 - lr * d.sum(0),
                                   rtol=1e-5, atol=1e-6)


def test_default_loss_is_cross_entropy_bit_for_bit_and_a_user_function_still_runs():
    data = gaussian_federated([6, 4, 5], dim=4, num_classes=K)
    model = make_model("logreg", (4,), K)

    def user_ce(params, x, y, mask):
        per = optax.softmax_cross_entropy_with_integer_labels(model.apply(params, x), y)
        return jnp.sum(per * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    out = [_one_step(loss, data)[2:] for loss in (None, "cross_entropy", user_ce)]
    for other in out[1:]:
        for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(other), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert Config().local.loss == "cross_entropy"
    # The named default keeps the low-rank fast path available; mse does not.
    opt, _ = client_hparams(3)
    assert Engine(model, LocalSpec(4), opt, loss="cross_entropy", path="lowrank")
    with pytest.raises(ValueError, match="'mse'.*cross-entropy"):
        Engine(model, LocalSpec(4), opt, loss="mse", path="lowrank")


class DropMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(6)(x))
        return nn.Dense(K)(nn.Dropout(0.5, deterministic=not train)(x))


def test_mse_trains_a_dropout_model_through_train_apply_and_a_user_function_is_refused():
    data = gaussian_federated([12, 10, 9], dim=4, num_classes=K, sep=3.0)
    model = from_flax(DropMLP(), (4,), K)
    opt, hp = client_hparams(data.num_clients, optimizer="sgd", lr=0.2)
    engine = Engine(model, LocalSpec(batch_size=4, epochs=1), opt, loss="mse")
    params = model.init(jax.random.key(0))
    step = jax.jit(lambda p, r: engine.train_sum(p, data, hp, jax.random.key(r), r))
    losses = []
    for r in range(10):
        s, n, m = step(params, jnp.int32(r))
        params = jax.tree.map(lambda a, n=n: a / n, s)
        losses.append(float(m["loss"] / n))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    with pytest.raises(ValueError, match="custom loss"):
        Engine(model, LocalSpec(4), opt, loss=lambda p, x, y, mask: jnp.zeros(()))
    with pytest.raises(ValueError, match="'hinge' is unknown"):
        Engine(model, LocalSpec(4), opt, loss="hinge")


def test_local_loss_from_the_config_reaches_the_engine_and_bad_values_name_the_path():
    cfg = validate(from_dict({"local": {"loss": "mse"}}))
    data = gaussian_federated([6, 4, 5], dim=4, num_classes=K)
    cfg.model.name, cfg.model.options = "logreg", {}
    assert build_engine(cfg, data)[0].loss == "mse"
    for local, words in [({"loss": "mes"}, ["local.loss", "did you mean 'mse'", "cross_entropy"]),
                         ({"loss": "mse", "path": "lowrank"}, ["local.loss", "lowrank"])]:
        bad = from_dict({"local": local})
        with pytest.raises(ValueError) as e:
            validate(bad)
        for w in words:
            assert w in str(e.value), (w, str(e.value))
