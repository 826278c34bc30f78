"""Batch on a real Dask LocalCluster (2 worker processes): identical to the in-process run, and a
worker killed in the middle of a task loses and duplicates nothing."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("dask.distributed", reason="dask.distributed not installed (pip install 'stemfast[distributed]')")

from stemfast.batch import OUTPUT_FILES, STACK_OUTPUT_FILES, run_batch  # noqa: E402
from stemfast.config import load_config  # noqa: E402
from stemfast.batch.dask import parse_scheduler  # noqa: E402

TINY = {
    "model": {"epochs": 2, "stn_epochs": 1, "max_train_patches": 500, "batch_size": 64, "input_size": 16,
              "channels": [8, 8, 8], "stn_channels": [4, 8], "patience": 2, "device": "cpu"},
    "analysis": {"top_n": 10},
}
FRAMES = 4


def _data(root: Path) -> Path:
    from stemfast.io import write_tiff
    from stemfast.synthetic import make_mos2

    root.mkdir(parents=True)
    make_mos2(shape=(192, 192), seed=5, rotation_deg=20.0).save(root / "good.tif")
    st = make_mos2(shape=(128, 128), seed=6, n_frames=FRAMES, drift_px_per_frame=(1.0, 0.5))
    write_tiff(root / "stack.tif", st.image, pixel_size=0.012, unit="nm")
    (root / "broken.tif").write_text("not a tiff")
    return root


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """In-process reference run (trains the model the Dask runs reuse)."""
    root = tmp_path_factory.mktemp("dist")
    data = _data(root / "data")
    cfg = load_config(None, TINY)
    out = root / "ref"
    rep = run_batch(data, out, config=cfg, show_progress=False)
    assert {r.name: r.status for r in rep.results} == {"good": "done", "stack": "done", "broken": "skipped"}
    return root, data, cfg, out


def _same_results(a: Path, b: Path) -> None:
    for name in ("good", "stack"):
        assert (a / name / "sites.csv").read_bytes() == (b / name / "sites.csv").read_bytes(), name
        sa = json.loads((a / name / "summary.json").read_text())
        sb = json.loads((b / name / "summary.json").read_text())
        for k in ("n_sites", "n_defects", "class_counts", "defect_kinds", "lattice", "top", "n_frames"):
            assert sa[k] == sb[k], (name, k)
        if name == "stack":
            assert sa["drift_px"]["dx"] == sb["drift_px"]["dx"] and sa["drift_px"]["dy"] == sb["drift_px"]["dy"]
            # defects linked in frame order at assembly: the same tracks as in process
            assert (a / name / "tracks.csv").read_bytes() == (b / name / "tracks.csv").read_bytes()


def _no_leftovers(out: Path) -> None:
    assert not list(out.rglob(".parts")), "frame-chunk parts must be removed after assembly"
    assert not [p for p in out.rglob("*") if ".tmp" in p.name], "stray temporary files"
    for name in ("good", "stack"):
        extra = STACK_OUTPUT_FILES if name == "stack" else ()  # a stack adds its defect tracks
        assert sorted(p.name for p in (out / name).iterdir()) == sorted(OUTPUT_FILES + extra + ("done.json",))


def test_parse_scheduler():
    assert parse_scheduler("local:2") == ("local", 2)
    assert parse_scheduler("tcp://10.1.2.3:8786") == ("address", "tcp://10.1.2.3:8786")
    with pytest.raises(ValueError):
        parse_scheduler("local:x")
    with pytest.raises(ValueError):
        parse_scheduler("local:0")


def test_local_cluster_gives_identical_results(ref, capsys):
    root, data, cfg, out_ref = ref
    out = root / "dask"
    # frames_per_task=2: the 4-frame stack runs as 2 chunk tasks + 1 assembly task
    rep = run_batch(data, out, config=cfg, model_path=out_ref / "model.pt", scheduler="local:2",
                    frames_per_task=2, show_progress=False)
    assert {r.name: r.status for r in rep.results} == {"good": "done", "stack": "done", "broken": "skipped"}
    assert not rep.model_trained
    assert "dashboard" in capsys.readouterr().err
    _same_results(out_ref, out)
    _no_leftovers(out)
    df = pd.read_csv(out / "stack" / "sites.csv")
    assert sorted(df["frame"].unique()) == list(range(FRAMES))


def test_worker_killed_mid_task_loses_and_duplicates_nothing(ref, tmp_path, monkeypatch):
    root, data, cfg, out_ref = ref
    marker = tmp_path / "killed-once"
    # the worker that starts the second chunk of the stack kills itself (SIGKILL), once; Dask
    # reschedules the task on a fresh worker
    monkeypatch.setenv("STEMFAST_TEST_CRASH", "task_start:stack[2:4]")
    monkeypatch.setenv("STEMFAST_TEST_CRASH_ONCE", str(marker))
    out = tmp_path / "dask-kill"
    rep = run_batch(data, out, config=cfg, model_path=out_ref / "model.pt", scheduler="local:2",
                    frames_per_task=2, show_progress=False)
    assert marker.exists(), "the crash hook did not fire: the test tested nothing"
    assert {r.name: r.status for r in rep.results} == {"good": "done", "stack": "done", "broken": "skipped"}
    _same_results(out_ref, out)
    _no_leftovers(out)
    df = pd.read_csv(out / "stack" / "sites.csv")
    ref_df = pd.read_csv(out_ref / "stack" / "sites.csv")
    assert len(df) == len(ref_df) and not df.duplicated().any()
    assert df.groupby("frame").size().to_dict() == ref_df.groupby("frame").size().to_dict()


class _DroppingClient:
    """A Dask client whose cluster drops (cancels) the first task of every input, as a scheduler did
    once after a worker was killed ("cancelled for reason: unknown"); everything else is the real client's."""

    def __init__(self, client):
        self._client = client
        self.dropped: list[str] = []

    def __getattr__(self, name):
        return getattr(self._client, name)

    def submit(self, fn, *args, key=None, **kwargs):
        fut = self._client.submit(fn, *args, key=key, **kwargs)
        name = key.rsplit("-", 1)[0] if key else ""
        if key and (key.startswith("stemfast-file-") or key.startswith("stemfast-assemble-")) \
                and name not in self.dropped and key.count("-") == 3:  # first attempts only
            self.dropped.append(name)
            fut.cancel()
        return fut


