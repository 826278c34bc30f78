"""Resuming a batch: a rerun that changes only settings that change no result
(:data:`stemfast.config.RESULT_NEUTRAL_SETTINGS`: torch's threads, the progress bar) reuses the results,
and says so; a rerun that changes any other setting makes them again."""
from __future__ import annotations

import dataclasses
import json
import logging
from hashlib import sha256
from pathlib import Path

import numpy as np
import pytest

from stemfast.batch import run_batch
from stemfast.config import config_hash, load_config, parse_toml

TINY = {"model.epochs": 2, "model.stn_epochs": 1, "model.max_train_patches": 600, "model.batch_size": 64,
        "model.input_size": 16, "model.channels": [8, 8, 8], "model.stn_channels": [4, 8], "model.patience": 2,
        "model.device": "cpu", "analysis.top_n": 20}


def _data(root: Path) -> Path:
    from stemfast.synthetic import make_mos2

    root.mkdir()
    for i in range(2):
        np.save(root / f"img{i}.npy", make_mos2(shape=(128, 128), seed=i).image)
    return root


def _files(out: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under the input folders and the model: ``{path: (mtime_ns, bytes)}``."""
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.rglob("*"))
            if p.is_file() and (p.parent != out or p.name.startswith("model"))}


def _no_work(monkeypatch) -> None:
    """Reading, preparing or training an input fails the test."""
    import stemfast.io
    import stemfast.model
    import stemfast.pipeline

    def boom(*a, **k):
        raise AssertionError("a rerun with only result-neutral settings changed must not read, prepare or train")

    monkeypatch.setattr(stemfast.io, "read", boom)
    monkeypatch.setattr(stemfast.pipeline, "prepare", boom)
    monkeypatch.setattr(stemfast.model.RVAE, "fit", classmethod(boom))


def _with(config, **model):
    return dataclasses.replace(config, model=dataclasses.replace(config.model, **model))


def test_only_result_neutral_settings_changed_reuses_the_results(tmp_path, monkeypatch, caplog):
    """Made with one torch thread, rerun with four and the progress bar off: both inputs current, nothing
    read or rewritten, the log says why; stemfast.toml records what this run asked for, each summary
    and the batch summary what the kept results were made with."""
    data, out = _data(tmp_path / "data"), tmp_path / "out"
    first = run_batch(data, out, config=load_config(None, {"model.num_threads": 1}), show_progress=False)
    assert {r.status for r in first.results} == {"done"}
    before = _files(out)
    with monkeypatch.context() as m:
        _no_work(m)
        with caplog.at_level(logging.INFO, logger="stemfast.batch"):
            again = run_batch(data, out, config=load_config(None, {"model.num_threads": 4, "model.progress": False}),
                              show_progress=False)
    assert {r.name: r.status for r in again.results} == {"img0": "current", "img1": "current"}
    assert not again.did_work and again.config_hash == first.config_hash
    assert _files(out) == before  # the results, their markers and the model untouched
    assert "img0: current (reused): made with model.num_threads = 1" in caplog.text
    toml = parse_toml((out / "stemfast.toml").read_text())
    assert toml["model"]["num_threads"] == 4 and toml["model"]["progress"] is False  # what was run
    summary = json.loads((out / "img0" / "summary.json").read_text())
    assert summary["neutral_settings"] == {"model.num_threads": 1, "model.progress": None}  # what made them
    batch = json.loads((out / "batch_summary.json").read_text())
    assert batch["neutral_settings"] == {"model.num_threads": 4, "model.progress": False}
    assert batch["made_with_other_neutral_settings"] == {
        f"img{i}": {"model.num_threads": 1, "model.progress": None} for i in range(2)}
    assert "made with other values of settings that change no result" in (out / "report.html").read_text()


def test_any_other_setting_changed_makes_the_results_again(tmp_path):
    """The same rerun with the defect cutoff changed too: every input is made again."""
    data, out = _data(tmp_path / "data"), tmp_path / "out"
    first = run_batch(data, out, config=load_config(None, {"model.num_threads": 1}), show_progress=False)
    other = load_config(None, {"model.num_threads": 4, "analysis.defect_cutoff": 6.0})
    again = run_batch(data, out, config=other, show_progress=False)
    assert again.config_hash != first.config_hash
    assert {r.name: r.status for r in again.results} == {"img0": "done", "img1": "done"}
    summary = json.loads((out / "img0" / "summary.json").read_text())
    assert summary["neutral_settings"]["model.num_threads"] == 4
    assert json.loads((out / "batch_summary.json").read_text())["made_with_other_neutral_settings"] == {}


def test_a_trained_model_and_its_results_are_reused_with_other_threads(tmp_path, monkeypatch):
    """--train: the weights a training gives depend on torch's threads, but the results follow the model
    file (its SHA-256 is in the resume key): a rerun with other threads keeps the model and the results
    made with it, and with another setting of the model trains again."""
    data, out = _data(tmp_path / "data"), tmp_path / "out"
    tiny = load_config(None, TINY)
    first = run_batch(data, out, config=_with(tiny, num_threads=1), train=True, show_progress=False)
    assert first.model_trained and {r.status for r in first.results} == {"done"}
    before = _files(out)
    with monkeypatch.context() as m:
        _no_work(m)
        again = run_batch(data, out, config=_with(tiny, num_threads=2, progress=True), train=True,
                          show_progress=False)
    assert not again.model_trained and again.model_sha256 == first.model_sha256
    assert {r.status for r in again.results} == {"current"} and _files(out) == before
    third = run_batch(data, out, config=_with(tiny, num_threads=2, seed=1), train=True, show_progress=False)
    assert third.model_trained and {r.status for r in third.results} == {"done"}


@pytest.mark.parametrize("key, value", [("model.num_threads", 3), ("model.progress", True)])
def test_the_settings_hash_reads_the_result_neutral_settings_at_their_defaults(key, value):
    """The hash of the defaults stays what it was before these settings were left out (folders made
    with them stay current), and every other setting still changes it."""
    from stemfast.config import RESULT_NEUTRAL_SETTINGS, _canonical, config_to_dict

    assert key in RESULT_NEUTRAL_SETTINGS
    base = load_config(None)
    every = json.dumps(_canonical(config_to_dict(base)), sort_keys=True, separators=(",", ":"), default=str)
    assert config_hash(load_config(None, {key: value})) == config_hash(base) == sha256(every.encode()).hexdigest()[:16]
    assert config_hash(load_config(None, {key: value, "model.amp": False})) != config_hash(base)
    assert config_hash(load_config(None, {"sites.backend": "numba"})) != config_hash(base)
