"""Out-of-range settings and batch options are refused before any work, wherever they come from (``--set``,
a TOML file, a command-line option, Python), with a message naming the setting and its range; the ranges
of single settings are defined once (:data:`stemfast.limits.SETTING_LIMITS`)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from stemfast.config import dump_config, load_config
from stemfast.errors import EXIT_SETTINGS, SettingsError
from stemfast.limits import SETTING_LIMITS, Open

# each was accepted and failed later (a traceback, every input skipped) or was changed silently
OUT_OF_RANGE = [
    ({"analysis.top_n": -1}, "analysis.top_n must be >= 0, got -1"),
    ({"analysis.seed": -1}, "analysis.seed must be between 0 and 4294967295, got -1"),
    ({"analysis.seed": 2**32}, "analysis.seed must be between 0 and 4294967295"),
    ({"model.seed": -1}, "model.seed must be between 0 and 4294967295, got -1"),
    ({"model.channels": [0, 8, 16]}, "model.channels must be between 1 and 1024, got 0"),
    ({"model.stn_channels": [0, 0]}, "model.stn_channels must be between 1 and 1024, got 0"),
    ({"sites.intensity_radius_nn": -1}, "sites.intensity_radius_nn must be > 0 and <= 1, got -1"),
    ({"sites.intensity_radius_nn": 0}, "sites.intensity_radius_nn must be > 0 and <= 1, got 0"),
    ({"sites.refine_radius_nn": -1}, "sites.refine_radius_nn must be > 0 and <= 1, got -1"),
    ({"sites.refine_radius_nn": 5}, "sites.refine_radius_nn must be > 0 and <= 1, got 5"),
    ({"analysis.min_class_agreement": 5}, "analysis.min_class_agreement must be between -1 and 1, got 5"),
    ({"sites.lattice.min_inlier_fraction": -1}, "sites.lattice.min_inlier_fraction must be between 0 and 1"),
    ({"sites.node_tol_nn": -1}, "sites.node_tol_nn must be > 0 and <= 0.5, got -1"),
    ({"sites.node_tol_nn": 0.8}, "sites.node_tol_nn must be > 0 and <= 0.5, got 0.8"),
    ({"sites.lattice.max_gap_deg": -1}, "sites.lattice.max_gap_deg must be between 0 and 360, got -1"),
    ({"model.num_threads": -1}, "model.num_threads must be >= 1, got -1"),
    ({"model.num_threads": 0}, "model.num_threads must be >= 1, got 0"),
    ({"analysis.minibatch_above": -1}, "analysis.minibatch_above must be >= 0, got -1"),
    ({"model.rotation_symmetry": 1000000}, "model.rotation_symmetry must be between 1 and 12, got 1000000"),
    ({"model.rotation_symmetry": 0}, "model.rotation_symmetry must be between 1 and 12, got 0"),
    ({"model.epochs": 0}, "model.epochs must be between 1 and 100000, got 0"),
    ({"sites.border_px": -1}, "sites.border_px must be >= 0, got -1"),
    ({"sites.min_distance_nn": -1}, "sites.min_distance_nn must be > 0 and <= 1, got -1"),
    ({"sites.refine_noise_nn": -1}, "sites.refine_noise_nn must be >= 0, got -1"),
    ({"sites.off_lattice_strength": -1}, "sites.off_lattice_strength must be >= 0, got -1"),
    ({"sites.lattice.edge_margin_px": -1}, "sites.lattice.edge_margin_px must be >= 0, got -1"),
    ({"sites.lattice.max_extrapolation": -1}, "sites.lattice.max_extrapolation must be >= 0, got -1"),
    ({"model.mask_radius": -1}, "model.mask_radius must be > 0, got -1"),
    ({"analysis.n_neighbors": 3}, "analysis.n_neighbors must be >= 7, got 3"),
    ({"analysis.k_range": [], "analysis.n_classes": "none"},
     "analysis.k_range must hold at least one k when analysis.n_classes is none"),
]


@pytest.mark.parametrize("override, words", OUT_OF_RANGE)
def test_out_of_range_settings_are_refused_by_name(override, words):
    with pytest.raises(SettingsError) as exc:
        load_config(None, override)
    assert words in str(exc.value)


def test_a_toml_file_out_of_range_is_refused(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[analysis]\ntop_n = -1\n\n[sites.lattice]\nmax_gap_deg = 150.0\n")
    with pytest.raises(SettingsError, match="analysis.top_n must be >= 0, got -1"):
        load_config(p)


def _defaults():
    from stemfast.analysis import AnalysisSettings
    from stemfast.lattice import LatticeSettings
    from stemfast.model.settings import RVAEConfig
    from stemfast.sites import SiteSettings

    return {"sites": SiteSettings(), "sites.lattice": LatticeSettings(), "model": RVAEConfig(),
            "analysis": AnalysisSettings()}


def _outside(key: str, default):
    """A value of ``key`` just outside its range (for a tuple setting: the default with its first value so)."""
    lim = SETTING_LIMITS[key]
    if all(isinstance(x, str) for x in lim):
        bad = "bogus"
    else:
        lo, hi = lim
        bad = lo if isinstance(lo, Open) else lo - 1 if lo is not None else hi * 2
        bad = type(default[0] if isinstance(default, tuple) else default or 0)(bad)
    return (bad, *default[1:]) if isinstance(default, tuple) else bad


@pytest.mark.parametrize("key", sorted(k for k in SETTING_LIMITS if k != "patch_size"))
def test_every_limit_is_checked_when_the_settings_are_made(key):
    """Not only when a config is read: the Python API's settings classes refuse the value as well."""
    section, name = key.rsplit(".", 1)
    obj = _defaults()[section]
    bad = _outside(key, getattr(obj, name))
    with pytest.raises(SettingsError, match=f"{key} must be"):
        dataclasses.replace(obj, **{name: bad})
    with pytest.raises(SettingsError, match=f"{key} must be"):
        load_config(None, {key: list(bad) if isinstance(bad, tuple) else bad})


