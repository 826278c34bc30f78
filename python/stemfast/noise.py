"""How far an image's noise is correlated: resampled, interpolated or filtered images.

A scan records each pixel with its own shot noise: the noise is white, its power spectrum flat up to
the Nyquist frequency (0.5 cycles/px). The column intensity the defect scores compare
(``column_intensity`` of :func:`stemfast.find_sites`) is read with a low-pass of
``SiteSettings.column_noise_px`` (1 px): that averages the independent noise of about a dozen pixels
at every sampling, while a wider one lets contamination texture in (docs/RESULTS.md, rounds 4, 12, 20).

An image that was upsampled (a "resize" before export, pixel repetition, a zoomed display saved as
data), interpolated (a drift-corrected or rotated frame) or low-pass filtered has noise correlated
over several pixels: its spectrum collapses beyond ``0.5 / L`` for a correlation length of ``L`` px.
A 1 px low-pass then averages the noise of only ``1 / L^2`` as many independent samples, and the
defect ranking degrades (the labelled WSe2 upsampled 2x / 3x: AP 0.80 -> 0.70 / 0.62; with the
low-pass widened by the factor, 0.80 again). :func:`noise_correlation` measures ``L`` from the
spectrum's noise floor; :func:`stemfast.find_sites` widens the column low-pass by it and says so.

The noise floor is read as the median power in thin annuli of the windowed spectrum of a central
crop (the median is not moved by the lattice's few Bragg spots). Scanning down from 0.5 cycles/px,
the band edge ``f_c`` is the first frequency below which the floor is flat over an octave: every
annulus of ``[f_c / 2, f_c]`` holds at least :data:`FLOOR_SHARE` of the octave's median power. White
noise passes at once; an upsampled image only at its old Nyquist frequency (above it the spectrum
falls by orders of magnitude, with the interpolation's attenuated images of the baseband in
between, so no octave that reaches past it is flat). ``L = 0.5 / f_c``; below :data:`MIN_CORRELATION_PX` the noise
counts as white (``L = 1``). Every shared, validation and simulated scan measures white (band
edge 0.5; every annulus of their top octave holds 0.86-0.96 of its median power).

Examples
--------
>>> rng = np.random.default_rng(0)
>>> white = rng.normal(size=(256, 256))
>>> noise_correlation(white)["correlation_px"]
1.0
>>> from scipy import ndimage
>>> zoomed = ndimage.zoom(white, 2.0, order=3)[:256, :256]  # upsampled 2x: correlated over ~2 px
>>> round(noise_correlation(zoomed)["correlation_px"], 1)
2.0
"""
from __future__ import annotations

import functools

import numpy as np

from .braggring import SPECTRUM_CROP, _spectrum

__all__ = ["noise_correlation", "NoiseCorrelationWarning", "FLOOR_SHARE", "MIN_CORRELATION_PX", "BIN_WIDTH",
           "MIN_BIN_PX"]


class NoiseCorrelationWarning(UserWarning):
    """The image's noise is correlated over several pixels (:func:`noise_correlation`)."""


#: width of the annuli (cycles/px) ...
BIN_WIDTH = 0.01
#: ... and at least this many frequency steps (1 / side) of the crop
MIN_BIN_PX = 4
#: the band edge: the first frequency (from 0.5 cycles/px down) below which every annulus of the
#: octave holds at least this share of the octave's median power (the shared, validation and
#: simulated scans' top octave: 0.86-0.96)
FLOOR_SHARE = 0.5
#: correlation lengths below this count as white noise (1 px); every shared, validation and simulated
#: scan measures exactly 1 (band edge 0.5)
MIN_CORRELATION_PX = 1.2
#: least side of the crop (px) for a measurement; smaller images are taken as white
MIN_SIDE = 64
#: what white noise (or an image too small or too empty to measure) reads
_WHITE = {"band_edge": 0.5, "correlation_px": 1.0}


