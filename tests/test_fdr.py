"""The tail-area false discovery rate of a defect score within its sublattice (stemfast.fdr) and what
``AnalysisSettings.sublattice_fdr`` does with it in analyze_sites."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.special import ndtr

from stemfast.fdr import fdr_shrunk, tail_fdr

from test_analysis import _flat_analysed, _flat_encoding, _flat_lattice


def _by_definition(s, g, usable):
    """q of each site, straight from the definition: the lowest over the group's scores t at or below
    the site's of ``min(1, n Phi(-t) / #{scores >= t})``."""
    ok = usable & np.isfinite(s) & (g >= 0)
    q = np.full(len(s), np.nan)
    for i in np.flatnonzero(ok):
        v = s[ok & (g == g[i])]
        q[i] = min(min(1.0, len(v) * ndtr(-t) / np.sum(v >= t)) for t in v[v <= s[i]])
    return q


def test_tail_fdr_follows_its_definition_with_ties_groups_and_sites_left_out():
    rng = np.random.default_rng(0)
    s = np.round(rng.normal(size=500), 1)  # rounded: many ties
    s[:12] += 5.0
    s[rng.choice(500, 8, replace=False)] = np.nan
    g = rng.integers(-1, 3, 500)
    usable = rng.random(500) > 0.1
    q = tail_fdr(s, g, usable)
    np.testing.assert_allclose(q, _by_definition(s, g, usable), rtol=1e-12, equal_nan=True)
    assert np.isnan(q[~usable | (g < 0) | np.isnan(s)]).all()
    assert np.isfinite(q[usable & (g >= 0) & np.isfinite(s)]).all()
    # tied scores of one group share their q
    for k in range(3):
        m = usable & (g == k) & np.isfinite(s)
        for v in np.unique(s[m]):
            assert np.ptp(q[m & (s == v)]) == 0


def test_tail_fdr_rejects_mismatched_input():
    with pytest.raises(ValueError, match="1-D"):
        tail_fdr(np.zeros(4), np.zeros(3, int))
    with pytest.raises(ValueError, match="usable"):
        tail_fdr(np.zeros(4), np.zeros(4, int), np.ones(3, bool))


def test_a_noise_only_sublattice_loses_its_tail_and_real_outliers_keep_their_score():
    """Two groups of 3,000 normal z; group 0 also holds 60 sites shifted by 4.5. Shrunk by 1 - q, group
    1's high scores (pure noise) lose most of their value (the highest few, where the noise leaves few
    sites, less), group 0's shifted sites keep theirs at the
    top, and within each group the order is the same as before."""
    rng = np.random.default_rng(1)
    z = rng.normal(size=6000)
    g = np.repeat([0, 1], 3000)
    z[:60] += 4.5
    a = fdr_shrunk(z, tail_fdr(z, g))
    noise_tail = (g == 1) & (z > 2.5)
    kept = a[noise_tail] / z[noise_tail]
    assert noise_tail.sum() >= 10 and np.median(kept) < 0.5 and kept.max() < 0.9, kept
    strong = np.flatnonzero(z[:60] > 4.0)
    assert len(strong) >= 40 and (a[strong] > 0.95 * z[strong]).all()
    for k in (0, 1):
        m = np.flatnonzero(g == k)
        o = np.argsort(z[m], kind="stable")
        assert (np.diff(a[m][o]) >= 0).all()


def test_weak_vacancies_outrank_the_noise_of_a_sublattice_without_any():
    """A flat lattice whose chalcogen columns hold 40 vacancies 3 noise sigma deep (6 % of them) and
    whose metal columns hold none: without the sublattice's false discovery rate the metal columns'
    noise tail takes 52 of the top-40 slots over six seeds, with it 20; the vacancies take 182 of
    them (166 without), at least as many on every seed. Unjudged sites have no q; with the setting off
    the q are reported all the same."""
    with_fdr, without, metal_on, metal_off = 0, 0, 0, 0
    for seed in range(6):
        xy, colour, inten, basis, rng = _flat_lattice(seed)
        vac = rng.choice(np.flatnonzero(colour == 1), 40, replace=False)
        inten[vac] -= 3.0 * 0.02
        enc = _flat_encoding(colour, rng)
        found = []
        for on in (True, False):
            t, _ = _flat_analysed(xy, colour, inten, basis, enc, sublattice_fdr=on)
            top = np.argsort(-np.asarray(t["anomaly_score"]), kind="stable")[:40]
            found.append((int(np.isin(top, vac).sum()), int((colour[top] == 0).sum())))
            q = np.asarray(t["defect_fdr"])
            judged = np.asarray(t["sublattice_local"]) >= 0  # (every site of this table is observed)
            assert np.isfinite(q[judged]).all() and np.isnan(q[~judged]).all()
        assert found[0][0] >= found[1][0]
        with_fdr, without = with_fdr + found[0][0], without + found[1][0]
        metal_on, metal_off = metal_on + found[0][1], metal_off + found[1][1]
    assert with_fdr >= without + 10 and 2 * metal_on <= metal_off, (with_fdr, without, metal_on, metal_off)


def test_the_summary_estimates_the_share_of_chance_among_the_flagged_sites():
    """20 chalcogen columns 8 noise sigma deep: all flagged, and the summary's estimate of the false
    share among the flagged chalcogen sites is below 1 % (no other sublattice has a flagged site)."""
    xy, colour, inten, basis, rng = _flat_lattice(0)
    vac = rng.choice(np.flatnonzero(colour == 1), 20, replace=False)
    inten[vac] -= 8.0 * 0.02
    t, summary = _flat_analysed(xy, colour, inten, basis, _flat_encoding(colour, rng))
    flagged = np.flatnonzero(np.asarray(t["is_defect"], bool))
    assert set(vac.tolist()) <= set(flagged.tolist())
    assert list(summary["flagged_fdr"]) == ["S2"] and 0 <= summary["flagged_fdr"]["S2"] < 0.01
    assert summary["flagged_fdr"]["S2"] == pytest.approx(np.asarray(t["defect_fdr"])[flagged].max(), abs=1e-4)
