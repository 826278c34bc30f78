"""Fixed-radius neighbour search, Numba backend: ``knn_within`` and ``pairs_within``.

Same contract and results as :mod:`stemfast._kernels.numpy_ref.neighbors`: the points are bucketed
on a uniform grid (a counting sort), each query scans the cells its disc touches, in parallel.
Distances are compared squared (``dx * dx + dy * dy`` against ``radius * radius``).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

__all__ = ["knn_within", "pairs_within"]


@njit(cache=True)
def _bounds(pts):  # pragma: no cover - compiled
    """(x0, y0, x1, y1): the bounding box of ``pts`` [N >= 1, 2]; ValueError for a non-finite
    coordinate (it has no cell)."""
    for i in range(pts.shape[0]):
        if not (np.isfinite(pts[i, 0]) and np.isfinite(pts[i, 1])):
            raise ValueError("points must be finite (a NaN or inf coordinate)")
    x0 = pts[0, 0]
    x1 = x0
    y0 = pts[0, 1]
    y1 = y0
    for i in range(1, pts.shape[0]):
        x0 = min(x0, pts[i, 0])
        x1 = max(x1, pts[i, 0])
        y0 = min(y0, pts[i, 1])
        y1 = max(y1, pts[i, 1])
    return x0, y0, x1, y1


@njit(cache=True)
def _bucket(pts, x0, y0, x1, y1, c):  # pragma: no cover - compiled
    """(nx, ny, start, order, cxy): ``pts`` by square cell of side ``c`` from ``(x0, y0)`` (a counting
    sort, row-major; increasing index within a cell). Shared with :mod:`.references`."""
    n = pts.shape[0]
    nx = int(math.floor((x1 - x0) / c)) + 1
    ny = int(math.floor((y1 - y0) / c)) + 1
    cid = np.empty(n, np.int64)
    start = np.zeros(nx * ny + 1, np.int64)
    for i in range(n):
        cx = min(nx - 1, int((pts[i, 0] - x0) / c))
        cy = min(ny - 1, int((pts[i, 1] - y0) / c))
        cid[i] = cy * nx + cx
        start[cid[i] + 1] += 1
    for t in range(nx * ny):
        start[t + 1] += start[t]
    fillp = start[:-1].copy()
    order = np.empty(n, np.int64)
    cxy = np.empty((n, 2))
    for i in range(n):
        s = fillp[cid[i]]
        fillp[cid[i]] += 1
        order[s] = i
        cxy[s, 0] = pts[i, 0]
        cxy[s, 1] = pts[i, 1]
    return nx, ny, start, order, cxy


@njit(cache=True)
def _grid(pts, radius):  # pragma: no cover - compiled
    """(x0, y0, cell, nx, ny, start, order, cxy): points by cell, increasing index within a cell."""
    n = pts.shape[0]
    x0, y0, x1, y1 = _bounds(pts)
    wx = x1 - x0
    wy = y1 - y0
    # about 2 points per cell, at most the search radius, and never more than 4 N + 64 cells
    c = math.sqrt(max(wx * wy, 1e-300) / n * 2.0)
    c = min(c, radius)
    cmin = math.sqrt(max(wx * wy, 0.0) / (4.0 * n + 64.0))
    c = max(max(c, cmin), max((wx + wy) / (4.0 * n + 64.0), 1e-9))
    nx, ny, start, order, cxy = _bucket(pts, x0, y0, x1, y1, c)
    return x0, y0, c, nx, ny, start, order, cxy


@njit(cache=True, inline="always")
def _range(v, r, o, c, n):  # pragma: no cover - compiled
    """Cell range [lo, hi] covering [v - r, v + r] (slightly widened); lo > hi when it misses."""
    rr = r * (1.0 + 1e-9) + 1e-12
    a = np.floor((v - rr - o) / c)  # floats, compared before any conversion (math.floor's int64 saturates)
    b = np.floor((v + rr - o) / c)
    if not (b >= 0.0) or not (a <= n - 1):
        return 1, 0
    lo = 0 if a < 0.0 else int(a)
    hi = n - 1 if b > n - 1 else int(b)
    return lo, hi


@njit(parallel=True, cache=True)
def _knn_kernel(pts, qs, k, radius, dist, idx):  # pragma: no cover - compiled
    x0, y0, c, nx, ny, start, order, cxy = _grid(pts, radius)
    r2 = radius * radius
    for t in prange(qs.shape[0]):
        qx = qs[t, 0]
        qy = qs[t, 1]
        bd = np.empty(k)
        bi = np.empty(k, np.int64)
        cnt = 0
        cx0, cx1 = _range(qx, radius, x0, c, nx)
        cy0, cy1 = _range(qy, radius, y0, c, ny)
        if cx0 <= cx1 and cy0 <= cy1:
            for cy in range(cy0, cy1 + 1):
                for s in range(start[cy * nx + cx0], start[cy * nx + cx1 + 1]):
                    dx = cxy[s, 0] - qx
                    dy = cxy[s, 1] - qy
                    d2 = dx * dx + dy * dy
                    if not (d2 < r2):
                        continue
                    j = order[s]
                    if cnt == k and not (d2 < bd[k - 1] or (d2 == bd[k - 1] and j < bi[k - 1])):
                        continue
                    if cnt < k:
                        pos = cnt
                        cnt += 1
                    else:
                        pos = k - 1
                    while pos > 0 and (d2 < bd[pos - 1] or (d2 == bd[pos - 1] and j < bi[pos - 1])):
                        bd[pos] = bd[pos - 1]
                        bi[pos] = bi[pos - 1]
                        pos -= 1
                    bd[pos] = d2
                    bi[pos] = j
        for m in range(k):
            if m < cnt:
                dist[t, m] = math.sqrt(bd[m])
                idx[t, m] = bi[m]
            else:
                dist[t, m] = np.inf
                idx[t, m] = -1


def knn_within(points, queries, k, radius):
    """Numba implementation of the ``knn_within`` kernel (see :mod:`stemfast._kernels`)."""
    pts = np.ascontiguousarray(points, dtype=np.float64)
    qs = np.ascontiguousarray(queries, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError("knn_within: points must be [N, 2]")
    if qs.ndim != 2 or qs.shape[1] != 2:
        raise ValueError("knn_within: queries must be [M, 2]")
    k = int(k)
    if k < 1:
        raise ValueError("knn_within: k must be >= 1")
    if not (math.isfinite(radius) and radius > 0):
        raise ValueError("knn_within: radius must be finite and > 0")
    dist = np.full((len(qs), k), np.inf)
    idx = np.full((len(qs), k), -1, dtype=np.int64)
    if len(pts) and len(qs):
        _knn_kernel(pts, qs, k, float(radius), dist, idx)
    return dist, idx


@njit(cache=True, inline="always")
def _partners(i, pts, radius, x0, y0, c, nx, ny, start, order, cxy, dst, write):  # pragma: no cover - compiled
    """Count (and with ``write`` store into ``dst``) the points j > i within ``radius`` of point i."""
    qx = pts[i, 0]
    qy = pts[i, 1]
    r2 = radius * radius
    cnt = 0
    cx0, cx1 = _range(qx, radius, x0, c, nx)
    cy0, cy1 = _range(qy, radius, y0, c, ny)
    if cx0 <= cx1 and cy0 <= cy1:
        for cy in range(cy0, cy1 + 1):
            for s in range(start[cy * nx + cx0], start[cy * nx + cx1 + 1]):
                dx = cxy[s, 0] - qx
                dy = cxy[s, 1] - qy
                j = order[s]
                if dx * dx + dy * dy <= r2 and j > i:
                    if write:
                        dst[cnt] = j
                    cnt += 1
    return cnt


@njit(parallel=True, cache=True)
def _pairs_kernel(pts, radius):  # pragma: no cover - compiled
    x0, y0, c, nx, ny, start, order, cxy = _grid(pts, radius)
    n = pts.shape[0]
    offs = np.zeros(n + 1, np.int64)
    none = np.empty(0, np.int64)
    for i in prange(n):  # pass 1: partners j > i of every i
        offs[i + 1] = _partners(i, pts, radius, x0, y0, c, nx, ny, start, order, cxy, none, False)
    for i in range(n):
        offs[i + 1] += offs[i]
    flat = np.empty(offs[n], np.int64)
    for i in prange(n):  # pass 2: write them at the prefix offsets, sorted
        seg = flat[offs[i]:offs[i + 1]]
        _partners(i, pts, radius, x0, y0, c, nx, ny, start, order, cxy, seg, True)
        seg.sort()
    out = np.empty((offs[n], 2), np.int64)
    for i in prange(n):
        for t in range(offs[i], offs[i + 1]):
            out[t, 0] = i
            out[t, 1] = flat[t]
    return out


def pairs_within(points, radius):
    """Numba implementation of the ``pairs_within`` kernel (see :mod:`stemfast._kernels`)."""
    pts = np.ascontiguousarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError("pairs_within: points must be [N, 2]")
    if not (math.isfinite(radius) and radius > 0):
        raise ValueError("pairs_within: radius must be finite and > 0")
    if len(pts) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    return _pairs_kernel(pts, float(radius))
