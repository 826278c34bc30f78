"""The metal lattice's first Bragg ring: the site spacing and orientation of a 2H monolayer image
from its power spectrum.

A 2H monolayer (MoS2, WSe2, ...) has its metal, chalcogen-pair and hollow sites on **one**
triangular lattice of spacing ``a / sqrt(3)``; the metal sites alone form the triangular lattice
of spacing ``a``. Whatever columns stand out in an image (on noisy data often only the metal), the
metal lattice shows as the first ring of Bragg spots of the power spectrum (the ``{100}`` spots at
``d = a sqrt(3) / 2``; site spacing ``2 d / 3``). :func:`metal_reciprocal_lattice` finds that ring:
the six spots, the reciprocal vectors ``g1, g2`` (120 degrees apart, so that the real-space metal
vectors are 60 degrees apart) and how far the spots stand out; a ring picked from a higher-order
family is re-read as the first (from the spots inside it). Step 1 of
:func:`stemfast.sites.find_sites`; :mod:`stemfast.phasemap` follows the lattice over the image and
:mod:`stemfast.sitelattice` puts one site on each node.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import fft as sfft
from scipy import ndimage

__all__ = ["FftLattice", "RingSpectrum", "metal_reciprocal_lattice", "ring_at_spacing", "ring_spectrum",
           "SITE_FROM_METAL", "site_spacing", "ring_spots"]

#: site-lattice vectors in units of the metal vectors (rows: s1 = (A1 + A2) / 3, s2 = (2 A2 - A1) / 3)
SITE_FROM_METAL = np.array([[1.0, 1.0], [-1.0, 2.0]]) / 3.0


@dataclass(frozen=True)
class FftLattice:
    """The metal lattice's first Bragg ring.

    ``g`` [2, 2]: rows g1, g2 in cycles / px (x, y), 120 degrees apart; ``prominence``: median over
    the six spots of the spot power over the median power of its ring (>> 1 for a lattice);
    ``spacing`` the site spacing it implies (px); ``note`` which reflection family was picked first
    and what it was re-read as (for the log); ``coarser_spacing`` (a ring picked by a given spacing
    only): the site spacing of the coarser lattice whose spots lie inside it, if any; ``by_spacing``:
    the ring was picked at a given spacing (not the image's own strongest ring);
    ``prominence_off_spots``: the six spots' median power over the ring's median power away from them
    (:func:`_off_spots_prominence`), what the ring is judged and reported by (``prominence``, against
    the whole ring, picks among candidate rings).
    """

    g: np.ndarray
    prominence: float
    spacing: float
    note: str = ""
    coarser_spacing: float | None = None
    by_spacing: bool = False
    prominence_off_spots: float | None = None

    @property
    def standout(self) -> float:
        """:attr:`prominence_off_spots` where measured, else :attr:`prominence`."""
        return self.prominence if self.prominence_off_spots is None else self.prominence_off_spots

    def second_order_reread(self) -> "FftLattice":
        """This ring re-read as the ``{110}`` family of a ring ``sqrt(3)`` nearer the centre (turned by
        30 degrees): that ring's lattice, whose site spacing is ``sqrt(3)`` times this one's."""
        g = _first_ring_of_second(self.g)
        note = (self.note + " {110}->{100} (columns on one third of the nodes)").strip()
        return FftLattice(g=g, prominence=self.prominence, spacing=site_spacing(g), note=note,
                          prominence_off_spots=self.prominence_off_spots)  # the same six spots

    def finer_order_reread(self, n: int) -> "FftLattice":
        """This ring re-read as the ``{n00}`` family of a ring ``n`` times nearer the centre: that
        ring's lattice, whose site spacing is ``n`` times this one's."""
        g = np.asarray(self.g, dtype=np.float64) / n
        note = (self.note + f" {{{n}00}}->{{100}} (columns on one coset of the lattice {n}x as coarse)").strip()
        return FftLattice(g=g, prominence=self.prominence, spacing=site_spacing(g), note=note,
                          prominence_off_spots=self.prominence_off_spots)  # the same six spots

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
    win = _window(h, w)
    P = sfft.fftshift(np.abs(sfft.fft2((img - img.mean()) * win, workers=-1)) ** 2)  # (the shift moves reals)
    return P, h, w


@functools.lru_cache(maxsize=4)
def _window(h: int, w: int) -> np.ndarray:
    """The 2-D Hann window [h, w] of :func:`_spectrum` (read-only; keyed on the shape alone)."""
    win = np.outer(np.hanning(h), np.hanning(w))
    win.flags.writeable = False
    return win


@functools.lru_cache(maxsize=4)
def _frequency_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[slice, slice]]:
    """``(f2, f, valid, box)`` of the (fftshifted) spectrum of an ``h`` x ``w`` crop: each bin's squared
    spatial frequency and spatial frequency (cycles / px), the bins a ring is looked for in (beyond
    :data:`MIN_RING_BINS` of the centre, below 0.3 cycles / px: a column spacing of 3 px puts the first
    ring at 1 / 4.5 cycles / px), each [h, w] and read-only, and the slices of the box that holds the
    valid bins of the upper half and the 2 bins around them (all a 5-bin filter there reads).
    Keyed on the shape alone."""
    iy, ix = np.arange(h)[:, None] - h // 2, np.arange(w)[None, :] - w // 2  # bins from the centre
    f2 = (ix / w) ** 2 + (iy / h) ** 2
    valid = (iy ** 2 + ix ** 2 > MIN_RING_BINS ** 2) & (f2 < 0.3 ** 2)
    f = np.sqrt(f2)
    for a in (f2, f, valid):
        a.flags.writeable = False
    rows, cols = np.flatnonzero(valid[h // 2:].any(1)) + h // 2, np.flatnonzero(valid.any(0))
    if not len(rows):
        return f2, f, valid, (slice(0, 0), slice(0, 0))
    box = (slice(max(0, int(rows[0]) - 2), int(rows[-1]) + 3), slice(max(0, int(cols[0]) - 2), int(cols[-1]) + 3))
    return f2, f, valid, box


@dataclass(frozen=True)
class RingSpectrum:
    """The spectrum an image's Bragg ring is read from (:func:`ring_spectrum`).

    ``power`` [h, w]: the windowed power spectrum of the image's central crop (:data:`SPECTRUM_CROP`;
    fftshifted); ``Pw``: it 3-bin smoothed and whitened (times the spatial frequency squared: the 1/f^2
    background flattened); ``cand``: flat indices into that of its strongest local maxima (at most 16,
    strongest first) in the upper half, among the bins a ring is looked for in.
    """

    power: np.ndarray
    Pw: np.ndarray
    cand: list

    @property
    def shape(self) -> tuple[int, int]:
        """``(h, w)``: the crop's (and the spectrum's) size."""
        return self.Pw.shape


def ring_spectrum(image: np.ndarray) -> RingSpectrum:
    """The :class:`RingSpectrum` of ``image`` (2-D), which :func:`metal_reciprocal_lattice`,
    :func:`ring_at_spacing` and :func:`stemfast.noise.noise_correlation` read: computed once, it serves
    them all (one transform for several reads)."""
    P, h, w = _spectrum(np.asarray(image), crop=SPECTRUM_CROP)
    f2, _, valid, box = _frequency_grid(h, w)
    Pw = ndimage.uniform_filter(P, 3) * f2  # whitened: 1/f^2 background flattened
    # the strongest local maxima of the spectrum; the one whose hexagon stands out most wins
    # (a single strong noise pixel near Nyquist has no hexagon). In the upper half (the spectrum of a
    # real image is symmetric): the 5-bin maximum filter of the box around its valid bins is the whole
    # spectrum's there (the box reaches 2 bins beyond them, or the spectrum's edge)
    mx = np.zeros((h, w), bool)
    mx[box] = Pw[box] == ndimage.maximum_filter(Pw[box], size=5)
    mx &= valid
    mx[:h // 2] = False
    idx = np.flatnonzero(mx)
    return RingSpectrum(P, Pw, idx[np.argsort(Pw.ravel()[idx])[::-1][:16]].tolist())


#: the spectrum's lowest usable frequency, in bins from its centre (the window's leakage of the mean
#: and the steep low-frequency background lie within). Bins are counted along each axis of the crop: a
#: strip's spectrum resolves frequencies along its long side that it cannot along its short one, and a
#: 100 x 512 px strip of a 14 px site lattice has most of its first ring's spots beyond 6 bins though the
#: ring's radius is 4.7 bins of the short side (read from the short side alone, the ring was missed and
#: the sqrt(3) ring taken: a spacing sqrt(3) too small, unsaid)
MIN_RING_BINS = 6.0
#: a hexagon of Bragg spots is read from those of its six spots beyond :data:`MIN_RING_BINS` (all six on a
#: square crop; a strip's spectrum leaves the spots along its short side in the window's leakage, whose
#: power is no reflection's) and needs at least this many. A re-read to a lower-order ring needs all six
#: (:func:`_pick_ring`): with four, a 100 x 256 px strip of a 10 px lattice re-read its true ring as one
#: at 1 / sqrt(3) of it, made of leakage
MIN_READABLE_SPOTS = 4
#: a spot is placed to within half a bin along each axis of the spectrum, so along a strip's short side a
#: ring of few bins has no shape to read: its radius must span this many bins of the short side (spot
#: positions to 1/8 of the radius). A 48 px high strip of a 15 px lattice (ring radius 2.1 bins) read an
#: 8 px "lattice" without it. On a square crop :data:`MIN_RING_BINS` is the stricter
MIN_RING_SHORT_BINS = 4.0


def _bins(g: np.ndarray, h: int, w: int):
    """Distance of the reciprocal vectors ``g`` [..., 2] (cycles / px) from the centre of an ``h`` x ``w``
    spectrum, in its bins."""
    g = np.asarray(g, dtype=np.float64)
    return np.hypot(g[..., 0] * w, g[..., 1] * h)


def _spot_power(Pw: np.ndarray, h: int, w: int, g: np.ndarray, r: float = 1.5):
    """Max of the (whitened) spectrum within ``r`` bins of each reciprocal vector ``g`` [K, 2]
    (cycles / px), and the refined spot positions (power-weighted centroid around that max)."""
    cy, cx = h // 2, w // 2
    g = np.asarray(g, dtype=np.float64)
    out = np.zeros(len(g))
    pos = np.array(g, dtype=np.float64)
    rr = int(np.ceil(r)) + 1
    yy, xx = np.mgrid[-rr:rr + 1, -rr:rr + 1]
    n = yy.shape[0]
    mid = yy.size // 2  # a box has an odd number of bins: its median is the middle one
    x, y = cx + g[:, 0] * w, cy + g[:, 1] * h
    x0, y0 = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)  # (round half to even, as round())
    k = np.flatnonzero((rr <= x0) & (x0 < w - rr) & (rr <= y0) & (y0 < h - rr))
    if not len(k):
        return out, pos
    x, y, x0, y0 = x[k, None, None], y[k, None, None], x0[k, None, None], y0[k, None, None]
    box = Pw[y0 + yy, x0 + xx]  # [K, n, n]: the box around each spot
    near = (xx + x0 - x) ** 2 + (yy + y0 - y) ** 2 <= r * r
    at = np.argmax(np.where(near, box, -np.inf).reshape(len(k), -1), axis=1)
    out[k] = box.reshape(len(k), -1)[np.arange(len(k)), at]
    # centroid in the 3 x 3 around the max (the max lies within r + 1/2 < rr bins of the box's centre:
    # never on its edge), above the box's median
    iy, ix = np.divmod(at, n)
    d = np.arange(-1, 2)
    rows, cols = (iy[:, None] + d)[:, :, None], (ix[:, None] + d)[:, None, :]
    med = np.partition(box.reshape(len(k), -1), mid, axis=1)[:, mid]
    wgt = np.clip(box[np.arange(len(k))[:, None, None], rows, cols] - med[:, None, None], 0, None)
    total = wgt.reshape(len(k), 9).sum(axis=1)  # (each spot's nine bins in one row: summed as for one spot)
    ok = total > 0
    py = ((rows - rr) * wgt)[ok].reshape(-1, 9).sum(axis=1) / total[ok] + y0[ok, 0, 0]
    px = ((cols - rr) * wgt)[ok].reshape(-1, 9).sum(axis=1) / total[ok] + x0[ok, 0, 0]
    pos[k[ok]] = np.stack([(px - cx) / w, (py - cy) / h], axis=1)
    return out, pos


def _ring_reference(Pw: np.ndarray, h: int, w: int, f: float, spots: np.ndarray | None = None,
                    r_spot: float = 0.0) -> float:
    """Median whitened power in an annulus of radius ``f`` (cycles / px), width ~3 bins; with
    ``spots`` [K, 2] (cycles / px), away from them by more than ``r_spot`` +
    :data:`SPOT_MARGIN_BINS` bins, where that keeps at least a third of the annulus."""
    r = int(np.ceil((f + 2.0 / min(h, w)) * max(h, w))) + 1
    cy, cx = h // 2, w // 2
    y0, x0 = max(0, cy - r), max(0, cx - r)
    sub = Pw[y0:cy + r + 1, x0:cx + r + 1]
    band = np.abs(_frequency_grid(h, w)[1][y0:cy + r + 1, x0:cx + r + 1] - f) <= 1.5 / min(h, w)
    if not band.any():
        return float("inf")
    if spots is not None:
        iy = (np.arange(sub.shape[0]) + y0 - cy)[:, None]
        ix = (np.arange(sub.shape[1]) + x0 - cx)[None, :]
        near = np.zeros_like(band)
        for gx, gy in np.asarray(spots, dtype=np.float64):
            near |= np.hypot(ix - gx * w, iy - gy * h) <= r_spot + SPOT_MARGIN_BINS
        if 3 * np.count_nonzero(band & ~near) >= np.count_nonzero(band):
            band &= ~near
    return float(np.median(sub[band]))


#: :func:`_off_spots_prominence` leaves out this many bins more than the spot search's radius around
#: each spot: a spot spreads over ~2 bins either way (the window's main lobe, the 3-bin smoothing)
SPOT_MARGIN_BINS = 1.5


def _off_spots_prominence(Pw: np.ndarray, h: int, w: int, ring: "FftLattice") -> "FftLattice":
    """``ring`` with :attr:`FftLattice.prominence_off_spots`: the median power of its six spots (those
    beyond :data:`MIN_RING_BINS`) over its annulus' median power away from them.

    Against the whole annulus a small ring's prominence is low however clean the lattice: a ring of 8
    bins' radius is ~50 bins round and its six spots ~5 bins wide each, so the annulus' median is
    much a spot's power (clean 128-192 px images of 10-18 px lattices: 5.8-16 against all of it,
    8.8-257 off the spots). Where the spots leave under a third of the annulus (a ring 6-7 bins out),
    all of it is used. On rings of tens of bins (512 px scans) the spots are a smaller share.
    """
    spots = ring_spots(ring.g)
    radius = float(np.mean(_bins(spots, h, w)))
    r = max(1.5, SPOT_SEARCH * radius)
    p, pos = _spot_power(Pw, h, w, spots, r=r)
    readable = _bins(spots, h, w) >= MIN_RING_BINS
    if readable.sum() < MIN_READABLE_SPOTS:
        return ring
    ref = _ring_reference(Pw, h, w, float(np.mean(np.hypot(spots[:, 0], spots[:, 1]))), pos, r)
    return dataclasses.replace(ring, prominence_off_spots=float(np.median(p[readable]) / ref) if ref > 0 else 0.0)


#: the six spots of a ring as multiples of its reciprocal basis: spot k = m_k g1 + n_k g2 (g1, g2 120
#: degrees apart, so g1 + g2 lies between them)
_HEX_MN = np.array([[1, 0], [1, 1], [0, 1], [-1, 0], [-1, -1], [0, -1]], dtype=np.float64)


def ring_spots(g: np.ndarray) -> np.ndarray:
    """The six spots [6, 2] (cycles / px) of the first Bragg ring of the reciprocal basis ``g`` [2, 2]
    (an :attr:`FftLattice.g`: rows 120 degrees apart), in the order of :data:`_HEX_MN`."""
    return _HEX_MN @ np.asarray(g, dtype=np.float64)


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
    radius of the ideal hexagon (scan distortion makes real lattices anisotropic). Only the spots
    beyond :data:`MIN_RING_BINS` count (0 with fewer than :data:`MIN_READABLE_SPOTS` of them); the
    others keep their ideal positions."""
    spots = _hexagon(g0)
    p, pos = _spot_power(Pw, h, w, spots, r=max(1.5, search * float(np.hypot(g0[0] * w, g0[1] * h))))
    readable = _bins(spots, h, w) >= MIN_RING_BINS
    if readable.sum() < MIN_READABLE_SPOTS:
        return 0.0, pos
    pos[~readable] = spots[~readable]  # the window's leakage there: the ideal spot, not a refined one
    ref = _ring_reference(Pw, h, w, float(np.hypot(*g0)))
    return float(np.median(p[readable]) / ref) if ref > 0 else 0.0, pos


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


