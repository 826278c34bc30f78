"""What the dopant and vacancy labels of a labelled WSe2 scan are, measured on stemfast's site table, and
the candidate score terms of round 5 (docs/RESULTS.md, "Round 5: dopants and the defect ranking").

For a scan recorded on two detectors at once (HAADF = ADF1, MAADF = ADF2, one label file):

* per label class (``W``, ``Se2``, ``V_Se``, ``Ti``): the local sublattice of the matched sites
  (0 = brightest colour), the median local intensity z on both detectors, the column's **contrast
  fraction** ``f = (I - hollow) / (ref - hollow)`` (its intensity above the local hexagon-centre level
  as a share of its own sublattice's; a Ti (Z = 22) in place of a W (Z = 74) should give
  ``(22 / 74) ** n`` = 0.09-0.16 for the ADF exponent n = 1.5-2), the share with a ``V_Se`` label
  next to it (< 1.25 nn), and the **relaxation** of its three nearest metal / chalcogen
  neighbours towards it (px; each neighbour's offset from the centroid of its six same-sublattice
  neighbours, projected on the direction to the site);
* every dopant label on its own;
* the AP (rules of ``score_labeled.py``; all defects / vacancies / dopants) of the default score and
  of the candidates: ``+ w relax`` = ``sqrt(local^2 + (w max(z_relax, 0))^2)`` with ``z_relax`` the
  relaxation as a local robust z (same references as the intensity); ``+ w contraction`` the same
  with the contraction of the mean distance to the three nearest neighbours (it uses the site's own
  position too); ``two detectors``: the mean of the two detectors' local z (sites matched within
  1.5 px) in the default's ``max(-z, 0.5 z)`` rule, scored on the HAADF table.

``--also IMAGE[:MATERIAL[:LABELS]]`` scores the single-image candidates on more images (the simulated
``mos2_dev*.tif`` with their truth files). Encodings come from ``benchmarks/ablation.py``'s cache.

Usage::

    PYTHONPATH=python python benchmarks/dopant_diagnostics.py --cache /tmp/abl \\
        $R/wse2_ti2_haadf.dm4 $R/wse2_ti2_maadf.dm4 $R/wse2_ti2.labels.csv --also $D/mos2_dev1.tif ...
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

sys.path.insert(0, str(Path(__file__).parent))
from ablation import _ap, _parse_input, _prepare, _truth  # noqa: E402
from ablation_candidates import _scores  # noqa: E402

DOPANTS = ("Ti", "Cr", "V", "Co", "Mn")


def _xy(s) -> np.ndarray:
    return np.column_stack([np.asarray(s["x"], np.float64), np.asarray(s["y"], np.float64)])


def _neighbours(xy: np.ndarray, grp: np.ndarray, nn: float):
    """Per site: its six same-sublattice neighbours (at ~sqrt(3) nn; -1 where fewer) and its three
    nearest metal / chalcogen sites of the other column sublattice (-1 where fewer)."""
    dd, jj = cKDTree(xy).query(xy, k=19)
    dd, jj = dd[:, 1:], jj[:, 1:]
    same = (np.abs(dd - np.sqrt(3) * nn) < 0.35 * nn) & (grp[jj] == grp[:, None])
    other = (dd < 1.3 * nn) & (grp[jj] != grp[:, None]) & (grp[jj] != 2) & (grp[:, None] != 2)
    six = np.full((len(xy), 6), -1)
    three = np.full((len(xy), 3), -1)
    for i in range(len(xy)):
        s, o = jj[i][same[i]], jj[i][other[i]]
        if len(s) == 6:
            six[i] = s
        if len(o) >= 3:
            three[i] = o[:3]
    return six, three


def geometry(xy: np.ndarray, grp: np.ndarray, nn: float) -> tuple[np.ndarray, np.ndarray]:
    """(relaxation of the three nearest neighbours towards each site, px; contraction of their mean
    distance relative to nn), NaN where a site lacks the neighbours."""
    six, three = _neighbours(xy, grp, nn)
    off = np.where((six >= 0).all(1)[:, None], xy - xy[np.maximum(six, 0)].mean(1), np.nan)
    ok = (three >= 0).all(1)
    t = np.maximum(three, 0)
    u = xy[:, None, :] - xy[t]                                   # neighbour -> site
    dist = np.linalg.norm(u, axis=2)
    relax = np.mean((off[t] * (u / np.maximum(dist, 1e-9)[..., None])).sum(2), axis=1)
    contraction = 1.0 - dist.mean(1) / nn
    return np.where(ok, relax, np.nan), np.where(ok, contraction, np.nan)


def _local(s, sc, v, observed):
    """``v`` as a robust z against each site's own-sublattice local references (as the intensity)."""
    from stemfast.analysis import _local_z
    from stemfast.references import local_references

    basis = np.stack([np.column_stack([s["a1x"], s["a1y"]]), np.column_stack([s["a2x"], s["a2y"]])],
                     axis=1).astype(np.float64)
    ok = observed & np.isfinite(v)
    vv = np.where(np.isfinite(v), v, np.nanmedian(v))
    refs = local_references(_xy(s), basis, vv, usable=ok, n_neighbors=300, node_tolerance=0.25)
    return np.where(ok, _local_z(vv, refs, sc.grp, ok), 0.0)


