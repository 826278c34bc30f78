"""Medians of many windows of one array at once, bit for bit as ``np.median`` takes each
(:func:`window_medians`): the scan rows' levels of the analysis and the border bands of the site search."""
from __future__ import annotations

import numpy as np

__all__ = ["window_medians"]


def window_medians(values: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """``np.median(values[a:b])`` for each window ``(a, b)`` of ``starts``, ``stops`` (each non-empty;
    windows may overlap), bit for bit, all at once: the windows' values sorted within each window (one
    sort of integer keys), the middle one taken, or the mean of the middle two (``(lo + hi) / 2``, as
    np.median takes it). Equal values have equal bits except the zeros (+0, -0) and NaNs, whose order
    np.median's partition leaves to chance: a window whose median is 0 or that holds a NaN gets
    np.median itself.

    Examples
    --------
    >>> v = np.array([3.0, 1.0, 2.0, 8.0, 5.0])
    >>> window_medians(v, np.array([0, 1, 0]), np.array([3, 5, 4])).tolist()
    [2.0, 3.5, 2.5]
    """
    cnt = np.asarray(stops, np.int64) - np.asarray(starts, np.int64)
    first = np.cumsum(cnt) - cnt  # where each window begins in the concatenation
    win = np.repeat(np.arange(len(cnt)), cnt)
    # sorted within each window: by the window, then by the value's rank among all values (NaN last)
    order = np.argsort(values)
    rank = np.empty(len(values), np.int64)
    rank[order] = np.arange(len(values))
    key = win * len(values) + rank[np.arange(len(win)) - first[win] + np.asarray(starts, np.int64)[win]]
    key.sort()
    s = values[order[key - win * len(values)]]
    lo, hi = s[first + (cnt - 1) // 2], s[first + cnt // 2]
    med = np.where(cnt % 2 == 1, lo, (lo + hi) / 2)
    for k in np.flatnonzero((med == 0) | np.isnan(s[first + cnt - 1])):
        med[k] = np.median(values[starts[k]:stops[k]])
    return med
