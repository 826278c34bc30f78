"""Image kernels, NumPy reference: bandpass mask, local maxima, sub-pixel refinement.

This is the readable definition of the kernels (contract: :mod:`stemfast._kernels`); the Numba and
C++ backends must agree with it. Inputs are validated by the public wrappers
(:func:`stemfast.bandpass.bandpass`, :func:`stemfast.peaks.find_peaks`, :func:`stemfast.peaks.refine`).

Implementation details shared by all backends (beyond the contract text)
------------------------------------------------------------------------
* Discs: integer offsets ``(dy, dx)`` with ``dy^2 + dx^2 <= radius^2`` (compared in float64),
  ``|dy|, |dx| <= floor(radius)``; pixels outside the image are skipped.
* ``local_maxima`` compares ``float64(image[p]) > threshold`` (not in float32), pixel values with
  each other in float32; ``border < 0`` counts as 0.
* ``refine_com`` accumulates in float64 relative to the disc centre ``c``:
  ``c + sum(w * (q - c)) / sum(w)``; the disc of a point whose rounded position lies outside the
  image is simply the part inside (empty: the result is ``c``).
* ``refine_gauss`` works in coordinates relative to ``c`` and in values relative to the disc
  minimum ``B0`` (data ``v - B0`` and background ``B - B0``, in float64), and uses
  Marquardt's damping ``(J^T J + lambda diag(J^T J)) delta = J^T r`` with ``r = data - model`` and the
  parameter vector ``p = (x0, y0, A, s, B)``. One iteration = one attempted step: the step is
  accepted when the cost (sum of squared residuals) strictly decreases (NaN never does). A damped
  matrix that is not positive definite (``L D L^T`` pivot not > 0) counts as a rejected step. The
  fit has converged as soon as a computed step is small, ``|d x0|, |d y0|, |d s| < 1e-6`` (px) and
  ``|d A|, |d B| < 1e-6 * (max - min of the disc values)``, or its predicted cost reduction
  ``pred = delta . (J^T r + lambda diag(J^T J) delta)`` (>= 0, the decrease of the damped quadratic
  model) is below ``1e-10 * cost``: that step is applied without being evaluated and ends the fit.
  Why: near the optimum the actual cost change of a step falls to the rounding noise of the cost
  (``~ eps * cost``), where "strictly decreases" is decided by rounding -- differently in every
  backend. A criterion only met below that floor (the former absolute 1e-6 on intensities of a few
  hundred counts, or steps along the flat A-B-s valley of a wide Gaussian) made whether a fit
  "converged" within ``n_iter`` (and so ``ok``, and the position: fit or centre of mass) depend on
  rounding. Both criteria above are met well above the floor; a backend meeting one an iteration
  earlier than another changes the result by one (tiny) step only.
  When ``c`` lies outside the image the row is ``(x, y, nan, sigma0, nan, 0)``.
"""
from __future__ import annotations

import numpy as np

__all__ = ["bandpass_apply", "local_maxima", "refine_com", "refine_gauss", "disc_offsets"]

_TWO_PI2 = 2.0 * np.pi**2
STEP_TOL = 1e-6  # convergence: x0, y0, s steps below this (px); A, B steps below this * disc range
FTOL = 1e-10  # convergence: predicted cost reduction of the step below this * cost
LAMBDA0 = 1e-3  # initial Marquardt damping


def disc_offsets(radius: float) -> np.ndarray:
    """int64[K, 2] offsets ``(dy, dx)`` with ``dy^2 + dx^2 <= radius^2``, in raster order."""
    r = int(np.floor(radius)) if radius > 0 else 0
    d = np.arange(-r, r + 1)
    dy, dx = np.meshgrid(d, d, indexing="ij")
    keep = (dy * dy + dx * dx).astype(np.float64) <= float(radius) * float(radius)
    return np.stack([dy[keep], dx[keep]], axis=1).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# bandpass
