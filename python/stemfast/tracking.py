"""Defects through time: follow every defect of a series from frame to frame (appear, hop, vanish).

The defect sites of each frame (``is_defect``) are linked to the tracks of the frames before, in
the **drift-corrected frame of the first image with sites** (the drift that the batch measures by
phase correlation between frames with a lattice is summed and subtracted; see *Drift* below), and in
**lattice coordinates**: the displacement
between a track's last site and a candidate site is read in the local lattice basis of the two
sites (``a1, a2`` of the site table, rows a1, a2 of the site lattice: metal, chalcogen and hollow
sites together), rounded to the nearest lattice node, and counted in steps of the defect's own
sublattice (a sulfur vacancy hopping to a neighbouring S2 column moves one step). Because the
displacement is read locally, strain and slow lattice rotation across the field do not bend the
node arithmetic. Every detection also gets an absolute node ``(i, j)`` relative to a reference
origin fixed in the first frame with a lattice (the site nearest the image centre) and carried through
the series by the drift; when the site table has lattice node columns (``lattice_i, lattice_j``,
:data:`LATTICE_NODE_CONVENTION`: one origin and one naming of the lattice vectors per frame) they
are used, mapped onto the reference's naming and origin by one integer matrix and offset per frame
(:func:`node_map`; checked: if no map explains 90 % of the sites near the origin, the nodes come
from the positions, with a warning and ``lattice_index_columns.frames_rejected`` in the summary).

Linking, frame by frame
-----------------------
* Candidates: a track last seen ``g`` frames ago (``1 <= g <= max_gap + 1``) and a detection of
  a compatible sublattice (equal, or one of them unknown) at most ``max_hop * g`` sublattice
  steps away.
* Cost (in lattice steps): ``steps + off-node residual (in site spacings) + gap_penalty * (g - 1)
  + kind_penalty * (kinds differ) + weak_penalty * (site below the cutoff)``, plus ``max_hop +
  weak_penalty`` for a run of sites below the cutoff that is not yet a track (not for one of the
  faintest sites keeping the run on its node): a flagged site one hop from a track goes to that
  track, not to a tentative run sitting on its node.
* One optimal one-to-one assignment (:func:`scipy.optimize.linear_sum_assignment`, per connected
  group of candidates): two defects are never merged into one track, and a defect that stays
  beats a neighbour's hop onto its node. Every site a track can reach is linked (as many links as
  possible), except the faintest ones (below ``continue_fraction`` of the cutoff, which may only
  keep a track or a run on its node) and those far fainter than the track (``min_score_ratio``):
  the assignment may leave such a site to the noise (cost
  ``weak_penalty``) and the track unseen in this frame (cost ``gap_penalty``; such a site after a
  gap is therefore left to the noise) when that is the
  cheaper explanation -- e.g. a defect that hops to a flagged site while the column it left still
  scores faintly keeps its id instead of staying on the faint column (the flagged site a new id).
* Score continuity: a site below the cutoff scoring under ``min_score_ratio`` of the recent score of
  a track that reaches it may be left to the noise, like the faintest sites (the column a vacancy
  just left, still faintly lit, does not keep the vacancy's track from its flagged new site); a site
  below ``continue_fraction`` may keep a run below the cutoff on its node (a faint vacancy's run
  before its first flag does not break at one fainter frame); a run already judged too faint that
  moves to another faint site starts afresh there.
* Detections left over start new tracks (births); tracks not seen for more than ``max_gap``
  frames end (deaths).

Drift
-----
A frame without sites (blank, noise, unreadable, failed) places nothing and has no drift: the batch
never registers a frame without a lattice, and measures the next frame with one from the last frame
with one (the drift accumulated over the gap, ``drift_gaps`` in the summary), so a track missed there
is bridged like any missed frame (``max_gap``). A frame with sites whose drift from the last placed
frame is unknown (nothing to register in common, a failed measure) is a **drift break**: linking
across it would be guesswork, so every open track ends there, and the positions from that frame on
are in its own drift-corrected frame, with a reference of its own (a new *segment*: ``segments`` in
the summary, ``coords_frame`` in ``tracks.csv``). Before the first frame with sites there is nothing
to break.

Streaming
---------
Only the active tracks and the frame tables of the last :attr:`TrackSettings.delay` frames are
held (``max((min_frames - 1) * (max_gap + 1), weak_frames - 1, hold_frames)``, 10 by default): a
track gets its public id when it has been seen in ``min_frames`` frames (a run below the cutoff:
when its mean score is high enough), so a frame's table is written (``track_id`` = the public id,
-1 for sites that are not defects or whose track was never confirmed) once the window has passed
it; a track confirmed later than that window keeps -1 in its earliest frames' rows (its
``first_frame`` in ``tracks.csv`` is still the first frame it was seen).
Finished tracks are written to ``tracks.csv`` as they end; per frame only the defect counts by
kind are kept (for the figure). Memory therefore does not grow with the number of frames.

Outputs of a stack (:func:`stemfast.batch`): ``track_id`` in ``sites.csv``, ``tracks.csv`` (one
row per track, :data:`TRACK_COLUMNS`), ``tracks.png`` and a section of ``report.html``.

Examples
--------
>>> import numpy as np
>>> from stemfast.table import SiteTable
>>> b = np.array([[10.0, 0.0], [5.0, 8.660254]])        # rows a1, a2 (px)
>>> def frame(x, y, kind="vacancy_S"):
...     n = len(x)
...     return SiteTable({"x": np.array(x, float), "y": np.array(y, float), "is_defect": np.ones(n, bool),
...                       "defect_kind": np.array([kind] * n), "sublattice": np.ones(n, np.int64),
...                       "a1x": np.full(n, b[0, 0]), "a1y": np.full(n, b[0, 1]),
...                       "a2x": np.full(n, b[1, 0]), "a2y": np.full(n, b[1, 1])})
>>> lk = DefectLinker(TrackSettings())
>>> out = []
>>> out += lk.push(0, frame([50.0], [50.0]), drift=None)
>>> out += lk.push(1, frame([50.1], [49.9]), drift=(0.0, 0.0))          # stays
>>> out += lk.push(2, frame([65.0], [58.66]), drift=(0.0, 0.0))         # hops by a1 + a2 (one S2 step)
>>> out += lk.finish()
>>> [int(t["track_id"][0]) for _, t in out], lk.tracks_rows[0]["hops"]
([0, 0, 0], 1)
"""
from __future__ import annotations

import csv
import json
import logging
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from .scanlines import lattice_positions
from .table import SiteTable

__all__ = [
    "TrackSettings",
    "DefectLinker",
    "TRACK_COLUMNS",
    "TRACK_FILES",
    "lattice_offset",
    "node_map",
    "LATTICE_NODE_CONVENTION",
    "sublattice_steps",
    "dose_from_metadata",
    "plot_tracks",
    "link_tables",
    "StackTracker",
    "TrackCsv",
    "tracks_html",
]

log = logging.getLogger(__name__)

#: Columns of ``tracks.csv``. Positions are px in the drift-corrected frame of image ``coords_frame``
#: (x = column, y = row): the first frame with sites, or after a drift break the first frame after it
#: (the drift across a break is unknown; every track ends there); nodes are integer site-lattice indices
#: ``(i, j)`` (``i a1 + j a2`` from the reference origin of that stretch of frames); ``hops`` counts node
#: changes, ``path_steps`` their length in steps of the defect's sublattice, ``net_steps`` the distance
#: from the first to the last node.
TRACK_COLUMNS = ("track_id", "kind", "sublattice", "first_frame", "last_frame", "n_frames", "span_frames",
                 "hops", "path_steps", "net_steps", "path_px", "path_nm", "start_x", "start_y", "end_x", "end_y",
                 "start_i", "start_j", "end_i", "end_j", "mean_score", "end", "coords_frame")

_SQRT3 = math.sqrt(3.0)

#: Files a stack's results gain (in ``OUT/<name>/``, next to :data:`stemfast.batch.OUTPUT_FILES`).
TRACK_FILES = ("tracks.csv", "tracks.png")

#: ``kind`` of a track none of whose sites was flagged (started by :attr:`TrackSettings.weak_frames`).
BELOW_CUTOFF = "below_cutoff"

#: Detections of a track whose scores set the level :attr:`TrackSettings.min_score_ratio` compares with.
_RECENT_SCORES = 3

#: Assignment cost of leaving a site unexplained that must be linked when a track reaches it (above
#: every link's cost, below the cost of a forbidden pair).
_FORCED = 1e3


