"""Bright-field contrast (stemfast.contrast): an image whose columns are dark on a bright background
(bright field, ABF -- recorded beside the ADF detectors) is told from the image and inverted, with a
warning, and gives what its ADF twin gives; an image that cannot tell is read as ADF, with a warning."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.spatial import cKDTree

from stemfast.contrast import CONTRAST_SKEW, ContrastWarning, column_contrast, inverted
from stemfast.sites import SiteSettings, companion_intensity, find_sites
from stemfast.synthetic import make_lattice, make_mos2

from real_data import DATA, average_precision, read_labels


def test_column_contrast_tells_bright_from_dark_columns_and_noise_from_both():
    img, _ = make_lattice((160, 160), 8.0, noise=0.05, seed=0)
    bright, dark = column_contrast(img, 8.0), column_contrast(inverted(img), 8.0)
    assert bright.columns == "bright" and dark.columns == "dark"
    assert bright.skew == pytest.approx(-dark.skew, rel=1e-3) and bright.skew > 3 * CONTRAST_SKEW
    noise = np.random.default_rng(0).normal(size=(160, 160)).astype(np.float32)
    assert column_contrast(noise, 8.0).columns == "unclear"
    # pixels without data are left out: a bright-field image half covered by a constant mask
    mask = np.zeros(img.shape, bool)
    mask[:, :80] = True
    assert column_contrast(np.where(mask, 0.0, inverted(img)), 8.0, mask=mask).columns == "dark"
    with pytest.raises(ValueError):
        column_contrast(img, 1.0)
    with pytest.raises(ValueError):
        column_contrast(img, 8.0, mask=mask[:10])
    with pytest.raises(ValueError):
        SiteSettings(contrast="inverse")


def _sites(img, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = find_sites(img, **kw)
    return t, [w for w in caught if issubclass(w.category, ContrastWarning)]


def test_a_bright_field_image_is_inverted_and_gives_the_sites_and_names_of_its_adf_twin():
    img = make_mos2(shape=(256, 256), seed=3, rates=(0.02, 0.01, 0.005, 0.005)).image.astype(np.float32)
    ref, none = _sites(img)
    c = ref.meta["lattice"]["contrast"]
    assert not none and c["columns"] == "bright" and c["skew"] > CONTRAST_SKEW and not c["inverted"]
    assert c["setting"] == "auto" and "warning" not in c
    bf, caught = _sites(inverted(img))
    c = bf.meta["lattice"]["contrast"]
    assert c["columns"] == "dark" and c["inverted"] and c["skew"] < -CONTRAST_SKEW
    assert len(caught) == 1 and "bright-field" in str(caught[0].message) and c["warning"] == str(caught[0].message)
    # the same sites, the same sublattice names (metal the heaviest column, not the hexagon centre)
    d, j = cKDTree(bf.xy).query(ref.xy)
    assert len(bf) == len(ref) and (d < 0.05).all()
    assert (bf["sublattice"][j] == ref["sublattice"]).all()
    np.testing.assert_allclose(bf["column_intensity"][j], ref["column_intensity"], rtol=1e-3, atol=1e-3)
    # told: "dark" inverts without a warning; "bright" reads the image as it is (the hexagon centres
    # become the brightest "metal" -- what the setting asked for)
    told, none = _sites(inverted(img), contrast="dark")
    assert not none and told.meta["lattice"]["contrast"]["inverted"] and len(told) == len(ref)
    as_is, none = _sites(inverted(img), contrast="bright")
    assert not none and not as_is.meta["lattice"]["contrast"]["inverted"]
    d, j = cKDTree(ref.xy).query(as_is.xy)
    on = (d < 0.3 * ref.meta["spacing_px"]) & (as_is["sublattice"] == 0)
    assert on.sum() > 30 and (ref["sublattice"][j][on] == 2).mean() > 0.9


def test_a_bright_field_companion_is_inverted_on_its_own():
    img = make_mos2(shape=(256, 256), seed=3).image.astype(np.float32)
    t, _ = _sites(img)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        same, c_same = companion_intensity(img, t, return_contrast=True)
        bf, c_bf = companion_intensity(inverted(img), t, return_contrast=True)
    assert c_same["columns"] == "bright" and c_bf["columns"] == "dark" and c_bf["warning"].startswith("companion")
    assert sum(issubclass(w.category, ContrastWarning) for w in caught) == 1
    np.testing.assert_allclose(bf, same, rtol=1e-3, atol=1e-3)


def test_real_wse2_crop_inverted_ranks_the_labelled_defects_as_the_haadf_crop_does():
    """The labelled WSe2 crop (HAADF) turned into bright-field contrast: read as it was, its hexagon
    centres became the "metal" and the defect ranking fell to chance (AP 0.09 on the whole scan);
    told from the image, the ranking is the HAADF crop's."""
    from stemfast.config import PipelineConfig, apply_overrides
    from stemfast.model.shipped import shipped_for_run
    from stemfast.pipeline import analyze, prepare

    cfg = apply_overrides(PipelineConfig(), {"sites.material": "wse2"})
    model = shipped_for_run(cfg)
    img = np.load(DATA / "wse2_ti2_haadf_crop.npy").astype(np.float32)
    lxy, lname = read_labels()
    ap = []
    for a in (img, inverted(img)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prep = prepare(a, config=cfg, patch_size=model.extra.get("patch_size"))
            table, _ = analyze(prep, model, config=cfg)
        d, j = cKDTree(lxy).query(table.xy)
        positive = (d <= 2.0) & np.isin(lname[j], ["V_Se", "Ti"])
        ap.append(average_precision(np.asarray(table["anomaly_score"], float), positive))
        assert prep.sites.meta["lattice"]["contrast"]["inverted"] == (a is not img)
    assert ap[0] > 0.8 and ap[1] == pytest.approx(ap[0], abs=0.01), ap  # 0.837 both


def test_an_abf_like_image_whose_chalcogen_is_the_darker_column_is_inverted_and_its_naming_warned():
    """In ABF the chalcogen pair is often darker than the metal (contrast ~ Z^(1/3): S2 / Mo ~ 1.45):
    inverted, the chalcogen is the brightest and is named "metal". The analysis' naming check sees
    the vacancies crowd on the sublattice named metal and says to set sites.chalcogen_brighter."""
    from stemfast.analysis import SublatticeNamingWarning
    from stemfast.config import PipelineConfig
    from stemfast.model.shipped import shipped_for_run
    from stemfast.pipeline import analyze, prepare

    s = make_mos2(shape=(512, 512), seed=4, rates=(0.05, 0.02, 0.0, 0.0), chalcogen_scale=3.7)
    cfg = PipelineConfig()
    model = shipped_for_run(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prep = prepare(inverted(s.image), config=cfg, patch_size=model.extra.get("patch_size"))
        table, summary = analyze(prep, model, config=cfg)
    assert prep.sites.meta["lattice"]["contrast"]["inverted"]
    d, j = cKDTree(table.xy).query(s.truth[:, :2])
    mo = (s.truth[:, 2] == 0) & (d < 2)
    assert (np.asarray(table["sublattice"])[j][mo] == 1).mean() > 0.95  # named by brightness: swapped
    assert any(issubclass(w.category, SublatticeNamingWarning) for w in caught)
    assert "sites.chalcogen_brighter" in summary["naming_warning"]


@pytest.mark.parametrize("name", ["mos2_exp-000-2_crop.npy", "mos2_exp-002-5_crop.npy", "wse2_ti2_haadf_crop.npy"])
def test_annotations_drawn_into_an_adf_image_never_make_it_dark(name):
    """Exports carry scale bars, label panels and black frames drawn in at the image's extreme values;
    their edges ring in the band-pass. The moment skewness followed them (a 6 px black frame round
    the 002-5 scan: +1.04 -> +0.31); the quantile skewness hardly moves, and a label box large enough
    to be a region without data is left out with the band-pass's ringing around it."""
    from stemfast.nodata import no_data

    img = np.load(DATA / name).astype(np.float32)
    nn = float(find_sites(img, material="wse2" if "wse2" in name else "mos2").meta["spacing_px"])
    lo, hi = float(img.min()), float(img.max())
    frame = img.copy()
    frame[:6], frame[-6:], frame[:, :6], frame[:, -6:] = lo, lo, lo, lo
    bar = img.copy()
    bar[230:236, 12:92] = lo  # a black scale bar
    box = img.copy()
    box[200:250, 10:130] = hi  # a white label panel with black text
    box[215:225, 20:110:6] = lo
    for a in (frame, bar, box):
        c = column_contrast(a, nn, mask=no_data(a).pixels())
        assert c.columns != "dark", c
        assert column_contrast(inverted(a), nn, mask=no_data(inverted(a)).pixels()).columns != "bright"
    assert column_contrast(bar, nn).columns == "bright"
    assert column_contrast(box, nn, mask=no_data(box).pixels()).columns == "bright"


@pytest.mark.parametrize("ratio", [0.15, 0.39, 0.54, 1.4])  # chalcogen pair / metal: WS2, MoS2, WSe2, MoSe2
@pytest.mark.parametrize("blur", [0.0, 1.2])
def test_the_phase_of_the_reflections_tells_bright_atoms_whatever_the_columns_ratio_and_blur(ratio, blur):
    """F(g1) F*(g2) F*(g1 - g2) is |F(g)|^2 (f_metal + f_chalcogen): positive for bright atoms at any
    ratio of the two columns, negative inverted, and a blur multiplies it by a positive transfer.
    The skewness cannot say so: at 5 px spacing and the WSe2 ratio a 1.2 px blur turns it round."""
    from scipy import ndimage

    from stemfast.contrast import CONTRAST_COHERENCE, phase_invariant
    from stemfast.sites import _bragg_ring
    from stemfast.synthetic import chalcogen_pair_intensity

    s = make_mos2(shape=(256, 256), seed=2, pixel_size_A=0.36, dose=2000.0,
                  chalcogen_scale=ratio / chalcogen_pair_intensity())
    img = ndimage.gaussian_filter(np.asarray(s.image, np.float64), blur) if blur else np.asarray(s.image, np.float64)
    g = _bragg_ring(img.astype(np.float32), SiteSettings(), None)[0].g
    cos, coherence = phase_invariant(img, g)
    cos_inv, _ = phase_invariant(inverted(img), g)
    assert cos > 0.5 and coherence > 0.9 and cos_inv == pytest.approx(-cos, abs=1e-6), (cos, coherence)
    assert coherence >= CONTRAST_COHERENCE
    c, ci = column_contrast(img, s.nn_px, g=g), column_contrast(inverted(img), s.nn_px, g=g)
    assert (c.columns, c.by, ci.columns, ci.by) == ("bright", "phase", "dark", "phase")


@pytest.mark.parametrize("detector", ["haadf", "maadf"])
def test_a_blurred_real_wse2_crop_is_read_with_bright_columns_and_its_inverse_with_dark_ones(detector):
    """The real WSe2 crops (5 px spacing) blurred by 1.2 px: the skewness turns negative (HAADF -0.16
    on the whole scan) and the image was inverted as bright field -- defect AP 0.14 instead of 0.76.
    The phase of the reflections says bright (+0.88 / +0.66 on the scan), its inverse dark."""
    from scipy import ndimage

    img = ndimage.gaussian_filter(np.load(DATA / f"wse2_ti2_{detector}_crop.npy").astype(np.float64), 1.2)
    t, caught = _sites(img, material="wse2")
    c = t.meta["lattice"]["contrast"]
    assert c["by"] == "phase" and c["columns"] == "bright" and not c["inverted"] and not caught
    assert c["phase_cos"] > 0.5 and c["coherence"] > 0.9
    if detector == "haadf":
        assert c["skew"] < -CONTRAST_SKEW  # the skewness alone would have inverted it
    t_inv, caught = _sites(inverted(img), material="wse2")
    ci = t_inv.meta["lattice"]["contrast"]
    assert ci["columns"] == "dark" and ci["inverted"] and ci["by"] == "phase" and len(caught) == 1
    assert "phase of the lattice's reflections" in ci["warning"]
    d, j = cKDTree(t_inv.xy).query(t.xy)
    assert len(t) == len(t_inv) and (d < 0.05).all() and (t_inv["sublattice"][j] == t["sublattice"]).all()
