"""The allowed ranges of single settings, :data:`SETTING_LIMITS`, defined once, and their check.

:func:`stemfast.config.load_config` and :func:`stemfast.config.check_limits` apply them to the settings
they read (with the rule that numbers are finite), and every settings dataclass applies those of its own
section when it is made (:func:`check_section` in ``__post_init__``: ``SiteSettings`` ``"sites"``,
``LatticeSettings`` ``"sites.lattice"``, ``RVAEConfig`` ``"model"``, ``AnalysisSettings`` ``"analysis"``),
so a setting out of range is refused, with a message that names it and its range, wherever it comes
from: a TOML file, ``--set``, a command-line option or Python. This module imports no settings class
(they import it).
"""
from __future__ import annotations

import dataclasses

from .backend import BACKENDS
from .errors import SettingsError

__all__ = ["SETTING_LIMITS", "MAX_CLASSES", "MAX_SPACING_PX", "MAX_SEED", "Open", "check_setting", "check_section"]

#: Most classes k-means may be asked for (more classes than this describe sites, not kinds of sites).
MAX_CLASSES = 64
#: Largest column spacing accepted (px); whether a spacing fits an image is checked per image
#: (:func:`stemfast.sanity.check_spacing_fits`).
MAX_SPACING_PX = 2048.0

#: Largest random seed (NumPy's legacy generators and scikit-learn take ``0 .. 2**32 - 1``).
MAX_SEED = 2**32 - 1


class Open(float):
    """A bound of :data:`SETTING_LIMITS` the value must not reach: ``(Open(0), 1)`` is ``0 < v <= 1``."""


#: Checks on single settings beyond their type (which the dataclasses' annotations give), defined here once:
#: ``"section.key": (low, high)`` (inclusive, or exclusive where :class:`Open`; ``None`` = open) or a
#: tuple of allowed strings; a tuple setting (``model.channels``) has each of its values checked.
#: :func:`stemfast.config.load_config` and :func:`stemfast.config.check_limits` apply them, and so do the
#: settings classes when they are made (:func:`check_section`), so a setting out of range is refused
#: wherever it comes from.
#: Every float setting must also be finite unless its default is not (NaN is never accepted).
SETTING_LIMITS: dict[str, tuple] = {
    # lower bounds the settings classes check themselves (spacing >= 2, defect_cutoff > 0, ...) are not repeated
    "sites.spacing": (None, MAX_SPACING_PX),
    "sites.backend": BACKENDS,
    # discs around a column, in spacings: one wider than a spacing holds the neighbouring columns
    # (find_sites takes at least 1.5 px / 1 px for small spacings; 0 or less is no disc at all)
    "sites.refine_radius_nn": (Open(0), 1),
    "sites.intensity_radius_nn": (Open(0), 1),
    # the nodes of the site lattice (metal, chalcogen, hollow) are one spacing apart: a wider tolerance
    # makes a peak the column of two nodes
    "sites.node_tol_nn": (Open(0), 0.5),
    "sites.border_px": (0, None),  # px left out at the image's edge
    "sites.min_distance_nn": (Open(0), 1),  # between two peaks, in spacings (over one merges neighbours)
    "sites.refine_noise_nn": (0, None),
    "sites.off_lattice_strength": (0, None),  # a share of the columns' peak height
    "sites.lattice.min_inlier_fraction": (0, 1),  # a share of the neighbours
    "sites.lattice.edge_margin_px": (0, None),
    "sites.lattice.max_extrapolation": (0, None),  # spacings
    "sites.lattice.max_gap_deg": (0, 360),  # an angular gap around a point (360: no neighbours)
    "model.epochs": (1, 100000),
    "model.latent_dim": (1, 1024),
    "model.channels": (1, 1024),  # conv widths
    "model.stn_channels": (1, 1024),
    # rotation order of a site: 2, 3, 4 or 6 on a lattice (3 on 2H MoS2, 6 graphene); the encoder runs
    # k branches (symmetrize), so the cost grows with k
    "model.rotation_symmetry": (1, 12),
    "model.num_threads": (1, None),  # or none: torch's own setting
    "model.mask_radius": (Open(0), None),  # or none: the patch's inscribed disc
    "model.seed": (0, MAX_SEED),
    "analysis.n_classes": (1, MAX_CLASSES),
    "analysis.k_range": (1, MAX_CLASSES),
    "analysis.minibatch_above": (0, None),  # a number of sites (0: MiniBatchKMeans always)
    "analysis.top_n": (0, None),  # a number of candidates listed
    "analysis.n_neighbors": (7, None),  # local references: the first shell of each colour at least
    "analysis.seed": (0, MAX_SEED),
    "analysis.min_class_agreement": (-1, 1),  # an adjusted Rand index (-1: never warn)
    "patch_size": (None, 1024),
}


def _range_text(lo, hi) -> str:
    """``"between 1 and 64"``, ``">= 0"``, ``"> 0 and <= 1"``... (whole numbers written in full)."""
    def num(x) -> str:
        return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"

    low = None if lo is None else f"{'>' if isinstance(lo, Open) else '>='} {num(lo)}"
    high = None if hi is None else f"<= {num(hi)}"
    if low and high:
        return f"between {num(lo)} and {num(hi)}" if not isinstance(lo, Open) else f"{low} and {high}"
    return low or high or "any number"


def check_setting(val, where: str) -> None:
    """``val`` (each value of a tuple) against ``SETTING_LIMITS[where]``; ``None`` passes."""
    lim = SETTING_LIMITS.get(where)
    if lim is None:
        return
    for v in val if isinstance(val, (list, tuple)) else [val]:
        if v is None:
            continue
        if lim and all(isinstance(x, str) for x in lim):
            if v not in lim:
                raise SettingsError(f"{where} must be one of {', '.join(lim)}, got {v!r}")
            continue
        lo, hi = lim
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if (lo is not None and (v < lo or (isinstance(lo, Open) and v == lo))) or (hi is not None and v > hi):
                raise SettingsError(f"{where} must be {_range_text(lo, hi)}, got {v!r}")


def check_section(settings, section: str) -> None:
    """Check the fields of one settings dataclass (``section``: ``"model"``, ``"sites.lattice"``...) against
    :data:`SETTING_LIMITS`; called by their ``__post_init__``. Raises :class:`SettingsError` naming the setting.

    Examples
    --------
    >>> from stemfast.analysis import AnalysisSettings
    >>> AnalysisSettings(top_n=-1)
    Traceback (most recent call last):
    ...
    stemfast.errors.SettingsError: analysis.top_n must be >= 0, got -1
    """
    for f in dataclasses.fields(settings):
        check_setting(getattr(settings, f.name), f"{section}.{f.name}")
