"""Vacuum seen before the lattice is known: where the spectrum that finds the lattice should not look.

A micrograph taken at a flake's edge or across a hole holds vacuum: in an annular dark-field image a
plateau near the detector's dark level, with no columns, only noise. The Bragg ring is read from a
crop's power spectrum (:func:`stemfast.braggring.metal_reciprocal_lattice`), so vacuum dilutes it: its
noise raises the ring's background and its edge adds a streak. From about 75-80 % vacuum the ring
of the real MoS2 scans was lost or a noise ring at 2-4 px was taken for the lattice, and a large
image whose film lies off-centre had none of it in the central crop.

:func:`dark_vacuum` finds such a plateau without knowing the lattice: the local mean and standard
deviation of the image on a scale of :data:`VACUUM_SCALE` of the image's short side split into two
classes (Otsu's threshold on the local mean). The darker class is vacuum when it is far darker than
the spread of the brighter class's local mean allows (:data:`VACUUM_MIN_GAP`) and quieter
(:data:`VACUUM_MAX_SD_RATIO`): the local standard deviation of film holds the columns' contrast.
:func:`film_spectrum_image` then gives the crop that holds the most film, its vacuum and no-data
pixels set to the film's mean. The caller reads the ring on both the image and this crop and keeps
the more prominent (a film taken for vacuum -- a monolayer beside a brighter bilayer island -- gives
the weaker ring, so the guess cannot make the ring worse where the image's own is better). Vacuum is
taken as dark: a bright-field image's bright vacuum is left alone.

The site lattice's own hole test (:func:`stemfast.lattice.film_mask`) still decides where sites
go; this guess only steers where the lattice is read.

Examples
--------
>>> from stemfast.synthetic import make_mos2
>>> img = make_mos2(shape=(512, 512), seed=0).image.astype(float)
>>> dark_vacuum(img) is None                       # all film
True
>>> img[:, :360] = img.min() + np.random.default_rng(0).normal(size=(512, 360))  # 70 % vacuum
>>> vac = dark_vacuum(img)
>>> round(float(vac[:, :340].mean()), 2), round(float(vac[:, 380:].mean()), 2)
(1.0, 0.0)
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .blocks import block_means

__all__ = ["dark_vacuum", "film_spectrum_image", "film_window", "vacuum_bragg_ratio", "VACUUM_MIN_GAP",
           "VACUUM_MAX_SD_RATIO", "VACUUM_MIN_SHARE", "VACUUM_MAX_BRAGG"]

#: scale (Gaussian sigma) of the local mean and deviation, as a share of the image's short side
#: (clipped to 8-64 px): about a lattice period or more at the samplings the pipeline takes (a
#: Gaussian of 16 px leaves under 0.1 % of a 26 px metal period's modulation in the local mean),
#: fine enough to follow a flake's edge
VACUUM_SCALE = 1.0 / 32.0
#: the darker class is vacuum only when its median local mean lies this many robust standard
#: deviations of the brighter class's local mean below that class's median. The ten shared and
#: validation scans, the simulated ones, their binned, upsampled and distorted copies give 2.2-3.2
#: (no vacuum: Otsu splits the film itself), the amorphous-contamination copies of the real MoS2
#: 2.2-4.1, a monolayer beside a brighter bilayer island 8.3; a flake edge (25-40 % vacuum) 12-86,
#: a simulated film with an illumination gradient beside 70 % vacuum 7.0
VACUUM_MIN_GAP = 5.0
#: ... and only when its median local standard deviation is at most this share of the brighter
#: class's (film's columns and contamination's texture: 0.66-1.06 on the images above, the
#: monolayer beside a bilayer island 0.68; vacuum with noise at 0.3 of the film's deviation
#: 0.23-0.31)
VACUUM_MAX_SD_RATIO = 0.6
#: ... and covers at least this share of the image (smaller holes barely dilute the ring)
VACUUM_MIN_SHARE = 0.05
#: the guess is vacuum only where the lattice's Bragg amplitude there is below this share of the
#: film's (:func:`vacuum_bragg_ratio`): vacuum holds no lattice; clean film beside a bright contamination
#: patch, which the darkness and quietness tests alone may take for vacuum, holds most of it. A
#: flake edge on the real MoS2 scans (30-90 % vacuum) gives 0.027-0.043; the clean film of the six
#: real crops beside a contamination patch 0.63-0.96, film dimmed to 30 % of its signal 0.31-0.39.
#: The hole test of the site lattice uses the same bound (:data:`stemfast.lattice.HOLE_MAX_BRAGG`)
VACUUM_MAX_BRAGG = 0.2
#: the local statistics are read on blocks of the image, the Gaussian about this many blocks wide (a
#: 4096^2 image: 16 px blocks, 256^2 of them)
_SIGMA_CELLS = 4.0


def dark_vacuum(image: np.ndarray, no_data: np.ndarray | None = None) -> np.ndarray | None:
    """Bool mask (the image's shape) of dark vacuum, or ``None`` when there is none (module docs).

    Parameters
    ----------
    image : 2-D array, the micrograph with bright columns (annular dark field).
    no_data : optional bool array of the image's shape, True where no data was recorded
        (:mod:`stemfast.nodata`); left out of the statistics and out of the mask.

    Returns
    -------
    numpy.ndarray of bool or None
    """
    img = np.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {img.shape}")
    st = _vacuum_stats(img, no_data)
    if st is None:
        return None
    dark, share, gap, sd_ratio, f = st
    if not (VACUUM_MIN_SHARE <= share < 1.0 and gap >= VACUUM_MIN_GAP and sd_ratio <= VACUUM_MAX_SD_RATIO):
        return None
    H, W = img.shape
    if f > 1:
        dark = np.repeat(np.repeat(dark, f, axis=0), f, axis=1)
        dark = np.pad(dark, ((0, H - dark.shape[0]), (0, W - dark.shape[1])), mode="edge")
    if no_data is not None:
        dark &= ~np.asarray(no_data, bool)
    return dark


def _vacuum_stats(img: np.ndarray, no_data):
    """``(dark, share, gap, sd_ratio, f)`` of :func:`dark_vacuum` (``dark`` on the grid of ``f`` px
    blocks), or None where the image is too small or uniform to tell."""
    H, W = img.shape
    sigma_px = float(np.clip(min(H, W) * VACUUM_SCALE, 8.0, 64.0))
    f = max(1, int(sigma_px / _SIGMA_CELLS))
    x = block_means(img, f)
    x2 = block_means(img, f, square=True)  # the blocks' own variance is kept
    sigma = sigma_px / f
    m = ndimage.gaussian_filter(x, sigma)
    sd = np.sqrt(np.clip(ndimage.gaussian_filter(x2, sigma) - m * m, 0.0, None))
    use = np.ones(m.shape, bool) if no_data is None else ~(block_means(np.asarray(no_data, np.float32), f) > 0.5)
    if use.sum() < 64:
        return None
    t = _otsu(m[use])
    dark = (m < t) & use
    bright = (m >= t) & use
    if bright.sum() < 16 or not dark.any():
        return None
    share = float(dark.sum() / use.sum())
    m_d, m_b = float(np.median(m[dark])), float(np.median(m[bright]))
    spread_b = 1.4826 * float(np.median(np.abs(m[bright] - m_b)))
    gap = (m_b - m_d) / max(spread_b, 1e-12 * max(abs(m_b), 1.0))
    sd_b = float(np.median(sd[bright]))
    sd_ratio = float(np.median(sd[dark])) / sd_b if sd_b > 0 else float("inf")
    return dark, share, gap, sd_ratio, f


def vacuum_bragg_ratio(image: np.ndarray, g: np.ndarray, vacuum: np.ndarray) -> float:
    """The median Bragg amplitude of the metal lattice (reciprocal vectors ``g`` [2, 2], cycles / px:
    :attr:`stemfast.braggring.FftLattice.g`) over ``vacuum`` as a share of its median over the rest of
    the image (about 0.1 or less for vacuum, about 1 for film). The amplitude is that of the
    demodulated Bragg-filtered image (:mod:`stemfast.phasemap`), on its coarse grid."""
    from .phasemap import bragg_maps

    H, W = np.shape(image)
    maps, step, origin = bragg_maps(image, g)
    amp = np.sum([np.abs(D) for D in maps], axis=0)
    h, w = amp.shape
    yy = np.clip(np.rint(np.arange(h) * step[0] + origin).astype(np.int64), 0, H - 1)
    xx = np.clip(np.rint(np.arange(w) * step[1] + origin).astype(np.int64), 0, W - 1)
    at = np.asarray(vacuum, bool)[np.ix_(yy, xx)]
    if at.all() or not at.any():
        return float("nan")
    film = float(np.median(amp[~at]))
    return float(np.median(amp[at])) / film if film > 0 else float("nan")


def _otsu(v: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of the values ``v`` (a histogram of ``bins`` bins)."""
    hist, edges = np.histogram(v, bins=bins)
    c = 0.5 * (edges[1:] + edges[:-1])
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * c)
    mu0 = s0 / np.maximum(w0, 1)
    mu1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(c[int(np.argmax(between[:-1]))] + 0.5 * (c[1] - c[0]))