def test_a_task_the_cluster_cancels_is_submitted_again(ref, tmp_path):
    """A cancelled task is not a failed input: it is submitted again and the batch comes out whole."""
    from dask.distributed import Client, LocalCluster

    root, data, cfg, out_ref = ref
    out = tmp_path / "dask-cancel"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        dropping = _DroppingClient(client)
        rep = run_batch(data, out, config=cfg, model_path=out_ref / "model.pt", scheduler=dropping,
                        frames_per_task=2, show_progress=False)
    assert sorted(dropping.dropped) == ["stemfast-assemble-stack", "stemfast-file-good"]
    assert {r.name: r.status for r in rep.results} == {"good": "done", "stack": "done", "broken": "skipped"}
    _same_results(out_ref, out)
    _no_leftovers(out)


def test_scheduler_addresses_are_checked():
    from stemfast.errors import SettingsError

    assert parse_scheduler("127.0.0.1:8786") == ("address", "tcp://127.0.0.1:8786")
    for bad, words in (("inproc://x", "inside the same process"), ("http://h:1", "schemes"),
                       ("tcp://host", "HOST:PORT"), ("tcp://host:99999", "HOST:PORT")):
        with pytest.raises(SettingsError, match=words):
            parse_scheduler(bad)


def _without_timings(o):
    """A summary.json without what the runs may differ in: its times and memory."""
    if isinstance(o, dict):
        return {k: _without_timings(v) for k, v in o.items()
                if k not in ("timings_s", "seconds", "throughput", "peak_memory_mib")}
    if isinstance(o, list):
        return [_without_timings(v) for v in o]
    return o


