"""Benchmark: ``fit_local_lattices`` (compiled backends vs the NumPy reference, same process), and the
grid neighbour kernels ``knn_within`` / ``pairs_within`` (compiled backends vs ``scipy.spatial.cKDTree``).

1e6 sites of a perturbed triangular lattice (quick mode ``STEMFAST_BENCH_QUICK=1``: 5e4), neighbour
table from ``cKDTree`` (k = 13 within 2.2 spacings), sites in raster order. Records
``benchmark.extra_info["ratio"] = t_numpy / t_backend`` (the reference timed once, ours the best of 5
rounds) and asserts agreement with the reference. Issue target: ratio >= 30 for 1e6 sites on 2 cores.

The neighbour kernels replaced KD-trees in the lattice fill-in, so their honest reference is
``cKDTree`` itself, not the NumPy reference kernel (which *is* a ``cKDTree`` query plus an explicit
ordering pass, i.e. slower than the tree): ``knn_within`` on the same sites, k = 29 within 2.2
spacings (the fill-in's neighbour table), against ``cKDTree.query(k=29, distance_upper_bound=,
workers=-1)`` on a tree built beforehand (build time left out: that favours the reference; the ratio
with the build included is recorded as ``ratio_with_build``); ``pairs_within`` within 1.25 spacings
(the sublattice bonds) against ``cKDTree(...).query_pairs(output_type="ndarray")`` (build included:
``query_pairs`` is single-threaded and returns unsorted pairs, our kernel sorts them). Correctness is
asserted against the NumPy reference kernel (exact) and ``cKDTree`` (same neighbour distances /
same pair set).

    PYTHONPATH=python python -m pytest benchmarks/bench_lattice.py --benchmark-enable -o python_files='bench_*.py'
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
from conftest import best_time, timed_pedantic
from scipy.spatial import cKDTree

from stemfast.backend import available_backends, get_kernels

QUICK = os.environ.get("STEMFAST_BENCH_QUICK", "0") not in ("0", "", "false", "no")
REF_REPEAT = 3 if QUICK else 1  # quick mode: best of 3 for the reference too (noise)
N_SITES = 50_000 if QUICK else 1_000_000
SPACING = 10.0
K, RADIUS, N_ITER, TOL = 13, 2.2 * SPACING, 3, 0.25
TARGET = 30.0
KNN_K, KNN_RADIUS = 29, 2.2 * SPACING  # the fill-in's neighbour table (LatticeSettings.fit_radius = 2.2)
PAIR_RADIUS = 1.25 * SPACING  # sublattice_labels' bonds (max_bond = 1.25)


def _threads(backend: str) -> int:
    if backend == "cpp":
        return int(get_kernels("cpp").get_num_threads())
    import numba

    return int(numba.get_num_threads())


def make_sites(n: int, seed: int = 0):
    """Perturbed triangular lattice (rows of the lattice in raster order) with 1 % spurious points,
    its ``cKDTree`` neighbour table and the start bases."""
    xy = lattice_points(n, seed)
    _, nb = cKDTree(xy).query(xy, k=K, distance_upper_bound=RADIUS, workers=-1)
    nb = np.asarray(nb, dtype=np.int64)
    nb[nb >= n] = -1
    basis0 = np.ascontiguousarray(np.broadcast_to(SPACING * np.array([[1.0, 0.0], [0.5, np.sqrt(3) / 2]]),
                                                  (n, 2, 2)))
    return xy, np.ascontiguousarray(nb), basis0


def lattice_points(n: int, seed: int = 0) -> np.ndarray:
    """Perturbed triangular lattice (rows of the lattice in raster order) with 1 % spurious points."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n * np.sqrt(3) / 2)))  # sites per row for a roughly square field
    rows = int(np.ceil(n / side))
    j, i = np.divmod(np.arange(rows * side), side)
    xy = np.stack([(i + 0.5 * (j % 2)) * SPACING, j * SPACING * np.sqrt(3) / 2], 1)[:n]
    xy += rng.normal(0.0, 0.05 * SPACING, xy.shape)
    bad = rng.random(n) < 0.01
    xy[bad] += rng.uniform(-0.5, 0.5, (bad.sum(), 2)) * SPACING
    order = np.lexsort((xy[:, 0], np.floor(xy[:, 1] / SPACING)))  # raster-ish: bands of rows, then x
    return np.ascontiguousarray(xy[order])


@pytest.fixture(scope="module")
def case():
    xy, nb, b0 = make_sites(N_SITES)
    t_ref = float("inf")
    for _ in range(REF_REPEAT):
        t0 = time.perf_counter()
        ref = get_kernels("numpy").fit_local_lattices(xy, nb, b0, N_ITER, TOL)
        t_ref = min(t_ref, time.perf_counter() - t0)
    return (xy, nb, b0), ref, t_ref


@pytest.mark.parametrize("backend", [b for b in ("cpp", "numba") if b in available_backends()])
def test_fit_local_lattices(benchmark, case, backend, check_ratio):
    args, ref, t_ref = case
    kern = get_kernels(backend)
    xy, nb, b0 = args
    kern.fit_local_lattices(xy[:1000], np.minimum(nb[:1000], 999), b0[:1000], N_ITER, TOL)  # warm-up (Numba)
    got, t_ours = timed_pedantic(benchmark, lambda: kern.fit_local_lattices(*args, N_ITER, TOL),
                                 rounds=5, warmup_rounds=1)
    ratio = t_ref / t_ours
    benchmark.extra_info.update(ratio=ratio, target=TARGET, t_numpy_s=t_ref, t_backend_s=t_ours, n_sites=N_SITES,
                                threads=_threads(backend), backend=backend)
    print(f"\n[ratio] fit_local_lattices {backend} vs numpy, {N_SITES} sites, {_threads(backend)} threads: "
          f"{ratio:.1f}x ({t_ref:.2f} s / {t_ours:.3f} s; issue target {TARGET:g}x at 1e6 sites)")
    np.testing.assert_array_equal(got[3], ref[3])
    np.testing.assert_allclose(got[0], ref[0], rtol=0, atol=1e-9)
    np.testing.assert_allclose(got[1], ref[1], rtol=0, atol=1e-9)
    np.testing.assert_allclose(got[2], ref[2], rtol=0, atol=1e-9, equal_nan=True)
    assert np.isfinite(ref[2]).mean() > 0.9
    check_ratio(f"fit_local_lattices_{backend}_vs_numpy", ratio, benchmark, target=TARGET)


