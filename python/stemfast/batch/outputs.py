"""The outputs of one input: ``sites.csv`` streamed frame by frame, the figures (``classes.png``,
``defects.png``, the tracks of a stack) and ``summary.json``.

:func:`assemble` takes the frame results of an input in frame order -- from the analysis in this
process or from the parts a Dask cluster wrote -- and writes the same files either way.
"""
from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .. import __version__
from ..atomic import atomic_open, write_json
from ..config import neutral_settings
from ..model.engine import combined_engine
from .common import OUTPUT_FILES, STAGES, peak_memory_mib
from .frames import FrameResult, has_lattice
from .inputs import InputEntry
from .model_state import model_identity
from .status import InputUnreadable
from .tables import CsvStream

__all__ = ["InputSource", "RunSettings", "FrameTotals", "assemble", "start_assemble", "PendingOutputs",
           "stack_tracker", "lattice_warnings", "median_finite", "class_sublattice_summary"]

#: Candidates shown in ``defects.png``.
GALLERY_SIZE = 24
#: the largest image (pixels) whose figures :func:`start_assemble` draws in the background: beyond it
#: the figures' memory would add to the next input's analysis, for little time (a 16k^2 image's
#: analysis takes ~30x its figures)
BACKGROUND_FIGURES_MAX_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class InputSource:
    """An input as its outputs see it: its entry, its frames, what the reader told about it
    (:func:`stemfast.batch.inputs.describe_input`) and a way to read a frame again for the figures."""

    entry: InputEntry
    n_frames: int
    is_stack: bool
    info: dict
    get_frame: Callable[[int], np.ndarray]


@dataclass(frozen=True)
class RunSettings:
    """What the outputs are made with: the settings, their hash and the model's SHA-256."""

    config: object
    chash: str
    model_sha: str | None


@dataclass
class FrameTotals:
    """The frame records of an input added up as they stream past (the tables are not kept)."""

    top_n: int
    frames_meta: list = field(default_factory=list)
    class_counts: dict = field(default_factory=dict)
    defect_kinds: dict = field(default_factory=dict)
    stage_s: dict = field(default_factory=dict)
    n_sites: int = 0
    n_defects: int = 0
    n_classes: int = 0
    #: the ``top_n`` highest-scoring candidates so far: (sort key, record, patch)
    candidates: list = field(default_factory=list)
    #: (frame, x, y, class_id, is_defect, spacing, crowded, inversion_domain) of the frame shown in the
    #: class map
    shown: tuple | None = None
    #: why the compiled extension could not be imported where a frame's kernels ran (the first frame's
    #: reason; said once in the summary, not per frame)
    core_import_error: str | None = None

    def add(self, fr: FrameResult) -> None:
        m = fr.meta
        for k, v in m.get("timings_s", {}).items():
            self.stage_s[k] = self.stage_s.get(k, 0.0) + float(v)
        self.n_sites += int(m.get("n_sites", 0))
        self.n_defects += int(m.get("n_defects", 0))
        self.n_classes = max(self.n_classes, int(m.get("n_classes", 0) or 0))
        for k, v in m.get("class_counts", {}).items():
            self.class_counts[k] = self.class_counts.get(k, 0) + int(v)
        for k, v in m.get("defect_kinds", {}).items():
            self.defect_kinds[k] = self.defect_kinds.get(k, 0) + int(v)
        if self.shown is None and fr.table is not None and len(fr.table) and "class_id" in fr.table:
            t = fr.table
            crowded = np.asarray(t["crowded"], bool) if "crowded" in t else None
            domain = np.asarray(t["inversion_domain"], bool) if "inversion_domain" in t else None
            self.shown = (m["frame"], np.asarray(t["x"]), np.asarray(t["y"]), np.asarray(t["class_id"]),
                          np.asarray(t["is_defect"], bool), m.get("spacing_px"), crowded, domain)
        for j, c in enumerate(m.get("top", [])):
            p = fr.top_patches[j] if fr.top_patches is not None and j < len(fr.top_patches) else None
            self.candidates.append(((-float(c["anomaly_score"]), int(c["frame"]), int(c["index"])), c, p))
        if len(self.candidates) > self.top_n:
            self.candidates.sort(key=lambda t: t[0])
            del self.candidates[self.top_n:]
        self.core_import_error = self.core_import_error or m.get("core_import_error")
        self.frames_meta.append({k: v for k, v in m.items() if k not in ("top", "core_import_error")})

    def ranked(self) -> list:
        """The candidates, highest anomaly score first."""
        self.candidates.sort(key=lambda t: t[0])
        return self.candidates

    @property
    def errors(self) -> dict[str, str]:
        return {str(m["frame"]): m["error"] for m in self.frames_meta if m.get("error")}

    @property
    def n_ok(self) -> int:
        return sum(1 for m in self.frames_meta if not m.get("error"))

    def first_ok_frame(self) -> int:
        return next((m["frame"] for m in self.frames_meta if not m.get("error")), 0)


