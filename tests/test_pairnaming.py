"""Sublattice names told by a second detector of known angle (stemfast.pairnaming): where the higher-
angle detector shows the sublattice named chalcogen the brighter while the image was named with the
metal the brighter, the names are swapped and the image is named the other way -- the WSe2 MAADF
(ADF2) file of a pair was named W <-> Se2 swapped. Small synthetic images: a "MAADF-like" image whose
chalcogen pairs outshine the metal, and the "HAADF" of the same atoms."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.spatial import cKDTree

from stemfast.batch import run_batch
from stemfast.config import load_config
from stemfast.detectors import higher_angle
from stemfast.frontend import prepare
from stemfast.materials import CHALCOGEN, METAL
from stemfast.pairnaming import names_contradicted
from stemfast.synthetic import make_mos2

SHAPE = (192, 192)


@pytest.fixture(scope="module")
def scans():
    """The same atoms seen by a high-angle detector (metal brightest) and a lower-angle one where the
    chalcogen pairs outshine the metal."""
    kw = dict(shape=SHAPE, seed=4, pixel_size_A=0.2, dose=40.0)
    return make_mos2(**kw).image, make_mos2(**kw, chalcogen_scale=3.0).image


def _prepare(image, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare(image, **kw)


def _agreement(a, b) -> float:
    """Share of the sites of ``b`` named as the site of ``a`` at the same place."""
    d, j = cKDTree(a.sites.xy).query(b.sites.xy)
    ok = d < 1.5
    assert ok.mean() > 0.98
    return float((np.asarray(b.sites["sublattice"])[ok] == np.asarray(a.sites["sublattice"])[j[ok]]).mean())


def test_detector_names_rank_angles():
    assert higher_angle("1028_ADF1_11", "1028_ADF2_11") is True
    assert higher_angle("scan_MAADF", "scan_HAADF") is False
    assert higher_angle("area 3 HAADF", "area 3 DF4") is True  # HAADF is above any other dark field
    assert higher_angle("s_laadf", "s_maadf") is False
    assert higher_angle("s_df4", "s_df2") is None  # segments: their names do not rank them
    assert higher_angle("a_HAADF", "b_MAADF") is None  # two words differ: not one scan's pair by name
    assert higher_angle("scan_7", "scan_8") is None


def test_a_higher_angle_companion_names_a_maadf_like_image(scans):
    haadf, maadf = scans
    ref = _prepare(haadf)
    alone = _prepare(maadf)
    assert _agreement(ref, alone) < 0.5  # by its own brightness: metal and chalcogen swapped
    named = _prepare(maadf, companion=haadf, companion_higher=True)
    assert _agreement(ref, named) > 0.99
    info = named.sites.meta["naming_from_companion"]
    assert info["companion_brighter"] == "chalcogen" and info["chalcogen_brighter"] is True
    assert named.sites.meta["chalcogen_brighter"] is True  # what the analysis names the kinds by
    np.testing.assert_array_equal(named.sites.xy, alone.sites.xy)  # the same sites, named the other way


@pytest.mark.parametrize("which, higher", [("maadf", None), ("maadf", False), ("haadf", False)])
def test_names_stand_where_the_angles_do_not_rule_them_out(scans, which, higher):
    """No angle known, a lower-angle companion of the MAADF-like image (it may show either order), and
    the HAADF image with its lower-angle companion: the image's own names stand."""
    haadf, maadf = scans
    image, other = (maadf, haadf) if which == "maadf" else (haadf, maadf)
    alone = _prepare(image)
    with_it = _prepare(image, companion=other, companion_higher=higher)
    assert "naming_from_companion" not in with_it.sites.meta
    np.testing.assert_array_equal(with_it.sites["sublattice"], alone.sites["sublattice"])


def test_a_set_chalcogen_brighter_is_the_users_word(scans):
    haadf, maadf = scans
    cfg = load_config(None, {"sites.chalcogen_brighter": False})
    kept = _prepare(maadf, config=cfg, companion=haadf, companion_higher=True)
    assert "naming_from_companion" not in kept.sites.meta
    assert kept.sites.meta["chalcogen_brighter"] is False


def test_no_swap_without_clear_evidence():
    rng = np.random.default_rng(1)
    sub = np.repeat([METAL, CHALCOGEN], 400)
    alike = 1.0 + 0.1 * rng.standard_normal(800)
    assert names_contradicted(sub, alike, np.ones(800, bool), chalcogen_brighter=False, companion_higher=True) is None
    few = np.repeat([METAL, CHALCOGEN], 5)
    assert names_contradicted(few, np.where(few == CHALCOGEN, 2.0, 1.0), np.ones(10, bool),
                              chalcogen_brighter=False, companion_higher=True) is None
    # a lower-angle companion showing the chalcogen brighter is what physics allows: the names stand
    comp = np.where(sub == CHALCOGEN, 1.5, 1.0) + 0.05 * rng.standard_normal(800)
    assert names_contradicted(sub, comp, np.ones(800, bool), chalcogen_brighter=False, companion_higher=False) is None


def test_a_batch_pair_by_file_names_names_both_files_alike(scans, tmp_path, monkeypatch):
    monkeypatch.setenv("STEMFAST_ENCODE_WORKER", "0")
    haadf, maadf = scans
    d = tmp_path / "in"
    d.mkdir()
    np.save(d / "area_HAADF.npy", haadf.astype(np.float32))
    np.save(d / "area_MAADF.npy", maadf.astype(np.float32))
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_batch([d], out)
    s_h = json.loads((out / "area_HAADF" / "summary.json").read_text())
    s_m = json.loads((out / "area_MAADF" / "summary.json").read_text())
    assert "from_companion" not in (s_h.get("sublattice_naming") or {})
    assert s_m["sublattice_naming"]["from_companion"]["companion_higher_angle"] is True
    assert not s_m.get("naming_warning")
    html = (out / "report.html").read_text()
    assert "the sublattice names are taken from it" in html

    a, b = pd.read_csv(out / "area_HAADF" / "sites.csv"), pd.read_csv(out / "area_MAADF" / "sites.csv")
    d_, j = cKDTree(a[["x", "y"]].to_numpy()).query(b[["x", "y"]].to_numpy())
    ok = d_ < 1.5
    assert (b["sublattice"].to_numpy()[ok] == a["sublattice"].to_numpy()[j[ok]]).mean() > 0.99
