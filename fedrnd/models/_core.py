from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Params = Any


@dataclasses.dataclass(frozen=True)
class DenseStack:
    """The layer structure of a model that is a stack of dense layers on flattened inputs.

    ``apply(params, x)`` equals: ``a = x.reshape(B, -1)``; for every name in ``layers``,
    ``h = a @ params[name]["kernel"] + params[name]["bias"]`` (kernel ``[in, out]``), and
    ``a = activation(h)`` between layers (not after the last). ``activation`` must act
    elementwise. The engine's low-rank fast path (:mod:`fedrnd.engine.lowrank`) reads this
    instead of parsing modules; models without it (``None``) use the general path.
    """

    layers: tuple[str, ...]
    activation: Callable[[jax.Array], jax.Array] = jax.nn.relu


@dataclasses.dataclass(frozen=True)
class Model:
    """A pure model: ``init(key) -> params``, ``apply(params, x) -> logits``.

    ``feature_shape`` is the shape of one example; ``apply`` takes a batch ``[B, *feature_shape]``.
    ``dense``: the layer structure when the model is a plain stack of dense layers (MLP,
    logistic regression), else ``None``.
    """

    init: Callable[[jax.Array], Params]
    apply: Callable[[Params, jax.Array], jax.Array]
    feature_shape: tuple[int, ...]
    num_classes: int
    name: str = "model"
    dense: DenseStack | None = None

    def num_params(self) -> int:
        shapes = jax.eval_shape(self.init, jax.random.key(0))
        return int(sum(np.prod(s.shape) for s in jax.tree_util.tree_leaves(shapes)))


def from_flax(module: nn.Module, feature_shape: Sequence[int], num_classes: int,
              name: str | None = None, dense: DenseStack | None = None) -> Model:
    """Wrap any flax linen module whose ``__call__(x)`` maps ``[B, *feature_shape]`` to logits.

    ``dense``: declare the module a stack of dense layers (see :class:`DenseStack`); only do so
    when it is exactly that.
    """
    feature_shape = tuple(int(s) for s in feature_shape)

    def init(key: jax.Array) -> Params:
        return module.init(key, jnp.zeros((1, *feature_shape), jnp.float32))["params"]

    def apply(params: Params, x: jax.Array) -> jax.Array:
        return module.apply({"params": params}, x)

    return Model(init, apply, feature_shape, int(num_classes), name or type(module).__name__,
                 dense)


class LogisticRegression(nn.Module):
    """Multinomial logistic regression on flattened inputs."""

    num_classes: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


class MLP(nn.Module):
    """Fully connected ReLU network on flattened inputs, e.g. 784-200-200-10 (McMahan et al.)."""

    num_classes: int
    hidden: Sequence[int] = (200, 200)

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for h in self.hidden:
            x = nn.relu(nn.Dense(h)(x))
        return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
    """LeNet-style CNN: two conv(5x5)+ReLU+maxpool(2) blocks, then dense layers (McMahan et al.)."""

    num_classes: int
    channels: Sequence[int] = (32, 64)
    dense: int = 512
    kernel: int = 5

    @nn.compact
    def __call__(self, x):
        for ch in self.channels:
            x = nn.relu(nn.Conv(ch, (self.kernel, self.kernel), padding="SAME")(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.dense)(x))
        return nn.Dense(self.num_classes)(x)


