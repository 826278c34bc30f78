"""Image kernels, Numba backend: bandpass mask, local maxima, sub-pixel refinement.

Same functions, signatures and results as :mod:`stemfast._kernels.numpy_ref.image` (read that for
the exact definitions); this module only makes them fast: rows / sites run in parallel (``prange``),
local maxima reject most pixels with their nearest neighbours before scanning the whole disc, and
the Gaussian fits keep their 5x5 systems in small per-chunk scratch arrays.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

__all__ = ["bandpass_apply", "local_maxima", "refine_com", "refine_gauss"]

_TWO_PI2 = 2.0 * math.pi**2
_STEP_TOL = 1e-6  # x0, y0, s steps (px); A, B steps: times the disc's value range
_FTOL = 1e-10  # or the step's predicted cost reduction below this * cost
_LAMBDA0 = 1e-3
_CHUNK = 64  # sites per parallel work item in the refinement kernels


def _disc_offsets(radius: float, by_distance: bool) -> np.ndarray:
    """int64[K, 2] (dy, dx) disc offsets; raster order, or nearest first (stable) without (0, 0)."""
    r = int(math.floor(radius)) if radius > 0 else 0
    d = np.arange(-r, r + 1)
    dy, dx = np.meshgrid(d, d, indexing="ij")
    keep = (dy * dy + dx * dx).astype(np.float64) <= float(radius) * float(radius)
    offs = np.stack([dy[keep], dx[keep]], axis=1).astype(np.int64)
    if by_distance:
        offs = offs[np.any(offs != 0, axis=1)]
        offs = offs[np.argsort(offs[:, 0] ** 2 + offs[:, 1] ** 2, kind="stable")]
    return np.ascontiguousarray(offs)


# --------------------------------------------------------------------------------------------------
# bandpass
# --------------------------------------------------------------------------------------------------
@njit(parallel=True, cache=True, fastmath=False)
def _bandpass_apply(spec, height, width, ns, bs):  # pragma: no cover - compiled
    nrow, ncol = spec.shape
    a = _TWO_PI2 * ns * ns
    b = _TWO_PI2 * bs * bs
    ly = np.ones(nrow)
    hy = np.ones(nrow)
    lx = np.ones(ncol)
    hx = np.ones(ncol)
    for k in range(nrow):
        fy = (k if k <= height // 2 else k - height) / height
        if ns > 0:
            ly[k] = math.exp(-a * fy * fy)
        if bs > 0:
            hy[k] = math.exp(-b * fy * fy)
    for j in range(ncol):
        fx = j / width
        if ns > 0:
            lx[j] = math.exp(-a * fx * fx)
        if bs > 0:
            hx[j] = math.exp(-b * fx * fx)
    use_high = bs > 0
    for k in prange(nrow):
        for j in range(ncol):
            m = ly[k] * lx[j]
            if use_high:
                m *= 1.0 - hy[k] * hx[j]
            spec[k, j] = spec[k, j] * np.float32(m)


def bandpass_apply(spec, height, width, noise_sigma, background_sigma):
    """Multiply the ``rfft2`` spectrum in place by the band-pass mask (see the kernel contract)."""
    _bandpass_apply(spec, int(height), int(width), float(noise_sigma), float(background_sigma))


# --------------------------------------------------------------------------------------------------
# local maxima
# --------------------------------------------------------------------------------------------------
@njit(cache=True, fastmath=False, inline="always")
def _is_max(img, y, x, v, offs, h, w, r):  # pragma: no cover - compiled
    fast = y >= r and y < h - r and x >= r and x < w - r
    for t in range(offs.shape[0]):
        dy = offs[t, 0]
        dx = offs[t, 1]
        qy = y + dy
        qx = x + dx
        if not fast:
            if qy < 0 or qy >= h or qx < 0 or qx >= w:
                continue
        q = img[qy, qx]
        if dy > 0 or (dy == 0 and dx > 0):
            if q >= v:
                return False
        else:
            if q > v:
                return False
    return True


@njit(parallel=True, cache=True, fastmath=False)
def _local_maxima(img, offs, r, threshold, border):  # pragma: no cover - compiled
    h, w = img.shape
    y0 = border
    y1 = max(h - border, border)
    x0 = border
    x1 = max(w - border, border)
    nrow = y1 - y0
    flags = np.zeros((max(nrow, 0), max(x1 - x0, 0)), dtype=np.uint8)
    counts = np.zeros(max(nrow, 0) + 1, dtype=np.int64)
    for i in prange(nrow):
        y = y0 + i
        c = 0
        for x in range(x0, x1):
            v = img[y, x]
            if not (np.float64(v) > threshold):
                continue
            if _is_max(img, y, x, v, offs, h, w, r):
                flags[i, x - x0] = 1
                c += 1
        counts[i + 1] = c
    starts = np.cumsum(counts)
    out = np.empty((starts[-1], 2), dtype=np.int64)
    for i in prange(nrow):
        k = starts[i]
        for j in range(x1 - x0):
            if flags[i, j]:
                out[k, 0] = x0 + j
                out[k, 1] = y0 + i
                k += 1
    return out


def local_maxima(image, radius, threshold, border):
    """(x, y) int64[N, 2] of the disc maxima of ``image`` above ``threshold``, raster order."""
    offs = _disc_offsets(float(radius), True)
    r = int(np.abs(offs).max()) if len(offs) else 0
    return _local_maxima(image, offs, r, float(threshold), max(int(border), 0))


# --------------------------------------------------------------------------------------------------
# refinement
# --------------------------------------------------------------------------------------------------
@njit(cache=True, fastmath=False)
def _round_half_up(v):  # pragma: no cover - compiled
    return int(math.floor(v + 0.5))


@njit(parallel=True, cache=True, fastmath=False)
def _refine_com(img, xy, offs):  # pragma: no cover - compiled
    h, w = img.shape
    n = xy.shape[0]
    out = np.empty((n, 2), dtype=np.float64)
    for i in prange(n):
        cx = _round_half_up(xy[i, 0])
        cy = _round_half_up(xy[i, 1])
        vmin = np.inf
        for t in range(offs.shape[0]):
            qy = cy + offs[t, 0]
            qx = cx + offs[t, 1]
            if qy >= 0 and qy < h and qx >= 0 and qx < w:
                v = np.float64(img[qy, qx])
                if v < vmin:
                    vmin = v
        sw = 0.0
        sx = 0.0
        sy = 0.0
        for t in range(offs.shape[0]):
            qy = cy + offs[t, 0]
            qx = cx + offs[t, 1]
            if qy >= 0 and qy < h and qx >= 0 and qx < w:
                wt = np.float64(img[qy, qx]) - vmin
                sw += wt
                sx += wt * offs[t, 1]
                sy += wt * offs[t, 0]
        if sw > 0:
            out[i, 0] = cx + sx / sw
            out[i, 1] = cy + sy / sw
        else:
            out[i, 0] = cx
            out[i, 1] = cy
    return out


def refine_com(image, xy, radius):
    """Centre of mass of ``image - min`` over the disc around ``round(xy)`` -> float64[N, 2]."""
    return _refine_com(image, xy, _disc_offsets(float(radius), False))


@njit(cache=True, fastmath=False, error_model="numpy")
def _eval(p, ddx, ddy, val, m, jtj, jtr):  # pragma: no cover - compiled
    """Cost (sum of squared residuals) at p; fills the normal equations J^T J, J^T r."""
    x0 = p[0]
    y0 = p[1]
    a = p[2]
    s = p[3]
    b = p[4]
    inv2s2 = 1.0 / (2.0 * s * s)
    is2 = 1.0 / (s * s)
    is3 = is2 / s
    h00 = h10 = h11 = h20 = h21 = h22 = h30 = h31 = h32 = h33 = 0.0
    h40 = h41 = h42 = h43 = h44 = 0.0
    g0 = g1 = g2 = g3 = g4 = 0.0
    cost = 0.0
    for k in range(m):
        ex = ddx[k] - x0
        ey = ddy[k] - y0
        d2 = ex * ex + ey * ey
        gk = math.exp(-d2 * inv2s2)
        r = val[k] - (b + a * gk)
        cost += r * r
        ag = a * gk
        j0 = ag * ex * is2
        j1 = ag * ey * is2
        j2 = gk
        j3 = ag * d2 * is3
        h00 += j0 * j0
        h10 += j1 * j0
        h11 += j1 * j1
        h20 += j2 * j0
        h21 += j2 * j1
        h22 += j2 * j2
        h30 += j3 * j0
        h31 += j3 * j1
        h32 += j3 * j2
        h33 += j3 * j3
        h40 += j0
        h41 += j1
        h42 += j2
        h43 += j3
        h44 += 1.0
        g0 += j0 * r
        g1 += j1 * r
        g2 += j2 * r
        g3 += j3 * r
        g4 += r
    jtj[0, 0] = h00
    jtj[1, 0] = jtj[0, 1] = h10
    jtj[1, 1] = h11
    jtj[2, 0] = jtj[0, 2] = h20
    jtj[2, 1] = jtj[1, 2] = h21
    jtj[2, 2] = h22
    jtj[3, 0] = jtj[0, 3] = h30
    jtj[3, 1] = jtj[1, 3] = h31
    jtj[3, 2] = jtj[2, 3] = h32
    jtj[3, 3] = h33
    jtj[4, 0] = jtj[0, 4] = h40
    jtj[4, 1] = jtj[1, 4] = h41
    jtj[4, 2] = jtj[2, 4] = h42
    jtj[4, 3] = jtj[3, 4] = h43
    jtj[4, 4] = h44
    jtr[0] = g0
    jtr[1] = g1
    jtr[2] = g2
    jtr[3] = g3
    jtr[4] = g4
    return cost


@njit(cache=True, fastmath=False, error_model="numpy")
def _ldl_solve(mat, rhs, L, dd, x):  # pragma: no cover - compiled
    """Solve mat x = rhs (5x5 SPD) by L D L^T, same operation order as the reference."""
    p = 5
    for j in range(p):
        dj = mat[j, j]
        for k in range(j):
            dj -= L[j, k] * L[j, k] * dd[k]
        if not (dj > 0):
            return False
        dd[j] = dj
        inv = 1.0 / dj
        for i in range(j + 1, p):
            s = mat[i, j]
            for k in range(j):
                s -= L[i, k] * L[j, k] * dd[k]
            L[i, j] = s * inv
    for i in range(p):
        s = rhs[i]
        for k in range(i):
            s -= L[i, k] * x[k]
        x[i] = s
    for i in range(p - 1, -1, -1):
        s = x[i] / dd[i]
        for k in range(i + 1, p):
            s -= L[k, i] * x[k]
        x[i] = s
    return True


@njit(parallel=True, cache=True, fastmath=False, error_model="numpy")
def _refine_gauss(img, xy, offs, radius, sigma0, n_iter):  # pragma: no cover - compiled
    h, w = img.shape
    n = xy.shape[0]
    kmax = offs.shape[0]
    out = np.empty((n, 6), dtype=np.float64)
    nchunk = (n + _CHUNK - 1) // _CHUNK
    for ch in prange(nchunk):
        ddx = np.empty(kmax)
        ddy = np.empty(kmax)
        val = np.empty(kmax)
        jtj = np.empty((5, 5))
        jtr = np.empty(5)
        jtj_t = np.empty((5, 5))
        jtr_t = np.empty(5)
        mat = np.empty((5, 5))
        L = np.zeros((5, 5))
        z = np.empty(5)
        delta = np.empty(5)
        p = np.empty(5)
        pt = np.empty(5)
        for i in range(ch * _CHUNK, min(n, (ch + 1) * _CHUNK)):
            x = xy[i, 0]
            y = xy[i, 1]
            cx = _round_half_up(x)
            cy = _round_half_up(y)
            if cx < 0 or cx >= w or cy < 0 or cy >= h:
                out[i, 0] = x
                out[i, 1] = y
                out[i, 2] = np.nan
                out[i, 3] = sigma0
                out[i, 4] = np.nan
                out[i, 5] = 0.0
                continue
            m = 0
            vmin = np.inf
            vmax = -np.inf
            for t in range(kmax):
                qy = cy + offs[t, 0]
                qx = cx + offs[t, 1]
                if qy >= 0 and qy < h and qx >= 0 and qx < w:
                    v = np.float64(img[qy, qx])
                    ddx[m] = offs[t, 1]
                    ddy[m] = offs[t, 0]
                    val[m] = v
                    if v < vmin:
                        vmin = v
                    if v > vmax:
                        vmax = v
                    m += 1
            b0 = vmin
            a0 = np.float64(img[cy, cx]) - b0
            for k in range(m):  # data relative to B0 (the fit's B is B - B0)
                val[k] -= b0
            vtol = _STEP_TOL * (vmax - b0)  # intensity steps: relative to the disc's range
            p[0] = x - cx
            p[1] = y - cy
            p[2] = a0
            p[3] = sigma0
            p[4] = 0.0
            lam = _LAMBDA0
            converged = False
            cost = _eval(p, ddx, ddy, val, m, jtj, jtr)
            for _it in range(n_iter):
                for a in range(5):
                    for b in range(5):
                        mat[a, b] = jtj[a, b]
                    mat[a, a] += lam * jtj[a, a]
                solved = _ldl_solve(mat, jtr, L, z, delta)
                if not solved:
                    lam *= 10.0
                    continue
                pred = 0.0  # predicted cost reduction of the damped quadratic model
                for a in range(5):
                    pred += delta[a] * (jtr[a] + lam * jtj[a, a] * delta[a])
                small = (abs(delta[0]) < _STEP_TOL and abs(delta[1]) < _STEP_TOL and abs(delta[3]) < _STEP_TOL
                         and abs(delta[2]) < vtol and abs(delta[4]) < vtol) or pred < _FTOL * cost
                if small:  # tiny step: applied unevaluated, the fit has converged
                    for a in range(5):
                        p[a] += delta[a]
                    converged = True
                    break
                for a in range(5):
                    pt[a] = p[a] + delta[a]
                new_cost = _eval(pt, ddx, ddy, val, m, jtj_t, jtr_t)
                if new_cost < cost:
                    for a in range(5):
                        p[a] = pt[a]
                        jtr[a] = jtr_t[a]
                        for b in range(5):
                            jtj[a, b] = jtj_t[a, b]
                    cost = new_cost
                    lam /= 10.0
                else:
                    lam *= 10.0
            x0 = p[0] + cx
            y0 = p[1] + cy
            dist2 = (x0 - x) * (x0 - x) + (y0 - y) * (y0 - y)
            ok = converged and p[2] > 0 and p[3] > 0 and p[3] < 2.0 * radius and dist2 <= radius * radius
            if ok:
                out[i, 0] = x0
                out[i, 1] = y0
                out[i, 2] = p[2]
                out[i, 3] = p[3]
                out[i, 4] = p[4] + b0
                out[i, 5] = 1.0
            else:
                out[i, 0] = x
                out[i, 1] = y
                out[i, 2] = a0
                out[i, 3] = sigma0
                out[i, 4] = b0
                out[i, 5] = 0.0
    return out


def refine_gauss(image, xy, radius, sigma0, n_iter):
    """Per-site Levenberg-Marquardt Gaussian fit -> float64[N, 6] (x0, y0, A, s, B, ok)."""
    return _refine_gauss(image, xy, _disc_offsets(float(radius), False), float(radius), float(sigma0), int(n_iter))