def median_finite(vals) -> float | None:
    """The median of the finite values of ``vals`` (None entries skipped), or None when there are none."""
    v = [float(x) for x in vals if x is not None and np.isfinite(x)]
    return float(np.median(v)) if v else None


def class_sublattice_summary(frames_meta) -> dict:
    """Per class, the sublattice most frames put it on and the median share of its sites there
    (the frames' ``class_sublattice``, :func:`stemfast.analysis.class_sublattices`)."""
    names: dict = {}
    for m in frames_meta:
        for c, v in (m.get("class_sublattice") or {}).items():
            names.setdefault(c, []).append((v["sublattice"], float(v["share"])))
    out = {}
    for c, vals in sorted(names.items(), key=lambda kv: int(kv[0])):
        labels = [n for n, _ in vals]
        name = max(set(labels), key=labels.count)
        out[c] = {"sublattice": name, "share": round(float(np.median([f for n, f in vals if n == name])), 4)}
    return out


def assemble(src: InputSource, d: Path, results: Iterable[FrameResult], *, run: RunSettings,
             t_start: float) -> dict:
    """Stream frame results into ``d/sites.csv``, draw the figures, write ``summary.json``.

    Returns the summary. ``done.json`` is written by the caller (last). Raises
    :class:`~stemfast.batch.status.InputUnreadable` when no frame could be analysed.
    """
    return start_assemble(src, d, results, run=run, t_start=t_start).finish()


def start_assemble(src: InputSource, d: Path, results: Iterable[FrameResult], *, run: RunSettings,
                   t_start: float, background: bool = False) -> "PendingOutputs":
    """:func:`assemble` up to the figures: ``d/sites.csv`` written, the figures drawn -- with
    ``background``, for a 2-D input of at most :data:`BACKGROUND_FIGURES_MAX_PIXELS`, in forked
    processes (:class:`~stemfast.figures.BackgroundFigures`) that draw them while this process goes
    on -- and ``summary.json`` left to :meth:`PendingOutputs.finish`. Raises
    :class:`~stemfast.batch.status.InputUnreadable` when no frame could be analysed."""
    from ..figures import BackgroundFigures

    totals = FrameTotals(top_n=int(getattr(run.config.analysis, "top_n", 50)))
    trk = stack_tracker(d, run.config, src.info) if src.is_stack else None  # defects linked through the frames
    write_site_table(d, results, totals, trk, backend=run.config.sites.backend)
    if totals.n_ok == 0:
        raise InputUnreadable(next(iter(totals.errors.values()), "no frames"))
    pending = PendingOutputs(src, d, totals, trk, run, t_start)
    jobs = figure_jobs(d, src, totals)
    shape = src.info.get("shape") or ()
    small = len(shape) >= 2 and int(np.prod(shape[-2:])) <= BACKGROUND_FIGURES_MAX_PIXELS
    pending.figures = BackgroundFigures.start(jobs) if background and trk is None and small else None
    if pending.figures is None:
        t0 = time.perf_counter()
        draw_figures(jobs, src, trk)
        pending.figures_s = time.perf_counter() - t0
    return pending


class PendingOutputs:
    """An input's outputs from :func:`start_assemble`: the site table written, the figures drawn or
    drawing in the background; :meth:`finish` waits for them and writes ``summary.json``."""

    def __init__(self, src: InputSource, d: Path, totals: FrameTotals, trk, run: RunSettings, t_start: float):
        self.src, self.d, self.totals, self.trk, self.run, self.t_start = src, d, totals, trk, run, t_start
        self.figures = None  # a BackgroundFigures while they are drawn elsewhere
        self.figures_s = 0.0
        self._t_figures = time.perf_counter()

    def finish(self) -> dict:
        """Wait for the figures, write ``summary.json``; returns the summary. Its ``seconds`` are
        the input's own: up to its figures, then their drawing time (not the time the figures waited
        while the next input was analysed)."""
        own_s = None
        if self.figures is not None:
            self.figures_s = self.figures.wait()
            self.figures = None
            own_s = self._t_figures - self.t_start + self.figures_s
        totals = self.totals
        totals.stage_s["figures"] = self.figures_s
        summary = build_summary(self.src, self.d, totals, self.trk, run=self.run)
        summary["seconds"] = time.perf_counter() - self.t_start if own_s is None else own_s
        summary["outputs"] = list(OUTPUT_FILES) + (list(self.trk.FILES) if self.trk else [])
        write_json(self.d / "summary.json", summary)
        return summary

    def cancel(self) -> None:
        """End figures still drawing in the background."""
        if self.figures is not None:
            self.figures.cancel()
            self.figures = None


