"""PACFL: one-shot clustering by principal angles between client data subspaces.

Vahidian et al., "Efficient Distribution Similarity Identification in Clustered Federated
Learning via Principal Angles Between Client Data Subspaces" (AAAI 2023). Before training,
every client sends the server a small basis of its data: the top-``p`` left singular vectors of
its data matrix ``D = [x_1 ... x_n]`` (features x samples). The server measures how far apart
the clients' subspaces are, clusters the clients hierarchically with a distance threshold (the
number of clusters is never given), and runs FedAvg inside each cluster.

Bases (option ``basis``):
  ``"per_class"`` (default): one basis per class the client holds, from that class's samples
    (REFERENCES.md's reading; the authors' code does this for labelled data). Labels make a
    label permutation between groups visible, and clients with different label sets far apart.
  ``"all"``: one basis from all the client's samples (unsupervised: inputs only, like RND).
Data are used as they are (no centring), as in the paper.

Proximity ``A[i, j]`` in degrees (option ``proximity``):
  ``"smallest_angle"`` (default): the smallest principal angle between the two subspaces,
    ``arccos sigma_1(U_i^T U_j)`` (the paper's measure).
  ``"sum_angles"``: the sum of the ``min(rank_i, rank_j)`` principal angles (the paper's
    alternative); it grows with ``p``.
  With per-class bases both compare the two clients' subspaces *of the same class* and average
  over the classes either client holds; a class only one of them holds counts as the largest
  angle (90 degrees per angle). (Principal angles between the spans of all classes' vectors
  together say little: ``L * p`` directions nearly fill a small feature space.)
  ``"elementwise"``: the authors' code: the smallest angle between any basis vector of client
    i and any of client j, classes ignored, ``min arccos |U_i^T U_j|``. We take the absolute
    value because a singular vector's sign is arbitrary (the authors' code inherits LAPACK's).

Clusters: agglomerative clustering of ``A`` (``linkage``: ``"complete"``, default, or
``"average"``), cut at ``threshold`` degrees (``scipy.cluster.hierarchy.fcluster``, distance
criterion: clusters merge while their linkage distance is at most the threshold). See the
docs/methods/pacfl.md for the default threshold and the measurements behind it.

The bases are computed for all clients in one jitted program mapped over clients (padded rows
masked to zero; ``max_samples`` caps the samples per client), the proximity matrix blockwise
in one jitted program, the clustering on the host in :meth:`PACFL.init`. Ledger:
``up/subspace`` (each client's basis vectors, ``d`` floats each) in the first round;
``up/model``, ``down/model`` every round for participating clients.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from fedrnd.algorithms._clusters import fixed_cluster_round
from fedrnd.algorithms.base import Algorithm, Artifact, Metrics, Report, State, option
from fedrnd.data.federated import FederatedData
from fedrnd.engine import (
    ClientHParams,
    ClientMapper,
    comm,
    grow_slots,
)
from fedrnd.engine.multihost import to_host

BASES = ("per_class", "all")
PROXIMITIES = ("sum_angles", "smallest_angle", "elementwise")
LINKAGES = ("complete", "average")
OVERSAMPLE = 8
"""Extra directions in the refinement of the top singular vectors (see :func:`_top_vectors`)."""
DEFAULT_THRESHOLD = 20.0
"""Degrees, for the default smallest principal angle (see docs/methods/pacfl.md)."""


# ------------------------------------------------------------------------------------------
# Subspaces (per client, jitted and mapped over clients)
def _top_vectors(m: jax.Array, p: int) -> tuple[jax.Array, jax.Array]:
    """Top-``p`` right singular vectors of ``m: [..., n, d]`` (the left singular vectors of
    ``m^T``, the features x samples matrix) and which of them are real: ``[..., p, d]``,
    ``[..., p]``. Fewer than ``p`` real directions (few samples) leave masked zero rows.

    Computed from the eigenvectors of the smaller Gram matrix (``m m^T`` or ``m^T m``), on a
    CPU about 20x faster than an SVD of ``m``, then refined in ``m``'s own space.
    """
    n, d = m.shape[-2:]
    mt = jnp.swapaxes(m, -1, -2)
    k = min(p, n, d)
    kk = min(p + OVERSAMPLE, n, d)
    if n < d:
        w, a = jnp.linalg.eigh(m @ mt)  # ascending
        w, a = w[..., ::-1][..., :kk], a[..., ::-1][..., :kk]
        v = mt @ a  # [..., d, kk]: columns s_i * v_i
    else:
        w, vecs = jnp.linalg.eigh(mt @ m)
        w, v = w[..., ::-1][..., :kk], vecs[..., ::-1][..., :kk]
    # Numerical rank on the eigenvalues (squared singular values) of the Gram matrix.
    w = w[..., :k]
    top = jnp.max(w, axis=-1, keepdims=True)
    ok = w > jnp.maximum(top * max(n, d) * jnp.finfo(w.dtype).eps, jnp.finfo(w.dtype).tiny)
    # The Gram matrix squares the condition number; one block power step on a few extra
    # directions and a Rayleigh-Ritz SVD of the small ``n x kk`` projection in ``m``'s own
    # space win the lost float32 digits back (an SVD of ``m`` itself is the slow part).
    q, _ = jnp.linalg.qr(mt @ (m @ v))  # [..., d, kk]
    _, _, wt = jnp.linalg.svd(m @ q, full_matrices=False)  # [..., kk, kk]
    v = jnp.where(ok[..., None], (wt @ jnp.swapaxes(q, -1, -2))[..., :k, :], 0.0)
    if k < p:
        v = jnp.pad(v, [(0, 0)] * (v.ndim - 2) + [(0, p - k), (0, 0)])
        ok = jnp.pad(ok, [(0, 0)] * (ok.ndim - 1) + [(0, p - k)])
    return v, ok


def client_basis(x: jax.Array, y: jax.Array, count: jax.Array, *, p: int, num_classes: int,
                 basis: str, class_cap: int | None = None) -> tuple[jax.Array, jax.Array]:
    """One client's bases: for each class (``"per_class"``) or for all samples (``"all"``).

    Args:
      x: ``[N, d]`` the client's (padded) samples; y: ``[N]`` labels; count: valid rows.
      class_cap: static bound on the client's samples of any one class (default ``N``): each
        class's data matrix is gathered into ``class_cap`` rows instead of masking all ``N``.
    Returns:
      ``(vectors [G, p, d], valid [G, p])``, ``G = num_classes`` or 1: orthonormal rows, the
      top-``p`` left singular vectors of each data matrix; rows past its rank (few or no
      samples of a class) are zero and invalid.
    """
    n = x.shape[0]
    valid = jnp.arange(n) < count
    if basis == "all":
        return _top_vectors((x * valid[:, None])[None], p)
    cap = n if class_cap is None else min(int(class_cap), n)
    mine = valid[None, :] & (y[None, :] == jnp.arange(num_classes)[:, None])  # [L, N]
    # Each class's own rows first (in order), the rest after: take the first ``cap``.
    order = jnp.argsort(jnp.where(mine, 0, 1) * n + jnp.arange(n), axis=1)[:, :cap]
    keep = jnp.take_along_axis(mine, order, axis=1)
    return _top_vectors(x[order] * keep[..., None], p)  # [L, cap, d]


def subspaces(data: FederatedData, *, p: int, basis: str, max_samples: int | None = None,
              mapper: ClientMapper | None = None) -> tuple[jax.Array, jax.Array]:
    """Every client's bases ``(vectors [C, G, p, d], valid [C, G, p])`` (see
    :func:`client_basis`), mapped over clients in one jitted program. ``max_samples``: use
    only each client's first ``max_samples`` training samples (``None``: all)."""
    if basis not in BASES:
        raise ValueError(f"pacfl basis must be one of {BASES}, got {basis!r}")
    n = data.max_train if max_samples is None else min(int(max_samples), data.max_train)
    idx = data.train_idx[:, :n]
    count = jnp.minimum(data.train_count, n)
    cap = None
    if basis == "per_class":
        # The largest class of any client bounds the per-class matrices (a static shape).
        y = np.asarray(data.y)[np.asarray(idx)]
        y = np.where(np.arange(n)[None, :] < np.asarray(count)[:, None], y, data.num_classes)
        per = np.stack([np.bincount(row, minlength=data.num_classes + 1) for row in y])
        cap = max(1, int(per[:, :data.num_classes].max()))
    fn = _subspaces_fn(mapper or ClientMapper(), p, basis, data.num_classes, n, cap)
    return fn(idx, count, data.x, data.y)