def metal_reciprocal_lattice(image: np.ndarray | RingSpectrum, *, spacing_hint: float | None = None,
                             min_prominence: float = 4.0) -> FftLattice | None:
    """The first Bragg ring of a 2H monolayer's metal lattice (``{100}``), or ``None`` when no ring
    stands out by ``min_prominence``. ``image``: the image (2-D), or its :func:`ring_spectrum` where
    that is already computed.

    The strongest spot of the whitened spectrum (power times spatial frequency squared) belongs to
    some reflection family of the lattice; it is re-read as a lower-order family while one stands
    out at ``1 / sqrt(3)`` of its frequency turned by 30 degrees (``{110}`` -> ``{100}``) or at half
    its frequency (``{200}`` -> ``{100}``). With ``spacing_hint`` (the site spacing, px), the ring
    nearest to ``1 / (1.5 spacing_hint)`` of the hexagonal family is taken instead
    (:func:`ring_at_spacing`: its spots looked for within :data:`SPOT_SEARCH`, then
    :data:`SPOT_SEARCH_WIDE`; where neither finds a hexagon there, the search without a hint
    follows). Without it the
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
    >>> from stemfast.phasemap import PhaseMap
    >>> abs(site_spacing(PhaseMap(s.image, lat.g).g) / s.meta["nn_px"] - 1) < 0.01  # refined by the phases
    True
    """
    sp = image if isinstance(image, RingSpectrum) else ring_spectrum(image)
    Pw, (h, w), cand = sp.Pw, sp.shape, sp.cand
    if spacing_hint is not None:
        ring = ring_at_spacing(sp, spacing_hint, min_prominence=min_prominence)
        if ring is not None:
            return ring
        # no hexagon of spots at the given spacing (a strongly distorted scan): the image's own ring
        # below, never none where there is one (the caller says where it differs from the given one)
    narrow = _pick_ring(Pw, h, w, cand, min_prominence, False, "", SPOT_SEARCH)
    if narrow is None:  # the wider search only corrects a ring, it finds none where there is none
        return None
    ring = narrow
    wide = _pick_ring(Pw, h, w, cand, min_prominence, False, "", SPOT_SEARCH_WIDE)
    if wide is not None and abs(wide.spacing / narrow.spacing - 1) > 0.1:
        p_narrow, _ = _ring_prominence(Pw, h, w, narrow.g[0], SPOT_SEARCH_WIDE)
        if p_narrow < wide.prominence:
            ring = dataclasses.replace(wide, note=(wide.note + " (spots of a distorted lattice: wide search)").strip())
    return _off_spots_prominence(Pw, h, w, _inner_spots_reread(Pw, h, w, ring, cand, min_prominence))


