"""Which way round the image shows the columns: bright on a dark background, or dark on a bright one.

stemfast reads columns as maxima and names the sublattices by brightness, as high-angle annular
dark field (HAADF / ADF) shows them: the heaviest column the brightest, the hexagon centre the
darkest. A bright-field or annular bright-field (ABF) image of the same scan -- recorded at the same
time by the on-axis detector, often saved beside the ADF files -- shows the columns dark on a bright
background. Read as it is, its maxima are the hexagon centres: the lattice still comes out (it is
one triangular lattice for all three), but every name and every defect score is wrong (the labelled
WSe2 scan inverted: defect AP 0.09 instead of 0.80), and nothing said so.

:func:`column_contrast` tells them apart by the skewness of the band-passed image at the lattice
scale: columns are compact peaks on a broad background, so the pixel values of an ADF image have a
long tail towards bright, and those of a bright-field image the mirror tail. The skewness is a
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

__all__ = ["CONTRASTS", "CONTRAST_SKEW", "Contrast", "ContrastWarning", "column_contrast", "inverted"]

#: what ``sites.contrast`` may be: ``auto`` (from the image), ``bright`` (ADF / HAADF: the columns
#: bright) or ``dark`` (bright field / ABF: the columns dark)
CONTRASTS = ("auto", "bright", "dark")
#: the (quantile) skewness beyond which the columns are called bright (above) or dark (below its
#: negative); in between the image cannot tell
CONTRAST_SKEW = 0.05
#: the no-data regions' surroundings left out, in spacings (the band-pass's background sigma is one)
CONTRAST_RING_NN = 3.0
#: the skewness is measured on a central crop of at most this side (px): the sign is the image's
#: everywhere, and a 16k micrograph is not band-passed whole for it
CONTRAST_CROP = 512


class ContrastWarning(UserWarning):
    """The image's columns are dark (it was inverted), or their contrast could not be told."""


class Contrast(NamedTuple):
    """What :func:`column_contrast` found: ``columns`` ``"bright"``, ``"dark"`` or ``"unclear"``, and
    the (quantile) skewness of the band-passed image it rests on."""

    columns: str
    skew: float


def column_contrast(image, spacing: float, *, mask=None) -> Contrast:
    """Whether the columns of ``image`` are bright or dark (module docs).

    Parameters
    ----------
    image : 2-D array, the micrograph.
    spacing : site spacing (px); the band-pass keeps the scales of a column (0.12 to 1 spacing).
    mask : optional bool array of the image's shape, True where the pixels hold no data
        (:mod:`stemfast.nodata`) or vacuum (:func:`stemfast.vacuum.dark_vacuum`); they are left out,
        and the crop read is the one holding the most of the other pixels
        (:func:`stemfast.vacuum.film_window`).

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
    return _column_contrast(img, float(spacing), mask)


def _column_contrast(img: np.ndarray, spacing: float, mask) -> Contrast:
    from .bandpass import bandpass

    H, W = img.shape
    if mask is None:
        y0, x0 = max(0, (H - CONTRAST_CROP) // 2), max(0, (W - CONTRAST_CROP) // 2)
    else:  # the central crop, unless another holds clearly more of the image's data
        y0, x0 = film_window(np.asarray(mask, bool), CONTRAST_CROP)
    crop = np.asarray(img[y0:y0 + CONTRAST_CROP, x0:x0 + CONTRAST_CROP], np.float32)
    bp = bandpass(crop, noise_px=0.12 * spacing, background_px=spacing)
    if mask is not None:
        gap = np.asarray(mask, bool)[y0:y0 + CONTRAST_CROP, x0:x0 + CONTRAST_CROP]
        if gap.any():
            gap = ndimage.binary_dilation(gap, iterations=int(np.ceil(CONTRAST_RING_NN * spacing)))
            bp = bp[~gap]
    v = bp.ravel()
    if v.size < 64:
        return Contrast("unclear", float("nan"))
    q05, q50, q95 = np.percentile(v, [5, 50, 95])
    skew = float((q95 + q05 - 2 * q50) / (q95 - q05)) if q95 > q05 else float("nan")
    if skew >= CONTRAST_SKEW:
        return Contrast("bright", skew)
    if skew <= -CONTRAST_SKEW:
        return Contrast("dark", skew)
    return Contrast("unclear", skew)


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
