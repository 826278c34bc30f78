"""stemfast.noise: how far an image's noise is correlated, and the column low-pass widened by it."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import ndimage

from real_data import DATA, labelled_ap, read_labels
from stemfast.noise import MIN_CORRELATION_PX, NoiseCorrelationWarning, noise_correlation
from stemfast.synthetic import make_mos2


def _zoom(img: np.ndarray, z: float) -> np.ndarray:
    return ndimage.zoom(np.asarray(img, np.float64), z, order=3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_white_noise_and_a_scan_with_shot_noise_are_white(seed):
    rng = np.random.default_rng(seed)
    out = noise_correlation(rng.normal(size=(300, 400)))
    assert out == {"band_edge": 0.5, "correlation_px": 1.0}
    lattice = make_mos2(shape=(384, 384), seed=seed).image  # columns at ~13 px, Poisson noise per pixel
    assert noise_correlation(lattice)["correlation_px"] == 1.0
    # binned (2 x 2 sums): still one noise value per pixel
    assert noise_correlation(lattice.reshape(192, 2, 192, 2).sum((1, 3)))["correlation_px"] == 1.0


@pytest.mark.parametrize("z", [1.5, 2.0, 3.0])
def test_an_upsampled_image_is_correlated_over_its_zoom(z):
    img = make_mos2(shape=(256, 256), seed=3).image
    out = noise_correlation(_zoom(img, z))
    assert out["correlation_px"] == pytest.approx(z, rel=0.12), out
    assert "upsampled, interpolated or filtered" in out["warning"]


def test_pixel_repetition_and_a_gaussian_filter_are_correlated_a_light_filter_is_not():
    img = make_mos2(shape=(256, 256), seed=4).image.astype(np.float64)
    assert noise_correlation(np.kron(img, np.ones((2, 2))))["correlation_px"] > MIN_CORRELATION_PX
    assert noise_correlation(ndimage.gaussian_filter(img, 1.0))["correlation_px"] > 2.0
    assert noise_correlation(ndimage.gaussian_filter(img, 0.4))["correlation_px"] == 1.0


def test_the_measurement_holds_only_its_crop_not_the_image_in_float64():
    # the whole image was converted to float64 first: 2 image sizes of a float32 image (2 GiB at 16k)
    import tracemalloc
    rng = np.random.default_rng(3)
    img = rng.normal(size=(2048, 2048)).astype(np.float32)
    crop = img[768:1280, 768:1280].copy()  # the central crop it reads (SPECTRUM_CROP = 512)

    def peak(a):
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            out = noise_correlation(a)
            return out, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak(crop)  # (its annuli are computed once, then cached)
    (out_crop, p_crop), (out, p_img) = peak(crop), peak(img)
    assert out == out_crop == {"band_edge": 0.5, "correlation_px": 1.0}
    assert p_img <= p_crop + 0.05 * img.nbytes, f"{(p_img - p_crop) / img.nbytes:.2f} image sizes more than its crop"


def test_the_pixels_without_data_are_left_out_and_small_or_empty_images_are_white():
    rng = np.random.default_rng(5)
    zoomed = _zoom(rng.normal(size=(160, 160)), 2.0)
    # a constant padding over a third of the crop changes the spectrum; left out, the zoom is read
    padded = zoomed.copy()
    padded[:, :100] = 0.0
    pixels = np.ones(padded.shape, bool)
    pixels[:, :100] = False
    assert noise_correlation(padded, pixels)["correlation_px"] == pytest.approx(2.0, rel=0.12)
    assert noise_correlation(rng.normal(size=(40, 40)))["correlation_px"] == 1.0  # too small to measure
    none = np.zeros((128, 128), bool)
    assert noise_correlation(zoomed[:128, :128], none)["correlation_px"] == 1.0  # nothing to read
    with pytest.raises(ValueError, match="2-D"):
        noise_correlation(np.zeros((4, 64, 64)))


def test_find_sites_widens_the_column_low_pass_of_an_upsampled_image_and_says_so():
    from stemfast import find_sites

    img = make_mos2(shape=(256, 256), seed=6).image
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoiseCorrelationWarning)
        t = find_sites(img)
    assert t.meta["lattice"]["noise"] == {"band_edge": 0.5, "correlation_px": 1.0, "column_filter_px": 1.0}
    with pytest.warns(NoiseCorrelationWarning, match="correlated over about 2"):
        t2 = find_sites(_zoom(img, 2.0))
    noise = t2.meta["lattice"]["noise"]
    assert noise["column_filter_px"] == pytest.approx(2.0, rel=0.12) and "warning" in noise


def test_the_labelled_wse2_crop_upsampled_ranks_its_defects_as_recorded():
    """The real labelled WSe2 crop (HAADF, 5 px spacing) upsampled 3x (cubic; labels scaled): read
    with a 1 px column low-pass (the setting divided by the measured correlation, so that the
    widening gives back 1 px), its defect ranking falls below the recorded crop's (AP 0.78 against
    0.84; the whole scan: 0.62 against 0.80); with the low-pass widened by the measured correlation it
    is the recorded one's again (0.83)."""
    from stemfast.config import PipelineConfig, apply_overrides
    from stemfast.model.shipped import shipped_for_run

    cfg = apply_overrides(PipelineConfig(), {"sites.material": "wse2"})
    model = shipped_for_run(cfg)
    img = np.load(DATA / "wse2_ti2_haadf_crop.npy").astype(np.float64)
    lxy, lname = read_labels()
    ap1, noise1 = labelled_ap(img, lxy, lname, cfg, model)
    assert noise1["correlation_px"] == 1.0
    up = _zoom(img, 3.0)
    lxy3 = lxy * (up.shape[0] - 1) / (img.shape[0] - 1)
    ap3, noise3 = labelled_ap(up, lxy3, lname, cfg, model)
    assert noise3["column_filter_px"] == pytest.approx(3.0, rel=0.12)
    narrow = apply_overrides(cfg, {"sites.column_noise_px": 1.0 / noise3["correlation_px"]})
    ap_narrow, noise_n = labelled_ap(up, lxy3, lname, narrow, model)
    assert noise_n["column_filter_px"] == pytest.approx(1.0)
    assert ap3 >= ap1 - 0.02 and ap3 >= ap_narrow + 0.03, (ap1, ap3, ap_narrow)
