"""Regions without data (stemfast.nodata): the padding of an aligned or drift-corrected frame, a
rotated image's corners, a mask. Nothing is found, placed or judged there, and they are not taken
for a cut black level or for offset scan lines."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from stemfast.batch.outputs import lattice_warnings
from stemfast.nodata import no_data
from stemfast.scanlines import scan_line_offsets
from stemfast.sites import find_sites
from stemfast.synthetic import make_mos2

PAD_X, PAD_Y = 37, 21


@pytest.fixture(scope="module")
def frames():
    """A synthetic MoS2 frame, and the same field shifted by (37, 21) px with the margin filled by
    zeros (as an aligned frame of a series) and by the frame's mean."""
    img = make_mos2(shape=(320, 320), seed=8, rates=(0.02, 0.01, 0.005, 0.005)).image.astype(np.float32)
    out = {"frame": img}
    for name, fill in (("zeros", 0.0), ("mean", float(img.mean()))):
        a = np.full_like(img, np.float32(fill))
        a[PAD_Y:, PAD_X:] = img[:-PAD_Y, :-PAD_X]
        out[name] = a
    return out


def _sites(img):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return find_sites(img)


def test_constant_blocks_are_found_to_the_pixel_and_noise_is_data(frames):
    nd = no_data(frames["zeros"])
    m = nd.pixels()
    truth = np.zeros(m.shape, bool)
    truth[:PAD_Y] = True
    truth[:, :PAD_X] = True
    np.testing.assert_array_equal(m, truth)
    assert nd.share() == pytest.approx(truth.mean())
    assert not no_data(frames["frame"]).any()
    counts = np.random.default_rng(2).poisson(0.1, (256, 256)).astype(np.float32)  # low-dose counts: data
    assert not no_data(counts).any()
    with pytest.raises(ValueError):
        no_data(np.zeros(5))


@pytest.mark.parametrize("fill", ["zeros", "mean"])
def test_a_padded_frame_gets_no_sites_in_its_margin_and_the_same_judgement_inside(frames, fill):
    ref, t = _sites(frames["frame"]), _sites(frames[fill])
    lat = t.meta["lattice"]
    assert lat["no_data"]["share"] == pytest.approx(1 - (320 - PAD_X) * (320 - PAD_Y) / 320 ** 2, abs=1e-3)
    assert lat["no_data"]["warning"] in lattice_warnings(lat)
    # a zero margin is no cut black level, and its rows are no offset scan lines
    assert "clipping" not in lat and not lat["scan_lines"]["flagged_rows"]
    # no site inside the margin beyond the columns its edge cuts (half a spacing)
    nn = t.meta["spacing_px"]
    xy = t.xy
    assert not ((xy[:, 0] < PAD_X - 0.5 * nn) | (xy[:, 1] < PAD_Y - 0.5 * nn)).any()
    # the sites of the field's interior are the unpadded frame's, and those near the margin are not judged
    obs = np.asarray(t["observed"], bool)
    assert not obs[(xy[:, 0] < PAD_X + 0.9 * nn) | (xy[:, 1] < PAD_Y + 0.9 * nn)].any()
    inner = (xy[:, 0] > PAD_X + 3 * nn) & (xy[:, 1] > PAD_Y + 3 * nn) & (xy < 320 - 3 * nn).all(1)
    d = np.hypot(*(ref.xy[None, :, :] - (xy[inner] - [PAD_X, PAD_Y])[:, None, :]).transpose(2, 0, 1)).min(1)
    assert np.median(d) < 0.05 and (d < 1.0).mean() > 0.99


