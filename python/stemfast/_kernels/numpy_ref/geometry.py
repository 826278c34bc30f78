"""Geometry kernels, NumPy reference: local lattice fits and bilinear patch gather.

This module is the readable specification of ``fit_local_lattices``, ``gather_patches`` and
``gather_resampled`` (see the contract in :mod:`stemfast._kernels`). It is vectorised over sites /
patches and processes them in chunks so that memory stays bounded; the compiled backends must agree
with it.

Arithmetic conventions shared by all backends (so that integer rounding is identical):

* ``inv(B)`` is the closed-form 2x2 inverse ``[[b11, -b01], [-b10, b00]]``, each entry divided by
  ``det = b00 * b11 - b01 * b10``; a basis with ``det == 0`` (or non-finite) fails the pass.
* ``e = d - o``; ``m = floor(ex * i00 + ey * i10 + 0.5)``, ``n = floor(ex * i01 + ey * i11 + 0.5)``.
* ``r = e - (m * a1 + n * a2)``; a point is used when ``rx * rx + ry * ry <= t * t`` with
  ``t = outlier_tol * (|a1| + |a2|) / 2`` (the same as ``|r| <= t``).
* the site itself enters once with ``d = 0`` (entries of its neighbour row equal to the site are
  skipped), then every neighbour ``j >= 0`` of the row, in row order; it obeys the same outlier rule.
* ``rms`` is taken over the points used in the final successful pass, with that pass's ``(m, n)``
  and the model fitted by it.
"""
from __future__ import annotations

import numpy as np

__all__ = ["fit_local_lattices", "gather_patches", "gather_resampled"]

_SITE_CHUNK = 1 << 15
_PATCH_CHUNK = 1 << 11
_SINGULAR_RTOL = 1e-9
_MIN_POINTS = 4


def fit_local_lattices(xy, neighbors, basis0, n_iter, outlier_tol):
    """Reference implementation of the ``fit_local_lattices`` kernel (see :mod:`stemfast._kernels`)."""
    xy = np.asarray(xy, dtype=np.float64)
    neighbors = np.asarray(neighbors, dtype=np.int64)
    basis0 = np.asarray(basis0, dtype=np.float64)
    n_sites = xy.shape[0]
    if neighbors.ndim != 2 or neighbors.shape[0] != n_sites or basis0.shape != (n_sites, 2, 2):
        raise ValueError("fit_local_lattices: need xy [N, 2], neighbors [N, K], basis0 [N, 2, 2]")
    if neighbors.size and neighbors.max() >= n_sites:
        raise ValueError("fit_local_lattices: neighbour index out of range")
    origin = xy.copy()
    basis = basis0.copy()
    rms = np.full(n_sites, np.nan)
    n_used = np.zeros(n_sites, dtype=np.int64)
    for start in range(0, n_sites, _SITE_CHUNK):
        stop = min(n_sites, start + _SITE_CHUNK)
        o, b, r, n = _fit_chunk(xy, neighbors[start:stop], basis0[start:stop], start, int(n_iter),
                                float(outlier_tol))
        origin[start:stop] += o
        basis[start:stop] = b
        rms[start:stop] = r
        n_used[start:stop] = n
    return origin, basis, rms, n_used


