"""Local training of one client: a pure function, looped over its real steps (ragged data).

What an epoch means for ragged clients: client ``c`` with ``n_c`` examples runs
``ceil(n_c / B)`` real steps per epoch over a fresh random permutation of its own examples (the
last batch may be partial; its loss is the mean over its real examples). Every client's program
has the static length ``ceil(N_max / B)`` steps per epoch; steps past a client's own count
are not run (parameters and optimizer state unchanged). With ``steps`` set instead of
``epochs``, every client runs exactly that many steps, each on ``B`` examples drawn without
replacement from its own data (fewer when ``n_c < B``).

Models with dropout or state (:class:`~fedrnd.models.Model` ``train_apply``) train through a
:class:`TrainLoss`: step ``t`` of a client draws its dropout from ``fold_in(fold_in(key,
DROPOUT_STREAM), t)`` (the client's own key, so independent of chunking), the gradient is
taken with respect to the trainable weights only, and the state the forward pass returns
(BatchNorm statistics) replaces the old one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedrnd.engine.optim import ClientOptimizer

PyTree = Any
LossFn = Callable[[PyTree, jax.Array, jax.Array, jax.Array], jax.Array]
"""``loss(params, x [B,...], y [B], mask [B]) -> scalar`` (mean over real examples)."""

DROPOUT_STREAM = 0x64726F70
"""Folded into a client's key for its per-step training keys (dropout): a stream apart from
the batch schedule's ``fold_in(key, epoch or step)``."""


@dataclasses.dataclass(frozen=True)
class TrainLoss:
    """The local loss of a model with state or randomness.

    ``fn(trainable, state, x, y, mask, key) -> (loss, new_state)``; ``split(params) ->
    (trainable, state)`` and ``merge(trainable, state) -> params`` separate a model tree
    (:meth:`~fedrnd.models.Model.split`). Only ``trainable`` is differentiated; ``state`` is
    replaced by what the forward pass returns.
    """

    fn: Callable[..., tuple[jax.Array, PyTree]]
    split: Callable[[PyTree], tuple[PyTree, PyTree]]
    merge: Callable[[PyTree, PyTree], PyTree]


def _plain(loss: LossFn) -> TrainLoss:
    return TrainLoss(lambda p, s, x, y, mask, key: (loss(p, x, y, mask), s),
                     lambda p: (p, None), lambda p, s: p)


