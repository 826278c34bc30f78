"""Single-pixel spikes: hot or dead detector pixels, X-ray and electronic spikes.

A scanning microscope samples its probe with more than one pixel wherever the columns are resolved
(stemfast needs at least 5 px between sites), so a pixel of a recorded image does not rise above any
of its neighbours by more than the image's structural range, nor drop below one by more, beyond its
noise. A pixel that rises that far above all its eight neighbours but one (which may be a second
spike) is a spike, or drops that far below them. Left in, a spike on a chalcogen column reads as
a heavy substitution and ranks among the first defect candidates, a dead pixel on one as a vacancy
(five spikes in a 512 x 512 scan cost the labelled WSe2 MAADF scan up to 0.024 defect AP, fifty
about 0.05, docs/RESULTS.md round 34).

:func:`find_spikes` marks them and :func:`despiked` replaces each by the median of the other pixels
of its 3 x 3 neighbourhood; :func:`stemfast.find_sites` does so before anything else reads the image
(``SiteSettings.despike``) and says how many in ``meta["lattice"]["spikes"]``.

- The structural range is read from the image's ``SPIKE_QUANTILE`` and ``1 - SPIKE_QUANTILE``
  quantiles, so spikes up to that share of the pixels do not widen it. On ~50 real and simulated
  scans the largest excess of any pixel over its eight neighbours stays 0.3 noise standard
  deviations or more below that range; :data:`SPIKE_NOISE_Z` of them are added.
- The test is symmetric (bright and dark alike): an image and its inverse (a bright-field image read
  with its columns bright) lose the same pixels.
- Two spikes side by side are found (each is judged against its second largest neighbour, or
  second smallest); three or more in a clump are not, nor a spike on a bright column that rises
  above it by less than the range.

Examples
--------
>>> import numpy as np
>>> from stemfast.synthetic import make_lattice
>>> img, _ = make_lattice((96, 96), 8.0, noise=0.05, seed=0)
>>> hot = img.copy(); hot[40, 40] = 3 * img.max(); hot[10, 70] = 3 * img.min() - 2 * img.max()
>>> int(find_spikes(img).sum()), np.argwhere(find_spikes(hot)).tolist()
(0, [[10, 70], [40, 40]])
>>> fixed, n, _ = despiked(hot)
>>> n, bool(np.abs(fixed - img).max() < 0.5 * (img.max() - img.min()))
(2, True)
"""
from __future__ import annotations

import numpy as np

__all__ = ["SPIKE_NOISE_Z", "SPIKE_QUANTILE", "SPIKE_WARN_SHARE", "SpikeWarning", "find_spikes", "despiked",
           "spike_threshold", "spike_meta"]

#: noise standard deviations a spike must exceed the structural range by
SPIKE_NOISE_Z = 4.0
#: the structural range is the image's ``1 - q`` quantile minus its ``q`` quantile
SPIKE_QUANTILE = 5e-3
#: share of the pixels replaced above which the summary warns: clumps of three or more spikes and
#: spikes on bright columns, which are not found, are then likely among them too
SPIKE_WARN_SHARE = 1e-3
#: the quantiles are read on a regular subsample of at most about this many pixels
_QUANTILE_PIXELS = 1 << 20
#: the noise is read on the differences along whole rows, at most about this many
_NOISE_PIXELS = 1 << 18
#: the steps along the rows are read in strips of about this many pixels (:func:`_spikes`)
_STRIP_PIXELS = 1 << 20


class SpikeWarning(UserWarning):
    """Many single-pixel spikes were replaced: some that are not found are likely left."""


_OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


def _as_float(image) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {a.shape}")
    a = a if a.dtype in (np.float32, np.float64) else a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ValueError("image must be finite")
    return a


def spike_threshold(image: np.ndarray) -> float:
    """How far a pixel of a finite 2-D ``image`` must rise above (or drop below) its neighbours to be a
    spike: the structural range (the image's ``1 - SPIKE_QUANTILE`` minus its
    ``SPIKE_QUANTILE`` quantile) plus :data:`SPIKE_NOISE_Z` times the pixel noise (the MAD of the
    differences of neighbouring pixels along the rows over sqrt 2: with the structure in it, an upper
    bound). inf for an image smaller than 3 x 3 or a constant one.

    Examples
    --------
    >>> spike_threshold(np.zeros((8, 8)))
    inf
    """
    return _threshold(_as_float(image))


def _threshold(a: np.ndarray) -> float:
    """:func:`spike_threshold` of a finite 2-D float array (checked by the caller)."""
    if min(a.shape) < 3:
        return float("inf")
    step = max(1, int(np.sqrt(a.size / _QUANTILE_PIXELS)))
    q_lo, q_hi = np.quantile(a[::step, ::step], [SPIKE_QUANTILE, 1.0 - SPIKE_QUANTILE])
    d = np.diff(a[::max(1, int(a.size / _NOISE_PIXELS))], axis=1).ravel()
    noise = 1.4826 * float(np.median(np.abs(d - np.median(d)))) / np.sqrt(2.0)
    t = float(q_hi - q_lo) + SPIKE_NOISE_Z * noise
    return t if t > 0 else float("inf")


