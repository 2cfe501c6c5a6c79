"""Partitioners: split a :class:`~fedrnd.data.federated.Dataset` over clients.

Every partitioner has the signature ``(dataset, num_clients, *, seed, ...)`` and returns a
:class:`~fedrnd.data.federated.Partition` (``label_permutation`` also returns a modified
dataset, see there). A partition holds, per client,

* ``train``: rows of ``x_train``; a row is given to at most one client (``iid``, ``shards``,
  ``quantity_skew`` and the grouped partitioners with ``within="iid"`` use every row);
* ``test``: rows of ``x_test`` drawn *from the client's own distribution*: the number of test
  rows of each label follows the client's train label proportions (multinomial draw), rows of
  one label are distinct within a client (so a label's count is capped at its number of test
  rows) but may be shared between clients. The default size
  is ``max(1, round(n_train_c * n_test / n_train))``; ``test_size=m`` gives ``m`` per client.
  Group transforms (rotation, patterns) apply to test rows too (in ``build_federated``);
* ``group``: the ground-truth group (all zeros for plain label/quantity skew).

Label and quantity skews are *split specs*: small callables
``split(y, num_classes, num_clients, rng) -> list[index array into y]``
(:class:`IIDSplit`, :class:`DirichletSplit`, :class:`ShardSplit`). The grouped partitioners
(``rotation``, ``feature_pattern``, ``label_permutation``, ``grouped``) first give each group a
disjoint random share of the training rows (proportional to its number of clients), then split
that share among the group's clients with ``within=`` (any split spec), i.e.
"groups x within-group split". Client ids are shuffled so the group is not the id order.

Empty clients are never produced: the size-based splits guarantee ``>= 1`` row per client by
construction or raise ``ValueError``; ``dirichlet`` resamples and then tops up (or raises,
``top_up=False``).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedrnd.data.federated import Dataset, GroupTransform, Partition

__all__ = [
    "PARTITIONS",
    "PARTITION_INFO",
    "DirichletSplit",
    "IIDSplit",
    "QuantitySkew",
    "ShardSplit",
    "check_partition_options",
    "dirichlet",
    "dirichlet_mix",
    "feature_patterns",
    "feature_pattern",
    "grouped",
    "iid",
    "index_file",
    "label_permutation",
    "make_partition",
    "natural",
    "PartitionInfo",
    "partition_info",
    "partition_parameters",
    "quantity_skew",
    "register_partition",
    "rotation",
    "shards",
]

SplitFn = Callable[[np.ndarray, int, int, np.random.Generator], list[np.ndarray]]
"""``split(y, num_classes, num_clients, rng) -> list of index arrays into y``, one per client."""

SizeSpec = (int | Sequence[int] | np.ndarray | Callable[[int, int, np.random.Generator], np.ndarray]
            | None)
"""Client sizes: ``None`` (equal), one int (every client that many rows), explicit ints, or
``sizes(n, num_clients, rng) -> [C] ints``."""


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _apportion(total: int, weights: np.ndarray) -> np.ndarray:
    """Non-negative ints proportional to ``weights`` summing to ``total`` (largest remainder)."""
    w = np.asarray(weights, np.float64)
    exact = total * w / w.sum()
    out = np.floor(exact).astype(np.int64)
    rest = int(total - out.sum())
    if rest > 0:
        out[np.argsort(out - exact, kind="stable")[:rest]] += 1
    return out


def _capped_apportion(total: int, weights: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Like :func:`_apportion` but ``out <= caps``; needs ``caps[weights > 0].sum() >= total``.

    Water-filling: the exact shares are ``min(cap, lam * w)`` with ``lam`` chosen so they sum
    to ``total``; they are then rounded by largest remainder (never above a cap).
    """
    w = np.asarray(weights, np.float64)
    caps = np.where(w > 0, np.asarray(caps, np.int64), 0)
    if caps.sum() < total:
        raise ValueError(f"cannot place {total} items under caps summing to {caps.sum()}")
    capped = w <= 0  # zero weight: share fixed at its cap, 0
    lam = 0.0
    while not capped.all():
        lam = (total - caps[capped].sum()) / w[~capped].sum()
        over = ~capped & (lam * w > caps)
        if not over.any():
            break
        capped |= over
    exact = np.where(capped, caps, lam * w)
    out = np.floor(exact + 1e-9).astype(np.int64)
    rest = int(total - out.sum())
    if rest > 0:
        frac = np.where(out < caps, exact - out, -1.0)
        out[np.argsort(-frac, kind="stable")[:rest]] += 1
    return out


