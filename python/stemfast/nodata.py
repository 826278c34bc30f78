"""Where an image holds no data: regions of one constant value.

An aligned or drift-corrected frame of a series is padded where the shifted field of view left the
frame (zeros, or the mean); a rotated or registered image has constant corners; a masked image a
constant mask. A detector records one exact value over hundreds of pixels only where no electron
arrived: vacuum at low dose on a counting detector, all zero counts (a hole in the film). Either way
there is nothing there to find, place or judge. :func:`no_data` finds such a region: blocks of
:data:`NO_DATA_BLOCK` px whose pixels are all equal, in runs of at least 2 x 2 blocks, grown to the
pixels of their values connected to them (the region's edge at pixel resolution, a rotated frame's
staircase of partial blocks included; where the data records the value too -- zero counts in the
film around a hole -- only near the blocks and where it is no scattered noise,
:func:`_region_pixels`). The site lattice places no site there
(:func:`stemfast.lattice.film_mask`), and the clipping check does not count it
(:func:`stemfast.clipping.clipped_intensities`).

A burnt-in annotation -- the scale bar and its text that an exported image carries, drawn at the
display's white -- hides the data under it too, but is thinner than a block. :func:`overlay_pixels`
finds it: pixels at the image's maximum (within :data:`OVERLAY_TOL` of its range) in straight runs of at least :data:`OVERLAY_RUN` px
along a row or a column (a bar, a box's edge, a line of text underlined or not, as long as one
stroke or bar is that long), with the other maximum-valued pixels within :data:`OVERLAY_REACH` px of
them (the text; where the image's brightest columns are clipped at the same value, the parts near them
larger than any elsewhere), closed and filled (the inside of the letters). A detector's saturated column cores
are round and no longer than a column is wide; a scan line read at one value is filled from its
neighbours before this test (:func:`stemfast.scanlines.dead_runs`), unless it is at the maximum and this
test finds it (a scale bar of one to three lines); a line at the maximum over half its length, unlike
the lines beside it, is a streak of the scan (saturated by an 8-bit export), not an annotation. An
annotation drawn in black is found the same way at the image's minimum, where an ADF image also holds
vacuum, holes, padding and dark scan lines: there only from a bar -- a filled rectangle at least 2 px
thick, off the image's edges, with the image around it well above its value (:func:`_bars`).

Examples
--------
>>> img = np.random.default_rng(0).normal(size=(64, 64))
>>> img[:, :21] = 0.0                      # a frame shifted 21 px to the right, zero-filled
>>> nd = no_data(img)
>>> m = nd.pixels()
>>> bool(m[:, :21].all()), bool(m[:, 21:].any()), round(nd.share(), 3)
(True, False, 0.328)
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import ndimage

__all__ = ["NoData", "no_data", "overlay_pixels", "regions_of", "ring_points", "NO_DATA_BLOCK", "OVERLAY_RUN",
           "OVERLAY_REACH"]

#: side (px) of the blocks the no-data test reads; a region is no data when at least 2 x 2 of them
#: (16 px) are constant
NO_DATA_BLOCK = 8
#: distinct constant values followed to the regions' edges (a zero margin and a mean-filled one...)
_MAX_VALUES = 4
#: a region is followed to the pixel at most this many blocks beyond its whole constant blocks ...
_GROW_BLOCKS = 2
#: ... when its value is one the data itself records in at least this share of its pixels
_DATA_VALUE_SHARE = 1e-3
#: shortest straight run (px) of maximum-valued pixels that is an annotation (a scale bar, a box's
#: edge, a text's strokes), not saturated columns: a column core is no longer than a column is wide,
#: under 32 px up to ~60 px site spacing (the longest run within OVERLAY_TOL of the maximum on 95 real
#: and simulated scans, 8-bit stretched copies among them: 10 px)
OVERLAY_RUN = 32
#: "at the maximum": within this share of the range (maximum - 1st percentile) below it -- a JPEG's
#: 8 x 8 blocks leave a white bar at 240-255 of 255
OVERLAY_TOL = 0.06
#: pixels the 1st percentile is read on (a strided subsample)
_OVERLAY_SAMPLE = 1 << 18
#: maximum-valued pixels within this many px (chessboard) of an annotation's long runs belong to it (its
#: text), where the image holds no more than :data:`_OVERLAY_CLEAR_SHARE` of its pixels at the maximum
#: beyond them (else its brightest columns are clipped there too: :func:`_larger_than_the_rest`)
OVERLAY_REACH = 40
_OVERLAY_CLEAR_SHARE = 1e-4
#: the annotation's mask is closed with a square of this side (px) and grown by :data:`_OVERLAY_GROW`
_OVERLAY_CLOSE = 5
_OVERLAY_GROW = 1
#: a dark annotation (at the image's minimum, where an ADF image also holds vacuum, holes and padding)
#: counts only from a bar: long runs filling at least this share of their bounding box ...
_BAR_FILL = 0.9
#: ... no thicker than this share of the image's longer side, or this many px if more, off the edges ...
_BAR_MAX_SIDE_SHARE = 1 / 64
_BAR_MAX_MIN = 16
#: ... with the pixels around it this share of the range (1st to 99th percentile) above its value
_BAR_CONTRAST = 0.25
#: a line at one end of the range over this share of its length, unlike its neighbours: a streak
_STREAK_SHARE = 0.5


class NoData(NamedTuple):
    """The regions of an image without data (:func:`no_data`).

    ``mask``: bool, the image's shape, True without data (None where the image has no such region);
    ``shape``: the image's (H, W); ``overlay``: the number of those pixels that are a burnt-in
    annotation (:func:`overlay_pixels`) and their bounding box ``(x0, y0, x1, y1)`` (inclusive), or None.
    """

    mask: np.ndarray | None
    shape: tuple[int, int]
    overlay: tuple[int, tuple[int, int, int, int]] | None = None

    def any(self) -> bool:
        return self.mask is not None

    def at(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Bool: whether the pixels ``(rows, cols)`` (int arrays of one shape, inside the image) hold
        no data."""
        rows, cols = np.broadcast_arrays(np.asarray(rows, np.int64), np.asarray(cols, np.int64))
        return np.zeros(rows.shape, bool) if self.mask is None else self.mask[rows, cols]

    def at_xy(self, xy: np.ndarray) -> np.ndarray:
        """Bool [...]: whether the pixels at points ``xy`` [..., 2] (x, y; rounded to pixels, clipped
        to the image) hold no data."""
        xy = np.asarray(xy, np.float64)
        H, W = self.shape
        return self.at(np.clip(np.rint(xy[..., 1]).astype(np.int64), 0, H - 1),
                       np.clip(np.rint(xy[..., 0]).astype(np.int64), 0, W - 1))

    def around(self, xy: np.ndarray, radius: float) -> np.ndarray:
        """Bool [N, 13]: :meth:`at_xy` at the points :func:`ring_points` gives (``xy`` [N, 2] and 12
        points ``radius`` px around each)."""
        return self.at_xy(ring_points(xy, radius))

    def pixels(self) -> np.ndarray:
        """The no-data mask at image resolution (bool, :attr:`shape`)."""
        return np.zeros(self.shape, bool) if self.mask is None else self.mask

    def share(self) -> float:
        """Share of the image's pixels without data."""
        return 0.0 if self.mask is None else float(self.mask.mean())


