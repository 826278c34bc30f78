"""benchmarks/dopant_diagnostics.py: the neighbour-relaxation and contraction measures of round 5 on a
synthetic 2H lattice (no shared data)."""
from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def diag(benchmark_script):
    return benchmark_script("dopant_diagnostics")


def _honeycomb(nn=5.0, n=14):
    """Metal (0), chalcogen (1) and hexagon-centre (2) sites of a 2H lattice with nearest spacing nn."""
    a1 = np.sqrt(3) * nn * np.array([1.0, 0.0])
    a2 = np.sqrt(3) * nn * np.array([0.5, np.sqrt(3) / 2])
    ij = np.array([(i, j) for i in range(n) for j in range(n)], float)
    node = ij @ np.stack([a1, a2])
    xy = np.concatenate([node, node + (a1 + a2) / 3, node + 2 * (a1 + a2) / 3])
    grp = np.repeat([0, 1, 2], len(node))
    return xy, grp


def test_relaxation_of_the_neighbours_towards_a_site(diag):
    nn = 5.0
    xy, grp = _honeycomb(nn)
    centre = np.argmin(np.linalg.norm(xy - xy.mean(0), axis=1) + 1e3 * (grp != 1))  # a chalcogen site inside
    d = np.linalg.norm(xy - xy[centre], axis=1)
    near = np.flatnonzero((grp == 0) & (np.abs(d - nn) < 0.1))
    assert len(near) == 3
    moved = xy.copy()
    moved[near] += 0.3 * (xy[centre] - xy[near]) / nn          # the three metal neighbours move 0.3 px inwards
    relax0, contr0 = diag.geometry(xy, grp, nn)
    relax, contr = diag.geometry(moved, grp, nn)
    inner = np.isfinite(relax0)
    assert np.allclose(relax0[inner], 0.0, atol=1e-9) and np.allclose(contr0[inner], 0.0, atol=1e-9)
    # each moved neighbour has the other two among its six references, which moved the other way on average
    # (u1 + u2 + u3 = 0): its reference centroid shifts by -0.3 u / 6, its offset reads 0.3 + 0.05 px
    assert relax[centre] == pytest.approx(0.35, abs=1e-6)
    assert contr[centre] == pytest.approx(0.3 / nn, abs=1e-6)
    far = inner & (d > 4 * nn)
    assert np.abs(relax[far]).max() < 1e-9
    assert np.isnan(relax[grp == 2]).all()                        # hexagon centres are not judged
