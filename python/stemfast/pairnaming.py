"""The sublattice names of an image told by a second detector of the same scan.

An image's sublattices are named by brightness (:func:`stemfast.materials.name_by_brightness`): the
metal column the brightest, as HAADF shows a sulfide or WSe2 (``sites.chalcogen_brighter`` where the
chalcogen pair outshines it). At lower detector angles a chalcogen pair can outshine the metal -- the
WSe2 MAADF (ADF2) scans do -- and the names come out swapped. The ratio of a metal column's signal to
a chalcogen pair's grows with the detector's angle (Z-contrast: the exponent of Z rises towards ~1.7
at high angles), so two detectors of one scan whose angles are known by their names
(:func:`stemfast.detectors.higher_angle`) bound it: where the higher-angle detector shows the sublattice
named chalcogen brighter than the one named metal, while the names say the lower-angle image shows the
metal the brighter, the names cannot be right -- and the other way round. Then the image is named the
other way (:func:`names_contradicted`); otherwise the names stand (either order is possible).

On the labelled WSe2 scans (``wse2_ti2``): the MAADF file of the pair was named with W and Se2
swapped on every site (a naming warning said so); with the HAADF as its companion it is named as the
HAADF file, site for site.
"""
from __future__ import annotations

import numpy as np

from .materials import CHALCOGEN, METAL

__all__ = ["NAMING_Z", "names_contradicted"]

#: the companion's medians on the two column sublattices must differ by at least this many standard
#: errors (of a difference of medians) before they overrule the names
NAMING_Z = 5.0


def names_contradicted(sub: np.ndarray, companion: np.ndarray, usable: np.ndarray, *,
                       chalcogen_brighter: bool, companion_higher: bool) -> dict | None:
    """Whether the companion detector shows the image's sublattice names impossible (module docs).

    Parameters
    ----------
    sub : int [N] sublattice names of the image (:data:`~stemfast.materials.METAL`, ``CHALCOGEN``, ...).
    companion : float [N] the companion's column intensity at the sites.
    usable : bool [N] the sites to read (observed columns on the lattice).
    chalcogen_brighter : how the image was named: its brightest sublattice is the chalcogen.
    companion_higher : the companion was recorded at higher angles than the image (False: lower).

    Returns
    -------
    dict or None
        None where the names stand; else ``{"companion_brighter": "metal" | "chalcogen", "z": ...}``:
        which of the sublattices as named the companion shows the brighter, and by how many standard
        errors.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> sub = np.repeat([METAL, CHALCOGEN], 500)
    >>> comp = np.where(sub == CHALCOGEN, 1.0, 0.7) + 0.05 * rng.standard_normal(1000)
    >>> use = np.ones(1000, bool)
    >>> names_contradicted(sub, comp, use, chalcogen_brighter=False, companion_higher=True)["companion_brighter"]
    'chalcogen'
    >>> names_contradicted(sub, comp, use, chalcogen_brighter=False, companion_higher=False) is None
    True
    """
    sub = np.asarray(sub)
    v = np.asarray(companion, np.float64)
    use = np.asarray(usable, bool) & np.isfinite(v)
    m, c = v[use & (sub == METAL)], v[use & (sub == CHALCOGEN)]
    if len(m) < 10 or len(c) < 10:
        return None
    med_m, med_c = float(np.median(m)), float(np.median(c))
    # the standard error of a median: 1.2533 sigma / sqrt(n), sigma from the median absolute deviation
    se = 1.2533 * 1.4826 * np.hypot(np.median(np.abs(m - med_m)) / np.sqrt(len(m)),
                                    np.median(np.abs(c - med_c)) / np.sqrt(len(c)))
    if not se > 0:
        return None
    z = (med_c - med_m) / se
    if abs(z) < NAMING_Z:
        return None
    brighter = "chalcogen" if z > 0 else "metal"
    # higher angle: the metal gains on the chalcogen, so a higher-angle companion showing "chalcogen"
    # brighter contradicts an image named with the metal the brighter; a lower-angle one showing
    # "metal" brighter contradicts an image named with the chalcogen the brighter
    if (companion_higher and not chalcogen_brighter and brighter == "chalcogen") or \
            (not companion_higher and chalcogen_brighter and brighter == "metal"):
        return {"companion_brighter": brighter, "z": round(float(abs(z)), 1)}
    return None