def no_data(image, block: int = NO_DATA_BLOCK) -> NoData:
    """The regions of ``image`` without data (module docs)."""
    a = np.asarray(image)
    if a.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {a.shape}")
    if int(block) < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    b = int(block)
    const, first = _constant_blocks(a, b)
    if const.any():
        const = ndimage.binary_opening(const, structure=np.ones((2, 2), bool))
    over = overlay_pixels(a)
    if not const.any():
        return NoData(over, a.shape, _overlay_info(over)) if over is not None else NoData(None, a.shape)
    # the regions to the pixel (_region_pixels)
    values = np.unique(first[const])[:_MAX_VALUES]
    mask = _region_pixels(a, const, b, values)
    return NoData(mask | over, a.shape, _overlay_info(over)) if over is not None else NoData(mask, a.shape)


def overlay_pixels(image) -> np.ndarray | None:
    """Bool, ``image``'s shape: a burnt-in annotation (module docs) -- the runs of at least
    :data:`OVERLAY_RUN` px along a row or a column of pixels at the image's maximum (within
    :data:`OVERLAY_TOL` of its range: a JPEG's blocks blur the white), and, where the image holds no
    other such pixel beyond :data:`OVERLAY_REACH` px of those runs, the ones within that reach (the
    text), closed, filled and grown by a pixel; None where there is none. In an image whose brightest
    columns reach the same value (an export's auto contrast clips them), the text's parts near the runs
    that are larger than every such part elsewhere (:func:`_larger_than_the_rest`). The same at the
    image's minimum from a dark bar (:func:`_bars`).

    Examples
    --------
    >>> img = np.random.default_rng(0).normal(size=(96, 96))
    >>> img[80:84, 10:60] = img.max() + 1.0     # a scale bar ...
    >>> img[70:76:2, 20:40:3] = img[80, 10]      # ... and a line of "text" above it
    >>> m = overlay_pixels(img)
    >>> bool(m[80:84, 10:60].all()), bool(m[70, 20]), bool(m[:60].any())
    (True, True, False)
    >>> overlay_pixels(np.random.default_rng(1).normal(size=(96, 96))) is None
    True
    """
    a = np.asarray(image)
    if a.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {a.shape}")
    with np.errstate(invalid="ignore"):
        top, bottom = (np.nanmax(a), np.nanmin(a)) if a.size else (np.nan, np.nan)
    if not np.isfinite(top):
        return None
    step = max(1, int(np.sqrt(a.size / _OVERLAY_SAMPLE)))
    floor, ceil = np.nanpercentile(a[::step, ::step], [1, 99])
    # (thresholds as Python floats: compared in the image's own type, not a float64 copy of it)
    bright = _drawn_at(a, a >= float(top - OVERLAY_TOL * (top - floor)), top, None)
    dark = _drawn_at(a, a <= float(bottom + OVERLAY_TOL * (ceil - bottom)), bottom, (bottom, ceil))
    if bright is None or dark is None:
        return bright if dark is None else dark
    return bright | dark


