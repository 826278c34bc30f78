"""Frames of an input: reading them (one frame ahead in a background thread), analysing each one
(``prepare`` + ``analyze``) and measuring the drift to the frame before (:mod:`stemfast.drift`)."""
from __future__ import annotations

import logging
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from ..drift import block_average, phase_drift
from ..spikes import despiked
from ..report import ANALYSIS_WARNING_KEYS
from .common import progress_bar

__all__ = ["FrameResult", "read_frame", "count_frames", "frame_record", "settings_vs_image", "analyze_frame",
           "prefetched", "iter_frames", "FrameWindow"]

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
            "timings_s": {}, "drift_px": None, "top": [], "warnings": [], "engine": None}


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
                   companion: np.ndarray | None = None) -> FrameResult:
    """``prepare`` + ``analyze`` one 2-D frame; errors of the image (ValueError) become the frame's status.

    ``check_settings``: also compare a given spacing with the image's own estimate (a warning).
    ``companion``: a second detector's image of the same scan (:func:`stemfast.frontend.prepare`).
    """
    from ..frontend import with_companion
    from ..model.engine import device_of, engine_of
    from ..pipeline import analyze, prepare

    rec = frame_record(frame)
    rec["timings_s"]["read"] = read_s
    try:
        for msg in settings_vs_image(img, config, check_estimate=check_settings):
            log.warning("frame %d: %s", frame, msg)
            rec["warnings"].append(msg)
        if prep is None:
            with _warnings_logged(frame):
                prep = prepare(img, config=config, pixel_size=pixel_size, unit=unit, patch_size=patch_size,
                               companion=companion)
        elif companion is not None:  # prepared for training, without the companion
            prep.sites = with_companion(prep.sites, companion, config.sites)
        if len(prep.patches) and model is None:
            raise RuntimeError("no model: none could be trained (no input of the batch had a lattice)")
        with _warnings_logged(frame):
            table, summ = analyze(prep, model, config=config)
    except ValueError as exc:
        rec["error"] = str(exc)
        return FrameResult(rec)
    rec["timings_s"].update({k: float(v) for k, v in prep.timings.items()})
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
                    "recon_contrast_exponent", "edge_z_spread", "flagged_fdr", "sublattice_naming", "column_spread",
                    "sublattice_separation", "sublattice_alike", "classes_from_neighbours",
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


def iter_frames(mg, frames: Sequence[int], *, model, config, patch_size, cache: dict | None = None,
                 cache_key: str = "", prev_frame: int | None = None, bar: bool = False,
                 desc: str = "", companion=None) -> Iterator[FrameResult]:
    """Analyse ``frames`` of ``mg`` one by one (lazy frames), measuring the drift to the previous frame.

    ``companion``: the second detector's image of a 2-D input, or for a stack a function of the frame
    index giving the second detector's frame (:func:`stemfast.batch.companions.read_companion`)."""
    prev_small = None
    if prev_frame is not None and prev_frame >= 0:
        try:
            prev_small = _drift_view(read_frame(mg, prev_frame), config)
        except Exception as exc:  # noqa: BLE001 - the previous frame is only needed for the drift
            log.info("%s: frame %d unreadable for the drift: %s", desc, prev_frame, exc)
    stack = getattr(mg, "is_stack", False)
    it = progress_bar(prefetched(mg, frames), bar and len(frames) > 1, desc=desc, unit="frame", leave=False,
              total=len(frames))
    checked = False
    for f, img, exc, read_s in it:
        if exc is not None:  # a truncated stack: report the frame, go on
            rec = frame_record(f)
            rec["error"] = f"cannot read frame {f}: {exc}"
            prev_small = None
            yield FrameResult(rec)
            continue
        prep = cache.pop((cache_key, f), None) if cache is not None else None
        fr = analyze_frame(img, f, model=model, config=config, patch_size=patch_size,
                            pixel_size=mg.pixel_size, unit=mg.unit, prep=prep, read_s=read_s,
                            check_settings=not checked, companion=companion(f) if callable(companion) else companion)
        checked = True
        if stack:
            small = _drift_view(img, config)  # (frame, its blocks without data)
            if prev_small is not None and prev_small[0].shape == small[0].shape:
                # NaN beside a blank frame: unknown, a drift break
                d = phase_drift(prev_small[0], small[0], img.shape, gaps=(prev_small[1], small[1]))
                fr.meta["drift_px"] = list(d) if np.all(np.isfinite(d)) else None
            prev_small = small
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