def _mirrored(i: np.ndarray, n: int) -> np.ndarray:
    """Indices ``i`` (at most one step outside ``0 .. n - 1``) mirrored into it about the edge pixel."""
    i = np.abs(i)
    return np.where(i > n - 1, 2 * (n - 1) - i, i)


def _spikes(a: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the pixels of ``a`` more than ``t`` above the second largest of their eight
    neighbours, or below the second smallest (so that two spikes side by side are found too)."""
    H, W = a.shape
    # a spike differs by more than t from all its neighbours but one, so from one of the two next to it
    # along its row: only the pixels on either side of such a step are checked against all eight
    # (the steps read in strips of rows: no image-sized difference)
    rows = max(1, _STRIP_PIXELS // W)
    steps = []
    for r0 in range(0, H, rows):
        d = a[r0:r0 + rows, 1:] - a[r0:r0 + rows, :-1]
        np.abs(d, out=d)
        y, x = np.nonzero(d > t)
        steps.append((y + r0) * W + x)
    at = np.concatenate(steps)
    flat = np.unique(np.concatenate([at, at + 1]))
    ys, xs = flat // W, flat % W
    v = a[ys, xs]
    # a border pixel's neighbours outside the image: their mirror images inside
    nb = np.sort(np.stack([a[_mirrored(ys + dy, H), _mirrored(xs + dx, W)] for dy, dx in _OFFSETS], axis=1), axis=1)
    spike = (v - nb[:, -2] > t) | (nb[:, 1] - v > t)
    return ys[spike], xs[spike]


def find_spikes(image: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Bool mask of the single-pixel spikes of a finite 2-D ``image`` (module docs): the pixels more
    than ``threshold`` (default :func:`spike_threshold`) above the second largest or below the second
    smallest of their eight neighbours (at the border, the neighbours' mirror images inside the
    image): a spike alone or beside one other."""
    a = _as_float(image)
    t = _threshold(a) if threshold is None else float(threshold)
    mask = np.zeros(a.shape, bool)
    if np.isfinite(t) and min(a.shape) >= 3:
        mask[_spikes(a, t)] = True
    return mask


def despiked(image: np.ndarray, threshold: float | None = None) -> tuple[np.ndarray, int, float]:
    """``(image, n, threshold)``: a finite 2-D ``image`` with its spikes (:func:`find_spikes`)
    replaced by the median of the other pixels of their 3 x 3 neighbourhood that are no spikes (a
    copy, in the image's float dtype, else float64; ``image`` itself when there are none), how many
    there were, and the threshold used (:func:`spike_threshold` unless given)."""
    a = _as_float(image)
    t = _threshold(a) if threshold is None else float(threshold)
    if not np.isfinite(t) or min(a.shape) < 3:
        return image, 0, t
    ys, xs = _spikes(a, t)
    n = len(ys)
    if not n:
        return image, 0, t
    H, W = a.shape
    spike_at = np.sort(ys * W + xs)  # (flat indices: no image-sized mask)
    win = np.full((len(ys), 8), np.nan)
    for k, (dy, dx) in enumerate(_OFFSETS):
        yy, xx = ys + dy, xs + dx
        inside = (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
        yy, xx = np.clip(yy, 0, H - 1), np.clip(xx, 0, W - 1)
        win[:, k] = np.where(inside & ~np.isin(yy * W + xx, spike_at), a[yy, xx], np.nan)
    out = a.copy()
    ok = np.isfinite(win).any(axis=1)  # a spike with only spikes around it stays as it is
    out[ys[ok], xs[ok]] = np.nanmedian(win[ok], axis=1)
    return out, n, t


def spike_meta(n: int, size: int, threshold: float) -> dict:
    """``meta["lattice"]["spikes"]`` of :func:`stemfast.find_sites` for ``n`` spikes replaced in an
    image of ``size`` pixels: the count, their share, the threshold (what
    :func:`stemfast.scanlines.levelled_image` replaces them with again) and what was done; a
    ``warning`` from :data:`SPIKE_WARN_SHARE` of the pixels on.

    Examples
    --------
    >>> m = spike_meta(3, 512 * 512, 1.5)
    >>> m["n"], m["share"], "warning" in m
    (3, 1.1e-05, False)
    """
    share = n / max(size, 1)
    out = {"n": int(n), "share": round(share, 6), "threshold": float(threshold),
           "note": f"{n} single-pixel spike{'s' if n != 1 else ''} (hot or dead pixels, X-ray or electronic spikes) "
                   "were replaced by the median of their neighbours"}
    if share >= SPIKE_WARN_SHARE:
        out["warning"] = (f"{n} single-pixel spikes ({share:.2%} of the pixels: hot or dead pixels, X-ray or "
                          "electronic spikes) were replaced by the median of their neighbours; at this many, clumps of "
                          "three or more spikes and spikes on bright columns, which are not found, are likely left: "
                          "check the first defect candidates against the image")
    return out