def write_site_table(d: Path, results: Iterable[FrameResult], totals: FrameTotals, trk, *,
                     backend: str | None = None) -> None:
    """``d/sites.csv`` from the frame results (through the stack's tracker, which adds ``track_id``),
    adding every frame's record to ``totals``; each frame's table is freed once written. ``backend``:
    the run's ``sites.backend`` (the rows are formatted by its kernel, :class:`CsvStream`)."""
    with atomic_open(d / "sites.csv", "w", newline="", encoding="utf-8") as fh, (trk or contextlib.nullcontext()):
        csv = CsvStream(fh, backend=backend)
        for fr in results:
            for t in (trk.push(fr.meta, fr.table) if trk else (fr.table,)):
                csv.write(t)
            totals.add(fr)
            fr.table = None  # free the frame's table before the next one is produced
        for t in (trk.finish() if trk else ()):
            csv.write(t)
        csv.finish()


def draw_figures(jobs: list, src: InputSource, trk) -> None:
    """Draw the :func:`figure_jobs` (two figures on two cores) and, for a stack, the tracks' figure."""
    from ..figures import draw_side_by_side

    draw_side_by_side(jobs)
    if trk:
        trk.plot(src.get_frame, title=f"{src.entry.name}: defect tracks")


def figure_jobs(d: Path, src: InputSource, totals: FrameTotals) -> list:
    """The jobs that draw ``classes.png`` (the first frame with classes) and ``defects.png`` (the top
    candidates and their patches), their frames read here (a job may run in a forked process, where
    an open file is not shared)."""
    from ..report import plot_class_map, plot_defects

    name, stack = src.entry.name, src.is_stack
    jobs = []
    if totals.shown is not None:
        f0, x, y, cid, isd, sp, crowded, domain = totals.shown
        on = class_sublattice_summary(totals.frames_meta)
        img0 = src.get_frame(f0)
        # the crowded sites are marked where the lattice warned of them (a few at an edge are no news)
        warned = any((m.get("lattice") or {}).get("crowding", {}).get("warning") for m in totals.frames_meta
                     if m["frame"] == f0)
        jobs.append(lambda: plot_class_map(
            d / "classes.png", img0, x, y, cid, is_defect=isd, spacing_px=sp,
            crowded=crowded if warned else None, inversion_domain=domain,
            class_names={c: v["sublattice"] for c, v in on.items()},
            title=f"{name}: site classes" + (f" (frame {f0} of {src.n_frames})" if stack else "")))
    else:
        f0 = totals.first_ok_frame()
        img0 = src.get_frame(f0)
        jobs.append(lambda: plot_class_map(d / "classes.png", img0, np.zeros(0), np.zeros(0), np.zeros(0, np.int64),
                                           title=f"{name}: no lattice" + (f" (frame {f0})" if stack else "")))
    gallery = totals.ranked()[:GALLERY_SIZE]
    if gallery:
        fmap = gallery[0][1]["frame"]
        cands = [{**c, "rank": r + 1, "on_map": c["frame"] == fmap, "show_frame": stack}
                 for r, (_, c, _) in enumerate(gallery)]
        pats = [p for _, _, p in gallery]
        patches = np.stack(pats) if all(p is not None for p in pats) else None
        sp = next((m.get("spacing_px") for m in totals.frames_meta if m["frame"] == fmap), None)
        img1 = src.get_frame(fmap)
        jobs.append(lambda: plot_defects(
            d / "defects.png", img1, cands, patches, spacing_px=sp,
            title=f"{name}: top defect candidates" + (f" (map: frame {fmap})" if stack else "")))
    else:
        img1 = src.get_frame(totals.first_ok_frame())
        jobs.append(lambda: plot_defects(d / "defects.png", img1, [], None, title=f"{name}: no candidates"))
    return jobs


