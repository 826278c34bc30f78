"""The real crops of ``tests/data`` (their sources and licences: ``tests/data/README.md``) and what
the tests on them share: the authors' labels of a crop and the average precision of a ranking."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data"


def read_labels(name: str = "wse2_ti2_crop.labels.csv") -> tuple[np.ndarray, np.ndarray]:
    """``(xy [N, 2], class_name [N])`` of a labels file in ``tests/data``."""
    with open(DATA / name, newline="") as f:
        rows = list(csv.DictReader(f))
    xy = np.array([[float(r["x"]), float(r["y"])] for r in rows])
    name = np.array([r["class_name"] for r in rows])
    return xy, name


def average_precision(score: np.ndarray, positive: np.ndarray) -> float:
    """Average precision of a ranking by ``score`` (highest first) for the ``positive`` items."""
    order = np.argsort(-score, kind="stable")
    hit = positive[order]
    precision = np.cumsum(hit) / np.arange(1, len(hit) + 1)
    return float(precision[hit].sum() / max(1, hit.sum()))


def labelled_ap(img, lxy, lname, cfg, model) -> tuple[float, dict]:
    """Defect AP of the default pipeline (``cfg``, ``model``) on ``img`` against labels ``lxy, lname``
    (V_Se and Ti positive, matched within 0.4 spacings), and what ``find_sites`` measured of the
    image's noise (``meta["lattice"]["noise"]``)."""
    import warnings

    from scipy.spatial import cKDTree

    from stemfast.pipeline import analyze, prepare

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prep = prepare(img, config=cfg, patch_size=model.extra.get("patch_size"))
        table, _ = analyze(prep, model, config=cfg)
    d, j = cKDTree(lxy).query(table.xy)
    positive = (d <= 0.4 * table.meta["spacing_px"]) & np.isin(lname[j], ["V_Se", "Ti"])
    return average_precision(np.asarray(table["anomaly_score"], float), positive), prep.sites.meta["lattice"]["noise"]
