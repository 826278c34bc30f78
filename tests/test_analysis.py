"""Classes and defect scores: stable class order, robust z-scores, sublattice-aware defect ranking."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pytest

from stemfast.analysis import AnalysisSettings, analyze_sites, robust_z
from stemfast.table import SiteTable


@dataclass
class FakeEncoding:
    mu: np.ndarray
    recon_error: np.ndarray
    angle: np.ndarray


def make_sites(n_per=300, seed=0):
    """Three sublattices with intensities 1.0 / 0.4 / 0.0 and latent means clustered per sublattice."""
    rng = np.random.default_rng(seed)
    sub = np.repeat([0, 1, 2], n_per)
    inten = np.array([1.0, 0.4, 0.0])[sub] + rng.normal(0, 0.02, len(sub))
    centres = np.array([[3.0, 0.0], [0.0, 3.0], [-3.0, -3.0]])
    mu = centres[sub] + rng.normal(0, 0.2, (len(sub), 2))
    rec = rng.gamma(4.0, 0.01, len(sub))
    xy = rng.uniform(0, 500, (len(sub), 2))
    return sub, inten, mu, rec, xy


def table(sub, inten, xy):
    return SiteTable({"x": xy[:, 0], "y": xy[:, 1], "intensity": inten, "sublattice": sub,
                      "source": np.where(sub == 2, "lattice", "peak")})


def test_robust_z_ignores_outliers():
    v = np.r_[np.random.default_rng(0).normal(0, 1, 1000), 1e6]
    z = robust_z(v)
    assert abs(np.median(z)) < 0.1
    assert 0.8 < np.median(np.abs(z[:-1])) / 0.6745 < 1.2
    assert z[-1] > 1e5


def test_classes_are_ordered_by_intensity_and_match_sublattices():
    sub, inten, mu, rec, xy = make_sites()
    t, summary = analyze_sites(table(sub, inten, xy), FakeEncoding(mu, rec, np.zeros(len(sub))))
    # class 0 is the brightest, 2 the darkest: here they coincide with the sublattices
    assert (t["class_id"] == sub).mean() > 0.99
    assert summary["n_classes"] == 3
    means = summary["class_mean_intensity"]
    assert means[0] > means[1] > means[2]


def test_sublattice_aware_score_finds_what_a_per_class_score_misses():
    sub, inten, mu, rec, xy = make_sites(seed=1)
    # a substitution: an S2-sublattice site that looks exactly like Mo (intensity and latent)
    i_sub = 400
    inten[i_sub] = 1.0
    mu[i_sub] = [3.0, 0.0]
    # an empty Mo column: looks exactly like a hexagon centre
    i_vac = 10
    inten[i_vac] = 0.0
    mu[i_vac] = [-3.0, -3.0]
    # a half-occupied S2 column
    i_half = 450
    inten[i_half] = 0.2
    t, summary = analyze_sites(table(sub, inten, xy), FakeEncoding(mu, rec, np.zeros(len(sub))))
    top = np.argsort(-t["anomaly_score"])[:3]
    assert set(top.tolist()) == {i_sub, i_vac, i_half}
    assert t["is_defect"][[i_sub, i_vac, i_half]].all()
    assert t["is_defect"].sum() <= 5
    assert t["defect_kind"][i_sub] == "substitution_S"
    assert t["defect_kind"][i_vac] == "vacancy_Mo"
    assert t["defect_kind"][i_half] == "vacancy_S"
    # the per-class reconstruction ranking cannot see them (their patches look normal for their class)
    assert not set(np.argsort(-t["recon_score"])[:3].tolist()) & {i_sub, i_vac}


def test_unobserved_sites_score_zero_and_auto_k():
    sub, inten, mu, rec, xy = make_sites(seed=2)
    obs = np.ones(len(sub), bool)
    obs[:20] = False
    inten[:20] = -5.0  # faded by the scan
    t0 = table(sub, inten, xy).with_columns({"observed": obs})
    t, summary = analyze_sites(t0, FakeEncoding(mu, rec, np.zeros(len(sub))),
                               settings=AnalysisSettings(n_classes=None))
    assert (t["anomaly_score"][:20] == 0).all()
    assert summary["n_classes"] == 3 and summary["k_selection"]["criterion"] == "silhouette"


def test_settings_validation():
    with pytest.raises(ValueError):
        AnalysisSettings(score="nonsense")
    with pytest.raises(ValueError):
        AnalysisSettings(defect_cutoff=0)


# --- local references on a real triangular lattice -------------------------------------------------

from stemfast.analysis import ClassAgreementWarning  # noqa: E402
from stemfast.references import local_references  # noqa: E402


def _triangular_sites(n, spacing):
    """Sites of a triangular lattice in a strip ``x`` in [0, 0.85 (n - 1) spacing]: positions [N, 2],
    colours ``(m - n) mod 3`` (0 metal, 1 chalcogen, 2 hollow) and the per-site basis [N, 2, 2]."""
    a1, a2 = np.array([spacing, 0.0]), np.array([spacing / 2, spacing * np.sqrt(3) / 2])
    mn = np.array([(m, k) for m in range(-n // 2, n) for k in range(n)], float)
    xy = mn @ np.array([a1, a2])
    keep = (xy[:, 0] >= 0) & (xy[:, 0] <= (n - 1) * spacing * 0.85)
    mn, xy = mn[keep], xy[keep]
    colour = ((mn[:, 0] - mn[:, 1]) % 3).astype(np.int64)
    return xy, colour, np.broadcast_to(np.array([a1, a2]), (len(xy), 2, 2)).copy()


def make_lattice(n=42, spacing=10.0, seed=0, noise=0.03):
    """A triangular site lattice (metal 1.0, chalcogen 0.5, hollow 0.0 by colour (m - n) mod 3) under a
    strong illumination gradient and a bright contamination domain that adds to every site in it."""
    rng = np.random.default_rng(seed)
    xy, colour, basis = _triangular_sites(n, spacing)
    level = np.array([1.0, 0.5, 0.0])[colour]
    gradient = 0.5 * xy[:, 0] / xy[:, 0].max()                     # additive background ramp
    contam = 0.3 * (np.hypot(xy[:, 0] - 120, xy[:, 1] - 150) < 60)  # a bright domain
    inten = level * (1.0 + 0.3 * xy[:, 1] / xy[:, 1].max()) + gradient + contam + rng.normal(0, noise, len(xy))
    return xy, colour, inten, basis


def lattice_table(xy, sub, inten, basis, material="mos2"):
    return SiteTable({"x": xy[:, 0], "y": xy[:, 1], "intensity": inten, "sublattice": sub,
                      "a1x": basis[:, 0, 0], "a1y": basis[:, 0, 1], "a2x": basis[:, 1, 0], "a2y": basis[:, 1, 1]},
                     {"material": material})


def centre_site(xy, colour, c, at):
    d = np.hypot(xy[:, 0] - at[0], xy[:, 1] - at[1]) + 1e9 * (colour != c)
    return int(np.argmin(d))


def test_local_references_reject_bad_input():
    xy, colour, inten, basis = make_lattice(n=12)
    with pytest.raises(ValueError):
        local_references(xy, basis[:-1], inten)
    with pytest.raises(ValueError):
        local_references(xy, basis, inten, n_neighbors=3)
    with pytest.raises(ValueError):
        local_references(xy, basis, inten, node_tolerance=0.7)
    with pytest.raises(ValueError):
        local_references(xy[:, :1], basis, inten)


def test_local_sublattice_follows_the_structure_despite_gradient_and_a_slipped_colouring():
    xy, colour, inten, basis = make_lattice()
    refs = local_references(xy, basis, inten, n_neighbors=150)
    rank = refs.rank()
    inner = rank >= 0
    assert inner.mean() > 0.95
    assert (rank[inner] == colour[inner]).mean() > 0.999
    # the image-wide colouring slipped along a stripe (metal labelled chalcogen etc.): the analysis
    # reads the colours off the local lattice and is not fooled
    slipped = colour.copy()
    stripe = (xy[:, 1] > 200) & (xy[:, 1] < 215)
    slipped[stripe] = (colour[stripe] + 1) % 3
    n = len(xy)
    enc = FakeEncoding(np.eye(3)[colour] * 3 + np.random.default_rng(1).normal(0, 0.2, (n, 3)),
                       np.ones(n), np.zeros(n))
    t, summary = analyze_sites(lattice_table(xy, slipped, inten, basis), enc)
    ok = np.asarray(t["sublattice_local"]) >= 0
    assert (np.asarray(t["sublattice_local"])[ok] == colour[ok]).mean() > 0.999
    assert summary["class_sublattice_ari"] > 0.95 and "class_warning" not in summary
    # each class is named for the sublattice it sits on (the brightest class on the metal)
    on = summary["class_sublattice"]
    assert [on[c]["sublattice"] for c in ("0", "1", "2")] == ["Mo", "S2", "hollow"]
    assert min(v["share"] for v in on.values()) > 0.95


def test_local_score_finds_defects_that_gradient_and_contamination_hide_from_a_global_one():
    xy, colour, inten, basis = make_lattice(seed=3)
    vac_x = centre_site(xy, colour, 1, (300, 100))   # one chalcogen missing: 0.5 -> 0.25
    dop = centre_site(xy, colour, 0, (60, 250))        # a lighter dopant on a metal site: 1.0 -> 0.75
    ad = centre_site(xy, colour, 2, (200, 300))        # an adatom at a hexagon centre
    inten[vac_x] -= 0.25
    inten[dop] -= 0.25
    inten[ad] += 0.3
    n = len(xy)
    enc = FakeEncoding(np.eye(3)[colour] * 3 + np.random.default_rng(1).normal(0, 0.2, (n, 3)),
                       np.ones(n), np.zeros(n))
    table_ = lattice_table(xy, colour, inten, basis, material="wse2")
    # by default hexagon centres are not ranked (an atom on top of the film is not a lattice defect)
    t, summary = analyze_sites(table_, enc)
    top = np.argsort(-np.asarray(t["anomaly_score"]))[:2]
    assert set(top.tolist()) == {vac_x, dop}
    assert t["anomaly_score"][ad] == 0 and t["intensity_z"][ad] > 2
    hollow = np.asarray(t["sublattice_local"]) == 2
    assert (np.asarray(t["anomaly_score"])[hollow] == 0).all()
    # hollow_defects=True ranks the adatom too
    t, summary = analyze_sites(table_, enc, settings=AnalysisSettings(hollow_defects=True))
    top = np.argsort(-np.asarray(t["anomaly_score"]))[:3]
    assert set(top.tolist()) == {vac_x, dop, ad}
    assert not t["is_defect"].any() or set(np.flatnonzero(t["is_defect"]).tolist()) <= {vac_x, dop, ad}
    # naming (flag the three: the gradient widens the local spread, so they stay under the default cutoff;
    # and each is the only one of its sublattice, whose tail then reads as noise: sublattice_fdr off)
    t, summary = analyze_sites(table_, enc, settings=AnalysisSettings(defect_cutoff=2.3, hollow_defects=True,
                                                                       sublattice_fdr=False))
    # WSe2 names, never MoS2 ones; a dopant on a metal site is a substitution of the metal
    assert t["defect_kind"][vac_x] == "vacancy_Se"
    assert t["defect_kind"][dop] == "substitution_W"
    assert t["defect_kind"][ad] == "other"
    assert not any("Mo" in k or k.endswith("_S") for k in summary["defect_kinds"])
    # the image-wide sublattice score cannot rank them: the gradient dwarfs them
    tg, _ = analyze_sites(table_, enc, settings=AnalysisSettings(score="global"))
    top_g = np.argsort(-np.asarray(tg["anomaly_score"]))[:3]
    assert len(set(top_g.tolist()) & {vac_x, dop, ad}) < 3


@pytest.mark.xfail(strict=True, reason="known gap of a site table alone (no image): a streak along a whole "
                   "lattice row still flags a site in the lattice interior (the row term takes out the shared "
                   "shift only partly). From an image, find_sites levels such lines against the lattice first "
                   "(tests/test_scanlines.py)")
def test_a_scan_streak_makes_no_defect():
    xy, colour, inten, basis = make_lattice(seed=4)
    streak = np.abs(xy[:, 1] - np.round(xy[:, 1]).flat[len(xy) // 2]) < 1.0  # the sites of one scan line
    inten[streak] += 0.4
    n = len(xy)
    enc = FakeEncoding(np.eye(3)[colour] * 3, np.ones(n), np.zeros(n))
    t, _ = analyze_sites(lattice_table(xy, colour, inten, basis), enc)
    assert streak.sum() >= 10
    inner = np.asarray(t["sublattice_local"]) >= 0  # sites with local references (not the lattice's rim)
    assert not np.asarray(t["is_defect"])[streak & inner].any()
    t0, _ = analyze_sites(lattice_table(xy, colour, inten, basis), enc, settings=AnalysisSettings(scan_rows=False))
    assert np.asarray(t0["is_defect"])[streak & inner].all()  # without the row term they would all be defects


def test_classes_that_do_not_follow_the_sublattices_are_reported():
    xy, colour, inten, basis = make_lattice(n=24)
    n = len(xy)
    # latents that encode the background (x position), not the structure
    mu = np.column_stack([xy[:, 0] / 10.0, np.random.default_rng(0).normal(0, 0.1, n)])
    with pytest.warns(ClassAgreementWarning):
        _, summary = analyze_sites(lattice_table(xy, colour, inten, basis), FakeEncoding(mu, np.ones(n), np.zeros(n)))
    assert summary["class_sublattice_ari"] < 0.5
    assert "class_warning" in summary


def test_class_agreement_is_measured_where_both_readings_of_the_colouring_agree():
    """A faint chalcogen sublattice under contamination swaps places with the hollow one in the local
    reading of the colouring (brightness ranks around each site); classes that follow the lattice are
    not reported as not following it for that (the agreement is measured where the image-wide and the
    local reading agree), classes that follow the background still are, and with the two readings
    apart on many sites the classes are measured against the one they follow better."""
    import warnings

    from stemfast.analysis import _class_agreement

    rng = np.random.default_rng(0)
    n = 3000
    sub_global = rng.integers(0, 3, n)
    sub = sub_global.copy()
    patch = rng.random(n) < 0.12  # contamination: chalcogen <-> hollow in the local naming
    sub[patch] = np.array([0, 2, 1])[sub_global[patch]]
    usable = np.ones(n, bool)
    settings = AnalysisSettings()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ClassAgreementWarning
        info = _class_agreement(sub_global.copy(), sub, sub_global, usable, settings)
    assert info["class_sublattice_ari"] == pytest.approx(1.0) and info["class_sublattice_ari_local"] < 0.9
    assert "class_warning" not in info
    assert info["sublattice_local_vs_global"] == pytest.approx(1 - (patch & (sub_global > 0)).mean())
    background = (np.arange(n) * 3 // n)  # classes by position, not by sublattice
    with pytest.warns(ClassAgreementWarning):
        info = _class_agreement(background, sub, sub_global, usable, settings)
    assert info["class_sublattice_ari"] < 0.1 and "class_warning" in info
    # the readings disagree on 30 % (the local one scattered, as where metal and chalcogen are about as
    # bright): classes that follow either reading follow the lattice; classes by position still warn
    far = sub.copy()
    far[: int(0.3 * n)] = (sub_global[: int(0.3 * n)] + 1) % 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for follows in (sub_global.copy(), far.copy()):
            info = _class_agreement(follows, far, sub_global, usable, settings)
            assert info["class_sublattice_ari"] == pytest.approx(1.0) and "class_warning" not in info
            # each class' sublattice is read on the same sites and reading as the agreement
            assert all(v["share"] == 1.0 for v in info["class_sublattice"].values())
    assert _class_agreement(sub_global.copy(), far, sub_global, usable, settings)["class_sublattice_ari_local"] < 0.9
    with pytest.warns(ClassAgreementWarning):
        info = _class_agreement(background, far, sub_global, usable, settings)
    assert info["class_sublattice_ari"] < 0.1


def test_masked_row_median_matches_nanmedian():
    """The sort-based per-row median of the local references equals np.nanmedian with the
    unselected entries set to NaN (odd, even, one and no selected entries per row)."""
    import warnings

    from stemfast._kernels.numpy_ref.references import _masked_row_median

    rng = np.random.default_rng(7)
    v = rng.normal(size=(400, 31))
    sel = rng.random((400, 31)) < np.linspace(0.0, 1.0, 400)[:, None]
    sel[0] = False
    sel[1] = False
    sel[1, 4] = True
    got = _masked_row_median(v, sel)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = np.nanmedian(np.where(sel, v, np.nan), axis=1)
    assert np.isnan(got[0]) and np.isnan(ref[0])
    assert got[1] == v[1, 4]
    np.testing.assert_array_equal(got, ref)


# --------------------------------------------------------------------------- rotation latent
def _rotation_case(lattice_deg, n_per=200, seed=0, spread=4.0):
    """STN angles of a 2H grain whose lattice points along ``lattice_deg`` (image axes): metal and
    hollow sites need one canonical angle, chalcogen sites that angle + 60 deg (counter-clockwise as
    displayed, so a lattice turned by +d in image axes turns the angles by -d)."""
    rng = np.random.default_rng(seed)
    sub = np.repeat([0, 1, 2], n_per)
    base = 17.0 - lattice_deg + np.where(sub == 1, 60.0, 0.0)
    ang = (base + rng.normal(0, spread, len(sub)) + 60) % 120 - 60  # defined modulo 120 deg
    # a site lattice names a1 as any of its six directions: the reference must not care
    lat = lattice_deg + 60.0 * rng.integers(0, 6, len(sub)) + rng.normal(0, 0.5, len(sub))
    return sub, ang, lat


def test_rotation_latent_separates_metal_and_hollow_from_chalcogen_whatever_the_lattice_orientation():
    from stemfast.analysis import rotation_latent

    feats = []
    for lattice_deg in (0.0, 23.0, -17.0, 41.0):
        sub, ang, lat = _rotation_case(lattice_deg)
        f, info = rotation_latent(ang, lat)
        assert info["rotation_latent"] == "used" and info["rotation_lock"][0] > 0.9
        m = [f[sub == s].mean(0) for s in range(3)]
        assert np.linalg.norm(m[0] - m[2]) < 0.1  # metal and hollow: one orientation
        assert np.linalg.norm(m[0] - m[1]) > 1.8  # chalcogen: the opposite one (60 deg, k = 3)
        feats.append(m[0])
    # the lattice's orientation is taken out: the same site kind gets the same feature -- up to the
    # 60 deg branch a site lattice cannot fix (an orientation of 41 deg reads as -19 deg: the
    # feature flips; within one image, one grain, that is only a relabelling)
    assert np.allclose(feats[0], feats[1], atol=0.1) and np.allclose(feats[0], feats[2], atol=0.1)
    assert np.allclose(feats[0], -feats[3], atol=0.1)


def test_rotation_latent_aligns_grains_by_content_and_drops_unlocked_angles():
    from stemfast.analysis import rotation_latent

    sub_a, ang_a, lat_a = _rotation_case(5.0, seed=1)
    sub_b, ang_b, lat_b = _rotation_case(5.0 + 27.0, seed=2)
    # grain b's lattice reads 60 deg off (only the orientation modulo 60 deg is known from a site lattice)
    lat_b = lat_b + 60.0
    sub = np.r_[sub_a, sub_b]
    grain = np.r_[np.zeros(len(sub_a), int), np.ones(len(sub_b), int)]
    content = np.array([[2.0, 0.0], [0.0, 2.0], [-2.0, -2.0]])[sub]  # what the latent means say
    f, info = rotation_latent(np.r_[ang_a, ang_b], np.r_[lat_a, lat_b], grain=grain, content=content)
    for s in range(3):
        assert np.linalg.norm(f[(grain == 0) & (sub == s)].mean(0) - f[(grain == 1) & (sub == s)].mean(0)) < 0.15
    # angles that do not follow the lattice are left out, and the summary says so
    rng = np.random.default_rng(3)
    f, info = rotation_latent(rng.uniform(-60, 60, 600), np.zeros(600))
    assert f is None and info["rotation_latent"].startswith("left out")


def test_classes_use_the_rotation_latent_where_intensity_and_content_do_not_separate():
    # metal and chalcogen with nearly the same brightness and latent means (real WSe2 at 5 px comes
    # close): the rotation latent still tells them apart
    xy, colour, inten, basis = make_lattice()
    n = len(xy)
    rng = np.random.default_rng(4)
    mu = np.where(colour[:, None] == 2, -1.0, 0.0) + rng.normal(0, 0.3, (n, 2))
    ang = 10.0 + np.where(colour == 1, 60.0, 0.0) + rng.normal(0, 3.0, n)
    ang = (ang + 60) % 120 - 60
    enc = FakeEncoding(mu, np.ones(n), ang)
    t, summary = analyze_sites(lattice_table(xy, colour, inten, basis), enc)
    from sklearn.metrics import adjusted_rand_score
    assert adjusted_rand_score(colour, t["class_id"]) > 0.95
    assert summary["rotation_latent"] == "used"


def test_scores_compare_the_column_intensity_when_the_table_has_it():
    """``column_intensity`` (find_sites: the bandpass with a 1 px low-pass) is what the scores compare;
    a table without it falls back to ``intensity``."""
    xy, colour, inten, basis = make_lattice(seed=5)
    vac = centre_site(xy, colour, 1, (250, 120))
    column = inten.copy()
    column[vac] -= 0.25                                       # seen in the column intensity only
    noisy = inten + np.random.default_rng(2).normal(0, 0.2, len(xy))  # a noisier lattice-scale value
    n = len(xy)
    enc = FakeEncoding(np.eye(3)[colour] * 3, np.ones(n), np.zeros(n))
    base = lattice_table(xy, colour, noisy, basis)
    with_column = base.with_columns({"column_intensity": column})
    t, _ = analyze_sites(with_column, enc)
    assert int(np.argmax(np.asarray(t["anomaly_score"]))) == vac
    assert t["intensity_z"][vac] < -2
    t0, _ = analyze_sites(base, enc)  # the fallback sees the noisy value, where nothing was removed
    assert int(np.argmax(np.asarray(t0["anomaly_score"]))) != vac
    assert abs(t0["intensity_z"][vac]) < abs(t["intensity_z"][vac])


def test_find_sites_reports_the_column_intensity():
    import warnings

    from stemfast.sites import SiteSettings, find_sites
    from stemfast.synth import make_mos2

    s = make_mos2(shape=(160, 160), seed=0, pixel_size_A=0.38, rates=(0.0, 0.0, 0.0, 0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = find_sites(s.image)
    col = np.asarray(t["column_intensity"])
    assert np.isfinite(col).all()
    sub = np.asarray(t["sublattice"])
    med = [np.median(col[sub == k]) for k in (0, 1, 2)]
    assert med[0] > med[1] > med[2]  # metal > chalcogen pair > hollow, as the lattice-scale intensity
    with pytest.raises(ValueError):
        SiteSettings(column_noise_px=0.0)


def test_a_darker_site_outranks_an_equally_brighter_one():
    """Darker than its references is what a vacancy or lighter dopant does; brighter is also what
    anything on top of the film does, so by default it counts half (``brighter_weight``)."""
    xy, colour, inten, basis = make_lattice(seed=6)
    dark = centre_site(xy, colour, 1, (300, 100))
    bright = centre_site(xy, colour, 1, (250, 250))
    inten[dark] -= 0.3
    inten[bright] += 0.3
    n = len(xy)
    enc = FakeEncoding(np.eye(3)[colour] * 3, np.ones(n), np.zeros(n))
    t, _ = analyze_sites(lattice_table(xy, colour, inten, basis), enc)
    assert int(np.argmax(t["anomaly_score"])) == dark
    # the score itself, before its sublattice's tail discounts it (sublattice_fdr)
    t, _ = analyze_sites(lattice_table(xy, colour, inten, basis), enc, settings=AnalysisSettings(sublattice_fdr=False))
    a, z = np.asarray(t["anomaly_score"]), np.asarray(t["intensity_z"])
    assert int(np.argmax(a)) == dark
    assert a[bright] == pytest.approx(0.5 * z[bright]) and a[dark] == pytest.approx(-z[dark])
    t1, _ = analyze_sites(lattice_table(xy, colour, inten, basis), enc,
                          settings=AnalysisSettings(brighter_weight=1.0, sublattice_fdr=False))
    assert np.asarray(t1["anomaly_score"])[bright] == pytest.approx(abs(z[bright]))
    with pytest.raises(ValueError):
        AnalysisSettings(brighter_weight=1.5)


def test_unsure_angles_leave_the_class_to_the_latent_means():
    # a metal site whose chalcogen neighbours are faint looks nearly six-fold: its STN angle is a coin
    # flip between the metal and the chalcogen orientation, and the STN says so (a short harmonic)
    from sklearn.metrics import adjusted_rand_score

    xy, colour, inten, basis = make_lattice()
    n = len(xy)
    rng = np.random.default_rng(5)
    mu = np.array([[2.0, 0.0], [0.0, 2.0], [-2.0, -2.0]])[colour] + rng.normal(0, 0.4, (n, 2))
    ang = 10.0 + np.where(colour == 1, 60.0, 0.0) + rng.normal(0, 3.0, n)
    strength = np.ones(n)
    flip = (colour == 0) & (rng.random(n) < 0.3)
    ang[flip] += 60.0
    strength[flip] = 0.1
    ang = (ang + 60) % 120 - 60
    table = lattice_table(xy, colour, inten, basis)

    @dataclass
    class Enc(FakeEncoding):
        angle_strength: np.ndarray = None

    t_sure, _ = analyze_sites(table, FakeEncoding(mu, np.ones(n), ang))
    t, summary = analyze_sites(table, Enc(mu, np.ones(n), ang, strength))
    assert adjusted_rand_score(colour, t["class_id"]) > 0.97
    # taken at face value, the flipped angles pull those metal sites towards the chalcogens
    assert adjusted_rand_score(colour, t["class_id"]) > adjusted_rand_score(colour, t_sure["class_id"])


def test_references_refreshed_for_a_few_changed_values_equal_a_full_recompute():
    # the scan-line gain changes the values of a few sites; only the rows that can see them are redone
    from stemfast.references import _refresh_references

    xy, colour, inten, basis = make_lattice()
    usable = np.ones(len(xy), bool)
    usable[::37] = False
    settings = AnalysisSettings(n_neighbors=150)
    refs = local_references(xy, basis, inten, usable=usable, n_neighbors=150, node_tolerance=settings.node_tolerance)
    changed = np.abs(xy[:, 1] - 205.0) < 3.0           # one row of sites, as a flagged scan line
    new = np.where(changed, inten * 1.3, inten)
    part = _refresh_references(refs, xy, basis, new, usable, changed, settings)
    full = local_references(xy, basis, new, usable=usable, n_neighbors=150, node_tolerance=settings.node_tolerance)
    for f in ("median", "mad", "count"):
        assert np.array_equal(getattr(part, f), getattr(full, f), equal_nan=True), f
    # it did change the rows next to the line and left the far ones alone
    moved = ~np.isclose(part.median, refs.median, equal_nan=True).all(1)
    assert moved.any() and not moved[np.abs(xy[:, 1] - 205.0) > 150].any()


def test_classes_follow_the_sublattices_under_contamination_that_dominates_the_latents():
    """Latent means that carry the sublattice (a small offset per colour) under a contamination blob that
    moves every latent of the sites under it far more: k-means on the raw latents splits the blob from
    the rest; on the latents minus their neighbourhood mean (``class_neighbors``) it finds the colours."""
    from stemfast.clustering import adjusted_rand_index

    xy, colour, inten, basis = make_lattice(n=30)
    n = len(xy)
    rng = np.random.default_rng(1)
    centres = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    blob = np.exp(-((xy[:, 0] - 110) ** 2 + (xy[:, 1] - 120) ** 2) / (2 * 45.0 ** 2))
    mu = centres[colour] + 8.0 * blob[:, None] * np.array([1.0, 0.7]) + rng.normal(0, 0.15, (n, 2))
    enc = FakeEncoding(mu, np.ones(n), np.zeros(n))
    tab = lattice_table(xy, colour, inten, basis)
    with pytest.warns(ClassAgreementWarning):
        raw, _ = analyze_sites(tab, enc, settings=AnalysisSettings(class_neighbors=0))
    local, summary = analyze_sites(tab, enc)
    assert adjusted_rand_index(colour, np.asarray(raw["class_id"])) < 0.5
    assert adjusted_rand_index(colour, np.asarray(local["class_id"])) > 0.95
    assert summary["class_sublattice_ari"] > 0.95


def test_class_neighbors_is_validated():
    with pytest.raises(ValueError, match="class_neighbors"):
        AnalysisSettings(class_neighbors=3)
    assert AnalysisSettings(class_neighbors=0).class_neighbors == 0


def test_lattice_consistent_classes_fix_ambiguous_sites_and_keep_clear_outliers():
    """On a three-coloured lattice: sites whose latent features sit near the boundary between two
    classes (texture, noise) take the class of their sublattice around them; a site clearly in
    another class (an antisite) keeps it; off-lattice sites keep theirs."""
    from stemfast.analysis import lattice_consistent_classes

    rng = np.random.default_rng(0)
    P, Q = np.meshgrid(np.arange(30), np.arange(30), indexing="ij")
    p, q = P.ravel(), Q.ravel()
    xy = np.c_[p + 0.5 * q, 0.866 * q] * 10.0
    sub = (p - q) % 3
    centres = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    feats = centres[sub] + rng.normal(0, 0.4, (len(sub), 2))
    cls = sub.copy()
    ambiguous = rng.choice(np.flatnonzero(sub == 0), 25, replace=False)
    feats[ambiguous] = 0.45 * centres[1] + rng.normal(0, 0.05, (25, 2))  # just short of half-way to class 1
    cls[ambiguous] = 1                                                     # ... and labelled 1
    antisite = np.flatnonzero(sub == 2)[7]
    feats[antisite] = centres[0]
    cls[antisite] = 0
    out, n = lattice_consistent_classes(xy, sub, feats, cls, margin=0.3)
    assert (out[ambiguous] == 0).all() and n == 25
    assert out[antisite] == 0
    keep = np.ones(len(sub), bool)
    keep[ambiguous] = False
    np.testing.assert_array_equal(out[keep], cls[keep])
    with pytest.raises(ValueError, match="class_margin"):
        AnalysisSettings(class_margin=-0.1)
    off = sub.copy()
    off[ambiguous] = -1  # off-lattice sites keep their class
    out2, _ = lattice_consistent_classes(xy, off, feats, cls, margin=0.3)
    assert (out2[ambiguous] == 1).all()


def test_sites_the_model_cannot_reconstruct_around_do_not_make_defects():
    """A textured patch (contamination at the lattice's own scale): column intensities scatter and
    the model reconstructs every patch there badly. Its sites' scores are scaled down by how much
    worse the surroundings are reconstructed (recon_slack), so the texture makes no defects, while
    a vacancy on the sound lattice -- one bad patch among good neighbours -- keeps its score; the
    summary counts the sites and the report-level warning says what was done."""
    xy, colour, inten, basis = make_lattice(noise=0.02)
    n = len(xy)
    rng = np.random.default_rng(3)
    patch = np.hypot(xy[:, 0] - 250, xy[:, 1] - 120) < 45
    inten = inten.copy()
    inten[patch] += rng.standard_t(2, patch.sum()) * 0.3  # heavy-tailed texture
    vac = centre_site(xy, colour, 0, (100, 250))
    inten[vac] -= 0.6
    rec = np.ones(n) + 0.05 * rng.random(n)
    rec[patch] *= 5.0
    rec[vac] = 3.0  # the vacancy's own patch is reconstructed badly too, its neighbours' are not
    mu = np.array([[2.0, 0.0], [0.0, 2.0], [-2.0, -2.0]])[colour] + rng.normal(0, 0.2, (n, 2))
    table = lattice_table(xy, colour, inten, basis)
    off, _ = analyze_sites(table, FakeEncoding(mu, rec, np.zeros(n)), settings=AnalysisSettings(recon_slack=0))
    on, summary = analyze_sites(table, FakeEncoding(mu, rec, np.zeros(n)))
    assert np.asarray(off["is_defect"])[patch].sum() >= 3  # the texture made defects
    assert np.asarray(on["is_defect"])[patch].sum() == 0
    assert on["anomaly_score"][vac] == pytest.approx(off["anomaly_score"][vac]) and on["is_defect"][vac]
    nr = np.asarray(on["neighbourhood_recon"])
    assert np.median(nr[patch]) > 3.0 and np.median(nr[~patch]) == pytest.approx(1.0, abs=0.05)
    assert summary["n_sites_unlike_lattice"] >= 0.8 * patch.sum()
    assert "scaled down" in summary["texture_warning"]
    # what the scaling took below the cutoff is counted and said (it cannot tell the texture from a
    # cluster of real defects): the sites the texture flags without it, where the model fails around
    hidden = int((np.asarray(off["is_defect"]) & ~np.asarray(on["is_defect"]) & (nr > 2.0)).sum())
    assert hidden >= 3 and summary["n_unflagged_unlike_lattice"] == hidden
    assert f"{hidden} of them would be flagged without it" in summary["texture_warning"]
    with pytest.raises(ValueError, match="recon_slack"):
        AnalysisSettings(recon_slack=0.5)


def test_noisier_border_needs_the_insides_evidence():
    """Column intensities noisier within a spacing of the image border (line starts, columns cut by
    the border) and references on one side only there: without the edge calibration the border sites
    fill the top of the ranking; with it (edge_bands) each border band's z are divided by their
    measured excess spread, the border holds no more of the top than its share of the image, vacancies
    inside and at the border still rank first, and the inside is untouched."""
    spacing = 10.0
    xy, colour, inten, basis = make_lattice(noise=0.02, spacing=spacing)
    n = len(xy)
    shape = (int(np.ceil(xy[:, 1].max())) + 1, int(np.ceil(xy[:, 0].max())) + 1)
    from stemfast.sitelattice import border_distance

    border = border_distance(xy, shape)
    near = border < spacing
    rng = np.random.default_rng(5)
    inten = inten.copy()
    inten[near & (colour < 2)] += rng.standard_t(3, (near & (colour < 2)).sum()) * 0.08  # heavy-tailed
    vac_in = centre_site(xy, colour, 0, (150, 150))
    vac_edge = int(np.flatnonzero(near & (colour == 0) & (xy[:, 1] > 100) & (xy[:, 1] < 250))[0])
    vac = [vac_in, vac_edge]
    inten[vac] -= 1.5  # a missing metal column
    mu = np.array([[2.0, 0.0], [0.0, 2.0], [-2.0, -2.0]])[colour] + rng.normal(0, 0.2, (n, 2))
    table = lattice_table(xy, colour, inten, basis)
    table.meta.update(shape=list(shape), spacing_px=spacing)
    enc = FakeEncoding(mu, np.ones(n), np.zeros(n))
    # the sublattice tail's false discovery rate is off on both sides: it reads every site's score,
    # so the border bands would move the inside's by ~1e-5 through it
    off, _ = analyze_sites(table, enc, settings=AnalysisSettings(edge_bands=0, sublattice_fdr=False))
    on, summary = analyze_sites(table, enc, settings=AnalysisSettings(sublattice_fdr=False))
    band3 = border < 3 * spacing
    for t, most in ((off, None), (on, band3.mean() + 0.1)):
        a = np.asarray(t["anomaly_score"]).copy()
        assert set(np.argsort(-a)[:2]) == set(vac)
        a[vac] = -1.0
        top = np.argsort(-a)[:20]
        if most is None:
            assert band3[top].mean() >= 0.9  # without: the border fills the top
        else:
            assert band3[top].mean() <= most
    np.testing.assert_array_equal(np.asarray(on["anomaly_score"])[~band3], np.asarray(off["anomaly_score"])[~band3])
    assert summary["edge_z_spread"][0] > 1.5 and len(summary["edge_z_spread"]) == 3
    with pytest.raises(ValueError, match="edge_bands"):
        AnalysisSettings(edge_bands=-1)


def test_report_mentions_the_border_noise_only_when_it_matters():
    from stemfast.report import _edge_note

    assert _edge_note(None) == "" and _edge_note([1.03, None, 0.9]) == ""
    note = _edge_note([1.25, 1.09, 0.9])
    assert "0-1 spacings: 1.25x" in note and "1-2 spacings: 1.09x" in note and "2-3" not in note


def test_every_defect_kind_has_a_meaning_in_the_materials_names_and_the_report_shows_them():
    from stemfast.materials import MATERIALS
    from stemfast.report import _kind_legend

    for mat in MATERIALS.values():
        meanings = mat.defect_kind_meanings
        assert tuple(meanings) == mat.defect_kinds and all(meanings.values())
        # a kind's meaning speaks of this material's atoms only
        other = "Se" if mat.chalcogen == "S" else "S2"
        assert not any(f" {other} " in v or f"{other} site" in v for v in meanings.values())
    # the report explains the kinds an input has (WSe2 names), not the others
    legend = _kind_legend({"vacancy_Se": 3, "substitution_Se": 1}, "wse2")
    assert "<b>vacancy_Se</b>: one Se of the Se2 pair missing" in legend
    assert "substitution_Se" in legend and "antisite" in legend and "vacancy_W" not in legend
    assert _kind_legend({"(none)": 0}, "mos2") == "" and _kind_legend({"vacancy_S": 1}, "unknown-material") == ""


def test_sublattice_naming_questions_the_metal_only_when_the_dark_sites_crowd_on_it():
    import warnings

    from stemfast.analysis import NAMING_MIN, SublatticeNamingWarning, _sign_test, sublattice_naming

    sub = np.repeat([0, 1, 2], 1000)
    ok = np.ones(len(sub), bool)

    def run(n_metal, n_chalc, cb=False):
        dark = np.zeros(len(sub), bool)  # sites that read like an empty column
        dark[:n_metal] = True
        dark[1000:1000 + n_chalc] = True
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = sublattice_naming(sub, dark, ok, cb, "wse2")
        assert out["sublattice_naming"]["dark"] == {"W": n_metal, "Se2": n_chalc}
        assert out["sublattice_naming"]["brightest"] == ("Se2" if cb else "W")
        assert bool(caught) == ("naming_warning" in out)
        return out.get("naming_warning")

    assert run(0, 140) is None  # Se vacancies on the chalcogen: as named
    assert run(30, 40) is None  # dark metal sites (dopants, metal vacancies) among more chalcogen ones
    assert run(NAMING_MIN - 1, 0) is None  # too few to say
    assert run(20, 8) is None  # more on the metal, but not significantly (sign test p = 0.018)
    # a doped film's second detector: Se vacancies on the brighter (chalcogen) sublattice and dark
    # dopants on the metal (the Cr-doped WSe2 scan's ADF2 image: 89 against 25)
    assert "sites.chalcogen_brighter = true" in run(89, 25)
    msg = run(140, 2)
    assert "sites.chalcogen_brighter = true" in msg and "brightest" in msg
    # the other way round: told the chalcogen is brighter, and the dark sites say it is not
    assert "sites.chalcogen_brighter = false" in run(140, 2, cb=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SublatticeNamingWarning)
        sublattice_naming(sub, np.zeros(len(sub), bool), ok)  # no dark sites: silent
    # the sign test is the binomial tail
    assert _sign_test(0, 7) == 1.0 and abs(_sign_test(7, 0) - 0.5 ** 7) < 1e-15
    assert abs(_sign_test(3, 3) - 0.65625) < 1e-12  # (20 + 15 + 6 + 1) / 64


def test_a_dark_metal_site_is_a_vacancy_only_when_it_reads_like_an_empty_column():
    # a light dopant on the metal site (Cr in WSe2) is dark, but well above the hollow level: the
    # hollow sites' own scatter says it is not empty. With noise that large, it could be: vacancy
    from stemfast.analysis import EMPTY_Z, _defect_kinds

    rng = np.random.default_rng(0)
    n = 600
    sub = np.repeat([0, 1, 2], n // 3)
    levels = np.tile([1.0, 0.8, 0.0], (n, 1))  # metal, chalcogen, hollow around every site

    def kind_of(v, noise):
        inten = levels[np.arange(n), sub] + rng.normal(0, noise, n)
        inten[0] = v  # the flagged metal site
        flagged = np.zeros(n, bool)
        flagged[0] = True
        return _defect_kinds(sub, np.where(flagged, -8.0, 0.0), levels, inten, flagged, "wse2", ~flagged)[0]

    assert kind_of(0.01, 0.02) == "vacancy_W"  # at the hollow level: empty
    assert kind_of(0.35, 0.02) == "substitution_W"  # 17 hollow sd above it, below the midpoint: a light atom
    assert kind_of(0.35, 0.35 / (EMPTY_Z - 1)) == "vacancy_W"  # as noisy as that, empty cannot be ruled out
    assert kind_of(0.6, 0.02) == "substitution_W"  # above the midpoint, as before


def test_a_dark_chalcogen_column_is_no_substitution_where_the_chalcogen_outshines_the_metal():
    """On MoSe2 HAADF (or any MAADF image) the Se2 pair outshines the metal: a Se2 column read at the
    metal's level is darker than its pair -- a missing atom, not "something heavier in or on it"
    (the metal level was offered as the substitution's mark and won)."""
    from stemfast.analysis import _defect_kinds

    n = 300
    sub = np.repeat([0, 1, 2], n // 3)
    levels = np.tile([0.72, 1.0, 0.0], (n, 1))  # metal, chalcogen, hollow: the chalcogen is brighter
    inten = levels[np.arange(n), sub].copy()
    flagged = np.zeros(n, bool)
    flagged[[100, 101, 102]] = True
    inten[[100, 101, 102]] = [0.70, 0.05, 1.6]  # darker than its pair / empty / brighter
    z = np.where(flagged, np.sign(inten - 1.0) * 8.0, 0.0)
    kinds = _defect_kinds(sub, z, levels, inten, flagged, "mose2", ~flagged)
    assert kinds[[100, 101, 102]].tolist() == ["vacancy_Se", "vacancy_Se2", "substitution_Se"]


def test_a_beam_damaged_film_is_not_taken_for_swapped_names():
    """A film with 17 % of its columns defective (30 % of the S2 columns missing one S): the half-empty
    S2 columns widen the chalcogen's spread, so its empty columns were no longer 4 spreads out, and the
    metal vacancies outnumbered them among the strongly dark sites (41 against 6): the naming check
    said the names were swapped. Sites that read like an empty column count too."""
    import warnings

    from stemfast.analysis import SublatticeNamingWarning
    from stemfast.config import PipelineConfig
    from stemfast.model.shipped import shipped_for_run
    from stemfast.pipeline import analyze, prepare
    from stemfast.synthetic import make_mos2

    s = make_mos2(shape=(640, 640), seed=21, rates=(0.30, 0.15, 0.05, 0.02), dose=300.0)
    cfg = PipelineConfig()
    model = shipped_for_run(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prep = prepare(s.image, config=cfg, patch_size=model.extra.get("patch_size"))
        _, summary = analyze(prep, model, config=cfg)
    dark = summary["sublattice_naming"]["dark"]
    assert dark["S2"] > 2 * dark["Mo"] >= 40, dark
    assert "naming_warning" not in summary
    assert not any(issubclass(w.category, SublatticeNamingWarning) for w in caught)


@pytest.mark.parametrize("dim_share", [0.4, 0.6])
def test_a_dimmer_part_of_the_film_neither_hides_its_defects_nor_flags_the_other_part(dim_share):
    """The right 40 or 60 % of the film at 30 % of the left's signal, noise included (an illumination or
    thickness step: the same image, scaled). A vacancy is a vacancy on either side: the local MAD
    floor follows the local column contrast (an image-wide floor was 0.5 of the typical MAD, above
    the dim half's own, and shrank its z), and the reconstruction error -- which the model, seeing
    patches normalised image-wide, makes smaller where the columns are dimmer -- is levelled for the
    contrast before the texture check (the bright half read "2x worse than elsewhere" and its scores
    were scaled down: 532 sites on the labelled WSe2 dimmed so).

    The two vacancies take 0.55 of a column whose level is ~0.65 here (0.45 until round 31, when
    one side scored 4.00 against the cutoff of 4: the test sat on the cutoff, not on the step). With
    the floor at the typical spread (``spread_floor`` 1) the two sides score within 4 % of each other
    (4.86 / 5.01 and 4.67 / 4.83); with the round-31 floor of 0.5 they differed by 7-22 % (6.18 / 5.76,
    5.01 / 6.13), so the bound is now 10 % instead of 25 %."""
    xy, colour, inten, basis = make_lattice(seed=4, noise=0.02)
    n = len(xy)
    rng = np.random.default_rng(5)
    right = xy[:, 0] > np.quantile(xy[:, 0], 1 - dim_share)
    left_vac = centre_site(xy, colour, 1, (50, 300))
    right_vac = centre_site(xy, colour, 1, (xy[:, 0].max() - 60, 300))
    inten = inten.copy()
    inten[[left_vac, right_vac]] -= 0.55
    scale = np.where(right, 0.3, 1.0)
    inten = inten * scale
    mu = np.array([[2.0, 0.0], [0.0, 2.0], [-2.0, -2.0]])[colour] + rng.normal(0, 0.2, (n, 2))
    rec = 0.02 * scale ** 1.5 * (1 + 0.1 * rng.random(n))  # the error follows the contrast, nothing else
    t, summary = analyze_sites(lattice_table(xy, colour, inten, basis), FakeEncoding(mu, rec, np.zeros(n)))
    a = np.asarray(t["anomaly_score"])
    assert t["is_defect"][left_vac] and t["is_defect"][right_vac]
    assert a[right_vac] == pytest.approx(a[left_vac], rel=0.1)
    assert set(np.argsort(-a)[:2].tolist()) == {left_vac, right_vac}
    assert summary["n_sites_unlike_lattice"] == 0 and "texture_warning" not in summary
    assert summary["recon_contrast_exponent"] == pytest.approx(1.5, abs=0.2)
    nr = np.asarray(t["neighbourhood_recon"])
    assert np.median(nr[right]) == pytest.approx(1.0, abs=0.1) and np.median(nr[~right]) == pytest.approx(1.0, abs=0.1)


def test_contrast_levelled_recon_keeps_texture_and_leaves_an_even_film_alone():
    from stemfast.analysis import contrast_levelled_recon

    rng = np.random.default_rng(0)
    n = 2000
    usable = np.ones(n, bool)
    # an even film: the contrast varies by noise only -- the error is returned as it is
    c = 1.0 + 0.05 * rng.standard_normal(n)
    rec = 0.02 * (1 + 0.1 * rng.random(n))
    level, p = contrast_levelled_recon(rec, c, usable)
    assert p == 0.0 and level is not None and np.array_equal(level, rec)
    assert contrast_levelled_recon(rec, None, usable)[1] == 0.0
    # a dim half and a textured patch in the bright half at the bright half's contrast: the dim half is
    # levelled to the rest, the texture stays several times worse
    c = np.where(np.arange(n) < n // 2, 1.0, 0.3) * (1 + 0.02 * rng.standard_normal(n))
    rec = 0.02 * c ** 1.5 * (1 + 0.1 * rng.random(n))
    texture = np.arange(n) < 200
    rec[texture] *= 4.0
    level, p = contrast_levelled_recon(rec, c, usable)
    assert 1.0 < p < 2.0
    assert np.median(level[texture]) / np.median(level[~texture]) > 3.0
    assert np.median(level[n // 2:]) == pytest.approx(np.median(level[200:n // 2]), rel=0.15)
    # a texture that lowers the contrast does not turn the trend around: the exponent is never negative
    c2 = np.where(texture, 0.6, 1.0) * (1 + 0.3 * rng.random(n))
    assert contrast_levelled_recon(0.02 * np.where(texture, 4.0, 1.0), c2, usable)[1] >= 0.0


def test_a_mixed_chalcogen_sublattice_is_warned_a_plain_film_is_not():
    """An Se-implanted MoS2 (40 % of the S replaced: S2, SSe and Se2 columns on one sublattice) ranks
    its bright substituted columns like defects: the summary says the chalcogen columns spread far more
    than the metal's (`mixed_warning`, `column_spread`); the same film without Se does not."""
    import warnings

    from stemfast import run_image
    from stemfast.analysis import MIXED_SPREAD_RATIO, MixedColumnsWarning
    from stemfast.synthetic import make_mos2

    out = {}
    for p in (0.0, 0.4):
        img = make_mos2(shape=(256, 256), seed=3, se_fraction=p).image
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, summary, _ = run_image(img)
        out[p] = summary, any(issubclass(w.category, MixedColumnsWarning) for w in caught)
    plain, (alloy, warned) = out[0.0][0], out[0.4]
    assert "mixed_warning" not in plain and not out[0.0][1]
    assert "mixed_warning" in alloy and warned and "S2 columns" in alloy["mixed_warning"]
    assert alloy["column_spread"]["S2"] > MIXED_SPREAD_RATIO * alloy["column_spread"]["Mo"]
    assert max(plain["column_spread"].values()) < 1.6 * min(plain["column_spread"].values())


@pytest.mark.parametrize("case", ["2h", "no_chalcogen", "1t", "honeycomb"])
def test_sublattices_that_read_alike_are_warned_a_2h_film_is_not(case):
    """The site lattice is the 2H one whatever the image holds, and the metal / chalcogen / hollow
    names come from brightness. Where two sublattices read alike, those names are a guess and the
    summary says so (`separation_warning`, `sublattice_separation`): a triangular lattice of one kind of
    column (its chalcogen sites as empty as the hexagon centres), a 1T projection (one S on each of
    the two sites) and a honeycomb of one kind of column (metal and chalcogen alike). A MoS2 film is
    not warned, and the empty "chalcogen" sublattice's narrow spread is not read as a mixed metal
    sublattice."""
    import warnings

    from stemfast import run_image
    from stemfast.analysis import MIN_SUBLATTICE_SEPARATION, SublatticeSeparationWarning
    from stemfast.synthetic import make_mos2, render_gaussians
    from stemfast.synthetic.image import chalcogen_atom_intensity

    scale = {"2h": 1.0, "no_chalcogen": 0.0, "1t": 0.5, "honeycomb": 0.5 / chalcogen_atom_intensity()}[case]
    s = make_mos2(shape=(256, 256), seed=3, chalcogen_scale=scale)
    img = s.image
    if case == "1t":  # one S on each hexagon centre too, as bright as the one left on each S2 site
        xy, sub = s.truth[:, :2], s.truth[:, 2]

        def level(k):  # the median pixel value at the sites of sublattice k
            p = np.rint(xy[sub == k]).astype(int).clip(0, 255)
            return float(np.median(img[p[:, 1], p[:, 0]]))

        img = img + render_gaussians(img.shape, xy[sub == 2], (level(0) - level(2)) * chalcogen_atom_intensity(),
                                     s.meta["sigma_px"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, summary, _ = run_image(img)
    warned = any(issubclass(w.category, SublatticeSeparationWarning) for w in caught)
    sep = summary["sublattice_separation"]
    assert "mixed_warning" not in summary
    if case == "2h":
        assert not warned and "separation_warning" not in summary and "sublattice_alike" not in summary
        assert sep["Mo-S2"] > 8 * MIN_SUBLATTICE_SEPARATION and sep["S2-hollow"] > 8 * MIN_SUBLATTICE_SEPARATION
    elif case in ("no_chalcogen", "1t"):
        assert warned and summary["sublattice_alike"] == ["S2-hollow"]
        assert "no S2 columns are seen" in summary["separation_warning"]
        assert "a 1T phase" in summary["separation_warning"]
        assert "read alike" not in summary["separation_warning"]
        # (under the bound or three standard errors: naming the brighter of two alike sublattices S2
        # makes the difference positive by selection; real faint S2 reads 1.4 and more)
        assert abs(sep["S2-hollow"]) < 0.5 and sep["Mo-S2"] > 8 * MIN_SUBLATTICE_SEPARATION
    else:
        assert warned and summary["sublattice_alike"] == ["Mo-S2"]
        assert "Mo and S2 sites read alike" in summary["separation_warning"]
        assert "no S2 columns" not in summary["separation_warning"]
        assert abs(sep["Mo-S2"]) < 0.5 and sep["S2-hollow"] > 8 * MIN_SUBLATTICE_SEPARATION


def test_a_selenide_named_as_a_sulfide_is_warned_from_few_vacancies():
    """MoSe2 in HAADF: the Se2 pairs outshine the Mo. Named by brightness as MoS2 (the default), its
    Se vacancies land on the sublattice named metal; a 512^2 field holds ~20 strongly dark sites,
    which the naming check must be able to read (it needed 20 on the metal: 19 against 2 said
    nothing). Named as MoSe2 the sublattices match the truth and nothing is said."""
    import warnings

    from scipy.spatial import cKDTree

    from stemfast import run_image
    from stemfast.config import load_config
    from stemfast.synthetic import make_mos2
    from stemfast.synthetic.image import chalcogen_atom_intensity

    s = make_mos2(shape=(512, 512), seed=1, chalcogen_scale=0.7 / chalcogen_atom_intensity())  # Se2 1.4x Mo
    out = {}
    for material in ("mos2", "mose2"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            table, summary, _ = run_image(s.image, config=load_config(None, {"sites": {"material": material}}))
        d, j = cKDTree(s.truth[:, :2]).query(table.xy)
        ok = d < 1.5
        out[material] = summary, float((np.asarray(table["sublattice"])[ok] == s.truth[j[ok], 2]).mean())
    (as_s, agree_s), (as_se, agree_se) = out["mos2"], out["mose2"]
    assert agree_s < 0.5 and as_s["sublattice_naming"]["dark"]["Mo"] < 20
    assert "sites.chalcogen_brighter = true" in as_s["naming_warning"]
    assert agree_se > 0.99 and "naming_warning" not in as_se


def _flat_lattice(seed, n=48, spacing=10.0, sd=0.02):
    """A triangular site lattice (metal 1.0, chalcogen 0.5, hollow 0.0 by colour) with Gaussian noise
    ``sd`` and nothing else: no gradient, no contamination."""
    rng = np.random.default_rng(seed)
    xy, colour, basis = _triangular_sites(n, spacing)
    inten = np.array([1.0, 0.5, 0.0])[colour] + rng.normal(0, sd, len(xy))
    return xy, colour, inten, basis, rng


def _flat_encoding(colour, rng):
    """An encoding whose latent means follow the colours (with noise ``rng`` draws), flat recon error."""
    n = len(colour)
    mu = np.array([[2.0, 0.0], [0.0, 2.0], [-2.0, -2.0]])[colour] + rng.normal(0, 0.2, (n, 2))
    return FakeEncoding(mu, np.full(n, 0.02), np.zeros(n))


def _flat_analysed(xy, colour, inten, basis, enc, **settings):
    """``analyze_sites`` (table, summary) of a lattice of :func:`_flat_lattice` with ``AnalysisSettings(**settings)``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return analyze_sites(lattice_table(xy, colour, inten, basis), enc, settings=AnalysisSettings(**settings))


def _flat_scores(xy, colour, inten, basis, rng, **settings):
    t, _ = _flat_analysed(xy, colour, inten, basis, _flat_encoding(colour, rng), **settings)
    return np.asarray(t["intensity_z"]), np.asarray(t["is_defect"], bool)


def test_a_cluster_of_vacancies_is_judged_against_normal_columns():
    """30 % of the chalcogen columns within 50 px gone by 6 sigma (a damaged patch): in the first pass
    they widen the MAD of the references that judge each of them; left out of the references
    (``reference_outlier_z``), each is judged against the normal columns around it. Over four
    seeds: 31 of 36 flagged (27 without), each seed's median z lower, no normal column flagged."""
    flagged = {0: 0, 3: 0}
    for seed in range(4):
        xy, colour, inten, basis, rng = _flat_lattice(seed)
        near = np.flatnonzero((colour == 1) & (np.hypot(xy[:, 0] - 200, xy[:, 1] - 200) < 50))
        vac = rng.choice(near, int(0.3 * len(near)), replace=False)
        inten[vac] -= 6 * 0.02
        normal = np.ones(len(xy), bool)
        normal[vac] = False
        med = {}
        for out in (0, 3):
            z, isd = _flat_scores(xy, colour, inten, basis, np.random.default_rng(seed), reference_outlier_z=out)
            assert not isd[normal].any()
            flagged[out] += int(isd[vac].sum())
            med[out] = float(np.median(z[vac]))
        assert med[3] <= med[0] + 1e-9
    assert flagged[3] >= flagged[0] + 3 and flagged[3] >= 30


def test_the_local_spread_is_no_smaller_than_the_typical_one():
    """Homogeneous noise, no defect: the ~100 references of a colour give a MAD that scatters by ~12 %,
    and where it comes out low by chance every z there is inflated. With the floor at the typical
    spread (``spread_floor`` 1) the normal columns beyond |z| = 3 are fewer than a Gaussian's 0.27 %
    (10 on four seeds of 5,088 columns, 13.7 expected); at half of it (the round-31 floor) 23."""
    tail = {0.5: 0, 1.0: 0}
    n_col = 0
    for seed in range(4):
        xy, colour, inten, basis, rng = _flat_lattice(seed)
        n_col += int((colour < 2).sum())
        for floor in tail:
            z, isd = _flat_scores(xy, colour, inten, basis, np.random.default_rng(seed), spread_floor=floor,
                                  reference_outlier_z=0)
            assert not isd.any()
            tail[floor] += int((np.abs(z[colour < 2]) > 3).sum())
    assert tail[1.0] < 0.0027 * n_col < tail[0.5]


def test_reference_settings_are_checked():
    with pytest.raises(ValueError, match="spread_floor"):
        AnalysisSettings(spread_floor=0)
    with pytest.raises(ValueError, match="reference_outlier_z"):
        AnalysisSettings(reference_outlier_z=1.5)
    assert AnalysisSettings(reference_outlier_z=0).reference_outlier_z == 0


def test_the_summary_agrees_with_the_table_and_off_lattice_peaks_are_named_so():
    """Counts and the top candidates of the summary are the table's (the top list's sublattice was an
    internal group number: -1 or 100 + class where none was known); a flagged peak on no lattice node
    is ``off_lattice``, the kind the material lists for it (it was never given)."""
    from stemfast.analysis import _defect_kinds
    from stemfast.config import PipelineConfig
    from stemfast.model.shipped import shipped_for_run
    from stemfast.pipeline import analyze, prepare
    from stemfast.synthetic import make_mos2

    s = make_mos2(shape=(256, 256), seed=5, rates=(0.03, 0.02, 0.02, 0.02))
    cfg = PipelineConfig()
    model = shipped_for_run(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table, summary = analyze(prepare(s.image, config=cfg, patch_size=model.extra.get("patch_size")), model,
                                 config=cfg)
    flagged = np.asarray(table["is_defect"], bool)
    kinds = np.asarray(table["defect_kind"])
    assert summary["n_defects"] == int(flagged.sum()) > 0
    assert summary["defect_kinds"] == {k: int((kinds == k).sum()) for k in set(kinds[flagged])}
    assert summary["class_counts"] == {int(c): int((np.asarray(table["class_id"]) == c).sum())
                                       for c in np.unique(table["class_id"])}
    for t in summary["top"]:
        i = t["index"]
        assert t["sublattice"] == table["sublattice"][i] and t["sublattice_local"] == table["sublattice_local"][i]
        assert t["defect_kind"] == kinds[i] and t["class_id"] == table["class_id"][i]
    n = 30
    sub = np.repeat([0, 1, 2], n // 3)
    flagged = np.zeros(n, bool)
    flagged[[0, 1]] = True
    off = np.zeros(n, bool)
    off[1] = True
    got = _defect_kinds(sub, np.where(flagged, 8.0, 0.0), np.tile([1.0, 0.6, 0.0], (n, 1)),
                        np.where(flagged, 1.8, 0.5), flagged, "mos2", None, off)
    assert got[0] == "substitution_Mo" and got[1] == "off_lattice"


def test_references_without_spread_give_the_image_wide_z_not_zero():
    """Every metal column reads the same (a clipped detector, a rendered image): the local MAD is 0 and
    an empty metal site's local z was infinite, then set to 0 -- the vacancy vanished from the ranking.
    It takes the image-wide score instead."""
    import dataclasses

    from stemfast.config import PipelineConfig
    from stemfast.model.shipped import shipped_for_run
    from stemfast.pipeline import analyze, prepare
    from stemfast.synthetic import make_mos2

    cfg = PipelineConfig()
    model = shipped_for_run(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prep = prepare(make_mos2(shape=(256, 256), seed=1).image, config=cfg, patch_size=model.extra.get("patch_size"))
    c = np.asarray(prep.sites["column_intensity"], np.float64).copy()
    metal = (np.asarray(prep.sites["sublattice"]) == 0) & ~prep.edge
    c[np.asarray(prep.sites["sublattice"]) == 0] = 400.0
    i = int(np.flatnonzero(metal)[20])
    c[i] = 0.0
    prep = dataclasses.replace(prep, sites=prep.sites.with_columns({"column_intensity": c}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table, _ = analyze(prep, model, config=cfg)
    assert table["intensity_z"][i] < -5 and table["is_defect"][i] and table["defect_kind"][i] == "vacancy_Mo"


def test_a_site_without_a_companion_value_keeps_its_own_evidence_and_hidden_sites_have_no_z():
    """Where the second detector has no value at a site, the first detector's z counts alone (a 0 was
    averaged in: a vacancy at z -5.3 fell to -3.2 and was no longer flagged); sites the scan hides
    (``observed`` False) are not judged, so their z columns are NaN, not scores against each other."""
    import dataclasses

    from stemfast.config import PipelineConfig
    from stemfast.model.shipped import shipped_for_run
    from stemfast.pipeline import analyze, prepare
    from stemfast.synthetic import make_mos2

    cfg = PipelineConfig()
    model = shipped_for_run(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prep = prepare(make_mos2(shape=(256, 256), seed=1, rates=(0.03, 0.02, 0.02, 0.0)).image, config=cfg,
                       patch_size=model.extra.get("patch_size"))
    c = np.asarray(prep.sites["column_intensity"], np.float64)
    comp = 0.8 * c + np.random.default_rng(1).normal(0, 2, len(c))
    hidden = np.zeros(len(c), bool)
    hidden[:15] = True

    def run(companion):
        cols = {"companion_intensity": companion, "observed": ~hidden & np.asarray(prep.sites["observed"], bool)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return analyze(dataclasses.replace(prep, sites=prep.sites.with_columns(cols)), model, config=cfg)[0]

    both = run(comp)
    flagged = np.flatnonzero(np.asarray(both["is_defect"], bool) & ~hidden)
    i = flagged[np.argmin(np.asarray(both["anomaly_score"])[flagged])]  # the weakest flagged site
    lost = comp.copy()
    lost[i] = np.nan
    alone = run(lost)
    assert alone["is_defect"][i] and abs(alone["intensity_z"][i] - both["intensity_z"][i]) < 1.0
    assert np.isnan(np.asarray(both["intensity_z"])[hidden]).all()
    assert np.isnan(np.asarray(both["intensity_z_global"])[hidden]).all()
    assert np.isfinite(np.asarray(both["intensity_z"])[~hidden]).all()


def test_the_recon_score_leaves_border_patches_out_and_few_sites_cluster():
    """``score = "recon"`` ranked padded border patches (their reconstruction error means nothing) as
    defects: 56 of 57 flagged sites were at the border. And with fewer sites than the smallest class
    count tried, ``n_classes = none`` raised (max() of no scores)."""
    from stemfast.analysis import cluster_latents
    from stemfast.config import PipelineConfig, apply_overrides
    from stemfast.model.shipped import shipped_for_run
    from stemfast.pipeline import analyze, prepare
    from stemfast.synthetic import make_mos2

    cfg = apply_overrides(PipelineConfig(), {"analysis.score": "recon"})
    model = shipped_for_run(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prep = prepare(make_mos2(shape=(192, 192), seed=3).image, config=cfg, patch_size=model.extra.get("patch_size"))
        table, _ = analyze(prep, model, config=cfg)
    assert prep.edge.any() and (np.asarray(table["anomaly_score"])[prep.edge] == 0).all()
    mu = np.random.default_rng(0).normal(size=(2, 4))
    labels, k = cluster_latents(mu, n_classes=None, order_by=np.arange(2.0), settings=AnalysisSettings())[:2]
    assert k == 2 and sorted(labels.tolist()) == [0, 1]


@pytest.mark.parametrize("seed, rotation, cut", [(1, 14, 128), (3, 33, 160)])
def test_sites_next_to_a_part_without_lattice_are_not_judged(seed, rotation, cut):
    """A part of the image without lattice (amorphous film, contamination; here noise at the film's
    brightness right of column ``cut``) cuts the columns next to it as the image edge does: their
    neighbourhood, patch and local references are half missing. Judged, they made most of the
    flagged sites (10 of 11 and 12 of 16 within 1.5 spacings of the boundary). Like the sites in the
    part itself they are now not judged: what is flagged is on the film, mostly the planted defects."""
    import warnings

    from scipy.spatial import cKDTree

    from stemfast import run_image
    from stemfast.synthetic import make_mos2

    s = make_mos2(shape=(320, 384), seed=seed, rotation_deg=rotation)
    img = s.image.copy()
    img[:, cut:] = np.random.default_rng(seed).poisson(s.image.mean(), size=(img.shape[0], img.shape[1] - cut))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table, summary, _ = run_image(img)
    nn = s.meta["nn_px"]
    assert table.meta["lattice"]["lattice_free"]["share"] > 0.3
    xy, flagged = table.xy, np.asarray(table["is_defect"], bool)
    observed = np.asarray(table["observed"], bool)
    # no judged site has a neighbour in the part without lattice
    free_side = xy[:, 0] > cut + nn
    d, _ = cKDTree(xy[free_side]).query(xy[observed])
    assert d.min() > 1.2 * nn
    assert np.sum(np.abs(xy[flagged, 0] - cut) < 1.5 * nn) <= 1
    defects = s.truth[s.truth[:, 3] > 0]
    d, _ = cKDTree(defects[:, :2]).query(xy[flagged])
    assert flagged.sum() >= 2 and (d < 0.5 * nn).mean() >= 0.6


def test_a_score_and_its_verdict_agree_as_sites_csv_writes_them():
    """``sites.csv`` writes ``anomaly_score`` with 6 significant digits: a flagged 4.0000001 read
    "4", i.e. not over the cutoff of 4, against ``is_defect`` 1 in the same row. The analysis now
    rounds the score to what the file shows before the cutoff judges it."""
    from stemfast.analysis import as_written
    from stemfast.batch.tables import format_column

    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(0, 3, 20000), rng.lognormal(0, 3, 20000),
                             [4.0000001, 3.9999999, 4.000005, 4.0000049, -1e-9, 0.0]])
    shown = np.array(format_column(as_written(scores), "anomaly_score"), float)
    assert np.array_equal(shown, as_written(scores))
    assert np.array_equal(shown > 4.0, as_written(scores) > 4.0)
    assert as_written(np.array([4.0000001]))[0] == 4.0
    # the analysis' table holds the written value, and its verdict is the written value's
    xy, colour, inten, basis, rng = _flat_lattice(0)
    inten[np.flatnonzero(colour == 1)[::7]] -= np.linspace(2, 8, len(np.flatnonzero(colour == 1)[::7])) * 0.02
    table, _ = _flat_analysed(xy, colour, inten, basis, _flat_encoding(colour, rng))
    a = np.asarray(table["anomaly_score"])
    assert np.array_equal(np.array(format_column(a, "anomaly_score"), float), a)
    assert np.asarray(table["is_defect"], bool).any()
    assert np.array_equal(np.asarray(table["is_defect"], bool), a > AnalysisSettings().defect_cutoff)


def test_a_metal_site_between_empty_and_dopant_is_said_to_be_ambiguous():
    """A flagged metal site is named a vacancy when it reads like an empty column by two tests: within
    EMPTY_Z of the hexagon centres' scatter, and below the midpoint to the chalcogen level. With faint
    chalcogen columns (real MoS2; WS2 HAADF: on a 5 px synthetic WS2 image 15 of 36 planted W
    vacancies) a site passes the first and fails the second: it was named a substitution and nothing
    said so. The name stays, and the summary counts such sites and warns."""
    from stemfast.analysis import EMPTY_Z, _defect_kinds, _metal_kind_ambiguity

    rng = np.random.default_rng(0)
    n = 300
    sub = np.repeat([0, 1, 2], n // 3)
    levels = np.tile([10.0, 1.0, 0.0], (n, 1))  # metal 10, a faint chalcogen 1, hollow 0
    inten = np.array([10.0, 1.0, 0.0])[sub] + rng.normal(0, 0.5, n)
    flagged = np.zeros(n, bool)
    flagged[[0, 1, 2]] = True
    inten[0] = 0.1  # empty by both tests
    inten[1] = 0.9  # within 4 sd of the hollow level (2.0), above the midpoint to the chalcogen (0.5)
    inten[2] = 3.0  # outside the scatter and above the midpoint: a light dopant by both
    kinds = _defect_kinds(sub, np.where(flagged, -8.0, 0.0), levels, inten, flagged, "ws2", ~flagged)
    assert kinds[:3].tolist() == ["vacancy_W", "substitution_W", "substitution_W"]
    info = _metal_kind_ambiguity(sub, levels, inten, kinds, "ws2", ~flagged)
    assert info["metal_kind_ambiguous"] == 1 and "3 flagged W sites" in info["kind_warning"]
    assert "vacancy_W" in info["kind_warning"] and EMPTY_Z == 4.0
    # bright chalcogen columns (WSe2): the tests agree, nothing is said
    levels[:, 1] = 5.0
    inten[sub == 1] += 4.0
    kinds = _defect_kinds(sub, np.where(flagged, -8.0, 0.0), levels, inten, flagged, "wse2", ~flagged)
    assert _metal_kind_ambiguity(sub, levels, inten, kinds, "wse2", ~flagged) == {}


def test_a_binned_image_reads_its_columns_with_a_low_pass_narrower_than_the_spacing():
    """A 3x3-binned simulated image (15.2 -> 5.07 px spacing, the real WSe2's sampling) reads a noise
    correlation of 1.7 px: the column low-pass was widened to 1.7 px (0.33 spacings), the hexagon
    centres took in their neighbouring columns' signal and an empty one did not, and of 27 single S
    vacancies 1 was flagged (named vacancy_S2). The low-pass is now at most 0.2 spacings: 9 flagged,
    8 of them named vacancy_S."""
    from scipy.spatial import cKDTree

    from stemfast import run_image
    from stemfast.sites import COLUMN_FILTER_MAX_NN
    from stemfast.synthetic import make_mos2

    s = make_mos2(shape=(768, 768), seed=1, rates=(0.03, 0.0, 0.0, 0.0))
    img = s.image.reshape(256, 3, 256, 3).mean((1, 3))
    truth = s.truth.copy()
    truth[:, :2] = (truth[:, :2] - 1) / 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t, _, _ = run_image(img)
    noise, nn = t.meta["lattice"]["noise"], t.meta["spacing_px"]
    assert noise["correlation_px"] > 1.5 and noise["column_filter_px"] <= COLUMN_FILTER_MAX_NN * nn + 1e-3
    d, j = cKDTree(truth[:, :2]).query(t.xy)
    v_s = (d < 1.0) & (truth[j, 3] == 1)
    flagged, kinds = np.asarray(t["is_defect"], bool), np.asarray(t["defect_kind"])
    assert v_s.sum() > 20 and (v_s & flagged).sum() >= 6
    assert (v_s & flagged & (kinds == "vacancy_S")).sum() >= 0.75 * (v_s & flagged).sum()


def test_a_dose_too_low_to_flag_single_vacancies_is_said():
    """At low dose the chalcogen columns read only a few spreads above the hexagon centres: a column
    with one of its two atoms gone lies half that below its level, under the cutoff, and the summary
    reported no or few defects with nothing said (real WSe2 resampled at 2-8 counts/px: 0-9 flagged
    of 141 labelled Se vacancies). The summary now says how deep a single vacancy is expected and that
    its absence is no evidence; at full dose nothing is said."""
    from stemfast import run_image
    from stemfast.analysis import detection_limit
    from stemfast.synthetic import make_mos2

    found = {}
    for dose in (500.0, 2.0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, found[dose], _ = run_image(make_mos2(shape=(256, 256), seed=2, dose=dose).image)
    assert "detection_warning" not in found[500.0]
    low = found[2.0]
    assert low["single_vacancy_depth"] < 4.0 and "no evidence of a clean film" in low["detection_warning"]
    assert detection_limit({"S2-hollow": 11.7}, [], 4.0) == {}
    assert detection_limit({"S2-hollow": 2.0}, ["S2-hollow"], 4.0) == {}  # alike: said by the separation check
