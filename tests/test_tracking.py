"""Defect tracking: ids, hops, gaps, births and deaths, streaming, and the batch outputs of a stack.

The linking tests work on site tables made directly (no image pipeline); one test runs the
synthetic series generator's history through the linker; the last ones run a small series
through ``stemfast batch`` (in process and through the frame-chunk path that Dask workers take).
"""
from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest

from stemfast.lattice import triangular_basis
from stemfast.table import SiteTable
from stemfast.tracking import (
    DefectLinker,
    TrackSettings,
    dose_from_metadata,
    lattice_offset,
    link_tables,
    node_map,
    sublattice_steps,
)

NN = 10.0
B = triangular_basis(NN, 7.0)  # rows a1, a2 (a2 = a1 turned by 60 degrees)
S2_STEP = B[0] + B[1]  # one step of a sublattice (sqrt(3) NN)
S2_STEP_B = 2 * B[1] - B[0]
O = np.array([100.0, 100.0])


def node(i, j):
    return O + i * B[0] + j * B[1]


def table(points, *, sub=1, kind="vacancy_S", score=8.0, extra=None, basis=B):
    """A site table of defect sites at ``points`` (plus a few normal sites around the origin)."""
    pts = np.asarray(points, float).reshape(-1, 2)
    normal = np.array([node(0, 0), node(1, 0), node(0, 1), node(-1, 0)])
    xy = np.r_[pts, normal]
    n, k = len(xy), len(pts)
    cols = {"x": xy[:, 0], "y": xy[:, 1], "is_defect": np.r_[np.ones(k, bool), np.zeros(4, bool)],
            "defect_kind": np.array([kind] * k + ["none"] * 4),
            "sublattice": np.r_[np.full(k, sub) if np.ndim(sub) == 0 else np.asarray(sub), [0, 1, 2, 2]],
            "anomaly_score": np.r_[np.full(k, score) if np.ndim(score) == 0 else np.asarray(score, float),
                                   np.zeros(4)],
            "a1x": np.full(n, basis[0, 0]), "a1y": np.full(n, basis[0, 1]),
            "a2x": np.full(n, basis[1, 0]), "a2y": np.full(n, basis[1, 1])}
    cols.update(extra or {})
    return SiteTable(cols)


def ids_of(out):
    """{frame: track ids of the defect sites, in the order given}."""
    res = {}
    for f, t in out:
        m = np.asarray(t["is_defect"], bool) | (np.asarray(t["track_id"]) >= 0)
        res[f] = np.asarray(t["track_id"])[m].tolist()
    return res


# ----------------------------------------------------------------------------- lattice arithmetic


def link_flagged(seq, settings, cutoff=5.0):
    """Link frames ``seq`` = [(points, scores, flags), ...] (no drift): each frame's sites with the
    given scores and ``is_defect`` flags. Returns ``(linker, frames written)``."""
    lk = DefectLinker(settings, cutoff=cutoff)
    out = []
    for k, (pts, sc, flag) in enumerate(seq):
        t = table(pts, score=sc)
        isd = np.asarray(t["is_defect"]).copy()
        isd[:len(pts)] = flag
        out += lk.push(k, t.with_columns({"is_defect": isd}), drift=(0, 0) if k else None)
    return lk, out + lk.finish()


def test_lattice_offsets_and_sublattice_steps():
    n, r = lattice_offset(np.array([S2_STEP, S2_STEP_B, 2 * S2_STEP, B[0] + [0.3, -0.2]]), B)
    assert n.tolist() == [[1, 1], [-1, 2], [2, 2], [1, 0]]
    assert np.allclose(r[:3], 0.0, atol=1e-9) and abs(r[3] - math.hypot(0.3, 0.2)) < 1e-9
    st = sublattice_steps(n)
    assert st[:3].tolist() == [1.0, 1.0, 2.0]
    assert abs(st[3] - 1 / math.sqrt(3)) < 1e-9  # to a node of another sublattice
    # all six S2 neighbours are one step
    six = np.array([[1, 1], [-1, 2], [-2, 1], [-1, -1], [1, -2], [2, -1]])
    assert sublattice_steps(six).tolist() == [1.0] * 6


# ----------------------------------------------------------------------------- linking


def test_a_defect_that_stays_or_hops_keeps_its_id_under_drift():
    drift = np.array([0.3, -0.2])
    path = [node(2, 2), node(2, 2), node(3, 3), node(3, 3), node(2, 5), node(2, 5)]  # two one-step hops
    frames = [(k, table([p + k * drift]), None if k == 0 else tuple(drift)) for k, p in enumerate(path)]
    out, rows, summ = link_tables(frames)
    assert ids_of(out) == {k: [0] for k in range(6)}
    assert len(rows) == 1
    r = rows[0]
    assert (r["first_frame"], r["last_frame"], r["n_frames"], r["hops"]) == (0, 5, 6, 2)
    assert r["path_steps"] == 2.0 and r["net_steps"] == 2.0  # b1 then b2 (60 degrees apart)
    assert abs(r["path_px"] - 2 * math.sqrt(3) * NN) < 0.05
    assert (r["end_i"] - r["start_i"], r["end_j"] - r["start_j"]) == (0, 3)
    assert abs(r["start_x"] - path[0][0]) < 1e-3 and abs(r["end_y"] - path[-1][1]) < 1e-3  # frame-0 px (3 decimals)
    assert r["kind"] == "vacancy_S" and r["sublattice"] == 1 and r["end"] == "last frame"


