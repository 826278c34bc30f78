"""The k-nearest statistics kernels ``local_references`` / ``neighbour_mean`` (all backends) against the
contract spelled out by brute force, and the analysis functions built on them."""
from __future__ import annotations

import numpy as np
import pytest

from stemfast import analysis as A
from stemfast import references as R
from stemfast.backend import available_backends, get_kernels

BACKENDS = available_backends()


def brute_nearest(xy, i, k):
    """The k nearest sites of site i: squared distance dx * dx + dy * dy, ties by index, nearest first."""
    dx = xy[:, 0] - xy[i, 0]
    dy = xy[:, 1] - xy[i, 1]
    d2 = dx * dx + dy * dy
    order = np.lexsort((np.arange(len(xy)), d2))[:k]
    return order, d2[order]


def brute_references(xy, inv, values, refable, rows, k, tol):
    med = np.full((len(rows), 3), np.nan)
    mad = np.full((len(rows), 3), np.nan)
    cnt = np.zeros((len(rows), 3), np.int64)
    reach = np.zeros(len(rows))
    for t, i in enumerate(rows):
        j, d2 = brute_nearest(xy, i, k)
        reach[t] = np.sqrt(d2[-1])
        j = j[(j != i) & refable[j]]
        x, y = xy[j, 0] - xy[i, 0], xy[j, 1] - xy[i, 1]
        m = x * inv[i, 0, 0] + y * inv[i, 1, 0]
        n = x * inv[i, 0, 1] + y * inv[i, 1, 1]
        with np.errstate(invalid="ignore"):
            node = (np.abs(m - np.rint(m)) < tol) & (np.abs(n - np.rint(n)) < tol)
        colour = (np.rint(m[node]) - np.rint(n[node])).astype(np.int64) % 3
        for c in range(3):
            v = np.sort(values[j[node][colour == c]])
            cnt[t, c] = len(v)
            if len(v):
                med[t, c] = 0.5 * (v[(len(v) - 1) // 2] + v[len(v) // 2])
                a = np.sort(np.abs(v - med[t, c]))
                mad[t, c] = 1.4826 * (0.5 * (a[(len(a) - 1) // 2] + a[len(a) // 2]))
    return med, mad, cnt, reach


def brute_mean(xy, values, k):
    out = np.zeros_like(values)
    for i in range(len(xy)):
        j, _ = brute_nearest(xy, i, k)
        for t in j:  # one at a time, nearest first
            out[i] += values[t]
    return out / k


def case(seed):
    """Sites of a 2H-like lattice (jittered, or exact with ties when seed % 3 == 0, with duplicates
    when seed % 4 == 1), per-site inverse bases (some NaN), values, refable flags and query rows."""
    rng = np.random.default_rng(seed)
    a1, a2 = np.array([7.0, 0.0]), np.array([3.5, 7.0 * np.sqrt(3) / 2])
    side = int(rng.integers(2, 14))
    mn = np.array([(m, n) for m in range(side) for n in range(side)], float)
    xy = mn @ np.array([a1, a2])
    if seed % 3:
        xy = xy + rng.normal(0, 0.4, xy.shape)
    if seed % 4 == 1:
        xy = np.concatenate([xy, xy[: len(xy) // 5]])
    n = len(xy)
    basis = np.broadcast_to(np.array([a1, a2]), (n, 2, 2)) + rng.normal(0, 0.05 if seed % 3 else 0.0, (n, 2, 2))
    basis[rng.random(n) < 0.05] = 0.0  # no lattice there
    inv = R._inverse_bases(basis)
    values = np.choose(((mn[:, 0] - mn[:, 1]) % 3).astype(int), [10.0, 5.0, 0.0]) if not seed % 4 == 1 else None
    values = rng.normal(5.0, 2.0, n) if values is None else values + rng.normal(0, 0.3, n)
    if seed % 2:
        values = np.round(values, 1)  # equal values: medians of ties
    refable = rng.random(n) > 0.1
    rows = np.arange(n) if seed % 5 else np.sort(rng.choice(n, max(1, n // 3), replace=False))
    k = int(rng.integers(1, n + 1)) if seed % 2 else min(n, 31)
    return np.ascontiguousarray(xy), inv, values, refable, rows.astype(np.int64), k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(12))
def test_local_references_follows_the_contract(backend, seed):
    xy, inv, values, refable, rows, k = case(seed)
    got = get_kernels(backend).local_references(xy, inv, values, refable, rows, k, 0.25)
    ref = brute_references(xy, inv, values, refable, rows, k, 0.25)
    for name, a, b in zip(("median", "mad", "count", "reach"), got, ref):
        np.testing.assert_array_equal(a, b, err_msg=f"{backend} seed {seed}: {name}")
    assert got[2].sum() > 0 or len(xy) < 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(8))
def test_neighbour_mean_follows_the_contract(backend, seed):
    xy, _, values, _, _, k = case(seed)
    vals = np.ascontiguousarray(np.column_stack([values, np.sin(values), np.arange(len(xy)) / 7.0]))
    got = get_kernels(backend).neighbour_mean(xy, vals, k)
    np.testing.assert_array_equal(got, brute_mean(xy, vals, k), err_msg=f"{backend} seed {seed}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_far_sites_and_an_uneven_density(backend):
    """Two dense clusters far apart and a lone site: the search radius grows until it holds k sites."""
    rng = np.random.default_rng(5)
    xy = np.concatenate([rng.normal(0, 3, (150, 2)), rng.normal(500, 3, (20, 2)), [[-900.0, 40.0]]])
    vals = rng.normal(size=(len(xy), 2))
    np.testing.assert_array_equal(get_kernels(backend).neighbour_mean(xy, vals, 40), brute_mean(xy, vals, 40))
    inv = np.broadcast_to(np.eye(2) / 3.0, (len(xy), 2, 2)).copy()
    refable = np.ones(len(xy), bool)
    rows = np.arange(len(xy), dtype=np.int64)
    got = get_kernels(backend).local_references(xy, inv, vals[:, 0].copy(), refable, rows, 60, 0.4)
    for a, b in zip(got, brute_references(xy, inv, vals[:, 0], refable, rows, 60, 0.4)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reject_bad_arguments(backend):
    kern = get_kernels(backend)
    xy = np.zeros((5, 2))
    xy[:, 0] = np.arange(5)
    inv = np.broadcast_to(np.eye(2), (5, 2, 2)).copy()
    ok = np.ones(5, bool)
    with pytest.raises(ValueError, match="k must be"):
        kern.local_references(xy, inv, np.ones(5), ok, np.arange(5), 6, 0.25)
    with pytest.raises(ValueError, match="k must be"):
        kern.neighbour_mean(xy, np.ones((5, 1)), 0)
    with pytest.raises(ValueError):
        kern.local_references(xy, inv, np.ones(5), ok, np.array([0, 5]), 3, 0.25)


def test_the_public_functions_agree_on_all_backends():
    """local_references and neighbourhood_mean give the same on every backend, values of any shape."""
    xy, _, values, refable, _, _ = case(4)
    basis = np.broadcast_to(np.array([[7.0, 0.0], [3.5, 7.0 * np.sqrt(3) / 2]]), (len(xy), 2, 2))
    mu = np.column_stack([values, values ** 2]).reshape(len(xy), 2, 1)
    out = {b: (R.local_references(xy, basis, values, usable=refable, n_neighbors=40, backend=b),
               A.neighbourhood_mean(xy, mu, 12, backend=b)) for b in BACKENDS}
    for b, (refs, mean) in out.items():
        ref, ref_mean = out["numpy"]
        for f in ("median", "mad", "count", "reach"):
            np.testing.assert_array_equal(getattr(refs, f), getattr(ref, f), err_msg=f"{b} {f}")
        assert mean.shape == mu.shape
        np.testing.assert_array_equal(mean, ref_mean)
    with pytest.raises(ValueError, match="xy must be"):
        A.neighbourhood_mean(xy[:, :1], values, 5)
    with pytest.raises(ValueError, match="k must be"):
        A.neighbourhood_mean(xy, values, 0)
