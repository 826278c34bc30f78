"""Input validation shared by the public wrappers (scikit-image style: validate, then compute).

Every public function that takes an image or site positions checks them here, so the rules and
the messages are the same everywhere.
"""
from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np

__all__ = ["check_image", "check_xy", "positive", "finite", "check_shape", "check_type"]


def check_image(image, name: str = "image", *, min_side: int = 3, dtype=np.float32) -> np.ndarray:
    """2-D, at least ``min_side`` px a side, real (bool, integer or float), finite.

    Returns the image as a C-contiguous ``dtype`` array (no copy when it already is one), or with
    ``dtype=None`` as the array it is (its own dtype and layout, e.g. to normalise it in float64
    before any rounding).

    Examples
    --------
    >>> check_image(np.zeros((4, 5), np.uint8)).dtype
    dtype('float32')
    >>> check_image(np.zeros(4))
    Traceback (most recent call last):
    ...
    ValueError: image must be a 2-D array, got 1-D with shape (4,)
    """
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array, got {arr.ndim}-D with shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    if min(arr.shape) < min_side:
        raise ValueError(f"{name} must be at least {min_side} x {min_side} pixels, got shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be real-valued numeric, got dtype {arr.dtype}")
    img = arr if dtype is None else np.ascontiguousarray(arr, dtype=dtype)
    if img.dtype.kind == "f" and not _all_finite(img):
        bad = int(np.count_nonzero(~np.isfinite(img)))
        raise ValueError(f"{name} contains {bad} non-finite values (NaN or inf); fill or crop them first")
    return img


def _all_finite(img: np.ndarray) -> bool:
    """Every value finite. A NaN or inf makes the sum NaN or inf, so a finite sum proves it without
    an image-sized mask (a sum of finite values that overflows falls through to the exact test)."""
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.add.reduce(img, axis=None)):
            return True
    return bool(np.isfinite(img).all())


def check_xy(xy, name: str = "xy", *, shape: tuple[int, int] | None = None, min_points: int = 0) -> np.ndarray:
    """Site positions ``(x, y)`` as a C-contiguous float64 ``[N, 2]`` array of finite values.

    An empty input of any shape is ``[0, 2]``. With ``shape`` (the image's ``(H, W)``) every point's
    nearest pixel must lie inside the image; ``min_points`` is the fewest points accepted.

    Examples
    --------
    >>> check_xy([[1.0, 2.0]]).shape
    (1, 2)
    >>> check_xy([]).shape
    (0, 2)
    """
    try:
        pts = np.asarray(xy, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric [N, 2] array: {exc}") from None
    if pts.size == 0:
        pts = np.zeros((0, 2), dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"{name} must be an [N, 2] array of (x, y) positions, got shape {pts.shape}")
    if len(pts) < min_points:
        raise ValueError(f"{name} must hold at least {min_points} points, got {len(pts)}")
    pts = np.ascontiguousarray(pts)
    if not np.isfinite(pts).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if shape is not None:
        h, w = shape
        c = np.floor(pts + 0.5)
        outside = (c[:, 0] < 0) | (c[:, 0] >= w) | (c[:, 1] < 0) | (c[:, 1] >= h)
        if outside.any():
            raise ValueError(f"{int(outside.sum())} points of {name} lie outside the image (shape {tuple(shape)})")
    return pts


def positive(name: str, v) -> float:
    """``v`` as a float, or a ValueError naming ``name`` unless it is a finite number > 0."""
    if not isinstance(v, Real) or isinstance(v, bool) or not math.isfinite(float(v)) or float(v) <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    return float(v)


def finite(name: str, v) -> float:
    """``v`` as a float, or a ValueError naming ``name`` unless it is a finite real number."""
    if not isinstance(v, Real) or isinstance(v, bool) or not math.isfinite(float(v)):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def check_shape(shape, name: str = "shape") -> tuple[int, int]:
    """An image's ``(height, width)``: two integers >= 1, else a ValueError naming ``name``.

    Examples
    --------
    >>> check_shape(np.zeros((4, 5)).shape)
    (4, 5)
    >>> check_shape((0, 0))
    Traceback (most recent call last):
    ...
    ValueError: shape must be (height, width): two integers >= 1, got (0, 0)
    """
    try:
        ok = len(shape) == 2 and all(isinstance(v, Integral) and not isinstance(v, bool) and v >= 1 for v in shape)
    except TypeError:  # no length: not a pair
        ok = False
    if not ok:
        raise ValueError(f"{name} must be (height, width): two integers >= 1, got {shape!r}")
    return int(shape[0]), int(shape[1])


def check_type(name: str, value, kind: type, how: str) -> None:
    """A TypeError naming ``name``, the type expected (``kind``, made as ``how`` says) and the type
    given, unless ``value`` is a ``kind``.

    Examples
    --------
    >>> check_type("config", {}, dict, "a dict")
    >>> check_type("config", [], dict, "a dict")
    Traceback (most recent call last):
    ...
    TypeError: config must be a dict (a dict), got list
    """
    if not isinstance(value, kind):
        raise TypeError(f"{name} must be a {kind.__module__}.{kind.__qualname__} ({how}), got {type(value).__name__}"
                        .replace("builtins.", ""))
