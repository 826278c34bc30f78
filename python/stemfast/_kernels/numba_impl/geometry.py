"""Geometry kernels, Numba backend: local lattice fits and bilinear patch gather.

Same contract and the same arithmetic (operation order, ``floor(v + 0.5)`` rounding, closed-form
2x2 inverse, ``r^2 <= t^2`` outlier test) as the NumPy reference
:mod:`stemfast._kernels.numpy_ref.geometry`; parallel over sites / patches with ``prange`` and no
allocation inside the per-site loops.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import get_thread_id, njit, prange

__all__ = ["fit_local_lattices", "gather_patches", "gather_resampled"]

_SINGULAR_RTOL = 1e-9
_MIN_POINTS = 4


@njit(parallel=True, cache=True)
def _fit_kernel(xy, nb, basis0, n_iter, outlier_tol, origin, basis, rms, n_used, track_mn, track_used):  # pragma: no cover
    """Per-site passes as in the contract. ``track_*`` [threads, K + 1, ...] hold each thread's last pass
    assignment: when a pass reproduces the previous successful pass's assignment its fit would be
    identical, so the site stops there (bit-identical result) and that pass's residuals give the rms."""
    n_sites = xy.shape[0]
    k_nb = nb.shape[1]
    for i in prange(n_sites):
        tid = get_thread_id()
        xi = xy[i, 0]
        yi = xy[i, 1]
        # current model (o, B) and the model the last successful pass started from (p)
        ox = 0.0
        oy = 0.0
        b00 = basis0[i, 0, 0]
        b01 = basis0[i, 0, 1]
        b10 = basis0[i, 1, 0]
        b11 = basis0[i, 1, 1]
        px = 0.0
        py = 0.0
        p00 = b00
        p01 = b01
        p10 = b10
        p11 = b11
        ok = False
        done = False
        cnt_final = 0.0
        rms_i = np.nan
        for _it in range(n_iter):
            det_b = b00 * b11 - b01 * b10
            if not (math.isfinite(det_b) and det_b != 0.0):
                break
            i00 = b11 / det_b
            i01 = -b01 / det_b
            i10 = -b10 / det_b
            i11 = b00 / det_b
            t = outlier_tol * (math.sqrt(b00 * b00 + b01 * b01) + math.sqrt(b10 * b10 + b11 * b11)) / 2.0
            t2 = t * t
            s0 = 0.0
            sm = 0.0
            sn = 0.0
            smm = 0.0
            smn = 0.0
            snn = 0.0
            rx0 = 0.0
            ry0 = 0.0
            rxm = 0.0
            rym = 0.0
            rxn = 0.0
            ryn = 0.0
            ss = 0.0
            same = ok
            q = 0
            # the site itself (d = 0), then its neighbours
            for col in range(-1, k_nb):
                if col < 0:
                    dx = 0.0
                    dy = 0.0
                else:
                    j = nb[i, col]
                    if j < 0 or j == i:
                        continue
                    dx = xy[j, 0] - xi
                    dy = xy[j, 1] - yi
                ex = dx - ox
                ey = dy - oy
                m = math.floor(ex * i00 + ey * i10 + 0.5)
                n = math.floor(ex * i01 + ey * i11 + 0.5)
                rx = ex - (m * b00 + n * b10)
                ry = ey - (m * b01 + n * b11)
                r2 = rx * rx + ry * ry
                use = r2 <= t2
                if same:
                    if use != (track_used[tid, q] != 0):
                        same = False
                    elif use and (m != track_mn[tid, q, 0] or n != track_mn[tid, q, 1]):
                        same = False
                track_mn[tid, q, 0] = m
                track_mn[tid, q, 1] = n
                track_used[tid, q] = 1 if use else 0
                q += 1
                if use:
                    s0 += 1.0
                    sm += m
                    sn += n
                    smm += m * m
                    smn += m * n
                    snn += n * n
                    rx0 += dx
                    ry0 += dy
                    rxm += m * dx
                    rym += m * dy
                    rxn += n * dx
                    ryn += n * dy
                    ss += r2
            if same:  # converged: this pass would refit the current model exactly
                rms_i = math.sqrt(ss / s0)
                done = True
                break
            if s0 < _MIN_POINTS:
                break
            # A = [[s0, sm, sn], [sm, smm, smn], [sn, smn, snn]]; adjugate (symmetric) and determinant
            c00 = smm * snn - smn * smn
            c01 = sn * smn - sm * snn
            c02 = sm * smn - sn * smm
            c11 = s0 * snn - sn * sn
            c12 = sm * sn - s0 * smn
            c22 = s0 * smm - sm * sm
            det_a = s0 * c00 + sm * c01 + sn * c02
            tr = s0 + smm + snn
            if not (abs(det_a) > _SINGULAR_RTOL * tr * tr * tr):
                break
            px = ox
            py = oy
            p00 = b00
            p01 = b01
            p10 = b10
            p11 = b11
            ox = (c00 * rx0 + c01 * rxm + c02 * rxn) / det_a
            oy = (c00 * ry0 + c01 * rym + c02 * ryn) / det_a
            b00 = (c01 * rx0 + c11 * rxm + c12 * rxn) / det_a
            b01 = (c01 * ry0 + c11 * rym + c12 * ryn) / det_a
            b10 = (c02 * rx0 + c12 * rxm + c22 * rxn) / det_a
            b11 = (c02 * ry0 + c12 * rym + c22 * ryn) / det_a
            ok = True
            cnt_final = s0
        origin[i, 0] = xi + ox
        origin[i, 1] = yi + oy
        basis[i, 0, 0] = b00
        basis[i, 0, 1] = b01
        basis[i, 1, 0] = b10
        basis[i, 1, 1] = b11
        if done:
            rms[i] = rms_i
            n_used[i] = int(s0)
            continue
        n_used[i] = int(cnt_final)
        if not ok:
            rms[i] = np.nan
            continue
        # rms of the final model over the points of the final pass: redo that pass's assignment
        # with the model it started from (p), measure the residual with the fitted one (o, b)
        det_b = p00 * p11 - p01 * p10
        i00 = p11 / det_b
        i01 = -p01 / det_b
        i10 = -p10 / det_b
        i11 = p00 / det_b
        t = outlier_tol * (math.sqrt(p00 * p00 + p01 * p01) + math.sqrt(p10 * p10 + p11 * p11)) / 2.0
        t2 = t * t
        ss = 0.0
        for col in range(-1, k_nb):
            if col < 0:
                dx = 0.0
                dy = 0.0
            else:
                j = nb[i, col]
                if j < 0 or j == i:
                    continue
                dx = xy[j, 0] - xi
                dy = xy[j, 1] - yi
            ex = dx - px
            ey = dy - py
            m = math.floor(ex * i00 + ey * i10 + 0.5)
            n = math.floor(ex * i01 + ey * i11 + 0.5)
            rx = ex - (m * p00 + n * p10)
            ry = ey - (m * p01 + n * p11)
            if rx * rx + ry * ry <= t2:
                fx = dx - ox - (m * b00 + n * b10)
                fy = dy - oy - (m * b01 + n * b11)
                ss += fx * fx + fy * fy
        rms[i] = math.sqrt(ss / cnt_final)