def _split_by_counts(idx: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    return np.split(idx, np.cumsum(counts)[:-1])


def _check_num_clients(n: int, num_clients: Any, what: str = "training examples") -> None:
    if not isinstance(num_clients, int | np.integer) or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if n < num_clients:
        raise ValueError(f"fewer {what} ({n}) than clients (num_clients={num_clients}); "
                         "use fewer clients")


def _resolve_sizes(sizes: SizeSpec, n: int, num_clients: int,
                   rng: np.random.Generator) -> np.ndarray:
    if sizes is None:
        return np.full(num_clients, n // num_clients) + (np.arange(num_clients) < n % num_clients)
    if isinstance(sizes, int | np.integer) and not isinstance(sizes, bool):
        s = np.full(num_clients, int(sizes))  # e.g. IFCA's 100 images per client
    else:
        s = np.asarray(sizes(n, num_clients, rng) if callable(sizes) else sizes)
    if s.shape != (num_clients,) or not np.issubdtype(s.dtype, np.integer):
        raise ValueError(f"sizes must give one integer per client ({num_clients}), got "
                         f"shape {s.shape} dtype {s.dtype}")
    if s.min() < 1:
        raise ValueError(f"sizes must all be >= 1 (no empty client), got min {s.min()}")
    if s.sum() > n:
        raise ValueError(f"sizes sum to {s.sum()} but only {n} training examples are available")
    return s.astype(np.int64)


# --------------------------------------------------------------------------------------------
# split specs (label / quantity skew on a label vector)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QuantitySkew:
    """Size spec: client sizes ``min_size + share`` of the rest, shares from a heavy tail.

    ``dist="lognormal"``: weights ``~ LogNormal(0, sigma)`` (LEAF-style); ``dist="powerlaw"``:
    weights ``~ Pareto(exponent)`` (density ``~ w^-(exponent+1)``, ``w >= 1``). Sizes sum to
    exactly ``n`` (every row used). Source: Li et al. (2022), Federated Learning on Non-IID
    Data Silos: An Experimental Study (quantity skew).
    """

    dist: str = "lognormal"
    sigma: float = 1.0
    exponent: float = 1.5
    min_size: int = 1

    def __post_init__(self):
        if self.dist not in ("lognormal", "powerlaw"):
            raise ValueError(f"dist must be 'lognormal' or 'powerlaw', got {self.dist!r}")
        if self.dist == "lognormal" and not self.sigma > 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        if self.dist == "powerlaw" and not self.exponent > 0:
            raise ValueError(f"exponent must be > 0, got {self.exponent}")
        if self.min_size < 1:
            raise ValueError(f"min_size must be >= 1, got {self.min_size}")

    def __call__(self, n: int, num_clients: int, rng: np.random.Generator) -> np.ndarray:
        free = n - num_clients * self.min_size
        if free < 0:
            raise ValueError(f"quantity skew: {n} examples cannot give {num_clients} clients "
                             f"min_size={self.min_size} each")
        if self.dist == "lognormal":
            w = rng.lognormal(0.0, self.sigma, num_clients)
        else:
            w = rng.pareto(self.exponent, num_clients) + 1.0
        return self.min_size + _apportion(free, w)

    def __str__(self) -> str:
        p = f"sigma={self.sigma:g}" if self.dist == "lognormal" else f"exponent={self.exponent:g}"
        return f"quantity_skew({self.dist},{p})"


@dataclasses.dataclass(frozen=True)
class IIDSplit:
    """Shuffle and split; sizes equal (differ by at most one) unless ``sizes`` is given."""

    sizes: SizeSpec = None

    def __call__(self, y: np.ndarray, num_classes: int, num_clients: int,
                 rng: np.random.Generator) -> list[np.ndarray]:
        _check_num_clients(len(y), num_clients)
        s = _resolve_sizes(self.sizes, len(y), num_clients, rng)
        return _split_by_counts(rng.permutation(len(y))[: s.sum()], s)

    def __str__(self) -> str:
        if self.sizes is None:
            return "iid"
        return str(self.sizes) if callable(self.sizes) else "iid(sizes)"


@dataclasses.dataclass(frozen=True)
class DirichletSplit:
    """Per-class Dirichlet label skew: class ``k`` is split over clients by ``p_k ~ Dir(alpha)``.

    Small ``alpha`` concentrates each class on few clients; large ``alpha`` tends to IID. Every
    row is used. A draw leaving a client below ``min_size`` is redrawn up to ``max_tries``
    times; then the draw with the smallest shortfall is kept and, with ``top_up=True``, each
    short client receives rows of its preferred class (its largest Dirichlet share) from the
    client holding most of that class (which keeps ``>= min_size``); ``top_up=False`` raises.
    With thousands of clients per few examples redraws alone rarely succeed, hence the top-up.
    Source: Hsu et al. (2019), Measuring the Effects of Non-Identical Data Distribution;
    per-class form as in Yurochkin et al. (2019).
    """

    alpha: float
    min_size: int = 2
    max_tries: int = 20
    top_up: bool = True

    def __post_init__(self):
        if not (np.isscalar(self.alpha) and np.isreal(self.alpha) and self.alpha > 0
                and np.isfinite(self.alpha)):
            raise ValueError(f"alpha must be > 0 (and finite), got {self.alpha!r}")
        if self.min_size < 1:
            raise ValueError(f"min_size must be >= 1, got {self.min_size}")
        if self.max_tries < 1:
            raise ValueError(f"max_tries must be >= 1, got {self.max_tries}")

    def __call__(self, y: np.ndarray, num_classes: int, num_clients: int,
                 rng: np.random.Generator) -> list[np.ndarray]:
        n, c = len(y), num_clients
        _check_num_clients(n, c)
        if n < c * self.min_size:
            raise ValueError(f"dirichlet: {n} examples cannot give num_clients={c} clients "
                             f"min_size={self.min_size} each; lower min_size or num_clients")
        n_k = np.bincount(y, minlength=num_classes).astype(np.int64)
        best = None
        for _ in range(self.max_tries):
            p = rng.dirichlet(np.full(c, float(self.alpha)), size=num_classes)  # [K, C]
            cuts = np.floor(np.cumsum(p, axis=1) * n_k[:, None]).astype(np.int64)
            cuts[:, -1] = n_k  # cumsum may end at 1 - eps
            m = np.diff(cuts, axis=1, prepend=0)  # [K, C] rows of class k for client c
            short = int(np.maximum(self.min_size - m.sum(0), 0).sum())
            if best is None or short < best[0]:
                best = (short, m, p)
            if short == 0:
                break
        short, m, p = best
        if short:
            if not self.top_up:
                raise ValueError(
                    f"dirichlet(alpha={self.alpha}): after {self.max_tries} draws some of the "
                    f"{c} clients still have fewer than min_size={self.min_size} examples; use a "
                    "larger alpha, fewer clients, a smaller min_size or top_up=True")
            m = self._top_up(m, p * n_k[:, None])
        # Rows sorted by class (random within class), then the k-th class block is cut by m[k].
        order = np.lexsort((rng.random(n), y))
        owner = np.concatenate([np.repeat(np.arange(c), m[k]) for k in range(num_classes)])
        return _split_by_counts(order[np.argsort(owner, kind="stable")], m.sum(0))

    def _top_up(self, m: np.ndarray, want: np.ndarray) -> np.ndarray:
        m = m.copy()
        tot = m.sum(0)
        pref = np.argmax(want, axis=0)
        for c in np.flatnonzero(tot < self.min_size):
            while tot[c] < self.min_size:
                k = pref[c]
                avail = np.where(tot > self.min_size, m[k], 0)
                if avail.max() <= 0:  # nobody can spare the preferred class: take any class
                    d = int(np.argmax(tot))
                    k = int(np.argmax(m[:, d]))
                else:
                    d = int(np.argmax(avail))
                give = int(min(self.min_size - tot[c], m[k, d], tot[d] - self.min_size))
                m[k, d] -= give
                m[k, c] += give
                tot[d] -= give
                tot[c] += give
        return m

    def __str__(self) -> str:
        return f"dirichlet(alpha={self.alpha:g})"


def _check_k(k: Any, num_classes: int | None = None) -> None:
    top = "num_classes" if num_classes is None else f"num_classes={num_classes}"
    if (isinstance(k, bool) or not isinstance(k, int | np.integer)
            or not 1 <= k <= (k if num_classes is None else num_classes)):
        raise ValueError(f"k (labels per client) must be in [1, {top}], got {k!r}")


@dataclasses.dataclass(frozen=True)
class ShardSplit:
    """``k`` labels per client: label-pure shards, ``k`` shards with distinct labels each.

    The ``C*k`` shards are apportioned to classes by class size (at most ``C`` per class, so
    that shard positions ``c, c+C, c+2C, ...`` of the class-sorted shard list, which client
    ``c`` receives, always fall in different classes). Client order and class order are
    random; every row is used. Source: McMahan et al. (2017), Communication-Efficient
    Learning of Deep Networks from Decentralized Data.
    """

    k: int

    def __call__(self, y: np.ndarray, num_classes: int, num_clients: int,
                 rng: np.random.Generator) -> list[np.ndarray]:
        k, c = self.k, num_clients
        _check_k(k, num_classes)
        _check_num_clients(len(y), c)
        n_l = np.bincount(y, minlength=num_classes)
        if len(y) < c * k:
            raise ValueError(f"shards: {len(y)} examples are fewer than num_clients*k = {c * k} "
                             "shards; lower k or num_clients")
        caps = np.minimum(c, n_l)
        if caps.sum() < c * k:
            raise ValueError(f"shards: only {int((n_l > 0).sum())} labels present with too few "
                             f"examples to give {c} clients k={k} distinct labels each")
        per_class = _capped_apportion(c * k, n_l, caps)
        shard_rows: list[np.ndarray] = []
        for lab in rng.permutation(num_classes):
            if per_class[lab]:
                rows = rng.permutation(np.flatnonzero(y == lab))
                shard_rows.extend(np.array_split(rows, per_class[lab]))
        owner = rng.permutation(c)
        parts: list[list[np.ndarray]] = [[] for _ in range(c)]
        for pos, rows in enumerate(shard_rows):
            parts[owner[pos % c]].append(rows)
        return [np.concatenate(p) for p in parts]

    def __str__(self) -> str:
        return f"shards(k={self.k})"


_SPLITS: dict[str, Callable[..., SplitFn]] = {
    "iid": IIDSplit,
    "dirichlet": DirichletSplit,
    "shards": ShardSplit,
    "quantity_skew": lambda **kw: IIDSplit(sizes=QuantitySkew(**kw)),
}
_SPLIT_SPECS = {"iid": IIDSplit, "dirichlet": DirichletSplit, "shards": ShardSplit,
                "quantity_skew": QuantitySkew}
"""The dataclass whose fields are the options of each ``within=`` split name."""


def _as_split(within: Any, sizes: SizeSpec = None) -> SplitFn:
    """Turn a ``within=`` spec into a split function.

    Accepts ``"iid"``/``None``, a split-spec object or any callable with the split signature,
    ``(name, {kwargs})`` or ``{"name": name, **kwargs}`` with name in iid, dirichlet, shards,
    quantity_skew. ``sizes`` is only allowed with an iid split.
    """
    if within is None:
        within = "iid"
    if isinstance(within, str):
        name, kwargs = within, {}
    elif isinstance(within, tuple) and len(within) == 2 and isinstance(within[0], str):
        name, kwargs = within[0], dict(within[1])
    elif isinstance(within, Mapping):
        kwargs = dict(within)
        name = kwargs.pop("name", None)
        if name is None:
            raise ValueError(f"within dict needs a 'name' key, got {within!r}")
    elif callable(within):
        if sizes is not None:
            raise ValueError("sizes= only combines with within='iid'")
        return within
    else:
        raise ValueError(f"within must be a name, (name, kwargs), a dict or a split callable, "
                         f"got {within!r}")
    if name not in _SPLITS:
        close = difflib.get_close_matches(str(name), list(_SPLITS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"within: unknown within-group split {name!r}{hint}; allowed: "
                         f"{', '.join(_SPLITS)}")
    fields = dataclasses.fields(_SPLIT_SPECS[name])
    allowed = [f.name for f in fields]
    bad = sorted(set(kwargs) - set(allowed))
    if bad:
        raise ValueError(f"within split {name!r} has no option(s) {bad}; allowed: {allowed}")
    need = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in kwargs]
    if need:
        raise ValueError(f"within split {name!r} needs {', '.join(need)}, e.g. "
                         f'within = {{name = "{name}", {need[0]} = ...}}')
    if sizes is not None:
        if name != "iid":
            raise ValueError(f"sizes= only combines with within='iid', not {name!r}")
        kwargs["sizes"] = sizes
    try:
        return _SPLITS[name](**kwargs)
    except ValueError as e:
        raise ValueError(f"within split {name!r}: {e}") from None


# --------------------------------------------------------------------------------------------
# test split and assembly
# --------------------------------------------------------------------------------------------


def _check_test_size(test_size: Any) -> None:
    if test_size is not None and (isinstance(test_size, bool) or
                                  not isinstance(test_size, int | np.integer) or test_size < 1):
        raise ValueError(f"test_size must be an integer >= 1 or None, got {test_size!r}")


def _sample_test(dataset: Dataset, train: Sequence[np.ndarray], rng: np.random.Generator,
                 test_size: int | None) -> list[np.ndarray]:
    """Per-client test rows whose label counts follow the client's train label proportions."""
    k = dataset.num_classes
    c = len(train)
    y_test = np.asarray(dataset.y_test)
    n_test, n_train = len(y_test), len(dataset.y_train)
    if n_test == 0:
        return [np.zeros(0, np.int64) for _ in range(c)]
    n_c = np.array([len(t) for t in train], np.int64)
    if test_size is None:
        m = np.maximum(1, np.rint(n_c * (n_test / n_train))).astype(np.int64)
    else:
        _check_test_size(test_size)
        m = np.full(c, int(test_size), np.int64)
    cat = np.concatenate(train).astype(np.int64)
    counts = np.bincount(np.repeat(np.arange(c), n_c) * k + dataset.y_train[cat],
                         minlength=c * k).reshape(c, k).astype(np.float64)
    n_l = np.bincount(y_test, minlength=k)
    counts *= n_l > 0  # labels absent from the test pool cannot be drawn
    empty = counts.sum(1) == 0
    counts[empty] = n_l  # fall back to the pool's own label mix
    alloc = rng.multinomial(m, counts / counts.sum(1, keepdims=True))
    alloc = np.minimum(alloc, n_l)  # rows of one label stay distinct within a client
    # A random window of the label's shuffled rows per (client, label): distinct within the
    # client, independent offsets across clients, no per-client Python loop.
    order = np.lexsort((rng.random(n_test), y_test))
    start = np.concatenate([[0], np.cumsum(n_l)[:-1]])
    cc, ll = np.nonzero(alloc)
    kk = alloc[cc, ll]
    off = rng.integers(0, n_l[ll])
    rep_l, rep_off = np.repeat(ll, kk), np.repeat(off, kk)
    j = np.arange(kk.sum()) - np.repeat(np.cumsum(kk) - kk, kk)
    rows = order[start[rep_l] + (rep_off + j) % n_l[rep_l]]
    return _split_by_counts(rows, alloc.sum(1))


def _assemble(dataset: Dataset, train: Sequence[np.ndarray], group: np.ndarray,
              rng: np.random.Generator, test_size: int | None, name: str,
              transform: GroupTransform | None = None) -> Partition:
    train = [np.sort(np.asarray(t, np.int64)) for t in train]
    for i, t in enumerate(train):
        if len(t) == 0:  # guarded earlier; kept as a hard invariant
            raise ValueError(f"partition {name!r} left client {i} empty")
    test = _sample_test(dataset, train, rng, test_size)
    return Partition(train=train, test=test, group=np.asarray(group, np.int32),
                     transform=transform, name=name)


# --------------------------------------------------------------------------------------------
# label / quantity skew partitioners (no groups)
# --------------------------------------------------------------------------------------------


def _run_split(dataset: Dataset, num_clients: int, seed: int, split: SplitFn,
               test_size: int | None) -> Partition:
    _check_num_clients(len(dataset.y_train), num_clients)
    rng = np.random.default_rng(seed)
    train = split(np.asarray(dataset.y_train), dataset.num_classes, num_clients, rng)
    return _assemble(dataset, train, np.zeros(num_clients, np.int32), rng, test_size, str(split))


def iid(dataset: Dataset, num_clients: int, *, seed: int, sizes: SizeSpec = None,
        test_size: int | None = None) -> Partition:
    """Uniformly random split: ``num_clients`` clients of sizes differing by at most one.

    ``sizes`` (explicit ints or a size spec such as :class:`QuantitySkew`) overrides the
    sizes; rows beyond ``sum(sizes)`` are left unused. Source: McMahan et al. (2017).
    """
    return _run_split(dataset, num_clients, seed, IIDSplit(sizes), test_size)


def dirichlet(dataset: Dataset, num_clients: int, *, alpha: float, seed: int, min_size: int = 2,
              max_tries: int = 20, top_up: bool = True,
              test_size: int | None = None) -> Partition:
    """Per-class Dirichlet(alpha) label skew (see :class:`DirichletSplit`); group ids all zero.

    Source: Hsu et al. (2019), Measuring the Effects of Non-Identical Data Distribution.
    """
    split = DirichletSplit(alpha, min_size=min_size, max_tries=max_tries, top_up=top_up)
    return _run_split(dataset, num_clients, seed, split, test_size)


def shards(dataset: Dataset, num_clients: int, *, k: int, seed: int,
           test_size: int | None = None) -> Partition:
    """Pathological label skew: ``k`` distinct labels per client (see :class:`ShardSplit`).

    Source: McMahan et al. (2017), Communication-Efficient Learning of Deep Networks.
    """
    return _run_split(dataset, num_clients, seed, ShardSplit(k), test_size)


def quantity_skew(dataset: Dataset, num_clients: int, *, seed: int, dist: str = "lognormal",
                  sigma: float = 1.0, exponent: float = 1.5, min_size: int = 1,
                  test_size: int | None = None) -> Partition:
    """IID labels with heavy-tailed client sizes (see :class:`QuantitySkew`); all rows used.

    Source: Li et al. (2022), Federated Learning on Non-IID Data Silos (quantity skew).
    """
    sizes = QuantitySkew(dist=dist, sigma=sigma, exponent=exponent, min_size=min_size)
    return _run_split(dataset, num_clients, seed, IIDSplit(sizes), test_size)


# --------------------------------------------------------------------------------------------
# grouped partitioners
# --------------------------------------------------------------------------------------------


def _group_sizes(num_clients: int, num_groups: Any, group_sizes: Sequence[int] | None) -> np.ndarray:
    if not isinstance(num_groups, int | np.integer) or not 1 <= num_groups <= num_clients:
        raise ValueError(f"num_groups must be an integer in [1, num_clients={num_clients}], "
                         f"got {num_groups!r}")
    if group_sizes is None:
        return np.full(num_groups, num_clients // num_groups) + (
            np.arange(num_groups) < num_clients % num_groups)
    gs = np.asarray(group_sizes)
    if gs.shape != (num_groups,) or not np.issubdtype(gs.dtype, np.integer):
        raise ValueError(f"group_sizes must list one integer per group (num_groups={num_groups}), "
                         f"got {list(np.ravel(gs))}")
    if gs.min() < 1:
        raise ValueError(f"group_sizes must all be >= 1, got {gs.tolist()}")
    if gs.sum() != num_clients:
        raise ValueError(f"group_sizes must sum to num_clients={num_clients}, got "
                         f"{gs.tolist()} (sum {int(gs.sum())})")
    return gs.astype(np.int64)


def _grouped_train(dataset: Dataset, num_clients: int, num_groups: int,
                   group_sizes: Sequence[int] | None, within: Any, sizes: SizeSpec,
                   rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray, str]:
    """Disjoint group shares of the train rows, each split among its clients by ``within``."""
    y = np.asarray(dataset.y_train)
    n = len(y)
    _check_num_clients(n, num_clients)
    gs = _group_sizes(num_clients, num_groups, group_sizes)
    group = rng.permutation(np.repeat(np.arange(num_groups), gs)).astype(np.int32)
    members = [np.flatnonzero(group == g) for g in range(num_groups)]
    split = _as_split(within, sizes)  # validates within/sizes together
    if sizes is not None and not callable(sizes):
        s = _resolve_sizes(sizes, n, num_clients, rng)
        share = np.array([s[mem].sum() for mem in members])
        splits = [IIDSplit(s[mem]) for mem in members]
        label = "iid(sizes)"
    else:
        share = _apportion(n, gs)
        splits = [split] * num_groups
        label = str(split)
    perm = rng.permutation(n)
    bounds = np.concatenate([[0], np.cumsum(share)])
    train: list[np.ndarray] = [np.zeros(0, np.int64)] * num_clients
    for g, mem in enumerate(members):
        rows = perm[bounds[g]:bounds[g + 1]]
        if len(rows) < len(mem):
            raise ValueError(f"group {g} gets {len(rows)} training examples for {len(mem)} "
                             "clients; use fewer clients")
        parts = splits[g](y[rows], dataset.num_classes, len(mem), rng)
        for c, part in zip(mem, parts, strict=True):
            train[c] = rows[part]
    return train, group, label


def grouped(dataset: Dataset, num_clients: int, *, num_groups: int, seed: int,
            group_sizes: Sequence[int] | None = None, within: Any = "iid",
            sizes: SizeSpec = None, test_size: int | None = None) -> Partition:
    """Groups without a transform: disjoint data shares per group, split by ``within``.

    Only useful as ground truth when ``within`` differs per group elsewhere, or to compose
    by hand; the feature/label shifts are :func:`rotation`, :func:`feature_pattern`,
    :func:`label_permutation`.
    """
    rng = np.random.default_rng(seed)
    train, group, label = _grouped_train(dataset, num_clients, num_groups, group_sizes,
                                         within, sizes, rng)
    return _assemble(dataset, train, group, rng, test_size, f"groups(k={num_groups})+{label}")


def _rotate(x: np.ndarray, g: int) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(x, k=g, axes=(1, 2)))


def _check_rotation_groups(num_groups: Any) -> None:
    if (isinstance(num_groups, bool) or not isinstance(num_groups, int | np.integer)
            or not 1 <= num_groups <= 4):
        raise ValueError(f"num_groups for rotation must be in [1, 4] (exact 90-degree "
                         f"rotations), got {num_groups!r}")


def rotation(dataset: Dataset, num_clients: int, *, num_groups: int = 4, seed: int,
             group_sizes: Sequence[int] | None = None, within: Any = "iid",
             sizes: SizeSpec = None, test_size: int | None = None) -> Partition:
    """Rotated-images feature shift: group ``g`` sees images rotated by ``g * 90`` degrees.

    Exact (``np.rot90`` on the H, W axes of ``[n, H, W, C]``), hence ``1 <= num_groups <= 4``
    (e.g. 2 groups: 0 and 90 degrees); needs square images when a group rotates by 90 or 270.
    Source: Ghosh et al. (2020), An Efficient Framework for Clustered Federated Learning (IFCA).
    """
    shape = dataset.feature_shape
    if len(shape) != 3:
        raise ValueError(f"rotation needs images [n, H, W, C]; {dataset.name!r} has feature "
                         f"shape {shape}")
    _check_rotation_groups(num_groups)
    if num_groups > 1 and shape[0] != shape[1]:
        raise ValueError(f"rotation by 90 degrees needs square images, got H={shape[0]}, "
                         f"W={shape[1]}")
    rng = np.random.default_rng(seed)
    train, group, label = _grouped_train(dataset, num_clients, num_groups, group_sizes,
                                         within, sizes, rng)
    return _assemble(dataset, train, group, rng, test_size,
                     f"rotation(k={num_groups})+{label}", transform=_rotate)


def _box_filter(img: np.ndarray, size: int) -> np.ndarray:
    """Mean over a ``size x size`` window per channel of ``[..., H, W, C]``, same size output.

    Reflect padding, so border pixels are not darkened the way zero padding would.
    """
    pad = size // 2
    widths = [(0, 0)] * (img.ndim - 3) + [(pad, pad), (pad, pad), (0, 0)]
    p = np.pad(img, widths, mode="reflect")
    win = np.lib.stride_tricks.sliding_window_view(p, (size, size), axis=(-3, -2))
    return win.mean(axis=(-2, -1))


def _check_pattern(rms: Any, smooth: Any) -> None:
    if isinstance(rms, bool) or not isinstance(rms, int | float | np.number) or not (
            np.isfinite(rms) and rms > 0):
        raise ValueError(f"rms must be a finite number > 0, got {rms!r}")
    if (isinstance(smooth, bool) or not isinstance(smooth, int | np.integer) or smooth < 1
            or smooth % 2 == 0):
        raise ValueError(f"smooth must be an odd integer >= 1, got {smooth!r}")


def feature_patterns(feature_shape: Sequence[int], num_groups: int, *, rms: float = 0.15,
                     smooth: int = 7, seed: int = 0) -> np.ndarray:
    """``[G, *feature_shape]`` float32 smooth, equidistant additive patterns with RMS ``rms``.

    The patterns are the vertices of a centred regular simplex (``e_g - 1/G``, normalised) in a
    random ``G``-dimensional orthonormal basis of the feature space (QR of a Gaussian
    ``[D, G]``). Each basis vector is box-smoothed (``smooth x smooth`` per channel, reflect
    padding) and the smoothed basis is re-orthonormalised (QR) before mapping the simplex in,
    which is the same as smoothing the patterns, re-centring and re-orthonormalising: the
    result is smooth, pairwise equidistant and zero-mean over groups. Finally every pattern is
    scaled to per-feature RMS ``rms``. For ``G = 1`` the single pattern is one smoothed random
    direction (a simplex of one point would be zero). ``smooth`` must be odd; ``1`` disables
    smoothing (required for non-image features).
    Source: the RND federation-discovery paper's synthetic feature-shift benchmark.
    """
    shape = tuple(int(s) for s in feature_shape)
    d = int(np.prod(shape))
    if not isinstance(num_groups, int | np.integer) or not 1 <= num_groups <= d:
        raise ValueError(f"num_groups must be an integer in [1, D={d}], got {num_groups!r}")
    _check_pattern(rms, smooth)
    if smooth > 1 and len(shape) != 3:
        raise ValueError(f"smooth={smooth} needs image features [H, W, C], got {shape}; "
                         "use smooth=1")
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, num_groups)))[0]  # [D, G]
    if smooth > 1:
        imgs = basis.T.reshape(num_groups, *shape)
        basis = _box_filter(imgs, smooth).reshape(num_groups, d).T
        basis = np.linalg.qr(basis)[0]
    if num_groups == 1:
        simplex = np.ones((1, 1))
    else:
        simplex = np.eye(num_groups) - 1.0 / num_groups
        simplex /= np.linalg.norm(simplex, axis=1, keepdims=True)
    pats = simplex @ basis.T  # [G, D]
    pats *= rms * np.sqrt(d) / np.linalg.norm(pats, axis=1, keepdims=True)
    return pats.reshape(num_groups, *shape).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class _AddPattern:
    patterns: np.ndarray
    clip: bool

    def __call__(self, x: np.ndarray, g: int) -> np.ndarray:
        out = x + self.patterns[g]
        return np.clip(out, 0.0, 1.0) if self.clip else out


