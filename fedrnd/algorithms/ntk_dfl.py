"""NTK-DFL and SPARK: decentralized FL that evolves outputs with the neural tangent kernel.

**NTK-DFL** (Thompson, Yue, Wong, Dai; ICML 2025, arXiv 2410.01922). Every round:

1. a fresh graph (default: 5-regular, redrawn from the round key inside the jitted round);
2. every client averages its weights with its neighbours', ``w_bar_i = mean_{j in N[i]} w_j``
   (closed neighbourhood, uniform weights: gossip with ``mixing = "uniform"``);
3. every neighbour ``j`` evaluates the per-sample, per-class Jacobian of its own data at
   ``w_bar_i`` and sends it with its labels and outputs; client ``i`` forms the class-averaged
   kernel ``H = (1/C) sum_c J_c J_c^T`` over the pooled neighbourhood samples
   (:mod:`fedrnd.ntk`: built from layer activations and back-propagated sensitivities, never
   materialising ``J``);
4. it evolves the pooled outputs ``df/dt = -(1/n) H (softmax(f) - Y)`` from ``f(X; w_bar_i)``
   (scanned RK4, :func:`fedrnd.ntk.evolve`) and turns the integrated residual ``A(t)`` into the
   weight change ``dw(t) = -(1/n) J^T A(t)`` (one reverse-mode pass for all horizons);
5. among the horizons ``t = lr_k tau`` (``tau`` in ``taus``, ``lr_k = lr exp(-lr_decay k)``) it
   keeps the one whose weights have the lowest cross-entropy on the pooled neighbourhood data
   (the model evaluated at the candidate weights, as in the authors' simulation code).

The final model is the average of the client models (``models`` returns it as one slot).

**SPARK** (Li Xia, arXiv 2512.12737 v2) adds three parts. No code or schedules are published,
so the following is *our reconstruction* (each part can be switched off for an ablation):

- ``project``: each layer's Jacobian block is compressed by a Gaussian random projection
  ``R_l`` with i.i.d. ``N(0, 1/k_l)`` entries, ``k_l = min(proj_dim, block size)``, drawn from
  the round key (a seed all clients share, so ``R`` is never sent). The receiver builds the
  kernel from the projected Jacobians, which drives the output evolution. The weight update
  ``-(1/n) J^T A`` needs the Jacobians themselves; two readings (``projected_update``):
  ``"exact"`` (default): node ``i`` sends each neighbour ``j`` the integrated residuals of
  ``j``'s rows at every candidate horizon (``M x n_j x C`` floats, ledger ``residuals``) and
  ``j`` returns ``J_j^T A_j`` per horizon (``M`` model-sized vectors, ledger ``updates``), so the
  update is exact and only the kernel is approximate; ``"sketch"``: no extra messages,
  ``dw_l = -(1/n) R_l P_l^T A``, unbiased for ``J^T A`` (``E[R R^T] = I``) but with noise of
  norm about ``sqrt(P_l / k_l)`` times the signal; ``"exact_one"`` (ours): the horizon is chosen
  with the sketched updates (the loss at ``w + dw_sketch(t)``, no messages), then node ``i``
  sends each neighbour the residuals of that one horizon (``n_j x C`` floats) and gets back one
  exact ``J_j^T A_j``: the exact update of the chosen horizon at ``1 / M`` of ``"exact"``'s second
  round trip. (Choosing by the linearised loss of ``f(t)`` instead would always pick the longest
  horizon: gradient flow lowers it monotonically.) Jacobian bytes are counted after projection.
- ``soft_weight``: a stage-wise annealed soft-label regulariser. The evolution targets become
  ``Y_s = (1 - beta_s) Y + beta_s softmax(S / soft_temperature)``: hard labels mixed with
  tempered soft labels ``S`` on the pooled neighbourhood rows. ``soft_source`` says whose
  predictions ``S`` are: ``"own"`` (default): ``S = f0``, the outputs of client ``i``'s *own*
  start point (``w_bar_i``, or the look-ahead point with momentum); the neighbours evaluate
  ``f0`` on their rows at that point and already send it as outputs, so no extra bytes, but the
  soft labels are client ``i``'s model's (a self-distillation, akin to label smoothing).
  ``"neighbours"``: every member ``j`` of the closed neighbourhood labels its own rows with its
  own current model, ``S_j = f(X_j; w_j)`` (client ``i``'s rows with ``w_i``), so the target
  pulls towards the neighbours' opinions; each neighbour sends these ``n_j x C`` float32 beside
  its outputs at ``w_bar_i`` (ledger ``soft_outputs``, counted in rounds with ``beta > 0``).
  ``soft_schedule`` says the direction of the annealing, with ``s = floor(k / stage_rounds)``:
  ``"decay"`` (default): ``beta_s = soft_weight * soft_decay ** s``, strongest in round 0,
  decaying towards the hard-label NTK-DFL update (pure NTK evolution); ``"ramp"``:
  ``beta_s = soft_weight * (1 - soft_decay ** s)``, from pure NTK evolution (``beta_0 = 0``)
  growing towards ``soft_weight`` (neighbour-regularised learning), the direction of SPARK
  v1's wording (see ``docs/methods/spark.md``). Both schedules and both sources are ours.
- ``momentum``: Nesterov momentum across rounds on the NTK update. Client ``i`` keeps a
  velocity ``v_i``; the Jacobians are taken at the look-ahead point ``w_bar_i + mu v_i``, the
  NTK step ``u_i`` is computed there (horizon chosen by the loss at ``w_bar_i + mu v_i + u``),
  then ``v_i <- mu v_i + u_i`` and ``w_i <- w_bar_i + v_i``. ``momentum = 0`` gives NTK-DFL's
  update; the velocity stays with its client (not gossiped, no extra bytes).

Ledger (bytes per client and round, from the message shapes): ``model`` (a node sends its
weights to each neighbour for averaging and its start point ``w_bar_i`` or look-ahead point to
each neighbour to have Jacobians evaluated there, and receives as many), ``jacobian``
(``n_j x C x P`` float32 per neighbour message; ``P`` = parameters, or ``sum_l k_l`` after
projection), ``labels`` (``n_j`` int32) and ``outputs`` (``n_j x C`` float32). ``up`` counts what
a node sends to all its neighbours; ``down`` what it receives.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from fedrnd.algorithms.base import Algorithm, Metrics, State, option
from fedrnd.data.federated import FederatedData
from fedrnd.engine import ClientHParams, comm, tree_bytes
from fedrnd.graphs import Graph, Topology, edge_chunk_for, gossip, make_topology, mixing_edges
from fedrnd.ntk import (
    LOSSES,
    dense_jacobian,
    dense_kernel,
    draw_projections,
    evolve,
    jacobian_transpose,
    layer_features,
    project_features,
    projection_dims,
    structured_kernel,
    unproject_update,
)

_GRAPH_KEY = 0x6EA7  # as the gossip methods: the same round key draws the same graph
_PROJ_KEY = 0x5BA7
UPDATES = ("exact", "exact_one", "sketch")
SOFT_SCHEDULES = ("decay", "ramp")
SOFT_SOURCES = ("own", "neighbours")
_SPARK = "SPARK's part (:class:`SPARK`)"


class _Options(dict):
    """Topology options that hash by value (the algorithm must stay hashable for ``jit``)."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))


