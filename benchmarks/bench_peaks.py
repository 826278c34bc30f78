"""Benchmark: column detection, ``find_peaks`` (local maxima + Gaussian refinement) vs
``skimage.feature.peak_local_max`` (detection only), and ``local_maxima`` per backend vs the NumPy
reference.

Input: a band-passed triangular lattice of Gaussian columns (spacing 12 px, ~1.3e5 columns on
4096 x 4096; quick mode ``STEMFAST_BENCH_QUICK=1``: 1024 x 1024) plus noise. Both detectors get the
same image, ``min_distance`` and absolute threshold. Records ``benchmark.extra_info["ratio"]`` =
reference time / our time (same process) and asserts that both find the same peaks. Issue target
for ``find_peaks``: ratio >= 100 on 4096 x 4096. The reference is timed once (about 40 s there).

    PYTHONPATH=python python -m pytest benchmarks/bench_peaks.py --benchmark-enable -o python_files='bench_*.py'
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
from conftest import timed_pedantic

from stemfast.backend import available_backends, get_kernels
from stemfast.bandpass import bandpass
from stemfast.peaks import default_threshold, find_peaks

QUICK = os.environ.get("STEMFAST_BENCH_QUICK", "0") not in ("0", "", "false", "no")
REF_REPEAT = 3 if QUICK else 1  # quick mode: best of 3 for the reference too (noise)
SIZE = 1024 if QUICK else 4096
SPACING = 12.0
SIGMA = 2.0
NOISE = 0.1
MIN_DISTANCE = 6.0  # half the column spacing
TARGET = 100.0


def lattice_image(size: int, spacing: float = SPACING, sigma: float = SIGMA, noise: float = NOISE, seed: int = 0):
    """float32 triangular lattice of unit Gaussian columns (+ Gaussian noise) and the true positions.

    Rendered offset by offset over all columns at once (fast for ~1e5 columns).
    """
    rng = np.random.default_rng(seed)
    a1 = np.array([spacing, 0.0])
    a2 = spacing * np.array([0.5, np.sqrt(3) / 2])
    nj = int(size / a2[1]) + 3
    ni = int(size / spacing) + nj + 3
    i, j = np.meshgrid(np.arange(-nj - 2, ni), np.arange(-2, nj))
    pts = i.ravel()[:, None] * a1 + j.ravel()[:, None] * a2 + rng.uniform(0, spacing, 2)
    pts = pts[(pts >= 0).all(1) & (pts <= size - 1).all(1)]
    img = np.zeros((size, size), np.float32)
    c = np.floor(pts + 0.5).astype(np.int64)
    f = pts - c
    r = int(np.ceil(4 * sigma))
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            yy, xx = c[:, 1] + dy, c[:, 0] + dx
            ok = (yy >= 0) & (yy < size) & (xx >= 0) & (xx < size)
            v = np.exp(-((dx - f[:, 0]) ** 2 + (dy - f[:, 1]) ** 2) / (2 * sigma**2)).astype(np.float32)
            img[yy[ok], xx[ok]] += v[ok]  # distinct centres: no repeated index per offset
    img += rng.normal(0.0, noise, img.shape).astype(np.float32)
    return img, pts


@pytest.fixture(scope="module")
def case():
    img, pts = lattice_image(SIZE)
    bp = bandpass(img, spacing=SPACING)
    thr = default_threshold(bp)
    return bp, thr, pts


def _match(a: np.ndarray, b: np.ndarray, tol: float) -> tuple[int, int]:
    """Numbers of points of a without a partner in b within tol and vice versa."""
    from scipy.spatial import cKDTree

    da, _ = cKDTree(b).query(a, distance_upper_bound=tol)
    db, _ = cKDTree(a).query(b, distance_upper_bound=tol)
    return int(np.isinf(da).sum()), int(np.isinf(db).sum())


def test_find_peaks_vs_skimage(benchmark, case, check_ratio):
    from skimage.feature import peak_local_max

    bp, thr, truth = case
    t_ref = float("inf")
    for _ in range(REF_REPEAT):
        t0 = time.perf_counter()
        sk = peak_local_max(bp, min_distance=int(MIN_DISTANCE), threshold_abs=thr, exclude_border=False)
        t_ref = min(t_ref, time.perf_counter() - t0)

    find_peaks(bp[:256, :256], min_distance=MIN_DISTANCE, threshold=thr)  # warm-up (JIT, threads)
    res, t_ours = timed_pedantic(benchmark, lambda: find_peaks(bp, min_distance=MIN_DISTANCE, threshold=thr),
                                 rounds=5 if QUICK else 3)
    ratio = t_ref / t_ours
    benchmark.extra_info.update(
        ratio=ratio, target=TARGET, t_skimage_s=t_ref, t_ours_s=t_ours, n_peaks=len(res), size=SIZE,
        backend=os.environ.get("STEMFAST_BACKEND") or available_backends()[0], quick=QUICK,
    )
    print(f"\n[ratio] find_peaks vs skimage.peak_local_max {SIZE}^2: {ratio:.1f}x "
          f"({t_ref:.2f} s / {t_ours:.3f} s, {len(res)} peaks)")
    # correctness: the same maxima as skimage (exactly), refined within the refinement disc
    det = find_peaks(bp, min_distance=MIN_DISTANCE, threshold=thr, refine=None)
    assert {tuple(p) for p in det.xy.astype(np.int64)} == {(int(c), int(r)) for r, c in sk}
    assert len(res) == len(det)
    assert np.hypot(*(res.xy - det.xy).T).max() <= MIN_DISTANCE / 2  # the default refinement radius
    # ... and at the true columns (more than half a spacing from the edge), to the noise limit: the
    # Cramer-Rao bound of a Gaussian spot is sqrt(2 / pi) * NOISE / amplitude = 0.08 px per coordinate
    from scipy.spatial import cKDTree

    inner = truth[(truth >= SPACING / 2).all(1) & (truth <= SIZE - 1 - SPACING / 2).all(1)]
    d, _ = cKDTree(res.xy).query(inner)
    assert d.max() < 0.5
    assert np.sqrt(np.mean(d**2) / 2) < 1.25 * np.sqrt(2 / np.pi) * NOISE
    assert res.ok.mean() > 0.99
    check_ratio("find_peaks_vs_skimage", ratio, benchmark, target=TARGET)


@pytest.fixture(scope="module")
def numpy_maxima(case):
    bp, thr, _ = case
    t_ref = float("inf")
    for _ in range(REF_REPEAT):
        t0 = time.perf_counter()
        ref = get_kernels("numpy").local_maxima(bp, MIN_DISTANCE, thr, 0)
        t_ref = min(t_ref, time.perf_counter() - t0)
    return ref, t_ref


@pytest.mark.parametrize("backend", [b for b in ("cpp", "numba") if b in available_backends()])
def test_local_maxima(benchmark, case, numpy_maxima, backend, check_ratio):
    bp, thr, _ = case
    ref, t_ref = numpy_maxima
    kern = get_kernels(backend)
    kern.local_maxima(bp[:64, :64], MIN_DISTANCE, thr, 0)  # warm-up
    got, t_ours = timed_pedantic(benchmark, lambda: kern.local_maxima(bp, MIN_DISTANCE, thr, 0),
                                 rounds=5, warmup_rounds=1)
    ratio = t_ref / t_ours
    benchmark.extra_info.update(ratio=ratio, t_numpy_s=t_ref, t_backend_s=t_ours, n_maxima=len(ref),
                                size=SIZE, backend=backend)
    print(f"\n[ratio] local_maxima {backend} vs numpy {SIZE}^2: {ratio:.1f}x")
    np.testing.assert_array_equal(np.asarray(got), ref)
    check_ratio(f"local_maxima_{backend}_vs_numpy", ratio, benchmark)
