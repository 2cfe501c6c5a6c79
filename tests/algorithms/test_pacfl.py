"""PACFL (Vahidian et al.): client subspaces and principal-angle proximity against numpy/scipy
references, hierarchical clustering, recovery of known groups, FedAvg per cluster, ledger,
options and errors, and a run through the driver."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from sklearn.metrics import adjusted_rand_score

from fedrnd.algorithms import ALGORITHMS, PACFL, FedAvg, make_algorithm
from fedrnd.algorithms.pacfl import cluster_clients, proximity_matrix, subspaces
from fedrnd.data import Dataset, FederatedData, Partition, build_federated
from fedrnd.engine import ClientMapper, ClientOptimizer, Engine, LocalSpec, client_hparams
from fedrnd.models import make_model

D, L = 16, 3


def subspace_data(groups, counts, *, label_shift=False, noise=0.02, seed=0,
                  shape=(D,)) -> FederatedData:
    """Class ``k`` lives in its own 2-dim subspace ``S_k``. Groups differ by a random rotation
    of the feature space, or (``label_shift``) only by a permutation of the labels."""
    rng = np.random.default_rng(seed)
    d = int(np.prod(shape))
    bases = [np.linalg.qr(rng.normal(size=(d, 2)))[0] for _ in range(L)]
    groups = np.asarray(groups, np.int32)
    ng = int(groups.max()) + 1
    rot = [np.eye(d)] + [np.linalg.qr(rng.normal(size=(d, d)))[0] for _ in range(ng - 1)]
    perms = [np.arange(L)] + [np.roll(np.arange(L), g) for g in range(1, ng)]

    def draw(g, n):
        k = rng.integers(0, L, n)
        x = np.stack([bases[c] @ rng.normal(size=2) * 3 for c in k])
        x = x + noise * rng.normal(size=x.shape)
        if label_shift:
            return x, perms[g][k]
        return x @ rot[g].T, k

    xs, ys, xt, yt, tr, te = [], [], [], [], [], []
    off = off_t = 0
    for c, g in enumerate(groups):
        x, y = draw(g, counts[c])
        xs.append(x)
        ys.append(y)
        tr.append(np.arange(off, off + counts[c]))
        off += counts[c]
        x, y = draw(g, 4)
        xt.append(x)
        yt.append(y)
        te.append(np.arange(off_t, off_t + 4))
        off_t += 4
    cat = lambda a: np.concatenate(a).astype(np.float32).reshape(-1, *shape)  # noqa: E731
    ds = Dataset(cat(xs), np.concatenate(ys).astype(np.int32), cat(xt),
                 np.concatenate(yt).astype(np.int32), L, "subspaces")
    return build_federated(ds, Partition(tr, te, groups))


def _client_rows(data: FederatedData, c: int):
    idx = np.asarray(data.train_idx[c, : int(data.train_count[c])])
    x = np.asarray(data.x)[idx].reshape(len(idx), -1).astype(np.float64)
    return x, np.asarray(data.y)[idx]


def _numpy_basis(x: np.ndarray, p: int) -> np.ndarray:
    """Top-p left singular vectors (columns) of the features x samples matrix ``x.T``."""
    if len(x) == 0:
        return np.zeros((x.shape[1], 0))
    u, s, _ = np.linalg.svd(x.T, full_matrices=False)
    rank = np.linalg.matrix_rank(x.T)
    return u[:, : min(p, rank)]


def _numpy_bases(data, p, basis):
    out = []
    for c in range(data.num_clients):
        x, y = _client_rows(data, c)
        out.append([_numpy_basis(x, p)] if basis == "all" else
                   [_numpy_basis(x[y == k], p) for k in range(data.num_classes)])
    return out


def _numpy_proximity(bases, proximity):
    """The plain loop over client pairs and classes."""
    c = len(bases)
    a = np.zeros((c, c))
    for i in range(c):
        for j in range(c):
            if i == j:
                continue
            if proximity == "elementwise":
                ui = np.concatenate(bases[i], axis=1)
                uj = np.concatenate(bases[j], axis=1)
                a[i, j] = np.degrees(np.arccos(np.clip(np.abs(ui.T @ uj).max(), 0, 1)))
                continue
            vals = []
            for bi, bj in zip(bases[i], bases[j], strict=True):
                if bi.shape[1] == 0 and bj.shape[1] == 0:
                    continue
                p = max(bi.shape[1], bj.shape[1])
                if bi.shape[1] == 0 or bj.shape[1] == 0:
                    vals.append(90.0 if proximity == "smallest_angle" else 90.0 * P)
                    continue
                ang = np.degrees(scipy.linalg.subspace_angles(bi, bj))
                vals.append(ang.min() if proximity == "smallest_angle" else ang.sum())
                assert p <= P
            a[i, j] = np.mean(vals)
    return a


P = 3


@pytest.fixture(scope="module")
def ragged():
    """7 clients in 2 rotated groups, ragged sizes; client 5 has one class with a single
    sample and client 6 lacks a class."""
    groups = np.array([0, 1, 0, 1, 0, 1, 0])
    data = subspace_data(groups, [30, 12, 25, 18, 9, 22, 15], seed=1)
    y = np.asarray(data.y).copy()
    idx5 = np.asarray(data.train_idx[5, :22])
    first = idx5[y[idx5] == 0]
    y[first[1:]] = 1  # client 5 keeps a single sample of class 0
    idx6 = np.asarray(data.train_idx[6, :15])
    y[idx6[y[idx6] == 2]] = 0  # client 6 has no class 2
    return data.replace(y=jnp.asarray(y)), groups


@pytest.mark.parametrize("basis", ["per_class", "all"])
def test_subspaces_match_numpy_svd(ragged, basis):
    data, _ = ragged
    vectors, valid = subspaces(data, p=P, basis=basis, mapper=ClientMapper(chunk_size=3))
    g = 1 if basis == "all" else L
    assert vectors.shape == (7, g, P, D) and valid.shape == (7, g, P)
    ref = _numpy_bases(data, P, basis)
    for c in range(7):
        for k in range(g):
            v = np.asarray(vectors[c, k])[np.asarray(valid[c, k])]
            want = ref[c][k]
            assert v.shape[0] == want.shape[1], (c, k)
            # Same subspace (signs and order within ties are arbitrary): same projection.
            np.testing.assert_allclose(v.T @ v, want @ want.T, atol=2e-4)
            np.testing.assert_allclose(v @ v.T, np.eye(len(v)), atol=1e-5)
    if basis == "per_class":
        assert np.asarray(valid[5, 0]).sum() == 1 and not np.asarray(valid[6, 2]).any()


@pytest.mark.parametrize("basis", ["per_class", "all"])
@pytest.mark.parametrize("proximity", ["smallest_angle", "sum_angles", "elementwise"])
def test_proximity_matches_a_plain_loop(ragged, basis, proximity):
    data, _ = ragged
    vectors, valid = subspaces(data, p=P, basis=basis)
    want = _numpy_proximity(_numpy_bases(data, P, basis), proximity)
    for block in (0, 3):  # one block / tiles with a padded last block
        got = np.asarray(proximity_matrix(vectors, valid, proximity=proximity, block=block))
        np.testing.assert_allclose(got, got.T)
        np.testing.assert_allclose(got, (want + want.T) / 2, atol=0.3)  # float32 arccos near 0


def test_cluster_clients_cuts_the_dendrogram_at_the_threshold():
    # Two tight pairs and a loner: {0, 1} at 5, {2, 3} at 8, client 4 far from all.
    a = np.full((5, 5), 60.0)
    a[0, 1] = a[1, 0] = 5.0
    a[2, 3] = a[3, 2] = 8.0
    a[[0, 1], 2:4] = a[2:4, [0, 1]] = 30.0
    np.fill_diagonal(a, 0.0)
    np.testing.assert_array_equal(cluster_clients(a, 10.0), [0, 0, 1, 1, 2])
    np.testing.assert_array_equal(cluster_clients(a, 6.0), [0, 0, 1, 2, 3])
    np.testing.assert_array_equal(cluster_clients(a, 45.0), [0, 0, 0, 0, 1])
    np.testing.assert_array_equal(cluster_clients(a, 90.0), [0, 0, 0, 0, 0])
    # Complete vs average linkage: client 4 at 35 / 50 from the pair {0, 1}.
    b = np.array([[0, 4, 35], [4, 0, 50], [35, 50, 0]], float)
    np.testing.assert_array_equal(cluster_clients(b, 45.0, "complete"), [0, 0, 1])
    np.testing.assert_array_equal(cluster_clients(b, 45.0, "average"), [0, 0, 0])
    np.testing.assert_array_equal(cluster_clients(np.zeros((1, 1)), 10.0), [0])


def test_recovers_rotated_groups_and_label_shift_needs_labels():
    groups = np.random.default_rng(0).permutation(np.repeat([0, 1, 2], 4))
    model = make_model("logreg", (D,), L)
    engine = Engine(model, LocalSpec(batch_size=16, epochs=1), ClientOptimizer())
    rotated = subspace_data(groups, [20] * 12, seed=2)
    for basis in ("per_class", "all"):
        found = PACFL(engine=engine, basis=basis).cluster(rotated)
        assert adjusted_rand_score(groups, found.cluster_id) == 1.0, basis
        assert found.num_clusters == 3
    # A label permutation between groups is visible to per-class bases only.
    shifted = subspace_data(groups, [20] * 12, label_shift=True, seed=3)
    assert adjusted_rand_score(groups, PACFL(engine=engine).cluster(shifted).cluster_id) == 1.0
    unsup = PACFL(engine=engine, basis="all")
    relabelled = shifted.replace(y=jnp.zeros_like(shifted.y))
    np.testing.assert_array_equal(unsup.cluster(shifted).proximity,
                                  unsup.cluster(relabelled).proximity)
    # One population: one cluster.
    assert PACFL(engine=engine).cluster(subspace_data(np.zeros(8, int), [20] * 8)
                                        ).num_clusters == 1


def test_round_is_fedavg_per_cluster_and_ledger(ragged):
    data, groups = ragged
    model = make_model("logreg", (D,), L)
    engine = Engine(model, LocalSpec(batch_size=64, steps=2), ClientOptimizer())
    _, hp = client_hparams(data.num_clients, lr=0.1)
    alg = PACFL(engine=engine)
    state = alg.init(jax.random.key(0), data, hp)
    ids = np.asarray(state["clients"]["cluster_id"])
    assert int(state["num_clusters"]) == ids.max() + 1 >= 2
    step = jax.jit(alg.round)
    new, m1 = step(state, data, jax.random.key(4))
    _, m2 = step(new, data, jax.random.key(5))
    fedavg = FedAvg(engine=engine)
    for k in range(int(state["num_clusters"])):
        members = jnp.asarray(np.flatnonzero(ids == k))
        sub = data.select(members)
        fs = fedavg.init(jax.random.key(0), sub, jax.tree.map(lambda a, m=members: a[m], hp))
        out, _ = jax.jit(fedavg.round)(fs, sub, jax.random.key(1))
        for a, b in zip(jax.tree.leaves(out["params"]), jax.tree.leaves(new["slots"]),
                        strict=True):
            np.testing.assert_allclose(np.asarray(b[k]), np.asarray(a), rtol=2e-5, atol=1e-6)
    # The bases go up once, d floats per valid vector; models every round.
    _, valid = subspaces(data, p=P, basis="per_class")
    sent = np.asarray(valid).sum(axis=(1, 2)) * D * 4
    np.testing.assert_allclose(np.asarray(m1["up/subspace"]), sent)
    assert sent[5] == (1 + 2 * P) * D * 4 and sent[6] == 2 * P * D * 4
    np.testing.assert_array_equal(np.asarray(m2["up/subspace"]), 0.0)
    nb = sum(x.size * 4 for x in jax.tree.leaves(model.init(jax.random.key(0))))
    np.testing.assert_array_equal(np.asarray(m1["up/model"]), np.full(7, nb))
    np.testing.assert_array_equal(np.asarray(m1["down/model"]), np.full(7, nb))
    # init_template has init's structure (what a resumed run restores into).
    tmpl = alg.init_template(jax.random.key(0), data, hp)
    assert jax.tree.structure(tmpl) == jax.tree.structure(state)


def test_registry_options_and_errors(ragged):
    data, _ = ragged
    engine = Engine(make_model("logreg", (D,), L), LocalSpec(), ClientOptimizer())
    assert ALGORITHMS["pacfl"] is PACFL and PACFL.clusters_clients
    alg = make_algorithm("pacfl", engine, p=2, basis="all", proximity="elementwise",
                         linkage="average", threshold=12.5)
    alg.validate(data)
    for kw, msg in [(dict(p=0), "p "), (dict(basis="labels"), "basis"),
                    (dict(proximity="cosine"), "proximity"), (dict(linkage="single"), "linkage"),
                    (dict(threshold=-1.0), "threshold"), (dict(threshold="auto"), "threshold"),
                    (dict(max_samples=0), "max_samples"), (dict(max_slots=0), "max_slots")]:
        with pytest.raises(ValueError, match=msg):
            make_algorithm("pacfl", engine, **kw).validate(data)
    with pytest.raises(ValueError, match="has no option"):
        make_algorithm("pacfl", engine, k=3)


def test_max_samples_uses_the_first_samples_of_each_client(ragged):
    data, _ = ragged
    v, ok = subspaces(data, p=P, basis="per_class", max_samples=10)
    cut = data.replace(train_count=jnp.minimum(data.train_count, 10))
    v0, ok0 = subspaces(cut, p=P, basis="per_class")
    np.testing.assert_array_equal(np.asarray(ok), np.asarray(ok0))
    proj = lambda a: np.einsum("...pd,...pe->...de", np.asarray(a), np.asarray(a))  # noqa: E731
    np.testing.assert_allclose(proj(v), proj(v0), atol=1e-5)


def test_driver_runs_pacfl_and_writes_the_proximity(tmp_path):
    from fedrnd.driver import AlgorithmConfig, Config, ModelConfig, simulate

    groups = np.random.default_rng(1).permutation(np.repeat([0, 1], 4))
    data = subspace_data(groups, [20] * 8, seed=4, shape=(4, 4, 1))  # image-shaped features
    cfg = Config(rounds=3, eval_every=3, checkpoint_every=0, progress=False,
                 model=ModelConfig("logreg", {}), algorithms=[AlgorithmConfig("pacfl", {})])
    res = simulate(cfg, run_dir=tmp_path / "run", data=data, verbose=False)
    r = res.methods["pacfl"]
    assert r.final["ari"] == 1.0 and r.final["clusters"] == 2.0
    assert [h["num_clusters"] for h in r.history] == [2.0] * 3
    assert r.history[0]["bytes_up_subspace"] > 0 and r.history[1]["bytes_up_subspace"] == 0
    saved = np.load(tmp_path / "run" / "pacfl" / "proximity.npz")
    assert saved["proximity"].shape == (8, 8)
    np.testing.assert_array_equal(saved["cluster"], r.state["clients"]["cluster_id"])
    assert (tmp_path / "run" / "pacfl" / "proximity.png").stat().st_size > 0
