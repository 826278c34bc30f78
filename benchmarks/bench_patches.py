"""Benchmark: ``gather_patches`` and ``gather_resampled`` (compiled backends vs the NumPy reference,
same process).

1e5 bilinear 32 x 32 patches (quick mode ``STEMFAST_BENCH_QUICK=1``: 5e3) from a 2048 x 2048 float32
image, some across the border. Gated ratio (``speed_gate``, see conftest.py): CPU time of the NumPy
reference over ours, one thread on both sides (BLAS too), paired; asserts agreement with the reference.

``gather_resampled``: the same sites, 39 x 39 px patches (``default_patch_size`` of a 15 px spacing)
resampled to 32 x 32 (the model's input) by the weights of an antialiased bilinear downscale (a
triangle filter, 3-4 taps per output pixel) and normalised, ``(W P W^T - center) / scale``, in one
pass -- what ``pipeline.prepare`` asks for.

    PYTHONPATH=python python -m pytest benchmarks/bench_patches.py -o python_files='bench_*.py'
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from stemfast.backend import available_backends, get_kernels

QUICK = os.environ.get("STEMFAST_BENCH_QUICK", "0") not in ("0", "", "false", "no")
N_PATCHES = 5_000 if QUICK else 100_000
SIZE = 32
H = W = 2048
FILL = -1.0


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    image = rng.normal(100.0, 10.0, (H, W)).astype(np.float32)
    xy = np.stack([rng.uniform(-8, W + 8, N_PATCHES), rng.uniform(-8, H + 8, N_PATCHES)], 1)
    xy = xy[np.lexsort((xy[:, 0], np.floor(xy[:, 1] / 16)))]  # sites come in raster-ish order
    out = np.empty((N_PATCHES, SIZE, SIZE), np.float32)
    edge = get_kernels("numpy").gather_patches(image, xy, SIZE, FILL, out)
    return (image, np.ascontiguousarray(xy)), (out, edge)


@pytest.mark.parametrize("backend", [b for b in ("cpp", "numba") if b in available_backends()])
def test_gather_patches(benchmark, case, backend, speed_gate):
    (image, xy), (ref_out, ref_edge) = case
    kern, numpy_kern = get_kernels(backend), get_kernels("numpy")
    kern.gather_patches(image, xy[:10], SIZE, FILL, np.empty((10, SIZE, SIZE), np.float32))  # warm-up
    out, out_ref = np.empty_like(ref_out), np.empty_like(ref_out)
    info = speed_gate(f"gather_patches_{backend}_vs_numpy", lambda: kern.gather_patches(image, xy, SIZE, FILL, out),
                      lambda: numpy_kern.gather_patches(image, xy, SIZE, FILL, out_ref), benchmark, repeat=5,
                      warmup=(1, 0), parallel=True)
    out[...] = np.nan
    edge = benchmark.pedantic(lambda: kern.gather_patches(image, xy, SIZE, FILL, out), rounds=1, iterations=1)
    benchmark.extra_info.update(n_patches=N_PATCHES, size=SIZE, backend=backend)
    print(f"[ratio] gather_patches {backend} vs numpy, {N_PATCHES} patches of {SIZE}^2: {info['ratio']:.1f}x")
    np.testing.assert_array_equal(edge, ref_edge)
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=1e-5)
    assert 0 < ref_edge.sum() < N_PATCHES


# --------------------------------------------------------------------------------------------------
# gather + resample + normalise in one pass
# --------------------------------------------------------------------------------------------------
RS_SIZE, RS_OUT = 39, 32
CENTER, SCALE = 100.0, 10.0


def antialiased_bilinear_weights(size: int, out: int) -> np.ndarray:
    """[out, size] weights of a triangle-filter (antialiased bilinear, align_corners=False) resampling."""
    s = size / out
    support = max(s, 1.0)
    c = (np.arange(out) + 0.5) * s - 0.5
    w = np.clip(1.0 - np.abs(np.arange(size)[None, :] - c[:, None]) / support, 0.0, None)
    return np.ascontiguousarray(w / w.sum(1, keepdims=True))


@pytest.fixture(scope="module")
def resampled_case(case):
    (image, xy), _ = case
    wts = antialiased_bilinear_weights(RS_SIZE, RS_OUT)
    out = np.empty((len(xy), RS_OUT, RS_OUT), np.float32)
    edge = get_kernels("numpy").gather_resampled(image, xy, RS_SIZE, wts, FILL, CENTER, SCALE, out)
    return (image, xy, wts), (out, edge)


@pytest.mark.parametrize("backend", [b for b in ("cpp", "numba") if b in available_backends()])
def test_gather_resampled(benchmark, resampled_case, backend, speed_gate):
    (image, xy, wts), (ref_out, ref_edge) = resampled_case
    kern, numpy_kern = get_kernels(backend), get_kernels("numpy")
    kern.gather_resampled(image, xy[:10], RS_SIZE, wts, FILL, CENTER, SCALE,
                          np.empty((10, RS_OUT, RS_OUT), np.float32))  # warm-up (Numba)
    out, out_ref = np.empty_like(ref_out), np.empty_like(ref_out)
    info = speed_gate(
        f"gather_resampled_{backend}_vs_numpy",
        lambda: kern.gather_resampled(image, xy, RS_SIZE, wts, FILL, CENTER, SCALE, out),
        lambda: numpy_kern.gather_resampled(image, xy, RS_SIZE, wts, FILL, CENTER, SCALE, out_ref), benchmark,
        repeat=5, warmup=(1, 0), parallel=True)
    out[...] = np.nan
    edge = benchmark.pedantic(lambda: kern.gather_resampled(image, xy, RS_SIZE, wts, FILL, CENTER, SCALE, out),
                              rounds=1, iterations=1)
    benchmark.extra_info.update(n_patches=N_PATCHES, size=RS_SIZE, out_size=RS_OUT, backend=backend)
    print(f"[ratio] gather_resampled {backend} vs numpy, {N_PATCHES} patches {RS_SIZE}^2 -> {RS_OUT}^2: "
          f"{info['ratio']:.1f}x")
    np.testing.assert_array_equal(edge, ref_edge)
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=1e-5)
    # the reference is W P W^T of the gather_patches patch: check it on a few patches, and that the
    # normalised values look like the image's (mean 100, sd 10; a triangle filter averages the noise)
    p = np.empty((50, RS_SIZE, RS_SIZE), np.float32)
    get_kernels("numpy").gather_patches(image, xy[:50], RS_SIZE, FILL, p)
    np.testing.assert_allclose(ref_out[:50], (wts @ p.astype(np.float64) @ wts.T - CENTER) / SCALE, rtol=0, atol=1e-5)
    inner = ref_edge == 0
    assert 0 < ref_edge.sum() < N_PATCHES
    assert abs(float(ref_out[inner].mean())) < 0.05 and 0.2 < float(ref_out[inner].std()) < 1.0
