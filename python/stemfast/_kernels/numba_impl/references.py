"""Statistics over each site's k nearest sites, Numba backend: ``local_references`` and ``neighbour_mean``.

Same contract and results as :mod:`stemfast._kernels.numpy_ref.references`: the points are bucketed
on a uniform grid of about 2 points per cell; each query collects every point within a radius that
should hold k of them (growing it until it does) and keeps the k smallest (squared distance, index)
pairs; blocks of queries run in parallel.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .neighbors import _bounds, _bucket, _range

__all__ = ["local_references", "neighbour_mean"]

#: queries per parallel block (the buffers are allocated once per block)
_BLOCK = 256


@njit(cache=True)
def _grid(pts):  # pragma: no cover - compiled
    """(x0, y0, x1, y1, cell, density, nx, ny, start, order, cxy): points by cell."""
    n = pts.shape[0]
    x0, y0, x1, y1 = _bounds(pts)
    wx = x1 - x0
    wy = y1 - y0
    area = max(wx * wy, max(wx, wy) * max(wx, wy) * 1e-6)
    density = n / max(area, 1e-300)
    c = max(max(math.sqrt(2.0 / density), (wx + wy) / (4.0 * n + 64.0)), 1e-9)
    nx, ny, start, order, cxy = _bucket(pts, x0, y0, x1, y1, c)
    return x0, y0, x1, y1, c, density, nx, ny, start, order, cxy


@njit(cache=True, inline="always")
def _collect(qx, qy, r, g, cd2, cj):  # pragma: no cover - compiled
    """Every point with ``dx * dx + dy * dy <= r * r`` into ``cd2, cj``; (count, whole grid searched)."""
    x0, y0, x1, y1, c, _, nx, ny, start, order, cxy = g
    r2 = r * r
    cnt = 0
    cx0, cx1 = _range(qx, r, x0, c, nx)
    cy0, cy1 = _range(qy, r, y0, c, ny)
    if cx0 <= cx1 and cy0 <= cy1:
        for cy in range(cy0, cy1 + 1):
            for s in range(start[cy * nx + cx0], start[cy * nx + cx1 + 1]):
                dx = cxy[s, 0] - qx
                dy = cxy[s, 1] - qy
                d2 = dx * dx + dy * dy
                if d2 <= r2:
                    cd2[cnt] = d2
                    cj[cnt] = order[s]
                    cnt += 1
    fx = max(qx - x0, x1 - qx)
    fy = max(qy - y0, y1 - qy)
    return cnt, fx * fx + fy * fy <= r2  # the disc holds the whole bounding box: every (finite) point seen


@njit(cache=True, inline="always")
def _less(d2, j, a, b):  # pragma: no cover - compiled
    """(d2[a], j[a]) < (d2[b], j[b]), lexicographically."""
    return d2[a] < d2[b] or (d2[a] == d2[b] and j[a] < j[b])


@njit(cache=True, inline="always")
def _swap(d2, j, a, b):  # pragma: no cover - compiled
    d2[a], d2[b] = d2[b], d2[a]
    j[a], j[b] = j[b], j[a]


@njit(cache=True)
def _select(d2, j, cnt, kth):  # pragma: no cover - compiled
    """Reorder the pairs ``(d2, j)[:cnt]`` so that the ``kth`` smallest (lexicographically) is at ``kth``
    with the smaller ones before it (quickselect, median-of-three pivots)."""
    lo = 0
    hi = cnt - 1
    while hi > lo:
        mid = (lo + hi) // 2
        if _less(d2, j, mid, lo):
            _swap(d2, j, mid, lo)
        if _less(d2, j, hi, lo):
            _swap(d2, j, hi, lo)
        if _less(d2, j, hi, mid):
            _swap(d2, j, hi, mid)
        _swap(d2, j, mid, hi)  # pivot (the median of three) at hi
        store = lo
        for t in range(lo, hi):
            if _less(d2, j, t, hi):
                _swap(d2, j, t, store)
                store += 1
        _swap(d2, j, store, hi)
        if store == kth:
            return
        if store < kth:
            lo = store + 1
        else:
            hi = store - 1


@njit(cache=True)
def _nearest(qx, qy, k, g, cd2, cj):  # pragma: no cover - compiled
    """The k nearest points of (qx, qy) into ``cd2[:k], cj[:k]`` (in no order; ties by index), with
    the k-th nearest at ``k - 1``; returns how many were found (k, or fewer only for non-finite points)."""
    density = g[5]
    r = math.sqrt(k / (math.pi * density)) * 1.05 + 0.5 * g[4]
    while True:
        cnt, everything = _collect(qx, qy, r, g, cd2, cj)
        if cnt >= k or everything:
            break
        r *= max(1.25, math.sqrt(k / max(cnt, 1)))
    k = min(k, cnt)
    if k > 0:
        _select(cd2, cj, cnt, k - 1)
    return k


@njit(cache=True)
def _sort_pairs(d2, j, k):  # pragma: no cover - compiled
    """Sort ``(d2, j)[:k]`` lexicographically: by ``d2`` (quicksort), then an insertion pass that puts
    equal distances in index order (linear on the nearly sorted pairs)."""
    o = np.argsort(d2[:k])
    sd = d2[:k][o]
    sj = j[:k][o]
    d2[:k] = sd
    j[:k] = sj
    for t in range(1, k):
        u = t
        while u > 0 and _less(d2, j, u, u - 1):
            _swap(d2, j, u, u - 1)
            u -= 1


@njit(cache=True)
def _select1(a, cnt, kth):  # pragma: no cover - compiled
    """Reorder ``a[:cnt]`` so that its ``kth`` smallest value is at ``kth``, the smaller ones before it."""
    lo = 0
    hi = cnt - 1
    while hi > lo:
        mid = (lo + hi) // 2
        if a[mid] < a[lo]:
            a[mid], a[lo] = a[lo], a[mid]
        if a[hi] < a[lo]:
            a[hi], a[lo] = a[lo], a[hi]
        if a[hi] < a[mid]:
            a[hi], a[mid] = a[mid], a[hi]
        a[mid], a[hi] = a[hi], a[mid]
        p = a[hi]
        store = lo
        for t in range(lo, hi):
            if a[t] < p:
                a[t], a[store] = a[store], a[t]
                store += 1
        a[store], a[hi] = a[hi], a[store]
        if store == kth:
            return
        if store < kth:
            lo = store + 1
        else:
            hi = store - 1


@njit(cache=True)
def _median(a, c):  # pragma: no cover - compiled
    """0.5 * (lower + upper middle) of the sorted values of ``a[:c]`` (c >= 1; ``a`` is reordered)."""
    hi = c // 2
    _select1(a, c, hi)
    h = a[hi]
    lo = h
    if (c - 1) // 2 != hi:
        lo = a[0]
        for t in range(1, hi):
            lo = max(lo, a[t])
    return 0.5 * (lo + h)


@njit(cache=True)
def _site_stats(i, xy, inv, values, refable, tol, nbr, k, buf, med, mad, cnt):  # pragma: no cover - compiled
    """Median, MAD and count of each relative colour of site ``i``'s on-node neighbours ``nbr[:k]``."""
    qx = xy[i, 0]
    qy = xy[i, 1]
    nb = np.zeros(3, np.int64)
    for t in range(k):
        j = nbr[t]
        if j == i or not refable[j]:
            continue
        x = xy[j, 0] - qx
        y = xy[j, 1] - qy
        m = x * inv[i, 0, 0] + y * inv[i, 1, 0]
        n = x * inv[i, 0, 1] + y * inv[i, 1, 1]
        rm = np.rint(m)
        rn = np.rint(n)
        if not (abs(m - rm) < tol and abs(n - rn) < tol):  # NaN (no basis): not on a node
            continue
        c = int(rm - rn) % 3
        buf[c, nb[c]] = values[j]
        nb[c] += 1
    for c in range(3):
        cnt[c] = nb[c]
        if nb[c] == 0:
            med[c] = np.nan
            mad[c] = np.nan
            continue
        v = buf[c]
        md = _median(v, nb[c])
        med[c] = md
        for u in range(nb[c]):
            v[u] = abs(v[u] - md)
        mad[c] = 1.4826 * _median(v, nb[c])


