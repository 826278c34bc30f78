"""Which way round the image shows the columns: bright on a dark background, or dark on a bright one.

stemfast reads columns as maxima and names the sublattices by brightness, as high-angle annular
dark field (HAADF / ADF) shows them: the heaviest column the brightest, the hexagon centre the
darkest. A bright-field or annular bright-field (ABF) image of the same scan -- recorded at the same
time by the on-axis detector, often saved beside the ADF files -- shows the columns dark on a bright
background. Read as it is, its maxima are the hexagon centres: the lattice still comes out (it is
one triangular lattice for all three), but every name and every defect score is wrong (the labelled
WSe2 scan inverted: defect AP 0.09 instead of 0.80), and nothing said so.

:func:`column_contrast` tells them apart in two ways.

- **The phase of the lattice's reflections** (when the metal lattice's first Bragg ring ``g`` is
  known): for two first-ring vectors ``g1, g2`` 120 degrees apart, ``h = g1 - g2`` lies on the
  ``sqrt(3)`` ring, where the metal and the chalcogen pair of a 2H monolayer scatter in phase. The
  product ``F(g1) F*(g2) F*(h)`` of the image's Fourier components is independent of where the
  lattice sits (the phases of a shift cancel) and equals ``|F(g)|^2 (f_metal + f_chalcogen)``: real and
  positive when the atoms are bright, negative when they are dark, whatever the two columns' ratio,
  and a blur (a real, positive transfer) leaves it alone. It is summed over the image from local
  demodulations (a distorted lattice's local phases cancel the same way); ``phase_cos`` is the cosine
  of its phase and ``coherence`` its length over the sum of the local lengths. On 110 real and
  simulated scans (the shared, validation and dev images, the 95 images of round 30) it is +0.66 to
  +1.00 with coherence 0.80 to 1.00, the same after a 1.2 px blur, and its negative inverted. It
  decides when the coherence is at least :data:`CONTRAST_COHERENCE` and the cosine beyond
  :data:`CONTRAST_PHASE_COS` either way (on pieces of 6-9 spacings a side it scatters: coherence
  0.36-0.99).
- **The skewness** of the band-passed image at the lattice scale (without a ring, or where the phase
  is not coherent): columns are compact peaks on a broad background, so the pixel values of an ADF
  image have a long tail towards bright, and those of a bright-field image the mirror tail. At 5 px
  spacing a blur of 1 px already turns it round on WSe2 (whose first ring alone has a slightly
  negative skew: the W and Se2 levels 1 and 0.54 put its phase near 33 degrees), so the phase decides
  where it can. The skewness is a
quantile one, ``(q95 + q5 - 2 q50) / (q95 - q5)``: +0.17 to +0.69 on every shared and validation
image, simulated and real, low dose included. (The moment skewness, +0.45 to +2.3 there, follows
the few pixels at the edges of an annotation: a 6 px black frame drawn round a real MoS2 scan took
it from +1.04 to +0.31, the quantile one from +0.38 to +0.27.) Regions without data
(:mod:`stemfast.nodata`) and three spacings around them, where the band-pass rings, are left out.
``sites.contrast`` (``"auto"``, the default) inverts an image whose columns are dark and says so
(``lattice.contrast`` in ``summary.json``, a :class:`ContrastWarning`), and warns where the skewness
is too small to tell; ``"bright"`` or ``"dark"`` say which it is.

Examples
--------
>>> from stemfast.synthetic import make_lattice
>>> img, _ = make_lattice((128, 128), 8.0, noise=0.05, seed=0)
>>> column_contrast(img, 8.0).columns, column_contrast(img.max() - img, 8.0).columns
('bright', 'dark')
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import ndimage

from .vacuum import film_window

__all__ = ["CONTRASTS", "CONTRAST_SKEW", "CONTRAST_PHASE_COS", "CONTRAST_COHERENCE", "Contrast", "ContrastWarning",
           "column_contrast", "inverted", "phase_invariant"]

#: what ``sites.contrast`` may be: ``auto`` (from the image), ``bright`` (ADF / HAADF: the columns
#: bright) or ``dark`` (bright field / ABF: the columns dark)
CONTRASTS = ("auto", "bright", "dark")
#: the (quantile) skewness beyond which the columns are called bright (above) or dark (below its
#: negative); in between the image cannot tell
CONTRAST_SKEW = 0.05
#: the phase test decides when the cosine of the invariant's phase is beyond this (either sign) ...
CONTRAST_PHASE_COS = 0.3
#: ... and its coherence (length of the sum over the sum of the lengths) at least this
CONTRAST_COHERENCE = 0.5
#: the no-data regions' surroundings left out, in spacings (the band-pass's background sigma is one)
CONTRAST_RING_NN = 3.0
#: the skewness is measured on a central crop of at most this side (px): the sign is the image's
#: everywhere, and a 16k micrograph is not band-passed whole for it
CONTRAST_CROP = 512


class ContrastWarning(UserWarning):
    """The image's columns are dark (it was inverted), or their contrast could not be told."""


