"""Per-client local optimizers, all clients in one jitted program.

Every supported optimizer is written as an optax *direction* (an optimizer with learning rate
one) followed by a scaling by ``-lr``. A client carries an integer ``kind`` (which direction it
uses) and its own ``lr``; a population that mixes several kinds keeps the state of each kind
for every client and selects per client, so a round never branches on the host and vmaps as
one program. With one kind there is no selection and no extra state.

Besides the built-in kinds (:data:`OPTIMIZERS`), a kind may be any optax optimizer alias,
``"optax:<name>"`` (for instance ``"optax:adamw"``), or a name added with
:func:`register_optimizer`. Gradient clipping (setting ``clip_norm``) applies to every kind, or
to one kind alone from a table of settings under that kind's name; likewise a kind may carry
its own lr schedule over rounds (``schedules``), so AdamW with a cosine schedule and clipping on
some clients and plain SGD on the others is still one jitted round.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any


OPTAX_PREFIX = "optax:"
"""Prefix of a kind (or schedule) taken from optax by name: ``optax:adamw``."""

_NOT_OPTAX_OPTIMIZERS = frozenset({"lbfgs", "scale_by_learning_rate", "scale_by_rprop"})
"""Functions of optax whose first parameter is ``learning_rate`` but that are no optimizer a
client can run here: L-BFGS needs the loss value in its update, the other two are building
blocks, not aliases."""

OptimizerFactory = Callable[[dict[str, float]], optax.GradientTransformation]

REGISTERED_OPTIMIZERS: dict[str, OptimizerFactory] = {}
"""Optimizer kinds added by :func:`register_optimizer`: ``factory(options) -> direction``."""

_REGISTERED_OPTIONS: dict[str, tuple[str, ...]] = {}
"""The ``local.optimizer_options`` keys each registered kind reads beyond the built-in ones."""

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


def register_optimizer(name: str | OptimizerFactory | None = None,
                       factory: OptimizerFactory | None = None, *,
                       options: Sequence[str] = (), replace: bool = False) -> Any:
    """Add a local optimizer kind, usable by name in ``local.optimizer`` afterwards.

    ``register_optimizer("name", factory)``, or as a decorator ``@register_optimizer("name")``
    (``@register_optimizer`` alone takes the function's own name).
    ``factory(options)`` gets the run's ``local.optimizer_options`` as a dict (less
    ``clip_norm``, which the engine applies itself) and returns the kind's *direction*: an
    optax transformation for learning rate one **without** the minus sign of descent. The
    engine multiplies the direction's update by ``-lr`` of each client, so ``optax.identity()``
    is plain SGD and ``optax.scale_by_adam()`` is Adam; an optax alias such as
    ``optax.adam(1.0)``, which already descends, needs ``optax.scale(-1.0)`` after it. The
    factory is called whenever the engine traces a step, so it must be cheap and pure.
    ``options``: the ``local.optimizer_options`` keys the factory reads besides the built-in
    ones (so the config check accepts them). A name that exists raises ``ValueError`` unless
    ``replace=True``; built-in names and ``optax:`` names cannot be replaced.
    """
    if callable(name):
        return register_optimizer(None, name, options=options, replace=replace)
    if factory is None:
        return lambda f: register_optimizer(name, f, options=options, replace=replace)
    key = getattr(factory, "__name__", None) if name is None else name
    if not isinstance(key, str) or not _NAME.fullmatch(key):
        raise ValueError(f"an optimizer name must be letters, digits, _ . + -; got {key!r}")
    if key in OPTIMIZERS:
        raise ValueError(f"optimizer {key!r} is built in and cannot be replaced; choose another "
                         "name")
    if not callable(factory):
        raise TypeError(f"optimizer {key!r}: the factory must be callable, got {factory!r}")
    if key in REGISTERED_OPTIMIZERS and REGISTERED_OPTIMIZERS[key] is not factory \
            and not replace:
        raise ValueError(f"optimizer {key!r} is already registered; choose another name, or "
                         "pass replace=True to replace it")
    REGISTERED_OPTIMIZERS[key] = factory
    _REGISTERED_OPTIONS[key] = tuple(options)
    return factory


@functools.cache
def optax_optimizers() -> tuple[str, ...]:
    """The names ``optax:<name>`` accepts: optax's optimizer aliases (public functions whose
    first parameter is ``learning_rate``), less the ones a client cannot run. Read from the
    installed optax, so a newer optax brings its new optimizers."""
    out = []
    for n in dir(optax):
        fn = getattr(optax, n)
        if n.startswith("_") or n in _NOT_OPTAX_OPTIMIZERS or not inspect.isfunction(fn):
            continue
        params = list(inspect.signature(fn).parameters)
        if params and params[0] == "learning_rate":
            out.append(n)
    return tuple(out)


def optax_optimizer_parameters(name: str) -> dict[str, inspect.Parameter]:
    """The keywords of ``optax.<name>`` besides ``learning_rate`` (``local.optax_options``)."""
    params = inspect.signature(getattr(optax, name)).parameters
    return {k: p for k, p in params.items() if k != "learning_rate"
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def optimizer_names() -> list[str]:
    """Every kind a name can select now: built-ins, then registered ones (and ``optax:*``)."""
    return [*OPTIMIZERS, *REGISTERED_OPTIMIZERS]


def extra_optimizer_options(kinds: Sequence[str]) -> tuple[str, ...]:
    """The ``local.optimizer_options`` keys that registered kinds among ``kinds`` declared."""
    return tuple(dict.fromkeys(o for k in kinds for o in _REGISTERED_OPTIONS.get(k, ())))


def unknown_optimizer(kind: Any) -> str | None:
    """``None`` when ``kind`` names an optimizer, else why not (with a did-you-mean).

    The text reads after the kind's name: ``local.optimizer 'x' <text>``.
    """
    if isinstance(kind, str) and kind.startswith(OPTAX_PREFIX):
        name = kind[len(OPTAX_PREFIX):]
        aliases = optax_optimizers()
        if name in aliases:
            return None
        close = difflib.get_close_matches(name, aliases, n=2, cutoff=0.6)
        hint = (f" (did you mean {' or '.join(repr(OPTAX_PREFIX + c) for c in close)}?)"
                if close else "")
        return (f"is not an optax optimizer{hint}; optax:<name> takes one of optax's "
                f"optimizer aliases: {', '.join(aliases)}")
    names = optimizer_names()
    if kind in names:
        return None
    close = difflib.get_close_matches(str(kind), names, n=2, cutoff=0.6)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    return (f"is unknown{hint}; allowed: {', '.join(names)}, or optax:<name> for any optax "
            f"optimizer (e.g. optax:adamw)")


def optax_keywords(kind: str, optax_options: Mapping[str, Any]) -> dict[str, Any]:
    """The keywords one ``optax:<name>`` kind is built with from ``optax_options``.

    Plain keys go to every optax kind; a key that names a kind (``"optax:lion"``) holds a table
    for that kind alone, which wins over the plain keys. So a mix of optax kinds can give each
    its own settings while one shared setting is written once.
    """
    shared = {k: v for k, v in optax_options.items() if not k.startswith(OPTAX_PREFIX)}
    return {**shared, **dict(optax_options.get(kind, ()))}


def _frozen(v: Any) -> Any:
    """Tables and lists of TOML as nested tuples: the optimizer is part of hashed, static
    engine settings."""
    if isinstance(v, Mapping):
        return tuple((k, _frozen(x)) for k, x in v.items())
    if isinstance(v, list | tuple):
        return tuple(_frozen(x) for x in v)
    return v


def _direction(kind: str, hp: dict[str, float],
               optax_options: Mapping[str, Any] | None = None) -> optax.GradientTransformation:
    if kind.startswith(OPTAX_PREFIX):
        alias = getattr(optax, kind[len(OPTAX_PREFIX):])
        # optax's aliases descend (their update is -lr x direction) and are linear in lr.
        return optax.chain(alias(learning_rate=1.0, **optax_keywords(kind, optax_options or {})),
                           optax.scale(-1.0))
    if kind in REGISTERED_OPTIMIZERS:
        return REGISTERED_OPTIMIZERS[kind]({k: v for k, v in hp.items() if k != "clip_norm"})
    m = hp.get("momentum", 0.9)
    eps = hp.get("eps", 1e-8)
    wd = hp.get("weight_decay", 0.0)
    if kind in ("sgd", "prox_sgd"):
        base = optax.identity()
    elif kind == "momentum":
        base = optax.trace(decay=m, nesterov=False)
    elif kind == "nesterov":
        base = optax.trace(decay=m, nesterov=True)
    elif kind == "adam":
        base = optax.scale_by_adam(b1=hp.get("b1", 0.9), b2=hp.get("b2", 0.999), eps=eps)
    elif kind == "rmsprop":
        base = optax.scale_by_rms(decay=hp.get("decay", 0.9), eps=eps)
    elif kind == "adagrad":
        base = optax.scale_by_rss(initial_accumulator_value=hp.get("initial_accumulator", 0.1),
                                  eps=hp.get("eps", 1e-7))
    elif kind == "yogi":
        base = optax.scale_by_yogi(b1=hp.get("b1", 0.9), b2=hp.get("b2", 0.999),
                                   eps=hp.get("eps", 1e-3))
    else:
        raise ValueError(f"optimizer {kind!r} {unknown_optimizer(kind)}")
    if wd:
        return optax.chain(optax.add_decayed_weights(wd), base)
    return base


OPTIMIZERS = ("sgd", "prox_sgd", "momentum", "nesterov", "adam", "rmsprop", "adagrad", "yogi")
"""Built-in local optimizer kinds. ``prox_sgd`` is SGD whose loss carries the client's
``prox_mu`` term. Besides these a kind may be ``optax:<name>`` (:func:`optax_optimizers`) or a
name in :data:`REGISTERED_OPTIMIZERS`."""


class ClientHParams(NamedTuple):
    """Per-client hyperparameters, each ``[C]``: optimizer kind index, learning rate, prox mu."""

    kind: jax.Array
    lr: jax.Array
    prox_mu: jax.Array


@dataclasses.dataclass(frozen=True)
class ClientOptimizer:
    """The set of optimizer kinds present in a population (static) and their settings.

    ``init(params) -> state`` and ``update(grads, state, params, kind, lr) -> (updates, state)``
    act on one client; ``kind`` and ``lr`` are that client's scalars. ``settings``: the
    built-in kinds' options (``local.optimizer_options``), which registered kinds receive too;
    ``clip_norm > 0`` in them clips each gradient to that global norm before the kind's
    direction. A plain key applies to every kind; a key that names a kind holds a table of
    settings for that kind alone, which wins over the plain keys
    (``(("clip_norm", 1.0), ("optax:adamw", (("clip_norm", 0.5),)))``).
    ``optax_options``: the keywords of the ``optax:<name>`` kinds, shared or per kind
    (:func:`optax_keywords`). ``schedules``: ``(kind, schedule, options)`` triples, an lr
    multiplier over rounds (:func:`lr_schedule`) for that kind alone, on top of the engine's
    schedule for everyone (:meth:`kind_lr_scale`).
    """

    kinds: tuple[str, ...] = ("sgd",)
    settings: tuple[tuple[str, Any], ...] = ()
    optax_options: tuple[tuple[str, Any], ...] = ()
    schedules: tuple[tuple[str, str, tuple[tuple[str, Any], ...]], ...] = ()

    def __post_init__(self):
        if not self.kinds:
            raise ValueError("ClientOptimizer needs at least one optimizer kind")
        for k in self.kinds:
            why = unknown_optimizer(k)
            if why is not None:
                raise ValueError(f"optimizer {k!r} {why}")
        object.__setattr__(self, "optax_options", tuple(
            (k, _frozen(v)) for k, v in self.optax_options))
        # A table for a kind that is not here is ignored, not refused: a method that swaps the
        # kinds for its own (DFedAvgM's momentum) passes the run's settings on.
        object.__setattr__(self, "settings", tuple((k, _frozen(v)) for k, v in self.settings))
        object.__setattr__(self, "schedules", tuple(
            (k, name, _frozen(dict(kw))) for k, name, kw in self.schedules))
        stray = [k for k, _, _ in self.schedules if k not in self.kinds]
        if stray or len({k for k, _, _ in self.schedules}) < len(self.schedules):
            raise ValueError(f"schedules must name each of the kinds {list(self.kinds)} at most "
                             f"once, got {[k for k, _, _ in self.schedules]}")
        for _, name, kw in self.schedules:
            lr_schedule(name, **dict(kw))  # fails here, not inside a trace
        opts = dict(self.optax_options)
        stray = [k for k in opts if k.startswith(OPTAX_PREFIX) and k not in self.kinds]
        if stray:
            raise ValueError(f"optax_options has tables for {stray}, which are not among the "
                             f"kinds {list(self.kinds)}")
        for k in self.kinds:
            if k.startswith(OPTAX_PREFIX):
                params = optax_optimizer_parameters(k[len(OPTAX_PREFIX):])
                bad = [o for o in optax_keywords(k, opts) if o not in params]
                if bad:
                    raise ValueError(f"optax_options {bad} are not keywords of "
                                     f"optax.{k[len(OPTAX_PREFIX):]}; allowed: "
                                     f"{', '.join(params)}")

    def kind_settings(self, kind: str) -> dict[str, float]:
        """The settings ``kind`` runs with: the plain ones, then its own table over them."""
        own = dict(self.settings).get(kind, ())
        shared = {k: v for k, v in self.settings if not isinstance(v, tuple)}
        return {**shared, **dict(own if isinstance(own, tuple) else ())}

    @property
    def clip_norms(self) -> tuple[float, ...]:
        """Each kind's ``clip_norm`` (0: that kind's gradients are not clipped)."""
        return tuple(float(self.kind_settings(k).get("clip_norm", 0.0)) for k in self.kinds)

    @property
    def clip_norm(self) -> float:
        """The largest ``clip_norm`` of any kind (0: nobody's gradient is clipped)."""
        return max(self.clip_norms)

    def kind_lr_scale(self, round_idx: jax.Array) -> jax.Array:
        """``[K]``: each kind's own lr multiplier at ``round_idx`` (1 without a schedule)."""
        own = {k: lr_schedule(name, **dict(kw)) for k, name, kw in self.schedules}
        one = jnp.ones((), jnp.float32)
        return jnp.stack([jnp.asarray(own[k](round_idx), jnp.float32) if k in own else one
                          for k in self.kinds])

    @property
    def _dirs(self) -> list[optax.GradientTransformation]:
        opts = dict(self.optax_options)
        return [_direction(k, self.kind_settings(k), opts) for k in self.kinds]

    def init(self, params: PyTree) -> PyTree:
        return tuple(d.init(params) for d in self._dirs)

    def update(self, grads: PyTree, state: PyTree, params: PyTree, kind: jax.Array,
               lr: jax.Array) -> tuple[PyTree, PyTree]:
        dirs = self._dirs
        # Clipping is stateless: clipping before each direction keeps every kind's state as it
        # was, and kinds that share a clip_norm share the clipped gradient.
        clipped = {}
        for c in dict.fromkeys(self.clip_norms):
            clip = optax.clip_by_global_norm(c)
            clipped[c] = clip.update(grads, clip.init(grads))[0] if c > 0 else grads
        kind_grads = [clipped[c] for c in self.clip_norms]
        if len(dirs) == 1:
            u, s = dirs[0].update(kind_grads[0], state[0], params)
            return jax.tree.map(lambda v: -lr * v, u), (s,)
        outs = [d.update(g, s, params) for d, g, s in zip(dirs, kind_grads, state, strict=True)]
        pick = [kind == i for i in range(len(dirs))]
        u = jax.tree.map(lambda *vs: sum(jnp.where(p, v, 0.0) for p, v in zip(pick, vs, strict=True)),
                         *[o[0] for o in outs])
        # A client's unused kinds keep their initial state, so mixing never leaks across kinds.
        new_state = tuple(
            jax.tree.map(lambda a, b, p=p: jnp.where(p, a, b), o[1], s)
            for p, o, s in zip(pick, outs, state, strict=True)
        )
        return jax.tree.map(lambda v: -lr * v, u), new_state


def client_hparams(num_clients: int, *, optimizer: str | dict[str, float] = "sgd", lr: float |
                   dict[str, float] = 0.05, prox_mu: float = 0.0, seed: int = 0,
                   group: np.ndarray | None = None, per_group: Sequence[str] | None = None,
                   ) -> tuple[ClientOptimizer, ClientHParams]:
    """Assign an optimizer and learning rate to each client.

    Args:
      optimizer: one kind for all (``"sgd"``, ``"optax:adamw"``, a registered name), or a mix
        ``{"sgd": 0.5, "adam": 0.5}`` whose proportions are rounded to client counts and
        assigned in a seeded random order. The returned optimizer has no settings: give them
        (and ``optax_options``) with ``dataclasses.replace`` or a new :class:`ClientOptimizer`.
      lr: one learning rate, or one per kind ``{"sgd": 0.05, "adam": 1e-3}``.
      prox_mu: proximal weight; applies to ``prox_sgd`` clients, and to all clients when the
        algorithm itself is proximal (FedProx passes its own mu).
      group, per_group: alternatively give each ground-truth group its own kind
        (``per_group[g]``).
    """
    if per_group is not None:
        if group is None:
            raise ValueError("per_group optimizers need the clients' group ids")
        kinds = tuple(dict.fromkeys(per_group))
        kind_idx = np.array([kinds.index(per_group[g % len(per_group)]) for g in group], np.int32)
    elif isinstance(optimizer, str):
        kinds = (optimizer,)
        kind_idx = np.zeros(num_clients, np.int32)
    else:
        kinds = tuple(optimizer)
        w = np.asarray([float(optimizer[k]) for k in kinds])
        if np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"optimizer mix proportions must be >= 0 and sum > 0, got {optimizer}")
        counts = np.floor(w / w.sum() * num_clients).astype(int)
        counts[np.argmax(w)] += num_clients - counts.sum()
        kind_idx = np.repeat(np.arange(len(kinds)), counts).astype(np.int32)
        np.random.default_rng(seed).shuffle(kind_idx)
    opt = ClientOptimizer(kinds)
    if isinstance(lr, dict):
        missing = [k for k in kinds if k not in lr]
        if missing:
            raise ValueError(f"lr has no entry for optimizer(s) {missing}")
        lrs = np.asarray([float(lr[kinds[i]]) for i in kind_idx], np.float32)
    else:
        lrs = np.full(num_clients, float(lr), np.float32)
    if np.any(lrs <= 0) or not np.all(np.isfinite(lrs)):
        raise ValueError(f"learning rates must be finite and > 0, got {lr}")
    mus = np.where(np.asarray(kinds)[kind_idx] == "prox_sgd", prox_mu, 0.0).astype(np.float32)
    return opt, ClientHParams(jnp.asarray(kind_idx), jnp.asarray(lrs), jnp.asarray(mus))