def test_scan_line_offsets_leave_pixels_without_data_out():
    yy, xx = np.mgrid[0:96, 0:96].astype(float)
    img = 10 + 5 * np.cos(2 * np.pi * xx / 8) * np.cos(2 * np.pi * yy / 8)
    img += np.random.default_rng(0).normal(0, 0.5, img.shape)
    img[40:42] += 3.0  # a streak of two lines
    padded = img.copy()
    padded[:, :20] = np.nan  # a margin without data
    padded[:10] = np.nan     # lines without any data: no offset
    vec = [[8.0, 8.0], [8.0, -8.0], [0.0, 16.0]]
    lines = scan_line_offsets(padded, vec)
    assert lines.rows.tolist() == [40, 41] and np.isnan(lines.offset[:10]).all()
    assert np.round(lines.offset[40:42]).tolist() == [3.0, 3.0]


def test_a_padded_companion_is_read_as_the_padded_frame(frames):
    """The second detector's image of a padded frame has the same margin: its lines' statistics leave
    it out too, so it reads the columns as the first image does (here: the same image, scaled)."""
    from stemfast.sites import companion_intensity

    t = _sites(frames["zeros"])
    c = companion_intensity(1.3 * frames["zeros"], t)
    np.testing.assert_allclose(c, 1.3 * np.asarray(t["column_intensity"], np.float64), rtol=1e-4, atol=1e-4)


def test_a_rotated_frame_has_no_data_in_its_corners_to_the_pixel(frames):
    """A frame rotated onto a larger canvas (corners zero-filled; the interpolation's staircase along
    the diagonal edges is no whole block): the corners are found to the pixel, they are no cut black
    level, and the sites outside the field are columns its edge cuts."""
    from scipy import ndimage

    img = frames["frame"]
    rot = ndimage.rotate(img, 15, reshape=True, order=1, cval=0.0).astype(np.float32)
    field = ndimage.rotate(np.ones_like(img), 15, reshape=True, order=1, cval=0.0) > 0
    nd = no_data(rot)
    assert (nd.pixels() == ~field).mean() > 0.999
    t = _sites(rot)
    lat = t.meta["lattice"]
    assert "clipping" not in lat and lat["no_data"]["share"] == pytest.approx((~field).mean(), abs=0.002)
    depth = ndimage.distance_transform_edt(~field)  # px into the corners
    r = np.clip(np.rint(t.xy[:, 1]).astype(int), 0, rot.shape[0] - 1)
    c = np.clip(np.rint(t.xy[:, 0]).astype(int), 0, rot.shape[1] - 1)
    assert depth[r, c].max() <= 0.5 * t.meta["spacing_px"] + 1


def test_a_zero_count_hole_at_low_dose_is_no_data_and_the_film_around_it_is_data():
    """Low-dose counts (~1 a pixel: over half the film's pixels are 0) with a hole of vacuum that
    recorded no counts. The hole is a region without data; the film's zero-count pixels join up
    across the image (above the percolation threshold), and the region must not creep through them
    (it did: 60-75 % of a real MoS2 scan at this dose was called without data, and sites were lost)."""
    img = make_mos2(shape=(320, 320), seed=8, rates=(0.0, 0.0, 0.0, 0.0)).image.astype(np.float64)
    lam = 2.5 * (img - img.min()) / (img.max() - img.min())
    yy, xx = np.mgrid[:320, :320]
    hole = (xx - 150) ** 2 + (yy - 170) ** 2 < 45 ** 2
    film = np.random.default_rng(3).poisson(lam).astype(np.uint16)
    counts = np.where(hole, 0, film).astype(np.uint16)
    assert (counts[~hole] == 0).mean() > 0.6  # the film's zeros percolate
    m = no_data(counts).pixels()
    assert m[hole].mean() > 0.97
    assert m[~hole].mean() < 0.01
    # the whole pipeline: no sites in the hole, and around it the sites of the same film without the hole
    t, ref = _sites(counts), _sites(film)
    lat = t.meta["lattice"]
    assert lat["no_data"]["share"] == pytest.approx(hole.mean(), abs=0.01)
    assert "vacuum that recorded no counts" in lat["no_data"]["warning"]
    d = np.hypot(t.xy[:, 0] - 150, t.xy[:, 1] - 170)
    assert (d < 45 - 0.5 * t.meta["spacing_px"] - 1).sum() == 0
    far = np.hypot(ref.xy[:, 0] - 150, ref.xy[:, 1] - 170) > 45 + 2 * t.meta["spacing_px"]
    far_t = d > 45 + 2 * t.meta["spacing_px"]
    assert abs(int(far_t.sum()) - int(far.sum())) <= 0.01 * far.sum()