@njit(parallel=True, cache=True)
def _references_kernel(xy, inv, values, refable, rows, k, tol, med, mad, cnt, reach):  # pragma: no cover
    g = _grid(xy)
    n = xy.shape[0]
    m = rows.shape[0]
    for b in prange((m + _BLOCK - 1) // _BLOCK):
        cd2 = np.empty(n)
        cj = np.empty(n, np.int64)
        buf = np.empty((3, k))
        for t in range(b * _BLOCK, min(m, (b + 1) * _BLOCK)):
            i = rows[t]
            got = _nearest(xy[i, 0], xy[i, 1], k, g, cd2, cj)
            reach[t] = math.sqrt(cd2[got - 1]) if got > 0 else np.nan
            _site_stats(i, xy, inv, values, refable, tol, cj, got, buf, med[t], mad[t], cnt[t])


def local_references(xy, inv_basis, values, refable, rows, k, tol):
    """Numba implementation of the ``local_references`` kernel (see :mod:`stemfast._kernels`)."""
    xy = np.ascontiguousarray(xy, np.float64)
    n = len(xy)
    inv = np.ascontiguousarray(inv_basis, np.float64).reshape(n, 2, 2)
    values = np.ascontiguousarray(values, np.float64)
    refable = np.ascontiguousarray(refable, np.bool_)
    rows = np.ascontiguousarray(rows, np.int64)
    k = int(k)
    if not 1 <= k <= n:
        raise ValueError("local_references: k must be in [1, N]")
    if len(rows) and (rows.min() < 0 or rows.max() >= n):
        raise ValueError("local_references: rows out of range")
    m = len(rows)
    med = np.full((m, 3), np.nan)
    mad = np.full((m, 3), np.nan)
    cnt = np.zeros((m, 3), np.int64)
    reach = np.full(m, np.nan)
    if m:
        _references_kernel(xy, inv, values, refable, rows, k, float(tol), med, mad, cnt, reach)
    return med, mad, cnt, reach


@njit(parallel=True, cache=True)
def _mean_kernel(xy, values, k, out):  # pragma: no cover - compiled
    g = _grid(xy)
    n = xy.shape[0]
    L = values.shape[1]
    for b in prange((n + _BLOCK - 1) // _BLOCK):
        cd2 = np.empty(n)
        cj = np.empty(n, np.int64)
        for i in range(b * _BLOCK, min(n, (b + 1) * _BLOCK)):
            got = _nearest(xy[i, 0], xy[i, 1], k, g, cd2, cj)
            _sort_pairs(cd2, cj, got)
            for col in range(L):
                out[i, col] = 0.0
            for t in range(got):
                for col in range(L):
                    out[i, col] += values[cj[t], col]
            for col in range(L):
                out[i, col] /= k


def neighbour_mean(xy, values, k):
    """Numba implementation of the ``neighbour_mean`` kernel (see :mod:`stemfast._kernels`)."""
    xy = np.ascontiguousarray(xy, np.float64)
    values = np.ascontiguousarray(values, np.float64)
    if values.ndim != 2 or len(values) != len(xy):
        raise ValueError("neighbour_mean: values must be [N, L]")
    k = int(k)
    if not 1 <= k <= len(xy):
        raise ValueError("neighbour_mean: k must be in [1, N]")
    out = np.empty_like(values)
    _mean_kernel(xy, values, k, out)
    return out