class _ResBlock(nn.Module):
    channels: int
    stride: int

    @nn.compact
    def __call__(self, x):
        # GroupNorm, not BatchNorm: batch statistics are per client and do not average well.
        y = nn.Conv(self.channels, (3, 3), strides=self.stride, padding="SAME", use_bias=False)(x)
        y = nn.relu(nn.GroupNorm(num_groups=min(8, self.channels))(y))
        y = nn.Conv(self.channels, (3, 3), padding="SAME", use_bias=False)(y)
        y = nn.GroupNorm(num_groups=min(8, self.channels))(y)
        if self.stride != 1 or x.shape[-1] != self.channels:
            x = nn.Conv(self.channels, (1, 1), strides=self.stride, use_bias=False)(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """A small pre-activation-free ResNet with GroupNorm (CIFAR-scale; ResNet-8/20 style)."""

    num_classes: int
    stages: Sequence[int] = (16, 32, 64)
    blocks_per_stage: int = 1

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.stages[0], (3, 3), padding="SAME", use_bias=False)(x)
        x = nn.relu(nn.GroupNorm(num_groups=min(8, self.stages[0]))(x))
        for i, ch in enumerate(self.stages):
            for b in range(self.blocks_per_stage):
                x = _ResBlock(ch, 2 if (b == 0 and i > 0) else 1)(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


def _widths(name: str, v: Any) -> tuple[int, ...]:
    """Layer widths from an int or a list of ints; ``ValueError`` naming the option if not all
    are integers >= 1 (flax would fail later, deep inside ``init``, or build empty layers)."""
    items = [v] if isinstance(v, int | np.integer) and not isinstance(v, bool) else v
    if isinstance(items, str) or not isinstance(items, Sequence) or not all(
            isinstance(u, int | np.integer) and not isinstance(u, bool) and u >= 1
            for u in items):
        raise ValueError(f"{name} must be a list of layer widths, integers >= 1, got {v!r}")
    return tuple(int(u) for u in items)


def _positive(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    return int(v)


def _logreg(num_classes: int) -> nn.Module:
    """Multinomial logistic regression on flattened inputs (no options)."""
    return LogisticRegression(num_classes)


def _mlp(num_classes: int, hidden: int | Sequence[int] = (200, 200)) -> nn.Module:
    """Fully connected ReLU network on flattened inputs; ``hidden``: the hidden layer widths
    (``[]`` is logistic regression), e.g. 784-200-200-10 as in McMahan et al. (2017)."""
    return MLP(num_classes, _widths("hidden", hidden))


def _cnn(num_classes: int, channels: int | Sequence[int] = (32, 64), dense: int = 512,
         kernel: int = 5) -> nn.Module:
    """LeNet-style CNN for images: one conv(``kernel`` x ``kernel``)+ReLU+maxpool(2) block per
    entry of ``channels``, then a dense layer of width ``dense`` (McMahan et al., 2017)."""
    return CNN(num_classes, _widths("channels", channels), _positive("dense", dense),
               _positive("kernel", kernel))


def _resnet(num_classes: int, stages: int | Sequence[int] = (16, 32, 64),
            blocks_per_stage: int = 1) -> nn.Module:
    """A small ResNet with GroupNorm for images (CIFAR scale): ``stages`` gives the channels
    of each stage (each stage after the first halves the resolution), ``blocks_per_stage``
    residual blocks each."""
    widths = _widths("stages", stages)
    if not widths:
        raise ValueError("stages must list at least one stage width, got []")
    return ResNet(num_classes, widths, _positive("blocks_per_stage", blocks_per_stage))


MODELS: dict[str, Callable[..., nn.Module]] = {}
"""Model builders by name: ``builder(num_classes, **options) -> flax module``; filled by
:func:`register_model` (the built-ins below use it too)."""

_IMAGE_MODELS: set[str] = set()
"""Registered models that need image inputs ``[H, W, C]`` (checked before ``init``)."""

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


def register_model(name: str | Callable[..., nn.Module] | None = None,
                   builder: Callable[..., nn.Module] | None = None, *,
                   image_input: bool = False, replace: bool = False) -> Any:
    """Add a model builder to :data:`MODELS`.

    ``register_model("name", builder)``, or as a decorator: ``@register_model("name")``
    (``@register_model`` alone takes the function's own name). ``builder(num_classes,
    **options)`` returns a flax linen module mapping ``[B, *feature_shape]`` to logits
    ``[B, num_classes]``; its keyword options are ``model.options``, validated against the
    signature like a built-in's, and building it must be cheap (validation builds it once
    with ``num_classes=2`` to check the options). ``image_input``: the model needs
    ``[H, W, C]`` inputs, refused on vector data before anything is compiled. A name that
    exists raises ``ValueError`` unless ``replace=True``.
    """
    if callable(name):
        return register_model(None, name, image_input=image_input, replace=replace)
    if builder is None:
        return lambda b: register_model(name, b, image_input=image_input, replace=replace)
    key = builder.__name__ if name is None else name
    if not isinstance(key, str) or not _NAME.fullmatch(key):
        raise ValueError(f"a model name must be letters, digits, _ . + -; got {key!r}")
    params = list(inspect.signature(builder).parameters.values())
    if not params or params[0].name != "num_classes" or params[0].kind not in (
            inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
        # The run calls builder(num_classes, **options) and validation skips num_classes by
        # name; any other spelling would surface as a required option.
        raise TypeError(f"model {key!r}: {getattr(builder, '__qualname__', builder)} must take "
                        "(num_classes, **options)")
    if key in MODELS and MODELS[key] is not builder and not replace:
        raise ValueError(f"model {key!r} is already registered; choose another name, or pass "
                         "replace=True to replace it")
    MODELS[key] = builder
    if image_input:
        _IMAGE_MODELS.add(key)
    else:
        _IMAGE_MODELS.discard(key)
    return builder


register_model("logreg", _logreg)
register_model("mlp", _mlp)
register_model("cnn", _cnn, image_input=True)
register_model("resnet", _resnet, image_input=True)


def _unknown_model(name: str) -> ValueError:
    close = difflib.get_close_matches(str(name), list(MODELS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"model.name={name!r} is unknown{hint}; allowed: {sorted(MODELS)}")


def model_parameters(name: str) -> dict[str, inspect.Parameter]:
    """The options of a registered model (``model.options``), with their defaults."""
    if name not in MODELS:
        raise _unknown_model(name)
    params = dict(inspect.signature(MODELS[name]).parameters)
    params.pop("num_classes", None)
    return params


def check_model_options(name: str, options: dict[str, Any]) -> None:
    """Build the (cheap, parameter-free) module once to check ``options`` before any data.

    Raises ``ValueError`` whose message starts with the option at fault.
    """
    params = model_parameters(name)
    bad = sorted(set(options) - set(params))
    if bad and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise ValueError(f"unknown option(s) {bad}; allowed: {', '.join(params)}")
    MODELS[name](2, **options)


def make_model(name: str, feature_shape: Sequence[int], num_classes: int, **kwargs: Any) -> Model:
    """Build a registered model by name; ``kwargs`` go to the module (e.g. ``hidden=[200, 200]``)."""
    if name not in MODELS:
        raise _unknown_model(name)
    try:
        module = MODELS[name](num_classes, **kwargs)
    except TypeError as e:
        raise ValueError(f"bad options for model {name!r}: {e}") from None
    if name in _IMAGE_MODELS and len(tuple(feature_shape)) != 3:
        raise ValueError(f"model {name!r} needs image inputs [H, W, C], got feature shape "
                         f"{tuple(feature_shape)}")
    return from_flax(module, feature_shape, num_classes, name, _dense_stack(module))


def _dense_stack(module: nn.Module) -> DenseStack | None:
    """The layer structure of the built-in dense models (flax names their layers Dense_i)."""
    if type(module) is MLP:
        return DenseStack(tuple(f"Dense_{i}" for i in range(len(module.hidden) + 1)), nn.relu)
    if type(module) is LogisticRegression:
        return DenseStack(("Dense_0",), nn.relu)
    return None


def count_flops(model: Model, batch: int = 1) -> float:
    """Forward FLOPs for a batch, from XLA's cost analysis (multiply-adds count as 2)."""
    params = jax.eval_shape(model.init, jax.random.key(0))
    x = jax.ShapeDtypeStruct((batch, *model.feature_shape), jnp.float32)
    cost = jax.jit(model.apply).lower(params, x).compile().cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    return float(cost.get("flops", 0.0)) if cost else 0.0