def _drawn_at(a: np.ndarray, at: np.ndarray, value: float, bars: tuple[float, float] | None) -> np.ndarray | None:
    """Bool, ``a``'s shape: an annotation drawn at ``value`` (the image's maximum or minimum; ``at``: the
    pixels within :data:`OVERLAY_TOL` of it) -- :func:`overlay_pixels` on one side of the range; None
    where there is none. A line that ``at`` covers for :data:`_STREAK_SHARE` of its length, unlike the
    lines beside it, is a streak of the scan (saturated in an 8-bit export), not an annotation. With
    ``bars`` (the range's ends, ``value`` one of them) the long runs count only where they make a bar
    (:func:`_bars`)."""
    n_row, n_col = (at.view(np.uint8).sum(axis=k, dtype=np.int32) for k in (1, 0))
    rows = np.flatnonzero((n_row >= OVERLAY_RUN) & ~_streaks(n_row, a.shape[1]))
    cols = np.flatnonzero((n_col >= OVERLAY_RUN) & ~_streaks(n_col, a.shape[0]))
    if not len(rows) and not len(cols):
        return None
    seed = np.zeros(a.shape, bool)
    for r in rows:
        seed[r] |= _long_runs(at[r])
    for c in cols:
        seed[:, c] |= _long_runs(at[:, c])
    if bars is not None and seed.any():
        seed = _bars(a, seed, bars)
    if not seed.any():
        return None
    near = ndimage.maximum_filter(seed.view(np.uint8), size=2 * OVERLAY_REACH + 1).astype(bool)
    group = None
    for top_set in (at, a == value):  # near the value; else at it exactly (a scan's brightest columns are near)
        if np.count_nonzero(top_set & ~near) <= _OVERLAY_CLEAR_SHARE * a.size:
            group = seed | (top_set & near)
            break
    if group is None:  # the brightest columns reach the value too: the text's strokes are larger than them
        group = seed | _larger_than_the_rest(at, near)
    out = np.zeros(a.shape, bool)
    for sl in ndimage.find_objects(ndimage.label(ndimage.binary_dilation(group, iterations=_OVERLAY_CLOSE))[0]):
        g = ndimage.binary_closing(np.pad(group[sl], _OVERLAY_CLOSE), structure=np.ones((_OVERLAY_CLOSE,) * 2, bool))
        out[sl] |= ndimage.binary_fill_holes(g)[_OVERLAY_CLOSE:-_OVERLAY_CLOSE, _OVERLAY_CLOSE:-_OVERLAY_CLOSE]
    return ndimage.binary_dilation(out, iterations=_OVERLAY_GROW)


def _streaks(counts: np.ndarray, length: int) -> np.ndarray:
    """Bool, ``counts``' shape: the lines (``counts`` [n]: pixels at one end of the range in each) covered
    for at least :data:`_STREAK_SHARE` of their ``length`` while neither line beside them is."""
    full = counts >= _STREAK_SHARE * length
    beside = np.zeros_like(full)
    beside[1:] |= full[:-1]
    beside[:-1] |= full[1:]
    return full & ~beside