def align_bases(B: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """The same lattice vectors, picked to point like ``ref``'s: [N, 2, 2] -> [N, 2, 2].

    A site's local fit may name its triangular lattice by any pair of first-shell vectors (``-a1``
    instead of ``a1``, ``a1 + a2`` instead of ``a2``, ...); node arithmetic across sites and frames
    needs one naming. Each output row is the first-shell vector (of ``+-a1, +-a2, +-(a1 + a2),
    +-(a1 - a2)``, the six shortest) closest in direction to ``ref``'s row. Non-finite rows stay.

    Examples
    --------
    >>> ref = np.array([[10.0, 0.0], [5.0, 8.66]])
    >>> align_bases(np.array([[[-10.0, 0.0], [5.0, -8.66]]]), ref)[0].round(2).tolist() == ref.tolist()
    True
    """
    B = np.asarray(B, np.float64)
    a1, a2 = B[:, 0], B[:, 1]
    cand = np.stack([a1, a2, a1 + a2, a1 - a2], axis=1)
    cand = np.concatenate([cand, -cand], axis=1)  # [N, 8, 2]
    length = np.hypot(cand[..., 0], cand[..., 1])
    shell = np.argsort(length, axis=1)[:, :6]  # the two longest of +-(a1 +- a2) are second shell
    cand = np.take_along_axis(cand, shell[..., None], axis=1)
    unit = cand / np.maximum(np.hypot(cand[..., 0], cand[..., 1]), 1e-12)[..., None]
    out = B.copy()
    for r in range(2):
        pick = np.argmax(unit @ (ref[r] / np.hypot(*ref[r])), axis=1)
        out[:, r] = cand[np.arange(len(B)), pick]
    bad = ~np.isfinite(B).all(axis=(1, 2))
    out[bad] = B[bad]
    return out


@dataclass(frozen=True)
class TrackSettings:
    """Settings of the defect linking (``[tracking]`` in ``stemfast.toml``).

    Attributes
    ----------
    enabled : link the defects of stacks (time series); single images are never linked.
    max_hop : largest move of a defect between consecutive frames, in steps of its sublattice
        (1: a defect may move to a neighbouring node of its sublattice, e.g. a sulfur vacancy to
        a neighbouring S2 column).
    max_gap : missed frames bridged (a defect not detected in up to this many frames keeps its id).
    min_frames : a track is reported (gets a ``track_id`` >= 0, a row in ``tracks.csv``) when its
        defect was seen in at least this many frames; defects seen once are counted, not tracked.
    gap_penalty : cost (lattice steps) per missed frame bridged, and of a track unseen in a frame.
        Above one hop (``1``): a defect is missed in a frame more rarely than it hops (a vacancy
        scores >= ``continue_fraction`` of the cutoff in ~99 % of frames, it hops with p ~ 0.15 on
        the synthetic series), so a neighbour that hops beats a track revived after a missed frame
        (the track of a defect that just vanished taking a hopping neighbour's new site). At 0.5
        (before) the revival was the cheaper explanation; 1.5, 2 and 3 link seeds 0-49 of
        ``benchmarks/track_eval.py`` identically (1 ties with a hop).
    kind_penalty : cost (lattice steps) of linking two detections of different ``defect_kind``.
    cutoff : the score scale (``anomaly_score`` units) of the fractions below. Tracks start from the
        flagged sites (``is_defect``: the analysis' ``defect_cutoff``, 4); the hysteresis below was
        tuned at 5 and is kept there when the single-image cutoff moves, so that a normal column
        scoring 2-3 in frame after frame neither continues nor starts a track (on the synthetic
        series of ``benchmarks/track_eval.py``, fractions of 4 raised the false tracks of seed 3
        from 0.04 to 0.19).
    continue_fraction : hysteresis in time: a site that is not flagged (``is_defect`` False) but
        scores at least this fraction of ``cutoff`` may continue a track
        that can reach it (alone it starts none, see ``weak_frames``) -- a defect at the cutoff's edge is not cut
        into pieces by the noise. ``1`` switches this off. Such sites carry the track id in
        ``sites.csv`` with ``is_defect`` unchanged; their number is in the summary (``n_weak_links``).
    weak_frames : a site below the cutoff (but at least ``continue_fraction * cutoff``),
        away from the image border (``edge`` False, ``observed`` True: the border's sites are
        less certain), followed over this many frames at that score (no gap; fainter frames on
        the run's own node, see ``stay_fraction``, bridge the run but do not count) starts a track too (kind
        ``below_cutoff`` until a flagged detection names it) when the mean score of its sites
        reaches ``weak_mean_fraction * cutoff``. The frames are not independent evidence: a
        site's score is mostly fixed by the image content around it (frame-to-frame correlation of
        the scores of normal sites 0.73-0.95 on the synthetic series of ``benchmarks/track_eval.py``),
        so a normal column that scores 3-4 does so in most frames; such runs are counted
        (``n_weak_runs_unreported`` of the summary), not tracked; such a run, judged too faint over
        ``2 * weak_frames`` frames at that score, that moves to another site below the cutoff starts
        afresh there (its long history on a normal column would otherwise dilute the mean of a faint
        defect born next to it). 0: only flagged
        sites start tracks.
    weak_mean_fraction : the mean score (in units of ``cutoff``) a run of sites below the
        cutoff must reach to become a track (see ``weak_frames``).
    stay_fraction : a site scoring at least this fraction of ``cutoff`` (but below
        ``continue_fraction``) continues a track or a run below the cutoff **on the track's own
        node** (no hop): the likeliest place of a defect is where it was, so there the faintest
        evidence suffices; a faint vacancy scoring 3.5, 2.9, 3.7 before its first flag stays one
        run (its frames before the flag get its id) instead of breaking at the 2.9. Such frames
        do not count towards ``weak_frames``. Set it >= ``continue_fraction`` to switch off.
    hold_frames : frames a table is held back at least, so that the id of a track confirmed late
        (a run below the cutoff whose mean reaches ``weak_mean_fraction`` only after some frames)
        still reaches its earlier frames; memory grows with this number, not with the series.
    weak_penalty : cost (lattice steps) of a link to a site below the cutoff (a flagged site wins),
        and of leaving one of the faintest sites (below ``continue_fraction``) unexplained.
    min_score_ratio : a site below the cutoff scoring less than this fraction of the recent score
        of a track that reaches it (median of the track's last three scores) need not be linked:
        the assignment may leave it to the noise (cost ``weak_penalty``) like the faintest sites.
        A defect's score does not collapse from one frame to the next (on the synthetic series of
        ``benchmarks/track_eval.py``, seeds 0-8, a true defect's next score is >= 0.46 of that
        median in all of 2,675 links, stays and hops), but the column a vacancy has just left can
        still score 3 while the vacancy scored 7-10: the track then hops to the vacancy's flagged
        new site instead of staying on the vacated column (a lone faint frame still keeps its
        track, as before). 0 switches it off.
    """

    enabled: bool = True
    max_hop: float = 1.0
    max_gap: int = 2
    min_frames: int = 2
    gap_penalty: float = 1.5
    kind_penalty: float = 0.5
    cutoff: float = 5.0
    continue_fraction: float = 0.6
    weak_frames: int = 3
    weak_mean_fraction: float = 0.7
    stay_fraction: float = 0.5
    hold_frames: int = 10
    weak_penalty: float = 0.5
    min_score_ratio: float = 0.4

    def __post_init__(self) -> None:
        if not (np.isfinite(self.max_hop) and self.max_hop >= 0):
            raise ValueError(f"max_hop must be >= 0 lattice steps, got {self.max_hop!r}")
        if int(self.max_gap) < 0:
            raise ValueError(f"max_gap must be >= 0, got {self.max_gap!r}")
        if int(self.weak_frames) < 0:
            raise ValueError(f"weak_frames must be >= 0, got {self.weak_frames!r}")
        if int(self.hold_frames) < 0:
            raise ValueError(f"hold_frames must be >= 0, got {self.hold_frames!r}")
        if int(self.min_frames) < 1:
            raise ValueError(f"min_frames must be >= 1, got {self.min_frames!r}")
        for name in ("continue_fraction", "weak_mean_fraction", "stay_fraction"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {v!r}")
        if not (np.isfinite(self.cutoff) and self.cutoff > 0):
            raise ValueError(f"cutoff must be > 0, got {self.cutoff!r}")
        if not 0.0 <= self.min_score_ratio < 1.0:
            raise ValueError(f"min_score_ratio must be in [0, 1), got {self.min_score_ratio!r}")
        for name in ("gap_penalty", "kind_penalty", "weak_penalty"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be >= 0, got {v!r}")

    @property
    def delay(self) -> int:
        """Frames a table is held back until the ids of its defects are final."""
        return max((int(self.min_frames) - 1) * (int(self.max_gap) + 1), int(self.weak_frames) - 1,
                   int(self.hold_frames))


# ----------------------------------------------------------------------------- lattice arithmetic


def lattice_offset(d: np.ndarray, basis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest site-lattice node offset ``(i, j)`` of displacements ``d`` [N, 2] and the residual (px).

    ``basis`` is [N, 2, 2] or [2, 2] with rows ``a1, a2``; ``d ~ i a1 + j a2``.

    Examples
    --------
    >>> b = np.array([[10.0, 0.0], [5.0, 8.660254]])
    >>> n, r = lattice_offset(np.array([[15.2, 8.66]]), b)
    >>> n.tolist(), round(float(r[0]), 2)
    ([[1, 1]], 0.2)
    """
    d = np.asarray(d, np.float64).reshape(-1, 2)
    B = np.asarray(basis, np.float64)
    if B.ndim == 2:
        f = d @ np.linalg.inv(B)
        n = np.floor(f + 0.5).astype(np.int64)
        r = d - n @ B
    else:
        f = np.einsum("ni,nij->nj", d, np.linalg.inv(B))
        n = np.floor(f + 0.5).astype(np.int64)
        r = d - np.einsum("ni,nij->nj", n.astype(np.float64), B)
    return n, np.hypot(r[:, 0], r[:, 1])


def sublattice_steps(n: np.ndarray) -> np.ndarray:
    """Length of site-lattice offsets ``n`` [N, 2] in steps of one sublattice (float).

    The site lattice (``a2`` = ``a1`` turned by 60 degrees) holds three sublattices; offsets
    between two nodes of the same sublattice have ``(i - j) % 3 == 0`` and are integer
    combinations of ``b1 = a1 + a2`` and ``b2 = 2 a2 - a1`` (the sublattice's own vectors, one
    step each); their hexagonal distance is returned. Offsets between different sublattices
    get their length in units of the sublattice spacing (``|n| / sqrt(3)`` site spacings).

    Examples
    --------
    >>> sublattice_steps(np.array([[0, 0], [1, 1], [2, -1], [2, 2], [3, 0], [1, 0]])).round(3).tolist()
    [0.0, 1.0, 1.0, 2.0, 2.0, 0.577]
    """
    n = np.asarray(n, np.int64).reshape(-1, 2)
    i, j = n[:, 0], n[:, 1]
    same = (i - j) % 3 == 0
    v = (j - i) // 3
    u = i + v
    hexd = (np.abs(u) + np.abs(v) + np.abs(u + v)) / 2.0
    eu = np.sqrt(i ** 2 + j ** 2 + i * j) / _SQRT3  # |i a1 + j a2| / (sqrt(3) |a|) for a 60-degree basis
    return np.where(same, hexd, eu).astype(np.float64)


#: How a site table names its lattice nodes (the columns ``lattice_i, lattice_j`` of
#: :func:`stemfast.find_sites`, written by :func:`stemfast.sitelattice.index_sites`): within one
#: table, ``(x, y) ~ origin + i a1 + j a2`` with ``a1, a2`` the site's own ``a1x, a1y, a2x, a2y``
#: (site-lattice vectors 60 degrees apart; the three sublattices are ``(i - j) mod 3``). Across
#: tables (frames) neither the origin nor the pair of vectors is fixed: another frame may name its
#: lattice with ``-a1, -a2`` or any other pair of first-shell vectors, from another origin.
#: :class:`DefectLinker` maps every frame onto the first frame's naming (:func:`node_map`).
LATTICE_NODE_CONVENTION = "per table: (x, y) ~ origin + lattice_i a1 + lattice_j a2; origin and naming per table"

# the 2 x 2 integer matrices of determinant +-1 with entries in {-1, 0, 1}: every renaming of a
# lattice's basis by first-shell vectors (the 12 symmetries of the triangular lattice among them)
_UNIMODULAR = np.array([m for m in (np.array(v).reshape(2, 2) for v in np.ndindex(3, 3, 3, 3))
                        if abs(round(np.linalg.det(m - 1))) == 1], dtype=np.int64) - 1


def node_map(ij: np.ndarray, ref_ij: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """The renaming of lattice nodes ``ij`` [N, 2] that best explains ``ref_ij`` [N, 2].

    Returns ``(M, offset, share)``: ``ref_ij ~ ij @ M + offset`` for ``M`` an integer 2 x 2 matrix
    of determinant +-1 (entries -1, 0, 1: one naming of a lattice by first-shell vectors turned
    into another) and ``share`` the fraction of rows it maps exactly.

    Examples
    --------
    >>> ij = np.array([[0, 0], [1, 0], [0, 1], [2, -1], [3, 3]])
    >>> M, off, share = node_map(ij, -ij + np.array([5, 7]))     # the other frame names a1 as -a1
    >>> M.tolist(), off.tolist(), share
    ([[-1, 0], [0, -1]], [5, 7], 1.0)
    """
    ij = np.asarray(ij, np.int64).reshape(-1, 2)
    ref = np.asarray(ref_ij, np.int64).reshape(-1, 2)
    if len(ij) != len(ref):
        raise ValueError(f"ij and ref_ij differ in length ({len(ij)} vs {len(ref)})")
    best = (np.eye(2, dtype=np.int64), np.zeros(2, np.int64), 0.0)
    if not len(ij):
        return best
    for M in _UNIMODULAR:
        off = ref - ij @ M
        vals, cnt = np.unique(off, axis=0, return_counts=True)
        k = int(np.argmax(cnt))
        share = float(cnt[k]) / len(ij)
        if share > best[2]:
            best = (M.copy(), vals[k].copy(), share)
    return best


# ----------------------------------------------------------------------------- metadata


_DOSE_KEYS = ("dose", "electron_dose", "dose_per_frame", "dose_e_per_a2_per_frame", "dose_rate")


def dose_from_metadata(meta: Mapping | None) -> dict | None:
    """A per-frame electron dose named in a file's metadata, or None.

    Looks (recursively, also inside a JSON ``description``) for a numeric key whose name contains
    ``dose``; a key naming a frame (``dose_per_frame``) is taken per frame, any other (``dose``)
    as the dose of the whole series when ``n_frames`` is known to the caller. Returns
    ``{"value": float, "key": str, "per_frame": bool, "unit": str | None}`` (the unit from a
    sibling key ``dose_unit`` when there is one).

    Examples
    --------
    >>> dose_from_metadata({"description": '{"dose_per_frame": 2.5, "dose_unit": "e/A^2"}'})["value"]
    2.5
    >>> dose_from_metadata({"pixel_size": 0.1}) is None
    True
    """
    if not isinstance(meta, Mapping):
        return None
    found: list[tuple[int, dict]] = []

    def walk(d: Mapping, depth: int) -> None:
        if depth > 4:
            return
        unit = None
        for k, v in d.items():
            if isinstance(k, str) and k.lower() in ("dose_unit", "dose_units"):
                unit = str(v)
        for k, v in d.items():
            if isinstance(v, Mapping):
                walk(v, depth + 1)
            elif isinstance(v, str) and k == "description" and v.lstrip().startswith("{"):
                try:
                    dd = json.loads(v)
                except ValueError:
                    continue
                if isinstance(dd, Mapping):
                    walk(dd, depth + 1)
            elif isinstance(k, str) and "dose" in k.lower() and "unit" not in k.lower():
                try:
                    val = float(v)
                except (TypeError, ValueError):
                    continue
                if math.isfinite(val) and val > 0:
                    per_frame = "frame" in k.lower()
                    found.append((0 if per_frame else 1, {"value": val, "key": k, "per_frame": per_frame,
                                                          "unit": unit}))

    walk(meta, 0)
    if not found:
        return None
    found.sort(key=lambda t: t[0])
    return found[0][1]


# ----------------------------------------------------------------------------- the linker


@dataclass
class _Detections:
    """One frame's sites to link (rows of its table) and what the linker needs of them."""

    rows: np.ndarray
    weak: np.ndarray
    can_start: np.ndarray
    kinds: np.ndarray
    subs: np.ndarray
    score: np.ndarray
    B: np.ndarray
    xy: np.ndarray
    nodes: np.ndarray
    cont_thr: float


@dataclass(eq=False)
class _Track:
    key: int
    first_frame: int
    last_frame: int
    xy: np.ndarray  # last position (drift-corrected px)
    basis: np.ndarray  # last local basis [2, 2]
    node: np.ndarray  # absolute node (i, j)
    start_xy: np.ndarray
    start_node: np.ndarray
    sublattice: int
    coords_frame: int = 0  # the frame whose drift-corrected pixels xy, start_xy and points are in
    kinds: Counter = field(default_factory=Counter)
    subs: Counter = field(default_factory=Counter)
    n_seen: int = 1
    n_strong: int = 0  # detections above the cutoff (0: tentative, from sites below it)
    n_cont: int = 0  # detections at or above continue_fraction of the cutoff (flagged ones included)
    hops: int = 0
    path_steps: float = 0.0
    path_px: float = 0.0
    score_sum: float = 0.0
    recent: list = field(default_factory=list)  # scores of the last RECENT_SCORES detections
    public_id: int = -1
    points: list = field(default_factory=list)  # corrected positions at the start and after each hop


class DefectLinker:
    """Streaming linker of the defects of a series; see the module docstring.

    Call :meth:`push` with every frame's site table in frame order (``None`` for a frame that
    failed), then :meth:`finish`. Both return the ``(frame, table)`` pairs whose ``track_id`` is
    final, in frame order (tables are held back by :attr:`TrackSettings.delay` frames). Finished
    tracks go to ``on_track`` (a dict per track, :data:`TRACK_COLUMNS`), or are collected in
    :attr:`tracks_rows` when no callback is given.

    Parameters
    ----------
    settings : :class:`TrackSettings`.
    nm_per_px : pixel size in nm (adds ``path_nm``), or None.
    centre : (x, y) of the image centre in the first frame (picks the reference origin's site);
        default: the centre of the first table's sites.
    on_track : called with each finished track's row.
    max_points : map points (start and hop positions) kept for :func:`plot_tracks`, in all.
    cutoff : the score scale of the hysteresis (``anomaly_score`` units; :class:`TrackSettings`
        ``cutoff``): with it, sites scoring at least ``continue_fraction * cutoff`` may continue
        tracks. None: flagged sites only.
    """

    def __init__(self, settings: TrackSettings | None = None, *, nm_per_px: float | None = None,
                 centre: tuple[float, float] | None = None, on_track: Callable[[dict], None] | None = None,
                 max_points: int = 200_000, cutoff: float | None = None) -> None:
        self.s = settings or TrackSettings()
        self.cutoff = float(cutoff) if cutoff else None
        self.n_weak = 0
        self.n_tentative_dropped = 0
        self.n_weak_runs_unreported = 0
        self.nm_per_px = float(nm_per_px) if nm_per_px else None
        self.centre = None if centre is None else np.asarray(centre, np.float64)
        self.on_track = on_track
        self.tracks_rows: list[dict] = []
        self.active: list[_Track] = []
        self._buf: list[tuple[int, SiteTable | None, np.ndarray, list, int]] = []
        self._next_key = 0
        self._next_id = 0
        self.cum = np.zeros(2)  # content displacement of the last placed frame relative to coords_frame
        self._known_frame: int | None = None  # the last frame whose displacement (cum) is known
        self.coords_frame: int | None = None  # the frame whose drift-corrected pixels the positions are in
        self.placed = False  # whether the last frame pushed had sites
        self.segments: list[dict] = []  # per stretch between drift breaks: its first frame and its reference
        self.drift_gaps: list[list[int]] = []  # [from, to]: drift measured across frames without sites
        self.origin: np.ndarray | None = None
        self.origin_basis: np.ndarray | None = None
        self.spacing_px: float | None = None
        self.last_frame: int | None = None
        self.frames: list[int] = []
        self.counts: list[dict] = []  # per frame: defect counts by kind
        self.n_active: list[int] = []
        self.drift_breaks: list[int] = []
        self.index_frames = 0  # frames whose lattice node columns were used
        self.index_rejected = 0
        self.n_detections = 0
        self.n_linked = 0
        self.n_unconfirmed = 0
        self.n_tracks = 0
        self.n_hops = 0
        self.n_hopping = 0
        self.sum_frames = 0
        # (kind, id, points [k, 2], coords_frame) for the figure
        self.map_tracks: list[tuple[str, int, np.ndarray, int]] = []
        self._map_points = 0
        self.max_points = int(max_points)
        self.map_truncated = False
        self.residuals: list[float] = []  # off-node residuals of links of the last frame (px)
        self.residual_median: list[float] = []

    # -- public -----------------------------------------------------------------------------
    def push(self, frame: int, table: SiteTable | None, *, drift: Sequence[float] | None,
             drift_from: int | None = None) -> list:
        """Link the defects of ``table`` (frame ``frame``); ``drift`` = its (dx, dy) from frame
        ``drift_from`` (default: the previous frame), None when unknown.

        The drift of a frame with sites must be measured from the last frame whose position is known
        (a frame with sites, or one without whose own drift was given): frames without sites in
        between are skipped over (:meth:`_place`). Returns the ``(frame, table with track_id)`` pairs
        that are final now.
        """
        frame = int(frame)
        self.placed = table is not None and len(table) > 0
        self._place(frame, drift, frame - 1 if drift_from is None else int(drift_from), self.placed)
        self.last_frame = frame
        det_rows = np.zeros(0, np.int64)
        det_tracks: list = []
        counts: dict[str, int] = {}
        if table is not None and len(table) and "is_defect" in table:
            det_rows, det_tracks, counts = self._link(frame, table)
        else:
            self._expire(frame)
        self.frames.append(frame)
        self.counts.append(counts)
        self.n_active.append(0)  # tracked defects of the frame: known when its table is released
        self._buf.append((frame, table, det_rows, det_tracks, len(self.frames) - 1))
        return self._release(frame - self.s.delay)

    def _place(self, frame: int, drift, src: int, content: bool) -> None:
        """The content displacement of frame ``frame`` (:attr:`cum`) from its ``drift`` measured from
        frame ``src``. It is known when ``src`` is the last frame whose displacement is known. A frame
        with sites whose displacement is unknown is a drift break once a reference exists (every open
        track ends there; the positions from there on are in the frame of this one: a new segment,
        :attr:`segments`); before any reference it starts the coordinates afresh, nothing to say. A
        frame without sites and without a drift leaves the known frame where it was."""
        known = drift is not None and bool(np.all(np.isfinite(np.asarray(drift, float))))
        if known and self._known_frame is not None and src == self._known_frame:
            self.cum = self.cum + np.asarray(drift, np.float64)[:2]
            self._known_frame = frame
            if content and src != frame - 1:
                self.drift_gaps.append([int(src), frame])
            return
        if not content:
            return
        if known and self._known_frame is not None:
            log.warning("frame %d: drift given from frame %d, but the last frame placed is %d: not used",
                        frame, src, self._known_frame)
        if self.origin is not None:
            if self.active:
                log.warning("frame %d: drift from frame %d unknown: %d tracks ended there; positions from here "
                            "on are in this frame's coordinates", frame, self._known_frame, len(self.active))
            self.drift_breaks.append(frame)
            for t in list(self.active):
                self._end(t, "drift break")
            self.active = []
        self._new_segment(frame)

    def _new_segment(self, frame: int) -> None:
        """Positions from frame ``frame`` on are in its drift-corrected frame, with a reference of their own."""
        self.cum = np.zeros(2)
        self._known_frame = frame
        self.coords_frame = frame
        self.origin = self.origin_basis = None
        self.segments.append({"first_frame": frame, "frame": None, "origin_xy": None, "basis_px": None})

    def finish(self) -> list:
        """End every track; returns the tables still held back (frame order)."""
        for t in list(self.active):
            self._end(t, "last frame")
        self.active = []
        return self._release(None)

    def summary(self) -> dict:
        """JSON-able account of the linking (counts, settings, reference lattice, drift breaks)."""
        seen = sum(1 for c in self.counts if c)
        return {
            "n_tracks": int(self.n_tracks),
            "n_tracks_hopping": int(self.n_hopping),
            "n_hops": int(self.n_hops),
            "mean_frames": float(self.sum_frames / self.n_tracks) if self.n_tracks else None,
            "n_detections": int(self.n_detections),
            "n_linked": int(self.n_linked),
            "n_weak_links": int(self.n_weak),
            "n_tentative_dropped": int(self.n_tentative_dropped),
            "n_weak_runs_unreported": int(self.n_weak_runs_unreported),
            "weak_score": (self.s.continue_fraction * self.cutoff) if self.cutoff else None,
            "n_unconfirmed": int(self.n_unconfirmed),
            "frames_with_defects": int(seen),
            "settings": asdict(self.s),
            "reference": self._reference_summary(),
            "segments": [dict(s) for s in self.segments],
            "lattice_index_columns": {"frames_used": int(self.index_frames),
                                      "frames_rejected": int(self.index_rejected)},
            "drift_breaks": list(self.drift_breaks),
            "drift_gaps": [list(g) for g in self.drift_gaps],
            "link_residual_px_median": (float(np.median(self.residual_median))
                                        if self.residual_median else None),
        }

    # -- internals --------------------------------------------------------------------------
    def _reference_summary(self) -> dict:
        """The first segment's reference: origin, basis and the frame it was taken from (its positions'
        frame is the segment's ``first_frame``); None values before any."""
        seg = next((s for s in self.segments if s["frame"] is not None), None)
        return {"origin_xy": seg["origin_xy"] if seg else None, "basis_px": seg["basis_px"] if seg else None,
                "frame": seg["frame"] if seg else None, "coords_frame": seg["first_frame"] if seg else None}

    def _set_reference(self, frame: int, xy: np.ndarray, B: np.ndarray) -> None:
        ok = np.isfinite(B).all(axis=(1, 2)) & np.isfinite(xy).all(axis=1)
        if not ok.any():
            return
        c = self.centre if self.centre is not None else np.median(xy[ok], axis=0)
        idx = np.flatnonzero(ok)
        k = idx[np.argmin(np.hypot(*(xy[idx] - c).T))]
        self.origin = xy[k].copy()
        self.origin_basis = B[k].copy()
        self.spacing_px = float(np.sqrt((B[k] ** 2).sum(-1)).mean())
        self.segments[-1].update(frame=int(frame), origin_xy=[float(v) for v in self.origin],
                                 basis_px=self.origin_basis.tolist())

    def _abs_nodes(self, xy: np.ndarray, B: np.ndarray) -> np.ndarray:
        """Absolute nodes: displacement from the origin read in the mean of the two ends' bases."""
        Bm = 0.5 * (B + self.origin_basis[None])
        n, _ = lattice_offset(xy - self.origin[None], Bm)
        return n

    def _frame_nodes(self, table: SiteTable, xy_all: np.ndarray, B_all: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Absolute nodes of ``rows``: the frame's ``lattice_i, lattice_j`` mapped onto the reference's.

        The node columns of a frame name its lattice in their own way (:data:`LATTICE_NODE_CONVENTION`):
        one origin and one pair of vectors per frame, which may be any pair of first-shell vectors
        (the Fourier front end picks ``g`` or ``-g`` afresh in every frame). The frame's naming is
        mapped onto the reference's by the integer matrix and offset (:func:`node_map`) read at the
        sites nearest the reference origin, where the node estimated from the position is exact. The
        nodes are taken from the positions only when no such map explains 90 % of those sites (then
        a warning, counted in the summary as ``lattice_index_columns.frames_rejected``).
        """
        if "lattice_i" in table and "lattice_j" in table:
            ij = np.c_[np.asarray(table["lattice_i"]), np.asarray(table["lattice_j"])]
            okr = np.isfinite(ij.astype(np.float64)).all(1) & np.isfinite(B_all).all(axis=(1, 2))
            if "on_lattice" in table:  # off-lattice sites carry node 0: no node of theirs
                okr &= np.asarray(table["on_lattice"], bool)
            if okr.sum() >= 3:
                # the sites nearest the origin: the map is read where the node estimate is exact
                cand = np.flatnonzero(okr)
                dist = np.hypot(*(xy_all[cand] - self.origin).T)
                near = cand[np.argsort(dist)[:200]]
                est_near = self._abs_nodes(xy_all[near], B_all[near])
                M, off, share = node_map(ij[near].astype(np.int64), est_near)
                if share >= 0.9:
                    self.index_frames += 1
                    est = ij[rows].astype(np.int64) @ M + off[None]
                    bad = ~okr[rows]
                    if bad.any():
                        est[bad] = self._abs_nodes(xy_all[rows[bad]], B_all[rows[bad]])
                    return est
                self.index_rejected += 1
                if self.index_rejected == 1:
                    log.warning("lattice node columns do not follow the local lattice vectors (the best map explains "
                                "%.0f %% of %d sites): nodes are taken from the positions", 100 * share, len(near))
        return self._abs_nodes(xy_all[rows], B_all[rows])

    def _link(self, frame: int, table: SiteTable):
        n = len(table)
        isd = np.asarray(table["is_defect"], bool)
        xy_all, B_all = self._frame_geometry(frame, table)
        fin = np.isfinite(xy_all).all(1)
        score_all = (np.asarray(table["anomaly_score"], np.float64) if "anomaly_score" in table
                     else np.zeros(n))
        strong = np.flatnonzero(isd & fin)
        kinds_s = (np.asarray(table["defect_kind"]).astype(str)[strong] if "defect_kind" in table
                   else np.full(len(strong), "defect"))
        counts = dict(Counter(kinds_s.tolist()))
        self.n_detections += len(strong)
        if self.origin is None:  # no lattice basis anywhere yet: defects cannot be placed on nodes
            self._expire(frame)
            return strong, [None] * len(strong), counts
        det = self._detections(table, isd, fin, score_all, strong, kinds_s, xy_all, B_all)
        # candidate pairs: tracks seen within max_gap + 1 frames, detections within reach
        cand_tr = [t for t in self.active if frame - t.last_frame <= self.s.max_gap + 1]
        assign = np.full(len(det.rows), -1, np.int64)
        steps_of = np.zeros(len(det.rows))
        if cand_tr and len(det.rows):
            assign, steps_of = self._assign(frame, cand_tr, det.xy, det.B, det.subs, det.kinds, det.nodes, det.weak,
                                            det.weak & (det.score < det.cont_thr), det.score)
        det_tracks = self._apply_links(frame, det, cand_tr, assign, steps_of)
        keep = [d for d in range(len(det.rows)) if det_tracks[d] is not None or not det.weak[d]]
        self._expire(frame)
        return det.rows[keep], [det_tracks[d] for d in keep], counts

    def _frame_geometry(self, frame: int, table: SiteTable) -> tuple[np.ndarray, np.ndarray]:
        """Site positions in the drift-corrected frame of :attr:`coords_frame` and the local lattice
        bases named like the reference's (:func:`align_bases`; NaN where a site has none). The first
        frame of a segment with a lattice sets its reference."""
        n = len(table)
        # where the lattice has the sites (a band of jumped scan lines moved back), drift taken out
        xy_all = lattice_positions(table.xy, getattr(table, "meta", None)) - np.asarray(self.cum[:2], np.float64)
        B_all = table.basis
        if B_all is None:
            B_all = np.full((n, 2, 2), np.nan)
        if self.origin is None:
            self._set_reference(frame, xy_all, B_all)
        if self.origin_basis is not None:
            B_all = align_bases(B_all, self.origin_basis)
        return xy_all, B_all

    def _detections(self, table: SiteTable, isd, fin, score_all, strong, kinds_s, xy_all, B_all) -> "_Detections":
        """The sites this frame links: the defects, and (when tracks are open or weak runs are kept)
        the sites below the cutoff that may continue a track -- never start one, unless their patch
        is whole, the scan shows them, and they score above ``continue_fraction`` of the cutoff."""
        n = len(table)
        cont_thr = self.s.continue_fraction * self.cutoff if self.cutoff else np.inf
        weak_thr = min(self.s.stay_fraction, self.s.continue_fraction) * self.cutoff if self.cutoff else np.inf
        want_weak = self.active or self.s.weak_frames > 0
        weak_rows = np.flatnonzero(~isd & fin & (score_all >= weak_thr)) if want_weak else np.zeros(0, np.int64)
        rows = np.concatenate([strong, weak_rows])
        weak = np.r_[np.zeros(len(strong), bool), np.ones(len(weak_rows), bool)]
        can_start = ~weak
        if len(weak_rows):
            ok = np.ones(n, bool)
            if "edge" in table:
                ok &= ~np.asarray(table["edge"], bool)
            if "observed" in table:
                ok &= np.asarray(table["observed"], bool)
            can_start = can_start | (ok[rows] & (score_all[rows] >= cont_thr))
        subs = (np.asarray(table["sublattice"], np.int64)[rows] if "sublattice" in table
                else np.full(len(rows), -1, np.int64))
        B = B_all[rows]
        badB = ~np.isfinite(B).all(axis=(1, 2))
        B[badB] = self.origin_basis
        nodes = self._frame_nodes(table, xy_all, np.where(np.isfinite(B_all).all(axis=(1, 2))[:, None, None],
                                                          B_all, self.origin_basis), rows)
        return _Detections(rows=rows, weak=weak, can_start=can_start, kinds=np.r_[kinds_s, np.full(len(weak_rows), "")],
                           subs=subs, score=score_all[rows], B=B, xy=xy_all[rows], nodes=nodes, cont_thr=cont_thr)

    def _apply_links(self, frame: int, det: "_Detections", cand_tr: list, assign: np.ndarray,
                     steps_of: np.ndarray) -> list:
        """Continue the assigned tracks (a hop when the node changed), start new ones, count the
        evidence, give a track its public id once confirmed. Returns each detection's track (None
        for a weak site that neither continues nor may start one)."""
        det_tracks: list = [None] * len(det.rows)
        res = []
        for d in range(len(det.rows)):
            t = cand_tr[assign[d]] if assign[d] >= 0 else None
            if t is not None and det.weak[d] and steps_of[d] > 0 and self._stale(t):
                self._drop_run(t)  # a run judged too faint does not carry its history onto another node
                self.active.remove(t)
                t = None
            if t is not None:
                res.append(self._continue(t, frame, det.xy[d], det.B[d], float(steps_of[d]), det.weak[d]))
            elif det.weak[d] and (self.s.weak_frames == 0 or not det.can_start[d]):
                continue
            else:  # a new track (tentative when it starts below the cutoff)
                t = _Track(key=self._next_key, first_frame=frame, last_frame=frame, xy=det.xy[d], basis=det.B[d],
                           node=det.nodes[d].copy(), start_xy=det.xy[d].copy(), start_node=det.nodes[d].copy(),
                           sublattice=int(det.subs[d]), coords_frame=int(self.coords_frame))
                t.points.append(det.xy[d].copy())
                self._next_key += 1
                self.active.append(t)
            if not det.weak[d]:
                t.kinds[str(det.kinds[d])] += 1
                t.n_strong += 1
            t.subs[int(det.subs[d])] += 1
            t.score_sum += float(det.score[d])
            t.n_cont += int(not det.weak[d] or det.score[d] >= det.cont_thr)
            t.recent = (t.recent + [float(det.score[d])])[-_RECENT_SCORES:]
            if t.public_id < 0 and self._confirmed(t):
                t.public_id = self._next_id
                self._next_id += 1
            det_tracks[d] = t
        if res:
            self.residual_median.append(float(np.median(res)))
        return det_tracks

    def _continue(self, t: "_Track", frame: int, xy: np.ndarray, B: np.ndarray, step: float, weak: bool) -> float:
        """Move track ``t`` to a detection at ``xy`` (a hop when ``step`` > 0); returns the residual of
        the displacement from the nearest lattice node."""
        dxy = xy - t.xy
        nn, r = lattice_offset(dxy[None], 0.5 * (t.basis + B))
        if step > 0:
            t.hops += 1
            t.path_steps += step
            t.path_px += float(np.hypot(*dxy))
            t.node = t.node + nn[0]
            self._add_point(t, xy)
        t.xy, t.basis, t.last_frame = xy, B, frame
        t.n_seen += 1
        self.n_linked += 1
        self.n_weak += int(weak)
        return float(r[0])

    def _stale(self, t: "_Track") -> bool:
        """A run below the cutoff, never flagged, judged too faint over twice the frames that could confirm
        it (a history long enough to dilute a new run's mean; a faint defect's run of a few frames is kept)."""
        return bool(t.public_id < 0 and not t.n_strong and self.s.weak_frames
                    and t.n_cont >= 2 * self.s.weak_frames and not self._mean_reaches(t))

    def _confirmed(self, t: "_Track") -> bool:
        """A track gets its public id when seen ``min_frames`` times with a defect among them, or,
        never flagged, ``weak_frames`` times at a mean score of ``weak_mean_fraction`` of the cutoff."""
        if t.n_strong:
            return t.n_seen >= self.s.min_frames
        return bool(self.s.weak_frames and t.n_cont >= self.s.weak_frames and self._mean_reaches(t))

    def _mean_reaches(self, t: "_Track") -> bool:
        """Whether the mean score of ``t``'s detections reaches ``weak_mean_fraction`` of the cutoff."""
        return bool(t.score_sum >= self.s.weak_mean_fraction * (self.cutoff or np.inf) * t.n_seen)

    def _assign(self, frame, tracks, xy, B, subs, kinds, nodes, weak, low, score):
        from scipy.optimize import linear_sum_assignment
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components
        from scipy.spatial import cKDTree

        s = self.s
        txy = np.array([t.xy for t in tracks])
        gmax = s.max_gap + 1
        reach = (s.max_hop * gmax + 0.75) * _SQRT3 * (self.spacing_px or 1.0)
        pairs = cKDTree(txy).query_ball_point(xy, r=reach)
        ti, di = [], []
        for d, lst in enumerate(pairs):
            ti.extend(lst)
            di.extend([d] * len(lst))
        assign = np.full(len(xy), -1, np.int64)
        steps_of = np.zeros(len(xy))
        if not ti:
            return assign, steps_of
        ti = np.asarray(ti, np.int64)
        di = np.asarray(di, np.int64)
        tB = np.array([t.basis for t in tracks])
        tsub = np.array([t.sublattice for t in tracks], np.int64)
        tkind = np.array([t.kinds.most_common(1)[0][0] if t.kinds else "" for t in tracks])
        tent = np.array([t.public_id < 0 and not t.n_strong for t in tracks])
        tlast = np.array([t.last_frame for t in tracks], np.int64)
        d = xy[di] - txy[ti]
        Bm = 0.5 * (tB[ti] + B[di])
        n, r = lattice_offset(d, Bm)
        spacing = np.sqrt((Bm ** 2).sum(-1)).mean(-1)
        steps = sublattice_steps(n)
        g = frame - tlast[ti]
        sa, sb = tsub[ti], subs[di]
        known = (sa >= 0) & (sb >= 0)
        ok = ~known | (sa == sb)
        same_colour = (n[:, 0] - n[:, 1]) % 3 == 0
        ok &= ~known | same_colour  # a defect stays on its sublattice
        ok &= steps <= s.max_hop * g + 1e-9
        ok &= ~(low[di] & (steps > 0))  # the faintest sites only keep a track (or a run) on its node
        ref = np.array([np.median(t.recent) if t.recent else 0.0 for t in tracks])
        optional = low.copy()  # a site far fainter than a track reaching it need not be that track's
        optional[di[ok & weak[di] & (score[di] < s.min_score_ratio * ref[ti])]] = True
        hold = low[di]  # a run kept on its node by a faint site: no tentative penalty (no flagged site to steal)
        wk = weak[di]
        cost = (steps + r / spacing + s.gap_penalty * (g - 1)
                + s.kind_penalty * ((tkind[ti] != kinds[di]) & ~wk & (tkind[ti] != ""))
                + s.weak_penalty * wk + (s.max_hop + s.weak_penalty) * (tent[ti] & ~hold))
        ti, di, cost, steps = ti[ok], di[ok], cost[ok], steps[ok]
        if not len(ti):
            return assign, steps_of
        nT = len(tracks)
        g_ = coo_matrix((np.ones(len(ti)), (ti, nT + di)), shape=(nT + len(xy),) * 2)
        _, lab = connected_components(g_, directed=False)
        comp = lab[ti]
        order = np.argsort(comp, kind="stable")
        bounds = np.flatnonzero(np.diff(comp[order])) + 1
        big = 1e6
        for grp in np.split(order, bounds):
            ut, it = np.unique(ti[grp], return_inverse=True)
            ud, idd = np.unique(di[grp], return_inverse=True)
            nt, nd = len(ut), len(ud)
            # rows: tracks, then "unexplained" of each detection; columns: detections, then "unseen"
            # of each track. A track unseen in this frame costs one missed frame (gap_penalty; a
            # link after a gap pays for the gap too, so a faint site after a gap is left to the
            # noise); a faint site left to the noise costs weak_penalty; any other site cannot be left while a track
            # reaches it (_FORCED exceeds every link): as many of them linked as possible, then the
            # cheapest way -- a faint site on a track's node no longer forces a neighbour into a
            # costlier link, nor keeps its track from the flagged site it hopped to.
            C = np.full((nt + nd, nd + nt), big)
            C[it, idd] = cost[grp]
            C[np.arange(nt), nd + np.arange(nt)] = s.gap_penalty
            C[nt + np.arange(nd), np.arange(nd)] = np.where(optional[ud], s.weak_penalty, _FORCED)
            C[nt:, nd:] = 0.0
            rr, cc = linear_sum_assignment(C)
            for a, b in zip(rr, cc):
                if a < nt and b < nd and C[a, b] < big:
                    assign[ud[b]] = ut[a]
        link = assign[di] == ti
        steps_of[di[link]] = steps[link]
        return assign, steps_of

    def _add_point(self, t: _Track, xy: np.ndarray) -> None:
        if self._map_points < self.max_points:
            t.points.append(np.asarray(xy, np.float64).copy())
            self._map_points += 1
        else:
            self.map_truncated = True

    def _expire(self, frame: int) -> None:
        keep = []
        for t in self.active:
            if t.public_id < 0 and not t.n_strong and t.last_frame < frame:
                self._drop_run(t)  # a run below the cutoff that broke off: no defect
            elif frame - t.last_frame > self.s.max_gap:
                self._end(t, "lost")
            else:
                keep.append(t)
        self.active = keep

    def _drop_run(self, t: _Track) -> None:
        self.n_tentative_dropped += 1
        if self.s.weak_frames and t.n_seen >= self.s.weak_frames:  # long enough, its mean too low
            self.n_weak_runs_unreported += 1

    def _end(self, t: _Track, how: str) -> None:
        if t.public_id < 0:
            if t.n_strong:
                self.n_unconfirmed += 1
            else:
                self._drop_run(t)
            return
        self.n_tracks += 1
        self.n_hops += t.hops
        self.n_hopping += int(t.hops > 0)
        self.sum_frames += t.n_seen
        sub = t.subs.most_common(1)[0][0] if t.subs else t.sublattice
        net = float(sublattice_steps((t.node - t.start_node)[None])[0])
        row = {
            "track_id": t.public_id, "kind": t.kinds.most_common(1)[0][0] if t.kinds else BELOW_CUTOFF,
            "sublattice": int(sub), "first_frame": t.first_frame, "last_frame": t.last_frame,
            "n_frames": t.n_seen, "span_frames": t.last_frame - t.first_frame + 1, "hops": t.hops,
            "path_steps": round(t.path_steps, 4), "net_steps": round(net, 4), "path_px": round(t.path_px, 3),
            "path_nm": round(t.path_px * self.nm_per_px, 5) if self.nm_per_px else None,
            "start_x": round(float(t.start_xy[0]), 3), "start_y": round(float(t.start_xy[1]), 3),
            "end_x": round(float(t.xy[0]), 3), "end_y": round(float(t.xy[1]), 3),
            "start_i": int(t.start_node[0]), "start_j": int(t.start_node[1]),
            "end_i": int(t.node[0]), "end_j": int(t.node[1]),
            "mean_score": round(t.score_sum / max(t.n_seen, 1), 4), "end": how, "coords_frame": t.coords_frame,
        }
        if self._map_points < self.max_points or len(t.points) <= 2:
            pts = np.array(t.points + [t.xy])
            self.map_tracks.append((row["kind"], t.public_id, pts, t.coords_frame))
            self._map_points += 1
        else:
            self.map_truncated = True
        if self.on_track is not None:
            self.on_track(row)
        else:
            self.tracks_rows.append(row)

    def _release(self, upto: int | None) -> list:
        out = []
        while self._buf and (upto is None or self._buf[0][0] <= upto):
            frame, table, rows, dets, k = self._buf.pop(0)
            if table is None:
                continue
            tid = np.full(len(table), -1, np.int64)
            if len(rows):
                tid[rows] = [t.public_id if t is not None else -1 for t in dets]
                self.n_active[k] = int((tid >= 0).sum())
            out.append((frame, table.with_columns({"track_id": tid})))
        return out


def link_tables(tables: Iterable[tuple[int, SiteTable | None, Sequence[float] | None]],
                settings: TrackSettings | None = None, **kwargs) -> tuple[list[tuple[int, SiteTable]], list[dict], dict]:
    """Link a whole series in memory: ``tables`` yields ``(frame, table, drift)``.

    Returns ``(tables with track_id, track rows, summary)`` (convenience for small series and tests;
    the batch streams with :class:`DefectLinker`).
    """
    lk = DefectLinker(settings, **kwargs)
    out = []
    for frame, table, drift in tables:
        out += lk.push(frame, table, drift=drift)
    out += lk.finish()
    rows = sorted(lk.tracks_rows, key=lambda r: r["track_id"])
    return out, rows, lk.summary()


# ----------------------------------------------------------------------------- outputs


class TrackCsv:
    """``tracks.csv`` written row by row as tracks end (a file object, e.g. ``atomic_open``)."""

    def __init__(self, fh) -> None:
        self.fh = fh
        self.w = csv.writer(fh, lineterminator="\n")
        self.w.writerow(TRACK_COLUMNS)
        self.n = 0

    def __call__(self, row: Mapping) -> None:
        self.w.writerow(["" if row.get(c) is None else row.get(c) for c in TRACK_COLUMNS])
        self.n += 1


#: colours of the defect kinds by their place in a material's list (:attr:`Material.defect_kinds`), so
#: ``vacancy_S`` on MoS2 and ``vacancy_Se`` on WSe2 share one: empty metal, empty chalcogen column,
#: one chalcogen missing, bright chalcogen column, other
_ROLE_COLORS = {1: "#f58231", 2: "#4363d8", 3: "#e6194b", 4: "#911eb4", 7: "#9e9e9e"}
_EXTRA_COLORS = ("#3cb44b", "#42d4f4", "#f032e6", "#bfef45", "#469990", "#9a6324")


def _kind_color(kind: str, order: list[str]) -> str:
    from .materials import MATERIALS

    role = next((m.defect_kinds.index(kind) for m in MATERIALS.values() if kind in m.defect_kinds), None)
    if role in _ROLE_COLORS:
        return _ROLE_COLORS[role]
    return _EXTRA_COLORS[order.index(kind) % len(_EXTRA_COLORS)] if kind in order else "#9e9e9e"


def mean_corrected_frame(get_frame: Callable[[int], np.ndarray], frames: Sequence[int], shifts: Sequence,
                         *, max_frames: int = 16, max_px: int = 1024) -> tuple[np.ndarray | None, int, int]:
    """Mean of up to ``max_frames`` frames (evenly spread) shifted back by their drift, downsampled.

    Returns ``(image, block factor, frames used)``; shifts are the content displacements of each
    frame relative to the first (px).
    """
    from scipy import ndimage

    if not len(frames):
        return None, 1, 0
    pick = sorted({int(round(v)) for v in np.linspace(0, len(frames) - 1, min(max_frames, len(frames)))})
    acc = None
    f = 1
    used = 0
    for k in pick:
        try:
            img = np.asarray(get_frame(frames[k]), np.float32)
        except Exception as exc:  # noqa: BLE001 - the figure must not lose the results
            log.info("tracks figure: frame %d unreadable: %s", frames[k], exc)
            continue
        f = max(1, int(math.ceil(max(img.shape) / max_px)))
        if f > 1:
            H, W = (img.shape[0] // f) * f, (img.shape[1] // f) * f
            img = img[:H, :W].reshape(H // f, f, W // f, f).mean(axis=(1, 3))
        sx, sy = (float(v) / f for v in shifts[k])
        img = ndimage.shift(img, (-sy, -sx), order=1, mode="nearest")
        if acc is None:
            acc = img.astype(np.float64)
        elif acc.shape == img.shape:
            acc += img
        else:
            continue
        used += 1
    return (None if acc is None else (acc / max(used, 1)).astype(np.float32)), f, used


def plot_tracks(path, linker: DefectLinker, *, background: np.ndarray | None = None, factor: int = 1,
                n_background: int = 0, dose: dict | None = None, title: str | None = None, dpi: int = 110,
                coords_frame: int | None = None) -> None:
    """``tracks.png``: defect counts by kind against frame (and dose) | the tracks over the mean frame.

    Tracks are drawn from their start (circle) through every node they hopped to, to their end
    (cross), coloured by kind, in the drift-corrected frame of image ``coords_frame`` (only the tracks
    in that frame's coordinates; None: all, for a series without drift breaks).
    """
    from .figures import display_range, pyplot as _mpl, save_figure as _savefig, tight_layout

    plt = _mpl()
    from matplotlib.lines import Line2D

    fig, (a0, a1) = plt.subplots(1, 2, figsize=(14.5, 6.2), gridspec_kw={"width_ratios": [1.0, 1.15]})
    frames = np.asarray(linker.frames)
    kinds = sorted({k for c in linker.counts for k in c}, key=lambda k: -sum(c.get(k, 0) for c in linker.counts))
    for k in kinds:
        a0.plot(frames, [c.get(k, 0) for c in linker.counts], "-", marker=".", ms=4, lw=1.3,
                color=_kind_color(k, kinds), label=k)
    if len(frames):
        a0.plot(frames, linker.n_active, "--", color="k", lw=1.0, label="tracked defects (track id >= 0)")
    a0.set_xlabel("frame")
    a0.xaxis.get_major_locator().set_params(integer=True)
    a0.set_ylabel("defect sites per frame")
    a0.grid(alpha=0.3)
    if kinds:
        a0.legend(fontsize=8, frameon=False, loc="upper left")
    a0.set_title("flagged defects (is_defect) by kind, and tracked defects", fontsize=10)
    if dose and len(frames):
        per = float(dose["value"]) if dose.get("per_frame") else float(dose["value"]) / max(len(frames), 1)
        unit = dose.get("unit") or "as in the file"
        top = a0.secondary_xaxis("top", functions=(lambda f: (f + 1) * per, lambda d: d / per - 1))
        top.set_xlabel(f"cumulative dose ({unit}; metadata '{dose.get('key')}')", fontsize=8)
    if background is not None:
        H, W = background.shape
        lo, hi = display_range(background)
        a1.imshow(background, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest",
                  extent=(-0.5, W * factor - 0.5, H * factor - 0.5, -0.5))
        a1.set_xlim(-0.5, W * factor - 0.5)
        a1.set_ylim(H * factor - 0.5, -0.5)
    else:
        a1.invert_yaxis()
        a1.set_aspect("equal")
    handles = []
    shown = set()
    drawn = [(k, p) for k, _, p, cf in linker.map_tracks if coords_frame is None or cf == coords_frame]
    for kind, pts in drawn:
        col = _kind_color(kind, kinds)
        a1.plot(pts[:, 0], pts[:, 1], "-", color=col, lw=1.4, alpha=0.9)
        a1.plot(pts[0, 0], pts[0, 1], "o", mfc="none", mec=col, ms=5, mew=1.0)
        a1.plot(pts[-1, 0], pts[-1, 1], "x", color=col, ms=5, mew=1.0)
        if len(pts) > 2:
            a1.plot(pts[1:-1, 0], pts[1:-1, 1], ".", color=col, ms=4)
        if kind not in shown:
            shown.add(kind)
            handles.append(Line2D([], [], color=col, lw=1.4, label=kind))
    handles += [Line2D([], [], marker="o", ls="", mfc="none", mec="k", label="start"),
                Line2D([], [], marker="x", ls="", color="k", label="end"),
                Line2D([], [], marker=".", ls="", color="k", label="hop")]
    leg = a1.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    del leg
    nh = sum(1 for _, p in drawn if len(p) > 2)
    other = len(linker.map_tracks) - len(drawn)
    a1.set_title(f"{len(drawn)} tracks ({nh} with hops) over the mean of {n_background} drift-corrected "
                 f"frames" + (" (map truncated)" if linker.map_truncated else "")
                 + (f"\n{other} tracks after a drift break not drawn (other coordinates)" if other else ""),
                 fontsize=9)
    a1.set_xlabel("x (px, drift-corrected" + ("" if coords_frame is None else f", frame of image {coords_frame}") + ")")
    a1.set_ylabel("y (px)")
    if title:
        fig.suptitle(title, fontsize=10)
    tight_layout(fig)  # no layout engine left behind: savefig draws once
    _savefig(fig, path, dpi)


def tracks_html(summary: Mapping, folder, img_tag: Callable) -> str:
    """The report section of a stack's tracks (``summary["tracking"]``)."""
    import html as _html

    tr = summary.get("tracking") or {}
    if not tr:
        return ""
    e = _html.escape
    parts = ["<h3>defect tracks</h3>"]
    facts = [("tracks (seen in >= %d frames)" % tr.get("settings", {}).get("min_frames", 2), tr.get("n_tracks")),
             ("tracks with hops", tr.get("n_tracks_hopping")), ("hops", tr.get("n_hops")),
             ("mean frames per track", tr.get("mean_frames")),
             ("defect detections", tr.get("n_detections")), ("links between frames (gaps included)", tr.get("n_linked")),
             ("sites below the cutoff continuing a track", tr.get("n_weak_links")),
             ("defects seen in fewer than %d frames (not tracked)" % tr.get("settings", {}).get("min_frames", 2),
              tr.get("n_unconfirmed")),
             ("runs below the cutoff too faint on average to track", tr.get("n_weak_runs_unreported")),
             ("median off-node residual of links (px)", tr.get("link_residual_px_median"))]
    rows = "".join(f"<tr><td class='l'>{e(str(k))}</td><td>{e('-' if v is None else (f'{v:.3g}' if isinstance(v, float) else str(v)))}</td></tr>"
                   for k, v in facts)
    parts.append(f"<table>{rows}</table>")
    if tr.get("drift_breaks"):
        parts.append("<p class='warn'>drift from the last frame with sites unknown at frames "
                     + e(", ".join(map(str, tr["drift_breaks"]))) + ": the tracks open there were ended, and the "
                     "positions from each of these frames on are in its own drift-corrected frame (tracks.csv "
                     "coords_frame); the figure shows the tracks of the longest stretch</p>")
    if tr.get("drift_gaps"):
        parts.append("<p>drift measured across frames without sites: "
                     + e(", ".join(f"{a} to {b}" for a, b in tr["drift_gaps"])) + "</p>")
    parts.append(img_tag(folder / "tracks.png", f"{summary.get('name', '')} tracks"))
    parts.append("<p><small>tracks.csv: one row per track (id, kind, sublattice, first/last frame, frames seen, "
                 "hops, path in lattice steps and nm, start/end position in the drift-corrected pixels of frame "
                 "coords_frame); sites.csv: track_id of every defect site (-1: not tracked)</small></p>")
    return "\n".join(parts)


class StackTracker:
    """The tracking of one stack in the batch: ``tracks.csv`` (atomic, streamed), ``tracks.png``, summary.

    Use as a context manager around the writing of ``sites.csv``: :meth:`push` every frame's
    record and table (returns the tables to write, with ``track_id``), :meth:`finish` at the end
    of the frames (returns the held-back tables); after the block, :meth:`plot` and
    :meth:`summary`. An exception inside the block discards ``tracks.csv``.
    """

    FILES = TRACK_FILES

    def __init__(self, folder, *, settings: TrackSettings | None = None, nm_per_px: float | None = None,
                 shape: Sequence[int] | None = None, dose: Mapping | None = None, cutoff: float | None = None) -> None:
        from pathlib import Path

        self.folder = Path(folder)
        self.settings = settings or TrackSettings()
        self.cutoff = self.settings.cutoff if cutoff is None else cutoff
        self.nm_per_px = nm_per_px
        self.dose = dict(dose) if dose else None
        centre = None
        if shape is not None and len(shape) >= 2:
            centre = ((float(shape[-1]) - 1) / 2.0, (float(shape[-2]) - 1) / 2.0)
        self.centre = centre
        self._exit = None
        self.linker: DefectLinker | None = None
        # (frame, coords_frame, dx, dy): frames with sites, displaced by (dx, dy) from frame coords_frame
        self.shifts: list[tuple[int, int, float, float]] = []

    def __enter__(self) -> "StackTracker":
        import contextlib

        from .atomic import atomic_open

        self._exit = contextlib.ExitStack()
        fh = self._exit.enter_context(atomic_open(self.folder / "tracks.csv", "w", newline="", encoding="utf-8"))
        self.csv = TrackCsv(fh)
        self.linker = DefectLinker(self.settings, nm_per_px=self.nm_per_px, centre=self.centre, on_track=self.csv,
                                   cutoff=self.cutoff)
        return self

    def __exit__(self, *exc) -> bool:
        return bool(self._exit.__exit__(*exc))

    def push(self, meta: Mapping, table: SiteTable | None) -> list[SiteTable]:
        """Link one frame (``meta``: the frame record with ``frame`` and ``drift_px``, or ``drift_over_gap``
        for a drift measured from an earlier frame: :func:`stemfast.batch.frames.iter_frames`)."""
        frame, drift, src = int(meta["frame"]), meta.get("drift_px"), None
        gap = meta.get("drift_over_gap")
        if drift is None and gap:
            drift, src = gap.get("px"), gap.get("from_frame")
        out = self.linker.push(frame, table if not meta.get("error") else None, drift=drift, drift_from=src)
        if self.linker.placed:  # a frame with sites: its drift-corrected place is known
            self.shifts.append((frame, int(self.linker.coords_frame), float(self.linker.cum[0]),
                                float(self.linker.cum[1])))
        return [t for _, t in out]

    def finish(self) -> list[SiteTable]:
        return [t for _, t in self.linker.finish()]

    def summary(self) -> dict:
        s = self.linker.summary()
        s["dose"] = self.dose
        s["files"] = list(self.FILES)
        return s

    def plot(self, get_frame: Callable[[int], np.ndarray], *, title: str | None = None) -> None:
        """``tracks.png``: the tracks of the longest stretch of frames between drift breaks over the mean of
        up to 16 of its frames with sites, drift-corrected (frames without sites -- blank, noise -- and
        frames in other coordinates are left out)."""
        per = Counter(c for _, c, _, _ in self.shifts)
        cf = max(per, key=lambda c: (per[c], -c)) if per else None
        usable = [(f, dx, dy) for f, c, dx, dy in self.shifts if c == cf]
        bg, fac, used = mean_corrected_frame(get_frame, [f for f, _, _ in usable], [(dx, dy) for _, dx, dy in usable])
        plot_tracks(self.folder / "tracks.png", self.linker, background=bg, factor=fac, n_background=used,
                    dose=self.dose, title=title, coords_frame=cf)
