"""DisUE: distilling a universal expert from clustered FL (Leng et al., IJCAI 2025,
arXiv 2506.20285; no code published).

One round:

1. every (cohort) client starts from the *universal expert* and trains locally;
2. clients are grouped (``grouping``) and each group's models are averaged (sample-weighted)
   into a *cluster expert*, held in the engine's cluster slots (leaves ``[K, ...]``);
3. the server distils a new universal expert from all cluster experts (``distill``) and
   broadcasts it as the next round's starting point. Each client keeps its cluster expert for
   personalised inference (:meth:`DisUE.models`).

Grouping (``grouping``; default ``"similarity"``, the paper's):

- ``"similarity"``: similarity of the uploaded models, as the paper clusters: spherical
  k-means with ``K`` clusters on the clients' updates ``w_c - w_universal`` (cosine
  similarity, Gram-matrix form, ``similarity_iters`` Lloyd steps from a farthest-point start),
  recomputed every round. The updates are the uploaded post-training models less the model
  the server broadcast, so the server needs nothing beyond the uploads it aggregates anyway:
  in the clear this grouping sends no extra bytes (the paper's *secure* similarity protocol,
  which would, is not simulated; docs/methods/disue.md gives its cost model).
- ``"ifca"``: IFCA's assignment (:func:`fedrnd.engine.cluster_losses`): each client
  scores the ``K`` cluster experts of the previous round on its training data and joins the one
  with the lowest loss (round 0: ``K`` random initialisations, slot 0 the shared initial model).
- ``"rnd"``: RND federations (:func:`fedrnd.rnd.discover`), found once before round 0 on the
  host; ``K`` is the number of federations (a power-of-two slot count, :func:`grow_slots`).

Distillation (``distill``):

- ``"generator"`` (the paper's data-free distillation): a class-conditional generator
  (:mod:`fedrnd.models.generator`, kept across rounds with its Adam state) and the student
  (initialised from the previous universal expert, ``student_init="previous"``, or from the
  sample-weighted average of the cluster experts, ``"average"``) alternate in ONE ``lax.scan``
  of ``distill_steps`` iterations; each iteration is one generator step and
  ``student_steps`` student steps, on batches of ``distill_batch`` synthetic inputs for classes
  drawn uniformly among the classes some cluster holds. Generator loss::

      L_G = CE(T(x), y) - adv_weight * mean(agree * KL_tau(T(x) || S(x))) + div_weight * L_div

  ``T(x) = sum_k a[k, y] * f_k(x)`` is the teacher ensemble's logits for the requested class
  ``y`` (``a``: per-class teacher weights, below), ``S`` the student. The adversarial term
  seeks inputs where student and teachers disagree; as in DENSE (Zhang et al. 2022) it is
  taken only on samples whose argmax they still share (``agree``), which keeps it bounded.
  ``L_div = exp(-mean_{i,j} |x_i - x_j|_1 * |z_i - z_j|^2)`` (FedFTG's diversity term, means
  over features) pushes different noise to different inputs. The task models have no batch
  norm, so there is no batch-statistics term. Student loss: ``tau^2 * KL(softmax(T/tau) ||
  softmax(S/tau))`` (Hinton et al.), ``tau = temperature``.
- ``"proxy"``: the same student steps on real unlabeled inputs instead of generated ones, an
  *upper bound* that separates generator failure from distillation failure (same teachers,
  weights, temperature and student budget; only the inputs differ). The proxy set is
  ``proxy_size`` of the clients' training rows drawn once, uniformly without replacement (a
  stand-in for a public data set from the same domain; the server would not hold client data
  in practice). Training rows, not test rows: the pool holds only rows some client uses, and
  the test rows are where ``universal_acc`` and ``student_agree`` are measured. Labels are
  not used: each row is weighted by the class the mass-weighted ensemble predicts for it.
- ``"average"``: no distillation; the universal expert is the sample-weighted average of the
  cluster experts (which equals FedAvg's global model: clients all start from it).
- ``"none"``: per-cluster FedAvg without distillation: every client starts from its own
  cluster expert (groupings ``ifca``, ``rnd``: with ``ifca`` this is IFCA). The reported
  universal expert is then the average of the experts, used by no client.

Per-class teacher weights (``teacher_weights="class_mass"``, the paper's adaptive category
cluster-distillation): every participating client sends its label histogram ``h_c`` (counts
per class over its training set); a cluster's histogram is ``H[k] = sum_{c in k} h_c`` and
``a[k, y] = H[k, y] / sum_k' H[k', y]``: a cluster teaches a class in proportion to the label
mass it holds of it; every column sums to one (a class no cluster holds falls back to equal
weights over the non-empty clusters). ``"uniform"``: equal weights over non-empty clusters.

Privacy cost of the histograms: a label histogram discloses the client's exact class counts
(its label distribution and data-set size), information that plain FedAvg does not send in
the clear (it leaks there only through the model update). Label distributions can themselves
be sensitive (the share of a diagnosis at a hospital, the topics of a user's messages).
``histogram_dp_eps`` makes each client release its histogram once under epsilon-local
differential privacy (Laplace mechanism, scale ``2 / eps``: replacing one example moves two
counts by one; negative counts clipped to 0), noise drawn once so resending leaks nothing
more; ``None`` (default) sends exact counts.

Metrics per round: ``universal_acc`` (the new universal expert) and ``average_acc`` (the
sample-weighted average of this round's cluster experts, what plain averaging would give) on
the *global test set*: every client's held-out test rows pooled (multiplicities kept; their
label mix follows the clients' training labels, i.e. the data set's label mix). The driver's
``test_acc`` is the personalised accuracy (each client's cluster expert on its own test rows).
Also ``distill_loss`` (mean student KL over the last iteration), ``gen_ce``, ``gen_adv``,
``gen_div`` (generator terms, last iteration) and ``clusters_used``.

Diagnostics, computed in the round (:func:`batch_diagnostics`, :func:`ensemble_agreement`):

- ``student_agree``: on the global test set, the share of rows where the new universal
  expert's argmax equals that of the teacher ensemble ``sum_k m_k f_k`` (``m``: cluster
  masses, normalised); ``ensemble_acc``: that ensemble's accuracy, what a perfect
  distillation would reach. Every ``distill`` mode.
- ``generator`` and ``proxy`` only, on one fresh batch of ``distill_batch`` inputs from the
  final generator (proxy: proxy rows), scored by the per-class ensemble ``T`` the student is
  trained on: ``gen_teacher_acc`` (share where ``argmax T(x)`` is the requested class; with
  a proxy, the requested class is the pseudo-label, so about 1 by construction),
  ``gen_coverage`` (share of the classes some cluster holds that ``argmax T`` gives to at
  least one input), ``gen_pred_entropy`` (entropy of the predicted classes, nats) and
  ``gen_diversity`` (mean RMS feature distance between inputs of the same requested class;
  0 when the generator gives one input per class). The proxy's values are the real-data
  reference for the generator's.

Heterogeneous experts (``families``; our reconstruction, the paper does not give the
mechanics): clients run models of different architectures, one *family* per entry of
``families`` (``{model = <name>, <its options>}``), assigned once before training
(:func:`assign_families`: ``family_rule = "share"``, at random in ``family_shares``, or
``"data_size"``, ranked by training-set size). The universal expert (the student) is the run's
task model. Per round and family ``f`` (a Python loop over the few families; each is one
jitted local-training call over that family's clients):

1. the family's clients train from the universal expert if the family has the task model's
   architecture (:func:`same_architecture`), else from the *family model* (the sample-weighted
   average of the family's cluster experts of the previous round: a client cannot load a
   universal expert of another architecture);
2. grouping runs within the family (``similarity`` or ``ifca``; updates of different
   architectures are not comparable) into its own ``num_clusters`` slots (the state's
   ``slots`` become a tuple, one ``[K, ...]`` pytree per family; ``cluster_id`` is global,
   family ``f``'s clusters numbered after those of the families before it);
3. the teacher weights ``a: [K_total, L]`` are computed over all families' clusters at once and
   the ensemble is ``T(x) = sum_f sum_{k in f} a[k, y] f_k(x)``
   (:func:`family_ensemble_logits`); the generator, the student, the scan and the proxy bound
   are those of a single architecture. ``student_init = "average"`` averages the experts of the
   families with the task model's architecture (and needs one).

With one family of the task model's architecture this is DisUE bit for bit. Families need
every client every round (no ``cohort_size``), ``distill`` ``generator`` or ``proxy`` and
grouping ``similarity`` or ``ifca``. The family model of a family without the task
architecture is per-family FedAvg's global model (its clients all start from it and it is
their sample-weighted average); its global test accuracy is the round metric ``family<f>_acc``
(also in ``final.json``), and ``personal_acc`` is the mean accuracy of each client's cluster
expert on its own test rows. The driver scores task models only, so with another
architecture in the families every client is evaluated (``test_acc``) with the universal
expert.

Ledger per participating client and round: ``up/model`` one model; ``up/histogram``
``num_classes`` float32 counts; ``down/model`` the start model (the universal expert, or its
cluster expert with ``"none"``); ``down/experts`` its cluster expert for personalised inference
(``ifca``: all ``K`` experts, which it scores to choose; ``similarity``: its own expert only,
the grouping itself sends nothing beyond ``up/model``); ``up/discovery`` and
``down/discovery`` (``rnd``) RND's discovery traffic in round 0. With ``families`` every model a
client sends or receives is one of its own family's architecture.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedrnd.algorithms._clusters import check_num_clusters
from fedrnd.algorithms._discovery import FederationOptions, rnd_config
from fedrnd.algorithms._options import same_option
from fedrnd.algorithms.base import Algorithm, Metrics, Report, State, option
from fedrnd.data.federated import FederatedData
from fedrnd.engine import (
    ClientHParams,
    Engine,
    cluster_losses,
    comm,
    evaluate_clients,
    grow_slots,
    keep_nonempty,
    per_client,
    segment_weighted_mean,
    slot_means,
    tree_bytes,
    weighted_mean,
)
from fedrnd.models import MODELS, Model, check_model_options, make_model
from fedrnd.models.generator import HEADS, OUTPUTS, make_generator
from fedrnd.rnd.discovery import RNDConfig, discover

GROUPINGS = ("ifca", "rnd", "similarity")
DISTILLS = ("generator", "proxy", "average", "none")
TEACHER_WEIGHTS = ("class_mass", "uniform")
STUDENT_INITS = ("previous", "average")
FAMILY_RULES = ("share", "data_size")
COUNT_BYTES = 4
"""A float32 count: one entry of a label histogram."""
DIAGNOSTIC_STREAM = 0xD1A6
"""``fold_in`` constant of the key of the diagnostic batch (apart from the training keys)."""
FAMILY_STREAM = 0xFA11
"""``fold_in`` constant of the key that assigns clients to families (``family_rule="share"``)."""


# ------------------------------------------------------------------------------------------
# Pure pieces (shared by the round and the tests)
# ------------------------------------------------------------------------------------------

def label_histograms(data: FederatedData) -> jax.Array:
    """``[C, num_classes]`` label counts of every client's training rows (padding masked)."""
    y = data.y[data.train_idx]
    mask = jnp.arange(data.train_idx.shape[1])[None, :] < data.train_count[:, None]
    onehot = jax.nn.one_hot(y, data.num_classes, dtype=jnp.float32)
    return jnp.sum(onehot * mask[..., None], axis=1)


