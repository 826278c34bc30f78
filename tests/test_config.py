"""Run configuration as TOML: load / dump round trip, validation, the resolved stemfast.toml."""
from __future__ import annotations

import hashlib

import pytest

from stemfast import __version__
from stemfast.config import (
    apply_overrides,
    config_hash,
    dump_config,
    file_sha256,
    load_config,
    parse_toml,
    write_resolved_config,
)
from stemfast.pipeline import PipelineConfig


def _custom():
    return load_config(None, {
        "patch_size": 31,
        "sites": {"spacing": 12.5, "refine": "com", "backend": "numpy", "lattice": {"max_rms": 0.2, "max_rounds": 3}},
        "model.epochs": 7,
        "model.channels": [8, 16, 24],
        "model.model": "vae",
        "model.device": "cpu",
        "analysis": {"n_classes": None, "k_range": [2, 4], "defect_cutoff": 6.5},
    })


def test_defaults_equal_pipeline_defaults():
    assert load_config(None) == PipelineConfig()


def test_overrides_nested_and_dotted_are_applied_and_typed():
    c = _custom()
    assert c.patch_size == 31
    assert c.sites.spacing == 12.5 and c.sites.refine == "com" and c.sites.backend == "numpy"
    assert c.sites.lattice.max_rms == 0.2 and c.sites.lattice.max_rounds == 3
    # untouched nested keys keep their defaults
    assert c.sites.lattice.fit_radius == PipelineConfig().sites.lattice.fit_radius
    assert c.model.epochs == 7 and c.model.channels == (8, 16, 24) and c.model.model == "vae"
    assert c.analysis.n_classes is None and c.analysis.k_range == (2, 4)
    # an int where a float is expected is converted
    assert isinstance(load_config(None, {"sites.spacing": 12}).sites.spacing, float)


def test_round_trip_through_toml(tmp_path):
    c = _custom()
    text = dump_config(c)
    data = parse_toml(text)  # valid TOML
    assert data["sites"]["spacing"] == 12.5
    assert "threshold" not in data["sites"]  # None (its default) left out ...
    assert "# threshold is not set" in text  # ... and written as a comment
    assert data["analysis"]["n_classes"] == "none"  # None where the default is 3: spelled out
    assert data["model"]["channels"] == [8, 16, 24]  # tuples as arrays
    assert data["sites"]["lattice"]["max_rounds"] == 3  # nested table
    p = tmp_path / "run.toml"
    p.write_text(text)
    back = load_config(p)
    assert back == c
    assert config_hash(back) == config_hash(c)
    # defaults round trip too (every None of the defaults)
    p.write_text(dump_config(PipelineConfig()))
    assert load_config(p) == PipelineConfig()


def test_config_hash_changes_with_any_setting():
    base = load_config(None)
    assert config_hash(base) == config_hash(load_config(None))
    assert config_hash(load_config(None, {"model.epochs": base.model.epochs + 1})) != config_hash(base)
    assert config_hash(load_config(None, {"sites.lattice.max_rms": 0.3})) != config_hash(base)


@pytest.mark.parametrize("override, where, valid", [
    ({"model.epoch": 3}, "model.epoch", "epochs"),
    ({"sites.lattice.fitradius": 2.0}, "sites.lattice.fitradius", "fit_radius"),
    ({"analysis": {"cutoff": 2}}, "analysis.cutoff", "defect_cutoff"),
    ({"patchsize": 3}, "patchsize", "patch_size"),
])
def test_unknown_key_names_the_key_and_the_valid_ones(override, where, valid):
    with pytest.raises(ValueError) as ei:
        load_config(None, override)
    msg = str(ei.value)
    assert where in msg and valid in msg


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[model]\nepochs = 2\nlearning_rate = 0.1\n")
    with pytest.raises(ValueError, match=r"bad\.toml.*model\.learning_rate.*valid keys of \[model\]"):
        load_config(p)


