"""The site lattice of a 2H monolayer, from the image's Fourier transform, and one site per node.

A 2H monolayer (MoS2, WSe2, ...) has its metal, chalcogen-pair and hollow sites on **one**
triangular lattice of spacing ``a / sqrt(3)``; the metal sites alone form the triangular lattice
of spacing ``a``. Whatever columns stand out in an image (on noisy data often only the metal), the
metal lattice shows as the first ring of Bragg spots of the power spectrum (the ``{100}`` spots at
``d = a sqrt(3) / 2``; site spacing ``2 d / 3``). This module

1. finds that ring (:func:`metal_reciprocal_lattice`): the six spots, the reciprocal vectors
   ``g1, g2`` (120 degrees apart, so that the real-space metal vectors are 60 degrees apart) and
   how far the spots stand out;
2. follows the lattice over the image by geometric phase analysis (:class:`PhaseMap`): the phase of
   each Bragg-filtered ``g`` gives continuous metal-lattice coordinates ``U(r) = g . r + phi(r) /
   2 pi`` that follow strain, rotation and scan distortion on a scale of about one unit cell;
3. indexes every found peak to its node of the site lattice (integer indices ``(p, q)``: site
   lattice vectors ``s1 = (A1 + A2) / 3``, ``s2 = (2 A2 - A1) / 3``), keeps at most one peak per
   node, predicts the position of every node without a peak from its neighbours, and reports peaks
   on no node as ``off_lattice`` (:func:`index_sites`).

The three sublattices are the classes ``(p - q) mod 3`` (metal nodes: integer ``U``); which class
is the metal, which the chalcogen and which the hollow is read from the image (brightest, middle,
darkest), not assumed.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import fft as sfft
from scipy import ndimage

from .lattice import nearest_indices

__all__ = ["FftLattice", "metal_reciprocal_lattice", "PhaseMap", "SiteIndex", "index_sites",
           "SITE_FROM_METAL", "site_spacing", "pixel_noise", "position_variance", "lattice_distortion",
           "border_distance"]

log = logging.getLogger(__name__)

#: site-lattice vectors in units of the metal vectors (rows: s1 = (A1 + A2) / 3, s2 = (2 A2 - A1) / 3)
SITE_FROM_METAL = np.array([[1.0, 1.0], [-1.0, 2.0]]) / 3.0

#: the 18 site-lattice offsets (p, q) within two spacings of a node (first three shells), and (0, 0)
_SHELLS = np.array([(dp, dq) for dp in range(-2, 3) for dq in range(-2, 3)
                    if 0 < dp * dp + dq * dq + dp * dq <= 4], dtype=np.int64)
_FIRST = np.array([[1, 0], [0, 1], [-1, 1], [-1, 0], [0, -1], [1, -1]], dtype=np.int64)


@dataclass(frozen=True)
class FftLattice:
    """The metal lattice's first Bragg ring.

    ``g`` [2, 2]: rows g1, g2 in cycles / px (x, y), 120 degrees apart; ``prominence``: median over
    the six spots of the spot power over the median power of its ring (>> 1 for a lattice);
    ``spacing`` the site spacing it implies (px); ``note`` which reflection family was picked first
    and what it was re-read as (for the log); ``coarser_spacing`` (a ring picked by a given spacing
    only): the site spacing of the coarser lattice whose spots lie inside it, if any.
    """

    g: np.ndarray
    prominence: float
    spacing: float
    note: str = ""
    coarser_spacing: float | None = None

    def second_order_reread(self) -> "FftLattice":
        """This ring re-read as the ``{110}`` family of a ring ``sqrt(3)`` nearer the centre (turned by
        30 degrees): that ring's lattice, whose site spacing is ``sqrt(3)`` times this one's."""
        g = _first_ring_of_second(self.g)
        note = (self.note + " {110}->{100} (columns on one third of the nodes)").strip()
        return FftLattice(g=g, prominence=self.prominence, spacing=site_spacing(g), note=note)

    @property
    def metal_basis(self) -> np.ndarray:
        """Real-space metal lattice vectors (rows A1, A2; px), dual to ``g``."""
        return np.linalg.inv(self.g).T

    @property
    def site_basis(self) -> np.ndarray:
        """Real-space site lattice vectors (rows s1, s2; px)."""
        return SITE_FROM_METAL @ self.metal_basis


def _first_ring_of_second(g: np.ndarray) -> np.ndarray:
    """The ``{100}`` reciprocal vector(s) whose ``{110}`` ring ``g`` (a vector [2] or rows [K, 2],
    cycles / px) belongs to: each turned by +30 degrees and shortened by ``sqrt(3)``."""
    g = np.asarray(g, np.float64)
    c, s = np.cos(np.deg2rad(30.0)), np.sin(np.deg2rad(30.0))
    gx, gy = g[..., 0], g[..., 1]
    return np.stack([c * gx - s * gy, s * gx + c * gy], axis=-1) / np.sqrt(3.0)


#: side of the central crop whose power spectrum shows the Bragg ring (the phase map refines it)
SPECTRUM_CROP = 512


def _spectrum(img: np.ndarray, crop: int = SPECTRUM_CROP):
    """Windowed power spectrum (fftshifted, float64) of a central crop, and the crop size (h, w)."""
    H, W = img.shape
    if H > crop or W > crop:
        y0, x0 = max(0, (H - crop) // 2), max(0, (W - crop) // 2)
        img = img[y0:y0 + crop, x0:x0 + crop]
    img = np.asarray(img, dtype=np.float64)
    h, w = img.shape
    win = np.outer(np.hanning(h), np.hanning(w))
    P = np.abs(sfft.fftshift(sfft.fft2((img - img.mean()) * win, workers=-1))) ** 2
    return P, h, w


def _spot_power(Pw: np.ndarray, h: int, w: int, g: np.ndarray, r: float = 1.5):
    """Max of the (whitened) spectrum within ``r`` bins of each reciprocal vector ``g`` [K, 2]
    (cycles / px), and the refined spot positions (power-weighted centroid around that max)."""
    cy, cx = h // 2, w // 2
    out = np.zeros(len(g))
    pos = np.array(g, dtype=np.float64)
    rr = int(np.ceil(r)) + 1
    for k, (gx, gy) in enumerate(g):
        x, y = cx + gx * w, cy + gy * h
        x0, y0 = int(round(x)), int(round(y))
        if not (rr <= x0 < w - rr and rr <= y0 < h - rr):
            continue
        box = Pw[y0 - rr:y0 + rr + 1, x0 - rr:x0 + rr + 1]
        yy, xx = np.mgrid[-rr:rr + 1, -rr:rr + 1]
        near = (xx + x0 - x) ** 2 + (yy + y0 - y) ** 2 <= r * r
        b = np.where(near, box, -np.inf)
        iy, ix = np.unravel_index(int(np.argmax(b)), b.shape)
        out[k] = box[iy, ix]
        # centroid in a 3 x 3 around the max, above the box's median
        sy, sx = slice(max(0, iy - 1), iy + 2), slice(max(0, ix - 1), ix + 2)
        wgt = np.clip(box[sy, sx] - np.median(box), 0, None)
        if wgt.sum() > 0:
            py = (yy[sy, sx] * wgt).sum() / wgt.sum() + y0
            px = (xx[sy, sx] * wgt).sum() / wgt.sum() + x0
            pos[k] = [(px - cx) / w, (py - cy) / h]
    return out, pos


def _ring_reference(Pw: np.ndarray, h: int, w: int, f: float) -> float:
    """Median whitened power in an annulus of radius ``f`` (cycles / px), width ~3 bins."""
    r = int(np.ceil((f + 2.0 / min(h, w)) * max(h, w))) + 1
    cy, cx = h // 2, w // 2
    sub = Pw[max(0, cy - r):cy + r + 1, max(0, cx - r):cx + r + 1]
    fy = (np.arange(sub.shape[0]) + max(0, cy - r) - cy)[:, None] / h
    fx = (np.arange(sub.shape[1]) + max(0, cx - r) - cx)[None, :] / w
    fr = np.sqrt(fx ** 2 + fy ** 2)
    Pw = sub
    band = np.abs(fr - f) <= 1.5 / min(h, w)
    return float(np.median(Pw[band])) if band.any() else float("inf")


#: the six spots of a ring as multiples of its reciprocal basis: spot k = m_k g1 + n_k g2 (g1, g2 120
#: degrees apart, so g1 + g2 lies between them)
_HEX_MN = np.array([[1, 0], [1, 1], [0, 1], [-1, 0], [-1, -1], [0, -1]], dtype=np.float64)


def _hexagon(g0: np.ndarray) -> np.ndarray:
    """The six vectors of a hexagonal ring through ``g0`` (angles + k 60 degrees)."""
    t = np.deg2rad(60.0 * np.arange(6))
    c, s = np.cos(t), np.sin(t)
    return np.stack([c * g0[0] - s * g0[1], s * g0[0] + c * g0[1]], 1)


#: spots of a Bragg ring are looked for within this share of the ring's radius of the ideal hexagon
#: (:func:`_ring_prominence`): scan distortion moves them (the shared MoS2 scans are 15-19 %
#: anisotropic); and, where that search finds a ring of another spacing, within the wider
#: :data:`SPOT_SEARCH_WIDE` (:func:`metal_reciprocal_lattice`)
SPOT_SEARCH = 0.08
#: a 0.85 y-scale copy of the real exp-000-2 (~35 % anisotropic in all) has its spots beyond 8 %: a
#: 3.2 px higher-order "lattice" won for the 9.7 px one. Other reflection families of a lattice lie at
#: least 0.58 ring radii from each spot
SPOT_SEARCH_WIDE = 0.2


def _ring_prominence(Pw, h, w, g0, search: float = SPOT_SEARCH):
    """Median over the hexagon of spots through ``g0`` of the spot power over its ring's median
    power, and the refined spot positions. Spots are looked for within ``search`` of the ring
    radius of the ideal hexagon (scan distortion makes real lattices anisotropic)."""
    spots = _hexagon(g0)
    p, pos = _spot_power(Pw, h, w, spots, r=max(1.5, search * float(np.hypot(g0[0] * w, g0[1] * h))))
    ref = _ring_reference(Pw, h, w, float(np.hypot(*g0)))
    return float(np.median(p) / ref) if ref > 0 else 0.0, pos


#: the three spot radii of a Bragg ring (its reciprocal vectors g1, g2, g1 + g2) differ by at most this
#: factor, else the six spots are no hexagon and there is no ring. Scan distortion of real scans gives
#: 1.01-1.10 (the shared and validation scans); a 48 px high strip of a 15 px lattice, whose ring lies
#: below the spectrum's lowest usable frequency, gave 1.95 and a 437 px "lattice" with sites outside
#: the image
MAX_RING_STRETCH = 1.5


def _reciprocal_set(g: np.ndarray) -> np.ndarray:
    """The three independent first-ring spots g1, g2, g1 + g2 of reciprocal vectors ``g`` (rows)."""
    return np.stack([g[0], g[1], g[0] + g[1]])


def _ring_radii(g: np.ndarray) -> np.ndarray:
    """The radii (cycles / px) of a ring's three spot pairs (:func:`_reciprocal_set`)."""
    return np.linalg.norm(_reciprocal_set(g), axis=1)


