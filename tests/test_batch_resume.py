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


def test_only_result_neutral_settings_changed_reuses_the_results(tmp_path, monkeypatch, stemfast_log):
    """Made with one torch thread, rerun with four and the progress bar off: both inputs current, nothing
    read or rewritten, the log says why; stemfast.toml records what this run asked for, each summary
    and the batch summary what the kept results were made with."""
    data, out = _data(tmp_path / "data"), tmp_path / "out"
    first = run_batch(data, out, config=load_config(None, {"model.num_threads": 1}), show_progress=False)
    assert {r.status for r in first.results} == {"done"}
    before = _files(out)
    with monkeypatch.context() as m:
        _no_work(m)
        with stemfast_log.at_level(logging.INFO, logger="stemfast.batch"):
            again = run_batch(data, out, config=load_config(None, {"model.num_threads": 4, "model.progress": False}),
                              show_progress=False)
    assert {r.name: r.status for r in again.results} == {"img0": "current", "img1": "current"}
    assert not again.did_work and again.config_hash == first.config_hash
    assert _files(out) == before  # the results, their markers and the model untouched
    assert "img0: current (reused): made with model.num_threads = 1" in stemfast_log.text
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
def test_the_settings_hash_reads_the_result_neutral_settings_at_their_defaults(key, value, monkeypatch):
    """The hash of the defaults stays what it was before these settings were left out (folders made
    with them stay current), and every other setting still changes it."""
    from stemfast.config import RESULT_NEUTRAL_SETTINGS, _canonical, config_to_dict

    monkeypatch.delenv("STEMFAST_BACKEND", raising=False)

    assert key in RESULT_NEUTRAL_SETTINGS
    base = load_config(None)
    every = json.dumps(_canonical(config_to_dict(base)), sort_keys=True, separators=(",", ":"), default=str)
    assert config_hash(load_config(None, {key: value})) == config_hash(base) == sha256(every.encode()).hexdigest()[:16]
    assert config_hash(load_config(None, {key: value, "model.amp": False})) != config_hash(base)
    assert config_hash(load_config(None, {"sites.backend": "numba"})) != config_hash(base)


def _sample_data(root: Path) -> Path:
    """Three images, a stack of three frames and an image with scattered NaN pixels."""
    from stemfast.synthetic import make_mos2

    root.mkdir()
    for i in range(3):
        np.save(root / f"img{i}.npy", make_mos2(shape=(128, 128), seed=i).image)
    np.save(root / "stack.npy", np.stack([make_mos2(shape=(128, 128), seed=10 + k).image for k in range(3)]))
    nan = make_mos2(shape=(128, 128), seed=7).image.astype(np.float32)
    nan[[20, 40, 60], [30, 50, 70]] = np.nan
    np.save(root / "nan.npy", nan)
    return root


@pytest.mark.parametrize("first, again", [
    ({"max_train_inputs": 1}, {"max_train_inputs": 2}),
    ({"train_frames": 1}, {"train_frames": 3}),
    ({}, {"read_options": "fill"}),
    ({"read_options": "fill"}, {"read_options": "fill, limit 0.0001"}),
], ids=["train-inputs", "train-frames", "fill-nonfinite", "nonfinite-limit"])
def test_a_rerun_that_draws_another_training_sample_trains_again(tmp_path, first, again):
    """--train with --train-inputs 1 then 2 (or --train-frames 1 then 3, or --fill-nonfinite added where an
    input of the sample has NaN pixels, or the --nonfinite-limit changed where they were filled): the model
    is trained again and every input made again with it; model.json records the sample. Before, none of
    these was part of the trained model's reuse key: the rerun kept the model and took every result as
    current, made with a model trained on another sample."""
    from stemfast.config import ReadOptions

    reads = {"fill": ReadOptions(fill_nonfinite=True),
             "fill, limit 0.0001": ReadOptions(fill_nonfinite=True, max_nonfinite_fraction=0.0001)}

    def kw(d):
        return {k: reads[v] if k == "read_options" else v for k, v in d.items()}

    data, out = _sample_data(tmp_path / "data"), tmp_path / "out"
    tiny = load_config(None, TINY)
    one = run_batch(data, out, config=tiny, train=True, show_progress=False, **kw(first))
    assert one.model_trained and {r.name: r.status for r in one.results}["img0"] == "done"
    two = run_batch(data, out, config=tiny, train=True, show_progress=False, **kw(again))
    assert two.model_trained and two.model_sha256 != one.model_sha256
    assert {r.name: r.status for r in two.results if r.name != "nan"} == {
        "img0": "done", "img1": "done", "img2": "done", "stack": "done"}
    sample = json.loads((out / "model.json").read_text())["train_sample"]
    asked = {"max_train_inputs": 16, "train_frames": 4, **kw(again)}
    assert (sample["max_train_inputs"], sample["train_frames"]) == (asked["max_train_inputs"], asked["train_frames"])
    # the NaN image: a candidate where the read options changed (refused, or filled), else left out for its
    # read failure remembered from the first run -- the sample depended on the read options either way
    assert sample["n_candidates"] == (5 if "read_options" in again else 4) and sample["max_frames"] == 3
    assert sample["read_options"] == ReadOptions.key_of(asked.get("read_options"))
    three = run_batch(data, out, config=tiny, train=True, show_progress=False, **kw(again))
    assert not three.model_trained and {r.status for r in three.results if r.name != "nan"} == {"current"}
    if "read_options" not in again:  # the NaN image, left out for its remembered failure, now read: trains again
        four = run_batch(data, out, config=tiny, train=True, show_progress=False,
                         **kw({**again, "read_options": "fill"}))
        assert four.model_trained and {r.name: r.status for r in four.results}["nan"] == "done"


