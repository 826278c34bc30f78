"""Candidate changes of the defect score that were measured and not kept (docs/RESULTS.md, "Defect
scores and classes: ablation"): each replaces one thing of the default ``local`` score and is scored
like ``benchmarks/ablation.py`` (same inputs, same cache, same truth rules, AP of ``anomaly_score``).

* ``column sigma S px``: the column intensity with an S px low-pass instead of 1 px;
* ``rows: every line levelled``: the offset of every scan line (:mod:`stemfast.scanlines`) taken
  out of the image, not only of the flagged ones;
* ``rows: gain on every line``: the gain term of the scores (median relative deviation ``(I - ref)
  / ref`` of the metal and chalcogen sites within a row of the site's row) on every site where it
  exceeds 3 standard errors, not only on the sites of flagged lines;
* ``matched, local mean patch``: the column amplitude as the least-squares scale of the mean patch
  (radius 0.45 nn, 1 px low-pass bandpass) of the site's own-sublattice references;
* ``local + shape``: ``sqrt(local^2 + (0.5 max(z_shape, 0))^2)`` with ``z_shape`` the local robust z
  of the log residual of the patch after that scale (a model-free "does not look like its
  neighbours" term);
* ``LS amplitudes S px``: the column amplitude as a joint linear least-squares fit of fixed Gaussians
  (sigma S px) at all sites (metal, chalcogen and hexagon centres) to the levelled image with its
  background slower than one spacing taken out (a Gaussian high-pass of sigma nn; "no high-pass":
  the raw levelled image) -- the "scattering cross-section" estimate of StatSTEM / atomap, solved
  through the sparse normal equations; ``Gaussian-weighted S px`` is the same without the joint
  solve (each amplitude alone: the Gaussian-weighted mean), to tell the deconvolution of the
  neighbours from the change of filter;
* ``half-column likelihood ratio``: ``d (-z - d / 2)`` (darker) or ``0.5 d (z - d / 2)`` (brighter)
  on metal and chalcogen sites, with ``d = (ref - hollow) / (2 scale)`` the local contrast of half
  a column in units of the z scale: the log likelihood ratio of "half the column is missing" (a
  V_Se) against "intact" for Gaussian noise, instead of the z itself (it ranks a given z lower
  where the local contrast is low, e.g. under contamination);
* ``z calibrated by edge distance``: each site's z divided by the robust spread of the z of its
  sublattice in its band of distance to the image edge (0-1, 1-2, 2-3 spacings) relative to the
  spread inside, where that is larger;
* ``local, interior sites only`` (labelled images): the default score with the sites outside the
  checker's labelled interior (1.5 nn inside the labelled field) ranked last -- how well the
  ranking does where the labels are judged.

Usage (same arguments as ablation.py)::

    PYTHONPATH=python python benchmarks/ablation_candidates.py --model shipped --cache /tmp/ablation \\
        $R/wse2_ti2_haadf.dm4:wse2:$L $R/wse2_ti2_maadf.dm4:wse2:$L $D/mos2_dev1.tif ...
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

sys.path.insert(0, str(Path(__file__).parent))
from ablation import _ap, _parse_input, _prepare, _print_table, _truth  # noqa: E402


def _scores(s, inten, **kw):
    from stemfast.analysis import AnalysisSettings, _anomaly, _intensity_scores

    st = AnalysisSettings(**kw)
    n = len(inten)
    xy = np.column_stack([np.asarray(s["x"], float), np.asarray(s["y"], float)])
    obs = np.asarray(s["observed"], bool)
    sc = _intensity_scores(s, xy, inten, obs, np.asarray(s["sublattice"], np.int64), np.zeros(n, np.int64), st)
    an = _anomaly(st, sc, np.zeros(n), np.zeros(n), np.zeros(n, bool))
    return np.where(obs, an, 0.0), sc


def _column(img, xy, nn, sigma):
    from stemfast.bandpass import bandpass
    from stemfast.sites import sample_image

    return sample_image(bandpass(img, noise_px=min(sigma, 0.5 * nn), background_px=nn), xy)


def _same_sublattice_vectors(s):
    from stemfast.scanlines import same_sublattice_vectors

    return same_sublattice_vectors(np.array([np.median(s["a1x"]), np.median(s["a1y"])]),
                                   np.array([np.median(s["a2x"]), np.median(s["a2y"])]))


def _gain_rows(s, inten):
    _, sc = _scores(s, inten, scan_rows=False)
    med = sc.refs.median[:, 0]
    obs = np.asarray(s["observed"], bool)
    use = obs & np.isfinite(med) & (sc.grp != 2) & (med > 0)
    rel = np.where(use, (inten - med) / np.where(med > 0, med, 1.0), 0.0)
    q = np.rint(np.asarray(s["y"], float))
    order = np.argsort(q[use], kind="stable")
    ys, rs = q[use][order], rel[use][order]
    lo, hi = np.searchsorted(ys, q - 1, "left"), np.searchsorted(ys, q + 1, "right")
    off = np.zeros(len(q))
    for i in range(len(q)):
        if hi[i] - lo[i] >= 5:
            v = rs[lo[i]:hi[i]]
            m = np.median(v)
            se = 1.2533 * 1.4826 * np.median(np.abs(v - m)) / np.sqrt(len(v))
            off[i] = np.sign(m) * max(abs(m) - 3 * se, 0.0)
    return np.where(sc.grp != 2, inten / (1 + off), inten)


def _patch_features(s, img, nn, rad_nn=0.45, k=300, tol=0.25):
    from stemfast.bandpass import bandpass

    xy = np.column_stack([np.asarray(s["x"], float), np.asarray(s["y"], float)])
    bp = bandpass(img, noise_px=1.0, background_px=nn).astype(np.float64)
    R = max(1, int(np.ceil(rad_nn * nn)))
    oy, ox = np.mgrid[-R:R + 1, -R:R + 1]
    keep = (ox ** 2 + oy ** 2) <= (rad_nn * nn) ** 2
    ox, oy = ox[keep].astype(float), oy[keep].astype(float)
    P = ndimage.map_coordinates(bp, [xy[:, 1, None] + oy[None], xy[:, 0, None] + ox[None]], order=1, mode="nearest")
    B = np.stack([np.column_stack([s["a1x"], s["a1y"]]), np.column_stack([s["a2x"], s["a2y"]])], 1).astype(float)
    inv = np.linalg.inv(B)
    _, j = cKDTree(xy).query(xy, k=min(k + 1, len(xy)))
    obs = np.asarray(s["observed"], bool)
    n = len(xy)
    alpha, res = np.zeros(n), np.zeros(n)
    for a in range(0, n, 512):
        b = min(n, a + 512)
        jj = j[a:b]
        mn = np.einsum("nkj,nji->nki", xy[jj] - xy[a:b, None], inv[a:b])
        r = np.rint(mn)
        ok = ((np.abs(mn - r).max(-1) < tol) & (jj != np.arange(a, b)[:, None]) & obs[jj]
              & ((r[..., 0] - r[..., 1]).astype(int) % 3 == 0))
        M = (P[jj] * ok[..., None]).sum(1) / np.maximum(ok.sum(1), 1)[:, None]
        al = (P[a:b] * M).sum(1) / np.maximum((M * M).sum(1), 1e-12)
        alpha[a:b] = al
        res[a:b] = ((P[a:b] - al[:, None] * M) ** 2).sum(1)
    return alpha, res


def _gaussian_stencil(img, xy, sigma, highpass_px=None, trunc=3.0):
    """``img`` (its Gaussian blur of ``highpass_px`` taken out first, unless None) and, per site, the
    pixels ``px, py`` [N, P] of a square of ``trunc * sigma`` px around it with their Gaussian
    weights ``w`` [N, P] and whether they are inside the image ``ok``."""
    img = np.asarray(img, np.float64)
    if highpass_px:
        img = img - ndimage.gaussian_filter(img, highpass_px, mode="reflect")
    H, W = img.shape
    R = int(np.ceil(trunc * sigma))
    oy, ox = (g.ravel() for g in np.mgrid[-R:R + 1, -R:R + 1])
    px = np.rint(xy[:, 0]).astype(int)[:, None] + ox[None]
    py = np.rint(xy[:, 1]).astype(int)[:, None] + oy[None]
    w = np.exp(-((px - xy[:, 0, None]) ** 2 + (py - xy[:, 1, None]) ** 2) / (2 * sigma ** 2))
    ok = (px >= 0) & (px < W) & (py >= 0) & (py < H)
    return img, px, py, w, ok


def _ls_amplitudes(img, xy, sigma, highpass_px=None, trunc=3.0, ridge=1e-6):
    """Least-squares amplitudes of Gaussians of ``sigma`` px at ``xy`` fitted jointly to ``img`` (its
    Gaussian blur of ``highpass_px`` taken out first, unless None): the sparse normal equations."""
    import scipy.sparse as sp
    import scipy.sparse.linalg as spl

    img, px, py, val, ok = _gaussian_stencil(img, xy, sigma, highpass_px, trunc)
    H, W = img.shape
    rows = np.broadcast_to(np.arange(len(xy))[:, None], px.shape)[ok]
    A = sp.csr_matrix((val[ok], (rows, (py * W + px)[ok])), shape=(len(xy), H * W))
    AtA = (A @ A.T).tocsc()
    return spl.spsolve(AtA + sp.diags(ridge * AtA.diagonal()), A @ img.ravel())


def _gaussian_weighted(img, xy, sigma, highpass_px=None, trunc=3.0):
    """Each site's Gaussian-weighted mean of ``img`` (high-passed as in :func:`_ls_amplitudes`)."""
    img, px, py, w, ok = _gaussian_stencil(img, xy, sigma, highpass_px, trunc)
    H, W = img.shape
    w = w * ok
    return (w * img[np.clip(py, 0, H - 1), np.clip(px, 0, W - 1)]).sum(1) / w.sum(1)