def _fit_chunk(xy, nb, b0, start, n_iter, outlier_tol):
    """Fit the sites ``start .. start + len(nb)``; returns offsets ``o`` (not yet added to xy)."""
    ns, k = nb.shape
    site = np.arange(start, start + ns)

    # Point set of every site, padded to K + 1: the site itself (d = 0) first, then its neighbours.
    valid = np.ones((ns, k + 1), dtype=bool)
    valid[:, 1:] = (nb >= 0) & (nb != site[:, None])
    d = np.zeros((ns, k + 1, 2))
    d[:, 1:] = xy[np.where(valid[:, 1:], nb, 0)] - xy[site][:, None, :]
    dx, dy = d[..., 0], d[..., 1]

    o = np.zeros((ns, 2))
    B = b0.copy()
    alive = np.ones(ns, dtype=bool)  # no pass has failed yet
    rms = np.full(ns, np.nan)
    n_used = np.zeros(ns, dtype=np.int64)

    for _ in range(n_iter):
        if not alive.any():
            break
        b00, b01, b10, b11 = B[:, 0, 0], B[:, 0, 1], B[:, 1, 0], B[:, 1, 1]
        # batched closed-form 2x2 inverse (rows of B are a1, a2; [m, n] = e @ inv(B))
        det_b = b00 * b11 - b01 * b10
        basis_ok = np.isfinite(det_b) & (det_b != 0.0)
        safe = np.where(basis_ok, det_b, 1.0)
        i00, i01, i10, i11 = b11 / safe, -b01 / safe, -b10 / safe, b00 / safe

        # index assignment and residuals under the current model
        ex = dx - o[:, 0:1]
        ey = dy - o[:, 1:2]
        m = np.floor(ex * i00[:, None] + ey * i10[:, None] + 0.5)
        n = np.floor(ex * i01[:, None] + ey * i11[:, None] + 0.5)
        rx = ex - (m * b00[:, None] + n * b10[:, None])
        ry = ey - (m * b01[:, None] + n * b11[:, None])
        t = outlier_tol * (np.sqrt(b00 * b00 + b01 * b01) + np.sqrt(b10 * b10 + b11 * b11)) / 2.0
        use = valid & (rx * rx + ry * ry <= (t * t)[:, None]) & (alive & basis_ok)[:, None]
        cnt = use.sum(axis=1)

        # masked normal equations of d ~ o + m a1 + n a2: A [ns, 3, 3], rhs [ns, 3, 2]
        w = use.astype(np.float64)
        phi = np.stack([w, w * m, w * n], axis=-1)          # [ns, K+1, 3] (zero where unused)
        design = np.stack([np.ones_like(m), m, n], axis=-1)  # [ns, K+1, 3]
        A = np.einsum("spi,spj->sij", phi, design)
        rhs = np.einsum("spi,spc->sic", phi, d)

        # singularity rule |det A| <= 1e-9 * trace(A)^3 (A holds exact integers)
        det_a = (A[:, 0, 0] * (A[:, 1, 1] * A[:, 2, 2] - A[:, 1, 2] * A[:, 2, 1])
                 - A[:, 0, 1] * (A[:, 1, 0] * A[:, 2, 2] - A[:, 1, 2] * A[:, 2, 0])
                 + A[:, 0, 2] * (A[:, 1, 0] * A[:, 2, 1] - A[:, 1, 1] * A[:, 2, 0]))
        trace = A[:, 0, 0] + A[:, 1, 1] + A[:, 2, 2]
        good = alive & basis_ok & (cnt >= _MIN_POINTS) & (np.abs(det_a) > _SINGULAR_RTOL * trace ** 3)

        if good.any():
            X = np.linalg.solve(A[good], rhs[good])          # rows: o, a1, a2
            o[good] = X[:, 0]
            B[good] = X[:, 1:3]
            # rms over this pass's used points, with this pass's (m, n) and the new model
            g = np.flatnonzero(good)
            ox, oy = o[g, 0:1], o[g, 1:2]
            fx = dx[g] - ox - (m[g] * B[g, 0, 0][:, None] + n[g] * B[g, 1, 0][:, None])
            fy = dy[g] - oy - (m[g] * B[g, 0, 1][:, None] + n[g] * B[g, 1, 1][:, None])
            ss = np.where(use[g], fx * fx + fy * fy, 0.0).sum(axis=1)
            rms[g] = np.sqrt(ss / cnt[g])
            n_used[g] = cnt[g]
        alive = good
    return o, B, rms, n_used


