"""Local maxima and sub-pixel refinement: kernel agreement with the NumPy reference, known answers,
and the public wrappers :func:`stemfast.peaks.find_peaks` / :func:`stemfast.peaks.refine`."""
from __future__ import annotations

import numpy as np
import pytest

from stemfast.backend import available_backends, get_kernels
from stemfast.peaks import PeakResult, default_threshold, find_peaks, refine

BACKENDS = available_backends()
REF = get_kernels("numpy")


# --------------------------------------------------------------------------------------------------
# synthetic images
# --------------------------------------------------------------------------------------------------
def gaussian_image(shape, centres, sigma=2.0, amp=1.0, background=0.0):
    """float64 image of round Gaussian blobs (amp may be per blob, each rendered within +-6 sigma)
    on a constant background."""
    img = np.full(shape, float(background))
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    amps = np.broadcast_to(np.asarray(amp, dtype=np.float64), (len(centres),))
    r = int(np.ceil(6 * sigma))
    for (cx, cy), a in zip(centres, amps):
        x0, x1 = max(int(np.floor(cx)) - r, 0), min(int(np.floor(cx)) + r + 2, shape[1])
        y0, y1 = max(int(np.floor(cy)) - r, 0), min(int(np.floor(cy)) + r + 2, shape[0])
        if x0 >= x1 or y0 >= y1:
            continue
        y, x = np.mgrid[y0:y1, x0:x1]
        img[y0:y1, x0:x1] += a * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2.0 * sigma**2))
    return img


def tri_lattice_points(shape, spacing, angle_deg=7.0, shift=(3.3, 2.1), margin=0.0):
    t = np.deg2rad(angle_deg)
    a1 = spacing * np.array([np.cos(t), np.sin(t)])
    a2 = spacing * np.array([np.cos(t + np.pi / 3), np.sin(t + np.pi / 3)])
    n = int(2 * max(shape) / spacing) + 2
    m, k = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1))
    pts = m.ravel()[:, None] * a1 + k.ravel()[:, None] * a2 + np.asarray(shift)
    keep = (
        (pts[:, 0] >= margin) & (pts[:, 0] <= shape[1] - 1 - margin)
        & (pts[:, 1] >= margin) & (pts[:, 1] <= shape[0] - 1 - margin)
    )
    return pts[keep]


@pytest.fixture(scope="module")
def lattice():
    """Noisy triangular lattice of Gaussian columns, 256 x 256, spacing 12 px (float32)."""
    rng = np.random.default_rng(1)
    pts = tri_lattice_points((256, 256), 12.0, margin=-6.0)
    img = gaussian_image((256, 256), pts, sigma=2.0, amp=1.0, background=0.2)
    img += rng.normal(0.0, 0.03, img.shape)
    return img.astype(np.float32), pts


def brute_force_maxima(img, radius, threshold, border):
    """Literal transcription of the contract, one pixel at a time."""
    h, w = img.shape
    out = []
    r = int(np.floor(radius))
    for y in range(border, h - border):
        for x in range(border, w - border):
            v = img[y, x]
            if not float(v) > threshold:
                continue
            ok = True
            for dy in range(-r, r + 1):
                for dx in range(-r, r + 1):
                    if (dy, dx) == (0, 0) or dy * dy + dx * dx > radius * radius:
                        continue
                    qy, qx = y + dy, x + dx
                    if not (0 <= qy < h and 0 <= qx < w):
                        continue
                    later = dy > 0 or (dy == 0 and dx > 0)
                    if (later and not img[qy, qx] < v) or (not later and not img[qy, qx] <= v):
                        ok = False
            if ok:
                out.append((x, y))
    return np.array(out, dtype=np.int64).reshape(-1, 2)


# --------------------------------------------------------------------------------------------------
# local_maxima kernel
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("radius", [0.5, 1.0, 1.5, 2.3])
def test_reference_local_maxima_matches_contract_brute_force(radius):
    rng = np.random.default_rng(3)
    img = np.round(rng.random((23, 29)) * 5).astype(np.float32)  # many exact ties
    for threshold, border in [(-np.inf, 0), (2.0, 0), (1.0, 3)]:
        got = REF.local_maxima(img, radius, threshold, border)
        np.testing.assert_array_equal(got, brute_force_maxima(img, radius, threshold, border))


