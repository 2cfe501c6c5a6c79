"""A class-conditional generator for data-free knowledge distillation (flax).

``G(z, y)`` maps a noise vector ``z: [B, noise_dim]`` and a requested class ``y: [B]`` to a
synthetic input ``[B, *feature_shape]``: the class enters through a learned embedding that
multiplies the noise (as in FedFTG / DENSE-style conditional generators), a dense trunk with
layer norm (no batch norm: generator statistics would depend on the batch) and a head whose
output range matches the task data (``"sigmoid"`` for images in ``[0, 1]``, ``"tanh"`` for
``[-1, 1]``, ``"linear"`` for standardised features). Image shapes ``[H, W, C]`` with ``H, W``
divisible by 4 get a small transposed-convolution head (``head="conv"``); everything else, and
``head="dense"``, a dense head reshaped to the feature shape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Params = Any
OUTPUTS = ("sigmoid", "tanh", "linear")
HEADS = ("auto", "dense", "conv")


class ConditionalGenerator(nn.Module):
    """``G(z, y) -> x``: class-conditional generator (see the module docstring)."""

    feature_shape: tuple[int, ...]
    num_classes: int
    hidden: Sequence[int] = (256,)
    output: str = "sigmoid"
    head: str = "auto"
    channels: int = 32

    def _conv_head(self) -> bool:
        shape = self.feature_shape
        if self.head == "dense":
            return False
        ok = len(shape) == 3 and shape[0] % 4 == 0 and shape[1] % 4 == 0
        if self.head == "conv" and not ok:
            raise ValueError(f"generator head='conv' needs image features [H, W, C] with H, W "
                             f"divisible by 4, got {shape}")
        return ok

    @nn.compact
    def __call__(self, z: jax.Array, y: jax.Array) -> jax.Array:
        emb = nn.Embed(self.num_classes, z.shape[-1])(y)
        h = z * emb
        for width in self.hidden:
            h = nn.gelu(nn.LayerNorm()(nn.Dense(width)(h)))
        if self._conv_head():
            hh, ww, cc = self.feature_shape
            ch = self.channels
            h = nn.Dense((hh // 4) * (ww // 4) * 2 * ch)(h).reshape(-1, hh // 4, ww // 4, 2 * ch)
            h = nn.gelu(nn.LayerNorm()(h))
            h = nn.gelu(nn.ConvTranspose(ch, (4, 4), strides=(2, 2), padding="SAME")(h))
            out = nn.ConvTranspose(cc, (4, 4), strides=(2, 2), padding="SAME")(h)
        else:
            out = nn.Dense(int(np.prod(self.feature_shape)))(h)
            out = out.reshape(-1, *self.feature_shape)
        if self.output == "sigmoid":
            return nn.sigmoid(out)
        if self.output == "tanh":
            return jnp.tanh(out)
        return out


@dataclasses.dataclass(frozen=True)
class Generator:
    """A pure generator: ``init(key) -> params``, ``apply(params, z, y) -> x``."""

    init: Callable[[jax.Array], Params]
    apply: Callable[[Params, jax.Array, jax.Array], jax.Array]
    noise_dim: int
    feature_shape: tuple[int, ...]
    num_classes: int


def make_generator(feature_shape: Sequence[int], num_classes: int, *, noise_dim: int = 64,
                   hidden: Sequence[int] = (256,), output: str = "sigmoid",
                   head: str = "auto") -> Generator:
    """Build a :class:`ConditionalGenerator` as a pure ``(init, apply)`` pair.

    Raises ``ValueError`` for a bad ``output``, ``head``, ``noise_dim`` or ``hidden``.
    """
    feature_shape = tuple(int(s) for s in feature_shape)
    if output not in OUTPUTS:
        raise ValueError(f"generator output must be one of {list(OUTPUTS)}, got {output!r}")
    if head not in HEADS:
        raise ValueError(f"generator head must be one of {list(HEADS)}, got {head!r}")
    if isinstance(noise_dim, bool) or not isinstance(noise_dim, int) or noise_dim < 1:
        raise ValueError(f"generator noise_dim must be an integer >= 1, got {noise_dim!r}")
    hidden = tuple(int(h) for h in hidden)
    if any(h < 1 for h in hidden):
        raise ValueError(f"generator hidden widths must be >= 1, got {hidden}")
    module = ConditionalGenerator(feature_shape, int(num_classes), hidden, output, head)

    def init(key: jax.Array) -> Params:
        z = jnp.zeros((1, noise_dim), jnp.float32)
        return module.init(key, z, jnp.zeros((1,), jnp.int32))["params"]

    def apply(params: Params, z: jax.Array, y: jax.Array) -> jax.Array:
        return module.apply({"params": params}, z, y)

    module._conv_head()  # raises for head="conv" on non-image shapes
    return Generator(init, apply, noise_dim, feature_shape, int(num_classes))
