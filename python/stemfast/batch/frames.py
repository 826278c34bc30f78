"""Frames of an input: reading them (one frame ahead in a background thread), analysing each one
(``prepare`` + ``analyze``) and measuring the drift to the last frame before with a lattice
(:mod:`stemfast.drift`; a stack analysed in chunks links the chunks' drift at assembly,
:func:`linked_drift`)."""
from __future__ import annotations

import logging
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..drift import block_average, phase_drift
from ..spikes import despiked
from ..report import ANALYSIS_WARNING_KEYS
from .common import progress_bar

__all__ = ["FrameResult", "read_frame", "count_frames", "frame_record", "settings_vs_image", "analyze_frame",
           "prefetched", "iter_frames", "FrameWindow", "has_lattice", "DriftEnds", "drift_from", "linked_drift"]

log = logging.getLogger("stemfast.batch")


@dataclass
class FrameResult:
    """One analysed frame: a JSON-able record, the site table and the top candidates' patches."""

    meta: dict
    table: object | None = None  # SiteTable
    top_patches: np.ndarray | None = None


def read_frame(mg, i: int) -> np.ndarray:
    """Frame ``i`` of a stack, or the image of a 2-D input."""
    if getattr(mg, "is_stack", False):
        return np.asarray(mg.frame(i))
    return np.asarray(mg.data)


def count_frames(mg) -> int:
    """Number of frames of an opened input (1 for a 2-D image)."""
    return int(getattr(mg, "n_frames", 1) or 1) if getattr(mg, "is_stack", False) else 1


def frame_record(frame: int) -> dict:
    """The JSON record of a frame before it is analysed (status ``error`` until it is)."""
    return {"frame": int(frame), "status": "error", "error": None, "n_sites": 0, "n_defects": 0,
            "class_counts": {}, "defect_kinds": {}, "spacing_px": None, "angle_deg": None,
            "timings_s": {}, "drift_px": None, "top": [], "warnings": [], "engine": None, "backend": None}


def settings_vs_image(img: np.ndarray, config, *, check_estimate: bool) -> list[str]:
    """Settings checked against the image (:mod:`stemfast.sanity`): a spacing that does not fit is a
    ValueError (the frame's error); one that disagrees with the image's estimate a warning."""
    from ..sanity import check_spacing_fits, spacing_warnings

    sp = config.sites.spacing
    check_spacing_fits(sp, np.shape(img))
    return spacing_warnings(img, sp, config.sites) if (check_estimate and sp is not None) else []