def _bars(a: np.ndarray, seed: np.ndarray, ends: tuple[float, float]) -> np.ndarray:
    """``seed`` (bool: pixels in long runs at one end of ``a``'s range, ``ends`` = (low, high)) reduced to
    its bars: the connected parts at least 2 px and at most :data:`_BAR_MAX_SIDE_SHARE` of the image's
    longer side thick (at least :data:`_BAR_MAX_MIN` px), filling :data:`_BAR_FILL` of their bounding
    box, off the image's edges, and drawn over the image: the pixels 2 px around the box lie at least
    :data:`_BAR_CONTRAST` of the range from it (median). A dark scale bar -- not a dark scan line, dark
    vacuum beyond a flake's edge, a frame's padding or a dark stripe of the film, whose surroundings
    fade into it."""
    lab, n = ndimage.label(seed, structure=np.ones((3, 3), bool))
    H, W = seed.shape
    low, high = ends
    thick = max(_BAR_MAX_MIN, int(_BAR_MAX_SIDE_SHARE * max(H, W)))
    keep = np.zeros(n + 1, bool)
    for i, sl in enumerate(ndimage.find_objects(lab), start=1):
        (y0, y1), (x0, x1) = (sl[0].start, sl[0].stop), (sl[1].start, sl[1].stop)
        if not (2 <= min(y1 - y0, x1 - x0) <= thick and y0 >= 2 and x0 >= 2 and y1 <= H - 2 and x1 <= W - 2
                and np.count_nonzero(lab[sl] == i) >= _BAR_FILL * (y1 - y0) * (x1 - x0)):
            continue
        # 2 px out from the box on each side, inside the image by the bounds just checked
        ring = np.r_[a[y0 - 2, x0:x1], a[y1 + 1, x0:x1], a[y0:y1, x0 - 2], a[y0:y1, x1 + 1]]
        keep[i] = np.nanmedian(ring) >= low + _BAR_CONTRAST * (high - low)
    return keep[lab]


def _larger_than_the_rest(at: np.ndarray, near: np.ndarray) -> np.ndarray:
    """Bool, ``at``'s shape: the connected parts (8-connected) of ``at`` within ``near`` that are larger
    than every part of ``at`` that lies wholly outside it -- the strokes of an annotation's text among a
    clipped image's saturated column cores, which are no larger near the annotation than elsewhere."""
    lab, n = ndimage.label(at, structure=np.ones((3, 3), bool))
    size = np.bincount(lab.ravel(), minlength=n + 1)
    inside = np.zeros(n + 1, bool)
    inside[lab[near & at]] = True
    inside[0] = False
    rest = np.flatnonzero(~inside)[1:] if n else np.zeros(0, int)
    if not len(rest):
        return near & at
    keep = inside & (size > size[rest].max())
    return keep[lab]


def _long_runs(line: np.ndarray) -> np.ndarray:
    """Bool, ``line``'s shape: the pixels of ``line`` (bool, 1-D) in runs of True at least
    :data:`OVERLAY_RUN` long."""
    d = np.diff(np.r_[0, line.astype(np.int8), 0])
    out = np.zeros(line.shape, bool)
    for x0, x1 in zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)):
        if x1 - x0 >= OVERLAY_RUN:
            out[x0:x1] = True
    return out


def _overlay_info(mask: np.ndarray) -> tuple[int, tuple[int, int, int, int]]:
    """``(pixels, (x0, y0, x1, y1))`` of an annotation's mask (:attr:`NoData.overlay`)."""
    ys, xs = np.nonzero(mask)
    return int(len(xs)), (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))


