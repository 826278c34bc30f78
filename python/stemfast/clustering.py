"""k-means, silhouette and the adjusted Rand index in NumPy (no scikit-learn import on the analysis path).

:func:`kmeans` follows scikit-learn's ``KMeans(init="k-means++", algorithm="lloyd")`` step by step --
the same random draws from ``np.random.RandomState(seed)`` (greedy k-means++ with ``2 + log k`` local
trials), the same data centring, tolerance (``tol`` times the mean feature variance), strict and
tolerance convergence, empty-cluster relocation and choice among restarts -- so it gives the same
clustering as scikit-learn up to floating-point rounding in the distances (tests/test_clustering.py
compares them on random data). :func:`fit_gaussian_mixture` likewise follows ``GaussianMixture(
covariance_type="full")`` (k-means initialisation with one start, EM until the mean log-likelihood
changes by less than ``tol``). Importing scikit-learn costs ~2.7 s on this project's machines (it
brings scipy.stats and pandas), more than the whole analysis of a 1024^2 image.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["KMeansResult", "kmeans", "GaussianMixtureFit", "fit_gaussian_mixture", "silhouette",
           "adjusted_rand_index"]

#: rows per block of the distance computations (bounds the temporary arrays)
_CHUNK = 4096


@dataclass(frozen=True)
class KMeansResult:
    """What :func:`kmeans` gives: ``labels`` [N] int64, ``centers`` [k, D], ``inertia`` (sum of squared
    distances to the assigned centre) and ``n_iter`` of the kept restart."""

    labels: np.ndarray
    centers: np.ndarray
    inertia: float
    n_iter: int


def kmeans(x: np.ndarray, k: int, *, seed: int = 0, n_init: int = 4, max_iter: int = 300,
           tol: float = 1e-4) -> KMeansResult:
    """k-means (k-means++ seeding, Lloyd iterations), the restart with the lowest inertia kept.

    Parameters
    ----------
    x : [N, D] data (converted to float64).
    k : number of clusters, ``1 <= k <= N``.
    seed : seed of the ``np.random.RandomState`` all restarts draw from in turn.
    n_init : restarts; a later one replaces the kept one only when its inertia is lower and its
        clustering differs (a relabelled copy with a rounding-lower inertia is not a new result).
    max_iter, tol : at most ``max_iter`` Lloyd steps; a restart stops when no label changes or the
        squared centre shift falls to ``tol`` times the mean feature variance.

    Examples
    --------
    >>> x = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]])
    >>> r = kmeans(x, 2, seed=0)
    >>> bool(r.labels[0] == r.labels[1] != r.labels[2] == r.labels[3]), round(r.inertia, 3)
    (True, 0.01)
    """
    x = np.array(x, dtype=np.float64, order="C", copy=True)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"x must be a non-empty [N, D] array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("x must be finite")
    if not 1 <= k <= len(x):
        raise ValueError(f"k must be in [1, {len(x)}], got {k}")
    if n_init < 1 or max_iter < 1 or tol < 0:
        raise ValueError("n_init and max_iter must be >= 1 and tol >= 0")
    return _kmeans(x, int(k), seed=seed, n_init=int(n_init), max_iter=int(max_iter), tol=float(tol))


def _kmeans(x: np.ndarray, k: int, *, seed: int, n_init: int, max_iter: int, tol: float) -> KMeansResult:
    tol_abs = float(np.mean(np.var(x, axis=0))) * tol
    mean = x.mean(axis=0)
    x -= mean  # distances of centred data lose less to rounding
    x_sq = np.einsum("ij,ij->i", x, x)
    rng = np.random.RandomState(seed)
    best = None
    for _ in range(n_init):
        centers = _kmeans_plusplus(x, k, x_sq, rng)
        labels, inertia, centers, n_iter = _lloyd(x, centers, max_iter=max_iter, tol=tol_abs)
        if best is None or (inertia < best[1] and not _same_clustering(labels, best[0], k)):
            best = (labels, inertia, centers, n_iter)
    labels, inertia, centers, n_iter = best
    return KMeansResult(labels=labels.astype(np.int64), centers=centers + mean, inertia=float(inertia),
                        n_iter=int(n_iter))


def _sq_dist(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    """Squared distances [len(a), len(b)] as ``|a|^2 - 2 a.b + |b|^2`` clipped at 0."""
    d = -2.0 * (a @ b.T)
    d += np.einsum("ij,ij->i", a, a)[:, None]
    d += b_sq[None, :]
    return np.maximum(d, 0.0, out=d)


def _kmeans_plusplus(x: np.ndarray, k: int, x_sq: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """Greedy k-means++: each further centre is the best (lowest potential) of ``2 + log k`` draws."""
    n = len(x)
    n_trials = 2 + int(np.log(k))
    centers = np.empty((k, x.shape[1]))
    ones = np.ones(n)
    first = rng.choice(n, p=ones / n)
    centers[0] = x[first]
    closest = _sq_dist(x[first][None], x, x_sq)[0]
    pot = closest @ ones
    for c in range(1, k):
        draws = rng.uniform(size=n_trials) * pot
        cand = np.minimum(np.searchsorted(np.cumsum(closest), draws), n - 1)
        d = np.minimum(closest, _sq_dist(x[cand], x, x_sq))
        pots = d @ ones
        b = int(np.argmin(pots))
        pot, closest = pots[b], d[b]
        centers[c] = x[cand[b]]
    return centers


def _assign(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Index of the nearest centre (first on ties) by ``|c|^2 - 2 x.c``."""
    c_sq = np.einsum("ij,ij->i", centers, centers)
    out = np.empty(len(x), np.int64)
    for s in range(0, len(x), _CHUNK):
        d = -2.0 * (x[s:s + _CHUNK] @ centers.T)
        d += c_sq
        out[s:s + _CHUNK] = np.argmin(d, axis=1)
    return out


