"""The compiled inference engine (stemfast.model.engine, kernel ``rvae_forward``): every backend agrees
with the NumPy reference, and the engine agrees with the torch model it stands in for."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stemfast.backend import available_backends, get_kernels
from stemfast.model import RVAE, RVAEConfig
from stemfast.model import engine as E
from stemfast.model import functional as MF
from stemfast.model import shipped
from stemfast.model.settings import background_rank
from stemfast.model.training import build_network
from stemfast.synthetic import render_site_patches

from encoding_checks import angle_diff, assert_same_encoding

BACKENDS = available_backends()
PYTHON_DIR = str(Path(shipped.__file__).resolve().parents[2])


def _patches(n: int, size: int, seed: int = 0) -> np.ndarray:
    p = render_site_patches(n, size, spacing=size / 2.5, seed=seed)
    return np.asarray(p[0] if isinstance(p, tuple) else p, np.float32)


def _random_model(**cfg) -> RVAE:
    """A network with random weights (biases too, so every term counts), as RVAE.encode runs it."""
    config = RVAEConfig(device="cpu", **cfg)
    torch.manual_seed(3)
    net = build_network(config)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return RVAE(net, config)


@pytest.mark.parametrize("cfg", [
    dict(),  # the default: rVAE, 24 px, STN pooled by 2, C3 image symmetrisation
    dict(symmetrize="features"),
    dict(symmetrize="none"),
    dict(input_size=16, stn_downsample=1, rotation_symmetry=6, latent_dim=3),
    dict(model="vae"),
], ids=["default", "features", "none", "16px-k6", "plain-vae"])
def test_compiled_engine_matches_torch(cfg):
    m = _random_model(**cfg)
    x = _patches(300, 35, seed=1)  # resampled to the model input (the engine's path and torch's agree)
    ref = m.encode(x, return_recon=True)
    for be in BACKENDS:
        cm = E.CompiledModel(m.network.state_dict(), m.config, backend=be)
        out = cm.encode(x, return_recon=True, batch_size=128)
        assert_same_encoding(ref, out, 360.0 / m.config.rotation_symmetry)
        np.testing.assert_allclose(out.recon, ref.recon, rtol=0, atol=2e-4 * float(np.abs(ref.recon).max()))


@pytest.mark.parametrize("engine", ["torch", "compiled"])
def test_both_engines_refuse_the_same_bad_input(engine):
    """The compiled engine returned np.empty outputs for batch_size <= 0, took 1..3 px patches and
    encoded a NaN patch to plausible latents (torch: NaN); one shared check now refuses them."""
    m = _random_model()
    model = m if engine == "torch" else E.CompiledModel(m.network.state_dict(), m.config)
    x = _patches(6, 35)
    for bs in (0, -1):
        with pytest.raises(ValueError, match="batch_size must be >= 1"):
            model.encode(x, batch_size=bs)
    for s in (1, 2, 3):
        with pytest.raises(ValueError, match=f"patches are too small \\({s} px; at least 4\\)"):
            model.encode(np.zeros((2, s, s), np.float32))
    with pytest.raises(ValueError, match=r"must be a \[N, S, S\] array"):
        model.encode(np.zeros((2, 8, 9), np.float32))
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[4, 17, 17] = bad
        with pytest.raises(ValueError, match="patch 4 has non-finite values"):
            model.encode(y, batch_size=3)
    assert np.isfinite(model.encode(x, batch_size=3).mu).all()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "numpy"])
def test_kernel_backends_agree_with_the_numpy_reference(backend):
    m = _random_model()
    w = E.prepare_weights({k: v.numpy() for k, v in m.network.state_dict().items()}, m.config)
    x = _patches(200, 24, seed=2)  # the kernel takes the background out
    args = (x, w["mask"], w["stn"], w["enc"], w["dec"], w["symmetry"], w["symmetrize"], w["stn_downsample"],
            background_rank(24 * 24))
    r_ref = np.empty_like(x)
    r_be = np.empty_like(x)
    ref = get_kernels("numpy").rvae_forward(*args, r_ref)
    got = get_kernels(backend).rvae_forward(*args, r_be)
    for name, a, b in zip(("mu", "logvar"), ref[:2], got[:2]):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * (np.abs(a).max() + 1e-6), err_msg=name)
    assert angle_diff(got[2], ref[2], 120.0).max() < 0.01
    np.testing.assert_allclose(got[3], ref[3], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got[4], ref[4], rtol=1e-4, atol=1e-8)
    # the reconstruction is rotated back by the angle, so it carries the angles' rounding (~1e-3 deg)
    np.testing.assert_allclose(r_be, r_ref, rtol=0, atol=1e-4 * float(np.abs(r_ref).max()))


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("isa", ["baseline", "avx2", ""], ids=["baseline", "avx2", "widest"])
@pytest.mark.parametrize("cfg", [
    dict(),
    dict(symmetrize="features"),
    dict(input_size=16, stn_downsample=1, rotation_symmetry=6, latent_dim=3),
    dict(input_size=32, channels=(8, 12, 32), stn_channels=(4, 12)),  # channel counts off the vector paths
    dict(model="vae"),
], ids=["default", "features", "16px-k6", "odd-channels", "plain-vae"])
def test_every_cpu_variant_of_the_cpp_kernel_agrees_with_the_numpy_reference(cfg, isa, monkeypatch):
    """rvae_forward's C++ code is compiled per ISA (the CPU picks the widest it runs); each variant, with
    its own layer paths (channels-last, planar, pixel-blocked), agrees with the NumPy reference."""
    monkeypatch.setenv("STEMFAST_MAX_ISA", isa)
    m = _random_model(**cfg)
    s = m.config.input_size
    w = E.prepare_weights({k: v.numpy() for k, v in m.network.state_dict().items()}, m.config)
    x = _patches(64, s, seed=4)
    args = (x, w["mask"], w["stn"], w["enc"], w["dec"], w["symmetry"], w["symmetrize"], w["stn_downsample"],
            background_rank(s * s))
    r_ref, r_be = np.empty_like(x), np.empty_like(x)
    ref = get_kernels("numpy").rvae_forward(*args, r_ref)
    got = get_kernels("cpp").rvae_forward(*args, r_be)
    for name, a, b in zip(("mu", "logvar"), ref[:2], got[:2]):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * (np.abs(a).max() + 1e-6), err_msg=name)
    if m.config.model == "rvae":
        assert angle_diff(got[2], ref[2], 360.0 / m.config.rotation_symmetry).max() < 0.01
        np.testing.assert_allclose(got[3], ref[3], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got[4], ref[4], rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(r_be, r_ref, rtol=0, atol=1e-4 * float(np.abs(r_ref).max()))


def test_shipped_model_compiled_equals_torch_on_real_patches():
    """The shipped model, as ``analyze`` runs it (compiled) and as torch runs it, on the patches the
    front end cuts from a real WSe2 crop (tests/data): the same latents, angles and errors, hence the
    same classes and scores."""
    from stemfast.frontend import prepare

    img = np.load(Path(__file__).parent / "data" / "wse2_ti2_haadf_crop.npy").astype(np.float32)
    patches = np.asarray(prepare(img).patches, np.float32)
    assert len(patches) > 100
    tm = shipped.load_default_model(map_location="cpu")  # the compiled engine is the CPU's torch pass
    cm = shipped.load_compiled_default()
    assert cm.extra["shipped"] == tm.extra["shipped"] and cm.extra["engine"] == "compiled"
    assert_same_encoding(tm.encode(patches), cm.encode(patches), 120.0)


def test_shipped_arrays_are_the_torch_weights_and_checked():
    man = shipped.manifest()
    entry = man["arrays"]
    arrays = E.state_arrays(shipped.ARRAYS_PATH)
    sd = shipped.load_default_model().network.state_dict()
    assert set(arrays) == set(sd)
    for k, v in sd.items():
        assert np.array_equal(arrays[k], v.cpu().numpy()), k  # loaded on a GPU where one is visible
    assert shipped._sha256(shipped.ARRAYS_PATH) == entry["sha256"]


def test_a_damaged_arrays_file_is_refused_and_torch_takes_over(tmp_path, monkeypatch):
    bad = tmp_path / shipped.ARRAYS_PATH.name
    data = bytearray(shipped.ARRAYS_PATH.read_bytes())
    data[-100] ^= 0xFF
    bad.write_bytes(bytes(data))
    monkeypatch.setattr(shipped, "ARRAYS_PATH", bad)
    with pytest.raises(shipped.ShippedModelError, match="SHA-256"):
        shipped.load_compiled_default()
    said = []
    monkeypatch.setattr(shipped.log, "warning", lambda msg, *a: said.append(msg % a))
    assert shipped.compiled_default_or_none(shipped.manifest()) is None
    assert any("runs on torch" in m and "SHA-256" in m for m in said)
    # the pipeline then runs the shipped model on torch
    from stemfast.pipeline import PipelineConfig

    model = shipped.shipped_for_run(PipelineConfig())
    assert model is not None and type(model).__name__ == "RVAE" and model.extra["shipped"]["version"]


def test_write_arrays_is_deterministic(tmp_path):
    st = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float32)}
    e1 = shipped.write_arrays(st, tmp_path / "x.npz")
    e2 = shipped.write_arrays(st, tmp_path / "y.npz")
    assert e1["sha256"] == e2["sha256"]
    back = E.state_arrays(tmp_path / "x.npz")
    assert np.array_equal(back["a"], st["a"]) and np.array_equal(back["b"], st["b"])


def test_background_subtraction_is_the_models():
    assert E.BACKGROUND_QUANTILE == MF.BACKGROUND_QUANTILE
    x = _patches(50, 24, seed=5)
    ref = MF.subtract_background(torch.from_numpy(x)[:, None])[:, 0].numpy()
    np.testing.assert_array_equal(E.subtract_background(x), ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_kernel_takes_out_the_models_background_exactly(backend):
    """``rvae_forward`` with ``background_rank`` k gives bit for bit what it gives on patches whose
    background the model's own subtraction (torch, :func:`MF.subtract_background`) took out: ties,
    integer-valued and constant patches included; the rank is checked."""
    m = _random_model()
    w = E.prepare_weights({k: v.numpy() for k, v in m.network.state_dict().items()}, m.config)
    x = _patches(40, 24, seed=6)
    x[1] = np.round(x[1] * 4)  # many ties
    x[2] = 3.0                 # constant
    x[3, :12] = -x[3, :12]     # negative half
    k = background_rank(24 * 24)
    sub = MF.subtract_background(torch.from_numpy(x)[:, None])[:, 0].numpy()
    kern = get_kernels(backend).rvae_forward
    args = (w["mask"], w["stn"], w["enc"], w["dec"], w["symmetry"], w["symmetrize"], w["stn_downsample"])
    r_in, r_pre = np.empty_like(x), np.empty_like(x)
    got = kern(x, *args, k, r_in)
    pre = kern(sub, *args, 0, r_pre)
    for a, b in zip(got, pre):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(r_in, r_pre)
    for bad in (-1, 24 * 24 + 1):
        with pytest.raises(ValueError, match="background_rank"):
            kern(x, *args, bad, np.empty((0, 0, 0), np.float32))


def test_resolve_engine(monkeypatch):
    monkeypatch.setattr(E, "_gpu_visible", lambda: False)
    assert E.resolve_engine("auto", "auto") == "compiled"
    assert E.resolve_engine("auto", "cpu") == "compiled"
    assert E.resolve_engine("auto", "cuda") == "torch"
    assert E.resolve_engine("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="CPU only"):
        E.resolve_engine("compiled", "cuda:0")
    monkeypatch.setattr(E, "_gpu_visible", lambda: True)
    assert E.resolve_engine("auto", "auto") == "torch"
    assert E.resolve_engine("compiled", "auto") == "compiled"
    with pytest.raises(ValueError, match="engine"):
        RVAEConfig(engine="onnx")


_NO_TORCH = r"""
import sys, json
from stemfast.cli import main
from stemfast.synthetic import make_mos2
import tifffile
img = make_mos2(shape=(192, 192), seed=2).image.astype("float32")
tifffile.imwrite(sys.argv[1] + "/img.tif", img)
try:
    main(["analyze", sys.argv[1] + "/img.tif", "-o", sys.argv[1] + "/out"])
