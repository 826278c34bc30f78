"""Held-out-like proxies of an unlabelled real MoS2 image: amorphous-contamination and hole copies
(docs/RESULTS.md, round 5), checked with ``shared/eval/check_lattice.py`` like the original.

* ``amorph{seed}_{strength}``: three soft patches (radius 40-90 px) where the lattice is attenuated
  by 30 % and an amorphous texture -- a Gaussian random field band-limited to 0.7-1.6 site spacings,
  features at the lattice's own scale -- is added at ``strength`` x the image's 1-99 % range on a
  40 % background rise;
* ``hole``: a disc of radius 70 px at (300, 220) replaced by vacuum (the image's 1st percentile plus
  its own pixel noise); check it with ``--hole 230,150,370,290``.

Usage::

    python benchmarks/mos2_proxies.py IMAGE.npy NN_PX OUT [--seeds 0 1] [--strengths 0.15 0.3]

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("image", type=Path)
    ap.add_argument("nn", type=float, help="site spacing, px")
    ap.add_argument("out", type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--strengths", type=float, nargs="+", default=[0.15, 0.3])
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