def fit_local_lattices(xy, neighbors, basis0, n_iter, outlier_tol):
    """Numba implementation of the ``fit_local_lattices`` kernel (see :mod:`stemfast._kernels`)."""
    xy = np.ascontiguousarray(xy, dtype=np.float64)
    neighbors = np.ascontiguousarray(neighbors, dtype=np.int64)
    basis0 = np.ascontiguousarray(basis0, dtype=np.float64)
    n_sites = xy.shape[0]
    if (xy.ndim != 2 or xy.shape[1] != 2 or neighbors.ndim != 2 or neighbors.shape[0] != n_sites
            or basis0.shape != (n_sites, 2, 2)):
        raise ValueError("fit_local_lattices: need xy [N, 2], neighbors [N, K], basis0 [N, 2, 2]")
    if neighbors.size and neighbors.max() >= n_sites:
        raise ValueError("fit_local_lattices: neighbour index out of range")
    origin = np.empty((n_sites, 2))
    basis = np.empty((n_sites, 2, 2))
    rms = np.empty(n_sites)
    n_used = np.empty(n_sites, dtype=np.int64)
    # per-thread scratch for the last pass's assignment (the site and its K neighbours)
    n_threads = max(numba.config.NUMBA_NUM_THREADS, numba.get_num_threads())
    track_mn = np.empty((n_threads, neighbors.shape[1] + 1, 2))
    track_used = np.empty((n_threads, neighbors.shape[1] + 1), dtype=np.uint8)
    _fit_kernel(xy, neighbors, basis0, int(n_iter), float(outlier_tol), origin, basis, rms, n_used,
                track_mn, track_used)
    return origin, basis, rms, n_used