class Contrast(NamedTuple):
    """What :func:`column_contrast` found: ``columns`` ``"bright"``, ``"dark"`` or ``"unclear"``, the
    (quantile) skewness of the band-passed image, the cosine of the phase invariant and its coherence
    (NaN without a ring), and ``by``: which of the two decided (``"phase"`` or ``"skew"``)."""

    columns: str
    skew: float
    phase_cos: float = float("nan")
    coherence: float = float("nan")
    by: str = "skew"


def column_contrast(image, spacing: float, *, mask=None, g=None, backend: str | None = None) -> Contrast:
    """Whether the columns of ``image`` are bright or dark (module docs).

    Parameters
    ----------
    image : 2-D array, the micrograph.
    spacing : site spacing (px); the band-pass keeps the scales of a column (0.12 to 1 spacing).
    mask : optional bool array of the image's shape, True where the pixels hold no data
        (:mod:`stemfast.nodata`) or vacuum (:func:`stemfast.vacuum.dark_vacuum`); they are left out,
        and the crop read is the one holding the most of the other pixels
        (:func:`stemfast.vacuum.film_window`).
    g : optional [2, 2] reciprocal vectors of the metal lattice's first ring (the phase test).
    backend : the kernels' backend (``sites.backend``; None: ``STEMFAST_BACKEND`` or the fastest).

    Returns
    -------
    Contrast
    """
    img = np.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {img.shape}")
    if not (np.isfinite(spacing) and spacing >= 2):
        raise ValueError(f"spacing must be >= 2 px, got {spacing!r}")
    if mask is not None and np.shape(mask) != img.shape:
        raise ValueError(f"mask must have the image's shape {img.shape}, got {np.shape(mask)}")
    if g is not None and (np.shape(g) != (2, 2) or not np.isfinite(g).all()):
        raise ValueError(f"g must be a finite [2, 2] array of reciprocal vectors, got shape {np.shape(g)}")
    return _column_contrast(img, float(spacing), mask, None if g is None else np.asarray(g, np.float64), backend)