# --------------------------------------------------------------------------------------------------
def bandpass_apply(spec: np.ndarray, height: int, width: int, noise_sigma: float, background_sigma: float) -> None:
    """Multiply the ``rfft2`` spectrum ``spec`` in place by the Gaussian band-pass transfer function."""
    height, width = int(height), int(width)
    fy = np.fft.fftfreq(height)  # k / height, negative for k > height // 2
    fx = np.arange(spec.shape[1], dtype=np.float64) / width
    f2 = fy[:, None] ** 2 + fx[None, :] ** 2
    mask = np.ones_like(f2)
    if noise_sigma > 0:
        mask *= np.exp(-_TWO_PI2 * float(noise_sigma) ** 2 * f2)
    if background_sigma > 0:
        mask *= 1.0 - np.exp(-_TWO_PI2 * float(background_sigma) ** 2 * f2)
    spec *= mask.astype(np.float32)


# --------------------------------------------------------------------------------------------------
# local maxima
# --------------------------------------------------------------------------------------------------
def local_maxima(image: np.ndarray, radius: float, threshold: float, border: int) -> np.ndarray:
    """(x, y) of the disc maxima of ``image`` above ``threshold``, in raster order (see contract)."""
    img = np.asarray(image, dtype=np.float32)
    h, w = img.shape
    border = max(int(border), 0)
    offs = disc_offsets(radius)
    offs = offs[np.any(offs != 0, axis=1)]
    # nearest offsets first: most candidates are rejected by their immediate neighbours
    offs = offs[np.argsort(offs[:, 0] ** 2 + offs[:, 1] ** 2, kind="stable")]
    r = int(np.abs(offs).max()) if len(offs) else 0
    # pad with -inf: pixels outside the image never beat a finite value (< and <= both hold)
    pad = np.pad(img, r, mode="constant", constant_values=-np.inf)

    inner = np.zeros((h, w), dtype=bool)
    inner[border : max(h - border, border), border : max(w - border, border)] = True
    cand = inner & (img.astype(np.float64) > np.float64(threshold))
    ys, xs = np.nonzero(cand)  # raster order
    vals = img[ys, xs]
    for dy, dx in offs:
        nb = pad[ys + r + dy, xs + r + dx]
        later = dy > 0 or (dy == 0 and dx > 0)
        ok = nb < vals if later else nb <= vals
        ys, xs, vals = ys[ok], xs[ok], vals[ok]
    return np.stack([xs, ys], axis=1).astype(np.int64).reshape(-1, 2)


# --------------------------------------------------------------------------------------------------
# refinement helpers
# --------------------------------------------------------------------------------------------------
def _round_half_up(v: np.ndarray) -> np.ndarray:
    return np.floor(v + 0.5)


def _gather_disc(image: np.ndarray, xy: np.ndarray, radius: float):
    """Disc pixels around ``c = round(xy)``: (c [N,2] int, dx, dy [K], values [N,K] float64, inside [N,K])."""
    img = np.asarray(image, dtype=np.float32)
    h, w = img.shape
    c = _round_half_up(np.asarray(xy, dtype=np.float64)).astype(np.int64)
    offs = disc_offsets(radius)
    dy, dx = offs[:, 0], offs[:, 1]
    qx = c[:, 0:1] + dx[None, :]
    qy = c[:, 1:2] + dy[None, :]
    inside = (qx >= 0) & (qx < w) & (qy >= 0) & (qy < h)
    vals = img[np.clip(qy, 0, h - 1), np.clip(qx, 0, w - 1)].astype(np.float64)
    return c, dx.astype(np.float64), dy.astype(np.float64), vals, inside


