"""Scan lines that are off: streaks and row jumps of a raster-scanned micrograph, found with the lattice.

A STEM image is scanned line by line (x fast, y slow). A glitch of the beam current, the detector or
the scan offsets or scales whole lines (rows) at once, and a column on such a line looks brighter
or darker than its sublattice although nothing is there -- a false defect. The lattice tells such a
line from the sample: moving the image by a lattice vector ``t`` of one sublattice maps every column
onto an equal column, so along a sound line the difference ``I(x, y) - I(x + t_x, y + t_y)`` is
noise plus the rare defects, and its median over the line is ~0; along a line that is off by ``a(y)``
it is ``a(y) - a(y + t_y)``. With three short same-sublattice translations, each with both signs, whose
six lines ``y + t_y`` are all different and at least :data:`LINE_SEPARATION` lines from ``y`` and
from one another (a streak is a few lines, so at most one of the six is on it), the median of the six
per-line medians is ``a(y)`` (:func:`scan_line_offsets`). The three shortest translations serve
where they qualify; where the lattice's rows run along the scan lines -- the microscopist aligned
them, as on 9 of 10 real scans at hand -- one of them lies along the line (it would compare the line
with itself) and the other two land on the same two lines, so longer ones take their place
(:func:`comparison_translations`). The lattice cancels whatever its
orientation -- also when its rows run along the scan lines, where a plain row median would follow
the atom rows -- and contamination and gradients, smooth over one lattice vector, cancel as well.

Lines whose offset stands out from the others by more than ``threshold`` robust standard
deviations are *flagged*. A glitch that lasts part of a line offsets only that part: the same
differences, their median taken over blocks along the line and judged against the lines a few
lines above and below (which contamination and gradients cover too), find such *segments*
(:func:`_line_segments`); a flagged line that is off only in parts gets its parts instead. Their offset is taken out of the image before the column intensities
are read (:func:`stemfast.find_sites`, ``column_intensity``); what a gain (not an offset) did to
the columns on them is taken out in the defect scores (:mod:`stemfast.analysis`), per site.

A *row jump* moves lines sideways instead: the scan's x position slipped between two lines, and the
lines after it (a band, or the rest of the frame) are recorded shifted by a pixel or more. Two
neighbouring lines of a sound scan see the same columns (a column is wider than a line), so their
profiles along x agree at zero shift (or at the scan's steady shear); across a jump they agree at
the jump (:func:`scan_line_jumps`: the peak of the cross-correlation of each pair of neighbouring
lines, sub-pixel, within :data:`JUMP_MAX_LAG`, or, with the lattice known, within
:data:`JUMP_MAX_PERIOD_SHARE` of its period along the lines, :func:`jump_search_lag`), confirmed
against the lattice (:func:`_confirmed_by_lattice`; a band narrower than a lattice translation's
rows -- a glitch of a few lines at coarse sampling -- by its own lines against their lattice images
above and below it, :func:`_narrow_bands`) and kept in bands (a jump and the jump back); a band
shifted beyond :func:`jump_reach`, where it cannot be told from one shifted the other way, is not
kept (``declined``). The columns cut by a jump would read as a vacancy and its
neighbour; the bands are undone before the lattice is found (:meth:`ScanJumps.undo`) and the sites' positions are
reported where the recorded image has them (:meth:`ScanJumps.recorded_x`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import fft as sfft

from .spikes import despiked

__all__ = ["ScanLines", "ScanJumps", "scan_line_offsets", "scan_line_jumps", "confirm_jumps", "lattice_line_bands",
           "line_period", "jump_reach", "jump_search_lag",
           "needs_lattice_lines", "same_sublattice_vectors", "comparison_translations",
           "line_offsets", "recorded_shift", "lattice_positions", "levelled_image", "dead_runs",
           "filled_dead_runs"]

#: a scan line is flagged when its offset is this many robust standard deviations from the others
DEFAULT_THRESHOLD = 5.0


@dataclass(frozen=True)
class ScanLines:
    """Output of :func:`scan_line_offsets`.

    Attributes
    ----------
    offset : float64 [H], the additive offset of every scan line (image units; NaN where no
        lattice vector stays inside the image).
    flagged : bool [H], lines whose offset stands out (streaks, row jumps).
    noise : robust standard deviation of ``offset`` over all lines.
    segments : float64 [K, 4], parts of lines that are off once the flagged lines are levelled (a
        streak that lasted part of a line): ``row, x0, x1, offset`` (columns ``x0 <= x < x1``).
    """

    offset: np.ndarray
    flagged: np.ndarray
    noise: float
    segments: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)), compare=False)

    @property
    def rows(self) -> np.ndarray:
        """Indices of the flagged lines."""
        return np.flatnonzero(self.flagged)

    @property
    def any(self) -> bool:
        """Whether a line or a part of one is off."""
        return bool(self.flagged.any() or len(self.segments))

    def correction(self) -> np.ndarray:
        """Per line, what to subtract from the image: the offset on flagged lines, 0 elsewhere (the
        :attr:`segments` not included: :meth:`level` takes out both)."""
        return np.where(self.flagged, np.nan_to_num(self.offset), 0.0)

    def level(self, image: np.ndarray) -> np.ndarray:
        """``image`` with the flagged lines' offsets and the :attr:`segments`' taken out (a copy, of
        ``image``'s dtype); ``image`` itself when nothing is off."""
        if not self.any:
            return image
        rows = self.rows
        return _levelled(image, rows, self.offset[rows], self.segments)

    def near(self, xy: np.ndarray, reach: float) -> np.ndarray:
        """bool [N]: the points ``xy`` [N, 2] (x, y) within ``reach`` px of a flagged line or of a
        segment (its columns widened by ``reach``)."""
        xy = np.asarray(xy, np.float64).reshape(-1, 2)
        out = np.zeros(len(xy), bool)
        rows = self.rows
        if len(rows):
            k = np.searchsorted(rows, xy[:, 1])
            out |= np.abs(xy[:, 1] - rows[np.clip(k - 1, 0, len(rows) - 1)]) <= reach
            out |= np.abs(xy[:, 1] - rows[np.clip(k, 0, len(rows) - 1)]) <= reach
        for row, x0, x1, _ in self.segments:
            out |= ((np.abs(xy[:, 1] - row) <= reach) & (xy[:, 0] >= x0 - reach) & (xy[:, 0] <= x1 - 1 + reach))
        return out


def same_sublattice_vectors(a1: np.ndarray, a2: np.ndarray) -> np.ndarray:
    """The three shortest translations that map a sublattice of a 2H site lattice onto itself
    (``a1 + a2``, ``2 a1 - a2``, ``a1 - 2 a2``; length ``sqrt(3)`` site spacings) from the site
    lattice's basis ``a1, a2`` (sites ``m a1 + n a2`` have colour ``(m - n) mod 3``) [3, 2].

    Examples
    --------
    >>> same_sublattice_vectors(np.array([1.0, 0.0]), np.array([0.5, np.sqrt(3) / 2])).round(3)
    array([[ 1.5  ,  0.866],
           [ 1.5  , -0.866],
           [ 0.   , -1.732]])
    """
    a1 = np.asarray(a1, np.float64)
    a2 = np.asarray(a2, np.float64)
    return np.array([a1 + a2, 2 * a1 - a2, a1 - 2 * a2])


def scan_line_offsets(image, vectors, *, threshold: float = DEFAULT_THRESHOLD) -> ScanLines:
    """The offset of every scan line (image row), measured against the lattice (module docs).

    Parameters
    ----------
    image : (H, W) array, the raw micrograph; NaN marks pixels without data (an aligned frame's
        padding, :mod:`stemfast.nodata`), which the lines' medians leave out (a line with less than
        :data:`MIN_LINE_DATA` of its samples left has no offset: NaN).
    vectors : float [K, 2] lattice translations (x, y) in px that map the lattice onto itself
        (:func:`same_sublattice_vectors`); each is used with both signs, or, where they would compare
        a line with itself or two of them with one line, as many combinations of them that do not
        (:func:`comparison_translations`).
    threshold : flag lines whose offset is more than this many robust standard deviations from
        the median line's.

    Returns
    -------
    ScanLines
        With ``segments``: the parts of lines that are off (streaks over part of a line, at least
        :data:`SEGMENT_MIN_T` lattice translations long).

    Examples
    --------
    >>> yy, xx = np.mgrid[0:96, 0:96].astype(float)
    >>> img = 10 + 5 * np.cos(2 * np.pi * xx / 8) * np.cos(2 * np.pi * yy / 8)
    >>> img += np.random.default_rng(0).normal(0, 0.5, img.shape)  # noise
    >>> img[40:42] += 3.0  # a streak of two lines
    >>> lines = scan_line_offsets(img, [[8.0, 8.0], [8.0, -8.0], [0.0, 16.0]])
    >>> lines.rows.tolist(), np.round(lines.offset[40:42]).tolist()
    ([40, 41], [3.0, 3.0])
    """
    img = np.asarray(image)
    if img.ndim != 2 or min(img.shape) < 2:
        raise ValueError(f"image must be 2-D, got shape {img.shape}")
    vec = np.asarray(vectors, np.float64)
    if vec.ndim != 2 or vec.shape[1] != 2 or len(vec) == 0 or not np.isfinite(vec).all():
        raise ValueError(f"vectors must be a finite [K, 2] array, got shape {vec.shape}")
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    return _scan_line_offsets(img.astype(np.float32, copy=False), comparison_translations(vec), float(threshold))


#: the lines a line is compared with lie at least this many lines from it and from one another: a
#: streak up to this wide is never read against itself, and a line near it meets it in at most one of
#: its six comparisons
LINE_SEPARATION = 3.0
#: combinations ``m u + n v`` of two given translations with ``|m|, |n|`` up to this are the candidates
MAX_COMBINATION = 3


def comparison_translations(vectors, separation: float = LINE_SEPARATION) -> np.ndarray:
    """Up to as many lattice translations as ``vectors`` [K, 2] (x, y), the shortest whose rows ``|t_y|``
    are each at least ``separation`` from 0 and from one another's: used with both signs, the lines a
    line is compared with are then all different and none is the line or next to it.

    The given translations are kept where they qualify (the usual case: the same rows as without this
    step); in their place come the shortest integer combinations of two of them (coefficients up to
    :data:`MAX_COMBINATION`). Where fewer than K qualify, those that do (at least two; else the given
    ones, unchanged).

    Examples
    --------
    A site lattice with a row along the scan lines (a1 along x): the three shortest same-sublattice
    translations have rows 4.33, -4.33 and -8.66 -- two land on the same lines, so a longer one
    (rows 12.99) takes the place of the second.

    >>> a1, a2 = np.array([5.0, 0.0]), 5.0 * np.array([0.5, np.sqrt(3) / 2])
    >>> comparison_translations(same_sublattice_vectors(a1, a2)).round(2)
    array([[  7.5 ,   4.33],
           [  0.  ,  -8.66],
           [ -7.5 , -12.99]])
    """
    vec = np.asarray(vectors, np.float64).reshape(-1, 2)
    if _distinct_rows(vec, separation):
        return vec
    r = np.arange(-MAX_COMBINATION, MAX_COMBINATION + 1)
    mn = np.array([(m, n) for m in r for n in r if (m, n) != (0, 0)], np.float64)
    cand = [vec] + [mn @ vec[[i, j]] for i in range(len(vec)) for j in range(i + 1, len(vec))]
    cand = np.concatenate(cand)
    cand = cand[np.argsort(np.hypot(cand[:, 0], cand[:, 1]), kind="stable")]  # the given ones first on ties
    chosen: list[np.ndarray] = []
    for t in cand:
        if _distinct_rows(np.array(chosen + [t]), separation):
            chosen.append(t)
            if len(chosen) == len(vec):
                break
    return np.array(chosen) if len(chosen) >= 2 else vec


def _distinct_rows(vec: np.ndarray, separation: float) -> bool:
    """True when every ``|t_y|`` of ``vec`` [K, 2] is at least ``separation`` from 0 and from every other."""
    ty = np.sort(np.abs(vec[:, 1]))
    return bool(ty[0] >= separation and np.all(np.diff(ty) >= separation))


#: per line, the median is taken over about this many pixels (every k-th column): its noise is then
#: ~1/16 of a pixel's, far below any offset worth flagging, at a quarter of the cost on a 1024 px line
LINE_SAMPLES = 256
#: least share of a line's samples that must hold data (not NaN) for the line to get an offset
MIN_LINE_DATA = 0.25


def _shifted_row_medians(img: np.ndarray, tx: float, ty: float) -> np.ndarray:
    """Per row ``y``, the median over x (every k-th column, :data:`LINE_SAMPLES` of them) of
    ``I(x, y) - I(x + tx, y + ty)`` (bilinear), NaN where the shifted row leaves the image."""
    return _shifted_row_differences(img, tx, ty)[0]


def _shifted_row_differences(img: np.ndarray, tx: float, ty: float):
    """:func:`_shifted_row_medians` and what they were taken over: ``(medians [H], diff, y0, x0, k)``,
    ``diff[y - y0, j]`` the difference at row ``y``, column ``x0 + k j`` (None where nothing is inside)."""
    H, W = img.shape
    out = np.full(H, np.nan)
    ix, iy = int(np.floor(tx)), int(np.floor(ty))
    fx, fy = tx - ix, ty - iy
    # rows y with y + iy and y + iy + 1 inside; columns x with x + ix and x + ix + 1 inside
    y0, y1 = max(0, -iy), min(H, H - iy - 1)
    x0, x1 = max(0, -ix), min(W, W - ix - 1)
    if y1 <= y0 or x1 - x0 < 8:
        return out, None, y0, x0, 1
    k = max(1, (x1 - x0) // LINE_SAMPLES)
    # the shifted rows interpolated along x once, each used twice: as the upper and as the lower of
    # the two rows interpolated along y (the products and sums of the bilinear formula, bit for bit)
    rows = slice(y0 + iy, y1 + iy + 1)
    along = (1 - fx) * img[rows, x0 + ix:x1 + ix:k] + fx * img[rows, x0 + ix + 1:x1 + ix + 1:k]
    diff = img[y0:y1, x0:x1:k] - ((1 - fy) * along[:-1] + fy * along[1:])
    gap = np.isnan(diff)
    if gap.any():  # pixels without data: the medians of the rest, where enough is left
        n_ok = diff.shape[1] - gap.sum(1)
        med = np.full(len(diff), np.nan)
        enough = n_ok >= MIN_LINE_DATA * diff.shape[1]
        med[enough] = np.nanmedian(diff[enough], axis=1)
        out[y0:y1] = med
    else:
        out[y0:y1] = np.median(diff, axis=1)
    return out, diff, y0, x0, k


def _scan_line_offsets(img: np.ndarray, vec: np.ndarray, threshold: float) -> ScanLines:
    shifts = [(s * tx, s * ty) for tx, ty in vec for s in (1.0, -1.0)]
    diffs = [_shifted_row_differences(img, tx, ty) for tx, ty in shifts]
    meds = np.array([d[0] for d in diffs])
    offset = _nanmedian0(meds)  # the median of the six comparisons that stay inside the image
    good = np.isfinite(offset)
    if good.sum() < 8:
        return ScanLines(offset, np.zeros(len(offset), bool), float("nan"))
    centre = float(np.median(offset[good]))
    noise = float(1.4826 * np.median(np.abs(offset[good] - centre)))
    flagged = good & (np.abs(offset - centre) > threshold * noise) if noise > 0 else np.zeros(len(offset), bool)
    return _line_segments(img, ScanLines(offset, flagged, noise), shifts, diffs,
                          float(np.min(np.hypot(vec[:, 0], vec[:, 1]))), threshold)


#: parts of lines (:func:`_line_segments`) are measured in blocks of about this many lattice translations
#: along the line (at least :data:`SEGMENT_MIN_SAMPLES` of a line's samples)
SEGMENT_BLOCK_T = 0.6
SEGMENT_MIN_SAMPLES = 3
#: a part of a line is off when it is at least this many lattice translations long (~5 site spacings:
#: a missing column, or two, is shorter) and at least :data:`SEGMENT_MIN_BLOCKS` blocks
SEGMENT_MIN_T = 3.0
SEGMENT_MIN_BLOCKS = 2
#: a block is judged against the same blocks of the lines this many lines above and below it
#: (contamination, a thickness step or a gradient covers them too; a streak of up to a few lines does not)
SEGMENT_CONTEXT_LINES = (3, 4, 5, 6)


def _line_segments(img: np.ndarray, lines: ScanLines, shifts: list, diffs: list, t_len: float,
                   threshold: float) -> ScanLines:
    """``lines`` with the parts of scan lines that are off (a streak that lasted part of a line: the
    beam or detector glitched for a while, not for a whole line) as its ``segments`` [K, 4]
    ``row, x0, x1, offset``; a flagged line that is off only in parts is unflagged and gets its parts.

    The line differences of :func:`_scan_line_offsets` (each line against its six lattice images),
    their median taken over blocks of ~:data:`SEGMENT_BLOCK_T` translations along the line instead of
    the whole line, and over the six: per block the offset of that part of the line, as the whole
    line's median is the line's (the flagged lines levelled). Each block is judged against the median
    of the same block on the lines :data:`SEGMENT_CONTEXT_LINES` above and below it: contamination,
    thickness and illumination cover those lines too, a streak of a few lines does not. A part is off
    where blocks of a line stand out with one sign by more than ``threshold`` robust standard
    deviations (of all blocks; a block seen by fewer of the six lattice images, near the top and
    bottom, by as much more as its median is noisier) over at least :data:`SEGMENT_MIN_T` translations
    and :data:`SEGMENT_MIN_BLOCKS` blocks, at most one quiet block between two of them. A missing
    column, or two, is shorter; a row of vacancies along the line is one sublattice's columns, a
    minority of the blocks' pixels, and moves their medians little. A flagged line with such a part
    is off only in parts (its whole-line offset was a median over a streak and the rest): measured
    again unlevelled, it gets its parts instead when they stand out. The ends are placed to the pixel
    on the line's own profile (:func:`_segment_ends`)."""
    H, W = img.shape
    corr = lines.correction()
    k = max((d[4] for d in diffs if d[1] is not None), default=1)
    m = max(SEGMENT_MIN_SAMPLES, int(round(SEGMENT_BLOCK_T * t_len / k)))
    width = m * k  # block width, px; blocks [b width, (b + 1) width) of the image's columns
    nb = W // width
    if nb < SEGMENT_MIN_BLOCKS + 1 or not np.isfinite(lines.noise):
        return lines
    per = np.full((len(diffs), H, nb), np.nan, np.float32)
    for i, ((tx, ty), (_, diff, y0, x0, kk)) in enumerate(zip(shifts, diffs)):
        if diff is None or kk != k:
            continue
        iy = int(np.floor(ty))
        fy = ty - iy
        # the levelled lines: a line's correction, less its lattice image's (bilinear in y)
        ys = np.arange(y0, y0 + len(diff))
        c = corr[ys] - ((1 - fy) * corr[ys + iy] + fy * corr[np.minimum(ys + iy + 1, H - 1)])
        b0 = -(-x0 // width)  # the first block whose columns are all sampled, from its first sample on
        j0 = -(-(b0 * width - x0) // k)
        nblk = min(nb - b0, (diff.shape[1] - j0) // m)
        if nblk <= 0:
            continue
        blk = diff[:, j0:j0 + nblk * m].reshape(len(diff), nblk, m)
        per[i, y0:y0 + len(diff), b0:b0 + nblk] = _median_last(blk) - c[:, None]
    block = _nanmedian0(per)
    # against the same blocks a few lines above and below: what is smooth over lines (contamination,
    # thickness, illumination) cancels, a part of a streak does not
    ctx = np.full((2 * len(SEGMENT_CONTEXT_LINES), H, nb), np.nan, np.float32)
    for i, d in enumerate(SEGMENT_CONTEXT_LINES):
        ctx[2 * i, d:] = block[:-d]
        ctx[2 * i + 1, :-d] = block[d:]
    around = _nanmedian0(ctx)
    block = block - around
    fin = np.isfinite(block)
    if fin.sum() < 8 * nb:
        return lines
    # a block seen by fewer of the six lattice images (near the top and bottom) is noisier
    n_t = np.isfinite(per).sum(0)
    scale = np.sqrt(n_t.max() / np.maximum(n_t, 1))
    res = np.where(fin, block, 0.0) / scale
    noise = float(1.4826 * np.median(np.abs(res[fin])))
    if not noise > 0:
        return lines
    min_blocks = max(SEGMENT_MIN_BLOCKS, int(np.ceil(SEGMENT_MIN_T * t_len / width)))
    runs = _block_runs(res, threshold * noise, min_blocks)
    flagged = lines.flagged.copy()
    partial = sorted({y for y, _, _ in runs if flagged[y]})
    for y in partial:  # a flagged line off in parts only: measured again without the whole line's offset
        raw = np.where(fin[y], res[y] + corr[y] / scale[y], 0.0)
        again = _block_runs(raw[None], threshold * noise, min_blocks)
        if again:
            flagged[y] = False
            res[y] = raw
            runs = [r for r in runs if r[0] != y] + [(y, b, e) for _, b, e in again]
    corr = ScanLines(lines.offset, flagged, lines.noise).correction()
    segs: list = []
    for y, b, e in sorted(runs):
        off = float(np.median((res * scale)[y, b:e + 1]))
        base = float(np.nanmedian(around[y, b:e + 1]))  # the lines around it there
        x0, x1 = _segment_ends(img, corr, y, shifts, b * width, (e + 1) * width, width, base, off)
        if segs and segs[-1][0] == y and x0 < segs[-1][2] and np.sign(segs[-1][3]) == np.sign(off):
            x0 = segs.pop()[1]  # two runs whose ends met: one part
        segs.append((y, x0, x1, off))
    if not segs:
        return lines
    return ScanLines(lines.offset, flagged, lines.noise, np.array(segs, np.float64).reshape(-1, 4))


def _median_last(a: np.ndarray) -> np.ndarray:
    """:func:`numpy.median` over the last (short) axis of ``a``, by a sort (min / max for 3 values)."""
    m = a.shape[-1]
    if m == 3:
        x, y, z = a[..., 0], a[..., 1], a[..., 2]
        return np.maximum(np.minimum(x, y), np.minimum(np.maximum(x, y), z))
    srt = np.sort(a, axis=-1)  # (NaN last: a NaN anywhere is one in the last place)
    med = srt[..., m // 2] if m % 2 else 0.5 * (srt[..., m // 2 - 1] + srt[..., m // 2])
    return np.where(np.isnan(srt[..., -1]), np.nan, med)


def _nanmedian0(a: np.ndarray) -> np.ndarray:
    """The median over the first axis of ``a`` of its finite values (NaN where none): a sort (NaN last),
    as :func:`numpy.nanmedian` gives it, at a fraction of its cost on a short first axis."""
    srt = np.sort(a, axis=0)
    n = np.isfinite(a).sum(0)
    lo = np.take_along_axis(srt, np.maximum(n - 1, 0)[None] // 2, 0)[0]
    hi = np.take_along_axis(srt, (np.maximum(n, 1) // 2 - (n == 0))[None].clip(0), 0)[0]
    return np.where(n > 0, 0.5 * (lo + hi), np.nan)


def _block_runs(res: np.ndarray, limit: float, min_blocks: int) -> list:
    """``(row, first, last)`` of the runs of at least ``min_blocks`` blocks of ``res`` [rows, blocks]
    beyond ``limit`` with one sign, at most one block within ``limit`` between two of them."""
    out = np.where(res > limit, 1, np.where(res < -limit, -1, 0))
    runs = []
    for y in np.flatnonzero((out != 0).sum(1) >= min_blocks):
        o = out[y]
        b = 0
        while b < len(o):
            if o[b] == 0:
                b += 1
                continue
            e, n = b, 1
            while True:
                if e + 1 < len(o) and o[e + 1] == o[b]:
                    e += 1
                elif e + 2 < len(o) and o[e + 1] == 0 and o[e + 2] == o[b]:
                    e += 2
                else:
                    break
                n += 1
            if n >= min_blocks:
                runs.append((int(y), b, e))
            b = e + 1
    return runs


def _segment_ends(img: np.ndarray, corr: np.ndarray, y: int, shifts: list, xa: int, xb: int, width: int,
                  centre: float, off: float) -> tuple[int, int]:
    """The columns ``[x0, x1)`` of a part of line ``y`` that is off by ``off``, found within a block of
    the blocks' ends ``xa, xb``: where the line's profile (per pixel, the median of its differences with
    its six lattice images) is best split into ``centre + off`` inside and ``centre`` outside."""
    H, W = img.shape
    lo, hi = max(0, xa - width), min(W, xb + width)
    xs = np.arange(lo, hi)
    vals = np.full((len(shifts), len(xs)), np.nan)
    row = img[y, lo:hi].astype(np.float64) - corr[y]
    for i, (tx, ty) in enumerate(shifts):
        yy, xx = y + ty, xs + tx
        iy, ix = int(np.floor(yy)), np.floor(xx).astype(np.int64)
        if iy < 0 or iy + 1 >= H:
            continue
        fy, fx = yy - iy, xx - ix
        ok = (ix >= 0) & (ix + 1 < W)
        ixc = np.clip(ix, 0, W - 2)
        a = img[iy, ixc] - corr[iy]
        bb = img[iy, ixc + 1] - corr[iy]
        c = img[iy + 1, ixc] - corr[iy + 1]
        d = img[iy + 1, ixc + 1] - corr[iy + 1]
        ref = (1 - fy) * ((1 - fx) * a + fx * bb) + fy * ((1 - fx) * c + fx * d)
        vals[i] = np.where(ok, row - ref, np.nan)
    prof = _nanmedian0(vals)
    v = np.nan_to_num(np.sign(off) * (prof - centre - 0.5 * off))  # > 0 where the profile holds the offset
    # start: the column after which the profile holds the offset (the suffix sum of v within the first window)
    first = xs < xa + width
    suf = np.cumsum(v[first][::-1])[::-1]
    x0 = int(xs[first][int(np.argmax(suf))])
    last = xs >= xb - width
    pre = np.cumsum(v[last])
    x1 = int(xs[last][int(np.argmax(pre))]) + 1
    return x0, max(x1, x0 + 1)


#: a jump between two lines is flagged when their shift is this many robust standard deviations from
#: the typical neighbouring-line shift (the scan's shear) and at least ``JUMP_MIN_PX``
JUMP_THRESHOLD = 6.0
#: smallest shift (px) flagged as a jump
JUMP_MIN_PX = 0.5
#: lines are compared over at most this many central columns: a jump moves the whole line, so its central
#: part measures it (at 4096 px a quarter of the cost)
JUMP_COLUMNS = 1024
#: largest shift (px) looked for between two lines
JUMP_MAX_LAG = 4
#: a pair of lines is judged only when their profiles correlate at the best shift by at least this many
#: standard errors of the correlation of two noise lines (``1 / sqrt(W)``): lines through vacuum, a
#: hole or a featureless region carry no shift
JUMP_MIN_CORRELATION_SE = 5.0
#: with the lattice known, bands shifted by up to this share of its period along the scan lines
#: (:func:`line_period`) are looked for and repaired: the band's lines also match the lattice one
#: period the other way, and within this share the two readings differ by 0.12 periods and more (a
#: 19.6 px period: up to 8.6 px, the other reading 11 px or more the other way; the lines between rows
#: of columns that run along the scan lines match their neighbours best at half a period, 9.8 px,
#: beyond this reach). Bands of 8 px there are measured at 7.8-8.2 px
JUMP_MAX_PERIOD_SHARE = 0.44
#: a jump is read again within this many px of a first reading (:func:`_remeasured`): the default
#: search (:data:`JUMP_MAX_LAG`) so measures shifts up to this much beyond it, which are repaired at
#: any lattice, as before the search was widened (a 4 px band at 5 px spacing, 0.46 periods, is
#: found and confirmed by its lines' lattice images)
JUMP_REMEASURE_PX = 2


@dataclass(frozen=True)
class ScanJumps:
    """Output of :func:`scan_line_jumps`.

    Attributes
    ----------
    shift : float64 [H - 1], how far line ``y + 1`` lies to the right of line ``y`` (px), less the
        typical shift of neighbouring lines (NaN where the pair was not judged).
    flagged : bool [H - 1], the jumps, in pairs: the jump into a band of shifted lines and the one back.
    noise : robust standard deviation of ``shift`` over the judged pairs.
    candidates : bool [H - 1], the pairs whose shift stood out, before the lattice confirmed them
        and before they were kept in bands (what :func:`confirm_jumps` starts from).
    declined : bool [H - 1] or None, jumps the lattice confirmed but that are beyond
        :func:`jump_reach` (bands, in pairs as ``flagged``, and jumps in none): not repaired (not in
        ``flagged``), their shift in ``shift``.
    """

    shift: np.ndarray
    flagged: np.ndarray
    noise: float
    candidates: np.ndarray | None = field(default=None, repr=False, compare=False)
    declined: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def rows(self) -> np.ndarray:
        """The first line after each jump."""
        return np.flatnonzero(self.flagged) + 1

    def offsets(self) -> np.ndarray:
        """float64 [H]: how far each recorded line lies to the right of where it belongs
        (:func:`line_offsets` of the bands :attr:`flagged` holds in pairs)."""
        rows = self.rows
        return line_offsets(rows, self.shift[rows - 1], len(self.shift) + 1)

    def undo(self, image: np.ndarray) -> np.ndarray:
        """``image`` with the jumped lines moved back (linear interpolation along the line; the
        ends repeat the last pixel); the image itself when there is no jump."""
        off = self.offsets()
        if not off.any():
            return image
        out = np.array(image, dtype=np.float32 if image.dtype != np.float64 else np.float64)
        x = np.arange(out.shape[1], dtype=np.float64)
        for y in np.flatnonzero(off):
            out[y] = np.interp(x + off[y], x, np.asarray(image[y], np.float64))
        return out

    def recorded_x(self, x: np.ndarray, y: np.ndarray, column_px: float = 1.0) -> np.ndarray:
        """Positions ``x`` (at rows ``y``) found on :meth:`undo`'s image, where the recorded image has
        them: moved by their lines' offset, averaged over the column's rows (a Gaussian of
        ``column_px`` along y), so a column that a jump cuts lies between its two recorded halves."""
        return np.asarray(x, np.float64) + recorded_shift(y, self.offsets(), column_px)


def line_offsets(jump_rows, jump_px, n_lines: int) -> np.ndarray:
    """float64 [n_lines]: how far each recorded line lies to the right of where it belongs, from the
    bands of jumped lines (``jump_rows``: the first line after each jump, in pairs -- into a band and
    back, as ``summary.json`` lists them; ``jump_px``: the jumps): the lines of a band by the mean of
    its jump and the jump back, 0 elsewhere.

    Examples
    --------
    >>> line_offsets([3, 5], [2.1, -1.9], 7).tolist()
    [0.0, 0.0, 0.0, 2.0, 2.0, 0.0, 0.0]
    """
    off = np.zeros(int(n_lines))
    r = np.asarray(jump_rows, np.int64)
    p = np.asarray(jump_px, np.float64)
    for r1, r2, p1, p2 in zip(r[0::2], r[1::2], p[0::2], p[1::2]):
        off[r1:r2] = 0.5 * (p1 - p2)
    return off


def recorded_shift(y, offsets: np.ndarray, column_px: float = 1.0) -> np.ndarray:
    """How far points at rows ``y`` lie to the right in the recorded image of where the lattice has
    them: their lines' ``offsets`` (:func:`line_offsets`) averaged over a column's rows (a Gaussian
    of ``column_px`` along y), so a column that a jump cuts lies between its two recorded halves."""
    from scipy import ndimage

    off = ndimage.gaussian_filter1d(np.asarray(offsets, np.float64), column_px, mode="nearest")
    return np.interp(np.asarray(y, np.float64), np.arange(len(off)), off)


def line_period(vectors) -> float:
    """The lattice's period along the scan lines (px), from translations ``vectors`` [K, 2] (x, y) that
    map the lattice onto itself (the shortest three): the least ``|u|^2 / |u_x|`` over them and their
    sums and differences ``u``. A line shifted by ``s`` along x is nearer to the translation ``u`` than
    to none once ``s`` passes half of it; where a translation runs along the lines it is that
    translation's length.

    Examples
    --------
    >>> line_period([[20.0, 0.0], [10.0, 17.32]])  # a row of the lattice along the scan lines
    20.0
    >>> round(line_period([[17.32, 10.0], [-17.32, 10.0]]), 2)  # turned by 30 deg
    23.09
    """
    u = _combinations(vectors)
    ux = np.abs(u[:, 0])
    ok = ux > 1e-9 * np.hypot(u[:, 0], u[:, 1]).max()
    return float(np.min((u[ok] ** 2).sum(1) / ux[ok])) if ok.any() else float("inf")


def _combinations(vectors) -> np.ndarray:
    """``vectors`` [K, 2] and their pairwise sums and differences."""
    vec = np.asarray(vectors, np.float64).reshape(-1, 2)
    return np.concatenate([vec] + [vec[i] + s * vec[j:j + 1] for i in range(len(vec))
                                   for j in range(i + 1, len(vec)) for s in (1.0, -1.0)])


def _along_lines(vectors) -> float:
    """The shortest translation among ``vectors`` [K, 2] and their sums and differences that runs within
    a line of the scan lines (``|u_y| < 1``; its ``|u_x|``, inf where none does): lines compared with
    their lattice images match at a shift and at that shift plus or minus it."""
    u = _combinations(vectors)
    along = (np.abs(u[:, 1]) < 1.0) & (np.abs(u[:, 0]) > 1.0)
    return float(np.abs(u[along, 0]).min()) if along.any() else float("inf")


def jump_reach(vectors) -> float:
    """How far (px) a band of jumped lines may be shifted to be repaired, on the lattice of
    translations ``vectors`` (:func:`line_period`): :data:`JUMP_MAX_PERIOD_SHARE` of its period along
    the scan lines, and at least what the default search measures (:data:`JUMP_MAX_LAG` and
    :data:`JUMP_REMEASURE_PX`).

    Examples
    --------
    >>> round(jump_reach([[19.6, 0.0], [9.8, 16.97]]), 2), jump_reach([[8.66, 0.0], [4.33, 7.5]])
    (8.62, 6.0)
    """
    return max(float(JUMP_MAX_LAG + JUMP_REMEASURE_PX), JUMP_MAX_PERIOD_SHARE * line_period(vectors))


def jump_search_lag(vectors) -> int:
    """The neighbour-line search range (px, :func:`scan_line_jumps`' ``max_lag``) on the lattice of
    translations ``vectors``: :data:`JUMP_MAX_LAG`, or as far as :data:`JUMP_MAX_PERIOD_SHARE` of the
    lattice's period along the scan lines (:func:`line_period`) where that is farther.

    Examples
    --------
    >>> jump_search_lag([[19.6, 0.0], [9.8, 16.97]]), jump_search_lag([[8.66, 0.0], [4.33, 7.5]])
    (9, 4)
    """
    return max(JUMP_MAX_LAG, int(np.ceil(JUMP_MAX_PERIOD_SHARE * line_period(vectors))))


def scan_line_jumps(image, vectors=None, *, threshold: float = JUMP_THRESHOLD, min_px: float = JUMP_MIN_PX,
                    max_lag: int = JUMP_MAX_LAG) -> ScanJumps:
    """Sideways jumps of the scan between neighbouring lines (module docs).

    Parameters
    ----------
    image : (H, W) array, the raw micrograph.
    vectors : float [K, 2], optional: lattice translations (x, y) in px that map the lattice onto
        itself (:func:`same_sublattice_vectors`). Where the atom rows run along the scan lines,
        neighbouring lines can see different rows of columns, offset by half a period: such a pair
        looks like a jump. With ``vectors`` a jump is kept only when the lattice confirms it: the
        lines one translation before the jump, compared with their lattice images after it, are
        off by the same shift (:func:`_confirmed_by_lattice`). Without, every candidate is kept.
    threshold : flag a pair of lines whose shift is more than this many robust standard deviations
        from the typical one ...
    min_px : ... and at least this many pixels.
    max_lag : largest shift looked for (px).

    Returns
    -------
    ScanJumps

    Examples
    --------
    >>> from stemfast.synthetic import make_lattice
    >>> img, _ = make_lattice((96, 96), 8.0, rotation_deg=10.0, noise=0.05, seed=0)
    >>> img[40:60] = np.roll(img[40:60], 2, axis=1)  # lines 40-59 recorded 2 px to the right
    >>> jumps = scan_line_jumps(img, same_sublattice_vectors([8.0 * np.cos(np.radians(10)), 8.0 * np.sin(np.radians(10))],
    ...                                                      [8.0 * np.cos(np.radians(70)), 8.0 * np.sin(np.radians(70))]))
    >>> jumps.rows.tolist(), (np.round(jumps.offsets()[[39, 40, 59, 60]]) + 0.0).tolist()
    ([40, 60], [0.0, 2.0, 2.0, 0.0])
    """
    if not threshold > 0 or not min_px > 0 or int(max_lag) < 1:
        raise ValueError("threshold and min_px must be > 0, max_lag >= 1")
    img = _jump_columns(image)
    lag = min(int(max_lag), img.shape[1] // 4)
    shift, corr = _neighbour_line_shifts(img, max(lag, 1))
    judged = corr >= JUMP_MIN_CORRELATION_SE / np.sqrt(img.shape[1])
    out = np.full(len(shift), np.nan)
    if judged.sum() < 3:
        none = np.zeros(len(shift), bool)
        return ScanJumps(out, none, float("nan"), none)
    typical = float(np.median(shift[judged]))
    out[judged] = shift[judged] - typical
    noise = float(1.4826 * np.median(np.abs(out[judged])))
    flagged = judged & (np.abs(np.nan_to_num(out)) > max(min_px, threshold * noise))
    jumps = ScanJumps(out, _bands(flagged, out), noise, flagged)
    return jumps if vectors is None else _confirm(img, jumps, vectors, lag, min_px)


def confirm_jumps(image, jumps: ScanJumps, vectors, *, min_px: float = JUMP_MIN_PX,
                  max_lag: int = JUMP_MAX_LAG) -> ScanJumps:
    """``jumps`` (found without ``vectors`` by :func:`scan_line_jumps` on ``image``, with the same
    ``max_lag``) with only the jumps the lattice confirms kept: what ``scan_line_jumps(image,
    vectors)`` gives, without measuring the lines' shifts again.

    Examples
    --------
    >>> from stemfast.synthetic import make_lattice
    >>> img, _ = make_lattice((96, 96), 8.0, rotation_deg=10.0, noise=0.05, seed=0)
    >>> img[40:60] = np.roll(img[40:60], 2, axis=1)
    >>> vec = same_sublattice_vectors([8.0 * np.cos(np.radians(10)), 8.0 * np.sin(np.radians(10))],
    ...                               [8.0 * np.cos(np.radians(70)), 8.0 * np.sin(np.radians(70))])
    >>> confirm_jumps(img, scan_line_jumps(img), vec).rows.tolist()
    [40, 60]
    """
    if not min_px > 0 or int(max_lag) < 1:
        raise ValueError("min_px must be > 0, max_lag >= 1")
    if jumps.candidates is None:
        raise ValueError("jumps has no candidates: give what scan_line_jumps returned")
    img = _jump_columns(image)
    if len(jumps.shift) != img.shape[0] - 1:
        raise ValueError(f"jumps are of {len(jumps.shift) + 1} lines, the image has {img.shape[0]}")
    return _confirm(img, jumps, vectors, min(int(max_lag), img.shape[1] // 4), min_px)


def _jump_columns(image) -> np.ndarray:
    """The lines of ``image`` that jumps are measured on: its :data:`JUMP_COLUMNS` central columns
    (a view; the line shifts are measured in float32, the lattice confirmation in float64: a 4096 px
    wide image is not copied whole, and not to float64 unless a jump needs confirming)."""
    img = np.asarray(image)
    if img.ndim != 2 or min(img.shape) < 2:
        raise ValueError(f"image must be 2-D, got shape {img.shape}")
    if img.shape[1] > JUMP_COLUMNS:  # a jump moves a whole line: its central columns measure it
        c0 = (img.shape[1] - JUMP_COLUMNS) // 2
        img = img[:, c0:c0 + JUMP_COLUMNS]
    return img


def _confirm(img: np.ndarray, jumps: ScanJumps, vectors, lag: int, min_px: float) -> ScanJumps:
    """``jumps`` with the candidates the lattice of translations ``vectors`` confirms in bands
    (:func:`_confirmed_by_lattice`, then :func:`_bands`; the narrow ones by :func:`_narrow_bands`) as
    ``flagged``, each band's shift from its jumps as the lattice confirmed them (their lines read
    again near the lattice's reading -- a band shifted to the search's edge ``lag`` is read short
    there -- and the lattice's reading), and the bands shifted beyond :func:`jump_reach`, and the
    confirmed jumps beyond it that are in no band, as ``declined`` instead."""
    cand = jumps.candidates
    none = np.zeros_like(cand)
    if not cand.any():
        return ScanJumps(jumps.shift, none, jumps.noise, jumps.candidates, none)
    lag = max(lag, 1)
    a = _detrended(np.asarray(img, np.float64), lag)
    vec = np.asarray(vectors, np.float64).reshape(-1, 2)
    usual = _lattice_lags(a, vec, lag)
    reach = jump_reach(vec)
    # a widened search's rows look 2 px farther: a band beyond the reach reads its shift, not the window's end
    rows_lag = lag + JUMP_REMEASURE_PX if lag > JUMP_MAX_LAG else lag
    confirmed, read, by_rows = _confirmed_by_lattice(a, usual, cand, jumps.shift, rows_lag, min_px,
                                                     line_period(vec), _along_lines(vec))
    flagged = _bands(confirmed, read, by_rows)
    # bands too narrow for that: their own lines against the lattice images above and below them
    b = np.flatnonzero(flagged)
    inside = np.zeros_like(cand)
    for b1, b2 in zip(b[0::2], b[1::2]):
        inside[b1:b2 + 1] = True
    narrow, shift = _narrow_bands(a, usual, cand & ~inside, jumps.shift, lag, min_px)
    shift = np.where(narrow, shift, np.where(flagged, read, jumps.shift))
    wide = max((dy for dy, _ in usual), default=1)
    for b1, b2 in zip(b[0::2], b[1::2]):
        # the band's shift: its two jumps as their lines read them and, on a band a translation's rows
        # wide, as the rows read them (a jump between two rows of columns is read up to 0.6 px short
        # by its lines, the rows' readings scatter by 0.1 px)
        s = [shift[b1], -shift[b2]] + ([by_rows[b1], -by_rows[b2]] if b2 - b1 >= wide else [])
        shift[b1] = float(np.median(s))
        shift[b2] = -shift[b1]
    b = np.flatnonzero(flagged | narrow)
    # beyond the reach: the bands, and the jumps the lattice confirmed there that are in none (nor
    # within a translation's rows of a band's jump: the rows read that one there)
    beyond = confirmed & ~(flagged | narrow) & (np.abs(read) > reach)
    for k in b:
        beyond[max(0, k - wide):k + wide + 1] = False
    shift = np.where(beyond, read, shift)
    for b1, b2 in zip(b[0::2], b[1::2]):
        beyond[[b1, b2]] = 0.5 * abs(shift[b1] - shift[b2]) > reach
    return ScanJumps(shift, (flagged | narrow) & ~beyond, jumps.noise, jumps.candidates, beyond)


def _remeasured(a: np.ndarray, b1: int, b2: int, s_band: float) -> tuple[float, float]:
    """The jumps into a band and back (between lines ``b1``, ``b1 + 1`` and ``b2``, ``b2 + 1`` of the
    detrended lines ``a``) measured again around the band's shift ``s_band``, within
    :data:`JUMP_REMEASURE_PX`: ``(s, -s)``, ``s`` the mean of the two readings (a jump near the
    search's edge, or read a period off, is not cut off by its window)."""
    s = 0.5 * (_block_lag(a, np.array([b1]), 1, s_band, JUMP_REMEASURE_PX)
               - _block_lag(a, np.array([b2]), 1, -s_band, JUMP_REMEASURE_PX))
    return s, -s


def _detrended(img: np.ndarray, max_lag: int) -> np.ndarray:
    """The lines with their slow trends along x taken out (what the lags are measured on)."""
    from scipy import ndimage

    return img - ndimage.uniform_filter1d(img, 4 * max_lag + 1, axis=1, mode="reflect")


def _lattice_lags(a: np.ndarray, vectors: np.ndarray, max_lag: int) -> list[tuple[int, float]]:
    """Per lattice translation ``(t_x, t_y)`` (turned to point down) whose rows ``dy = round(t_y)`` fit
    in a quarter of the image: ``(dy, lag)``, the lag at which lines ``dy`` apart match all over the
    detrended lines ``a`` (``t_x`` plus the scan's shear)."""
    H = a.shape[0]
    out = []
    for tx, ty in vectors:
        tx, ty = (tx, ty) if ty > 0 else (-tx, -ty)
        dy = int(np.rint(ty))
        if 1 <= dy < H // 4:
            out.append((dy, _block_lag(a, np.arange(0, H - dy, max(1, (H - dy) // 64)), dy, tx, max_lag)))
    return out


def _narrow_bands(a: np.ndarray, usual: list, cand: np.ndarray, shift: np.ndarray, max_lag: int,
                  min_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Bands of jumped lines narrower than a lattice translation's rows (a glitch of a few lines at
    coarse sampling), which :func:`_confirmed_by_lattice` cannot confirm: its lines after the jump run
    past the band. A band starts after a candidate jump ``b1`` and ends at the next candidate ``b2``
    going back by about as much (:func:`_cancels`; or by about as much plus or minus ``P``, where a
    lattice translation of ``usual`` runs within a line of the scan lines, ``dy = 1``, with period
    ``P`` along them, and the neighbouring lines cannot tell a jump from one ``P`` off) or, where the
    lines there are too unlike to be judged (NaN), at the first such line within a translation's rows;
    its shift is ``s = (shift[b1] - shift[b2]) / 2`` (with the jump back read ``P`` off corrected;
    ``shift[b1]`` at an unjudged end). The band's lines are compared with their lattice images ``dy``
    lines below and above (outside the band: every translation with ``dy`` beyond its width): against
    the lag the image needs elsewhere, lines recorded ``s`` px to the right are off by ``s`` from both.
    Every one of these comparisons (at least two) must lie within half of ``s`` of it, and ``|s| >=
    min_px``. (Where atom rows run along the scan lines, pairs of neighbouring lines that see different
    rows look like one-line bands; their lattice images scatter by a pixel and more around any such
    ``s``.) A kept band's shift is then measured again around ``s`` between the neighbouring lines of
    its two jumps (:func:`_remeasured`). ``a``, ``usual``: as for :func:`_confirmed_by_lattice`.
    Returns ``(keep, shift)``:
    bool [H - 1], both jumps of each band kept, and ``shift`` with theirs set to plus and minus the
    band's measured shift."""
    keep = np.zeros_like(cand)
    shift = shift.copy()
    b = np.flatnonzero(cand)
    if not len(b) or not usual:
        return keep, shift
    max_w = max(dy for dy, _ in usual) - 1
    periods = [abs(lag) for dy, lag in usual if dy == 1]  # the P of translations within a line of the lines

    def confirmed(band: np.ndarray, s_band: float) -> bool:
        n_seen = 0  # (the first comparison off ``s_band`` decides: the others are not made)
        for dy, lag in usual:
            if dy > len(band):
                for seen in _band_readings(a, band, dy, lag, s_band, max_lag):
                    if not abs(seen - s_band) < 0.5 * abs(s_band):
                        return False
                    n_seen += 1
        return n_seen >= 2

    done = -1
    for i, b1 in enumerate(b):
        if b1 <= done:
            continue
        j1 = shift[b1]
        ends = []
        if i + 1 < len(b) and b[i + 1] - b1 <= max_w:
            # the jump back, or (where a lattice translation runs within a line of the scan lines, period
            # P along them) the jump back read a period off: neighbouring lines cannot tell s from s - P
            for j2 in [shift[b[i + 1]]] + [shift[b[i + 1]] + k * p for p in periods for k in (-1, 1)]:
                if _cancels(j1, j2):
                    ends.append((b[i + 1], 0.5 * (j1 - j2)))
        gap = np.flatnonzero(np.isnan(shift[b1 + 1:min(b1 + max_w + 1, len(shift))]))
        if len(gap):
            ends.append((b1 + 1 + int(gap[0]), j1))
        for b2, s_band in ends:
            band = np.arange(b1 + 1, b2 + 1)
            if abs(s_band) >= min_px and confirmed(band, s_band):
                keep[b1] = keep[b2] = True
                shift[b1], shift[b2] = _remeasured(a, b1, b2, s_band)
                done = b2
                break
    return keep, shift


def _band_readings(a: np.ndarray, band: np.ndarray, dy: int, lag: float, s_band: float, max_lag: int):
    """The shifts of the lines ``band`` against their lattice images ``dy`` lines below and above (those
    inside ``a``), each read as it comes (:func:`_narrow_bands`): the lag the lines ``dy`` apart need
    there less ``lag``, the lag they need elsewhere."""
    H = a.shape[0]
    if band[-1] + dy < H:  # the band against the lines below it
        yield lag - _block_lag(a, band, dy, lag - s_band, max_lag)
    if band[0] - dy >= 0:  # the lines above it against the band
        yield _block_lag(a, band - dy, dy, lag + s_band, max_lag) - lag


def _cancels(j1: float, j2: float) -> bool:
    """A jump ``j1`` and a later one ``j2`` are a band's jump and its jump back: the two shifts cancel
    to within half the larger."""
    return abs(j1 + j2) < 0.5 * max(abs(j1), abs(j2))


def _bands(flagged: np.ndarray, shift: np.ndarray, by_rows: np.ndarray | None = None) -> np.ndarray:
    """The flagged jumps that come in bands: a jump and a later one going back by about as much
    (:func:`_cancels`), the pairs that agree best first -- the two jumps cancel, and each is read
    alike by its lines (``shift``) and by the lattice's rows (``by_rows``, where given) --, each band
    holding no jump of another; the others are dropped, so a jump found wrongly or missed never moves
    the rest of the image. (Where a lattice translation's rows straddle a band's jump and a line pair
    beside it, they confirm that pair by part of the band's shift, or by a shift half a period off
    where its lines lie between two rows of columns that run along the scan lines: a 9.4 px pair 8
    lines into an 8 px band, a 6.2 px pair next to a 5 px jump at a 12.4 px period. The band's own
    jumps agree best.)"""
    keep = np.zeros_like(flagged)
    b = np.flatnonzero(flagged)
    s = shift[b]
    off = np.zeros(len(b)) if by_rows is None else np.nan_to_num(np.abs(by_rows[b] - s))
    big = np.maximum(np.abs(s)[:, None], np.abs(s)[None, :])
    cancel = np.triu(np.abs(s[:, None] + s[None, :]) < 0.5 * big, 1)  # (:func:`_cancels`)
    i, j = np.nonzero(cancel)
    score = (np.abs(s[i] + s[j]) + off[i] + off[j]) / big[i, j]
    # the lines of the bands kept: no band in, around or across another (a bytearray: the pairs, often
    # thousands, are tried one by one, and a slice of it is looked through at a small share of the cost
    # of an array's .any())
    covered = bytearray(len(flagged))
    order = np.argsort(score, kind="stable")
    for b1, b2 in zip(b[i[order]].tolist(), b[j[order]].tolist()):
        if 1 not in covered[b1:b2 + 1]:
            keep[b1] = keep[b2] = True
            covered[b1:b2 + 1] = b"\x01" * (b2 + 1 - b1)
    return keep


def _block_lag(a: np.ndarray, ys: np.ndarray, dy: int, centre: float, max_lag: int) -> float:
    """Sub-pixel lag (within ``max_lag`` of ``centre``) at which the lines ``ys + dy`` of ``a`` best
    match the lines ``ys`` (``a[y + dy, x + lag] ~ a[y, x]``), their cross-correlations summed."""
    return _block_peak(a, ys, dy, centre, max_lag)[0]


def _block_peak(a: np.ndarray, ys: np.ndarray, dy: int, centre: float, max_lag: int,
                spectra: "_LineSpectra | None" = None) -> tuple[float, bool, float]:
    """:func:`_block_lag`, whether its best integer lag lies inside the window (not at either end:
    there the best match lies outside it), and the mean product of the lines there. ``spectra``
    (:class:`_LineSpectra` of ``a``): the same products from the lines' spectra (for many blocks
    of one image)."""
    W = a.shape[1]
    lags = np.arange(int(np.rint(centre)) - max_lag, int(np.rint(centre)) + max_lag + 1)
    cc = np.full(len(lags), -np.inf)
    inside = np.abs(lags) < W // 2
    if spectra is not None:
        cc[inside] = spectra.mean_products(ys, dy, lags[inside])
    else:
        top_all, bot_all = a[ys], a[ys + dy]
        for k in np.flatnonzero(inside):
            L = lags[k]
            top, bot = (top_all[:, :W - L], bot_all[:, L:]) if L >= 0 else (top_all[:, -L:], bot_all[:, :W + L])
            # the mean product without the product array (einsum sums in place: ~1.5x faster a call)
            cc[k] = float(np.einsum("ij,ij->", top, bot)) / top.size
    k = int(np.argmax(cc))
    return _peak(cc, lags), 0 < k < len(lags) - 1, float(cc[k])


class _LineSpectra:
    """The spectra of the lines ``a`` [H, W], zero-padded to twice their length (computed for the
    lines asked for, once): the sums of products of two blocks of lines over every lag come from one
    inverse transform, as :func:`_block_peak` sums them lag by lag (at 4096 x 1024 px, the lattice's
    check of 300 candidate jumps took 1.5 s so)."""

    #: lines transformed together (as they are first asked for)
    CHUNK = 256

    def __init__(self, a: np.ndarray):
        self.a = a
        self.n = sfft.next_fast_len(2 * a.shape[1])
        self.spec = np.empty((a.shape[0], self.n // 2 + 1), np.complex128)  # (its pages: as they are filled)
        self.done = np.zeros(-(-a.shape[0] // self.CHUNK), bool)

    def _rows(self, ys: np.ndarray) -> np.ndarray:
        for c in np.unique(np.asarray(ys) // self.CHUNK):
            if not self.done[c]:
                sl = slice(c * self.CHUNK, (c + 1) * self.CHUNK)
                self.spec[sl] = sfft.rfft(self.a[sl], n=self.n, axis=1)
                self.done[c] = True
        return self.spec[ys]

    def mean_products(self, ys: np.ndarray, dy: int, lags: np.ndarray) -> np.ndarray:
        """Per lag ``L`` of ``lags`` (``|L| < W``), the mean of ``a[y, x] * a[y + dy, x + L]`` over the
        lines ``ys`` and the columns where both lie inside."""
        W = self.a.shape[1]
        full = sfft.irfft((np.conj(self._rows(ys)) * self._rows(ys + dy)).sum(0), n=self.n)
        return full[lags % self.n] / (len(ys) * (W - np.abs(lags)))


def _peak(cc: np.ndarray, lags: np.ndarray) -> float:
    """The lag at the peak of the correlations ``cc`` [len(lags)], refined by a parabola through the
    best lag and its two neighbours (by at most half a pixel)."""
    k = min(max(int(np.argmax(cc)), 1), len(lags) - 2)  # (np.clip's order; on scalars a tenth of its cost)
    cm, c0, cp = cc[k - 1], cc[k], cc[k + 1]
    den = cm - 2 * c0 + cp
    frac = 0.5 * (cm - cp) / den if np.isfinite(den) and den < 0 else 0.0  # (finite)
    return float(lags[k] + min(max(frac, -0.5), 0.5))


def _row_peaks(cc: np.ndarray, lags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_peak` of every row of ``cc`` [R, len(lags)] at once: ``(lag, correlation there)``."""
    k = np.clip(np.argmax(cc, 1), 1, len(lags) - 2)
    r = np.arange(len(cc))
    c0, cm, cp = cc[r, k], cc[r, k - 1], cc[r, k + 1]
    den = cm - 2 * c0 + cp
    frac = np.where(den < 0, 0.5 * (cm - cp) / np.where(den < 0, den, -1.0), 0.0)
    return lags[k] + np.clip(frac, -0.5, 0.5), c0


def _confirmed_by_lattice(a: np.ndarray, usual: list, flagged: np.ndarray, shift: np.ndarray,
                          max_lag: int, min_px: float, period: float = np.inf,
                          along: float = np.inf) -> tuple[np.ndarray, np.ndarray]:
    """Which of the ``flagged`` jumps (``shift[b]`` px between lines ``b`` and ``b + 1``) the lattice
    confirms, and their shifts read again. For each translation ``t`` (pointing down, ``dy =
    round(t_y)`` lines), the ``dy`` lines just before the jump, each compared with its lattice image
    ``dy`` lines further (after the jump; a whole row period, so that no single pair of atom rows
    decides), match at the lag the image needs elsewhere (``t_x`` plus the scan's shear) plus the
    jump, within ``max_lag`` of it and not at the window's end (for most translations; each taken
    within half of ``along`` of no shift, a translation within a line of the scan lines,
    :func:`_along_lines`: the lines match there too); the median ``m`` over translations must exceed
    ``min_px``. The two lines of the jump must then match best near ``m`` (their cross-correlation
    peaks inside :data:`JUMP_REMEASURE_PX` of it, not at the window's end), at ``r``, with ``m``
    within half of ``r`` of it, and not match unshifted (:func:`_match_near_zero`, ``period``: the
    lattice's along the lines, :func:`line_period`); ``r`` is the jump's shift.
    (The rows localize no jump: a line pair within ``dy`` lines of a band's jump, which the rows
    straddle too, gets part of its shift. And where the atom rows run along the scan lines, the two
    lines of a jump between two rows can match best half a period off, beyond the search's reach of
    4 px but not of a wider one.) ``a``: the detrended lines (:func:`_detrended`); ``usual``:
    :func:`_lattice_lags`. (A band narrower than about ``dy / 2`` lines is not confirmed here:
    :func:`_narrow_bands` judges it.) Returns ``(keep, shift, by_rows)``: bool [H - 1], ``shift``
    with the confirmed jumps' ``r``, and their ``m`` (NaN elsewhere)."""
    H = a.shape[0]
    keep = np.zeros(len(flagged), bool)
    shift = shift.copy()
    by_rows = np.full(len(flagged), np.nan)
    spectra = _LineSpectra(a)
    for b in np.flatnonzero(flagged):
        r, ok, c_r = _block_peak(a, np.array([b]), 1, shift[b], 1)
        if _match_near_zero(a, b, r, c_r, period):  # the pair matches unshifted: no jump (and no rows read)
            continue
        off, inside = [], 0
        for dy, typical in usual:
            ys = np.arange(b + 1 - dy, b + 1)
            ys = ys[(ys >= 0) & (ys + dy < H)]
            if len(ys):
                lag, ok, _ = _block_peak(a, ys, dy, typical, max_lag, spectra)
                off.append(_wrapped(lag - typical, along))
                inside += ok
        med = float(np.median(off)) if off else 0.0
        if abs(med) < min_px or 2 * inside < len(off):
            continue
        r, ok, c_r = _block_peak(a, np.array([b]), 1, med, JUMP_REMEASURE_PX)
        if ok and abs(med - r) < 0.5 * abs(r) and not _match_near_zero(a, b, r, c_r, period):
            keep[b] = True
            shift[b], by_rows[b] = r, med
    return keep, shift, by_rows


def _wrapped(s: float, period: float) -> float:
    """``s`` less the multiple of ``period`` that brings it within half of it of 0 (``s`` itself for
    an infinite one)."""
    return s - period * np.round(s / period) if np.isfinite(period) else s


def _match_near_zero(a: np.ndarray, b: int, r: float, c_r: float, period: float) -> bool:
    """Whether lines ``b`` and ``b + 1`` of the detrended lines ``a`` match within half of ``r`` of no
    shift (a peak of their cross-correlation there, not the end of the window, at least half as high
    as ``c_r``, theirs at ``r``), nearer to no shift than to ``r`` less half the lattice's ``period``
    along the lines: then they are no jump by ``r``. (Between two rows of columns that run along the
    scan lines, two lines match best half a period off: a pair that is no jump at ``r - period / 2``,
    its match at ``r`` less that, near 0, and a jump by ``r`` at both.)"""
    lag, inside, c0 = _block_peak(a, np.array([b]), 1, 0.0, int(0.5 * abs(r)) + 1)
    alias = r - np.sign(r) * 0.5 * period
    return inside and abs(lag) < 0.5 * abs(r) and abs(lag) < abs(lag - alias) and c0 >= 0.5 * c_r


#: the lattice's periodic part (:func:`lattice_line_bands`): the strongest this share of the Fourier
#: coefficients of the lines' central columns, above LATTICE_MIN_FREQ cycles/px (the background out)
LATTICE_KEEP, LATTICE_MIN_FREQ = 5e-4, 0.02
#: ... over at most this many central columns (at 10-15 px spacing, 35-50 columns of atoms a line)
LATTICE_COLUMNS = 512
#: each line's shift against that periodic part less its running median over this many lines
LATTICE_MEDIAN_LINES = 31
#: a band found this way holds at most this many lines (a longer shifted stretch is a step of the
#: frame, which the lattice follows)
LATTICE_MAX_BAND = 16
#: a band's lines stand out from the running median by more than this many robust standard deviations
#: (below :data:`JUMP_THRESHOLD`: a band must also be confirmed by its gain in correlation and be
#: shifted by LATTICE_MIN_SHIFT_NN spacings; at 5, 19 of 20 half-spacing bands on glitched real MoS2
#: are found against 17 at 6, with no false band on the sound synthetic and real images)
LATTICE_THRESHOLD = 5.0
#: a band's lines are compared with their images by the lattice's translations across the lines at the
#: best shift within this many px of each reading (:func:`_echoed`)
ECHO_SLACK_PX = 1.0
#: ... by every translation across the lines whose path past the band is at most this many times the
#: shortest (:func:`_image_lines`)
ECHO_NEAR_COST = 1.25
#: a band is shifted by at least this share of the site spacing: with the atom rows along the scan
#: lines, the lines through the columns measure their shifts so well that the spread is no guide to
#: the lines between them (sound synthetic MoS2 at 0 and 30 deg, 10-15 px: up to 0.19 spacings)
LATTICE_MIN_SHIFT_NN = 0.25


def needs_lattice_lines(spacing_px: float | None) -> bool:
    """Whether :func:`lattice_line_bands` is needed at this site spacing (None: not known yet): a band
    shifted by half a spacing lies beyond the neighbour-line search (:data:`JUMP_MAX_LAG`)."""
    return spacing_px is None or 0.5 * spacing_px > JUMP_MAX_LAG


def lattice_line_bands(image, spacing_px: float, vectors=None, *, threshold: float = LATTICE_THRESHOLD,
                       min_px: float = JUMP_MIN_PX) -> ScanJumps:
    """Bands of scan lines recorded shifted sideways, found line by line against the lattice: for
    coarse sampling, where neighbouring lines scatter too much for :func:`scan_line_jumps`.

    At 10-15 px between columns, the neighbour-line shifts of real scans scatter by 1-1.5 px, and
    a band shifted by half a spacing (5-7 px) lies beyond their search (:data:`JUMP_MAX_LAG`). Here
    each line of the central :data:`LATTICE_COLUMNS` columns is compared with the same line of the image's periodic part
    (its strongest Fourier coefficients, :data:`LATTICE_KEEP`), which a few shifted lines hardly
    change: the shift at the peak of their cross-correlation (within half a spacing), less its
    running median over :data:`LATTICE_MEDIAN_LINES` lines (slow scan distortion). Lines that
    correlate weakly -- between rows of columns, through vacuum -- are not judged
    (:data:`JUMP_MIN_CORRELATION_SE`, and half the median correlation of the judged lines). A band is a run of at most :data:`LATTICE_MAX_BAND` lines
    (unjudged lines inside it included) whose judged lines all stand out by more than ``threshold``
    robust standard deviations, ``min_px`` and :data:`LATTICE_MIN_SHIFT_NN` spacings, and agree with their median shift to within half of
    it, between judged lines that do not stand out, and not within half the median's lines of the
    frame's top or bottom; its shift is measured again on its lines together, and they must match
    the periodic part better by :data:`JUMP_MIN_CORRELATION_SE` standard errors shifted back than
    as recorded. The lines next to it that match the periodic part better shifted back, unjudged or
    shifted by half the band's shift, are the band's too (:func:`_grown_band`; a band so grown may be
    longer than :data:`LATTICE_MAX_BAND` and reach nearer the frame's edge), and two bands that meet
    are one (:func:`_joined`). With the lattice's translations ``vectors``, a band is
    confirmed against them: its lines must match the lines that show the same rows of the lattice
    past the band (by the shortest paths of its translations), better shifted back than as recorded,
    and so must each line it grew over (:func:`_echoed`; with the atom rows along the scan lines, the
    lines between two rows match the periodic part best at about half a period off, and such lines
    read as bands: 14 of 80 jump-free sheared images, none with the confirmation).

    Parameters
    ----------
    image : (H, W) array, the raw micrograph.
    spacing_px : the site spacing (px); shifts are looked for up to half of it.
    vectors : float [K, 2], optional: translations (x, y, px) that map the lattice onto itself (the
        metal lattice's shortest three); without them no band is confirmed against the lattice.
    threshold : :data:`LATTICE_THRESHOLD`, robust standard deviations.
    min_px : as for :func:`scan_line_jumps`.

    Returns
    -------
    ScanJumps
        Each band as a jump into it and one back (``flagged`` in pairs), ``noise`` the robust
        spread of the judged lines' shifts.

    Examples
    --------
    >>> from stemfast.synthetic import make_lattice
    >>> img, _ = make_lattice((160, 160), 14.0, rotation_deg=10.0, noise=0.05, seed=0)
    >>> img[70:73] = np.roll(img[70:73], 6, axis=1)  # lines 70-72 recorded 6 px to the right
    >>> bands = lattice_line_bands(img, 14.0)
    >>> bands.rows.tolist(), (np.round(bands.offsets()[[69, 70, 72, 73]]) + 0.0).tolist()
    ([70, 73], [0.0, 6.0, 6.0, 0.0])
    """
    from scipy import ndimage

    if not threshold > 0 or not min_px > 0 or not spacing_px > 0:
        raise ValueError("threshold, min_px and spacing_px must be > 0")
    a = np.asarray(_jump_columns(image))
    if a.shape[1] > LATTICE_COLUMNS:
        c0 = (a.shape[1] - LATTICE_COLUMNS) // 2
        a = a[:, c0:c0 + LATTICE_COLUMNS]
    H, W = a.shape
    lag = max(1, min(int(0.5 * spacing_px), W // 4))
    none = np.zeros(max(H - 1, 0), bool)
    if H < LATTICE_MEDIAN_LINES:
        return ScanJumps(np.full(len(none), np.nan), none, float("nan"), none)
    shift, corr, line, tpl = _template_line_shifts(a, lag)
    se = 1.0 / np.sqrt(W)  # standard error of the correlation of two noise lines
    judged = corr >= JUMP_MIN_CORRELATION_SE * se
    if judged.any():  # lines between rows of columns carry less of the lattice: half the typical line's
        judged &= corr >= 0.5 * np.median(corr[judged])
    if judged.sum() < LATTICE_MEDIAN_LINES:
        return ScanJumps(np.full(len(none), np.nan), none, float("nan"), none)
    y = np.arange(H)
    filled = np.interp(y, y[judged], shift[judged])  # unjudged lines: from their judged neighbours
    res = shift - ndimage.median_filter(filled, LATTICE_MEDIAN_LINES, mode="nearest")
    noise = float(1.4826 * np.median(np.abs(res[judged])))
    min_px = max(min_px, LATTICE_MIN_SHIFT_NN * spacing_px)
    out = judged & (np.abs(res) > max(min_px, threshold * noise))
    across = _crossing(vectors) if vectors is not None else None
    fit = _LineFit(line, tpl, res, filled - res, judged, out, lag, min_px, se, across)
    flagged = np.zeros(H - 1, bool)
    jump = np.full(H - 1, np.nan)
    bands: list[tuple[int, int, float]] = []
    k = 0
    while k < H:
        if not out[k]:
            k += 1
            continue
        # the band: flagged lines with unjudged ones between them, up to the judged, unflagged lines
        b1 = b2 = k
        j = k + 1
        while j < H and (out[j] or not judged[j]):
            if out[j]:
                b2 = j
            j += 1
        k = b2 + 1
        lo = b1 - 1
        while lo >= 0 and not judged[lo]:
            lo -= 1
        hi = b2 + 1
        while hi < H and not judged[hi]:
            hi += 1
        edge = LATTICE_MEDIAN_LINES // 2  # there the running median is one-sided
        if (lo < 0 or hi >= H or b1 < edge or b2 >= H - edge or b2 - b1 + 1 > LATTICE_MAX_BAND
                or out[lo] or out[hi]):
            continue  # at the frame's edge, too long, or not bounded by undisturbed lines
        band = _line_band(fit, b1, b2)
        if band is not None:
            k = max(k, band[1] + 1)  # (grown past its flagged lines)
            bands = _joined(fit, bands, band)
    for b1, b2, s_band in bands:
        flagged[b1 - 1] = flagged[b2] = True
        jump[b1 - 1], jump[b2] = s_band, -s_band
    return ScanJumps(jump, flagged, noise, flagged.copy())


@dataclass(frozen=True)
class _LineFit:
    """What :func:`lattice_line_bands` measured of each line: the detrended lines and the periodic
    part's (``line``, ``tpl``), the shift less its running median (``res``), that median (``base``),
    which lines were judged and which stand out (``out``); the search's reach (``lag``, px), the least
    shift of a band (``min_px``), the standard error of a noise line's correlation (``se``), the
    lattice's translations across the lines (``across``, :func:`_crossing`; None where unknown)."""

    line: np.ndarray
    tpl: np.ndarray
    res: np.ndarray
    base: np.ndarray
    judged: np.ndarray
    out: np.ndarray
    lag: int
    min_px: float
    se: float
    across: np.ndarray | None


def _line_band(fit: _LineFit, b1: int, b2: int) -> tuple[int, int, float] | None:
    """``(first line, last line, shift)`` of the band whose flagged lines are ``b1 .. b2``
    (:func:`lattice_line_bands`); None where it is none."""
    r = fit.res[b1:b2 + 1][fit.out[b1:b2 + 1]]
    s_band = float(np.median(r))
    if abs(s_band) < fit.min_px or np.any(np.abs(r - s_band) > 0.5 * abs(s_band)):
        return None
    s_band, ys, base = _band_shift(fit, b1, b2, s_band)
    # ... and the band's lines match the lattice that much better shifted back than as recorded
    gain = _mean_correlation(fit.line[ys], fit.tpl[ys], base + s_band) - _mean_correlation(fit.line[ys], fit.tpl[ys], base)
    if abs(s_band) < fit.min_px or gain < JUMP_MIN_CORRELATION_SE * fit.se:
        return None
    flagged = np.flatnonzero(fit.out[b1:b2 + 1]) + b1
    g1, g2 = _grown_band(fit, b1, b2, s_band)
    if _echoed(fit, flagged, g1, g2, s_band):
        return None
    # the lines it grew over, each confirmed in turn from the outside in (a faint sound line next to a
    # band can match the periodic part a little better shifted too: 9 such lines on 4 of 60 images)
    while g1 < b1 and _echoed(fit, np.array([g1]), g1, g2, s_band):
        g1 += 1
    while g2 > b2 and _echoed(fit, np.array([g2]), g1, g2, s_band):
        g2 -= 1
    return g1, g2, s_band


def _band_shift(fit: _LineFit, b1: int, b2: int, s0: float) -> tuple[float, np.ndarray, float]:
    """``(shift, judged lines, base)`` of the band ``b1 .. b2``: its shift measured on its judged lines
    together, around ``s0`` (a shift near half a spacing is read short at the edge of each line's
    search), against the running median ``base`` there."""
    ys = np.arange(b1, b2 + 1)[fit.judged[b1:b2 + 1]]
    base = float(np.median(fit.base[b1:b2 + 1]))
    return _band_lag(fit.line[ys], fit.tpl[ys], base + s0, fit.lag) - base, ys, base


def _joined(fit: _LineFit, bands: list, band: tuple[int, int, float]) -> list:
    """``bands`` (found so far, in order) with ``band`` added: where it reaches the last one (grown
    back over it or next to it: one band whose middle lines read short, found as two), the two are one
    band, its shift measured again over both, when their shifts agree to within half; else it starts
    after the last one's jump back (no jump line is shared: the pairs of :class:`ScanJumps`)."""
    b1, b2, s_band = band
    if bands and b1 <= bands[-1][1] + 1:
        p1, p2, ps = bands[-1]
        if abs(s_band - ps) <= 0.5 * abs(ps):
            return bands[:-1] + [(p1, max(p2, b2), _band_shift(fit, p1, max(p2, b2), ps)[0])]
        b1 = p2 + 2
        if b1 > b2:
            return bands
    return bands + [(b1, b2, s_band)]


def _grown_band(fit: _LineFit, b1: int, b2: int, s_band: float) -> tuple[int, int]:
    """The band ``b1 .. b2`` (shift ``s_band``) grown over the lines next to it that match the periodic
    part better shifted back by ``s_band`` than as recorded: unjudged lines (a line between two rows
    of columns is too faint to be judged on its own, but not to tell the two apart: a band of five
    lines, four of them between rows, was once repaired on its one judged line), and judged lines
    shifted by at least half of ``s_band`` the same way, whose shift stood out too little to be
    flagged (a band of nine lines 4 px off was read as its one line at 4.1 px)."""
    def shifted_back(y: int) -> bool:
        if fit.judged[y] and np.sign(s_band) * fit.res[y] < 0.5 * abs(s_band):
            return False
        one, t = fit.line[y:y + 1], fit.tpl[y:y + 1]
        return _mean_correlation(one, t, fit.base[y] + s_band) > _mean_correlation(one, t, fit.base[y])

    while b1 > 1 and shifted_back(b1 - 1):
        b1 -= 1
    while b2 < len(fit.res) - 2 and shifted_back(b2 + 1):
        b2 += 1
    return b1, b2


def _echoed(fit: _LineFit, ys: np.ndarray, b1: int, b2: int, s_band: float) -> bool:
    """Whether the flagged lines ``ys`` of the band ``b1 .. b2`` (grown, :func:`_grown_band`) match
    their images by the lattice's translations across the lines (``fit.across``, :func:`_image_lines`:
    on either side, past the band by the shortest paths) better as recorded than shifted back by
    ``s_band``, on average: then they are where the lattice has them, and the band is how lines at
    that place between the rows read against the periodic part (with the atom rows along the scan
    lines, the lines between two rows match it best about half a period off), not a jump. Of the
    three lines around each image (the translations, the Bragg ring's, are read to about a line), the
    one that matches line ``y`` best either way; each at the best of the shifts within
    :data:`ECHO_SLACK_PX` of each reading. False without the translations, where no image of a line
    lies inside the frame or tells anything (a flat line), and where the two readings tie."""
    if fit.across is None:
        return False
    H = len(fit.res)
    dx = np.arange(-ECHO_SLACK_PX, ECHO_SLACK_PX + 0.25, 0.5)
    votes = []
    for y in ys:
        for p, moved in _image_lines(fit.across, y, b1, b2):
            # line p shows the lattice moved by ``moved`` px against line y: no jump at -moved (less
            # the running medians' difference), a jump at that plus s_band
            best = None
            for q in range(int(np.rint(p)) - 1, int(np.rint(p)) + 2):
                if 0 <= q < H and not b1 <= q <= b2:
                    lag0 = -moved + (fit.base[y] - fit.base[q])
                    c = [max(_mean_correlation(fit.line[y:y + 1], fit.line[q:q + 1], lag0 + ds + e) for e in dx)
                         for ds in (0.0, s_band)]
                    best = c if best is None or max(c) > max(best) else best
            if best is not None and (best[0] != 0.0 or best[1] != 0.0):  # (a flat line tells nothing)
                votes.append(best[1] - best[0])
    return bool(votes) and float(np.mean(votes)) < 0.0


def _image_lines(across: np.ndarray, y: int, b1: int, b2: int) -> list[tuple[float, float]]:
    """``[(p, moved), ...]``: the lines ``p`` (fractional) above and below line ``y`` that show its rows
    of the lattice, outside the band ``b1 .. b2`` by more than a line, and how far along x they show
    them moved: ``k`` times one of the translations ``across`` [K, 2] (x, y; y >= 1). On each side,
    those of the shortest ``k |u|`` (a translation nearly along the lines needs many steps past a
    band, and its error grows with them: 6 steps of (24, 1.26) px put the image 6 px off), and any
    within :data:`ECHO_NEAR_COST` of it (two translations that differ by one along the lines are
    alike: their error differs, so both are read)."""
    out = []
    for d in (-1.0, 1.0):
        cand = []
        for ux, uy in across:
            k = 1
            while b1 - 1.5 < y + d * k * uy < b2 + 1.5:
                k += 1
            cand.append((k * np.hypot(ux, uy), y + d * k * uy, d * k * ux))
        least = min(c[0] for c in cand)
        out += [(p, moved) for cost, p, moved in cand if cost <= ECHO_NEAR_COST * least]
    return out


def _crossing(vectors) -> np.ndarray | None:
    """The finite translations among ``vectors`` [K, 2] (x, y) that cross at least one scan line, each
    as ``y > 0`` [M, 2] (None where none does): lines that far apart show the same rows of the
    lattice, moved by its ``x``.

    Examples
    --------
    >>> _crossing([[20.0, 0.0], [10.0, -17.32]]).tolist()  # a row of the lattice along the scan lines
    [[-10.0, 17.32]]
    >>> _crossing([[17.32, 10.0], [np.inf, 10.0], [-17.32, 0.5]]) is None, _crossing([[17.32, 10.0]]).tolist()
    (False, [[17.32, 10.0]])
    """
    u = np.asarray(vectors, np.float64).reshape(-1, 2)
    u = u[np.isfinite(u).all(1)]
    u = u * np.where(u[:, 1:2] < 0, -1.0, 1.0)
    u = u[u[:, 1] >= 1.0]
    return u if len(u) else None


def _template_line_shifts(a: np.ndarray, max_lag: int) -> tuple[np.ndarray, np.ndarray]:
    """Per line of ``a``: its shift against the same line of ``a``'s periodic part (the strongest
    Fourier coefficients, :data:`LATTICE_KEEP`, of those that vary along a line) at the peak of their cross-correlation within
    ``max_lag`` (parabola refined), and the correlation coefficient there."""
    H, W = a.shape
    a = np.asarray(a, np.float32)
    R = sfft.rfft(a - a.mean(), axis=1, workers=2)  # the lines' spectra, then the image's
    F = sfft.fft(R, axis=0, workers=2)
    mag = np.abs(F)
    fy = np.fft.fftfreq(H)[:, None]
    fx = np.fft.rfftfreq(W)[None, :]
    mag[np.hypot(fx, fy) < LATTICE_MIN_FREQ] = 0.0
    # fx = 0 is constant along each line: it says nothing of a sideways shift (the lines' means are
    # taken out below), and a few bright or dark lines (streaks, gain jumps) spread it over every fy,
    # where it would crowd the lattice out of the kept coefficients and leave one plane wave, whose
    # lines match at a shift that wanders with the row
    mag[:, 0] = 0.0
    keep = max(1, int(LATTICE_KEEP * H * W))
    thr = np.partition(mag.ravel(), mag.size - keep)[mag.size - keep]
    T = sfft.ifft(np.where(mag >= thr, F, 0), axis=0, workers=2)  # the periodic part's line spectra
    T[:, 0] = 0.0  # each line's mean out
    tpl = sfft.irfft(T, n=W, axis=1, workers=2)
    line = _detrended(a, max_lag)
    line -= line.mean(1, keepdims=True)
    cc = sfft.irfft(np.conj(T) * sfft.rfft(line, axis=1, workers=2), n=W, axis=1, workers=2)
    lags = np.arange(-max_lag, max_lag + 1)
    cc = cc[:, lags % W]
    with np.errstate(invalid="ignore", divide="ignore"):
        cc /= np.sqrt((line * line).sum(1) * (tpl * tpl).sum(1))[:, None]
    return (*_row_peaks(np.nan_to_num(cc), lags), line, tpl)


def _mean_correlation(line: np.ndarray, tpl: np.ndarray, lag: float) -> float:
    """Mean correlation coefficient of the lines ``line`` with the same lines of ``tpl`` moved by
    ``lag`` px (linear interpolation, circular)."""
    W = line.shape[1]
    x = (np.arange(W) - lag) % W
    out = []
    for l, t in zip(line, tpl):
        ts = np.interp(x, np.arange(W + 1), np.r_[t, t[:1]])
        ts = ts - ts.mean()
        den = np.sqrt((l * l).sum() * (ts * ts).sum())
        out.append((l * ts).sum() / den if den > 0 else 0.0)
    return float(np.mean(out)) if out else 0.0


def _band_lag(line: np.ndarray, tpl: np.ndarray, centre: float, max_lag: int) -> float:
    """Sub-pixel lag (within ``max_lag`` of ``centre``) at which the lines ``line`` best match the
    same lines of the periodic part ``tpl``, their cross-correlations summed."""
    W = line.shape[1]
    cc = sfft.irfft(np.conj(sfft.rfft(tpl, axis=1)) * sfft.rfft(line, axis=1), n=W, axis=1).sum(0)
    lags = np.arange(int(np.rint(centre)) - max_lag, int(np.rint(centre)) + max_lag + 1)
    return _peak(cc[lags % W], lags)


def _neighbour_line_shifts(img: np.ndarray, max_lag: int) -> tuple[np.ndarray, np.ndarray]:
    """Per pair of neighbouring lines: the shift of line ``y + 1`` against line ``y`` at the peak of
    their cross-correlation (parabola through the best integer lag and its two neighbours) and the
    correlation coefficient there. The cross-correlations come from one FFT along the lines
    (circular; the lines' slow trends are taken out first, so the wrap-around hardly matters)."""
    H, W = img.shape
    a = _detrended(np.asarray(img, np.float32), max_lag)  # slow trends out
    a -= a.mean(1, keepdims=True)
    var = (a * a).mean(1, dtype=np.float64)
    F = sfft.rfft(a, axis=1)
    cc = sfft.irfft(np.conj(F[:-1]) * F[1:], n=W, axis=1)
    lags = np.arange(-max_lag, max_lag + 1)
    cc = cc[:, lags % W].astype(np.float64) / W
    with np.errstate(invalid="ignore", divide="ignore"):
        cc /= np.sqrt(var[:-1] * var[1:])[:, None]
    return _row_peaks(np.nan_to_num(cc), lags)


#: at most this many neighbouring lines lost together are :func:`dead_runs` (more is a flat region)
DEAD_MAX_LINES = 3


def dead_runs(image, min_px: float) -> np.ndarray:
    """Parts of scan lines the detector did not record (a dropout: one exact value over at least
    ``min_px`` pixels of a line, where the lines above and below it vary) [K, 3] ``row, x0, x1``
    (columns ``x0 <= x < x1``). A line recorded at one value holds no signal: :func:`stemfast.find_sites`
    fills such parts from the lines above and below (:func:`filled_dead_runs`) before anything is read.
    Regions of one value over many lines (padding, zero-count vacuum) are :mod:`stemfast.nodata`'s.

    Examples
    --------
    >>> img = np.random.default_rng(0).normal(size=(8, 64))
    >>> img[3, 10:50] = 0.0                      # 40 px of line 3 read as one value
    >>> dead_runs(img, 16).tolist()
    [[3, 10, 50]]
    """
    a = np.asarray(image)
    if a.ndim != 2 or a.shape[1] < 2:
        raise ValueError(f"image must be 2-D, got shape {a.shape}")
    need = max(2, int(np.ceil(min_px)))
    same = a[:, 1:] == a[:, :-1]  # (NaN: never equal -- no-data is nodata's)
    out = []
    for y in np.flatnonzero(same.sum(1) >= need - 1):
        d = np.diff(np.r_[0, same[y].astype(np.int8), 0])
        for x0, x1 in zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)):
            if x1 - x0 + 1 < need:
                continue
            # at most DEAD_MAX_LINES such lines together, the lines around them varying there (else a
            # flat region, not lines the scan lost)
            flat = [n for n in range(y - DEAD_MAX_LINES, y + DEAD_MAX_LINES + 1) if 0 <= n < len(a)
                    and same[n, x0:x1].mean() >= 0.5]
            lo, hi = y, y
            while lo - 1 in flat:
                lo -= 1
            while hi + 1 in flat:
                hi += 1
            if hi - lo < DEAD_MAX_LINES and lo - 1 not in flat and hi + 1 not in flat:
                out.append((int(y), int(x0), int(x1) + 1))
    return np.array(out, np.int64).reshape(-1, 3)


def filled_dead_runs(image: np.ndarray, runs: np.ndarray) -> np.ndarray:
    """``image`` (a float copy) with the parts of lines ``runs`` [K, 3] (``row, x0, x1``: of
    :func:`dead_runs`) filled from the nearest lines above and below them that are not among them,
    linearly by distance (at the top or bottom edge: the one line there is).

    Examples
    --------
    >>> img = np.arange(20.0).reshape(5, 4)
    >>> img[2, 1:3] = -1.0
    >>> filled_dead_runs(img, np.array([[2, 1, 3]]))[2].tolist()
    [8.0, 9.0, 10.0, 11.0]
    """
    a = np.asarray(image)
    out = a.astype(a.dtype if a.dtype.kind == "f" else np.float32, copy=True)
    runs = np.asarray(runs, np.int64).reshape(-1, 3)
    H = out.shape[0]
    for y, x0, x1 in runs:
        lost = {int(r) for r, a0, a1 in runs if a0 < x1 and x0 < a1}  # lines lost over these columns
        lo, hi = y - 1, y + 1
        while lo in lost:
            lo -= 1
        while hi in lost:
            hi += 1
        if lo < 0 and hi >= H:
            continue
        if lo < 0 or hi >= H:
            out[y, x0:x1] = a[hi if lo < 0 else lo, x0:x1]
        else:
            w = (y - lo) / (hi - lo)
            out[y, x0:x1] = (1 - w) * a[lo, x0:x1] + w * a[hi, x0:x1]
    return out


def levelled_image(image: np.ndarray, meta: dict | None) -> np.ndarray:
    """``image`` (as :func:`stemfast.find_sites` read it) with the scan lines and parts of lines it
    found off (``meta["lattice"]["scan_lines"]``: ``flagged_rows`` with their ``offsets``,
    ``segments``) levelled and the single-pixel spikes it replaced (``meta["lattice"]["spikes"]``)
    replaced again, as the column intensities were read: what the model's patches are cut from, so
    that a streak or a hot pixel is not part of what a site looks like. A float copy; ``image`` itself
    when nothing is off.

    Examples
    --------
    >>> meta = {"lattice": {"scan_lines": {"flagged_rows": [1], "offsets": [5.0], "segments": [[2, 0, 2, -1.0]]}}}
    >>> levelled_image(np.zeros((3, 3)), meta).tolist()
    [[0.0, 0.0, 0.0], [-5.0, -5.0, -5.0], [1.0, 1.0, 0.0]]
    """
    lat = (meta or {}).get("lattice") or {}
    sl = lat.get("scan_lines") or {}
    rows, offsets, segments = sl.get("flagged_rows") or [], sl.get("offsets") or [], sl.get("segments") or []
    dead = sl.get("dead") or []
    spikes = (lat.get("spikes") or {}).get("threshold")
    if not rows and not segments and not dead and spikes is None:
        return image
    return _levelled(image, rows, offsets, segments, dead, spikes)


def _levelled(image: np.ndarray, rows, offsets, segments, dead=(), spikes: float | None = None) -> np.ndarray:
    """A float copy of ``image`` (its dtype when float, else float32) with the parts of lines ``dead``
    filled (:func:`filled_dead_runs`), the single-pixel spikes beyond the threshold ``spikes`` replaced
    (:func:`stemfast.spikes.despiked`, as :func:`stemfast.find_sites` did), the ``offsets`` of lines
    ``rows`` and those of the ``segments`` (``row, x0, x1, offset``) taken out (each offset in the
    copy's dtype)."""
    out = filled_dead_runs(image, dead)  # the float copy (nothing filled without dead parts)
    if spikes is not None:
        out = despiked(out, spikes)[0]
    for row, off in zip(rows, offsets):
        out[int(row)] -= out.dtype.type(off)
    for row, x0, x1, off in segments:
        out[int(row), int(x0):int(x1)] -= out.dtype.type(off)
    return out


def lattice_positions(xy: np.ndarray, meta: dict | None) -> np.ndarray:
    """Site positions ``xy`` [N, 2] of a site table (where the recorded image has the columns) where
    the lattice has them: in the bands of scan lines that jumped sideways (``meta["lattice"]
    ["scan_lines"]``: ``jump_rows``, ``jump_px``, ``jump_column_px``; undone by
    :func:`stemfast.sites.find_sites` before the lattice was found) moved back, so that a site's
    neighbours, their colours and the lattice steps between sites are read off the lattice -- a 4 px
    jump at 5 px spacing moves a band's sites most of a spacing. ``xy`` itself without jumps.

    Examples
    --------
    >>> meta = {"shape": [8, 8], "lattice": {"scan_lines": {"jump_rows": [3, 5], "jump_px": [2.0, -2.0],
    ...                                                     "jump_column_px": 0.01}}}
    >>> lattice_positions(np.array([[4.0, 1.0], [6.0, 4.0]]), meta).tolist()
    [[4.0, 1.0], [4.0, 4.0]]
    """
    meta = meta or {}
    sl = (meta.get("lattice") or {}).get("scan_lines") or {}
    rows = sl.get("jump_rows") or []
    if not rows or not meta.get("shape") or not len(xy):
        return xy
    off = line_offsets(rows, sl["jump_px"], int(meta["shape"][-2]))
    out = np.array(xy, dtype=np.float64)
    out[:, 0] -= recorded_shift(out[:, 1], off, float(sl.get("jump_column_px", 1.0)))
    return out
