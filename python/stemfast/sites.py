"""From a micrograph to the table of every site where an atomic column is or should be.

``find_sites`` = spacing estimate -> bandpass -> peaks (sub-pixel) -> local lattice fill-in ->
per-site intensity, sublattice and local strain.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import numpy as np
from scipy import fft as sfft
from scipy import ndimage

from ._validate import check_image, check_type, check_xy, positive
from .bandpass import bandpass, bandpasses
from .crowding import LatticeCrowdingWarning, crowding  # noqa: F401  (re-exported: stemfast.sites.crowding)
from .domains import inversion_domains
from .medians import window_medians
from . import grains as _grains
from .grains import GrainSettings
from .io import unit_not_a_length, unit_to_nm
from .lattice import (
    LatticeSettings,
    film_mask,
    local_strain,
)
from .backend import get_kernels, one_blas_thread
from .clipping import ClippingWarning, clipped_intensities
from .limits import check_section
from .contrast import CONTRASTS, ContrastWarning, column_contrast, inverted
from .nodata import OVERLAY_RUN, NoData, no_data as find_no_data, overlay_pixels, ring_points
from .noise import NoiseCorrelationWarning, noise_correlation
from .patches import site_intensity
from .materials import fitting_hint, get_material, materials_fitting, name_by_brightness
from .peaks import find_peaks
from .braggring import (MIN_RING_BINS, SITE_FROM_METAL, SPECTRUM_CROP, metal_reciprocal_lattice, ring_at_spacing,
                        ring_spectrum, ring_spots, site_spacing)
from .phasemap import PhaseMap
from .scanlines import ScanJumps
from .spikes import SpikeWarning, despiked, spike_meta
from .sitelattice import (border_distance, columns_on_a_honeycomb, columns_on_one_coset, columns_on_one_finer_coset,
                          index_sites, lattice_distortion, node_residuals, pixel_noise, position_variance)
from .table import SiteTable
from .vacuum import VACUUM_MAX_BRAGG, dark_vacuum, film_spectrum_image, vacuum_bragg_ratio
from .wobble import ScanWobbleWarning, line_wobble

__all__ = ["SiteSettings", "find_sites", "companion_intensity", "border_bands", "estimate_period_fft", "sample_image",
           "NoLatticeWarning",
           "LatticeUncertainWarning", "CalibrationWarning", "LatticeDistortionWarning"]

log = logging.getLogger(__name__)


#: how many times :func:`_find_lattice` re-reads a Bragg ring that the columns show to be a second-order
#: one (each time ``sqrt(3)`` nearer the spectrum's centre)
MAX_RING_REREADS = 2

#: an image side below which a missing Bragg ring is put down to the image's size in the no-lattice
#: message (the ring search reads spots 6 or more frequency bins out: a first ring of 6 periods across,
#: 9 site spacings; 128 px holds that for site spacings up to 14 px)
SHORT_SIDE_PX = 128

#: the smallest image side (px) ``find_sites`` accepts
MIN_IMAGE_SIDE = 16

#: sites whose centre is closer than this (px) to the image edge are in the table but not judged
#: (``observed`` False): the scan shows at most half of the column
EDGE_UNJUDGED_PX = 1.0

#: A lattice's strongest Bragg ring stands >> this far above the radially averaged power spectrum
#: around it (100-400 on MoS2 images, also at low dose); white noise gives about 1.2.
MIN_FFT_PROMINENCE = 4.0
#: an image whose short side is at most this many px may miss :data:`MIN_FFT_PROMINENCE` with a lattice
#: (:func:`_ring_of`): the reason then names the given spacing as the way past
SMALL_SPECTRUM_PX = 256
#: a Bragg ring implying a finer site spacing is noise near the Nyquist frequency, not a lattice (the
#: smallest spacing the settings take, :attr:`SiteSettings.spacing`)
MIN_RING_SPACING_PX = 2.0


class NoLatticeWarning(UserWarning):
    """The image shows no atomic lattice; the result is empty."""


class LatticeUncertainWarning(UserWarning):
    """The site lattice was found but the evidence for it is weak (see ``meta["lattice"]["unsure"]``)."""


class CalibrationWarning(UserWarning):
    """The file's pixel size and the material's lattice constant disagree."""


class InversionDomainWarning(UserWarning):
    """Part of the image is an inversion domain (a mirror-twin boundary crosses it); each domain's
    sublattices are named from its own columns."""


class LatticeDistortionWarning(UserWarning):
    """The site lattice is anisotropic (scan distortion or strain, see ``meta["lattice"]["distortion"]``):
    the spacing differs along the three lattice directions."""


@dataclass(frozen=True)
class SiteSettings:
    """Settings of :func:`find_sites`. Lengths marked *nn* are in units of the column spacing.

    Attributes
    ----------
    spacing : nearest-neighbour column spacing in px; ``None`` estimates it from the image.
    noise_nn, background_nn : Gaussian sigmas of the bandpass (*nn*).
    min_distance_nn : minimum separation of two found columns (*nn*).
    threshold : detection threshold on the bandpassed image; ``None`` = automatic (noise-aware).
    refine : ``"gauss"`` (2-D Gaussian least squares), ``"com"`` (centre of mass) or ``None``.
    refine_radius_nn : radius of the pixel disc used by the refinement (*nn*).
    refine_noise_nn : Gaussian sigma (*nn*) of an optional light smoothing of the image the
        refinement sees (0 = the raw image; the Gaussian fit itself averages the noise).
    refine_background_nn : the refinement sees the image minus its Gaussian blur of this sigma (*nn*;
        0 = not): the fit's model is a Gaussian on a constant, so a background that slopes across a
        column (contamination, a thickness or illumination gradient) pulls its centre uphill.
    border_px : columns found closer than this to the image edge are left to the lattice fill-in
        (a column cut by the edge has a biased centre).
    intensity_radius_nn : radius of the disc whose mean raw image value is a site's ``raw_intensity``.
    column_noise_px : Gaussian sigma (px, not *nn*) of the low-pass of the bandpass whose value at a
        site is its ``column_intensity`` (what the defect scores compare): the shot noise is per pixel,
        so about 1 px averages it at every sampling, while the lattice-scale ``noise_nn`` smooths
        5 px spacings too little and 15 px spacings so much that contamination texture comes in. An
        image whose noise is correlated over ``L > 1`` px (upsampled, interpolated or filtered:
        :func:`stemfast.noise.noise_correlation`) is read with ``L * column_noise_px``, with a
        :class:`~stemfast.noise.NoiseCorrelationWarning` (``meta["lattice"]["noise"]``). Either way at
        most ``COLUMN_FILTER_MAX_NN`` (0.2) site spacings (:func:`column_filter_px`).
    scan_lines : find scan lines (image rows), and parts of lines, that are off against the lattice
        (streaks, row jumps: :mod:`stemfast.scanlines`), level them before ``column_intensity`` is read
        and mark the sites within ``STREAK_REACH * column_noise_px`` of them (``scan_streak`` column; the defect scores
        take out a gain there); find the sideways jumps of the scan between two lines
        (:func:`stemfast.scanlines.scan_line_jumps`), undo them before the lattice is found and
        report the sites where the recorded image has them; ``meta["lattice"]["scan_lines"]`` lists
        both (``flagged_rows``, ``jump_rows``; also in ``summary.json``).
    despike : replace single-pixel spikes (hot or dead pixels, X-ray or electronic spikes:
        :mod:`stemfast.spikes`) by the median of their neighbours before anything reads the image;
        ``meta["lattice"]["spikes"]`` says how many (also in ``summary.json``).
    fill : run the lattice fill-in (add hexagon centres, vacancies, faint columns).
    detect_holes : stop the fill-in at holes in the film (vacuum).
    lattice : :class:`~stemfast.lattice.LatticeSettings`.
    backend : kernel backend of the whole run (``cpp``, ``numba``, ``numpy``; ``None`` =
        ``STEMFAST_BACKEND`` or the fastest available): site finding, the patches, the compiled model
        engine, the analysis (:func:`stemfast.pipeline.analyze` passes it on) and the batch's
        ``sites.csv`` writer all run on it.
    material : the 2H material (:data:`stemfast.materials.MATERIAL_NAMES`): its lattice constant
        and the names of its sites and defects.
    chalcogen_brighter : the chalcogen pairs are brighter than the metal columns; the default,
        None, takes what HAADF Z-contrast shows on the ``material``
        (:attr:`stemfast.materials.Material.chalcogen_brighter_haadf`: the metal is the brightest on
        MoS2, WS2 and WSe2, the Se2 pair on MoSe2); True for, e.g., a medium- or low-angle ADF image
        of WSe2, where the Se2 pairs outshine the W (:func:`stemfast.materials.brightness_order`). The
        analysis warns when the image's dark sites say the naming is the other way round.
    contrast : how the image shows the columns (:mod:`stemfast.contrast`): ``"auto"`` tells it from
        the image -- bright columns (ADF, HAADF) are read as they are, dark ones (bright field, ABF)
        are inverted first, with a warning, and an image that cannot tell is read as bright, with a
        warning; ``"bright"`` or ``"dark"`` say which it is (``meta["lattice"]["contrast"]``).
    node_tol_nn : a peak within this distance (*nn*) of a node of the site lattice is that node's
        column; further from every node it is off the lattice.
    off_lattice_strength : a peak on no node is reported (``source`` ``off_lattice``) when its
        bandpassed value is at least this share of the metal columns' median; weaker ones are noise.
    grains : :class:`~stemfast.grains.GrainSettings`: grains of different orientation get their
        own site lattice (polycrystalline films).
    """

    spacing: float | None = None
    noise_nn: float = 0.12
    background_nn: float = 1.0
    min_distance_nn: float = 0.5
    threshold: float | None = None
    refine: str | None = "gauss"
    refine_radius_nn: float = 0.25
    refine_noise_nn: float = 0.0
    refine_background_nn: float = 1.0
    border_px: int = 2
    intensity_radius_nn: float = 0.25
    column_noise_px: float = 1.0
    scan_lines: bool = True
    despike: bool = True
    fill: bool = True
    detect_holes: bool = True
    lattice: LatticeSettings = field(default_factory=LatticeSettings)
    backend: str | None = None
    material: str = "mos2"
    chalcogen_brighter: bool | None = None
    contrast: str = "auto"
    node_tol_nn: float = 0.3
    off_lattice_strength: float = 0.5
    grains: GrainSettings = field(default_factory=GrainSettings)

    def __post_init__(self) -> None:
        object.__setattr__(self, "material", get_material(self.material).name)
        if self.spacing is not None and not (np.isfinite(self.spacing) and self.spacing >= 2):
            raise ValueError(f"spacing must be >= 2 px, got {self.spacing!r}")
        if self.refine not in ("gauss", "com", None):
            raise ValueError(f"refine must be 'gauss', 'com' or None, got {self.refine!r}")
        if not (self.refine_background_nn == 0 or self.refine_background_nn >= 0.5):
            raise ValueError(f"refine_background_nn must be 0 or >= 0.5, got {self.refine_background_nn!r}")
        if not 0 < self.noise_nn < self.background_nn:
            raise ValueError("need 0 < noise_nn < background_nn")
        if not (np.isfinite(self.column_noise_px) and self.column_noise_px > 0):
            raise ValueError(f"column_noise_px must be > 0, got {self.column_noise_px!r}")
        if self.contrast not in CONTRASTS:
            raise ValueError(f"contrast must be one of {', '.join(CONTRASTS)}, got {self.contrast!r}")
        check_section(self, "sites")  # the ranges of stemfast.limits.SETTING_LIMITS (refine_radius_nn, ...)

    @property
    def resolved_chalcogen_brighter(self) -> bool:
        """``chalcogen_brighter``, or where it is None what HAADF shows on the material."""
        if self.chalcogen_brighter is not None:
            return bool(self.chalcogen_brighter)
        return get_material(self.material).chalcogen_brighter_haadf

    def to_dict(self) -> dict:
        return asdict(self)


def estimate_period_fft(image: np.ndarray, *, return_prominence: bool = False):
    """Strongest lattice period (px) from the radially averaged power spectrum.

    For a hexagonal material this is one of the Bragg families (for MoS2 either 1.5 or 0.87 times
    the column spacing), so it only sets the scale of a first detection pass; the spacing itself
    comes from neighbour statistics (:func:`stemfast.lattice.estimate_spacing`).
    With ``return_prominence`` also returns how far the peak stands above the spectrum around it
    (about 1-2 for noise, >> 3 for a lattice).
    """
    img = np.asarray(image, dtype=np.float32)
    H, W = img.shape
    # a central crop keeps this cheap on huge images; a lattice period is far below 512 px
    c = 512
    if H > c or W > c:
        y0, x0 = max(0, (H - c) // 2), max(0, (W - c) // 2)
        img = img[y0:y0 + c, x0:x0 + c]
        H, W = img.shape
    win = np.outer(np.hanning(H), np.hanning(W)).astype(np.float32)
    P = np.abs(sfft.rfft2((img - img.mean()) * win, workers=-1)) ** 2
    fy = sfft.fftfreq(H)[:, None]
    fx = sfft.rfftfreq(W)[None, :]
    f = np.sqrt(fy ** 2 + fx ** 2)
    # pixels within MIN_RING_BINS bins of the centre, counted along each axis, are left out (a strip's
    # spectrum reads along its long side frequencies it cannot along its short one; for a square crop
    # this leaves out just the radii below 6 / side, as a limit on the radius alone would)
    usable = ((np.rint(fy * H) ** 2 + np.rint(fx * W) ** 2) >= MIN_RING_BINS ** 2).ravel()
    nb = max(64, min(H, W) // 2)
    bins = np.linspace(0.0, 0.5, nb + 1)
    idx = np.clip(np.digitize(f.ravel(), bins) - 1, 0, nb - 1)
    n_usable = np.bincount(idx, weights=usable, minlength=nb)
    prof = np.bincount(idx, weights=np.where(usable, P.ravel(), 0.0), minlength=nb) / np.maximum(n_usable, 1)
    fc = 0.5 * (bins[1:] + bins[:-1])
    valid = (n_usable > 0) & (fc > MIN_RING_BINS / max(H, W)) & (fc < 0.45)
    score = np.where(valid, prof * fc, 0.0)  # f-weighting flattens the 1/f background
    k = int(np.argmax(score))
    if score[k] <= 0:
        raise ValueError("no lattice period found in the power spectrum")
    if return_prominence:
        # a lattice gives sharp Bragg rings: compare the peak with the profile's local median
        lo, hi = max(0, k - nb // 8), min(nb, k + nb // 8 + 1)
        ref = np.median(score[lo:hi][valid[lo:hi]])
        return float(1.0 / fc[k]), float(score[k] / ref) if ref > 0 else float("inf")
    return float(1.0 / fc[k])


def sample_image(image: np.ndarray, xy: np.ndarray, *, backend: str | None = None, chunk: int = 1 << 18) -> np.ndarray:
    """Bilinear sample of ``image`` at sub-pixel points ``xy`` [N, 2] (x, y); outside -> nearest edge value."""
    img = np.ascontiguousarray(image, dtype=np.float32)
    H, W = img.shape
    pts = np.ascontiguousarray(np.clip(check_xy(xy), 0, [W - 1, H - 1]))
    kern = get_kernels(backend)
    out = np.empty(len(pts), np.float32)
    buf = np.empty((min(chunk, max(1, len(pts))), 1, 1), np.float32)
    for i in range(0, len(pts), chunk):
        p = pts[i:i + chunk]
        b = buf[: len(p)]
        kern.gather_patches(img, np.ascontiguousarray(p), 1, 0.0, b)
        out[i:i + chunk] = b[:, 0, 0]
    return out


def border_bands(xy: np.ndarray, intensity: np.ndarray, sublattice: np.ndarray, shape: tuple[int, int],
                 spacing: float, *, tol: float = 0.2, max_nn: float = 6.0,
                 side_level: bool = True) -> tuple[np.ndarray, list[float]]:
    """Find bands along the image borders where the scan, not the sample, sets the intensity.

    Scan fly-back often attenuates the first columns of every line (or the first lines of a frame),
    and the bandpass is less reliable next to such a band. Defects being rare, the *median*
    intensity of the column sites (sublattices 0 and 1, each divided by its own image-wide median;
    a sublattice too faint to tell from the noise, more than :data:`BAND_MAX_NONPOSITIVE` of its
    columns at or below 0, left out) in strips half a spacing wide is ~1 everywhere the image is
    sound -- up to an illumination or thickness gradient, which sets the level along a whole side. So
    each side's strips are compared with the sample's own level next to that side: the median over the
    column sites ``max_nn`` to ``2 max_nn`` spacings inside it, read along the side
    (:func:`_level_along`; just beyond the deepest band; the image-wide level where that holds fewer
    than :data:`LEVEL_SITES_PER_SUBLATTICE` sites per sublattice taking part). Against the image-wide
    level a 35% gradient marked a band 6.5 spacings wide along the bright side of a simulated image. A
    band starts at a border strip whose median is off by more than ``tol`` and extends inwards while
    the strips stay off by more than ``tol / 2`` (hysteresis: a fading band whose inner strip sits
    near ``tol`` does not flip in or out with the noise of a single strip's median); one more strip is
    added as margin.

    ``side_level=False`` compares with the image-wide level instead (the former rule, kept for
    ``benchmarks/ablation.py``).

    Returns ``observed`` (bool [N], False for sites in a band) and the band widths in px
    ``[left, right, top, bottom]``.
    """
    H, W = shape
    n = len(xy)
    observed = np.ones(n, bool)
    widths = [0.0, 0.0, 0.0, 0.0]
    cols = sublattice <= 1
    if cols.sum() < 20:
        return observed, widths
    rel = np.full(n, np.nan)
    n_sub = 0  # sublattices taking part
    for k in (0, 1):
        m = sublattice == k
        med = np.median(intensity[m]) if m.any() else 0.0
        if med > 0 and np.mean(intensity[m] <= 0) <= BAND_MAX_NONPOSITIVE:
            rel[m] = intensity[m] / med
            n_sub += 1
    step = 0.5 * spacing
    dists = (xy[:, 0], W - 1 - xy[:, 0], xy[:, 1], H - 1 - xy[:, 1])
    along = (xy[:, 1], xy[:, 1], xy[:, 0], xy[:, 0])  # position along each side
    lengths = (H, H, W, W)
    for b, d in enumerate(dists):
        # the sample's level next to this side (a gradient is not a band), along the side (nor is a
        # step of the illumination or the thickness that meets the side)
        inner = cols & np.isfinite(rel) & (d >= max_nn * spacing) & (d < 2 * max_nn * spacing)
        level = (_level_along(along[b], rel, inner, ALONG_WINDOW_NN * spacing, LEVEL_SITES_PER_SUBLATTICE * n_sub)
                 if side_level else np.ones(n))
        rel_side = rel / level
        # the whole side, then each quarter of it: a fly-back band can cover part of a frame only
        # (e.g. the lower 60% of the left edge), which the median over the whole side can miss
        parts = [np.ones(n, bool), *_side_parts(along[b], lengths[b], spacing)]
        for k, part in enumerate(parts):
            # a stretch's strips hold ~5-12 columns, so its median is noisy (+-0.25 on low-dose images):
            # a partial band starts only where a strip is off by PARTIAL_BAND_TOL (fly-back: ~1)
            start = tol if k == 0 else max(tol, PARTIAL_BAND_TOL)
            width = _band_width(d, rel_side, cols & part, step, start, tol / 2, max_nn * spacing)
            if width > 0:
                observed &= ~part | (d >= width)
                widths[b] = max(widths[b], width)
    return observed, widths


#: how far off (relative median) a border strip of a quarter side must be to start a band there
PARTIAL_BAND_TOL = 0.5
#: a sublattice's column intensities (band-passed: 0 is the background) take part only where at most
#: this share of them is <= 0 (for Gaussian noise: a median at least one standard deviation above 0;
#: a scan's gain, a gradient or a step does not change the share). The faint S2 columns of the real
#: MoS2 scans have their median at 0.33, 0.00 and -0.15 standard deviations (every other sublattice
#: of the shared and validation scans at 2.8-22): the intensity over such a median is noise of either
#: sign, up to +-300 in one strip
BAND_MAX_NONPOSITIVE = 0.16
#: the sample's level next to a side is read within this many spacings along it (:func:`_level_along`);
#: 2 or a level from the metal columns alone moved the bands of the unaltered shared scans (round 23,
#: with the faint S2 columns still counted); with them left out, 3 and 4 gave more bands on the dimmed
#: copies of the real MoS2 scans, not fewer (round 24)
ALONG_WINDOW_NN = 6.0
#: ... from at least this many sites per sublattice that takes part (both: 30)
LEVEL_SITES_PER_SUBLATTICE = 15


def _level_along(pos: np.ndarray, rel: np.ndarray, inner: np.ndarray, step: float,
                 min_sites: int) -> np.ndarray:
    """The sample's level next to one side at each site's position ``pos`` along it: the median of
    ``rel`` over the ``inner`` sites within ``step`` of points every ``step / 2`` along the side,
    linearly interpolated between them (a point with fewer than ``min_sites`` takes no part; the
    side's median where none has enough, 1 where the side has fewer than ``min_sites``). Positive.

    Against one level for the whole side, a side that an illumination or thickness step crosses
    (half the film at half the signal) read its strips' median between the two levels, and bands
    6.5 spacings wide were found along both sides the step meets (625 sites unjudged on the labelled
    WSe2 dimmed to 50 % on one half).

    >>> pos = np.arange(200.0); rel = np.where(pos < 100, 1.0, 0.5)
    >>> lev = _level_along(pos, rel, np.ones(200, bool), 20.0, 30)
    >>> float(lev[5]), float(lev[195])
    (1.0, 0.5)
    """
    n = len(pos)
    if inner.sum() < max(1, min_sites):  # (no sublattice taking part: min_sites 0, and maybe no site)
        return np.ones(n)
    side = float(np.median(rel[inner]))
    if not side > 0:
        return np.ones(n)
    p_in, r_in = pos[inner], rel[inner]
    order = np.argsort(p_in)
    p_in, r_in = p_in[order], r_in[order]
    centres = np.arange(p_in[0], p_in[-1] + step / 2, step / 2)
    lo, hi = np.searchsorted(p_in, centres - step), np.searchsorted(p_in, centres + step)
    enough = hi - lo >= min_sites
    centres, lo, hi = centres[enough], lo[enough], hi[enough]
    if not len(centres) or (hi == lo).any():  # (an empty window's median: NaN)
        return np.full(n, side)
    lev = window_medians(r_in, lo, hi)
    if not (lev > 0).all():
        return np.full(n, side)
    return np.interp(pos, centres, lev)


def _side_parts(pos: np.ndarray, length: int, spacing: float, n_parts: int = 4) -> list[np.ndarray]:
    """Site masks of ``n_parts`` equal stretches along a side (none when a stretch is shorter than 12
    spacings: too few columns per strip)."""
    if length / n_parts < 12 * spacing:
        return []
    edges = np.linspace(0, length, n_parts + 1)
    return [(pos >= a) & (pos < e) for a, e in zip(edges[:-1], edges[1:])]


def _band_width(d: np.ndarray, rel: np.ndarray, sites: np.ndarray, step: float, start: float, go_on: float,
                depth: float) -> float:
    """Width (px) of the band along one side among the column sites ``sites`` (0: none); see
    :func:`border_bands`. A band starts at a border strip off by more than ``start`` and goes on
    inwards while the strips are off by more than ``go_on``, at most ``depth`` px."""
    width = 0.0
    for i in range(int(depth / step)):
        sel = sites & np.isfinite(rel) & (d >= i * step) & (d < (i + 1) * step)
        if sel.sum() < 5:
            if i > 2:  # a sparse strip deeper than a spacing inside: stop looking
                break
            continue
        # start a band only where a strip is clearly off; once in one, go on while it is half as much
        if abs(float(np.median(rel[sel])) - 1.0) <= (go_on if width > 0 else start):
            break
        width = (i + 1) * step
    return width + step if width > 0 else 0.0


def _empty_table(meta: dict) -> SiteTable:
    cols = {k: np.zeros(0) for k in ("x", "y", "intensity")}
    cols["source"] = np.zeros(0, dtype="<U7")
    return SiteTable(cols, meta)


def find_sites(
    image,
    *,
    settings: SiteSettings | None = None,
    pixel_size: float | None = None,
    unit: str | None = "nm",
    timings: dict | None = None,
    **overrides,
) -> SiteTable:
    """Find every site of the atomic lattice in ``image``: found columns and predicted ones.

    Parameters
    ----------
    image : (H, W) array
        A HAADF-like micrograph (bright columns).
    settings : SiteSettings, optional
        All knobs; keyword ``overrides`` replace single fields (``find_sites(img, spacing=12.0)``).
    pixel_size : float, optional
        Pixel size in ``unit``; adds calibrated columns ``x_nm, y_nm`` (for ``unit="nm"``).
    timings : dict, optional
        Filled with the seconds spent per stage.

    Returns
    -------
    SiteTable
        Columns: ``x, y`` (px; x = column, y = row, pixel centres at integers), ``source``
        (``peak`` | ``lattice``), ``intensity`` (the bandpassed image at the site: column signal
        above the local background), ``raw_intensity`` (mean raw image value in a disc of
        ``intensity_radius_nn``), ``column_intensity`` (the same bandpass with a 1 px low-pass,
        ``column_noise_px``: what the defect scores compare), ``on_lattice`` (False for maxima off the local lattice),
        ``observed`` (False in a band along the border where the scan sets the intensity, see
        :func:`border_bands`, and within ``EDGE_UNJUDGED_PX`` of the image edge: sites up to the
        edge are listed, those cut by it not judged), ``peak_value``
        (bandpassed value at the maximum; NaN for lattice sites), ``fit_ok``, ``sublattice``
        (0 = metal, e.g. Mo: the brightest; 1 = chalcogen pair, e.g. S2: the middle -- the other way
        round with ``chalcogen_brighter``; 2 = hollow, the darkest; -1 unknown),
        ``a1x, a1y, a2x, a2y`` (local lattice vectors in px), ``lattice_rms`` (px),
        ``spacing_px``, ``lattice_angle_deg``, ``exx, eyy, exy, rotation_deg`` (local strain and
        rotation against the median lattice of the site's grain), ``grain`` (grain id, 0 the
        largest; 0 everywhere on a single crystal), ``grain_boundary`` (True within
        ``grains.boundary_nn`` spacings of another grain: where the defects of a polycrystal live),
        ``inversion_domain`` (True in a part of the image turned by 60 deg, a mirror-twin domain, whose
        sublattices are named from its own columns: :func:`stemfast.domains.inversion_domains`), ``crowded`` (True where another site is closer than ``CROWDED_NN`` spacings,
        :func:`stemfast.crowding.crowding`),
        and ``x_nm, y_nm`` when calibrated. ``meta`` holds the spacing, orientation, counts and
        settings (``calibration_ignored``: why a pixel size whose unit is no length was not used); ``meta["lattice"]["unsure"]`` why the lattice may be wrong (a
        :class:`LatticeUncertainWarning` when any: few peaks on nodes, a weak ring, local fits that
        disagree with it, a best-found sublattice mostly placed rather than found --
        ``best_sublattice_placed`` beyond ``MAX_SUBLATTICE_PLACED``, a lattice 2x or sqrt(3)x too
        fine); ``meta["lattice"]["distortion"]`` how anisotropic the lattice is (scan distortion or
        strain, :func:`stemfast.sitelattice.lattice_distortion`; a :class:`LatticeDistortionWarning`
        beyond ``MAX_ANISOTROPY``); ``meta["lattice"]["crowding"]`` how many sites are crowded and where
        (a :class:`~stemfast.crowding.LatticeCrowdingWarning` beyond ``MAX_CROWDED``);
        ``meta["lattice"]["inversion_domains"]`` how many sites lie in inversion domains (an
        :class:`InversionDomainWarning` when any; ``meta["lattice"]["inversion_undecided"]`` and that
        warning where the metal and chalcogen read swapped but too close in brightness to call it one); ``meta["lattice"]["n_grains"]``, and for a polycrystal ``meta["lattice"]["grains"]``
        (orientation, area, sites per grain, :func:`stemfast.grains.grain_summary`) with a
        :class:`~stemfast.grains.PolycrystalWarning`, its text in ``meta["lattice"]["grain_warning"]``;
        each grain has its own site lattice (phase map, fill-in, lattice indices, sublattice ranking and
        strain reference).

    Examples
    --------
    >>> from stemfast.synthetic import make_lattice
    >>> img, xy = make_lattice((128, 128), spacing=10.0, noise=0.05, seed=1)
    >>> t = find_sites(img)
    >>> len(t) > 100
    True
    """
    if settings is not None:
        check_type("settings", settings, SiteSettings, "stemfast.sites.SiteSettings(spacing=..., ...), or keywords")
    with one_blas_thread():  # the stages' parallelism is the kernels' own threads (backend.one_blas_thread)
        return _find_sites(image, settings, pixel_size, unit, timings, overrides)


def _with_overrides(s: SiteSettings, overrides: dict) -> SiteSettings:
    """``s`` with the keyword ``overrides`` of :func:`find_sites` (its nested ``lattice`` and ``grains``
    settings replaced whole)."""
    if not overrides:
        return s
    return SiteSettings(**{**s.to_dict(), **overrides, "lattice": overrides.get("lattice", s.lattice),
                           "grains": overrides.get("grains", s.grains)})


def _find_sites(image, settings: SiteSettings | None, pixel_size, unit, timings: dict | None,
                overrides: dict) -> SiteTable:
    s = _with_overrides(settings or SiteSettings(), overrides)
    pixel_size, unit, meta = _calibration(pixel_size, unit)
    img, dead, spikes = _repaired(check_image(image, min_side=MIN_IMAGE_SIDE), s)
    no_data = find_no_data(img)
    clipping = clipped_intensities(img, no_data)
    tm = timings if timings is not None else {}
    meta.update(shape=list(img.shape), material=s.material, chalcogen_brighter=s.resolved_chalcogen_brighter)
    t0 = time.perf_counter()
    s, noise, (img, jumps, ring, vac), spectrum = _noise_and_jumps(img, s, no_data)
    try:
        img, ring, contrast, vac = _ring_and_contrast(img, s, ring, vac, no_data, spectrum)
        t_jumps = time.perf_counter() - t0
        f = _find_lattice(img, s, tm, ring, no_data=no_data, vacuum=vac)
        tm["spacing"] = tm.get("spacing", 0.0) + t_jumps  # the scan jumps are looked for with the spacing
    except _NoLattice as exc:
        warnings.warn(str(exc), NoLatticeWarning, stacklevel=3)
        return _empty_table({**meta, "status": "no lattice", "reason": str(exc), **exc.meta})
    t0 = time.perf_counter()
    relevel = tm.get("relevel", 0.0)
    f, scan = _relevel_scan_lines(img, f, s, tm)
    t_lines = time.perf_counter() - t0 - (tm.get("relevel", 0.0) - relevel)  # the lines' check, not the re-run
    # 5. per-site intensity, sublattice, strain (with the scan lines checked against the lattice, and
    # the crowding check below)
    t0 = time.perf_counter()
    inten, f = _bandpass_at_sites(f, s)
    free = _lattice_free(f)
    cols, bands, scan_meta, domain_info = _site_columns(img, f, s, pixel_size, unit, scan, inten, free)
    _to_recorded(cols, jumps, pixel_size, unit, s.column_noise_px, img.shape)
    tm["describe"] = time.perf_counter() - t0 + t_lines
    idx = f.idx
    nodes = idx.kind != 2
    fit = nodes & np.isfinite(idx.rms)
    # the local fits' spacing as the cell area gives it (a regular lattice of the same area): the
    # ring is an average over the three directions, and under scan distortion (15-20 % on real
    # scans) the lengths of whichever two vectors a basis holds differ from it by up to 5 %
    spacing_fit = float(np.median(_iso_spacing(idx.basis[fit]))) if fit.any() else f.nn_fft
    S = np.linalg.inv(f.pmap.g).T
    angle = float(np.degrees(np.arctan2(*(SITE_FROM_METAL @ S)[0][::-1])) % 60.0)
    lattice_meta = _lattice_meta(s, f.ring, f.nn_fft, spacing_fit, idx, f.material, pixel_size, unit, f.pmap.g,
                                 cols["sublattice"], free)
    if f.film is not None:  # vacuum (holes, the flake's edge): no site is placed there
        lattice_meta["hole_fraction"] = round(f.film.hole_fraction(no_data), 4)
    if f.vacuum is not None:  # the ring was read on the film beside it (_bragg_ring)
        lattice_meta["vacuum_share"] = round(float(f.vacuum.mean()), 4)
    lattice_meta["scan_wobble"] = _scan_wobble(f, img.shape[0])
    if "warning" in lattice_meta["scan_wobble"]:
        warnings.warn(lattice_meta["scan_wobble"]["warning"], ScanWobbleWarning, stacklevel=3)
    t0 = time.perf_counter()
    judged = nodes & ~np.asarray(cols["grain_boundary"], bool)
    cols["crowded"] = np.zeros(len(idx.xy), bool)
    lattice_meta["crowding"] = crowding(idx.xy, img.shape, judged=judged, backend=s.backend, mark=cols["crowded"])
    tm["describe"] += time.perf_counter() - t0
    if "warning" in lattice_meta["crowding"]:
        warnings.warn(lattice_meta["crowding"]["warning"], LatticeCrowdingWarning, stacklevel=3)
    meta.update(
        status="ok",
        spacing_px=f.nn_fft,
        angle_deg=angle,
        n_sites=int(nodes.sum()),
        n_peaks=int((idx.peak >= 0).sum()),
        n_lattice=int((idx.kind == 1).sum()),
        n_off_lattice=int((idx.kind == 2).sum()),
        border_bands_px=[round(b, 2) for b in bands],
        holes=f.film is not None,
        pixel_size=pixel_size,
        unit=unit,
        lattice=lattice_meta,
    )
    if pixel_size:
        meta["spacing_nm"] = f.nn_fft * pixel_size * _to_nm(unit)
    lattice_meta["scan_lines"] = {**scan_meta, **_scan_jumps_meta(jumps, s.column_noise_px), **_dead_meta(dead)}
    _image_findings(lattice_meta, contrast=contrast, no_data=no_data, clipping=clipping, domains=domain_info,
                    noise={**noise, "column_filter_px": round(column_filter_px(s, f.nn), 3)},
                    spikes=spikes)
    lattice_meta["n_grains"] = 1 if f.gmap is None else f.gmap.n_grains
    if f.gmap is not None:
        lattice_meta["grains"] = _grains.grain_summary(idx, pixel_size=pixel_size, unit_to_nm=_to_nm(unit))
        lattice_meta["grain_warning"] = _grains.warn_polycrystal(lattice_meta["grains"], stacklevel=3)
    return SiteTable(cols, meta)


def _image_findings(lattice_meta: dict, *, contrast: dict, no_data: NoData, clipping: dict | None,
                    domains: dict, noise: dict, spikes: dict | None = None) -> None:
    """What :func:`find_sites` found about the image itself into ``lattice_meta`` (its contrast, regions
    without data, clipped intensities, inversion domains and a swap too close to call one --
    ``inversion_undecided`` --, correlated noise, spikes replaced), each with its warning raised."""
    if spikes:
        lattice_meta["spikes"] = spikes
        if "warning" in spikes:
            warnings.warn(spikes["warning"], SpikeWarning, stacklevel=4)
    if "undecided" in domains:
        domains = dict(domains)
        lattice_meta["inversion_undecided"] = domains.pop("undecided")
        warnings.warn(lattice_meta["inversion_undecided"]["warning"], InversionDomainWarning, stacklevel=4)
    lattice_meta["inversion_domains"] = domains
    lattice_meta["noise"] = noise
    if "warning" in noise:
        warnings.warn(noise["warning"], NoiseCorrelationWarning, stacklevel=4)
    if no_data.any():
        lattice_meta["no_data"] = _no_data_meta(no_data)
    lattice_meta["contrast"] = contrast
    if "warning" in contrast:
        warnings.warn(contrast["warning"], ContrastWarning, stacklevel=4)
    if clipping:
        lattice_meta["clipping"] = clipping
        warnings.warn(clipping["warning"], ClippingWarning, stacklevel=4)
    if "warning" in domains:
        warnings.warn(domains["warning"], InversionDomainWarning, stacklevel=4)


#: share of the image without data (:mod:`stemfast.nodata`) above which the summary warns
NO_DATA_WARN_SHARE = 0.01


def _no_data_meta(no_data: NoData) -> dict:
    """``lattice.no_data`` of ``summary.json``: the share of the image without data
    (:mod:`stemfast.nodata`), a burnt-in annotation's pixels and box (``overlay``), and a warning above
    :data:`NO_DATA_WARN_SHARE` or wherever there is an annotation."""
    share = no_data.share()
    out: dict = {"share": round(share, 4)}
    said = []
    if no_data.overlay is not None:
        n, (x0, y0, x1, y1) = no_data.overlay
        out["overlay"] = {"pixels": n, "box": [x0, y0, x1, y1]}
        said.append(f"a burnt-in annotation (a scale bar or text at the image's maximum value, in lines of "
                    f"{OVERLAY_RUN} px or more, or a bar and text at its minimum; or a region saturated there) covers {n} px within x {x0}-{x1}, "
                    f"y {y0}-{y1}: no data there, no sites are placed or judged there (read the original data, "
                    "not an exported picture, where you can)")
    if share >= NO_DATA_WARN_SHARE:
        said.append(f"{share:.1%} of the image holds no data (one constant value: the padding of an aligned, "
                    "drift-corrected or rotated frame, a mask, or vacuum that recorded no counts"
                    + (", or the annotation" if no_data.overlay is not None else "") + "): no sites are placed there")
    if said:
        out["warning"] = "; ".join(said)
    return out


def _noise_adapted(img: np.ndarray, s: SiteSettings, no_data: NoData, spectrum=None) -> tuple[SiteSettings, dict]:
    """``(settings, noise)``: ``s`` with its ``column_noise_px`` widened by the correlation length of
    ``img``'s noise (:func:`stemfast.noise.noise_correlation`: an upsampled, interpolated or filtered
    image; unchanged for a scan's own white noise), and what was measured (``lattice.noise`` of
    ``summary.json``; :func:`find_sites` adds ``column_filter_px``, the low-pass used once the spacing
    is known, :func:`column_filter_px`). ``spectrum``: ``img``'s :func:`stemfast.braggring.ring_spectrum`
    where already computed (its power spectrum serves where it is of the crop the check reads)."""
    noise = noise_correlation(img, None if not no_data.any() else ~no_data.pixels(),
                              power=None if spectrum is None else spectrum.power)
    if noise["correlation_px"] > 1.0:
        s = dataclasses.replace(s, column_noise_px=s.column_noise_px * noise["correlation_px"])
    return s, noise


def _noise_and_jumps(img: np.ndarray, s: SiteSettings, no_data: NoData):
    """``(settings, noise, (image, jumps, ring, vacuum), spectrum)``: :func:`_noise_adapted` and
    :func:`_undo_scan_jumps` of ``img``, one :func:`stemfast.braggring.ring_spectrum` of it serving both
    (and the ring read later, :func:`_ring_and_contrast`: ``spectrum`` where the image returned is
    ``img``; None where it is a repaired one)."""
    spectrum = ring_spectrum(img)
    s, noise = _noise_adapted(img, s, no_data, spectrum)
    out = _undo_scan_jumps(img, s, no_data, spectrum)
    return s, noise, out, (spectrum if out[0] is img else None)


def _ring_and_contrast(img: np.ndarray, s: SiteSettings, ring, vac, no_data: NoData | None, spectrum=None):
    """``(image, ring, contrast, vacuum)``: the dark vacuum the ring was read beside (:func:`_bragg_ring`;
    None: none, or not confirmed by the ring; ``vac`` when ``ring`` is given), the Bragg ring (read here when ``ring`` is None; :class:`_NoLattice`
    without one, or for a constant image; ``spectrum``: ``img``'s :func:`stemfast.braggring.ring_spectrum`
    where already computed), and ``img`` with bright columns (:func:`_oriented`, which
    needs the spacing). :func:`_find_lattice` is given both: every image it sees has passed here, or
    is one that already held a lattice (levelled scan lines)."""
    if float(img.max()) == float(img.min()):
        raise _NoLattice("image is constant: no lattice")
    if ring is None:
        ring, vac = _bragg_ring(img, s, no_data, spectrum)
    img, contrast = _oriented(img, s, float(s.spacing) if s.spacing is not None else ring.spacing,
                              _unread(no_data, vac), ring.g)
    return img, ring, contrast, vac


def _no_data_pixels(no_data: NoData | None) -> np.ndarray | None:
    """The pixels without data (bool, the image's shape), or None where there are none."""
    return None if no_data is None or not no_data.any() else no_data.pixels()


def _unread(no_data: NoData | None, vacuum: np.ndarray | None) -> np.ndarray | None:
    """The pixels the contrast check leaves out (bool): those without data and the dark vacuum;
    None where there are neither."""
    gap = _no_data_pixels(no_data)
    return gap if vacuum is None else (vacuum if gap is None else vacuum | gap)


def _oriented(img: np.ndarray, s: SiteSettings, spacing: float, unread: np.ndarray | None, g=None):
    """``(image, contrast)``: ``img`` with bright columns -- inverted where they are dark
    (``s.contrast``, :mod:`stemfast.contrast`) -- and ``lattice.contrast`` of the summary: ``columns``
    (bright / dark / unclear), the ``skew`` and the phase invariant (``phase_cos``, ``coherence``;
    with the metal lattice's first ring ``g``) it rests on (None where ``s.contrast`` says it or there
    is no ring), which of them decided (``by``), whether the image was ``inverted``, the ``setting``,
    and a ``warning`` where it was inverted or could not be told. ``unread``: bool, the pixels left out
    (no data, dark vacuum; None: none)."""
    if s.contrast != "auto":
        dark = s.contrast == "dark"
        return (inverted(img) if dark else img), {"columns": s.contrast, "skew": None, "inverted": dark,
                                                  "setting": s.contrast}
    c = column_contrast(img, spacing, mask=unread, g=g, backend=s.backend)
    info = {"columns": c.columns, "skew": _rounded(c.skew), "phase_cos": _rounded(c.phase_cos),
            "coherence": _rounded(c.coherence), "by": c.by, "inverted": c.columns == "dark", "setting": "auto"}
    if c.columns == "dark":
        info["warning"] = (f"the columns are dark on a bright background (bright-field / ABF contrast: "
                           f"{_evidence(c)}): the image was inverted so that they are bright. The "
                           "sublattice names assume HAADF-like contrast (the heaviest column the brightest); in ABF the "
                           "chalcogen pair is often the darker column (the analysis warns when the dark sites say the "
                           "names are swapped: then set sites.chalcogen_brighter = true). Set sites.contrast to say "
                           "which contrast the image has")
        return inverted(img), info
    if c.columns == "unclear":
        info["warning"] = (f"the image does not tell whether its columns are bright or dark ({_evidence(c)}): it was "
                           "read with bright columns (ADF / HAADF); set sites.contrast=\"dark\" "
                           "for a bright-field or ABF image")
    return img, info


def _rounded(v: float) -> float | None:
    return round(float(v), 3) if np.isfinite(v) else None


def _evidence(c) -> str:
    """What the contrast call of :func:`stemfast.contrast.column_contrast` rests on, for its warning."""
    skew = f"skewness {c.skew:.2f} at the lattice scale"
    if not np.isfinite(c.phase_cos):
        return skew
    return (f"phase of the lattice's reflections {c.phase_cos:+.2f} (cosine; coherence {c.coherence:.2f}), "
            f"{skew}")


class _NoLattice(Exception):
    """A stage of :func:`find_sites` found no lattice: the message of its ``NoLatticeWarning`` and the
    fields it adds to the empty table's meta."""

    def __init__(self, message: str, **meta) -> None:
        super().__init__(message)
        self.meta = meta


class _Lattice(NamedTuple):
    """What steps 1-4 of :func:`find_sites` found: the lattice and the columns indexed on it."""

    material: object  # stemfast.materials.Material
    ring: object  # the metal lattice's Bragg ring (braggring.metal_reciprocal_lattice)
    bp: np.ndarray | None  # the bandpassed image (None once step 5 has read it at the sites)
    pk: object  # the peaks (find_peaks)
    gmap: object  # grains (None: a single crystal)
    pmap: PhaseMap  # the (largest grain's) phase map
    idx: object  # the indexed sites (index_sites / grains.index_grains)
    nn_fft: float  # the site spacing from the phase map (px)
    nn: float  # the site spacing used (px): ``nn_fft`` unless the settings fix it
    film: object  # where the film is (lattice.FilmMask; None: no hole, no region without data)
    no_data: NoData | None  # the regions without data (stemfast.nodata)
    vacuum: np.ndarray | None = None  # the dark vacuum the ring was read beside (_bragg_ring; None: none)
    pmaps: tuple = ()  # each grain's phase map (grains.grain_phase_maps; empty: a single crystal)


def _find_lattice(img: np.ndarray, s: SiteSettings, tm: dict, ring=None, rereads: int = 0,
                  no_data: NoData | None = None, vacuum: np.ndarray | None = None) -> _Lattice:
    """Steps 1-4 of :func:`find_sites` (spacing, bandpass, peaks, site lattice); :class:`_NoLattice`
    when there is none. ``ring``: the Bragg ring of ``img`` when already known. When the columns
    show that the ring was a second-order one (:func:`stemfast.sitelattice.columns_on_one_coset`:
    a small image, whose first ring lies too near the spectrum's centre), steps 2-4 run again with
    the first ring (up to :data:`MAX_RING_REREADS` times). Likewise when even the best-found class of
    the lattice is mostly placed, not found (:func:`_too_fine`: a ``{200}`` / ``{300}`` or ``{110}`` ring
    taken as the first, where the first is buried under contamination or too near the centre of a
    strip's spectrum): the lattice is found again from the ring 2x or 3x
    (:func:`stemfast.sitelattice.columns_on_one_finer_coset`) or sqrt(3)x nearer the centre, and kept
    where it is a 2H site lattice (:func:`_a_2h_site_lattice`). With grains, where a grain's own columns
    show either (:func:`_grain_wrong_order`), the ring is read again on that grain's region alone
    (:func:`_grain_reread`). The checks: :func:`_wrong_order_reread`. A given ``spacing`` is kept as given.
    ``vacuum``: the dark vacuum ``ring`` was read beside (:func:`_bragg_ring`), when ``ring`` is given."""
    t0 = time.perf_counter()
    material = get_material(s.material)
    # 1. the metal lattice's first Bragg ring: the site spacing and the lattice over the image
    if ring is None:
        ring, vacuum = _bragg_ring(img, s, no_data)
    nn = float(s.spacing) if s.spacing is not None else ring.spacing
    tm["spacing"] = time.perf_counter() - t0

    # 2. bandpass at the lattice scale (and, with the same background, the refinement's image of step 3:
    # one transform of the image for both)
    t0 = time.perf_counter()
    refine_noise = max(s.refine_noise_nn * nn, REFINE_NOISE_PX)
    if s.refine_background_nn == s.background_nn:
        bp, refine_img = bandpasses(img, noise_px=[s.noise_nn * nn, refine_noise], background_px=s.background_nn * nn,
                                    backend=s.backend)
    else:
        bp = bandpass(img, noise_px=s.noise_nn * nn, background_px=s.background_nn * nn, backend=s.backend)
        refine_img = None
    tm["bandpass"] = time.perf_counter() - t0

    # 3. peaks + sub-pixel refinement (on a lightly smoothed copy of the raw image)
    t0 = time.perf_counter()
    if refine_img is None:  # a background of its own, out in Fourier space like the detection's; or none
        refine_img = (bandpass(img, noise_px=refine_noise, background_px=s.refine_background_nn * nn, backend=s.backend)
                      if s.refine_background_nn > 0 else
                      ndimage.gaussian_filter(img, s.refine_noise_nn * nn) if s.refine_noise_nn > 0 else img)
    pk = find_peaks(
        bp,
        min_distance=max(1.0, s.min_distance_nn * nn),
        threshold=s.threshold,
        border=s.border_px,
        refine=s.refine,
        refine_image=refine_img,
        radius=max(1.5, s.refine_radius_nn * nn),
        backend=s.backend,
    )
    pk = _drop_peaks_without_data(pk, no_data)
    # the refinement image's pixel noise is all step 4 needs of it: dropped here, not kept through the
    # indexing (a full image of float32: 1 GB at 16k x 16k)
    refine_sigma = pixel_noise(refine_img)
    del refine_img
    tm["peaks"] = time.perf_counter() - t0
    if len(pk.xy) < 8:
        raise _NoLattice(f"only {len(pk.xy)} columns found: no lattice", spacing_px=nn)

    # 4. the site lattice over the image (phase map), one site per node
    t0 = time.perf_counter()
    idx, pk, gmap, pmaps, nn_fft, nn, film = _index_columns(img, bp, pk, refine_sigma, ring, s, nn, no_data, vacuum)
    tm["lattice"] = time.perf_counter() - t0
    log.info("%.1f%% of the strong peaks sit on a node of the site lattice", 100 * idx.on_node)
    if idx.on_node < 0.5:
        raise _NoLattice(f"only {idx.on_node:.0%} of the columns sit on a lattice: no lattice", spacing_px=nn)
    reread = _wrong_order_reread(img, s, tm, ring, idx, gmap, nn, nn_fft, rereads, no_data, vacuum)
    if reread is not None:
        return reread
    return _Lattice(material, ring, bp, pk, gmap, pmaps[0], idx, nn_fft, nn, film, no_data, vacuum,
                    pmaps if gmap is not None else ())


def _wrong_order_reread(img, s: SiteSettings, tm: dict, ring, idx, gmap, nn: float, nn_fft: float, rereads: int,
                        no_data: NoData | None, vacuum: np.ndarray | None) -> _Lattice | None:
    """The lattice of :func:`_find_lattice` found again where its columns show the ring was taken at
    the wrong order, else None (keep it): the second-order re-read where every column sits on one
    coset (:func:`stemfast.sitelattice.columns_on_one_coset`); with grains, the ring read on the
    region of a grain whose own lattice is of the wrong order (:func:`_grain_reread`); for a single
    crystal whose columns form a honeycomb on one coset (:func:`_honeycomb_reread`) or whose lattice
    is too fine (:func:`_too_fine`), the coarser rings kept where they give a 2H site lattice
    (:func:`_a_2h_site_lattice`). Never with a given spacing, nor past
    :data:`MAX_RING_REREADS`."""
    if s.spacing is not None or rereads >= MAX_RING_REREADS:
        return None
    if columns_on_one_coset(idx):
        log.info("every column sits on one third of the nodes of the %.2f px lattice: its Bragg ring is a "
                 "second-order one; the lattice is found again from the first", nn)
        return _find_lattice(img, s, tm, ring.second_order_reread(), rereads + 1, no_data, vacuum)
    if gmap is not None:
        return _grain_reread(img, s, tm, ring, idx, gmap, nn_fft, rereads, no_data, vacuum)
    if columns_on_a_honeycomb(idx):
        coarse = _honeycomb_reread(img, s, tm, ring, idx, nn, nn_fft, rereads, no_data, vacuum)
        if coarse is not None:
            return coarse
    fine = _too_fine(idx, nn_fft)
    if fine is None:
        return None
    # a higher-order ring taken as the first: a coarser lattice where it is a 2H one
    n = columns_on_one_finer_coset(idx)
    for coarser in ([ring.finer_order_reread(n)] if n else []) + [ring.second_order_reread()]:
        log.info("no column on %.0f%% of even the best-found class of the %.2f px lattice: the lattice is "
                 "tried again from a ring %.2fx nearer the centre", 100 * fine, nn, coarser.spacing / ring.spacing)
        with contextlib.suppress(_NoLattice):
            coarse = _find_lattice(img, s, tm, coarser, rereads + 1, no_data, vacuum)
            if _a_2h_site_lattice(coarse.idx, coarse.nn_fft, fine):
                return coarse
    return None


def _honeycomb_reread(img, s: SiteSettings, tm: dict, ring, idx, nn: float, nn_fft: float, rereads: int,
                      no_data: NoData | None, vacuum: np.ndarray | None) -> _Lattice | None:
    """:func:`_wrong_order_reread` of a single crystal whose columns form a honeycomb on one class of
    its lattice (:func:`stemfast.sitelattice.columns_on_a_honeycomb`), no third of that class empty: the
    lattice found again from the ring ``sqrt(3)`` nearer the centre, kept where it is a 2H site lattice
    (:func:`_a_2h_site_lattice`; else None, and the other checks go on). A band of scan lines about half
    a period off slips the class's colouring over the image: 3 in 10 such MoS2 images were read
    ``sqrt(3)`` too fine (6.37 px for 11.4, three times the sites), said only as anisotropic."""
    log.info("the columns form a honeycomb on one third of the nodes of the %.2f px lattice: its Bragg ring is "
             "a second-order one; the lattice is found again from the first", nn)
    finer = _best_sublattice_placed(idx.cls, idx.kind, idx.xy, nn_fft)
    with contextlib.suppress(_NoLattice):
        coarse = _find_lattice(img, s, tm, ring.second_order_reread(), rereads + 1, no_data, vacuum)
        if _a_2h_site_lattice(coarse.idx, coarse.nn_fft, 1.0 if finer is None else finer):
            return coarse
    return None


def _grain_reread(img, s: SiteSettings, tm: dict, ring, idx, gmap, nn_fft: float, rereads: int,
                  no_data: NoData | None, vacuum: np.ndarray | None) -> _Lattice | None:
    """:func:`_wrong_order_reread` of a polycrystal: where a grain's own lattice is of the wrong order
    (:func:`_grain_wrong_order`), the Bragg ring read again on that grain's region alone (the rest and
    the vacuum set to its mean, :func:`stemfast.vacuum.film_spectrum_image`) and the lattice found again from it,
    kept where that ring is coarser and no grain of the new lattice is of the wrong order; else None.
    A small image of two grains holds both grains' spots on its first ring, twelve on a ring of a few
    tens of bins: none of its hexagons stands out against the ring, and a higher-order ring was taken
    (two 128 px halves of a 15.2 px lattice 30 degrees apart: the ``{110}`` ring, 8.77 px)."""
    wrong = _grain_wrong_order(idx, nn_fft)
    if wrong is None:
        return None
    k, why = wrong
    elsewhere = ~_grain_region(gmap, k, img.shape)
    if vacuum is not None:
        elsewhere |= vacuum
    grain_ring, _ = _ring_of(film_spectrum_image(img, elsewhere, SPECTRUM_CROP, _no_data_pixels(no_data)), s)
    if grain_ring is None or not grain_ring.spacing > (1 + GRAIN_REREAD_COARSER) * ring.spacing:
        return None
    log.info("grain %d's columns: %s; the ring is read again on its region alone (%.2f px for %.2f px)", k, why,
             grain_ring.spacing, ring.spacing)
    note = (ring.note + f" (re-read on grain {k}'s region: {grain_ring.note or '{100}'})").strip()
    with contextlib.suppress(_NoLattice):
        coarse = _find_lattice(img, s, tm, dataclasses.replace(grain_ring, note=note), MAX_RING_REREADS, no_data,
                               vacuum)
        if _grain_wrong_order(coarse.idx, coarse.nn_fft) is None:
            return coarse
    return None


#: :func:`_grain_reread` keeps a ring read on one grain's region only where its site spacing is at least
#: this share larger than the ring's it replaces (a wrong order is sqrt(3), 2x or more off)
GRAIN_REREAD_COARSER = 0.2


def _grain_region(gmap, k: int, shape: tuple[int, int]) -> np.ndarray:
    """bool [shape]: the pixels of grain ``k`` of ``gmap`` (its label grid enlarged to the image)."""
    lab = np.repeat(np.repeat(gmap.labels == k, gmap.factor, axis=0), gmap.factor, axis=1)
    out = np.zeros(shape, bool)
    h, w = min(shape[0], lab.shape[0]), min(shape[1], lab.shape[1])
    out[:h, :w] = lab[:h, :w]
    if h < shape[0]:
        out[h:, :w] = out[h - 1:h, :w]
    if w < shape[1]:
        out[:, w:] = out[:, w - 1:w]
    return out


def _grain_wrong_order(idx, spacing: float) -> tuple[int, str] | None:
    """``(grain, why)`` for the first grain of the site lattice ``idx`` (a
    :class:`stemfast.grains.GrainIndex`) whose own sites show a lattice of the wrong order: every
    column on one coset (:func:`stemfast.sitelattice.columns_on_one_coset`) or even the best-found
    class mostly placed (:func:`_too_fine`); None when none does, or ``idx`` has no grains. Per grain:
    the classes of two grains' lattices are counted each from its own origin, and over the image
    neither check fires (two grains 30 degrees apart, each on the ``{110}`` lattice, said nothing)."""
    grain = getattr(idx, "grain", None)
    if grain is None:
        return None
    grain = np.asarray(grain)
    for k in np.unique(grain):
        m = grain == k
        sub = _rows(idx, m)
        if columns_on_one_coset(sub):
            return int(k), ("every column sits on one third of the nodes of its lattice (a second-order ring, "
                            "a spacing sqrt(3)x too small)")
        placed = _too_fine(sub, spacing)
        if placed is not None:
            return int(k), (f"no column was found on {placed:.0%} of the sites of even its best-found class (a "
                            "higher-order ring, a spacing 2x, sqrt(3)x or more too small)")
    return None


def _filled_dead_runs(img: np.ndarray, s: SiteSettings) -> tuple[np.ndarray, np.ndarray]:
    """``(image, runs)``: ``img`` with the parts of scan lines the detector did not record
    (:func:`stemfast.scanlines.dead_runs`, at least :data:`DEAD_MIN_PX` long) filled from the lines
    above and below them (:func:`stemfast.scanlines.filled_dead_runs`), and those parts [K, 3]; ``img``
    itself and none when there are none or ``scan_lines`` is off."""
    from .scanlines import dead_runs, filled_dead_runs

    if not s.scan_lines:
        return img, np.zeros((0, 3), np.int64)
    runs = _off_annotations(img, dead_runs(img, DEAD_MIN_PX))
    return (filled_dead_runs(img, runs) if len(runs) else img), runs


def _off_annotations(img: np.ndarray, runs: np.ndarray) -> np.ndarray:
    """``runs`` [K, 3] (``row, x0, x1``) without those on a burnt-in annotation: a thin scale bar (one to
    :data:`~stemfast.scanlines.DEAD_MAX_LINES` lines of one value, the image's maximum) reads like a
    dropout, but it and its text are the annotation test's (:func:`stemfast.nodata.overlay_pixels`),
    left in place for it to find, not filled from the lines around them."""
    if not len(runs):
        return runs
    with np.errstate(invalid="ignore"):
        top = np.nanmax(img)
    at_top = img[runs[:, 0], runs[:, 1]] == top
    if not at_top.any():
        return runs
    over = overlay_pixels(img)
    if over is None:
        return runs
    on = np.array([over[y, x0:x1].mean() > 0.5 for y, x0, x1 in runs])
    return runs[~(at_top & on)]


def _repaired(img: np.ndarray, s: SiteSettings) -> tuple[np.ndarray, np.ndarray, dict | None]:
    """``(image, dead, spikes)``: ``img`` with the parts of lines the detector did not record filled
    (:func:`_filled_dead_runs`) and then its single-pixel spikes replaced (:func:`_despiked`)."""
    img, dead = _filled_dead_runs(img, s)
    img, spikes = _despiked(img, s)
    return img, dead, spikes


def _despiked(img: np.ndarray, s: SiteSettings) -> tuple[np.ndarray, dict | None]:
    """``(image, spikes)``: ``img`` with its single-pixel spikes replaced (:func:`stemfast.spikes.despiked`)
    and their :func:`~stemfast.spikes.spike_meta`; ``img`` itself and None when there are none or
    ``despike`` is off."""
    if not s.despike:
        return img, None
    out, n, t = despiked(img)
    return (out, spike_meta(n, img.size, t)) if n else (img, None)


def _near_no_data(xy: np.ndarray, no_data: NoData | None, spacing: float) -> np.ndarray:
    """Bool [N]: the sites with a pixel without data (:mod:`stemfast.nodata`) at their centre or one
    ``spacing`` away in any of 12 directions."""
    if no_data is None or not no_data.any() or not len(xy):
        return np.zeros(len(xy), bool)
    return no_data.around(xy, spacing).any(axis=1)


#: a site is next to a lattice-free one (:func:`_next_to_free`) within this many site spacings: its
#: six nearest neighbours at 1, with room for a scan distortion of up to 25 %
NEXT_TO_FREE_NN = 1.25


def _next_to_free(xy: np.ndarray, free: np.ndarray, spacing: float) -> np.ndarray:
    """Bool [N]: the sites not in ``free`` with a ``free`` site within :data:`NEXT_TO_FREE_NN`
    ``spacing`` (a nearest neighbour on the site lattice)."""
    out = np.zeros(len(xy), bool)
    if not free.any() or free.all():
        return out
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy[free]).query(xy[~free], k=1, distance_upper_bound=NEXT_TO_FREE_NN * spacing)
    out[~free] = np.isfinite(d)
    return out


def _drop_sites_without_data(idx, no_data: NoData | None, spacing: float):
    """``idx`` without the sites placed more than half a ``spacing`` deep in a region without data
    (:mod:`stemfast.nodata`): their centre and 12 points half a spacing around it hold no data. (A
    column that the region's edge cuts stays, as at the image edge; one that the local fits carried
    from a maximum at the edge into the region does not.)"""
    if no_data is None or not no_data.any() or not len(idx.xy):
        return idx
    keep = ~no_data.around(idx.xy, 0.5 * spacing).all(axis=1)
    return idx if keep.all() else _rows(idx, keep)


def _rows(obj, keep: np.ndarray):
    """A frozen dataclass of per-row arrays (peaks, sites) with only the rows ``keep``."""
    sel = {f.name: (v[keep] if isinstance(v, np.ndarray) and v.shape[:1] == keep.shape else v)
           for f in dataclasses.fields(obj) for v in [getattr(obj, f.name)]}
    return dataclasses.replace(obj, **sel)


def _drop_peaks_without_data(pk, no_data: NoData | None):
    """``pk`` without the maxima that lie where the image holds no data (:mod:`stemfast.nodata`: the
    band-pass rings at the edge of a constant margin, and those rings are no columns)."""
    if no_data is None or not no_data.any() or not len(pk.xy):
        return pk
    keep = ~no_data.at_xy(pk.xy)
    return pk if keep.all() else _rows(pk, keep)


def _scan_wobble(f: _Lattice, height: int) -> dict:
    """:func:`stemfast.wobble.line_wobble` of the columns of ``f`` (those of the largest grain, whose
    phase map ``f.pmap`` is)."""
    idx = f.idx
    sel = (idx.kind == 0) & (idx.peak >= 0)
    if f.gmap is not None:
        sel &= np.asarray(idx.grain) == 0
    xy = f.pk.xy[idx.peak[sel]]
    return line_wobble(node_residuals(xy, idx.ij[sel], f.pmap)[:, 0], xy[:, 1], height, f.nn_fft)


def _drop_peaks_in_holes(pk, film, spacing: float):
    """``pk`` without the maxima more than half a ``spacing`` deep in a hole of the film (``film``: a
    :class:`stemfast.lattice.FilmMask`, ``None`` without holes): vacuum's noise maxima, which the
    site lattice would otherwise index as columns. A column that the hole's edge cuts stays."""
    if film is None or not len(pk.xy):
        return pk
    keep = film(ring_points(pk.xy, 0.5 * spacing).reshape(-1, 2)).reshape(len(pk.xy), -1).any(axis=1)
    return pk if keep.all() else _rows(pk, keep)


def _bragg_ring(img: np.ndarray, s: SiteSettings, no_data: NoData | None = None, spectrum=None):
    """``(ring, vacuum)``: the metal lattice's first Bragg ring (step 1 of :func:`find_sites`); :class:`_NoLattice` when
    the power spectrum has no lattice period or no hexagonal ring, or a ring finer than the smallest
    site spacing the pipeline takes (2 px: noise near Nyquist).

    Where the image holds dark vacuum (:func:`stemfast.vacuum.dark_vacuum`: a flake's edge, a hole),
    the ring is also read on the crop that holds the most film with the vacuum set to the film's mean
    (:func:`stemfast.vacuum.film_spectrum_image`), and the more prominent of the two rings is kept;
    its ``note`` says so. The guess counts only where the lattice confirms it: its Bragg amplitude
    there at most :data:`stemfast.vacuum.VACUUM_MAX_BRAGG` of the rest's
    (:func:`stemfast.vacuum.vacuum_bragg_ratio`; clean film beside a bright contamination patch may
    pass the darkness tests). ``vacuum`` is the confirmed vacuum (bool, the image's shape), else
    None. ``spectrum``: ``img``'s :func:`stemfast.braggring.ring_spectrum` where already computed."""
    gap = _no_data_pixels(no_data)
    ring, why = _ring_of(img, s, spectrum)
    vac = dark_vacuum(img, gap)
    used = None
    if vac is not None:
        film_ring, _ = _ring_of(film_spectrum_image(img, vac, SPECTRUM_CROP, gap), s)
        probe = film_ring if film_ring is not None else ring
        ratio = float("nan") if probe is None else vacuum_bragg_ratio(img, probe.g, vac)
        if ratio < VACUUM_MAX_BRAGG:  # the lattice confirms it: no lattice there
            used = vac
            if film_ring is not None and (ring is None or film_ring.prominence > ring.prominence):
                share = float(vac.mean())
                ring = dataclasses.replace(film_ring, note=(film_ring.note + f" read on the film ({share:.0%} of the "
                                                            "image dark vacuum left out)").strip())
        else:
            log.info("a dark, quiet region (%.0f%% of the image) holds the lattice (Bragg amplitude %.2f of the "
                     "rest's): film, not vacuum", 100 * float(vac.mean()), ratio)
    if ring is None:
        raise _NoLattice(why)
    return ring, used


def _ring_of(img: np.ndarray, s: SiteSettings, spectrum=None):
    """``(ring, None)`` or ``(None, why)``: :func:`_bragg_ring` of one image, the vacuum not looked at
    (``spectrum``: its :func:`stemfast.braggring.ring_spectrum` where already computed).

    The radial profile's peak must stand out (:data:`MIN_FFT_PROMINENCE`) before a ring is looked for.
    Where it does not but the spacing is given (``s.spacing``), a hexagon of Bragg spots at that
    spacing that stands out by :data:`MIN_RING_PROMINENCE` is still taken (not the image's own
    strongest ring, nor a weak one: in noise some six spots stand out by 4-5 where the profile has no
    peak). On a small image the profile's window around a low-order peak holds few bins, two Bragg
    rings' among them: a clean 128 px image of an 11-13 px lattice reads 3-3.5, and the given spacing
    is the way past it."""
    short = min(img.shape)
    try:
        _, prominence = estimate_period_fft(img, return_prominence=True)
    except ValueError:
        prominence = 0.0
    flat = prominence < MIN_FFT_PROMINENCE
    ring = (metal_reciprocal_lattice(img if spectrum is None else spectrum, spacing_hint=s.spacing)
            if not flat or s.spacing is not None else None)
    if flat and not (ring is not None and ring.by_spacing and ring.standout >= MIN_RING_PROMINENCE):
        small = (f"; the image's short side, {short} px, holds few lattice periods: give the spacing "
                 "(--spacing) to look for the ring there" if short <= SMALL_SPECTRUM_PX and s.spacing is None else "")
        if s.spacing is not None:  # what the given spacing found there
            small = ("; no hexagon of Bragg spots at the given spacing stands out" if ring is None or not ring.by_spacing else
                     f"; the hexagon of Bragg spots at the given spacing stands out by {ring.standout:.1f} < "
                     f"{MIN_RING_PROMINENCE:g}")
        return None, (f"no lattice period in the power spectrum (peak prominence {prominence:.2f} < "
                      f"{MIN_FFT_PROMINENCE}{small}): no lattice")
    if ring is None:
        few = (f" (the image's short side, {short} px, holds few lattice periods: the ring's spots are then too "
               "near the spectrum's centre to be read)" if short < SHORT_SIDE_PX else "")
        return None, f"no hexagonal ring of Bragg spots in the power spectrum{few}: no lattice"
    if not ring.spacing >= MIN_RING_SPACING_PX:
        return None, (f"the strongest hexagonal ring of Bragg spots implies a site spacing of {ring.spacing:.2f} px, "
                      f"below {MIN_RING_SPACING_PX:g} px (noise near the Nyquist frequency, not columns): no lattice")
    return ring, None


#: where no grains were found and the phase map's site spacing differs from the ring's by more than this
#: share, the grains are looked for again at the phase map's (:func:`_index_columns`). Two 128 px halves
#: of a 15.2 px lattice 17 deg apart: the ring was a distorted hexagon of the wide search (17.8 px), at
#: which the columns showed no orientation; the phase map gave 15.0 px, and at it (its lattice turned to
#: each) both grains. On a single crystal the two agree to a few per cent
GRAIN_SPACING_RETRY = 0.1


def _index_columns(img, bp, pk, refine_sigma: float, ring, s: SiteSettings, nn: float, no_data=None, vacuum=None):
    """Step 4 of :func:`find_sites`: the columns ``pk`` indexed on the site lattice of each grain
    (``vacuum``, :func:`stemfast.vacuum.dark_vacuum`, is left out of the phase map's refinement);
    ``refine_sigma``: the pixel noise of the image the peaks were refined on (their position variance).

    Returns ``(idx, pk, gmap, pmaps, nn_fft, nn, film)``: ``pk`` without the maxima deep in a hole of
    the film (:func:`_drop_peaks_in_holes`); ``pmaps`` the phase maps, one per grain (the largest
    grain's first; one map for a single crystal); ``nn`` becomes the phase map's spacing unless the
    settings fix it.
    """
    peak_xy = pk.xy
    # grains of different orientation: one site lattice each (None: a single crystal)
    gmap = _grains.find_grains(img, ring.g, spacing=nn, peak_xy=peak_xy, settings=s.grains, exclude=vacuum)
    if gmap is None:
        pmap = PhaseMap(img, ring.g, exclude=vacuum)
        pmaps = [pmap]
        if s.spacing is None and abs(site_spacing(pmap.g) / nn - 1) > GRAIN_SPACING_RETRY:
            # a ring far off the lattice's spacing (a distorted hexagon over two grains): the columns'
            # orientations looked for again at the phase map's spacing, turned from its lattice
            gmap = _grains.find_grains(img, pmap.g, spacing=site_spacing(pmap.g), peak_xy=peak_xy,
                                       settings=s.grains, exclude=vacuum)
    if gmap is not None:
        pmaps = _grains.grain_phase_maps(img, gmap)
        pmap = pmaps[0]  # the largest grain's
    nn_fft = site_spacing(pmap.g)
    if s.spacing is None:
        nn = nn_fft
    film = None
    if s.detect_holes:
        # the Bragg amplitude (of any grain's lattice) tells the columns from the vacuum's noise maxima
        film = film_mask(img, bp, peak_xy, nn, no_data, lambda xy: np.max([p.amplitude(xy) for p in pmaps], axis=0))
    pk = _drop_peaks_in_holes(pk, film, nn)
    peak_xy = pk.xy
    peak_var = None
    if pk.amplitude is not None:
        peak_var = position_variance(pk.amplitude, pk.sigma, max(1.5, s.refine_radius_nn * nn), refine_sigma)
    index_kw = dict(peak_var=peak_var, shape=img.shape, spacing=nn, film=film, fill=s.fill, tol=s.node_tol_nn,
                    off_strength=s.off_lattice_strength, margin_px=s.lattice.edge_margin_px,
                    fit_radius=s.lattice.fit_radius, backend=s.backend)
    if gmap is None:
        idx = index_sites(peak_xy, pk.value, pmap, **index_kw)
    else:
        idx = _grains.index_grains(peak_xy, pk.value, gmap, pmaps, settings=s.grains, **index_kw)
    return _drop_sites_without_data(idx, no_data, nn), pk, gmap, tuple(pmaps), nn_fft, nn, film


def _bandpass_at_sites(f: _Lattice, s: SiteSettings) -> tuple[np.ndarray, _Lattice]:
    """``(intensity, f)``: the detection's bandpassed image ``f.bp`` read at the sites, and ``f`` without it
    (``bp`` None), so that it is let go before step 5 makes a bandpassed image of its own (a full image
    of float32 each: 1 GB at 16k x 16k)."""
    return sample_image(f.bp, f.idx.xy, backend=s.backend), f._replace(bp=None)


def _site_columns(img: np.ndarray, f: _Lattice, s: SiteSettings, pixel_size, unit,
                  scan, inten: np.ndarray, free: np.ndarray) -> tuple[dict, list, dict, dict]:
    """Step 5 of :func:`find_sites`: the columns of the site table (intensity, sublattice, strain,
    lattice, grain, calibrated positions), the widths of the border bands, the scan lines' meta and
    the inversion domains' (:func:`_inversion_domains`). ``scan``: what
    :func:`_scan_lines` gives for ``img`` and ``f``'s lattice, when already known (else None). ``inten``:
    the detection's bandpassed image read at the sites (:func:`_bandpass_at_sites`; ``f.bp`` is None).
    ``free``: the sites where the image shows no lattice (:func:`_lattice_free`): they do not name the
    sublattices and are not judged (``observed`` False)."""
    idx, pk, gmap = f.idx, f.pk, f.gmap
    nn = f.nn
    xy = idx.xy
    # inten, the column intensity, is the bandpassed image at the site: a Gaussian-weighted (sigma noise_nn)
    # column sum with the local background removed -- the best single-number estimate of what sits
    # in a column (it is what tells a half-occupied S2 column from a full one)
    # scan lines that are off (streaks, row jumps; found against the lattice) are levelled before the
    # column intensities are read, and the sites on them are marked (analysis takes out a gain there)
    lines, streak = _scan_lines(img, idx, xy, s, f.no_data) if scan is None else scan
    column = _column_intensity(img, xy, nn, s, lines)
    raw = site_intensity(img, np.ascontiguousarray(xy, dtype=np.float64), radius=max(1.0, s.intensity_radius_nn * nn),
                         backend=s.backend)
    named = np.where(free, np.nan, inten)  # the sublattices are named where the lattice is seen
    if gmap is None:
        sub = _rank_sublattices(idx.cls, named, s.resolved_chalcogen_brighter)
        strain = local_strain(idx.basis)
    else:  # sublattices and the strain reference are each grain's own
        sub = _grains.by_grain(idx.grain, lambda c, v: _rank_sublattices(c, v, s.resolved_chalcogen_brighter), idx.cls, named)
        strain = _grains.by_grain(idx.grain, local_strain, idx.basis)
    # sites in a band along the border where the scan attenuates the signal cannot be judged
    observed, bands = border_bands(xy, inten, sub, img.shape, nn)
    # a column centred within a px of the edge is a site, but the scan shows at most half of it: its
    # intensity (and patch) cannot be judged
    observed &= border_distance(xy, img.shape) >= EDGE_UNJUDGED_PX
    # likewise within a spacing of a region without data (an aligned frame's padding): the column
    # and its neighbourhood are cut there as at the image edge
    observed &= ~_near_no_data(xy, f.no_data, nn)
    observed &= ~free  # no lattice seen there: a position extrapolated, nothing to judge
    # a column next to such a part is cut by it as at the image edge (its neighbourhood, patch and
    # local references half missing): on a synthetic image half amorphous most flagged sites sat there
    observed &= ~_next_to_free(xy, free, nn)
    # inversion domains (mirror-twin boundaries): the chalcogen and hollow cosets named per domain
    grain = np.zeros(len(xy), np.int64) if gmap is None else idx.grain
    sub, domains = _inversion_domains(xy, sub, idx.cls, inten, observed, grain, s.resolved_chalcogen_brighter,
                                      s.backend)
    n = len(xy)
    has_pk = idx.peak >= 0
    peak_value = np.full(n, np.nan)
    peak_value[has_pk] = pk.value[idx.peak[has_pk]]
    fit_ok = np.zeros(n, dtype=bool)
    fit_ok[has_pk] = pk.ok[idx.peak[has_pk]] if pk.ok is not None else True
    basis = idx.basis
    ang = np.degrees(np.arctan2(basis[:, 0, 1], basis[:, 0, 0])) % 60.0
    source = np.array(["peak", "lattice", "off_lattice"])[idx.kind]
    cols = {
        "x": xy[:, 0],
        "y": xy[:, 1],
        "source": source,
        "intensity": inten.astype(np.float64),
        "raw_intensity": raw.astype(np.float64),
        "column_intensity": column.astype(np.float64),
        "peak_value": peak_value,
        "fit_ok": fit_ok,
        "on_lattice": idx.kind != 2,
        "observed": observed,
        "sublattice": sub,
        "lattice_i": np.where(idx.kind == 2, 0, idx.ij[:, 0]).astype(np.int64),
        "lattice_j": np.where(idx.kind == 2, 0, idx.ij[:, 1]).astype(np.int64),
        "a1x": basis[:, 0, 0],
        "a1y": basis[:, 0, 1],
        "a2x": basis[:, 1, 0],
        "a2y": basis[:, 1, 1],
        "lattice_rms": idx.rms,
        "spacing_px": np.sqrt((basis ** 2).sum(-1)).mean(-1),
        "lattice_angle_deg": ang,
        **strain,
        "grain": grain,
        "grain_boundary": np.zeros(len(xy), bool) if gmap is None else idx.boundary,
        "inversion_domain": domains["inverted"],
        "scan_streak": streak,
    }
    if pixel_size:
        cols["x_nm"] = xy[:, 0] * pixel_size * _to_nm(unit)
        cols["y_nm"] = xy[:, 1] * pixel_size * _to_nm(unit)
    return cols, bands, _scan_lines_meta(lines), domains["info"]


def _inversion_domains(xy, sub, cls, inten, observed, grain, chalcogen_brighter,
                       backend=None) -> tuple[np.ndarray, dict]:
    """``sub`` named per inversion domain (:func:`stemfast.domains.inversion_domains`; each domain's
    cosets ranked by their own brightness, :func:`_rank_sublattices`), each grain on its own, and
    ``{"inverted": bool [N], "info": dict}`` (``info["warning"]`` when a domain was found;
    :func:`_find_sites` warns with it; ``info["undecided"]``, :func:`_undecided_note`, where the metal
    and chalcogen read swapped somewhere but too close in brightness to call it a domain).
    ``backend``: the kernel backend (``sites.backend``)."""

    undecided: list[dict] = []

    def per_grain(xy_, sub_, cls_, inten_, observed_):
        dom, found = inversion_domains(xy_, sub_, inten_, usable=observed_, backend=backend)
        if "undecided" in found:
            undecided.append(found["undecided"])
        named = sub_.copy()
        if (dom > 0).any():
            for lab in np.unique(dom[dom >= 0]):
                named[dom == lab] = _rank_sublattices(cls_[dom == lab], inten_[dom == lab], chalcogen_brighter)
        return {"sub": named, "inverted": dom > 0}

    r = _grains.by_grain(grain, per_grain, xy, sub, cls, np.asarray(inten), observed)
    out, inverted = r["sub"], r["inverted"]
    n = int(inverted.sum())
    on = int((sub >= 0).sum())
    info = {"n_sites": n, "share": round(n / on, 4) if on else 0.0}
    if n:
        info["warning"] = (f"{n} sites ({100 * n / on:.1f}%) lie in an inversion domain (a mirror-twin boundary "
                           "crosses the image: the crystal turned by 60 deg, two sublattices trade places): each "
                           "domain's sublattices are named from its own columns (column inversion_domain)")
    if undecided:
        largest = max(undecided, key=lambda u: u["n_largest"])  # (of the grains' largest regions)
        info["undecided"] = _undecided_note(largest, sum(u["n_sites"] for u in undecided), on)
    return out, {"inverted": inverted, "info": info}


def _undecided_note(u: dict, n: int, on: int) -> dict:
    """``lattice.inversion_undecided`` of ``summary.json``: the metal and chalcogen columns read the other
    way round over ``n`` of the ``on`` sites, too close in brightness image-wide to call it an inversion
    domain (:func:`stemfast.domains.inversion_domains`' ``undecided``; ``u`` its largest region), with
    its warning."""
    x0, x1, y0, y1 = u["box"]
    return {**u, "n_sites": int(n), "share": round(n / on, 4) if on else 0.0, "warning": (
        f"{n} sites ({100 * n / max(on, 1):.1f}%) read the metal and the chalcogen columns the other way round "
        f"(the largest part at x {x0:.0f}-{x1:.0f}, y {y0:.0f}-{y1:.0f} px): a mirror twin (inversion domain) "
        f"does that, but the two stand only {u['separation']:.1f} robust spreads apart elsewhere, too close to "
        f"tell it from thickness, contamination or the detector angle, so the sublattice names there are "
        f"the image-wide ones and may be swapped")}


#: low-pass sigma (px) of the refinement's image when only its background is taken out: the raw image to
#: within 0.1 % at every frequency a column has
REFINE_NOISE_PX = 0.01


#: a site is on a flagged scan line when its row is within this many ``column_noise_px`` of the line
STREAK_REACH = 2.0
#: a run of one exact value at least this long along a scan line, where the lines around it vary, is a
#: part of the line the detector did not record (:func:`stemfast.scanlines.dead_runs`): filled from the
#: lines above and below before anything is read (a real scan never repeats one value over 32 px of a
#: line whose neighbours vary; two columns at 5 px spacing, the length of one at 16 px)
DEAD_MIN_PX = 32


def _relevel_scan_lines(img: np.ndarray, f: _Lattice, s: SiteSettings, tm: dict):
    """Steps 2-4 again on the image with its flagged scan lines levelled, when the lattice of ``f``
    flags any (:func:`_scan_lines`): a streak of a few lines at a large fraction of the image's range
    makes and splits peaks along it and moves the sites next to it, which levelling only the column
    intensities afterwards does not undo. Returns ``(lattice, scan)``: ``f`` and its
    :func:`_scan_lines` result when nothing is flagged or the second pass finds no lattice (step 5
    reuses it), else the new lattice and None."""
    scan = _scan_lines(img, f.idx, f.idx.xy, s, f.no_data)
    lines = scan[0]
    if lines is None or not lines.any:
        return f, scan
    levelled = lines.level(img)
    t0 = time.perf_counter()
    try:
        g = _find_lattice(levelled, s, {}, no_data=f.no_data)
    except _NoLattice:
        return f, scan
    tm["relevel"] = time.perf_counter() - t0
    log.info("%d flagged scan lines and %d parts of lines levelled before the columns were found again",
             len(lines.rows), len(lines.segments))
    return g, None


def companion_intensity(image: np.ndarray, sites: SiteTable, *, settings: SiteSettings = SiteSettings(),
                        return_contrast: bool = False):
    """The column intensity of a second image of the same scan at the sites ``find_sites`` found on the first.

    Scanning microscopes record several detectors at once, pixel for pixel (HAADF and MAADF: ADF1 and
    ADF2 of a JEOL); each sees the same columns through independent shot noise, and a missing atom in
    both. This reads ``image`` the way :func:`find_sites` reads ``column_intensity``: scan lines that
    are off against the sites' lattice levelled (``settings.scan_lines``; its regions without data,
    :mod:`stemfast.nodata`, left out of the lines' statistics), the bandpass with a
    ``column_noise_px`` low-pass and a ``background_nn`` spacing background, sampled at the sites.
    :func:`stemfast.analysis.analyze_sites` weighs the two images' local z together when the table has it as
    its ``companion_intensity`` column (docs/RESULTS.md, round 5). The companion is another detector:
    whether its columns are bright or dark is told from its own image (:mod:`stemfast.contrast`; a
    bright-field companion of an ADF input is inverted, with a :class:`ContrastWarning`).

    Parameters
    ----------
    image : 2-D image of the same scan (same shape as the image ``sites`` were found on).
    sites : the site table of the first image (``x``, ``y``, ``meta["spacing_px"]``; the local basis
        ``a1x .. a2y`` for the scan-line levelling).
    settings : the :class:`SiteSettings` the first image was read with.
    return_contrast : also return what was found of the companion's contrast (as
        ``meta["lattice"]["contrast"]`` of :func:`find_sites`; None without a spacing).

    Returns
    -------
    np.ndarray
        float64 [N], one value per site (NaN for an empty table's meta without a spacing); with
        ``return_contrast``, ``(values, contrast)``.
    """
    img = np.asarray(image, np.float32)
    shape = tuple(sites.meta.get("shape", img.shape))
    if img.ndim != 2 or img.shape != shape:
        raise ValueError(f"the companion image has shape {img.shape}, the sites were found on one of shape {shape}")
    img, _ = _filled_dead_runs(img, settings)  # its own lost parts of lines (another detector)
    img, _ = _despiked(img, settings)  # and its own spikes
    if not len(sites) or "spacing_px" not in sites.meta:
        nan = np.full(len(sites), np.nan)
        return (nan, None) if return_contrast else nan
    s = settings
    nn = float(sites.meta["spacing_px"])
    xy = np.ascontiguousarray(sites.xy, dtype=np.float64)
    basis = sites.basis
    no_data = find_no_data(img)
    s, _ = _noise_adapted(img, s, no_data)  # its own noise (a detector of its own, resampled with the first)
    # another detector: its own contrast, whatever the first image's setting said
    # the same field as the sites' image: its dark vacuum left out where the sites' ring was read beside one
    vac = dark_vacuum(img, _no_data_pixels(no_data)) if "vacuum_share" in sites.meta.get("lattice", {}) else None
    try:  # its own first ring for the phase test (the same lattice, read off this detector's image)
        g = _bragg_ring(img, s, no_data)[0].g
    except _NoLattice:
        g = None
    img, contrast = _oriented(img, dataclasses.replace(s, contrast="auto"), nn, _unread(no_data, vac), g)
    if "warning" in contrast:
        contrast["warning"] = "companion image: " + contrast["warning"]
        warnings.warn(contrast["warning"], ContrastWarning, stacklevel=2)
    lines = None if basis is None else _line_offsets(img, basis, s, no_data)
    values = _column_intensity(img, xy, nn, s, lines).astype(np.float64)
    return (values, contrast) if return_contrast else values


def _column_intensity(img: np.ndarray, xy: np.ndarray, nn: float, s: SiteSettings, lines=None) -> np.ndarray:
    """``column_intensity`` at ``xy``: the image, its off scan lines levelled (``lines``, the offsets
    of :func:`_line_offsets`; None: as it is), band-passed with a ``column_noise_px`` low-pass and a
    ``background_nn`` spacings background, sampled at the sites."""
    if lines is not None:  # (a full-image copy: only where a line is off)
        img = lines.level(img)
    bp = bandpass(img, noise_px=column_filter_px(s, nn), background_px=s.background_nn * nn,
                  backend=s.backend)
    return sample_image(bp, xy, backend=s.backend)


#: the column low-pass (:func:`column_filter_px`) is at most this many site spacings wide: wider, the
#: hexagon centres take in their neighbouring columns' signal and an empty column does not (a 3x3-binned
#: simulated image, 5.5 px spacing, read a 2.3 px noise correlation -- 0.42 spacings -- and its defect AP
#: fell from 0.96 to 0.71; the 2x2-binned real WSe2, 2.5 px, named 24 of 42 single Se vacancies double)
COLUMN_FILTER_MAX_NN = 0.2


def column_filter_px(s: SiteSettings, nn: float) -> float:
    """The Gaussian sigma (px) of the low-pass ``column_intensity`` is read with: ``s.column_noise_px``
    (widened for correlated noise, :func:`_noise_adapted`), at most :data:`COLUMN_FILTER_MAX_NN` of the
    site spacing ``nn`` and half the background's sigma (``s.background_nn`` spacings).

    >>> [column_filter_px(SiteSettings(column_noise_px=c), nn) for c, nn in ((1.0, 14.0), (2.33, 5.5), (1.0, 2.5))]
    [1.0, 1.1, 0.5]
    """
    return float(min(s.column_noise_px, COLUMN_FILTER_MAX_NN * nn, 0.5 * s.background_nn * nn))


def _line_offsets(img: np.ndarray, bases: np.ndarray, s: SiteSettings, no_data: NoData | None = None):
    """The scan lines' offsets (:func:`stemfast.scanlines.scan_line_offsets`) against the lattice of the
    median of the finite local ``bases`` [N, 2, 2], the pixels without data (``no_data``) left out;
    None when ``scan_lines`` is off or fewer than 8 bases are finite."""
    from .scanlines import same_sublattice_vectors, scan_line_offsets

    ok = np.isfinite(bases).all(axis=(1, 2))
    if not s.scan_lines or ok.sum() < 8:
        return None
    b = np.median(bases[ok], axis=0)
    if no_data is not None and no_data.any():
        img = np.where(no_data.pixels(), np.float32(np.nan), img)
    return scan_line_offsets(img, same_sublattice_vectors(b[0], b[1]))


def _scan_lines(img: np.ndarray, idx, xy: np.ndarray, s: SiteSettings, no_data: NoData | None = None):
    """The scan lines' offsets (:func:`_line_offsets`, with the local bases of the lattice sites) and,
    per site, whether a flagged line or part of one passes within ``STREAK_REACH * column_noise_px``
    of it; (None, all False) when switched off."""
    streak = np.zeros(len(xy), bool)
    lines = _line_offsets(img, idx.basis[idx.kind != 2], s, no_data)
    if lines is None:
        return None, streak
    return lines, lines.near(xy, STREAK_REACH * s.column_noise_px)


def _undo_scan_jumps(img: np.ndarray, s: SiteSettings, no_data: NoData | None, spectrum):
    """``(image, jumps, ring, vacuum)``: ``img`` with its bands of sideways-jumped scan lines moved back
    (:func:`stemfast.scanlines.scan_line_jumps`, over the reach the lattice allows, candidates
    confirmed against the metal lattice's three shortest translations, :func:`_confirmed_jumps`, and
    where that repairs nothing against the lattice ``sqrt(3)`` coarser where the image shows its ring,
    :func:`_coarser_ring`; at coarse sampling (:func:`stemfast.scanlines.needs_lattice_lines`), also
    :func:`stemfast.scanlines.lattice_line_bands`, its bands confirmed against the metal lattice's
    translations, unless a band was seen shifted beyond the reach;
    the sites are found on it and reported where the recorded image has them, :func:`_to_recorded`),
    the jumps (None when ``scan_lines`` is off or there is no lattice; :class:`_UnrepairedJumps` when
    candidates were seen but the ring could not confirm them, or bands beyond the reach were not
    repaired), and the Bragg ring when it was read off the image returned (the unchanged one, or the
    one with its confirmed jumps undone; else None) with the vacuum it was read beside
    (:func:`_bragg_ring`). ``spectrum``: ``img``'s :func:`stemfast.braggring.ring_spectrum` (the ring's
    and the coarser ring's: one transform for both, made by :func:`_noise_and_jumps`)."""
    from .scanlines import lattice_line_bands, needs_lattice_lines, scan_line_jumps

    if not s.scan_lines:
        return img, None, None, None
    jumps = scan_line_jumps(img)
    if not jumps.candidates.any() and not needs_lattice_lines(s.spacing):  # (not only bands: a jump back read a lattice period off is no band yet)
        return img, jumps, None, None
    try:
        ring, vac = _bragg_ring(img, s, no_data, spectrum)
    except _NoLattice:
        return img, None, None, None
    found, repaired = _confirmed_jumps(img, jumps, ring, s, no_data)
    coarse = _coarser_ring(spectrum, ring, s) if repaired is None else None
    if coarse is not None:
        seen, repaired = _confirmed_jumps(img, jumps, coarse, s, no_data, again=False)
        if _declined(seen) and not _declined(found):  # (a band beyond the reach: said as that lattice sees it)
            found = seen
    if repaired is not None:
        return repaired
    jumps = found
    # coarse sampling: a band shifted by up to half a spacing lies beyond the neighbour-line search,
    # whose lines scatter too much there anyway -- look for it line by line against the lattice (not
    # where a wide band beyond the reach was seen: it moves the lines' running median, and the lines
    # beside it stood out as false bands)
    spacing = float(s.spacing) if s.spacing is not None else float(ring.spacing)
    if needs_lattice_lines(spacing) and not _declined(jumps):
        bands = lattice_line_bands(img, spacing, _metal_translations(ring))
        if bands.flagged.any():
            return bands.undo(img), bands, None, None
    return img, jumps, ring, vac


def _declined(jumps) -> bool:
    """Whether ``jumps`` holds jumps confirmed beyond the reach and not repaired (``declined``)."""
    return jumps.declined is not None and bool(jumps.declined.any())


def _coarser_ring(spectrum, ring, s: SiteSettings):
    """The Bragg ring ``sqrt(3)`` nearer the spectrum's centre than ``ring`` (its lattice ``sqrt(3)``
    coarser, :meth:`stemfast.braggring.FftLattice.second_order_reread`) where the image shows it (in
    ``spectrum``, its :func:`stemfast.braggring.ring_spectrum`): a hexagon of spots at that spacing
    (:func:`stemfast.braggring.ring_at_spacing`) that stands out by :data:`MIN_RING_PROMINENCE`, within
    :data:`JUMP_RING_TOLERANCE` of it; else None (and with a given spacing). A wide band of jumped
    lines weakens the first ring (its spots' phases differ there), so that the second-order one may be
    read instead (6.4-6.6 px for 11.4 px between sites, with 30 lines 7-9 px off): the jumps are then
    confirmed against this one too (:func:`_undo_scan_jumps`), and kept only where the image with
    them undone shows it (:func:`_same_ring`)."""
    if s.spacing is not None:
        return None
    want = ring.second_order_reread()
    got = ring_at_spacing(spectrum, want.spacing)  # (the image's own ring where there is none: not this one)
    if (got is None or got.standout < MIN_RING_PROMINENCE
            or abs(got.spacing / want.spacing - 1) > JUMP_RING_TOLERANCE):
        return None
    return got


@dataclass(frozen=True)
class _UnrepairedJumps(ScanJumps):
    """Scan jumps (:class:`stemfast.scanlines.ScanJumps`) of which candidates were not repaired:
    because the lattice they were to be confirmed against was not the image's (none flagged), or
    because bands were shifted beyond the reach the lattice allows (its ``declined``; the others
    flagged and repaired). ``note`` says why (``lattice.scan_lines.jumps_not_repaired``). Only the
    bands beyond the reach (:func:`_declined`) are jumps the lattice confirmed
    (``jumps_not_repaired_confirmed``): not candidates left unconfirmed (a ring that is no lattice of
    the image or is off a given spacing; lines between atom rows are such candidates on most images),
    nor jumps confirmed against a ring that their repair showed is not the image's (a jump-free strip
    read so, and a 384 x 127 px contaminated image: "12 jump rows confirmed" against a 2.07 px ring, the
    image's lattice 3.51 px) -- neither carries ``declined``."""

    note: str = ""


#: scan jumps are confirmed only against a Bragg ring whose lattice is at most this anisotropic
#: (:func:`stemfast.sitelattice.lattice_distortion`): scan distortion of real scans reaches 15-20 %,
#: while the "distorted" rings read off coarsely sampled strips (a 3.3-4 px site spacing on a 127 px
#: wide image: 47-58 %, metal vectors 4.1 and 2.9 px for a 6 px lattice) are no lattice of the image
JUMP_RING_MAX_ANISOTROPY = 0.3
#: ... and only where the ring read again on the image with the jumps undone (the lattice the sites
#: are then found on) is the same: each of its six spots within this share of the ring's radius of one
#: of the first ring's (a repair against a wrong ring gave a ring 40-75 % off); and, with a given
#: spacing, the ring's site spacing within this share of it
JUMP_RING_TOLERANCE = 0.1


def _confirmed_jumps(img: np.ndarray, jumps, ring, s: SiteSettings, no_data: NoData | None, again: bool = True):
    """``(jumps, repaired)``: the candidate ``jumps`` (what :func:`stemfast.scanlines.scan_line_jumps`
    found within its default search) confirmed against the metal lattice of ``ring``
    (:func:`stemfast.scanlines.confirm_jumps`) and, when some are, ``repaired``: the return of
    :func:`_undo_scan_jumps` with them undone (else None). Where the lattice lets larger shifts be
    told apart (:func:`stemfast.scanlines.jump_search_lag`: 9 px at 11.4 px between sites with a row
    along the scan lines, against 4), the lines are searched again that far; jumps beyond the reach
    (:func:`stemfast.scanlines.jump_reach`) are not repaired, and said (:func:`_declined_note`).
    Nothing is confirmed against a ring that is no plausible lattice of the image
    (:func:`_implausible_jump_ring`), nor kept when the image with the jumps undone shows another
    lattice (:func:`_same_ring`) -- unless, confirmed ``again`` against that lattice, their repair shows
    it in turn (a wide band bends the ring read off the recorded image: 45 lines 8 px off moved its
    spots by 10 %): the jumps then come back unflagged as :class:`_UnrepairedJumps` saying why (a
    repair against a wrong lattice moved 15-20 % of a strip's sites off their columns, with its
    confidence up)."""
    from .scanlines import JUMP_MAX_LAG, confirm_jumps, jump_search_lag, scan_line_jumps

    why = _implausible_jump_ring(ring, s)
    first = jumps
    if why is None:
        t = _metal_translations(ring)
        lag = jump_search_lag(t)
        if lag > JUMP_MAX_LAG:
            jumps = scan_line_jumps(img, max_lag=lag)
        if not jumps.candidates.any():
            return jumps, None
        confirmed = _declined_note(confirm_jumps(img, jumps, t, max_lag=lag), t)
        if not confirmed.flagged.any():
            return confirmed, None
        fixed = confirmed.undo(img)
        try:
            ring2, vac2 = _bragg_ring(fixed, s, no_data)
        except _NoLattice:
            ring2, vac2 = None, None
        if ring2 is not None and _same_ring(ring.g, ring2.g):
            return confirmed, (fixed, confirmed, ring2, vac2)
        repaired = _confirmed_jumps(img, first, ring2, s, no_data, again=False)[1] if again and ring2 is not None else None
        if repaired is not None:
            return repaired[1], repaired
        why = (f"{len(confirmed.rows)} jump rows confirmed against the Bragg ring (site spacing "
               f"{ring.spacing:.2f} px) were not repaired: the image with them undone shows another lattice"
               + ("" if ring2 is None else f" (site spacing {ring2.spacing:.2f} px)"))
    elif not jumps.candidates.any():
        return jumps, None
    log.info("scan jumps: %s", why)
    return _UnrepairedJumps(jumps.shift, np.zeros_like(jumps.flagged), jumps.noise, jumps.candidates, note=why), None


def _metal_translations(ring) -> np.ndarray:
    """The three shortest translations (x, y, px) [3, 2] of the metal lattice of the Bragg ``ring``."""
    a = ring.metal_basis
    t = np.array([a[0], a[1], a[0] + a[1], a[0] - a[1]])
    return t[np.argsort((t ** 2).sum(1))[:3]]


def _declined_note(jumps, vectors: np.ndarray):
    """``jumps`` (confirmed against the metal lattice's translations ``vectors``) as
    :class:`_UnrepairedJumps` saying which jumps were beyond the reach the lattice allows
    (:func:`stemfast.scanlines.jump_reach`; their ``declined`` jumps: bands, and jumps in none) and
    were not repaired; ``jumps`` itself when there are none."""
    from .scanlines import jump_reach, line_period

    if not _declined(jumps):
        return jumps
    b = np.flatnonzero(jumps.declined)
    rows = ", ".join(f"{k + 1} by {jumps.shift[k]:+.1f} px" for k in b)
    note = (f"{len(b)} sideways jump(s) of the scan lines were not repaired (the first line after each: rows {rows}): "
            f"beyond the {jump_reach(vectors):.1f} px that the lattice's period along the lines "
            f"({line_period(vectors):.1f} px) lets be told from a jump the other way")
    log.info("scan jumps: %s", note)
    return _UnrepairedJumps(jumps.shift, jumps.flagged, jumps.noise, jumps.candidates, jumps.declined, note=note)


def _implausible_jump_ring(ring, s: SiteSettings) -> str | None:
    """Why ``ring`` is no lattice to confirm scan jumps against (None when it is one): more anisotropic
    than :data:`JUMP_RING_MAX_ANISOTROPY`, or off a given spacing by more than
    :data:`JUMP_RING_TOLERANCE`."""
    aniso = float(lattice_distortion(ring.g)["anisotropy"])
    if aniso > JUMP_RING_MAX_ANISOTROPY:
        return (f"scan-jump candidates were not confirmed: the Bragg ring (site spacing {ring.spacing:.2f} px) is "
                f"no plausible hexagonal lattice (anisotropy {aniso:.0%})")
    if s.spacing is not None and abs(ring.spacing / float(s.spacing) - 1) > JUMP_RING_TOLERANCE:
        return (f"scan-jump candidates were not confirmed: the Bragg ring's site spacing "
                f"{ring.spacing:.2f} px is not the given {float(s.spacing):g} px")
    return None


def _same_ring(g: np.ndarray, h: np.ndarray, tol: float = JUMP_RING_TOLERANCE) -> bool:
    """Whether the first rings of the reciprocal bases ``g`` and ``h`` [2, 2] are one lattice's: every
    spot of ``h``'s within ``tol`` of the ring's mean radius of one of ``g``'s, and the other way."""
    p, q = ring_spots(g), ring_spots(h)
    d = np.hypot(*(p[:, None, :] - q[None, :, :]).transpose(2, 0, 1))
    r = float(np.hypot(*p.T).mean())
    return bool((d.min(0) < tol * r).all() and (d.min(1) < tol * r).all())


def _to_recorded(cols: dict, jumps, pixel_size, unit, column_px: float, shape: tuple[int, int]) -> None:
    """Move the sites found on the image with its scan jumps undone to where the recorded image has
    them (in place: ``x`` and ``x_nm``). A site that lands within :data:`EDGE_UNJUDGED_PX` of the
    recorded image's edge or beyond it is not judged (``observed`` False): on the repaired image it
    sat where the moved lines left no data (their ends repeat the last pixel), and a band of lines 5 px
    off put sites at x = 257 of a 256 px image, two of them flagged."""
    if jumps is None or not jumps.offsets().any():
        return
    cols["x"] = jumps.recorded_x(cols["x"], cols["y"], column_px)
    if "x_nm" in cols:
        cols["x_nm"] = cols["x"] * pixel_size * _to_nm(unit)
    recorded = np.column_stack([cols["x"], cols["y"]])
    cols["observed"] = np.asarray(cols["observed"], bool) & (border_distance(recorded, shape) >= EDGE_UNJUDGED_PX)


def _scan_jumps_meta(jumps, column_px: float) -> dict:
    """``jump_rows``, ``jump_px`` (and, with jumps, ``jump_column_px``: how the sites' recorded
    positions were averaged over a column's rows, :func:`stemfast.scanlines.recorded_shift`)."""
    if jumps is None:
        return {}
    rows = jumps.rows
    out = {"jump_rows": rows.tolist(), "jump_px": [round(float(v), 3) for v in jumps.shift[rows - 1]]}
    if len(rows):
        out["jump_column_px"] = float(column_px)
    if getattr(jumps, "note", ""):  # candidates seen, not repaired (confirmed by the lattice, or not)
        out["jumps_not_repaired"] = jumps.note
        out["jumps_not_repaired_confirmed"] = _declined(jumps)  # bands beyond the reach: jumps the lattice confirmed
    return out


def _dead_meta(dead: np.ndarray) -> dict:
    """``dead``: the parts of lines not recorded, filled (:func:`_filled_dead_runs`), as
    ``[row, first column, last column + 1]``; nothing when there are none."""
    return {"dead": dead.tolist()} if len(dead) else {}


def _scan_lines_meta(lines) -> dict:
    if lines is None:
        return {"checked": False}
    rows = lines.rows
    out = {"checked": True, "flagged_rows": rows.tolist(),
           "offsets": [round(float(v), 4) for v in lines.offset[rows]],
           "noise": round(float(lines.noise), 4) if np.isfinite(lines.noise) else None}
    if len(lines.segments):  # parts of lines: [row, first column, last column + 1, offset]
        out["segments"] = [[int(r), int(a), int(b), round(float(v), 4)] for r, a, b, v in lines.segments]
    return out


def _rank_sublattices(cls: np.ndarray, value: np.ndarray, chalcogen_brighter: bool = False) -> np.ndarray:
    """Map the lattice classes ``(p - q) mod 3`` to sublattices by median ``value`` (NaN values left
    out): the brightest is the metal, the middle the chalcogen pair (the other way round with
    ``chalcogen_brighter``), the darkest the hollow; -1 stays -1."""
    ok = np.isfinite(value)
    med = np.array([np.median(value[(cls == c) & ok]) if np.any((cls == c) & ok) else -np.inf for c in range(3)])
    rank = np.empty(3, np.int64)
    rank[np.argsort(-med, kind="stable")] = np.arange(3)
    return name_by_brightness(np.where(cls >= 0, rank[np.clip(cls, 0, 2)], -1), chalcogen_brighter)


#: a calibrated pixel size and the material's lattice constant disagree when their site spacings
#: differ by more than this share
CALIBRATION_TOLERANCE = 0.05
#: a lattice whose largest over smallest principal stretch (against a regular lattice of the same cell
#: area, :func:`stemfast.sitelattice.lattice_distortion`) exceeds 1 + this is reported as anisotropic
#: (a ``LatticeDistortionWarning``): a microscopist needs to know about scan distortion of that size
MAX_ANISOTROPY = 0.05
#: the lattice is uncertain below this share of strong peaks on a node or this ring prominence
MIN_ON_NODE = 0.8
MIN_RING_PROMINENCE = 8.0
#: the lattice is uncertain when even its best-found sublattice has more than this share of its sites
#: without a column (placed by the lattice). On a 2H film the metal (or chalcogen) sublattice is found
#: nearly whole (at most 5.8 % placed on the 16 evaluation images, faint S2, contamination and second
#: detectors included); a lattice 2x or sqrt(3)x finer than the crystal's holds the columns on a quarter or a
#: third of its nodes, spread over its three sublattices (~80 % placed on each: a 64 px strip of a
#: 9 px lattice read at 4.5 px, with no other sign)
MAX_SUBLATTICE_PLACED = 0.5
#: the lattice's ``confidence`` (ring prominence x peaks on nodes x agreement of the local fits) is at
#: most this where the lattice is uncertain (``unsure``): a lattice 2.6x too fine read 0.99 beside its
#: warning
UNSURE_MAX_CONFIDENCE = 0.5
#: ... counted within about this many spacings of a found column (the metal columns alone are sqrt(3)
#: apart)
SEEN_NN = 2.0


def _iso_spacing(basis: np.ndarray) -> np.ndarray:
    """Spacing of the regular triangular lattice with the cell area of each basis [N, 2, 2] (rows
    ``a1``, ``a2``): ``sqrt(|a1 x a2| / (sqrt(3) / 2))``; the mean length for a regular one."""
    det = np.abs(basis[:, 0, 0] * basis[:, 1, 1] - basis[:, 0, 1] * basis[:, 1, 0])
    return np.sqrt(det / (np.sqrt(3.0) / 2.0))


def _placed_shares(labels: np.ndarray, kind: np.ndarray, xy: np.ndarray, spacing: float) -> list:
    """Per label 0-2 (a sublattice, or a class of the lattice's three-colouring; one per site), the
    share of its sites placed by the lattice (``kind`` 1: no column found there), counted where
    columns are seen: within about :data:`SEEN_NN` spacings of a found column (a covered region, where
    every sublattice is placed, does not count). Measured on cells of half a spacing, a disc of cells
    around each found column's (not a neighbour search: 600k sites take a fraction of a second). A
    label with fewer than 10 such sites is left out."""
    lab, kind, xy = np.asarray(labels), np.asarray(kind), np.asarray(xy, np.float64)
    found = kind == 0
    if not found.any() or not spacing > 0:
        return []
    cell = np.floor((xy - xy.min(axis=0)) / (spacing / 2)).astype(np.int64)
    grid = np.zeros(tuple(cell.max(axis=0)[::-1] + 1), bool)  # [rows (y), columns (x)]
    grid[cell[found, 1], cell[found, 0]] = True
    r = int(round(2 * SEEN_NN))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    grid = ndimage.binary_dilation(grid, structure=yy ** 2 + xx ** 2 <= r * r)
    seen = grid[cell[:, 1], cell[:, 0]]
    masks = (seen & (lab == k) for k in range(3))
    return [float(np.mean(kind[m] == 1)) for m in masks if np.count_nonzero(m) >= 10]


def _best_sublattice_placed(labels: np.ndarray, kind: np.ndarray, xy: np.ndarray,
                            spacing: float) -> float | None:
    """The smallest of the :func:`_placed_shares` of ``labels`` (the named sublattices, or the classes
    of the lattice's three-colouring); None without one."""
    shares = _placed_shares(labels, kind, xy, spacing)
    return min(shares) if shares else None


def _too_fine(idx, spacing: float) -> float | None:
    """:func:`_best_sublattice_placed` of the classes of the site lattice ``idx`` (its three-colouring)
    where it exceeds :data:`MAX_SUBLATTICE_PLACED` (even the best-found class mostly placed: the
    lattice is likely finer than the crystal's), else None."""
    placed = _best_sublattice_placed(idx.cls, idx.kind, idx.xy, spacing)
    return placed if placed is not None and placed > MAX_SUBLATTICE_PLACED else None


def _a_2h_site_lattice(idx, spacing: float, finer_placed: float) -> bool:
    """The site lattice ``idx``, read coarser than one whose best class had ``finer_placed`` of its
    sites placed, looks like a 2H site lattice: at least :data:`MIN_ON_NODE` of the strong peaks on its
    nodes, its best-found class (the metal) placed at most half as much, and one class mostly placed
    (the hollow, over :data:`MAX_SUBLATTICE_PLACED`; the metal lattice alone, sqrt(3) coarser than the
    site lattice, has all three found)."""
    shares = _placed_shares(idx.cls, idx.kind, idx.xy, spacing)
    return (idx.on_node >= MIN_ON_NODE and len(shares) == 3 and min(shares) <= finer_placed / 2
            and max(shares) > MAX_SUBLATTICE_PLACED)


#: a site is where the image shows no lattice (amorphous film, contamination, noise: its position is the
#: lattice extrapolated) when the Bragg amplitude there is below this share of the lattice's own level
#: (the 90th percentile over the sites). The real scans' sites read 0.3-0.8 of it at their lowest (1st
#: percentile); a lattice-free half of an image at the film's brightness reads 0.01-0.1, and there the
#: noise peaks and extrapolated nodes outnumbered the columns and named the sublattices
LATTICE_FREE_AMPLITUDE = 0.25
#: the lattice is uncertain where more than this share of its sites lie where no lattice is seen
MAX_LATTICE_FREE = 0.1


def _lattice_free(f: _Lattice) -> np.ndarray:
    """bool [N]: the sites of ``f`` where the Bragg amplitude is below :data:`LATTICE_FREE_AMPLITUDE`
    of the lattice's own level (the phase map's amplitude, relative to its image-wide median, is
    relative to noise once most of the image shows no lattice). With grains, each site's own grain's
    lattice and level: another grain's lattice is not seen at a site (a second grain read as 46 %
    of the sites without lattice, and its defects went unjudged)."""
    xy = f.idx.xy
    if f.pmap is None or not len(xy):
        return np.zeros(len(xy), bool)
    if not f.pmaps:
        return _below_level(f.pmap.amplitude(xy))
    grain = np.asarray(f.idx.grain)
    free = np.zeros(len(xy), bool)
    for k, pm in enumerate(f.pmaps):
        in_k = grain == k
        if in_k.any():
            free[in_k] = _below_level(pm.amplitude(xy[in_k]))
    return free


def _below_level(amp: np.ndarray) -> np.ndarray:
    """bool: ``amp`` under :data:`LATTICE_FREE_AMPLITUDE` of its 90th percentile (all False when that is 0)."""
    level = float(np.quantile(amp, 0.9))
    return amp < LATTICE_FREE_AMPLITUDE * level if level > 0 else np.zeros(len(amp), bool)


def _lattice_meta(s, ring, nn_fft, spacing_fit, idx, material, pixel_size, unit, g, sublattice,
                  free: np.ndarray) -> dict:
    """How the site lattice was found (``spacing_source``: :func:`_spacing_source`), how sure it is
    (warns when unsure: :func:`_unsure`, and with grains :func:`_grain_wrong_order`; ``confidence`` at
    most :data:`UNSURE_MAX_CONFIDENCE` then) and
    how distorted it is (warns beyond ``MAX_ANISOTROPY``); ``free``: :func:`_lattice_free`."""
    agreement = float(1.0 - abs(spacing_fit / nn_fft - 1.0)) if nn_fft > 0 else 0.0
    placed = _best_sublattice_placed(sublattice, idx.kind, idx.xy, nn_fft)
    out = {
        "spacing_px": round(nn_fft, 4),
        "spacing_source": _spacing_source(s, nn_fft),
        **({"given_spacing_px": round(float(s.spacing), 4)} if s.spacing is not None else {}),
        "ring_prominence": round(float(ring.standout), 2),
        "ring_note": ring.note,
        "peaks_on_nodes": round(float(idx.on_node), 4),
        "spacing_fit_px": round(spacing_fit, 4),
        "spacing_agreement": round(agreement, 4),
        "n_merged": int(idx.n_merged),
        "n_noise_peaks": int(idx.n_noise),
        "best_sublattice_placed": None if placed is None else round(placed, 4),
        "material": material.name,
    }
    if free.any():
        out["lattice_free"] = {"n_sites": int(free.sum()), "share": round(float(free.mean()), 4)}
    unsure = _unsure(s, ring, idx.on_node, nn_fft, spacing_fit, agreement, placed, free)
    wrong = _grain_wrong_order(idx, nn_fft)
    if wrong is not None:  # with grains, the checks over the image see nothing (_grain_wrong_order)
        unsure.append(f"grain {wrong[0]}: {wrong[1]}: the Bragg ring was likely taken at the wrong order, or "
                      "the grains are not told apart; the spacing and the sites may be wrong")
    conf = min(1.0, idx.on_node) * min(1.0, ring.standout / (2 * MIN_RING_PROMINENCE)) * max(0.0, agreement)
    out["confidence"] = round(float(min(conf, UNSURE_MAX_CONFIDENCE) if unsure else conf), 4)
    if pixel_size and material.site_spacing_nm is not None:
        expect = material.site_spacing_nm / (pixel_size * _to_nm(unit))
        ratio = nn_fft / expect
        out["calibration_expected_spacing_px"] = round(float(expect), 4)
        out["calibration_ratio"] = round(float(ratio), 4)
        out["calibration_ok"] = bool(abs(ratio - 1) <= CALIBRATION_TOLERANCE)
        if not out["calibration_ok"]:
            # which materials the image's spacing fits with this pixel size (the chalcogen, at best)
            fits = [m for m in materials_fitting(nn_fft * pixel_size * _to_nm(unit), CALIBRATION_TOLERANCE)
                    if m != material.name]
            out["calibration_fits"] = fits
            # the one wording: the warning's and summary.json's (batch.outputs.lattice_warnings)
            out["calibration_warning"] = (
                f"the pixel size ({pixel_size:g} {unit}) and {material.formula}'s lattice constant ({material.a_nm:g} "
                f"nm) predict a site spacing of {expect:.2f} px; the image shows {nn_fft:.2f} px "
                f"({100 * (ratio - 1):+.1f}%): check the calibration or the material" + fitting_hint(fits))
            warnings.warn(out["calibration_warning"], CalibrationWarning, stacklevel=4)
    dist = {k: (round(v, 4) if isinstance(v, float) else [round(x, 4) for x in v])
            for k, v in lattice_distortion(g).items()}
    out["distortion"] = dist
    if dist["anisotropy"] > MAX_ANISOTROPY:
        b = dist["bonds_px"]
        dist["warning"] = (f"the lattice is anisotropic by {100 * dist['anisotropy']:.1f}% (largest stretch along "
                           f"{dist['stretch_axis_deg']:.0f} deg; site spacings {b[0]:.2f} / {b[1]:.2f} / {b[2]:.2f} px "
                           "along the three lattice directions): scan distortion or strain; positions and spacings "
                           "are in the distorted image frame")
        warnings.warn(dist["warning"], LatticeDistortionWarning, stacklevel=4)
    out["unsure"] = unsure
    if unsure:
        warnings.warn("the site lattice is uncertain: " + "; ".join(unsure), LatticeUncertainWarning, stacklevel=4)
    return out


def _spacing_source(s, nn_fft: float) -> str:
    """Where the site lattice's spacing ``nn_fft`` came from: ``"fft ring"`` (the image's Bragg ring),
    ``"given"`` (the given ``s.spacing``, within :data:`CALIBRATION_TOLERANCE`) or ``"fft ring, not the
    given spacing"``: a spacing was given, but the lattice is the image's own ring at another spacing
    (no hexagon of Bragg spots at the given one, or the phase map moved it there), the given one
    sizing the filters and the column search only."""
    if s.spacing is None:
        return "fft ring"
    return "given" if abs(nn_fft / float(s.spacing) - 1) <= CALIBRATION_TOLERANCE else "fft ring, not the given spacing"


def _unsure(s, ring, on_node: float, nn_fft: float, spacing_fit: float, agreement: float, placed, free) -> list[str]:
    """Why the site lattice may be wrong (``meta["lattice"]["unsure"]``), empty when nothing says so."""
    unsure = []
    if on_node < MIN_ON_NODE:
        unsure.append(f"only {on_node:.0%} of the strong peaks sit on a node")
    if ring.standout < MIN_RING_PROMINENCE:
        unsure.append(f"weak Bragg ring (prominence {ring.standout:.1f})")
    if agreement < 0.97:
        unsure.append(f"local fits give {spacing_fit:.2f} px for the ring's {nn_fft:.2f} px")
    if placed is not None and placed > MAX_SUBLATTICE_PLACED:
        unsure.append(f"no column was found on {placed:.0%} of the sites of even the best-found sublattice, where "
                      "columns are seen: a lattice finer than the crystal's (a spacing 2x or sqrt(3)x too small), or "
                      "columns too faint to find")
    if _spacing_source(s, nn_fft) == "fft ring, not the given spacing":
        unsure.append(f"the given spacing {s.spacing:.2f} px differs from the image's {nn_fft:.2f} px: the sites lie on "
                      f"the image's own lattice ({nn_fft:.2f} px), their columns found with filters sized for "
                      f"{s.spacing:.2f} px (site positions and defect scores may differ from a run without the given "
                      "spacing)")
    if free.any() and free.mean() > MAX_LATTICE_FREE:
        unsure.append(f"{free.mean():.0%} of the sites lie where the image shows no lattice (Bragg amplitude "
                      f"under {LATTICE_FREE_AMPLITUDE:g} of the lattice's: amorphous film, contamination or noise): "
                      "their positions are the lattice extrapolated; neither they nor their neighbours are judged")
    if s.spacing is not None and ring.coarser_spacing:
        unsure.append(f"the Bragg ring at the given spacing {s.spacing:.2f} px has strong spots inside it: they "
                      f"give a coarser lattice of {ring.coarser_spacing:.2f} px (a spacing sqrt(3) or 2x too small "
                      "picks a higher-order ring)")
    return unsure


def _to_nm(unit: str | None) -> float:
    """nm per ``unit`` (the one unit table, :func:`stemfast.io.unit_to_nm`); no unit is taken as nm.
    Only called for a unit :func:`_calibration` accepted."""
    return 1.0 if unit is None else float(unit_to_nm(unit))


def _calibration(pixel_size, unit) -> tuple[float | None, str | None, dict]:
    """``(pixel_size, unit, meta)`` checked: a pixel size that is not a finite number > 0 is a ValueError
    (:func:`stemfast._validate.positive`); a unit that is not a length (``"1/nm"``, ``"px"``, unknown)
    gives no calibrated columns, with a :class:`CalibrationWarning` saying so and ``meta`` (the start of
    :func:`find_sites`' ``meta``) ``{"calibration_ignored": why}`` (:func:`stemfast.io.unit_not_a_length`);
    ``meta`` is empty where the pixel size is used."""
    if pixel_size is not None:
        pixel_size = positive("pixel_size", pixel_size)
    why = unit_not_a_length(pixel_size, unit)
    if why is None:
        return pixel_size, unit, {}
    warnings.warn(why, CalibrationWarning, stacklevel=4)
    return None, unit, {"calibration_ignored": why}
