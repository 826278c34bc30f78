"""The fixed-radius neighbour kernels ``knn_within`` / ``pairs_within`` (all backends) and the lattice's
neighbour index built on them."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from stemfast.backend import available_backends, get_kernels
from stemfast.lattice import _dedupe, _distinct_per_label, _PointIndex

BACKENDS = available_backends()


def brute_knn(points, queries, k, radius):
    """The contract spelled out: points with d^2 < r^2, nearest first, ties by index."""
    dist = np.full((len(queries), k), np.inf)
    idx = np.full((len(queries), k), -1, dtype=np.int64)
    for t, (qx, qy) in enumerate(queries):
        d2 = (points[:, 0] - qx) * (points[:, 0] - qx) + (points[:, 1] - qy) * (points[:, 1] - qy)
        cand = np.flatnonzero(d2 < radius * radius)
        cand = cand[np.lexsort((cand, d2[cand]))][:k]
        dist[t, : len(cand)] = np.sqrt(d2[cand])
        idx[t, : len(cand)] = cand
    return dist, idx


def brute_pairs(points, radius):
    d = points[:, None, :] - points[None, :, :]
    d2 = d[..., 0] * d[..., 0] + d[..., 1] * d[..., 1]
    i, j = np.nonzero(np.triu(d2 <= radius * radius, 1))
    return np.stack([i, j], 1).astype(np.int64).reshape(-1, 2)


def cloud(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    pts = rng.uniform(-60, 60, (n, 2)) * rng.uniform(0.02, 3.0, 2)  # also thin, elongated clouds
    if seed % 3 == 0:
        pts = np.concatenate([pts, pts[: n // 4]])  # exact duplicates
    queries = np.concatenate([rng.uniform(-90, 90, (150, 2)), pts[:50] + rng.normal(0, 0.5, (min(50, len(pts)), 2))])
    return pts, queries, int(rng.integers(1, 14)), float(rng.uniform(0.3, 45.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(8))
def test_knn_within_matches_brute_force(backend, seed):
    pts, queries, k, r = cloud(seed)
    dist, idx = get_kernels(backend).knn_within(pts, queries, k, r)
    ref_d, ref_i = brute_knn(pts, queries, k, r)
    assert dist.shape == idx.shape == (len(queries), k) and idx.dtype == np.int64
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_array_equal(dist, ref_d)
    assert (idx >= 0).any() and (idx < 0).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(8))
def test_pairs_within_matches_brute_force(backend, seed):
    pts, _, _, r = cloud(seed)
    pairs = get_kernels(backend).pairs_within(pts, r)
    assert pairs.dtype == np.int64 and pairs.shape[1] == 2
    np.testing.assert_array_equal(pairs, brute_pairs(pts, r))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_and_the_radius_boundary(backend):
    """On an integer grid every distance ties: nearest first, then by index; knn_within excludes a
    point exactly at the radius (like cKDTree.query), pairs_within includes it (like query_pairs)."""
    kern = get_kernels(backend)
    g = np.stack(np.meshgrid(np.arange(6.0), np.arange(5.0)), -1).reshape(-1, 2)  # index = 6 y + x
    dist, idx = kern.knn_within(g, np.array([[2.0, 2.0]]), 6, 1.5)
    assert idx[0].tolist() == [14, 8, 13, 15, 20, 7]  # itself, the 4 at distance 1 by index, then sqrt 2
    np.testing.assert_allclose(dist[0], [0, 1, 1, 1, 1, np.sqrt(2)])
    _, idx = kern.knn_within(g, np.array([[2.0, 2.0]]), 9, 1.0)  # distance exactly 1: excluded
    assert idx[0].tolist() == [14] + [-1] * 8
    pairs = kern.pairs_within(g, 1.0)  # distance exactly 1: included
    assert len(pairs) == 5 * 5 + 4 * 6 and pairs[:3].tolist() == [[0, 1], [0, 6], [1, 2]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_inputs(backend):
    kern = get_kernels(backend)
    q = np.array([[0.0, 0.0], [1e6, -1e6]])
    d, i = kern.knn_within(np.zeros((0, 2)), q, 3, 2.0)
    assert (i == -1).all() and np.isinf(d).all()
    assert kern.pairs_within(np.zeros((0, 2)), 2.0).shape == (0, 2)
    assert kern.pairs_within(np.array([[1.0, 1.0]]), 2.0).shape == (0, 2)
    # all points on one spot / on one line / one far outlier (the grid must stay small)
    same = np.full((50, 2), 3.0)
    assert len(kern.pairs_within(same, 0.1)) == 50 * 49 // 2
    _, i = kern.knn_within(same, np.array([[3.0, 3.0]]), 4, 0.1)
    assert i[0].tolist() == [0, 1, 2, 3]
    line = np.stack([np.arange(100.0), np.zeros(100)], 1)
    np.testing.assert_array_equal(kern.pairs_within(line, 1.0), np.stack([np.arange(99), np.arange(1, 100)], 1))
    far = np.concatenate([np.random.default_rng(0).uniform(0, 10, (200, 2)), [[1e12, -1e12]]])
    ref_d, ref_i = brute_knn(far, far[:20], 5, 1.5)
    d, i = kern.knn_within(far, far[:20], 5, 1.5)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_array_equal(kern.pairs_within(far, 1.5), brute_pairs(far, 1.5))
    # k larger than the number of points
    d, i = kern.knn_within(line[:3], np.array([[0.0, 0.0]]), 8, 10.0)
    assert i[0].tolist() == [0, 1, 2] + [-1] * 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_rejects_bad_arguments(backend):
    kern = get_kernels(backend)
    pts = np.zeros((4, 2))
    for r in (0.0, -1.0, np.inf, np.nan):
        with pytest.raises(ValueError):
            kern.knn_within(pts, pts, 2, r)
        with pytest.raises(ValueError):
            kern.pairs_within(pts, r)
    with pytest.raises(ValueError):
        kern.knn_within(pts, pts, 0, 1.0)
    with pytest.raises(ValueError):
        kern.knn_within(np.zeros((4, 3)), pts, 1, 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_point_index_answers_like_a_kd_tree(backend):
    """The lattice's neighbour index: same answers as cKDTree (bounded and unbounded queries, k = 1
    squeezed, missing = index n / distance inf), unbounded ones also beyond 4 * scale."""
    rng = np.random.default_rng(3)
    pts = rng.uniform(0, 100, (500, 2))
    pts = np.concatenate([pts, [[400.0, 400.0]]])  # a point far from the rest (beyond 4 * scale)
    q = np.concatenate([rng.uniform(-20, 120, (300, 2)), [[420.0, 390.0]]])
    tree, index = cKDTree(pts), _PointIndex(pts, get_kernels(backend), scale=4.5)
    for k, r in ((1, 5.0), (3, 5.0), (6, np.inf), (1, np.inf), (8, 12.0)):
        d_ref, i_ref = tree.query(q, k=k, distance_upper_bound=r)
        d, i = index.query(q, k=k, distance_upper_bound=r)
        assert d.shape == np.shape(d_ref)
        np.testing.assert_array_equal(i, i_ref)
        np.testing.assert_allclose(d, d_ref, rtol=1e-12)
    ref = np.array(sorted(tree.query_pairs(7.0)), dtype=np.int64).reshape(-1, 2)
    np.testing.assert_array_equal(index.query_pairs(7.0), ref)


def test_dedupe_keeps_the_first_of_close_points():
    kern = get_kernels()
    pts = np.array([[0.0, 0.0], [0.5, 0.0], [1.0, 0.0], [5.0, 5.0], [5.2, 5.0], [9.0, 0.0]])
    # 0-1 and 1-2 are close, 0-2 is not: 1 is dropped by 0, so 2 stays; 4 is dropped by 3
    assert _dedupe(_PointIndex(pts, kern), 0.6).tolist() == [0, 2, 3, 5]
    assert _dedupe(_PointIndex(pts, kern), 0.1).tolist() == list(range(6))
    assert _dedupe(_PointIndex(pts[:1], kern), 1.0).tolist() == [0]


def test_distinct_per_label_counts_distinct_predictors():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 60))
        who = np.sort(rng.integers(0, 12, n))  # sorted; runs longer than 6 take the general path
        lab = rng.integers(0, 5, n)
        key = np.unique(lab * 100 + who)
        np.testing.assert_array_equal(_distinct_per_label(lab, who, 5), np.bincount(key // 100, minlength=5))
    # unsorted input takes the general path too
    np.testing.assert_array_equal(_distinct_per_label(np.array([0, 0, 1, 0]), np.array([3, 1, 3, 3]), 2), [2, 1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nearest_indices_are_the_kd_trees(backend):
    from stemfast.lattice import nearest_indices

    rng = np.random.default_rng(5)
    lattice = np.stack(np.meshgrid(np.arange(40.0), np.arange(30.0)), -1).reshape(-1, 2) * 7.0
    pts = np.vstack([lattice + rng.normal(0, 0.8, lattice.shape),   # a jittered lattice ...
                     rng.uniform(-400, 700, (15, 2))])                # ... and a few far-away points
    queries = rng.uniform(-50, 330, (300, 2))
    tree = cKDTree(pts)
    for k in (1, 7, 19):
        assert np.array_equal(nearest_indices(pts, k, backend=backend), tree.query(pts, k=k)[1].reshape(len(pts), k))
        assert np.array_equal(nearest_indices(pts, k, queries, backend=backend),
                              tree.query(queries, k=k)[1].reshape(len(queries), k))
    # far from the lattice fewer than k points lie within four typical spacings: the KD-tree answers
    far = np.array([[5000.0, 5000.0]])
    assert np.array_equal(nearest_indices(pts, 19, far, backend=backend), tree.query(far, k=19)[1])
    for bad in (0, len(pts) + 1):
        with pytest.raises(ValueError, match="k must be"):
            nearest_indices(pts, bad, backend=backend)


def test_node_membership_is_isin_of_the_node_keys():
    from stemfast.sitelattice import _key, _node_isin

    rng = np.random.default_rng(7)
    for n, m, r in [(20000, 9000, 150), (300, 200, 5), (500, 50, 10 ** 6), (0, 4, 3), (4, 0, 3)]:
        a = rng.integers(-r, r, (n, 2))
        b = rng.integers(-r, r, (m, 2))
        b[: min(n, m) // 2] = a[: min(n, m) // 2]     # some shared nodes
        assert np.array_equal(_node_isin(a, b), np.isin(_key(a), _key(b)))   # (10**6: the sparse-key path)