def teacher_weights(cluster_hist: jax.Array, cluster_mass: jax.Array,
                    mode: str = "class_mass") -> jax.Array:
    """Per-class teacher weights ``a: [K, L]`` whose every column sums to one.

    Args:
      cluster_hist: ``[K, L]`` summed label histograms of each cluster's clients.
      cluster_mass: ``[K]`` aggregation mass; clusters with mass 0 are empty (weight 0).
      mode: ``"class_mass"``: ``a[k, y] = H[k, y] / sum_k H[k, y]``; ``"uniform"``: equal
        weights over non-empty clusters. A class no cluster holds gets the uniform column.
    """
    present = (cluster_mass > 0).astype(jnp.float32)
    uniform = present / jnp.maximum(jnp.sum(present), 1.0)
    if mode == "uniform":
        return jnp.broadcast_to(uniform[:, None], cluster_hist.shape)
    h = jnp.maximum(cluster_hist, 0.0) * present[:, None]
    col = jnp.sum(h, axis=0, keepdims=True)
    return jnp.where(col > 0, h / jnp.where(col > 0, col, 1.0), uniform[:, None])


def ensemble_logits(apply, teachers, weights: jax.Array, x: jax.Array,
                    y: jax.Array) -> jax.Array:
    """``T(x)_b = sum_k weights[k, y_b] * f_k(x_b)``: ``[B, L]`` logits for classes ``y [B]``."""
    logits = jax.vmap(lambda p: apply(p, x))(teachers)  # [K, B, L]
    return jnp.einsum("kb,kbl->bl", weights[:, y], logits)


def softened_kl(t_logits: jax.Array, s_logits: jax.Array, temperature: float) -> jax.Array:
    """Per-sample ``KL(softmax(t/tau) || softmax(s/tau))``: ``[B]``."""
    log_pt = jax.nn.log_softmax(t_logits / temperature, axis=-1)
    log_ps = jax.nn.log_softmax(s_logits / temperature, axis=-1)
    return jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)


