"""Inversion domains: where two of the site lattice's cosets swap roles.

A 2H monolayer has its metal, chalcogen-pair and hollow sites on one triangular lattice, three
cosets of the metal lattice. The phase map (:mod:`stemfast.phasemap`) follows the lattice across
the image, and the image-wide naming (by brightness: the metal the brightest in HAADF, the hollow
the darkest) holds wherever the crystal has one orientation. Across a mirror-twin /
inversion-domain boundary -- the commonest line defect of CVD-grown MoS2 -- the crystal is turned
by 60 degrees: the coset the phase map follows keeps its place, the other two swap (on MoS2 in
HAADF the metal stays, and the chalcogen pairs sit where the other domain has its hexagon centres).
The image-wide names are then wrong on one side (a chalcogen column called a hollow, a hollow
called a chalcogen), and no lattice check sees it: the three cosets still alternate.

:func:`inversion_domains` reads, around each site, the brightness order of the three image-wide
cosets; where a large, connected part of the image shows two of them the other way round, clearly
and as strongly as the rest of the image shows them the usual way, and each of the two takes the
other's level there (the same material turned, not a coset of mixed columns that reads dim in a
patch), that part is an inversion domain, and its two swapped cosets are named from its own columns.
"""
from __future__ import annotations

import numpy as np

from .lattice import _components, nearest_indices

__all__ = ["inversion_domains", "PAIRS", "DOMAIN_NEIGHBORS", "DOMAIN_MIN_SITES"]

#: sites around each site whose coset medians give the local brightness order (about 6 per coset)
DOMAIN_NEIGHBORS = 18
#: sites around each site whose readings of that order decide its domain (majority)
DOMAIN_VOTERS = 18
#: the pairs of cosets, by image-wide brightness rank (0 the brightest, 2 the darkest: the hollow), a
#: domain can have swapped: across a mirror twin the phase map follows the coset that dominates the
#: first Bragg ring and the other two swap -- the chalcogen and the hollow where it follows the metal
#: (MoS2, WSe2 in HAADF), the metal and the chalcogen where it follows the hollows' frame (a material
#: whose chalcogen pair is the brighter, MoSe2)
PAIRS = ((0, 2), (1, 2), (0, 1))
IDENTITY = len(PAIRS)
OTHER = len(PAIRS) + 1
#: each inverted region (its sites connected through their six nearest) must hold at least this many
#: sites (about 10 per coset for the test of its contrast, :data:`DOMAIN_MIN_Z`)
DOMAIN_MIN_SITES = 30
#: the winning vote must have at least this share of the voters (else the site keeps the image-wide names)
DOMAIN_MIN_VOTE = 0.6
#: in an inverted region the coset of the pair that is the darker image-wide must be the brighter by
#: this many standard errors of the difference of their medians (noise over a faint chalcogen coset
#: gives patches of one vote, not a significant difference) ...
DOMAIN_MIN_Z = 5.0
#: ... and by at least this share of the pair's contrast in the rest of the image (the same material
#: on both sides of a mirror twin)
DOMAIN_MIN_CONTRAST = 0.5
#: a pair with the hollow counts only where, in the rest of the image, the other coset stands out from
#: the hollows by this many per-site spreads: below, a site's ~6 neighbours of each coset do not say
#: reliably which is darker (the real MoS2 scans, faint S2: 2.5-3.4; amorphous or few-count copies: 0.1-0.8)
DOMAIN_MIN_SEPARATION = 1.0
#: a swapped region is the same material turned: its three cosets read, up to one gain and offset (a
#: thicker or contaminated side), what the rest reads on the cosets it holds -- the metal's level on
#: the coset that holds the metal there, the chalcogen's on the chalcogen's. A region that fits that
#: line worse by more than this share of its own swapped contrast (and by more than its medians' noise,
#: :data:`DOMAIN_MISMATCH_Z`) is no domain: one coset of a mixed column population (an alloy, an
#: implanted film: S2, SSe and Se2 columns on one coset) that happens to read dim in a patch swaps the
#: order without any coset taking another's level. Turned synthetic films: 0.00-0.03; the real 001-5's
#: candidate regions (turned upside down, a 256-line crop): 0.05, 0.24; chance patches of an S2 / SSe /
#: Se2 mixture brighter than the metal on average: 0.39-1.26
DOMAIN_MAX_MISMATCH = 0.3
#: ... and by more than this many standard errors of the medians it compares (a small, noisy domain
#: keeps the benefit of the doubt)
DOMAIN_MISMATCH_Z = 3.0
#: the same for the two column cosets (metal and chalcogen pair, neither empty): their order shifts
#: with the detector angle, thickness and contamination -- on the ADF2 WSe2 scans W and Se2 stand 0.9-2.8
#: spreads apart and trade places locally -- so a swap of theirs counts only where they are far apart
#: (a MoSe2-like image, Se2 at 1.4x Mo: 7-10)
DOMAIN_MIN_SEPARATION_COLUMNS = 4.0


