"""The native priority trees (csrc/sum_tree.hpp) on their own.

The buffer's sum is recomputed from the children on every update, so it
equals a fresh pairwise sum of the current leaves whatever the history: no
drift, which a tree that adds differences shows after millions of updates.
DQN_FAST_TREE_UPDATES sets the update count of the drift test (default 10M).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from dqn_fast import _core

UPDATES = int(os.environ.get("DQN_FAST_TREE_UPDATES", str(10_000_000)))


def test_no_drift_after_ten_million_random_updates():
    rng = np.random.default_rng(0)
    n = 100_003  # not a power of two: leaves sit at two depths
    tree, leaves = _core.SumTree(n), np.zeros(n)
    chunk = 500_000
    for done in range(0, UPDATES, chunk):
        index = rng.integers(0, n, chunk)
        # Masses over 12 orders of magnitude, and some zeros (evicted slots).
        mass = 10.0 ** rng.uniform(-9, 3, chunk)
        mass[rng.random(chunk) < 0.05] = 0.0
        tree.set(index, mass)
        # The tree applies duplicates in order (the last wins); numpy's fancy
        # assignment does not promise that, so pick each index's last update.
        _, last = np.unique(index[::-1], return_index=True)
        leaves[index[::-1][last]] = mass[::-1][last]
    exact = math.fsum(leaves.tolist())
    # A pairwise sum of n leaves is within ~log2(n) ulps of the exact sum; drift would be far more.
    assert tree.total == pytest.approx(exact, rel=32 * np.finfo(float).eps)
    positive = leaves[leaves > 0]
    assert tree.min == positive.min()
    for i in rng.integers(0, n, 1000).tolist():
        assert tree.get(i) == leaves[i]


def test_find_returns_positive_leaves_in_proportion():
    tree = _core.SumTree(7)
    mass = np.array([0.0, 1.0, 0.0, 2.0, 0.0, 0.0, 5.0])
    tree.set(np.arange(7), mass)
    assert tree.total == 8.0 and tree.min == 1.0
    u = (np.arange(80_000) + 0.5) * tree.total / 80_000  # an even sweep of [0, total)
    hits = np.bincount([tree.find(x) for x in u.tolist()], minlength=7)
    np.testing.assert_array_equal(hits, 10_000 * mass)
    assert tree.find(math.nextafter(tree.total, 0)) in (1, 3, 6)


def test_find_never_returns_an_empty_leaf_at_the_top_of_the_range():
    # Rounding can leave u just past the right subtree's sum: the descent must still end on mass.
    tree = _core.SumTree(5)
    tree.set(np.arange(5), np.array([0.1, 0.2, 0.3, 0.0, 0.0]))
    for u in (0.0, math.nextafter(tree.total, 0), tree.total * (1 - 1e-16)):
        assert tree.get(tree.find(u)) > 0


def test_an_empty_tree_has_infinite_min_and_zero_total():
    tree = _core.SumTree(3)
    assert tree.total == 0.0 and tree.min == math.inf
    tree.set(np.array([1]), np.array([4.0]))
    tree.set(np.array([1]), np.array([0.0]))
    assert tree.total == 0.0 and tree.min == math.inf
    with pytest.raises(ValueError):
        tree.find(0.0)


def test_one_leaf():
    tree = _core.SumTree(1)
    tree.set(np.array([0]), np.array([3.0]))
    assert tree.total == 3.0 and tree.min == 3.0 and tree.find(2.9) == 0


@pytest.mark.parametrize("mass", [math.nan, math.inf, -1.0])
def test_bad_masses_and_indices_are_rejected(mass):
    tree = _core.SumTree(4)
    with pytest.raises(ValueError):
        tree.set(np.array([0]), np.array([mass]))
    with pytest.raises(IndexError):
        tree.set(np.array([4]), np.array([1.0]))
    assert tree.total == 0.0


@pytest.mark.parametrize("n", [1, 2, 5, 64, 1000, 100_003])
def test_find_many_descends_exactly_as_find(n):
    # The sampler descends a whole batch level by level; every u must land where find() lands.
    rng = np.random.default_rng(n)
    tree = _core.SumTree(n)
    mass = 10.0 ** rng.uniform(-6, 2, n)
    mass[rng.random(n) < 0.3] = 0.0
    mass[0] = 1.0
    tree.set(np.arange(n), mass)
    u = np.sort(rng.uniform(0, tree.total, 2000))
    u[-1] = math.nextafter(tree.total, 0)
    np.testing.assert_array_equal(tree.find_many(u), [tree.find(x) for x in u.tolist()])