def feature_pattern(dataset: Dataset, num_clients: int, *, num_groups: int = 4, seed: int,
                    rms: float = 0.15, smooth: int = 7, clip: bool = True,
                    group_sizes: Sequence[int] | None = None, within: Any = "iid",
                    sizes: SizeSpec = None, test_size: int | None = None) -> Partition:
    """Additive feature shift: group ``g`` sees ``clip(x + pattern_g, 0, 1)``.

    Patterns from :func:`feature_patterns` (equidistant, smooth, RMS ``rms``, seeded by
    ``seed`` only); the transform object exposes them as ``partition.transform.patterns``
    ``[G, *feature_shape]``. ``clip=False`` for non-image data. Source: the RND federation-discovery paper.
    """
    if len(dataset.feature_shape) != 3 and smooth != 1:
        raise ValueError(f"feature_pattern with smooth={smooth} needs images [n, H, W, C]; "
                         f"{dataset.name!r} has feature shape {dataset.feature_shape} "
                         "(pass smooth=1)")
    rng = np.random.default_rng(seed)
    train, group, label = _grouped_train(dataset, num_clients, num_groups, group_sizes,
                                         within, sizes, rng)
    # Seeded by ``seed`` alone, so runs that differ only in num_clients/within share patterns.
    pats = feature_patterns(dataset.feature_shape, num_groups, rms=rms, smooth=smooth, seed=seed)
    return _assemble(dataset, train, group, rng, test_size,
                     f"feature_pattern(k={num_groups},rms={rms:g})+{label}",
                     transform=_AddPattern(pats, clip))


