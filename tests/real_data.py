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