def _constant_blocks(a: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray]:
    """``(const, first)``: bool [H // b, W // b], whether each whole ``b`` px block of ``a`` holds one
    value, and each block's first pixel (a view). A block is screened first on five of its pixels
    (corners and centre, strided views: no pass over the whole image); only the blocks whose five
    agree are read whole, in chunks (on a noisy image almost none: 4096^2 float in 10 ms, not 170)."""
    h, w = a.shape[0] // b, a.shape[1] // b
    v = a[: h * b, : w * b]
    first = v[0::b, 0::b]
    cand = np.ones((h, w), bool)
    for i, j in ((0, b - 1), (b - 1, 0), (b - 1, b - 1), (b // 2, b // 2)):
        cand &= v[i::b, j::b] == first
    const = np.zeros((h, w), bool)
    rows, cols = np.nonzero(cand)
    blocks = v.reshape(h, b, w, b)
    chunk = max(1, (1 << 22) // (b * b))  # blocks read at a time: no full-size temporary
    for k in range(0, len(rows), chunk):
        r, c = rows[k:k + chunk], cols[k:k + chunk]
        const[r, c] = (blocks[r, :, c, :] == first[r, c][:, None, None]).all(axis=(1, 2))
    return const, first


def _grown(blocks: np.ndarray, b: int, within: np.ndarray) -> np.ndarray:
    """The pixels of ``within`` (bool, the image's shape) connected to the ``b`` px ``blocks``."""
    h, w = blocks.shape
    seed = np.zeros(within.shape, bool)
    seed[: h * b, : w * b] = np.repeat(np.repeat(blocks, b, 0), b, 1)
    return ndimage.binary_propagation(seed & within, mask=within)


def _reach(blocks: np.ndarray, b: int, shape: tuple[int, int]) -> np.ndarray:
    """Bool, ``shape``: the pixels within :data:`_GROW_BLOCKS` blocks of the ``b`` px ``blocks``."""
    h, w = blocks.shape
    near = ndimage.binary_dilation(blocks, structure=np.ones((3, 3), bool), iterations=_GROW_BLOCKS)
    out = np.zeros(shape, bool)
    out[: h * b, : w * b] = np.repeat(np.repeat(near, b, 0), b, 1)
    if h * b < shape[0]:  # the last partial block row / column: as the blocks next to it
        out[h * b:] = out[h * b - 1]
    if w * b < shape[1]:
        out[:, w * b:] = out[:, w * b - 1: w * b]
    return out


def _region_pixels(a: np.ndarray, blocks: np.ndarray, b: int, values: np.ndarray) -> np.ndarray:
    """The regions of ``blocks`` (whole constant ``b`` px blocks of ``values``) to the pixel.

    Each value's pixels connected to the blocks are followed everywhere -- a rotated frame's corners
    to their thinnest tips -- unless the data itself records the value: when at least
    :data:`_DATA_VALUE_SHARE` of the pixels not so connected hold it, it is followed only within
    :data:`_GROW_BLOCKS` blocks of the blocks (:func:`_reach`) and where a 3 x 3 square of it covers
    the pixel (an opening: a region's edge, straight or a staircase, keeps every pixel). Vacuum
    recorded as exact zeros at low dose (a hole) is such a region, and the film around it holds
    zero-count pixels too -- over half of them at ~1 count a pixel, which join up across the image
    (64 % of a real MoS2 scan was called without data before)."""
    out = np.zeros(a.shape, bool)
    reach = None
    for v in values:
        is_v = a == v
        grown = _grown(blocks, b, is_v)
        rest = ~grown
        if rest.any() and is_v[rest].mean() >= _DATA_VALUE_SHARE:
            reach = _reach(blocks, b, a.shape) if reach is None else reach
            grown = _grown(blocks, b, ndimage.binary_opening(is_v & reach, structure=np.ones((3, 3), bool)))
        out |= grown
    return out


def ring_points(xy: np.ndarray, radius: float) -> np.ndarray:
    """Float [N, 13, 2]: each point of ``xy`` [N, 2] and 12 points ``radius`` px around it (every 30
    degrees) -- where a site's column and its surroundings are tested for data (or film).

    Examples
    --------
    >>> ring_points(np.array([[5.0, 5.0]]), 2.0)[0, [0, 1, 4]].round(6).tolist()
    [[5.0, 5.0], [7.0, 5.0], [5.0, 7.0]]
    """
    ang = np.arange(12) * (np.pi / 6)
    offs = np.concatenate([[[0.0, 0.0]], radius * np.stack([np.cos(ang), np.sin(ang)], 1)])
    return np.asarray(xy, np.float64).reshape(-1, 2)[:, None, :] + offs[None]


def regions_of(mask, block: int = NO_DATA_BLOCK) -> np.ndarray:
    """The pixels of a bool ``mask`` that form regions as :func:`no_data` finds them -- runs of at
    least 2 x 2 whole ``block`` px blocks of True, grown to the True pixels connected to them --
    rather than scattered ones (e.g. a frame's NaN padding among a few NaN pixels).

    Examples
    --------
    >>> m = np.zeros((64, 64), bool)
    >>> m[:, :20] = True   # a margin
    >>> m[40, 40] = True   # a scattered pixel
    >>> r = regions_of(m)
    >>> bool(r[:, :20].all()), bool(r[40, 40])
    (True, False)
    """
    m = np.asarray(mask, bool)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    b = int(block)
    h, w = m.shape[0] // b, m.shape[1] // b
    blocks = m[: h * b, : w * b].reshape(h, b, w, b).all(axis=(1, 3))
    if blocks.any():
        blocks = ndimage.binary_opening(blocks, structure=np.ones((2, 2), bool))
    return _grown(blocks, b, m) if blocks.any() else np.zeros(m.shape, bool)
