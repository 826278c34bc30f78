"""Sideways wobble of the scan lines (mains interference): said, measured against the lattice, on
crops of real scans (tests/data) with a wobble resampled in, and never on the crops as recorded."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from stemfast.sites import find_sites
from stemfast.wobble import ScanWobbleWarning, line_wobble

DATA = Path(__file__).parent / "data"


def _wobbled(img: np.ndarray, amplitude: float, period: float) -> np.ndarray:
    """``img`` with line ``y`` recorded shifted by ``amplitude * sin(2 pi y / period)`` px along x."""
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]].astype(np.float64)
    dx = amplitude * np.sin(2 * np.pi * yy / period + 0.3)
    return ndimage.map_coordinates(img, [yy, xx - dx], order=3, mode="reflect")


def _find(img: np.ndarray):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = find_sites(img)
    return t.meta["lattice"]["scan_wobble"], [w for w in caught if issubclass(w.category, ScanWobbleWarning)]


@pytest.mark.parametrize("name, amplitude", [("wse2_ti2_haadf_crop.npy", 1.0), ("wse2_ti2_maadf_crop.npy", 1.0),
                                             ("mos2_exp-000-2_crop.npy", 2.0)])
def test_a_wobbling_scan_is_said_and_a_sound_one_is_not(name, amplitude):
    img = np.load(DATA / name).astype(np.float64)
    sound, said = _find(img)
    assert "warning" not in sound and not said, sound
    wob, said = _find(_wobbled(img, amplitude, 37.0))
    assert "warning" in wob and len(said) == 1, wob
    assert abs(wob["period_lines"] - 37.0) <= 3.0
    # the phase map follows part of the wave: the amplitude is a lower bound, but not a vanishing one
    assert 0.25 * amplitude <= wob["amplitude_px"] <= 1.1 * amplitude


def test_line_wobble_needs_lines_that_hold_columns():
    y = np.full(50, 10.0)
    assert line_wobble(np.zeros(50), y, 512, 5.0) == {}
    assert line_wobble(np.zeros(5), np.arange(5.0), 12, 5.0) == {}
