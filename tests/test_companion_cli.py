"""A second detector of the same scan from the command line: ``analyze --companion FILE``,
``batch --companion-name MAIN=COMPANION`` and the automatic pairing of files named for two detectors
(stemfast.batch.companions), through the one batch code path: pairing, refusals, the fingerprint (a
changed or added companion redoes the input), the outputs that name it, the Dask runner. Small
synthetic images and the shipped model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stemfast.batch import run_batch
from stemfast.batch import discover_inputs
from stemfast.batch.companions import CompanionRule, pair_companions, parse_companion_name
from stemfast.cli import main
from stemfast.config import load_config, parse_toml
from stemfast.errors import EXIT_ERROR, EXIT_OK, EXIT_SETTINGS, EXIT_SKIPPED, SettingsError
from stemfast.synthetic import make_mos2

SHAPE = (160, 160)


def _scan(seed: int, n_frames: int = 2) -> np.ndarray:
    """Frames of the same atoms without drift: two detectors of one scan (independent shot noise)."""
    return make_mos2(shape=SHAPE, seed=seed, pixel_size_A=0.2, dose=25.0, n_frames=n_frames,
                     drift_px_per_frame=(0.0, 0.0), rates=(0.05, 0.0, 0.0, 0.0)).image


@pytest.fixture(autouse=True)
def _in_process(monkeypatch):
    monkeypatch.setenv("STEMFAST_ENCODE_WORKER", "0")  # encode here: no forked worker inside pytest


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("pair")
    img = _scan(0)
    np.save(d / "scan_ADF1.npy", img[0])
    np.save(d / "scan_ADF2.npy", img[1])
    return d / "scan_ADF1.npy", d / "scan_ADF2.npy"


def _summary(out: Path, name: str) -> dict:
    return json.loads((out / name / "summary.json").read_text())


def test_analyze_with_a_companion_uses_both_and_says_so(pair, tmp_path):
    a, b = pair
    out = tmp_path / "two"
    assert main(["analyze", str(a), "--companion", str(b), "-o", str(out)]) == EXIT_OK
    s = _summary(out, "scan_ADF1")
    assert s["detectors"] == 2 and s["companion"] == str(b)
    assert s["input"]["companion"]["path"] == str(b) and len(s["input"]["companion"]["sha256"]) == 64
    df = pd.read_csv(out / "scan_ADF1" / "sites.csv")
    assert "companion_intensity" in df and df["companion_intensity"].notna().any()
    html = (out / "report.html").read_text()
    assert "second detector of the same scan" in html and str(b) in html
    toml = parse_toml((out / "stemfast.toml").read_text())
    assert toml["companions"]["scan_ADF1.npy"]["file"] == str(b)
    load_config(out / "stemfast.toml")  # the [companions] table is metadata, not a setting

    alone = tmp_path / "one"
    assert main(["analyze", str(a), "--no-companion", "-o", str(alone)]) == EXIT_OK
    s1 = _summary(alone, "scan_ADF1")
    assert s1["detectors"] == 1 and s1["companion"] is None and s1["config_hash"] == s["config_hash"]
    assert "companion" not in (alone / "report.html").read_text().split("<h2 id=")[-1]
    d1 = pd.read_csv(alone / "scan_ADF1" / "sites.csv")
    assert "companion_intensity" not in d1 and len(d1) == len(df)
    assert not np.allclose(d1["anomaly_score"], df["anomaly_score"])


def test_analyze_refuses_a_companion_of_another_scan(pair, tmp_path, capsys):
    a, b = pair
    small = tmp_path / "small.npy"
    np.save(small, np.load(b)[:120])
    assert main(["analyze", str(a), "--companion", str(small), "-o", str(tmp_path / "o1")]) == EXIT_SKIPPED
    err = capsys.readouterr().err
    assert "shape 120 x 160" in err and "not two detectors of the same scan" in err
    assert not (tmp_path / "o1" / "scan_ADF1" / "summary.json").exists()

    stack = tmp_path / "stack.npy"
    np.save(stack, _scan(1, n_frames=3))
    assert main(["analyze", str(a), "--companion", str(stack), "-o", str(tmp_path / "o2")]) == EXIT_SKIPPED
    assert "is a stack of 3 frames" in capsys.readouterr().err
    assert main(["analyze", str(stack), "--companion", str(a), "-o", str(tmp_path / "o3")]) == EXIT_SKIPPED
    assert "is one 2-D image, the input a stack of 3 frames" in capsys.readouterr().err

    # a named companion of the input's shape whose columns are elsewhere (another scan): used as asked, said
    shifted = tmp_path / "shifted.npy"
    np.save(shifted, np.roll(np.load(b), 6, axis=1))
    assert main(["analyze", str(a), "--companion", str(shifted), "-o", str(tmp_path / "o6")]) == EXIT_OK
    s6 = _summary(tmp_path / "o6", "scan_ADF1")
    assert s6["detectors"] == 2 and any("may not be of this scan" in n and "6 px apart" in n
                                        for n in s6["input"]["notes"]), s6["input"]

    assert main(["analyze", str(a), "--companion", str(tmp_path / "nope.npy"), "-o", str(tmp_path / "o4")]) \
        == EXIT_ERROR
    assert "no such companion file" in capsys.readouterr().err
    assert main(["analyze", str(a), "--companion-name", "_ADF1", "-o", str(tmp_path / "o5")]) == EXIT_SETTINGS
    assert not (tmp_path / "o5").exists()


def test_companion_name_rules(tmp_path):
    assert parse_companion_name("ADF1=ADF2") == ("ADF1", "ADF2")
    assert parse_companion_name("=_maadf") == ("", "_maadf")
    for bad in ("ADF1", "ADF1=", "ADF=ADF2", "_ADF2=ADF2", "x=a/b", "_ADF1.dm4=_ADF2.dm4"):
        with pytest.raises(SettingsError):
            parse_companion_name(bad)
    # the name part may sit anywhere in the name (the last one is replaced): 1028_ADF1_11 -> 1028_ADF2_11
    for n in ("1028_ADF1_11.npy", "1028_ADF2_11.npy", "1028_ADF1_25.npy", "s_haadf.npy", "s_haadf_maadf.npy"):
        (tmp_path / n).write_bytes(b"")
    entries, problems = discover_inputs(tmp_path), []
    kept = pair_companions(entries, CompanionRule(name=("ADF1", "ADF2")), problems)
    got = {e.path.name: (e.companion.path.name if e.companion else e.companion_missing) for e in kept}
    assert got == {"1028_ADF1_11.npy": "1028_ADF2_11.npy", "1028_ADF1_25.npy": str(tmp_path / "1028_ADF2_25.npy"),
                   "s_haadf.npy": None, "s_haadf_maadf.npy": None} and not problems
    kept = pair_companions(discover_inputs(tmp_path), CompanionRule(name=("", "_maadf")), problems)
    assert [(e.path.name, e.companion.path.name) for e in kept if e.companion] == [("s_haadf.npy", "s_haadf_maadf.npy")]


def _batch_data(root: Path) -> Path:
    """a: a pair; b: its companion missing; c: a companion of another shape; d_ADF2: a companion alone."""
    root.mkdir()
    for k, name in enumerate("abc"):
        img = _scan(10 + k)
        np.save(root / f"{name}_ADF1.npy", img[0])
        if name == "a":
            np.save(root / f"{name}_ADF2.npy", img[1])
        if name == "c":
            np.save(root / f"{name}_ADF2.npy", img[1][:, :128])
    np.save(root / "d_ADF2.npy", _scan(13)[1])
    return root


def test_batch_pairs_by_suffix_and_redoes_an_input_when_its_companion_changes(tmp_path, capsys):
    data = _batch_data(tmp_path / "data")
    out = tmp_path / "out"
    args = ["batch", str(data), "-o", str(out), "--companion-name", "ADF1=ADF2"]
    assert main(args) == EXIT_SKIPPED
    err = capsys.readouterr().err
    rep = json.loads((out / "batch_summary.json").read_text())
    st = {r["name"]: r["status"] for r in rep["inputs"]}
    assert st == {"a_ADF1": "done", "b_ADF1": "done", "c_ADF1": "skipped", "d_ADF2.npy": "skipped"}, st
    reasons = {r["name"]: r["reason"] for r in rep["skipped"]}
    assert "not two detectors of the same scan" in reasons["c_ADF1"]
    assert "without its input d_ADF1.npy" in reasons["d_ADF2.npy"]
    assert not any((out / n).exists() for n in ("a_ADF2", "c_ADF2", "d_ADF2"))  # companions are not inputs
    assert _summary(out, "a_ADF1")["detectors"] == 2
    sb = _summary(out, "b_ADF1")
    assert sb["detectors"] == 1 and sb["companion"] is None
    assert any("b_ADF2.npy" in w and "analysed with this image alone" in w for w in sb["warnings"])
    assert "b_ADF2.npy" in err and "b_ADF2.npy" in (out / "report.html").read_text()

    done_a = (out / "a_ADF1" / "done.json").stat().st_mtime_ns
    assert main(args) == EXIT_SKIPPED  # nothing changed: nothing redone
    assert "2 current, 2 skipped" in capsys.readouterr().out

    np.save(data / "b_ADF2.npy", _scan(11)[1])  # the missing companion arrives: b is redone with it
    np.save(data / "c_ADF2.npy", _scan(12)[1])  # the bad one is fixed: c is tried again
    assert main(args) == EXIT_SKIPPED  # d_ADF2 is still alone
    rep = json.loads((out / "batch_summary.json").read_text())
    st = {r["name"]: r["status"] for r in rep["inputs"]}
    assert st == {"a_ADF1": "current", "b_ADF1": "done", "c_ADF1": "done", "d_ADF2.npy": "skipped"}, st
    assert _summary(out, "b_ADF1")["detectors"] == 2 and not _summary(out, "b_ADF1")["warnings"]
    assert (out / "a_ADF1" / "done.json").stat().st_mtime_ns == done_a
    toml = parse_toml((out / "stemfast.toml").read_text())
    assert sorted(toml["companions"]) == ["a_ADF1.npy", "b_ADF1.npy", "c_ADF1.npy"]

    img = _scan(10)
    np.save(data / "a_ADF2.npy", np.ascontiguousarray(img[1][::-1, ::-1]))  # a's companion changed
    main(args)
    rep = json.loads((out / "batch_summary.json").read_text())
    assert {r["name"]: r["status"] for r in rep["inputs"]}["a_ADF1"] == "done"


def test_companions_on_dask_match_the_in_process_run(tmp_path):
    pytest.importorskip("dask.distributed", reason="dask.distributed not installed")
    data = tmp_path / "data"
    data.mkdir()
    img = _scan(20)
    np.save(data / "x_ADF1.npy", img[0])
    np.save(data / "x_ADF2.npy", img[1])
    series = _scan(21, n_frames=6)  # a series by two detectors: frames 0-2 and 3-5 (the same atoms)
    np.save(data / "y_ADF1.npy", series[:3])
    np.save(data / "y_ADF2.npy", series[3:])
    np.save(data / "z_ADF1.npy", series[:3])  # a series whose companion has another frame count: refused
    np.save(data / "z_ADF2.npy", series[:2])
    runs = {}
    for sched in (None, "local:2"):
        out = tmp_path / f"out-{sched is not None}"
        rep = run_batch(data, out, scheduler=sched, companion_name="ADF1=ADF2", show_progress=False,
                        frames_per_task=1)
        assert {r.name: r.status for r in rep.results} == {"x_ADF1": "done", "y_ADF1": "done", "z_ADF1": "skipped"}
        assert "is a stack of 2 frames, the input a stack of 3 frames" in rep.by_name("z_ADF1").reason
        runs[sched] = out
    for name in ("x_ADF1", "y_ADF1"):  # the series' chunks read the companion's frames as the whole file does
        a, b = (runs[k] / name / "sites.csv" for k in (None, "local:2"))
        assert a.read_bytes() == b.read_bytes()
        assert _summary(runs["local:2"], name)["detectors"] == 2
    # paired automatically (the default): every file an input, each scored with the other; the series of
    # another frame count is analysed alone (not skipped) with the reason, on Dask as in process
    out = tmp_path / "auto"
    rep = run_batch(data, out, scheduler="local:2", show_progress=False, frames_per_task=1)
    assert {r.name: r.status for r in rep.results} == dict.fromkeys(
        ("x_ADF1", "x_ADF2", "y_ADF1", "y_ADF2", "z_ADF1", "z_ADF2"), "done")
    assert (out / "x_ADF1" / "sites.csv").read_bytes() == (runs[None] / "x_ADF1" / "sites.csv").read_bytes()
    assert (out / "y_ADF1" / "sites.csv").read_bytes() == (runs[None] / "y_ADF1" / "sites.csv").read_bytes()
    s = _summary(out, "z_ADF1")
    assert s["detectors"] == 1 and s["companion"] is None and "a stack of 2 frames" in s["input"]["notes"][0]


@pytest.mark.filterwarnings("ignore:the learned classes")
def test_a_model_trained_on_the_batch_scores_with_the_companion(pair, tmp_path):
    """Frames prepared for training are kept for the analysis: the companion joins them there."""
    a, b = pair
    tiny = {"model": {"epochs": 1, "stn_epochs": 1, "max_train_patches": 300, "batch_size": 64, "input_size": 16,
                      "channels": [8, 8, 8], "stn_channels": [4, 8], "patience": 1, "device": "cpu"}}
    rep = run_batch(a, tmp_path / "out", config=load_config(None, tiny), train=True, companions={a: b},
                    show_progress=False)
    assert rep.model_trained and rep.by_name("scan_ADF1").status == "done"
    assert _summary(tmp_path / "out", "scan_ADF1")["detectors"] == 2
    assert "companion_intensity" in pd.read_csv(tmp_path / "out" / "scan_ADF1" / "sites.csv")


def test_analyze_finds_the_other_detector_beside_it(pair, tmp_path):
    """Without --companion, the file beside the input whose name differs in the detector's name alone
    is its companion (scan_ADF1 -> scan_ADF2), with the same scores as naming it; --no-companion: alone."""
    a, b = pair
    given, auto = tmp_path / "given", tmp_path / "auto"
    assert main(["analyze", str(a), "--companion", str(b), "-o", str(given)]) == EXIT_OK
    assert main(["analyze", str(a), "-o", str(auto)]) == EXIT_OK
    s = _summary(auto, "scan_ADF1")
    assert s["detectors"] == 2 and s["companion"] == str(b) and s["companion_found"] == "automatic"
    assert _summary(given, "scan_ADF1")["companion_found"] == "given"
    assert (auto / "scan_ADF1" / "sites.csv").read_bytes() == (given / "scan_ADF1" / "sites.csv").read_bytes()
    assert "found beside the input" in (auto / "report.html").read_text()
    assert main(["analyze", str(a), "-o", str(auto)]) == EXIT_OK  # a rerun: current, not redone
    assert _summary(auto, "scan_ADF1") == s


def test_batch_pairs_files_named_for_two_detectors_where_they_are_of_one_scan(tmp_path, capsys):
    """Both files of a pair are inputs, each with the other as its companion. A file named for another
    detector but of another scan (its columns 6 px off), of another shape, or a 2-D image beside a stack
    is not used: the input is analysed alone and says why. A rerun redoes nothing."""
    data = tmp_path / "data"
    data.mkdir()
    img = _scan(30)
    np.save(data / "p_HAADF.npy", img[0])
    np.save(data / "p_maadf.npy", img[1])
    np.save(data / "q_HAADF.npy", img[0])
    np.save(data / "q_MAADF.npy", np.roll(img[1], 6, axis=1))
    np.save(data / "r_HAADF.npy", img[0])
    np.save(data / "r_MAADF.npy", img[1][:, :128])
    np.save(data / "s_ADF1.npy", _scan(31, n_frames=3))
    np.save(data / "s_ADF2.npy", img[1])
    out = tmp_path / "out"
    assert main(["batch", str(data), "-o", str(out)]) == EXIT_OK
    rep = json.loads((out / "batch_summary.json").read_text())
    assert sorted(r["name"] for r in rep["inputs"] if r["status"] == "done") == sorted(
        f.stem for f in data.iterdir())
    for name, other in (("p_HAADF", "p_maadf.npy"), ("p_maadf", "p_HAADF.npy")):
        s = _summary(out, name)
        assert s["detectors"] == 2 and Path(s["companion"]).name == other and s["companion_found"] == "automatic"
    for name, why in (("q_HAADF", "match best 6 px apart"), ("q_MAADF", "match best 6 px apart"),
                      ("r_HAADF", "shape 160 x 128"), ("r_MAADF", "shape 160 x 160"),
                      ("s_ADF1", "is one 2-D image, the input a stack of 3 frames"),
                      ("s_ADF2", "is a stack of 3 frames, the input one 2-D image")):
        s = _summary(out, name)
        assert s["detectors"] == 1 and s["companion"] is None, name
        assert any(why in n and "analysed with this image alone" in n for n in s["input"]["notes"]), (name, s["input"])
    assert main(["batch", str(data), "-o", str(out)]) == EXIT_OK
    assert "8 current" in capsys.readouterr().out
    assert main(["batch", str(data), "-o", str(tmp_path / "alone"), "--no-companion"]) == EXIT_OK
    assert all(_summary(tmp_path / "alone", f.stem)["detectors"] == 1 for f in data.iterdir())


def test_automatic_pairing_reads_the_detector_as_a_whole_word(tmp_path):
    """The detector's name is a whole word of the file name (between non-alphanumeric characters), in any
    case; the extension must match; of several, the first in DETECTOR_NAMES' order; bright field (BF,
    ABF) is not paired automatically."""
    from stemfast.batch.companions import automatic_companion

    for n in ("a_HAADF.tif", "a_MAADF.tif", "a_DF4.tif", "a_BF.tif", "b HAADF 3.dm4", "b DF 3.dm4", "c_HAADFX.npy",
              "c_MAADFX.npy", "d_haadf.npy", "d_maadf.tif", "e_ADF1_2.npy", "e_ADF2_3.npy", "f-df4.emd",
              "f-HAADF.emd", "g_haadf_maadf.npy", "g_haadf_laadf.npy", "h_HAADF.npy", "h_ABF.npy"):
        (tmp_path / n).write_bytes(b"")
    got = {n: getattr(automatic_companion(tmp_path / n), "name", None)
           for n in ("a_HAADF.tif", "a_MAADF.tif", "a_DF4.tif", "a_BF.tif", "b HAADF 3.dm4", "c_HAADFX.npy",
                     "d_haadf.npy", "e_ADF1_2.npy", "f-df4.emd", "g_haadf_maadf.npy", "h_HAADF.npy", "h_ABF.npy")}
    assert got == {"a_HAADF.tif": "a_MAADF.tif", "a_MAADF.tif": "a_HAADF.tif", "a_DF4.tif": "a_HAADF.tif",
                   "a_BF.tif": None, "b HAADF 3.dm4": "b DF 3.dm4", "c_HAADFX.npy": None, "d_haadf.npy": None,
                   "e_ADF1_2.npy": None, "f-df4.emd": "f-HAADF.emd", "g_haadf_maadf.npy": "g_haadf_laadf.npy",
                   "h_HAADF.npy": None, "h_ABF.npy": None}


def test_same_scan_refusal_reads_calibration_and_the_exposure():
    from types import SimpleNamespace

    from stemfast.batch.companions import same_scan_refusal

    img = _scan(40)
    a, b = img[0], img[1]
    assert same_scan_refusal(a, b) is None and same_scan_refusal(a, -b) is None  # bright field: the sign turned
    assert "match best 4 px apart" in same_scan_refusal(a, _scan(41)[1])  # another scan: its own lattice offset
    # the same columns under 12x the image's spread of noise: aligned, but too little of them to trust
    assert "hardly match" in same_scan_refusal(a, a + 12 * a.std() * np.random.default_rng(0).normal(size=a.shape))
    cal = [SimpleNamespace(pixel_size_nm=p, metadata={}) for p in (0.040, 0.050)]
    assert "pixel size" in same_scan_refusal(a, b, *cal)
    dm = [SimpleNamespace(pixel_size_nm=0.04, metadata={"original_metadata": {"ImageTags": {"DataBar": {
        "Exposure Number": n}}}}) for n in (4407929, 4407929, 4407821)]
    assert same_scan_refusal(a, b, dm[0], dm[1]) is None
    assert "exposure 4407821" in same_scan_refusal(a, b, dm[0], dm[2])


def test_a_series_recorded_by_two_detectors_is_scored_frame_by_frame(tmp_path):
    """Two stacks of one series (the same atoms, independent noise), named for two detectors: each
    frame's scores take the companion's frame (every frame's sites have its intensity); the scores
    differ from the series analysed alone; a given companion stack works the same way."""
    series = _scan(50, n_frames=6)
    np.save(tmp_path / "t_HAADF.npy", series[:3])
    np.save(tmp_path / "t_MAADF.npy", series[3:])
    auto, alone, given = tmp_path / "auto", tmp_path / "alone", tmp_path / "given"
    assert main(["analyze", str(tmp_path / "t_HAADF.npy"), "-o", str(auto)]) == EXIT_OK
    assert main(["analyze", str(tmp_path / "t_HAADF.npy"), "--no-companion", "-o", str(alone)]) == EXIT_OK
    assert main(["analyze", str(tmp_path / "t_HAADF.npy"), "--companion", str(tmp_path / "t_MAADF.npy"),
                 "-o", str(given)]) == EXIT_OK
    s = _summary(auto, "t_HAADF")
    assert s["detectors"] == 2 and s["n_frames"] == 3 and s["companion_found"] == "automatic"
    df, d1 = (pd.read_csv(o / "t_HAADF" / "sites.csv") for o in (auto, alone))
    assert sorted(df["frame"].unique()) == [0, 1, 2] and df["companion_intensity"].notna().groupby(df["frame"]).any().all()
    assert "companion_intensity" not in d1 and not np.allclose(d1["anomaly_score"], df["anomaly_score"])
    assert (given / "t_HAADF" / "sites.csv").read_bytes() == (auto / "t_HAADF" / "sites.csv").read_bytes()


def test_a_velox_file_holding_several_detectors_pairs_its_own_images(tmp_path):
    """A Velox EMD holds each detector's image of the scan (written in Velox's layout and read by
    RosettaSciIO's own reader): the HAADF is read, with the file's calibration; another detector's
    image of the same file is its companion (the first ADF one), said in the summary;
    read(dataset=TITLE) reads any of them; --no-companion: the HAADF alone."""
    pytest.importorskip("rsciio")
    from velox import write_velox

    from stemfast import io
    from stemfast.batch.companions import signal_companion

    img = _scan(60)
    f = write_velox(tmp_path / "scan.emd", {"BF": -img[1], "HAADF": img[0], "DF4": img[1], "DF2": img[1] * 0.5})
    assert sorted(io.signal_titles(f)) == ["BF", "DF2", "DF4", "HAADF"]
    m = io.read(f)
    assert np.allclose(m.data, img[0]) and m.pixel_size_nm == pytest.approx(0.02)
    assert np.allclose(io.read(f, dataset="df4").data, img[1])
    with pytest.raises(io.ReadError, match="no image titled 'ABF'"):
        io.read(f, dataset="ABF")
    assert signal_companion(f) == "DF2"
    out, alone = tmp_path / "out", tmp_path / "alone"
    assert main(["analyze", str(f), "-o", str(out)]) == EXIT_OK
    s = _summary(out, "scan")
    assert s["detectors"] == 2 and s["companion_signal"] == "DF2" and s["companion_found"] == "automatic"
    assert "its image DF2" in (out / "report.html").read_text()
    assert main(["analyze", str(f), "--no-companion", "-o", str(alone)]) == EXIT_OK
    assert _summary(alone, "scan")["detectors"] == 1
    # one detector in the file, or only one of the other kinds: no companion
    assert signal_companion(write_velox(tmp_path / "one.emd", {"HAADF": img[0]})) is None
    assert signal_companion(write_velox(tmp_path / "eds.emd", {"HAADF": img[0], "EDS": img[1]})) is None


def test_velox_titles_of_a_spectra_and_of_detector_segments(tmp_path):
    """Velox titles its detectors with hyphens on a Spectra ("DF-I", "DF-O", "DF-S"): they pair as
    DETECTOR_NAMES spell them; a DF4 segment ("DF4-A") is a quarter of a detector, never a
    companion; of a HAADF and its drift-corrected integration ("DCFI(HAADF)") the HAADF is read;
    data stored unchunked (a converter's copy) is read whole."""
    pytest.importorskip("rsciio")
    from velox import write_velox

    from stemfast import io
    from stemfast.batch.companions import signal_companion

    img = _scan(61)
    f = write_velox(tmp_path / "spectra.emd", {"iDPC": img[1], "DF-S": img[1], "HAADF": img[0], "DF-I": img[1]})
    assert signal_companion(f) == "DF-I"
    f = write_velox(tmp_path / "segments.emd", {"HAADF": img[0], "DF4-A": img[1], "DF4-B": img[1]})
    assert signal_companion(f) is None
    f = write_velox(tmp_path / "dcfi.emd", {"DCFI(HAADF)": img[1], "HAADF": img[0]}, chunked=False)
    assert np.allclose(io.read(f).data, img[0]) and np.allclose(io.read(f, dataset="DCFI(HAADF)").data, img[1])


def test_a_velox_series_by_two_detectors_on_dask_matches_the_in_process_run(tmp_path):
    """A Velox file holding a series by two detectors (HAADF and DF2, three frames each): its chunks on
    Dask read the DF2's frames from the same file, as the whole file does in process."""
    pytest.importorskip("dask.distributed", reason="dask.distributed not installed")
    pytest.importorskip("rsciio")
    from velox import write_velox

    data = tmp_path / "data"
    data.mkdir()
    series = _scan(21, n_frames=6)
    write_velox(data / "ser.emd", {"HAADF": series[:3], "DF2": series[3:]})
    runs = {}
    for sched in (None, "local:2"):
        runs[sched] = out = tmp_path / f"out-{sched is not None}"
        rep = run_batch(data, out, scheduler=sched, show_progress=False, frames_per_task=1)
        assert rep.by_name("ser").status == "done"
        s = _summary(out, "ser")
        assert s["detectors"] == 2 and s["companion_signal"] == "DF2" and s["n_frames"] == 3
    assert (runs[None] / "ser" / "sites.csv").read_bytes() == (runs["local:2"] / "ser" / "sites.csv").read_bytes()


def test_nion_swift_data_items_pair_by_their_titles(tmp_path):
    """A Nion Swift library names its files by date and id; the detector is in the data item's title.
    Two items beside each other titled "SuperScan (HAADF) 12" and "SuperScan (MAADF) 12" of the same
    scan pair automatically (as .ndata and as .h5); "SuperScan (HAADF) 13" has no MAADF and is alone."""
    import h5py
    from test_io import _ndata, _nion_props

    from stemfast.batch.companions import title_companion

    img, other = _scan(70), _scan(71)
    for i, (t, a) in enumerate((("SuperScan (HAADF) 12", img[0]), ("SuperScan (MAADF) 12", img[1]),
                                ("SuperScan (HAADF) 13", other[0]))):
        _ndata(tmp_path / f"data_{i}.ndata", a, _nion_props(title=t))
        with h5py.File(tmp_path / f"item_{i}.h5", "w") as f:
            f.create_dataset("data", data=a).attrs["properties"] = json.dumps(_nion_props(title=t))
    assert title_companion(tmp_path / "item_0.h5") == tmp_path / "item_1.h5"
    assert title_companion(tmp_path / "data_0.ndata") == tmp_path / "data_1.ndata"
    assert title_companion(tmp_path / "data_1.ndata") == tmp_path / "data_0.ndata"
    assert title_companion(tmp_path / "data_2.ndata") is None and title_companion(tmp_path / "x.tif") is None
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "data_0.ndata"), "-o", str(out)]) == EXIT_OK
    s = _summary(out, "data_0")
    assert s["detectors"] == 2 and s["companion_found"] == "automatic"