@functools.cache
def optax_schedules() -> tuple[str, ...]:
    """The names ``optax:<name>`` accepts as ``local.schedule``: optax's schedule functions."""
    return tuple(n for n in dir(optax.schedules) if not n.startswith("_")
                 and inspect.isfunction(getattr(optax.schedules, n))
                 and (n.endswith("_schedule") or n == "exponential_decay"))


def optax_schedule_parameters(name: str) -> dict[str, inspect.Parameter]:
    """The keywords of ``optax.schedules.<name>`` (``local.schedule_options``)."""
    params = inspect.signature(getattr(optax.schedules, name)).parameters
    return {k: p for k, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def lr_schedule(name: str = "constant", **kw: float) -> Callable[[jax.Array], jax.Array]:
    """A multiplier of every client's lr as a function of the round index.

    ``constant``; ``exponential`` (``decay_rate ** round``, or ``exp(-rate * round)`` with
    ``rate``: NTK-DFL's ``exp(-0.07 k)``); ``cosine`` over ``rounds`` down to ``alpha``;
    ``step`` (multiply by ``gamma`` every ``every`` rounds); or ``optax:<name>``, any optax
    schedule (``optax:warmup_cosine_decay_schedule``) built with ``kw`` as its keywords. An
    optax schedule is evaluated at the round index (not the local step) and multiplies each
    client's own lr, so its values are factors: ``init_value = 1.0`` keeps the lr at first.
    """
    if name.startswith(OPTAX_PREFIX):
        sname = name[len(OPTAX_PREFIX):]
        if sname not in optax_schedules():
            close = difflib.get_close_matches(sname, optax_schedules(), n=2, cutoff=0.6)
            hint = (f" (did you mean {' or '.join(repr(OPTAX_PREFIX + c) for c in close)}?)"
                    if close else "")
            raise ValueError(f"lr schedule {name!r} is not an optax schedule{hint}; allowed: "
                             f"{', '.join(optax_schedules())}")
        sched = getattr(optax.schedules, sname)(**kw)
        return lambda r: jnp.asarray(sched(r), jnp.float32)
    if name == "constant":
        return lambda r: jnp.ones((), jnp.float32)
    if name == "exponential":
        if "rate" in kw:
            return lambda r: jnp.exp(-kw["rate"] * r)
        return lambda r: kw.get("decay_rate", 0.99) ** jnp.asarray(r, jnp.float32)
    if name == "cosine":
        sched = optax.cosine_decay_schedule(1.0, int(kw["rounds"]), alpha=kw.get("alpha", 0.0))
        return lambda r: sched(r)
    if name == "step":
        every, gamma = int(kw.get("every", 100)), kw.get("gamma", 0.1)
        return lambda r: gamma ** jnp.floor_divide(r, every).astype(jnp.float32)
    raise ValueError(f"lr schedule {name!r} is unknown; allowed: constant, exponential, cosine, "
                     f"step, or optax:<name> for any optax schedule")


SERVER_OPTIMIZERS = ("sgd", "momentum", "adam", "yogi", "adagrad")


def server_optimizer(name: str = "sgd", lr: float = 1.0, **kw: float) -> optax.GradientTransformation:
    """The server's optimizer over the pseudo-gradient ``global - mean(client models)``.

    ``sgd`` with ``lr=1`` is plain FedAvg; ``adam``/``yogi``/``adagrad`` are FedAdam, FedYogi and
    FedAdagrad (Reddi et al., 2021), with their paper's default ``eps=1e-3``.
    """
    if name == "sgd":
        return optax.sgd(lr)
    if name == "momentum":
        return optax.sgd(lr, momentum=kw.get("momentum", 0.9))
    if name == "adam":
        return optax.adam(lr, b1=kw.get("b1", 0.9), b2=kw.get("b2", 0.99), eps=kw.get("eps", 1e-3))
    if name == "yogi":
        return optax.yogi(lr, b1=kw.get("b1", 0.9), b2=kw.get("b2", 0.99), eps=kw.get("eps", 1e-3))
    if name == "adagrad":
        return optax.adagrad(lr, eps=kw.get("eps", 1e-3))
    raise ValueError(f"server optimizer {name!r} is unknown; allowed: {list(SERVER_OPTIMIZERS)}")
