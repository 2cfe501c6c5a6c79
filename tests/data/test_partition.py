"""Partitioners: disjointness, sizes, skew strength, group transforms, test splits, errors."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fedrnd.data import Dataset, build_federated
from fedrnd.data.partition import (
    DirichletSplit,
    QuantitySkew,
    dirichlet,
    feature_pattern,
    feature_patterns,
    grouped,
    iid,
    label_permutation,
    make_partition,
    natural,
    quantity_skew,
    rotation,
    shards,
)
from fedrnd.data.sources import digits, gaussian_mixture, synthetic


@pytest.fixture(scope="module")
def dg() -> Dataset:
    return digits()


def toy(n_train=2000, n_test=5000, k=10, shape=(2,), seed=0) -> Dataset:
    """Balanced labels, cheap features, a large test pool (label proportions are measurable)."""
    rng = np.random.default_rng(seed)
    y_tr = (np.arange(n_train) % k).astype(np.int32)
    y_te = (np.arange(n_test) % k).astype(np.int32)
    return Dataset(rng.random((n_train, *shape), dtype=np.float32), rng.permutation(y_tr),
                   rng.random((n_test, *shape), dtype=np.float32), y_te, k, "toy")


def label_hist(ds: Dataset, rows, test=False) -> np.ndarray:
    y = ds.y_test if test else ds.y_train
    return np.bincount(y[rows], minlength=ds.num_classes)


def assert_disjoint(part, n, all_used: bool):
    cat = np.concatenate(part.train)
    assert len(np.unique(cat)) == len(cat), "a train row is given to two clients"
    assert cat.min() >= 0 and cat.max() < n
    if all_used:
        assert len(cat) == n, "some train rows are unused"


# ---------------------------------------------------------------------------------- iid


def test_iid_uses_every_row_once_and_balances_sizes(dg):
    p = iid(dg, 10, seed=0)
    n = len(dg.y_train)
    assert_disjoint(p, n, all_used=True)
    sizes = np.array([len(t) for t in p.train])
    assert sizes.max() - sizes.min() <= 1
    np.testing.assert_array_equal(p.group, 0)
    # Default test size follows the source's test/train ratio (450/1347), min 1.
    want = np.maximum(1, np.rint(sizes * len(dg.y_test) / n))
    np.testing.assert_array_equal([len(t) for t in p.test], want)
    assert p.transform is None and p.num_clients == 10
    q = iid(dg, 10, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(p.train, q.train, strict=True))


def test_iid_explicit_sizes_and_test_size(dg):
    p = iid(dg, 3, seed=1, sizes=[5, 10, 400], test_size=7)
    assert [len(t) for t in p.train] == [5, 10, 400]
    assert [len(t) for t in p.test] == [7, 7, 7]
    assert_disjoint(p, len(dg.y_train), all_used=False)
    with pytest.raises(ValueError, match="sizes sum to"):
        iid(dg, 2, seed=0, sizes=[1000, 1000])
    with pytest.raises(ValueError, match="sizes must all be >= 1"):
        iid(dg, 2, seed=0, sizes=[0, 5])
    with pytest.raises(ValueError, match="one integer per client"):
        iid(dg, 3, seed=0, sizes=[1, 2])
    with pytest.raises(ValueError, match="test_size"):
        iid(dg, 3, seed=0, test_size=0)


def test_one_int_size_gives_every_client_that_many_rows(dg):
    p = iid(dg, 6, seed=0, sizes=50)
    assert [len(t) for t in p.train] == [50] * 6
    assert_disjoint(p, len(dg.y_train), all_used=False)
    # Grouped partitions too (IFCA's rotated setting: a fixed number of images per client).
    r = rotation(dg, 8, num_groups=4, seed=0, sizes=np.int64(30))
    assert [len(t) for t in r.train] == [30] * 8
    assert_disjoint(r, len(dg.y_train), all_used=False)
    with pytest.raises(ValueError, match="sizes sum to"):
        iid(dg, 2, seed=0, sizes=1000)
    with pytest.raises(ValueError, match="sizes must all be >= 1"):
        iid(dg, 2, seed=0, sizes=0)


# ----------------------------------------------------------------------------- dirichlet


def test_dirichlet_disjoint_min_size_and_concentration(dg):
    def mean_top_share(alpha):
        p = dirichlet(dg, 10, alpha=alpha, seed=0)
        assert_disjoint(p, len(dg.y_train), all_used=True)
        assert min(len(t) for t in p.train) >= 2
        h = np.stack([label_hist(dg, t) for t in p.train])
        return (h.max(1) / h.sum(1)).mean()

    tiny, large = mean_top_share(0.01), mean_top_share(1000.0)
    assert tiny > 0.8, tiny  # nearly one label per client
    assert large < 0.2, large  # near uniform (uniform = 0.1)


def test_dirichlet_many_clients_fast_and_topped_up():
    d = toy(n_train=60000, n_test=100, shape=(1,))
    t0 = time.perf_counter()
    p = dirichlet(d, 10_000, alpha=0.5, seed=0, min_size=2)
    assert time.perf_counter() - t0 < 3.0
    sizes = np.array([len(t) for t in p.train])
    assert sizes.min() >= 2 and sizes.sum() == 60000
    assert_disjoint(p, 60000, all_used=True)
    # Without the top-up, 10k clients on 60k rows cannot all reach min_size.
    with pytest.raises(ValueError, match="min_size=2"):
        dirichlet(d, 10_000, alpha=0.5, seed=0, max_tries=2, top_up=False)


def test_dirichlet_validation(dg):
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="alpha must be > 0"):
            dirichlet(dg, 5, alpha=bad, seed=0)
    with pytest.raises(ValueError, match="min_size"):
        dirichlet(dg, 1000, alpha=1.0, seed=0, min_size=2)


# -------------------------------------------------------------------------------- shards


@pytest.mark.parametrize("k", [1, 2, 3, 10])
def test_shards_k_labels_per_client(dg, k):
    p = shards(dg, 20, k=k, seed=0)
    assert_disjoint(p, len(dg.y_train), all_used=True)
    for t in p.train:
        assert (label_hist(dg, t) > 0).sum() == k
    sizes = np.array([len(t) for t in p.train])
    assert sizes.max() <= 2 * sizes.min()


def test_shards_validation(dg):
    for bad in (0, 11):
        with pytest.raises(ValueError, match=r"k \(labels per client\) must be in \[1, num_classes=10\]"):
            shards(dg, 5, k=bad, seed=0)
    with pytest.raises(ValueError, match="num_clients\\*k"):
        shards(dg, 1000, k=2, seed=0)


# ------------------------------------------------------------------------- quantity skew


@pytest.mark.parametrize("kw", [dict(dist="lognormal", sigma=1.5),
                                dict(dist="powerlaw", exponent=1.0)])
def test_quantity_skew_sizes(dg, kw):
    p = quantity_skew(dg, 50, seed=0, min_size=3, **kw)
    sizes = np.array([len(t) for t in p.train])
    assert_disjoint(p, len(dg.y_train), all_used=True)
    assert sizes.min() >= 3
    assert sizes.max() / np.median(sizes) > 3  # heavy tail, unlike iid
    s = QuantitySkew(**kw)(1000, 20, np.random.default_rng(0))
    assert s.sum() == 1000 and s.min() >= 1 and len(s) == 20


def test_quantity_skew_validation(dg):
    with pytest.raises(ValueError, match="dist must be 'lognormal' or 'powerlaw'"):
        quantity_skew(dg, 5, seed=0, dist="zipf")
    with pytest.raises(ValueError, match="min_size=2"):
        quantity_skew(dg, 1000, seed=0, min_size=2)


def test_sizes_spec_composes_with_groups(dg):
    p = rotation(dg, 12, num_groups=3, seed=0, sizes=QuantitySkew(sigma=1.5))
    assert_disjoint(p, len(dg.y_train), all_used=True)
    sizes = np.array([len(t) for t in p.train])
    assert sizes.max() / np.median(sizes) > 2
    q = grouped(dg, 4, num_groups=2, seed=0, sizes=[10, 20, 30, 40])
    assert [len(t) for t in q.train] == [10, 20, 30, 40]
    with pytest.raises(ValueError, match="sizes= only combines with within='iid'"):
        grouped(dg, 4, num_groups=2, seed=0, sizes=[1, 1, 1, 1], within=("dirichlet", {"alpha": 1}))


# ------------------------------------------------------------------------------ groups


def test_group_ids_match_group_sizes_and_shares_are_disjoint(dg):
    p = grouped(dg, 10, num_groups=3, group_sizes=[2, 3, 5], seed=0)
    np.testing.assert_array_equal(np.bincount(p.group, minlength=3), [2, 3, 5])
    assert_disjoint(p, len(dg.y_train), all_used=True)
    # Group data share is proportional to its number of clients.
    share = np.array([sum(len(p.train[c]) for c in np.flatnonzero(p.group == g)) for g in range(3)])
    np.testing.assert_allclose(share / share.sum(), [0.2, 0.3, 0.5], atol=0.01)
    q = grouped(dg, 7, num_groups=3, seed=0)
    assert sorted(np.bincount(q.group).tolist()) == [2, 2, 3]


@pytest.mark.parametrize("fn", [grouped, rotation, feature_pattern])
def test_group_validation(dg, fn):
    with pytest.raises(ValueError, match=r"num_groups must be .*in \[1, num_clients=3\]"):
        fn(dg, 3, num_groups=4, seed=0)
    with pytest.raises(ValueError, match="num_groups"):
        fn(dg, 4, num_groups=0, seed=0)
    with pytest.raises(ValueError, match=r"group_sizes must sum to num_clients=6, got \[1, 2, 2\]"):
        fn(dg, 6, num_groups=3, group_sizes=[1, 2, 2], seed=0)
    with pytest.raises(ValueError, match="one integer per group"):
        fn(dg, 6, num_groups=3, group_sizes=[3, 3], seed=0)
    with pytest.raises(ValueError, match="group_sizes must all be >= 1"):
        fn(dg, 6, num_groups=3, group_sizes=[0, 3, 3], seed=0)


def test_rotation_matches_rot90_after_build(dg):
    p = rotation(dg, 8, num_groups=4, seed=0)
    np.testing.assert_array_equal(np.bincount(p.group), [2, 2, 2, 2])
    f = build_federated(dg, p)
    x, y = np.asarray(f.x), np.asarray(f.y)
    for c in range(8):
        n = int(f.train_count[c])
        rows = np.asarray(f.train_idx[c, :n])
        ref = np.rot90(dg.x_train[p.train[c]], k=int(p.group[c]), axes=(1, 2))
        np.testing.assert_array_equal(x[rows], ref)
        np.testing.assert_array_equal(y[rows], dg.y_train[p.train[c]])
        t = int(f.test_count[c])
        trow = np.asarray(f.test_idx[c, :t])
        np.testing.assert_array_equal(
            x[trow], np.rot90(dg.x_test[p.test[c]], k=int(p.group[c]), axes=(1, 2)))


def test_rotation_validation(dg):
    with pytest.raises(ValueError, match=r"num_groups for rotation must be in \[1, 4\]"):
        rotation(dg, 10, num_groups=5, seed=0)
    rect = Dataset(np.zeros((20, 4, 6, 1), np.float32), np.zeros(20, np.int32),
                   np.zeros((5, 4, 6, 1), np.float32), np.zeros(5, np.int32), 1, "rect")
    with pytest.raises(ValueError, match="square images"):
        rotation(rect, 4, num_groups=2, seed=0)
    with pytest.raises(ValueError, match="needs images"):
        rotation(toy(), 4, seed=0)


def test_groups_times_within_dirichlet(dg):
    p = rotation(dg, 12, num_groups=3, seed=0, within=("dirichlet", {"alpha": 0.01}))
    assert p.name == "rotation(k=3)+dirichlet(alpha=0.01)"
    assert_disjoint(p, len(dg.y_train), all_used=True)

    def class_concentration(part):  # share of each (group, class) held by its top client
        out = []
        for g in range(3):
            h = np.stack([label_hist(dg, part.train[c]) for c in np.flatnonzero(part.group == g)])
            out.append(h.max(0) / h.sum(0))
        return np.mean(out)
    assert class_concentration(p) > 0.9
    assert class_concentration(rotation(dg, 12, num_groups=3, seed=0)) < 0.5
    q = feature_pattern(dg, 12, num_groups=2, seed=0, within={"name": "shards", "k": 2})
    for t in q.train:
        assert (label_hist(dg, t) > 0).sum() == 2
    r = grouped(dg, 6, num_groups=2, seed=0, within=DirichletSplit(alpha=1000.0))
    assert_disjoint(r, len(dg.y_train), all_used=True)
    with pytest.raises(ValueError, match="unknown within-group split 'zipf'"):
        grouped(dg, 6, num_groups=2, seed=0, within="zipf")


def test_feature_patterns_equidistant_rms_and_smooth():
    for g in (2, 3, 4, 7):
        pats = feature_patterns((8, 8, 1), g, rms=0.15, smooth=7, seed=g)
        assert pats.shape == (g, 8, 8, 1) and pats.dtype == np.float32
        flat = pats.reshape(g, -1).astype(np.float64)
        np.testing.assert_allclose(np.sqrt((flat ** 2).mean(1)), 0.15, rtol=1e-5)
        dist = np.sqrt(((flat[:, None] - flat[None]) ** 2).sum(-1))[np.triu_indices(g, 1)]
        np.testing.assert_allclose(dist, dist.mean(), rtol=1e-5)
        np.testing.assert_allclose(flat.sum(0), 0.0, atol=1e-5)  # centred simplex

    def roughness(p):  # mean squared neighbour difference relative to the energy
        return (np.diff(p, axis=1) ** 2).mean() / (p ** 2).mean()
    smooth = feature_patterns((28, 28, 1), 4, smooth=7, seed=0)
    raw = feature_patterns((28, 28, 1), 4, smooth=1, seed=0)
    assert roughness(smooth) < 0.2 * roughness(raw)
    one = feature_patterns((8, 8, 3), 1, rms=0.1, seed=0)
    np.testing.assert_allclose(np.sqrt((one.astype(np.float64) ** 2).mean()), 0.1, rtol=1e-5)
    with pytest.raises(ValueError, match="smooth must be an odd integer"):
        feature_patterns((8, 8, 1), 2, smooth=4)


def test_feature_pattern_transform_after_build(dg):
    p = feature_pattern(dg, 6, num_groups=3, seed=0, rms=0.2)
    pats = p.transform.patterns
    f = build_federated(dg, p)
    x = np.asarray(f.x)
    for c in range(6):
        rows = np.asarray(f.train_idx[c, : int(f.train_count[c])])
        ref = np.clip(dg.x_train[p.train[c]] + pats[p.group[c]], 0, 1)
        np.testing.assert_allclose(x[rows], ref, atol=1e-6)
    vec = toy()
    with pytest.raises(ValueError, match="smooth=1"):
        feature_pattern(vec, 4, num_groups=2, seed=0)
    q = feature_pattern(vec, 4, num_groups=2, seed=0, smooth=1, clip=False)
    assert q.transform(vec.x_train[:3], 1).shape == (3, 2)


def test_label_permutation_relabels_per_group(dg):
    p = label_permutation(dg, 8, num_groups=4, seed=0)
    assert_disjoint(p, len(dg.y_train), all_used=True)
    lm = p.label_map
    assert lm.shape == (4, 10)
    np.testing.assert_array_equal(lm[0], np.arange(10))  # group 0 keeps the original labels
    for g in range(1, 4):
        assert sorted(lm[g]) == list(range(10)) and list(lm[g]) != list(range(10))
    assert len({tuple(r) for r in lm}) == 4  # distinct permutations
    f = build_federated(dg, p)
    x, y = np.asarray(f.x), np.asarray(f.y)
    for c in range(8):
        g = int(p.group[c])
        n, t = int(f.train_count[c]), int(f.test_count[c])
        rows = np.asarray(f.train_idx[c, :n])
        # Features untouched, labels mapped by the client's group permutation (plain reference).
        np.testing.assert_array_equal(x[rows], dg.x_train[p.train[c]])
        np.testing.assert_array_equal(y[rows], [lm[g][v] for v in dg.y_train[p.train[c]]])
        trows = np.asarray(f.test_idx[c, :t])
        np.testing.assert_array_equal(y[trows], [lm[g][v] for v in dg.y_test[p.test[c]]])
    # A test row shared by clients of two groups is stored once per group, nothing more.
    used = {(int(p.group[c]), int(r)) for c in range(8) for r in p.test[c]}
    used |= {(int(p.group[c]), int(r) + 10**6) for c in range(8) for r in p.train[c]}
    assert f.x.shape[0] == len(used)


# ---------------------------------------------------------------------------- test split


def test_test_split_follows_client_label_proportions():
    d = toy(n_train=3000, n_test=20000)
    p = dirichlet(d, 10, alpha=0.3, seed=0, test_size=400)
    for tr, te in zip(p.train, p.test, strict=True):
        assert len(te) == 400 and len(np.unique(te)) == 400  # distinct within the client
        a = label_hist(d, tr) / len(tr)
        b = label_hist(d, te, test=True) / len(te)
        assert 0.5 * np.abs(a - b).sum() < 0.1  # total variation, multinomial noise ~0.03
    # Labels a client has no train example of never appear in its test split.
    for tr, te in zip(p.train, p.test, strict=True):
        missing = label_hist(d, tr) == 0
        assert label_hist(d, te, test=True)[missing].sum() == 0


# ------------------------------------------------------------------------------- natural


def test_natural_partition_synthetic_and_mixture():
    s = synthetic(num_clients=6, dim=5, num_classes=3, seed=0)
    p = natural(s, seed=0)
    assert p.num_clients == 6
    for c in range(6):
        np.testing.assert_array_equal(np.sort(p.train[c]), np.flatnonzero(s.train_client == c))
        np.testing.assert_array_equal(np.sort(p.test[c]), np.flatnonzero(s.test_client == c))
    np.testing.assert_array_equal(p.group, 0)
    g = gaussian_mixture(num_groups=3, num_clients=9, samples_per_client=20, seed=0)
    q = natural(g, 4, seed=1)
    assert q.num_clients == 4
    chosen = [int(np.unique(g.train_client[t])[0]) for t in q.train]
    np.testing.assert_array_equal(q.group, g.client_group[chosen])
    build_federated(g, q)
    with pytest.raises(ValueError, match=r"num_clients must be in \[1, 9\]"):
        natural(g, 10, seed=0)
    with pytest.raises(ValueError, match="natural clients"):
        natural(digits(), 5, seed=0)


# ----------------------------------------------------------------------- common errors


@pytest.mark.parametrize("name,kw", [("iid", {}), ("dirichlet", {"alpha": 1.0}),
                                     ("shards", {"k": 2}), ("quantity_skew", {}),
                                     ("rotation", {}), ("feature_pattern", {})])
def test_num_clients_validation(dg, name, kw):
    with pytest.raises(ValueError, match="num_clients must be an integer >= 1, got 0"):
        make_partition(name, dg, 0, 0, **kw)
    with pytest.raises(ValueError, match=r"fewer training examples \(1347\) than clients"):
        make_partition(name, dg, 2000, 0, **kw)


def test_registry(dg):
    assert make_partition("shards", dg, 5, 0, k=2).name == "shards(k=2)"
    with pytest.raises(ValueError, match="'zipf' is unknown; allowed: iid, dirichlet"):
        make_partition("zipf", dg, 5, 0)
    with pytest.raises(ValueError, match="bad options for partition 'iid'"):
        make_partition("iid", dg, 5, 0, alpha=1.0)
    assert make_partition("label_permutation", dg, 6, 0, num_groups=2).label_map.shape == (2, 10)
