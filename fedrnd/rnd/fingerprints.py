"""Two-stage discovery: cheap fingerprints pick the candidate peers each client scores.

Scoring every pair costs ``C^2`` predictor evaluations per probe: 10^8 at 10,000 clients.
Most pairs are plainly far apart, so a first stage picks, for every client, a few dozen
peers worth testing, and RND predictors are exchanged and scored only along those edges.

Fingerprint (:func:`fingerprints`): the mean and the standard deviation of the frozen
target's outputs over the client's own training inputs, ``[C, 2 * out_dim]``. Discovery
computes the target's outputs anyway (they are the predictors' regression targets), so the
fingerprint is free. It is a random-feature summary of the client's input distribution (the
first two moments of ``out_dim`` random ReLU features), the same kind of statistic as a
kernel mean embedding.

What a fingerprint reveals: ``2 * out_dim`` numbers per client, averaged over all of its
inputs. With the target's weights (public: one global seed) anyone holding the fingerprint
can test hypotheses about the client's input distribution (is it close to data set X, to a
rotated or shifted copy of it?) and, for a client with very few examples, the mean may come
close to one input's feature vector, which leaks that input's random features. It reveals
no labels. It reveals less than the predictor that plain RND discovery sends anyway (a
predictor trained on the same inputs), but it goes to the server or coordinator, not only to
candidate peers. Clients that must not send it can use the dense mode.

Candidates (:func:`candidate_edges`): the ``k`` nearest fingerprints (Euclidean, after
scaling every coordinate by its spread across clients; exact search, scikit-learn's
``NearestNeighbors``) plus ``random_peers`` random clients, made symmetric: when ``j`` is a
candidate of ``i``, ``i`` scores ``j``'s predictor and ``j`` scores ``i``'s (the test needs
both directions). The random peers give the sparse linkage evidence between groups whose
fingerprints look alike only by chance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedrnd.engine import EdgeList

__all__ = ["candidate_edges", "fingerprint_bytes", "fingerprints"]


@jax.jit
def _moments(t_pool, idx, count):
    def one(i, n):
        mask = (jnp.arange(i.shape[0]) < n).astype(t_pool.dtype)[:, None]
        f = t_pool[i]
        k = jnp.maximum(n, 1).astype(t_pool.dtype)
        mean = jnp.sum(f * mask, 0) / k
        var = jnp.sum(((f - mean) ** 2) * mask, 0) / k
        return jnp.concatenate([mean, jnp.sqrt(var)])

    return jax.lax.map(lambda a: one(*a), (idx, count), batch_size=256)


def fingerprints(t_pool: jax.Array, train_idx, train_count) -> np.ndarray:
    """``[C, 2 * out_dim]``: per client, the mean and standard deviation of the target's outputs
    ``t_pool [P, out_dim]`` over its training rows ``train_idx [C, N]`` (valid up to
    ``train_count [C]``)."""
    idx = jnp.asarray(train_idx, jnp.int32)
    cnt = jnp.asarray(train_count, jnp.int32)
    if idx.ndim != 2 or cnt.shape != (idx.shape[0],):
        raise ValueError(f"train_idx must be [C, N] and train_count [C], got {idx.shape} and "
                         f"{cnt.shape}")
    return np.asarray(_moments(jnp.asarray(t_pool), idx, cnt), np.float64)


def fingerprint_bytes(out_dim: int) -> int:
    """Bytes of one client's fingerprint (float32 mean and standard deviation)."""
    return 2 * int(out_dim) * 4


def candidate_edges(fp: np.ndarray, k: int, random_peers: int = 0, seed: int = 0) -> EdgeList:
    """Directed scoring edges ``src -> dst`` (``dst`` scores ``src``'s predictor): every client's
    ``k`` nearest fingerprints and ``random_peers`` random peers, both directions, no repeats,
    no self-loops. Returns an :class:`~fedrnd.engine.EdgeList` sorted by ``(dst, src)``."""
    from sklearn.neighbors import NearestNeighbors

    fp = np.asarray(fp, np.float64)
    c = fp.shape[0]
    if fp.ndim != 2:
        raise ValueError(f"fingerprints must be [C, D], got {fp.shape}")
    if not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"candidates k must be an integer >= 1, got {k!r}")
    if c < 2:
        z = np.zeros(0, np.int32)
        return EdgeList(jnp.asarray(z), jnp.asarray(z), jnp.zeros(0, jnp.float32))
    scale = fp.std(axis=0)
    x = (fp - fp.mean(0)) / np.where(scale > 0, scale, 1.0)
    kk = min(int(k), c - 1)
    nn = NearestNeighbors(n_neighbors=kk + 1, algorithm="brute").fit(x)
    _, nbr = nn.kneighbors(x)
    a = np.repeat(np.arange(c), kk + 1)
    b = nbr.reshape(-1)
    if random_peers:
        rng = np.random.default_rng(seed)
        r = min(int(random_peers), c - 1)
        off = rng.integers(1, c, size=(c, r))  # never the client itself
        a = np.concatenate([a, np.repeat(np.arange(c), r)])
        b = np.concatenate([b, ((np.arange(c)[:, None] + off) % c).reshape(-1)])
    keep = a != b
    a, b = a[keep], b[keep]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    pairs = np.unique(lo.astype(np.int64) * c + hi)
    lo, hi = pairs // c, pairs % c
    src = np.concatenate([lo, hi])
    dst = np.concatenate([hi, lo])
    order = np.lexsort((src, dst))
    src, dst = src[order].astype(np.int32), dst[order].astype(np.int32)
    return EdgeList(jnp.asarray(src), jnp.asarray(dst), jnp.ones(len(src), jnp.float32))
