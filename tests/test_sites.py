"""find_sites end to end on the package's own synthetic MoS2 images (not on ../shared)."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
from scipy.spatial import cKDTree

from stemfast.sites import LatticeUncertainWarning, NoLatticeWarning, SiteSettings, find_sites
from stemfast.synthetic import make_mos2


def score(table, truth, nn):
    """Recall of atom sites, recall of empty columns, precision, rmse (the dev scorer's rules)."""
    xy = table.xy
    txy = truth[:, :2]
    sub = truth[:, 2].astype(int)
    dfc = truth[:, 3].astype(int)
    tol = 0.3 * nn
    d, j = cKDTree(xy).query(txy, distance_upper_bound=tol)
    t2o = np.full(len(txy), -1)
    used = np.zeros(len(xy), bool)
    for t in np.argsort(d):
        if not np.isfinite(d[t]):
            break
        if not used[j[t]]:
            t2o[t] = j[t]
            used[j[t]] = True
    atoms = sub < 2
    empty = np.isin(dfc, (2, 3))
    clean = atoms & (dfc == 0) & (t2o >= 0)
    return {
        "recall_atoms": float((t2o[atoms] >= 0).mean()),
        "recall_vacancy": float((t2o[empty] >= 0).mean()) if empty.any() else float("nan"),
        "precision": float(used.mean()),
        "rmse_px": float(np.sqrt(((xy[t2o[clean]] - txy[clean]) ** 2).sum(1).mean())),
        "t2o": t2o,
        "used": used,
    }


@pytest.fixture(scope="module")
def clean_image():
    return make_mos2(shape=(384, 384), rotation_deg=11.0, strain=(0.01, -0.005, 0.004),
                     rates=(0.03, 0.02, 0.02, 0.01), dose=500.0, seed=7)


def test_find_sites_on_clean_mos2(clean_image):
    s = clean_image
    t = find_sites(s.image)
    nn = s.meta["nn_px"]
    # spacing is found automatically
    assert t.meta["spacing_px"] == pytest.approx(nn, rel=0.01)
    r = score(t, s.truth, nn)
    assert r["recall_atoms"] >= 0.99
    assert r["recall_vacancy"] >= 0.95
    assert r["precision"] >= 0.99
    assert r["rmse_px"] <= 0.25
    # required columns and conventions
    for c in ("x", "y", "source", "intensity", "a1x", "a1y", "a2x", "a2y", "sublattice", "lattice_rms"):
        assert c in t
    assert set(np.unique(t["source"])) <= {"peak", "lattice"}
    # hexagon centres come from the lattice, not from peaks
    hollow = s.truth[:, 2] == 2
    m = r["t2o"][hollow]
    assert (t["source"][m[m >= 0]] == "lattice").mean() > 0.95
    # the sublattice labels agree with the truth (Mo / S2 / hollow), defect-free matched sites
    ok = (r["t2o"] >= 0) & (s.truth[:, 3] == 0)
    assert (t["sublattice"][r["t2o"][ok]] == s.truth[ok, 2]).mean() > 0.98


def test_edge_sites_placed_and_apart(clean_image):
    """A site predicted at the image edge or corner (neighbours on one side only) is placed by the
    lattice, not by a wild extrapolation, and no two sites come closer than half a spacing."""
    from scipy.spatial import cKDTree

    s = clean_image
    t = find_sites(s.image)
    nn = s.meta["nn_px"]
    H, W = s.image.shape
    T = s.truth
    d, j = cKDTree(t.xy).query(T[:, :2])
    edge = np.minimum.reduce([T[:, 0], W - 1 - T[:, 0], T[:, 1], H - 1 - T[:, 1]])
    pred = (d < 0.3 * nn) & (T[:, 3] == 0) & (T[:, 2] < 2) & (edge < nn) & (t["source"][j] == "lattice")
    assert pred.sum() >= 3  # the check sees some
    assert d[pred].max() < 1.0
    dd, _ = cKDTree(t.xy).query(t.xy, k=2)
    assert dd[:, 1].min() >= 0.5 * nn


def test_sites_up_to_the_image_edge(clean_image):
    """Every column whose centre lies on the sampled grid is a site, also within a px of the edge
    (a patch around it reaches past the edge; the site is still in the table), and no site lies
    off the grid."""
    from scipy.spatial import cKDTree

    s = clean_image
    t = find_sites(s.image)
    nn = s.meta["nn_px"]
    H, W = s.image.shape
    T = s.truth
    edge = np.minimum.reduce([T[:, 0], W - 1 - T[:, 0], T[:, 1], H - 1 - T[:, 1]])
    d, _ = cKDTree(t.xy).query(T[:, :2])
    near = edge < 1.0
    assert near.sum() >= 3  # the check sees some
    assert (d[near] <= 0.3 * nn).all(), T[near & (d > 0.3 * nn)]
    assert (t.xy >= 0).all() and (t.xy[:, 0] <= W - 1).all() and (t.xy[:, 1] <= H - 1).all()
    # listed, not judged: the scan shows at most half of a column centred within a px of the edge
    e_site = np.minimum.reduce([t.xy[:, 0], W - 1 - t.xy[:, 0], t.xy[:, 1], H - 1 - t.xy[:, 1]])
    assert not t["observed"][e_site < 1.0].any()
    assert t["observed"][e_site >= 1.0].mean() > 0.99


def test_calibrated_columns(clean_image):
    t = find_sites(clean_image.image, pixel_size=0.012, unit="nm")
    np.testing.assert_allclose(t["x_nm"], t["x"] * 0.012)
    assert t.meta["spacing_nm"] == pytest.approx(t.meta["spacing_px"] * 0.012)


def test_a_calibration_that_fits_another_material_names_it():
    """A selenide whose file states a pixel size 3 % too large (as the shared WSe2 scan's does),
    analysed as MoS2 (the default): the sulphide's spacing is then > 5 % off, the selenides' is not;
    the warning says so and names them. As WSe2 it is quiet. (With an exact pixel size the two
    families, 4 % apart, both pass the 5 % check: the calibration tells them apart only at the edge.)"""
    from stemfast.sites import CalibrationWarning

    img = make_mos2(shape=(192, 192), a_A=3.282, pixel_size_A=0.25, seed=4).image  # 7.58 px spacing
    with pytest.warns(CalibrationWarning, match=r"fits (mose2 or wse2|wse2 or mose2)"):
        t = find_sites(img, pixel_size=0.0257, unit="nm")
    lat = t.meta["lattice"]
    assert lat["calibration_ok"] is False and set(lat["calibration_fits"]) == {"wse2", "mose2"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        t = find_sites(img, pixel_size=0.0257, unit="nm", material="wse2")
    assert t.meta["lattice"]["calibration_ok"] is True and "calibration_fits" not in t.meta["lattice"]


def test_dirty_image_hole_and_contamination():
    s = make_mos2(shape=(512, 512), seed=1, holes=1, contamination=1, hot_pixels=20, scan_glitches=2,
                  scan_distortion=(0.03, 0.01))
    t = find_sites(s.image)
    nn = s.meta["nn_px"]
    r = score(t, s.truth, nn)
    # no sites invented in the hole (a spacing inside its edge)
    from scipy import ndimage

    inner_hole = ndimage.binary_erosion(s.hole_mask, iterations=int(nn))
    ij = np.clip(np.rint(t.xy[:, ::-1]).astype(int), 0, 511)
    assert inner_hole[ij[:, 0], ij[:, 1]].sum() == 0
    # the lattice carries on under the contamination: its sites are found or predicted
    under = s.contamination_mask[np.clip(np.rint(s.truth[:, 1]).astype(int), 0, 511),
                                 np.clip(np.rint(s.truth[:, 0]).astype(int), 0, 511)]
    assert under.sum() > 10
    assert (r["t2o"][under] >= 0).mean() > 0.9
    assert r["recall_atoms"] >= 0.97
    assert r["precision"] >= 0.97


def test_pure_noise_gives_empty_result_with_warning():
    rng = np.random.default_rng(0)
    img = rng.normal(100, 10, (256, 256)).astype(np.float32)
    with pytest.warns(NoLatticeWarning):
        t = find_sites(img)
    assert len(t) == 0


@pytest.mark.parametrize("bad, msg", [
    (np.full((64, 64), np.nan, np.float32), "non-finite"),
    (np.arange(100.0), "2-D"),
    (np.zeros((0, 0)), "empty"),
    (np.zeros((10, 64)), "at least 16 x 16"),
])
def test_bad_input_clear_error(bad, msg):
    with pytest.raises(ValueError, match=msg):
        find_sites(bad)


def test_constant_image_warns():
    with pytest.warns(NoLatticeWarning):
        t = find_sites(np.ones((64, 64), np.float32))
    assert len(t) == 0


def test_cli_sites_and_corrupt_file(tmp_path, clean_image):
    from stemfast.io import write_tiff

    good = tmp_path / "good.tif"
    write_tiff(good, clean_image.image, pixel_size=0.012, unit="nm")
    out = tmp_path / "good.csv"
    r = subprocess.run([sys.executable, "-m", "stemfast", "sites", str(good), "-o", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    import pandas as pd

    df = pd.read_csv(out)
    assert {"x", "y", "source", "intensity", "x_nm", "y_nm"} <= set(df.columns)
    assert len(df) > 500
    bad = tmp_path / "bad.tif"
    bad.write_bytes(good.read_bytes()[: 3000])
    r = subprocess.run([sys.executable, "-m", "stemfast", "sites", str(bad)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0
    assert "bad.tif" in r.stderr and "Traceback" not in r.stderr


def _band_table(factors, spacing=12.0, shape=(240, 240), seed=0):
    """Sites of a triangular lattice with sublattice labels; column intensities scaled by ``factors[k]``
    in the k-th half-spacing strip from the left border (a scan fly-back band)."""
    rng = np.random.default_rng(seed)
    c, s_ = np.cos(np.radians(13.0)), np.sin(np.radians(13.0))  # rotated, as micrographs are: every strip holds columns
    b = spacing * np.array([[1.0, 0.0], [0.5, np.sqrt(3) / 2]]) @ np.array([[c, s_], [-s_, c]])
    m = max(50, int(2 * max(shape) / spacing))  # enough nodes to cover the image whatever its rotation
    ij = np.stack(np.meshgrid(np.arange(-m, m), np.arange(-m, m)), -1).reshape(-1, 2)
    xy = ij @ b
    H, W = shape
    keep = (xy[:, 0] >= 0) & (xy[:, 0] <= W - 1) & (xy[:, 1] >= 0) & (xy[:, 1] <= H - 1)
    xy, ij = xy[keep], ij[keep]
    sub = (ij[:, 0] - ij[:, 1]) % 3
    inten = np.where(sub == 0, 170.0, np.where(sub == 1, 50.0, -30.0)) * rng.normal(1, 0.03, len(xy))
    strip = (xy[:, 0] // (spacing / 2)).astype(int)
    for k, f in enumerate(factors):
        inten[(strip == k) & (sub <= 1)] *= f
    return xy, inten, sub, shape, spacing


@pytest.mark.parametrize("second", [0.79, 0.81, 0.86])
def test_border_band_is_stable_when_its_inner_strip_is_near_the_cut_off(second):
    """A fading fly-back band: the strip after the dark one is off by about the cut-off (0.2). With
    or without it crossing the cut-off, the band keeps the same width (it used to flip by a strip)."""
    from stemfast.sites import border_bands

    xy, inten, sub, shape, sp = _band_table([0.05, second])
    observed, widths = border_bands(xy, inten, sub, shape, sp)
    assert widths[0] == pytest.approx(1.5 * sp)  # two strips + one strip of margin
    assert widths[1:] == [0.0, 0.0, 0.0]
    np.testing.assert_array_equal(observed, xy[:, 0] >= 1.5 * sp)


def test_no_border_band_on_a_sound_image_or_for_one_noisy_strip():
    from stemfast.sites import border_bands

    xy, inten, sub, shape, sp = _band_table([])
    observed, widths = border_bands(xy, inten, sub, shape, sp)
    assert widths == [0.0, 0.0, 0.0, 0.0] and observed.all()
    # a border strip off by less than the cut-off does not start a band
    xy, inten, sub, shape, sp = _band_table([0.85])
    observed, widths = border_bands(xy, inten, sub, shape, sp)
    assert widths == [0.0, 0.0, 0.0, 0.0] and observed.all()


@pytest.mark.parametrize("gradient", [0.35, -0.35])
def test_an_illumination_gradient_is_not_a_border_band(gradient):
    """A gradient of 35% across the frame (simulated dev3's) puts the column level of a whole side
    ~15% off the image-wide median: no band without a fade, and with a fly-back strip the band is
    that strip (plus margin), not the side's whole gradient (it used to reach 6.5 spacings)."""
    from stemfast.sites import border_bands

    for factors, width in (([], 0.0), ([0.05], 1.0)):
        xy, inten, sub, shape, sp = _band_table(factors, shape=(480, 480))
        inten = inten * (1.0 + gradient * (xy[:, 0] / (shape[1] - 1) - 0.5))
        observed, widths = border_bands(xy, inten, sub, shape, sp)
        assert widths[0] == pytest.approx(width * sp) and widths[1:] == [0.0, 0.0, 0.0]
        np.testing.assert_array_equal(observed, xy[:, 0] >= width * sp)


@pytest.mark.parametrize("dim", [0.5, 0.3])
def test_a_step_of_the_illumination_across_the_frame_is_not_a_border_band(dim):
    """The right half of the film at 30-50 % of the left's signal (a thickness or illumination step
    that meets the top and bottom sides): the level along those sides follows the step, so no band
    is found there (one level per side put its strips' median between the two halves, and bands 6.5
    spacings wide were found along both sides, 625 sites unjudged on the labelled WSe2 at 50 %); a
    fly-back strip on the left is still found, whatever the right half does."""
    from stemfast.sites import border_bands

    for factors, width in (([], 0.0), ([0.05], 1.0)):
        xy, inten, sub, shape, sp = _band_table(factors, shape=(480, 480))
        inten = np.where(xy[:, 0] > shape[1] / 2, inten * dim, inten)
        observed, widths = border_bands(xy, inten, sub, shape, sp)
        assert widths[0] == pytest.approx(width * sp) and widths[1:] == [0.0, 0.0, 0.0]
        np.testing.assert_array_equal(observed, xy[:, 0] >= width * sp)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_faint_chalcogen_columns_make_no_border_band(seed):
    """Real MoS2 scans have S2 columns so faint that their band-passed intensities sit around 0
    (median 0.33, 0.00 and -0.15 of their spread on the shared scans): over such a median, one
    strip's S2 read +-200 and bands 10-26 px wide were marked on the sound sides of 000-2 (226 sites
    unjudged, 28 with the metal alone). Only a sublattice whose median stands above its spread
    takes part: no band on a sound frame, or where the right half is dimmed by a thickness or
    illumination step, and a fly-back strip on the metal is still found."""
    from stemfast.sites import border_bands

    rng = np.random.default_rng(seed)
    for factors, width, dim in (([], 0.0, 1.0), ([], 0.0, 0.4), ([0.05], 1.0, 1.0), ([0.05], 1.0, 0.4)):
        xy, inten, sub, shape, sp = _band_table(factors, shape=(480, 480), seed=seed)
        faint = sub == 1
        inten[faint] = rng.normal(0.0, 20.0, faint.sum())  # signal far under the noise
        inten = np.where(xy[:, 0] > shape[1] / 2, inten * dim, inten)
        observed, widths = border_bands(xy, inten, sub, shape, sp)
        assert widths[0] == pytest.approx(width * sp) and widths[1:] == [0.0, 0.0, 0.0]
        np.testing.assert_array_equal(observed, xy[:, 0] >= width * sp)


def test_border_band_along_part_of_a_side():
    """A fly-back band over the lower part of the frame only (rows >= 450 of 720): the median over the
    whole left side is sound, the quarters of the side that lie in the band are marked; a quarter
    whose border strip is off by 0.3 (noise of its few columns) is not."""
    from stemfast.sites import border_bands

    xy, inten, sub, shape, sp = _band_table([], shape=(720, 720))
    strip = (xy[:, 0] // (sp / 2)).astype(int)
    low = (xy[:, 1] >= 450) & (strip <= 1) & (sub <= 1)
    inten[low] *= 0.05
    observed, widths = border_bands(xy, inten, sub, shape, sp)
    assert widths[0] == pytest.approx(1.5 * sp) and widths[1:] == [0.0, 0.0, 0.0]
    assert not observed[(xy[:, 1] >= 540) & (xy[:, 0] < 1.5 * sp)].any()  # the quarter wholly in the band
    assert observed[xy[:, 1] < 360].all() and observed[xy[:, 0] >= 1.5 * sp].all()
    # a quarter whose border strip is off by 0.3 only: no band
    xy, inten, sub, shape, sp = _band_table([], shape=(720, 720))
    strip = (xy[:, 0] // (sp / 2)).astype(int)
    inten[(xy[:, 1] >= 540) & (strip == 0) & (sub <= 1)] *= 0.7
    observed, widths = border_bands(xy, inten, sub, shape, sp)
    assert widths == [0.0, 0.0, 0.0, 0.0] and observed.all()


@pytest.mark.parametrize("seed", [1, 2])
def test_real_like_synthetic_faint_chalcogen_gradient_streaks_contamination(seed):
    """What real data showed: faint S2 (0.45 of Z^1.7), contamination with its own texture, an
    illumination gradient, scan streaks and glitches, low dose. The site lattice still comes out
    whole, each node once, with the right sublattices."""
    s = make_mos2(shape=(384, 384), seed=seed, rotation_deg=7.0, chalcogen_scale=0.45, contamination=2,
                  illumination_gradient=0.4, scan_streaks=6, streak_level=0.3, dose=60.0, scan_glitches=2,
                  rates=(0.03, 0.02, 0.02, 0.01))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = find_sites(s.image)
    nn = s.meta["nn_px"]
    r = score(t, s.truth, nn)
    # columns cut by the image edge (within 0.5 nn of it) are left aside
    e = np.minimum.reduce([s.truth[:, 0], 383 - s.truth[:, 0], s.truth[:, 1], 383 - s.truth[:, 1]])
    inner = (e > 0.5 * nn) & (s.truth[:, 2] < 2)
    assert (r["t2o"][inner] >= 0).mean() >= 0.99
    assert r["precision"] >= 0.97
    assert t.meta["spacing_px"] == pytest.approx(nn, rel=0.01)
    ok = (r["t2o"] >= 0) & (s.truth[:, 3] == 0)
    assert (t["sublattice"][r["t2o"][ok]] == s.truth[ok, 2]).mean() > 0.98
    # one site per node, up to the image edge (where columns are cut)
    d, _ = cKDTree(t.xy).query(t.xy, k=2)
    assert (d[:, 1] < 0.5 * nn).sum() == 0


def test_prediction_fit_prior_and_apart():
    """The ridge of the neighbours' prediction: with a full neighbourhood the centre is the affine
    fit's; with neighbours on one side only the lattice vectors stay near the prior. Predicted
    sites closer than dmin to a peak's site or to each other are dropped (one of a pair kept)."""
    from stemfast.sitelattice import _apart, _local_fit

    S = np.array([[10.0, 0.0], [5.0, 8.66]])
    P, Q = np.meshgrid(np.arange(-4, 5), np.arange(-4, 5), indexing="ij")
    ij = np.stack([P.ravel(), Q.ravel()], 1)
    rng = np.random.default_rng(0)
    xy = ij @ (S * 1.02) + rng.normal(0, 0.3, ij.shape)
    w = np.ones(len(ij), bool)
    _, _, c0 = _local_fit(ij, xy, w, S, 2.05, 5, need_rms=False)
    _, _, c8 = _local_fit(ij, xy, w, S, 2.05, 5, need_rms=False, prior=8.0)
    mid = (np.abs(ij) <= 2).all(1)
    assert np.abs(c8[mid] - c0[mid]).max() < 0.05  # symmetric neighbourhoods: the prior does not move it
    # one-sided: the node (0, 0) with its peaks only at p = 1, 2 (an edge node)
    one = (ij[:, 0] >= 1) & (ij[:, 0] <= 2) & (np.abs(ij[:, 1]) <= 1)
    truth0 = np.zeros(2)
    _, _, cr = _local_fit(ij, np.where(one[:, None], xy, np.nan), one, S, 2.05, 2, need_rms=False, prior=8.0)
    k = np.flatnonzero((ij == 0).all(1))[0]
    assert np.hypot(*(cr[k] - truth0)) < 1.0
    with pytest.raises(ValueError):
        _local_fit(ij, xy, w, S, 2.05, 5, need_rms=True, prior=8.0)
    fixed = np.array([[0.0, 0.0], [10.0, 0.0]])
    cand = np.array([[2.0, 0.0], [20.0, 0.0], [22.0, 0.0], [40.0, 0.0]])
    keep = _apart(fixed, cand, 5.0)
    assert not keep[0] and keep[3] and keep[1] != keep[2]


@pytest.mark.parametrize("distortion", [(0.0, 0.0), (0.08, 0.0), (0.0, 0.06)])
def test_anisotropic_lattice_is_measured_and_followed(distortion):
    """Scan distortion makes the lattice anisotropic: the local fits follow it (every site found),
    ``meta["lattice"]["distortion"]`` measures it and beyond ``MAX_ANISOTROPY`` a warning says so."""
    from stemfast.sites import MAX_ANISOTROPY, LatticeDistortionWarning

    s = make_mos2(shape=(256, 256), rotation_deg=7.0, scan_distortion=distortion, seed=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = find_sites(s.image)
    D = np.array([[1.0 + distortion[0], distortion[1]], [0.0, 1.0]])
    sv = np.linalg.svd(D, compute_uv=False)
    want = sv[0] / sv[1] - 1.0
    d = t.meta["lattice"]["distortion"]
    assert d["anisotropy"] == pytest.approx(want, abs=0.01), d
    warned = any(issubclass(w.category, LatticeDistortionWarning) for w in caught)
    assert warned == (want > MAX_ANISOTROPY) and (("warning" in d) == warned), d
    # the bonds along the three directions are the generator's
    nn = s.meta["nn_px"]
    iso = np.sqrt(abs(np.linalg.det(D))) * nn
    assert d["spacing_iso_px"] == pytest.approx(iso, rel=0.01)
    # the sites follow the distorted lattice: all found, none invented
    d_true, _ = cKDTree(t.xy).query(s.truth[:, :2])
    d_site, _ = cKDTree(s.truth[:, :2]).query(t.xy)
    assert (d_true <= 0.3 * nn).mean() >= 0.99 and (d_site <= 0.3 * nn).mean() >= 0.99
    lat = t.meta["lattice"]
    assert lat["spacing_agreement"] >= 0.99 and not lat.get("unsure"), lat
    # anisotropic, but regular: no site crowds another
    assert lat["crowding"]["n_crowded"] == 0 and "warning" not in lat["crowding"], lat["crowding"]


def test_crowding_counts_sites_closer_than_a_lattice_allows():
    """``crowding``: none on a regular lattice (also an anisotropic one, also with a hole, where
    neighbours are missing, not close); a second site next to some columns makes both crowded, and
    beyond ``MAX_CROWDED`` a warning names the rows."""
    from stemfast.sitelattice import border_distance
    from stemfast.crowding import MAX_CROWDED, crowding

    g = np.array([(i + 0.5 * (j % 2), j * np.sqrt(3) / 2) for i in range(40) for j in range(46)]) * 10.0
    shape = (400, 400)
    assert crowding(g, shape)["n_crowded"] == 0
    assert crowding(g * [1.0, 0.82], shape)["n_crowded"] == 0  # 18 % anisotropic
    hole = np.hypot(*(g - [200.0, 200.0]).T) > 60.0
    assert crowding(g[hole], shape)["n_crowded"] == 0
    # a second site 2 px from every column of rows 150-200: crowded there, named in the warning
    band = (g[:, 1] >= 150) & (g[:, 1] <= 200)
    c = crowding(np.r_[g, g[band] + [2.0, 0.0]], shape)
    inner = (border_distance(g, shape) >= 25.0)
    assert c["n_crowded"] == 2 * (band & inner).sum() and c["fraction"] > MAX_CROWDED and "warning" in c
    assert len(c["rows"]) == 1 and c["rows"][0][0] <= 155 and c["rows"][0][1] >= 195
    assert c["rows"][0][1] - c["rows"][0][0] < 150 and c["in_rows"] == 1.0 and "rows" in c["warning"]
    # crowding spread over every row: none named
    spread = crowding(np.r_[g, g[::12] + [2.0, 0.0]], shape)
    assert "warning" in spread and "rows" not in spread["warning"]
    # `judged` picks the sites counted; all are neighbours; `mark` flags every crowded judged site, edge too
    j = np.r_[np.ones(len(g), bool), np.zeros(band.sum(), bool)]
    mark = np.zeros(len(j), bool)
    assert crowding(np.r_[g, g[band] + [2.0, 0.0]], shape, judged=j, mark=mark)["n_crowded"] == (band & inner).sum()
    assert (mark == np.r_[band, np.zeros(band.sum(), bool)]).all()


def test_a_band_of_disturbed_scan_lines_is_reported_as_crowded():
    """A band of lines recorded with the slow scan 35 % faster: the sites follow the compressed
    columns there, and ``find_sites`` says so (``LatticeCrowdingWarning``, ``meta["lattice"]["crowding"]["rows"]``
    around the band). The same image undisturbed has no crowding."""
    from scipy.ndimage import map_coordinates

    from stemfast.crowding import LatticeCrowdingWarning

    s = make_mos2(shape=(300, 256), rotation_deg=8.0, seed=3)
    H, W = 256, 256
    y = np.arange(H, dtype=float)
    ys = np.where(y < 100, y, np.where(y < 140, 100 + (y - 100) * 1.35, y + 40 * 0.35))
    band = map_coordinates(s.image, np.meshgrid(ys, np.arange(W, dtype=float), indexing="ij"), order=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = find_sites(band)
    c = t.meta["lattice"]["crowding"]
    assert any(issubclass(w.category, LatticeCrowdingWarning) for w in caught) and "warning" in c, c
    crowded = np.asarray(t["crowded"], bool)  # the sites flagged: in and next to the band
    assert crowded.sum() >= c["n_crowded"] and np.all(np.abs(np.asarray(t["y"])[crowded] - 120) < 60)
    # the rows named (bands of 4 spacings) overlap the disturbed band and lie next to it
    assert any(a <= 140 and b >= 100 for a, b in c["rows"]) and all(b >= 60 and a <= 180 for a, b in c["rows"]), c
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = find_sites(np.ascontiguousarray(s.image[:H]))
    assert t0.meta["lattice"]["crowding"]["n_crowded"] == 0 and not np.asarray(t0["crowded"]).any()
    assert not any(issubclass(w.category, LatticeCrowdingWarning) for w in caught)


def test_real_scan_distortion_does_not_make_the_lattice_uncertain():
    """At the 16-19 % anisotropy of the real MoS2 scans the lattice is warned about as anisotropic,
    not as uncertain: the local fits' spacing is compared with the ring's by cell area (the lengths
    of whichever two vectors a basis holds differ from the ring by up to 5 % there; exp-002-5 was
    called uncertain for it). All sites found, none invented (on a 256 px crop of this lattice 3
    edge sites of 279 land 0.6-1 spacing off: edge placement under strong distortion)."""
    from stemfast.sites import LatticeDistortionWarning

    s = make_mos2(shape=(512, 512), rotation_deg=7.0, scan_distortion=(0.17, 0.03), seed=2)
    with pytest.warns(LatticeDistortionWarning):
        t = find_sites(s.image)
    lat = t.meta["lattice"]
    assert lat["distortion"]["anisotropy"] > 0.15
    assert lat["spacing_agreement"] >= 0.99 and not lat.get("unsure"), lat
    nn = s.meta["nn_px"]
    d_true, _ = cKDTree(t.xy).query(s.truth[:, :2])
    d_site, _ = cKDTree(s.truth[:, :2]).query(t.xy)
    assert (d_true <= 0.3 * nn).mean() >= 0.99 and (d_site <= 0.3 * nn).mean() >= 0.99


def test_lattice_distortion_checks_its_input():
    from stemfast.sitelattice import lattice_distortion

    with pytest.raises(ValueError):
        lattice_distortion(np.zeros((2, 2)))
    with pytest.raises(ValueError):
        lattice_distortion(np.full((2, 2), np.nan))


@pytest.mark.parametrize("seed", [0, 1])
def test_columns_on_a_sloping_background_are_refined_to_their_centre(seed):
    """A bright smooth blob (contamination) at 80 % of the image's range: the Gaussian-on-a-constant fit
    pulls the columns on its flanks uphill unless the refinement sees the image minus its blur
    (``refine_background_nn``). Position error there 0.37-0.41 px without, as elsewhere (~0.25) with."""
    s = make_mos2(shape=(320, 320), seed=seed, rotation_deg=11.0, dose=200.0, rates=(0.0, 0.0, 0.0, 0.0),
                  contamination=0)
    yy, xx = np.mgrid[0:320, 0:320]
    img = s.image.astype(np.float64)
    img = img + 0.8 * float(np.ptp(img)) * np.exp(-((xx - 160) ** 2 + (yy - 150) ** 2) / (2 * 40.0 ** 2))
    atoms = s.truth[s.truth[:, 2] < 2, :2]
    r = np.hypot(atoms[:, 0] - 160, atoms[:, 1] - 150)
    flank = (r > 20) & (r < 70)

    def rms(background_nn):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = find_sites(img, refine_background_nn=background_nn)
        d, _ = cKDTree(np.column_stack([t["x"], t["y"]])).query(atoms)
        return float(np.sqrt(np.mean(d[flank] ** 2))), float(np.sqrt(np.mean(d[~flank] ** 2)))

    on_flank, elsewhere = rms(SiteSettings().refine_background_nn)
    assert on_flank <= 1.15 * elsewhere
    raw_flank, raw_elsewhere = rms(0.0)
    assert raw_flank > 1.3 * raw_elsewhere and raw_flank > 1.4 * on_flank


def test_robust_prediction_is_not_pulled_by_peaks_that_are_not_columns():
    """Peaks far off their node (a contamination patch's texture) pull their neighbours' prediction
    less in the Cauchy-weighted refit than in the plain least-squares fit; on a clean lattice the
    two agree, and unit weights give the unweighted fit exactly."""
    from stemfast.sitelattice import _local_fit, _predict

    S = np.array([[10.0, 0.0], [5.0, 8.66]])
    P, Q = np.meshgrid(np.arange(-12, 13), np.arange(-12, 13), indexing="ij")
    ij = np.stack([P.ravel(), Q.ravel()], 1)
    truth = ij @ S + 300.0
    rng = np.random.default_rng(1)
    clean = truth + rng.normal(0, 0.3, truth.shape)
    has = np.ones(len(ij), bool)
    _, _, c_plain = _local_fit(ij, clean, has, S, 2.05, 5, need_rms=False)
    _, _, c_ones = _local_fit(ij, clean, has, S, 2.05, 5, need_rms=False, weight=np.ones(len(ij)))
    np.testing.assert_allclose(c_ones, c_plain, atol=1e-9)
    kw = dict(shape=(600, 600), spacing=10.0)
    p_clean = _predict(ij, clean, has, S, truth, 2.05, 5, **kw)
    inner = (np.abs(ij) <= 8).all(1)
    assert np.abs(p_clean[inner] - c_plain[inner]).max() < 0.1  # clean: the refit changes nothing that matters
    bad = rng.random(len(ij)) < 0.15
    ang = rng.uniform(0, 2 * np.pi, bad.sum())
    dirty = clean.copy()
    dirty[bad] += 4.0 * np.c_[np.cos(ang), np.sin(ang)]  # 0.4 spacings off
    _, _, c_ls = _local_fit(ij, dirty, has, S, 2.05, 5, need_rms=False)
    p_rob = _predict(ij, dirty, has, S, truth, 2.05, 5, **kw)
    err_ls = np.hypot(*(c_ls - truth)[inner].T)
    err_rob = np.hypot(*(p_rob - truth)[inner].T)
    assert np.median(err_rob) < 0.75 * np.median(err_ls)
    assert np.percentile(err_rob, 95) < 0.75 * np.percentile(err_ls, 95)


def test_an_off_lattice_peak_is_adopted_by_an_empty_node_only_when_near_it_or_at_the_edge():
    """Inside the image an empty node takes an off-lattice peak as its column only within the node
    tolerance; within EDGE_NN spacings of the image edge or of the film's rim (a hole, a grain
    boundary: where the node's place is least sure) within half a spacing."""
    from stemfast.sitelattice import EDGE_NN, _adopt_off_lattice_peaks, _at_edge

    spacing, tol, shape = 10.0, 0.3, (200, 200)
    empty = np.array([[100.0, 100.0], [60.0, 100.0], [100.0, 5.0]])
    peaks = np.array([[104.0, 100.0], [62.0, 100.0], [104.0, 5.0]])  # 0.4, 0.2 and 0.4 spacings off
    assert 5.0 < EDGE_NN * spacing
    xy_empty = empty.copy()
    ep, left = _adopt_off_lattice_peaks(peaks, np.arange(3), xy_empty, spacing, tol,
                                        edge=_at_edge(peaks, shape, None, spacing))
    assert ep.tolist() == [-1, 1, 2] and left.tolist() == [0]
    np.testing.assert_array_equal(xy_empty[0], empty[0])
    np.testing.assert_array_equal(xy_empty[1:], peaks[1:])
    from types import SimpleNamespace

    mask = np.ones(shape, bool)
    mask[:, 112:] = False  # a grain's region ending 8 px right of the first peak: its rim
    assert _at_edge(peaks, shape, SimpleNamespace(mask=mask, factor=1), spacing).tolist() == [True, False, True]


def test_textured_contamination_is_film_not_a_hole():
    """Contamination whose texture has more band-pass energy than the columns, on a brighter
    background, is film: the clean film beside it is darker, but it is no hole. (A first version of
    the vacuum fix read the film's levels at the peaks with the most band-pass energy -- the
    texture's -- and took two thirds of this image for vacuum: 478 sites for 1304; on the real MoS2
    contamination copies of benchmarks/mos2_proxies.py 80-90 % of the film.)"""
    s = make_mos2(shape=(512, 512), seed=2, rotation_deg=7.0, chalcogen_scale=0.45, contamination=3,
                  contamination_radius_nn=6.0, contamination_level=1.0, contamination_texture=1.0,
                  dose=60.0, rates=(0.03, 0.02, 0.02, 0.01))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = find_sites(s.image)
    assert not t.meta["holes"]
    assert abs(len(t.xy) - len(s.truth)) <= 0.02 * len(s.truth)


def test_sites_under_textured_contamination_stay_on_their_columns():
    """Contamination whose texture is as strong as the columns (contamination_texture 1.0, faint S2,
    low dose): the sites there stay near their columns -- the local shrinkage towards the
    neighbours' prediction and the robust prediction keep texture peaks from dragging them
    (before: 56 of 296 sites under the patches more than 0.25 nn off, on these two seeds; 25 with
    those two; 12 since the nodes where the peaks around scatter far more than elsewhere take the
    wider fit's prediction, ``sitelattice.ROUGH_RATIO``)."""
    far = n = 0
    for seed in (1, 2):
        s = make_mos2(shape=(512, 512), seed=seed, rotation_deg=7.0, chalcogen_scale=0.45, contamination=3,
                      contamination_radius_nn=4.0, contamination_level=0.6, contamination_texture=1.0,
                      dose=60.0, rates=(0.03, 0.02, 0.02, 0.01))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = find_sites(s.image)
        nn = s.meta["nn_px"]
        ij = np.clip(np.round(s.truth[:, 1::-1]).astype(int), 0, 511)
        under = s.contamination_mask[ij[:, 0], ij[:, 1]]
        d, _ = cKDTree(t.xy).query(s.truth[under, :2])
        far += int((d > 0.25 * nn).sum())
        n += int(under.sum())
        d_all, _ = cKDTree(t.xy).query(t.xy, k=2)
        assert (d_all[:, 1] < 0.5 * nn).sum() == 0
    assert far <= 0.06 * n, (far, n)


def test_two_nodes_sites_are_never_half_a_spacing_apart():
    """_separate: of two sites closer than dmin the one farther from its prediction goes there; one
    already at its prediction (or without one) and still too close is dropped."""
    from stemfast.sitelattice import _separate

    xy = np.array([[0.0, 0.0], [4.0, 0.0], [30.0, 0.0], [33.0, 0.0], [60.0, 0.0]])
    pred = np.array([[0.5, 0.0], [10.0, 0.0], [30.0, 0.0], [33.0, 0.0], [60.0, 0.0]])
    out, keep = _separate(xy.copy(), pred, 5.0)
    np.testing.assert_array_equal(out[1], [10.0, 0.0])  # pulled to its column's place
    np.testing.assert_array_equal(out[0], xy[0])
    assert keep.tolist() == [True, True, True, False, True] or keep.tolist() == [True, True, False, True, True]
    assert not keep[2:4].all()
    d, _ = cKDTree(out[keep]).query(out[keep], k=2)
    assert d[:, 1].min() >= 5.0


@pytest.mark.parametrize("weighted", [False, True])
def test_local_fit_is_the_least_squares_fit_of_each_nodes_neighbours(weighted):
    """_local_fit's grid sums against a direct weighted least-squares fit per node."""
    from stemfast.sitelattice import _local_fit

    rng = np.random.default_rng(11)
    S = np.array([[10.0, 0.4], [4.7, 8.9]])
    ij = np.array([(p, q) for p in range(-6, 7) for q in range(-5, 6)])
    xy = ij @ S + rng.normal(0, 0.4, ij.shape)
    w_peak = rng.random(len(ij)) < 0.85
    weight = rng.uniform(0.2, 1.0, len(ij)) if weighted else None
    fit_radius, min_points = 2.05, 5
    basis, rms, centre = _local_fit(ij, xy, w_peak, S, fit_radius, min_points, need_rms=True, weight=weight)
    wts = w_peak * (1.0 if weight is None else weight)
    for n in range(len(ij)):
        d = ij - ij[n]
        near = (d[:, 0] ** 2 + d[:, 1] ** 2 + d[:, 0] * d[:, 1] <= fit_radius ** 2 + 1e-9) & (d != 0).any(1) & w_peak
        if near.sum() < min_points:
            assert np.isnan(centre[n]).all() and np.isnan(rms[n]) and np.array_equal(basis[n], S)
            continue
        A = np.c_[np.ones(near.sum()), d[near]]                  # xy = c + dp * b1 + dq * b2
        sw = np.sqrt(wts[near])[:, None]
        sol, *_ = np.linalg.lstsq(A * sw, xy[near] * sw, rcond=None)
        np.testing.assert_allclose(centre[n], sol[0], atol=1e-8)
        np.testing.assert_allclose(basis[n], sol[1:], atol=1e-8)
        res = xy[near] - A @ sol
        np.testing.assert_allclose(rms[n], np.sqrt((wts[near][:, None] * res ** 2).sum() / wts[near].sum()), atol=1e-7)


@pytest.mark.parametrize("few", [True, False])
@pytest.mark.parametrize("fit_radius", [2.05, 4.0])
def test_node_grid_sums_are_the_grids_correlation_at_the_nodes_bit_for_bit(fit_radius, few, monkeypatch):
    """_NodeGrid.sums reads each node's neighbourhood only at the nodes; it gives exactly what the
    correlation of the whole grid (scipy.ndimage.correlate, zero outside) gives there, so the local
    fits do not move by a bit -- both for few nodes (all sums at once per cell) and for many (sum by
    sum). Nodes scattered with gaps and a duplicate (the last value counts)."""
    from scipy import ndimage

    from stemfast import sitelattice
    from stemfast.sitelattice import _fit_kernels, _kernel_plans, _NodeGrid

    monkeypatch.setattr(sitelattice, "_FEW_NODES", 10 ** 9 if few else 0)

    rng = np.random.default_rng(5)
    ij = np.array([(p, q) for p in range(-9, 10) for q in range(-7, 12) if rng.random() < 0.8])
    ij = np.concatenate([ij, ij[:1]])
    values = rng.normal(0, 30, len(ij)) * (rng.random(len(ij)) < 0.9)
    r, kernels = _fit_kernels(fit_radius)
    kernels = kernels + [rng.normal(size=kernels[0].shape) * kernels[0]]  # any weights on the footprint
    grid = _NodeGrid(ij, r, _kernel_plans(kernels))
    other = rng.normal(0, 5, len(ij))
    got, got_other = grid.sums((values, len(kernels)), (other, 3))  # two value arrays read at once
    for vals, sums in ((values, got), (other, got_other)):
        dense = np.zeros(grid.shape)
        dense[grid.rows, grid.cols] = vals
        for k, g in zip(kernels, sums):
            ref = ndimage.correlate(dense, k, mode="constant", cval=0.0)[grid.rows, grid.cols]
            np.testing.assert_array_equal(g, ref)
    assert len(got_other) == 3
    assert got[0][0] == got[0][-1]  # the duplicate node reads the same neighbourhood


def test_phase_map_never_blends_across_a_cut_of_its_unwrapping():
    """Where two lattice singularities (dislocations, noise) force the unwrapped Bragg phase to jump
    by a whole turn between two cells, a point between them lies on one lattice, not between two:
    its lattice coordinates are those of either side (mod 1), its predicted node sits on a column,
    and the local reciprocal vectors there are the lattice's, not the jump's."""
    from stemfast.braggring import metal_reciprocal_lattice
    from stemfast.phasemap import PhaseMap

    img = make_mos2(shape=(192, 192), seed=3).image
    pm = PhaseMap(img, metal_reciprocal_lattice(img).g)
    rng = np.random.default_rng(0)
    xy = rng.uniform(20, 172, (400, 2))
    u_ref = pm.coords(xy)
    g_ref = pm.local_g(xy)
    cut = PhaseMap.__new__(PhaseMap)
    cut.__dict__.update(pm.__dict__)
    cut.phase = pm.phase.copy()
    j = pm.phase.shape[2] // 2
    cut.phase[1, :, j:] += 2 * np.pi  # a cut along the column of cells j
    u = cut.coords(xy)
    frac = (u - u_ref + 0.5) % 1.0 - 0.5
    assert np.abs(frac).max() < 1e-9  # a whole turn or nothing, never a blend
    assert np.allclose(cut.local_g(xy), g_ref)
    # a node predicted next to the cut lies where the lattice has it (one side or the other)
    near = np.abs((xy[:, 0] - cut.origin) / cut.step[1] - j + 0.5) < 0.5
    assert near.sum() > 5
    back = cut.positions(np.round(u[near]))
    assert np.abs((pm.coords(back) + 0.5) % 1.0 - 0.5).max() < 0.05


def test_crowded_regions_are_located_and_lines_named_with_their_direction():
    """``crowding`` lists where the crowded sites lie: a doubled stripe across the scan lines is one
    region, a line at its angle (named in the warning), a doubled band of rows a line along the scan
    lines; scattered crowding forms no region."""
    from stemfast.crowding import crowding

    g = np.array([(i + 0.5 * (j % 2), j * np.sqrt(3) / 2) for i in range(40) for j in range(46)]) * 10.0
    shape = (400, 400)
    # a stripe 30 deg from the rows through the centre, every column in it doubled
    d = np.abs(-(g[:, 0] - 200.0) * np.sin(np.radians(30)) + (g[:, 1] - 200.0) * np.cos(np.radians(30)))
    stripe = (d < 9.0) & (np.abs(g[:, 0] - 200.0) < 150.0)
    c = crowding(np.r_[g, g[stripe] + [2.0, 0.0]], shape)
    assert len(c["regions"]) == 1 and c["regions"][0]["n"] == 2 * stripe.sum(), c["regions"]
    r = c["regions"][0]
    assert r["aspect"] >= 3.0 and abs(r["angle_deg"] - 30.0) < 5.0, r
    assert r["x"][0] <= g[stripe, 0].min() and r["x"][1] >= g[stripe, 0].max()
    assert "a line 30 deg from the scan lines" in c["warning"], c["warning"]
    band = (g[:, 1] >= 150) & (g[:, 1] <= 175)
    c = crowding(np.r_[g, g[band] + [2.0, 0.0]], shape)
    assert "a line along the scan lines" in c["warning"] and "rows" in c["warning"], c["warning"]
    some = np.random.default_rng(0).choice(len(g), len(g) // 40, replace=False)  # scattered over the image
    spread = crowding(np.r_[g, g[some] + [2.0, 0.0]], shape)
    assert "warning" in spread and spread["regions"] == [] and " x " not in spread["warning"], spread


@pytest.mark.parametrize("side, pixel_size_A", [(144, None), (192, 0.09)], ids=["15px-in-144", "20px-in-192"])
def test_a_small_image_gets_the_site_lattice_not_its_sqrt3_denser_superlattice(side, pixel_size_A):
    """In an image under ~12 site spacings wide, the first Bragg ring lies too near the spectrum's
    centre to be read and the second ({110}) looks like the first: its lattice, sqrt(3) denser, holds
    every column on one third of its nodes (three times too many sites, every check of the lattice
    passing). The columns show it, and the lattice is found again from the first ring."""
    over = {} if pixel_size_A is None else {"pixel_size_A": pixel_size_A}
    full = make_mos2(shape=(512, 512), seed=2 if pixel_size_A is None else 4, **over)
    nn = full.meta["nn_px"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = find_sites(np.ascontiguousarray(full.image[:side, :side]))
    assert abs(t.meta["spacing_px"] / nn - 1) < 0.03
    assert "{110}->{100}" in t.meta["lattice"]["ring_note"]
    # the re-read lattice is judged by the same six spots against their annulus away from them (the
    # whole annulus, which they fill on a small spectrum, read ~10 and a confidence of 0.61)
    assert t.meta["lattice"]["ring_prominence"] > 20 and t.meta["lattice"]["confidence"] > 0.9, t.meta["lattice"]
    inner = np.all((t.xy > nn) & (t.xy < side - 1 - nn), axis=1)
    expected = (side - 1 - 2 * nn) ** 2 / (np.sqrt(3) / 2 * nn ** 2)
    assert 0.85 < inner.sum() / expected < 1.15  # one site per node of the site lattice, not three


def test_a_strip_too_narrow_for_the_lattice_has_none_and_no_site_outside_it():
    """A 48 px high strip of a 15 px lattice: the spectrum's six brightest spots near its first ring
    are no hexagon (radii 2x apart) -- no lattice, instead of a 437 px one with sites outside the
    image."""
    from stemfast.braggring import metal_reciprocal_lattice

    strip = make_mos2(shape=(48, 1024), seed=2).image.astype(np.float32)
    assert metal_reciprocal_lattice(strip) is None
    with pytest.warns(NoLatticeWarning, match="no hexagonal ring"):
        t = find_sites(strip)
    assert len(t) == 0 and t.meta["status"] == "no lattice"
    assert "short side, 48 px" in t.meta["reason"]  # the message says why, for summary.json and the report


def test_mose2_names_its_brighter_se2_pairs_the_chalcogen_by_default():
    """HAADF Z-contrast makes a Se2 pair (2 x Z 34) brighter than a Mo column (Z 42) on MoSe2, unlike
    MoS2, WS2 and WSe2: with ``material="mose2"`` the default naming follows the material (the
    brightest sublattice is the chalcogen), so no Se site is called Mo; ``chalcogen_brighter``
    given explicitly still decides."""
    from stemfast.materials import CHALCOGEN, METAL, get_material

    assert [get_material(m).chalcogen_brighter_haadf for m in ("mos2", "ws2", "mose2", "wse2")] == [
        False, False, True, False]
    s = make_mos2(shape=(384, 384), seed=5, a_A=3.288, chalcogen_scale=3.6)  # Se2 ~1.5 x Mo
    T = s.truth
    agree = {}
    for cb in (None, False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = find_sites(s.image, settings=SiteSettings(material="mose2", chalcogen_brighter=cb))
        d, j = cKDTree(T[:, :2]).query(t.xy)
        ok = (d < 2) & (T[j, 3] == 0) & np.isin(T[j, 2], [METAL, CHALCOGEN])
        agree[cb] = float((np.asarray(t["sublattice"])[ok] == T[j[ok], 2]).mean())
        assert t.meta["chalcogen_brighter"] is (cb is None)
    assert agree[None] > 0.98 and agree[False] < 0.1


@pytest.mark.parametrize("seed", [0, 1])
def test_a_ring_read_from_a_higher_order_family_is_reread_from_the_spots_inside_it(seed):
    """Compressed to 0.65 along y at 0 deg (~55 % anisotropic), the true first ring's spots are a
    third off a regular hexagon, and a higher-order family was taken as the ring: 4x / 8x the site
    density, no warning. Its spots inside the ring sit at rational points of its basis (1/4, 1/8) and
    give the true lattice back."""
    from scipy import ndimage

    from stemfast.braggring import metal_reciprocal_lattice, site_spacing

    s = make_mos2(shape=(512, 512), seed=seed, rotation_deg=0.0)
    sc = 0.65
    M = np.array([[1 / sc, 0.0], [0.0, 1.0]])
    c = np.array(s.image.shape) / 2
    img = ndimage.affine_transform(s.image, M, offset=c - M @ c, order=1, mode="reflect")
    ring = metal_reciprocal_lattice(img)
    assert "spots inside the ring" in ring.note
    # the metal cell the compression makes: the true cell's area times 0.65
    a = s.meta["nn_px"] * np.sqrt(3)
    assert abs(1.0 / abs(np.linalg.det(ring.g)) / (np.sqrt(3) / 2 * a ** 2 * sc) - 1) < 0.03
    assert abs(site_spacing(ring.g) / (s.meta["nn_px"] * np.sqrt(sc)) - 1) < 0.06
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = find_sites(img)
    nn = s.meta["nn_px"] * np.sqrt(sc)
    inner = np.all((t.xy > 20) & (t.xy < 491), axis=1).sum()
    assert 0.9 < inner / (471 ** 2 / (np.sqrt(3) / 2 * nn ** 2)) < 1.1


@pytest.mark.parametrize("sc, hint", [(0.75, 1.0), (0.65, 1.0), (0.65, None)])
def test_a_given_spacing_on_a_strongly_distorted_scan_still_gets_the_lattice(sc, hint):
    """With the spacing given, the ring is looked for at it; on a strongly distorted scan its spots lie
    off a regular hexagon there, and the given (right) spacing gave "no lattice" where the search
    without it succeeds. ``hint`` None: the undistorted spacing given, 1.3-1.5x off -- the image's
    lattice still, and the difference said."""
    from scipy import ndimage

    s = make_mos2(shape=(512, 512), seed=0, rotation_deg=0.0 if sc == 0.65 else 41.0)
    M = np.array([[1 / sc, 0.0], [0.0, 1.0]])
    c = np.array(s.image.shape) / 2
    img = ndimage.affine_transform(s.image, M, offset=c - M @ c, order=1, mode="reflect")
    nn = s.meta["nn_px"] * np.sqrt(sc)  # the spacing of a regular lattice of the same cell area
    given = nn if hint else s.meta["nn_px"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = find_sites(img, settings=SiteSettings(spacing=float(given)))
    assert t.meta["status"] == "ok"
    inner = np.all((t.xy > 20) & (t.xy < 491), axis=1).sum()
    assert 0.9 < inner / (471 ** 2 / (np.sqrt(3) / 2 * nn ** 2)) < 1.1
    said = " ".join(t.meta["lattice"]["unsure"])
    assert ("the given spacing" in said) == (hint is None)


def test_a_spacing_given_sqrt3_too_small_is_said_by_name():
    """A spacing sqrt(3) too small picks the {110} ring; the sites follow the given spacing (3x as
    many), and the note now says what the spots inside that ring give. The right spacing: no note."""
    s = make_mos2(shape=(384, 384), seed=4, rotation_deg=21.0)
    nn = s.meta["nn_px"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrong = find_sites(s.image, settings=SiteSettings(spacing=nn / np.sqrt(3)))
        right = find_sites(s.image, settings=SiteSettings(spacing=nn))
    said = [u for u in wrong.meta["lattice"]["unsure"] if "strong spots inside it" in u]
    assert len(said) == 1
    assert abs(float(said[0].split("coarser lattice of ")[1].split(" px")[0]) / nn - 1) < 0.03
    assert not [u for u in right.meta["lattice"]["unsure"] if "inside it" in u]


def test_inner_spot_reread_leaves_a_first_ring_alone():
    """An undistorted lattice: nothing strong inside its first ring, the ring is returned as found."""
    from stemfast import braggring

    s = make_mos2(shape=(384, 384), seed=2, rotation_deg=23.0)
    calls = []
    orig = braggring._inner_spots_reread

    def spy(*a):
        r = orig(*a)
        calls.append(r is a[3])
        return r

    braggring._inner_spots_reread = spy
    try:
        ring = braggring.metal_reciprocal_lattice(s.image)
    finally:
        braggring._inner_spots_reread = orig
    assert calls == [True] and "inside" not in ring.note
    assert abs(ring.spacing / s.meta["nn_px"] - 1) < 0.05


def test_a_rectangular_modulation_inside_the_ring_is_no_coarser_lattice():
    """A multiplicative cos x cos modulation (a moire-like texture) puts four strong spots inside the
    ring, a rectangle that passes for a distorted hexagon with two of its six spots empty; judged on
    the median spot, a 5 px lattice became a 14.8 px one. Every spot must stand out."""
    from stemfast.braggring import metal_reciprocal_lattice

    nn = 5.0
    s = make_mos2(shape=(512, 512), pixel_size_A=3.16 / np.sqrt(3) / nn, seed=3, rotation_deg=58.85,
                  chalcogen_scale=0.5, dose=100.0, column_sigma_A=0.45)
    yy, xx = np.mgrid[:512, :512]
    img = s.image * (1 + 0.4 * np.cos(2 * np.pi * xx / (nn * 7.3)) * np.cos(2 * np.pi * yy / (nn * 6.1)))
    ring = metal_reciprocal_lattice(img)
    assert "inside" not in ring.note
    assert abs(ring.spacing / s.meta["nn_px"] - 1) < 0.05


def test_integer_lattice_basis_and_hexagonal_basis():
    from stemfast.braggring import _hexagonal_basis, _integer_lattice_basis

    B = _integer_lattice_basis([(8, 0), (0, 8), (3, 1)])  # index 8 over 8 Z^2: the lattice Z (3, 1) + 8 Z^2
    assert B.tolist() == [[1, 3], [0, 8]] and np.isclose(abs(np.linalg.det(B)), 8)
    for v in [(8, 0), (0, 8), (3, 1), (1, 3)]:  # (1, 3) = 3 (3, 1) - (8, 0)
        c = np.linalg.solve(B.T, np.array(v, float))
        assert np.allclose(c, np.round(c))
    g = np.array([[0.05, 0.0], [-0.025, 0.0433]])  # 120 degrees apart
    H = _hexagonal_basis(np.array([[0.05, 0.0], [0.075, 0.0433]]), g)  # the same lattice, another basis
    assert np.isclose(abs(np.linalg.det(H)), abs(np.linalg.det(g)))
    assert H[0] @ H[1] < 0 and np.sign(np.linalg.det(H)) == np.sign(np.linalg.det(g))
    assert np.allclose(np.linalg.norm(H, axis=1), 0.05, atol=1e-4)


@pytest.mark.parametrize("seed, rot", [(0, 41.0), (1, 17.0)])
def test_a_strongly_scan_distorted_image_gets_its_site_lattice(seed, rot):
    """A lattice compressed to 0.75 along the scan's slow axis (~33 % anisotropic): the Bragg ring's
    spots lie far off a regular hexagon, the sqrt(3)-denser superlattice was taken, and its hollow
    third collected a quarter of the columns -- three times the sites, no warning. Now one site per
    node (density within 10 %)."""
    from scipy import ndimage

    s = make_mos2(shape=(512, 512), seed=seed, rotation_deg=rot)
    sc = 0.75
    M = np.array([[1 / sc, 0.0], [0.0, 1.0]])
    c = np.array(s.image.shape) / 2
    img = ndimage.affine_transform(s.image, M, offset=c - M @ c, order=1, mode="reflect")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = find_sites(img)
    nn = s.meta["nn_px"] * np.sqrt(sc)  # the spacing of a regular lattice of the same cell area
    inner = np.all((t.xy > 20) & (t.xy < 491), axis=1).sum()
    assert 0.9 < inner / (471 ** 2 / (np.sqrt(3) / 2 * nn ** 2)) < 1.1


_PLACED = "no column was found on"


def _finer_ring_images():
    """Synthetic images whose strongest Bragg ring is a {200} one and whose first ring is hard to read:
    a 64 x 512 strip of a 9 px lattice (the first ring too near the spectrum's centre along the short
    side); 256 px and 192 px images of 14.6 and 18.6 px lattices half covered by contamination
    textured at the metal spacing, with a hole (the second at a dose of 20). The last two were drawn
    by a random probe of real-data traits (docs/RESULTS.md, round 40) and are kept exactly: images
    next to them take the ring search other ways (through the {110} re-read, or to no lattice)."""
    return {
        "strip": make_mos2(shape=(64, 512), seed=0, pixel_size_A=3.16 / np.sqrt(3) / 9),
        "contaminated": make_mos2(shape=(256, 256), seed=0, pixel_size_A=0.12535203636024247,
                                  rotation_deg=2.4584114361716813, chalcogen_scale=0.31156934486997034,
                                  contamination=2, contamination_radius_nn=4.25308095680109,
                                  contamination_level=0.9302044618221774, holes=1, dose=50.0,
                                  illumination_gradient=0.3647482804919992, scan_streaks=3),
        "low dose": make_mos2(shape=(192, 192), seed=17, pixel_size_A=0.09782772498377677,
                              rotation_deg=2.5840133140922505, chalcogen_scale=0.8758943961270513,
                              contamination=6, contamination_radius_nn=4.319215941112411,
                              contamination_level=0.20796364864583358, holes=1, dose=20.0,
                              illumination_gradient=0.03931501858281994, scan_streaks=2),
    }


@pytest.mark.parametrize("kind", ["strip", "contaminated", "low dose"])
def test_a_lattice_read_2x_too_fine_is_read_again_from_the_ring_inside(kind):
    """The ring search takes the {200} ring: a site lattice 2x too fine, its columns on one of its four
    cosets (p mod 2, q mod 2) and ~70-80 % of even its best-found class placed by the lattice. Read
    again from the ring at half the frequency, the lattice is a 2H one (its metal class found, its
    hollow class placed) at the right spacing. Before, all three were read at half the spacing with no
    word on it."""
    s = _finer_ring_images()[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = find_sites(s.image)
    lat = t.meta["lattice"]
    assert abs(lat["spacing_fit_px"] / s.meta["nn_px"] - 1) < 0.03, (lat["spacing_fit_px"], s.meta["nn_px"])
    assert "{200}->{100}" in lat["ring_note"]
    assert lat["best_sublattice_placed"] < 0.25 and not any(_PLACED in u for u in lat["unsure"])


@pytest.mark.parametrize("kind", ["strip", "contaminated"])
def test_a_lattice_finer_than_the_crystals_is_never_silent(kind, monkeypatch):
    """Without the re-read (as where it fails), the 2x too fine lattice is said to be uncertain, with
    the reason: even its best-found sublattice is mostly placed by the lattice."""
    import stemfast.sites as S

    monkeypatch.setattr(S, "_too_fine", lambda idx, spacing: None)
    s = _finer_ring_images()[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lat = find_sites(s.image).meta["lattice"]
    assert abs(lat["spacing_px"] / s.meta["nn_px"] - 0.5) < 0.05
    assert lat["best_sublattice_placed"] > 0.5 and any(_PLACED in u for u in lat["unsure"]), lat["unsure"]


def test_a_given_spacing_half_the_crystals_is_flagged_by_its_empty_sublattices(clean_image):
    """The lattice at half the spacing, forced by ``spacing=``: a column on every fourth node, on all
    three sublattices; the right lattice has its best sublattice found whole."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        right = find_sites(clean_image.image).meta["lattice"]
        half = find_sites(clean_image.image, spacing=clean_image.meta["nn_px"] / 2).meta["lattice"]
    assert right["best_sublattice_placed"] < 0.05 and not any(_PLACED in u for u in right["unsure"])
    assert half["best_sublattice_placed"] > 0.5 and any(_PLACED in u for u in half["unsure"])


def test_a_small_image_whose_spectrum_has_no_clear_peak_is_read_at_a_given_spacing():
    """A clean 128 px image of an 11 px lattice: the radial spectrum's window around its first ring
    holds few bins, the sqrt(3) ring's among them, so the profile's peak reads 3.1 < 4 and no lattice is
    looked for. The reason says to give the spacing; given, the ring at that spacing is read (the
    profile is not asked). Noise given a spacing stays without a lattice."""
    s = make_mos2(shape=(128, 128), seed=110, pixel_size_A=3.16 / np.sqrt(3) / 11.0, rotation_deg=17.0)
    with pytest.warns(NoLatticeWarning, match=r"no lattice period in the power spectrum.*give the spacing \(--spacing\)"):
        t = find_sites(s.image)
    assert len(t) == 0 and "lattice" not in t.meta
    t = find_sites(s.image, spacing=round(s.meta["nn_px"], 1))
    lat = t.meta["lattice"]
    assert abs(lat["spacing_px"] / s.meta["nn_px"] - 1) < 0.01 and not lat["unsure"]
    truth = s.truth[:, :2]
    d, _ = cKDTree(t.xy).query(truth[np.all((truth > 8) & (truth < 120), axis=1)])
    assert (d < 0.3 * s.meta["nn_px"]).mean() > 0.98
    noise = np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32)
    with pytest.warns(NoLatticeWarning, match="no lattice period.*no hexagon of Bragg spots at the given spacing"):
        assert len(find_sites(noise, spacing=10.0)) == 0
    # a hexagon found at the given spacing but too weak to take: the reason says how weak
    faint = make_mos2(shape=(128, 128), seed=7, dose=3.0)
    with pytest.warns(NoLatticeWarning, match=r"the hexagon of Bragg spots at the given spacing stands out by "
                                              r"[0-7]\.\d < 8"):
        assert len(find_sites(faint.image, spacing=faint.meta["nn_px"])) == 0


def test_a_small_clean_ring_is_judged_against_its_annulus_off_its_spots():
    """On a small spectrum the six spots fill much of their ring's annulus, so its median was a spot's
    power and a clean lattice read as a weak ring. The ring is now judged (and reported) against the
    annulus away from its spots; which ring is picked is unchanged. Noise's rings stay weak."""
    from stemfast.braggring import metal_reciprocal_lattice

    for size, nn in ((128, 10.0), (128, 12.0), (192, 18.0)):
        s = make_mos2(shape=(size, size), seed=int(nn * 10), pixel_size_A=3.16 / np.sqrt(3) / nn, rotation_deg=17.0)
        ring = metal_reciprocal_lattice(s.image)
        assert ring.prominence_off_spots > 1.4 * ring.prominence  # 16 -> 257, 5.8 -> 8.9, 6.1 -> 8.8
        t = find_sites(s.image)
        lat = t.meta["lattice"]
        assert abs(lat["spacing_px"] / s.meta["nn_px"] - 1) < 0.01
        assert lat["ring_prominence"] == pytest.approx(ring.prominence_off_spots, rel=1e-3)
        assert not any(u.startswith("weak Bragg ring") for u in lat["unsure"]), lat["unsure"]
    from scipy import ndimage

    noise = ndimage.gaussian_filter(np.random.default_rng(4).normal(size=(64, 64)), 3).astype(np.float32)
    ring = metal_reciprocal_lattice(noise)  # six smooth-noise maxima that pass for a hexagon
    assert ring is not None and ring.standout < 8.0


def test_a_part_of_the_image_without_lattice_neither_names_the_sublattices_nor_is_judged():
    """60 % of the image is flat noise at the film's brightness (amorphous film, contamination): the
    phase map's amplitude, relative to its image-wide median, is relative to that noise there, so the
    lattice was extrapolated over it with noise peaks on its nodes, those ~0-valued sites decided
    which coset is the metal (Mo and S2 swapped on the real lattice), and nothing was said. The
    sites there are now not judged, the lattice is said to be uncertain, and the sublattices are
    named where the lattice is seen."""
    s = make_mos2(shape=(256, 320), seed=1, rotation_deg=14)
    img = s.image.copy()
    c = 128
    img[:, c:] = np.random.default_rng(1).poisson(s.image.mean(), size=(256, 320 - c))
    with pytest.warns(LatticeUncertainWarning, match="lie where the image shows no lattice"):
        t = find_sites(img)
    lat = t.meta["lattice"]
    assert lat["lattice_free"]["share"] > 0.4
    nn = s.meta["nn_px"]
    film = t.xy[:, 0] < c - nn
    truth = s.truth[s.truth[:, 0] < c - nn]
    d, j = cKDTree(truth[:, :2]).query(t.xy[film])
    ok = d < 0.35 * nn
    assert ok.mean() > 0.95 and (np.asarray(t["sublattice"])[film][ok] == truth[j[ok], 2]).mean() > 0.98
    free = t.xy[:, 0] > c + 2 * nn
    assert not np.asarray(t["observed"], bool)[free].any()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = find_sites(s.image)
    assert "lattice_free" not in whole.meta["lattice"] and np.asarray(whole["observed"], bool).mean() > 0.9