def inversion_domains(xy: np.ndarray, sublattice: np.ndarray, value: np.ndarray, *, usable: np.ndarray | None = None,
                      neighbors: int = DOMAIN_NEIGHBORS, voters: int = DOMAIN_VOTERS,
                      min_sites: int = DOMAIN_MIN_SITES,
                      min_vote: float = DOMAIN_MIN_VOTE, backend: str | None = None) -> tuple[np.ndarray, dict]:
    """The inversion domains of a site table: a domain label per site, and what was found.

    Parameters
    ----------
    xy : [N, 2] site positions (px). sublattice : [N] int, the image-wide names (0 metal,
        1 chalcogen, 2 hollow; -1 off the lattice). value : [N] the sites' column intensity.
    usable : [N] bool, sites whose value may vote (default: all on the lattice with a finite value).
    backend : the kernel backend of the neighbour search (``sites.backend``; None: ``STEMFAST_BACKEND``
        or the fastest available).

    Returns
    -------
    (domain [N] int64, info dict)
        ``domain``: 0 where the image-wide brightness order of the cosets holds, ``k >= 1`` in the
        regions that show the ``k - 1``-th pair of :data:`PAIRS` the other way round, -1 off the
        lattice. Each domain is to be named from its own columns (the caller's naming rule, per
        domain: ``find_sites`` ranks the cosets by brightness within each). ``info``: ``n_sites``
        (in domains k >= 1), ``share`` (of the sites on the lattice), ``swapped`` (sites per pair of
        image-wide names seen swapped: ``{"1-2": n}`` where the chalcogen and the hollow swapped).
        Every reported region passes the contrast test as reported (a refined edge that dilutes it
        below the test is not taken).

    Examples
    --------
    >>> import numpy as np
    >>> pq = np.array([(p, q) for p in range(-12, 13) for q in range(-12, 13)], float)
    >>> xy = pq @ np.array([[1.0, 0.0], [0.5, np.sqrt(3) / 2]]) * 10
    >>> sub = ((pq[:, 0] - pq[:, 1]) % 3).astype(int)          # 0 metal, 1 chalcogen, 2 hollow
    >>> val = np.array([3.0, 1.5, 0.0])[sub] + np.random.default_rng(0).normal(0, 0.1, len(sub))
    >>> right = xy[:, 0] > 60
    >>> val[right & (sub == 1)] -= 1.5; val[right & (sub == 2)] += 1.5   # a third of it inverted
    >>> domain, info = inversion_domains(xy, sub, val)
    >>> away = np.abs(xy[:, 0] - 60) > 30                     # the sites off the boundary
    >>> bool((domain[away & right] > 0).all()), bool((domain[away & ~right] == 0).all()), list(info["swapped"])
    (True, True, ['1-2'])
    """
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    sub = np.asarray(sublattice, np.int64)
    v = np.asarray(value, np.float64)
    on = sub >= 0
    use = on & np.isfinite(v) if usable is None else (np.asarray(usable, bool) & on & np.isfinite(v))
    info = {"n_sites": 0, "share": 0.0, "swapped": {}}
    n_on = int(on.sum())
    domain = np.where(on, 0, -1).astype(np.int64)
    if n_on < max(min_sites, neighbors + 1, voters + 1) or use.sum() < neighbors:
        return domain, info
    # work on brightness ranks: 0 the image-wide brightest coset (the metal in HAADF, the chalcogen
    # pair on MoSe2), 2 the darkest (the hollow)
    gmed = np.array([np.median(v[use & (sub == c)]) if np.any(use & (sub == c)) else np.nan for c in range(3)])
    if not np.isfinite(gmed).all():
        return domain, info
    order = np.argsort(-gmed, kind="stable")  # names, brightest first
    rank_of = np.empty(3, np.int64)
    rank_of[order] = np.arange(3)
    rk = np.where(on, rank_of[np.clip(sub, 0, 2)], -1)
    idx = np.flatnonzero(on)
    p = xy[idx]
    # per site, the brightness order of the three image-wide cosets among its neighbours
    j = nearest_indices(p, max(neighbors + 1, voters, 13), backend=backend)
    jn = j[:, :neighbors + 1]
    ok = use[idx][jn]
    vals, cos = v.astype(np.float32)[idx][jn], rk.astype(np.int8)[idx][jn]  # only compared: float32 is enough
    reading = _readings(vals, cos, ok)
    # the majority of the readings around each site (its own included): a pair of cosets swapped
    # (index into PAIRS) or IDENTITY
    jv = j[:, :voters]
    rj = reading[jv]
    votes = np.stack([(rj == k).sum(1) for k in range(len(PAIRS) + 1)], axis=1)
    win = votes.argmax(1)
    dom = np.where(votes.max(1) >= min_vote * voters, win, IDENTITY)
    need = int(min_sites)
    v_on, s_on, u_on = v[idx], rk[idx], use[idx]
    rest = dom == IDENTITY
    first = j[:, 1:7]
    for k, pair in enumerate(PAIRS):
        def holds(region, pair=pair):  # a region of enough sites whose two cosets show the swap
            return region.sum() >= need and _swapped_contrast(v_on, s_on, u_on, region, rest, pair)

        # each connected region on its own: scattered patches of one vote that pass the contrast test
        # only together are noise (on the real 001-5 a dark scan line and a patch 150 px away did)
        parts = _connected(dom == k, first)
        regions = [r for r in parts if holds(r)]
        if not regions:
            if 2 not in pair:  # the column cosets: a swap too close to call is said, not named
                _undecided(info, v_on, s_on, u_on, parts, rest, pair, need, xy[idx], order)
            continue
        free = domain[idx] == 0
        # what is reported passes the test that found it: where the refined edge takes in sites that
        # dilute a region's contrast below the test (a rim without the swap: no contrast at all, or
        # the image-wide order), the region keeps the edge the vote gave it
        m = np.zeros(len(idx), bool)
        for part in _connected(_refined_edge(np.any(regions, axis=0), j, vals, cos, ok, k) & free, first):
            if holds(part):
                m |= part
        for region in regions:
            if not (m & region).any() and holds(region & free):
                m |= region & free
        if not m.any():
            continue
        domain[idx[m]] = k + 1
        a_, b_ = sorted((int(order[pair[0]]), int(order[pair[1]])))  # the names of the two swapped ranks
        info["swapped"][f"{a_}-{b_}"] = int(m.sum())
        info["n_sites"] += int(m.sum())
    info["share"] = round(info["n_sites"] / n_on, 4)
    return domain, info