def _hard_stacks(root: Path) -> Path:
    """Stacks of 6 frames a Dask run splits (2 frames a chunk) where the chunks' ends matter: ``blank``
    (frames 1 and 4 blank: the last frame of a chunk and the first of another have no lattice), ``f64``
    (float64 values near 1e9, of another dose in frames 2-3 and 4-5: rescaled to float32), ``nan`` (NaN
    pixels in frame 3, filled with --fill-nonfinite)."""
    import numpy as np

    from stemfast.synthetic import make_mos2

    root.mkdir(parents=True)
    st = make_mos2(shape=(128, 128), seed=8, n_frames=6, drift_px_per_frame=(1.0, 0.5)).image.astype(np.float32)
    blank = st.copy()
    blank[[1, 4]] = float(st.mean())
    np.savez(root / "blank.npz", image=blank, pixel_size=0.012, unit="nm")
    dose = np.array([1.0, 1.0, 0.5, 0.5, 2.0, 2.0])[:, None, None]
    np.savez(root / "f64.npz", image=st.astype(np.float64) * dose + 1e9, pixel_size=0.012, unit="nm")
    nan = st.copy()
    yx = np.random.default_rng(0).integers(0, 128, (30, 2))
    nan[3, yx[:, 0], yx[:, 1]] = np.nan
    np.savez(root / "nan.npz", image=nan, pixel_size=0.012, unit="nm")
    return root


@pytest.fixture(scope="module")
def hard_runs(ref, tmp_path_factory):
    """The stacks of :func:`_hard_stacks` analysed in process and on Dask (2 frames a chunk), with
    --fill-nonfinite and the reference's model: ``(data, in-process output, Dask output)``."""
    from stemfast.config import ReadOptions

    root, _, cfg, out_ref = ref
    tmp = tmp_path_factory.mktemp("hard")
    data = _hard_stacks(tmp / "data")
    runs = []
    for sched in (None, "local:2"):
        out = tmp / ("dask" if sched else "local")
        rep = run_batch(data, out, config=cfg, model_path=out_ref / "model.pt", scheduler=sched, frames_per_task=2,
                        read_options=ReadOptions(fill_nonfinite=True), show_progress=False)
        assert {r.name: r.status for r in rep.results} == {"blank": "done", "f64": "done", "nan": "done"}
        runs.append(out)
    return data, *runs


def _same_stack(a: Path, b: Path, name: str) -> None:
    """The outputs of stack ``name`` in the runs ``a`` and ``b`` are the same (times and memory apart)."""
    for f in ("sites.csv", "tracks.csv"):
        assert (a / name / f).read_bytes() == (b / name / f).read_bytes(), (name, f)
    sa, sb = (json.loads((o / name / "summary.json").read_text()) for o in (a, b))
    assert _without_timings(sa) == _without_timings(sb), name
    da, db = (json.loads((o / name / "done.json").read_text()) for o in (a, b))
    assert da.get("read_options") == db.get("read_options"), name


def test_frames_without_a_lattice_at_the_chunks_ends_keep_the_drift_and_tracks(hard_runs):
    """A frame without a lattice ending a chunk (frame 1 of 0-1) or starting one (frame 4 of 4-5): the drift
    of the next frame with a lattice is measured across it as in one process, the tracks go on. Before, the
    chunk 2-3 measured frame 2 from frame 1 only: drift unknown, a drift break, the tracks ended and restarted
    with new ids (the reviewer's 12-frame series: 7 tracks for 4, coords_frame 4)."""
    _, a, b = hard_runs
    _same_stack(a, b, "blank")
    s = json.loads((b / "blank" / "summary.json").read_text())
    assert s["frames"][2]["drift_over_gap"]["from_frame"] == 0 and s["frames"][5]["drift_over_gap"]["from_frame"] == 3
    assert s["tracking"]["drift_breaks"] == [] and s["tracking"]["n_tracks"] >= 1


