"""Clipped intensities (stemfast.clipping): a saturated detector, a cut black level, an 8-bit export
stretched with saturated pixels -- said in the site table's meta, the summary and a warning, never
claimed where the image is only quantised or counts photons."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from stemfast.batch.outputs import lattice_warnings
from stemfast.clipping import ClippingWarning, clipped_intensities
from stemfast.sites import find_sites
from stemfast.synthetic import make_mos2


@pytest.fixture(scope="module")
def mos2():
    return make_mos2(shape=(256, 256), seed=5).image.astype(np.float32)


def test_an_unclipped_image_is_not_called_clipped(mos2):
    assert clipped_intensities(mos2) == {}
    # integer data, quantised, with a thin tail at both ends (fewer pixels at the extreme levels than next in)
    q = np.round((mos2 - mos2.min()) / np.ptp(mos2) * 255).astype(np.uint8)
    assert clipped_intensities(q) == {}


def test_a_saturated_detector_and_a_cut_black_level_are_found(mos2):
    hi, lo = np.quantile(mos2, [0.99, 0.02])
    c = clipped_intensities(np.clip(mos2, lo, hi))
    assert set(c) == {"high", "low", "warning"}
    assert c["high"]["value"] == pytest.approx(hi) and c["high"]["share"] == pytest.approx(0.01, abs=0.002)
    assert c["low"]["share"] == pytest.approx(0.02, abs=0.002)
    assert "maximum" in c["warning"] and "minimum" in c["warning"]
    # an 8-bit export stretched so that 0.3 % of the pixels saturate at 255
    lo8, hi8 = np.quantile(mos2, [0.0, 0.997])
    e = np.clip((mos2 - lo8) / (hi8 - lo8) * 255, 0, 255).round().astype(np.uint8)
    c8 = clipped_intensities(e)
    assert set(c8) == {"high", "warning"} and c8["high"]["value"] == 255


def test_photon_counts_at_zero_are_no_cut_black_level():
    """A low-dose counting image is mostly 0 counts (0.1 per pixel): far more pixels at 0 than at 1,
    as a cut would give, but 0 is where counts start."""
    counts = np.random.default_rng(1).poisson(0.1, (128, 128)).astype(np.float32)
    assert clipped_intensities(counts) == {}
    # the same pixels shifted by a detector offset and cut there are a cut
    assert "low" in clipped_intensities(np.maximum(counts + 0.37, 0.37))


def test_find_sites_says_so_and_the_summary_carries_it(mos2):
    hi = np.quantile(mos2, 0.98)
    with pytest.warns(ClippingWarning, match="maximum"):
        t = find_sites(np.minimum(mos2, hi))
    clip = t.meta["lattice"]["clipping"]
    assert clip["high"]["share"] == pytest.approx(0.02, abs=0.003)
    assert clip["warning"] in lattice_warnings(t.meta["lattice"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClippingWarning)
        assert "clipping" not in find_sites(mos2).meta["lattice"]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="2-D"):
        clipped_intensities(np.zeros(5))


def test_a_low_dose_counting_image_with_a_few_repaired_pixels_is_not_called_clipped():
    """A counting image at ~1 count per pixel holds mostly zeros, which are counts of nothing (its
    zeros were already exempt when every pixel was a whole number). The spike repair before the check
    put a few half-integers in, and 66 % of the pixels 'sat at the minimum: the black level or the
    export cut the darkest values'. A few repaired pixels no longer make it a non-counting image; a
    float image cut at a black level is still called clipped."""
    from stemfast.clipping import _integer_valued

    rng = np.random.default_rng(0)
    counts = rng.poisson(0.8, (256, 256)).astype(np.float32)
    counts[rng.integers(0, 256, 50), rng.integers(0, 256, 50)] += 0.5  # a few repaired (median) pixels
    assert _integer_valued(counts)
    assert "low" not in clipped_intensities(counts)
    cut = np.maximum(rng.normal(0.0, 1.0, (256, 256)), 0.0).astype(np.float32)  # a black level at 0
    assert clipped_intensities(cut)["low"]["share"] > 0.4
    s = make_mos2(shape=(256, 256), seed=1, dose=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        find_sites(s.image)
    assert not any(issubclass(w.category, ClippingWarning) for w in caught)
