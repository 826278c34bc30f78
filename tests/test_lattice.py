"""Local lattice: spacing estimation, fill-in (hexagon centres, vacancies), holes, dirt, strain."""
from __future__ import annotations

import numpy as np
import pytest

from stemfast.backend import available_backends
from stemfast.lattice import (
    LatticeSettings,
    estimate_spacing,
    fill_lattice,
    local_strain,
    sublattice_labels,
    triangular_basis,
)


def triangular_points(shape, spacing, angle, *, strain=(0.0, 0.0, 0.0), jitter=0.0, seed=0):
    """All points of a (strained) triangular lattice inside ``shape``, with their (m, n) indices."""
    H, W = shape
    b = triangular_basis(spacing, angle)
    F = np.array([[1 + strain[0], strain[2]], [strain[2], 1 + strain[1]]])
    b = b @ F.T
    r = int(2 * max(H, W) / spacing) + 4
    m, n = np.meshgrid(np.arange(-r, r + 1), np.arange(-r, r + 1))
    m, n = m.ravel(), n.ravel()
    xy = np.stack([m, n], 1) @ b + np.array([W / 2 + 0.3, H / 2 - 0.2])
    rng = np.random.default_rng(seed)
    xy = xy + rng.normal(0, jitter, xy.shape)
    inside = (xy[:, 0] >= 1) & (xy[:, 0] <= W - 2) & (xy[:, 1] >= 1) & (xy[:, 1] <= H - 2)
    return xy[inside], m[inside], n[inside]


def match(a, b, tol):
    from scipy.spatial import cKDTree

    d, _ = cKDTree(b).query(a)
    return d <= tol


BACKENDS = available_backends()


