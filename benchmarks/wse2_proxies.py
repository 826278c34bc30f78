"""Held-out-like proxies of a labelled real image: transformed and glitched copies whose labels move
with the transform (docs/RESULTS.md, "Held-out proxies").

Writes ``OUT/NAME.npy`` and ``OUT/NAME.labels.csv`` for each proxy:

* ``rot90``, ``flip``: the image rotated by 90 deg / flipped left-right;
* ``rowjump{seed}``: 3 bands of 5-40 scan lines shifted sideways by 1-3 px (whole pixels; the
  labels on those lines shift with them);
* ``streak{seed}``: 6 single scan lines offset by +-30-80 % of the image's 1-99 % range;
* ``contam{seed}``: 3 smooth blobs (Gaussian, 30-80 px radius, up to 50 % of the range) carrying a
  texture at 3 px of 20 % of the range (standard deviation) added (contamination on the film).

Usage::

    PYTHONPATH=python python benchmarks/wse2_proxies.py IMAGE LABELS.csv|none OUT [--seeds 0 1]

then score them like the original, e.g. ``benchmarks/ablation.py OUT/NAME.npy:wse2:OUT/NAME.labels.csv``.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage


def _read_labels(path: Path) -> tuple[np.ndarray, list[dict]]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return np.array([[float(r["x"]), float(r["y"])] for r in rows]), rows


def _write_labels(path: Path, xy: np.ndarray, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["x", "y", "class_id", "class_name"])
        for (x, y), r in zip(xy, rows):
            w.writerow([f"{x:.3f}", f"{y:.3f}", r["class_id"], r["class_name"]])


def rowjumps(img: np.ndarray, xy: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """3 bands of 5-40 lines shifted by 1-3 whole px (wrapped around); the labels on them move along."""
    out, lab = img.copy(), xy.copy()
    H = img.shape[0]
    for _ in range(3):
        h = int(rng.integers(5, 41))
        y0 = int(rng.integers(0, H - h))
        s = int(rng.choice([-1, 1]) * rng.integers(1, 4))
        out[y0:y0 + h] = np.roll(out[y0:y0 + h], s, axis=1)
        on = (np.rint(xy[:, 1]) >= y0) & (np.rint(xy[:, 1]) < y0 + h)
        lab[on, 0] = (lab[on, 0] + s) % img.shape[1]  # np.roll wraps the line around
    return out, lab


def streaks(img: np.ndarray, rng) -> np.ndarray:
    """6 single scan lines offset by +-30-80 % of the 1-99 % range."""
    out = img.copy()
    lo, hi = np.percentile(img, [1, 99])
    for _ in range(6):
        y = int(rng.integers(0, img.shape[0]))
        out[y] += float(rng.choice([-1, 1]) * rng.uniform(0.3, 0.8) * (hi - lo))
    return out


def contamination(img: np.ndarray, rng) -> np.ndarray:
    """3 smooth blobs (30-80 px radius, up to 50 % of the range) with a texture at 3 px (sd 20 % of the range)."""
    H, W = img.shape
    lo, hi = np.percentile(img, [1, 99])
    yy, xx = np.mgrid[:H, :W]
    blob = np.zeros((H, W))
    for _ in range(3):
        r = rng.uniform(30, 80)
        cx, cy = rng.uniform(0, W), rng.uniform(0, H)
        blob += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (r / 2) ** 2))
    tex = ndimage.gaussian_filter(rng.standard_normal((H, W)), 3.0)
    tex /= tex.std()
    return img + (hi - lo) * np.clip(blob, 0, 1) * (0.5 + 0.2 * tex)


def make_proxies(img: np.ndarray, xy: np.ndarray, seeds=(0, 1)) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{name: (image, label positions)}`` (positions x, y in px)."""
    H, W = img.shape
    out = {"rot90": (np.rot90(img).copy(), np.column_stack([xy[:, 1], W - 1 - xy[:, 0]])),
           "flip": (img[:, ::-1].copy(), np.column_stack([W - 1 - xy[:, 0], xy[:, 1]]))}
    for s in seeds:
        out[f"rowjump{s}"] = rowjumps(img, xy, np.random.default_rng(100 + s))
        out[f"streak{s}"] = (streaks(img, np.random.default_rng(200 + s)), xy.copy())
        out[f"contam{s}"] = (contamination(img, np.random.default_rng(300 + s)), xy.copy())
    return out


def main(argv=None) -> int:
    import stemfast

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("image", type=Path)
    ap.add_argument("labels", type=Path, help="LABELS.csv, or 'none' for an unlabelled image (check its copies "
                    "with check_lattice.py)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args(argv)
    mg = stemfast.read(args.image)
    img = np.asarray(mg.data if mg.data.ndim == 2 else mg.data[0], np.float64)
    labelled = str(args.labels) != "none"
    xy, rows = _read_labels(args.labels) if labelled else (np.zeros((0, 2)), [])
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (im, lab) in make_proxies(img, xy, args.seeds).items():
        stem = f"{args.image.stem}_{name}"
        np.save(args.out / f"{stem}.npy", im.astype(np.float32))
        if labelled:
            _write_labels(args.out / f"{stem}.labels.csv", lab, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
