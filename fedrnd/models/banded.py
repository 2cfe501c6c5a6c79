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

Wide layers run in blocks (:func:`block_conv_pool`): the product's waste is the width over
the kernel size, so a layer wider than twice its kernel cuts its output columns into blocks of
``wb`` (:func:`block_width`), each of which reads only its ``wb + k - 1`` input columns: one
product ``[B H nb, k ng wb Ci] x [k ng wb Ci, wb Co]`` with a single banded matrix that every
block shares (``ng`` groups of ``wb`` input columns). For the 28x28 CNN (5x5, 8 and 16
channels, blocks of 4 and 2 columns) that is 1.6 and 1.2 times the convolution's multiply-adds
instead of 5.6 and 2.8, and 1.6x fewer CPU seconds per SGD step than full-width bands
(``benchmarks/cnn_layouts.py``; figures in ``docs/performance.md``).

Everything here is exact up to float rounding, gradients included (``tests/models/
test_banded.py`` and ``tests/models/test_blocked.py`` check the CNN and ``tests/rnd/
test_fast_paths.py`` the RND pair against their flax modules).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["BANDED_MAX_WIDTH", "band", "banded_matrix", "block_conv_pool", "block_width",
           "cnn_apply", "conv_layer", "pool_columns", "stack_rows"]

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


def block_width(w: int, k: int, co: int) -> int | None:
    """Output columns per block for a ``k x k`` convolution to ``co`` channels followed by a 2x2
    pool on an image ``w`` wide: ``None`` (one full-width banded product, :func:`conv_layer`)
    for ``w <= 2 k``, where blocks do not pay (8x8 images: full bands 1.5x faster), else the
    smallest even divisor of the even width ``w + w % 2`` with at least 24 output columns x
    channels per block (narrower products run far below the CPU's rate: 4 columns for 8
    channels, 2 for 16, ``benchmarks/cnn_layouts.py``); ``None`` where that is over half the
    width."""
    if w <= 2 * k:
        return None
    we = w + w % 2
    wb = next((d for d in range(2, we + 1, 2) if we % d == 0 and d * co >= 24), we)
    return None if 2 * wb > we else wb


def _block_matrix(kernel: jax.Array, w: int, cols: Sequence[int]) -> jax.Array:
    """:func:`banded_matrix` with no left padding, built by an einsum with the band."""
    k, _, ci, co = kernel.shape
    t = jnp.einsum("ujx,yxio->yuijo", jnp.asarray(band(w, cols, k, 0)), kernel)
    return t.reshape(k * w * ci, len(cols) * co)


def _windows(z: jax.Array) -> jax.Array:
    """``z [B, h, nb, 2 half]`` (a block's even output columns, then its odd ones) as 2x2 pool
    windows ``[B, ceil(h / 2), 2, nb, 2, half]`` (row, then column in the window); an odd last
    row pairs with itself."""
    b, h, nb, c2 = z.shape
    if h % 2:
        z = jnp.concatenate([z, z[:, -1:]], axis=1)
    return z.reshape(b, -(-h // 2), 2, nb, 2, c2 // 2)


@jax.custom_jvp
def _pool_windows(z: jax.Array) -> jax.Array:
    z6 = _windows(z)
    return jnp.max(z6, axis=(2, 4))


@_pool_windows.defjvp
def _pool_windows_jvp(primals, tangents):
    # The derivative of a window's maximum is that of its first maximal member (row-major in
    # the window, as XLA's pool): the tangent times a one-hot mask, summed over the window,
    # whose transpose (reverse mode) is one elementwise select of the broadcast cotangent.
    # Autodiff of the nested maximums splits ties and transposes strided slices into pads,
    # about 10% of a CNN step more.
    (z,), (t,) = primals, tangents
    z6 = _windows(z)
    a, b, c, d = z6[:, :, 0, :, 0], z6[:, :, 0, :, 1], z6[:, :, 1, :, 0], z6[:, :, 1, :, 1]
    m = jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))
    ta = a == m
    tb = (b == m) & ~ta
    tc = (c == m) & ~(ta | tb)
    td = ~(ta | tb | tc)
    one_hot = jnp.stack([jnp.stack([ta, tb], axis=3), jnp.stack([tc, td], axis=3)], axis=2)
    return m, jnp.sum(jnp.where(one_hot, _windows(t), 0), axis=(2, 4))