def _sample_chunk(img, xy, size, fill, w, h):
    """float64 bilinear patches [n, size, size] of the float64 image ``img`` and their edge flags."""
    offs = np.arange(size) - (size - 1) / 2.0  # exact half-integers
    sx = xy[:, 0:1] + offs[None, :]   # [n, S] sample columns
    sy = xy[:, 1:2] + offs[None, :]   # [n, S] sample rows
    in_x = (sx >= 0) & (sx <= w - 1)
    in_y = (sy >= 0) & (sy <= h - 1)
    # floor and the 4 neighbours; the neighbour past the last pixel has weight 0 (f == 0 there)
    x0 = np.floor(np.clip(sx, 0, w - 1))
    y0 = np.floor(np.clip(sy, 0, h - 1))
    fx = np.where(in_x, sx - x0, 0.0)
    fy = np.where(in_y, sy - y0, 0.0)
    x0 = x0.astype(np.int64)
    y0 = y0.astype(np.int64)
    x1 = np.minimum(x0 + 1, w - 1)
    y1 = np.minimum(y0 + 1, h - 1)
    # [n, S(rows), S(cols)]
    r0, r1 = y0[:, :, None], y1[:, :, None]
    c0, c1 = x0[:, None, :], x1[:, None, :]
    gx = fx[:, None, :]
    gy = fy[:, :, None]
    top = (1.0 - gx) * img[r0, c0] + gx * img[r0, c1]
    bot = (1.0 - gx) * img[r1, c0] + gx * img[r1, c1]
    val = (1.0 - gy) * top + gy * bot
    inside = in_y[:, :, None] & in_x[:, None, :]
    return np.where(inside, val, float(fill)), ~inside.all(axis=(1, 2))


def gather_patches(image, xy, size, fill, out):
    """Reference implementation of the ``gather_patches`` kernel (see :mod:`stemfast._kernels`)."""
    image = np.asarray(image)
    xy = np.asarray(xy, dtype=np.float64)
    size = int(size)
    h, w = image.shape
    n_patches = xy.shape[0]
    if out.shape != (n_patches, size, size) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError("gather_patches: out must be C-contiguous float32 [N, size, size]")
    edge = np.zeros(n_patches, dtype=np.uint8)
    # the image is float32 by contract (the other backends convert to it); sample in float64
    img = image.astype(np.float32, copy=False).astype(np.float64)
    for start in range(0, n_patches, _PATCH_CHUNK):
        stop = min(n_patches, start + _PATCH_CHUNK)
        out[start:stop], edge[start:stop] = _sample_chunk(img, xy[start:stop], size, fill, w, h)
    return edge


def gather_resampled(image, xy, size, weights, fill, center, scale, out):
    """Reference implementation of the ``gather_resampled`` kernel (see :mod:`stemfast._kernels`)."""
    image = np.asarray(image)
    xy = np.asarray(xy, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    size = int(size)
    h, w = image.shape
    n_patches = xy.shape[0]
    if weights.ndim != 2 or weights.shape[1] != size or weights.shape[0] < 1:
        raise ValueError("gather_resampled: weights must be [M, size] with M >= 1")
    if not (np.isfinite(scale) and scale != 0):
        raise ValueError("gather_resampled: scale must be finite, != 0")
    m = weights.shape[0]
    if out.shape != (n_patches, m, m) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError("gather_resampled: out must be C-contiguous float32 [N, M, M]")
    edge = np.zeros(n_patches, dtype=np.uint8)
    img = image.astype(np.float32, copy=False).astype(np.float64)
    for start in range(0, n_patches, _PATCH_CHUNK):
        stop = min(n_patches, start + _PATCH_CHUNK)
        patch, edge[start:stop] = _sample_chunk(img, xy[start:stop], size, fill, w, h)
        res = weights @ patch @ weights.T  # [n, M, M]: W P W^T
        out[start:stop] = (res - float(center)) / float(scale)
    return edge
