"""Clipped intensities: a detector driven into saturation, or a black level or an export that cut
the image's darkest or brightest values off.

Clipping piles the whole tail of the intensity distribution beyond the cut onto one value. The
brightest columns' cores then all read the same (a saturated HAADF detector on heavy atoms; an
8-bit export stretched by "auto contrast", which saturates a fraction of a per cent of the pixels
at each end), or the background and the faintest columns do (a black level set too high). Column
intensities, and the defect scores that compare them, are then compressed where the cut falls:
the tool says so (:func:`clipped_intensities`, in ``summary.json`` under ``lattice.clipping`` and
as a warning in the summary and the report) rather than scoring quietly on a cut image.

The test is a spike at the extreme value: at least :data:`MIN_CLIPPED_PIXELS` pixels and
:data:`MIN_CLIPPED_SHARE` of the image hold the maximum (minimum) value, and at least
:data:`SPIKE_RATIO` times as many as hold the next value in. An unclipped image has a thin tail
there (one pixel at the maximum of float data; fewer at the extreme level than at the next one of
integer data). Integer-valued images whose minimum is 0 are counts (a low-dose background is
mostly 0 counts: no spike test can tell that from a cut black level) and are not judged at the low
end.

Examples
--------
>>> rng = np.random.default_rng(0)
>>> img = rng.normal(100.0, 10.0, (64, 64))
>>> clipped_intensities(img)
{}
>>> c = clipped_intensities(np.minimum(img, 110.0))  # the brightest ~16 % cut at 110
>>> sorted(c), round(c["high"]["share"], 2)
(['high', 'warning'], 0.16)
"""
from __future__ import annotations

import numpy as np

from .nodata import NoData

__all__ = ["clipped_intensities", "ClippingWarning", "MIN_CLIPPED_PIXELS", "MIN_CLIPPED_SHARE", "SPIKE_RATIO"]


class ClippingWarning(UserWarning):
    """The image's intensities were clipped at one end (:func:`clipped_intensities`)."""


#: fewest pixels at the extreme value that can be a cut (a few equal maxima happen in quantised data)
MIN_CLIPPED_PIXELS = 16
#: least share of the image at the extreme value that is reported (0.01 %: a few column cores of a
#: 512 px image)
MIN_CLIPPED_SHARE = 1e-4
#: the extreme value must hold this many times the pixels of the next value in
SPIKE_RATIO = 4.0


def clipped_intensities(image, no_data: NoData | None = None) -> dict:
    """The ends of ``image``'s intensity range that were cut off (module docs).

    Parameters
    ----------
    image : (H, W) array, the raw micrograph (before any filtering).
    no_data : :class:`stemfast.nodata.NoData` of ``image``, optional: regions without data (padding,
        masks) are not counted -- a zero-filled margin is no cut black level.

    Returns
    -------
    dict
        Empty when neither end is clipped; else ``"high"`` and / or ``"low"``, each ``{"value":
        the extreme value, "pixels": how many hold it, "share": their share of the image}``, and
        ``"warning"``: one sentence for the summary and the report.
    """
    a = np.asarray(image)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"image must be a non-empty 2-D array, got shape {a.shape}")
    if no_data is not None and no_data.any():
        a = a[~no_data.pixels()]
        if a.size == 0:
            return {}
    out: dict = {}
    for end, v in (("high", a.max()), ("low", a.min())):
        if not np.isfinite(v):
            continue
        n = int(np.count_nonzero(a == v))
        if n < MIN_CLIPPED_PIXELS or n < MIN_CLIPPED_SHARE * a.size:
            continue
        if end == "low" and v == 0 and _integer_valued(a):
            continue
        rest = a[a < v] if end == "high" else a[a > v]
        nxt = int(np.count_nonzero(rest == (rest.max() if end == "high" else rest.min()))) if rest.size else 0
        if n >= SPIKE_RATIO * max(nxt, 1):
            out[end] = {"value": float(v), "pixels": n, "share": n / a.size}
    if out:
        out["warning"] = _warning(out)
    return out


#: a float image is a counting one when at least this share of its pixels hold whole numbers (the
#: repairs before the check -- spikes replaced by a local median, dead runs filled -- put a few halves in)
INTEGER_SHARE = 0.99


def _integer_valued(a: np.ndarray) -> bool:
    """Whether ``a`` holds counts: an integer dtype, or (nearly, :data:`INTEGER_SHARE`) whole numbers --
    its zeros are then counts of nothing (low dose), not a black level cut."""
    return a.dtype.kind in "biu" or bool(np.count_nonzero(a == np.round(a)) >= INTEGER_SHARE * a.size)


def _warning(c: dict) -> str:
    parts = []
    if "high" in c:
        parts.append(f"{c['high']['share']:.2%} of the pixels sit at the image's maximum ({c['high']['value']:.6g}): "
                     "the detector saturated, the export cut the brightest values or an annotation (scale bar, text) "
                     "was drawn in, so the brightest columns' intensities are compressed")
    if "low" in c:
        parts.append(f"{c['low']['share']:.2%} of the pixels sit at the image's minimum ({c['low']['value']:.6g}): "
                     "the black level or the export cut the darkest values (background, faint columns, vacancies)")
    return ("clipped intensities: " + "; ".join(parts) + "; column intensities and the defect scores that compare "
            "them are less reliable there (record or export without clipping)")