def test_drift_is_corrected_before_linking():
    # the frame moves by a whole S2 step per frame: corrected, the defect stays on its node
    drift = S2_STEP
    frames = [(k, table([node(0, 3) + k * drift]), None if k == 0 else tuple(drift)) for k in range(5)]
    _, rows, _ = link_tables(frames)
    assert len(rows) == 1 and rows[0]["hops"] == 0 and rows[0]["start_x"] == rows[0]["end_x"]
    # told there was no drift, the same sites read as a defect hopping every frame
    frames0 = [(k, t, None if k == 0 else (0.0, 0.0)) for k, t, _ in frames]
    _, rows0, _ = link_tables(frames0)
    assert len(rows0) == 1 and rows0[0]["hops"] == 4


def test_two_neighbouring_defects_are_never_merged():
    a, b = node(0, 3), node(0, 3) + S2_STEP  # one S2 step apart
    seq = [[a, b], [a, b], [a], [a, b], [b], [a, b]]
    frames = [(k, table(p), (0.0, 0.0) if k else None) for k, p in enumerate(seq)]
    out, rows, _ = link_tables(frames)
    ids = ids_of(out)
    assert ids[0] == [0, 1] and ids[1] == [0, 1]
    assert ids[2] == [0] and ids[3] == [0, 1] and ids[4] == [1] and ids[5] == [0, 1]
    assert len(rows) == 2 and all(r["hops"] == 0 for r in rows)


def test_stay_beats_a_neighbours_hop_and_hops_into_a_vacated_node_follow_the_mover():
    a, b = node(0, 0) + 3 * S2_STEP, node(0, 0) + 4 * S2_STEP
    c = a - S2_STEP
    # frame 1: the defect at a moves to c, b stays; frame 2: b moves into a (free now)
    seq = [[a, b], [c, b], [c, a]]
    out, rows, _ = link_tables([(k, table(p), (0.0, 0.0) if k else None) for k, p in enumerate(seq)])
    ids = ids_of(out)
    assert ids == {0: [0, 1], 1: [0, 1], 2: [0, 1]}
    assert sorted(r["hops"] for r in rows) == [1, 1]


def test_gaps_are_bridged_up_to_max_gap_then_a_new_id():
    p = node(1, 4)
    seq = [[p], [p], [], [], [p], [p], [], [], [], [p], [p]]
    out, rows, summ = link_tables([(k, table(q), (0.0, 0.0) if k else None) for k, q in enumerate(seq)],
                                  TrackSettings(max_gap=2))
    ids = ids_of(out)
    assert ids[0] == ids[1] == ids[4] == ids[5] == [0]
    assert ids[9] == ids[10] == [1]  # a gap of three frames: a new track
    r0, r1 = rows
    assert (r0["first_frame"], r0["last_frame"], r0["n_frames"], r0["span_frames"], r0["end"]) == (0, 5, 4, 6, "lost")
    assert (r1["first_frame"], r1["last_frame"], r1["n_frames"]) == (9, 10, 2)


def test_births_deaths_and_single_frame_detections():
    p, q, s = node(0, 3), node(3, 0), node(-3, 3)
    seq = [[p], [p, q], [p, q], [q], [q, s], [q]]  # p dies after frame 2, q born at 1, s seen once
    out, rows, summ = link_tables([(k, table(x), (0.0, 0.0) if k else None) for k, x in enumerate(seq)],
                                  TrackSettings(max_gap=0))
    ids = ids_of(out)
    assert ids[4] == [1, -1]  # the one-frame detection is not a track
    life = {(r["first_frame"], r["last_frame"], r["n_frames"]) for r in rows}
    assert life == {(0, 2, 3), (1, 5, 5)}
    assert summ["n_unconfirmed"] == 1 and summ["n_tracks"] == 2


def test_a_hop_longer_than_max_hop_or_onto_another_sublattice_is_not_linked():
    p = node(0, 3)
    out, rows, _ = link_tables([(0, table([p]), None), (1, table([p]), (0, 0)),
                                (2, table([p + 2 * S2_STEP]), (0, 0)), (3, table([p + 2 * S2_STEP]), (0, 0))],
                               TrackSettings(max_gap=0))
    assert [r["hops"] for r in rows] == [0, 0] and len(rows) == 2
    # a detection of another sublattice next to the track is a different defect
    q = node(2, 2)
    out, rows, _ = link_tables([(0, table([q], sub=1), None), (1, table([q], sub=1), (0, 0)),
                                (2, table([q + B[0]], sub=0, kind="vacancy_Mo"), (0, 0)),
                                (3, table([q + B[0]], sub=0, kind="vacancy_Mo"), (0, 0))], TrackSettings(max_gap=0))
    assert sorted(r["sublattice"] for r in rows) == [0, 1]