def ring_at_spacing(spectrum: RingSpectrum, spacing: float, *, min_prominence: float = 4.0) -> FftLattice | None:
    """The ring of the hexagonal family nearest to ``1 / (1.5 spacing)`` in ``spectrum`` (its spots looked
    for within :data:`SPOT_SEARCH`, then :data:`SPOT_SEARCH_WIDE`), ``by_spacing``; None where neither
    finds a hexagon there that stands out by ``min_prominence``. What :func:`metal_reciprocal_lattice`
    takes at a ``spacing_hint`` (the site spacing, px) before it looks for the image's own ring."""
    Pw, (h, w), cand = spectrum.Pw, spectrum.shape, spectrum.cand
    _, f, valid, _ = _frequency_grid(h, w)
    f_target = 1.0 / (1.5 * float(spacing))
    band = valid & (np.abs(f - f_target) <= max(2.0 / min(h, w), 0.08 * f_target))
    if not band.any():
        return None
    hinted = [int(np.argmax(np.where(band, Pw, -np.inf)))]
    for search in (SPOT_SEARCH, SPOT_SEARCH_WIDE):
        ring = _pick_ring(Pw, h, w, hinted, min_prominence, True, "ring picked by the given spacing", search)
        if ring is not None:
            # kept as given, but a coarser lattice's spots inside it are said (a spacing given
            # sqrt(3) or 2x too small picks the {110} or {200} ring)
            coarser = _inner_spots_reread(Pw, h, w, ring, cand, min_prominence)
            if coarser is not ring:
                ring = dataclasses.replace(ring, coarser_spacing=coarser.spacing)
            return _off_spots_prominence(Pw, h, w, dataclasses.replace(ring, by_spacing=True))
    return None


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
    spots = ring_spots(g)
    f = float(np.mean(np.hypot(spots[:, 0], spots[:, 1])))
    p, pos = _spot_power(Pw, h, w, spots, r=max(1.5, SPOT_SEARCH * f * max(h, w)))
    ref = _ring_reference(Pw, h, w, f)
    return (float(np.min(p) / ref) if ref > 0 else 0.0), pos