def diversity_loss(x: jax.Array, z: jax.Array) -> jax.Array:
    """FedFTG's diversity term ``exp(-mean_{i,j} d_x(i, j) * d_z(i, j))`` (means over features)."""
    xf = x.reshape(x.shape[0], -1)
    dx = jnp.mean(jnp.abs(xf[:, None, :] - xf[None, :, :]), axis=-1)
    dz = jnp.mean(jnp.square(z[:, None, :] - z[None, :, :]), axis=-1)
    return jnp.exp(-jnp.mean(dx * dz))


def batch_diagnostics(x: jax.Array, y: jax.Array, t_logits: jax.Array,
                      present: jax.Array) -> dict[str, jax.Array]:
    """What the teachers make of one distillation batch (generated or proxy inputs).

    Args:
      x: ``[B, ...]`` inputs; y: ``[B]`` requested classes (the generator's; a proxy batch's
        pseudo-labels); t_logits: ``[B, L]`` the teacher ensemble's logits ``T(x)`` (per-class
        weights of the requested class, the student's target); present: ``[L]`` bool, the
        classes some cluster holds.
    Returns:
      ``gen_teacher_acc``: share of samples whose ``argmax T(x)`` is the requested class;
      ``gen_coverage``: share of the present classes that ``argmax T`` gives to at least one
      sample; ``gen_pred_entropy``: entropy (nats) of the batch's predicted-class histogram
      (``log L`` at most); ``gen_diversity``: mean root-mean-square feature difference
      ``sqrt(mean_f (x_i - x_j)^2)`` over pairs ``i != j`` that requested the same class (0
      when the generator collapses to one input per class; 0 if no two samples share a class).
    """
    b, num_classes = t_logits.shape
    pred = jnp.argmax(t_logits, axis=-1)
    hits = jnp.sum(jax.nn.one_hot(pred, num_classes, dtype=jnp.float32), axis=0)  # [L]
    covered = jnp.sum((hits > 0) & present) / jnp.maximum(jnp.sum(present), 1)
    p = hits / b
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    xf = x.reshape(b, -1).astype(jnp.float32)
    sq = jnp.sum(xf * xf, axis=1)
    d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * xf @ xf.T, 0.0) / xf.shape[1]
    same = (y[:, None] == y[None, :]) & ~jnp.eye(b, dtype=bool)
    pairs = jnp.sum(same)
    diversity = jnp.sum(jnp.where(same, jnp.sqrt(d2), 0.0)) / jnp.maximum(pairs, 1)
    return {"gen_teacher_acc": jnp.mean((pred == y).astype(jnp.float32)),
            "gen_coverage": covered.astype(jnp.float32), "gen_pred_entropy": entropy,
            "gen_diversity": diversity}


def similarity_clusters(updates: jax.Array, weights: jax.Array, num_clusters: int,
                        key: jax.Array, iters: int = 10) -> jax.Array:
    """Spherical k-means of update vectors ``[M, D]`` into ``num_clusters``; ``[M]`` ids.

    Works on the cosine Gram matrix ``G = U U^T`` of the normalised updates: a centre is a
    weighted sum of members, its cosine with client ``i`` is ``(G a_k)_i / sqrt(a_k^T G a_k)``.
    Start: a random client, then repeatedly the client least similar to the chosen centres.
    """
    m = updates.shape[0]
    u = updates / jnp.maximum(jnp.linalg.norm(updates, axis=1, keepdims=True), 1e-12)
    g = u @ u.T
    first = jax.random.randint(key, (), 0, m)
    centres = [first]
    best = g[first]
    for _ in range(1, num_clusters):
        nxt = jnp.argmin(best)
        centres.append(nxt)
        best = jnp.maximum(best, g[nxt])
    sims = g[:, jnp.stack(centres)]  # [M, K]: cosine to each starting centre
    cid = jnp.argmax(sims, axis=1)
    w = weights.astype(g.dtype)

    def lloyd(cid, _):
        a = jax.nn.one_hot(cid, num_clusters, dtype=g.dtype) * w[:, None]  # [M, K]
        ga = g @ a
        norm = jnp.sqrt(jnp.maximum(jnp.sum(a * ga, axis=0), 1e-12))
        s = jnp.where(jnp.sum(a, axis=0) > 0, ga / norm, -jnp.inf)
        return jnp.argmax(s, axis=1), None

    cid, _ = jax.lax.scan(lloyd, cid, None, length=iters)
    return cid.astype(jnp.int32)


# ------------------------------------------------------------------------------------------
# Heterogeneous experts: client families of different architectures
# ------------------------------------------------------------------------------------------

def family_counts(num_clients: int, shares: Sequence[float]) -> tuple[int, ...]:
    """Clients per family: ``num_clients * share`` (shares normalised to sum to one), rounded
    by largest remainder (ties to the earlier family), so the counts sum to ``num_clients``."""
    s = np.asarray(shares, np.float64)
    raw = num_clients * s / s.sum()
    n = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - n), kind="stable")
    n[order[:num_clients - int(n.sum())]] += 1
    return tuple(int(v) for v in n)


def assign_families(train_count: jax.Array, counts: Sequence[int], rule: str,
                    key: jax.Array) -> jax.Array:
    """``[C]`` int: the family (model architecture) of every client, fixed before training.

    ``rule="share"``: a uniform random permutation of the clients (``key``) cut into blocks of
    ``counts``; ``"data_size"``: the clients ranked by training-set size (``train_count [C]``,
    ties by id), the smallest ``counts[0]`` to family 0 and so on (list the families from the
    smallest model up: more data, larger model).
    """
    c = train_count.shape[0]
    order = (jnp.argsort(train_count, stable=True) if rule == "data_size"
             else jax.random.permutation(key, c))
    block = np.repeat(np.arange(len(counts)), np.asarray(counts, np.int64))
    return jnp.zeros((c,), jnp.int32).at[order].set(jnp.asarray(block, jnp.int32))


def family_ensemble_logits(applies: Sequence[Any], teachers: Sequence[Any],
                           weights: Sequence[jax.Array], x: jax.Array,
                           y: jax.Array) -> jax.Array:
    """``T(x)_b = sum_f sum_{k in f} weights_f[k, y_b] * f_k(x_b)``: the teacher ensemble over
    families of different architectures (``applies[f]``, teachers leaves ``[K_f, ...]``,
    weights ``[K_f, L]``, the rows of one ``[K, L]`` matrix split by family); ``[B, L]``. With
    one family it is :func:`ensemble_logits`."""
    return functools.reduce(operator.add, [
        ensemble_logits(a, t, w, x, y) for a, t, w in zip(applies, teachers, weights,
                                                          strict=True)])


def _freeze(v: Any) -> Any:
    """A TOML value made hashable: tables -> sorted ``(key, value)`` pairs, lists -> tuples."""
    if isinstance(v, Mapping):
        return tuple(sorted((str(k), _freeze(x)) for k, x in v.items()))
    if isinstance(v, list | tuple):
        return tuple(_freeze(x) for x in v)
    return v


def _thaw(v: Any) -> Any:
    return [_thaw(x) for x in v] if isinstance(v, tuple) else v


