"""Block statistics of large images: the means of ``f`` x ``f`` pixel blocks (:func:`block_means`)."""
from __future__ import annotations

import numpy as np

__all__ = ["block_means"]


def block_means(img: np.ndarray, f: int, *, square: bool = False, rows: int = 512) -> np.ndarray:
    """Means of the ``f`` x ``f`` blocks of ``img`` (of ``img ** 2`` with ``square``), float32 [H // f, W // f].

    A partial last row or column of blocks is dropped (``f`` is at most the image's short side). The
    sums are taken in float64, over each block's rows and then its columns, in strips of about
    ``rows`` image rows (contiguous runs, no image-sized temporary: ~2x faster than a mean over
    the axes of a 4-D view).

    Examples
    --------
    >>> block_means(np.arange(16, dtype=np.float32).reshape(4, 4), 2).tolist()
    [[2.5, 4.5], [10.5, 12.5]]
    """
    img = np.asarray(img)
    if img.ndim != 2:
        raise ValueError(f"img must be 2-D, got shape {img.shape}")
    f = max(1, min(int(f), *img.shape))
    h, w = img.shape[0] // f, img.shape[1] // f
    out = np.empty((h, w), dtype=np.float32)
    step = max(1, rows // f)  # block rows per strip
    for b0 in range(0, h, step):
        b1 = min(h, b0 + step)
        strip = np.asarray(img[b0 * f:b1 * f, :w * f], dtype=np.float32)
        if square:
            strip = np.square(strip, dtype=np.float32)
        col = strip.reshape(b1 - b0, f, w * f).sum(axis=1, dtype=np.float64)  # [block rows, W]: contiguous rows
        out[b0:b1] = _block_sums(col, f) / (f * f)
    return out


def _block_sums(col: np.ndarray, f: int) -> np.ndarray:
    """float64 [R, W // f]: the sums of each ``f`` consecutive columns of ``col`` [R, W] (``W`` a
    multiple of ``f``), those of ``col.reshape(R, -1, f).sum(axis=2)`` bit for bit. Under eight columns
    a block, NumPy's reduction adds them one by one to 0.0, one short call per block: here the same
    additions, each over a whole strided column slice (3.5x faster at ``f = 2``, 1.6x at 5). Wider
    blocks (pairwise summation, longer calls): that reduction."""
    if f >= 8:
        return col.reshape(len(col), -1, f).sum(axis=2)
    res = 0.0 + col[:, 0::f]
    for i in range(1, f):
        res += col[:, i::f]
    return res
