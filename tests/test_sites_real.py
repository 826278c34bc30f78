"""find_sites on crops of real micrographs (tests/data, see its README): the lattice checks of a
microscopist, with default settings.

A 2H monolayer's metal, chalcogen and hollow sites form one triangular lattice of spacing
``a / sqrt(3)``. The reference spacing of each crop is measured here, independently of stemfast:
the first peak of the radially averaged power spectrum (zero-padded, parabola-refined) is the
metal ``{100}`` ring at ``d = a sqrt(3) / 2``, so the site spacing is ``2 d / 3``. Then, as the
shared checker does: the median distance to the six nearest sites is within 3% of it, the interior
holds 0.95-1.03 times the sites of the full lattice, >= 98% of interior sites have six neighbours
at 0.75-1.25 spacings, and no two sites sit within half a spacing (<= 0.1%).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.signal import find_peaks as find_1d_peaks
from scipy.spatial import cKDTree

from stemfast.analysis import SublatticeNamingWarning
from stemfast.sitelattice import SPLIT_NN, border_distance
from stemfast.sites import find_sites

from real_data import DATA, average_precision, read_labels

MOS2 = ["mos2_exp-000-2_crop.npy", "mos2_exp-001-5_crop.npy", "mos2_exp-002-5_crop.npy"]


def fft_site_cell(img: np.ndarray, pad: int = 1024) -> tuple[float, float]:
    """Site spacing (px) and area per site (px^2) of a 2H monolayer image from its power spectrum.

    The first peak of the radially averaged (zero-padded, whitened) spectrum is the metal
    ``{100}`` ring at ``d = a sqrt(3) / 2``: the site spacing is ``2 d / 3``. The six strongest
    spots within 15% of that ring give the metal cell (``1 / |g1 x g2|``, which holds three sites),
    so a scan-distorted, anisotropic lattice still gets its true area per site.
    """
    img = np.asarray(img, np.float64)
    h, w = img.shape
    win = np.outer(np.hanning(h), np.hanning(w))
    P = np.abs(np.fft.fft2((img - img.mean()) * win, s=(pad, pad))) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(pad), np.fft.fftfreq(pad), indexing="ij")
    f = np.hypot(fx, fy)
    nb = pad // 2
    idx = np.clip((f / 0.5 * nb).astype(int), 0, nb - 1)
    prof = np.bincount(idx.ravel(), P.ravel(), nb) / np.maximum(np.bincount(idx.ravel(), minlength=nb), 1)
    fc = (np.arange(nb) + 0.5) / nb * 0.5
    sc = prof * fc ** 2  # whitened
    sc[(fc < 8.0 / min(h, w)) | (fc > 0.25)] = 0
    pk, _ = find_1d_peaks(sc, height=0.2 * sc.max())
    k = int(pk[0])  # the first ring: the lowest-frequency strong peak
    a, b, c = sc[k - 1], sc[k], sc[k + 1]
    f_ring = (k + 0.5 * (a - c) / (a - 2 * b + c) + 0.5) / nb * 0.5
    # the six spots of that ring: the strongest pixels in the annulus, one per 60-degree sector
    ring = np.abs(f - f_ring) <= 0.15 * f_ring
    ang = np.degrees(np.arctan2(fy, fx)) % 360
    first = np.flatnonzero(ring.ravel())[np.argmax(P.ravel()[ring.ravel()])]
    a0 = ang.ravel()[first]
    spots = []
    for s in range(6):
        sector = ring & (np.abs((ang - a0 - 60 * s + 30) % 360 - 30) <= 30)
        j = np.flatnonzero(sector.ravel())[np.argmax(P.ravel()[sector.ravel()])]
        spots.append([fx.ravel()[j], fy.ravel()[j]])
    g = np.array(spots)
    # consecutive spots are 60 degrees apart: each pair spans the metal reciprocal cell
    cross = [abs(g[i, 0] * g[(i + 1) % 6, 1] - g[i, 1] * g[(i + 1) % 6, 0]) for i in range(6)]
    site_area = 1.0 / np.mean(cross) / 3.0
    return 2.0 / 3.0 / f_ring, float(site_area)


def lattice_checks(xy: np.ndarray, nn0: float, site_area: float, shape: tuple[int, int]) -> dict:
    d, _ = cKDTree(xy).query(xy, k=7)
    H, W = shape
    b = 2.5 * nn0
    interior = (xy[:, 0] > b) & (xy[:, 0] < W - 1 - b) & (xy[:, 1] > b) & (xy[:, 1] < H - 1 - b)
    expected = (W - 1 - 2 * b) * (H - 1 - 2 * b) / site_area
    return {
        "spacing": float(np.median(d[:, 1:])) / nn0,
        "density": interior.sum() / expected,
        "six": float(np.all((d[interior, 1:] > 0.75 * nn0) & (d[interior, 1:] < 1.25 * nn0), axis=1).mean()),
        "dup": float((d[:, 1] < 0.5 * nn0).mean()),
    }


@pytest.mark.parametrize("name", [
    MOS2[0],
    # known gap: this crop holds part of a line defect (a band of low Bragg amplitude running
    # diagonally through exp-001-5, likely a mirror-twin / inversion-domain boundary) where the
    # one-phase lattice model does not follow the columns. What fails now (round 34) is the density
    # alone, 1.042: 191 interior sites where the spectrum's cell gives room for 183 and the local fits'
    # own cells (median 179 px^2; 162-174 px^2 in the compressed lower left) for 187; spacing, six
    # neighbours and duplicates pass (the pair of sites half a spacing apart at the top edge is gone)
    pytest.param(MOS2[1], marks=pytest.mark.xfail(strict=True, reason="line defect: one-domain lattice model")),
    MOS2[2],
])
def test_real_mos2_crop_one_site_per_node_of_the_full_site_lattice(name):
    img = np.load(DATA / name).astype(np.float32)
    nn0, site_area = fft_site_cell(img)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = find_sites(img)
    c = lattice_checks(t.xy, nn0, site_area, img.shape)
    assert abs(c["spacing"] - 1) <= 0.03, c
    assert 0.95 <= c["density"] <= 1.03, c
    assert c["six"] >= 0.98, c
    assert c["dup"] <= 0.001, c
    # every site is a node of the lattice (integer indices, unique) or a peak on none
    node = t["source"] != "off_lattice"
    ij = np.stack([t["lattice_i"][node], t["lattice_j"][node]], 1)
    assert len(np.unique(ij, axis=0)) == node.sum()
    assert (t["sublattice"][~node] == -1).all() and set(np.unique(t["sublattice"][node])) == {0, 1, 2}
    # the three sublattices alternate: a node's six first-shell nodes belong to the other two
    sub = dict(zip(map(tuple, ij.tolist()), t["sublattice"][node].tolist()))
    shell = [(1, 0), (0, 1), (-1, 1), (-1, 0), (0, -1), (1, -1)]
    same = [sub[(i + di, j + dj)] == s for (i, j), s in sub.items() for di, dj in shell if (i + di, j + dj) in sub]
    assert not any(same)
    # the faint chalcogen columns are placed, not invented: the metal is the brightest sublattice
    inten = t["intensity"]
    med = [np.median(inten[t["sublattice"] == k]) for k in range(3)]
    assert med[0] > med[1] > med[2]
    meta = t.meta["lattice"]
    assert meta["spacing_source"] == "fft ring" and 0 < meta["confidence"] <= 1


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("name", MOS2)
def test_real_mos2_crop_sites_have_six_regular_neighbours_where_the_chalcogens_are_faint(name, transpose):
    """The shared checker's six-neighbour test on every crop, the line-defect one included, as
    scanned and transposed: where faint S2 columns and noise put a few maxima on the wrong node, the
    narrow local fit follows them and places predicted sites too close to the columns (six-neighbour
    share 0.979 on exp-001-5 before the wider fit took over around such sites)."""
    img = np.load(DATA / name).astype(np.float32)
    img = np.ascontiguousarray(img.T) if transpose else img
    nn0, site_area = fft_site_cell(img)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = find_sites(img)
    c = lattice_checks(t.xy, nn0, site_area, img.shape)
    assert c["six"] >= 0.98 and c["dup"] <= 0.001, c


@pytest.mark.parametrize("name", MOS2)
def test_real_mos2_strips_get_the_site_lattice_not_its_sqrt3_denser_superlattice(name):
    """100 and 90 px high strips of the real MoS2 crops (256 px long; 4-7 metal periods across, 10-14 px
    site spacing), along x and transposed: the first Bragg ring's radius is under 6 bins of the short side,
    but most of its spots lie beyond 6 bins along the long one. Read by the short side alone, 13 of
    these 18 strips got no lattice or the sqrt(3) denser one (spacing 0.55-0.69 of the true one). Each
    strip now gets the crop's spacing within 6 % (an 18 %-anisotropic scan's 100 px strips vary), its
    interior sites six regular neighbours, and no two sites on one node."""
    img = np.load(DATA / name).astype(np.float32)
    ref, area = fft_site_cell(img)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for strip in (img[:100], img[100:200], img[:, :100].T, img[:90], img[:100].T, img[146:256]):
            strip = np.ascontiguousarray(strip)
            t = find_sites(strip)
            assert t.meta["status"] == "ok" and abs(t.meta["spacing_px"] / ref - 1) < 0.06, (strip.shape, t.meta["spacing_px"] / ref)
            c = lattice_checks(t.xy, ref, area, strip.shape)  # (a strip's interior is too small for the density)
            assert abs(c["spacing"] - 1) < 0.06 and c["six"] >= 0.95 and c["dup"] == 0, (strip.shape, c)


@pytest.mark.parametrize("name", ["wse2_ti2_haadf_crop.npy", "wse2_ti2_maadf_crop.npy", "wse2_cr9_adf2_crop.npy"])
def test_small_real_crops_get_the_site_lattice_or_none_never_its_sqrt3_denser_superlattice(name):
    """48 and 64 px pieces of the real WSe2 crops (7-13 site spacings across): the first Bragg ring
    lies too near the spectrum's centre there, and the second ring's lattice (sqrt(3) denser) was
    taken silently in 11 of these 30 pieces before (spacing 0.57-0.58 of the true one). Each piece now gets
    the crop's spacing (within 5 %) or no lattice, and most get the lattice."""
    img = np.load(DATA / name).astype(np.float32)
    ref, _ = fft_site_cell(img)
    got = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for side in (48, 64):
            for o in (0, 52, 104, 156, 208 - (side - 48)):
                t = find_sites(np.ascontiguousarray(img[o:o + side, o:o + side]), material="wse2")
                got.append(t.meta["spacing_px"] / ref if len(t) else np.nan)
    got = np.array(got)
    found = np.isfinite(got)
    assert np.all(np.abs(got[found] - 1) < 0.05), got
    assert found.mean() >= 0.8