def test_a_rescaled_stack_is_in_the_units_of_the_whole_stack_in_every_chunk(hard_runs):
    """float64 values near 1e9 (doses 1, 0.5, 2 by chunk) are rescaled by the whole stack's minimum and
    range in every chunk, as in one process. Before, each chunk rescaled by its own (the intensities changed
    units at every chunk: x2.89, x2.84, x1.0 on the reviewer's stack) and summary.json gave the first's."""
    import numpy as np

    data, a, b = hard_runs
    _same_stack(a, b, "f64")
    s = json.loads((b / "f64" / "summary.json").read_text())
    with np.load(data / "f64.npz") as z:
        lo, hi = float(z["image"].min()), float(z["image"].max())
    assert (s["input"]["rescaled"]["offset"], s["input"]["rescaled"]["scale"]) == (lo, hi - lo)


def test_the_input_notes_of_a_stack_on_dask_are_of_all_its_frames(hard_runs):
    """NaN pixels in frame 3 (the second chunk), filled with --fill-nonfinite: summary.json counts and says
    them and done.json records the read options that filled them, as in one process. Before, the notes came
    from the first chunk only: nothing said, and a rerun without --fill-nonfinite took the result as current."""
    from stemfast.config import ReadOptions

    _, a, b = hard_runs
    _same_stack(a, b, "nan")
    s = json.loads((b / "nan" / "summary.json").read_text())
    assert s["input"]["nonfinite_replaced"] == 30 and any("30 NaN/infinite pixels" in w for w in s["warnings"])
    assert json.loads((b / "nan" / "done.json").read_text())["read_options"] == ReadOptions(fill_nonfinite=True).key()


def test_a_refused_shipped_model_is_recorded_on_dask_as_in_process(tmp_path, monkeypatch):
    """The shipped model refused (here: its weights damaged) on a Dask run: the model is resolved in the
    client, as in the in-process run, so the refusal and its reason are recorded the same way --
    BatchReport.model_refused, batch_summary.json, OUT/model.json, each summary.json and report.html --
    and the model trained instead is the one the workers run. (Checked when the note "Dask
    model-worker refusals unrecorded" was looked into: already so.)"""
    import shutil

    import numpy as np

    from stemfast.model import shipped
    from stemfast.synthetic import make_mos2

    if not (shipped.MODEL_PATH.is_file() and shipped.MANIFEST_PATH.is_file()):
        pytest.skip("no shipped model in the package data")
    for name in ("MODEL_PATH", "MANIFEST_PATH"):
        copy = tmp_path / getattr(shipped, name).name
        shutil.copyfile(getattr(shipped, name), copy)
        monkeypatch.setattr(shipped, name, copy)
    raw = bytearray(shipped.MODEL_PATH.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shipped.MODEL_PATH.write_bytes(bytes(raw))
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "img.npy", make_mos2(shape=(160, 160), seed=11, rotation_deg=12.0).image.astype(np.float32))
    cfg = load_config(None, {"model.epochs": 1, "model.stn_epochs": 1, "model.max_train_patches": 300,
                             "model.device": "cpu"})
    seen = {}
    for how, scheduler in (("in-process", None), ("dask", "local:1")):
        out = tmp_path / how
        with pytest.warns(RuntimeWarning, match="shipped default model not used"):
            rep = run_batch(data, out, config=cfg, scheduler=scheduler, show_progress=False)
        assert [r.status for r in rep.results] == ["done"] and rep.model_trained
        bs = json.loads((out / "batch_summary.json").read_text())["model"]
        s = json.loads((out / "img" / "summary.json").read_text())["model"]
        info = json.loads((out / "model.json").read_text())
        html = (out / "report.html").read_text()
        assert rep.model_refused == bs["refused"] == s["refused"] == info["refused"]
        assert "warning: the shipped default model was not used (shipped model default_rvae.pt: SHA-256" in html
        assert s["sha256"] == bs["sha256"] == rep.model_sha256  # the trained model ran the input
        seen[how] = (rep.model_refused, bs["source"], bs["name"], s["name"], rep.exit_code)
    assert seen["dask"] == seen["in-process"]
    assert seen["dask"][0].startswith("shipped model default_rvae.pt: SHA-256") and seen["dask"][1] == "trained"
