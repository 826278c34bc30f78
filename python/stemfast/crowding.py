"""Crowding: sites of a table closer together than a regular lattice allows, and where they lie.

A regular site lattice -- also one anisotropic by 20 % (scan distortion), also around a hole, where
neighbours are missing, not close -- never puts two sites closer than about 0.8 spacings. Crowding
comes from a site lattice that is locally compressed or doubled: where the recorded lattice is (a
band of scan lines recorded off pace), where the local fits have taken one node row too many (a
disturbed region: contamination, scan glitches, a line defect of the film -- the added sites then
crowd the found columns), or from two sites for one column. :func:`crowding` measures it over a site
table, names the bands of rows and the regions where it happens, and words the warning that
:func:`stemfast.sites.find_sites` gives (``meta["lattice"]["crowding"]``, the ``crowded`` column).
"""
from __future__ import annotations

import numpy as np

from .lattice import linked_clusters, nearest_indices
from .sitelattice import UNCROWD_NN, border_distance

__all__ = ["LatticeCrowdingWarning", "crowding", "CROWDED_NN", "MAX_CROWDED"]


class LatticeCrowdingWarning(UserWarning):
    """Part of the site table is crowded: sites closer together than a regular lattice allows (see
    ``meta["lattice"]["crowding"]``): where the site lattice found is locally compressed or doubled."""


#: a site is crowded when its nearest site is closer than this many typical spacings (the median
#: distance to the six nearest sites): what a regular lattice -- even one anisotropic by 20 % -- never
#: has, and what the shared physics check (``check_lattice.py``: six neighbours within +-25 %) fails;
#: the bound the site placement uncrowds predicted sites by (:data:`stemfast.sitelattice.UNCROWD_NN`)
CROWDED_NN = UNCROWD_NN
#: share of crowded interior sites above which the table is reported as crowded (a warning). The shared
#: real and simulated images have 0-1.3 %; a real MoS2 scan (SciLink's ``MoS2_stem``) had 6 % along two
#: lines (one across the scan lines), where the narrow local fit added sites too close to the found
#: columns, and has 1.8 % since the wider fit places the sites there (``sitelattice.UNCROWD_NN``)
MAX_CROWDED = 0.03
#: rows of the image (in bands of this many spacings) named in the warning: those whose judged sites are
#: crowded at least this often
CROWDED_BAND_NN, CROWDED_BAND_SHARE = 4.0, 0.1


def crowding(xy: np.ndarray, shape: tuple[int, int], *, judged: np.ndarray | None = None,
             backend: str | None = None, mark: np.ndarray | None = None) -> dict:
    """How many sites of a table sit closer to another one than a regular lattice allows.

    A site is *crowded* when its nearest site is closer than :data:`CROWDED_NN` times the typical
    spacing (the median distance of the judged interior sites to their six nearest sites). Counted
    over the *interior* judged sites (at least 2.5 typical spacings from the image edge, where the
    six neighbours are all inside). A regular site table -- also an anisotropic one, also around a
    hole, where neighbours are missing, not close -- has none. Crowding comes from a site lattice
    that is locally compressed or doubled: where the recorded lattice is (a band of scan lines
    recorded off pace), or where the local fits have taken one node row too many (a disturbed region:
    contamination, scan glitches, a line defect -- the added sites then crowd the found columns), or
    from two sites for one column.

    Parameters
    ----------
    xy : float [N, 2] site positions (x, y), px.
    shape : (H, W) of the image.
    judged : bool [N], optional: the sites to count (e.g. lattice sites off grain boundaries); all
        sites are neighbours either way.
    backend : kernel backend of the neighbour search.
    mark : bool [N], optional: set True (in place) at every judged site that is crowded, near the
        edge too (the ``crowded`` column of :func:`find_sites`).

    Returns
    -------
    dict
        ``fraction`` (crowded share of the interior judged sites), ``n_crowded``, ``n_judged``,
        ``spacing_px`` (the typical spacing), ``rows`` ([[y0, y1], ...]: bands of image rows, about
        :data:`CROWDED_BAND_NN` spacings high, where at least :data:`CROWDED_BAND_SHARE` of the judged
        sites are crowded), ``in_rows`` (the share of the crowded sites in them; the warning names the
        rows when they hold at least half of them in less than half of the image), ``regions`` (the
        clusters of crowded sites, largest first, :func:`_crowded_regions`: ``n``, ``x`` and ``y``
        extents, ``aspect``, ``angle_deg`` of the long axis against the scan lines; the warning names
        the largest when they hold at least half of the crowded sites, as lines where elongated: a line
        along the scan lines points at the scan, one across them at the film) and, above
        :data:`MAX_CROWDED`, ``warning`` (a sentence for the summary).

    Examples
    --------
    >>> g = np.array([(i + 0.5 * (j % 2), j * np.sqrt(3) / 2) for i in range(30) for j in range(34)]) * 10.0
    >>> crowding(g, (300, 300))["fraction"]
    0.0
    >>> c = crowding(np.r_[g, g[::25] + 2.0], (300, 300))  # a second site next to every 25th: both crowded
    >>> round(c["fraction"], 3), "warning" in c
    (0.115, True)
    """
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    judged = np.ones(len(xy), bool) if judged is None else np.asarray(judged, bool)
    out = {"fraction": 0.0, "n_crowded": 0, "n_judged": 0, "spacing_px": float("nan"), "rows": [], "regions": []}
    if len(xy) < 8 or judged.sum() < 8:
        return out
    nb = nearest_indices(xy, 7, xy[judged], backend=backend)[:, 1:]
    d = np.hypot(*(xy[nb] - xy[judged][:, None, :]).transpose(2, 0, 1))
    spacing = float(np.median(d))
    close = d[:, 0] < CROWDED_NN * spacing
    if mark is not None:
        mark[np.flatnonzero(judged)[close]] = True
    inner = border_distance(xy[judged], shape) >= 2.5 * spacing
    if inner.sum() < 8:
        return out
    crowded = close[inner]
    y = xy[judged][inner, 1]
    frac = float(crowded.mean())
    out.update(fraction=round(frac, 4), n_crowded=int(crowded.sum()), n_judged=int(inner.sum()),
               spacing_px=round(spacing, 4))
    if crowded.any():
        band = CROWDED_BAND_NN * spacing
        b = np.floor(y / band).astype(np.int64)
        share = np.bincount(b, crowded) / np.maximum(np.bincount(b), 1)
        rows = []
        for k in np.flatnonzero(share >= CROWDED_BAND_SHARE):
            y0, y1 = int(k * band), int(min((k + 1) * band, shape[0]) - 1)
            if rows and y0 <= rows[-1][1] + 1:
                rows[-1][1] = y1
            else:
                rows.append([y0, y1])
        out["rows"] = rows
        inside = np.zeros(len(y), bool)
        for y0, y1 in rows:
            inside |= (y >= y0) & (y <= y1 + 1)
        out["in_rows"] = round(float(inside[crowded].mean()), 4)  # share of the crowded sites in those rows
        out["regions"] = _crowded_regions(xy[judged][close], spacing, backend)  # (edge sites too)
    if frac > MAX_CROWDED:
        # the rows named where they hold most of it in less than half the image (disturbed scan lines run
        # along the rows), and the regions (a line across the scan lines is a feature of the film)
        covered = sum(b - a + 1 for a, b in out["rows"])
        parts = []
        if out["rows"] and out["in_rows"] >= 0.5 and covered < 0.5 * shape[0]:
            parts.append("mostly rows " + ", ".join(f"{a}-{b}" for a, b in out["rows"]))
        regions = out["regions"]
        if regions and sum(r["n"] for r in regions) >= 0.5 * int(close.sum()):
            parts.append("; ".join(_describe_region(r) for r in regions[:CROWDED_REGIONS_NAMED]))
        where = " (" + "; ".join(parts) + ")" if parts else ""
        out["warning"] = (f"{100 * frac:.1f}% of the sites have another site closer than {CROWDED_NN:g} spacings"
                          f"{where}: the site lattice is locally compressed or doubled there (a disturbed region: "
                          "scan glitches, contamination, a line defect), so sites, sublattices, classes and scores "
                          "there are not sure -- check the class overlay")
    return out


