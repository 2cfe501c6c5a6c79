"""Banded-matrix convolutions (fedrnd.models.banded) against flax and a plain numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrnd.models import CNN, count_flops, from_flax, make_model
from fedrnd.models.banded import (
    BANDED_MAX_WIDTH,
    banded_matrix,
    cnn_apply,
    pool_columns,
    stack_rows,
)


def np_conv_same(x, kernel, bias):
    """Direct 'same' convolution, ``x [B, H, W, Ci]``, kernel HWIO, flax/XLA padding."""
    k = kernel.shape[0]
    lo, hi = (k - 1) // 2, k // 2
    xp = np.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0)))
    b, h, w, _ = x.shape
    out = np.zeros((b, h, w, kernel.shape[-1]))
    for dy in range(k):
        for dx in range(k):
            out += np.einsum("bhwi,io->bhwo", xp[:, dy:dy + h, dx:dx + w], kernel[dy, dx])
    return out + bias


@pytest.mark.parametrize("k,w,ci,co", [(3, 7, 1, 2), (5, 9, 2, 3), (4, 6, 1, 2), (3, 5, 8, 16)])
def test_banded_product_equals_a_direct_convolution(k, w, ci, co):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, w, ci)).astype(np.float32)
    kern = rng.normal(size=(k, k, ci, co)).astype(np.float32)
    got = stack_rows(jnp.asarray(x.reshape(2, 5, w * ci)), k) @ banded_matrix(jnp.asarray(kern), w)
    ref = np_conv_same(x.astype(np.float64), kern.astype(np.float64), 0.0)
    np.testing.assert_allclose(np.asarray(got).reshape(2, 5, w, co), ref, rtol=1e-5, atol=1e-5)


def test_pool_columns_put_even_columns_before_odd_ones():
    assert pool_columns(6, "valid") == ((0, 2, 4, 1, 3, 5), 3)
    assert pool_columns(5, "valid") == ((0, 2, 1, 3), 2)  # floor: column 4 is dropped
    assert pool_columns(5, "same") == ((0, 2, 4, 1, 3, 4), 3)  # ceil: column 4 pairs itself
    with pytest.raises(ValueError, match="'valid' or 'same'"):
        pool_columns(4, "full")


def _perturbed(params, seed):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return tree.unflatten([a + 0.1 * jax.random.normal(kk, a.shape)
                           for a, kk in zip(leaves, keys, strict=True)])


BLOCKED_CASES = [((28, 28, 1), (8, 16), 5), ((28, 28, 1), (6, 16), 5), ((23, 19, 2), (8, 6), 3),
                 ((17, 23, 1), (8, 12, 16), 5), ((30, 24, 3), (2, 4), 4)]
"""Shapes whose first layer runs in blocks of columns (``tests/models/test_blocked.py``)."""

CASES = [((7, 9, 2), (3,), 3), ((5, 6, 3), (2, 4, 3), 3), ((13, 11, 1), (4, 6), 5),
         ((8, 8, 1), (2,), 4), *BLOCKED_CASES]


@pytest.mark.parametrize("shape,channels,kernel", CASES)
def test_cnn_apply_equals_the_flax_module_in_both_modes_of_differentiation(shape, channels,
                                                                          kernel):
    module = from_flax(CNN(10, channels, 12, kernel), shape, 10)
    p = _perturbed(module.init(jax.random.key(0)), 1)  # nonzero biases
    x = jax.random.uniform(jax.random.key(2), (4, *shape))
    y = jax.random.randint(jax.random.key(3), (4,), 0, 10)
    np.testing.assert_allclose(np.asarray(jax.jit(cnn_apply)(p, x)),
                               np.asarray(jax.jit(module.apply)(p, x)), rtol=1e-5, atol=1e-5)

    def loss(apply):
        def f(q):
            logp = jax.nn.log_softmax(apply(q, x))
            return -jnp.mean(jnp.take_along_axis(logp, y[:, None], 1))
        return f

    for a, b in zip(jax.tree.leaves(jax.jit(jax.grad(loss(cnn_apply)))(p)),
                    jax.tree.leaves(jax.jit(jax.grad(loss(module.apply)))(p)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    # Forward mode (the blocked pool's custom JVP): a directional derivative.
    t = _perturbed(jax.tree.map(jnp.zeros_like, p), 4)
    d1 = jax.jvp(loss(cnn_apply), (p,), (t,))[1]
    d2 = jax.jvp(loss(module.apply), (p,), (t,))[1]
    np.testing.assert_allclose(float(d1), float(d2), rtol=1e-4, atol=1e-6)


def test_the_built_in_cnn_takes_the_banded_path_on_a_cpu_and_counts_the_convolutions_flops():
    m = make_model("cnn", (28, 28, 1), 10, channels=(8, 16), dense=64)
    assert jax.default_backend() == "cpu"
    assert m.apply is cnn_apply and m.reference_apply is not None
    plain = from_flax(CNN(10, (8, 16), 64), (28, 28, 1), 10)
    assert count_flops(m) == count_flops(plain)
    # Wider images keep XLA's convolution.
    wide = make_model("cnn", (8, BANDED_MAX_WIDTH + 1, 1), 10, channels=(2,), dense=8)
    assert wide.apply is not cnn_apply and wide.reference_apply is None


def test_local_training_through_the_banded_cnn_equals_the_flax_module():
    from fedrnd.data import build_federated, digits, rotation
    from fedrnd.engine import ClientHParams, ClientMapper, ClientOptimizer, Engine, LocalSpec

    d = digits()
    data = build_federated(d, rotation(d, 3, num_groups=3, seed=0, sizes=24))
    fast = make_model("cnn", data.feature_shape, data.num_classes, channels=(3, 4), dense=8)
    plain = from_flax(CNN(data.num_classes, (3, 4), 8), data.feature_shape, data.num_classes)
    hp = ClientHParams(jnp.zeros(3, jnp.int32), jnp.full(3, 0.1), jnp.zeros(3))
    out = []
    for model in (fast, plain):
        engine = Engine(model, LocalSpec(8, 1), ClientOptimizer(("sgd",)), ClientMapper())
        init = model.init(jax.random.key(0))
        p, _, _ = engine.train(init, data, hp, jax.random.key(1), jnp.zeros((), jnp.int32))
        out.append(p)
    for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(out[1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
