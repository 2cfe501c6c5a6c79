"""Convolutions as banded-matrix products, laid out for a CPU.

A ``k x k`` convolution with 'same' padding maps each output image row to a product of the
``k`` input rows around it with one banded (block-Toeplitz) matrix: with activations kept as
``[B, H, W * C]`` (width and channels together as the minor axis), one layer is one
``[B H, k W Ci] x [k W Ci, W Co]`` matrix product. It does about ``W / k`` times the
multiply-adds of the convolution, but as one well-shaped product; on a CPU this beats XLA's
convolution and above all its weight gradient by a wide margin for the narrow networks
federated learning simulates (figures in ``benchmarks/RESULTS.md``):

* the RND conv predictor (2 and 4 channels, 14x14 inputs), one Adam step on 48 images:
  0.18 ms against 0.27 ms for NHWC products and about 4x that for XLA's convolution;
* the CNN task model (conv 5x5, 8 and 16 channels, 28x28), one SGD step of 16 images:
  about 8x fewer CPU seconds than the flax module.

Elementwise work on a minor axis of a few channels is slow on a CPU (3-4x per element here), so
a 2x2 max pool never reshapes to ``[..., W, C]``: the layer before it emits even output columns
before odd ones (:func:`pool_columns`), the pool over the width is the maximum of two
contiguous halves, and the pool over the height a maximum of strided rows. Bias and ReLU come
after the pool (both are monotone, so the result is the same).

Everything here is exact up to float rounding, gradients included (``tests/models/
test_banded.py`` checks the CNN and ``tests/rnd/test_fast_paths.py`` the RND pair against
their flax modules).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["BANDED_MAX_WIDTH", "band", "banded_matrix", "cnn_apply", "conv_layer",
           "pool_columns", "stack_rows"]

BANDED_MAX_WIDTH = 64
"""Widest image the banded path takes (the product's waste grows with the width)."""

_MAP_MAX = 1 << 20  # entries of the constant kernel-to-matrix map; above it an einsum builds it


def band(w: int, cols: Sequence[int], k: int, lo: int) -> np.ndarray:
    """``[w, len(cols), k]``: entry ``[u, j, dx]`` is 1 where input column ``u`` feeds output
    column ``cols[j]`` through kernel column ``dx`` (``lo`` zero columns padded on the left)."""
    u, v = np.arange(w)[:, None], np.asarray(cols)[None, :]
    return np.stack([u == v + dx - lo for dx in range(k)], axis=-1).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _kernel_map(w: int, cols: tuple[int, ...], k: int, lo: int, ci: int, co: int) -> np.ndarray:
    """The constant 0/1 matrix ``[k k ci co, k w ci len(cols) co]`` that turns a flattened
    kernel into its banded matrix."""
    m = np.einsum("yY,ujx,iI,oO->yxioYuIjO", np.eye(k, dtype=np.float32), band(w, cols, k, lo),
                  np.eye(ci, dtype=np.float32), np.eye(co, dtype=np.float32))
    return m.reshape(k * k * ci * co, -1)


def banded_matrix(kernel: jax.Array, w: int, cols: Sequence[int] | None = None,
                  lo: int | None = None) -> jax.Array:
    """``[k * w * Ci, len(cols) * Co]``: a ``k x k`` kernel ``[k, k, Ci, Co]`` (HWIO) as one
    matrix acting on ``k`` stacked image rows of width ``w``, output columns ``cols``
    (default ``0 .. w - 1``) in that order; ``lo`` zero columns padded on the left (default
    ``(k - 1) // 2``, the 'same' padding of flax and XLA).

    Entry ``[(dy, u, ci), (j, co)]`` is ``kernel[dy, u - cols[j] + lo, ci, co]`` where that
    index is inside the kernel and 0 elsewhere. Built by a product with a constant 0/1 matrix
    (small kernels) or an einsum with the band: both differentiate into products, where a
    gather would differentiate into a scatter-add, slower on a CPU.
    """
    k, _, ci, co = kernel.shape
    cols = tuple(range(w)) if cols is None else tuple(int(c) for c in cols)
    lo = (k - 1) // 2 if lo is None else int(lo)
    if (k * k * ci * co) * (k * w * ci * len(cols) * co) <= _MAP_MAX:
        m = jnp.asarray(_kernel_map(w, cols, k, lo, ci, co))
        return (kernel.reshape(1, -1) @ m).reshape(k * w * ci, len(cols) * co)
    t = jnp.einsum("ujx,yxio->yuijo", jnp.asarray(band(w, cols, k, lo)), kernel)
    return t.reshape(k * w * ci, len(cols) * co)


def stack_rows(x: jax.Array, k: int, lo: int | None = None) -> jax.Array:
    """``[B, H, L] -> [B * H, k * L]``: each row with the ``k`` rows of its window (``lo``
    above it, zero rows beyond the edges), the input of a banded-matrix convolution."""
    b, h, _ = x.shape
    lo = (k - 1) // 2 if lo is None else int(lo)
    xp = jnp.pad(x, ((0, 0), (lo, k - 1 - lo), (0, 0)))
    return jnp.concatenate([xp[:, dy:dy + h] for dy in range(k)], axis=-1).reshape(b * h, -1)


def pool_columns(w: int, mode: str) -> tuple[tuple[int, ...], int]:
    """Output-column order for a convolution followed by a 2x2, stride-2 max pool.

    Returns ``(cols, w2)``: even columns, then odd ones, ``w2`` of each; the pool over the width
    is then ``max(y[..., :w2 C], y[..., w2 C:])``. ``mode="valid"`` drops an odd last column
    (flax ``padding="VALID"``, floor); ``"same"`` pairs it with itself (``padding="SAME"``,
    ceil: the pad is ``-inf``, so the window's maximum is that column).
    """
    even, odd = list(range(0, w, 2)), list(range(1, w, 2))
    if mode == "valid":
        even = even[:len(odd)]
    elif mode == "same":
        odd += even[len(odd):]
    else:
        raise ValueError(f"pool mode must be 'valid' or 'same', got {mode!r}")
    return tuple(even + odd), len(even)


def conv_layer(y: jax.Array, h: int, w: int, kernel: jax.Array, bias: jax.Array, *,
               pool: str | None = None) -> tuple[jax.Array, int, int]:
    """One 'same' convolution + ReLU (+ 2x2 max pool, ``pool="valid"`` or ``"same"``) on
    activations ``y [B, h, w * Ci]``; returns ``(y [B, h', w' * Co], h', w')``."""
    b = y.shape[0]
    k, co = kernel.shape[0], kernel.shape[-1]
    lo = (k - 1) // 2
    if pool is None:
        z = (stack_rows(y, k, lo) @ banded_matrix(kernel, w, None, lo)).reshape(b, h, w * co)
        return jax.nn.relu(z + jnp.tile(bias, w)), h, w
    cols, w2 = pool_columns(w, pool)
    z = (stack_rows(y, k, lo) @ banded_matrix(kernel, w, cols, lo)).reshape(b, h, 2 * w2 * co)
    z = jnp.maximum(z[..., :w2 * co], z[..., w2 * co:])  # over the width
    top, bottom = z[:, 0::2], z[:, 1::2]
    h2 = h // 2 if pool == "valid" else -(-h // 2)
    top = top[:, :h2]
    if bottom.shape[1] < h2:  # "same", odd height: the last row pairs with itself
        bottom = jnp.concatenate([bottom, z[:, -1:]], axis=1)
    z = jnp.maximum(top, bottom)
    return jax.nn.relu(z + jnp.tile(bias, w2)), h2, w2


def _conv_names(params) -> list[str]:
    names = [k for k in params if k.startswith("Conv_")]
    return sorted(names, key=lambda k: int(k.rsplit("_", 1)[1]))


def cnn_apply(params, x: jax.Array) -> jax.Array:
    """:class:`fedrnd.models.CNN`'s forward pass (conv 'same' + ReLU + 2x2 max pool 'same' per
    block, then ReLU dense and the output layer) with banded-matrix convolutions: equal to the
    flax module up to float rounding, gradients included."""
    b, h, w, c = x.shape
    y = x.reshape(b, h, w * c)
    for name in _conv_names(params):
        y, h, w = conv_layer(y, h, w, params[name]["kernel"], params[name]["bias"], pool="same")
    y = y.reshape(b, -1)  # (h, w, c): flax's flattening order
    y = jax.nn.relu(y @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    return y @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]
