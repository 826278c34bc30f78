"""Local hexagonal lattice: spacing estimation, per-site lattice fits and lattice fill-in.

The columns of a hexagonal 2-D material (MoS2: Mo and S2 columns) together with the empty hexagon
centres form one *triangular* lattice whose spacing ``nn`` is the nearest-neighbour column
distance. Every site is fitted with its own small triangular lattice (a least-squares fit to the
site and its neighbours within ``fit_radius * nn``) because strain and scan distortion make a
single global lattice impossible. Each well-fitted site predicts its six first-shell lattice
points; predictions that no found column covers and that several sites agree on are added as
``lattice`` sites (hexagon centres, vacancies, faint columns), then the fit-predict-add cycle
repeats until nothing new is added.

Film holes (vacuum: dark and without lattice contrast) stop the fill-in; a dirty patch does not,
because points there are still film. Sites are never added outside the image.

The local lattice vectors of every site are kept: they give local spacing, rotation and strain.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix, csr_matrix
from scipy.sparse.csgraph import breadth_first_order, connected_components
from scipy.spatial import cKDTree

from ._validate import check_shape, check_xy, finite, positive
from .backend import get_kernels
from .blocks import block_means
from .limits import check_section
from .vacuum import VACUUM_MAX_BRAGG

__all__ = [
    "LatticeSettings",
    "linked_clusters",
    "LatticeResult",
    "estimate_spacing",
    "triangular_basis",
    "fit_lattices",
    "fill_lattice",
    "film_mask",
    "FilmMask",
    "sublattice_labels",
    "local_strain",
    "nearest_indices",
]

log = logging.getLogger(__name__)

# The six first-shell offsets of a triangular lattice in (m, n) lattice coordinates, in angular order.
FIRST_SHELL = np.array([[1, 0], [0, 1], [-1, 1], [-1, 0], [0, -1], [1, -1]], dtype=np.float64)


#: neighbour tables are built (and consumed) in chunks of about this many entries (k per query)
_CHUNK_ELEMS = 1 << 22
#: Fewest positions :func:`estimate_spacing` takes (and :func:`fill_lattice` without spacing and angle).
MIN_ESTIMATE_POINTS = 8


class _PointIndex:
    """Neighbour queries on a fixed point set, with the parts of the ``cKDTree`` interface used here.

    Fixed-radius queries go to the backend's grid kernels (``knn_within``, ``pairs_within``: no tree
    to build, parallel); so do queries without a radius, first within ``4 * scale`` (``scale``: a
    typical neighbour distance), and only the rows with fewer than ``k`` points there fall back to a
    KD-tree. As with ``cKDTree``, missing neighbours come back as index ``n`` and distance ``inf``.
    """

    def __init__(self, xy: np.ndarray, kern, scale: float | None = None) -> None:
        self.data = np.ascontiguousarray(xy, dtype=np.float64).reshape(-1, 2)
        self.n = len(self.data)
        self.kern = kern
        self.scale = scale
        self._tree: cKDTree | None = None

    def query(self, x, k: int = 1, distance_upper_bound: float = np.inf, workers: int = 1):
        pts = np.ascontiguousarray(x, dtype=np.float64).reshape(-1, 2)
        kk = int(k)
        r = float(distance_upper_bound)
        if self.n == 0:
            d, j = np.full((len(pts), kk), np.inf), np.full((len(pts), kk), 0, dtype=np.int64)
        elif np.isfinite(r):
            d, j = self.kern.knn_within(self.data, pts, kk, r)
        else:
            scale = self.scale if self.scale and np.isfinite(self.scale) and self.scale > 0 else None
            if scale is None:
                d, j = self._kd(pts, kk)
            else:
                d, j = self.kern.knn_within(self.data, pts, kk, 4.0 * scale)
                short = np.flatnonzero(j[:, min(kk, self.n) - 1] < 0)
                if len(short):
                    d[short], j[short] = self._kd(pts[short], kk)
        j = np.where(j < 0, self.n, j)
        return (d[:, 0], j[:, 0]) if kk == 1 else (d, j)

    def within(self, x, k: int, r: float, dtype=np.int64) -> np.ndarray:
        """Indices [M, k] (``dtype``) of up to ``k`` nearest points strictly within ``r`` (nearest
        first, ties by index), -1 padded: ``query(x, k, r)`` without the distances and without the
        ``n`` / -1 round trip, in chunks of about ``_CHUNK_ELEMS`` entries (the kernel's float64
        distances exist for one chunk at a time)."""
        pts = np.ascontiguousarray(x, dtype=np.float64).reshape(-1, 2)
        kk = int(k)
        out = np.full((len(pts), kk), -1, dtype=dtype)
        if self.n == 0 or len(pts) == 0:
            return out
        step = max(1, _CHUNK_ELEMS // kk)
        for i in range(0, len(pts), step):
            out[i:i + step] = self.kern.knn_within(self.data, pts[i:i + step], kk, float(r))[1]
        return out

    def _kd(self, pts: np.ndarray, k: int):
        if self._tree is None:
            self._tree = cKDTree(self.data)
        d, j = self._tree.query(pts, k=k)
        d, j = np.asarray(d, dtype=np.float64).reshape(len(pts), k), np.asarray(j, dtype=np.int64).reshape(len(pts), k)
        return d, np.where(j >= self.n, -1, j)

    def query_pairs(self, r: float, output_type: str = "ndarray") -> np.ndarray:
        """Pairs ``(i, j)``, ``i < j``, at most ``r`` apart, sorted (int64 [P, 2])."""
        if self.n < 2:
            return np.zeros((0, 2), dtype=np.int64)
        return np.asarray(self.kern.pairs_within(self.data, float(r)), dtype=np.int64).reshape(-1, 2)


def nearest_indices(points: np.ndarray, k: int, queries: np.ndarray | None = None, *,
                    backend: str | None = None) -> np.ndarray:
    """Indices int64 [M, k] of the ``k`` nearest ``points`` [N, 2] of each of ``queries`` [M, 2]
    (default: the points themselves, each then its own first neighbour), nearest first, ties by
    index: ``cKDTree(points).query(queries, k)[1]`` for ``k <= N``, from the backend's grid kernel
    (1.5-1.7x faster on a lattice's sites; a KD-tree only for the queries with fewer than ``k``
    points within four typical spacings).

    Examples
    --------
    >>> pts = np.c_[np.arange(5.0), np.zeros(5)]
    >>> nearest_indices(pts, 2).tolist()
    [[0, 1], [1, 0], [2, 1], [3, 2], [4, 3]]
    """
    pts = np.ascontiguousarray(points, dtype=np.float64).reshape(-1, 2)
    if not 1 <= int(k) <= len(pts):
        raise ValueError(f"k must be 1 .. {len(pts)} (the number of points), got {k}")
    q = pts if queries is None else np.ascontiguousarray(queries, dtype=np.float64).reshape(-1, 2)
    _, j = _PointIndex(pts, get_kernels(backend), scale=_typical_distance(pts)).query(q, k=int(k))
    return np.asarray(j, dtype=np.int64).reshape(len(q), int(k))


def _typical_distance(xy: np.ndarray) -> float:
    """Mean distance between points spread evenly over the bounding box of ``xy`` [N, 2]."""
    if len(xy) < 2:
        return 1.0
    span = np.ptp(xy, axis=0)
    area = float(span[0] * span[1])
    return float(np.sqrt(area / len(xy))) if area > 0 else max(float(span.max()) / len(xy), 1e-6)


@dataclass(frozen=True)
class LatticeSettings:
    """Settings of the local lattice fit and fill-in. Lengths are in units of the spacing ``nn``.

    Attributes
    ----------
    fit_radius : neighbours within this distance enter a site's local fit.
    n_iter : index-assignment / least-squares passes per local fit.
    outlier_tol : a point further than this from the current local model is left out of the fit.
    max_rms : a site predicts lattice points only when its fit residual is below this.
    min_used : ... and when at least this many points entered its fit
    min_inlier_fraction : ... and at least this share of its neighbours (a random cluster of
        spurious maxima fits a lattice only with few of its points).
    cover_radius : a predicted point closer than this to an on-lattice site is already covered
        (and so is one closer than half this to any site).
    off_lattice : a found column further than this from its own fitted lattice point is off-lattice
        (a spurious maximum, an adatom): it does not cover a predicted point.
    merge_radius : predictions closer than this to each other are one candidate point.
    min_support : a candidate needs predictions from at least this many different sites.
    enclose_radius : sites within this distance decide whether a candidate is surrounded.
    max_gap_deg : a candidate is *surrounded* when no angular gap between those sites exceeds this.
    max_rounds : upper bound on fill-in rounds (each round adds one shell at most).
    edge_margin_px : sites are added only this far (px) inside the image border (0: every node whose
        place lies on the sampled grid, ``0 <= x <= W - 1``, ``0 <= y <= H - 1``, is a site: a column
        the scan shows is a site even where a patch around it reaches past the edge).
    max_extrapolation : sites are added at most this far from a well-fitted found column, so the
        fill-in bridges a dirty patch or a vacancy cluster but does not invent a lattice over a
        large region that shows none.
    """

    fit_radius: float = 2.2
    n_iter: int = 3
    outlier_tol: float = 0.25
    max_rms: float = 0.12
    min_used: int = 5
    min_inlier_fraction: float = 0.7
    cover_radius: float = 0.5
    off_lattice: float = 0.3
    merge_radius: float = 0.3
    min_support: int = 2
    enclose_radius: float = 2.05
    max_gap_deg: float = 150.0
    max_rounds: int = 64
    max_extrapolation: float = 6.0
    edge_margin_px: float = 0.0

    def __post_init__(self) -> None:
        for name in ("fit_radius", "outlier_tol", "max_rms", "cover_radius", "off_lattice", "merge_radius",
                     "enclose_radius"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LatticeSettings.{name} must be > 0, got {getattr(self, name)!r}")
        if self.n_iter < 1 or self.min_support < 1 or self.max_rounds < 0 or self.min_used < 4:
            raise ValueError("LatticeSettings: n_iter >= 1, min_support >= 1, min_used >= 4, max_rounds >= 0")
        check_section(self, "sites.lattice")  # the ranges of stemfast.limits.SETTING_LIMITS


@dataclass(frozen=True)
class LatticeResult:
    """Output of :func:`fill_lattice`: all sites (found first, then added) and their local lattices.

    ``xy`` [N, 2] (x, y); ``is_peak`` bool [N]; ``origin`` [N, 2] the fitted lattice point of each
    site; ``basis`` [N, 2, 2] local lattice vectors (rows a1, a2) in px; ``rms`` [N] fit residual in
    px (NaN where the fit failed); ``n_used`` [N]; ``support`` [N] number of sites that predicted an
    added site (0 for found ones); ``rounds`` fill-in rounds run; ``on_lattice`` [N] False for found
    maxima that sit off the local lattice (spurious maxima in a dirty patch, adatoms).
    """

    xy: np.ndarray
    is_peak: np.ndarray
    origin: np.ndarray
    basis: np.ndarray
    rms: np.ndarray
    n_used: np.ndarray
    support: np.ndarray
    spacing: float
    rounds: int
    on_lattice: np.ndarray


def triangular_basis(spacing: float, angle_deg: float) -> np.ndarray:
    """Basis (rows ``a1``, ``a2``) of a triangular lattice with ``a1`` at ``angle_deg`` from +x.

    Angles are measured from the +x (column) axis towards +y (down the rows), i.e. clockwise as
    displayed. ``a2`` is ``a1`` turned by +60 degrees.

    Examples
    --------
    >>> triangular_basis(2.0, 0.0).round(3)
    array([[2.   , 0.   ],
           [1.   , 1.732]])
    """
    t = np.deg2rad(angle_deg)
    return spacing * np.array([[np.cos(t), np.sin(t)], [np.cos(t + np.pi / 3), np.sin(t + np.pi / 3)]])


def estimate_spacing(xy: np.ndarray, *, backend: str | None = None) -> tuple[float, float]:
    """Nearest-neighbour spacing (px) and lattice orientation (degrees in [0, 60)) of a point set.

    The spacing is the mode of the nearest-neighbour distance distribution (robust to a few spurious
    or missing points); the orientation is the circular mean of ``6 * angle`` of the
    nearest-neighbour bonds, divided by 6.

    Examples
    --------
    >>> from stemfast.lattice import triangular_basis
    >>> b = triangular_basis(10.0, 12.0)
    >>> m, n = np.meshgrid(np.arange(-10, 11), np.arange(-10, 11))
    >>> xy = np.stack([m.ravel(), n.ravel()], 1) @ b
    >>> s, a = estimate_spacing(xy)
    >>> round(s, 3), round(a, 3)
    (10.0, 12.0)
    """
    xy = check_xy(xy, min_points=MIN_ESTIMATE_POINTS)
    tree = _PointIndex(xy, get_kernels(backend), scale=_typical_distance(xy))
    d, j = tree.query(xy, k=2)
    d1 = d[:, 1]
    d1 = d1[np.isfinite(d1) & (d1 > 0)]
    # mode via a histogram around the median, refined by the median of the modal bin's neighbourhood
    med = float(np.median(d1))
    hist, edges = np.histogram(d1, bins=64, range=(0.5 * med, 1.5 * med))
    k = int(np.argmax(ndimage.uniform_filter1d(hist.astype(float), 3)))
    centre = 0.5 * (edges[k] + edges[k + 1])
    near = d1[np.abs(d1 - centre) < 0.1 * centre]
    spacing = float(np.median(near)) if len(near) else med
    # orientation from all bonds of length ~ spacing
    pairs = tree.query_pairs(1.15 * spacing, output_type="ndarray")
    v = xy[pairs[:, 1]] - xy[pairs[:, 0]]
    ln = np.hypot(v[:, 0], v[:, 1])
    v = v[np.abs(ln - spacing) < 0.15 * spacing]
    ang = np.arctan2(v[:, 1], v[:, 0])
    c, s = np.cos(6 * ang).sum(), np.sin(6 * ang).sum()
    angle = float(np.rad2deg(np.arctan2(s, c) / 6.0)) % 60.0
    return spacing, angle


def _neighbour_k(settings: LatticeSettings, n: int) -> int:
    """Neighbours to ask for: the triangular-lattice points within ``fit_radius``, plus room for extras."""
    return min(int(np.ceil(np.pi * (settings.fit_radius + 0.5) ** 2 / (np.sqrt(3) / 2))) + 2, n)


def _neighbour_table(tree: "_PointIndex | cKDTree", xy: np.ndarray, k: int, radius: float) -> np.ndarray:
    if isinstance(tree, _PointIndex):
        return tree.within(xy, k, radius)
    _, idx = tree.query(xy, k=k, distance_upper_bound=radius, workers=-1)
    idx = np.asarray(idx, dtype=np.int64).reshape(len(xy), k)
    idx[idx >= tree.n] = -1
    return np.ascontiguousarray(idx)


def fit_lattices(
    xy: np.ndarray,
    basis0: np.ndarray,
    *,
    spacing: float,
    settings: LatticeSettings = LatticeSettings(),
    tree: "_PointIndex | cKDTree | None" = None,
    backend: str | None = None,
    subset: np.ndarray | None = None,
    neighbours: np.ndarray | None = None,
):
    """Fit a local triangular lattice at every site (or at ``subset``) of ``xy``.

    ``neighbours`` reuses a neighbour table (any integer dtype, -1 padded) from an earlier call on
    the same points (full fits only);
    ``tree`` is a neighbour index of ``xy`` (e.g. a ``scipy.spatial.cKDTree``), built when not given.
    Returns ``(origin, basis, rms, n_used, n_pts)``: the ``fit_local_lattices`` kernel's outputs
    and the number of points (site + neighbours) offered to each fit.

    The sites are fitted in chunks (without ``neighbours``, the neighbour table of one chunk at a
    time; the points compacted to the chunk and its neighbours); each site's fit sees the same
    numbers in the same order as in one call over all sites, so the results are identical.
    """
    xy = check_xy(xy)
    kern = get_kernels(backend)
    tree = tree if tree is not None else _PointIndex(xy, kern, scale=spacing)
    radius = settings.fit_radius * spacing
    k = _neighbour_k(settings, len(xy))
    own = np.arange(len(xy)) if subset is None else np.asarray(subset, dtype=np.int64)
    m = len(own)
    b0 = basis0 if basis0.ndim == 3 else np.broadcast_to(basis0, (m, 2, 2))
    if neighbours is not None and subset is not None:
        raise ValueError("fit_lattices: neighbours is for full fits only (no subset)")
    origin = np.empty((m, 2))
    basis = np.empty((m, 2, 2))
    rms = np.empty(m)
    n_used = np.empty(m, dtype=np.int64)
    n_pts = np.empty(m, dtype=np.int64)
    step = max(1, _CHUNK_ELEMS // max(k, 1))
    for i in range(0, m, step):
        rows = own[i:i + step]
        if neighbours is None:
            nb = _neighbour_table(tree, xy[rows], k, radius)
        else:
            nb = np.asarray(neighbours[i:i + step], dtype=np.int64)
        n_pts[i:i + step] = 1 + ((nb >= 0) & (nb != rows[:, None])).sum(1)
        sl = slice(i, i + len(rows))
        origin[sl], basis[sl], rms[sl], n_used[sl] = _fit_compacted(kern, xy, rows, nb, b0[sl], settings)
    return origin, basis, rms, n_used, n_pts


def _fit_compacted(kern, xy: np.ndarray, rows: np.ndarray, nb: np.ndarray, b0: np.ndarray,
                   settings: LatticeSettings):
    """``fit_local_lattices`` of the sites ``rows`` only (neighbour table ``nb`` [len(rows), k] into
    ``xy``): the points are compacted to those sites (first) and their neighbours; the neighbours'
    own rows are empty and their fits discarded."""
    mark = np.zeros(len(xy), bool)
    mark[nb[nb >= 0]] = True
    mark[rows] = False
    rest = np.flatnonzero(mark)
    del mark
    order = np.concatenate([rows, rest])
    remap = np.full(len(xy) + 1, -1, dtype=np.int64)  # remap[-1] = -1 keeps the padding
    remap[order] = np.arange(len(order))
    table = np.full((len(order), nb.shape[1]), -1, dtype=np.int64)
    np.take(remap, nb, out=table[: len(rows)])
    del remap
    rest_b0 = np.broadcast_to(b0[:1] if len(b0) else np.eye(2)[None], (len(rest), 2, 2))
    o, b, r, n = kern.fit_local_lattices(np.ascontiguousarray(xy[order]), table,
                                         np.ascontiguousarray(np.concatenate([b0, rest_b0]), dtype=np.float64),
                                         settings.n_iter, settings.outlier_tol)
    k = len(rows)
    return o[:k], b[:k], r[:k], n[:k]


def _ball(tree: "_PointIndex | cKDTree", pts: np.ndarray, r: float, k: int) -> np.ndarray:
    """Indices [M, k] of up to ``k`` nearest tree points within ``r`` of each point, -1 padded."""
    k = max(1, min(k, tree.n))
    if isinstance(tree, _PointIndex):
        return tree.within(pts, k, r)
    _, j = tree.query(pts, k=k, distance_upper_bound=r, workers=-1)
    j = np.asarray(j, dtype=np.int64).reshape(len(pts), k)
    j[j >= tree.n] = -1
    return j


def _mark_ball(tree: _PointIndex, pts: np.ndarray, r: float, k: int, n: int) -> np.ndarray:
    """``_mark(_ball(tree, pts, r, k), n)`` without the whole table: bool [n], True for every tree
    point among the ``k`` nearest within ``r`` of some point of ``pts``."""
    out = np.zeros(n, bool)
    step = max(1, _CHUNK_ELEMS // max(k, 1))
    for i in range(0, len(pts), step):
        j = _ball(tree, pts[i:i + step], r, k)
        out[j[j >= 0]] = True
    return out


def _max_angular_gap(center: np.ndarray, nb: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Largest angular gap (degrees) between the neighbours ``nb`` [M, k] (-1 padded) seen from ``center``."""
    M, k = nb.shape
    valid = nb >= 0
    v = xy[np.maximum(nb, 0)] - center[:, None, :]
    ang = np.where(valid, np.degrees(np.arctan2(v[..., 1], v[..., 0])), np.inf)
    ang.sort(axis=1)
    cnt = valid.sum(1)
    gaps = np.full(M, 360.0)
    if k >= 2:
        with np.errstate(invalid="ignore"):  # inf - inf between padding entries; masked just below
            diffs = np.diff(ang, axis=1)
        diffs = np.where(np.arange(k - 1)[None, :] < (cnt - 1)[:, None], diffs, -np.inf)
        last = ang[np.arange(M), np.maximum(cnt - 1, 0)]
        wrap = ang[:, 0] + 360.0 - last
        g = np.maximum(diffs.max(axis=1), wrap)
        gaps = np.where(cnt >= 2, g, 360.0)
    return gaps