@njit(cache=True, inline="always")
def _sample_patch(image, x, y, size, fillv, dst):  # pragma: no cover
    """Bilinear patch around (x, y) into dst[size, size] (cast to dst's dtype); 1 when a sample is outside."""
    h, w = image.shape
    half = (size - 1) / 2.0
    xmax = float(w - 1)
    ymax = float(h - 1)
    e = 0
    for r in range(size):
        sy = y + (r - half)
        if not (sy >= 0.0 and sy <= ymax):
            e = 1
            for c in range(size):
                dst[r, c] = fillv
            continue
        fy0 = math.floor(sy)
        y0 = int(fy0)
        gy = sy - fy0
        y1 = y0 + 1 if y0 < h - 1 else y0
        for c in range(size):
            sx = x + (c - half)
            if not (sx >= 0.0 and sx <= xmax):
                e = 1
                dst[r, c] = fillv
                continue
            fx0 = math.floor(sx)
            x0 = int(fx0)
            gx = sx - fx0
            x1 = x0 + 1 if x0 < w - 1 else x0
            top = (1.0 - gx) * image[y0, x0] + gx * image[y0, x1]
            bot = (1.0 - gx) * image[y1, x0] + gx * image[y1, x1]
            dst[r, c] = (1.0 - gy) * top + gy * bot
    return e


@njit(parallel=True, cache=True)
def _gather_kernel(image, xy, size, fill, out, edge):  # pragma: no cover
    fillf = np.float32(fill)
    for p in prange(xy.shape[0]):
        edge[p] = _sample_patch(image, xy[p, 0], xy[p, 1], size, fillf, out[p])


def gather_patches(image, xy, size, fill, out):
    """Numba implementation of the ``gather_patches`` kernel (see :mod:`stemfast._kernels`)."""
    image = np.ascontiguousarray(image, dtype=np.float32)
    xy = np.ascontiguousarray(xy, dtype=np.float64)
    size = int(size)
    n_patches = xy.shape[0]
    if out.shape != (n_patches, size, size) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError("gather_patches: out must be C-contiguous float32 [N, size, size]")
    if image.ndim != 2 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError("gather_patches: image must be a non-empty 2-D array")
    edge = np.zeros(n_patches, dtype=np.uint8)
    _gather_kernel(image, xy, size, float(fill), out, edge)
    return edge


@njit(parallel=True, cache=True)
def _gather_resampled_kernel(image, xy, size, weights, lo, hi, fill, center, scale, out, edge,
                             scratch_p, scratch_t):  # pragma: no cover
    m = weights.shape[0]
    inv = 1.0 / scale
    for p in prange(xy.shape[0]):
        tid = get_thread_id()
        P = scratch_p[tid]
        T = scratch_t[tid]
        edge[p] = _sample_patch(image, xy[p, 0], xy[p, 1], size, fill, P)
        for i in range(size):
            for c in range(m):
                s = 0.0
                for j in range(lo[c], hi[c]):
                    s += P[i, j] * weights[c, j]
                T[i, c] = s
        for r in range(m):
            for c in range(m):
                s = 0.0
                for i in range(lo[r], hi[r]):
                    s += weights[r, i] * T[i, c]
                out[p, r, c] = np.float32((s - center) * inv)


def gather_resampled(image, xy, size, weights, fill, center, scale, out):
    """Numba implementation of the ``gather_resampled`` kernel (see :mod:`stemfast._kernels`)."""
    image = np.ascontiguousarray(image, dtype=np.float32)
    xy = np.ascontiguousarray(xy, dtype=np.float64)
    weights = np.ascontiguousarray(weights, dtype=np.float64)
    size = int(size)
    n_patches = xy.shape[0]
    if image.ndim != 2 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError("gather_resampled: image must be a non-empty 2-D array")
    if weights.ndim != 2 or weights.shape[1] != size or weights.shape[0] < 1:
        raise ValueError("gather_resampled: weights must be [M, size] with M >= 1")
    if not (math.isfinite(scale) and scale != 0):
        raise ValueError("gather_resampled: scale must be finite, != 0")
    m = weights.shape[0]
    if out.shape != (n_patches, m, m) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError("gather_resampled: out must be C-contiguous float32 [N, M, M]")
    nz = weights != 0.0
    any_nz = nz.any(axis=1)
    lo = np.where(any_nz, np.argmax(nz, axis=1), 0).astype(np.int64)
    hi = np.where(any_nz, size - np.argmax(nz[:, ::-1], axis=1), 0).astype(np.int64)
    n_threads = max(numba.config.NUMBA_NUM_THREADS, numba.get_num_threads())
    scratch_p = np.empty((n_threads, size, size))
    scratch_t = np.empty((n_threads, size, m))
    edge = np.zeros(n_patches, dtype=np.uint8)
    _gather_resampled_kernel(image, xy, size, weights, lo, hi, float(fill), float(center), float(scale), out, edge,
                             scratch_p, scratch_t)
    return edge