@functools.lru_cache(maxsize=16)
def _subspaces_fn(mapper: ClientMapper, p: int, basis: str, num_classes: int, n: int,
                  cap: int | None):
    def one(client, shared):
        x_pool, y_pool = shared
        idx = client["idx"]
        x = x_pool[idx].reshape(n, -1).astype(jnp.float32)
        return client_basis(x, y_pool[idx], client["count"], p=p, num_classes=num_classes,
                            basis=basis, class_cap=cap)

    @jax.jit
    def run(idx, count, x, y):
        return mapper.map(one, {"idx": idx, "count": count}, (x, y))

    return run


# ------------------------------------------------------------------------------------------
# Proximity (all pairs, blockwise, jitted)
def _pair_angles(vi, oi, v, o, proximity: str) -> jax.Array:
    """Proximity in degrees of one client ``(vi [G, p, d], oi [G, p])`` to all clients
    ``(v [C, G, p, d], o [C, G, p])``."""
    if proximity == "elementwise":
        # Any vector of client i against any vector of client j, classes ignored.
        m = jnp.einsum("gpd,chqd->cgphq", vi, v)
        both = oi[None, :, :, None, None] & o[:, None, None, :, :]
        cos = jnp.max(jnp.where(both, jnp.abs(m), 0.0), axis=(1, 2, 3, 4))
        return jnp.degrees(jnp.arccos(jnp.clip(cos, 0.0, 1.0)))
    m = jnp.einsum("gpd,cgqd->cgpq", vi, v)  # the same class's subspaces; invalid rows zero
    sv = jnp.linalg.svd(m, compute_uv=False)  # [C, G, p] descending: cosines of the angles
    angles = jnp.degrees(jnp.arccos(jnp.clip(sv, 0.0, 1.0)))
    p = vi.shape[1]
    if proximity == "smallest_angle":
        per, worst = angles[..., 0], 90.0
    else:
        rank = jnp.minimum(jnp.sum(oi, -1)[None], jnp.sum(o, -1))  # [C, G]
        per = jnp.sum(jnp.where(jnp.arange(p) < rank[..., None], angles, 0.0), -1)
        worst = 90.0 * p
    held_i, held_j = jnp.any(oi, -1)[None], jnp.any(o, -1)  # [1, G], [C, G]
    # A class only one of the two holds counts as the largest possible angle.
    per = jnp.where(held_i & held_j, per, worst)
    either = held_i | held_j
    return jnp.sum(jnp.where(either, per, 0.0), -1) / jnp.maximum(jnp.sum(either, -1), 1)


