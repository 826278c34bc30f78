"""Classes and defect scores of the sites: k-means on latent means + robust anomaly scores.

Local references
    Every site is judged against the sites of **its own sublattice around it**
    (:mod:`stemfast.references`); the same colours give each site a **local sublattice**
    (``sublattice_local``: 0 = metal, 1 = chalcogen pair, 2 = hollow for HAADF).

Scores (columns of the site table)
    ``intensity_z``: the column intensity (the ``column_intensity`` column of :func:`stemfast.find_sites`:
    the band-passed image with a 1 px low-pass at the site, a background-free column sum; the
    lattice-scale ``intensity`` column for tables without it) as a robust z against the local references (local median; local
    MAD, floored at ``spread_floor`` times the sublattice's typical local MAD relative to the local column contrast,
    times the contrast at the site (:func:`_local_z`); the metal and chalcogen sites beyond
    ``reference_outlier_z`` in a first pass -- vacancies, dopants, adatoms -- are not references when
    the sites that stood out at all are judged a second time (:func:`_local_z_without_outliers`); on sites of a flagged scan line,
    ``scan_streak``, after the line's gain is divided out; within ``edge_bands`` spacings of the image
    border divided by how much noisier the z are there than inside, :func:`edge_noise`). ``intensity_z_global``: the same
    against the whole image's sublattice (the former default, kept for comparison).
    ``recon_score``: the model's reconstruction error as a robust z within its latent class (the
    textbook rVAE anomaly score). ``latent_score``: the negative log density of the site's latent
    mean under a Gaussian mixture fitted to the latents of its (local) sublattice, as a robust z.

``anomaly_score`` (and ``is_defect``) is chosen by ``AnalysisSettings.score``: ``"local"`` (default)
= ``max(-intensity_z, brighter_weight * intensity_z)`` on metal and chalcogen sites (darker counts
fully, brighter half by default) and 0 on hollow sites (with
``hollow_defects=True``: ``max(intensity_z, 0)`` there -- an empty hexagon centre can only gain an
atom, an adatom or contamination, which the labelled and simulated images do not count as defects);
``"global"`` = the same with ``intensity_z_global``; ``"combined"`` = ``sqrt(local^2 +
max(latent_score, 0)^2)``; ``"latent"`` = ``latent_score``; ``"recon"`` = ``recon_score``. What
ranks defects best was measured on simulated and real labelled images (``benchmarks/ablation.py``,
table in ``docs/RESULTS.md``): the local intensity score; the model terms do not improve it, so the
model's contribution is the classes and the patch gallery, and its scores are reported beside.
Sites in a band along the border where the scan sets the intensity (``observed`` False) score 0.
Last, each score is weighed against its sublattice's tail (``sublattice_fdr``, :mod:`stemfast.fdr`):
``defect_fdr`` is the site's tail-area false discovery rate among the judged sites of its local
sublattice, and ``anomaly_score`` is multiplied by ``1 - defect_fdr``; the summary's ``flagged_fdr``
is, per sublattice, the estimated share of its flagged sites that the noise alone would make (not
misreadings such as contamination).

Class numbering is stable from image to image: classes are sorted by mean site intensity, so
class 0 is the brightest (the metal in HAADF), 1 the next (chalcogen pair), 2 the darkest (hollow).
The summary reports ``class_sublattice_ari``, the adjusted Rand index between the learned classes
and the sublattices (on the sites where the lattice's image-wide three-colouring and the local one
agree, :func:`_class_agreement`), and warns (:class:`ClassAgreementWarning`) when it is below
``AnalysisSettings.min_class_agreement``; ``class_sublattice_ari_local`` is the same against the local
sublattices on every judged site.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np

from .errors import SettingsError
from .limits import check_section
from .clustering import adjusted_rand_index, fit_gaussian_mixture, kmeans, silhouette
from .medians import window_medians
from .fdr import fdr_shrunk, tail_fdr
from .lattice import nearest_indices
from .materials import CHALCOGEN, HOLLOW, METAL, brightness_order, get_material, name_by_brightness
from .references import LocalReferences, _local_references, _refresh_references, local_references
from .scanlines import lattice_positions
from .sitelattice import border_distance
from .table import SiteTable

__all__ = ["AnalysisSettings", "cluster_latents", "robust_z", "analyze_sites", "DEFECT_KINDS", "SCORES",
           "ClassAgreementWarning", "SublatticeNamingWarning", "MixedColumnsWarning", "SublatticeSeparationWarning",
           "mixed_columns",
           "lattice_consistent_classes", "neighbourhood_recon", "contrast_levelled_recon", "edge_noise",
           "sublattice_naming", "sublattice_separation", "detection_limit", "as_written", "detector_weights",
           "DETECTOR_TAIL_Z"]

log = logging.getLogger(__name__)

#: ``defect_kind`` values of the default material (MoS2); other materials: ``Material.defect_kinds``
DEFECT_KINDS = get_material("mos2").defect_kinds

#: the choices of ``AnalysisSettings.score``
SCORES = ("local", "global", "combined", "latent", "recon")


class ClassAgreementWarning(UserWarning):
    """The learned classes do not follow the lattice's sublattices (metal / chalcogen / hollow)."""


@dataclass(frozen=True)
class AnalysisSettings:
    """Settings of :func:`analyze_sites`.

    Attributes
    ----------
    n_classes : k of k-means on the latent means; ``None`` chooses k in ``k_range`` by the
        silhouette score on a sample (reported in the summary).
    k_range : candidate k for the automatic choice.
    minibatch_above : use MiniBatchKMeans above this many sites.
    defect_cutoff : ``is_defect = anomaly_score > defect_cutoff`` (robust z units; 4 means
        about 4 standard deviations darker than the sublattice's typical site around it). The
        ranking does not depend on it. On the labelled real WSe2 images (Cr 9, Ti 2 on both
        detectors, Ti 11 and 25) and the simulated MoS2 dev1-4, 4 flags 0.47-0.95 of the
        labelled vacancies and dopants at a precision of 0.84-1.00 (0.64 on ti25, whose dark
        columns labelled intact count against it); 5 flagged 0.24-0.82 at 0.70-1.00
        (docs/RESULTS.md, round 15). Tracks in a series keep their own scale (``tracking.cutoff``).
    top_n : number of defect candidates listed (and shown in the gallery).
    seed : random seed of the clustering.
    score : what ``anomaly_score`` is, one of :data:`SCORES` (module docs).
    n_neighbors : sites looked at around each site for its local references (about a third of them
        are of its own sublattice; 300 = a disc of ~9 spacings radius, ~100 references).
    node_tolerance : a neighbour is a reference only when its offset lies within this many lattice
        units of a node of the site's local lattice (per coordinate).
    min_class_agreement : warn when the ARI of classes vs the sublattices (``class_sublattice_ari``) is below this.
    local_background : subtract from every site's intensity the median of the hexagon centres next to
        it (they see only the support and what lies on it: contamination, thickness), before it is
        compared with its references.
    scan_rows : take out what the sites of one scan line share: a streak or row jump shifts every
        site on a few rows, a defect only its own site (:func:`_scan_row_offset`); on the sites of a
        scan line that :func:`stemfast.find_sites` flagged (``scan_streak``; it levelled the line's
        offset in the image) the line's gain is divided out first (:func:`_scan_line_gain`).
    hollow_defects : rank hexagon centres brighter than their neighbours (something on top of the
        film: an adatom, contamination) among the defects. Off by default: on the labelled real
        WSe2 (HAADF and MAADF) and the four simulated images it put contamination ahead of the
        vacancies and dopants (defect AP lower on all six, docs/RESULTS.md); their ``intensity_z``
        is still reported.
    brighter_weight : a metal or chalcogen site brighter than its references scores this share of its
        z, a darker one all of it. Darker is what a vacancy or a lighter dopant does; brighter is also
        what anything on top of the film does (contamination, an adatom over a column), while a
        heavier substitution stands out by far more than the cutoff anyway (1 = the symmetric
        ``|z|``; 0.5 raised defect AP on the labelled WSe2 and all four simulated images,
        docs/RESULTS.md).
    class_neighbors : k-means clusters each site's latent means minus their mean over its this many
        nearest sites (all sublattices alike, so what tells the sublattices apart stays, and what
        varies smoothly over the image -- contamination, thickness, illumination -- goes); 0 clusters
        the latent means as they are.
    class_margin : a site whose latent features are at most ``1 + class_margin`` times farther from the
        centre of the class most sites of its sublattice around it have than from its own class's takes
        that class (:func:`lattice_consistent_classes`; 0: k-means labels as they are). 0.3 raised the
        sublattice alternation on textured-contamination copies of the real MoS2 to 0.94-0.99 (from
        0.90-0.97) and the class ARI of the four simulated images to 0.994-0.998, with the defect
        ranking unchanged (docs/RESULTS.md, round 5).
    recon_slack : a site's ``anomaly_score`` is divided by ``max(1, neighbourhood_recon / recon_slack)``:
        where the model reconstructs the surroundings more than this many times worse than the rest of
        the image (:func:`neighbourhood_recon`: contamination's texture, amorphous film) the column
        intensities are no evidence of a defect (0: off). 2.0 took the defects flagged inside
        amorphous-texture patches on copies of the real MoS2 from 10 to 1 and their share of the top-10
        candidates from 54 to 24 of 120, and left the labelled WSe2 scans and the simulated images'
        AP unchanged or higher (docs/RESULTS.md, round 5).
    edge_bands : the noise of ``intensity_z`` is measured within this many spacings of the image
        border, one band per spacing (:func:`edge_noise`): where the column z of a band are more
        spread than those inside (the scan's line starts and its first lines, columns cut by the
        border, references on one side only), that band's z are divided by the excess, so a site at the
        border needs the same evidence as one inside to rank as high (0: off).
    spread_floor : a site's local MAD is taken as at least this many times the typical local MAD of
        its sublattice relative to the local column contrast, times the contrast at the site
        (:func:`_local_z`). The ~100 references of one colour give a MAD that scatters by about 12 %;
        where it comes out low by chance, every z there is inflated. 1 keeps a part of the image from
        claiming to be quieter than the typical part (0.5 up to round 31; with ``reference_outlier_z``
        the defect AP of six of the seven labelled WSe2 scans rose by 0.003-0.067, one fell by 0.010,
        docs/RESULTS.md round 32); a noisier part -- contamination, texture -- keeps its own larger
        MAD, and the floor follows the column contrast, so a dim part of the film (illumination,
        thickness) is judged by its own scale.
    reference_outlier_z : the metal and chalcogen sites whose first-pass ``|z|`` exceeds this are left
        out of the references of the sites judged a second time, those above ``RECHECK_Z``
        (:func:`_local_z_without_outliers`): a cluster of vacancies or dopants otherwise widens the MAD that
        judges each of them, and a bright adatom column shifts its neighbours' median (0: off).
    sublattice_fdr : ``anomaly_score`` is multiplied by ``1 - defect_fdr``, the site's tail-area false
        discovery rate among the judged sites of its local sublattice (:func:`stemfast.fdr.tail_fdr`:
        Benjamini-Hochberg against the standard normal tail the z of normal columns follow). A score of
        3 on a sublattice whose tail is as long as its noise makes (0.13 % of its sites reach 3) is
        mostly chance and shrinks; on a sublattice with an excess of high scores (its vacancies) it
        stays. Sites far out keep their score (q ~ 0), and the ranking within a sublattice is
        unchanged. ``defect_fdr`` is computed either way. Defect AP -0.001 to +0.040 on the labelled
        WSe2 scans, the simulated dev1-4 and 24 WSe2 proxies (docs/RESULTS.md, round 33).
    """

    n_classes: int | None = 3
    k_range: tuple[int, ...] = (2, 3, 4, 5, 6)
    minibatch_above: int = 200_000
    defect_cutoff: float = 4.0
    top_n: int = 50
    seed: int = 0
    score: str = "local"
    n_neighbors: int = 300
    node_tolerance: float = 0.25
    min_class_agreement: float = 0.9
    scan_rows: bool = True
    local_background: bool = False
    hollow_defects: bool = False
    brighter_weight: float = 0.5
    class_neighbors: int = 60
    class_margin: float = 0.3
    recon_slack: float = 2.0
    edge_bands: int = 3
    spread_floor: float = 1.0
    reference_outlier_z: float = 3.0
    sublattice_fdr: bool = True

    def __post_init__(self) -> None:
        check_section(self, "analysis")  # the ranges of stemfast.limits.SETTING_LIMITS (n_classes, top_n, seed, ...)
        if self.n_classes is None and not self.k_range:
            raise SettingsError("analysis.k_range must hold at least one k when analysis.n_classes is none "
                                "(k is chosen among them)")
        if self.defect_cutoff <= 0:
            raise ValueError("defect_cutoff must be > 0")
        if self.score == "lattice":  # the former name of the image-wide sublattice score
            object.__setattr__(self, "score", "global")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}; got {self.score!r}")
        if not 0 <= self.brighter_weight <= 1:
            raise ValueError(f"brighter_weight must be in [0, 1], got {self.brighter_weight}")
        if self.n_neighbors < 7:
            raise ValueError(f"n_neighbors must be >= 7, got {self.n_neighbors}")
        if not 0 < self.node_tolerance < 0.5:
            raise ValueError(f"node_tolerance must be in (0, 0.5), got {self.node_tolerance}")
        if self.class_neighbors < 0 or 0 < self.class_neighbors < 7:
            raise ValueError(f"class_neighbors must be 0 or >= 7, got {self.class_neighbors}")
        if not 0 <= self.class_margin <= 1:
            raise ValueError(f"class_margin must be in [0, 1], got {self.class_margin}")
        if self.recon_slack != 0 and not self.recon_slack >= 1:
            raise ValueError(f"recon_slack must be 0 (off) or >= 1, got {self.recon_slack}")
        if isinstance(self.edge_bands, bool) or not isinstance(self.edge_bands, int) or not 0 <= self.edge_bands <= 10:
            raise ValueError(f"edge_bands must be an integer in [0, 10], got {self.edge_bands!r}")
        if not 0 < self.spread_floor <= 5:
            raise ValueError(f"spread_floor must be in (0, 5], got {self.spread_floor}")
        if self.reference_outlier_z != 0 and not self.reference_outlier_z >= 2:
            raise ValueError(f"reference_outlier_z must be 0 (off) or >= 2, got {self.reference_outlier_z}")


