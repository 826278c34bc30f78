"""What the patch model refuses, and the patches the pipeline gives it: non-finite patches (fit,
finetune, encode), damaged or unusable model files (zip CRCs, the weights' checksum, NaN weights,
weights that do not fit their settings), the patch size and input size a model gets through
``run_image`` / ``analyze``, and an image without a lattice when a model must be trained.
Tiny models (one epoch, few channels) keep the file fast."""
from __future__ import annotations

import logging
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
