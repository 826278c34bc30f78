"""Tests of stemfast.synthetic: geometry, defects, intensities, artefacts, stacks, files."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from stemfast.synthetic import (
    SynthConfig,
    load_truth,
    make_lattice,
    make_mos2,
    render_gaussians,
    save_example,
    save_truth,
)

S1 = (16 / 42) ** 1.7  # one S atom relative to Mo


def _clean(**kw):
    """Noise-free render without background/texture: only the atoms."""
    base = dict(noise=False, background=0.0, texture=0.0)
    base.update(kw)
    return make_mos2(**base)


def _value_at(img, xy):
    """Bilinear image value at sub-pixel positions."""
    return ndimage.map_coordinates(img.astype(np.float64), [xy[:, 1], xy[:, 0]], order=1)


def _refine_peaks(img, thresh):
    """Local maxima above ``thresh``, refined by a 3-point parabola on log intensity (exact for a
    sampled Gaussian)."""
    mx = ndimage.maximum_filter(img, size=5, mode="constant", cval=np.inf)
    ys, xs = np.nonzero((img == mx) & (img > thresh))
    ok = (xs > 0) & (ys > 0) & (xs < img.shape[1] - 1) & (ys < img.shape[0] - 1)
    xs, ys = xs[ok], ys[ok]
    L = np.log(np.maximum(img.astype(np.float64), 1e-30))

    def vertex(m, c, p):
        return 0.5 * (m - p) / (m - 2 * c + p)

    dx = vertex(L[ys, xs - 1], L[ys, xs], L[ys, xs + 1])
    dy = vertex(L[ys - 1, xs], L[ys, xs], L[ys + 1, xs])
    return np.c_[xs + dx, ys + dy]


# ---------------------------------------------------------------------------------------------
def test_defaults_and_meta_format():
    s = make_mos2(shape=(128, 160), seed=1)
    assert s.image.shape == (128, 160) and s.image.dtype == np.float32
    assert s.truth.dtype == np.float64 and s.truth.shape[1] == 4
    assert set(np.unique(s.truth[:, 2])) <= {0.0, 1.0, 2.0}
    assert set(np.unique(s.truth[:, 3])) <= {0.0, 1.0, 2.0, 3.0, 4.0}
    cfg = SynthConfig()
    assert s.meta["nn_px"] == pytest.approx(cfg.a_A / math.sqrt(3) / cfg.pixel_size_A)
    assert s.meta["pixel_size_A"] == cfg.pixel_size_A
    assert s.meta["intensity_S2_over_Mo"] == pytest.approx(2 * 16**1.7 / 42**1.7)
    json.dumps(s.meta)  # JSON-serialisable
    # all truth sites lie inside the image
    assert (s.truth[:, 0] >= 0).all() and (s.truth[:, 0] <= 159).all()
    assert (s.truth[:, 1] >= 0).all() and (s.truth[:, 1] <= 127).all()
    assert s.hole_mask.shape == s.contamination_mask.shape == (128, 160)
    assert not s.hole_mask.any() and not s.contamination_mask.any()


def test_config_validation():
    with pytest.raises(ValueError):
        SynthConfig(shape=(8, 8))
    with pytest.raises(ValueError):
        SynthConfig(rates=(0.6, 0.5, 0.0, 0.0))
    with pytest.raises(ValueError):
        SynthConfig(dose=0)
    with pytest.raises(TypeError):
        make_mos2(shape=(64, 64), no_such_field=1)
    cfg = SynthConfig(rates={"v_mo": 0.2})
    assert cfg.rates == (0.03, 0.01, 0.2, 0.005)


def test_truth_counts_match_lattice_geometry():
    cfg = SynthConfig(shape=(512, 512), pixel_size_A=0.2)
    s = make_mos2(cfg, noise=False)
    n = np.bincount(s.truth[:, 2].astype(int), minlength=3)
    # Mo : S2 : hollow = 1 : 1 : 1 (boundary effects only)
    assert n.min() / n.max() > 0.97
    a_px = cfg.a_A / cfg.pixel_size_A
    expected = 3 * 511 * 511 / (a_px**2 * math.sqrt(3) / 2)  # 3 sites per unit cell
    assert abs(n.sum() - expected) / expected < 0.03
    # nearest-neighbour Mo-S2 spacing is nn_px (jitter 0.03 A = 0.15 px)
    mo = s.truth[s.truth[:, 2] == 0, :2]
    s2 = s.truth[s.truth[:, 2] == 1, :2]
    d, _ = cKDTree(s2).query(mo, k=3)  # each Mo has 3 S2 neighbours
    inner = ((mo > 20) & (mo < 490)).all(1)
    assert np.mean(d[inner]) == pytest.approx(s.meta["nn_px"], rel=0.005)


def test_positions_follow_rotation_strain_and_scan_distortion():
    rot, strain, scan = 23.0, (0.02, -0.01, 0.008), (0.01, 0.015)
    s = make_mos2(shape=(256, 256), rotation_deg=rot, strain=strain, scan_distortion=scan,
                  position_jitter_A=0.0, noise=False, seed=3)
    a = 3.16 / 0.12
    t = math.radians(rot)
    R = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    E = np.eye(2) + np.array([[strain[0], strain[2]], [strain[2], strain[1]]])
    D = np.array([[1 + scan[0], scan[1]], [0, 1]])
    M = D @ E @ R @ (a * np.array([[1, 0.5], [0, math.sqrt(3) / 2]]))
    mo = s.truth[s.truth[:, 2] == 0, :2]
    # every Mo + each lattice vector (where inside) is again a Mo site, exactly
    tree = cKDTree(mo)
    for vec in (M[:, 0], M[:, 1]):
        d, _ = tree.query(mo + vec)
        inside = ((mo + vec) >= 1).all(1) & ((mo + vec) <= 254).all(1)
        assert inside.sum() > 20
        assert np.max(d[inside]) < 1e-6
    # S2 at M @ (1/3, 1/3), hollow at M @ (2/3, 2/3) from a Mo
    for sub, frac in ((1, 1 / 3), (2, 2 / 3)):
        pts = s.truth[s.truth[:, 2] == sub, :2]
        d, _ = cKDTree(pts).query(mo + M @ [frac, frac])
        inside = ((mo + M @ [frac, frac]) >= 1).all(1) & ((mo + M @ [frac, frac]) <= 254).all(1)
        assert np.max(d[inside]) < 1e-6


def test_defect_rates_within_statistics():
    rates = (0.08, 0.04, 0.05, 0.03)
    s = make_mos2(shape=(1024, 1024), pixel_size_A=0.3, rates=rates, noise=False,
                  background=0.0, texture=0.0, seed=11)
    sub, dft = s.truth[:, 2].astype(int), s.truth[:, 3].astype(int)
    n_s2, n_mo = (sub == 1).sum(), (sub == 0).sum()
    assert n_s2 > 5000
    for code, rate, n in ((1, rates[0], n_s2), (2, rates[1], n_s2), (3, rates[2], n_mo), (4, rates[3], n_s2)):
        k = (dft == code).sum()
        sd = math.sqrt(n * rate * (1 - rate))
        assert abs(k - n * rate) < 4 * sd, (code, k, n * rate)
    # defects sit on the right sublattice; hollow sites never carry one
    assert set(np.unique(sub[np.isin(dft, (1, 2, 4))])) == {1}
    assert set(np.unique(sub[dft == 3])) == {0}
    assert (dft[sub == 2] == 0).all()


def test_zero_rates_give_no_defects():
    s = make_mos2(shape=(128, 128), rates=(0, 0, 0, 0), noise=False)
    assert (s.truth[:, 3] == 0).all()


def test_column_intensities_and_vacancies_in_noise_free_render():
    dose = 1000.0
    s = _clean(shape=(384, 384), dose=dose, rates=(0.1, 0.1, 0.1, 0.1), seed=5)
    v = _value_at(s.image, s.truth[:, :2]) / dose
    sub, dft = s.truth[:, 2].astype(int), s.truth[:, 3].astype(int)
    # a sub-pixel offset lowers the sampled value by at most a few %
    assert np.all(v[(sub == 0) & (dft == 0)] > 0.95) and np.all(v[(sub == 0) & (dft == 0)] < 1.0 + 1e-4)
    assert np.all(np.abs(v[(sub == 1) & (dft == 0)] / (2 * S1) - 0.975) < 0.03)
    assert np.all(np.abs(v[dft == 1] / S1 - 0.975) < 0.03)
    assert np.all(v[dft == 4] > 0.95)  # Mo in the S2 column renders like Mo
    for empty in (dft == 2, dft == 3, sub == 2):  # V_S2, V_Mo, hollow: no atom
        assert empty.sum() > 0
        assert np.all(v[empty] < 1e-3)


def test_brightest_maxima_sit_on_mo_truth():
    s = _clean(shape=(256, 256), rotation_deg=17.0, dose=1.0, seed=7)
    peaks = _refine_peaks(s.image, 0.8)
    mo_like = s.truth[((s.truth[:, 2] == 0) & (s.truth[:, 3] == 0)) | (s.truth[:, 3] == 4), :2]
    d, _ = cKDTree(mo_like).query(peaks)
    assert len(peaks) > 50
    assert d.max() < 0.05
    # and every Mo column away from the border is found
    inner = ((mo_like > 3) & (mo_like < 252)).all(1)
    dd, _ = cKDTree(peaks).query(mo_like[inner])
    assert dd.max() < 0.05


def test_holes_have_no_sites_and_vacuum_intensity():
    s = make_mos2(shape=(384, 384), holes=2, hole_radius_nn=3.0, noise=False, seed=2)
    assert s.hole_mask.any()
    assert 0.01 < s.meta["hole_fraction"] < 0.5
    assert len(s.meta["holes"]) == 2
    xi = np.clip(np.round(s.truth[:, 0]).astype(int), 0, 383)
    yi = np.clip(np.round(s.truth[:, 1]).astype(int), 0, 383)
    # no site inside a hole (allow the rounding pixel at the rim)
    inner = ndimage.binary_erosion(s.hole_mask, iterations=2)
    assert not inner[yi, xi].any()
    # vacuum: hole interiors (away from the rim and the tails of edge columns) are ~0,
    # the film around is at background level
    deep = ndimage.binary_erosion(s.hole_mask, iterations=int(4 * s.meta["sigma_px"]) + 2)
    assert deep.sum() > 100
    dose = s.meta["dose"]
    assert s.image[deep].mean() < 0.005 * dose
    film = ~ndimage.binary_dilation(s.hole_mask, iterations=5)
    assert s.image[film].mean() > 0.1 * dose
    # fewer sites than without the holes, the rest unchanged
    ref = make_mos2(shape=(384, 384), holes=0, noise=False, seed=2)
    assert len(ref.truth) > len(s.truth)
    d, _ = cKDTree(ref.truth[:, :2]).query(s.truth[:, :2])
    assert d.max() < 1e-9


def test_holes_with_noise_are_at_read_noise_level():
    s = make_mos2(shape=(256, 256), holes=1, hole_radius_nn=4.0, dose=400.0, gaussian_noise=2.0,
                  seed=4)
    deep = ndimage.binary_erosion(s.hole_mask, iterations=int(4 * s.meta["sigma_px"]) + 2)
    assert deep.sum() > 200
    vals = s.image[deep]
    assert abs(vals.mean()) < 1.0
    assert vals.std() == pytest.approx(0.02 * 400.0, rel=0.15)


def test_contamination_raises_intensity_and_keeps_sites():
    kw = dict(shape=(256, 256), noise=False, seed=9)
    c = make_mos2(contamination=1, contamination_radius_nn=3.0, **kw)
    ref = make_mos2(contamination=0, **kw)
    assert c.contamination_mask.any() and not ref.contamination_mask.any()
    np.testing.assert_array_equal(c.truth, ref.truth)  # sites under contamination are listed
    diff = c.image.astype(np.float64) - ref.image
    assert diff.min() > -1e-3 * c.meta["dose"]
    assert diff[c.contamination_mask].mean() > 0.3 * c.meta["dose"]
    far = ~ndimage.binary_dilation(c.contamination_mask, iterations=40)
    assert np.abs(diff[far]).max() < 1e-3 * c.meta["dose"]


def test_noise_model_poisson_plus_read_noise():
    kw = dict(shape=(256, 256), dose=300.0, gaussian_noise=3.0, seed=12)
    noisy = make_mos2(**kw)
    clean = make_mos2(noise=False, **kw)
    res = noisy.image.astype(np.float64) - clean.image
    read_var = (0.03 * 300.0) ** 2
    assert abs(res.mean()) < 0.5
    lo = clean.image < np.percentile(clean.image, 50)
    hi = clean.image > np.percentile(clean.image, 97)
    for sel in (lo, hi):
        expected_var = clean.image[sel].mean() + read_var
        assert res[sel].var() == pytest.approx(expected_var, rel=0.1)


def test_background_level_like_dev_data():
    s = make_mos2(shape=(384, 384), noise=False, texture=0.0, seed=1)
    hollow = s.truth[s.truth[:, 2] == 2, :2]
    bg = _value_at(s.image, hollow) / s.meta["dose"]
    # mean 0.75 * background, spread 0.15 * background (background = 0.2)
    assert bg.mean() == pytest.approx(0.15, abs=0.03)
    assert 0.01 < bg.std() < 0.06


def test_scan_glitches_and_hot_pixels():
    kw = dict(shape=(128, 128), seed=6)
    g = make_mos2(scan_glitches=2, hot_pixels=4, **kw)
    ref = make_mos2(**kw)
    np.testing.assert_array_equal(g.truth, ref.truth)
    changed_rows = np.nonzero(np.any(g.image != ref.image, axis=1))[0]
    glitch_rows = {r for gl in g.meta["scan_glitches"] for r in range(gl["row"], gl["row"] + gl["rows"])}
    hot_rows = {y for _, y in g.meta["hot_pixels"]}
    assert set(changed_rows) <= glitch_rows | hot_rows
    assert len(glitch_rows & set(changed_rows)) > 0
    for x, y in g.meta["hot_pixels"]:
        if y not in glitch_rows:
            assert g.image[y, x] - ref.image[y, x] > 1.4 * g.meta["dose"]


def test_stack_has_frames_with_drift():
    drift = (0.7, -0.4)
    st = make_mos2(shape=(128, 128), n_frames=4, drift_px_per_frame=drift, seed=8)
    assert st.image.shape == (4, 128, 128) and st.image.dtype == np.float32
    assert st.drift.shape == (4, 2)
    np.testing.assert_allclose(st.drift[3], np.multiply(3, drift))
    assert len(st.truth_frames) == 4
    np.testing.assert_array_equal(st.truth, st.truth_frames[0])
    # the same sites, shifted by the drift
    t0, t3 = st.truth_frames[0], st.truth_frames[3]
    d, i = cKDTree(t0[:, :2] + st.drift[3]).query(t3[:, :2])
    common = d < 1e-9
    assert common.mean() > 0.9
    np.testing.assert_array_equal(t0[i[common], 2:], t3[common, 2:])
    # independent noise, same expected image: noise-free frames are shifted copies
    assert not np.array_equal(st.image[0], st.image[1])
    clean = _clean(shape=(128, 128), n_frames=4, drift_px_per_frame=drift, seed=8, dose=1.0)
    p0, p3 = _refine_peaks(clean.image[0], 0.8), _refine_peaks(clean.image[3], 0.8)
    d, i = cKDTree(p0).query(p3)
    assert (d < 3).sum() > 10
    np.testing.assert_allclose(np.median(p3[d < 3] - p0[i[d < 3]], axis=0), st.drift[3], atol=0.02)
    json.dumps(st.meta)


def test_seed_reproducible():
    a = make_mos2(shape=(96, 96), seed=21, holes=1, contamination=1, scan_glitches=1)
    b = make_mos2(shape=(96, 96), seed=21, holes=1, contamination=1, scan_glitches=1)
    c = make_mos2(shape=(96, 96), seed=22, holes=1, contamination=1, scan_glitches=1)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.truth, b.truth)
    assert a.meta == b.meta
    assert not np.array_equal(a.image, c.image)


def test_render_gaussians_matches_direct_sum():
    rng = np.random.default_rng(0)
    xy = rng.uniform(-5, 45, (30, 2))
    amp = rng.uniform(0.5, 2, 30)
    img = render_gaussians((40, 48), xy, amp, 1.7)
    yy, xx = np.mgrid[0:40, 0:48]
    ref = sum(a * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.7**2)) for (x, y), a in zip(xy, amp))
    np.testing.assert_allclose(img, ref, atol=2e-3 * amp.max())


def test_make_lattice():
    img, xy = make_lattice((128, 96), 10.0, rotation_deg=15.0, seed=1)
    assert img.shape == (128, 96) and img.dtype == np.float32
    assert xy.shape[1] == 2 and len(xy) > 80
    assert ((xy >= 0) & (xy <= [95, 127])).all()
    d, _ = cKDTree(xy).query(xy, k=2)
    np.testing.assert_allclose(d[:, 1], 10.0, atol=1e-9)
    # blob peaks: value at the nearest pixel is the unit Gaussian at that offset
    sigma = 0.15 * 10.0
    ix, iy = np.round(xy[:, 0]).astype(int), np.round(xy[:, 1]).astype(int)
    expect = np.exp(-((ix - xy[:, 0]) ** 2 + (iy - xy[:, 1]) ** 2) / (2 * sigma**2))
    np.testing.assert_allclose(img[iy, ix], expect, atol=1e-3)
    noisy, xy2 = make_lattice((128, 96), 10.0, rotation_deg=15.0, seed=1, noise=0.1)
    np.testing.assert_array_equal(xy, xy2)
    assert (noisy - img).std() == pytest.approx(0.1, rel=0.05)


def test_save_example_and_truth_roundtrip(tmp_path):
    from stemfast.io import find_micrographs, read

    paths = save_example(tmp_path / "ex", n_images=3, size=128, seed=4)
    assert [p.name for p in paths] == [f"mos2_example_0{i}.tif" for i in (1, 2, 3)]
    assert find_micrographs(tmp_path / "ex") == paths  # truth files are not micrographs
    for p in paths:
        mg = read(p)
        truth, meta = load_truth(p.with_name(p.stem + ".truth.npz"))
        assert mg.data.shape == (128, 128)
        assert mg.unit == "nm" and mg.pixel_size == pytest.approx(meta["pixel_size_A"] / 10, rel=1e-6)
        assert truth.shape[1] == 4 and len(truth) > 40
        assert meta["nn_px"] == pytest.approx(meta["a_A"] / math.sqrt(3) / meta["pixel_size_A"])
        # the raw format: np.load(...)['truth'], json.loads(str(np.load(...)['meta']))
        z = np.load(p.with_name(p.stem + ".truth.npz"))
        assert json.loads(str(z["meta"]))["nn_px"] == meta["nn_px"]
    t = np.arange(8.0).reshape(2, 4)
    save_truth(tmp_path / "x.truth.npz", t, {"nn_px": 3.0, "pixel_size_A": 0.1})
    t2, m2 = load_truth(tmp_path / "x.truth.npz")
    np.testing.assert_array_equal(t, t2)
    assert m2 == {"nn_px": 3.0, "pixel_size_A": 0.1}


def test_real_data_traits_are_options_with_the_intended_effect():
    from stemfast.synthetic import make_mos2

    base = make_mos2(shape=(96, 96), seed=4, noise=False, rates=(0, 0, 0, 0))
    # faint chalcogen: the S2 columns' peak scales, the Mo columns' does not
    faint = make_mos2(shape=(96, 96), seed=4, noise=False, rates=(0, 0, 0, 0), chalcogen_scale=0.5)
    t = base.truth
    ij = np.rint(t[:, 1::-1][:, :2]).astype(int)
    inside = (ij >= 2).all(1) & (ij < 94).all(1)
    s2 = inside & (t[:, 2] == 1)
    mo = inside & (t[:, 2] == 0)
    film = float(np.median(base.image[ij[t[:, 2] == 2][:, 0], ij[t[:, 2] == 2][:, 1]]))
    r_s2 = np.median((faint.image - film)[ij[s2, 0], ij[s2, 1]] / (base.image - film)[ij[s2, 0], ij[s2, 1]])
    assert 0.45 < r_s2 < 0.65
    np.testing.assert_allclose(faint.image[ij[mo, 0], ij[mo, 1]], base.image[ij[mo, 0], ij[mo, 1]], rtol=0.05)
    # illumination gradient along +x: the right edge is brighter than the left by about the setting
    grad = make_mos2(shape=(96, 96), seed=4, noise=False, rates=(0, 0, 0, 0), illumination_gradient=0.4,
                     illumination_angle_deg=0.0)
    ratio = grad.image / np.maximum(base.image, 1e-6)
    assert ratio[:, -1].mean() / ratio[:, 0].mean() == pytest.approx(1.2 / 0.8, rel=0.02)
    # scan streaks: whole rows offset, the truth unchanged
    st = make_mos2(shape=(96, 96), seed=4, noise=False, rates=(0, 0, 0, 0), scan_streaks=3, streak_level=0.3)
    diff = np.abs(st.image - base.image).mean(1)
    assert 1 <= (diff > 0.1 * base.meta["dose"]).sum() <= 9
    np.testing.assert_array_equal(st.truth, base.truth)
    with pytest.raises(ValueError):
        make_mos2(shape=(32, 32), chalcogen_scale=-1)


def test_se_implanted_chalcogen_columns_hold_s2_sse_and_se2():
    """``se_fraction``: each chalcogen atom is Se with that probability (an Se-implanted MoS2): the
    chalcogen columns' peaks take three levels, S2 / SSe / Se2 at 0.39 / 0.89 / 1.40 of a Mo column
    (Z^1.7), in binomial shares; the Mo columns, the truth and every other random stream stay as they
    were, and 0 gives the image without it bit for bit."""
    from stemfast.synthetic import make_mos2

    kw = dict(shape=(128, 128), seed=4, noise=False, rates=(0, 0, 0, 0), background=0.0, texture=0.0)
    base, se = make_mos2(**kw), make_mos2(se_fraction=0.5, **kw)
    np.testing.assert_array_equal(make_mos2(se_fraction=0.0, **kw).image, base.image)
    np.testing.assert_array_equal(se.truth, base.truth)
    t = base.truth
    ij = np.rint(t[:, 1::-1]).astype(int)
    inside = (ij >= 3).all(1) & (ij < 125).all(1)
    peak = se.image[ij[:, 0], ij[:, 1]] / base.meta["dose"]
    s2 = peak[inside & (t[:, 2] == 1)]
    levels = np.array([0.39, 0.89, 1.40])
    nearest = np.abs(s2[:, None] - levels[None, :]).argmin(1)
    assert np.abs(s2 - levels[nearest]).max() < 0.08  # every chalcogen column at one of the three levels
    share = np.bincount(nearest, minlength=3) / len(s2)
    np.testing.assert_allclose(share, [0.25, 0.5, 0.25], atol=0.12)
    np.testing.assert_allclose(se.image[ij[inside & (t[:, 2] == 0), 0], ij[inside & (t[:, 2] == 0), 1]],
                               base.image[ij[inside & (t[:, 2] == 0), 0], ij[inside & (t[:, 2] == 0), 1]], rtol=0.05)
    assert se.meta["n_SSe"] + se.meta["n_Se2"] <= se.meta["n_S2"] and se.meta["se_fraction"] == 0.5
    with pytest.raises(ValueError):
        make_mos2(shape=(32, 32), se_fraction=1.5)
