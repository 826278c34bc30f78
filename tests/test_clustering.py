"""The NumPy k-means, Gaussian mixture, silhouette and ARI against scikit-learn's on random data.

The analysis uses :mod:`stemfast.clustering` so that it does not import scikit-learn (~2.7 s); these
tests hold it to scikit-learn's results (scikit-learn is a test dependency).
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from stemfast.clustering import adjusted_rand_index, fit_gaussian_mixture, kmeans, silhouette

sklearn = pytest.importorskip("sklearn")


def _blobs(rng, n, dim, k, spread=1.0):
    centres = rng.normal(size=(k, dim)) * rng.uniform(0.5, 4.0)
    return centres[rng.integers(0, k, n)] + rng.normal(size=(n, dim)) * spread


def _cases(n_cases, seed):
    rng = np.random.default_rng(seed)
    for _ in range(n_cases):
        n, dim, k = int(rng.integers(20, 2000)), int(rng.integers(1, 7)), int(rng.integers(1, 7))
        x = _blobs(rng, n, dim, k + int(rng.integers(0, 3)))
        yield x, k, int(rng.integers(0, 1000))


@pytest.mark.parametrize("case_seed", [0, 1, 2])
def test_kmeans_matches_scikit_learn(case_seed):
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score
    from threadpoolctl import threadpool_limits

    for x, k, seed in _cases(15, case_seed):
        with threadpool_limits(limits=1):
            ref = KMeans(n_clusters=k, random_state=seed, n_init=4).fit(x)
        ours = kmeans(x, k, seed=seed, n_init=4)
        assert ours.inertia == pytest.approx(ref.inertia_, rel=1e-9)
        assert adjusted_rand_score(ref.labels_, ours.labels) == 1.0
        # the same draws from the same seed: the same cluster numbering too
        np.testing.assert_array_equal(ours.labels, ref.labels_)
        np.testing.assert_allclose(ours.centers, ref.cluster_centers_, rtol=1e-9, atol=1e-9)


def test_kmeans_restarts_keep_the_lowest_inertia():
    x = _blobs(np.random.default_rng(5), 600, 3, 8, spread=2.0)
    first = kmeans(x, 5, seed=0, n_init=1)  # the first of the restarts below (same draws)
    many = kmeans(x, 5, seed=0, n_init=8)
    assert many.inertia <= first.inertia
    assert min(kmeans(x, 5, seed=s, n_init=1).inertia for s in range(8)) < first.inertia  # restarts differ


def test_kmeans_with_duplicate_points_and_an_empty_cluster():
    from sklearn.cluster import KMeans

    x = np.repeat([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]], [50, 3, 40], axis=0)
    ours = kmeans(x, 3, seed=0)
    ref = KMeans(n_clusters=3, random_state=0, n_init=4).fit(x)
    assert len(np.unique(ours.labels)) == 3
    assert ours.inertia == pytest.approx(ref.inertia_, abs=1e-12)


@pytest.mark.parametrize("bad", [dict(k=0), dict(k=11), dict(n_init=0), dict(tol=-1.0)])
def test_kmeans_rejects_bad_arguments(bad):
    args = dict(k=2) | bad
    with pytest.raises(ValueError):
        kmeans(np.zeros((10, 2)), args.pop("k"), **args)
    with pytest.raises(ValueError):
        kmeans(np.array([[0.0, np.nan]] * 3), 2)


def test_adjusted_rand_index_matches_scikit_learn():
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(3)
    for _ in range(200):
        n = int(rng.integers(1, 400))
        a = rng.integers(0, int(rng.integers(1, 7)), n)
        b = np.where(rng.random(n) < rng.random(), a, rng.integers(0, int(rng.integers(1, 7)), n))
        assert abs(adjusted_rand_index(a, b) - adjusted_rand_score(a, b)) <= 1e-12
    labels = rng.integers(0, 4, 50)
    assert adjusted_rand_index(labels, (labels + 1) % 4) == 1.0
    assert adjusted_rand_index(np.array(["Mo", "S2", "Mo"]), np.array([2, 0, 2])) == 1.0
    with pytest.raises(ValueError):
        adjusted_rand_index(np.zeros(3), np.zeros(4))


def test_silhouette_matches_scikit_learn():
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(4)
    for x, k, seed in _cases(10, 4):
        labels = rng.integers(0, max(k, 2), len(x))
        labels[:2] = [0, 1]
        labels[2] = 7  # a singleton cluster scores 0
        assert silhouette(x, labels) == pytest.approx(silhouette_score(x, labels), abs=1e-8)
    with pytest.raises(ValueError):
        silhouette(np.zeros((5, 2)), np.zeros(5))


def test_gaussian_mixture_matches_scikit_learn():
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(6)
    for _ in range(12):
        n, dim, k = int(rng.integers(40, 2000)), int(rng.integers(1, 7)), int(rng.integers(1, 5))
        x = _blobs(rng, n, dim, k + 1) * rng.uniform(0.2, 2.0, dim)
        seed = int(rng.integers(0, 1000))
        ref = GaussianMixture(k, covariance_type="full", random_state=seed, reg_covar=1e-4).fit(x)
        ours = fit_gaussian_mixture(x, k, seed=seed, reg_covar=1e-4)
        np.testing.assert_allclose(ours.log_density(x), ref.score_samples(x), rtol=1e-10, atol=1e-10)
        assert ours.converged == ref.converged_ and ours.n_iter == ref.n_iter_


def test_a_mixture_step_on_non_finite_responsibilities_raises_instead_of_giving_nan():
    """The M step's Cholesky factors come from LAPACK directly (``potrf``), which, unlike
    ``scipy.linalg.cholesky``, does not check its input: responsibilities lost to underflow (NaN) must
    still be an error, not NaN precisions that score every site NaN."""
    from stemfast.clustering import _gaussian_parameters

    x = np.random.default_rng(0).normal(size=(50, 3))
    resp = np.full((50, 2), 0.5)
    resp[7, 1] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        _gaussian_parameters(x, resp, 1e-6)
    _, _, prec = _gaussian_parameters(x, np.full((50, 2), 0.5), 1e-6)
    assert np.isfinite(prec).all()


def test_the_analysis_does_not_import_scikit_learn():
    """Classes, ARI and the latent-density score of the default analysis, in a fresh interpreter."""
    code = ("import sys, numpy as np\n"
            "from types import SimpleNamespace\n"
            "from stemfast.analysis import AnalysisSettings, analyze_sites\n"
            "from stemfast.table import SiteTable\n"
            "rng = np.random.default_rng(0); sub = np.repeat([0, 1, 2], 300)\n"
            "mu = np.array([[3.0, 0.0], [0.0, 3.0], [-3.0, -3.0]])[sub] + rng.normal(0, 0.2, (900, 2))\n"
            "xy = rng.uniform(0, 500, (900, 2))\n"
            "sites = SiteTable({'x': xy[:, 0], 'y': xy[:, 1], 'sublattice': sub,\n"
            "                   'intensity': np.array([1.0, 0.4, 0.0])[sub] + rng.normal(0, 0.02, 900)})\n"
            "enc = SimpleNamespace(mu=mu, recon_error=rng.gamma(4.0, 0.01, 900), angle=np.full(900, np.nan))\n"
            "t, s = analyze_sites(sites, enc, settings=AnalysisSettings())\n"
            "assert s['n_classes'] == 3 and np.isfinite(t['latent_score']).all(), s\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'pandas')"
            " or m.startswith('scipy.stats')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
