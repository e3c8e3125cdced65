"""Whole-image selection baselines: random subset, herding, k-means."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dd_assets.methods.herding.select import herding
from dd_assets.methods.kmeans.select import kmeans_select, nearest_unique
from dd_assets.methods.random.select import select_random as pick_random


# --- random ---------------------------------------------------------------------------


def test_random_deterministic_and_order_independent() -> None:
    ids = np.arange(100, 150, dtype=np.int64)
    a = pick_random(ids, 10, seed=7, class_index=3)
    b = pick_random(ids[::-1].copy(), 10, seed=7, class_index=3)
    shuffled = np.random.default_rng(0).permutation(ids)
    c = pick_random(shuffled, 10, seed=7, class_index=3)
    assert a.dtype == np.int64 and a.shape == (10,)
    assert np.array_equal(a, b) and np.array_equal(a, c)
    assert a.tobytes() == pick_random(ids, 10, seed=7, class_index=3).tobytes()
    assert len(np.unique(a)) == 10 and set(a) <= set(ids)


def test_random_matches_documented_generator() -> None:
    ids = np.array([9, 3, 5, 1, 7], dtype=np.int64)
    rng = np.random.default_rng([4, 2])
    expected = np.sort(np.sort(ids)[rng.choice(5, size=3, replace=False)])
    assert np.array_equal(pick_random(ids, 3, seed=4, class_index=2), expected)


def test_random_depends_on_seed_and_class() -> None:
    ids = np.arange(1000, dtype=np.int64)
    base = pick_random(ids, 20, seed=0, class_index=0)
    assert not np.array_equal(base, pick_random(ids, 20, seed=1, class_index=0))
    assert not np.array_equal(base, pick_random(ids, 20, seed=0, class_index=1))


def test_random_all_when_ipc_equals_n() -> None:
    ids = np.array([4, 2, 8], dtype=np.int64)
    assert np.array_equal(pick_random(ids, 3, seed=0, class_index=0), [2, 4, 8])


def test_random_errors() -> None:
    ids = np.arange(5)
    with pytest.raises(ValueError, match=r"class 3 has 5 images, fewer than ipc=6"):
        pick_random(ids, 6, seed=0, class_index=3)
    with pytest.raises(ValueError, match=r"class 2: ipc must be >= 1, got 0"):
        pick_random(ids, 0, seed=0, class_index=2)


# --- herding --------------------------------------------------------------------------


def _brute_force_herding(x: np.ndarray, k: int) -> list[int]:
    x = x.astype(np.float64)
    mu = x.mean(0)
    chosen: list[int] = []
    for _ in range(k):
        best, best_d = -1, np.inf
        for i in range(len(x)):
            if i in chosen:
                continue
            d = np.linalg.norm(mu - x[chosen + [i]].mean(0))
            if d < best_d:
                best, best_d = i, d
        chosen.append(best)
    return chosen


def test_herding_first_pick_is_closest_to_mean() -> None:
    # the mean of these five points is (0, 0); point 2 sits exactly on it
    x = np.array([[4.0, 0.0], [-4.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, -1.0]], np.float32)
    order = herding(x, 5)
    assert order[0] == 2
    # then a pair that keeps the running mean at 0: (3, 4) before (0, 1)
    assert set(order[1:3]) == {3, 4}
    assert sorted(order.tolist()) == [0, 1, 2, 3, 4]


def test_herding_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 6)).astype(np.float32)
    got = herding(x, 12)
    assert got.dtype == np.int64 and got.shape == (12,)
    assert got.tolist() == _brute_force_herding(x, 12)
    assert len(set(got.tolist())) == 12


def test_herding_errors() -> None:
    x = np.zeros((3, 2), np.float32)
    with pytest.raises(ValueError, match="k=4 from 3"):
        herding(x, 4)
    with pytest.raises(ValueError, match="k must be >= 1"):
        herding(x, 0)


# --- k-means --------------------------------------------------------------------------


def _blobs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])
    sizes = [5, 12, 8]
    x = np.concatenate([c + rng.normal(scale=1.0, size=(s, 2)) for c, s in zip(centres, sizes)])
    blob = np.repeat(np.arange(3), sizes)
    perm = rng.permutation(len(x))
    return x[perm].astype(np.float32), blob[perm]


def test_kmeans_one_per_blob_ordered_by_size() -> None:
    x, blob = _blobs()
    got = kmeans_select(x, 3, seed=0)
    assert got.dtype == np.int64 and got.shape == (3,)
    # largest blob (12 points, blob 1) first, then blob 2 (8), then blob 0 (5)
    assert blob[got].tolist() == [1, 2, 0]
    for b, i in zip(blob[got], got):
        members = np.flatnonzero(blob == b)
        d = np.linalg.norm(x[members] - x[members].mean(0), axis=1)
        assert i == members[np.argmin(d)]  # nearest real sample to the blob centre
    assert got.tobytes() == kmeans_select(x, 3, seed=0).tobytes()


def test_nearest_unique_resolves_shared_nearest() -> None:
    x = np.array([[0.0], [1.0], [5.0], [10.0]])
    centres = np.array([[0.4], [0.1], [9.0]])  # centres 0 and 1 both nearest to sample 0
    assert nearest_unique(x, centres, [0, 1, 2]).tolist() == [0, 1, 3]
    assert nearest_unique(x, centres, [1, 0, 2]).tolist() == [1, 0, 3]


@pytest.mark.filterwarnings("ignore:Number of distinct clusters")
def test_kmeans_unique_with_duplicates() -> None:
    # 6 identical points and 2 others: k=4 must still give 4 distinct indices
    x = np.array([[0.0, 0.0]] * 6 + [[10.0, 0.0], [0.0, 10.0]], np.float32)
    got = kmeans_select(x, 4, seed=0, n_init=1)
    assert len(set(got.tolist())) == 4
    assert {6, 7} <= set(got.tolist())


def test_kmeans_errors() -> None:
    x = np.zeros((3, 2), np.float32)
    with pytest.raises(ValueError, match="k=5 from 3"):
        kmeans_select(x, 5, seed=0)
    with pytest.raises(ValueError, match="k must be >= 1"):
        kmeans_select(x, 0, seed=0)


def test_kmeans_all_points_when_k_equals_n() -> None:
    x = np.array(list(itertools.product([0.0, 50.0], [0.0, 50.0])), np.float32)
    assert sorted(kmeans_select(x, 4, seed=3).tolist()) == [0, 1, 2, 3]
