"""Band-pass filter: the ``bandpass_apply`` kernel (backend agreement, exact mask) and the public
:func:`stemfast.bandpass.bandpass` (background removal, lattice kept, tiling, in place, validation)."""
from __future__ import annotations

import math

import numpy as np
import pytest

import importlib

from stemfast.backend import available_backends, get_kernels
from stemfast.bandpass import bandpass

BACKENDS = available_backends()
REF = get_kernels("numpy")
bp_mod = importlib.import_module("stemfast.bandpass")  # (the package attribute `bandpass` is the function)


def mask(h, w, ns, bs):
    """The contract's mask, written independently of the kernels (float64)."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f2 = fy**2 + fx**2
    m = np.ones_like(f2)
    if ns > 0:
        m = m * np.exp(-2 * np.pi**2 * ns**2 * f2)
    if bs > 0:
        m = m * (1 - np.exp(-2 * np.pi**2 * bs**2 * f2))
    return m


def tri_lattice_image(shape, spacing=12.0, sigma=2.0, noise=0.05, seed=0):
    """Triangular lattice of unit Gaussian blobs (each rendered in a +-4 sigma window) plus noise."""
    rng = np.random.default_rng(seed)
    img = np.zeros(shape)
    a1 = np.array([spacing, 0.0])
    a2 = spacing * np.array([0.5, np.sqrt(3) / 2])
    n = int(2 * max(shape) / spacing) + 2
    i, j = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1))
    pts = i.ravel()[:, None] * a1 + j.ravel()[:, None] * a2 + 1.7
    r = int(math.ceil(4 * sigma))
    keep = (pts[:, 0] > -r) & (pts[:, 0] < shape[1] + r) & (pts[:, 1] > -r) & (pts[:, 1] < shape[0] + r)
    for cx, cy in pts[keep]:
        x0, x1 = max(int(cx) - r, 0), min(int(cx) + r + 1, shape[1])
        y0, y1 = max(int(cy) - r, 0), min(int(cy) + r + 1, shape[0])
        if x0 >= x1 or y0 >= y1:
            continue
        y, x = np.mgrid[y0:y1, x0:x1]
        img[y0:y1, x0:x1] += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))
    return img + rng.normal(0.0, noise, shape)


# --------------------------------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(64, 64), (63, 50), (17, 33), (1, 8)])
@pytest.mark.parametrize("ns, bs", [(1.3, 9.0), (0.0, 5.0), (2.0, 0.0), (0.0, 0.0), (0.4, 3.0)])
def test_bandpass_apply_matches_the_mask(backend, shape, ns, bs):
    h, w = shape
    rng = np.random.default_rng(0)
    spec = (rng.normal(size=(h, w // 2 + 1)) + 1j * rng.normal(size=(h, w // 2 + 1))).astype(np.complex64)
    want = spec * mask(h, w, ns, bs).astype(np.float32)
    got = spec.copy()
    assert get_kernels(backend).bandpass_apply(got, h, w, ns, bs) is None  # in place
    np.testing.assert_allclose(got, want, rtol=2e-7, atol=1e-12 * np.abs(spec).max())
    ref = spec.copy()
    REF.bandpass_apply(ref, h, w, ns, bs)
    np.testing.assert_allclose(got, ref, rtol=2e-7, atol=1e-12 * np.abs(spec).max())


def test_cpp_bandpass_apply_refuses_copies():
    if "cpp" not in BACKENDS:
        pytest.skip("compiled extension not built")
    k = get_kernels("cpp")
    spec = np.ones((8, 5), np.complex64)
    with pytest.raises(TypeError):
        k.bandpass_apply(spec.astype(np.complex128), 8, 8, 1.0, 2.0)
    with pytest.raises(ValueError):
        k.bandpass_apply(np.ones((8, 10), np.complex64)[:, ::2], 8, 8, 1.0, 2.0)  # not contiguous
    with pytest.raises(ValueError):
        k.bandpass_apply(spec, 8, 12, 1.0, 2.0)  # shape mismatch


# --------------------------------------------------------------------------------------------------
# public filter
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lattice():
    return tri_lattice_image((192, 208)).astype(np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bandpass_backends_agree(backend, lattice):
    ref = bandpass(lattice, spacing=12.0, backend="numpy")
    got = bandpass(lattice, spacing=12.0, backend=backend)
    assert got.dtype == np.float32 and got.shape == lattice.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * float(np.abs(ref).max()))


def test_bandpass_removes_background_and_keeps_the_lattice():
    shape = (160, 176)
    y, x = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    period = 12.0
    fringes = np.cos(2 * np.pi * x / period)  # a lattice frequency along x
    ramp = 50.0 + 0.05 * x - 0.03 * y  # offset + linear background (5 units across)
    bump = 2.0 * np.exp(-((x - 80) ** 2 + (y - 60) ** 2) / (2 * 50.0**2))  # slow background bump
    ns, bs = 0.12 * period, 1.0 * period
    m = int(math.ceil(4 * bs))
    inner = (slice(m, -m), slice(m, -m))
    f2 = (1 / period) ** 2
    gain = math.exp(-2 * math.pi**2 * ns**2 * f2) * (1 - math.exp(-2 * math.pi**2 * bs**2 * f2))
    assert 0.7 < gain < 0.8
    # the fringes pass with the mask's gain at their frequency; offset and ramp are removed
    out = bandpass((fringes + ramp).astype(np.float32), spacing=period).astype(np.float64)
    assert np.abs(out[inner] - gain * fringes[inner]).max() < 2e-3
    # a slow bump is suppressed (to about -(s^2 / 2) laplacian(bump), s^2 = ns^2 + bs^2: ~6 %)
    out2 = bandpass((fringes + ramp + bump).astype(np.float32), spacing=period).astype(np.float64)
    assert np.abs(out2[inner] - gain * fringes[inner]).max() < 0.1 * bump.max()
    # a constant image filters to zero everywhere
    assert np.abs(bandpass(np.full((40, 50), 7.0), noise_px=1.0, background_px=5.0)).max() < 1e-5
    # the defaults derive from the spacing: explicit values give the same result
    np.testing.assert_array_equal(out, bandpass((fringes + ramp).astype(np.float32), noise_px=ns, background_px=bs))
    assert bp_mod.NOISE_PER_SPACING == 0.12 and bp_mod.BACKGROUND_PER_SPACING == 1.0


def test_bandpass_suppresses_pixel_noise():
    rng = np.random.default_rng(1)
    noise = rng.normal(0.0, 1.0, (128, 128)).astype(np.float32)
    out = bandpass(noise, noise_px=1.5, background_px=10.0)
    # white noise through the low-pass of sigma s keeps a std of 1 / (2 sqrt(pi) s) = 0.19
    assert 0.15 < out.std() < 0.22


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiled_equals_untiled_in_the_interior(backend):
    img = tri_lattice_image((300, 356), spacing=10.0, sigma=1.7, noise=0.1, seed=2)
    y, x = np.mgrid[:300, :356]
    img = (img + 3.0 + 0.01 * x + 0.005 * y).astype(np.float32)
    bs = 10.0
    untiled = bandpass(img, spacing=10.0, backend=backend)
    m = int(math.ceil(4 * bs))
    for tile in (160, 211):  # core 60 px and 111 px: many tiles, partial last ones
        tiled = bandpass(img, spacing=10.0, tile=tile, backend=backend)
        diff = np.abs(tiled - untiled)[m:-m, m:-m].max()
        assert diff < 1e-4 * img.std()
    # in place: `out` is the input array; identical to the out-of-place tiled result
    inplace = img.copy()
    got = bandpass(inplace, spacing=10.0, tile=160, out=inplace, backend=backend)
    assert got is inplace
    np.testing.assert_array_equal(inplace, bandpass(img, spacing=10.0, tile=160, backend=backend))


def test_untiled_out_and_in_place(lattice):
    ref = bandpass(lattice, spacing=12.0)
    out = np.full(lattice.shape, np.nan, np.float32)
    assert bandpass(lattice, spacing=12.0, out=out) is out
    np.testing.assert_array_equal(out, ref)
    a = lattice.copy()
    assert bandpass(a, spacing=12.0, out=a) is a
    np.testing.assert_array_equal(a, ref)


def test_auto_tiling_above_the_size_threshold(monkeypatch):
    # (noise_px ~1 px or more: a much narrower low-pass is cut at the Nyquist frequency and its
    # kernel rings, with ~1/distance tails at the 1e-4 level, see bandpass.OVERLAP_SIGMAS)
    img = tri_lattice_image((130, 150), spacing=6.0, sigma=1.0, noise=0.1, seed=3).astype(np.float32)
    cut = dict(noise_px=1.0, background_px=5.0)
    untiled = bandpass(img, **cut)
    calls = []
    orig = bp_mod._tiled

    def spy(*args, **kw):
        calls.append(args[4])  # tile size
        return orig(*args, **kw)

    monkeypatch.setattr(bp_mod, "_tiled", spy)
    monkeypatch.setattr(bp_mod, "AUTO_TILE_PIXELS", 100 * 100)
    monkeypatch.setattr(bp_mod, "DEFAULT_TILE", 160)  # margin 25 px: 2 x 2 tiles of core 110
    auto = bandpass(img, **cut)
    assert calls == [160]
    m = 20
    assert np.abs(auto - untiled)[m:-m, m:-m].max() < 1e-4 * img.std()


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros(10), "2-D"),
        (np.zeros((0, 5)), "empty"),
        (np.zeros((5, 0)), "empty"),
        (np.zeros((3, 3, 3)), "2-D"),
        (np.zeros((3, 40)), "at least"),
        (np.array([[1.0, np.nan, 0.0, 1.0]] * 4), "non-finite"),
        (np.array([[1.0, -np.inf, 0.0, 1.0]] * 4), "non-finite"),
        (np.zeros((8, 8), complex), "real"),
    ],
)
def test_bandpass_rejects_bad_images(bad, match):
    with pytest.raises(ValueError, match=match):
        bandpass(bad, spacing=4.0)


def test_bandpass_rejects_bad_arguments(lattice):
    for kw, match in [
        (dict(), "spacing"),
        (dict(noise_px=1.0), "background_px"),
        (dict(spacing=-1.0), "spacing"),
        (dict(noise_px=3.0, background_px=3.0), "smaller"),
        (dict(noise_px=0.0, background_px=3.0), "noise_px"),
        (dict(noise_px=1.0, background_px=float("inf")), "background_px"),
        (dict(spacing=10.0, tile=100), "tile"),  # needs > 3 * ceil(5 * 10)
        (dict(spacing=10.0, tile=300, overlap=30), "overlap"),  # below 4 sigmas
        (dict(spacing=10.0, tile=256.0), "tile"),
        (dict(spacing=10.0, workers=0), "workers"),
        (dict(spacing=10.0, out=np.zeros(lattice.shape)), "float32"),
        (dict(spacing=10.0, out=np.zeros((5, 5), np.float32)), "shape"),
        (dict(spacing=10.0, out=np.zeros(lattice.shape[::-1], np.float32).T), "C-contiguous"),
    ]:
        with pytest.raises(ValueError, match=match):
            bandpass(lattice, **kw)
    with pytest.raises(ValueError, match="overlaps"):
        big = np.zeros((lattice.shape[0] + 1, lattice.shape[1]), np.float32)
        bandpass(big[1:], spacing=10.0, out=big[:-1])


@pytest.mark.parametrize("tile", [None, 96])
def test_bandpasses_equal_one_bandpass_each(tile):
    from stemfast.bandpass import bandpasses

    img = np.random.default_rng(3).random((150, 170)).astype(np.float32) + np.linspace(0, 2, 170)
    outs = bandpasses(img, noise_px=[0.8, 1.5, 3.0], background_px=6.0, tile=tile)
    assert len(outs) == 3
    for n, o in zip([0.8, 1.5, 3.0], outs):   # the same padding and transform: the same values
        assert o.dtype == np.float32 and o.shape == img.shape
        assert np.array_equal(o, bandpass(img, noise_px=n, background_px=6.0, tile=tile))
    assert not np.array_equal(outs[0], outs[1])
    for bad in ([], 1.0, [1.0, 7.0], [0.0]):   # no sigma; not a sequence; a low-pass above the high-pass; zero
        with pytest.raises(ValueError):
            bandpasses(img, noise_px=bad, background_px=6.0)


@pytest.mark.parametrize("tile", [None, 96])
def test_bandpasses_transform_the_image_once(monkeypatch, tile):
    """The point of bandpasses(): one forward transform (per tile) for all its low-passes."""
    from stemfast.bandpass import bandpasses

    calls = []
    real = bp_mod._spectrum
    monkeypatch.setattr(bp_mod, "_spectrum", lambda block, workers: calls.append(block.shape) or real(block, workers))
    img = np.random.default_rng(4).random((150, 170)).astype(np.float32)
    bandpasses(img, noise_px=[0.8, 1.5, 3.0], background_px=6.0, tile=tile)
    n_fwd = len(calls)
    calls.clear()
    for n in (0.8, 1.5, 3.0):
        bandpass(img, noise_px=n, background_px=6.0, tile=tile)
    assert n_fwd >= 1 and len(calls) == 3 * n_fwd
