"""Grains: regions of one lattice orientation in a polycrystalline film, and their site lattices.

A polycrystalline 2H monolayer (CVD / MOCVD films) shows several grains, each a single crystal
with its own orientation; between them lie grain boundaries, where the defects of a polycrystal
live. One reference lattice cannot follow two orientations (the nodes of one grain's lattice fall
between the columns of the other), so the site lattice is built per grain:

1. :func:`find_orientations` -- every hexagon of first-ring Bragg spots of the metal lattice in the
   power spectra of tiles over the image; hexagons whose orientations (modulo 60 degrees) differ by
   at least ``min_misorientation_deg`` are different grains. A few degrees less is one grain with
   rotation strain (the phase map follows that). :func:`peak_orientations` adds the orientations
   the found columns show locally (a small grain at the image edge may stand out in no tile).
2. :func:`grain_map` -- the Bragg-filtered amplitude of each orientation over the image; each point
   belongs to the orientation whose amplitude dominates there; connected regions of one orientation
   are grains (smaller than ``min_grain_area_nn2`` square spacings they join the grain around them).
3. :func:`index_grains` -- :func:`stemfast.sitelattice.index_sites` per grain (its own phase map
   and reference lattice, its own fill-in), the results merged: a column near a boundary goes to
   the grain it lies in when it sits on that grain's lattice, else to the grain whose lattice it
   sits on, and a predicted node that falls on a column of another grain is dropped (unless each
   lies in its own grain and they are further apart than the node tolerance: two lattices meeting
   at the boundary). Sites within ``boundary_nn`` spacings of another grain are boundary sites.

For a single crystal :func:`find_grains` returns ``None`` and the caller keeps its single-lattice
path (:func:`stemfast.sites.find_sites`: the same table as without this module, plus ``grain`` 0).
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import fft as sfft
from scipy import ndimage
from scipy.spatial import cKDTree

from .braggring import SITE_FROM_METAL, _reciprocal_set, ring_spots, site_spacing
from .phasemap import PhaseMap, _block_spectrum, _demodulate
from .sitelattice import SiteIndex, index_sites, lattice_distortion

__all__ = ["GrainSettings", "Orientation", "GrainMap", "GrainIndex", "PolycrystalWarning", "find_orientations",
           "grain_map", "grain_phase_maps", "index_grains", "find_grains", "by_grain", "grain_summary",
           "warn_polycrystal", "polycrystal_warning", "grain_orientations",
           "tile_size", "peak_orientations"]

log = logging.getLogger(__name__)


class PolycrystalWarning(UserWarning):
    """The image holds more than one grain; sites carry their grain and boundary sites are flagged."""


@dataclass(frozen=True)
class GrainSettings:
    """Settings of the grain search (:func:`find_orientations`, :func:`grain_map`, :func:`index_grains`).

    Attributes
    ----------
    enabled : look for grains of different orientation (``False``: one lattice for the image).
    min_misorientation_deg : two Bragg hexagons at least this far apart (modulo 60 degrees) are two
        grains; closer, one grain with rotation strain.
    min_prominence : a second orientation's hexagon of spots must stand this far above its ring's
        median power (in at least one tile).
    tile_nn : side of the tiles whose power spectra are searched, in spacings (rounded up to a power
        of two px, 64-512; the image itself when smaller). A tile inside one grain shows one hexagon.
    max_tiles : at most this many tiles, spread over the image.
    min_grain_area_nn2 : a region of one orientation smaller than this (square spacings) joins the
        grain around it.
    boundary_nn : sites within this distance (spacings) of another grain are boundary sites.
    """

    enabled: bool = True
    min_misorientation_deg: float = 6.0
    min_prominence: float = 8.0
    tile_nn: float = 16.0
    max_tiles: int = 64
    min_grain_area_nn2: float = 60.0
    boundary_nn: float = 1.0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.min_misorientation_deg) and 0 < self.min_misorientation_deg <= 30):
            raise ValueError(f"min_misorientation_deg must be in (0, 30], got {self.min_misorientation_deg!r}")
        if not (np.isfinite(self.min_prominence) and self.min_prominence > 1):
            raise ValueError(f"min_prominence must be > 1, got {self.min_prominence!r}")
        if not (np.isfinite(self.tile_nn) and self.tile_nn >= 4):
            raise ValueError(f"tile_nn must be >= 4, got {self.tile_nn!r}")
        if int(self.max_tiles) < 1:
            raise ValueError(f"max_tiles must be >= 1, got {self.max_tiles!r}")
        for name in ("min_grain_area_nn2", "boundary_nn"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be >= 0, got {v!r}")


@dataclass(frozen=True)
class Orientation:
    """One lattice orientation: reciprocal metal vectors ``g`` [2, 2] (rows g1, g2, cycles / px),
    its angle (degrees, modulo 60: the circular mean of its spots' angles, which is the site
    lattice's angle), the best prominence of its hexagon over the tiles and in how many tiles it
    was seen (0 and 0 for an orientation found from the columns, :func:`peak_orientations`)."""

    g: np.ndarray
    angle_deg: float
    prominence: float
    n_tiles: int


def _spot_angle(pos: np.ndarray) -> float:
    """Orientation (degrees modulo 60) of a ring of spots ``pos`` [K, 2]: the circular mean of their
    angles on the 60-degree circle (the same whichever spot comes first, also under distortion)."""
    t = np.arctan2(pos[:, 1], pos[:, 0]) * 6.0
    return float(np.degrees(np.angle(np.exp(1j * t).sum())) / 6.0 % 60.0)


def _dist60(a, b):
    d = np.abs(np.asarray(a) - np.asarray(b)) % 60.0
    return np.minimum(d, 60.0 - d)


def tile_size(spacing: float, settings: GrainSettings) -> int:
    """Side (px) of the tiles searched for orientations: a power of two of at least
    ``settings.tile_nn`` spacings (64 to 512 px)."""
    return int(np.clip(2 ** int(np.ceil(np.log2(max(1.0, settings.tile_nn * spacing)))), 64, 512))


def _tiles(shape: tuple[int, int], tile: int, max_tiles: int) -> list[tuple[int, int, int, int]]:
    """Tiles (y0, x0, h, w) of side ``tile`` (or the image) covering it (the last ones overlap the
    others as needed), at most ``max_tiles`` spread over it."""
    H, W = shape
    th, tw = min(H, tile), min(W, tile)
    ny = 1 if H <= th else int(np.ceil((H - th) / th)) + 1
    nx = 1 if W <= tw else int(np.ceil((W - tw) / tw)) + 1
    while ny * nx > max_tiles:  # coarser steps: tiles spread over the image, not all of it
        ny, nx = max(1, int(np.ceil(ny * 0.8))) if ny > 1 else 1, max(1, int(np.ceil(nx * 0.8))) if nx > 1 else 1
        if ny == 1 and nx == 1:
            break
    ys = np.linspace(0, H - th, ny).round().astype(int) if ny > 1 else [max(0, (H - th) // 2)]
    xs = np.linspace(0, W - tw, nx).round().astype(int) if nx > 1 else [max(0, (W - tw) // 2)]
    return [(int(y), int(x), th, tw) for y in ys for x in xs]


#: percentile of the ring's power that a spot's power is compared with
_RING_PERCENTILE = 25.0
#: the strongest local maxima of a tile's ring searched for hexagons
_MAX_SPOTS = 24
#: the second spot of a hexagon is looked for this far (degrees) from 60 degrees on (scan distortion)
_SPOT_ANGLE_TOL_DEG = 8.0


def _tile_orientations(tile: np.ndarray, f_ring: float, settings: GrainSettings):
    """Hexagons of spots on the ring of radius ``f_ring`` (cycles / px) in one tile's spectrum:
    list of (angle, prominence, g [2, 2]), strongest first, pairwise at least the minimum
    misorientation apart."""
    h, w = tile.shape
    t = np.asarray(tile, dtype=np.float64)
    win = np.outer(np.hanning(h), np.hanning(w))
    R = sfft.rfft2((t - t.mean()) * win)
    # only the ring matters: the spectrum's centre out to past the ring (whitened, smoothed); the
    # half with fx < 0 is the mirror of fx > 0 (a real image)
    r = min(int(np.ceil(1.25 * f_ring * max(h, w))) + 4, h // 2 - 1, w // 2 - 1)
    ky = np.arange(-r - 1, r + 2)
    kx = np.arange(-r - 1, r + 2)
    P = np.abs(R[np.where(kx[None, :] >= 0, ky[:, None], -ky[:, None]) % h, np.abs(kx)[None, :]]) ** 2
    fy = (np.arange(-r - 1, r + 2) / h)[:, None]
    fx = (np.arange(-r - 1, r + 2) / w)[None, :]
    f2 = fx ** 2 + fy ** 2
    Pw = (ndimage.uniform_filter(P, 3) * f2)[1:-1, 1:-1]
    fy, fx, f2 = fy[1:-1], fx[:, 1:-1], f2[1:-1, 1:-1]
    fr = np.sqrt(f2)
    ring = np.abs(fr - f_ring) <= 1.5 / min(h, w)
    # the ring's lower quartile: the lattices' truncation at a boundary streaks the spectrum, which
    # lifts the ring's median far more than its quieter part
    ref = float(np.percentile(Pw[ring], _RING_PERCENTILE)) if ring.any() else 0.0
    if not ref > 0:
        return []
    band = (fr > 0.85 * f_ring) & (fr < 1.15 * f_ring) & (fy >= 0)
    # a spot is a local maximum: the flank of a strong spot nearby is not a second spot
    lmax = (Pw == ndimage.maximum_filter(Pw, size=3)) & band
    # a hexagon's weakest spot must stand out: weaker maxima cannot be in one
    idx = np.flatnonzero(lmax & (Pw >= settings.min_prominence * ref))
    idx = idx[np.argsort(Pw.ravel()[idx])[::-1][:_MAX_SPOTS]]
    iy, ix = np.unravel_index(idx, Pw.shape)
    spots = np.stack([(ix - r) / w, (iy - r) / h], 1)  # cycles / px, strongest first
    ang = np.degrees(np.arctan2(spots[:, 1], spots[:, 0]))
    free = np.ones(len(spots), bool)
    out, taken = [], []
    for a in range(len(spots)):
        if not free[a] or any(_dist60(ang[a], o) < settings.min_misorientation_deg for o in taken):
            continue
        # the spot 60 degrees on (within the angles scan distortion gives) and the third spot, which
        # for any 2-D lattice sits at their difference
        d = (ang - ang[a] - 60.0 + 180.0) % 360.0 - 180.0
        best = None
        for b in np.flatnonzero(free & (np.abs(d) <= _SPOT_ANGLE_TOL_DEG)):
            trio = np.stack([spots[a], spots[b], spots[b] - spots[a]])
            p, pos = _spot_centroids(Pw, r, h, w, trio)
            if best is None or p.min() > best[0].min():
                best = (p, pos)
        if best is None:
            continue
        p, pos = best
        prom = float(p.min() / ref)  # every spot must stand out (a streak fills one or two of them)
        if prom < settings.min_prominence:
            continue
        g = np.stack([pos[0], pos[2]])  # g1 = spot 0, g2 = spot at +120 degrees
        if abs(np.linalg.det(g)) < 1e-12:
            continue
        out.append((_spot_angle(pos), prom, g))
        taken.append(ang[a])
        # these spots (and their Friedel mates) are taken
        for q in np.concatenate([pos, -pos]):
            free &= np.hypot(*(spots - q).T) > 2.0 / min(h, w)
    return out


def _spot_centroids(Pw: np.ndarray, r: int, h: int, w: int, g: np.ndarray):
    """Max of ``Pw`` (a centred crop, centre at index ``r``, of an ``h x w`` spectrum) within 1.5
    bins of each frequency ``g`` [K, 2] and its power-weighted centroid (3 x 3 around the max)."""
    n = Pw.shape[0]
    p = np.zeros(len(g))
    pos = np.array(g, dtype=np.float64)
    for k, (gx, gy) in enumerate(g):
        x, y = r + gx * w, r + gy * h
        x0, y0 = int(round(x)), int(round(y))
        if not (3 <= x0 < n - 3 and 3 <= y0 < n - 3):
            continue
        box = Pw[y0 - 2:y0 + 3, x0 - 2:x0 + 3]
        yy, xx = np.mgrid[-2:3, -2:3]
        b = np.where((xx + x0 - x) ** 2 + (yy + y0 - y) ** 2 <= 1.5 ** 2, box, -np.inf)
        jy, jx = np.unravel_index(int(np.argmax(b)), b.shape)
        p[k] = box[jy, jx]
        sy, sx = slice(max(0, jy - 1), jy + 2), slice(max(0, jx - 1), jx + 2)
        wgt = np.clip(box[sy, sx] - np.median(box), 0, None)
        if wgt.sum() > 0:
            pos[k] = [((xx[sy, sx] * wgt).sum() / wgt.sum() + x0 - r) / w,
                      ((yy[sy, sx] * wgt).sum() / wgt.sum() + y0 - r) / h]
    return p, pos


#: a tile of :func:`find_orientations` with more than this share of vacuum is skipped: on a real MoS2
#: scan with a flake's edge, a tile with 35 % vacuum showed a faint hexagon 7 degrees off the film's
#: (prominence 8 against 117), which made a spurious grain; the same tile without the vacuum shows none
VACUUM_TILE_SHARE = 0.25


def find_orientations(image: np.ndarray, g_ring: np.ndarray, *, settings: GrainSettings | None = None,
                      exclude: np.ndarray | None = None) -> list[Orientation]:
    """The lattice orientations of the image: hexagons of first-ring Bragg spots (radius of
    ``g_ring``, the metal lattice's reciprocal vectors) found in the power spectra of tiles over
    the image, grouped by angle (modulo 60 degrees; orientations at least
    ``settings.min_misorientation_deg`` apart are different). Strongest first; one entry for a
    single crystal; empty when no tile shows a hexagon. ``exclude``: optional bool array of the
    image's shape, True where there is no film (dark vacuum, :func:`stemfast.vacuum.dark_vacuum`): a
    tile with more than :data:`VACUUM_TILE_SHARE` there is skipped, and in the others those pixels
    are set to the tile's mean of the rest (a flake's edge across a tile adds its streak to the
    tile's spectrum).

    Examples
    --------
    >>> from stemfast.synthetic import make_mos2
    >>> from stemfast.braggring import metal_reciprocal_lattice
    >>> s = make_mos2(shape=(256, 256), rotation_deg=10.0, seed=0)
    >>> ring = metal_reciprocal_lattice(s.image)
    >>> len(find_orientations(s.image, ring.g))
    1
    """
    s = settings or GrainSettings()
    img = np.asarray(image, dtype=np.float32)
    g_ring = np.asarray(g_ring, dtype=np.float64)
    f_ring = float(np.mean(np.hypot(*g_ring.T)))
    found = []  # (angle, prominence, g)
    for y0, x0, th, tw in _tiles(img.shape, tile_size(site_spacing(g_ring), s), int(s.max_tiles)):
        tile = img[y0:y0 + th, x0:x0 + tw]
        if exclude is not None:
            out = exclude[y0:y0 + th, x0:x0 + tw]
            if out.mean() > VACUUM_TILE_SHARE:
                continue
            if out.any():
                tile = np.where(out, tile[~out].mean(), tile).astype(np.float32)
        found += _tile_orientations(tile, f_ring, s)
    # strongest first: a hexagon at least the minimum misorientation from every orientation so far
    # is a new one; the others join the nearest (a tile across a boundary, or rotation strain,
    # gives angles in between)
    found.sort(key=lambda t: -t[1])
    groups: list[list] = []
    for t in found:
        d = [_dist60(t[0], grp[0][0]) for grp in groups]
        if not groups or min(d) >= s.min_misorientation_deg:
            groups.append([t])
        else:
            groups[int(np.argmin(d))].append(t)
    out = [Orientation(g=grp[0][2], angle_deg=float(grp[0][0]), prominence=float(grp[0][1]), n_tiles=len(grp))
           for grp in groups]
    out.sort(key=lambda o: -o.prominence)
    return out


def _filter_width(orientations: list[Orientation]) -> float:
    """Width (share of |g|) of the Bragg filters that keep the orientations apart: a third of the
    smallest distance between spots of two orientations, at most the phase map's usual 0.2."""
    if len(orientations) < 2:
        return 0.2
    angs = [o.angle_deg for o in orientations]
    dmin = min(_dist60(a, b) for i, a in enumerate(angs) for b in angs[i + 1:])
    return float(np.clip(2.0 * np.sin(np.radians(dmin) / 2.0) / 3.0, 0.05, 0.2))


@dataclass(frozen=True)
class GrainMap:
    """Which grain each part of the image belongs to.

    ``labels`` [h, w] grain id on a grid ``factor`` times coarser than the image (block ``(i, j)``
    covers pixels ``[i f, (i + 1) f)``); ``orientation`` [n] the index into ``orientations`` of each
    grain; ``area_px`` [n] grain areas; ``width`` the Bragg filter width used (share of |g|).
    """

    labels: np.ndarray
    factor: int
    orientations: list
    orientation: np.ndarray
    area_px: np.ndarray
    width: float

    @property
    def n_grains(self) -> int:
        return len(self.orientation)

    def __call__(self, xy: np.ndarray) -> np.ndarray:
        """Grain id of points ``xy`` [N, 2] (x, y)."""
        ij = np.floor(np.asarray(xy, dtype=np.float64).reshape(-1, 2)[:, ::-1] / self.factor).astype(np.int64)
        ij = np.clip(ij, 0, np.array(self.labels.shape) - 1)
        return self.labels[ij[:, 0], ij[:, 1]]

    def boundary_distance(self, xy: np.ndarray) -> np.ndarray:
        """Distance (px) of points ``xy`` [N, 2] to the nearest part of another grain (inf with one grain)."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        out = np.full(len(xy), np.inf)
        lab = self(xy)
        for k in range(self.n_grains):
            m = lab == k
            if not m.any() or (self.labels == k).all():
                continue
            d = ndimage.distance_transform_edt(self.labels == k) * self.factor
            ij = np.clip(np.floor(xy[m, ::-1] / self.factor).astype(np.int64), 0, np.array(self.labels.shape) - 1)
            # block-centre distance to the first block outside, less half a block
            out[m] = np.maximum(d[ij[:, 0], ij[:, 1]] - 0.5 * self.factor, 0.0)
        return out


#: a grain's Bragg amplitude (median over it) is at least this share of the strongest grain's
MIN_GRAIN_AMPLITUDE = 0.3


def grain_map(image: np.ndarray, orientations: list[Orientation], *, spacing: float,
              settings: GrainSettings | None = None) -> GrainMap | None:
    """Segment the image by the orientation whose Bragg-filtered amplitude dominates locally.

    For each orientation the image is Bragg filtered around its three first-ring spots (Gaussian
    of ``width * |g|``, :func:`_filter_width`) and the amplitudes summed; each block of the label
    grid (a third of a spacing) goes to the orientation with the largest amplitude; connected
    regions of one orientation are grains, and regions smaller than
    ``settings.min_grain_area_nn2`` square spacings join the grain around them. ``None`` when
    fewer than two grains are left.
    """
    s = settings or GrainSettings()
    if len(orientations) < 2:
        return None
    img = np.asarray(image, dtype=np.float32)
    H, W = img.shape
    width = _filter_width(orientations)
    gs = [_reciprocal_set(o.g) for o in orientations]
    f, F, (hs, ws) = _block_spectrum(img, max(float(np.hypot(*g.T).max()) for g in gs) * (1 + 4 * width))
    sigma_f = width * float(np.mean([np.hypot(*g.T).mean() for g in gs]))
    lf = max(1, int(spacing / 3))  # the label grid: as the film mask's
    hl, wl = max(1, H // lf), max(1, W // lf)
    yc = np.arange(hl) * lf + (lf - 1) / 2.0
    xc = np.arange(wl) * lf + (lf - 1) / 2.0
    amps = []
    for g in gs:
        a = None
        for gk in g:
            D, step = _demodulate(F, hs, ws, gk * f, sigma_f * f)
            a = np.abs(D) if a is None else a + np.abs(D)
        # coarse cell (i, j) sits at block-image (i step_y, j step_x), i.e. px f (.) + (f - 1) / 2
        cy = (yc - (f - 1) / 2.0) / (step[0] * f)
        cx = (xc - (f - 1) / 2.0) / (step[1] * f)
        Y, X = np.meshgrid(cy, cx, indexing="ij")
        amps.append(ndimage.map_coordinates(a, [Y, X], order=1, mode="nearest"))
    amps = np.stack(amps)
    best = np.argmax(amps, axis=0)
    min_blocks = max(1, int(np.ceil(s.min_grain_area_nn2 * spacing ** 2 / lf ** 2)))
    labels = np.full((hl, wl), -1, np.int64)
    comps = []  # (area in blocks, orientation, mask)
    for k in range(len(orientations)):
        lab, n = ndimage.label(best == k)
        if n == 0:
            continue
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        for c in np.flatnonzero(sizes[1:] >= min_blocks) + 1:
            m = lab == c
            comps.append((int(sizes[c]), k, m, float(np.median(amps[k][m]))))
    if not comps:
        return None
    # a grain shows its lattice: a region won by an orientation where no lattice stands out (a hole,
    # contamination) is not a grain
    strong = max(c[3] for c in comps)
    comps = [c for c in comps if c[3] >= MIN_GRAIN_AMPLITUDE * strong]
    if len(comps) < 2:
        return None
    comps.sort(key=lambda c: -c[0])
    for gid, (_, _, m, _) in enumerate(comps):
        labels[m] = gid
    # small regions join the nearest grain
    if (labels < 0).any():
        _, (iy, ix) = ndimage.distance_transform_edt(labels < 0, return_indices=True)
        labels = labels[iy, ix]
    orient = np.array([c[1] for c in comps], np.int64)
    area = np.bincount(labels.ravel(), minlength=len(comps)).astype(np.float64) * lf * lf
    log.info("%d grains of %d orientations (filter width %.3f |g|)", len(comps), len(set(orient.tolist())), width)
    return GrainMap(labels=labels, factor=lf, orientations=list(orientations), orientation=orient, area_px=area,
                    width=width)


@dataclass(frozen=True)
class GrainIndex(SiteIndex):
    """:class:`~stemfast.sitelattice.SiteIndex` of a polycrystal: ``ij`` count within each grain;
    ``grain`` [N] the grain id of each site; ``boundary`` [N] True within the boundary distance of
    another grain; ``pmaps`` the phase map of each grain; ``gmap`` the :class:`GrainMap`."""

    grain: np.ndarray = None
    boundary: np.ndarray = None
    pmaps: tuple = ()
    gmap: GrainMap | None = None


class _GridMask:
    """A bool grid ``factor`` times coarser than the image, looked up like a film mask."""

    def __init__(self, mask: np.ndarray, factor: int) -> None:
        self.mask = mask
        self.factor = factor


def _block_centres(shape: tuple[int, int], f: int) -> np.ndarray:
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx.ravel() * f + (f - 1) / 2.0, yy.ravel() * f + (f - 1) / 2.0], 1)


def grain_phase_maps(image: np.ndarray, gmap: GrainMap) -> list[PhaseMap]:
    """The phase map of each grain of ``gmap``: its orientation's Bragg spots (one phase map per
    orientation, filter width ``gmap.width``), the amplitude relative to its median in the grain."""
    import copy

    by_orient: dict[int, PhaseMap] = {}
    out = []
    for k in range(gmap.n_grains):
        o = int(gmap.orientation[k])
        if o not in by_orient:
            by_orient[o] = PhaseMap(image, gmap.orientations[o].g, width=gmap.width)
        pm = copy.copy(by_orient[o])
        gy, gx = pm.amp.shape
        at = np.stack(np.meshgrid(np.arange(gx) * pm.step[1] + pm.origin, np.arange(gy) * pm.step[0] + pm.origin,
                                  indexing="xy"), -1).reshape(-1, 2)
        in_k = (gmap(at) == k).reshape(pm.amp.shape)
        med = float(np.median(pm.amp[in_k])) if in_k.any() else 0.0
        if med > 0:
            pm.amp = pm.amp / med
        _refit_plane(pm, in_k)
        out.append(pm)
    return out


def _refit_plane(pm: PhaseMap, in_grain: np.ndarray) -> None:
    """Refine ``pm.g`` from the phase inside one grain (``in_grain``, bool on the phase grid, less one
    cell along its boundary and the image edge), weighted by the amplitude; the plane moves from the
    phase into ``g``, so ``pm.coords`` is unchanged.

    The phase map's own refinement fits the plane over the whole image, where the other grains'
    phase is noise: on a 512 px image with two grains 27 degrees apart that gave a site spacing 2%
    too large for one grain (15.53 px for 15.20) and its angle 0.8 degrees off, which shifts every
    node predicted beyond the last columns (the image edge) by a px outwards.
    """
    m = ndimage.binary_erosion(in_grain, iterations=1)
    if m.sum() < 6:
        m = in_grain
    h, w = pm.amp.shape
    wgt = np.clip(pm.amp, 0, None) * m
    if min(h, w) > 6:
        wgt[:1], wgt[-1:], wgt[:, :1], wgt[:, -1:] = 0, 0, 0, 0
    if not (wgt > 0).sum() >= 6:
        return
    yy, xx = np.mgrid[0:h, 0:w]
    yy, xx = yy * pm.step[0] + pm.origin, xx * pm.step[1] + pm.origin
    X = np.stack([np.ones(h * w), xx.ravel(), yy.ravel()], 1)
    sw = np.sqrt(wgt.ravel())[:, None]
    g = pm.g.copy()
    phase = pm.phase.copy()
    for c in range(2):
        coef, *_ = np.linalg.lstsq(X * sw, phase[c].ravel() * sw[:, 0], rcond=None)
        g[c] += coef[1:] / (2 * np.pi)
        phase[c] -= coef[1] * xx + coef[2] * yy
    pm.g, pm.phase = g, phase


def index_grains(peak_xy: np.ndarray, peak_value: np.ndarray, gmap: GrainMap, pmaps: list[PhaseMap], *,
                 shape: tuple[int, int], spacing: float, film=None, peak_var: np.ndarray | None = None,
                 settings: GrainSettings | None = None, **index_kw) -> GrainIndex:
    """:func:`~stemfast.sitelattice.index_sites` in every grain of ``gmap``, merged.

    Each grain, with its own phase map (``pmaps``, :func:`grain_phase_maps`), indexes the peaks
    in it and within one spacing of it; its fill-in stays inside the grain
    (and the film). A peak claimed by several grains goes to the grain it lies in when that grain
    has it on a node, else to the grain that has it on a node; it is off the lattice when no grain
    has it on a node and its own grain reports it. A predicted node within half a spacing of a site
    of another grain is dropped, unless both lie in their own grain and further apart than ``tol``
    spacings. ``index_kw`` are passed on (``tol``, ``off_strength``,
    ``margin_px``, ``fill``, ``fit_radius``, ...).
    """
    s = settings or GrainSettings()
    peak_xy = np.asarray(peak_xy, dtype=np.float64).reshape(-1, 2)
    peak_value = np.asarray(peak_value, dtype=np.float64).reshape(-1)
    n_pk = len(peak_xy)
    own = gmap(peak_xy)
    parts = _index_each_grain(peak_xy, peak_value, gmap, pmaps, own, shape=shape, spacing=spacing, film=film,
                              peak_var=peak_var, **index_kw)
    keep_row = _assign_peaks(parts, own, n_pk)
    out, n_merged = _merge_grains(parts, keep_row)
    keep = ~_boundary_duplicates(out, gmap, spacing, float(index_kw.get("tol", 0.3)))
    out = {name: v[keep] for name, v in out.items()}
    strong = peak_value >= np.median(peak_value) if n_pk else np.zeros(0, bool)
    on = np.zeros(n_pk, bool)
    on[out["peak"][(out["kind"] == 0)]] = True
    on_node = float(on[strong].mean()) if strong.any() else 0.0
    n_noise = int(n_pk - (out["peak"] >= 0).sum() - n_merged)
    boundary = gmap.boundary_distance(out["xy"]) <= s.boundary_nn * spacing
    return GrainIndex(xy=out["xy"], ij=out["ij"].astype(np.int64), peak=out["peak"].astype(np.int64),
                      kind=out["kind"].astype(np.int8), cls=out["cls"].astype(np.int64), basis=out["basis"],
                      rms=out["rms"], n_merged=int(n_merged), n_noise=max(0, n_noise), on_node=on_node,
                      grain=out["grain"], boundary=boundary, pmaps=tuple(pmaps), gmap=gmap)


def _index_each_grain(peak_xy, peak_value, gmap: GrainMap, pmaps, own, *, shape, spacing, film, peak_var,
                      **index_kw) -> list:
    """``(grain, selected peaks, SiteIndex or None)`` per grain: each grain indexes the peaks in it
    and within a spacing of it with its own phase map; its fill-in stays in the grain and the film."""
    lab = gmap.labels
    lf = gmap.factor
    if film is None:
        film_grid = np.ones(lab.shape, bool)
    else:
        from .sitelattice import _on_film
        film_grid = _on_film(film, _block_centres(lab.shape, lf)).reshape(lab.shape)
    parts = []
    for k in range(gmap.n_grains):
        pm = pmaps[k]
        # the peaks in the grain and within a spacing of it
        near = ndimage.distance_transform_edt(lab != k) * lf <= spacing + 0.5 * lf
        ij = np.clip(np.floor(peak_xy[:, ::-1] / lf).astype(np.int64), 0, np.array(lab.shape) - 1)
        sel = np.flatnonzero(near[ij[:, 0], ij[:, 1]] | (own == k))
        if len(sel) < 8:
            parts.append((k, sel, None))
            continue
        idx = index_sites(peak_xy[sel], peak_value[sel], pm, shape=shape, spacing=spacing,
                          film=_GridMask((lab == k) & film_grid, lf),
                          peak_var=None if peak_var is None else np.asarray(peak_var)[sel], **index_kw)
        parts.append((k, sel, idx))
    return parts


def _assign_peaks(parts: list, own: np.ndarray, n_pk: int) -> dict:
    """Which rows of each grain's index stay: every prediction, and each peak once -- to the grain it
    lies in when that grain has it on a node, else to a grain that has it on a node; off the
    lattice when no grain has it on a node and its own grain reports it."""
    node_of = [dict() for _ in range(n_pk)]  # grain -> row in that grain's index
    off_of = np.full(n_pk, -1)
    for k, sel, idx in parts:
        if idx is None:
            continue
        rows = np.flatnonzero(idx.peak >= 0)
        gp = sel[idx.peak[rows]]
        for r, p, kd in zip(rows, gp, idx.kind[rows]):
            if kd == 0:
                node_of[p][k] = r
            elif kd == 2 and own[p] == k:
                off_of[p] = r
    keep_row = {k: np.zeros(0 if idx is None else len(idx.xy), bool) for k, _, idx in parts}
    for k, sel, idx in parts:
        if idx is not None:
            keep_row[k][idx.kind == 1] = True
    for p in range(n_pk):
        claims = node_of[p]
        if claims:
            k = int(own[p]) if own[p] in claims else min(claims)
            keep_row[k][claims[k]] = True
        elif off_of[p] >= 0:
            keep_row[int(own[p])][off_of[p]] = True
    return keep_row


def _merge_grains(parts: list, keep_row: dict) -> tuple[dict, int]:
    """The kept rows of all grains' indexes as one set of arrays (peaks numbered globally), and the
    number of merged peak pairs."""
    cat = {name: [] for name in ("xy", "ij", "peak", "kind", "cls", "basis", "rms", "grain")}
    n_merged = 0
    for k, sel, idx in parts:
        if idx is None:
            continue
        m = keep_row[k]
        cat["xy"].append(idx.xy[m])
        cat["ij"].append(idx.ij[m])
        cat["peak"].append(np.where(idx.peak[m] >= 0, sel[np.clip(idx.peak[m], 0, None)], -1))
        cat["kind"].append(idx.kind[m])
        cat["cls"].append(idx.cls[m])
        cat["basis"].append(idx.basis[m])
        cat["rms"].append(idx.rms[m])
        cat["grain"].append(np.full(int(m.sum()), k, np.int64))
        n_merged += idx.n_merged
    return {name: np.concatenate(v) if v else np.zeros(0) for name, v in cat.items()}, n_merged


def _boundary_duplicates(out: dict, gmap: GrainMap, spacing: float, tol: float) -> np.ndarray:
    """Rows to drop: a predicted node within half a spacing of a site of another grain is not a
    column of its own -- unless both lie in their own grain and further apart than ``tol`` spacings."""
    xy, kind, grain = out["xy"], out["kind"], out["grain"]
    drop = np.zeros(len(xy), bool)
    if len(xy):
        tree = cKDTree(xy)
        home = gmap(xy) == grain  # each site in its own grain's region
        for i, j in tree.query_pairs(0.5 * spacing, output_type="ndarray"):
            if grain[i] == grain[j] or (kind[i] != 1 and kind[j] != 1):
                continue
            # two columns of two lattices meeting at the boundary, each on its own side, stay
            if home[i] and home[j] and np.hypot(*(xy[i] - xy[j])) > tol * spacing:
                continue
            # a column (peak) beats a prediction; of two predictions the larger grain's (lower id) stays
            if kind[i] != 1 or (kind[j] == 1 and grain[i] < grain[j]):
                drop[j] = True
            else:
                drop[i] = True
    return drop


def peak_orientations(peak_xy: np.ndarray, spacing: float, *, settings: GrainSettings | None = None
                      ) -> list[float]:
    """Orientations (degrees modulo 60, strongest first) that groups of columns show locally.

    Every pair of peaks one site spacing apart gives the site lattice's angle, every pair
    ``sqrt(3)`` spacings apart (metal-metal, also when the chalcogen columns are too faint) that
    angle plus 30 degrees; their six-fold mean over the peaks within two spacings is each peak's
    local orientation. An orientation is a mode of the histogram of those (weighted by how well the
    bonds agree) held by at least ``min_grain_area_nn2`` square spacings worth of columns, at least
    ``min_misorientation_deg`` from every stronger one. Unlike a power spectrum this does not mind
    boundaries cutting through it, so it finds small grains at an image's edge.

    Examples
    --------
    >>> from stemfast.synthetic import make_lattice
    >>> _, xy = make_lattice((200, 200), spacing=10.0, rotation_deg=12.0, seed=0)
    >>> [round(a) for a in peak_orientations(xy, 10.0)]
    [12]
    """
    s = settings or GrainSettings()
    xy = np.asarray(peak_xy, dtype=np.float64).reshape(-1, 2)
    n = len(xy)
    if n < 16:
        return []
    tree = cKDTree(xy)
    pairs = tree.query_pairs(2.0 * spacing, output_type="ndarray")
    if len(pairs) == 0:
        return []
    d = xy[pairs[:, 1]] - xy[pairs[:, 0]]
    L = np.hypot(d[:, 0], d[:, 1]) / spacing
    phi = np.arctan2(d[:, 1], d[:, 0])
    site = np.abs(L - 1.0) < 0.2
    metal = np.abs(L / np.sqrt(3.0) - 1.0) < 0.12
    use = site | metal
    theta = np.where(metal, phi - np.pi / 6, phi)[use]
    z = np.exp(6j * theta)
    Z = np.zeros(n, complex)
    cnt = np.zeros(n)
    for col in (0, 1):
        np.add.at(Z, pairs[use, col], z)
        np.add.at(cnt, pairs[use, col], 1.0)
    # over the peaks within two spacings (the pairs above), the peak's own bonds weighted twice
    Zs = 2.0 * Z + _pair_sums(pairs, Z.real, n) + 1j * _pair_sums(pairs, Z.imag, n)
    Cs = 2.0 * cnt + _pair_sums(pairs, cnt, n)
    ok = Cs > 0
    coh = np.zeros(n)
    coh[ok] = np.abs(Zs[ok]) / Cs[ok]
    ang = np.degrees(np.angle(Zs)) / 6.0 % 60.0
    w = np.where(coh > 0.5, coh, 0.0)
    hist = np.bincount(np.floor(ang).astype(np.int64) % 60, weights=w, minlength=60)
    hs = ndimage.gaussian_filter1d(hist, 1.5, mode="wrap")
    # columns per square spacing: about 2 / sqrt(3) sites, of which the peaks are a share
    density = n / max(1.0, float(np.ptp(xy[:, 0]) * np.ptp(xy[:, 1]))) * spacing ** 2
    need = 0.5 * s.min_grain_area_nn2 * density
    out: list[float] = []
    cand = np.flatnonzero((hs >= np.roll(hs, 1)) & (hs >= np.roll(hs, -1)))
    for b in cand[np.argsort(-hs[cand])]:
        # the mode's angle and the weight within half the minimum misorientation of it
        sel = (_dist60(ang, b + 0.5) <= s.min_misorientation_deg / 2) & (w > 0)
        if w[sel].sum() < need:
            continue
        a = float(np.degrees(np.angle((w[sel] * np.exp(6j * np.radians(ang[sel]))).sum())) / 6.0 % 60.0)
        if all(_dist60(a, o) >= s.min_misorientation_deg for o in out):
            out.append(a)
    return out


def _pair_sums(pairs: np.ndarray, v: np.ndarray, n: int) -> np.ndarray:
    """Per point, the sum of ``v`` over its partners in ``pairs`` [M, 2] (each pair counted both ways)."""
    return (np.bincount(pairs[:, 0], weights=v[pairs[:, 1]], minlength=n)
            + np.bincount(pairs[:, 1], weights=v[pairs[:, 0]], minlength=n))


def _rotated(g: np.ndarray, deg: float) -> np.ndarray:
    t = np.radians(deg)
    R = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return np.asarray(g, dtype=np.float64) @ R.T


def find_grains(image: np.ndarray, g_ring: np.ndarray, *, spacing: float, peak_xy: np.ndarray | None = None,
                settings: GrainSettings | None = None, exclude: np.ndarray | None = None) -> GrainMap | None:
    """The grains of the image, or ``None`` for a single crystal (one orientation, or one grain
    left after segmentation) or when switched off.

    The orientations are those of the Bragg spots (:func:`find_orientations`) and, with
    ``peak_xy``, those the columns show locally (:func:`peak_orientations`; the reciprocal vectors
    of such an orientation are the ring's turned to it, refined later by its phase map; where no tile
    shows a hexagon, the columns' orientations alone); the image is then segmented by them
    (:func:`grain_map`), which keeps only orientations that hold a grain.
    ``exclude``: optional bool array of the image's shape, True where there is no film (dark vacuum):
    left out of the orientation search (:func:`find_orientations`; its peaks are noise maxima).
    """
    s = settings or GrainSettings()
    if not s.enabled:
        return None
    if np.ndim(image) != 2:
        raise ValueError(f"find_grains needs a 2-D image, got shape {np.shape(image)}")
    if not (np.isfinite(spacing) and spacing > 0):
        raise ValueError(f"spacing must be a positive number of px, got {spacing!r}")
    orients = find_orientations(image, g_ring, settings=s, exclude=exclude)
    if peak_xy is not None and exclude is not None and len(peak_xy):
        H, W = exclude.shape
        ij = np.rint(np.asarray(peak_xy, np.float64)[:, ::-1]).astype(np.int64)
        peak_xy = peak_xy[~exclude[np.clip(ij[:, 0], 0, H - 1), np.clip(ij[:, 1], 0, W - 1)]]
    if peak_xy is not None:
        # where no tile shows a hexagon (one tile of a small image across a boundary: its ring holds
        # both grains' twelve spots), the orientations are the columns' alone, turned from the ring's
        ref = orients[0] if orients else Orientation(g=np.asarray(g_ring, np.float64),
                                                     angle_deg=_spot_angle(ring_spots(g_ring)), prominence=0.0,
                                                     n_tiles=0)
        for a in peak_orientations(peak_xy, spacing, settings=s):
            if all(_dist60(a, o.angle_deg) >= s.min_misorientation_deg for o in orients):
                d = (a - ref.angle_deg + 30.0) % 60.0 - 30.0
                orients.append(Orientation(g=_rotated(ref.g, d), angle_deg=a, prominence=0.0, n_tiles=0))
    if len(orients) < 2:
        return None
    return grain_map(image, orients, spacing=spacing, settings=s)


def by_grain(grain: np.ndarray, fn, *arrays):
    """``fn(*arrays)`` per grain, results put back in site order (arrays, or dicts of arrays).

    Examples
    --------
    >>> by_grain(np.array([0, 1, 0]), lambda v: v - v.mean(), np.array([1.0, 5.0, 3.0])).tolist()
    [-1.0, 0.0, 1.0]
    """
    grain = np.asarray(grain)
    res = None
    for k in np.unique(grain):
        m = grain == k
        r = fn(*(np.asarray(a)[m] for a in arrays))
        if res is None:
            res = ({key: np.empty(len(grain), np.asarray(v).dtype) for key, v in r.items()} if isinstance(r, dict)
                   else np.empty(len(grain), np.asarray(r).dtype))
        if isinstance(r, dict):
            for key, v in r.items():
                res[key][m] = v
        else:
            res[m] = r
    return res


def grain_summary(idx: GrainIndex, *, pixel_size: float | None = None, unit_to_nm: float = 1.0) -> list[dict]:
    """One dict per grain: ``id``, ``angle_deg`` (the site lattice's first vector from +x, modulo
    60), ``misorientation_deg`` (against grain 0, the largest), ``spacing_px``, ``anisotropy``
    (:func:`~stemfast.sitelattice.lattice_distortion`), ``area_px``,
    ``area_fraction`` (of the image), ``centroid_xy`` (px), ``n_sites`` (nodes), ``n_peaks``,
    ``n_lattice``, ``n_off_lattice``, ``n_boundary`` (sites flagged ``grain_boundary``); ``area_nm2``
    when calibrated."""
    gmap = idx.gmap
    total = float(gmap.labels.size * gmap.factor ** 2)
    out = []
    angle0 = None
    for k in range(gmap.n_grains):
        g = idx.pmaps[k].g
        S = SITE_FROM_METAL @ np.linalg.inv(g).T
        angle = float(np.degrees(np.arctan2(S[0, 1], S[0, 0])) % 60.0)
        angle0 = angle if angle0 is None else angle0
        m = idx.grain == k
        yy, xx = np.nonzero(gmap.labels == k)
        d = {
            "id": k,
            "angle_deg": round(angle, 3),
            "misorientation_deg": round(float(_dist60(angle, angle0)), 3),
            "spacing_px": round(site_spacing(g), 4),
            "anisotropy": round(lattice_distortion(g)["anisotropy"], 4),
            "area_px": float(gmap.area_px[k]),
            "area_fraction": round(float(gmap.area_px[k]) / total, 4),
            "centroid_xy": [round(float(xx.mean() * gmap.factor + (gmap.factor - 1) / 2), 1),
                            round(float(yy.mean() * gmap.factor + (gmap.factor - 1) / 2), 1)] if len(xx) else None,
            "n_sites": int((m & (idx.kind != 2)).sum()),
            "n_peaks": int((m & (idx.kind == 0)).sum()),
            "n_lattice": int((m & (idx.kind == 1)).sum()),
            "n_off_lattice": int((m & (idx.kind == 2)).sum()),
            "n_boundary": int((m & idx.boundary).sum()),
        }
        if pixel_size:
            d["area_nm2"] = round(float(gmap.area_px[k]) * (pixel_size * unit_to_nm) ** 2, 3)
        out.append(d)
    return out


def grain_orientations(grains: list[dict]) -> str:
    """The orientation and share of the image of each grain of :func:`grain_summary`, e.g.
    ``"35.0 deg (50%), 8.0 deg (50%)"``.

    >>> grain_orientations([{"angle_deg": 35.0, "area_fraction": 0.5}, {"angle_deg": 8.04, "area_fraction": 0.5}])
    '35.0 deg (50%), 8.0 deg (50%)'
    """
    return ", ".join(f"{float(g['angle_deg']):.1f} deg ({100 * float(g['area_fraction']):.0f}%)" for g in grains)


def polycrystal_warning(grains: list[dict]) -> str:
    """What :func:`warn_polycrystal` says of the grains of :func:`grain_summary` (``summary.json``'s
    ``lattice.grain_warning``)."""
    desc = grain_orientations(grains)
    nb = sum(g["n_boundary"] for g in grains)
    return (f"the image holds {len(grains)} grains of different orientation ({desc}): each has its own site "
            f"lattice; {nb} sites along the grain boundaries are marked (column grain_boundary)")


def warn_polycrystal(grains: list[dict], *, stacklevel: int = 2) -> str:
    """Say that the image holds several grains (:class:`PolycrystalWarning`, :func:`polycrystal_warning`);
    returns the text."""
    text = polycrystal_warning(grains)
    warnings.warn(text, PolycrystalWarning, stacklevel=stacklevel + 1)
    return text
