"""One unit table (stemfast.io.unit_to_nm) for every calibrated output."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from stemfast.io import unit_to_nm
from stemfast.sites import CalibrationWarning, find_sites
from stemfast.synthetic import make_lattice


@pytest.fixture(scope="module")
def image():
    img, _ = make_lattice((96, 96), spacing=10.0, noise=0.05, seed=1)
    return img


def _sites(img, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return find_sites(img, **kw)


@pytest.mark.parametrize("unit, pixel_size", [("angstroms", 1.2), ("Å", 1.2), ("A", 1.2), ("pm", 120.0),
                                              ("um", 1.2e-4)])
def test_site_coordinates_in_nm_do_not_depend_on_the_unit_the_pixel_size_is_given_in(image, unit, pixel_size):
    """``unit="angstroms"`` gave x_nm 10x too large (sites.py had its own table, missing the plural)."""
    ref = _sites(image, pixel_size=0.12, unit="nm")
    t = _sites(image, pixel_size=pixel_size, unit=unit)
    assert len(t) == len(ref) > 50
    np.testing.assert_allclose(t["x_nm"], ref["x_nm"], rtol=1e-12)
    np.testing.assert_allclose(t["y_nm"], ref["y_nm"], rtol=1e-12)
    assert t.meta["spacing_nm"] == pytest.approx(ref.meta["spacing_nm"], rel=1e-12)
    assert ref.meta["spacing_nm"] == pytest.approx(ref.meta["spacing_px"] * 0.12, rel=1e-12)


def test_a_pixel_size_in_a_unit_that_is_not_a_length_gives_no_nm_columns_and_says_so(image):
    with pytest.warns(CalibrationWarning, match="not a length unit"):
        t = find_sites(image, pixel_size=0.5, unit="1/nm")
    assert "x_nm" not in t.names and "spacing_nm" not in t.meta


def test_unit_table():
    assert unit_to_nm("angstroms") == unit_to_nm("Å") == 0.1
    assert unit_to_nm("nm") == 1.0 and unit_to_nm("µm") == 1000.0
    assert unit_to_nm("1/nm") is None and unit_to_nm(None) is None