def test_real_wse2_crop_at_five_px_spacing_matches_the_authors_labels():
    img = np.load(DATA / "wse2_ti2_haadf_crop.npy").astype(np.float32)
    lxy, lname = read_labels()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = find_sites(img, material="wse2")
    d3, _ = cKDTree(lxy).query(lxy, k=4)
    nn = float(np.median(d3[:, 1:]))
    assert 4.5 < t.meta["spacing_px"] < 5.5
    xy = t.xy
    # recall: every labelled site has an output site within 0.4 nn (the crop cuts the columns at
    # its edge: labelled sites within a spacing of it are left out)
    dl, jl = cKDTree(xy).query(lxy)
    lin = (lxy.min(1) >= nn) & (lxy.max(1) <= img.shape[0] - 1 - nn)
    assert (dl[lin] <= 0.4 * nn).mean() >= 0.995
    # precision: an output site sits on a labelled site or on a hexagon centre (>= 5 labelled
    # sites at 0.75-1.25 nn, none within 0.6 nn); sites within a spacing of the crop edge, where
    # the labels' own border is, are left out
    tree = cKDTree(lxy)
    d_lab, _ = tree.query(xy)
    cnt = np.array([len(v) for v in tree.query_ball_point(xy, 1.25 * nn)])
    near = np.array([len(v) for v in tree.query_ball_point(xy, 0.75 * nn)])
    centre = (cnt - near >= 5) & (d_lab > 0.6 * nn)
    inner = (xy.min(1) > nn) & (xy.max(1) < img.shape[0] - 1 - nn)
    ok = (d_lab <= 0.4 * nn) | centre
    assert ok[inner].mean() >= 0.99
    d2, _ = cKDTree(xy).query(xy, k=2)
    assert (d2[:, 1] < 0.5 * nn).mean() <= 0.001
    # sublattices: the W columns are metal, the Se2 columns chalcogen
    sub = t["sublattice"][jl]
    matched = dl <= 0.4 * nn
    assert (sub[matched & (lname == "W")] == 0).mean() >= 0.99
    assert (sub[matched & (lname == "Se2")] == 1).mean() >= 0.99