# --------------------------------------------------------------------------------------------------
# grid neighbour kernels vs cKDTree
# --------------------------------------------------------------------------------------------------
BACKENDS = [b for b in ("cpp", "numba") if b in available_backends()]


@pytest.fixture(scope="module")
def points():
    return lattice_points(N_SITES, seed=1)


@pytest.fixture(scope="module")
def knn_reference(points):
    tree = cKDTree(points)
    t_build = best_time(lambda: cKDTree(points), repeat=REF_REPEAT)
    res = {}

    def query():
        res["d"], res["j"] = tree.query(points, k=KNN_K, distance_upper_bound=KNN_RADIUS, workers=-1)

    t_query = best_time(query, repeat=REF_REPEAT)
    ref = get_kernels("numpy").knn_within(points, points, KNN_K, KNN_RADIUS)
    return ref, (res["d"], res["j"]), t_query, t_build


@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_within(benchmark, points, knn_reference, backend, check_ratio):
    (ref_d, ref_j), (kd_d, kd_j), t_query, t_build = knn_reference
    kern = get_kernels(backend)
    kern.knn_within(points[:100], points[:10], KNN_K, KNN_RADIUS)  # warm-up (Numba)
    (dist, idx), t_ours = timed_pedantic(benchmark, lambda: kern.knn_within(points, points, KNN_K, KNN_RADIUS),
                                         rounds=5, warmup_rounds=1)
    ratio = t_query / t_ours
    benchmark.extra_info.update(ratio=ratio, ratio_with_build=(t_query + t_build) / t_ours, t_ckdtree_query_s=t_query,
                                t_ckdtree_build_s=t_build, t_backend_s=t_ours, n_points=N_SITES, k=KNN_K,
                                threads=_threads(backend), backend=backend)
    print(f"\n[ratio] knn_within {backend} vs cKDTree.query (prebuilt tree, workers=-1), {N_SITES} points, "
          f"k={KNN_K}, {_threads(backend)} threads: {ratio:.2f}x ({t_query:.3f} s / {t_ours:.3f} s; "
          f"{(t_query + t_build) / t_ours:.2f}x with the tree build)")
    # the contract, exactly (the NumPy reference)
    np.testing.assert_array_equal(idx, ref_j)
    np.testing.assert_array_equal(dist, ref_d)
    # and cKDTree: the same neighbour distances (indices may differ only within ties)
    np.testing.assert_allclose(dist, kd_d, rtol=1e-12, atol=0)
    same = (idx == np.where(kd_j >= N_SITES, -1, kd_j)).mean()
    assert same > 0.999, same
    n_found = (idx >= 0).sum(1)
    # within 2.2 spacings: the site and three shells (1 + 6 + 6 + 6; k = 29 leaves room for
    # spurious points), fewer at the edges
    assert np.median(n_found) == 19 and (n_found < 19).any() and (n_found > 19).any()
    check_ratio(f"knn_within_{backend}_vs_ckdtree", ratio, benchmark)


@pytest.fixture(scope="module")
def pairs_reference(points):
    res = {}

    def build_and_query():
        res["p"] = cKDTree(points).query_pairs(PAIR_RADIUS, output_type="ndarray")

    t_ref = best_time(build_and_query, repeat=REF_REPEAT)
    ref = get_kernels("numpy").pairs_within(points, PAIR_RADIUS)
    return ref, res["p"], t_ref


@pytest.mark.parametrize("backend", BACKENDS)
def test_pairs_within(benchmark, points, pairs_reference, backend, check_ratio):
    ref, kd_pairs, t_ref = pairs_reference
    kern = get_kernels(backend)
    kern.pairs_within(points[:100], PAIR_RADIUS)  # warm-up (Numba)
    got, t_ours = timed_pedantic(benchmark, lambda: kern.pairs_within(points, PAIR_RADIUS), rounds=5,
                                 warmup_rounds=1)
    ratio = t_ref / t_ours
    benchmark.extra_info.update(ratio=ratio, t_ckdtree_s=t_ref, t_backend_s=t_ours, n_points=N_SITES,
                                n_pairs=len(got), threads=_threads(backend), backend=backend)
    print(f"\n[ratio] pairs_within {backend} vs cKDTree.query_pairs (build included), {N_SITES} points, "
          f"{len(got)} pairs, {_threads(backend)} threads: {ratio:.2f}x ({t_ref:.3f} s / {t_ours:.3f} s)")
    np.testing.assert_array_equal(got, ref)
    kd = np.sort(kd_pairs, axis=1)
    kd = kd[np.lexsort((kd[:, 1], kd[:, 0]))]
    np.testing.assert_array_equal(got, kd)  # same pair set as the tree (no pair at exactly r here)
    assert 2.5 * N_SITES < len(got) < 3.5 * N_SITES  # ~3 bonds per site of a triangular lattice
    check_ratio(f"pairs_within_{backend}_vs_ckdtree", ratio, benchmark)
