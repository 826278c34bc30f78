"""Local references: every site judged against the sites of its own sublattice *around* it, not
against an image-wide average.

For site ``i`` the ``n_neighbors`` nearest sites are put in ``i``'s own local lattice frame (its
fitted basis ``a1, a2``), offsets that do not land on a lattice node are dropped, and the remaining
ones fall into three relative colours ``(m - n) mod 3``: colour 0 is ``i``'s own sublattice. The
median and MAD of a value over colour 0 are ``i``'s reference (:func:`local_references`).
Contamination, thickness and illumination gradients change the reference along with the site, so
they neither make nor hide defects (:mod:`stemfast.analysis` scores the sites against it); and as
the colours are read off the local geometry, a slip of the image-wide three-colouring (the
``sublattice`` column) cannot put a metal column among the chalcogen references. The same colours
give each site a **local sublattice** (:meth:`LocalReferences.rank`: the brightness rank of its
colour among the three around it, 0 = metal, 1 = chalcogen pair, 2 = hollow for HAADF).

The statistics are the ``local_references`` kernel of :mod:`stemfast._kernels` (C++, Numba, NumPy
reference); :func:`_local_references_reference` is the straightforward implementation the benchmark
checks it against.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["LocalReferences", "local_references"]


@dataclass(frozen=True)
class LocalReferences:
    """Output of :func:`local_references`, per site ``i`` and relative colour ``c`` (0 = ``i``'s own
    sublattice, 1 and 2 the other two, as read off ``i``'s local lattice).

    Attributes
    ----------
    median, mad : float64 [N, 3]: median and ``1.4826 * MAD`` of the values of the references of
        each colour (NaN when there are none).
    count : int64 [N, 3]: number of references of each colour.
    """

    median: np.ndarray
    mad: np.ndarray
    count: np.ndarray
    #: float64 [N]: distance to the farthest of the neighbours looked at (None when not recorded)
    reach: np.ndarray | None = None

    def complete(self, min_count: int = 3) -> np.ndarray:
        """bool [N]: every colour has at least ``min_count`` references and a finite median."""
        return (self.count >= min_count).all(1) & np.isfinite(self.median).all(1)

    def rank(self, min_count: int = 3) -> np.ndarray:
        """Brightness rank of each site's own colour among the three (0 = highest median), -1 where a
        colour has fewer than ``min_count`` references: the local sublattice (0 metal, 1 chalcogen,
        2 hollow in HAADF)."""
        med = self.median
        own = med[:, :1]
        rank = (med[:, 1:] > own).sum(1)
        return np.where(self.complete(min_count), rank, -1).astype(np.int64)

    def contrast(self, min_count: int = 3) -> np.ndarray:
        """float [N]: each site's local column contrast, the spread of the three colours' medians
        (brightest minus darkest); NaN where :meth:`complete` is False or the spread is not positive.
        Illumination, thickness and detector gain scale it with the column signal."""
        ok = self.complete(min_count)
        c = np.full(len(ok), np.nan)
        c[ok] = self.median[ok].max(1) - self.median[ok].min(1)
        c[~(c > 0)] = np.nan
        return c


def local_references(xy: np.ndarray, basis: np.ndarray, values: np.ndarray, *, usable: np.ndarray | None = None,
                     n_neighbors: int = 300, node_tolerance: float = 0.25,
                     backend: str | None = None) -> LocalReferences:
    """Statistics of ``values`` over the sites of each sublattice *around* every site.

    For site ``i``: its ``n_neighbors`` nearest sites (``i`` itself excluded) are expressed in ``i``'s
    local lattice coordinates ``(m, n)`` (``d = m a1 + n a2`` with ``basis[i] = [a1, a2]``); those
    within ``node_tolerance`` of a node are references, coloured ``(m - n) mod 3``; sites with
    ``usable`` False (e.g. outside the observed field) are never references.

    Parameters
    ----------
    xy : float [N, 2] site positions (x, y), px.
    basis : float [N, 2, 2] per-site lattice vectors (rows ``a1``, ``a2``), px.
    values : float [N] the value to compare (e.g. column intensity).
    usable : bool [N], optional; default all.
    n_neighbors : neighbours looked at per site (>= 7).
    node_tolerance : in (0, 0.5), lattice units.
    backend : kernel backend (``cpp``, ``numba``, ``numpy``; default: the fastest available,
        :mod:`stemfast.backend`); the results do not depend on it.

    Returns
    -------
    LocalReferences

    Examples
    --------
    >>> a1, a2 = np.array([1.0, 0.0]), np.array([0.5, np.sqrt(3) / 2])
    >>> mn = np.array([(m, n) for m in range(12) for n in range(12)], float)
    >>> xy = mn @ np.array([a1, a2])
    >>> colour = (mn[:, 0] - mn[:, 1]) % 3
    >>> values = np.choose(colour.astype(int), [10.0, 5.0, 0.0])
    >>> ref = local_references(xy, np.broadcast_to(np.array([a1, a2]), (len(xy), 2, 2)), values, n_neighbors=60)
    >>> ref.rank()[:3].tolist()  # the colours of sites (0,0), (0,1), (0,2): bright, dark, middle
    [0, 2, 1]
    """
    xy = np.asarray(xy, dtype=np.float64)
    n = len(xy)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"xy must be [N, 2], got shape {xy.shape}")
    if not np.isfinite(xy).all():
        raise ValueError("xy must be finite")
    basis = np.asarray(basis, dtype=np.float64)
    if basis.shape != (n, 2, 2):
        raise ValueError(f"basis must be [N, 2, 2] with N = {n}, got shape {basis.shape}")
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (n,):
        raise ValueError(f"values must be [N] with N = {n}, got shape {values.shape}")
    usable = np.ones(n, bool) if usable is None else np.asarray(usable, bool)
    if usable.shape != (n,):
        raise ValueError(f"usable must be [N] with N = {n}, got shape {usable.shape}")
    if int(n_neighbors) < 7:
        raise ValueError(f"n_neighbors must be >= 7, got {n_neighbors}")
    if not 0 < float(node_tolerance) < 0.5:
        raise ValueError(f"node_tolerance must be in (0, 0.5), got {node_tolerance}")
    return _local_references(xy, basis, values, usable, int(n_neighbors), float(node_tolerance), backend=backend)


def _inverse_bases(basis: np.ndarray) -> np.ndarray:
    """``inv(basis[i])`` per site [N, 2, 2]; NaN where the basis is not finite or singular
    (``|det| <= 1e-12``): such a site gets no references."""
    det = basis[:, 0, 0] * basis[:, 1, 1] - basis[:, 0, 1] * basis[:, 1, 0]
    good = np.isfinite(det) & (np.abs(det) > 1e-12)
    inv = np.full_like(basis, np.nan)
    inv[good] = np.linalg.inv(basis[good])
    return inv


def _local_references(xy, basis, values, usable, n_neighbors, tol, *, rows=None,
                      base: LocalReferences | None = None, backend: str | None = None) -> LocalReferences:
    """The statistics of :func:`local_references` (the ``local_references`` kernel of ``backend``,
    :mod:`stemfast._kernels`); with ``rows`` (int indices) only those sites' rows are computed and the
    others copied from ``base``."""
    from .backend import get_kernels

    n = len(xy)
    if base is None:
        med = np.full((n, 3), np.nan)
        mad = np.full((n, 3), np.nan)
        cnt = np.zeros((n, 3), np.int64)
        reach = np.full(n, np.nan)
    else:
        med, mad, cnt = base.median.copy(), base.mad.copy(), base.count.copy()
        reach = None if base.reach is None else base.reach.copy()
    if n < 2:
        return LocalReferences(med, mad, cnt, reach)
    rows = np.arange(n) if rows is None else np.asarray(rows, np.int64)
    refable = np.asarray(usable, bool) & np.isfinite(values)
    m_q, d_q, c_q, r_q = get_kernels(backend).local_references(
        np.ascontiguousarray(xy, np.float64), _inverse_bases(basis), np.ascontiguousarray(values, np.float64),
        refable, rows, min(n_neighbors + 1, n), float(tol))
    med[rows], mad[rows], cnt[rows] = m_q, d_q, c_q
    if reach is not None:
        reach[rows] = r_q
    return LocalReferences(med, mad, cnt, reach)


def _refresh_references(refs: LocalReferences, xy, basis, values, usable, changed, settings,
                        backend: str | None = None) -> LocalReferences:
    """``refs`` again for ``values`` that differ from the ones it was computed with on the ``changed``
    sites only: the rows of the sites that have a changed site among their neighbours are computed
    anew (a site ``s`` can be among ``i``'s neighbours only if ``|x_s - x_i| <= reach_i``), the rest
    are kept -- the same result as :func:`local_references` on the new values (on the kernels of
    ``backend``)."""
    changed = np.asarray(changed, bool)
    if not changed.any():
        return refs
    usable = np.asarray(usable, bool)
    if refs.reach is None or not np.isfinite(refs.reach).all():
        rows = None
    else:
        from scipy.spatial import cKDTree

        d, _ = cKDTree(xy[changed]).query(xy, k=1)
        rows = np.flatnonzero(d <= refs.reach * (1 + 1e-9) + 1e-9)
    return _local_references(xy, basis, values, usable, int(settings.n_neighbors), float(settings.node_tolerance),
                             rows=rows, base=None if rows is None else refs, backend=backend)


def _local_references_reference(xy, basis, values, usable, n_neighbors, tol, chunk) -> LocalReferences:
    """The straightforward implementation of :func:`_local_references` (one masked sort per colour
    and statistic): the reference the benchmark checks the faster one against."""
    from scipy.spatial import cKDTree

    from ._kernels.numpy_ref.references import _colour_stats

    n = len(xy)
    med = np.full((n, 3), np.nan)
    mad = np.full((n, 3), np.nan)
    cnt = np.zeros((n, 3), np.int64)
    k = min(n_neighbors + 1, n)
    if n < 2:
        return LocalReferences(med, mad, cnt)
    det = basis[:, 0, 0] * basis[:, 1, 1] - basis[:, 0, 1] * basis[:, 1, 0]
    good_basis = np.isfinite(det) & (np.abs(det) > 1e-12)
    inv = np.zeros_like(basis)
    inv[good_basis] = np.linalg.inv(basis[good_basis])
    finite_v = np.isfinite(values)
    tree = cKDTree(xy)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        _, j = tree.query(xy[a:b], k=k)
        j = j.reshape(b - a, k)
        d = xy[j] - xy[a:b, None, :]
        mn = np.einsum("nkj,nji->nki", d, inv[a:b])   # d = [m n] @ B  ->  [m n] = d @ inv(B)
        r = np.rint(mn)
        on_node = np.abs(mn - r).max(-1) < tol
        colour = (r[..., 0] - r[..., 1]).astype(np.int64) % 3
        ok = on_node & usable[j] & finite_v[j] & (j != np.arange(a, b)[:, None]) & good_basis[a:b, None]
        _colour_stats(values[j], ok, colour, med[a:b], mad[a:b], cnt[a:b])
    return LocalReferences(med, mad, cnt)
