"""One site per node of a 2H monolayer's site lattice (:func:`index_sites`).

A 2H monolayer (MoS2, WSe2, ...) has its metal, chalcogen-pair and hollow sites on **one**
triangular lattice of spacing ``a / sqrt(3)``. The metal lattice's first Bragg ring
(:mod:`stemfast.braggring`) and the phase map that follows it over the image
(:mod:`stemfast.phasemap`) give every point continuous metal-lattice coordinates; this module
indexes every found peak to its node of the site lattice (integer indices ``(p, q)``: site lattice
vectors ``s1 = (A1 + A2) / 3``, ``s2 = (2 A2 - A1) / 3``), keeps at most one peak per node,
predicts the position of every node without a peak from its neighbours (per-site least-squares
lattice fits), and reports peaks on no node as ``off_lattice``.

The three sublattices are the classes ``(p - q) mod 3`` (metal nodes: integer ``U``); which class
is the metal, which the chalcogen and which the hollow is read from the image (brightest, middle,
darkest), not assumed.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .braggring import SITE_FROM_METAL
from .lattice import nearest_indices
from .phasemap import PhaseMap

__all__ = ["SiteIndex", "index_sites", "columns_on_one_coset", "columns_on_a_honeycomb", "columns_on_one_finer_coset",
           "pixel_noise", "position_variance", "lattice_distortion", "border_distance", "node_residuals", "PQ_FROM_U"]

log = logging.getLogger(__name__)

#: the 18 site-lattice offsets (p, q) within two spacings of a node (first three shells), and (0, 0)
_SHELLS = np.array([(dp, dq) for dp in range(-2, 3) for dq in range(-2, 3)
                    if 0 < dp * dp + dq * dq + dp * dq <= 4], dtype=np.int64)
_FIRST = np.array([[1, 0], [0, 1], [-1, 1], [-1, 0], [0, -1], [1, -1]], dtype=np.int64)
#: site-lattice coordinates from metal-lattice ones: (p, q) = U @ PQ_FROM_U, p = 2 U1 + U2, q = U2 - U1
PQ_FROM_U = np.array([[2.0, -1.0], [1.0, 1.0]])


@dataclass(frozen=True)
class SiteIndex:
    """Output of :func:`index_sites`: every node of the site lattice in the film, then the peaks on
    no node.

    ``xy`` [N, 2]; ``ij`` [N, 2] integer site-lattice indices (p, q) (0 for off-lattice peaks):
    ``xy ~ origin + p s1 + q s2`` with ``s1, s2`` the rows of ``basis``. The naming holds within one
    image only: the origin and which first-shell vectors are ``s1, s2`` (from ``g`` or ``-g``) are
    picked afresh per image, so two frames of a series may name the same node differently
    (:func:`stemfast.tracking.node_map` maps one frame's naming onto another's);
    ``peak`` [N] index into the peaks (-1 for a node without a peak); ``kind`` [N]: 0 node with its
    peak, 1 node predicted (no peak), 2 off-lattice peak; ``cls`` [N] ``(p - q) mod 3`` (-1 off
    lattice); ``basis`` [N, 2, 2] local site-lattice vectors (rows s1, s2, px); ``rms`` [N] residual
    of the local fit (px; NaN where it had too few points); ``n_merged`` peaks dropped as a second
    candidate or a second maximum of an occupied node; ``n_noise`` weak peaks on no node, dropped as noise;
    ``on_node`` share of the strong peaks that sit on a node.
    """

    xy: np.ndarray
    ij: np.ndarray
    peak: np.ndarray
    kind: np.ndarray
    cls: np.ndarray
    basis: np.ndarray
    rms: np.ndarray
    n_merged: int
    n_noise: int
    on_node: float


def _round_triangular(pq: np.ndarray, S: np.ndarray) -> np.ndarray:
    """Nearest node (integer p, q) of the lattice with basis rows ``S`` to points in (p, q) units."""
    base = np.floor(pq)
    best = None
    bestd = None
    for a in (0, 1):
        for b in (0, 1):
            c = base + np.array([a, b])
            d = ((pq - c) @ S) ** 2
            d = d.sum(1)
            if best is None:
                best, bestd = c.copy(), d
            else:
                m = d < bestd
                best[m], bestd[m] = c[m], d[m]
    return best.astype(np.int64)


def index_sites(peak_xy: np.ndarray, peak_value: np.ndarray, pmap: PhaseMap, *, shape: tuple[int, int],
                spacing: float, tol: float = 0.3, off_strength: float = 0.5, margin_px: float = 1.0,
                film=None, min_amplitude: float = 0.15, fill: bool = True, fit_radius: float = 2.05,
                min_fit_points: int = 5, peak_var: np.ndarray | None = None, n_rounds: int = 2,
                backend: str | None = None) -> SiteIndex:
    """Index peaks to the site lattice of ``pmap`` and give every node of the film one site.

    Each peak is indexed to the nearest node of the phase map's lattice. Then, ``n_rounds`` times,
    every node's position is predicted from the peaks on the nodes around it (a local affine
    lattice fitted to the peaks within ``fit_radius`` spacings, the node's own peak left out); a
    peak within ``tol * spacing`` of the prediction of its node or of one of that node's six
    neighbours is that node's candidate, and of several candidates for one node the strongest
    keeps it (the others are counted as merged). A peak near no node is an ``off_lattice`` site
    when its value is at least ``off_strength`` times the median value of the peaks of the
    brightest class (adatom, contamination), and noise otherwise; one within :data:`SPLIT_NN`
    spacings of a node's site is a second maximum of that column and is merged into it.

    Every node inside the image (``margin_px``) and on the film (``film``: ``FilmMask`` / bool
    array / ``None``) where the Bragg amplitude is at least ``min_amplitude`` of its median, or a
    peak sits within two spacings, gets one site: its peak, placed between the peak and the
    neighbours' prediction by how well the image resolves the column (:func:`_shrinkage`, with the
    peaks' measurement variance ``peak_var``), or the prediction alone. Around a predicted site
    that comes closer to another site than a regular lattice allows (:data:`UNCROWD_NN`), the
    nodes are placed by the wider fit (:data:`WIDE_FIT_NN`): the narrow one has followed columns
    put on the wrong node there. ``fill=False`` keeps only the nodes with a peak. ``backend``: the
    kernel backend of the neighbour searches (``sites.backend``; None: ``STEMFAST_BACKEND`` or the fastest).
    """
    peak_xy = np.asarray(peak_xy, dtype=np.float64).reshape(-1, 2)
    peak_value = np.asarray(peak_value, dtype=np.float64).reshape(-1)
    S = SITE_FROM_METAL @ np.linalg.inv(pmap.g).T
    M = PQ_FROM_U
    Minv = np.linalg.inv(M)
    pq = pmap.coords(peak_xy) @ M
    # the global offset of the nodes: circular mean over the strong peaks
    strong = peak_value >= np.median(peak_value)
    wv = np.clip(peak_value, 0, None) * strong
    if wv.sum() <= 0:
        wv = np.ones(len(peak_xy))
    off = np.angle((wv[:, None] * np.exp(2j * np.pi * pq)).sum(0)) / (2 * np.pi)
    node = _round_triangular(pq - off, S)
    # the nodes of the image (or, without fill, those near a peak)
    if fill:
        nodes = _image_nodes(pmap, off, M, Minv, shape, spacing)
    else:
        nodes = np.unique(np.concatenate([node + o for o in [np.zeros(2, np.int64)] + list(_FIRST)]), axis=0)
    base = pmap.positions((np.asarray(nodes, dtype=np.float64) + off) @ Minv)  # phase-map positions
    rim = _film_rim(film, base, EDGE_NN * spacing)
    node, on, winner = _match_peaks(peak_xy, peak_value, node, nodes, base, rim, S, shape=shape, spacing=spacing,
                                    tol=tol, fit_radius=fit_radius, min_fit_points=min_fit_points,
                                    n_rounds=n_rounds)
    n_merged = int(on.sum() - winner.sum())
    off_pk = _off_lattice_peaks(peak_xy, peak_value, node, on, winner, shape, spacing, off_strength)
    n_noise = int(((~on) & ~off_pk).sum())
    on_node = float(on[strong].mean()) if strong.any() else 0.0

    # final positions: prediction from the neighbours, and the peak where the image resolves it
    w_idx = np.flatnonzero(winner)
    xy_w, keep_w, empty, xy_empty = _place_sites(peak_xy, node, w_idx, nodes, base, rim, S, pmap, film=film,
                                                 shape=shape, spacing=spacing, margin_px=margin_px,
                                                 min_amplitude=min_amplitude, fill=fill, fit_radius=fit_radius,
                                                 min_fit_points=min_fit_points, peak_var=peak_var, backend=backend)
    w_idx, xy_w, n_merged = w_idx[keep_w], xy_w[keep_w], n_merged + int((~keep_w).sum())
    o_idx = np.flatnonzero(off_pk)
    empty_peak, o_idx = _adopt_off_lattice_peaks(peak_xy, o_idx, xy_empty, spacing, tol, others=xy_w,
                                                 edge=_at_edge(peak_xy[o_idx], shape, film, spacing))
    # a predicted site as near an adopted peak as another node's site would be: that peak's node has it
    keep_e = (empty_peak >= 0) | _apart(xy_empty[empty_peak >= 0], xy_empty, 0.5 * spacing)
    empty, xy_empty, empty_peak = empty[keep_e], xy_empty[keep_e], empty_peak[keep_e]
    split = _split_column_peaks(peak_xy[o_idx], np.concatenate([xy_w, xy_empty]), spacing)
    o_idx = o_idx[~split]
    n_merged += int(split.sum())
    xy = np.concatenate([xy_w, xy_empty, peak_xy[o_idx]])
    ij = np.concatenate([node[w_idx], empty, np.zeros((len(o_idx), 2), np.int64)])
    kind = np.concatenate([np.zeros(len(w_idx), np.int8), np.where(empty_peak >= 0, 0, 1).astype(np.int8),
                           np.full(len(o_idx), 2, np.int8)])
    peak = np.concatenate([w_idx, empty_peak, o_idx]).astype(np.int64)
    cls = np.where(kind == 2, -1, np.mod(ij[:, 0] - ij[:, 1], 3)).astype(np.int64)
    n_nodes = len(w_idx) + len(empty)
    basis = np.broadcast_to(S, (len(xy), 2, 2)).copy()
    rms = np.full(len(xy), np.nan)
    b_nodes, r_nodes, _ = _local_fit(ij[:n_nodes], xy[:n_nodes], kind[:n_nodes] == 0, S, fit_radius,
                                     min_fit_points)
    basis[:n_nodes], rms[:n_nodes] = b_nodes, r_nodes
    if len(o_idx):
        g_loc = pmap.local_g(peak_xy[o_idx])
        A_loc = np.linalg.inv(g_loc).transpose(0, 2, 1)
        basis[n_nodes:] = np.einsum("ij,njk->nik", SITE_FROM_METAL, A_loc)
    return SiteIndex(xy=xy, ij=ij, peak=peak, kind=kind, cls=cls, basis=basis, rms=rms,
                     n_merged=n_merged, n_noise=n_noise, on_node=on_node)


#: fewest columns on nodes (:func:`columns_on_one_coset`) for the test; the share of them on one class
#: that makes it; and how empty the emptiest third of that class must be against the fullest (a third
#: that holds no columns still collects noise maxima: 6 against 37 in a 192 px image of a 20 px lattice
#: with faint chalcogen columns, and columns the local fits misplace: 128 against 501 in a synthetic
#: image compressed to 0.75 along one axis; on the true lattice the metal class's thirds hold the same)
COSET_MIN_COLUMNS = 20
COSET_CLASS_SHARE = 0.8
COSET_EMPTY_RATIO = 0.35


def node_residuals(xy: np.ndarray, ij: np.ndarray, pmap: PhaseMap) -> np.ndarray:
    """Where the points ``xy`` [N, 2] (columns) sit against their nodes ``ij`` [N, 2] (site-lattice
    indices) of the phase map's lattice: [N, 2] (x, y) in px, the lattice's common offset taken
    out (the median). The phase map follows what varies over several spacings (strain, drift,
    scan distortion), so the residuals hold what varies faster."""
    S = SITE_FROM_METAL @ np.linalg.inv(pmap.g).T
    d = pmap.coords(np.asarray(xy, np.float64)) @ PQ_FROM_U - np.asarray(ij, np.float64)
    if not len(d):
        return np.zeros((0, 2))
    return (d - np.median(d, axis=0)) @ S


def columns_on_one_coset(idx: SiteIndex) -> bool:
    """True when the site lattice is the 2H site lattice's own ``sqrt(3)``-denser superlattice: the
    Bragg ring taken as ``{100}`` was the ``{110}`` (the first ring lies too close to the spectrum's
    centre to be read in a small image, and the second ring's lattice holds every column).

    Every column of a 2H monolayer (metal, chalcogen pair) and every hexagon centre sits on one
    third of that superlattice's nodes -- one of its three classes, ``(p - q) mod 3`` -- and within
    that class, on the true lattice, the hollow third (and, where the chalcogen columns are too faint
    to give peaks, the chalcogen third too) holds no column. On the true site lattice the columns
    sit on two classes (metal and chalcogen); where the chalcogen columns give no peaks, on the metal
    class alone, but then on every third of it. So: at least :data:`COSET_CLASS_SHARE` of the
    columns (nodes with their peak) on one class, and one third of that class (``q mod 3`` there)
    holding fewer than :data:`COSET_EMPTY_RATIO` times the columns of the fullest third.

    Examples
    --------
    >>> import numpy as np
    >>> pq = np.array([(p, q) for p in range(-9, 9) for q in range(-9, 9)])
    >>> on_a = (pq[:, 0] - pq[:, 1]) % 3 == 0          # one class of the nodes ...
    >>> cols = pq[on_a & (pq[:, 1] % 3 != 2)]           # ... two of its thirds: metal, chalcogen
    >>> one = lambda ij: SiteIndex(xy=ij * 1.0, ij=ij, peak=np.arange(len(ij)), kind=np.zeros(len(ij), np.int8),
    ...                            cls=(ij[:, 0] - ij[:, 1]) % 3, basis=np.zeros((len(ij), 2, 2)),
    ...                            rms=np.zeros(len(ij)), n_merged=0, n_noise=0, on_node=1.0)
    >>> columns_on_one_coset(one(cols)), columns_on_one_coset(one(pq[on_a]))  # the last: metal alone
    (True, False)
    """
    mine = _fullest_class_columns(idx)
    if mine is None:
        return False
    third = np.bincount(np.mod(mine[:, 1], 3), minlength=3)
    return bool(third.min() < COSET_EMPTY_RATIO * third.max())


def _fullest_class_columns(idx: SiteIndex) -> np.ndarray | None:
    """The nodes ``ij`` [K, 2] (int64) of the columns (nodes with their peak) on the class of the site
    lattice that holds most of them, where there are at least :data:`COSET_MIN_COLUMNS` columns and that
    class holds at least :data:`COSET_CLASS_SHARE` of them; else None."""
    col = (np.asarray(idx.kind) == 0) & (np.asarray(idx.cls) >= 0)
    if col.sum() < COSET_MIN_COLUMNS:
        return None
    cls = np.asarray(idx.cls)[col]
    counts = np.bincount(cls, minlength=3)
    a = int(np.argmax(counts))
    if counts[a] < COSET_CLASS_SHARE * col.sum():
        return None
    return np.asarray(idx.ij, np.int64)[col][cls == a]


#: :func:`columns_on_a_honeycomb`: at least this many columns of the fullest class with all three of
#: their class neighbours on one side, and at least this share of them with none on the other side. A
#: honeycomb reads 0.82-0.89 (over 310-400 such columns: MoS2 with a band of scan lines about half a
#: period off, read sqrt(3) too fine), the metal lattice alone ~0 (0.0 on the real MoS2 with faint
#: chalcogen columns: 85 % of its columns on the metal class); a 128 px crop with faint chalcogen columns
#: and a quarter of its metal columns missing read 0.17 over 6 (too few to say: a lattice 2x too fine
#: there links a column to ~1 other)
HONEYCOMB_MIN_COLUMNS = 20
HONEYCOMB_ONE_SIDED = 0.5
#: a node's six nearest of its own class, ``(p, q)`` offsets (the metal lattice's vectors ``U`` through
#: :data:`PQ_FROM_U`): three at 120 degrees (``+v1, +v3, -v2``) and their opposites
_CLASS_TRIPLES = (np.array([(2, -1), (-1, 2), (-1, -1)]), np.array([(-2, 1), (1, -2), (1, 1)]))


def columns_on_a_honeycomb(idx: SiteIndex) -> bool:
    """True when the columns on the fullest class of the site lattice (at least
    :data:`COSET_CLASS_SHARE` of them) form a honeycomb: the site lattice is then the 2H site lattice's
    ``sqrt(3)``-denser superlattice, as :func:`columns_on_one_coset` finds where one third of that class is
    empty. Read around each column, not from a colouring over the image, it holds where that colouring
    slips (a band of scan lines about half a period off: no third empty). On a honeycomb (a 2H
    monolayer's metal and chalcogen columns, the hollows empty) a column's three nearest columns of its
    class lie on one side of it and empty nodes on the other; the metal lattice alone is triangular,
    columns on both sides. So: among the class's columns with all three neighbours of one side
    (:data:`_CLASS_TRIPLES`), at least :data:`HONEYCOMB_MIN_COLUMNS`, at least
    :data:`HONEYCOMB_ONE_SIDED` of them with none on the other side.

    Examples
    --------
    >>> import numpy as np
    >>> pq = np.array([(p, q) for p in range(-9, 9) for q in range(-9, 9)])
    >>> on_a = (pq[:, 0] - pq[:, 1]) % 3 == 0
    >>> one = lambda ij: SiteIndex(xy=ij * 1.0, ij=ij, peak=np.arange(len(ij)), kind=np.zeros(len(ij), np.int8),
    ...                            cls=(ij[:, 0] - ij[:, 1]) % 3, basis=np.zeros((len(ij), 2, 2)),
    ...                            rms=np.zeros(len(ij)), n_merged=0, n_noise=0, on_node=1.0)
    >>> honeycomb = pq[on_a & (pq[:, 1] % 3 != 2)]
    >>> slipped = np.r_[honeycomb[honeycomb[:, 0] < 0], honeycomb[honeycomb[:, 0] >= 0] + (1, 1)]  # no third empty
    >>> columns_on_a_honeycomb(one(slipped)), columns_on_one_coset(one(slipped)), columns_on_a_honeycomb(one(pq[on_a]))
    (True, False, False)
    """
    mine = _fullest_class_columns(idx)
    if mine is None:
        return False
    n1, n2 = _class_neighbours(mine)
    full = np.maximum(n1, n2) == 3
    return bool(full.sum() >= HONEYCOMB_MIN_COLUMNS and np.mean(np.minimum(n1, n2)[full] == 0) >= HONEYCOMB_ONE_SIDED)


def _class_neighbours(ij: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per node of ``ij`` [N >= 1, 2] (the columns of one class of the site lattice), how many of its three
    class neighbours at 120 degrees and of the three opposite (:data:`_CLASS_TRIPLES`) are in ``ij``."""
    lo = ij.min(axis=0) - 2
    span = int(ij[:, 1].max() - lo[1]) + 3  # every offset's node inside the span: no collision

    def keys(a):
        return (a[:, 0] - lo[0]) * span + (a[:, 1] - lo[1])

    have = np.sort(keys(ij))
    n1, n2 = (sum((np.isin(keys(ij + d), have).astype(np.int64) for d in t), np.zeros(len(ij), np.int64))
              for t in _CLASS_TRIPLES)
    return n1, n2


#: a site lattice ``n`` times finer than the crystal's (its Bragg ring a ``{n00}`` one, taken as the
#: ``{100}``) holds every column on one of its ``n x n`` cosets ``(p mod n, q mod n)``
#: (:func:`columns_on_one_finer_coset`); on the true lattice they spread over all (a quarter on each
#: for ``n = 2``; for ``n = 3``, a sixth on each of the metal and chalcogen cosets, a third with the
#: metal alone). At least this share of the columns on one coset makes it: 0.63-1.0 on 2x and 3x finer
#: lattices of strips and contaminated synthetic images (noise maxima on the other cosets), 0.26-0.29
#: on the real MoS2 crops
FINER_COSET_SHARE = 0.5


def columns_on_one_finer_coset(idx: SiteIndex) -> int | None:
    """``n`` (2 or 3) when the site lattice is ``n`` times finer than the crystal's: at least
    :data:`FINER_COSET_SHARE` of the columns (nodes with their peak, at least :data:`COSET_MIN_COLUMNS`)
    on one coset ``(p mod n, q mod n)``; else None. The ``sqrt(3)`` finer lattice is
    :func:`columns_on_one_coset`'s.

    Examples
    --------
    >>> import numpy as np
    >>> pq = np.array([(p, q) for p in range(-9, 9) for q in range(-9, 9)])
    >>> one = lambda ij: SiteIndex(xy=ij * 1.0, ij=ij, peak=np.arange(len(ij)), kind=np.zeros(len(ij), np.int8),
    ...                            cls=(ij[:, 0] - ij[:, 1]) % 3, basis=np.zeros((len(ij), 2, 2)),
    ...                            rms=np.zeros(len(ij)), n_merged=0, n_noise=0, on_node=1.0)
    >>> columns_on_one_finer_coset(one(pq)), columns_on_one_finer_coset(one(2 * pq + 1))
    (None, 2)
    """
    col = (np.asarray(idx.kind) == 0) & (np.asarray(idx.cls) >= 0)
    if col.sum() < COSET_MIN_COLUMNS:
        return None
    ij = np.asarray(idx.ij)[col]
    for n in (2, 3):
        counts = np.bincount(np.mod(ij[:, 0], n) * n + np.mod(ij[:, 1], n), minlength=n * n)
        if counts.max() >= FINER_COSET_SHARE * col.sum():
            return n
    return None


def _image_nodes(pmap: PhaseMap, off: np.ndarray, M: np.ndarray, Minv: np.ndarray, shape: tuple[int, int],
                 spacing: float) -> np.ndarray:
    """The site-lattice nodes ``(p, q)`` [K, 2] whose phase-map position lies in the image or within
    three spacings of it."""
    H, W = shape
    corners = np.array([[0, 0], [W - 1, 0], [0, H - 1], [W - 1, H - 1]], dtype=np.float64)
    cpq = pmap.coords(corners) @ M - off
    lo = np.floor(cpq.min(0)).astype(np.int64) - 2
    hi = np.ceil(cpq.max(0)).astype(np.int64) + 2
    P, Q = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1), indexing="ij")
    nodes = np.stack([P.ravel(), Q.ravel()], 1)
    xy0 = pmap.positions((nodes + off) @ Minv, n_iter=1)
    pad = 3 * spacing
    return nodes[(xy0[:, 0] > -pad) & (xy0[:, 0] < W - 1 + pad) & (xy0[:, 1] > -pad) & (xy0[:, 1] < H - 1 + pad)]


