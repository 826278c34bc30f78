"""Synthetic MoS2 time series with moving defects (appear, hop, vanish) and their exact history.

The frames are rendered by :func:`stemfast.synthetic.image.make_mos2` (same lattice, background, drift and
noise model): the defect-free expected frames of a drifting series are made once, then each
frame's defects are taken out of its columns (the atoms they remove, rendered with
:func:`stemfast.synthetic.image.render_gaussians` exactly where the generator put them), and the Poisson and
read noise are drawn per frame.

Defect dynamics (per frame, after the first):

* every single-S vacancy (V_S) ends with probability ``death_prob`` (the column is refilled),
  else hops with probability ``hop_prob`` to a free neighbouring S2 column (the six S2 columns
  one S2-lattice step away);
* new V_S appear at free S2 columns (``birth_rate`` per S2 column per frame);
* double vacancies (V_S2) and Mo vacancies (V_Mo) of the first frame stay where they are.

Defects live only on columns that stay inside every frame, at least ``margin_nn`` column
spacings from the border, so each defect is in view over its whole life.

``truth`` lists every defect of every frame: ``(frame, id, x, y, sublattice, defect)`` with
``x, y`` in that frame's pixels and the codes of :mod:`stemfast.synthetic.image` (defect 1 V_S, 2 V_S2,
3 V_Mo); ``id`` follows the defect through its hops.

Examples
--------
>>> s = make_series(SeriesConfig(n_frames=3, v_s=0.1, seed=1), shape=(128, 128), pixel_size_A=0.2)
>>> s.images.shape, s.truth.shape[1]
((3, 128, 128), 6)
>>> bool((s.truth[:, 0] == 0).any()), np.unique(s.truth[:, 4]).astype(int).tolist()
(True, [1])
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .image import SynthConfig, chalcogen_atom_intensity, make_mos2, render_gaussians

__all__ = ["SeriesConfig", "SynthSeries", "make_series", "load_series_truth"]

_TRUTH_COLUMNS = ("frame", "id", "x", "y", "sublattice", "defect")


@dataclass(frozen=True)
class SeriesConfig:
    """Defect dynamics of :func:`make_series` (the image settings are a :class:`SynthConfig`).

    Attributes
    ----------
    n_frames : frames of the series.
    v_s : V_S per eligible S2 column in the first frame.
    v_s2, v_mo : static V_S2 per S2 column, V_Mo per Mo column (first frame, never move).
    hop_prob : probability per frame that a V_S hops to a free neighbouring S2 column.
    birth_rate : new V_S per free S2 column per frame.
    death_prob : probability per frame that a V_S is refilled.
    margin_nn : defects stay this many column spacings inside every frame.
    seed : random seed of the dynamics and the noise (the image seed is the SynthConfig's).
    """

    n_frames: int = 20
    v_s: float = 0.02
    v_s2: float = 0.0
    v_mo: float = 0.0
    hop_prob: float = 0.15
    birth_rate: float = 0.002
    death_prob: float = 0.03
    margin_nn: float = 2.5
    seed: int = 0

    def __post_init__(self) -> None:
        if int(self.n_frames) < 1:
            raise ValueError("n_frames must be >= 1")
        for name in ("v_s", "v_s2", "v_mo", "hop_prob", "birth_rate", "death_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v!r}")
        if self.margin_nn < 0:
            raise ValueError("margin_nn must be >= 0")


@dataclass(frozen=True, eq=False)
class SynthSeries:
    """Result of :func:`make_series`.

    Attributes
    ----------
    images : float32 ``[F, H, W]`` (counts).
    truth : float64 ``[M, 6]`` ``(frame, id, x, y, sublattice, defect)``, every defect of every frame.
    events : list of ``{"frame", "id", "event": "birth"|"hop"|"death", ...}`` (hops with the
        ``from``/``to`` positions in the first frame's px).
    drift : float64 ``[F, 2]`` content offset of each frame relative to the first (px).
    meta : JSON-able description (the SynthConfig, the SeriesConfig, ``nn_px``, ``pixel_size_A``,
        ``dose_per_frame`` in e/A^2 at a Mo column).
    """

    images: np.ndarray
    truth: np.ndarray
    events: list
    drift: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def nn_px(self) -> float:
        return float(self.meta["nn_px"])

    def frame_truth(self, k: int) -> np.ndarray:
        """Rows of ``truth`` of frame ``k``."""
        return self.truth[self.truth[:, 0] == k]

    def save(self, path: str | os.PathLike, *, truth_path: str | os.PathLike | None = None) -> tuple[Path, Path]:
        """Write the frames as a calibrated TIFF stack (JSON description with the pixel size and the
        dose per frame) and the history (default next to it: ``NAME.series.npz``; keep it out of a
        folder that ``stemfast batch`` reads, which would take it for an image). Returns both paths."""
        import tifffile

        from ..atomic import atomic_path

        path = Path(path)
        desc = {"pixel_size": self.meta["pixel_size_A"] / 10.0, "unit": "nm",
                "dose_per_frame": self.meta["dose_per_frame"], "dose_unit": "e/A^2 (Mo column peak)"}
        with atomic_path(path) as tmp:
            tifffile.imwrite(tmp, self.images.astype(np.float32), metadata=desc,
                             resolution=(10.0 / self.meta["pixel_size_A"],) * 2, resolutionunit="NONE")
        tp = Path(truth_path) if truth_path else path.with_name(path.with_suffix("").name + ".series.npz")
        with atomic_path(tp) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, truth=self.truth, drift=self.drift,
                         meta=json.dumps({**self.meta, "events": self.events}))
        return path, tp


def load_series_truth(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read a ``NAME.series.npz`` of :meth:`SynthSeries.save`: ``(truth, drift, meta)``."""
    with np.load(path, allow_pickle=False) as z:
        return np.asarray(z["truth"]), np.asarray(z["drift"]), json.loads(str(z["meta"]))


def _removed_amplitude(defect: np.ndarray) -> np.ndarray:
    """Peak intensity a defect removes from its column (relative to a Mo column)."""
    s1 = chalcogen_atom_intensity()
    return np.select([defect == 1, defect == 2, defect == 3], [s1, 2.0 * s1, 1.0], 0.0)


def _s2_neighbours(xy0: np.ndarray, s2: np.ndarray, a_px: float) -> dict[int, list[int]]:
    """For every S2 site, the S2 sites within 1.2 metal spacings: where a vacancy can hop."""
    from scipy.spatial import cKDTree

    tree = cKDTree(xy0[s2])
    nbrs = [[int(s2[j]) for j in lst if s2[j] != s2[i]] for i, lst in
            enumerate(tree.query_ball_point(xy0[s2], r=1.2 * a_px))]
    return dict(zip(s2.tolist(), nbrs))


def _first_frame_defects(rng: np.random.Generator, s2: np.ndarray, mo: np.ndarray,
                         sc: SeriesConfig) -> tuple[dict[int, tuple[int, int]], list[dict]]:
    """The defects of frame 0 (site -> (id, defect code)) and their birth events; ids 0, 1, ..."""
    state: dict[int, tuple[int, int]] = {}
    events: list[dict] = []
    for i in s2:
        u = rng.random()
        if u < sc.v_s:
            state[int(i)] = (len(events), 1)
        elif u < sc.v_s + sc.v_s2:
            state[int(i)] = (len(events), 2)
        else:
            continue
        events.append({"frame": 0, "id": len(events), "event": "birth", "defect": state[int(i)][1]})
    for i in mo:
        if rng.random() < sc.v_mo:
            state[int(i)] = (len(events), 3)
            events.append({"frame": 0, "id": len(events), "event": "birth", "defect": 3})
    return state, events


def _next_frame_defects(rng: np.random.Generator, state: dict, events: list, k: int, sc: SeriesConfig,
                        nbr_of: dict, s2: np.ndarray, xy0: np.ndarray, next_id: int) -> int:
    """Frame ``k``'s changes, in place: each single-S vacancy dies or hops to a free neighbouring S2
    column (in random order), then new ones are born on free S2 columns. Returns the next free id."""
    for site in sorted(state, key=lambda _: rng.random()):
        did, code = state[site]
        if code != 1:
            continue
        u = rng.random()
        if u < sc.death_prob:
            del state[site]
            events.append({"frame": k, "id": did, "event": "death"})
        elif u < sc.death_prob + sc.hop_prob:
            free = [j for j in nbr_of.get(site, []) if j not in state]
            if free:
                j = free[int(rng.integers(len(free)))]
                del state[site]
                state[j] = (did, 1)
                events.append({"frame": k, "id": did, "event": "hop", "from": xy0[site].round(3).tolist(),
                               "to": xy0[j].round(3).tolist()})
    free_s2 = [int(i) for i in s2 if int(i) not in state]
    nb = rng.binomial(len(free_s2), sc.birth_rate) if free_s2 else 0
    for i in rng.choice(free_s2, size=min(nb, len(free_s2)), replace=False) if nb else []:
        state[int(i)] = (next_id, 1)
        events.append({"frame": k, "id": next_id, "event": "birth", "defect": 1})
        next_id += 1
    return next_id



def make_series(series: SeriesConfig | None = None, image: SynthConfig | None = None, **overrides) -> SynthSeries:
    """A drifting MoS2 series with hopping, appearing and vanishing vacancies (module docstring).

    Parameters
    ----------
    series : the defect dynamics (:class:`SeriesConfig`).
    image : image settings (:class:`SynthConfig`); its ``rates`` and ``n_frames`` are ignored
        (the series sets them). ``overrides`` replace SynthConfig fields
        (``shape=(192, 192)``, ``drift_px_per_frame=(0.25, 0.17)``).
    """
    sc = series or SeriesConfig()
    if not isinstance(sc, SeriesConfig):
        raise TypeError(f"series must be a SeriesConfig, got {type(sc).__name__}")
    base = image or SynthConfig()
    F = int(sc.n_frames)
    clean = make_mos2(base, **{**overrides, "rates": (0.0, 0.0, 0.0, 0.0), "n_frames": F, "noise": False})
    cfg = SynthConfig(**{**asdict(base), **overrides, "rates": (0.0, 0.0, 0.0, 0.0), "n_frames": F})
    expected = clean.image if F > 1 else clean.image[None]
    drift = np.asarray(clean.drift, np.float64).reshape(F, 2)
    H, W = cfg.shape
    nn = cfg.nn_px
    sig = cfg.sigma_px
    rng = np.random.default_rng(np.random.SeedSequence([int(sc.seed), 7919]))
    t0 = (clean.truth_frames[0] if F > 1 else clean.truth)
    xy0 = t0[:, :2] - drift[0]
    sub = t0[:, 2].astype(np.int64)
    # columns in view in every frame, margin_nn inside
    m = sc.margin_nn * nn
    lo = np.array([m, m]) - drift.min(0)
    hi = np.array([W - 1 - m, H - 1 - m]) - drift.max(0)
    inside = np.all((xy0 >= lo) & (xy0 <= hi), axis=1)
    s2 = np.flatnonzero(inside & (sub == 1))
    mo = np.flatnonzero(inside & (sub == 0))
    nbr_of = _s2_neighbours(xy0, s2, math.sqrt(3.0) * nn)
    state, events = _first_frame_defects(rng, s2, mo, sc)
    next_id = len(events)

    read_sd = cfg.gaussian_noise / 100.0 * cfg.dose
    noise_rngs = [np.random.default_rng(s) for s in np.random.SeedSequence([int(sc.seed), 104729]).spawn(F)]
    images = np.empty((F, H, W), np.float32)
    rows = []
    for k in range(F):
        if k > 0:
            next_id = _next_frame_defects(rng, state, events, k, sc, nbr_of, s2, xy0, next_id)
        sites = np.array(sorted(state), dtype=np.int64)
        exp_k = expected[k].astype(np.float32, copy=True)
        if len(sites):
            codes = np.array([state[int(i)][1] for i in sites])
            ids = np.array([state[int(i)][0] for i in sites])
            pos = xy0[sites] + drift[k]
            removal = render_gaussians((H, W), pos, _removed_amplitude(codes) * cfg.dose, sig)
            exp_k -= removal
            np.maximum(exp_k, 0.0, out=exp_k)
            rows.append(np.c_[np.full(len(sites), k), ids, pos, sub[sites], codes])
        r = noise_rngs[k]
        if cfg.noise:
            img = r.poisson(exp_k).astype(np.float32)
            if read_sd > 0:
                img += r.standard_normal(img.shape, dtype=np.float32) * np.float32(read_sd)
        else:
            img = exp_k
        images[k] = img
    truth = np.concatenate(rows).astype(np.float64) if rows else np.zeros((0, 6))
    meta = {"nn_px": float(nn), "pixel_size_A": float(cfg.pixel_size_A), "sigma_px": float(sig),
            "dose_per_frame": float(cfg.dose / cfg.pixel_size_A ** 2), "n_frames": F,
            "truth_columns": list(_TRUTH_COLUMNS), "series": asdict(sc), "image": cfg.to_dict(),
            "n_defects": int(next_id),
            "n_hops": sum(1 for e in events if e["event"] == "hop"),
            "n_births": sum(1 for e in events if e["event"] == "birth" and e["frame"] > 0),
            "n_deaths": sum(1 for e in events if e["event"] == "death")}
    return SynthSeries(images=images, truth=truth, events=events, drift=drift, meta=meta)
