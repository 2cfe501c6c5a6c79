"""Task models and the generator: output shapes for the inputs they accept, parameter counts
against a hand count, purity (same params same output, jit equals eager), finite gradients,
bad options refused with ``ValueError``, and a CNN that learns a separable toy problem."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedrnd.models import MODELS, make_generator, make_model

K = 5  # classes
VECTOR, DIGITS, MNIST, CIFAR = (6,), (8, 8, 1), (28, 28, 1), (32, 32, 3)
IMAGES = (DIGITS, MNIST, CIFAR)

# Small options so every registered model compiles in about a second; a model missing here
# is built with its defaults.
SMALL = {"mlp": {"hidden": [7, 5]}, "cnn": {"channels": [4, 8], "dense": 16, "kernel": 3},
         "resnet": {"stages": [4, 8]}, "char_lstm": {"hidden": [6], "embed": 3}}
TEXT = ("char_lstm",)  # models of token ids [B, L] (fedrnd.models.text)


def n_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def batch(shape, n: int = 3, seed: int = 0) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), (n, *shape))


def build(name, shape):
    return make_model(name, shape, K, **SMALL.get(name, {}))


def accepts(name: str, shape) -> bool:
    """Dense models flatten any input; convolutional ones need images ``[H, W, C]``, text
    models sequences ``[L]``."""
    if name in TEXT:
        return len(shape) == 1
    return len(shape) == 3 or name in ("logreg", "mlp")


def inputs(name: str, n: int = 3, seed: int = 0) -> jax.Array:
    """A batch for the value tests: images ``DIGITS``, or token ids ``[n, 6]`` for text."""
    if name in TEXT:  # ids as the float pool stores them
        return jnp.floor(batch(VECTOR, n, seed) * K)
    return batch(DIGITS, n, seed)


# --------------------------------------------------------------------------------- shapes
def shape_id(shape) -> str:
    return "x".join(map(str, shape))


@pytest.mark.parametrize("shape", [VECTOR, *IMAGES], ids=shape_id)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_logits_are_batch_by_classes_for_every_accepted_input(name, shape):
    """Shapes by abstract evaluation (nothing compiled); the values are checked below."""
    if not accepts(name, shape):
        if name in TEXT:  # refused when traced, by the module
            with pytest.raises(ValueError, match=r"token ids \[B, L\]"):
                jax.eval_shape(build(name, shape).init, jax.random.key(0))
            return
        with pytest.raises(ValueError, match="image inputs"):
            build(name, shape)
        return
    model = build(name, shape)
    assert model.feature_shape == shape and model.num_classes == K
    params = jax.eval_shape(model.init, jax.random.key(0))
    assert n_params(params) == model.num_params()
    for n in (1, 4):
        x = jax.ShapeDtypeStruct((n, *shape), jnp.float32)
        out = jax.eval_shape(model.apply, params, x)
        assert out.shape == (n, K) and out.dtype == jnp.float32


@pytest.mark.parametrize("shape", [VECTOR, *IMAGES], ids=shape_id)
def test_generator_makes_inputs_of_the_feature_shape(shape):
    gen = make_generator(shape, K, noise_dim=4, hidden=(8,))
    params = jax.eval_shape(gen.init, jax.random.key(0))
    z = jax.ShapeDtypeStruct((6, gen.noise_dim), jnp.float32)
    y = jax.ShapeDtypeStruct((6,), jnp.int32)
    assert jax.eval_shape(gen.apply, params, z, y).shape == (6, *shape)


@pytest.mark.parametrize("shape", [VECTOR, DIGITS], ids=shape_id)
@pytest.mark.parametrize("output,low,high", [("sigmoid", 0, 1), ("tanh", -1, 1),
                                             ("linear", -np.inf, np.inf)])
def test_generator_output_is_in_its_range(shape, output, low, high):
    gen = make_generator(shape, K, noise_dim=4, hidden=(8,), output=output)
    params = jax.jit(gen.init)(jax.random.key(0))
    z = 3.0 * jax.random.normal(jax.random.key(1), (6, gen.noise_dim))
    x = jax.jit(gen.apply)(params, z, jnp.arange(6) % K)
    assert x.shape == (6, *shape)
    assert np.all(np.isfinite(x)) and np.all(x >= low) and np.all(x <= high)


def test_generator_class_changes_the_output():
    gen = make_generator(VECTOR, K, noise_dim=4, hidden=(8,))
    params = jax.jit(gen.init)(jax.random.key(0))
    x = jax.jit(gen.apply)(params, jnp.ones((2, 4)), jnp.array([0, 1]))
    assert not np.allclose(x[0], x[1])


# ------------------------------------------------------------------------ parameter counts
def test_logreg_has_a_weight_per_input_and_class_plus_a_bias():
    assert make_model("logreg", DIGITS, K).num_params() == 64 * K + K
    assert make_model("logreg", VECTOR, 10).num_params() == 6 * 10 + 10


def test_mlp_parameter_count():
    d = 28 * 28
    # McMahan et al.'s 2NN: 784-200-200-10.
    assert make_model("mlp", MNIST, 10).num_params() == (d * 200 + 200) + (200 * 200 + 200) \
        + (200 * 10 + 10) == 199_210
    assert make_model("mlp", VECTOR, K, hidden=[7, 5]).num_params() == \
        (6 * 7 + 7) + (7 * 5 + 5) + (5 * K + K)
    assert make_model("mlp", VECTOR, K, hidden=[]).num_params() == 6 * K + K


def test_cnn_is_mcmahans_lenet_and_its_parameter_count():
    """Two 5x5 conv (32, 64 channels) + 2x2 max-pool blocks, dense 512, as in McMahan et al.
    (2017), 1,663,370 parameters on 28x28x1; pooling halves the side (rounding up)."""
    def count(side, c_in, channels=(32, 64), dense=512, kernel=5, classes=10):
        total, c = 0, c_in
        for ch in channels:
            total += kernel * kernel * c * ch + ch
            c, side = ch, -(-side // 2)
        flat = side * side * c
        return total + flat * dense + dense + dense * classes + classes

    assert make_model("cnn", MNIST, 10).num_params() == count(28, 1) == 1_663_370
    assert make_model("cnn", CIFAR, 10).num_params() == count(32, 3) == 2_156_490
    small = make_model("cnn", DIGITS, K, channels=[4, 8], dense=16, kernel=3)
    assert small.num_params() == count(8, 1, (4, 8), 16, 3, K) == 40 + 296 + 528 + 16 * K + K


def test_resnet_parameter_count():
    """Stem conv + GroupNorm, per block two 3x3 convs (no bias) with GroupNorm, a 1x1
    shortcut conv where the width or stride changes, global average pooling, dense."""
    conv, gn = (lambda k, i, o: k * k * i * o), (lambda c: 2 * c)
    stem = conv(3, 1, 4) + gn(4)
    block0 = conv(3, 4, 4) + gn(4) + conv(3, 4, 4) + gn(4)
    block1 = conv(3, 4, 8) + gn(8) + conv(3, 8, 8) + gn(8) + conv(1, 4, 8)
    head = 8 * K + K
    assert make_model("resnet", DIGITS, K, stages=[4, 8]).num_params() == \
        stem + block0 + block1 + head == 1321


def test_generator_parameter_count_with_a_dense_head():
    gen = make_generator(VECTOR, K, noise_dim=4, hidden=(8,), head="dense")
    embed, trunk, norm, out = K * 4, 4 * 8 + 8, 2 * 8, 8 * 6 + 6
    assert n_params(gen.init(jax.random.key(0))) == embed + trunk + norm + out


# -------------------------------------------------------------------------------- purity
@pytest.mark.parametrize("name", sorted(MODELS))
def test_apply_is_pure_and_jit_equals_eager(name):
    shape = VECTOR if name in TEXT else DIGITS
    model = build(name, shape)
    params = model.init(jax.random.key(0))
    same = model.init(jax.random.key(0))
    other = model.init(jax.random.key(1))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(same), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(params), jax.tree.leaves(other), strict=True))
    x = inputs(name, 4)
    eager = model.apply(params, x)
    np.testing.assert_array_equal(eager, model.apply(params, x))
    np.testing.assert_allclose(jax.jit(model.apply)(params, x), eager, rtol=1e-5, atol=1e-6)
    # Each example's logits depend on that example only (no batch statistics).
    np.testing.assert_allclose(model.apply(params, x[:1]), eager[:1], rtol=1e-5, atol=1e-6)


def test_generator_apply_is_pure_and_jit_equals_eager():
    gen = make_generator(VECTOR, K, noise_dim=4, hidden=(8,))
    params = gen.init(jax.random.key(0))
    z, y = jax.random.normal(jax.random.key(1), (4, 4)), jnp.arange(4) % K
    eager = gen.apply(params, z, y)
    np.testing.assert_array_equal(eager, gen.apply(params, z, y))
    np.testing.assert_allclose(jax.jit(gen.apply)(params, z, y), eager, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", sorted(MODELS))
def test_cross_entropy_gradients_are_finite_and_reach_every_parameter(name):
    model = build(name, VECTOR if name in TEXT else DIGITS)
    params = model.init(jax.random.key(0))
    x, y = inputs(name, 6), jnp.arange(6) % K

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()

    grads = jax.jit(jax.grad(loss))(params)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert np.all(np.isfinite(g)), jax.tree_util.keystr(path)
        assert np.any(g != 0), jax.tree_util.keystr(path)


def test_generator_gradients_are_finite():
    gen = make_generator(DIGITS, K, noise_dim=4, hidden=(8,))
    params = jax.jit(gen.init)(jax.random.key(0))
    z = jax.random.normal(jax.random.key(1), (4, 4))
    grads = jax.jit(jax.grad(lambda p: jnp.sum(gen.apply(p, z, jnp.arange(4) % K) ** 2)))(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


# --------------------------------------------------------------------------- bad options
@pytest.mark.parametrize("name,options,match", [
    ("mlp", {"hidden": [-1]}, "hidden"),
    ("mlp", {"hidden": [8, 0]}, "hidden"),
    ("mlp", {"hidden": "64"}, "hidden"),
    ("mlp", {"hidden": [True]}, "hidden"),
    ("mlp", {"width": 8}, "mlp"),
    ("logreg", {"hidden": [8]}, "logreg"),
    ("cnn", {"channels": [-4]}, "channels"),
    ("cnn", {"dense": 0}, "dense"),
    ("cnn", {"kernel": 0}, "kernel"),
    ("cnn", {"kernel": 2.5}, "kernel"),
    ("resnet", {"stages": []}, "stages"),
    ("resnet", {"stages": [16, -32]}, "stages"),
    ("resnet", {"blocks_per_stage": 0}, "blocks_per_stage"),
])
def test_bad_model_options_raise_value_error(name, options, match):
    with pytest.raises(ValueError, match=match):
        make_model(name, DIGITS, K, **options)


def test_unknown_model_names_the_closest_one():
    with pytest.raises(ValueError, match="did you mean 'mlp'"):
        make_model("mpl", DIGITS, K)


@pytest.mark.parametrize("shape,options,match", [
    (VECTOR, {"output": "relu"}, "output"),
    (VECTOR, {"head": "deconv"}, "head"),
    (VECTOR, {"noise_dim": 0}, "noise_dim"),
    (VECTOR, {"hidden": (8, -1)}, "hidden"),
    (VECTOR, {"head": "conv"}, "conv"),
    ((6, 6, 1), {"head": "conv"}, "divisible by 4"),
])
def test_bad_generator_options_raise_value_error(shape, options, match):
    with pytest.raises(ValueError, match=match):
        make_generator(shape, K, **options)


# ------------------------------------------------------------------------------ training
def test_cnn_learns_a_separable_toy_problem_in_a_few_sgd_steps():
    """Class 0 lights the left half of an 8x8 image, class 1 the right half (plus noise):
    plain full-batch SGD drives the loss well down and classifies every image."""
    rng = np.random.default_rng(0)
    y = np.arange(32) % 2
    x = rng.normal(0.0, 0.3, (32, 8, 8, 1))
    x[y == 0, :, :4] += 1.0
    x[y == 1, :, 4:] += 1.0
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y)
    model = make_model("cnn", DIGITS, 2, channels=[4, 8], dense=16, kernel=3)

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()

    @jax.jit
    def sgd(p):
        return jax.tree.map(lambda w, g: w - 0.1 * g, p, jax.grad(loss)(p))

    params = model.init(jax.random.key(0))
    start = float(loss(params))
    for _ in range(30):
        params = sgd(params)
    assert float(loss(params)) < 0.3 * start
    assert np.all(np.argmax(model.apply(params, x), -1) == y)