def _constant_blocks_reference(a: np.ndarray, b: int) -> np.ndarray:
    """Every whole b px block read whole: max == min (what the five-pixel screen must agree with)."""
    h, w = a.shape[0] // b, a.shape[1] // b
    s = a[: h * b, : w * b].reshape(h, b, w, b)
    return s.max(axis=(1, 3)) == s.min(axis=(1, 3))


@pytest.mark.parametrize("seed", range(6))
def test_the_block_screen_finds_exactly_the_constant_blocks(seed):
    """no_data screens each block on five of its pixels before reading it whole; the constant blocks
    must be exactly those a full reading finds -- on float noise, on low-count integer data (blocks
    whose five pixels agree by chance) and with planted constant patches of any size and offset."""
    from stemfast.nodata import _constant_blocks

    rng = np.random.default_rng(seed)
    H, W = rng.integers(40, 300, 2)
    for a in (rng.normal(size=(H, W)).astype(np.float32), rng.poisson(0.05, (H, W)).astype(np.uint8),
              rng.integers(0, 2, (H, W)).astype(np.int16)):
        for _ in range(3):
            r, c = rng.integers(0, H), rng.integers(0, W)
            a[r:r + rng.integers(1, 80), c:c + rng.integers(1, 80)] = a.dtype.type(rng.integers(0, 3))
        for b in (1, 3, 8):
            const, first = _constant_blocks(a, b)
            np.testing.assert_array_equal(const, _constant_blocks_reference(a, b))
            np.testing.assert_array_equal(first, a[: (H // b) * b: b, : (W // b) * b: b])


def _annotated(img: np.ndarray, x0: int, y0: int, seed: int = 7, bar: int = 5,
               black: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``img`` with a burnt-in annotation at ``(x0, y0)`` as an exported picture carries one: a ``bar``
    x 90 px scale bar and a 12 x 50 px line of "text" (1 px strokes) 8 px above it, at the display's
    white (the image's new maximum; with ``black``, its new minimum); and the annotation's pixels."""
    out = img.astype(np.float32).copy()
    white = np.float32(out.min() - 0.25 * np.ptp(out) if black else out.max() * 1.25)
    drawn = np.zeros(out.shape, bool)
    drawn[y0 + 20:y0 + 20 + bar, x0:x0 + 90] = True
    glyphs = np.random.default_rng(seed).random((12, 50)) < 0.35
    drawn[y0:y0 + 12, x0 + 20:x0 + 70] |= glyphs
    out[drawn] = white
    return out, drawn


@pytest.mark.parametrize("name", ["wse2_ti2_haadf_crop.npy", "mos2_exp-000-2_crop.npy", "wse2_cr9_adf2_crop.npy"])
def test_a_burnt_in_scale_bar_and_its_text_are_no_data_and_nothing_else(name):
    """An exported picture's scale bar and text hide the data under them, but are thinner than the
    constant blocks the no-data test reads: every drawn pixel is found, nothing more than a few pixels
    from them (the letters' insides and a 1 px rim), and nothing on the recorded crop, on it with its
    brightest 0.5 % saturated (a detector's clipped column cores; an 8-bit export's auto contrast),
    or on it rounded to 8 bits. Exported with its brightest 0.5 % saturated at the annotation's white
    (an 8-bit export's auto contrast), the bar and the text's strokes (larger than the clipped column
    cores) are found, and no column is taken."""
    from scipy import ndimage

    from real_data import DATA
    from stemfast.nodata import overlay_pixels

    img = np.load(DATA / name).astype(np.float32)
    ann, drawn = _annotated(img, 40, 200)
    m = overlay_pixels(ann)
    assert m is not None and m[drawn].all()
    assert not (m & ~ndimage.binary_dilation(drawn, iterations=3)).any()
    assert m.sum() <= 3 * drawn.sum(), (m.sum(), drawn.sum())
    clipped = np.minimum(ann, np.quantile(img, 0.995))
    clipped[drawn] = clipped.max()
    mc = overlay_pixels(clipped)
    bar = np.zeros_like(drawn)
    bar[220:225, 40:130] = True
    # the text's strokes are told from the clipped columns by size: larger than any of them elsewhere
    assert mc[bar].all() and mc[drawn].mean() >= 0.9 and not (mc & ~ndimage.binary_dilation(drawn, iterations=3)).any()
    nd = no_data(ann)
    assert nd.overlay is not None and nd.overlay[0] == m.sum() and (nd.pixels() == m).all()
    assert nd.overlay[1] == (39, 199, 130, 225)  # the bar and the text, grown by a pixel
    for plain in (img, np.minimum(img, np.quantile(img, 0.995)),
                  np.round((img - img.min()) / np.ptp(img) * 255)):
        assert overlay_pixels(plain) is None and no_data(plain).overlay is None


def test_find_sites_places_no_site_on_a_burnt_in_annotation_and_says_so():
    """On the real WSe2 crop with a burnt-in scale bar and text, no site is judged on the annotation
    (sites were placed on the white bar, the brightest "columns" of the image), the summary says where
    it is, the clipping check does not take it for a saturated detector, and the sites away from it
    are those of the crop as recorded."""
    from scipy.spatial import cKDTree

    from real_data import DATA

    img = np.load(DATA / "wse2_ti2_haadf_crop.npy").astype(np.float32)
    ann, drawn = _annotated(img, 40, 200)
    ref, t = _sites(img), _sites(ann)
    nn = t.meta["spacing_px"]
    meta = t.meta["lattice"]["no_data"]
    assert meta["overlay"]["box"] == [39, 199, 130, 225] and "annotation" in meta["warning"]
    assert any("annotation" in w for w in lattice_warnings(t.meta["lattice"]))
    assert "clipping" not in t.meta["lattice"]
    on = drawn[np.clip(np.rint(t.xy[:, 1]).astype(int), 0, 255), np.clip(np.rint(t.xy[:, 0]).astype(int), 0, 255)]
    assert not (on & np.asarray(t["observed"], bool)).any()
    d, _ = cKDTree(np.argwhere(drawn)[:, ::-1]).query(t.xy)
    far = d > 2 * nn
    dr, _ = cKDTree(ref.xy).query(t.xy[far])
    assert (dr < 0.1).mean() >= 0.99, (dr < 0.1).mean()
    dref, _ = cKDTree(np.argwhere(drawn)[:, ::-1]).query(ref.xy)
    assert abs(int(far.sum()) - int((dref > 2 * nn).sum())) <= 2


@pytest.mark.parametrize("bar", [1, 2, 3])
def test_a_thin_scale_bar_is_an_annotation_not_a_dropout(bar):
    """A scale bar of one to three lines reads like a part of lines the detector did not record (one
    value over 90 px): it was filled from the lines around it before the annotation test, which then
    found no bar and left the text to be read as columns. It is the annotation's: left in place, found
    with its text, no observed site on either, and no dropout recorded. (A dropout away from an
    annotation is still filled: tests/test_scanlines.py.)"""
    from real_data import DATA

    img = np.load(DATA / "wse2_ti2_haadf_crop.npy").astype(np.float32)
    ann, drawn = _annotated(img, 40, 200, bar=bar)
    t = _sites(ann)
    meta = t.meta["lattice"]
    assert meta["no_data"]["overlay"]["box"] == [39, 199, 130, 220 + bar]
    assert "dead" not in meta["scan_lines"]
    on = drawn[np.clip(np.rint(t.xy[:, 1]).astype(int), 0, 255), np.clip(np.rint(t.xy[:, 0]).astype(int), 0, 255)]
    assert not (on & np.asarray(t["observed"], bool)).any()
    # the same bar at the image's minimum (a part of lines the detector lost) is a dropout, filled
    lost = img.copy()
    lost[220:220 + bar, 40:130] = img.min()
    assert len(_sites(lost).meta["lattice"]["scan_lines"]["dead"]) == bar


@pytest.mark.parametrize("name", ["wse2_ti2_haadf_crop.npy", "mos2_exp-000-2_crop.npy"])
def test_a_black_scale_bar_and_its_text_are_no_data(name):
    """A scale bar and text drawn in black (the image's minimum) are found as the white ones are, on
    the recorded crop and rounded to 8 bits with its darkest 0.5 % clipped at the bar's black (an
    export's auto contrast: a dark part of the image that touches a stroke may go with it); find_sites
    places no observed site on them (before: every one of the
    WSe2 crop's sites there observed, dark, ranked as vacancies)."""
    from scipy import ndimage

    from real_data import DATA
    from stemfast.nodata import overlay_pixels

    img = np.load(DATA / name).astype(np.float32)
    ann, drawn = _annotated(img, 40, 200, black=True)
    grown = ndimage.binary_dilation(drawn, iterations=3)
    m = overlay_pixels(ann)
    assert m is not None and m[drawn].all() and not (m & ~grown).any()
    lo, hi = np.quantile(img, [0.005, 0.995])
    e8 = np.round(np.clip((ann - lo) / (hi - lo), 0, 1) * 255)
    m8 = overlay_pixels(e8)
    bar = np.zeros_like(drawn)
    bar[220:225, 40:130] = True
    # (a clipped dark part of the image that touches a stroke goes with it: at most a tenth as much)
    assert m8 is not None and m8[bar].all() and m8[drawn].mean() >= 0.9
    assert (m8 & ~grown).sum() <= 0.1 * drawn.sum(), ((m8 & ~grown).sum(), drawn.sum())
    t = _sites(ann)
    on = drawn[np.clip(np.rint(t.xy[:, 1]).astype(int), 0, 255), np.clip(np.rint(t.xy[:, 0]).astype(int), 0, 255)]
    assert not (on & np.asarray(t["observed"], bool)).any()
    assert t.meta["lattice"]["no_data"]["overlay"]["box"] == [39, 199, 130, 225]


@pytest.mark.parametrize("name", ["wse2_ti2_haadf_crop.npy", "mos2_exp-000-2_crop.npy", "wse2_cr9_adf2_crop.npy"])
def test_dark_vacuum_dark_lines_and_saturated_streaks_are_no_annotation(name):
    """What lies at the ends of an ADF image's range besides an annotation: vacuum beyond a slanted
    flake edge (noisy, darker than the film), a dark band of two lines across the film (a scan
    artefact) and a full bright line (a streak), each as recorded and in an 8-bit export with 0.5 %
    clipped at both ends, where the streak and the vacuum saturate into long runs: none is an
    annotation."""
    from real_data import DATA
    from stemfast.nodata import overlay_pixels

    img = np.load(DATA / name).astype(np.float32)
    H, W = img.shape
    yy, xx = np.mgrid[:H, :W]
    rng = np.random.default_rng(0)
    vac = img.copy()
    edge = xx + 0.3 * yy < 0.4 * W
    vac[edge] = np.percentile(img, 1) * 0.8 + rng.normal(0, 0.05 * img.std(), edge.sum())
    band = img.copy()
    band[100:102] = img.min() - 0.1 * np.ptp(img)
    streak = img.copy()
    streak[150] = img.max() + 0.5 * np.ptp(img)
    for a in (vac, band, streak):
        lo, hi = np.quantile(a, [0.005, 0.995])
        for version in (a, np.round(np.clip((a - lo) / (hi - lo), 0, 1) * 255)):
            assert overlay_pixels(version) is None
