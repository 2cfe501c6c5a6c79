"""Banded convolutions in blocks of columns (fedrnd.models.banded.block_conv_pool) against XLA's
convolution and max pool, and the built-in CNN through them against its flax module."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrnd.models import CNN, from_flax, make_model
from fedrnd.models.banded import block_conv_pool, block_width, cnn_apply
from tests.models.test_banded import BLOCKED_CASES


def ref_conv_pool(x, kernel):
    """'same' convolution (NHWC, HWIO) then a 2x2, stride-2 'same' max pool (flax's)."""
    z = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=jax.lax.Precision.HIGHEST)
    return nn.max_pool(z, (2, 2), strides=(2, 2), padding="SAME")


def blocked(x, kernel, wb):
    b, h, w, ci = x.shape
    out = block_conv_pool(x.reshape(b, h, w * ci), h, w, kernel, wb)
    return out.reshape(b, -(-h // 2), -(-w // 2), kernel.shape[-1])


# (h, w, ci, co, k, wb): the CNN's two layers, odd heights and widths, an even kernel (whose
# 'same' padding is lopsided), one block over the whole width, several input channels.
SHAPES = [(28, 28, 1, 8, 5, 4), (14, 14, 8, 16, 5, 2), (13, 11, 1, 4, 5, 2),
          (9, 7, 2, 3, 3, 2), (10, 12, 3, 2, 4, 4), (11, 15, 1, 5, 3, 8), (7, 9, 2, 3, 5, 10),
          (6, 8, 1, 1, 2, 2)]


@pytest.mark.parametrize("h,w,ci,co,k,wb", SHAPES)
def test_block_conv_pool_equals_xla_conv_and_max_pool_with_gradients(h, w, ci, co, k, wb):
    kx, kk, kg = jax.random.split(jax.random.key(h * w + k), 3)
    x = jax.random.normal(kx, (3, h, w, ci))
    kernel = jax.random.normal(kk, (k, k, ci, co))
    got = jax.jit(blocked, static_argnums=2)(x, kernel, wb)
    ref = ref_conv_pool(x, kernel)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)

    g = jax.random.normal(kg, ref.shape)

    def grads(fn):
        return jax.jit(jax.grad(lambda a, b: jnp.sum(fn(a, b) * g), (0, 1)))(x, kernel)

    for a, b in zip(grads(lambda a, b: blocked(a, b, wb)), grads(ref_conv_pool), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_ties_in_a_pool_window_send_the_gradient_to_its_first_member_as_xla_does():
    # Zero and constant regions make pool windows of equal values: the gradient of a window's
    # maximum reaches exactly one member (the first, as XLA's pool), not each, nor half of each.
    x = jnp.zeros((2, 12, 10, 1)).at[:, 6:].set(1.0).at[:, :3, 4:].set(-2.0)
    kernel = jnp.ones((3, 3, 1, 2)).at[1, 1, 0, 1].set(-0.5)
    g = jax.random.normal(jax.random.key(0), (2, 6, 5, 2))

    def grads(fn):
        return jax.grad(lambda a, b: jnp.sum(fn(a, b) * g), (0, 1))(x, kernel)

    for a, b in zip(grads(lambda a, b: blocked(a, b, 2)), grads(ref_conv_pool), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_block_conv_pool_rejects_a_block_width_that_does_not_tile_the_image():
    x = jnp.zeros((1, 6, 6))
    for wb in (3, 4):
        with pytest.raises(ValueError, match="must be even and divide 6"):
            block_conv_pool(x, 6, 6, jnp.zeros((3, 3, 1, 1)), wb)


def test_block_width_known_answers():
    assert block_width(28) == 2  # the CNN's layers: blocks of 2 columns
    assert block_width(14) == 2
    assert block_width(8) == 2 and block_width(9) == 2  # 8x8 digits, odd widths
    assert block_width(7) is None  # narrower: one full-width band
    assert block_width(64) == 2


@pytest.mark.parametrize("shape,channels,kernel", BLOCKED_CASES)
def test_the_blocked_cases_take_the_blocked_path(shape, channels, kernel):
    """``tests/models/test_banded.py`` checks these shapes against the flax module (values,
    gradients, forward mode); here: their first layer does run in blocks."""
    assert block_width(shape[1]) is not None


def _image_clients(clients=6, rows=24, seed=0):
    """Digits upsampled to 28x28 (zero backgrounds: pool windows full of ties)."""
    from fedrnd.data import digits
    from fedrnd.data.federated import FederatedData

    d = digits()
    x = np.kron(np.asarray(d.x_train[:clients * rows, :, :, 0]), np.ones((3, 3)))
    x = np.pad(x, ((0, 0), (2, 2), (2, 2)))[..., None].astype(np.float32)
    y = np.asarray(d.y_train[:clients * rows]).astype(np.int32)
    idx = np.random.default_rng(seed).permutation(clients * rows).reshape(clients, rows)
    return FederatedData(jnp.asarray(x), jnp.asarray(y), jnp.asarray(idx.astype(np.int32)),
                         jnp.full((clients,), rows, jnp.int32), jnp.asarray(idx[:, :4]),
                         jnp.full((clients,), 4, jnp.int32), jnp.zeros(clients, jnp.int32), 10,
                         "digits28")


def test_local_training_through_the_blocked_cnn_equals_the_flax_module_at_any_chunk():
    from fedrnd.engine import ClientHParams, ClientMapper, ClientOptimizer, Engine, LocalSpec

    data = _image_clients()
    fast = make_model("cnn", (28, 28, 1), 10, channels=(8, 16), dense=16)
    assert fast.apply is cnn_apply
    plain = from_flax(CNN(10, (8, 16), 16), (28, 28, 1), 10)
    hp = ClientHParams(jnp.zeros(6, jnp.int32), jnp.full(6, 0.1), jnp.zeros(6))
    init = fast.init(jax.random.key(0))
    out = []
    for model, chunk in ((fast, 1), (fast, 3), (fast, 6), (plain, 1)):
        engine = Engine(model, LocalSpec(8, 1), ClientOptimizer(("sgd",)),
                        ClientMapper(chunk_size=chunk))
        p, _, _ = engine.train(init, data, hp, jax.random.key(1), jnp.zeros((), jnp.int32))
        out.append(p)
    for other in out[1:]:
        for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(other), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