@dataclass(frozen=True)
class FilmMask:
    """Where the film is, on a grid ``factor`` times coarser than the image (True = film).

    Holes are many spacings wide, so a grid of about a third of a spacing resolves them; keeping
    the mask coarse keeps it small (a 16k x 16k image needs a 1.5k x 1.5k mask).
    """

    mask: np.ndarray
    factor: int

    def __call__(self, xy: np.ndarray) -> np.ndarray:
        """True for points ``xy`` [N, 2] (x, y) on film."""
        ij = np.floor(np.asarray(xy)[:, ::-1] / self.factor).astype(np.int64)
        ij = np.clip(ij, 0, np.array(self.mask.shape) - 1)
        return self.mask[ij[:, 0], ij[:, 1]]

    def hole_fraction(self, no_data=None) -> float:
        """The share of the image in holes of the film (vacuum), regions without data
        (:class:`stemfast.nodata.NoData`) left out of both."""
        empty = _no_data_cells(no_data, self.mask.shape, self.factor)
        return float((~self.mask & ~empty).sum() / max(1, (~empty).sum()))

    def full(self, shape: tuple[int, int]) -> np.ndarray:
        """The mask at image resolution."""
        m = np.repeat(np.repeat(self.mask, self.factor, 0), self.factor, 1)
        return m[: shape[0], : shape[1]]


