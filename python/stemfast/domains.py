"""Inversion domains: where the site lattice's two non-metal cosets swap roles.

A 2H monolayer has its metal, chalcogen-pair and hollow sites on one triangular lattice, three
cosets of the metal lattice. The phase map (:mod:`stemfast.sitelattice`) follows the metal lattice
across the image, and the image-wide naming (brightest coset = metal, next = chalcogen, darkest =
hollow) holds wherever the crystal has one orientation. Across a mirror-twin / inversion-domain
boundary -- the commonest line defect of CVD-grown MoS2 -- the crystal is turned by 60 degrees
about its metal columns: the metal coset stays, but the chalcogen pairs sit where the other domain
has its hexagon centres and the other way round. The image-wide names are then wrong on one side
(a chalcogen column called a hollow, a hollow called a chalcogen), and no lattice check sees it:
the three cosets still alternate.

The hollow is the one coset that is empty, the darkest around every site whatever the detector.
:func:`inversion_domains` reads, around each site, which image-wide coset is the darkest; where a
large, connected part of the image has a coset other than the hollow darkest, that part is an
inversion domain, and its two swapped cosets are named from its own columns.
"""
from __future__ import annotations

import numpy as np

from .lattice import nearest_indices

__all__ = ["inversion_domains", "DOMAIN_NEIGHBORS", "DOMAIN_MIN_SITES"]

#: sites around each site whose coset medians say which coset is locally the darkest (about 6 per coset)
DOMAIN_NEIGHBORS = 18
#: sites around each site whose "darkest coset" votes decide its domain (majority)
DOMAIN_VOTERS = 18
#: inverted regions must hold at least this many sites together (about 10 per coset for the test of
#: their contrast, :data:`DOMAIN_MIN_Z`)
DOMAIN_MIN_SITES = 30
#: the winning vote must have at least this share of the voters (else the site keeps the image-wide names)
DOMAIN_MIN_VOTE = 0.6
#: in an inverted region the coset named hollow image-wide must be brighter than the one it swaps with
#: by this many standard errors of the difference of their medians (noise over a faint chalcogen
#: coset gives patches of one vote, not a significant difference) ...
DOMAIN_MIN_Z = 5.0
#: ... and by at least this share of the chalcogen-over-hollow contrast of the rest of the image (the
#: same material on both sides of a mirror twin)
DOMAIN_MIN_CONTRAST = 0.5
#: domains are looked for only where, in the rest of the image, the coset in question stands out from
#: the hollows by this many per-site spreads: below, a site's ~6 neighbours of each coset do not say
#: reliably which is darker (the real MoS2 scans, faint S2: 2.5-3.4; amorphous or few-count copies: 0.1-0.8)
DOMAIN_MIN_SEPARATION = 1.0


def inversion_domains(xy: np.ndarray, sublattice: np.ndarray, value: np.ndarray, *, usable: np.ndarray | None = None,
                      neighbors: int = DOMAIN_NEIGHBORS, voters: int = DOMAIN_VOTERS,
                      min_sites: int = DOMAIN_MIN_SITES,
                      min_vote: float = DOMAIN_MIN_VOTE) -> tuple[np.ndarray, np.ndarray, dict]:
    """Sublattice names corrected in inversion domains, the sites of the domains, and what was found.

    Parameters
    ----------
    xy : [N, 2] site positions (px). sublattice : [N] int, the image-wide names (0 metal,
        1 chalcogen, 2 hollow; -1 off the lattice). value : [N] the sites' column intensity.
    usable : [N] bool, sites whose value may vote (default: all on the lattice with a finite value).

    Returns
    -------
    (sublattice [N] int64, inverted [N] bool, info dict)
        Within each inverted region the coset that is darkest there and the hollow swap names;
        ``inverted``: the sites of those regions (all three cosets). ``info``: ``n_sites`` (in
        inverted regions), ``share`` (of the sites on the lattice), ``swapped`` (sites per image-wide
        coset that is the hollow there: ``{"1": n}`` where the chalcogen and hollow swapped).

    Examples
    --------
    >>> import numpy as np
    >>> pq = np.array([(p, q) for p in range(-12, 13) for q in range(-12, 13)], float)
    >>> xy = pq @ np.array([[1.0, 0.0], [0.5, np.sqrt(3) / 2]]) * 10
    >>> sub = ((pq[:, 0] - pq[:, 1]) % 3).astype(int)          # 0 metal, 1 chalcogen, 2 hollow
    >>> val = np.array([3.0, 1.5, 0.0])[sub] + np.random.default_rng(0).normal(0, 0.1, len(sub))
    >>> right = xy[:, 0] > 0
    >>> val[right & (sub == 1)] -= 1.5; val[right & (sub == 2)] += 1.5   # the right half inverted
    >>> fixed, inverted, info = inversion_domains(xy, sub, val)
    >>> away = np.abs(xy[:, 0]) > 30                          # the sites off the boundary
    >>> bool((fixed[away & right & (sub == 1)] == 2).all()), bool((fixed[away & ~right] == sub[away & ~right]).all())
    (True, True)
    >>> bool(inverted[away & right].all()), bool(inverted[away & ~right].any())
    (True, False)
    """
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    sub = np.asarray(sublattice, np.int64)
    v = np.asarray(value, np.float64)
    on = sub >= 0
    use = on & np.isfinite(v) if usable is None else (np.asarray(usable, bool) & on & np.isfinite(v))
    info = {"n_sites": 0, "share": 0.0, "swapped": {}}
    n_on = int(on.sum())
    inverted = np.zeros(len(sub), bool)
    if n_on < max(min_sites, neighbors + 1, voters + 1) or use.sum() < neighbors:
        return sub.copy(), inverted, info
    idx = np.flatnonzero(on)
    p = xy[idx]
    # per site, the image-wide coset whose median value is the lowest among its neighbours
    j = nearest_indices(p, max(neighbors + 1, voters, 13))
    jn = j[:, :neighbors + 1]
    ok = use[idx][jn]
    vals, cos = v.astype(np.float32)[idx][jn], sub.astype(np.int8)[idx][jn]  # only compared: float32 is enough
    med = np.stack([_row_medians(vals, ok & (cos == c)) for c in range(3)], axis=1)
    known = np.isfinite(med).all(axis=1)
    darkest = np.where(known, np.argmin(np.where(np.isfinite(med), med, np.inf), axis=1), -1)
    # the majority of the darkest-coset readings around each site (its own included)
    jv = j[:, :voters]
    votes = np.stack([(darkest[jv] == c).sum(1) for c in range(3)], axis=1)
    win = votes.argmax(1)
    clear = votes.max(1) >= min_vote * voters
    dom = np.where(clear, win, 2)  # 2: the hollow is the darkest, the image-wide names hold
    out = sub.copy()
    need = int(min_sites)
    v_on, s_on, u_on = v[idx], sub[idx], use[idx]
    rest = dom == 2
    for c in (0, 1):
        m = dom == c
        if m.sum() < need or not _swapped_contrast(v_on, s_on, u_on, m, rest, c):
            continue
        m = _refined_edge(m, j, vals, cos, ok, c)
        s = sub[idx[m]]
        renamed = np.where(s == c, 2, np.where(s == 2, c, s))
        out[idx[m]] = renamed
        inverted[idx[m]] = True
        info["swapped"][str(c)] = int(m.sum())
        info["n_sites"] += int(m.sum())
    info["share"] = round(info["n_sites"] / n_on, 4)
    return out, inverted, info


