"""What a perfect site table of a scan-distorted 2H image scores on the shared checker's spacing test.

Independent of stemfast (NumPy and SciPy only): the six spots of the metal lattice's first Bragg
ring are read off the image's windowed power spectrum (the strongest pixel in each 60 degree sector
of an annulus around the ring a site spacing ``--nn`` implies, centroid-refined); two spots 60
degrees apart are the metal reciprocal basis, whose dual is the real-space metal lattice. The site
lattice (metal + chalcogen + hollow nodes, the metal lattice and its two cosets at thirds) built from
it is what a site table that put every site exactly on its node would hold. Printed: the spots'
plane spacings, that lattice's six nearest-neighbour distances, their median (the checker's "nn"),
and the area-equivalent spacing (the spacing of a regular lattice with the same site density, the
checker's "density" test).

    python benchmarks/fft_lattice_geometry.py ../shared/data/real/mos2_vdoped/mos2_exp-001-5.npy --nn 14.08
"""
from __future__ import annotations

import argparse

import numpy as np
from scipy.spatial import cKDTree


def first_ring_spots(img: np.ndarray, nn: float) -> np.ndarray:
    """The six first-ring spots [6, 2] (cycles / px, x and y), sorted by angle."""
    img = np.asarray(img, np.float64)
    h, w = img.shape
    win = np.outer(np.hanning(h), np.hanning(w))
    P = np.abs(np.fft.fftshift(np.fft.fft2((img - img.mean()) * win))) ** 2
    fy = (np.arange(h) - h // 2)[:, None] / h
    fx = (np.arange(w) - w // 2)[None, :] / w
    f = np.hypot(fx, fy)
    ang = np.degrees(np.arctan2(fy, fx)) % 360
    f0 = 1.0 / (1.5 * nn)  # the {100} ring: d = 1.5 site spacings
    ring = np.abs(f - f0) <= 0.25 * f0
    a0 = ang[ring][np.argmax(P[ring])]
    spots = []
    for k in range(6):
        sector = ring & (np.abs((ang - a0 - 60 * k + 30) % 360 - 30) <= 30)
        iy, ix = np.unravel_index(np.argmax(np.where(sector, P, -np.inf)), P.shape)
        box = P[iy - 1:iy + 2, ix - 1:ix + 2]
        yy, xx = np.mgrid[-1:2, -1:2]
        spots.append([(ix + (box * xx).sum() / box.sum() - w // 2) / w,
                      (iy + (box * yy).sum() / box.sum() - h // 2) / h])
    spots = np.array(spots)
    return spots[np.argsort(np.arctan2(spots[:, 1], spots[:, 0]))]


def site_lattice_geometry(spots: np.ndarray) -> dict:
    """Six nearest-neighbour distances, their median and the area-equivalent spacing of the site
    lattice whose metal lattice has the first-ring ``spots``."""
    G = spots[[0, 1]]  # two consecutive spots, 60 degrees apart
    A = np.linalg.inv(G).T  # rows: real-space metal vectors dual to them
    i, j = np.mgrid[-12:13, -12:13]
    nodes = []
    for s in ((0.0, 0.0), (1 / 3, 2 / 3), (2 / 3, 1 / 3)):  # the metal lattice and its two cosets
        nodes.append(np.stack([i.ravel() + s[0], j.ravel() + s[1]], 1) @ A)
    P = np.concatenate(nodes)
    d, _ = cKDTree(P).query(np.zeros((1, 2)), k=7)
    six = np.sort(d[0, 1:])
    area_per_site = abs(np.linalg.det(A)) / 3.0
    return {"six": six, "median": float(np.median(six)),
            "area_equivalent": float(np.sqrt(area_per_site / (np.sqrt(3) / 2)))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("image", help=".npy image")
    ap.add_argument("--nn", type=float, required=True, help="the checker's site spacing (px)")
    a = ap.parse_args()
    img = np.load(a.image)
    spots = first_ring_spots(img, a.nn)
    for s in spots:
        print("spot at %6.1f deg: plane spacing %.2f px" % (np.degrees(np.arctan2(s[1], s[0])), 1 / np.hypot(*s)))
    geo = site_lattice_geometry(spots)
    print("perfect site lattice: six nearest %s px" % np.round(geo["six"], 2))
    print("median of six %.2f px (%+.1f %% of --nn %.2f); area-equivalent spacing %.2f px (%+.1f %%)"
          % (geo["median"], 100 * (geo["median"] / a.nn - 1), a.nn, geo["area_equivalent"],
             100 * (geo["area_equivalent"] / a.nn - 1)))


if __name__ == "__main__":
    main()
