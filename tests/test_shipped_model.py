"""The pretrained default model shipped with stemfast: checks at load, default use, fine-tuning, GPU path."""
from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from stemfast.model import RVAE, RVAEConfig, shipped
from stemfast.model.shipped import ShippedModelError

from encoding_checks import assert_same_encoding

HAVE_SHIPPED = shipped.MODEL_PATH.is_file() and shipped.MANIFEST_PATH.is_file()
needs_shipped = pytest.mark.skipif(not HAVE_SHIPPED, reason="no shipped model in the package data")


@pytest.fixture(scope="module")
def image():
    from stemfast.synthetic import make_mos2

    return make_mos2(shape=(160, 160), seed=11, rotation_deg=12.0).image


@pytest.fixture
def copied(tmp_path, monkeypatch):
    """The shipped files copied to tmp_path, with the module pointed at the copies."""
    mp, jp = tmp_path / shipped.MODEL_PATH.name, tmp_path / shipped.MANIFEST_PATH.name
    shutil.copyfile(shipped.MODEL_PATH, mp)
    shutil.copyfile(shipped.MANIFEST_PATH, jp)
    monkeypatch.setattr(shipped, "MODEL_PATH", mp)
    monkeypatch.setattr(shipped, "MANIFEST_PATH", jp)
    return mp, jp


# ----------------------------------------------------------------------------- package data


@needs_shipped
def test_shipped_model_loads_with_checksum_tag_and_contract():
    man = shipped.manifest()
    m = shipped.load_default_model(map_location="cpu")
    assert m.extra["sha256"] == man["sha256"] == shipped._sha256(shipped.MODEL_PATH)
    assert m.extra["shipped"] == {"name": man["name"], "version": man["version"]}
    assert "patch_size" not in m.extra  # patches are cut per image from its spacing
    assert m.extra["contract"]["version"] == shipped.INPUT_CONTRACT_VERSION
    # small enough for the wheel
    assert shipped.MODEL_PATH.stat().st_size < 2 * 2**20
    # the shipped architecture is the default one, so the default settings use it
    assert shipped.compatible_settings(m.config, RVAEConfig()) == []
    # trained on all four materials over the advertised spacing range
    tr = man["training"]
    assert set(tr["materials"]) == {"mos2", "ws2", "mose2", "wse2"}
    assert tr["spacing_px_range"][0] < 7 and tr["spacing_px_range"][1] > 18