@dataclasses.dataclass(frozen=True)
class LocalSpec:
    """Static description of a client's local work per round."""

    batch_size: int = 32
    epochs: int = 1
    steps: int | None = None

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.steps is None and self.epochs < 1:
            raise ValueError(f"local epochs must be >= 1, got {self.epochs}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"local steps must be >= 1, got {self.steps}")

    def steps_per_epoch(self, max_count: int) -> int:
        return -(-max_count // self.batch_size)

    def total_steps(self, max_count: int) -> int:
        if self.steps is not None:
            return self.steps
        return self.epochs * self.steps_per_epoch(max_count)


def _squared_error(logits: jax.Array, y: jax.Array) -> jax.Array:
    """``[B]``: mean over classes of ``(logits - one_hot(y))**2``."""
    target = jax.nn.one_hot(y, logits.shape[-1], dtype=logits.dtype)
    return jnp.mean(jnp.square(logits - target), axis=-1)


PER_EXAMPLE_LOSSES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "cross_entropy": optax.softmax_cross_entropy_with_integer_labels,
    "mse": _squared_error,
}
"""The named losses (``local.loss``): ``(logits [B, K], y [B]) -> [B]``. ``cross_entropy`` is
softmax cross-entropy (the default); ``mse`` is the squared error of the raw outputs against
one-hot labels, averaged over the ``K`` classes (the square loss of Hui and Belkin, ICLR 2021)."""

LOSSES = tuple(PER_EXAMPLE_LOSSES)
"""The names :class:`~fedrnd.engine.Engine` ``loss`` and ``local.loss`` accept."""


def _per_example(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    if name not in PER_EXAMPLE_LOSSES:
        raise ValueError(f"loss {name!r} is unknown; allowed: {', '.join(LOSSES)}")
    return PER_EXAMPLE_LOSSES[name]


def named_loss(name: str, apply: Callable[[PyTree, jax.Array], jax.Array]) -> LossFn:
    """Masked mean of the named per-example loss (:data:`PER_EXAMPLE_LOSSES`) of a model's
    outputs."""
    per_example = _per_example(name)

    def loss(params, x, y, mask):
        per = per_example(apply(params, x), y)
        return jnp.sum(per * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    return loss


def cross_entropy_loss(apply: Callable[[PyTree, jax.Array], jax.Array]) -> LossFn:
    """Masked mean softmax cross-entropy of a model's logits."""
    return named_loss("cross_entropy", apply)


def model_loss(model: Any, name: str = "cross_entropy") -> LossFn | TrainLoss:
    """The local loss of a :class:`~fedrnd.models.Model` named ``name`` (default masked
    softmax cross-entropy), through ``train_apply`` (a :class:`TrainLoss`) when the model has
    one."""
    if model.train_apply is None and not model.stateful:
        return named_loss(name, model.apply)
    per_example = _per_example(name)
    train_apply = model.train_apply or (lambda p, x, _k: (model.apply(p, x), model.split(p)[1]))

    def fn(trainable, state, x, y, mask, key):
        logits, new_state = train_apply(model.merge(trainable, state), x, key)
        per = per_example(logits, y)
        return jnp.sum(per * mask) / jnp.maximum(jnp.sum(mask), 1.0), new_state

    return TrainLoss(fn, model.split, model.merge)


def _sq_dist(a: PyTree, b: PyTree) -> jax.Array:
    return sum(jnp.sum((u - v) ** 2) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                      strict=True))


def batch_schedule(spec: LocalSpec, n_max: int, count: jax.Array, key: jax.Array
                   ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Which of its examples one client uses at every local step (the semantics above).

    Args:
      n_max: the static length of the client's index row; ``count``: its real examples.
    Returns:
      ``positions [T, b]`` (into the client's index row), ``valid [T, b]`` (real examples of
      each batch), ``active [T]`` (steps that update) and ``n_steps`` (how many do), with
      ``T = spec.total_steps(n_max)`` and ``b = min(batch_size, n_max)``. Every path of local
      training draws its batches here, so they all see the same data.
    """
    b = min(spec.batch_size, n_max)
    j = jnp.arange(n_max)
    if spec.steps is None:
        spe = spec.steps_per_epoch(n_max)
        pad = spe * b - n_max

        def epoch(e):
            u = jax.random.uniform(jax.random.fold_in(key, e), (n_max,))
            perm = jnp.argsort(jnp.where(j < count, u, 2.0))
            return jnp.concatenate([perm, jnp.zeros((pad,), perm.dtype)]).reshape(spe, b)

        positions = jax.vmap(epoch)(jnp.arange(spec.epochs)).reshape(-1, b)
        pos = jnp.tile(jnp.arange(spe * b).reshape(spe, b), (spec.epochs, 1))
        valid = pos < count
        active = pos[:, 0] < count
        n_steps = spec.epochs * jnp.minimum(-(-count // b), spe)
    else:
        def draw(t):
            u = jax.random.uniform(jax.random.fold_in(key, t), (n_max,))
            return jax.lax.top_k(jnp.where(j < count, u, -1.0), b)[1]

        positions = jax.vmap(draw)(jnp.arange(spec.steps))
        valid = jnp.broadcast_to(jnp.arange(b) < count, (spec.steps, b))
        active = jnp.ones((spec.steps,), bool)
        n_steps = jnp.asarray(spec.steps)
    return positions, valid, active, n_steps


def local_train(
    loss_fn: LossFn | TrainLoss,
    optimizer: ClientOptimizer,
    spec: LocalSpec,
    params: PyTree,
    opt_state: PyTree,
    x_pool: jax.Array,
    y_pool: jax.Array,
    idx: jax.Array,
    count: jax.Array,
    key: jax.Array,
    kind: jax.Array,
    lr: jax.Array,
    prox_mu: jax.Array | float = 0.0,
    anchor: PyTree | None = None,
    *,
    gather_once: bool = True,
) -> tuple[PyTree, PyTree, dict[str, jax.Array]]:
    """Train one client. Returns ``(params, opt_state, {"loss", "steps"})``.

    Args:
      loss_fn: a :data:`LossFn` of the whole model tree, or a :class:`TrainLoss` (dropout,
        state). ``opt_state`` covers the whole tree either way; with a ``TrainLoss`` the
        gradient of the state leaves is zero and their updates are discarded.
      x_pool, y_pool: the shared pool ``[P, ...]``, ``[P]``.
      idx: ``[N]`` the client's rows into the pool; ``count``: how many are real.
      kind, lr: the client's optimizer kind index and learning rate (scalars).
      prox_mu, anchor: FedProx term ``(mu / 2) ||w - anchor||^2`` (anchor defaults to ``params``
        at the start of the round).
      gather_once: gather the client's ``N`` rows from the pool once per round (``[N, ...]``
        held for the round) instead of its ``b`` batch rows at every step; the same values
        either way, so the same bits. Once is 1.3x fewer CPU seconds for a small MLP at one
        client per map step (``benchmarks/RESULTS.md``); a vmapped chunk of clients with many
        rows each may prefer the per-step gather's memory (:meth:`~fedrnd.engine.Engine.train`
        decides).

    Epochs mode runs only a client's real steps (a ``while`` loop of ``n_steps``, not a masked
    scan of all ``T``), so the loop cannot be reverse-differentiated; nothing differentiates
    through local training.
    """
    n_max = idx.shape[0]
    tl = loss_fn if isinstance(loss_fn, TrainLoss) else _plain(loss_fn)
    anchor = tl.split(params if anchor is None else anchor)[0]

    loss_and_grad = jax.value_and_grad(tl.fn, has_aux=True)
    prox_and_grad = jax.value_and_grad(lambda p: 0.5 * prox_mu * _sq_dist(p, anchor))

    def with_prox(p, loss, g):
        pl, pg = prox_and_grad(p)
        return loss + pl, jax.tree.map(jnp.add, g, pg)

    def grad_fn(p, state, x, y, mask, k):
        # Value and gradient of ``loss + (mu / 2) ||p - anchor||^2``. The proximal term costs
        # extra passes over the parameters every step (about half the CPU time of a FedAvg
        # round at chunk 1, benchmarks/RESULTS.md), so it is skipped when mu is 0: statically
        # for a Python number, with a ``cond`` for a traced mu (a real branch when mu is not
        # batched, as with ClientMapper chunk 1; under vmap a select, no dearer than before).
        (loss, state), g = loss_and_grad(p, state, x, y, mask, k)
        if isinstance(prox_mu, (int, float)):
            return (*(with_prox(p, loss, g) if prox_mu != 0 else (loss, g)), state)
        return (*jax.lax.cond(prox_mu != 0, with_prox, lambda _p, lo, gr: (lo, gr), p, loss, g),
                state)

    dropout_key = jax.random.fold_in(key, DROPOUT_STREAM)

    def step(carry, t):
        w, s = carry
        p, state = tl.split(w)
        rows = positions[t] if gather_once else idx[positions[t]]
        x, y = x_client[rows], y_client[rows]
        loss, g, state2 = grad_fn(p, state, x, y, valid[t].astype(x.dtype),
                                  jax.random.fold_in(dropout_key, t))
        # The optimizer sees the whole tree with zero gradients for the state; the state's
        # updates (weight decay, say) are dropped: it is only ever set by the forward pass.
        u, s2 = optimizer.update(tl.merge(g, jax.tree.map(jnp.zeros_like, state)), s, w, kind,
                                 lr)
        return (tl.merge(optax.apply_updates(p, tl.split(u)[0]), state2), s2), loss

    # Rows gathered once per round: a step then reads a small, cache-resident block instead
    # of scattered rows of the whole pool.
    x_client, y_client = (x_pool[idx], y_pool[idx]) if gather_once else (x_pool, y_pool)
    positions, valid, _active, n_steps = batch_schedule(spec, n_max, count, key)
    num_t = positions.shape[0]
    if spec.steps is not None:  # every step is real
        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), jnp.arange(num_t))
    else:
        # Only the real steps run: the first ``k`` of every epoch (a ragged client's padding
        # steps come last in each epoch and would change nothing). With one client per map
        # step the trip count is unbatched and padding costs nothing; under vmap the loop runs
        # to the longest client with the others' updates selected away, as a masked scan would.
        spe = spec.steps_per_epoch(n_max)
        k = jnp.maximum(n_steps // spec.epochs, 1)

        def body(i, c):
            carry, losses = c
            t = (i // k) * spe + i % k
            carry, loss = step(carry, t)
            return carry, losses.at[t].set(loss)

        loss_dtype = jax.eval_shape(step, (params, opt_state), 0)[1].dtype
        (params, opt_state), losses = jax.lax.fori_loop(
            0, n_steps, body, ((params, opt_state), jnp.zeros((num_t,), loss_dtype)))
    mean_loss = jnp.sum(losses) / jnp.maximum(n_steps, 1)
    return params, opt_state, {"loss": mean_loss, "steps": n_steps}
