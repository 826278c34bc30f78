"""What the patch model refuses, and the patches the pipeline gives it: non-finite patches (fit,
finetune, encode), damaged or unusable model files (zip CRCs, the weights' checksum, NaN weights,
weights that do not fit their settings), the patch size and input size a model gets through
``run_image`` / ``analyze``, and an image without a lattice when a model must be trained.
Tiny models (one epoch, few channels) keep the file fast."""
from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from stemfast.config import PipelineConfig
from stemfast.errors import ModelFileError
from stemfast.model import RVAE, RVAEConfig
from stemfast.model.shipped import MODEL_PATH, load_default_model
from stemfast.pipeline import analyze, prepare, run_image, train_model
from stemfast.synthetic import make_mos2, render_site_patches

PYTHON_DIR = str(Path(__file__).resolve().parents[1] / "python")
TINY = dict(epochs=1, stn_epochs=1, kl_warmup=1, batch_size=64, channels=(4, 8, 8), stn_channels=(4, 4),
            device="cpu", progress=False, max_train_patches=300)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def patches():
    return np.asarray(render_site_patches(64, 24, seed=0)[0], np.float32)


@pytest.fixture(scope="module")
def tiny(patches):
    return RVAE.fit(patches, RVAEConfig(**TINY))


# --------------------------------------------------------------------------- non-finite patches