def image_features(d) -> dict:
    """The default score and the per-site quantities of one cached image."""
    s = d["sites"]
    xy = _xy(s)
    observed = np.asarray(s["observed"], bool)
    inten = np.asarray(s["column_intensity"], np.float64)
    local, sc = _scores(s, inten)
    med = sc.refs.median
    hollow = np.min(np.where(np.isfinite(med), med, np.inf), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = (inten - hollow) / (med[:, 0] - hollow)
    relax, contraction = geometry(xy, sc.grp, float(s.meta["spacing_px"]))
    return {"xy": xy, "observed": observed, "local": local, "sc": sc, "frac": frac, "relax": relax,
            "z_relax": _local(s, sc, relax, observed), "z_contr": _local(s, sc, contraction, observed),
            "column": (sc.grp != 2) & observed}


def candidates(f: dict) -> dict:
    """Single-image candidate scores (module docs)."""
    out = {"default": f["local"]}
    for w in (0.25, 0.5):
        for key, name in (("z_relax", "relax"), ("z_contr", "contraction")):
            out[f"+ {w} {name}"] = np.where(f["column"], np.sqrt(f["local"] ** 2 + (w * np.maximum(f[key], 0)) ** 2), 0)
    return out


def read_labels(path):
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return np.array([[float(r["x"]), float(r["y"])] for r in rows]), np.array([r["class_name"] for r in rows])


def kind_positives(labels, xy):
    """(vacancy positives, n, dopant positives, n) of the output sites ``xy``, rules of score_labeled.py."""
    L, name = read_labels(labels)
    nn = float(np.median(cKDTree(L).query(L, k=4)[0][:, 1:]))
    inside = np.all((L > L.min(0) + 1.5 * nn) & (L < L.max(0) - 1.5 * nn), 1)
    d, j = cKDTree(L).query(xy)
    out = []
    for sel in (name == "V_Se", np.isin(name, DOPANTS)):
        out += [(d < 0.4 * nn) & (sel & inside)[j], int((sel & inside).sum())]
    return tuple(out)


def label_table(labels, fh: dict, fm: dict) -> None:
    """Per label class and per dopant label: the quantities of the module docs, both detectors."""
    L, name = read_labels(labels)
    dh, jh = cKDTree(fh["xy"]).query(L)
    dm, jm = cKDTree(fm["xy"]).query(L)
    nn = float(np.median(cKDTree(L).query(L, k=4)[0][:, 1:]))
    vse = cKDTree(L[name == "V_Se"])
    adj = np.array([len(vse.query_ball_point(q, 1.25 * nn)) for q in L]) > (name == "V_Se")  # not itself
    inside = np.all((L > L.min(0) + 1.5 * nn) & (L < L.max(0) - 1.5 * nn), 1) & (dh < 0.4 * nn) & (dm < 0.4 * nn)
    print("| label | n (interior) | sublattice (HAADF; MAADF) | z HAADF | z MAADF | contrast fraction HAADF | MAADF "
          "| next to a V_Se | neighbours' relaxation towards it, px (HAADF) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for nm in ("W", "Se2", "V_Se", *[x for x in DOPANTS if (name == x).any()]):
        m = (name == nm) & inside
        if not m.any():
            continue
        sh = np.bincount(fh["sc"].grp[jh[m]], minlength=3)
        sm = np.bincount(fm["sc"].grp[jm[m]], minlength=3)
        med = lambda f, j, k: np.nanmedian(f[k][j[m]])  # noqa: E731
        print(f"| {nm} | {m.sum()} | {sh[:3].tolist()}; {sm[:3].tolist()} | {med(fh, jh, 'z'):.2f} | "
              f"{med(fm, jm, 'z'):.2f} | {med(fh, jh, 'frac'):.2f} | {med(fm, jm, 'frac'):.2f} | {adj[m].mean():.2f} | "
              f"{med(fh, jh, 'relax'):+.3f} |")
    for i in np.flatnonzero(np.isin(name, DOPANTS)):
        print(f"  {name[i]} at ({L[i, 0]:.0f}, {L[i, 1]:.0f}): z HAADF {fh['z'][jh[i]]:.2f}, MAADF {fm['z'][jm[i]]:.2f}; "
              f"contrast fraction {fh['frac'][jh[i]]:.2f} / {fm['frac'][jm[i]]:.2f}; next to a V_Se: {bool(adj[i])}; "
              f"rank of the default score (HAADF) {int(fh['rank'][jh[i]])}")


def _ap_row(image: str, scores: dict, pos, n_pos, kinds=None) -> None:
    for k, v in scores.items():
        cell = f"{_ap(v, pos, n_pos):.3f}"
        if kinds is not None:
            cell += f" ({_ap(v, kinds[0], kinds[1]):.3f} / {_ap(v, kinds[2], kinds[3]):.3f})"
        print(f"| {image} | {k} | {cell} |")


def _prepared(arg: str, cache: Path, model: str):
    path, material, labels = _parse_input(arg)
    d = _prepare(path, material, 30, cache, model)
    f = image_features(d)
    f["z"] = f["sc"].z_int
    f["rank"] = np.argsort(np.argsort(-f["local"], kind="stable"), kind="stable")
    pos, n_pos, _ = _truth(path, labels, f["xy"])
    return path, labels, f, pos, n_pos


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("haadf")
    ap.add_argument("maadf")
    ap.add_argument("labels")
    ap.add_argument("--also", nargs="*", default=[])
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--model", default="shipped")
    args = ap.parse_args(argv)
    ph, _, fh, pos_h, n_h = _prepared(f"{args.haadf}:wse2:{args.labels}", args.cache, args.model)
    pm, _, fm, pos_m, n_m = _prepared(f"{args.maadf}:wse2:{args.labels}", args.cache, args.model)
    label_table(args.labels, fh, fm)
    print("\n| image | score | AP (vacancies / dopants) |\n|---|---|---|")
    for p, f, pos, n in ((ph, fh, pos_h, n_h), (pm, fm, pos_m, n_m)):
        _ap_row(p.stem, candidates(f), pos, n, kind_positives(args.labels, f["xy"]))
    d, j = cKDTree(fm["xy"]).query(fh["xy"])
    zj = 0.5 * (fh["z"] + np.where(d < 1.5, fm["z"][j], fh["z"]))
    joint = np.where(fh["column"], np.maximum(-zj, 0.5 * zj), 0.0)
    _ap_row(ph.stem, {"two detectors (mean z)": joint}, pos_h, n_h, kind_positives(args.labels, fh["xy"]))
    for arg in args.also:
        p, labels, f, pos, n = _prepared(arg, args.cache, args.model)
        _ap_row(p.stem, candidates(f), pos, n, None if labels is None else kind_positives(labels, f["xy"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
