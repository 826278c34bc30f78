"""Patches around sub-pixel sites: bilinear extraction, robust normalisation, per-site intensity.

A *patch* is a ``size x size`` bilinear sample of the image centred on a (sub-pixel) site: patch pixel
``(r, c)`` shows the image at ``(x + c - (size - 1) / 2, y + r - (size - 1) / 2)``, so with an odd
``size`` the site sits exactly on the central pixel. Samples outside the image take a fill value
(the image median by default, i.e. background) and the patch is flagged as an *edge* patch.

Patches are normalised with one robust per-image :class:`PatchNorm` (``(raw - center) / scale``);
the norm is returned so that patches of another image can be normalised the same way, e.g. for a
model trained on the first image.

A separable linear resampling (weights ``W`` [M, size]: the patch becomes ``W @ P @ W.T``) can be
applied in the same pass, e.g. to a model's input size (:func:`stemfast.pipeline.prepare`): the
compiled gather then never stores the ``size x size`` patches.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ._validate import check_image, check_xy
from .backend import get_kernels

__all__ = ["PatchNorm", "Patches", "extract_patches", "LazyPatches", "patch_edge", "default_patch_size",
           "site_intensity", "resample_weights"]

log = logging.getLogger(__name__)

_ROW_BLOCK = 1024        # rows per block when converting / normalising the image
_INTENSITY_CHUNK = 1 << 15  # sites per chunk in site_intensity
_NORM_EXACT_MAX = 1 << 22   # PatchNorm.from_image samples larger images


@dataclass(frozen=True)
class PatchNorm:
    """Affine normalisation of patch values: ``normalised = (raw - center) / scale``.

    Attributes
    ----------
    center : image value mapped to 0 (the image median: background).
    scale : image value span mapped to 1 (99.5th percentile minus median; see :meth:`from_image`).

    Examples
    --------
    >>> PatchNorm(center=10.0, scale=2.0).apply(np.array([10.0, 14.0]))
    array([0., 2.])
    """

    center: float
    scale: float

    def __post_init__(self) -> None:
        if not math.isfinite(self.center):
            raise ValueError(f"PatchNorm.center must be finite, got {self.center!r}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"PatchNorm.scale must be finite and > 0, got {self.scale!r}")

    @classmethod
    def from_image(cls, image: np.ndarray) -> PatchNorm:
        """Robust normalisation of ``image``: center = median, scale = 99.5th percentile - median.

        A few hot pixels do not change the 99.5th percentile, so they do not squash the rest of the
        image. Images above 4M pixels use a fixed-seed random sample of 4M pixels. When that span is 0 (an image that is mostly constant) the scale falls back to
        ``1.4826 * MAD``, then to ``max - min``, then to 1.

        Examples
        --------
        >>> img = np.arange(1000, dtype=float).reshape(20, 50)
        >>> img[0, 0] = 1e9  # one hot pixel
        >>> n = PatchNorm.from_image(img)
        >>> round(n.center, 1), round(n.scale, 1)
        (500.5, 494.5)
        """
        a = np.asarray(image).ravel()
        if a.size > _NORM_EXACT_MAX:
            # a fixed-seed random sample of 4M pixels gives the percentiles to well under 1%; a
            # regular stride could beat against the lattice period, a random one cannot
            idx = np.random.default_rng(0).integers(0, a.size, _NORM_EXACT_MAX)
            a = a[idx]
        a = a.astype(np.float64)
        if a.size == 0 or not np.isfinite(a).all():
            raise ValueError("PatchNorm.from_image needs a non-empty image of finite values")
        center, hi = np.percentile(a, [50.0, 99.5])
        scale = float(hi - center)
        if not scale > 0:
            scale = 1.4826 * float(np.median(np.abs(a - center)))
        if not scale > 0:
            scale = float(a.max() - a.min())
        if not scale > 0:
            scale = 1.0
        return cls(center=float(center), scale=scale)

    def apply(self, values: np.ndarray) -> np.ndarray:
        """``(values - center) / scale``."""
        return (np.asarray(values) - self.center) / self.scale


@dataclass(frozen=True)
class Patches:
    """Output of :func:`extract_patches`.

    Attributes
    ----------
    data : float32 [N, size, size] patches (normalised with ``norm``).
    edge : bool [N], patches with samples outside the image (those samples hold the fill value).
    norm : the :class:`PatchNorm` applied (``PatchNorm(0, 1)`` when not normalised).
    """

    data: np.ndarray
    edge: np.ndarray
    norm: PatchNorm

    @property
    def size(self) -> int:
        """Patch side length in px."""
        return int(self.data.shape[1])

    def __len__(self) -> int:
        return int(self.data.shape[0])


def default_patch_size(spacing: float) -> int:
    """Patch side (px) for a lattice of nearest-neighbour ``spacing`` (px): the odd integer
    ``2 * ceil(1.25 * spacing) + 1`` (at least 3).

    The patch is at least ``2.5 * spacing`` wide, so the first neighbour shell of the centre site and a
    quarter spacing around it are inside the patch. The size is odd so that the site is the central
    patch pixel.

    Examples
    --------
    >>> default_patch_size(10.0)
    27
    >>> default_patch_size(12.3)
    33
    """
    spacing = float(spacing)
    if not (math.isfinite(spacing) and spacing > 0):
        raise ValueError(f"spacing must be a finite number > 0, got {spacing!r}")
    return max(3, 2 * math.ceil(1.25 * spacing) + 1)


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or int(size) < 3:
        raise ValueError(f"size must be an integer >= 3, got {size!r}")
    return int(size)


def _as_float32(image: np.ndarray, norm: PatchNorm | None) -> np.ndarray:
    """C-contiguous float32 copy of ``image`` (normalised in float64 first when ``norm`` is given)."""
    if norm is None:
        return np.ascontiguousarray(image, dtype=np.float32)
    work = np.empty(image.shape, dtype=np.float32)
    for r in range(0, image.shape[0], _ROW_BLOCK):
        block = image[r:r + _ROW_BLOCK].astype(np.float64)
        work[r:r + _ROW_BLOCK] = (block - norm.center) / norm.scale
    return work


def extract_patches(
    image: np.ndarray,
    xy: np.ndarray,
    *,
    size: int,
    fill: float | None = None,
    normalize: bool = True,
    norm: PatchNorm | None = None,
    backend: str | None = None,
    out: np.ndarray | None = None,
    resample_weights: np.ndarray | None = None,
) -> Patches:
    """Cut a ``size x size`` bilinear patch of ``image`` centred on every site of ``xy``.

    Parameters
    ----------
    image : (H, W) array
        The micrograph (any real dtype; finite).
    xy : (N, 2) array
        Sub-pixel site positions ``(x, y)`` = (column, row) in px, pixel centres at integers.
    size : int
        Patch side in px (>= 3); see :func:`default_patch_size`. Patch pixel ``(r, c)`` shows the
        image at ``(x + c - (size - 1) / 2, y + r - (size - 1) / 2)``.
    fill : float, optional
        Raw image value of samples outside the image; default the image median (background).
    normalize : bool
        Normalise the patches with ``norm`` (default True).
    norm : PatchNorm, optional
        The normalisation to apply; default :meth:`PatchNorm.from_image` of this image. Pass the
        ``norm`` of another image's patches to normalise this one identically.
    backend : str, optional
        Kernel backend (``cpp``, ``numba``, ``numpy``); default the fastest available.
    out : (N, size, size) float32 array, optional
        C-contiguous array to write the patches into (returned as ``data``); (N, M, M) with
        ``resample_weights``.
    resample_weights : (M, size) array, optional
        Weights of a separable linear resampling applied to every patch ``P`` (in float64, before
        the normalisation): the result is the M x M patch ``W @ P @ W.T``. Rows are output pixels;
        for a resampler that preserves constants every row sums to 1 (then the fill value and the
        normalisation commute with it).

    Returns
    -------
    Patches
        ``data`` float32 [N, size, size] (or [N, M, M]), ``edge`` bool [N] (patch has samples outside
        the image), ``norm`` the normalisation applied (``PatchNorm(0.0, 1.0)`` when ``normalize=False``).

    Examples
    --------
    >>> img = np.zeros((32, 32)); img[10, 12] = 1.0
    >>> p = extract_patches(img, np.array([[12.0, 10.0], [0.5, 0.5]]), size=5, normalize=False)
    >>> p.data.shape, p.edge.tolist(), float(p.data[0, 2, 2])
    ((2, 5, 5), [False, True], 1.0)
    """
    image = check_image(image, min_side=1, dtype=None)
    xy = check_xy(xy)
    size = _check_size(size)
    if fill is not None:
        fill = float(fill)
        if not math.isfinite(fill):
            raise ValueError(f"fill must be finite, got {fill!r}")
    if norm is not None:
        if not isinstance(norm, PatchNorm):
            raise ValueError(f"norm must be a PatchNorm, got {type(norm).__name__}")
        if not normalize:
            raise ValueError("norm was given but normalize=False; drop one of them")
    n = len(xy)
    resample_weights = _check_weights(resample_weights, size)
    out_side = size if resample_weights is None else int(resample_weights.shape[0])
    shape = (n, out_side, out_side)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif not (isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == shape
              and out.flags.c_contiguous and out.flags.writeable):
        raise ValueError(f"out must be a writeable C-contiguous float32 array of shape {shape}")

    norm, fill = _norm_and_fill(image, norm, fill, normalize)
    applied = norm if normalize else PatchNorm(0.0, 1.0)
    if n == 0:
        return Patches(data=out, edge=np.zeros(0, dtype=bool), norm=applied)
    g = _Gatherer(image, size=size, norm=applied, fill=fill, resample_weights=resample_weights, backend=backend)
    edge = g(xy, out)
    log.debug("extracted %d patches of %dx%d px -> %dx%d (%d at the edge)", n, size, size, out_side, out_side,
              int(edge.sum()))
    return Patches(data=out, edge=edge, norm=applied)


def _check_weights(weights: np.ndarray | None, size: int) -> np.ndarray | None:
    """``resample_weights`` as a C-contiguous float64 (M, size) array (M >= 1, finite), or None."""
    if weights is None:
        return None
    weights = np.ascontiguousarray(weights, dtype=np.float64)
    if weights.ndim != 2 or weights.shape[1] != size or weights.shape[0] < 1 or not np.isfinite(weights).all():
        raise ValueError(f"resample_weights must be a finite (M, size={size}) array, got shape {weights.shape}")
    return weights


def _norm_and_fill(image: np.ndarray, norm: PatchNorm | None, fill: float | None,
                   normalize: bool) -> tuple[PatchNorm | None, float]:
    """The normalisation (this image's robust one when ``normalize`` and none is given) and the raw
    fill value (default: the image median, taken from that normalisation when it was computed)."""
    median = None  # this image's median, only computed when needed
    if normalize and norm is None:
        norm = PatchNorm.from_image(image)
        median = norm.center
    if fill is None:
        fill = median if median is not None else float(np.median(image))
    return norm, float(fill)


class _Gatherer:
    """The compute part of :func:`extract_patches`, for validated arguments: the image is converted
    (and, where float32 cannot hold it exactly, normalised) once, then any number of site sets can be
    gathered with the same normalisation and fill."""

    def __init__(self, image: np.ndarray, *, size: int, norm: PatchNorm, fill: float,
                 resample_weights: np.ndarray | None, backend: str | None) -> None:
        self.size = int(size)
        self.weights = resample_weights
        self.kern = get_kernels(backend)
        identity = norm.center == 0.0 and norm.scale == 1.0
        if resample_weights is not None and np.can_cast(image.dtype, np.float32, "safe"):
            # float32 holds the image exactly: gather it raw, resample, then normalise, in one pass
            self.work, self.center, self.scale, self.fill = _as_float32(image, None), norm.center, norm.scale, fill
        else:  # normalise in float64 first, so float32 keeps the detail
            self.work = _as_float32(image, None if identity else norm)
            self.center, self.scale = 0.0, 1.0
            self.fill = (fill - norm.center) / norm.scale

    @property
    def out_side(self) -> int:
        return self.size if self.weights is None else int(self.weights.shape[0])

    def __call__(self, xy: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Gather the patches of ``xy`` [n, 2] (float64, C-contiguous) into ``out``; returns ``edge``."""
        if self.weights is not None:
            edge = self.kern.gather_resampled(self.work, xy, self.size, self.weights, float(self.fill),
                                              float(self.center), float(self.scale), out)
        else:
            edge = self.kern.gather_patches(self.work, xy, self.size, float(self.fill), out)
        return np.asarray(edge).astype(bool)


def patch_edge(xy: np.ndarray, size: int, shape: tuple[int, int]) -> np.ndarray:
    """Which sites' ``size x size`` patches have samples outside an image of ``shape``.

    The same flags as the ``edge`` of :func:`extract_patches`, from the geometry alone (no gather):
    the outermost samples of a patch lie ``(size - 1) / 2`` px from its centre.

    Examples
    --------
    >>> patch_edge(np.array([[12.0, 10.0], [0.5, 0.5], [3.0, 28.0]]), 5, (32, 32)).tolist()
    [False, True, False]
    """
    xy = np.asarray(xy, dtype=np.float64)
    h = (int(size) - 1) / 2.0
    H, W = shape
    x, y = xy[:, 0], xy[:, 1]
    return (x - h < 0) | (x + h > W - 1) | (y - h < 0) | (y + h > H - 1)


class LazyPatches:
    """The normalised patches of an image's sites, cut on demand: an array-like of shape [N, M, M].

    All patches of a 16k x 16k micrograph (~2e6 sites x 32 x 32 float32 = 8 GB) do not fit in
    bounded memory, so large images keep this instead: indexing (``lp[a:b]``, ``lp[index_array]``,
    ``lp[bool_mask]``, ``lp[i]``) gathers just those patches with the compiled kernel, with one
    normalisation and fill for the whole image, exactly as :func:`extract_patches` would cut them
    all at once. ``edge`` (bool [N]) is known without gathering (:func:`patch_edge`); ``seconds``
    adds up the time spent gathering.

    Examples
    --------
    >>> img = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    >>> xy = np.array([[20.0, 30.5], [40.2, 10.0], [1.0, 1.0]])
    >>> lp = LazyPatches(img, xy, size=9)
    >>> lp.shape, lp.edge.tolist()
    ((3, 9, 9), [False, False, True])
    >>> bool(np.array_equal(lp[1:], extract_patches(img, xy, size=9, norm=lp.norm).data[1:]))
    True
    """

    dtype = np.dtype(np.float32)
    ndim = 3

    def __init__(self, image: np.ndarray, xy: np.ndarray, *, size: int, norm: PatchNorm | None = None,
                 fill: float | None = None, resample_weights: np.ndarray | None = None,
                 backend: str | None = None) -> None:
        image = check_image(image, min_side=1, dtype=None)
        self.xy = np.ascontiguousarray(check_xy(xy))
        size = _check_size(size)
        resample_weights = _check_weights(resample_weights, size)
        norm, fill = _norm_and_fill(image, norm, fill, True)
        self.norm = norm
        self.patch_size = size
        self._gather = _Gatherer(image, size=size, norm=norm, fill=float(fill), resample_weights=resample_weights,
                                 backend=backend)
        self.edge = patch_edge(self.xy, size, image.shape)
        self.seconds = 0.0

    @property
    def shape(self) -> tuple[int, int, int]:
        m = self._gather.out_side
        return (len(self.xy), m, m)

    def __len__(self) -> int:
        return len(self.xy)

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            return self[np.array([int(index)])][0]
        t0 = time.perf_counter()
        xy = np.ascontiguousarray(self.xy[index])
        m = self._gather.out_side
        out = np.empty((len(xy), m, m), np.float32)
        if len(xy):
            self._gather(xy, out)
        self.seconds += time.perf_counter() - t0
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = self[:]
        return a if dtype is None else a.astype(dtype)


def site_intensity(image: np.ndarray, xy: np.ndarray, *, radius: float, backend: str | None = None) -> np.ndarray:
    """Mean image value over the disc of ``radius`` px around every sub-pixel site.

    The disc is sampled bilinearly at the integer offsets ``(u, v)`` with ``u^2 + v^2 <= radius^2``
    from the exact site position (through the compiled patch gather); samples outside the image are
    left out, so a site whose disc lies entirely outside the image gets NaN. A radius of about
    ``0.3 * spacing`` measures a column's brightness without its neighbours.

    Parameters
    ----------
    image : (H, W) array
        The micrograph (finite values).
    xy : (N, 2) array
        Site positions ``(x, y)`` in px.
    radius : float
        Disc radius in px (> 0; values below 1 use only the site's own bilinear sample).
    backend : str, optional
        Kernel backend; default the fastest available.

    Returns
    -------
    float64 [N] array

    Examples
    --------
    >>> img = np.zeros((20, 20)); img[5:10, 5:10] = 2.0
    >>> site_intensity(img, np.array([[7.0, 7.0], [15.0, 15.0]]), radius=2.0).tolist()
    [2.0, 0.0]
    """
    image = check_image(image, min_side=1, dtype=None)
    xy = check_xy(xy)
    radius = float(radius)
    if not (math.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be a finite number > 0, got {radius!r}")
    return _site_intensity(image, xy, radius, backend)


def _site_intensity(image: np.ndarray, xy: np.ndarray, radius: float, backend: str | None) -> np.ndarray:
    """:func:`site_intensity` for validated arguments (a finite 2-D image, float64 [N, 2] ``xy``,
    ``radius > 0``): callers that validated the image already skip the second full-image check."""
    n = len(xy)
    result = np.full(n, np.nan)
    if n == 0:
        return result
    half = int(math.floor(radius))
    size = 2 * half + 1
    off = np.arange(size) - half
    disc = (off[None, :] ** 2 + off[:, None] ** 2) <= radius * radius
    work = _as_float32(image, None)
    kern = get_kernels(backend)
    buf = np.empty((min(n, _INTENSITY_CHUNK), size, size), dtype=np.float32)
    for start in range(0, n, _INTENSITY_CHUNK):
        stop = min(n, start + _INTENSITY_CHUNK)
        out = buf[: stop - start]
        kern.gather_patches(work, xy[start:stop], size, math.nan, out)
        vals = out[:, disc].astype(np.float64)          # [n, n_disc]; NaN outside the image
        ok = ~np.isnan(vals)
        cnt = ok.sum(axis=1)
        tot = np.where(ok, vals, 0.0).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            result[start:stop] = np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)
    return result


def _aa_bilinear_weights(size: int, out: int) -> tuple[np.ndarray, np.ndarray]:
    """The weights [out, size] of torch's antialiased bilinear ``interpolate`` along one axis (CPU, float64;
    the separable filter of :func:`stemfast.model.functional.resample_patches`), computed as ATen does
    (triangle filter stretched by the scale when downsampling, each row divided by its sum), and
    each row's sum as the kernel adds it up (left to right)."""
    scale = size / out
    support = scale if scale >= 1.0 else 1.0  # bilinear: half of an interpolation size of 2
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    w = np.zeros((out, size))
    sums = np.zeros(out)
    for i in range(out):
        centre = scale * (i + 0.5)
        lo = max(int(centre - support + 0.5), 0)
        n = min(int(centre + support + 0.5), size) - lo
        row = [max(0.0, 1.0 - abs(((j + lo) - centre + 0.5) * invscale)) for j in range(n)]
        total = 0.0
        for v in row:
            total += v
        if total != 0.0:
            row = [v / total for v in row]
        acc = row[0] if row else 0.0
        for v in row[1:]:
            acc += v
        w[i, lo:lo + n] = row
        sums[i] = acc
    return w, sums


@lru_cache(maxsize=32)
def _resample_weights_cached(size: int, out: int) -> np.ndarray:
    # resample_patches is linear and separable (W P W^T), rows first: patch i, whose row i is all ones,
    # comes out as W[:, i] (x) (W 1); W 1 = 1 for an interpolator, and in general sqrt(sum_i of its
    # diagonal) -- read off exactly as from torch's output, without importing torch (tests check
    # bit-identity with torch)
    w, sums = _aa_bilinear_weights(size, out)
    res = w.T[:, :, None] * sums[None, None, :]  # what resample_patches gives for the probe [size, out, out]
    row_sum = np.sqrt(res[:, 0, 0].sum())
    out_w = np.ascontiguousarray(res[:, :, 0].T / row_sum)
    out_w.setflags(write=False)
    return out_w


def resample_weights(size: int, out: int) -> np.ndarray:
    """Weights ``W`` [out, size] of :func:`stemfast.frontend.resample_patches` from ``size`` to ``out`` px
    (read off the model's resampler, which is linear and separable: a patch ``P`` becomes ``W @ P @ W.T``).

    Examples
    --------
    >>> w = resample_weights(5, 5)  # same size: the identity
    >>> bool(np.allclose(w, np.eye(5)))
    True
    """
    return _resample_weights_cached(int(size), int(out))
