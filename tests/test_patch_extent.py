"""A model trained by stemfast cuts every image's patches by that image's own site spacing
(:mod:`stemfast.patchextent`): a ``--train`` batch of mixed magnification, a ``--model`` trained at one
magnification applied at another, older model files that recorded a pixel patch size, and a
``patch_size`` setting that fixes the size (said where it spans other site spacings than at training).

Before, the first image's patch size in px was fixed for the batch and stored in the model: with a
14 px image sorted first, a 7 px image of the same batch was cut at 5.3 spacings and its classes
collapsed (class ARI 0.08-0.32 against the truth, 0.99 with the 7 px image first)."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.spatial import cKDTree
from sklearn.metrics import adjusted_rand_score

from stemfast.batch import load_model, run_batch
from stemfast.config import PipelineConfig, load_config
from stemfast.patchextent import extent_note, extent_record, plan_for
from stemfast.patches import default_patch_size
from stemfast.pipeline import run_image
from stemfast.synthetic import make_mos2

#: a small network trained briefly: enough for the three sublattices of clean synthetic MoS2
SMALL = {"model.epochs": 4, "model.stn_epochs": 3, "model.device": "cpu", "model.input_size": 16,
         "model.channels": [8, 8, 8], "model.stn_channels": [4, 8], "model.max_train_patches": 2000}
#: site spacing (px) -> image side (px): about the same number of sites at both magnifications
SIDES = {14.0: 320, 7.0: 224}


def _image(nn: float):
    return make_mos2(shape=(SIDES[nn],) * 2, pixel_size_A=3.16 / np.sqrt(3.0) / nn, rotation_deg=12.0, seed=int(nn))


@pytest.fixture(scope="module")
def images():
    return {nn: _image(nn) for nn in SIDES}


def _class_ari(sites_csv: Path, synth) -> float:
    """ARI of ``class_id`` against the true sublattice on the defect-free true sites found (within 0.3 spacings)."""
    t = pd.read_csv(sites_csv)
    d, j = cKDTree(t[["x", "y"]].to_numpy()).query(synth.truth[:, :2])
    ok = (d < 0.3 * synth.meta["nn_px"]) & (synth.truth[:, 3] == 0)
    assert ok.sum() > 300
    return adjusted_rand_score(synth.truth[ok, 2].astype(int), t["class_id"].to_numpy()[j[ok]])


def _batch(root: Path, named: dict, *, train: bool = True, model_path=None, overrides=None) -> Path:
    """``run_batch`` on the synthetic images ``named`` ({file stem: image}) in ``root/data``; the output folder."""
    data, out = root / "data", root / "out"
    shutil.rmtree(root, ignore_errors=True)
    data.mkdir(parents=True)
    for stem, s in named.items():
        np.save(data / f"{stem}.npy", s.image)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_batch(data, out, config=load_config(None, overrides={**SMALL, **(overrides or {})}), train=train,
                  model_path=model_path, show_progress=False)
    return out


@pytest.mark.parametrize("first", [14.0, 7.0])
def test_a_mixed_magnification_training_batch_classes_every_image_whatever_the_order(tmp_path, images, first):
    """The 14 px image sorted first cut the 7 px image at 37 px (5.3 spacings): class ARI 0.32 there
    on the old code (0.99 on the 14 px image; 0.99-1.0 on both with the 7 px image first)."""
    second = 7.0 if first == 14.0 else 14.0
    names = {f"a_{first:.0f}px": images[first], f"b_{second:.0f}px": images[second]}
    out = _batch(tmp_path / "mix", names)
    for stem, s in names.items():
        assert _class_ari(out / stem / "sites.csv", s) >= 0.9, stem
        summary = json.loads((out / stem / "summary.json").read_text())
        assert "patch_warning" not in summary and "patch_extent" not in summary
    info = json.loads((out / "model.json").read_text())
    rec = info["patch_extent"]
    assert info["patch_size"] is None and rec["cut"] == "per-image" and rec["n_images"] == 2
    lo, hi = rec["train_spacing_range_px"]
    assert lo == pytest.approx(7.0, abs=0.1) and hi == pytest.approx(14.0, abs=0.1)
    # each cut at default_patch_size of its spacing: 19 px at 7 px (2.71 spacings), 37 px at 14 px (2.64)
    assert rec["spacings_range"] == pytest.approx([37 / 14.0, 19 / 7.0], abs=0.01)
    m = load_model(out / "model.pt")
    assert m.extra["patch_size"] is None and m.extra["patch_extent"] == rec


@pytest.fixture(scope="module")
def model_at_14px(tmp_path_factory, images):
    """``OUT/model.pt`` of a ``--train`` batch of the 14 px image alone."""
    out = _batch(tmp_path_factory.mktemp("m14"), {"m14": images[14.0]})
    return out / "model.pt"


def test_a_model_trained_at_one_magnification_classes_an_image_at_another(tmp_path, images, model_at_14px):
    """``--model`` trained at 14 px on a 7 px image: the old code cut it at the recorded 37 px (ARI 0.20-0.23)."""
    out = _batch(tmp_path / "apply", {"s7": images[7.0]}, train=False, model_path=model_at_14px)
    assert _class_ari(out / "s7" / "sites.csv", images[7.0]) >= 0.9
    assert "patch_warning" not in json.loads((out / "s7" / "summary.json").read_text())


def _legacy(model_at_14px: Path, dest: Path, *, with_settings: bool) -> Path:
    """The model written as an older stemfast wrote it: the first image's pixel patch size (37 px at
    14 px spacing), no extent record; ``with_settings``: with the batch's settings (``patch_size`` None)."""
    m = load_model(model_at_14px)
    m.extra.pop("patch_extent")
    m.extra["patch_size"] = default_patch_size(14.0)
    if not with_settings:
        m.extra.pop("config")
    return m.save(dest)


