"""Benchmarks of the analysis stage (``stemfast.analysis``).

Gated (``speed_gate``, see conftest.py: CPU time, one thread on both sides, paired):

* ``local_references_vs_reference``: :func:`stemfast.analysis._local_references` against the
  straightforward implementation it replaced (``_local_references_reference``: a 2 x 2 ``einsum``
  per neighbour and one masked sort per colour and statistic), on the same jittered 2H lattice; both
  share the k-d tree query of the 300 neighbours, so the ratio is bounded by it. Results asserted
  identical (bit for bit) alongside.

Quick mode: ~6k sites (a 1024^2 image has ~5k); full mode (``STEMFAST_BENCH_FULL=1``): ~84k (4096^2).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from stemfast import analysis as A

QUICK = os.environ.get("STEMFAST_BENCH_QUICK", "0") not in ("0", "", "false", "no")
SIDE = 45 if QUICK else 167  # nodes per side (x 3 sites: metal, chalcogen, hollow): 6,075 / 83,667 sites


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
    args = (xy, basis, values, usable, 300, 0.25, 8192)
    info = speed_gate("local_references_vs_reference", lambda: A._local_references(*args, workers=1),
                      lambda: A._local_references_reference(*args), benchmark, repeat=3)
    new, ref = info["result_ours"], info["result_reference"]
    for f in ("median", "mad", "count"):
        assert np.array_equal(getattr(new, f), getattr(ref, f), equal_nan=True), f
    # and the statistics mean something: most sites see ~100 references of their own sublattice
    assert np.median(new.count[:, 0]) > 80
    benchmark.extra_info.update(sites=len(xy))