def film_mask(image: np.ndarray, bandpassed: np.ndarray, peak_xy: np.ndarray, spacing: float,
              no_data=None, bragg=None) -> FilmMask | None:
    """Where the image holds film rather than a hole or no data, or ``None`` when there is neither.

    A hole is vacuum: much darker than the film and with little lattice contrast. Both are measured
    on a scale of one spacing -- the local mean of the image and of the squared bandpassed image,
    computed on a grid coarsened to about a third of a spacing -- and compared with their medians
    at the found columns. Darkness is the main test (below the midpoint between the darkest area
    and the film, when the two differ by more than 4 standard deviations of the film's local mean);
    the contrast test is loose because a small hole still shows the bandpass response of its edge.
    ``no_data``: the :class:`stemfast.nodata.NoData` of ``image``; those regions (padding, masks) are
    no film either, and are left out of the darkness statistics.

    The film's levels are read at the peaks that are columns, not the vacuum's noise maxima (which
    would widen the spread of the film's local mean by the very darkness looked for): the peaks whose
    band-pass energy reaches half the median's. The noise maxima may outnumber the columns (from
    about 40 % vacuum on), so that median is taken over the peaks where ``bragg`` (a callable giving
    the lattice's Bragg amplitude at points ``xy`` [N, 2], :meth:`stemfast.phasemap.PhaseMap.amplitude`;
    all peaks without it) reaches half its 95th percentile. The energy alone is no guide: a
    contamination patch's texture has more band-pass energy than the columns, and the amplitude alone
    is smoothed over several spacings into the vacuum. Last, a dark region whose Bragg amplitude
    (median over its cells) reaches :data:`HOLE_MAX_BRAGG` of the film's holds the lattice: dim film,
    not a hole.
    """
    if len(peak_xy) == 0:
        return None
    f = max(1, int(spacing / 3))
    s = max(1.0, spacing / f)
    mean = ndimage.gaussian_filter(block_means(image, f), s)
    energy = ndimage.gaussian_filter(block_means(bandpassed, f, square=True), s)
    empty = _no_data_cells(no_data, mean.shape, f)
    ij = np.clip(np.floor(peak_xy[:, ::-1] / f).astype(int), 0, np.array(mean.shape) - 1)
    e_at = energy[ij[:, 0], ij[:, 1]]
    ref = np.ones(len(e_at), bool)
    amp = None
    if bragg is not None:
        amp = np.asarray(bragg(peak_xy), np.float64)
        ref = amp >= 0.5 * float(np.quantile(amp, 0.95))
    lattice = e_at >= 0.5 * float(np.median(e_at[ref]))
    e_lat = float(np.median(e_at[lattice]))
    m_at = mean[ij[lattice, 0], ij[lattice, 1]]
    m_lat = float(np.median(m_at))
    m_lo = float(np.percentile(mean[~empty] if empty.any() and not empty.all() else mean, 0.5))
    spread = m_lat - m_lo
    noise = float(np.std(m_at))
    hole = np.zeros(mean.shape, bool)
    if spread > 4.0 * noise:
        dark = mean < m_lo + 0.5 * spread
        hole = dark & (energy < 0.5 * e_lat)
        if hole.any():
            hole = ndimage.binary_opening(hole, iterations=max(1, int(0.5 * s)))
            # a hole reaches as far as its darkness: the band-pass response of its edge keeps the
            # lattice-contrast test from reaching the edge (sites were placed a spacing out in vacuum)
            hole = ndimage.binary_propagation(hole, mask=dark)
            if amp is not None and hole.any():
                hole = _lattice_free(hole, f, bragg, float(np.median(amp[lattice])),
                                     max(1, int(round(HOLE_BRAGG_DEPTH_NN * spacing / f))))
    hole |= empty
    if not hole.any():
        return None
    return FilmMask(mask=~hole, factor=f)