def test_options_that_draw_the_same_training_sample_keep_the_model(tmp_path, monkeypatch):
    """Two 2-D images without NaN pixels: --train-inputs 2 or 5 draws both (as the default 16 did), any
    --train-frames their one frame, and --fill-nonfinite fills nothing there: the model and the results
    are kept, nothing is read or trained."""
    from stemfast.config import ReadOptions

    data, out = _data(tmp_path / "data"), tmp_path / "out"
    tiny = load_config(None, TINY)
    first = run_batch(data, out, config=tiny, train=True, show_progress=False)
    sample = json.loads((out / "model.json").read_text())["train_sample"]
    assert sample == {"max_train_inputs": 16, "train_frames": 4, "read_options": None, "n_candidates": 2,
                      "max_frames": 1}
    before = _files(out)
    with monkeypatch.context() as m:
        _no_work(m)
        for kw in ({"max_train_inputs": 2}, {"max_train_inputs": 5, "train_frames": 1},
                   {"read_options": ReadOptions(fill_nonfinite=True, max_nonfinite_fraction=0.2)}):
            again = run_batch(data, out, config=tiny, train=True, show_progress=False, **kw)
            assert not again.model_trained and again.model_sha256 == first.model_sha256, kw
            assert {r.status for r in again.results} == {"current"}, kw
    assert _files(out) == before
    fewer = run_batch(data, out, config=tiny, train=True, show_progress=False, max_train_inputs=1)
    assert fewer.model_trained and {r.status for r in fewer.results} == {"done"}


def test_a_model_record_from_before_the_sample_was_recorded_counts_as_made_with_the_defaults(tmp_path,
                                                                                              stemfast_log):
    """A model.json without ``train_sample`` (written before it was recorded): a rerun with the default
    sample keeps the model and the results; one that asks for another sample trains again, and says why."""
    data, out = _data(tmp_path / "data"), tmp_path / "out"
    tiny = load_config(None, TINY)
    first = run_batch(data, out, config=tiny, train=True, show_progress=False)
    info = json.loads((out / "model.json").read_text())
    del info["train_sample"]
    (out / "model.json").write_text(json.dumps(info))
    same = run_batch(data, out, config=tiny, train=True, show_progress=False)
    assert not same.model_trained and same.model_sha256 == first.model_sha256
    assert {r.status for r in same.results} == {"current"}
    with stemfast_log.at_level(logging.INFO, logger="stemfast.batch"):
        other = run_batch(data, out, config=tiny, train=True, show_progress=False, train_frames=1)
    assert other.model_trained and {r.status for r in other.results} == {"done"}
    assert "trained on another sample of the inputs (made before the sample was recorded" in stemfast_log.text


def test_the_settings_hash_follows_the_backend_the_environment_picks(monkeypatch):
    """``$STEMFAST_BACKEND`` picks the kernels as the setting does (backends agree to a tolerance, not bit
    for bit): it changes the hash as the setting would; naming the default compiled backend does not."""
    pytest.importorskip("stemfast._core")
    monkeypatch.delenv("STEMFAST_BACKEND", raising=False)
    base = config_hash(load_config(None))
    numpy_setting = config_hash(load_config(None, {"sites.backend": "numpy"}))
    assert config_hash(load_config(None, {"sites.backend": "cpp"})) == base
    monkeypatch.setenv("STEMFAST_BACKEND", "numpy")
    assert config_hash(load_config(None)) == numpy_setting != base
    monkeypatch.setenv("STEMFAST_BACKEND", "cpp")
    assert config_hash(load_config(None)) == base