@functools.partial(jax.jit, static_argnames=("proximity", "block"))
def proximity_matrix(vectors: jax.Array, valid: jax.Array, *, proximity: str = "smallest_angle",
                     block: int = 0) -> jax.Array:
    """``A [C, C]`` in degrees between every pair of clients, ``block`` rows at a time.

    ``vectors: [C, G, p, d]`` orthonormal bases per class (or one, ``G = 1``), ``valid:
    [C, G, p]``. Principal-angle measures compare the same class's subspaces and average
    over the classes either client holds; ``"elementwise"`` compares all vectors.
    ``block = 0`` picks a block so one block's products stay near 64 MiB. The result is
    symmetrised with a zero diagonal.
    """
    if proximity not in PROXIMITIES:
        raise ValueError(f"pacfl proximity must be one of {PROXIMITIES}, got {proximity!r}")
    c, g, p, _ = vectors.shape
    per_row = c * (g * p) ** 2 if proximity == "elementwise" else c * g * p * p
    b = block or max(1, min(c, (1 << 24) // max(1, per_row)))
    pad = (-c) % b
    vp = jnp.pad(vectors, [(0, pad)] + [(0, 0)] * 3)
    op = jnp.pad(valid, [(0, pad), (0, 0), (0, 0)])
    rows = (vp.reshape(-1, b, *vectors.shape[1:]), op.reshape(-1, b, *valid.shape[1:]))
    out = jax.lax.map(lambda blk: jax.vmap(
        lambda vi, oi: _pair_angles(vi, oi, vectors, valid, proximity))(*blk), rows)
    a = out.reshape(-1, c)[:c]
    a = (a + a.T) / 2
    return jnp.where(jnp.eye(c, dtype=bool), 0.0, a)


# ------------------------------------------------------------------------------------------
# Hierarchical clustering (host)
def cluster_clients(a: np.ndarray, threshold: float, linkage: str = "complete") -> np.ndarray:
    """Agglomerative clustering of the proximity ``a [C, C]`` cut at ``threshold``.

    Returns ``[C]`` cluster ids ``0 .. K-1``, numbered in order of each cluster's first client.
    """
    from scipy.cluster.hierarchy import fcluster
    from scipy.cluster.hierarchy import linkage as hlinkage
    from scipy.spatial.distance import squareform

    if linkage not in LINKAGES:
        raise ValueError(f"pacfl linkage must be one of {LINKAGES}, got {linkage!r}")
    a = np.asarray(a, np.float64)
    c = a.shape[0]
    if c == 1:
        return np.zeros(1, np.int64)
    d = np.maximum((a + a.T) / 2, 0.0)
    np.fill_diagonal(d, 0.0)
    z = hlinkage(squareform(d, checks=False), method=linkage)
    raw = fcluster(z, t=float(threshold), criterion="distance")
    _, first = np.unique(raw, return_index=True)
    order = np.argsort(np.argsort(first))  # rank of each raw label by first appearance
    return order[np.searchsorted(np.unique(raw), raw)].astype(np.int64)


@dataclasses.dataclass(frozen=True)
class Clustering:
    """What PACFL's one-shot step found (host arrays)."""

    cluster_id: np.ndarray  # [C]
    num_clusters: int
    proximity: np.ndarray  # [C, C] degrees
    bytes_up: np.ndarray  # [C] basis bytes each client sent


# ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PACFL(Algorithm):
    """PACFL (Vahidian et al. 2023): one-shot subspace clustering, then FedAvg per cluster."""

    name: ClassVar[str] = "pacfl"
    clusters_clients: ClassVar[bool] = True
    p: int = option(3, low=1, doc="Singular vectors per basis (the paper's 3).")
    basis: str = option("per_class", choices=BASES,
                        doc="``per_class`` or ``all`` (unsupervised).")
    proximity: str = option("smallest_angle", choices=PROXIMITIES,
                            doc="``smallest_angle``, ``sum_angles`` or ``elementwise``.")
    linkage: str = option("complete", choices=LINKAGES, doc="``complete`` or ``average``.")
    threshold: float = option(DEFAULT_THRESHOLD, low=0, finite=True,
                              doc="The distance threshold in degrees (20 for "
                                  "``smallest_angle``).")
    max_samples: int | None = option(None, low=1, doc="Use at most this many training samples "
                                                      "per client (unset: all).")
    max_slots: int = option(4096, low=1, doc="Hard cap on cluster slots.")
    keep_proximity: bool | None = option(
        None, doc="Keep the proximity matrix in the state (one row per client) for the report "
                  "(unset: up to 2048 clients).")

    # ---------------------------------------------------------------------------------------
    def cluster(self, data: FederatedData) -> Clustering:
        """The one-shot step: bases (jitted, mapped over clients), proximity, clustering."""
        self.validate(data)
        vectors, valid = subspaces(data, p=self.p, basis=self.basis,
                                   max_samples=self.max_samples, mapper=self.engine.mapper)
        # to_host: on a mesh over several processes the rows are spread over the hosts.
        a = to_host(proximity_matrix(vectors, valid, proximity=self.proximity))
        ids = cluster_clients(a, self.threshold, self.linkage)
        # Each client sends its valid basis vectors, d floats each.
        sent = to_host(jnp.sum(valid, axis=(1, 2)), np.float64)
        nbytes = sent * vectors.shape[-1] * np.dtype(vectors.dtype).itemsize
        return Clustering(ids, int(ids.max()) + 1, a, nbytes)

    def init(self, key: jax.Array, data: FederatedData, hp: ClientHParams) -> State:
        found = self.cluster(data)
        k = grow_slots(found.num_clusters, 1, self.max_slots)
        return self._initial_state(key, hp, found.cluster_id, found.num_clusters,
                                   found.bytes_up, found.proximity
                                   if self._keeps(data.num_clients) else None, k)

    def init_template(self, key: jax.Array, data: FederatedData, hp: ClientHParams) -> State:
        """``init``'s structure without the clustering (one slot; a resumed run restores the
        checkpoint's shapes)."""
        c = data.num_clients
        sds = jax.ShapeDtypeStruct
        prox = sds((c, c), jnp.float32) if self._keeps(c) else None
        return jax.eval_shape(
            lambda k, h, i, n, b, a: self._initial_state(k, h, i, n, b, a, 1), key, hp,
            sds((c,), jnp.int32), sds((), jnp.int32), sds((c,), jnp.float32), prox)

    def _keeps(self, num_clients: int) -> bool:
        return num_clients <= 2048 if self.keep_proximity is None else bool(self.keep_proximity)

    def _initial_state(self, key, hp, cluster_id, num_clusters, bytes_up, proximity,
                       k: int) -> State:
        # Every cluster starts from the same initial weights as the other methods.
        params = self.engine.model.init(key)
        slots = jax.tree.map(lambda p: jnp.broadcast_to(p, (k, *p.shape)).copy(), params)
        state = {"round": jnp.zeros((), jnp.int32), "slots": slots,
                 "num_clusters": jnp.asarray(num_clusters, jnp.int32),
                 "clients": {"hp": hp, "cluster_id": jnp.asarray(cluster_id, jnp.int32),
                             "pending_up": jnp.asarray(bytes_up, jnp.float32)}}
        if proximity is not None:
            state["clients"]["proximity"] = jnp.asarray(proximity, jnp.float32)
        return state

    def round(self, state: State, data: FederatedData, key: jax.Array) -> tuple[State, Metrics]:
        slots, metrics, _ = fixed_cluster_round(self, state, data, key)
        cl = state["clients"]
        metrics = {**metrics, "num_clusters": state["num_clusters"].astype(jnp.float32),
                   **comm(up_subspace=cl["pending_up"])}
        state = {**state, "round": state["round"] + 1, "slots": slots,
                 "clients": {**cl, "pending_up": jnp.zeros_like(cl["pending_up"])}}
        return state, metrics

    def models(self, state: State):
        return state["slots"], state["clients"]["cluster_id"]

    def report(self, state: State, data: FederatedData) -> Report:
        """The proximity matrix (``proximity``: matrix, clusters, true groups, threshold),
        drawn as a heat map, when the state keeps it."""
        cl = state["clients"]
        k = int(state["num_clusters"])
        if "proximity" not in cl:
            return Report()
        return Report(artifacts={"proximity": Artifact(
            "matrix", {"proximity": np.asarray(cl["proximity"]),
                       "cluster": np.asarray(cl["cluster_id"]), "group": np.asarray(data.group),
                       "threshold": float(self.threshold)},
            {"matrix": "proximity", "title": f"PACFL {self.proximity} (deg), {k} clusters",
             "label": "degrees", "xlabel": "client j", "ylabel": "client i"})})
