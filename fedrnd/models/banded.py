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

Layers at least 8 pixels wide run in blocks (:func:`block_conv_pool_t`): a full-width band's
waste is the width over the kernel size, so such a layer cuts its output columns into blocks of
2 (:func:`block_width`), each of which reads only its ``k + 1`` input columns (odd ``k``): one
product ``[N, K] x [K, h nb B]`` with a single banded matrix that every block shares
(``K = k ng Ci wb`` for ``ng`` groups of ``wb`` input columns, ``N = wb Co``). For the 28x28
CNN (5x5, 8 and 16 channels) that is 1.2 times the convolution's multiply-adds instead of 5.6
and 2.8. Blocked layers keep their activations channels first and images last (``[C, h, w,
B]``): the window's shifts then move whole vectors of images, and the three products of a
training step (forward, input gradient, weight gradient) all have their long axis minor, which
the CPU's matrix kernels take directly; with images first, the weight gradient contracts a
major axis and runs on a transposed path at about half the speed. One SGD step of the CNN on
one thread: full-width bands 1.9 ms, images-first blocks of 4 and 2 columns 0.9 ms, this layout
0.75 ms (``benchmarks/cnn_layouts.py``; figures in ``docs/performance.md``).

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

__all__ = ["BANDED_MAX_WIDTH", "BLOCK_MIN_WIDTH", "band", "banded_matrix", "block_conv_pool",
           "block_conv_pool_t", "block_width", "cnn_apply", "conv_layer", "pool_columns", "stack_rows"]

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


BLOCK_MIN_WIDTH = 8
"""Narrowest image a layer runs in blocks of columns (:func:`block_width`)."""


def block_width(w: int) -> int | None:
    """Output columns per block for a convolution + 2x2 pool on an image ``w`` wide: 2 from
    :data:`BLOCK_MIN_WIDTH` up (each block reads ``k + 1`` input columns for an odd ``k``, so a
    ``k x k`` layer does ``(k + 1) / k`` times the convolution's multiply-adds), else ``None`` (one full-width
    banded product, :func:`conv_layer`). With images as the minor axis
    (:func:`block_conv_pool_t`) two columns beat wider blocks for every CNN measured, 8 to 64
    pixels wide and 1 to 64 channels (one SGD step, one thread: 6-10% faster than 4 columns for
    8 channels, 34% faster than full bands on 27x25x3, even at 8x8;
    ``benchmarks/cnn_layouts.py``)."""
    return 2 if w >= BLOCK_MIN_WIDTH else None