#: a dark region of :func:`film_mask` is a hole only where the lattice's Bragg amplitude at its peaks
#: (median) is below this share of the film's (:data:`stemfast.vacuum.VACUUM_MAX_BRAGG`, the same test
#: as the vacuum the ring is read beside): vacuum holds no lattice, while dim film -- a monolayer
#: beside a brighter bilayer, film under a thickness or illumination gradient -- holds one (the real
#: crops dimmed to 30-45 %, which the darkness and contrast tests alone took for holes)
HOLE_MAX_BRAGG = VACUUM_MAX_BRAGG
#: ... read that far (site spacings) inside the region: the Bragg amplitude is smoothed over about
#: 1.4 spacings (the phase map's filter, 0.2 |g| wide), so a small hole (a synthetic one 3 spacings
#: across: 0.34 of the film's) is filled by its rim; a region with nothing that deep stays a hole
HOLE_BRAGG_DEPTH_NN = 3.0


def _lattice_free(hole: np.ndarray, f: int, bragg, film_amp: float, depth: int) -> np.ndarray:
    """``hole`` (cells of ``f`` px) without its connected regions that show the lattice: their median
    Bragg amplitude (``bragg``, at the centres of their cells more than ``depth`` cells inside; at
    most 4096 of them read per region) at least :data:`HOLE_MAX_BRAGG` of ``film_amp``."""
    lab, n = ndimage.label(hole)
    if n == 0 or not film_amp > 0:
        return hole
    # the image's border is no edge of a region: a region touching it (a corner dimmed by an
    # illumination gradient) is read as deep from the border as from its other edges
    deep = ndimage.binary_erosion(hole, iterations=depth, border_value=1)
    keep = np.ones(n + 1, bool)
    keep[0] = False
    for k, sl in enumerate(ndimage.find_objects(lab), start=1):
        iy, ix = np.nonzero((lab[sl] == k) & deep[sl])
        if not len(iy):
            continue
        if len(iy) > 4096:
            pick = np.linspace(0, len(iy) - 1, 4096).astype(np.int64)
            iy, ix = iy[pick], ix[pick]
        xy = np.stack([(ix + sl[1].start + 0.5) * f, (iy + sl[0].start + 0.5) * f], axis=1)
        if float(np.median(bragg(xy))) >= HOLE_MAX_BRAGG * film_amp:
            keep[k] = False
    return keep[lab]


