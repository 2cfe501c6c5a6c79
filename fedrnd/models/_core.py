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

from fedrnd.models import banded

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

    ``params`` is the client's whole model pytree: what is averaged, sent, checkpointed. For a
    plain model it is the trainable weights. A model with non-trainable state (BatchNorm
    statistics) is ``stateful`` and its tree is ``{"params": weights, **state}``, one entry per
    state collection (e.g. ``"batch_stats"``); :meth:`split` and :meth:`merge` separate the two.
    ``apply`` is the evaluation forward pass (``train=False``: no dropout, state frozen).
    ``train_apply(params, x, key) -> (logits, state)``, when set, is the training forward pass
    (dropout drawn from ``key``, state updated and returned; ``None`` when not stateful);
    ``None`` means training uses ``apply``.
    ``reference_apply``: when ``apply`` is a faster re-expression of the same function (the
    built-in CNN's banded convolutions on a CPU, :mod:`fedrnd.models.banded`), the plain
    forward pass it stands for; :func:`count_flops` counts that one's FLOPs.
    """

    init: Callable[[jax.Array], Params]
    apply: Callable[[Params, jax.Array], jax.Array]
    feature_shape: tuple[int, ...]
    num_classes: int
    name: str = "model"
    dense: DenseStack | None = None
    train_apply: Callable[[Params, jax.Array, jax.Array], tuple[jax.Array, Any]] | None = None
    stateful: bool = False
    reference_apply: Callable[[Params, jax.Array], jax.Array] | None = None

    @property
    def plain(self) -> bool:
        """Stateless and deterministic: training is ``apply`` and every leaf of ``params`` is
        trained (the low-rank fast path and the NTK methods need this)."""
        return self.train_apply is None and not self.stateful

    def split(self, params: Params) -> tuple[Params, Any]:
        """``(trainable weights, state)`` of a model tree (state ``None`` if not stateful)."""
        if not self.stateful:
            return params, None
        return params["params"], {k: v for k, v in params.items() if k != "params"}

    def merge(self, trainable: Params, state: Any) -> Params:
        """The inverse of :meth:`split`."""
        return {"params": trainable, **state} if self.stateful else trainable

    def local_layers(self, params: Params) -> Params:
        """FedBN's client-local part of a model tree (Li et al., 2021): a tree of bools shaped
        like ``params``, True for the state (BatchNorm statistics) and for the weights of the
        layers that hold state (BatchNorm's scale and bias), False for every other weight. All
        False for a model without state. A layer is matched by its path: the weights under
        ``params/<path>/...`` belong to it when ``<collection>/<path>/...`` holds its state.
        """
        if not self.stateful:
            return jax.tree.map(lambda _: False, params)
        weights, state = self.split(params)

        def keys(path):
            return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))
                         for k in path)

        # Paths inside each collection, less the collection's name and the leaf's own name.
        owners = {keys(p)[1:-1] for p, _ in jax.tree_util.tree_leaves_with_path(state)}
        mask = jax.tree_util.tree_map_with_path(lambda p, _: keys(p)[:-1] in owners, weights)
        return self.merge(mask, jax.tree.map(lambda _: True, state))

    def num_params(self) -> int:
        """Trainable parameters (state such as BatchNorm statistics not counted)."""
        shapes = self.split(jax.eval_shape(self.init, jax.random.key(0)))[0]
        return int(sum(np.prod(s.shape) for s in jax.tree_util.tree_leaves(shapes)))


def _takes_train(fn: Callable) -> bool:
    try:
        return "train" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def from_flax(module: nn.Module, feature_shape: Sequence[int], num_classes: int,
              name: str | None = None, dense: DenseStack | None = None) -> Model:
    """Wrap any flax linen module whose ``__call__(x)`` maps ``[B, *feature_shape]`` to logits.

    ``dense``: declare the module a stack of dense layers (see :class:`DenseStack`); only do so
    when it is exactly that.

    A module whose ``__call__`` takes ``train`` is called with ``train=True`` in local training
    (with a ``"dropout"`` rng per client and step) and ``train=False`` elsewhere. Variable
    collections other than ``"params"`` (``"batch_stats"``) make the model stateful: they live
    in the model tree next to the weights, are updated by the training pass (``mutable``) and
    frozen in evaluation. Both are detected here, once.
    """
    feature_shape = tuple(int(s) for s in feature_shape)
    x0 = jnp.zeros((1, *feature_shape), jnp.float32)
    takes_train = _takes_train(module.__call__)
    kw_eval = {"train": False} if takes_train else {}
    kw_train = {"train": True} if takes_train else {}
    shapes = jax.eval_shape(lambda k: module.init(k, x0, **kw_eval), jax.random.key(0))
    collections = tuple(sorted(c for c in shapes if c != "params"))
    stateful = bool(collections)

    def init(key: jax.Array) -> Params:
        variables = module.init(key, x0, **kw_eval)
        if not stateful:
            return variables["params"]
        return {"params": variables["params"], **{c: variables[c] for c in collections}}

    def apply(params: Params, x: jax.Array) -> jax.Array:
        return module.apply(params if stateful else {"params": params}, x, **kw_eval)

    def train_apply(params: Params, x: jax.Array, key: jax.Array) -> tuple[jax.Array, Any]:
        if not stateful:
            return module.apply({"params": params}, x, rngs={"dropout": key}, **kw_train), None
        logits, state = module.apply(params, x, rngs={"dropout": key}, mutable=list(collections),
                                     **kw_train)
        return logits, {c: state[c] for c in collections}

    plain = not (takes_train or stateful)
    return Model(init, apply, feature_shape, int(num_classes), name or type(module).__name__,
                 dense, None if plain else train_apply, stateful)


def from_nnx(module: Any, feature_shape: Sequence[int], num_classes: int,
             name: str | None = None) -> Model:
    """Wrap a flax NNX module whose ``__call__(x)`` maps ``[B, *feature_shape]`` to logits.

    ``module``: an ``nnx.Module``, or a factory ``rngs -> nnx.Module``. With a factory,
    ``init(key)`` builds the module with ``nnx.Rngs(key)``, so keys give different weights
    (methods that initialise several models, IFCA, need that); with a module, ``init`` returns
    its current weights whatever the key.

    The module is split (``nnx.split``) into a graph and its state: the ``nnx.Param`` state is
    the trainable weights; RNG state (``nnx.Rngs`` given to ``nnx.Dropout``) is not kept in
    the model but re-seeded from the training key at every local step; any other state
    (``nnx.BatchStat``) makes the model stateful, stored under ``"state"`` in the model tree.
    Training runs the module with ``deterministic=False, use_running_average=False``,
    evaluation with both ``True`` (``nnx.view``). Leaves are plain arrays in nested dicts
    (``State.to_pure_dict``), like a linen model's.
    """
    from flax import nnx

    feature_shape = tuple(int(s) for s in feature_shape)
    factory = None if isinstance(module, nnx.Module) else module
    template = module if factory is None else nnx.eval_shape(lambda: factory(nnx.Rngs(0)))

    def graph(deterministic: bool):
        view = nnx.view(template, deterministic=deterministic,
                        use_running_average=deterministic, raise_if_not_found=False)
        return nnx.split(view, nnx.Param, nnx.RngState, ...)

    gd_train, p_abs, rng_abs, rest_abs = graph(False)
    gd_eval = graph(True)[0]
    p_def, rng_def, rest_def = (jax.tree.structure(t) for t in (p_abs, rng_abs, rest_abs))
    rng_leaves = jax.tree.leaves(rng_abs)
    stateful = bool(jax.tree.leaves(rest_abs))
    stochastic = bool(rng_leaves) or gd_train != gd_eval

    def pure(params, rest):
        p = params.to_pure_dict()
        return {"params": p, "state": rest.to_pure_dict()} if stateful else p

    if factory is None:
        weights = pure(*nnx.split(module, nnx.Param, nnx.RngState, ...)[1::2])

        def init(key: jax.Array) -> Params:
            return weights
    else:
        def init(key: jax.Array) -> Params:
            _, p, _, rest = nnx.split(factory(nnx.Rngs(key)), nnx.Param, nnx.RngState, ...)
            return pure(p, rest)

    def rngs(key: jax.Array):
        # Every RNG stream of the module restarts from its own fold of the step key.
        out = []
        for i, leaf in enumerate(rng_leaves):
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                k = jax.random.fold_in(key, i)
                out.append(jax.random.split(k, leaf.shape) if leaf.shape else k)
            else:
                out.append(jnp.zeros(leaf.shape, leaf.dtype))
        return jax.tree.unflatten(rng_def, out)

    def run(gd, params, x, key):
        p, rest = (params["params"], params["state"]) if stateful else (params, {})
        m = nnx.merge(gd, jax.tree.unflatten(p_def, jax.tree.leaves(p)), rngs(key),
                      jax.tree.unflatten(rest_def, jax.tree.leaves(rest)))
        logits = m(x)
        return logits, nnx.split(m, nnx.Param, nnx.RngState, ...)[3].to_pure_dict()

    def apply(params: Params, x: jax.Array) -> jax.Array:
        return run(gd_eval, params, x, jax.random.key(0))[0]

    def train_apply(params: Params, x: jax.Array, key: jax.Array) -> tuple[jax.Array, Any]:
        logits, rest = run(gd_train, params, x, key)
        return logits, ({"state": rest} if stateful else None)

    return Model(init, apply, feature_shape, int(num_classes),
                 name or type(template).__name__, None,
                 train_apply if stateful or stochastic else None, stateful)


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


MODELS: dict[str, Callable[..., Any]] = {}
"""Model builders by name: ``builder(num_classes, **options) -> flax module`` (linen, or NNX
for builders taking ``rngs``, see :func:`register_model`); filled by
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
    with ``num_classes=2`` to check the options). A builder with an ``rngs`` parameter is a
    flax NNX builder: ``builder(num_classes, *, rngs, **options)`` (plus ``feature_shape=``
    when it takes that parameter, as NNX layers need their input sizes) returns an
    ``nnx.Module`` and is wrapped with :func:`from_nnx` (validation checks its options
    against the signature without building it). ``image_input``: the model needs
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


_NNX_SUPPLIED = ("rngs", "feature_shape")
"""Parameters of an NNX model builder that the run supplies (not ``model.options``)."""


def is_nnx_builder(builder: Callable[..., Any]) -> bool:
    """Whether a model builder is a flax NNX one (it takes ``rngs``)."""
    return "rngs" in inspect.signature(builder).parameters


def model_parameters(name: str) -> dict[str, inspect.Parameter]:
    """The options of a registered model (``model.options``), with their defaults."""
    if name not in MODELS:
        raise _unknown_model(name)
    params = dict(inspect.signature(MODELS[name]).parameters)
    params.pop("num_classes", None)
    if is_nnx_builder(MODELS[name]):
        for k in _NNX_SUPPLIED:
            params.pop(k, None)
    return params


def check_model_options(name: str, options: dict[str, Any]) -> None:
    """Build the (cheap, parameter-free) module once to check ``options`` before any data.

    Raises ``ValueError`` whose message starts with the option at fault.
    """
    params = model_parameters(name)
    bad = sorted(set(options) - set(params))
    if bad and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise ValueError(f"unknown option(s) {bad}; allowed: {', '.join(params)}")
    if is_nnx_builder(MODELS[name]):
        # Building allocates weights and needs the feature shape: check the call only.
        inspect.signature(MODELS[name]).bind(2, **_nnx_supplied(MODELS[name], (1,), None),
                                             **options)
        return
    MODELS[name](2, **options)


def _nnx_supplied(builder: Callable[..., Any], feature_shape: Sequence[int], rngs: Any
                  ) -> dict[str, Any]:
    extra = {"rngs": rngs}
    if "feature_shape" in inspect.signature(builder).parameters:
        extra["feature_shape"] = tuple(int(s) for s in feature_shape)
    return extra


def make_model(name: str, feature_shape: Sequence[int], num_classes: int, **kwargs: Any) -> Model:
    """Build a registered model by name; ``kwargs`` go to the module (e.g. ``hidden=[200, 200]``)."""
    if name not in MODELS:
        raise _unknown_model(name)
    builder = MODELS[name]
    try:
        if is_nnx_builder(builder):
            inspect.signature(builder).bind(num_classes, **_nnx_supplied(builder, (1,), None),
                                            **kwargs)
        else:
            module = builder(num_classes, **kwargs)
    except TypeError as e:
        raise ValueError(f"bad options for model {name!r}: {e}") from None
    if name in _IMAGE_MODELS and len(tuple(feature_shape)) != 3:
        raise ValueError(f"model {name!r} needs image inputs [H, W, C], got feature shape "
                         f"{tuple(feature_shape)}")
    if is_nnx_builder(builder):
        return from_nnx(lambda rngs: builder(num_classes, **_nnx_supplied(
            builder, feature_shape, rngs), **kwargs), feature_shape, num_classes, name)
    model = from_flax(module, feature_shape, num_classes, name, _dense_stack(module))
    if type(module) is CNN and _banded_fits(model.feature_shape):
        model = dataclasses.replace(model, apply=banded.cnn_apply, reference_apply=model.apply)
    return model


def _banded_fits(feature_shape: tuple[int, ...]) -> bool:
    """Whether the built-in CNN runs its banded-matrix convolutions (:mod:`fedrnd.models.
    banded`): on a CPU (where they beat XLA's convolution several times over), for images up
    to :data:`~fedrnd.models.banded.BANDED_MAX_WIDTH` pixels wide."""
    return (jax.default_backend() == "cpu" and len(feature_shape) == 3
            and feature_shape[1] <= banded.BANDED_MAX_WIDTH)


def _dense_stack(module: nn.Module) -> DenseStack | None:
    """The layer structure of the built-in dense models (flax names their layers Dense_i)."""
    if type(module) is MLP:
        return DenseStack(tuple(f"Dense_{i}" for i in range(len(module.hidden) + 1)), nn.relu)
    if type(module) is LogisticRegression:
        return DenseStack(("Dense_0",), nn.relu)
    return None


def count_flops(model: Model, batch: int = 1) -> float:
    """Forward FLOPs for a batch, from XLA's cost analysis (multiply-adds count as 2), of the
    model's plain forward pass (``reference_apply`` when set: the arithmetic of the function,
    not of a faster layout that does more of it)."""
    params = jax.eval_shape(model.init, jax.random.key(0))
    x = jax.ShapeDtypeStruct((batch, *model.feature_shape), jnp.float32)
    cost = jax.jit(model.reference_apply or model.apply).lower(params, x).compile().cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    return float(cost.get("flops", 0.0)) if cost else 0.0
