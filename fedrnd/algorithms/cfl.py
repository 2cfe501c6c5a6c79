"""CFL: clustered FL by recursive bipartitioning of clients (Sattler, Müller, Samek 2020).

"Clustered Federated Learning: Model-Agnostic Distributed Multitask Optimization Under Privacy
Constraints" (IEEE TNNLS 2020). Every cluster runs FedAvg. When a cluster's federation has
reached a stationary point of its joint objective (the mean of its clients' updates is small)
while some clients are still far from a stationary point of their own objective (a client
update is large), the clients' objectives disagree: the cluster splits in two by complete
linkage on the cosine similarity of the clients' updates. Splits recurse over rounds, so
clusters appear over time and their number is never given.

Per round (jitted, all clusters at once), each client ``i`` of cluster ``c`` trains from the
cluster model ``w_c`` and the server receives ``dW_i = w_i - w_c``; the cluster model moves by
the sample-weighted mean update (FedAvg). The round keeps what the host needs for the split
test: each client's latest update ``u_i`` (``state["clients"]["update"]``, leaves
``[C, ...]``) and, per cluster slot ``[K]``, ``||mean_{i in c} u_i||`` and
``max_{i in c} ||u_i||``. With ``smoothing = b > 0`` (default 0.9), ``u_i`` is an exponential
average of the client's updates over rounds, ``u_i <- b u_i + (1 - b) dW_i``, instead of the
last one: with a few local SGD steps a single update is mostly minibatch noise, and in our
measurements complete linkage on single updates cut true groups apart in about two rounds of
three, on averaged ones never. Smoothing changes the split statistics only, never training.

Every ``check_every`` rounds, once ``min_round`` rounds have completed, :meth:`CFL.host_hook`
splits every cluster with at least three participating members for which::

    ||mean u|| < eps1 * ref   and   max ||u_i|| > eps2 * ref

into two by complete linkage on ``alpha_ij = cos(u_i, u_j)``, and (the paper's check, option
``gamma_max``) only if the largest similarity across the two sides ``alpha_cross`` satisfies
``gamma_max < sqrt((1 - alpha_cross) / 2)``. Both children start from the cluster's model
(the paper's algorithm).

Thresholds. The published ``eps1 = 0.4``, ``eps2 = 1.6`` are absolute parameter-space norms
that hold for the authors' models and learning rates only: an update's norm scales with the
learning rate, the number of local steps and the parameter count. The default
``thresholds = "relative"`` measures both norms in units of ``ref``, the mean client-update
norm of the first round (all clients start from the same initial model, so ``ref`` is the scale
of an update under this model, optimizer and local budget). ``thresholds = "absolute"`` uses
``ref = 1`` (the paper's reading; defaults 0.4 / 1.6). docs/methods/cfl.md records the measurements
behind the relative defaults.

Partial participation: the criterion uses the clients that took part in the latest round; a
split partitions those, and each absent member follows the side whose mean update is most
similar to its own latest one (the larger side, by sample count, if it has none yet).

Ledger: ``up/model`` and ``down/model``, one model each way per participating client (the
update is model-sized). Splits are server-side and cost no communication.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from fedrnd.algorithms.base import Algorithm, Metrics, Report, State, option
from fedrnd.data.federated import FederatedData
from fedrnd.engine import (
    ClientHParams,
    broadcast,
    comm,
    grow_slots,
    keep_nonempty,
    per_client,
    segment_weighted_mean,
    tree_bytes,
)

THRESHOLD_MODES = ("relative", "absolute")
DEFAULT_EPS = {"relative": (0.35, 0.75), "absolute": (0.4, 1.6)}
"""``(eps1, eps2)`` per threshold mode (relative: units of the first round's mean update norm)."""

MIN_SPLIT_SIZE = 3
"""A cluster splits only with at least this many participating members (the authors' code)."""


def _sq_norms(tree) -> jax.Array:
    """Squared L2 norm of each row of a pytree with leaves ``[C, ...]`` -> ``[C]``."""
    return sum(jnp.sum(jnp.square(x.reshape(x.shape[0], -1).astype(jnp.float32)), axis=1)
               for x in jax.tree.leaves(tree))


def _flat(tree, rows: np.ndarray) -> np.ndarray:
    """Rows of a per-client pytree as one float64 matrix ``[len(rows), d]`` (host side)."""
    return np.concatenate([np.asarray(x)[rows].reshape(len(rows), -1).astype(np.float64)
                           for x in jax.tree.leaves(tree)], axis=1)


def cosine_similarity(updates: np.ndarray) -> np.ndarray:
    """``alpha_ij = <dW_i, dW_j> / (||dW_i|| ||dW_j||)`` for rows of ``updates: [n, d]``."""
    u = np.asarray(updates, np.float64)
    norm = np.linalg.norm(u, axis=1)
    u = u / np.where(norm > 0, norm, 1.0)[:, None]
    return np.clip(u @ u.T, -1.0, 1.0)


def bipartition(similarity: np.ndarray) -> np.ndarray:
    """Split ``n >= 2`` clients in two by complete linkage on the distance ``1 - alpha``.

    Equivalent to the authors' ``AgglomerativeClustering(linkage="complete")`` on ``-alpha``
    (complete linkage depends only on the order of distances). Returns ``[n]`` labels in
    ``{0, 1}``, label 0 for the side that holds client 0.
    """
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    s = np.asarray(similarity, np.float64)
    n = s.shape[0]
    if n < 2:
        raise ValueError(f"bipartition needs at least 2 clients, got {n}")
    dist = np.clip(1.0 - (s + s.T) / 2.0, 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    labels = fcluster(linkage(squareform(dist, checks=False), method="complete"), t=2,
                      criterion="maxclust") - 1
    return (labels != labels[0]).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class CFL(Algorithm):
    """Clustered FL (Sattler et al. 2020): FedAvg per cluster, recursive bipartitions."""

    name: ClassVar[str] = "cfl"
    clusters_clients: ClassVar[bool] = True
    thresholds: str = option(
        "relative", choices=THRESHOLD_MODES,
        doc="``relative`` (norms in units of the first round's mean client update norm) or "
            "``absolute`` (raw parameter-space norms, as published).")
    eps1: float | None = option(
        None, low=0, low_open=True, finite=True,
        doc="Split only when the norm of the cluster's mean update is below ``eps1`` (unset: "
            "0.35 relative, 0.4 absolute).")
    eps2: float | None = option(
        None, low=0, finite=True,
        doc="... and the largest client update norm is above ``eps2`` (unset: 0.75 relative, "
            "1.6 absolute).")
    min_round: int = option(20, low=0, doc="No split before this many rounds have completed "
                                           "(the paper's 20).")
    check_every: int = option(1, low=1, doc="Test the criterion every this many rounds (host "
                                            "hook period).")
    gamma_max: float | None = option(
        0.6, low=0, high=1,
        doc="The paper's check: split only when ``gamma_max < sqrt((1 - alpha_cross) / 2)``, "
            "``alpha_cross`` the largest cosine similarity across the two sides (0.6: "
            "``alpha_cross < 0.28``); unset or 0: no check (the authors' code).")
    smoothing: float = option(0.9, low=0, high=1, high_open=True,
                              doc="Average each client's updates over rounds with this factor "
                                  "for the split statistics (0: the latest update only, as "
                                  "published).")
    max_slots: int = option(4096, low=1, doc="Hard cap on cluster slots.")

    @property
    def hook_every(self) -> int | None:  # type: ignore[override]
        return self.check_every

    @property
    def eps(self) -> tuple[float, float]:
        """``(eps1, eps2)`` with the mode's defaults filled in."""
        d1, d2 = DEFAULT_EPS[self.thresholds]
        return (d1 if self.eps1 is None else float(self.eps1),
                d2 if self.eps2 is None else float(self.eps2))

    # ---------------------------------------------------------------------------------------
    def init(self, key: jax.Array, data: FederatedData, hp: ClientHParams) -> State:
        params = self.engine.model.init(key)
        c = data.num_clients
        slots = jax.tree.map(lambda p: p[None], params)
        return {"round": jnp.zeros((), jnp.int32), "slots": slots,
                "num_clusters": jnp.ones((), jnp.int32),
                "ref_norm": jnp.zeros((), jnp.float32),
                # Per slot: the latest round's split statistics and the round it was created.
                "mean_norm": jnp.full((1,), jnp.inf, jnp.float32),
                "max_norm": jnp.zeros((1,), jnp.float32),
                "born": jnp.zeros((1,), jnp.int32),
                "clients": {"hp": hp, "cluster_id": jnp.zeros((c,), jnp.int32),
                            "update": jax.tree.map(
                                lambda p: jnp.zeros((c, *p.shape), p.dtype), params),
                            "has_update": jnp.zeros((c,), jnp.bool_),
                            "fresh": jnp.zeros((c,), jnp.bool_)}}

    def round(self, state: State, data: FederatedData, key: jax.Array) -> tuple[State, Metrics]:
        k_cohort, k_train = jax.random.split(key)
        ids, part = self.cohort(k_cohort, data.num_clients)
        cl = state["clients"]
        slots = state["slots"]
        num_slots = jax.tree.leaves(slots)[0].shape[0]
        cid = cl["cluster_id"] if ids is None else cl["cluster_id"][ids]
        counts = (data.train_count if ids is None else data.train_count[ids]).astype(jnp.float32)
        start = broadcast(slots, cid)
        p, _, m = self.engine.train(None, data, cl["hp"], k_train, state["round"], ids=ids,
                                    client_params=start)
        dw = jax.tree.map(jnp.subtract, p, start)
        mean_dw, mass = segment_weighted_mean(dw, counts, cid, num_slots)
        slots = keep_nonempty(jax.tree.map(jnp.add, slots, mean_dw), slots, mass)
        # The scale of an update under this model, optimizer and local budget.
        ref = jnp.where(state["round"] == 0, jnp.mean(jnp.sqrt(_sq_norms(dw))),
                        state["ref_norm"])
        had = cl["has_update"] if ids is None else cl["has_update"][ids]
        old = cl["update"] if ids is None else jax.tree.map(lambda u: u[ids], cl["update"])
        b = self.smoothing
        if b:
            def smooth(o, d):
                h = had.reshape((-1,) + (1,) * (d.ndim - 1))
                return jnp.where(h, b * o + (1 - b) * d, d)
            u = jax.tree.map(smooth, old, dw)
            mean_u, _ = segment_weighted_mean(u, counts, cid, num_slots)
        else:
            u, mean_u = dw, mean_dw
        norm = jnp.sqrt(_sq_norms(u))
        mean_norm = jnp.where(mass > 0, jnp.sqrt(_sq_norms(mean_u)), jnp.inf)
        max_norm = jnp.maximum(jax.ops.segment_max(norm, cid, num_segments=num_slots), 0.0)
        if ids is None:
            update, fresh = u, jnp.ones_like(cl["fresh"])
        else:
            update = jax.tree.map(lambda a, d: a.at[ids].set(d), cl["update"], u)
            fresh = jnp.zeros_like(cl["fresh"]).at[ids].set(True)
        nbytes = tree_bytes(jax.tree.map(lambda s: s[0], state["slots"]))
        active = mass > 0
        metrics = {"train_loss": jnp.sum(m["loss"] * counts) / jnp.sum(counts),
                   "local_steps": jnp.sum(m["steps"]).astype(jnp.float32),
                   "num_clusters": state["num_clusters"].astype(jnp.float32),
                   "mean_update_norm": jnp.max(jnp.where(active, mean_norm, 0.0)),
                   "max_update_norm": jnp.max(norm),
                   "ref_norm": ref,
                   **comm(up_model=per_client(nbytes, part), down_model=per_client(nbytes, part))}
        state = {**state, "round": state["round"] + 1, "slots": slots, "ref_norm": ref,
                 "mean_norm": mean_norm, "max_norm": max_norm,
                 "clients": {**cl, "update": update, "fresh": fresh,
                             "has_update": cl["has_update"] | fresh}}
        return state, metrics

    def models(self, state: State):
        return state["slots"], state["clients"]["cluster_id"]

    # ---------------------------------------------------------------------------------------
    def split_candidates(self, state: State) -> list[int]:
        """Clusters whose latest statistics meet the split criterion (host side)."""
        eps1, eps2 = self.eps
        ref = 1.0 if self.thresholds == "absolute" else float(state["ref_norm"])
        k = int(state["num_clusters"])
        mean_norm = np.asarray(state["mean_norm"])[:k]
        max_norm = np.asarray(state["max_norm"])[:k]
        cid = np.asarray(state["clients"]["cluster_id"])
        fresh = np.asarray(state["clients"]["fresh"])
        size = np.bincount(cid[fresh], minlength=k)[:k]
        ok = (mean_norm < eps1 * ref) & (max_norm > eps2 * ref) & (size >= MIN_SPLIT_SIZE)
        return [int(c) for c in np.flatnonzero(ok)]

    def host_hook(self, state: State, data: FederatedData, round_idx: int) -> State:
        """Split every cluster that meets the criterion (from round ``min_round`` on)."""
        if round_idx < self.min_round:
            return state
        candidates = self.split_candidates(state)
        if not candidates:
            return state
        return self.split(state, candidates, np.asarray(data.train_count), round_idx)

    def split(self, state: State, clusters: list[int], train_count: np.ndarray,
              round_idx: int) -> State:
        """Bipartition ``clusters`` by complete linkage on their clients' latest updates.

        The side holding the cluster's lowest-numbered participant keeps the slot; the other
        side gets the next free slot (slots grow by :func:`grow_slots`). Both sides start from
        the cluster's current model (the paper's algorithm).
        """
        cl = state["clients"]
        cid = np.asarray(cl["cluster_id"]).copy()
        fresh = np.asarray(cl["fresh"])
        has = np.asarray(cl["has_update"])
        w = np.asarray(train_count, np.float64)
        k = int(state["num_clusters"])
        moved = []  # (old slot, new slot)
        for c in clusters:
            members = np.flatnonzero(cid == c)
            part = members[fresh[members]]
            u = _flat(cl["update"], part)
            alpha = cosine_similarity(u)
            side = bipartition(alpha)
            if self.gamma_max:
                cross = alpha[np.ix_(side == 0, side == 1)].max()
                if not self.gamma_max < np.sqrt((1.0 - cross) / 2.0):
                    continue
            new_side = np.zeros(len(members), np.int64)
            new_side[np.searchsorted(members, part)] = side
            # Absent this round: follow the side whose mean update is most similar to the
            # client's latest one, or the larger side without any update yet.
            rest = members[~fresh[members]]
            big = int(w[part[side == 1]].sum() > w[part[side == 0]].sum())
            new_side[np.searchsorted(members, rest)] = big
            seen = rest[has[rest]]
            if len(seen):
                means = np.stack([np.average(u[side == s], axis=0, weights=w[part[side == s]])
                                  for s in (0, 1)])
                sims = cosine_similarity(np.concatenate([_flat(cl["update"], seen), means]))
                new_side[np.searchsorted(members, seen)] = np.argmax(sims[:len(seen), -2:], 1)
            cid[members[new_side == 1]] = k
            moved.append((c, k))
            k += 1
        if not moved:
            return state
        num_slots = jax.tree.leaves(state["slots"])[0].shape[0]
        grown = grow_slots(k, num_slots, self.max_slots)
        src = np.arange(grown)
        src[num_slots:] = 0
        for c, new in moved:
            src[new] = c
        born = np.zeros(grown, np.int32)
        born[:num_slots] = np.asarray(state["born"])
        mean_norm = np.full(grown, np.inf, np.float32)
        max_norm = np.zeros(grown, np.float32)
        mean_norm[:num_slots] = np.asarray(state["mean_norm"])
        max_norm[:num_slots] = np.asarray(state["max_norm"])
        for c, new in moved:
            born[new] = round_idx
            # Fresh statistics come with the next round; until then the children do not split.
            mean_norm[[c, new]] = np.inf
            max_norm[[c, new]] = 0.0
        slots = jax.tree.map(lambda s: s[jnp.asarray(src)], state["slots"])
        return {**state, "slots": slots, "num_clusters": jnp.asarray(k, jnp.int32),
                "born": jnp.asarray(born), "mean_norm": jnp.asarray(mean_norm),
                "max_norm": jnp.asarray(max_norm),
                "clients": {**cl, "cluster_id": jnp.asarray(cid, jnp.int32)}}

    def report(self, state: State, data: FederatedData) -> Report:
        """The update-norm scale and the rounds of the first and last split."""
        k = int(state["num_clusters"])
        born = np.asarray(state["born"])[:k]
        splits = sorted(int(b) for b in born if b > 0)
        return Report({"ref_norm": float(state["ref_norm"]),
                       "first_split_round": float(splits[0]) if splits else float("nan"),
                       "last_split_round": float(splits[-1]) if splits else float("nan")})