#: the edge of a domain is refined site by site from the sites of the first two shells around each
#: (12, the site itself left out: a vacancy must not decide its own domain), at most this many times
EDGE_PASSES = 4


def _refined_edge(m: np.ndarray, j: np.ndarray, vals, cos, ok, c: int) -> np.ndarray:
    """Domain ``m`` (bool over the sites) with its edge moved site by site: a site next to the domain
    (2+ of its 6 nearest in it) whose 12 nearest read coset ``c`` as the darkest joins it, a site of
    the domain at its edge (2+ of its 6 nearest out) whose 12 nearest read the hollow as the darkest
    leaves it. The majority vote that found the domain puts its edge up to a few sites off."""
    sel = np.zeros(j.shape[1], bool)
    sel[1:13] = True  # columns of j: the site itself first, then its neighbours nearest first
    med = np.stack([_row_medians(vals[:, sel], ok[:, sel] & (cos[:, sel] == k)) for k in range(3)], axis=1)
    known = np.isfinite(med).all(axis=1)
    near = np.where(known, np.argmin(np.where(np.isfinite(med), med, np.inf), axis=1), -1)
    first = j[:, 1:7]
    for _ in range(EDGE_PASSES):
        inside = m[first].sum(1)
        grow = ~m & (inside >= 2) & (near == c)
        leave = m & (inside <= 4) & (near == 2)
        if not (grow.any() or leave.any()):
            break
        m = (m | grow) & ~leave
    return m


def _swapped_contrast(v, sub, use, region, rest, c) -> bool:
    """True when ``region`` is an inversion domain of kind ``c``: in ``rest`` (the image-wide names
    hold) coset ``c`` stands out from the hollows by :data:`DOMAIN_MIN_SEPARATION` per-site spreads,
    and within ``region`` the coset named hollow image-wide is brighter than coset ``c`` by
    :data:`DOMAIN_MIN_Z` standard errors of the difference of their medians and by
    :data:`DOMAIN_MIN_CONTRAST` of that contrast in ``rest``."""
    a, b = v[region & use & (sub == c)], v[region & use & (sub == 2)]
    ca, cb = v[rest & use & (sub == c)], v[rest & use & (sub == 2)]
    if min(len(a), len(b), len(ca), len(cb)) < 5:
        return False
    contrast = np.median(ca) - np.median(cb)
    if not contrast > DOMAIN_MIN_SEPARATION * _spread(ca, cb):
        return False
    ma, mb = np.median(a), np.median(b)
    se = 1.2533 * _spread(a, b) * np.sqrt(1.0 / len(a) + 1.0 / len(b))
    return bool(mb - ma > DOMAIN_MIN_Z * se and mb - ma >= DOMAIN_MIN_CONTRAST * contrast)


def _spread(a: np.ndarray, b: np.ndarray) -> float:
    """Robust standard deviation of two samples about their own medians, pooled."""
    return float(1.4826 * np.median(np.abs(np.r_[a - np.median(a), b - np.median(b)])))


def _row_medians(vals: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per row of ``vals`` [M, K], the median of the entries where ``mask``; NaN where none (one sort
    of the rows with the other entries at +inf, instead of ``np.nanmedian``'s per-row work)."""
    x = np.sort(np.where(mask, vals, np.inf), axis=1)
    n = mask.sum(1)
    r = np.arange(len(x))
    lo, hi = np.maximum(n - 1, 0) // 2, n // 2
    out = 0.5 * (x[r, lo] + x[r, np.minimum(hi, x.shape[1] - 1)])
    return np.where(n > 0, out, np.nan)
