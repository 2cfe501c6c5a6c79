"""Convolution layouts for the built-in CNN on a CPU: one local-training step, timed.

Times the local training of the built-in ``cnn`` model (default: the peer comparison's
workload, 28x28x1 images, channels 8/16, 5x5 kernels, dense 64, plain SGD on batches of 16)
under alternative convolution layouts. One call of the timed function trains ``--clients``
clients (each its own weights) for ``--steps`` SGD steps each: clients one at a time
(``lax.map``, the engine's CPU default of one client per map step, ``--mode map``) or all in
one vmapped chunk (``--mode vmap``). The variants are interleaved and the whole round repeated;
the median CPU and wall seconds per step are reported, with the true convolution
arithmetic's GFLOP/s (multiply-adds of the plain convolutions, dense layers included, forward
and backward; no input gradient for the first layer) per CPU second.

Layouts (per convolution layer; a variant gives one per layer joined by ``+``, the last
repeated; ``lib`` is the library's own :func:`fedrnd.models.banded.cnn_apply` and ``flax``
the flax module):

- ``banded``: full-width banded product (:func:`fedrnd.models.banded.conv_layer`, rows
  stacked, one ``[B H, k W Ci] x [k W Ci, W Co]`` product, 2x2 pool by contiguous halves);
- ``blkN``: the banded product in blocks of ``N`` output columns, channels first and images
  last (:func:`fedrnd.models.banded.block_conv_pool`, which transposes in and out of that
  layout at each layer; ``lib`` keeps it between blocked layers);
- ``rowsN``: blocks with images first (``[B H nb, K] x [K, N]``, custom-JVP pool), the
  library's layout before; ``blkNa``: the same with the pool differentiated by autodiff and
  the banded matrix built as ``banded`` builds it;
- ``xla``: ``lax.conv_general_dilated`` (NHWC), autodiff;
- ``im2col``: NHWC patches ``[B, H, W, k k Ci]`` (the ``k k`` shifted slices concatenated), one
  product with the ``[k k Ci, Co]`` kernel, autodiff;
- ``im2colv``: the same with a custom VJP: ``dW = patches^T dZ``, ``dX`` = col2im of
  ``dZ W^T`` as one sum of shifted slices; ``im2colv4``: pooled as the maximum of four strided
  slices instead of a reshape;
- ``shift``: sum over the ``k k`` taps of (shifted input) @ ``W[tap]`` (an elementwise
  multiply-add when ``Ci = 1``), custom VJP as ``im2colv``;
- ``par``: im2col with the output pixels in four parity blocks (``(2i + py, 2j + px)`` in
  block ``2 py + px``), so the 2x2 pool is the maximum of four contiguous blocks; ``part``:
  the same, forward as ``k k`` multiply-adds when ``Ci = 1``.

The NHWC layouts (``xla``, ``im2col*``, ``shift``) pool 2x2 ('same') by reshaping; all add bias
and ReLU after the pool.

Usage::

    python benchmarks/cnn_layouts.py --repeats 7
    python benchmarks/cnn_layouts.py --variants banded,lib,blk4+blk2 --mode vmap --clients 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if __package__ in (None, ""):  # run as a script from anywhere in the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from fedrnd.models import CNN, banded, from_flax  # noqa: E402

# ---------------------------------------------------------------------------------------------
# NHWC building blocks


def _pads(k: int) -> tuple[int, int]:
    return (k - 1) // 2, k // 2  # flax / XLA 'same'


def patches(x: jax.Array, k: int) -> jax.Array:
    """``[B, H, W, C] -> [B, H, W, k k C]``, ordered (dy, dx, c) like an HWIO kernel."""
    lo, hi = _pads(k)
    _, h, w, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0)))
    return jnp.concatenate([xp[:, dy:dy + h, dx:dx + w] for dy in range(k) for dx in range(k)],
                           axis=-1)


def col2im(g: jax.Array, k: int, c: int) -> jax.Array:
    """The adjoint of :func:`patches`: ``[B, H, W, k k C] -> [B, H, W, C]``."""
    lo, hi = _pads(k)
    _, h, w, _ = g.shape
    gp = jnp.pad(g, ((0, 0), (hi, lo), (hi, lo), (0, 0)))
    out = None
    for dy in range(k):
        for dx in range(k):
            t = (dy * k + dx) * c
            s = gp[:, k - 1 - dy:k - 1 - dy + h, k - 1 - dx:k - 1 - dx + w, t:t + c]
            out = s if out is None else out + s
    return out


def _mm(a: jax.Array, w: jax.Array) -> jax.Array:
    """``[..., K] @ [K, N]`` as one 2-D product."""
    return (a.reshape(-1, a.shape[-1]) @ w).reshape(*a.shape[:-1], w.shape[-1])


def conv_im2col(x: jax.Array, kernel: jax.Array) -> jax.Array:
    k, _, ci, co = kernel.shape
    return _mm(patches(x, k), kernel.reshape(k * k * ci, co))


def _im2colv_impl(x, kernel):
    return conv_im2col(x, kernel)


@jax.custom_vjp
def conv_im2colv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return _im2colv_impl(x, kernel)


def _im2colv_fwd(x, kernel):
    k, _, ci, co = kernel.shape
    p = patches(x, k)
    return _mm(p, kernel.reshape(k * k * ci, co)), (p, kernel)


def _patch_bwd(p, kernel, dz):
    k, _, ci, co = kernel.shape
    kk = k * k * ci
    dw = jax.lax.dot_general(p.reshape(-1, kk), dz.reshape(-1, co), (((0,), (0,)), ((), ())))
    dx = col2im(_mm(dz, kernel.reshape(kk, co).T), k, ci)
    return dx, dw.reshape(kernel.shape)


def _im2colv_bwd(res, dz):
    p, kernel = res
    return _patch_bwd(p, kernel, dz)


conv_im2colv.defvjp(_im2colv_fwd, _im2colv_bwd)


def _shift_impl(x, kernel):
    k, _, ci, _ = kernel.shape
    lo, hi = _pads(k)
    _, h, w, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0)))
    out = None
    for dy in range(k):
        for dx in range(k):
            s = xp[:, dy:dy + h, dx:dx + w]
            t = s * kernel[dy, dx, 0] if ci == 1 else _mm(s, kernel[dy, dx])
            out = t if out is None else out + t
    return out


@jax.custom_vjp
def conv_shift(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return _shift_impl(x, kernel)


def _shift_fwd(x, kernel):
    return _shift_impl(x, kernel), (x, kernel)


def _shift_bwd(res, dz):
    x, kernel = res
    return _patch_bwd(patches(x, kernel.shape[0]), kernel, dz)


conv_shift.defvjp(_shift_fwd, _shift_bwd)


def conv_xla(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def pool_same(z: jax.Array) -> jax.Array:
    """2x2 max pool, stride 2, 'same' (ceil: an odd edge pairs with itself)."""
    b, h, w, c = z.shape
    if h % 2 or w % 2:
        z = jnp.pad(z, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=-jnp.inf)
        h, w = h + h % 2, w + w % 2
    return z.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def parity_patches(x: jax.Array, k: int) -> jax.Array:
    """``[B, H, W, C] -> [4, B, H2, W2, k k C]``: the patches of output pixel ``(2 i + py,
    2 j + px)`` in block ``2 py + px`` (``H2 = ceil(H / 2)``; an odd size gets one zero row /
    column more, a virtual output that :func:`pool_blocks` overwrites)."""
    lo, hi = _pads(k)
    _, h, w, _ = x.shape
    h2, w2 = -(-h // 2), -(-w // 2)
    xp = jnp.pad(x, ((0, 0), (lo, hi + h % 2), (lo, hi + w % 2), (0, 0)))
    return jnp.stack([
        jnp.concatenate([xp[:, py + dy:py + dy + 2 * h2 - 1:2, px + dx:px + dx + 2 * w2 - 1:2]
                         for dy in range(k) for dx in range(k)], axis=-1)
        for py in (0, 1) for px in (0, 1)])


def _parity_taps(x: jax.Array, k: int):
    lo, hi = _pads(k)
    _, h, w, _ = x.shape
    h2, w2 = -(-h // 2), -(-w // 2)
    xp = jnp.pad(x, ((0, 0), (lo, hi + h % 2), (lo, hi + w % 2), (0, 0)))
    return [[xp[:, py + dy:py + dy + 2 * h2 - 1:2, px + dx:px + dx + 2 * w2 - 1:2]
             for dy in range(k) for dx in range(k)] for py in (0, 1) for px in (0, 1)]


def _parity_dx(dz: jax.Array, kernel: jax.Array, h: int, w: int) -> jax.Array:
    """Input gradient of a parity-ordered convolution: dZ back to pixel order, col2im."""
    k, _, ci, co = kernel.shape
    _, b, h2, w2, _ = dz.shape
    dzn = dz.reshape(2, 2, b, h2, w2, co).transpose(2, 3, 0, 4, 1, 5).reshape(
        b, 2 * h2, 2 * w2, co)
    return col2im(_mm(dzn, kernel.reshape(k * k * ci, co).T), k, ci)[:, :h, :w]


def _pdw(p, dz, kernel):
    k, _, ci, co = kernel.shape
    kk = k * k * ci
    return jax.lax.dot_general(p.reshape(-1, kk), dz.reshape(-1, co),
                               (((0,), (0,)), ((), ()))).reshape(kernel.shape)


def _parity_impl(x, kernel, taps_fwd):
    k, _, ci, co = kernel.shape
    if taps_fwd and ci == 1:
        out = []
        for blk in _parity_taps(x, k):
            acc = None
            for t, s in enumerate(blk):
                v = s * kernel[t // k, t % k, 0]
                acc = v if acc is None else acc + v
            out.append(acc)
        return jnp.stack(out)
    return _mm(parity_patches(x, k), kernel.reshape(k * k * ci, co))


@jax.custom_vjp
def conv_parity(x, kernel):
    """'same' convolution, output ``[4, B, H2, W2, Co]`` in parity blocks (im2col product)."""
    return _parity_impl(x, kernel, False)


def _cp_fwd(x, kernel):
    k, _, ci, co = kernel.shape
    p = parity_patches(x, k)
    return _mm(p, kernel.reshape(k * k * ci, co)), (p, kernel, x.shape[1], x.shape[2])


def _cp_bwd(res, dz):
    p, kernel, h, w = res
    return _parity_dx(dz, kernel, h, w), _pdw(p, dz, kernel)


conv_parity.defvjp(_cp_fwd, _cp_bwd)


@jax.custom_vjp
def conv_parity_taps(x, kernel):
    """As :func:`conv_parity`; for ``Ci = 1`` the forward is ``k k`` multiply-adds, patches are
    built in the backward only."""
    return _parity_impl(x, kernel, True)


def _cpt_fwd(x, kernel):
    return _parity_impl(x, kernel, True), (x, kernel)


def _cpt_bwd(res, dz):
    x, kernel = res
    return (_parity_dx(dz, kernel, x.shape[1], x.shape[2]),
            _pdw(parity_patches(x, kernel.shape[0]), dz, kernel))


conv_parity_taps.defvjp(_cpt_fwd, _cpt_bwd)


def pool_blocks(z: jax.Array, h: int, w: int) -> jax.Array:
    """2x2 'same' max pool of parity blocks ``[4, B, H2, W2, C]``: the maximum of the four
    blocks (an odd image's virtual last row / column takes the real one's values)."""
    z00, z01, z10, z11 = z[0], z[1], z[2], z[3]
    if h % 2:
        z10 = jnp.concatenate([z10[:, :-1], z00[:, -1:]], axis=1)
        z11 = jnp.concatenate([z11[:, :-1], z01[:, -1:]], axis=1)
    if w % 2:
        z01 = jnp.concatenate([z01[:, :, :-1], z00[:, :, -1:]], axis=2)
        z11 = jnp.concatenate([z11[:, :, :-1], z10[:, :, -1:]], axis=2)
    return jnp.maximum(jnp.maximum(z00, z01), jnp.maximum(z10, z11))


def pool4(z: jax.Array) -> jax.Array:
    """2x2 'same' max pool as the maximum of four strided slices."""
    b, h, w, c = z.shape
    if h % 2 or w % 2:
        z = jnp.pad(z, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=-jnp.inf)
    return jnp.maximum(jnp.maximum(z[:, 0::2, 0::2], z[:, 0::2, 1::2]),
                       jnp.maximum(z[:, 1::2, 0::2], z[:, 1::2, 1::2]))


def _row_blocks(y: jax.Array, h: int, w: int, kshape, wb: int):
    """Images-first block windows ``[B h nb, k ng wb Ci]`` of ``y [B, h, w Ci]`` (even ``w``),
    with ``nb`` and ``ng``: the stacking the library's blocked layer used before."""
    b = y.shape[0]
    k, _, ci, _ = kshape
    lo, hi = _pads(k)
    nb, ng = w // wb, -(-(wb + k - 1) // wb)
    wp = (nb + ng - 1) * wb
    xp = jnp.pad(y.reshape(b, h, w, ci), ((0, 0), (lo, hi), (lo, wp - w - lo), (0, 0)))
    xp = xp.reshape(b, h + k - 1, nb + ng - 1, wb * ci)
    st = jnp.concatenate([xp[:, dy:dy + h, g:g + nb] for dy in range(k) for g in range(ng)],
                         axis=-1).reshape(b * h * nb, k * ng * wb * ci)
    return st, nb, ng