def _update(x: np.ndarray, labels: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Cluster means of ``labels``; an empty cluster takes the point farthest from its centre."""
    k, dim = old.shape
    # per dimension, the sums in the points' order (what np.add.at gives, ~10x faster)
    sums = np.stack([np.bincount(labels, weights=x[:, d], minlength=k) for d in range(dim)], axis=1
                    ) if dim else np.zeros((k, 0))
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        dist = ((x - old[labels]) ** 2).sum(axis=1)
        if dist.max() > 0:
            far = np.argpartition(dist, -len(empty))[:-len(empty) - 1:-1]
            for e, i in zip(empty, far):
                sums[labels[i]] -= x[i]
                sums[e] = x[i]
                counts[e] = 1.0
                counts[labels[i]] -= 1.0
    new = np.empty_like(sums)
    for j in range(k):  # the biggest cluster's centre for one still empty
        new[j] = sums[j] * (1.0 / counts[j]) if counts[j] > 0 else sums[np.argmax(counts)] / counts.max()
    return new


def _lloyd(x: np.ndarray, centers: np.ndarray, *, max_iter: int, tol: float):
    """Lloyd iterations from ``centers``; returns (labels, inertia, centers, iterations)."""
    labels_old = np.full(len(x), -1, np.int64)
    strict = False
    for i in range(max_iter):
        labels = _assign(x, centers)
        new = _update(x, labels, centers)
        shift = float(((new - centers) ** 2).sum())
        centers = new
        if np.array_equal(labels, labels_old):
            strict = True
            break
        if shift <= tol:
            break
        labels_old = labels
    if not strict:
        labels = _assign(x, centers)
    inertia = float(((x - centers[labels]) ** 2).sum())
    return labels, inertia, centers, i + 1


def _same_clustering(a: np.ndarray, b: np.ndarray, k: int) -> bool:
    """Whether two labellings are the same partition up to renaming the clusters."""
    mapping = np.full(k, -1, np.int64)
    for la, lb in zip(a, b):
        if mapping[la] == -1:
            mapping[la] = lb
        elif mapping[la] != lb:
            return False
    return True


@dataclass(frozen=True)
class GaussianMixtureFit:
    """A fitted Gaussian mixture: ``weights`` [k], ``means`` [k, D], ``precisions_chol`` [k, D, D]
    (the Cholesky factors of the precision matrices), and whether EM ``converged`` in ``n_iter`` steps."""

    weights: np.ndarray
    means: np.ndarray
    precisions_chol: np.ndarray
    converged: bool
    n_iter: int

    def log_density(self, x: np.ndarray) -> np.ndarray:
        """Log density of each row of ``x`` [N, D] under the mixture [N]."""
        return _logsumexp_rows(_weighted_log_prob(np.asarray(x, dtype=np.float64), self))


def fit_gaussian_mixture(x: np.ndarray, k: int, *, seed: int = 0, reg_covar: float = 1e-6, tol: float = 1e-3,
                         max_iter: int = 100) -> GaussianMixtureFit:
    """Full-covariance Gaussian mixture by EM from a k-means start (one :func:`kmeans` restart).

    ``reg_covar`` is added to every covariance's diagonal; EM stops when the mean log-likelihood
    changes by less than ``tol`` or after ``max_iter`` steps (then ``converged`` is False).

    Examples
    --------
    >>> x = np.random.default_rng(0).normal(size=(400, 2)) + np.repeat([[0.0, 0.0], [8.0, 0.0]], 200, axis=0)
    >>> g = fit_gaussian_mixture(x, 2, seed=0)
    >>> np.round(np.sort(g.means[:, 0])).tolist() == [0.0, 8.0], g.converged
    (True, True)
    """
    x = np.array(x, dtype=np.float64, order="C")
    if x.ndim != 2 or not np.isfinite(x).all():
        raise ValueError("x must be a finite [N, D] array")
    if not 1 <= k <= len(x):
        raise ValueError(f"k must be in [1, {len(x)}], got {k}")
    if reg_covar < 0 or tol < 0 or max_iter < 1:
        raise ValueError("reg_covar and tol must be >= 0 and max_iter >= 1")
    return _fit_gaussian_mixture(x, int(k), seed=seed, reg_covar=float(reg_covar), tol=float(tol),
                                 max_iter=int(max_iter))


def _fit_gaussian_mixture(x: np.ndarray, k: int, *, seed: int, reg_covar: float, tol: float,
                          max_iter: int) -> GaussianMixtureFit:
    resp = np.zeros((len(x), k))
    resp[np.arange(len(x)), _kmeans(x.copy(), k, seed=seed, n_init=1, max_iter=300, tol=1e-4).labels] = 1.0
    weights, means, prec = _gaussian_parameters(x, resp, reg_covar)
    weights = weights / len(x)
    bound, converged = -np.inf, False
    for n_iter in range(1, max_iter + 1):
        prev = bound
        wlp = _weighted_log_prob(x, GaussianMixtureFit(weights, means, prec, False, 0))
        norm = _logsumexp_rows(wlp)
        weights, means, prec = _gaussian_parameters(x, np.exp(wlp - norm[:, None]), reg_covar)
        weights = weights / weights.sum()
        bound = float(np.mean(norm))
        if abs(bound - prev) < tol:
            converged = True
            break
    return GaussianMixtureFit(weights, means, prec, converged, n_iter)


def _gaussian_parameters(x: np.ndarray, resp: np.ndarray, reg_covar: float):
    """M step: component weights (unnormalised), means and precision Cholesky factors. The factors
    come from LAPACK's ``potrf`` and ``trtrs`` called as ``scipy.linalg.cholesky(cov, lower=True)`` and
    ``solve_triangular(chol, eye, lower=True)`` call them (the same results, without their input
    checks: ~0.1 ms a component, a third of a small image's mixture fits)."""
    from scipy.linalg import get_lapack_funcs

    nk = resp.sum(axis=0) + 10 * np.finfo(resp.dtype).eps
    means = (resp.T @ x) / nk[:, None]
    dim = x.shape[1]
    prec = np.empty((len(nk), dim, dim))
    eye = np.eye(dim)
    potrf, trtrs = get_lapack_funcs(("potrf", "trtrs"), (means, eye))
    for j in range(len(nk)):
        diff = x - means[j]
        cov = ((resp[:, j] * diff.T) @ diff) / nk[j]
        cov.flat[:: dim + 1] += reg_covar
        if not np.isfinite(cov).all():  # (cholesky's own check, which potrf does not make)
            raise ValueError("a mixture component's covariance is not finite (responsibilities lost to "
                             "underflow)")
        chol, info = potrf(cov, lower=True, overwrite_a=False, clean=True)
        if info > 0:
            raise ValueError("a mixture component has an ill-defined covariance (collapsed samples); "
                             "increase reg_covar")
        # (chol is Fortran-ordered: solve_triangular hands it to trtrs as it is)
        inv, info = trtrs(chol, eye, overwrite_b=False, lower=True, trans=0, unitdiag=False)
        if info != 0:
            raise ValueError("a mixture component has a singular covariance factor; increase reg_covar")
        prec[j] = inv.T
    return nk, means, prec


def _weighted_log_prob(x: np.ndarray, g: GaussianMixtureFit) -> np.ndarray:
    """``log w_j + log N(x | mean_j, cov_j)`` [N, k]."""
    n, dim = x.shape
    k = len(g.means)
    log_det = np.sum(np.log(g.precisions_chol.reshape(k, -1)[:, :: dim + 1]), axis=1)
    out = np.empty((n, k))
    for j in range(k):
        y = (x @ g.precisions_chol[j]) - (g.means[j] @ g.precisions_chol[j])
        out[:, j] = np.sum(np.square(y), axis=1)
    return -0.5 * (dim * np.log(2 * np.pi) + out) + log_det + np.log(g.weights)


def _logsumexp_rows(a: np.ndarray) -> np.ndarray:
    """``log(sum(exp(a), axis=1))``, computed as scikit-learn does (max taken out, ``log1p`` of the rest)."""
    amax = a.max(axis=1, keepdims=True)
    is_max = a == amax
    rest = a.copy()
    rest[is_max] = -np.inf
    m = is_max.sum(axis=1, keepdims=True).astype(np.float64)
    shift = np.where(np.isfinite(amax), amax, 0)
    s = np.exp(rest - shift).sum(axis=1, keepdims=True)
    s = np.where(s == 0, s, s / m)
    return (np.log1p(s) + np.log(m) + amax)[:, 0]


def silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette coefficient (Euclidean) of a clustering with 2 <= clusters < points.

    A point alone in its cluster scores 0.

    Examples
    --------
    >>> x = np.array([[0.0], [0.2], [4.0], [4.2]])
    >>> round(silhouette(x, np.array([0, 0, 1, 1])), 3)
    0.95
    """
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels)
    if x.ndim != 2 or len(labels) != len(x):
        raise ValueError("x must be [N, D] and labels [N]")
    _, lab = np.unique(labels, return_inverse=True)
    k = int(lab.max()) + 1 if len(lab) else 0
    if not 2 <= k < len(x):
        raise ValueError(f"silhouette needs 2 <= clusters < points, got {k} clusters for {len(x)} points")
    return _silhouette(x, lab.ravel(), k)


def _silhouette(x: np.ndarray, lab: np.ndarray, k: int) -> float:
    onehot = np.zeros((len(x), k))
    onehot[np.arange(len(x)), lab] = 1.0
    size = onehot.sum(axis=0)
    x_sq = np.einsum("ij,ij->i", x, x)
    s = np.empty(len(x))
    for a in range(0, len(x), 1024):
        sl = slice(a, a + 1024)
        sums = np.sqrt(_sq_dist(x[sl], x, x_sq)) @ onehot  # [chunk, k] summed distances per cluster
        own = lab[sl]
        rows = np.arange(len(own))
        n_own = size[own] - 1
        intra = np.divide(sums[rows, own], n_own, out=np.zeros(len(own)), where=n_own > 0)
        mean_other = sums / size
        mean_other[rows, own] = np.inf
        inter = mean_other.min(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            v = (inter - intra) / np.maximum(intra, inter)
        s[sl] = np.where(n_own > 0, np.nan_to_num(v), 0.0)
    return float(s.mean())


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labellings of the same points (1: same partition, ~0: chance).

    Examples
    --------
    >>> adjusted_rand_index(np.array([0, 0, 1, 1]), np.array([1, 1, 0, 0]))
    1.0
    >>> adjusted_rand_index(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]))
    -0.5
    """
    a = np.asarray(a).ravel()
    b = np.asarray(b).ravel()
    if len(a) != len(b):
        raise ValueError(f"labellings differ in length: {len(a)} vs {len(b)}")
    return _adjusted_rand_index(a, b)


def _adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """From the pair confusion counts of the contingency table, in Python integers (no overflow)."""
    n = len(a)
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    ia, ib = ia.ravel(), ib.ravel()
    table = np.bincount(ia * (int(ib.max(initial=-1)) + 1) + ib)

    def sum_sq(counts: np.ndarray) -> int:
        return sum(int(v) * int(v) for v in counts)

    both = sum_sq(table)  # sum of n_ij^2
    tp = both - n  # ordered pairs together in both
    fp = sum_sq(np.bincount(ib)) - both  # together in b only
    fn = sum_sq(np.bincount(ia)) - both  # together in a only
    tn = n * n - fp - fn - both
    if fn == 0 and fp == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))