def _cat(xs: Sequence[jax.Array]) -> jax.Array:
    return xs[0] if len(xs) == 1 else jnp.concatenate(xs)


def _cat_trees(trees: Sequence[Any]) -> Any:
    return trees[0] if len(trees) == 1 else jax.tree.map(lambda *a: jnp.concatenate(a), *trees)


def _split(a: jax.Array, sizes: Sequence[int]) -> tuple[jax.Array, ...]:
    """``a`` cut along axis 0 into blocks of ``sizes`` (one block: ``a`` itself)."""
    if len(sizes) == 1:
        return (a,)
    ends = np.cumsum(sizes)
    return tuple(a[e - n:e] for n, e in zip(sizes, ends, strict=True))


def same_architecture(a: Model, b: Model) -> bool:
    """Whether two models are the same architecture: same registered name and the same
    parameter tree (structure, shapes, dtypes)."""
    if a.name != b.name or tuple(a.feature_shape) != tuple(b.feature_shape) or \
            a.num_classes != b.num_classes:
        return False
    pa = jax.eval_shape(a.init, jax.random.key(0))
    pb = jax.eval_shape(b.init, jax.random.key(0))
    return jax.tree.structure(pa) == jax.tree.structure(pb) and all(
        u.shape == v.shape and u.dtype == v.dtype
        for u, v in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True))


@dataclasses.dataclass(frozen=True)
class Family:
    """One client family: its engine (the task engine with the family's model) and whether it
    has the universal expert's architecture (its clients then start from the universal
    expert, as in DisUE; the others start from their family's model)."""

    engine: Engine
    universal: bool


