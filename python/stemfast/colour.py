"""Colour images made grey: a grey picture saved as RGB, a false-colour picture, colour marks.

A micrograph is one value a pixel. A colour file of one holds it in one of three ways, and each needs
its own way back:

- **grey saved as RGB** (R = G = B): the value is any channel;
- **false colour** -- the value put through a colour map (ImageJ's Fire, matplotlib's viridis, jet
  ...): the value is the position of the pixel's colour along the map. A luminance (0.299 R + 0.587 G
  + 0.114 B) follows it only for maps whose lightness rises steadily; a rainbow map's does not (jet's
  luminance rises and falls twice), and a labelled WSe2 scan exported in jet ranked its defects at AP
  0.008 read by luminance. :func:`grey_from_colour` tries the common maps (:data:`COLOUR_MAPS`) and
  reads the position on the one whose colours the picture holds (the 99th percentile distance of its
  colours from the map at most :data:`MAP_FIT` of the range); a reversed map gives the value reversed,
  which the bright-or-dark test of the columns turns round (:mod:`stemfast.contrast`); a pixel far off
  the map (a white scale bar drawn on the picture) is set to the map's top;
- **colour marks on a grey picture** (a scale bar or text drawn in yellow, arrows): at most
  :data:`MARK_SHARE` of the pixels are not grey. They are set to the picture's white (its type's top), where
  :func:`stemfast.nodata.overlay_pixels` finds a bar and its text as a burnt-in annotation.

Anything else (an unknown map, a photograph) is read by luminance, and said to be unreliable.

Examples
--------
>>> v = np.linspace(0.0, 1.0, 64)[None, :].repeat(8, 0)
>>> grey, how = grey_from_colour(np.repeat(v[..., None], 3, axis=2))
>>> how["kind"], bool(np.allclose(grey, v))
('grey', True)
>>> import matplotlib
>>> jet = matplotlib.colormaps["jet"](v)[..., :3]
>>> grey, how = grey_from_colour(jet)
>>> how["kind"], how["map"], float(np.abs(grey - v).max()) < 0.01
('false colour', 'jet', True)
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["grey_from_colour", "colour_note", "COLOUR_MAPS", "MAP_FIT", "MARK_SHARE"]

#: the colour maps a false-colour picture is read back through: matplotlib's (by name) and ImageJ's Fire
COLOUR_MAPS = ("gray", "fire", "viridis", "inferno", "magma", "plasma", "cividis", "jet", "turbo", "hot", "afmhot",
               "gist_heat", "gnuplot", "gnuplot2", "CMRmap", "cubehelix", "nipy_spectral", "rainbow",
               "gist_rainbow", "copper", "bone", "pink", "coolwarm", "RdBu", "seismic")
#: a map fits when the 99th percentile of the picture's colours' distances from it is at most this share
#: of the range (JPEG's compression moves colours by a few levels of 255)
MAP_FIT = 0.04
#: at most this share of not-grey pixels on a grey picture are marks drawn on it, not a colour map
MARK_SHARE = 0.02
#: a pixel of a false-colour picture farther than this (share of the range) from its map is a mark drawn
#: on it, set to the top of the map
_OFF_MAP = 0.1
#: a pixel is grey when its channels differ by at most this share of the range
_GREY_TOL = 1.5 / 255
#: pixel colours the map fit is judged on (a strided subsample)
_FIT_SAMPLE = 1 << 16
# ImageJ's Fire: 32 control points (LutLoader.fire), interpolated linearly to 256 levels as ImageJ does
_FIRE = np.array([
    [0, 0, 1, 25, 49, 73, 98, 122, 146, 162, 173, 184, 195, 207, 217, 229, 240, 252, 255, 255, 255, 255, 255, 255,
     255, 255, 255, 255, 255, 255, 255, 255],
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 14, 35, 57, 79, 101, 117, 133, 147, 161, 175, 190, 205, 219, 234, 248,
     255, 255, 255, 255],
    [0, 61, 96, 130, 165, 192, 220, 227, 210, 181, 151, 122, 93, 64, 35, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 35, 98,
     160, 223, 255]], float)


def grey_from_colour(rgb) -> tuple[np.ndarray, dict]:
    """``(grey, how)``: the one value a pixel of the colour image ``rgb`` [..., 3 or 4] (alpha dropped)
    holds, float32 in ``rgb``'s units (module docs; full colour: :func:`_full_scale`), and how it was
    read: ``how["kind"]`` is ``"grey"``,
    ``"grey with colour marks"`` (``marks``: how many pixels, set to the white), ``"false colour"``
    (``map``, and ``fit``: the 99th percentile colour distance as a share of the range; the value is the
    position on the map times the range; ``marks``: pixels far off the map, set to its top) or ``"luminance"`` (no map fits).
    The pixels are converted :data:`_BLOCK` at a time: besides ``rgb`` and the result, a 16k x 16k
    picture needs a few hundred MB, not several GB."""
    a = np.asarray(rgb)
    if a.ndim < 3 or a.shape[-1] not in (3, 4):
        raise ValueError(f"rgb must be [..., 3] or [..., 4], got shape {a.shape}")
    px = a.reshape(-1, a.shape[-1])  # one row a pixel (a view of a contiguous picture)
    n = len(px)
    full = _full_scale(px)
    n_marks = sum(int(np.count_nonzero(_spread(c) > _GREY_TOL * full)) for _, c in _blocks(px))
    out = np.empty(n, np.float32)
    if n_marks <= MARK_SHARE * n:
        for s, c in _blocks(px):
            out[s] = ((c[:, 0] + c[:, 1]) + c[:, 2]) / np.float32(3)  # the channels' mean (numpy's order)
            if n_marks:  # the picture's white (its type's top), where the annotation test looks
                out[s][_spread(c) > _GREY_TOL * full] = full
        how = {"kind": "grey with colour marks", "marks": n_marks} if n_marks else {"kind": "grey"}
        return out.reshape(a.shape[:-1]), how
    sample = px[:: max(1, n // _FIT_SAMPLE), :3].astype(np.float32) / np.float32(full)
    name, fit = min((_map_fit(m, sample) for m in COLOUR_MAPS), key=lambda t: t[1])
    if fit > MAP_FIT:
        for s, c in _blocks(px):
            out[s] = c[:, 0] * np.float32(0.299) + c[:, 1] * np.float32(0.587) + c[:, 2] * np.float32(0.114)
        return out.reshape(a.shape[:-1]), {"kind": "luminance", "closest_map": name, "fit": round(float(fit), 4)}
    lut, off_map = _map_colours(name), 0
    for s, c in _blocks(px):
        value, off = _position_on_map(c / np.float32(full), lut)
        far = off > _OFF_MAP
        value[far] = 1.0  # marks drawn on the picture (a white scale bar): its white, as on a grey one
        off_map += int(np.count_nonzero(far))
        out[s] = value * np.float32(full)
    how = {"kind": "false colour", "map": name, "fit": round(float(fit), 4)}
    if off_map:
        how["marks"] = off_map
    return out.reshape(a.shape[:-1]), how


#: pixels :func:`grey_from_colour` converts at a time
_BLOCK = 1 << 20


def _blocks(px: np.ndarray):
    """``(slice, colours)``: the pixels [N, 3 or 4] ``px`` :data:`_BLOCK` at a time, their colour
    channels as float32 [n, 3]."""
    for i in range(0, len(px), _BLOCK):
        yield slice(i, i + _BLOCK), np.asarray(px[i:i + _BLOCK, :3], np.float32)


def _spread(c: np.ndarray) -> np.ndarray:
    """Largest minus smallest channel of colours ``c`` [n, 3] (what ``np.ptp(c, axis=-1)`` gives)."""
    r, g, b = c[:, 0], c[:, 1], c[:, 2]
    return np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)


def colour_note(how: Mapping) -> str:
    """What reading a colour image as grey did (``how`` of :func:`stemfast.colour.grey_from_colour`), in
    words."""
    kind = how.get("kind") if isinstance(how, Mapping) else None
    if kind == "grey":
        return "its channels equal (grey saved as colour): read as grey"
    if kind == "grey with colour marks":
        return (f"grey with {how.get('marks')} coloured pixels (marks or an annotation drawn in colour): those set to "
                "the picture's white, where a scale bar and its text are found as a burnt-in annotation")
    if kind == "false colour":
        return (f"false colour (the colour map {how.get('map')}): each pixel read back as its position on the map, "
                "256 levels of the exported range, not the detector's counts")
    fit = how.get("fit") if isinstance(how, Mapping) else None
    return ("converted to grey by luminance (0.299 R + 0.587 G + 0.114 B)"
            + (f": no known colour map fits its colours (the closest, {how.get('closest_map')}, is off by "
               f"{fit:.0%} of the range), and a colour map's luminance need not follow the intensity (a rainbow "
               "map's rises and falls): export the image in grey" if fit is not None else ""))


def _full_scale(px: np.ndarray) -> float:
    """The value of full colour in the pixels ``px`` [N, 3 or 4] of a picture: for integers the top of the bits
    its largest value needs, at least 8 (255 for 8-bit colour however dark the picture, 4095 for 12-bit
    data in a 16-bit file); for floats 1 or 255 when the values stay within (the two conventions of float
    colour), else the largest value."""
    tops = [np.fmax.reduce(c, axis=None) for _, c in _blocks(px) if c.size]  # fmax: NaN only where all are
    top = float(np.fmax.reduce(np.array(tops, np.float32))) if tops else 0.0
    if px.dtype.kind in "iu":
        return float(max(255, (1 << int(top).bit_length()) - 1))
    return 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else top


def _map_colours(name: str) -> np.ndarray:
    """float [256, 3] in [0, 1]: the colours of map ``name`` from its low end to its high end."""
    if name == "fire":
        x = np.arange(256) * (_FIRE.shape[1] / 256.0)
        i1 = np.floor(x).astype(int)
        i2 = np.minimum(i1 + 1, _FIRE.shape[1] - 1)
        f = x - i1
        return (((1 - f) * _FIRE[:, i1] + f * _FIRE[:, i2]).T / 255.0).astype(np.float32)
    import matplotlib

    return np.asarray(matplotlib.colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3], np.float32)


def _map_fit(name: str, colours: np.ndarray) -> tuple[str, float]:
    """``(name, d99)``: the 99th percentile of the distances (RGB, range 1) of ``colours`` [K, 3] from the
    nearest colours of map ``name``."""
    from scipy.spatial import cKDTree

    d, _ = cKDTree(_map_colours(name)).query(colours)
    return name, float(np.quantile(d, 0.99)) / np.sqrt(3.0)


def _position_on_map(colours: np.ndarray, lut: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(t, d)``, float32 [K]: where on the map ``lut`` [256, 3] each of ``colours`` [K, 3] lies, in [0, 1]
    -- the nearest of the map's segments, the point on it (a colour between two levels reads between
    them) -- and how far from it (RGB distance over sqrt(3))."""
    from scipy.spatial import cKDTree

    uniq, inverse = np.unique(np.round(colours * 4095).astype(np.int64) @ np.array([1 << 24, 1 << 12, 1]),
                              return_inverse=True)
    u = np.stack([(uniq >> 24) & 4095, (uniq >> 12) & 4095, uniq & 4095], 1).astype(np.float32) / 4095
    _, j = cKDTree(lut).query(u)
    best_t = j.astype(np.float32)
    best_d = np.full(len(u), np.inf, np.float32)
    for k in (j - 1, j):  # the segments either side of the nearest level
        k = np.clip(k, 0, len(lut) - 2)
        p, q = lut[k], lut[k + 1]
        seg = q - p
        t = np.clip(np.einsum("ij,ij->i", u - p, seg) / np.maximum(np.einsum("ij,ij->i", seg, seg), 1e-12), 0, 1)
        d = np.linalg.norm(u - (p + t[:, None] * seg), axis=1)
        better = d < best_d
        best_d[better], best_t[better] = d[better], (k + t)[better]
    inverse = inverse.reshape(-1)
    return ((best_t / (len(lut) - 1)).astype(np.float32)[inverse],
            (best_d / np.float32(np.sqrt(3.0)))[inverse])