def _half_column_ratio(s, sc, inten):
    """Log likelihood ratio of "half the column missing" vs "intact" (module docs)."""
    from stemfast.analysis import _reference_levels

    obs = np.asarray(s["observed"], bool)
    hollow = _reference_levels(sc.refs, sc.grp, inten, obs)[:, 2]
    own, z = sc.refs.median[:, 0], sc.z_int
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = np.where(z != 0, (inten - own) / z, np.nan)
        d = 0.5 * (own - hollow) / scale
    good = np.isfinite(d) & (d > 0)
    d = np.where(good, d, np.median(d[good]))
    column = (sc.grp == 0) | (sc.grp == 1)
    an = np.where(column, np.maximum(d * (-z - 0.5 * d), 0.5 * d * (z - 0.5 * d)), 0.0)
    return np.where(obs, an, 0.0)


def _edge_calibrated(s, sc, bands=(0, 1, 2, 3)):
    """The default score with each site's z divided by its edge band's relative spread (module docs)."""
    import dataclasses

    from stemfast.analysis import AnalysisSettings, _anomaly

    xy = np.column_stack([np.asarray(s["x"], float), np.asarray(s["y"], float)])
    H, W = s.meta["shape"]
    e = np.minimum.reduce([xy[:, 0], W - 1 - xy[:, 0], xy[:, 1], H - 1 - xy[:, 1]]) / float(s.meta["spacing_px"])
    obs = np.asarray(s["observed"], bool)
    z = sc.z_int.copy()
    spread = lambda v: 1.4826 * np.median(np.abs(v - np.median(v)))  # noqa: E731
    for g in (0, 1):
        inside = spread(z[obs & (sc.grp == g) & (e >= bands[-1])])
        for lo, hi in zip(bands[:-1], bands[1:]):
            m = obs & (sc.grp == g) & (e >= lo) & (e < hi)
            if m.sum() >= 30:
                z[m] *= min(1.0, inside / spread(z[m]))
    n = len(z)
    an = _anomaly(AnalysisSettings(), dataclasses.replace(sc, z_int=z), np.zeros(n), np.zeros(n), np.zeros(n, bool))
    return np.where(obs, an, 0.0)