def _inner_spots_reread(Pw, h, w, ring: FftLattice, cand, min_prominence) -> FftLattice:
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
            if not float(np.hypot(*q)) <= 0.9 * rmin:  # (every candidate lies beyond MIN_RING_BINS)
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
            if (_bins(_reciprocal_set(gn), h, w).min() < MIN_RING_BINS or radii.min() * min(h, w) < MIN_RING_SHORT_BINS
                    or radii.max() > MAX_RING_STRETCH * radii.min()):
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


def _pick_ring(Pw, h, w, cand, min_prominence, hinted: bool, note: str, search: float) -> FftLattice | None:
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
                if _bins(_hexagon(gc), h, w).min() < MIN_RING_BINS:  # a re-read's ring is seen whole
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
    if radii.min() * min(h, w) < MIN_RING_SHORT_BINS:  # a ring too small for its shape to be read
        return None
    spacing = site_spacing(g)
    return FftLattice(g=g, prominence=float(prom), spacing=spacing, note=note)


def site_spacing(g: np.ndarray) -> float:
    """Mean length (px) of the three site-lattice bonds s1, s2, s2 - s1 of reciprocal metal vectors ``g``."""
    S = SITE_FROM_METAL @ np.linalg.inv(np.asarray(g, dtype=np.float64)).T
    return float(np.mean(np.hypot(*np.stack([S[0], S[1], S[1] - S[0]]).T)))