def _block_band(wb: int, ng: int, k: int) -> np.ndarray:
    """``[ng, wb, 2, wb / 2, k]``: entry ``[g, u, p, t, dx]`` is 1 where column ``u`` of input
    group ``g`` feeds output column ``2 t + p`` of a block through kernel column ``dx``."""
    cols, _ = pool_columns(wb, "valid")
    return band(ng * wb, cols, k, 0).reshape(ng, wb, 2, wb // 2, k)


def _block_matrix(kernel: jax.Array, wb: int, ng: int, *, transposed: bool) -> jax.Array:
    """The banded matrix every block shares: ``[N, K]`` (``transposed``) or ``[K, N]``, with
    ``K = (dy, g, ci, u)`` (kernel row, input group, input channel, column in the group) and
    ``N = (p, co, t)`` (output column ``2 t + p`` of the block, even ones first)."""
    k, _, ci, co = kernel.shape
    spec = "guptx,yxio->potygiu" if transposed else "guptx,yxio->ygiupot"
    t = jnp.einsum(spec, jnp.asarray(_block_band(wb, ng, k)), kernel)
    n, kk = 2 * co * (wb // 2), k * ng * ci * wb
    return t.reshape((n, kk) if transposed else (kk, n))


def _tn(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a^T b``, contracting the leading axes."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _block_product(kernel: jax.Array, st: jax.Array, wb: int, ng: int) -> jax.Array:
    return _block_matrix(kernel, wb, ng, transposed=True) @ st


@functools.partial(_block_product.defjvp, symbolic_zeros=True)
def _block_product_jvp(wb, ng, primals, tangents):
    # The tangent products are written with the untransposed matrix and contract leading axes,
    # so that reverse mode (their transposes) runs the input gradient as ``W [K, N] @ dz`` and
    # the weight gradient as ``st dz^T``: both with the long axis minor in each operand, which
    # the CPU's matrix kernels take directly. Autodiff of the primal product would contract the
    # long axis as a major one in the weight gradient (a slower, transposed path; about 1.8x
    # the forward product's time).
    (kernel, st), (dk, dst) = primals, tangents
    out = _block_product(kernel, st, wb, ng)
    terms = []
    if not isinstance(dk, jax.custom_derivatives.SymbolicZero):
        terms.append(_tn(_block_matrix(dk, wb, ng, transposed=False), st))
    if not isinstance(dst, jax.custom_derivatives.SymbolicZero):
        terms.append(_tn(_block_matrix(kernel, wb, ng, transposed=False), dst))
    return out, functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(out)


def _windows(z: jax.Array) -> jax.Array:
    """Block outputs ``z [2 (p), co, half, h, nb, b]`` (column ``2 t + p`` of each block) as
    2x2 pool windows ``[2 (column in the window), co, half, ceil(h / 2), 2 (row in the window),
    nb, b]``; an odd last row pairs with itself."""
    h = z.shape[3]
    if h % 2:
        z = jnp.concatenate([z, z[:, :, :, -1:]], axis=3)
    p, co, half, he, nb, b = z.shape
    return z.reshape(p, co, half, he // 2, 2, nb, b)


@jax.custom_jvp
def _pool_windows(z: jax.Array) -> jax.Array:
    return jnp.max(_windows(z), axis=(0, 4))


@_pool_windows.defjvp
def _pool_windows_jvp(primals, tangents):
    # The derivative of a window's maximum is that of its first maximal member (row-major in
    # the window, as XLA's pool): the tangent times a one-hot mask, summed over the window,
    # whose transpose (reverse mode) is one elementwise select of the broadcast cotangent.
    # Autodiff of the nested maximums splits ties and transposes strided slices into pads.
    (z,), (t,) = primals, tangents
    z7 = _windows(z)
    a, b, c, d = z7[0, ..., 0, :, :], z7[1, ..., 0, :, :], z7[0, ..., 1, :, :], z7[1, ..., 1, :, :]
    m = jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))
    ta = a == m
    tb = (b == m) & ~ta
    tc = (c == m) & ~(ta | tb)
    td = ~(ta | tb | tc)
    one_hot = jnp.stack([jnp.stack([ta, tc], axis=3), jnp.stack([tb, td], axis=3)], axis=0)
    return m, jnp.sum(jnp.where(one_hot, _windows(t), 0), axis=(0, 4))


def block_conv_pool_t(a: jax.Array, kernel: jax.Array, wb: int) -> jax.Array:
    """A 'same' ``k x k`` convolution and a 2x2 'same' max pool (no bias) of activations laid out
    ``a [Ci, h, w, B]`` (channels first, images last), in blocks of ``wb`` output columns (``wb``
    even, dividing the even width ``w + w % 2``); returns ``[Co, ceil(h / 2), ceil(w / 2), B]``.

    The zero-padded input is cut into groups of ``wb`` columns; block ``j`` reads groups
    ``j .. j + ng - 1`` of the ``k`` rows of each output row's window, so all blocks are one
    product ``[N, K] x [K, h nb B]`` with one banded matrix (:func:`_block_matrix`). With the
    images as the minor axis every shift of the window moves whole vectors, and all three
    products of a training step (forward, input and weight gradients) have their long axis
    minor (:func:`_block_product`). An odd width gets a virtual last column that takes the real
    one's values before the pool (as 'same' pooling pairs the last column with itself).
    """
    ci, h, w, b = a.shape
    k, _, _, co = kernel.shape
    lo = (k - 1) // 2
    we = w + w % 2
    if wb % 2 or we % wb:
        raise ValueError(f"block width {wb} must be even and divide {we}")
    nb, ng, half = we // wb, -(-(wb + k - 1) // wb), wb // 2
    wp = (nb + ng - 1) * wb
    xp = jnp.pad(a, ((0, 0), (lo, k - 1 - lo), (lo, wp - w - lo), (0, 0)))
    xp = xp.reshape(ci, h + k - 1, nb + ng - 1, wb, b)
    st = jnp.concatenate([jnp.transpose(xp[:, dy:dy + h, g:g + nb], (0, 3, 1, 2, 4))
                          for dy in range(k) for g in range(ng)], axis=0)
    z = _block_product(kernel, st.reshape(k * ng * ci * wb, h * nb * b), wb, ng)
    z = z.reshape(2, co, half, h, nb, b)
    if w % 2:  # the virtual column (the block's last odd one) copies the real last (even) one
        z = z.at[1, :, half - 1, :, nb - 1].set(z[0, :, half - 1, :, nb - 1])
    m = _pool_windows(z)  # [co, half, ceil(h / 2), nb, b]
    return jnp.transpose(m, (0, 2, 3, 1, 4)).reshape(co, m.shape[2], we // 2, b)


def block_conv_pool(y: jax.Array, h: int, w: int, kernel: jax.Array, wb: int) -> jax.Array:
    """:func:`block_conv_pool_t` on activations ``y [B, h, w * Ci]``; returns
    ``[B, ceil(h / 2), ceil(w / 2) * Co]``."""
    b, ci = y.shape[0], kernel.shape[2]
    a = jnp.transpose(y.reshape(b, h, w, ci), (3, 1, 2, 0))
    out = block_conv_pool_t(a, kernel, wb)
    return jnp.transpose(out, (3, 1, 2, 0)).reshape(b, out.shape[1], -1)


def _conv_names(params) -> list[str]:
    names = [k for k in params if k.startswith("Conv_")]
    return sorted(names, key=lambda k: int(k.rsplit("_", 1)[1]))


def cnn_apply(params, x: jax.Array) -> jax.Array:
    """:class:`fedrnd.models.CNN`'s forward pass (conv 'same' + ReLU + 2x2 max pool 'same' per
    block, then ReLU dense and the output layer) with banded-matrix convolutions, in blocks of
    columns where the layer is wide enough (:func:`block_width`; consecutive blocked layers
    keep the channels-first, images-last layout of :func:`block_conv_pool_t` between them):
    equal to the flax module up to float rounding, gradients included."""
    b, h, w, c = x.shape
    y, a = x.reshape(b, h, w * c), None  # exactly one is live: [B, h, w C] or [C, h, w, B]
    for name in _conv_names(params):
        kernel, bias = params[name]["kernel"], params[name]["bias"]
        wb = block_width(w)
        if wb is None:
            if a is not None:
                y, a = jnp.transpose(a, (3, 1, 2, 0)).reshape(b, h, -1), None
            y, h, w = conv_layer(y, h, w, kernel, bias, pool="same")
        else:
            if a is None:
                a, y = jnp.transpose(y.reshape(b, h, w, -1), (3, 1, 2, 0)), None
            a = jax.nn.relu(block_conv_pool_t(a, kernel, wb) + bias[:, None, None, None])
            h, w = a.shape[1], a.shape[2]
    if a is not None:
        y = jnp.transpose(a, (3, 1, 2, 0))
    y = y.reshape(b, -1)  # (h, w, c): flax's flattening order
    y = jax.nn.relu(y @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    return y @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]
