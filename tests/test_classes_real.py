"""The whole pipeline with the shipped model on crops of real micrographs (tests/data, see its
README): the learned classes follow the 2H sublattices, with default settings.

The checks are the shared checkers' (``check_lattice.py --classes``, ``score_labeled.py``): on the
labelled WSe2 crop the classes agree with the authors' metal / chalcogen labels (ARI >= 0.95); on
the MoS2 crops, which have no labels, every interior site's six nearest neighbours belong to the two
other classes (alternation >= 0.95) and the three classes are about equally many (each >= 28%).
"""
from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import cKDTree
from sklearn.metrics import adjusted_rand_score

from stemfast import PipelineConfig, run_image
from stemfast.sites import SiteSettings

DATA = Path(__file__).parent / "data"


def _run(name: str, material: str = "mos2"):
    img = np.load(DATA / name).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table, summary, _ = run_image(img, config=PipelineConfig(sites=SiteSettings(material=material)))
    return img, table, summary


def test_wse2_crop_classes_match_the_authors_metal_and_chalcogen_labels():
    img, t, summary = _run("wse2_ti2_haadf_crop.npy", "wse2")
    with open(DATA / "wse2_ti2_crop.labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    lxy = np.array([[float(r["x"]), float(r["y"])] for r in rows])
    metal = np.array([r["class_name"] in ("W", "Ti") for r in rows])
    d, j = cKDTree(t.xy).query(lxy)
    # the crop cuts the columns at its edge: labelled sites within a spacing (5 px) of it are left out
    inside = (lxy.min(1) >= 5) & (lxy.max(1) <= img.shape[0] - 6)
    metal, d, j = metal[inside], d[inside], j[inside]
    ok = d < 2.0
    ari = adjusted_rand_score(metal[ok], np.asarray(t["class_id"])[j[ok]])
    assert ok.mean() > 0.99
    assert ari >= 0.95, ari
    assert summary["rotation_latent"] == "used"
    assert summary["class_sublattice_ari"] >= 0.9 and "class_warning" not in summary
    # the classes carry the material's names: no MoS2 names on WSe2
    assert {v["sublattice"] for v in summary["class_sublattice"].values()} == {"W", "Se2", "hollow"}


@pytest.mark.parametrize("name", ["mos2_exp-000-2_crop.npy", "mos2_exp-002-5_crop.npy"])
def test_mos2_crop_classes_alternate_like_the_sublattices(name):
    img, t, summary = _run(name)
    xy, cls = t.xy, np.asarray(t["class_id"])
    d, idx = cKDTree(xy).query(xy, k=7)
    nn = float(np.median(d[:, 1:]))
    b = 2.5 * nn
    h, w = img.shape
    interior = (xy[:, 0] > b) & (xy[:, 0] < w - 1 - b) & (xy[:, 1] > b) & (xy[:, 1] < h - 1 - b)
    alt = (cls[idx[interior, 1:]] != cls[interior, None]).all(axis=1).mean()
    share = np.bincount(cls[interior], minlength=3) / interior.sum()
    assert alt >= 0.95, alt
    assert len(share) == 3 and share.min() >= 0.28, share