def refine_com(image: np.ndarray, xy: np.ndarray, radius: float) -> np.ndarray:
    """Centre of mass of ``image - min`` over the disc around ``round(xy)`` (see contract)."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    c, dx, dy, vals, inside = _gather_disc(image, xy, radius)
    vmin = np.where(inside, vals, np.inf).min(axis=1, initial=np.inf)
    wgt = np.where(inside, vals - vmin[:, None], 0.0)
    sw = wgt.sum(axis=1)
    sx = (wgt * dx[None, :]).sum(axis=1)
    sy = (wgt * dy[None, :]).sum(axis=1)
    out = c.astype(np.float64)
    good = sw > 0
    out[good, 0] += sx[good] / sw[good]
    out[good, 1] += sy[good] / sw[good]
    return out


def _ldl_solve(m: np.ndarray, g: np.ndarray):
    """Solve ``m x = g`` for a batch of small SPD matrices by ``L D L^T`` (unit lower ``L``).

    Fixed operation order, shared by all backends. Returns ``(x, ok)``; ``ok`` is False where a
    pivot ``D[j]`` is not > 0 (x is then 0).
    """
    n, p, _ = m.shape
    L = np.zeros_like(m)
    d = np.zeros_like(g)
    ok = np.ones(n, dtype=bool)
    for j in range(p):
        dj = m[:, j, j].copy()
        for k in range(j):
            dj -= L[:, j, k] * L[:, j, k] * d[:, k]
        ok &= dj > 0  # also False for NaN
        dj = np.where(ok, dj, 1.0)
        d[:, j] = dj
        inv = 1.0 / dj
        for i in range(j + 1, p):
            s = m[:, i, j].copy()
            for k in range(j):
                s -= L[:, i, k] * L[:, j, k] * d[:, k]
            L[:, i, j] = s * inv
    z = np.zeros_like(g)
    for i in range(p):  # L z = g
        s = g[:, i].copy()
        for k in range(i):
            s -= L[:, i, k] * z[:, k]
        z[:, i] = s
    x = np.zeros_like(g)
    for i in range(p - 1, -1, -1):  # D L^T x = z
        s = z[:, i] / d[:, i]
        for k in range(i + 1, p):
            s -= L[:, k, i] * x[:, k]
        x[:, i] = s
    x[~ok] = 0.0
    return x, ok


def _model(p: np.ndarray, dx: np.ndarray, dy: np.ndarray):
    """Gaussian model on the disc for parameters p [N,5] (relative coords): (model, g, ex, ey, d2)."""
    ex = dx[None, :] - p[:, 0:1]
    ey = dy[None, :] - p[:, 1:2]
    d2 = ex * ex + ey * ey
    s = p[:, 3:4]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        g = np.exp(-d2 / (2.0 * s * s))
    return p[:, 4:5] + p[:, 2:3] * g, g, ex, ey, d2


def _cost(p, dx, dy, vals, inside):
    model = _model(p, dx, dy)[0]
    r = np.where(inside, vals - model, 0.0)
    return (r * r).sum(axis=1)


def _normal_equations(p, dx, dy, vals, inside):
    """J^T J [N,5,5] and J^T r [N,5] at p, with J = d model / d p (outside pixels weigh 0)."""
    model, g, ex, ey, d2 = _model(p, dx, dy)
    a = p[:, 2:3]
    s = p[:, 3:4]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ag = a * g
        jac = np.stack(
            [ag * ex / (s * s), ag * ey / (s * s), g, ag * d2 / (s * s * s), np.ones_like(g)], axis=2
        )  # [N, K, 5]
    jac = np.where(inside[:, :, None], jac, 0.0)
    r = np.where(inside, vals - model, 0.0)
    return np.einsum("nki,nkj->nij", jac, jac), np.einsum("nki,nk->ni", jac, r)


def refine_gauss(image: np.ndarray, xy: np.ndarray, radius: float, sigma0: float, n_iter: int) -> np.ndarray:
    """Per-site Levenberg-Marquardt fit of a round Gaussian plus constant (see contract).

    Written as the per-site algorithm run for all sites at once: every array has the sites as its
    first axis and a site stops changing once it has converged (or failed).
    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    n = xy.shape[0]
    img = np.asarray(image, dtype=np.float32)
    h, w = img.shape
    out = np.zeros((n, 6), dtype=np.float64)
    if n == 0:
        return out
    c, dx, dy, vals, inside = _gather_disc(img, xy, radius)
    c_in = (c[:, 0] >= 0) & (c[:, 0] < w) & (c[:, 1] >= 0) & (c[:, 1] < h)
    b0 = np.where(inside, vals, np.inf).min(axis=1, initial=np.inf)
    vmax = np.where(inside, vals, -np.inf).max(axis=1, initial=-np.inf)
    vc = img[np.clip(c[:, 1], 0, h - 1), np.clip(c[:, 0], 0, w - 1)].astype(np.float64)
    a0 = vc - b0
    b0 = np.where(c_in, b0, np.nan)
    a0 = np.where(c_in, a0, np.nan)
    with np.errstate(invalid="ignore"):
        vals = np.where(inside, vals - np.where(c_in, b0, 0.0)[:, None], 0.0)  # data relative to B0
        # convergence: position and width steps in px, intensity steps relative to the disc's range
        vtol = STEP_TOL * (vmax - b0)
    tol = np.stack([np.full(n, STEP_TOL), np.full(n, STEP_TOL), vtol, np.full(n, STEP_TOL), vtol], axis=1)

    # parameters relative to c and B0: (x0 - cx, y0 - cy, A, s, B - B0)
    p = np.stack([xy[:, 0] - c[:, 0], xy[:, 1] - c[:, 1], a0, np.full(n, float(sigma0)), np.zeros(n)], axis=1)
    lam = np.full(n, LAMBDA0)
    active = c_in.copy()
    converged = np.zeros(n, dtype=bool)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        cost = _cost(p, dx, dy, vals, inside)
        jtj, jtr = _normal_equations(p, dx, dy, vals, inside)
        for _ in range(int(n_iter)):
            idx = np.nonzero(active)[0]
            if idx.size == 0:
                break
            m = jtj[idx].copy()
            diag = np.einsum("nii->ni", jtj[idx])
            m[:, np.arange(5), np.arange(5)] += lam[idx, None] * diag
            delta, solved = _ldl_solve(m, jtr[idx])
            # a small step, or one predicted to lower the cost by < FTOL * cost, is applied (not
            # evaluated) and ends the fit
            pred = (delta * (jtr[idx] + lam[idx, None] * diag * delta)).sum(axis=1)
            small = solved & ((np.abs(delta) < tol[idx]).all(axis=1) | (pred < FTOL * cost[idx]))
            fin = idx[small]
            p[fin] += delta[small]
            converged[fin] = True
            active[fin] = False
            lam[idx[~solved]] *= 10.0
            step = solved & ~small
            sidx = idx[step]
            if sidx.size == 0:
                continue
            trial = p[sidx] + delta[step]
            new_cost = _cost(trial, dx, dy, vals[sidx], inside[sidx])
            accept = new_cost < cost[sidx]  # False for NaN
            acc = sidx[accept]
            p[acc] = trial[accept]
            cost[acc] = new_cost[accept]
            lam[acc] /= 10.0
            lam[sidx[~accept]] *= 10.0
            if acc.size:
                jtj[acc], jtr[acc] = _normal_equations(p[acc], dx, dy, vals[acc], inside[acc])

    x0 = p[:, 0] + c[:, 0]
    y0 = p[:, 1] + c[:, 1]
    amp, sig, bg = p[:, 2], p[:, 3], p[:, 4] + b0
    with np.errstate(invalid="ignore"):
        dist2 = (x0 - xy[:, 0]) ** 2 + (y0 - xy[:, 1]) ** 2
        ok = converged & (amp > 0) & (sig > 0) & (sig < 2.0 * radius) & (dist2 <= float(radius) ** 2)
    out[:, 0] = np.where(ok, x0, xy[:, 0])
    out[:, 1] = np.where(ok, y0, xy[:, 1])
    out[:, 2] = np.where(ok, amp, a0)
    out[:, 3] = np.where(ok, sig, float(sigma0))
    out[:, 4] = np.where(ok, bg, b0)
    out[:, 5] = ok.astype(np.float64)
    return out