def metal_reciprocal_lattice(image: np.ndarray, *, spacing_hint: float | None = None,
                             min_prominence: float = 4.0) -> FftLattice | None:
    """The first Bragg ring of a 2H monolayer's metal lattice (``{100}``), or ``None`` when no ring
    stands out by ``min_prominence``.

    The strongest spot of the whitened spectrum (power times spatial frequency squared) belongs to
    some reflection family of the lattice; it is re-read as a lower-order family while one stands
    out at ``1 / sqrt(3)`` of its frequency turned by 30 degrees (``{110}`` -> ``{100}``) or at half
    its frequency (``{200}`` -> ``{100}``). With ``spacing_hint`` (the site spacing, px), the ring
    nearest to ``1 / (1.5 spacing_hint)`` of the hexagonal family is taken instead (its spots looked
    for within :data:`SPOT_SEARCH`, then :data:`SPOT_SEARCH_WIDE`; where neither finds a hexagon
    there, the search without a hint follows). Without it the
    search is made twice, with the spots looked for within :data:`SPOT_SEARCH` and
    :data:`SPOT_SEARCH_WIDE` of the ideal hexagon: where the two find rings of different spacings
    (over 10 % apart, a strongly distorted lattice), the one whose hexagon stands out more in the
    wider search is taken (no ring where the narrower search finds none). Last, strong spots
    inside the ring at rational points of its basis re-read it as a coarser lattice's
    (:func:`_inner_spots_reread`: a higher-order family taken under strong anisotropy).

    Examples
    --------
    >>> from stemfast.synthetic import make_mos2
    >>> s = make_mos2(shape=(256, 256), seed=0)
    >>> lat = metal_reciprocal_lattice(s.image)  # to the spectrum's resolution (a few %)
    >>> abs(lat.spacing / s.meta["nn_px"] - 1) < 0.05
    True
    >>> abs(site_spacing(PhaseMap(s.image, lat.g).g) / s.meta["nn_px"] - 1) < 0.01  # refined by the phases
    True
    """
    P, h, w = _spectrum(np.asarray(image), crop=SPECTRUM_CROP)
    fy = (np.arange(h) - h // 2)[:, None] / h
    fx = (np.arange(w) - w // 2)[None, :] / w
    f2 = fx ** 2 + fy ** 2
    Pw = ndimage.uniform_filter(P, 3) * f2  # whitened: 1/f^2 background flattened
    fmin = 6.0 / min(h, w)
    # a column spacing of 3 px puts the first ring at 1 / 4.5 cycles / px
    valid = (f2 > fmin ** 2) & (f2 < 0.3 ** 2)
    # the strongest local maxima of the spectrum; the one whose hexagon stands out most wins
    # (a single strong noise pixel near Nyquist has no hexagon)
    mx = (Pw == ndimage.maximum_filter(Pw, size=5)) & valid & (fy >= 0)
    idx = np.flatnonzero(mx)
    cand = idx[np.argsort(Pw.ravel()[idx])[::-1][:16]].tolist()
    if spacing_hint is not None:
        f_target = 1.0 / (1.5 * float(spacing_hint))
        band = valid & (np.abs(np.sqrt(f2) - f_target) <= max(2.0 / min(h, w), 0.08 * f_target))
        if band.any():
            hinted = [int(np.argmax(np.where(band, Pw, -np.inf)))]
            for search in (SPOT_SEARCH, SPOT_SEARCH_WIDE):
                ring = _pick_ring(Pw, h, w, hinted, fmin, min_prominence, True, "ring picked by the given spacing",
                                  search)
                if ring is not None:
                    # kept as given, but a coarser lattice's spots inside it are said (a spacing given
                    # sqrt(3) or 2x too small picks the {110} or {200} ring)
                    coarser = _inner_spots_reread(Pw, h, w, ring, cand, fmin, min_prominence)
                    if coarser is not ring:
                        ring = dataclasses.replace(ring, coarser_spacing=coarser.spacing)
                    return ring
        # no hexagon of spots at the given spacing (a strongly distorted scan): the image's own ring
        # below, never none where there is one (the caller says where it differs from the given one)
    narrow = _pick_ring(Pw, h, w, cand, fmin, min_prominence, False, "", SPOT_SEARCH)
    if narrow is None:  # the wider search only corrects a ring, it finds none where there is none
        return None
    ring = narrow
    wide = _pick_ring(Pw, h, w, cand, fmin, min_prominence, False, "", SPOT_SEARCH_WIDE)
    if wide is not None and abs(wide.spacing / narrow.spacing - 1) > 0.1:
        p_narrow, _ = _ring_prominence(Pw, h, w, narrow.g[0], SPOT_SEARCH_WIDE)
        if p_narrow < wide.prominence:
            ring = dataclasses.replace(wide, note=(wide.note + " (spots of a distorted lattice: wide search)").strip())
    return _inner_spots_reread(Pw, h, w, ring, cand, fmin, min_prominence)


#: a strong spot inside the ring is read as a reflection of a coarser lattice when its coordinates in
#: the ring's reciprocal basis are multiples of ``1 / D`` (``D`` up to this) within
#: :data:`INNER_SPOT_TOLERANCE`: a lattice taken from a higher-order family holds the true one's
#: reflections at such rational points, whatever the scan distortion (an affine map keeps them)
INNER_SPOT_MAX_INDEX = 8
INNER_SPOT_TOLERANCE = 0.03


def _integer_lattice_basis(rows: list) -> np.ndarray:
    """A basis [2, 2] (integer rows) of the lattice the integer 2-vectors ``rows`` generate (rank 2)."""
    rows = [tuple(int(v) for v in r) for r in rows]
    while sum(1 for r in rows if r[0] != 0) > 1:  # Euclid on the first coordinate
        k = min((i for i, r in enumerate(rows) if r[0] != 0), key=lambda i: abs(rows[i][0]))
        p = rows[k]
        rows = [r if (i == k or r[0] == 0) else (r[0] - (r[0] // p[0]) * p[0], r[1] - (r[0] // p[0]) * p[1])
                for i, r in enumerate(rows)]
    k = next(i for i, r in enumerate(rows) if r[0] != 0)
    g = 0
    for i, r in enumerate(rows):
        if i != k:
            g = math.gcd(g, abs(r[1]))
    return np.array([rows[k], (0, g)], dtype=np.float64)


def _hexagonal_basis(B: np.ndarray, like: np.ndarray) -> np.ndarray:
    """The shortest basis of the lattice with rows ``B`` (Lagrange reduction), its vectors 120
    degrees apart (obtuse) and of the handedness of ``like``."""
    b1, b2 = np.array(B[0], np.float64), np.array(B[1], np.float64)
    for _ in range(64):
        if b1 @ b1 > b2 @ b2:
            b1, b2 = b2, b1
        m = round(float(b1 @ b2) / float(b1 @ b1))
        if m == 0:
            break
        b2 = b2 - m * b1
    if b1 @ b2 > 0:
        b2 = b2 - b1
    if np.sign(np.linalg.det(np.stack([b1, b2]))) != np.sign(np.linalg.det(like)):
        b1, b2 = b2, b1
    return np.stack([b1, b2])


def _ring_of_basis(Pw, h, w, g: np.ndarray):
    """Prominence of the six spots ``mn @ g`` (a distorted hexagon): the *weakest* spot's power over
    the ring's median power at their mean radius -- every spot must stand out, not four of six as in
    :func:`_ring_prominence` (four spots of a rectangular modulation, a moire or a contamination
    texture, can pass for a distorted hexagon) -- and the refined spot positions."""
    spots = _HEX_MN @ g
    f = float(np.mean(np.hypot(spots[:, 0], spots[:, 1])))
    p, pos = _spot_power(Pw, h, w, spots, r=max(1.5, SPOT_SEARCH * f * max(h, w)))
    ref = _ring_reference(Pw, h, w, f)
    return (float(np.min(p) / ref) if ref > 0 else 0.0), pos


def _inner_spots_reread(Pw, h, w, ring: FftLattice, cand, fmin, min_prominence) -> FftLattice:
    """``ring`` re-read as the reflections of a coarser lattice while strong spots lie inside it.

    A ring taken from a higher-order family (under strong anisotropy the true first ring's spots lie
    too far off a regular hexagon for :func:`_ring_prominence`) leaves the true lattice's lower-order
    reflections inside it, at rational coordinates of its basis. Each strong local maximum of the
    spectrum inside the ring (``cand``) at such a point proposes the lattice that adds it; the
    proposal whose six first spots stand out most is taken when each of them stands out by
    ``min_prominence`` and by 5 % of the ring's prominence (the rule of the re-reads in
    :func:`_pick_ring`, on the weakest spot instead of the median one: :func:`_ring_of_basis`).
    Nothing inside the ring, as on any image whose first ring was found: the ring as it is.
    """
    note = ring.note
    g = ring.g
    prom = ring.prominence
    for _ in range(3):
        rmin = float(_ring_radii(g).min())
        ginv = np.linalg.inv(g)
        best = None
        for k in cand:
            iy, ix = np.unravel_index(k, Pw.shape)
            q = np.array([(ix - w // 2) / w, (iy - h // 2) / h])
            if not fmin <= float(np.hypot(*q)) <= 0.9 * rmin:
                continue
            c = q @ ginv
            for D in range(2, INNER_SPOT_MAX_INDEX + 1):
                m = np.round(c * D)
                if np.all(np.abs(c - m / D) <= INNER_SPOT_TOLERANCE):
                    break
            else:
                continue
            gn = _hexagonal_basis(_integer_lattice_basis([(D, 0), (0, D), tuple(m)]) @ g / D, g)
            radii = _ring_radii(gn)
            if radii.min() < fmin or radii.max() > MAX_RING_STRETCH * radii.min():
                continue
            pn, pos = _ring_of_basis(Pw, h, w, gn)
            if pn >= min_prominence and pn >= 0.05 * prom and (best is None or pn > best[0]):
                best = (pn, pos, D)
        if best is None:
            break
        prom, pos, D = best
        g, *_ = np.linalg.lstsq(_HEX_MN, pos, rcond=None)
        note = (note + f" (1/{D} spots inside the ring: a coarser lattice)").strip()
    if g is ring.g:
        return ring
    return FftLattice(g=g, prominence=float(prom), spacing=site_spacing(g), note=note)


def _pick_ring(Pw, h, w, cand, fmin, min_prominence, hinted: bool, note: str, search: float) -> FftLattice | None:
    """:func:`metal_reciprocal_lattice` from the candidate spots ``cand`` (flat indices into ``Pw``),
    its spots looked for within ``search`` of the ideal hexagon; ``hinted``: no re-reading."""
    best = None
    for k in cand:
        iy, ix = np.unravel_index(k, Pw.shape)
        gk = np.array([(ix - w // 2) / w, (iy - h // 2) / h])
        pk, posk = _ring_prominence(Pw, h, w, gk, search)
        if best is None or pk > best[1]:
            best = (gk, pk, posk)
    if best is None:
        return None
    g0, prom, pos = best
    if not hinted:
        for _ in range(3):  # re-read as a lower-order family while one stands out
            cands = [("{110}->{100}", _first_ring_of_second(g0)), ("{200}->{100}", g0 / 2.0)]
            moved = False
            for name, gc in cands:
                if np.hypot(*gc) < fmin:
                    continue
                pc, posc = _ring_prominence(Pw, h, w, gc, search)
                if pc >= min_prominence and pc >= 0.05 * prom:
                    g0, prom, pos, note = gc, pc, posc, (note + " " + name).strip()
                    moved = True
                    break
            if not moved:
                break
    if not prom >= min_prominence:
        return None
    # least-squares reciprocal basis from the six refined spots: spot k = m_k g1 + n_k g2
    # with g1 = spot 0 and g2 = spot 2 (120 degrees on)
    g, *_ = np.linalg.lstsq(_HEX_MN, pos, rcond=None)
    if np.linalg.det(np.linalg.inv(g).T) == 0:
        return None
    radii = _ring_radii(g)
    if radii.max() > MAX_RING_STRETCH * radii.min():  # six spots that are no hexagon (a strip's coarse spectrum)
        return None
    spacing = site_spacing(g)
    return FftLattice(g=g, prominence=float(prom), spacing=spacing, note=note)


def site_spacing(g: np.ndarray) -> float:
    """Mean length (px) of the three site-lattice bonds s1, s2, s2 - s1 of reciprocal metal vectors ``g``."""
    S = SITE_FROM_METAL @ np.linalg.inv(np.asarray(g, dtype=np.float64)).T
    return float(np.mean(np.hypot(*np.stack([S[0], S[1], S[1] - S[0]]).T)))



def _block_spectrum(img: np.ndarray, fmax: float) -> tuple[int, np.ndarray, tuple[int, int]]:
    """Block-average ``img`` by the largest factor ``f`` that keeps frequencies up to ``fmax``
    (cycles/px) well below Nyquist (at most ``min(H, W) // 64``); returns ``f``, the real FFT of the
    mean-removed small image and its shape (what the Bragg demodulations work on)."""
    H, W = img.shape
    f = max(1, int(0.2 / fmax)) if fmax > 0 else 1
    f = min(f, max(1, min(H, W) // 64))
    if f > 1:
        hb, wb = H // f, W // f
        small = img[:hb * f, :wb * f].reshape(hb, f, wb, f).mean(axis=(1, 3))
    else:
        small = img
    return f, sfft.rfft2(small - float(small.mean()), workers=-1), small.shape

class PhaseMap:
    """Continuous metal-lattice coordinates over the image by geometric phase analysis.

    For each reciprocal vector ``g_k`` the image's Fourier transform is cut out around ``g_k`` with
    a Gaussian of width ``width * |g_k|`` and transformed back on a coarse grid; the phase of that
    demodulated map, unwrapped, is ``phi_k(r)`` and ``U_k(r) = g_k . r + phi_k(r) / 2 pi`` is the
    local lattice coordinate (integer on the fringe maxima). ``amplitude`` is the Bragg amplitude
    relative to its median (low where there is no lattice).
    """

    def __init__(self, image: np.ndarray, g: np.ndarray, *, width: float = 0.2) -> None:
        from skimage.restoration import unwrap_phase

        img = np.asarray(image, dtype=np.float32)
        H, W = img.shape
        self.shape = (H, W)
        self.g = np.asarray(g, dtype=np.float64)
        # the demodulation needs frequencies up to |g| (1 + 4 width) only: block-average the image
        # by a factor that keeps them (and the column profile's weak higher orders) below Nyquist
        f, F, (hs, ws) = _block_spectrum(img, float(np.hypot(*self.g.T).max()) * (1 + 4 * width))
        phases, amps = [], []
        steps = None
        for gk in self.g:
            # in block units the vector is f times longer; the block (i, j) is centred at
            # f i + (f - 1) / 2 px: a phase offset, corrected below
            D, step = _demodulate(F, hs, ws, gk * f, width * float(np.hypot(*gk)) * f)
            D = D * np.exp(-2j * np.pi * (gk[0] + gk[1]) * (f - 1) / 2.0)
            step = (step[0] * f, step[1] * f)
            if steps is None:
                steps = step
            elif D.shape != phases[0].shape:  # same grid for both maps
                D = _resample(D, phases[0].shape)
            phases.append(unwrap_phase(np.angle(D)))
            amps.append(np.abs(D))
        self.step = steps  # (step_y, step_x) px per coarse cell
        self.origin = (f - 1) / 2.0  # px position of the coarse cell (0, 0)
        phase = np.stack(phases)  # [2, h, w]
        a = np.mean(amps, axis=0)
        med = float(np.median(a))
        self.amp = a / med if med > 0 else a
        # refine g: a plane fitted to each phase (weighted by the amplitude, edges left out) is a
        # correction of g; the phase keeps only what the plane does not explain
        h, w = phase.shape[1:]
        yy, xx = np.mgrid[0:h, 0:w]
        yy, xx = yy * self.step[0] + self.origin, xx * self.step[1] + self.origin
        wgt = np.clip(self.amp, 0, None).copy()
        e = 1 if min(h, w) > 6 else 0
        if e:
            wgt[:e], wgt[-e:], wgt[:, :e], wgt[:, -e:] = 0, 0, 0, 0
        X = np.stack([np.ones(h * w), xx.ravel(), yy.ravel()], 1)
        sw = np.sqrt(wgt.ravel())[:, None]
        g = self.g.copy()
        for k in range(2):
            coef, *_ = np.linalg.lstsq(X * sw, phase[k].ravel() * sw[:, 0], rcond=None)
            g[k] += coef[1:] / (2 * np.pi)
            phase[k] -= (coef[1] * xx + coef[2] * yy)
        self.g = g
        self.phase = phase

    def _cell_coords(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Points ``xy`` [N, 2] (px) in units of the coarse grid: (row, column) coordinates."""
        return (xy[:, 1] - self.origin) / self.step[0], (xy[:, 0] - self.origin) / self.step[1]

    def _sample(self, grid: np.ndarray, xy: np.ndarray) -> np.ndarray:
        return ndimage.map_coordinates(grid, np.stack(self._cell_coords(xy)), order=1, mode="nearest")

    def _sample_phase(self, k: int, xy: np.ndarray) -> np.ndarray:
        """The unwrapped phase ``k`` at ``xy`` (bilinear, as :meth:`_sample`), except where the four
        cells around a point straddle a cut of the unwrapping (their phases span more than pi, so
        the bilinear blend would be a phase no nearby lattice has): there the cells are first moved
        by whole turns onto the branch of the nearest one."""
        grid = self.phase[k]
        out = self._sample(grid, xy)
        h, w = grid.shape
        if h < 2 or w < 2:
            return out
        quad = (grid[:-1, :-1], grid[:-1, 1:], grid[1:, :-1], grid[1:, 1:])
        cut_cell = (np.maximum.reduce(quad) - np.minimum.reduce(quad)) > np.pi  # [h - 1, w - 1]
        if not cut_cell.any():
            return out
        cy, cx = self._cell_coords(xy)
        cy, cx = np.clip(cy, 0, h - 1), np.clip(cx, 0, w - 1)
        y0 = np.minimum(np.floor(cy).astype(np.int64), h - 2)
        x0 = np.minimum(np.floor(cx).astype(np.int64), w - 2)
        cut = np.flatnonzero(cut_cell[y0, x0])
        if len(cut):
            y0, x0, fy, fx = y0[cut], x0[cut], (cy - y0)[cut], (cx - x0)[cut]
            cc = np.stack([grid[y0, x0], grid[y0, x0 + 1], grid[y0 + 1, x0], grid[y0 + 1, x0 + 1]], 1)
            wts = np.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx], 1)
            ref = cc[np.arange(len(cc)), np.argmax(wts, 1)][:, None]
            cc = ref + np.angle(np.exp(1j * (cc - ref)))
            out[cut] = (wts * cc).sum(1)
        return out

    def coords(self, xy: np.ndarray) -> np.ndarray:
        """Metal-lattice coordinates ``U`` [N, 2] of points ``xy`` [N, 2] (px)."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        phi = np.stack([self._sample_phase(k, xy) for k in range(2)], 1)
        return xy @ self.g.T + phi / (2 * np.pi)

    def amplitude(self, xy: np.ndarray) -> np.ndarray:
        """Relative Bragg amplitude at points ``xy`` [N, 2]."""
        return self._sample(self.amp, np.asarray(xy, dtype=np.float64).reshape(-1, 2))

    def positions(self, U: np.ndarray, n_iter: int = 4) -> np.ndarray:
        """Points ``xy`` [N, 2] whose lattice coordinates are ``U`` [N, 2] (fixed-point inversion)."""
        U = np.asarray(U, dtype=np.float64).reshape(-1, 2)
        Ginv = np.linalg.inv(self.g)
        xy = U @ Ginv.T
        for _ in range(n_iter):
            phi = np.stack([self._sample_phase(k, xy) for k in range(2)], 1)
            xy = (U - phi / (2 * np.pi)) @ Ginv.T
        return xy

    def local_g(self, xy: np.ndarray) -> np.ndarray:
        """Local reciprocal vectors [N, 2, 2] (rows g1, g2) from the phase gradients."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        out = np.empty((len(xy), 2, 2))
        for k in range(2):
            gy, gx = _phase_gradient(self.phase[k], self.step)
            out[:, k, 0] = self.g[k, 0] + self._sample(gx, xy) / (2 * np.pi)
            out[:, k, 1] = self.g[k, 1] + self._sample(gy, xy) / (2 * np.pi)
        return out


def _phase_gradient(phase: np.ndarray, step: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """``np.gradient`` of an unwrapped phase grid (per px along y and x), with every difference that
    crosses a cut of the unwrapping (more than pi) taken modulo a whole turn: a cut is no gradient."""
    out = []
    for axis, d in ((0, step[0]), (1, step[1])):
        gr = np.gradient(phase, d, axis=axis)
        diff = np.diff(phase, axis=axis)
        if (np.abs(diff) > np.pi).any():
            w = np.moveaxis(np.angle(np.exp(1j * diff)), axis, 0)
            g = np.empty((len(w) + 1,) + w.shape[1:])
            g[1:-1] = 0.5 * (w[:-1] + w[1:])  # central differences inside, one-sided at the ends
            g[0], g[-1] = w[0], w[-1]
            gr = np.moveaxis(g, 0, axis) / d
        out.append(gr)
    return out[0], out[1]


def _resample(D: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    zy, zx = shape[0] / D.shape[0], shape[1] / D.shape[1]
    return (ndimage.zoom(D.real, (zy, zx), order=1, grid_mode=True, mode="grid-wrap")
            + 1j * ndimage.zoom(D.imag, (zy, zx), order=1, grid_mode=True, mode="grid-wrap"))


def _demodulate(F: np.ndarray, H: int, W: int, g: np.ndarray, sigma_f: float):
    """Demodulated Bragg-filtered map ``exp(-2 pi i g.r) (I * gauss_g)(r)`` on a coarse grid.

    ``F``: ``rfft2`` of the image. Returns the complex map and its grid step (px) in (y, x).
    """
    hy = int(np.ceil(4 * sigma_f * H))
    hx = int(np.ceil(4 * sigma_f * W))
    My = sfft.next_fast_len(2 * hy + 2)
    Mx = sfft.next_fast_len(2 * hx + 2)
    ky, kx = g[1] * H, g[0] * W
    ky0, kx0 = int(round(ky)), int(round(kx))
    dy = np.fft.fftfreq(My, 1.0 / My).astype(np.int64)  # 0, 1, ..., -1 (ifft order)
    dx = np.fft.fftfreq(Mx, 1.0 / Mx).astype(np.int64)
    iy = ky0 + dy[:, None]
    ix = kx0 + dx[None, :]
    iy, ix = np.broadcast_arrays(iy, ix)
    neg = ix < 0
    # rfft2 holds fx >= 0; F(-k) = conj(F(k))
    jy = np.where(neg, -iy, iy) % H
    jx = np.abs(ix)
    inside = jx <= W // 2
    vals = np.zeros(iy.shape, dtype=np.complex128)
    vals[inside] = F[jy[inside], jx[inside]]
    vals = np.where(neg, np.conj(vals), vals)
    wgt = np.exp(-(((iy - ky) / H) ** 2 + ((ix - kx) / W) ** 2) / (2 * sigma_f ** 2))
    S = sfft.ifft2(vals * wgt, workers=-1) * (My * Mx) / (H * W)
    step = (H / My, W / Mx)
    yy = np.arange(My)[:, None] * step[0]
    xx = np.arange(Mx)[None, :] * step[1]
    D = S * np.exp(2j * np.pi * ((ky0 / H - g[1]) * yy + (kx0 / W - g[0]) * xx))
    return D, step


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
                min_fit_points: int = 5, peak_var: np.ndarray | None = None, n_rounds: int = 2) -> SiteIndex:
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
    put on the wrong node there. ``fill=False`` keeps only the nodes with a peak.
    """
    peak_xy = np.asarray(peak_xy, dtype=np.float64).reshape(-1, 2)
    peak_value = np.asarray(peak_value, dtype=np.float64).reshape(-1)
    S = SITE_FROM_METAL @ np.linalg.inv(pmap.g).T
    M = np.array([[2.0, -1.0], [1.0, 1.0]])  # (p, q) = U @ M: p = 2 U1 + U2, q = U2 - U1
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
                                                 min_fit_points=min_fit_points, peak_var=peak_var)
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
    col = (np.asarray(idx.kind) == 0) & (np.asarray(idx.cls) >= 0)
    if col.sum() < COSET_MIN_COLUMNS:
        return False
    cls = np.asarray(idx.cls)[col]
    counts = np.bincount(cls, minlength=3)
    a = int(np.argmax(counts))
    if counts[a] < COSET_CLASS_SHARE * col.sum():
        return False
    third = np.bincount(np.mod(np.asarray(idx.ij)[col][cls == a, 1], 3), minlength=3)
    return bool(third.min() < COSET_EMPTY_RATIO * third.max())


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
                 min_amplitude, fill, fit_radius, min_fit_points, peak_var):
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
              peak_var=peak_var)
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
               film, peak_var):
    """:func:`_place_sites` for one prediction ``pred`` of the nodes (``wide``: the wider fit's
    prediction, called where the peaks are rough)."""
    H, W = shape
    pred = pred.copy()
    pred_w = _Grid(nodes, pred).get(node[w_idx])
    xy_w = peak_xy[w_idx].copy()
    okp = np.isfinite(pred_w).all(1)
    vm = None if peak_var is None else np.asarray(peak_var, dtype=np.float64)[w_idx][okp]
    k, excess = _shrinkage(xy_w[okp] - pred_w[okp], vm, float(np.sqrt(3.0)) * spacing, xy=pred_w[okp])
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
        i = np.asarray(nodes, dtype=np.int64) - self.lo
        n0, n1 = self.arr.shape[:2]
        i0, i1 = i[:, 0], i[:, 1]
        ok = (i0 >= 0) & (i0 < n0) & (i1 >= 0) & (i1 < n1)
        out = self.arr[np.clip(i0, 0, n0 - 1), np.clip(i1, 0, n1 - 1)]  # a copy (fancy indexing)
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


class _NodeGrid:
    """The dense (p, q) grid around nodes ``ij`` [N, 2] (``r`` cells of margin) for sums over each
    node's neighbours: values are put on it per node (zero elsewhere) and each node's neighbourhood
    is read from it, offset by offset (only at the nodes: the grid of a large image holds millions
    of cells, several times the nodes)."""

    def __init__(self, ij: np.ndarray, r: int) -> None:
        lo = ij.min(0) - r
        shape = tuple((ij.max(0) + r - lo + 1).tolist())
        self.r = r
        self.rows, self.cols = (ij - lo).T
        self._grid = np.zeros(shape)
        self._at = self.rows * shape[1] + self.cols  # flat index of each node

    def sums(self, values: np.ndarray, kernels: list) -> list:
        """Per kernel ``[2 r + 1, 2 r + 1]``, its correlation with the grid holding ``values`` [N]
        at the nodes (the last of duplicate nodes), at the nodes ([N] each). Bit for bit
        ``ndimage.correlate(grid, k, mode="constant")[rows, cols]``: the same products (weights
        above the float64 epsilon) summed from 0 in the same (raster) order."""
        r, width = self.r, self._grid.shape[1]
        self._grid[self.rows, self.cols] = values  # (the other cells stay 0)
        flat = self._grid.ravel()
        eps = np.finfo(np.float64).eps
        out = [np.zeros(len(self._at)) for _ in kernels]
        for a in range(2 * r + 1):
            for b in range(2 * r + 1):
                ws = [(acc, float(k[a, b])) for acc, k in zip(out, kernels) if abs(k[a, b]) > eps]
                if ws:
                    v = flat[self._at + ((a - r) * width + (b - r))]
                    for acc, w in ws:
                        acc += v * w
        return out


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
    r, kernels = _fit_kernels(fit_radius)
    grid = _NodeGrid(ij, r)
    w_node = np.asarray(w_peak, dtype=np.float64) * (1.0 if weight is None else weight)
    s1, sp, sq, spp, spq, sqq = grid.sums(w_node, kernels)
    good = (s1 if weight is None else grid.sums((w_node > 0).astype(np.float64), kernels[:1])[0]) >= np.broadcast_to(
        np.asarray(min_points), (n,))
    if not good.any():
        return basis, rms, centre
    # positions are taken relative to the node's own rough place (the global lattice) to keep the sums small
    ref = (ij.astype(np.float64) @ S)
    pos = np.where(np.asarray(w_peak, bool)[:, None], xy, 0.0)
    # drop near-singular fits (all points on one line)
    # positions relative to the global-lattice place of the *fitted* node: x(n + d) - ref(n) =
    # (x(n + d) - ref(n + d)) + d @ S; the first part is what is correlated, the second is added
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
        D_node = np.where(w_node > 0, pos[:, c] - ref[:, c], 0.0)
        G_node = D_node * (1.0 if weight is None else w_node)
        r0, rp, rq = (v[g] for v in grid.sums(G_node, kernels[:3]))
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
            g2 = grid.sums(G_node * D_node, kernels[:1])[0][g]  # sum of w v^2 (with weights, not of (w v)^2)
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
               xy: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """How far to trust each peak's position over its neighbours' prediction (0..1).

    A peak's residual from the prediction of its neighbours is the column's true displacement
    (per-coordinate variance ``u2 = (DISPLACEMENT_RMS_A * a)^2`` at most: what atoms in a monolayer
    do) plus noise: the fit's own (``var_meas``, see :func:`position_variance`) and whatever the
    image-wide residual variance has beyond ``u2 + median(var_meas)`` (scan and probe jitter,
    which moves the image of a column, not the column). The weight of the measurement is the
    usual ``u2 / (u2 + noise)``: ~1 on a clean image, small where the image places columns worse
    than the lattice around them does. Returns ``(weights, excess)``: the weights (0..1) and that
    excess variance per peak (per coordinate, px^2), by which :func:`_place_sites` finds the rough
    nodes.
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
        nb = nearest_indices(xy, SHRINK_NEIGHBORS)
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
