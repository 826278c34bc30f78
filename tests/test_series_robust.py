"""A series with a bad frame (noise, blank, an extreme value, a failed drift measure): the drift is never
measured to or from a frame without a lattice, a failure of it leaves the drift unknown (said) instead of
failing the stack, and the defect tracks keep the promised coordinates.

The frames are analysed by the batch's own frame loop (:func:`stemfast.batch.frames.iter_frames`, the
shipped model) and linked as the batch links them (:class:`stemfast.tracking.StackTracker`): a 160 px
series of five frames drifting (3, -2) px per frame, its vacancies steady (no hops, births or deaths), so
every track must start on a vacancy of the frame its coordinates are in.
"""
from __future__ import annotations

import csv

import numpy as np
import pytest

DRIFT = (3.0, -2.0)


@pytest.fixture(scope="module")
def setup():
    from stemfast.batch.tasks import patch_size_of
    from stemfast.config import load_config
    from stemfast.model.shipped import shipped_for_run
    from stemfast.synthetic import SeriesConfig, make_series

    cfg = load_config(None)
    model = shipped_for_run(cfg)
    if model is None:
        pytest.skip("the shipped model is not usable here")
    s = make_series(SeriesConfig(n_frames=5, v_s=0.05, hop_prob=0.0, death_prob=0.0, birth_rate=0.0, seed=2),
                    shape=(160, 160), pixel_size_A=0.2, drift_px_per_frame=DRIFT)
    return cfg, model, patch_size_of(model, cfg), s


def analyse(setup, images, **kw):
    """The frame results of ``images`` [frames, H, W] (``kw``: iter_frames' ``frames``, ``check_settings``,
    ``ends``)."""
    from stemfast.batch.frames import FrameWindow, iter_frames
    from stemfast.io import Micrograph

    cfg, model, ps, _ = setup
    frames = kw.pop("frames", range(len(images)))
    mg = Micrograph(np.asarray(images, np.float32), pixel_size=0.02, unit="nm")
    if kw.get("ends") is not None:  # a chunk of the stack, as a Dask worker reads it: its own frames only
        lo = frames[0]
        mg = FrameWindow(Micrograph(np.asarray(images[lo:frames[-1] + 1], np.float32), pixel_size=0.02, unit="nm"),
                         lo)
    return list(iter_frames(mg, list(frames), model=model, config=cfg, patch_size=ps, **kw))


def chunked(setup, images, bounds):
    """The frame results of ``images`` analysed in the chunks ``bounds`` ((start, stop), ...) as Dask
    workers analyse them, linked in frame order as the assembly links them."""
    from stemfast.batch.frames import DriftEnds, linked_drift

    chunks = []
    for a, b in bounds:
        ends = DriftEnds()
        chunks.append((ends, analyse(setup, images, frames=list(range(a, b)), check_settings=a == 0, ends=ends)))
    return list(linked_drift(chunks))