except SystemExit as e:
    assert not e.code, e.code
print("TORCH", "torch" in sys.modules, "KORNIA", "kornia" in sys.modules)
"""


def test_analyze_with_the_shipped_model_never_imports_torch(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("STEMFAST_BACKEND",)}
    env["PYTHONPATH"] = PYTHON_DIR
    env.pop("CUDA_VISIBLE_DEVICES", None)
    r = subprocess.run([sys.executable, "-c", _NO_TORCH, str(tmp_path)], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    if E._gpu_visible():  # auto picks torch where a GPU may be used
        pytest.skip("an NVIDIA GPU is visible: model.engine=auto uses torch here")
    assert "TORCH False KORNIA False" in r.stdout
    batch = json.loads((tmp_path / "out" / "batch_summary.json").read_text())
    assert batch["model"]["engine"] == "compiled" and batch["model"]["source"] == "shipped"
    summ = json.loads((tmp_path / "out" / "img" / "summary.json").read_text())
    assert summ["n_sites"] > 100
    assert summ["model"]["engine"] == "compiled"
    assert "compiled engine" in (tmp_path / "out" / "report.html").read_text()


def test_compiled_and_torch_runs_give_the_same_site_table(tmp_path):
    """``analyze`` with model.engine compiled and torch: the same classes and defect flags on every
    site, scores equal to float32 rounding."""
    import pandas as pd
    from stemfast.synthetic import make_mos2
    import tifffile

    img = make_mos2(shape=(256, 256), seed=6).image.astype(np.float32)
    tifffile.imwrite(tmp_path / "img.tif", img)
    env = {k: v for k, v in os.environ.items() if k != "STEMFAST_BACKEND"}
    env["PYTHONPATH"] = PYTHON_DIR
    tabs = {}
    gpu = "cuda:0" if torch.cuda.is_available() else "cpu"  # where model.device "auto" puts torch
    # (name, engine, model.device, the device the outputs must name)
    for name, eng, dev, where in (("compiled", "compiled", None, "cpu"), ("torch", "torch", None, gpu),
                                  ("torch-cpu", "torch", "cpu", "cpu")):
        extra = ["--set", f'model.device="{dev}"'] if dev else []
        r = subprocess.run([sys.executable, "-m", "stemfast", "analyze", str(tmp_path / "img.tif"), "-o",
                            str(tmp_path / name), "--set", f'model.engine="{eng}"', *extra], capture_output=True,
                           text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        tabs[name] = pd.read_csv(tmp_path / name / "img" / "sites.csv")
        # each input's summary names the engine and the device that ran the model on it (the torch
        # runs in the encode worker: its child's device), and the batch's labels follow
        summ = json.loads((tmp_path / name / "img" / "summary.json").read_text())["model"]
        batch = json.loads((tmp_path / name / "batch_summary.json").read_text())["model"]
        assert (summ["engine"], summ["device"]) == (batch["engine"], batch["device"]) == (eng, where)
        assert f"{eng} engine on {where}" in (tmp_path / name / "report.html").read_text()
    a = tabs["compiled"]
    for b in (tabs["torch"], tabs["torch-cpu"]):
        assert len(a) == len(b) > 100
        assert (a["class_id"].values == b["class_id"].values).all()
        assert (a["is_defect"].values == b["is_defect"].values).all()
    np.testing.assert_allclose(a["anomaly_score"], b["anomaly_score"], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(a["recon_error"], b["recon_error"], rtol=1e-3, atol=1e-7)


def test_batch_label_names_every_engine_that_ran(tmp_path):
    """The batch summary's engine is what ran the model on the inputs (their summaries), not only what
    the client chose: a Dask worker whose package cannot use the compiled engine runs torch, and the
    label says so."""
    from stemfast.batch.results import BatchReport, InputResult
    from stemfast.batch.runner import write_batch_outputs

    rep = BatchReport(out_dir=tmp_path, results=[InputResult("a", "a.tif", "done"), InputResult("b", "b.tif", "done")],
                      config_hash="x", model_source="shipped", model_engine="compiled")
    summaries = [{"name": "a", "status": "ok", "model": {"engine": "compiled"}},
                 {"name": "b", "status": "ok", "model": {"engine": "torch"}}]
    write_batch_outputs(rep, summaries, None)
    batch = json.loads((tmp_path / "batch_summary.json").read_text())
    assert batch["model"]["engine"] == "compiled and torch"
    assert "compiled and torch engine" in (tmp_path / "report.html").read_text()
    write_batch_outputs(rep, summaries[:1], None)
    assert json.loads((tmp_path / "batch_summary.json").read_text())["model"]["engine"] == "compiled"
    # inputs from before summaries named their engine: what this run chose
    write_batch_outputs(rep, [{"name": "a", "status": "ok", "model": {}}], None)
    assert json.loads((tmp_path / "batch_summary.json").read_text())["model"]["engine"] == "compiled"
    assert E.combined_engine([None, None]) is None