# ------------------------------------------------------------------------------------------
# The algorithm
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DisUE(Algorithm):
    """DisUE (Leng et al. 2025): cluster experts per round, a universal expert distilled from
    them data-free, broadcast as the next initialisation (see the module docstring).

    The ``rnd_*`` options are RND's (:class:`~fedrnd.algorithms._discovery.FederationOptions`)
    under names of their own; discovery uses the ``eps`` criterion."""

    name: ClassVar[str] = "disue"
    clusters_clients: ClassVar[bool] = True
    grouping: str = option("similarity", choices=GROUPINGS,
                           doc="``similarity`` (the paper's: clusters of the uploaded updates), "
                               "``ifca`` or ``rnd``.")
    num_clusters: int | None = option(None, low=1, doc="``K`` for ``ifca`` and ``similarity`` "
                                                       "(required there; not for ``rnd``).")
    distill: str = option("generator", choices=DISTILLS,
                          doc="``generator``, ``proxy``, ``average`` or ``none``.")
    distill_steps: int = option(100, low=1, doc="Scan iterations per round (each: one "
                                                "generator step and ``student_steps`` student "
                                                "steps).")
    student_steps: int = option(2, low=1, doc="Student steps per distillation iteration.")
    distill_batch: int = option(64, low=1, doc="Synthetic (or proxy) inputs per step.")
    temperature: float = option(3.0, low=0, low_open=True,
                                doc="Softening temperature ``tau`` of the student's KL.")
    student_lr: float = option(1e-3, low=0, low_open=True, doc="Student Adam learning rate.")
    generator_lr: float = option(1e-3, low=0, low_open=True,
                                 doc="Generator Adam learning rate.")
    adv_weight: float = option(1.0, low=0, doc="Weight of the adversarial generator term.")
    div_weight: float = option(1.0, low=0, doc="Weight of the diversity generator term.")
    student_init: str = option("previous", choices=STUDENT_INITS,
                               doc="``previous`` (the previous universal expert) or "
                                   "``average`` (of the cluster experts).")
    teacher_weights: str = option("class_mass", choices=TEACHER_WEIGHTS,
                                  doc="Per-class teacher weights: ``class_mass`` or "
                                      "``uniform``.")
    histogram_dp_eps: float | None = option(
        None, low=0, low_open=True,
        doc="Epsilon of local DP on the label histograms (unset: exact counts).")
    noise_dim: int = option(64, low=1, doc="Generator noise dimension.")
    generator_hidden: tuple[int, ...] = option((256,), doc="Generator hidden widths.")
    generator_output: str = option("sigmoid", choices=OUTPUTS,
                                   doc="``sigmoid`` (data in [0, 1]), ``tanh`` or ``linear``.")
    generator_head: str = option("auto", choices=HEADS, doc="``auto``, ``dense`` or ``conv``.")
    proxy_size: int = option(512, low=1, doc="Proxy rows for ``distill = proxy``.")
    similarity_iters: int = option(10, low=1, doc="Lloyd iterations of the update-similarity "
                                                  "k-means.")
    families: tuple[dict, ...] | None = option(
        None, doc="Heterogeneous experts: the client model families, a list of tables "
                  "``{model = <name>, <its options>}`` (e.g. ``[{model = \"mlp\", hidden = "
                  "[64]}, {model = \"mlp\", hidden = [400]}]``); clients are grouped and "
                  "experts aggregated within their family, and the universal expert (the run's "
                  "task model) is distilled from all families' experts. Unset: every client "
                  "runs the task model.")
    family_shares: tuple[float, ...] | None = option(
        None, doc="Share of the clients in each family (``families`` order, normalised); "
                  "unset: equal shares.")
    family_rule: str = option("share", choices=FAMILY_RULES,
                              doc="Which clients run which family: ``share`` (at random, in "
                                  "the shares) or ``data_size`` (ranked by training-set size, "
                                  "the smallest to the first family, in the shares).")
    discovery_aliases: ClassVar[dict[str, str]] = {
        "eps": "rnd_eps", "rule": "rnd_rule", "rnd_seed": "rnd_seed",
        "predictor_steps": "rnd_predictor_steps", "network": "rnd_network"}
    """The nested ``discovery`` block's keys -> DisUE's ``rnd_*`` options."""
    rnd_eps: float | str = same_option(FederationOptions, "eps")
    rnd_rule: str = same_option(FederationOptions, "rule")
    rnd_seed: int = same_option(FederationOptions, "rnd_seed")
    rnd_predictor_steps: int | None = same_option(FederationOptions, "predictor_steps")
    rnd_network: str = same_option(FederationOptions, "network")
    max_slots: int = option(4096, low=1, doc="Hard cap on cluster slots (``rnd``).")

    def __post_init__(self):
        # TOML gives lists; a tuple keeps the dataclass hashable (jit closes over it).
        object.__setattr__(self, "generator_hidden", tuple(self.generator_hidden))
        if isinstance(self.families, list | tuple):
            object.__setattr__(self, "families", tuple(
                _freeze(f) if isinstance(f, Mapping) else f for f in self.families))
        if isinstance(self.family_shares, list):
            object.__setattr__(self, "family_shares", tuple(self.family_shares))

    # ---------------------------------------------------------------------------------------
    def validate(self, data: FederatedData) -> None:
        super().validate(data)
        n = self.name
        if self.families is not None:
            self._validate_families(data)
        if not self.engine.model.plain:
            raise ValueError(f"{self.name}: model {self.engine.model.name!r} has dropout or "
                             f"state (BatchNorm); its distillation trains the student through "
                             f"Model.apply, "
                             f"so it needs a stateless deterministic model")
        if self.grouping == "rnd":
            if self.num_clusters is not None:
                raise ValueError("disue grouping='rnd' finds the number of clusters itself; "
                                 f"do not set num_clusters (got {self.num_clusters!r})")
            self.rnd_config.pair(data.feature_shape)  # raises for a conv pair on vector data
        else:
            check_num_clusters(f"{n} (grouping={self.grouping!r})", self.num_clusters,
                               data.num_clients)
        if self.distill == "none" and self.grouping == "similarity":
            raise ValueError("disue distill='none' (per-cluster FedAvg) needs clusters that keep "
                             "their identity across rounds: use grouping 'ifca' or 'rnd'")
        if self.distill == "proxy":
            total = int(np.sum(np.asarray(data.train_count)))
            if self.proxy_size > total:
                raise ValueError(f"{n} proxy_size={self.proxy_size} exceeds the {total} "
                                 "training rows of the data")
        if self.distill == "generator":
            self.generator  # noqa: B018 (raises for a conv head on non-image data)
        if self.families is not None:
            fams = self.family_views
            for i, fam in enumerate(fams):
                if not fam.engine.model.plain:
                    raise ValueError(f"{n} families: family {i} ({fam.engine.model.name!r}) has "
                                     "dropout or state (BatchNorm); a teacher must be a "
                                     "stateless deterministic model")
            if self.student_init == "average" and not any(f.universal for f in fams):
                raise ValueError(f"{n} student_init='average' averages the experts of the "
                                 "families with the universal expert's architecture (the task "
                                 "model), and no family has it; use student_init='previous'")

    def _validate_families(self, data: FederatedData) -> None:
        """``families``, ``family_shares`` and what they exclude, before any data is loaded."""
        n = self.name
        fams = self.families
        if not isinstance(fams, tuple) or not fams:
            raise ValueError(f"{n} families must be a non-empty list of tables {{model = <name>, "
                             f"<its options>}}, got {fams!r}")
        for i, f in enumerate(fams):
            if not isinstance(f, tuple) or not all(isinstance(kv, tuple) and len(kv) == 2
                                                   for kv in f):
                raise ValueError(f"{n} families: family {i} must be a table {{model = <name>, "
                                 f"<its options>}}, got {f!r}")
            spec = dict(f)
            name = spec.pop("model", None)
            if name not in MODELS:
                raise ValueError(f"{n} families: family {i} model = {name!r} is unknown; "
                                 f"allowed: {sorted(MODELS)}")
            try:
                check_model_options(name, {k: _thaw(v) for k, v in spec.items()})
            except (TypeError, ValueError) as e:
                raise ValueError(f"{n} families: family {i} (model {name!r}): {e}") from None
        shares = self.family_shares
        if shares is not None and (
                not isinstance(shares, tuple) or len(shares) != len(fams) or not all(
                    isinstance(v, int | float) and not isinstance(v, bool)
                    and np.isfinite(v) and v > 0 for v in shares)):
            raise ValueError(f"{n} family_shares must be a list of {len(fams)} numbers > 0 (one "
                             f"per family), got {shares!r}")
        if self.grouping == "rnd":
            raise ValueError(f"{n} families: grouping must be 'similarity' or 'ifca' (RND "
                             "federations would mix families), got 'rnd'")
        if self.distill in ("average", "none"):
            raise ValueError(f"{n} families: distill must be 'generator' or 'proxy' (experts of "
                             f"different architectures cannot be averaged), got "
                             f"{self.distill!r}")
        c = data.num_clients
        if self.cohort_size is not None and self.cohort_size < c:
            raise ValueError(f"{n} families: cohort_size must be unset (all clients every "
                             f"round), got {self.cohort_size!r}")
        counts = family_counts(c, self.shares)
        k = self.num_clusters or 1
        if min(counts) < k:
            raise ValueError(f"{n} families: {c} clients in shares {list(self.shares)} give "
                             f"families of {list(counts)} clients; each needs at least "
                             f"num_clusters = {k}")

    @property
    def shares(self) -> tuple[float, ...]:
        """The share of the clients in each family (equal when ``family_shares`` is unset)."""
        if self.family_shares is not None:
            return tuple(float(v) for v in self.family_shares)
        return (1.0,) * len(self.families or (None,))

    @functools.cached_property
    def family_views(self) -> tuple[Family, ...]:
        """The client families: one :class:`Family` per entry of ``families`` (unset: one,
        the task engine, every client). A family with the task model's architecture runs the
        task engine itself."""
        if self.families is None:
            return (Family(self.engine, True),)
        task = self.engine.model
        out = []
        for f in self.families:
            spec = dict(f)
            name = spec.pop("model")
            model = make_model(name, task.feature_shape, task.num_classes,
                               **{k: _thaw(v) for k, v in spec.items()})
            same = same_architecture(model, task)
            out.append(Family(self.engine if same else dataclasses.replace(self.engine,
                                                                            model=model), same))
        return tuple(out)

    @property
    def generator(self):
        """The class-conditional generator for the task model's inputs and classes."""
        model = self.engine.model
        return make_generator(model.feature_shape, model.num_classes, noise_dim=self.noise_dim,
                              hidden=self.generator_hidden, output=self.generator_output,
                              head=self.generator_head)

    @property
    def rnd_config(self) -> RNDConfig:
        return rnd_config({"network": self.rnd_network, "eps": self.rnd_eps,
                           "rule": self.rnd_rule, "rnd_seed": self.rnd_seed,
                           "predictor_steps": self.rnd_predictor_steps}, criterion="eps")

    # ---------------------------------------------------------------------------------------
    def init(self, key: jax.Array, data: FederatedData, hp: ClientHParams) -> State:
        self.validate(data)
        c = data.num_clients
        if self.grouping == "rnd":
            disc = discover(data, self.rnd_config, key=jax.random.fold_in(key, 1),
                            mapper=self.engine.mapper)
            found = {"cluster_id": disc.federation, "num_clusters": disc.num_federations,
                     "bytes_up": disc.bytes_up, "bytes_down": disc.bytes_down}
            k = grow_slots(disc.num_federations, 1, self.max_slots)
        else:
            zero = np.zeros((c,), np.float32)
            found = {"cluster_id": np.zeros((c,), np.int32), "num_clusters": self.num_clusters,
                     "bytes_up": zero, "bytes_down": zero}
            k = self.num_clusters
        return self._initial_state(key, data, hp, found, k)

    def init_template(self, key: jax.Array, data: FederatedData, hp: ClientHParams) -> State:
        """``init``'s structure; with ``rnd`` grouping, without running discovery."""
        if self.grouping != "rnd":
            return super().init_template(key, data, hp)
        c, sds = data.num_clients, jax.ShapeDtypeStruct
        found = {"cluster_id": sds((c,), jnp.int32), "num_clusters": sds((), jnp.int32),
                 "bytes_up": sds((c,), jnp.float32), "bytes_down": sds((c,), jnp.float32)}
        return jax.eval_shape(lambda kk, d, h, f: self._initial_state(kk, d, h, f, 1),
                              key, data, hp, found)

    def _initial_slots(self, model: Model, key: jax.Array, k: int):
        """``k`` cluster slots of ``model``: copies of ``model.init(key)``; IFCA's start is
        ``k`` random models, slot 0 the shared initial weights."""
        if self.grouping == "ifca":
            keys = [key] + [jax.random.fold_in(key, 1 + j) for j in range(1, k)]
            return jax.tree.map(lambda *xs: jnp.stack(xs), *[model.init(kk) for kk in keys])
        return jax.tree.map(lambda p: jnp.broadcast_to(p, (k, *p.shape)).copy(), model.init(key))

    def _initial_state(self, key, data, hp, found, k: int) -> State:
        params = self.engine.model.init(key)
        if self.families is None:
            slots = self._initial_slots(self.engine.model, key, k)
        else:
            # Every family's models start from the run's init key (as a family with the task
            # model's architecture starts from the universal expert's initial weights).
            slots = tuple(self._initial_slots(f.engine.model, key, k) for f in self.family_views)
        hist = label_histograms(data)
        if self.histogram_dp_eps is not None:
            noise = jax.random.laplace(jax.random.fold_in(key, 3), hist.shape)
            hist = jnp.maximum(hist + noise * (2.0 / self.histogram_dp_eps), 0.0)
        state = {"round": jnp.zeros((), jnp.int32), "universal": params, "slots": slots,
                 "num_clusters": jnp.asarray(found["num_clusters"], jnp.int32),
                 "clients": {"hp": hp, "cluster_id": jnp.asarray(found["cluster_id"], jnp.int32),
                             "histogram": hist,
                             "pending_up": jnp.asarray(found["bytes_up"], jnp.float32),
                             "pending_down": jnp.asarray(found["bytes_down"], jnp.float32)}}
        if self.families is not None:
            counts = family_counts(data.num_clients, self.shares)
            fam = assign_families(data.train_count, counts, self.family_rule,
                                  jax.random.fold_in(key, FAMILY_STREAM))
            state["clients"]["family"] = fam
            state["family_ids"] = tuple(jnp.nonzero(fam == f, size=n)[0].astype(jnp.int32)
                                        for f, n in enumerate(counts))
            state["family_models"] = tuple(f.engine.model.init(key) for f in self.family_views)
            state["num_clusters"] = jnp.asarray(k * len(counts), jnp.int32)
        if self.distill == "generator":
            gp = self.generator.init(jax.random.fold_in(key, 5))
            state["generator"] = {"params": gp, "opt": optax.adam(self.generator_lr).init(gp)}
        if self.distill == "proxy":
            # Proxy rows: a uniform draw without replacement among all training rows.
            flat = data.train_idx.reshape(-1)
            valid = (jnp.arange(data.train_idx.shape[1])[None, :]
                     < data.train_count[:, None]).reshape(-1).astype(jnp.float32)
            pick = jax.random.choice(jax.random.fold_in(key, 7), flat.shape[0],
                                     (self.proxy_size,), replace=False, p=valid / valid.sum())
            state["proxy_idx"] = flat[pick]
        return state

    # ---------------------------------------------------------------------------------------
    def round(self, state: State, data: FederatedData, key: jax.Array) -> tuple[State, Metrics]:
        k_cohort, k_train, k_group, k_distill = jax.random.split(key, 4)
        ids, part = self.cohort(k_cohort, data.num_clients)
        cl = state["clients"]
        universal = state["universal"]
        fams = self.family_views
        hetero = self.families is not None
        slots_f = state["slots"] if hetero else (state["slots"],)
        # Each family's clients (ids; None: all clients, no gather); without families, the
        # cohort is the one family.
        ids_f = tuple(None if i.shape[0] == data.num_clients else i
                      for i in state["family_ids"]) if hetero else (ids,)

        # 1-2. Local training (one call per family), grouping within the family, experts.
        experts, masses, cids, hists, loss_num, loss_den, steps = ([] for _ in range(7))
        for f, (fam, slots, fids) in enumerate(zip(fams, slots_f, ids_f, strict=True)):
            take = (lambda a: a) if fids is None else (lambda a, i=fids: a[i])
            num_slots = jax.tree.leaves(slots)[0].shape[0]
            w = take(data.train_count).astype(jnp.float32)
            start = universal if fam.universal else state["family_models"][f]
            kg = k_group if f == 0 else jax.random.fold_in(k_group, f)
            if self.grouping == "similarity":
                params, _, m = fam.engine.train(start, data, cl["hp"], k_train, state["round"],
                                                ids=fids)
                flat = jnp.concatenate(
                    [(p - u[None]).reshape(p.shape[0], -1)
                     for p, u in zip(jax.tree.leaves(params), jax.tree.leaves(start),
                                     strict=True)], axis=1)
                cid = similarity_clusters(flat, w, num_slots, kg, self.similarity_iters)
                new, mass = segment_weighted_mean(params, w, cid, num_slots)
                loss_num.append(jnp.sum(w * m["loss"]))
                loss_den.append(jnp.sum(w))
            else:
                if self.grouping == "ifca":
                    losses = cluster_losses(fam.engine, slots, data, fids)
                    cid = jnp.argmin(losses, axis=1).astype(jnp.int32)
                else:
                    cid = take(cl["cluster_id"])
                start_slots = slots if self.distill == "none" else jax.tree.map(
                    lambda u, k=num_slots: jnp.broadcast_to(u, (k, *u.shape)), start)
                sums, mass, m = fam.engine.train_segment_sum(start_slots, cid, data, cl["hp"],
                                                             k_train, state["round"], ids=fids,
                                                             weights=w)
                new = slot_means(sums, mass)
                loss_num.append(jnp.sum(m["loss"]))
                loss_den.append(jnp.sum(mass))
            steps.append(jnp.sum(m["steps"]))
            experts.append(keep_nonempty(new, slots, mass))
            masses.append(mass)
            cids.append(cid)
            hists.append(jax.ops.segment_sum(take(cl["histogram"]), cid, num_segments=num_slots))
        sizes = [m.shape[0] for m in masses]
        mass, hist = _cat(masses), _cat(hists)
        train_loss = functools.reduce(operator.add, loss_num) / functools.reduce(operator.add,
                                                                                 loss_den)

        # 3. The universal expert, distilled from every family's experts.
        weights = teacher_weights(hist, mass, self.teacher_weights)
        same = [f for f, fam in enumerate(fams) if fam.universal]
        average = (weighted_mean(_cat_trees([experts[f] for f in same]),
                                 _cat([masses[f] for f in same])) if same else None)
        out = {"distill_loss": jnp.zeros(()), "gen_ce": jnp.zeros(()),
               "gen_adv": jnp.zeros(()), "gen_div": jnp.zeros(())}
        new_state = dict(state)
        teach = dict(applies=tuple(f.engine.model.apply for f in fams)) if hetero else {}
        teachers = tuple(experts) if hetero else experts[0]
        if self.distill in ("generator", "proxy"):
            student0 = universal if self.student_init == "previous" else average
            present = jnp.sum(hist, axis=0) > 0
            proxy_x = data.x[state["proxy_idx"]] if self.distill == "proxy" else None
            universal, gen, out = self.distill_phase(
                student0, teachers, _split(weights, sizes) if hetero else weights, mass,
                present, state.get("generator"), k_distill, proxy_x, **teach)
            if gen is not None:
                new_state["generator"] = gen
        else:
            universal = average

        metrics = {}
        if average is not None:
            acc = global_accuracy(self.engine, jax.tree.map(lambda a, b: jnp.stack([a, b]),
                                                            universal, average), data)
            metrics.update(universal_acc=acc[0], average_acc=acc[1])
        else:
            metrics["universal_acc"] = global_accuracy(
                self.engine, jax.tree.map(lambda a: a[None], universal), data)[0]
        mix = mass / jnp.maximum(jnp.sum(mass), 1e-12)
        agree, ensemble_acc = ensemble_agreement(
            self.engine, universal, teachers, _split(mix, sizes) if hetero else mix, data,
            **teach)
        cluster_id, offset = cl["cluster_id"], 0
        for cid, fids, k in zip(cids, ids_f, sizes, strict=True):
            gid = cid + offset if offset else cid  # a global cluster id over all families
            cluster_id = gid if fids is None else cluster_id.at[fids].set(gid)
            offset += k
        if hetero:
            family_models = tuple(weighted_mean(e, m) for e, m in zip(experts, masses,
                                                                      strict=True))
            new_state["family_models"] = family_models
            for f, (fam, fm) in enumerate(zip(fams, family_models, strict=True)):
                metrics[f"family{f}_acc"] = global_accuracy(
                    fam.engine, jax.tree.map(lambda a: a[None], fm), data)[0]
            metrics["personal_acc"] = functools.reduce(operator.add, [
                jnp.sum(evaluate_clients(fam.engine.model.apply, e, cid,
                                         data if fids is None else data.select(fids),
                                         fam.engine.mapper, splits=("test",))["test_acc"])
                for fam, e, cid, fids in zip(fams, experts, cids, ids_f, strict=True)
            ]) / data.num_clients

        # Ledger: each client sends and receives models of its own family.
        nbytes = [tree_bytes(jax.tree.map(lambda s: s[0], sl)) for sl in slots_f]
        experts_down = sizes if self.grouping == "ifca" else [1] * len(sizes)

        def models_bytes(count: list[int]) -> jax.Array:
            if not hetero:
                return per_client(count[0] * nbytes[0], part)
            per = jnp.asarray([c * b for c, b in zip(count, nbytes, strict=True)], jnp.float32)
            return per[cl["family"]] * part

        zero = jnp.zeros_like(cl["pending_up"])
        ones = [1] * len(sizes)
        ledger = dict(up_model=models_bytes(ones),
                      up_histogram=per_client(self.engine.model.num_classes * COUNT_BYTES, part),
                      down_model=models_bytes(ones))
        if self.distill != "none":
            ledger["down_experts"] = models_bytes(experts_down)
        elif self.grouping == "ifca":
            ledger["down_model"] = models_bytes(sizes)
        if self.grouping == "rnd":
            ledger.update(up_discovery=cl["pending_up"], down_discovery=cl["pending_down"])
        metrics = {"train_loss": train_loss,
                   "local_steps": functools.reduce(operator.add, steps),
                   "clusters_used": jnp.sum(mass > 0).astype(jnp.float32),
                   **metrics, "student_agree": agree, "ensemble_acc": ensemble_acc, **out,
                   **comm(**ledger)}
        new_state.update(round=state["round"] + 1,
                         slots=tuple(experts) if hetero else experts[0], universal=universal,
                         clients={**cl, "cluster_id": cluster_id, "pending_up": zero,
                                  "pending_down": zero})
        return new_state, metrics

    # ---------------------------------------------------------------------------------------
    def distill_phase(self, student, teachers, weights: jax.Array, mass: jax.Array,
                      present: jax.Array, gen_state, key: jax.Array, proxy_x=None, *,
                      applies: Sequence[Any] | None = None):
        """Distil ``teachers`` (leaves ``[K, ...]``) into ``student`` in one ``lax.scan``.

        Args:
          weights: ``[K, L]`` per-class teacher weights (columns sum to one).
          applies: heterogeneous teachers: one apply function per family; ``teachers`` and
            ``weights`` are then tuples, family ``f``'s experts (leaves ``[K_f, ...]``) and
            its rows ``[K_f, L]`` of the weights (:func:`family_ensemble_logits`). ``None``:
            every teacher is a task model.
          mass: ``[K]`` cluster masses (the proxy's pseudo-labels use the mass-weighted
            ensemble).
          present: ``[L]`` bool, the classes the generator is asked for (uniformly).
          gen_state: ``{"params", "opt"}`` of the generator (``None`` with a proxy set).
          proxy_x: ``[P, ...]`` proxy inputs (``distill="proxy"``), else ``None``.
        Returns:
          ``(student, gen_state, metrics)``; metrics are the last iteration's scalars.
        """
        apply = self.engine.model.apply
        if applies is None:
            applies, teachers, weights = (apply,), (teachers,), (weights,)
        sizes = [w.shape[0] for w in weights]

        def ensemble(x, y, ws=weights):
            return family_ensemble_logits(applies, teachers, ws, x, y)

        tau, b = float(self.temperature), self.distill_batch
        s_opt = optax.adam(self.student_lr)
        mix = mass / jnp.maximum(jnp.sum(mass), 1e-12)
        class_logits = jnp.where(present, 0.0, -jnp.inf)
        use_gen = proxy_x is None
        gen = self.generator if use_gen else None

        def sample(gp, k):
            """A batch ``(x, t_logits)``: synthetic or proxy inputs and the teachers' logits."""
            if use_gen:
                kz, ky = jax.random.split(k)
                z = jax.random.normal(kz, (b, self.noise_dim))
                y = jax.random.categorical(ky, class_logits, shape=(b,))
                x = gen.apply(gp, z, y)
                return x, y, z
            x = proxy_x[jax.random.randint(k, (b,), 0, proxy_x.shape[0])]
            flat = tuple(jnp.broadcast_to(m[:, None], w.shape)
                         for m, w in zip(_split(mix, sizes), weights, strict=True))
            y = jnp.argmax(ensemble(x, jnp.zeros((b,), jnp.int32), flat), axis=-1)
            return x, y, None

        def student_step(carry, k):
            sp, so, gp = carry
            x, y, _ = sample(gp, k)
            x = jax.lax.stop_gradient(x)
            t = jax.lax.stop_gradient(ensemble(x, y))

            def loss(p):
                return tau * tau * jnp.mean(softened_kl(t, apply(p, x), tau))

            val, g = jax.value_and_grad(loss)(sp)
            upd, so = s_opt.update(g, so, sp)
            return (optax.apply_updates(sp, upd), so, gp), val

        def gen_step(gp, go, sp, k):
            def loss(p):
                x, y, z = sample(p, k)
                t = ensemble(x, y)
                s = apply(sp, x)
                ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(t, y))
                agree = (jnp.argmax(t, -1) == jnp.argmax(s, -1)).astype(t.dtype)
                adv = jnp.mean(agree * softened_kl(t, s, tau))
                div = diversity_loss(x, z)
                return ce - self.adv_weight * adv + self.div_weight * div, (ce, adv, div)

            (_, (ce, adv, div)), g = jax.value_and_grad(loss, has_aux=True)(gp)
            upd, go = optax.adam(self.generator_lr).update(g, go, gp)
            return optax.apply_updates(gp, upd), go, (ce, adv, div)

        def body(carry, k):
            sp, so, gp, go = carry
            kg, ks = jax.random.split(k)
            if use_gen:
                gp, go, (ce, adv, div) = gen_step(gp, go, sp, kg)
            else:
                ce = adv = div = jnp.zeros(())
            (sp, so, _), vals = jax.lax.scan(student_step, (sp, so, gp),
                                             jax.random.split(ks, self.student_steps))
            return (sp, so, gp, go), (jnp.mean(vals), ce, adv, div)

        gp, go = (gen_state["params"], gen_state["opt"]) if use_gen else (None, None)
        carry = (student, s_opt.init(student), gp, go)
        (student, _, gp, go), hist = jax.lax.scan(
            body, carry, jax.random.split(key, self.distill_steps))
        metrics = {"distill_loss": hist[0][-1], "gen_ce": hist[1][-1], "gen_adv": hist[2][-1],
                   "gen_div": hist[3][-1]}
        # Diagnostics on a fresh batch from the final generator (or the proxy set).
        x, y, _ = sample(gp, jax.random.fold_in(key, DIAGNOSTIC_STREAM))
        metrics.update(batch_diagnostics(x, y, ensemble(x, y), present))
        return student, ({"params": gp, "opt": go} if use_gen else None), metrics

    def models(self, state: State):
        """Each client's cluster expert. With families of other architectures than the task
        model's the driver can only score task models: every client then gets the universal
        expert (in as many slots as clusters, so that the assignment is the clustering), and
        the experts' personalised accuracy is the round metric ``personal_acc``."""
        slots, cid = state["slots"], state["clients"]["cluster_id"]
        if self.families is None:
            return slots, cid
        if all(f.universal for f in self.family_views):
            return _cat_trees(slots), cid
        k = sum(jax.tree.leaves(s)[0].shape[0] for s in slots)
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (k, *a.shape)),
                            state["universal"]), cid

    def report(self, state: State, data: FederatedData) -> Report:
        """The final universal expert's accuracy on the global test set (pooled test rows);
        with families also each family's model (``family<f>_acc``: the sample-weighted
        average of its experts, per-family FedAvg's global model)."""
        acc = global_accuracy(self.engine,
                              jax.tree.map(lambda a: a[None], state["universal"]), data)
        scalars = {"universal_acc": float(acc[0])}
        if self.families is not None:
            for f, (fam, fm) in enumerate(zip(self.family_views, state["family_models"],
                                              strict=True)):
                scalars[f"family{f}_acc"] = float(global_accuracy(
                    fam.engine, jax.tree.map(lambda a: a[None], fm), data)[0])
        return Report(scalars)