def test_estimate_spacing_honeycomb_with_noise():
    xy, m, n = triangular_points((300, 300), 12.0, 23.0, jitter=0.3)
    honey = (m - n) % 3 != 0
    s, a = estimate_spacing(xy[honey])
    assert s == pytest.approx(12.0, rel=0.03)
    assert a == pytest.approx(23.0, abs=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fill_adds_hexagon_centres_and_vacancies(backend):
    xy, m, n = triangular_points((320, 300), 11.0, 7.0, strain=(0.02, -0.01, 0.01), jitter=0.15, seed=1)
    sub = (m - n) % 3  # 0 = hollow, 1/2 = the two atom sublattices
    rng = np.random.default_rng(2)
    atoms = np.flatnonzero(sub != 0)
    interior = atoms[(xy[atoms] > 40).all(1) & (xy[atoms, 0] < 260) & (xy[atoms, 1] < 280)]
    vac = rng.choice(interior, 12, replace=False)
    found = np.setdiff1d(atoms, vac)
    res = fill_lattice(xy[found], shape=(320, 300), backend=backend)
    added = res.xy[~res.is_peak]
    missing = np.setdiff1d(np.arange(len(xy)), found)  # hollows + vacancies
    ok = match(xy[missing], added, 0.3 * 11.0)
    assert ok.mean() >= 0.99, f"only {ok.mean():.3f} of the missing lattice points were added"
    assert match(xy[vac], added, 0.3 * 11.0).all(), "a vacancy was not added"
    # nothing spurious: every added site is a true lattice point (the truth list stops 1 px inside
    # the image, so a site predicted within a px of that line has no truth entry to match)
    inner = (added[:, 0] > 2) & (added[:, 0] < 297) & (added[:, 1] > 2) & (added[:, 1] < 317)
    assert match(added[inner], xy, 0.3 * 11.0).all()
    # never outside the image
    assert (res.xy >= 0).all() and (res.xy[:, 0] <= 299).all() and (res.xy[:, 1] <= 319).all()
    # local lattice vectors recover the strained lattice
    good = np.isfinite(res.rms)
    assert good.mean() > 0.95
    lengths = np.sqrt((res.basis[good] ** 2).sum(-1))
    assert np.median(lengths) == pytest.approx(11.0, rel=0.02)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fill_stops_at_a_hole(backend):
    shape = (300, 300)
    xy, m, n = triangular_points(shape, 10.0, 0.0, jitter=0.1)
    hole_c, hole_r = np.array([150.0, 150.0]), 45.0
    out_hole = np.hypot(*(xy - hole_c).T) > hole_r
    honey = (m - n) % 3 != 0
    film = np.ones(shape, bool)
    yy, xx = np.mgrid[:300, :300]
    film[np.hypot(xx - 150, yy - 150) <= hole_r] = False
    res = fill_lattice(xy[honey & out_hole], shape=shape, film=film, backend=backend)
    added = res.xy[~res.is_peak]
    # no site inside the hole (beyond half a spacing from its edge)
    assert (np.hypot(*(added - hole_c).T) > hole_r - 5.0).all()
    # the hexagon centres of the film are all there
    want = xy[~honey & out_hole]
    want = want[np.hypot(*(want - hole_c).T) > hole_r + 10]
    assert match(want, added, 3.0).mean() > 0.99
    # with the film unknown (None) the enclosure rule alone also stops at the hole's edge
    res2 = fill_lattice(xy[honey & out_hole], shape=shape, film=None, backend=backend)
    added2 = res2.xy[~res2.is_peak]
    assert (np.hypot(*(added2 - hole_c).T) > hole_r - 5.0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fill_carries_on_across_a_dirty_patch(backend):
    shape = (300, 300)
    xy, m, n = triangular_points(shape, 10.0, 12.0, jitter=0.1, seed=3)
    honey = (m - n) % 3 != 0
    c, r = np.array([140.0, 160.0]), 30.0
    dirty = np.hypot(*(xy - c).T) <= r
    rng = np.random.default_rng(4)
    junk = c + rng.uniform(-r, r, size=(40, 2))  # spurious maxima at random places in the patch
    peaks = np.concatenate([xy[honey & ~dirty], junk])
    res = fill_lattice(peaks, shape=shape, film=True, backend=backend)
    # the lattice sites under the patch are predicted (hollow and atom sites alike)
    under = xy[dirty]
    got = match(under, res.xy, 3.0)
    assert got.mean() > 0.9, f"only {got.mean():.2f} of the sites under the dirt were predicted"


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_lattice_region_is_not_invented(backend):
    # a lattice on the left half only; the right half has no columns at all
    shape = (200, 400)
    xy, m, n = triangular_points(shape, 10.0, 0.0, jitter=0.1)
    keep = ((m - n) % 3 != 0) & (xy[:, 0] < 150)
    res = fill_lattice(xy[keep], shape=shape, film=True, backend=backend)
    s = LatticeSettings()
    assert res.xy[:, 0].max() < 150 + (s.max_extrapolation + 1) * 10.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_sublattice_labels_three_colour_the_lattice(backend):
    xy, m, n = triangular_points((200, 200), 10.0, 17.0, strain=(0.01, 0.0, 0.0))
    basis = np.broadcast_to(triangular_basis(10.0, 17.0) @ np.array([[1.01, 0], [0, 1]]).T, (len(xy), 2, 2))
    true = (m - n) % 3
    values = np.array([1.0, 0.5, 0.0])[true]  # colour 0 brightest etc.
    lab = sublattice_labels(xy, np.ascontiguousarray(basis), spacing=10.0, values=values, backend=backend)
    assert (lab == true).all()


def _random_walk_tree(n, seed):
    """A random tree over ``n`` nodes listed parents-first (node 0 the root): (kids, parents, step)."""
    rng = np.random.default_rng(seed)
    order = np.concatenate([[0], rng.permutation(np.arange(1, n))])
    pos = np.arange(1, n)
    parents = order[(rng.random(n - 1) * pos).astype(np.int64)]  # any node placed earlier in the order
    return order[1:].astype(np.int64), parents.astype(np.int64), rng.integers(0, 3, n - 1).astype(np.int64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_propagate_labels_backends_agree_with_the_numpy_reference(backend):
    from stemfast.backend import get_kernels

    for n, seed in ((1, 0), (2, 1), (500, 2), (20000, 3)):
        kids, parents, step = _random_walk_tree(n, seed)
        ref = np.full(n, -1, np.int64)
        ref[0] = 0
        get_kernels("numpy").propagate_labels(ref, kids, parents, step)
        got = np.full(n, -1, np.int64)
        got[0] = 0
        get_kernels(backend).propagate_labels(got, kids, parents, step)
        np.testing.assert_array_equal(got, ref)
        assert (ref >= 0).all() and (ref < 3).all()
        # the reference itself: each kid is its parent's label plus the step, mod 3
        assert ((ref[parents] + step) % 3 == ref[kids]).all()
        if n > 2:
            assert len(np.unique(ref)) == 3


def test_local_strain_recovers_uniform_strain():
    ref = triangular_basis(10.0, 0.0)
    F = np.array([[1.02, 0.005], [0.005, 0.99]])
    b = np.broadcast_to(ref @ F.T, (5, 2, 2))
    st = local_strain(b, reference=ref)
    assert st["exx"] == pytest.approx(0.02)
    assert st["eyy"] == pytest.approx(-0.01)
    assert st["exy"] == pytest.approx(0.005)
    assert st["rotation_deg"] == pytest.approx(0.0, abs=1e-9)