def _connected(mask: np.ndarray, first: np.ndarray) -> list[np.ndarray]:
    """The connected parts of ``mask`` (bool over the sites), two sites joined where one is among the
    other's nearest (``first`` [M, 6], the indices of each site's six nearest), each a bool mask."""
    sel = np.flatnonzero(mask)
    if not len(sel):
        return []
    pos = np.full(len(mask), -1)
    pos[sel] = np.arange(len(sel))
    nb = first[sel]
    both = mask[nb]
    rows = np.repeat(np.arange(len(sel)), nb.shape[1])[both.ravel()]
    cols = pos[nb[both]]
    n, label = _components(np.c_[rows, cols][np.lexsort((cols, rows))], len(sel))  # the lattice's graph
    out = []
    for c in range(n):
        part = np.zeros(len(mask), bool)
        part[sel[label == c]] = True
        out.append(part)
    return out


#: the edge of a domain is refined site by site from the sites of the first two shells around each
#: (12, the site itself left out: a vacancy must not decide its own domain), at most this many times
EDGE_PASSES = 4


def _refined_edge(m: np.ndarray, j: np.ndarray, vals, cos, ok, k: int) -> np.ndarray:
    """Domain ``m`` (bool over the sites) with its edge moved site by site: a site next to the domain
    (2+ of its 6 nearest in it) whose 12 nearest read the domain's swap ``k`` joins it, a site of the
    domain at its edge (2+ of its 6 nearest out) whose 12 nearest read the image-wide order leaves
    it. The majority vote that found the domain puts its edge up to a few sites off."""
    sel = np.zeros(j.shape[1], bool)
    sel[1:13] = True  # columns of j: the site itself first, then its neighbours nearest first
    near = _readings(vals[:, sel], cos[:, sel], ok[:, sel])
    first = j[:, 1:7]
    for _ in range(EDGE_PASSES):
        inside = m[first].sum(1)
        grow = ~m & (inside >= 2) & (near == k)
        leave = m & (inside <= 4) & (near == IDENTITY)
        if not (grow.any() or leave.any()):
            break
        m = (m | grow) & ~leave
    return m