def film_window(bad: np.ndarray, crop: int) -> tuple[int, int]:
    """``(y0, x0)`` of the ``crop`` x ``crop`` window (clipped to the image) that holds the fewest
    ``bad`` pixels; the central window unless another holds more than 5 % of its pixels more good
    ones (searched on a grid of an eighth of the crop)."""
    H, W = bad.shape
    ch, cw = min(crop, H), min(crop, W)
    cy, cx = (H - ch) // 2, (W - cw) // 2
    if ch == H and cw == W:
        return 0, 0
    ii = np.pad(np.cumsum(np.cumsum(np.asarray(bad, np.int64), 0), 1), ((1, 0), (1, 0)))

    def count(y0, x0):
        return ii[y0 + ch, x0 + cw] - ii[y0, x0 + cw] - ii[y0 + ch, x0] + ii[y0, x0]

    step = max(1, crop // 8)
    ys = sorted(set(list(range(0, H - ch + 1, step)) + [H - ch, cy]))
    xs = sorted(set(list(range(0, W - cw + 1, step)) + [W - cw, cx]))
    best, at = count(cy, cx), (cy, cx)
    centre = best
    for y0 in ys:
        for x0 in xs:
            c = count(y0, x0)
            if c < best:
                best, at = c, (y0, x0)
    return at if centre - best > 0.05 * ch * cw else (cy, cx)


def film_spectrum_image(image: np.ndarray, vacuum: np.ndarray, crop: int,
                        no_data: np.ndarray | None = None) -> np.ndarray:
    """The ``crop`` x ``crop`` window of ``image`` holding the most film (:func:`film_window`), its
    ``vacuum`` (and ``no_data``) pixels set to the mean of its film pixels, and rolled (circularly)
    so that the film's circular centroid lies at its centre: what the ring is read on (module
    docs). The spectrum's window weights the centre of a crop; a strip of film along a border would
    otherwise count for little. float64.

    Examples
    --------
    >>> img = np.arange(64.0).reshape(8, 8)
    >>> vac = np.zeros((8, 8), bool); vac[:, :6] = True      # film in the two right-hand columns
    >>> out = film_spectrum_image(img, vac, 8)
    >>> out[0].tolist()                                       # the film moved to the centre
    [34.5, 34.5, 34.5, 34.5, 6.0, 7.0, 34.5, 34.5]
    """
    bad = np.asarray(vacuum, bool)
    if no_data is not None:
        bad = bad | np.asarray(no_data, bool)
    y0, x0 = film_window(bad, crop)
    ch, cw = min(crop, image.shape[0]), min(crop, image.shape[1])
    out = np.array(image[y0:y0 + ch, x0:x0 + cw], dtype=np.float64)
    b = bad[y0:y0 + ch, x0:x0 + cw]
    if b.all() or not b.any():
        return out
    out[b] = float(out[~b].mean())
    good = ~b
    shifts = []
    for axis, n in ((0, ch), (1, cw)):
        w = good.sum(axis=1 - axis).astype(np.float64)
        t = 2.0 * np.pi * np.arange(n) / n
        c = float(np.arctan2((w * np.sin(t)).sum(), (w * np.cos(t)).sum())) % (2.0 * np.pi) * n / (2.0 * np.pi)
        shifts.append(int(round(n // 2 - c)))
    return np.roll(out, shifts, axis=(0, 1))