def input_warnings(src: InputSource, frames_meta: list[dict]) -> list[str]:
    """The reader's notes that qualify the results (``read_warnings``,
    :func:`~stemfast.batch.inputs.describe_input`; its other notes are facts, not warnings), then every
    frame's warnings and lattice warnings, once each. In a stack,
    the warnings that differ from frame to frame in their numbers only (the anisotropy of every frame
    of a series) are one line, prefixed with the frames that have it and worded as the first of them
    has it."""
    warns: list[str] = list(src.info.get("read_warnings", []))
    groups: dict[str, tuple[str, list[int]]] = {}
    for m in frames_meta:
        for w in list(m.get("warnings") or []) + lattice_warnings(m.get("lattice")):
            if not src.is_stack:
                if w not in warns:
                    warns.append(w)
                continue
            first, frames = groups.setdefault(_NUMBER.sub("#", w), (w, []))
            if m["frame"] not in frames:
                frames.append(int(m["frame"]))
    for first, frames in groups.values():
        where = f"frame {frames[0]}" if len(frames) == 1 else f"frames {frame_ranges(frames)} (as in frame {frames[0]})"
        warns.append(f"{where}: {first}")
    return warns


_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def frame_ranges(frames: Iterable[int]) -> str:
    """Frame numbers as ranges.

    >>> frame_ranges([0, 1, 2, 5, 7, 8])
    '0-2, 5, 7-8'
    """
    out: list[str] = []
    fs = sorted(set(int(f) for f in frames))
    i = 0
    while i < len(fs):
        j = i
        while j + 1 < len(fs) and fs[j + 1] == fs[j] + 1:
            j += 1
        out.append(str(fs[i]) if i == j else f"{fs[i]}-{fs[j]}")
        i = j + 1
    return ", ".join(out)


def lattice_summary(frames_meta: list[dict], info: dict) -> dict:
    """The input's lattice: median spacing and rotation over the frames, how it was found and how
    sure it is (first frame that has one; :func:`stemfast.sites.find_sites`), spacing in nm when
    calibrated."""
    from ..io import unit_to_nm

    spacing = median_finite(m.get("spacing_px") for m in frames_meta)
    pixel_size = info.get("pixel_size")
    lattice = {"spacing_px": spacing, "rotation_deg": median_finite(m.get("angle_deg") for m in frames_meta)}
    found = next((m["lattice"] for m in frames_meta if m.get("lattice")), None)
    if found:
        lattice.update({k: v for k, v in found.items() if k != "spacing_px"})
    to_nm = unit_to_nm(info.get("unit")) if pixel_size else None
    if pixel_size and spacing and to_nm:
        lattice["spacing_nm"] = spacing * float(pixel_size) * to_nm
    return lattice


def drift_summary(frames_meta: list[dict]) -> dict:
    """The frame-to-frame drift of a stack (``summary.json``, ``drift_px``): the drift of each frame from
    the one before (``frame``, ``dx``, ``dy``); ``over_gap``: that of a frame measured from the last frame
    with a lattice before it, across frames without one (``frame``, ``from_frame``, ``dx``, ``dy``);
    ``unknown``: the frames after the first with a lattice whose drift is neither (frames without a
    lattice, and frames whose drift could not be measured: defect tracks end at those,
    ``tracking.drift_breaks``)."""
    with_drift = [m for m in frames_meta if m.get("drift_px") is not None]
    out = {
        "note": "displacement of frame i relative to frame i-1 (x = column, y = row), full-resolution px",
        "frame": [m["frame"] for m in with_drift],
        "dx": [m["drift_px"][0] for m in with_drift],
        "dy": [m["drift_px"][1] for m in with_drift],
    }
    gaps = [m for m in frames_meta if m.get("drift_px") is None and m.get("drift_over_gap")]
    if gaps:
        out["over_gap"] = {"note": "displacement of frame i relative to frame from_frame, the last frame before it "
                                   "with a lattice (the frames between have none)",
                           "frame": [m["frame"] for m in gaps],
                           "from_frame": [m["drift_over_gap"]["from_frame"] for m in gaps],
                           "dx": [m["drift_over_gap"]["px"][0] for m in gaps],
                           "dy": [m["drift_over_gap"]["px"][1] for m in gaps]}
    lattice = [int(m["frame"]) for m in frames_meta if has_lattice(m)]
    first = min(lattice, default=min((int(m["frame"]) for m in frames_meta), default=0))
    unknown = sorted(int(m["frame"]) for m in frames_meta if m.get("drift_px") is None
                     and not m.get("drift_over_gap") and int(m["frame"]) > first)
    if unknown:
        out["unknown"] = unknown
    return out