def neighbour_table(graph: Graph, max_degree: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(table [N, max_degree] int32, valid [N, max_degree] bool, dropped)`` of a graph.

    Row ``i`` lists ``i``'s neighbours in slot order; missing entries are ``0`` with
    ``valid = False``. Neighbours beyond ``max_degree`` are dropped and counted in ``dropped``.
    """
    n = graph.num_nodes
    src = jnp.concatenate([graph.u, graph.v]).astype(jnp.int32)
    dst = jnp.concatenate([graph.v, graph.u]).astype(jnp.int32)
    ok = jnp.concatenate([graph.valid, graph.valid])
    key = jnp.where(ok, src, n)
    order = jnp.argsort(key, stable=True)
    s_src, s_dst = key[order], dst[order]
    start = jnp.searchsorted(s_src, jnp.arange(n + 1, dtype=jnp.int32))
    rank = jnp.arange(s_src.shape[0], dtype=jnp.int32) - start[s_src]
    keep = (s_src < n) & (rank < max_degree)
    row = jnp.where(keep, s_src, n)
    table = jnp.zeros((n + 1, max_degree), jnp.int32).at[row, rank].set(s_dst, mode="drop")
    valid = jnp.zeros((n + 1, max_degree), bool).at[row, rank].set(True, mode="drop")
    dropped = jnp.sum((s_src < n) & (rank >= max_degree))
    return table[:n], valid[:n], dropped


def soft_targets(y: jax.Array, logits: jax.Array, beta: jax.Array,
                 temperature: float) -> jax.Array:
    """``(1 - beta) y + beta softmax(logits / temperature)``: ``y [n, C]`` one-hot."""
    return (1.0 - beta) * y + beta * jax.nn.softmax(logits / temperature, axis=-1)


def _masked_ce(logits: jax.Array, y: jax.Array, mask: jax.Array) -> jax.Array:
    nll = -jnp.sum(y * jax.nn.log_softmax(logits, axis=-1), axis=-1)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@dataclasses.dataclass(frozen=True)
class NTKDFL(Algorithm):
    """NTK-DFL (see the module docstring); SPARK's parts are options, off here."""

    name: ClassVar[str] = "ntk_dfl"
    family: ClassVar[str] = "decentralized"
    topology: str = option("d_regular", doc="A random topology of :mod:`fedrnd.graphs`, "
                                            "redrawn every round.")
    graph: dict[str, Any] = option(default_factory=lambda: {"degree": 5},
                                   doc="The topology's options.")
    max_degree: int | None = option(None, low=1, doc="Neighbour slots per node (unset: the "
                                                     "d-regular degree, 2 for a ring).")
    lr: float = option(0.01, low=0, low_open=True,
                       doc="Horizons are ``lr exp(-lr_decay k) tau`` in round ``k``.")
    lr_decay: float = option(0.07, low=0, doc="See ``lr``.")
    taus: tuple[int, ...] = option((100, 200, 300, 400, 500, 600, 800),
                                   doc="Candidate horizons in steps of ``lr`` (the paper's).")
    ode_steps: int = option(64, low=1, doc="RK4 steps up to the longest horizon (every tau "
                                           "must fall on the grid).")
    loss: str = option("ce", choices=LOSSES, doc="``ce`` (the paper) or ``mse`` (squared "
                                                 "error, ``df/dt = -(1/n) H (f - Y)``).")
    momentum: float = option(0.0, low=0, high=1, high_open=True, doc=f"{_SPARK}: Nesterov momentum ``mu`` across rounds "
                                                                   "(0: off).")
    soft_weight: float = option(0.0, low=0, high=1, doc=f"{_SPARK}: initial weight ``beta`` of the "
                                                       "soft labels (0: off).")
    soft_decay: float = option(0.5, low=0, high=1, doc=f"{_SPARK}: ``decay``: factor on ``beta`` "
                                                      "every stage; ``ramp``: factor on the "
                                                      "gap ``soft_weight - beta``.")
    soft_schedule: str = option("decay", choices=SOFT_SCHEDULES,
                                doc=f"{_SPARK}: ``decay`` (``beta`` starts at ``soft_weight`` "
                                    "and decays to 0) or ``ramp`` (starts at 0 and grows to "
                                    "``soft_weight``).")
    soft_source: str = option("own", choices=SOFT_SOURCES,
                              doc=f"{_SPARK}: soft labels from client ``i``'s own start point "
                                  "(``own``) or from each neighbour's own model on its own rows "
                                  "(``neighbours``; extra bytes, ledger ``soft_outputs``).")
    stage_rounds: int = option(5, low=1, doc=f"{_SPARK}: rounds per stage.")
    soft_temperature: float = option(2.0, low=0, low_open=True,
                                     doc=f"{_SPARK}: temperature of the soft labels.")
    project: bool = option(False, doc=f"{_SPARK}: compress each layer's Jacobian by a "
                                       "shared Gaussian random projection.")
    proj_dim: int = option(256, low=1, doc=f"{_SPARK}: projected rows per layer, at most.")
    projected_update: str = option("exact", choices=UPDATES,
                                   doc=f"{_SPARK}: ``exact``, ``exact_one`` or ``sketch`` "
                                       "(see the module docstring).")

    def __post_init__(self):
        if isinstance(self.graph, dict) and not isinstance(self.graph, _Options):
            object.__setattr__(self, "graph", _Options(self.graph))
        if isinstance(self.taus, list | np.ndarray):
            object.__setattr__(self, "taus", tuple(int(t) for t in self.taus))

    # -- configuration ------------------------------------------------------------------------
    @property
    def model(self):
        return self.engine.model

    def make_topology(self, num_nodes: int) -> Topology:
        if not isinstance(self.graph, dict):
            raise ValueError(f"{self.name}: graph must be a table of topology options, got "
                             f"{self.graph!r}")
        return make_topology(self.topology, num_nodes, **self.graph)

    def slots(self, num_nodes: int) -> int:
        if self.max_degree is not None:
            return int(self.max_degree)
        if self.topology == "d_regular":
            return int(self.graph.get("degree", 0))
        if self.topology == "ring":
            return 2
        if self.topology == "complete":
            return num_nodes - 1
        raise ValueError(f"{self.name}: set max_degree for topology {self.topology!r} (the "
                         "neighbour slots per node; neighbours beyond it are dropped)")

    def horizon_steps(self) -> tuple[int, ...]:
        """The RK4 step index of every candidate horizon."""
        tmax = max(self.taus)
        steps = []
        for t in self.taus:
            s = t * self.ode_steps / tmax
            if abs(s - round(s)) > 1e-9 or round(s) < 1:
                raise ValueError(f"{self.name}: tau={t} falls between RK4 steps (ode_steps="
                                 f"{self.ode_steps}, longest tau {tmax}); choose ode_steps so "
                                 "that every tau * ode_steps / max(taus) is a positive integer")
            steps.append(int(round(s)))
        return tuple(steps)

    def validate(self, data: FederatedData) -> None:
        super().validate(data)
        if not self.engine.model.plain:
            raise ValueError(f"{self.name}: model {self.engine.model.name!r} has dropout or "
                             f"state (BatchNorm); its Jacobians differentiate Model.apply in "
                             f"every leaf, "
                             f"so it needs a stateless deterministic model")
        if self.cohort_size is not None and self.cohort_size < data.num_clients:
            raise ValueError(f"{self.name}: every node takes part every round; cohort_size="
                             f"{self.cohort_size} < {data.num_clients} is not supported")
        if not self.taus or any(int(t) < 1 for t in self.taus):
            raise ValueError(f"{self.name}: taus must be positive integers, got {self.taus}")
        self.horizon_steps()
        if self.project:
            if self.model.dense is None:
                raise ValueError(f"{self.name}: project = true needs a dense-stack model")
            projection_dims(self.model, self.proj_dim)
        topo = self.make_topology(data.num_clients)
        if not topo.random:
            raise ValueError(f"{self.name}: the graph is redrawn every round; "
                             f"{topo.describe()} is the same in every draw")
        if self.slots(data.num_clients) < 1:
            raise ValueError(f"{self.name}: max_degree must be >= 1")

    # -- state --------------------------------------------------------------------------------
    def init(self, key: jax.Array, data: FederatedData, hp: ClientHParams) -> State:
        c = data.num_clients
        params = self.model.init(key)
        stacked = jax.tree.map(lambda p: jnp.broadcast_to(p, (c, *p.shape)), params)
        clients = {"hp": hp, "params": stacked}
        if self.momentum > 0:
            clients["velocity"] = jax.tree.map(jnp.zeros_like, stacked)
        return {"round": jnp.zeros((), jnp.int32), "clients": clients}

    def models(self, state: State):
        """The final model: the average of the client models, as one slot for every client."""
        p = state["clients"]["params"]
        c = jax.tree.leaves(p)[0].shape[0]
        return jax.tree.map(lambda a: jnp.mean(a, axis=0, keepdims=True), p), jnp.zeros(
            (c,), jnp.int32)

    # -- message sizes ------------------------------------------------------------------------
    def jacobian_width(self) -> int:
        """Numbers per (sample, class) in a Jacobian message: parameters, or sum_l k_l."""
        if self.project:
            return int(sum(projection_dims(self.model, self.proj_dim)))
        return int(self.model.num_params())

    def message_bytes(self, num_samples: jax.Array) -> dict[str, jax.Array]:
        """Bytes of one neighbour's reply carrying ``num_samples`` samples, by kind."""
        c = self.model.num_classes
        f32, i32 = np.dtype(np.float32).itemsize, np.dtype(np.int32).itemsize
        n = jnp.asarray(num_samples, jnp.float32)
        return {"jacobian": n * float(c * self.jacobian_width() * f32),
                "labels": n * float(i32), "outputs": n * float(c * f32)}

    # -- one round ----------------------------------------------------------------------------
    def schedule(self, round_idx: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(lr_k, beta_k)``: the horizon scale and the soft-label weight of round ``k``."""
        k = round_idx.astype(jnp.float32)
        lr_k = self.lr * jnp.exp(-self.lr_decay * k)
        stage = (round_idx // self.stage_rounds).astype(jnp.float32)
        decayed = jnp.float32(self.soft_decay) ** stage
        if self.soft_schedule == "ramp":
            return lr_k, self.soft_weight * (1.0 - decayed)
        return lr_k, self.soft_weight * decayed

    def client_step(self, look: Any, x: jax.Array, y: jax.Array, mask: jax.Array,
                    lr_k: jax.Array, beta: jax.Array, proj, soft: jax.Array | None = None
                    ) -> dict[str, Any]:
        """One client's NTK step from its start point ``look`` on its pooled neighbourhood.

        ``x [n, ...]``, ``y [n, C]`` one-hot, ``mask [n]``; ``soft [n, C]`` the logits the soft
        labels come from (``None``: ``f0``, the outputs at ``look``). Returns the chosen update ``u``
        (params-shaped), its pooled loss, the start loss and the chosen ``tau``.
        """
        model, c = self.model, self.model.num_classes
        mf = mask.astype(jnp.float32)
        if model.dense is not None:
            feats = layer_features(model, look, x)
            f0 = feats.logits
            if proj is None:
                h = structured_kernel(feats)
            else:
                pj = project_features(feats, proj)
                h = jnp.einsum("icp,jcp->ij", pj, pj) / c
        else:  # small non-dense models: the dense Jacobian
            jac = dense_jacobian(model.apply, look, x)
            f0 = model.apply(look, x)
            h = dense_kernel(jac)
        h = h * mf[:, None] * mf[None, :]
        target = soft_targets(y, f0 if soft is None else soft, beta, self.soft_temperature)
        dt = lr_k * max(self.taus) / self.ode_steps
        _, a = evolve(h, f0, target, mf, dt, self.ode_steps, self.loss)
        a = a[jnp.asarray(self.horizon_steps())]  # [M, n, C]
        n = jnp.maximum(jnp.sum(mf), 1.0)
        cot = -(a * mf[None, :, None]) / n
        if proj is None or self.projected_update == "exact":
            dw = jacobian_transpose(model.apply, look, x, cot)
        else:
            dw = unproject_update(model, jnp.einsum("icp,mic->mp", pj, cot), proj)
        cand = jax.tree.map(lambda w, d: w[None] + d, look, dw)
        losses = jax.vmap(lambda w: _masked_ce(model.apply(w, x), y, mf))(cand)
        losses = jnp.where(jnp.isfinite(losses), losses, jnp.inf)
        best = jnp.argmin(losses)
        if proj is not None and self.projected_update == "exact_one":
            # The sketch chose the horizon; the neighbours return the exact update for it.
            exact = jacobian_transpose(model.apply, look, x, cot[best][None])
            dw = jax.tree.map(lambda d: d[0], exact)
            loss = _masked_ce(model.apply(jax.tree.map(jnp.add, look, dw), x), y, mf)
            ok = jnp.isfinite(loss)
            u = jax.tree.map(lambda d: jnp.where(ok, d, 0.0), dw)
            return {"update": u, "loss": jnp.where(ok, loss, jnp.inf),
                    "start_loss": _masked_ce(f0, y, mf),
                    "tau": jnp.asarray(self.taus, jnp.float32)[best]}
        ok = jnp.isfinite(losses[best])
        u = jax.tree.map(lambda d: jnp.where(ok, d[best], 0.0), dw)
        return {"update": u, "loss": losses[best], "start_loss": _masked_ce(f0, y, mf),
                "tau": jnp.asarray(self.taus, jnp.float32)[best]}

    def round(self, state: State, data: FederatedData, key: jax.Array) -> tuple[State, Metrics]:
        c = data.num_clients
        dmax = self.slots(c)
        k_graph, k_proj = jax.random.split(key)
        graph = self.make_topology(c).draw(jax.random.fold_in(k_graph, _GRAPH_KEY))
        table, tvalid, dropped = neighbour_table(graph, dmax)
        cl = state["clients"]
        x = cl["params"]
        nbytes = tree_bytes(jax.tree.map(lambda a: a[0], x))
        wbar = gossip(x, mixing_edges(graph, "uniform"), c, 1, edge_chunk_for(nbytes))
        mu = float(self.momentum)
        look = wbar if mu == 0 else jax.tree.map(lambda w, v: w + mu * v, wbar, cl["velocity"])
        lr_k, beta = self.schedule(state["round"])
        proj = (draw_projections(jax.random.fold_in(k_proj, _PROJ_KEY), self.model,
                                 self.proj_dim) if self.project else None)

        members = jnp.concatenate([jnp.arange(c, dtype=jnp.int32)[:, None], table], axis=1)
        present = jnp.concatenate([jnp.ones((c, 1), bool), tvalid], axis=1)  # [C, d+1]
        count = jnp.where(present, data.train_count[members], 0)
        nmax = data.max_train
        idx = data.train_idx[members].reshape(c, -1)  # [C, (d+1) N]
        rowmask = (jnp.arange(nmax)[None, None, :] < count[..., None]).reshape(c, -1)

        def one(client, shared):
            # The pool and projections come in as shared arguments: a sharded client map
            # cannot close over arrays placed on its mesh.
            xp = shared["x"][client["idx"]]
            yp = jax.nn.one_hot(shared["y"][client["idx"]], self.model.num_classes)
            return self.client_step(client["look"], xp, yp, client["mask"], shared["lr"],
                                    shared["beta"], shared["proj"], client.get("soft"))

        per_client = {"look": look, "idx": idx, "mask": rowmask}
        neighbours_soft = self.soft_source == "neighbours" and self.soft_weight > 0
        if neighbours_soft:
            # Every node labels its own rows with its own model (before this round's
            # averaging); node i pools those of its closed neighbourhood in slot order.
            own_idx = data.train_idx  # [C, N]
            own_out = self.engine.mapper.map(
                lambda cl, sh: self.model.apply(cl["w"], sh["x"][cl["idx"]]),
                {"w": x, "idx": own_idx}, {"x": data.x})  # [C, N, classes]
            per_client["soft"] = own_out[members].reshape(c, -1, own_out.shape[-1])

        out = self.engine.mapper.map(one, per_client,
                                     {"lr": lr_k, "beta": beta, "x": data.x, "y": data.y,
                                      "proj": proj})
        u = out["update"]
        clients = dict(cl)
        if mu == 0:
            clients["params"] = jax.tree.map(lambda w, d: w + d, wbar, u)
        else:
            v = jax.tree.map(lambda v0, d: mu * v0 + d, cl["velocity"], u)
            clients["velocity"] = v
            clients["params"] = jax.tree.map(lambda w, d: w + d, wbar, v)

        deg = jnp.sum(tvalid, axis=1).astype(jnp.float32)
        own = data.train_count.astype(jnp.float32)
        nbr = jnp.sum(jnp.where(tvalid, data.train_count[table], 0), axis=1).astype(jnp.float32)
        sent, got = self.message_bytes(own), self.message_bytes(nbr)
        ledger = {"up_model": 2.0 * deg * nbytes, "down_model": 2.0 * deg * nbytes}
        for kind in sent:
            ledger[f"up_{kind}"] = deg * sent[kind]
            ledger[f"down_{kind}"] = got[kind]
        if neighbours_soft:
            # Each neighbour's own-model outputs on its rows: n_j x C float32, only in
            # rounds that use them.
            on = (beta > 0).astype(jnp.float32)
            soft = float(self.model.num_classes * np.dtype(np.float32).itemsize)
            ledger["up_soft_outputs"] = on * deg * own * soft
            ledger["down_soft_outputs"] = on * nbr * soft
        if self.project and self.projected_update in ("exact", "exact_one"):
            # Node i sends each neighbour j the integrated residuals of j's rows at every
            # candidate horizon (exact_one: the chosen one) and gets back J_j^T A_j per
            # horizon (one model-sized vector each).
            m = len(self.taus) if self.projected_update == "exact" else 1
            ncls = self.model.num_classes
            res = float(m * ncls * np.dtype(np.float32).itemsize)
            ledger["up_residuals"] = nbr * res
            ledger["down_residuals"] = deg * own * res
            ledger["up_updates"] = deg * float(m * nbytes)
            ledger["down_updates"] = deg * float(m * nbytes)
        pooled = own + nbr
        metrics = {"train_loss": jnp.sum(out["loss"] * pooled) / jnp.sum(pooled),
                   "start_loss": jnp.sum(out["start_loss"] * pooled) / jnp.sum(pooled),
                   "tau_mean": jnp.mean(out["tau"]), "lr": lr_k, "soft_weight": beta,
                   "links": jnp.sum(deg) / 2, "dropped_links": dropped.astype(jnp.float32) / 2,
                   **comm(**ledger)}
        return {**state, "round": state["round"] + 1, "clients": clients}, metrics


@dataclasses.dataclass(frozen=True)
class SPARK(NTKDFL):
    """SPARK (our reconstruction; see the module docstring): NTK-DFL with projected Jacobians,
    an annealed soft-label regulariser and Nesterov momentum across rounds."""

    name: ClassVar[str] = "spark"
    momentum: float = 0.5
    soft_weight: float = 0.3
    project: bool = True
