"""Inference pass of the patch model, Numba backend: ``rvae_forward``.

Same contract as :mod:`stemfast._kernels.numpy_ref.model` (layouts there); one patch at a time in
per-patch buffers, patches in parallel, the same layer order as the C++ kernel (csrc/rvae.cpp).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..numpy_ref.model import subtract_rank

__all__ = ["rvae_forward"]


@njit(cache=True, inline="always")
def _conv(x, w, b, stride, pad, relu, out):  # pragma: no cover - compiled
    """``x (H, W, Cin)`` -> ``out (Ho, Wo, Cout)``."""
    h, wd, cin = x.shape
    ho, wo, cout = out.shape
    k = w.shape[0]
    for oy in range(ho):
        for ox in range(wo):
            for co in range(cout):
                out[oy, ox, co] = 0.0
            for ky in range(k):
                iy = oy * stride - pad + ky
                if iy < 0 or iy >= h:
                    continue
                for kx in range(k):
                    ix = ox * stride - pad + kx
                    if ix < 0 or ix >= wd:
                        continue
                    for ci in range(cin):
                        v = x[iy, ix, ci]
                        for co in range(cout):
                            out[oy, ox, co] += v * w[ky, kx, ci, co]
            for co in range(cout):
                t = out[oy, ox, co] + b[co]
                out[oy, ox, co] = max(t, np.float32(0.0)) if relu else t


@njit(cache=True, inline="always")
def _shuffle(x, relu, out):  # pragma: no cover - compiled
    h, wd, c4 = x.shape
    c = c4 // 4
    for yy in range(h):
        for xx in range(wd):
            for i in range(2):
                for j in range(2):
                    for ch in range(c):
                        v = x[yy, xx, ch * 4 + i * 2 + j]
                        out[2 * yy + i, 2 * xx + j, ch] = max(v, np.float32(0.0)) if relu else v


@njit(cache=True, inline="always")
def _rotate(x, deg, border, out):  # pragma: no cover - compiled
    s = x.shape[0]
    a = deg * (math.pi / 180.0)
    ca = np.float32(math.cos(a))
    sa = np.float32(math.sin(a))
    c = np.float32((s - 1) / 2.0)
    hi = np.float32(s - 1)
    for yy in range(s):
        dy = np.float32(yy) - c
        for xx in range(s):
            dx = np.float32(xx) - c
            sx = ca * dx - sa * dy + c
            sy = sa * dx + ca * dy + c
            if border:
                sx = min(max(sx, np.float32(0.0)), hi)
                sy = min(max(sy, np.float32(0.0)), hi)
            fx0 = np.float32(math.floor(sx))
            fy0 = np.float32(math.floor(sy))
            x0 = int(fx0)
            y0 = int(fy0)
            gx = sx - fx0
            gy = sy - fy0
            v = np.float32(0.0)
            for ty in range(2):
                yi = y0 + ty
                if yi < 0 or yi >= s:
                    continue
                wy = gy if ty else np.float32(1.0) - gy
                for tx in range(2):
                    xi = x0 + tx
                    if xi < 0 or xi >= s:
                        continue
                    wx = gx if tx else np.float32(1.0) - gx
                    v += wx * wy * x[yi, xi]
            out[yy, xx] = v


@njit(cache=True)
def _encode(xm, ew1, eb1, ew2, eb2, ew3, eb3, hw, hb, e1, e2, e3, acc_mu, acc_lv):  # pragma: no cover
    s = xm.shape[0]
    _conv(xm.reshape(s, s, 1), ew1, eb1, 2, 1, True, e1)
    _conv(e1, ew2, eb2, 2, 1, True, e2)
    _conv(e2, ew3, eb3, 2, 1, True, e3)
    flat = e3.reshape(-1)
    n_lat = hw.shape[1] // 2
    for o in range(2 * n_lat):
        t = hb[o]
        for i in range(flat.shape[0]):
            t += flat[i] * hw[i, o]
        if o < n_lat:
            acc_mu[o] += t
        else:
            acc_lv[o - n_lat] += min(max(t, np.float32(-12.0)), np.float32(8.0))


@njit(cache=True, parallel=True)
def _forward(x, mask, has_stn, sw1, sb1, sw2, sb2, kern, kb, ew1, eb1, ew2, eb2, ew3, eb3, hw, hb,
             fw, fb, dw1, db1, dw2, db2, dw3, db3, k, symmetrize, ds, want_recon, recon,
             mu, lv, angle, strength, err):  # pragma: no cover - compiled
    n, s, _ = x.shape
    c1, c2, c3 = ew1.shape[3], ew2.shape[3], ew3.shape[3]
    n_lat = hw.shape[1] // 2
    s0 = s // 8
    hp = s // ds
    msum = np.float32(0.0)
    for i in range(s):
        for j in range(s):
            msum += mask[i, j]
    for p in prange(n):
        xin = x[p]
        xm = xin * mask
        e1 = np.empty((s // 2, s // 2, c1), np.float32)
        e2 = np.empty((s // 4, s // 4, c2), np.float32)
        e3 = np.empty((s0, s0, c3), np.float32)
        amu = np.zeros(n_lat, np.float32)
        alv = np.zeros(n_lat, np.float32)
        theta = 0.0
        if has_stn:
            pooled = np.empty((hp, hp, 1), np.float32)
            for yy in range(hp):
                for xx in range(hp):
                    if ds == 2:
                        pooled[yy, xx, 0] = (xm[2 * yy, 2 * xx] + xm[2 * yy, 2 * xx + 1] + xm[2 * yy + 1, 2 * xx]
                                             + xm[2 * yy + 1, 2 * xx + 1]) * np.float32(0.25)
                    else:
                        pooled[yy, xx, 0] = xm[yy, xx]
            h1 = np.empty((hp, hp, sw1.shape[3]), np.float32)
            h2 = np.empty((hp, hp, sw2.shape[3]), np.float32)
            _conv(pooled, sw1, sb1, 1, 1, True, h1)
            _conv(h1, sw2, sb2, 1, 1, True, h2)
            flat = h2.reshape(-1)
            hc = kb[0]
            hs = kb[1]
            for i in range(flat.shape[0]):
                hc += flat[i] * kern[0, i]
                hs += flat[i] * kern[1, i]
            strength[p] = math.sqrt(hc * hc + hs * hs)
            angle[p] = np.float32(math.atan2(hs, hc) * (180.0 / math.pi)) / np.float32(k)
            theta = float(angle[p])
            xc = np.empty((s, s), np.float32)
            _rotate(xin, -theta, True, xc)
            rot = np.empty((s, s), np.float32)
            if symmetrize == 1:
                xs = xc.copy()
                for j in range(1, k):
                    _rotate(xc, 360.0 * j / k, False, rot)
                    xs += rot
                _encode(xs / np.float32(k) * mask, ew1, eb1, ew2, eb2, ew3, eb3, hw, hb, e1, e2, e3, amu, alv)
            else:
                _encode(xc * mask, ew1, eb1, ew2, eb2, ew3, eb3, hw, hb, e1, e2, e3, amu, alv)
                if symmetrize == 2:
                    for j in range(1, k):
                        _rotate(xc, 360.0 * j / k, False, rot)
                        _encode(rot * mask, ew1, eb1, ew2, eb2, ew3, eb3, hw, hb, e1, e2, e3, amu, alv)
                    amu /= np.float32(k)
                    alv /= np.float32(k)
        else:
            angle[p] = np.nan
            strength[p] = np.nan
            _encode(xm, ew1, eb1, ew2, eb2, ew3, eb3, hw, hb, e1, e2, e3, amu, alv)
        mu[p] = amu
        lv[p] = alv
        f = np.empty(s0 * s0 * c3, np.float32)
        for o in range(f.shape[0]):
            t = fb[o]
            for i in range(n_lat):
                t += amu[i] * fw[i, o]
            f[o] = max(t, np.float32(0.0))
        g1 = np.empty((s0, s0, 4 * c2), np.float32)
        _conv(f.reshape(s0, s0, c3), dw1, db1, 1, 1, False, g1)
        _shuffle(g1, True, e2)
        g2 = np.empty((2 * s0, 2 * s0, 4 * c1), np.float32)
        _conv(e2, dw2, db2, 1, 1, False, g2)
        _shuffle(g2, True, e1)
        g3 = np.empty((4 * s0, 4 * s0, 4), np.float32)
        _conv(e1, dw3, db3, 1, 1, False, g3)
        yc = np.empty((s, s, 1), np.float32)
        _shuffle(g3, False, yc)
        y = np.empty((s, s), np.float32)
        if has_stn:
            _rotate(yc[:, :, 0].copy(), theta, False, y)
        else:
            y[:, :] = yc[:, :, 0]
        e = np.float32(0.0)
        for i in range(s):
            for j in range(s):
                y[i, j] *= mask[i, j]
                d = (y[i, j] - xin[i, j]) * mask[i, j]
                e += d * d
        err[p] = e / msum
        if want_recon:
            recon[p] = y


def rvae_forward(x, mask, stn, enc, dec, symmetry, symmetrize, stn_downsample, background_rank, recon):
    """Contract: :mod:`stemfast._kernels` (``rvae_forward``)."""
    n, s, _ = x.shape
    if not 0 <= background_rank <= s * s:
        raise ValueError("rvae_forward: background_rank must be in [0, S * S]")
    x = np.ascontiguousarray(subtract_rank(x, int(background_rank)), np.float32)  # one selection per patch
    mask = np.ascontiguousarray(mask, np.float32).reshape(s, s)
    n_lat = enc[6].shape[1] // 2
    mu = np.empty((n, n_lat), np.float32)
    lv = np.empty((n, n_lat), np.float32)
    angle = np.empty(n, np.float32)
    strength = np.empty(n, np.float32)
    err = np.empty(n, np.float32)
    has_stn = len(stn) == 6
    if has_stn:
        sw1, sb1, sw2, sb2, kern, kb = stn
    else:
        z4, z1 = np.zeros((3, 3, 1, 1), np.float32), np.zeros(1, np.float32)
        sw1, sb1, sw2, sb2, kern, kb = z4, z1, z4, z1, np.zeros((2, 1), np.float32), np.zeros(2, np.float32)
    want = recon.ndim == 3 and recon.shape[0] == n
    rec = recon if want else np.empty((1, s, s), np.float32)
    _forward(x, mask, has_stn, sw1, sb1, sw2, sb2, kern.reshape(2, -1), kb, *enc, *dec, int(symmetry),
             int(symmetrize), int(stn_downsample), want, rec, mu, lv, angle, strength, err)
    return mu, lv, angle, strength, err
