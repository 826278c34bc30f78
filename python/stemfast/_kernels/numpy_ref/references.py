"""Statistics over each site's k nearest sites, reference: SciPy's KD-tree plus vectorised NumPy.

``local_references`` and ``neighbour_mean`` (contract: :mod:`stemfast._kernels`). The KD-tree finds
the k nearest sites; where the k-th and the (k+1)-th are equally far (a tie across the k-th place,
which the tree resolves in its own traversal order) the row is redone from every site within that
distance, ties by index, so the set is the contract's. Squared distances are ``dx * dx + dy * dy``.
"""
from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["local_references", "neighbour_mean"]

#: query sites per block (memory ~ CHUNK * k * 40 bytes)
CHUNK = 8192


def _check_k(k, n, kernel):
    k = int(k)
    if not 1 <= k <= n:
        raise ValueError(f"{kernel}: k must be in [1, N]")
    return k


def _nearest(tree, pts, q, k):
    """Indices [len(q), k] of the k nearest points of each query point ``pts[q]`` (ties by index),
    nearest first, and their squared distances."""
    n = len(pts)
    kq = min(k + 1, n)
    _, j = tree.query(pts[q], k=kq)
    j = np.asarray(j, np.int64).reshape(len(q), kq)
    d2 = (pts[j, 0] - pts[q, 0, None]) ** 2 + (pts[j, 1] - pts[q, 1, None]) ** 2
    # the tree returns them nearest first; rows with equal (or, by a rounding of the tree's own, unordered)
    # neighbouring distances are put in the contract's order: by distance, then index
    redo = np.flatnonzero((d2[:, 1:] <= d2[:, :-1]).any(1))
    order = np.lexsort((j[redo], d2[redo]), axis=1)
    j[redo] = np.take_along_axis(j[redo], order, 1)
    d2[redo] = np.take_along_axis(d2[redo], order, 1)
    if kq > k:
        for t in np.flatnonzero(d2[:, k - 1] == d2[:, k]):  # a tie across the k-th place
            cand = np.asarray(tree.query_ball_point(pts[q[t]], np.sqrt(d2[t, k]) * (1 + 1e-9) + 1e-12), np.int64)
            c2 = (pts[cand, 0] - pts[q[t], 0]) ** 2 + (pts[cand, 1] - pts[q[t], 1]) ** 2
            o = np.lexsort((cand, c2))[:k]
            j[t, :k], d2[t, :k] = cand[o], c2[o]
    return j[:, :k], d2[:, :k]


def local_references(xy, inv_basis, values, refable, rows, k, tol):
    """Reference implementation of the ``local_references`` kernel (see :mod:`stemfast._kernels`)."""
    xy = np.ascontiguousarray(xy, np.float64)
    n = len(xy)
    inv = np.ascontiguousarray(inv_basis, np.float64).reshape(n, 2, 2)
    values = np.ascontiguousarray(values, np.float64)
    refable = np.asarray(refable, bool)
    rows = np.ascontiguousarray(rows, np.int64)
    k = _check_k(k, n, "local_references")
    if len(rows) and (rows.min() < 0 or rows.max() >= n):
        raise ValueError("local_references: rows out of range")
    m = len(rows)
    med = np.full((m, 3), np.nan)
    mad = np.full((m, 3), np.nan)
    cnt = np.zeros((m, 3), np.int64)
    reach = np.full(m, np.nan)
    if m == 0:
        return med, mad, cnt, reach
    tree = cKDTree(xy)
    for a in range(0, m, CHUNK):
        q = rows[a:a + CHUNK]
        j, d2 = _nearest(tree, xy, q, k)
        reach[a:a + len(q)] = np.sqrt(d2[:, -1])
        x = xy[:, 0][j]
        x -= xy[q, 0, None]
        y = xy[:, 1][j]
        y -= xy[q, 1, None]
        # [m n] = d @ inv(B), written out (a [.., 2] @ [2, 2] einsum was a third of the time)
        ia = inv[q]
        m_ = x * ia[:, 0, 0, None] + y * ia[:, 1, 0, None]
        n_ = x * ia[:, 0, 1, None] + y * ia[:, 1, 1, None]
        del x, y
        rm, rn = np.rint(m_), np.rint(n_)
        with np.errstate(invalid="ignore"):
            on_node = np.maximum(np.abs(m_ - rm), np.abs(n_ - rn)) < tol  # NaN (no basis): never
            colour = (np.nan_to_num(rm - rn)).astype(np.int64) % 3
        del m_, n_, rm, rn
        ok = on_node & refable[j] & (j != q[:, None])
        _colour_stats(values[j], ok, colour, med[a:a + len(q)], mad[a:a + len(q)], cnt[a:a + len(q)])
    return med, mad, cnt, reach


def _colour_stats(v, ok, colour, med, mad, cnt):
    """Fill ``med``, ``mad`` (1.4826 x MAD) and ``cnt`` [rows, 3] with the statistics of the values
    ``v`` [rows, k] of each row's usable (``ok``) references of each relative colour."""
    for c in range(3):
        sel = ok & (colour == c)
        m_c = _masked_row_median(v, sel)
        med[:, c] = m_c
        mad[:, c] = 1.4826 * _masked_row_median(np.abs(v - m_c[:, None]), sel)
        cnt[:, c] = sel.sum(1)


def _masked_row_median(v, sel):
    """Median of ``v[i, sel[i]]`` for every row ``i`` (NaN where a row selects nothing): the mean of
    the lower and upper middle of the sorted selection, by one sort per call."""
    k = sel.sum(1)
    srt = np.sort(np.where(sel, v, np.inf), axis=1)
    rows = np.arange(len(v))
    lo = srt[rows, np.maximum(k - 1, 0) // 2]
    hi = srt[rows, np.maximum(k, 1) // 2 - (k == 0)]
    with np.errstate(invalid="ignore"):
        out = 0.5 * (lo + hi)
    out[k == 0] = np.nan
    return out


def neighbour_mean(xy, values, k):
    """Reference implementation of the ``neighbour_mean`` kernel (see :mod:`stemfast._kernels`)."""
    xy = np.ascontiguousarray(xy, np.float64)
    values = np.ascontiguousarray(values, np.float64)
    n = len(xy)
    if values.ndim != 2 or len(values) != n:
        raise ValueError("neighbour_mean: values must be [N, L]")
    k = _check_k(k, n, "neighbour_mean")
    out = np.empty_like(values)
    tree = cKDTree(xy)
    for a in range(0, n, CHUNK):
        q = np.arange(a, min(n, a + CHUNK))
        j, _ = _nearest(tree, xy, q, k)
        s = np.zeros((len(q), values.shape[1]))
        for t in range(k):  # nearest first, one neighbour at a time (the contract's order of the sum)
            s += values[j[:, t]]
        out[a:a + len(q)] = s / k
    return out