def label_permutation(dataset: Dataset, num_clients: int, *, num_groups: int = 4, seed: int,
                      group_sizes: Sequence[int] | None = None, within: Any = "iid",
                      sizes: SizeSpec = None, test_size: int | None = None) -> Partition:
    """Concept shift: group ``g`` relabels ``y -> perm_g[y]`` (``perm_0`` = identity).

    The permutations travel as ``Partition.label_map`` (``[G, num_classes]``);
    :func:`build_federated` relabels each (row, group) pair it materialises, so a test row
    shared by two groups exists once per group and nothing else is copied. Group permutations
    are distinct when ``num_classes! >= G``. Source: Ghosh et al. (2020), IFCA.
    """
    k = dataset.num_classes
    rng = np.random.default_rng(seed)
    train, group, label = _grouped_train(dataset, num_clients, num_groups, group_sizes,
                                         within, sizes, rng)
    perms = [np.arange(k)]
    while len(perms) < num_groups:
        cand = rng.permutation(k)
        # Re-draw duplicates (bounded: only when k! < G can they not be avoided).
        for _ in range(100):
            if not any(np.array_equal(cand, p) for p in perms):
                break
            cand = rng.permutation(k)
        perms.append(cand)
    part = _assemble(dataset, train, group, rng, test_size,
                     f"label_permutation(k={num_groups})+{label}")
    return dataclasses.replace(part, label_map=np.stack(perms).astype(np.int32))