def test_sites_below_the_cutoff_continue_a_track_but_never_start_one():
    p = node(2, 1)
    seq = [(8.0, True), (3.5, False), (8.0, True), (3.5, False), (3.5, False), (3.5, False)]
    frames = []
    for k, (sc, flagged) in enumerate(seq):
        t = table([p], score=sc)
        isd = np.asarray(t["is_defect"]).copy()
        isd[0] = flagged
        frames.append((k, t.with_columns({"is_defect": isd}), (0, 0) if k else None))
    lk = DefectLinker(TrackSettings(max_gap=0, weak_frames=0), cutoff=5.0)
    out = []
    for f, t, d in frames:
        out += lk.push(f, t, drift=d)
    out += lk.finish()
    ids = {f: int(t["track_id"][0]) for f, t in out}
    assert ids == {0: 0, 1: 0, 2: 0, 3: 0, 4: 0, 5: 0}
    assert lk.summary()["n_weak_links"] == 4
    # below the cutoff alone: tracked after weak_frames frames in a row (kind below_cutoff), never before
    for weak_frames, n, want in ((0, 3, 0), (3, 2, 0), (3, 3, 1)):
        lk = DefectLinker(TrackSettings(max_gap=0, weak_frames=weak_frames, weak_mean_fraction=0.6), cutoff=5.0)
        out = []
        for f, t, d in frames[3:3 + n]:
            out += lk.push(f, t, drift=d)
        out += lk.finish()
        assert lk.n_tracks == want
        assert all(int(t["track_id"][0]) == (0 if want else -1) for _, t in out)
        if want:
            assert lk.tracks_rows[0]["kind"] == "below_cutoff" and lk.tracks_rows[0]["n_frames"] == 3
    # a noise site passing the weak score once in a while is never tracked
    lk = DefectLinker(TrackSettings(), cutoff=5.0)
    for k in range(9):
        t = table([p], score=3.5 if k % 2 else 1.0)
        t = t.with_columns({"is_defect": np.zeros(len(t), bool)})
        lk.push(k, t, drift=(0, 0) if k else None)
    lk.finish()
    assert lk.n_tracks == 0 and lk.summary()["n_tentative_dropped"] == 4


def test_unknown_drift_ends_the_tracks_instead_of_guessing():
    """A frame without sites (2) places nothing and breaks nothing; the next frame with sites, its drift from
    the last placed frame unknown, is a break: the tracks end, the positions from there on are its own."""
    p = node(0, 2)
    out, rows, summ = link_tables([(0, table([p]), None), (1, table([p]), (0, 0)), (2, None, None),
                                   (3, table([p + (5.0, 3.0)]), None), (4, table([p + (5.0, 3.0)]), (0, 0))])
    assert summ["drift_breaks"] == [3]
    assert [r["end"] for r in rows] == ["drift break", "last frame"]
    assert [r["coords_frame"] for r in rows] == [0, 3]
    assert [(s["first_frame"], s["frame"]) for s in summ["segments"]] == [(0, 0), (3, 3)]
    assert summ["reference"]["frame"] == 0 and summ["reference"]["coords_frame"] == 0


def test_streaming_holds_only_a_bounded_window_of_frames():
    s = TrackSettings(max_gap=2, min_frames=2)
    lk = DefectLinker(s)
    rng = np.random.default_rng(0)
    held = []
    written = []
    for k in range(60):
        pts = [node(int(i), int(j)) for i, j in rng.integers(-20, 20, (5, 2)) if (i - j) % 3 == 0]
        written += [f for f, _ in lk.push(k, table(pts or [node(0, 3)]), drift=(0, 0) if k else None)]
        held.append(len(lk._buf))
        assert len(lk.active) < 60
    written += [f for f, _ in lk.finish()]
    assert max(held) == s.delay and written == list(range(60))


def test_lattice_index_columns_are_used_when_they_agree_and_ignored_otherwise():
    p = node(4, 1)
    pts = np.array([p, node(0, 0), node(1, 0), node(0, 1), node(-1, 0)])
    ij = np.array([[4, 1], [0, 0], [1, 0], [0, 1], [-1, 0]]) + [7, -3]  # another origin: an offset
    t = table([p], extra={"lattice_i": ij[:, 0], "lattice_j": ij[:, 1]})
    lk = DefectLinker()
    lk.push(0, t, drift=None)
    lk.push(1, t, drift=(0, 0))
    assert lk.index_frames == 2 and lk.index_rejected == 0
    assert lk.active[0].start_node.tolist() == [4, 1]
    bad = table([p], extra={"lattice_i": np.array([5, 9, 0, 2, 7]), "lattice_j": np.array([1, 4, 0, 8, 2])})
    lk = DefectLinker()
    lk.push(0, bad, drift=None)
    assert lk.index_rejected == 1 and lk.active[0].start_node.tolist() == [4, 1]
    del pts


def test_lattice_index_columns_of_a_frame_that_names_its_lattice_otherwise_are_mapped_not_dropped():
    # the front end may name a frame's lattice by -a1, -a2 and another origin (it picks g or -g
    # afresh per frame): the linker maps the frame's (lattice_i, lattice_j) onto the first frame's
    p = node(4, 1)
    ij = np.array([[4, 1], [0, 0], [1, 0], [0, 1], [-1, 0]])
    t0 = table([p], extra={"lattice_i": ij[:, 0] + 7, "lattice_j": ij[:, 1] - 3})
    q = node(5, 2)  # the defect hopped by a1 + a2 (one S2 step)
    ij1 = np.array([[5, 2], [0, 0], [1, 0], [0, 1], [-1, 0]])
    t1 = table([q], basis=-B, extra={"lattice_i": -ij1[:, 0] + 2, "lattice_j": -ij1[:, 1] + 11})
    lk = DefectLinker()
    out = lk.push(0, t0, drift=None) + lk.push(1, t1, drift=(0, 0)) + lk.finish()
    assert lk.index_frames == 2 and lk.index_rejected == 0
    assert lk.tracks_rows[0]["start_i"] == 4 and lk.tracks_rows[0]["start_j"] == 1
    assert (lk.tracks_rows[0]["end_i"], lk.tracks_rows[0]["end_j"]) == (5, 2)
    assert lk.tracks_rows[0]["hops"] == 1 and [int(t["track_id"][0]) for _, t in out] == [0, 0]
    # node_map: a rotation by 60 degrees ((i, j) -> (-j, i + j)) and an offset
    rot = np.c_[-ij[:, 1], ij[:, 0] + ij[:, 1]] + [3, -2]
    M, off, share = node_map(ij, rot)
    assert share == 1.0 and off.tolist() == [3, -2] and (ij @ M + off).tolist() == rot.tolist()


