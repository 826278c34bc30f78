"""Atomic-column detection: local maxima of an image plus sub-pixel refinement.

:func:`find_peaks` finds every pixel above a threshold that is the maximum of the disc of radius
``min_distance`` around it (so no two peaks are closer than ``min_distance``; on an exact plateau
the last pixel in raster order wins), then refines the positions:

* ``"com"``: centre of mass of ``image - min`` over a disc of ``radius`` px around the maximum;
* ``"gauss"``: the centre of mass, then a least-squares fit of a round 2-D Gaussian plus constant,
  ``B + A exp(-((u - x0)^2 + (v - y0)^2) / (2 s^2))``, to the disc pixels (Levenberg-Marquardt).
  A fit that does not converge, or converges to ``A <= 0``, ``s`` outside ``(0, 2 radius)`` or a
  centre more than ``radius`` from its start, is marked ``ok = False`` and the site keeps its
  centre-of-mass position.

Refinement may use a different image than detection (``refine_image``): typically detection on the
band-passed image and refinement on the raw image, lightly smoothed.

Coordinates are ``(x, y)`` = (column, row) in pixels, pixel centres at integers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np

from ._validate import check_image, check_xy, positive
from .backend import get_kernels

__all__ = [
    "PeakResult",
    "find_peaks",
    "refine",
    "default_threshold",
    "THRESHOLD_MAD_K",
    "REFINE_RADIUS_PER_MIN_DISTANCE",
    "GAUSS_MAX_ITER",
]

#: default threshold = median + THRESHOLD_MAD_K * (robust standard deviation of the image)
THRESHOLD_MAD_K = 1.0
#: default refinement radius = max(1, REFINE_RADIUS_PER_MIN_DISTANCE * min_distance)
REFINE_RADIUS_PER_MIN_DISTANCE = 0.5
#: Levenberg-Marquardt iterations (attempted steps) per Gaussian fit
GAUSS_MAX_ITER = 30
#: pixels sampled (on a regular stride) by :func:`default_threshold`
_THRESHOLD_SAMPLES = 1 << 20
#: smallest accepted image side, px
MIN_SIDE = 3


@dataclass(frozen=True)
class PeakResult:
    """Detected (and refined) columns. All arrays have one row per peak, in raster order of the maxima.

    Attributes
    ----------
    xy : float64 [N, 2]
        Positions ``(x, y)`` in px (refined when a refinement ran).
    value : float64 [N]
        Detection image value at the integer maximum.
    amplitude, sigma, background : float64 [N] or None
        Gaussian fit parameters ``A``, ``s``, ``B`` (``refine="gauss"`` only). Where the fit failed
        they hold its start values (``A0`` = value minus disc minimum, ``sigma0``, disc minimum).
    ok : bool [N] or None
        Whether the Gaussian fit succeeded (``refine="gauss"`` only); failed sites keep the centre
        of mass position.
    method : str or None
        The refinement that ran: ``"gauss"``, ``"com"`` or None.
    threshold : float
        Detection threshold used (NaN when the positions were not detected here, see :func:`refine`).
    """

    xy: np.ndarray
    value: np.ndarray
    amplitude: np.ndarray | None = None
    sigma: np.ndarray | None = None
    background: np.ndarray | None = None
    ok: np.ndarray | None = None
    method: str | None = None
    threshold: float = float("nan")

    def __len__(self) -> int:
        return int(self.xy.shape[0])


# --------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------
def _check_image(image, name: str = "image") -> np.ndarray:
    return check_image(image, name, min_side=MIN_SIDE)


def default_threshold(image: np.ndarray) -> float:
    """Default detection threshold: ``median + THRESHOLD_MAD_K * 1.4826 * MAD`` of the image.

    A robust "clearly above the typical pixel" level: on a band-passed lattice image most pixels
    are background around or below the median, while the columns stand far above it; maxima of
    flat, featureless areas (vacuum, amorphous carbon) stay below it. Median and MAD are computed
    on a regular subsample of at most ~1e6 pixels.

    Examples
    --------
    >>> import numpy as np
    >>> default_threshold(np.arange(100.0).reshape(10, 10)) == 49.5 + 1.4826 * 25
    True
    """
    img = np.asarray(image)
    step = max(1, int(math.ceil(img.size / _THRESHOLD_SAMPLES)))
    sample = img.reshape(-1)[::step].astype(np.float64)
    med = float(np.median(sample))
    mad = float(np.median(np.abs(sample - med)))
    return med + THRESHOLD_MAD_K * 1.4826 * mad


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------
def refine(
    image,
    xy,
    *,
    method: str = "gauss",
    radius: float,
    sigma0: float | None = None,
    n_iter: int = GAUSS_MAX_ITER,
    backend: str | None = None,
) -> PeakResult:
    """Sub-pixel refinement of given positions (centre of mass, optionally followed by a Gaussian fit).

    Parameters
    ----------
    image : array_like, 2-D
        Image the refinement fits (finite).
    xy : array_like [N, 2]
        Start positions ``(x, y)``; their rounded positions must lie inside the image.
    method : {"gauss", "com"}
        ``"com"``: centre of mass of ``image - min`` over the disc of ``radius`` px around
        ``round(xy)``. ``"gauss"``: that centre of mass, then a round Gaussian + constant fitted to
        the disc around it; failed fits (``ok`` False) keep the centre of mass.
    radius : float
        Disc radius (px), > 0.
    sigma0 : float, optional
        Start Gaussian sigma (px), default ``radius / 2``.
    n_iter : int
        Maximum Levenberg-Marquardt iterations per site.
    backend : str, optional
        Kernel backend; default the fastest available.

    Returns
    -------
    PeakResult
        ``value`` is the image value at ``round(xy)`` (the input positions).

    Examples
    --------
    >>> import numpy as np
    >>> y, x = np.mgrid[:32, :32]
    >>> img = np.exp(-((x - 15.3) ** 2 + (y - 16.6) ** 2) / (2 * 2.0**2))
    >>> res = refine(img, [[15, 17]], method="gauss", radius=4)
    >>> bool(res.ok[0]), np.round(res.xy[0], 3).tolist(), round(float(res.sigma[0]), 3)
    (True, [15.3, 16.6], 2.0)
    """
    img = _check_image(image)
    pts = check_xy(xy, shape=img.shape)
    if method not in ("gauss", "com"):
        raise ValueError(f"method must be 'gauss' or 'com', got {method!r}")
    radius = positive("radius", radius)
    sigma0 = radius / 2.0 if sigma0 is None else positive("sigma0", sigma0)
    if not isinstance(n_iter, Integral) or isinstance(n_iter, bool) or n_iter < 1:
        raise ValueError(f"n_iter must be an integer >= 1, got {n_iter!r}")
    return _refine(img, pts, method, radius, sigma0, int(n_iter), get_kernels(backend))


def _refine(
    img: np.ndarray, pts: np.ndarray, method: str, radius: float, sigma0: float, n_iter: int, kern
) -> PeakResult:
    """Refinement on validated inputs (float32 image, float64 [N, 2] points inside it)."""
    c = np.floor(pts + 0.5).astype(np.int64)
    value = img[c[:, 1], c[:, 0]].astype(np.float64)
    com = np.asarray(kern.refine_com(img, pts, radius), dtype=np.float64).reshape(-1, 2)
    if method == "com":
        return PeakResult(xy=com, value=value, method="com")
    fit = np.asarray(kern.refine_gauss(img, np.ascontiguousarray(com), radius, sigma0, n_iter)).reshape(-1, 6)
    # failed fits return their start values, i.e. the centre of mass position
    return PeakResult(
        xy=np.ascontiguousarray(fit[:, :2]),
        value=value,
        amplitude=fit[:, 2].copy(),
        sigma=fit[:, 3].copy(),
        background=fit[:, 4].copy(),
        ok=fit[:, 5] > 0.5,
        method="gauss",
    )


def find_peaks(
    image,
    *,
    min_distance: float,
    threshold: float | None = None,
    border: int = 0,
    refine: str | None = "gauss",
    refine_image=None,
    radius: float | None = None,
    sigma0: float | None = None,
    backend: str | None = None,
) -> PeakResult:
    """Find atomic columns: disc local maxima above a threshold, refined to sub-pixel positions.

    Parameters
    ----------
    image : array_like, 2-D
        Detection image, typically band-passed (:func:`stemfast.bandpass.bandpass`). Finite.
    min_distance : float
        Radius (px) of the disc a maximum must dominate; peaks are more than ``min_distance`` apart.
    threshold : float, optional
        Maxima must be strictly above it. Default :func:`default_threshold` (median + 1 robust std).
        ``-inf`` keeps every maximum.
    border : int
        Maxima closer than this to the image edge (in x or y) are dropped. The disc test itself
        always uses only pixels inside the image.
    refine : {"gauss", "com", None}
        Sub-pixel refinement (see :func:`refine`); None keeps the integer positions.
    refine_image : array_like, optional
        Image the refinement fits (same shape), e.g. the lightly smoothed raw image; default ``image``.
    radius : float, optional
        Refinement disc radius (px), default ``max(1, 0.5 * min_distance)``.
    sigma0 : float, optional
        Start sigma of the Gaussian fit (px), default ``radius / 2``.
    backend : str, optional
        Kernel backend (``"cpp"``, ``"numba"``, ``"numpy"``); default the fastest available.

    Returns
    -------
    PeakResult

    Examples
    --------
    >>> import numpy as np
    >>> y, x = np.mgrid[:48, :48]
    >>> img = sum(np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 8.0) for cx, cy in [(10.2, 12.7), (30.6, 33.1)])
    >>> res = find_peaks(img, min_distance=5, threshold=0.1)
    >>> np.round(res.xy, 2).tolist(), res.ok.tolist()
    ([[10.2, 12.7], [30.6, 33.1]], [True, True])
    """
    img = _check_image(image)
    md = positive("min_distance", min_distance)
    if threshold is None:
        thr = default_threshold(img)
    else:
        if not isinstance(threshold, Real) or isinstance(threshold, bool) or math.isnan(float(threshold)):
            raise ValueError(f"threshold must be a number (not NaN), got {threshold!r}")
        thr = float(threshold)
    if not isinstance(border, Integral) or isinstance(border, bool) or border < 0:
        raise ValueError(f"border must be an integer >= 0, got {border!r}")
    if refine not in ("gauss", "com", None):
        raise ValueError(f"refine must be 'gauss', 'com' or None, got {refine!r}")
    rimg = img
    if refine_image is not None and refine_image is not image:
        rimg = _check_image(refine_image, "refine_image")
        if rimg.shape != img.shape:
            raise ValueError(f"refine_image has shape {rimg.shape}, the image {img.shape}")
    rad = max(1.0, REFINE_RADIUS_PER_MIN_DISTANCE * md) if radius is None else positive("radius", radius)
    s0 = rad / 2.0 if sigma0 is None else positive("sigma0", sigma0)
    kern = get_kernels(backend)

    ij = np.asarray(kern.local_maxima(img, md, thr, int(border)), dtype=np.int64).reshape(-1, 2)
    value = img[ij[:, 1], ij[:, 0]].astype(np.float64)
    xy = ij.astype(np.float64)
    if refine is None:
        return PeakResult(xy=xy, value=value, method=None, threshold=thr)
    res = _refine(rimg, xy, refine, rad, s0, GAUSS_MAX_ITER, kern)
    return PeakResult(
        xy=res.xy,
        value=value,
        amplitude=res.amplitude,
        sigma=res.sigma,
        background=res.background,
        ok=res.ok,
        method=res.method,
        threshold=thr,
    )