def test_a_tiff_holding_two_detectors_as_channels_pairs_its_own_channels(tmp_path):
    """An ImageJ hyperstack with the two detectors of a scan as channels (CYX; TCYX for a series):
    channel 0 is read, channel 1 is its automatic companion (read(dataset="channel 1")); --no-companion:
    channel 0 alone. A channel TIFF of two different scans is analysed alone with the reason."""
    import tifffile

    img, series = _scan(80), _scan(81, n_frames=6)
    tifffile.imwrite(tmp_path / "scan.tif", img, imagej=True, metadata={"axes": "CYX"})
    tifffile.imwrite(tmp_path / "ser.tif", np.stack([series[:3], series[3:]], 1), imagej=True,
                     metadata={"axes": "TCYX"})
    tifffile.imwrite(tmp_path / "two.tif", np.stack([img[0], _scan(82)[0]]), imagej=True, metadata={"axes": "CYX"})
    # titled channels (ImageJ labels): the HAADF is read wherever it is, the other detector is its companion
    tifffile.imwrite(tmp_path / "titled.tif", np.stack([img[1], img[0]]), imagej=True,
                     metadata={"axes": "CYX", "Labels": ["MAADF", "HAADF"]})
    out, alone = tmp_path / "out", tmp_path / "alone"
    rep = run_batch(tmp_path, out, show_progress=False)
    assert {r.name: r.status for r in rep.results} == dict.fromkeys(("scan", "ser", "two", "titled"), "done")
    for name, frames in (("scan", 1), ("ser", 3)):
        s = _summary(out, name)
        assert s["detectors"] == 2 and s["companion_signal"] == "channel 1" and s["n_frames"] == frames
    s = _summary(out, "titled")
    assert s["detectors"] == 2 and s["companion_signal"] == "MAADF"
    pd.testing.assert_frame_equal(pd.read_csv(out / "titled" / "sites.csv"), pd.read_csv(out / "scan" / "sites.csv"))
    s = _summary(out, "two")
    assert s["detectors"] == 1 and "not two detectors of the same scan" in " ".join(s["input"]["notes"])
    rep = run_batch(tmp_path, alone, show_progress=False, auto_companion=False)
    assert _summary(alone, "scan")["detectors"] == 1
    assert not np.allclose(pd.read_csv(out / "scan" / "sites.csv")["anomaly_score"],
                           pd.read_csv(alone / "scan" / "sites.csv")["anomaly_score"])