def test_a_run_below_the_cutoff_is_tracked_only_when_its_mean_score_is_high_enough():
    # scores are mostly fixed by the image around a site, so three frames of 3.2 are no more a
    # defect than one frame of 3.2: such a run is counted, not tracked
    p = node(2, 1)
    for score, want in ((3.2, 0), (3.6, 1), (4.5, 1)):
        lk = DefectLinker(TrackSettings(weak_mean_fraction=0.7), cutoff=5.0)
        out = []
        for k in range(5):
            t = table([p], score=score)
            out += lk.push(k, t.with_columns({"is_defect": np.zeros(len(t), bool)}), drift=(0, 0) if k else None)
        out += lk.finish()
        assert lk.n_tracks == want
        assert lk.summary()["n_weak_runs_unreported"] == 1 - want
        assert all(int(t["track_id"][0]) == (0 if want else -1) for _, t in out)


def test_the_faintest_sites_keep_a_track_on_its_node_but_never_carry_it_elsewhere():
    # between stay_fraction and continue_fraction of the cutoff: continues the track where it is,
    # not a hop (a run that is not yet a track only on its node, see the faint-run test below)
    p, q = node(2, 1), node(3, 2)  # q: one S2 step from p
    for second, want in ((p, [0, 0, 0]), (q, [0, -1, 0])):
        lk, out = link_flagged([([p], [8.0], [True]), ([second], [2.7], [False]), ([p], [8.0], [True])],
                               TrackSettings(max_gap=1, stay_fraction=0.5, continue_fraction=0.6))
        assert [int(t["track_id"][0]) for _, t in out] == want
        assert lk.n_tracks == 1 and lk.tracks_rows[0]["hops"] == 0
    # alone, such sites start nothing
    lk = DefectLinker(TrackSettings(), cutoff=5.0)
    for k in range(6):
        t = table([p], score=2.7)
        lk.push(k, t.with_columns({"is_defect": np.zeros(len(t), bool)}), drift=(0, 0) if k else None)
    lk.finish()
    assert lk.n_tracks == 0 and lk.summary()["n_tentative_dropped"] == 0


def test_a_flagged_hop_goes_to_the_track_not_to_a_tentative_run_on_its_node():
    # a confirmed track at node A; a run below the cutoff (not yet a track) sits on the S2 node next
    # to it; the defect hops onto that node (flagged): it keeps its id, the run does not take it
    a, b = node(0, 3), node(1, 4)
    lk = DefectLinker(TrackSettings(max_gap=0), cutoff=5.0)
    out = []
    for k in range(4):
        if k < 3:
            t = table([a, b], score=[8.0, 3.4])
            isd = np.asarray(t["is_defect"]).copy()
            isd[1] = False
            t = t.with_columns({"is_defect": isd})
        else:
            t = table([b], score=8.0)
        out += lk.push(k, t, drift=(0, 0) if k else None)
    out += lk.finish()
    assert [int(t["track_id"][0]) for _, t in out] == [0, 0, 0, 0]
    assert lk.tracks_rows[0]["hops"] == 1 and lk.n_tracks == 1


def test_a_defect_hopping_away_from_a_faintly_lit_node_keeps_its_id():
    # the defect sits at p (flagged), then hops one S2 step to q (flagged) while the column it left
    # still scores faintly (between stay_fraction and continue_fraction of the cutoff): the faint
    # site may be left to the noise, so the track follows the hop; no new id for the flagged site
    p, q = node(2, 1), node(3, 2)
    seq = [([p], [8.0], [True])] * 3 + [([p, q], [2.8, 7.0], [False, True])] + [([q], [7.0], [True])] * 3
    lk, out = link_flagged(seq, TrackSettings())
    tid3 = dict(out)[3]["track_id"][:2].tolist()
    assert tid3 == [-1, 0]  # the faint site at p untracked, the flagged site at q on the track
    assert all(v == [0] for v in ids_of(out).values())
    assert lk.n_tracks == 1
    r = lk.tracks_rows[0]
    assert (r["hops"], r["first_frame"], r["last_frame"], r["n_frames"]) == (1, 0, 6, 7)
    # with nothing else to explain, the same faint site keeps the track on its node (no hop, no gap)
    seq2 = [([p], [8.0], [True])] * 3 + [([p], [2.8], [False])] + [([p], [8.0], [True])] * 3
    lk, out = link_flagged(seq2, TrackSettings())
    assert all(v == [0] for v in ids_of(out).values())
    assert lk.tracks_rows[0]["n_frames"] == 7 and lk.tracks_rows[0]["hops"] == 0