def conv_blocked_autodiff(y: jax.Array, h: int, w: int, kernel: jax.Array, wb: int
                          ) -> jax.Array:
    """:func:`fedrnd.models.banded.block_conv_pool` (even ``w`` only) with the banded matrix
    built through the constant 0/1 map where small and the pool differentiated by autodiff
    (nested maximums), as the full-width layer does: what the library's custom pool JVP and
    einsum-built matrix gain."""
    b, co = y.shape[0], kernel.shape[-1]
    st, nb, ng = _row_blocks(y, h, w, kernel.shape, wb)
    cols, half = banded.pool_columns(wb, "valid")
    z = (st @ banded.banded_matrix(kernel, ng * wb, cols, 0)).reshape(b, h, nb, wb * co)
    z = jnp.maximum(z[..., :half * co], z[..., half * co:]).reshape(b, h, w // 2 * co)
    top, bottom = z[:, 0::2], z[:, 1::2]
    if bottom.shape[1] < top.shape[1]:
        bottom = jnp.concatenate([bottom, z[:, -1:]], axis=1)
    return jnp.maximum(top, bottom)


def _row_windows(z: jax.Array) -> jax.Array:
    b, h, nb, c2 = z.shape
    if h % 2:
        z = jnp.concatenate([z, z[:, -1:]], axis=1)
    return z.reshape(b, -(-h // 2), 2, nb, 2, c2 // 2)


@jax.custom_jvp
def _row_pool(z: jax.Array) -> jax.Array:
    return jnp.max(_row_windows(z), axis=(2, 4))


@_row_pool.defjvp
def _row_pool_jvp(primals, tangents):
    (z,), (t,) = primals, tangents
    z6 = _row_windows(z)
    a, b, c, d = z6[:, :, 0, :, 0], z6[:, :, 0, :, 1], z6[:, :, 1, :, 0], z6[:, :, 1, :, 1]
    m = jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))
    ta = a == m
    tb = (b == m) & ~ta
    tc = (c == m) & ~(ta | tb)
    td = ~(ta | tb | tc)
    one_hot = jnp.stack([jnp.stack([ta, tb], axis=3), jnp.stack([tc, td], axis=3)], axis=2)
    return m, jnp.sum(jnp.where(one_hot, _row_windows(t), 0), axis=(2, 4))


def conv_blocked_rows(y: jax.Array, h: int, w: int, kernel: jax.Array, wb: int) -> jax.Array:
    """Blocks with images first (``[B H nb, K] x [K, N]``, even ``w`` only): the library's
    blocked layer before it moved to channels first, images last; the weight gradient then
    contracts the long axis as a major one."""
    b, k, co = y.shape[0], kernel.shape[0], kernel.shape[-1]
    st, nb, ng = _row_blocks(y, h, w, kernel.shape, wb)
    cols, _ = banded.pool_columns(wb, "valid")
    band = jnp.asarray(banded.band(ng * wb, cols, k, 0))
    mat = jnp.einsum("ujx,yxio->yuijo", band, kernel).reshape(st.shape[1], wb * co)
    z = (st @ mat).reshape(b, h, nb, wb * co)
    return _row_pool(z).reshape(b, -(-h // 2), (w // 2) * co)


PARITY = {"par": conv_parity, "part": conv_parity_taps}

NHWC = {"xla": conv_xla, "im2col": conv_im2col, "im2colv": conv_im2colv, "shift": conv_shift}


def make_apply(layouts: list[str]):
    """The CNN's forward pass with one convolution layout per layer (the last repeated)."""

    def apply(params, x):
        names = banded._conv_names(params)
        b, h, w, c = x.shape
        y, flat = x, False  # flat: [B, H, W * C] (banded layout); else NHWC
        for i, name in enumerate(names):
            lay = layouts[min(i, len(layouts) - 1)]
            kern, bias = params[name]["kernel"], params[name]["bias"]
            if lay.startswith(("blk", "rows")):
                if not flat:
                    y, flat = y.reshape(b, h, w * c), True
                if lay.startswith("rows"):
                    y = conv_blocked_rows(y, h, w, kern, int(lay[4:]))
                elif lay.endswith("a"):
                    y = conv_blocked_autodiff(y, h, w, kern, int(lay[3:-1]))
                else:
                    y = banded.block_conv_pool(y, h, w, kern, int(lay[3:]))
                h, w, c = -(-h // 2), -(-w // 2), kern.shape[-1]
                y = jax.nn.relu(y + jnp.tile(bias, w))
            elif lay == "banded":
                if not flat:
                    y, flat = y.reshape(b, h, w * c), True
                y, h, w = banded.conv_layer(y, h, w, kern, bias, pool="same")
                c = kern.shape[-1]
            else:
                if flat:
                    y, flat = y.reshape(b, h, w, c), False
                if lay in PARITY:
                    y = pool_blocks(PARITY[lay](y, kern), h, w)
                elif lay.endswith("4"):
                    y = pool4(NHWC[lay[:-1]](y, kern))
                else:
                    y = pool_same(NHWC[lay](y, kern))
                y = jax.nn.relu(y + bias)
                b, h, w, c = y.shape
        y = y.reshape(b, -1)
        y = jax.nn.relu(y @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
        return y @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]

    return apply


# ---------------------------------------------------------------------------------------------
# The timed function


def make_train(apply, steps: int, lr: float, mode: str):
    def loss(p, x, y):
        logp = jax.nn.log_softmax(apply(p, x))
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], 1))

    grad = jax.value_and_grad(loss)

    def client(args):
        p, xs, ys = args  # xs [T, B, ...]

        def step(p, t):
            v, g = grad(p, xs[t], ys[t])
            return jax.tree.map(lambda a, b: a - lr * b, p, g), v

        p, losses = jax.lax.scan(step, p, jnp.arange(steps))
        return p, losses.mean()

    if mode == "map":
        return jax.jit(lambda p, xs, ys: jax.lax.map(client, (p, xs, ys)))
    return jax.jit(jax.vmap(lambda p, xs, ys: client((p, xs, ys))))


def true_flops(shape, channels, kernel, dense, classes, batch) -> float:
    """Multiply-adds x 2 of one SGD step's plain arithmetic (forward + both gradients)."""
    h, w, c = shape
    total = 0.0
    for i, co in enumerate(channels):
        mac = batch * h * w * kernel * kernel * c * co
        total += mac * (2 if i == 0 else 3)  # forward, dW (+ dX after the first layer)
        h, w, c = -(-h // 2), -(-w // 2), co
    for i, (a, b) in enumerate([(h * w * c, dense), (dense, classes)]):
        total += batch * a * b * (2 if i == 0 else 3)
    return 2.0 * total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="banded,lib,xla,im2col,im2colv,im2colv4,shift,"
                    "shift+im2colv,banded+im2colv,par,part+par,blk4a+blk2a,rows4+rows2,"
                    "rows2+rows2,blk2+blk2,blk4+blk2,blk14+blk2,blk4+banded,banded+blk2",
                    help="comma-separated; a variant is layer layouts joined by '+'")
    ap.add_argument("--mode", choices=("map", "vmap"), default="map")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--shape", default="28,28,1")
    ap.add_argument("--channels", default="8,16")
    ap.add_argument("--kernel", type=int, default=5)
    ap.add_argument("--dense", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.json and os.path.exists(args.json):
        ap.error(f"--json {args.json}: the file exists; results never replace an earlier one")

    shape = tuple(int(s) for s in args.shape.split(","))
    channels = tuple(int(s) for s in args.channels.split(","))
    classes, C, T, B = 10, args.clients, args.steps, args.batch
    ref = from_flax(CNN(classes, channels, args.dense, args.kernel), shape, classes)
    keys = jax.random.split(jax.random.key(0), C)
    params = jax.vmap(ref.init)(keys)
    xs = jax.random.uniform(jax.random.key(1), (C, T, B, *shape))
    ys = jax.random.randint(jax.random.key(2), (C, T, B), 0, classes)
    flops = true_flops(shape, channels, args.kernel, args.dense, classes, B)

    variants = args.variants.split(",")
    fns = {}
    p_ref = None
    for v in variants:
        apply = {"flax": ref.apply, "lib": banded.cnn_apply}.get(v) or make_apply(v.split("+"))
        fn = make_train(apply, T, 0.05, args.mode)
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(params, xs, ys))
        comp = time.perf_counter() - t0
        if p_ref is None:
            p_ref = out[0]
        diff = max(float(jnp.max(jnp.abs(a - b)))
                   for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(p_ref), strict=True))
        fns[v] = fn
        print(f"{v:>16}: compiled + first call {comp:.1f} s, max |param - {variants[0]}| "
              f"{diff:.1e}", flush=True)

    cpu = {v: [] for v in variants}
    wall = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            c0, w0 = time.process_time(), time.perf_counter()
            jax.block_until_ready(fns[v](params, xs, ys))
            cpu[v].append((time.process_time() - c0) / (C * T))
            wall[v].append((time.perf_counter() - w0) / (C * T))

    print(f"\nload average {os.getloadavg()}; mode {args.mode}, {C} clients x {T} steps of "
          f"{B}; true arithmetic {flops / 1e6:.1f} MFLOP a step")
    print(f"{'variant':>16} {'CPU ms/step':>12} {'wall ms/step':>13} {'GFLOP/s (CPU)':>14} "
          f"{'vs banded (CPU)':>16}")
    base = statistics.median(cpu[variants[0]])
    rows = []
    for v in variants:
        mc, mw = statistics.median(cpu[v]), statistics.median(wall[v])
        rows.append(dict(variant=v, cpu_s_per_step=mc, wall_s_per_step=mw,
                         gflops_per_cpu_s=flops / mc / 1e9, cpu_all=cpu[v], wall_all=wall[v]))
        print(f"{v:>16} {mc * 1e3:12.3f} {mw * 1e3:13.3f} {flops / mc / 1e9:14.1f} "
              f"{base / mc:15.2f}x")
    if args.json:
        with open(args.json, "x") as f:  # never replaces an earlier result
            json.dump(dict(args=vars(args), load=os.getloadavg(), flops_per_step=flops,
                           jax=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""),
                           cpus=len(os.sched_getaffinity(0)), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