def _fit_candidates(s, levelled, xy, nn):
    """The least-squares and Gaussian-weighted amplitudes (module docs), each scored like the default."""
    out = {}
    for sig in (1.0, 1.3):
        out[f"LS amplitudes {sig} px"] = _scores(s, _ls_amplitudes(levelled, xy, sig, nn))[0]
        out[f"LS amplitudes {sig} px, no high-pass"] = _scores(s, _ls_amplitudes(levelled, xy, sig))[0]
        out[f"Gaussian-weighted {sig} px"] = _scores(s, _gaussian_weighted(levelled, xy, sig, nn))[0]
    return out


def _interior(labels, xy):
    """Sites inside the checker's labelled interior (1.5 nn inside the labels' field), else None."""
    import csv

    if labels is None:
        return None
    with open(labels, newline="") as fh:
        L = np.array([[float(r["x"]), float(r["y"])] for r in csv.DictReader(fh)])
    nn = float(np.median(cKDTree(L).query(L, k=4)[0][:, 1:]))
    return np.all((xy > L.min(0) + 1.5 * nn) & (xy < L.max(0) - 1.5 * nn), 1)


def candidates(d, img):
    from stemfast.scanlines import scan_line_offsets

    s = d["sites"]
    xy = np.column_stack([np.asarray(s["x"], float), np.asarray(s["y"], float)])
    nn = float(s.meta["spacing_px"])
    inten = np.asarray(s["column_intensity"], float)
    out = {"local (default)": _scores(s, inten)[0]}
    lines = scan_line_offsets(img, _same_sublattice_vectors(s))
    levelled = img - lines.correction()[:, None]    # what find_sites reads the column intensity from
    for sig in (0.7, 1.4, 1.8, 2.4):
        out[f"column sigma {sig} px"] = _scores(s, _column(levelled, xy, nn, sig))[0]
    every = img - np.nan_to_num(lines.offset)[:, None]
    out["rows: every line levelled"] = _scores(s, _column(every, xy, nn, 1.0))[0]
    no_streak = s.with_columns({"scan_streak": np.zeros(len(s), bool)})
    out["rows: gain on every line"] = _scores(no_streak, _gain_rows(no_streak, _column(levelled, xy, nn, 1.0)))[0]
    img = levelled
    alpha, res = _patch_features(s, img, nn)
    out["matched, local mean patch"] = _scores(s, alpha)[0]
    local, sc = _scores(s, inten)
    _, sc_shape = _scores(s, np.log(res + 1e-12))
    shape = np.where((sc.grp == 2) | ~np.asarray(s["observed"], bool), 0.0, np.maximum(sc_shape.z_int, 0.0))
    out["local + shape"] = np.sqrt(local ** 2 + (0.5 * shape) ** 2)
    out.update(_fit_candidates(s, levelled, xy, nn))
    out["half-column likelihood ratio"] = _half_column_ratio(s, sc, inten)
    out["z calibrated by edge distance"] = _edge_calibrated(s, sc)
    return out


def main(argv=None) -> int:
    import stemfast

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", help="PATH[:MATERIAL[:LABELS]]")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--model", default=None)
    args = ap.parse_args(argv)
    rows = []
    for arg in args.inputs:
        path, material, labels = _parse_input(arg)
        d = _prepare(path, material, args.epochs, args.cache, args.model)
        mg = stemfast.read(path)
        img = np.asarray(mg.data if mg.data.ndim == 2 else mg.data[0], np.float64)
        s = d["sites"]
        pos, n_pos, _ = _truth(path, labels, np.column_stack([np.asarray(s["x"]), np.asarray(s["y"])]))
        cand = candidates(d, img)
        row = {"image": path.stem, **{k: _ap(v, pos, n_pos) for k, v in cand.items()}}
        inside = _interior(labels, np.column_stack([np.asarray(s["x"], float), np.asarray(s["y"], float)]))
        row["local, interior sites only"] = (float("nan") if inside is None else
                                             _ap(np.where(inside, cand["local (default)"], -np.inf), pos, n_pos))
        rows.append(row)
    _print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
