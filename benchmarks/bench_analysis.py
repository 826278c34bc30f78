"""Benchmarks of the analysis stage (``stemfast.analysis``).

Gated (``speed_gate``, see conftest.py: CPU time, one thread on both sides, paired):

* ``local_references_vs_reference``: the NumPy reference kernel of ``local_references``
  (``stemfast._kernels.numpy_ref.references``: vectorised over blocks of sites) against the
  straightforward implementation it replaced (``references._local_references_reference``: a 2 x 2
  ``einsum`` per neighbour and one masked sort per colour and statistic), on the same jittered 2H
  lattice; both share the k-d tree query of the 300 neighbours, so the ratio is bounded by it.
* ``local_references_{cpp,numba}_vs_numpy``: the compiled kernels (a grid k-nearest search and
  selection instead of sorting, per site) against that NumPy reference; ``parallel=True``.
* ``neighbour_mean_{cpp,numba}_vs_numpy``: the mean of the latents over the 60 nearest sites
  (``analysis.neighbourhood_mean``), compiled against the NumPy reference (k-d tree + gathers).

Results asserted identical (bit for bit) alongside.

Quick mode: ~6k sites (a 1024^2 image has ~5k); full mode (``STEMFAST_BENCH_FULL=1``): ~84k (4096^2).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from stemfast import references as R
from stemfast.backend import available_backends, get_kernels

QUICK = os.environ.get("STEMFAST_BENCH_QUICK", "0") not in ("0", "", "false", "no")
SIDE = 45 if QUICK else 167  # nodes per side (x 3 sites: metal, chalcogen, hollow): 6,075 / 83,667 sites
COMPILED = [b for b in ("cpp", "numba") if b in available_backends()]


@pytest.fixture(scope="module")
def lattice():
    """Metal, chalcogen and hollow sites of a 2H lattice (spacing 14 px, 8 deg), jittered, with
    per-site bases and sublattice intensities (a few dark sites as defects)."""
    rng = np.random.default_rng(7)
    th = np.deg2rad(8.0)
    a1 = 14.0 * np.array([np.cos(th), np.sin(th)])
    a2 = 14.0 * np.array([np.cos(th + np.pi / 3), np.sin(th + np.pi / 3)])
    m, n = np.meshgrid(np.arange(SIDE), np.arange(SIDE), indexing="ij")
    mn = np.column_stack([m.ravel(), n.ravel()]).astype(float)
    base = mn @ np.array([a1, a2])
    shift = (a1 + a2) / 3.0
    xy = np.concatenate([base, base + shift, base + 2 * shift]) + rng.normal(0, 0.3, (3 * len(base), 2))
    level = np.repeat([10.0, 6.0, 1.0], len(base)) + rng.normal(0, 0.5, len(xy))
    level[rng.choice(len(xy), len(xy) // 200, replace=False)] = 0.5
    # the basis each site sees: a1, a2 rotated by its sublattice's place (as the local fits give it)
    basis = np.broadcast_to(np.array([a1, a2]) / np.sqrt(3.0), (len(xy), 2, 2)).copy()
    rot = np.array([[np.cos(np.pi / 6), -np.sin(np.pi / 6)], [np.sin(np.pi / 6), np.cos(np.pi / 6)]])
    basis = basis @ rot.T + rng.normal(0, 0.01, basis.shape)
    usable = np.ones(len(xy), bool)
    usable[rng.choice(len(xy), len(xy) // 50, replace=False)] = False
    return xy, basis, level, usable


def test_local_references_speed(benchmark, speed_gate, lattice):
    xy, basis, values, usable = lattice
    args = (xy, basis, values, usable, 300, 0.25)
    info = speed_gate("local_references_vs_reference", lambda: R._local_references(*args, backend="numpy"),
                      lambda: R._local_references_reference(*args, 8192), benchmark, repeat=3)
    new, ref = info["result_ours"], info["result_reference"]
    for f in ("median", "mad", "count"):
        assert np.array_equal(getattr(new, f), getattr(ref, f), equal_nan=True), f
    # and the statistics mean something: most sites see ~100 references of their own sublattice
    assert np.median(new.count[:, 0]) > 80
    benchmark.extra_info.update(sites=len(xy))


def _kernel_args(lattice):
    xy, basis, values, usable = lattice
    refable = usable & np.isfinite(values)
    return xy, R._inverse_bases(basis), values, refable, np.arange(len(xy), dtype=np.int64), 301, 0.25


@pytest.mark.parametrize("backend", COMPILED)
def test_local_references_kernel_speed(benchmark, speed_gate, lattice, backend):
    args = _kernel_args(lattice)
    kern, numpy_kern = get_kernels(backend), get_kernels("numpy")
    kern.local_references(*args[:4], args[4][:100], 50, 0.25)  # warm-up (Numba)
    info = speed_gate(f"local_references_{backend}_vs_numpy", lambda: kern.local_references(*args),
                      lambda: numpy_kern.local_references(*args), benchmark, repeat=3, warmup=(1, 0), parallel=True)
    for a, b in zip(info["result_ours"], info["result_reference"]):
        np.testing.assert_array_equal(a, b)
    benchmark.extra_info.update(sites=len(args[0]), backend=backend)


@pytest.mark.parametrize("backend", COMPILED)
def test_neighbour_mean_speed(benchmark, speed_gate, lattice, backend):
    xy, basis, values, _ = lattice
    mu = np.ascontiguousarray(np.column_stack([values, np.sin(values), basis[:, 0, 0], basis[:, 1, 1]]))
    kern, numpy_kern = get_kernels(backend), get_kernels("numpy")
    kern.neighbour_mean(xy[:100], mu[:100], 20)  # warm-up (Numba)
    info = speed_gate(f"neighbour_mean_{backend}_vs_numpy", lambda: kern.neighbour_mean(xy, mu, 60),
                      lambda: numpy_kern.neighbour_mean(xy, mu, 60), benchmark, repeat=3, warmup=(1, 0),
                      parallel=True)
    np.testing.assert_array_equal(info["result_ours"], info["result_reference"])
    benchmark.extra_info.update(sites=len(xy), backend=backend)
