"""The ``gather_patches`` kernel (all backends) and the public stemfast.patches wrappers."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from stemfast.backend import available_backends, get_kernels
from stemfast.patches import (LazyPatches, Patches, PatchNorm, default_patch_size, extract_patches,
                              patch_edge, site_intensity)

BACKENDS = available_backends()


def gather(backend, image, xy, size, fill):
    xy = np.ascontiguousarray(xy, dtype=np.float64)
    out = np.full((len(xy), size, size), 12345.0, dtype=np.float32)
    edge = get_kernels(backend).gather_patches(np.ascontiguousarray(image, dtype=np.float32), xy, size,
                                               float(fill), out)
    return out, np.asarray(edge)


# ----------------------------------------------------------------------------------------------- kernel
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [3, 8, 11])
def test_gather_backends_agree(backend, size):
    rng = np.random.default_rng(size)
    h, w = 37, 52
    img = rng.normal(5.0, 2.0, (h, w)).astype(np.float32)
    xy = np.concatenate([
        rng.uniform(-8, w + 8, (400, 2)) * [1, h / w],          # anywhere, many across the border
        rng.integers(0, min(h, w), (40, 2)).astype(float),       # integer positions
        [[0.0, 0.0], [w - 1.0, h - 1.0], [w - 1.0, 0.0], [(size - 1) / 2, (size - 1) / 2],
         [w - 1.0 - (size - 1) / 2, h - 1.0 - (size - 1) / 2]],  # exactly at the border
    ])
    ref_out, ref_edge = gather("numpy", img, xy, size, -3.5)
    out, edge = gather(backend, img, xy, size, -3.5)
    assert edge.dtype == np.uint8 and edge.shape == (len(xy),)
    np.testing.assert_array_equal(edge, ref_edge)
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=1e-5)
    assert 0 < edge.sum() < len(xy)
    assert not (out == 12345.0).any()  # every output pixel written


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_float64_image_is_sampled_as_float32(backend):
    """The kernels sample a float32 image; a float64 one is converted first, the same way everywhere."""
    rng = np.random.default_rng(4)
    img = rng.normal(1000.0, 1.0, (20, 30))  # float64 values that float32 rounds
    xy = rng.uniform(-3, 30, (50, 2))
    kern = get_kernels(backend)
    out64 = np.empty((50, 5, 5), np.float32)
    out32 = np.empty((50, 5, 5), np.float32)
    e64 = kern.gather_patches(img, xy, 5, 0.0, out64)
    e32 = kern.gather_patches(img.astype(np.float32), xy, 5, 0.0, out32)
    np.testing.assert_array_equal(out64, out32)
    np.testing.assert_array_equal(e64, e32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_linear_ramp_is_exact(backend):
    h, w = 40, 60
    yy, xx = np.mgrid[0:h, 0:w]
    ramp = lambda x, y: 3.0 + 0.25 * x - 0.5 * y  # noqa: E731
    img = ramp(xx, yy).astype(np.float32)
    rng = np.random.default_rng(1)
    size = 7
    xy = np.stack([rng.uniform(3, w - 4, 200), rng.uniform(3, h - 4, 200)], 1)
    out, edge = gather(backend, img, xy, size, np.nan)
    off = np.arange(size) - (size - 1) / 2
    expected = ramp(xy[:, 0, None, None] + off[None, None, :], xy[:, 1, None, None] + off[None, :, None])
    assert not edge.any()
    np.testing.assert_allclose(out, expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_border_samples_and_fill(backend):
    h, w = 10, 12
    img = np.arange(h * w, dtype=np.float32).reshape(h, w)
    # samples at columns w-3..w-1 (the last one exactly on the last pixel): inside, no fill
    out, edge = gather(backend, img, [[w - 2.0, 5.0]], 3, -7.0)
    assert edge.tolist() == [0]
    np.testing.assert_array_equal(out[0], img[4:7, w - 3:w])
    # bottom-right corner exactly: the last pixel itself, the other samples are outside
    out, edge = gather(backend, img, [[w - 1.0, h - 1.0]], 3, -7.0)
    assert edge.tolist() == [1]
    assert out[0, 1, 1] == img[h - 1, w - 1]
    assert (out[0, 2, :] == -7.0).all() and (out[0, :, 2] == -7.0).all()
    np.testing.assert_array_equal(out[0, :2, :2], img[h - 2:, w - 2:])
    # just inside the first pixel / just past the last one
    out, edge = gather(backend, img, [[1.0 - 1e-9, 3.0], [w - 2.0 + 1e-9, 3.0]], 3, -7.0)
    assert edge.tolist() == [1, 1]
    assert (out[0, :, 0] == -7.0).all() and (out[1, :, 2] == -7.0).all()
    # a patch entirely outside is all fill
    out, edge = gather(backend, img, [[-50.0, 4.0]], 5, 2.5)
    assert edge.tolist() == [1] and (out == 2.5).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_subpixel_centring(backend):
    """A Gaussian blob at (10.3, 7.6) gathered at that position is centred on the central patch pixel."""
    h, w = 20, 24
    yy, xx = np.mgrid[0:h, 0:w]
    x0, y0, s = 10.3, 7.6, 1.6
    img = np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * s * s)).astype(np.float32)
    size = 9
    out, edge = gather(backend, img, [[x0, y0], [x0 + 0.5, y0]], size, 0.0)
    assert not edge.any()
    p = out[0].astype(np.float64)
    assert np.unravel_index(np.argmax(p), p.shape) == (4, 4)
    r, c = np.mgrid[0:size, 0:size]
    cy, cx = (p * r).sum() / p.sum(), (p * c).sum() / p.sum()
    assert abs(cx - 4.0) < 0.03 and abs(cy - 4.0) < 0.03
    # the patch is symmetric about its centre (up to the bilinear smoothing)
    np.testing.assert_allclose(p, p[::-1, ::-1], atol=0.03)
    # half a pixel off: the centroid moves by about half a pixel the other way
    q = out[1].astype(np.float64)
    assert abs((q * c).sum() / q.sum() - 3.5) < 0.05


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_rejects_bad_out(backend):
    img = np.zeros((8, 8), np.float32)
    xy = np.zeros((2, 2))
    kern = get_kernels(backend)
    for bad in (np.zeros((2, 5, 5), np.float64), np.zeros((2, 4, 5), np.float32),
                np.zeros((2, 5, 10), np.float32)[:, :, ::2]):
        with pytest.raises((ValueError, TypeError)):
            kern.gather_patches(img, xy, 5, 0.0, bad)


# ------------------------------------------------------------------------------- gather + resample
def banded_weights(size, m, seed, taps=3):
    """Random non-negative [m, size] resampling weights with contiguous support (rows sum to 1)."""
    rng = np.random.default_rng(seed)
    w = np.zeros((m, size))
    for r in range(m):
        c = (r + 0.5) * size / m - 0.5
        lo = int(np.clip(np.floor(c) - taps // 2, 0, max(0, size - taps)))
        w[r, lo:lo + taps] = rng.random(min(taps, size - lo)) + 0.1
    return w / w.sum(1, keepdims=True)


def gather_resampled(backend, image, xy, size, weights, fill, center, scale):
    xy = np.ascontiguousarray(xy, dtype=np.float64)
    m = len(weights)
    out = np.full((len(xy), m, m), 12345.0, dtype=np.float32)
    edge = get_kernels(backend).gather_resampled(np.ascontiguousarray(image, dtype=np.float32), xy, size,
                                                 np.ascontiguousarray(weights, dtype=np.float64), float(fill),
                                                 float(center), float(scale), out)
    return out, np.asarray(edge)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size, m, taps", [(11, 8, 3), (9, 16, 2), (7, 7, 1), (12, 5, 4), (8, 6, 8)])
def test_gather_resampled_is_gather_then_resample(backend, size, m, taps):
    """W P W^T of the gather_patches patch P, then (v - center) / scale; edge flags as gather_patches."""
    rng = np.random.default_rng(size * 100 + m)
    h, w = 41, 57
    img = rng.normal(50.0, 9.0, (h, w)).astype(np.float32)
    xy = np.concatenate([rng.uniform(-6, w + 6, (300, 2)) * [1, h / w],   # many across the border
                         rng.uniform(size, min(h, w) - size, (300, 2)),    # interior
                         [[(size - 1) / 2, (size - 1) / 2], [w - 1 - (size - 1) / 2, h - 1 - (size - 1) / 2],
                          [w - 2 - (size - 1) / 2, h - 2 - (size - 1) / 2]]])
    wts = banded_weights(size, m, seed=size, taps=taps)
    out, edge = gather_resampled(backend, img, xy, size, wts, -4.0, 47.5, 3.0)
    p, ref_edge = gather("numpy", img, xy, size, -4.0)
    expected = (wts @ p.astype(np.float64) @ wts.T - 47.5) / 3.0
    np.testing.assert_array_equal(edge, ref_edge)
    np.testing.assert_allclose(out, expected, rtol=0, atol=2e-5)
    ref, ref_e = gather_resampled("numpy", img, xy, size, wts, -4.0, 47.5, 3.0)
    np.testing.assert_array_equal(edge, ref_e)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)
    assert 0 < edge.sum() < len(xy) and not (out == 12345.0).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_resampled_identity_and_ramp(backend):
    rng = np.random.default_rng(7)
    img = rng.random((30, 35)).astype(np.float32)
    xy = rng.uniform(-3, 33, (200, 2))
    p, e = gather(backend, img, xy, 9, 0.25)
    out, e2 = gather_resampled(backend, img, xy, 9, np.eye(9), 0.25, 0.0, 1.0)
    np.testing.assert_array_equal(e, e2)
    np.testing.assert_allclose(out, p, rtol=0, atol=1e-6)
    # a linear ramp stays a ramp under an interpolating resampler: exact centres of the output pixels
    yy, xx = np.mgrid[0:40, 0:60]
    ramp = (2.0 + 0.5 * xx - 0.25 * yy).astype(np.float32)
    size, m = 9, 6
    wts = np.zeros((m, size))
    for r in range(m):  # linear interpolation at c = (r + 0.5) * size / m - 0.5
        c = (r + 0.5) * size / m - 0.5
        i0 = int(np.floor(c))
        wts[r, i0], wts[r, min(i0 + 1, size - 1)] = 1 - (c - i0), c - i0
    pts = rng.uniform(8, 30, (100, 2))
    out, e = gather_resampled(backend, ramp, pts, size, wts, 0.0, 0.0, 1.0)
    c = (np.arange(m) + 0.5) * size / m - 0.5 - (size - 1) / 2
    expected = 2.0 + 0.5 * (pts[:, 0, None, None] + c[None, None, :]) - 0.25 * (pts[:, 1, None, None] + c[None, :, None])
    assert not e.any()
    np.testing.assert_allclose(out, expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_resampled_rejects_bad_arguments(backend):
    kern = get_kernels(backend)
    img = np.zeros((8, 8), np.float32)
    xy = np.zeros((2, 2))
    w = np.full((3, 5), 0.2)
    for bad_w in (np.zeros((3, 4)), np.zeros((0, 5)), np.zeros(5)):
        with pytest.raises((ValueError, TypeError)):
            kern.gather_resampled(img, xy, 5, bad_w, 0.0, 0.0, 1.0, np.zeros((2, 3, 3), np.float32))
    for bad_out in (np.zeros((2, 5, 5), np.float32), np.zeros((2, 3, 3), np.float64), np.zeros((3, 3, 3), np.float32)):
        with pytest.raises((ValueError, TypeError)):
            kern.gather_resampled(img, xy, 5, w, 0.0, 0.0, 1.0, bad_out)
    for scale in (0.0, np.inf, np.nan):
        with pytest.raises(ValueError):
            kern.gather_resampled(img, xy, 5, w, 0.0, 0.0, scale, np.zeros((2, 3, 3), np.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.uint16, np.float64])
def test_extract_patches_resampled_equals_extract_then_resample(backend, dtype):
    img, pts = _lattice_image()
    img = (img * 20).astype(dtype)
    if dtype == np.float64:
        img = img + 1000.0  # float32 would round the raw values: normalised first, as without resampling
    xy = pts[(pts[:, 0] > -3) & (pts[:, 1] > -3) & (pts[:, 0] < 82) & (pts[:, 1] < 66)]
    size = default_patch_size(9.0)
    wts = banded_weights(size, 16, seed=2)
    full = extract_patches(img, xy, size=size, backend=backend)
    res = extract_patches(img, xy, size=size, backend=backend, resample_weights=wts)
    assert res.data.shape == (len(xy), 16, 16) and res.size == 16 and res.norm == full.norm
    np.testing.assert_array_equal(res.edge, full.edge)
    expected = wts @ full.data.astype(np.float64) @ wts.T
    np.testing.assert_allclose(res.data, expected, rtol=0, atol=2e-5)
    assert res.edge.any() and not res.edge.all()
    raw = extract_patches(img, xy, size=size, normalize=False, fill=-5.0, resample_weights=wts, backend=backend)
    raw_full = extract_patches(img, xy, size=size, normalize=False, fill=-5.0, backend=backend)
    np.testing.assert_allclose(raw.data, wts @ raw_full.data.astype(np.float64) @ wts.T, rtol=1e-6, atol=1e-3)
    out = np.empty((len(xy), 16, 16), np.float32)
    assert extract_patches(img, xy, size=size, resample_weights=wts, out=out, backend=backend).data is out
    with pytest.raises(ValueError, match="out"):
        extract_patches(img, xy, size=size, resample_weights=wts, out=np.empty((len(xy), size, size), np.float32))
    with pytest.raises(ValueError, match="resample_weights"):
        extract_patches(img, xy, size=size, resample_weights=np.ones((16, size + 1)))
    with pytest.raises(ValueError, match="resample_weights"):
        extract_patches(img, xy, size=size, resample_weights=np.full((16, size), np.nan))


def test_pipeline_patches_gathered_at_the_network_input_size():
    """prepare() gathers straight at the model's input size with the model resampler's own weights:
    the same patches as extracting at the lattice size and resampling them (the earlier path)."""
    pytest.importorskip("torch")
    from stemfast.pipeline import PipelineConfig, prepare, resample_patches, resample_weights

    rng = np.random.default_rng(0)
    for size, out in ((39, 32), (21, 32), (32, 32), (45, 16)):
        x = rng.normal(0, 1, (20, size, size)).astype(np.float32)
        w = resample_weights(size, out)
        assert w.shape == (out, size)
        np.testing.assert_allclose(w @ x.astype(np.float64) @ w.T, resample_patches(x, out), rtol=0, atol=2e-6)
    from stemfast.synthetic import make_mos2

    img = make_mos2(shape=(192, 224), seed=4).image
    cfg = PipelineConfig()
    prep = prepare(img, config=cfg)
    size, s = prep.patch_size, cfg.model.input_size
    assert size != s and prep.patches.shape == (len(prep.sites), s, s)
    ref = extract_patches(img, prep.sites.xy, size=size)
    np.testing.assert_array_equal(prep.edge, ref.edge)
    np.testing.assert_allclose(prep.patches, resample_patches(ref.data, s), rtol=0, atol=1e-5)


def test_resample_weights_are_torchs_bit_for_bit():
    """resample_weights computes, without torch, exactly the weights read off the model's resampler
    (torch's antialiased bilinear interpolate): every patch size from 3 to 129 px, every input size
    in use, downsampling and upsampling."""
    torch = pytest.importorskip("torch")
    from stemfast.frontend import resample_weights
    from stemfast.model.functional import resample_patches as torch_resample

    for out in (8, 16, 24, 32, 40, 64):
        for size in range(3, 130):
            if size == out:
                continue
            probe = torch.zeros((size, 1, size, size), dtype=torch.float64)
            probe[torch.arange(size), 0, torch.arange(size), :] = 1.0
            with torch.inference_mode():
                res = torch_resample(probe, out)[:, 0].numpy()
            ref = res[:, :, 0].T / np.sqrt(res[:, 0, 0].sum())
            np.testing.assert_array_equal(resample_weights(size, out), ref, err_msg=f"{size} -> {out}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [3, 8, 11])
def test_patch_edge_is_the_kernels_edge(backend, size):
    rng = np.random.default_rng(10 + size)
    h, w = 37, 52
    img = rng.normal(size=(h, w)).astype(np.float32)
    hs = (size - 1) / 2
    xy = np.concatenate([rng.uniform(-8, w + 8, (500, 2)) * [1, h / w],
                         [[hs, hs], [w - 1 - hs, h - 1 - hs], [hs - 1e-9, 10.0], [10.0, h - 1 - hs + 1e-9]]])
    _, edge = gather(backend, img, xy, size, 0.0)
    np.testing.assert_array_equal(patch_edge(xy, size, img.shape), edge.astype(bool))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.uint16])
def test_lazy_patches_equal_extract_patches(backend, dtype):
    """Patches cut on demand (any index form) are the patches extract_patches cuts all at once."""
    pytest.importorskip("torch")
    from stemfast.pipeline import resample_weights

    rng = np.random.default_rng(3)
    img = (rng.normal(1000, 50, (90, 110))).astype(dtype)
    img[5, 7] = 60000 if dtype == np.uint16 else 1e6  # a hot pixel: the robust norm ignores it
    xy = np.concatenate([rng.uniform(-3, 112, (300, 2)) * [1, 90 / 110], [[0.0, 0.0], [109.0, 89.0]]])
    for weights in (None, resample_weights(15, 8)):
        ref = extract_patches(img, xy, size=15, backend=backend, resample_weights=weights)
        lp = LazyPatches(img, xy, size=15, resample_weights=weights, backend=backend)
        assert lp.shape == ref.data.shape and len(lp) == len(xy) and lp.norm == ref.norm
        np.testing.assert_array_equal(lp.edge, ref.edge)
        np.testing.assert_array_equal(lp[:], ref.data)
        np.testing.assert_array_equal(np.asarray(lp), ref.data)
        np.testing.assert_array_equal(lp[40:77], ref.data[40:77])
        idx = rng.choice(len(xy), 50, replace=False)
        np.testing.assert_array_equal(lp[idx], ref.data[idx])
        np.testing.assert_array_equal(lp[~ref.edge], ref.data[~ref.edge])
        np.testing.assert_array_equal(lp[7], ref.data[7])
        assert lp[10:10].shape == (0,) + ref.data.shape[1:]
        assert lp.seconds > 0


def test_streamed_pipeline_equals_in_memory_pipeline():
    """prepare() above its patch budget cuts patches on demand and analyze() streams them in chunks:
    the site table, encodings and training sample are the same as with all patches in memory."""
    pytest.importorskip("torch")
    from stemfast import pipeline as P
    from stemfast.config import load_config
    from stemfast.synthetic import make_mos2

    cfg = load_config(None, {"model": {"epochs": 2, "stn_epochs": 1, "input_size": 16, "channels": [8, 8, 8],
                                       "stn_channels": [4, 8], "max_train_patches": 300, "device": "cpu",
                                       "progress": False}})
    img = make_mos2(shape=(200, 216), seed=8).image
    full = P.prepare(img, config=cfg)
    lazy = P.prepare(img, config=cfg, max_patch_bytes=1000)
    assert isinstance(lazy.patches, LazyPatches) and isinstance(full.patches, np.ndarray)
    np.testing.assert_array_equal(lazy.edge, full.edge)
    np.testing.assert_array_equal(np.asarray(lazy.patches), full.patches)
    model = P.train_model([full], config=cfg)
    model_lazy = P.train_model([lazy], config=cfg)  # same sample drawn, so the same weights
    for a, b in zip(model.network.state_dict().values(), model_lazy.network.state_dict().values()):
        assert bool((a == b).all())
    calls = []
    real_encode = model.encode
    old = P.STREAM_CHUNK
    try:
        P.STREAM_CHUNK = 97  # several chunks, the last one short
        model.encode = lambda x, **kw: (calls.append(len(x)), real_encode(x, **kw))[1]
        t_lazy, s_lazy = P.analyze(lazy, model, config=cfg)
    finally:
        P.STREAM_CHUNK = old
        model.encode = real_encode
    assert len(calls) == -(-len(full.sites) // 97) and max(calls) == 97 and sum(calls) == len(full.sites)
    t_full, s_full = P.analyze(full, model, config=cfg)
    assert t_lazy.names == t_full.names
    for name in t_full.names:
        a, b = np.asarray(t_lazy[name]), np.asarray(t_full[name])
        if a.dtype.kind == "f":
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)
    assert s_lazy["class_counts"] == s_full["class_counts"]
    assert lazy.timings["patches"] > 0 and lazy.timings["encode"] > 0


# ---------------------------------------------------------------------------------------------- wrapper
def _lattice_image(h=64, w=80, spacing=9.0, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.full((h, w), 10.0)
    b = spacing * np.array([[1.0, 0.0], [0.5, np.sqrt(3) / 2]])
    m, n = np.meshgrid(np.arange(-12, 14), np.arange(-12, 14))
    pts = np.stack([m.ravel(), n.ravel()], 1) @ b
    pts = pts[(pts[:, 0] > -5) & (pts[:, 0] < w + 5) & (pts[:, 1] > -5) & (pts[:, 1] < h + 5)]
    for x, y in pts:
        img += 50.0 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.5 ** 2))
    return img + rng.normal(0, 1.0, img.shape), pts


@pytest.mark.parametrize("backend", BACKENDS)
def test_extract_patches_normalised_and_filled_with_background(backend):
    img, pts = _lattice_image()
    xy = pts[(pts[:, 0] > 0) & (pts[:, 1] > 0) & (pts[:, 0] < 79) & (pts[:, 1] < 63)]
    size = default_patch_size(9.0)
    p = extract_patches(img, xy, size=size, backend=backend)
    assert isinstance(p, Patches) and len(p) == len(xy) and p.size == size
    assert p.data.dtype == np.float32 and p.data.shape == (len(xy), size, size)
    assert p.edge.dtype == np.bool_ and p.edge.any() and not p.edge.all()
    norm = PatchNorm.from_image(img)
    assert p.norm == norm
    assert norm.center == pytest.approx(np.median(img))
    assert norm.scale == pytest.approx(np.percentile(img, 99.5) - np.median(img))
    raw = extract_patches(img, xy, size=size, normalize=False, backend=backend)
    assert raw.norm == PatchNorm(0.0, 1.0)
    np.testing.assert_allclose(p.data, (raw.data - norm.center) / norm.scale, atol=1e-5)
    # samples outside the image hold the median: 0 after normalisation
    x0, y0 = xy[np.argmin(xy[:, 0])]
    i = int(np.argmin(xy[:, 0]))
    assert p.edge[i] and (p.data[i, :, 0] == 0.0).all() and x0 - (size - 1) / 2 < 0
    # columns are bright and centred: the centre pixel is well above the background
    assert np.median(p.data[:, size // 2, size // 2]) > 0.5
    # backends agree
    ref = extract_patches(img, xy, size=size, backend="numpy")
    np.testing.assert_allclose(p.data, ref.data, atol=1e-5)
    np.testing.assert_array_equal(p.edge, ref.edge)


def test_extract_patches_norm_is_reused_and_robust():
    img, pts = _lattice_image(seed=1)
    xy = np.array([[20.0, 20.0], [30.5, 25.2], [40.0, 30.7]])
    hot = img.copy()
    hot[3, 4] = 1e7  # one hot pixel does not squash the rest
    n0, n1 = PatchNorm.from_image(img), PatchNorm.from_image(hot)
    assert n1.scale == pytest.approx(n0.scale, rel=0.02) and n1.center == pytest.approx(n0.center, rel=0.02)
    # a second, brighter image normalised with the first image's norm
    p1 = extract_patches(img, xy, size=9)
    p2 = extract_patches(2 * img, xy, size=9, norm=p1.norm)
    assert p2.norm == p1.norm
    np.testing.assert_allclose(p2.data, (2 * img_patches(img, xy, 9) - p1.norm.center) / p1.norm.scale, atol=1e-4)
    # explicit raw fill, constant image falls back to a positive scale
    p = extract_patches(img, [[-30.0, -30.0]], size=5, fill=p1.norm.center + p1.norm.scale)
    assert p.edge.all() and np.allclose(p.data, 1.0)
    assert PatchNorm.from_image(np.ones((5, 5))).scale == 1.0


def img_patches(img, xy, size):
    return extract_patches(img, xy, size=size, normalize=False).data


def test_extract_patches_out_and_empty():
    img = np.random.default_rng(0).random((16, 16))
    out = np.empty((2, 5, 5), np.float32)
    p = extract_patches(img, [[5.0, 5.0], [8.5, 9.25]], size=5, out=out)
    assert p.data is out
    e = extract_patches(img, np.zeros((0, 2)), size=5)
    assert e.data.shape == (0, 5, 5) and e.edge.shape == (0,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.norm = None  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(image=np.zeros((4, 4, 3))), "2-D"),
        (dict(image=np.full((8, 8), np.nan)), "NaN"),
        (dict(image=np.zeros((8, 8), complex)), "real"),
        (dict(xy=np.zeros((3, 3))), r"\[N, 2\]"),
        (dict(xy=[[1.0, np.inf]]), "NaN or infinite"),
        (dict(size=2), "size"),
        (dict(size=5.0), "size"),
        (dict(fill=np.nan), "fill"),
        (dict(out=np.zeros((1, 5, 5))), "out"),
        (dict(normalize=False, norm=PatchNorm(0.0, 1.0)), "normalize"),
    ],
)
def test_extract_patches_validation(kwargs, match):
    args = dict(image=np.ones((8, 8)), xy=[[3.0, 3.0]], size=5)
    args.update(kwargs)
    image, xy = args.pop("image"), args.pop("xy")
    with pytest.raises(ValueError, match=match):
        extract_patches(image, xy, **args)


def test_patch_norm_validation():
    with pytest.raises(ValueError):
        PatchNorm(0.0, 0.0)
    with pytest.raises(ValueError):
        PatchNorm(np.nan, 1.0)


def test_default_patch_size():
    for s in (2.0, 5.5, 9.0, 10.0, 12.3, 31.7):
        size = default_patch_size(s)
        assert isinstance(size, int) and size % 2 == 1 and size >= 2.5 * s
        assert size <= 2.5 * s + 3
        # the first neighbour shell (at distance s from the centre pixel) is inside the patch
        assert (size - 1) / 2 >= 1.25 * s
    assert default_patch_size(0.5) == 3
    for bad in (0.0, -1.0, np.nan, np.inf):
        with pytest.raises(ValueError):
            default_patch_size(bad)


# ----------------------------------------------------------------------------------------- intensity
@pytest.mark.parametrize("backend", BACKENDS)
def test_site_intensity(backend):
    rng = np.random.default_rng(3)
    img = rng.random((30, 40))
    # at integer positions the bilinear samples are pixels: a plain disc mean
    xy = np.array([[10.0, 12.0], [25.0, 7.0]])
    radius = 2.5
    yy, xx = np.mgrid[0:30, 0:40]
    expected = [img[(xx - x) ** 2 + (yy - y) ** 2 <= radius ** 2].mean() for x, y in xy]
    got = site_intensity(img, xy, radius=radius, backend=backend)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # partly outside: the mean of the inside samples; fully outside: NaN
    corner = site_intensity(img, [[0.0, 0.0], [-10.0, -10.0]], radius=1.5, backend=backend)
    inside = img[:2, :2].ravel()[[0, 1, 2, 3]]
    assert corner[0] == pytest.approx(inside.mean(), rel=1e-6) and np.isnan(corner[1])
    # sub-pixel positions: agrees with the reference backend, constant image gives the constant
    sub = rng.uniform(3, 27, (50, 2))
    np.testing.assert_allclose(site_intensity(img, sub, radius=3.2, backend=backend),
                               site_intensity(img, sub, radius=3.2, backend="numpy"), rtol=1e-6)
    np.testing.assert_allclose(site_intensity(np.full((30, 40), 4.0), sub, radius=3.2, backend=backend), 4.0)
    with pytest.raises(ValueError):
        site_intensity(img, xy, radius=0.0)