def test_the_column_a_defect_left_keeps_no_track_while_it_still_scores_above_continue_fraction():
    # the defect scores 8-9 at p, then hops one S2 step to q (flagged, 7.0) while the column it left
    # still scores 3.2 (above continue_fraction: before, such a site had to be linked, the track stayed
    # on it and q got a new id). 3.2 is far below the track's recent scores (min_score_ratio), so the
    # assignment may leave it to the noise: the track hops to q.
    p, q = node(2, 1), node(3, 2)
    seq = [([p], [s], [True]) for s in (8.0, 9.0, 8.5)] + [([p, q], [3.2, 7.0], [False, True])]
    seq += [([q], [7.0], [True])] * 3
    lk, out = link_flagged(seq, TrackSettings())
    assert dict(out)[3]["track_id"][:2].tolist() == [-1, 0]
    assert all(v == [0] for v in ids_of(out).values()) and lk.n_tracks == 1
    r = lk.tracks_rows[0]
    assert (r["hops"], r["first_frame"], r["last_frame"], r["n_frames"]) == (1, 0, 6, 7)
    # a faint vacancy (scores 3.5-4.5) stays where it is at 3.2: the same site is linked
    seq2 = [([p], [s], [False]) for s in (4.0, 4.5, 3.6)] + [([p], [3.2], [False])] + [([p], [4.2], [False])] * 2
    lk, out = link_flagged(seq2, TrackSettings())
    assert [int(t["track_id"][0]) for _, t in out] == [0] * 6
    # switched off: the old behaviour (the faint column keeps the track, q a new id)
    lk, out = link_flagged(seq, TrackSettings(min_score_ratio=0.0))
    assert dict(out)[3]["track_id"][:2].tolist() == [0, 1]


def test_two_neighbouring_vacancies_one_hopping_away_from_a_faintly_lit_column_keep_their_ids():
    # a and b one S2 step apart, both flagged; b hops to c (one step from b, two from a) while its old
    # column still scores 3.1: a keeps id 0 with no hop, b's track follows the hop to c
    a, b = node(0, 3), node(1, 4)
    c = b + S2_STEP
    seq = [([a, b], [8.0, 8.0], [True, True])] * 3 + [([a, b, c], [8.0, 3.1, 7.0], [True, False, True])]
    seq += [([a, c], [8.0, 7.0], [True, True])] * 3
    lk, out = link_flagged(seq, TrackSettings())
    ids = ids_of(out)
    assert ids[0] == ids[1] == ids[2] == [0, 1]
    assert dict(out)[3]["track_id"][:3].tolist() == [0, -1, 1]
    assert ids[4] == ids[5] == ids[6] == [0, 1]
    assert lk.n_tracks == 2
    assert {r["track_id"]: r["hops"] for r in lk.tracks_rows} == {0: 0, 1: 1}


def test_a_faint_run_bridged_by_a_fainter_frame_gets_its_id_before_the_first_flag():
    # a faint vacancy scores 3.5, 2.9 (below continue_fraction), 3.7 before it is flagged: the 2.9 on the
    # run's own node keeps the run going (before, the run broke there and only the frames from the
    # last break on got the id)
    p = node(2, 1)
    seq = [([p], [s], [False]) for s in (3.5, 2.9, 3.7)] + [([p], [7.0], [True])] * 3
    lk, out = link_flagged(seq, TrackSettings())
    assert [int(t["track_id"][0]) for _, t in out] == [0] * 6
    r = lk.tracks_rows[0]
    assert (r["first_frame"], r["n_frames"], r["hops"]) == (0, 6, 0)
    # the fainter frames do not count as evidence: a run 3.2, 4.7, 2.9 that is never flagged has only two
    # frames at continue_fraction and stays unreported
    lk, out = link_flagged([([p], [s], [False]) for s in (3.2, 4.7, 2.9)], TrackSettings())
    assert [int(t["track_id"][0]) for _, t in out] == [-1] * 3 and lk.n_tracks == 0


def test_a_faint_normal_column_next_to_a_new_faint_vacancy_does_not_hide_it():
    # a normal column at p scores 2.8-3.1 in every frame (a run, too faint to be reported); from frame 12 a
    # faint vacancy (3.8-4.7, never flagged) sits one S2 step away at q. The run hops onto q (the site
    # must be explained), but a run judged too faint over 2 * weak_frames frames does not carry its history
    # there: q's run starts afresh, reaches the mean and gets an id in all its frames; p never gets one
    p, q = node(2, 1), node(3, 2)
    seq = [([p], [s], [False]) for s in (3.1, 2.8, 3.1, 2.9) * 3]
    seq += [([p, q], [sp, sq], [False, False]) for sp, sq in ((2.8, 3.8), (3.1, 4.1), (2.9, 4.3), (2.8, 4.7))]
    lk, out = link_flagged(seq, TrackSettings())
    tid = {f: t["track_id"].tolist() for f, t in out}
    assert all(tid[f][0] == -1 for f in range(12))
    assert all(tid[f][1] == 0 and tid[f][0] == -1 for f in range(12, 16))
    assert lk.n_tracks == 1 and lk.tracks_rows[0]["first_frame"] == 12 and lk.tracks_rows[0]["n_frames"] == 4
    # a faint run of a few frames (here 3.4, 3.1, 3.5, 3.2: judged too faint, but not for long) that hops
    # keeps its frames: a faint vacancy hopping before its mean is reached
    seq2 = [([p], [s], [False]) for s in (3.4, 3.1, 3.5, 3.2)] + [([q], [s], [False]) for s in (4.5, 4.7, 5.5)]
    lk, out = link_flagged(seq2, TrackSettings())
    assert [int(t["track_id"][0]) for _, t in out] == [0] * 7 and lk.tracks_rows[0]["hops"] == 1