# --------------------------------------------------------------------------------------------
# per-client Dirichlet mixes and published partition files
# --------------------------------------------------------------------------------------------


def _check_dirichlet_mix(num_clients: int, *, alpha: Any, per_client: Any = None,
                         **_: Any) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
        raise ValueError(f"alpha must be a number > 0, got {alpha!r}")
    if per_client is not None and (isinstance(per_client, bool) or not isinstance(
            per_client, int | np.integer) or per_client < 1):
        raise ValueError(f"per_client must be an integer >= 1 or None, got {per_client!r}")


def dirichlet_mix(dataset: Dataset, num_clients: int, *, alpha: float, seed: int,
                  per_client: int | None = None, test_size: int | None = None) -> Partition:
    """Every client draws its own label mix ``q ~ Dir(alpha)`` and ``floor(per_client * q_k)``
    distinct rows of each class ``k``; rows may repeat *across* clients.

    Each class has a pool of ``n / num_classes`` of its rows (the first ones of a class-sorted
    order, as in the source); a client takes the head of each class pool, and the pool is
    reshuffled after every client, so clients draw independently. ``per_client`` defaults to
    ``n_train // num_clients`` (200 on Fashion-MNIST with 300 clients); flooring makes a client
    hold up to ``num_classes - 1`` rows fewer (about 197 there). This is the generator of the
    NTK-FL / NTK-DFL authors' published Dirichlet partitions (Yue et al., 2021, their code's
    README; Thompson et al., 2025), drawn with numpy's ``Generator`` (same law, other bits);
    their files themselves load through the ``index_file`` partition. Unlike ``dirichlet``,
    every client has the same expected size and the label skew is per client, not per class.
    """
    _check_dirichlet_mix(num_clients, alpha=alpha, per_client=per_client)
    y = np.asarray(dataset.y_train)
    k = dataset.num_classes
    _check_num_clients(len(y), num_clients)
    size = len(y) // num_clients if per_client is None else int(per_client)
    per_class = len(y) // k
    order = np.argsort(y, kind="stable")
    counts = np.bincount(y, minlength=k)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rng = np.random.default_rng(seed)
    # The source keeps n / K rows per class: exact for balanced sets (Fashion-MNIST), a cap
    # at the class's own count for unbalanced ones.
    pools = [rng.permutation(order[starts[c]:starts[c] + min(per_class, counts[c])])
             for c in range(k)]
    train = []
    for _ in range(num_clients):
        want = np.floor(size * rng.dirichlet(np.full(k, float(alpha)))).astype(np.int64)
        want = np.minimum(want, [len(q) for q in pools])
        if want.sum() == 0:  # only for per_client < num_classes: keep the client non-empty
            want[int(np.argmax([len(q) for q in pools]))] = 1
        train.append(np.concatenate([pools[c][:want[c]] for c in range(k)]))
        for c in range(k):
            if want[c]:
                pools[c] = rng.permutation(pools[c])
    return _assemble(dataset, train, np.zeros(num_clients, np.int32), rng, test_size,
                     f"dirichlet_mix(alpha={alpha:g}, per_client={size})")


