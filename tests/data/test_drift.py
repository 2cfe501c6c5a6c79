"""Data drift: moved clients, their new groups' transforms, one shared layout, bad input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedrnd.data import build_federated, load_source, make_partition
from fedrnd.data.drift import DriftingData, build_drifting, build_phases, drift_groups


@pytest.fixture(scope="module")
def digits():
    return load_source("digits")


def _client_view(data, c):
    """(train x, train y, test x, test y) of client ``c`` gathered from the pool."""
    x, y = np.asarray(data.x), np.asarray(data.y)
    tr = np.asarray(data.train_idx)[c, :int(data.train_count[c])]
    te = np.asarray(data.test_idx)[c, :int(data.test_count[c])]
    return x[tr], y[tr], x[te], y[te]


def test_moved_clients_see_their_new_groups_rotation(digits):
    part = make_partition("rotation", digits, 8, seed=0, num_groups=2)
    old = np.asarray(part.group)
    moved = [1, 4, 6]
    dd = build_drifting(digits, part, 5, clients=moved, seed=3)
    # Two groups: the only other group is forced, 0 <-> 1.
    (ev,) = dd.events
    np.testing.assert_array_equal(ev.clients, moved)
    np.testing.assert_array_equal(ev.new_group, 1 - old[moved])
    expect = old.copy()
    expect[moved] = 1 - old[moved]
    np.testing.assert_array_equal(np.asarray(dd.phases[1].group), expect)
    np.testing.assert_array_equal(np.asarray(dd.phases[0].group), old)
    for c in range(8):
        before, after = _client_view(dd.phases[0], c), _client_view(dd.phases[1], c)
        for a, b in zip(before, after, strict=True):
            assert a.shape == b.shape
        if c in moved:
            # Same raw examples, now rotated the other way: group 1 is +90 degrees.
            k = 1 if old[c] == 0 else -1
            np.testing.assert_array_equal(after[0], np.rot90(before[0], k=k, axes=(1, 2)))
            np.testing.assert_array_equal(after[2], np.rot90(before[2], k=k, axes=(1, 2)))
            np.testing.assert_array_equal(after[1], before[1])
        else:
            for name in ("train_idx", "test_idx"):
                np.testing.assert_array_equal(np.asarray(getattr(dd.phases[1], name))[c],
                                              np.asarray(getattr(dd.phases[0], name))[c])


@pytest.mark.parametrize("partition, options", [
    ("feature_pattern", {"num_groups": 3}),
    ("label_permutation", {"num_groups": 3}),
    ("rotation", {"num_groups": 4, "within": {"name": "dirichlet", "alpha": 0.5}}),
])
def test_every_phase_equals_a_plain_build_with_its_groups(digits, partition, options):
    part = make_partition(partition, digits, 12, seed=1, **options)
    dd = build_drifting(digits, part, [3, 7], fraction=0.25, seed=0)
    assert len(dd.phases) == 3 and dd.drift_rounds == (3, 7)
    for p, phase in enumerate(dd.phases):
        ref = build_federated(digits, dataclasses.replace(part, group=np.asarray(phase.group)))
        np.testing.assert_array_equal(np.asarray(phase.train_count), np.asarray(ref.train_count))
        np.testing.assert_array_equal(np.asarray(phase.test_count), np.asarray(ref.test_count))
        for c in range(12):
            for a, b in zip(_client_view(phase, c), _client_view(ref, c), strict=True):
                np.testing.assert_array_equal(a, b, err_msg=f"phase {p} client {c}")
    # Events chain: the second drift starts from the groups the first one left.
    e1, e2 = dd.events
    np.testing.assert_array_equal(e2.old_group, np.asarray(dd.phases[1].group)[e2.clients])
    np.testing.assert_array_equal(e1.new_group, np.asarray(dd.phases[1].group)[e1.clients])


def test_label_permutation_drift_relabels_the_moved_clients(digits):
    part = make_partition("label_permutation", digits, 6, seed=2, num_groups=3)
    dd = build_drifting(digits, part, 1, clients=[0, 5], seed=0)
    lm = np.asarray(part.label_map)
    g0, g1 = np.asarray(dd.phases[0].group), np.asarray(dd.phases[1].group)
    for c in (0, 5):
        assert g1[c] != g0[c]
        raw = np.sort(np.asarray(part.train[c]))
        _, y_after, _, _ = _client_view(dd.phases[1], c)
        np.testing.assert_array_equal(y_after, lm[g1[c], digits.y_train[raw]])


def test_phases_share_the_pool_and_shapes(digits):
    part = make_partition("rotation", digits, 10, seed=0, num_groups=4)
    plain = build_federated(digits, part)
    dd = build_drifting(digits, part, 2, fraction=0.5, seed=0)
    for phase in dd.phases:
        assert phase.x is dd.initial.x and phase.y is dd.initial.y
        for k, v in phase.client_arrays().items():
            assert v.shape == plain.client_arrays()[k].shape, k
    # The pool grows only by the moved clients' examples under their new groups.
    extra = sum(int(dd.initial.train_count[c] + dd.initial.test_count[c])
                for c in dd.events[0].clients)
    assert plain.x.shape[0] < dd.initial.x.shape[0] <= plain.x.shape[0] + extra
    assert dd.num_clients == 10 and dd.feature_shape == plain.feature_shape


def test_phase_in_effect_by_completed_rounds(digits):
    part = make_partition("rotation", digits, 4, seed=0, num_groups=2)
    dd = build_drifting(digits, part, [2, 5], clients=[0], seed=0)
    # Rounds 1-2 use phase 0; the round after 2 completed rounds is the first of phase 1.
    assert [dd.phase(r) for r in range(8)] == [0, 0, 1, 1, 1, 2, 2, 2]
    assert dd.at(4) is dd.phases[1]
    with pytest.raises(ValueError, match="completed_rounds"):
        dd.phase(-1)


def test_drift_groups_fraction_known_counts_and_seed():
    group = np.repeat(np.arange(4), 5)
    moved, new = drift_groups(group, 4, fraction=0.25, seed=7)
    assert len(moved) == 5 and np.all(np.diff(moved) > 0)
    assert np.all(new[moved] != group[moved]) and np.all((0 <= new) & (new < 4))
    keep = np.setdiff1d(np.arange(20), moved)
    np.testing.assert_array_equal(new[keep], group[keep])
    again = drift_groups(group, 4, fraction=0.25, seed=7)
    np.testing.assert_array_equal(again[0], moved)
    np.testing.assert_array_equal(again[1], new)
    # Targets are uniform over the other groups: every other group is reached.
    _, many = drift_groups(np.zeros(3000, np.int64), 4, fraction=1.0, seed=0)
    counts = np.bincount(many, minlength=4)
    assert counts[0] == 0 and counts[1:].min() > 900
    # A tiny fraction still moves one client.
    assert len(drift_groups(group, 4, fraction=0.01, seed=0)[0]) == 1


@pytest.mark.parametrize("kw, match", [
    (dict(fraction=0.0), "fraction must be in"),
    (dict(fraction=1.5), "fraction must be in"),
    (dict(), "exactly one of"),
    (dict(fraction=0.5, clients=[1]), "exactly one of"),
    (dict(clients=[]), "non-empty"),
    (dict(clients=[0, 20]), r"in \[0, 20\)"),
    (dict(clients=[3, 3]), "distinct"),
])
def test_drift_groups_bad_input(kw, match):
    with pytest.raises(ValueError, match=match):
        drift_groups(np.repeat(np.arange(4), 5), 4, **kw)


def test_bad_drift_settings_are_named(digits):
    with pytest.raises(ValueError, match="at least 2 groups"):
        drift_groups(np.zeros(5, np.int64), 1, fraction=0.5)
    for name, opts in (("dirichlet", {"alpha": 0.5}), ("iid", {}), ("grouped", {"num_groups": 2})):
        part = make_partition(name, digits, 6, seed=0, **opts)
        with pytest.raises(ValueError, match="groups change the data"):
            build_drifting(digits, part, 2, fraction=0.5)
    part = make_partition("rotation", digits, 6, seed=0, num_groups=2)
    with pytest.raises(ValueError, match="strictly increasing"):
        build_drifting(digits, part, [4, 4], fraction=0.5)
    with pytest.raises(ValueError, match="strictly increasing"):
        build_drifting(digits, part, 0, fraction=0.5)
    with pytest.raises(ValueError, match="at least one"):
        build_drifting(digits, part, [], fraction=0.5)
    with pytest.raises(ValueError, match="shape"):
        build_phases(digits, part, [(2, np.zeros(5, np.int32))])
    a = build_federated(digits, part)
    b = build_federated(digits, part)
    with pytest.raises(ValueError, match="share the pool"):
        DriftingData((a, b), (0, 3))
    with pytest.raises(ValueError, match="starts"):
        DriftingData((a,), (1,))
