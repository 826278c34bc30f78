"""benchmarks/fft_lattice_geometry.py: the site lattice a scan-distorted image's own Bragg spots
imply (what a perfect site table holds), independent of stemfast's lattice code."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from stemfast.synthetic import make_mos2


@pytest.fixture(scope="module")
def geometry(benchmark_script):
    return benchmark_script("fft_lattice_geometry")


def test_a_regular_lattice_has_six_equal_neighbours(geometry):
    s = make_mos2(shape=(384, 384), seed=0, rotation_deg=11.0)
    geo = geometry.site_lattice_geometry(geometry.first_ring_spots(s.image, s.meta["nn_px"]))
    assert np.allclose(geo["six"], s.meta["nn_px"], rtol=0.015)
    assert abs(geo["area_equivalent"] / s.meta["nn_px"] - 1) < 0.015


def test_a_compressed_lattice_has_the_spacings_the_compression_gives(geometry):
    """y x 0.8: x' = x, y' = 0.8 y, so the spots move to (gx, gy / 0.8) and the six distances and
    the area per site follow from the undistorted image's spots."""
    s = make_mos2(shape=(512, 512), seed=1, rotation_deg=11.0)
    sc = 0.8
    M = np.array([[1 / sc, 0.0], [0.0, 1.0]])
    c = np.array(s.image.shape) / 2
    img = ndimage.affine_transform(s.image, M, offset=c - M @ c, order=1, mode="reflect")
    spots = geometry.first_ring_spots(s.image, s.meta["nn_px"])
    want = geometry.site_lattice_geometry(spots * np.array([1.0, 1.0 / sc]))
    got = geometry.site_lattice_geometry(geometry.first_ring_spots(img, s.meta["nn_px"] * np.sqrt(sc)))
    assert np.allclose(got["six"], want["six"], rtol=0.015)
    assert abs(got["area_equivalent"] / (s.meta["nn_px"] * np.sqrt(sc)) - 1) < 0.015
    assert got["median"] / got["area_equivalent"] > 1.02  # the median of six reads long here