def test_a_velox_spectrum_image_files_images_are_read_without_rosettasciio(tmp_path):
    """RosettaSciIO will not read a Velox spectrum-image acquisition's images without the optional
    package sparse (the real test files of RosettaSciIO say so); stemfast reads the images from the
    Velox layout itself: a dark-field image before the EDS maps (a Spectra's DF-I before its DF-S, in
    DETECTOR_NAMES' order, whatever order the file holds them in), the largest of two alike,
    calibrated; its other detector is the companion as in any Velox file."""
    pytest.importorskip("rsciio")
    from velox import write_velox

    from stemfast import io

    img = _scan(90)
    maps = np.zeros((40, 40), np.float32)
    for i in range(3):  # Velox keys its images by random ids: the pick may not follow the file's order
        f = write_velox(tmp_path / f"si{i}.emd", {"UltraX": maps, "DF-I": img[0][:40, :40], "DF-S": img[1],
                                                  "DF-I ": img[0]}, spectrum_image=True)
        mg = io.read(f)
        np.testing.assert_array_equal(mg.data, img[0])
        assert mg.metadata["reader"] == "velox (h5py)" and mg.pixel_size == pytest.approx(0.02)
    out = tmp_path / "out"
    assert main(["analyze", str(f), "-o", str(out)]) == EXIT_OK
    s = _summary(out, "si2")
    assert s["detectors"] == 2 and s["companion_signal"] == "DF-S"
    (tmp_path / "bad.emd").write_bytes(b"\x89HDF\r\n\x1a\n" + b"0" * 64)  # not Velox: RosettaSciIO's reason
    with pytest.raises(io.ReadError, match="unreadable or corrupt EMD"):
        io.read(tmp_path / "bad.emd")