@pytest.mark.parametrize("name", [MOS2[0], MOS2[2]])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_real_mos2_crop_at_low_dose_has_one_site_per_column(name, seed):
    # the crop re-drawn with shot noise at ~30 counts at the brightest pixel: noise splits a column
    # into two maxima; the second one must join its column, not become an off-lattice "adatom"
    # half a spacing from it (a duplicate for the checker)
    img = np.load(DATA / name).astype(np.float64)
    nn0, site_area = fft_site_cell(img)
    img = np.random.default_rng(seed).poisson(np.clip(img, 0, None) / img.max() * 30.0).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = find_sites(img)
    c = lattice_checks(t.xy, nn0, site_area, img.shape)
    assert abs(c["spacing"] - 1) <= 0.03, c
    assert c["dup"] <= 0.001, c
    off = t["source"] == "off_lattice"
    if off.any():  # an off-lattice site is resolved from every column
        d, _ = cKDTree(t.xy[~off]).query(t.xy[off])
        assert (d >= SPLIT_NN * t.meta["lattice"]["spacing_px"]).all(), d


_EDGE_002_5_60 = ("at 60 % vacuum, exp-002-5's crop keeps 7 spacings of film: its lattice comes out 4.2 % "
                  "wide and 5 of the 80 far-film sites are displaced, with a crowding warning (round 22). "
                  "Until then the test passed only because the lattice was 2.7x too wide (flagged uncertain), "
                  "which left one site in the film checked")


