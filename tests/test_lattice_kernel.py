"""The ``fit_local_lattices`` kernel: backend agreement with the NumPy reference and known answers."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from stemfast.backend import available_backends, get_kernels

# "cpp-scalar": the compiled kernel's portable scalar loop (the default one uses SSE2 on x86-64)
BACKENDS = available_backends() + (["cpp-scalar"] if "cpp" in available_backends() else [])
N_ITER = 3
TOL = 0.25


def tri_basis(spacing: float, angle_deg: float) -> np.ndarray:
    t = np.deg2rad(angle_deg)
    return spacing * np.array([[np.cos(t), np.sin(t)], [np.cos(t + np.pi / 3), np.sin(t + np.pi / 3)]])


def lattice_points(basis: np.ndarray, half: int, shift=(0.0, 0.0)):
    m, n = np.meshgrid(np.arange(-half, half + 1), np.arange(-half, half + 1))
    mn = np.stack([m.ravel(), n.ravel()], 1)
    return mn, mn @ basis + np.asarray(shift, dtype=float)


def neighbour_table(xy: np.ndarray, k: int, radius: float) -> np.ndarray:
    _, idx = cKDTree(xy).query(xy, k=min(k, len(xy)), distance_upper_bound=radius)
    idx = np.asarray(idx, dtype=np.int64).reshape(len(xy), -1)
    idx[idx >= len(xy)] = -1
    return np.ascontiguousarray(idx)


def fit(backend, xy, nb, b0, n_iter=N_ITER, tol=TOL):
    b0 = np.ascontiguousarray(np.broadcast_to(b0, (len(xy), 2, 2)), dtype=np.float64)
    args = (np.ascontiguousarray(xy, dtype=np.float64), np.ascontiguousarray(nb, dtype=np.int64), b0, n_iter, tol)
    if backend == "cpp-scalar":
        return get_kernels("cpp").fit_local_lattices(*args, scalar=True)
    return get_kernels(backend).fit_local_lattices(*args)


def random_case(seed: int):
    """Perturbed, slightly strained triangular lattice with spurious points, missing points, extra -1
    padding, rows with and without the site itself, and per-site start bases."""
    rng = np.random.default_rng(seed)
    spacing = 9.0 + 2.0 * rng.random()
    true_b = tri_basis(spacing, 60 * rng.random()) @ np.array([[1.03, 0.01], [0.0, 0.98]])
    _, xy = lattice_points(true_b, 12, shift=(200.0, 150.0))
    xy = xy[rng.random(len(xy)) > 0.08]                                    # vacancies
    xy = xy + rng.normal(0.0, 0.04 * spacing, xy.shape)                     # jitter
    spurious = xy[rng.integers(0, len(xy), 25)] + rng.uniform(-0.5, 0.5, (25, 2)) * spacing
    xy = np.concatenate([xy, spurious])
    xy = xy[rng.permutation(len(xy))]
    nb = neighbour_table(xy, 13, 2.2 * spacing)
    # drop the site itself from some rows (query puts it first) and pad some rows with extra -1
    drop_self = rng.random(len(xy)) < 0.3
    nb[drop_self] = np.concatenate([nb[drop_self, 1:], np.full((drop_self.sum(), 1), -1)], axis=1)
    nb[rng.random(nb.shape) < 0.05] = -1
    angles = rng.normal(0.0, 3.0, len(xy))
    b0 = np.stack([tri_basis(spacing * (1 + 0.02 * rng.standard_normal()), np.rad2deg(np.arctan2(*true_b[0, ::-1])) + a)
                   for a in angles])
    return xy, nb, b0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_backends_agree_with_reference(backend, seed):
    xy, nb, b0 = random_case(seed)
    ref = fit("numpy", xy, nb, b0)
    got = fit(backend, xy, nb, b0)
    assert got[0].dtype == np.float64 and got[0].shape == (len(xy), 2)
    assert got[1].dtype == np.float64 and got[1].shape == (len(xy), 2, 2)
    assert got[2].dtype == np.float64 and got[2].shape == (len(xy),)
    assert got[3].dtype == np.int64 and got[3].shape == (len(xy),)
    np.testing.assert_array_equal(got[3], ref[3])
    np.testing.assert_allclose(got[0], ref[0], rtol=0, atol=1e-9)
    np.testing.assert_allclose(got[1], ref[1], rtol=0, atol=1e-9)
    np.testing.assert_array_equal(np.isnan(got[2]), np.isnan(ref[2]))
    np.testing.assert_allclose(got[2], ref[2], rtol=0, atol=1e-9, equal_nan=True)
    # the case exercises the interesting paths: some fits fail, most succeed, outliers are dropped
    ok = ~np.isnan(ref[2])
    assert 0 < (~ok).sum() < 0.5 * len(xy)
    n_pts = 1 + ((nb >= 0) & (nb != np.arange(len(xy))[:, None])).sum(1)
    assert (ref[3][ok] < n_pts[ok]).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_iter", [0, 1, 5])
def test_backends_agree_n_iter(backend, n_iter):
    xy, nb, b0 = random_case(7)
    ref = fit("numpy", xy, nb, b0, n_iter=n_iter)
    got = fit(backend, xy, nb, b0, n_iter=n_iter)
    np.testing.assert_array_equal(got[3], ref[3])
    for g, r in zip(got[:3], ref[:3]):
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-9, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_rotated_strained_lattice(backend):
    true_b = tri_basis(10.0, 17.0) @ np.array([[1.02, 0.0], [0.0, 1.0]])  # 2 % strain along x
    mn, xy = lattice_points(true_b, 8, shift=(123.4, 98.7))
    nb = neighbour_table(xy, 13, 2.2 * 10.0)
    b0 = tri_basis(10.0, 15.0)  # off by 2 degrees and the strain
    o, b, rms, n_used = fit(backend, xy, nb, b0)
    interior = np.abs(mn).max(1) <= 6
    np.testing.assert_allclose(b[interior], np.broadcast_to(true_b, (interior.sum(), 2, 2)), rtol=0, atol=1e-9)
    np.testing.assert_allclose(o[interior], xy[interior], rtol=0, atol=1e-9)
    assert np.all(rms[interior] < 1e-9)
    # every point of the row is used: the site once (it is in its own row) plus its other neighbours
    expected = ((nb >= 0) & (nb != np.arange(len(xy))[:, None])).sum(1) + 1
    np.testing.assert_array_equal(n_used, expected)
    assert np.all(n_used[interior] == 13)


@pytest.mark.parametrize("backend", BACKENDS)
def test_honeycomb_subset_fits_triangular_basis(backend):
    true_b = tri_basis(8.0, 17.0)
    mn, xy = lattice_points(true_b, 9, shift=(300.0, 200.0))
    keep = (mn[:, 0] - mn[:, 1]) % 3 != 0          # remove the hexagon centres: a honeycomb
    mn, xy = mn[keep], xy[keep]
    nb = neighbour_table(xy, 13, 2.2 * 8.0)
    o, b, rms, n_used = fit(backend, xy, nb, tri_basis(8.0, 18.0))
    interior = np.abs(mn).max(1) <= 6
    np.testing.assert_allclose(b[interior], np.broadcast_to(true_b, (interior.sum(), 2, 2)), rtol=0, atol=1e-9)
    np.testing.assert_allclose(o[interior], xy[interior], rtol=0, atol=1e-9)
    assert np.all(rms[interior] < 1e-9)
    assert np.all(n_used[interior] >= 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_outlier_point_is_ignored(backend):
    true_b = tri_basis(10.0, 5.0)
    _, xy = lattice_points(true_b, 2, shift=(50.0, 50.0))
    centre = int(np.argmin(np.hypot(*(xy - xy.mean(0)).T)))
    bad = xy[centre] + 0.4 * true_b[0] + 0.1 * true_b[1]       # far (> 0.25 spacing) from any lattice point
    xy = np.concatenate([xy, bad[None]])
    nb = np.full((len(xy), 24), -1, dtype=np.int64)
    near = np.flatnonzero(np.hypot(*(xy - xy[centre]).T) < 22.0)
    nb[centre, : len(near)] = near                               # includes the site and the outlier
    o, b, rms, n_used = fit(backend, xy, nb, tri_basis(10.3, 6.0))
    np.testing.assert_allclose(b[centre], true_b, rtol=0, atol=1e-9)
    np.testing.assert_allclose(o[centre], xy[centre], rtol=0, atol=1e-9)
    assert rms[centre] < 1e-9
    assert n_used[centre] == len(near) - 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_too_few_or_degenerate_points_give_nan(backend):
    b0 = tri_basis(10.0, 0.0)
    xy = np.array([[0.0, 0.0], [10.0, 0.0], [5.0, 8.66], [20.0, 0.0],    # site 0: 3 neighbours
                   [100.0, 100.0], [110.0, 100.0], [120.0, 100.0], [130.0, 100.0], [90.0, 100.0]])  # collinear
    nb = np.full((len(xy), 6), -1, dtype=np.int64)
    nb[0, :2] = [1, 2]          # the site + 2 points: too few
    nb[4, :5] = [4, 5, 6, 7, 8]  # the site + 4 collinear points: singular normal equations
    o, b, rms, n_used = fit(backend, xy, nb, b0)
    for i in (0, 4):
        assert np.isnan(rms[i]) and n_used[i] == 0
        np.testing.assert_array_equal(o[i], xy[i])
        np.testing.assert_array_equal(b[i], b0)
    assert np.isnan(rms).all()  # the remaining rows have no neighbours at all
    # and with four non-degenerate points the fit succeeds
    nb[0, :3] = [1, 2, 3]
    o, b, rms, n_used = fit(backend, xy, nb, b0)
    assert n_used[0] == 4 and np.isfinite(rms[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_site_used_once_whether_or_not_in_its_row(backend):
    xy, nb, b0 = random_case(3)
    with_self = neighbour_table(xy, 13, 22.0)                     # the query puts the site first
    assert np.all(with_self[:, 0] == np.arange(len(xy)))
    without = np.concatenate([with_self[:, 1:], np.full((len(xy), 1), -1)], axis=1)
    doubled = np.concatenate([with_self, np.arange(len(xy))[:, None]], axis=1)  # the site twice in its row
    r1, r2, r3 = (fit(backend, xy, t, b0) for t in (with_self, without, doubled))
    for a, c in ((r1, r2), (r1, r3)):
        np.testing.assert_array_equal(a[3], c[3])
        for u, v in zip(a[:3], c[:3]):
            np.testing.assert_allclose(u, v, rtol=0, atol=1e-9, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wide_padded_rows_agree(backend):
    """Rows much wider than a neighbourhood (K = 80, mostly -1 padding) give the same fits."""
    xy, nb, b0 = random_case(9)
    wide = np.full((len(xy), 80), -1, dtype=np.int64)
    wide[:, 3:3 + nb.shape[1]] = nb
    ref = fit("numpy", xy, nb, b0)
    for got in (fit(backend, xy, wide, b0), fit("numpy", xy, wide, b0)):
        np.testing.assert_array_equal(got[3], ref[3])
        for g, r in zip(got[:3], ref[:3]):
            np.testing.assert_allclose(g, r, rtol=0, atol=1e-9, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_basis_huge_indices(backend):
    """Start bases 1e9 times too small give lattice indices beyond int32: the fits fail the same way."""
    xy, nb, b0 = random_case(4)
    b0 = b0.copy()
    b0[::3] *= 1e-9
    ref = fit("numpy", xy, nb, b0)
    got = fit(backend, xy, nb, b0)
    np.testing.assert_array_equal(got[3], ref[3])
    for g, r in zip(got[:3], ref[:3]):
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-9, equal_nan=True)
    assert np.isnan(ref[2][::3]).all() and np.isfinite(ref[2][1::3]).mean() > 0.5


@pytest.mark.skipif("cpp" not in BACKENDS, reason="compiled extension not built")
@pytest.mark.parametrize("seed", [0, 5])
def test_cpp_simd_and_scalar_loops_are_bit_identical(seed):
    xy, nb, b0 = random_case(seed)
    simd = fit("cpp", xy, nb, b0, n_iter=4)
    scalar = fit("cpp-scalar", xy, nb, b0, n_iter=4)
    for a, c in zip(simd, scalar):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rejects_out_of_range_index(backend):
    xy = np.zeros((3, 2))
    nb = np.array([[0, 1, 5], [-1, -1, -1], [0, 1, 2]], dtype=np.int64)
    with pytest.raises(ValueError):
        fit(backend, xy, nb, tri_basis(1.0, 0.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input(backend):
    o, b, rms, n_used = fit(backend, np.zeros((0, 2)), np.zeros((0, 13), np.int64), tri_basis(1.0, 0.0))
    assert o.shape == (0, 2) and b.shape == (0, 2, 2) and rms.shape == (0,) and n_used.shape == (0,)


def _contract_fit_one(xy, row, i, b0, n_iter, tol):
    """The contract written out literally for one site (plain Python, np.linalg for the algebra).

    Returns (origin, basis, rms, n_used, n_successful_passes)."""
    pts = [np.zeros(2)] + [xy[j] - xy[i] for j in row if j >= 0 and j != i]
    o, B = np.zeros(2), np.array(b0, dtype=float)
    rms, n_used, passes = np.nan, 0, 0
    for _ in range(n_iter):
        a1, a2 = B
        t = tol * (np.hypot(*a1) + np.hypot(*a2)) / 2
        Binv = np.linalg.inv(B)
        rows, targets = [], []
        for d in pts:
            mn = np.floor((d - o) @ Binv + 0.5)
            r = d - o - mn @ B
            if np.hypot(*r) <= t:
                rows.append([1.0, mn[0], mn[1]])
                targets.append(d)
        if len(rows) < 4:
            break
        G = np.array(rows)
        A = G.T @ G
        if not abs(np.linalg.det(A)) > 1e-9 * np.trace(A) ** 3:
            break
        X = np.linalg.solve(A, G.T @ np.array(targets))
        o, B = X[0], X[1:]
        res = np.array(targets) - G @ X
        rms, n_used, passes = np.sqrt(np.mean(np.sum(res ** 2, axis=1))), len(rows), passes + 1
    return xy[i] + o, B, rms, n_used, passes


def _literal(xy, nb, b0, n_iter, tol, sites):
    res = [_contract_fit_one(xy, nb[i], i, b0[i], n_iter, tol) for i in sites]
    return tuple(np.array([r[q] for r in res]) for q in range(5))


def _check_literal(got, exp, sites):
    np.testing.assert_allclose(got[0][sites], exp[0], rtol=0, atol=1e-9)
    np.testing.assert_allclose(got[1][sites], exp[1], rtol=0, atol=1e-9)
    np.testing.assert_allclose(got[2][sites], exp[2], rtol=0, atol=1e-9, equal_nan=True)
    np.testing.assert_array_equal(got[3][sites], exp[3])


@pytest.fixture(scope="module")
def literal_random_case():
    xy, nb, b0 = random_case(11)
    # a wide tolerance and loose start bases: the assignment changes between passes
    b0 = b0 @ np.array([[1.08, 0.05], [-0.03, 0.95]])
    tol, n_iter = 0.3, 4
    sites = np.arange(len(xy))
    return (xy, nb, b0, n_iter, tol, sites), _literal(xy, nb, b0, n_iter, tol, sites)


@pytest.fixture(scope="module")
def literal_clusters():
    """Tiny noisy clusters (a site and 4 points): in a few of them a later pass loses points to the
    outlier rule under the model fitted by the previous pass and fails."""
    rng = np.random.default_rng(5)
    n_cl, k = 2000, 4
    mn = rng.integers(-2, 3, (n_cl, k, 2))
    pts = mn @ tri_basis(1.0, 0.0) + rng.normal(0.0, 0.2, (n_cl, k, 2))
    clusters = np.concatenate([np.zeros((n_cl, 1, 2)), pts], axis=1) + 100.0 * np.arange(n_cl)[:, None, None]
    xy = clusters.reshape(-1, 2)
    nb = np.full((len(xy), k + 1), -1, dtype=np.int64)
    centres = np.arange(n_cl) * (k + 1)
    nb[centres] = centres[:, None] + np.arange(k + 1)
    b0 = np.ascontiguousarray(np.broadcast_to(tri_basis(1.0, 0.0), (len(xy), 2, 2)))
    n_iter, tol = 4, 0.3
    return (xy, nb, b0, n_iter, tol, centres), _literal(xy, nb, b0, n_iter, tol, centres)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_literal_contract(backend, literal_random_case):
    """Every backend equals a plain per-site transcription of the contract."""
    (xy, nb, b0, n_iter, tol, sites), exp = literal_random_case
    _check_literal(fit(backend, xy, nb, b0, n_iter=n_iter, tol=tol), exp, sites)
    passes = exp[4]
    assert (passes == 0).any() and (passes == n_iter).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_failed_later_pass_keeps_previous_model(backend, literal_clusters):
    """A pass that fails after earlier successes keeps the previous model, its rms and n_used."""
    (xy, nb, b0, n_iter, tol, centres), exp = literal_clusters
    _check_literal(fit(backend, xy, nb, b0, n_iter=n_iter, tol=tol), exp, centres)
    passes = exp[4]
    stopped = (passes > 0) & (passes < n_iter)
    assert stopped.any(), "no cluster stops after a successful pass"
    assert np.isfinite(exp[2][stopped]).all() and (exp[3][stopped] >= 4).all()