def test_velox_spectrum_image_series_frames_read_one_at_a_time(tmp_path):
    """Where the Velox layout is read directly (a spectrum-image acquisition RosettaSciIO cannot read), a
    frame of a series is read alone: the other frames and detectors are not loaded with it (a series is
    analysed frame by frame; on Dask each task reads its frames). Every selection gives NumPy's frames."""
    pytest.importorskip("rsciio")
    import tracemalloc

    from velox import write_velox

    from stemfast import io

    rng = np.random.default_rng(3)
    stack = rng.random((40, 128, 160)).astype(np.float32)  # 3.3 MB a detector, 82 kB a frame
    f = write_velox(tmp_path / "si.emd", {"UltraX": np.zeros((40, 40), np.float32), "HAADF": stack,
                                           "DF2": 2 * stack}, spectrum_image=True)
    whole = io.read(f)
    assert whole.metadata["reader"] == "velox (h5py)"
    np.testing.assert_array_equal(whole.data, stack)
    for frames in (7, -1, slice(None, None, -3), [5, 2, 2], np.array([1, 3])):
        np.testing.assert_array_equal(io.read(f, frames=frames).data, stack[frames])
    np.testing.assert_array_equal(io.read(f, dataset="DF2", frames=4).data, 2 * stack[4])
    io.read(f, frames=0)  # the file's metadata parsed once before the measurement
    tracemalloc.start()
    try:
        one = io.read(f, frames=11)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(one.data, stack[11])
    assert peak < 6 * stack[0].nbytes, f"reading one frame held {peak / 1e6:.2f} MB (a detector: {stack.nbytes / 1e6:.1f} MB)"
    with pytest.raises(io.ReadError, match="out of range"):
        io.read(f, frames=40)
