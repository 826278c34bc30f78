"""``stemfast.medians.window_medians`` against ``np.median`` window by window, bit for bit."""
from __future__ import annotations

import numpy as np
import pytest

from stemfast.medians import window_medians


def _windows(rng, n: int, k: int):
    starts = rng.integers(0, n, k)
    stops = np.minimum(n, starts + rng.integers(1, 40, k))
    return starts, stops


@pytest.mark.parametrize("seed", range(6))
def test_window_medians_equal_np_median_bit_for_bit(seed):
    """Overlapping windows over values with many ties, both zeros, NaN and infinities (the cases where
    a sort and np.median's partition could pick different bits): every median has np.median's bits."""
    rng = np.random.default_rng(seed)
    n = 400
    v = rng.integers(-3, 4, n).astype(np.float64) * rng.choice([0.5, 1.0], n)  # ties, +0 and -0
    v[rng.random(n) < 0.1] *= -0.0
    v[rng.random(n) < 0.02] = np.nan
    v[rng.random(n) < 0.02] = np.inf
    v[rng.random(n) < 0.02] = -np.inf
    if seed % 2:
        v = rng.normal(size=n)  # no ties at all
    starts, stops = _windows(rng, n, 500)
    got = window_medians(v, starts, stops)
    want = np.array([np.median(v[a:b]) for a, b in zip(starts, stops)])
    assert got.dtype == want.dtype and got.shape == want.shape
    same = (got.view(np.int64) == want.view(np.int64)) | (np.isnan(got) & np.isnan(want))
    assert same.all(), np.flatnonzero(~same)[:5]


def test_window_medians_of_float32_values_keep_their_type():
    v = np.array([3.0, 1.0, 2.0, 8.0, 5.0], np.float32)
    got = window_medians(v, np.array([0, 1, 0]), np.array([3, 5, 4]))
    want = [np.median(v[a:b]) for a, b in ((0, 3), (1, 5), (0, 4))]
    assert got.dtype == np.float32 and got.tolist() == [float(w) for w in want]