#: the sites judged again against references without the outliers (``AnalysisSettings.reference_outlier_z``):
#: those whose first-pass ``|z|`` exceeds this (9-15 % of the metal and chalcogen columns of the shared images)
RECHECK_Z = 1.5


def robust_z(values: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """Robust z-score ``(v - median) / (1.4826 MAD)`` within each group (one group if None).

    Examples
    --------
    >>> robust_z(np.array([1.0, 2.0, 3.0, 4.0, 100.0])).round(2).tolist()
    [-1.35, -0.67, 0.0, 0.67, 65.43]
    """
    v = np.asarray(values, dtype=np.float64)
    out = np.zeros_like(v)
    g = np.zeros(len(v), np.int64) if groups is None else np.asarray(groups)
    for k in np.unique(g):
        m = (g == k) & np.isfinite(v)
        if m.sum() < 2:
            continue
        med = np.median(v[m])
        mad = 1.4826 * np.median(np.abs(v[m] - med))
        if not mad > 0:
            mad = np.std(v[m]) or 1.0
        out[g == k] = (v[g == k] - med) / mad
    out[~np.isfinite(v)] = 0.0
    return out


def cluster_latents(mu: np.ndarray, *, n_classes: int | None, order_by: np.ndarray, settings: AnalysisSettings):
    """k-means on latent means; returns (labels renumbered by descending mean ``order_by``, k, info).

    :func:`stemfast.clustering.kmeans` (the same clustering as scikit-learn's ``KMeans`` with
    ``n_init=4`` and this seed, without importing it); above ``settings.minibatch_above`` sites
    scikit-learn's ``MiniBatchKMeans``.
    """
    mu = np.asarray(mu, dtype=np.float64)
    info: dict = {}
    n = len(mu)

    def fit(k) -> np.ndarray:
        from threadpoolctl import threadpool_limits

        # one thread (OpenMP and BLAS): a BLAS or OpenMP pool competes with the one torch left behind after
        # encoding (two runtimes, both spinning), and k-means is not slower single-threaded for 1.3M sites
        with threadpool_limits(limits=1):
            if n <= settings.minibatch_above:
                return kmeans(mu, k, seed=settings.seed, n_init=4).labels
            from sklearn.cluster import MiniBatchKMeans

            km = MiniBatchKMeans(n_clusters=k, random_state=settings.seed, n_init=3, batch_size=4096).fit(mu)
        return km.labels_

    if n_classes is None:
        rng = np.random.default_rng(settings.seed)
        sample = rng.choice(n, min(n, 5000), replace=False)
        scores = {}
        for k in settings.k_range:
            if k >= n:
                break
            lab = fit(k)
            scores[k] = silhouette(mu[sample], lab[sample]) if len(np.unique(lab[sample])) > 1 else -1.0
        # fewer sites than the smallest k tried: as many classes as sites allow
        k = max(scores, key=scores.get) if scores else max(1, min(min(settings.k_range), n))  # (k_range holds one)
        info["k_selection"] = {"criterion": "silhouette", "scores": scores}
    else:
        k = min(n_classes, n)
    lab = fit(k).astype(np.int64)
    means = np.array([np.nanmean(order_by[lab == c]) if np.any(lab == c) else -np.inf for c in range(k)])
    rank = np.empty(k, np.int64)
    rank[np.argsort(-means)] = np.arange(k)
    info["k"] = int(k)
    return rank[lab], int(k), info


#: below this lock of the rotation latent to the lattice (mean resultant of ``exp(i 2k phi)``) the
#: rotation latent is left out of the class features: the STN angles do not follow the lattice
MIN_ROTATION_LOCK = 0.5
#: fewest sites of a grain whose rotation latent is aligned with the largest grain's by content
_MIN_GRAIN_SITES = 30


def _circ_mean(angle_rad: np.ndarray, order: int) -> float:
    """Circular mean of ``angle_rad`` taken modulo ``2 pi / order`` (radians)."""
    return float(np.angle(np.mean(np.exp(1j * order * angle_rad)))) / order


def rotation_latent(angle_deg: np.ndarray, lattice_deg: np.ndarray, *, symmetry: int = 3,
                    grain: np.ndarray | None = None, content: np.ndarray | None = None,
                    strength: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """The rVAE's rotation latent of every site relative to its own lattice: ``(cos k phi, sin k phi)``.

    The spatial transformer turns each patch into its canonical frame; the angle it needs is part of
    the site's learned code (``angle_deg``, degrees counter-clockwise as displayed, defined modulo
    ``360 / k`` for ``k = symmetry``). On a 2H lattice the metal and the hollow sites need one angle
    and the chalcogen sites that angle + 60 deg (their bright neighbours point the other way), so
    this latent tells the sublattices apart even where their intensities are close. The lattice's
    own orientation is taken out first: ``lattice_deg`` (the direction of each site's ``a1``,
    ``atan2(a1y, a1x)`` in image axes, i.e. clockwise as displayed) is reduced modulo 60 deg to one
    value per grain plus the site's small local deviation, and ``phi = angle + lattice``. A site
    lattice fixes orientation only modulo 60 deg, so for every further grain the 60 deg branch that
    puts its sites' ``content`` (latent means) where the largest grain has them is chosen.

    ``strength`` (the STN's harmonic length per site, :attr:`stemfast.model.Encoding.angle_strength`)
    says how sure each angle is: a metal site whose chalcogen neighbours are faint looks nearly
    six-fold and its 120 deg orientation is noise. Each unit vector is shortened to
    ``min(1, strength / median strength)``, so such sites are classed by their latent means and
    not by a coin-flip angle.

    Returns
    -------
    (features [N, 2] float64 or None, info dict)
        ``info["rotation_lock"]``: per grain, the mean resultant of ``exp(i 2k phi)`` (1: the STN
        angles sit exactly on the two sublattice orientations). ``features`` is None when the angles
        are missing (plain VAE) or the lock of the largest grain is below :data:`MIN_ROTATION_LOCK`.

    Examples
    --------
    >>> ang = np.array([10.0, 10.0, 70.0, 70.0 - 120.0])
    >>> f, info = rotation_latent(ang, np.zeros(4))
    >>> np.round(f, 3)
    array([[ 0.866,  0.5  ],
           [ 0.866,  0.5  ],
           [-0.866, -0.5  ],
           [-0.866, -0.5  ]])
    """
    a = np.deg2rad(np.asarray(angle_deg, np.float64))
    lat = np.deg2rad(np.asarray(lattice_deg, np.float64))
    n = len(a)
    k = int(symmetry)
    info: dict = {}
    ok = np.isfinite(a) & np.isfinite(lat)
    if n == 0 or k < 2 or not ok.any():
        return None, {"rotation_lock": None, "rotation_latent": "not available"}
    g = np.zeros(n, np.int64) if grain is None else np.asarray(grain, np.int64)
    phi = np.full(n, np.nan)
    locks = {}
    order = [int(v) for v in np.unique(g[ok])]
    order.sort(key=lambda v: -int(np.sum(ok & (g == v))))
    ref = None
    for v in order:
        m = ok & (g == v)
        # the grain's orientation modulo 60 deg, and each site's small deviation from it
        t0 = _circ_mean(lat[m], 6)
        dev = np.angle(np.exp(6j * (lat[m] - t0))) / 6
        p = a[m] + t0 + dev
        locks[v] = float(np.abs(np.mean(np.exp(2j * k * p))))
        if content is not None and ref is not None and m.sum() >= _MIN_GRAIN_SITES:
            # which 60 deg branch of this grain matches the largest grain's sublattices?
            best = None
            for shift in (0.0, np.pi / 3):
                q = p + shift
                near = np.cos(k * (q - ref[0])) > 0  # the orientation of the reference's first mode
                if near.all() or not near.any():
                    continue
                cost = (np.linalg.norm(content[m][near].mean(0) - ref[1])
                        + np.linalg.norm(content[m][~near].mean(0) - ref[2]))
                if best is None or cost < best[0]:
                    best = (cost, shift)
            if best is not None:
                p = p + best[1]
        phi[m] = p
        if ref is None and content is not None:
            mode = _circ_mean(p, k)
            near = np.cos(k * (p - mode)) > 0
            if near.any() and not near.all():
                ref = (mode, content[m][near].mean(0), content[m][~near].mean(0))
    info["rotation_lock"] = {int(v): round(locks[v], 4) for v in order}
    if locks[order[0]] < MIN_ROTATION_LOCK:
        info["rotation_latent"] = (f"left out: the STN angles do not follow the lattice (lock "
                                   f"{locks[order[0]]:.2f} < {MIN_ROTATION_LOCK})")
        return None, info
    info["rotation_latent"] = "used"
    f = np.column_stack([np.cos(k * phi), np.sin(k * phi)])
    if strength is not None:
        s = np.asarray(strength, np.float64)
        good = ok & np.isfinite(s)
        med = float(np.median(s[good])) if good.any() else float("nan")
        if med > 0:
            f *= np.where(np.isfinite(s), np.minimum(1.0, s / med), 1.0)[:, None]
    f[~ok] = 0.0
    return f, info


def class_features(mu: np.ndarray, rotation: np.ndarray | None) -> np.ndarray:
    """What k-means clusters: the latent means scaled to unit total variance, next to the rotation
    latent (:func:`rotation_latent`, unit vectors, total variance <= 1) when there is one, so that
    neither block outweighs the other by its units."""
    mu = np.asarray(mu, np.float64)
    c = mu - mu.mean(0) if len(mu) else mu
    tot = float(np.sqrt(np.sum(c.var(0)))) if len(mu) else 0.0
    c = c / tot if tot > 0 else c
    return c if rotation is None else np.column_stack([c, rotation])


#: nearest judged sites whose reconstruction error :func:`neighbourhood_recon` takes the median of
#: (the first two shells of the site lattice and the third's six)
RECON_NEIGHBORS = 18


#: significant digits of a score in ``sites.csv`` (:func:`stemfast.batch.tables.cell_spec`)
SCORE_DIGITS = 6


def as_written(a: np.ndarray) -> np.ndarray:
    """``a`` rounded to :data:`SCORE_DIGITS` significant digits, i.e. the value ``sites.csv``'s
    ``%.6g`` shows, so that a score and the threshold's verdict on it agree in the file.

    >>> as_written(np.array([4.0000001, 3.14159265, 0.0, np.nan])).tolist()
    [4.0, 3.14159, 0.0, nan]
    """
    a = np.asarray(a, np.float64)
    out = a.copy()
    nz = np.isfinite(a) & (a != 0)
    scale = 10.0 ** (SCORE_DIGITS - 1 - np.floor(np.log10(np.abs(a[nz]))))
    out[nz] = np.round(a[nz] * scale) / scale
    return out


def neighbourhood_recon(xy: np.ndarray, recon_error: np.ndarray, usable: np.ndarray, *,
                        k: int = RECON_NEIGHBORS, backend: str | None = None) -> np.ndarray:
    """How well the model reconstructs each site's surroundings: the median reconstruction error of
    its ``k`` nearest ``usable`` sites (itself left out) over the median of all usable sites.

    About 1 on a sound lattice, also around an isolated defect (one bad patch does not move the
    median of its neighbours); several times that where the film is not the lattice the model
    learned -- the texture of contamination, amorphous regions (on copies of the real MoS2 with
    amorphous texture added: 1.8-5 inside, 0.94 outside, docs/RESULTS.md round 5). 1 everywhere when
    fewer than ``k + 1`` sites are usable. The neighbours are found on the kernels of ``backend``
    (``sites.backend``; None: ``STEMFAST_BACKEND`` or the fastest available).

    Examples
    --------
    >>> xy = np.c_[np.arange(60.0), np.zeros(60)]
    >>> rec = np.ones(60); rec[40:] = 4.0                       # the model fails on the right third
    >>> r = neighbourhood_recon(xy, rec, np.ones(60, bool), k=6)
    >>> float(r[10]), float(r[55])
    (1.0, 4.0)
    """
    xy = np.asarray(xy, np.float64)
    rec = np.asarray(recon_error, np.float64)
    use = np.asarray(usable, bool) & np.isfinite(rec)
    n = len(rec)
    if use.sum() <= k:
        return np.ones(n)
    idx = np.flatnonzero(use)
    j = nearest_indices(xy[use], k + 1, xy, backend=backend)
    own = idx[j] == np.arange(n)[:, None]
    own[:, -1] |= ~own.any(axis=1)  # a site not usable itself: its k nearest, not k + 1
    med = np.median(rec[idx][j][~own].reshape(n, k), axis=1)  # exactly one left out per row
    scale = float(np.median(rec[use]))
    return med / scale if scale > 0 else np.ones(n)


#: the local column contrast must vary at least this much over the image (90th over 10th percentile)
#: before the reconstruction error is levelled for it (:func:`contrast_levelled_recon`)
RECON_CONTRAST_SPREAD = 1.3
#: quantile bins of the local contrast the error's trend is read from
RECON_CONTRAST_BINS = 10


def contrast_levelled_recon(recon_error: np.ndarray, contrast: np.ndarray | None,
                            usable: np.ndarray) -> tuple[np.ndarray, float]:
    """The reconstruction error levelled for the local column contrast, and the exponent used.

    The model sees patches normalised image-wide, so where the columns are dimmer (illumination,
    thickness, a detector gain step) its error is smaller in those units -- by about the contrast to
    the power 1.4-1.6 on the labelled WSe2 dimmed to 30-50 % of its signal. Compared with the image's
    median, the dim part would look better than the rest and the bright part worse, up to the point
    where :func:`neighbourhood_recon` calls sound film "unlike the lattice" and scales its defect
    scores down. The trend of the log error over the log contrast is read from the medians of
    :data:`RECON_CONTRAST_BINS` quantile bins of the usable sites (its slope clipped to 0..2) and
    divided out: ``error * (median contrast / contrast) ** exponent``. Texture (contamination,
    amorphous film) raises the error at an unchanged or lower contrast, so it stays. Unchanged
    (exponent 0) when the contrast varies less than :data:`RECON_CONTRAST_SPREAD` over the image,
    or without a contrast.

    Examples
    --------
    >>> c = np.linspace(0.3, 1.0, 1000)             # the column contrast falls across the image
    >>> rec = 0.02 * c ** 1.5                       # the error follows it, nothing else
    >>> level, p = contrast_levelled_recon(rec, c, np.ones(1000, bool))
    >>> round(p, 2), bool(np.allclose(level, level[0]))
    (1.5, True)
    """
    rec = np.asarray(recon_error, np.float64)
    if contrast is None:
        return rec, 0.0
    c = np.asarray(contrast, np.float64)
    ok = np.asarray(usable, bool) & np.isfinite(c) & (c > 0) & np.isfinite(rec) & (rec > 0)
    if ok.sum() < 10 * RECON_CONTRAST_BINS:
        return rec, 0.0
    lo, hi = np.percentile(c[ok], [10, 90])
    if hi < RECON_CONTRAST_SPREAD * lo:
        return rec, 0.0
    lc, lr = np.log(c[ok]), np.log(rec[ok])
    edges = np.quantile(lc, np.linspace(0, 1, RECON_CONTRAST_BINS + 1))
    b = np.clip(np.searchsorted(edges, lc, side="right") - 1, 0, RECON_CONTRAST_BINS - 1)
    held = [b == i for i in range(RECON_CONTRAST_BINS) if (b == i).any()]
    mc = np.array([np.median(lc[m]) for m in held])
    mr = np.array([np.median(lr[m]) for m in held])
    if len(mc) < 3 or np.ptp(mc) <= 0:
        return rec, 0.0
    exponent = float(np.clip(np.polyfit(mc, mr, 1)[0], 0.0, 2.0))
    if exponent == 0.0:
        return rec, 0.0
    level = rec.copy()
    fin = np.isfinite(c) & (c > 0)
    level[fin] = rec[fin] * (np.median(c[ok]) / c[fin]) ** exponent
    return level, exponent


def _texture_info(neigh_rec: np.ndarray, observed: np.ndarray, settings: AnalysisSettings,
                  unscaled: np.ndarray | None = None, is_defect: np.ndarray | None = None,
                  groups: np.ndarray | None = None) -> dict:
    """How many sites sit where the model does not reconstruct the surroundings (scores scaled
    down there), with a warning text for the report when they are more than 1 % of the sites. With
    the scores before that scaling (``unscaled``, 0 where not observed), the final flags
    (``is_defect``) and the sites' reference groups (``groups``, for the false-discovery shrinkage as
    :func:`analyze_sites` applies it): how many of those sites a run without the scaling
    (``recon_slack = 0``) flags and this one does not (``n_unflagged_unlike_lattice``), said in the
    warning whenever there is one -- the scaling cannot tell a dense cluster of bright dopants or the
    columns along a line defect, which the model reconstructs as badly, from contamination.

    Examples
    --------
    >>> from stemfast.analysis import AnalysisSettings
    >>> neigh = np.array([1.0, 1.0, 6.0, 6.0, 6.0]); seen = np.ones(5, bool)
    >>> info = _texture_info(neigh, seen, AnalysisSettings(sublattice_fdr=False), np.array([0, 5, 11, 1, 0.5]),
    ...                      np.array([False, True, False, False, False]), np.zeros(5, int))
    >>> info["n_sites_unlike_lattice"], info["n_unflagged_unlike_lattice"]
    (3, 1)
    >>> print(info["texture_warning"])  # doctest: +NORMALIZE_WHITESPACE
    3 sites (60.0%) lie where the model reconstructs the surroundings more than 2x worse than elsewhere
    (contamination, amorphous film; also a cluster of bright dopants or a line defect): their defect
    scores are scaled down by that factor; 1 of them would be flagged without it (anomaly scores
    before the scaling up to 11.0)
    """
    if settings.recon_slack <= 0:
        return {}
    m = observed & (neigh_rec > settings.recon_slack)
    info: dict = {"n_sites_unlike_lattice": int(m.sum())}
    hidden = None
    if unscaled is not None and is_defect is not None and groups is not None:
        u = np.asarray(unscaled, np.float64)
        # the shrinkage only lowers a score: none over the cutoff before it, none after (most images)
        hidden = m & ~np.asarray(is_defect, bool) & (u > settings.defect_cutoff)
        if hidden.any():
            hidden &= _final_scores(u, groups, observed, settings)[1] > settings.defect_cutoff
        info["n_unflagged_unlike_lattice"] = int(hidden.sum())
    if len(m) and (m.mean() > 0.01 or (hidden is not None and hidden.any())):
        text = (f"{int(m.sum())} sites ({m.mean():.1%}) lie where the model reconstructs the surroundings more "
                f"than {settings.recon_slack:g}x worse than elsewhere (contamination, amorphous film; also a "
                f"cluster of bright dopants or a line defect): their defect scores are scaled down by that factor")
        if hidden is not None and hidden.any():
            text += (f"; {int(hidden.sum())} of them would be flagged without it (anomaly scores before the "
                     f"scaling up to {float(np.max(np.asarray(unscaled)[hidden])):.1f})")
        info["texture_warning"] = text
    return info


def _final_scores(scores: np.ndarray, groups: np.ndarray, observed: np.ndarray,
                  settings: AnalysisSettings) -> tuple[np.ndarray, np.ndarray]:
    """``(fdr, final)``: each score's tail false-discovery rate in its group (:func:`stemfast.fdr.tail_fdr`)
    and the score as ``sites.csv`` writes it, shrunk by that rate where ``settings.sublattice_fdr``
    (:func:`stemfast.fdr.fdr_shrunk`, :func:`as_written`) -- what :data:`AnalysisSettings.defect_cutoff` judges."""
    fdr = tail_fdr(scores, groups, observed)
    return fdr, as_written(fdr_shrunk(scores, fdr) if settings.sublattice_fdr else scores)


def _local_z_or_global(values: np.ndarray, refs: LocalReferences, groups: np.ndarray, usable: np.ndarray,
                       z_glob: np.ndarray, floor: float) -> np.ndarray:
    """:func:`_local_z`, and ``z_glob`` (the image-wide score) for the sites with fewer than 3 local
    references of their own colour, or whose local z is not finite (references without spread: all
    alike)."""
    z = _local_z(values, refs, groups, usable, floor)
    no_ref = (refs.count[:, 0] < 3) | ~np.isfinite(z)
    z[no_ref] = z_glob[no_ref]
    return z


def _local_z_without_outliers(values: np.ndarray, refs: LocalReferences, groups: np.ndarray, usable: np.ndarray,
                              z_glob: np.ndarray, xy: np.ndarray, basis: np.ndarray,
                              settings: AnalysisSettings, backend: str | None = None) -> np.ndarray:
    """:func:`_local_z_or_global` (the first pass), then the metal and chalcogen sites that stand out at
    all (first-pass ``|z|`` above :data:`RECHECK_Z`) judged again, against references that leave out
    the sites whose first-pass ``|z|`` exceeds ``settings.reference_outlier_z`` (a vacancy, a dopant or
    an adatom column is not what a normal column of its sublattice looks like). The other sites keep
    their first-pass z: a site under RECHECK_Z is far from the defect cutoff whatever its references,
    and judging only the candidates again costs a seventh of a second pass over every site (4096^2
    bench image: ~0.07 s against ~0.55 s). The first pass alone when ``reference_outlier_z`` is 0 or
    no site exceeds it. ``backend``: the kernels' (``sites.backend``)."""
    z = _local_z_or_global(values, refs, groups, usable, z_glob, settings.spread_floor)
    if not settings.reference_outlier_z:
        return z
    column = usable & ((groups == METAL) | (groups == CHALCOGEN))
    outlier = column & (np.abs(z) > settings.reference_outlier_z)
    rows = np.flatnonzero(column & (np.abs(z) > RECHECK_Z))
    if not outlier.any() or not len(rows):
        return z
    again = _local_references(xy, basis, values, usable & ~outlier, int(settings.n_neighbors),
                              float(settings.node_tolerance), rows=rows, base=refs, backend=backend)
    z_again = _local_z_or_global(values, again, groups, usable, z_glob, settings.spread_floor)
    out = z.copy()
    out[rows] = z_again[rows]
    return out


def _local_z(values: np.ndarray, refs: LocalReferences, groups: np.ndarray, usable: np.ndarray,
             floor: float) -> np.ndarray:
    """Robust z of ``values`` against each site's own-colour references; the local MAD is floored (so
    references that are quiet by chance cannot inflate the z) at ``floor`` times the typical local MAD
    of the site's group relative to the local column contrast (:meth:`LocalReferences.contrast`), times
    the contrast at the site (``AnalysisSettings.spread_floor``).

    A floor in image units (half the group's median MAD) sat above the own MAD of a film part at a
    third of the signal (an illumination or thickness step) and shrank its z: there a vacancy ranked
    as 2.2 where the same vacancy ranked 3.3 on the bright part. Where the contrast is not known (a
    colour with fewer than 3 references), the site's floor uses the group's median contrast; a group
    with fewer than 3 such sites has ``floor`` times its median MAD."""
    v = np.asarray(values, np.float64)
    med, mad = refs.median[:, 0], refs.mad[:, 0]
    contrast = refs.contrast()
    lowest = np.full(len(v), np.nan)
    for g in np.unique(groups):
        m = (groups == g) & usable & np.isfinite(mad)
        if not m.any():
            continue
        rel = m & np.isfinite(contrast)
        if rel.sum() >= 3:
            # the group's typical MAD relative to the local column contrast, times the contrast here
            typical = float(np.median(mad[rel] / contrast[rel]))
            here = np.where(np.isfinite(contrast), contrast, float(np.median(contrast[rel])))
            lowest[groups == g] = floor * typical * here[groups == g]
        else:
            lowest[groups == g] = floor * np.median(mad[m])
    scale = np.fmax(mad, lowest)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (v - med) / scale
    z[~np.isfinite(z)] = np.nan  # no spread to judge by (or no value): not a z of 0
    return z


#: fewest column sites a border band (and the inside) needs for :func:`edge_noise` to measure its spread
MIN_EDGE_BAND_SITES = 30


def _group_median(v: np.ndarray, grp: np.ndarray) -> np.ndarray:
    """Each entry's group median of ``v`` (NaN values left out; NaN where a group has none)."""
    out = np.full(len(v), np.nan)
    for g in np.unique(grp):
        m = grp == g
        if np.isfinite(v[m]).any():
            out[m] = np.nanmedian(v[m])
    return out


def _robust_spread(v: np.ndarray) -> float:
    """1.4826 x the median absolute deviation (the standard deviation for Gaussian values)."""
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def edge_noise(z: np.ndarray, border: np.ndarray, spacing: float, column: np.ndarray, *,
               bands: int = 3, min_sites: int = MIN_EDGE_BAND_SITES) -> tuple[np.ndarray, list]:
    """How much noisier the z of the sites near the image border are than inside.

    Sites are put in bands by their distance from the nearest image border: band ``k`` holds the sites
    ``k`` to ``k + 1`` spacings from it, for ``k < bands``; the rest are the inside. Per band, the robust
    spread (1.4826 MAD) of the ``z`` of its ``column`` sites (metal and chalcogen columns that are
    judged) is compared with the inside's: the ratio is that band's excess noise.

    Parameters
    ----------
    z : float [N], robust z of the sites (about unit spread inside).
    border : float [N], each site's distance from the image border, px
        (:func:`stemfast.sitelattice.border_distance`).
    spacing : the site spacing, px.
    column : bool [N], the sites whose z measure the noise.
    bands : number of one-spacing bands along the border.
    min_sites : a band (and the inside) with fewer column sites is left as it is.

    Returns
    -------
    (factor, ratios)
        ``factor`` float [N] in (0, 1]: ``min(1, 1 / ratio)`` of the site's band, 1 inside and where
        unmeasured; ``ratios``: each band's spread over the inside's (None where unmeasured).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> border = rng.uniform(0, 100, 20000)
    >>> z = rng.normal(size=20000) * np.where(border < 10, 2.0, 1.0)   # twice as noisy within a spacing
    >>> factor, ratios = edge_noise(z, border, 10.0, np.ones(20000, bool))
    >>> [round(r) for r in ratios]
    [2, 1, 1]
    >>> float(factor[border < 10].max()) < 0.55 and float(factor[border >= 30].min()) == 1.0
    True
    """
    band = np.minimum(np.floor(np.maximum(border, 0.0) / spacing), bands).astype(np.int64)
    factor = np.ones(len(z))
    ratios: list = [None] * bands
    inside = column & (band == bands)
    if bands == 0 or inside.sum() < min_sites:
        return factor, ratios
    ref = _robust_spread(z[inside])
    if not ref > 0:
        return factor, ratios
    for k in range(bands):
        m = column & (band == k)
        if m.sum() >= min_sites:
            ratios[k] = _robust_spread(z[m]) / ref
            factor[band == k] = min(1.0, 1.0 / ratios[k]) if ratios[k] > 0 else 1.0
    return factor, ratios


def _scan_row_offset(z: np.ndarray, y: np.ndarray, usable: np.ndarray, *, rows: int = 1,
                     slack: float = 1.0) -> np.ndarray:
    """What the sites of one scan line have in common, per site: the median ``z`` of the usable sites
    whose row (``round(y)``) lies within ``rows`` of the site's row, shrunk towards 0 by ``slack``
    (``sign * max(|median| - slack, 0)``, so ordinary rows are left alone). A scan streak or row
    jump moves all sites along a line; a defect moves one -- it does not shift its row's median."""
    r = np.rint(y).astype(np.int64)
    lo = int(r.min()) if len(r) else 0
    r = r - lo
    n_rows = int(r.max()) + 1 if len(r) else 0
    off = np.zeros(n_rows)
    order = np.argsort(r[usable], kind="stable")
    zr = z[usable][order]
    rr = r[usable][order]
    starts = np.searchsorted(rr, np.arange(n_rows) - rows, side="left")
    stops = np.searchsorted(rr, np.arange(n_rows) + rows, side="right")
    full = stops - starts >= 5
    off[full] = window_medians(zr, starts[full], stops[full])
    off = np.sign(off) * np.maximum(np.abs(off) - slack, 0.0)
    return off[r]


def _scan_line_gain(inten: np.ndarray, refs: LocalReferences, sub: np.ndarray, y: np.ndarray,
                    usable: np.ndarray, streak: np.ndarray, *, rows: int = 1) -> np.ndarray:
    """``inten`` with the gain of flagged scan lines divided out, on the ``streak`` sites.

    A line whose gain is off scales all its columns by one factor ``g``: per streak site, ``g - 1`` is
    the median relative deviation ``(v - ref) / ref`` from the local own-sublattice median ``ref`` of
    the metal and chalcogen sites whose row (``round(y)``) lies within ``rows`` of its own (a defect
    moves one of them, not the median); hexagon centres (~0 after the bandpass) are left alone."""
    med = refs.median[:, 0]
    column = usable & np.isfinite(med) & (med > 0) & ((sub == METAL) | (sub == CHALCOGEN))
    rel = np.where(column, (inten - np.where(column, med, 1.0)) / np.where(column, med, 1.0), 0.0)
    r = np.rint(y)
    order = np.argsort(r[column], kind="stable")
    rr, vv = r[column][order], rel[column][order]
    lo = np.searchsorted(rr, r - rows, side="left")
    hi = np.searchsorted(rr, r + rows, side="right")
    out = np.asarray(inten, np.float64).copy()
    for i in np.flatnonzero(streak & (sub != HOLLOW)):
        if hi[i] - lo[i] >= 5:
            g = 1.0 + float(np.median(vv[lo[i]:hi[i]]))
            if g > 0.1:
                out[i] = inten[i] / g
    return out


def _hollow_background(xy: np.ndarray, inten: np.ndarray, sub: np.ndarray, usable: np.ndarray,
                       k: int = 3) -> np.ndarray:
    """Per site, the median intensity of the ``k`` nearest usable hexagon centres (sublattice 2) other
    than itself: the local background (support, contamination) at the site; 0 without hollows."""
    from scipy.spatial import cKDTree

    hol = np.flatnonzero((sub == HOLLOW) & usable & np.isfinite(inten))
    if len(hol) < k + 1:
        return np.zeros(len(xy))
    _, j = cKDTree(xy[hol]).query(xy, k=k + 1)
    idx = hol[j]
    vals = np.where(idx == np.arange(len(xy))[:, None], np.nan, inten[idx])
    # the k nearest other than the site itself
    vals = np.where(np.cumsum(np.isfinite(vals), axis=1) <= k, vals, np.nan)
    return np.nanmedian(vals, axis=1)


#: sites a group's latent mixture is fitted to at most (3 components of full covariance in the latent
#: space: ~80 parameters). 5000 rather than 20000: the same scores on every image of up to 15k sites,
#: 0.45 s less analysis at 4096^2 (83k sites), where the fit was the largest uncompiled part
LATENT_FIT_SITES = 5000


def _latent_density_score(mu: np.ndarray, groups: np.ndarray, usable: np.ndarray, seed: int,
                          n_components: int = 3, max_fit: int = LATENT_FIT_SITES) -> np.ndarray:
    """Negative log density of each latent mean under a Gaussian mixture of its group's latents, as a
    robust z within the group (high = unusual for its sublattice); each mixture fitted to at most
    ``max_fit`` of the group's sites (a random sample), all of them scored."""
    from threadpoolctl import threadpool_limits

    out = np.zeros(len(mu))
    rng = np.random.default_rng(seed)
    # one thread (BLAS): scipy's BLAS pool, woken for every 4 x 4 triangular solve of the mixture's
    # EM, made each take ~15 ms instead of 0.1 ms on 2 busy cores (2.4 s of a 5k-site analysis); set
    # once for all groups (~0.7 ms each time)
    with threadpool_limits(limits=1):
        for g in np.unique(groups):
            if g < 0:
                continue
            m = groups == g
            fit = np.flatnonzero(m & usable)
            if len(fit) < 10 * n_components:
                continue
            if len(fit) > max_fit:
                fit = rng.choice(fit, max_fit, replace=False)
            gm = fit_gaussian_mixture(mu[fit], n_components, seed=seed, reg_covar=1e-4)
            out[m] = robust_z(-gm.log_density(mu[m]))
    return out


def _reference_levels(refs: LocalReferences | None, grp: np.ndarray, inten: np.ndarray,
                      usable: np.ndarray, chalcogen_brighter: bool = False) -> np.ndarray:
    """Per site, the typical intensity of a metal, a chalcogen and a hollow site around it [N, 3]
    (local medians named by brightness, :func:`stemfast.materials.brightness_order`; the image-wide
    medians where there are none)."""
    n = len(grp)
    glob = np.array([np.median(inten[(grp == g) & usable]) if np.any((grp == g) & usable) else np.nan
                     for g in (METAL, CHALCOGEN, HOLLOW)])
    levels = np.tile(glob, (n, 1))
    if refs is not None:
        ok = refs.complete()
        levels[np.ix_(ok, brightness_order(chalcogen_brighter))] = -np.sort(-refs.median[ok], axis=1)
    return levels


#: a flagged metal site is named a vacancy only when it reads like an empty column: at most this many
#: robust standard deviations of the hollow sites (empty columns) above their level around it, and below
#: the midpoint between that level and the columns'. Simulated metal vacancies read -1.8 to 2.7 of them,
#: the dark Cr dopants of a Cr-doped WSe2 scan 7 to 15 (a light atom on the site, not an empty one)
EMPTY_Z = 4.0


def _empty_spread(sub: np.ndarray, levels: np.ndarray, inten: np.ndarray, usable: np.ndarray | None) -> float:
    """The scatter of an empty column: the robust spread of the ``usable`` hollow sites around their
    levels (``levels[:, 2]``); inf when fewer than 10 or none measured (then the midpoint alone
    decides, :func:`_metal_site_tests`)."""
    hol = (sub == HOLLOW) & np.isfinite(levels[:, 2]) & (np.ones(len(sub), bool) if usable is None else usable)
    sd = _robust_spread(inten[hol] - levels[hol, 2]) if hol.sum() >= 10 else np.inf
    return sd if sd > 0 else np.inf


def _metal_site_tests(v: float, level: np.ndarray, empty_sd: float) -> tuple[bool, bool]:
    """The two tests that call a flagged metal site of intensity ``v`` empty (``level``: its metal,
    chalcogen and hollow levels): below the midpoint from the hollow level to the dimmer column
    sublattice, and within :data:`EMPTY_Z` ``empty_sd`` of the hollow level. Where they disagree a
    vacancy and a light dopant cannot be told apart (:func:`_metal_kind_ambiguity`)."""
    metal, chalc, hollow = level
    return bool(v < 0.5 * (hollow + min(chalc, metal))), bool(not v - hollow > EMPTY_Z * empty_sd)


def _metal_kind_ambiguity(sub: np.ndarray, levels: np.ndarray, inten: np.ndarray, kinds: np.ndarray,
                          material, usable: np.ndarray | None) -> dict:
    """``{"metal_kind_ambiguous": n, "kind_warning": ...}`` when ``n`` of the metal sites
    :func:`_defect_kinds` named (``kinds``) fail one of :func:`_metal_site_tests` and pass the other,
    else ``{}``. With faint chalcogen columns (real MoS2,
    WS2) a site can read within an empty column's scatter, yet above the midpoint to the chalcogen
    level: it is named a substitution, and neither name can be trusted (a light dopant -- V, Ti --
    reads 0.1-0.35 of the metal contrast)."""
    m_ = get_material(material).metal
    flagged = np.flatnonzero(np.isin(kinds, [f"vacancy_{m_}", f"substitution_{m_}"]))
    if not len(flagged):
        return {}
    sd = _empty_spread(sub, levels, inten, usable)
    n = sum(len(set(_metal_site_tests(inten[i], levels[i], sd))) == 2 for i in flagged)
    if not n:
        return {}
    return {"metal_kind_ambiguous": int(n),
            "kind_warning": f"{n} of the {len(flagged)} flagged {m_} sites, named substitution_{m_}, read like an "
                            "empty column by one of two tests (within its scatter; below the midpoint to the "
                            f"chalcogen level) and not by the other: vacancy_{m_} and a light substitution (e.g. "
                            "V, Ti) cannot be told apart there"}


def _defect_kinds(sub: np.ndarray, z: np.ndarray, levels: np.ndarray, inten: np.ndarray,
                  is_defect: np.ndarray, material, usable: np.ndarray | None = None,
                  off_lattice: np.ndarray | None = None) -> np.ndarray:
    """Name each flagged site from its sublattice and where its intensity lies between the typical
    metal, chalcogen and hollow levels around it (``levels`` [N, 3]) -- with ``material``'s names.
    A metal site is a vacancy when it reads like an empty column (:data:`EMPTY_Z`: the spread is that
    of the ``usable`` hollow sites around their levels), else a substitution (a lighter or heavier atom).
    A flagged peak on no lattice node (``off_lattice``, the table's ``source``) is ``off_lattice``."""
    mat = get_material(material)
    m_, x_ = mat.metal, mat.chalcogen
    kinds = np.full(len(sub), "none", dtype=object)
    empty_sd = _empty_spread(sub, levels, inten, usable)
    for i in np.flatnonzero(is_defect):
        metal, chalc, hollow = levels[i]
        v = inten[i]
        if not np.isfinite(levels[i]).all() or sub[i] not in (METAL, CHALCOGEN, HOLLOW):
            kinds[i] = "other"
        elif sub[i] == METAL:
            # an empty metal site reads like an empty column (the hollow level, within its scatter);
            # otherwise a foreign atom, brighter or darker (a light dopant is dark, yet not empty). The
            # midpoint is to the dimmer column sublattice, not the metal's: with faint chalcogen columns a
            # dim metal site at 0.17-0.31 of the metal contrast (the V-doped MoS2 scans; V reads ~0.3) is
            # a dopant, though a faint-chalcogen synthetic Mo vacancy (0.1-0.2) is then named one too
            below_mid, in_scatter = _metal_site_tests(v, levels[i], empty_sd)
            kinds[i] = f"vacancy_{m_}" if below_mid and in_scatter else f"substitution_{m_}"
        elif sub[i] == CHALCOGEN:
            refs_ = {f"vacancy_{x_}2": hollow, f"vacancy_{x_}": 0.5 * (hollow + chalc), "none": chalc}
            if metal > chalc:  # a metal atom on the site reads brighter; where the chalcogen outshines the
                refs_[f"substitution_{x_}"] = metal  # metal (MoSe2 HAADF, MAADF) the metal level is no such mark
            best = min(refs_, key=lambda k: abs(v - refs_[k]))
            if best == "none":  # flagged, yet closest to a normal column: name the way it deviates
                best = f"vacancy_{x_}" if z[i] < 0 else f"substitution_{x_}"
            kinds[i] = best
        else:
            kinds[i] = "other"  # something at a hexagon centre (adatom, contamination)
    if off_lattice is not None:
        kinds[np.asarray(is_defect, bool) & np.asarray(off_lattice, bool)] = "off_lattice"
    return kinds.astype(str)


def _ari(a: np.ndarray, b: np.ndarray) -> float:
    return adjusted_rand_index(a, b) if len(a) > 1 else float("nan")


def neighbourhood_mean(xy: np.ndarray, values: np.ndarray, k: int, *, backend: str | None = None) -> np.ndarray:
    """Mean of ``values`` [N, ...] over each site's ``k`` nearest sites (itself included) [N, ...]:
    the ``neighbour_mean`` kernel of ``backend`` (:mod:`stemfast._kernels`; ties by index, summed
    nearest first; ``k`` is capped at N).

    Examples
    --------
    >>> xy = np.column_stack([np.arange(10.0), np.zeros(10)])
    >>> neighbourhood_mean(xy, np.arange(10.0), 3)[[0, 5, 9]].tolist()
    [1.0, 5.0, 8.0]
    """
    from .backend import get_kernels

    xy = np.ascontiguousarray(xy, np.float64)
    values = np.asarray(values, np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or not np.isfinite(xy).all():
        raise ValueError(f"xy must be finite [N, 2], got shape {xy.shape}")
    if len(values) != len(xy):
        raise ValueError(f"values must have N = {len(xy)} rows, got {len(values)}")
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(xy) == 0:
        return values.copy()
    flat = np.ascontiguousarray(values.reshape(len(xy), -1))
    out = get_kernels(backend).neighbour_mean(xy, flat, min(int(k), len(xy)))
    return out.reshape(values.shape)


def _learned_classes(sites: SiteTable, xy: np.ndarray, enc, mu: np.ndarray, angle: np.ndarray, inten: np.ndarray,
                     settings: AnalysisSettings, rotation_symmetry: int,
                     backend: str | None = None) -> tuple[np.ndarray, int, dict]:
    """k-means classes on the latent means and the rotation latent relative to each site's lattice
    (:func:`rotation_latent`, :func:`class_features`, :func:`cluster_latents`; the neighbour kernels
    of ``backend``)."""
    rot = None
    rot_info: dict = {"rotation_latent": "not available"}
    if all(c in sites for c in ("a1x", "a1y")):
        lattice_deg = np.degrees(np.arctan2(np.asarray(sites["a1y"], np.float64), np.asarray(sites["a1x"], np.float64)))
        grain = np.asarray(sites["grain"], np.int64) if "grain" in sites else None
        if "inversion_domain" in sites and np.any(sites["inversion_domain"]):
            # an inversion domain is turned by 60 deg: its orientation branch is chosen as a grain's is
            inv = np.asarray(sites["inversion_domain"], bool)
            grain = 2 * (np.zeros(len(inv), np.int64) if grain is None else grain) + inv
        strength = getattr(enc, "angle_strength", None)
        rot, rot_info = rotation_latent(angle, lattice_deg, symmetry=rotation_symmetry, grain=grain, content=mu,
                                        strength=None if strength is None else np.asarray(strength, np.float64))
    if settings.class_neighbors and len(mu) > settings.class_neighbors:
        mu = mu - neighbourhood_mean(xy, mu, settings.class_neighbors, backend=backend)
    feats = class_features(mu, rot)
    cls, k, info = cluster_latents(feats, n_classes=settings.n_classes, order_by=inten, settings=settings)
    if settings.class_margin > 0 and "sublattice" in sites and len(cls):
        cls, n_moved = lattice_consistent_classes(xy, np.asarray(sites["sublattice"], np.int64), feats, cls,
                                                  margin=settings.class_margin, backend=backend)
        info["classes_from_neighbours"] = n_moved
    info.update(rot_info)
    return cls, k, info


#: same-sublattice sites whose classes vote in :func:`lattice_consistent_classes` (the first two shells
#: of a sublattice: 6 + 6, and the third's 6)
CLASS_VOTERS = 18


def lattice_consistent_classes(xy: np.ndarray, sublattice: np.ndarray, features: np.ndarray, cls: np.ndarray, *,
                               margin: float, voters: int = CLASS_VOTERS,
                               backend: str | None = None) -> tuple[np.ndarray, int]:
    """Classes of ambiguous sites taken from the sites of their own sublattice around them.

    A site's class is the k-means cluster whose centre is nearest to its ``features``. Where the
    centre of the class that most of the ``voters`` nearest sites of the same ``sublattice`` have is
    hardly farther (at most ``1 + margin`` times the distance to its own), the latent space does not
    tell the two apart at this site -- texture of contamination, noise over a faint column -- and the
    site takes its neighbours' class. A site clearly nearer its own class (an antisite, a dopant, a
    site the model sees differently) keeps it. Sites with ``sublattice`` < 0 (off-lattice) keep theirs.

    Parameters
    ----------
    xy : [N, 2] positions (px). sublattice : [N] int, -1 unknown. features : [N, D] what k-means
        clustered. cls : [N] int k-means labels. margin : >= 0. voters : same-sublattice neighbours.
        backend : the kernel backend of the neighbour search (``sites.backend``; None:
        ``STEMFAST_BACKEND`` or the fastest available).

    Returns
    -------
    (classes [N] int64, how many changed)

    Examples
    --------
    >>> xy = np.c_[np.arange(40.0), np.zeros(40)]
    >>> feats = np.r_[np.zeros(39), 0.45][:, None]; feats[::7] = 1.0   # site 39 sits nearly half-way
    >>> cls = (feats[:, 0] > 0.5).astype(int); cls[39] = 1              # ... and was put in class 1
    >>> out, n = lattice_consistent_classes(xy, np.zeros(40, int), feats, cls, margin=0.3, voters=6)
    >>> int(out[39]), n
    (0, 1)
    """
    cls = np.asarray(cls, np.int64)
    feats = np.asarray(features, np.float64).reshape(len(cls), -1)
    sub = np.asarray(sublattice, np.int64)
    k = int(cls.max()) + 1
    cent = np.array([feats[cls == c].mean(0) if np.any(cls == c) else np.full(feats.shape[1], np.inf)
                     for c in range(k)])
    major = cls.copy()
    for s in np.unique(sub[sub >= 0]):
        idx = np.flatnonzero(sub == s)
        if len(idx) <= voters:
            continue
        j = nearest_indices(xy[idx], voters + 1, backend=backend)
        near = cls[idx][j[:, 1:]]
        votes = np.stack([(near == c).sum(1) for c in range(k)], axis=1)
        major[idx] = votes.argmax(1)
    d_own = np.linalg.norm(feats - cent[cls], axis=1)
    d_major = np.linalg.norm(feats - cent[major], axis=1)
    move = (major != cls) & (d_major <= (1.0 + margin) * d_own)
    return np.where(move, major, cls), int(move.sum())


@dataclass(frozen=True)
class _IntensityScores:
    """What :func:`_intensity_scores` gives: local sublattices ``sub`` (-1 unknown), the groups the
    scores are taken in ``grp``, the local references ``refs`` (None without a local lattice), the
    intensity they compare ``inten_ref``, the local and image-wide robust z, and the border bands'
    excess noise (:func:`edge_noise`; [] when not measured)."""

    sub: np.ndarray
    grp: np.ndarray
    refs: "LocalReferences | None"
    inten_ref: np.ndarray
    z_int: np.ndarray
    z_glob: np.ndarray
    edge_ratios: list


def _intensity_scores(sites: SiteTable, xy: np.ndarray, inten: np.ndarray, observed: np.ndarray,
                      sub_global: np.ndarray, cls: np.ndarray, settings: AnalysisSettings,
                      backend: str | None = None) -> _IntensityScores:
    """Each site's intensity against the sites of its own sublattice around it (from its local
    lattice), else against the image-wide sublattice; minus the shift its scan line shares (the
    references on the kernels of ``backend``)."""
    n = len(xy)
    basis = sites.basis
    if basis is not None and n >= 8:
        refs = local_references(xy, basis, inten, usable=observed, n_neighbors=settings.n_neighbors,
                                node_tolerance=settings.node_tolerance, backend=backend)
        cb = _chalcogen_brighter(sites)
        sub = name_by_brightness(refs.rank(), cb)
        inten_ref = inten
        streak = np.asarray(sites["scan_streak"], bool) if "scan_streak" in sites else np.zeros(n, bool)
        if settings.scan_rows and streak.any():
            # a scan line's gain scales its columns (the offset was levelled in the image): divide it out
            gained = _scan_line_gain(inten, refs, sub, xy[:, 1], observed, streak)
            refs = _refresh_references(refs, xy, basis, gained, observed, gained != inten, settings, backend)
            inten_ref = inten = gained
            sub = name_by_brightness(refs.rank(), cb)
        if settings.local_background:
            inten_ref = inten - _hollow_background(xy, inten, sub, observed)
            refs = local_references(xy, basis, inten_ref, usable=observed, n_neighbors=settings.n_neighbors,
                                    node_tolerance=settings.node_tolerance, backend=backend)
    else:  # no local lattice: one image-wide reference per sublattice
        refs = None
        inten_ref = inten
        sub = sub_global.copy()
    grp = np.where(sub >= 0, sub, np.where(sub_global >= 0, sub_global, 100 + cls))
    z_glob = robust_z(inten, np.where(observed, grp, -1))
    if refs is None:
        z_int = z_glob
    else:
        z_int = _local_z_without_outliers(inten_ref, refs, grp, observed, z_glob, xy, basis, settings, backend)
    if "companion_intensity" in sites:
        # a second detector of the same scan: the two images' z averaged (independent shot noise), each
        # weighed by how clearly the missing atoms stand out in it (detector_weights)
        z2 = _companion_z(sites, xy, grp, observed, None if refs is None else basis, settings, backend)
        w1 = detector_weights(z_int, z2, grp, observed & np.isfinite(z2))
        z_int = np.where(np.isfinite(z2), w1 * z_int + (1.0 - w1) * z2, z_int)  # no value there: one detector
    if settings.scan_rows and n:
        z_int = z_int - _scan_row_offset(z_int, xy[:, 1], observed)
    edge_ratios: list = []
    meta = getattr(sites, "meta", None) or {}
    if settings.edge_bands and n and "shape" in meta and meta.get("spacing_px"):
        # near the border the z are noisier (line starts, cut columns, one-sided references): the
        # excess, measured on this image, is divided out so the border needs the inside's evidence
        border = border_distance(xy, tuple(meta["shape"][-2:]))
        factor, edge_ratios = edge_noise(z_int, border, float(meta["spacing_px"]),
                                         observed & ((grp == METAL) | (grp == CHALCOGEN)), bands=settings.edge_bands)
        z_int = z_int * factor
    return _IntensityScores(sub, grp, refs, inten_ref, z_int, z_glob, edge_ratios)


#: a site's z beyond this below its references counts as a strongly dark site (:func:`detector_weights`)
DETECTOR_TAIL_Z = 3.5
#: sites a sublattice needs for its detector weights (else 0.5 each)
_DETECTOR_MIN_SITES = 50
#: added to each detector's share of strongly dark sites: no weight goes to 0
_DETECTOR_TAIL_FLOOR = 1e-3


def detector_weights(z1: np.ndarray, z2: np.ndarray, grp: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Float [N]: the weight of the first of two detectors' z in their mean, per site (the second's is
    one minus it). For the metal and chalcogen sites, each detector's share of its observed sites of that
    sublattice that are strongly dark (z < -:data:`DETECTOR_TAIL_Z`), normalised to sum 1: how clearly
    missing atoms stand out in each image -- a noisy (low-dose) detector blurs them into its spread and
    has fewer; 0.5 each elsewhere or with under :data:`_DETECTOR_MIN_SITES` sites. (The equal mean cost
    a low-dose WSe2 MAADF 0.05 AP beside its noisier HAADF; weighed by the images' column
    contrast-to-noise, nothing improved: docs/RESULTS.md, round 36.)

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> z_clear = np.r_[rng.normal(size=980), np.full(20, -8.0)]      # 20 vacancies stand out
    >>> z_noisy = np.r_[rng.normal(size=980), rng.normal(-1.0, 1.0, 20)]  # they hardly do
    >>> w = detector_weights(z_clear, z_noisy, np.ones(1000, int), np.ones(1000, bool))
    >>> round(float(w[0]), 2)
    0.96
    """
    w1 = np.full(len(z1), 0.5)
    for k in (METAL, CHALCOGEN):
        m = observed & (grp == k)
        if m.sum() < _DETECTOR_MIN_SITES:
            continue
        t1, t2 = (float(np.mean(z[m] < -DETECTOR_TAIL_Z)) + _DETECTOR_TAIL_FLOOR for z in (z1, z2))
        w1[grp == k] = t1 / (t1 + t2)
    return w1


def _companion_z(sites: SiteTable, xy: np.ndarray, grp: np.ndarray, observed: np.ndarray,
                 basis: np.ndarray | None, settings: AnalysisSettings, backend: str | None = None) -> np.ndarray:
    """The robust z of ``companion_intensity`` (:func:`stemfast.sites.companion_intensity`: the column
    intensity of another detector of the same scan) against the same kind of references as the first
    image's -- each site's own colour around it (with the local lattice ``basis``), else its
    sublattice image-wide; NaN where the companion has no value (the first image's z alone counts).
    ``backend``: the kernels' (``sites.backend``)."""
    comp = np.asarray(sites["companion_intensity"], np.float64)
    fin = np.isfinite(comp)
    ok = observed & fin
    comp = np.where(fin, comp, 0.0)
    z_glob = robust_z(comp, np.where(ok, grp, -1))
    if basis is None:
        return np.where(fin & np.isfinite(z_glob), z_glob, np.nan)
    refs = local_references(xy, basis, comp, usable=ok, n_neighbors=settings.n_neighbors,
                            node_tolerance=settings.node_tolerance, backend=backend)
    z = _local_z_without_outliers(comp, refs, grp, ok, z_glob, xy, basis, settings, backend)
    return np.where(fin & np.isfinite(z), z, np.nan)


def _flagged_fdr(fdr: np.ndarray, grp: np.ndarray, is_defect: np.ndarray, material: str) -> dict:
    """``{"flagged_fdr": {sublattice name: q}}``: per sublattice with flagged sites, the largest
    ``defect_fdr`` among them -- the estimated share of that sublattice's flagged sites the noise makes
    (the shrinkage keeps each sublattice's order, so they are its top scores); {} when none is flagged."""
    names = get_material(material).sublattice_names
    out = {}
    for k, name in enumerate(names):
        m = is_defect & (grp == k) & np.isfinite(fdr)
        if m.any():
            out[name] = round(float(fdr[m].max()), 4)
    return {"flagged_fdr": out} if out else {}


def _anomaly(settings: AnalysisSettings, sc: _IntensityScores, z_lat: np.ndarray, recon_score: np.ndarray,
             edge: np.ndarray) -> np.ndarray:
    """``anomaly_score`` as ``settings.score`` says (module docs)."""
    n = len(sc.grp)
    hollow = np.maximum(sc.z_int, 0.0) if settings.hollow_defects else np.zeros(n)
    local = np.where(sc.grp == HOLLOW, hollow, np.maximum(-sc.z_int, settings.brighter_weight * sc.z_int))
    if settings.score == "local":
        return local
    if settings.score == "global":
        return np.where(sc.grp == HOLLOW, np.maximum(sc.z_glob, 0.0) if settings.hollow_defects else 0.0,
                        np.maximum(-sc.z_glob, settings.brighter_weight * sc.z_glob))
    if settings.score == "combined":
        return np.sqrt(local ** 2 + np.maximum(np.where(edge, 0.0, z_lat), 0.0) ** 2)
    if settings.score == "latent":
        return np.where(edge, 0.0, z_lat)
    return np.where(edge, 0.0, recon_score)  # "recon": a padded border patch's error means nothing


def class_sublattices(cls: np.ndarray, sub: np.ndarray, material: str = "mos2") -> dict:
    """Which sublattice each learned class sits on: ``{class: {"sublattice": name, "share": f}}``,
    the sublattice (``material``'s name: ``"Mo"``, ``"S2"``, ``"hollow"`` ...) holding most of the
    class's sites and the share of them it holds. Sites with ``cls < 0`` or ``sub < 0`` are left out.

    >>> class_sublattices(np.array([0, 0, 1, 1, 1]), np.array([0, 0, 1, 1, 2]))
    {'0': {'sublattice': 'Mo', 'share': 1.0}, '1': {'sublattice': 'S2', 'share': 0.6667}}
    """
    cls = np.asarray(cls, np.int64)
    sub = np.asarray(sub, np.int64)
    names = get_material(material).sublattice_names
    ok = (cls >= 0) & (sub >= 0) & (sub < len(names))
    out = {}
    for c in np.unique(cls[ok]):
        counts = np.bincount(sub[ok & (cls == c)], minlength=len(names))
        out[str(int(c))] = {"sublattice": names[int(np.argmax(counts))],
                            "share": round(float(counts.max() / counts.sum()), 4)}
    return out


class SublatticeNamingWarning(UserWarning):
    """The image's strongly dark sites sit on the sublattice named metal: metal and chalcogen are
    named by brightness (``sites.chalcogen_brighter``), and this image may have them the other way
    round (see :func:`sublattice_naming`)."""


#: a site is dark (:func:`_dark_sites`) when its intensity z is below NAMING_Z or it reads like an empty
#: column (:func:`_empty_like`: below the midpoint between its sublattice's level and the hollow sites'
#: around it). The naming is questioned when the sublattice named metal holds at least NAMING_MIN dark
#: sites and significantly more than the chalcogen one: a one-sided sign test (binomial, p = 1/2) of its
#: count against the two together gives at most NAMING_P. The z test alone counted, on the labelled
#: WSe2 scans (ti2, ti11, ti25), HAADF (ADF1) 2-3 on the metal against 108-204 on the chalcogen; their
#: second detector (ADF2, Se2 brighter than W) 141-222 on the brightest sublattice against 1-3; a
#: Cr-doped WSe2 scan's ADF2 image (Se vacancies and Cr dopants, both dark) 89 against 25; real MoS2
#: 1-5 against 0; simulated MoS2 (V_Mo and Mo_S included) 0-14 against 17-82 -- and on a beam-damaged
#: simulated film (17 % of the columns defective) 84 against 30, a false warning: its many half-empty
#: S2 columns widen the chalcogen's spread, so its empty columns are no longer 4 spreads out. Read as
#: empty columns there are 363 (round 20). The empty-column test alone misses half-empty columns
#: (single S vacancies), which the z test counts. NAMING_MIN was 20 until round 31: a 512^2 MoSe2 field
#: named as a sulfide (Se2 brighter than Mo) holds 19-24 dark sites on the sublattice named metal
#: against 1-2, and 19 against 2 (p = 1e-4) said nothing. On the 95 shared, validation, proxy and new
#: real images every count with p <= NAMING_P has 66 or more on the metal, so 10 warns no other image.
NAMING_Z, NAMING_MIN, NAMING_P = -4.0, 10, 0.01


def _sign_test(k: int, other: int) -> float:
    """One-sided sign test: the chance of ``k`` or more of ``k + other`` fair coin tosses landing one
    way (the binomial tail, ``scipy.special.bdtrc``).

    >>> _sign_test(0, 5), round(_sign_test(5, 0), 5), round(_sign_test(20, 8), 4)
    (1.0, 0.03125, 0.0178)
    """
    from scipy.special import bdtrc

    return 1.0 if k <= 0 else float(bdtrc(k - 1, k + other, 0.5))


def _dark_sites(grp: np.ndarray, z: np.ndarray, levels: np.ndarray, inten: np.ndarray,
                usable: np.ndarray) -> np.ndarray:
    """Bool [N]: the ``usable`` sites that are dark for :func:`sublattice_naming` -- intensity ``z``
    below :data:`NAMING_Z`, or reading like an empty column (:func:`_empty_like`)."""
    with np.errstate(invalid="ignore"):
        strongly = np.asarray(usable, bool) & np.isfinite(z) & (np.asarray(z) < NAMING_Z)
    return strongly | _empty_like(grp, levels, inten, usable)


def _empty_like(grp: np.ndarray, levels: np.ndarray, inten: np.ndarray, usable: np.ndarray) -> np.ndarray:
    """Bool [N]: the ``usable`` metal and chalcogen sites whose intensity lies below the midpoint between
    their sublattice's level and the hollow sites' level around them (``levels`` [N, 3]: metal,
    chalcogen, hollow; :func:`_reference_levels`) -- a column that lost more than half its contrast
    reads like an empty one, whatever the spread of its sublattice."""
    own = np.where(grp == METAL, levels[:, 0], np.where(grp == CHALCOGEN, levels[:, 1], np.nan))
    with np.errstate(invalid="ignore"):
        return np.asarray(usable, bool) & np.isfinite(own) & (inten < 0.5 * (own + levels[:, 2]))


def sublattice_naming(sub: np.ndarray, dark: np.ndarray, usable: np.ndarray, chalcogen_brighter: bool = False,
                      material: str = "mos2") -> dict:
    """Check which sublattice is the metal against the image's dark sites.

    Metal and chalcogen columns are told apart by brightness alone (the lattice is the same for
    both): the brightest is the metal in HAADF, the chalcogen pair can be brighter at lower detector
    angles (``chalcogen_brighter``). Vacancies are far commoner on the chalcogen sublattice of a 2H
    monolayer (lower formation energy, beam sputtering), so when the dark sites (``dark``, bool [N]:
    :func:`_dark_sites`) crowd on the sublattice named metal, the naming is likely the wrong way round
    -- or the film is heavily doped on its metal sites. "Crowd" is a one-sided sign test:
    at least :data:`NAMING_MIN` dark sites on the metal, and at most a chance of :data:`NAMING_P` to
    find as many there were the dark sites as likely on either sublattice. Returns ``{"sublattice_naming":
    {...counts...}}`` plus ``naming_warning`` (also a :class:`SublatticeNamingWarning`) then.

    Examples
    --------
    >>> sub = np.repeat([0, 1, 2], 100); dark = np.zeros(300, bool); dark[:30] = True
    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     out = sublattice_naming(sub, dark, np.ones(300, bool), material="wse2")
    >>> out["sublattice_naming"]["dark"], "naming_warning" in out
    ({'W': 30, 'Se2': 0}, True)
    """
    mat = get_material(material)
    dark = np.asarray(usable, bool) & np.asarray(dark, bool)
    n_m, n_c = int((dark & (sub == METAL)).sum()), int((dark & (sub == CHALCOGEN)).sum())
    names = mat.sublattice_names
    info: dict = {"sublattice_naming": {"brightest": names[CHALCOGEN] if chalcogen_brighter else names[METAL],
                                        "dark": {names[METAL]: n_m, names[CHALCOGEN]: n_c}}}
    p_metal = _sign_test(n_m, n_c)
    info["sublattice_naming"]["p_metal"] = round(p_metal, 6)
    if n_m >= NAMING_MIN and p_metal <= NAMING_P:
        msg = (f"{n_m} strongly dark sites sit on the sublattice named {names[METAL]} against {n_c} on the one "
               f"named {names[CHALCOGEN]}: vacancies are far commoner on the chalcogen sublattice, so the "
               f"{'middle' if chalcogen_brighter else 'brightest'} sublattice may be the chalcogen here "
               f"({'as HAADF shows a sulfide or WSe2, where the metal outshines the chalcogen pair' if chalcogen_brighter else 'a medium- or low-angle ADF image, where the chalcogen pairs outshine the metal'}"
               f") -- then sublattice and defect-kind names are swapped; if so, rerun with "
               f"sites.chalcogen_brighter = {'false' if chalcogen_brighter else 'true'}. A film heavily doped "
               f"on its metal sites shows the same pattern")
        warnings.warn(msg, SublatticeNamingWarning, stacklevel=3)  # at analyze_sites' caller
        info["naming_warning"] = msg
    return info


class MixedColumnsWarning(UserWarning):
    """One column sublattice's intensities spread far more about their local level than the other's:
    a mixed column population (see :func:`mixed_columns`)."""


#: a column sublattice is mixed (:func:`mixed_columns`) when its intensities spread about their local
#: level (the robust spread of intensity minus the local median of its own sublattice) more than this
#: many times the other column sublattice's. Every shared and validation scan, dev1-4 and the fourth
#: SciLink MoS2 scan: 1.05-1.63 (the ADF2 WSe2 scans' W columns the widest); Se-implanted MoS2 probes
#: (S2 / SSe / Se2 on one sublattice, 30-60 % of the S replaced, or 20 / 20 / 60 %): 3.4-10.0 (90 %
#: replaced: 1.2, the sublattice nearly all Se2 again). Shot noise alone cannot reach it: a chalcogen
#: column at a fifth of the metal's signal, without any background, has sqrt(5) = 2.2 times less noise
MIXED_SPREAD_RATIO = 2.5
#: least sites of each column sublattice for the test
MIXED_MIN_SITES = 50


def mixed_columns(grp: np.ndarray, resid: np.ndarray, usable: np.ndarray, material: str = "mos2") -> dict:
    """Whether one column sublattice holds a mixture of column kinds: ``{"column_spread": {name:
    spread}}`` (the robust spread of ``resid``, each site's intensity minus the local median of its own
    sublattice, per column sublattice) and, where one spreads more than :data:`MIXED_SPREAD_RATIO`
    times the other, ``mixed_warning`` (also a :class:`MixedColumnsWarning`). An alloy or implanted
    film (S2, SSe and Se2 columns on one sublattice), heavy doping or heavy beam damage: every score
    compares a column with its sublattice's local median, so the defect ranking then follows the
    mixture (a substituted column ranks like a defect) and a vacancy stands out less.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> grp = np.repeat([METAL, CHALCOGEN, HOLLOW], 200)
    >>> resid = rng.normal(0, 1.0, 600)
    >>> "mixed_warning" in mixed_columns(grp, resid, np.ones(600, bool))
    False
    >>> resid[200:400] += rng.choice([0.0, 5.0, 10.0], 200)        # the chalcogen: three column kinds
    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     out = mixed_columns(grp, resid, np.ones(600, bool))
    >>> "mixed_warning" in out, out["column_spread"]["S2"] > 2.5 * out["column_spread"]["Mo"]
    (True, True)
    """
    names = get_material(material).sublattice_names
    ok = np.asarray(usable, bool) & np.isfinite(resid)
    spread = {}
    for g in (METAL, CHALCOGEN):
        r = np.asarray(resid)[ok & (grp == g)]
        if len(r) < MIXED_MIN_SITES:
            return {}
        spread[g] = _robust_spread(r)
    info: dict = {"column_spread": {names[g]: round(v, 6) for g, v in spread.items()}}
    wide, narrow = (METAL, CHALCOGEN) if spread[METAL] >= spread[CHALCOGEN] else (CHALCOGEN, METAL)
    if spread[narrow] > 0 and spread[wide] > MIXED_SPREAD_RATIO * spread[narrow]:
        msg = (f"the {names[wide]} columns spread {spread[wide] / spread[narrow]:.1f}x as far about their local level as "
               f"the {names[narrow]} columns: a mixed column population on that sublattice (an alloy or implanted "
               f"film -- e.g. S2, SSe and Se2 columns -- heavy doping, or heavy beam damage). The defect scores "
               f"compare each column with its sublattice's local median, so they follow the mixture (a substituted "
               f"column ranks like a defect) and vacancies stand out less")
        warnings.warn(msg, MixedColumnsWarning, stacklevel=3)  # at analyze_sites' caller
        info["mixed_warning"] = msg
    return info


class SublatticeSeparationWarning(UserWarning):
    """Two sublattices read alike: their names (which is the metal, which the chalcogen, which is
    empty) are a guess (see :func:`sublattice_separation`)."""


#: two sublattices are told apart only when their median intensities lie at least this many robust
#: spreads (of a site's intensity about its own sublattice's local level) apart, and three standard
#: errors of that difference. Metal against chalcogen pair on 91 shared, validation, proxy and new real
#: images: 0.90 (the labelled WSe2 HAADF at a quarter of its dose) to 9.2; chalcogen pair against
#: hollow: 1.43 (a contaminated proxy of the faint-S2 MoS2 001-5) to 19. A honeycomb of one kind of
#: column reads 0.00-0.12, a triangular lattice of one kind (its two other sites empty) 0.01-0.28 and a
#: 1T projection (one chalcogen on each non-metal site) -0.02-0.24 (the brighter of two alike
#: sublattices is the one named the chalcogen: a positive difference by selection, which the three
#: standard errors cover)
MIN_SUBLATTICE_SEPARATION = 0.25
#: least sites of each sublattice for :func:`sublattice_separation`
SEPARATION_MIN_SITES = 50


def sublattice_separation(grp: np.ndarray, inten: np.ndarray, resid: np.ndarray, usable: np.ndarray,
                          material: str = "mos2") -> dict:
    """Whether the sublattices the lattice names read as different columns: ``{"sublattice_separation":
    {"<metal>-<chalcogen>": d, "<chalcogen>-hollow": d}}``, ``d`` the difference of the two sublattices'
    median ``inten`` in robust spreads of ``resid`` (each site's intensity about its own sublattice's
    local level, so gradients do not widen it), and, where one ``d`` is under
    :data:`MIN_SUBLATTICE_SEPARATION` (or three standard errors), ``sublattice_alike`` (the pairs that
    read alike) and ``separation_warning`` (also a :class:`SublatticeSeparationWarning`).

    Metal and chalcogen alike: a honeycomb of one kind of column (not a 2H monolayer; a 2H bilayer in
    AA' stacking, a metal over each chalcogen pair, looks so too) or a detector where both scatter
    alike -- which is named the metal is a guess. Chalcogen and hollow alike: no chalcogen columns are
    seen (a triangular lattice of one kind of column, or columns too faint for the dose) or both sites
    hold alike columns (a 1T phase: one chalcogen on each) -- which of the two is named the chalcogen
    is a guess, and its vacancies cannot be found.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> grp = np.repeat([METAL, CHALCOGEN, HOLLOW], 300)
    >>> resid = rng.normal(0, 1.0, 900)
    >>> sep = sublattice_separation(grp, np.repeat([10.0, 4.0, 0.0], 300) + resid, resid, np.ones(900, bool))
    >>> {k: round(v) for k, v in sep["sublattice_separation"].items()}, "separation_warning" in sep
    ({'Mo-S2': 6, 'S2-hollow': 4}, False)
    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     sep = sublattice_separation(grp, np.repeat([10.0, 0.0, 0.0], 300) + resid, resid, np.ones(900, bool))
    >>> sep["sublattice_alike"], "no S2 columns are seen" in sep["separation_warning"]
    (['S2-hollow'], True)
    """
    names = get_material(material).sublattice_names
    ok = np.asarray(usable, bool) & np.isfinite(inten) & np.isfinite(resid)
    med, spread, count = {}, {}, {}
    for g in (METAL, CHALCOGEN, HOLLOW):
        m = ok & (grp == g)
        if m.sum() < SEPARATION_MIN_SITES:
            return {}
        med[g], spread[g], count[g] = float(np.median(inten[m])), _robust_spread(resid[m]), int(m.sum())
    sep, alike = {}, []
    for a, b in ((METAL, CHALCOGEN), (CHALCOGEN, HOLLOW)):
        pooled = float(np.sqrt(0.5 * (spread[a] ** 2 + spread[b] ** 2)))
        if not pooled > 0:
            continue
        d = (med[a] - med[b]) / pooled
        # the standard error of a difference of medians (1.2533 sigma / sqrt(n) each), in the same units
        se = 1.2533 * float(np.sqrt(spread[a] ** 2 / count[a] + spread[b] ** 2 / count[b])) / pooled
        sep[f"{names[a]}-{names[b]}"] = round(d, 3)
        if abs(d) < max(MIN_SUBLATTICE_SEPARATION, 3.0 * se):
            alike.append((a, b, d))
    info: dict = {"sublattice_separation": sep}
    msgs = []
    for a, b, d in alike:
        if a == METAL:
            msgs.append(f"the {names[METAL]} and {names[CHALCOGEN]} sites read alike (medians {d:+.2f} spreads "
                        f"apart): intensity cannot tell the metal from the chalcogen, so which sublattice is named "
                        f"{names[METAL]} is a guess (a honeycomb of one kind of column -- graphene-like, or a 2H "
                        f"bilayer in AA' stacking, a metal over each chalcogen pair -- is no 2H monolayer; or a "
                        f"detector where both scatter alike) -- the names of the sublattices, classes and defect "
                        f"kinds may be swapped")
        else:
            msgs.append(f"the {names[CHALCOGEN]} sites read like the hexagon centres (medians {d:+.2f} spreads "
                        f"apart), unlike a 2H monolayer's: either no {names[CHALCOGEN]} columns are seen (a triangular "
                        f"lattice of one kind of column; or chalcogen columns too faint for this dose) or both sites "
                        f"hold alike columns (a 1T phase: one chalcogen on each) -- which of the two is named "
                        f"{names[CHALCOGEN]} is a guess, and chalcogen vacancies cannot be found")
    if msgs:
        msg = "; ".join(msgs)
        warnings.warn(msg, SublatticeSeparationWarning, stacklevel=3)  # at analyze_sites' caller
        info["sublattice_alike"] = [f"{names[a]}-{names[b]}" for a, b, _ in alike]
        info["separation_warning"] = msg
    return info


def detection_limit(separation: dict, alike, cutoff: float, material: str = "mos2") -> dict:
    """Whether one missing chalcogen atom can be flagged: ``{"single_vacancy_depth": d,
    "detection_warning": ...}`` when a column with one of its two chalcogen atoms gone is expected
    ``d`` = half the chalcogen-hollow separation (:func:`sublattice_separation`, robust spreads) below
    its sublattice's level and ``d`` is under the defect ``cutoff``: most such vacancies then stay
    unflagged, and their absence is no evidence of a clean film (at low dose, or with faint chalcogen
    columns). ``{}`` when the separation is unknown, the chalcogen reads like the hexagon centres
    (``alike``: said by :func:`sublattice_separation`) or ``d`` reaches the cutoff.

    Examples
    --------
    >>> detection_limit({"S2-hollow": 11.7}, [], 4.0)
    {}
    >>> out = detection_limit({"S2-hollow": 3.0}, [], 4.0)
    >>> out["single_vacancy_depth"], "vacancy_S" in out["detection_warning"]
    (1.5, True)
    """
    names = get_material(material).sublattice_names
    key = f"{names[CHALCOGEN]}-{names[HOLLOW]}"
    if key not in separation or key in alike:
        return {}
    depth = 0.5 * float(separation[key])
    if not 0 < depth < cutoff:
        return {}
    x = get_material(material).chalcogen
    return {"single_vacancy_depth": round(depth, 2),
            "detection_warning": f"one missing {x} atom (vacancy_{x}) is expected about {depth:.1f} robust spreads "
                                 f"below its column's level (half the {key} separation of {2 * depth:.1f}), under the "
                                 f"defect cutoff of {cutoff:g}: most such vacancies are not flagged, and few or none "
                                 "flagged is no evidence of a clean film (low dose, or faint chalcogen columns)"}


def _chalcogen_brighter(sites: SiteTable) -> bool:
    """Whether the site table names the brighter of metal and chalcogen the chalcogen
    (``sites.chalcogen_brighter``, recorded in its meta)."""
    return bool((getattr(sites, "meta", None) or {}).get("chalcogen_brighter", False))


#: the sublattice agreement is measured on the sites both readings of the lattice's colouring agree on
#: when they are at least this share of the judged sites (else on all of them, against the reading the
#: classes follow better)
MIN_CONSENSUS = 0.8


def _class_agreement(cls: np.ndarray, sub: np.ndarray, sub_global: np.ndarray, usable: np.ndarray,
                     settings: AnalysisSettings, material: str = "mos2") -> dict:
    """Do the learned classes follow the sublattices? ARI of the classes against the sublattices on the
    ``usable`` sites (observed, not defects) whose sublattice the two readings of the lattice's
    three-colouring agree on: the image-wide one (``sub_global``, the ``sublattice`` column: the
    colouring of the lattice indices, named per grain) and the local one (``sub``, named by the
    brightness ranks around each site). Each reading fails its own way -- the local naming swaps a
    faint chalcogen sublattice with the hollow one under contamination, the image-wide colouring can
    slip across a line defect -- and classes that follow contamination instead of the structure
    disagree with both. When the two readings agree on fewer than :data:`MIN_CONSENSUS` of the judged
    sites, one of them fails widely (the local one where metal and chalcogen columns are about as
    bright, as at some detector angles; the image-wide one across a slip): the agreement is then the
    better of the ARIs against each reading on all judged sites. A :class:`ClassAgreementWarning` when
    low; also the ARI against the local reading on all judged sites, and the sublattice each class sits
    on (:func:`class_sublattices`, on the same sites and reading as the agreement)."""
    judged = usable & (sub >= 0)
    both = judged & (sub == sub_global)
    local = _ari(cls[judged], sub[judged]) if judged.sum() > 1 else float("nan")
    consensus = both.sum() > 1 and both.sum() >= MIN_CONSENSUS * judged.sum()
    # the sites and the reading the agreement is measured on (and each class' sublattice with it)
    if consensus:
        ref, ref_sub, agreement = both, sub, _ari(cls[both], sub[both])
    else:  # one reading fails on many sites, which one is not known: classes that follow either follow the lattice
        ref, ref_sub, agreement = judged, sub, local
        glob = judged & (sub_global >= 0)
        image_wide = _ari(cls[glob], sub_global[glob]) if glob.sum() > 1 else float("nan")
        if np.isfinite(image_wide) and not image_wide <= local:
            ref, ref_sub, agreement = glob, sub_global, image_wide
    info: dict = {"class_sublattice_ari": agreement, "class_sublattice_ari_local": local,
                  "class_sublattice": class_sublattices(cls[ref], ref_sub[ref], material)}
    if judged.any():
        info["sublattice_local_vs_global"] = float(np.mean(sub[judged] == sub_global[judged]))
    if np.isfinite(agreement) and agreement < settings.min_class_agreement:
        msg = (f"the learned classes do not follow the sublattices (ARI {agreement:.2f} against the lattice's "
               f"metal / chalcogen / hollow colouring): treat class_id with care")
        warnings.warn(msg, ClassAgreementWarning, stacklevel=3)  # at analyze_sites' caller
        info["class_warning"] = msg
    return info



def _sublattice_checks(sc: _IntensityScores, levels: np.ndarray, sub_global: np.ndarray, observed: np.ndarray,
                       inside: np.ndarray, is_defect: np.ndarray, sites: SiteTable, material: str,
                       cutoff: float) -> dict:
    """What the summary says of the sublattices: which is named the metal (:func:`sublattice_naming`, as
    ``sites`` were named: ``meta["chalcogen_brighter"]``, and where a second detector told the names
    :mod:`stemfast.pairnaming`, ``from_companion``), whether they read as different columns
    (:func:`sublattice_separation`, on the observed sites off the image border, ``inside``, that are not
    defects), whether one missing chalcogen atom can pass the defect ``cutoff`` (:func:`detection_limit`;
    not with a second detector's ``companion_intensity``) and whether one holds a mixture of columns
    (:func:`mixed_columns`, on the ``inside`` sites; not where the chalcogen sublattice reads empty: its
    narrow spread then says nothing)."""
    two_detectors = "companion_intensity" in sites
    dark = _dark_sites(sc.grp, sc.z_int, levels, sc.inten_ref, observed)
    info = sublattice_naming(sc.grp, dark, observed, _chalcogen_brighter(sites), material)
    if sites.meta.get("naming_from_companion"):
        info["sublattice_naming"]["from_companion"] = dict(sites.meta["naming_from_companion"])
    resid = sc.inten_ref - (sc.refs.median[:, 0] if sc.refs is not None else _group_median(sc.inten_ref, sc.grp))
    # the image-wide colouring where it names a site (the local one, by brightness rank, splits two
    # sublattices that read alike at random, which is what is measured here)
    info.update(sublattice_separation(np.where(sub_global >= 0, sub_global, sc.grp), sc.inten_ref, resid,
                                      inside & ~is_defect, material))
    if not two_detectors:  # (the z of two detectors is their weighted mean: one image's separation does not tell)
        info.update(detection_limit(info.get("sublattice_separation", {}), info.get("sublattice_alike", ()), cutoff,
                                    material))
    names = get_material(material).sublattice_names
    if sc.refs is not None and f"{names[CHALCOGEN]}-{names[HOLLOW]}" not in info.get("sublattice_alike", ()):
        info.update(mixed_columns(sc.grp, resid, inside, material))
    return info


def _top_candidates(order: np.ndarray, table: SiteTable, xy_recorded: np.ndarray) -> list[dict]:
    """The summary's ``top`` entries of the sites ``order`` (their columns as in ``sites.csv``;
    sublattices -1 where not known)."""
    cols = {c: np.asarray(table[c]) for c in ("anomaly_score", "recon_score", "defect_kind", "class_id",
                                              "sublattice", "sublattice_local") if c in table}
    sub = cols.get("sublattice", np.full(len(table), -1))
    return [{"index": int(i), "x": float(xy_recorded[i, 0]), "y": float(xy_recorded[i, 1]),
             "anomaly_score": float(cols["anomaly_score"][i]), "recon_score": float(cols["recon_score"][i]),
             "defect_kind": str(cols["defect_kind"][i]), "class_id": int(cols["class_id"][i]),
             "sublattice": int(sub[i]), "sublattice_local": int(cols["sublattice_local"][i])} for i in order]


def analyze_sites(sites: SiteTable, enc, *, settings: AnalysisSettings = AnalysisSettings(),
                  edge: np.ndarray | None = None, rotation_symmetry: int = 3,
                  backend: str | None = None) -> tuple[SiteTable, dict]:
    """Add classes and defect scores to a site table.

    Parameters
    ----------
    sites : SiteTable from :func:`stemfast.find_sites` (needs ``x, y, intensity``; uses the local
        basis ``a1x, a1y, a2x, a2y``, ``sublattice``, ``observed`` and ``meta["material"]`` when present).
    enc : the model's encoding of the sites' patches (``mu`` [N, L], ``recon_error`` [N],
        ``angle`` [N]).
    edge : bool [N], patches that touch the image border; their model scores are not used (the
        padded patch makes them meaningless).
    rotation_symmetry : the model's rotation order k (its STN angles are defined modulo ``360 / k``).
        The classes are k-means on the latent means together with the rotation latent relative to
        the local lattice (:func:`rotation_latent`, :func:`class_features`).
    backend : the kernel backend of the neighbour searches and local references (``cpp``, ``numba``,
        ``numpy``): the run's ``sites.backend`` (:func:`stemfast.pipeline.analyze` passes it; the
        one setting for the whole run, not one of :class:`AnalysisSettings`); None:
        ``STEMFAST_BACKEND`` or the fastest available. The results do not depend on it.

    Returns
    -------
    (SiteTable, dict)
        The table with ``class_id, sublattice_local, recon_error, recon_score, intensity_z,
        intensity_z_global, latent_score, anomaly_score, is_defect, defect_kind, angle,
        neighbourhood_recon`` added
        (``angle`` = the model's rotation of the patch, degrees), and a summary with counts per
        class and defect kind, ``class_sublattice_ari`` and the ``top`` candidates.
    """
    n = len(sites)
    mu = np.asarray(enc.mu, dtype=np.float64)
    if len(mu) != n:
        raise ValueError(f"encoding has {len(mu)} rows for {n} sites")
    xy_recorded = np.column_stack([np.asarray(sites["x"], np.float64), np.asarray(sites["y"], np.float64)])
    xy = lattice_positions(xy_recorded, getattr(sites, "meta", None))  # neighbours are found on the lattice
    # what the scores compare: the column signal with a 1 px low-pass (sites.py), else the lattice-scale one
    inten = np.asarray(sites["column_intensity" if "column_intensity" in sites else "intensity"], dtype=np.float64)
    sub_global = np.asarray(sites["sublattice"], dtype=np.int64) if "sublattice" in sites else np.full(n, -1)
    rec = np.asarray(enc.recon_error, dtype=np.float64)
    observed = np.asarray(sites["observed"], bool) if "observed" in sites else np.ones(n, bool)
    material = sites.meta.get("material", "mos2") if getattr(sites, "meta", None) else "mos2"
    edge_ = np.zeros(n, bool) if edge is None else np.asarray(edge, bool)

    angle = np.asarray(getattr(enc, "angle", np.full(n, np.nan)), dtype=np.float64)
    cls, k, info = _learned_classes(sites, xy, enc, mu, angle, inten, settings, rotation_symmetry, backend)
    recon_score = robust_z(rec, cls)
    sc = _intensity_scores(sites, xy, inten, observed, sub_global, cls, settings, backend)
    z_lat = _latent_density_score(mu, np.where(edge_, -1, sc.grp), observed & ~edge_, settings.seed)
    anomaly = _anomaly(settings, sc, z_lat, recon_score, edge_)
    # where the model cannot reconstruct the neighbourhood (contamination's texture, amorphous film)
    # the column intensities are not evidence of a defect: the scores there are scaled down
    contrast = None if sc.refs is None else sc.refs.contrast()
    rec_level, exponent = contrast_levelled_recon(rec, contrast, observed & ~edge_)
    if exponent:
        info["recon_contrast_exponent"] = round(exponent, 3)
    neigh_rec = neighbourhood_recon(xy, rec_level, observed & ~edge_, backend=backend)
    unscaled, anomaly = anomaly, (anomaly / np.maximum(1.0, neigh_rec / settings.recon_slack)
                                  if settings.recon_slack > 0 else anomaly)
    if sc.edge_ratios:
        info["edge_z_spread"] = [None if r is None else round(float(r), 3) for r in sc.edge_ratios]
    # sites the scan hides (a faded band along the border) cannot be judged: no evidence either way
    anomaly = np.where(observed, anomaly, 0.0)
    # a score means what its sublattice's tail says: shrunk by the share of false discoveries there; and
    # the score as sites.csv writes it decides (a flagged 4.0000001 was written "4")
    fdr, final = _final_scores(anomaly, sc.grp, observed, settings)
    evidence, anomaly = anomaly, final
    is_defect = anomaly > settings.defect_cutoff
    info.update(_texture_info(neigh_rec, observed, settings, np.where(observed, unscaled, 0.0), is_defect, sc.grp))
    info.update(_flagged_fdr(fdr, sc.grp, is_defect, material))
    cb = _chalcogen_brighter(sites)
    levels = _reference_levels(sc.refs, sc.grp, sc.inten_ref, observed & ~is_defect, cb)
    kinds = _defect_kinds(sc.grp, sc.z_int, levels, sc.inten_ref, is_defect, material, observed & ~is_defect,
                          np.asarray(sites["source"]) == "off_lattice" if "source" in sites else None)
    info.update(_metal_kind_ambiguity(sc.grp, levels, sc.inten_ref, kinds, material, observed & ~is_defect))
    info.update(_class_agreement(cls, sc.sub, sub_global, observed & ~is_defect, settings, material))
    info.update(_sublattice_checks(sc, levels, sub_global, observed, observed & ~edge_, is_defect, sites, material,
                                   settings.defect_cutoff))
    table = sites.with_columns({
        "class_id": cls,
        "sublattice_local": sc.sub,
        "recon_error": rec,
        "recon_score": recon_score,
        "intensity_z": np.where(observed, sc.z_int, np.nan),  # a site the scan hides is not judged
        "intensity_z_global": np.where(observed, sc.z_glob, np.nan),
        "latent_score": z_lat,
        "anomaly_score": anomaly,
        "defect_fdr": fdr,
        "is_defect": is_defect,
        "defect_kind": kinds,
        "angle": angle,
        "neighbourhood_recon": neigh_rec,
        **({"edge": edge_} if edge is not None else {}),
    })
    order = np.lexsort((-evidence, -anomaly))[: settings.top_n]  # ties (shrunk to 0) by the score before
    summary = {
        "n_sites": int(n),
        "n_classes": int(k),
        "class_counts": {int(c): int((cls == c).sum()) for c in range(k)},
        "class_mean_intensity": {int(c): float(np.mean(inten[cls == c])) for c in range(k) if np.any(cls == c)},
        "n_defects": int(is_defect.sum()),
        "defect_kinds": {str(kd): int((kinds == kd).sum()) for kd in np.unique(kinds) if kd != "none"},
        "defect_cutoff": settings.defect_cutoff,
        "score": settings.score,
        **({"detectors": 2} if "companion_intensity" in sites else {}),
        "material": str(get_material(material).name),
        "top": _top_candidates(order, table, xy_recorded),
        **info,
    }
    return table, summary
