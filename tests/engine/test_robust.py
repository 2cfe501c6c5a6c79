"""Robust aggregation per cluster slot against plain numpy references (one loop per slot)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrnd.engine.robust import (
    clip_by_norm,
    coordinate_median,
    poison_updates,
    robust_aggregate,
    tree_norms,
    trimmed_mean,
)


def _population(seed=0, m=23, k=4):
    rng = np.random.default_rng(seed)
    tree = {"w": rng.normal(size=(m, 3, 2)).astype(np.float32),
            "b": rng.normal(size=(m, 5)).astype(np.float32)}
    cid = rng.integers(0, k - 1, m).astype(np.int32)  # slot k - 1 stays empty
    w = rng.integers(1, 9, m).astype(np.float32)
    return tree, cid, w, k


def _ref_trimmed(x, trim):
    n = x.shape[0]
    t = int(np.floor(trim * n))
    s = np.sort(x, axis=0)
    return s[t:n - t].mean(0)


@pytest.mark.parametrize("seed", [0, 1])
def test_coordinate_median_matches_numpy_per_slot(seed):
    tree, cid, _, k = _population(seed)
    out, count = coordinate_median(jax.tree.map(jnp.asarray, tree), jnp.asarray(cid), k)
    for slot in range(k):
        mem = cid == slot
        assert int(count[slot]) == mem.sum()
        for name, x in tree.items():
            want = np.median(x[mem], axis=0) if mem.any() else np.zeros(x.shape[1:])
            np.testing.assert_allclose(out[name][slot], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("trim", [0.0, 0.1, 0.25, 0.4])
def test_trimmed_mean_matches_numpy_per_slot(trim):
    tree, cid, _, k = _population(2)
    out, _ = trimmed_mean(jax.tree.map(jnp.asarray, tree), jnp.asarray(cid), k, trim)
    for slot in range(k - 1):
        mem = cid == slot
        for name, x in tree.items():
            np.testing.assert_allclose(out[name][slot], _ref_trimmed(x[mem], trim), rtol=1e-5,
                                       atol=1e-6)
    assert all(np.all(np.asarray(v[k - 1]) == 0) for v in out.values())


def test_trimmed_mean_rejects_a_trim_of_half_or_more():
    tree, cid, _, k = _population()
    with pytest.raises(ValueError, match="trim"):
        trimmed_mean(tree, jnp.asarray(cid), k, 0.5)


def test_clip_by_norm_scales_only_updates_above_the_bound():
    tree, _, _, _ = _population(3)
    norms = np.sqrt(sum(np.sum(x.reshape(x.shape[0], -1) ** 2, 1) for x in tree.values()))
    np.testing.assert_allclose(tree_norms(tree), norms, rtol=1e-6)
    bound = float(np.median(norms))
    out = clip_by_norm(tree, bound)
    new = np.asarray(tree_norms(out))
    np.testing.assert_allclose(new, np.minimum(norms, bound), rtol=1e-5)
    small = norms <= bound
    np.testing.assert_allclose(out["w"][small], tree["w"][small], rtol=1e-6)


def test_clip_aggregate_is_the_weighted_mean_of_updates_clipped_at_the_slot_median_norm():
    tree, cid, w, k = _population(4)
    out, mass = robust_aggregate("clip", tree, jnp.asarray(w), jnp.asarray(cid), k)
    norms = np.sqrt(sum(np.sum(x.reshape(x.shape[0], -1) ** 2, 1) for x in tree.values()))
    for slot in range(k - 1):
        mem = cid == slot
        bound = np.median(norms[mem])
        scale = np.minimum(1.0, bound / norms[mem])
        for name, x in tree.items():
            xs = x[mem] * scale.reshape((-1,) + (1,) * (x.ndim - 1))
            want = np.tensordot(w[mem], xs, axes=1) / w[mem].sum()
            np.testing.assert_allclose(out[name][slot], want, rtol=1e-5, atol=1e-6)
        assert float(mass[slot]) == pytest.approx(w[mem].sum())


def test_zero_weight_clients_are_left_out_of_every_aggregator():
    tree, cid, w, k = _population(5)
    w0 = w.copy()
    w0[:5] = 0.0
    bad = jax.tree.map(lambda x: x.copy(), tree)
    for x in bad.values():
        x[:5] = 1e6  # whatever the absent clients hold, it must not matter
    keep = np.arange(len(cid)) >= 5
    for kind in ("mean", "median", "trimmed_mean", "clip"):
        got, _ = robust_aggregate(kind, bad, jnp.asarray(w0), jnp.asarray(cid), k)
        want, _ = robust_aggregate(kind, jax.tree.map(lambda x: x[keep], tree),
                                   jnp.asarray(w[keep]), jnp.asarray(cid[keep]), k)
        for name in tree:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_a_minority_of_scaled_updates_moves_the_mean_but_not_the_robust_aggregators():
    rng = np.random.default_rng(6)
    m = 20
    honest = rng.normal(0.5, 0.1, size=(m, 8)).astype(np.float32)
    poisoner = np.zeros(m, bool)
    poisoner[:2] = True
    sent = poison_updates({"p": honest}, jnp.asarray(poisoner), "sign_flip", 100.0)["p"]
    cid, w = jnp.zeros(m, jnp.int32), jnp.ones(m)
    mean, _ = robust_aggregate("mean", {"p": sent}, w, cid, 1)
    assert float(jnp.max(mean["p"])) < 0  # the mean is flipped
    for kind in ("median", "trimmed_mean", "clip"):
        out, _ = robust_aggregate(kind, {"p": sent}, w, cid, 1, trim=0.1)
        assert float(jnp.min(out["p"])) > 0.3, kind


def test_poison_updates_scales_or_flips_the_poisoners_only():
    x = {"p": jnp.ones((4, 2))}
    mask = jnp.asarray([True, False, True, False])
    s = poison_updates(x, mask, "scale", 5.0)["p"]
    f = poison_updates(x, mask, "sign_flip", 1.0)["p"]
    np.testing.assert_array_equal(s[:, 0], [5, 1, 5, 1])
    np.testing.assert_array_equal(f[:, 0], [-1, 1, -1, 1])
    with pytest.raises(ValueError, match="poison"):
        poison_updates(x, mask, "noise", 1.0)


def test_robust_aggregate_jits_and_rejects_unknown_kinds():
    tree, cid, w, k = _population(7)
    f = jax.jit(lambda t, c, ww: robust_aggregate("median", t, ww, c, k)[0])
    want, _ = robust_aggregate("median", tree, jnp.asarray(w), jnp.asarray(cid), k)
    got = f(tree, jnp.asarray(cid), jnp.asarray(w))
    np.testing.assert_allclose(got["w"], want["w"], rtol=1e-6)
    with pytest.raises(ValueError, match="aggregation"):
        robust_aggregate("krum", tree, jnp.asarray(w), jnp.asarray(cid), k)
