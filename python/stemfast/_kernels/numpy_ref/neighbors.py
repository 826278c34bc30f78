"""Fixed-radius neighbour search, reference: SciPy's KD-tree with the contract's ordering made explicit.

``knn_within`` and ``pairs_within`` (contract: :mod:`stemfast._kernels`). Distances are compared
squared (``dx * dx + dy * dy`` against ``radius * radius``): strictly below for ``knn_within``, at
most for ``pairs_within``, as ``cKDTree.query(..., distance_upper_bound=)`` and
``cKDTree.query_pairs`` do. The KD-tree finds the neighbours; the order (nearest first, ties by
index; pairs by ``i`` then ``j``) is imposed here.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["knn_within", "pairs_within"]


def _check(points, name):
    pts = np.ascontiguousarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"{name} must be [N, 2]")
    return pts


def _check_radius(radius, kernel):
    if not (math.isfinite(radius) and radius > 0):
        raise ValueError(f"{kernel}: radius must be finite and > 0")


def knn_within(points, queries, k, radius):
    """Reference implementation of the ``knn_within`` kernel (see :mod:`stemfast._kernels`)."""
    pts = _check(points, "knn_within: points")
    qs = _check(queries, "knn_within: queries")
    k = int(k)
    if k < 1:
        raise ValueError("knn_within: k must be >= 1")
    _check_radius(radius, "knn_within")
    m = len(qs)
    dist = np.full((m, k), np.inf)
    idx = np.full((m, k), -1, dtype=np.int64)
    if len(pts) == 0 or m == 0:
        return dist, idx
    tree = cKDTree(pts)
    r2 = float(radius) * float(radius)
    # one more than asked, to see ties across the k-th place (those rows are redone in full below)
    kq = min(k + 1, len(pts))
    _, j = tree.query(qs, k=kq, distance_upper_bound=float(radius))
    j = np.asarray(j, dtype=np.int64).reshape(m, kq)
    hit = j < len(pts)
    jj = np.where(hit, j, 0)
    d2 = (pts[jj, 0] - qs[:, 0:1]) ** 2 + (pts[jj, 1] - qs[:, 1:2]) ** 2
    d2 = np.where(hit & (d2 < r2), d2, np.inf)
    jj = np.where(np.isfinite(d2), jj, np.iinfo(np.int64).max)
    order = np.lexsort((jj, d2), axis=1)  # nearest first, ties by index
    d2 = np.take_along_axis(d2, order, 1)
    jj = np.take_along_axis(jj, order, 1)
    kk = min(k, len(pts))
    tied = np.flatnonzero(np.isfinite(d2[:, kk - 1]) & (d2[:, kk - 1] == d2[:, kq - 1])) if kq > kk else []
    for t in tied:  # every point within the radius, then the same order
        cand = np.asarray(tree.query_ball_point(qs[t], float(radius)), dtype=np.int64)
        c2 = (pts[cand, 0] - qs[t, 0]) ** 2 + (pts[cand, 1] - qs[t, 1]) ** 2
        cand, c2 = cand[c2 < r2], c2[c2 < r2]
        o = np.lexsort((cand, c2))[:kk]
        d2[t, :kk], jj[t, :kk] = c2[o], cand[o]
    found = np.isfinite(d2[:, :kk])
    dist[:, :kk] = np.where(found, np.sqrt(d2[:, :kk]), np.inf)
    idx[:, :kk] = np.where(found, jj[:, :kk], -1)
    return dist, idx


def pairs_within(points, radius):
    """Reference implementation of the ``pairs_within`` kernel (see :mod:`stemfast._kernels`)."""
    pts = _check(points, "pairs_within: points")
    _check_radius(radius, "pairs_within")
    if len(pts) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    # the tree's own (<= radius) test, widened a little; the exact squared test below decides
    pairs = cKDTree(pts).query_pairs(float(radius) * (1 + 1e-9), output_type="ndarray").astype(np.int64)
    pairs.sort(axis=1)
    d = pts[pairs[:, 1]] - pts[pairs[:, 0]]
    pairs = pairs[d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1] <= float(radius) * float(radius)]
    return np.ascontiguousarray(pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]).reshape(-1, 2)
