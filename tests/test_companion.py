"""A second detector of the same scan (``companion_intensity``): read at the first image's sites, its
local z averaged with the first image's in the defect scores (docs/RESULTS.md, round 5)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pytest
from scipy.spatial import cKDTree

from stemfast.analysis import analyze_sites
from stemfast.sites import companion_intensity, find_sites
from stemfast.synthetic import make_mos2


@dataclass
class FakeEncoding:
    mu: np.ndarray
    recon_error: np.ndarray
    angle: np.ndarray


def _two_detectors(seed: int):
    """Two frames of the same atoms without drift: the same scan seen through independent shot noise."""
    return make_mos2(shape=(256, 256), seed=seed, pixel_size_A=0.2, dose=25.0, n_frames=2,
                     drift_px_per_frame=(0.0, 0.0), rates=(0.05, 0.0, 0.0, 0.0))


def _scores(table):
    n = len(table)
    enc = FakeEncoding(np.zeros((n, 2)), np.ones(n), np.zeros(n))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t, summary = analyze_sites(table, enc)
    return np.asarray(t["anomaly_score"]), summary


def _ap(score, xy, truth, nn):
    d, j = cKDTree(truth[:, :2]).query(xy)
    pos = (d < 0.3 * nn) & (truth[j, 3] > 0)
    hits = pos[np.argsort(-score, kind="stable")]
    prec = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((prec * hits).sum() / (truth[:, 3] > 0).sum())


def _sites(image):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return find_sites(image)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_second_detector_ranks_faint_vacancies_better(seed):
    s = _two_detectors(seed)
    t = _sites(s.image[0])
    single, summary1 = _scores(t)
    both, summary2 = _scores(t.with_columns({"companion_intensity": companion_intensity(s.image[1], t)}))
    nn = s.meta["nn_px"]
    ap1, ap2 = _ap(single, t.xy, s.truth, nn), _ap(both, t.xy, s.truth, nn)
    assert ap2 > ap1 + 0.05, (ap1, ap2)
    assert summary2["detectors"] == 2 and "detectors" not in summary1


def test_the_same_image_as_companion_changes_nothing():
    s = _two_detectors(2)
    t = _sites(s.image[0])
    comp = companion_intensity(s.image[0], t)
    np.testing.assert_allclose(comp, np.asarray(t["column_intensity"]), rtol=1e-6, atol=1e-6 * np.abs(comp).max())
    single, _ = _scores(t)
    both, _ = _scores(t.with_columns({"companion_intensity": comp}))
    np.testing.assert_allclose(both, single, atol=1e-6)


def test_companion_must_be_the_same_scan():
    s = _two_detectors(3)
    t = _sites(s.image[0])
    with pytest.raises(ValueError, match="shape"):
        companion_intensity(s.image[1][:200], t)


@pytest.mark.parametrize("seed", [4, 5])
def test_a_noisy_second_detector_is_given_less_say(seed, monkeypatch):
    """The same scan on a second detector drowned in noise (a low-dose or weak detector): the vacancies
    hardly stand out in it, so it gets a small weight (stemfast.analysis.detector_weights) and costs the
    clear image's ranking less than the equal mean of the two z does."""
    import stemfast.analysis as analysis

    s = _two_detectors(seed)
    t = _sites(s.image[0])
    img = s.image[1]
    noisy = img + np.random.default_rng(seed).normal(0.0, 3.0 * img.std(), img.shape).astype(np.float32)
    tt = t.with_columns({"companion_intensity": companion_intensity(noisy, t)})
    nn = s.meta["nn_px"]
    alone, weighed = (_ap(_scores(x)[0], t.xy, s.truth, nn) for x in (t, tt))
    monkeypatch.setattr(analysis, "detector_weights", lambda z1, z2, grp, observed: np.full(len(z1), 0.5))
    equal = _ap(_scores(tt)[0], t.xy, s.truth, nn)
    assert weighed > equal + 0.02 and weighed >= alone - 0.03, (alone, weighed, equal)