@needs_shipped
def test_damaged_weights_are_refused(copied):
    mp, _ = copied
    raw = bytearray(mp.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    mp.write_bytes(bytes(raw))
    with pytest.raises(ShippedModelError, match="SHA-256"):
        shipped.load_default_model()
    with pytest.warns(RuntimeWarning, match="shipped default model not used"):
        assert shipped.default_model() is None


@needs_shipped
def test_usable_manifest_makes_default_models_checks_without_loading(copied):
    """What decides whether the shipped model is used, without torch: the manifest when usable;
    None with default_model's warning for damaged weights, a changed contract or other settings."""
    from stemfast.config import PipelineConfig, apply_overrides

    mp, jp = copied
    man = shipped.usable_manifest(PipelineConfig())
    assert man is not None and man["sha256"] == json.loads(jp.read_text())["sha256"]
    assert shipped.usable_manifest(apply_overrides(PipelineConfig(), {"model.latent_dim": 7})) is None
    bad = {**man, "contract": {**man["contract"], "version": shipped.INPUT_CONTRACT_VERSION + 1}}
    jp.write_text(json.dumps(bad))
    with pytest.warns(RuntimeWarning, match="input contract"):
        assert shipped.usable_manifest() is None
    assert shipped.usable_manifest(probe=False) is not None  # the contract is left to the caller
    with pytest.raises(ShippedModelError, match="contract differs from its manifest"):
        shipped.load_default_model(probe=False)  # the model's own contract is the original one
    jp.write_text(json.dumps(man))
    raw = bytearray(mp.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    mp.write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning, match="SHA-256"):
        assert shipped.usable_manifest(probe=False) is None


@needs_shipped
def test_version_tag_must_match_the_manifest(copied):
    _, jp = copied
    man = json.loads(jp.read_text())
    man["version"] = "0.0-other"
    jp.write_text(json.dumps(man))
    with pytest.raises(ShippedModelError, match="tag"):
        shipped.load_default_model()


def test_missing_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(shipped, "MANIFEST_PATH", tmp_path / "none.json")
    with pytest.raises(ShippedModelError, match="train_default"):
        shipped.load_default_model()


def test_contract_detects_a_changed_patch_normalisation(monkeypatch):
    stored = shipped.input_contract(32)
    shipped.check_contract(stored, 32)  # the code matches itself
    with pytest.raises(ShippedModelError, match="input contract"):
        shipped.check_contract({**stored, "version": shipped.INPUT_CONTRACT_VERSION + 1}, 32)
    # a different normalisation (here: patches scaled by 1.5) moves the probe quantiles
    import stemfast.patches as P

    orig = P.PatchNorm.from_image.__func__

    def wider(cls, image):
        n = orig(cls, image)
        return P.PatchNorm(center=n.center, scale=n.scale / 1.5)

    monkeypatch.setattr(P.PatchNorm, "from_image", classmethod(wider))
    shipped._probe.cache_clear()
    try:
        with pytest.raises(ShippedModelError, match="normalisation changed"):
            shipped.check_contract(stored, 32)
    finally:
        monkeypatch.undo()
        shipped._probe.cache_clear()


@needs_shipped
@pytest.mark.parametrize("engine", ["compiled", "torch"])
def test_refused_model_falls_back_to_training_with_a_warning(image, monkeypatch, engine):
    from stemfast.config import apply_overrides
    from stemfast.pipeline import PipelineConfig, run_image

    def refuse(*a, **kw):
        raise ShippedModelError("input contract changed (test)")

    monkeypatch.setattr(shipped, "check_contract", refuse)  # both engines check the contract
    cfg = apply_overrides(PipelineConfig(), {"model.epochs": 1, "model.stn_epochs": 1, "model.engine": engine})
    with pytest.warns(RuntimeWarning, match="input contract changed"):
        table, summary, model = run_image(image, config=cfg)
    assert "shipped" not in model.extra and len(table) > 50


def test_other_architecture_settings_do_not_use_the_shipped_model():
    assert shipped.compatible_settings(RVAEConfig(), RVAEConfig(latent_dim=6)) == ["latent_dim"]
    from stemfast.config import apply_overrides
    from stemfast.pipeline import PipelineConfig

    if HAVE_SHIPPED:
        assert shipped.default_model(apply_overrides(PipelineConfig(), {"model.model": "vae"})) is None


# ----------------------------------------------------------------------------- default use


@needs_shipped
def test_run_image_uses_the_shipped_model_by_default(image, monkeypatch):
    from stemfast.pipeline import run_image

    def no_training(*a, **k):
        raise AssertionError("run_image must not train by default")

    monkeypatch.setattr(RVAE, "fit", classmethod(no_training))
    table, summary, model = run_image(image)
    assert model.extra["shipped"]["name"] == shipped.manifest()["name"]
    assert len(table) > 50 and summary["n_sites"] == len(table)
    assert np.isfinite(np.asarray(table["anomaly_score"])).all()


@needs_shipped
def test_batch_uses_and_names_the_shipped_model(image, tmp_path, monkeypatch):
    from stemfast.batch import run_batch
    from stemfast.config import file_sha256
    from stemfast.io import write_tiff

    data = tmp_path / "data"
    data.mkdir()
    write_tiff(data / "img.tif", image, pixel_size=0.012, unit="nm")

    def no_training(*a, **k):
        raise AssertionError("batch must not train by default")

    monkeypatch.setattr(RVAE, "fit", classmethod(no_training))
    out = tmp_path / "out"
    rep = run_batch(data, out, show_progress=False)
    assert not rep.model_trained and rep.model_source.startswith("shipped")
    man = shipped.manifest()
    assert file_sha256(out / "model.pt") == man["sha256"]
    s = json.loads((out / "img" / "summary.json").read_text())
    from stemfast.model.engine import engine_for
    from stemfast.config import load_config

    # the engine that ran it: compiled on the CPU (model.engine auto), torch where a GPU may be used;
    # and the device (torch.cuda.is_available() where a GPU is used: the first one)
    engine = engine_for(load_config())
    device = "cuda:0" if engine == "torch" and torch.cuda.is_available() else "cpu"
    assert s["model"] == {"name": man["name"], "version": man["version"], "sha256": man["sha256"],
                          "source": "shipped", "engine": engine, "device": device, "refused": None,
                          "architecture": shipped.architecture(RVAEConfig.from_dict(man["config"]))}
    assert rep.model_engine == s["model"]["engine"]
    html = (out / "report.html").read_text()
    assert man["name"] in html and man["version"] in html and man["sha256"][:16] in html


@needs_shipped
def test_batch_finetune_adapts_the_shipped_model(image, tmp_path):
    from stemfast.batch import load_model, run_batch
    from stemfast.io import write_tiff

    data = tmp_path / "data"
    data.mkdir()
    write_tiff(data / "img.tif", image)
    out = tmp_path / "out"
    rep = run_batch(data, out, show_progress=False, finetune=3)
    assert rep.model_trained
    m = load_model(out / "model.pt")
    assert m.extra["finetune_steps"] == 3 and m.extra["finetuned_from"]["name"] == shipped.manifest()["name"]
    assert "patch_size" not in m.extra
    info = json.loads((out / "model.json").read_text())
    assert info["finetune_steps"] == 3 and "fine-tuned" in info["name"]
    s = json.loads((out / "img" / "summary.json").read_text())
    assert s["model"]["sha256"] == info["sha256"] and "fine-tuned" in s["model"]["name"]


@needs_shipped
@pytest.mark.parametrize("engine", ["compiled", "torch"])
def test_a_refused_shipped_model_is_recorded_in_every_output(image, copied, tmp_path, engine):
    """The shipped model refused (here: damaged weights) and a model trained instead: the reason went to
    stderr only, while batch_summary.json, summary.json and report.html said "trained on the inputs"
    and nothing else. Now each records the refusal and its reason; a later --train run drops the note."""
    from stemfast.batch import run_batch
    from stemfast.config import load_config
    from stemfast.io import write_tiff

    mp, _ = copied
    raw = bytearray(mp.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    mp.write_bytes(bytes(raw))
    data = tmp_path / "data"
    data.mkdir()
    write_tiff(data / "img.tif", image)
    out = tmp_path / "out"
    cfg = load_config(None, {"model.epochs": 1, "model.stn_epochs": 1, "model.engine": engine})
    with pytest.warns(RuntimeWarning, match="shipped default model not used"):
        rep = run_batch(data, out, config=cfg, show_progress=False)
    bs = json.loads((out / "batch_summary.json").read_text())
    reason = bs["model"].get("refused") or ""
    assert reason.startswith("shipped model default_rvae.pt: SHA-256") and "damaged or replaced file" in reason
    assert bs["model"]["source"] == "trained" and rep.model_trained and rep.model_refused == reason
    s = json.loads((out / "img" / "summary.json").read_text())
    assert s["model"]["refused"] == rep.model_refused and s["model"]["sha256"] == bs["model"]["sha256"]
    html = (out / "report.html").read_text()
    assert "<p class='warn'>warning: the shipped default model was not used (shipped model default_rvae.pt" in html
    assert "a model was trained on these inputs instead" in html
    # --train: the shipped model is not looked at; the same trained model (reused), no refusal recorded any more
    rep2 = run_batch(data, out, config=cfg, show_progress=False, train=True)
    assert rep2.model_refused is None and rep2.model_sha256 == rep.model_sha256 and not rep2.model_trained
    assert json.loads((out / "batch_summary.json").read_text())["model"]["refused"] is None
    assert "refused" not in json.loads((out / "model.json").read_text())
    assert "shipped default model was not used" not in (out / "report.html").read_text()


@needs_shipped
@pytest.mark.parametrize("cli, setting, option", [
    (["--plain-vae"], {"model.model": "vae"}, "model.model = 'vae' (--plain-vae)"),
    (["--latent-dim", "7"], {"model.latent_dim": 7}, "model.latent_dim = 7 (--latent-dim)"),
    (["--set", "model.input_size=32"], {"model.input_size": 32}, "model.input_size = 32 (--set model.input_size)")])
def test_finetune_with_another_architecture_is_a_settings_error(image, tmp_path, capsys, cli, setting, option):
    """--finetune N with --plain-vae / --latent-dim / another input size trained a new model from
    scratch without a word (exit 0, model.json finetune_steps 0): the shipped network cannot take
    those settings. Now exit 2 naming both options, before any work -- in the API too."""
    from stemfast.batch import run_batch
    from stemfast.cli import main
    from stemfast.config import load_config
    from stemfast.errors import EXIT_SETTINGS, SettingsError

    data = tmp_path / "img.npy"
    np.save(data, image)
    out = tmp_path / "out"
    with pytest.raises(SettingsError) as exc:
        run_batch(data, out, config=load_config(None, setting), finetune=3, show_progress=False)
    assert "--finetune 3 adapts the shipped model" in str(exc.value) and option in str(exc.value)
    assert not out.exists()
    for cmd in (["batch", str(data), "-o", str(out)], ["analyze", str(data), "-o", str(out)]):
        assert main([*cmd, "--finetune", "3", *cli]) == EXIT_SETTINGS
        err = capsys.readouterr().err
        assert "--finetune 3" in err and option in err and "Traceback" not in err
        assert not out.exists()


@needs_shipped
def test_the_shipped_model_given_as_a_file_is_named_by_its_tag(image, tmp_path):
    """--model default_rvae.pt: summary.json named it "name": null, "version": null (as any model file):
    the name, version and architecture now come from the file."""
    from stemfast.batch import run_batch

    data = tmp_path / "img.npy"
    np.save(data, image)
    man = shipped.manifest()
    rep = run_batch(data, tmp_path / "out", model_path=shipped.MODEL_PATH, show_progress=False)
    assert rep.results[0].status == "done"
    m = json.loads((tmp_path / "out" / "img" / "summary.json").read_text())["model"]
    assert (m["name"], m["version"], m["source"]) == (man["name"], man["version"], str(shipped.MODEL_PATH))
    assert m["architecture"] == shipped.architecture(RVAEConfig.from_dict(man["config"]))
    assert f"{man['name']} {man['version']} sha256" in (tmp_path / "out" / "report.html").read_text()


# ----------------------------------------------------------------------------- fine-tuning


def test_finetune_changes_a_copy_only():
    from stemfast.synthetic import render_site_patches

    patches, _, _ = render_site_patches(400, 32, seed=0)
    base = RVAE.fit(patches, epochs=1, stn_epochs=1, progress=False)
    before = {k: v.clone() for k, v in base.network.state_dict().items()}
    tuned = base.finetune(patches, steps=5)
    after = base.network.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base model is unchanged
    new = tuned.network.state_dict()
    assert any(not torch.equal(before[k], new[k]) for k in before if k.startswith(("encoder", "decoder")))
    assert all(torch.equal(before[k], new[k]) for k in before if k.startswith("stn."))  # STN frozen
    assert tuned.extra["finetune_steps"] == 5 and len(tuned.history["finetune"]["loss"]) == 5
    # seeded: the same call gives the same weights
    again = base.finetune(patches, steps=5)
    assert all(torch.equal(new[k], again.network.state_dict()[k]) for k in new)
    with pytest.raises(ValueError, match="steps"):
        base.finetune(patches, steps=-1)


# ----------------------------------------------------------------------------- training script


def test_training_settings_are_seeded_and_span_the_materials():
    from stemfast.model.train_default import draw_image_settings

    a = [draw_image_settings(np.random.default_rng(3), i) for i in range(8)]
    b = [draw_image_settings(np.random.default_rng(3), i) for i in range(8)]
    assert a == b
    rng = np.random.default_rng(0)
    many = [draw_image_settings(rng, i) for i in range(200)]
    assert {s["material"] for s in many} == {"mos2", "ws2", "mose2", "wse2"}
    nn = np.array([s["nn_px"] for s in many])
    assert nn.min() >= 5.0 and nn.max() <= 25.0 and nn.min() < 6 and nn.max() > 20


def test_training_patches_come_from_the_inference_patch_path():
    from stemfast.synthetic import image as synth
    from stemfast.model.train_default import render_training_patches

    z = (synth.Z_MO, synth.Z_S, synth.Z_EXPONENT)
    patches, records = render_training_patches(2, seed=1, patches_per_image=50, spacing_range=(8.0, 12.0))
    assert (synth.Z_MO, synth.Z_S, synth.Z_EXPONENT) == z  # contrast restored
    s = RVAEConfig().input_size  # the shipped model's input
    assert patches.dtype == np.float32 and patches.shape[1:] == (s, s)
    assert len(patches) == sum(r["n_used"] for r in records) and len(patches) > 0
    assert np.isfinite(patches).all()


def test_the_training_script_records_its_code_and_repeats_its_weights(tmp_path):
    """Two runs of the same code give the same weights (the arrays' SHA-256; the .pt and the manifest
    also hold timings), and the manifest names the code that trained it: a retrained file under
    changed code is told apart from the shipped one."""
    from stemfast import __version__
    from stemfast.model.train_default import train_default_model

    kw = dict(n_images=2, seed=1, patches_per_image=40, epochs=1, stn_epochs=1)
    a = train_default_model(tmp_path / "a", **kw)
    b = train_default_model(tmp_path / "b", **kw)
    assert a["arrays"]["sha256"] == b["arrays"]["sha256"]
    assert a["training"]["stemfast_version"] == __version__
    commit = a["training"]["git_commit"]
    assert commit is None or (len(commit) == 40 and all(c in "0123456789abcdef" for c in commit))


# ----------------------------------------------------------------------------- devices


def test_cpu_is_used_where_cuda_is_missing(monkeypatch):
    from stemfast.model.training import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device("cuda")


@needs_shipped
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_shipped_model_on_cuda_matches_cpu(image):
    """Same code path on the GPU: kornia warps, encoder and decoder on the device, in float32 (no
    autocast, no TF32 in inference), so the same latents, errors and angles as on the CPU."""
    from stemfast.pipeline import prepare

    prep = prepare(image)
    p = np.asarray(prep.patches)
    cpu_model = shipped.load_default_model(map_location="cpu")
    cpu = cpu_model.encode(p)
    gpu_model = shipped.load_default_model(map_location="cuda")
    assert gpu_model.device.type == "cuda" and next(gpu_model.network.parameters()).is_cuda
    gpu = gpu_model.encode(p)
    assert_same_encoding(cpu, gpu, 360.0 / cpu_model.config.rotation_symmetry)
    assert torch.backends.cudnn.allow_tf32 is True  # the process-wide default is restored after encode


@needs_shipped
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pipeline_on_cuda_gives_the_cpus_classes_and_scores(image):
    """The whole pipeline with the model on the GPU (torch engine) and on the CPU: the same sites,
    classes, defect scores and flags."""
    import dataclasses

    from stemfast.config import PipelineConfig
    from stemfast.pipeline import run_image

    tables = {}
    for device in ("cpu", "cuda"):
        base = PipelineConfig()
        cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, device=device, engine="torch"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tables[device], _, model = run_image(image, config=cfg)
        assert model.device.type == device  # the setting model.device is followed, also on a GPU machine
    a, b = tables["cpu"], tables["cuda"]
    np.testing.assert_array_equal(a["x"], b["x"])
    np.testing.assert_array_equal(a["class_id"], b["class_id"])
    np.testing.assert_allclose(b["anomaly_score"], a["anomaly_score"], rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(a["is_defect"], b["is_defect"])


def test_cli_model_choice_options():
    from stemfast.cli import build_parser

    p = build_parser()
    for cmd in (["analyze", "x.tif"], ["batch", "DIR"]):
        a = p.parse_args(cmd)
        assert a.train is False and a.finetune == 0  # default: the shipped model
        assert p.parse_args(cmd + ["--train"]).train is True
        assert p.parse_args(cmd + ["--finetune", "50"]).finetune == 50
        with pytest.raises(SystemExit):
            p.parse_args(cmd + ["--train", "--finetune", "5"])
    assert p.parse_args(["bench", "--train"]).train is True


def test_bench_total_is_the_wall_time(tmp_path, capsys):
    """``bench``'s total is the frame's wall time from image to table: what no stage timer holds
    (tables, the lattice's summary and checks) is its own ``other`` row, so sites/s is end to end."""
    import json
    import time

    from stemfast.cli import main

    t0 = time.perf_counter()
    assert main(["bench", "--size", "256", "--no-warmup", "--json", str(tmp_path / "b.json")]) == 0
    elapsed = time.perf_counter() - t0
    rows = {r["stage"]: r for r in json.loads((tmp_path / "b.json").read_text())["stages"]}
    assert "other" in rows and rows["other"]["seconds"] >= 0
    stages = sum(r["seconds"] for k, r in rows.items() if k != "total")
    assert rows["total"]["seconds"] == pytest.approx(stages)
    assert rows["total"]["seconds"] <= elapsed  # (rendering the synthetic image and loading the model are not in it)
    out = capsys.readouterr().out
    assert "other" in out
    assert " engine on cpu)" in out or " engine on cuda:0)" in out  # what ran the model, and where