@pytest.mark.parametrize("name, vacuum_share", [
    (n, v) if (n, v) != ("mos2_exp-002-5_crop.npy", 0.6) else
    pytest.param(n, v, marks=pytest.mark.xfail(reason=_EDGE_002_5_60, strict=True))
    for v in (0.4, 0.6) for n in MOS2])
def test_real_mos2_crop_at_a_flake_edge_has_no_sites_in_the_vacuum(name, vacuum_share):
    """A flake edge: 40 % or 60 % of the crop beyond a slanted line is vacuum (darker than any film
    pixel, with its own noise). No site lies more than half a spacing out in it, the spacing is the
    crop's own (within the checker's 3 %), and the film keeps its sites. (The vacuum's noise maxima
    were indexed as columns -- on exp-000-2 the site lattice filled the vacuum, 891 sites in the full
    image -- and the band-pass response of the edge kept the hole test from reaching it, so predicted
    sites were placed up to two spacings out.)"""
    img = np.load(DATA / name).astype(np.float64)
    H, W = img.shape
    yy, xx = np.mgrid[:H, :W]

    def depth(x, y):  # signed distance from the edge, px; negative in the vacuum
        return (x + 0.3 * (y - H / 2) - vacuum_share * W) / np.hypot(1.0, 0.3)

    vacuum = depth(xx, yy) < 0
    edge = img.copy()
    edge[vacuum] = 0.8 * np.percentile(img, 1) + np.random.default_rng(0).normal(0, 0.3 * img.std(), vacuum.sum())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, t = find_sites(img), find_sites(edge)
    nn = t.meta["spacing_px"]
    assert abs(nn / ref.meta["spacing_px"] - 1) <= 0.03, (nn, ref.meta["spacing_px"])
    d = depth(t.xy[:, 0], t.xy[:, 1])
    assert d.min() >= -0.5 * nn, np.sort(d)[:5]
    assert t.meta["holes"] and abs(t.meta["lattice"]["hole_fraction"] - vacuum.mean()) < 0.03
    # the film more than two spacings from the edge (and one inside the image border) holds the sites
    # it holds without the vacuum
    def film(xy):
        return (depth(xy[:, 0], xy[:, 1]) > 2 * nn) & (border_distance(xy, img.shape) > nn)

    far_ref, far = ref.xy[film(ref.xy)], t.xy[film(t.xy)]
    changed = max(2, 0.01 * len(far_ref))
    assert abs(len(far) - len(far_ref)) <= changed
    if len(far_ref) >= 20:  # at 60 % vacuum, exp-001-5's crop keeps one such site
        dist, _ = cKDTree(far).query(far_ref)
        assert np.median(dist) < 0.2 and (dist >= 0.5 * nn).sum() <= changed