def _no_data_cells(no_data, shape: tuple[int, int], f: int) -> np.ndarray:
    """Bool ``shape``: the ``f`` px cells whose centre holds no data (:class:`stemfast.nodata.NoData`;
    all False without one)."""
    if no_data is None or not no_data.any():
        return np.zeros(shape, bool)
    H, W = no_data.shape
    rows = np.minimum(np.arange(shape[0]) * f + f // 2, H - 1)
    cols = np.minimum(np.arange(shape[1]) * f + f // 2, W - 1)
    return no_data.at(rows[:, None], cols[None, :])


def fill_lattice(
    peak_xy: np.ndarray,
    *,
    shape: tuple[int, int],
    spacing: float | None = None,
    angle_deg: float | None = None,
    film: "FilmMask | np.ndarray | bool | None" = None,
    settings: LatticeSettings = LatticeSettings(),
    backend: str | None = None,
) -> LatticeResult:
    """Fit local lattices to the found columns and add the lattice points no column covers.

    Parameters
    ----------
    peak_xy : [N, 2] found column positions (x, y) in px.
    shape : (height, width) of the image; sites are only added inside ``[0, W-1] x [0, H-1]``
        (less ``settings.edge_margin_px``).
    spacing, angle_deg : nearest-neighbour spacing in px and lattice orientation; estimated from
        ``peak_xy`` when not given.
    film : where the film is. A :class:`FilmMask` or bool [H, W] mask (False in holes, where no
        site may be added) or
        ``True`` (all film): the fill-in then carries on wherever the lattice predicts sites, e.g.
        across a dirty patch. ``None`` (unknown) is conservative: a site is added only where the
        found sites surround it (angular gap below ``max_gap_deg``), so the fill stops at any
        edge of the lattice.
    settings : :class:`LatticeSettings`.

    Returns
    -------
    LatticeResult

    Examples
    --------
    >>> from stemfast.lattice import triangular_basis, fill_lattice
    >>> b = triangular_basis(10.0, 5.0)
    >>> m, n = np.meshgrid(np.arange(-30, 31), np.arange(-30, 31))
    >>> xy = np.stack([m.ravel(), n.ravel()], 1) @ b + 100
    >>> inside = (xy >= 0).all(1) & (xy <= 199).all(1)
    >>> honeycomb = inside & ((m.ravel() - n.ravel()) % 3 != 0)   # drop the hexagon centres
    >>> res = fill_lattice(xy[honeycomb], shape=(200, 200))
    >>> centres = ~honeycomb & inside          # every centre in the image (edge_margin_px 0)
    >>> int((~res.is_peak).sum()) == int(centres.sum())
    True
    """
    peak_xy, (H, W), nn, angle_deg = _fill_arguments(peak_xy, shape, spacing, angle_deg, backend)
    b_global = triangular_basis(nn, angle_deg)
    kern = get_kernels(backend)
    n_peak = len(peak_xy)
    f = _fit_found_columns(peak_xy.copy(), b_global, nn, settings, kern, backend)

    anchors = _well_fitted(f, n_peak, nn, settings) & (np.hypot(*(f.origin - f.xy).T) <= settings.off_lattice * nn)
    anchor_tree = _PointIndex(f.xy[anchors], kern, scale=nn) if anchors.any() else None
    rounds = 0
    new_from = 0  # sites from this index on were added in the last round (all sites in round 0)
    while rounds < settings.max_rounds:
        good = _well_fitted(f, n_peak, nn, settings)
        # only sites near the frontier can predict something new: in round 0 all, later the
        # last round's additions and their neighbours
        if rounds == 0:
            pred_sites = np.flatnonzero(good)
        else:
            pred_sites = np.flatnonzero(_mark_ball(f.tree, f.xy[new_from:], 1.5 * nn, 16, len(f.xy)) & good)
        if len(pred_sites) == 0:
            break
        # covered = an on-lattice site is near (or any site very near); a spurious off-lattice peak
        # (e.g. in a dirty patch) does not block the lattice point it happens to sit close to
        on_lattice = good & (np.hypot(*(f.origin - f.xy).T) <= settings.off_lattice * nn)
        on_lattice[n_peak:] = True
        new, sup = _new_sites(pred_sites, f.origin, f.basis, f.xy, f.tree, on_lattice, film, anchor_tree,
                              (H, W), nn, settings, kern)
        if len(new) == 0:
            break
        rounds += 1
        new_from = len(f.xy)
        _add_sites(f, new, sup, good, b_global, nn, settings, kern, backend)
        log.debug("lattice fill round %d: +%d sites", rounds, len(new))

    is_peak = np.zeros(len(f.xy), bool)
    is_peak[:n_peak] = True
    on_lattice = _final_on_lattice(f, is_peak, n_peak, nn, settings)
    return LatticeResult(xy=f.xy, is_peak=is_peak, origin=f.origin, basis=f.basis, rms=f.rms, n_used=f.n_used,
                         support=f.support, spacing=nn, rounds=rounds, on_lattice=on_lattice)


def _fill_arguments(peak_xy, shape, spacing, angle_deg,
                    backend=None) -> tuple[np.ndarray, tuple[int, int], float, float]:
    """:func:`fill_lattice`'s arguments checked (:mod:`stemfast._validate`), the spacing and angle
    estimated from ``peak_xy`` where not given (on the kernels of ``backend``): ``(peak_xy, (H, W),
    spacing, angle_deg)``."""
    estimate = spacing is None or angle_deg is None
    peak_xy = check_xy(peak_xy, "peak_xy", min_points=MIN_ESTIMATE_POINTS if estimate else 0)
    hw = check_shape(shape)
    if spacing is not None:
        spacing = positive("spacing", spacing)
    if angle_deg is not None:
        angle_deg = finite("angle_deg", angle_deg)
    if estimate:
        s_est, a_est = estimate_spacing(peak_xy, backend=backend)
        spacing = s_est if spacing is None else spacing
        angle_deg = a_est if angle_deg is None else angle_deg
    return peak_xy, hw, float(spacing), float(angle_deg)


@dataclass
class _Fill:
    """The growing site set of :func:`fill_lattice` and each site's latest local lattice fit."""

    xy: np.ndarray  # [N, 2] found columns first, then the added sites
    tree: _PointIndex  # over xy
    origin: np.ndarray  # [N, 2]
    basis: np.ndarray  # [N, 2, 2]
    rms: np.ndarray  # [N]
    n_used: np.ndarray  # [N]
    n_pts: np.ndarray  # [N]
    support: np.ndarray  # [N] found sites 0, added sites the predictions that agreed on them


def _fit_found_columns(xy: np.ndarray, b_global: np.ndarray, nn: float, settings: LatticeSettings, kern,
                       backend: str | None) -> _Fill:
    """Local lattice fits of the found columns ``xy``: a first pass from the global basis, a second
    one seeded with each site's own first fit (follows local rotation and strain better)."""
    n_peak = len(xy)
    basis0 = np.broadcast_to(b_global, (n_peak, 2, 2)).copy()
    support = np.zeros(n_peak, dtype=np.int64)
    tree = _PointIndex(xy, kern, scale=nn)
    # kept for both passes: int32 (half the memory) where the indices fit
    nb_all = tree.within(xy, _neighbour_k(settings, len(xy)), settings.fit_radius * nn,
                         dtype=np.int32 if len(xy) < np.iinfo(np.int32).max else np.int64)
    origin, basis, rms, n_used, _ = fit_lattices(xy, basis0, spacing=nn, settings=settings, tree=tree,
                                                 backend=backend, neighbours=nb_all)
    ok = np.isfinite(rms)
    basis0[ok] = basis[ok]
    origin, basis, rms, n_used, n_pts = fit_lattices(xy, basis0, spacing=nn, settings=settings, tree=tree,
                                                     backend=backend, neighbours=nb_all)
    return _Fill(xy=xy, tree=tree, origin=origin, basis=basis, rms=rms, n_used=n_used, n_pts=n_pts, support=support)


def _well_fitted(f: _Fill, n_peak: int, nn: float, settings: LatticeSettings) -> np.ndarray:
    """Sites whose local fit is good enough to predict from (bool [N])."""
    # the inlier-share test is for found maxima (spurious ones fit with few neighbours); added
    # sites are lattice points by construction and keep predicting inside a dirty patch
    added = np.arange(len(f.rms)) >= n_peak
    return (np.isfinite(f.rms) & (f.rms < settings.max_rms * nn) & (f.n_used >= settings.min_used)
            & (added | (f.n_used >= settings.min_inlier_fraction * f.n_pts)))


def _add_sites(f: _Fill, new: np.ndarray, sup: np.ndarray, good: np.ndarray, b_global: np.ndarray, nn: float,
               settings: LatticeSettings, kern, backend: str | None) -> None:
    """Append one round's sites ``new`` (and their support counts ``sup``) to ``f`` and refit every site near
    them (their neighbourhoods changed) plus the new sites, seeded with the nearest good basis."""
    new_from = len(f.xy)
    nb0 = _nearest_basis(f.tree, new, f.basis, good, b_global)
    f.xy = np.concatenate([f.xy, new])
    f.support = np.concatenate([f.support, sup.astype(np.int64)])
    f.tree = _PointIndex(f.xy, kern, scale=nn)
    f.basis = np.concatenate([f.basis, nb0])
    del nb0
    touched_mask = _mark_ball(f.tree, new, settings.fit_radius * nn, 32, len(f.xy))
    touched_mask[new_from:] = True
    touched = np.flatnonzero(touched_mask)
    del touched_mask
    o2, b2, r2, n2, p2 = fit_lattices(f.xy, f.basis[touched], spacing=nn, settings=settings, tree=f.tree,
                                      backend=backend, subset=touched)
    f.origin = np.concatenate([f.origin, np.zeros((len(new), 2))])
    f.rms = np.concatenate([f.rms, np.full(len(new), np.nan)])
    f.n_used = np.concatenate([f.n_used, np.zeros(len(new), np.int64)])
    f.n_pts = np.concatenate([f.n_pts, np.ones(len(new), np.int64)])
    f.origin[touched], f.basis[touched], f.rms[touched], f.n_used[touched], f.n_pts[touched] = o2, b2, r2, n2, p2


def _final_on_lattice(f: _Fill, is_peak: np.ndarray, n_peak: int, nn: float, settings: LatticeSettings) -> np.ndarray:
    """Which sites sit on the lattice: every added one, and the found columns that are well fitted
    and near their own lattice point or on a well-fitted neighbour's lattice."""
    good = _well_fitted(f, n_peak, nn, settings)
    on_lattice = ~is_peak | (good & (np.hypot(*(f.origin - f.xy).T) <= settings.off_lattice * nn))
    # a found column whose own fit is poor (e.g. beside a dirty patch) is still on the lattice
    # when a well-fitted neighbour's lattice has a point right there
    ask = np.flatnonzero(~on_lattice)
    if len(ask):
        on_lattice[ask] = _on_neighbours_lattice(f.xy, f.origin, f.basis, good, f.tree, nn, settings, ask)
    return on_lattice


def _new_sites(pred_sites, origin, basis, xy, tree, on_lattice, film, anchor_tree, shape, nn,
               settings: LatticeSettings, kern):
    """One fill-in round's additions: the first-shell predictions of ``pred_sites``, less those
    outside the image or covered, merged into candidates, kept where enough sites support them,
    on film, surrounded (unless vouched for) and near an anchor. Returns ``(new [M, 2], support [M])``."""
    H, W = shape
    em = settings.edge_margin_px
    # predictions inside the image and not covered, made and tested in chunks of predicting sites
    # (each point is tested on its own; the survivors keep their order)
    parts_pts, parts_who = [], []
    step = 1 << 18
    for i in range(0, len(pred_sites), step):
        ps = pred_sites[i:i + step]
        pts = (origin[ps, None, :] + FIRST_SHELL[None, :, :] @ basis[ps]).reshape(-1, 2)
        who = np.repeat(ps, len(FIRST_SHELL))
        inside = (pts[:, 0] >= em) & (pts[:, 0] <= W - 1 - em) & (pts[:, 1] >= em) & (pts[:, 1] <= H - 1 - em)
        pts, who = pts[inside], who[inside]
        free = ~_covered(tree, pts, on_lattice, settings.cover_radius * nn)
        parts_pts.append(pts[free])
        parts_who.append(who[free])
        del pts, who, inside, free
    pts = np.concatenate(parts_pts) if parts_pts else np.zeros((0, 2))
    who = np.concatenate(parts_who) if parts_who else np.zeros(0, dtype=np.int64)
    del parts_pts, parts_who
    if len(pts) == 0:
        return np.zeros((0, 2)), np.zeros(0, dtype=np.int64)
    # merge predictions of the same point
    ncomp, lab = _components(_PointIndex(pts, kern).query_pairs(settings.merge_radius * nn), len(pts))
    cnt = np.bincount(lab, minlength=ncomp)
    cx = np.bincount(lab, weights=pts[:, 0], minlength=ncomp) / cnt
    cy = np.bincount(lab, weights=pts[:, 1], minlength=ncomp) / cnt
    del pts, cnt
    # support = distinct predicting sites per candidate
    sup = _distinct_per_label(lab, who, ncomp)
    del lab, who
    cand = np.stack([cx, cy], 1)
    keep = sup >= settings.min_support
    if isinstance(film, FilmMask):
        in_film = film(cand)
    elif isinstance(film, np.ndarray):
        ij = np.clip(np.rint(cand[:, ::-1]).astype(int), 0, [H - 1, W - 1])
        in_film = film[ij[:, 0], ij[:, 1]]
    else:
        in_film = np.ones(ncomp, bool)
    # a candidate must be surrounded by sites, unless the film mask vouches for it (the fill
    # carries on across a dirty patch from its edge inwards) or it lies at the image edge
    margin = settings.enclose_radius * nn
    at_edge = (cand[:, 0] < margin) | (cand[:, 0] > W - 1 - margin) | (cand[:, 1] < margin) | (cand[:, 1] > H - 1 - margin)
    vouched = in_film if film is not None and film is not False else np.zeros(ncomp, bool)
    keep &= in_film
    ask = np.flatnonzero(keep & ~vouched & ~at_edge)  # only these need the enclosure test
    if len(ask):
        gap = _max_angular_gap(cand[ask], _ball(tree, cand[ask], settings.enclose_radius * nn, 24), xy)
        keep[ask] = gap <= settings.max_gap_deg
    if anchor_tree is not None:
        d_anchor, _ = anchor_tree.query(cand, k=1, distance_upper_bound=settings.max_extrapolation * nn)
        keep &= np.isfinite(d_anchor)
    if not keep.any():
        return np.zeros((0, 2)), np.zeros(0, dtype=np.int64)
    kept = np.flatnonzero(keep)
    # a merged candidate could still sit next to another kept one (two clusters of one point)
    kept = kept[_dedupe(_PointIndex(cand[kept], kern), settings.merge_radius * nn * 1.5)]
    return cand[kept], sup[kept]


def linked_clusters(points: np.ndarray, radius: float, *, backend: str | None = None) -> tuple[int, np.ndarray]:
    """``(n, labels)``: the clusters of ``points`` [N, 2] linked by pairs at most ``radius`` apart
    (connected components; labels int [N] numbered by each cluster's first point), from the
    backend's pair kernel.

    Examples
    --------
    >>> linked_clusters(np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]]), 1.5)[1].tolist()
    [0, 0, 1]
    """
    pts = check_xy(points, "points")
    return _components(_PointIndex(pts, get_kernels(backend)).query_pairs(float(radius)), len(pts))


def _components(pairs: np.ndarray, n: int) -> tuple[int, np.ndarray]:
    """``connected_components`` of the undirected graph of ``pairs`` [P, 2] (sorted by i then j, as
    ``query_pairs`` returns them) on ``n`` nodes, built straight as CSR (no COO copy)."""
    idx_t = np.int32 if max(n, len(pairs)) < np.iinfo(np.int32).max else np.int64
    indptr = np.zeros(n + 1, dtype=idx_t)
    np.cumsum(np.bincount(pairs[:, 0], minlength=n), out=indptr[1:])
    indices = pairs[:, 1].astype(idx_t)
    g = csr_matrix((np.ones(len(pairs)), indices, indptr), shape=(n, n))
    del indices, indptr
    return connected_components(g, directed=False)


def _on_neighbours_lattice(xy, origin, basis, good, tree, nn, settings, which) -> np.ndarray:
    """For sites ``which``: True where the site lies within ``off_lattice`` of the lattice of one of
    its 3 nearest well-fitted neighbours."""
    _, j = tree.query(xy[which], k=min(4, tree.n))
    j = np.asarray(j, dtype=np.int64).reshape(len(which), -1)[:, 1:]
    out = np.zeros(len(which), bool)
    pts = xy[which]
    for c in range(j.shape[1]):
        jj = j[:, c]
        ok = (jj < len(good))
        ok[ok] = good[jj[ok]]
        if not ok.any():
            continue
        idx = np.flatnonzero(ok & ~out)
        jn = jj[idx]
        d = pts[idx] - origin[jn]
        inv = np.linalg.inv(basis[jn])
        mn = np.floor(np.einsum("ni,nij->nj", d, inv) + 0.5)
        r = d - np.einsum("ni,nij->nj", mn, basis[jn])
        out[idx] = np.hypot(r[:, 0], r[:, 1]) <= settings.off_lattice * nn
    return out


def _dedupe(index: _PointIndex, r: float) -> np.ndarray:
    """Indices of the index's points kept when, of every pair at most ``r`` apart, the later point is
    dropped (pairs in ``(i, j)`` order; a dropped point drops nothing)."""
    keep = np.arange(index.n)
    if index.n < 2:
        return keep
    pairs = index.query_pairs(r)
    if len(pairs) == 0:
        return keep
    drop = np.zeros(index.n, bool)
    for a, b in pairs:
        if not drop[a]:
            drop[b] = True
    return keep[~drop]


def _mark(idx: np.ndarray, n: int) -> np.ndarray:
    """Bool [n], True at the indices ``idx`` >= 0 (any shape; -1 = none)."""
    m = np.zeros(n, bool)
    m[idx[idx >= 0]] = True
    return m


def _covered(tree: _PointIndex, pts: np.ndarray, on_lattice: np.ndarray, radius: float) -> np.ndarray:
    """True where one of the 3 sites nearest to a point, within ``radius``, is on the lattice, or
    the nearest site is within ``radius / 2``.

    The nearest site decides almost every point (it is on the lattice, or out of reach); only the
    rest need the 3 nearest.
    """
    if len(pts) == 0:
        return np.zeros(0, bool)
    step = 1 << 20  # points per chunk (each point is decided on its own)
    if len(pts) > step:
        return np.concatenate([_covered(tree, pts[i:i + step], on_lattice, radius)
                               for i in range(0, len(pts), step)])
    d1, j1 = tree.query(pts, k=1, distance_upper_bound=radius, workers=-1)
    hit = np.isfinite(d1)
    j1 = np.where(hit, j1, 0)
    covered = (hit & on_lattice[j1]) | (d1 <= 0.5 * radius)
    ask = np.flatnonzero(hit & ~covered)
    if len(ask):
        d3, j3 = tree.query(pts[ask], k=min(3, tree.n), distance_upper_bound=radius, workers=-1)
        d3, j3 = np.asarray(d3).reshape(len(ask), -1), np.asarray(j3).reshape(len(ask), -1)
        hit3 = np.isfinite(d3)
        covered[ask] = (hit3 & on_lattice[np.where(hit3, j3, 0)]).any(axis=1)
    return covered


def _distinct_per_label(lab: np.ndarray, who: np.ndarray, n_labels: int, run: int = len(FIRST_SHELL)) -> np.ndarray:
    """Number of distinct ``who`` per label ``lab`` (int arrays of one length).

    ``who`` comes sorted with at most ``run`` equal entries in a row (each site predicts its first
    shell), so a repeated ``(lab, who)`` pair lies within ``run - 1`` places of its first copy.
    """
    lab = np.asarray(lab, dtype=np.int64)
    who = np.asarray(who, dtype=np.int64)
    if len(who) > 1 and not (np.all(np.diff(who) >= 0) and _max_run(who) <= run):
        key = np.unique(lab * (int(who.max()) + 1) + who)  # general case
        return np.bincount(key // (int(who.max()) + 1), minlength=n_labels)
    dup = np.zeros(len(lab), bool)
    for d in range(1, run):
        if d >= len(lab):
            break
        dup[d:] |= (who[d:] == who[:-d]) & (lab[d:] == lab[:-d])
    return np.bincount(lab[~dup], minlength=n_labels)


def _max_run(a: np.ndarray) -> int:
    """Longest run of equal consecutive entries of a non-empty 1-D array."""
    edges = np.flatnonzero(np.diff(a) != 0)
    bounds = np.concatenate([[-1], edges, [len(a) - 1]])
    return int(np.diff(bounds).max())


def _nearest_basis(tree: _PointIndex, pts: np.ndarray, basis: np.ndarray, good: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Start basis for new sites: that of the nearest well-fitted site among the 6 nearest."""
    out = np.broadcast_to(fallback, (len(pts), 2, 2)).copy()
    _, j = tree.query(pts, k=min(6, tree.n))
    j = np.asarray(j, dtype=np.int64).reshape(len(pts), -1)
    valid = j < len(good)
    ok = np.zeros_like(valid)
    ok[valid] = good[j[valid]]
    first = np.argmax(ok, axis=1)
    has = ok[np.arange(len(pts)), first]
    out[has] = basis[j[has, first[has]]]
    return out


def sublattice_labels(xy: np.ndarray, basis: np.ndarray, *, spacing: float, values: np.ndarray | None = None,
                      max_bond: float = 1.25, backend: str | None = None) -> np.ndarray:
    """Three-colour the triangular lattice of sites: label 0, 1, 2 such that bonded sites differ.

    In lattice coordinates ``(m, n)`` the colour is ``(m - n) mod 3``; it is propagated along bonds
    (site pairs closer than ``max_bond * spacing``) by breadth-first search, using each site's own
    local basis to read the bond's lattice offset, so it follows rotations and strain. For a MoS2
    film the three colours are the Mo, S2 and hollow sublattices. When ``values`` (e.g. column
    intensity) is given, colours are renumbered per connected region so that 0 has the highest
    median value, 1 the middle and 2 the lowest (Mo, S2, hollow for HAADF).

    Returns int64 [N]; -1 for isolated sites.
    """
    xy = check_xy(xy)
    n = len(xy)
    labels = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return labels
    kern = get_kernels(backend)
    pairs = _PointIndex(xy, kern).query_pairs(max_bond * spacing)
    if len(pairs) == 0:
        return labels
    idx_t = np.int32 if n < np.iinfo(np.int32).max else np.int64  # the graph's own index type
    a = np.concatenate([pairs[:, 0], pairs[:, 1]]).astype(idx_t)
    b = np.concatenate([pairs[:, 1], pairs[:, 0]]).astype(idx_t)
    del pairs
    g = coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n)).tocsr()
    del a, b
    ncomp, comp = connected_components(g, directed=False)
    inv = np.linalg.inv(basis)  # [N, 2, 2]; rows of basis are a1, a2: d = [m n] @ B -> [m n] = d @ inv(B)
    for c in range(ncomp):
        members = np.flatnonzero(comp == c)
        if len(members) < 2:
            continue
        root = members[0]
        order, pred = breadth_first_order(g, root, directed=False, return_predecessors=True)
        labels[root] = 0
        par = pred[order[1:]]
        kids = order[1:]
        d = xy[kids] - xy[par]
        mn = np.floor(np.einsum("ni,nij->nj", d, inv[par]) + 0.5).astype(np.int64)
        step = (mn[:, 0] - mn[:, 1]) % 3
        # labels follow BFS order: each child's parent is labelled before the child
        kern.propagate_labels(labels, kids.astype(np.int64), par.astype(np.int64), step)
    if values is not None:
        values = np.asarray(values, dtype=np.float64)
        for c in range(ncomp):
            members = np.flatnonzero((comp == c) & (labels >= 0))
            if len(members) < 3:
                continue
            med = np.array([np.median(values[members[labels[members] == k]]) if np.any(labels[members] == k) else -np.inf
                            for k in range(3)])
            rank = np.empty(3, np.int64)
            rank[np.argsort(-med)] = np.arange(3)
            labels[members] = rank[labels[members]]
    return labels


def local_strain(basis: np.ndarray, reference: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Local strain and rotation of each site's lattice against a reference basis.

    ``F`` maps the reference lattice vectors onto the local ones (``basis = ref @ F.T``); the
    symmetric part of ``F - I`` is the strain (``exx, eyy, exy``), the antisymmetric part the
    rotation (degrees, +x towards +y). The reference defaults to the median basis of all sites.
    """
    basis = np.asarray(basis, dtype=np.float64)
    if reference is None:
        ok = np.isfinite(basis).all(axis=(1, 2))
        reference = np.median(basis[ok], axis=0) if ok.any() else np.eye(2)
    # basis rows b_i = F @ r_i  ->  B^T = F R^T  ->  F = B^T inv(R^T)
    F = np.einsum("nji,jk->nik", basis, np.linalg.inv(reference.T))
    exx = F[:, 0, 0] - 1.0
    eyy = F[:, 1, 1] - 1.0
    exy = 0.5 * (F[:, 0, 1] + F[:, 1, 0])
    rot = np.degrees(0.5 * (F[:, 1, 0] - F[:, 0, 1]))
    return {"exx": exx, "eyy": eyy, "exy": exy, "rotation_deg": rot}
