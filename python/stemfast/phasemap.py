"""Geometric phase analysis: continuous metal-lattice coordinates over the image (:class:`PhaseMap`).

The phase of each Bragg-filtered reciprocal vector ``g`` of the metal lattice's first ring
(:func:`stemfast.braggring.metal_reciprocal_lattice`) gives continuous metal-lattice coordinates
``U(r) = g . r + phi(r) / 2 pi`` that follow strain, rotation and scan distortion on a scale of
about one unit cell. Step 2 of the site lattice (:mod:`stemfast.sitelattice` indexes the columns on
it).
"""
from __future__ import annotations

import numpy as np
from scipy import fft as sfft
from scipy import ndimage

from .blocks import block_means

__all__ = ["PhaseMap", "bragg_maps"]


def _block_factor(shape: tuple[int, int], fmax: float) -> int:
    """The largest block-averaging factor ``f`` that keeps frequencies up to ``fmax`` (cycles/px) well
    below Nyquist (at most ``min(H, W) // 64``)."""
    f = max(1, int(0.2 / fmax)) if fmax > 0 else 1
    return min(f, max(1, min(shape) // 64))


def _block_spectrum(img: np.ndarray, fmax: float,
                    pad: tuple[int, int] | None = None) -> tuple[int, _PaddedSpectrum, tuple[int, int]]:
    """Block-average ``img`` by the largest factor ``f`` that keeps frequencies up to ``fmax``
    (cycles/px) well below Nyquist (:func:`_block_factor`); returns ``f``, the real FFT of the
    mean-removed small image padded with zeros below and to the right (a :class:`_PaddedSpectrum`:
    computed only where it is read, no array of the padded size is made), and the padded shape
    (what the Bragg demodulations work on; their grids then cover the pad too, the image is its
    first ``H // f`` x ``W // f`` blocks). ``pad``: that many rows and columns of blocks; None: as
    many as the small image has (twice its size: a Bragg filter narrower than the image does not
    reach round from one edge to the opposite one, where the image's lattice need not continue)."""
    f = _block_factor(img.shape, fmax)
    small = block_means(img, f) if f > 1 else img
    pad = small.shape if pad is None else pad
    shape = (small.shape[0] + pad[0], small.shape[1] + pad[1])
    return f, _PaddedSpectrum(small, float(small.mean()), shape), shape


class _PaddedSpectrum:
    """``rfft2`` of ``small - mean`` padded with zeros below and to the right to ``shape``, computed
    only on the windows :func:`_demodulate` reads (:meth:`window`): the rows' real FFTs (in strips of
    rows) kept at the window's columns, then those columns' FFTs (in groups of columns) at its rows.
    The same transforms, in the same order, as ``rfft2`` of the padded array (the values are
    identical), without the padded image and its spectrum (each as large as the image, or four times
    the block-averaged one)."""

    def __init__(self, small: np.ndarray, mean: float, shape: tuple[int, int]) -> None:
        self.small, self.mean, self.shape = small, mean, (int(shape[0]), int(shape[1]))
        #: complex elements transformed at once (a strip of rows, a group of columns)
        self.chunk = max(1 << 16, min(1 << 20, small.size // 16))

    def _column_groups(self, cols: np.ndarray):
        """``(c0, c1, values)`` for groups of the columns ``cols`` of the spectrum:
        ``values(rows, k)`` the spectrum at ``rows`` x ``cols[c0 + k]``."""
        hs, ws = self.shape
        h0 = self.small.shape[0]
        rows = max(1, self.chunk // (ws // 2 + 1))
        R = None
        for r0 in range(0, h0, rows):  # the rows' spectra at the columns read
            part = sfft.rfft(self.small[r0:r0 + rows] - self.mean, n=ws, axis=1, workers=-1)[:, cols]
            if R is None:
                R = np.empty((h0, len(cols)), dtype=part.dtype)
            R[r0:r0 + rows] = part
        group = max(1, self.chunk // hs)
        for c0 in range(0, len(cols), group):  # and the columns' spectra
            C = sfft.fft(R[:, c0:c0 + group], n=hs, axis=0, workers=-1)
            yield c0, c0 + C.shape[1], lambda rows, k, C=C: C[np.ix_(rows, k)]

    def window(self, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
        """The two-sided spectrum at rows ``iy`` x columns ``ix`` (integer frequencies) (:func:`_window`)."""
        return _window(self, iy, ix)


class _SeparableSpectrum:
    """The spectrum ``np.outer(a, b)`` of a separable image (the support of an image in its padded
    frame, ``shape``), read on windows (:meth:`window`) without the outer product."""

    def __init__(self, a: np.ndarray, b: np.ndarray, shape: tuple[int, int]) -> None:
        self.a, self.b, self.shape = a, b, shape

    def _column_groups(self, cols: np.ndarray):
        yield 0, len(cols), lambda rows, k: self.a[rows][:, None] * self.b[cols[k]][None, :]

    def window(self, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
        """The two-sided spectrum at rows ``iy`` x columns ``ix`` (integer frequencies) (:func:`_window`)."""
        return _window(self, iy, ix)


def _window(spec, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
    """complex128 [len(iy), len(ix)]: the two-sided spectrum of a real image at integer frequencies
    ``iy`` x ``ix`` (any sign, modulo the padded frame ``spec.shape``) from its one-sided (``rfft2``)
    spectrum ``spec``, read in groups of columns (``spec._column_groups``): ``F(-k) = conj(F(k))``;
    zero beyond the one-sided spectrum's last column."""
    hs, ws = spec.shape
    out = np.zeros((len(iy), len(ix)), dtype=np.complex128)
    neg = ix < 0
    jx = np.abs(ix)
    inside = np.flatnonzero(jx <= ws // 2)
    cols, at = np.unique(jx[inside], return_inverse=True)
    at = at.ravel()
    for c0, c1, values in spec._column_groups(cols):
        here = (at >= c0) & (at < c1)
        for flip in (False, True):
            m = here & (neg[inside] == flip)
            if m.any():
                v = values((-iy if flip else iy) % hs, at[m] - c0)
                out[:, inside[m]] = np.conj(v) if flip else v
    out[:, np.flatnonzero(neg & (jx > ws // 2))] = -0j  # as conj() of the zero there
    return out


def bragg_maps(img: np.ndarray, g: np.ndarray, width: float = 0.2):
    """``(maps, step, origin)``: the demodulated Bragg-filtered maps (complex, one per reciprocal
    vector of ``g`` [K, 2], cycles / px, all on one coarse grid), the grid's step (px, (y, x)) and the
    px position of its cell (0, 0). The filter is a Gaussian ``width * |g_k|`` wide around each
    ``g_k``; what :class:`PhaseMap` reads its phases and amplitude from.

    The image is not periodic: it is padded with zeros (its mean removed) below and to the right to a
    whole multiple of its size, at least :data:`PAD_SIGMAS` of the filter's spatial widths more, so
    that the filter at one edge does not reach round to the opposite one (the lattice at the left
    edge showed at the right edge, over no lattice); each map is divided by the same filter's
    response to the image's support (a normalised convolution: the amplitude near an edge is that of
    the lattice there, not halved by the pad). The grid is the unpadded image's, cut to it: away from
    the edges the maps are those of the unpadded image (to the filter's tails).

    Memory: neither the padded image nor its spectrum is made (:class:`_PaddedSpectrum`); besides
    the image, the block means, the rows' spectra at the filter's columns and one demodulation grid
    at a time (about the image's size at the smallest spacing of 5 px between sites, less at wider
    ones; tests/test_phasemap_memory.py)."""
    img = np.asarray(img, dtype=np.float32)
    g = np.asarray(g, dtype=np.float64)
    # the demodulation needs frequencies up to |g| (1 + 4 width) only: block-average the image
    # by a factor that keeps them (and the column profile's weak higher orders) below Nyquist
    fmax = float(np.hypot(*g.T).max()) * (1 + 4 * width)
    f = _block_factor(img.shape, fmax)
    h0, w0 = (n // f if f > 1 else n for n in img.shape)
    # the widest filter in space (block px): that of the shortest vector
    reach = PAD_SIGMAS / (2 * np.pi * width * float(np.hypot(*g.T).min()) * f)
    ky, kx = (int(np.ceil((n + reach) / n)) for n in (h0, w0))
    _, F, (hs, ws) = _block_spectrum(img, fmax, pad=((ky - 1) * h0, (kx - 1) * w0))
    # the support's spectrum: ones over the image, zeros in the pad (separable)
    Fm = _SeparableSpectrum(sfft.fft((np.arange(hs) < h0).astype(np.float64)),
                            sfft.rfft((np.arange(ws) < w0).astype(np.float64)), (hs, ws))
    out, full, steps = [], None, None
    for gk in g:
        # in block units the vector is f times longer; the block (i, j) is centred at
        # f i + (f - 1) / 2 px: a phase offset, corrected below
        sigma = width * float(np.hypot(*gk)) * f
        size = tuple(k * m for k, m in zip((ky, kx), _grid_size(h0, w0, sigma)))
        # the filter's response to the image's support, on the cells over the image (block i * step
        # up to its last block); every map on one grid (resampled on the padded torus)
        N, step = _demodulate(Fm, hs, ws, np.zeros(2), sigma, size)
        if steps is None:
            steps, full = step, N.shape
            ny, nx = (int(np.floor((n - 1) / d + 1e-9)) + 1 for n, d in zip((h0, w0), steps))
        norm = np.maximum((N if N.shape == full else _resample(N, full)).real[:ny, :nx], 1e-3)
        del N  # (one grid-sized map at a time)
        D, _ = _demodulate(F, hs, ws, gk * f, sigma, size)
        D *= np.exp(-2j * np.pi * (gk[0] + gk[1]) * (f - 1) / 2.0)
        out.append((D if D.shape == full else _resample(D, full))[:ny, :nx] / norm)
        del D
    return out, (steps[0] * f, steps[1] * f), (f - 1) / 2.0


#: the pad of :func:`bragg_maps`, in spatial standard deviations of the widest Bragg filter: the
#: weight it leaves to the far side of the image is below 1e-4 of the filter's
PAD_SIGMAS = 4.0


class PhaseMap:
    """Continuous metal-lattice coordinates over the image by geometric phase analysis.

    For each reciprocal vector ``g_k`` the image's Fourier transform is cut out around ``g_k`` with
    a Gaussian of width ``width * |g_k|`` and transformed back on a coarse grid; the phase of that
    demodulated map, unwrapped, is ``phi_k(r)`` and ``U_k(r) = g_k . r + phi_k(r) / 2 pi`` is the
    local lattice coordinate (integer on the fringe maxima). ``amplitude`` is the Bragg amplitude
    relative to its median (low where there is no lattice). ``exclude``: optional bool array of the
    image's shape, True where there is no film (dark vacuum, :func:`stemfast.vacuum.dark_vacuum`):
    left out of the refinement of ``g`` (its phases are noise).
    """

    def __init__(self, image: np.ndarray, g: np.ndarray, *, width: float = 0.2,
                 exclude: np.ndarray | None = None) -> None:
        from skimage.restoration import unwrap_phase

        img = np.asarray(image, dtype=np.float32)
        H, W = img.shape
        self.shape = (H, W)
        self.g = np.asarray(g, dtype=np.float64)
        maps, self.step, self.origin = bragg_maps(img, self.g, width)
        phase = np.stack([unwrap_phase(np.angle(D)) for D in maps])  # [2, h, w]
        amps = [np.abs(D) for D in maps]
        a = np.mean(amps, axis=0)
        med = float(np.median(a))
        self.amp = a / med if med > 0 else a
        # refine g: a plane fitted to each phase (weighted by the amplitude, edges left out) is a
        # correction of g; the phase keeps only what the plane does not explain
        h, w = phase.shape[1:]
        yy, xx = np.mgrid[0:h, 0:w]
        yy, xx = yy * self.step[0] + self.origin, xx * self.step[1] + self.origin
        wgt = np.clip(self.amp, 0, None).copy()
        e = 1 if min(h, w) > 6 else 0
        if e:
            wgt[:e], wgt[-e:], wgt[:, :e], wgt[:, -e:] = 0, 0, 0, 0
        if exclude is not None:
            ex = np.asarray(exclude, bool)
            at = ex[np.clip(np.rint(yy).astype(np.int64), 0, H - 1), np.clip(np.rint(xx).astype(np.int64), 0, W - 1)]
            if not at.all():
                wgt[at] = 0
        X = np.stack([np.ones(h * w), xx.ravel(), yy.ravel()], 1)
        sw = np.sqrt(wgt.ravel())[:, None]
        g = self.g.copy()
        for k in range(2):
            coef, *_ = np.linalg.lstsq(X * sw, phase[k].ravel() * sw[:, 0], rcond=None)
            g[k] += coef[1:] / (2 * np.pi)
            phase[k] -= (coef[1] * xx + coef[2] * yy)
        self.g = g
        self.phase = phase

    def _cell_coords(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Points ``xy`` [N, 2] (px) in units of the coarse grid: (row, column) coordinates."""
        return (xy[:, 1] - self.origin) / self.step[0], (xy[:, 0] - self.origin) / self.step[1]

    def _sample(self, grid: np.ndarray, xy: np.ndarray) -> np.ndarray:
        return ndimage.map_coordinates(grid, np.stack(self._cell_coords(xy)), order=1, mode="nearest")

    def _sample_phase(self, k: int, xy: np.ndarray) -> np.ndarray:
        """The unwrapped phase ``k`` at ``xy`` (bilinear, as :meth:`_sample`), except where the four
        cells around a point straddle a cut of the unwrapping (their phases span more than pi, so
        the bilinear blend would be a phase no nearby lattice has): there the cells are first moved
        by whole turns onto the branch of the nearest one."""
        grid = self.phase[k]
        out = self._sample(grid, xy)
        h, w = grid.shape
        if h < 2 or w < 2:
            return out
        quad = (grid[:-1, :-1], grid[:-1, 1:], grid[1:, :-1], grid[1:, 1:])
        cut_cell = (np.maximum.reduce(quad) - np.minimum.reduce(quad)) > np.pi  # [h - 1, w - 1]
        if not cut_cell.any():
            return out
        cy, cx = self._cell_coords(xy)
        cy, cx = np.clip(cy, 0, h - 1), np.clip(cx, 0, w - 1)
        y0 = np.minimum(np.floor(cy).astype(np.int64), h - 2)
        x0 = np.minimum(np.floor(cx).astype(np.int64), w - 2)
        cut = np.flatnonzero(cut_cell[y0, x0])
        if len(cut):
            y0, x0, fy, fx = y0[cut], x0[cut], (cy - y0)[cut], (cx - x0)[cut]
            cc = np.stack([grid[y0, x0], grid[y0, x0 + 1], grid[y0 + 1, x0], grid[y0 + 1, x0 + 1]], 1)
            wts = np.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx], 1)
            ref = cc[np.arange(len(cc)), np.argmax(wts, 1)][:, None]
            cc = ref + np.angle(np.exp(1j * (cc - ref)))
            out[cut] = (wts * cc).sum(1)
        return out

    def coords(self, xy: np.ndarray) -> np.ndarray:
        """Metal-lattice coordinates ``U`` [N, 2] of points ``xy`` [N, 2] (px)."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        phi = np.stack([self._sample_phase(k, xy) for k in range(2)], 1)
        return xy @ self.g.T + phi / (2 * np.pi)

    def amplitude(self, xy: np.ndarray) -> np.ndarray:
        """Relative Bragg amplitude at points ``xy`` [N, 2]."""
        return self._sample(self.amp, np.asarray(xy, dtype=np.float64).reshape(-1, 2))

    def positions(self, U: np.ndarray, n_iter: int = 4) -> np.ndarray:
        """Points ``xy`` [N, 2] whose lattice coordinates are ``U`` [N, 2] (fixed-point inversion)."""
        U = np.asarray(U, dtype=np.float64).reshape(-1, 2)
        Ginv = np.linalg.inv(self.g)
        xy = U @ Ginv.T
        for _ in range(n_iter):
            phi = np.stack([self._sample_phase(k, xy) for k in range(2)], 1)
            xy = (U - phi / (2 * np.pi)) @ Ginv.T
        return xy

    def local_g(self, xy: np.ndarray) -> np.ndarray:
        """Local reciprocal vectors [N, 2, 2] (rows g1, g2) from the phase gradients."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        out = np.empty((len(xy), 2, 2))
        for k in range(2):
            gy, gx = _phase_gradient(self.phase[k], self.step)
            out[:, k, 0] = self.g[k, 0] + self._sample(gx, xy) / (2 * np.pi)
            out[:, k, 1] = self.g[k, 1] + self._sample(gy, xy) / (2 * np.pi)
        return out


def _phase_gradient(phase: np.ndarray, step: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """``np.gradient`` of an unwrapped phase grid (per px along y and x), with every difference that
    crosses a cut of the unwrapping (more than pi) taken modulo a whole turn: a cut is no gradient."""
    out = []
    for axis, d in ((0, step[0]), (1, step[1])):
        gr = np.gradient(phase, d, axis=axis)
        diff = np.diff(phase, axis=axis)
        if (np.abs(diff) > np.pi).any():
            w = np.moveaxis(np.angle(np.exp(1j * diff)), axis, 0)
            g = np.empty((len(w) + 1,) + w.shape[1:])
            g[1:-1] = 0.5 * (w[:-1] + w[1:])  # central differences inside, one-sided at the ends
            g[0], g[-1] = w[0], w[-1]
            gr = np.moveaxis(g, 0, axis) / d
        out.append(gr)
    return out[0], out[1]


def _resample(D: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    zy, zx = shape[0] / D.shape[0], shape[1] / D.shape[1]
    return (ndimage.zoom(D.real, (zy, zx), order=1, grid_mode=True, mode="grid-wrap")
            + 1j * ndimage.zoom(D.imag, (zy, zx), order=1, grid_mode=True, mode="grid-wrap"))


def _grid_size(H: int, W: int, sigma_f: float) -> tuple[int, int]:
    """The coarse grid :func:`_demodulate` samples an ``H`` x ``W`` image's map on by default: it holds
    the Gaussian filter out to 4 ``sigma_f``."""
    return (sfft.next_fast_len(2 * int(np.ceil(4 * sigma_f * H)) + 2),
            sfft.next_fast_len(2 * int(np.ceil(4 * sigma_f * W)) + 2))


#: numpy's NPY_MIN_ELIDE_BYTES: a temporary array this large is reused in place as the result of
#: an arithmetic operation it takes part in, as its first operand (:func:`_demodulate`)
_ELIDE_BYTES = 256 * 1024


def _demodulate(F: _PaddedSpectrum | _SeparableSpectrum, H: int, W: int, g: np.ndarray, sigma_f: float,
                size: tuple[int, int] | None = None):
    """Demodulated Bragg-filtered map ``exp(-2 pi i g.r) (I * gauss_g)(r)`` on a coarse grid.

    ``F``: the spectrum of the (padded) ``H`` x ``W`` image, read on the filter's window
    (``F.window``, :func:`_window`). ``size``: the grid's (rows, columns) (:func:`_grid_size` unless
    given). Returns the complex map and its grid step (px) in (y, x). The grid-sized arrays are
    worked on in place and in strips of rows (no grid-sized temporaries).
    """
    My, Mx = size if size is not None else _grid_size(H, W, sigma_f)
    ky, kx = g[1] * H, g[0] * W
    ky0, kx0 = int(round(ky)), int(round(kx))
    iy = ky0 + np.fft.fftfreq(My, 1.0 / My).astype(np.int64)  # ky0 + (0, 1, ..., -1) (ifft order)
    ix = kx0 + np.fft.fftfreq(Mx, 1.0 / Mx).astype(np.int64)
    S = F.window(iy, ix)
    strip = max(1, (1 << 16) // Mx)
    for r in range(0, My, strip):
        S[r:r + strip] *= np.exp(-(((iy[r:r + strip, None] - ky) / H) ** 2 + ((ix[None, :] - kx) / W) ** 2)
                                 / (2 * sigma_f ** 2))
    S = sfft.ifft2(S, workers=-1, overwrite_x=True)
    S *= My * Mx
    S /= H * W
    step = (H / My, W / Mx)
    yy = np.arange(My)[:, None] * step[0]
    xx = np.arange(Mx)[None, :] * step[1]
    # a complex product with FMA rounds by the order of its factors: the order of the unstripped
    # product ``S * exp(..)``, where numpy took a grid-sized factor of _ELIDE_BYTES or more first
    # (multiplied in place), so that the maps stay what they were to the last bit
    first = My * Mx * 16 >= _ELIDE_BYTES
    for r in range(0, My, strip):
        e = np.exp(2j * np.pi * ((ky0 / H - g[1]) * yy[r:r + strip] + (kx0 / W - g[0]) * xx))
        np.multiply(*((e, S[r:r + strip]) if first else (S[r:r + strip], e)), out=S[r:r + strip])
    return S, step