def test_a_hop_onto_the_node_of_a_defect_that_just_vanished_keeps_the_hoppers_id():
    # a and b one S2 step apart; the defect at a vanishes in frame 3, the one at b hops onto a in frame 4.
    # A missed frame is rarer than a hop (gap_penalty > one hop), so this is b's hop, not a's track
    # revived after one missed frame (with gap_penalty 0.5, the old default, it was: a's id came back
    # at a and b's track ended)
    a, b = node(0, 3), node(1, 4)
    seq = [([a, b], [8.0, 8.0], [True, True])] * 3 + [([b], [8.0], [True])] + [([a], [8.0], [True])] * 3
    lk, out = link_flagged(seq, TrackSettings())
    ids = ids_of(out)
    assert ids[0] == ids[1] == ids[2] == [0, 1] and ids[3] == [1]
    assert ids[4] == ids[5] == ids[6] == [1]
    rows = {r["track_id"]: r for r in lk.tracks_rows}
    assert (rows[0]["last_frame"], rows[0]["hops"]) == (2, 0)
    assert (rows[1]["first_frame"], rows[1]["last_frame"], rows[1]["hops"]) == (0, 6, 1)
    lk, out = link_flagged(seq, TrackSettings(gap_penalty=0.5))
    assert ids_of(out)[4] == [0]


def test_settings_are_validated():
    with pytest.raises(ValueError):
        TrackSettings(max_gap=-1)
    with pytest.raises(ValueError):
        TrackSettings(min_score_ratio=1.5)
    with pytest.raises(ValueError):
        TrackSettings(continue_fraction=0.0)
    with pytest.raises(ValueError):
        TrackSettings(max_hop=float("nan"))
    with pytest.raises(ValueError):
        TrackSettings(cutoff=0.0)


def test_the_tracker_keeps_its_own_score_scale(tmp_path):
    # the single image flags from the analysis' defect_cutoff (4); the hysteresis of the tracks is
    # read in units of tracking.cutoff (5), whatever the analysis cutoff: on the track's own node a
    # site continues it from 0.5 x 5 = 2.5 (stay_fraction), so 2.3 ends it and 2.7 keeps it -- at a
    # scale of 4 (2.0) both would
    from stemfast.analysis import AnalysisSettings
    from stemfast.tracking import StackTracker

    assert AnalysisSettings().defect_cutoff == 4.0 and TrackSettings().cutoff == 5.0
    assert StackTracker(tmp_path, settings=TrackSettings()).cutoff == 5.0
    assert StackTracker(tmp_path, settings=TrackSettings(cutoff=6.0)).cutoff == 6.0
    p = node(3, 3)
    for faint, continued in ((2.3, False), (2.7, True)):
        seq = [([p], [8.0], [True])] + [([p], [faint], [False])] * 3
        lk, out = link_flagged(seq, TrackSettings(max_gap=0), cutoff=TrackSettings().cutoff)
        ids = ids_of(out)
        assert (ids.get(3, [-1])[0] >= 0 if ids.get(3) else False) == continued, (faint, ids)


def test_dose_is_read_from_metadata():
    d = dose_from_metadata({"imagej": {"x": 1}, "description": json.dumps({"dose_per_frame": 3.0, "dose_unit": "e/A^2"})})
    assert d == {"value": 3.0, "key": "dose_per_frame", "per_frame": True, "unit": "e/A^2"}
    assert dose_from_metadata({"Microscope": {"Dose": "12.5"}})["per_frame"] is False
    assert dose_from_metadata({"dose": "n/a"}) is None


# ----------------------------------------------------------------------------- the synthetic series


@pytest.fixture(scope="module")
def series():
    from stemfast.synthetic import SeriesConfig, make_series

    return make_series(SeriesConfig(n_frames=12, v_s=0.04, hop_prob=0.3, birth_rate=0.002, death_prob=0.05, seed=0),
                       shape=(288, 288), pixel_size_A=0.2, drift_px_per_frame=(0.3, -0.1), seed=5)


def _ambiguous(s, max_gap=2):
    """True ids whose birth next to a defect that just left (died or hopped) looks like a hop of that one."""
    a = math.sqrt(3) * s.nn_px
    tr = s.truth
    first = {int(i): int(tr[tr[:, 1] == i, 0].min()) for i in np.unique(tr[:, 1])}
    out = set()
    for i, k in first.items():
        if k == 0:
            continue
        p = tr[(tr[:, 1] == i) & (tr[:, 0] == k), 2:4][0] - s.drift[k]
        for g in range(1, max_gap + 2):
            prev = tr[tr[:, 0] == k - g]
            for row in prev:
                q = row[2:4] - s.drift[k - g]
                now = tr[(tr[:, 1] == row[1]) & (tr[:, 0] == k)]
                moved = not len(now) or np.hypot(*(now[0, 2:4] - s.drift[k] - q)) > 0.5 * s.nn_px
                if moved and np.hypot(*(p - q)) < 1.1 * a * g:
                    out |= {i, int(row[1])}
    return out


