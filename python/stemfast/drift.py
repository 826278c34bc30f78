"""Drift between the frames of a time series, by phase correlation.

Frames are block-averaged to at most :data:`DRIFT_MAX_PX` px (:func:`block_average`) and compared
by Hann-windowed phase cross-correlation with a sub-pixel search in steps of
:data:`DRIFT_RESOLUTION_PX` full-resolution px (:func:`phase_drift`). The batch runner measures the
drift of every frame of a stack to the frame before it (``summary.json``, ``drift_px``).

Examples
--------
>>> import numpy as np
>>> from stemfast.drift import block_average, phase_drift
>>> rng = np.random.default_rng(0)
>>> a = rng.normal(size=(128, 128)).astype(np.float32)
>>> b = np.roll(a, (2, 3), axis=(0, 1))  # the content moved 3 px right, 2 px down
>>> dx, dy = phase_drift(block_average(a), block_average(b), a.shape)
>>> round(dx, 1), round(dy, 1)
(3.0, 2.0)
"""
from __future__ import annotations

import math
import warnings

import numpy as np

from ._validate import check_image

__all__ = ["DRIFT_MAX_PX", "DRIFT_RESOLUTION_PX", "block_average", "phase_drift"]

#: Frames are block-averaged to at most this size (px) for the drift estimate.
DRIFT_MAX_PX = 512
#: Step of the sub-pixel drift search, in full-resolution px.
DRIFT_RESOLUTION_PX = 0.02


def block_average(img: np.ndarray, *, with_gap: bool = False):
    """``img`` (float32) block-averaged by the smallest integer factor that brings it to at most
    :data:`DRIFT_MAX_PX` px on its longer side (rows / columns beyond a whole block are dropped).

    With ``with_gap``, also the blocks without data: ``(frame, gap)``, ``gap`` bool of the frame's
    shape, True where the block holds no data (:mod:`stemfast.nodata`: an aborted frame's unscanned
    rest, an aligned frame's padding); the frame there is the mean of the rest (for
    :func:`phase_drift`'s ``gaps``).

    Examples
    --------
    >>> block_average(np.ones((1100, 600))).shape
    (366, 200)
    """
    checked = check_image(img, "img", min_side=2, dtype=None)
    return _block_average_gap(checked) if with_gap else _block_average(checked)


def _block_average(img: np.ndarray) -> np.ndarray:
    a = np.asarray(img, dtype=np.float32)
    f = max(1, int(math.ceil(max(a.shape) / DRIFT_MAX_PX)))
    if f > 1:  # summed in float64: blocks of values near float32's largest would overflow to inf
        H, W = (a.shape[0] // f) * f, (a.shape[1] // f) * f
        a = a[:H, :W].reshape(H // f, f, W // f, f).mean(axis=(1, 3), dtype=np.float64).astype(np.float32)
    return a


def _block_average_gap(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from .nodata import no_data

    nd = no_data(np.asarray(img))
    if not nd.any():
        a = _block_average(img)
        return a, np.zeros(a.shape, bool)
    a = np.asarray(img, dtype=np.float32)
    fill = np.float32(a[~nd.mask].mean(dtype=np.float64)) if not nd.mask.all() else np.float32(0.0)
    a = _block_average(np.where(nd.mask, fill, a))
    gap = _block_average(nd.mask.astype(np.float32)) > 0.5  # blocks mostly without data
    return a, gap


def phase_drift(prev: np.ndarray, cur: np.ndarray, full_shape: tuple[int, int], *,
                gaps: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[float, float]:
    """Displacement ``(dx, dy)`` in full-resolution px of the content of ``cur`` relative to ``prev``.

    ``prev`` and ``cur`` are the block-averaged frames (:func:`block_average`), ``full_shape`` the
    shape of the frames before averaging. Phase cross-correlation (scikit-image), Hann windowed, in
    float64 (a frame with values near float32's largest, e.g. a few pixels of 3e38, overflowed its mean
    in float32 and the correlation raised on the NaN). On a perfect crystal the shift is only defined
    modulo the lattice; non-periodic features (defects, holes, contamination) resolve it. ``(nan, nan)``
    when either frame is constant (a blank frame: nothing to register) or when they share no data.

    ``gaps``: the two frames' blocks without data (:func:`block_average` ``with_gap``). Where either
    frame has none, both are set to their means, so the two are compared over the same region. (A
    frame scanned half against a whole one: the windowed overlap of the half's lattice with the
    whole one is largest a few lattice translations off, and the correlation followed it -- 45 px
    for 0.2, and every track of the series broke there.)

    Examples
    --------
    >>> a = np.random.default_rng(1).normal(size=(64, 64))
    >>> dx, dy = phase_drift(a, np.roll(a, 1, axis=1), a.shape)
    >>> round(dx, 2), abs(round(dy, 2))
    (1.0, 0.0)
    """
    prev = check_image(prev, "prev", min_side=2, dtype=None)
    cur = check_image(cur, "cur", min_side=2, dtype=None)
    if prev.shape != cur.shape:
        raise ValueError(f"prev and cur must have the same shape, got {prev.shape} and {cur.shape}")
    if len(full_shape) != 2 or min(full_shape) < 1:
        raise ValueError(f"full_shape must be (rows, columns), got {full_shape!r}")
    gap = None
    if gaps is not None:
        gap = np.zeros(prev.shape, bool)
        for g in gaps:
            if g is not None:
                if np.shape(g) != prev.shape:
                    raise ValueError(f"gaps must have the frames' shape {prev.shape}, got {np.shape(g)}")
                gap |= np.asarray(g, bool)
    return _phase_drift(prev, cur, (int(full_shape[0]), int(full_shape[1])), gap)


def _phase_drift(prev: np.ndarray, cur: np.ndarray, full_shape: tuple[int, int],
                 gap: np.ndarray | None = None) -> tuple[float, float]:
    from skimage.registration import phase_cross_correlation

    prev = np.asarray(prev, np.float64)
    cur = np.asarray(cur, np.float64)
    if gap is not None and gap.any():  # where either frame holds no data: both flat there
        if gap.all():
            return float("nan"), float("nan")
        prev = np.where(gap, prev[~gap].mean(), prev)
        cur = np.where(gap, cur[~gap].mean(), cur)
    if not (np.ptp(prev) > 0 and np.ptp(cur) > 0):  # a blank (constant) frame has no content to register
        return float("nan"), float("nan")

    win = np.outer(np.hanning(prev.shape[0]), np.hanning(prev.shape[1]))
    a = (prev - prev.mean()) * win
    b = (cur - cur.mean()) * win
    fy = full_shape[0] / prev.shape[0]
    fx = full_shape[1] / prev.shape[1]
    # sub-pixel steps of DRIFT_RESOLUTION_PX at full resolution (the frames were block-averaged)
    up = int(math.ceil(max(fx, fy) / DRIFT_RESOLUTION_PX))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shift, _err, _ph = phase_cross_correlation(a, b, upsample_factor=up, normalization=None)
    # shift registers cur onto prev, i.e. it undoes the motion: the content moved by -shift
    return float(-shift[1] * fx), float(-shift[0] * fy)