def _match_peaks(peak_xy, peak_value, node, nodes, base, rim, S, *, shape, spacing, tol, fit_radius,
                 min_fit_points, n_rounds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each peak's node: first the nearest node of the phase map, then ``n_rounds`` times the node
    (its own or a neighbour) whose prediction from the winners around it is nearest; then a loose
    peak takes the free node in whose cell it sits. Returns ``(node [N, 2], on [N], winner [N])``:
    ``on`` the peak is within ``tol`` spacings of its node, ``winner`` it is its node's strongest."""
    n_pk = len(peak_xy)
    grid_base = _Grid(nodes, base)
    # first: the phase map alone
    d0 = np.hypot(*(peak_xy - grid_base.get(node)).T)
    on = d0 <= tol * spacing
    winner = _strongest(node, on, peak_value)
    cands = np.stack([node + o for o in [np.zeros(2, np.int64)] + list(_FIRST)], 1)  # [N, 7, 2]
    for _ in range(max(0, n_rounds)):
        # prediction of every node from the winners around it (own peak left out)
        wn = np.flatnonzero(winner)
        pred = _predict(nodes, _fill_positions(nodes, node[wn], peak_xy[wn], base),
                        _node_isin(nodes, node[wn]), S, base, fit_radius, min_fit_points, shape, spacing, rim)
        gp = _Grid(nodes, pred)
        pos = gp.get(cands.reshape(-1, 2)).reshape(n_pk, 7, 2)
        d = np.hypot(pos[..., 0] - peak_xy[:, None, 0], pos[..., 1] - peak_xy[:, None, 1])
        d = np.where(np.isfinite(d), d, np.inf)
        best = np.argmin(d, axis=1)
        node = cands[np.arange(n_pk), best]
        on = d[np.arange(n_pk), best] <= tol * spacing
        winner = _strongest(node, on, peak_value)
        cands = np.stack([node + o for o in [np.zeros(2, np.int64)] + list(_FIRST)], 1)
    # a peak near no node's prediction but inside the cell of a node without a peak (within half a
    # spacing of its prediction) is that node's column, displaced
    loose = np.flatnonzero(~on)
    if len(loose):
        taken = _node_isin(cands[loose].reshape(-1, 2), node[winner]).reshape(len(loose), 7)
        dl = np.where(taken, np.inf, d[loose] if n_rounds > 0 else np.inf)
        bl = np.argmin(dl, axis=1)
        okl = dl[np.arange(len(loose)), bl] <= 0.5 * spacing
        node[loose[okl]] = cands[loose[okl], bl[okl]]
        on2 = np.zeros(n_pk, bool)
        on2[loose[okl]] = True
        win2 = _strongest(node, on2, peak_value)
        winner |= win2
        on |= on2
    return node, on, winner


def _off_lattice_peaks(peak_xy, peak_value, node, on, winner, shape, spacing, off_strength) -> np.ndarray:
    """Peaks on no node that are ``off_lattice`` sites (bool [N]): at least ``off_strength`` times the
    median value of the brightest class's winners, and not a column cut by the image edge."""
    cls_pk = np.mod(node[:, 0] - node[:, 1], 3)
    ref_vals = [np.median(peak_value[winner & (cls_pk == c)]) if np.any(winner & (cls_pk == c)) else -np.inf
                for c in range(3)]
    ref = float(max(ref_vals)) if np.isfinite(max(ref_vals)) else float(np.median(peak_value))
    # a maximum within half a spacing of the image edge is a column cut by the edge, not an adatom
    return (~on) & (peak_value >= off_strength * ref) & (border_distance(peak_xy, shape) >= 0.5 * spacing)


#: an off-lattice peak within SPLIT_NN spacings of a node's site is a second maximum of that column
#: (:func:`_split_column_peaks`): 0.55 spacings is 1.0 A on MoS2 and WSe2, about the width of the
#: probe, and two atoms that close in projection are not resolved. (Every point of the plane is within
#: 0.577 spacings of a site. Half a spacing, the bound before, left maxima that shot noise split off a
#: column at 0.50-0.52 spacings as sites of their own -- duplicates of the column for the shared check,
#: whose spacing differs from the FFT's by a few %: in 2 of 16 low-dose copies of the real MoS2 scans.
#: Two *node* sites stay apart by half a spacing (:func:`_separate`, :func:`_apart`): at the image edge a
#: cut column's peak can sit 0.55 spacings from its neighbour's true place, and 0.55 dropped that site)
SPLIT_NN = 0.55


def _split_column_peaks(off_xy, site_xy, spacing) -> np.ndarray:
    """Off-lattice peaks within :data:`SPLIT_NN` spacings of a node's site (bool [len(off_xy)]): a
    second maximum of that column (split by shot noise, a scan glitch or coarse sampling), not an
    atom of its own -- an atom that close to a column's projection is not resolved from it. They
    are merged into the column."""
    if not len(off_xy) or not len(site_xy):
        return np.zeros(len(off_xy), bool)
    from scipy.spatial import cKDTree

    d, _ = cKDTree(site_xy).query(off_xy, distance_upper_bound=SPLIT_NN * spacing)
    return np.isfinite(d)


def _place_sites(peak_xy, node, w_idx, nodes, base, rim, S, pmap, *, film, shape, spacing, margin_px,
                 min_amplitude, fill, fit_radius, min_fit_points, peak_var, backend=None):
    """Final positions: every winner between its peak and its neighbours' prediction
    (:func:`_shrinkage`), every empty node of the film at its prediction; the prediction of the
    wider fit (:data:`WIDE_FIT_NN`) where the peaks around a node scatter far more than columns do
    (:data:`ROUGH_RATIO`) and around a predicted site that crowds another site
    (:data:`UNCROWD_NN`, :func:`_crowding_nodes`). Returns ``(xy_w [len(w_idx), 2], keep_w
    [len(w_idx)], empty [K, 2] nodes, xy_empty [K, 2])``; ``keep_w`` False for a winner too close to
    another node's site even at its prediction (:func:`_separate`)."""
    has = _node_isin(nodes, node[w_idx])
    if not fill:
        nodes, base, rim, has = nodes[has], base[has], rim[has], has[has]
    filled = _fill_positions(nodes, node[w_idx], peak_xy[w_idx], base)
    narrow = _predict(nodes, filled, has, S, base, fit_radius, min_fit_points, shape, spacing, rim)

    @functools.cache
    def wide() -> np.ndarray:  # the wider fit's prediction, made once when it is needed
        return _predict(nodes, filled, has, S, base, max(fit_radius, WIDE_FIT_NN), min_fit_points, shape, spacing, rim)

    kw = dict(shape=shape, spacing=spacing, margin_px=margin_px, min_amplitude=min_amplitude, film=film,
              peak_var=peak_var, backend=backend)
    stiff = np.zeros(len(nodes), bool)  # nodes placed by the wider fit because they crowded
    for round_ in range(UNCROWD_ROUNDS + 1):
        pred = narrow.copy()
        if stiff.any():
            use = stiff & np.isfinite(wide()).all(1)
            pred[use] = wide()[use]
        out = _placement(peak_xy, node, w_idx, nodes, has, pred, wide, pmap, **kw)
        if round_ == UNCROWD_ROUNDS:
            break
        xy_w, keep_w, empty, xy_empty = out
        new = _crowding_nodes(nodes, node[w_idx][keep_w], xy_w[keep_w], empty, xy_empty, UNCROWD_NN * spacing)
        new &= ~stiff
        if not new.any():
            break
        stiff |= new
    return out


def _placement(peak_xy, node, w_idx, nodes, has, pred, wide, pmap, *, shape, spacing, margin_px, min_amplitude,
               film, peak_var, backend=None):
    """:func:`_place_sites` for one prediction ``pred`` of the nodes (``wide``: the wider fit's
    prediction, called where the peaks are rough)."""
    H, W = shape
    pred = pred.copy()
    pred_w = _Grid(nodes, pred).get(node[w_idx])
    xy_w = peak_xy[w_idx].copy()
    okp = np.isfinite(pred_w).all(1)
    vm = None if peak_var is None else np.asarray(peak_var, dtype=np.float64)[w_idx][okp]
    k, excess = _shrinkage(xy_w[okp] - pred_w[okp], vm, float(np.sqrt(3.0)) * spacing, xy=pred_w[okp],
                           backend=backend)
    e_rms = np.sqrt(np.asarray(excess, dtype=np.float64))
    rough_pk = np.flatnonzero(okp)[e_rms > max(ROUGH_RATIO * float(np.median(e_rms)) if len(e_rms) else 0.0,
                                               ROUGH_MIN_NN * spacing)]
    if len(rough_pk):
        # where the peaks around scatter far more than columns do (a contamination patch's texture),
        # the neighbours' prediction is made of those peaks too: the wider fit, which reaches the
        # sound lattice around and averages over more peaks, places the nodes there (and the empty
        # nodes next to them)
        rough = _node_isin(nodes, node[w_idx][rough_pk])
        rough |= _neighbour_count(nodes[rough], nodes) > 0
        use = rough & np.isfinite(wide()).all(1)
        pred[use] = wide()[use]
        # the shrinkage weights stay those of the local residuals (small there: rough peaks are
        # trusted little whichever prediction they are measured from)
        pred_w = _Grid(nodes, pred).get(node[w_idx])
    empty = nodes[~has]
    xy_empty = pred[~has]
    inside = ((xy_empty[:, 0] >= margin_px) & (xy_empty[:, 0] <= W - 1 - margin_px)
              & (xy_empty[:, 1] >= margin_px) & (xy_empty[:, 1] <= H - 1 - margin_px))
    if len(empty):
        near_peak = _neighbour_count(node[w_idx], empty) > 0
        inside &= (pmap.amplitude(xy_empty) >= min_amplitude) | near_peak
        if film is not None and film is not True:
            inside &= _on_film(film, xy_empty)
    empty, xy_empty = empty[inside], xy_empty[inside]
    xy_w[okp] = pred_w[okp] + k[:, None] * (xy_w[okp] - pred_w[okp])
    xy_w, keep_w = _separate(xy_w, pred_w, 0.5 * spacing)
    # a predicted site closer than half a spacing to a peak's site or to another predicted site
    # (next to the edge, where a column's peak sits off towards its cut side) is that column again
    if len(xy_empty):
        keep = _apart(xy_w, xy_empty, 0.5 * spacing)
        empty, xy_empty = empty[keep], xy_empty[keep]
    return xy_w, keep_w, empty, xy_empty


def _crowding_nodes(nodes, w_nodes, xy_w, empty, xy_empty, dmin) -> np.ndarray:
    """bool [len(nodes)]: the nodes of every pair of sites closer than ``dmin`` of which one at least
    is a predicted site (an ``empty`` node), and their first-shell neighbours -- where the narrow
    fit has followed columns that faint neighbours or noise put on the wrong node."""
    from scipy.spatial import cKDTree

    out = np.zeros(len(nodes), bool)
    if not len(empty):
        return out
    xy = np.concatenate([xy_w, xy_empty])
    pairs = cKDTree(xy).query_pairs(dmin, output_type="ndarray")
    if not len(pairs):
        return out
    pairs = pairs[(pairs >= len(xy_w)).any(1)]
    if not len(pairs):
        return out
    at = np.concatenate([w_nodes, empty])[np.unique(pairs.ravel())]
    ring = np.concatenate([at] + [at + o for o in _FIRST])
    return _node_isin(nodes, ring)


def _separate(xy: np.ndarray, pred: np.ndarray, dmin: float) -> np.ndarray:
    """Sites of two nodes closer than ``dmin`` (a peak pulled towards its neighbour's column, or no
    column at all, at the image edge mostly): the one farther from its neighbours' prediction
    ``pred`` goes to that prediction; one that is there already (or has none) and still too close
    is dropped (``keep`` False: two columns are never half a spacing apart). Returns ``(xy, keep)``;
    ``xy`` is changed in place."""
    from scipy.spatial import cKDTree

    ok = np.isfinite(pred).all(1)
    keep = np.ones(len(xy), bool)
    for _ in range(3):
        pairs = cKDTree(xy).query_pairs(dmin, output_type="ndarray")
        pairs = pairs[keep[pairs].all(1)] if len(pairs) else pairs
        if not len(pairs):
            break
        r = np.where(ok, np.hypot(*(xy - np.where(ok[:, None], pred, 0.0)).T), -np.inf)
        move = np.where(r[pairs[:, 0]] >= r[pairs[:, 1]], pairs[:, 0], pairs[:, 1])
        still = (r[move] <= 1e-9) | ~ok[move]  # at its prediction already, or none: it goes
        keep[move[still]] = False
        xy[move[~still]] = pred[move[~still]]
    return xy, keep


def border_distance(xy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Distance (px) of each point ``xy`` [N, 2] from the nearest border of an image of ``shape``
    (pixel centres at integers: 0 on the outermost pixels, negative outside).

    Examples
    --------
    >>> border_distance(np.array([[0.0, 5.0], [4.0, 3.0]]), (10, 8)).tolist()
    [0.0, 3.0]
    """
    H, W = shape
    return np.minimum.reduce([xy[:, 0], W - 1 - xy[:, 0], xy[:, 1], H - 1 - xy[:, 1]])


def _at_edge(xy: np.ndarray, shape: tuple[int, int], film, spacing: float) -> np.ndarray:
    """Points within ``EDGE_NN`` spacings of the image edge or of the film's rim (a hole, a grain's
    boundary): where a node's predicted place is least sure."""
    return (border_distance(xy, shape) < EDGE_NN * spacing) | _film_rim(film, xy, EDGE_NN * spacing)


def _adopt_off_lattice_peaks(peak_xy, o_idx, xy_empty, spacing, tol=0.5, others=None,
                             edge=None) -> tuple[np.ndarray, np.ndarray]:
    """An off-lattice peak near an empty node's final place is that node's column, displaced: the
    node takes the peak's position (``xy_empty`` changed in place). Near means within half a spacing
    where the peak is at an ``edge`` (the node's place is only sure once all neighbours are in) and
    within ``tol`` spacings elsewhere (a contamination patch's texture peaks are not columns); never
    a peak as near another node's site (``others``). Returns
    ``(empty_peak [K], the peak index per empty node or -1; o_idx, the off-lattice peaks left)``."""
    empty_peak = np.full(len(xy_empty), -1, np.int64)
    if len(o_idx) and len(xy_empty):
        from scipy.spatial import cKDTree

        de, je = cKDTree(xy_empty).query(peak_xy[o_idx], distance_upper_bound=0.5 * spacing)
        if edge is not None:  # away from the edges only within the node tolerance
            de = np.where(~np.asarray(edge, bool) & (de > tol * spacing), np.inf, de)
        if others is not None and len(others):  # as near another node's site: not this node's column
            do, _ = cKDTree(others).query(peak_xy[o_idx], distance_upper_bound=0.5 * spacing)
            de = np.where(do < 0.5 * spacing, np.inf, de)
        for k_o in np.argsort(de):
            if np.isfinite(de[k_o]) and empty_peak[je[k_o]] < 0:
                empty_peak[je[k_o]] = o_idx[k_o]
        taken = empty_peak >= 0
        xy_empty[taken] = peak_xy[empty_peak[taken]]
        o_idx = o_idx[~np.isin(o_idx, empty_peak[taken])]
    return empty_peak, o_idx


def _predict(nodes, xy, has, S, base, fit_radius, min_points, shape, spacing, rim=None) -> np.ndarray:
    """Every node's place predicted from the peaks around it (:func:`_local_fit`, ``min_points`` of
    them needed, else the phase map's place ``base``). For an empty node within ``EDGE_NN``
    spacings of the image edge or on the film's rim (``rim``, bool per node: the edge of a grain
    or a hole), where the neighbours lie on one side and the phase map is least reliable, the fit
    has the ``PREDICTION_PRIOR`` ridge and ``PREDICTION_MIN_POINTS`` suffice.
    """
    inward = border_distance(base, shape)
    edge = inward < EDGE_NN * spacing
    if rim is not None:
        edge = edge | rim
    edge &= ~np.asarray(has, bool)
    mp, pr = np.where(edge, PREDICTION_MIN_POINTS, min_points), np.where(edge, PREDICTION_PRIOR, 0.0)
    _, _, pred = _local_fit(nodes, xy, has, S, fit_radius, mp, need_rms=False, prior=pr)
    wt = _robust_weights(xy, pred, has, spacing)
    if wt is not None:  # refit with the peaks far from their neighbours' prediction down-weighted
        _, _, pred = _local_fit(nodes, xy, has, S, fit_radius, mp, need_rms=False, prior=pr, weight=wt)
    # an edge node with too few peaks around it (an image corner): the ridge fit over the peaks within
    # EDGE_FIT_NN spacings, before the phase map's place
    # (nodes a spacing or more outside the image stay out either way)
    wide = edge & ~np.isfinite(pred).all(1) & (inward > -spacing)
    if wide.any():
        # fitted per cluster of such nodes with the nodes around them (a few corners, not the image)
        radius = max(fit_radius, EDGE_FIT_NN)
        r = int(np.floor(radius * 2.0 / np.sqrt(3.0) + 1e-9))  # widest |dp|, |dq| within the radius
        lo = nodes.min(0)
        gi = nodes - lo
        mark = np.zeros(tuple((gi.max(0) + 1).tolist()), bool)
        mark[gi[wide, 0], gi[wide, 1]] = True
        lab, n_lab = ndimage.label(ndimage.maximum_filter(mark, size=2 * r + 1))
        node_lab = lab[gi[:, 0], gi[:, 1]]
        order = np.argsort(node_lab, kind="stable")
        bounds = np.searchsorted(node_lab[order], np.arange(1, n_lab + 2))
        for k in range(n_lab):
            sub = order[bounds[k]:bounds[k + 1]]
            w_sub = wide[sub]
            _, _, pw = _local_fit(nodes[sub], xy[sub], np.asarray(has, bool)[sub], S, radius,
                                  np.where(w_sub, 1.0, np.inf), need_rms=False,
                                  prior=np.where(w_sub, PREDICTION_PRIOR, 0.0))
            pred[sub[w_sub]] = pw[w_sub]
    return np.where(np.isfinite(pred), pred, base)


def _robust_weights(xy, pred, has, spacing) -> np.ndarray | None:
    """Cauchy weights ``1 / (1 + (r / c)^2)`` of the peaks (``has``) by their distance ``r`` from
    their neighbours' prediction ``pred``, ``c = ROBUST_C`` times the median ``r`` (at least
    ``ROBUST_MIN_NN`` spacings): a peak that is not its column (a contamination patch's texture,
    a noise maximum next to a faint column) pulls the predictions of its neighbours less. None
    when there are too few peaks to measure ``c``."""
    has = np.asarray(has, bool)
    ok = has & np.isfinite(pred).all(1)
    if ok.sum() < 20:
        return None
    r = np.hypot(*(xy[ok] - pred[ok]).T)
    c = max(ROBUST_C * float(np.median(r)), ROBUST_MIN_NN * spacing)
    wt = np.ones(len(xy))
    wt[ok] = 1.0 / (1.0 + (r / c) ** 2)
    return wt


#: scale of :func:`_robust_weights` in median residuals (wide: the residuals mix bright metal peaks
#: and faint, noisier chalcogen peaks, and at 2x the median the fit lost the faint ones' information:
#: positions 0.47 -> 0.55 px rms on a low-dose synthetic image; at 3-6x 0.46) and its floor (spacings)
ROBUST_C = 4.0
ROBUST_MIN_NN = 0.05


def _film_rim(film, xy: np.ndarray, width: float) -> np.ndarray:
    """True for points ``xy`` within ``width`` px of the edge of the film (a mask with ``mask`` and
    ``factor``; a grain's region, or the film around holes); all False without such a film."""
    mask = getattr(film, "mask", None)
    if mask is None or np.asarray(mask, bool).all():
        return np.zeros(len(xy), bool)
    f = int(getattr(film, "factor", 1))
    inside = ndimage.distance_transform_edt(np.asarray(mask, bool)) * f
    ij = np.clip(np.floor(xy[:, ::-1] / f).astype(np.int64), 0, np.array(inside.shape) - 1)
    return inside[ij[:, 0], ij[:, 1]] - 0.5 * f < width


def _apart(fixed: np.ndarray, cand: np.ndarray, dmin: float) -> np.ndarray:
    """Which of ``cand`` [K, 2] to keep so that none is within ``dmin`` of ``fixed`` [N, 2] or of
    another kept one (of two close candidates the one farther inside the image bounding box of all
    points is kept)."""
    from scipy.spatial import cKDTree

    keep = np.ones(len(cand), bool)
    if len(fixed):
        d, _ = cKDTree(fixed).query(cand, distance_upper_bound=dmin)
        keep &= ~(d < dmin)
    idx = np.flatnonzero(keep)
    if len(idx) > 1:
        pts = cand[idx]
        allp = np.concatenate([fixed, cand]) if len(fixed) else cand
        lo, hi = allp.min(0), allp.max(0)
        inner = np.minimum(pts - lo, hi - pts).min(1)
        for a, b in sorted(cKDTree(pts).query_pairs(dmin)):
            if keep[idx[a]] and keep[idx[b]]:
                keep[idx[b] if inner[a] >= inner[b] else idx[a]] = False
    return keep


def _strongest(node: np.ndarray, on: np.ndarray, value: np.ndarray) -> np.ndarray:
    """True for the strongest of the peaks ``on`` a node, per node."""
    win = np.zeros(len(node), bool)
    idx = np.flatnonzero(on)
    if len(idx) == 0:
        return win
    key = _key(node[idx])
    order = np.lexsort((-value[idx], key))
    ks = key[order]
    first = np.ones(len(order), bool)
    first[1:] = ks[1:] != ks[:-1]
    win[idx[order[first]]] = True
    return win


def _fill_positions(nodes: np.ndarray, pk_nodes: np.ndarray, pk_xy: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Positions of ``nodes``: the peak's where a node has one, else ``base``."""
    out = base.copy()
    g = _Grid(pk_nodes, pk_xy)
    v = g.get(nodes)
    ok = np.isfinite(v).all(1)
    out[ok] = v[ok]
    return out


def _key(n: np.ndarray) -> np.ndarray:
    n = np.asarray(n, dtype=np.int64).reshape(-1, 2)
    return (n[:, 0] + (1 << 30)) * (1 << 31) + (n[:, 1] + (1 << 30))


def _node_isin(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """bool [len(a)]: which nodes ``a`` [N, 2] are among the nodes ``b`` [M, 2] (``np.isin`` of their
    keys). Keys are numbered within the nodes' bounding box, so that ``np.isin`` can use a lookup
    table instead of hashing / sorting (1.3M nodes: ~0.6 s -> ~0.02 s); a box much larger than the
    node count (nodes far apart) keeps the sparse keys."""
    a = np.asarray(a, dtype=np.int64).reshape(-1, 2)
    b = np.asarray(b, dtype=np.int64).reshape(-1, 2)
    if len(a) == 0 or len(b) == 0:
        return np.zeros(len(a), bool)
    lo = np.minimum(a.min(0), b.min(0))
    span = np.maximum(a.max(0), b.max(0)) - lo + 1
    if span[0] * span[1] > 8 * (len(a) + len(b)) + (1 << 20):
        return np.isin(_key(a), _key(b))
    ka = (a[:, 0] - lo[0]) * span[1] + (a[:, 1] - lo[1])
    kb = (b[:, 0] - lo[0]) * span[1] + (b[:, 1] - lo[1])
    return np.isin(ka, kb, kind="table")


class _Grid:
    """Values on integer nodes (p, q), looked up by node."""

    def __init__(self, nodes: np.ndarray, values: np.ndarray, pad: int = 3) -> None:
        nodes = np.asarray(nodes, dtype=np.int64).reshape(-1, 2)
        if len(nodes) == 0:
            self.lo = np.zeros(2, np.int64)
            self.arr = np.full((1, 1) + values.shape[1:], np.nan)
            return
        self.lo = nodes.min(0) - pad
        hi = nodes.max(0) + pad
        shp = tuple((hi - self.lo + 1).tolist()) + values.shape[1:]
        self.arr = np.full(shp, np.nan)
        i = nodes - self.lo
        self.arr[i[:, 0], i[:, 1]] = values

    def get(self, nodes: np.ndarray) -> np.ndarray:
        """The values at ``nodes`` [M, 2] (a new array; NaN off the grid)."""
        i = np.asarray(nodes, dtype=np.int64) - self.lo
        n0, n1 = self.arr.shape[:2]
        i0, i1 = i[:, 0], i[:, 1]
        ok = (i0 >= 0) & (i0 < n0) & (i1 >= 0) & (i1 < n1)
        flat = i0 * n1
        flat += i1
        # rows of the flattened grid (np.take: ~2.5x faster than indexing by the two coordinates)
        out = self.arr.reshape((n0 * n1,) + self.arr.shape[2:]).take(np.where(ok, flat, 0), axis=0)
        out[~ok] = np.nan
        return out


def _neighbour_mean(nodes: np.ndarray, values: np.ndarray, query: np.ndarray, *, include_self: bool) -> np.ndarray:
    """Mean of ``values`` [K, 2] over the first-shell nodes (and itself) of each ``query`` node;
    NaN where none has a value. Several values on one node: the last one counts."""
    grid = _Grid(nodes, np.asarray(values, dtype=np.float64))
    offs = list(_FIRST) + ([np.zeros(2, np.int64)] if include_self else [])
    acc = np.zeros((len(query), 2))
    cnt = np.zeros(len(query))
    for o in offs:
        v = grid.get(query + o)
        ok = np.isfinite(v).all(1)
        acc[ok] += v[ok]
        cnt[ok] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return acc / cnt[:, None]


def _neighbour_count(nodes: np.ndarray, query: np.ndarray) -> np.ndarray:
    grid = _Grid(nodes, np.ones(len(nodes)))
    cnt = np.zeros(len(query), np.int64)
    for o in list(_FIRST) + list(_SHELLS):
        cnt += np.isfinite(grid.get(query + o))
    return cnt


def _fit_kernels(fit_radius: float) -> tuple[int, list]:
    """``(r, [k1, kp, kq, kpp, kpq, kqq])``: the (p, q) offsets ``d`` within ``fit_radius`` spacings
    of a node (itself left out; ``r`` the widest ``|dp|``) as correlation kernels weighting a
    neighbour's value by 1, dp, dq, dp^2, dp dq, dq^2 -- the sums of a local affine fit."""
    r = max(1, int(np.floor(fit_radius * 2.0 / np.sqrt(3.0) + 1e-9)))
    dp, dq = np.mgrid[-r:r + 1, -r:r + 1]
    inside = (dp * dp + dq * dq + dp * dq <= fit_radius ** 2 + 1e-9) & ((dp != 0) | (dq != 0))
    k1 = inside.astype(np.float64)
    kp, kq = k1 * dp, k1 * dq
    return r, [k1, kp, kq, kp * dp, kp * dq, kq * dq]


def _kernel_plans(kernels: list) -> tuple:
    """How :meth:`_NodeGrid.sums` applies the kernels ``[2 r + 1, 2 r + 1]`` (K of them): ``(groups,
    cells, weights, used)``. ``groups[k]``: for the first ``k`` kernels (``k = 0 .. K``), per kernel
    cell (raster order), ``((|w|, ((kernel, w > 0), ...)), ...)``, the kernels that weigh the cell
    by more than the float64 epsilon grouped by ``|w|`` (in the kernels' order within a group);
    ``cells`` the cells (flat, raster order) that any kernel weighs so, ``weights`` [K, cells] the
    kernels' weights there and ``used`` [K, cells] which of them count."""
    eps = np.finfo(np.float64).eps
    flat = np.stack(kernels).reshape(len(kernels), -1)
    groups = []
    for n_k in range(len(kernels) + 1):
        plan = []
        for col in flat.T.tolist():
            by_w: dict = {}
            for k, w in enumerate(col[:n_k]):
                if abs(w) > eps:
                    by_w.setdefault(abs(w), []).append((k, w > 0))
            plan.append(tuple((w, tuple(t)) for w, t in by_w.items()))
        groups.append(tuple(plan))
    cells = np.flatnonzero((np.abs(flat) > eps).any(0))
    arrays = (cells, flat[:, cells], np.abs(flat[:, cells]) > eps)
    for a in arrays:  # kept per radius (:func:`_fit_plans`): read-only
        a.flags.writeable = False
    return (tuple(groups), *arrays)


@functools.lru_cache(maxsize=None)
def _fit_plans(fit_radius: float) -> tuple[int, tuple]:
    """``(r, plans)``: :func:`_fit_kernels` and their :func:`_kernel_plans` (made once per radius)."""
    r, kernels = _fit_kernels(fit_radius)
    return r, _kernel_plans(kernels)


#: up to this many nodes :meth:`_NodeGrid.sums` adds all sums at once per kernel cell (the fits of
#: a few dozen nodes at an image corner: there the Python work per cell and sum is the cost)
_FEW_NODES = 512


class _NodeGrid:
    """The dense (p, q) grid around nodes ``ij`` [N, 2] (``r`` cells of margin) for sums over each
    node's neighbours with the kernels of ``plans`` (:func:`_kernel_plans`): values are put on it
    per node (zero elsewhere) and each node's neighbourhood is read from it, offset by offset (only
    at the nodes: the grid of a large image holds millions of cells, several times the nodes)."""

    def __init__(self, ij: np.ndarray, r: int, plans: tuple) -> None:
        lo = ij.min(0) - r
        self.shape = tuple((ij.max(0) + r - lo + 1).tolist())
        self.r, self.plans = r, plans
        self.rows, self.cols = (ij - lo).T
        self._at = self.rows * self.shape[1] + self.cols  # flat index of each node

    def sums(self, *jobs: tuple) -> list:
        """Per job ``(values [N], k)``, the correlations of the first ``k`` kernels with the grid
        holding ``values`` at the nodes (the last of duplicate nodes), at the nodes ([N] each; a
        list per job). Bit for bit ``ndimage.correlate(grid, kernel, mode="constant")[rows,
        cols]``: the same products (weights above the float64 epsilon) summed from 0 in the same
        (raster) order. All jobs' grids are read at each offset at once; up to :data:`_FEW_NODES`
        nodes, all sums get their products at once (:meth:`_few`), else each product ``v * |w|`` is
        made once per offset and job (``acc + v * w`` is ``acc - v * |w|`` for ``w < 0``, and
        ``v * 1`` is ``v``: exactly)."""
        grid = np.zeros((len(jobs), self.shape[0] * self.shape[1]))
        for row, (values, _) in zip(grid, jobs):
            row[self._at] = values  # (the other cells stay 0)
        if len(self._at) <= _FEW_NODES:
            return self._few(grid, [k for _, k in jobs])
        r, width, side = self.r, self.shape[1], 2 * self.r + 1
        n = len(self._at)
        out = [[np.zeros(n) for _ in range(k)] for _, k in jobs]
        plans = [self.plans[0][k] for _, k in jobs]
        at = np.empty(n, np.int64)
        v = np.empty((len(jobs), n))
        prod = np.empty(n)
        for o in range(side * side):
            if not any(p[o] for p in plans):
                continue
            # (the margin of r cells keeps every neighbour on the grid: "clip" never clips)
            np.add(self._at, (o // side - r) * width + (o % side - r), out=at)
            np.take(grid, at, axis=1, out=v, mode="clip")
            for vj, accs, p in zip(v, out, plans):
                for w, terms in p[o]:
                    x = vj if w == 1.0 else np.multiply(vj, w, out=prod)
                    for k, add in terms:
                        (np.add if add else np.subtract)(accs[k], x, out=accs[k])
        return out

    def _few(self, grid: np.ndarray, ks: list) -> list:
        """:meth:`sums` of the grids ``grid`` [jobs, cells] for the first ``ks[j]`` kernels each:
        per kernel cell in raster order, one product and one add over every sum (each masked to the
        sums whose kernel weighs the cell: the same products, added in the same order)."""
        _, cells, weights, used = self.plans
        side = 2 * self.r + 1
        offsets = (cells // side - self.r) * self.shape[1] + (cells % side - self.r)
        job = np.concatenate([np.full(k, j) for j, k in enumerate(ks)])  # per sum: its job ...
        kern = np.concatenate([np.arange(k) for k in ks])  # ... and kernel
        w, use = weights[kern][:, :, None], used[kern][:, :, None]  # [sums, cells, 1]
        v = grid[:, offsets[:, None] + self._at[None, :]][job]  # [sums, cells, nodes]
        acc = np.zeros((len(job), len(self._at)))
        prod = np.empty_like(acc)
        for c in range(len(cells)):
            np.multiply(v[:, c], w[:, c], out=prod, where=use[:, c])
            np.add(acc, prod, out=acc, where=use[:, c])
        ends = np.cumsum(ks)
        return [list(acc[e - k:e]) for e, k in zip(ends, ks)]


def _local_fit(ij: np.ndarray, xy: np.ndarray, w_peak: np.ndarray, S: np.ndarray, fit_radius: float,
               min_points, need_rms: bool = True, prior=0.0, weight: np.ndarray | None = None):
    """Per node: least-squares ``xy(n + d) = c + d @ B`` over the nodes with a peak within
    ``fit_radius`` spacings of it (the node itself left out, so ``c`` is its neighbours' prediction).

    Returns the basis [N, 2, 2] (``S`` where the fit had fewer than ``min_points`` peaks), the rms
    residual [N] of those peaks (px; NaN there) and ``c`` [N, 2] (NaN there). All sums are small
    correlations on the dense (p, q) grid. ``prior`` > 0 pulls the fitted basis towards ``S`` with
    the weight of ``prior`` points one spacing away along each lattice vector (a ridge): a node whose
    neighbours all lie on one side (the image edge) is placed by the lattice, not by an affine
    extrapolation; with a full neighbourhood the centre barely moves. The target is the image-wide ``S``, not the phase map's
    local vectors (least reliable at the image edge: 0.293 px rmse against 0.249 px on mos2_dev1).
    ``min_points`` and ``prior`` may be per node ([N]); ``weight`` [N] in (0, 1] weighs the peaks
    in the sums (the robust refit of :func:`_predict`), ``min_points`` still counts them.
    """
    ij = np.asarray(ij, dtype=np.int64).reshape(-1, 2)
    n = len(ij)
    basis = np.broadcast_to(S, (n, 2, 2)).copy()
    rms = np.full(n, np.nan)
    centre = np.full((n, 2), np.nan)
    if n == 0:
        return basis, rms, centre
    w_node = np.asarray(w_peak, dtype=np.float64) * (1.0 if weight is None else weight)
    # positions are taken relative to the node's own rough place (the global lattice) to keep the sums small
    ref = (ij.astype(np.float64) @ S)
    pos = np.where(np.asarray(w_peak, bool)[:, None], xy, 0.0)
    # positions relative to the global-lattice place of the *fitted* node: x(n + d) - ref(n) =
    # (x(n + d) - ref(n + d)) + d @ S; the first part is what is correlated, the second is added
    d_nodes = [np.where(w_node > 0, pos[:, c] - ref[:, c], 0.0) for c in range(2)]
    g_nodes = [dn * (1.0 if weight is None else w_node) for dn in d_nodes]
    # every sum of the fit in one pass over the grid (sum of w v^2: with weights, not of (w v)^2)
    jobs = [(w_node, 6)] + [(gn, 3) for gn in g_nodes]
    jobs += [(gn * dn, 1) for gn, dn in zip(g_nodes, d_nodes)] if need_rms else []
    jobs += [] if weight is None else [((w_node > 0).astype(np.float64), 1)]
    sums = _NodeGrid(ij, *_fit_plans(float(fit_radius))).sums(*jobs)
    s1, sp, sq, spp, spq, sqq = sums[0]
    good = (s1 if weight is None else sums[-1][0]) >= np.broadcast_to(np.asarray(min_points), (n,))
    if not good.any():
        return basis, rms, centre
    # drop near-singular fits (all points on one line)
    g = np.flatnonzero(good)
    s1g, spg, sqg, sppg, spqg, sqqg = s1[g], sp[g], sq[g], spp[g], spq[g], sqq[g]
    # the ridge: solved for the basis' deviation from S (residual frame), so it adds to the
    # diagonal of the normal matrix only
    prior = np.broadcast_to(np.asarray(prior, dtype=np.float64), (n,))[g]
    if need_rms and (prior > 0).any():
        raise ValueError("the residual of a ridge fit is not computed")
    sppg_r, sqqg_r = sppg + prior, sqqg + prior
    # adjugate of the symmetric normal matrix [[s1, sp, sq], [sp, spp, spq], [sq, spq, sqq]]
    A = sppg_r * sqqg_r - spqg * spqg
    B = sqg * spqg - spg * sqqg_r
    C = spg * spqg - sqg * sppg_r
    D = s1g * sqqg_r - sqg * sqg
    E = spg * sqg - s1g * spqg
    F = s1g * sppg_r - spg * spg
    with np.errstate(divide="ignore", invalid="ignore"):
        idet = 1.0 / (s1g * A + spg * B + sqg * C)
    rs = np.zeros(len(g))
    for c in range(2):
        r0, rp, rq = (v[g] for v in sums[1 + c])
        # solve for (c0, basis - S) of the residuals G, then add d @ S back
        c0 = (A * r0 + B * rp + C * rq) * idet
        b1 = (B * r0 + D * rp + E * rq) * idet + S[0, c]
        b2 = (C * r0 + E * rp + F * rq) * idet + S[1, c]
        centre[g, c] = c0 + ref[g, c]
        basis[g, 0, c] = b1
        basis[g, 1, c] = b2
        if need_rms:
            R0 = r0 + spg * S[0, c] + sqg * S[1, c]
            Rp = rp + sppg * S[0, c] + spqg * S[1, c]
            Rq = rq + spqg * S[0, c] + sqqg * S[1, c]
            # residual sum of squares = sum w v^2 - sol . R (the normal equations), v = G + d @ S[:, c]
            g2 = sums[3 + c][0][g]  # sum of w v^2
            cross = 2 * (S[0, c] * rp + S[1, c] * rq)
            quad = S[0, c] ** 2 * sppg + 2 * S[0, c] * S[1, c] * spqg + S[1, c] ** 2 * sqqg
            rs += g2 + cross + quad - (c0 * R0 + b1 * Rp + b2 * Rq)
    if need_rms:
        rms[g] = np.sqrt(np.clip(rs, 0, None) / s1g)
    return basis, rms, centre


#: weight (in points one spacing away) of the pull of a neighbours' prediction fit towards the
#: phase map's lattice vectors (see :func:`_local_fit`)
PREDICTION_PRIOR = 8.0
#: peaks a neighbours' prediction of a node within a spacing of the image edge needs (the prior fixes
#: the lattice vectors, the peaks the place): the phase map's place, the fallback elsewhere, is least
#: reliable there (a corner node of a 384 px synthetic image: 2.8 px off)
PREDICTION_MIN_POINTS = 2
#: the band (in spacings) along the image edge where :func:`_predict` uses the ridge fit
EDGE_NN = 1.5
#: radius (spacings) of the ridge fit that places an edge node with fewer than PREDICTION_MIN_POINTS peaks
#: within the fit radius (an image corner) from the nearest columns: the phase map is no fallback
#: there (its Fourier filter wraps around the image; at the corner of a two-grain 512 px image it
#: placed a node 7.6 px off, a site where there is no column)
EDGE_FIT_NN = 4.0


#: root-mean-square displacement (per coordinate) a column of a 2H monolayer really has, static and
#: thermal, as a share of the lattice constant a (~0.08 A for MoS2): the prior of :func:`_shrinkage`
DISPLACEMENT_RMS_A = 0.025
#: the residual variance beyond the displacement prior and the fit's own is measured over this many
#: nearest peaks (the site and its first two shells): local, so that a contamination patch's texture,
#: which moves the peaks there and nowhere else, pulls those sites to their neighbours' prediction
SHRINK_NEIGHBORS = 19
#: a node is "rough" when the peaks around it scatter, beyond the displacement prior and their own
#: fit (the rms of :func:`_shrinkage`'s excess, per coordinate), more than ROUGH_RATIO times as much as
#: the image's median and more than ROUGH_MIN_NN spacings: there :func:`_place_sites` takes the
#: prediction of the WIDE_FIT_NN fit. The real MoS2 images scatter 0.09 spacings (median), 0.12-0.14 at
#: the 90th percentile, and have 0-2.6 % of their nodes beyond 2x; textured-contamination copies of
#: them 67 % of the nodes inside the texture, 1.7 % outside; the WSe2 scans 0.02-0.03 (median), at
#: most 0.11-0.13, so the floor leaves them as they are (docs/RESULTS.md, round 6)
ROUGH_RATIO = 2.0
ROUGH_MIN_NN = 0.1
#: radius (spacings) of the wider prediction fit where the peaks are rough or the sites crowd
WIDE_FIT_NN = 4.0
#: a predicted site closer than UNCROWD_NN spacings to another site (what a regular lattice never has;
#: :data:`stemfast.crowding.CROWDED_NN` is this bound) tells that the narrow fit around it has followed columns that
#: faint neighbours or noise put on the wrong node: that node and its first shell are placed by the
#: WIDE_FIT_NN fit, up to UNCROWD_ROUNDS times. A real MoS2 scan (SciLink's ``MoS2_stem``, faint S2):
#: six-neighbour share 0.943 -> 0.995; crowding between found columns (a band of lines scanned off
#: pace) is left as it is (docs/RESULTS.md, round 14)
UNCROWD_NN = 0.75
UNCROWD_ROUNDS = 2


def _shrinkage(res: np.ndarray, var_meas: np.ndarray | None, a_px: float,
               xy: np.ndarray | None = None, backend: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """How far to trust each peak's position over its neighbours' prediction (0..1).

    A peak's residual from the prediction of its neighbours is the column's true displacement
    (per-coordinate variance ``u2 = (DISPLACEMENT_RMS_A * a)^2`` at most: what atoms in a monolayer
    do) plus noise: the fit's own (``var_meas``, see :func:`position_variance`) and whatever the
    image-wide residual variance has beyond ``u2 + median(var_meas)`` (scan and probe jitter,
    which moves the image of a column, not the column). The weight of the measurement is the
    usual ``u2 / (u2 + noise)``: ~1 on a clean image, small where the image places columns worse
    than the lattice around them does. Returns ``(weights, excess)``: the weights (0..1) and that
    excess variance per peak (per coordinate, px^2), by which :func:`_place_sites` finds the rough
    nodes. ``backend``: the kernel backend of the neighbour search around ``xy``.
    """
    n = len(res)
    if n < 20:
        return np.ones(n), np.zeros(n)
    vm = np.zeros(n) if var_meas is None else np.clip(np.asarray(var_meas, dtype=np.float64), 0, None)
    r2 = (res ** 2).sum(1) / (2 * np.log(2.0))  # median of sigma^2 chi2_2 = 2 ln2 sigma^2 (per coordinate)
    u2 = (DISPLACEMENT_RMS_A * a_px) ** 2
    if xy is None or n < SHRINK_NEIGHBORS:
        excess = max(float(np.median(r2)) - float(np.median(vm)) - u2, 0.0)
    else:
        nb = nearest_indices(xy, SHRINK_NEIGHBORS, backend=backend)
        excess = np.maximum(np.median(r2[nb], axis=1) - np.median(vm[nb], axis=1) - u2, 0.0)
    return u2 / (u2 + excess + vm), np.broadcast_to(excess, (n,))


def pixel_noise(image: np.ndarray) -> float:
    """Robust standard deviation of white pixel noise: MAD of the image minus the mean of its four
    neighbours (scaled by sqrt(1.25), the variance that difference has for white noise)."""
    img = np.asarray(image)
    H, W = img.shape
    c = 512  # a central crop: plenty of pixels
    sub = img[max(0, (H - c) // 2):max(0, (H - c) // 2) + c, max(0, (W - c) // 2):max(0, (W - c) // 2) + c]
    sub = sub.astype(np.float32)
    d = sub[1:-1, 1:-1] - 0.25 * (sub[:-2, 1:-1] + sub[2:, 1:-1] + sub[1:-1, :-2] + sub[1:-1, 2:])
    d = d.ravel()
    med = np.median(d)
    mad = float(np.median(np.abs(d - med)))
    return 1.4826 * mad / np.sqrt(1.25)


def position_variance(amplitude: np.ndarray, sigma: np.ndarray, radius: float, noise: float) -> np.ndarray:
    """Cramer-Rao variance (px^2, per coordinate) of the centre of a round Gaussian ``A, s`` fitted
    to a disc of ``radius`` px with white pixel noise ``noise``: ``noise^2 / (pi A^2 / 2 (1 - (1 +
    R^2 / s^2) exp(-R^2 / s^2)))``. Infinite where the fit has no signal.

    Examples
    --------
    >>> round(float(position_variance(np.array([1.0]), np.array([2.0]), 1e9, 0.1)[0]), 5)
    0.00637
    """
    A = np.asarray(amplitude, dtype=np.float64)
    s = np.maximum(np.asarray(sigma, dtype=np.float64), 1e-6)
    u = (radius / s) ** 2
    info = 0.5 * np.pi * A ** 2 * (1.0 - (1.0 + u) * np.exp(-u))
    with np.errstate(divide="ignore"):
        return np.where(info > 0, noise ** 2 / info, np.inf)


def _on_film(film, xy: np.ndarray) -> np.ndarray:
    mask = getattr(film, "mask", film)
    f = int(getattr(film, "factor", 1))
    mask = np.asarray(mask, bool)
    ij = np.clip(np.floor(xy[:, ::-1] / f).astype(np.int64), 0, np.array(mask.shape) - 1)
    return mask[ij[:, 0], ij[:, 1]]


def lattice_distortion(g: np.ndarray) -> dict:
    """How far the site lattice of reciprocal metal vectors ``g`` [2, 2] (rows, cycles / px) is from
    a regular triangular lattice: scan distortion (fast / slow scan calibration, drift shear) or
    homogeneous strain.

    The lattice is an ideal triangular lattice of the same cell area (``spacing_iso_px``) deformed
    by a linear map; ``anisotropy`` is its largest over its smallest principal stretch less one
    (0 for a regular lattice), ``stretch_axis_deg`` the direction of the largest stretch (from +x,
    modulo 180). ``bonds_px`` and ``bond_angles_deg`` are the three site bonds ``s1, s2, s2 - s1``
    (the spacings along the three lattice directions), ``shear_deg`` the angle between ``s1`` and
    ``s2`` less 60 degrees.

    Examples
    --------
    >>> g = np.linalg.inv(np.array([[24.0, 0.0], [12.0, 24.0 * np.sqrt(3) / 2]])).T  # regular, a = 24 px
    >>> d = lattice_distortion(g)
    >>> round(d["anisotropy"], 6), [round(b, 3) for b in d["bonds_px"]]
    (0.0, [13.856, 13.856, 13.856])
    >>> D = np.array([[1.1, 0.0], [0.0, 1.0]])  # 10% longer along x
    >>> round(lattice_distortion(g @ np.linalg.inv(D))["anisotropy"], 4)
    0.1
    """
    g = np.asarray(g, dtype=np.float64)
    if g.shape != (2, 2) or not np.isfinite(g).all() or abs(np.linalg.det(g)) == 0:
        raise ValueError(f"g must be a finite, non-singular 2 x 2 array, got {g!r}")
    S = SITE_FROM_METAL @ np.linalg.inv(g).T  # rows s1, s2 (px)
    bonds = np.stack([S[0], S[1], S[1] - S[0]])
    area = abs(float(np.linalg.det(S)))
    iso = float(np.sqrt(area / (np.sqrt(3.0) / 2.0)))
    # the ideal lattice of the same handedness: S = E F^T, F the deformation (its rotation aside)
    hand = 1.0 if np.linalg.det(S) > 0 else -1.0
    E = iso * np.array([[1.0, 0.0], [0.5, hand * np.sqrt(3.0) / 2.0]])
    F = np.linalg.solve(E, S).T
    U, sv, _ = np.linalg.svd(F)
    axis = float(np.degrees(np.arctan2(U[1, 0], U[0, 0])) % 180.0)
    cos12 = float(S[0] @ S[1] / (np.linalg.norm(S[0]) * np.linalg.norm(S[1])))
    return {
        "anisotropy": float(sv[0] / sv[1] - 1.0),
        "stretch_axis_deg": axis,
        "spacing_iso_px": iso,
        "bonds_px": [float(b) for b in np.hypot(bonds[:, 0], bonds[:, 1])],
        "bond_angles_deg": [float(a) for a in np.degrees(np.arctan2(bonds[:, 1], bonds[:, 0])) % 180.0],
        "shear_deg": float(np.degrees(np.arccos(np.clip(cos12, -1.0, 1.0))) - 60.0),
    }