@pytest.mark.parametrize("override, pattern", [
    ({"model.epochs": "ten"}, r"model\.epochs: expected an integer"),
    ({"model.epochs": 2.5}, r"model\.epochs: expected an integer"),
    ({"model.amp": 1}, r"model\.amp: expected true or false"),
    ({"model.model": "gan"}, r"model\.model: expected one of \['rvae', 'vae'\]"),
    ({"model.channels": [8, 16]}, r"model\.channels: expected 3 values"),
    ({"sites.spacing": "12"}, r"sites\.spacing"),
    ({"sites.spacing": 1.0}, r"invalid \[sites\] settings: spacing must be >= 2"),
    ({"analysis.defect_cutoff": -1.0}, r"invalid \[analysis\] settings"),
    ({"sites": 3}, r"\[sites\] must be a table"),
    ({"patch_size": 2}, r"patch_size must be >= 3"),
])
def test_bad_values_are_rejected_clearly(override, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_config(None, override)


def test_invalid_toml_is_a_value_error(tmp_path):
    p = tmp_path / "broken.toml"
    p.write_text("[model\nepochs = 2\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(p)


def test_file_then_overrides_precedence(tmp_path):
    p = tmp_path / "a.toml"
    p.write_text("patch_size = 25\n[model]\nepochs = 3\nlatent_dim = 6\n")
    c = load_config(p, {"model.epochs": 5})
    assert (c.patch_size, c.model.epochs, c.model.latent_dim) == (25, 5, 6)
    assert apply_overrides(c, {"model": {"latent_dim": 2}}).model.latent_dim == 2


def test_file_sha256_is_chunked_and_correct(tmp_path):
    p = tmp_path / "blob.bin"
    data = bytes(range(256)) * 1000
    p.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert file_sha256(p) == want
    assert file_sha256(p, chunk_size=7) == want


def test_resolved_config_has_version_inputs_and_loads_back(tmp_path):
    c = _custom()
    a = tmp_path / "in" / "a b.tif"
    b = tmp_path / "in" / 'we"ird\\name.npy'
    a.parent.mkdir()
    a.write_bytes(b"first")
    b.write_bytes(b"second")
    out = tmp_path / "OUT" / "stemfast.toml"
    write_resolved_config(out, c, inputs=[a, b])
    data = parse_toml(out.read_text())
    assert data["stemfast"]["version"] == __version__
    assert data["stemfast"]["config_hash"] == config_hash(c)
    assert "date" in data["stemfast"]
    assert data["inputs"] == {"a b.tif": hashlib.sha256(b"first").hexdigest(),
                              'we"ird\\name.npy': hashlib.sha256(b"second").hexdigest()}
    # the metadata tables are ignored when the file is used as a config
    assert load_config(out) == c
    # no temporary files left next to it
    assert sorted(p.name for p in out.parent.iterdir()) == ["stemfast.toml"]


def test_dump_config_extra_tables_and_scalars():
    text = dump_config(PipelineConfig(), extra={"note": "x\ty", "meta": {"n": 3, "list": [1.5, 2.0]}})
    d = parse_toml(text)
    assert d["note"] == "x\ty" and d["meta"] == {"n": 3, "list": [1.5, 2.0]}
    with pytest.raises(ValueError):
        dump_config(PipelineConfig(), extra={"model": {"x": 1}})


def test_none_where_the_default_is_not_none_round_trips(tmp_path):
    c = load_config(None, {"analysis.n_classes": None, "model.max_train_patches": None, "sites.refine": "none"})
    assert c.analysis.n_classes is None and c.model.max_train_patches is None and c.sites.refine is None
    text = dump_config(c)
    assert 'n_classes = "none"' in text
    p = tmp_path / "c.toml"
    p.write_text(text)
    assert load_config(p) == c
    # "none" is only None for settings that may be None
    with pytest.raises(ValueError, match="model.epochs"):
        load_config(None, {"model.epochs": "none"})


@pytest.mark.parametrize("override, pattern", [
    ({"analysis.defect_cutoff": float("nan")}, r"analysis.defect_cutoff must be a finite number, got nan"),
    ({"analysis.defect_cutoff": float("inf")}, r"analysis.defect_cutoff must be a finite number"),
    ({"analysis.n_classes": 1000}, r"analysis.n_classes must be between 1 and 64"),
    ({"analysis.k_range": [2, 500]}, r"analysis.k_range must be between 1 and 64"),
    ({"sites.backend": "bogus"}, r"sites.backend must be one of cpp, numba, numpy"),
    ({"sites.spacing": 1e9}, r"sites.spacing must be <= 2048"),
    ({"sites.lattice.max_rms": float("nan")}, r"sites.lattice.max_rms must be a finite number"),
    ({"model.epochs": 0}, r"model.epochs must be between 1"),
    ({"patch_size": 2}, r"patch_size must be >= 3"),
])
def test_settings_are_finite_and_in_range(override, pattern):
    from stemfast.errors import SettingsError

    with pytest.raises(SettingsError, match=pattern):
        load_config(None, override)


def test_check_limits_checks_a_config_built_in_python():
    import dataclasses

    from stemfast.config import check_limits
    from stemfast.errors import SettingsError

    cfg = load_config(None)
    check_limits(cfg)  # the defaults pass
    # a range of SETTING_LIMITS is refused already when the settings are made
    with pytest.raises(SettingsError, match="analysis.n_classes must be between 1 and 64, got 500"):
        dataclasses.replace(cfg.analysis, n_classes=500)
    # the finite rule is check_limits' own
    bad = dataclasses.replace(cfg, analysis=dataclasses.replace(cfg.analysis, defect_cutoff=float("nan")))
    with pytest.raises(SettingsError, match="analysis.defect_cutoff must be a finite number"):
        check_limits(bad)


def test_upper_limits_of_spacing_and_patch_size():
    from stemfast.errors import SettingsError

    with pytest.raises(SettingsError, match="patch_size must be <= 1024"):
        load_config(None, {"patch_size": 5000})
    assert load_config(None, {"sites.spacing": 2048.0}).sites.spacing == 2048.0
