"""Classes and defect scores: stable class order, robust z-scores, sublattice-aware defect ranking."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from stemfast.analysis import AnalysisSettings, analyze_sites, robust_z
from stemfast.table import SiteTable


@dataclass
class FakeEncoding:
    mu: np.ndarray
    recon_error: np.ndarray
    angle: np.ndarray


def make_sites(n_per=300, seed=0):
    """Three sublattices with intensities 1.0 / 0.4 / 0.0 and latent means clustered per sublattice."""
    rng = np.random.default_rng(seed)
    sub = np.repeat([0, 1, 2], n_per)
    inten = np.array([1.0, 0.4, 0.0])[sub] + rng.normal(0, 0.02, len(sub))
    centres = np.array([[3.0, 0.0], [0.0, 3.0], [-3.0, -3.0]])
    mu = centres[sub] + rng.normal(0, 0.2, (len(sub), 2))
    rec = rng.gamma(4.0, 0.01, len(sub))
    xy = rng.uniform(0, 500, (len(sub), 2))
    return sub, inten, mu, rec, xy


def table(sub, inten, xy):
    return SiteTable({"x": xy[:, 0], "y": xy[:, 1], "intensity": inten, "sublattice": sub,
                      "source": np.where(sub == 2, "lattice", "peak")})


def test_robust_z_ignores_outliers():
    v = np.r_[np.random.default_rng(0).normal(0, 1, 1000), 1e6]
    z = robust_z(v)
    assert abs(np.median(z)) < 0.1
    assert 0.8 < np.median(np.abs(z[:-1])) / 0.6745 < 1.2
    assert z[-1] > 1e5


def test_classes_are_ordered_by_intensity_and_match_sublattices():
    sub, inten, mu, rec, xy = make_sites()
    t, summary = analyze_sites(table(sub, inten, xy), FakeEncoding(mu, rec, np.zeros(len(sub))))
    # class 0 is the brightest, 2 the darkest: here they coincide with the sublattices
    assert (t["class_id"] == sub).mean() > 0.99
    assert summary["n_classes"] == 3
    means = summary["class_mean_intensity"]
    assert means[0] > means[1] > means[2]


def test_sublattice_aware_score_finds_what_a_per_class_score_misses():
    sub, inten, mu, rec, xy = make_sites(seed=1)
    # a substitution: an S2-sublattice site that looks exactly like Mo (intensity and latent)
    i_sub = 400
    inten[i_sub] = 1.0
    mu[i_sub] = [3.0, 0.0]
    # an empty Mo column: looks exactly like a hexagon centre
    i_vac = 10
    inten[i_vac] = 0.0
    mu[i_vac] = [-3.0, -3.0]
    # a half-occupied S2 column
    i_half = 450
    inten[i_half] = 0.2
    t, summary = analyze_sites(table(sub, inten, xy), FakeEncoding(mu, rec, np.zeros(len(sub))))
    top = np.argsort(-t["anomaly_score"])[:3]
    assert set(top.tolist()) == {i_sub, i_vac, i_half}
    assert t["is_defect"][[i_sub, i_vac, i_half]].all()
    assert t["is_defect"].sum() <= 5
    assert t["defect_kind"][i_sub] == "substitution_Mo_S"
    assert t["defect_kind"][i_vac] == "vacancy_Mo"
    assert t["defect_kind"][i_half] == "vacancy_S"
    # the per-class reconstruction ranking cannot see them (their patches look normal for their class)
    assert not set(np.argsort(-t["recon_score"])[:3].tolist()) & {i_sub, i_vac}


def test_unobserved_sites_score_zero_and_auto_k():
    sub, inten, mu, rec, xy = make_sites(seed=2)
    obs = np.ones(len(sub), bool)
    obs[:20] = False
    inten[:20] = -5.0  # faded by the scan
    t0 = table(sub, inten, xy).with_columns({"observed": obs})
    t, summary = analyze_sites(t0, FakeEncoding(mu, rec, np.zeros(len(sub))),
                               settings=AnalysisSettings(n_classes=None))
    assert (t["anomaly_score"][:20] == 0).all()
    assert summary["n_classes"] == 3 and summary["k_selection"]["criterion"] == "silhouette"


def test_settings_validation():
    with pytest.raises(ValueError):
        AnalysisSettings(score="nonsense")
    with pytest.raises(ValueError):
        AnalysisSettings(defect_cutoff=0)
