"""Inference pass of the patch model, NumPy reference: ``rvae_forward``.

Readable and batch-vectorised (each layer one matrix product over the whole batch); the compiled
backends run the same layers one patch at a time. Layouts as in the contract
(:mod:`stemfast._kernels`): activations channels-last ``(B, H, W, C)``, convolution weights
``[ky][kx][cin][cout]``, dense weights transposed (``[in][out]``) with their ``(H, W, C)``-ordered
side in that order, the STN pooling kernel ``[2][h w C]``.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["rvae_forward"]


def _conv(x, w, b, stride, pad, relu):
    """``x (B, H, W, Cin)`` -> ``(B, Ho, Wo, Cout)``: zero-padded convolution, optional ReLU."""
    k, cin, cout = w.shape[0], w.shape[2], w.shape[3]
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    win = sliding_window_view(xp, (k, k), axis=(1, 2))[:, ::stride, ::stride]  # B, Ho, Wo, Cin, k, k
    bsz, ho, wo = win.shape[:3]
    cols = win.transpose(0, 1, 2, 4, 5, 3).reshape(bsz * ho * wo, k * k * cin)
    out = (cols @ w.reshape(k * k * cin, cout) + b).reshape(bsz, ho, wo, cout)
    return np.maximum(out, 0) if relu else out


def _shuffle(x, relu):
    """``(B, H, W, 4C)`` -> ``(B, 2H, 2W, C)``: channel ``c * 4 + i * 2 + j`` of ``(h, w)`` to ``(2h + i, 2w + j)``."""
    bsz, h, w, c4 = x.shape
    out = x.reshape(bsz, h, w, c4 // 4, 2, 2).transpose(0, 1, 4, 2, 5, 3).reshape(bsz, 2 * h, 2 * w, c4 // 4)
    return np.maximum(out, 0) if relu else out


def _rotate(x, deg, border):
    """Bilinear rotation of ``x (B, S, S)`` about the centre by ``deg (B,)`` degrees (counter-clockwise
    as displayed): ``out(p) = x(R(-deg) (p - c) + c)``; ``border`` clamps the sample positions into
    the patch, otherwise taps outside read 0. Positions in float32, as the compiled backends."""
    bsz, s, _ = x.shape
    a = np.deg2rad(np.asarray(deg, np.float64)).reshape(-1, 1, 1)
    ca, sa = np.cos(a).astype(np.float32), np.sin(a).astype(np.float32)
    c = np.float32((s - 1) / 2.0)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    dx, dy = xx - c, yy - c
    sx = ca * dx - sa * dy + c
    sy = sa * dx + ca * dy + c
    if border:
        sx = np.clip(sx, 0, s - 1)
        sy = np.clip(sy, 0, s - 1)
    x0, y0 = np.floor(sx), np.floor(sy)
    gx, gy = sx - x0, sy - y0
    x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
    sx = np.broadcast_to(sx, (bsz, s, s))
    flat = x.reshape(bsz, -1)
    out = np.zeros((bsz, s, s), np.float32)
    for ty in (0, 1):
        for tx in (0, 1):
            xi, yi = x0 + tx, y0 + ty
            w = (gx if tx else 1 - gx) * (gy if ty else 1 - gy)
            ok = (xi >= 0) & (xi < s) & (yi >= 0) & (yi < s)
            idx = np.broadcast_to(np.clip(yi, 0, s - 1) * s + np.clip(xi, 0, s - 1), (bsz, s, s))
            v = np.take_along_axis(flat, idx.reshape(bsz, -1), 1).reshape(bsz, s, s)
            out += np.where(ok, w, 0).astype(np.float32) * v
    return out


def _encode(xm, enc, s):
    ew1, eb1, ew2, eb2, ew3, eb3, hw, hb = enc
    e = _conv(xm[..., None], ew1, eb1, 2, 1, True)
    e = _conv(e, ew2, eb2, 2, 1, True)
    e = _conv(e, ew3, eb3, 2, 1, True)
    h = e.reshape(len(xm), -1) @ hw + hb
    n_lat = h.shape[1] // 2
    return h[:, :n_lat], np.clip(h[:, n_lat:], -12.0, 8.0)


def subtract_rank(x, rank):
    """Each patch of ``x`` [N, S, S] minus its ``rank``-th smallest value (1-based; 0: unchanged)."""
    if rank <= 0 or len(x) == 0:
        return x
    flat = x.reshape(len(x), -1)
    return x - np.partition(flat, rank - 1, axis=1)[:, rank - 1][:, None, None]


def rvae_forward(x, mask, stn, enc, dec, symmetry, symmetrize, stn_downsample, background_rank, recon):
    """Contract: :mod:`stemfast._kernels` (``rvae_forward``)."""
    x = np.asarray(x, np.float32)
    n, s, _ = x.shape
    if not 0 <= background_rank <= s * s:
        raise ValueError("rvae_forward: background_rank must be in [0, S * S]")
    x = subtract_rank(x, int(background_rank))
    mask = np.asarray(mask, np.float32).reshape(s, s)
    xm = x * mask
    if len(stn):
        sw1, sb1, sw2, sb2, kern, kb = stn
        hp = s // stn_downsample
        p = xm.reshape(n, hp, stn_downsample, hp, stn_downsample).mean((2, 4), dtype=np.float32)
        h = _conv(p[..., None], sw1, sb1, 1, 1, True)
        h = _conv(h, sw2, sb2, 1, 1, True)
        harm = h.reshape(n, -1) @ kern.T + kb
        strength = np.sqrt((harm ** 2).sum(1)).astype(np.float32)
        angle = (np.rad2deg(np.arctan2(harm[:, 1], harm[:, 0])) / symmetry).astype(np.float32)
        xc = _rotate(x, -angle, True)
        branches = [_rotate(xc, np.full(n, 360.0 * j / symmetry), False) for j in range(1, symmetry)]
        if symmetrize == 1:
            mu, logvar = _encode((xc + sum(branches)) / np.float32(symmetry) * mask, enc, s)
        else:
            mu, logvar = _encode(xc * mask, enc, s)
            if symmetrize == 2:
                for br in branches:
                    m2, l2 = _encode(br * mask, enc, s)
                    mu, logvar = mu + m2, logvar + l2
                mu, logvar = mu / np.float32(symmetry), logvar / np.float32(symmetry)
    else:
        angle = strength = np.full(n, np.nan, np.float32)
        mu, logvar = _encode(xm, enc, s)
    fw, fb, dw1, db1, dw2, db2, dw3, db3 = dec
    s0 = s // 8
    d = np.maximum(mu @ fw + fb, 0).reshape(n, s0, s0, -1)
    d = _shuffle(_conv(d, dw1, db1, 1, 1, False), True)
    d = _shuffle(_conv(d, dw2, db2, 1, 1, False), True)
    yc = _shuffle(_conv(d, dw3, db3, 1, 1, False), False)[..., 0]
    y = (_rotate(yc, angle, False) if len(stn) else yc) * mask
    err = (((y - x) * mask) ** 2).reshape(n, -1).sum(1) / mask.sum()
    if recon.ndim == 3 and recon.shape[0] == n:
        recon[...] = y
    return (mu.astype(np.float32), logvar.astype(np.float32), angle, strength, err.astype(np.float32))
