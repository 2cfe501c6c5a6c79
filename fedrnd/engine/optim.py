"""Per-client local optimizers, all clients in one jitted program.

Every supported optimizer is written as an optax *direction* (an optimizer with learning rate
one) followed by a scaling by ``-lr``. A client carries an integer ``kind`` (which direction it
uses) and its own ``lr``; a population that mixes several kinds keeps the state of each kind
for every client and selects per client, so a round never branches on the host and vmaps as
one program. With one kind there is no selection and no extra state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any


def _direction(kind: str, hp: dict[str, float]) -> optax.GradientTransformation:
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
        raise ValueError(f"optimizer {kind!r} is unknown; allowed: {sorted(OPTIMIZERS)}")
    if wd:
        return optax.chain(optax.add_decayed_weights(wd), base)
    return base


OPTIMIZERS = ("sgd", "prox_sgd", "momentum", "nesterov", "adam", "rmsprop", "adagrad", "yogi")
"""Local optimizer kinds. ``prox_sgd`` is SGD whose loss carries the client's ``prox_mu`` term."""


class ClientHParams(NamedTuple):
    """Per-client hyperparameters, each ``[C]``: optimizer kind index, learning rate, prox mu."""

    kind: jax.Array
    lr: jax.Array
    prox_mu: jax.Array


@dataclasses.dataclass(frozen=True)
class ClientOptimizer:
    """The set of optimizer kinds present in a population (static) and their settings.

    ``init(params) -> state`` and ``update(grads, state, params, kind, lr) -> (updates, state)``
    act on one client; ``kind`` and ``lr`` are that client's scalars.
    """

    kinds: tuple[str, ...] = ("sgd",)
    settings: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        if not self.kinds:
            raise ValueError("ClientOptimizer needs at least one optimizer kind")
        for k in self.kinds:
            if k not in OPTIMIZERS:
                raise ValueError(f"optimizer {k!r} is unknown; allowed: {list(OPTIMIZERS)}")

    @property
    def _dirs(self) -> list[optax.GradientTransformation]:
        hp = dict(self.settings)
        return [_direction(k, hp) for k in self.kinds]

    def init(self, params: PyTree) -> PyTree:
        return tuple(d.init(params) for d in self._dirs)

    def update(self, grads: PyTree, state: PyTree, params: PyTree, kind: jax.Array,
               lr: jax.Array) -> tuple[PyTree, PyTree]:
        dirs = self._dirs
        if len(dirs) == 1:
            u, s = dirs[0].update(grads, state[0], params)
            return jax.tree.map(lambda v: -lr * v, u), (s,)
        outs = [d.update(grads, s, params) for d, s in zip(dirs, state, strict=True)]
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
      optimizer: one kind for all (``"sgd"``), or a mix ``{"sgd": 0.5, "adam": 0.5}`` whose
        proportions are rounded to client counts and assigned in a seeded random order.
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


def lr_schedule(name: str = "constant", **kw: float) -> Callable[[jax.Array], jax.Array]:
    """A multiplier of every client's lr as a function of the round index.

    ``constant``; ``exponential`` (``decay_rate ** round``, or ``exp(-rate * round)`` with
    ``rate``: NTK-DFL's ``exp(-0.07 k)``); ``cosine`` over ``rounds`` down to ``alpha``;
    ``step`` (multiply by ``gamma`` every ``every`` rounds).
    """
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
    raise ValueError(f"lr schedule {name!r} is unknown; allowed: constant, exponential, cosine, step")


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