def test_an_older_batch_model_with_a_derived_pixel_size_cuts_per_image(tmp_path, images, model_at_14px):
    """Its 37 px came from the training image's spacing (no patch_size setting saved with it): the
    model learned the default extent, so every image is cut by its own spacing."""
    m = load_model(_legacy(model_at_14px, tmp_path / "old.pt", with_settings=True))
    assert m.extra["config"]["patch_size"] is None and "patch_extent" not in m.extra
    assert plan_for(m, PipelineConfig()).fixed_px is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table, summary, _ = run_image(images[7.0].image, model=m)
    assert "patch_warning" not in summary
    sites = tmp_path / "s7.csv"
    pd.DataFrame({"x": table["x"], "y": table["y"], "class_id": table["class_id"]}).to_csv(sites, index=False)
    assert _class_ari(sites, images[7.0]) >= 0.9


def test_an_older_model_without_its_settings_keeps_its_pixel_size_and_says_so(tmp_path, images, model_at_14px):
    """Whether its 37 px was derived or set is not known: kept, and at 7 px spacing (5.3 spacings,
    the default 2.7) the summary says so; at 14 px spacing nothing is said."""
    m = load_model(_legacy(model_at_14px, tmp_path / "old.pt", with_settings=False))
    plan = plan_for(m, PipelineConfig())
    assert plan.fixed_px == 37 and not plan.known
    with pytest.warns(UserWarning, match="does not record the spacing it was trained at"):
        _, summary, _ = run_image(images[7.0].image, model=m)
    note = summary["patch_extent"]
    assert note["patch_px"] == 37 and note["spacings"] == pytest.approx(5.29, abs=0.02) and note["recorded"] is False
    assert "37 px" in summary["patch_warning"]
    assert extent_note(plan, 37, 14.0) is None


def test_a_patch_size_setting_stays_fixed_and_an_image_it_does_not_fit_is_said(tmp_path, images, model_at_14px):
    """A model trained with ``patch_size = 37`` at 14 px spacing keeps cutting 37 px; on a 7 px image
    that spans 5.3 spacings instead of 2.6 (+100%): summary.json and report.html say so."""
    m = load_model(model_at_14px)
    m.extra["patch_size"] = 37
    m.extra["patch_extent"] = extent_record([37], [14.0], 37)
    path = m.save(tmp_path / "fixed.pt")
    out = _batch(tmp_path / "fixed", {"s7": images[7.0]}, train=False, model_path=path)
    s = json.loads((out / "s7" / "summary.json").read_text())
    note = s["patch_extent"]
    assert note["patch_px"] == 37 and note["spacings_at_training"] == pytest.approx(2.643, abs=1e-3)
    assert note["off"] == pytest.approx(1.0, abs=0.02) and s["patch_warning"] in s["warnings"]
    assert "fixed at training" in s["patch_warning"]
    html = (out / "report.html").read_text()
    assert "spans 5.29 site spacings" in html
    plan = plan_for(m, PipelineConfig(patch_size=25))  # the model's size, not a run's setting
    assert plan.fixed_px == 37 and plan.extent == pytest.approx(2.6429)


def test_a_patch_size_setting_at_training_is_recorded_with_its_extent():
    rec = extent_record([37, 37], [14.0, 7.0], 37)
    assert rec["cut"] == "fixed" and rec["patch_px"] == 37
    assert rec["spacings"] == pytest.approx((37 / 14 + 37 / 7) / 2, abs=1e-3)
    assert "over the training images" in rec["warning"]  # two magnifications at one pixel size: said at training
    assert "warning" not in extent_record([19, 37], [7.0, 14.0], None)
