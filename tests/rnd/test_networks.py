"""RND networks: PyTorch's adaptive pooling, the authors' sizes and init, the target cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrnd.rnd import adaptive_avg_pool, make_pair, target_features


def torch_adaptive_avg_pool2d(x: np.ndarray, out: tuple[int, int]) -> np.ndarray:
    """Loop reference of ``torch.nn.functional.adaptive_avg_pool2d`` on NHWC arrays."""
    b, h, w, c = x.shape
    oh, ow = out
    y = np.zeros((b, oh, ow, c), np.float64)
    for i in range(oh):
        h0, h1 = (i * h) // oh, -(-((i + 1) * h) // oh)
        for j in range(ow):
            w0, w1 = (j * w) // ow, -(-((j + 1) * w) // ow)
            y[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
    return y


def test_reference_bins_are_pytorchs():
    # PyTorch's bins for 7 -> 4 are [0,2) [1,4) [3,6) [5,7): overlapping, unequal.
    x = np.arange(7, dtype=np.float64).reshape(1, 7, 1, 1)
    y = torch_adaptive_avg_pool2d(x, (4, 1))[0, :, 0, 0]
    np.testing.assert_allclose(y, [0.5, 2.0, 4.0, 5.5])


@pytest.mark.parametrize("hw", [(7, 7), (8, 8), (5, 3), (13, 9), (4, 4), (2, 6)])
def test_adaptive_pool_matches_pytorch_reference(hw):
    x = np.random.default_rng(0).normal(size=(2, *hw, 3)).astype(np.float32)
    got = np.asarray(adaptive_avg_pool(jnp.asarray(x), (4, 4)))
    np.testing.assert_allclose(got, torch_adaptive_avg_pool2d(x, (4, 4)), rtol=1e-5, atol=1e-6)


def test_conv_pair_has_the_authors_sizes_and_kaiming_init():
    pair = make_pair("conv", (32, 32, 3))
    # Paper: target about 85k parameters, predictor about 4.3k.
    assert pair.target.num_params() == 84992
    assert pair.predictor.num_params() == 4292
    params = pair.target_params(0)
    k = np.asarray(params["Dense_0"]["kernel"])  # fan_in = 64 channels * 4 * 4
    assert k.shape == (1024, 64)
    assert abs(k.std() - np.sqrt(2.0 / 1024)) < 0.05 * np.sqrt(2.0 / 1024)
    assert abs(k.mean()) < 5e-3
    # Untruncated normal (PyTorch's kaiming_normal_): tails beyond 2 std exist (~4.6%).
    assert 0.03 < np.mean(np.abs(k) > 2 * np.sqrt(2.0 / 1024)) < 0.06
    for layer in params.values():
        np.testing.assert_array_equal(np.asarray(layer["bias"]), 0.0)
    # One global seed, one target.
    again = pair.target_params(0)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mlp_pair_widths_and_output():
    pair = make_pair("auto", (10,), target_width=[64, 32], predictor_width=[8], out_dim=16)
    assert pair.kind == "mlp" and pair.out_dim == 16
    x = jnp.ones((5, 10))
    assert pair.predictor.apply(pair.predictor.init(jax.random.key(0)), x).shape == (5, 16)
    assert pair.target.num_params() == 10 * 64 + 64 + 64 * 32 + 32 + 32 * 16 + 16
    # Cached: equal arguments give the same object (jitted programs compile once).
    assert make_pair("mlp", (10,), target_width=(64, 32), predictor_width=(8,),
                     out_dim=16) is pair


def test_target_cache_equals_direct_apply_for_ragged_batches():
    pair = make_pair("conv", (7, 7, 2), target_width=(4, 8), predictor_width=(2, 2), out_dim=8)
    params = pair.target_params(3)
    x = jnp.asarray(np.random.default_rng(1).random((23, 7, 7, 2)), jnp.float32)
    cached = target_features(pair, params, x, batch=5)  # 23 rows, batch not dividing
    assert cached.shape == (23, 8)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(pair.target.apply(params, x)),
                               rtol=1e-5, atol=1e-5)


def test_pair_errors():
    with pytest.raises(ValueError, match="needs image features"):
        make_pair("conv", (10,))
    with pytest.raises(ValueError, match="unknown"):
        make_pair("resnet", (8, 8, 1))
    with pytest.raises(ValueError, match="positive widths"):
        make_pair("mlp", (4,), predictor_width=(0,))
    pair = make_pair("mlp", (4,))
    with pytest.raises(ValueError, match="pool features have shape"):
        target_features(pair, pair.target_params(0), jnp.ones((3, 5)))