def test_series_generator_history(series):
    s = series
    tr = s.truth
    assert s.images.shape == (12, 288, 288)
    ev = Counter(e["event"] for e in s.events)
    assert ev["hop"] >= 3 and ev["death"] >= 1 and sum(1 for e in s.events if e["event"] == "birth" and e["frame"]) >= 1
    a = math.sqrt(3) * s.nn_px
    for e in s.events:
        if e["event"] == "hop":  # a hop goes to a neighbouring S2 column
            assert abs(math.dist(e["from"], e["to"]) - a) < 0.1 * a
    # positions follow the drift: frame k truth = frame-0 position + k * drift
    for did in np.unique(tr[:, 1]):
        rows = tr[tr[:, 1] == did]
        assert set(rows[:, 4].astype(int)) == {1} and set(rows[:, 5].astype(int)) == {1}
        assert len(np.unique(rows[:, 0])) == len(rows)  # one position per frame
    # the image shows the vacancy: its column is dimmer than the S2 columns around it
    k = 5
    f = s.frame_truth(k)
    img = s.images[k].astype(float)
    val = img[np.round(f[:, 3]).astype(int), np.round(f[:, 2]).astype(int)]
    assert np.median(val) < 0.8 * np.percentile(img, 99)


def test_linker_follows_the_generator_history_exactly(series):
    """Perfect detections (true positions, small jitter): one id per true defect, hops as generated."""
    s = series
    rng = np.random.default_rng(1)
    basis = triangular_basis(s.nn_px, 30.0)  # the generator's site lattice at rotation 0
    frames = []
    for k in range(12):
        f = s.frame_truth(k)
        xy = f[:, 2:4] + rng.normal(0, 0.15, (len(f), 2))
        t = SiteTable({"x": xy[:, 0], "y": xy[:, 1], "is_defect": np.ones(len(f), bool),
                       "defect_kind": np.array(["vacancy_S"] * len(f)), "sublattice": f[:, 4].astype(np.int64),
                       "anomaly_score": np.full(len(f), 9.0), "true_id": f[:, 1].astype(np.int64),
                       **{c: np.full(len(f), v) for c, v in zip(("a1x", "a1y", "a2x", "a2y"), basis.ravel())}})
        frames.append((k, t, None if k == 0 else tuple(s.drift[k] - s.drift[k - 1])))
    out, rows, summ = link_tables(frames, TrackSettings(min_frames=1))
    pairs = Counter()
    for _, t in out:
        pairs.update(zip(t["true_id"].tolist(), t["track_id"].tolist()))
    true_to_track = {}
    for (a, b), _ in pairs.items():
        true_to_track.setdefault(a, set()).add(b)
    amb = _ambiguous(s)
    assert len(amb) <= 0.25 * len(true_to_track)
    clear = {a: v for a, v in true_to_track.items() if a not in amb}
    assert len(clear) >= 10
    assert all(len(v) == 1 for v in clear.values())  # one id per defect
    assert len({next(iter(v)) for v in clear.values()}) == len(clear)  # distinct ids
    hops = Counter(e["id"] for e in s.events if e["event"] == "hop")
    assert sum(hops[a] for a in clear) >= 5
    by_id = {r["track_id"]: r for r in rows}
    for a, v in clear.items():
        r = by_id[next(iter(v))]
        life = s.truth[s.truth[:, 1] == a, 0]
        assert r["hops"] == hops.get(a, 0)
        assert (r["first_frame"], r["last_frame"], r["n_frames"]) == (life.min(), life.max(), len(life))


# ----------------------------------------------------------------------------- through the batch


TINY = {"model.epochs": 1, "model.stn_epochs": 1, "model.max_train_patches": 400, "model.batch_size": 64,
        "model.input_size": 16, "model.channels": [8, 8, 8], "model.stn_channels": [4, 8], "model.patience": 1,
        "model.device": "cpu", "analysis.top_n": 10}


@pytest.fixture(scope="module")
def batch_run(tmp_path_factory):
    from stemfast.batch import run_batch
    from stemfast.config import load_config
    from stemfast.synthetic import SeriesConfig, make_series

    root = tmp_path_factory.mktemp("trk")
    short = make_series(SeriesConfig(n_frames=6, v_s=0.1, hop_prob=0.2, seed=1), shape=(192, 192),
                        pixel_size_A=0.16, drift_px_per_frame=(0.3, 0.1), seed=4)
    short.save(root / "data" / "series.tif", truth_path=root / "series.npz")
    cfg = load_config(None, TINY)
    rep = run_batch(root / "data", root / "out", config=cfg, show_progress=False)
    return root, cfg, rep, short