def _analyze_crop(name: str, **overrides):
    from stemfast.config import PipelineConfig, apply_overrides
    from stemfast.model.shipped import shipped_for_run
    from stemfast.pipeline import analyze, prepare

    cfg = apply_overrides(PipelineConfig(), {"sites.material": "wse2", **overrides})
    model = shipped_for_run(cfg)
    img = np.load(DATA / name).astype(np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prep = prepare(img, config=cfg, patch_size=model.extra.get("patch_size"))
        table, summary = analyze(prep, model, config=cfg)
    return table, summary, [w for w in caught if issubclass(w.category, SublatticeNamingWarning)]


def _label_sublattice(t, labels: str = "wse2_ti2_crop.labels.csv"):
    """The output sublattice of each labelled site of a WSe2 crop (the Ti crop's two detectors: the
    same scan), and those labels."""
    lxy, lname = read_labels(labels)
    dl, jl = cKDTree(t.xy).query(lxy)
    ok = dl <= 2.0
    return t["sublattice"][jl][ok], t["defect_kind"][jl][ok], lname[ok]


def test_real_wse2_second_detector_names_its_sublattices_as_told_and_warns_when_the_dark_sites_disagree():
    # the second detector (ADF2) of the labelled WSe2 scan shows the Se2 pairs brighter than the W:
    # named by brightness, the W columns become "Se2" and the Se vacancies "vacancy_W". The dark sites
    # (Se vacancies) then sit on the sublattice named metal: the analysis says so
    t, s, caught = _analyze_crop("wse2_ti2_maadf_crop.npy")
    sub, kind, lname = _label_sublattice(t)
    assert (sub[lname == "W"] == 1).mean() >= 0.99  # named by brightness: swapped
    assert caught and "sites.chalcogen_brighter = true" in s["naming_warning"]
    assert s["sublattice_naming"]["dark"]["W"] >= 20 and s["sublattice_naming"]["dark"]["Se2"] <= 3
    # told that the chalcogen is brighter: W is the metal, the vacancies are Se vacancies, no warning
    t, s, caught = _analyze_crop("wse2_ti2_maadf_crop.npy", **{"sites.chalcogen_brighter": True})
    sub, kind, lname = _label_sublattice(t)
    assert (sub[lname == "W"] == 0).mean() >= 0.99 and (sub[lname == "Se2"] == 1).mean() >= 0.99
    assert not caught and "naming_warning" not in s
    named = kind[(lname == "V_Se") & (kind != "none")]
    assert len(named) >= 20 and np.isin(named, ["vacancy_Se", "vacancy_Se2"]).mean() >= 0.9
    # the first detector (HAADF, Z-contrast): W brightest, nothing to warn about
    t, s, caught = _analyze_crop("wse2_ti2_haadf_crop.npy")
    sub, kind, lname = _label_sublattice(t)
    assert (sub[lname == "W"] == 0).mean() >= 0.99 and not caught and "naming_warning" not in s


def test_real_cr_doped_wse2_second_detector_is_named_from_its_dark_sites_and_ranks_them_first():
    # another sample, dopant and sampling (Cr-doped WSe2, ADF2 only, 7.2 px site spacing): the Se2
    # pairs outshine the W, and besides the Se vacancies (on the chalcogen) the Cr dopants are dark on
    # the metal sites -- 30 dark sites against 8 in this crop, too even for a "5x as many" rule, but
    # far beyond chance (sign test). Told the chalcogen is brighter, the names come out right
    labels = "wse2_cr9_crop.labels.csv"
    t, s, caught = _analyze_crop("wse2_cr9_adf2_crop.npy")
    assert 6.8 < t.meta["spacing_px"] < 7.6
    sub, kind, lname = _label_sublattice(t, labels)
    assert (sub[lname == "W"] == 1).mean() >= 0.99 and (sub[lname == "Se2"] == 0).mean() >= 0.99
    assert caught and "sites.chalcogen_brighter = true" in s["naming_warning"]
    assert s["sublattice_naming"]["p_metal"] <= 0.01
    t, s, caught = _analyze_crop("wse2_cr9_adf2_crop.npy", **{"sites.chalcogen_brighter": True})
    sub, kind, lname = _label_sublattice(t, labels)
    assert (sub[lname == "W"] == 0).mean() >= 0.99 and (sub[lname == "Se2"] == 1).mean() >= 0.99
    assert not caught and "naming_warning" not in s
    named = kind[(lname == "V_Se") & (kind != "none")]
    assert len(named) >= 20 and np.isin(named, ["vacancy_Se", "vacancy_Se2"]).mean() >= 0.9
    # the Cr dopants: dark metal sites, yet well above an empty column -- a light atom on the W site
    assert (lname == "Cr").sum() >= 5 and (kind[lname == "Cr"] == "substitution_W").mean() >= 0.8
    # the ranking, over the output sites inside the labelled field (the labels stop 13 px from the
    # full image's edge, 1.5 spacings more are left out as the shared scorer does): the authors'
    # vacancies and dopants come first
    lxy, lname = read_labels(labels)
    nn = 7.2
    lo, hi = np.maximum(lxy.min(0), 0) + 1.5 * nn, np.minimum(lxy.max(0), 255) - 1.5 * nn
    xy = t.xy
    inside = np.all((xy > lo) & (xy < hi), 1)
    d, j = cKDTree(lxy).query(xy)
    positive = (d < 0.4 * nn) & np.isin(lname[j], ["V_Se", "Cr"])
    score = np.nan_to_num(np.asarray(t["anomaly_score"], np.float64), nan=-1e9)
    assert positive[inside].sum() >= 25
    assert average_precision(score[inside], positive[inside]) >= 0.85


@pytest.mark.parametrize("name", MOS2 + ["wse2_ti2_haadf_crop.npy", "wse2_ti2_maadf_crop.npy", "wse2_cr9_adf2_crop.npy"])
def test_real_crops_find_their_best_sublattice_nearly_whole(name):
    """On real scans -- faint S2, contamination, a second detector -- the metal (or chalcogen) columns
    are found on nearly every site of their sublattice (0.9-8.3 % placed by the lattice on these crops,
    at most 5.8 % on the whole evaluation scans), far from the share that flags a lattice finer than
    the crystal's (``sites.MAX_SUBLATTICE_PLACED``)."""
    img = np.load(DATA / name).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lat = find_sites(img).meta["lattice"]
    assert lat["best_sublattice_placed"] <= 0.15, lat["best_sublattice_placed"]
    assert not any("no column was found" in u for u in lat["unsure"]), lat["unsure"]