def track(results, folder):
    """Link the frame results as the batch does: ``(tracker, rows of tracks.csv)``."""
    from stemfast.tracking import StackTracker

    with StackTracker(folder, shape=(160, 160)) as trk:
        for fr in results:
            trk.push(fr.meta, fr.table)
        trk.finish()
    with open(folder / "tracks.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows, "no track: the series does not test the linking"
    return trk, rows


def assert_on_vacancies(s, rows):
    """Every track starts and ends on a vacancy of its ``coords_frame``'s pixel grid (steady vacancies)."""
    for r in rows:
        truth = s.frame_truth(int(r["coords_frame"]))[:, 2:4]
        for key in ("start", "end"):
            xy = np.array([float(r[f"{key}_x"]), float(r[f"{key}_y"])])
            assert np.hypot(*(truth - xy).T).min() < 1.0, (r, truth)


def replaced(s, k, how):
    im = s.images.astype(np.float32).copy()
    im[k] = np.random.default_rng(0).normal(im.mean(), im.std(), im[k].shape) if how == "noise" else im[k].mean()
    return im


@pytest.mark.parametrize("how", ["noise", "blank"])
def test_a_frame_without_a_lattice_is_skipped_over_not_registered(setup, tmp_path, how):
    """Frame 2 noise or blank: frame 3 is measured from frame 1 (the drift over the gap), no drift is
    invented for 2 or 3, and every track crosses the gap in the first frame's coordinates (before: a noise
    frame gave drifts of -7.4 and 13.5 px, a blank one two drift breaks, and the vacancies after it new
    tracks off by the lost drift)."""
    s = setup[3]
    res = analyse(setup, replaced(s, 2, how))
    assert res[2].meta["n_sites"] == 0
    assert [r.meta["drift_px"] is None for r in res] == [True, False, True, True, False]
    gap = res[3].meta["drift_over_gap"]
    assert gap["from_frame"] == 1 and np.allclose(gap["px"], 2 * np.asarray(DRIFT), atol=0.25)
    trk, rows = track(res, tmp_path)
    summ = trk.summary()
    assert summ["drift_breaks"] == [] and summ["drift_gaps"] == [[1, 3]]
    assert all(r["coords_frame"] == "0" for r in rows)
    assert_on_vacancies(s, rows)
    assert all(r["last_frame"] == "4" for r in rows if int(r["first_frame"]) <= 1)  # bridged over frame 2


def test_a_first_frame_without_content_is_neither_reference_nor_background(setup, tmp_path):
    """Frame 0 blank: no drift break (no track existed), the reference and the coordinates are frame 1's,
    and the figure's background is the mean of the frames with sites, not of the blank frame."""
    s = setup[3]
    res = analyse(setup, replaced(s, 0, "blank"))
    trk, rows = track(res, tmp_path)
    summ = trk.summary()
    assert summ["drift_breaks"] == []
    assert summ["reference"]["frame"] == 1 and summ["reference"]["coords_frame"] == 1
    assert all(r["coords_frame"] == "1" for r in rows)
    assert_on_vacancies(s, rows)
    read = []
    trk.plot(lambda i: (read.append(i), s.images[i])[1])
    assert sorted(read) == [1, 2, 3, 4]


def test_a_failed_drift_measure_is_a_said_break_not_a_failed_stack(setup, tmp_path, monkeypatch):
    """The drift measure raising (as the phase correlation did on a frame overflowing float32) leaves that
    drift unknown with a frame warning; the tracks break there and the positions after it are in the frame
    of the break (tracks.csv coords_frame), each on its vacancy there."""
    import stemfast.batch.frames as frames_mod

    real, calls = frames_mod.phase_drift, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # frame 3 from frame 2
            raise ValueError("NaN values found")
        return real(*a, **k)

    monkeypatch.setattr(frames_mod, "phase_drift", failing)
    s = setup[3]
    res = analyse(setup, s.images)
    assert [r.meta["n_sites"] > 0 for r in res] == [True] * 5
    assert res[3].meta["drift_px"] is None and "drift_over_gap" not in res[3].meta
    assert any("drift unknown" in w and "NaN values found" in w for w in res[3].meta["warnings"])
    assert res[4].meta["drift_px"] is not None
    trk, rows = track(res, tmp_path)
    summ = trk.summary()
    assert summ["drift_breaks"] == [3]
    assert [(g["first_frame"], g["frame"]) for g in summ["segments"]] == [(0, 0), (3, 3)]
    assert {r["coords_frame"] for r in rows} == {"0", "3"}
    assert all(r["end"] == "drift break" for r in rows if r["coords_frame"] == "0")
    assert_on_vacancies(s, rows)


def test_an_extreme_frame_fails_neither_the_drift_nor_the_stack(setup):
    """A frame with a few pixels of 3e38 (finite in float32): the frame loop goes on (before, the drift's
    float32 mean overflowed and the phase correlation's ValueError failed the whole stack)."""
    s = setup[3]
    im = s.images.astype(np.float32).copy()
    im[1, 50:52, 50:52] = 3e38
    res = analyse(setup, im)
    assert [r.meta["n_sites"] > 0 for r in res] == [True, False, True, True, True]
    assert res[2].meta["drift_over_gap"]["from_frame"] == 0
    assert res[3].meta["drift_px"] is not None


def test_the_drift_is_measured_in_float64():
    """Values near float32's largest: the block average and the correlation do not overflow."""
    from stemfast.drift import block_average, phase_drift

    a = np.random.default_rng(0).normal(size=(600, 600)).astype(np.float32)
    a[100:104, 100:104] = 3e38
    b = np.roll(a, (4, 6), axis=(0, 1))
    dx, dy = phase_drift(block_average(a), block_average(b), a.shape)
    assert (round(dx, 1), round(dy, 1)) == (6.0, 4.0)


DRIFT_KEYS = ("drift_px", "drift_over_gap", "warnings")


@pytest.mark.parametrize("bad, bounds", [(1, [(0, 2), (2, 5)]),  # the last frame of a chunk has no lattice
                                         (2, [(0, 2), (2, 5)]),  # the first frame of a chunk
                                         (2, [(0, 2), (2, 3), (3, 5)])])  # a chunk without a lattice
def test_chunks_measure_the_drift_across_a_frame_without_a_lattice_at_their_ends(setup, bad, bounds):
    """A stack analysed in chunks (the Dask path) has the drift of the in-process run: each chunk's first frame
    with a lattice is measured at assembly from the last frame with one in the chunks before, across frames
    without a lattice. Before, a chunk measured it from the frame just before it only: a noise frame ending
    a chunk made the next frame's drift unknown (a drift break, every track ended; 7 tracks for 4 in one
    process on the reviewer's 12-frame series)."""
    s = setup[3]
    images = replaced(s, bad, "noise")
    whole = analyse(setup, images)
    parts = chunked(setup, images, bounds)
    assert [[r.meta.get(k) for k in DRIFT_KEYS] for r in parts] == [[r.meta.get(k) for k in DRIFT_KEYS] for r in whole]
    after = parts[bad + 1].meta
    assert after["drift_px"] is None and after["drift_over_gap"]["from_frame"] == bad - 1
    assert np.allclose(after["drift_over_gap"]["px"], 2 * np.asarray(DRIFT), atol=0.2)
    assert all(np.allclose(parts[k].meta["drift_px"], DRIFT, atol=0.1) for k in range(len(parts)) if k not in
               (0, bad, bad + 1))


def test_a_frame_over_the_nonfinite_limit_is_named_by_its_number_in_the_file(tmp_path):
    from stemfast.io import ReadError, read

    a = np.random.default_rng(0).normal(size=(5, 64, 64)).astype(np.float32)
    a[3][np.random.default_rng(1).random((64, 64)) < 0.05] = np.nan
    np.save(tmp_path / "s.npy", a)
    with pytest.raises(ReadError, match=r"frame 3: 5\.\d+% of the pixels"):
        read(tmp_path / "s.npy", frames=slice(2, 4), allow_nonfinite=True, max_nonfinite_fraction=0.01)


def test_the_report_counts_defects_seen_in_fewer_than_min_frames_as_such(tmp_path):
    from stemfast.tracking import tracks_html

    html = tracks_html({"tracking": {"n_unconfirmed": 3, "settings": {"min_frames": 3}}}, tmp_path,
                       lambda *a: "")
    assert "defects seen in fewer than 3 frames (not tracked)</td><td>3<" in html
    assert "seen once" not in html