def test_a_rerun_on_other_kernels_chosen_by_the_environment_makes_the_results_again(tmp_path, monkeypatch):
    """Made with the compiled kernels, rerun with ``STEMFAST_BACKEND=numpy``: the results are made again
    (they kept the compiled kernels' results, 'current', before)."""
    pytest.importorskip("stemfast._core")
    monkeypatch.delenv("STEMFAST_BACKEND", raising=False)
    data, out = _data(tmp_path / "data"), tmp_path / "out"
    first = run_batch(data, out, config=load_config(None), show_progress=False)
    assert {r.status for r in first.results} == {"done"}
    monkeypatch.setenv("STEMFAST_BACKEND", "numpy")
    again = run_batch(data, out, config=load_config(None), show_progress=False)
    assert again.config_hash != first.config_hash
    assert {r.name: r.status for r in again.results} == {"img0": "done", "img1": "done"}


@pytest.mark.parametrize("damaged", [
    "a string", [1, 2], {}, {"max_train_inputs": 16, "train_frames": 4, "read_options": None},
    {"max_train_inputs": 16, "train_frames": 4, "read_options": None, "n_candidates": None, "max_frames": None},
    {"max_train_inputs": 16, "train_frames": 4, "read_options": None, "n_candidates": 0, "max_frames": 1},
    {"max_train_inputs": 16, "train_frames": 4, "read_options": None, "n_candidates": 2.5, "max_frames": 1},
    {"max_train_inputs": True, "train_frames": 4, "read_options": None, "n_candidates": 2, "max_frames": 1}])
def test_a_damaged_training_sample_record_is_not_the_same_sample(damaged):
    """model.json's ``train_sample`` damaged (not a table, a count missing, null, 0, not whole): the model
    is trained again rather than reused (a string crashed the batch; missing counts matched any options)."""
    from stemfast.batch.model_state import asked_sample, same_sample

    assert same_sample(damaged, asked_sample()) is False
    assert same_sample(damaged, asked_sample(2, 1)) is False


def test_the_record_names_the_kernels_the_environment_chose(tmp_path, monkeypatch):
    """``STEMFAST_BACKEND=numpy``: stemfast.toml said the backend was not set (its own settings hashed to
    another hash than it recorded, and its 'reuse with' would run other kernels); it names numpy now, and
    reloaded it gives the hash it records."""
    monkeypatch.setenv("STEMFAST_BACKEND", "numpy")
    data, out = _data(tmp_path / "data"), tmp_path / "out"
    report = run_batch(data, out, config=load_config(None), show_progress=False)
    toml = parse_toml((out / "stemfast.toml").read_text())
    assert toml["sites"]["backend"] == "numpy"
    monkeypatch.delenv("STEMFAST_BACKEND")
    assert config_hash(load_config(out / "stemfast.toml")) == toml["stemfast"]["config_hash"] == report.config_hash


def test_dask_workers_run_the_kernels_the_hash_stands_for(tmp_path, monkeypatch):
    """The client hashes the kernels it resolves; the workers, given the backend unset, picked theirs
    from their own environment (a worker with STEMFAST_BACKEND=numpy wrote numpy results under the compiled
    kernels' hash, kept as current by a compiled rerun). The config the tasks get names the kernels."""
    pytest.importorskip("dask.distributed")
    pytest.importorskip("stemfast._core")
    import stemfast.batch.dask as bd

    monkeypatch.delenv("STEMFAST_BACKEND", raising=False)
    seen = []
    real = bd._Tasks.__init__

    def spy(self, client, out, model_path, model_sha, config, *a, **k):
        seen.append(config.sites.backend)
        real(self, client, out, model_path, model_sha, config, *a, **k)

    monkeypatch.setattr(bd._Tasks, "__init__", spy)
    data, out = _data(tmp_path / "data"), tmp_path / "out"
    report = run_batch(data, out, config=load_config(None), scheduler="local:1", show_progress=False)
    assert {r.status for r in report.results} == {"done"} and seen == ["cpp"]


def test_a_fine_tuned_model_reused_is_named_fine_tuned(tmp_path):
    """``--finetune 2`` run twice: the rerun reuses the fine-tuned model and named it 'trained (reused,
    current)', as a model trained from scratch (the console line read 'model trained (reused, current)')."""
    data, out = _data(tmp_path / "data"), tmp_path / "out"
    first = run_batch(data, out, config=load_config(None), finetune=2, show_progress=False)
    assert first.model_trained and first.model_finetuned_steps == 2
    again = run_batch(data, out, config=load_config(None), finetune=2, show_progress=False)
    assert not again.model_trained and again.model_sha256 == first.model_sha256
    assert again.model_source == "fine-tuned for 2 steps (reused, current)"