def _check_index_file(num_clients: int, *, path: Any, **_: Any) -> None:
    from fedrnd.data.index_files import INDEX_SUFFIXES

    if not isinstance(path, str) or not path:
        raise ValueError(f"path must be the file name of a client index map, got {path!r}")
    if Path(path).suffix.lower() not in INDEX_SUFFIXES:
        raise ValueError(f"path {path!r} has an unknown type; allowed endings: "
                         f"{', '.join(INDEX_SUFFIXES)}")
    if not Path(path).is_file():
        raise ValueError(f"path {path!r}: no such file")


def index_file(dataset: Dataset, num_clients: int | None = None, *, path: str, seed: int,
               test_size: int | None = None) -> Partition:
    """Clients read from a published partition file: ``{client id: rows of x_train}``.

    Formats (``.json``, ``.npz``, ``.npy``, pickled ``.dat``/``.pkl`` read without running
    code) are those of :func:`fedrnd.data.index_files.read_index_map`; clients come in the
    order of their ids and ``num_clients`` takes the first ones (``None``: all). Rows may repeat
    across clients (the NTK-DFL authors' files do), never within one. Test rows are drawn from
    each client's label mix as for every partitioner (``seed``). Group ids are all zero.
    """
    from fedrnd.data.index_files import read_index_map

    _check_index_file(num_clients or 1, path=path)
    clients = read_index_map(path)
    if num_clients is None:
        num_clients = len(clients)
    if (isinstance(num_clients, bool) or not isinstance(num_clients, int | np.integer)
            or not 1 <= num_clients <= len(clients)):
        raise ValueError(f"num_clients must be in [1, {len(clients)}] (the clients in "
                         f"{path!r}; data.num_clients in a config), got {num_clients!r}")
    n = len(dataset.y_train)
    train = clients[:num_clients]
    for c, rows in enumerate(train):
        if rows.min() < 0 or rows.max() >= n:
            raise ValueError(f"path {path!r}: client {c} names row {int(rows.max())} or "
                             f"{int(rows.min())}, outside the {n} training rows of "
                             f"{dataset.name!r}")
        if len(np.unique(rows)) != len(rows):
            raise ValueError(f"path {path!r}: client {c} lists a row twice")
    rng = np.random.default_rng(seed)
    return _assemble(dataset, train, np.zeros(num_clients, np.int32), rng, test_size,
                     f"index_file({Path(path).name})")


