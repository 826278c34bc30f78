"""Scan lines that are off: streaks and row jumps of a raster-scanned micrograph, found with the lattice.

A STEM image is scanned line by line (x fast, y slow). A glitch of the beam current, the detector or
the scan offsets or scales whole lines (rows) at once, and a column on such a line looks brighter
or darker than its sublattice although nothing is there -- a false defect. The lattice tells such a
line from the sample: moving the image by a lattice vector ``t`` of one sublattice maps every column
onto an equal column, so along a sound line the difference ``I(x, y) - I(x + t_x, y + t_y)`` is
noise plus the rare defects, and its median over the line is ~0; along a line that is off by ``a(y)``
it is ``a(y) - a(y + t_y)``. With the six shortest same-sublattice vectors (each with a different
``t_y``; a streak is a few lines, so most of the six lines ``y + t_y`` are sound) the median of the
six per-line medians is ``a(y)`` (:func:`scan_line_offsets`). The lattice cancels whatever its
orientation -- also when its rows run along the scan lines, where a plain row median would follow
the atom rows -- and contamination and gradients, smooth over one lattice vector, cancel as well.

Lines whose offset stands out from the others by more than ``threshold`` robust standard
deviations are *flagged*. Their offset is taken out of the image before the column intensities
are read (:func:`stemfast.find_sites`, ``column_intensity``); what a gain (not an offset) did to
the columns on them is taken out in the defect scores (:mod:`stemfast.analysis`), per site.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ScanLines", "scan_line_offsets", "same_sublattice_vectors"]

#: a scan line is flagged when its offset is this many robust standard deviations from the others
DEFAULT_THRESHOLD = 5.0


@dataclass(frozen=True)
class ScanLines:
    """Output of :func:`scan_line_offsets`.

    Attributes
    ----------
    offset : float64 [H], the additive offset of every scan line (image units; NaN where no
        lattice vector stays inside the image).
    flagged : bool [H], lines whose offset stands out (streaks, row jumps).
    noise : robust standard deviation of ``offset`` over all lines.
    """

    offset: np.ndarray
    flagged: np.ndarray
    noise: float

    @property
    def rows(self) -> np.ndarray:
        """Indices of the flagged lines."""
        return np.flatnonzero(self.flagged)

    def correction(self) -> np.ndarray:
        """Per line, what to subtract from the image: the offset on flagged lines, 0 elsewhere."""
        return np.where(self.flagged, np.nan_to_num(self.offset), 0.0)


def same_sublattice_vectors(a1: np.ndarray, a2: np.ndarray) -> np.ndarray:
    """The three shortest translations that map a sublattice of a 2H site lattice onto itself
    (``a1 + a2``, ``2 a1 - a2``, ``a1 - 2 a2``; length ``sqrt(3)`` site spacings) from the site
    lattice's basis ``a1, a2`` (sites ``m a1 + n a2`` have colour ``(m - n) mod 3``) [3, 2].

    Examples
    --------
    >>> same_sublattice_vectors(np.array([1.0, 0.0]), np.array([0.5, np.sqrt(3) / 2])).round(3)
    array([[ 1.5  ,  0.866],
           [ 1.5  , -0.866],
           [ 0.   , -1.732]])
    """
    a1 = np.asarray(a1, np.float64)
    a2 = np.asarray(a2, np.float64)
    return np.array([a1 + a2, 2 * a1 - a2, a1 - 2 * a2])


def scan_line_offsets(image, vectors, *, threshold: float = DEFAULT_THRESHOLD) -> ScanLines:
    """The offset of every scan line (image row), measured against the lattice (module docs).

    Parameters
    ----------
    image : (H, W) array, the raw micrograph.
    vectors : float [K, 2] lattice translations (x, y) in px that map the lattice onto itself
        (:func:`same_sublattice_vectors`); each is used with both signs.
    threshold : flag lines whose offset is more than this many robust standard deviations from
        the median line's.

    Returns
    -------
    ScanLines

    Examples
    --------
    >>> yy, xx = np.mgrid[0:96, 0:96].astype(float)
    >>> img = 10 + 5 * np.cos(2 * np.pi * xx / 8) * np.cos(2 * np.pi * yy / 8)
    >>> img += np.random.default_rng(0).normal(0, 0.5, img.shape)  # noise
    >>> img[40:42] += 3.0  # a streak of two lines
    >>> lines = scan_line_offsets(img, [[8.0, 8.0], [8.0, -8.0], [0.0, 16.0]])
    >>> lines.rows.tolist(), np.round(lines.offset[40:42]).tolist()
    ([40, 41], [3.0, 3.0])
    """
    img = np.asarray(image)
    if img.ndim != 2 or min(img.shape) < 2:
        raise ValueError(f"image must be 2-D, got shape {img.shape}")
    vec = np.asarray(vectors, np.float64)
    if vec.ndim != 2 or vec.shape[1] != 2 or len(vec) == 0 or not np.isfinite(vec).all():
        raise ValueError(f"vectors must be a finite [K, 2] array, got shape {vec.shape}")
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    return _scan_line_offsets(img.astype(np.float32, copy=False), vec, float(threshold))


#: per line, the median is taken over about this many pixels (every k-th column): its noise is then
#: ~1/16 of a pixel's, far below any offset worth flagging, at a quarter of the cost on a 1024 px line
LINE_SAMPLES = 256


def _shifted_row_medians(img: np.ndarray, tx: float, ty: float) -> np.ndarray:
    """Per row ``y``, the median over x (every k-th column, :data:`LINE_SAMPLES` of them) of
    ``I(x, y) - I(x + tx, y + ty)`` (bilinear), NaN where the shifted row leaves the image."""
    H, W = img.shape
    out = np.full(H, np.nan)
    ix, iy = int(np.floor(tx)), int(np.floor(ty))
    fx, fy = tx - ix, ty - iy
    # rows y with y + iy and y + iy + 1 inside; columns x with x + ix and x + ix + 1 inside
    y0, y1 = max(0, -iy), min(H, H - iy - 1)
    x0, x1 = max(0, -ix), min(W, W - ix - 1)
    if y1 <= y0 or x1 - x0 < 8:
        return out
    k = max(1, (x1 - x0) // LINE_SAMPLES)
    a = img[y0 + iy:y1 + iy, x0 + ix:x1 + ix:k]
    b = img[y0 + iy:y1 + iy, x0 + ix + 1:x1 + ix + 1:k]
    c = img[y0 + iy + 1:y1 + iy + 1, x0 + ix:x1 + ix:k]
    d = img[y0 + iy + 1:y1 + iy + 1, x0 + ix + 1:x1 + ix + 1:k]
    diff = img[y0:y1, x0:x1:k] - ((1 - fy) * ((1 - fx) * a + fx * b) + fy * ((1 - fx) * c + fx * d))
    out[y0:y1] = np.median(diff, axis=1)
    return out


def _scan_line_offsets(img: np.ndarray, vec: np.ndarray, threshold: float) -> ScanLines:
    meds = np.array([_shifted_row_medians(img, s * tx, s * ty) for tx, ty in vec for s in (1.0, -1.0)])
    ok = np.isfinite(meds)
    with np.errstate(invalid="ignore"):
        srt = np.sort(np.where(ok, meds, np.inf), axis=0)
    k = ok.sum(0)
    rows = np.arange(img.shape[0])
    lo = srt[np.maximum(k - 1, 0) // 2, rows]
    hi = srt[np.maximum(k, 1) // 2 - (k == 0), rows]
    with np.errstate(invalid="ignore"):
        offset = 0.5 * (lo + hi)
    offset[k == 0] = np.nan
    good = np.isfinite(offset)
    if good.sum() < 8:
        return ScanLines(offset, np.zeros(len(offset), bool), float("nan"))
    centre = float(np.median(offset[good]))
    noise = float(1.4826 * np.median(np.abs(offset[good] - centre)))
    flagged = good & (np.abs(offset - centre) > threshold * noise) if noise > 0 else np.zeros(len(offset), bool)
    return ScanLines(offset, flagged, noise)