def test_batch_writes_track_ids_tracks_csv_figure_and_report(batch_run):
    import pandas as pd

    root, cfg, rep, short = batch_run
    assert rep.results[0].status == "done"
    d = root / "out" / "series"
    sites = pd.read_csv(d / "sites.csv")
    tracks = pd.read_csv(d / "tracks.csv")
    assert "track_id" in sites and sites["track_id"].dtype.kind == "i"
    tracked = sites[sites["track_id"] >= 0]
    assert len(tracks) >= 3 and set(tracked["track_id"]) == set(tracks["track_id"])
    assert (sites.loc[~sites["is_defect"].astype(bool), "track_id"] >= -1).all()
    # every row of tracks.csv agrees with the sites that carry its id
    for _, r in tracks.iterrows():
        rows = tracked[tracked["track_id"] == r["track_id"]]
        assert len(rows) == r["n_frames"] and rows["frame"].min() == r["first_frame"]
        assert rows["frame"].max() == r["last_frame"] and r["path_steps"] >= r["hops"]
    assert list(tracks.columns[:5]) == ["track_id", "kind", "sublattice", "first_frame", "last_frame"]
    # most tracked sites are true vacancies (0.5 column spacing)
    from scipy.spatial import cKDTree

    near = []
    for k in range(6):
        T = short.frame_truth(k)
        S = tracked[tracked["frame"] == k]
        if len(S) and len(T):
            near += (cKDTree(T[:, 2:4]).query(S[["x", "y"]].to_numpy())[0] < 0.5 * short.nn_px).tolist()
    assert np.mean(near) > 0.9
    summ = json.loads((d / "summary.json").read_text())
    assert summ["tracking"]["n_tracks"] == len(tracks) and summ["tracking"]["dose"]["per_frame"]
    done = json.loads((d / "done.json").read_text())
    assert {"tracks.csv", "tracks.png"} <= set(done["outputs"])
    from PIL import Image

    im = Image.open(d / "tracks.png")
    assert im.size[0] > 800 and len(np.unique(np.asarray(im.convert("L")))) > 50
    html = (root / "out" / "report.html").read_text()
    assert "defect tracks" in html and "tracks.csv" in html


def test_chunked_frames_assemble_to_the_same_tracks(batch_run):
    """The path of the Dask workers: frame chunks analysed apart, linked in order at assembly."""
    from stemfast.batch import assemble_parts, discover_inputs, load_model, process_chunk
    from stemfast.config import config_hash, file_sha256

    root, cfg, rep, _ = batch_run
    out2 = root / "out_chunks"
    (entry,) = discover_inputs(root / "data")
    entry.sha256 = file_sha256(entry.path)
    entry.n_frames = 6
    model = load_model(root / "out" / "model.pt")
    sha = file_sha256(root / "out" / "model.pt")
    ch = config_hash(cfg)
    parts = [process_chunk(entry, out2, a, b, model=model, model_sha=sha, config=cfg, chash=ch)
             for a, b in ((0, 2), (2, 4), (4, 6))]
    r = assemble_parts(entry, out2, parts, config=cfg, chash=ch, model_sha=sha)
    assert r.status == "done"
    for f in ("tracks.csv", "sites.csv"):
        assert (out2 / "series" / f).read_bytes() == (root / "out" / "series" / f).read_bytes()


def test_chunks_check_a_given_spacing_once_as_the_in_process_run(batch_run):
    """A --spacing that disagrees with the image's estimate is a warning on the stack's first frame only,
    in chunks (the Dask path) as in one process. Before, every chunk checked its own first frame (warnings
    on frames 0, 4, 8 of a 12-frame stack in chunks of 4, on frame 0 in one process)."""
    from stemfast.batch import discover_inputs, load_model, process_chunk
    from stemfast.batch.parts import load_part
    from stemfast.config import config_hash, file_sha256, load_config

    root, _, _, _ = batch_run
    spacing = json.loads((root / "out" / "series" / "summary.json").read_text())["lattice"]["spacing_px"]
    cfg = load_config(None, {**TINY, "sites.spacing": round(1.2 * spacing, 2)})
    (entry,) = discover_inputs(root / "data")
    entry.sha256, entry.n_frames = file_sha256(entry.path), 6
    model = load_model(root / "out" / "model.pt")
    sha = file_sha256(root / "out" / "model.pt")
    out = root / "out_spacing"
    warned = [fr.meta["frame"] for a, b in ((0, 3), (3, 6))
              for fr in load_part(process_chunk(entry, out, a, b, model=model, model_sha=sha, config=cfg,
                                                chash=config_hash(cfg)))
              if any("differs from the image's own estimate" in w for w in fr.meta["warnings"])]
    assert warned == [0]


def test_align_bases_names_every_local_fit_like_the_reference():
    """Local fits may name the lattice by -a1, a1 + a2, ... (the new front end flips a1 between sites);
    node arithmetic needs one naming: every equivalent pair of first-shell vectors maps back to ref."""
    from stemfast.tracking import align_bases

    a1 = np.array([15.0, 1.0])
    rot = np.array([[0.5, -np.sqrt(3) / 2], [np.sqrt(3) / 2, 0.5]])  # +60 degrees
    a2 = rot @ a1
    ref = np.array([a1, a2])
    rng = np.random.default_rng(0)
    shell = [a1, a2, a2 - a1, -a1, -a2, a1 - a2]
    B = np.array([[shell[i], shell[(i + rng.choice([1, 2, 4, 5])) % 6]] for i in rng.integers(0, 6, 50)])
    B *= rng.normal(1.0, 0.01, (50, 1, 1))  # strain: slightly different lengths
    out = align_bases(B, ref)
    np.testing.assert_allclose(out / np.linalg.norm(out, axis=-1, keepdims=True),
                               np.broadcast_to(ref / np.linalg.norm(ref, axis=-1, keepdims=True), out.shape),
                               atol=1e-9)
    nan = np.full((1, 2, 2), np.nan)
    assert np.isnan(align_bases(nan, ref)).all()