@contextmanager
def _warnings_logged(frame: int) -> Iterator[None]:
    """What the block warns of, logged (info) instead of shown: ``prepare``'s and ``analyze``'s
    warnings reach the frame's record and summary (lattice warnings, ``class_warning``) already, and
    would be shown twice."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        log.info("frame %d: %s", frame, w.message)


def analyze_frame(img: np.ndarray, frame: int, *, model, config, patch_size: int | None, pixel_size, unit,
                   prep=None, read_s: float = 0.0, check_settings: bool = False,
                   companion: np.ndarray | None = None, companion_higher: bool | None = None) -> FrameResult:
    """``prepare`` + ``analyze`` one 2-D frame; errors of the image (ValueError) become the frame's status.

    ``check_settings``: also compare a given spacing with the image's own estimate (a warning).
    ``companion``: a second detector's image of the same scan, ``companion_higher`` whether it was
    recorded at higher angles (:func:`stemfast.frontend.prepare`).
    """
    from ..backend import backend_used
    from ..frontend import named_with_companion, with_companion
    from ..model.engine import device_of, engine_of
    from ..pipeline import analyze, model_input_size, prepare

    rec = frame_record(frame)
    rec["timings_s"]["read"] = read_s
    try:
        for msg in settings_vs_image(img, config, check_estimate=check_settings):
            log.warning("frame %d: %s", frame, msg)
            rec["warnings"].append(msg)
        if prep is None:
            with _warnings_logged(frame):
                # patches resampled to the model's own input size (a reused model's may differ from the settings')
                prep = prepare(img, config=config, pixel_size=pixel_size, unit=unit, patch_size=patch_size,
                               companion=companion, input_size=model_input_size(model),
                               companion_higher=companion_higher)
        elif companion is not None:  # prepared for training, without the companion
            with _warnings_logged(frame):
                sites = with_companion(prep.sites, companion, config.sites)
                named = named_with_companion(sites, img, companion, companion_higher, config.sites,
                                             pixel_size=pixel_size, unit=unit)
            if named is not sites and not np.array_equal(named.xy, sites.xy):
                raise RuntimeError("the sites found again under the companion's sublattice names moved")
            prep.sites = named
        if len(prep.patches) and model is None:
            raise RuntimeError("no model: none could be trained (no input of the batch had a lattice)")
        with _warnings_logged(frame):
            table, summ = analyze(prep, model, config=config)
    except ValueError as exc:
        rec["error"] = str(exc)
        return FrameResult(rec)
    rec["timings_s"].update({k: float(v) for k, v in prep.timings.items()})
    # what ran the kernels here (a Dask worker may differ from the client): Numba / NumPy where the
    # compiled extension could not be imported, and why (FrameTotals keeps the reason once)
    rec.update(backend_used(config.sites.backend))
    meta = prep.sites.meta
    n = len(table)
    rec.update(status=str(meta.get("status", "ok")) if n else str(meta.get("status", "no lattice")),
               n_sites=int(n), spacing_px=meta.get("spacing_px"), angle_deg=meta.get("angle_deg"),
               lattice=meta.get("lattice"))
    if not n and meta.get("reason"):  # why there is no lattice (find_sites' NoLatticeWarning), in the summary
        rec["warnings"].append(str(meta["reason"]))
    table = table.with_columns({"frame": np.full(n, frame, dtype=np.int64)})
    top_patches = None
    if n and "class_id" in table:
        rec["n_defects"] = int(summ.get("n_defects", 0))
        rec["class_counts"] = {str(k): int(v) for k, v in summ.get("class_counts", {}).items()}
        rec["defect_kinds"] = {str(k): int(v) for k, v in summ.get("defect_kinds", {}).items()}
        rec["n_classes"] = int(summ.get("n_classes", 0))
        rec["engine"] = engine_of(model)  # what ran the model here (a Dask worker may differ from the client)
        rec["device"] = device_of(model)
        for key in ("class_sublattice_ari", "class_sublattice_ari_local", "class_sublattice", "rotation_latent",
                    "rotation_lock", "material", "score", "detectors", "n_sites_unlike_lattice",
                    "n_unflagged_unlike_lattice", "recon_contrast_exponent", "edge_z_spread", "flagged_fdr",
                    "sublattice_naming", "column_spread",
                    "sublattice_separation", "sublattice_alike", "classes_from_neighbours", "single_vacancy_depth",
                    "metal_kind_ambiguous", "patch_extent",
                    *ANALYSIS_WARNING_KEYS):  # the analysis' own report
            if key in summ:
                rec[key] = summ[key]
        is_def = np.asarray(table["is_defect"], bool)
        top = []
        for t in summ.get("top", []):
            t = dict(t)
            t["frame"] = int(frame)
            t["is_defect"] = bool(is_def[t["index"]])
            top.append(t)
        rec["top"] = top
        idx = np.array([t["index"] for t in top], dtype=np.int64)
        top_patches = np.asarray(prep.patches[idx], dtype=np.float32) if len(idx) else \
            np.zeros((0, prep.patch_size, prep.patch_size), np.float32)
    return FrameResult(rec, table, top_patches)


def prefetched(mg, frames: Sequence[int]) -> Iterator[tuple[int, np.ndarray | None, Exception | None, float]]:
    """Yield ``(frame, image, read_error, wait_s)`` for ``frames``, reading frame ``i + 1`` while ``i`` is analysed.

    One background thread reads ahead by one frame (so at most two frames are in memory, whatever
    the length of the stack); ``wait_s`` is the time the consumer waited for the frame, i.e. the
    part of the reading that did not overlap with the analysis. A single image is read in place.
    """
    from concurrent.futures import ThreadPoolExecutor

    frames = list(frames)
    ahead = len(frames) > 1 and getattr(mg, "is_stack", False)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stemfast-read") if ahead else None

    def start(f: int):
        """A call returning frame ``f``: already being read in the background, or read when called."""
        return pool.submit(read_frame, mg, f).result if pool is not None else (lambda: read_frame(mg, f))

    try:
        nxt = start(frames[0]) if frames else None
        for j, f in enumerate(frames):
            t0 = time.perf_counter()
            try:
                img, exc = nxt(), None
            except Exception as e:  # noqa: BLE001 - reported per frame by the caller
                img, exc = None, e
            wait = time.perf_counter() - t0
            nxt = start(frames[j + 1]) if j + 1 < len(frames) else None
            yield f, img, exc, wait
            img = None
    finally:
        if pool is not None:
            pool.shutdown(wait=True)


def _drift_view(img: np.ndarray, config) -> tuple[np.ndarray, np.ndarray]:
    """What the drift between frames is measured on: ``img`` block-averaged with its blocks without data
    (:func:`stemfast.drift.block_average`), its single-pixel spikes replaced first when
    ``sites.despike`` is on (:func:`stemfast.spikes.despiked`). Hot pixels at the same place in every
    frame are a pattern that does not move: 200 of them in a 512 x 512 series pulled the phase
    correlation to 0.22 px for a true drift of 1.3 px (docs/RESULTS.md, round 34)."""
    if config.sites.despike:
        img = despiked(img)[0]
    return block_average(np.asarray(img, np.float32), with_gap=True)


def has_lattice(rec: dict) -> bool:
    """Whether the drift may be measured to or from a frame (its record): it was analysed and has sites.

    A frame without a lattice (noise, a blanked beam, a constant or unreadable frame) has nothing that
    moves with the specimen: a phase correlation with it returns a number, but not the drift (a noise
    frame in a series drifting 0.3 px per frame gave -7.4 px and 13.5 px, and every later position was off).
    """
    return not rec.get("error") and int(rec.get("n_sites") or 0) > 0


def _drift_unknown(rec: dict, desc: str, why: str) -> None:
    """Record (a frame warning) and log that the drift of the frame ``rec`` could not be measured."""
    msg = f"drift unknown: {why}"
    log.warning("%s: frame %d: %s", desc, rec["frame"], msg)
    rec["warnings"].append(msg)


def _frame_drift(rec: dict, img: np.ndarray, ref, config, desc: str):
    """Measure the drift of a frame with a lattice (record ``rec``, image ``img``) to ``ref`` = ``(frame,
    view)``, the last frame before it with a lattice (None: none; :func:`drift_from`). An unknown drift is
    a frame warning; any failure of the measure only leaves the drift unknown. Returns the reference for
    the next frame, ``(frame, view)`` (None when this frame's own view could not be made)."""
    f = int(rec["frame"])
    try:
        small = _drift_view(img, config)  # (frame, its blocks without data)
    except Exception as exc:  # noqa: BLE001 - the drift must not lose the frame
        _drift_unknown(rec, desc, f"cannot prepare the frame for the drift ({type(exc).__name__}: {exc})")
        return None
    if ref is not None:
        drift_from(rec, small, img.shape, ref, desc)
    return f, small


def drift_from(rec: dict, view, shape: tuple[int, int], ref, desc: str) -> None:
    """Measure the drift of the frame ``rec`` (its drift view ``view`` = ``(frame, gap)``,
    :func:`_drift_view`, of an image of ``shape``) from ``ref`` = ``(frame, view)``, the last frame before
    it with a lattice. Writes ``rec["drift_px"]`` when ``ref`` is the frame just before, else
    ``rec["drift_over_gap"] = {"from_frame", "px"}`` (the drift accumulated over frames without a
    lattice); an unknown drift is a frame warning."""
    f = int(rec["frame"])
    g, prev = ref
    why = f"no drift could be registered between frame {g} and this one (nothing in common)"
    try:
        if prev[0].shape != view[0].shape:
            raise ValueError(f"frame {g} has another shape")
        d = phase_drift(prev[0], view[0], tuple(shape), gaps=(prev[1], view[1]))
    except Exception as exc:  # noqa: BLE001 - an unknown drift, said; the stack goes on
        d, why = (float("nan"), float("nan")), f"measuring it from frame {g} failed ({type(exc).__name__}: {exc})"
    if not np.all(np.isfinite(d)):
        _drift_unknown(rec, desc, why)
    elif g == f - 1:
        rec["drift_px"] = [float(v) for v in d]
    else:
        rec["drift_over_gap"] = {"from_frame": int(g), "px": [float(v) for v in d]}
        log.info("%s: frame %d: drift measured from frame %d (frames between have no lattice)", desc, f, g)


@dataclass
class DriftEnds:
    """The drift references at the ends of a chunk of a stack (:func:`iter_frames` with ``ends``), which
    link its drift to the chunks before and after it (:func:`linked_drift`). ``has_lattice``: whether a
    frame of the chunk has a lattice; ``first``: ``(frame, view)`` of the first such frame (its drift
    from the chunks before is measured at assembly; None when its view could not be made); ``last``:
    the reference the frame after the chunk is measured from, ``(frame, view)`` of its last frame with
    a lattice (None when that one's view could not be made); ``shape``: the frames' shape."""

    has_lattice: bool = False
    first: tuple | None = None
    last: tuple | None = None
    shape: tuple | None = None


def linked_drift(chunks: Iterable[tuple[DriftEnds, Iterable[FrameResult]]], desc: str = "") -> Iterator[FrameResult]:
    """The frame results of the chunks of a stack (in frame order, each with its :class:`DriftEnds`), the
    drift of each chunk's first frame with a lattice measured from the last frame with one before it,
    in the chunks before (:func:`drift_from`): the drift of the in-process run, whatever the chunks."""
    ref = None
    for ends, results in chunks:
        for fr in results:
            if ends.first is not None and ref is not None and int(fr.meta["frame"]) == ends.first[0]:
                drift_from(fr.meta, ends.first[1], ends.shape, ref, desc)
            yield fr
        if ends.has_lattice:  # a chunk without a lattice carries the reference on
            ref = ends.last


def iter_frames(mg, frames: Sequence[int], *, model, config, patch_size, cache: dict | None = None,
                 cache_key: str = "", bar: bool = False, desc: str = "", companion=None,
                 companion_higher: bool | None = None, check_settings: bool = True,
                 ends: DriftEnds | None = None) -> Iterator[FrameResult]:
    """Analyse ``frames`` of ``mg`` one by one (lazy frames), measuring the drift of each frame with a
    lattice to the last frame before it with one (:func:`has_lattice`, :func:`_frame_drift`): frames
    without a lattice are never registered, the frame after them is measured across the gap.

    ``check_settings``: compare the settings with the first frame read (:func:`settings_vs_image`'s
    estimate; the chunks of a stack after its first: False, the stack is checked once).
    ``ends``: ``frames`` are a chunk of a stack: the drift of its first frame with a lattice is left to
    the assembly (:func:`linked_drift`), the chunk's :class:`DriftEnds` are filled in.
    ``companion``: the second detector's image of a 2-D input, or for a stack a function of the frame
    index giving the second detector's frame (:func:`stemfast.batch.companions.read_companion`);
    ``companion_higher``: whether it was recorded at higher angles (None: not known)."""
    ref = None
    stack = getattr(mg, "is_stack", False)
    it = progress_bar(prefetched(mg, frames), bar and len(frames) > 1, desc=desc, unit="frame", leave=False,
              total=len(frames))
    checked = not check_settings
    for f, img, exc, read_s in it:
        if exc is not None:  # a truncated stack: report the frame, go on
            rec = frame_record(f)
            rec["error"] = f"cannot read frame {f}: {exc}"
            yield FrameResult(rec)
            continue
        prep = cache.pop((cache_key, f), None) if cache is not None else None
        fr = analyze_frame(img, f, model=model, config=config, patch_size=patch_size,
                            pixel_size=mg.pixel_size, unit=mg.unit, prep=prep, read_s=read_s,
                            check_settings=not checked, companion=companion(f) if callable(companion) else companion,
                            companion_higher=companion_higher)
        checked = True
        if stack and has_lattice(fr.meta):
            ref = _frame_drift(fr.meta, img, ref, config, desc)
            if ends is not None:
                if not ends.has_lattice:  # the chunk's first frame with a lattice: measured at assembly
                    ends.has_lattice, ends.first, ends.shape = True, ref, tuple(int(v) for v in img.shape)
                ends.last = ref
        yield fr


class FrameWindow:
    """Frames ``offset, offset + 1, ...`` of a stack read with ``io.read(frames=slice)``, by their
    index in the whole stack."""

    is_stack = True

    def __init__(self, mg, offset: int) -> None:
        self.mg, self.offset = mg, int(offset)
        self.pixel_size, self.unit = mg.pixel_size, mg.unit

    def frame(self, i: int) -> np.ndarray:
        j = int(i) - self.offset
        if j < 0:
            raise IndexError(f"frame {i} is before this window (starts at {self.offset})")
        if not getattr(self.mg, "is_stack", False):  # a one-frame window comes back 2-D
            if j != 0:
                raise IndexError(f"frame {i} is outside this window")
            return np.asarray(self.mg.data)
        return np.asarray(self.mg.frame(j))
