"""RND network pairs: a frozen random *target* and a narrow trainable *predictor*.

Random Network Distillation for federation discovery (Domini et al. 2026, "Discovering
Collaboration from Novelty", arXiv 2606.30499): every client shares one frozen, randomly
initialised target ``f`` (made from one global seed) and trains a small predictor ``f_i`` of
the same topology, far narrower, to imitate it on its own inputs. The predictor is
deliberately under-capacity, so it fits only the input distribution it was trained on.

Two families, both pure ``(init, apply)`` pairs wrapped as :class:`fedrnd.models.Model`
(``num_classes`` is the output dimension):

* ``"conv"`` (images ``[H, W, C]``), the authors' design: Conv3x3(pad 1) -> ReLU -> MaxPool2 ->
  Conv3x3(pad 1) -> ReLU -> adaptive average pool to 4x4 (PyTorch's bins) -> Linear(64).
  Target channels ``(32, 64)`` (about 85k parameters on RGB), predictor ``(2, 4)`` (about 4.3k).
* ``"mlp"`` (vectors, or flattened images): ReLU MLP, target hidden ``(256, 256)``, predictor
  ``(32,)``, both to 64 outputs. Same spirit: the target is wide and random, the predictor
  narrow.

All weights are Kaiming-normal (fan-in, ReLU gain, untruncated as in PyTorch's
``kaiming_normal_``) with zero biases, as in the authors' code.

Because the target never changes, its output is computed once per pool example
(:func:`target_features`, a ``[P, out_dim]`` array) and every later step reads that cache.

Speed (``benchmarks/discovery.py``, figures in ``benchmarks/RESULTS.md``):

* Training applies the conv predictor through :func:`conv_apply` (3x3 convolutions as banded
  matrix products on ``[B, H, W * C]`` activations, :mod:`fedrnd.models.banded`; same numbers
  as the flax module): on a CPU XLA's convolution with 1-4 channels, and above all its
  gradient, made a training step several times slower.
* The novelty matrix evaluates ``K`` predictors on the same ``N`` probe examples at once
  (:func:`stacked_errors`) with the predictor index inside the layers instead of a vmap over
  predictors: the MLP's first layer is one ``[K * h, D] x [D, N]`` product; the conv pair's
  first convolution is one convolution with ``K * c1`` output channels on the shared images
  and the later (per-predictor, grouped) convolutions are shifted multiply-adds over a
  ``[N, H, W, K, c]`` layout. About 3x (MLP) and 4-5x (conv) the pair evaluations per CPU
  second of the vmapped per-predictor apply.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedrnd.models import Model, from_flax
from fedrnd.models.banded import BANDED_MAX_WIDTH, conv_layer

__all__ = [
    "NETWORKS",
    "RNDConv",
    "RNDMLP",
    "RNDPair",
    "adaptive_avg_pool",
    "adaptive_pool_matrix",
    "conv_apply",
    "make_pair",
    "pool_inputs",
    "pooled_shape",
    "stacked_errors",
    "target_features",
]

NETWORKS = ("conv", "mlp")

# PyTorch's kaiming_normal_(mode="fan_in", nonlinearity="relu"): N(0, 2 / fan_in), untruncated.
kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def adaptive_pool_matrix(size_in: int, size_out: int) -> np.ndarray:
    """``[size_out, size_in]`` averaging matrix of PyTorch's adaptive average pooling (1-D).

    Output bin ``i`` averages inputs ``floor(i * n / m) <= k < ceil((i + 1) * n / m)``
    (``n = size_in``, ``m = size_out``): bins overlap when ``m`` does not divide ``n`` and
    repeat inputs when ``m > n``, exactly as ``torch.nn.AdaptiveAvgPool2d`` does.
    """
    if size_in < 1 or size_out < 1:
        raise ValueError(f"adaptive pool sizes must be >= 1, got {size_in} -> {size_out}")
    a = np.zeros((size_out, size_in), np.float32)
    for i in range(size_out):
        start = (i * size_in) // size_out
        end = -(-((i + 1) * size_in) // size_out)
        a[i, start:end] = 1.0 / (end - start)
    return a


def adaptive_avg_pool(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """PyTorch ``adaptive_avg_pool2d`` on NHWC: ``[B, H, W, C] -> [B, oh, ow, C]``.

    Pooling is separable (each bin is a rectangle), so it is two small matrix products with
    static averaging matrices; this is exact for any ``H, W`` (odd sizes included).
    """
    ah = jnp.asarray(adaptive_pool_matrix(x.shape[1], out_hw[0]))
    aw = jnp.asarray(adaptive_pool_matrix(x.shape[2], out_hw[1]))
    return jnp.einsum("ih,jw,bhwc->bijc", ah, aw, x)


def pooled_shape(feature_shape: Sequence[int], factor: int) -> tuple[int, ...]:
    """Feature shape after :func:`pool_inputs` by ``factor`` (``[H, W, C]`` images only)."""
    shape = tuple(int(s) for s in feature_shape)
    if not isinstance(factor, int | np.integer) or factor < 1:
        raise ValueError(f"input_pool must be an integer >= 1, got {factor!r}")
    if factor == 1:
        return shape
    if len(shape) != 3:
        raise ValueError(f"input_pool = {factor} averages image pixels, but the features have "
                         f"shape {shape}, not [H, W, C]; use input_pool = 1")
    return (-(-shape[0] // factor), -(-shape[1] // factor), shape[2])


def pool_inputs(x: jax.Array, factor: int) -> jax.Array:
    """Average-pool images ``[P, H, W, C]`` by ``factor`` (PyTorch's adaptive average pooling
    to ``ceil(H / factor) x ceil(W / factor)``; exact 2x2 means for 28x28 and ``factor = 2``).

    The RND pair then sees the coarser image: the first layer of the MLP pair shrinks by
    ``factor^2`` (784 -> 196 inputs for Fashion-MNIST at 2), and so does most of its training
    cost; rotations, smooth shifts and class mixes stay visible at 14x14.
    """
    if factor == 1:
        return x
    h, w, _ = pooled_shape(x.shape[1:], factor)
    return adaptive_avg_pool(jnp.asarray(x, jnp.float32), (h, w))


class RNDConv(nn.Module):
    """The authors' RND conv network (target or predictor, by ``channels``).

    ``[B, H, W, C_in] -> [B, out_dim]``: Conv3x3(channels[0], pad 1) + ReLU, MaxPool 2 (floor),
    then Conv3x3(channels[k], pad 1) + ReLU for every further width, adaptive average pool to
    ``pool x pool``, flatten, Linear(out_dim).
    """

    channels: Sequence[int] = (32, 64)
    out_dim: int = 64
    pool: int = 4

    @nn.compact
    def __call__(self, x):
        for k, ch in enumerate(self.channels):
            x = nn.Conv(ch, (3, 3), padding=1, kernel_init=kaiming_normal,
                        bias_init=nn.initializers.zeros)(x)
            x = nn.relu(x)
            if k == 0:
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        x = adaptive_avg_pool(x, (self.pool, self.pool))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.out_dim, kernel_init=kaiming_normal,
                        bias_init=nn.initializers.zeros)(x)


class RNDMLP(nn.Module):
    """ReLU MLP on flattened inputs: ``[B, ...] -> [B, out_dim]``."""

    hidden: Sequence[int] = (256, 256)
    out_dim: int = 64

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for h in self.hidden:
            x = nn.relu(nn.Dense(h, kernel_init=kaiming_normal,
                                 bias_init=nn.initializers.zeros)(x))
        return nn.Dense(self.out_dim, kernel_init=kaiming_normal,
                        bias_init=nn.initializers.zeros)(x)


DEFAULT_WIDTHS = {"conv": ((32, 64), (2, 4)), "mlp": ((256, 256), (32,))}
"""``kind -> (target widths, predictor widths)``: conv channels or MLP hidden sizes."""


@dataclasses.dataclass(frozen=True)
class RNDPair:
    """A target/predictor pair for inputs of ``feature_shape``.

    ``target.apply(params, x)`` and ``predictor.apply(params, x)`` map ``[B, *feature_shape]``
    to ``[B, out_dim]``. ``target_params(seed)`` is the frozen target every client shares.
    """

    kind: str
    target: Model
    predictor: Model
    out_dim: int

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return self.target.feature_shape

    def target_params(self, seed: int = 0):
        """The one frozen target, from a global seed (identical for every client)."""
        return self.target.init(jax.random.key(seed))


@functools.lru_cache(maxsize=64)
def _make_pair(kind: str, feature_shape: tuple[int, ...], target_width: tuple[int, ...],
               predictor_width: tuple[int, ...], out_dim: int) -> RNDPair:
    if kind == "conv":
        t = RNDConv(target_width, out_dim)
        p = RNDConv(predictor_width, out_dim)
    else:
        t = RNDMLP(target_width, out_dim)
        p = RNDMLP(predictor_width, out_dim)
    target = from_flax(t, feature_shape, out_dim, f"rnd_{kind}_target")
    predictor = from_flax(p, feature_shape, out_dim, f"rnd_{kind}_predictor")
    if kind == "conv":
        # Same parameters and numbers as the flax module, faster to train on a CPU.
        predictor = dataclasses.replace(predictor, apply=functools.partial(conv_apply,
                                                                           pool=p.pool),
                                        reference_apply=predictor.apply)
    return RNDPair(kind, target, predictor, out_dim)


def make_pair(kind: str, feature_shape: Sequence[int], *,
              target_width: Sequence[int] | None = None,
              predictor_width: Sequence[int] | None = None, out_dim: int = 64) -> RNDPair:
    """Build an RND pair (cached: equal arguments return the same object, so jitted programs
    keyed on it compile once).

    Args:
      kind: ``"conv"`` (needs ``feature_shape = (H, W, C)``), ``"mlp"``, or ``"auto"`` (conv
        for 3-D features, MLP otherwise).
      target_width, predictor_width: conv channels or MLP hidden sizes (defaults in
        :data:`DEFAULT_WIDTHS`: conv ``(32, 64)`` / ``(2, 4)``, MLP ``(256, 256)`` / ``(32,)``).
      out_dim: output dimension of both networks (64 in the paper).
    """
    shape = tuple(int(s) for s in feature_shape)
    if kind == "auto":
        kind = "conv" if len(shape) == 3 else "mlp"
    if kind not in NETWORKS:
        raise ValueError(f"RND network {kind!r} is unknown; allowed: {list(NETWORKS)} or 'auto'")
    if kind == "conv" and len(shape) != 3:
        raise ValueError(f"the conv RND pair needs image features [H, W, C], got {shape}; "
                         "use network='mlp'")
    if not isinstance(out_dim, int | np.integer) or out_dim < 1:
        raise ValueError(f"out_dim must be an integer >= 1, got {out_dim!r}")
    tw, pw = DEFAULT_WIDTHS[kind]
    tw = tuple(int(w) for w in (tw if target_width is None else target_width))
    pw = tuple(int(w) for w in (pw if predictor_width is None else predictor_width))
    for nm, w in (("target_width", tw), ("predictor_width", pw)):
        if (kind == "conv" and not w) or any(v < 1 for v in w):
            raise ValueError(f"{nm} must list positive widths, got {w}")
    return _make_pair(kind, shape, tw, pw, int(out_dim))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _target_features(apply, params, x, batch):
    p = x.shape[0]
    pad = (-p) % batch
    xp = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
    out = jax.lax.map(lambda xb: apply(params, xb), xp.reshape(-1, batch, *x.shape[1:]))
    return out.reshape(-1, out.shape[-1])[:p]


def target_features(pair: RNDPair, params, x: jax.Array, batch: int = 512) -> jax.Array:
    """The frozen target's outputs for every pool row: ``[P, *feature_shape] -> [P, out_dim]``.

    Computed once (the target never changes) in batches of ``batch`` rows.
    """
    if tuple(x.shape[1:]) != pair.feature_shape:
        raise ValueError(f"pool features have shape {tuple(x.shape[1:])}, the RND pair expects "
                         f"{pair.feature_shape}")
    return _target_features(pair.target.apply, params, jnp.asarray(x, jnp.float32),
                            max(1, min(int(batch), int(x.shape[0]))))


# --------------------------------------------------------------------------------------------
# fast forward passes
# --------------------------------------------------------------------------------------------


def _layers(params, prefix: str) -> list[str]:
    """``prefix_0, prefix_1, ...`` in numeric order (``_10`` after ``_9``)."""
    names = [k for k in params if k.startswith(prefix + "_")]
    return sorted(names, key=lambda k: int(k.rsplit("_", 1)[1]))


def _max_pool2(x: jax.Array) -> jax.Array:
    """2x2 max pool, stride 2, floor (``nn.max_pool(..., "VALID")``) over axes 1 and 2.

    A reshape and a max: the faster forward pass (the novelty matrix; 1.4x the strided slices
    of :func:`_max_pool2_slices` on the conv pair's first layer for 64 predictors).
    """
    h, w = x.shape[1] // 2, x.shape[2] // 2
    x = x[:, : 2 * h, : 2 * w]
    return x.reshape(x.shape[0], h, 2, w, 2, *x.shape[3:]).max(axis=(2, 4))


def _max_pool2_slices(x: jax.Array) -> jax.Array:
    """:func:`_max_pool2` as the maximum of four strided slices, for training: its gradient is
    a few selects, where the reshape-max's or ``reduce_window``'s cost 1.4-1.8x as much per
    training step on a CPU. (Ties split the gradient differently; after a ReLU they are zeros,
    whose gradient is zero either way.)"""
    h, w = x.shape[1] // 2, x.shape[2] // 2
    a, b = x[:, 0:2 * h:2, 0:2 * w:2], x[:, 0:2 * h:2, 1:2 * w:2]
    c, d = x[:, 1:2 * h:2, 0:2 * w:2], x[:, 1:2 * h:2, 1:2 * w:2]
    return jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))


def _shifts(x: jax.Array):
    """The nine ``(dy, dx)`` windows of a 3x3 'same' convolution over axes 1 and 2 (pad 1)."""
    h, w = x.shape[1], x.shape[2]
    pad = [(0, 0), (1, 1), (1, 1)] + [(0, 0)] * (x.ndim - 3)
    xp = jnp.pad(x, pad)
    return [xp[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)]


def _conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """3x3 convolution, padding 1, by im2col: ``[B, H, W, Ci] -> [B, H, W, Co]`` (patch
    features ``(dy, dx, ci)``, the kernel's row-major order). Wide images only (see
    :func:`conv_apply`)."""
    patches = jnp.concatenate(_shifts(x), axis=-1)
    return patches @ kernel.reshape(-1, kernel.shape[-1]) + bias


def _pooled_dense(y: jax.Array, h: int, w: int, c: int, dense, pool: int) -> jax.Array:
    """Adaptive average pool to ``pool x pool`` then the dense layer, as one product:
    ``y [B, h * w * c]`` (row-major ``(h, w, c)``) times the dense kernel pulled back through
    the (linear) pool, ``kron(A_h, A_w)^T`` applied to its ``(i, j)`` rows."""
    wd = dense["kernel"]  # [(i, j, c), out], flax's flattening order
    q = np.kron(adaptive_pool_matrix(h, pool), adaptive_pool_matrix(w, pool)).T
    weff = (jnp.asarray(q, jnp.float32) @ wd.reshape(pool * pool, -1)).reshape(h * w * c, -1)
    return y @ weff + dense["bias"]


def conv_apply(params, x: jax.Array, *, pool: int = 4) -> jax.Array:
    """:class:`RNDConv`'s forward pass from its parameters, convolutions as matrix products.

    ``[B, H, W, C] -> [B, out_dim]``; equal to ``RNDConv(...).apply`` up to float rounding,
    gradients included (``tests/rnd/test_fast_paths.py``). This is what predictor training
    differentiates, so it is laid out for a CPU (:mod:`fedrnd.models.banded`): activations
    ``[B, H, W * C]``, each 3x3 convolution one product with a banded matrix (images up to
    ``BANDED_MAX_WIDTH`` pixels wide), the max pool over two contiguous halves, and the
    adaptive pool and the dense layer one product (:func:`_pooled_dense`). 0.18 ms per Adam
    step of 48 images of 14x14, against 0.27 ms for the NHWC products it replaced and about
    4x that for XLA's convolution (2-core CPU). Wider images: im2col in NHWC.
    """
    names = _layers(params, "Conv")
    b, h, w, ci = x.shape
    if w > BANDED_MAX_WIDTH:
        return _conv_apply_nhwc(params, x, pool)
    y = x.reshape(b, h, w * ci)
    for k, name in enumerate(names):
        y, h, w = conv_layer(y, h, w, params[name]["kernel"], params[name]["bias"],
                             pool="valid" if k == 0 else None)
    c = params[names[-1]]["kernel"].shape[-1]
    return _pooled_dense(y.reshape(b, -1), h, w, c, params["Dense_0"], pool)


def _conv_apply_nhwc(params, x: jax.Array, pool: int) -> jax.Array:
    """:func:`conv_apply` for wide images: NHWC activations, im2col convolutions."""
    for k, name in enumerate(_layers(params, "Conv")):
        x = jax.nn.relu(_conv3x3(x, params[name]["kernel"], params[name]["bias"]))
        if k == 0:
            x = _max_pool2_slices(x)
    b, h, w, c = x.shape
    return _pooled_dense(x.reshape(b, -1), h, w, c, params["Dense_0"], pool)


def _stacked_mlp(preds, x):
    """``[K, out, N]`` outputs of ``K`` MLP predictors on ``x [N, ...]``.

    The first layer is one product ``[K * h, D] x [D, N]``: all predictors share the inputs.
    Later layers are batched over the predictor axis, kept outermost so each is a plain
    matrix product per predictor (``[K, N, h]`` layouts made XLA transpose every tile).
    """
    x = x.reshape(x.shape[0], -1)
    names = _layers(preds, "Dense")
    a = None
    for i, name in enumerate(names):
        w, b = preds[name]["kernel"], preds[name]["bias"]  # [K, in, out], [K, out]
        if i == 0:
            a = jnp.einsum("kdh,nd->khn", w, x) + b[:, :, None]
        else:
            a = jnp.einsum("khn,kho->kon", a, w) + b[:, :, None]
        if i < len(names) - 1:
            a = jax.nn.relu(a)
    return a


def _grouped_conv3x3(y: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """Per-predictor 3x3 convolutions (pad 1) on ``y [N, H, W, K, Ci]`` -> ``[N, H, W, K, Co]``.

    ``kernel [K, 3, 3, Ci, Co]``. Shifted multiply-adds, ``9 * Ci`` of them, fused by XLA into
    one elementwise loop: with a few channels per predictor this beats a grouped convolution
    (``feature_group_count=K``) about 3x on a CPU.
    """
    out = bias  # [K, Co], broadcast
    ci = y.shape[-1]
    for s, win in enumerate(_shifts(y)):
        dy, dx = divmod(s, 3)
        for c in range(ci):
            out = out + win[..., c, None] * kernel[:, dy, dx, c, :]
    return out


def _stacked_conv(preds, x, pool: int):
    """``[K, out, N]`` outputs of ``K`` conv predictors on shared images ``x [N, H, W, C]``."""
    names = _layers(preds, "Conv")
    k0 = preds[names[0]]["kernel"]  # [K, 3, 3, C, c1]
    kk, c1 = k0.shape[0], k0.shape[-1]
    # One convolution with K * c1 output channels (channel k * c1 + c) on the shared images.
    w = jnp.transpose(k0, (1, 2, 3, 0, 4)).reshape(3, 3, x.shape[-1], kk * c1)
    y = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = _max_pool2(jax.nn.relu(y + preds[names[0]]["bias"].reshape(-1)))
    y = y.reshape(*y.shape[:3], kk, c1)
    for name in names[1:]:
        y = jax.nn.relu(_grouped_conv3x3(y, preds[name]["kernel"], preds[name]["bias"]))
    ah = jnp.asarray(adaptive_pool_matrix(y.shape[1], pool))
    aw = jnp.asarray(adaptive_pool_matrix(y.shape[2], pool))
    q = jnp.einsum("ih,jw,nhwkc->nijkc", ah, aw, y)
    wd = preds["Dense_0"]["kernel"]  # [K, pool * pool * c, out]; flax flattens (i, j, c)
    wd = wd.reshape(kk, pool, pool, y.shape[-1], wd.shape[-1])
    return jnp.einsum("nijkc,kijco->kon", q, wd) + preds["Dense_0"]["bias"][:, :, None]


def stacked_errors(pair: RNDPair, preds, x: jax.Array, t: jax.Array) -> jax.Array:
    """Per-example novelty of ``K`` predictors on the same examples: ``[K, N]``.

    ``preds``: predictor parameters with leaves ``[K, ...]``; ``x [N, *feature_shape]``;
    ``t [N, out_dim]`` the target's outputs on ``x``. Entry ``[k, n]`` is
    ``||f_k(x_n) - t_n||^2`` (summed over output dimensions), equal up to float rounding to
    ``vmap`` of ``pair.predictor.apply`` over predictors, computed with the predictor index
    inside the layers (see the module docstring).
    """
    if pair.kind == "mlp":
        out = _stacked_mlp(preds, x)
    else:
        out = _stacked_conv(preds, x, _POOL)
    return jnp.sum((out - t.T[None]) ** 2, axis=1)


_POOL = RNDConv.pool