# --------------------------------------------------------------------------------------------
# natural
# --------------------------------------------------------------------------------------------


def natural(dataset: Dataset, num_clients: int | None = None, *, seed: int) -> Partition:
    """The generator's own clients (``Dataset.train_client``/``test_client``).

    ``num_clients=None`` or the natural count keeps all of them; fewer picks a random subset
    (by ``seed``). Groups come from ``Dataset.client_group`` (zeros if absent). Test rows are
    the client's own natural test rows. Source: LEAF, Caldas et al. (2018).
    """
    if dataset.train_client is None or dataset.test_client is None:
        raise ValueError(f"natural partition needs a data set with natural clients "
                         f"(train_client/test_client); {dataset.name!r} has none. Use a "
                         "generator such as synthetic or gaussian_mixture, or a LEAF source "
                         "(femnist, shakespeare)")
    tr_c = np.asarray(dataset.train_client, np.int64)
    te_c = np.asarray(dataset.test_client, np.int64)
    total = int(max(tr_c.max(initial=-1), te_c.max(initial=-1)) + 1)
    if dataset.client_group is not None:
        total = max(total, len(dataset.client_group))
    if num_clients is None:
        num_clients = total
    if not isinstance(num_clients, int | np.integer) or not 1 <= num_clients <= total:
        raise ValueError(f"num_clients must be in [1, {total}] (the natural clients of "
                         f"{dataset.name!r}; data.num_clients in a config), got {num_clients!r}")
    rng = np.random.default_rng(seed)
    chosen = (np.arange(total) if num_clients == total
              else np.sort(rng.choice(total, num_clients, replace=False)))
    by_tr = _split_by_counts(np.argsort(tr_c, kind="stable"), np.bincount(tr_c, minlength=total))
    by_te = _split_by_counts(np.argsort(te_c, kind="stable"), np.bincount(te_c, minlength=total))
    train = [by_tr[c] for c in chosen]
    for c, t in zip(chosen, train, strict=True):
        if len(t) == 0:
            raise ValueError(f"natural client {c} of {dataset.name!r} has no training examples")
    group = (np.zeros(num_clients, np.int32) if dataset.client_group is None
             else np.asarray(dataset.client_group, np.int32)[chosen])
    return Partition(train=train, test=[by_te[c] for c in chosen], group=group,
                     name="natural")


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------

PARTITIONS: dict[str, Callable[..., Partition]] = {}
"""Partitioners by name, each returning a :class:`Partition`; filled by
:func:`register_partition` (the built-ins below use it too)."""


@dataclasses.dataclass(frozen=True)
class PartitionInfo:
    """What a run needs to know about a partitioner besides its signature.

    ``grouped``: clients belong to ground-truth groups that their data differs by (the
    ``num_groups`` option, if any, is their number ``K``, e.g. for a method's number of
    clusters in ``fedrnd compare``). ``labels_only``: the groups differ in their labels only
    (the inputs are alike), so a method that looks at client inputs alone cannot tell them
    apart: a negative control for such methods. ``check(num_clients, **options)``: a cheap
    check of the options before any data is loaded (``ValueError`` whose message starts with
    the option at fault); the partitioner itself checks the rest.
    """

    grouped: bool = False
    labels_only: bool = False
    check: Callable[..., None] | None = None


PARTITION_INFO: dict[str, PartitionInfo] = {}
"""The :class:`PartitionInfo` of every registered partitioner, by name."""

_SUPPLIED = ("dataset", "num_clients", "seed")
"""Partitioner arguments that a run supplies itself (never ``partition_options``)."""

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")