def block_conv_pool(y: jax.Array, h: int, w: int, kernel: jax.Array, wb: int) -> jax.Array:
    """A 'same' ``k x k`` convolution and a 2x2 'same' max pool (no bias) of activations
    ``y [B, h, w * Ci]``, in blocks of ``wb`` output columns (``wb`` even, dividing the even
    width ``w + w % 2``); returns ``[B, ceil(h / 2), ceil(w / 2) * Co]``.

    The zero-padded input is cut into groups of ``wb`` columns; block ``j`` reads groups
    ``j .. j + ng - 1`` of the ``k`` rows of each output row's window, so all blocks are one
    product with one banded matrix ``[k ng wb Ci, wb Co]``, output columns of a block even
    before odd (:func:`pool_columns`). An odd width gets a virtual last column that takes the
    real one's values before the pool (as 'same' pooling pairs the last column with itself).
    """
    b = y.shape[0]
    k, _, ci, co = kernel.shape
    lo = (k - 1) // 2
    we = w + w % 2
    if wb % 2 or we % wb:
        raise ValueError(f"block width {wb} must be even and divide {we}")
    nb, ng = we // wb, -(-(wb + k - 1) // wb)
    wp = (nb + ng - 1) * wb
    xp = jnp.pad(y.reshape(b, h, w, ci), ((0, 0), (lo, k - 1 - lo), (lo, wp - w - lo), (0, 0)))
    xp = xp.reshape(b, h + k - 1, nb + ng - 1, wb * ci)
    st = jnp.concatenate([xp[:, dy:dy + h, g:g + nb] for dy in range(k) for g in range(ng)],
                         axis=-1)
    cols, half = pool_columns(wb, "valid")
    z = (st.reshape(b * h * nb, k * ng * wb * ci)
         @ _block_matrix(kernel, ng * wb, cols)).reshape(b, h, nb, wb * co)
    if w % 2:  # the virtual column (last odd one) copies the real last (even) one
        real = z[:, :, -1, (half - 1) * co:half * co]
        last = jnp.concatenate([z[:, :, -1, :(wb - 1) * co], real], axis=-1)
        z = jnp.concatenate([z[:, :, :-1], last[:, :, None]], axis=2)
    return _pool_windows(z).reshape(b, -(-h // 2), (we // 2) * co)


def _conv_names(params) -> list[str]:
    names = [k for k in params if k.startswith("Conv_")]
    return sorted(names, key=lambda k: int(k.rsplit("_", 1)[1]))


def cnn_apply(params, x: jax.Array) -> jax.Array:
    """:class:`fedrnd.models.CNN`'s forward pass (conv 'same' + ReLU + 2x2 max pool 'same' per
    block, then ReLU dense and the output layer) with banded-matrix convolutions, in blocks of
    columns where the layer is wide enough (:func:`block_width`): equal to the flax module up
    to float rounding, gradients included."""
    b, h, w, c = x.shape
    y = x.reshape(b, h, w * c)
    for name in _conv_names(params):
        kernel, bias = params[name]["kernel"], params[name]["bias"]
        wb = block_width(w, kernel.shape[0], kernel.shape[-1])
        if wb is None:
            y, h, w = conv_layer(y, h, w, kernel, bias, pool="same")
        else:
            y = block_conv_pool(y, h, w, kernel, wb)
            h, w = -(-h // 2), -(-w // 2)
            y = jax.nn.relu(y + jnp.tile(bias, w))
    y = y.reshape(b, -1)  # (h, w, c): flax's flattening order
    y = jax.nn.relu(y @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    return y @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]