def test_fit_refuses_a_nan_patch_instead_of_crashing():
    """One all-NaN patch crashed torch's grid_sample backward (a segfault): run in a child process."""
    code = ("import numpy as np, torch; torch.set_num_threads(1)\n"
            "from stemfast.model import RVAE\n"
            "from stemfast.synthetic import render_site_patches\n"
            "p = np.asarray(render_site_patches(64, 24, seed=0)[0], np.float32); p[5] = np.nan\n"
            "try:\n    RVAE.fit(p, epochs=1, stn_epochs=1, kl_warmup=1, batch_size=32, channels=(4, 8, 8),"
            " stn_channels=(4, 4), progress=False)\n"
            "except ValueError as e:\n    print('refused:', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": PYTHON_DIR, "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "refused: patch 5 has non-finite values" in r.stdout


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_finetune_and_encode_refuse_non_finite_patches(tiny, patches, bad):
    q = patches.copy()
    q[7, 0, 0] = bad  # outside the disc: it still poisons the weights (shown by the old code)
    with pytest.raises(ValueError, match="patch 7 has non-finite values"):
        tiny.finetune(q, steps=2)
    with pytest.raises(ValueError, match="patch 7 has non-finite values"):
        tiny.encode(q, batch_size=4)  # found in its chunk, named by its index among all
    with pytest.raises(ValueError, match="patch 7 has non-finite values"):
        tiny.canonicalize(q)
    q[9] = bad
    with pytest.raises(ValueError, match=r"patch 7 \(and 1 more\) has non-finite"):
        RVAE.fit(q, RVAEConfig(**TINY))
    assert np.isfinite(tiny.encode(patches).mu).all()


# --------------------------------------------------------------------------- model files

def _data_offset(raw: bytes, info: zipfile.ZipInfo) -> int:
    o = info.header_offset  # the local header: 30 bytes, then the name and the extra field
    return o + 30 + int.from_bytes(raw[o + 26:o + 28], "little") + int.from_bytes(raw[o + 28:o + 30], "little")


def test_a_flipped_byte_in_a_model_file_is_refused(tmp_path):
    """torch.load does not check zip CRCs: one flipped weight byte in a copy of the shipped model loaded
    (mu off by 5e37). Files without the weights' checksum (the shipped one) have their CRCs checked."""
    raw = bytearray(MODEL_PATH.read_bytes())
    with zipfile.ZipFile(MODEL_PATH) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw[_data_offset(bytes(raw), info) + info.file_size // 2] ^= 0x40
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match="fails its CRC check"):
        RVAE.load(bad, map_location="cpu")
    good = tmp_path / "copy.pt"
    shutil.copy(MODEL_PATH, good)
    assert RVAE.load(good, map_location="cpu").extra["shipped"]  # an intact copy loads
    assert load_default_model(map_location="cpu", probe=False) is not None  # and so does the shipped model


def test_saved_weights_carry_a_checksum_that_load_checks(tiny, tmp_path, stemfast_log):
    from stemfast.model.api import weights_sha256

    path = tiny.save(tmp_path / "m.pt")
    state = torch.load(path, weights_only=True)
    assert state["weights_sha256"] == weights_sha256(tiny.network.state_dict())
    loaded = RVAE.load(path, map_location="cpu")
    np.testing.assert_array_equal(loaded.encode(np.zeros((1, 24, 24), np.float32)).mu,
                                  tiny.encode(np.zeros((1, 24, 24), np.float32)).mu)
    # a weight changed and the file rewritten (valid zip CRCs): the checksum tells
    k = next(iter(state["state_dict"]))
    state["state_dict"][k] = state["state_dict"][k] + 1e-3
    torch.save(state, tmp_path / "edited.pt")
    with pytest.raises(ModelFileError, match="do not match the checksum"):
        RVAE.load(tmp_path / "edited.pt", map_location="cpu")
    # a file saved before the checksum existed still loads (unverified, said at debug level)
    del state["weights_sha256"]
    torch.save(state, tmp_path / "old.pt")
    assert RVAE.load(tmp_path / "old.pt", map_location="cpu").config == tiny.config
    assert "no weights checksum" in stemfast_log.text


@pytest.mark.parametrize("with_checksum", [True, False])
def test_load_refuses_non_finite_weights(tiny, tmp_path, with_checksum):
    from stemfast.model.api import weights_sha256

    state = tiny.state()
    k = "encoder.head.weight"
    state["state_dict"][k] = state["state_dict"][k] * float("nan")
    if with_checksum:
        state["weights_sha256"] = weights_sha256(state["state_dict"])  # saved so: a training that diverged
    else:
        del state["weights_sha256"]
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(ModelFileError, match="not finite.*encoder.head.weight"):
        RVAE.load(tmp_path / "nan.pt", map_location="cpu")


def test_weights_that_do_not_fit_their_settings_are_named_on_the_first_line(tmp_path):
    from stemfast.batch.model_state import check_model_file

    state = torch.load(MODEL_PATH, weights_only=True)
    state["config"] = dict(state["config"], input_size=32)
    torch.save(state, tmp_path / "size32.pt")
    with pytest.raises(ModelFileError, match=r"encoder.head.weight is \[8, \d+\] in the file, \[8, \d+\] for its"):
        check_model_file(tmp_path / "size32.pt")  # it keeps the first line of the cause
    state = torch.load(MODEL_PATH, weights_only=True)
    state["extra"] = dict(state["extra"] or {}, patch_size="abc")
    torch.save(state, tmp_path / "badps.pt")
    with pytest.raises(ModelFileError, match="patch_size is 'abc'"):
        RVAE.load(tmp_path / "badps.pt", map_location="cpu")


# --------------------------------------------------------------------------- the pipeline's patches

@pytest.fixture(scope="module")
def image():
    """A MoS2-like image at ~15 px per spacing: its patches are cut at 39 px, not the model's 24."""
    s = make_mos2(shape=(256, 256), pixel_size_A=3.16 / np.sqrt(3) / 15.0, noise=True, seed=3)
    return s.image.astype(np.float32)


@pytest.fixture(scope="module")
def trained32(image):
    """(settings, model) of a model trained through run_image with input_size 32."""
    cfg = PipelineConfig(model=RVAEConfig(input_size=32, **TINY))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, model = run_image(image, config=cfg, train=True)
    return cfg, model


def test_a_model_trained_through_the_api_records_how_its_patches_were_cut(image, trained32, tmp_path):
    """By the image's spacing (stemfast.patchextent): no fixed pixel size, the extent in spacings."""
    cfg, model = trained32
    prep = prepare(image, config=cfg)
    cut, spacing = prep.patch_size, prep.sites.meta["spacing_px"]
    assert cut == 39  # cut in the image, not the input size the patches were resampled to
    rec = model.extra["patch_extent"]
    assert model.extra["patch_size"] is None and rec["cut"] == "per-image"
    assert rec["spacings"] == pytest.approx(cut / spacing, abs=1e-3) and rec["train_spacing_px"] == pytest.approx(spacing, abs=1e-4)
    loaded = RVAE.load(model.save(tmp_path / "m.pt"), map_location="cpu")
    assert loaded.extra["patch_size"] is None and loaded.extra["patch_extent"] == rec


def test_training_refuses_images_cut_at_different_sizes(image):
    cfg = PipelineConfig(model=RVAEConfig(**TINY))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        preps = [prepare(image, config=cfg, patch_size=s) for s in (33, 39)]
    with pytest.raises(ValueError, match=r"cut at different sizes \(\[33, 39\] px\)"):
        train_model(preps, config=cfg)


def test_a_given_model_gets_patches_at_its_own_input_size(image, trained32):
    """A 32 px model run with the default settings (input_size 24) was fed 24 px patches resampled again."""
    cfg32, model = trained32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, _ = analyze(prepare(image, config=cfg32, patch_size=model.extra["patch_size"]), model, config=cfg32)
        table, summary, used = run_image(image, model=model, config=PipelineConfig())
        assert used is model and summary["n_sites"] == len(ref)
        np.testing.assert_array_equal(np.asarray(table["recon_error"]), np.asarray(ref["recon_error"]))
        prep24 = prepare(image, config=PipelineConfig(), patch_size=model.extra["patch_size"])
        with pytest.raises(ValueError, match="prepared at 24 px but the model takes 32 px"):
            analyze(prep24, model, config=PipelineConfig())


@pytest.mark.parametrize("how", ["train", "architecture"])
def test_run_image_without_a_lattice_when_a_model_must_be_trained(how):
    cfg = PipelineConfig(model=RVAEConfig(latent_dim=5 if how == "architecture" else 4, **TINY))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table, summary, model = run_image(np.zeros((128, 128), np.float32), config=cfg, train=how == "train")
    assert len(table) == 0 and summary == {"n_sites": 0, "status": "no lattice"} and model is None
