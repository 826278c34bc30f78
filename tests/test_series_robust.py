"""A series with a bad frame (noise, blank, an extreme value, a failed drift measure): the drift is never
measured to or from a frame without a lattice, a failure of it leaves the drift unknown (said) instead of
failing the stack.
"""
from __future__ import annotations

import numpy as np


def test_the_drift_is_measured_in_float64():
    """Values near float32's largest: the block average and the correlation do not overflow."""
    from stemfast.drift import block_average, phase_drift

    a = np.random.default_rng(0).normal(size=(600, 600)).astype(np.float32)
    a[100:104, 100:104] = 3e38
    b = np.roll(a, (4, 6), axis=(0, 1))
    dx, dy = phase_drift(block_average(a), block_average(b), a.shape)
    assert (round(dx, 1), round(dy, 1)) == (6.0, 4.0)