def noise_correlation(image: np.ndarray, pixels: np.ndarray | None = None, *, power: np.ndarray | None = None) -> dict:
    """How many pixels an image's noise is correlated over (module docs).

    Parameters
    ----------
    image : (H, W) float array, the micrograph as recorded.
    pixels : bool (H, W), optional: the pixels that hold data (False: padding, masks; they are set to
        the mean of the rest).
    power : optional, the windowed power spectrum of ``image``'s central crop where already computed
        (:attr:`stemfast.braggring.RingSpectrum.power`); used where that crop is the square one read
        here and every pixel of it holds data (the same spectrum), else the spectrum is computed.

    Returns
    -------
    dict
        ``band_edge`` (cycles/px, 0.5 for white noise), ``correlation_px`` (``L = 0.5 / band_edge``,
        1.0 below :data:`MIN_CORRELATION_PX`), and when ``L > 1`` a ``warning``.
    """
    img = np.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {img.shape}")
    side = min(SPECTRUM_CROP, *img.shape) // 2 * 2  # the Bragg ring's crop (braggring), square
    if side < MIN_SIDE:
        return dict(_WHITE)
    y0, x0 = (img.shape[0] - side) // 2, (img.shape[1] - side) // 2
    crop = np.asarray(img[y0:y0 + side, x0:x0 + side], np.float64)  # (only the crop in float64)
    ok = np.isfinite(crop) if pixels is None else np.isfinite(crop) & np.asarray(pixels, bool)[y0:y0 + side,
                                                                                                  x0:x0 + side]
    if ok.sum() < 0.5 * crop.size:
        return dict(_WHITE)
    # no-data pixels at the mean of the rest: the spectrum's mean subtraction leaves them at 0. (A
    # spectrum of the image's SPECTRUM_CROP crop of this shape is of this crop: the same offsets)
    if power is None or power.shape != (side, side) or not ok.all():
        power, _, _ = _spectrum(np.where(ok, crop, crop[ok].mean()), crop=side)
    nb, groups = _annuli(side)
    width = 0.5 / nb
    flat = power.ravel()
    med = np.array([np.median(flat[g]) for g in groups])
    centre = (np.arange(nb) + 0.5) * width
    edge = 0.5
    for b in range(nb - 1, 0, -1):
        octave = med[(centre >= 0.5 * centre[b]) & (centre <= centre[b])]
        if octave.min() >= FLOOR_SHARE * np.median(octave):  # a flat floor up to centre[b]
            edge = float(min(0.5, (b + 1) * width))
            break
    corr = 0.5 / edge
    out = {"band_edge": round(edge, 4), "correlation_px": 1.0 if corr < MIN_CORRELATION_PX else round(corr, 3)}
    if out["correlation_px"] > 1.0:
        out["warning"] = (f"the image's noise is correlated over about {out['correlation_px']:.1f} px (its spectrum "
                          f"falls off above {edge:.2f} cycles/px, not at 0.5): an upsampled, interpolated or filtered "
                          "image, not the scan's own pixels. The column intensities are read with a low-pass widened "
                          "by that factor (at most 0.2 site spacings); defect scores are surer on the recorded scan")
    return out


@functools.lru_cache(maxsize=8)
def _annuli(side: int) -> tuple[int, tuple[np.ndarray, ...]]:
    """The annuli of the (fftshifted) spectrum of a ``side`` x ``side`` crop: their number ``nb``
    (width ``0.5 / nb`` cycles/px: :data:`BIN_WIDTH`, wider for a small crop) and each one's flat
    indices, from the centre out."""
    nb = int(0.5 / max(BIN_WIDTH, MIN_BIN_PX / side))  # a small crop: wider annuli, stable medians
    f = np.fft.fftshift(np.fft.fftfreq(side))
    radius = np.hypot(f[:, None], f[None, :]).ravel()
    k = np.floor(radius / (0.5 / nb)).astype(np.int64)
    order = np.argsort(k, kind="stable")
    bounds = np.searchsorted(k[order], np.arange(nb + 1))
    return nb, tuple(order[a:b] for a, b in zip(bounds[:-1], bounds[1:]))