#: crowded sites within this many spacings of each other form one region; a region of at least
#: ``CROWDED_REGION_MIN`` sites (and of a tenth of the crowded ones) is listed, the largest
#: ``CROWDED_REGIONS_NAMED`` in the warning; a region this many times longer than wide is a line
CROWDED_REGION_NN, CROWDED_REGION_MIN, CROWDED_REGIONS_NAMED, CROWDED_LINE_ASPECT = 2.0, 5, 3, 3.0


def _crowded_regions(xy: np.ndarray, spacing: float, backend: str | None = None) -> list[dict]:
    """The clusters of crowded sites ``xy`` (linked within :data:`CROWDED_REGION_NN` spacings), largest
    first: ``n``, ``x`` and ``y`` extents (px), ``aspect`` (long over short axis of the cluster) and
    ``angle_deg`` (its long axis against the scan lines, i.e. the image rows: 0 along them, 90 across)."""
    if len(xy) < CROWDED_REGION_MIN:
        return []
    _, lab = linked_clusters(xy, CROWDED_REGION_NN * spacing, backend=backend)
    counts = np.bincount(lab)
    out = []
    for k in np.argsort(-counts, kind="stable"):
        if counts[k] < max(CROWDED_REGION_MIN, 0.1 * len(xy)):
            break
        q = xy[lab == k]
        ev, evec = np.linalg.eigh(np.cov(q.T, bias=True))
        long_axis = evec[:, 1]
        angle = float(np.degrees(np.arctan2(long_axis[1], long_axis[0])) % 180.0)
        out.append({"n": int(counts[k]), "x": [int(np.floor(q[:, 0].min())), int(np.ceil(q[:, 0].max()))],
                    "y": [int(np.floor(q[:, 1].min())), int(np.ceil(q[:, 1].max()))],
                    "aspect": round(float(np.sqrt(ev[1] / max(ev[0], 1e-12))), 2),
                    "angle_deg": round(min(angle, 180.0 - angle), 1)})
    return out


def _describe_region(r: dict) -> str:
    """``x 131-284, y 83-155, a line 25 deg from the scan lines`` (a line only when elongated)."""
    where = f"x {r['x'][0]}-{r['x'][1]}, y {r['y'][0]}-{r['y'][1]}"
    if r["aspect"] >= CROWDED_LINE_ASPECT:
        where += (", a line along the scan lines" if r["angle_deg"] < 5.0
                  else f", a line {r['angle_deg']:.0f} deg from the scan lines")
    return where
