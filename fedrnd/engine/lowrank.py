r"""Exact low-rank fast path for local training: dense models, optimizers linear in the gradient.

Why it is exact. Take one dense layer ``h = a W + b`` (kernel ``W [in, out]``) of a client that
starts the round from ``W0``. The gradient of its batch loss at step ``s`` is
``Gr_s = A_s^T G_s`` (bias: ``1^T G_s``), with ``A_s [B, in]`` the layer's inputs and
``G_s = dL/dh [B, out]``. Every optimizer here (SGD, momentum, Nesterov, weight decay, the
proximal pull ``mu (w - W0)`` of FedProx) updates parameters and state by linear recursions
with scalar coefficients that are the same for every parameter. So, by induction, at every step

    W_t = P[t, 0] W0 + sum_{s < t} P[t, s + 1] A_s^T G_s,      b_t likewise with 1^T G_s,

where the coefficient matrix ``P [T + 1, T + 1]`` of a client depends only on its optimizer kind,
learning rate, mu and which of its steps are real, never on the data. :func:`coefficients`
finds ``P`` by running the client's own :class:`~fedrnd.engine.optim.ClientOptimizer` on
coefficient vectors (parameter ``e_0``, gradient at step ``s`` ``e_{s+1}``) instead of arrays,
so every optimizer formula is the one the general path uses.

The forward pass at step ``t`` is then

    a W_t + b_t = P[t, 0] (a W0 + b0) + ((a A_{<t}^T + 1) * p_t) G_{<t},

a product with the shared start model (for all clients of a block at once: one matrix product
``[clients x B, in] @ [in, out]``; for the first layer all steps at once) plus a correction from
the ``[B, t B]`` Gram matrix of the client's own past layer inputs, with ``p_t`` the
coefficients ``P[t, s + 1]`` repeated over each past batch. The backward pass needs the layer
input gradient ``g W_t^T = P[t, 0] g W0^T + ((g G_{<t}^T) * p_t) A_{<t}``, likewise; the
weight gradient itself is never formed: ``A_t`` and ``G_t`` are stored. After ``T`` steps the
sample-weighted sum over clients (FedAvg) is

    sum_c n_c W_T^c = (sum_c n_c P_c[T, 0]) W0 + A^T (G * n P[T, 1:]),

one product over all clients' stored inputs and output gradients (``A [rows, in]``,
``G [rows, out]``, rows = clients x steps x B); per cluster slot the same with the gradient
rows of each slot apart. No per-client copy of the weights ever exists. The loss is the
general path's (masked cross-entropy mean of every batch), and FedProx's reported
``(mu / 2) ||W_t - W0||^2`` comes from the same Gram matrices:
``<A_s^T G_s, A_r^T G_r> = sum((A_s A_r^T) * (G_s G_r^T))``.

What it costs. Per client and round, with ``T`` steps of ``B`` examples (``n = T B``) and
layers ``(in_l, out_l)``: the shared products are the general path's forward and input-gradient
products (the first layer needs none) plus, for the aggregate, one product as large as all of
its weight gradients together; for MLP 784-200-200-10 that is 74% of the general path's FLOPs,
run as large matrix products. The corrections cost about ``n^2 (in_l + out_l)`` per layer
(triangular in the steps), so they grow with ``(T B)^2`` against the shared part's ``T B``.
On CPU the shared products took about 0.7 of the general path's time per FLOP and the
corrections about 1.0 (:data:`SHARED_WEIGHT`, :data:`CORRECTION_WEIGHT`): the path pays
while the samples a client sees per round stay below roughly the layer widths.
:func:`flops` counts both paths and :func:`pays` decides (``Engine(path="auto")``).

It applies (:func:`why_not`) when the model declares itself a stack of dense layers with an
elementwise activation (:class:`~fedrnd.models.DenseStack`), the loss is the default
cross-entropy, and every optimizer kind present is linear (``sgd``, ``prox_sgd``,
``momentum``, ``nesterov``, with or without weight decay); ``adam`` and the other adaptive
kinds, a mix containing one, convolutions and custom losses use the general path. Each call
also needs a start model shared by the clients (or one per cluster slot) and fresh optimizer
state; per-client start models or carried optimizer state use the general path.

Layout: clients run in blocks of :func:`block_size` (the products above are per block); the
blocks go through the engine's :class:`~fedrnd.engine.ClientMapper` one at a time (and split
over its device mesh), so memory holds one block's inputs and gradients.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from fedrnd.engine.clientmap import ClientMapper
from fedrnd.engine.local import LocalSpec, batch_schedule, cross_entropy_loss
from fedrnd.engine.optim import ClientOptimizer
from fedrnd.models import DenseStack, Model

PyTree = Any

LINEAR_KINDS = ("sgd", "prox_sgd", "momentum", "nesterov")
"""Optimizer kinds whose update is linear in the gradient (the fast path's condition)."""

PATHS = ("auto", "general", "lowrank")
"""``Engine.path``: choose by the cost model, always the general path, or force the fast path."""

UNROLL_MAX = 16
"""Up to this many local steps the step loop is unrolled and each step's corrections use only
the past steps (triangular); beyond it, a ``scan`` over steps with full-length buffers."""

BLOCK_ROWS = 2048
"""Target of stored rows (clients x steps x batch) per block of clients (see block_size)."""

BLOCK_ROWS_PER_CORE = 256
"""The same where the client axis is split over several host CPU devices (one per core, see
``docs/performance.md``): each core then works through its own blocks, and blocks that stay in
its cache win (MLP 784-200-200-10 on 2 cores: 256 rows about 1.25x faster than 2048;
``benchmarks/throughput.py --block-rows``, benchmarks/RESULTS.md)."""


def block_rows(mapper) -> int:
    """:data:`BLOCK_ROWS_PER_CORE` for a mesh of several CPU devices, else :data:`BLOCK_ROWS`."""
    mesh = mapper.mesh
    if mesh is not None and mesh.devices.size > 1 and all(
            d.platform == "cpu" for d in mesh.devices.flat):
        return BLOCK_ROWS_PER_CORE
    return BLOCK_ROWS

SHARED_WEIGHT = 0.7
CORRECTION_WEIGHT = 1.0
"""Time per FLOP of the fast path's shared products (large matrix products) and of its
corrections (small per-client products), in units of the general path's time per FLOP. Fitted
to CPU seconds per round on the throughput workload (MLP 784-200-200-10, batch 16) at 1, 2 and
4 local epochs (64, 128, 256 samples per round): fast / general = 0.67, 0.82, 1.15
(benchmarks/RESULTS.md), so the cost model crosses over near 200 samples per round."""


# --------------------------------------------------------------------------------------------
# Applicability and cost
# --------------------------------------------------------------------------------------------
def why_not(model: Model, optimizer: ClientOptimizer, loss: Any = None) -> str | None:
    """``None`` when the fast path applies to this model, optimizer and loss, else the reason."""
    if not model.plain:
        return (f"model {model.name!r} has dropout or state (Model.train_apply, e.g. "
                f"BatchNorm); the low-rank path needs a stateless deterministic model")
    if model.dense is None:
        return (f"model {model.name!r} does not declare a dense layer stack (Model.dense); the "
                f"low-rank path needs dense layers with an elementwise activation")
    if isinstance(loss, str) and loss != "cross_entropy":
        return f"loss {loss!r} is set; the low-rank path computes the default cross-entropy"
    if loss is not None and not isinstance(loss, str):
        return "a custom loss is set; the low-rank path computes the default cross-entropy"
    bad = [k for k in optimizer.kinds if k not in LINEAR_KINDS]
    if bad:
        return (f"optimizer kind(s) {bad} are not linear in the gradient; the low-rank path "
                f"needs all of {list(optimizer.kinds)} in {list(LINEAR_KINDS)}")
    if optimizer.clip_norm > 0:
        return ("gradient clipping (clip_norm) is not linear in the gradient; the low-rank path "
                "needs an update that is")
    return None


def layer_dims(model: Model) -> list[tuple[int, int]]:
    """``(in, out)`` of every dense layer of the model's stack."""
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    return [tuple(int(d) for d in shapes[name]["kernel"].shape) for name in model.dense.layers]


def flops(dims: list[tuple[int, int]], steps: int, batch: int, *, slots: int = 1,
          materialize: int = 0, prox: bool = False) -> dict[str, float]:
    """FLOPs per client and round of both paths (multiply-adds count 2).

    Args:
      dims: ``(in, out)`` per dense layer; ``steps``, ``batch``: ``T`` and ``B``.
      slots: start models the shared products run against (cluster slots).
      materialize: per-client trees formed at the end (``Engine.train``: parameters, plus
        momentum state), each one weight-gradient product.
      prox: also the Gram matrices of FedProx's reported loss.
    Returns:
      ``model``: the general path's training FLOPs, 3 x forward (``3 x 2 x MACs`` per example;
      biases, activations and the loss not counted); ``executed``: the fast path's, split into
      ``shared`` (products with the start model and the aggregated update) and
      ``corrections`` (Gram matrices and the products with them); ``cost``: the cost model's
      estimate of the fast path's time in general-path FLOPs,
      ``SHARED_WEIGHT x shared + CORRECTION_WEIGHT x corrections``.
    """
    n = steps * batch
    # Rows of past batches that the corrections of all steps together look at: only the past
    # when the step loop is unrolled, the full buffers in the scan.
    past = batch * (steps * (steps - 1) // 2 if steps <= UNROLL_MAX else steps * steps)
    model = sum(6.0 * n * i * o for i, o in dims)
    shared = corr = 0.0
    for li, (i, o) in enumerate(dims):
        shared += 2.0 * n * i * o * slots                     # forward with W0
        shared += 2.0 * n * i * o * slots                     # aggregated update (per slot)
        shared += 2.0 * n * i * o * materialize               # per-client trees formed
        corr += 2.0 * batch * past * o                        # forward: (Gram * p) @ past G
        if li == 0:  # Gram of the inputs, one product (unrolled: the block below the diagonal)
            corr += 2.0 * (n - batch if steps <= UNROLL_MAX else n) ** 2 * i
        else:
            shared += 2.0 * n * i * o * slots                 # input gradient with W0
            corr += 2.0 * batch * past * (i + o + i)          # Grams and backward correction
        if prox:
            corr += 2.0 * n * n * (i + o)
    return {"model": model, "executed": shared + corr, "shared": shared, "corrections": corr,
            "cost": SHARED_WEIGHT * shared + CORRECTION_WEIGHT * corr}


ACCELERATOR_AUTO = False
"""Whether ``path = "auto"`` may choose the fast path on an accelerator (GPU, TPU). Off:
measured on an NVIDIA H200 (``benchmarks/RESULTS.md``, "On a GPU", 2026-12-04), the general
path's vmapped chunks ran the throughput workload 1.5x faster than the fast path at 1,000
clients (108,600 against 71,100 client updates/s) and 1.7x at 10,000, although the fast path
does 12% fewer FLOPs: on a GPU both are bound by launches and small products, not by
arithmetic, and the fast path has more, smaller steps. ``path = "lowrank"`` still forces it."""


def pays(model: Model, spec: LocalSpec, n_max: int, *, slots: int = 1,
         materialize: int = 0, backend: str | None = None) -> bool:
    """The cost model: is the fast path's estimated cost below the general path's FLOPs?

    On a CPU, FLOPs decide. On an accelerator (``backend`` other than ``"cpu"``, default
    :func:`jax.default_backend`) the answer is :data:`ACCELERATOR_AUTO` (measured: no).
    """
    if (backend or jax.default_backend()) != "cpu" and not ACCELERATOR_AUTO:
        return False
    f = flops(layer_dims(model), spec.total_steps(n_max), min(spec.batch_size, n_max),
              slots=slots, materialize=materialize)
    return f["cost"] < f["model"]


def block_size(num_clients: int, rows_per_client: int, shards: int = 1,
               rows: int | None = None) -> tuple[int, int]:
    """``(blocks, clients per block)`` covering ``num_clients`` (padded up), a multiple of
    ``shards`` blocks, each holding about ``rows`` (default :data:`BLOCK_ROWS`) stored rows."""
    rows = BLOCK_ROWS if rows is None else rows
    per = max(1, min(num_clients, rows // max(rows_per_client, 1)))
    nb = -(-num_clients // per)
    nb = -(-nb // shards) * shards
    return nb, -(-num_clients // nb)


# --------------------------------------------------------------------------------------------
# Coefficients
# --------------------------------------------------------------------------------------------
def coefficients(optimizer: ClientOptimizer, template: PyTree, kind: jax.Array, lr: jax.Array,
                 mu: jax.Array, active: jax.Array) -> tuple[jax.Array, PyTree]:
    """The client's parameters and optimizer state as combinations of ``W0`` and its gradients.

    Runs the client's optimizer on coefficient vectors over the basis
    ``(W0, Gr_0, ..., Gr_{T-1})``: the parameters start as ``e_0``, the gradient of step ``s``
    is ``e_{s+1}`` plus the proximal pull ``mu (p - e_0)``, and masked steps change nothing,
    exactly as in :func:`~fedrnd.engine.local_train`.

    Args:
      template: a pytree shaped like the parameters (only its structure is used).
      kind, lr, mu: the client's scalars; ``active [T]``: which steps update.
    Returns:
      ``P [T + 1, T + 1]`` (row ``t``: the parameters before step ``t``; row ``T``: after the
      last) and the final optimizer state with the same structure as
      ``optimizer.init(params)``, every leaf a coefficient vector ``[T + 1]``.
    """
    n = active.shape[0] + 1
    e = jnp.eye(n, dtype=jnp.float32)
    p = jax.tree.map(lambda _: e[0], template)
    s = optimizer.init(p)

    def step(carry, t):
        p, s = carry
        g = jax.tree.map(lambda q: e[t + 1] + mu * (q - e[0]), p)
        u, s2 = optimizer.update(g, s, p, kind, lr)
        p2 = jax.tree.map(jnp.add, p, u)
        keep = active[t]
        p2 = jax.tree.map(lambda a, b: jnp.where(keep, a, b), p2, p)
        s2 = jax.tree.map(lambda a, b: jnp.where(keep, a, b), s2, s)
        return (p2, s2), jax.tree.leaves(p)[0]

    (p, s), rows = jax.lax.scan(step, (p, s), jnp.arange(n - 1))
    return jnp.concatenate([rows, jax.tree.leaves(p)[0][None]], 0), s


# --------------------------------------------------------------------------------------------
# One block of clients
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Plan:
    """What is static about a call: the model's stack, local work, optimizer, output."""

    stack: DenseStack
    spec: LocalSpec
    optimizer: ClientOptimizer
    mode: str            # "sum" | "segment" | "clients"
    num_slots: int = 1
    unroll_max: int = UNROLL_MAX


def _shared_fwd(w, b, a, sel):
    """``a W0 + b0`` with the client's start model; ``sel [K]`` picks its slot (None: one)."""
    if sel is None:
        return a @ w + b
    z = jnp.einsum("ri,kio->rko", a, w) + b[None]
    return jnp.einsum("rko,k->ro", z, sel)


def _shared_bwd(w, g, sel):
    """``g W0^T`` with the client's start model."""
    if sel is None:
        return g @ w.T
    return jnp.einsum("rko,kio->ri", g[:, None, :] * sel[None, :, None], w)


_CE = cross_entropy_loss(lambda _, logits: logits)


def _client(plan: _Plan, x, y, mask, P, sel, W):
    """Local training of one client (vmapped over a block).

    Args:
      x ``[T B, in_0]``, y, mask ``[T B]``: its batches, in step order.
      P ``[T + 1, T + 1]``: its coefficients; sel ``[K]`` or None: its slot.
      W: per layer ``(kernel, bias)`` of the start model(s), shared by the block.
    Returns:
      losses ``[T]`` (data term), inputs ``A_l [T B, in_l]`` for layers 1.., output gradients
      ``G_l [T B, out_l]``, and ``v [T]`` = ``<W0, Gr_t>`` (for the proximal loss).
    """
    L = len(W)
    T = P.shape[0] - 1
    b = x.shape[0] // T
    act = plan.stack.activation
    # The first layer's inputs are known before training: its products with the start model
    # and its Gram matrix for all steps are each one product (a batched product over the block
    # with a long contraction runs far better whole than sliced per step).
    z0_all = _shared_fwd(W[0][0], W[0][1], x, sel)
    unrolled = T <= plan.unroll_max
    # Unrolled, step t reads only rows t and columns < t of the Gram matrix: its block below
    # the diagonal, so the product leaves out the first rows and the last columns (for 4
    # steps 9/16 of the whole product; that product is most of the corrections' FLOPs).
    gram0 = (x[b:] @ x[: T * b - b].T + 1.0) if unrolled else x @ x.T + 1.0

    def step(t, x_t, z0_t, y_t, m_t, prev_a, prev_g, pcol, k0):
        """One step; ``prev_a[li] [S, in_l]``, ``prev_g[li] [S, out_l]`` hold past steps, and
        ``k0 [B, S]`` the first layer's Gram matrix with them."""
        p0 = P[t, 0]
        a, zs, hs, ins = x_t, [], [], []
        for li in range(L):
            z = z0_t if li == 0 else _shared_fwd(W[li][0], W[li][1], a, sel)
            h = p0 * z
            if pcol is not None:
                k = k0 if li == 0 else a @ prev_a[li].T + 1.0
                h = h + (k * pcol) @ prev_g[li]
            ins.append(a)
            zs.append(z)
            hs.append(h)
            a = act(h) if li < L - 1 else h
        loss, g = jax.value_and_grad(lambda lg: _CE(None, lg, y_t, m_t))(a)
        gs = [None] * L
        for li in reversed(range(L)):
            gs[li] = g
            if li > 0:
                da = p0 * _shared_bwd(W[li][0], g, sel)
                if pcol is not None:
                    da = da + ((g @ prev_g[li].T) * pcol) @ prev_a[li]
                g = jax.vjp(act, hs[li - 1])[1](da)[0]
        v = sum(jnp.sum(z * gg) for z, gg in zip(zs, gs, strict=True))
        return loss, ins, gs, v

    def rows(arr, t):
        return jax.lax.dynamic_slice_in_dim(arr, t * b, b, 0)

    if unrolled:
        A = [[] for _ in range(L)]
        G = [[] for _ in range(L)]
        losses, vs = [], []
        for t in range(T):
            if t == 0:
                prev_a = prev_g = pcol = None
            else:
                prev_a = [x[: t * b]] + [jnp.concatenate(A[li], 0) for li in range(1, L)]
                prev_g = [jnp.concatenate(G[li], 0) for li in range(L)]
                pcol = jnp.repeat(P[t, 1:t + 1], b)
            sl = slice(t * b, (t + 1) * b)
            k0 = None if t == 0 else gram0[(t - 1) * b: t * b, : t * b]
            loss, ins, gs, v = step(t, x[sl], z0_all[sl], y[sl], mask[sl], prev_a, prev_g, pcol,
                                    k0)
            for li in range(L):
                A[li].append(ins[li])
                G[li].append(gs[li])
            losses.append(loss)
            vs.append(v)
        A = [x] + [jnp.concatenate(A[li], 0) for li in range(1, L)]
        G = [jnp.concatenate(G[li], 0) for li in range(L)]
        return jnp.stack(losses), A, G, jnp.stack(vs)

    # Many steps: scan with full-length buffers; coefficients of future steps are exactly 0.
    A0 = [x] + [jnp.zeros((T * b, W[li][0].shape[-2]), x.dtype) for li in range(1, L)]
    G0 = [jnp.zeros((T * b, W[li][0].shape[-1]), x.dtype) for li in range(L)]

    def body(carry, t):
        A, G = carry
        pcol = jnp.repeat(P[t, 1:], b)
        loss, ins, gs, v = step(t, rows(x, t), rows(z0_all, t), rows(y, t), rows(mask, t),
                                A, G, pcol, rows(gram0, t))
        A = [A[0]] + [jax.lax.dynamic_update_slice_in_dim(A[li], ins[li], t * b, 0)
                      for li in range(1, L)]
        G = [jax.lax.dynamic_update_slice_in_dim(G[li], gs[li], t * b, 0) for li in range(L)]
        return (A, G), (loss, v)

    (A, G), (losses, vs) = jax.lax.scan(body, (A0, G0), jnp.arange(T))
    return losses, A, G, vs


def _prox_sq(P, A, G, v, w0_sq):
    """``||W_t - W0||^2`` for every step ``t`` of one client, from its Gram matrices ``[T]``."""
    T = P.shape[0] - 1
    b = A[0].shape[0] // T
    S = 0.0
    for a, g in zip(A, G, strict=True):
        gram = (a @ a.T + 1.0) * (g @ g.T)
        S = S + gram.reshape(T, b, T, b).sum((1, 3))
    c0 = P[:T, 0] - 1.0
    c = P[:T, 1:]
    return c0 * c0 * w0_sq + 2.0 * c0 * (c @ v) + jnp.einsum("ts,sr,tr->t", c, S, c)


def _block(plan: _Plan, client: dict[str, jax.Array], shared):
    """Train one block of clients ``[Cb]``; the reduction ``plan.mode`` asks for."""
    slots, x_pool, y_pool, scale, anchor = shared
    n_max = client["idx"].shape[1]
    cb = client["idx"].shape[0]
    K = plan.num_slots
    names = plan.stack.layers
    W = [(slots[nm]["kernel"], slots[nm]["bias"]) for nm in names]
    if plan.mode != "segment":
        W = [(w[0], bb[0]) for w, bb in W]

    pos, valid, active, n_steps = jax.vmap(
        lambda c, k: batch_schedule(plan.spec, n_max, c, k))(client["count"], client["key"])
    T, b = pos.shape[1], pos.shape[2]
    rows = jnp.take_along_axis(client["idx"], pos.reshape(cb, T * b), axis=1)
    x = x_pool[rows].reshape(cb, T * b, -1)
    y = y_pool[rows]
    mask = valid.reshape(cb, T * b).astype(x.dtype)
    mu = client["mu"]
    P, state_coef = jax.vmap(lambda k, lr, m, a: coefficients(
        plan.optimizer, anchor, k, lr, m, a))(client["kind"], client["lr"] * scale, mu, active)

    sel = None
    if plan.mode == "segment":
        sel = jax.nn.one_hot(client["cid"], K, dtype=x.dtype)   # [Cb, K]; outside [0, K) -> 0
    losses, A, G, v = jax.vmap(lambda *a: _client(plan, *a, W),
                               in_axes=(0, 0, 0, 0, None if sel is None else 0))(x, y, mask, P,
                                                                                  sel)

    def with_prox(losses):
        w0 = [jnp.sum(w * w, axis=(-2, -1)) + jnp.sum(bb * bb, -1) for w, bb in W]
        w0_sq = sum(w0)
        if sel is not None:
            w0_sq = sel @ w0_sq
        sq = jax.vmap(_prox_sq, in_axes=(0, 0, 0, 0, None if sel is None else 0))(
            P, A, G, v, w0_sq)
        return losses + 0.5 * mu[:, None] * sq

    # As in local_train, the proximal term is only computed when some client has mu != 0.
    losses = jax.lax.cond(jnp.any(mu != 0), with_prox, lambda lo: lo, losses)
    losses = jnp.where(active, losses, 0.0)
    loss = jnp.sum(losses, 1) / jnp.maximum(n_steps, 1)

    def combine(f, li, leaf, w):
        """Layer ``li``'s ``leaf`` of the per-client combinations ``f [Cb, T+1]`` of
        ``(W0, Gr_0, ..., Gr_{T-1})``: per client (``w`` None) or summed with weights ``w``
        (per slot in segment mode)."""
        w0 = W[li][0] if leaf == "kernel" else W[li][1]
        gc = G[li] * jnp.repeat(f[:, 1:], b, axis=1)[..., None]         # [Cb, T B, out]
        if w is None:
            base = f[:, 0].reshape(-1, *[1] * w0.ndim) * w0
            if leaf == "kernel":
                return base + jnp.einsum("cri,cro->cio", A[li], gc)
            return base + jnp.sum(gc, 1)
        if plan.mode == "sum":
            base = jnp.sum(w * f[:, 0]) * w0
            gw = gc * w[:, None, None]
            if leaf == "kernel":
                return base + jnp.einsum("cri,cro->io", A[li], gw)
            return base + jnp.sum(gw, (0, 1))
        ws = w[:, None] * sel                                           # [Cb, K]
        base = (f[:, 0] @ ws).reshape(-1, *[1] * (w0.ndim - 1)) * w0
        gk = gc[:, :, None, :] * ws[:, None, :, None]                   # [Cb, T B, K, out]
        if leaf == "kernel":
            return base + jnp.einsum("cri,crko->kio", A[li], gk)
        return base + jnp.sum(gk, (0, 1))

    def build(coef_tree, w):
        """A tree of combinations: every leaf from the coefficient leaf at its place."""
        flat, treedef = jax.tree_util.tree_flatten_with_path(coef_tree)
        out = []
        for path, f in flat:
            layer, leaf = _leaf_of(path, names)
            out.append(combine(f, names.index(layer), leaf, w))
        return jax.tree_util.tree_unflatten(treedef, out)

    final = jax.tree.map(lambda _: P[:, -1], anchor)                    # parameters after T
    steps = n_steps.astype(jnp.float32)
    if plan.mode == "clients":
        # Optimizer state leaves are parameter-shaped buffers (momentum) at paths ending with
        # their parameter's path; each is formed from its own coefficient vector.
        return build(final, None), build(state_coef, None), {"loss": loss, "steps": n_steps}
    w = client["w"]
    sums = build(final, w)
    if plan.mode == "sum":
        return sums, jnp.sum(w), {"loss": jnp.sum(w * loss), "steps": jnp.sum(steps)}
    return sums, w @ sel, {"loss": (w * loss) @ sel, "steps": steps @ sel}


def _leaf_of(path, names) -> tuple[str, str]:
    """The ``(layer, kernel|bias)`` a key path ends with."""
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path[-2:]]
    if len(keys) == 2 and keys[0] in names and keys[1] in ("kernel", "bias"):
        return keys[0], keys[1]
    raise ValueError(f"low-rank path: cannot place leaf {jax.tree_util.keystr(path)} "
                     f"(expected <layer>/kernel or <layer>/bias of {list(names)})")


# --------------------------------------------------------------------------------------------
# Entry points (called by Engine)
# --------------------------------------------------------------------------------------------
def run(model: Model, spec: LocalSpec, optimizer: ClientOptimizer, mapper: ClientMapper,
        mode: str, slots: PyTree, per: dict[str, jax.Array], x_pool: jax.Array,
        y_pool: jax.Array, scale: jax.Array, *, num_slots: int = 1,
        unroll_max: int = UNROLL_MAX, block: int | None = None):
    """Train the clients of ``per`` (leaves ``[M, ...]``, as ``Engine._per_client`` gives them,
    plus ``w`` aggregation weights and ``cid`` slots where the mode needs them) on the fast path.

    Args:
      mode: ``"sum"``: ``(sum_c w_c W_T^c, sum_c w_c, metric sums)`` (``Engine.train_sum``);
        ``"segment"``: the same per slot, leaves ``[K, ...]`` (``Engine.train_segment_sum``);
        ``"clients"``: per-client ``(params, opt_state, metrics)`` (``Engine.train``).
      slots: start models with a leading slot axis ``[K, ...]`` (``K = 1`` but for segment).
      block: clients per block (default :func:`block_size`).
    """
    if mapper.mesh is not None:
        mapper._check_divisible(per["idx"])  # the same rule as the general path
    m = per["idx"].shape[0]
    n_max = per["idx"].shape[1]
    steps, b = spec.total_steps(n_max), min(spec.batch_size, n_max)
    if block is None:
        nb, cb = block_size(m, steps * b, mapper.num_shards, block_rows(mapper))
    else:
        cb = max(1, min(int(block), m))
        nb = -(-m // cb)
        nb = -(-nb // mapper.num_shards) * mapper.num_shards
    pad = nb * cb - m
    if pad:
        def padded(k, a):
            extra = jnp.repeat(a[:1], pad, 0)
            if k in ("count", "w"):
                extra = jnp.zeros_like(extra)
            if k == "cid":
                extra = jnp.full_like(extra, -1)
            return jnp.concatenate([a, extra], 0)

        per = {k: padded(k, a) for k, a in per.items()}
    blocks = jax.tree.map(lambda a: a.reshape(nb, cb, *a.shape[1:]), per)
    plan = _Plan(model.dense, spec, optimizer, mode, num_slots, unroll_max)
    anchor = jax.tree.map(lambda s: s[0], slots)
    shared = (slots, x_pool.reshape(x_pool.shape[0], -1), y_pool, scale, anchor)
    one = dataclasses.replace(mapper, chunk_size=1)

    def fn(blk, sh):
        return _block(plan, blk, sh)

    if mode == "clients":
        out = one.map(fn, blocks, shared)
        return jax.tree.map(lambda a: a.reshape(nb * cb, *a.shape[2:])[:m], out)
    return one.sum(fn, blocks, shared)


def executed_flops(model: Model, spec: LocalSpec, n_max: int, clients: int, **kw) -> dict:
    """:func:`flops` for a round of ``clients`` clients (totals, not per client)."""
    f = flops(layer_dims(model), spec.total_steps(n_max), min(spec.batch_size, n_max), **kw)
    return {k: v * clients for k, v in f.items()}


__all__ = ["LINEAR_KINDS", "PATHS", "block_size", "coefficients", "executed_flops", "flops",
           "layer_dims", "pays", "run", "why_not"]
