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

__all__ = [
    "NETWORKS",
    "RNDConv",
    "RNDMLP",
    "RNDPair",
    "adaptive_avg_pool",
    "adaptive_pool_matrix",
    "make_pair",
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
    return RNDPair(kind, from_flax(t, feature_shape, out_dim, f"rnd_{kind}_target"),
                   from_flax(p, feature_shape, out_dim, f"rnd_{kind}_predictor"), out_dim)


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
