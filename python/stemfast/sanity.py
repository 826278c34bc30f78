"""Checks of the settings against the image they are applied to.

A setting can be valid on its own (``--spacing 12`` is a fine number) and still wrong for an
image (whose columns are 10.5 px apart). These checks say so instead of returning a quietly
wrong result:

- :func:`check_spacing_fits`: a given spacing must leave at least :data:`MIN_PERIODS` lattice
  periods across the image (else the lattice cannot be fitted: an error).
- :func:`spacing_warnings`: a given spacing is compared with the image's own estimate (the
  automatic estimate of :func:`stemfast.sites.find_sites` on a central crop); a difference of more
  than :data:`SPACING_TOLERANCE` is a warning, and a spacing of about sqrt(3) times the estimate
  is named as what it most likely is: the metal-metal distance, not the column spacing.

Examples
--------
>>> check_spacing_fits(12.0, (256, 256))
>>> try:
...     check_spacing_fits(1e9, (256, 256))
... except ValueError as exc:
...     print(str(exc).split(":")[0])
spacing 1e+09 px does not fit the 256 x 256 px image
"""
from __future__ import annotations

import dataclasses
import logging
import math
import warnings

import numpy as np

__all__ = ["check_spacing_fits", "spacing_warnings", "MIN_PERIODS", "SPACING_TOLERANCE"]

log = logging.getLogger(__name__)

#: Lattice periods a given spacing must leave across the shorter image side.
MIN_PERIODS = 4
#: Relative difference between a given spacing and the image's estimate that gives a warning.
SPACING_TOLERANCE = 0.10
_CROP = 512


def check_spacing_fits(spacing: float | None, shape) -> None:
    """Raise ``ValueError`` when ``spacing`` (px) leaves fewer than :data:`MIN_PERIODS` periods in ``shape``."""
    if spacing is None:
        return
    h, w = (int(s) for s in tuple(shape)[-2:])
    limit = min(h, w) / MIN_PERIODS
    if not (math.isfinite(spacing) and spacing <= limit):
        raise ValueError(f"spacing {spacing:g} px does not fit the {h} x {w} px image: at most {limit:g} px "
                         f"({MIN_PERIODS} lattice periods across the shorter side); is --spacing in px?")


def _own_estimate(image: np.ndarray, settings) -> float | None:
    """The spacing :func:`find_sites` estimates itself on a central crop (no fill-in), or None."""
    from .sites import find_sites

    img = np.asarray(image)
    H, W = img.shape[-2:]
    c = _CROP
    y0, x0 = max(0, (H - c) // 2), max(0, (W - c) // 2)
    crop = np.ascontiguousarray(img[y0:y0 + c, x0:x0 + c], dtype=np.float32)
    s = dataclasses.replace(settings, spacing=None, fill=False, detect_holes=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = find_sites(crop, settings=s)
    except ValueError as exc:
        log.debug("no own spacing estimate: %s", exc)
        return None
    sp = t.meta.get("spacing_px")
    return float(sp) if t.meta.get("status") == "ok" and sp else None


def spacing_warnings(image: np.ndarray, spacing: float | None, settings) -> list[str]:
    """Warnings about a user-given ``spacing`` (px) for ``image`` (empty when it agrees or is automatic).

    Parameters
    ----------
    image : the 2-D image.
    spacing : the spacing given by the user (``None``: automatic, nothing to check).
    settings : the :class:`stemfast.sites.SiteSettings` of the run (backend, material).
    """
    if spacing is None:
        return []
    est = _own_estimate(image, settings)
    if est is None:
        return [f"--spacing {spacing:g} px could not be checked: the image gives no spacing estimate of its own"]
    r = float(spacing) / est
    if abs(r - 1.0) <= SPACING_TOLERANCE:
        return []
    # what it did to the sites is the lattice's to say (stemfast.sites: the sites lie on the image's own
    # lattice where it shows none at the given spacing, whose filters were used all the same)
    msg = (f"the given spacing {spacing:g} px differs from the image's own estimate {est:.2f} px "
           f"(ratio {r:.2f}): the filters and the column search are sized for {spacing:g} px")
    if abs(r - math.sqrt(3.0)) <= 0.08:
        msg += (f"; {spacing:g} px is about sqrt(3) x {est:.2f} px: the metal-metal distance, not the column "
                f"spacing (nearest neighbour in projection) that --spacing means")
    elif abs(r - 1.0 / math.sqrt(3.0)) <= 0.05:
        msg += "; it is about 1/sqrt(3) of the estimate"
    return [msg]
