"""Held-out-like proxies of an unlabelled real MoS2 image: amorphous-contamination and hole copies
(docs/RESULTS.md, round 5), checked with ``shared/eval/check_lattice.py`` like the original.

* ``amorph{seed}_{strength}``: three soft patches (radius 40-90 px) where the lattice is attenuated
  by 30 % and an amorphous texture -- a Gaussian random field band-limited to 0.7-1.6 site spacings,
  features at the lattice's own scale -- is added at ``strength`` x the image's 1-99 % range on a
  40 % background rise;
* ``hole``: a disc of radius 70 px at (300, 220) replaced by vacuum (the image's 1st percentile plus
  its own pixel noise); check it with ``--hole 230,150,370,290``;
* ``ys085``, ``ys115``, ``xs080``, ``shear10`` (with ``--distort``): the scan distorted further --
  the image resampled (cubic) scaled by 0.85 / 1.15 along y, 0.8 along x, or sheared by 0.1 about its
  centre (docs/RESULTS.md, round 17); check them with ``--nn`` times ``sqrt`` of the scale (the
  spacing of a regular lattice of the same cell area: 0.85, 1.15, 0.8, 1).

Usage::

    python benchmarks/mos2_proxies.py IMAGE.npy NN_PX OUT [--seeds 0 1] [--strengths 0.15 0.3] [--distort]

``NN_PX`` is the site spacing (the checker's ``--nn``). The texture patches' mask of each copy is
written beside it (``OUT/NAME.mask.npy``) to count defects made inside them.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def amorphous(img: np.ndarray, nn: float, seed: int, strength: float) -> tuple[np.ndarray, np.ndarray]:
    """``(image, patch mask)``: ``img`` with three textured contamination patches."""
    rng = np.random.default_rng(seed)
    H, W = img.shape
    yy, xx = np.mgrid[0:H, 0:W]
    lo, hi = np.percentile(img, [1, 99])
    m = np.zeros((H, W))
    for _ in range(3):
        cx, cy, r = rng.uniform(0, W), rng.uniform(0, H), rng.uniform(40, 90)
        m = np.maximum(m, 1 / (1 + np.exp((np.hypot(xx - cx, yy - cy) - r) / 6)))
    f = np.fft.fft2(rng.normal(size=(H, W)))
    ky, kx = np.meshgrid(np.fft.fftfreq(H), np.fft.fftfreq(W), indexing="ij")
    k = np.hypot(kx, ky)
    t = np.real(np.fft.ifft2(f * ((k > 1 / (1.6 * nn)) & (k < 1 / (0.7 * nn)))))
    t /= t.std()
    base = img.mean()
    out = base + (img - base) * (1 - 0.3 * m) + (hi - lo) * m * (0.4 + strength * t)
    return out.astype(np.float32), m > 0.5


def hole(img: np.ndarray, cx: float = 300.0, cy: float = 220.0, r: float = 70.0, seed: int = 0) -> np.ndarray:
    """``img`` with a disc of vacuum (1st percentile plus the image's white pixel noise)."""
    rng = np.random.default_rng(seed)
    H, W = img.shape
    yy, xx = np.mgrid[0:H, 0:W]
    d = img[1:-1, 1:-1] - 0.25 * (img[:-2, 1:-1] + img[2:, 1:-1] + img[1:-1, :-2] + img[1:-1, 2:])
    noise = 1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(1.25)
    m = 1 / (1 + np.exp((np.hypot(xx - cx, yy - cy) - r) / 2.0))
    return (img * (1 - m) + m * (np.percentile(img, 1) + noise * rng.normal(size=img.shape))).astype(np.float32)


#: the distorted copies: name -> (matrix from output (row, col) to input coordinates, area scale)
DISTORTIONS = {"ys085": ([[1 / 0.85, 0.0], [0.0, 1.0]], 0.85), "ys115": ([[1 / 1.15, 0.0], [0.0, 1.0]], 1.15),
               "xs080": ([[1.0, 0.0], [0.0, 1 / 0.8]], 0.8), "shear10": ([[1.0, 0.1], [0.0, 1.0]], 1.0)}


def distorted(img: np.ndarray, name: str) -> np.ndarray:
    """``img`` resampled (cubic, mirrored at the edges) through the :data:`DISTORTIONS` entry ``name``
    about its centre: more scan distortion than the scan has."""
    from scipy import ndimage

    M = np.asarray(DISTORTIONS[name][0], np.float64)
    c = np.array(img.shape, np.float64) / 2
    return ndimage.affine_transform(img, M, offset=c - M @ c, order=3, mode="reflect").astype(np.float32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("image", type=Path)
    ap.add_argument("nn", type=float, help="site spacing, px")
    ap.add_argument("out", type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--strengths", type=float, nargs="+", default=[0.15, 0.3])
    ap.add_argument("--distort", action="store_true", help="also the scan-distorted copies")
    a = ap.parse_args(argv)
    img = np.load(a.image).astype(np.float64)
    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.image.stem
    for seed in a.seeds:
        for st in a.strengths:
            out, mask = amorphous(img, a.nn, seed, st)
            np.save(a.out / f"{stem}_amorph{seed}_{st}.npy", out)
            np.save(a.out / f"{stem}_amorph{seed}_{st}.mask.npy", mask)
    np.save(a.out / f"{stem}_hole.npy", hole(img))
    if a.distort:
        for name in DISTORTIONS:
            np.save(a.out / f"{stem}_{name}.npy", distorted(img, name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
