"""Scan lines that are off (streaks, row jumps): found against the lattice, levelled before the column
intensities are read, their gain divided out in the defect scores -- so they make no defects."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pytest
from scipy.spatial import cKDTree

from stemfast.analysis import analyze_sites
from stemfast.scanlines import same_sublattice_vectors, scan_line_offsets
from stemfast.sites import find_sites
from stemfast.synthetic import make_mos2

DOSE = 80.0
# (first row, rows, kind, level): an offset up, a gain, an offset down (levels of the Mo peak)
STREAKS = [(101, 2, "+", 0.45), (207, 2, "*", 1.6), (290, 1, "-", 0.45)]
STREAK_ROWS = [101, 102, 207, 208, 290]


@dataclass
class FakeEncoding:
    mu: np.ndarray
    recon_error: np.ndarray
    angle: np.ndarray


def _low_dose_image(seed, rotation_deg=7.0, streaks=STREAKS):
    """What dev3 has: faint S2 columns, an illumination gradient, dose 80, single-S vacancies (z ~ -3
    at this dose); plus scan streaks of real strength, each of a known kind."""
    s = make_mos2(shape=(384, 384), seed=seed, rotation_deg=rotation_deg, chalcogen_scale=0.45,
                  illumination_gradient=0.35, dose=DOSE, rates=(0.04, 0.0, 0.0, 0.0), contamination=0)
    img = s.image.astype(np.float64)
    for r, w, kind, level in streaks:
        if kind == "+":
            img[r:r + w] += level * DOSE
        elif kind == "-":
            img[r:r + w] -= level * DOSE
        else:
            img[r:r + w] *= level
    return s, img


def _analyse(img, **site_kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = find_sites(img, **site_kw)
        n = len(t)
        sub = np.clip(np.asarray(t["sublattice"]), 0, 2)
        a, _ = analyze_sites(t, FakeEncoding(np.eye(3)[sub] * 3, np.ones(n), np.zeros(n)))
    return t, a


def _ap(score, pos):
    order = np.argsort(-score, kind="stable")
    hits = pos[order].astype(float)
    prec = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((prec * hits).sum() / max(pos.sum(), 1))


def test_scan_line_offsets_validate_their_input():
    img = np.zeros((32, 32))
    with pytest.raises(ValueError):
        scan_line_offsets(img[0], [[8.0, 8.0]])
    with pytest.raises(ValueError):
        scan_line_offsets(img, [[8.0, np.nan]])
    with pytest.raises(ValueError):
        scan_line_offsets(img, np.zeros((0, 2)))
    with pytest.raises(ValueError):
        scan_line_offsets(img, [[8.0, 8.0]], threshold=0.0)


def test_same_sublattice_vectors_map_each_colour_onto_itself():
    a1, a2 = np.array([10.0, 1.0]), np.array([4.0, 9.0])
    B = np.array([a1, a2])
    for t in same_sublattice_vectors(a1, a2):
        m, n = np.linalg.solve(B.T, t)
        assert np.allclose([m, n], np.rint([m, n])) and (round(m) - round(n)) % 3 == 0


def test_atom_rows_along_the_scan_lines_are_not_streaks():
    """Atom rows along the scan lines (lattice not rotated), low dose, a gradient: the difference to
    the lattice-translated image cancels the lattice, so no line of a sound image is flagged."""
    s, img = _low_dose_image(seed=3, rotation_deg=0.0, streaks=[])
    t, a = _analyse(img)
    assert t.meta["lattice"]["scan_lines"]["checked"] and t.meta["lattice"]["scan_lines"]["flagged_rows"] == []
    assert not np.asarray(t["scan_streak"]).any()


@pytest.mark.parametrize("seed", [0, 2])
def test_scan_streaks_make_no_defects_and_faint_vacancies_outrank_them(seed):
    s, img = _low_dose_image(seed)
    t, a = _analyse(img)
    assert t.meta["lattice"]["scan_lines"]["flagged_rows"] == STREAK_ROWS
    nn = s.meta["nn_px"]
    d, j = cKDTree(s.truth[:, :2]).query(t.xy)
    pos = (d < 0.3 * nn) & (s.truth[j, 3] > 0)        # single-S vacancies (faint: z ~ -3 at dose 80)
    normal = (d < 0.3 * nn) & (s.truth[j, 3] == 0)
    y = t.xy[:, 1]
    on_streak = np.zeros(len(t), bool)
    for r, w, _, _ in STREAKS:
        on_streak |= (y > r - 2.5) & (y < r + w + 1.5)
    assert (normal & on_streak).sum() >= 20
    an = np.asarray(a["anomaly_score"])
    top = np.argsort(-an)[: int(pos.sum())]
    assert not (normal & on_streak)[top].any()                 # no streak site among the top
    assert not np.asarray(a["is_defect"])[normal & on_streak].any()
    assert an[normal & on_streak].max() < 3.0
    # without levelling the scan lines (the row term of the scores alone), streak sites rank on top
    t0, a0 = _analyse(img, scan_lines=False)
    an0 = np.asarray(a0["anomaly_score"])
    d0, j0 = cKDTree(s.truth[:, :2]).query(t0.xy)
    pos0 = (d0 < 0.3 * nn) & (s.truth[j0, 3] > 0)
    normal0 = (d0 < 0.3 * nn) & (s.truth[j0, 3] == 0)
    on0 = np.zeros(len(t0), bool)
    for r, w, _, _ in STREAKS:
        on0 |= (t0.xy[:, 1] > r - 2.5) & (t0.xy[:, 1] < r + w + 1.5)
    assert (normal0 & on0)[np.argsort(-an0)[: int(pos0.sum())]].sum() >= 2
    assert _ap(an, pos) > _ap(an0, pos0) + 0.1