def _max_per_band(lists) -> list | None:
    """Element-wise largest of per-band lists (None entries skipped); None when there is none."""
    out: list = []
    for vals in lists:
        for k, v in enumerate(vals or []):
            if k == len(out):
                out.append(None)
            if v is not None and (out[k] is None or v > out[k]):
                out[k] = v
    return out or None


def _max_per_key(dicts) -> dict | None:
    """Key-wise largest of dicts of numbers (None entries skipped); None when there is none."""
    out: dict = {}
    for d in dicts:
        for k, v in (d or {}).items():
            out[k] = max(out.get(k, v), v)
    return out or None


def _companion_fields(entry) -> dict:
    """``summary.json``'s ``companion`` (its path where one is used, else None), and where the input has
    one, how it was found (``companion_found``) and its image's title in a file of several
    (``companion_signal``)."""
    comp = entry.companion
    out = {"companion": str(comp.path) if comp is not None and entry.companion_used else None}
    if comp is not None:
        out["companion_found"] = comp.found
        if comp.signal:
            out["companion_signal"] = comp.signal
    return out


def build_summary(src: InputSource, d: Path, totals: FrameTotals, trk, *, run: RunSettings) -> dict:
    """The content of ``summary.json`` (without ``seconds`` and ``outputs``, added by :func:`assemble`)."""
    from ..report import ANALYSIS_WARNING_KEYS, stage_table_rows

    fm, errors = totals.frames_meta, totals.errors
    warns = input_warnings(src, fm)
    status = "ok" if not errors else "partial"
    if status == "ok" and totals.n_sites == 0:
        status = "no lattice"
    summary = {
        "name": src.entry.name,
        "status": status,
        "input": {**src.entry.fingerprint(), **src.info},
        "stemfast_version": __version__,
        "config_hash": run.chash,
        "neutral_settings": neutral_settings(run.config),  # made with these (stemfast.config.RESULT_NEUTRAL_SETTINGS)
        "model_sha256": run.model_sha,
        # with the engine that ran it on this input's frames (stemfast.model.engine)
        "model": {**model_identity(d.parent, run.model_sha), "engine": combined_engine(m.get("engine") for m in fm),
                  "device": combined_engine(m.get("device") for m in fm)},
        # what ran the kernels (stemfast.backend.backend_used): cpp, or numba / numpy -- with the reason
        # where the compiled extension could not be imported (the stage times are those kernels')
        "backend": combined_engine(m.get("backend") for m in fm),
        "core_import_error": totals.core_import_error,
        # a second detector of the same scan in the defect scores (stemfast.batch.companions)
        "detectors": max((int(m.get("detectors") or 1) for m in fm), default=1),
        **_companion_fields(src.entry),
        "n_frames": int(src.n_frames),
        "n_frames_ok": int(totals.n_ok),
        "n_sites": int(totals.n_sites),
        "n_defects": int(totals.n_defects),
        "n_classes": int(totals.n_classes),
        "class_counts": dict(sorted(totals.class_counts.items(), key=lambda kv: int(kv[0]))),
        "defect_kinds": dict(sorted(totals.defect_kinds.items())),
        "lattice": lattice_summary(fm, src.info),
        # do the learned classes follow the metal / chalcogen / hollow sublattices (analysis.analyze_sites)
        "class_sublattice_ari": median_finite(m.get("class_sublattice_ari") for m in fm),
        "class_sublattice_ari_local": median_finite(m.get("class_sublattice_ari_local") for m in fm),
        # the sublattice each class sits on, and the share of its sites there
        "class_sublattice": class_sublattice_summary(fm),
        # sites whose class was taken from their own sublattice around them (analysis.lattice_consistent_classes)
        "classes_from_neighbours": sum(int(m.get("classes_from_neighbours") or 0) for m in fm),
        # which sublattice is named the metal, and the strongly dark sites on each (analysis.sublattice_naming;
        # the first frame's)
        "sublattice_naming": next((m["sublattice_naming"] for m in fm if m.get("sublattice_naming")), None),
        # how far each column sublattice's intensities spread about their local level (analysis.mixed_columns;
        # the first frame's): one far wider than the other is a mixed column population
        "column_spread": next((m["column_spread"] for m in fm if m.get("column_spread")), None),
        # how far apart the sublattices' intensities lie, in spreads (analysis.sublattice_separation; the
        # first frame's): under 0.25, two sublattices read alike and their names are a guess
        "sublattice_separation": next((m["sublattice_separation"] for m in fm if m.get("sublattice_separation")), None),
        # how tightly the STN angles follow the lattice (largest grain; analysis.rotation_latent)
        "rotation_lock": median_finite(next(iter((m.get("rotation_lock") or {None: None}).values())) for m in fm),
        # per border band (one spacing each), how much more the column z scatter than inside, the
        # largest over the frames (analysis.edge_noise); the scores there were divided by it
        "edge_z_spread": _max_per_band(m.get("edge_z_spread") for m in fm),
        # per sublattice, the estimated share of its flagged sites the noise alone makes (analysis, stemfast.fdr);
        # the largest over the frames
        "flagged_fdr": _max_per_key(m.get("flagged_fdr") for m in fm),
        "timings_s": totals.stage_s,
        "throughput": stage_table_rows({k: v for k, v in totals.stage_s.items() if k in STAGES}, totals.n_sites),
        "peak_memory_mib": peak_memory_mib(),
        "top": [c for _, c, _ in totals.ranked()],
        "frames": fm,
    }
    if src.is_stack:
        summary["drift_px"] = drift_summary(fm)
    if trk:
        summary["tracking"] = trk.summary()
    if errors:
        summary["frame_errors"] = errors
    extent = next((m["patch_extent"] for m in fm if m.get("patch_extent")), None)
    if extent:  # a fixed patch size that spans other site spacings than at training (stemfast.patchextent)
        summary["patch_extent"] = extent
    for key in ANALYSIS_WARNING_KEYS:  # the first frame's that has one
        text = next((m[key] for m in fm if m.get(key)), None)
        if text:
            summary[key] = text
            if text not in warns:
                warns.append(text)
    summary["warnings"] = warns
    return summary


