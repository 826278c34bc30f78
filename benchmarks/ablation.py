"""Ablation of the defect scores and of the classes: which score ranks defects best, and does the
rVAE earn its place?

For every image: the lattice front end, patches, an rVAE trained on that image (``--epochs``), its
encoding; then :func:`stemfast.analysis.analyze_sites` once per score of
:data:`stemfast.analysis.SCORES`, each scored against the image's ground truth:

* simulated images ``NAME.tif`` with ``NAME.truth.npz`` (``truth`` [N, 4]: x, y, sublattice, defect;
  ``meta`` JSON with ``nn_px``): a site is a true defect when it lies within 0.3 nn of a truth site
  with defect > 0 (the rules of the shared ``score.py``);
* labelled real images ``IMAGE`` with ``--labels LABELS.csv`` (x, y, class_id, class_name): within
  0.4 nn of a ``V_*`` or dopant label at least 1.5 nn inside the labelled field (the rules of
  ``score_labeled.py``).

``AP``: average precision of ``anomaly_score`` over all output sites, a truth defect with no site
counted as missed. ``class ARI``: adjusted Rand index of ``class_id`` against the true sublattice of
defect-free sites (metal / chalcogen on the labelled image). Encodings are cached in ``--cache``
(one pickle per image), so rerunning only re-scores.

Usage (the table in docs/RESULTS.md)::

    PYTHONPATH=python python benchmarks/ablation.py --epochs 6 --cache /tmp/ablation \\
        data/mos2_dev1.tif data/mos2_dev3.tif data/mos2_dev4.tif \\
        data/real/wse2_ti/wse2_ti2_haadf.dm4:wse2:data/real/wse2_ti/wse2_ti2.labels.csv

An argument ``PATH[:MATERIAL[:LABELS]]`` gives the material (default mos2) and the labels.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np

log = logging.getLogger("ablation")


def _prepare(path: Path, material: str, epochs: int, cache: Path | None, model_path: str | None = None):
    import stemfast
    from stemfast.model import RVAEConfig
    from stemfast.pipeline import PipelineConfig, _encode_streamed, prepare, train_model
    from stemfast.sites import SiteSettings

    tag = "trained" if model_path is None else Path(model_path).stem
    f = cache / f"{path.stem}.{tag}.pkl" if cache else None
    if f is not None and f.exists():
        return pickle.loads(f.read_bytes())
    mg = stemfast.read(path)
    data = mg.data if mg.data.ndim == 2 else mg.data[0]
    cfg = PipelineConfig(sites=SiteSettings(material=material), model=RVAEConfig(epochs=epochs, progress=False))
    if model_path is None:  # an rVAE trained on this image
        prep = prepare(data, config=cfg, pixel_size=mg.pixel_size, unit=mg.unit)
        model = train_model([prep], config=cfg)
    else:  # a saved model (``shipped``: the one stemfast ships), as ``stemfast batch`` uses it
        if model_path == "shipped":
            from stemfast.model.shipped import default_model

            model = default_model(cfg)
        else:
            from stemfast.batch import load_model

            model = load_model(model_path)
        patch_size = model.extra.get("patch_size") if getattr(model, "extra", None) else None
        prep = prepare(data, config=cfg, pixel_size=mg.pixel_size, unit=mg.unit, patch_size=patch_size)
    enc = _encode_streamed(model, prep.patches) if not isinstance(prep.patches, np.ndarray) else model.encode(prep.patches)
    d = {"sites": prep.sites, "enc": enc, "edge": prep.edge, "unlevelled": _unlevelled_column(data, prep.sites, cfg),
         "symmetry": int(getattr(getattr(model, "config", None), "rotation_symmetry", 3))}
    if f is not None:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(pickle.dumps(d))
    return d


def _unlevelled_column(data, sites, cfg):
    """``column_intensity`` as it was before the scan lines were levelled (``SiteSettings.scan_lines``)."""
    from stemfast.bandpass import bandpass
    from stemfast.sites import sample_image

    if "column_intensity" not in sites or not len(sites):
        return None
    s = cfg.sites
    nn = float(sites.meta["spacing_px"])
    xy = np.column_stack([np.asarray(sites["x"], np.float64), np.asarray(sites["y"], np.float64)])
    img = np.asarray(data, np.float32)
    return sample_image(bandpass(img, noise_px=min(s.column_noise_px, 0.5 * s.background_nn * nn),
                                 background_px=s.background_nn * nn), xy).astype(np.float64)


def _unlevelled(s, column):
    """The table as before scan-line levelling: the unlevelled column intensity, no ``scan_streak``."""
    return type(s)({**{k: s[k] for k in s.names if k != "scan_streak"}, "column_intensity": column}, dict(s.meta))


def _truth(path: Path, labels: Path | None, xy: np.ndarray):
    """(is_defect [N], n_defects, true class [N] or -1) for the output sites ``xy``."""
    from scipy.spatial import cKDTree

    if labels is not None:
        with open(labels, newline="") as fh:
            rows = list(csv.DictReader(fh))
        L = np.array([[float(r["x"]), float(r["y"])] for r in rows])
        name = np.array([r["class_name"] for r in rows])
        nn = float(np.median(cKDTree(L).query(L, k=4)[0][:, 1:]))
        d, j = cKDTree(L).query(xy)
        hit = d < 0.4 * nn
        # only labels in the interior of the labelled field count (1.5 nn from its edge), as in score_labeled.py
        lo, hi = L.min(0) + 1.5 * nn, L.max(0) - 1.5 * nn
        inside = np.all((L > lo) & (L < hi), 1)
        is_def_l = np.array([n.startswith("V_") or n in ("Ti", "Cr", "V", "Co", "Mn") for n in name]) & inside
        metal_l = np.array([n in ("W", "Mo") for n in name])
        chalc_l = np.array([n in ("Se2", "S2") for n in name])
        pos = hit & is_def_l[j]
        tcls = np.where(hit & metal_l[j], 0, np.where(hit & chalc_l[j], 1, -1))
        return pos, int(is_def_l.sum()), tcls
    t = np.load(path.with_suffix("").with_suffix(".truth.npz") if path.suffix else path)
    T = t["truth"]
    nn = json.loads(str(t["meta"]))["nn_px"]
    d, j = cKDTree(T[:, :2]).query(xy)
    hit = d < 0.3 * nn
    pos = hit & (T[j, 3] > 0)
    tcls = np.where(hit & (T[j, 3] == 0), T[j, 2], -1).astype(np.int64)
    return pos, int((T[:, 3] > 0).sum()), tcls


def _image_wide_bands(s):
    """The table with ``observed`` from the former border-band rule (strips against the image-wide
    level, so an illumination gradient along a side can read as a fly-back band)."""
    from stemfast.sites import EDGE_UNJUDGED_PX, border_bands

    xy = np.column_stack([np.asarray(s["x"], np.float64), np.asarray(s["y"], np.float64)])
    H, W = s.meta["shape"]
    obs, _ = border_bands(xy, np.asarray(s["intensity"], np.float64), np.asarray(s["sublattice"], np.int64),
                          (H, W), float(s.meta["spacing_px"]), side_level=False)
    obs &= np.minimum.reduce([xy[:, 0], W - 1 - xy[:, 0], xy[:, 1], H - 1 - xy[:, 1]]) >= EDGE_UNJUDGED_PX
    return s.with_columns({"observed": obs})


def _ap(score: np.ndarray, pos: np.ndarray, n_pos: int) -> float:
    """Average precision of ``score`` ranking ``pos`` first; positives without a site count as missed."""
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-score, kind="stable")
    hits = pos[order].astype(np.float64)
    prec = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((prec * hits).sum() / n_pos)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", help="PATH[:MATERIAL[:LABELS]]")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--model", default=None,
                    help="a saved model file, or 'shipped' for the shipped model (default: train one per image)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from sklearn.metrics import adjusted_rand_score

    from stemfast.analysis import SCORES, AnalysisSettings, analyze_sites

    rows = []
    for arg in args.inputs:
        path, material, labels = _parse_input(arg)
        d = _prepare(path, material, args.epochs, args.cache, args.model)
        s = d["sites"]
        xy = np.column_stack([np.asarray(s["x"]), np.asarray(s["y"])])
        pos, n_pos, tcls = _truth(path, labels, xy)
        row = {"image": path.stem}
        no_column = type(s)({k: s[k] for k in s.names if k != "column_intensity"}, dict(s.meta))
        variants = [(sc, s, {"score": sc}) for sc in SCORES]
        variants += [("before: scan lines not levelled", _unlevelled(s, d["unlevelled"]), {}),
                     ("before: border bands against the image-wide level", _image_wide_bands(s), {}),
                     ("before: both", _image_wide_bands(_unlevelled(s, d["unlevelled"])), {}),
                     ("local, brighter counted fully", s, {"brighter_weight": 1.0}),
                     ("local, hollows ranked", s, {"hollow_defects": True}),
                     ("local, not weighed against the sublattice's tail", s, {"sublattice_fdr": False}),
                     ("local, lattice-scale intensity", no_column, {}),
                     ("before: lattice-scale intensity, hollows ranked, brighter fully", no_column,
                      {"hollow_defects": True, "brighter_weight": 1.0})]
        for name, table, kw in variants:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t, summ = analyze_sites(table, d["enc"], settings=AnalysisSettings(**kw), edge=d["edge"],
                                        rotation_symmetry=d.get("symmetry", 3))
            row[name] = _ap(np.asarray(t["anomaly_score"]), pos, n_pos)
            if name == "local":
                t_local, summ_local = t, summ
        t, summ = t_local, summ_local
        m = tcls >= 0
        row["class ARI"] = float(adjusted_rand_score(tcls[m], np.asarray(t["class_id"])[m]))
        row["classes vs lattice"] = float(summ["class_sublattice_ari"])
        row["sublattice ARI"] = float(adjusted_rand_score(tcls[m], np.asarray(t["sublattice_local"])[m]))
        rows.append(row)
    _print_table(rows)
    return 0


def _parse_input(arg: str) -> tuple[Path, str, Path | None]:
    """``PATH[:MATERIAL[:LABELS]]`` -> (path, material (default mos2), labels or None)."""
    parts = arg.split(":")
    material = parts[1] if len(parts) > 1 and parts[1] else "mos2"
    return Path(parts[0]), material, Path(parts[2]) if len(parts) > 2 else None


def _print_table(rows: list[dict]) -> None:
    """One Markdown row per image: ``image`` first, every other column to 3 decimals."""
    cols = ["image", *[c for c in rows[0] if c != "image"]] if rows else []
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(r[c] if c == "image" else f"{r[c]:.3f}" for c in cols) + " |")


if __name__ == "__main__":
    sys.exit(main())