def _column_contrast(img: np.ndarray, spacing: float, mask, g: np.ndarray | None = None,
                     backend: str | None = None) -> Contrast:
    H, W = img.shape
    if mask is None:
        y0, x0 = max(0, (H - CONTRAST_CROP) // 2), max(0, (W - CONTRAST_CROP) // 2)
    else:  # the central crop, unless another holds clearly more of the image's data
        y0, x0 = film_window(np.asarray(mask, bool), CONTRAST_CROP)
    crop = np.asarray(img[y0:y0 + CONTRAST_CROP, x0:x0 + CONTRAST_CROP], np.float32)
    gap = None
    if mask is not None:
        gap = np.asarray(mask, bool)[y0:y0 + CONTRAST_CROP, x0:x0 + CONTRAST_CROP]
        gap = ndimage.binary_dilation(gap, iterations=int(np.ceil(CONTRAST_RING_NN * spacing))) if gap.any() else None
    skew = _skewness(crop, spacing, gap, backend)
    cos, coherence = phase_invariant(crop, g, gap) if g is not None else (float("nan"), float("nan"))
    if coherence >= CONTRAST_COHERENCE and abs(cos) >= CONTRAST_PHASE_COS:
        return Contrast("bright" if cos > 0 else "dark", skew, cos, coherence, "phase")
    if skew >= CONTRAST_SKEW:
        return Contrast("bright", skew, cos, coherence)
    if skew <= -CONTRAST_SKEW:
        return Contrast("dark", skew, cos, coherence)
    return Contrast("unclear", skew, cos, coherence)


def _skewness(crop: np.ndarray, spacing: float, gap: np.ndarray | None, backend: str | None = None) -> float:
    """The quantile skewness ``(q95 + q5 - 2 q50) / (q95 - q5)`` of ``crop`` band-passed at the
    lattice scale, the pixels ``gap`` left out; NaN with fewer than 64 pixels or no spread."""
    from .bandpass import bandpass

    bp = bandpass(crop, noise_px=0.12 * spacing, background_px=spacing, backend=backend)
    v = (bp if gap is None else bp[~gap]).ravel()
    if v.size < 64:
        return float("nan")
    q05, q50, q95 = np.percentile(v, [5, 50, 95])
    return float((q95 + q05 - 2 * q50) / (q95 - q05)) if q95 > q05 else float("nan")


def phase_invariant(image: np.ndarray, g: np.ndarray, gap: np.ndarray | None = None) -> tuple[float, float]:
    """``(cos, coherence)`` of the phase invariant ``F(g1) F*(g2) F*(g1 - g2)`` of a 2H lattice image
    (module docs): ``g`` rows two first-ring reciprocal vectors of the metal lattice (cycles / px; at
    60 degrees the second is turned to 120), summed from local demodulations (block means of a
    quarter, then a Gaussian of one metal period) over the pixels not in ``gap``. ``cos`` > 0: the
    atoms are bright; < 0: dark. NaN, NaN without pixels or signal.

    Examples
    --------
    >>> from stemfast.synthetic import make_lattice
    >>> img, _ = make_lattice((96, 96), 8.0, noise=0.05, seed=0)
    >>> g = np.linalg.inv(np.array([[8.0, 0.0], [4.0, 8.0 * 3 ** 0.5 / 2]])).T  # that lattice's reciprocal
    >>> [round(v, 1) for v in phase_invariant(img, g)], round(phase_invariant(inverted(img), g)[0], 1)
    ([1.0, 1.0], -1.0)
    """
    a = np.asarray(image, np.float32)
    keep = np.ones(a.shape, bool) if gap is None else ~np.asarray(gap, bool)
    if not keep.any():
        return float("nan"), float("nan")
    a = np.where(keep, a - a[keep].mean(dtype=np.float64), 0.0).astype(np.float32)
    g1, g2 = np.asarray(g, np.float64)
    if g1 @ g2 > 0:  # 60 degrees apart: the other one at 120
        g2 = g2 - g1
    period = 1.0 / max(float(np.hypot(*g1)), 1e-9)
    # demodulated, what is left is slow: block means of a quarter period, then the Gaussian
    k = max(1, int(period // 4))
    H, W = (a.shape[0] // k) * k, (a.shape[1] // k) * k
    if H < k or W < k:
        return float("nan"), float("nan")
    y, x = np.arange(H, dtype=np.float64), np.arange(W, dtype=np.float64)
    parts = []
    for q in (g1, g2, g1 - g2):  # (the phase ramp as an outer product of a row and a column factor)
        ramp = np.outer(np.exp(-2j * np.pi * q[1] * y), np.exp(-2j * np.pi * q[0] * x)).astype(np.complex64)
        z = (a[:H, :W] * ramp).reshape(H // k, k, W // k, k).mean(axis=(1, 3))
        parts.append(ndimage.gaussian_filter(z.real, period / k, truncate=3.0)
                     + 1j * ndimage.gaussian_filter(z.imag, period / k, truncate=3.0))
    keep = keep[:H, :W].reshape(H // k, k, W // k, k).all(axis=(1, 3))
    p = (parts[0] * np.conj(parts[1]) * np.conj(parts[2]))[keep].astype(np.complex128)
    total, size = p.sum(), np.abs(p).sum()
    if not size > 0:
        return float("nan"), float("nan")
    return float(np.cos(np.angle(total))), float(abs(total) / size)


def inverted(image: np.ndarray) -> np.ndarray:
    """``image`` the other way round within its own range (``max + min - image``, float32): dark columns
    bright, the values where they were (count data stays non-negative).

    Examples
    --------
    >>> inverted(np.array([[0.0, 1.0], [3.0, 4.0]])).tolist()
    [[4.0, 3.0], [1.0, 0.0]]
    """
    a = np.asarray(image, np.float32)
    return (np.float32(np.nanmax(a)) + np.float32(np.nanmin(a))) - a
