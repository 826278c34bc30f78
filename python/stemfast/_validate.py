"""Input validation shared by the public wrappers (scikit-image style: validate, then compute)."""
from __future__ import annotations

import math
from numbers import Real

import numpy as np

__all__ = ["check_image", "positive"]


def check_image(image, name: str = "image", *, min_side: int = 3) -> np.ndarray:
    """2-D, non-empty, real, finite -> float32 C-contiguous (no copy when it already is)."""
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array, got {arr.ndim}-D with shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    if min(arr.shape) < min_side:
        raise ValueError(f"{name} must be at least {min_side} x {min_side} pixels, got shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be real-valued numeric, got dtype {arr.dtype}")
    img = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(img).all():
        bad = int(np.count_nonzero(~np.isfinite(img)))
        raise ValueError(f"{name} contains {bad} non-finite values (NaN or inf); fill or crop them first")
    return img


def positive(name: str, v) -> float:
    """``v`` as a float, or a ValueError naming ``name`` unless it is a finite number > 0."""
    if not isinstance(v, Real) or isinstance(v, bool) or not math.isfinite(float(v)) or float(v) <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    return float(v)