def register_partition(name: str | Callable[..., Partition] | None = None,
                       fn: Callable[..., Partition] | None = None, *, grouped: bool = False,
                       labels_only: bool = False, check: Callable[..., None] | None = None,
                       replace: bool = False) -> Any:
    """Add a partitioner to :data:`PARTITIONS` (and its :class:`PartitionInfo`).

    ``register_partition("name", fn)``, or as a decorator: ``@register_partition("name",
    grouped=True)`` (``@register_partition`` alone takes the function's own name). ``fn`` has
    the signature ``(dataset, num_clients, *, seed, **options) -> Partition``; its keyword
    options are ``data.partition_options``, validated against the signature like a built-in's.
    A name that exists raises ``ValueError`` unless ``replace=True``.
    """
    if callable(name):
        return register_partition(None, name, grouped=grouped, labels_only=labels_only,
                                  check=check, replace=replace)
    if fn is None:
        return lambda f: register_partition(name, f, grouped=grouped, labels_only=labels_only,
                                            check=check, replace=replace)
    key = fn.__name__ if name is None else name
    if not isinstance(key, str) or not _NAME.fullmatch(key):
        raise ValueError(f"a partition name must be letters, digits, _ . + -; got {key!r}")
    params = list(inspect.signature(fn).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2 or "seed" not in {p.name for p in params}:
        # The run calls fn(dataset, num_clients, seed=seed, **options); validation skips
        # these three by name, so any other spelling would surface as a required option.
        raise TypeError(f"partition {key!r}: {getattr(fn, '__qualname__', fn)} must take "
                        "(dataset, num_clients, *, seed, **options)")
    if key in PARTITIONS and PARTITIONS[key] is not fn and not replace:
        raise ValueError(f"partition {key!r} is already registered; choose another name, or "
                         "pass replace=True to replace it")
    PARTITIONS[key] = fn
    PARTITION_INFO[key] = PartitionInfo(grouped, labels_only, check)
    return fn


def partition_info(name: str) -> PartitionInfo:
    """The :class:`PartitionInfo` of a registered partitioner."""
    if name not in PARTITIONS:
        raise _unknown_partition(name)
    return PARTITION_INFO.get(name, PartitionInfo())


def _unknown_partition(name: str) -> ValueError:
    close = difflib.get_close_matches(str(name), list(PARTITIONS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"data.partition={name!r} is unknown{hint}; allowed: "
                      f"{', '.join(PARTITIONS)}")


def partition_parameters(name: str) -> dict[str, inspect.Parameter]:
    """The options a partitioner takes (``data.partition_options``), with their defaults."""
    if name not in PARTITIONS:
        raise _unknown_partition(name)
    return {k: p for k, p in inspect.signature(PARTITIONS[name]).parameters.items()
            if k not in _SUPPLIED}


def check_partition_options(name: str, num_clients: int, options: Mapping[str, Any]) -> None:
    """Check a partitioner's options for ``num_clients`` clients without any data.

    Raises ``ValueError`` (the message starts with the option's name where one is at fault)
    for what can be told before the data set is loaded; the partitioner itself checks the
    rest (e.g. ``k`` against the number of classes).
    """
    params = partition_parameters(name)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    bad = sorted(set(options) - set(params))
    if bad and not takes_any:
        raise ValueError(f"unknown option(s) {bad}; allowed: {', '.join(params)}")
    need = [k for k, p in params.items() if p.default is p.empty and k not in options
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if need:
        raise ValueError(f"{need[0]} is required by partition {name!r}")
    kw = {k: p.default for k, p in params.items() if p.default is not p.empty} | dict(options)
    if "test_size" in params:
        _check_test_size(kw.get("test_size"))
    # Explicit sizes are checked against the client count; their sum needs the data.
    sizes = kw.get("sizes") if "sizes" in params else None
    if sizes is not None and not callable(sizes):
        _resolve_sizes(sizes, np.iinfo(np.int64).max, num_clients, np.random.default_rng(0))
    check = partition_info(name).check
    if check is not None:
        check(num_clients, **kw)


def _check_dirichlet(num_clients: int, *, alpha: Any, min_size: Any, max_tries: Any,
                     top_up: Any, **_: Any) -> None:
    DirichletSplit(alpha, min_size=min_size, max_tries=max_tries, top_up=top_up)


def _check_shards(num_clients: int, *, k: Any, **_: Any) -> None:
    _check_k(k)


def _check_quantity_skew(num_clients: int, *, dist: Any, sigma: Any, exponent: Any,
                         min_size: Any, **_: Any) -> None:
    QuantitySkew(dist=dist, sigma=sigma, exponent=exponent, min_size=min_size)


def _check_grouped(num_clients: int, *, num_groups: Any, group_sizes: Any, within: Any,
                   sizes: Any = None, **_: Any) -> None:
    _group_sizes(num_clients, num_groups, group_sizes)
    _as_split(within, sizes)


def _check_rotation(num_clients: int, **kw: Any) -> None:
    _check_rotation_groups(kw["num_groups"])
    _check_grouped(num_clients, **kw)


def _check_feature_pattern(num_clients: int, **kw: Any) -> None:
    _check_pattern(kw["rms"], kw["smooth"])
    _check_grouped(num_clients, **kw)


register_partition("iid", iid)
register_partition("dirichlet", dirichlet, check=_check_dirichlet)
register_partition("shards", shards, check=_check_shards)
register_partition("quantity_skew", quantity_skew, check=_check_quantity_skew)
register_partition("grouped", grouped, grouped=True, check=_check_grouped)
register_partition("rotation", rotation, grouped=True, check=_check_rotation)
register_partition("feature_pattern", feature_pattern, grouped=True,
                   check=_check_feature_pattern)
register_partition("label_permutation", label_permutation, grouped=True, labels_only=True,
                   check=_check_grouped)
register_partition("natural", natural)
register_partition("dirichlet_mix", dirichlet_mix, check=_check_dirichlet_mix)
register_partition("index_file", index_file, check=_check_index_file)


def make_partition(name: str, dataset: Dataset, num_clients: int, seed: int,
                   **kwargs) -> Partition:
    """Run the partitioner ``name`` (a key of :data:`PARTITIONS`)."""
    if name not in PARTITIONS:
        raise _unknown_partition(name)
    try:
        return PARTITIONS[name](dataset, num_clients, seed=seed, **kwargs)
    except TypeError as e:
        raise ValueError(f"bad options for partition {name!r}: {e}") from None
