"""The batch runner: full results, bad inputs reported, reruns do no work, interrupted runs resume.

Small synthetic MoS2 data (stemfast.synthetic) and a tiny model keep this module to about a minute
on 2 cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import stemfast
from stemfast import __version__
from stemfast.batch import (
    EXIT_SKIPPED,
    LEADING_COLUMNS,
    OUTPUT_FILES,
    STACK_OUTPUT_FILES,
    discover_inputs,
    run_batch,
)
from stemfast.cli.batch import build_batch_parser
from stemfast.config import config_hash, file_sha256, load_config, parse_toml

DRIFT = (1.5, -0.8)  # px per frame of the synthetic stack

TINY_TOML = """\
[model]
epochs = 2
stn_epochs = 1
max_train_patches = 600
batch_size = 64
input_size = 16
channels = [8, 8, 8]
stn_channels = [4, 8]
patience = 2
device = "cpu"

[analysis]
top_n = 20
"""

PYTHON_DIR = str(Path(stemfast.__file__).resolve().parent.parent)


def make_data(root: Path, *, n_frames: int = 3) -> Path:
    """good.tif (256 px), sub/stack.tif (160 px x n_frames, drifting), truncated.tif, notes.tif (text)."""
    from stemfast.io import write_tiff
    from stemfast.synthetic import make_mos2

    root.mkdir(parents=True, exist_ok=True)
    s = make_mos2(shape=(256, 256), seed=1, rotation_deg=10.0)
    s.save(root / "good.tif")
    st = make_mos2(shape=(160, 160), seed=2, n_frames=n_frames, drift_px_per_frame=DRIFT)
    (root / "sub").mkdir(exist_ok=True)
    write_tiff(root / "sub" / "stack.tif", st.image, pixel_size=0.012, unit="nm")
    raw = (root / "good.tif").read_bytes()
    (root / "truncated.tif").write_bytes(raw[: len(raw) // 2])
    (root / "notes.tif").write_text("this is a text file, not an image\n")
    return root


def _mtimes(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in sorted(d.rglob("*")) if p.is_file()}


def _temp_files(d: Path) -> list[Path]:
    return [p for p in d.rglob("*") if ".tmp" in p.name or p.name.startswith(".")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    make_data(root / "data")
    (root / "tiny.toml").write_text(TINY_TOML)
    return root


@pytest.fixture(scope="module")
def tiny(workdir):
    return load_config(workdir / "tiny.toml")


@pytest.fixture(scope="module")
def first(workdir, tiny):
    out = workdir / "out"
    rep = run_batch(workdir / "data", out, config=tiny, show_progress=False)
    return out, rep


# ----------------------------------------------------------------------------- first run


def test_good_inputs_have_full_results_bad_ones_are_reported(first):
    out, rep = first
    st = {r.name: r for r in rep.results}
    assert set(st) == {"good", "stack", "truncated", "notes"}
    assert st["good"].status == "done" and st["stack"].status == "done"
    assert st["truncated"].status == "skipped" and "truncated" in st["truncated"].reason
    assert st["notes"].status == "skipped" and "TIFF" in st["notes"].reason
    assert rep.exit_code == EXIT_SKIPPED
    assert rep.model_trained and (out / "model.pt").exists()
    for name in ("good", "stack"):
        d = out / name
        for f in OUTPUT_FILES + ("done.json",):
            assert (d / f).stat().st_size > 0, f"{name}/{f}"
        done = json.loads((d / "done.json").read_text())
        assert done["input"]["sha256"] == file_sha256(done["input"]["path"])
        assert done["config_hash"] == rep.config_hash and done["model_sha256"] == file_sha256(out / "model.pt")
        assert done["stemfast_version"] == __version__
        files = OUTPUT_FILES + (STACK_OUTPUT_FILES if name == "stack" else ())  # a stack adds its defect tracks
        assert done["outputs"] == {f: (d / f).stat().st_size for f in files}
    # the batch summary lists the skipped files with reasons
    bs = json.loads((out / "batch_summary.json").read_text())
    assert {s["name"]: s["reason"] for s in bs["skipped"]} == {
        "truncated": st["truncated"].reason, "notes": st["notes"].reason}
    assert bs["exit_code"] == EXIT_SKIPPED
    assert not _temp_files(out)


def test_sites_csv_columns_and_frames(first):
    out, rep = first
    good = pd.read_csv(out / "good" / "sites.csv")
    stack = pd.read_csv(out / "stack" / "sites.csv")
    for df in (good, stack):
        assert list(df.columns[: len(LEADING_COLUMNS)]) == list(LEADING_COLUMNS)
        assert {"x_nm", "y_nm", "sublattice", "recon_score"} <= set(df.columns)  # calibrated + the rest
        assert len(df) > 100
        assert df["class_id"].between(0, 2).all()
        assert set(df["is_defect"].unique()) <= {0, 1}
        assert np.isfinite(df[["x", "y", "anomaly_score", "recon_error"]].to_numpy()).all()
    assert (good["frame"] == 0).all()
    assert sorted(stack["frame"].unique()) == [0, 1, 2]
    assert abs(good["x_nm"] / good["x"] - 0.012).max() < 1e-4  # synth pixel 0.12 A
    s = json.loads((out / "stack" / "summary.json").read_text())
    assert s["n_sites"] == len(stack) and s["n_frames"] == 3
    assert sum(s["class_counts"].values()) == len(stack)
    assert s["n_defects"] == int(stack["is_defect"].sum())


def test_summary_contents_and_drift(first):
    out, _ = first
    s = json.loads((out / "stack" / "summary.json").read_text())
    assert s["status"] == "ok"
    assert s["drift_px"]["frame"] == [1, 2]
    # the synthetic stack drifts by DRIFT px per frame; phase correlation recovers it
    np.testing.assert_allclose(s["drift_px"]["dx"], [DRIFT[0]] * 2, atol=0.25)
    np.testing.assert_allclose(s["drift_px"]["dy"], [DRIFT[1]] * 2, atol=0.25)
    g = json.loads((out / "good" / "summary.json").read_text())
    assert 10 < g["lattice"]["spacing_px"] < 20 and g["lattice"]["spacing_nm"] == pytest.approx(
        g["lattice"]["spacing_px"] * 0.012, rel=1e-3)
    assert g["lattice"]["rotation_deg"] is not None
    assert g["peak_memory_mib"] > 10
    # every class is named for the sublattice most of its sites sit on, in every frame of the stack
    assert set(s["class_sublattice"]) == set(s["class_counts"])
    assert all(v["sublattice"] in ("Mo", "S2", "hollow") and 1 / 3 <= v["share"] <= 1
               for v in s["class_sublattice"].values())
    stages = {r["stage"]: r for r in g["throughput"]}
    for st in ("spacing", "bandpass", "peaks", "lattice", "describe", "patches", "encode", "analysis", "total"):
        assert stages[st]["seconds"] >= 0 and stages[st]["sites"] == g["n_sites"]
    assert stages["total"]["sites_per_s"] > 0
    assert len(g["top"]) == 20 and g["top"][0]["anomaly_score"] >= g["top"][-1]["anomaly_score"]
    # per sublattice with flagged sites, the estimated share the noise alone makes (stemfast.fdr): the
    # stack's is the largest over its frames
    frames_fdr = [f.get("flagged_fdr") or {} for f in s["frames"]]
    assert s["flagged_fdr"] == ({k: max(f[k] for f in frames_fdr if k in f) for f in frames_fdr for k in f} or None)
    assert all(set(v) <= {"Mo", "S2", "hollow"} and all(0 <= q <= 1 for q in v.values()) for v in frames_fdr)
    assert s["n_defects"] == 0 or s["flagged_fdr"]


def test_batch_level_outputs(first, tiny):
    out, rep = first
    bs = json.loads((out / "batch_summary.json").read_text())
    names = [r["stage"] for r in bs["stage_table"]]
    assert names == ["read", "spacing", "bandpass", "peaks", "lattice", "describe", "patches", "encode",
                     "analysis", "total"]
    total_sites = sum(json.loads((out / n / "summary.json").read_text())["n_sites"] for n in ("good", "stack"))
    assert bs["stage_table"][-1]["sites"] == total_sites
    # resolved settings: all settings, version, checksums of every input; usable as --config
    toml = parse_toml((out / "stemfast.toml").read_text())
    assert toml["stemfast"]["version"] == __version__ and toml["stemfast"]["config_hash"] == config_hash(tiny)
    assert set(toml["inputs"]) == {"good.tif", "stack.tif", "truncated.tif", "notes.tif"}
    assert toml["inputs"]["good.tif"] == file_sha256(out.parent / "data" / "good.tif")
    assert load_config(out / "stemfast.toml") == tiny
    # model provenance
    mi = json.loads((out / "model.json").read_text())
    assert mi["sha256"] == file_sha256(out / "model.pt") and mi["config_hash"] == config_hash(tiny)
    from stemfast.batch import load_model

    m = load_model(out / "model.pt")
    assert m.extra["patch_size"] == mi["patch_size"] and m.extra["config_hash"] == config_hash(tiny)
    # one self-contained HTML file
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5  # classes + defects of 2 inputs, tracks of the stack
    assert "truncated.tif" in html and "notes.tif" in html
    assert "http://" not in html and "https://" not in html and "<script" not in html.lower()


def test_classes_figure_is_an_image(first):
    from PIL import Image

    out, _ = first
    for name in ("good", "stack"):
        for f in ("classes.png", "defects.png"):
            with Image.open(out / name / f) as im:
                assert im.format == "PNG" and min(im.size) > 300


def test_a_dense_class_map_adds_a_full_resolution_crop(tmp_path):
    """Where the sites of the whole image would be drawn too small to tell apart (a large image), the
    class map gets a second panel: the centre at the image's own resolution; a sparse one stays one
    panel."""
    from PIL import Image

    from stemfast.report import MIN_DOT_PT, plot_class_map

    rng = np.random.default_rng(0)
    img = rng.normal(size=(1200, 1200)).astype(np.float32)
    sizes = {}
    for sp in (5.0, 24.0):  # dots of 0.9 and 4.2 pt on the 8-inch map
        g = np.arange(2.0, 1198.0, sp)
        xx, yy = np.meshgrid(g, g)
        x, y = xx.ravel(), yy.ravel()
        cid = (np.arange(len(x)) % 3).astype(np.int64)
        plot_class_map(tmp_path / f"c{sp:g}.png", img, x, y, cid, spacing_px=sp, is_defect=cid == 5)
        with Image.open(tmp_path / f"c{sp:g}.png") as im:
            sizes[sp] = im.size
    assert 0.55 * 5.0 * 8 * 72 / 1200 < MIN_DOT_PT < 0.55 * 24.0 * 8 * 72 / 1200  # the two cases are the two sides
    assert sizes[5.0][0] / sizes[5.0][1] > 1.7 and sizes[24.0][0] / sizes[24.0][1] < 1.4, sizes


def test_class_map_marks_crowded_sites(tmp_path, monkeypatch):
    """Crowded sites (the ``crowded`` column) get a cross on the class map and a legend entry with
    their count; without any, neither."""
    import stemfast.report as report

    seen = []
    orig = report._draw_sites

    def spy(ax, x, y, cid, is_defect, s, **kw):
        seen.append(None if kw.get("crowded") is None else int(np.sum(kw["crowded"])))
        return orig(ax, x, y, cid, is_defect, s, **kw)

    monkeypatch.setattr(report, "_draw_sites", spy)
    labels = []
    orig_legend = report.pyplot().Axes.legend

    def legend(self, *a, **kw):
        labels.extend(h.get_label() for h in kw.get("handles", []))
        return orig_legend(self, *a, **kw)

    monkeypatch.setattr(report.pyplot().Axes, "legend", legend)
    g = np.arange(4.0, 200.0, 12.0)
    xx, yy = np.meshgrid(g, g)
    x, y = xx.ravel(), yy.ravel()
    cid = (np.arange(len(x)) % 3).astype(np.int64)
    crowded = np.zeros(len(x), bool)
    crowded[:7] = True
    img = np.random.default_rng(0).normal(size=(200, 200)).astype(np.float32)
    report.plot_class_map(tmp_path / "c.png", img, x, y, cid, spacing_px=12.0, crowded=crowded)
    assert (tmp_path / "c.png").stat().st_size > 0 and seen == [7] and "crowded (7)" in labels
    seen.clear(), labels.clear()
    report.plot_class_map(tmp_path / "d.png", img, x, y, cid, spacing_px=12.0)
    assert seen == [0] and not any(lab.startswith("crowded") for lab in labels)


# ----------------------------------------------------------------------------- rerun


def test_rerun_does_no_work(first, tiny, monkeypatch):
    out, _ = first
    before = _mtimes(out)

    def boom(*a, **k):
        raise AssertionError("a current batch must not read, prepare or train")

    import stemfast.io
    import stemfast.model
    import stemfast.pipeline

    monkeypatch.setattr(stemfast.io, "read", boom)
    monkeypatch.setattr(stemfast.pipeline, "prepare", boom)
    monkeypatch.setattr(stemfast.model.RVAE, "fit", classmethod(boom))
    monkeypatch.setattr(stemfast.model.RVAE, "load", classmethod(boom))
    rep = run_batch(out.parent / "data", out, config=tiny, show_progress=False)
    st = {r.name: r.status for r in rep.results}
    assert st == {"good": "current", "stack": "current", "truncated": "skipped", "notes": "skipped"}
    assert not rep.model_trained and not rep.did_work
    assert rep.exit_code == EXIT_SKIPPED  # the skipped files are still reported
    assert _mtimes(out) == before  # nothing rewritten


def test_changed_settings_are_not_current(first, tiny, tmp_path):
    """A done.json of other settings does not count: the currency check compares the settings hash."""
    from stemfast.batch import discover_inputs as disc
    from stemfast.batch.inputs import fingerprint_input
    from stemfast.batch.status import current_done

    out, rep = first
    e = [e for e in disc(out.parent / "data") if e.name == "good"][0]
    fingerprint_input(e)
    sha = file_sha256(out / "model.pt")
    assert current_done(e, out / "good", chash=rep.config_hash, model_sha=sha) is not None
    assert current_done(e, out / "good", chash="0" * 16, model_sha=sha) is None
    assert current_done(e, out / "good", chash=rep.config_hash, model_sha="f" * 64) is None


# ----------------------------------------------------------------------------- interrupted runs


def _cli(args, env_extra=None, cwd=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = PYTHON_DIR + os.pathsep + env.get("PYTHONPATH", "")
    env["STEMFAST_PROGRESS"] = "0"
    env.pop("STEMFAST_TEST_CRASH", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "stemfast", "batch", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_a_uint16_stack_gives_the_sites_of_its_float32_copy(tmp_path):
    """A detector's uint16 stack is memory-mapped and converted a frame at a time (the float32 stack too):
    ``python -m stemfast batch`` gives byte-identical sites.csv for it and its float32 copy, as .npy and
    as TIFF."""
    import tifffile

    from stemfast.synthetic import make_mos2

    im = make_mos2(shape=(160, 160), seed=2, n_frames=3, drift_px_per_frame=DRIFT).image
    counts = np.round((im - im.min()) / (im.max() - im.min()) * 4000 + 100).astype(np.uint16)
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "n_u16.npy", counts)
    np.save(data / "n_f32.npy", counts.astype(np.float32))
    tifffile.imwrite(data / "t_u16.tif", counts)
    tifffile.imwrite(data / "t_f32.tif", counts.astype(np.float32))
    p = _cli([str(data), "-o", str(tmp_path / "out")])
    assert p.returncode == 0, p.stderr[-2000:]
    ref = (tmp_path / "out" / "n_f32" / "sites.csv").read_bytes()
    assert len(pd.read_csv(tmp_path / "out" / "n_f32" / "sites.csv")) > 300
    for name in ("n_u16", "t_u16", "t_f32"):
        assert (tmp_path / "out" / name / "sites.csv").read_bytes() == ref, name


def test_killed_run_resumes_without_losing_work(workdir, tiny, monkeypatch, tmp_path):
    data = workdir / "data"
    out = tmp_path / "out"
    args = [str(data), "-o", str(out), "--config", str(workdir / "tiny.toml")]
    # 1. SIGKILL right after the first input's done.json
    p = _cli(args, {"STEMFAST_TEST_CRASH": "after_done:good"})
    assert p.returncode == -9, p.stderr[-2000:]
    assert (out / "good" / "done.json").exists() and (out / "model.pt").exists()
    assert not (out / "stack" / "done.json").exists() and not (out / "report.html").exists()
    good_done = (out / "good" / "done.json").stat().st_mtime_ns
    model_mtime = (out / "model.pt").stat().st_mtime_ns
    # 2. SIGKILL in the middle of the next input: outputs written into its staging folder, marker not yet,
    #    nothing in place (the outputs of an input are replaced as a whole)
    p = _cli(args, {"STEMFAST_TEST_CRASH": "before_done:stack"})
    assert p.returncode == -9, p.stderr[-2000:]
    staged = list(out.glob(".stack.staging-*"))
    assert len(staged) == 1 and (staged[0] / "sites.csv").exists() and not (staged[0] / "done.json").exists()
    assert not (out / "stack" / "done.json").exists()
    assert (out / ".stemfast.lock").exists()  # left by the killed run: the next run takes it over
    # 3. the rerun finishes the batch: no retraining, finished input untouched, stack redone
    p = _cli(args)
    assert p.returncode == EXIT_SKIPPED, p.stderr[-2000:]
    assert "truncated.tif" in p.stderr and "notes.tif" in p.stderr  # skipped files on the console
    assert "encode" in p.stdout  # the stage table
    assert (out / "model.pt").stat().st_mtime_ns == model_mtime
    assert (out / "good" / "done.json").stat().st_mtime_ns == good_done
    bs = json.loads((out / "batch_summary.json").read_text())
    assert {i["name"]: i["status"] for i in bs["inputs"]} == {
        "good": "current", "stack": "done", "truncated": "skipped", "notes": "skipped"}
    assert not _temp_files(out)
    # 4. identical to an uninterrupted run with the same model (which --model does not retrain)
    import stemfast.model

    def no_fit(*a, **k):
        raise AssertionError("--model must not train")

    monkeypatch.setattr(stemfast.model.RVAE, "fit", classmethod(no_fit))
    ref = tmp_path / "ref"
    rep = run_batch(data, ref, config=tiny, model_path=out / "model.pt", show_progress=False)
    assert not rep.model_trained and rep.model_sha256 == file_sha256(out / "model.pt")
    for name in ("good", "stack"):
        assert (ref / name / "sites.csv").read_bytes() == (out / name / "sites.csv").read_bytes(), name
        a = json.loads((ref / name / "summary.json").read_text())
        b = json.loads((out / name / "summary.json").read_text())
        for k in ("n_sites", "n_defects", "class_counts", "defect_kinds", "lattice", "top"):
            assert a[k] == b[k], (name, k)


# ----------------------------------------------------------------------------- naming, CLI


def test_duplicate_stems_get_distinct_names(tmp_path):
    d = tmp_path / "in"
    for rel in ("a/img.npy", "b/img.npy", "img.tif", "img.npy", "model.npy", "solo.npy"):
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        np.save(p, np.zeros((16, 16), np.float32)) if rel.endswith(".npy") else p.write_bytes(b"x")
    names = {e.rel: e.name for e in discover_inputs(d)}
    assert names["solo.npy"] == "solo"
    assert names["a/img.npy"] == "a__img" and names["b/img.npy"] == "b__img"
    assert names["img.tif"] != names["img.npy"] and len(set(names.values())) == len(names)
    # names differing in case only (one folder on a case-insensitive file system), and a number that
    # would give an input another input's name; letters of any script are kept
    from stemfast.batch.inputs import unique_names

    got = unique_names([Path(n) for n in ("A.npy", "a.npy", "a_1.npy", "état.tif", "試料.tif", "画像.tif")])
    assert got == ["A", "a_2", "a_1", "état", "試料", "画像"]
    # an output folder inside the input folder is never searched
    out = d / "results"
    out.mkdir()
    np.save(out / "x.npy", np.zeros((16, 16)))
    assert "results/x.npy" not in {e.rel for e in discover_inputs(d, exclude=out)}


def test_training_without_any_lattice_claims_no_model(tmp_path, capsys):
    """--train where no input has a lattice: the run said "model trained" and batch_summary.json
    "model_trained_this_run": true, though no model.pt was written. Now no model is claimed, and the
    summary, the report and the console say why."""
    from stemfast.cli.batch import print_report

    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "noise.npy", np.random.default_rng(0).normal(size=(96, 96)).astype(np.float32))
    out = tmp_path / "out"
    rep = run_batch(data, out, config=load_config(None, {"model.epochs": 1, "model.stn_epochs": 1}), train=True,
                    show_progress=False)
    assert not (out / "model.pt").exists()
    why = "none: no input of the training sample had a lattice, no model could be trained"
    assert not rep.model_trained and rep.model_sha256 is None and rep.model_source == why
    bs = json.loads((out / "batch_summary.json").read_text())
    assert bs["model_trained_this_run"] is False and bs["model"]["source"] == why
    assert bs["model"].get("sha256") is None and bs["model"]["engine"] is None
    assert f"model ({why})" in (out / "report.html").read_text()
    print_report(rep)
    printed = capsys.readouterr().out
    assert "model trained" not in printed and f"; model {why}" in printed


def test_help_documents_every_option():
    p = build_batch_parser()
    text = p.format_help()
    for a in p._actions:
        assert a.help, a.option_strings
        for opt in a.option_strings:
            assert opt in text
    for opt in ("--config", "--model", "--scheduler", "--force", "--plain-vae", "--latent-dim", "--epochs",
                "--spacing", "--backend", "-o", "-v"):
        assert opt in text
    assert "exit status" in text and "done.json" in text
    from stemfast.cli import build_parser

    args = build_parser().parse_args(["batch", "DIR", "--epochs", "3", "--plain-vae", "--spacing", "11"])
    from stemfast.cli.options import config_from_args

    c = config_from_args(args)
    assert (c.model.epochs, c.model.model, c.sites.spacing) == (3, "vae", 11.0)


def test_cli_errors(tmp_path, capsys):
    from stemfast.cli.batch import run_batch_cli

    (tmp_path / "empty").mkdir()
    assert run_batch_cli([str(tmp_path / "empty"), "-o", str(tmp_path / "o")]) == 1
    assert "no micrographs" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nepoch = 3\n")
    assert run_batch_cli([str(tmp_path / "empty"), "--config", str(bad)]) == 2  # settings error: exit 2
    assert "model.epoch" in capsys.readouterr().err


def test_frames_are_read_ahead_in_order_and_read_errors_stay_per_frame():
    """The next frame is read (in a background thread) while the current one is analysed."""
    import threading

    from stemfast.batch.frames import prefetched

    class Stack:
        is_stack = True

        def __init__(self) -> None:
            self.started: list[int] = []
            self.threads: set[str] = set()

        def frame(self, i: int) -> np.ndarray:
            self.started.append(i)
            self.threads.add(threading.current_thread().name)
            if i == 2:
                raise OSError("truncated frame")
            return np.full((4, 4), i, np.float32)

    mg = Stack()
    seen = []
    for f, img, exc, wait in prefetched(mg, [0, 1, 2, 3]):
        # while frame f is being consumed (the consumer has not asked for more), frame f + 1 gets read
        deadline = time.monotonic() + 10.0
        while mg.started[-1] != min(f + 1, 3) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert mg.started[-1] == min(f + 1, 3)
        assert wait >= 0.0
        seen.append((f, None if img is None else float(img[0, 0]), None if exc is None else str(exc)))
    assert seen == [(0, 0.0, None), (1, 1.0, None), (2, None, "truncated frame"), (3, 3.0, None)]
    assert all(t.startswith("stemfast-read") for t in mg.threads)


def test_drift_of_large_frames_is_measured_to_a_few_hundredths_of_a_pixel():
    """Frames above 512 px are block-averaged for the drift; the sub-pixel search must still resolve
    drifts well below one block (it used to report 0.4 / 0.0 px for a true 0.3 / 0.2 px on 2048 px)."""
    from stemfast.drift import block_average, phase_drift
    from stemfast.synthetic import make_mos2

    s = make_mos2(shape=(1100, 1100), seed=9, n_frames=2, drift_px_per_frame=(0.3, 0.2), contamination=1)
    dx, dy = phase_drift(block_average(s.image[0]), block_average(s.image[1]), s.image.shape[1:])
    assert block_average(s.image[0]).shape[0] < 1100  # block-averaged
    assert abs(dx - 0.3) < 0.05 and abs(dy - 0.2) < 0.05, (dx, dy)


def test_drift_to_a_frame_scanned_half_is_measured_on_what_both_frames_hold(tmp_path, tiny):
    """A series' last frame aborted halfway (its rest zero): the correlation followed the step at the
    edge of the unscanned rest and the windowed overlap of the lattice, 45 px off for a true 0.2 px,
    and every defect track broke there. The frames are compared where both hold data."""
    from stemfast.drift import block_average, phase_drift
    from stemfast.synthetic import make_mos2

    st = make_mos2(shape=(384, 384), seed=5, n_frames=4, drift_px_per_frame=(0.3, 0.2)).image.astype(np.float32)
    st[-1, 200:] = 0.0
    (a, ga), (b, gb) = block_average(st[2], with_gap=True), block_average(st[3], with_gap=True)
    assert not ga.any() and 0.45 < gb.mean() < 0.5
    dx, dy = phase_drift(a, b, st.shape[1:], gaps=(ga, gb))
    assert abs(dx - 0.3) < 0.05 and abs(dy - 0.2) < 0.05, (dx, dy)
    assert abs(phase_drift(a, b, st.shape[1:])[1] - 0.2) > 10  # without the gaps: the failure described
    with pytest.raises(ValueError, match="gaps must have the frames' shape"):
        phase_drift(a, b, st.shape[1:], gaps=(ga[:5], gb))
    s = _series_summary(tmp_path, st, tiny)
    np.testing.assert_allclose(s["drift_px"]["dy"], [0.2] * 3, atol=0.05)


def _series_summary(tmp_path, stack: np.ndarray, config) -> dict:
    """``summary.json`` of ``batch`` on a folder holding ``stack`` as ``series.npy``."""
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "series.npy", stack)
    run_batch(data, tmp_path / "out", config=config, show_progress=False)
    return json.loads((tmp_path / "out" / "series" / "summary.json").read_text())


def test_drift_is_measured_past_hot_pixels_that_stay_in_place(tmp_path, tiny):
    """200 hot pixels at the same place in every frame of a 512 x 512 series (the simulator's model of
    a hot detector pixel): a pattern that does not move, and the phase correlation followed it (0.22 px
    for a true 1.3 px). Measured on the frames with their spikes replaced, as find_sites reads them."""
    from stemfast.drift import block_average, phase_drift
    from stemfast.synthetic import make_mos2

    st = make_mos2(shape=(512, 512), seed=1, n_frames=3, drift_px_per_frame=(1.3, -0.7),
                   hot_pixels=200).image.astype(np.float32)
    dx, _ = phase_drift(block_average(st[0]), block_average(st[1]), st.shape[1:])
    assert dx < 0.5  # the failure described
    s = _series_summary(tmp_path, st, tiny)
    np.testing.assert_allclose(s["drift_px"]["dx"], [1.3] * 2, atol=0.05)
    np.testing.assert_allclose(s["drift_px"]["dy"], [-0.7] * 2, atol=0.05)
    assert s["lattice"]["spikes"]["n"] == 200


def test_csv_stream_writes_the_same_bytes_in_row_chunks():
    """sites.csv is formatted a chunk of rows at a time (bounded memory on million-site tables)."""
    import io

    from stemfast.batch.tables import CsvStream
    from stemfast.table import SiteTable

    rng = np.random.default_rng(4)
    n = 1000
    t = SiteTable({"frame": np.zeros(n, np.int64), "x": rng.uniform(0, 4000, n), "y": rng.uniform(0, 4000, n),
                   "source": np.where(rng.random(n) < 0.5, "peak", "lattice"), "is_defect": rng.random(n) < 0.1,
                   "intensity": rng.normal(size=n)}, {})
    whole, chunked = io.StringIO(), io.StringIO()
    a = CsvStream(whole)
    a.write(t)
    b = CsvStream(chunked)
    b.CHUNK = 37
    b.write(t)
    b.write(t.select(np.arange(10)))
    a.write(t.select(np.arange(10)))
    assert chunked.getvalue() == whole.getvalue() and a.n_rows == b.n_rows == n + 10
    assert whole.getvalue().count("\n") == n + 11


@pytest.mark.parametrize("backend", ["cpp", "numba"])
def test_every_backend_writes_the_site_table_as_python_formats_it(backend):
    """sites.csv's rows come from the format_csv_rows kernel: each backend writes Python's own
    "%.8g" / "%.6g" % value, str(int), 1 / 0 and the quoted strings, byte for byte -- NaN of either
    sign, infinities, -0, subnormals, exact decimal ties, float32 values, strings with commas."""
    from stemfast.backend import available_backends, get_kernels
    from stemfast.batch.tables import CODE, cell_spec

    if backend not in available_backends():
        pytest.skip(f"backend {backend} not available")
    rng = np.random.default_rng(11)
    n = 5000
    special = np.array([np.nan, -np.nan, np.inf, -np.inf, -0.0, 0.0, 5e-324, 1.7976931348623157e308, 1234565.0,
                        123456.5, 2.5e-5, 0.00001234565, 1e16, 99999.95, 999999.5, 0.1])
    floats = [rng.uniform(0, 16384, n), rng.normal(0, 10.0, n).astype(np.float32), rng.normal(0, 1e-7, n),
              rng.normal(0, 1e12, n)]
    floats[2][:len(special)] = special
    floats[1][:4] = [np.nan, np.inf, -np.inf, -0.0]
    cols = {"x": floats[0], "intensity": floats[1], "a": floats[2], "b": floats[3],
            "lattice_i": rng.integers(-2**40, 2**40, n), "class_id": rng.integers(-1, 3, n).astype(np.int8),
            "is_defect": rng.random(n) < 0.3,
            "defect_kind": np.array(["none", "vacancy_S", 'odd "kind", here', "x\ny"])[rng.integers(0, 4, n)],
            "note": np.array([None, 3, "a,b"], dtype=object)[rng.integers(0, 3, n)]}
    specs = [cell_spec(v, k) for k, v in cols.items()]
    assert specs[-1][1] == specs[-2][1] == CODE
    args = (n, [s[0] for s in specs], [s[1] for s in specs], [s[2] for s in specs])
    got = get_kernels(backend).format_csv_rows(*args)
    ref = get_kernels("numpy").format_csv_rows(*args)
    assert got == ref
    # and the reference is Python's formatting of the values, cell by cell
    def py(v, k):
        if isinstance(v, (bool, np.bool_)):
            return "1" if v else "0"
        if isinstance(v, (int, np.integer)):
            return str(int(v))
        if isinstance(v, (float, np.floating)):
            return ("%.8g" if k == "x" else "%.6g") % float(v)
        s = str(v)
        return '"' + s.replace('"', '""') + '"' if any(ch in s for ch in ',"\n\r') else s
    rows = ["".join([",".join(py(cols[k][i], k) for k in cols), "\n"]) for i in range(n)]
    assert ref == "".join(rows)


def test_unsure_lattice_and_calibration_are_warnings(tmp_path):
    """An unsure lattice, a calibration that does not fit the material, or sideways scan jumps seen and
    not repaired (said only in summary.json's lattice before) reach summary.json's warnings, and
    report.html shows them per input."""
    from stemfast.batch.outputs import lattice_warnings
    from stemfast.report import write_html_report

    calib = ("the pixel size (0.02 nm) and MoS2's lattice constant (0.316 nm) predict a site spacing of 16.60 px; "
             "the image shows 12.10 px (-27.1%): check the calibration or the material")
    lat = {"unsure": ["weak Bragg ring (prominence 3.1)"], "calibration_ok": False, "material": "MoS2",
           "calibration_expected_spacing_px": 16.6, "spacing_px": 12.1, "calibration_warning": calib}
    w = lattice_warnings(lat)
    assert len(w) == 2 and "weak Bragg ring" in w[0] and w[1] == calib  # find_sites' own wording
    assert lattice_warnings({"unsure": [], "calibration_ok": True}) == [] and lattice_warnings(None) == []
    crowded = {"crowding": {"fraction": 0.06, "warning": "6.0% of the sites ..."}}
    assert lattice_warnings(crowded) == ["6.0% of the sites ..."]
    assert lattice_warnings({"crowding": {"fraction": 0.01}}) == []
    jumps = "2 sideways jump(s) of the scan lines were not repaired (the first line after each: rows 100 by +9.0 px"
    said = lattice_warnings({"scan_lines": {"jump_rows": [], "jumps_not_repaired": jumps,
                                            "jumps_not_repaired_confirmed": True}})
    assert len(said) == 1 and said[0].startswith("scan: " + jumps) and "analysed as recorded" in said[0]
    # candidates the lattice did not confirm (a given spacing the ring is not at) are no evidence of a jump
    unconfirmed = "scan-jump candidates were not confirmed: the Bragg ring's site spacing 15.21 px is not the given 26.3 px"
    assert lattice_warnings({"scan_lines": {"jumps_not_repaired": unconfirmed,
                                            "jumps_not_repaired_confirmed": False}}) == []
    w = w + said
    summ = {"name": "img", "status": "ok", "n_sites": 10, "warnings": w, "lattice": lat}
    write_html_report(tmp_path / "report.html", batch={"inputs": [{"name": "img", "status": "ok"}]},
                      summaries=[summ], out_dir=tmp_path)
    html = (tmp_path / "report.html").read_text()
    assert "warning: the site lattice is uncertain: weak Bragg ring" in html
    assert "check the calibration or the material" in html
    assert "were not repaired (the first line after each: rows 100 by +9.0 px" in html


def test_report_says_how_the_lattice_was_found(tmp_path):
    from stemfast.report import write_html_report

    lat = {"spacing_px": 12.5, "spacing_source": "fft ring", "ring_prominence": 1480.6, "confidence": 0.93,
           "ring_note": "(1/4 spots inside the ring: a coarser lattice)", "unsure": []}
    summ = {"name": "img", "status": "ok", "n_sites": 10, "warnings": [], "lattice": lat}
    write_html_report(tmp_path / "report.html", batch={"inputs": [{"name": "img", "status": "ok"}]},
                      summaries=[summ], out_dir=tmp_path)
    html = (tmp_path / "report.html").read_text()
    assert ("the metal lattice&#x27;s Bragg ring (prominence 1481); re-read as a coarser lattice (strong spots "
            "inside the ring)") in html
    assert "lattice confidence</td><td>0.93</td>" in html
    summ["lattice"] = {"spacing_px": 12.5, "spacing_source": "given", "ring_prominence": 40.0, "ring_note": ""}
    write_html_report(tmp_path / "report.html", batch={"inputs": [{"name": "img", "status": "ok"}]},
                      summaries=[summ], out_dir=tmp_path)
    html = (tmp_path / "report.html").read_text()
    assert "the given spacing (prominence 40)</td>" in html and "vacuum" not in html
    summ["lattice"]["hole_fraction"] = 0.4012  # holes / the flake's edge: said with their share
    write_html_report(tmp_path / "report.html", batch={"inputs": [{"name": "img", "status": "ok"}]},
                      summaries=[summ], out_dir=tmp_path)
    assert "the flake&#x27;s edge (no sites)</td><td>40.1% of the image</td>" in (tmp_path / "report.html").read_text()


def test_report_counts_each_warning_once_and_shows_the_texture_warning(tmp_path):
    """The batch summary lists the class and texture warnings among its warnings and under their own
    keys too: the inputs table counts each once, and the input's section shows them."""
    from stemfast.report import write_html_report

    cw = "the learned classes do not follow the sublattices (ARI 0.80 ...)"
    tw = "374 sites (13.3%) lie where the model reconstructs the surroundings more than 2x worse ..."
    summ = {"name": "img", "status": "ok", "n_sites": 10, "warnings": ["warning: lattice unsure", cw, tw],
            "class_warning": cw, "texture_warning": tw, "lattice": {}}
    write_html_report(tmp_path / "report.html", batch={"inputs": [{"name": "img", "status": "ok"}]},
                      summaries=[summ], out_dir=tmp_path)
    html = (tmp_path / "report.html").read_text()
    assert "(3 warnings)" in html and "(5 warnings)" not in html
    assert "374 sites (13.3%) lie where the model reconstructs" in html
    # and each is shown once in the input's section (a summary with them under their own keys only: once too)
    assert html.count("374 sites (13.3%)") == 1 and html.count("the learned classes do not follow") == 1
    write_html_report(tmp_path / "report.html", batch={"inputs": [{"name": "img", "status": "ok"}]},
                      summaries=[{**summ, "warnings": []}], out_dir=tmp_path)
    html = (tmp_path / "report.html").read_text()
    assert html.count("374 sites (13.3%)") == 1 and html.count("the learned classes do not follow") == 1


def test_a_stacks_repeated_warnings_are_one_line_with_their_frames():
    """A warning every frame of a series gives, with its own numbers (anisotropy, crowding), is one
    line naming the frames (as ranges) and worded as the first of them; a single image's warnings are
    listed as they are, once each."""
    from stemfast.batch.outputs import InputSource, frame_ranges, input_warnings

    def meta(f, aniso):
        return {"frame": f, "warnings": [],
                "lattice": {"distortion": {"warning": f"the lattice is anisotropic by {aniso:.1f}% (...)"},
                            **({"unsure": ["weak Bragg ring"]} if f == 4 else {})}}

    fm = [meta(f, 18.0 + 0.1 * f) for f in range(6)]
    stack = InputSource(entry=None, n_frames=6, is_stack=True, info={"notes": ["a fact", "a note"],
                                                                      "read_warnings": ["a note"]}, get_frame=None)
    w = input_warnings(stack, fm)
    assert w == ["a note", "frames 0-5 (as in frame 0): the lattice is anisotropic by 18.0% (...)",
                 "frame 4: the site lattice is uncertain: weak Bragg ring"]
    single = InputSource(entry=None, n_frames=1, is_stack=False, info={}, get_frame=None)
    assert input_warnings(single, fm[:1] * 2) == ["the lattice is anisotropic by 18.0% (...)"]
    assert frame_ranges([7, 0, 1, 2, 5, 8]) == "0-2, 5, 7-8" and frame_ranges([3]) == "3"


def test_no_lattice_says_why_and_the_drift_is_measured_across_a_blank_frame(tmp_path, tiny):
    """An input without a lattice carries the reason in summary.json (as the log says it); in a
    series, a blank frame is named with its reason, and the drift to it is unknown (not a number read
    off an empty correlation): the frame after it is measured from the frame before it. The summary
    lists that drift apart (``over_gap``), not as unknown, the report's total drift holds it, and the
    report says no track ends there. Before: frames 2 and 3 'unknown ... defect tracks end there', while
    the tracks went on (drift_breaks []), and the total left the gap out."""
    from stemfast.drift import phase_drift
    from stemfast.synthetic import make_mos2

    data = tmp_path / "data"
    data.mkdir()
    st = make_mos2(shape=(160, 160), seed=2, n_frames=4, drift_px_per_frame=DRIFT).image.astype(np.float32)
    st[2] = 0.0  # the beam blanked for one frame
    np.save(data / "series.npy", st)
    np.save(data / "flat.npy", np.full((128, 128), 3.0, np.float32))
    assert all(np.isnan(phase_drift(st[1], st[2], st.shape[1:])))
    run_batch(data, tmp_path / "out", config=tiny, show_progress=False)
    flat = json.loads((tmp_path / "out" / "flat" / "summary.json").read_text())
    assert flat["status"] == "no lattice" and flat["warnings"] == ["image is constant: no lattice"]
    s = json.loads((tmp_path / "out" / "series" / "summary.json").read_text())
    assert "frame 2: image is constant: no lattice" in s["warnings"]
    d = s["drift_px"]
    assert d["unknown"] == [2] and d["frame"] == [1]
    assert d["over_gap"]["frame"] == [3] and d["over_gap"]["from_frame"] == [1]
    assert np.allclose([d["over_gap"]["dx"][0], d["over_gap"]["dy"][0]], 2 * np.asarray(DRIFT), atol=0.3)
    assert s["tracking"]["drift_breaks"] == [] and s["tracking"]["drift_gaps"] == [[1, 3]]
    assert [f["status"] for f in s["frames"]] == ["ok", "ok", "no lattice", "ok"]
    html = (tmp_path / "out" / "report.html").read_text()
    assert "drift unknown at frame(s) 2 (a frame without a lattice" in html and "image is constant: no lattice" in html
    assert "no defect track ends there" in html and "tracks end there" not in html
    total = (d["dx"][0] + d["over_gap"]["dx"][0], d["dy"][0] + d["over_gap"]["dy"][0])
    assert f"total ({total[0]:.2f}, {total[1]:.2f}) px over 1 steps and 1 across frames without a lattice (1 to 3)" in html
    assert "done: no lattice" in html  # the inputs table says it as well as the input's own section


def test_the_report_says_defect_tracks_end_only_at_the_drift_breaks():
    """Frames whose drift is unknown: the report names them, and says the tracks end at the tracking's drift
    breaks only (before: 'defect tracks end there' at every frame listed)."""
    from stemfast.report import _drift_html

    html = "".join(_drift_html({"frame": [1], "dx": [1.0], "dy": [0.5], "unknown": [2, 4]}, [4]))
    assert "drift unknown at frame(s) 2, 4" in html and "defect tracks end at frame(s) 4 (drift breaks)" in html


def test_a_frame_chunk_part_keeps_the_site_tables_metadata(tmp_path):
    """A stack analysed in chunks (Dask) is assembled from parts: each frame's site table comes back
    with its metadata, where the tracker reads the bands of scan lines that jumped sideways
    (``lattice.scan_lines``) to link the sites where the lattice has them. Without it, the chunked run
    linked such a band's sites at their recorded positions and its tracks.csv differed from the
    in-process run's by the jump (0.76 px on tests/test_distributed.py's series)."""
    from stemfast.batch.frames import FrameResult
    from stemfast.batch.parts import load_part, save_part
    from stemfast.scanlines import lattice_positions
    from stemfast.table import SiteTable

    meta = {"shape": [128, 128], "spacing_px": 5.0,
            "lattice": {"scan_lines": {"jump_rows": [86, 110], "jump_px": [0.76, -0.76], "jump_column_px": 1.0}}}
    xy = np.array([[36.6, 99.1], [36.6, 20.0]])
    table = SiteTable({"x": xy[:, 0], "y": xy[:, 1], "frame": np.zeros(2, np.int64)}, meta)
    path = tmp_path / "part.npz"
    save_part(path, [FrameResult({"frame": 0}, table, None), FrameResult({"frame": 1})], {"start": 0}, {})
    back = list(load_part(path))
    assert back[0].table.meta == meta and back[1].table is None
    moved = lattice_positions(back[0].table.xy, back[0].table.meta)
    assert moved[0, 0] == pytest.approx(36.6 - 0.76) and moved[1, 0] == 36.6  # in the band, and outside it


def test_the_batch_hands_back_a_pictures_freed_buffers_after_reading_it(tmp_path, monkeypatch):
    """An exported picture's decoding frees buffers of its colour size once it is grey (0.8 GB each
    for a 16k x 16k RGB export); the batch's read hands freed memory back to the kernel after a picture
    (stemfast.heap.hand_back_freed), not after the data files, whose reuse across images it keeps."""
    from PIL import Image

    from stemfast import heap
    from stemfast.batch.inputs import read_input
    from stemfast.io import write_tiff

    calls = []
    monkeypatch.setattr(heap, "hand_back_freed", lambda: calls.append(1) or True)
    rgb = np.repeat(np.random.default_rng(0).integers(0, 255, (40, 48), np.uint8)[..., None], 3, 2)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    write_tiff(tmp_path / "a.tif", rgb[..., 0].astype(np.float32))
    read_input(tmp_path / "a.tif")
    assert calls == []
    read_input(tmp_path / "a.png")
    assert calls == [1]


def test_a_partial_rerun_with_other_settings_keeps_the_record_of_the_rest(tmp_path, tiny):
    """A batch of three inputs, then a rerun on one of them with another defect cutoff into the same
    folder: stemfast.toml, batch_summary.json and report.html were rewritten for that one input, and
    the other two folders stayed, made with settings no file recorded any more. The earlier record is
    kept as stemfast.<hash12>.toml, and the batch summary and report name the folders it does not show."""
    import dataclasses

    from stemfast.batch.common import KEPT_CONFIG_PATTERN
    from stemfast.synthetic import make_mos2

    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        np.save(data / f"img{i}.npy", make_mos2(shape=(128, 128), seed=i).image)
    out = tmp_path / "out"
    first = run_batch(data, out, config=tiny, show_progress=False)
    old_hash = first.config_hash
    other = dataclasses.replace(tiny, analysis=dataclasses.replace(tiny.analysis, defect_cutoff=6.0))
    second = run_batch(data / "img0.npy", out, config=other, show_progress=False)
    assert second.config_hash != old_hash
    kept = out / KEPT_CONFIG_PATTERN.format(hash12=old_hash[:12])
    assert kept.exists() and old_hash in kept.read_text() and "defect_cutoff = 4" in kept.read_text()
    assert "defect_cutoff = 6" in (out / "stemfast.toml").read_text()
    summary = json.loads((out / "batch_summary.json").read_text())
    assert summary["other_results"] == [{"name": f"img{i}", "config_hash": old_hash, "settings": kept.name}
                                        for i in (1, 2)]
    report = (out / "report.html").read_text()
    assert "2 result folders in this output folder are not in this report" in report and kept.name in report
    # the same settings again: nothing kept, the other folders are named with this run's record
    third = run_batch(data / "img1.npy", out, config=other, show_progress=False)
    names = {r["name"]: r["settings"] for r in json.loads((out / "batch_summary.json").read_text())["other_results"]}
    assert third.config_hash == second.config_hash and names == {"img0": "stemfast.toml", "img2": kept.name}