def test_the_python_api_refuses_out_of_range_settings():
    from stemfast.analysis import AnalysisSettings
    from stemfast.lattice import LatticeSettings
    from stemfast.model.settings import RVAEConfig
    from stemfast.sites import SiteSettings

    for make, words in [(lambda: AnalysisSettings(top_n=-1), "analysis.top_n"),
                        (lambda: AnalysisSettings(n_classes=None, k_range=()), "k_range"),
                        (lambda: SiteSettings(refine_radius_nn=-1), "sites.refine_radius_nn"),
                        (lambda: LatticeSettings(min_inlier_fraction=2), "sites.lattice.min_inlier_fraction"),
                        (lambda: RVAEConfig(stn_channels=(0, 0)), "model.stn_channels"),
                        (lambda: RVAEConfig(epochs=0), "model.epochs must be between 1 and 100000")]:
        with pytest.raises(SettingsError, match=words):
            make()


def test_values_at_the_ends_of_the_ranges_are_kept_and_round_trip(tmp_path):
    over = {"analysis.top_n": 0, "analysis.minibatch_above": 0, "analysis.min_class_agreement": -1.0,
            "analysis.seed": 2**32 - 1, "model.seed": 0, "model.rotation_symmetry": 12, "model.num_threads": 1,
            "model.epochs": 1, "model.channels": [1, 1, 1024], "sites.node_tol_nn": 0.5,
            "sites.refine_radius_nn": 1.0, "sites.intensity_radius_nn": 1.0,
            "sites.lattice.min_inlier_fraction": 0.0, "sites.lattice.max_gap_deg": 360.0,
            "analysis.k_range": []}  # k_range unused with n_classes given: as before
    c = load_config(None, over)
    assert c.analysis.top_n == 0 and c.model.rotation_symmetry == 12 and c.analysis.k_range == ()
    p = tmp_path / "c.toml"
    p.write_text(dump_config(c))
    assert load_config(p) == c


# ----------------------------------------------------------------------------- batch options

BAD_BATCH_OPTIONS = [
    ({"train_frames": 0}, "train_frames (--train-frames) must be an integer >= 1, got 0"),
    ({"max_train_inputs": 0}, "max_train_inputs (--train-inputs"),
    ({"max_train_inputs": -1}, "max_train_inputs (--train-inputs"),
    ({"frames_per_task": 0}, "frames_per_task (--frames-per-task) must be an integer >= 1, got 0"),
    ({"finetune": -3}, "finetune (--finetune) must be an integer >= 0, got -3"),
    ({"train_frames": 2.5}, "train_frames (--train-frames) must be an integer"),
    ({"cache_mb": -1.0}, "cache_mb must be a number of MiB >= 0 or None, got -1.0"),
]


@pytest.mark.parametrize("kwargs, words", BAD_BATCH_OPTIONS)
def test_batch_options_out_of_range_are_settings_errors_before_any_work(tmp_path, kwargs, words):
    from stemfast.batch import run_batch
    from stemfast.batch.runner import BatchOptions

    with pytest.raises(SettingsError) as exc:
        BatchOptions(**kwargs)
    assert words in str(exc.value)
    f = tmp_path / "x.npy"
    np.save(f, np.zeros((8, 8), np.float32))
    with pytest.raises(SettingsError):
        run_batch(f, tmp_path / "out", show_progress=False, **kwargs)
    assert not (tmp_path / "out").exists()
    assert BatchOptions(train_frames=1, max_train_inputs=1, frames_per_task=1, finetune=0, cache_mb=0)


@pytest.mark.parametrize("argv, words", [
    (["batch", "{f}", "--train", "--train-frames", "0"], "train_frames (--train-frames) must be an integer >= 1"),
    (["batch", "{f}", "--train", "--train-inputs", "0"], "max_train_inputs (--train-inputs"),
    (["batch", "{f}", "--train", "--train-inputs", "-1"], "max_train_inputs (--train-inputs"),
    (["batch", "{f}", "--train", "--frames-per-task", "0"], "frames_per_task (--frames-per-task)"),
    (["analyze", "{f}", "--finetune", "-3"], "finetune (--finetune) must be an integer >= 0, got -3"),
    (["analyze", "{f}", "--set", "analysis.top_n=-1"], "analysis.top_n must be >= 0, got -1"),
    (["analyze", "{f}", "--set", "model.rotation_symmetry=1000000"],
     "model.rotation_symmetry must be between 1 and 12"),
    (["analyze", "{f}", "--epochs", "0"], "model.epochs must be between 1 and 100000, got 0"),
    (["train", "{f}", "--train-frames", "0"], "train_frames (--train-frames) must be an integer >= 1"),
    (["train", "{f}", "--max-inputs", "0"], "stemfast train: --max-inputs) must be an integer >= 1, got 0"),
])
def test_the_command_line_exits_2_with_the_message_before_any_work(tmp_path, capsys, argv, words):
    from stemfast.cli import main

    f = tmp_path / "x.npy"
    np.save(f, np.zeros((8, 8), np.float32))
    out = tmp_path / ("m.pt" if argv[0] == "train" else "out")
    args = [a.format(f=f) for a in argv] + ["-o", str(out)]
    if argv[0] != "train":
        args.append("--no-companion")
    assert main(args) == EXIT_SETTINGS
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert not out.exists()
