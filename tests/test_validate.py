"""One check, one message: every public function that takes an image or site positions validates
them with :mod:`stemfast._validate`."""
from __future__ import annotations

import numpy as np
import pytest

from stemfast.bandpass import bandpass
from stemfast.drift import block_average, phase_drift
from stemfast.lattice import estimate_spacing
from stemfast.patches import LazyPatches, extract_patches, site_intensity
from stemfast.peaks import find_peaks, refine
from stemfast.sites import find_sites

IMAGE_TAKERS = {
    "bandpass": lambda im: bandpass(im, noise_px=1.0, background_px=8.0),
    "find_peaks": lambda im: find_peaks(im, min_distance=2),
    "find_sites": lambda im: find_sites(im),
    "extract_patches": lambda im: extract_patches(im, [[1.0, 1.0]], size=3),
    "LazyPatches": lambda im: LazyPatches(im, [[1.0, 1.0]], size=3),
    "site_intensity": lambda im: site_intensity(im, [[1.0, 1.0]], radius=1.0),
    "block_average": lambda im: block_average(im),
    "phase_drift": lambda im: phase_drift(im, im, (64, 64)),
}


@pytest.mark.parametrize("name", sorted(IMAGE_TAKERS))
@pytest.mark.parametrize("bad, message", [
    (np.zeros(64), r"must be a 2-D array, got 1-D with shape \(64,\)"),
    (np.zeros((64, 64), complex), "must be real-valued numeric, got dtype complex128"),
    (np.full((64, 64), np.nan), r"contains 4096 non-finite values \(NaN or inf\); fill or crop them first"),
    (np.zeros((0, 64)), r"is empty \(shape \(0, 64\)\)"),
])
def test_every_image_check_gives_the_same_message(name, bad, message):
    with pytest.raises(ValueError, match=message):
        IMAGE_TAKERS[name](bad)


XY_TAKERS = {
    "refine": lambda xy: refine(np.zeros((32, 32)), xy, radius=2),
    "extract_patches": lambda xy: extract_patches(np.zeros((32, 32)), xy, size=3),
    "LazyPatches": lambda xy: LazyPatches(np.zeros((32, 32)), xy, size=3),
    "site_intensity": lambda xy: site_intensity(np.zeros((32, 32)), xy, radius=1.0),
    "estimate_spacing": lambda xy: estimate_spacing(np.concatenate([xy] * 8) if len(xy) else xy),
}


@pytest.mark.parametrize("name", sorted(XY_TAKERS))
@pytest.mark.parametrize("bad, message", [
    (np.zeros((3, 3)), r"xy must be an \[N, 2\] array of \(x, y\) positions, got shape"),
    (np.array([[1.0, np.inf]]), "xy contains NaN or infinite values"),
    ([["a", "b"]], r"xy must be a numeric \[N, 2\] array"),
])
def test_every_xy_check_gives_the_same_message(name, bad, message):
    with pytest.raises(ValueError, match=message):
        XY_TAKERS[name](bad)


def test_too_few_points_and_points_outside():
    with pytest.raises(ValueError, match="xy must hold at least 8 points, got 3"):
        estimate_spacing(np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"1 points of xy lie outside the image \(shape \(32, 32\)\)"):
        refine(np.zeros((32, 32)), [[-1.0, 3.0]], radius=2)


def test_check_image_finds_every_non_finite_value_and_accepts_a_sum_that_overflows():
    from stemfast._validate import check_image

    big = np.full((8, 8), 3e38, np.float32)          # finite values whose sum overflows float32
    assert check_image(big).shape == (8, 8)
    for bad in ([np.nan], [np.inf], [-np.inf], [np.inf, -np.inf]):   # (inf - inf: a NaN sum)
        img = np.zeros((8, 8))
        img.flat[[5, 9][: len(bad)]] = bad
        with pytest.raises(ValueError, match=f"contains {len(bad)} non-finite"):
            check_image(img)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), 0.0, float("inf"), "0.02", True])
def test_a_pixel_size_that_is_not_a_finite_positive_number_is_refused(bad):
    """find_sites / run_image took -1 (negative x_nm), NaN (NaN columns), inf (ZeroDivisionError) and
    "0.02" (UFuncTypeError): one message from the calibration check, before any work."""
    import stemfast

    img = np.zeros((64, 64), np.float32)
    for fn in (find_sites, stemfast.run_image):
        with pytest.raises(ValueError, match=r"pixel_size must be a finite number > 0, got "):
            fn(img, pixel_size=bad)


@pytest.mark.parametrize("kw, message", [
    (dict(shape=(0, 0)), r"shape must be \(height, width\): two integers >= 1, got \(0, 0\)"),
    (dict(shape=(-1, 64)), r"shape must be \(height, width\): two integers >= 1, got \(-1, 64\)"),
    (dict(shape=(256, 256, 3)), r"shape must be \(height, width\): two integers >= 1, got \(256, 256, 3\)"),
    (dict(shape=(256, 256), angle_deg=float("nan")), "angle_deg must be a finite number, got nan"),
    (dict(shape=(256, 256), spacing=-10.0, angle_deg=0.0), "spacing must be a finite number > 0, got -10.0"),
])
def test_fill_lattice_checks_shape_spacing_and_angle(kw, message):
    """fill_lattice took shape (0, 0), (-1, 64) and angle NaN (nothing filled, nothing said) and
    (256, 256, 3); now each is a ValueError naming the argument."""
    from stemfast.lattice import fill_lattice, triangular_basis

    m, n = np.meshgrid(np.arange(-12, 13), np.arange(-12, 13))
    xy = np.stack([m.ravel(), n.ravel()], 1) @ triangular_basis(10.0, 5.0) + 128
    xy = xy[(xy >= 0).all(1) & (xy <= 255).all(1) & ((m.ravel() - n.ravel()) % 3 != 0)]
    assert (~fill_lattice(xy, shape=(256, 256)).is_peak).sum() > 0  # the same points fill in a right shape
    with pytest.raises(ValueError, match=message):
        fill_lattice(xy, **kw)


def test_fill_lattice_names_its_own_argument_when_it_has_too_few_points():
    from stemfast.lattice import fill_lattice

    with pytest.raises(ValueError, match="peak_xy must hold at least 8 points, got 2"):
        fill_lattice([[1.0, 2.0], [3.0, 4.0]], shape=(64, 64))


def test_a_settings_object_of_the_wrong_type_is_a_type_error_naming_the_type():
    """run_image(config=dict) failed with AttributeError 'dict' object has no attribute 'sites',
    find_sites(settings={}) ran the defaults without a word, run_image(model="x.pt") was taken."""
    import stemfast

    img = np.zeros((64, 64), np.float32)
    with pytest.raises(TypeError, match=r"config must be a stemfast.config.PipelineConfig .*got dict"):
        stemfast.run_image(img, config={"model": {"epochs": 2}})
    with pytest.raises(TypeError, match=r"settings must be a stemfast.sites.SiteSettings .*got dict"):
        find_sites(img, settings={})
    with pytest.raises(TypeError, match=r"model must be a loaded model .*got str 'x.pt'"):
        stemfast.run_image(img, model="x.pt")