@pytest.mark.parametrize("backend", BACKENDS)
def test_local_maxima_backends_agree(backend, lattice):
    kern = get_kernels(backend)
    rng = np.random.default_rng(4)
    plateaus = np.round(rng.random((61, 77)) * 6).astype(np.float32)  # ties everywhere
    smooth = lattice[0]
    for img in (plateaus, smooth, np.ascontiguousarray(smooth[:, :5])):
        for radius in (0.5, 1.0, 1.2, 1.5, 3.0, 6.4):
            for threshold, border in [(-np.inf, 0), (0.5, 0), (0.5, 7), (10.0, 0), (-np.inf, 40)]:
                ref = REF.local_maxima(img, radius, threshold, border)
                got = np.asarray(kern.local_maxima(img, radius, threshold, border))
                assert got.dtype == np.int64 and got.shape == ref.shape
                np.testing.assert_array_equal(got, ref, err_msg=f"{backend} r={radius} t={threshold} b={border}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_plateau_last_pixel_in_raster_order_wins(backend):
    kern = get_kernels(backend)
    img = np.zeros((12, 14), np.float32)
    img[4:6, 5:8] = 1.0  # 2 x 3 plateau: the last pixel in raster order is (x=7, y=5)
    np.testing.assert_array_equal(kern.local_maxima(img, 3.0, 0.5, 0), [[7, 5]])
    # two equal single-pixel peaks: within the radius only the later one survives, beyond both do
    img = np.zeros((20, 20), np.float32)
    img[5, 5] = img[7, 8] = 2.0  # distance sqrt(13) = 3.61
    np.testing.assert_array_equal(kern.local_maxima(img, 3.7, 0.0, 0), [[8, 7]])
    np.testing.assert_array_equal(kern.local_maxima(img, 3.6, 0.0, 0), [[5, 5], [8, 7]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_is_strict_and_border_excludes_but_still_competes(backend):
    kern = get_kernels(backend)
    img = np.zeros((30, 30), np.float32)
    img[10, 10] = 1.0
    img[20, 20] = 2.0
    img[15, 2] = 3.0  # in a 4 px border
    img[15, 6] = 2.5  # inside, but its disc reaches the higher border pixel
    np.testing.assert_array_equal(kern.local_maxima(img, 3.0, 1.0, 0), [[2, 15], [6, 15], [20, 20]])
    np.testing.assert_array_equal(kern.local_maxima(img, 3.0, 0.999, 0), [[10, 10], [2, 15], [6, 15], [20, 20]])
    np.testing.assert_array_equal(kern.local_maxima(img, 4.0, 0.0, 4), [[10, 10], [20, 20]])
    # the threshold compares in float64: a float32 pixel just above a float64 threshold counts
    v = np.float32(0.1)
    img2 = np.zeros((5, 5), np.float32)
    img2[2, 2] = v
    assert len(kern.local_maxima(img2, 1.0, float(v) - 1e-12, 0)) == 1
    assert len(kern.local_maxima(img2, 1.0, float(v), 0)) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_maxima_are_separated_by_more_than_the_radius(backend, lattice):
    img = lattice[0]
    for radius in (2.0, 4.5, 8.0):
        ij = get_kernels(backend).local_maxima(img, radius, -np.inf, 0).astype(np.float64)
        d2 = ((ij[:, None, :] - ij[None, :, :]) ** 2).sum(-1)
        np.fill_diagonal(d2, np.inf)
        assert d2.min() > radius**2
        # raster order
        key = ij[:, 1] * img.shape[1] + ij[:, 0]
        assert np.all(np.diff(key) > 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_local_maxima_edge_cases(backend):
    kern = get_kernels(backend)
    img = np.ones((6, 7), np.float32)
    np.testing.assert_array_equal(kern.local_maxima(img, 100.0, 0.0, 0), [[6, 5]])  # one big plateau
    assert kern.local_maxima(img, 2.0, 0.0, 4).shape == (0, 2)  # border swallows everything
    assert kern.local_maxima(img, 2.0, 1.0, 0).shape == (0, 2)  # nothing strictly above
    # radius < 1: every pixel above the threshold is its own disc maximum
    assert len(kern.local_maxima(img, 0.5, 0.0, 1)) == 4 * 5
    # images thinner than the 3 x 3 neighbourhood, with ties
    rng = np.random.default_rng(8)
    for shape in [(1, 7), (7, 1), (2, 2), (1, 1), (3, 2), (2, 9)]:
        tiny = np.round(rng.random(shape) * 3).astype(np.float32)
        for radius in (0.5, 1.0, 1.5, 3.0):
            for border in (0, 1):
                np.testing.assert_array_equal(kern.local_maxima(tiny, radius, 0.5, border),
                                              REF.local_maxima(tiny, radius, 0.5, border))


# --------------------------------------------------------------------------------------------------
# refine_com / refine_gauss kernels
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_refine_kernels_agree_with_reference(backend, lattice):
    img, _ = lattice
    kern = get_kernels(backend)
    ij = REF.local_maxima(img, 5.0, 0.5, 0)
    rng = np.random.default_rng(5)
    xy = ij + rng.uniform(-0.6, 0.6, ij.shape)
    # edge / corner / outside points and a flat patch exercise the special cases
    xy = np.vstack([xy, [[0.2, 0.1], [255.4, 255.2], [-0.7, 100.0], [300.0, 5.0], [128.0, -9.0]]])
    xy = np.ascontiguousarray(xy)
    for radius in (1.0, 2.5, 4.0):
        com_ref = REF.refine_com(img, xy, radius)
        com = np.asarray(kern.refine_com(img, xy, radius))
        np.testing.assert_allclose(com, com_ref, rtol=0, atol=1e-9)
        c = np.floor(xy + 0.5)
        inside = (c >= 0).all(1) & (c[:, 0] < 256) & (c[:, 1] < 256)
        start = np.where(inside[:, None], com_ref, xy)  # COM start, raw for the outside points
        fit_ref = REF.refine_gauss(img, start, radius, radius / 2, 30)
        fit = np.asarray(kern.refine_gauss(img, start, radius, radius / 2, 30))
        assert fit.shape == (len(xy), 6)
        np.testing.assert_array_equal(fit[:, 5], fit_ref[:, 5])
        np.testing.assert_allclose(fit[:, :2], fit_ref[:, :2], rtol=0, atol=1e-6)
        np.testing.assert_allclose(fit[:, 2:5], fit_ref[:, 2:5], rtol=1e-6, atol=1e-6)  # NaN == NaN here
        if radius >= 2.5:  # (a 5-pixel disc, radius 1, hardly constrains 5 parameters)
            assert fit_ref[inside, 5].mean() > 0.9  # most real columns fit
        assert not fit_ref[~inside, 5].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_refine_com_known_answers(backend):
    kern = get_kernels(backend)
    img = np.zeros((15, 15), np.float32)
    img[7, 7] = 3.0
    img[7, 8] = 1.0  # weights (after subtracting the disc minimum 0): 3 at x=7, 1 at x=8
    np.testing.assert_allclose(kern.refine_com(img, np.array([[7.4, 6.6]]), 2.0), [[7.25, 7.0]], atol=1e-12)
    # flat disc: zero total weight returns the rounded centre (floor(v + 0.5))
    flat = np.full((9, 9), 2.0, np.float32)
    np.testing.assert_array_equal(kern.refine_com(flat, np.array([[3.5, 4.49]]), 2.0), [[4.0, 4.0]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_refine_gauss_recovers_a_subpixel_blob(backend):
    kern = get_kernels(backend)
    x0, y0, amp, sig, bg = 20.37, 17.81, 3.0, 2.1, 0.5
    clean = gaussian_image((40, 44), [(x0, y0)], sigma=sig, amp=amp, background=bg).astype(np.float32)
    fit = kern.refine_gauss(clean, np.array([[20.0, 18.0]]), 5.0, 2.5, 30)[0]
    assert fit[5] == 1.0
    np.testing.assert_allclose(fit[:5], [x0, y0, amp, sig, bg], atol=2e-4)  # float32 image rounding
    rng = np.random.default_rng(6)
    noisy = clean + rng.normal(0.0, 0.02 * amp, clean.shape).astype(np.float32)
    fit = kern.refine_gauss(noisy, np.array([[20.0, 18.0]]), 5.0, 2.5, 30)[0]
    assert fit[5] == 1.0
    assert np.hypot(fit[0] - x0, fit[1] - y0) < 0.02
    assert abs(fit[3] - sig) < 0.05


@pytest.mark.parametrize("backend", BACKENDS)
def test_refine_gauss_failures_return_start_values(backend):
    kern = get_kernels(backend)
    flat = np.full((20, 20), 1.5, np.float32)  # A0 = 0: the Gaussian columns of J vanish
    fit = kern.refine_gauss(flat, np.array([[10.2, 9.7]]), 3.0, 1.2, 30)[0]
    np.testing.assert_array_equal(fit, [10.2, 9.7, 0.0, 1.2, 1.5, 0.0])
    dip = 1.0 - gaussian_image((20, 20), [(10.0, 10.0)], sigma=2.0).astype(np.float32)  # a hole, A < 0
    fit = kern.refine_gauss(dip, np.array([[10.0, 10.0]]), 3.0, 1.5, 30)[0]
    assert fit[5] == 0.0 and fit[0] == 10.0 and fit[3] == 1.5
    out = kern.refine_gauss(flat, np.array([[-3.0, 2.0]]), 3.0, 1.2, 30)[0]  # centre outside the image
    assert out[5] == 0.0 and np.isnan(out[2]) and np.isnan(out[4]) and out[3] == 1.2
    # too few iterations to converge: ok = 0
    blob = gaussian_image((20, 20), [(10.3, 9.6)], sigma=2.0).astype(np.float32)
    assert kern.refine_gauss(blob, np.array([[10.0, 10.0]]), 3.0, 1.0, 1)[0, 5] == 0.0


@pytest.fixture(scope="module")
def mos2_counts():
    """Synthetic MoS2 in counts (dose 500: columns of a few hundred counts over a background of
    ~100, Poisson + read noise, like the dev data), its bandpass and the find_sites scales."""
    from stemfast.bandpass import bandpass
    from stemfast.synthetic import make_mos2

    syn = make_mos2(shape=(448, 448), seed=11)
    nn = float(syn.meta["nn_px"])
    img = np.ascontiguousarray(syn.image, dtype=np.float32)
    bp = bandpass(img, noise_px=0.12 * nn, background_px=nn, backend="numpy")
    return img, bp, nn, syn.truth


@pytest.mark.parametrize("backend", BACKENDS)
def test_refine_gauss_backends_agree_on_count_images(backend, mos2_counts):
    """Regression: with intensities of hundreds of counts the last steps of a fit change the cost by
    less than its rounding noise; an absolute 1e-6 step test on A and B (or steps along the flat
    valley of a wide Gaussian) was then met or not by rounding, so some fits 'converged' in one
    backend and fell back to the centre of mass (~0.1-0.3 px away) in another."""
    img, bp, nn, truth = mos2_counts
    kw = dict(min_distance=0.5 * nn, border=2, refine="gauss", refine_image=img, radius=0.25 * nn)
    ref = find_peaks(bp, backend="numpy", **kw)
    got = find_peaks(bp, backend=backend, **kw)
    assert len(ref) > 400
    np.testing.assert_array_equal(got.ok, ref.ok)
    np.testing.assert_allclose(got.xy, ref.xy, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.sigma, ref.sigma, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.amplitude, ref.amplitude, rtol=1e-7, atol=1e-6)
    np.testing.assert_allclose(got.background, ref.background, rtol=1e-7, atol=1e-6)
    # and the fits work: nearly all converge, onto the true Mo / S2 columns
    assert ref.ok.mean() > 0.95
    cols = truth[truth[:, 2] <= 1, :2]
    d = np.hypot(*(ref.xy[:, None, :] - cols[None, :, :]).transpose(2, 0, 1)).min(1)
    assert np.sqrt(np.mean(d[ref.ok & (d < 0.3 * nn)] ** 2)) < 0.25  # 0.21 here


@pytest.mark.parametrize("backend", BACKENDS)
def test_refine_gauss_converges_whatever_the_intensity_offset_and_scale(backend, mos2_counts):
    """The convergence test is relative to the disc's value range and the fit runs on values
    relative to the disc minimum: scaling the image by 1e3 or adding 1e4 counts changes no
    ``ok`` flag and moves no position beyond rounding."""
    img, bp, nn, _ = mos2_counts
    kern = get_kernels(backend)
    start = REF.refine_com(img, REF.local_maxima(bp, 0.5 * nn, 0.0, 2).astype(np.float64), 0.25 * nn)
    r = 0.25 * nn
    base = np.asarray(kern.refine_gauss(img, start, r, r / 2, 30))
    for scaled in (img * np.float32(1000.0), img + np.float32(1e4)):
        fit = np.asarray(kern.refine_gauss(np.ascontiguousarray(scaled), start, r, r / 2, 30))
        assert (fit[:, 5] == base[:, 5]).mean() > 0.995
        both = (fit[:, 5] == 1) & (base[:, 5] == 1)
        np.testing.assert_allclose(fit[both, :2], base[both, :2], rtol=0, atol=1e-4)


def test_refine_gauss_empty_input():
    img = np.zeros((8, 8), np.float32)
    for b in BACKENDS:
        k = get_kernels(b)
        assert np.asarray(k.refine_gauss(img, np.zeros((0, 2)), 2.0, 1.0, 10)).shape == (0, 6)
        assert np.asarray(k.refine_com(img, np.zeros((0, 2)), 2.0)).shape == (0, 2)


# --------------------------------------------------------------------------------------------------
# public wrappers
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_find_peaks_on_lattice(backend, lattice):
    img, pts = lattice
    res = find_peaks(img, min_distance=5, threshold=0.6, radius=4.0, backend=backend)
    assert isinstance(res, PeakResult) and res.method == "gauss" and res.threshold == 0.6
    assert res.xy.dtype == np.float64 and res.xy.shape == (len(res), 2)
    assert res.ok.dtype == bool and res.amplitude.shape == res.sigma.shape == res.background.shape == (len(res),)
    # every column whose centre is at least 2 px inside is found, and nothing else
    inner = pts[(pts >= 2).all(1) & (pts[:, 0] <= 253) & (pts[:, 1] <= 253)]
    d = np.hypot(*(res.xy[:, None, :] - inner[None, :, :]).transpose(2, 0, 1))
    assert (d.min(0) < 1.0).all()
    assert len(res) <= len(pts)
    ok = res.ok
    assert ok.mean() > 0.95
    # position error at the Cramer-Rao bound of a Gaussian spot, sqrt(2 / pi) * noise / amplitude
    # per coordinate (0.024 px here; the finite disc costs a little)
    j = np.argmin(d, axis=1)
    err = (res.xy - inner[j])[ok & (d.min(1) < 1.0)]
    crlb = np.sqrt(2 / np.pi) * 0.03 / 1.0
    assert (np.sqrt((err**2).mean(0)) < 1.25 * crlb).all()
    assert np.abs(err).max() < 6 * crlb
    np.testing.assert_allclose(np.median(res.sigma[ok]), 2.0, atol=0.05)
    c = np.floor(find_peaks(img, min_distance=5, threshold=0.6, refine=None, backend=backend).xy).astype(int)
    np.testing.assert_array_equal(res.value, img[c[:, 1], c[:, 0]])


def test_find_peaks_backends_agree(lattice):
    img, _ = lattice
    ref = find_peaks(img, min_distance=5, threshold=0.5, backend="numpy")
    for b in BACKENDS:
        got = find_peaks(img, min_distance=5, threshold=0.5, backend=b)
        np.testing.assert_array_equal(got.ok, ref.ok)
        np.testing.assert_allclose(got.xy, ref.xy, rtol=0, atol=1e-6)
        np.testing.assert_allclose(got.sigma, ref.sigma, rtol=0, atol=1e-6)


def test_find_peaks_refine_modes_and_refine_image(lattice):
    img, pts = lattice
    none = find_peaks(img, min_distance=5, threshold=0.6, refine=None)
    assert none.ok is None and none.sigma is None and none.method is None
    np.testing.assert_array_equal(none.xy, np.round(none.xy))
    com = find_peaks(img, min_distance=5, threshold=0.6, refine="com")
    assert com.method == "com" and com.ok is None
    assert np.abs(com.xy - none.xy).max() <= 2.5  # within the default radius 2.5
    # refinement runs on refine_image: on a clean lattice shifted by 0.7 px in x (rendered, not
    # rolled) the refined positions move by 0.7 px, detection and values stay those of `img`
    clean = gaussian_image(img.shape, pts, sigma=2.0).astype(np.float32)
    shifted = gaussian_image(img.shape, pts + [0.7, 0.0], sigma=2.0).astype(np.float32)
    res = find_peaks(img, min_distance=5, threshold=0.6, refine_image=shifted, radius=4.0)
    base = find_peaks(img, min_distance=5, threshold=0.6, refine_image=clean, radius=4.0)
    inner = (base.xy[:, 0] > 8) & (base.xy[:, 0] < 240) & base.ok & res.ok
    assert inner.sum() > 200
    np.testing.assert_allclose(res.xy[inner, 0] - base.xy[inner, 0], 0.7, atol=2e-3)
    np.testing.assert_allclose(res.xy[inner, 1] - base.xy[inner, 1], 0.0, atol=2e-3)
    np.testing.assert_array_equal(res.value, base.value)  # value comes from the detection image


def test_failed_gauss_fits_keep_the_com_position(lattice):
    img, _ = lattice
    xy = get_kernels("numpy").local_maxima(img, 5.0, 0.6, 0).astype(np.float64)
    g = refine(img, xy, method="gauss", radius=2.5, n_iter=2)  # too few iterations for most
    c = refine(img, xy, method="com", radius=2.5)
    assert (~g.ok).sum() > 10
    np.testing.assert_array_equal(g.xy[~g.ok], c.xy[~g.ok])
    np.testing.assert_array_equal(g.sigma[~g.ok], 1.25)


def test_default_threshold_rejects_flat_noise_of_a_bandpassed_image(lattice):
    from stemfast.bandpass import bandpass

    img, pts = lattice
    half = img.copy()
    rng = np.random.default_rng(7)
    half[:, 128:] = 0.2 + rng.normal(0.0, 0.03, (256, 128))  # vacuum-like right half
    bp = bandpass(half, spacing=12.0)
    res = find_peaks(bp, min_distance=5)
    t = default_threshold(bp)
    assert res.threshold == t
    sample = bp.reshape(-1).astype(np.float64)
    med = np.median(sample)
    assert t == pytest.approx(med + 1.4826 * np.median(np.abs(sample - med)))
    left = pts[(pts[:, 0] >= 2) & (pts[:, 0] <= 116) & (pts[:, 1] >= 2) & (pts[:, 1] <= 253)]
    d = np.hypot(*(res.xy[:, None, :] - left[None, :, :]).transpose(2, 0, 1))
    assert (d.min(0) < 1.0).all()  # every column of the lattice half
    assert (res.xy[:, 0] > 140).sum() == 0  # no noise maxima in the flat half
    # without a threshold the flat half is full of maxima
    assert (find_peaks(bp, min_distance=5, threshold=-np.inf, refine=None).xy[:, 0] > 140).sum() > 50


def test_find_peaks_matches_skimage_on_clean_lattice():
    skf = pytest.importorskip("skimage.feature")
    pts = tri_lattice_points((200, 220), 11.0, angle_deg=13.0)
    img = gaussian_image((200, 220), pts, sigma=1.8, amp=1.0).astype(np.float32)
    ours = find_peaks(img, min_distance=4, threshold=0.3, refine=None)
    theirs = skf.peak_local_max(img, min_distance=4, threshold_abs=0.3, exclude_border=False)
    a = {tuple(p) for p in ours.xy.astype(int)}
    b = {(int(c), int(r)) for r, c in theirs}
    assert a == b and len(a) > 200


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros(10), "2-D"),
        (np.zeros((0, 5)), "empty"),
        (np.zeros((4, 4, 2)), "2-D"),
        (np.zeros((2, 9)), "at least"),
        (np.array([[1.0, np.nan, 0.0]] * 4), "non-finite"),
        (np.array([[1.0, np.inf, 0.0]] * 4), "non-finite"),
        (np.zeros((4, 4), complex), "real"),
    ],
)
def test_find_peaks_rejects_bad_images(bad, match):
    with pytest.raises(ValueError, match=match):
        find_peaks(bad, min_distance=2)


def test_find_peaks_rejects_bad_arguments(lattice):
    img, _ = lattice
    for kw, match in [
        (dict(min_distance=0), "min_distance"),
        (dict(min_distance=-1.0), "min_distance"),
        (dict(min_distance=float("nan")), "min_distance"),
        (dict(min_distance=3, threshold=float("nan")), "threshold"),
        (dict(min_distance=3, border=-1), "border"),
        (dict(min_distance=3, border=1.5), "border"),
        (dict(min_distance=3, refine="fancy"), "refine"),
        (dict(min_distance=3, radius=0), "radius"),
        (dict(min_distance=3, sigma0=-1), "sigma0"),
        (dict(min_distance=3, refine_image=img[:10]), "shape"),
        (dict(min_distance=3, refine_image=np.full_like(img, np.nan)), "non-finite"),
    ]:
        with pytest.raises(ValueError, match=match):
            find_peaks(img, **kw)
    with pytest.raises(ValueError, match="outside"):
        refine(img, [[-1.0, 3.0]], radius=2)
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        refine(img, [[1.0, 2.0, 3.0]], radius=2)
    with pytest.raises(ValueError, match="method"):
        refine(img, [[5.0, 5.0]], method="fit", radius=2)
    assert len(refine(img, np.zeros((0, 2)), radius=2)) == 0