def _readings(vals: np.ndarray, cos: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Per row (a site's neighbours: values ``vals``, image-wide brightness ranks of their cosets
    ``cos``, usable ``ok``), which pair of ranks the neighbourhood shows swapped (an index into
    :data:`PAIRS`), :data:`IDENTITY` (the image-wide order 0 > 1 > 2), or :data:`OTHER` (a rotation of
    all three, or a rank without a usable neighbour)."""
    med = np.stack([_row_medians(vals, ok & (cos == c)) for c in range(3)], axis=1)
    known = np.isfinite(med).all(axis=1)
    rank = np.argsort(np.argsort(-np.where(known[:, None], med, 0.0), axis=1, kind="stable"), axis=1)
    out = np.full(len(med), OTHER)
    out[known & (rank == np.arange(3)).all(axis=1)] = IDENTITY
    for k, (a, b) in enumerate(PAIRS):
        sw = np.arange(3)
        sw[a], sw[b] = b, a
        out[known & (rank == sw).all(axis=1)] = k
    return out


def _undecided(info: dict, v, sub, use, voted: list, rest, pair, need: int, xy: np.ndarray,
               order: np.ndarray) -> None:
    """Into ``info["undecided"]``: the largest of the connected regions ``voted`` (bool masks) of the
    sites that voted the two column cosets ``pair`` swapped that passes every test of a domain but the
    image-wide separation of the
    two, which is under :data:`DOMAIN_MIN_SEPARATION_COLUMNS` spreads (and over
    :data:`DOMAIN_MIN_SEPARATION`): a mirror twin, or the two trading places with the thickness,
    contamination or the detector angle -- the brightness cannot tell, and the names there stay the
    image-wide ones. ``n_sites`` (all such regions), ``n_largest``, ``pair`` (the names), ``separation``
    (spreads), ``box`` (x0, x1, y0, y1 of the largest region, px, from ``xy`` [M, 2])."""
    parts = [r for r in voted
             if r.sum() >= need and _swapped_contrast(v, sub, use, r, rest, pair, DOMAIN_MIN_SEPARATION)]
    if not parts:
        return
    big = max(parts, key=lambda r: int(r.sum()))
    hi, lo = pair
    ca, cb = v[rest & use & (sub == hi)], v[rest & use & (sub == lo)]
    a_, b_ = sorted((int(order[hi]), int(order[lo])))
    x, y = xy[big, 0], xy[big, 1]
    info["undecided"] = {"n_sites": int(sum(int(r.sum()) for r in parts)), "n_largest": int(big.sum()),
                         "pair": f"{a_}-{b_}",
                         "separation": round(float((np.median(ca) - np.median(cb)) / _spread(ca, cb)), 2),
                         "box": [round(float(q), 1) for q in (x.min(), x.max(), y.min(), y.max())]}


def _swapped_contrast(v, sub, use, region, rest, pair,
                      columns_separation: float = DOMAIN_MIN_SEPARATION_COLUMNS) -> bool:
    """True when ``region`` is a domain with the cosets of ``pair`` (brightness ranks, ``sub``) swapped:
    in ``rest`` (the image-wide order holds) the brighter of the two stands out from the other by
    :data:`DOMAIN_MIN_SEPARATION` per-site spreads (:data:`DOMAIN_MIN_SEPARATION_COLUMNS` for the two
    column cosets, or ``columns_separation``), and within ``region`` the one named darker is the
    brighter by :data:`DOMAIN_MIN_Z` standard errors of the difference of their medians and by
    :data:`DOMAIN_MIN_CONTRAST` of that contrast in ``rest``; and the region reads the rest's levels
    on the cosets it holds (:func:`_same_material`)."""
    hi, lo = pair  # the first of a pair is the brighter image-wide
    a, b = v[region & use & (sub == hi)], v[region & use & (sub == lo)]
    ca, cb = v[rest & use & (sub == hi)], v[rest & use & (sub == lo)]
    if min(len(a), len(b), len(ca), len(cb)) < 5:
        return False
    mca, mcb = np.median(ca), np.median(cb)
    contrast = mca - mcb
    separation = DOMAIN_MIN_SEPARATION if 2 in pair else columns_separation
    if not contrast > separation * _spread(ca, cb):
        return False
    ma, mb = np.median(a), np.median(b)
    s_ab = 1.2533 * _spread(a, b)  # the standard error of a median of one site, both cosets pooled
    se = s_ab * np.sqrt(1.0 / len(a) + 1.0 / len(b))
    if not (mb - ma > DOMAIN_MIN_Z * se and mb - ma >= DOMAIN_MIN_CONTRAST * contrast):
        return False
    u = 3 - hi - lo  # the coset the swap leaves in place
    c, cu = v[region & use & (sub == u)], v[rest & use & (sub == u)]
    if min(len(c), len(cu)) < 5:
        return True  # nothing to read the levels against
    return _same_material((mca, mcb, np.median(cu)), (mb, ma, np.median(c)),
                          s_ab * np.sqrt(1.0 / len(a) + 1.0 / len(b) + 1.0 / len(c)))


def _same_material(rest: tuple, region: tuple, se: float) -> bool:
    """Whether a region's coset levels ``region`` (medians of the cosets that hold, there, what the rest
    holds on its cosets ``rest``: the pair's brighter, its darker, the third) are the rest's up to a
    gain and an offset: their least-squares line through the three leaves no level off by more than
    :data:`DOMAIN_MAX_MISMATCH` of the region's swapped contrast and :data:`DOMAIN_MISMATCH_Z` times
    ``se`` (the standard error of the region's medians).

    Examples
    --------
    >>> _same_material((3.0, 1.5, 0.0), (2.2, 1.1, 0.1), 0.05)   # darker and fainter, same levels
    True
    >>> _same_material((3.0, 1.5, 0.0), (2.2, 0.2, 0.1), 0.05)   # the dim coset fell to the hollow
    False
    """
    x, y = np.asarray(rest, np.float64), np.asarray(region, np.float64)
    a = np.c_[x, np.ones(3)]
    (gain, offset), *_ = np.linalg.lstsq(a, y, rcond=None)
    if not gain > 0:
        return False
    off = float(np.abs(y - a @ (gain, offset)).max())
    return bool(off <= max(DOMAIN_MAX_MISMATCH * gain * (x[0] - x[1]), DOMAIN_MISMATCH_Z * se))


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