def stack_tracker(d: Path, config, input_info: dict):
    """The defect tracking of a stack (:mod:`stemfast.tracking`), or None when switched off."""
    from ..io import unit_to_nm
    from ..tracking import StackTracker, TrackSettings

    settings = getattr(config, "tracking", None) or TrackSettings()
    if not settings.enabled:
        return None
    ps = input_info.get("pixel_size")
    to_nm = unit_to_nm(input_info.get("unit")) if ps else None
    return StackTracker(d, settings=settings, nm_per_px=float(ps) * to_nm if ps and to_nm else None,
                        shape=input_info.get("shape"), dose=input_info.get("dose"))


#: the parts of a frame's ``meta["lattice"]`` that carry a ``"warning"`` of their own, in the order
#: the summary lists them
_LATTICE_WARNING_KEYS = ("contrast", "companion_contrast", "distortion", "crowding", "inversion_domains",
                         "inversion_undecided", "clipping", "no_data", "spikes", "scan_wobble", "noise")


def lattice_warnings(lat) -> list[str]:
    """The warnings of a frame's ``meta["lattice"]`` (sites.find_sites): an unsure lattice, several
    grains, an anisotropic one, a crowded site table, inversion domains, clipped intensities, a
    calibration that does not fit the material, sideways jumps of the scan lines the lattice confirmed and
    that were not repaired."""
    if not lat:
        return []
    out = []
    if lat.get("unsure"):
        out.append("the site lattice is uncertain: " + "; ".join(lat["unsure"]))
    if lat.get("grain_warning"):
        out.append(lat["grain_warning"])
    out += [w for w in ((lat.get(key) or {}).get("warning") for key in _LATTICE_WARNING_KEYS) if w]
    if lat.get("calibration_warning"):  # find_sites' CalibrationWarning, as it worded it
        out.append(lat["calibration_warning"])
    scan = lat.get("scan_lines") or {}
    if scan.get("jumps_not_repaired") and scan.get("jumps_not_repaired_confirmed"):
        # jumps the lattice confirmed, beyond the reach (said in summary.json's lattice alone before); candidates
        # it did not confirm, or confirmed against a ring their repair showed is not the image's, are no evidence
        out.append(f"scan: {scan['jumps_not_repaired']}; the lines they bound are analysed as recorded (their sites "
                   "and defect scores may be wrong)")
    return out