def global_accuracy(engine, models, data: FederatedData) -> jax.Array:
    """Accuracy of each model (leaves ``[J, ...]``) on every client's test rows pooled: ``[J]``."""
    apply = engine.model.apply
    per = dict(idx=data.test_idx, count=data.test_count)

    def one(client, shared):
        ms, x_pool, y_pool = shared
        idx = client["idx"]
        x, y = x_pool[idx], y_pool[idx]
        mask = (jnp.arange(idx.shape[0]) < client["count"]).astype(jnp.float32)
        hits = jax.vmap(lambda p: jnp.sum((jnp.argmax(apply(p, x), -1) == y) * mask))(ms)
        return hits, jnp.sum(mask)

    hits, n = engine.mapper.sum(one, per, (models, data.x, data.y))
    return hits / jnp.maximum(n, 1.0)


def ensemble_agreement(engine, student, teachers, mix: jax.Array,
                       data: FederatedData, *, applies: Sequence[Any] | None = None
                       ) -> tuple[jax.Array, jax.Array]:
    """The student against the teacher ensemble on every client's test rows pooled.

    The ensemble is ``sum_k mix[k] * f_k(x)`` (logits; ``mix: [K]``, the cluster masses
    normalised, the weights of the proxy's pseudo-labels), ``teachers`` leaves ``[K, ...]``.
    Heterogeneous teachers (``applies``, one apply per family): ``teachers`` and ``mix`` are
    tuples by family and the ensemble sums over families.
    Returns ``(agree, ensemble_acc)``: the share of rows where the student's argmax equals the
    ensemble's, and the ensemble's accuracy (what a perfect distillation would reach).
    """
    apply = engine.model.apply
    if applies is None:
        applies, teachers, mix = (apply,), (teachers,), (mix,)
    per = dict(idx=data.test_idx, count=data.test_count)

    def one(client, shared):
        s, ts, w, x_pool, y_pool = shared
        idx = client["idx"]
        x, y = x_pool[idx], y_pool[idx]
        mask = (jnp.arange(idx.shape[0]) < client["count"]).astype(jnp.float32)
        t = jnp.argmax(functools.reduce(operator.add, [
            jnp.einsum("k,kbl->bl", wf, jax.vmap(lambda p, a=a: a(p, x))(tf))
            for a, tf, wf in zip(applies, ts, w, strict=True)]), -1)
        same = jnp.argmax(apply(s, x), -1) == t
        return jnp.stack([jnp.sum(same * mask), jnp.sum((t == y) * mask), jnp.sum(mask)])

    tot = engine.mapper.sum(one, per, (student, teachers, mix, data.x, data.y))
    return tot[0] / jnp.maximum(tot[2], 1.0), tot[1] / jnp.maximum(tot[2], 1.0)
